"""Expert-choice routing (Zhou et al., 2022): smoe.ops.expert_choice,
torch.ops.smoe.expert_choice(_backward). C++: include/smoe/ops/gating.h (expert_choice.h after the
split), binding csrc/bindings/expert_choice.cpp."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from smoe import _core
from smoe import reference as _ref
from smoe.ops._common import SCORE_FUNCS, acc_dtype, check_backend, code, contig, dims, empty, exec_args, v

__all__ = ["expert_choice"]


def _expert_choice_shapes(op: str, logits, capacity):
    """(weights [T, E] acc, tokens [E, C] i32, row_of [T, E] i32, scores [T, E] acc); the capacity sizes
    `tokens`, so it is checked here."""
    dims(op, [("logits" if op == "expert_choice" else "scores", logits, 2, "[T, E]")])
    T, E = logits.shape
    _core.check_int(op, "capacity", capacity, 1, T, " (T = logits.size(0))")
    acc = acc_dtype(logits.dtype)
    return [((T, E), acc), ((E, capacity), torch.int32), ((T, E), torch.int32), ((T, E), acc)]


@torch.library.custom_op("smoe::expert_choice", mutates_args=())
def expert_choice_op(
    logits: Tensor, capacity: int, score_func: str, backend: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    op = "expert_choice"
    specs = _expert_choice_shapes(op, logits, capacity)
    sf = code(op, "score_func", SCORE_FUNCS, score_func)
    weights, tokens, row_of, scores = empty(logits, specs)
    _core.lib().expert_choice_forward(
        **exec_args(backend, logits),
        capacity=capacity,
        score_func=sf,
        logits=v(logits, "logits"),
        scores=v(scores, "scores"),
        tokens=v(tokens, "tokens"),
        row_of=v(row_of, "row_of"),
        weights=v(weights, "weights"),
    )
    return weights, tokens, row_of, scores


@expert_choice_op.register_fake
def _(logits, capacity, score_func, backend):
    specs = _expert_choice_shapes("expert_choice", logits, capacity)
    code("expert_choice", "score_func", SCORE_FUNCS, score_func)
    return tuple(empty(logits, specs))


def _expert_choice_backward_shapes(scores):
    dims("expert_choice_backward", [("scores", scores, 2, "[T, E]")])
    return [(tuple(scores.shape), None)]  # grad_logits [T, E] in the scores' dtype


@torch.library.custom_op("smoe::expert_choice_backward", mutates_args=())
def expert_choice_backward(
    scores: Tensor,
    row_of: Tensor,
    grad_weights: Optional[Tensor],
    grad_scores: Optional[Tensor],
    capacity: int,
    score_func: str,
    backend: str,
) -> Tensor:
    """grad_logits = backward of the score function applied to g = grad_weights where row_of >= 0
    (0 elsewhere) + grad_scores; one core call (every element written; both absent: zeros)."""
    op = "expert_choice_backward"
    specs = _expert_choice_backward_shapes(scores)
    _core.check_c_int(op, "capacity", capacity)
    sf = code(op, "score_func", SCORE_FUNCS, score_func)
    (grad_logits,) = empty(scores, specs)
    _core.lib().expert_choice_backward(
        **exec_args(backend, scores),
        capacity=capacity,
        score_func=sf,
        scores=v(scores, "scores"),
        row_of=v(row_of, "row_of"),
        grad_weights=v(grad_weights, "grad_weights"),
        grad_scores=v(grad_scores, "grad_scores"),
        grad_logits=v(grad_logits, "grad_logits"),
    )
    return grad_logits


@expert_choice_backward.register_fake
def _(scores, row_of, grad_weights, grad_scores, capacity, score_func, backend):
    return empty(scores, _expert_choice_backward_shapes(scores))[0]


def _expert_choice_setup(ctx, inputs, output):
    logits, capacity, score_func, backend = inputs
    _weights, tokens, row_of, scores = output
    ctx.save_for_backward(scores, row_of)
    ctx.params = (capacity, score_func, backend)
    ctx.logits_dtype = logits.dtype
    ctx.mark_non_differentiable(tokens, row_of)
    ctx.set_materialize_grads(False)  # the op takes None for a gradient that did not flow


def _expert_choice_backward(ctx, grad_weights, _grad_tokens, _grad_row_of, grad_scores):
    if grad_weights is None and grad_scores is None:
        return None, None, None, None
    scores, row_of = ctx.saved_tensors
    grad_logits = torch.ops.smoe.expert_choice_backward(
        scores, row_of, contig(grad_weights), contig(grad_scores), *ctx.params
    )
    return grad_logits.to(ctx.logits_dtype), None, None, None


expert_choice_op.register_autograd(_expert_choice_backward, setup_context=_expert_choice_setup)


def expert_choice(
    logits: Tensor, *, capacity: int, score_func: str = "softmax", backend: str = "auto"
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Expert-choice routing (Zhou et al., 2022): each expert takes its `capacity` best tokens.

    logits [T, E] -> (weights [T, E] f32: the score where (t, e) was chosen, 0 elsewhere;
    tokens [E, C] i32: expert e's tokens by descending score, ties to the lower token;
    row_of [T, E] i32: row e*C + c of the expert-sorted buffer, -1 where not chosen; scores [T, E] f32).
    Gradient flows to logits from weights and from scores.
    """
    op = "expert_choice"
    backend = check_backend(op, backend, [("logits", logits)])
    _core.check_int(op, "capacity", capacity, 1, c_max=_core.INT64_MAX)  # an int for torch's schema
    if backend == "reference":
        _expert_choice_shapes(op, logits, capacity)
        code(op, "score_func", SCORE_FUNCS, score_func)
        return _ref.expert_choice(logits, capacity=capacity, score_func=score_func)
    return expert_choice_op(logits, capacity, score_func, backend)

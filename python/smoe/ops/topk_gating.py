"""Token-choice top-k gating: smoe.ops.topk_gating, torch.ops.smoe.topk_gating(_backward).
C++: include/smoe/ops/gating.h, binding csrc/bindings/topk_gating.cpp."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from smoe import _core
from smoe import reference as _ref
from smoe.ops._common import (
    GROUP_SCORES,
    SCORE_FUNCS,
    acc_dtype,
    check_backend,
    code,
    contig,
    dims,
    empty,
    exec_args,
    v,
)

__all__ = ["topk_gating"]


def _topk_params(op, top_k, score_func, n_groups, topk_groups, group_score, renormalize, renorm_eps, routed_scaling):
    """The binding's TopkGatingParams keywords; ValueError naming a bad enum name or an int past int32."""
    _core.check_c_int(op, "n_groups", n_groups)
    _core.check_c_int(op, "topk_groups", topk_groups)
    return {
        "top_k": top_k,
        "score_func": code(op, "score_func", SCORE_FUNCS, score_func),
        "n_groups": n_groups,
        "topk_groups": topk_groups,
        "group_score": code(op, "group_score", GROUP_SCORES, group_score),
        "renormalize": renormalize,
        "renorm_eps": renorm_eps,
        "routed_scaling": routed_scaling,
    }


def _topk_gating_shapes(op: str, logits, top_k):
    """(weights [T, K] acc, experts [T, K] i32, scores [T, E] acc); top_k sizes an output, so it is
    checked here, before anything is allocated."""
    dims(op, [("logits" if op == "topk_gating" else "scores", logits, 2, "[T, E]")])
    T, E = logits.shape
    _core.check_int(op, "top_k", top_k, 1, E, " (E = logits.size(1))")
    acc = acc_dtype(logits.dtype)
    return [((T, top_k), acc), ((T, top_k), torch.int32), ((T, E), acc)]


@torch.library.custom_op("smoe::topk_gating", mutates_args=())
def topk_gating_op(
    logits: Tensor,
    bias: Optional[Tensor],
    top_k: int,
    score_func: str,
    n_groups: int,
    topk_groups: int,
    group_score: str,
    renormalize: bool,
    renorm_eps: float,
    routed_scaling: float,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    op = "topk_gating"
    specs = _topk_gating_shapes(op, logits, top_k)
    params = _topk_params(
        op, top_k, score_func, n_groups, topk_groups, group_score, renormalize, renorm_eps, routed_scaling
    )
    weights, experts, scores = empty(logits, specs)
    _core.lib().topk_gating_forward(
        **exec_args(backend, logits),
        **params,
        logits=v(logits, "logits"),
        bias=v(bias, "bias"),
        weights=v(weights, "weights"),
        experts=v(experts, "experts"),
        scores=v(scores, "scores"),
    )
    return weights, experts, scores


@topk_gating_op.register_fake
def _(
    logits,
    bias,
    top_k,
    score_func,
    n_groups,
    topk_groups,
    group_score,
    renormalize,
    renorm_eps,
    routed_scaling,
    backend,
):
    specs = _topk_gating_shapes("topk_gating", logits, top_k)
    _topk_params(
        "topk_gating", top_k, score_func, n_groups, topk_groups, group_score, renormalize, renorm_eps, routed_scaling
    )
    return tuple(empty(logits, specs))


def _topk_gating_backward_shapes(scores):
    dims("topk_gating_backward", [("scores", scores, 2, "[T, E]")])
    return [(tuple(scores.shape), None)]  # grad_logits [T, E] in the scores' dtype


@torch.library.custom_op("smoe::topk_gating_backward", mutates_args=())
def topk_gating_backward(
    scores: Tensor,
    experts: Tensor,
    grad_weights: Optional[Tensor],
    grad_scores: Optional[Tensor],
    top_k: int,
    score_func: str,
    n_groups: int,
    topk_groups: int,
    group_score: str,
    renormalize: bool,
    renorm_eps: float,
    routed_scaling: float,
    backend: str,
) -> Tensor:
    op = "topk_gating_backward"
    specs = _topk_gating_backward_shapes(scores)
    _core.check_c_int(op, "top_k", top_k)
    params = _topk_params(
        op, top_k, score_func, n_groups, topk_groups, group_score, renormalize, renorm_eps, routed_scaling
    )
    (grad_logits,) = empty(scores, specs)
    _core.lib().topk_gating_backward(
        **exec_args(backend, scores),
        **params,
        scores=v(scores, "scores"),
        experts=v(experts, "experts"),
        grad_weights=v(grad_weights, "grad_weights"),
        grad_scores=v(grad_scores, "grad_scores"),
        grad_logits=v(grad_logits, "grad_logits"),
    )
    return grad_logits


@topk_gating_backward.register_fake
def _(scores, experts, grad_weights, grad_scores, *params):
    return empty(scores, _topk_gating_backward_shapes(scores))[0]


def _topk_gating_setup(ctx, inputs, output):
    logits, _bias, *params = inputs
    _weights, experts, scores = output
    ctx.save_for_backward(scores, experts)
    ctx.params = params
    ctx.logits_dtype = logits.dtype
    ctx.mark_non_differentiable(experts)
    ctx.set_materialize_grads(False)  # the core takes None for a gradient that did not flow


def _topk_gating_backward(ctx, grad_weights, _grad_experts, grad_scores):
    if grad_weights is None and grad_scores is None:
        return (None, None) + (None,) * len(ctx.params)
    scores, experts = ctx.saved_tensors
    grad_logits = torch.ops.smoe.topk_gating_backward(
        scores, experts, contig(grad_weights), contig(grad_scores), *ctx.params
    )
    return (grad_logits.to(ctx.logits_dtype), None) + (None,) * len(ctx.params)


topk_gating_op.register_autograd(_topk_gating_backward, setup_context=_topk_gating_setup)


def topk_gating(
    logits: Tensor,
    *,
    top_k: int,
    score_func: str = "softmax",
    bias: Optional[Tensor] = None,
    n_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "max",
    renormalize: bool = False,
    renorm_eps: float = 0.0,
    routed_scaling: float = 1.0,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """Token-choice top-k gating.

    logits [T, E] f32|bf16|f16|f64 -> (weights [T, K] f32, experts [T, K] i32, scores [T, E] f32)
    (f64 outputs for f64 logits). scores = softmax or sigmoid of the logits; experts are the top_k
    experts by score + bias (bias [E] f32 steers the selection only), in descending order, ties to the
    lower expert index; with n_groups > 1 only experts of the topk_groups best groups (group score
    "max" or "top2_sum") can be picked; weights = the picked scores, optionally renormalised
    (s / (sum s + renorm_eps)), times routed_scaling. NaN logits raise ValueError on the CPU backend.
    Gradient flows to logits from weights and from scores.
    """
    op = "topk_gating"
    backend = check_backend(op, backend, [("logits", logits)], [("bias", bias)])
    # ints that reach torch's schema: a float there would raise an error that names no argument
    for arg, value in (("top_k", top_k), ("n_groups", n_groups), ("topk_groups", topk_groups)):
        _core.check_c_int(op, arg, value)
    if backend == "reference":
        _topk_gating_shapes(op, logits, top_k)
        _topk_params(op, top_k, score_func, n_groups, topk_groups, group_score, renormalize, renorm_eps, routed_scaling)
        return _ref.topk_gating(
            logits,
            top_k=top_k,
            score_func=score_func,
            bias=bias,
            n_groups=n_groups,
            topk_groups=topk_groups,
            group_score=group_score,
            renormalize=renormalize,
            renorm_eps=renorm_eps,
            routed_scaling=routed_scaling,
        )
    return topk_gating_op(
        logits,
        bias,
        top_k,
        score_func,
        n_groups,
        topk_groups,
        group_score,
        bool(renormalize),
        float(renorm_eps),
        float(routed_scaling),
        backend,
    )

"""smoe's torch custom ops: torch.ops.smoe.<name>.

Each op is registered with torch.library.custom_op (so the dispatcher, torch.compile and autograd see
one opaque op), with
  * a real implementation that allocates the outputs with torch (caller-allocates contract of the core:
    torch's caching allocator owns all memory) and calls smoe._C with tensor descriptors;
  * a fake implementation (register_fake) that gives the exact output shapes and dtypes from the input
    shapes alone, so torch.compile(fullgraph=True) traces through without running the op;
  * an autograd formula (register_autograd) that calls the backward op, itself a custom op.

The backend ("cpu", "cuda" or "simt") is an argument of every op; "auto" and "reference" are
resolved by smoe.functional before an op is called. Arguments are validated by the C++ core, which
raises ValueError naming the argument; smoe.functional checks only what Python needs to allocate.
"""

from __future__ import annotations

import math
import threading
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from smoe import _core

__all__ = ["SCORE_FUNCS", "GROUP_SCORES", "ACTIVATIONS", "DROP_POLICIES", "acc_dtype", "release_scratch"]

# Enum codes of the core (include/smoe/ops/*.h).
SCORE_FUNCS = {"softmax": 0, "sigmoid": 1}
GROUP_SCORES = {"max": 0, "top2_sum": 1}
ACTIVATIONS = {"swiglu": 0, "geglu": 1, "gelu": 2, "relu": 3}
GATED_ACTIVATIONS = ("swiglu", "geglu")
DROP_POLICIES = {"token_order": 0, "score": 1}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, routing weights, losses: f32, or f64 when the input is f64 (gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stream(t: Tensor) -> int:
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def _exec(backend: str, ref: Tensor) -> dict:
    return {"backend": _core.backend_code(backend), "stream": _stream(ref)}


# ---- argument checks of the ops themselves --------------------------------------------------------
# torch.ops.smoe.* can be called directly, so each op checks what it needs before it allocates: enum
# strings, the dims it unpacks, and integer ranges (the C core holds them in int32/int64).


def _code(op: str, arg: str, table: dict, value) -> int:
    _core.check_choice(op, arg, value, table)
    return table[value]


def _dims(op: str, named, *, optional: bool = False) -> None:
    """Each (arg, tensor, ndim, layout) is a tensor with ndim dims (None allowed where optional)."""
    for arg, t, ndim, layout in named:
        _core.check_dims(op, arg, t, ndim, layout, optional=optional)


def _check_topk(op, scores, top_k, score_func, n_groups, topk_groups, group_score) -> None:
    _dims(op, [("logits" if op == "topk_gating" else "scores", scores, 2, "[T, E]")])
    _core.check_int(op, "top_k", top_k, 1, scores.shape[1], " (E = size(1))")
    _code(op, "score_func", SCORE_FUNCS, score_func)
    _core.check_int(op, "n_groups", n_groups, 1)
    _core.check_int(op, "topk_groups", topk_groups, 1)
    _code(op, "group_score", GROUP_SCORES, group_score)


def _v(t: Optional[Tensor], name: str):
    return _core.opt_view(t, name)


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    """Gradients from autograd may be expanded (stride 0) or otherwise strided; the core reads dense rows."""
    return None if t is None else t.contiguous()


class _ScratchCache(threading.local):
    buf: Optional[Tensor] = None


_scratch_cache = _ScratchCache()
_SCRATCH_ALIGN = 64  # bytes: every piece carved by _scratch_views starts on a cache line


def _scratch(nbytes: int, device: torch.device) -> Tensor:
    """uint8 [nbytes] for the duration of ONE op call: it must never be returned, saved or outlive the call.

    On the CPU the buffer is cached per thread and reused by the next call: torch's CPU allocator hands
    large blocks straight to mmap, so a fresh 100-250 MB workspace costs a page fault per 4 KiB page on
    first touch (~0.6 ms/MB on the 2-core bench machine, as much as a third of the expert MLP's backward).
    One live user per thread at a time; different threads get different buffers. Other devices use
    torch's caching allocator, which already reuses memory (and orders it on the stream).
    release_scratch() frees the cached buffer.
    """
    if device.type != "cpu":
        return torch.empty((nbytes,), dtype=torch.uint8, device=device)
    buf = _scratch_cache.buf
    if buf is None or buf.numel() < nbytes:
        _scratch_cache.buf = None  # free the smaller one first
        buf = torch.empty((nbytes,), dtype=torch.uint8)
        _scratch_cache.buf = buf
    return buf[:nbytes]


def release_scratch() -> None:
    """Free this thread's cached CPU scratch buffer (workspaces and no-grad intermediates of smoe ops)."""
    _scratch_cache.buf = None


def _scratch_views(device: torch.device, dtype: torch.dtype, shapes) -> List[Tensor]:
    """Disjoint dense tensors of `shapes` carved from one _scratch buffer (same lifetime rules)."""
    elem = torch.empty((), dtype=dtype).element_size()
    sizes = [math.prod(s) * elem for s in shapes]
    starts, total = [], 0
    for n in sizes:
        starts.append(total)
        total += -(-n // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
    buf = _scratch(total, device)
    return [buf[o:o + n].view(dtype).view(s) for o, n, s in zip(starts, sizes, shapes)]


# ---- topk_gating ---------------------------------------------------------------------------------


def _topk_params(top_k, score_func, n_groups, topk_groups, group_score, renormalize, renorm_eps, routed_scaling):
    return {
        "top_k": top_k,
        "score_func": SCORE_FUNCS[score_func],
        "n_groups": n_groups,
        "topk_groups": topk_groups,
        "group_score": GROUP_SCORES[group_score],
        "renormalize": renormalize,
        "renorm_eps": renorm_eps,
        "routed_scaling": routed_scaling,
    }


@torch.library.custom_op("smoe::topk_gating", mutates_args=())
def topk_gating(
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
    _check_topk("topk_gating", logits, top_k, score_func, n_groups, topk_groups, group_score)
    T, E = logits.shape
    acc = acc_dtype(logits.dtype)
    weights = logits.new_empty((T, top_k), dtype=acc)  # [T, K]
    experts = logits.new_empty((T, top_k), dtype=torch.int32)  # [T, K]
    scores = logits.new_empty((T, E), dtype=acc)  # [T, E]
    _core.lib().topk_gating_forward(
        **_exec(backend, logits),
        **_topk_params(top_k, score_func, n_groups, topk_groups, group_score, renormalize, renorm_eps, routed_scaling),
        logits=_v(logits, "logits"),
        bias=_v(bias, "bias"),
        weights=_v(weights, "weights"),
        experts=_v(experts, "experts"),
        scores=_v(scores, "scores"),
    )
    return weights, experts, scores


@topk_gating.register_fake
def _(logits, bias, top_k, score_func, n_groups, topk_groups, group_score, renormalize, renorm_eps, routed_scaling, backend):
    _check_topk("topk_gating", logits, top_k, score_func, n_groups, topk_groups, group_score)
    T, E = logits.shape
    acc = acc_dtype(logits.dtype)
    return (
        logits.new_empty((T, top_k), dtype=acc),
        logits.new_empty((T, top_k), dtype=torch.int32),
        logits.new_empty((T, E), dtype=acc),
    )


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
    _check_topk("topk_gating_backward", scores, top_k, score_func, n_groups, topk_groups, group_score)
    grad_logits = torch.empty_like(scores)  # [T, E]
    _core.lib().topk_gating_backward(
        **_exec(backend, scores),
        **_topk_params(top_k, score_func, n_groups, topk_groups, group_score, renormalize, renorm_eps, routed_scaling),
        scores=_v(scores, "scores"),
        experts=_v(experts, "experts"),
        grad_weights=_v(grad_weights, "grad_weights"),
        grad_scores=_v(grad_scores, "grad_scores"),
        grad_logits=_v(grad_logits, "grad_logits"),
    )
    return grad_logits


@topk_gating_backward.register_fake
def _(scores, experts, grad_weights, grad_scores, *params):
    return torch.empty_like(scores)


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
        scores, experts, _contig(grad_weights), _contig(grad_scores), *ctx.params
    )
    return (grad_logits.to(ctx.logits_dtype), None) + (None,) * len(ctx.params)


topk_gating.register_autograd(_topk_gating_backward, setup_context=_topk_gating_setup)


# ---- expert_choice -------------------------------------------------------------------------------


def _check_expert_choice(op, scores, capacity, score_func) -> None:
    _dims(op, [("logits" if op == "expert_choice" else "scores", scores, 2, "[T, E]")])
    _core.check_int(op, "capacity", capacity, 1, scores.shape[0], " (T = size(0))")
    _code(op, "score_func", SCORE_FUNCS, score_func)


@torch.library.custom_op("smoe::expert_choice", mutates_args=())
def expert_choice(logits: Tensor, capacity: int, score_func: str, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_expert_choice("expert_choice", logits, capacity, score_func)
    T, E = logits.shape
    acc = acc_dtype(logits.dtype)
    weights = logits.new_empty((T, E), dtype=acc)  # [T, E]
    tokens = logits.new_empty((E, capacity), dtype=torch.int32)  # [E, C]
    row_of = logits.new_empty((T, E), dtype=torch.int32)  # [T, E]
    scores = logits.new_empty((T, E), dtype=acc)  # [T, E]
    _core.lib().expert_choice_forward(
        **_exec(backend, logits),
        capacity=capacity,
        score_func=SCORE_FUNCS[score_func],
        logits=_v(logits, "logits"),
        scores=_v(scores, "scores"),
        tokens=_v(tokens, "tokens"),
        row_of=_v(row_of, "row_of"),
        weights=_v(weights, "weights"),
    )
    return weights, tokens, row_of, scores


@expert_choice.register_fake
def _(logits, capacity, score_func, backend):
    _check_expert_choice("expert_choice", logits, capacity, score_func)
    T, E = logits.shape
    acc = acc_dtype(logits.dtype)
    return (
        logits.new_empty((T, E), dtype=acc),
        logits.new_empty((E, capacity), dtype=torch.int32),
        logits.new_empty((T, E), dtype=torch.int32),
        logits.new_empty((T, E), dtype=acc),
    )


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
    _check_expert_choice("expert_choice_backward", scores, capacity, score_func)
    _dims("expert_choice_backward", [("row_of", row_of, 2, "[T, E]")])
    lib = _core.lib()
    T, E = scores.shape
    grad_logits = torch.zeros_like(scores)  # [T, E]
    if grad_weights is not None:
        lib.expert_choice_backward(
            **_exec(backend, scores),
            capacity=capacity,
            score_func=SCORE_FUNCS[score_func],
            scores=_v(scores, "scores"),
            row_of=_v(row_of, "row_of"),
            grad_weights=_v(grad_weights, "grad_weights"),
            grad_logits=_v(grad_logits, "grad_logits"),
        )
    if grad_scores is not None and T > 0:
        # The scores' own gradient is the backward of the score function alone: top-k gating's backward
        # with no weight gradient computes exactly that (its K = 1 pick is not read without grad_weights).
        from_scores = torch.empty_like(scores)
        first = torch.zeros((T, 1), dtype=torch.int32, device=scores.device)  # held: the view does not own it
        lib.topk_gating_backward(
            **_exec(backend, scores),
            **_topk_params(1, score_func, 1, 1, "max", False, 0.0, 1.0),
            scores=_v(scores, "scores"),
            experts=_v(first, "experts"),
            grad_weights=None,
            grad_scores=_v(grad_scores, "grad_scores"),
            grad_logits=_v(from_scores, "grad_logits"),
        )
        grad_logits = grad_logits + from_scores
    return grad_logits


@expert_choice_backward.register_fake
def _(scores, row_of, grad_weights, grad_scores, capacity, score_func, backend):
    return torch.empty_like(scores)


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
        scores, row_of, _contig(grad_weights), _contig(grad_scores), *ctx.params
    )
    return grad_logits.to(ctx.logits_dtype), None, None, None


expert_choice.register_autograd(_expert_choice_backward, setup_context=_expert_choice_setup)


# ---- aux losses ----------------------------------------------------------------------------------


@torch.library.custom_op("smoe::load_balancing_loss", mutates_args=())
def load_balancing_loss(probs: Tensor, experts: Tensor, backend: str) -> Tensor:
    loss = probs.new_empty((), dtype=probs.dtype)
    _core.lib().load_balancing_loss_forward(
        **_exec(backend, probs), probs=_v(probs, "probs"), experts=_v(experts, "experts"), loss=_v(loss, "loss")
    )
    return loss


@load_balancing_loss.register_fake
def _(probs, experts, backend):
    return probs.new_empty((), dtype=probs.dtype)


@torch.library.custom_op("smoe::load_balancing_loss_backward", mutates_args=())
def load_balancing_loss_backward(probs: Tensor, experts: Tensor, grad_loss: Tensor, backend: str) -> Tensor:
    grad_probs = torch.empty_like(probs, memory_format=torch.contiguous_format)
    _core.lib().load_balancing_loss_backward(
        **_exec(backend, probs),
        probs=_v(probs, "probs"),
        experts=_v(experts, "experts"),
        grad_loss=_v(grad_loss, "grad_loss"),
        grad_probs=_v(grad_probs, "grad_probs"),
    )
    return grad_probs


@load_balancing_loss_backward.register_fake
def _(probs, experts, grad_loss, backend):
    return torch.empty_like(probs, memory_format=torch.contiguous_format)


def _lb_setup(ctx, inputs, output):
    probs, experts, backend = inputs
    ctx.save_for_backward(probs, experts)
    ctx.backend = backend


def _lb_backward(ctx, grad_loss):
    probs, experts = ctx.saved_tensors
    g = grad_loss.reshape(()).to(probs.dtype).contiguous()
    return torch.ops.smoe.load_balancing_loss_backward(probs, experts, g, ctx.backend), None, None


load_balancing_loss.register_autograd(_lb_backward, setup_context=_lb_setup)


@torch.library.custom_op("smoe::z_loss", mutates_args=())
def z_loss(logits: Tensor, backend: str) -> Tensor:
    loss = logits.new_empty((), dtype=acc_dtype(logits.dtype))
    _core.lib().z_loss_forward(**_exec(backend, logits), logits=_v(logits, "logits"), loss=_v(loss, "loss"))
    return loss


@z_loss.register_fake
def _(logits, backend):
    return logits.new_empty((), dtype=acc_dtype(logits.dtype))


@torch.library.custom_op("smoe::z_loss_backward", mutates_args=())
def z_loss_backward(logits: Tensor, grad_loss: Tensor, backend: str) -> Tensor:
    grad_logits = logits.new_empty(logits.shape, dtype=acc_dtype(logits.dtype))
    _core.lib().z_loss_backward(
        **_exec(backend, logits),
        logits=_v(logits, "logits"),
        grad_loss=_v(grad_loss, "grad_loss"),
        grad_logits=_v(grad_logits, "grad_logits"),
    )
    return grad_logits


@z_loss_backward.register_fake
def _(logits, grad_loss, backend):
    return logits.new_empty(logits.shape, dtype=acc_dtype(logits.dtype))


def _z_setup(ctx, inputs, output):
    logits, backend = inputs
    ctx.save_for_backward(logits)
    ctx.backend = backend


def _z_backward(ctx, grad_loss):
    (logits,) = ctx.saved_tensors
    g = grad_loss.reshape(()).to(acc_dtype(logits.dtype)).contiguous()
    return torch.ops.smoe.z_loss_backward(logits, g, ctx.backend).to(logits.dtype), None


z_loss.register_autograd(_z_backward, setup_context=_z_setup)


@torch.library.custom_op("smoe::balancing_bias_update", mutates_args=("bias",))
def balancing_bias_update(counts: Tensor, bias: Tensor, rate: float, backend: str) -> None:
    _core.lib().balancing_bias_update(
        **_exec(backend, counts), counts=_v(counts, "counts"), bias=_v(bias, "bias"), rate=rate
    )


@balancing_bias_update.register_fake
def _(counts, bias, rate, backend):
    return None


# ---- routing_plan --------------------------------------------------------------------------------


def routing_plan_max_rows(T: int, K: int, num_experts: int, capacity: int, pad_multiple: int):
    """Rows of token_of_row, from the shapes alone (the formula of smoe::routing_plan_max_rows; a test
    checks both agree). capacity < 0: dropless. Works on symbolic sizes under torch.compile; the
    arguments must be valid (T, K >= 0, num_experts, pad_multiple >= 1): _check_plan checks them."""
    kept = T * K
    if capacity >= 0:
        kept = min(kept, num_experts * min(capacity, T * K))
    return kept + num_experts * (pad_multiple - 1)


def _check_plan(op, experts, num_experts, capacity, drop_policy, pad_multiple) -> int:
    """Checks the routing plan's arguments and returns its DROP_POLICIES code."""
    _dims(op, [("experts", experts, 2, "[T, K]")])
    _core.check_int(op, "num_experts", num_experts, 1)
    _core.check_int(op, "capacity", capacity, -1, what=" (-1: dropless)", c_max=_core.INT64_MAX)
    _core.check_int(op, "pad_multiple", pad_multiple, 1)
    policy = _code(op, "drop_policy", DROP_POLICIES, drop_policy)
    T, K = experts.shape
    if isinstance(T, int) and isinstance(K, int):  # concrete sizes: rows are i32 (R <= 2^31 - 1)
        rows = max(T * K, routing_plan_max_rows(T, K, num_experts, capacity, pad_multiple))
        if rows > _core.INT32_MAX:
            raise ValueError(
                f"smoe.{op}: argument 'experts': expected T*K + E*(pad_multiple-1) <= 2^31 - 1 rows (rows are i32), "
                f"got T={T}, K={K}, E={num_experts}, pad_multiple={pad_multiple} ({rows} rows)"
            )
    return policy


@torch.library.custom_op("smoe::routing_plan", mutates_args=())
def routing_plan(
    experts: Tensor,
    weights: Optional[Tensor],
    num_experts: int,
    capacity: int,
    drop_policy: str,
    pad_multiple: int,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    policy = _check_plan("routing_plan", experts, num_experts, capacity, drop_policy, pad_multiple)
    lib = _core.lib()
    T, K = experts.shape
    E = num_experts
    R_max = lib.routing_plan_max_rows(num_experts=E, capacity=capacity, drop_policy=policy, pad_multiple=pad_multiple, T=T, K=K)
    ws_bytes = lib.routing_plan_workspace_bytes(num_experts=E, capacity=capacity, drop_policy=policy, pad_multiple=pad_multiple, T=T, K=K)
    dev = experts.device
    counts = torch.empty((max(E, 0),), dtype=torch.int32, device=dev)  # [E]
    offsets = torch.empty((max(E, 0) + 1,), dtype=torch.int64, device=dev)  # [E+1]
    row_of = torch.empty((T, K), dtype=torch.int32, device=dev)  # [T, K]
    token_of_row = torch.empty((max(R_max, 0),), dtype=torch.int32, device=dev)  # [R_max]
    workspace = torch.empty((ws_bytes,), dtype=torch.uint8, device=dev) if ws_bytes > 0 else None
    lib.routing_plan(
        **_exec(backend, experts),
        num_experts=E,
        capacity=capacity,
        drop_policy=policy,
        pad_multiple=pad_multiple,
        experts=_v(experts, "experts"),
        weights=_v(weights, "weights"),
        counts=_v(counts, "counts"),
        offsets=_v(offsets, "offsets"),
        row_of=_v(row_of, "row_of"),
        token_of_row=_v(token_of_row, "token_of_row"),
        workspace=_v(workspace, "workspace"),
    )
    return counts, offsets, row_of, token_of_row


@routing_plan.register_fake
def _(experts, weights, num_experts, capacity, drop_policy, pad_multiple, backend):
    _check_plan("routing_plan", experts, num_experts, capacity, drop_policy, pad_multiple)
    T, K = experts.shape
    R_max = routing_plan_max_rows(T, K, num_experts, capacity, pad_multiple)
    dev = experts.device
    return (
        torch.empty((num_experts,), dtype=torch.int32, device=dev),
        torch.empty((num_experts + 1,), dtype=torch.int64, device=dev),
        torch.empty((T, K), dtype=torch.int32, device=dev),
        torch.empty((R_max,), dtype=torch.int32, device=dev),
    )


# ---- permute / combine ---------------------------------------------------------------------------


def check_permute_x(op: str, x, token_of_row, row_of) -> None:
    """x [T, H] with T = row_of.size(0): the backward scatters into T rows."""
    _dims(op, [("x", x, 2, "[T, H]"), ("token_of_row", token_of_row, 1, "[R]"), ("row_of", row_of, 2, "[T, K]")])
    if x.shape[0] != row_of.shape[0]:
        raise ValueError(f"smoe.{op}: argument 'x': expected size(0) == T = {row_of.shape[0]} (row_of.size(0)), "
                         f"got shape {list(x.shape)}")


@torch.library.custom_op("smoe::permute", mutates_args=())
def permute(x: Tensor, token_of_row: Tensor, row_of: Tensor, backend: str) -> Tensor:
    check_permute_x("permute", x, token_of_row, row_of)
    xs = x.new_empty((token_of_row.shape[0], x.shape[1]))  # [R, H]
    _core.lib().permute_forward(
        **_exec(backend, x), x=_v(x, "x"), token_of_row=_v(token_of_row, "token_of_row"), xs=_v(xs, "xs")
    )
    return xs


@permute.register_fake
def _(x, token_of_row, row_of, backend):
    check_permute_x("permute", x, token_of_row, row_of)
    return x.new_empty((token_of_row.shape[0], x.shape[1]))


@torch.library.custom_op("smoe::permute_backward", mutates_args=())
def permute_backward(grad_xs: Tensor, row_of: Tensor, backend: str) -> Tensor:
    _dims("permute_backward", [("grad_xs", grad_xs, 2, "[R, H]"), ("row_of", row_of, 2, "[T, K]")])
    grad_x = grad_xs.new_empty((row_of.shape[0], grad_xs.shape[1]))  # [T, H]
    _core.lib().permute_backward(
        **_exec(backend, grad_xs), grad_xs=_v(grad_xs, "grad_xs"), row_of=_v(row_of, "row_of"), grad_x=_v(grad_x, "grad_x")
    )
    return grad_x


@permute_backward.register_fake
def _(grad_xs, row_of, backend):
    return grad_xs.new_empty((row_of.shape[0], grad_xs.shape[1]))


def _permute_setup(ctx, inputs, output):
    _x, _token_of_row, row_of, backend = inputs
    ctx.save_for_backward(row_of)
    ctx.backend = backend


def _permute_backward(ctx, grad_xs):
    (row_of,) = ctx.saved_tensors
    return torch.ops.smoe.permute_backward(grad_xs.contiguous(), row_of, ctx.backend), None, None, None


permute.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("smoe::combine", mutates_args=())
def combine(ys: Tensor, weights: Tensor, row_of: Tensor, backend: str) -> Tensor:
    _dims("combine", [("ys", ys, 2, "[R, H]"), ("row_of", row_of, 2, "[T, K]")])
    y = ys.new_empty((row_of.shape[0], ys.shape[1]))  # [T, H]
    _core.lib().combine_forward(
        **_exec(backend, ys), ys=_v(ys, "ys"), weights=_v(weights, "weights"), row_of=_v(row_of, "row_of"), y=_v(y, "y")
    )
    return y


@combine.register_fake
def _(ys, weights, row_of, backend):
    return ys.new_empty((row_of.shape[0], ys.shape[1]))


@torch.library.custom_op("smoe::combine_backward", mutates_args=())
def combine_backward(
    grad_y: Tensor, ys: Tensor, weights: Tensor, row_of: Tensor, need_ys: bool, need_weights: bool, backend: str
) -> Tuple[Tensor, Tensor]:
    # An output that is not needed is an empty tensor and is not computed.
    grad_ys = torch.empty_like(ys, memory_format=torch.contiguous_format) if need_ys else ys.new_empty((0,))
    grad_weights = (
        torch.empty_like(weights, memory_format=torch.contiguous_format) if need_weights else weights.new_empty((0,))
    )
    _core.lib().combine_backward(
        **_exec(backend, ys),
        grad_y=_v(grad_y, "grad_y"),
        ys=_v(ys, "ys"),
        weights=_v(weights, "weights"),
        row_of=_v(row_of, "row_of"),
        grad_ys=_v(grad_ys, "grad_ys") if need_ys else None,
        grad_weights=_v(grad_weights, "grad_weights") if need_weights else None,
    )
    return grad_ys, grad_weights


@combine_backward.register_fake
def _(grad_y, ys, weights, row_of, need_ys, need_weights, backend):
    return (
        torch.empty_like(ys, memory_format=torch.contiguous_format) if need_ys else ys.new_empty((0,)),
        torch.empty_like(weights, memory_format=torch.contiguous_format) if need_weights else weights.new_empty((0,)),
    )


def _combine_setup(ctx, inputs, output):
    ys, weights, row_of, backend = inputs
    ctx.save_for_backward(ys, weights, row_of)
    ctx.backend = backend


def _combine_backward(ctx, grad_y):
    ys, weights, row_of = ctx.saved_tensors
    need_ys, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_ys or need_weights):
        return None, None, None, None
    grad_ys, grad_weights = torch.ops.smoe.combine_backward(
        grad_y.contiguous(), ys, weights, row_of, need_ys, need_weights, ctx.backend
    )
    return (grad_ys if need_ys else None), (grad_weights if need_weights else None), None, None


combine.register_autograd(_combine_backward, setup_context=_combine_setup)


# ---- grouped GEMM and activations ----------------------------------------------------------------


@torch.library.custom_op("smoe::grouped_gemm", mutates_args=())
def grouped_gemm(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool, backend: str) -> Tensor:
    _dims("grouped_gemm", [("a", a, 2, "[R, Kd]"), ("b", b, 3, "[E, N, Kd]" if trans_b else "[E, Kd, N]")])
    N = b.shape[1] if trans_b else b.shape[2]
    # Zeros: the core leaves rows at or past offsets[E] untouched, and reading offsets[E] would sync.
    c = a.new_zeros((a.shape[0], N))  # [R, N]
    _core.lib().grouped_gemm(
        **_exec(backend, a), trans_b=trans_b, a=_v(a, "a"), b=_v(b, "b"), offsets=_v(offsets, "offsets"), c=_v(c, "c")
    )
    return c


@grouped_gemm.register_fake
def _(a, b, offsets, trans_b, backend):
    N = b.shape[1] if trans_b else b.shape[2]
    return a.new_empty((a.shape[0], N))


@torch.library.custom_op("smoe::grouped_gemm_wgrad", mutates_args=())
def grouped_gemm_wgrad(a: Tensor, b: Tensor, offsets: Tensor, backend: str) -> Tensor:
    _dims("grouped_gemm_wgrad", [("a", a, 2, "[R, M]"), ("b", b, 2, "[R, N]"), ("offsets", offsets, 1, "[E+1]")])
    if offsets.shape[0] < 1:
        raise ValueError("smoe.grouped_gemm_wgrad: argument 'offsets': expected [E+1] with E >= 0, got shape [0]")
    c = a.new_empty((offsets.shape[0] - 1, a.shape[1], b.shape[1]))  # [E, M, N]
    _core.lib().grouped_gemm_wgrad(
        **_exec(backend, a), a=_v(a, "a"), b=_v(b, "b"), offsets=_v(offsets, "offsets"), c=_v(c, "c")
    )
    return c


@grouped_gemm_wgrad.register_fake
def _(a, b, offsets, backend):
    return a.new_empty((offsets.shape[0] - 1, a.shape[1], b.shape[1]))


def _gg_setup(ctx, inputs, output):
    a, b, offsets, trans_b, backend = inputs
    ctx.save_for_backward(a, b, offsets)
    ctx.trans_b = trans_b
    ctx.backend = backend


def _gg_backward(ctx, grad_c):
    a, b, offsets = ctx.saved_tensors
    grad_c = grad_c.contiguous()
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        # c = a @ b[e]^T  ->  grad_a = grad_c @ b[e];   c = a @ b[e]  ->  grad_a = grad_c @ b[e]^T
        grad_a = torch.ops.smoe.grouped_gemm(grad_c, b, offsets, not ctx.trans_b, ctx.backend)
    if ctx.needs_input_grad[1]:
        # b[e] [N, Kd]: grad = grad_c[seg]^T @ a[seg];   b[e] [Kd, N]: grad = a[seg]^T @ grad_c[seg]
        if ctx.trans_b:
            grad_b = torch.ops.smoe.grouped_gemm_wgrad(grad_c, a, offsets, ctx.backend)
        else:
            grad_b = torch.ops.smoe.grouped_gemm_wgrad(a, grad_c, offsets, ctx.backend)
    return grad_a, grad_b, None, None, None


grouped_gemm.register_autograd(_gg_backward, setup_context=_gg_setup)


def _act_out_shape(x: Tensor, kind: str, op: str = "activation") -> List[int]:
    _code(op, "kind", ACTIVATIONS, kind)
    _dims(op, [("x", x, 2, "[R, F1]")])
    F1 = x.shape[-1]
    return [x.shape[0], F1 // 2 if kind in GATED_ACTIVATIONS else F1]


@torch.library.custom_op("smoe::activation", mutates_args=())
def activation(x: Tensor, kind: str, backend: str) -> Tensor:
    out = x.new_empty(_act_out_shape(x, kind))  # [R, F]
    _core.lib().activation_forward(**_exec(backend, x), act=ACTIVATIONS[kind], **{"in": _v(x, "x")}, out=_v(out, "out"))
    return out


@activation.register_fake
def _(x, kind, backend):
    return x.new_empty(_act_out_shape(x, kind))


@torch.library.custom_op("smoe::activation_backward", mutates_args=())
def activation_backward(x: Tensor, grad_out: Tensor, kind: str, backend: str) -> Tensor:
    grad_in = torch.empty_like(x, memory_format=torch.contiguous_format)  # [R, F1]
    _act_out_shape(x, kind, "activation_backward")
    _core.lib().activation_backward(
        **_exec(backend, x), act=ACTIVATIONS[kind], **{"in": _v(x, "x")}, grad_out=_v(grad_out, "grad_out"), grad_in=_v(grad_in, "grad_in")
    )
    return grad_in


@activation_backward.register_fake
def _(x, grad_out, kind, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _act_setup(ctx, inputs, output):
    x, kind, backend = inputs
    ctx.save_for_backward(x)
    ctx.kind = kind
    ctx.backend = backend


def _act_backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return torch.ops.smoe.activation_backward(x, grad_out.contiguous(), ctx.kind, ctx.backend), None, None


activation.register_autograd(_act_backward, setup_context=_act_setup)


# ---- expert MLP (fused entry point) and shared expert --------------------------------------------


def _check_mlp(op: str, kind: str, named) -> None:
    _code(op, "activation", ACTIVATIONS, kind)
    _dims(op, named)


def _mlp_shapes(x: Tensor, R: int, w2_F: int, kind: str):
    F1 = 2 * w2_F if kind in GATED_ACTIVATIONS else w2_F
    return (R, x.shape[1]), (R, F1), (R, w2_F)  # ys [R, H], pre [R, F1], act [R, F]


def _expert_mlp_dims(x, token_of_row, w2):
    return [("x", x, 2, "[T, H]"), ("token_of_row", token_of_row, 1, "[R]"), ("w2", w2, 3, "[E, H, F]")]


@torch.library.custom_op("smoe::expert_mlp", mutates_args=())
def expert_mlp(
    x: Tensor,
    token_of_row: Tensor,
    offsets: Tensor,
    row_of: Tensor,
    w1: Tensor,
    w2: Tensor,
    activation: str,
    backend: str,
    need_saved: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (ys, pre, act): ys is the result, pre and act are saved for backward. x is read through
    token_of_row (no permuted copy of x is made or saved; the backward reads x again).
    need_saved=False (no gradient wanted): pre, act live in scratch and are returned empty ([0])."""
    _check_mlp("expert_mlp", activation, _expert_mlp_dims(x, token_of_row, w2))
    hs, ps, as_ = _mlp_shapes(x, token_of_row.shape[0], w2.shape[2], activation)
    ys = x.new_empty(hs)
    if need_saved:
        pre, act = x.new_empty(ps), x.new_empty(as_)
    else:
        pre, act = _scratch_views(x.device, x.dtype, (ps, as_))
    _core.lib().expert_mlp_forward(
        **_exec(backend, x),
        act=ACTIVATIONS[activation],
        x=_v(x, "x"),
        token_of_row=_v(token_of_row, "token_of_row"),
        offsets=_v(offsets, "offsets"),
        w1=_v(w1, "w1"),
        w2=_v(w2, "w2"),
        pre=_v(pre, "pre"),
        act_out=_v(act, "act"),
        ys=_v(ys, "ys"),
    )
    if not need_saved:
        pre, act = x.new_empty((0,)), x.new_empty((0,))
    return ys, pre, act


@expert_mlp.register_fake
def _(x, token_of_row, offsets, row_of, w1, w2, activation, backend, need_saved=True):
    _check_mlp("expert_mlp", activation, _expert_mlp_dims(x, token_of_row, w2))
    hs, ps, as_ = _mlp_shapes(x, token_of_row.shape[0], w2.shape[2], activation)
    if not need_saved:
        return x.new_empty(hs), x.new_empty((0,)), x.new_empty((0,))
    return x.new_empty(hs), x.new_empty(ps), x.new_empty(as_)


@torch.library.custom_op("smoe::expert_mlp_backward", mutates_args=())
def expert_mlp_backward(
    grad_ys: Tensor,
    x: Tensor,
    token_of_row: Tensor,
    row_of: Tensor,
    offsets: Tensor,
    w1: Tensor,
    w2: Tensor,
    pre: Tensor,
    act: Tensor,
    activation: str,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    _check_mlp("expert_mlp_backward", activation,
               [("grad_ys", grad_ys, 2, "[R, H]"), ("row_of", row_of, 2, "[T, K]"), ("w2", w2, 3, "[E, H, F]")])
    lib = _core.lib()
    R, H = grad_ys.shape
    grad_x = grad_ys.new_empty((row_of.shape[0], H))  # [T, H]
    grad_w1 = torch.empty_like(w1, memory_format=torch.contiguous_format)  # [E, F1, H]
    grad_w2 = torch.empty_like(w2, memory_format=torch.contiguous_format)  # [E, H, F]
    ws_bytes = lib.expert_mlp_workspace_bytes(
        act=ACTIVATIONS[activation], dtype=_core.DTYPE_CODES[grad_ys.dtype], R=R, H=H, F=w2.shape[2]
    )
    workspace = _scratch(ws_bytes, grad_ys.device)
    lib.expert_mlp_backward(
        **_exec(backend, grad_ys),
        act=ACTIVATIONS[activation],
        grad_ys=_v(grad_ys, "grad_ys"),
        x=_v(x, "x"),
        token_of_row=_v(token_of_row, "token_of_row"),
        row_of=_v(row_of, "row_of"),
        offsets=_v(offsets, "offsets"),
        w1=_v(w1, "w1"),
        w2=_v(w2, "w2"),
        pre=_v(pre, "pre"),
        act_out=_v(act, "act"),
        grad_x=_v(grad_x, "grad_x"),
        grad_w1=_v(grad_w1, "grad_w1"),
        grad_w2=_v(grad_w2, "grad_w2"),
        workspace=_v(workspace, "workspace"),
    )
    return grad_x, grad_w1, grad_w2


@expert_mlp_backward.register_fake
def _(grad_ys, x, token_of_row, row_of, offsets, w1, w2, pre, act, activation, backend):
    return (
        grad_ys.new_empty((row_of.shape[0], grad_ys.shape[1])),
        torch.empty_like(w1, memory_format=torch.contiguous_format),
        torch.empty_like(w2, memory_format=torch.contiguous_format),
    )


def _expert_mlp_setup(ctx, inputs, output):
    x, token_of_row, offsets, row_of, w1, w2, activation, backend, *need_saved = inputs
    if need_saved and not need_saved[0]:
        raise RuntimeError(
            "smoe::expert_mlp: need_saved=False keeps nothing for backward; call it with need_saved=True when "
            "x, w1 or w2 requires grad (smoe.functional.expert_mlp does)"
        )
    _ys, pre, act = output
    # x is the op's own input (the caller keeps it anyway): saving it stores a reference, not a copy.
    ctx.save_for_backward(x, token_of_row, row_of, offsets, w1, w2, pre, act)
    ctx.activation = activation
    ctx.backend = backend
    ctx.mark_non_differentiable(pre, act)  # saved tensors, returned only so autograd can keep them
    # Their gradients are never defined: without this autograd would hand backward zero-filled
    # [R, F1] + [R, F] tensors (a memset plus fresh pages on every step).
    ctx.set_materialize_grads(False)


def _expert_mlp_backward(ctx, grad_ys, _g_pre, _g_act):
    if grad_ys is None:  # ys did not reach the loss
        return (None,) * 9
    x, token_of_row, row_of, offsets, w1, w2, pre, act = ctx.saved_tensors
    grad_x, grad_w1, grad_w2 = torch.ops.smoe.expert_mlp_backward(
        grad_ys.contiguous(), x, token_of_row, row_of, offsets, w1, w2, pre, act, ctx.activation, ctx.backend
    )
    need = ctx.needs_input_grad
    return (
        grad_x if need[0] else None, None, None, None,
        grad_w1 if need[4] else None, grad_w2 if need[5] else None, None, None, None,
    )


expert_mlp.register_autograd(_expert_mlp_backward, setup_context=_expert_mlp_setup)


@torch.library.custom_op("smoe::shared_expert", mutates_args=())
def shared_expert(
    x: Tensor, w1: Tensor, w2: Tensor, gate_w: Optional[Tensor], activation: str, backend: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, pre, act, out, gate): y = gate * out is the result, the rest are saved for backward.
    gate [T] and out are empty ([0]) without gate_w (then out equals y and the backward never reads it:
    it lives in scratch for the call)."""
    _check_mlp("shared_expert", activation, [("x", x, 2, "[T, H]"), ("w2", w2, 2, "[H, F]")])
    T = x.shape[0]
    _, ps, as_ = _mlp_shapes(x, T, w2.shape[1], activation)
    pre, act = x.new_empty(ps), x.new_empty(as_)
    out = x.new_empty(x.shape) if gate_w is not None else _scratch_views(x.device, x.dtype, (tuple(x.shape),))[0]
    gate = x.new_empty((T,) if gate_w is not None else (0,), dtype=acc_dtype(x.dtype))
    y = torch.zeros_like(x, memory_format=torch.contiguous_format)  # the core accumulates into y
    _core.lib().shared_expert_forward(
        **_exec(backend, x),
        act=ACTIVATIONS[activation],
        x=_v(x, "x"),
        w1=_v(w1, "w1"),
        w2=_v(w2, "w2"),
        gate_w=_v(gate_w, "gate_w"),
        pre=_v(pre, "pre"),
        act_out=_v(act, "act"),
        out=_v(out, "out"),
        gate=_v(gate, "gate") if gate_w is not None else None,
        y=_v(y, "y"),
    )
    if gate_w is None:
        out = x.new_empty((0,))
    return y, pre, act, out, gate


@shared_expert.register_fake
def _(x, w1, w2, gate_w, activation, backend):
    _check_mlp("shared_expert", activation, [("x", x, 2, "[T, H]"), ("w2", w2, 2, "[H, F]")])
    T = x.shape[0]
    _, ps, as_ = _mlp_shapes(x, T, w2.shape[1], activation)
    gate = x.new_empty((T,) if gate_w is not None else (0,), dtype=acc_dtype(x.dtype))
    out = x.new_empty(x.shape if gate_w is not None else (0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(ps), x.new_empty(as_), out, gate


@torch.library.custom_op("smoe::shared_expert_backward", mutates_args=())
def shared_expert_backward(
    grad_y: Tensor,
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    gate_w: Optional[Tensor],
    pre: Tensor,
    act: Tensor,
    out: Tensor,
    gate: Tensor,
    activation: str,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_w1, grad_w2, grad_gate_w); grad_gate_w is empty ([0]) without gate_w."""
    _check_mlp("shared_expert_backward", activation, [("x", x, 2, "[T, H]"), ("w2", w2, 2, "[H, F]")])
    lib = _core.lib()
    T, H = x.shape
    grad_x = torch.zeros_like(x, memory_format=torch.contiguous_format)  # the core accumulates into grad_x
    grad_w1 = torch.empty_like(w1, memory_format=torch.contiguous_format)
    grad_w2 = torch.empty_like(w2, memory_format=torch.contiguous_format)
    grad_gate_w = x.new_empty((H,) if gate_w is not None else (0,))
    ws_bytes = lib.shared_expert_workspace_bytes(
        act=ACTIVATIONS[activation], dtype=_core.DTYPE_CODES[x.dtype], T=T, H=H, F=w2.shape[1]
    )
    workspace = _scratch(ws_bytes, x.device)
    lib.shared_expert_backward(
        **_exec(backend, x),
        act=ACTIVATIONS[activation],
        grad_y=_v(grad_y, "grad_y"),
        x=_v(x, "x"),
        w1=_v(w1, "w1"),
        w2=_v(w2, "w2"),
        gate_w=_v(gate_w, "gate_w"),
        pre=_v(pre, "pre"),
        act_out=_v(act, "act"),
        out=_v(out, "out") if gate_w is not None else None,
        gate=_v(gate, "gate") if gate_w is not None else None,
        grad_x=_v(grad_x, "grad_x"),
        grad_w1=_v(grad_w1, "grad_w1"),
        grad_w2=_v(grad_w2, "grad_w2"),
        grad_gate_w=_v(grad_gate_w, "grad_gate_w") if gate_w is not None else None,
        workspace=_v(workspace, "workspace"),
    )
    return grad_x, grad_w1, grad_w2, grad_gate_w


@shared_expert_backward.register_fake
def _(grad_y, x, w1, w2, gate_w, pre, act, out, gate, activation, backend):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(w1, memory_format=torch.contiguous_format),
        torch.empty_like(w2, memory_format=torch.contiguous_format),
        x.new_empty((x.shape[1],) if gate_w is not None else (0,)),
    )


def _shared_setup(ctx, inputs, output):
    x, w1, w2, gate_w, activation, backend = inputs
    _y, pre, act, out, gate = output
    ctx.save_for_backward(x, w1, w2, gate_w, pre, act, out, gate)
    ctx.activation = activation
    ctx.backend = backend
    ctx.mark_non_differentiable(pre, act, out, gate)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved outputs


def _shared_backward(ctx, grad_y, _g_pre, _g_act, _g_out, _g_gate):
    if grad_y is None:  # y did not reach the loss
        return (None,) * 6
    x, w1, w2, gate_w, pre, act, out, gate = ctx.saved_tensors
    grad_x, grad_w1, grad_w2, grad_gate_w = torch.ops.smoe.shared_expert_backward(
        grad_y.contiguous(), x, w1, w2, gate_w, pre, act, out, gate, ctx.activation, ctx.backend
    )
    need = ctx.needs_input_grad
    return (
        grad_x if need[0] else None,
        grad_w1 if need[1] else None,
        grad_w2 if need[2] else None,
        grad_gate_w if (gate_w is not None and need[3]) else None,
        None,
        None,
    )


shared_expert.register_autograd(_shared_backward, setup_context=_shared_setup)

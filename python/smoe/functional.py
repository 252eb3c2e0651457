"""smoe.functional: the ops of a sparse MoE layer, for PyTorch tensors.

Every function takes its tensors positionally and everything else by keyword, accepts
backend="auto" (cpu for CPU tensors, cuda for CUDA tensors), "cpu", "cuda" (CUDA tensors, when the
build has nvcc), "simt" (CPU tensors: the CUDA kernels run by the SIMT emulator, for tests and
teaching), or "reference" (smoe.reference: plain PyTorch), and is differentiable w.r.t. its float
tensor inputs. smoe.BACKENDS lists what this build contains. The C++ backends run through
the torch custom ops of smoe.ops (torch.ops.smoe.<name>), so torch.compile(fullgraph=True) traces
them. Shapes: T tokens, H hidden, F expert FFN size (F1 = 2F for gated activations), E experts,
K experts per token, R rows of the expert-sorted buffer, C capacity per expert.

Errors: bad arguments raise ValueError (TypeError for a non-tensor) naming the argument and what was
expected; most checks happen in the C++ core, the few that Python needs to allocate outputs here.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

import smoe.ops  # noqa: F401  (registers torch.ops.smoe.*)
from smoe import _core
from smoe import reference as _ref
from smoe.ops import ACTIVATIONS, DROP_POLICIES, GATED_ACTIVATIONS, GROUP_SCORES, SCORE_FUNCS
from smoe.reference.ops import RoutingPlan

# One op, one name in every layer: the public names are those of the readable reference.
__all__ = list(_ref.ops.__all__)

_ops = torch.ops.smoe


# ---- argument checks that Python needs before it can allocate ------------------------------------


_tensor = _core.check_dims
_choice = _core.check_choice


_int = _core.check_int
def _backend(op: str, backend: str, named) -> str:
    device = _core.check_same_device(op, named)
    return _core.resolve_backend(op, backend, device) if backend != "reference" else _core.check_backend(op, backend)


# ---- gating --------------------------------------------------------------------------------------


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
    _tensor(op, "logits", logits, 2, "[T, E]")
    _tensor(op, "bias", bias, 1, "[E]", optional=True)
    _int(op, "top_k", top_k, 1, logits.shape[1], " (E = logits.size(1))")
    _int(op, "n_groups", n_groups, 1)
    _int(op, "topk_groups", topk_groups, 1)
    _choice(op, "score_func", score_func, SCORE_FUNCS)
    _choice(op, "group_score", group_score, GROUP_SCORES)
    backend = _backend(op, backend, [("logits", logits), ("bias", bias)])
    if backend == "reference":
        return _ref.topk_gating(
            logits, top_k=top_k, score_func=score_func, bias=bias, n_groups=n_groups, topk_groups=topk_groups,
            group_score=group_score, renormalize=renormalize, renorm_eps=renorm_eps, routed_scaling=routed_scaling,
        )
    return _ops.topk_gating(
        logits, bias, top_k, score_func, n_groups, topk_groups, group_score, bool(renormalize), float(renorm_eps),
        float(routed_scaling), backend,
    )


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
    _tensor(op, "logits", logits, 2, "[T, E]")
    _int(op, "capacity", capacity, 1, logits.shape[0], " (T = logits.size(0))")
    _choice(op, "score_func", score_func, SCORE_FUNCS)
    backend = _backend(op, backend, [("logits", logits)])
    if backend == "reference":
        return _ref.expert_choice(logits, capacity=capacity, score_func=score_func)
    return _ops.expert_choice(logits, capacity, score_func, backend)


def load_balancing_loss(probs: Tensor, experts: Tensor, *, backend: str = "auto") -> Tensor:
    """Switch load-balancing loss, Hugging Face Mixtral's top-k form:
    E * sum_e (count_e / T) * mean_t probs[t, e], count_e = #(t, k) with experts[t, k] == e.
    probs [T, E] f32 (f64), experts [T, K] i32 -> 0-d loss. The counts are constants; probs carries
    the gradient. T = 0 gives 0."""
    op = "load_balancing_loss"
    _tensor(op, "probs", probs, 2, "[T, E]")
    _tensor(op, "experts", experts, 2, "[T, K]")
    backend = _backend(op, backend, [("probs", probs), ("experts", experts)])
    if backend == "reference":
        return _ref.load_balancing_loss(probs, experts)
    return _ops.load_balancing_loss(probs, experts, backend)


def z_loss(logits: Tensor, *, backend: str = "auto") -> Tensor:
    """Router z-loss (ST-MoE eq. 5): mean_t logsumexp(logits[t])^2, a 0-d f32 (f64) tensor; T = 0 gives 0."""
    op = "z_loss"
    _tensor(op, "logits", logits, 2, "[T, E]")
    backend = _backend(op, backend, [("logits", logits)])
    if backend == "reference":
        return _ref.z_loss(logits)
    return _ops.z_loss(logits, backend)


def balancing_bias_update(counts: Tensor, bias: Tensor, *, rate: float, backend: str = "auto") -> None:
    """Aux-loss-free balancing (DeepSeek-V3): bias[e] += rate * sign(mean(counts) - counts[e]), in place.
    counts [E] i32 (tokens routed to each expert in a step), bias [E] f32. No gradient."""
    op = "balancing_bias_update"
    _tensor(op, "counts", counts, 1, "[E]")
    _tensor(op, "bias", bias, 1, "[E]")
    backend = _backend(op, backend, [("counts", counts), ("bias", bias)])
    if backend == "reference":
        return _ref.balancing_bias_update(counts, bias, rate=rate)
    with torch.no_grad():
        _ops.balancing_bias_update(counts, bias, float(rate), backend)


# ---- routing -------------------------------------------------------------------------------------


def routing_plan_max_rows(T: int, K: int, *, num_experts: int, capacity: Optional[int] = None, pad_multiple: int = 1) -> int:
    """Rows R_max of RoutingPlan.token_of_row (and of the permuted buffers) for T tokens and K picks.
    Equal to the C++ query smoe::routing_plan_max_rows; ValueError/TypeError naming a bad argument."""
    op = "routing_plan_max_rows"
    _int(op, "T", T, 0, c_max=_core.INT64_MAX)
    _int(op, "K", K, 0, c_max=_core.INT64_MAX)
    _int(op, "num_experts", num_experts, 1)
    if capacity is not None:
        _int(op, "capacity", capacity, 0, c_max=_core.INT64_MAX)
    _int(op, "pad_multiple", pad_multiple, 1)
    return smoe.ops.routing_plan_max_rows(T, K, num_experts, -1 if capacity is None else capacity, pad_multiple)


def routing_plan(
    experts: Tensor,
    *,
    num_experts: int,
    weights: Optional[Tensor] = None,
    capacity: Optional[int] = None,
    drop_policy: str = "token_order",
    pad_multiple: int = 1,
    backend: str = "auto",
) -> RoutingPlan:
    """The expert-sorted row layout of experts [T, K] i32 (not differentiable).

    Returns RoutingPlan(counts [E] i32, offsets [E+1] i64, row_of [T, K] i32 (-1: dropped),
    token_of_row [R_max] i32 (-1: padding, and rows past offsets[E])). Expert e owns rows
    [offsets[e], offsets[e] + counts[e]) in token order, its segment padded to a multiple of
    pad_multiple. capacity=None is dropless; with a capacity C an expert keeps its first C assignments
    ("token_order") or its C highest weights ("score", needs weights [T, K] f32, ties to the lower
    token). R_max = routing_plan_max_rows(T, K, ...) depends on shapes only, so no host sync is needed;
    plan.num_rows (= offsets[-1]) is the number of rows in use.
    """
    op = "routing_plan"
    _tensor(op, "experts", experts, 2, "[T, K]")
    _tensor(op, "weights", weights, 2, "[T, K]", optional=True)
    _int(op, "num_experts", num_experts, 1)
    if capacity is not None:
        _int(op, "capacity", capacity, 0, c_max=_core.INT64_MAX)
    _int(op, "pad_multiple", pad_multiple, 1)
    _choice(op, "drop_policy", drop_policy, DROP_POLICIES)
    backend = _backend(op, backend, [("experts", experts), ("weights", weights)])
    w = None if weights is None else weights.detach()
    if backend == "reference":
        return _ref.routing_plan(
            experts, num_experts=num_experts, weights=w, capacity=capacity, drop_policy=drop_policy, pad_multiple=pad_multiple
        )
    counts, offsets, row_of, token_of_row = _ops.routing_plan(
        experts, w, num_experts, -1 if capacity is None else capacity, drop_policy, pad_multiple, backend
    )
    return RoutingPlan(counts, offsets, row_of, token_of_row)


def _plan(op: str, plan) -> RoutingPlan:
    """A RoutingPlan, or any 4-tuple of tensors (counts, offsets, row_of, token_of_row) made into one."""
    if not (isinstance(plan, tuple) and len(plan) == 4):
        raise TypeError(
            f"smoe.{op}: argument 'plan': expected a RoutingPlan (counts, offsets, row_of, token_of_row), "
            f"got {type(plan).__name__}"
        )
    plan = plan if isinstance(plan, RoutingPlan) else RoutingPlan(*plan)
    for field, ndim, layout in (("counts", 1, "[E]"), ("offsets", 1, "[E+1]"), ("row_of", 2, "[T, K]"),
                                ("token_of_row", 1, "[R]")):
        _tensor(op, f"plan.{field}", getattr(plan, field), ndim, layout)
    return plan


def permute(x: Tensor, plan: RoutingPlan, *, backend: str = "auto") -> Tensor:
    """xs[r] = x[plan.token_of_row[r]] (zero rows for padding): x [T, H] -> xs [R, H]."""
    op = "permute"
    _tensor(op, "x", x, 2, "[T, H]")
    plan = _plan(op, plan)
    smoe.ops.check_permute_x(op, x, plan.token_of_row, plan.row_of)
    backend = _backend(op, backend, [("x", x), ("plan.token_of_row", plan.token_of_row), ("plan.row_of", plan.row_of)])
    if backend == "reference":
        return _ref.permute(x, plan)
    return _ops.permute(x, plan.token_of_row, plan.row_of, backend)


def combine(ys: Tensor, weights: Tensor, plan_or_row_of: Union[RoutingPlan, Tensor], *, backend: str = "auto") -> Tensor:
    """y[t] = sum_k weights[t, k] * ys[row_of[t, k]] over kept k (row_of >= 0), accumulated in f32
    in k order (deterministic): ys [R, H], weights [T, K] f32 -> y [T, H] in ys's dtype.
    The third argument is a RoutingPlan or its row_of [T, K] i32 (e.g. expert choice's [T, E])."""
    op = "combine"
    _tensor(op, "ys", ys, 2, "[R, H]")
    _tensor(op, "weights", weights, 2, "[T, K]")
    if isinstance(plan_or_row_of, Tensor):
        row_of = plan_or_row_of
    else:
        row_of = _plan(op, plan_or_row_of).row_of
    _tensor(op, "row_of", row_of, 2, "[T, K]")
    backend = _backend(op, backend, [("ys", ys), ("weights", weights), ("row_of", row_of)])
    if backend == "reference":
        return _ref.combine(ys, weights, row_of)
    return _ops.combine(ys, weights, row_of, backend)


# ---- experts -------------------------------------------------------------------------------------


def grouped_gemm(a: Tensor, b: Tensor, offsets: Tensor, *, trans_b: bool = True, backend: str = "auto") -> Tensor:
    """Per expert segment: c[seg_e] = a[seg_e] @ b[e]^T (trans_b, b [E, N, Kd]) or a[seg_e] @ b[e]
    (b [E, Kd, N]); a [R, Kd], offsets [E+1] i64 -> c [R, N]; rows at or past offsets[E] are zero."""
    op = "grouped_gemm"
    _tensor(op, "a", a, 2, "[R, Kd]")
    _tensor(op, "b", b, 3, "[E, N, Kd]" if trans_b else "[E, Kd, N]")
    _tensor(op, "offsets", offsets, 1, "[E+1]")
    backend = _backend(op, backend, [("a", a), ("b", b), ("offsets", offsets)])
    if backend == "reference":
        return _ref.grouped_gemm(a, b, offsets, trans_b=trans_b)
    return _ops.grouped_gemm(a, b, offsets, bool(trans_b), backend)


def activation(x: Tensor, *, kind: str = "swiglu", backend: str = "auto") -> Tensor:
    """swiglu / geglu: x [R, 2F] = [gate | up] -> act(gate) * up [R, F]; gelu (exact erf form), relu:
    elementwise on x [R, F]."""
    op = "activation"
    _tensor(op, "x", x, 2, "[R, 2F]" if kind in GATED_ACTIVATIONS else "[R, F]")
    _choice(op, "kind", kind, ACTIVATIONS)
    if kind in GATED_ACTIVATIONS and x.shape[1] % 2 != 0:
        raise ValueError(
            f"smoe.activation: argument 'x': expected an even size(1) = 2F ([gate | up]) for kind={kind!r}, "
            f"got shape {list(x.shape)}"
        )
    backend = _backend(op, backend, [("x", x)])
    if backend == "reference":
        return _ref.activation(x, kind=kind)
    return _ops.activation(x, kind, backend)


def expert_mlp(
    x: Tensor, w1: Tensor, w2: Tensor, plan: RoutingPlan, *, activation: str = "swiglu", backend: str = "auto"
) -> Tensor:
    """The experts, fused: ys[r] = act(x[token_of_row[r]] @ w1[e]^T) @ w2[e]^T for the rows r of
    expert e (permute -> grouped GEMM -> activation -> grouped GEMM), not yet weighted or combined.
    x [T, H], w1 [E, F1, H] (F1 = 2F for gated activations, rows [gate | up]), w2 [E, H, F] -> ys [R, H];
    padding rows and rows past offsets[E] are zero. Follow with combine(ys, weights, plan)."""
    op = "expert_mlp"
    _tensor(op, "x", x, 2, "[T, H]")
    _tensor(op, "w1", w1, 3, "[E, F1, H]")
    _tensor(op, "w2", w2, 3, "[E, H, F]")
    plan = _plan(op, plan)
    _choice(op, "activation", activation, ACTIVATIONS)
    backend = _backend(
        op, backend, [("x", x), ("w1", w1), ("w2", w2), ("plan.offsets", plan.offsets), ("plan.row_of", plan.row_of)]
    )
    if backend == "reference":
        return _ref.expert_mlp(x, w1, w2, plan, activation=activation)
    # Without a gradient to compute, the intermediates the backward would need are not kept.
    need_saved = torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad)
    return _ops.expert_mlp(
        x, plan.token_of_row, plan.offsets, plan.row_of, w1, w2, activation, backend, need_saved
    )[0]


def shared_expert(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    gate_w: Optional[Tensor] = None,
    *,
    activation: str = "swiglu",
    backend: str = "auto",
) -> Tensor:
    """The shared expert every token passes through (DeepSeekMoE, Qwen2-MoE):
    out = sigmoid(x @ gate_w) * (act(x @ w1^T) @ w2^T)   (no gate_w: scale 1).
    x [T, H], w1 [F1, H], w2 [H, F], gate_w [H] -> out [T, H] in x's dtype; the layer adds it."""
    op = "shared_expert"
    _tensor(op, "x", x, 2, "[T, H]")
    _tensor(op, "w1", w1, 2, "[F1, H]")
    _tensor(op, "w2", w2, 2, "[H, F]")
    _tensor(op, "gate_w", gate_w, 1, "[H]", optional=True)
    _choice(op, "activation", activation, ACTIVATIONS)
    backend = _backend(op, backend, [("x", x), ("w1", w1), ("w2", w2), ("gate_w", gate_w)])
    if backend == "reference":
        return _ref.shared_expert(x, w1, w2, gate_w, activation=activation)
    return _ops.shared_expert(x, w1, w2, gate_w, activation, backend)[0]

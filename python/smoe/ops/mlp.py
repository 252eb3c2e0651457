"""The experts' MLP, fused (gather -> GEMM -> activation -> GEMM), and the shared expert:
smoe.ops.expert_mlp, shared_expert, torch.ops.smoe.expert_mlp(_backward), shared_expert(_backward).
C++: include/smoe/ops/mlp.h, binding csrc/bindings/mlp.cpp.

The public functions follow the package's pattern (smoe/ops/_common.py); the ops allocate their
outputs from _mlp_shapes (ys, pre, act) rather than an `_<op>_shapes` list, as the saved pre / act
may live in scratch."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from smoe import _core
from smoe import reference as _ref
from smoe.ops._common import (
    _SCRATCH_ALIGN,
    ACTIVATIONS,
    GATED_ACTIVATIONS,
    _scratch,
    _scratch_views,
    acc_dtype,
    check_backend,
    code,
    dims,
    exec_args,
    v,
)
from smoe.ops.routing import as_plan
from smoe.reference.ops import RoutingPlan

__all__ = ["expert_mlp", "expert_mlp_combine_top1", "shared_expert"]


# ---- expert MLP (fused entry point) and shared expert --------------------------------------------


def _check_mlp(op: str, kind: str, named) -> None:
    code(op, "activation", ACTIVATIONS, kind)
    dims(op, named)


def _mlp_shapes(x: Tensor, R: int, w2_F: int, kind: str):
    F1 = 2 * w2_F if kind in GATED_ACTIVATIONS else w2_F
    return (R, x.shape[1]), (R, F1), (R, w2_F)  # ys [R, H], pre [R, F1], act [R, F]


def _expert_mlp_dims(x, token_of_row, w2):
    return [("x", x, 2, "[T, H]"), ("token_of_row", token_of_row, 1, "[R]"), ("w2", w2, 3, "[E, H, F]")]


@torch.library.custom_op("smoe::expert_mlp", mutates_args=())
def expert_mlp_op(
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
        **exec_args(backend, x),
        act=ACTIVATIONS[activation],
        x=v(x, "x"),
        token_of_row=v(token_of_row, "token_of_row"),
        offsets=v(offsets, "offsets"),
        w1=v(w1, "w1"),
        w2=v(w2, "w2"),
        pre=v(pre, "pre"),
        act_out=v(act, "act"),
        ys=v(ys, "ys"),
    )
    if not need_saved:
        pre, act = x.new_empty((0,)), x.new_empty((0,))
    return ys, pre, act


@expert_mlp_op.register_fake
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
    _check_mlp(
        "expert_mlp_backward",
        activation,
        [("grad_ys", grad_ys, 2, "[R, H]"), ("row_of", row_of, 2, "[T, K]"), ("w2", w2, 3, "[E, H, F]")],
    )
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
        **exec_args(backend, grad_ys),
        act=ACTIVATIONS[activation],
        grad_ys=v(grad_ys, "grad_ys"),
        x=v(x, "x"),
        token_of_row=v(token_of_row, "token_of_row"),
        row_of=v(row_of, "row_of"),
        offsets=v(offsets, "offsets"),
        w1=v(w1, "w1"),
        w2=v(w2, "w2"),
        pre=v(pre, "pre"),
        act_out=v(act, "act"),
        grad_x=v(grad_x, "grad_x"),
        grad_w1=v(grad_w1, "grad_w1"),
        grad_w2=v(grad_w2, "grad_w2"),
        workspace=v(workspace, "workspace"),
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
        grad_x if need[0] else None,
        None,
        None,
        None,
        grad_w1 if need[4] else None,
        grad_w2 if need[5] else None,
        None,
        None,
        None,
    )


expert_mlp_op.register_autograd(_expert_mlp_backward, setup_context=_expert_mlp_setup)


def _combine_top1_workspace_bytes(activation: str, dtype: torch.dtype, R: int, H: int, F: int) -> int:
    """expert_mlp_combine_top1_workspace_bytes computed here (no crossing into smoe._C): csrc/core/workspace.h's
    total() of pre [R, F1], act [R, F], rows [R, H] -- 64 bytes to align the base, each piece padded to 64."""
    F1 = 2 * F if activation in GATED_ACTIVATIONS else F
    elem = torch.empty((), dtype=dtype).element_size()
    return _SCRATCH_ALIGN + sum(-(-(n * elem) // _SCRATCH_ALIGN) * _SCRATCH_ALIGN for n in (R * F1, R * F, R * H))


def _combine_top1_dims(x, token_of_row, w2, weights):
    return _expert_mlp_dims(x, token_of_row, w2) + [("weights", weights, 2, "[T, 1]")]


@torch.library.custom_op("smoe::expert_mlp_combine_top1", mutates_args=())
def expert_mlp_combine_top1_op(
    x: Tensor,
    token_of_row: Tensor,
    offsets: Tensor,
    w1: Tensor,
    w2: Tensor,
    weights: Tensor,
    activation: str,
    backend: str,
) -> Tensor:
    """Inference only (no autograd): y [T, H] = combine(expert_mlp(x, ...), weights) for a top-1 plan,
    the weighting and the scatter into token order done by the second GEMM's epilogue (no ys [R, H],
    no combine pass). Tokens without a row get zeros. pre / act live in scratch for the call."""
    _check_mlp("expert_mlp_combine_top1", activation, _combine_top1_dims(x, token_of_row, w2, weights))
    y = x.new_empty(x.shape)
    ws_bytes = _combine_top1_workspace_bytes(activation, x.dtype, token_of_row.shape[0], x.shape[1], w2.shape[2])
    workspace = _scratch(ws_bytes, x.device)
    _core.lib().expert_mlp_combine_top1_forward(
        **exec_args(backend, x),
        act=ACTIVATIONS[activation],
        x=v(x, "x"),
        token_of_row=v(token_of_row, "token_of_row"),
        offsets=v(offsets, "offsets"),
        w1=v(w1, "w1"),
        w2=v(w2, "w2"),
        weights=v(weights, "weights"),
        y=v(y, "y"),
        workspace=v(workspace, "workspace"),
    )
    return y


@expert_mlp_combine_top1_op.register_fake
def _(x, token_of_row, offsets, w1, w2, weights, activation, backend):
    _check_mlp("expert_mlp_combine_top1", activation, _combine_top1_dims(x, token_of_row, w2, weights))
    return x.new_empty(x.shape)


@torch.library.custom_op("smoe::shared_expert", mutates_args=())
def shared_expert_op(
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
        **exec_args(backend, x),
        act=ACTIVATIONS[activation],
        x=v(x, "x"),
        w1=v(w1, "w1"),
        w2=v(w2, "w2"),
        gate_w=v(gate_w, "gate_w"),
        pre=v(pre, "pre"),
        act_out=v(act, "act"),
        out=v(out, "out"),
        gate=v(gate, "gate") if gate_w is not None else None,
        y=v(y, "y"),
    )
    if gate_w is None:
        out = x.new_empty((0,))
    return y, pre, act, out, gate


@shared_expert_op.register_fake
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
        **exec_args(backend, x),
        act=ACTIVATIONS[activation],
        grad_y=v(grad_y, "grad_y"),
        x=v(x, "x"),
        w1=v(w1, "w1"),
        w2=v(w2, "w2"),
        gate_w=v(gate_w, "gate_w"),
        pre=v(pre, "pre"),
        act_out=v(act, "act"),
        out=v(out, "out") if gate_w is not None else None,
        gate=v(gate, "gate") if gate_w is not None else None,
        grad_x=v(grad_x, "grad_x"),
        grad_w1=v(grad_w1, "grad_w1"),
        grad_w2=v(grad_w2, "grad_w2"),
        grad_gate_w=v(grad_gate_w, "grad_gate_w") if gate_w is not None else None,
        workspace=v(workspace, "workspace"),
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


shared_expert_op.register_autograd(_shared_backward, setup_context=_shared_setup)


# ---- public functions ---------------------------------------------------------------------------


def expert_mlp(
    x: Tensor, w1: Tensor, w2: Tensor, plan: RoutingPlan, *, activation: str = "swiglu", backend: str = "auto"
) -> Tensor:
    """The experts, fused: ys[r] = act(x[token_of_row[r]] @ w1[e]^T) @ w2[e]^T for the rows r of
    expert e (permute -> grouped GEMM -> activation -> grouped GEMM), not yet weighted or combined.
    x [T, H], w1 [E, F1, H] (F1 = 2F for gated activations, rows [gate | up]), w2 [E, H, F] -> ys [R, H];
    padding rows and rows past offsets[E] are zero. Follow with combine(ys, weights, plan)."""
    op = "expert_mlp"
    plan = as_plan(op, plan)
    backend = check_backend(
        op, backend, [("x", x), ("w1", w1), ("w2", w2), ("plan.offsets", plan.offsets), ("plan.row_of", plan.row_of)]
    )
    if backend == "reference":
        _check_mlp(op, activation, _expert_mlp_dims(x, plan.token_of_row, w2))
        return _ref.expert_mlp(x, w1, w2, plan, activation=activation)
    # Without a gradient to compute, the intermediates the backward would need are not kept.
    need_saved = torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad)
    return expert_mlp_op(x, plan.token_of_row, plan.offsets, plan.row_of, w1, w2, activation, backend, need_saved)[0]


def expert_mlp_combine_top1(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    weights: Tensor,
    plan: RoutingPlan,
    *,
    activation: str = "swiglu",
    backend: str = "auto",
) -> Tensor:
    """combine(expert_mlp(x, w1, w2, plan), weights, plan) for top-1 routing (plan.row_of [T, 1]) when
    no gradient is wanted, in one op: the second GEMM's epilogue multiplies row r by its token's weight
    and stores it straight into y[token_of_row[r]] (csrc/cuda/gemm_tc.cuh), so neither ys [R, H] nor the
    combine pass exists. weights [T, 1] (f32; f64 for f64 x) -> y [T, H] in x's dtype; dropped tokens
    get zeros. Equal to the unfused pair within the per-dtype tolerance (not bitwise on the device
    backends in bf16/f16: ys is not rounded before it is weighted). Not differentiable: raises when a
    gradient would be needed (use expert_mlp + combine)."""
    op = "expert_mlp_combine_top1"
    plan = as_plan(op, plan)
    backend = check_backend(
        op,
        backend,
        [("x", x), ("w1", w1), ("w2", w2), ("weights", weights), ("plan.offsets", plan.offsets)],
    )
    if plan.row_of.dim() != 2 or plan.row_of.shape[1] != 1:
        raise ValueError(
            f"{op}: argument 'plan.row_of': expected [T, 1] (top-1 routing), got {list(plan.row_of.shape)}"
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, w2, weights)):
        raise ValueError(f"{op}: computes no gradient; x, w1, w2 and weights must not require grad (or use no_grad)")
    if backend == "reference":
        _check_mlp(op, activation, _combine_top1_dims(x, plan.token_of_row, w2, weights))
        return _ref.expert_mlp_combine_top1(x, w1, w2, weights, plan, activation=activation)
    return expert_mlp_combine_top1_op(x, plan.token_of_row, plan.offsets, w1, w2, weights, activation, backend)


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
    backend = check_backend(op, backend, [("x", x), ("w1", w1), ("w2", w2)], [("gate_w", gate_w)])
    if backend == "reference":
        _check_mlp(op, activation, [("x", x, 2, "[T, H]"), ("w2", w2, 2, "[H, F]")])
        return _ref.shared_expert(x, w1, w2, gate_w, activation=activation)
    return shared_expert_op(x, w1, w2, gate_w, activation, backend)[0]

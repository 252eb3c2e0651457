"""Permute (token rows -> expert-sorted rows) and combine (weighted sum back per token):
smoe.ops.permute, combine, torch.ops.smoe.permute(_backward), combine(_backward).
C++: include/smoe/ops/permute.h, binding csrc/bindings/permute.cpp."""

from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor

from smoe import _core
from smoe import reference as _ref
from smoe.ops._common import check_backend, dims, empty, exec_args, v
from smoe.ops.routing import as_plan
from smoe.reference.ops import RoutingPlan

__all__ = ["permute", "combine"]


def check_permute_x(op: str, x, token_of_row, row_of) -> None:
    """x [T, H] with T = row_of.size(0): the backward scatters into T rows (no core call sees both)."""
    dims(op, [("x", x, 2, "[T, H]"), ("token_of_row", token_of_row, 1, "[R]"), ("row_of", row_of, 2, "[T, K]")])
    if x.shape[0] != row_of.shape[0]:
        raise ValueError(
            f"smoe.{op}: argument 'x': expected size(0) == T = {row_of.shape[0]} (row_of.size(0)), "
            f"got shape {list(x.shape)}"
        )


def _permute_shapes(op, x, token_of_row, row_of):
    check_permute_x(op, x, token_of_row, row_of)
    return [((token_of_row.shape[0], x.shape[1]), None)]  # xs [R, H]


@torch.library.custom_op("smoe::permute", mutates_args=())
def permute_op(x: Tensor, token_of_row: Tensor, row_of: Tensor, backend: str) -> Tensor:
    (xs,) = empty(x, _permute_shapes("permute", x, token_of_row, row_of))
    _core.lib().permute_forward(
        **exec_args(backend, x), x=v(x, "x"), token_of_row=v(token_of_row, "token_of_row"), xs=v(xs, "xs")
    )
    return xs


@permute_op.register_fake
def _(x, token_of_row, row_of, backend):
    return empty(x, _permute_shapes("permute", x, token_of_row, row_of))[0]


def _permute_backward_shapes(grad_xs, row_of):
    dims("permute_backward", [("grad_xs", grad_xs, 2, "[R, H]"), ("row_of", row_of, 2, "[T, K]")])
    return [((row_of.shape[0], grad_xs.shape[1]), None)]  # grad_x [T, H]


@torch.library.custom_op("smoe::permute_backward", mutates_args=())
def permute_backward(grad_xs: Tensor, row_of: Tensor, backend: str) -> Tensor:
    (grad_x,) = empty(grad_xs, _permute_backward_shapes(grad_xs, row_of))
    _core.lib().permute_backward(
        **exec_args(backend, grad_xs),
        grad_xs=v(grad_xs, "grad_xs"),
        row_of=v(row_of, "row_of"),
        grad_x=v(grad_x, "grad_x"),
    )
    return grad_x


@permute_backward.register_fake
def _(grad_xs, row_of, backend):
    return empty(grad_xs, _permute_backward_shapes(grad_xs, row_of))[0]


def _permute_setup(ctx, inputs, output):
    _x, _token_of_row, row_of, backend = inputs
    ctx.save_for_backward(row_of)
    ctx.backend = backend


def _permute_backward(ctx, grad_xs):
    (row_of,) = ctx.saved_tensors
    return torch.ops.smoe.permute_backward(grad_xs.contiguous(), row_of, ctx.backend), None, None, None


permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


def _combine_shapes(ys, row_of):
    dims("combine", [("ys", ys, 2, "[R, H]"), ("row_of", row_of, 2, "[T, K]")])
    return [((row_of.shape[0], ys.shape[1]), None)]  # y [T, H]


@torch.library.custom_op("smoe::combine", mutates_args=())
def combine_op(ys: Tensor, weights: Tensor, row_of: Tensor, backend: str) -> Tensor:
    (y,) = empty(ys, _combine_shapes(ys, row_of))
    _core.lib().combine_forward(
        **exec_args(backend, ys),
        ys=v(ys, "ys"),
        weights=v(weights, "weights"),
        row_of=v(row_of, "row_of"),
        y=v(y, "y"),
    )
    return y


@combine_op.register_fake
def _(ys, weights, row_of, backend):
    return empty(ys, _combine_shapes(ys, row_of))[0]


def _combine_backward_outputs(ys, weights, need_ys, need_weights):
    # An output that is not needed is an empty tensor and is not computed.
    return (
        torch.empty_like(ys, memory_format=torch.contiguous_format) if need_ys else ys.new_empty((0,)),
        torch.empty_like(weights, memory_format=torch.contiguous_format) if need_weights else weights.new_empty((0,)),
    )


@torch.library.custom_op("smoe::combine_backward", mutates_args=())
def combine_backward(
    grad_y: Tensor, ys: Tensor, weights: Tensor, row_of: Tensor, need_ys: bool, need_weights: bool, backend: str
) -> Tuple[Tensor, Tensor]:
    grad_ys, grad_weights = _combine_backward_outputs(ys, weights, need_ys, need_weights)
    _core.lib().combine_backward(
        **exec_args(backend, ys),
        grad_y=v(grad_y, "grad_y"),
        ys=v(ys, "ys"),
        weights=v(weights, "weights"),
        row_of=v(row_of, "row_of"),
        grad_ys=v(grad_ys, "grad_ys") if need_ys else None,
        grad_weights=v(grad_weights, "grad_weights") if need_weights else None,
    )
    return grad_ys, grad_weights


@combine_backward.register_fake
def _(grad_y, ys, weights, row_of, need_ys, need_weights, backend):
    return _combine_backward_outputs(ys, weights, need_ys, need_weights)


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


combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


def permute(x: Tensor, plan: RoutingPlan, *, backend: str = "auto") -> Tensor:
    """xs[r] = x[plan.token_of_row[r]] (zero rows for padding): x [T, H] -> xs [R, H]."""
    op = "permute"
    _core.check_tensor(op, "x", x)
    plan = as_plan(op, plan)
    backend = check_backend(
        op, backend, [("x", x), ("plan.token_of_row", plan.token_of_row), ("plan.row_of", plan.row_of)]
    )
    if backend == "reference":
        _permute_shapes(op, x, plan.token_of_row, plan.row_of)
        return _ref.permute(x, plan)
    return permute_op(x, plan.token_of_row, plan.row_of, backend)


def combine(
    ys: Tensor, weights: Tensor, plan_or_row_of: Union[RoutingPlan, Tensor], *, backend: str = "auto"
) -> Tensor:
    """y[t] = sum_k weights[t, k] * ys[row_of[t, k]] over kept k (row_of >= 0), accumulated in f32
    in k order (deterministic): ys [R, H], weights [T, K] f32 -> y [T, H] in ys's dtype.
    The third argument is a RoutingPlan or its row_of [T, K] i32 (e.g. expert choice's [T, E])."""
    op = "combine"
    row_of = plan_or_row_of if isinstance(plan_or_row_of, Tensor) else as_plan(op, plan_or_row_of).row_of
    backend = check_backend(op, backend, [("ys", ys), ("weights", weights), ("row_of", row_of)])
    if backend == "reference":
        _combine_shapes(ys, row_of)
        return _ref.combine(ys, weights, row_of)
    return combine_op(ys, weights, row_of, backend)

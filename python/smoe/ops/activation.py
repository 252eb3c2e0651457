"""The expert activations (swiglu, geglu, gelu, relu): smoe.ops.activation,
torch.ops.smoe.activation(_backward). C++: include/smoe/ops/gemm.h, binding csrc/bindings/activation.cpp."""

from __future__ import annotations

import torch
from torch import Tensor

from smoe import _core
from smoe import reference as _ref
from smoe.ops._common import ACTIVATIONS, GATED_ACTIVATIONS, check_backend, code, dims, empty, exec_args, v

__all__ = ["activation"]


def _activation_shapes(op: str, x, kind: str):
    """out [R, F]: F = size(1) / 2 for the gated kinds (x = [gate | up]), size(1) otherwise. Returns the
    kind's code too."""
    act = code(op, "kind", ACTIVATIONS, kind)
    gated = kind in GATED_ACTIVATIONS
    dims(op, [("x", x, 2, "[R, 2F]" if gated else "[R, F]")])
    F1 = x.shape[1]
    if gated and F1 % 2 != 0:
        raise ValueError(
            f"smoe.{op}: argument 'x': expected an even size(1) = 2F ([gate | up]) for kind={kind!r}, "
            f"got shape {list(x.shape)}"
        )
    return [((x.shape[0], F1 // 2 if gated else F1), None)], act


@torch.library.custom_op("smoe::activation", mutates_args=())
def activation_op(x: Tensor, kind: str, backend: str) -> Tensor:
    specs, act = _activation_shapes("activation", x, kind)
    (out,) = empty(x, specs)
    _core.lib().activation_forward(**exec_args(backend, x), act=act, **{"in": v(x, "x")}, out=v(out, "out"))
    return out


@activation_op.register_fake
def _(x, kind, backend):
    return empty(x, _activation_shapes("activation", x, kind)[0])[0]


def _activation_backward_shapes(x, kind):
    _, act = _activation_shapes("activation_backward", x, kind)
    return [(tuple(x.shape), None)], act  # grad_in [R, F1], dense


@torch.library.custom_op("smoe::activation_backward", mutates_args=())
def activation_backward(x: Tensor, grad_out: Tensor, kind: str, backend: str) -> Tensor:
    specs, act = _activation_backward_shapes(x, kind)
    (grad_in,) = empty(x, specs)
    _core.lib().activation_backward(
        **exec_args(backend, x),
        act=act,
        **{"in": v(x, "x")},
        grad_out=v(grad_out, "grad_out"),
        grad_in=v(grad_in, "grad_in"),
    )
    return grad_in


@activation_backward.register_fake
def _(x, grad_out, kind, backend):
    return empty(x, _activation_backward_shapes(x, kind)[0])[0]


def _act_setup(ctx, inputs, output):
    x, kind, backend = inputs
    ctx.save_for_backward(x)
    ctx.kind = kind
    ctx.backend = backend


def _act_backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return torch.ops.smoe.activation_backward(x, grad_out.contiguous(), ctx.kind, ctx.backend), None, None


activation_op.register_autograd(_act_backward, setup_context=_act_setup)


def activation(x: Tensor, *, kind: str = "swiglu", backend: str = "auto") -> Tensor:
    """swiglu / geglu: x [R, 2F] = [gate | up] -> act(gate) * up [R, F]; gelu (exact erf form), relu:
    elementwise on x [R, F]."""
    op = "activation"
    backend = check_backend(op, backend, [("x", x)])
    if backend == "reference":
        _activation_shapes(op, x, kind)
        return _ref.activation(x, kind=kind)
    return activation_op(x, kind, backend)

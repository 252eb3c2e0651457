"""The grouped GEMMs of the experts: smoe.ops.grouped_gemm, torch.ops.smoe.grouped_gemm(_wgrad).
C++: include/smoe/ops/gemm.h, binding csrc/bindings/gemm.cpp."""

from __future__ import annotations

import torch
from torch import Tensor

from smoe import _core
from smoe import reference as _ref
from smoe.ops._common import check_backend, dims, empty, exec_args, v

__all__ = ["grouped_gemm"]


def _grouped_gemm_shapes(op, a, b, trans_b):
    dims(op, [("a", a, 2, "[R, Kd]"), ("b", b, 3, "[E, N, Kd]" if trans_b else "[E, Kd, N]")])
    return [((a.shape[0], b.shape[1] if trans_b else b.shape[2]), None)]  # c [R, N]


@torch.library.custom_op("smoe::grouped_gemm", mutates_args=())
def grouped_gemm_op(a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool, backend: str) -> Tensor:
    (c,) = empty(a, _grouped_gemm_shapes("grouped_gemm", a, b, trans_b))
    # Zeros: the core leaves rows at or past offsets[E] untouched, and reading offsets[E] would sync.
    c.zero_()
    _core.lib().grouped_gemm(
        **exec_args(backend, a), trans_b=trans_b, a=v(a, "a"), b=v(b, "b"), offsets=v(offsets, "offsets"), c=v(c, "c")
    )
    return c


@grouped_gemm_op.register_fake
def _(a, b, offsets, trans_b, backend):
    return empty(a, _grouped_gemm_shapes("grouped_gemm", a, b, trans_b))[0]


def _wgrad_shapes(a, b, offsets):
    op = "grouped_gemm_wgrad"
    dims(op, [("a", a, 2, "[R, M]"), ("b", b, 2, "[R, N]"), ("offsets", offsets, 1, "[E+1]")])
    if offsets.shape[0] < 1:
        raise ValueError("smoe.grouped_gemm_wgrad: argument 'offsets': expected [E+1] with E >= 0, got shape [0]")
    return [((offsets.shape[0] - 1, a.shape[1], b.shape[1]), None)]  # c [E, M, N]


@torch.library.custom_op("smoe::grouped_gemm_wgrad", mutates_args=())
def grouped_gemm_wgrad(a: Tensor, b: Tensor, offsets: Tensor, backend: str) -> Tensor:
    (c,) = empty(a, _wgrad_shapes(a, b, offsets))
    _core.lib().grouped_gemm_wgrad(
        **exec_args(backend, a), a=v(a, "a"), b=v(b, "b"), offsets=v(offsets, "offsets"), c=v(c, "c")
    )
    return c


@grouped_gemm_wgrad.register_fake
def _(a, b, offsets, backend):
    return empty(a, _wgrad_shapes(a, b, offsets))[0]


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


grouped_gemm_op.register_autograd(_gg_backward, setup_context=_gg_setup)


def grouped_gemm(a: Tensor, b: Tensor, offsets: Tensor, *, trans_b: bool = True, backend: str = "auto") -> Tensor:
    """Per expert segment: c[seg_e] = a[seg_e] @ b[e]^T (trans_b, b [E, N, Kd]) or a[seg_e] @ b[e]
    (b [E, Kd, N]); a [R, Kd], offsets [E+1] i64 -> c [R, N]; rows at or past offsets[E] are zero."""
    op = "grouped_gemm"
    backend = check_backend(op, backend, [("a", a), ("b", b), ("offsets", offsets)])
    if backend == "reference":
        _grouped_gemm_shapes(op, a, b, trans_b)
        return _ref.grouped_gemm(a, b, offsets, trans_b=trans_b)
    return grouped_gemm_op(a, b, offsets, bool(trans_b), backend)

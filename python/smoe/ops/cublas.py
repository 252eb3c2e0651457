"""The cuBLAS grouped GEMM, the GPU benchmark's cuBLAS baseline: smoe.ops.grouped_gemm_cublas.
C++: csrc/cuda/gemm_cublas.h (cublasGemmGroupedBatchedEx), binding csrc/bindings/cublas.cpp.

Not a layer op: it copies the offsets to the host (one sync a call) and exists to time smoe's own
grouped GEMM against the library NVIDIA ships (bench/gpu/bench_layer.py). Only builds with cuBLAS
have it (has_cublas()); elsewhere it raises RuntimeError naming what is missing.
"""

from __future__ import annotations

from torch import Tensor

from smoe import _core
from smoe.ops._common import _stream, dims, empty, v

__all__ = ["has_cublas", "grouped_gemm_cublas", "grouped_gemm_wgrad_cublas"]


def has_cublas() -> bool:
    """Whether this smoe._C contains the cuBLAS grouped GEMM."""
    return bool(_core.lib().has_cublas())


def grouped_gemm_cublas(a: Tensor, b: Tensor, offsets: Tensor, *, trans_b: bool = False) -> Tensor:
    """c[seg e] = a[seg e] @ op(b[e]) (the contract of smoe.ops.grouped_gemm) through cuBLAS.
    a [R, Kd], b [E, Kd, N] ([E, N, Kd] with trans_b), offsets [E+1] i64 -> c [R, N] (rows past
    offsets[E] are zero). CUDA tensors."""
    op = "grouped_gemm_cublas"
    dims(op, [("a", a, 2, "[R, Kd]"), ("b", b, 3, "[E, N, Kd]" if trans_b else "[E, Kd, N]")])
    (c,) = empty(a, [((a.shape[0], b.shape[1] if trans_b else b.shape[2]), None)])
    c.zero_()
    _core.lib().grouped_gemm_cublas(
        stream=_stream(a), trans_b=bool(trans_b), a=v(a, "a"), b=v(b, "b"), offsets=v(offsets, "offsets"), c=v(c, "c")
    )
    return c


def grouped_gemm_wgrad_cublas(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """c[e] = a[seg e]^T @ b[seg e] (the contract of grouped_gemm_wgrad) through cuBLAS.
    a [R, M], b [R, N], offsets [E+1] i64 -> c [E, M, N]. CUDA tensors."""
    op = "grouped_gemm_wgrad_cublas"
    dims(op, [("a", a, 2, "[R, M]"), ("b", b, 2, "[R, N]"), ("offsets", offsets, 1, "[E+1]")])
    (c,) = empty(a, [((max(offsets.shape[0] - 1, 0), a.shape[1], b.shape[1]), None)])
    _core.lib().grouped_gemm_wgrad_cublas(
        stream=_stream(a), a=v(a, "a"), b=v(b, "b"), offsets=v(offsets, "offsets"), c=v(c, "c")
    )
    return c

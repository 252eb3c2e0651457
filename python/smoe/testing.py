"""Helpers for tests of smoe and of code built on it.

TOLERANCES is the one per-dtype table for every float comparison in Python (docs/testing.md explains
each row; tests/cpp/core/testing.h holds the same table for C++). A value passes when
|actual - expected| <= atol + rtol * |expected|.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["TOLERANCES", "tolerance", "assert_close"]

# dtype: (atol, rtol)
TOLERANCES = {
    # gradient checks; sums of a few thousand terms lose ~1e-13
    torch.float64: (1e-10, 1e-10),
    # unit roundoff 6e-8; reductions of up to ~4k terms in a different order
    torch.float32: (1e-5, 1e-5),
    # unit roundoff 3.9e-3: one rounding of the stored result, f32 accumulation
    torch.bfloat16: (1e-2, 1.6e-2),
    # unit roundoff 4.9e-4: one rounding of the stored result, f32 accumulation
    torch.float16: (1e-3, 2e-3),
}


def tolerance(dtype: torch.dtype):
    """(atol, rtol) for dtype; KeyError-free: integer dtypes compare exactly (0, 0)."""
    if not dtype.is_floating_point:
        return 0.0, 0.0
    return TOLERANCES[dtype]


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, dtype: Optional[torch.dtype] = None, msg: str = ""
) -> None:
    """torch.testing.assert_close with smoe's table: integers exactly, floats with the tolerance of
    `dtype` (default: the dtype of `actual`). Shapes and dtypes must match."""
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        raise TypeError("assert_close: expected two tensors")
    atol, rtol = tolerance(dtype or actual.dtype)
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol, equal_nan=False, msg=(lambda m: f"{msg}\n{m}" if msg else m)
    )

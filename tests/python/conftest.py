"""Shared helpers of the Python op tests: input generators whose ties and gaps are known, so that
integer outputs (expert indices, rows) are comparable exactly across implementations."""

from __future__ import annotations

import pytest
import smoe
import torch

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def threads():
    """Restores the CPU pool size after a test that changes it."""
    before = smoe.num_threads()
    yield
    smoe.set_num_threads(before)


def distinct_logits(T: int, E: int, dtype=torch.float32, spacing: float = 0.25, gen=None) -> torch.Tensor:
    """[T, E] logits with no ties: each row is a random permutation of spacing * (0 .. E-1) - shift.
    Neighbouring scores differ by a factor exp(spacing), far above rounding, so every implementation
    selects the same experts. Multiples of 1/4 are exact in bf16 only up to 2^8 * 0.25: keep E <= 256
    for bf16 (tests use ties on purpose elsewhere)."""
    ranks = torch.argsort(torch.rand(T, E, generator=gen), dim=1).to(torch.float64)
    return (spacing * ranks - spacing * E / 2).to(dtype)


def tied_logits(T: int, E: int, dtype=torch.float32, gen=None) -> torch.Tensor:
    """[T, E] logits from 9 values (-2 .. 2 step 0.5): many exact ties, exact in every float dtype."""
    return (torch.randint(-4, 5, (T, E), generator=gen).to(torch.float64) / 2).to(dtype)


def small_ints(*shape, dtype=torch.float32, lo: int = -2, hi: int = 3) -> torch.Tensor:
    """Small integers: products and sums of a few of them are exact in f32 (the CUTLASS habit)."""
    return torch.randint(lo, hi, shape).to(dtype)


def subprocess_env(**extra) -> dict:
    """os.environ for a child interpreter that must import the smoe this test process imported (a source
    tree, an editable install or a wheel): its directory goes first on PYTHONPATH, then this process's
    sys.path (so the child also sees e.g. examples' helpers the parent could import)."""
    import os
    import sys

    smoe_dir = os.path.dirname(os.path.dirname(os.path.abspath(smoe.__file__)))
    path = os.pathsep.join([smoe_dir] + [p for p in sys.path if p])
    return dict(os.environ, PYTHONPATH=path, **extra)

"""grouped_gemm and activation through smoe.functional: cpu backend vs smoe.reference."""

from __future__ import annotations

import pytest
import smoe.functional as F
import smoe.reference as ref
import torch
from conftest import FLOAT_DTYPES, small_ints
from smoe.testing import assert_close


def segments(counts, pad_rows: int = 0) -> torch.Tensor:
    """offsets [E+1] i64 from per-expert row counts."""
    return torch.tensor([0] + list(torch.tensor(counts).cumsum(0).tolist()), dtype=torch.int64)


CASES = [  # per-expert rows, Kd, N
    ([], 0, 0),
    ([0], 5, 3),  # one empty expert
    ([1], 4, 6),
    ([3, 0, 4, 0, 0, 1, 2], 9, 5),  # E = 7 odd, empty experts
    ([7], 16, 16),  # every row on one expert
    ([0] * 150 + [2] * 150, 8, 4),  # E = 300
    ([4097, 0, 0], 4, 3),  # 4097 rows, small Kd/N
]


@pytest.mark.parametrize("counts,Kd,N", CASES[1:])
@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_grouped_gemm_matches_reference(counts, Kd, N, trans_b, dtype):
    E = len(counts)
    offsets = segments(counts)
    R = int(offsets[-1]) + 2  # two rows past offsets[E]: left zero
    a = (torch.randn(R, Kd) / Kd**0.5).to(dtype)
    b = torch.randn(E, N, Kd).to(dtype) if trans_b else torch.randn(E, Kd, N).to(dtype)
    c = F.grouped_gemm(a, b, offsets, trans_b=trans_b, backend="cpu")
    assert c.shape == (R, N) and c.dtype == dtype
    assert_close(c, ref.grouped_gemm(a, b, offsets, trans_b=trans_b))
    assert torch.count_nonzero(c[int(offsets[-1]) :]) == 0


def test_grouped_gemm_exact_on_small_integers():
    offsets = segments([5, 0, 9, 3])
    a = small_ints(17, 12)
    b = small_ints(4, 6, 12)
    assert torch.equal(F.grouped_gemm(a, b, offsets, backend="cpu"), ref.grouped_gemm(a, b, offsets))


def test_grouped_gemm_no_experts_rows():
    # R = 0 rows: an empty output of the right shape.
    offsets = segments([0, 0])
    c = F.grouped_gemm(torch.zeros(0, 4), torch.randn(2, 3, 4), offsets, backend="cpu")
    assert c.shape == (0, 3)


def test_grouped_gemm_row_strided_a():
    offsets = segments([3, 4])
    wide = torch.randn(7, 20)
    a = wide[:, :5]
    b = torch.randn(2, 6, 5)
    try:
        c = F.grouped_gemm(a, b, offsets, backend="cpu")
    except ValueError as e:  # either works or names the argument
        assert "'a'" in str(e)
    else:
        assert_close(c, ref.grouped_gemm(a, b, offsets))


def test_grouped_gemm_transposed_b_raises():
    offsets = segments([3, 4])
    b = torch.randn(2, 5, 6).transpose(1, 2)  # [E, 6, 5], not contiguous
    with pytest.raises(ValueError, match="'b'"):
        F.grouped_gemm(torch.randn(7, 5), b, offsets, backend="cpu")


@pytest.mark.parametrize("trans_b", [True, False])
def test_grouped_gemm_gradcheck(trans_b):
    offsets = segments([2, 0, 3])
    a = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)  # one row past offsets[E]
    b = torch.randn(3, 5, 4, dtype=torch.float64) if trans_b else torch.randn(3, 4, 5, dtype=torch.float64)
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: F.grouped_gemm(x, w, offsets, trans_b=trans_b, backend="cpu"), (a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_backward_matches_reference(dtype):
    offsets = segments([6, 0, 10, 1])
    a0 = torch.randn(17, 8).to(dtype)
    b0 = (torch.randn(4, 5, 8) / 3).to(dtype)
    g = torch.randn(17, 5).to(dtype)
    grads = []
    for backend in ("cpu", "reference"):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        F.grouped_gemm(a, b, offsets, backend=backend).backward(g)
        grads.append((a.grad, b.grad))
    assert_close(grads[0][0], grads[1][0])
    assert_close(grads[0][1], grads[1][1])
    assert torch.count_nonzero(grads[0][1][1]) == 0  # empty expert: exact zero weight gradient


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: F.grouped_gemm(torch.randn(4), torch.randn(1, 3, 4), segments([4])), ValueError, "'a'.*2-D"),
        (lambda: F.grouped_gemm(torch.randn(4, 4), torch.randn(3, 4), segments([4])), ValueError, "'b'.*3-D"),
        (lambda: F.grouped_gemm(torch.randn(4, 4), torch.randn(1, 3, 5), segments([4])), ValueError, "'b'.*Kd"),
        (lambda: F.grouped_gemm(torch.randn(4, 4), torch.randn(2, 3, 4), segments([4])), ValueError, "'b'.*E"),
        (
            lambda: F.grouped_gemm(torch.randn(4, 4), torch.randn(1, 3, 4).double(), segments([4])),
            ValueError,
            "'b'.*dtype",
        ),
        (
            lambda: F.grouped_gemm(torch.randn(4, 4), torch.randn(1, 3, 4), segments([4]).int()),
            ValueError,
            "'offsets'.*i64",
        ),
        (
            lambda: F.grouped_gemm(torch.randn(4, 4), torch.randn(1, 3, 4, device="meta"), segments([4])),
            ValueError,
            "'b'.*meta",
        ),
        (lambda: F.activation(torch.randn(4, 5), kind="swiglu"), ValueError, "'x'.*even"),
        (lambda: F.activation(torch.randn(4, 6), kind="tanh"), ValueError, "'kind'"),
        (lambda: F.activation(torch.randn(6), kind="relu"), ValueError, "'x'.*2-D"),
    ],
)
def test_gemm_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_grouped_gemm_bad_offsets_raise():
    # offsets decreasing or past R are data errors the core reports without touching memory.
    with pytest.raises(ValueError, match="'offsets'"):
        F.grouped_gemm(torch.randn(4, 4), torch.randn(2, 3, 4), torch.tensor([0, 3, 2]), backend="cpu")
    with pytest.raises(ValueError, match="'offsets'"):
        F.grouped_gemm(torch.randn(4, 4), torch.randn(2, 3, 4), torch.tensor([0, 3, 9]), backend="cpu")


# ---- activation ----------------------------------------------------------------------------------

KINDS = ["swiglu", "geglu", "gelu", "relu"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("R", [0, 1, 7, 4097])
def test_activation_matches_reference(kind, dtype, R):
    x = (3 * torch.randn(R, 16)).to(dtype)
    y = F.activation(x, kind=kind, backend="cpu")
    assert y.dtype == dtype and y.shape == (R, 8 if kind in ("swiglu", "geglu") else 16)
    assert_close(y, ref.activation(x, kind=kind))


@pytest.mark.parametrize("kind", KINDS)
def test_activation_gradcheck_and_backward(kind):
    x = torch.randn(5, 6, dtype=torch.float64)
    x = torch.where(x.abs() < 0.05, x + 0.2, x).requires_grad_()  # relu: keep away from the kink
    assert torch.autograd.gradcheck(lambda t: F.activation(t, kind=kind, backend="cpu"), (x,))
    for dtype in (torch.float32, torch.bfloat16):
        a = x.detach().to(dtype).requires_grad_()
        b = x.detach().to(dtype).requires_grad_()
        g = torch.randn(5, 3 if kind in ("swiglu", "geglu") else 6).to(dtype)
        F.activation(a, kind=kind, backend="cpu").backward(g)
        ref.activation(b, kind=kind).backward(g)
        assert_close(a.grad, b.grad)


def test_gemm_deterministic():
    offsets = segments([1000, 0, 1500, 17])
    a = torch.randn(2517, 64)
    b = torch.randn(4, 48, 64)
    outs = []
    for _ in range(2):
        x, w = a.clone().requires_grad_(), b.clone().requires_grad_()
        c = F.activation(F.grouped_gemm(x, w, offsets), kind="swiglu")
        c.square().sum().backward()
        outs.append((c, x.grad, w.grad))
    for p, q in zip(*outs):
        assert torch.equal(p, q)

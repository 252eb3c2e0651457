"""routing_plan, permute and combine through smoe.functional: cpu backend vs smoe.reference."""

from __future__ import annotations

import pytest
import smoe
import smoe.functional as F
import smoe.reference as ref
import torch
from conftest import FLOAT_DTYPES, small_ints
from smoe.testing import assert_close


def random_experts(T: int, E: int, K: int, skew: str = "uniform") -> torch.Tensor:
    """experts [T, K] i32 with K distinct experts per token (as top-k gives)."""
    if T == 0:
        return torch.zeros(0, K, dtype=torch.int32)
    if skew == "one":  # every token on the first K experts (expert 0 gets all tokens at k = 0)
        return torch.arange(K, dtype=torch.int32).repeat(T, 1)
    if skew == "skewed":  # a few experts take most tokens; many stay empty
        weights = torch.tensor([2.0 ** -(e % 12) for e in range(E)])
        return torch.stack([torch.multinomial(weights, K, replacement=False) for _ in range(T)]).int()
    return torch.argsort(torch.rand(T, E), dim=1)[:, :K].int()


def assert_plan_equal(plan, want):
    assert plan.counts.dtype == torch.int32 and plan.offsets.dtype == torch.int64
    assert plan.row_of.dtype == torch.int32 and plan.token_of_row.dtype == torch.int32
    for name in ("counts", "offsets", "row_of", "token_of_row"):
        got, exp = getattr(plan, name), getattr(want, name)
        assert got.shape == exp.shape, name
        assert torch.equal(got, exp), name


PLAN_CASES = [  # (T, E, K, skew)
    (0, 4, 2, "uniform"),
    (1, 1, 1, "uniform"),
    (7, 7, 7, "uniform"),  # K = E
    (7, 300, 2, "uniform"),  # E > 256: most experts empty
    (4097, 8, 2, "uniform"),
    (4097, 8, 2, "one"),
    (257, 33, 4, "skewed"),
]


@pytest.mark.parametrize("T,E,K,skew", PLAN_CASES)
@pytest.mark.parametrize(
    "capacity,drop_policy,pad",
    [(None, "token_order", 1), (None, "token_order", 8), (3, "token_order", 1), (3, "score", 4), (0, "token_order", 1)],
)
def test_routing_plan_matches_reference(T, E, K, skew, capacity, drop_policy, pad):
    experts = random_experts(T, E, K, skew)
    weights = torch.randint(0, 4, (T, K)).float() / 4  # ties in the weights on purpose
    kw = dict(num_experts=E, capacity=capacity, drop_policy=drop_policy, pad_multiple=pad)
    plan = F.routing_plan(experts, weights=weights, backend="cpu", **kw)
    want = ref.routing_plan(experts, weights=weights, **kw)
    assert_plan_equal(plan, want)
    R_max = F.routing_plan_max_rows(T, K, num_experts=E, capacity=capacity, pad_multiple=pad)
    assert plan.token_of_row.shape == (R_max,)
    assert int(plan.num_rows) == int(plan.offsets[-1]) <= R_max


def test_routing_plan_max_rows_agrees_with_core():
    lib = smoe._core.lib()
    for T, K, E, C, pad in [
        (0, 2, 4, -1, 1),
        (7, 2, 3, -1, 8),
        (100, 8, 256, 5, 16),
        (5, 1, 10, 1000, 1),
        (9, 3, 4, 0, 2),
    ]:
        want = lib.routing_plan_max_rows(num_experts=E, capacity=C, drop_policy=0, pad_multiple=pad, T=T, K=K)
        got = F.routing_plan_max_rows(T, K, num_experts=E, capacity=None if C < 0 else C, pad_multiple=pad)
        assert got == want


def test_routing_plan_layout_by_hand():
    # Written out by hand: 3 tokens, top-2, 3 experts, capacity 2 by token order, padding 2.
    experts = torch.tensor([[0, 1], [0, 2], [0, 1]], dtype=torch.int32)
    plan = F.routing_plan(experts, num_experts=3, capacity=2, pad_multiple=2, backend="cpu")
    assert plan.counts.tolist() == [2, 2, 1]
    assert plan.offsets.tolist() == [0, 2, 4, 6]
    assert plan.row_of.tolist() == [[0, 2], [1, 4], [-1, 3]]
    # R_max = min(T*K, E*C) + E*(pad - 1) = 6 + 3 = 9 rows; rows past offsets[E] hold -1
    assert plan.token_of_row.tolist() == [0, 1, 0, 2, 1, -1, -1, -1, -1]


def test_routing_plan_drop_by_score_keeps_best_in_token_order():
    experts = torch.zeros(5, 1, dtype=torch.int32)
    weights = torch.tensor([[0.1], [0.9], [0.5], [0.9], [0.2]])
    plan = F.routing_plan(experts, num_experts=1, weights=weights, capacity=2, drop_policy="score", backend="cpu")
    assert plan.row_of.flatten().tolist() == [-1, 0, -1, 1, -1]  # the two 0.9s, ties to the lower token
    assert plan.token_of_row[:2].tolist() == [1, 3]


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: F.routing_plan(torch.zeros(4, dtype=torch.int32), num_experts=2), ValueError, "'experts'.*2-D"),
        (lambda: F.routing_plan(torch.zeros(4, 2), num_experts=2), ValueError, "'experts'.*i32"),
        (lambda: F.routing_plan(torch.full((4, 2), 2, dtype=torch.int32), num_experts=2), ValueError, "'experts'"),
        (lambda: F.routing_plan(torch.zeros(4, 2, dtype=torch.int32), num_experts=0), ValueError, "'num_experts'"),
        (
            lambda: F.routing_plan(torch.zeros(4, 2, dtype=torch.int32), num_experts=2, pad_multiple=0),
            ValueError,
            "'pad_multiple'",
        ),
        (
            lambda: F.routing_plan(torch.zeros(4, 2, dtype=torch.int32), num_experts=2, capacity=-3),
            ValueError,
            "'capacity'",
        ),
        (
            lambda: F.routing_plan(torch.zeros(4, 2, dtype=torch.int32), num_experts=2, drop_policy="random"),
            ValueError,
            "'drop_policy'",
        ),
        (
            lambda: F.routing_plan(
                torch.zeros(4, 2, dtype=torch.int32), num_experts=2, capacity=1, drop_policy="score"
            ),
            ValueError,
            "'weights'",
        ),
        (
            lambda: F.routing_plan(torch.zeros(4, 2, dtype=torch.int32), num_experts=2, weights=torch.zeros(4, 3)),
            ValueError,
            "'weights'",
        ),
        (
            lambda: F.routing_plan(
                torch.zeros(4, 2, dtype=torch.int32), num_experts=2, weights=torch.zeros(4, 2, device="meta")
            ),
            ValueError,
            "'weights'.*meta",
        ),
        (lambda: F.routing_plan(torch.zeros(4, 2, dtype=torch.int32), num_experts=2.0), TypeError, "'num_experts'"),
    ],
)
def test_routing_plan_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- permute / combine ---------------------------------------------------------------------------


def make_plan(T, E, K, skew="uniform", capacity=None, pad=1):
    experts = random_experts(T, E, K, skew)
    return F.routing_plan(experts, num_experts=E, capacity=capacity, pad_multiple=pad, backend="cpu")


@pytest.mark.parametrize("T,E,K,skew", PLAN_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_permute_and_combine_match_reference(T, E, K, skew, dtype):
    H = 3 if T > 1000 else 16
    plan = make_plan(T, E, K, skew, capacity=3 if skew == "skewed" else None, pad=4)
    x = torch.randn(T, H).to(dtype)
    xs = F.permute(x, plan, backend="cpu")
    assert torch.equal(xs, ref.permute(x, plan))  # a copy: exact, zeros in padding rows
    ys = torch.randn(xs.shape[0], H).to(dtype)
    w = torch.rand(T, K, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    y = F.combine(ys, w, plan, backend="cpu")
    assert y.dtype == dtype and y.shape == (T, H)
    assert_close(y, ref.combine(ys, w, plan))
    assert torch.equal(F.combine(ys, w, plan.row_of, backend="cpu"), y)  # plan or its row_of


def test_combine_is_exact_on_small_integers():
    plan = make_plan(50, 6, 3)
    ys = small_ints(plan.token_of_row.shape[0], 8)
    w = small_ints(50, 3)
    assert torch.equal(F.combine(ys, w, plan, backend="cpu"), ref.combine(ys, w, plan))


def test_permute_then_combine_roundtrip():
    # With weights 1 and top-1 dropless, combine(permute(x)) is x exactly.
    T, E = 33, 5
    plan = make_plan(T, E, 1, pad=8)
    x = torch.randn(T, 7)
    y = F.combine(F.permute(x, plan), torch.ones(T, 1), plan)
    assert torch.equal(y, x)


def test_permute_row_strided_x_and_transposed_x():
    plan = make_plan(9, 4, 2)
    wide = torch.randn(9, 20)
    x = wide[:, :6]
    assert torch.equal(F.permute(x, plan, backend="cpu"), F.permute(x.contiguous(), plan, backend="cpu"))
    with pytest.raises(ValueError, match="'x'"):
        F.permute(torch.randn(6, 9).t(), plan, backend="cpu")


def test_combine_non_contiguous_ys_raises():
    plan = make_plan(9, 4, 2)
    ys = torch.randn(16, plan.token_of_row.shape[0]).t()
    with pytest.raises(ValueError, match="'ys'"):
        F.combine(ys, torch.rand(9, 2), plan, backend="cpu")


def test_permute_combine_gradcheck():
    plan = make_plan(7, 4, 2, capacity=3, pad=2)  # dropped assignments and padding rows
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: F.permute(t, plan, backend="cpu"), (x,))
    ys = torch.randn(plan.token_of_row.shape[0], 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(7, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: F.combine(a, b, plan, backend="cpu"), (ys, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_combine_backward_matches_reference(dtype):
    plan = make_plan(40, 6, 2, capacity=12, pad=4)
    x0 = torch.randn(40, 8).to(dtype)
    w0 = torch.rand(40, 2)
    gy = torch.randn(40, 8).to(dtype)
    grads = []
    for backend in ("cpu", "reference"):
        x = x0.clone().requires_grad_()
        w = w0.clone().requires_grad_()
        xs = F.permute(x, plan, backend=backend)
        y = F.combine(xs * 2, w, plan, backend=backend)
        (y.float() * gy.float()).sum().backward()
        grads.append((x.grad, w.grad))
    assert grads[0][0].dtype == dtype
    assert_close(grads[0][0], grads[1][0])
    assert_close(grads[0][1], grads[1][1], dtype=dtype)  # dot products of dtype rows, in f32


def test_combine_expert_choice_layout():
    # expert choice: row_of [T, E], weights [T, E], rows e*C + c.
    logits = torch.randn(12, 3)
    w, tokens, row_of, _ = F.expert_choice(logits, capacity=4, backend="cpu")
    ys = torch.randn(12, 5)
    assert_close(F.combine(ys, w, row_of, backend="cpu"), ref.combine(ys, w, row_of))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda p: F.permute(torch.randn(9), p), ValueError, "'x'.*2-D"),
        (lambda p: F.permute(torch.randn(9, 4).int(), p), ValueError, "'x'.*dtype"),
        (lambda p: F.permute(torch.randn(9, 4), (1, 2)), TypeError, "'plan'"),
        (lambda p: F.permute(torch.randn(9, 4, device="meta"), p), ValueError, "plan.token_of_row|'x'"),
        (lambda p: F.combine(torch.randn(p.token_of_row.shape[0], 4), torch.rand(9, 3), p), ValueError, "'weights'"),
        (
            lambda p: F.combine(torch.randn(p.token_of_row.shape[0], 4), torch.rand(9, 2).double(), p),
            ValueError,
            "'weights'.*f32",
        ),
        (
            lambda p: F.combine(torch.randn(p.token_of_row.shape[0], 4), torch.rand(9, 2), p.row_of.long()),
            ValueError,
            "'row_of'.*i32",
        ),
        (lambda p: F.combine(torch.randn(4), torch.rand(9, 2), p), ValueError, "'ys'.*2-D"),
    ],
)
def test_permute_combine_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(make_plan(9, 4, 2))


def test_routing_deterministic():
    experts = random_experts(4097, 16, 2, "skewed")
    weights = torch.rand(4097, 2)
    x = torch.randn(4097, 8)
    outs = []
    for _ in range(2):
        plan = F.routing_plan(
            experts, num_experts=16, weights=weights, capacity=600, drop_policy="score", pad_multiple=8
        )
        xs = F.permute(x, plan)
        outs.append(tuple(plan) + (xs, F.combine(xs, weights, plan)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---- one crossing per routing_plan: R_max and the workspace come from Python (issue 8) ------------


@pytest.mark.parametrize("policy", ["token_order", "score"])
def test_routing_plan_workspace_bytes_equal_the_cpp_query(policy):
    from smoe.ops import routing

    lib = smoe._core.lib()
    code = smoe.ops.DROP_POLICIES[policy]
    for T in (0, 1, 5, 64, 4097, 40_000, 300_000, 2**29):
        for K in (0, 1, 2, 8):
            for E in (1, 3, 64, 300):
                for cap in (-1, 0, 7, 10**6):
                    for pad in (1, 8, 2**20):
                        want = lib.routing_plan_workspace_bytes(
                            num_experts=E, capacity=cap, drop_policy=code, pad_multiple=pad, T=T, K=K
                        )
                        got = routing.workspace_bytes(T, K, E, cap, policy, pad)
                        assert got == want, (T, K, E, cap, pad, policy)


def test_routing_plan_is_one_crossing(monkeypatch):
    names = []
    real = smoe._core.lib()

    class Spy:
        def __getattr__(self, name):
            names.append(name)
            return getattr(real, name)

    monkeypatch.setattr(smoe._core, "lib", lambda: Spy())
    experts = torch.randint(0, 4, (33, 2), dtype=torch.int32)
    F.routing_plan(
        experts,
        num_experts=4,
        weights=torch.rand(33, 2),
        capacity=5,
        drop_policy="score",
        pad_multiple=4,
        backend="cpu",
    )
    assert names == ["routing_plan"]

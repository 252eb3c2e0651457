"""The gating op family through smoe.functional: cpu backend vs smoe.reference, gradients, bad input."""

from __future__ import annotations

import pytest
import smoe.functional as F
import smoe.reference as ref
import torch
from conftest import FLOAT_DTYPES, distinct_logits, tied_logits
from smoe.testing import assert_close

ACC = {torch.float64: torch.float64}


def acc(dtype):
    return ACC.get(dtype, torch.float32)


def check_topk_against_reference(logits, **kw):
    w, e, s = F.topk_gating(logits, backend="cpu", **kw)
    rw, re_, rs = ref.topk_gating(logits, **kw)
    assert w.dtype == acc(logits.dtype) and s.dtype == acc(logits.dtype) and e.dtype == torch.int32
    assert torch.equal(e, re_)  # integers exactly, ties to the lower expert index
    # scores/weights are computed in f32 (f64) from the same inputs: the table row of that dtype
    assert_close(s, rs)
    assert_close(w, rw)
    return w, e, s


# ---- topk_gating forward -------------------------------------------------------------------------

SHAPES = [  # (T, E, K): T in {0, 1, 7, 4097}, E = 1 / odd / > 256, K = 1 and K = E
    (0, 8, 2),
    (1, 1, 1),
    (7, 7, 1),
    (7, 7, 7),
    (7, 300, 8),
    (7, 300, 300),
    (4097, 8, 2),
    (33, 64, 20),  # K above the insertion-sort limit of the CPU backend
]


@pytest.mark.parametrize("T,E,K", SHAPES)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_topk_gating_shapes(T, E, K, score_func):
    logits = distinct_logits(T, E)
    w, e, s = check_topk_against_reference(logits, top_k=K, score_func=score_func)
    assert w.shape == (T, K) and e.shape == (T, K) and s.shape == (T, E)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_gating_dtypes(dtype, renormalize):
    logits = distinct_logits(65, 60, dtype=dtype)
    check_topk_against_reference(logits, top_k=4, renormalize=renormalize, routed_scaling=2.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_gating_ties_go_to_lower_expert(dtype):
    logits = tied_logits(200, 13, dtype=dtype)
    _, e, _ = check_topk_against_reference(logits, top_k=5)
    # A row of equal logits picks experts 0..K-1 in order.
    _, e_flat, _ = F.topk_gating(torch.zeros(3, 9, dtype=dtype), top_k=4, backend="cpu")
    assert e_flat.tolist() == [[0, 1, 2, 3]] * 3


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
def test_topk_gating_grouped_with_bias_deepseek_v3(group_score):
    # DeepSeek-V3's router: sigmoid, 256 experts in 8 groups, 4 groups kept, top-8, selection bias,
    # renormalised with eps 1e-20, scaled by 2.5.
    T, E = 37, 256
    logits = distinct_logits(T, E, spacing=0.05)
    bias = (torch.randint(-8, 9, (E,)) / 64.0).float()
    kw = dict(
        top_k=8,
        score_func="sigmoid",
        bias=bias,
        n_groups=8,
        topk_groups=4,
        group_score=group_score,
        renormalize=True,
        renorm_eps=1e-20,
        routed_scaling=2.5,
    )
    w, e, s = check_topk_against_reference(logits, **kw)
    # Picked experts lie in at most topk_groups groups, and the weights use the unbiased scores.
    assert int((e // 32).sort(dim=1).values.unique_consecutive(dim=1).shape[1]) <= 8
    groups_per_token = [len(set((row // 32).tolist())) for row in e]
    assert max(groups_per_token) <= 4
    picked = s.gather(1, e.long())
    assert_close(w, 2.5 * picked / picked.sum(dim=1, keepdim=True))


def test_topk_gating_bias_changes_selection_not_weights():
    logits = distinct_logits(16, 6)
    bias = torch.zeros(6)
    bias[5] = 10.0  # expert 5 always wins the selection
    w, e, s = F.topk_gating(logits, top_k=2, bias=bias, backend="cpu")
    assert (e[:, 0] == 5).all()
    assert_close(w[:, 0], s[:, 5])


def test_topk_gating_row_strided_logits():
    wide = distinct_logits(9, 20)
    logits = wide[:, :12]  # rows padded: stride(0) = 20
    assert not logits.is_contiguous()
    w, e, s = F.topk_gating(logits, top_k=3, backend="cpu")
    w2, e2, s2 = F.topk_gating(logits.contiguous(), top_k=3, backend="cpu")
    assert torch.equal(e, e2) and torch.equal(w, w2) and torch.equal(s, s2)


def test_topk_gating_transposed_logits_raise():
    logits = distinct_logits(8, 5).t()  # [5, 8] with stride(1) != 1
    with pytest.raises(ValueError, match="'logits'.*dense rows"):
        F.topk_gating(logits, top_k=2, backend="cpu")


def test_topk_gating_reference_and_auto_backends():
    logits = distinct_logits(10, 6)
    w_auto, e_auto, _ = F.topk_gating(logits, top_k=2)
    w_ref, e_ref, _ = F.topk_gating(logits, top_k=2, backend="reference")
    assert torch.equal(e_auto, e_ref)
    assert_close(w_auto, w_ref)


# ---- topk_gating gradients -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=2),
        dict(top_k=3, score_func="sigmoid"),
        dict(top_k=2, renormalize=True, routed_scaling=1.5),
        dict(
            top_k=3,
            score_func="sigmoid",
            renormalize=True,
            renorm_eps=0.1,
            n_groups=3,
            topk_groups=2,
            group_score="top2_sum",
        ),
        dict(top_k=6),  # K = E
    ],
)
def test_topk_gating_gradcheck(kw):
    logits = distinct_logits(5, 6, dtype=torch.float64, spacing=0.3).requires_grad_()

    def fn(x):
        w, _, s = F.topk_gating(x, backend="cpu", **kw)
        return w, s

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("use", ["weights", "scores", "both"])
def test_topk_gating_backward_matches_reference(dtype, use):
    kw = dict(top_k=3, renormalize=True, routed_scaling=2.0)
    logits = distinct_logits(40, 10, dtype=dtype)
    gw = torch.randn(40, 3, dtype=acc(dtype))
    gs = torch.randn(40, 10, dtype=acc(dtype))
    grads = []
    for fn in (lambda x: F.topk_gating(x, backend="cpu", **kw), lambda x: ref.topk_gating(x, **kw)):
        x = logits.clone().requires_grad_()
        w, _, s = fn(x)
        loss = 0
        if use in ("weights", "both"):
            loss = loss + (w * gw).sum()
        if use in ("scores", "both"):
            loss = loss + (s * gs).sum()
        loss.backward()
        grads.append(x.grad)
    assert grads[0].dtype == dtype
    assert_close(grads[0], grads[1])


# ---- expert_choice -------------------------------------------------------------------------------


@pytest.mark.parametrize("T,E,C", [(1, 1, 1), (7, 3, 7), (7, 300, 2), (64, 8, 16), (4097, 4, 100)])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_expert_choice_matches_reference(T, E, C, score_func):
    # distinct logits across the whole tensor: the token ranking inside a column has no ties
    logits = (torch.randperm(T * E).reshape(T, E).double() * (8.0 / (T * E)) - 4).float()
    w, tok, row, s = F.expert_choice(logits, capacity=C, score_func=score_func, backend="cpu")
    rw, rtok, rrow, rs = ref.expert_choice(logits, capacity=C, score_func=score_func)
    assert tok.shape == (E, C) and row.shape == (T, E)
    assert torch.equal(tok, rtok) and torch.equal(row, rrow)
    assert_close(s, rs)
    assert_close(w, rw)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_expert_choice_ties_and_dtypes(dtype):
    logits = tied_logits(50, 7, dtype=dtype)
    w, tok, row, s = F.expert_choice(logits, capacity=9, backend="cpu")
    rw, rtok, rrow, rs = ref.expert_choice(logits, capacity=9)
    assert torch.equal(tok, rtok) and torch.equal(row, rrow)
    assert_close(w, rw)


def test_expert_choice_gradcheck():
    logits = (torch.randperm(30).reshape(6, 5).double() * 0.2).requires_grad_()

    def fn(x):
        w, _, _, s = F.expert_choice(x, capacity=3, backend="cpu")
        return w, s

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8)
    sig = lambda x: F.expert_choice(x, capacity=2, score_func="sigmoid", backend="cpu")[0]  # noqa: E731
    assert torch.autograd.gradcheck(sig, (logits,), eps=1e-6, atol=1e-8)


def test_expert_choice_backward_matches_reference():
    logits = torch.randperm(200).reshape(40, 5).float() * 0.05
    gw, gs = torch.randn(40, 5), torch.randn(40, 5)
    grads = []
    for fn in (lambda x: F.expert_choice(x, capacity=10, backend="cpu"), lambda x: ref.expert_choice(x, capacity=10)):
        x = logits.clone().requires_grad_()
        w, _, _, s = fn(x)
        ((w * gw).sum() + (s * gs).sum()).backward()
        grads.append(x.grad)
    assert_close(grads[0], grads[1])


# ---- losses and the bias update ------------------------------------------------------------------


@pytest.mark.parametrize("T,E,K", [(0, 4, 2), (1, 1, 1), (7, 7, 7), (4097, 8, 2), (50, 300, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_load_balancing_loss_matches_reference(T, E, K, dtype):
    probs = torch.softmax(torch.randn(T, E, dtype=dtype), dim=1)
    experts = (
        torch.stack([torch.randperm(E)[:K] for _ in range(T)]).int() if T else torch.zeros(0, K, dtype=torch.int32)
    )
    loss = F.load_balancing_loss(probs, experts, backend="cpu")
    assert loss.shape == () and loss.dtype == dtype
    assert_close(loss, ref.load_balancing_loss(probs, experts))
    if T == 0:
        assert loss.item() == 0.0


def test_load_balancing_loss_known_values():
    # Perfect balance with uniform probs gives exactly K (HF Mixtral's form, E * sum f_e P_e = E * K/E * ... ).
    T, E, K = 8, 4, 2
    probs = torch.full((T, E), 1.0 / E)
    experts = torch.tensor([[t % E, (t + 1) % E] for t in range(T)], dtype=torch.int32)
    assert F.load_balancing_loss(probs, experts, backend="cpu").item() == pytest.approx(K * 1.0)
    # All tokens on expert 0 with all probability there: E * K * 1.
    probs = torch.zeros(T, E)
    probs[:, 0] = 1
    experts = torch.zeros(T, 1, dtype=torch.int32)
    assert F.load_balancing_loss(probs, experts, backend="cpu").item() == pytest.approx(E * 1.0)


def test_load_balancing_loss_gradcheck_and_backward():
    probs = torch.softmax(torch.randn(9, 5, dtype=torch.float64), 1).requires_grad_()
    experts = torch.randint(0, 5, (9, 2), dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda p: F.load_balancing_loss(p, experts, backend="cpu"), (probs,))
    p1 = probs.detach().clone().requires_grad_()
    p2 = probs.detach().clone().requires_grad_()
    (3 * F.load_balancing_loss(p1, experts, backend="cpu")).backward()
    (3 * ref.load_balancing_loss(p2, experts)).backward()
    assert_close(p1.grad, p2.grad)


@pytest.mark.parametrize("T,E", [(0, 3), (1, 1), (7, 300), (4097, 8)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_z_loss_matches_reference(T, E, dtype):
    logits = torch.randn(T, E).to(dtype)
    loss = F.z_loss(logits, backend="cpu")
    assert loss.shape == () and loss.dtype == acc(dtype)
    assert_close(loss, ref.z_loss(logits))


def test_z_loss_gradcheck_and_backward():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: F.z_loss(x, backend="cpu"), (logits,))
    for dtype in (torch.float32, torch.bfloat16):
        a = logits.detach().to(dtype).requires_grad_()
        b = logits.detach().to(dtype).requires_grad_()
        (2 * F.z_loss(a, backend="cpu")).backward()
        (2 * ref.z_loss(b)).backward()
        assert a.grad.dtype == dtype
        assert_close(a.grad, b.grad)


@pytest.mark.parametrize("E", [1, 7, 300])
def test_balancing_bias_update_matches_reference(E):
    counts = torch.randint(0, 50, (E,), dtype=torch.int32)
    counts[0] = int(counts.float().mean().round())  # some expert possibly at the mean
    bias = torch.randn(E)
    b_cpu, b_ref = bias.clone(), bias.clone()
    F.balancing_bias_update(counts, b_cpu, rate=1e-3, backend="cpu")
    ref.balancing_bias_update(counts, b_ref, rate=1e-3)
    assert torch.equal(b_cpu, b_ref)  # a sign times the rate: exact


def test_balancing_bias_update_direction():
    counts = torch.tensor([10, 0, 5], dtype=torch.int32)  # mean 5
    bias = torch.zeros(3)
    F.balancing_bias_update(counts, bias, rate=0.5)
    assert bias.tolist() == [-0.5, 0.5, 0.0]


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: F.topk_gating(torch.randn(8), top_k=1), ValueError, "'logits'.*2-D"),
        (lambda: F.topk_gating(torch.randint(0, 3, (4, 8)).int(), top_k=1), ValueError, "'logits'.*dtype"),
        (lambda: F.topk_gating([[1.0, 2.0]], top_k=1), TypeError, "'logits'"),
        (lambda: F.topk_gating(torch.randn(4, 8), top_k=9), ValueError, "'top_k'.*\\[1, 8\\]"),
        (lambda: F.topk_gating(torch.randn(4, 8), top_k=0), ValueError, "'top_k'"),
        (lambda: F.topk_gating(torch.randn(4, 8), top_k=2, bias=torch.zeros(7)), ValueError, "'bias'.*E"),
        (
            lambda: F.topk_gating(torch.randn(4, 8), top_k=2, bias=torch.zeros(8, dtype=torch.float64)),
            ValueError,
            "'bias'.*f32",
        ),
        (
            lambda: F.topk_gating(torch.randn(4, 8), top_k=2, bias=torch.zeros(8, device="meta")),
            ValueError,
            "'bias'.*device|'bias'.*meta",
        ),
        (lambda: F.topk_gating(torch.randn(4, 8), top_k=2, score_func="tanh"), ValueError, "'score_func'"),
        (lambda: F.topk_gating(torch.randn(4, 8), top_k=2, group_score="sum"), ValueError, "'group_score'"),
        (lambda: F.topk_gating(torch.randn(4, 8), top_k=2, n_groups=3), ValueError, "n_groups"),
        (lambda: F.topk_gating(torch.randn(4, 8), top_k=2, n_groups=4, topk_groups=5), ValueError, "topk_groups"),
        (lambda: F.topk_gating(torch.randn(4, 8), top_k=5, n_groups=4, topk_groups=2), ValueError, "top_k"),
        (
            lambda: F.topk_gating(torch.randn(4, 8), top_k=2, renorm_eps=-1.0, renormalize=True),
            ValueError,
            "renorm_eps",
        ),
        (lambda: F.topk_gating(torch.randn(4, 8), top_k=2, backend="tpu"), ValueError, "'backend'"),
        (
            lambda: F.topk_gating(torch.randn(4, 8), top_k=2, backend="cuda"),
            RuntimeError,
            "'cuda' is not in this build",
        ),
        (lambda: F.expert_choice(torch.randn(4, 8), capacity=5), ValueError, "'capacity'"),
        (lambda: F.expert_choice(torch.randn(4, 8), capacity=0), ValueError, "'capacity'"),
        (
            lambda: F.load_balancing_loss(torch.rand(4, 8), torch.zeros(5, 2, dtype=torch.int32)),
            ValueError,
            "'experts'.*T",
        ),
        (lambda: F.load_balancing_loss(torch.rand(4, 8), torch.zeros(4, 2)), ValueError, "'experts'.*i32"),
        (
            lambda: F.load_balancing_loss(torch.rand(4, 8), torch.full((4, 2), 8, dtype=torch.int32)),
            ValueError,
            "'experts'.*\\[0, E\\)",
        ),
        (
            lambda: F.load_balancing_loss(torch.rand(4, 8).bfloat16(), torch.zeros(4, 2, dtype=torch.int32)),
            ValueError,
            "'probs'.*f32",
        ),
        (lambda: F.z_loss(torch.randn(3, 0)), ValueError, "'logits'"),
        (
            lambda: F.balancing_bias_update(torch.zeros(4, dtype=torch.int32), torch.zeros(5), rate=0.1),
            ValueError,
            "'bias'",
        ),
        (lambda: F.balancing_bias_update(torch.zeros(4), torch.zeros(4), rate=0.1), ValueError, "'counts'.*i32"),
        (
            lambda: F.balancing_bias_update(torch.tensor([1, -1], dtype=torch.int32), torch.zeros(2), rate=0.1),
            ValueError,
            "'counts'",
        ),
    ],
)
def test_gating_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("op", ["topk_gating", "expert_choice", "z_loss"])
def test_nan_logits_are_rejected(op):
    logits = torch.randn(6, 4)
    logits[3, 2] = float("nan")
    call = {
        "topk_gating": lambda: F.topk_gating(logits, top_k=2, backend="cpu"),
        "expert_choice": lambda: F.expert_choice(logits, capacity=2, backend="cpu"),
        "z_loss": lambda: F.z_loss(logits, backend="cpu"),
    }[op]
    with pytest.raises(ValueError, match="'logits'.*NaN in row 3"):
        call()


# ---- determinism ---------------------------------------------------------------------------------


def test_gating_deterministic_across_runs():
    logits = torch.randn(2049, 64)
    results = []
    for _ in range(2):
        w, e, s = F.topk_gating(logits, top_k=4, renormalize=True, backend="cpu")
        x = logits.clone().requires_grad_()
        w2, _, s2 = F.topk_gating(x, top_k=4, backend="cpu")
        (w2.sum() + s2.square().sum() + F.z_loss(x, backend="cpu")).backward()
        results.append((w, e, s, x.grad, F.load_balancing_loss(s, e, backend="cpu")))
    for a, b in zip(*results):
        assert torch.equal(a, b)

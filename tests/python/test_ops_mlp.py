"""expert_mlp (the fused entry point) and shared_expert: cpu backend vs smoe.reference."""

from __future__ import annotations

import pytest
import smoe.functional as F
import smoe.reference as ref
import torch
from conftest import FLOAT_DTYPES, distinct_logits
from smoe.testing import assert_close

GATED = ("swiglu", "geglu")


def weights_for(E, H, Fd, activation, dtype=torch.float32, scale=0.3):
    F1 = 2 * Fd if activation in GATED else Fd
    w1 = (scale * torch.randn(E, F1, H)).to(dtype)
    w2 = (scale * torch.randn(E, H, Fd)).to(dtype)
    return w1, w2


def plan_for(T, E, K, capacity=None, pad=1, skew=False):
    logits = distinct_logits(T, E)
    if skew:
        logits[:, 0] += 100.0  # every token picks expert 0 first
    _, experts, _ = F.topk_gating(logits, top_k=K, backend="cpu")
    return F.routing_plan(experts, num_experts=E, capacity=capacity, pad_multiple=pad, backend="cpu")


CASES = [  # T, E, K, capacity, pad, skew
    (0, 4, 2, None, 1, False),
    (1, 1, 1, None, 1, False),
    (7, 7, 7, None, 4, False),  # K = E, padding
    (7, 300, 2, None, 1, False),  # most experts empty
    (33, 5, 2, 4, 2, True),  # capacity drops, every token on expert 0
    (4097, 4, 1, None, 8, False),
]


@pytest.mark.parametrize("T,E,K,capacity,pad,skew", CASES)
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
def test_expert_mlp_matches_reference(T, E, K, capacity, pad, skew, activation):
    H, Fd = (4, 3) if T > 1000 else (8, 6)
    plan = plan_for(T, E, K, capacity, pad, skew)
    x = torch.randn(T, H)
    w1, w2 = weights_for(E, H, Fd, activation)
    ys = F.expert_mlp(x, w1, w2, plan, activation=activation, backend="cpu")
    assert ys.shape == (plan.token_of_row.shape[0], H)
    assert_close(ys, ref.expert_mlp(x, w1, w2, plan, activation=activation))
    assert torch.count_nonzero(ys[plan.token_of_row < 0]) == 0  # padding and unused rows are zero


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_expert_mlp_dtypes(dtype):
    plan = plan_for(40, 6, 2, pad=4)
    x = torch.randn(40, 16).to(dtype)
    w1, w2 = weights_for(6, 16, 12, "swiglu", dtype)
    ys = F.expert_mlp(x, w1, w2, plan, backend="cpu")
    assert ys.dtype == dtype
    # The reference rounds to dtype at the same points as the core (after each stored stage).
    assert_close(ys, ref.expert_mlp(x, w1, w2, plan))


def test_expert_mlp_gradcheck():
    plan = plan_for(6, 3, 2, capacity=3, pad=2)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w1 = (0.5 * torch.randn(3, 10, 4, dtype=torch.float64)).requires_grad_()
    w2 = (0.5 * torch.randn(3, 4, 5, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: F.expert_mlp(a, b, c, plan, backend="cpu"), (x, w1, w2))
    w1g = (0.5 * torch.randn(3, 5, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c: F.expert_mlp(a, b, c, plan, activation="gelu", backend="cpu"), (x, w1g, w2)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_mlp_backward_matches_reference(dtype):
    plan = plan_for(50, 7, 2, capacity=18, pad=4)
    x0 = torch.randn(50, 8).to(dtype)
    w10, w20 = weights_for(7, 8, 6, "swiglu", dtype)
    weights = torch.rand(50, 2)
    grads = []
    for backend in ("cpu", "reference"):
        x, w1, w2 = (t.clone().requires_grad_() for t in (x0, w10, w20))
        y = F.combine(F.expert_mlp(x, w1, w2, plan, backend=backend), weights, plan, backend=backend)
        y.float().square().sum().backward()
        grads.append((x.grad, w1.grad, w2.grad))
    for got, want in zip(*grads):
        assert got.dtype == dtype
        # bf16: the gradients pass through several bf16 roundings in both paths; the bf16 row of the
        # table holds for each, tested on the maximum magnitude to allow for cancellation.
        if dtype == torch.bfloat16:
            assert_close(got.float() / want.float().abs().max(), want.float() / want.float().abs().max(), dtype=dtype)
        else:
            assert_close(got, want)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda p, w1, w2: F.expert_mlp(torch.randn(9), w1, w2, p), ValueError, "'x'.*2-D"),
        (lambda p, w1, w2: F.expert_mlp(torch.randn(9, 8), w1[:, :5], w2, p), ValueError, "'w1'"),
        (lambda p, w1, w2: F.expert_mlp(torch.randn(9, 8), w1, w2.double(), p), ValueError, "'w2'"),
        (lambda p, w1, w2: F.expert_mlp(torch.randn(9, 7), w1, w2, p), ValueError, "'w2'.*H|'w1'.*H"),
        (lambda p, w1, w2: F.expert_mlp(torch.randn(9, 8), w1[:3], w2[:3], p), ValueError, "'w2'.*E"),
        (lambda p, w1, w2: F.expert_mlp(torch.randn(9, 8), w1, w2, p, activation="silu"), ValueError, "'activation'"),
        (lambda p, w1, w2: F.expert_mlp(torch.randn(9, 8), w1, w2, p.row_of), TypeError, "'plan'"),
        (lambda p, w1, w2: F.expert_mlp(torch.randn(9, 8), w1.to("meta"), w2, p), ValueError, "'w1'.*meta"),
    ],
)
def test_expert_mlp_bad_input(call, exc, match):
    w1, w2 = weights_for(4, 8, 6, "swiglu")
    with pytest.raises(exc, match=match):
        call(plan_for(9, 4, 2), w1, w2)


# ---- shared expert -------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [0, 1, 7, 4097])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_shared_expert_matches_reference(T, gated, activation):
    H, Fd = (4, 3) if T > 1000 else (8, 5)
    x = torch.randn(T, H)
    w1, w2 = (t[0] for t in weights_for(1, H, Fd, activation))
    gate_w = torch.randn(H) if gated else None
    out = F.shared_expert(x, w1, w2, gate_w, activation=activation, backend="cpu")
    assert out.shape == (T, H)
    assert_close(out, ref.shared_expert(x, w1, w2, gate_w, activation=activation))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_shared_expert_dtypes(dtype):
    x = torch.randn(30, 16).to(dtype)
    w1, w2 = (t[0] for t in weights_for(1, 16, 8, "swiglu", dtype))
    gate_w = torch.randn(16).to(dtype)
    out = F.shared_expert(x, w1, w2, gate_w, backend="cpu")
    assert out.dtype == dtype
    assert_close(out, ref.shared_expert(x, w1, w2, gate_w))


@pytest.mark.parametrize("gated", [False, True])
def test_shared_expert_gradcheck_and_backward(gated):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w1 = (0.5 * torch.randn(6, 4, dtype=torch.float64)).requires_grad_()
    w2 = (0.5 * torch.randn(4, 3, dtype=torch.float64)).requires_grad_()
    inputs = (x, w1, w2) + ((torch.randn(4, dtype=torch.float64, requires_grad=True),) if gated else ())
    assert torch.autograd.gradcheck(lambda *a: F.shared_expert(*a, backend="cpu"), inputs)
    grads = []
    for backend in ("cpu", "reference"):
        leaves = [t.detach().float().requires_grad_() for t in inputs]
        F.shared_expert(*leaves, backend=backend).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        assert_close(got, want)


def test_shared_expert_bad_input():
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="'gate_w'"):
        F.shared_expert(x, torch.randn(6, 4), torch.randn(4, 3), torch.randn(5))
    with pytest.raises(ValueError, match="'w1'"):
        F.shared_expert(x, torch.randn(6, 5), torch.randn(4, 3))
    with pytest.raises(ValueError, match="'w2'.*2-D"):
        F.shared_expert(x, torch.randn(6, 4), torch.randn(1, 4, 3))


def test_mlp_deterministic():
    plan = plan_for(1025, 8, 2, pad=16)
    x0 = torch.randn(1025, 32)
    w10, w20 = weights_for(8, 32, 24, "swiglu")
    outs = []
    for _ in range(2):
        x, w1, w2 = (t.clone().requires_grad_() for t in (x0, w10, w20))
        y = F.expert_mlp(x, w1, w2, plan) + 0  # [R, H]
        z = F.shared_expert(x, w1[0], w2[0], x0[0])
        (y.square().sum() + z.square().sum()).backward()
        outs.append((y, z, x.grad, w1.grad, w2.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---- scratch reuse and gradient handling (smoe.ops._scratch, set_materialize_grads(False)) -----------


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_expert_mlp_without_saved_matches_and_does_not_alias(activation):
    """need_saved=False keeps pre/act in the reused per-thread scratch: ys is the same bits as with
    need_saved=True, the saved outputs come back empty, and a second call never overwrites the first ys.
    (There is no xs output any more: x is read through token_of_row, see test_expert_mlp_saves_no_copy_of_x.)"""
    T, E, K, H, Fd = 19, 5, 2, 24, 40
    plan = plan_for(T, E, K, pad=4)
    w1, w2 = weights_for(E, H, Fd, activation)
    x1, x2 = torch.randn(T, H), torch.randn(T, H)
    args = (plan.token_of_row, plan.offsets, plan.row_of, w1, w2, activation, "cpu")
    ys_saved, pre, act = torch.ops.smoe.expert_mlp(x1, *args, True)
    assert pre.numel() > 0 and act.numel() > 0
    ys1, *empties = torch.ops.smoe.expert_mlp(x1, *args, False)
    assert all(t.numel() == 0 for t in empties)
    assert torch.equal(ys1, ys_saved)
    keep = ys1.clone()
    ys2 = torch.ops.smoe.expert_mlp(x2, *args, False)[0]
    assert torch.equal(ys1, keep)  # not overwritten through the scratch
    assert ys1.data_ptr() != ys2.data_ptr()
    assert torch.equal(ys2, torch.ops.smoe.expert_mlp(x2, *args, True)[0])
    with torch.no_grad():  # the functional entry point picks need_saved=False here
        assert torch.equal(F.expert_mlp(x1, w1, w2, plan, activation=activation, backend="cpu"), ys_saved)


def test_expert_mlp_saves_no_copy_of_x():
    """The op saves pre [R, F1] and act [R, F] and references (no copies) to x, the plan and the weights:
    no [R, H] permuted x is saved, and the tensors it allocates for backward are exactly pre and act."""
    T, E, K, H, Fd = 13, 4, 2, 24, 10
    plan = plan_for(T, E, K, pad=2)
    w1, w2 = weights_for(E, H, Fd, "swiglu")
    x = torch.randn(T, H, requires_grad=True)
    w1.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ys = F.expert_mlp(x, w1, w2, plan, activation="swiglu", backend="cpu")
    R = plan.token_of_row.shape[0]
    inputs = (x, w1, w2, plan.token_of_row, plan.row_of, plan.offsets)
    fresh = [
        t for t in saved if not any(t.untyped_storage().data_ptr() == i.untyped_storage().data_ptr() for i in inputs)
    ]
    assert sorted(tuple(t.shape) for t in fresh) == sorted([(R, 2 * Fd), (R, Fd)])
    assert not any(tuple(t.shape) == (R, H) for t in saved)
    ys.square().sum().backward()  # and the backward works from these alone
    assert x.grad is not None and w1.grad is not None


@pytest.mark.parametrize("gated", [False, True])
def test_shared_expert_saves_out_only_when_gated(gated):
    """The ungated shared expert's output equals the y it adds, and its backward never reads it: the op
    saves pre and act only; the gated one also keeps out [T, H] (for the gate's gradient) and gate [T]."""
    T, H, Fd = 9, 16, 12
    x = torch.randn(T, H, requires_grad=True)
    w1 = (torch.randn(2 * Fd, H) * 0.3).requires_grad_(True)
    w2 = (torch.randn(H, Fd) * 0.3).requires_grad_(True)
    gate_w = (torch.randn(H) * 0.3).requires_grad_(True) if gated else None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = F.shared_expert(x, w1, w2, gate_w, backend="cpu")
    inputs = [t for t in (x, w1, w2, gate_w) if t is not None]
    fresh = [tuple(t.shape) for t in saved if t.numel() > 0 and not any(t._cdata == i._cdata for i in inputs)]
    want = [(T, 2 * Fd), (T, Fd)] + ([(T, H), (T,)] if gated else [])
    assert sorted(fresh) == sorted(want)
    y.square().sum().backward()
    yr = ref.shared_expert(x, w1, w2, gate_w)
    grads = torch.autograd.grad(yr.square().sum(), inputs)
    for t, g in zip(inputs, grads):
        assert_close(t.grad, g)


def test_expert_mlp_need_saved_false_with_grad_raises():
    plan = plan_for(7, 3, 2)
    w1, w2 = weights_for(3, 8, 6, "swiglu")
    x = torch.randn(7, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="need_saved=False"):
        torch.ops.smoe.expert_mlp(x, plan.token_of_row, plan.offsets, plan.row_of, w1, w2, "swiglu", "cpu", False)


def test_expert_mlp_backward_twice_reuses_scratch():
    """Two backward passes in a row (the second reuses the first's workspace) give the same gradients."""
    T, E, K, H, Fd = 33, 5, 2, 16, 12
    plan = plan_for(T, E, K, capacity=4, pad=2, skew=True)
    w1, w2 = weights_for(E, H, Fd, "swiglu")
    x = torch.randn(T, H)
    grads = []
    for _ in range(2):
        xg, w1g, w2g = (t.clone().requires_grad_(True) for t in (x, w1, w2))
        F.expert_mlp(xg, w1g, w2g, plan, backend="cpu").square().sum().backward()
        grads.append((xg.grad, w1g.grad, w2g.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
        assert a.data_ptr() != b.data_ptr()


def test_gating_backward_from_weights_only_or_scores_only():
    """Without materialised zero gradients, a loss on the weights alone or on the scores alone still
    gives the reference gradient (the unused one reaches the core as None)."""
    logits = distinct_logits(11, 6).requires_grad_(True)
    for pick in (0, 2):
        lg, lr = logits.detach().clone().requires_grad_(True), logits.detach().clone().requires_grad_(True)
        out = F.topk_gating(lg, top_k=2, renormalize=True, backend="cpu")
        out_ref = ref.topk_gating(lr, top_k=2, renormalize=True)
        out[pick].square().sum().backward()
        out_ref[pick].square().sum().backward()
        assert_close(lg.grad, lr.grad)


# ---- top-1 inference: the combine in the second GEMM's epilogue (issue 13) ---------------------------


@pytest.mark.parametrize("backend", ["cpu", "simt"])
@pytest.mark.parametrize(
    "T,E,capacity,pad,skew",
    [
        (0, 4, None, 1, False),
        (1, 1, None, 1, False),
        (9, 7, None, 4, False),
        (33, 5, 4, 2, True),
        (20, 40, None, 1, False),
    ],
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_expert_mlp_combine_top1_matches_unfused(backend, T, E, capacity, pad, skew, dtype):
    import smoe

    if backend not in smoe.BACKENDS or (backend == "simt" and dtype == torch.float64):
        pytest.skip(f"{backend} {dtype}")
    H, Fd = 16, 24
    plan = plan_for(T, E, 1, capacity, pad, skew)
    x = torch.randn(T, H).to(dtype)
    w1, w2 = weights_for(E, H, Fd, "swiglu", dtype)
    wacc = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.rand(T, 1, dtype=wacc) + 0.25
    want = F.combine(F.expert_mlp(x, w1, w2, plan, backend=backend), weights, plan, backend=backend).to(dtype)
    got = smoe.ops.expert_mlp_combine_top1(x, w1, w2, weights, plan, backend=backend)
    assert got.shape == x.shape and got.dtype == dtype
    # not bitwise on the device backends in bf16/f16: ys is not rounded before it is weighted
    assert_close(got, want)
    dropped = (plan.row_of[:, 0] < 0).nonzero().flatten()
    assert torch.count_nonzero(got[dropped]) == 0  # dropped tokens: zeros
    if skew:
        assert dropped.numel() > 0


def test_expert_mlp_combine_top1_workspace_size_matches_core():
    from smoe import _core
    from smoe.ops.mlp import _combine_top1_workspace_bytes

    for act in ("swiglu", "gelu"):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for R, H, Fd in ((0, 0, 0), (1, 3, 5), (37, 16, 24)):
                core = _core.lib().expert_mlp_combine_top1_workspace_bytes(
                    act=smoe_activation_code(act), dtype=_core.DTYPE_CODES[dtype], R=R, H=H, F=Fd
                )
                assert _combine_top1_workspace_bytes(act, dtype, R, H, Fd) == core


def smoe_activation_code(act):
    from smoe.ops._common import ACTIVATIONS

    return ACTIVATIONS[act]


def test_expert_mlp_combine_top1_refuses_gradients_and_top2():
    import smoe

    plan1, plan2 = plan_for(8, 4, 1), plan_for(8, 4, 2)
    x = torch.randn(8, 8, requires_grad=True)
    w1, w2 = weights_for(4, 8, 6, "swiglu")
    with pytest.raises(ValueError, match="computes no gradient"):
        smoe.ops.expert_mlp_combine_top1(x, w1, w2, torch.ones(8, 1), plan1, backend="cpu")
    with pytest.raises(ValueError, match=r"argument 'plan.row_of': expected \[T, 1\]"):
        smoe.ops.expert_mlp_combine_top1(x.detach(), w1, w2, torch.ones(8, 1), plan2, backend="cpu")
    with pytest.raises(ValueError, match="argument 'weights'"):
        smoe.ops.expert_mlp_combine_top1(
            x.detach(), w1, w2, torch.ones(8, 1, dtype=torch.float64), plan1, backend="cpu"
        )

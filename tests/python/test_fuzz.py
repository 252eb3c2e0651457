"""Fuzz test of every public op of smoe.functional (issue 9).

Hypothesis draws shapes (zeros included), strides (transposed, sliced, expanded, padded rows), dtypes,
values (small multiples of 1/4, so that sums are exact, and infinities where the op defines them) and
arguments (out of range, wrong types, unknown names). Each call must give the result of
smoe.reference, gradients included, or raise ValueError/TypeError naming an argument; never crash,
hang or return garbage. pytest's faulthandler prints the stack of a crash. Bounded: derandomized,
a fixed number of examples per op.
"""

from __future__ import annotations

import re

import pytest
import smoe
import smoe.functional as F
import torch
from smoe.testing import assert_close

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
from hypothesis import HealthCheck, given, settings  # noqa: E402

BACKENDS = ["cpu", "simt"] if "simt" in smoe.BACKENDS else ["cpu"]
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# mostly dense (the ops read dense rows, padded rows allowed); sometimes strided, which most ops reject
LAYOUTS = ["contiguous"] * 8 + ["padded", "transposed", "sliced", "expanded"]
FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# "argument 'x'" / "argument 'plan.row_of'": every error of the ops names what it is about
NAMES_ARGUMENT = re.compile(r"argument '[\w.]+'")
# Documented limits of the emulated CUDA backend (docs/cuda.md): raised as RuntimeError naming the limit
SIMT_LIMITS = re.compile(r"f64 tensors run on the CPU backend only")


def _mostly(draw, good, *bad):
    """`good` (a strategy) five times in six, else one of the `bad` values."""
    if not bad or draw(st.integers(0, 5)) < 5:
        return draw(good)
    return draw(st.sampled_from(bad))


def _tensor(draw, shape, dtype, *, low=-8, high=8, layout=None, scale=0.25):
    """A tensor of `shape` whose values are scale * integers in [low, high], in a drawn memory layout."""
    layout = layout or draw(st.sampled_from(LAYOUTS))
    shape = tuple(shape)

    def values(s):
        n = 1
        for d in s:
            n *= d
        ints = (
            draw(st.lists(st.integers(low, high), min_size=n, max_size=n))
            if n <= 256
            else torch.randint(low, high + 1, (n,)).tolist()
        )
        t = torch.tensor(ints, dtype=torch.float64 if dtype.is_floating_point else torch.int64).reshape(s)
        return (t * scale if dtype.is_floating_point else t).to(dtype)

    if layout == "transposed" and len(shape) >= 2:
        return values(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "sliced" and len(shape) >= 1:
        return values(shape[:-1] + (2 * shape[-1],))[..., ::2]
    if layout == "expanded" and len(shape) >= 1 and shape[0] > 0:
        return values((1,) + shape[1:]).expand(shape)
    if layout == "padded" and len(shape) == 2:
        return values((shape[0], shape[1] + 3))[:, : shape[1]]
    return values(shape)


def _call(backend, smoe_fn, ref_fn):
    """smoe_fn() on `backend` against ref_fn(); None when smoe rejected the input properly."""
    try:
        got = smoe_fn(backend)
    except (ValueError, TypeError) as e:
        assert NAMES_ARGUMENT.search(str(e)), f"error does not name an argument: {type(e).__name__}: {e}"
        return None
    except RuntimeError as e:
        if backend == "simt" and SIMT_LIMITS.search(str(e)):
            return None
        raise
    want = ref_fn()
    _compare(got, want)
    return got, want


def _compare(got, want):
    if isinstance(got, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _compare(g, w)
        return
    if got is None or want is None:
        assert got is None and want is None
        return
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.dtype.is_floating_point:
        assert_close(got, want.to(got.dtype), dtype=got.dtype if got.dtype != torch.float64 else torch.float32)
    else:
        assert torch.equal(got.long(), want.long())


def _grads(fn, inputs, seed=0):
    """Gradients of sum(out * fixed weights) w.r.t. the float inputs (None where there is none)."""
    leaves = [
        t.detach().clone().requires_grad_(t.dtype.is_floating_point) if isinstance(t, torch.Tensor) else t
        for t in inputs
    ]
    out = fn(*leaves)
    outs = [
        o
        for o in (out if isinstance(out, (tuple, list)) else [out])
        if isinstance(o, torch.Tensor) and o.dtype.is_floating_point and o.requires_grad
    ]
    if not outs:
        return None
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randint(-2, 3, o.shape, generator=g).float()).sum() for o in outs)
    loss.backward()
    return [t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]


def _check_with_grads(backend, fn, inputs):
    """fn(*inputs, backend=...) against the reference: outputs, then input gradients."""
    res = _call(backend, lambda b: fn(*inputs, backend=b), lambda: fn(*inputs, backend="reference"))
    if res is None:
        return
    if not any(isinstance(t, torch.Tensor) and t.dtype.is_floating_point for t in inputs):
        return
    try:
        got = _grads(lambda *a: fn(*a, backend=backend), inputs)
    except RuntimeError as e:  # e.g. simt's f64 permute (a byte copy) has no f64 backward
        if backend == "simt" and SIMT_LIMITS.search(str(e)):
            return
        raise
    want = _grads(lambda *a: fn(*a, backend="reference"), inputs)
    if got is None or want is None:
        return
    for g, w in zip(got, want):
        if w is None or g is None:
            assert g is None or not g.any() or w is None, "gradient where the reference has none"
            continue
        _compare(g, w)


dtypes = st.sampled_from(FLOATS)


def fuzz_op(test):
    """test(backend, data) on every C++ backend, FUZZ examples each."""
    return pytest.mark.parametrize("backend", BACKENDS)(FUZZ(given(data=st.data())(test)))


# ---- gating and losses ------------------------------------------------------------------------------


@fuzz_op
def test_fuzz_topk_gating(backend, data):
    draw = data.draw
    T, E = draw(st.integers(0, 9)), draw(st.integers(1, 9))
    logits = _tensor(draw, (T, E), draw(dtypes))
    groups = _mostly(draw, st.sampled_from([g for g in (1, 2, 3) if E % g == 0]), 4, 2**31, 2.0)
    per_group = E // groups if isinstance(groups, int) and 0 < groups <= E else E
    topk_groups = _mostly(draw, st.integers(1, groups if isinstance(groups, int) and groups <= E else 1), 0, 2**40)
    allowed = per_group * topk_groups if isinstance(topk_groups, int) and topk_groups < 2**31 else E
    top_k = _mostly(draw, st.integers(1, max(1, min(E, allowed))), 0, E + 1, 2**33, 1.0)
    kwargs = dict(
        top_k=top_k,
        score_func=_mostly(draw, st.sampled_from(["softmax", "sigmoid"]), "bad", None),
        n_groups=groups,
        topk_groups=topk_groups,
        renormalize=draw(st.booleans()),
        group_score=_mostly(draw, st.sampled_from(["max", "top2_sum"]), "sum"),
    )
    if draw(st.booleans()):
        kwargs["bias"] = _tensor(draw, (_mostly(draw, st.just(E), E + 1),), torch.float32, layout="contiguous")
    _check_with_grads(backend, lambda x, backend: F.topk_gating(x, backend=backend, **kwargs), [logits])


@fuzz_op
def test_fuzz_expert_choice(backend, data):
    draw = data.draw
    T, E = draw(st.integers(0, 9)), draw(st.integers(1, 6))
    logits = _tensor(draw, (T, E), draw(dtypes))
    capacity = _mostly(draw, st.integers(1, max(T, 1)), 0, T + 1, 2**40, 1.5)
    score_func = draw(st.sampled_from(["softmax", "sigmoid"]))
    _check_with_grads(
        backend,
        lambda x, backend: F.expert_choice(x, capacity=capacity, score_func=score_func, backend=backend),
        [logits],
    )


@fuzz_op
def test_fuzz_losses(backend, data):
    draw = data.draw
    T, E, K = draw(st.integers(0, 9)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    probs = _tensor(draw, (T, E), dtype, low=0, high=4)
    experts = _tensor(draw, (T, K), torch.int32, low=0, high=E - 1)
    _check_with_grads(backend, lambda p, e, backend: F.load_balancing_loss(p, e, backend=backend), [probs, experts])
    logits = _tensor(draw, (T, E), dtype)
    if T > 0 and draw(st.booleans()):  # infinities: logsumexp of the row is +inf (or -inf), z^2 = inf
        logits = logits.contiguous()
        logits[draw(st.integers(0, T - 1))] = draw(st.sampled_from([float("inf"), float("-inf")]))
        _call(backend, lambda b: F.z_loss(logits, backend=b), lambda: F.z_loss(logits, backend="reference"))
    else:
        _check_with_grads(backend, lambda x, backend: F.z_loss(x, backend=backend), [logits])


@fuzz_op
def test_fuzz_balancing_bias_update(backend, data):
    draw = data.draw
    E = draw(st.integers(0, 9))
    counts = _tensor(draw, (E,), torch.int32, low=0, high=9)
    bias = _tensor(
        draw,
        (_mostly(draw, st.just(E), E + 1),),
        _mostly(draw, st.just(torch.float32), torch.float64),
        layout="contiguous",
    )
    rate = draw(st.sampled_from([0.0, 0.25, 1.0]))
    got, want = bias.clone(), bias.clone()

    def run(b):
        F.balancing_bias_update(counts, got, rate=rate, backend=b)
        return got

    def ref():
        F.balancing_bias_update(counts, want, rate=rate, backend="reference")
        return want

    _call(backend, run, ref)


# ---- routing ------------------------------------------------------------------------------------------


@FUZZ
@given(
    T=st.integers(-3, 2**40),
    K=st.integers(-2, 64),
    E=st.integers(-2, 2**32),
    cap=st.one_of(st.none(), st.integers(-2, 2**62)),
    pad=st.integers(-1, 2**32),
)
def test_fuzz_routing_plan_max_rows(T, K, E, cap, pad):
    try:
        got = F.routing_plan_max_rows(T, K, num_experts=E, capacity=cap, pad_multiple=pad)
    except (ValueError, TypeError) as e:
        assert NAMES_ARGUMENT.search(str(e)), str(e)
        return
    want = smoe._core.lib().routing_plan_max_rows(
        num_experts=E, capacity=-1 if cap is None else cap, drop_policy=0, pad_multiple=pad, T=T, K=K
    )
    assert got == min(want, 2**63 - 1)


def _plan_inputs(draw, T, K, E):
    experts = (
        torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32)
        if T > 0
        else torch.zeros(0, K, dtype=torch.int32)
    )
    return experts.reshape(T, K)


@fuzz_op
def test_fuzz_routing_plan(backend, data):
    draw = data.draw
    T, E = draw(st.integers(0, 9)), draw(st.integers(1, 6))
    K = draw(st.integers(0, E))
    experts = _plan_inputs(draw, T, K, E)
    if draw(st.integers(0, 5)) == 0:
        experts = _tensor(draw, (T, K), torch.int32, low=-1, high=E)  # ids possibly outside [0, E)
    policy = _mostly(draw, st.sampled_from(["token_order", "score"]), "bad")
    weights = _tensor(draw, (T, K), torch.float32, low=0, high=16, layout="contiguous") if policy == "score" else None
    kwargs = dict(
        num_experts=_mostly(draw, st.just(E), 0, E - 1, 2**31),
        capacity=_mostly(draw, st.one_of(st.none(), st.integers(0, T + 1)), -1, 2**64),
        drop_policy=policy,
        pad_multiple=_mostly(draw, st.integers(1, 4), 0, 2**33),
    )
    n = kwargs["num_experts"]
    if backend == "simt" and isinstance(n, int) and bool(((experts < 0) | (experts >= n)).any()):
        return  # the device rule for bad ids differs by design (docs/cuda.md): not comparable
    _call(
        backend,
        lambda b: tuple(F.routing_plan(experts, weights=weights, backend=b, **kwargs)),
        lambda: tuple(F.routing_plan(experts, weights=weights, backend="reference", **kwargs)),
    )


def _plan(T, K, E, pad=1):
    experts = _plan_inputs(None, T, K, E)
    return F.routing_plan(experts, num_experts=E, pad_multiple=pad, backend="reference")


@fuzz_op
def test_fuzz_permute_combine(backend, data):
    draw = data.draw
    T, E, H = draw(st.integers(0, 7)), draw(st.integers(1, 5)), draw(st.integers(0, 6))
    K = draw(st.integers(1, E))
    plan = _plan(T, K, E, pad=draw(st.integers(1, 3)))
    dtype = draw(dtypes)
    x = _tensor(draw, (_mostly(draw, st.just(T), T + 1), H), dtype)
    as_tuple = draw(st.booleans())
    p = tuple(plan) if as_tuple else plan
    _check_with_grads(backend, lambda x, backend: F.permute(x, p, backend=backend), [x])
    R = plan.token_of_row.shape[0]
    ys = _tensor(draw, (R, H), dtype)
    weights = _tensor(draw, (T, K), draw(st.sampled_from([torch.float32, torch.float64])))
    row_of = plan if draw(st.booleans()) else plan.row_of
    _check_with_grads(backend, lambda y, w, backend: F.combine(y, w, row_of, backend=backend), [ys, weights])


# ---- experts --------------------------------------------------------------------------------------------


def _offsets(draw, R, E):
    cuts = sorted(draw(st.lists(st.integers(0, R), min_size=max(E - 1, 0), max_size=max(E - 1, 0))))
    return torch.tensor([0, *cuts, R][: E + 1] if E > 0 else [0], dtype=torch.int64)


@fuzz_op
def test_fuzz_grouped_gemm(backend, data):
    draw = data.draw
    R, Kd, N, E = draw(st.integers(0, 7)), draw(st.integers(0, 5)), draw(st.integers(0, 5)), draw(st.integers(1, 4))
    trans_b = draw(st.booleans())
    dtype = draw(dtypes)
    a = _tensor(draw, (R, Kd), dtype)
    b = _tensor(draw, (E, N, Kd) if trans_b else (E, Kd, N), _mostly(draw, st.just(dtype), torch.float32))
    offsets = _offsets(draw, R, E)
    _check_with_grads(
        backend, lambda a, b, backend: F.grouped_gemm(a, b, offsets, trans_b=trans_b, backend=backend), [a, b]
    )


@fuzz_op
def test_fuzz_activation(backend, data):
    draw = data.draw
    kind = _mostly(draw, st.sampled_from(["swiglu", "geglu", "gelu", "relu"]), "bad")
    x = _tensor(draw, (draw(st.integers(0, 6)), draw(st.integers(0, 7))), draw(dtypes))
    _check_with_grads(backend, lambda x, backend: F.activation(x, kind=kind, backend=backend), [x])


@fuzz_op
def test_fuzz_expert_mlp(backend, data):
    draw = data.draw
    T, E, H, Fs = draw(st.integers(0, 6)), draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    K = draw(st.integers(1, E))
    act = draw(st.sampled_from(["swiglu", "geglu", "gelu", "relu"]))
    F1 = 2 * Fs if act in ("swiglu", "geglu") else Fs
    dtype = draw(dtypes)
    plan = _plan(T, K, E, pad=draw(st.integers(1, 2)))
    x = _tensor(draw, (T, H), dtype)
    w1 = _tensor(draw, (E, _mostly(draw, st.just(F1), F1 + 1), H), dtype)
    w2 = _tensor(draw, (E, H, Fs), dtype)
    _check_with_grads(
        backend, lambda x, w1, w2, backend: F.expert_mlp(x, w1, w2, plan, activation=act, backend=backend), [x, w1, w2]
    )


@fuzz_op
def test_fuzz_shared_expert(backend, data):
    draw = data.draw
    T, H, Fs = draw(st.integers(0, 6)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    act = draw(st.sampled_from(["swiglu", "geglu", "gelu", "relu"]))
    F1 = 2 * Fs if act in ("swiglu", "geglu") else Fs
    dtype = draw(dtypes)
    x = _tensor(draw, (T, H), dtype)
    w1 = _tensor(draw, (F1, H), dtype)
    w2 = _tensor(draw, (H, _mostly(draw, st.just(Fs), Fs + 1)), dtype)
    inputs = [x, w1, w2]
    if draw(st.booleans()):
        inputs.append(_tensor(draw, (H,), dtype))
    _check_with_grads(backend, lambda *a, backend: F.shared_expert(*a, activation=act, backend=backend), inputs)

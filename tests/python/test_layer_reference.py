"""smoe.reference.moe_layer (the oracle of test_layer.py) against independent formulations:
dense sums over all experts, hand-computed losses, a per-assignment counting loop for capacity."""

import math

import pytest
import torch
from smoe.reference import moe_layer
from smoe.testing import assert_close

H, F = 16, 12


def _weights(E, seed=0, gated=True):
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(E, H, generator=g) * 0.5
    w1 = torch.randn(E, (2 if gated else 1) * F, H, generator=g) * 0.3
    w2 = torch.randn(E, H, F, generator=g) * 0.3
    return router, w1, w2


def _dense_expert(x, w1, w2):  # SwiGLU written out, no chunk
    return (torch.nn.functional.silu(x @ w1[:F].t()) * (x @ w1[F:].t())) @ w2.t()


def test_top_k_equal_to_e_is_the_dense_mixture():
    E = 5
    router, w1, w2 = _weights(E)
    x = torch.randn(9, H)
    out = moe_layer(x, router, w1, w2, top_k=E)
    p = torch.softmax(x @ router.t(), dim=-1)
    want = sum(p[:, e : e + 1] * _dense_expert(x, w1[e], w2[e]) for e in range(E))
    assert_close(out.y, want)
    assert torch.equal(out.tokens_per_expert, torch.full((E,), 9))


def test_top1_picks_the_argmax_expert():
    E = 6
    router, w1, w2 = _weights(E, seed=1)
    x = torch.randn(11, H)
    out = moe_layer(x, router, w1, w2, top_k=1, score_func="sigmoid", routed_scaling=2.0)
    logits = x @ router.t()
    best = logits.argmax(dim=-1)
    assert torch.equal(out.experts[:, 0], best)
    want = torch.stack(
        [
            2.0 * torch.sigmoid(logits[t, best[t]]) * _dense_expert(x[t : t + 1], w1[best[t]], w2[best[t]])[0]
            for t in range(11)
        ]
    )
    assert_close(out.y, want)


def test_expert_choice_with_full_capacity_is_dense():
    E = 4
    router, w1, w2 = _weights(E, seed=2)
    x = torch.randn(6, H)
    out = moe_layer(x, router, w1, w2, top_k=1, expert_choice=True, capacity=6)
    p = torch.softmax(x @ router.t(), dim=-1)
    want = sum(p[:, e : e + 1] * _dense_expert(x, w1[e], w2[e]) for e in range(E))
    assert_close(out.y, want)
    assert out.kept.all()


def test_uniform_router_losses_and_ties():
    """Zero router weights: every score is 1/E; ties go to the lower expert, so every token picks 0..K-1.
    Load-balancing loss = E * sum_{e<K} (T/T) * (1/E) = K; z-loss = log(E)^2."""
    E, K, T = 6, 2, 10
    _, w1, w2 = _weights(E)
    out = moe_layer(torch.randn(T, H), torch.zeros(E, H), w1, w2, top_k=K)
    assert torch.equal(out.experts, torch.tensor([[0, 1]] * T))
    assert_close(out.aux_loss, torch.tensor(float(K)))
    assert_close(out.z_loss, torch.tensor(math.log(E) ** 2))


def _kept_by_counting(experts, weights, E, C, policy):
    T, K = experts.shape
    assignments = [(t * K + k, int(experts[t, k]), float(weights[t, k])) for t in range(T) for k in range(K)]
    if policy == "score":
        assignments.sort(key=lambda a: (-a[2], a[0]))
    used = [0] * E
    kept = torch.zeros(T * K, dtype=torch.bool)
    for flat, e, _ in assignments:
        if used[e] < C:
            used[e] += 1
            kept[flat] = True
    return kept.view(T, K)


@pytest.mark.parametrize("policy", ["token_order", "score"])
def test_capacity_matches_a_counting_loop(policy):
    E, K, T, C = 4, 2, 15, 5
    router, w1, w2 = _weights(E, seed=3)
    router[0] += 2.0  # skew: expert 0 overflows
    x = torch.randn(T, H)
    out = moe_layer(x, router, w1, w2, top_k=K, renormalize=True, capacity=C, drop_policy=policy)
    want = _kept_by_counting(out.experts, out.weights, E, C, policy)
    assert torch.equal(out.kept, want)
    assert int(out.dropped) == int((~want).sum()) > 0
    y = torch.zeros(T, H)
    for t in range(T):
        for k in range(K):
            if want[t, k]:
                e = int(out.experts[t, k])
                y[t] += out.weights[t, k] * _dense_expert(x[t : t + 1], w1[e], w2[e])[0]
    assert_close(out.y, y)


def test_group_limited_choice_stays_in_the_best_groups():
    E, G, TG, K = 12, 4, 2, 3
    router, w1, w2 = _weights(E, seed=4)
    x = torch.randn(20, H)
    out = moe_layer(x, router, w1, w2, top_k=K, score_func="sigmoid", n_groups=G, topk_groups=TG, group_score="max")
    s = torch.sigmoid(x @ router.t()).view(20, G, E // G)
    best_groups = s.max(dim=-1).values.topk(TG, dim=-1).indices
    for t in range(20):
        groups = set((out.experts[t] // (E // G)).tolist())
        assert groups <= set(best_groups[t].tolist())
        allowed = torch.cat([torch.arange(g * 3, g * 3 + 3) for g in best_groups[t].tolist()])
        want = allowed[torch.sigmoid(x[t] @ router[allowed].t()).topk(K).indices]
        assert set(out.experts[t].tolist()) == set(want.tolist())


def test_bias_changes_choice_not_weight():
    E = 5
    router, w1, w2 = _weights(E, seed=5)
    x = torch.randn(8, H)
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0])
    out = moe_layer(x, router, w1, w2, top_k=2, score_func="sigmoid", bias=bias)
    assert (out.experts == 3).any(dim=1).all()
    assert_close(out.weights, torch.sigmoid(x @ router.t()).gather(1, out.experts))


def test_gated_shared_expert():
    E = 3
    router, w1, w2 = _weights(E, seed=6)
    sw1, sw2 = torch.randn(2 * F, H) * 0.3, torch.randn(H, F) * 0.3
    gate = torch.randn(H)
    x = torch.randn(5, H)
    base = moe_layer(x, router, w1, w2, top_k=2)
    out = moe_layer(x, router, w1, w2, top_k=2, shared_w1=sw1, shared_w2=sw2, shared_gate_w=gate)
    assert_close(out.y, base.y + torch.sigmoid(x @ gate)[:, None] * _dense_expert(x, sw1, sw2))

"""smoe.nn's submodules on their own: MoEArgs, Router (against smoe.functional.topk_gating /
expert_choice on the same logits), RoutedExperts, SharedExpert; the state-dict keys of the layer before
the split (flat w1 / expert_bias / shared_w1 ...) loading into it; T = 0 going through the ops."""

import dataclasses
import re

import pytest
import smoe
import smoe.functional as F
import torch
from smoe.nn import MoE, MoEArgs, RoutedExperts, Router, SharedExpert, expert_choice_plan
from smoe.testing import assert_close

H, FF, E, K = 16, 12, 8, 2


# ------------------------------------------------------------------ MoEArgs
def test_args_validate_like_the_layer():
    for kwargs, msg in [
        (dict(top_k=9), "top_k must be <= num_experts (8), got 9"),
        (dict(activation="tanh"), "activation must be one of"),
        (dict(n_groups=3), "n_groups must divide num_experts (8), got 3"),
        (dict(shared_gate=True), "shared_gate=True needs num_shared_experts >= 1"),
        (dict(capacity_factor=1e300), "capacity_factor must be <="),
        (dict(expert_choice=True, aux_loss_coef=0.1), "aux_loss_coef must be 0 with expert_choice"),
    ]:
        args = dict(hidden_size=H, ffn_size=FF, num_experts=E, top_k=K)
        args.update(kwargs)
        with pytest.raises(ValueError, match=re.escape(msg)):
            MoEArgs(**args)
        with pytest.raises(ValueError, match=re.escape(msg)):
            MoE(**args)


def test_args_resolve_and_freeze():
    a = MoEArgs(H, FF, E, K, num_shared_experts=2)
    assert a.renormalize is True and a.shared_ffn_size == 2 * FF and a.ffn_rows == 2 * FF
    assert MoEArgs(H, FF, E, 1).renormalize is False and MoEArgs(H, FF, E, 1, activation="relu").ffn_rows == FF
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.top_k = 3
    assert dataclasses.replace(a, top_k=3).top_k == 3
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        dataclasses.replace(a, top_k=E + 1)
    layer = MoE.from_args(a)
    assert layer.args == a and layer.top_k == K and layer.shared_ffn_size == 2 * FF
    with pytest.raises(AttributeError):
        layer.top_k = 3  # the configuration is read-only: build another layer
    assert MoE(H, FF, E, K).shared_ffn_size == 0
    with pytest.raises(TypeError, match="args must be a smoe.nn.MoEArgs"):
        Router(dict(hidden_size=H))


# ------------------------------------------------------------------ Router on its own
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(
            score_func="sigmoid",
            n_groups=4,
            topk_groups=2,
            group_score="top2_sum",
            routed_scaling=2.5,
            renorm_eps=1e-20,
            bias_balancing=True,
        ),
        dict(top_k=1, n_groups=2, topk_groups=1),
        dict(renormalize=False, top_k=3),
    ],
)
def test_router_equals_topk_gating(cfg, backend):
    torch.manual_seed(0)
    router = Router(MoEArgs(H, FF, E, cfg.pop("top_k", K), backend=backend, **cfg))
    if router.expert_bias is not None:
        router.expert_bias.uniform_(-0.2, 0.2)
    x = torch.randn(23, H)
    r = router(x)
    logits = x @ router.weight.t()
    assert r.logits.dtype == torch.float32 and r.plan is None
    assert_close(r.logits, logits)
    a = router.args
    weights, experts, scores = F.topk_gating(
        r.logits,
        top_k=a.top_k,
        score_func=a.score_func,
        bias=router.expert_bias,
        n_groups=a.n_groups,
        topk_groups=a.topk_groups,
        group_score=a.group_score,
        renormalize=a.renormalize,
        renorm_eps=a.renorm_eps,
        routed_scaling=a.routed_scaling,
        backend=backend,
    )
    assert torch.equal(r.experts, experts)
    assert torch.equal(r.weights, weights) and torch.equal(r.scores, scores)
    counts = torch.bincount(experts.reshape(-1).long(), minlength=E).to(torch.int32)
    assert torch.equal(router.routed_counts(r), counts)
    assert torch.equal(router.load_balancing_loss(r), F.load_balancing_loss(scores, experts, backend=backend))
    assert torch.equal(router.z_loss(r), F.z_loss(r.logits, backend=backend))


def test_router_expert_choice_and_its_plan():
    torch.manual_seed(1)
    router = Router(MoEArgs(H, FF, E, K, expert_choice=True, capacity_factor=1.5))
    x = torch.randn(12, H)
    r = router(x)
    C = router.args.capacity(12)  # min(ceil(1.5 * 12 * 2 / 8), 12) = 5
    assert C == 5 and r.experts is None
    weights, tokens, row_of, scores = F.expert_choice(r.logits, capacity=C)
    assert torch.equal(r.weights, weights) and torch.equal(r.scores, scores)
    plan = r.plan
    assert torch.equal(plan.counts, torch.full((E,), C, dtype=torch.int32))
    assert torch.equal(plan.offsets, torch.arange(E + 1) * C)
    assert torch.equal(plan.row_of, row_of) and torch.equal(plan.token_of_row, tokens.reshape(-1))
    # every chosen (t, e) sits at row e*C + c with token_of_row = t
    t, e = torch.nonzero(row_of >= 0, as_tuple=True)
    assert torch.equal(plan.token_of_row[row_of[t, e].long()].long(), t)
    assert torch.equal(router.routed_counts(r), plan.counts)
    assert float(router.load_balancing_loss(r)) == 0.0


def test_router_jitter_only_in_training():
    router = Router(MoEArgs(H, FF, E, K, router_jitter_noise=0.3))
    x = torch.randn(7, H)
    router.eval()
    assert torch.equal(router(x).logits, router.logits(x))
    router.train()
    torch.manual_seed(5)
    noisy = router(x).logits
    torch.manual_seed(5)
    noise = torch.empty(x.shape).uniform_(0.7, 1.3)
    assert torch.equal(noisy, router.logits(x * noise))


def test_router_update_bias():
    router = Router(MoEArgs(H, FF, 4, K, bias_balancing=True, bias_update_rate=0.5))
    router.update_bias(torch.tensor([4, 0, 2, 2]))
    assert torch.equal(router.expert_bias, torch.tensor([-0.5, 0.5, 0.0, 0.0]))
    with pytest.raises(RuntimeError, match="bias_balancing=True"):
        Router(MoEArgs(H, FF, 4, K)).update_bias(torch.tensor([1, 1, 1, 1]))


def test_router_keeps_its_dtypes():
    router = Router(MoEArgs(H, FF, E, K, bias_balancing=True, router_dtype=torch.bfloat16)).double()
    assert router.weight.dtype == torch.bfloat16 and router.expert_bias.dtype == torch.float32


# ------------------------------------------------------------------ experts on their own
def test_routed_and_shared_experts_are_the_ops():
    torch.manual_seed(2)
    args = MoEArgs(H, FF, E, K, capacity_factor=0.75, drop_policy="score", num_shared_experts=1, shared_gate=True)
    experts, shared = RoutedExperts(args), SharedExpert(args)
    assert not list(experts.parameters())  # the layer owns w1 / w2
    w1, w2 = (torch.empty(s) for s in experts.weight_shapes())
    experts.init_weights(w1, w2)
    assert w1.abs().max() <= 1 / H**0.5 and w2.abs().max() <= 1 / FF**0.5 and w1.std() > 0
    shared.reset_parameters()
    x = torch.randn(10, H)
    weights, idx, _ = F.topk_gating(torch.randn(10, E), top_k=K, renormalize=True)
    plan = experts.plan(idx, weights)
    want_plan = F.routing_plan(idx, num_experts=E, weights=weights, capacity=args.capacity(10), drop_policy="score")
    for got, want in zip(plan, want_plan):
        assert torch.equal(got, want)
    y = experts(x, weights, plan, w1, w2)
    assert torch.equal(y, F.combine(F.expert_mlp(x, w1, w2, plan), weights, plan))
    assert torch.equal(shared(x), F.shared_expert(x, shared.w1, shared.w2, shared.gate_w))
    with pytest.raises(ValueError, match="SharedExpert needs num_shared_experts >= 1"):
        SharedExpert(MoEArgs(H, FF, E, K))


# ------------------------------------------------------------------ state dict
def _flat_state(seed=3, *, shared=True, bias=True):
    """A state dict with the keys the layer wrote before its router / experts / shared_expert split,
    built key by key (not by the current code)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "w1": torch.randn(E, 2 * FF, H, generator=g),
        "w2": torch.randn(E, H, FF, generator=g),
        "router.weight": torch.randn(E, H, generator=g),
    }
    if shared:
        sd.update(
            shared_w1=torch.randn(2 * FF, H, generator=g),
            shared_w2=torch.randn(H, FF, generator=g),
            shared_gate_w=torch.randn(H, generator=g),
        )
    if bias:
        sd["expert_bias"] = torch.randn(E, generator=g)
    return sd


def test_state_dict_keys_and_parameter_order():
    layer = MoE(H, FF, E, K, num_shared_experts=1, shared_gate=True, bias_balancing=True)
    assert list(layer.state_dict()) == [
        "w1",
        "w2",
        "shared_expert.w1",
        "shared_expert.w2",
        "shared_expert.gate_w",
        "router.weight",
        "router.expert_bias",
    ]
    # parameters() in the order of the layer before the split: w1, w2, shared_w1, shared_w2, shared_gate_w, router
    assert [p for p in layer.parameters()] == [
        layer.w1,
        layer.w2,
        layer.shared_w1,
        layer.shared_w2,
        layer.shared_gate_w,
        layer.router.weight,
    ]
    assert layer.expert_bias is layer.router.expert_bias and layer.shared_w1 is layer.shared_expert.w1


@pytest.mark.parametrize("shared,bias", [(True, True), (False, False)])
def test_flat_state_dict_loads(shared, bias):
    sd = _flat_state(shared=shared, bias=bias)
    layer = MoE(H, FF, E, K, num_shared_experts=int(shared), shared_gate=shared, bias_balancing=bias)
    result = layer.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.w1, sd["w1"]) and torch.equal(layer.w2, sd["w2"])
    assert torch.equal(layer.router.weight, sd["router.weight"])
    if shared:
        assert torch.equal(layer.shared_expert.w1, sd["shared_w1"])
        assert torch.equal(layer.shared_expert.w2, sd["shared_w2"])
        assert torch.equal(layer.shared_expert.gate_w, sd["shared_gate_w"])
    if bias:
        assert torch.equal(layer.router.expert_bias, sd["expert_bias"])
    # and the layer computes with them: the reference layer on the same tensors
    x = torch.randn(6, H)
    want = smoe.reference.moe_layer(
        x,
        sd["router.weight"],
        sd["w1"],
        sd["w2"],
        top_k=K,
        renormalize=True,
        bias=sd.get("expert_bias"),
        shared_w1=sd.get("shared_w1"),
        shared_w2=sd.get("shared_w2"),
        shared_gate_w=sd.get("shared_gate_w"),
    )
    assert_close(layer.eval()(x), want.y)


def test_flat_state_dict_loads_nested():
    """Inside a model (a key prefix), strictly, and a partial old state dict reports the new key missing."""
    sd = {f"1.{k}": v for k, v in _flat_state().items()}
    sd.update({"0.weight": torch.zeros(H, H), "0.bias": torch.zeros(H)})
    model = torch.nn.Sequential(
        torch.nn.Linear(H, H), MoE(H, FF, E, K, num_shared_experts=1, shared_gate=True, bias_balancing=True)
    )
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model[1].w2, sd["1.w2"]) and torch.equal(model[1].shared_expert.w2, sd["1.shared_w2"])
    assert torch.equal(model[1].router.expert_bias, sd["1.expert_bias"])
    del sd["1.shared_w2"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"1.shared_expert.w2\""):
        model.load_state_dict(sd, strict=True)


def test_flat_state_dict_loads_with_assign():
    """assign=True (the meta-device load path) takes the checkpoint's tensors as the parameters under the new names."""
    sd = _flat_state()
    layer = MoE(H, FF, E, K, num_shared_experts=1, shared_gate=True, bias_balancing=True)
    layer.load_state_dict(sd, strict=True, assign=True)
    assert layer.shared_expert.w1 is layer.shared_w1 and isinstance(layer.shared_expert.w1, torch.nn.Parameter)
    assert torch.equal(layer.shared_expert.w1, sd["shared_w1"])
    assert torch.equal(layer.router.expert_bias, sd["expert_bias"]) and layer.expert_bias is layer.router.expert_bias
    assert list(sd) == list(_flat_state())  # the caller's dict is not renamed in place


def test_flat_state_dict_key_the_layer_lacks_is_reported_as_written():
    """A flat key for a tensor the layer does not have (expert_bias without bias_balancing, shared_* without
    shared experts) is left as it is: strict loading names the checkpoint's key, not a renamed one."""
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"expert_bias\""):
        MoE(H, FF, E, K, num_shared_experts=1, shared_gate=True).load_state_dict(_flat_state(), strict=True)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"shared_w1\""):
        MoE(H, FF, E, K, bias_balancing=True).load_state_dict(_flat_state(), strict=True)


def test_new_state_dict_round_trip():
    torch.manual_seed(4)
    a = MoE(H, FF, E, K, num_shared_experts=1, bias_balancing=True)
    a.expert_bias.uniform_(-1, 1)
    b = MoE(H, FF, E, K, num_shared_experts=1, bias_balancing=True)
    b.load_state_dict(a.state_dict(), strict=True)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------ T = 0 through the ops
@pytest.mark.parametrize("expert_choice", [False, True])
def test_no_tokens_go_through_the_ops(monkeypatch, expert_choice):
    calls = {}
    for name in (
        "topk_gating",
        "expert_choice",
        "routing_plan",
        "expert_mlp",
        "combine",
        "z_loss",
        "load_balancing_loss",
        "shared_expert",
    ):
        real = getattr(F, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.setdefault(_name, []).append(args[0].shape[0])
            return _real(*args, **kwargs)

        monkeypatch.setattr(F, name, spy)
    layer = MoE(H, FF, E, K, expert_choice=expert_choice, num_shared_experts=1, z_loss_coef=0.1, backend="cpu").train()
    x = torch.randn(2, 0, H, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, H)
    (y.sum() + layer.aux_loss).backward()
    assert x.grad.shape == x.shape
    want = ["expert_mlp", "combine", "z_loss", "shared_expert"]
    want += [] if expert_choice else ["topk_gating", "routing_plan", "load_balancing_loss"]
    for name in want:
        assert calls.get(name) == [0], (name, calls)
    # expert_choice's capacity range is [1, T]: for T = 0 the router's routing is the empty one, and its
    # plan (expert_choice_plan) still goes to expert_mlp and combine.
    assert "expert_choice" not in calls
    assert torch.equal(layer.last_stats["tokens_per_expert"], torch.zeros(E, dtype=torch.int32))
    assert int(layer.last_stats["dropped"]) == 0 and float(layer.last_z_loss) == 0.0


def test_expert_choice_plan_empty():
    plan = expert_choice_plan(torch.zeros(E, 0, dtype=torch.int32), torch.zeros(0, E, dtype=torch.int32))
    assert torch.equal(plan.counts, torch.zeros(E, dtype=torch.int32))
    assert torch.equal(plan.offsets, torch.zeros(E + 1, dtype=torch.int64)) and plan.token_of_row.numel() == 0

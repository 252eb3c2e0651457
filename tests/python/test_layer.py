"""smoe.nn.MoE on the CPU backend against the same layer on backend="reference" (smoe.reference.moe_layer).

Both layers hold the same weights (load_state_dict); outputs, input and weight gradients are compared
with smoe.testing's per-dtype table, routing statistics (integers) exactly.
"""

import math

import pytest
import torch
from smoe.nn import MoE
from smoe.testing import assert_close

H, F, E, K = 24, 20, 6, 2

ROUTERS = {
    "softmax": dict(),
    "softmax-no-renorm": dict(renormalize=False),
    "sigmoid-renorm-scaled": dict(score_func="sigmoid", renormalize=True, renorm_eps=1e-20, routed_scaling=2.5),
    "bias-balancing": dict(score_func="sigmoid", bias_balancing=True),
    "groups-max": dict(num_experts=8, n_groups=4, topk_groups=2, group_score="max", score_func="sigmoid"),
    "groups-top2": dict(num_experts=8, top_k=3, n_groups=4, topk_groups=2, group_score="top2_sum"),
    "expert-choice": dict(expert_choice=True),
    "expert-choice-cf2": dict(expert_choice=True, capacity_factor=2.0, score_func="sigmoid"),
    "shared": dict(num_shared_experts=1),
    "shared-gated": dict(num_shared_experts=2, shared_gate=True),
    "shared-sized": dict(num_shared_experts=1, shared_ffn_size=12, shared_gate=True),
    "capacity-token-order": dict(capacity_factor=0.5),
    "capacity-score": dict(capacity_factor=0.75, drop_policy="score"),
    "aux-z-losses": dict(aux_loss_coef=0.1, z_loss_coef=0.01),
    "geglu": dict(activation="geglu"),
    "gelu": dict(activation="gelu"),
    "relu": dict(activation="relu"),
    "top1": dict(top_k=1),
}


def _pair(dtype=torch.float32, seed=0, **kwargs):
    """(cpu layer, reference layer) with identical weights."""
    args = dict(hidden_size=H, ffn_size=F, num_experts=E, top_k=K)
    for key in list(args):
        if key in kwargs:
            args[key] = kwargs.pop(key)
    torch.manual_seed(seed)
    cpu = MoE(**args, **kwargs, dtype=dtype, backend="cpu")
    if cpu.expert_bias is not None:
        cpu.expert_bias.uniform_(-0.2, 0.2)  # a bias that actually changes the choice
    ref = MoE(**args, **kwargs, dtype=dtype, backend="reference")
    ref.load_state_dict(cpu.state_dict())
    return cpu, ref


def _run(layer, x, grad_out):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(grad_out)
    grads = {name.removeprefix("_orig_mod."): p.grad for name, p in layer.named_parameters()}
    return y.detach(), x.grad, grads


def _compare(cpu, ref, x, dtype, check_bias=True):
    torch.manual_seed(123)
    grad_out = torch.randn(x.shape, dtype=dtype)
    y_c, gx_c, g_c = _run(cpu, x, grad_out)
    y_r, gx_r, g_r = _run(ref, x, grad_out)
    assert y_c.shape == x.shape and y_c.dtype == dtype
    assert_close(y_c, y_r, msg="output")
    assert_close(gx_c, gx_r, msg="grad x")
    assert set(g_c) == set(g_r)
    for name in g_r:
        if g_r[name] is None:
            assert g_c[name] is None or not g_c[name].any(), name
            continue
        assert g_c[name] is not None, name
        # the router weight is fp32, but its gradient flows through the layer's dtype
        assert_close(g_c[name], g_r[name], dtype=dtype, msg=f"grad {name}")
    for key in ("tokens_per_expert", "routed_per_expert", "dropped"):
        assert torch.equal(cpu.last_stats[key].long(), ref.last_stats[key].long()), key
    assert_close(cpu.last_aux_loss, ref.last_aux_loss, msg="aux loss")
    assert_close(cpu.last_z_loss, ref.last_z_loss, msg="z loss")
    if check_bias and cpu.expert_bias is not None:
        assert_close(cpu.expert_bias, ref.expert_bias, msg="expert_bias")


@pytest.mark.parametrize("name", list(ROUTERS))
def test_layer_matches_reference_f32(name):
    cpu, ref = _pair(**ROUTERS[name])
    x = torch.randn(3, 7, H)
    _compare(cpu, ref, x, torch.float32)


@pytest.mark.parametrize(
    "name",
    [
        "softmax",
        "sigmoid-renorm-scaled",
        "groups-top2",
        "expert-choice",
        "shared-gated",
        "capacity-score",
        "aux-z-losses",
    ],
)
def test_layer_matches_reference_bf16(name):
    cpu, ref = _pair(dtype=torch.bfloat16, **ROUTERS[name])
    x = torch.randn(2, 9, H, dtype=torch.bfloat16)
    _compare(cpu, ref, x, torch.bfloat16)


@pytest.mark.parametrize("T", [0, 1, 7, 33])
@pytest.mark.parametrize("experts,top_k", [(1, 1), (5, 5), (7, 3)])
def test_shapes_that_hurt(T, experts, top_k):
    cpu, ref = _pair(
        num_experts=experts, top_k=top_k, num_shared_experts=1, shared_gate=True, aux_loss_coef=0.05, z_loss_coef=0.01
    )
    x = torch.randn(T, H)
    _compare(cpu, ref, x, torch.float32)
    if T == 0:
        assert int(cpu.last_stats["tokens_per_expert"].sum()) == 0


@pytest.mark.parametrize("T", [0, 1, 7])
def test_shapes_that_hurt_capacity_and_expert_choice(T):
    for kwargs in (dict(capacity_factor=0.5), dict(expert_choice=True)):
        cpu, ref = _pair(**kwargs)
        _compare(cpu, ref, torch.randn(T, H), torch.float32)


def test_capacity_drops_and_counts():
    cpu, _ = _pair(capacity_factor=0.5)
    T = 40
    cpu(torch.randn(T, H))
    C = math.ceil(0.5 * T * K / E)
    stats = cpu.last_stats
    assert int(stats["tokens_per_expert"].max()) <= C
    assert int(stats["routed_per_expert"].sum()) == T * K
    assert int(stats["dropped"]) == T * K - int(stats["tokens_per_expert"].sum())
    assert torch.equal(stats["tokens_per_expert"].long(), stats["routed_per_expert"].long().clamp(max=C))
    assert int(stats["dropped"]) > 0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_aux_losses_reach_router_gradient(backend):
    """grad(router) of y.sum() + layer.aux_loss = grad without + d(coef_a * aux + coef_z * z)/d(router)."""
    from smoe.reference import moe_layer

    torch.manual_seed(0)
    x = torch.randn(13, H)
    base = MoE(H, F, E, K, backend=backend)
    with_aux = MoE(H, F, E, K, backend=backend, aux_loss_coef=0.3, z_loss_coef=0.05)
    with_aux.load_state_dict(base.state_dict())
    base(x).sum().backward()
    (with_aux(x).sum() + with_aux.aux_loss).backward()
    router = base.router.weight.detach().clone().requires_grad_(True)
    out = moe_layer(x, router, base.w1.detach(), base.w2.detach(), top_k=K, renormalize=True)
    (extra,) = torch.autograd.grad(0.3 * out.aux_loss + 0.05 * out.z_loss, router)
    assert extra.abs().sum() > 0
    assert_close(with_aux.router.weight.grad, base.router.weight.grad + extra)
    assert_close(with_aux.w1.grad, base.w1.grad)  # the aux losses do not touch the experts
    assert_close(with_aux.last_aux_loss, out.aux_loss.detach())
    assert_close(with_aux.last_z_loss, out.z_loss.detach())
    assert not with_aux.last_aux_loss.requires_grad


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bias_balancing_update(backend):
    torch.manual_seed(0)
    layer = MoE(H, F, E, K, score_func="sigmoid", bias_balancing=True, bias_update_rate=0.01, backend=backend)
    x = torch.randn(50, H)
    layer.eval()
    layer(x)
    assert not layer.expert_bias.any()  # no update outside training
    layer.train()
    layer(x)
    assert not layer.expert_bias.any()  # updated by end_step() only, once per optimizer step
    layer.end_step()
    load = layer.last_stats["routed_per_expert"].double()
    want = 0.01 * torch.sign(load.mean() - load)
    assert_close(layer.expert_bias, want.float())
    assert layer.expert_bias.grad is None and not layer.expert_bias.requires_grad
    # the bias steers the choice: an expert with a large bias is picked by every token
    with torch.no_grad():
        layer.expert_bias.zero_()
        layer.expert_bias[3] = 10.0
    layer.eval()
    layer(x)
    assert int(layer.last_stats["routed_per_expert"][3]) == 50


def test_deterministic():
    cpu, _ = _pair(capacity_factor=1.0, num_shared_experts=1, shared_gate=True, aux_loss_coef=0.1)
    x = torch.randn(37, H)
    g = torch.randn(37, H)
    a = _run(cpu, x, g)
    b = _run(cpu, x, g)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for name in a[2]:
        assert torch.equal(a[2][name], b[2][name]), name


@pytest.mark.parametrize("name", ["softmax", "capacity-token-order", "expert-choice", "shared-gated", "aux-z-losses"])
def test_compile_fullgraph_parity(name):
    cpu, _ = _pair(**ROUTERS[name])
    compiled = torch.compile(cpu, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 11, H)
    g = torch.randn(2, 11, H)
    want = _run(cpu, x, g)
    stats = {k: v.clone() for k, v in cpu.last_stats.items()}
    got = _run(compiled, x, g)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    for n in want[2]:
        assert_close(got[2][n], want[2][n], msg=n)
    for k in stats:
        assert torch.equal(cpu.last_stats[k], stats[k]), k


def test_compile_inductor():
    torch._dynamo.reset()
    cpu, ref = _pair(num_shared_experts=1, shared_gate=True)
    compiled = torch.compile(cpu, fullgraph=True)
    x = torch.randn(9, H)
    g = torch.randn(9, H)
    got = _run(compiled, x, g)
    want = _run(ref, x, g)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


BAD = [
    (dict(top_k=7), "top_k must be <= num_experts"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(activation="swish"), "activation must be one of"),
    (dict(score_func="tanh"), "score_func"),
    (dict(n_groups=4), "n_groups must divide num_experts"),
    (dict(n_groups=3, topk_groups=4), "topk_groups must be <= n_groups"),
    (dict(n_groups=3, topk_groups=1, top_k=3), "top_k must be <="),
    (dict(group_score="mean"), "group_score"),
    (dict(drop_policy="random"), "drop_policy"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
    (dict(routed_scaling=0.0), "routed_scaling"),
    (dict(shared_gate=True), "shared_gate=True needs num_shared_experts"),
    (dict(expert_choice=True, aux_loss_coef=0.1), "aux_loss_coef must be 0 with expert_choice"),
    (dict(expert_choice=True, n_groups=2), "expert_choice=True supports"),
    (dict(backend="tpu"), "backend must be one of"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
def test_bad_arguments(kwargs, match):
    args = dict(hidden_size=H, ffn_size=F, num_experts=E, top_k=K)
    for key in list(args):
        if key in kwargs:
            args[key] = kwargs.pop(key)
    with pytest.raises(ValueError, match=match):
        MoE(**args, **kwargs)


def test_bad_input():
    layer = MoE(H, F, E, K)
    with pytest.raises(ValueError, match="hidden_size=24"):
        layer(torch.randn(3, H + 1))
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.randn(3, H, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["cpu", "simt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [dict(), dict(capacity_factor=0.5), dict(capacity_factor=0.75, drop_policy="score")])
def test_top1_inference_fused_matches_training_path(backend, dtype, kwargs):
    """Top-1 under no_grad in eval mode takes expert_mlp_combine_top1 (the combine in the second GEMM's
    epilogue); it equals the same layer's output with gradients enabled (expert_mlp + combine) within the table."""
    import smoe

    if backend not in smoe.BACKENDS:
        pytest.skip(backend)
    torch.manual_seed(5)
    layer = MoE(hidden_size=H, ffn_size=F, num_experts=E, top_k=1, dtype=dtype, backend=backend, **kwargs)
    x = torch.randn(37, H).to(dtype)
    y_train = layer(x.clone().requires_grad_(True)).detach()
    with torch.no_grad():
        y_infer = layer(x)
    assert y_infer.dtype == dtype and y_infer.shape == x.shape
    assert_close(y_infer, y_train, msg="top-1 inference vs training path")
    if kwargs:
        assert int(layer.last_stats["dropped"]) > 0  # dropped tokens reach the fused path (zeros there)

"""backend="simt": the CUDA kernels run by the SIMT emulator on CPU tensors, against backend="cpu".

Every smoe.functional op, forward and backward, and the whole smoe.nn.MoE layer. Integer outputs
(experts, rows, counts) must be equal; floats follow smoe.testing's table for their dtype. Shapes are
tiny: the emulator runs every CUDA thread as a fiber.
"""

from __future__ import annotations

import pytest
import smoe
import smoe.functional as F
import torch
from conftest import distinct_logits
from smoe.nn import MoE
from smoe.testing import assert_close

pytestmark = pytest.mark.skipif(
    "simt" not in smoe._core.BUILT_BACKENDS, reason="this build of smoe._C has no emulated CUDA backend"
)

DTYPES = [torch.float32, torch.bfloat16]


def _run(fn, inputs, backend):
    """fn(*inputs, backend=...) on fresh leaf copies; returns (outputs, grads of the float inputs) with the
    gradient of sum(output * fixed cotangent) over the float outputs."""
    leaves = [
        t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in inputs
    ]
    out = fn(*leaves, backend=backend)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    gen = torch.Generator().manual_seed(1)
    loss = None
    for o in outs:
        if isinstance(o, torch.Tensor) and o.requires_grad:
            term = (o.float() * torch.randn(o.shape, generator=gen)).sum()
            loss = term if loss is None else loss + term
    if loss is not None:
        loss.backward()
    grads = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return outs, grads


def _same(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None or not isinstance(w, torch.Tensor):
            assert g is None or not isinstance(g, torch.Tensor), f"{what}[{i}]: None on cpu only"
            continue
        if w.is_floating_point():
            assert_close(g, w, msg=f"{what}[{i}]")
        else:
            assert torch.equal(g, w), f"{what}[{i}]: integers differ\n{g}\n{w}"


def check(fn, *inputs):
    out_c, grad_c = _run(fn, inputs, "cpu")
    out_s, grad_s = _run(fn, inputs, "simt")
    _same(out_s, out_c, "output")
    _same(grad_s, grad_c, "grad")


def _w(*shape, dtype, scale=0.5):
    return (torch.randn(*shape) * scale).to(dtype)


# ---- gating ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_gating(dtype):
    logits = distinct_logits(13, 8, dtype)
    check(lambda lg, backend: F.topk_gating(lg, top_k=2, renormalize=True, backend=backend), logits)
    bias = torch.linspace(-0.1, 0.1, 8)
    check(
        lambda lg, b, backend: F.topk_gating(
            lg,
            top_k=3,
            score_func="sigmoid",
            bias=b,
            n_groups=4,
            topk_groups=2,
            group_score="top2_sum",
            renormalize=True,
            renorm_eps=1e-20,
            routed_scaling=2.5,
            backend=backend,
        ),
        logits,
        bias,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_choice_and_losses(dtype):
    logits = distinct_logits(9, 4, dtype)
    check(lambda lg, backend: F.expert_choice(lg, capacity=3, backend=backend), logits)
    probs = torch.softmax(distinct_logits(9, 4), dim=1)
    experts = torch.topk(probs, 2, dim=1).indices.to(torch.int32)
    check(lambda p, e, backend: F.load_balancing_loss(p, e, backend=backend), probs, experts)
    check(lambda lg, backend: F.z_loss(lg, backend=backend), logits.float())


def test_balancing_bias_update():
    counts = torch.tensor([5, 0, 3, 3], dtype=torch.int32)
    biases = {}
    for backend in ("cpu", "simt"):
        b = torch.tensor([0.5, -0.25, 0.0, 1.0])
        F.balancing_bias_update(counts, b, rate=0.125, backend=backend)
        biases[backend] = b
    assert torch.equal(biases["simt"], biases["cpu"])


# ---- routing, permute, combine ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "capacity,policy,pad", [(None, "token_order", 1), (3, "token_order", 1), (2, "score", 1), (None, "token_order", 4)]
)
def test_routing_plan(capacity, policy, pad):
    weights, experts, _ = F.topk_gating(distinct_logits(13, 5), top_k=2, backend="cpu")
    plans = {
        b: F.routing_plan(
            experts, num_experts=5, weights=weights, capacity=capacity, drop_policy=policy, pad_multiple=pad, backend=b
        )
        for b in ("cpu", "simt")
    }
    for name, g, w in zip(plans["cpu"]._fields, plans["simt"], plans["cpu"]):
        assert torch.equal(g, w), f"plan.{name} differs"


def _plan(T=9, E=4, K=2, capacity=None):
    weights, experts, _ = F.topk_gating(distinct_logits(T, E), top_k=K, renormalize=True, backend="cpu")
    return weights, F.routing_plan(experts, num_experts=E, capacity=capacity, backend="cpu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_combine(dtype):
    weights, plan = _plan(capacity=3)  # some assignments dropped, padding rows
    x = _w(9, 16, dtype=dtype)
    check(lambda x, backend: F.permute(x, plan, backend=backend), x)
    ys = _w(plan.token_of_row.shape[0], 16, dtype=dtype)
    check(lambda ys, w, backend: F.combine(ys, w, plan, backend=backend), ys, weights)


# ---- GEMM, activations, expert MLP, shared expert --------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_b", [True, False])
def test_grouped_gemm(dtype, trans_b):
    offsets = torch.tensor([0, 5, 5, 12, 17], dtype=torch.int64)  # expert 1 empty
    a = _w(17, 16, dtype=dtype)
    b = _w(4, 24, 16, dtype=dtype) if trans_b else _w(4, 16, 24, dtype=dtype)
    check(lambda a, b, backend: F.grouped_gemm(a, b, offsets, trans_b=trans_b, backend=backend), a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["swiglu", "geglu", "gelu", "relu"])
def test_activation(dtype, kind):
    check(lambda x, backend: F.activation(x, kind=kind, backend=backend), _w(7, 32, dtype=dtype, scale=2.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_expert_mlp(dtype, activation):
    _, plan = _plan(capacity=3)
    F1 = 32 if activation == "swiglu" else 16
    x, w1, w2 = _w(9, 16, dtype=dtype), _w(4, F1, 16, dtype=dtype), _w(4, 16, 16, dtype=dtype)
    check(lambda x, w1, w2, backend: F.expert_mlp(x, w1, w2, plan, activation=activation, backend=backend), x, w1, w2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [True, False])
def test_shared_expert(dtype, gated):
    x, w1, w2 = _w(9, 16, dtype=dtype), _w(32, 16, dtype=dtype), _w(16, 16, dtype=dtype)
    if gated:
        check(
            lambda x, w1, w2, g, backend: F.shared_expert(x, w1, w2, g, backend=backend), x, w1, w2, _w(16, dtype=dtype)
        )
    else:
        check(lambda x, w1, w2, backend: F.shared_expert(x, w1, w2, backend=backend), x, w1, w2)


def test_f64_is_refused_on_the_device_backends():
    x, w1, w2 = _w(3, 8, dtype=torch.float64), _w(16, 8, dtype=torch.float64), _w(8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="f64"):
        F.shared_expert(x, w1, w2, backend="simt")
    with pytest.raises(RuntimeError, match="f64"):
        F.activation(x, kind="gelu", backend="simt")


def test_cuda_backend_needs_cuda_tensors():
    x = _w(3, 8, dtype=torch.float32)
    if "cuda" not in smoe._core.BUILT_BACKENDS:
        with pytest.raises(RuntimeError, match="not in this build"):
            F.activation(x, kind="gelu", backend="cuda")
    else:
        with pytest.raises((ValueError, RuntimeError), match="cuda|CUDA"):
            F.activation(x, kind="gelu", backend="cuda")


# ---- the whole layer -------------------------------------------------------------------------------


def _layer_pair(dtype, **kw):
    torch.manual_seed(3)
    cpu = MoE(16, 16, 4, 2, dtype=dtype, backend="cpu", **kw)
    simt = MoE(16, 16, 4, 2, dtype=dtype, backend="simt", **kw)
    simt.load_state_dict(cpu.state_dict())
    return cpu, simt


def _layer_run(layer, x, gy):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y.float() * gy).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return y, x.grad, grads, layer.last_aux_loss, layer.last_z_loss, layer.last_stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_shared_experts": 1, "shared_gate": True, "aux_loss_coef": 0.01, "z_loss_coef": 0.001},
        {"score_func": "sigmoid", "capacity_factor": 1.0, "drop_policy": "score", "bias_balancing": True},
    ],
    ids=["mixtral", "qwen2_shared_gate", "sigmoid_capacity_score"],
)
def test_moe_layer_forward_backward(dtype, kw):
    cpu, simt = _layer_pair(dtype, **kw)
    x = _w(9, 16, dtype=dtype, scale=1.0)
    gy = torch.randn(9, 16)
    y_c, gx_c, gp_c, aux_c, z_c, st_c = _layer_run(cpu, x, gy)
    y_s, gx_s, gp_s, aux_s, z_s, st_s = _layer_run(simt, x, gy)
    for k in st_c:
        assert torch.equal(st_s[k], st_c[k]), f"last_stats[{k!r}] differs"
    assert_close(y_s, y_c, msg="y")
    assert_close(gx_s, gx_c, msg="grad x")
    assert_close(aux_s, aux_c, msg="aux loss")
    assert_close(z_s, z_c, msg="z loss")
    assert gp_s.keys() == gp_c.keys()
    for n in gp_c:
        assert (gp_s[n] is None) == (gp_c[n] is None), n
        if gp_c[n] is not None:
            assert_close(gp_s[n], gp_c[n], msg=f"grad {n}")
    for n, b in cpu.named_buffers():
        assert_close(dict(simt.named_buffers())[n], b, msg=f"buffer {n}")


def test_moe_layer_f64_is_refused_on_simt():
    layer = MoE(16, 16, 4, 2, dtype=torch.float64, backend="simt")
    with pytest.raises(RuntimeError, match="f64"):
        layer(torch.randn(3, 16, dtype=torch.float64))

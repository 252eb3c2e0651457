"""The GPU suite: every functional op and the smoe.nn.MoE layer on CUDA tensors with backend="cuda",
against backend="cpu" on CPU copies of the same inputs and weights (integers exactly, floats with
smoe.testing's table), plus bitwise determinism and a CUDA-graph capture of the routing path (no host
sync). Skipped, with the reason, only when no CUDA device is visible: with a GPU and no CUDA backend in
smoe._C the suite fails.

The last section runs everywhere: it checks the CPU-side pieces of bench/gpu/bench_layer.py (FLOP and
byte formulas, peaks, ratios, targets, table and JSON) with fake timings. docs/gpu.md says how to run
both suites.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import smoe.functional as F
import torch
from conftest import distinct_logits, small_ints, tied_logits
from smoe import _core
from smoe.nn import MoE
from smoe.testing import assert_close

_HAS_DEVICE = torch.cuda.is_available()
_HAS_BACKEND = "cuda" in getattr(_core, "BUILT_BACKENDS", ())
# Only the absence of a GPU skips: with a GPU visible and no CUDA backend in smoe._C, every GPU test
# runs and fails (backend 'cuda' is refused), and test_cuda_backend_is_built says why.
_SKIP_REASON = "" if _HAS_DEVICE else "no CUDA device is visible (torch.cuda.is_available() is False)"
gpu = pytest.mark.skipif(bool(_SKIP_REASON), reason=_SKIP_REASON)

CUDA = "cuda"


def _cuda(*ts):
    out = tuple(None if t is None else t.to(CUDA) for t in ts)
    return out if len(out) > 1 else out[0]


def _close(got: torch.Tensor, want: torch.Tensor, msg: str, dtype=None) -> None:
    assert got.device.type == "cuda", msg
    assert_close(got.cpu(), want, dtype=dtype, msg=msg)


def _equal(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
    assert got.device.type == "cuda", msg
    assert got.dtype == want.dtype and got.shape == want.shape, msg
    assert torch.equal(got.cpu(), want), msg


@gpu
def test_cuda_backend_is_built():
    assert _HAS_BACKEND, (
        "a CUDA device is visible but smoe._C has no CUDA backend (smoe._core.BUILT_BACKENDS = "
        f"{_core.BUILT_BACKENDS}); rebuild with SMOE_ENABLE_CUDA=ON (scripts/gpu_check.sh, docs/gpu.md)"
    )


def test_broken_extension_import_is_loud(monkeypatch):
    # A present-but-unloadable smoe._C raises at import; an absent one stays lazy unless SMOE_REQUIRE_CUDA=1.
    broken = ImportError("libcudart.so.13: cannot open shared object file")
    with pytest.raises(ImportError, match="failed to load.*libcudart"):
        _core._check_extension_loads(broken, require_cuda=False, absent=False)
    missing = ImportError("cannot import name '_C' from 'smoe'")
    _core._check_extension_loads(missing, require_cuda=False, absent=True)
    with pytest.raises(ImportError, match="SMOE_REQUIRE_CUDA=1"):
        _core._check_extension_loads(missing, require_cuda=True, absent=True)
    _core._check_extension_loads(None, require_cuda=True, absent=False)
    assert not _core._extension_absent()  # this build has smoe._C
    with pytest.raises(ImportError, match="no CUDA backend"):
        _core._check_cuda_built(("cpu", "simt"), require_cuda=True)
    _core._check_cuda_built(("cpu", "simt"), require_cuda=False)
    _core._check_cuda_built(("cpu", "cuda"), require_cuda=True)
    monkeypatch.setenv("SMOE_REQUIRE_CUDA", "1")
    assert _core._require_cuda_requested()
    monkeypatch.setenv("SMOE_REQUIRE_CUDA", "0")
    assert not _core._require_cuda_requested()


# ---- gating --------------------------------------------------------------------------------------

TOPK_CASES = [  # (T, E, K, kwargs, dtype, ties)
    (0, 8, 2, dict(), torch.float32, False),
    (1, 1, 1, dict(), torch.float32, False),
    (7, 5, 5, dict(score_func="sigmoid"), torch.float32, False),  # K = E
    (7, 8, 2, dict(), torch.float32, True),  # ties: lower index
    (300, 64, 8, dict(renormalize=True), torch.bfloat16, False),
    (33, 300, 7, dict(score_func="sigmoid"), torch.float16, False),  # E > 256
    (4097, 8, 2, dict(renormalize=True), torch.bfloat16, False),  # Mixtral
    (
        37,
        64,
        8,
        dict(
            score_func="sigmoid",
            renormalize=True,
            routed_scaling=2.5,
            n_groups=8,
            topk_groups=4,
            group_score="top2_sum",
        ),
        torch.float32,
        False,
    ),  # DeepSeek-V3
    (9, 1000, 8, dict(), torch.float32, False),  # E > 512: block per token
]


@gpu
@pytest.mark.parametrize("T,E,K,kw,dtype,ties", TOPK_CASES)
def test_topk_gating(T, E, K, kw, dtype, ties):
    logits = tied_logits(T, E, dtype) if ties else distinct_logits(T, E, dtype, spacing=0.25 if E <= 256 else 0.01)
    bias = torch.rand(E) * 0.01 if kw.get("score_func") == "sigmoid" else None
    outs = {}
    for backend, dev in (("cpu", "cpu"), ("cuda", CUDA)):
        x = logits.to(dev).requires_grad_(True)
        w, e, s = F.topk_gating(x, top_k=K, bias=None if bias is None else bias.to(dev), backend=backend, **kw)
        torch.manual_seed(1)
        gw, gs = torch.randn(w.shape).to(dev), torch.randn(s.shape).to(dev)
        (w * gw).sum().add_((s * gs).sum()).backward()
        outs[backend] = (w.detach(), e, s.detach(), x.grad)
    (w_c, e_c, s_c, g_c), (w_g, e_g, s_g, g_g) = outs["cpu"], outs["cuda"]
    _equal(e_g, e_c, "experts")
    _close(w_g, w_c, "weights")
    _close(s_g, s_c, "scores")
    _close(g_g, g_c, "grad logits", dtype=torch.float32 if dtype == torch.float64 else dtype)


EC_CASES = [
    (7, 5, 7, "sigmoid"),
    (300, 6, 100, "softmax"),
    (4097, 8, 1024, "softmax"),
    (20000, 4, 3000, "sigmoid"),
]  # T > 16384: radix-select path


@gpu
@pytest.mark.parametrize("T,E,C,score_func", EC_CASES)
def test_expert_choice(T, E, C, score_func):
    logits = torch.randn(T, E)
    outs = {}
    for backend, dev in (("cpu", "cpu"), ("cuda", CUDA)):
        x = logits.to(dev).requires_grad_(True)
        w, tokens, row_of, s = F.expert_choice(x, capacity=C, score_func=score_func, backend=backend)
        torch.manual_seed(2)
        (w * torch.randn(w.shape).to(dev)).sum().backward()
        outs[backend] = (w.detach(), tokens, row_of, s.detach(), x.grad)
    for name, got, want in zip(("weights", "tokens", "row_of", "scores", "grad"), outs["cuda"], outs["cpu"]):
        if want.dtype.is_floating_point:
            _close(got, want, name)
        else:
            _equal(got, want, name)


@gpu
@pytest.mark.parametrize("T,E,K", [(0, 4, 2), (1, 1, 1), (300, 64, 6), (5000, 7, 2)])
def test_aux_losses_and_bias_update(T, E, K):
    logits = torch.randn(T, E) * 3
    probs = torch.softmax(logits, dim=-1)
    experts = torch.randint(0, E, (T, K), dtype=torch.int32)
    res = {}
    for backend, dev in (("cpu", "cpu"), ("cuda", CUDA)):
        p, x = probs.to(dev).requires_grad_(True), logits.to(dev).requires_grad_(True)
        lb = F.load_balancing_loss(p, experts.to(dev), backend=backend)
        z = F.z_loss(x, backend=backend)
        (0.75 * lb + 0.5 * z).backward()
        counts = torch.bincount(experts.flatten().long(), minlength=E).int().to(dev)
        bias = torch.linspace(-0.1, 0.1, E).to(dev)
        F.balancing_bias_update(counts, bias, rate=0.01, backend=backend)
        res[backend] = (lb.detach(), z.detach(), p.grad, x.grad, bias)
    for name, got, want in zip(("lb loss", "z loss", "grad probs", "grad logits"), res["cuda"], res["cpu"]):
        _close(got, want, name)
    _equal(res["cuda"][4], res["cpu"][4], "bias update (exact)")


# ---- routing -------------------------------------------------------------------------------------

PLAN_CASES = [(0, 4, 2), (1, 1, 1), (7, 7, 7), (7, 300, 2), (4097, 8, 2), (257, 33, 4), (20000, 64, 6)]


@gpu
@pytest.mark.parametrize("T,E,K", PLAN_CASES)
@pytest.mark.parametrize(
    "capacity,drop_policy,pad",
    [
        (None, "token_order", 1),
        (None, "token_order", 8),
        (3, "token_order", 1),
        (3, "score", 4),
        (0, "score", 1),
        (500, "score", 1),
    ],
)
def test_routing_plan(T, E, K, capacity, drop_policy, pad):
    experts = (
        torch.stack([torch.randperm(E)[:K] for _ in range(T)]).int() if T else torch.zeros(0, K, dtype=torch.int32)
    )
    weights = torch.randint(0, 4, (T, K)).float() / 4  # ties on purpose
    kw = dict(num_experts=E, capacity=capacity, drop_policy=drop_policy, pad_multiple=pad)
    want = F.routing_plan(experts, weights=weights, backend="cpu", **kw)
    got = F.routing_plan(_cuda(experts), weights=_cuda(weights), backend="cuda", **kw)
    for name, g, w in zip(want._fields, got, want):
        _equal(g, w, name)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,E,K,H", [(1, 1, 1, 8), (300, 7, 2, 72), (4097, 8, 2, 256)])
def test_permute_and_combine(dtype, T, E, K, H):
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).int()
    weights = torch.rand(T, K)
    x = torch.randn(T, H).to(dtype)
    res = {}
    for backend, dev in (("cpu", "cpu"), ("cuda", CUDA)):
        plan = F.routing_plan(experts.to(dev), num_experts=E, pad_multiple=4, backend=backend)
        xd, wd = x.to(dev).requires_grad_(True), weights.to(dev).requires_grad_(True)
        xs = F.permute(xd, plan, backend=backend)
        y = F.combine(xs * 2, wd, plan, backend=backend)
        torch.manual_seed(3)
        y.backward(torch.randn(y.shape).to(dtype).to(dev))
        res[backend] = (xs.detach(), y.detach(), xd.grad, wd.grad)
    for name, got, want in zip(("xs", "y", "grad x", "grad weights"), res["cuda"], res["cpu"]):
        _close(got, want, name, dtype=dtype)  # grad weights: f32 dots of dtype rows


# ---- experts -------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("E,R,N,Kd", [(1, 1, 8, 8), (4, 300, 72, 40), (8, 1024, 256, 128)])
def test_grouped_gemm(dtype, trans_b, E, R, N, Kd):
    a = small_ints(R, Kd, dtype=dtype)
    b = small_ints(E, N, Kd, dtype=dtype) if trans_b else small_ints(E, Kd, N, dtype=dtype)
    cuts = torch.sort(torch.randint(0, R + 1, (E - 1,))).values
    offsets = torch.cat([torch.zeros(1), cuts, torch.full((1,), R)]).long()
    want = F.grouped_gemm(a, b, offsets, trans_b=trans_b, backend="cpu")
    got = F.grouped_gemm(*_cuda(a, b, offsets), trans_b=trans_b, backend="cuda")
    _close(got, want, "c")


@gpu
@pytest.mark.parametrize("kind", ["swiglu", "geglu", "gelu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation(kind, dtype):
    x = torch.randn(77, 64).to(dtype)
    res = {}
    for backend, dev in (("cpu", "cpu"), ("cuda", CUDA)):
        xd = x.to(dev).requires_grad_(True)
        y = F.activation(xd, kind=kind, backend=backend)
        torch.manual_seed(4)
        y.backward(torch.randn(y.shape).to(dtype).to(dev))
        res[backend] = (y.detach(), xd.grad)
    _close(res["cuda"][0], res["cpu"][0], "y")
    _close(res["cuda"][1], res["cpu"][1], "grad x")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_mlp(dtype):
    T, H, Fs, E, K = 300, 64, 48, 6, 2
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).int()
    x = (torch.randn(T, H) / 4).to(dtype)
    w1, w2 = (torch.randn(E, 2 * Fs, H) / 8).to(dtype), (torch.randn(E, H, Fs) / 8).to(dtype)
    res = {}
    for backend, dev in (("cpu", "cpu"), ("cuda", CUDA)):
        plan = F.routing_plan(experts.to(dev), num_experts=E, backend=backend)
        ys = F.expert_mlp(x.to(dev), w1.to(dev), w2.to(dev), plan, backend=backend)
        res[backend] = ys
    _close(res["cuda"], res["cpu"], "ys")


# ---- the layer -----------------------------------------------------------------------------------

H, FF = 64, 96
LAYERS = {
    "mixtral": dict(num_experts=8, top_k=2),
    "sigmoid-renorm-scaled": dict(
        num_experts=6, top_k=2, score_func="sigmoid", renormalize=True, renorm_eps=1e-20, routed_scaling=2.5
    ),
    "deepseek-groups": dict(
        num_experts=16,
        top_k=4,
        n_groups=4,
        topk_groups=2,
        group_score="top2_sum",
        score_func="sigmoid",
        bias_balancing=True,
    ),
    "expert-choice": dict(num_experts=6, top_k=2, expert_choice=True),
    "shared-gated": dict(num_experts=6, top_k=2, num_shared_experts=1, shared_gate=True),
    "capacity-score": dict(num_experts=6, top_k=2, capacity_factor=0.75, drop_policy="score"),
    "capacity-token-order": dict(num_experts=6, top_k=2, capacity_factor=0.5),
    "aux-z-losses": dict(num_experts=6, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01),
    "many-experts": dict(num_experts=1000, top_k=8),
}


def _layer_pair(dtype, **kw):
    torch.manual_seed(0)
    cpu = MoE(H, FF, **kw, dtype=dtype, backend="cpu")
    if cpu.expert_bias is not None:
        cpu.expert_bias.uniform_(-0.2, 0.2)
    dev = MoE(H, FF, **kw, dtype=dtype, device=CUDA, backend="cuda")
    dev.load_state_dict(cpu.state_dict())
    return cpu, dev


def _run_layer(layer, x, g):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


@gpu
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_forward_backward_matches_cpu(name, dtype):
    cpu, dev = _layer_pair(dtype, **LAYERS[name])
    torch.manual_seed(5)
    x, g = torch.randn(3, 41, H).to(dtype), torch.randn(3, 41, H).to(dtype)
    y_c, gx_c, gp_c = _run_layer(cpu, x, g)
    y_g, gx_g, gp_g = _run_layer(dev, _cuda(x), _cuda(g))
    _close(y_g, y_c, "output")
    _close(gx_g, gx_c, "grad x")
    for n, want in gp_c.items():
        if want is None:
            assert gp_g[n] is None or not gp_g[n].any(), n
            continue
        _close(gp_g[n], want, f"grad {n}", dtype=dtype)
    for key in ("tokens_per_expert", "routed_per_expert", "dropped"):
        _equal(dev.last_stats[key].long(), cpu.last_stats[key].long(), key)
    if cpu.expert_bias is not None:
        _close(dev.expert_bias, cpu.expert_bias, "expert_bias")


@gpu
def test_layer_is_deterministic():
    _, dev = _layer_pair(torch.bfloat16, num_experts=8, top_k=2, aux_loss_coef=0.01)
    x, g = _cuda(torch.randn(2, 300, H).to(torch.bfloat16), torch.randn(2, 300, H).to(torch.bfloat16))
    first = _run_layer(dev, x, g)
    second = _run_layer(dev, x, g)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for n in first[2]:
        assert torch.equal(first[2][n], second[2][n]), n


@gpu
def test_routing_path_captures_in_a_cuda_graph():
    """gating -> plan (with capacity, by score) -> permute -> combine, captured and replayed: a host
    sync anywhere would make the capture fail (ARCHITECTURE.md section 5)."""
    T, E, K, Hd = 512, 16, 4, 64
    logits, x = _cuda(torch.randn(T, E), torch.randn(T, Hd).to(torch.bfloat16))

    def step():
        w, e, _ = F.topk_gating(logits, top_k=K, renormalize=True, backend="cuda")
        plan = F.routing_plan(e, num_experts=E, weights=w, capacity=100, drop_policy="score", backend="cuda")
        xs = F.permute(x, plan, backend="cuda")
        return F.combine(xs, w, plan, backend="cuda")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        eager = step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@gpu
@pytest.mark.parametrize("name", ["mixtral", "shared-gated"])
def test_layer_forward_backward_captures_in_a_cuda_graph(name):
    """The whole smoe.nn.MoE layer, forward and backward (parameter and input gradients), captured in
    one CUDA graph and replayed on new inputs copied into the static ones: no host sync, no allocation
    outside torch's graph pool, no stale pointer. Follows the whole-network capture recipe of
    torch.cuda.graphs (warm-up on a side stream, grads set to None before the capture)."""
    _, dev = _layer_pair(torch.bfloat16, **LAYERS[name])
    torch.manual_seed(9)
    static_x = _cuda(torch.randn(2, 64, H).to(torch.bfloat16)).requires_grad_(True)
    static_g = _cuda(torch.randn(2, 64, H).to(torch.bfloat16))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside the capture (allocator, lazy state)
            dev.zero_grad(set_to_none=True)
            static_x.grad = None
            dev(static_x).backward(static_g)
    torch.cuda.current_stream().wait_stream(s)
    dev.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = dev(static_x)
        static_y.backward(static_g)
    new_x, new_g = torch.randn(2, 64, H).to(torch.bfloat16), torch.randn(2, 64, H).to(torch.bfloat16)
    with torch.no_grad():
        static_x.copy_(_cuda(new_x))
        static_g.copy_(_cuda(new_g))
    graph.replay()
    torch.cuda.synchronize()
    got = (
        static_y.detach().clone(),
        static_x.grad.clone(),
        {n: p.grad.clone() for n, p in dev.named_parameters() if p.grad is not None},
    )
    want = _run_layer(dev, _cuda(new_x), _cuda(new_g))  # eager, same weights
    assert torch.equal(got[0], want[0]), "graph output != eager output"
    assert torch.equal(got[1], want[1]), "graph grad x != eager grad x"
    for n, gp in got[2].items():
        assert torch.equal(gp, want[2][n]), f"graph grad {n} != eager"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.skipif(bool(_SKIP_REASON), reason=_SKIP_REASON or "n/a")
def test_ops_and_layer_run_on_the_device_of_their_tensors():
    """Tensors on cuda:1 while cuda:0 is current: every launch must go to device 1 (the device guard of
    the CUDA entry points); without it the kernels fault or race. Compared with the CPU backend."""
    assert torch.cuda.current_device() == 0
    cpu, _ = _layer_pair(torch.bfloat16, **LAYERS["shared-gated"])
    dev1 = MoE(H, FF, **LAYERS["shared-gated"], dtype=torch.bfloat16, device="cuda:1", backend="cuda")
    dev1.load_state_dict(cpu.state_dict())
    torch.manual_seed(6)
    x, g = torch.randn(2, 33, H).to(torch.bfloat16), torch.randn(2, 33, H).to(torch.bfloat16)
    y_c, gx_c, gp_c = _run_layer(cpu, x, g)
    y_1, gx_1, gp_1 = _run_layer(dev1, x.to("cuda:1"), g.to("cuda:1"))
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0, "the guard must restore the current device"
    assert y_1.device == torch.device("cuda:1")
    assert_close(y_1.cpu(), y_c, msg="output on cuda:1")
    assert_close(gx_1.cpu(), gx_c, msg="grad x on cuda:1")
    for n, want in gp_c.items():
        if want is not None:
            assert_close(gp_1[n].cpu(), want, dtype=torch.bfloat16, msg=f"grad {n} on cuda:1")
    logits = torch.randn(300, 64)
    w_c, e_c, _ = F.topk_gating(logits, top_k=6, backend="cpu")
    w_1, e_1, _ = F.topk_gating(logits.to("cuda:1"), top_k=6, backend="cuda")
    assert torch.equal(e_1.cpu(), e_c)
    assert_close(w_1.cpu(), w_c, msg="gating weights on cuda:1")


# ---- CPU-side pieces of the GPU benchmark (run everywhere) ---------------------------------------

_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "gpu", "bench_layer.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("smoe_bench_gpu_layer", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_bench_flop_and_byte_formulas(bench):
    s = bench.SHAPES["mixtral"]
    assert (s.T, s.H, s.F, s.E, s.K, s.R) == (4096, 4096, 14336, 8, 2, 8192)
    gemm1 = 2 * 8192 * 4096 * 28672
    assert bench.stage_flops(s, "gemm1_fwd") == gemm1
    fwd = gemm1 + 2 * 8192 * 14336 * 4096 + 2 * 4096 * 4096 * 8
    assert bench.stage_flops(s, "layer_fwd") == fwd
    assert bench.stage_flops(s, "layer_fwd+bwd") == 3 * fwd
    assert bench.stage_flops(s, "permute") == 0
    assert bench.stage_bytes(s, "permute") == 8192 * 4 + 2 * 8192 * 4096 * 2
    assert bench.stage_bytes(s, "topk_gating") == 4096 * 8 * 8 + 4096 * 2 * 8
    assert bench.stage_bytes(s, "routing+permute") == bench.stage_bytes(s, "routing_plan") + bench.stage_bytes(
        s, "permute"
    )
    assert bench.stage_bytes(s, "combine") == 8192 * 4096 * 2 + 4096 * 4096 * 2 + 4096 * 2 * 8
    with pytest.raises(ValueError, match="unknown stage"):
        bench.stage_bytes(s, "nope")


def test_bench_device_peaks(bench):
    a100 = bench.device_peak("NVIDIA A100-SXM4-80GB")
    assert (a100.bf16_tflops, a100.hbm_gbs) == (312.0, 2039.0)
    h100 = bench.device_peak("NVIDIA H100 80GB HBM3")
    assert (h100.bf16_tflops, h100.hbm_gbs) == (989.0, 3350.0)
    h200 = bench.device_peak("NVIDIA H200")
    assert (h200.bf16_tflops, h200.hbm_gbs) == (989.0, 4800.0)
    for unknown in ("NVIDIA H100 PCIe", "NVIDIA A100 80GB PCIe", "NVIDIA GH200 480GB", "Tesla T4"):
        assert bench.device_peak(unknown) is None, unknown
    given = bench.device_peak("Tesla T4", tflops=65.0, gbs=320.0)
    assert (given.bf16_tflops, given.hbm_gbs) == (65.0, 320.0)
    with pytest.raises(ValueError, match="peak-tflops"):
        bench.device_peak("Tesla T4", tflops=65.0)


def _fake_times(bench, s):
    # plausible A100 figures, chosen so that each target is decided one way
    return {
        ("topk_gating", "smoe"): 5e-6,
        ("routing_plan", "smoe"): 8e-6,
        ("permute", "smoe"): 40e-6,
        ("routing+permute", "smoe"): 50e-6,
        ("gemm1_fwd", "smoe_tc"): 1.2e-3,
        ("gemm1_fwd", "torch_per_expert"): 1.1e-3,
        ("gemm1_fwd", "dense"): 1.0e-3,
        ("combine", "smoe"): 60e-6,
        ("layer_fwd", "smoe"): 2.2e-3,
        ("layer_fwd", "hf_mixtral"): 4.4e-3,
        ("layer_fwd", "dense"): 1.8e-3,
        ("layer_fwd+bwd", "smoe"): 7e-3,
        ("layer_fwd+bwd", "dense"): 5.5e-3,
    }


def test_bench_rows_ratios_and_targets(bench):
    s = bench.SHAPES["mixtral"]
    peak = bench.device_peak("NVIDIA A100-SXM4-80GB")
    rows = bench.build_rows(s, _fake_times(bench, s), peak)
    by = {(r.stage, r.impl): r for r in rows}
    tc = by[("gemm1_fwd", "smoe_tc")]
    assert math.isclose(tc.tflops, bench.stage_flops(s, "gemm1_fwd") / 1.2e-3 / 1e12)
    assert math.isclose(tc.peak_fraction, tc.tflops / 312.0)
    assert math.isclose(tc.x_dense, 1.0 / 1.2) and math.isclose(tc.x_cublas, 1.1 / 1.2)
    assert tc.target_met is False  # 0.83 < 0.85
    perm = by[("permute", "smoe")]
    assert perm.tflops is None and math.isclose(perm.peak_fraction, perm.gbs / 2039.0)
    assert by[("routing+permute", "smoe")].target_met is False  # 50 us >= 20 us
    layer = by[("layer_fwd", "smoe")]
    floor = bench.stage_flops(s, "layer_fwd") / 312e12
    assert math.isclose(layer.x_floor, 2.2e-3 / floor)
    assert layer.target_met is (layer.x_floor <= 1.3)
    assert math.isclose(layer.x_hf, 2.0) and by[("layer_fwd", "hf_mixtral")].x_hf is None
    assert by[("topk_gating", "smoe")].target is None
    # without a known peak the fractions stay blank and the floor target is undecided
    blank = {(r.stage, r.impl): r for r in bench.build_rows(s, _fake_times(bench, s), None)}
    assert blank[("layer_fwd", "smoe")].peak_fraction is None
    assert blank[("layer_fwd", "smoe")].target_met is None
    with pytest.raises(ValueError, match="positive"):
        bench.build_rows(s, {("permute", "smoe"): 0.0}, peak)


def test_bench_table_and_json(bench, tmp_path):
    s = bench.SHAPES["mixtral"]
    peak = bench.device_peak("NVIDIA H100 80GB HBM3")
    rows = bench.build_rows(s, _fake_times(bench, s), peak)
    text = bench.format_table(rows, "NVIDIA H100 80GB HBM3", peak)
    for h in bench.HEADERS:
        assert h in text
    assert "MISSED" in text and "H100 SXM" in text and "datasheet" in text
    assert len([ln for ln in text.splitlines() if ln.startswith("mixtral ")]) == len(rows)
    unknown = bench.format_table(bench.build_rows(s, _fake_times(bench, s), None), "Tesla T4", None)
    assert "not in the PEAKS table" in unknown
    path = tmp_path / "out" / "gpu.json"
    bench.write_json(rows, str(path), {"device": "fake"})
    data = json.loads(path.read_text())
    assert data["meta"] == {"device": "fake"}
    assert len(data["results"]) == len(rows)
    first = data["results"][0]
    assert set(first) >= {
        "shape",
        "stage",
        "impl",
        "time_us",
        "tflops",
        "gbs",
        "peak_fraction",
        "x_dense",
        "x_hf",
        "x_cublas",
        "x_floor",
        "target",
        "target_met",
    }


@pytest.mark.skipif(_HAS_DEVICE, reason="a GPU is present: the benchmark would run for real")
def test_bench_without_gpu_exits_zero_with_a_message(bench, capsys):
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "nothing was measured" in out or "no CUDA backend" in out


def test_bench_rejects_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "nope"])

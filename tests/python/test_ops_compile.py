"""torch.compile(fullgraph=True) traces the custom ops (fake impls give exact shapes) and matches eager;
plus the binding's plumbing: dtype/device codes, the custom-op schemas, thread-count independence."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import smoe
import smoe.functional as F
import torch
from conftest import distinct_logits
from smoe import _core
from smoe.testing import assert_close

T, H, E, FF, K = 24, 16, 6, 12, 2


def moe_forward(x, router, w1, w2, sw1, sw2, gate_w, backend="cpu"):
    """A whole MoE layer chained from the ops; returns (y, aux)."""
    logits = x @ router.t()
    weights, experts, scores = F.topk_gating(logits, top_k=K, renormalize=True, backend=backend)
    plan = F.routing_plan(experts, num_experts=E, pad_multiple=4, backend=backend)
    ys = F.expert_mlp(x, w1, w2, plan, backend=backend)
    y = F.combine(ys, weights, plan, backend=backend)
    y = y + F.shared_expert(x, sw1, sw2, gate_w, backend=backend)
    aux = F.load_balancing_loss(scores, experts, backend=backend) + 1e-3 * F.z_loss(logits, backend=backend)
    return y, aux


def unfused_forward(x, a, w1, offsets):
    """grouped_gemm + activation + permute on a fixed plan, and expert choice."""
    w, tokens, row_of, s = F.expert_choice(a, capacity=4, backend="cpu")
    h = F.activation(F.grouped_gemm(x, w1, offsets, backend="cpu"), kind="geglu", backend="cpu")
    return h, w, s, tokens


def make_inputs(requires_grad=True, dtype=torch.float32):
    torch.manual_seed(1)
    params = [
        torch.randn(T, H),
        0.3 * torch.randn(E, H),
        0.3 * torch.randn(E, 2 * FF, H),
        0.3 * torch.randn(E, H, FF),
        0.3 * torch.randn(2 * FF, H),
        0.3 * torch.randn(H, FF),
        0.3 * torch.randn(H),
    ]
    return [p.to(dtype).requires_grad_(requires_grad) for p in params]


def run(fn, inputs):
    y, aux = fn(*inputs)
    (y.square().sum() + aux).backward()
    return [y.detach(), aux.detach()] + [p.grad for p in inputs]


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compile_fullgraph_matches_eager(compile_backend):
    torch._dynamo.reset()
    eager = run(moe_forward, make_inputs())
    compiled = run(torch.compile(moe_forward, fullgraph=True, backend=compile_backend), make_inputs())
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)  # the same custom ops run in the same order


def test_compile_fullgraph_other_ops():
    torch._dynamo.reset()
    x = torch.randn(10, H)
    a = distinct_logits(12, 3)
    w1 = torch.randn(3, 2 * FF, H)
    offsets = torch.tensor([0, 4, 4, 10])
    eager = unfused_forward(x, a, w1, offsets)
    compiled = torch.compile(unfused_forward, fullgraph=True, backend="aot_eager")(x, a, w1, offsets)
    for p, q in zip(eager, compiled):
        assert torch.equal(p, q)


def test_compile_inductor_matches_eager():
    # The default inductor backend; about 10 s on two cores, most of it compiling.
    torch._dynamo.reset()
    eager = run(moe_forward, make_inputs())
    compiled = run(torch.compile(moe_forward, fullgraph=True), make_inputs())
    for a, b in zip(eager, compiled):
        # inductor may fuse the surrounding torch ops (router matmul, adds) differently
        assert_close(a, b)


def test_custom_ops_pass_opcheck():
    # torch.library.opcheck validates schema, fake impl vs real impl and autograd registration.
    x = torch.randn(9, 8)
    logits = distinct_logits(9, 5).requires_grad_()
    _, experts, _ = F.topk_gating(logits, top_k=2)
    plan = F.routing_plan(experts, num_experts=5, pad_multiple=2)
    w1 = torch.randn(5, 12, 8, requires_grad=True)
    w2 = torch.randn(5, 8, 6, requires_grad=True)
    cases = [
        (torch.ops.smoe.topk_gating, (logits, None, 2, "softmax", 1, 1, "max", True, 0.0, 1.0, "cpu")),
        (torch.ops.smoe.expert_choice, (logits, 3, "softmax", "cpu")),
        (torch.ops.smoe.z_loss, (logits, "cpu")),
        (torch.ops.smoe.routing_plan, (experts, None, 5, -1, "token_order", 2, "cpu")),
        (torch.ops.smoe.permute, (x.requires_grad_(), plan.token_of_row, plan.row_of, "cpu")),
        (torch.ops.smoe.expert_mlp, (x, plan.token_of_row, plan.offsets, plan.row_of, w1, w2, "swiglu", "cpu")),
        (torch.ops.smoe.activation, (torch.randn(7, 10, requires_grad=True), "swiglu", "cpu")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_codes_agree_with_the_extension():
    codes = _core.lib().CODES
    assert codes["f32"] == _core.DTYPE_CODES[torch.float32]
    assert codes["f16"] == _core.DTYPE_CODES[torch.float16]
    assert codes["bf16"] == _core.DTYPE_CODES[torch.bfloat16]
    assert codes["f64"] == _core.DTYPE_CODES[torch.float64]
    assert codes["i32"] == _core.DTYPE_CODES[torch.int32]
    assert codes["i64"] == _core.DTYPE_CODES[torch.int64]
    assert codes["u8"] == _core.DTYPE_CODES[torch.uint8]
    assert codes["cpu"] == _core.DEVICE_CODES["cpu"]
    assert codes["cuda"] == _core.DEVICE_CODES["cuda"]
    assert codes["backend_cpu"] == _core.backend_code("cpu")
    assert codes["backend_simt"] == _core.backend_code("simt")


def test_view_rejects_what_the_core_cannot_read():
    with pytest.raises(TypeError, match="'t'.*dtype"):
        _core.view(torch.zeros(3, dtype=torch.bool), "t")
    with pytest.raises(ValueError, match="'t'.*4 dims"):
        _core.view(torch.zeros(1, 1, 1, 1, 1), "t")
    with pytest.raises(ValueError, match="'t'.*meta"):
        _core.view(torch.zeros(3, device="meta"), "t")


def test_reference_backend_runs_the_reference():
    # The whole chained layer in f64: each op's f32 error compounds through five stages, f64 keeps the
    # comparison at the table's f64 row.
    got = run(lambda *a: moe_forward(*a, backend="reference"), make_inputs(dtype=torch.float64))
    want = run(moe_forward, make_inputs(dtype=torch.float64))
    for a, b in zip(got, want):
        assert_close(a, b)


_THREADS_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_ops_compile import make_inputs, moe_forward, run
torch.save(run(moe_forward, make_inputs()), sys.argv[1])
"""


def test_results_do_not_depend_on_the_thread_count(tmp_path):
    # Separate processes with SMOE_NUM_THREADS = 1 and 2: the pool's chunking depends only on sizes.
    here = os.path.dirname(__file__)
    outs = []
    for n in (1, 2):
        path = tmp_path / f"out{n}.pt"
        env = dict(os.environ, SMOE_NUM_THREADS=str(n))
        subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(path), here], check=True, env=env, timeout=300)
        outs.append(torch.load(path))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_set_num_threads_rejects_bad_values():
    with pytest.raises(ValueError, match="'n'"):
        smoe.set_num_threads(0)
    assert smoe.num_threads() >= 1


def test_set_num_threads_after_use_gives_the_same_bits(threads):
    want = run(moe_forward, make_inputs())
    for n in (1, 2):
        smoe.set_num_threads(n)
        assert smoe.num_threads() == n
        for a, b in zip(want, run(moe_forward, make_inputs())):
            assert torch.equal(a, b)

"""Reliability (issue 9): no hang after fork or a failed thread start, empty and strided inputs, f64
layers, overflow-checked sizes, and errors that name the argument.

Every scenario that used to hang runs in a subprocess under a timeout, so a regression fails the test
instead of stalling the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import smoe
import smoe.functional as F
import torch
from conftest import subprocess_env  # noqa: E402
from smoe import _core
from smoe.nn import MoE
from smoe.testing import assert_close

ROOT = Path(__file__).resolve().parents[2]
HAS_SIMT = "simt" in smoe.BACKENDS
BACKENDS = ["cpu", "simt"] if HAS_SIMT else ["cpu"]
INF = float("inf")


def _python(code: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter with this tree's smoe; fails the test on a timeout (a hang)."""
    full_env = subprocess_env()
    full_env.update(env or {})
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=full_env
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hang: the subprocess did not finish in {timeout} s\nstdout: {e.stdout}\nstderr: {e.stderr}")


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc.stdout


# ---- thread pool -----------------------------------------------------------------------------------

# A smoe op big enough to use the pool. Its input comes from torch.randn, which is serial: torch's own
# OpenMP pool is not fork-safe (a parallel torch op in a forked child can hang on its own; DataLoader
# workers call torch.set_num_threads(1) for that reason), and these tests are about smoe's pool.
_PARALLEL_OP = """
import torch
_X = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))

def parallel_op():
    import smoe.functional as F
    return float(F.z_loss(_X, backend="cpu"))
"""


def test_failed_thread_start_leaves_a_consistent_pool():
    # An address-space limit makes thread creation fail part way (each thread maps its stack).
    out = _ok(
        _python(
            _PARALLEL_OP
            + """
import resource, smoe
smoe.set_num_threads(2)
expected = parallel_op()
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), hard))
try:
    smoe.set_num_threads(256)
    raised = None
except RuntimeError as e:
    raised = str(e)
finally:
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
n = smoe.num_threads()
assert raised is not None and "set_num_threads" in raised, raised
assert 1 <= n < 256, n
assert f"runs with {n} thread(s)" in raised, (raised, n)
assert parallel_op() == expected  # runs on the threads the pool really has, does not wait for others
smoe.set_num_threads(3)  # and the pool can be resized again
assert smoe.num_threads() == 3 and parallel_op() == expected
print("ok", n)
"""
        )
    )
    assert out.startswith("ok")


def test_op_in_forked_child_after_parent_used_the_pool():
    out = _ok(
        _python(
            _PARALLEL_OP
            + """
import multiprocessing as mp
import smoe
smoe.set_num_threads(3)
expected = parallel_op()

def child(q):
    q.put((parallel_op(), smoe.num_threads()))

ctx = mp.get_context("fork")
q = ctx.Queue()
procs = [ctx.Process(target=child, args=(q,)) for _ in range(2)]
for p in procs:
    p.start()
results = [q.get(timeout=30) for _ in procs]
for p in procs:
    p.join(30)
    assert p.exitcode == 0, p.exitcode
assert all(r == (expected, 3) for r in results), results
print("ok")
"""
        )
    )
    assert out.strip() == "ok"


def test_forked_child_that_never_touches_smoe_exits():
    # The child inherits the parent's pool (and simt runner) objects but none of their threads: its
    # exit must not join them.
    code = (
        _PARALLEL_OP
        + """
import os, smoe, torch, smoe.functional as F
parallel_op()
if "simt" in smoe.BACKENDS:
    F.z_loss(torch.randn(4, 3), backend="simt")
pid = os.fork()
if pid == 0:
    import sys
    sys.exit(0)  # a normal interpreter exit: static destructors and atexit handlers run
_, status = os.waitpid(pid, 0)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
print("ok")
"""
    )
    assert _ok(_python(code, timeout=30)).strip() == "ok"


def test_dataloader_workers_run_smoe_ops():
    out = _ok(
        _python(
            """
import torch, smoe, smoe.functional as F
from torch.utils.data import DataLoader, Dataset
smoe.set_num_threads(2)
layer = smoe.nn.MoE(16, 8, 4, 2, backend="cpu")
x = torch.randn(64, 16)
layer(x)  # the parent uses the pool before the workers fork

class Routed(Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        with torch.no_grad():
            return layer(x[i * 16:(i + 1) * 16])

with torch.no_grad():
    want = torch.cat([layer(x[i * 16:(i + 1) * 16]) for i in range(4)])
loader = DataLoader(Routed(), batch_size=1, num_workers=2, multiprocessing_context="fork", timeout=30)
got = torch.cat([b[0] for b in loader])
assert torch.equal(got, want)
print("ok")
""",
            timeout=90,
        )
    )
    assert out.strip() == "ok"


def test_set_num_threads_rejects_bad_counts():
    with pytest.raises(ValueError, match="'n'"):
        smoe.set_num_threads(0)
    with pytest.raises(ValueError, match="'n'"):
        smoe.set_num_threads(2**40)
    with pytest.raises(TypeError, match="'n'"):
        smoe.set_num_threads(2.0)


# ---- overflow-checked sizes ------------------------------------------------------------------------


def test_numel_overflow_is_rejected_before_any_access():
    lib = _core.lib()
    # (2^62, 4) elements: the product wraps to 0 in 64 bits, so a null pointer passed the null check.
    huge = (0, _core.DTYPE_CODES[torch.float32], 0, 0, (2**62, 4), (4, 1))
    tor = torch.zeros(4, dtype=torch.int32)
    xs = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="'x'.*fits in int64"):
        lib.permute_forward(backend=1, stream=0, x=huge, token_of_row=_core.view(tor), xs=_core.view(xs))


def test_workspace_queries_saturate_instead_of_overflowing():
    lib = _core.lib()
    big = 2**40
    for fn, kw in (
        (lib.expert_mlp_workspace_bytes, dict(R=big, H=big, F=big)),
        (lib.shared_expert_workspace_bytes, dict(T=big, H=big, F=big)),
    ):
        assert fn(act=0, dtype=0, **kw) == 2**63 - 1
        assert fn(act=0, dtype=0, **{k: 3 for k in kw}) > 0
    # routing: T*K beyond int32 rows needs no workspace (routing_plan rejects it), never a wrapped size
    assert lib.routing_plan_workspace_bytes(num_experts=8, capacity=4, drop_policy=1, pad_multiple=1, T=2**62, K=4) == 0
    assert (
        lib.routing_plan_max_rows(num_experts=8, capacity=-1, drop_policy=0, pad_multiple=1, T=2**62, K=4) == 2**63 - 1
    )


@pytest.mark.parametrize(
    "T,K,E,cap,pad",
    [
        (0, 1, 1, None, 1),
        (7, 2, 4, None, 1),
        (7, 2, 4, 3, 8),
        (100, 8, 64, 0, 128),
        (5, 0, 3, 2, 2),
        (2**20, 8, 256, 2**40, 1),
    ],
)
def test_routing_plan_max_rows_matches_the_cpp_query(T, K, E, cap, pad):
    want = _core.lib().routing_plan_max_rows(
        num_experts=E, capacity=-1 if cap is None else cap, drop_policy=0, pad_multiple=pad, T=T, K=K
    )
    assert F.routing_plan_max_rows(T, K, num_experts=E, capacity=cap, pad_multiple=pad) == want


@pytest.mark.parametrize(
    "kwargs,arg,exc",
    [
        (dict(T=-10, K=1, num_experts=1), "'T'", ValueError),
        (dict(T=2, K=-1, num_experts=1), "'K'", ValueError),
        (dict(T=2, K=1, num_experts=-10), "'num_experts'", ValueError),
        (dict(T=2, K=1, num_experts=4, pad_multiple=0), "'pad_multiple'", ValueError),
        (dict(T=2, K=1, num_experts=4, capacity=-3), "'capacity'", ValueError),
        (dict(T=2, K=1, num_experts=2**31), "'num_experts'", ValueError),
        (dict(T=2.0, K=1, num_experts=4), "'T'", TypeError),
    ],
)
def test_routing_plan_max_rows_validates(kwargs, arg, exc):
    T, K = kwargs.pop("T"), kwargs.pop("K")
    with pytest.raises(exc, match=arg):
        F.routing_plan_max_rows(T, K, **kwargs)


def test_routing_plan_rows_beyond_int32_rejected_before_allocating():
    experts = torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="'experts'.*2\\^31"):
        F.routing_plan(experts, num_experts=4, pad_multiple=2**30, backend="cpu")


# ---- one rule for empty tensors --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tensors_with_a_zero_inner_dimension(backend):
    R = torch.tensor([0, 1, 3])
    # grouped_gemm with Kd = 0 (c = 0), N = 0, and R = 0
    a, b = torch.randn(3, 0), torch.randn(2, 4, 0)
    assert torch.equal(F.grouped_gemm(a, b, R, backend=backend), torch.zeros(3, 4))
    assert F.grouped_gemm(torch.randn(3, 5), torch.randn(2, 0, 5), R, backend=backend).shape == (3, 0)
    # routing_plan and combine with K = 0
    plan = F.routing_plan(torch.zeros(3, 0, dtype=torch.int32), num_experts=4, backend=backend)
    ref = F.routing_plan(torch.zeros(3, 0, dtype=torch.int32), num_experts=4, backend="reference")
    for got, want in zip(plan, ref):
        assert torch.equal(got, want)
    y = F.combine(torch.randn(0, 4), torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.int32), backend=backend)
    assert torch.equal(y, torch.zeros(3, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_gradients_with_zero_strides(backend):
    # autograd's empty gradient: shape (0, H) with strides (0, 0)
    g = torch.as_strided(torch.empty(0), (0, 8), (0, 0))
    assert g.stride() == (0, 0)
    ys, w = torch.randn(0, 8), torch.zeros(0, 2)
    row_of = torch.zeros(0, 2, dtype=torch.int32)
    gys, gw = torch.ops.smoe.combine_backward(g, ys, w, row_of, True, True, backend)
    assert gys.shape == (0, 8) and gw.shape == (0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["plain", "expert_choice", "shared"])
def test_layer_backward_with_no_tokens(backend, kind):
    kwargs = {
        "plain": {},
        "expert_choice": {"expert_choice": True},
        "shared": {"num_shared_experts": 1, "shared_gate": True},
    }[kind]
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, 2, backend=backend, **kwargs)
    x = torch.zeros(0, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 8)
    for name, p in layer.named_parameters():
        assert p.grad is None or not p.grad.any(), name


# ---- f64 routing, strided layer inputs ---------------------------------------------------------------


def test_all_float64_layer_matches_reference():
    torch.manual_seed(0)
    cpu = MoE(8, 16, 4, 2, dtype=torch.float64, router_dtype=torch.float64, backend="cpu")
    ref = MoE(8, 16, 4, 2, dtype=torch.float64, router_dtype=torch.float64, backend="reference")
    ref.load_state_dict(cpu.state_dict())
    x = torch.randn(9, 8, dtype=torch.float64)
    outs = {}
    for name, layer in (("cpu", cpu), ("ref", ref)):
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.pow(2).sum().backward()
        outs[name] = (y.detach(), xx.grad, layer.router.weight.grad, layer.w1.grad)
    assert outs["cpu"][0].dtype == torch.float64
    # the reference layer computes in f32 (then casts), so the f32 tolerance applies
    for got, want in zip(outs["cpu"], outs["ref"]):
        assert_close(got, want, dtype=torch.float32)


@pytest.mark.skipif(not HAS_SIMT, reason="no simt backend in this build")
def test_float64_layer_on_simt_says_why():
    layer = MoE(8, 16, 4, 2, dtype=torch.float64, router_dtype=torch.float64, backend="simt")
    with pytest.raises(RuntimeError, match="f64.*CPU backend"):
        layer(torch.randn(3, 8, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_layer_inputs(backend):
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, 2, backend=backend)
    x = torch.randn(8, 5)
    xt = x.t()  # [5, 8], stride (1, 5)
    assert torch.equal(layer(xt), layer(xt.contiguous()))
    row = torch.randn(1, 8)
    assert torch.equal(layer(row.expand(6, 8)), layer(row.expand(6, 8).contiguous()))
    one = torch.randn(1, 1).expand(1, 8)  # a single token with stride(1) == 0
    assert torch.equal(layer(one), layer(one.contiguous()))
    x3 = torch.randn(2, 8, 3).transpose(1, 2)  # [2, 3, 8], strided
    xg = x3.clone().requires_grad_()
    xc = x3.contiguous().requires_grad_()
    layer(xg).sum().backward()
    layer(xc).sum().backward()
    assert torch.equal(xg.grad, xc.grad)


# ---- z_loss with infinities, simt's row_of rule ------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_loss_with_infinite_logits(backend):
    for logits in ([[INF, 0.0], [1.0, 2.0]], [[-INF, -INF], [1.0, 2.0]], [[INF, -INF]], [[INF, INF]]):
        L = torch.tensor(logits)
        want = F.z_loss(L, backend="reference")
        got = F.z_loss(L, backend=backend)
        assert torch.isinf(want) and torch.equal(got, want), (logits, got, want)


@pytest.mark.skipif(not HAS_SIMT, reason="no simt backend in this build")
def test_simt_expert_choice_backward_ignores_row_of_outside_range():
    torch.manual_seed(0)
    T, E, C = 6, 4, 2
    logits = torch.randn(T, E)
    _, _, row_of, scores = F.expert_choice(logits, capacity=C, backend="cpu")
    gw = torch.randn(T, E)
    bad = row_of.clone()
    chosen = bad >= 0
    # out of [-1, R): counts as -1 (docs/cuda.md, data rules)
    bad[~chosen] = torch.tensor([E * C, -2, 2**30, -(2**31)], dtype=torch.int32).repeat(T * E)[: int((~chosen).sum())]
    want = torch.ops.smoe.expert_choice_backward(scores, row_of, gw, None, C, "softmax", "cpu")
    got = torch.ops.smoe.expert_choice_backward(scores, bad, gw, None, C, "softmax", "simt")
    assert_close(got, want)
    # the CPU backend reports the bad entries instead
    with pytest.raises(ValueError, match="'row_of'"):
        torch.ops.smoe.expert_choice_backward(scores, bad, gw, None, C, "softmax", "cpu")


# ---- range checks before any allocation, with messages naming the argument ---------------------------


def test_capacity_factor_beyond_range_rejected_by_constructor():
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(8, 16, 4, 2, capacity_factor=1e300)
    MoE(8, 16, 4, 2, capacity_factor=1e6)(torch.randn(3, 8))  # large but representable: dropless in effect


def test_custom_ops_called_directly():
    ops = torch.ops.smoe
    logits = torch.randn(3, 4)
    with pytest.raises(ValueError, match="'score_func'.*'xyz'"):
        ops.topk_gating(logits, None, 1, "xyz", 1, 1, "max", False, 0.0, 1.0, "cpu")
    with pytest.raises(ValueError, match="'group_score'"):
        ops.topk_gating(logits, None, 1, "softmax", 1, 1, "xyz", False, 0.0, 1.0, "cpu")
    with pytest.raises(ValueError, match="'logits'.*2-D"):
        ops.topk_gating(torch.randn(4), None, 1, "softmax", 1, 1, "max", False, 0.0, 1.0, "cpu")
    with pytest.raises(ValueError, match="'top_k'"):  # checked before a [T, 2^33] allocation
        ops.topk_gating(logits, None, 2**33, "softmax", 1, 1, "max", False, 0.0, 1.0, "cpu")
    with pytest.raises(ValueError, match="'capacity'"):
        ops.expert_choice(logits, 2**40, "softmax", "cpu")
    with pytest.raises(ValueError, match="'drop_policy'"):
        ops.routing_plan(torch.zeros(3, 2, dtype=torch.int32), None, 4, -1, "xyz", 1, "cpu")
    with pytest.raises(ValueError, match="'kind'"):
        ops.activation(torch.randn(3, 4), "xyz", "cpu")
    with pytest.raises(ValueError, match="'x'.*2-D"):
        ops.permute(torch.randn(3), torch.zeros(3, dtype=torch.int32), torch.zeros(3, 1, dtype=torch.int32), "cpu")
    with pytest.raises(ValueError, match="'b'.*3-D"):
        ops.grouped_gemm(torch.randn(3, 4), torch.randn(4, 4), torch.tensor([0, 3]), True, "cpu")


def test_plain_tuple_as_routing_plan():
    experts = torch.randint(0, 4, (5, 2), dtype=torch.int32)
    plan = F.routing_plan(experts, num_experts=4, backend="cpu")
    x = torch.randn(5, 8)
    assert torch.equal(F.permute(x, tuple(plan), backend="cpu"), F.permute(x, plan, backend="cpu"))
    with pytest.raises(TypeError, match="'plan.row_of'"):
        F.permute(x, (plan.counts, plan.offsets, None, plan.token_of_row), backend="cpu")
    with pytest.raises(TypeError, match="'plan'"):
        F.permute(x, [plan.counts], backend="cpu")


@pytest.mark.parametrize(
    "call,arg,exc",
    [
        (lambda e, L: F.routing_plan(e, num_experts=2**31), "'num_experts'", ValueError),
        (lambda e, L: F.routing_plan(e, num_experts=4, pad_multiple=2**33), "'pad_multiple'", ValueError),
        (lambda e, L: F.routing_plan(e, num_experts=4, capacity=2**64), "'capacity'", ValueError),
        (lambda e, L: F.routing_plan(e, num_experts=4.0), "'num_experts'", TypeError),
        (lambda e, L: F.topk_gating(L, top_k=1, n_groups=2**33), "'n_groups'", ValueError),
        (lambda e, L: F.topk_gating(L, top_k=1, n_groups=2.0), "'n_groups'", TypeError),
        (lambda e, L: F.topk_gating(L, top_k=1, topk_groups=2**31), "'topk_groups'", ValueError),
        (lambda e, L: F.topk_gating(L, top_k=2**33), "'top_k'", ValueError),
        (lambda e, L: F.expert_choice(L, capacity=2**64), "'capacity'", ValueError),
    ],
)
def test_integers_beyond_the_c_range(call, arg, exc):
    experts = torch.zeros(3, 2, dtype=torch.int32)
    logits = torch.randn(3, 4)
    with pytest.raises(exc, match=arg):
        call(experts, logits)

"""Per-stage breakdown of one MoE layer step: where the time goes, stage by stage, for each backend.

Each stage runs on its own, through smoe.functional with the backend asked for, on inputs that are
leaves of their own (so a stage's backward is that stage's alone):
  forward   router matmul, gating, routing plan, permute, GEMM 1, activation, GEMM 2, combine
  backward  combine, GEMM 2, activation, GEMM 1, permute, gating, router matmul (input + weight grads)
The layer itself fuses permute + GEMM 1 + activation + GEMM 2 into expert_mlp (one op, no [R, F1]
round trip through torch), so the sum of the stages is an upper bound of the fused layer's time; the
breakdown shows the shares. Backends: "cpu" and "reference" at the benchmark's shapes, "simt" (the
emulated CUDA kernels) at a small shape; the GPU suite (bench/gpu/bench_layer.py) calls
stage_breakdown with device="cuda". Times are medians over `repeats` runs after one warm-up.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = [
    "FORWARD_STAGES",
    "BACKWARD_STAGES",
    "stage_breakdown",
    "breakdown_all",
    "gpu_suite_breakdown",
    "format_breakdown",
    "plot_breakdown",
]

FORWARD_STAGES = ("router matmul", "gating", "routing plan", "permute", "GEMM 1", "activation", "GEMM 2", "combine")
BACKWARD_STAGES = (
    "combine bwd",
    "GEMM 2 bwd",
    "activation bwd",
    "GEMM 1 bwd",
    "permute bwd",
    "gating bwd",
    "router matmul bwd",
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().clone().requires_grad_(grad)


def stage_breakdown(
    shape, dtype: torch.dtype, backend: str, *, device="cpu", warmup: int = 1, repeats: int = 3, backward: bool = True
) -> Dict[str, float]:
    """{stage name: median ms} for one layer step of `shape` (smoe.bench.layer.Shape) on `backend`."""
    import smoe.functional as F

    device = torch.device(device)
    s = shape
    gen = torch.Generator().manual_seed(0)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rand(s.T, s.H)
    wr = (torch.randn(s.E, s.H, generator=gen) * s.H**-0.5).to(device)
    w1 = rand(s.E, 2 * s.F, s.H, scale=s.H**-0.5)
    w2 = rand(s.E, s.H, s.F, scale=s.F**-0.5)
    gate_kw = dict(top_k=s.K, renormalize=True)
    score_func, n_groups = getattr(s, "score_func", "softmax"), getattr(s, "n_groups", 1)
    if score_func != "softmax" or n_groups > 1:
        gate_kw.update(score_func=score_func, n_groups=n_groups, topk_groups=s.topk_groups)
    out: Dict[str, float] = {}
    fwd = {}

    # forward: each stage on leaves of its own; its output feeds the next stage
    xr, wrl = _leaf(x.float(), backward), _leaf(wr, backward)
    fwd["router matmul"] = (lambda: torch.nn.functional.linear(xr, wrl), (xr, wrl))
    logits = fwd["router matmul"][0]().detach()
    lg = _leaf(logits, backward)
    fwd["gating"] = (lambda: F.topk_gating(lg, backend=backend, **gate_kw)[0], (lg,))
    weights, experts, _ = F.topk_gating(logits, backend=backend, **gate_kw)
    fwd["routing plan"] = (lambda: F.routing_plan(experts, num_experts=s.E, backend=backend), ())
    plan = F.routing_plan(experts, num_experts=s.E, backend=backend)
    xp = _leaf(x, backward)
    fwd["permute"] = (lambda: F.permute(xp, plan, backend=backend), (xp,))
    xs = _leaf(F.permute(x, plan, backend=backend), backward)
    w1l, w2l = _leaf(w1, backward), _leaf(w2, backward)
    fwd["GEMM 1"] = (lambda: F.grouped_gemm(xs, w1l, plan.offsets, backend=backend), (xs, w1l))
    h = _leaf(F.grouped_gemm(xs.detach(), w1, plan.offsets, backend=backend), backward)
    fwd["activation"] = (lambda: F.activation(h, kind="swiglu", backend=backend), (h,))
    a = _leaf(F.activation(h.detach(), kind="swiglu", backend=backend), backward)
    fwd["GEMM 2"] = (lambda: F.grouped_gemm(a, w2l, plan.offsets, backend=backend), (a, w2l))
    ys = _leaf(F.grouped_gemm(a.detach(), w2, plan.offsets, backend=backend), backward)
    wl = _leaf(weights, backward)
    fwd["combine"] = (lambda: F.combine(ys, wl, plan, backend=backend), (ys, wl))

    with torch.set_grad_enabled(False):
        for name in FORWARD_STAGES:
            out[name] = _time(fwd[name][0], device, warmup, repeats)
    if backward:
        for name in reversed(FORWARD_STAGES):
            fn, inputs = fwd[name]
            if not inputs:
                continue
            y = fn()
            g = torch.ones_like(y)

            def bwd(y=y, inputs=inputs, g=g):
                torch.autograd.grad(y, inputs, g, retain_graph=True)

            out[name + " bwd"] = _time(bwd, device, warmup, repeats)
    return out


# The emulator runs every CUDA thread as a fiber on the CPU: a shape it finishes in seconds.
def _simt_shape():
    from smoe.bench.layer import Shape

    return Shape("simt-small", T=64, H=64, F=64, E=4, K=2)


def breakdown_all(
    *,
    quick: bool = False,
    shapes=None,
    dtypes: Sequence[str] = ("fp32",),
    backends: Optional[Sequence[str]] = None,
    plots: Optional[str] = None,
    repeats: int = 3,
) -> List[dict]:
    """The breakdown for every backend this build runs: rows {'shape', 'dtype', 'backend', 'stages'}."""
    from smoe import _core
    from smoe.bench.layer import DTYPES, parse_shapes

    if shapes is None:
        shapes = parse_shapes(None, quick)
    if backends is None:
        backends = [b for b in ("cpu", "reference", "simt") if b in _core.BUILT_BACKENDS]
    rows = []
    for b in backends:
        if b == "simt":
            for d in ("fp32",):
                rows.append(
                    {
                        "shape": "simt-small",
                        "dtype": d,
                        "backend": b,
                        "stages": stage_breakdown(_simt_shape(), DTYPES[d], b, repeats=1, warmup=0),
                    }
                )
            continue
        for s in shapes:
            for d in dtypes:
                rows.append(
                    {
                        "shape": s.name,
                        "dtype": d,
                        "backend": b,
                        "stages": stage_breakdown(s, DTYPES[d], b, repeats=repeats if b != "reference" else 1),
                    }
                )
    if plots:
        import os

        plot_breakdown(rows, os.path.join(plots, "breakdown.png"))
    return rows


def gpu_suite_breakdown(
    shapes,
    *,
    dtype=torch.bfloat16,
    backend: str = "cuda",
    device: str = "cuda",
    repeats: int = 5,
    png: Optional[str] = None,
) -> List[dict]:
    """The breakdown for bench/gpu/bench_layer.py: its shapes (anything with T, H, F, E, K and a name),
    on the CUDA backend, timed with a device synchronisation around each run; prints the table and
    writes the PNG when asked. Rows as breakdown_all returns them."""
    rows = [
        {
            "shape": s.name,
            "dtype": str(dtype).replace("torch.", ""),
            "backend": backend,
            "stages": stage_breakdown(s, dtype, backend, device=device, repeats=repeats),
        }
        for s in shapes
    ]
    print(format_breakdown(rows))
    if png:
        plot_breakdown(rows, png)
    return rows


def format_breakdown(rows: Sequence[dict]) -> str:
    stages = list(FORWARD_STAGES) + list(BACKWARD_STAGES)
    head = ["stage"] + [f"{r['backend']} {r['shape']} {r['dtype']}" for r in rows]
    table = [head]
    for st in stages:
        table.append([st] + [f"{r['stages'][st]:.2f}" if st in r["stages"] else "-" for r in rows])
    table.append(["sum"] + [f"{sum(r['stages'].values()):.2f}" for r in rows])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["per-stage breakdown (ms, median):"]
    for i, row in enumerate(table):
        lines.append(
            "  " + "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
        )
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_breakdown(rows: Sequence[dict], path: str) -> str:
    """One horizontal stacked bar per (backend, shape, dtype): each stage's share of the step, in %."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(FORWARD_STAGES) + list(BACKWARD_STAGES)
    labels = [f"{r['backend']} {r['shape']} {r['dtype']} ({sum(r['stages'].values()):.1f} ms)" for r in rows]
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.45 * len(rows)))
    cmap = plt.get_cmap("tab20")
    left = [0.0] * len(rows)
    for i, st in enumerate(stages):
        vals = []
        for r in rows:
            total = sum(r["stages"].values()) or 1.0
            vals.append(100.0 * r["stages"].get(st, 0.0) / total)
        ax.barh(range(len(rows)), vals, left=left, color=cmap(i % 20), label=st)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("% of the step (sum of the stages run one by one)")
    ax.set_title("smoe MoE layer: per-stage breakdown")
    ax.legend(ncol=5, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.02 * len(rows) ** 0.5))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""The MoE layer benchmark: smoe.nn.MoE against the machine's own peak and every CPU peer, in one run.

Everything is measured in one process, interleaved, so the figures that matter are ratios
(ARCHITECTURE.md section 6):
  - % peak: achieved GFLOP/s / the best GFLOP/s of the FMA (fp32) or vdpbf16ps (bf16) microkernel on
    every thread of smoe's pool, measured in this run (smoe.bench.system.measure_peak);
  - % dense: one dense torch matmul with the layer's expert FLOPs, same dtype and pass, time / time;
  - smoe x: this implementation's time / smoe's time (> 1: smoe is faster), within one process.
Contenders per (shape, dtype, pass): smoe (smoe.nn.MoE, backend "auto"), the peers of
smoe.bench.peers (transformers 4.x Mixtral / Qwen3-MoE / DeepSeek-V3 blocks, transformers 5.x eager
and grouped_mm experts when 5.x is importable, torch._grouped_mm called directly) and dense.
The transformers 5.x peers run in a second interpreter (--tf5-python, default build/tf5/bin/python)
when this one has 4.x: that process times smoe and the 5.x peers the same way, and its rows are merged
(column "proc" = tf5; their "smoe x" is against the smoe row of that process).
FLOPs: forward = 2*T*K*H*F1 + 2*T*K*F*H + 2*T*H*E (router) + shared expert 2*T*H*(F1s + Fs);
backward = 2 x forward.
Timing: `warmup` untimed runs of each contender, then `repeats` rounds; each round measures the peak
once and runs every contender once (the order rotates per round). Reported: median, and spread =
(max - min) / median over the rounds; minor page faults per step beside them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Dict, List, Optional, Sequence

import torch

from smoe.bench import system

__all__ = [
    "Shape",
    "SHAPES",
    "QUICK_SHAPES",
    "Result",
    "run_benchmark",
    "format_table",
    "print_table",
    "layer_flops",
    "parse_shapes",
    "check_targets",
    "format_targets",
    "main",
    "DEFAULT_TF5_PYTHON",
]


@dataclass(frozen=True)
class Shape:
    name: str
    T: int
    H: int
    F: int
    E: int
    K: int
    score_func: str = "softmax"
    n_groups: int = 1
    topk_groups: int = 1
    shared: int = 0  # shared experts of size F each

    def spec(self) -> str:
        return f"{self.T}x{self.H}x{self.F}x{self.E}x{self.K}"


SHAPES: Dict[str, Shape] = {
    "mixtral": Shape("mixtral", T=2048, H=1024, F=3584, E=8, K=2),
    "fine": Shape("fine", T=2048, H=1024, F=512, E=64, K=6),
    # DeepSeek-V3's routing (sigmoid, 8 groups, top-4 groups, top-8 of 256, one shared expert) at
    # H = 512, F = 256: 200 MB of expert weights in fp32, so every peer's copy fits this machine.
    "deepseek": Shape(
        "deepseek", T=2048, H=512, F=256, E=256, K=8, score_func="sigmoid", n_groups=8, topk_groups=4, shared=1
    ),
}
# --quick / --tiny: the same three regimes, small enough for CI (seconds).
QUICK_SHAPES: Dict[str, Shape] = {
    "mixtral": Shape("mixtral-quick", T=256, H=256, F=512, E=8, K=2),
    "fine": Shape("fine-quick", T=256, H=256, F=128, E=32, K=4),
    "deepseek": Shape(
        "deepseek-quick", T=256, H=128, F=64, E=32, K=4, score_func="sigmoid", n_groups=8, topk_groups=4, shared=1
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("fwd", "fwd+bwd")
DEFAULT_TF5_PYTHON = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
    "build",
    "tf5",
    "bin",
    "python",
)

# Targets of the issue (forward+backward): % of the measured peak per (shape, dtype), and ahead of
# every peer everywhere.
PEAK_TARGETS = {("mixtral", "fp32"): 0.80, ("mixtral", "bf16"): 0.70, ("fine", "fp32"): 0.70, ("fine", "bf16"): 0.60}


@dataclass
class Result:
    shape: str
    T: int
    H: int
    F: int
    E: int
    K: int
    dtype: str
    pass_: str
    impl: str
    time_ms: float  # median over the rounds
    gflops: float  # achieved GFLOP/s (layer FLOPs / time)
    gbytes: float  # GB/s of the minimum traffic: weights once + x in + y out (x2 for fwd+bwd)
    roof_fraction: float  # dense torch matmul time / time
    speedup_vs_hf: Optional[float]  # HF Mixtral loop (or the torch loop) time / time
    peak_fraction: Optional[float] = None  # gflops / measured peak of the dtype
    smoe_speedup: Optional[float] = None  # time / smoe's time in the same process
    spread: float = 0.0  # (max - min) / median over the rounds
    min_ms: float = 0.0
    max_ms: float = 0.0
    repeats: int = 0
    faults_per_step: float = 0.0  # median minor page faults of one step
    # gflops / the median of the peaks measured between this config's rounds: on a shared machine the
    # share of the cores this config actually had (peak_fraction is against the best peak of the run)
    round_peak_fraction: Optional[float] = None
    proc: str = "main"  # which interpreter measured it ("main", or "tf5" for the merged 5.x run)
    times_ms: List[float] = field(default_factory=list)


def layer_flops(s: Shape, pass_: str) -> float:
    """Forward: 2*T*K*H*F1 + 2*T*K*F*H + 2*T*H*E (SwiGLU: F1 = 2F) + the shared expert; fwd+bwd: 3 x forward."""
    f1 = 2 * s.F
    fwd = 2.0 * s.T * s.K * s.H * f1 + 2.0 * s.T * s.K * s.F * s.H + 2.0 * s.T * s.H * s.E
    fwd += s.shared * (2.0 * s.T * s.H * f1 + 2.0 * s.T * s.F * s.H)
    return fwd if pass_ == "fwd" else 3.0 * fwd


def _layer_bytes(s: Shape, dtype: torch.dtype, pass_: str) -> float:
    elem = torch.tensor([], dtype=dtype).element_size()
    once = ((s.E + s.shared) * (2 * s.F * s.H + s.H * s.F) + 2 * s.T * s.H) * elem + s.E * s.H * 4
    return once if pass_ == "fwd" else 2.0 * once


def parse_shapes(spec: Optional[str], quick: bool) -> List[Shape]:
    """'mixtral,fine,deepseek' (names) or 'TxHxFxExK' entries, comma separated; None means every named shape."""
    table = QUICK_SHAPES if quick else SHAPES
    if not spec:
        return list(table.values())
    shapes = []
    for item in spec.split(","):
        item = item.strip()
        if item in table:
            shapes.append(table[item])
            continue
        named = [x for t in (SHAPES, QUICK_SHAPES) for x in t.values() if x.name == item]
        if named:  # a full name, e.g. 'fine-quick'
            shapes.append(named[0])
            continue
        parts = item.lower().split("x")
        if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(
                f"--shapes entries must be one of {', '.join(table)} or TxHxFxExK with "
                f"positive integers (e.g. 512x256x512x8x2), got {item!r}"
            )
        T, H, F, E, K = map(int, parts)
        if K > E:
            raise ValueError(f"--shapes entry {item!r}: K must be <= E")
        shapes.append(Shape(item, T, H, F, E, K))
    return shapes


def _shape_by_name(name: str) -> Shape:
    for table in (SHAPES, QUICK_SHAPES):
        for s in table.values():
            if s.name == name:
                return s
    return parse_shapes(name, quick=True)[0]


def _base_name(s: Shape) -> str:
    return s.name.split("-")[0]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _step(module: torch.nn.Module, x: torch.Tensor, pass_: str) -> Callable[[], None]:
    if pass_ == "fwd":

        def run():
            with torch.no_grad():
                _first(module(x))

        return run
    xg = x.detach().clone().requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]

    def run_train():
        for p in params:
            p.grad = None
        xg.grad = None
        y = _first(module(xg))
        y.backward(torch.ones_like(y))

    return run_train


def _dense_step(s: Shape, dtype: torch.dtype, pass_: str) -> Callable[[], None]:
    a = torch.randn(s.T * s.K, s.H, dtype=dtype)
    b = torch.randn(s.H, 3 * s.F, dtype=dtype) / math.sqrt(s.H)  # F1 + F = 3F columns
    if pass_ == "fwd":
        return lambda: a @ b
    a.requires_grad_(True)
    b.requires_grad_(True)
    grad = torch.ones(s.T * s.K, 3 * s.F, dtype=dtype)

    def run():
        a.grad = b.grad = None
        (a @ b).backward(grad)

    return run


def make_moe(s: Shape, dtype: torch.dtype, backend: str = "auto"):
    """smoe.nn.MoE of the shape's routing (seed 0)."""
    from smoe.nn import MoE

    torch.manual_seed(0)
    extra = {}
    if s.score_func != "softmax" or s.n_groups > 1 or s.shared:
        extra = dict(
            score_func=s.score_func,
            n_groups=s.n_groups,
            topk_groups=s.topk_groups,
            group_score="top2_sum",
            num_shared_experts=s.shared,
        )
    return MoE(s.H, s.F, s.E, s.K, renormalize=True, dtype=dtype, backend=backend, **extra)


def _contenders(s: Shape, dtype: torch.dtype, backend: str, with_hf: bool, only: Optional[str]):
    from smoe.bench.peers import build_peers

    moe = make_moe(s, dtype, backend)
    moe.train()
    out = {"smoe": moe}
    out.update(build_peers(moe, with_hf=with_hf, only=only))
    return out


def _measure(
    steps: Dict[str, Callable[[], None]], peak_kind: Optional[str], warmup: int, repeats: int, peaks: List[float]
):
    """Interleaved rounds; returns {name: (times s, faults per step)}; appends peak runs to `peaks`."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    names = list(steps)
    times: Dict[str, List[float]] = {n: [] for n in names}
    faults: Dict[str, List[int]] = {n: [] for n in names}
    for r in range(repeats):
        if peak_kind is not None:
            g = system.measure_peak(peak_kind, seconds=0.02, repeats=1)["gflops"]
            if g:
                peaks.append(g)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            f0 = system.minor_faults()
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
            faults[name].append(system.minor_faults() - f0)
    return times, faults


def run_benchmark(
    shapes: Optional[Sequence[Shape]] = None,
    dtypes: Sequence[str] = ("fp32", "bf16"),
    passes: Sequence[str] = PASSES,
    *,
    quick: bool = False,
    warmup: int = 1,
    repeats: int = 5,
    backend: str = "auto",
    with_hf: bool = True,
    only: Optional[str] = None,
    peak: Optional[Dict[str, dict]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> List[Result]:
    """Time every contender on every (shape, dtype, pass); returns one Result per row.

    peak: {'fp32': measure_peak(...), 'bf16': ...} measured before; updated in place with the runs taken
    between rounds (its 'gflops' is the best seen). Measured here when None."""
    if shapes is None:
        shapes = parse_shapes(None, quick)
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtypes must be drawn from {', '.join(DTYPES)}, got {d!r}")
    for p in passes:
        if p not in PASSES:
            raise ValueError(f"passes must be drawn from {', '.join(PASSES)}, got {p!r}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if only not in (None, "hf5"):
        raise ValueError(f"only must be None or 'hf5', got {only!r}")
    if only == "hf5":
        from smoe.bench.peers import transformers_major

        if (transformers_major() or 0) < 5:
            raise ValueError("only='hf5' needs transformers 5.x in this interpreter")
    if peak is None:
        peak = measure_peaks(dtypes)
    rows: List[dict] = []
    for s in shapes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            mods = _contenders(s, dtype, backend, with_hf, only)
            x = torch.randn(s.T, s.H, dtype=dtype)
            x3 = x.view(1, s.T, s.H)  # HF blocks take [batch, seq, H]
            for pass_ in passes:
                if progress:
                    progress(f"{s.name} {dname} {pass_}: {', '.join(mods)}, dense")
                steps = {name: _step(mod, x3, pass_) for name, mod in mods.items()}
                steps["dense"] = _dense_step(s, dtype, pass_)
                runs: List[float] = []
                pk = peak.get(dname) or {}
                times, faults = _measure(
                    steps, pk.get("microkernel") if pk.get("gflops") else None, warmup, repeats, runs
                )
                if runs:
                    pk.setdefault("runs", []).extend(runs)
                    pk["gflops"] = max(pk["runs"])
                rows.append(
                    dict(
                        shape=s,
                        dtype=dname,
                        pass_=pass_,
                        times=times,
                        faults=faults,
                        round_peak=statistics.median(runs) if runs else None,
                    )
                )
    return _results(rows, peak)


def _results(rows: List[dict], peak: Dict[str, dict]) -> List[Result]:
    results: List[Result] = []
    for row in rows:
        s, dname, pass_ = row["shape"], row["dtype"], row["pass_"]
        flops = layer_flops(s, pass_)
        nbytes = _layer_bytes(s, DTYPES[dname], pass_)
        med = {n: statistics.median(t) for n, t in row["times"].items()}
        # the dense roof's rate applied to the layer's FLOPs (the matmul omits the router and shared expert)
        mm_flops = 2.0 * s.T * s.K * s.H * 3 * s.F * (1 if pass_ == "fwd" else 3)
        t_roof = med["dense"] * flops / mm_flops
        t_hf = med.get("hf_mixtral", med.get("torch_loop"))
        pk = (peak.get(dname) or {}).get("gflops")
        for name, t in med.items():
            ts = row["times"][name]
            gf = flops / t / 1e9
            results.append(
                Result(
                    shape=s.name,
                    T=s.T,
                    H=s.H,
                    F=s.F,
                    E=s.E,
                    K=s.K,
                    dtype=dname,
                    pass_=pass_,
                    impl=name,
                    time_ms=t * 1e3,
                    gflops=gf,
                    gbytes=nbytes / t / 1e9,
                    roof_fraction=(t_roof / t) if name != "dense" else 1.0,
                    speedup_vs_hf=(t_hf / t) if t_hf else None,
                    peak_fraction=(gf / pk) if pk else None,
                    smoe_speedup=t / med["smoe"],
                    spread=(max(ts) - min(ts)) / t,
                    min_ms=min(ts) * 1e3,
                    max_ms=max(ts) * 1e3,
                    repeats=len(ts),
                    faults_per_step=float(statistics.median(row["faults"][name])),
                    round_peak_fraction=(gf / row["round_peak"]) if row.get("round_peak") else None,
                    times_ms=[v * 1e3 for v in ts],
                )
            )
    return results


def measure_peaks(dtypes: Sequence[str] = ("fp32", "bf16"), repeats: int = 5) -> Dict[str, dict]:
    """The fp32 and bf16 peaks of this machine (smoe.bench.system.machine_peaks), before a run."""
    return system.machine_peaks(dtypes, repeats=repeats)


# ---------------------------------------------------------------- targets


def check_targets(results: Sequence[Result], peak: Optional[Dict[str, dict]] = None) -> List[dict]:
    """The issue's targets (forward+backward) against the results: one dict per target with 'met'.
    With `peak` (machine_peaks) a bf16 target also reports the fraction of the vdpbf16ps peak
    ('vector_fraction') when the machine's bf16 peak is AMX's."""
    out = []
    by = {}
    for r in results:
        by.setdefault((r.shape, r.dtype, r.pass_, r.proc), {})[r.impl] = r
    for (shape, dtype, pass_, proc), impls in by.items():
        if pass_ != "fwd+bwd" or "smoe" not in impls:
            continue
        sm = impls["smoe"]
        base = shape.split("-")[0]
        want = PEAK_TARGETS.get((base, dtype))
        if want is not None and sm.peak_fraction is not None and proc == "main":
            t = dict(
                target=f"{shape} {dtype} fwd+bwd >= {want:.0%} of peak",
                measured=sm.peak_fraction,
                goal=want,
                ratio=sm.peak_fraction / want,
                met=sm.peak_fraction >= want,
            )
            vec = ((peak or {}).get(dtype) or {}).get("candidates", {}).get("bf16")
            if dtype == "bf16" and vec and (peak or {})[dtype].get("microkernel") != "bf16":
                t["vector_fraction"] = sm.gflops / vec
            if sm.round_peak_fraction is not None:
                t["round_peak_fraction"] = sm.round_peak_fraction
            out.append(t)
    for r in results:  # every peer, the 5.x subprocess's included (its ratio is against its own smoe row)
        if r.pass_ == "fwd+bwd" and r.impl not in ("smoe", "dense") and r.smoe_speedup is not None:
            shape, dtype, name = r.shape, r.dtype, r.impl
            out.append(
                dict(
                    target=f"{shape} {dtype} fwd+bwd ahead of {name}",
                    measured=r.smoe_speedup,
                    goal=1.0,
                    ratio=r.smoe_speedup,
                    met=r.smoe_speedup > 1.0,
                )
            )
    return out


def format_targets(targets: Sequence[dict]) -> str:
    lines = ["targets (forward+backward):"]
    for t in targets:
        if "of peak" in t["target"]:
            got = f"{t['measured']:.0%} of peak ({t['ratio']:.2f}x the goal)"
            if "vector_fraction" in t:
                got += f"; {t['vector_fraction']:.0%} of the vdpbf16ps peak"
            if "round_peak_fraction" in t:
                got += f"; {t['round_peak_fraction']:.0%} of the peak measured between its rounds"
        else:
            got = f"smoe {t['measured']:.2f}x faster" if t["measured"] >= 1 else f"smoe {1 / t['measured']:.2f}x slower"
        lines.append(f"  {'met   ' if t['met'] else 'MISSED'}  {t['target']}: {got}")
    return "\n".join(lines)


# ---------------------------------------------------------------- tables

_HEADERS = (
    "shape",
    "dtype",
    "pass",
    "impl",
    "proc",
    "time ms",
    "spread",
    "GFLOP/s",
    "% peak",
    "% dense",
    "smoe x",
    "faults",
)


def _cells(r: Result) -> List[str]:
    return [
        r.shape,
        r.dtype,
        r.pass_,
        r.impl,
        r.proc,
        f"{r.time_ms:.1f}",
        f"{100 * r.spread:.0f}%",
        f"{r.gflops:.1f}",
        "-" if r.peak_fraction is None else f"{100 * r.peak_fraction:.0f}%",
        f"{100 * r.roof_fraction:.0f}%",
        "-" if r.smoe_speedup is None else f"{r.smoe_speedup:.2f}x",
        f"{r.faults_per_step:.0f}",
    ]


def _legend(results: Sequence[Result], peak: Optional[Dict[str, dict]] = None) -> str:
    seen = {}
    for r in results:
        seen.setdefault(r.shape, f"{r.shape}: T={r.T} H={r.H} F={r.F} E={r.E} K={r.K}")
    text = (
        "shapes: " + "; ".join(seen.values()) + ". time: median over the rounds; spread: (max-min)/median; "
        "% peak: of the microkernel peak below; % dense: dense torch matmul of the same FLOPs; smoe x: time / "
        "smoe's time (same process); faults: minor page faults per step."
    )
    if peak:
        text += " " + format_peak(peak)
    return text


def format_peak(peak: Dict[str, dict]) -> str:
    parts = []
    for d, p in peak.items():
        if p.get("gflops"):
            runs = p.get("runs") or [p["gflops"]]
            txt = (
                f"{d} {p['gflops']:.1f} GFLOP/s ({p['isa']}, {p['threads']} threads, best of {len(runs)}; "
                f"median {statistics.median(runs):.1f})"
            )
            others = {k: v for k, v in (p.get("candidates") or {}).items() if k != p.get("microkernel") and v}
            txt += "".join(f" [{k}: {v:.1f}]" for k, v in others.items())
            parts.append(txt)
        else:
            parts.append(f"{d} not measurable here ({p.get('isa')})")
    return "peak: " + "; ".join(parts) + "."


def format_table(results: Sequence[Result], peak: Optional[Dict[str, dict]] = None) -> str:
    """The results as a plain-text table (what print_table prints when rich is missing)."""
    rows = [list(_HEADERS)] + [_cells(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    lines = [
        "  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(_legend(results, peak))
    return "\n".join(lines)


def print_table(
    results: Sequence[Result], *, title: str = "smoe MoE layer benchmark (CPU)", peak: Optional[Dict[str, dict]] = None
) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(format_table(results, peak))
        return
    table = Table(title=title, caption=_legend(results, peak))
    for i, h in enumerate(_HEADERS):
        table.add_column(h, justify="left" if i < 5 else "right")
    for r in results:
        table.add_row(*_cells(r), style="bold" if r.impl == "smoe" else None)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 130))
    console.print(table)


def _meta() -> dict:
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "torch": torch.__version__,
        "transformers": tf_version,
        "threads": torch.get_num_threads(),
        "cpu": system.cpu_name() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _row_dict(r: Result) -> dict:
    d = asdict(r)
    d["pass"] = d.pop("pass_")
    return d


def write_json(
    results: Sequence[Result],
    path: str,
    *,
    command: Optional[str] = None,
    peak: Optional[Dict[str, dict]] = None,
    extra: Optional[dict] = None,
) -> None:
    meta = _meta()
    if command:
        meta["command"] = command
    data = {
        "meta": meta,
        "peak": peak or {},
        "results": [_row_dict(r) for r in results],
        "targets": check_targets(results, peak),
    }
    if extra:
        data.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def read_results(path: str) -> List[Result]:
    with open(path) as f:
        data = json.load(f)
    names = {f.name for f in fields(Result)}
    out = []
    for d in data["results"]:
        d = dict(d)
        d["pass_"] = d.pop("pass")
        out.append(Result(**{k: v for k, v in d.items() if k in names}))
    return out


def run_tf5(
    python: str,
    shapes: Sequence[Shape],
    dtypes: Sequence[str],
    passes: Sequence[str],
    *,
    warmup: int,
    repeats: int,
    backend: str,
    timeout: float = 3600,
) -> List[Result]:
    """Run the transformers 5.x peers (and smoe, for their ratios) in interpreter `python`; rows with proc 'tf5'."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tf5.json")
        pkg = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        # this package first, then the caller's PYTHONPATH; not this interpreter's sys.path (its
        # site-packages would shadow the 5.x environment's transformers)
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([pkg] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        )
        cmd = [
            python,
            "-m",
            "smoe.bench",
            "--only",
            "hf5",
            "--no-tf5",
            "--no-memory",
            "--no-breakdown",
            "--shapes",
            ",".join(s.name for s in shapes),
            "--dtypes",
            ",".join(dtypes),
            "--passes",
            ",".join(passes),
            "--warmup",
            str(warmup),
            "--repeats",
            str(repeats),
            "--backend",
            backend,
            "--json",
            path,
            "--quiet",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"the transformers 5.x run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        rows = read_results(path)
    keep = []
    for r in rows:
        if r.impl in ("smoe", "dense"):
            continue
        r.proc = "tf5"
        keep.append(r)
    return keep


def _tf5_available(python: Optional[str]) -> Optional[str]:
    from smoe.bench.peers import transformers_major

    major = transformers_major()
    if major is not None and major >= 5:
        return None  # this interpreter runs the 5.x peers itself
    if not python or not os.path.exists(python):
        return None
    try:
        out = subprocess.run(
            [python, "-c", "import transformers; print(transformers.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or int(out.stdout.strip().split(".")[0]) < 5:
        return None
    return python


def main(argv: Optional[Sequence[str]] = None) -> List[Result]:
    import argparse

    p = argparse.ArgumentParser(prog="python -m smoe.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", "--tiny", action="store_true", dest="quick", help="small shapes (CI, tests)")
    p.add_argument(
        "--shapes",
        default=None,
        help="comma-separated names (mixtral, fine, deepseek) or TxHxFxExK entries; default all three",
    )
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated from fp32, bf16")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="comma-separated from fwd, fwd+bwd")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds, median reported (default 5, quick 3)")
    p.add_argument("--backend", default="auto", help="smoe backend for the layer (default auto)")
    p.add_argument("--no-hf", action="store_true", help="no transformers peers (the plain PyTorch loop instead)")
    p.add_argument("--only", default=None, choices=["hf5"], help=argparse.SUPPRESS)
    p.add_argument(
        "--tf5-python",
        default=DEFAULT_TF5_PYTHON,
        help="an interpreter with transformers 5.x for the 5.x peers (default build/tf5/bin/python)",
    )
    p.add_argument("--no-tf5", action="store_true", help="skip the transformers 5.x subprocess")
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc malloc as it is (default: keep freed memory mapped, smoe.bench.system)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS training-step subprocesses")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-stage breakdown")
    p.add_argument(
        "--plots", default=None, metavar="DIR", help="write the breakdown and arithmetic-intensity PNGs into DIR"
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        shapes = parse_shapes(args.shapes, args.quick)
        dtypes = [d.strip() for d in args.dtypes.split(",")]
        passes = [q.strip() for q in args.passes.split(",")]
        repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
        malloc = "system" if args.system_malloc else ("retain" if system.retain_freed_memory() else "system")
        peak = measure_peaks(dtypes)
        say(format_peak(peak))
        results = run_benchmark(
            shapes,
            dtypes,
            passes,
            warmup=args.warmup,
            repeats=repeats,
            backend=args.backend,
            with_hf=not args.no_hf,
            only=args.only,
            peak=peak,
            progress=say,
        )
    except ValueError as err:
        p.error(str(err))
    tf5 = None if (args.no_tf5 or args.no_hf or args.only) else _tf5_available(args.tf5_python)
    if tf5:
        say(f"transformers 5.x peers in {tf5}")
        results += run_tf5(tf5, shapes, dtypes, passes, warmup=args.warmup, repeats=repeats, backend=args.backend)
    extra = {"malloc": malloc, "tf5_python": tf5}
    if not args.no_memory and not args.only:
        from smoe.bench.memory import memory_table

        say("peak RSS of one training step (a subprocess per config)")
        extra["memory"] = memory_table(shapes, dtypes, with_hf=not args.no_hf)
    if not args.no_breakdown and not args.only:
        from smoe.bench.breakdown import breakdown_all

        say("per-stage breakdown")
        extra["breakdown"] = breakdown_all(shapes=shapes, plots=args.plots, dtypes=dtypes)
    if args.plots and not args.only:
        from smoe.bench.intensity import intensity_plot

        extra["intensity"] = intensity_plot(
            os.path.join(args.plots, "arithmetic_intensity.png"),
            peak_fp32=(peak.get("fp32") or {}).get("gflops"),
            peak_bf16=(peak.get("bf16") or {}).get("gflops"),
        )
    if not args.quiet:
        print_table(results, peak=peak)
        print(format_targets(check_targets(results, peak)))
        if "memory" in extra:
            from smoe.bench.memory import format_memory

            print(format_memory(extra["memory"]))
        if "breakdown" in extra:
            from smoe.bench.breakdown import format_breakdown

            print(format_breakdown(extra["breakdown"]))
        print(f"malloc: {malloc}; measured on {system.cpu_name()}, {torch.get_num_threads()} threads")
    if args.json:
        write_json(
            results,
            args.json,
            peak=peak,
            extra=extra,
            command="python -m smoe.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        )
        if not args.quiet:
            print(f"wrote {args.json}")
    return results

"""The MoE layer benchmark: smoe.nn.MoE against the Hugging Face expert loop and the dense roof.

Everything is measured in one process, so the figures that matter are ratios (ARCHITECTURE.md
section 6):
  - fraction of roof: the time one dense torch matmul with the layer's expert FLOPs would take
    (measured now, same dtype, same pass) divided by the layer's time;
  - speedup over the HF loop: transformers' MixtralSparseMoeBlock (same weights) time / layer time.
Contenders per (shape, dtype, pass):
  smoe        smoe.nn.MoE (backend "auto")
  hf_mixtral  transformers' MixtralSparseMoeBlock, same weights (the HF loop; the speedup baseline)
  hf_qwen3    transformers' Qwen3MoeSparseMoeBlock, same weights, norm_topk_prob=True
  torch_loop  a plain PyTorch per-expert loop, only when transformers is not installed
  dense       the roof: x[T*K, H] @ W[H, F1 + F] (same expert FLOPs), in the same process
FLOPs: forward = 2*T*K*H*F1 + 2*T*K*F*H + 2*T*H*E (router); backward = 2 x forward.
Timing: `warmup` untimed runs, then the median of `repeats` timed runs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["Shape", "SHAPES", "QUICK_SHAPES", "Result", "run_benchmark", "format_table", "print_table",
           "layer_flops", "parse_shapes", "main"]


@dataclass(frozen=True)
class Shape:
    name: str
    T: int
    H: int
    F: int
    E: int
    K: int


SHAPES: Dict[str, Shape] = {
    "mixtral": Shape("mixtral", T=2048, H=1024, F=3584, E=8, K=2),
    "fine": Shape("fine", T=2048, H=1024, F=512, E=64, K=6),
}
# --quick: the same two regimes (few big experts / many small ones), small enough for CI.
QUICK_SHAPES: Dict[str, Shape] = {
    "mixtral": Shape("mixtral-quick", T=256, H=256, F=512, E=8, K=2),
    "fine": Shape("fine-quick", T=256, H=256, F=128, E=32, K=4),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("fwd", "fwd+bwd")


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
    time_ms: float
    gflops: float  # achieved GFLOP/s (layer FLOPs / time)
    gbytes: float  # GB/s of the minimum traffic: weights once + x in + y out (x2 for fwd+bwd)
    roof_fraction: float  # dense roof time / time
    speedup_vs_hf: Optional[float]  # HF loop time / time


def layer_flops(s: Shape, pass_: str) -> float:
    """Forward: 2*T*K*H*F1 + 2*T*K*F*H + 2*T*H*E (SwiGLU: F1 = 2F); fwd+bwd: 3 x forward."""
    f1 = 2 * s.F
    fwd = 2.0 * s.T * s.K * s.H * f1 + 2.0 * s.T * s.K * s.F * s.H + 2.0 * s.T * s.H * s.E
    return fwd if pass_ == "fwd" else 3.0 * fwd


def _layer_bytes(s: Shape, dtype: torch.dtype, pass_: str) -> float:
    elem = torch.tensor([], dtype=dtype).element_size()
    once = (s.E * (2 * s.F * s.H + s.H * s.F) + 2 * s.T * s.H) * elem + s.E * s.H * 4
    return once if pass_ == "fwd" else 2.0 * once


def parse_shapes(spec: Optional[str], quick: bool) -> List[Shape]:
    """'mixtral,fine' (names) or 'TxHxFxExK' entries, comma separated; None means both named shapes."""
    table = QUICK_SHAPES if quick else SHAPES
    if not spec:
        return list(table.values())
    shapes = []
    for item in spec.split(","):
        item = item.strip()
        if item in table:
            shapes.append(table[item])
            continue
        parts = item.lower().split("x")
        if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes entries must be one of {', '.join(table)} or TxHxFxExK with "
                             f"positive integers (e.g. 512x256x512x8x2), got {item!r}")
        T, H, F, E, K = map(int, parts)
        if K > E:
            raise ValueError(f"--shapes entry {item!r}: K must be <= E")
        shapes.append(Shape(item, T, H, F, E, K))
    return shapes


def _time(fn: Callable[[], None], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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

    def run():
        a.grad = b.grad = None
        (a @ b).backward(torch.ones(s.T * s.K, 3 * s.F, dtype=dtype))
    return run


class _TorchLoop(torch.nn.Module):
    """A plain PyTorch per-expert loop (what HF does), for machines without transformers."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x3):
        m = self.moe
        x = x3.reshape(-1, x3.shape[-1])  # [T,H]
        logits = x @ m.router.weight.t().to(x.dtype)
        weights, experts = torch.topk(torch.softmax(logits.float(), dim=-1), m.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        y = torch.zeros_like(x)
        for e in range(m.num_experts):
            tok, slot = torch.nonzero(experts == e, as_tuple=True)
            g, u = (x[tok] @ m.w1[e].t()).chunk(2, dim=-1)
            out = (torch.nn.functional.silu(g) * u) @ m.w2[e].t()
            y = y.index_add(0, tok, out * weights[tok, slot, None])
        return y.view_as(x3)


def _contenders(s: Shape, dtype: torch.dtype, backend: str, with_hf: bool):
    from smoe.nn import MoE

    torch.manual_seed(0)
    moe = MoE(s.H, s.F, s.E, s.K, renormalize=True, dtype=dtype, backend=backend)
    out = {"smoe": moe}
    hf_ok = False
    if with_hf:
        try:
            import transformers  # noqa: F401

            hf_ok = True
        except ImportError:
            hf_ok = False
    if hf_ok:
        from smoe.integrations.hf import to_hf

        out["hf_mixtral"] = to_hf(moe, kind="mixtral")
        out["hf_qwen3"] = to_hf(moe, kind="qwen3_moe")
    else:
        out["torch_loop"] = _TorchLoop(moe)
    for m in out.values():
        m.train()
    return out


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
    progress: Optional[Callable[[str], None]] = None,
) -> List[Result]:
    """Time every contender on every (shape, dtype, pass); returns one Result per row."""
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
    results: List[Result] = []
    for s in shapes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            mods = _contenders(s, dtype, backend, with_hf)
            x = torch.randn(s.T, s.H, dtype=dtype)
            x3 = x.view(1, s.T, s.H)  # HF blocks take [batch, seq, H]
            for pass_ in passes:
                flops = layer_flops(s, pass_)
                nbytes = _layer_bytes(s, dtype, pass_)
                if progress:
                    progress(f"{s.name} {dname} {pass_}: dense roof")
                t_roof_mm = _time(_dense_step(s, dtype, pass_), warmup, repeats)
                # the roof's rate applied to the layer's FLOPs (the matmul omits only the router)
                mm_flops = 2.0 * s.T * s.K * s.H * 3 * s.F * (1 if pass_ == "fwd" else 3)
                t_roof = t_roof_mm * flops / mm_flops
                times = {}
                for name, mod in mods.items():
                    if progress:
                        progress(f"{s.name} {dname} {pass_}: {name}")
                    times[name] = _time(_step(mod, x3, pass_), warmup, repeats)
                times["dense"] = t_roof
                t_hf = times.get("hf_mixtral", times.get("torch_loop"))
                for name, t in times.items():
                    results.append(Result(
                        shape=s.name, T=s.T, H=s.H, F=s.F, E=s.E, K=s.K, dtype=dname, pass_=pass_, impl=name,
                        time_ms=t * 1e3, gflops=flops / t / 1e9, gbytes=nbytes / t / 1e9,
                        roof_fraction=t_roof / t, speedup_vs_hf=(t_hf / t) if t_hf else None))
    return results


_HEADERS = ("shape", "dtype", "pass", "impl", "time ms", "GFLOP/s", "GB/s", "% roof", "x HF loop")


def _cells(r: Result) -> List[str]:
    return [r.shape, r.dtype, r.pass_, r.impl,
            f"{r.time_ms:.1f}", f"{r.gflops:.1f}", f"{r.gbytes:.2f}", f"{100 * r.roof_fraction:.0f}%",
            "-" if r.speedup_vs_hf is None else f"{r.speedup_vs_hf:.2f}x"]


def _legend(results: Sequence[Result]) -> str:
    seen = {}
    for r in results:
        seen.setdefault(r.shape, f"{r.shape}: T={r.T} H={r.H} F={r.F} E={r.E} K={r.K}")
    return "shapes: " + "; ".join(seen.values()) + ". % roof: dense matmul of the same FLOPs; x HF loop: " \
        "MixtralSparseMoeBlock time / time."


def format_table(results: Sequence[Result]) -> str:
    """The results as a plain-text table (what print_table prints when rich is missing)."""
    rows = [list(_HEADERS)] + [_cells(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(_legend(results))
    return "\n".join(lines)


def print_table(results: Sequence[Result], *, title: str = "smoe MoE layer benchmark (CPU)") -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(format_table(results))
        return
    table = Table(title=title, caption=_legend(results))
    for i, h in enumerate(_HEADERS):
        table.add_column(h, justify="left" if i < 4 else "right")
    for r in results:
        table.add_row(*_cells(r), style="bold" if r.impl == "smoe" else None)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 110))
    console.print(table)


def _meta() -> dict:
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {"torch": torch.__version__, "transformers": tf_version, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_json(results: Sequence[Result], path: str, *, command: Optional[str] = None) -> None:
    meta = _meta()
    if command:
        meta["command"] = command
    rows = []
    for r in results:
        d = asdict(r)
        d["pass"] = d.pop("pass_")
        rows.append(d)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)


def main(argv: Optional[Sequence[str]] = None) -> List[Result]:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m smoe.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (CI, tests)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated names (mixtral, fine) or TxHxFxExK entries; default both")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated from fp32, bf16")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="comma-separated from fwd, fwd+bwd")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="timed runs, median reported (default 5, quick 3)")
    p.add_argument("--backend", default="auto", help="smoe backend for the layer (default auto)")
    p.add_argument("--no-hf", action="store_true", help="compare with the plain PyTorch loop instead of transformers")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    args = p.parse_args(argv)
    try:
        shapes = parse_shapes(args.shapes, args.quick)
        repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
        results = run_benchmark(
            shapes, [d.strip() for d in args.dtypes.split(",")], [q.strip() for q in args.passes.split(",")],
            warmup=args.warmup, repeats=repeats, backend=args.backend, with_hf=not args.no_hf)
    except ValueError as err:
        p.error(str(err))
    print_table(results)
    if args.json:
        write_json(results, args.json, command="python -m smoe.bench " + " ".join(sys.argv[1:] if argv is None else argv))
        print(f"wrote {args.json}")
    return results

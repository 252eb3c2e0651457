"""GPU benchmark of the smoe MoE layer and of each of its stages (docs/gpu.md explains every column).

    python bench/gpu/bench_layer.py [--shapes mixtral,fine] [--quick] [--json out.json]

Per shape (bf16 activations and expert weights, fp32 router logits) it times, with CUDA events after
warm-up (the median of --repeats runs):
  topk_gating     smoe.functional.topk_gating on the [T, E] fp32 logits          (memory-bound: GB/s)
  routing_plan    smoe.functional.routing_plan, dropless                         (memory-bound: GB/s)
  permute         smoe.functional.permute x [T, H] -> xs [R, H]                  (memory-bound: GB/s)
  routing+permute the two above back to back (the design target's quantity)
  gemm1_fwd       the first grouped GEMM xs [R, H] @ w1[e]^T -> [R, 2F]          (compute-bound: TFLOP/s)
                  impls: smoe_tc (backend "cuda": tensor cores for bf16), torch_per_expert (one cuBLAS
                  GEMM per expert from torch: the cuBLAS path), smoe_cublas (smoe's cuBLAS grouped
                  launcher, csrc/cuda/gemm_cublas.h through smoe._C.grouped_gemm_cublas: one
                  cublasGemmGroupedBatchedEx a call, offsets copied to the host; only in builds with
                  cuBLAS, smoe._C.has_cublas()), dense (one torch matmul [R, H] @ [H, 2F]: the same FLOPs)
  combine         smoe.functional.combine ys [R, H] -> y [T, H]                  (memory-bound: GB/s)
  layer_fwd, layer_fwd+bwd
                  smoe.nn.MoE (backend "cuda"), transformers' MixtralSparseMoeBlock with the same
                  weights (hf_mixtral), and the dense roof: x[T*K, H] @ W[H, 3F] (same expert FLOPs)
Columns: time, TFLOP/s or GB/s, % of the device peak (PEAKS), x dense (dense time / time: the
fraction of the machine's own dense GEMM), x HF (HF time / time), x cuBLAS (torch_per_expert time / time),
and the design targets beside the rows they concern. Without a GPU it prints why and exits 0; with a
GPU but no CUDA backend in smoe._C it exits 1. Results go to a table on stdout and, with --json, to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "Shape",
    "SHAPES",
    "QUICK_SHAPES",
    "Peak",
    "PEAKS",
    "device_peak",
    "stage_flops",
    "stage_bytes",
    "Row",
    "build_rows",
    "TARGETS",
    "check_targets",
    "format_table",
    "write_json",
    "main",
]


@dataclass(frozen=True)
class Shape:
    name: str
    T: int
    H: int
    F: int
    E: int
    K: int

    @property
    def R(self) -> int:  # routed rows, dropless
        return self.T * self.K


SHAPES: Dict[str, Shape] = {
    # Mixtral-8x7B's MoE layer (config.json of mistralai/Mixtral-8x7B-v0.1), 4096 tokens
    "mixtral": Shape("mixtral", T=4096, H=4096, F=14336, E=8, K=2),
    # fine-grained experts (Qwen1.5-MoE-A2.7B / DeepSeekMoE-like sizes)
    "fine": Shape("fine", T=4096, H=2048, F=1408, E=64, K=6),
}
# --quick: the same two regimes, small enough for a smoke run on any GPU
QUICK_SHAPES: Dict[str, Shape] = {
    "mixtral": Shape("mixtral-quick", T=512, H=512, F=1024, E=8, K=2),
    "fine": Shape("fine-quick", T=512, H=256, F=128, E=64, K=6),
}

BF16 = 2  # bytes of an activation / weight element
F32 = 4
I32 = 4


# ---- device peaks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peak:
    name: str
    bf16_tflops: float  # dense (no 2:4 sparsity) bf16 tensor-core peak
    hbm_gbs: float  # HBM bandwidth
    source: str


# Dense bf16 tensor-core TFLOP/s and HBM GB/s from NVIDIA's datasheets (the "with sparsity" figures
# are twice the dense ones and are not used). Matched against torch.cuda.get_device_name().
PEAKS: Tuple[Tuple[Tuple[str, ...], Tuple[str, ...], Peak], ...] = (
    # (substrings that must all occur, substrings that must not occur, peak)
    (
        ("A100", "80GB"),
        ("PCIE",),
        Peak(
            "A100 SXM4 80GB", 312.0, 2039.0, "NVIDIA A100 Tensor Core GPU datasheet (2021): BF16 312 TFLOPS, 2,039 GB/s"
        ),
    ),
    (
        ("A100",),
        ("PCIE", "80GB"),
        Peak(
            "A100 SXM4 40GB", 312.0, 1555.0, "NVIDIA A100 Tensor Core GPU datasheet (2021): BF16 312 TFLOPS, 1,555 GB/s"
        ),
    ),
    (
        ("H100",),
        ("PCIE", "NVL"),
        Peak(
            "H100 SXM", 989.0, 3350.0, "NVIDIA H100 Tensor Core GPU datasheet: SXM BF16 989 TFLOPS (dense), 3.35 TB/s"
        ),
    ),
    (
        ("H200",),
        ("NVL", "GH200"),
        Peak("H200 SXM", 989.0, 4800.0, "NVIDIA H200 Tensor Core GPU datasheet: SXM BF16 989 TFLOPS (dense), 4.8 TB/s"),
    ),
)


def device_peak(device_name: str, *, tflops: Optional[float] = None, gbs: Optional[float] = None) -> Optional[Peak]:
    """The datasheet peak of a device name (None when unknown); tflops/gbs override it (e.g. for a
    device not in PEAKS, or a clock-limited one)."""
    upper = device_name.upper()
    found = None
    for need, avoid, peak in PEAKS:
        if all(n in upper for n in need) and not any(a in upper for a in avoid):
            found = peak
            break
    if tflops is None and gbs is None:
        return found
    if found is None and (tflops is None or gbs is None):
        raise ValueError(f"device {device_name!r} is not in PEAKS: give both --peak-tflops and --peak-gbs")
    return Peak(
        found.name if found else device_name,
        tflops if tflops is not None else found.bf16_tflops,
        gbs if gbs is not None else found.hbm_gbs,
        "given on the command line",
    )


# ---- FLOPs and bytes of each stage (bf16 activations/weights, fp32 logits/weights of the gate) -----


def stage_flops(s: Shape, stage: str) -> float:
    """FLOPs of a stage; 0 for the memory-bound ones. SwiGLU: w1 is [E, 2F, H]."""
    gemm1 = 2.0 * s.R * s.H * (2 * s.F)  # xs [R,H] @ w1[e]^T [H,2F]
    gemm2 = 2.0 * s.R * s.F * s.H  # h [R,F] @ w2[e]^T [F,H]
    router = 2.0 * s.T * s.H * s.E  # x [T,H] @ Wr^T [H,E]
    if stage == "gemm1_fwd":
        return gemm1
    if stage == "layer_fwd":
        return gemm1 + gemm2 + router
    if stage == "layer_fwd+bwd":  # backward: a dgrad and a wgrad GEMM per forward GEMM
        return 3.0 * (gemm1 + gemm2 + router)
    return 0.0


def stage_bytes(s: Shape, stage: str) -> float:
    """Minimum DRAM bytes of a stage: each input read once, each output written once."""
    if stage == "topk_gating":  # logits f32 in, scores f32 out, weights f32 + experts i32 out
        return s.T * s.E * (F32 + F32) + s.T * s.K * (F32 + I32)
    if stage == "routing_plan":  # experts in; row_of, token_of_row, counts, offsets out
        return s.R * I32 + s.R * I32 + s.R * I32 + s.E * (I32 + 8)
    if stage == "permute":  # token_of_row in, R rows gathered and written
        return s.R * I32 + 2.0 * s.R * s.H * BF16
    if stage == "routing+permute":
        return stage_bytes(s, "routing_plan") + stage_bytes(s, "permute")
    if stage == "combine":  # ys rows read, y written, weights + row_of read
        return s.R * s.H * BF16 + s.T * s.H * BF16 + s.T * s.K * (F32 + I32)
    if stage == "gemm1_fwd":
        return (s.R * s.H + s.E * 2 * s.F * s.H + s.R * 2 * s.F) * BF16
    if stage in ("layer_fwd", "layer_fwd+bwd"):
        once = (s.E * 3 * s.F * s.H + 2 * s.T * s.H) * BF16 + s.E * s.H * F32
        return once if stage == "layer_fwd" else 2.0 * once
    raise ValueError(f"unknown stage {stage!r}")


STAGES = (
    "topk_gating",
    "routing_plan",
    "permute",
    "routing+permute",
    "gemm1_fwd",
    "combine",
    "layer_fwd",
    "layer_fwd+bwd",
)
COMPUTE_BOUND = ("gemm1_fwd", "layer_fwd", "layer_fwd+bwd")


# ---- design targets (docs/gpu.md) ----------------------------------------------------------------


# (stage, impl, description, check(row, rows) -> Optional[bool]); None when a figure is missing.
def _tc_vs_dense(row: Row, rows: Sequence[Row]) -> Optional[bool]:
    return None if row.x_dense is None else row.x_dense >= 0.85


def _routing_us(row: Row, rows: Sequence[Row]) -> Optional[bool]:
    return row.time_us < 20.0 if row.T == 4096 else None


def _layer_floor(row: Row, rows: Sequence[Row]) -> Optional[bool]:
    return None if row.x_floor is None else row.x_floor <= 1.3


TARGETS = (
    ("gemm1_fwd", "smoe_tc", "A100: TC grouped GEMM >= 85% of cuBLAS dense (x dense >= 0.85)", _tc_vs_dense),
    ("routing+permute", "smoe", "routing + permute < 20 us at T = 4096", _routing_us),
    ("layer_fwd", "smoe", "Mixtral layer fwd <= 1.3x the compute floor (FLOPs / peak)", _layer_floor),
)


# ---- rows ----------------------------------------------------------------------------------------


@dataclass
class Row:
    shape: str
    T: int
    H: int
    F: int
    E: int
    K: int
    stage: str
    impl: str
    time_us: float
    tflops: Optional[float]  # compute-bound stages
    gbs: float  # minimum bytes / time
    peak_fraction: Optional[float]  # of the bf16 TFLOP/s peak (compute-bound) or HBM GB/s (others)
    x_dense: Optional[float]  # dense torch matmul of the same FLOPs: t_dense / t
    x_hf: Optional[float]  # HF MixtralSparseMoeBlock: t_hf / t
    x_cublas: Optional[float]  # the cuBLAS path (torch_per_expert): t_cublas / t
    x_floor: Optional[float]  # t / (FLOPs / peak): how far above the compute floor
    target: Optional[str] = None
    target_met: Optional[bool] = None


def build_rows(s: Shape, times_s: Dict[Tuple[str, str], float], peak: Optional[Peak]) -> List[Row]:
    """Rows of one shape from measured times {(stage, impl): seconds}: rates, fractions, ratios and
    targets. Pure (no GPU): the tests feed it fake timings."""
    rows: List[Row] = []
    for (stage, impl), t in times_s.items():
        if t <= 0 or not math.isfinite(t):
            raise ValueError(f"time of ({stage}, {impl}) must be a positive number, got {t!r}")
        flops, nbytes = stage_flops(s, stage), stage_bytes(s, stage)
        tflops = flops / t / 1e12 if stage in COMPUTE_BOUND else None
        gbs = nbytes / t / 1e9
        frac = None
        x_floor = None
        if peak is not None:
            frac = tflops / peak.bf16_tflops if tflops is not None else gbs / peak.hbm_gbs
            if stage in COMPUTE_BOUND:
                x_floor = t / (flops / (peak.bf16_tflops * 1e12))

        def ratio(other: str, stage=stage, impl=impl, t=t) -> Optional[float]:  # this row's stage, bound now
            u = times_s.get((stage, other))
            return None if u is None or other == impl else u / t

        rows.append(
            Row(
                s.name,
                s.T,
                s.H,
                s.F,
                s.E,
                s.K,
                stage,
                impl,
                t * 1e6,
                tflops,
                gbs,
                frac,
                ratio("dense"),
                ratio("hf_mixtral"),
                ratio("torch_per_expert"),
                x_floor,
            )
        )
    check_targets(rows)
    return rows


def check_targets(rows: Sequence[Row]) -> None:
    for r in rows:
        for stage, impl, text, check in TARGETS:
            if r.stage == stage and r.impl == impl:
                r.target = text
                r.target_met = check(r, rows)


# ---- output --------------------------------------------------------------------------------------

HEADERS = (
    "shape",
    "stage",
    "impl",
    "time us",
    "TFLOP/s",
    "GB/s",
    "% peak",
    "x dense",
    "x HF",
    "x cuBLAS",
    "x floor",
    "target",
)


def _fmt(v: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def _cells(r: Row) -> List[str]:
    target = "-" if r.target is None else {True: "met", False: "MISSED", None: "n/a"}[r.target_met]
    return [
        r.shape,
        r.stage,
        r.impl,
        f"{r.time_us:.1f}",
        _fmt(r.tflops, ".1f"),
        f"{r.gbs:.0f}",
        _fmt(None if r.peak_fraction is None else 100 * r.peak_fraction, ".0f", "%"),
        _fmt(r.x_dense, ".2f"),
        _fmt(r.x_hf, ".2f"),
        _fmt(r.x_cublas, ".2f"),
        _fmt(r.x_floor, ".2f"),
        target,
    ]


def format_table(rows: Sequence[Row], device: str = "", peak: Optional[Peak] = None) -> str:
    table = [list(HEADERS)] + [_cells(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADERS))]
    lines = [
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    shapes = {}
    for r in rows:
        shapes.setdefault(r.shape, f"{r.shape}: T={r.T} H={r.H} F={r.F} E={r.E} K={r.K}")
    lines.append("shapes: " + "; ".join(shapes.values()) + " (bf16; fp32 logits)")
    if peak is not None:
        lines.append(f"peak ({peak.name}): {peak.bf16_tflops:g} bf16 TFLOP/s, {peak.hbm_gbs:g} GB/s — {peak.source}")
    elif device:
        lines.append(
            f"peak: {device!r} is not in the PEAKS table: % peak and x floor are blank "
            "(give --peak-tflops and --peak-gbs)"
        )
    lines.append("targets:")
    for _, _, text, _ in TARGETS:
        lines.append(f"  {text}")
    return "\n".join(lines)


def write_json(rows: Sequence[Row], path: str, meta: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [asdict(r) for r in rows]}, f, indent=2)


# ---- measurement (GPU only) ----------------------------------------------------------------------


def time_cuda(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median seconds of fn over `repeats` runs, each bracketed by CUDA events, after `warmup` runs."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure(s: Shape, *, warmup: int, repeats: int, with_hf: bool, log: Callable[[str], None]):
    import smoe.functional as F
    import torch
    from smoe.nn import MoE

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    times: Dict[Tuple[str, str], float] = {}

    def run(stage: str, impl: str, fn: Callable[[], object]) -> None:
        log(f"{s.name}: {stage} / {impl}")
        times[(stage, impl)] = time_cuda(fn, warmup, repeats)

    moe = MoE(s.H, s.F, s.E, s.K, renormalize=True, dtype=bf16, device=dev, backend="cuda")
    x = torch.randn(s.T, s.H, dtype=bf16, device=dev)
    logits = (x.float() @ moe.router.weight.float().t()).contiguous()  # [T,E] f32
    weights, experts, _ = F.topk_gating(logits, top_k=s.K, renormalize=True, backend="cuda")
    plan = F.routing_plan(experts, num_experts=s.E, backend="cuda")
    xs = F.permute(x, plan, backend="cuda")  # [R_max,H]
    w1 = moe.w1.detach()  # [E,2F,H]
    with torch.no_grad():
        run("topk_gating", "smoe", lambda: F.topk_gating(logits, top_k=s.K, renormalize=True, backend="cuda"))
        run("routing_plan", "smoe", lambda: F.routing_plan(experts, num_experts=s.E, backend="cuda"))
        run("permute", "smoe", lambda: F.permute(x, plan, backend="cuda"))
        run(
            "routing+permute",
            "smoe",
            lambda: F.permute(x, F.routing_plan(experts, num_experts=s.E, backend="cuda"), backend="cuda"),
        )

        run("gemm1_fwd", "smoe_tc", lambda: F.grouped_gemm(xs, w1, plan.offsets, backend="cuda"))
        # torch's per-expert loop: one cuBLAS GEMM per expert (host offsets taken once, outside the timing)
        bounds = plan.offsets.cpu().tolist()
        out1 = torch.empty(xs.shape[0], 2 * s.F, dtype=bf16, device=dev)

        def per_expert():
            for e in range(s.E):
                a, b = bounds[e], bounds[e + 1]
                if b > a:
                    torch.matmul(xs[a:b], w1[e].t(), out=out1[a:b])

        run("gemm1_fwd", "torch_per_expert", per_expert)
        from smoe import _C, _core

        if _C.has_cublas():  # smoe's own cuBLAS grouped launcher (csrc/cuda/gemm_cublas.h)
            out_cb = torch.empty(xs.shape[0], 2 * s.F, dtype=bf16, device=dev)
            stream = torch.cuda.current_stream().cuda_stream
            cb_args = dict(
                stream=stream,
                trans_b=True,
                a=_core.view(xs, "a"),
                b=_core.view(w1, "b"),
                offsets=_core.view(plan.offsets, "offsets"),
                c=_core.view(out_cb, "c"),
            )
            run("gemm1_fwd", "smoe_cublas", lambda: _C.grouped_gemm_cublas(**cb_args))
        else:
            log(f"{s.name}: gemm1_fwd / smoe_cublas skipped: this smoe._C has no cuBLAS (smoe._C.has_cublas())")
        dense_a = torch.randn(s.R, s.H, dtype=bf16, device=dev)
        dense_b = torch.randn(s.H, 2 * s.F, dtype=bf16, device=dev)
        run("gemm1_fwd", "dense", lambda: dense_a @ dense_b)

        ys = torch.randn(xs.shape[0], s.H, dtype=bf16, device=dev)
        run("combine", "smoe", lambda: F.combine(ys, weights, plan, backend="cuda"))

    # the whole layer, and its roof: x[T*K, H] @ W[H, 3F] has the layer's expert FLOPs
    hf = None
    if with_hf:
        try:
            from smoe.integrations.hf import to_hf

            hf = to_hf(moe, kind="mixtral").to(dev)
        except Exception as exc:  # transformers missing or too old: report, keep going
            log(f"HF MixtralSparseMoeBlock unavailable ({type(exc).__name__}: {exc}); x HF stays blank")
    roof_a = torch.randn(s.R, s.H, dtype=bf16, device=dev)
    roof_b = torch.randn(s.H, 3 * s.F, dtype=bf16, device=dev)
    mm_flops = 2.0 * s.R * s.H * 3 * s.F
    x3 = x.view(1, s.T, s.H)
    for stage in ("layer_fwd", "layer_fwd+bwd"):
        mods = {"smoe": moe, **({"hf_mixtral": hf} if hf is not None else {})}
        for impl, mod in mods.items():
            if stage == "layer_fwd":

                def fwd(mod=mod):
                    with torch.no_grad():
                        y = mod(x3)
                    return y

                run(stage, impl, fwd)
            else:
                xg = x3.detach().clone().requires_grad_(True)
                g = torch.randn_like(x3)

                def fwd_bwd(mod=mod, xg=xg, g=g):
                    mod.zero_grad(set_to_none=True)
                    y = mod(xg)
                    y = y[0] if isinstance(y, tuple) else y
                    y.backward(g)

                run(stage, impl, fwd_bwd)
        if stage == "layer_fwd":
            with torch.no_grad():
                t_mm = time_cuda(lambda: roof_a @ roof_b, warmup, repeats)
        else:
            ra, rb = roof_a.clone().requires_grad_(True), roof_b.clone().requires_grad_(True)
            gout = torch.randn(s.R, 3 * s.F, dtype=bf16, device=dev)

            def roof_step(ra=ra, rb=rb, gout=gout):  # this shape's tensors, bound now
                ra.grad = rb.grad = None
                (ra @ rb).backward(gout)

            t_mm = time_cuda(roof_step, warmup, repeats) / 3.0
        times[(stage, "dense")] = t_mm * stage_flops(s, stage) / mm_flops  # the roof's rate on the layer's FLOPs
    return times


def _meta(device: str, peak: Optional[Peak], argv: Sequence[str]) -> dict:
    import torch

    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = None
    return {
        "device": device,
        "peak": None if peak is None else asdict(peak),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": tf,
        "python": platform.python_version(),
        "command": " ".join(["python", "bench/gpu/bench_layer.py", *argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="mixtral,fine", help="comma-separated names: mixtral, fine")
    p.add_argument("--quick", action="store_true", help="small versions of the shapes (smoke run)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face block")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
    p.add_argument("--peak-gbs", type=float, default=None, help="override the device's HBM GB/s")
    p.add_argument("--json", default=None, help="write the rows and the metadata here")
    p.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the per-stage breakdown (table; with --json also <stem>_breakdown.json/.png)",
    )
    args = p.parse_args(argv)
    table = QUICK_SHAPES if args.quick else SHAPES
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    for n in names:
        if n not in table:
            p.error(f"--shapes entries must be among {', '.join(table)}, got {n!r}")
    if args.warmup < 0 or args.repeats < 1:
        p.error("--warmup must be >= 0 and --repeats >= 1")

    try:
        import torch
    except ImportError:
        print("bench_layer: torch is not installed; nothing to measure.")
        return 0
    if not torch.cuda.is_available():
        print(
            "bench_layer: no CUDA device is visible (torch.cuda.is_available() is False); nothing was "
            "measured. Run this on a machine with an NVIDIA GPU (docs/gpu.md)."
        )
        return 0
    from smoe import _core

    if "cuda" not in getattr(_core, "BUILT_BACKENDS", ()):
        # A GPU without the backend is a broken build, not "nothing to do": fail.
        print(
            "bench_layer: a CUDA device is visible but this build of smoe has no CUDA backend "
            f"(smoe._core.BUILT_BACKENDS = {getattr(_core, 'BUILT_BACKENDS', ())}); rebuild with "
            "-DSMOE_ENABLE_CUDA=ON (docs/gpu.md).",
            file=sys.stderr,
        )
        return 1

    device = torch.cuda.get_device_name()
    peak = device_peak(device, tflops=args.peak_tflops, gbs=args.peak_gbs)
    rows: List[Row] = []
    for n in names:
        s = table[n]
        times = measure(
            s,
            warmup=args.warmup,
            repeats=args.repeats,
            with_hf=not args.no_hf,
            log=lambda m: print(f"  timing {m}", file=sys.stderr, flush=True),
        )
        rows.extend(build_rows(s, times, peak))
    print(f"smoe GPU benchmark on {device}")
    print(format_table(rows, device, peak))
    if args.json:
        write_json(rows, args.json, _meta(device, peak, argv))
        print(f"wrote {args.json}")
    if args.breakdown:  # per-stage breakdown, the CPU suite's (smoe.bench.breakdown)
        from smoe.bench.breakdown import gpu_suite_breakdown

        stem = os.path.splitext(args.json)[0] if args.json else None
        bd = gpu_suite_breakdown([table[n] for n in names], png=stem and stem + "_breakdown.png")
        if stem:
            with open(stem + "_breakdown.json", "w") as f:
                json.dump(bd, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

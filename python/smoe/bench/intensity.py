"""The performance model: arithmetic intensity of one expert against the tokens it receives.

One SwiGLU expert with n tokens does 2*n*H*F1 + 2*n*F*H = 6*n*H*F flops (F1 = 2F) and must at least
read its weights (3*H*F elements) and read/write its activations (x in, y out: 2*n*H, plus the
[n, F1] and [n, F] intermediates when GEMM 1, activation and GEMM 2 are not fused: 3*n*F). So

    intensity(n) = 6 n H F / (bytes * (3 H F + 2 n H + 3 n F))   flops per byte,

which grows linearly with n (~ 2n / bytes for small n: weight traffic dominates) and saturates at
6 H F / (bytes * (2 H + 3 F)) for large n. A machine with peak P (flop/s) and memory bandwidth B
(byte/s) is memory-bound while intensity < P / B (its balance point) and compute-bound above: the
crossing n* is where an expert has enough tokens to keep the machine busy. Tokens per expert of a
layer are T*K/E on average (Mixtral-like 512, fine-grained 192, DeepSeek-like 64 at T = 2048).

The CPU's P comes from smoe.bench.system.measure_peak and B from a large copy measured now; the GPU
line uses NVIDIA's published H100 SXM figures (989 TFLOP/s dense bf16 tensor cores, 3.35 TB/s HBM3;
H100 datasheet, 2023), since no GPU is measured here.
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Sequence

import torch

__all__ = ["intensity", "crossing_tokens", "measure_bandwidth", "intensity_plot", "GPU_H100"]

GPU_H100 = {"name": "H100 SXM bf16 (datasheet)", "flops": 989e12, "bandwidth": 3.35e12}


def intensity(n: float, H: int, F: int, elem_bytes: int, fused: bool = True) -> float:
    """Flops per byte of one SwiGLU expert with n tokens (fused: no [n, F1] / [n, F] round trip)."""
    flops = 6.0 * n * H * F
    elems = 3.0 * H * F + 2.0 * n * H + (0.0 if fused else 3.0 * n * F)
    return flops / (elem_bytes * elems)


def crossing_tokens(H: int, F: int, elem_bytes: int, balance: float, fused: bool = True) -> Optional[float]:
    """The smallest n with intensity(n) >= balance (flops/byte), or None if the expert never gets there."""
    lo, hi = 0.0, 1.0
    while intensity(hi, H, F, elem_bytes, fused) < balance:
        hi *= 2
        if hi > 1e9:
            return None
    for _ in range(60):
        mid = (lo + hi) / 2
        if intensity(mid, H, F, elem_bytes, fused) < balance:
            lo = mid
        else:
            hi = mid
    return hi


def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best copy bandwidth (read + write bytes per second) of a large tensor on the CPU."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * nbytes / best


def intensity_plot(
    path: str,
    *,
    peak_fp32: Optional[float] = None,
    peak_bf16: Optional[float] = None,
    bandwidth: Optional[float] = None,
    H: int = 1024,
    F: int = 512,
    tokens_marks: Sequence[tuple] = (("Mixtral-like", 512), ("fine-grained", 192), ("DeepSeek-like", 64)),
) -> Dict[str, object]:
    """Write the intensity-vs-tokens-per-expert PNG; returns the balance points and crossings.

    peak_* in GFLOP/s (measured; None: measured now), bandwidth in bytes/s (None: measured now)."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from smoe.bench import system

    if peak_fp32 is None:
        peak_fp32 = system.measure_peak("fp32")["gflops"]
    if peak_bf16 is None:
        peak_bf16 = system.measure_peak("bf16")["gflops"]
    if bandwidth is None:
        bandwidth = measure_bandwidth()
    machines = [("CPU fp32 (measured)", peak_fp32 * 1e9 / bandwidth, 4, "tab:blue")]
    if peak_bf16:
        machines.append(("CPU bf16 (measured)", peak_bf16 * 1e9 / bandwidth, 2, "tab:green"))
    machines.append((GPU_H100["name"], GPU_H100["flops"] / GPU_H100["bandwidth"], 2, "tab:red"))
    ns = [2 ** (i / 8) for i in range(0, 8 * 14 + 1)]  # 1 .. 16384 tokens per expert
    fig, ax = plt.subplots(figsize=(8, 5))
    for elem, label in ((4, "fp32"), (2, "bf16")):
        ax.plot(ns, [intensity(n, H, F, elem) for n in ns], label=f"expert H={H} F={F} {label}", lw=2)
    out = {
        "H": H,
        "F": F,
        "bandwidth_GBps": bandwidth / 1e9,
        "peak_fp32_GFLOPs": peak_fp32,
        "peak_bf16_GFLOPs": peak_bf16,
        "machines": [],
    }
    for name, balance, elem, color in machines:
        n_star = crossing_tokens(H, F, elem, balance)
        ax.axhline(balance, color=color, ls="--", lw=1)
        ax.text(
            1.2,
            balance * 1.08,
            f"{name}: balance {balance:.0f} flop/B" + (f", n* = {n_star:.0f}" if n_star else ", never compute-bound"),
            color=color,
            fontsize=8,
        )
        if n_star:
            ax.axvline(n_star, color=color, ls=":", lw=1)
        out["machines"].append({"name": name, "balance_flop_per_byte": balance, "crossing_tokens": n_star})
    for label, n in tokens_marks:
        ax.axvline(n, color="grey", lw=0.8)
        ax.text(n * 1.05, 0.6, label, rotation=90, fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per expert n (= T*K/E on average)")
    ax.set_ylabel("arithmetic intensity (flop / byte)")
    ax.set_title("One expert: memory-bound below the balance line, compute-bound above")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out["path"] = path
    return out

"""The expert loop against the grouped GEMM, as the experts get smaller and more numerous.

    python examples/loop_vs_grouped.py [--tiny] [--out loop_vs_grouped.png]

At a fixed amount of work (T tokens, K experts each, E experts of size F with E * F constant) it times
one forward+backward step of:
  loop             a plain PyTorch per-expert loop (what transformers' Mixtral block does),
  torch_grouped_mm the same layer with both expert GEMMs as torch._grouped_mm,
  smoe             smoe.nn.MoE (its grouped GEMM kernels, fused expert MLP),
all with the same weights (smoe.bench.peers). The loop pays a gather, two small GEMMs, a scatter and a
Python iteration per expert, so it falls behind as E grows (tokens per expert T*K/E shrink); the
grouped GEMM does one call for all experts. The PNG plots step time against E.
"""

import argparse
import os
import statistics
import time

import smoe
import torch
from smoe.bench.peers import TorchGroupedMM, TorchLoop


def step_time(module, x, repeats):
    ts = []
    for _ in range(repeats + 1):
        for q in module.parameters():
            q.grad = None
        t0 = time.perf_counter()
        y = module(x)
        y.backward(torch.ones_like(y))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[1:]) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small sizes (CI)")
    p.add_argument("--out", default="loop_vs_grouped.png")
    args = p.parse_args(argv)
    if args.tiny:
        T, H, EF, K, experts, repeats = 128, 64, 512, 2, [4, 16, 64], 1
    else:
        T, H, EF, K, experts, repeats = 1024, 512, 16384, 4, [4, 8, 16, 32, 64, 128, 256], 3
    rows = []
    for E in experts:
        torch.manual_seed(0)
        moe = smoe.nn.MoE(H, EF // E, E, K, renormalize=True)
        x = torch.randn(1, T, H, requires_grad=True)
        times = {
            "loop": step_time(TorchLoop(moe), x, repeats),
            "torch_grouped_mm": step_time(TorchGroupedMM(moe), x, repeats),
            "smoe": step_time(moe, x, repeats),
        }
        rows.append((E, times))
        print(
            f"E={E:4d} F={EF // E:5d} tokens/expert={T * K / E:7.1f}: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items())
            + f"; smoe is {times['loop'] / times['smoe']:.2f}x the loop"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ("loop", "torch_grouped_mm", "smoe"):
        ax.plot([E for E, _ in rows], [t[name] for _, t in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"experts E (E x F = {EF} fixed; T={T}, K={K})")
    ax.set_ylabel("forward+backward step (ms)")
    ax.set_title("expert loop vs grouped GEMM")
    ax.legend()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()

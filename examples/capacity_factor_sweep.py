"""A capacity-factor sweep: dropped tokens, loss and step time against the capacity factor.

    python examples/capacity_factor_sweep.py [--tiny] [--steps N] [--out capacity.png]

Capacity C = ceil(capacity_factor * T * K / E) assignments per expert (GShard, Lepikhin et al. 2020;
Switch Transformer, Fedus et al. 2021); assignments past C are dropped (their tokens get no
contribution from that expert). For each factor, and dropless (None), the same smoe.nn.MoE layer
trains on the toy task (examples/_toy.py) from the same start; the PNG shows the fraction of
assignments dropped, the final training loss and the median step time against the factor.
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smoe  # noqa: E402
from _toy import ClusterTask, save_png  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a few steps (CI)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="capacity_factor_sweep.png")
    args = p.parse_args(argv)
    steps = args.steps or (15 if args.tiny else 300)
    H, E, K, T = 32, 8, 2, 256
    factors = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, None]
    torch.manual_seed(0)
    start = smoe.nn.MoE(H, 64, E, K).state_dict()
    rows = []
    for cf in factors:
        layer = smoe.nn.MoE(H, 64, E, K, capacity_factor=cf)
        layer.load_state_dict(copy.deepcopy(start))
        task = ClusterTask(H=H, clusters=E, seed=0)
        opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
        dropped, times = [], []
        for _ in range(steps):
            x, y, _ = task.batch(T)
            t0 = time.perf_counter()
            loss = torch.nn.functional.mse_loss(layer(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            dropped.append(layer.last_stats["dropped"].item() / (T * K))
        rows.append((cf, statistics.mean(dropped), loss.item(), statistics.median(times) * 1e3))
        label = "dropless" if cf is None else f"{cf:.2f}"
        print(
            f"capacity factor {label:>8}: dropped {100 * rows[-1][1]:5.1f}% of assignments, final loss "
            f"{rows[-1][2]:.4f}, step {rows[-1][3]:.1f} ms"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["none" if cf is None else str(cf) for cf, *_ in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, col, title in zip(
        axes, (1, 2, 3), ("assignments dropped (fraction)", "final training loss", "median step time (ms)")
    ):
        ax.plot(range(len(rows)), [r[col] for r in rows], marker="o")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels)
        ax.set_xlabel("capacity factor (none = dropless)")
        ax.set_title(title)
    save_png(fig, args.out)
    return rows


if __name__ == "__main__":
    main()

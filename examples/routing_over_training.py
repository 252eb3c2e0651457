"""Routing visualised over training: which expert each cluster of tokens goes to, step by step.

    python examples/routing_over_training.py [--tiny] [--steps N] [--out routing.png]

Trains one smoe.nn.MoE layer (8 experts, top-2, a small load-balancing loss) on a toy task whose
tokens come from 8 clusters (examples/_toy.py), and records after every step the share of each
cluster's assignments that lands on each expert. The PNG shows the expert load over training (left)
and the cluster -> expert routing at the end (right): experts specialise by cluster as the loss falls.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smoe  # noqa: E402
from _toy import ClusterTask, save_png  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a few steps (CI)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="routing_over_training.png")
    args = p.parse_args(argv)
    steps = args.steps or (30 if args.tiny else 400)
    torch.manual_seed(0)
    H, E, K, T = 32, 8, 2, 256
    task = ClusterTask(H=H, clusters=E)
    layer = smoe.nn.MoE(H, 64, E, K, aux_loss_coef=1e-2)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    loads, losses = [], []
    for _step in range(steps):
        x, y, c = task.batch(T)
        out = layer(x)
        loss = torch.nn.functional.mse_loss(out, y)
        opt.zero_grad()
        (loss + smoe.nn.aux_loss(layer)).backward()  # aux losses join the loss before any scaling
        opt.step()
        smoe.nn.end_step(layer)
        loads.append(layer.last_stats["tokens_per_expert"].float() / (T * K))
        losses.append(loss.item())
    with torch.no_grad():  # cluster -> expert routing of the trained layer
        x, _, c = task.batch(2048)
        logits = x @ layer.router.weight.t()
        _, experts, _ = smoe.functional.topk_gating(logits, top_k=K, renormalize=True)
        route = torch.zeros(E, E)
        for k in range(K):
            route.index_put_((c, experts[:, k].long()), torch.ones(len(c)), accumulate=True)
        route /= route.sum(dim=1, keepdim=True)
    purity = route.max(dim=1).values.mean().item()
    print(
        f"steps {steps}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; mean share of a cluster on its top expert "
        f"{purity:.2f} (uniform would be {1 / E:.2f})"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4))
    im = a0.imshow(torch.stack(loads).t().numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    a0.set_xlabel("training step")
    a0.set_ylabel("expert")
    a0.set_title("share of assignments per expert")
    fig.colorbar(im, ax=a0)
    im = a1.imshow(route.numpy(), cmap="magma", vmin=0, vmax=1)
    a1.set_xlabel("expert")
    a1.set_ylabel("token cluster")
    a1.set_title("cluster -> expert routing after training")
    fig.colorbar(im, ax=a1)
    save_png(fig, args.out)
    return losses, route


if __name__ == "__main__":
    main()

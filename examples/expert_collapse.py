"""Expert collapse with and without load balancing.

    python examples/expert_collapse.py [--tiny] [--steps N] [--out collapse.png]

Three copies of one smoe.nn.MoE layer (8 experts, top-2) start from the same router, tilted towards
two experts (as a router can drift early in training), and train on the same toy task
(examples/_toy.py):
  none     no balancing: the favoured experts get the tokens, so the gradients, so more tokens;
  aux      the switch load-balancing loss (aux_loss_coef=0.05; Fedus et al. 2021, eq. 4);
  bias     DeepSeek-V3's auxiliary-loss-free balancing (bias_balancing=True; DeepSeek-AI 2024, 2.1.2).
The PNG plots the busiest expert's share of the assignments (1/E = balanced) and the number of idle
experts (< 1% of the assignments) over training.
"""

import argparse
import copy
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
    p.add_argument("--out", default="expert_collapse.png")
    args = p.parse_args(argv)
    steps = args.steps or (40 if args.tiny else 400)
    H, E, K, T = 32, 8, 2, 256
    torch.manual_seed(0)
    base = smoe.nn.MoE(H, 64, E, K)
    with torch.no_grad():  # tilt the router: experts 0 and 1 start favoured
        mean_dir = torch.ones(H) / H**0.5
        base.router.weight[:2] += 2.0 * mean_dir
    variants = {
        "none": dict(),
        "aux": dict(aux_loss_coef=0.05),
        "bias": dict(bias_balancing=True, bias_update_rate=1e-2),
    }
    history = {}
    for name, kw in variants.items():
        layer = smoe.nn.MoE(H, 64, E, K, **kw)
        layer.load_state_dict(copy.deepcopy(base.state_dict()), strict=False)
        task = ClusterTask(H=H, clusters=E, seed=0)
        opt = torch.optim.Adam([q for q in layer.parameters() if q.requires_grad], lr=3e-3)
        top, idle = [], []
        for _ in range(steps):
            x, y, _ = task.batch(T)
            loss = torch.nn.functional.mse_loss(layer(x), y)
            opt.zero_grad()
            (loss + smoe.nn.aux_loss(layer)).backward()  # aux losses join the loss before any scaling
            opt.step()
            smoe.nn.end_step(layer)  # once per optimizer step: the balancing bias moves here
            share = layer.last_stats["routed_per_expert"].float() / (T * K)
            top.append(share.max().item())
            idle.append(int((share < 0.01).sum()))
        history[name] = (top, idle, loss.item())
        print(
            f"{name:5s}: busiest expert {top[-1]:.2f} of the assignments (balanced {1 / E:.3f}), "
            f"idle experts {idle[-1]}, final loss {loss.item():.4f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (top, idle, _) in history.items():
        a0.plot(top, label=name)
        a1.plot(idle, label=name)
    a0.axhline(1 / E, color="grey", ls="--", lw=1, label="balanced (1/E)")
    a0.set_xlabel("training step")
    a0.set_ylabel("busiest expert's share")
    a0.set_title("load of the busiest expert")
    a0.legend()
    a1.set_xlabel("training step")
    a1.set_ylabel("experts with < 1% of assignments")
    a1.set_title("idle experts")
    a1.legend()
    save_png(fig, args.out)
    return history


if __name__ == "__main__":
    main()

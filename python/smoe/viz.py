"""Plots of MoE routing (matplotlib, Agg backend: works without a display)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

__all__ = ["load_shares", "plot_expert_load"]


def load_shares(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Share of the routed assignments each expert received: counts / sum(counts) ([E], sums to 1)."""
    counts = tokens_per_expert.detach().float().cpu()
    total = counts.sum()
    return counts / total if total > 0 else counts


def plot_expert_load(
    history: Sequence[torch.Tensor],
    path: str,
    *,
    steps: Optional[Sequence[int]] = None,
    title: str = "Expert load during training",
    layer_names: Optional[Sequence[str]] = None,
) -> str:
    """Save a PNG of each expert's share of the routed tokens over training.

    history: one tensor per recorded step, [L, E] (L layers) or [E]; values are shares (rows sum to 1)
    or raw counts (normalised here). One panel per layer, one line per expert, the uniform share 1/E
    dashed. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if len(history) == 0:
        raise ValueError("history must hold at least one recorded step, got an empty sequence")
    data = torch.stack([h.detach().float().cpu().reshape(-1, h.shape[-1]) for h in history])  # [S,L,E]
    totals = data.sum(dim=-1, keepdim=True)
    data = torch.where(totals > 0, data / totals.clamp(min=1e-12), data)
    S, L, E = data.shape
    xs = list(steps) if steps is not None else list(range(S))
    if len(xs) != S:
        raise ValueError(f"steps must have one entry per history entry ({S}), got {len(xs)}")
    fig, axes = plt.subplots(L, 1, figsize=(8, 2.6 * L + 0.6), sharex=True, squeeze=False)
    cmap = plt.get_cmap("tab20" if E > 10 else "tab10")
    for layer in range(L):
        ax = axes[layer][0]
        for e in range(E):
            ax.plot(
                xs,
                data[:, layer, e].numpy(),
                color=cmap(e % cmap.N),
                linewidth=1.2,
                label=f"expert {e}" if E <= 16 else None,
            )
        ax.axhline(1.0 / E, color="black", linestyle="--", linewidth=0.8, label="uniform 1/E")
        name = layer_names[layer] if layer_names is not None else f"MoE layer {layer}"
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("share of tokens")
        ax.set_ylim(bottom=0.0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=min(E + 1, 6), loc="upper right")
    axes[-1][0].set_xlabel("training step")
    fig.suptitle(title)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

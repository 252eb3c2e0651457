"""The toy task the routing examples train on (examples/routing_over_training.py, expert_collapse.py,
capacity_factor_sweep.py): tokens from `clusters` Gaussian clusters in H dimensions, each cluster with
its own nonlinear target map, so a layer does best when experts specialise by cluster."""

import torch


class ClusterTask:
    def __init__(self, H: int = 32, clusters: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.H, self.clusters = H, clusters
        self.centers = torch.randn(clusters, H, generator=g) * 2.0
        self.maps = torch.randn(clusters, H, H, generator=g) * H**-0.5
        self.gen = torch.Generator().manual_seed(seed + 1)

    def batch(self, T: int):
        """x [T, H], target [T, H], cluster id [T]."""
        c = torch.randint(0, self.clusters, (T,), generator=self.gen)
        x = self.centers[c] + torch.randn(T, self.H, generator=self.gen)
        y = torch.tanh(torch.einsum("th,thk->tk", x, self.maps[c]))
        return x, y, c


def save_png(fig, path: str) -> None:
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")

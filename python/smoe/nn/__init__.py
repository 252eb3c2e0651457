"""smoe.nn: PyTorch modules built on smoe's ops."""

from smoe.nn.moe import MoE

__all__ = ["MoE"]

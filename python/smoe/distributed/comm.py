"""Autograd-aware collectives for expert parallelism, on torch.distributed.

The same code runs on NCCL (CUDA tensors) and gloo (CPU tensors). Every call is one collective of
the given group, so it is bounded by that group's timeout (init_process_group(timeout=...)).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_to_all_single", "exchange_counts", "comm_device"]


def comm_device(group=None) -> torch.device:
    """The device a tensor must live on for `group`'s backend: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _splits(name: str, splits: Sequence[int], size: int) -> List[int]:
    out = [int(s) for s in splits]
    if len(out) != size or any(s < 0 for s in out):
        raise ValueError(f"{name} must be {size} (the group size) integers >= 0, got {list(splits)!r}")
    return out


class _AllToAllSingle(torch.autograd.Function):
    """out = all_to_all_single(x) with uneven row splits; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: List[int], in_splits: List[int], group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return _exchange(grad_out, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def _exchange(x: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


def all_to_all_single(
    x: Tensor, output_split_sizes: Sequence[int], input_split_sizes: Sequence[int], group=None
) -> Tensor:
    """Rows x[sum(input_split_sizes[:p]) : ...] go to rank p of `group`; rank p's rows for this rank
    arrive, in rank order, as output_split_sizes[p] rows. Differentiable: the gradient travels back by
    the reverse exchange (every rank must run backward, as with any collective)."""
    size = dist.get_world_size(group)
    ins = _splits("input_split_sizes", input_split_sizes, size)
    outs = _splits("output_split_sizes", output_split_sizes, size)
    if x.dim() < 1 or x.shape[0] != sum(ins):
        raise ValueError(f"x must have sum(input_split_sizes) = {sum(ins)} rows, got shape {tuple(x.shape)}")
    return _AllToAllSingle.apply(x, outs, ins, group)


def exchange_counts(counts: Tensor, group=None) -> Tensor:
    """counts [P, ...] integer: row p goes to rank p; returns [P, ...] whose row p came from rank p
    (one all_to_all_single with equal splits; not differentiable)."""
    size = dist.get_world_size(group)
    if counts.dim() < 1 or counts.shape[0] != size or counts.dtype.is_floating_point:
        raise ValueError(f"counts must be an integer tensor [P={size}, ...], got {counts.dtype} {tuple(counts.shape)}")
    c = counts.contiguous()
    out = torch.empty_like(c)
    dist.all_to_all_single(out, c, group=group)
    return out

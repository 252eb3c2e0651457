"""Gradient reduction for EP x data parallel.

With W ranks arranged as DP replicas of an EP group, each rank's loss is a function of its own tokens.
The gradients of the mean of the W per-rank losses (DDP's convention) are:
- a replicated (non-expert) parameter: the sum of its per-rank gradients over all W ranks, / W;
- an expert shard: its gradient already holds every EP rank's tokens routed to it (the exchange
  carried them), so it is summed over the DP replicas of the same shard only, / W.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["is_expert_parameter", "expert_parameters", "all_reduce_gradients", "ddp_ignore_expert_parameters"]


def is_expert_parameter(p: torch.Tensor) -> bool:
    """True for the w1/w2 shards of an ExpertParallelMoE."""
    return bool(getattr(p, "_smoe_expert_shard", False))


def expert_parameters(module: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """(name, parameter) of every expert shard in `module` (for DDP's ignore list, or FSDP2's expert mesh)."""
    for name, p in module.named_parameters():
        if is_expert_parameter(p):
            yield name, p


def _reduce(params, group, scale: float) -> None:
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i : i + n].view_as(p).clone()
        i += n


def ddp_ignore_expert_parameters(model: nn.Module) -> list:
    """Tell DistributedDataParallel (before wrapping `model`) not to reduce the expert shards; returns their
    names. DDP matches the names of the root module's own parameters as ".name", so both forms are listed."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    names = [n for n, _ in expert_parameters(model)]
    DDP._set_params_and_buffers_to_ignore_for_model(model, names + ["." + n for n in names if "." not in n])
    return names


@torch.no_grad()
def all_reduce_gradients(
    module: nn.Module, *, dp_group=None, group=None, average: bool = True, experts_only: bool = False
) -> None:
    """Reduce `module`'s gradients for EP x DP: replicated parameters summed over `group` (default: the
    world, every EP and DP rank), expert shards summed over `dp_group` (the ranks holding the same
    shard; None: no DP, left as they are). average=True divides both by the size of `group` (the mean
    of the per-rank losses, as DDP does). experts_only=True leaves the replicated parameters alone
    (when DDP already reduces them). A parameter without a gradient takes part with zeros, so every
    rank makes the same collectives."""
    group = dist.group.WORLD if group is None else group
    scale = 1.0 / dist.get_world_size(group) if average else 1.0
    experts, others = [], []
    for p in module.parameters():
        if p.requires_grad:
            (experts if is_expert_parameter(p) else others).append(p)
    if not experts_only:
        _reduce(others, group, scale)
    if dp_group is not None:
        _reduce(experts, dp_group, scale)
    elif scale != 1.0:
        for p in experts:
            if p.grad is not None:
                p.grad.mul_(scale)

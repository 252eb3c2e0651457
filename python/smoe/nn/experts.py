"""smoe.nn.RoutedExperts and smoe.nn.SharedExpert: the expert MLPs of smoe.nn.MoE.

RoutedExperts computes with w1 [E, F1, H] and w2 [E, H, F] (F1 = 2F for gated activations, rows
[gate | up]), which the layer owns: the routing plan of a token-choice routing (smoe.functional.routing_plan, with capacity and drop
policy), the experts (smoe.functional.expert_mlp: permute, grouped GEMM, activation, grouped GEMM) and
the weighted sum back into token order (smoe.functional.combine). SharedExpert owns the always-on
expert: w1 [F1s, H], w2 [H, Fs] and, with shared_gate, gate_w [H] (smoe.functional.shared_expert).
Both are built from MoEArgs and run on args.backend.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

import smoe.functional as F
from smoe.nn.args import MoEArgs
from smoe.ops import acc_dtype
from smoe.reference.layer import expert_ffn

__all__ = ["RoutedExperts", "SharedExpert"]


def _init_uniform(w: Optional[torch.Tensor], fan_in: int) -> None:
    """nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    if w is not None:
        bound = 1.0 / math.sqrt(fan_in)
        w.uniform_(-bound, bound)


def _check_args(args) -> None:
    if not isinstance(args, MoEArgs):
        raise TypeError(f"args must be a smoe.nn.MoEArgs, got {type(args).__name__}")


class RoutedExperts(nn.Module):
    """The computation of the E routed experts over w1 [E, F1, H] and w2 [E, H, F] that the caller holds
    (smoe.nn.MoE keeps them as its own parameters `w1` / `w2`: DDP ignore lists and expert-parallel
    shards are named so). No parameters of its own.

    `experts.plan(experts_idx, weights)` is the token-choice routing plan with the layer's capacity;
    `experts(x, weights, plan, w1, w2)` is y [T, H] = combine(expert_mlp(x, w1, w2, plan), weights, plan);
    for top-1 routing without a gradient in eval (or inference) mode that is one op,
    expert_mlp_combine_top1 (see uses_fused_top1).
    `experts.init_weights(w1, w2)` draws nn.Linear's default initialisation into them."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        _check_args(args)
        self.args = args

    def weight_shapes(self, num_experts: Optional[int] = None):
        """([E, F1, H], [E, H, F]): the shapes of w1 and w2 (E = args.num_experts unless given)."""
        a = self.args
        E = a.num_experts if num_experts is None else num_experts
        return (E, a.ffn_rows, a.hidden_size), (E, a.hidden_size, a.ffn_size)

    @staticmethod
    @torch.no_grad()
    def init_weights(w1: torch.Tensor, w2: torch.Tensor) -> None:
        """nn.Linear's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), in place: w1 then w2."""
        _init_uniform(w1, w1.shape[-1])
        _init_uniform(w2, w2.shape[-1])

    def extra_repr(self) -> str:
        a = self.args
        return (
            f"num_experts={a.num_experts}, hidden_size={a.hidden_size}, ffn_size={a.ffn_size}, "
            f"activation={a.activation!r}"
        )

    def plan(self, experts: torch.Tensor, weights: torch.Tensor) -> F.RoutingPlan:
        """The expert-sorted row layout (smoe.functional.routing_plan) of experts [T, K] i32 with the
        capacity of args (args.capacity(T), None: dropless) and args.drop_policy, which ranks by
        weights [T, K] (detached, fp32)."""
        a = self.args
        return F.routing_plan(
            experts,
            num_experts=a.num_experts,
            weights=weights.detach().float(),
            capacity=a.capacity(experts.shape[0]),
            drop_policy=a.drop_policy,
            backend=a.backend,
        )

    def uses_fused_top1(
        self, x: torch.Tensor, weights: torch.Tensor, plan: F.RoutingPlan, w1: torch.Tensor, w2: torch.Tensor
    ) -> bool:
        """Whether forward takes smoe.ops.expert_mlp_combine_top1 (one op, no ys [R, H], no combine):
        top-1 (plan.row_of [T, 1]), no gradient wanted (grad mode off or nothing requires grad), eval
        mode or inference mode, and a backend other than "reference".

        A training-mode forward without gradients is taken for the first pass of a reentrant
        torch.utils.checkpoint (as MoE.aux_loss does): its recompute runs with gradients, so unfused, and
        both passes must compute the same y (the fused op does not round ys before weighting)."""
        if self.args.backend == "reference" or plan.row_of.dim() != 2 or plan.row_of.shape[1] != 1:
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w1, w2)):
            return False
        return not self.training or torch.is_inference_mode_enabled()

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, plan: F.RoutingPlan, w1: torch.Tensor, w2: torch.Tensor
    ) -> torch.Tensor:
        """x [T, H], weights [T, K] (the plan's row_of is [T, K]; expert choice: [T, E]), w1 / w2 in x's
        dtype -> y [T, H] in x's dtype."""
        backend = self.args.backend
        fused = self.uses_fused_top1(x, weights, plan, w1, w2)
        weights = weights.to(acc_dtype(x.dtype))  # what combine takes: f32, f64 for f64 outputs
        if fused:
            # top-1 inference: weighting and scatter in the second GEMM's epilogue, no ys, no combine
            return F.expert_mlp_combine_top1(
                x, w1, w2, weights.contiguous(), plan, activation=self.args.activation, backend=backend
            )
        ys = F.expert_mlp(x, w1, w2, plan, activation=self.args.activation, backend=backend)  # [R,H]
        return F.combine(ys, weights, plan, backend=backend).to(x.dtype)


class SharedExpert(nn.Module):
    """The shared expert(s) every token passes through (DeepSeekMoE, Qwen2-MoE), fused into one MLP of
    Fs = args.shared_ffn_size: w1 [F1s, H], w2 [H, Fs] and, with args.shared_gate, gate_w [H] (the
    output is then scaled by sigmoid(x @ gate_w), Qwen2-MoE)."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        _check_args(args)
        if args.num_shared_experts == 0:
            raise ValueError("SharedExpert needs num_shared_experts >= 1, got num_shared_experts=0")
        self.args = args
        fs = args.shared_ffn_size
        factory = {"dtype": args.dtype, "device": args.device}
        self.w1 = nn.Parameter(torch.empty(2 * fs if args.gated else fs, args.hidden_size, **factory))  # [F1s,H]
        self.w2 = nn.Parameter(torch.empty(args.hidden_size, fs, **factory))  # [H,Fs]
        self.gate_w = nn.Parameter(torch.empty(args.hidden_size, **factory)) if args.shared_gate else None  # [H]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        _init_uniform(self.w1, self.w1.shape[-1])
        _init_uniform(self.w2, self.w2.shape[-1])
        _init_uniform(self.gate_w, self.args.hidden_size)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.args.hidden_size}, shared_ffn_size={self.args.shared_ffn_size}, "
            f"activation={self.args.activation!r}, shared_gate={self.gate_w is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> out [T, H] in x's dtype (the weights cast to it). backend="reference": the
        reference layer's formula (smoe.reference.layer.expert_ffn), else smoe.functional.shared_expert."""
        w1, w2 = self.w1.to(x.dtype), self.w2.to(x.dtype)
        gate_w = None if self.gate_w is None else self.gate_w.to(x.dtype)
        a = self.args
        if a.backend == "reference":
            out = expert_ffn(x, w1, w2, a.activation).float()
            if gate_w is not None:
                out = torch.sigmoid(x.float() @ gate_w.float())[:, None] * out
            return out.to(x.dtype)
        return F.shared_expert(x, w1, w2, gate_w, activation=a.activation, backend=a.backend)

"""smoe.nn.Router: the router of smoe.nn.MoE, usable on its own.

It owns the router weight [E, H] (`weight`, in router_dtype), the selection bias of auxiliary-loss-free
balancing (`expert_bias` [E] fp32, a buffer, with bias_balancing), the choice (token-choice top-k, its
group-limited variant, or expert choice), the router losses (switch balance loss, global and sequence
balance losses, z-loss) and the routing counts they and the statistics are made of. Every computation
is a smoe.functional op or plain torch on [T, E] / [E] tensors.

    routing = router(x)                    # x [T, H] -> Routing (logits, scores, weights, experts, plan)
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as torch_F

import smoe.functional as F
from smoe.nn.args import MoEArgs

__all__ = ["Router", "Routing", "expert_choice_plan", "routed_counts", "global_balance_loss", "sequence_balance_loss"]


class Routing(NamedTuple):
    """What the router decided for T tokens.

    logits [T, E] fp32 (fp64 for an fp64 router), scores [T, E] (softmax or sigmoid of the logits).
    Token choice: weights [T, K] fp32 (differentiable), experts [T, K] i32, plan None (the experts lay
    the rows out, with capacity). Expert choice: weights [T, E] (the score where (t, e) was chosen, 0
    elsewhere), experts None, plan the RoutingPlan of the chosen rows (see expert_choice_plan)."""

    logits: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor
    experts: Optional[torch.Tensor]
    plan: Optional[F.RoutingPlan]


def expert_choice_plan(tokens: torch.Tensor, row_of: torch.Tensor) -> F.RoutingPlan:
    """The RoutingPlan of an expert-choice routing: tokens [E, C] i32 and row_of [T, E] i32 as
    smoe.functional.expert_choice returns them. Expert e owns rows [e*C, (e+1)*C) (every expert takes
    exactly C tokens, no padding), row e*C + c holding token tokens[e, c]."""
    E, C = tokens.shape
    counts = torch.full((E,), C, dtype=torch.int32, device=tokens.device)
    offsets = torch.arange(E + 1, dtype=torch.int64, device=tokens.device) * C
    return F.RoutingPlan(counts, offsets, row_of, tokens.reshape(-1))


def routed_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] i32: how many (token, k) picks of experts [T, K] chose each expert (before capacity)."""
    return torch.zeros(num_experts, dtype=torch.int32, device=experts.device).scatter_add_(
        0, experts.reshape(-1).long(), torch.ones(experts.numel(), dtype=torch.int32, device=experts.device)
    )


def global_balance_loss(scores: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Global-batch balance loss (Qiu et al. 2025, arXiv 2501.11873; Megatron-Core "global_aux_loss"):
    E * sum_e f_e * P_e with f_e = N_e / T_N, counts [E] f32 the assignments N_e (summed over whatever
    the caller summed them: ranks, the step's forwards), T_N = sum N / K the tokens in them, and P_e the
    mean of scores [T, E] over this forward's tokens. counts of this forward alone: the switch loss."""
    E = scores.shape[1]
    tokens = counts.sum() / top_k
    f = torch.where(tokens > 0, counts / tokens.clamp(min=1.0), torch.zeros_like(counts))
    if scores.shape[0] == 0:
        return scores.sum() * 0.0  # the mean over no tokens: 0, still connected to the graph
    return E * torch.sum(f * scores.mean(dim=0))


def sequence_balance_loss(
    scores: torch.Tensor, experts: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (arXiv 2412.19437, eq. 17-20) for scores [T, E],
    experts [T, K] and seq_ids [T] (the sequence of each token, < num_seqs). Per sequence b of S_b
    tokens: f_i = E / (K S_b) * #(t in b choosing i), P_i = mean_t s'_{t,i} with s' = s / sum_j s_j;
    the loss is the mean over the sequences with S_b > 0 of sum_i f_i P_i."""
    T, E = scores.shape
    K = experts.shape[1]
    if T == 0:
        return scores.sum() * 0.0  # no sequence has a token: 0, still connected to the graph
    normed = scores / scores.sum(dim=-1, keepdim=True)
    seq_k = seq_ids[:, None].expand(T, K).reshape(-1)
    counts = torch.zeros(num_seqs * E, dtype=torch.float32, device=scores.device).index_add_(
        0, seq_k * E + experts.reshape(-1).long(), torch.ones(T * K, dtype=torch.float32, device=scores.device)
    )
    counts = counts.view(num_seqs, E)
    S_b = torch.bincount(seq_ids, minlength=num_seqs).to(torch.float32)  # [B]
    P = torch.zeros(num_seqs, E, dtype=torch.float32, device=scores.device).index_add(0, seq_ids, normed)
    present = S_b > 0
    S_safe = S_b.clamp(min=1.0)[:, None]
    per_seq = (E / K) * torch.sum((counts / S_safe) * (P / S_safe), dim=-1)  # [B]
    return per_seq[present].mean()


class Router(nn.Module):
    """The router of smoe.nn.MoE: weight [E, H] (router_dtype) and, with bias_balancing, the fp32 buffer
    expert_bias [E]. Built from MoEArgs (`Router(MoEArgs(H, F, E, K, ...))`); uses the arguments of
    routing (top_k, score_func, renormalize, renorm_eps, routed_scaling, n_groups, topk_groups,
    group_score, bias_balancing, bias_update_rate, expert_choice, router_jitter_noise, router_dtype,
    backend). `.to(dtype)` moves it to another device only: the weight keeps router_dtype, the bias fp32.
    """

    def __init__(self, args: MoEArgs):
        super().__init__()
        if not isinstance(args, MoEArgs):
            raise TypeError(f"args must be a smoe.nn.MoEArgs, got {type(args).__name__}")
        self.args = args
        self.weight = nn.Parameter(
            torch.empty(args.num_experts, args.hidden_size, dtype=args.router_dtype, device=args.device)
        )  # [E, H]
        if args.bias_balancing:
            self.register_buffer("expert_bias", torch.zeros(args.num_experts, dtype=torch.float32, device=args.device))
        else:
            self.expert_bias = None
        # Initialised at construction as the nn.Linear it replaces was, so that a seeded MoE draws the
        # same weights as before.
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default for the weight (U(-1/sqrt(H), 1/sqrt(H))); the bias is zeroed."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.expert_bias is not None:
            self.expert_bias.zero_()

    def extra_repr(self) -> str:
        a = self.args
        parts = [
            f"hidden_size={a.hidden_size}",
            f"num_experts={a.num_experts}",
            f"top_k={a.top_k}",
            f"score_func={a.score_func!r}",
        ]
        if a.expert_choice:
            parts.append("expert_choice=True")
        if a.n_groups > 1:
            parts.append(f"n_groups={a.n_groups}, topk_groups={a.topk_groups}, group_score={a.group_score!r}")
        if a.bias_balancing:
            parts.append("bias_balancing=True")
        return ", ".join(parts)

    def _apply(self, fn, recurse=True):
        """Module.to()/.half()/.double() change the weight's and the bias's device, never their dtypes
        (router_dtype and fp32), whatever `fn` does."""
        bias, weight = self.expert_bias, self.weight
        data, grad = weight.data, weight.grad
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(device=self.expert_bias.device, dtype=torch.float32)
        new = self.weight
        if new.dtype != self.args.router_dtype:
            new.data = data.to(device=new.device, dtype=self.args.router_dtype)
            if grad is not None:
                new.grad = grad.to(device=new.device, dtype=self.args.router_dtype)
        return self

    # ---- forward -------------------------------------------------------------------------------
    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        """In training with router_jitter_noise = eps > 0: x * U(1 - eps, 1 + eps) (fp32, torch's RNG),
        Switch Transformer's multiplicative jitter; otherwise x unchanged."""
        eps = self.args.router_jitter_noise
        if not (self.training and eps > 0.0):
            return x
        return x.float() * torch.empty(x.shape, dtype=torch.float32, device=x.device).uniform_(1.0 - eps, 1.0 + eps)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> logits [T, E]: the matmul in router_dtype, the result in fp32 (fp64 for an fp64
        router: f64 routing end to end, as the core supports it). No jitter."""
        rd = self.args.router_dtype
        acc = torch.float64 if rd == torch.float64 else torch.float32
        return torch_F.linear(x.to(rd), self.weight.to(rd)).to(acc)

    def forward(self, x: torch.Tensor) -> Routing:
        """x [T, H] (any floating dtype; jittered in training) -> Routing. Token choice runs
        smoe.functional.topk_gating (with the bias and the group limit); expert choice
        smoe.functional.expert_choice with C = args.capacity(T)."""
        a = self.args
        logits = self.logits(self.jitter(x))  # [T, E]
        if a.expert_choice:
            weights, scores, plan = self._expert_choice(logits, a.capacity(logits.shape[0]))
            return Routing(logits, scores, weights, None, plan)
        weights, experts, scores = F.topk_gating(
            logits,
            top_k=a.top_k,
            score_func=a.score_func,
            bias=self.expert_bias,
            n_groups=a.n_groups,
            topk_groups=a.topk_groups,
            group_score=a.group_score,
            renormalize=a.renormalize,
            renorm_eps=a.renorm_eps,
            routed_scaling=a.routed_scaling,
            backend=a.backend,
        )  # [T,K] [T,K] [T,E]
        return Routing(logits, scores, weights, experts, None)

    def _expert_choice(self, logits: torch.Tensor, capacity: int):
        """(weights [T, E], scores [T, E], plan) of smoe.functional.expert_choice with `capacity` C.
        C = 0 only for T = 0, which expert_choice rejects (its capacity range is [1, T]); there the
        routing is empty: no rows, and weights and scores are [0, E] (still functions of the logits)."""
        if capacity == 0:
            E = logits.shape[1]
            tokens = torch.zeros(E, 0, dtype=torch.int32, device=logits.device)
            row_of = torch.zeros(0, E, dtype=torch.int32, device=logits.device)
            weights = logits * 0.0  # [0, E]: empty, so it stands for the scores too
            return weights, weights, expert_choice_plan(tokens, row_of)
        weights, tokens, row_of, scores = F.expert_choice(
            logits, capacity=capacity, score_func=self.args.score_func, backend=self.args.backend
        )
        return weights, scores, expert_choice_plan(tokens, row_of)

    # ---- losses and counts ---------------------------------------------------------------------
    def load_balancing_loss(self, routing: Routing) -> torch.Tensor:
        """The switch balance loss of a token-choice routing (smoe.functional.load_balancing_loss, HF
        Mixtral's form); 0 for expert choice, balanced by construction."""
        if routing.experts is None:
            return torch.zeros((), dtype=torch.float32, device=routing.logits.device)
        return F.load_balancing_loss(routing.scores, routing.experts, backend=self.args.backend)

    def z_loss(self, routing: Routing) -> torch.Tensor:
        """The router z-loss of the routing's logits (smoe.functional.z_loss, ST-MoE eq. 5)."""
        return F.z_loss(routing.logits, backend=self.args.backend)

    def routed_counts(self, routing: Routing) -> torch.Tensor:
        """[E] i32: assignments chosen per expert before capacity (expert choice: C each)."""
        if routing.experts is None:
            return routing.plan.counts
        return routed_counts(routing.experts, self.args.num_experts)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3 section 2.1.2): expert_bias += bias_update_rate *
        sign(mean load - load) for load [E] (integer counts: the assignments of a step). In fp64 torch
        for the reference backend or counts past int32, else smoe.functional.balancing_bias_update."""
        if self.expert_bias is None:
            raise RuntimeError("Router.update_bias needs bias_balancing=True (the router has no expert_bias)")
        if self.args.backend == "reference" or int(load.max()) >= 2**31:
            load = load.to(torch.float64)
            self.expert_bias.add_((self.args.bias_update_rate * torch.sign(load.mean() - load)).float())
        else:
            F.balancing_bias_update(
                load.to(torch.int32), self.expert_bias, rate=self.args.bias_update_rate, backend=self.args.backend
            )

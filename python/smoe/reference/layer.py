"""A whole sparse mixture-of-experts layer in plain PyTorch, written to be read.

This is the first page of smoe's documentation (docs/layer.md walks through it) and the oracle that
`smoe.nn.MoE` is tested against. It uses no smoe op and no clever indexing: every step of
ARCHITECTURE.md section 1 is a few lines of ordinary torch, and the experts run in a Python loop.

Shapes, as everywhere in smoe: T tokens, H hidden size, F expert FFN size, E experts, K experts per
token (top-k), C capacity per expert. F1 = 2F for gated activations (w1 rows are [gate | up]).

The steps of `moe_layer`:
  1. router logits, in fp32:               logits[T,E] = x[T,H] @ router_weight[E,H]^T
  2. scores:                               softmax or sigmoid of the logits
  3a. token choice (the default): every token picks its K best experts (optionally among the best
      groups of experts, optionally with a balancing bias that changes the choice but not the weight);
  3b. expert choice: every expert picks its C best tokens;
  4. capacity: an expert that received more than C assignments keeps C of them, the rest are dropped;
  5. experts: y[t] += weight * w2[e] @ act(w1[e] @ x[t]) for every kept (token, expert) pair;
  6. shared expert (always on, optionally gated by sigmoid(x @ gate_w)) is added;
  7. auxiliary losses: switch load balancing and router z-loss, reported beside the output.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

__all__ = ["MoELayerOutput", "moe_layer", "expert_ffn", "capacity_for"]


class MoELayerOutput(NamedTuple):
    y: torch.Tensor  # [T,H], dtype of x
    logits: torch.Tensor  # [T,E] fp32 router logits
    scores: torch.Tensor  # [T,E] fp32 softmax/sigmoid scores
    experts: Optional[torch.Tensor]  # [T,K] int64 chosen experts (token choice), None for expert choice
    weights: torch.Tensor  # [T,K] fp32 combine weights (token choice) or [T,E] (expert choice)
    kept: torch.Tensor  # [T,K] bool (token choice) or [T,E] bool (expert choice): the pair is computed
    routed_per_expert: torch.Tensor  # [E] int64 assignments chosen by the router, before capacity
    tokens_per_expert: torch.Tensor  # [E] int64 assignments actually computed, after capacity
    dropped: torch.Tensor  # 0-d int64: assignments dropped by capacity
    aux_loss: torch.Tensor  # 0-d fp32 switch load-balancing loss (0 for expert choice)
    z_loss: torch.Tensor  # 0-d fp32 router z-loss


def capacity_for(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Capacity C per expert: ceil(capacity_factor * T * K / E) (GShard / Switch Transformer)."""
    return int(math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def _activation(h: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "swiglu":  # Shazeer 2020, "GLU Variants Improve Transformer": silu(gate) * up
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if kind == "geglu":
        gate, up = h.chunk(2, dim=-1)
        return F.gelu(gate) * up
    if kind == "gelu":
        return F.gelu(h)
    if kind == "relu":
        return F.relu(h)
    raise ValueError(f"activation must be one of 'swiglu', 'geglu', 'gelu', 'relu', got {kind!r}")


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, activation: str) -> torch.Tensor:
    """One expert: w2 @ act(w1 @ x).  x [N,H], w1 [F1,H], w2 [H,F] -> [N,H].

    Computed in fp32 and rounded to x's dtype where smoe's kernels store an intermediate (after each
    GEMM and after the activation), so that bf16 results are comparable with the kernels'.
    """
    h = (x.float() @ w1.float().t()).to(x.dtype)  # [N,F1]
    a = _activation(h.float(), activation).to(x.dtype)  # [N,F]
    return (a.float() @ w2.float().t()).to(x.dtype)  # [N,H]


def _stable_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim; ties go to the lower index.

    torch.topk does not promise an order among equal values, smoe does (ARCHITECTURE.md section 5):
    a stable descending sort keeps equal values in index order.
    """
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def _token_choice(scores, *, top_k, bias, n_groups, topk_groups, group_score):
    """Each token picks its top_k experts. Returns experts [T,K] int64 (weights come from scores)."""
    T, E = scores.shape
    # The balancing bias (DeepSeek-V3, "auxiliary-loss-free load balancing") shifts which experts are
    # chosen, never how much they weigh.
    choice = scores if bias is None else scores + bias.float()
    if n_groups > 1:
        # Group-limited routing (DeepSeek-V2/V3): rank groups of E/n_groups experts, keep the best
        # topk_groups groups, and choose experts only inside them.
        grouped = choice.view(T, n_groups, E // n_groups)
        if group_score == "max":
            per_group = grouped.max(dim=-1).values  # [T, n_groups]
        else:  # "top2_sum": DeepSeek-V3 scores a group by the sum of its two best experts
            per_group = torch.sort(grouped, dim=-1, descending=True).values[..., :2].sum(dim=-1)  # [T, n_groups]
        best_groups = _stable_topk(per_group, topk_groups)  # [T, topk_groups]
        group_mask = torch.zeros(T, n_groups, dtype=torch.bool, device=scores.device)
        group_mask.scatter_(1, best_groups, True)
        expert_mask = group_mask.repeat_interleave(E // n_groups, dim=1)  # [T,E]
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    return _stable_topk(choice, top_k)


def _drop_over_capacity(experts, weights, num_experts, capacity, drop_policy):
    """kept[T,K]: which assignments survive when each expert computes at most `capacity` of them."""
    T, K = experts.shape
    kept = torch.ones(T, K, dtype=torch.bool, device=experts.device)
    if capacity is None:
        return kept
    flat_experts = experts.reshape(-1)  # assignment i = t*K + k, in token order
    flat_weights = weights.reshape(-1)
    flat_kept = kept.view(-1)
    for e in range(num_experts):
        mine = torch.nonzero(flat_experts == e).flatten()  # ascending assignment index
        if drop_policy == "score":
            # keep the heaviest assignments; ties keep the earlier token
            order = torch.sort(flat_weights[mine], descending=True, stable=True).indices
            mine = mine[order]
        flat_kept[mine[capacity:]] = False
    return kept


def moe_layer(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    *,
    top_k: int,
    activation: str = "swiglu",
    score_func: str = "softmax",
    bias: Optional[torch.Tensor] = None,
    n_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "max",
    renormalize: bool = False,
    renorm_eps: float = 0.0,
    routed_scaling: float = 1.0,
    expert_choice: bool = False,
    capacity: Optional[int] = None,
    drop_policy: str = "token_order",
    shared_w1: Optional[torch.Tensor] = None,
    shared_w2: Optional[torch.Tensor] = None,
    shared_gate_w: Optional[torch.Tensor] = None,
    router_dtype: torch.dtype = torch.float32,
    router_x: Optional[torch.Tensor] = None,
) -> MoELayerOutput:
    """The MoE layer, step by step.

    x [T,H]; router_weight [E,H]; w1 [E,F1,H]; w2 [E,H,F]; bias [E] (selection only);
    shared_w1 [F1s,H], shared_w2 [H,Fs], shared_gate_w [H].
    capacity: None is dropless (token choice); expert choice needs it (tokens per expert).
    router_x [T,H]: what the router sees (default x); smoe.nn.MoE passes x times its jitter noise.
    """
    T, H = x.shape
    E = router_weight.shape[0]

    # 1. Router logits, accumulated and kept in fp32.
    rx = x if router_x is None else router_x
    logits = (rx.to(router_dtype) @ router_weight.to(router_dtype).t()).float()  # [T,E]

    # 2. Scores.
    if score_func == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif score_func == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")

    y = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    if expert_choice:
        # 3b. Expert choice (Zhou et al. 2022): expert e takes the C tokens with the highest score
        # for e; a token may be taken by several experts or by none. Weight = the score itself.
        C = min(capacity, T)
        chosen_tokens = _stable_topk(scores.t(), C)  # [E,C]
        kept = torch.zeros(T, E, dtype=torch.bool, device=x.device)
        kept.scatter_(0, chosen_tokens.t(), True)
        weights = torch.where(kept, scores, torch.zeros_like(scores))  # [T,E]
        for e in range(E):
            tokens = chosen_tokens[e]
            out = expert_ffn(x[tokens], w1[e], w2[e], activation)
            y = y.index_add(0, tokens, weights[tokens, e, None] * out.float())
        experts = None
        routed = kept.sum(dim=0)
        tokens_per_expert = routed
        dropped = torch.zeros((), dtype=torch.int64, device=x.device)
        aux_loss = torch.zeros((), dtype=torch.float32, device=x.device)
    else:
        # 3a. Token choice: top-k experts per token, weighted by their (unbiased) scores.
        experts = _token_choice(
            scores, top_k=top_k, bias=bias, n_groups=n_groups, topk_groups=topk_groups, group_score=group_score
        )  # [T,K]
        weights = scores.gather(1, experts)  # [T,K]
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + renorm_eps)
        weights = weights * routed_scaling

        # 4. Capacity.
        kept = _drop_over_capacity(experts, weights.detach(), E, capacity, drop_policy)
        routed = torch.bincount(experts.reshape(-1), minlength=E)
        tokens_per_expert = torch.bincount(experts[kept], minlength=E)
        dropped = (~kept).sum()

        # 5. Experts, one at a time.
        for e in range(E):
            tokens, slot = torch.nonzero((experts == e) & kept, as_tuple=True)
            out = expert_ffn(x[tokens], w1[e], w2[e], activation)  # [N,H]
            y = y.index_add(0, tokens, weights[tokens, slot, None] * out.float())

        # 7a. Switch load-balancing loss (Fedus et al. 2021, eq. 4, in Hugging Face Mixtral's form):
        # E * sum_e (fraction of assignments routed to e) * (mean score of e), minimal when uniform.
        if T > 0:
            aux_loss = E * torch.sum(routed.float() / T * scores.mean(dim=0))
        else:
            aux_loss = scores.sum() * 0.0

    # 6. Shared expert, seen by every token.
    if shared_w1 is not None:
        shared = expert_ffn(x, shared_w1, shared_w2, activation).float()
        if shared_gate_w is not None:
            shared = torch.sigmoid(x.float() @ shared_gate_w.float())[:, None] * shared
        y = y + shared

    # 7b. Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2.
    z_loss = torch.logsumexp(logits, dim=-1).square().mean() if T > 0 else logits.sum() * 0.0

    return MoELayerOutput(
        y.to(x.dtype), logits, scores, experts, weights, kept, routed, tokens_per_expert, dropped, aux_loss, z_loss
    )

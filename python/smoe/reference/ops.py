"""Readable pure-PyTorch versions of every smoe op: the oracle of the tests.

Same names, arguments and semantics as smoe.functional (including the tie rules), written for clarity,
not speed: loops over experts, host synchronisation where it makes the code plainer. Every op is
differentiable by autograd w.r.t. its float tensor inputs and runs on any torch device.

Precision follows the C++ core: scores, routing weights and losses are f32 (f64 for f64 inputs); the
expert ops compute in f32 for f32/bf16/f16 inputs (f64 for f64) and round once to the input dtype
when they store a result.

Shape vocabulary: T tokens, H hidden, F expert FFN size, E experts, K experts per token, R rows of
the expert-sorted buffer, C capacity per expert.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

__all__ = [
    "RoutingPlan",
    "topk_gating",
    "expert_choice",
    "load_balancing_loss",
    "z_loss",
    "balancing_bias_update",
    "routing_plan",
    "routing_plan_max_rows",
    "permute",
    "combine",
    "grouped_gemm",
    "activation",
    "expert_mlp",
    "expert_mlp_combine_top1",
    "shared_expert",
]


class RoutingPlan(NamedTuple):
    """Where each (token, k) assignment goes in the expert-sorted buffer.

    counts        [E]    i32: rows kept per expert (unpadded)
    offsets       [E+1]  i64: segment starts (segments padded to pad_multiple); offsets[E] = rows used
    row_of        [T, K] i32: row of assignment (t, k), -1 if it was dropped
    token_of_row  [R]    i32: token of each row, -1 for padding and for rows past offsets[E]
    """

    counts: torch.Tensor
    offsets: torch.Tensor
    row_of: torch.Tensor
    token_of_row: torch.Tensor

    @property
    def num_rows(self) -> torch.Tensor:
        """Rows in use (a 0-d tensor, so no host sync): offsets[-1]."""
        return self.offsets[-1]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype of the core: f64 for f64 inputs, f32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stable_desc_order(keys: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Indices that sort `keys` in descending order, ties to the lower index (a stable sort)."""
    return torch.sort(keys, dim=dim, descending=True, stable=True).indices


def _check_no_nan(op: str, logits: torch.Tensor) -> None:
    # The documented rule of the CPU backend, followed here: NaN logits are an error.
    bad = torch.isnan(logits).any(dim=-1).nonzero()
    if bad.numel() > 0:
        raise ValueError(f"{op}: argument 'logits': expected no NaN values, got a NaN in row {int(bad[0, 0])}")


def _scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    x = logits.to(_acc_dtype(logits.dtype))
    if score_func == "softmax":
        return torch.softmax(x, dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(x)
    raise ValueError(f"argument 'score_func': expected 'softmax' or 'sigmoid', got {score_func!r}")


# ---- gating --------------------------------------------------------------------------------------


def topk_gating(
    logits: torch.Tensor,
    *,
    top_k: int,
    score_func: str = "softmax",
    bias: Optional[torch.Tensor] = None,
    n_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "max",
    renormalize: bool = False,
    renorm_eps: float = 0.0,
    routed_scaling: float = 1.0,
):
    """Token-choice top-k gating (Mixtral, Qwen-MoE, DeepSeek-V2/V3 routers).

    logits [T, E] -> weights [T, K] f32, experts [T, K] i32 (descending selection score), scores [T, E] f32.
    The bias [E] steers the selection only; the weights are the unbiased scores of the picked experts.
    """
    _check_no_nan("topk_gating", logits)
    T, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"topk_gating: argument 'top_k': expected a value in [1, {E}], got {top_k}")
    if n_groups < 1 or E % n_groups != 0:
        raise ValueError(f"topk_gating: argument 'n_groups': expected a divisor of E = {E}, got {n_groups}")
    if not 1 <= topk_groups <= n_groups:
        raise ValueError(f"topk_gating: argument 'topk_groups': expected a value in [1, {n_groups}], got {topk_groups}")
    if top_k > topk_groups * (E // n_groups):
        raise ValueError(f"topk_gating: argument 'top_k': expected at most topk_groups * (E / n_groups), got {top_k}")
    scores = _scores(logits, score_func)  # [T, E]

    # Selection key: scores plus the balancing bias. Selection is not differentiable.
    key = scores.detach()
    if bias is not None:
        key = key + bias.to(key.dtype)

    if topk_groups < n_groups:
        # Group-limited routing: keep the experts of the topk_groups best groups only.
        grouped = key.view(T, n_groups, E // n_groups)  # [T, G, E/G]
        if group_score == "max":
            gkey = grouped.max(dim=-1).values
        elif group_score == "top2_sum":
            two = min(2, E // n_groups)
            gkey = grouped.topk(two, dim=-1).values.sum(dim=-1)
        else:
            raise ValueError(f"argument 'group_score': expected 'max' or 'top2_sum', got {group_score!r}")
        kept_groups = _stable_desc_order(gkey)[:, :topk_groups]  # [T, topk_groups]
        kept = torch.zeros(T, n_groups, dtype=torch.bool, device=logits.device)
        kept.scatter_(1, kept_groups, True)
        mask = kept.repeat_interleave(E // n_groups, dim=1)  # [T, E]
        key = key.masked_fill(~mask, float("-inf"))

    experts = _stable_desc_order(key)[:, :top_k]  # [T, K]
    weights = scores.gather(1, experts)  # [T, K]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + renorm_eps)
    weights = weights * routed_scaling
    return weights, experts.to(torch.int32), scores


def expert_choice(logits: torch.Tensor, *, capacity: int, score_func: str = "softmax"):
    """Expert-choice routing (Zhou et al., 2022): each expert takes its `capacity` best tokens.

    logits [T, E] -> weights [T, E] (score where chosen, 0 elsewhere), tokens [E, C] i32 (descending
    score, ties to the lower token), row_of [T, E] i32 (row e*C + c, -1 if not chosen), scores [T, E].
    """
    _check_no_nan("expert_choice", logits)
    T, E = logits.shape
    if not 1 <= capacity <= T:
        raise ValueError(f"expert_choice: argument 'capacity': expected a value in [1, {T}], got {capacity}")
    scores = _scores(logits, score_func)  # [T, E]
    tokens = _stable_desc_order(scores.detach().t())[:, :capacity]  # [E, C]
    row_of = torch.full((T, E), -1, dtype=torch.int32, device=logits.device)
    rows = torch.arange(E * capacity, device=logits.device, dtype=torch.int32).view(E, capacity)
    experts = torch.arange(E, device=logits.device).unsqueeze(1).expand(E, capacity)
    row_of[tokens, experts] = rows
    weights = torch.where(row_of >= 0, scores, torch.zeros_like(scores))
    return weights, tokens.to(torch.int32), row_of, scores


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss in Hugging Face Mixtral's top-k form:
    E * sum_e (count_e / T) * mean_t probs[t, e], count_e = number of (t, k) routed to e.
    The counts are constants: only probs carries gradient. No tokens: 0."""
    T, E = probs.shape
    if T == 0:
        return probs.sum() * 0.0
    counts = torch.bincount(experts.reshape(-1).long(), minlength=E).to(probs.dtype)  # [E]
    fraction = counts / T
    mean_prob = probs.mean(dim=0)
    return E * (fraction * mean_prob).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2. No tokens: 0."""
    _check_no_nan("z_loss", logits)
    x = logits.to(_acc_dtype(logits.dtype))
    if x.shape[0] == 0:
        return x.sum() * 0.0
    return torch.logsumexp(x, dim=-1).square().mean()


@torch.no_grad()
def balancing_bias_update(counts: torch.Tensor, bias: torch.Tensor, *, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): bias[e] += rate * sign(mean(counts) - counts[e]), in place."""
    c = counts.to(torch.float64)
    bias += (rate * torch.sign(c.mean() - c)).to(bias.dtype)


# ---- routing -------------------------------------------------------------------------------------


def routing_plan_max_rows(
    T: int, K: int, *, num_experts: int, capacity: Optional[int] = None, pad_multiple: int = 1
) -> int:
    """Upper bound of R: every assignment kept (or E*C with a capacity), plus pad_multiple - 1 rows of
    padding per expert. Sizes token_of_row and the permuted buffers without looking at the data."""
    kept = T * K
    if capacity is not None:
        kept = min(kept, num_experts * min(capacity, T * K))
    return kept + num_experts * (pad_multiple - 1)


def routing_plan(
    experts: torch.Tensor,
    *,
    num_experts: int,
    weights: Optional[torch.Tensor] = None,
    capacity: Optional[int] = None,
    drop_policy: str = "token_order",
    pad_multiple: int = 1,
) -> RoutingPlan:
    """The expert-sorted row layout of the assignments experts[T, K].

    Expert e owns rows [offsets[e], offsets[e] + counts[e]); inside it, assignments keep (t, k) order.
    With a capacity C an expert keeps C assignments: its first C in token order ("token_order"), or its
    C highest weights, ties to the lower (t, k) ("score"); the kept rows are still in token order.
    """
    T, K = experts.shape
    E = num_experts
    device = experts.device
    if drop_policy not in ("token_order", "score"):
        raise ValueError(f"argument 'drop_policy': expected 'token_order' or 'score', got {drop_policy!r}")
    flat = experts.reshape(-1).long()  # assignment a = t*K + k
    if flat.numel() > 0 and (flat.min() < 0 or flat.max() >= E):
        raise ValueError(f"routing_plan: argument 'experts': expected indices in [0, {E})")

    counts = torch.zeros(E, dtype=torch.int32, device=device)
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=device)
    row_of = torch.full((T * K,), -1, dtype=torch.int32, device=device)
    R_max = routing_plan_max_rows(T, K, num_experts=E, capacity=capacity, pad_multiple=pad_multiple)
    token_of_row = torch.full((R_max,), -1, dtype=torch.int32, device=device)

    start = 0
    for e in range(E):
        mine = (flat == e).nonzero().flatten()  # assignments of expert e, in (t, k) order
        if capacity is not None and mine.numel() > capacity:
            if drop_policy == "token_order":
                mine = mine[:capacity]
            else:
                w = weights.reshape(-1)[mine].detach()
                best = _stable_desc_order(w)[:capacity]  # ties: the lower (t, k)
                mine = mine[best].sort().values  # back to token order
        n = mine.numel()
        rows = start + torch.arange(n, device=device)
        row_of[mine] = rows.to(torch.int32)
        token_of_row[rows] = (mine // K).to(torch.int32)
        counts[e] = n
        padded = -(-n // pad_multiple) * pad_multiple
        start += padded
        offsets[e + 1] = start
    return RoutingPlan(counts, offsets, row_of.view(T, K), token_of_row)


def _row_of(plan_or_row_of: Union[RoutingPlan, torch.Tensor]) -> torch.Tensor:
    return plan_or_row_of.row_of if isinstance(plan_or_row_of, tuple) else plan_or_row_of


def permute(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """xs[r] = x[token_of_row[r]]; zero rows for padding (token -1)."""
    tok = plan.token_of_row.long()  # [R]
    xs = x.new_zeros((tok.shape[0], x.shape[1]))  # [R, H]
    real = tok >= 0
    xs[real] = x[tok[real]]
    return xs


def combine(ys: torch.Tensor, weights: torch.Tensor, plan_or_row_of) -> torch.Tensor:
    """y[t] = sum_k weights[t, k] * ys[row_of[t, k]] over the kept k, in f32 (f64 for f64), rounded once."""
    row_of = _row_of(plan_or_row_of).long()  # [T, K]
    acc = _acc_dtype(ys.dtype)
    T, K = row_of.shape
    kept = row_of >= 0
    picked = ys.new_zeros((T, K, ys.shape[1]), dtype=acc)  # [T, K, H]
    picked[kept] = ys[row_of[kept]].to(acc)
    w = torch.where(kept, weights.to(acc), torch.zeros((), dtype=acc, device=weights.device))  # [T, K]
    return (w.unsqueeze(-1) * picked).sum(dim=1).to(ys.dtype)


# ---- experts -------------------------------------------------------------------------------------


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, *, trans_b: bool = True) -> torch.Tensor:
    """c[seg_e] = a[seg_e] @ b[e]^T (trans_b) or a[seg_e] @ b[e]; rows past offsets[E] are zero."""
    E = b.shape[0]
    N = b.shape[1] if trans_b else b.shape[2]
    acc = _acc_dtype(a.dtype)
    bounds = offsets.tolist()
    pieces = []
    for e in range(E):
        seg = a[bounds[e] : bounds[e + 1]].to(acc)
        w = b[e].to(acc)
        pieces.append(seg @ (w.t() if trans_b else w))
    pieces.append(a.new_zeros(a.shape[0] - bounds[E], N, dtype=acc))
    return torch.cat(pieces, dim=0).to(a.dtype)


_GATED = {"swiglu": F.silu, "geglu": F.gelu}
_PLAIN = {"gelu": F.gelu, "relu": F.relu}


def activation(x: torch.Tensor, *, kind: str = "swiglu") -> torch.Tensor:
    """swiglu/geglu: x [R, 2F] = [gate | up] -> act(gate) * up [R, F]; gelu (exact), relu: elementwise."""
    acc = _acc_dtype(x.dtype)
    h = x.to(acc)
    if kind in _GATED:
        gate, up = h.chunk(2, dim=-1)
        return (_GATED[kind](gate) * up).to(x.dtype)
    if kind in _PLAIN:
        return _PLAIN[kind](h).to(x.dtype)
    raise ValueError(f"argument 'kind': expected 'swiglu', 'geglu', 'gelu' or 'relu', got {kind!r}")


_apply_activation = activation  # the ops below take an argument named `activation`


def expert_mlp(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, plan: RoutingPlan, *, activation: str = "swiglu"
) -> torch.Tensor:
    """ys[r] = act(x[token_of_row[r]] @ w1[e]^T) @ w2[e]^T for the rows r of expert e.

    Rounds to x's dtype where the core stores an intermediate: after permute, after the first GEMM,
    after the activation, after the second GEMM."""
    xs = permute(x, plan)  # [R, H]
    pre = grouped_gemm(xs, w1, plan.offsets)  # [R, F1]
    act = _apply_activation(pre, kind=activation)  # [R, F]
    return grouped_gemm(act, w2, plan.offsets)  # [R, H]


def expert_mlp_combine_top1(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    plan: RoutingPlan,
    *,
    activation: str = "swiglu",
) -> torch.Tensor:
    """combine(expert_mlp(x, w1, w2, plan), weights, plan) in x's dtype, for top-1 plans (row_of [T, 1]):
    what the fused op computes in one pass (the weighting and the scatter in the second GEMM's epilogue)."""
    return combine(expert_mlp(x, w1, w2, plan, activation=activation), weights, plan).to(x.dtype)


def shared_expert(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    gate_w: Optional[torch.Tensor] = None,
    *,
    activation: str = "swiglu",
) -> torch.Tensor:
    """sigmoid(x @ gate_w) * (act(x @ w1^T) @ w2^T): the dense expert every token passes through."""
    acc = _acc_dtype(x.dtype)
    pre = (x.to(acc) @ w1.to(acc).t()).to(x.dtype)  # [T, F1]
    act = _apply_activation(pre, kind=activation)  # [T, F]
    out = (act.to(acc) @ w2.to(acc).t()).to(x.dtype)  # [T, H]
    if gate_w is None:
        return out
    gate = torch.sigmoid(x.to(acc) @ gate_w.to(acc))  # [T]
    return (gate.unsqueeze(1) * out.to(acc)).to(x.dtype)

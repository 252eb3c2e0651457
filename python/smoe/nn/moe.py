"""smoe.nn.MoE: a drop-in sparse mixture-of-experts layer.

The forward is the pipeline of ARCHITECTURE.md section 1, one smoe op per stage:
  logits[T,E] (torch, fp32) -> topk_gating | expert_choice -> routing_plan -> expert_mlp
  (permute + grouped GEMM + activation + grouped GEMM) -> combine -> (+ shared_expert).
backend="reference" runs smoe.reference.moe_layer instead: the same layer in readable PyTorch.

Auxiliary losses need no plumbing: `_AttachAux` returns the output unchanged and, in backward, sends
a gradient of 1 into `aux_loss_coef * aux_loss + z_loss_coef * z_loss`, so `loss.backward()` on
anything computed from the layer's output also trains the router against the aux losses.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as torch_F

from smoe.reference.layer import capacity_for, moe_layer

__all__ = ["MoE"]

_ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")
_GATED = ("swiglu", "geglu")
_SCORE_FUNCS = ("softmax", "sigmoid")
_GROUP_SCORES = ("max", "top2_sum")
_DROP_POLICIES = ("token_order", "score")
_BACKENDS = ("auto", "cpu", "cuda", "simt", "reference")


class _AttachAux(torch.autograd.Function):
    """y -> y; backward also returns d(total)/d(aux) = 1 for the (already weighted) aux term."""

    @staticmethod
    def forward(ctx, y, aux):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y, torch.ones((), dtype=torch.float32, device=grad_y.device)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The routing weights combine takes for outputs of `dtype`: f32, f64 for f64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


class MoE(nn.Module):
    """Sparse mixture-of-experts layer: y[..., H] = sum over chosen experts of weight * expert(x).

    Args (keyword-only after top_k):
        hidden_size H, ffn_size F (per expert), num_experts E, top_k K.
        activation: "swiglu" | "geglu" (w1 is [E, 2F, H], rows [gate | up]) | "gelu" | "relu".
        score_func: "softmax" | "sigmoid" (DeepSeek-V3).
        renormalize: divide the K weights by their sum (Mixtral, DeepSeek-V3). Default: top_k > 1.
        renorm_eps: added to that sum. routed_scaling: factor on the routed weights (DeepSeek-V3).
        n_groups, topk_groups, group_score: group-limited routing (DeepSeek-V2/V3).
        bias_balancing: DeepSeek-V3 auxiliary-loss-free balancing: a selection bias [E] (buffer
            `expert_bias`) nudged by bias_update_rate * sign(mean load - load) after each training
            forward, without gradients.
        expert_choice: experts choose tokens (Zhou et al. 2022), C = ceil(capacity_factor*T*K/E)
            with capacity_factor defaulting to 1.
        num_shared_experts, shared_ffn_size (default num_shared_experts * F), shared_gate: an
            always-on expert, optionally scaled by sigmoid(x @ shared_gate_w) (Qwen2-MoE).
        capacity_factor: None is dropless; else C = ceil(capacity_factor * T * K / E) assignments per
            expert, extra ones dropped by drop_policy ("token_order": later tokens first; "score":
            lowest weights first).
        aux_loss_coef, z_loss_coef: weights of the switch load-balancing loss and router z-loss,
            added to the gradients automatically; values in `last_aux_loss`, `last_z_loss`.
        router_dtype: dtype of the router weight and of the logits matmul (logits are kept in fp32).
        dtype, device: of the expert parameters. backend: "auto" | "cpu" | "cuda" | "simt" | "reference".

    After each forward, `last_stats` holds detached routing statistics: `tokens_per_expert` [E]
    (assignments computed), `routed_per_expert` [E] (assignments chosen, before capacity) and
    `dropped` (0-d, assignments dropped by capacity).
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        num_experts: int,
        top_k: int,
        *,
        activation: str = "swiglu",
        score_func: str = "softmax",
        renormalize: Optional[bool] = None,
        renorm_eps: float = 0.0,
        routed_scaling: float = 1.0,
        n_groups: int = 1,
        topk_groups: int = 1,
        group_score: str = "max",
        bias_balancing: bool = False,
        bias_update_rate: float = 1e-3,
        expert_choice: bool = False,
        num_shared_experts: int = 0,
        shared_ffn_size: Optional[int] = None,
        shared_gate: bool = False,
        capacity_factor: Optional[float] = None,
        drop_policy: str = "token_order",
        aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        router_dtype: torch.dtype = torch.float32,
        dtype: Optional[torch.dtype] = None,
        device=None,
        backend: str = "auto",
    ):
        super().__init__()
        _check_int("hidden_size", hidden_size, 1)
        _check_int("ffn_size", ffn_size, 1)
        _check_int("num_experts", num_experts, 1)
        _check_int("top_k", top_k, 1)
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
        _check_choice("activation", activation, _ACTIVATIONS)
        _check_choice("score_func", score_func, _SCORE_FUNCS)
        _check_choice("group_score", group_score, _GROUP_SCORES)
        _check_choice("drop_policy", drop_policy, _DROP_POLICIES)
        _check_choice("backend", backend, _BACKENDS)
        _check_int("n_groups", n_groups, 1)
        _check_int("topk_groups", topk_groups, 1)
        if num_experts % n_groups != 0:
            raise ValueError(f"n_groups must divide num_experts ({num_experts}), got {n_groups}")
        if topk_groups > n_groups:
            raise ValueError(f"topk_groups must be <= n_groups ({n_groups}), got {topk_groups}")
        per_group = num_experts // n_groups
        if n_groups > 1 and top_k > topk_groups * per_group:
            raise ValueError(
                f"top_k must be <= topk_groups * experts per group ({topk_groups * per_group}), got {top_k}")
        if renormalize is None:
            renormalize = top_k > 1
        if not isinstance(renormalize, bool):
            raise ValueError(f"renormalize must be a bool or None, got {renormalize!r}")
        if not (renorm_eps >= 0.0):
            raise ValueError(f"renorm_eps must be >= 0, got {renorm_eps!r}")
        if not (routed_scaling > 0.0 and math.isfinite(routed_scaling)):
            raise ValueError(f"routed_scaling must be a finite number > 0, got {routed_scaling!r}")
        if not (bias_update_rate >= 0.0):
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate!r}")
        if capacity_factor is not None and not (capacity_factor > 0.0 and math.isfinite(capacity_factor)):
            raise ValueError(f"capacity_factor must be None (dropless) or a finite number > 0, got {capacity_factor!r}")
        # C = ceil(capacity_factor * T * K / E) rows per expert must fit the core's int32 rows even for T = 1.
        max_factor = (2**31 - 1) * num_experts / top_k
        if capacity_factor is not None and capacity_factor > max_factor:
            raise ValueError(f"capacity_factor must be <= {max_factor:g} (C = ceil(capacity_factor*T*K/E) rows per "
                             f"expert must fit in int32; None is dropless), got {capacity_factor!r}")
        for name, coef in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)):
            if not (coef >= 0.0 and math.isfinite(coef)):
                raise ValueError(f"{name} must be a finite number >= 0, got {coef!r}")
        _check_int("num_shared_experts", num_shared_experts, 0)
        if shared_ffn_size is not None:
            _check_int("shared_ffn_size", shared_ffn_size, 1)
            if num_shared_experts == 0:
                raise ValueError("shared_ffn_size needs num_shared_experts >= 1, got num_shared_experts=0")
        if shared_gate and num_shared_experts == 0:
            raise ValueError("shared_gate=True needs num_shared_experts >= 1, got num_shared_experts=0")
        if expert_choice:
            if n_groups > 1 or bias_balancing:
                raise ValueError("expert_choice=True supports neither n_groups > 1 nor bias_balancing "
                                 f"(got n_groups={n_groups}, bias_balancing={bias_balancing})")
            if aux_loss_coef > 0.0:
                raise ValueError("aux_loss_coef must be 0 with expert_choice=True (expert choice is "
                                 f"balanced by construction), got {aux_loss_coef}")
        if router_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(f"router_dtype must be a floating dtype, got {router_dtype!r}")

        self.hidden_size, self.ffn_size = hidden_size, ffn_size
        self.num_experts, self.top_k = num_experts, top_k
        self.activation, self.score_func = activation, score_func
        self.renormalize, self.renorm_eps, self.routed_scaling = renormalize, float(renorm_eps), float(routed_scaling)
        self.n_groups, self.topk_groups, self.group_score = n_groups, topk_groups, group_score
        self.bias_balancing, self.bias_update_rate = bias_balancing, float(bias_update_rate)
        self.expert_choice = expert_choice
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        self.router_dtype = router_dtype
        self.backend = backend
        self.num_shared_experts = num_shared_experts

        factory = {"dtype": dtype, "device": device}
        f1 = 2 * ffn_size if activation in _GATED else ffn_size
        self.router = nn.Linear(hidden_size, num_experts, bias=False, dtype=router_dtype, device=device)
        self.w1 = nn.Parameter(torch.empty(num_experts, f1, hidden_size, **factory))  # [E,F1,H]
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size, **factory))  # [E,H,F]
        if bias_balancing:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        else:
            self.expert_bias = None
        if num_shared_experts > 0:
            fs = shared_ffn_size if shared_ffn_size is not None else num_shared_experts * ffn_size
            self.shared_ffn_size = fs
            fs1 = 2 * fs if activation in _GATED else fs
            self.shared_w1 = nn.Parameter(torch.empty(fs1, hidden_size, **factory))  # [F1s,H]
            self.shared_w2 = nn.Parameter(torch.empty(hidden_size, fs, **factory))  # [H,Fs]
            self.shared_gate_w = nn.Parameter(torch.empty(hidden_size, **factory)) if shared_gate else None  # [H]
        else:
            self.shared_ffn_size = 0
            self.shared_w1 = self.shared_w2 = self.shared_gate_w = None
        self.reset_parameters()

        self.last_aux_loss: Optional[torch.Tensor] = None
        self.last_z_loss: Optional[torch.Tensor] = None
        self.last_stats: dict = {}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every projection."""
        self.router.reset_parameters()
        for w in (self.w1, self.w2, self.shared_w1, self.shared_w2):
            if w is not None:
                bound = 1.0 / math.sqrt(w.shape[-1])
                w.uniform_(-bound, bound)
        if self.shared_gate_w is not None:
            bound = 1.0 / math.sqrt(self.hidden_size)
            self.shared_gate_w.uniform_(-bound, bound)
        if self.expert_bias is not None:
            self.expert_bias.zero_()

    def extra_repr(self) -> str:
        parts = [f"hidden_size={self.hidden_size}", f"ffn_size={self.ffn_size}",
                 f"num_experts={self.num_experts}", f"top_k={self.top_k}",
                 f"activation={self.activation!r}", f"score_func={self.score_func!r}"]
        if self.expert_choice:
            parts.append("expert_choice=True")
        if self.num_shared_experts:
            parts.append(f"shared_ffn_size={self.shared_ffn_size}")
        parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Capacity C per expert for T = num_tokens, or None when dropless."""
        if self.expert_choice:
            cf = 1.0 if self.capacity_factor is None else self.capacity_factor
            return min(capacity_for(cf, num_tokens, self.top_k, self.num_experts), num_tokens)
        if self.capacity_factor is None:
            return None
        return capacity_for(self.capacity_factor, num_tokens, self.top_k, self.num_experts)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [..., hidden_size={self.hidden_size}], got {tuple(x.shape)}")
        if x.dtype != self.w1.dtype:
            raise ValueError(f"x must have the dtype of the expert weights ({self.w1.dtype}), got {x.dtype}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.hidden_size)  # [T,H]
        if (self.hidden_size > 1 and x2.stride(1) != 1) or (x2.shape[0] > 1 and x2.stride(0) < self.hidden_size):
            x2 = x2.contiguous()  # strided or expanded x (x.t(), x.expand(...)): the kernels read dense rows
        if self.backend == "reference":
            y, aux, z, stats = self._forward_reference(x2)
        else:
            y, aux, z, stats = self._forward_smoe(x2)

        self.last_aux_loss = aux.detach()
        self.last_z_loss = z.detach()
        self.last_stats = stats
        if self.training and self.bias_balancing:
            self._update_bias(stats["routed_per_expert"])

        aux_term = None
        if self.aux_loss_coef > 0.0:
            aux_term = self.aux_loss_coef * aux
        if self.z_loss_coef > 0.0:
            aux_term = self.z_loss_coef * z if aux_term is None else aux_term + self.z_loss_coef * z
        if aux_term is not None and torch.is_grad_enabled() and aux_term.requires_grad:
            y = _AttachAux.apply(y, aux_term)
        return y.reshape(*lead, self.hidden_size)

    def _router_logits(self, x2: torch.Tensor) -> torch.Tensor:
        # fp32 logits, fp64 for an fp64 router (f64 routing end to end, as the core supports it).
        acc = torch.float64 if self.router_dtype == torch.float64 else torch.float32
        return torch_F.linear(x2.to(self.router_dtype), self.router.weight.to(self.router_dtype)).to(acc)

    def _forward_reference(self, x2):
        out = moe_layer(
            x2, self.router.weight, self.w1, self.w2, top_k=self.top_k, activation=self.activation,
            score_func=self.score_func, bias=self.expert_bias, n_groups=self.n_groups,
            topk_groups=self.topk_groups, group_score=self.group_score, renormalize=self.renormalize,
            renorm_eps=self.renorm_eps, routed_scaling=self.routed_scaling, expert_choice=self.expert_choice,
            capacity=self.capacity(x2.shape[0]), drop_policy=self.drop_policy, shared_w1=self.shared_w1,
            shared_w2=self.shared_w2, shared_gate_w=self.shared_gate_w, router_dtype=self.router_dtype)
        stats = {"tokens_per_expert": out.tokens_per_expert.detach().to(torch.int32),
                 "routed_per_expert": out.routed_per_expert.detach().to(torch.int32),
                 "dropped": out.dropped.detach()}
        return out.y, out.aux_loss, out.z_loss, stats

    def _forward_smoe(self, x2):
        import smoe.functional as F

        backend = self.backend
        T, E = x2.shape[0], self.num_experts
        logits = self._router_logits(x2)  # [T,E] fp32
        if self.expert_choice:
            C = self.capacity(T)
            if C > 0:
                weights, tokens, row_of, scores = F.expert_choice(
                    logits, capacity=C, score_func=self.score_func, backend=backend)  # [T,E] [E,C] [T,E] [T,E]
            else:  # T = 0: nothing to choose (the op needs capacity >= 1)
                weights = logits * 0.0
                tokens = torch.zeros(E, 0, dtype=torch.int32, device=x2.device)
                row_of = torch.zeros(0, E, dtype=torch.int32, device=x2.device)
            counts = torch.full((E,), C, dtype=torch.int32, device=x2.device)
            offsets = torch.arange(E + 1, dtype=torch.int64, device=x2.device) * C
            plan = F.RoutingPlan(counts, offsets, row_of, tokens.reshape(-1))
            ys = F.expert_mlp(x2, self.w1, self.w2, plan, activation=self.activation, backend=backend)  # [R,H]
            y = F.combine(ys, weights.to(_acc_dtype(x2.dtype)), plan, backend=backend)
            routed = counts
            dropped = torch.zeros((), dtype=torch.int64, device=x2.device)
            aux = torch.zeros((), dtype=torch.float32, device=x2.device)
        else:
            weights, experts, scores = F.topk_gating(
                logits, top_k=self.top_k, score_func=self.score_func, bias=self.expert_bias,
                n_groups=self.n_groups, topk_groups=self.topk_groups, group_score=self.group_score,
                renormalize=self.renormalize, renorm_eps=self.renorm_eps, routed_scaling=self.routed_scaling,
                backend=backend)  # [T,K] f32, [T,K] i32, [T,E] f32
            capacity = self.capacity(T)
            plan = F.routing_plan(experts, num_experts=E, weights=weights.detach().float(), capacity=capacity,
                                  drop_policy=self.drop_policy, backend=backend)
            ys = F.expert_mlp(x2, self.w1, self.w2, plan, activation=self.activation, backend=backend)  # [R,H]
            y = F.combine(ys, weights.to(_acc_dtype(x2.dtype)), plan, backend=backend)  # [T,H]
            if capacity is None:
                routed = plan.counts
            else:
                routed = torch.zeros(E, dtype=torch.int32, device=x2.device).scatter_add_(
                    0, experts.reshape(-1).long(), torch.ones(experts.numel(), dtype=torch.int32, device=x2.device))
            dropped = (routed.sum(dtype=torch.int64) - plan.counts.sum(dtype=torch.int64))
            aux = F.load_balancing_loss(scores, experts, backend=backend)  # cheap: [T,E]; always reported
        if self.num_shared_experts > 0:
            y = y + F.shared_expert(x2, self.shared_w1, self.shared_w2, self.shared_gate_w,
                                    activation=self.activation, backend=backend)
        z = F.z_loss(logits, backend=backend)
        stats = {"tokens_per_expert": plan.counts.detach(), "routed_per_expert": routed.detach(),
                 "dropped": dropped.detach()}
        return y.to(x2.dtype), aux, z, stats

    @torch.no_grad()
    def _update_bias(self, routed: torch.Tensor) -> None:
        """DeepSeek-V3 (section 2.1.2): b_e += rate * sign(mean load - load_e), no gradient."""
        if self.backend == "reference":
            load = routed.float()
            self.expert_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
        else:
            import smoe.functional as F

            F.balancing_bias_update(routed.to(torch.int32), self.expert_bias, rate=self.bias_update_rate,
                                    backend=self.backend)

    # ------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, block, **kwargs) -> "MoE":
        """Build an MoE with the weights and routing of a Hugging Face sparse MoE block (see smoe.integrations.hf)."""
        from smoe.integrations.hf import from_hf

        return from_hf(block, **kwargs)

    def to_hf(self, config=None, *, kind: Optional[str] = None):
        """A new Hugging Face block (Mixtral / Qwen2-MoE / Qwen3-MoE) holding this layer's weights."""
        from smoe.integrations.hf import to_hf

        return to_hf(self, config=config, kind=kind)

    def copy_to_hf(self, block) -> None:
        """Copy this layer's weights into an existing Hugging Face block of matching shape."""
        from smoe.integrations.hf import copy_to_hf

        copy_to_hf(self, block)


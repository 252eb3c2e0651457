"""smoe.nn.MoE: a drop-in sparse mixture-of-experts layer.

The forward is the pipeline of ARCHITECTURE.md section 1, one smoe op per stage:
  logits[T,E] (torch, fp32) -> topk_gating | expert_choice -> routing_plan -> expert_mlp
  (permute + grouped GEMM + activation + grouped GEMM) -> combine -> (+ shared_expert).
backend="reference" runs smoe.reference.moe_layer instead: the same layer in readable PyTorch.

Training-loop contract (docs/layer.md, "Training loops"):
- auxiliary losses: `layer.aux_loss` (or `smoe.nn.aux_loss(model)` over a whole model) is the
  differentiable `aux_loss_coef * balance + z_loss_coef * z` of the layer's last forward; the model
  adds it to its loss before any scaling. A training forward whose aux loss never received a gradient
  is reported by a warning at the next forward. aux_loss_mode="attach" is the opt-in alternative of
  Megatron-Core's MoEAuxLossAutoScaler: the loss rides on the output and backward injects an explicit
  scale (`smoe.nn.set_aux_loss_scale`).
- per-step state (balancing-bias counts, global-batch balance counts) accumulates over the training
  forwards of a step, never over eval forwards or checkpoint recomputes, and is consumed by
  `layer.end_step()` / `smoe.nn.end_step(model)` once per optimizer step.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as torch_F

from smoe.reference.layer import capacity_for, expert_ffn, moe_layer

__all__ = ["MoE", "AuxLossUnusedWarning", "aux_loss", "set_aux_loss_scale", "end_step", "end_step_after"]

_ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")
_GATED = ("swiglu", "geglu")
_SCORE_FUNCS = ("softmax", "sigmoid")
_GROUP_SCORES = ("max", "top2_sum")
_DROP_POLICIES = ("token_order", "score")
_BACKENDS = ("auto", "cpu", "cuda", "simt", "reference")
_AUX_LOSS_MODES = ("loss", "attach")
_AUX_LOSS_TYPES = ("switch", "global", "sequence")
# end_step() not called after this many training forwards: warn (per-step state would grow stale)
_STALE_FORWARDS = 1024


class AuxLossUnusedWarning(UserWarning):
    """A training forward's weighted aux loss never received a gradient (it was not added to the loss)."""


class _AttachAux(torch.autograd.Function):
    """y -> y; backward also sends a scale into the weighted aux term: `scale` when given, else
    `layer.aux_loss_scale` read at backward time.

    aux_loss_mode="attach" (opt-in, after Megatron-Core's MoEAuxLossAutoScaler): the trainer sets the scale to
    what its loss is multiplied by (c, 1/N for accumulation, GradScaler's scale). Mode "loss" uses it with the
    scale its _ScaleProbe measured, for the recompute of a reentrant checkpoint.
    """

    @staticmethod
    def forward(ctx, y, aux, layer, scale=None):
        ctx.layer, ctx.scale = layer, scale
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        scale = ctx.scale
        if scale is None:
            scale = torch.full((), ctx.layer.aux_loss_scale, dtype=torch.float32, device=grad_y.device)
        return grad_y, scale, None, None


class _ScaleProbe(torch.autograd.Function):
    """`layer.aux_loss` of a training forward that ran without gradients (the first pass of a reentrant
    torch.utils.checkpoint): the value, whose backward records the gradient the loss sends into it (c / N *
    GradScaler's scale, whatever the trainer did) for the recompute to inject into the recomputed aux term.

    The probe node is created when `aux_loss` is read, after the model's forward, so autograd (which runs
    later-created nodes first) reaches it before the checkpoint's backward; a recompute that finds no
    measured gradient warns instead."""

    @staticmethod
    def forward(ctx, anchor, value, layer):
        ctx.layer = layer
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        grad = grad.detach().to(torch.float32)
        layer._probe_grad = grad if layer._probe_grad is None else layer._probe_grad + grad
        return torch.zeros_like(grad), None, None


def _in_recompute() -> bool:
    """True while autograd runs a backward on this thread: a torch.utils.checkpoint recompute (both variants)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The routing weights combine takes for outputs of `dtype`: f32, f64 for f64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def _check_process_group(group) -> None:
    if group is None:
        return
    import torch.distributed as dist

    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise ValueError(f"process_group must be None or a torch.distributed ProcessGroup, got {group!r}")


class MoE(nn.Module):
    """Sparse mixture-of-experts layer: y[..., H] = sum over chosen experts of weight * expert(x).

    Args (keyword-only after top_k):
        hidden_size H, ffn_size F (per expert), num_experts E, top_k K.
        activation: "swiglu" | "geglu" (w1 is [E, 2F, H], rows [gate | up]) | "gelu" | "relu".
        score_func: "softmax" | "sigmoid" (DeepSeek-V3).
        renormalize: divide the K weights by their sum (Mixtral, DeepSeek-V3). Default: top_k > 1.
        renorm_eps: added to that sum. routed_scaling: factor on the routed weights (DeepSeek-V3).
        n_groups, topk_groups, group_score: group-limited routing (DeepSeek-V2/V3).
        bias_balancing: DeepSeek-V3 auxiliary-loss-free balancing: a selection bias [E] (fp32 buffer
            `expert_bias`) moved by bias_update_rate * sign(mean load - load) in `end_step()`, from the
            loads of every training forward since the previous end_step (all-reduced over
            process_group), without gradients.
        expert_choice: experts choose tokens (Zhou et al. 2022), C = ceil(capacity_factor*T*K/E)
            with capacity_factor defaulting to 1.
        num_shared_experts, shared_ffn_size (default num_shared_experts * F), shared_gate: an
            always-on expert, optionally scaled by sigmoid(x @ shared_gate_w) (Qwen2-MoE).
        capacity_factor: None is dropless; else C = ceil(capacity_factor * T * K / E) assignments per
            expert, extra ones dropped by drop_policy ("token_order": later tokens first; "score":
            lowest weights first).
        aux_loss_coef, z_loss_coef: weights of the balance loss and the router z-loss in `aux_loss`;
            unweighted values in `last_aux_loss`, `last_z_loss`.
        aux_loss_type: "switch" (per forward, Switch / HF Mixtral form), "global" (token counts summed
            over process_group and over the training forwards of the step), "sequence" (DeepSeek-V3
            sequence-wise balance loss, x must be [B, S, H]).
        aux_loss_mode: "loss" (add `aux_loss` to the loss yourself) | "attach" (Megatron-style scale hook).
        router_jitter_noise: eps of the multiplicative U(1-eps, 1+eps) noise on the router input in
            training (Switch Transformer; HF Mixtral's router_jitter_noise), from torch's RNG.
        process_group: torch.distributed group over which routing counts are summed (None: none).
        router_dtype: dtype of the router weight and of the logits matmul (logits are kept in fp32);
            `.to(dtype)` leaves the router in router_dtype and the bias in fp32.
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
        aux_loss_type: str = "switch",
        aux_loss_mode: str = "loss",
        router_jitter_noise: float = 0.0,
        process_group=None,
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
        _check_choice("aux_loss_type", aux_loss_type, _AUX_LOSS_TYPES)
        _check_choice("aux_loss_mode", aux_loss_mode, _AUX_LOSS_MODES)
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
        if not isinstance(bias_balancing, bool):
            raise ValueError(f"bias_balancing must be a bool, got {bias_balancing!r}")
        if not (renorm_eps >= 0.0):
            raise ValueError(f"renorm_eps must be >= 0, got {renorm_eps!r}")
        if not (routed_scaling > 0.0 and math.isfinite(routed_scaling)):
            raise ValueError(f"routed_scaling must be a finite number > 0, got {routed_scaling!r}")
        if not (bias_update_rate >= 0.0 and math.isfinite(bias_update_rate)):
            raise ValueError(f"bias_update_rate must be a finite number >= 0, got {bias_update_rate!r}")
        if capacity_factor is not None and not (capacity_factor > 0.0 and math.isfinite(capacity_factor)):
            raise ValueError(f"capacity_factor must be None (dropless) or a finite number > 0, got {capacity_factor!r}")
        # C = ceil(capacity_factor * T * K / E) rows per expert must fit the core's int32 rows even for T = 1.
        max_factor = (2**31 - 1) * num_experts / top_k
        if capacity_factor is not None and capacity_factor > max_factor:
            raise ValueError(f"capacity_factor must be <= {max_factor:g} (C = ceil(capacity_factor*T*K/E) rows per "
                             f"expert must fit in int32; None is dropless), got {capacity_factor!r}")
        for name, coef in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)):
            if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not (coef >= 0.0 and math.isfinite(coef)):
                raise ValueError(f"{name} must be a finite number >= 0, got {coef!r}")
        if (isinstance(router_jitter_noise, bool) or not isinstance(router_jitter_noise, (int, float))
                or not (0.0 <= router_jitter_noise < 1.0)):
            raise ValueError(f"router_jitter_noise must be a number in [0, 1), got {router_jitter_noise!r}")
        _check_process_group(process_group)
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
            if aux_loss_type != "switch":
                raise ValueError("aux_loss_type must be 'switch' with expert_choice=True (no balance loss), "
                                 f"got {aux_loss_type!r}")
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
        self.aux_loss_type, self.aux_loss_mode = aux_loss_type, aux_loss_mode
        self.router_jitter_noise = float(router_jitter_noise)
        self.process_group = process_group
        self.aux_loss_scale = 1.0  # aux_loss_mode="attach" only: see smoe.nn.set_aux_loss_scale
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
        # Assignments per expert routed by the training forwards since the last end_step(): int64, a plain
        # attribute, not a buffer (DDP's broadcast_buffers would copy rank 0's counts over the others').
        self._step_counts = torch.zeros(num_experts, dtype=torch.int64, device=self.router.weight.device)
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
        self._aux_loss: Optional[torch.Tensor] = None
        self._pending_aux = None  # [seen flag] of the last training forward's aux loss (mode "loss")
        self._probe_pending = False  # the last training forward ran without grad (reentrant checkpoint)
        self._probe_grad: Optional[torch.Tensor] = None  # what the loss sent into its aux_loss
        self._global_f: Optional[torch.Tensor] = None  # f of the last training forward, for recomputes
        self._forwards_since_step = 0

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
        self._step_counts.zero_()

    @property
    def step_counts(self) -> torch.Tensor:
        """[E] int64: assignments routed to each expert by the training forwards since the last end_step()."""
        return self._step_counts

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

    # ------------------------------------------------------------ dtype moves
    def _apply(self, fn, recurse=True):
        """Module.to()/.half()/.double() move the expert weights; the router weight keeps router_dtype and
        expert_bias stays fp32 (both only change device), whatever `fn` does."""
        bias = self.expert_bias
        router = self.router.weight
        router_data, router_grad = router.data, router.grad
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(device=self.expert_bias.device, dtype=torch.float32)
        new = self.router.weight
        if self._step_counts.is_meta or new.is_meta:  # to_empty() after a meta-device build: nothing to copy
            self._step_counts = torch.zeros_like(self._step_counts, device=new.device)
        else:
            self._step_counts = self._step_counts.to(new.device)
        if new.dtype != self.router_dtype:
            new.data = router_data.to(device=new.device, dtype=self.router_dtype)
            if router_grad is not None:
                new.grad = router_grad.to(device=new.device, dtype=self.router_dtype)
        return self

    # ------------------------------------------------------------ aux losses
    @property
    def aux_loss(self) -> torch.Tensor:
        """aux_loss_coef * balance loss + z_loss_coef * z-loss of the last forward, a 0-d fp32 tensor.

        Differentiable (mode "loss"): add it to the loss before any scaling (c * loss, / N for gradient
        accumulation, GradScaler). After a training forward without gradients (a reentrant checkpoint's first
        pass) it is a _ScaleProbe, and the recompute brings the router its gradient. A zero tensor before the
        first forward or when both coefficients are 0; detached in aux_loss_mode="attach" (where the output
        already carries it)."""
        if self._aux_loss is None:
            return torch.zeros((), dtype=torch.float32, device=self.router.weight.device)
        if self._probe_pending and torch.is_grad_enabled():
            anchor = torch.zeros((), dtype=torch.float32, device=self._aux_loss.device, requires_grad=True)
            return _ScaleProbe.apply(anchor, self._aux_loss, self)
        return self._aux_loss

    def _check_aux_used(self) -> None:
        pending, self._pending_aux = self._pending_aux, None
        if pending is not None and not pending[0]:
            warnings.warn(
                "smoe.nn.MoE: the aux loss (aux_loss_coef/z_loss_coef > 0) of the previous training forward "
                "received no gradient, so the router was not trained against it. Add it to the loss before "
                "any scaling: loss = task_loss + smoe.nn.aux_loss(model) (docs/layer.md, 'Training loops').",
                AuxLossUnusedWarning, stacklevel=5)  # the caller of layer(x)

    def _weighted_aux(self, balance: torch.Tensor, z: torch.Tensor) -> Optional[torch.Tensor]:
        term = None
        if self.aux_loss_coef > 0.0:
            term = self.aux_loss_coef * balance
        if self.z_loss_coef > 0.0:
            term = self.z_loss_coef * z if term is None else term + self.z_loss_coef * z
        return term

    def _balance_loss(self, scores: torch.Tensor, experts: torch.Tensor, routed: torch.Tensor,
                      seq_ids: Optional[torch.Tensor], num_seqs: int, switch: torch.Tensor,
                      bookkeeping: bool) -> torch.Tensor:
        """The balance loss of aux_loss_type from scores [T,E] f32, experts [T,K], routed [E] (counts)."""
        if self.aux_loss_type == "switch":
            return switch
        E, K = self.num_experts, self.top_k
        if self.aux_loss_type == "global":
            # Global-batch balance (Qiu et al. 2025, arXiv 2501.11873; Megatron-Core "global_aux_loss"):
            # E * sum_e f_e * P_e with f_e = N_e / T_N, N_e the assignments to e summed over the process group
            # and over the step's training forwards so far, T_N the tokens in them, P_e this forward's
            # mean score. One forward on one rank: the switch loss.
            if not self.training:
                counts = routed.to(torch.float32)
            elif bookkeeping:
                self._global_acc = getattr(self, "_global_acc", None)
                reduced = self._reduce_counts(routed.to(torch.int64).clone())
                self._global_acc = reduced if self._global_acc is None else self._global_acc + reduced
                counts = self._global_acc.to(torch.float32)
                self._global_f = counts
            else:  # checkpoint recompute: the counts the forward it replays used
                counts = self._global_f if self._global_f is not None else routed.to(torch.float32)
            tokens = counts.sum() / K
            f = torch.where(tokens > 0, counts / tokens.clamp(min=1.0), torch.zeros_like(counts))
            if scores.shape[0] == 0:
                return scores.sum() * 0.0
            return E * torch.sum(f * scores.mean(dim=0))
        # "sequence": DeepSeek-V3 (arXiv 2412.19437, eq. 17-20), per sequence of S_b tokens:
        # f_i = E / (K S_b) * #(t in b choosing i), P_i = mean_t s'_{t,i} with s' = s / sum_j s_j;
        # the loss is the mean over sequences (with S_b > 0) of sum_i f_i P_i.
        T = scores.shape[0]
        if T == 0:
            return scores.sum() * 0.0
        normed = scores / scores.sum(dim=-1, keepdim=True)
        seq_k = seq_ids[:, None].expand(T, K).reshape(-1)
        counts = torch.zeros(num_seqs * E, dtype=torch.float32, device=scores.device).index_add_(
            0, seq_k * E + experts.reshape(-1).long(), torch.ones(T * K, dtype=torch.float32, device=scores.device))
        counts = counts.view(num_seqs, E)
        S_b = torch.bincount(seq_ids, minlength=num_seqs).to(torch.float32)  # [B]
        P = torch.zeros(num_seqs, E, dtype=torch.float32, device=scores.device).index_add(0, seq_ids, normed)
        present = S_b > 0
        S_safe = S_b.clamp(min=1.0)[:, None]
        per_seq = (E / K) * torch.sum((counts / S_safe) * (P / S_safe), dim=-1)  # [B]
        return per_seq[present].mean()

    # ------------------------------------------------------------ per-step state
    def _reduce_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Sum routing counts [E] (int64) over self.process_group, in place; the one collective the layer
        issues (global balance loss: every training forward; bias balancing: end_step). Every rank of the
        group must make the same calls. Override for another reduction (expert parallelism)."""
        if self.process_group is not None:
            import torch.distributed as dist

            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.process_group)
        return counts

    @torch.no_grad()
    def end_step(self) -> None:
        """Close an optimizer step: with bias_balancing, bias += rate * sign(mean load - load) from the loads of
        every training forward since the last call, summed over process_group (a collective: every rank calls
        it); then forget the step's counts (bias and global balance loss). Call it once per optimizer step,
        e.g. with smoe.nn.end_step_after(optimizer, model)."""
        if self.bias_balancing:
            load = self._reduce_counts(self._step_counts.clone())
            if self.backend == "reference" or int(load.max()) >= 2**31:
                load = load.to(torch.float64)
                self.expert_bias.add_((self.bias_update_rate * torch.sign(load.mean() - load)).float())
            else:
                import smoe.functional as F

                F.balancing_bias_update(load.to(torch.int32), self.expert_bias, rate=self.bias_update_rate,
                                        backend=self.backend)
        self._step_counts.zero_()
        self._global_acc = None
        self._global_f = None
        self._forwards_since_step = 0

    # ------------------------------------------------------------------ forward
    def _token_index(self, x: torch.Tensor, token_mask) -> Optional[torch.Tensor]:
        """Indices [T'] of the kept tokens (token_mask True / nonzero), or None when every token is kept."""
        if token_mask is None:
            return None
        if not isinstance(token_mask, torch.Tensor):
            raise TypeError(f"token_mask must be a torch.Tensor of shape {tuple(x.shape[:-1])} or None, "
                            f"got {type(token_mask).__name__}")
        if token_mask.dtype.is_floating_point or token_mask.dtype.is_complex:
            raise ValueError(f"token_mask must be a bool (or integer 0/1) tensor, got dtype {token_mask.dtype}")
        if tuple(token_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"token_mask must have shape {tuple(x.shape[:-1])} (x's without hidden_size), "
                             f"got {tuple(token_mask.shape)}")
        if token_mask.device != x.device:
            raise ValueError(f"token_mask must be on x's device ({x.device}), got {token_mask.device}")
        return torch.nonzero(token_mask.reshape(-1) != 0).flatten()

    def forward(self, x: torch.Tensor, *, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y = layer(x) for x [..., H]; token_mask [...] (bool, True = real token) keeps the False tokens out of
        routing, capacity, the aux losses, the per-step counts and last_stats (their output: the shared
        expert's, else 0)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [..., hidden_size={self.hidden_size}], got {tuple(x.shape)}")
        device_type = x.device.type
        autocast = x.dtype.is_floating_point and torch.is_autocast_enabled(device_type)
        if autocast:
            dtype = torch.get_autocast_dtype(device_type)
        elif x.dtype != self.w1.dtype:
            raise ValueError(f"x must have the dtype of the expert weights ({self.w1.dtype}), got {x.dtype}")
        else:
            dtype = x.dtype
        if self.aux_loss_type == "sequence" and x.dim() != 3:
            raise ValueError("aux_loss_type='sequence' needs x of shape [B, S, hidden_size] (the sequence-wise "
                             f"loss is per sequence), got {tuple(x.shape)}")
        index = self._token_index(x, token_mask)
        recompute = _in_recompute()
        bookkeeping = not recompute and not torch.compiler.is_compiling()
        if bookkeeping:
            self._check_aux_used()
        lead = x.shape[:-1]
        with torch.autocast(device_type, enabled=False):
            # Under autocast the experts run in its dtype, cast once per forward from the (fp32) master
            # weights; the router keeps router_dtype. Nothing inside is autocast again.
            x_in = x.reshape(-1, self.hidden_size)  # [T,H] in x's dtype: what the router sees
            x2 = x_in.to(dtype)  # [T,H] what the experts see
            if (self.hidden_size > 1 and x2.stride(1) != 1) or (x2.shape[0] > 1 and x2.stride(0) < self.hidden_size):
                x2 = x2.contiguous()  # strided or expanded x (x.t(), x.expand(...)): the kernels read dense rows
            ws = {name: (None if w is None else w.to(dtype)) for name, w in
                  (("w1", self.w1), ("w2", self.w2), ("shared_w1", self.shared_w1),
                   ("shared_w2", self.shared_w2), ("shared_gate_w", self.shared_gate_w))}
            xr = x2 if index is None else x2.index_select(0, index)  # [T',H] the routed tokens
            router_x = x_in if index is None else x_in.index_select(0, index)
            if self.training and self.router_jitter_noise > 0.0:
                eps = self.router_jitter_noise
                router_x = router_x.float() * torch.empty(xr.shape, dtype=torch.float32, device=xr.device).uniform_(
                    1.0 - eps, 1.0 + eps)
            if self.backend == "reference":
                y, switch, z, stats, scores, experts = self._forward_reference(xr, router_x, ws)
            else:
                y, switch, z, stats, scores, experts = self._forward_smoe(xr, router_x, ws)
            if self.aux_loss_type == "switch" or experts is None:
                balance = switch
            else:
                if self.aux_loss_type == "sequence":
                    S = x.shape[1]
                    ids = torch.arange(x2.shape[0], device=x.device) if index is None else index
                    seq_ids, num_seqs = ids // S, x.shape[0]
                else:
                    seq_ids, num_seqs = None, 0
                balance = self._balance_loss(scores, experts, stats["routed_per_expert"], seq_ids, num_seqs,
                                             switch, bookkeeping)
            if index is not None:
                y = torch.zeros(x2.shape, dtype=y.dtype, device=y.device).index_copy(0, index, y)
            if self.num_shared_experts > 0:
                y = y + self._shared(x2, ws)

        term = self._weighted_aux(balance, z)
        if bookkeeping:
            self.last_aux_loss = balance.detach()
            self.last_z_loss = z.detach()
            self.last_stats = stats
            if self.training:
                self._step_counts.add_(stats["routed_per_expert"].to(torch.int64))
                self._forwards_since_step += 1
                if self._forwards_since_step == _STALE_FORWARDS and (self.bias_balancing or
                                                                      self.aux_loss_type == "global"):
                    warnings.warn(f"smoe.nn.MoE: {_STALE_FORWARDS} training forwards without end_step(); the "
                                  "balancing bias is updated and the global balance counts reset only there "
                                  "(call smoe.nn.end_step(model) once per optimizer step)", stacklevel=2)
            self._aux_loss = None if term is None else (term if self.aux_loss_mode == "loss" else term.detach())
            self._probe_pending, self._probe_grad = False, None
            if term is not None and self.training and self.aux_loss_mode == "loss":
                if term.requires_grad:
                    seen = [False]
                    term.register_hook(lambda g, seen=seen: seen.__setitem__(0, True))
                    self._pending_aux = seen
                elif not torch.is_grad_enabled():
                    self._probe_pending = True
        elif recompute and term is not None and self.aux_loss_mode == "loss" and self._probe_pending:
            # the recompute of a reentrant checkpoint: inject what the loss sent into the probe
            scale, self._probe_pending, self._probe_grad = self._probe_grad, False, None
            if scale is not None and term.requires_grad:
                y = _AttachAux.apply(y, term, self, scale)
            else:
                warnings.warn(
                    "smoe.nn.MoE: a training forward that ran without gradients (reentrant "
                    "torch.utils.checkpoint) is being recomputed, and its aux loss received no gradient: add "
                    "smoe.nn.aux_loss(model) to the loss after the forward and before any scaling.",
                    AuxLossUnusedWarning, stacklevel=2)
        if (term is not None and self.aux_loss_mode == "attach" and torch.is_grad_enabled()
                and term.requires_grad):
            y = _AttachAux.apply(y, term, self)
        return y.reshape(*lead, self.hidden_size)

    def _router_logits(self, router_x: torch.Tensor) -> torch.Tensor:
        # fp32 logits, fp64 for an fp64 router (f64 routing end to end, as the core supports it).
        acc = torch.float64 if self.router_dtype == torch.float64 else torch.float32
        return torch_F.linear(router_x.to(self.router_dtype), self.router.weight.to(self.router_dtype)).to(acc)

    def _shared(self, x2: torch.Tensor, ws: dict) -> torch.Tensor:
        """The shared expert on every token (masked ones included), in x2's dtype."""
        if self.backend == "reference":
            out = expert_ffn(x2, ws["shared_w1"], ws["shared_w2"], self.activation).float()
            if ws["shared_gate_w"] is not None:
                out = torch.sigmoid(x2.float() @ ws["shared_gate_w"].float())[:, None] * out
            return out.to(x2.dtype)
        import smoe.functional as F

        return F.shared_expert(x2, ws["shared_w1"], ws["shared_w2"], ws["shared_gate_w"],
                               activation=self.activation, backend=self.backend)

    def _forward_reference(self, x2, router_x, ws):
        out = moe_layer(
            x2, self.router.weight, ws["w1"], ws["w2"], top_k=self.top_k, activation=self.activation,
            score_func=self.score_func, bias=self.expert_bias, n_groups=self.n_groups,
            topk_groups=self.topk_groups, group_score=self.group_score, renormalize=self.renormalize,
            renorm_eps=self.renorm_eps, routed_scaling=self.routed_scaling, expert_choice=self.expert_choice,
            capacity=self.capacity(x2.shape[0]), drop_policy=self.drop_policy, router_dtype=self.router_dtype,
            router_x=router_x)
        stats = {"tokens_per_expert": out.tokens_per_expert.detach().to(torch.int32),
                 "routed_per_expert": out.routed_per_expert.detach().to(torch.int32),
                 "dropped": out.dropped.detach()}
        return out.y, out.aux_loss, out.z_loss, stats, out.scores, out.experts

    def _routed_experts(self, x2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                        w1: torch.Tensor, w2: torch.Tensor):
        """The routed experts of the top-k path: routing_plan -> expert_mlp -> combine.

        x2 [T,H] (the routed tokens, in the compute dtype), weights [T,K] f32 (differentiable), experts [T,K]
        i32, w1 [E,F1,H] / w2 [E,H,F] in the compute dtype. Returns (y2 [T,H] in x2's dtype,
        tokens_per_expert [E] i32: assignments computed after capacity). The one place an expert-parallel
        subclass replaces (dispatch to the experts' owners, compute, return)."""
        import smoe.functional as F

        backend = self.backend
        plan = F.routing_plan(experts, num_experts=self.num_experts, weights=weights.detach().float(),
                              capacity=self.capacity(x2.shape[0]), drop_policy=self.drop_policy, backend=backend)
        ys = F.expert_mlp(x2, w1, w2, plan, activation=self.activation, backend=backend)  # [R,H]
        return F.combine(ys, weights.to(_acc_dtype(x2.dtype)), plan, backend=backend), plan.counts

    def _forward_smoe(self, x2, router_x, ws):
        import smoe.functional as F

        backend = self.backend
        T, E = x2.shape[0], self.num_experts
        logits = self._router_logits(router_x)  # [T,E] fp32
        experts = scores = None
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
            ys = F.expert_mlp(x2, ws["w1"], ws["w2"], plan, activation=self.activation, backend=backend)  # [R,H]
            y = F.combine(ys, weights.to(_acc_dtype(x2.dtype)), plan, backend=backend)
            routed = computed = counts
            dropped = torch.zeros((), dtype=torch.int64, device=x2.device)
            aux = torch.zeros((), dtype=torch.float32, device=x2.device)
        else:
            weights, experts, scores = F.topk_gating(
                logits, top_k=self.top_k, score_func=self.score_func, bias=self.expert_bias,
                n_groups=self.n_groups, topk_groups=self.topk_groups, group_score=self.group_score,
                renormalize=self.renormalize, renorm_eps=self.renorm_eps, routed_scaling=self.routed_scaling,
                backend=backend)  # [T,K] f32, [T,K] i32, [T,E] f32
            y, computed = self._routed_experts(x2, weights, experts, ws["w1"], ws["w2"])  # [T,H], [E]
            routed = torch.zeros(E, dtype=torch.int32, device=x2.device).scatter_add_(
                0, experts.reshape(-1).long(), torch.ones(experts.numel(), dtype=torch.int32, device=x2.device))
            dropped = (routed.sum(dtype=torch.int64) - computed.sum(dtype=torch.int64))
            aux = F.load_balancing_loss(scores, experts, backend=backend)  # cheap: [T,E]; always reported
        z = F.z_loss(logits, backend=backend)
        stats = {"tokens_per_expert": computed.detach(), "routed_per_expert": routed.detach(),
                 "dropped": dropped.detach()}
        return y.to(x2.dtype), aux, z, stats, scores, experts

    # ------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, block, **kwargs) -> "MoE":
        """Build an MoE with the weights and routing of a Hugging Face sparse MoE block (see smoe.integrations.hf)."""
        from smoe.integrations.hf import from_hf

        return from_hf(block, **kwargs)

    def to_hf(self, config=None, *, kind: Optional[str] = None):
        """A new Hugging Face block holding this layer's weights (the families of docs/hf.md)."""
        from smoe.integrations.hf import to_hf

        return to_hf(self, config=config, kind=kind)

    def copy_to_hf(self, block) -> None:
        """Copy this layer's weights into an existing Hugging Face block of matching shape."""
        from smoe.integrations.hf import copy_to_hf

        copy_to_hf(self, block)



# ---------------------------------------------------------------- model-level helpers
def _layers(model: nn.Module):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, MoE)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of `layer.aux_loss` over every smoe.nn.MoE in `model` (0-d fp32; 0 when there is none).

    The recommended pattern: `loss = task_loss + smoe.nn.aux_loss(model)`, then scale `loss` as the
    trainer does (c * loss, loss / N, GradScaler)."""
    total = None
    for layer in _layers(model):
        term = layer.aux_loss
        total = term if total is None else total + term.to(total.device)
    return torch.zeros(()) if total is None else total


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """aux_loss_mode="attach" only: the gradient backward injects into each layer's weighted aux loss.

    Set it to what the loss that is backpropagated is multiplied by (Megatron-Core's
    MoEAuxLossAutoScaler.set_loss_scale): c for c * loss, 1/N for accumulation over N micro-batches,
    scaler.get_scale() under GradScaler, and their product; before each backward."""
    if isinstance(scale, torch.Tensor):
        scale = float(scale)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    for layer in _layers(model):
        layer.aux_loss_scale = float(scale)


def end_step(model: nn.Module) -> None:
    """`layer.end_step()` for every smoe.nn.MoE in `model`: once per optimizer step (a collective with a
    process group)."""
    for layer in _layers(model):
        layer.end_step()


def end_step_after(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Call end_step(model) after every optimizer.step() (an optimizer post-step hook); returns its handle.
    With GradScaler, a step it skips (inf/nan gradients) does not call optimizer.step, so the step's counts
    carry over to the next one."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    _layers(model)
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: end_step(model))

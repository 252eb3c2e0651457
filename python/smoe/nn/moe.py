"""smoe.nn.MoE: a drop-in sparse mixture-of-experts layer, the composition of three submodules.

    MoE
    ├── w1, w2         the routed experts' weights [E,F1,H], [E,H,F] (parameters of MoE itself)
    ├── experts        RoutedExperts (smoe/nn/experts.py), no parameters: routing_plan -> expert_mlp
    │                  (permute + grouped GEMM + activation + grouped GEMM) -> combine on w1, w2
    ├── shared_expert  SharedExpert (only with num_shared_experts): w1, w2, gate_w; shared_expert
    └── router         Router (smoe/nn/router.py): weight [E,H], expert_bias [E]; logits (torch,
                       fp32) -> topk_gating | expert_choice; the router losses and counts

configured by one frozen MoEArgs (smoe/nn/args.py, every constructor argument, validated there).
The forward is the pipeline of ARCHITECTURE.md section 1, one smoe.functional op per stage;
backend="reference" runs smoe.reference.moe_layer instead: the same layer in readable PyTorch.
The layer itself keeps what is about the training loop, not one forward: the token mask, autocast,
the aux-loss bookkeeping and the per-step state.

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

Parameter names: the state dict holds `w1`, `w2` (the routed experts' weights stay the layer's own
parameters: DDP ignore lists and expert-parallel shards name them), `shared_expert.w1`,
`shared_expert.w2`, `shared_expert.gate_w`, `router.weight`, `router.expert_bias`;
`layer.expert_bias`, `layer.shared_w1` ... still read them (read-only aliases), and a state dict with
the flat keys of the single-module layer (`expert_bias`, `shared_w1`, ...) still loads (a
load_state_dict pre-hook renames them). parameters() keeps its order (w1, w2, shared_w1,
shared_w2, shared_gate_w, router.weight), so optimizer state dicts saved before line up.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

import torch
import torch.nn as nn

from smoe.nn.args import MoEArgs
from smoe.nn.experts import RoutedExperts, SharedExpert
from smoe.nn.router import Router, global_balance_loss, sequence_balance_loss
from smoe.reference.layer import moe_layer

__all__ = ["MoE", "AuxLossUnusedWarning", "aux_loss", "set_aux_loss_scale", "end_step", "end_step_after"]

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
        args = MoEArgs(
            hidden_size,
            ffn_size,
            num_experts,
            top_k,
            activation=activation,
            score_func=score_func,
            renormalize=renormalize,
            renorm_eps=renorm_eps,
            routed_scaling=routed_scaling,
            n_groups=n_groups,
            topk_groups=topk_groups,
            group_score=group_score,
            bias_balancing=bias_balancing,
            bias_update_rate=bias_update_rate,
            expert_choice=expert_choice,
            num_shared_experts=num_shared_experts,
            shared_ffn_size=shared_ffn_size,
            shared_gate=shared_gate,
            capacity_factor=capacity_factor,
            drop_policy=drop_policy,
            aux_loss_coef=aux_loss_coef,
            z_loss_coef=z_loss_coef,
            aux_loss_type=aux_loss_type,
            aux_loss_mode=aux_loss_mode,
            router_jitter_noise=router_jitter_noise,
            process_group=process_group,
            router_dtype=router_dtype,
            dtype=dtype,
            device=device,
            backend=backend,
        )
        self.args = args
        self.aux_loss_scale = 1.0  # aux_loss_mode="attach" only: see smoe.nn.set_aux_loss_scale

        # parameters() lists w1, w2 (own), shared_expert's, router's: the order of the single-module layer
        # (w1, w2, shared_w1, shared_w2, shared_gate_w, router.weight), so optimizer state dicts line up.
        router = Router(args)
        self.experts = RoutedExperts(args)  # no parameters: w1 / w2 are the layer's own (names kept)
        w1_shape, w2_shape = self.experts.weight_shapes()
        factory = {"dtype": dtype, "device": device}
        self.w1 = nn.Parameter(torch.empty(w1_shape, **factory))  # [E,F1,H]
        self.w2 = nn.Parameter(torch.empty(w2_shape, **factory))  # [E,H,F]
        if args.num_shared_experts > 0:
            self.shared_expert = SharedExpert(args)
        else:
            self.shared_expert = None
        self.router = router
        # Assignments per expert routed by the training forwards since the last end_step(): int64, a plain
        # attribute, not a buffer (DDP's broadcast_buffers would copy rank 0's counts over the others').
        self._step_counts = torch.zeros(num_experts, dtype=torch.int64, device=self.router.weight.device)
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_load_flat_keys)

        self.last_aux_loss: Optional[torch.Tensor] = None
        self.last_z_loss: Optional[torch.Tensor] = None
        self.last_stats: dict = {}
        self._aux_loss: Optional[torch.Tensor] = None
        self._pending_aux = None  # [seen flag] of the last training forward's aux loss (mode "loss")
        self._probe_pending = False  # the last training forward ran without grad (reentrant checkpoint)
        self._probe_grad: Optional[torch.Tensor] = None  # what the loss sent into its aux_loss
        self._global_acc: Optional[torch.Tensor] = None  # global balance loss: the step's reduced counts
        self._global_f: Optional[torch.Tensor] = None  # f of the last training forward, for recomputes
        self._forwards_since_step = 0

    @classmethod
    def from_args(cls, args: MoEArgs, **kwargs) -> MoE:
        """The layer of `args` (a MoEArgs); kwargs go to the constructor beside them (a subclass's own)."""
        if not isinstance(args, MoEArgs):
            raise TypeError(f"args must be a smoe.nn.MoEArgs, got {type(args).__name__}")
        fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
        return cls(**fields, **kwargs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every projection (router, then routed,
        then shared experts); the balancing bias and the step's counts are zeroed."""
        self.router.reset_parameters()
        self.experts.init_weights(self.w1, self.w2)
        if self.shared_expert is not None:
            self.shared_expert.reset_parameters()
        self._step_counts.zero_()

    # ------------------------------------------------------------ parameters under their old names
    @property
    def shared_w1(self) -> Optional[nn.Parameter]:
        """shared_expert.w1 [F1s, H], or None without shared experts."""
        return None if self.shared_expert is None else self.shared_expert.w1

    @property
    def shared_w2(self) -> Optional[nn.Parameter]:
        """shared_expert.w2 [H, Fs], or None without shared experts."""
        return None if self.shared_expert is None else self.shared_expert.w2

    @property
    def shared_gate_w(self) -> Optional[nn.Parameter]:
        """shared_expert.gate_w [H], or None (no shared experts, or shared_gate=False)."""
        return None if self.shared_expert is None else self.shared_expert.gate_w

    @property
    def expert_bias(self) -> Optional[torch.Tensor]:
        """router.expert_bias [E] fp32 (bias_balancing), else None."""
        return self.router.expert_bias

    @property
    def shared_ffn_size(self) -> int:
        """Fs, the shared expert's FFN size (0 without shared experts)."""
        return self.args.shared_ffn_size or 0

    @property
    def step_counts(self) -> torch.Tensor:
        """[E] int64: assignments routed to each expert by the training forwards since the last end_step()."""
        return self._step_counts

    def extra_repr(self) -> str:
        parts = [
            f"hidden_size={self.hidden_size}",
            f"ffn_size={self.ffn_size}",
            f"num_experts={self.num_experts}",
            f"top_k={self.top_k}",
            f"activation={self.activation!r}",
            f"score_func={self.score_func!r}",
        ]
        if self.expert_choice:
            parts.append("expert_choice=True")
        if self.num_shared_experts:
            parts.append(f"shared_ffn_size={self.shared_ffn_size}")
        parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Capacity C per expert for T = num_tokens, or None when dropless."""
        return self.args.capacity(num_tokens)

    # ------------------------------------------------------------ dtype moves
    def _apply(self, fn, recurse=True):
        """Module.to()/.half()/.double() move the expert weights; the router keeps its dtypes (Router._apply)
        and step_counts follows the router's device."""
        super()._apply(fn, recurse)
        new = self.router.weight
        if self._step_counts.is_meta or new.is_meta:  # to_empty() after a meta-device build: nothing to copy
            self._step_counts = torch.zeros_like(self._step_counts, device=new.device)
        else:
            self._step_counts = self._step_counts.to(new.device)
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
                AuxLossUnusedWarning,
                stacklevel=5,
            )  # the caller of layer(x)

    def _weighted_aux(self, balance: torch.Tensor, z: torch.Tensor) -> Optional[torch.Tensor]:
        term = None
        if self.aux_loss_coef > 0.0:
            term = self.aux_loss_coef * balance
        if self.z_loss_coef > 0.0:
            term = self.z_loss_coef * z if term is None else term + self.z_loss_coef * z
        return term

    def _balance_loss(
        self,
        scores: torch.Tensor,
        experts: torch.Tensor,
        routed: torch.Tensor,
        seq_ids: Optional[torch.Tensor],
        num_seqs: int,
        switch: torch.Tensor,
        bookkeeping: bool,
    ) -> torch.Tensor:
        """The balance loss of aux_loss_type from scores [T,E] f32, experts [T,K], routed [E] (counts)."""
        if self.aux_loss_type == "switch":
            return switch
        if self.aux_loss_type == "global":
            # N_e summed over the process group and over the step's training forwards so far (see
            # router.global_balance_loss). One forward on one rank: the switch loss.
            if not self.training:
                counts = routed.to(torch.float32)
            elif bookkeeping:
                reduced = self._reduce_counts(routed.to(torch.int64).clone())
                self._global_acc = reduced if self._global_acc is None else self._global_acc + reduced
                counts = self._global_acc.to(torch.float32)
                self._global_f = counts
            else:  # checkpoint recompute: the counts the forward it replays used
                counts = self._global_f if self._global_f is not None else routed.to(torch.float32)
            return global_balance_loss(scores, counts, self.top_k)
        return sequence_balance_loss(scores, experts, seq_ids, num_seqs)

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
            self.router.update_bias(self._reduce_counts(self._step_counts.clone()))
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
            raise TypeError(
                f"token_mask must be a torch.Tensor of shape {tuple(x.shape[:-1])} or None, "
                f"got {type(token_mask).__name__}"
            )
        if token_mask.dtype.is_floating_point or token_mask.dtype.is_complex:
            raise ValueError(f"token_mask must be a bool (or integer 0/1) tensor, got dtype {token_mask.dtype}")
        if tuple(token_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"token_mask must have shape {tuple(x.shape[:-1])} (x's without hidden_size), "
                f"got {tuple(token_mask.shape)}"
            )
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
            raise ValueError(
                "aux_loss_type='sequence' needs x of shape [B, S, hidden_size] (the sequence-wise "
                f"loss is per sequence), got {tuple(x.shape)}"
            )
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
            ws = {
                "w1": self.w1.to(dtype),
                "w2": self.w2.to(dtype),
            }  # the routed experts' (the shared expert casts its own)
            xr = x2 if index is None else x2.index_select(0, index)  # [T',H] the routed tokens
            router_x = x_in if index is None else x_in.index_select(0, index)
            if self.backend == "reference":
                y, switch, z, stats, scores, experts = self._forward_reference(xr, self.router.jitter(router_x), ws)
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
                balance = self._balance_loss(
                    scores, experts, stats["routed_per_expert"], seq_ids, num_seqs, switch, bookkeeping
                )
            if index is not None:
                y = torch.zeros(x2.shape, dtype=y.dtype, device=y.device).index_copy(0, index, y)
            if self.num_shared_experts > 0:
                y = y + self.shared_expert(x2)

        term = self._weighted_aux(balance, z)
        if bookkeeping:
            self.last_aux_loss = balance.detach()
            self.last_z_loss = z.detach()
            self.last_stats = stats
            if self.training:
                self._step_counts.add_(stats["routed_per_expert"].to(torch.int64))
                self._forwards_since_step += 1
                if self._forwards_since_step == _STALE_FORWARDS and (
                    self.bias_balancing or self.aux_loss_type == "global"
                ):
                    warnings.warn(
                        f"smoe.nn.MoE: {_STALE_FORWARDS} training forwards without end_step(); the "
                        "balancing bias is updated and the global balance counts reset only there "
                        "(call smoe.nn.end_step(model) once per optimizer step)",
                        stacklevel=2,
                    )
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
                    AuxLossUnusedWarning,
                    stacklevel=2,
                )
        if term is not None and self.aux_loss_mode == "attach" and torch.is_grad_enabled() and term.requires_grad:
            y = _AttachAux.apply(y, term, self)
        return y.reshape(*lead, self.hidden_size)

    def _forward_reference(self, x2, router_x, ws):
        out = moe_layer(
            x2,
            self.router.weight,
            ws["w1"],
            ws["w2"],
            top_k=self.top_k,
            activation=self.activation,
            score_func=self.score_func,
            bias=self.expert_bias,
            n_groups=self.n_groups,
            topk_groups=self.topk_groups,
            group_score=self.group_score,
            renormalize=self.renormalize,
            renorm_eps=self.renorm_eps,
            routed_scaling=self.routed_scaling,
            expert_choice=self.expert_choice,
            capacity=self.capacity(x2.shape[0]),
            drop_policy=self.drop_policy,
            router_dtype=self.router_dtype,
            router_x=router_x,
        )
        stats = {
            "tokens_per_expert": out.tokens_per_expert.detach().to(torch.int32),
            "routed_per_expert": out.routed_per_expert.detach().to(torch.int32),
            "dropped": out.dropped.detach(),
        }
        return out.y, out.aux_loss, out.z_loss, stats, out.scores, out.experts

    def _routed_experts(
        self, x2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
    ):
        """The routed experts of the top-k path: routing_plan -> expert_mlp -> combine (self.experts).

        x2 [T,H] (the routed tokens, in the compute dtype), weights [T,K] f32 (differentiable), experts [T,K]
        i32, w1 [E,F1,H] / w2 [E,H,F] in the compute dtype. Returns (y2 [T,H] in x2's dtype,
        tokens_per_expert [E] i32: assignments computed after capacity). The one place an expert-parallel
        subclass replaces (dispatch to the experts' owners, compute, return)."""
        plan = self.experts.plan(experts, weights)
        return self.experts(x2, weights, plan, w1, w2), plan.counts

    def _forward_smoe(self, x2, router_x, ws):
        """router -> experts on the smoe ops: (y [T,H], switch balance loss, z-loss, stats, scores [T,E],
        experts [T,K] or None for expert choice)."""
        routing = self.router(router_x)  # jittered in training
        if routing.plan is not None:  # expert choice: the router's choice is the row layout
            y = self.experts(x2, routing.weights, routing.plan, ws["w1"], ws["w2"])
            computed = routing.plan.counts
            dropped = torch.zeros((), dtype=torch.int64, device=x2.device)
        else:
            y, computed = self._routed_experts(x2, routing.weights, routing.experts, ws["w1"], ws["w2"])
        routed = self.router.routed_counts(routing)
        if routing.plan is None:
            dropped = routed.sum(dtype=torch.int64) - computed.sum(dtype=torch.int64)
        aux = self.router.load_balancing_loss(routing)  # cheap: [T,E]; always reported
        z = self.router.z_loss(routing)
        stats = {
            "tokens_per_expert": computed.detach(),
            "routed_per_expert": routed.detach(),
            "dropped": dropped.detach(),
        }
        return y.to(x2.dtype), aux, z, stats, routing.scores, routing.experts

    # ------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, block, **kwargs) -> MoE:
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


# The configuration, read-only: MoE.args (a frozen MoEArgs) holds it, these names read it.
_CONFIG = (
    "hidden_size",
    "ffn_size",
    "num_experts",
    "top_k",
    "activation",
    "score_func",
    "renormalize",
    "renorm_eps",
    "routed_scaling",
    "n_groups",
    "topk_groups",
    "group_score",
    "bias_balancing",
    "bias_update_rate",
    "expert_choice",
    "num_shared_experts",
    "capacity_factor",
    "drop_policy",
    "aux_loss_coef",
    "z_loss_coef",
    "aux_loss_type",
    "aux_loss_mode",
    "router_jitter_noise",
    "process_group",
    "router_dtype",
    "backend",
)
for _name in _CONFIG:
    setattr(MoE, _name, property(lambda self, _n=_name: getattr(self.args, _n), doc=f"args.{_name} (read-only)"))
del _name

# State-dict keys of the single-module layer (before the router / experts / shared_expert split) -> now.
_FLAT_KEYS = {
    "shared_w1": "shared_expert.w1",
    "shared_w2": "shared_expert.w2",
    "shared_gate_w": "shared_expert.gate_w",
    "expert_bias": "router.expert_bias",
}


def _load_flat_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook: a checkpoint written before the split keeps loading (flat keys renamed).
    A flat key the layer has no tensor for stays as it is, so strict loading names it as the checkpoint does."""
    for old, new in _FLAT_KEYS.items():
        owner, _, attr = new.partition(".")
        sub = getattr(module, owner)
        if sub is None or getattr(sub, attr) is None:
            continue  # no such tensor here: strict loading reports the flat key as unexpected
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


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

"""smoe.nn.MoEArgs: every constructor argument of smoe.nn.MoE, validated in one place.

`MoE(hidden_size, ffn_size, num_experts, top_k, **kwargs)` builds `MoEArgs(hidden_size, ffn_size,
num_experts, top_k, **kwargs)` and hands it to its submodules (router, experts, shared expert); the
args are frozen, so the layer's configuration is what it was built with. `MoE.from_args(args)` builds
a layer from args directly, and `dataclasses.replace(layer.args, ...)` a variant (validated again).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch

from smoe.reference.layer import capacity_for

__all__ = [
    "MoEArgs",
    "ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "SCORE_FUNCS",
    "GROUP_SCORES",
    "DROP_POLICIES",
    "BACKENDS",
    "AUX_LOSS_MODES",
    "AUX_LOSS_TYPES",
]

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
DROP_POLICIES = ("token_order", "score")
BACKENDS = ("auto", "cpu", "cuda", "simt", "reference")
AUX_LOSS_MODES = ("loss", "attach")
AUX_LOSS_TYPES = ("switch", "global", "sequence")
ROUTER_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


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


@dataclasses.dataclass(frozen=True)
class MoEArgs:
    """The configuration of smoe.nn.MoE (its docstring describes each argument).

    Two arguments are resolved at construction: `renormalize=None` becomes `top_k > 1`, and
    `shared_ffn_size=None` with shared experts becomes `num_shared_experts * ffn_size`. Every other
    field is kept as given. Bad values raise ValueError naming the argument and what was expected."""

    hidden_size: int
    ffn_size: int
    num_experts: int
    top_k: int
    activation: str = "swiglu"
    score_func: str = "softmax"
    renormalize: Optional[bool] = None
    renorm_eps: float = 0.0
    routed_scaling: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    expert_choice: bool = False
    num_shared_experts: int = 0
    shared_ffn_size: Optional[int] = None
    shared_gate: bool = False
    capacity_factor: Optional[float] = None
    drop_policy: str = "token_order"
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    aux_loss_type: str = "switch"
    aux_loss_mode: str = "loss"
    router_jitter_noise: float = 0.0
    process_group: Any = None
    router_dtype: torch.dtype = torch.float32
    dtype: Optional[torch.dtype] = None
    device: Any = None
    backend: str = "auto"

    def __post_init__(self):
        hidden_size, num_experts, top_k = self.hidden_size, self.num_experts, self.top_k
        _check_int("hidden_size", hidden_size, 1)
        _check_int("ffn_size", self.ffn_size, 1)
        _check_int("num_experts", num_experts, 1)
        _check_int("top_k", top_k, 1)
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("score_func", self.score_func, SCORE_FUNCS)
        _check_choice("group_score", self.group_score, GROUP_SCORES)
        _check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("aux_loss_type", self.aux_loss_type, AUX_LOSS_TYPES)
        _check_choice("aux_loss_mode", self.aux_loss_mode, AUX_LOSS_MODES)
        n_groups, topk_groups = self.n_groups, self.topk_groups
        _check_int("n_groups", n_groups, 1)
        _check_int("topk_groups", topk_groups, 1)
        if num_experts % n_groups != 0:
            raise ValueError(f"n_groups must divide num_experts ({num_experts}), got {n_groups}")
        if topk_groups > n_groups:
            raise ValueError(f"topk_groups must be <= n_groups ({n_groups}), got {topk_groups}")
        per_group = num_experts // n_groups
        if n_groups > 1 and top_k > topk_groups * per_group:
            raise ValueError(
                f"top_k must be <= topk_groups * experts per group ({topk_groups * per_group}), got {top_k}"
            )
        renormalize = self.renormalize
        if renormalize is None:
            renormalize = top_k > 1
        if not isinstance(renormalize, bool):
            raise ValueError(f"renormalize must be a bool or None, got {renormalize!r}")
        if not isinstance(self.bias_balancing, bool):
            raise ValueError(f"bias_balancing must be a bool, got {self.bias_balancing!r}")
        if not (self.renorm_eps >= 0.0):
            raise ValueError(f"renorm_eps must be >= 0, got {self.renorm_eps!r}")
        if not (self.routed_scaling > 0.0 and math.isfinite(self.routed_scaling)):
            raise ValueError(f"routed_scaling must be a finite number > 0, got {self.routed_scaling!r}")
        if not (self.bias_update_rate >= 0.0 and math.isfinite(self.bias_update_rate)):
            raise ValueError(f"bias_update_rate must be a finite number >= 0, got {self.bias_update_rate!r}")
        capacity_factor = self.capacity_factor
        if capacity_factor is not None and not (capacity_factor > 0.0 and math.isfinite(capacity_factor)):
            raise ValueError(f"capacity_factor must be None (dropless) or a finite number > 0, got {capacity_factor!r}")
        # C = ceil(capacity_factor * T * K / E) rows per expert must fit the core's int32 rows even for T = 1.
        max_factor = (2**31 - 1) * num_experts / top_k
        if capacity_factor is not None and capacity_factor > max_factor:
            raise ValueError(
                f"capacity_factor must be <= {max_factor:g} (C = ceil(capacity_factor*T*K/E) rows per "
                f"expert must fit in int32; None is dropless), got {capacity_factor!r}"
            )
        for name, coef in (("aux_loss_coef", self.aux_loss_coef), ("z_loss_coef", self.z_loss_coef)):
            if (
                isinstance(coef, bool)
                or not isinstance(coef, (int, float))
                or not (coef >= 0.0 and math.isfinite(coef))
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {coef!r}")
        jitter = self.router_jitter_noise
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not (0.0 <= jitter < 1.0):
            raise ValueError(f"router_jitter_noise must be a number in [0, 1), got {jitter!r}")
        _check_process_group(self.process_group)
        num_shared = self.num_shared_experts
        _check_int("num_shared_experts", num_shared, 0)
        if self.shared_ffn_size is not None:
            _check_int("shared_ffn_size", self.shared_ffn_size, 1)
            if num_shared == 0:
                raise ValueError("shared_ffn_size needs num_shared_experts >= 1, got num_shared_experts=0")
        if self.shared_gate and num_shared == 0:
            raise ValueError("shared_gate=True needs num_shared_experts >= 1, got num_shared_experts=0")
        if self.expert_choice:
            if n_groups > 1 or self.bias_balancing:
                raise ValueError(
                    "expert_choice=True supports neither n_groups > 1 nor bias_balancing "
                    f"(got n_groups={n_groups}, bias_balancing={self.bias_balancing})"
                )
            if self.aux_loss_coef > 0.0:
                raise ValueError(
                    "aux_loss_coef must be 0 with expert_choice=True (expert choice is "
                    f"balanced by construction), got {self.aux_loss_coef}"
                )
            if self.aux_loss_type != "switch":
                raise ValueError(
                    "aux_loss_type must be 'switch' with expert_choice=True (no balance loss), "
                    f"got {self.aux_loss_type!r}"
                )
        if self.router_dtype not in ROUTER_DTYPES:
            raise ValueError(f"router_dtype must be a floating dtype, got {self.router_dtype!r}")

        # Resolved and normalised values (frozen: set through object.__setattr__).
        resolved = dict(
            renormalize=renormalize,
            renorm_eps=float(self.renorm_eps),
            routed_scaling=float(self.routed_scaling),
            bias_update_rate=float(self.bias_update_rate),
            aux_loss_coef=float(self.aux_loss_coef),
            z_loss_coef=float(self.z_loss_coef),
            router_jitter_noise=float(jitter),
            shared_gate=bool(self.shared_gate),
        )
        if num_shared > 0 and self.shared_ffn_size is None:
            resolved["shared_ffn_size"] = num_shared * self.ffn_size
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def gated(self) -> bool:
        """The activation is gated (swiglu, geglu): w1 holds [gate | up] rows."""
        return self.activation in GATED_ACTIVATIONS

    @property
    def ffn_rows(self) -> int:
        """F1, the rows of one expert's w1: 2F for gated activations, else F."""
        return 2 * self.ffn_size if self.gated else self.ffn_size

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Capacity C per expert for T = num_tokens, or None when dropless (token choice without
        capacity_factor). Expert choice: C = min(ceil(capacity_factor * T * K / E), T), factor 1 by default."""
        if self.expert_choice:
            cf = 1.0 if self.capacity_factor is None else self.capacity_factor
            return min(capacity_for(cf, num_tokens, self.top_k, self.num_experts), num_tokens)
        if self.capacity_factor is None:
            return None
        return capacity_for(self.capacity_factor, num_tokens, self.top_k, self.num_experts)

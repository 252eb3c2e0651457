"""smoe as a transformers 5.x experts backend (the "smoe" entry of transformers' ExpertsInterface).

transformers 5.x models whose experts class carries `@use_experts_implementation` call
`ALL_EXPERTS_FUNCTIONS[config._experts_implementation](experts, hidden_states, top_k_index,
top_k_weights)`; the model's own router has already chosen top_k_index [T, K] and top_k_weights [T, K].
`experts_forward` computes that call with smoe's ops:

  routing_plan(top_k_index) -> expert_mlp (permute, grouped GEMM, activation, grouped GEMM) -> combine

when the experts are plain (gate_up_proj [E, 2F, H] as [gate | up], down_proj [E, H, F], no biases,
transformers' default gate, an activation smoe has: SiLU -> swiglu, exact GELU -> geglu; gelu / relu
for ungated experts). Any other variant the decorator describes runs on smoe's permute, grouped_gemm
and combine with the model's own pieces in between:

  permute -> grouped_gemm(gate_up_proj | up_proj, transposed or not) [+ gate_up_proj_bias of the row's
  expert] -> the experts' _apply_gate (e.g. GPT-OSS's interleaved, clamped SwiGLU) or act_fn ->
  grouped_gemm(down_proj) [+ down_proj_bias] [-> post_expert_norm] -> combine.

Expert-parallel sentinels: an index outside [0, E) (transformers' EP uses num_local_experts; -1 is
accepted too) skips that pick: it gets no row in the plan, adds nothing to the output and receives no
gradient. Anything else (a missing or misshaped weight, an integer/quantised weight) raises.

The backend (smoe's "auto", "cpu", "simt", "reference", "cuda") is chosen by register(backend=...);
an experts module (or its config) with an attribute `smoe_backend` overrides it.
"""

from __future__ import annotations

import torch

import smoe.functional as SF

_STATE = {"backend": "auto"}


def _backend_of(experts) -> str:
    b = getattr(experts, "smoe_backend", None)
    if b is None:
        b = getattr(getattr(experts, "config", None), "smoe_backend", None)
    return b or _STATE["backend"]


def _param(experts, name: str, ndim: int):
    p = getattr(experts, name, None)
    if p is None:
        raise ValueError(
            f"smoe experts backend: {type(experts).__name__}.{name} is missing "
            f"(the experts class declares it through use_experts_implementation)"
        )
    if not isinstance(p, torch.Tensor) or p.dim() != ndim or not p.is_floating_point():
        desc = f"{p.dim()}-d {p.dtype}" if isinstance(p, torch.Tensor) else type(p).__name__
        raise ValueError(
            f"smoe experts backend: {type(experts).__name__}.{name} must be a {ndim}-d floating "
            f"tensor, got {desc} (quantised experts are not supported)"
        )
    return p


def _sizes(experts):
    """(E, H, N1, F, w1, w2, b1, b2) with N1 = the up projection's output size (2F gated)."""
    has_gate = getattr(experts, "has_gate", True)
    transposed = getattr(experts, "is_transposed", False)
    w1 = _param(experts, "gate_up_proj" if has_gate else "up_proj", 3)
    w2 = _param(experts, "down_proj", 3)
    E = w1.shape[0]
    if transposed:  # w1 [E, H, N1], w2 [E, F, H]
        H, N1 = w1.shape[1], w1.shape[2]
        F, H2 = w2.shape[1], w2.shape[2]
    else:  # w1 [E, N1, H], w2 [E, H, F]
        N1, H = w1.shape[1], w1.shape[2]
        H2, F = w2.shape[1], w2.shape[2]
    name1 = "gate_up_proj" if has_gate else "up_proj"
    if w2.shape[0] != E or H2 != H or N1 != (2 * F if has_gate else F):
        layout = "[E, H, N] (transposed)" if transposed else "[E, N, H]"
        raise ValueError(
            f"smoe experts backend: {type(experts).__name__}.down_proj has shape {tuple(w2.shape)}, "
            f"which does not fit {name1} {tuple(w1.shape)} (layout {layout}, "
            f"{'N = 2F' if has_gate else 'N = F'})"
        )
    b1 = b2 = None
    if getattr(experts, "has_bias", False):
        b1 = _param(experts, name1 + "_bias", 2)
        b2 = _param(experts, "down_proj_bias", 2)
        if tuple(b1.shape) != (E, N1):
            raise ValueError(f"smoe experts backend: {name1}_bias must be [{E}, {N1}], got {tuple(b1.shape)}")
        if tuple(b2.shape) != (E, H):
            raise ValueError(f"smoe experts backend: down_proj_bias must be [{E}, {H}], got {tuple(b2.shape)}")
    return E, H, w1, w2, b1, b2, has_gate, transposed


def _fused_activation(experts, has_gate: bool):
    """smoe's name for the experts' gate + activation when expert_mlp computes it exactly, else None."""
    from transformers.integrations.moe import _default_apply_gate

    if has_gate and getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        return None
    act = getattr(experts, "act_fn", None)
    name = type(act).__name__
    exact_gelu = name == "GELUActivation" or (isinstance(act, torch.nn.GELU) and act.approximate == "none")
    if name in ("SiLU", "SiLUActivation"):
        return "swiglu" if has_gate else None
    if exact_gelu:
        return "geglu" if has_gate else "gelu"
    if isinstance(act, torch.nn.ReLU) and not has_gate:
        return "relu"
    return None


def _plan(top_k_index: torch.Tensor, E: int, backend: str):
    """A routing plan over E experts in which indices outside [0, E) (EP sentinels) are dropped.

    The sentinels are planned as an extra expert E, whose rows lie past offsets[E]; cutting that expert
    off leaves a valid E-expert plan with row_of = -1 at the sentinels."""
    idx = top_k_index.to(torch.int32)
    sentinel = (idx < 0) | (idx >= E)
    idx = torch.where(sentinel, torch.full_like(idx, E), idx)
    counts, offsets, row_of, token_of_row = SF.routing_plan(idx, num_experts=E + 1, backend=backend)
    offsets = offsets[: E + 1]
    row_of = torch.where(sentinel, torch.full_like(row_of, -1), row_of)
    rows = torch.arange(token_of_row.shape[0], device=token_of_row.device)
    token_of_row = torch.where(rows >= offsets[E], torch.full_like(token_of_row, -1), token_of_row)
    return SF.RoutingPlan(counts[:E].contiguous(), offsets.contiguous(), row_of.contiguous(), token_of_row.contiguous())


def _row_bias(bias: torch.Tensor, plan, rows: int) -> torch.Tensor:
    """bias[expert of row r] for every row r of the plan (rows past offsets[E] get the last expert's)."""
    E = bias.shape[0]
    r = torch.arange(rows, device=bias.device)
    e = torch.searchsorted(plan.offsets[1:], r, right=True).clamp_(max=E - 1)
    return bias[e]


def experts_forward(
    experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts' output [T, H] for hidden_states [T, H] and the model's routing, computed by smoe."""
    name = type(experts).__name__
    if (
        hidden_states.dim() != 2
        or top_k_index.dim() != 2
        or top_k_index.shape != top_k_weights.shape
        or top_k_index.shape[0] != hidden_states.shape[0]
    ):
        raise ValueError(
            f"smoe experts backend ({name}): expected hidden_states [T, H], top_k_index [T, K] and "
            f"top_k_weights [T, K], got {tuple(hidden_states.shape)}, {tuple(top_k_index.shape)}, "
            f"{tuple(top_k_weights.shape)}"
        )
    E, H, w1, w2, b1, b2, has_gate, transposed = _sizes(experts)
    if hidden_states.shape[1] != H:
        raise ValueError(
            f"smoe experts backend ({name}): hidden_states has {hidden_states.shape[1]} features, "
            f"the experts' weights {H}"
        )
    backend = _backend_of(experts)
    x = hidden_states.to(w1.dtype)
    plan = _plan(top_k_index, E, backend)
    weights = top_k_weights.float()
    fused = (
        None
        if (transposed or b1 is not None or getattr(experts, "has_post_expert_norm", False))
        else _fused_activation(experts, has_gate)
    )
    if fused is not None:
        ys = SF.expert_mlp(x, w1, w2, plan, activation=fused, backend=backend)
    else:
        xs = SF.permute(x, plan, backend=backend)
        h = SF.grouped_gemm(xs, w1, plan.offsets, trans_b=not transposed, backend=backend)
        if b1 is not None:
            h = h + _row_bias(b1, plan, h.shape[0])
        h = experts._apply_gate(h) if has_gate else experts.act_fn(h)
        ys = SF.grouped_gemm(h.contiguous(), w2, plan.offsets, trans_b=not transposed, backend=backend)
        if b2 is not None:
            ys = ys + _row_bias(b2, plan, ys.shape[0])
        if getattr(experts, "has_post_expert_norm", False):
            ys = experts.post_expert_norm(ys)
        ys = ys.contiguous()
    return SF.combine(ys, weights, plan, backend=backend).to(hidden_states.dtype)


def register(backend: str = "auto") -> None:
    """Add "smoe" to transformers' ExpertsInterface (transformers >= 5); backend: smoe's backend for it."""
    from smoe._core import check_backend

    check_backend("integrations.hf.register", backend)
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as e:  # transformers 4.x has no experts interface
        raise RuntimeError(
            "smoe.integrations.hf.register needs transformers >= 5 (transformers.integrations.moe."
            "ExpertsInterface); with 4.x use replace_moe_blocks"
        ) from e
    _STATE["backend"] = backend
    ExpertsInterface.register("smoe", experts_forward)


def unregister() -> None:
    """Remove "smoe" from transformers' ExpertsInterface (models set to it then raise KeyError)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface._global_mapping.pop("smoe", None)

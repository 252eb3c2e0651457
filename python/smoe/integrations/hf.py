"""Hugging Face transformers integration: move weights between HF sparse MoE blocks and smoe.nn.MoE.

Supported blocks, in both transformers layouts:
  - MixtralSparseMoeBlock   softmax top-k, always renormalised (no config switch), SwiGLU experts
  - Qwen2MoeSparseMoeBlock  softmax top-k, renormalised iff config.norm_topk_prob, plus one shared
                            expert scaled by sigmoid(x @ shared_expert_gate.weight^T)
  - Qwen3MoeSparseMoeBlock  softmax top-k, renormalised iff config.norm_topk_prob
Layouts:
  - transformers 4.x: experts is an nn.ModuleList of per-expert MLPs, with nn.Linear w1/w3 (gate/up)
    and w2 (down) for Mixtral, gate_proj/up_proj/down_proj for Qwen; the router is nn.Linear `gate`;
    the block returns (y, router_logits).
  - transformers 5.x: experts hold fused parameters gate_up_proj [E, 2F, H] (rows [gate | up]) and
    down_proj [E, H, F]; the router `gate` is a TopKRouter module with a `weight` [E, H] parameter
    (and top_k / norm_topk_prob attributes on the router for Qwen); the block returns y only.
smoe's w1 [E, 2F, H] is [gate | up] and w2 is [E, H, F], i.e. exactly the 5.x layout.

In both layouts HF computes the router logits in the block's dtype (F.linear on the hidden states)
and the softmax in fp32; from_hf therefore sets router_dtype to the router weight's dtype, so that
a bf16 block routes the same way in smoe.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from smoe.nn.moe import MoE

__all__ = ["from_hf", "to_hf", "copy_to_hf", "block_kind", "SmoeHFBlock", "replace_moe_blocks", "register", "unregister"]

_KINDS = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
}


def block_kind(block: nn.Module) -> str:
    """'mixtral' | 'qwen2_moe' | 'qwen3_moe' for a supported HF block; ValueError otherwise."""
    for cls in type(block).__mro__:
        if cls.__name__ in _KINDS:
            return _KINDS[cls.__name__]
    raise ValueError(f"block must be one of {', '.join(sorted(_KINDS))}, got {type(block).__name__}")


def _is_fused(block: nn.Module) -> bool:
    return hasattr(block.experts, "gate_up_proj")


def _gated_activation(act_fn: nn.Module) -> str:
    name = type(act_fn).__name__
    if name in ("SiLU", "SiLUActivation"):
        return "swiglu"
    if name == "GELUActivation" or (isinstance(act_fn, nn.GELU) and act_fn.approximate == "none"):
        return "geglu"
    raise ValueError(f"the experts' activation must be SiLU (swiglu) or exact GELU (geglu), got {name}")


def _expert_projections(expert: nn.Module):
    """(gate, up, down) nn.Linear of one 4.x expert MLP."""
    if hasattr(expert, "w1"):  # Mixtral: w1 gate, w3 up, w2 down
        return expert.w1, expert.w3, expert.w2
    return expert.gate_proj, expert.up_proj, expert.down_proj


def _routing(block: nn.Module, kind: str):
    """(top_k, renormalize) of a block, read where each transformers version keeps them."""
    top_k = getattr(block, "top_k", None)
    if top_k is None:
        top_k = block.gate.top_k
    if kind == "mixtral":
        renormalize = True
    else:
        renormalize = getattr(block, "norm_topk_prob", None)
        if renormalize is None:
            renormalize = block.gate.norm_topk_prob
    return int(top_k), bool(renormalize)


def _hf_weights(block: nn.Module):
    """router [E,H], w1 [E,2F,H] ([gate|up]), w2 [E,H,F], act_fn of a supported block (both layouts)."""
    router = block.gate.weight
    if _is_fused(block):
        return router, block.experts.gate_up_proj, block.experts.down_proj, block.experts.act_fn
    w1 = torch.stack([torch.cat([g.weight, u.weight], dim=0)
                      for g, u, _ in map(_expert_projections, block.experts)])
    w2 = torch.stack([_expert_projections(ex)[2].weight for ex in block.experts])
    return router, w1, w2, block.experts[0].act_fn


def from_hf(block: nn.Module, *, backend: str = "auto", **overrides) -> MoE:
    """A new smoe.nn.MoE computing what `block` computes, with copies of its weights.

    overrides: extra MoE keyword arguments (e.g. aux_loss_coef); routing-defining ones taken from the
    block (top_k, renormalize, activation, shared expert sizes) cannot be overridden.
    """
    kind = block_kind(block)
    top_k, renormalize = _routing(block, kind)
    if kind == "mixtral" and getattr(block, "jitter_noise", 0.0):
        warnings.warn("MixtralSparseMoeBlock.jitter_noise > 0 is not reproduced by smoe.nn.MoE "
                      "(it only perturbs inputs in training)", stacklevel=2)
    router, w1, w2, act_fn = _hf_weights(block)
    E, H = router.shape
    F = w2.shape[-1]
    if w1.shape != (E, 2 * F, H) or w2.shape != (E, H, F):
        raise ValueError(f"expert weights must be gate_up [E={E}, 2F={2 * F}, H={H}] and down [E, H, F]; "
                         f"got {tuple(w1.shape)} and {tuple(w2.shape)}")
    kwargs = dict(activation=_gated_activation(act_fn), score_func="softmax", renormalize=renormalize,
                  router_dtype=router.dtype, dtype=w1.dtype, device=w1.device, backend=backend)
    if kind == "qwen2_moe":
        shared = block.shared_expert
        kwargs.update(num_shared_experts=1, shared_ffn_size=shared.down_proj.weight.shape[1], shared_gate=True)
    defined = set(kwargs) | {"hidden_size", "ffn_size", "num_experts", "top_k"}
    for key in overrides:
        if key in defined and key not in ("device", "dtype"):
            raise ValueError(f"{key} is defined by the Hugging Face block and cannot be overridden")
    kwargs.update(overrides)
    moe = MoE(H, F, E, top_k, **kwargs)
    with torch.no_grad():
        moe.router.weight.copy_(router)
        moe.w1.copy_(w1)
        moe.w2.copy_(w2)
        if kind == "qwen2_moe":
            shared = block.shared_expert
            moe.shared_w1.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight], dim=0))
            moe.shared_w2.copy_(shared.down_proj.weight)
            moe.shared_gate_w.copy_(block.shared_expert_gate.weight.reshape(-1))
    return moe


def _check_convertible(moe: MoE, kind: str) -> None:
    problems = []
    if moe.score_func != "softmax":
        problems.append(f"score_func={moe.score_func!r} (HF: 'softmax')")
    if moe.activation not in ("swiglu", "geglu"):
        problems.append(f"activation={moe.activation!r} (HF: 'swiglu' or 'geglu')")
    if moe.n_groups != 1 or moe.expert_bias is not None or moe.expert_choice:
        problems.append("group-limited, bias-balanced or expert-choice routing")
    if moe.capacity_factor is not None:
        problems.append("a capacity (HF blocks are dropless)")
    if moe.routed_scaling != 1.0 or moe.renorm_eps != 0.0:
        problems.append("routed_scaling != 1 or renorm_eps != 0")
    if kind == "mixtral" and not moe.renormalize:
        problems.append("renormalize=False (Mixtral always renormalises; use kind='qwen3_moe')")
    if kind == "qwen2_moe" and (moe.num_shared_experts == 0 or moe.shared_gate_w is None):
        problems.append("no gated shared expert (Qwen2-MoE has one)")
    if kind != "qwen2_moe" and moe.num_shared_experts > 0:
        problems.append(f"a shared expert ({kind} has none; use kind='qwen2_moe')")
    if problems:
        raise ValueError(f"this MoE cannot be expressed as a {kind} block: " + "; ".join(problems))


def copy_to_hf(moe: MoE, block: nn.Module) -> None:
    """Copy moe's weights into an existing HF block of the same sizes (either layout)."""
    kind = block_kind(block)
    _check_convertible(moe, kind)
    router, w1, w2, _ = _hf_weights(block)
    if router.shape != moe.router.weight.shape or w1.shape != moe.w1.shape or w2.shape != moe.w2.shape:
        raise ValueError(f"block shapes router {tuple(router.shape)}, gate_up {tuple(w1.shape)}, down "
                         f"{tuple(w2.shape)} must equal the MoE's {tuple(moe.router.weight.shape)}, "
                         f"{tuple(moe.w1.shape)}, {tuple(moe.w2.shape)}")
    F = moe.ffn_size
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        if _is_fused(block):
            block.experts.gate_up_proj.copy_(moe.w1)
            block.experts.down_proj.copy_(moe.w2)
        else:
            for e, expert in enumerate(block.experts):
                gate, up, down = _expert_projections(expert)
                gate.weight.copy_(moe.w1[e, :F])
                up.weight.copy_(moe.w1[e, F:])
                down.weight.copy_(moe.w2[e])
        if kind == "qwen2_moe":
            shared = block.shared_expert
            Fs = moe.shared_ffn_size
            shared.gate_proj.weight.copy_(moe.shared_w1[:Fs])
            shared.up_proj.weight.copy_(moe.shared_w1[Fs:])
            shared.down_proj.weight.copy_(moe.shared_w2)
            block.shared_expert_gate.weight.copy_(moe.shared_gate_w.reshape(1, -1))


def _default_kind(moe: MoE) -> str:
    if moe.num_shared_experts > 0:
        return "qwen2_moe"
    return "mixtral" if moe.renormalize else "qwen3_moe"


def _config_for(moe: MoE, kind: str):
    act = {"swiglu": "silu", "geglu": "gelu"}[moe.activation]
    common = dict(hidden_size=moe.hidden_size, num_experts_per_tok=moe.top_k, hidden_act=act)
    if kind == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(intermediate_size=moe.ffn_size, num_local_experts=moe.num_experts, **common)
    if kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(moe_intermediate_size=moe.ffn_size, num_experts=moe.num_experts,
                              norm_topk_prob=moe.renormalize, **common)
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(moe_intermediate_size=moe.ffn_size, num_experts=moe.num_experts,
                          norm_topk_prob=moe.renormalize,
                          shared_expert_intermediate_size=moe.shared_ffn_size, **common)


def to_hf(moe: MoE, config=None, *, kind: Optional[str] = None) -> nn.Module:
    """A new HF block (of the installed transformers' layout) holding moe's weights.

    kind: 'mixtral' | 'qwen2_moe' | 'qwen3_moe'; default: qwen2_moe with a shared expert, else mixtral
    when renormalising, else qwen3_moe. config: an HF config to build the block from (sizes must match).
    """
    if kind is None:
        kind = _default_kind(moe)
    if kind not in ("mixtral", "qwen2_moe", "qwen3_moe"):
        raise ValueError(f"kind must be one of 'mixtral', 'qwen2_moe', 'qwen3_moe', got {kind!r}")
    _check_convertible(moe, kind)
    if config is None:
        config = _config_for(moe, kind)
    if kind == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
    elif kind == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
    block = Block(config).to(device=moe.w1.device, dtype=moe.w1.dtype)
    copy_to_hf(moe, block)
    return block


class SmoeHFBlock(nn.Module):
    """Stands in for an HF sparse MoE block inside an HF model, with the block's call signature.

    transformers 4.x blocks return (y, router_logits), 5.x blocks return y; `returns_logits` keeps
    whichever the replaced block did, so the model's code works unchanged. HF collects the router
    logits for its own load-balancing loss (output_router_logits=True) with forward hooks on the block
    class (4.x) or on the router class (5.x); replace_moe_blocks therefore makes the stand-in an
    instance of the block's class and gives it a `gate` of the router's class (see `_stand_in`).
    """

    def __init__(self, moe: MoE, returns_logits: bool, router=None):
        nn.Module.__init__(self)  # not the HF block's __init__ (it would build a second set of weights)
        self.moe = moe
        self.returns_logits = returns_logits
        if router is not None:
            self.gate = router

    def forward(self, hidden_states: torch.Tensor):
        y = self.moe(hidden_states)
        gate = self.__dict__["_modules"].get("gate")
        if self.returns_logits or gate is not None:
            x2 = hidden_states.reshape(-1, self.moe.hidden_size)
            # The router logits as HF computes them (the block's dtype); only HF's aux loss reads them.
            logits = gate(x2)[0] if gate is not None else \
                torch.nn.functional.linear(x2, self.moe.router.weight.to(x2.dtype))
            if self.returns_logits:
                return y, logits
        return y


class _RouterLogits(nn.Module):
    """A parameterless router stand-in returning (logits, None, None) from the MoE's router weight."""

    def __init__(self, moe: MoE):
        nn.Module.__init__(self)
        self._moe = [moe]  # a plain list: the weight stays registered once, under .moe.router

    def forward(self, hidden_states):
        w = self._moe[0].router.weight
        return torch.nn.functional.linear(hidden_states, w.to(hidden_states.dtype)), None, None


def _stand_in(impl: type, base: type, *args) -> nn.Module:
    """An instance of impl (whose __init__ calls nn.Module.__init__ directly) that is also a `base`."""
    cls = type(f"Smoe{base.__name__}", (impl, base), {"forward": impl.forward})
    obj = cls.__new__(cls)
    impl.__init__(obj, *args)
    return obj


def _copy_hooks(src: nn.Module, dst: nn.Module) -> None:
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks_with_kwargs"):
        if hasattr(src, attr):
            getattr(dst, attr).update(getattr(src, attr))


def replace_moe_blocks(model: nn.Module, *, backend: str = "auto", **overrides) -> int:
    """Replace every supported HF sparse MoE block in `model` by smoe (in place); returns the count.

    overrides go to smoe.nn.MoE (e.g. aux_loss_coef to train with smoe's load-balancing loss instead
    of, or beside, HF's output_router_logits one)."""
    replaced = 0
    for name, child in list(model.named_children()):
        if not any(cls.__name__ in _KINDS for cls in type(child).__mro__):
            replaced += replace_moe_blocks(child, backend=backend, **overrides)
            continue
        moe = from_hf(child, backend=backend, **overrides)
        moe.train(child.training)
        if _is_fused(child):  # 5.x: returns y; HF records the router module's output
            router = _stand_in(_RouterLogits, type(child.gate), moe)
            stand_in = _stand_in(SmoeHFBlock, type(child), moe, False, router)
        else:  # 4.x: returns (y, router_logits); HF records the block's output
            stand_in = _stand_in(SmoeHFBlock, type(child), moe, True, None)
        # Keep hooks already registered on the replaced modules (HF's output-capturing hooks are
        # installed once per model, on the first forward that records outputs).
        _copy_hooks(child, stand_in)
        if _is_fused(child):
            _copy_hooks(child.gate, stand_in.gate)
        setattr(model, name, stand_in)
        replaced += 1
    return replaced


def register(backend: str = "auto") -> None:
    """Make "smoe" a transformers 5.x experts implementation (see smoe.integrations.hf_experts).

    After it, `from_pretrained(..., experts_implementation="smoe")`, `from_config(config,
    experts_implementation="smoe")`, `model.set_experts_implementation("smoe")` or
    `config._experts_implementation = "smoe"` run the model's experts through smoe's routing plan,
    expert MLP and combine on `backend` ("auto", "cpu", "simt", "reference", "cuda"). Nothing changes in
    transformers until this is called; calling it again changes the backend."""
    from smoe.integrations import hf_experts

    hf_experts.register(backend)


def unregister() -> None:
    """Undo register()."""
    from smoe.integrations import hf_experts

    hf_experts.unregister()

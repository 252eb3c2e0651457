"""Hugging Face transformers integration: move weights between HF sparse MoE blocks and smoe.nn.MoE.

Block families (transformers 4.57 and 5.x; docs/hf.md has the table with how each is tested):
  softmax top-k, renormalised:      Mixtral, MiniMax, HunYuan-MoE (+ shared MLP), GraniteMoE(-Shared)
                                    (softmax over the top-k logits = renormalised softmax top-k)
  softmax top-k, renormalised iff config.norm_topk_prob:
                                    Qwen2-MoE and Qwen3-Next (+ sigmoid-gated shared expert),
                                    Qwen3-MoE, OLMoE, FlexOlmo
  softmax top-k, not renormalised:  Jamba
  softmax, selection bias, renormalised: Ernie4.5-MoE (+ shared experts; moe_statics bias)
  softmax, group-limited (max), routed scaling: DeepSeek-V2 (+ shared experts)
  sigmoid, selection bias, group-limited (top-2 sum), routed scaling, renorm eps 1e-20:
                                    DeepSeek-V3, GLM4-MoE, dots1 (+ shared experts)
  refused (ValueError naming the missing feature): PhiMoE (sparsemixer router), GPT-OSS (expert
  biases, clamped SwiGLU, router bias), Llama4 (sigmoid score multiplies the expert input),
  JetMoE (output bias; MoA attention experts). smoe's experts backend (register()) runs GPT-OSS
  and PhiMoE's experts under transformers 5.x all the same.
Layouts:
  - transformers 4.x: experts is an nn.ModuleList of per-expert MLPs (w1/w3/w2 or gate_proj/
    up_proj/down_proj), or GraniteMoE's input_linear [E, 2F, H] / output_linear [E, H, F].
  - transformers 5.x: fused gate_up_proj [E, 2F, H] (rows [gate | up]) and down_proj [E, H, F]
    (transposed or interleaved variants are read and written too).
smoe's w1 [E, 2F, H] is [gate | up] and w2 is [E, H, F], i.e. exactly the plain 5.x layout.

Every conversion goes through a block's state-dict keys (`_Layout`): from_hf reads them, copy_to_hf
writes them, and the stand-ins of replace_moe_blocks save and load them, so a patched model's
state_dict / save_pretrained carries transformers' own keys. A block key that the layout does not
account for (an expert bias, an output bias) is an error naming the key, never ignored.
"""

from __future__ import annotations

import re
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from smoe.nn.moe import MoE

__all__ = [
    "from_hf",
    "to_hf",
    "copy_to_hf",
    "block_kind",
    "SmoeHFBlock",
    "replace_moe_blocks",
    "restore_moe_blocks",
    "from_pretrained",
    "register",
    "unregister",
    "FAMILIES",
    "REFUSED",
]

# kind -> (block class names in 4.57 / 5.x, the model_type whose config builds it)
FAMILIES = {
    "mixtral": (("MixtralSparseMoeBlock",), "mixtral"),
    "qwen2_moe": (("Qwen2MoeSparseMoeBlock",), "qwen2_moe"),
    "qwen3_moe": (("Qwen3MoeSparseMoeBlock",), "qwen3_moe"),
    "olmoe": (("OlmoeSparseMoeBlock",), "olmoe"),
    "flex_olmo": (("FlexOlmoSparseMoeBlock",), "flex_olmo"),
    "qwen3_next": (("Qwen3NextSparseMoeBlock",), "qwen3_next"),
    "minimax": (("MiniMaxSparseMoeBlock",), "minimax"),
    "jamba": (("JambaSparseMoeBlock",), "jamba"),
    "granitemoe": (("GraniteMoeMoE", "GraniteMoeSharedMoE"), "granitemoe"),
    "hunyuan_v1_moe": (("HunYuanMoEV1Moe",), "hunyuan_v1_moe"),
    "ernie4_5_moe": (("Ernie4_5_MoeSparseMoeBlock",), "ernie4_5_moe"),
    "deepseek_v2": (("DeepseekV2MoE", "DeepseekV2Moe"), "deepseek_v2"),
    "deepseek_v3": (("DeepseekV3MoE",), "deepseek_v3"),
    "glm4_moe": (("Glm4MoeMoE",), "glm4_moe"),
    "dots1": (("Dots1MoE",), "dots1"),
}
# block class name -> why smoe.nn.MoE cannot compute it
REFUSED = {
    "PhimoeSparseMoeBlock": "PhiMoE routes with sparsemixer (a masked, jittered two-stage softmax); "
    "smoe.nn.MoE has no sparsemixer router",
    "GptOssMLP": "GPT-OSS experts have per-expert biases and a clamped SwiGLU (alpha, limit), and its "
    "router has a bias; smoe.nn.MoE has none of these (its experts backend, register(), runs "
    "GPT-OSS under transformers 5.x)",
    "Llama4TextMoe": "Llama4 multiplies the expert *input* by sigmoid(router logit) (smoe weights the expert output)",
    "JetMoeMoE": "JetMoE adds an output bias [H] after the experts; smoe.nn.MoE has no output bias",
    "JetMoeMoA": "JetMoE's MoA is a mixture of attention heads, not an MLP block",
}
_KINDS = {name: kind for kind, (names, _) in FAMILIES.items() for name in names}
# Families whose router computes the logits in fp32 whatever the weight's dtype.
_FP32_ROUTER = ("deepseek_v2", "deepseek_v3", "glm4_moe", "dots1", "ernie4_5_moe")
_SIGMOID_GROUPED = ("deepseek_v3", "glm4_moe", "dots1")


def block_kind(block: nn.Module) -> str:
    """The family name ('mixtral', 'deepseek_v3', ...) of a supported HF block; ValueError otherwise."""
    for cls in type(block).__mro__:
        if cls.__name__ in _KINDS:
            return _KINDS[cls.__name__]
        if cls.__name__ in REFUSED:
            raise ValueError(f"{cls.__name__} is not supported: {REFUSED[cls.__name__]}")
    raise ValueError(f"block must be one of {', '.join(sorted(_KINDS))}, got {type(block).__name__}")


def _is_fused(block: nn.Module) -> bool:
    return hasattr(getattr(block, "experts", None), "gate_up_proj")


def _gated_activation(act_fn: nn.Module, where: str = "experts") -> str:
    name = type(act_fn).__name__
    if name in ("SiLU", "SiLUActivation"):
        return "swiglu"
    if name == "GELUActivation" or (isinstance(act_fn, nn.GELU) and act_fn.approximate == "none"):
        return "geglu"
    raise ValueError(f"the {where}' activation must be SiLU (swiglu) or exact GELU (geglu), got {name}")


def _expert_projections(expert: nn.Module):
    """(gate, up, down) nn.Linear of one 4.x expert MLP."""
    if hasattr(expert, "w1"):  # Mixtral: w1 gate, w3 up, w2 down
        return expert.w1, expert.w3, expert.w2
    return expert.gate_proj, expert.up_proj, expert.down_proj


# ---- a block's keys ------------------------------------------------------------------------------


class _Layout:
    """Where a block keeps each smoe tensor, as state-dict keys relative to the block.

    smoe names: router [E, H], w1 [E, 2F, H] ([gate | up]), w2 [E, H, F], expert_bias [E] (selection
    bias), shared_w1 [2Fs, H], shared_w2 [H, Fs], shared_gate_w [H]."""

    _ROUTERS = ("gate.wg.weight", "router.layer.weight", "gate.weight", "router.weight")
    _BIASES = (
        "gate.e_score_correction_bias",
        "gate.moe_statics.e_score_correction_bias",
        "moe_statics.e_score_correction_bias",
    )
    _SHARED = ("shared_expert", "shared_experts", "shared_mlp")

    def __init__(self, block: nn.Module):
        name = type(block).__name__
        keys = list(block.state_dict().keys())
        have = set(keys)
        self.router = next((k for k in self._ROUTERS if k in have), None)
        if self.router is None:
            raise ValueError(f"{name}: no router weight (looked for {', '.join(self._ROUTERS)})")
        self.bias = next((k for k in self._BIASES if k in have), None)
        self.transposed = self.interleaved = False
        if "experts.gate_up_proj" in have:
            self.experts = "fused"
            ex = block.experts
            self.transposed = bool(getattr(ex, "is_transposed", False))
            self.interleaved = not bool(getattr(ex, "is_concatenated", True))
            self.num_experts = ex.gate_up_proj.shape[0]
            used = {"experts.gate_up_proj", "experts.down_proj"}
        elif "input_linear.weight" in have:
            self.experts = "parallel"
            self.num_experts = block.input_linear.weight.shape[0]
            used = {"input_linear.weight", "output_linear.weight"}
        elif "experts.0.w1.weight" in have or "experts.0.gate_proj.weight" in have:
            self.experts = "list"
            self.num_experts = len(block.experts)
            self.names = ("w1", "w3", "w2") if "experts.0.w1.weight" in have else ("gate_proj", "up_proj", "down_proj")
            used = {f"experts.{e}.{n}.weight" for e in range(self.num_experts) for n in self.names}
        else:
            raise ValueError(f"{name}: unknown experts layout (keys {keys[:6]}...)")
        self.shared = self.shared_gate = None
        for prefix in self._SHARED:
            if f"{prefix}.gate_proj.weight" in have:
                self.shared = prefix
                used |= {f"{prefix}.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
        if "shared_expert_gate.weight" in have:
            self.shared_gate = "shared_expert_gate.weight"
        used |= {k for k in (self.router, self.bias, self.shared_gate) if k}
        unknown = [k for k in keys if k not in used]
        if unknown:
            raise ValueError(f"{name} has weights smoe.nn.MoE cannot represent: {', '.join(unknown)}")

    def hf_names(self) -> Dict[str, str]:
        """smoe name -> the block's key(s) holding it (for error messages)."""
        if self.experts == "fused":
            w1, w2 = "experts.gate_up_proj", "experts.down_proj"
        elif self.experts == "parallel":
            w1, w2 = "input_linear.weight", "output_linear.weight"
        else:
            w1, w2 = f"experts.*.{self.names[0]}/{self.names[1]}.weight", f"experts.*.{self.names[2]}.weight"
        p = self.shared
        return {
            "router": self.router,
            "w1": w1,
            "w2": w2,
            "expert_bias": self.bias,
            "shared_w1": f"{p}.gate_proj/up_proj.weight",
            "shared_w2": f"{p}.down_proj.weight",
            "shared_gate_w": self.shared_gate,
        }

    # smoe tensors from a block's state dict (tensors are the dict's, or stacked copies)
    def read(self, sd: Dict[str, torch.Tensor], where: str = "") -> Dict[str, torch.Tensor]:
        out = {"router": sd[self.router]}
        if self.experts == "fused":
            w1, w2 = sd["experts.gate_up_proj"], sd["experts.down_proj"]
            if self.transposed:
                w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
            if self.interleaved:
                w1 = torch.cat([w1[:, 0::2], w1[:, 1::2]], dim=1)
        elif self.experts == "parallel":
            w1, w2 = sd["input_linear.weight"], sd["output_linear.weight"]
        else:
            g, u, d = self.names
            for e in range(self.num_experts):
                for n in (g, u, d):
                    key = f"experts.{e}.{n}.weight"
                    want = sd[f"experts.0.{n}.weight"].shape
                    if sd[key].shape != want:
                        raise ValueError(f"{where}{key} has shape {tuple(sd[key].shape)}, expert 0's has {tuple(want)}")
            w1 = torch.stack(
                [
                    torch.cat([sd[f"experts.{e}.{g}.weight"], sd[f"experts.{e}.{u}.weight"]])
                    for e in range(self.num_experts)
                ]
            )
            w2 = torch.stack([sd[f"experts.{e}.{d}.weight"] for e in range(self.num_experts)])
        out["w1"], out["w2"] = w1, w2
        if self.bias:
            out["expert_bias"] = sd[self.bias].reshape(-1)
        if self.shared:
            p = self.shared
            out["shared_w1"] = torch.cat([sd[f"{p}.gate_proj.weight"], sd[f"{p}.up_proj.weight"]])
            out["shared_w2"] = sd[f"{p}.down_proj.weight"]
        if self.shared_gate:
            out["shared_gate_w"] = sd[self.shared_gate].reshape(-1)
        return out

    # a block's state dict from smoe tensors
    def write(self, t: Dict[str, torch.Tensor], bias_shape=None) -> Dict[str, torch.Tensor]:
        out = {self.router: t["router"]}
        w1, w2 = t["w1"], t["w2"]
        F = w2.shape[-1]
        if self.experts == "fused":
            if self.interleaved:
                w1 = torch.stack([w1[:, :F], w1[:, F:]], dim=2).reshape(w1.shape)
            if self.transposed:
                w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
            out["experts.gate_up_proj"], out["experts.down_proj"] = w1, w2
        elif self.experts == "parallel":
            out["input_linear.weight"], out["output_linear.weight"] = w1, w2
        else:
            g, u, d = self.names
            for e in range(self.num_experts):
                out[f"experts.{e}.{g}.weight"] = w1[e, :F]
                out[f"experts.{e}.{u}.weight"] = w1[e, F:]
                out[f"experts.{e}.{d}.weight"] = w2[e]
        if self.bias:
            b = t.get("expert_bias")
            if b is None:
                b = torch.zeros(w1.shape[0], dtype=torch.float32, device=w1.device)
            out[self.bias] = b.reshape(bias_shape) if bias_shape is not None else b
        if self.shared:
            Fs = t["shared_w2"].shape[-1]
            out[f"{self.shared}.gate_proj.weight"] = t["shared_w1"][:Fs]
            out[f"{self.shared}.up_proj.weight"] = t["shared_w1"][Fs:]
            out[f"{self.shared}.down_proj.weight"] = t["shared_w2"]
        if self.shared_gate:
            out[self.shared_gate] = t["shared_gate_w"].reshape(1, -1)
        return out


_SMOE_KEYS = {
    "router": "router.weight",
    "w1": "w1",
    "w2": "w2",
    "expert_bias": "router.expert_bias",
    "shared_w1": "shared_expert.w1",
    "shared_w2": "shared_expert.w2",
    "shared_gate_w": "shared_expert.gate_w",
}


def _moe_tensors(moe: MoE) -> Dict[str, torch.Tensor]:
    out = {"router": moe.router.weight, "w1": moe.w1, "w2": moe.w2}
    for name in ("expert_bias", "shared_w1", "shared_w2", "shared_gate_w"):
        if getattr(moe, name, None) is not None:
            out[name] = getattr(moe, name)
    return out


# ---- a block's routing ---------------------------------------------------------------------------


def _attr(block: nn.Module, *names):
    """The first attribute found under names on the block, its router, or its config (None if none)."""
    for holder in (block, getattr(block, "gate", None), getattr(block, "router", None), getattr(block, "config", None)):
        if holder is None:
            continue
        for n in names:
            v = getattr(holder, n, None)
            if v is not None and not isinstance(v, nn.Module):
                return v
    return None


def _act_fn(block: nn.Module, layout: _Layout):
    if layout.experts == "fused":
        return block.experts.act_fn
    if layout.experts == "parallel":
        return block.activation
    return block.experts[0].act_fn


def _spec(block: nn.Module, kind: str, layout: _Layout, router: torch.Tensor) -> dict:
    """smoe.nn.MoE keyword arguments (routing and sizes) that compute what `block` computes."""
    name = type(block).__name__
    top_k = _attr(block, "top_k", "num_experts_per_tok", "moe_topk", "moe_k")
    if top_k is None:
        raise ValueError(f"{name}: no top_k found on the block, its router or its config")
    spec = dict(
        top_k=int(top_k),
        activation=_gated_activation(_act_fn(block, layout)),
        score_func="softmax",
        renormalize=False,
        renorm_eps=0.0,
        routed_scaling=1.0,
        n_groups=1,
        topk_groups=1,
        group_score="max",
        router_dtype=torch.float32 if kind in _FP32_ROUTER else router.dtype,
    )
    norm = _attr(block, "norm_topk_prob")
    if kind in ("mixtral", "minimax", "hunyuan_v1_moe", "granitemoe", "ernie4_5_moe"):
        spec["renormalize"] = True
    elif kind in ("qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "qwen3_next") + _SIGMOID_GROUPED:
        spec["renormalize"] = bool(norm)
    if kind == "deepseek_v2":
        method = _attr(block, "topk_method")
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(
                f"{name}: topk_method={method!r} is not supported (smoe: 'greedy', 'group_limited_greedy')"
            )
        if method == "group_limited_greedy":
            spec.update(n_groups=int(_attr(block, "num_group", "n_group")), topk_groups=int(_attr(block, "topk_group")))
    if kind in ("deepseek_v2",) + _SIGMOID_GROUPED:
        spec["routed_scaling"] = float(_attr(block, "routed_scaling_factor"))
    if kind in _SIGMOID_GROUPED:
        spec.update(
            score_func="sigmoid",
            group_score="top2_sum",
            n_groups=int(_attr(block, "num_group", "n_group") or 1),
            topk_groups=int(_attr(block, "topk_group") or 1),
        )
        if spec["renormalize"]:
            spec["renorm_eps"] = 1e-20
    if kind == "ernie4_5_moe":
        norm_min = float(_attr(block, "norm_min", "moe_norm_min") or 0.0)
        if norm_min > 1e-6:
            # HF divides by max(sum, norm_min); a top-k softmax sum is >= top_k / E, so a tiny
            # norm_min never binds. A large one would, and smoe has no clamp.
            raise ValueError(
                f"{name}: moe_norm_min={norm_min} (smoe renormalises by the sum; only a norm_min below 1e-6 is exact)"
            )
    if layout.bias:
        spec.update(bias_balancing=True, bias_update_rate=0.0)
    if layout.shared:
        shared = getattr(block, layout.shared)
        _gated_activation(shared.act_fn, "shared expert")
        spec.update(
            num_shared_experts=1,
            shared_ffn_size=shared.down_proj.weight.shape[1],
            shared_gate=layout.shared_gate is not None,
        )
    return spec


def _check_shapes(t: Dict[str, torch.Tensor], name: str, layout: _Layout) -> tuple:
    E, H = t["router"].shape
    F = t["w2"].shape[-1]
    want = {"w1": (E, 2 * F, H), "w2": (E, H, F)}
    if "expert_bias" in t:
        want["expert_bias"] = (E,)
    if "shared_w2" in t:
        Fs = t["shared_w2"].shape[-1]
        want.update(shared_w1=(2 * Fs, H), shared_w2=(H, Fs))
    if "shared_gate_w" in t:
        want["shared_gate_w"] = (H,)
    names = layout.hf_names()
    for key, shape in want.items():
        if tuple(t[key].shape) != shape:
            raise ValueError(
                f"{name}: {names[key]} has shape {tuple(t[key].shape)} (in smoe's [E, 2F, H] / [E, H, F] "
                f"order), expected {shape} from {names['router']} [E={E}, H={H}] and "
                f"{names['w2']} (F={F})"
            )
    return E, H, F


def from_hf(block: nn.Module, *, backend: str = "auto", **overrides) -> MoE:
    """A new smoe.nn.MoE computing what `block` computes, with copies of its weights.

    overrides: extra MoE keyword arguments (e.g. aux_loss_coef); routing-defining ones taken from the
    block (top_k, renormalize, activation, shared expert sizes) cannot be overridden.
    """
    kind = block_kind(block)
    name = type(block).__name__
    if kind in ("mixtral", "minimax") and getattr(block, "jitter_noise", 0.0):
        warnings.warn(
            f"{name}.jitter_noise > 0 is not reproduced by smoe.nn.MoE (it only perturbs inputs in training)",
            stacklevel=2,
        )
    layout = _Layout(block)
    t = layout.read(block.state_dict(), where=f"{name}.")
    E, H, F = _check_shapes(t, name, layout)
    kwargs = _spec(block, kind, layout, t["router"])
    top_k = kwargs.pop("top_k")
    kwargs.update(dtype=t["w1"].dtype, device=t["w1"].device, backend=backend)
    defined = set(kwargs) | {"hidden_size", "ffn_size", "num_experts", "top_k"}
    for key in overrides:
        if key in defined and key not in ("device", "dtype", "backend", "bias_update_rate"):
            raise ValueError(f"{key} is defined by the Hugging Face block and cannot be overridden")
    kwargs.update(overrides)
    moe = MoE(H, F, E, top_k, **kwargs)
    _load_into_moe(moe, t)
    return moe


def _load_into_moe(moe: MoE, t: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, value in t.items():
            (moe.router.weight if key == "router" else getattr(moe, key)).copy_(value)


def _problems(moe: MoE, kind: str, spec: dict) -> List[str]:
    problems = []
    if moe.expert_choice:
        problems.append("expert_choice=True (HF blocks are token-choice)")
    if moe.capacity_factor is not None:
        problems.append(f"capacity_factor={moe.capacity_factor} (HF blocks are dropless: no capacity)")
    for key in ("activation", "score_func", "renormalize", "routed_scaling", "group_score"):
        if key == "group_score" and spec["n_groups"] == 1 and moe.n_groups == 1:
            continue
        if getattr(moe, key) != spec[key]:
            problems.append(f"{key}={getattr(moe, key)!r} ({kind}: {spec[key]!r})")
    if moe.renormalize and spec["renormalize"] and moe.renorm_eps != spec["renorm_eps"]:
        problems.append(f"renorm_eps={moe.renorm_eps!r} ({kind}: {spec['renorm_eps']!r})")
    if (moe.n_groups, moe.topk_groups) != (spec["n_groups"], spec["topk_groups"]) and not (
        moe.topk_groups == moe.n_groups and spec["topk_groups"] == spec["n_groups"]
    ):
        problems.append(
            f"n_groups={moe.n_groups}, topk_groups={moe.topk_groups} "
            f"({kind}: {spec['n_groups']}, {spec['topk_groups']})"
        )
    if moe.expert_bias is not None and not spec.get("bias_balancing"):
        problems.append(f"a selection bias (bias_balancing=True; {kind} has none)")
    want_shared = spec.get("num_shared_experts", 0)
    if (moe.num_shared_experts > 0) != (want_shared > 0):
        problems.append(
            f"num_shared_experts={moe.num_shared_experts} ({kind}: "
            f"{'one shared expert' if want_shared else '0, no shared expert'})"
        )
    elif want_shared:
        if (moe.shared_gate_w is not None) != spec["shared_gate"]:
            problems.append(f"shared_gate={moe.shared_gate_w is not None} ({kind}: {spec['shared_gate']})")
    return problems


def copy_to_hf(moe: MoE, block: nn.Module) -> None:
    """Copy moe's weights into an existing HF block of the same sizes (either layout)."""
    kind = block_kind(block)
    layout = _Layout(block)
    sd = block.state_dict()
    spec = _spec(block, kind, layout, sd[layout.router])
    problems = _problems(moe, kind, spec)
    if moe.top_k != spec["top_k"]:
        problems.append(f"top_k={moe.top_k} (the block: {spec['top_k']})")
    if problems:
        raise ValueError(f"this MoE cannot be expressed as a {kind} block: " + "; ".join(problems))
    bias_shape = sd[layout.bias].shape if layout.bias else None
    new = layout.write(_moe_tensors(moe), bias_shape)
    for key, value in new.items():
        if tuple(sd[key].shape) != tuple(value.shape):
            raise ValueError(
                f"{type(block).__name__}.{key} has shape {tuple(sd[key].shape)}, the MoE gives "
                f"{tuple(value.shape)} (sizes must match)"
            )
    with torch.no_grad():
        for key, value in new.items():
            sd[key].copy_(value)


def _default_kind(moe: MoE) -> str:
    if moe.score_func == "sigmoid":
        return "deepseek_v3"
    if moe.num_shared_experts > 0:
        return "qwen2_moe" if moe.shared_gate_w is not None else "deepseek_v2"
    return "mixtral" if moe.renormalize else "qwen3_moe"


def _config_for(moe: MoE, kind: str):
    from transformers import AutoConfig

    E, H, F, K = moe.num_experts, moe.hidden_size, moe.ffn_size, moe.top_k
    act = {"swiglu": "silu", "geglu": "gelu"}.get(moe.activation)
    if act is None:
        raise ValueError(f"activation={moe.activation!r} (HF blocks: 'swiglu' or 'geglu')")
    kw = dict(
        hidden_size=H,
        intermediate_size=F,
        moe_intermediate_size=F,
        num_experts=E,
        num_local_experts=E,
        n_routed_experts=E,
        moe_num_experts=E,
        num_experts_per_tok=K,
        moe_k=K,
        moe_topk=K,
        hidden_act=act,
        norm_topk_prob=moe.renormalize,
        routed_scaling_factor=moe.routed_scaling,
        n_group=moe.n_groups,
        topk_group=moe.topk_groups,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
    )
    fs = moe.shared_ffn_size if moe.num_shared_experts else 0
    if kind in ("qwen2_moe", "qwen3_next"):
        kw["shared_expert_intermediate_size"] = fs
    elif kind in ("deepseek_v2", "deepseek_v3", "glm4_moe", "dots1", "ernie4_5_moe"):
        if fs % F:
            raise ValueError(
                f"shared_ffn_size={fs} must be a multiple of ffn_size={F} for {kind} "
                f"(its shared experts are n_shared_experts * moe_intermediate_size)"
            )
        kw["moe_num_shared_experts" if kind == "ernie4_5_moe" else "n_shared_experts"] = fs // F
        if kind == "deepseek_v2":
            kw["topk_method"] = "group_limited_greedy" if moe.topk_groups < moe.n_groups else "greedy"
    elif kind == "hunyuan_v1_moe" and fs != F:
        raise ValueError(
            f"shared_ffn_size={fs} must equal ffn_size={F} for hunyuan_v1_moe (its shared MLP has intermediate_size)"
        )
    if kind == "deepseek_v3":
        kw.update(kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=2, qk_nope_head_dim=2, v_head_dim=2, head_dim=2)
    return AutoConfig.for_model(FAMILIES[kind][1], **kw)


def _block_class(kind: str):
    import importlib

    model_type = FAMILIES[kind][1]
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    for name in FAMILIES[kind][0]:
        if hasattr(module, name):
            return getattr(module, name)
    raise ValueError(f"this transformers has no {' / '.join(FAMILIES[kind][0])}")


def to_hf(moe: MoE, config=None, *, kind: Optional[str] = None) -> nn.Module:
    """A new HF block (of the installed transformers' layout) holding moe's weights.

    kind: one of FAMILIES; default: deepseek_v3 for sigmoid scores, qwen2_moe for a gated shared
    expert, deepseek_v2 for an ungated one, else mixtral when renormalising, else qwen3_moe.
    config: an HF config to build the block from (sizes must match).
    """
    if kind is None:
        kind = _default_kind(moe)
    if kind not in FAMILIES:
        raise ValueError(f"kind must be one of {', '.join(repr(k) for k in FAMILIES)}, got {kind!r}")
    spec_probe = [p for p in _problems_without_block(moe, kind)]
    if spec_probe:
        raise ValueError(f"this MoE cannot be expressed as a {kind} block: " + "; ".join(spec_probe))
    if config is None:
        config = _config_for(moe, kind)
    block = _block_class(kind)(config).to(device=moe.w1.device, dtype=moe.w1.dtype)
    copy_to_hf(moe, block)
    return block


def _problems_without_block(moe: MoE, kind: str) -> List[str]:
    """The problems copy_to_hf would find that do not depend on the config (checked before building)."""
    problems = []
    if moe.capacity_factor is not None:
        problems.append(f"capacity_factor={moe.capacity_factor} (HF blocks are dropless: no capacity)")
    want_score = "sigmoid" if kind in _SIGMOID_GROUPED else "softmax"
    if moe.score_func != want_score:
        problems.append(f"score_func={moe.score_func!r} ({kind}: {want_score!r})")
    if moe.activation not in ("swiglu", "geglu"):
        problems.append(f"activation={moe.activation!r} (HF: 'swiglu' or 'geglu')")
    fixed = {
        "mixtral": True,
        "minimax": True,
        "hunyuan_v1_moe": True,
        "granitemoe": True,
        "ernie4_5_moe": True,
        "jamba": False,
        "deepseek_v2": False,
    }
    if kind in fixed and moe.renormalize != fixed[kind]:
        problems.append(f"renormalize={moe.renormalize} ({kind}: {fixed[kind]})")
    shared = {"qwen2_moe": "gated", "qwen3_next": "gated", "hunyuan_v1_moe": "plain"}
    if kind in shared or kind in ("deepseek_v2", "deepseek_v3", "glm4_moe", "dots1", "ernie4_5_moe"):
        if kind in shared and moe.num_shared_experts == 0:
            problems.append(f"no shared expert ({kind} has one)")
        gated = shared.get(kind) == "gated"
        if moe.num_shared_experts and (moe.shared_gate_w is not None) != gated:
            problems.append(f"shared_gate={moe.shared_gate_w is not None} ({kind}: {gated})")
    elif moe.num_shared_experts > 0:
        problems.append(f"a shared expert ({kind} has none)")
    return problems


# ---- whole models --------------------------------------------------------------------------------


class SmoeHFBlock(nn.Module):
    """Stands in for an HF sparse MoE block inside an HF model, with the block's call signature.

    transformers 4.x blocks mostly return (y, router_logits), 5.x blocks return y; `returns_logits`
    keeps whichever the replaced block did, so the model's code works unchanged. HF collects the router
    logits for its own load-balancing loss (output_router_logits=True) with forward hooks on the block
    class (4.x) or on the router class (5.x); replace_moe_blocks therefore makes the stand-in an
    instance of the block's class and gives it a router of the router's class (see `_stand_in`).

    state_dict() of the stand-in holds the replaced block's own keys and layout (a state-dict hook
    writes them from the smoe parameters), and load_state_dict() accepts them (a pre-hook reads them),
    so save_pretrained / from_pretrained of the plain model class see transformers' checkpoint.
    """

    def __init__(self, moe: MoE, returns_logits: bool, router=None, router_attr: str = "gate", hf=None):
        nn.Module.__init__(self)  # not the HF block's __init__ (it would build a second set of weights)
        # registered as `smoe` (4.x DeepSeek blocks have a method named `moe`); `.moe` reads it
        self.smoe = moe
        self.returns_logits = returns_logits
        self._router_attr = router_attr
        if router is not None:
            setattr(self, router_attr, router)
        # (kind, layout, {hf key: dtype}, the replaced block on the meta device): not a submodule
        self.__dict__["_hf"] = hf
        if hf is not None:
            self._register_state_dict_hook(_save_hf_keys)
            self._register_load_state_dict_pre_hook(_load_hf_keys, with_module=True)

    @property
    def moe(self) -> MoE:
        return self._modules["smoe"]

    def forward(self, hidden_states: torch.Tensor):
        y = self.moe(hidden_states)
        gate = self.__dict__["_modules"].get(self._router_attr)
        if self.returns_logits or gate is not None:
            x2 = hidden_states.reshape(-1, self.moe.hidden_size)
            # The router logits as HF computes them (the block's dtype); only HF's aux loss reads them.
            logits = (
                gate(x2)[0]
                if gate is not None
                else torch.nn.functional.linear(x2.to(self.moe.router_dtype), self.moe.router.weight).to(x2.dtype)
            )
            if self.returns_logits:
                return y, logits
        return y


def _hf_state(module: SmoeHFBlock, t: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    _, layout, dtypes, _ = module._hf
    bias_shape = None
    if layout.bias:
        bias_shape = module._hf[3].state_dict()[layout.bias].shape
    return {k: v.to(dtypes.get(k, v.dtype)) for k, v in layout.write(t, bias_shape).items()}


def _save_hf_keys(module, state_dict, prefix, local_metadata):
    t = {}
    for name, key in _SMOE_KEYS.items():
        full = prefix + "smoe." + key
        if full in state_dict:
            t[name] = state_dict.pop(full)
    for key, value in _hf_state(module, t).items():
        # views of one smoe tensor (per-expert slices) become tensors of their own: safetensors
        # refuses tensors that share memory
        state_dict[prefix + key] = value.clone() if value._is_view() else value


def _load_hf_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    _, layout, _, _ = module._hf
    hf_keys = list(_hf_state(module, _moe_tensors(module.moe)).keys())
    if not any(prefix + k in state_dict for k in hf_keys):
        return  # smoe's own keys (or nothing): the default loading handles them
    missing = [prefix + k for k in hf_keys if prefix + k not in state_dict]
    if missing:
        error_msgs.append(
            f"{prefix}: the checkpoint has some of the Hugging Face block's keys but not {', '.join(missing)}"
        )
        return
    sd = {k: state_dict.pop(prefix + k) for k in hf_keys}
    for name, value in layout.read(sd, where=prefix).items():
        state_dict[prefix + "smoe." + _SMOE_KEYS[name]] = value


class _RouterLogits(nn.Module):
    """A parameterless router stand-in returning (logits, None, None) from the MoE's router weight."""

    def __init__(self, moe: MoE):
        nn.Module.__init__(self)
        self._moe = [moe]  # a plain list: the weight stays registered once, under .moe.router

    @property
    def weight(self) -> torch.Tensor:
        """The MoE's router weight [E, H] (code that reads or initialises router.weight sees it)."""
        return self._moe[0].router.weight

    @property
    def e_score_correction_bias(self) -> torch.Tensor:
        """The MoE's selection bias [E] (DeepSeek-V3 / GLM4-MoE / dots1 routers hold it; transformers'
        _init_weights zeroes router.e_score_correction_bias)."""
        bias = self._moe[0].expert_bias
        if bias is None:
            raise AttributeError(f"{type(self).__name__} has no e_score_correction_bias (no selection bias)")
        return bias

    def forward(self, hidden_states):
        moe = self._moe[0]
        logits = torch.nn.functional.linear(hidden_states.to(moe.router_dtype), moe.router.weight)
        return logits.to(hidden_states.dtype) if moe.router_dtype != torch.float32 else logits, None, None


def _stand_in(impl: type, base: type, *args, **kwargs) -> nn.Module:
    """An instance of impl (whose __init__ calls nn.Module.__init__ directly) that is also a `base`."""
    cls = type(f"Smoe{base.__name__}", (impl, base), {"forward": impl.forward})
    obj = cls.__new__(cls)
    impl.__init__(obj, *args, **kwargs)
    return obj


_HOOK_ATTRS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)


def _copy_hooks(src: nn.Module, dst: nn.Module) -> None:
    for attr in _HOOK_ATTRS:
        if hasattr(src, attr):
            getattr(dst, attr).update(getattr(src, attr))


def _returns_tuple(block: nn.Module) -> bool:
    """Whether the block's forward returns (y, router_logits) (most 4.x blocks) or y: one token through
    the block's own forward (no hooks); if the block cannot run that (transformers 4.57's Ernie4.5
    fails in bf16), the last return statement of its source decides."""
    p = next(block.parameters())
    try:
        with torch.no_grad():
            out = type(block).forward(
                block, torch.zeros(1, 1, block_hidden_size(block), dtype=p.dtype, device=p.device)
            )
        return isinstance(out, tuple)
    except Exception:  # noqa: BLE001 - any failure of HF's code: read the source instead
        import inspect

        returns = re.findall(r"^\s*return (.+)$", inspect.getsource(type(block).forward), re.MULTILINE)
        return bool(returns) and "," in returns[-1]


def block_hidden_size(block: nn.Module) -> int:
    layout = _Layout(block)
    return block.state_dict()[layout.router].shape[1]


def _looks_like_moe(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(getattr(module, "experts", None), nn.Module) or bool(
        re.search(r"(SparseMoeBlock|SparseMoe|MoE|Moe|MoA)$", name)
    )


def _router_attr(block: nn.Module) -> str:
    return "gate" if isinstance(getattr(block, "gate", None), nn.Module) else "router"


def replace_moe_blocks(model: nn.Module, *, backend: str = "auto", strict: bool = True, **overrides) -> List[str]:
    """Replace every supported HF sparse MoE block in `model` by smoe (in place).

    Returns the dotted names of the replaced blocks. A module that is an MoE block smoe cannot
    replace (a refused family such as PhiMoE or GPT-OSS, or a class it does not know that has
    `experts`) raises ValueError naming it and why; strict=False warns instead and leaves it.
    overrides go to smoe.nn.MoE (e.g. aux_loss_coef to train with smoe's load-balancing loss instead
    of, or beside, HF's output_router_logits one). restore_moe_blocks undoes it."""
    replaced: List[str] = []
    _replace(model, "", backend, strict, overrides, replaced)
    return replaced


def _refusal(child: nn.Module) -> Optional[str]:
    for cls in type(child).__mro__:
        if cls.__name__ in REFUSED:
            return REFUSED[cls.__name__]
    experts = getattr(child, "experts", None)
    if isinstance(experts, nn.Module) and type(experts).__name__ in REFUSED:
        return None  # a container (JetMoE's attention holds its MoA as .experts): the recursion names it
    if _looks_like_moe(child) and not isinstance(child, SmoeHFBlock):
        return (
            f"{type(child).__name__} looks like an MoE block (it has experts) but is not a family smoe knows "
            f"({', '.join(sorted(FAMILIES))})"
        )
    return None


def _replace(model, path, backend, strict, overrides, replaced):
    for name, child in list(model.named_children()):
        full = f"{path}{name}"
        if isinstance(child, SmoeHFBlock):
            continue
        if not any(cls.__name__ in _KINDS for cls in type(child).__mro__):
            reason = _refusal(child)
            if reason is not None:
                if strict:
                    raise ValueError(
                        f"replace_moe_blocks: cannot replace {full} ({type(child).__name__}): {reason}; "
                        f"pass strict=False to leave such blocks to transformers"
                    )
                warnings.warn(
                    f"replace_moe_blocks: {full} ({type(child).__name__}) is left to transformers: {reason}",
                    stacklevel=3,
                )
                continue
            _replace(child, full + ".", backend, strict, overrides, replaced)
            continue
        kind = block_kind(child)
        moe = from_hf(child, backend=backend, **overrides)
        moe.train(child.training)
        layout = _Layout(child)
        dtypes = {k: v.dtype for k, v in child.state_dict().items()}
        returns_logits = _returns_tuple(child)
        router = router_attr = None
        if _is_fused(child):  # 5.x: HF records the router module's output
            router_attr = _router_attr(child)
            router = _stand_in(_RouterLogits, type(getattr(child, router_attr)), moe)
        stand_in = _stand_in(
            SmoeHFBlock,
            type(child),
            moe,
            returns_logits,
            router,
            router_attr or "gate",
            hf=(kind, layout, dtypes, None),
        )
        # Keep hooks already registered on the replaced modules (HF's output-capturing hooks are
        # installed once per model, on the first forward that records outputs).
        _copy_hooks(child, stand_in)
        if router is not None:
            _copy_hooks(getattr(child, router_attr), router)
        template = child.to("meta")  # its structure, for restore_moe_blocks and the bias's shape
        stand_in.__dict__["_hf"] = (kind, layout, dtypes, template)
        setattr(model, name, stand_in)
        replaced.append(full)


def from_pretrained(model_class, path, *, backend: str = "auto", strict: bool = True, moe_overrides=None, **kwargs):
    """model_class.from_pretrained(path, **kwargs) with every MoE block then replaced by smoe.

    transformers' from_pretrained assigns checkpoint tensors by parameter name, so it cannot load into
    an already patched model (whose parameters are smoe's); load plainly, then patch (or
    load_state_dict a transformers state dict into a patched model: its pre-hooks convert it)."""
    model = model_class.from_pretrained(path, **kwargs)
    replace_moe_blocks(model, backend=backend, strict=strict, **(moe_overrides or {}))
    return model


def restore_moe_blocks(model: nn.Module) -> List[str]:
    """Put HF blocks back where replace_moe_blocks put smoe, with the (possibly trained) smoe weights.

    Returns the dotted names of the restored blocks."""
    restored: List[str] = []

    def walk(module, path):
        for name, child in list(module.named_children()):
            full = f"{path}{name}"
            if isinstance(child, SmoeHFBlock) and child._hf is not None:
                block = child._hf[3]
                moe = child.moe
                block.to_empty(device=moe.w1.device)
                copy_to_hf(moe, block)
                block.train(child.training)
                _copy_hooks(child, block)
                setattr(module, name, block)
                restored.append(full)
            else:
                walk(child, full + ".")

    walk(model, "")
    return restored


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

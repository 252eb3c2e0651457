"""The implementations smoe's layer is timed against (python -m smoe.bench), built with smoe's weights.

Every builder returns an nn.Module taking x [1, T, H] (the HF blocks' layout) and returning y (or a
tuple whose first item is y). Names, as they appear in the table and the JSON:
  hf_mixtral         transformers 4.x MixtralSparseMoeBlock (the per-expert loop), same weights
  hf_qwen3           transformers 4.x Qwen3MoeSparseMoeBlock, same weights
  hf_deepseek_v3     transformers' DeepseekV3MoE (4.x loop / 5.x eager), its own random weights of the
                     same shapes (sigmoid, group-limited top-k, one shared expert)
  hf5_eager          transformers 5.x MixtralSparseMoeBlock, experts_implementation="eager"
  hf5_grouped_mm     transformers 5.x MixtralSparseMoeBlock, experts_implementation="grouped_mm"
                     (torch._grouped_mm; a per-group loop on the CPU); for the DeepSeek-like shape
                     the 5.x DeepseekV3MoE with grouped_mm
  torch_grouped_mm   torch's own grouped GEMM called directly: the routing in plain PyTorch
                     (smoe.reference's gating, argsort), both expert GEMMs as torch._grouped_mm
  torch_loop         a plain PyTorch per-expert loop (only where transformers is missing)
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

__all__ = ["transformers_major", "build_peers", "TorchGroupedMM", "TorchLoop"]


def transformers_major() -> Optional[int]:
    try:
        import transformers
    except ImportError:
        return None
    return int(transformers.__version__.split(".")[0])


def _gating(moe, x2: torch.Tensor):
    """smoe.reference's top-k gating with the layer's routing settings: weights [T,K] f32, experts [T,K]."""
    from smoe.reference.ops import topk_gating

    logits = torch.nn.functional.linear(x2.float(), moe.router.weight.float())
    weights, experts, _ = topk_gating(
        logits,
        top_k=moe.top_k,
        score_func=moe.score_func,
        bias=moe.expert_bias,
        n_groups=moe.n_groups,
        topk_groups=moe.topk_groups,
        group_score=moe.group_score,
        renormalize=moe.renormalize,
        renorm_eps=moe.renorm_eps,
        routed_scaling=moe.routed_scaling,
    )
    return weights, experts


def _shared(moe, x2: torch.Tensor) -> Optional[torch.Tensor]:
    if moe.num_shared_experts == 0:
        return None
    g, u = torch.nn.functional.linear(x2, moe.shared_w1).chunk(2, dim=-1)
    return torch.nn.functional.linear(torch.nn.functional.silu(g) * u, moe.shared_w2)


class TorchGroupedMM(nn.Module):
    """The layer in plain PyTorch with torch._grouped_mm for the two expert GEMMs (SwiGLU only)."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x3: torch.Tensor) -> torch.Tensor:
        m = self.moe
        x = x3.reshape(-1, x3.shape[-1])  # [T,H]
        weights, experts = _gating(m, x)
        flat = experts.reshape(-1).long()  # assignment t*K + k
        order = torch.argsort(flat, stable=True)  # rows in expert order
        counts = torch.bincount(flat, minlength=m.num_experts)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = x[order // m.top_k]  # [R,H]
        h = torch._grouped_mm(xs, m.w1.transpose(1, 2), offs=offs)  # [R,2F]
        g, u = h.chunk(2, dim=-1)
        ys = torch._grouped_mm((torch.nn.functional.silu(g) * u).contiguous(), m.w2.transpose(1, 2), offs=offs)
        ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
        y = torch.zeros_like(x).index_add(0, order // m.top_k, ys)
        sh = _shared(m, x)
        if sh is not None:
            y = y + sh
        return y.view_as(x3)


class TorchLoop(nn.Module):
    """A plain PyTorch per-expert loop (what the HF blocks do), for machines without transformers."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x3: torch.Tensor) -> torch.Tensor:
        m = self.moe
        x = x3.reshape(-1, x3.shape[-1])
        weights, experts = _gating(m, x)
        weights = weights.to(x.dtype)
        y = torch.zeros_like(x)
        for e in range(m.num_experts):
            tok, slot = torch.nonzero(experts == e, as_tuple=True)
            g, u = (x[tok] @ m.w1[e].t()).chunk(2, dim=-1)
            out = (torch.nn.functional.silu(g) * u) @ m.w2[e].t()
            y = y.index_add(0, tok, out * weights[tok, slot, None])
        sh = _shared(m, x)
        if sh is not None:
            y = y + sh
        return y.view_as(x3)


def _hf_deepseek(moe, experts_impl: Optional[str]) -> nn.Module:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(
        hidden_size=moe.hidden_size,
        moe_intermediate_size=moe.ffn_size,
        n_routed_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        n_group=moe.n_groups,
        topk_group=moe.topk_groups,
        n_shared_experts=moe.num_shared_experts,
        norm_topk_prob=bool(moe.renormalize),
        routed_scaling_factor=moe.routed_scaling,
        hidden_act="silu",
    )
    if experts_impl is not None:
        cfg._experts_implementation = experts_impl
    block = DeepseekV3MoE(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # some 5.x parameters start as torch.empty
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
        for b in block.buffers():
            b.zero_()
    return block.to(dtype=moe.w1.dtype)


def _hf5_mixtral(moe, experts_impl: str) -> nn.Module:
    from smoe.integrations.hf import _config_for, to_hf

    cfg = _config_for(moe, "mixtral")
    cfg._experts_implementation = experts_impl
    return to_hf(moe, config=cfg, kind="mixtral")


def build_peers(moe, *, with_hf: bool = True, only: Optional[str] = None) -> Dict[str, nn.Module]:
    """The peers this interpreter can run for `moe` (see the module docstring). only='hf5': the
    transformers 5.x ones alone (what a 4.x run asks a 5.x subprocess for)."""
    major = transformers_major() if with_hf else None
    deepseek_like = moe.score_func != "softmax" or moe.n_groups > 1 or moe.num_shared_experts > 0
    out: Dict[str, nn.Module] = {}
    if major is not None and major < 5 and only is None:
        if deepseek_like:
            out["hf_deepseek_v3"] = _hf_deepseek(moe, None)
        else:
            from smoe.integrations.hf import to_hf

            out["hf_mixtral"] = to_hf(moe, kind="mixtral")
            out["hf_qwen3"] = to_hf(moe, kind="qwen3_moe")
    if major is not None and major >= 5:
        for impl in ("eager", "grouped_mm"):
            out[f"hf5_{impl}"] = _hf_deepseek(moe, impl) if deepseek_like else _hf5_mixtral(moe, impl)
    if only is None:
        out["torch_grouped_mm"] = TorchGroupedMM(moe)
        if major is None:
            out["torch_loop"] = TorchLoop(moe)
    for m in out.values():
        m.train()
    return out

"""Tiny random configs of every Hugging Face MoE family (shared by the test_hf*.py files; no downloads).

FAMILIES maps a model_type to what its config needs beyond COMMON to be tiny and to route through
the MoE block in every layer it can. tiny_model builds the causal LM with random router and expert
weights (HF initialises some routers and selection biases to zeros, which ties every expert).
"""

import torch

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    num_experts=6,
    num_local_experts=6,
    n_routed_experts=6,
    num_experts_per_tok=2,
    shared_expert_intermediate_size=40,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_MLA = dict(
    num_key_value_heads=4,
    head_dim=4,
    kv_lora_rank=16,
    qk_rope_head_dim=4,
    qk_nope_head_dim=8,
    v_head_dim=8,
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
)
FAMILIES = {
    "mixtral": {},
    "qwen2_moe": {},
    "qwen3_moe": {"norm_topk_prob": False},
    "olmoe": {},
    "deepseek_v2": dict(_MLA, q_lora_rank=None, first_k_dense_replace=0, topk_method="group_limited_greedy"),
    "deepseek_v3": dict(_MLA, q_lora_rank=24, first_k_dense_replace=1),
    "phimoe": {},
    "qwen3_next": dict(
        layer_types=["linear_attention", "full_attention"],
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    ),
    "gpt_oss": {},
    "glm4_moe": {"first_k_dense_replace": 0, "n_shared_experts": 1},
    "dots1": {"n_shared_experts": 1, "first_k_dense_replace": 1},
    "ernie4_5_moe": {},
    "hunyuan_v1_moe": {},
    "granitemoe": {},
    "jamba": dict(
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=1,
        expert_layer_offset=0,
        mamba_d_state=4,
        use_mamba_kernels=False,
    ),
    "minimax": {},
    "flex_olmo": {},
    "llama4_text": {"interleave_moe_layer_step": 1},
    "jetmoe": {"kv_channels": 8, "num_key_value_heads": 4},
}
# Families smoe.nn.MoE refuses (from_hf / replace_moe_blocks raise, naming the missing feature).
REFUSED = {"phimoe": "sparsemixer", "gpt_oss": "biases", "llama4_text": "expert \\*input\\*", "jetmoe": "JetMoE"}


def tiny_config(family):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family]})


def tiny_model(family, seed=0, dtype=torch.float32, **from_config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), **from_config)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if any(s in name for s in ("experts", "gate", "router", "e_score_correction_bias")) and "norm" not in name:
                p.normal_(0.0, 0.2)
    # eval: no dropout, and routers with training-time noise (PhiMoE's jitter) route deterministically;
    # gradients flow the same.
    return model.to(dtype).eval()


def train_losses(model, ids, make_optimizer, steps=3):
    """The losses of `steps` optimizer steps of a causal LM on ids (labels = ids), as a tensor."""
    opt = make_optimizer(model.parameters())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)

"""smoe.nn.MoE against Hugging Face's own sparse MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE).

Runs with whichever transformers is installed: 4.x (per-expert nn.Linear layout) or 5.x (fused
gate_up_proj / down_proj layout); test_hf5.py re-runs this file under a transformers 5.x interpreter
when one is available. Blocks are built locally from tiny random configs (no downloads).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from smoe.integrations.hf import block_kind, copy_to_hf, from_hf, replace_moe_blocks, to_hf  # noqa: E402
from smoe.nn import MoE  # noqa: E402
from smoe.testing import assert_close  # noqa: E402
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

BACKENDS = ["reference", "cpu"]  # smoe.nn.MoE's readable path and its CPU kernels

H = 32


def _config(kind, norm_topk_prob):
    if kind == "mixtral":
        return MixtralConfig(hidden_size=H, intermediate_size=48, num_local_experts=5, num_experts_per_tok=2)
    if kind == "qwen2_moe":
        return Qwen2MoeConfig(
            hidden_size=H,
            moe_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=3,
            shared_expert_intermediate_size=40,
            norm_topk_prob=norm_topk_prob,
        )
    return Qwen3MoeConfig(
        hidden_size=H, moe_intermediate_size=24, num_experts=7, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob
    )


_BLOCKS = {"mixtral": MixtralSparseMoeBlock, "qwen2_moe": Qwen2MoeSparseMoeBlock, "qwen3_moe": Qwen3MoeSparseMoeBlock}
CASES = [("mixtral", True), ("qwen2_moe", False), ("qwen2_moe", True), ("qwen3_moe", True), ("qwen3_moe", False)]


def _block(kind, norm_topk_prob, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    block = _BLOCKS[kind](_config(kind, norm_topk_prob))
    # HF initialises some routers to zeros (all experts tie); random weights make routing well defined.
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    return block.to(dtype)


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _hf_grads(block):
    """Gradients of an HF block in smoe's layout: router [E,H], w1 [E,2F,H], w2 [E,H,F], shared."""
    from smoe.integrations.hf import _expert_projections, _is_fused

    def g(p):
        return torch.zeros_like(p) if p.grad is None else p.grad

    out = {"router": g(block.gate.weight)}
    if _is_fused(block):
        out["w1"], out["w2"] = g(block.experts.gate_up_proj), g(block.experts.down_proj)
    else:
        projs = [_expert_projections(ex) for ex in block.experts]
        out["w1"] = torch.stack([torch.cat([g(a.weight), g(b.weight)]) for a, b, _ in projs])
        out["w2"] = torch.stack([g(c.weight) for _, _, c in projs])
    if hasattr(block, "shared_expert"):
        s = block.shared_expert
        out["shared_w1"] = torch.cat([g(s.gate_proj.weight), g(s.up_proj.weight)])
        out["shared_w2"] = g(s.down_proj.weight)
        out["shared_gate_w"] = g(block.shared_expert_gate.weight).reshape(-1)
    return out


def _smoe_grads(moe):
    out = {"router": moe.router.weight.grad, "w1": moe.w1.grad, "w2": moe.w2.grad}
    if moe.shared_w1 is not None:
        out.update(shared_w1=moe.shared_w1.grad, shared_w2=moe.shared_w2.grad, shared_gate_w=moe.shared_gate_w.grad)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,norm", CASES)
def test_from_hf_matches_block_forward_and_backward(kind, norm, backend):
    block = _block(kind, norm)
    moe = from_hf(block, backend=backend)
    assert block_kind(block) == kind
    assert (moe.num_experts, moe.top_k, moe.renormalize) == (
        block.gate.weight.shape[0],
        _config(kind, norm).num_experts_per_tok,
        norm,
    )
    torch.manual_seed(1)
    x = torch.randn(2, 7, H)
    grad_out = torch.randn(2, 7, H)
    x_hf = x.clone().requires_grad_(True)
    x_sm = x.clone().requires_grad_(True)
    y_hf = _out(block(x_hf))
    y_sm = moe(x_sm)
    assert y_sm.shape == y_hf.shape
    assert_close(y_sm, y_hf)
    y_hf.backward(grad_out)
    y_sm.backward(grad_out)
    assert_close(x_sm.grad, x_hf.grad)
    want, got = _hf_grads(block), _smoe_grads(moe)
    assert set(want) == set(got)
    for name in want:
        assert got[name] is not None, name
        assert_close(got[name], want[name], msg=name)
    assert want["router"].abs().sum() > 0  # the router really is trained through the weights


@pytest.mark.parametrize("kind,norm", CASES)
def test_round_trip_reproduces_block(kind, norm):
    block = _block(kind, norm)
    again = to_hf(from_hf(block, backend="reference"), kind=kind)
    assert type(again) is type(block)
    x = torch.randn(3, 5, H)
    with torch.no_grad():
        assert torch.equal(_out(again(x)), _out(block(x)))


@pytest.mark.parametrize("kind,norm", CASES)
def test_copy_to_hf_overwrites_an_existing_block(kind, norm):
    source = _block(kind, norm, seed=0)
    target = _block(kind, norm, seed=5)
    x = torch.randn(4, H).view(1, 4, H)
    copy_to_hf(from_hf(source, backend="reference"), target)
    with torch.no_grad():
        assert torch.equal(_out(target(x)), _out(source(x)))


@pytest.mark.parametrize("kind,norm", [("mixtral", True), ("qwen2_moe", True), ("qwen3_moe", False)])
def test_from_hf_bf16_block(kind, norm):
    """bf16: smoe's error against an fp32 oracle is at most twice HF's own bf16 error (+ bf16 atol).

    HF rounds more intermediates to bf16 than smoe (routing weights, weighted expert outputs, the
    shared-expert gate), so the two bf16 results are compared through the fp32 oracle, the
    FlashAttention rule of docs/testing.md. A bf16 block routes on bf16 logits in both.
    """
    from smoe.testing import tolerance

    block = _block(kind, norm, dtype=torch.bfloat16)
    moe = from_hf(block, backend=BACKENDS[-1])
    assert moe.router_dtype == torch.bfloat16 and moe.w1.dtype == torch.bfloat16
    oracle = _block(kind, norm).float()
    oracle.load_state_dict({k: v.float() for k, v in block.state_dict().items()})
    x = torch.randn(2, 6, H, dtype=torch.bfloat16)
    with torch.no_grad():
        want = _out(oracle(x.float()))
        err_hf = (_out(block(x)).float() - want).abs().max()
        err_smoe = (moe(x).float() - want).abs().max()
    assert err_smoe <= 2 * err_hf + tolerance(torch.bfloat16)[0], (err_smoe, err_hf)


def test_to_hf_rejects_what_hf_cannot_express():
    with pytest.raises(ValueError, match="score_func"):
        to_hf(MoE(16, 8, 4, 2, score_func="sigmoid"), kind="mixtral")
    with pytest.raises(ValueError, match="renormalize=False"):
        to_hf(MoE(16, 8, 4, 2, renormalize=False), kind="mixtral")
    with pytest.raises(ValueError, match="shared expert"):
        to_hf(MoE(16, 8, 4, 2, num_shared_experts=1, shared_gate=True), kind="qwen3_moe")
    with pytest.raises(ValueError, match="capacity"):
        to_hf(MoE(16, 8, 4, 2, capacity_factor=1.0))
    with pytest.raises(ValueError, match="kind"):
        to_hf(MoE(16, 8, 4, 2), kind="llama")
    with pytest.raises(ValueError, match="block must be one of"):
        from_hf(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="cannot be overridden"):
        from_hf(_block("mixtral", True), top_k=1)


def test_to_hf_default_kind():
    assert block_kind(to_hf(MoE(16, 8, 4, 2))) == "mixtral"
    assert block_kind(to_hf(MoE(16, 8, 4, 2, renormalize=False))) == "qwen3_moe"
    assert block_kind(to_hf(MoE(16, 8, 4, 2, num_shared_experts=1, shared_gate=True))) == "qwen2_moe"


@pytest.mark.parametrize("backend", BACKENDS)
def test_replace_moe_blocks_in_a_causal_lm(backend):
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=61,
        hidden_size=H,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=5,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name or "experts" in name:
                p.normal_(0.0, 0.2)
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
        want_train = model.train()(ids, labels=ids, output_router_logits=True)
    model.eval()
    names = [n for n, m in model.named_modules() if type(m).__name__ == "MixtralSparseMoeBlock"]
    assert replace_moe_blocks(model, backend=backend, aux_loss_coef=0.01) == names and len(names) == 2
    assert sum(isinstance(m, MoE) for m in model.modules()) == 2
    with torch.no_grad():
        got = model(ids).logits
    assert_close(got, want)
    model.train()
    out = model(ids, labels=ids, output_router_logits=True)
    # HF's own load-balancing loss still sees the router logits of the replaced blocks
    assert_close(out.aux_loss, want_train.aux_loss)
    assert_close(out.loss, want_train.loss)
    out.loss.backward()
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    assert moe.router.weight.grad is not None and moe.w1.grad.abs().sum() > 0

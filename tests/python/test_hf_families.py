"""from_hf / to_hf / copy_to_hf and whole-model patching for every HF sparse MoE block family.

Runs with whichever transformers is installed (4.57: per-expert layouts; 5.x: fused); test_hf5.py
runs it again under the build/tf5 interpreter. Tiny random configs from hf_tiny (no downloads).
Per supported family: the block against smoe.nn.MoE (output, input and every parameter gradient),
round trips, and a patched causal LM against the plain one (logits, every gradient, greedy
generation with the KV cache, optimizer steps, save_pretrained -> from_pretrained of the plain class,
loading HF's state dict into the patched model, restore_moe_blocks).
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_tiny  # noqa: E402
from smoe.integrations import hf  # noqa: E402
from smoe.nn import MoE  # noqa: E402
from smoe.testing import assert_close, tolerance  # noqa: E402

TF5 = int(transformers.__version__.split(".")[0]) >= 5
SUPPORTED = [f for f in hf_tiny.FAMILIES if f not in hf_tiny.REFUSED]


def _model(family, **kw):
    if TF5:
        kw.setdefault("experts_implementation", "eager")
    return hf_tiny.tiny_model(family, **kw)


def _first_block(model):
    for name, m in model.named_modules():
        if any(c.__name__ in hf._KINDS for c in type(m).__mro__):
            return name, m
    raise AssertionError("no MoE block")


def _grads(module):
    return {
        n: (p.grad if p.grad is not None else torch.zeros_like(p))
        for n, p in module.named_parameters()
        if p.requires_grad
    }


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("family", SUPPORTED)
def test_from_hf_block_forward_and_backward(family, backend):
    _, block = _first_block(_model(family))
    moe = hf.from_hf(block, backend=backend)
    assert hf.block_kind(block) == family
    torch.manual_seed(1)
    x = torch.randn(2, 7, 32)
    g = torch.randn(2, 7, 32)
    xh, xs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yh = block(xh)
    yh = yh[0] if isinstance(yh, tuple) else yh
    ys = moe(xs)
    assert_close(ys, yh)
    yh.backward(g)
    ys.backward(g)
    assert_close(xs.grad, xh.grad, msg="input gradient")
    # every gradient, compared in HF's own keys: the smoe gradients written through the block's layout
    layout = hf._Layout(block)
    want = _grads(block)
    moe_grads = {
        k: (p.grad if p.grad is not None else torch.zeros_like(p))
        for k, p in hf._moe_tensors(moe).items()
        if isinstance(p, torch.nn.Parameter)
    }
    got = layout.write(moe_grads)
    assert set(want) <= set(got), set(want) - set(got)
    for key in want:
        assert_close(got[key].to(want[key].dtype), want[key], msg=key)
    assert want[layout.router].abs().sum() > 0


@pytest.mark.parametrize("family", SUPPORTED)
def test_round_trip_and_copy_to_hf(family):
    _, block = _first_block(_model(family))
    _, other = _first_block(_model(family, seed=7))
    moe = hf.from_hf(block, backend="reference")
    again = hf.to_hf(moe, kind=family)
    assert type(again).__name__ == type(block).__name__
    hf.copy_to_hf(moe, other)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        want = block(x)
        for b in (again, other):
            got = b(x)
            assert torch.equal(got[0] if isinstance(got, tuple) else got, want[0] if isinstance(want, tuple) else want)


@pytest.mark.parametrize("family", sorted(hf_tiny.REFUSED))
def test_refused_families_name_the_missing_feature(family):
    model = _model(family)
    with pytest.raises(ValueError, match=hf_tiny.REFUSED[family]):
        hf.replace_moe_blocks(model)
    for m in model.modules():
        if type(m).__name__ in hf.REFUSED:
            with pytest.raises(ValueError, match=hf_tiny.REFUSED[family]):
                hf.from_hf(m)
    with pytest.warns(UserWarning, match="left to transformers"):
        assert hf.replace_moe_blocks(model, strict=False) == []


def test_unknown_moe_block_and_bad_weights_raise():
    class NotAFamilyMoE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    model = torch.nn.Sequential(NotAFamilyMoE())
    with pytest.raises(ValueError, match="looks like an MoE block"):
        hf.replace_moe_blocks(model)
    _, block = _first_block(_model("qwen3_moe"))
    bad = copy.deepcopy(block)
    if hf._is_fused(bad):
        bad.experts.down_proj = torch.nn.Parameter(torch.zeros(6, 32, 23))
    else:
        bad.experts[3].down_proj = torch.nn.Linear(23, 32, bias=False)
    with pytest.raises(ValueError, match="down_proj|w2"):
        hf.from_hf(bad)
    with pytest.raises(ValueError, match="shapes|shape"):
        hf.copy_to_hf(MoE(32, 16, 6, 2, renormalize=False), block)
    with pytest.raises(ValueError, match="top_k=3"):
        hf.copy_to_hf(MoE(32, 24, 6, 3, renormalize=False), block)
    with pytest.raises(ValueError, match="score_func='softmax' \\(deepseek_v3: 'sigmoid'\\)"):
        hf.to_hf(MoE(32, 24, 6, 2, score_func="softmax", num_shared_experts=1), kind="deepseek_v3")
    _, ernie = _first_block(_model("ernie4_5_moe"))
    ernie_bad = copy.deepcopy(ernie)
    (ernie_bad.gate if hasattr(ernie_bad.gate, "norm_min") else ernie_bad).norm_min = 0.5
    with pytest.raises(ValueError, match="moe_norm_min=0.5"):
        hf.from_hf(ernie_bad)


def _loss_grads(model, ids):
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, labels=ids)
    out.loss.backward()
    return out.logits.detach(), emb.grad, out.loss.detach()


def _patched(model, **kw):
    patched = copy.deepcopy(model)
    names = hf.replace_moe_blocks(patched, **kw)
    assert names and all(isinstance(patched.get_submodule(n), hf.SmoeHFBlock) for n in names)
    return patched, names


@pytest.mark.parametrize("family", SUPPORTED)
def test_patched_model_matches_plain_model(family, tmp_path):
    model = _model(family)
    patched, names = _patched(model, backend="cpu")
    assert names == [n for n, m in model.named_modules() if any(c.__name__ in hf._KINDS for c in type(m).__mro__)]
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    want_logits, want_dx, _ = _loss_grads(model, ids)
    got_logits, got_dx, _ = _loss_grads(patched, ids)
    assert_close(got_logits, want_logits)
    assert_close(got_dx, want_dx, msg="d loss / d inputs_embeds")
    # every parameter gradient, in HF's keys (the patched model's state dict maps smoe's back)
    want = {k: v for k, v in _grads(model).items()}
    got_sd = _grad_state(patched)
    for key in want:
        assert_close(got_sd[key].to(want[key].dtype), want[key], msg=key)

    # state_dict / save_pretrained in transformers' keys; from_pretrained of the plain class
    assert set(patched.state_dict()) == set(model.state_dict())
    patched.save_pretrained(tmp_path)
    plain = type(model).from_pretrained(tmp_path, **({"experts_implementation": "eager"} if TF5 else {})).eval()
    with torch.no_grad():
        assert_close(plain(ids).logits, want_logits)
        # the plain model's weights loaded straight into a patched one
        other, _ = _patched(_model(family, seed=5))
        other.load_state_dict(model.state_dict())
        assert_close(other(ids).logits, want_logits)
        # from_pretrained, then patched
        loaded = hf.from_pretrained(type(model), tmp_path, **({"experts_implementation": "eager"} if TF5 else {}))
        assert any(isinstance(m, hf.SmoeHFBlock) for m in loaded.modules())
        assert_close(loaded.eval()(ids).logits, want_logits)
        # and back to transformers' blocks
        assert hf.restore_moe_blocks(other) == names
        assert not any(isinstance(m, hf.SmoeHFBlock) for m in other.modules())
        assert_close(other(ids).logits, want_logits)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "dots1", "mixtral"])
def test_post_init_of_a_patched_model(family):
    """transformers' post_init / _init_weights on a patched model (its common test
    test_resize_embeddings_untied_no_reinit_on_post_init): 5.x initialises router.weight and zeroes
    router.e_score_correction_bias, which the router stand-in maps to the MoE's router weight and
    selection bias."""
    model = _model(family)
    patched, _ = _patched(model)
    patched.post_init()
    blocks = [m for m in patched.modules() if isinstance(m, hf.SmoeHFBlock)]
    assert blocks
    for block in blocks:
        moe = block.moe
        router = block._modules.get(block._router_attr)
        if router is None:  # 4.x: no router stand-in
            continue
        assert router.weight is moe.router.weight
        if moe.expert_bias is None:
            assert not hasattr(router, "e_score_correction_bias")
            continue
        assert router.e_score_correction_bias is moe.expert_bias
        with torch.no_grad():
            moe.expert_bias.fill_(1.0)
        patched._init_weights(router)
        assert torch.equal(moe.expert_bias, torch.zeros_like(moe.expert_bias))


def _grad_state(patched):
    """The patched model's parameter gradients under transformers' keys (via its state-dict hooks)."""
    saved = {n: p.data for n, p in patched.named_parameters()}
    for _n, p in patched.named_parameters():
        p.data = p.grad if p.grad is not None else torch.zeros_like(p)
    sd = {k: v.clone() for k, v in patched.state_dict().items()}
    for n, p in patched.named_parameters():
        p.data = saved[n]
    return sd


@pytest.mark.parametrize("family", SUPPORTED)
def test_patched_greedy_generation_is_token_identical(family):
    model = _model(family)
    patched, _ = _patched(model)
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        got = patched.generate(ids, **kw)
    assert want.shape[1] == 11 and torch.equal(got, want)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "ernie4_5_moe"])
def test_patched_optimizer_steps_give_identical_losses(family):
    model = _model(family)
    patched, _ = _patched(model)
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(4))
    # SGD: Adam's g / sqrt(v) turns fp32 rounding noise in near-zero gradients into full-size steps
    runs = [hf_tiny.train_losses(m, ids, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) for m in (model, patched)]
    assert_close(runs[1], runs[0])
    assert runs[0][2] != runs[0][0]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_patched_bf16_within_twice_hf_error(family):
    """bf16: the patched model's error against the fp32 model is at most twice HF's own bf16 error."""
    oracle = _model(family)
    bf = copy.deepcopy(oracle).to(torch.bfloat16)
    patched, _ = _patched(bf)
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = oracle(ids).logits
        err_hf = (bf(ids).logits.float() - want).abs().max()
        err_smoe = (patched(ids).logits.float() - want).abs().max()
    assert err_smoe <= 2 * err_hf + tolerance(torch.bfloat16)[0], (err_smoe, err_hf)


def test_torch_compile_of_a_patched_model():
    model = _model("qwen3_moe")
    patched, _ = _patched(model)
    ids = torch.randint(3, 97, (2, 6))
    compiled = torch.compile(patched, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(ids).logits, model(ids).logits)

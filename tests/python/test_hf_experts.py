"""smoe as a transformers 5.x experts backend (smoe.integrations.hf.register / experts_implementation="smoe").

Needs transformers >= 5 (skips under 4.x; test_hf5.py runs this file under the build/tf5 interpreter).
Every family whose experts class uses transformers' ExpertsInterface is built from a tiny random config
(no downloads) and run with experts_implementation="eager" (transformers' own loop) and "smoe" on the
same weights: logits, the loss's gradient with respect to the input embeddings and every parameter,
greedy generation with the KV cache, a few optimizer steps, save/load through from_pretrained.
"""

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(
        "the experts interface is transformers >= 5 (test_hf5.py runs this file there)", allow_module_level=True
    )

import hf_tiny  # noqa: E402
from smoe.integrations import hf, hf_experts  # noqa: E402
from smoe.testing import assert_close, tolerance  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation  # noqa: E402

# Every family whose experts class uses the interface (PhiMoE and GPT-OSS too: the backend runs their
# experts, only their routers differ from smoe.nn.MoE's).
FAMILIES = [f for f in hf_tiny.FAMILIES if f not in ("llama4_text", "jetmoe")]


@pytest.fixture(autouse=True)
def _registered():
    hf.register(backend="cpu")
    yield
    hf.register(backend="auto")


def _model(family, seed=0, dtype=torch.float32):
    return hf_tiny.tiny_model(family, seed, dtype, experts_implementation="eager")


class _Calls:
    """Counts calls of hf_experts.experts_forward (the registered function is looked up on each call)."""

    def __init__(self, monkeypatch):
        self.n = 0
        inner = hf_experts.experts_forward

        def counted(*a, **k):
            self.n += 1
            return inner(*a, **k)

        monkeypatch.setitem(type(ALL_EXPERTS_FUNCTIONS)._global_mapping, "smoe", counted)


def _n_experts_modules(model):
    return sum(1 for m in model.modules() if hasattr(m, "_apply_gate") and hasattr(m, "down_proj"))


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), emb.grad, grads


@pytest.mark.parametrize("family", FAMILIES)
def test_smoe_experts_match_eager_forward_and_backward(family, monkeypatch):
    eager = _model(family)
    smoe_model = copy.deepcopy(eager)
    smoe_model.set_experts_implementation("smoe")
    calls = _Calls(monkeypatch)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    want_logits, want_dx, want = _loss_and_grads(eager, ids)
    got_logits, got_dx, got = _loss_and_grads(smoe_model, ids)
    assert calls.n == _n_experts_modules(smoe_model) > 0  # every experts module went through smoe, once
    assert_close(got_logits, want_logits)
    assert_close(got_dx, want_dx, msg="d loss / d inputs_embeds")
    assert set(got) == set(want)
    assert any("experts" in n for n in want)
    for name in want:
        assert_close(got[name], want[name], msg=name)


@pytest.mark.parametrize("backend", ["reference", "simt"])
@pytest.mark.parametrize("family", ["gpt_oss", "qwen2_moe"])
def test_smoe_experts_other_backends(family, backend):
    hf.register(backend=backend)
    eager = _model(family)
    smoe_model = copy.deepcopy(eager)
    smoe_model.config._experts_implementation = "smoe"  # the config attribute route
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    want_logits, want_dx, want = _loss_and_grads(eager, ids)
    got_logits, got_dx, got = _loss_and_grads(smoe_model, ids)
    assert_close(got_logits, want_logits)
    assert_close(got_dx, want_dx)
    for name in want:
        assert_close(got[name], want[name], msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_smoe_experts_greedy_generation_is_token_identical(family):
    eager = _model(family).eval()
    smoe_model = copy.deepcopy(eager)
    smoe_model.set_experts_implementation("smoe")
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        want = eager.generate(ids, **kw)
        got = smoe_model.generate(ids, **kw)
    assert want.shape[1] == 11
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_smoe_experts_optimizer_steps_give_identical_losses(family):
    models = [_model(family), None]
    models[1] = copy.deepcopy(models[0])
    models[1].set_experts_implementation("smoe")
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(4))
    losses = [hf_tiny.train_losses(m, ids, lambda p: torch.optim.AdamW(p, lr=1e-2)) for m in models]
    assert_close(losses[1], losses[0])
    assert losses[0][2] != losses[0][0]  # the steps really changed the model


def test_from_pretrained_and_from_config_with_experts_implementation_smoe(tmp_path, monkeypatch):
    eager = _model("qwen3_moe").eval()
    eager.save_pretrained(tmp_path)
    ids = torch.randint(3, 97, (2, 6))
    with torch.no_grad():
        want = eager(ids).logits
    calls = _Calls(monkeypatch)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="smoe").eval()
    assert loaded.config._experts_implementation == "smoe"
    with torch.no_grad():
        got = loaded(ids).logits
    assert calls.n == 2
    assert_close(got, want)
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(eager.config), experts_implementation="smoe")
    assert fresh.config._experts_implementation == "smoe"
    fresh.load_state_dict(eager.state_dict())
    with torch.no_grad():
        assert_close(fresh.eval()(ids).logits, want)
    assert calls.n == 4


def test_smoe_experts_bf16_within_twice_eager_error():
    """bf16: smoe's error against the fp32 model is at most twice eager's own bf16 error (+ bf16 atol)."""
    for family in ("mixtral", "gpt_oss"):
        oracle = _model(family)
        eager = copy.deepcopy(oracle).to(torch.bfloat16)
        smoe_model = copy.deepcopy(eager)
        smoe_model.set_experts_implementation("smoe")
        ids = torch.randint(3, 97, (2, 6))
        with torch.no_grad():
            want = oracle(ids).logits
            err_hf = (eager(ids).logits.float() - want).abs().max()
            err_smoe = (smoe_model(ids).logits.float() - want).abs().max()
        assert err_smoe <= 2 * err_hf + tolerance(torch.bfloat16)[0], (family, err_smoe, err_hf)


def test_torch_compile_of_a_model_on_smoe_experts():
    eager = _model("qwen3_moe").eval()
    smoe_model = copy.deepcopy(eager)
    smoe_model.set_experts_implementation("smoe")
    ids = torch.randint(3, 97, (2, 6))
    compiled = torch.compile(smoe_model, backend="aot_eager")
    with torch.no_grad():
        want = eager(ids).logits
        got = compiled(ids).logits
    assert_close(got, want)


# ---- layouts, sentinels and errors on a stand-alone experts module --------------------------------


def _experts_class(**flags):
    class Experts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            E, H, F = config.num_experts, config.hidden_size, config.intermediate_size
            self.num_experts = E
            n1 = 2 * F if flags.get("has_gate", True) else F
            w1 = "gate_up_proj" if flags.get("has_gate", True) else "up_proj"
            t = flags.get("is_transposed", False)
            setattr(self, w1, torch.nn.Parameter(0.3 * (torch.randn(E, H, n1) if t else torch.randn(E, n1, H))))
            self.down_proj = torch.nn.Parameter(0.3 * (torch.randn(E, F, H) if t else torch.randn(E, H, F)))
            if flags.get("has_bias"):
                setattr(self, w1 + "_bias", torch.nn.Parameter(0.3 * torch.randn(E, n1)))
                self.down_proj_bias = torch.nn.Parameter(0.3 * torch.randn(E, H))
            if flags.get("has_post_expert_norm"):
                self.post_expert_norm = torch.nn.LayerNorm(H)
            self.act_fn = config.act

        def forward(self, hidden_states, top_k_index, top_k_weights):  # the eager reference
            out = torch.zeros_like(hidden_states)
            t = flags.get("is_transposed", False)
            for e in range(self.num_experts):
                tok, pos = torch.where(top_k_index == e)
                if tok.numel() == 0:
                    continue
                x = hidden_states[tok]
                w1 = self.gate_up_proj if flags.get("has_gate", True) else self.up_proj
                h = x @ w1[e] if t else x @ w1[e].T
                if flags.get("has_bias"):
                    h = h + (self.gate_up_proj_bias if flags.get("has_gate", True) else self.up_proj_bias)[e]
                h = self._apply_gate(h) if flags.get("has_gate", True) else self.act_fn(h)
                y = h @ self.down_proj[e] if t else h @ self.down_proj[e].T
                if flags.get("has_bias"):
                    y = y + self.down_proj_bias[e]
                if flags.get("has_post_expert_norm"):
                    y = self.post_expert_norm(y)
                out.index_add_(0, tok, y * top_k_weights[tok, pos, None])
            return out

    if not flags.get("is_concatenated", True):

        def _apply_gate(self, gate_up):  # interleaved [g0, u0, g1, u1, ...]
            return self.act_fn(gate_up[..., ::2]) * gate_up[..., 1::2]

        Experts._apply_gate = _apply_gate
    return use_experts_implementation(Experts, **flags)


class _Cfg:
    def __init__(self, act=None, E=5, H=16, F=12):
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, F
        self.act = act if act is not None else torch.nn.SiLU()
        self._experts_implementation = "eager"


LAYOUTS = [
    {},
    {"is_transposed": True},
    {"has_bias": True},
    {"is_concatenated": False, "is_transposed": True, "has_bias": True},
    {"has_gate": False},
    {"has_gate": False, "is_transposed": True, "has_bias": True},
    {"has_post_expert_norm": True},
]


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("flags", LAYOUTS, ids=lambda f: ",".join(sorted(f)) or "plain")
def test_layouts_match_eager(flags, act):
    acts = {"silu": torch.nn.SiLU(), "gelu_tanh": torch.nn.GELU(approximate="tanh"), "relu": torch.nn.ReLU()}
    torch.manual_seed(0)
    experts = _experts_class(**flags)(_Cfg(acts[act]))
    T, K = 9, 2
    x = torch.randn(T, 16)
    idx = torch.stack([torch.randperm(5)[:K] for _ in range(T)])
    w = torch.rand(T, K)
    outs = []
    for impl in ("eager", "smoe"):
        experts.config._experts_implementation = impl
        experts.zero_grad(set_to_none=True)
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = experts(xi, idx, wi)
        y.backward(torch.cos(y.detach()))
        outs.append([y.detach(), xi.grad, wi.grad] + [p.grad for p in experts.parameters()])
    for got, want in zip(outs[1], outs[0]):
        assert_close(got, want)


@pytest.mark.parametrize("sentinel", [5, 7, -1])
def test_expert_parallel_sentinels_are_skipped(sentinel):
    torch.manual_seed(0)
    experts = _experts_class(has_bias=True)(_Cfg())
    experts._is_expert_parallel = True
    T = 8
    x = torch.randn(T, 16)
    idx = torch.randint(0, 5, (T, 2))
    idx[::3, 1] = sentinel  # these picks belong to another rank's experts
    w = torch.rand(T, 2)
    experts.config._experts_implementation = "smoe"
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = experts(xs, idx, ws)
    y.sum().backward()
    # Oracle: the eager loop over the local experts only (it never visits an index outside [0, E)).
    experts.config._experts_implementation = "eager"
    grads_smoe = [p.grad.clone() for p in experts.parameters()]
    experts.zero_grad(set_to_none=True)
    xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ye = experts(xe, idx, we)
    ye.sum().backward()
    assert_close(y, ye)
    assert_close(xs.grad, xe.grad)
    assert_close(ws.grad, we.grad)
    assert torch.all(ws.grad[::3, 1] == 0)
    for got, p in zip(grads_smoe, experts.parameters()):
        assert_close(got, p.grad)


def test_gpt_oss_experts_are_run_by_smoe_not_by_eager(monkeypatch):
    """The model's own routing is used as given: a permuted top_k_index changes the output."""
    model = _model("gpt_oss")
    model.set_experts_implementation("smoe")
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(4, 32)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 0]])
    w = torch.full((4, 2), 0.5)
    y = experts(x, idx, w)
    monkeypatch.setattr(type(experts), "forward", lambda *a, **k: pytest.fail("eager code ran"))
    y_swapped = hf_experts.experts_forward(experts, x, idx.flip(1), w)
    assert_close(y_swapped, y)  # equal weights: the order of the picks does not matter
    y_other = hf_experts.experts_forward(experts, x, (idx + 1) % 6, w)
    assert (y_other - y).abs().max() > 1e-3


def test_bad_experts_raise_naming_the_parameter():
    experts = _experts_class()(_Cfg())
    experts.config._experts_implementation = "smoe"
    x, idx, w = torch.randn(3, 16), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2)
    experts.down_proj = torch.nn.Parameter(torch.randn(5, 16, 13))
    with pytest.raises(ValueError, match="down_proj has shape"):
        experts(x, idx, w)
    del experts.down_proj
    with pytest.raises(ValueError, match="down_proj is missing"):
        experts(x, idx, w)
    experts = _experts_class()(_Cfg())
    experts.config._experts_implementation = "smoe"
    experts.gate_up_proj = torch.nn.Parameter(torch.zeros(5, 24, 16, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="gate_up_proj must be a 3-d floating"):
        experts(x, idx, w)
    experts = _experts_class()(_Cfg())
    experts.config._experts_implementation = "smoe"
    with pytest.raises(ValueError, match="hidden_states has 8 features"):
        experts(torch.randn(3, 8), idx, w)
    with pytest.raises(ValueError, match="backend"):
        hf.register(backend="gpu")


def test_import_smoe_leaves_transformers_alone():
    code = (
        "import smoe, smoe.integrations.hf, smoe.integrations.hf_experts\n"
        "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS\n"
        "assert 'smoe' not in ALL_EXPERTS_FUNCTIONS, 'registered on import'\n"
        "smoe.integrations.hf.register()\n"
        "assert 'smoe' in ALL_EXPERTS_FUNCTIONS\n"
        "smoe.integrations.hf.unregister()\n"
        "assert 'smoe' not in ALL_EXPERTS_FUNCTIONS\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

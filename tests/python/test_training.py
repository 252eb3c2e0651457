"""smoe.nn.MoE inside training loops: aux-loss scaling, accumulation, GradScaler, checkpointing, autocast,
token masks, router jitter, global / sequence balance losses, per-step bias balancing.

Oracles are written here from the formulas (Switch / HF Mixtral balance loss, ST-MoE z-loss, DeepSeek-V3
sequence-wise loss and bias update), or are smoe.reference / the same layer run on the unmasked tokens.
The multi-process (gloo) tests are in test_training_dist.py.
"""

import copy
import os
import subprocess
import sys
import warnings

import pytest
import smoe.nn
import torch
import torch.nn as nn
from conftest import subprocess_env  # noqa: E402
from smoe.nn import AuxLossUnusedWarning, MoE
from smoe.nn.experts import RoutedExperts
from smoe.reference import moe_layer
from smoe.testing import assert_close
from torch.utils.checkpoint import checkpoint

H, F, E, K = 16, 12, 6, 2
BACKENDS = ["reference", "cpu", "simt"]
AUX, ZC = 0.1, 0.01
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _layer(backend, seed=0, top_k=K, **kw):
    torch.manual_seed(seed)
    return MoE(H, F, E, top_k, backend=backend, **kw)


# ------------------------------------------------------------------ oracle aux losses (written from the papers)
def _oracle_aux(x, router_weight, top_k=K):
    """(switch balance loss, z-loss) of x [T,H] for router_weight [E,H], softmax routing without bias."""
    logits = x.float() @ router_weight.float().t()
    scores = torch.softmax(logits, dim=-1)
    experts = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :top_k]
    counts = torch.bincount(experts.reshape(-1), minlength=router_weight.shape[0]).float()
    T = x.shape[0]
    balance = router_weight.shape[0] * torch.sum(counts / T * scores.mean(dim=0))
    z = torch.logsumexp(logits, dim=-1).square().mean()
    return balance, z


def _task(y, g):
    return (y.float() * g).sum() / g.numel()


SCALINGS = ["c*loss", "accumulate4", "gradscaler-fp16", "gradscaler-bf16"]


def _router_grad_case(case, backend, mode="loss", steps=1, ckpt=None, top_k=K):
    """Train one copy with the layer's aux loss (mode "loss": added to the loss; "attach": the scale hook) and
    one oracle copy (coefficients 0, the oracle's aux added to its loss before scaling) through `steps`
    optimizer steps of `case`; returns (ours, oracle) router gradients of the last step and router weights."""
    torch.manual_seed(1)
    N = 4 if case == "accumulate4" else 1
    xs = [torch.randn(10, H) for _ in range(N)]
    gs = [torch.randn(10, H) for _ in range(N)]
    # mode "legacy" (the table only): attach without setting the scale, i.e. the former inject-1 design
    ours = _layer(
        backend, top_k=top_k, aux_loss_coef=AUX, z_loss_coef=ZC, aux_loss_mode="attach" if mode == "legacy" else mode
    )
    oracle = _layer(backend, top_k=top_k)
    oracle.load_state_dict(ours.state_dict())
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.5)
    opt_r = torch.optim.SGD(oracle.parameters(), lr=0.5)
    amp = {"gradscaler-fp16": torch.float16, "gradscaler-bf16": torch.bfloat16}.get(case)
    c = 0.5 if case == "c*loss" else 1.0
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if amp is not None else None

    def run(layer, opt, add_oracle):
        opt.zero_grad(set_to_none=True)
        for x, g in zip(xs, gs):
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                if ckpt is None or add_oracle:
                    y = layer(x)
                else:
                    y = checkpoint(layer, x.clone().requires_grad_(True), use_reentrant=ckpt == "reentrant")
            loss = _task(y, g)
            if add_oracle:
                bal, z = _oracle_aux(x, layer.router.weight, top_k)
                loss = loss + AUX * bal + ZC * z
            elif mode == "loss":
                loss = loss + smoe.nn.aux_loss(layer)
            loss = c * loss / N
            if scaler is not None:
                if mode == "attach" and not add_oracle:
                    smoe.nn.set_aux_loss_scale(layer, c / N * scaler.get_scale())
                scaler.scale(loss).backward()
            else:
                if mode == "attach" and not add_oracle:
                    smoe.nn.set_aux_loss_scale(layer, c / N)
                loss.backward()
        if scaler is not None:
            scaler.unscale_(opt)
        grad = layer.router.weight.grad.clone() / c  # the gradient of the unscaled loss
        if scaler is not None:
            scaler.step(opt)
        else:
            opt.step()
        return grad

    for _ in range(steps):
        g_o = run(ours, opt_o, False)
        g_r = run(oracle, opt_r, True)
        if scaler is not None:
            scaler.update()
    return g_o, g_r, ours.router.weight.detach(), oracle.router.weight.detach()


def router_grad_errors(case, backend, mode="loss"):
    g_o, g_r, _, _ = _router_grad_case(case, backend, mode)
    err = (g_o - g_r).abs()
    return float(err.max()), float((err / g_r.abs().clamp(min=1e-6)).max()), float(g_r.abs().max())


@pytest.mark.parametrize("mode", ["loss", "attach"])
@pytest.mark.parametrize("case", SCALINGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_router_gradient_matches_add_to_loss_oracle(backend, case, mode):
    g_o, g_r, w_o, w_r = _router_grad_case(case, backend, mode, steps=2)
    assert g_r.abs().max() > 0
    # the router runs in fp32 under autocast; its gradient is compared with the table for the expert dtype
    dtype = {"gradscaler-fp16": torch.float16, "gradscaler-bf16": torch.bfloat16}.get(case, torch.float32)
    assert_close(g_o, g_r, dtype=dtype, msg=f"router grad {case}")
    assert_close(w_o, w_r, dtype=dtype, msg=f"router weight after the optimizer steps {case}")


@pytest.mark.parametrize("ckpt", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("case", SCALINGS)
def test_router_gradient_oracle_under_checkpoint(case, ckpt):
    """Mode "loss" under both checkpoint variants: the reentrant recompute injects the gradient the loss sent
    into layer.aux_loss (c / N * GradScaler's scale), measured by its probe."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", AuxLossUnusedWarning)
        g_o, g_r, w_o, w_r = _router_grad_case(case, "cpu", "loss", steps=2, ckpt=ckpt)
    dtype = {"gradscaler-fp16": torch.float16, "gradscaler-bf16": torch.bfloat16}.get(case, torch.float32)
    assert_close(g_o, g_r, dtype=dtype, msg=f"router grad {case} {ckpt}")
    assert_close(w_o, w_r, dtype=dtype, msg=f"router weight {case} {ckpt}")


def test_aux_gradient_scales_with_the_loss():
    """The aux part of the router gradient follows c: the failure of the identity-injects-1 design."""
    torch.manual_seed(0)
    x = torch.randn(12, H)
    grads = []
    for c in (1.0, 0.25):
        layer = _layer("cpu", aux_loss_coef=AUX, z_loss_coef=ZC)
        (c * (layer(x).sum() * 0.0 + smoe.nn.aux_loss(layer))).backward()
        grads.append(layer.router.weight.grad)
    assert grads[0].abs().max() > 0
    assert_close(grads[1], 0.25 * grads[0])


def test_unused_aux_loss_warns():
    layer = _layer("cpu", aux_loss_coef=AUX)
    x = torch.randn(8, H)
    layer(x).sum().backward()  # the aux loss is never added
    with pytest.warns(AuxLossUnusedWarning, match="received no gradient"):
        y = layer(x)
    (y.sum() + smoe.nn.aux_loss(layer)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AuxLossUnusedWarning)
        (layer(x).sum() + smoe.nn.aux_loss(layer)).backward()  # the previous one was used: no warning
        layer.eval()
        layer(x)  # eval forwards are never pending
        layer(x)
        layer.train()
        with torch.no_grad():
            layer(x)  # no graph, nothing to backpropagate
        (layer(x).sum() + smoe.nn.aux_loss(layer)).backward()
        (layer(x).sum() + smoe.nn.aux_loss(layer)).backward()


def test_aux_loss_helper_sums_layers_and_attach_mode_detaches():
    torch.manual_seed(0)
    model = nn.Sequential(MoE(H, F, E, K, aux_loss_coef=AUX, z_loss_coef=ZC), MoE(H, F, E, K, aux_loss_coef=0.2))
    assert float(smoe.nn.aux_loss(model)) == 0.0  # before any forward
    x = torch.randn(5, H)
    model(x)
    a, b = model[0], model[1]
    assert_close(smoe.nn.aux_loss(model), AUX * a.last_aux_loss + ZC * a.last_z_loss + 0.2 * b.last_aux_loss)
    assert smoe.nn.aux_loss(model).requires_grad
    att = MoE(H, F, E, K, aux_loss_coef=AUX, aux_loss_mode="attach")
    att(x)
    assert not att.aux_loss.requires_grad
    assert_close(att.aux_loss, AUX * att.last_aux_loss)


# ------------------------------------------------------------------ bias balancing, once per step
class _Block(nn.Module):
    def __init__(self, backend, ckpt=None, top_k=K, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(H, H)
        self.moe = MoE(
            H,
            F,
            E,
            top_k,
            backend=backend,
            score_func="sigmoid",
            bias_balancing=True,
            bias_update_rate=0.01,
            router_jitter_noise=0.1,
            **kw,
        )
        self.ckpt = ckpt

    def forward(self, x):
        h = self.inp(x)
        if self.ckpt is None:
            return self.moe(h)
        return checkpoint(self.moe, h, use_reentrant=self.ckpt == "reentrant")


def _train(model, batches, micro=2):
    """SGD steps over `batches` in micro-batches of `micro`, end_step after each; returns the biases after each
    step, the output of the last forward, the parameter gradients of the last step and each step's loads."""
    torch.manual_seed(123)  # the jitter noise: the same draws in every run
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = smoe.nn.end_step_after(opt, model)
    biases, loads = [], []
    for step in range(0, len(batches), micro):
        opt.zero_grad(set_to_none=True)
        load = torch.zeros(E, dtype=torch.int64)
        for x in batches[step : step + micro]:
            y = model(x)
            load += model.moe.last_stats["routed_per_expert"].long()
            ((y.square().mean() + smoe.nn.aux_loss(model)) / micro).backward()
        assert torch.equal(model.moe.step_counts, load)  # every micro-batch once, no recompute
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        assert not model.moe.step_counts.any()
        biases.append(model.moe.expert_bias.clone())
        loads.append(load)
    hook.remove()
    return biases, y.detach(), grads, loads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "ckpt,mode", [("non-reentrant", "loss"), ("reentrant", "loss"), ("reentrant", "attach"), ("reentrant", None)]
)
def test_checkpoint_bitwise_equal_and_bias_once_per_step(backend, ckpt, mode):
    kw = {} if mode is None else dict(aux_loss_coef=AUX, z_loss_coef=ZC, aux_loss_mode=mode)
    torch.manual_seed(3)
    batches = [torch.randn(2, 5, H) for _ in range(4)]
    plain = _Block(backend, **kw)
    ck = _Block(backend, ckpt=ckpt, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AuxLossUnusedWarning)  # every aux loss reached the gradients
        b0, y0, g0, loads = _train(plain, batches)
        b1, y1, g1, _ = _train(ck, batches)
    assert torch.equal(y0, y1)
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n
    bias = torch.zeros(E, dtype=torch.float64)
    for step, load in enumerate(loads):
        assert torch.equal(b0[step], b1[step])
        load = load.double()
        bias += 0.01 * torch.sign(load.mean() - load)  # exactly one update per step, from both micro-batches
        assert_close(b0[step], bias.float())
    assert b0[-1].abs().sum() > 0


def test_reentrant_checkpoint_without_aux_in_the_loss_warns():
    block = _Block("cpu", ckpt="reentrant", aux_loss_coef=AUX)
    x = torch.randn(2, 5, H, requires_grad=True)
    with pytest.warns(AuxLossUnusedWarning, match="reentrant"):
        block(x).sum().backward()


def test_eval_and_no_step_leave_the_bias_alone():
    layer = _layer("cpu", score_func="sigmoid", bias_balancing=True, bias_update_rate=0.01)
    x = torch.randn(30, H)
    layer.eval()
    layer(x)
    assert not layer.step_counts.any()
    layer.end_step()
    assert not layer.expert_bias.any()
    layer.train()
    layer(x)
    layer(x)
    assert not layer.expert_bias.any()
    assert int(layer.step_counts.sum()) == 2 * 30 * K


def test_forgotten_end_step_warns(monkeypatch):
    import smoe.nn.moe as moe_module

    monkeypatch.setattr(moe_module, "_STALE_FORWARDS", 3)
    layer = _layer("cpu", score_func="sigmoid", bias_balancing=True)
    x = torch.randn(4, H)
    layer(x)
    layer(x)
    with pytest.warns(UserWarning, match="without end_step"):
        layer(x)
    layer.end_step()
    assert layer.expert_bias.abs().sum() > 0 and not layer.step_counts.any()


@pytest.mark.parametrize("to", ["bf16", "half", "double", "to-dtype"])
def test_dtype_moves_keep_bias_fp32_and_router_dtype(to):
    torch.manual_seed(0)
    layer = MoE(H, F, E, K, score_func="sigmoid", bias_balancing=True, num_shared_experts=1)
    with torch.no_grad():
        layer.expert_bias.uniform_(-0.2, 0.2)
    bias = layer.expert_bias.clone()
    router = layer.router.weight.detach().clone()
    dtype = {"bf16": torch.bfloat16, "half": torch.float16, "double": torch.float64, "to-dtype": torch.bfloat16}[to]
    if to == "half":
        layer.half()
    elif to == "double":
        layer.double()
    else:
        layer.to(dtype)
    assert layer.w1.dtype == dtype and layer.shared_w1.dtype == dtype
    assert layer.expert_bias.dtype == torch.float32 and torch.equal(layer.expert_bias, bias)
    assert layer.router.weight.dtype == torch.float32 and torch.equal(layer.router.weight, router)
    assert layer.step_counts.dtype == torch.int64
    if dtype != torch.float64:  # f64 expert weights with f32 routing weights: issue 9's f64 routing path
        y = layer(torch.randn(7, H, dtype=dtype))
        assert y.dtype == dtype
    layer.end_step()
    assert layer.expert_bias.dtype == torch.float32
    # the router follows router_dtype, not .to()
    low = MoE(H, F, E, K, router_dtype=torch.bfloat16).double()
    assert low.router.weight.dtype == torch.bfloat16 and low.w1.dtype == torch.float64


# ------------------------------------------------------------------ autocast
@pytest.mark.parametrize("backend", ["cpu", "simt"])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", [torch.float32, "amp"])
def test_autocast_matches_reference(backend, amp, x_dtype):
    kw = dict(num_shared_experts=1, shared_gate=True, aux_loss_coef=AUX, z_loss_coef=ZC)
    ours = _layer(backend, **kw)
    ref = _layer("reference", **kw)
    ref.load_state_dict(ours.state_dict())
    torch.manual_seed(5)
    x = torch.randn(2, 6, H, dtype=amp if x_dtype == "amp" else torch.float32)
    g = torch.randn(2, 6, H)
    out = {}
    for name, layer in (("ours", ours), ("ref", ref)):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=amp):
            y = layer(xx)
        assert y.dtype == amp
        ((y.float() * g).sum() + smoe.nn.aux_loss(layer)).backward()
        assert layer.w1.grad.dtype == torch.float32 and layer.router.weight.grad.dtype == torch.float32
        out[name] = (
            y.detach(),
            xx.grad,
            {n: p.grad for n, p in layer.named_parameters()},
            layer.last_aux_loss,
            layer.last_z_loss,
        )
    assert_close(out["ours"][0], out["ref"][0], msg="output")
    assert_close(out["ours"][1], out["ref"][1], dtype=amp, msg="grad x")
    for n, gr in out["ref"][2].items():
        assert_close(out["ours"][2][n], gr, dtype=amp, msg=f"grad {n}")
    assert_close(out["ours"][3], out["ref"][3], msg="aux")
    assert_close(out["ours"][4], out["ref"][4], msg="z")


def test_autocast_experts_in_amp_dtype_router_in_fp32():
    """Under autocast the experts compute what an amp-dtype copy of the layer computes; the router keeps fp32
    (the router logits are the fp32 input's, not a rounded one's)."""
    layer = _layer("cpu")
    low = copy.deepcopy(layer).to(torch.bfloat16)  # router stays fp32 (router_dtype)
    x = torch.randn(9, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    stats = layer.last_stats["routed_per_expert"].clone()
    out = moe_layer(
        x.bfloat16(),
        layer.router.weight,
        layer.w1.bfloat16(),
        layer.w2.bfloat16(),
        top_k=K,
        renormalize=True,
        router_x=x,
    )
    assert_close(y, out.y)
    assert torch.equal(stats.long(), out.routed_per_expert)
    assert low(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="x must have the dtype of the expert weights"):
        layer(x.bfloat16())  # without autocast a dtype mismatch still raises


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_cuda_matches_reference(amp):
    ours = _layer("cuda").cuda()
    ref = _layer("reference").cuda()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, H, device="cuda")
    with torch.autocast("cuda", dtype=amp):
        y, yr = ours(x), ref(x)
    assert y.dtype == amp
    assert_close(y, yr)


# ------------------------------------------------------------------ token_mask
MASK_CONFIGS = {
    "dropless": dict(),
    "capacity": dict(capacity_factor=0.75),
    "bias": dict(score_func="sigmoid", bias_balancing=True),
    "global": dict(aux_loss_type="global"),
    "shared": dict(num_shared_experts=1, shared_gate=True),
    "expert-choice": dict(expert_choice=True, aux_loss_coef=0.0),
}


@pytest.mark.parametrize("name", list(MASK_CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_mask_equals_unmasked_tokens_alone(backend, name):
    kw = dict(aux_loss_coef=AUX, z_loss_coef=ZC)
    kw.update(MASK_CONFIGS[name])
    masked = _layer(backend, **kw)
    alone = _layer(backend, **kw)
    alone.load_state_dict(masked.state_dict())
    if masked.expert_bias is not None:
        with torch.no_grad():
            masked.expert_bias.uniform_(-0.2, 0.2)
            alone.expert_bias.copy_(masked.expert_bias)
    torch.manual_seed(7)
    x = torch.randn(3, 6, H)
    mask = torch.rand(3, 6) > 0.4
    mask[0, 0] = True
    g = torch.randn(3, 6, H)
    xm = x.clone().requires_grad_(True)
    y = masked(xm, token_mask=mask)
    ((y * g).sum() + masked.aux_loss).backward()
    xa = x[mask].clone().requires_grad_(True)
    ya = alone(xa)
    ((ya * g[mask]).sum() + alone.aux_loss).backward()
    assert_close(y[mask], ya)
    if masked.num_shared_experts:
        shared_only = _layer(backend, **kw)
        shared_only.load_state_dict(masked.state_dict())
        with torch.no_grad():
            shared_only.w2.zero_()  # routed experts contribute 0: what remains is the shared expert
            want = shared_only(x)
        assert_close(y[~mask].detach(), want[~mask])
    else:
        assert not y[~mask].any()
    assert_close(xm.grad[mask], xa.grad)
    assert not xm.grad[~mask].any() or masked.num_shared_experts
    for n, p in masked.named_parameters():
        if n.startswith("shared_"):  # the shared expert also sees the masked tokens
            continue
        assert_close(p.grad, dict(alone.named_parameters())[n].grad, msg=f"grad {n}")
    assert_close(masked.last_aux_loss, alone.last_aux_loss)
    assert_close(masked.last_z_loss, alone.last_z_loss)
    for key in masked.last_stats:
        assert torch.equal(masked.last_stats[key], alone.last_stats[key]), key
    assert torch.equal(masked.step_counts, alone.step_counts)
    masked.end_step()
    alone.end_step()
    if masked.expert_bias is not None:
        assert torch.equal(masked.expert_bias, alone.expert_bias)


def test_token_mask_all_masked_and_integer_mask():
    layer = _layer("cpu", aux_loss_coef=AUX, capacity_factor=1.0)
    x = torch.randn(2, 4, H)
    y = layer(x, token_mask=torch.zeros(2, 4, dtype=torch.bool))
    assert not y.any() and int(layer.last_stats["routed_per_expert"].sum()) == 0
    ones = layer(x, token_mask=torch.ones(2, 4, dtype=torch.int64))
    assert torch.equal(ones, layer(x))


# ------------------------------------------------------------------ router jitter
@pytest.mark.parametrize("backend", BACKENDS)
def test_router_jitter_noise(backend):
    eps = 0.3
    layer = _layer(backend, router_jitter_noise=eps)
    x = torch.randn(20, H)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    noise = torch.empty(20, H).uniform_(1.0 - eps, 1.0 + eps)  # what the layer draws, from torch's RNG
    out = moe_layer(x, layer.router.weight, layer.w1, layer.w2, top_k=K, renormalize=True, router_x=x * noise)
    assert_close(y, out.y)  # the router sees x * noise, the experts x
    torch.manual_seed(11)
    assert torch.equal(layer(x), y)  # seeded by torch's RNG
    assert not torch.equal(layer(x), y)
    layer.eval()
    plain = moe_layer(x, layer.router.weight, layer.w1, layer.w2, top_k=K, renormalize=True)
    assert_close(layer(x), plain.y)  # no noise outside training


# ------------------------------------------------------------------ global-batch and sequence balance losses
@pytest.mark.parametrize("backend", BACKENDS)
def test_global_balance_loss_accumulates_over_micro_batches(backend):
    layer = _layer(backend, aux_loss_coef=AUX, aux_loss_type="global")
    switch = _layer(backend, aux_loss_coef=AUX)
    switch.load_state_dict(layer.state_dict())
    torch.manual_seed(2)
    xs = [torch.randn(9, H) for _ in range(3)]
    for _step in range(2):
        counts = torch.zeros(E)
        tokens = 0
        for i, x in enumerate(xs):
            layer(x)
            switch(x)
            scores = torch.softmax(x @ layer.router.weight.detach().t(), dim=-1)
            experts = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :K]
            counts += torch.bincount(experts.reshape(-1), minlength=E)
            tokens += x.shape[0]
            want = E * torch.sum(counts / tokens * scores.mean(dim=0))
            assert_close(layer.last_aux_loss, want)
            if i == 0:  # one micro-batch on one rank: the switch loss
                assert_close(layer.last_aux_loss, switch.last_aux_loss)
        layer.end_step()
    layer.eval()
    layer(xs[1])
    switch(xs[1])
    assert_close(layer.last_aux_loss, switch.last_aux_loss)  # eval: this batch only


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_sequence_balance_loss_deepseek_v3(backend, score_func):
    layer = _layer(backend, aux_loss_coef=AUX, aux_loss_type="sequence", score_func=score_func)
    torch.manual_seed(4)
    B, S = 3, 7
    x = torch.randn(B, S, H)
    mask = torch.rand(B, S) > 0.3
    mask[2] = False  # a sequence with no tokens is left out of the mean
    mask[0, 0] = True
    w = layer.router.weight.detach().clone().requires_grad_(True)
    per_seq = []
    for b in range(B):
        xb = x[b][mask[b]]
        if xb.shape[0] == 0:
            continue
        logits = xb @ w.t()
        s = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
        chosen = torch.sort(s.detach(), dim=-1, descending=True, stable=True).indices[:, :K]
        f = E / (K * xb.shape[0]) * torch.bincount(chosen.reshape(-1), minlength=E).float()  # eq. 18
        P = (s / s.sum(-1, keepdim=True)).mean(0)  # eq. 19-20
        per_seq.append(torch.sum(f * P))  # eq. 17 (without alpha)
    want = torch.stack(per_seq).mean()
    (gw,) = torch.autograd.grad(AUX * want, w)
    layer(x, token_mask=mask)
    assert_close(layer.last_aux_loss, want.detach())
    layer.aux_loss.backward()
    assert_close(layer.router.weight.grad, gw)
    with pytest.raises(ValueError, match="aux_loss_type='sequence' needs x of shape"):
        layer(x.reshape(-1, H))


# ------------------------------------------------------------------ arguments
BAD = [
    (dict(aux_loss_type="batch"), "aux_loss_type must be one of"),
    (dict(aux_loss_mode="auto"), "aux_loss_mode must be one of"),
    (dict(router_jitter_noise=-0.1), "router_jitter_noise"),
    (dict(router_jitter_noise=1.0), "router_jitter_noise"),
    (dict(router_jitter_noise=float("nan")), "router_jitter_noise"),
    (dict(process_group="world"), "process_group"),
    (dict(z_loss_coef=float("inf")), "z_loss_coef"),
    (dict(bias_update_rate=float("nan")), "bias_update_rate"),
    (dict(bias_balancing="yes"), "bias_balancing"),
    (dict(expert_choice=True, aux_loss_type="global"), "aux_loss_type must be 'switch' with expert_choice"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
def test_bad_training_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoE(H, F, E, K, **kwargs)


def test_bad_forward_and_helper_arguments():
    layer = _layer("cpu")
    x = torch.randn(2, 3, H)
    with pytest.raises(ValueError, match=r"token_mask must have shape \(2, 3\)"):
        layer(x, token_mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask must be a bool"):
        layer(x, token_mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="token_mask must be a torch.Tensor"):
        layer(x, token_mask=[[True] * 3] * 2)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        smoe.nn.set_aux_loss_scale(layer, -1.0)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        smoe.nn.end_step_after(object(), layer)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        smoe.nn.aux_loss(None)


# ------------------------------------------------------------------ top-1 layers (the fused inference op)
def _fused_top1_spy(monkeypatch):
    """The answers of RoutedExperts.uses_fused_top1, one per routed-experts call (True: expert_mlp_combine_top1)."""
    taken = []
    real = RoutedExperts.uses_fused_top1

    def spy(self, *args):
        answer = real(self, *args)
        taken.append(answer)
        return answer

    monkeypatch.setattr(RoutedExperts, "uses_fused_top1", spy)
    return taken


@pytest.mark.parametrize("backend", ["cpu", "simt"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("ckpt", ["reentrant", "non-reentrant"])
def test_top1_checkpoint_bitwise_equal_and_training_never_fuses(backend, amp, ckpt, monkeypatch):
    """A top-1 layer under both checkpoint variants (with accumulation, aux loss, bias balancing, autocast): the
    reentrant first pass runs without gradients in training mode, and must not take the fused op, whose
    recompute (with gradients) would be the unfused pair (bf16 on simt: ys rounded there, not in the fused op).
    In eval mode without gradients the fused op runs and equals the unfused path within the table."""
    kw = dict(aux_loss_coef=AUX, z_loss_coef=ZC)
    torch.manual_seed(3)
    batches = [torch.randn(2, 5, H) for _ in range(4)]
    plain = _Block(backend, top_k=1, **kw)
    ck = _Block(backend, ckpt=ckpt, top_k=1, **kw)
    taken = _fused_top1_spy(monkeypatch)

    def autocast():
        return torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None)

    with warnings.catch_warnings(), autocast():
        warnings.simplefilter("error", AuxLossUnusedWarning)  # every aux loss reached the gradients
        b0, y0, g0, _ = _train(plain, batches)
        b1, y1, g1, _ = _train(ck, batches)
    assert torch.equal(y0, y1)
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n
    for a, b in zip(b0, b1):
        assert torch.equal(a, b)
    assert len(taken) == 3 * len(batches)  # plain, checkpointed forward, its recompute
    assert not any(taken)  # no training-mode forward fused, the reentrant first pass included
    plain.eval()
    taken.clear()
    with autocast():
        with torch.no_grad():
            fused = plain(batches[0])
        assert taken == [True]
        unfused = plain(batches[0])  # the block's Linear wants gradients: unfused
    assert taken == [True, False]
    assert_close(fused, unfused.detach(), msg="top-1 eval: fused vs unfused")
    with torch.inference_mode():  # inference mode fuses in training mode too: no recompute can follow
        plain.train()
        plain(batches[0])
    assert taken == [True, False, True]


@pytest.mark.parametrize("ckpt", [None, "reentrant", "non-reentrant"])
@pytest.mark.parametrize("case", SCALINGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_router_gradient_matches_add_to_loss_oracle(backend, case, ckpt):
    """The router-gradient oracle of the top-k layer (c * loss, accumulation, GradScaler fp16 / bf16) for top_k=1."""
    g_o, g_r, w_o, w_r = _router_grad_case(case, backend, "loss", steps=2, ckpt=ckpt, top_k=1)
    assert g_r.abs().max() > 0
    dtype = {"gradscaler-fp16": torch.float16, "gradscaler-bf16": torch.bfloat16}.get(case, torch.float32)
    assert_close(g_o, g_r, dtype=dtype, msg=f"top-1 router grad {case} ckpt={ckpt}")
    assert_close(w_o, w_r, dtype=dtype, msg=f"top-1 router weight after the optimizer steps {case} ckpt={ckpt}")


@pytest.mark.parametrize("case", SCALINGS)
@pytest.mark.parametrize("backend", ["cpu", "simt"])
def test_top1_training_step_matches_reference_backend(backend, case):
    """Every gradient of a top-1 layer with capacity (drops) and a shared expert, through one optimizer step of
    `case` (loss * c, 4 accumulated micro-batches, GradScaler under fp16 / bf16 autocast), equals the
    backend="reference" layer's (readable PyTorch) within the table."""
    torch.manual_seed(7)
    N = 4 if case == "accumulate4" else 1
    xs = [torch.randn(12, H) for _ in range(N)]
    gs = [torch.randn(12, H) for _ in range(N)]
    amp = {"gradscaler-fp16": torch.float16, "gradscaler-bf16": torch.bfloat16}.get(case)
    c = 0.5 if case == "c*loss" else 1.0
    kw = dict(top_k=1, capacity_factor=1.0, num_shared_experts=1, aux_loss_coef=AUX, z_loss_coef=ZC)

    def step(layer):
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)  # for GradScaler.unscale_
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if amp is not None else None
        dropped = 0
        for x, g in zip(xs, gs):
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                y = layer(x)
            dropped += int(layer.last_stats["dropped"])
            loss = c * (_task(y, g) + smoe.nn.aux_loss(layer)) / N
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        grads = {n: p.grad.clone() / c for n, p in layer.named_parameters()}
        return grads, dropped

    ours = _layer(backend, **kw)
    ref = _layer("reference", **kw)
    ref.load_state_dict(ours.state_dict())
    g_o, dropped = step(ours)
    g_r, dropped_r = step(ref)
    assert dropped == dropped_r and dropped > 0  # capacity dropped tokens in both
    dtype = amp or torch.float32
    assert set(g_o) == set(g_r)
    for n in g_o:
        assert g_r[n].abs().max() > 0, n
        assert_close(g_o[n], g_r[n], dtype=dtype, msg=f"top-1 {case}: grad of {n}")


# ------------------------------------------------------------------ the example
def test_train_loop_example_tiny():
    env = subprocess_env()
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "train_loop.py"), "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "final loss" in out.stdout


if __name__ == "__main__":  # the router-gradient error table of the note
    for backend in BACKENDS:
        for mode in ("loss", "attach", "legacy"):
            for case in SCALINGS:
                a, r, m = router_grad_errors(case, backend, mode)
                print(f"{backend:9s} {mode:6s} {case:16s} max abs {a:.3e}  max rel {r:.3e}  (max |grad| {m:.3e})")
    for ckpt in ("reentrant", "non-reentrant"):
        for case in SCALINGS:
            g_o, g_r, _, _ = _router_grad_case(case, "cpu", "loss", ckpt=ckpt)
            err = (g_o - g_r).abs()
            print(
                f"cpu loss ckpt={ckpt:13s} {case:16s} max abs {float(err.max()):.3e}  "
                f"max rel {float((err / g_r.abs().clamp(min=1e-6)).max()):.3e}"
            )


def test_meta_device_build_then_to_empty_trains():
    """A layer built on the meta device (transformers' and FSDP's deferred init) materialises with to_empty()."""
    with torch.device("meta"):
        layer = smoe.nn.MoE(16, 8, 4, 2, bias_balancing=True, aux_loss_coef=0.1)
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert layer.expert_bias.dtype == torch.float32 and not layer.expert_bias.is_meta
    x = torch.randn(5, 16)
    y = layer(x)
    (y.sum() + layer.aux_loss).backward()
    layer.end_step()
    assert torch.isfinite(layer.router.weight.grad).all()
    assert layer.expert_bias.abs().sum() > 0  # the step's counts were real and moved the bias

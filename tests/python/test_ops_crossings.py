"""How often one training step of smoe.nn.MoE crosses from Python into smoe._C (issue 8).

Each op crosses once: its workspace sizes and row bounds are computed in Python from the shapes. The
numbers pin the plain top-k layer's step so that an extra crossing (a size query, a second kernel
call) shows; docs/python.md lists them.
"""

from __future__ import annotations

import collections

import smoe
import torch
from smoe import _core


def _count(monkeypatch):
    calls = collections.Counter()
    real = _core.lib()

    class Counting:
        def __getattr__(self, name):
            fn = getattr(real, name)

            def wrapped(*a, **k):
                calls[name] += 1
                return fn(*a, **k)

            return wrapped if callable(fn) else fn

    monkeypatch.setattr(_core, "lib", lambda: Counting())
    return calls


def test_topk_layer_step_crossings(monkeypatch):
    torch.manual_seed(0)
    layer = smoe.nn.MoE(32, 48, num_experts=8, top_k=2, backend="cpu")
    x = torch.randn(64, 32, requires_grad=True)
    calls = _count(monkeypatch)
    y = layer(x)
    forward = dict(calls)
    calls.clear()
    y.square().sum().backward()
    backward = dict(calls)
    assert forward == {
        "topk_gating_forward": 1,
        "routing_plan": 1,
        "expert_mlp_forward": 1,
        "combine_forward": 1,
        "load_balancing_loss_forward": 1,
        "z_loss_forward": 1,
    }
    # expert_mlp_workspace_bytes: the expert MLP backward's workspace query (the one size still asked of the core)
    assert backward == {
        "combine_backward": 1,
        "expert_mlp_workspace_bytes": 1,
        "expert_mlp_backward": 1,
        "topk_gating_backward": 1,
    }


def test_top1_inference_crossings(monkeypatch):
    """Top-1 without a gradient in eval mode: the expert MLP and the combine are one op (the weights applied
    in the second GEMM's epilogue), one crossing fewer than expert_mlp_forward + combine_forward."""
    torch.manual_seed(0)
    layer = smoe.nn.MoE(32, 48, num_experts=8, top_k=1, backend="cpu").eval()
    x = torch.randn(64, 32)
    calls = _count(monkeypatch)
    with torch.no_grad():
        layer(x)
    assert dict(calls) == {
        "topk_gating_forward": 1,
        "routing_plan": 1,
        "expert_mlp_combine_top1_forward": 1,
        "load_balancing_loss_forward": 1,
        "z_loss_forward": 1,
    }
    # with a gradient wanted the unfused pair runs (the weights' gradient needs the unweighted ys)
    calls.clear()
    layer(x.requires_grad_(True))
    assert calls["expert_mlp_forward"] == 1 and calls["combine_forward"] == 1
    assert "expert_mlp_combine_top1_forward" not in calls
    # in training mode a forward without gradients too (the first pass of a reentrant checkpoint, which the
    # recompute must reproduce)
    calls.clear()
    with torch.no_grad():
        layer.train()(x)
    assert calls["expert_mlp_forward"] == 1 and calls["combine_forward"] == 1
    assert "expert_mlp_combine_top1_forward" not in calls

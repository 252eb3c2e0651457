"""`import smoe` alone gives the public API that README.md shows."""

import subprocess
import sys

import torch


def test_import_smoe_exposes_the_submodules():
    # A fresh interpreter, so that no other test has imported the submodules already.
    code = "import smoe; print(smoe.nn.MoE.__name__, smoe.functional.topk_gating.__name__, smoe.reference.moe_layer.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["MoE", "topk_gating", "moe_layer"]


def test_readme_usage_runs():
    import smoe

    torch.manual_seed(0)
    layer = smoe.nn.MoE(32, 48, num_experts=8, top_k=2)
    x = torch.randn(2, 5, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert int(layer.last_stats["tokens_per_expert"].sum()) == 2 * 5 * 2
    assert layer.last_aux_loss is not None and layer.last_aux_loss.dim() == 0
    assert "cpu" in smoe.BACKENDS and "reference" in smoe.BACKENDS


def test_functional_and_reference_have_the_same_ops():
    import smoe.functional as F
    import smoe.reference.ops as R

    assert F.__all__ == R.__all__
    for name in F.__all__:
        if name == "RoutingPlan":  # one NamedTuple shared by both
            assert F.RoutingPlan is R.RoutingPlan
        else:
            # functional's op is its own (custom-op backed), not the reference re-exported
            assert getattr(F, name) is not getattr(R, name), name

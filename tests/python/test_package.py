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


def test_functional_is_a_reexport_of_smoe_ops():
    import smoe.functional as F
    import smoe.ops

    for name in F.__all__:
        assert getattr(F, name) is getattr(smoe.ops, name), name


def test_ops_modules_mirror_the_bindings():
    # one Python module per binding file of an op family (csrc/bindings/<family>.cpp)
    import pathlib

    import smoe.ops

    root = pathlib.Path(__file__).resolve().parents[2]
    bindings = {p.stem for p in (root / "csrc" / "bindings").glob("*.cpp")} - {"module", "enums", "peak"}
    modules = {p.stem for p in pathlib.Path(smoe.ops.__file__).parent.glob("*.py")} - {"__init__", "_common"}
    assert bindings == modules


def test_enum_tables_come_from_the_core():
    import smoe.ops as ops
    from smoe import _core

    enums = _core.lib().enums()
    assert _core.ENUMS == enums
    assert _core._ENUMS_WITHOUT_EXTENSION == enums  # the copy read only when smoe._C is absent
    assert ops.SCORE_FUNCS == enums["score_func"] and ops.GROUP_SCORES == enums["group_score"]
    assert ops.DROP_POLICIES == enums["drop_policy"] and ops.ACTIVATIONS == enums["activation"]
    assert ops.GATED_ACTIVATIONS == enums["gated_activation"]
    names = {
        torch.float32: "f32",
        torch.float16: "f16",
        torch.bfloat16: "bf16",
        torch.float64: "f64",
        torch.int32: "i32",
        torch.int64: "i64",
        torch.uint8: "u8",
    }
    assert {names[d]: c for d, c in _core.DTYPE_CODES.items()} == enums["dtype"]
    assert _core.DEVICE_CODES == enums["device"]
    assert {b: _core.backend_code(b) for b in ("auto", "cpu", "cuda", "simt")} == enums["backend"]
    # the older CODES attribute agrees
    codes = _core.lib().CODES
    assert codes["bf16"] == enums["dtype"]["bf16"] and codes["backend_simt"] == enums["backend"]["simt"]


def test_cublas_baseline_says_what_is_missing_without_cublas():
    import pytest
    import smoe.ops
    import torch

    if smoe.ops.has_cublas():
        pytest.skip("this build has cuBLAS (the GPU suite runs it)")
    a, b = torch.ones(4, 8), torch.ones(2, 8, 3)
    offsets = torch.tensor([0, 2, 4], dtype=torch.int64)
    with pytest.raises(RuntimeError, match="grouped_gemm_cublas"):
        smoe.ops.grouped_gemm_cublas(a, b, offsets)

"""smoe.bench: FLOP count, shape parsing, and a tiny end-to-end run (table + JSON). No timing asserted."""

import json
import math
import subprocess
import sys

import pytest

from smoe.bench import Shape, format_table, layer_flops, parse_shapes, run_benchmark, write_json


def test_layer_flops_formula():
    s = Shape("x", T=4, H=3, F=5, E=2, K=2)
    fwd = 2 * 4 * 2 * 3 * 10 + 2 * 4 * 2 * 5 * 3 + 2 * 4 * 3 * 2  # GEMM1 (F1 = 2F) + GEMM2 + router
    assert layer_flops(s, "fwd") == fwd == 768
    assert layer_flops(s, "fwd+bwd") == 3 * fwd


def test_parse_shapes():
    assert [s.name for s in parse_shapes(None, quick=False)] == ["mixtral", "fine"]
    mixtral = parse_shapes("mixtral", quick=False)[0]
    assert (mixtral.T, mixtral.H, mixtral.F, mixtral.E, mixtral.K) == (2048, 1024, 3584, 8, 2)
    fine = parse_shapes("fine", quick=False)[0]
    assert (fine.T, fine.H, fine.F, fine.E, fine.K) == (2048, 1024, 512, 64, 6)
    custom = parse_shapes("64x32x16x4x2", quick=True)[0]
    assert (custom.T, custom.H, custom.F, custom.E, custom.K) == (64, 32, 16, 4, 2)
    with pytest.raises(ValueError, match="TxHxFxExK"):
        parse_shapes("64x32", quick=True)
    with pytest.raises(ValueError, match="K must be <= E"):
        parse_shapes("64x32x16x2x3", quick=True)


@pytest.mark.parametrize("with_hf", [True, False])
def test_run_benchmark_rows(with_hf, tmp_path):
    shape = parse_shapes("48x32x16x4x2", quick=True)
    results = run_benchmark(shape, dtypes=("fp32", "bf16"), warmup=0, repeats=1, with_hf=with_hf)
    impls = ["smoe", "hf_mixtral", "hf_qwen3", "dense"] if with_hf else ["smoe", "torch_loop", "dense"]
    assert [(r.dtype, r.pass_, r.impl) for r in results] == [
        (d, p, i) for d in ("fp32", "bf16") for p in ("fwd", "fwd+bwd") for i in impls]
    for r in results:
        assert r.time_ms > 0 and math.isfinite(r.gflops) and r.gflops > 0
        assert r.gflops == pytest.approx(layer_flops(shape[0], r.pass_) / (r.time_ms / 1e3) / 1e9)
        if r.impl == "dense":
            assert r.roof_fraction == pytest.approx(1.0)
    baseline = "hf_mixtral" if with_hf else "torch_loop"
    assert all(r.speedup_vs_hf == pytest.approx(1.0) for r in results if r.impl == baseline)
    table = format_table(results)
    assert "GFLOP/s" in table and "% roof" in table and "smoe" in table
    path = tmp_path / "b.json"
    write_json(results, str(path))
    data = json.loads(path.read_text())
    assert len(data["results"]) == len(results) and data["meta"]["torch"]
    assert {"shape", "dtype", "pass", "impl", "time_ms", "gflops", "roof_fraction", "speedup_vs_hf"} <= set(data["results"][0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtypes"):
        run_benchmark(parse_shapes("8x8x8x2x1", quick=True), dtypes=("fp8",))
    with pytest.raises(ValueError, match="passes"):
        run_benchmark(parse_shapes("8x8x8x2x1", quick=True), passes=("bwd",))


def test_cli_writes_json(tmp_path):
    path = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "smoe.bench", "--quick", "--shapes", "32x16x8x4x2", "--dtypes", "fp32",
                           "--repeats", "1", "--warmup", "0", "--json", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "smoe" in proc.stdout and "dense" in proc.stdout
    assert len(json.loads(path.read_text())["results"]) == 2 * 4
    bad = subprocess.run([sys.executable, "-m", "smoe.bench", "--shapes", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--shapes" in bad.stderr

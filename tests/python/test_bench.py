"""smoe.bench: FLOP count, shape parsing, the peak microkernels, and a tiny end-to-end run (table + JSON).
No timing asserted beyond sanity (positive, finite, ratios consistent with the times)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from smoe.bench import Shape, format_table, layer_flops, parse_shapes, run_benchmark, write_json


def test_layer_flops_formula():
    s = Shape("x", T=4, H=3, F=5, E=2, K=2)
    fwd = 2 * 4 * 2 * 3 * 10 + 2 * 4 * 2 * 5 * 3 + 2 * 4 * 3 * 2  # GEMM1 (F1 = 2F) + GEMM2 + router
    assert layer_flops(s, "fwd") == fwd == 768
    assert layer_flops(s, "fwd+bwd") == 3 * fwd


def test_parse_shapes():
    assert [s.name for s in parse_shapes(None, quick=False)] == ["mixtral", "fine", "deepseek"]
    ds = parse_shapes("deepseek", quick=False)[0]
    assert (ds.E, ds.K, ds.score_func, ds.n_groups, ds.topk_groups, ds.shared) == (256, 8, "sigmoid", 8, 4, 1)
    assert parse_shapes("fine-quick", quick=False)[0].name == "fine-quick"
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
    impls = (
        ["smoe", "hf_mixtral", "hf_qwen3", "torch_grouped_mm", "dense"]
        if with_hf
        else ["smoe", "torch_grouped_mm", "torch_loop", "dense"]
    )
    assert [(r.dtype, r.pass_, r.impl) for r in results] == [
        (d, p, i) for d in ("fp32", "bf16") for p in ("fwd", "fwd+bwd") for i in impls
    ]
    for r in results:
        assert r.time_ms > 0 and math.isfinite(r.gflops) and r.gflops > 0
        assert r.gflops == pytest.approx(layer_flops(shape[0], r.pass_) / (r.time_ms / 1e3) / 1e9)
        if r.impl == "dense":
            assert r.roof_fraction == pytest.approx(1.0)
        assert r.repeats == 1 and r.min_ms <= r.time_ms <= r.max_ms
        assert r.smoe_speedup > 0 and r.peak_fraction is not None and r.peak_fraction > 0
    baseline = "hf_mixtral" if with_hf else "torch_loop"
    assert all(r.speedup_vs_hf == pytest.approx(1.0) for r in results if r.impl == baseline)
    table = format_table(results)
    assert "GFLOP/s" in table and "% peak" in table and "% dense" in table and "smoe" in table
    path = tmp_path / "b.json"
    write_json(results, str(path))
    data = json.loads(path.read_text())
    assert len(data["results"]) == len(results) and data["meta"]["torch"]
    assert {"shape", "dtype", "pass", "impl", "time_ms", "gflops", "roof_fraction", "speedup_vs_hf"} <= set(
        data["results"][0]
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtypes"):
        run_benchmark(parse_shapes("8x8x8x2x1", quick=True), dtypes=("fp8",))
    with pytest.raises(ValueError, match="passes"):
        run_benchmark(parse_shapes("8x8x8x2x1", quick=True), passes=("bwd",))


def test_cli_writes_json(tmp_path):
    path = tmp_path / "out.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smoe.bench",
            "--quick",
            "--shapes",
            "32x16x8x4x2",
            "--dtypes",
            "fp32",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-memory",
            "--no-breakdown",
            "--json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "smoe" in proc.stdout and "dense" in proc.stdout
    data = json.loads(path.read_text())
    main_rows = [r for r in data["results"] if r["proc"] == "main"]
    assert len(main_rows) == 2 * 5  # smoe, hf_mixtral, hf_qwen3, torch_grouped_mm, dense; fwd and fwd+bwd
    assert data["peak"]["fp32"]["gflops"] > 0 and "memory" not in data
    bad = subprocess.run(
        [sys.executable, "-m", "smoe.bench", "--shapes", "nope"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode != 0 and "--shapes" in bad.stderr


def test_peak_microkernels():
    from smoe.bench.system import has_bf16_peak, machine_peaks, measure_peak

    p = measure_peak("fp32", seconds=0.005, repeats=2)
    assert p["gflops"] > 0 and len(p["runs"]) == 2 and p["gflops"] == max(p["runs"]) and p["threads"] >= 1
    assert p["isa"] in ("avx512 vfmadd231ps", "avx2 vfmadd231ps", "scalar")
    b = measure_peak("bf16", seconds=0.005, repeats=1)
    assert (b["gflops"] is not None and b["gflops"] > 0) == has_bf16_peak()
    peaks = machine_peaks(("fp32", "bf16"), repeats=1)
    assert peaks["fp32"]["microkernel"] == "fp32"
    assert set(peaks["bf16"]["candidates"]) == {"bf16", "amx_bf16"}
    with pytest.raises(ValueError, match="kind"):
        measure_peak("fp8")


def test_peak_binding_rejects_bad_arguments():
    from smoe import _core

    with pytest.raises(ValueError, match="kind"):
        _core.lib().measure_peak("int8", 10)
    with pytest.raises(ValueError, match="iterations"):
        _core.lib().measure_peak("fp32", 0)


def test_targets_and_ratios():
    from smoe.bench import check_targets, format_targets

    shape = parse_shapes("48x32x16x4x2", quick=True)
    results = run_benchmark(shape, dtypes=("fp32",), passes=("fwd+bwd",), warmup=0, repeats=2, with_hf=False)
    by = {r.impl: r for r in results}
    for r in results:
        assert r.smoe_speedup == pytest.approx(r.time_ms / by["smoe"].time_ms)
    targets = check_targets(results)
    peers = [t for t in targets if "ahead of" in t["target"]]
    assert {t["target"].split("ahead of ")[1] for t in peers} == {"torch_grouped_mm", "torch_loop"}
    for t in peers:
        assert t["met"] == (t["ratio"] > 1.0)
    text = format_targets(targets)
    assert "ahead of torch_loop" in text and ("met" in text or "MISSED" in text)


def test_deepseek_like_quick_row_and_peers():
    shape = [parse_shapes("deepseek", quick=True)[0]]
    results = run_benchmark(shape, dtypes=("fp32",), passes=("fwd",), warmup=0, repeats=1)
    impls = {r.impl for r in results}
    assert {"smoe", "torch_grouped_mm", "dense"} <= impls
    assert "hf_deepseek_v3" in impls or "torch_loop" in impls


def test_torch_grouped_mm_peer_matches_smoe():
    """The peers compute the same layer: torch._grouped_mm and the loop agree with smoe's output."""
    from smoe.bench.layer import make_moe
    from smoe.bench.peers import TorchGroupedMM, TorchLoop
    from smoe.testing import assert_close

    for s in (parse_shapes("fine", quick=True)[0], parse_shapes("deepseek", quick=True)[0]):
        moe = make_moe(s, torch.float32)
        x = torch.randn(1, s.T, s.H)
        want = moe(x)
        assert_close(TorchGroupedMM(moe)(x), want)
        assert_close(TorchLoop(moe)(x), want)


def test_step_memory_subprocess():
    from smoe.bench.memory import format_memory, memory_table

    rows = memory_table(parse_shapes("32x16x8x4x2", quick=True), ["fp32"], with_hf=False)
    assert [r["impl"] for r in rows] == ["smoe", "torch_loop"]
    for r in rows:
        assert r["rss_before_mb"] > 0 and r["peak_rss_mb"] >= r["rss_before_mb"] - 1
    assert "step" in format_memory(rows)


def test_retain_freed_memory_removes_first_touch_faults():
    """The fine-grained backward's instability: each step's fresh weight gradients (> 32 MB, so glibc
    maps them with mmap and unmaps them on free) fault on every page at first touch. With glibc told
    to keep freed memory, steady-state training steps fault (almost) nothing."""
    code = (
        "import sys, torch\n"
        "from smoe.bench.system import minor_faults, retain_freed_memory\n"
        "from smoe.nn import MoE\n"
        "if sys.argv[1] == 'retain': assert retain_freed_memory()\n"
        "torch.manual_seed(0)\n"
        "m = MoE(512, 512, 64, 2)  # grad_w1: 64 x [1024, 512] fp32 = 128 MiB\n"
        "x = torch.randn(128, 512, requires_grad=True)\n"
        "faults = []\n"
        "for _ in range(5):\n"
        "    for p in m.parameters(): p.grad = None\n"
        "    f0 = minor_faults(); m(x).sum().backward(); faults.append(minor_faults() - f0)\n"
        "print(min(faults[-2:]))\n"
    )
    out = {}
    for mode in ("system", "retain"):
        proc = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out[mode] = int(proc.stdout.split()[-1])
    assert out["system"] > 20000, out  # 192 MiB of fresh gradients / 4 KiB pages
    assert out["retain"] < out["system"] / 10, out


def test_breakdown_every_backend_table_and_png(tmp_path):
    from smoe import _core
    from smoe.bench.breakdown import BACKWARD_STAGES, FORWARD_STAGES, breakdown_all, format_breakdown

    shape = parse_shapes("32x16x8x4x2", quick=True)
    rows = breakdown_all(shapes=shape, dtypes=("fp32",), plots=str(tmp_path), repeats=1)
    want = [b for b in ("cpu", "reference", "simt") if b in _core.BUILT_BACKENDS]
    assert [r["backend"] for r in rows] == want
    for r in rows:
        assert set(r["stages"]) == set(FORWARD_STAGES) | (set(BACKWARD_STAGES))
        assert all(v >= 0 for v in r["stages"].values())
    text = format_breakdown(rows)
    assert "GEMM 1 bwd" in text and "routing plan" in text
    png = tmp_path / "breakdown.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_intensity_model():
    from smoe.bench.intensity import crossing_tokens, intensity, intensity_plot

    # small n: weight-bound, ~2n/bytes flop per byte; large n: saturates at 6HF / (bytes (2H + 3F))
    assert intensity(1, 1024, 512, 4) == pytest.approx(6 * 1024 * 512 / (4 * (3 * 1024 * 512 + 2 * 1024)))
    assert intensity(1e9, 1024, 512, 2) == pytest.approx(6 * 1024 * 512 / (2 * 2 * 1024), rel=1e-3)
    n = crossing_tokens(1024, 512, 2, 100.0)
    assert intensity(n, 1024, 512, 2) == pytest.approx(100.0, rel=1e-6)
    assert crossing_tokens(1024, 512, 2, 1e6) is None
    out = intensity_plot(
        str(pytest.importorskip("pathlib").Path(__import__("tempfile").mkdtemp()) / "ai.png"),
        peak_fp32=100.0,
        peak_bf16=200.0,
        bandwidth=20e9,
    )
    assert [m["name"].split(" ")[0] for m in out["machines"]] == ["CPU", "CPU", "H100"]
    assert out["machines"][0]["balance_flop_per_byte"] == pytest.approx(5.0)


def test_cli_full_run_memory_breakdown_plots(tmp_path):
    """One CLI run writes the peak, every row, the targets, the memory table, the breakdown and both PNGs."""
    path = tmp_path / "o.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smoe.bench",
            "--shapes",
            "32x16x8x4x2",
            "--dtypes",
            "fp32",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-tf5",
            "--plots",
            str(tmp_path),
            "--json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "peak:" in proc.stdout and "targets (forward+backward)" in proc.stdout
    assert "peak resident memory" in proc.stdout and "per-stage breakdown" in proc.stdout
    data = json.loads(path.read_text())
    assert {"peak", "results", "targets", "memory", "breakdown", "intensity", "malloc"} <= set(data)
    assert [m["impl"] for m in data["memory"]] == ["smoe", "hf_mixtral"]
    for png in ("breakdown.png", "arithmetic_intensity.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

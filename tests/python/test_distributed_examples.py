"""examples/train_ep.py --tiny (2 gloo ranks) and bench/dist/bench_ep.py on a small layer, as CI runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import subprocess_env  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():
    return subprocess_env()


def test_train_ep_tiny():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "train_ep.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 ranks, 8 experts (4 per rank)" in proc.stdout
    assert "replicated parameters identical on all ranks" in proc.stdout
    last = [ln for ln in proc.stdout.splitlines() if ln.startswith("trained")][-1]
    first, final = (float(v) for v in last.split("mean loss ")[1].split(" (")[0].split(" -> "))
    assert final < first, last


def test_bench_ep_prints_bytes_gloo_and_analytic_times(tmp_path):
    out = tmp_path / "ep.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "dist", "bench_ep.py"),
            "--tokens",
            "64",
            "--hidden",
            "32",
            "--ffn",
            "16",
            "--experts",
            "4",
            "--iters",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for words in (
        "bytes to other ranks per exchange",
        "measured gloo (ms)",
        "analytic NVLink 4 (450 GB/s/dir)",
        "analytic InfiniBand 400 Gb/s",
    ):
        assert words in proc.stdout, proc.stdout
    r = json.loads(out.read_text())
    # 64 tokens x top-2 = 128 rows per rank; at most all of them cross, 32 floats each.
    assert 0 < r["bytes_per_exchange_busiest"] <= 128 * 32 * 4
    assert r["bytes_per_step_busiest"] == 4 * r["bytes_per_exchange_busiest"]
    nv, ib = r["analytic_s"]["NVLink 4 (450 GB/s/dir)"], r["analytic_s"]["InfiniBand 400 Gb/s"]
    assert abs(nv - r["bytes_per_step_busiest"] / 450e9) < 1e-15 and abs(ib * 50e9 - r["bytes_per_step_busiest"]) < 1e-3
    assert r["gloo_dispatch_s"] > 0 and r["gloo_combine_s"] > 0

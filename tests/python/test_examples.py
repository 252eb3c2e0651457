"""The examples' --tiny modes (what CI runs): each trains or times, writes its PNG, prints its summary."""

import os
import subprocess
import sys

from conftest import subprocess_env  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_train_char_lm_tiny(tmp_path):
    out = tmp_path / "load.png"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "train_char_lm.py"), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert "validation loss" in proc.stdout
    assert "GFLOP/s" in proc.stdout and "hf_mixtral" in proc.stdout  # the benchmark table
    losses = [
        float(line.split("final train loss ")[1].split(",")[0])
        for line in proc.stdout.splitlines()
        if "final train loss" in line
    ]
    assert losses and losses[0] < 5.6  # below the first steps' loss (uniform guess ln 256 = 5.55)


def _run_tiny(script, tmp_path, timeout=600):
    out = tmp_path / (script.replace(".py", ".png"))
    env = subprocess_env(MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    return proc.stdout


def test_routing_over_training_tiny(tmp_path):
    stdout = _run_tiny("routing_over_training.py", tmp_path)
    line = [ln for ln in stdout.splitlines() if ln.startswith("steps ")][0]
    first, last = (float(v) for v in line.split("loss ")[1].split(";")[0].split(" -> "))
    assert last < first  # it trained
    share = float(line.split("top expert ")[1].split(" ")[0])
    assert 1 / 8 < share <= 1.0  # routing is no longer uniform over experts


def test_expert_collapse_tiny(tmp_path):
    stdout = _run_tiny("expert_collapse.py", tmp_path)
    busiest = {
        ln.split(":")[0].strip(): float(ln.split("busiest expert ")[1].split(" ")[0])
        for ln in stdout.splitlines()
        if "busiest expert" in ln
    }
    assert set(busiest) == {"none", "aux", "bias"}
    assert busiest["aux"] < busiest["none"] and busiest["bias"] < busiest["none"]  # balancing balances


def test_capacity_factor_sweep_tiny(tmp_path):
    stdout = _run_tiny("capacity_factor_sweep.py", tmp_path)
    dropped = [float(ln.split("dropped ")[1].split("%")[0]) for ln in stdout.splitlines() if "capacity factor" in ln]
    assert len(dropped) == 7 and dropped[-1] == 0.0  # dropless drops nothing
    assert all(a >= b for a, b in zip(dropped, dropped[1:]))  # more capacity, fewer drops
    assert dropped[0] > 0.0


def test_loop_vs_grouped_tiny(tmp_path):
    stdout = _run_tiny("loop_vs_grouped.py", tmp_path)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("E=")]
    assert len(lines) == 3 and all("loop" in ln and "smoe" in ln and "torch_grouped_mm" in ln for ln in lines)

"""The demo's --tiny mode (what CI runs): trains, writes the expert-load PNG, prints the benchmark."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_train_char_lm_tiny(tmp_path):
    out = tmp_path / "load.png"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_char_lm.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert "validation loss" in proc.stdout
    assert "GFLOP/s" in proc.stdout and "hf_mixtral" in proc.stdout  # the benchmark table
    losses = [float(line.split("final train loss ")[1].split(",")[0]) for line in proc.stdout.splitlines()
              if "final train loss" in line]
    assert losses and losses[0] < 5.6  # below the first steps' loss (uniform guess ln 256 = 5.55)

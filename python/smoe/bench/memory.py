"""Peak resident memory of one training step (forward + backward), smoe beside the HF loop.

Each (shape, dtype, implementation) runs in its own subprocess (`python -m smoe.bench.memory`), so one
measurement cannot inherit another's peak: the child builds the layer (and the peer), notes its
resident set (/proc/self/statm), resets the kernel's peak mark (/proc/self/clear_refs), runs a second
forward+backward step (the first warms up) and reads the peak resident set (VmHWM of /proc/self/status). Reported: the resident set before the step (weights, inputs, torch) and
the step's own peak above it ("step MB"). glibc malloc is left as it is in the child.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import resource
import subprocess
import sys
from typing import List, Optional, Sequence

import torch

__all__ = ["measure_step_memory", "memory_table", "format_memory"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _trim() -> None:
    """Return malloc's free memory to the system (glibc malloc_trim), so the step's peak counts it."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark of this process to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    """VmHWM (peak resident set of this process's address space); getrusage's ru_maxrss where missing.
    ru_maxrss alone would not do: it survives exec, so a child reports its parent's peak if larger."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_step_memory(shape_name: str, dtype: str, impl: str, with_hf: bool = True) -> dict:
    """In this process: {'rss_before_mb', 'peak_rss_mb', 'step_mb'} of one training step of `impl`."""
    from smoe.bench.layer import DTYPES, _first, _shape_by_name, make_moe
    from smoe.bench.peers import build_peers

    s = _shape_by_name(shape_name)
    moe = make_moe(s, DTYPES[dtype])
    mod = moe
    if impl != "smoe":
        peers = build_peers(moe, with_hf=with_hf)
        if impl not in peers:
            raise ValueError(f"impl {impl!r} is not available here (have {', '.join(peers)})")
        mod = peers[impl]
        del peers
    mod.train()
    x = torch.randn(1, s.T, s.H, dtype=DTYPES[dtype], requires_grad=True)
    y = _first(mod(x))  # one warm-up step: lazy initialisation is not the step's memory
    y.backward(torch.ones_like(y))
    del y
    for q in list(mod.parameters()) + [x]:
        q.grad = None
    gc.collect()
    _trim()
    before = _rss_mb()
    _reset_peak()
    y = _first(mod(x))
    y.backward(torch.ones_like(y))
    peak = _peak_rss_mb()
    return {
        "shape": s.name,
        "dtype": dtype,
        "impl": impl,
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "step_mb": peak - before,
    }


def _reference_peer(with_hf: bool, deepseek_like: bool) -> str:
    from smoe.bench.peers import transformers_major

    major = transformers_major() if with_hf else None
    if major is None:
        return "torch_loop"
    if major >= 5:
        return "hf5_eager"
    return "hf_deepseek_v3" if deepseek_like else "hf_mixtral"


def memory_table(shapes, dtypes: Sequence[str], *, with_hf: bool = True, timeout: float = 1800) -> List[dict]:
    """One subprocess per (shape, dtype, impl in smoe + the HF loop); rows as measure_step_memory returns."""
    pkg = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pkg] + [p for p in sys.path if p]))
    rows = []
    for s in shapes:
        peer = _reference_peer(with_hf, s.score_func != "softmax" or s.n_groups > 1 or s.shared > 0)
        for d in dtypes:
            for impl in ("smoe", peer):
                proc = subprocess.run(
                    [sys.executable, "-m", "smoe.bench.memory", "--shape", s.name, "--dtype", d, "--impl", impl]
                    + ([] if with_hf else ["--no-hf"]),
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    env=env,
                )
                if proc.returncode != 0:
                    raise RuntimeError(f"memory measurement {s.name} {d} {impl} failed:\n{proc.stderr[-2000:]}")
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def format_memory(rows: Sequence[dict]) -> str:
    lines = [
        "peak resident memory of one training step (subprocess each; MB):",
        f"  {'shape':<16}{'dtype':<6}{'impl':<18}{'before':>9}{'peak':>9}{'step':>9}",
    ]
    for r in rows:
        lines.append(
            f"  {r['shape']:<16}{r['dtype']:<6}{r['impl']:<18}{r['rss_before_mb']:>9.0f}"
            f"{r['peak_rss_mb']:>9.0f}{r['step_mb']:>9.0f}"
        )
    return "\n".join(lines)


def _main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m smoe.bench.memory")
    p.add_argument("--shape", required=True)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--impl", default="smoe")
    p.add_argument("--no-hf", action="store_true", help="peers without transformers (torch_loop)")
    a = p.parse_args(argv)
    try:
        print(json.dumps(measure_step_memory(a.shape, a.dtype, a.impl, with_hf=not a.no_hf)))
    except ValueError as err:
        p.error(str(err))


if __name__ == "__main__":
    _main()

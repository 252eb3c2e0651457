"""What the machine itself can do, measured in this process: the arithmetic peak and the allocator.

measure_peak(kind): smoe._C.measure_peak runs a register-only multiply-add loop (fp32: vfmadd231ps;
bf16: vdpbf16ps where the CPU has AVX512-BF16; amx_bf16: AMX tdpbf16ps tiles where the CPU has
AMX-BF16) on every thread of smoe's pool at once and returns the GFLOP/s all threads reach together
(csrc/cpu/peak.cpp). machine_peaks() keeps per dtype the fastest of them: on an AMX CPU the bf16
peak is the AMX one (torch's oneDNN bf16 matmul runs on AMX there; smoe's bf16 kernel does not). No GEMM can beat it on this machine, so
"% of peak" = achieved GFLOP/s / this figure. The loop is repeated and the best run kept (a peak is a
maximum; on a shared machine a slower run means somebody else held a core).

retain_freed_memory(): glibc's malloc hands every block above its mmap threshold (32 MB at most)
straight to mmap and returns it with munmap on free, so a training step that allocates fresh
multi-hundred-MB gradients (grad_w1 of 64 experts x [1024, 1024] is 256 MiB in fp32) pays a page
fault per 4 KiB page on first touch, every step: ~150k minor faults per fine-grained fp32 step, the
backward's run-to-run spread on a loaded machine. With mmap disabled for malloc (M_MMAP_MAX = 0) and
the heap kept on free (M_TRIM_THRESHOLD = 2 GiB), the next step's buffers come from memory that is
already mapped: 0 faults per step after the first two. The same holds without code through glibc's
environment tunables: GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from typing import Dict, Optional

__all__ = ["measure_peak", "machine_peaks", "retain_freed_memory", "minor_faults", "has_bf16_peak"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def has_bf16_peak() -> bool:
    """Whether this CPU has AVX512-BF16 (vdpbf16ps), so a bf16 peak can be measured."""
    from smoe import _core

    return bool(_core.lib().peak_has_bf16())


def measure_peak(kind: str = "fp32", *, seconds: float = 0.05, repeats: int = 3) -> Dict[str, object]:
    """Best of `repeats` runs of the `kind` microkernel, each about `seconds` long: 'fp32' (FMA),
    'bf16' (vdpbf16ps) or 'amx_bf16' (AMX tdpbf16ps tiles, Sapphire Rapids and later).

    Returns {'kind', 'gflops' (best), 'median_gflops', 'runs' (every run's GFLOP/s), 'threads', 'isa'};
    gflops is None where the CPU lacks the instruction (bf16 without AVX512-BF16).
    """
    from smoe import _core

    if kind not in ("fp32", "bf16", "amx_bf16"):
        raise ValueError(f"measure_peak: kind must be 'fp32', 'bf16' or 'amx_bf16', got {kind!r}")
    if not seconds > 0 or repeats < 1:
        raise ValueError(f"measure_peak: seconds must be > 0 and repeats >= 1, got {seconds}, {repeats}")
    lib = _core.lib()
    probe = lib.measure_peak(kind, 20_000)
    if probe["isa"] == "unsupported":
        return {
            "kind": kind,
            "gflops": None,
            "median_gflops": None,
            "runs": [],
            "threads": probe["threads"],
            "isa": "unsupported",
        }
    iters = max(1000, int(20_000 * seconds / max(probe["seconds"], 1e-6)))
    runs = [lib.measure_peak(kind, iters)["gflops"] for _ in range(repeats)]
    srt = sorted(runs)
    return {
        "kind": kind,
        "gflops": srt[-1],
        "median_gflops": srt[len(srt) // 2],
        "runs": runs,
        "threads": probe["threads"],
        "isa": probe["isa"],
    }


def machine_peaks(dtypes=("fp32", "bf16"), *, repeats: int = 5) -> Dict[str, dict]:
    """{'fp32': ..., 'bf16': ...}: per dtype the fastest microkernel this CPU has (bf16: AMX tiles where
    present, else vdpbf16ps), as measure_peak returns it plus 'microkernel' (the kind) and 'candidates'
    (every bf16 kind measured: {kind: GFLOP/s or None})."""
    out = {}
    if "fp32" in dtypes:
        out["fp32"] = dict(measure_peak("fp32", repeats=repeats), microkernel="fp32")
    if "bf16" in dtypes:
        cands = {k: measure_peak(k, repeats=repeats) for k in ("bf16", "amx_bf16")}
        best = max(cands, key=lambda k: cands[k]["gflops"] or 0.0)
        out["bf16"] = dict(cands[best], microkernel=best, candidates={k: v["gflops"] for k, v in cands.items()})
    return out


def retain_freed_memory() -> bool:
    """Make glibc malloc keep freed memory mapped for reuse (see the module docstring). Process-wide;
    returns False where malloc is not glibc's (nothing changed)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def minor_faults() -> int:
    """Minor page faults of this process so far (getrusage ru_minflt)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_name() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None

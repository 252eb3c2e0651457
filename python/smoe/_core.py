"""Glue between torch tensors and the C++ core (the extension module smoe._C).

How a tensor reaches C++: `view(t)` returns the descriptor tuple

    (data_ptr, dtype_code, device_code, device_index, shape, strides)

that csrc/bindings turns into a `smoe::TensorView` (strides in elements). The extension never sees a
torch object and never links libtorch, so one build works with every torch version; docs/python.md
explains why this is a plain tuple and not DLPack.

This module also owns the backend names ("auto", "cpu", "reference", "cuda", "simt"), the enum tables
of the core (ENUMS, from smoe._C.enums()), the argument checks shared by the ops (each names the
argument), and loads the extension with an error that says how to build it when it is missing.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

try:
    from smoe import _C  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _C = None
    _IMPORT_ERROR: Optional[ImportError] = exc
else:
    _IMPORT_ERROR = None


def _require_cuda_requested() -> bool:
    return os.environ.get("SMOE_REQUIRE_CUDA", "").strip() not in ("", "0")


def _extension_absent() -> bool:
    """True when there is no smoe._C file at all (as opposed to one that fails to load)."""
    import importlib.util

    try:
        return importlib.util.find_spec("smoe._C") is None
    except (ImportError, ValueError):
        return True


def _check_extension_loads(error: Optional[ImportError], require_cuda: bool, absent: bool) -> None:
    """Raises ImportError when smoe._C exists but cannot be loaded (a broken build: missing libcudart,
    an ABI mismatch), or when SMOE_REQUIRE_CUDA=1 and it is missing: such a build must not look like
    one without the extension, where every GPU test would be skipped."""
    if error is None:
        return
    if not absent or require_cuda:
        raise ImportError(
            f"smoe: the C++ extension smoe._C failed to load ({error}). "
            + ("SMOE_REQUIRE_CUDA=1 asks for the CUDA backend. " if require_cuda else "")
            + "Rebuild it (docs/gpu.md: pip install --no-build-isolation --no-deps -e .) or remove the "
            "stale extension file; backend='reference' needs no extension."
        ) from error


_check_extension_loads(_IMPORT_ERROR, _require_cuda_requested(), _IMPORT_ERROR is not None and _extension_absent())

__all__ = [
    "BACKENDS",
    "BUILT_BACKENDS",
    "lib",
    "view",
    "opt_view",
    "backend_code",
    "check_backend",
    "check_c_int",
    "ENUMS",
    "check_same_device",
    "check_tensor",
    "check_dims",
    "check_int",
    "check_choice",
    "INT32_MAX",
    "INT64_MAX",
]

# The C core's integer types: an int beyond them is rejected here, naming the argument, before pybind11
# or the torch schema see it.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# The enum tables of the C++ core, from the one table the binding holds (csrc/bindings/enums.cpp):
# {"backend", "dtype", "device", "score_func", "group_score", "drop_policy", "activation": {name: code},
# "gated_activation": (names,)}. Python's tables (DTYPE_CODES here, SCORE_FUNCS ... in smoe.ops) are
# built from it. _ENUMS_WITHOUT_EXTENSION is read only when smoe._C is absent (backend="reference"
# still validates its names then); tests/python/test_package.py checks that it equals smoe._C.enums().
_ENUMS_WITHOUT_EXTENSION = {
    "backend": {"auto": 0, "cpu": 1, "cuda": 2, "simt": 3},
    "dtype": {"f32": 0, "f16": 1, "bf16": 2, "f64": 3, "i32": 4, "i64": 5, "u8": 6},
    "device": {"cpu": 0, "cuda": 1},
    "score_func": {"softmax": 0, "sigmoid": 1},
    "group_score": {"max": 0, "top2_sum": 1},
    "drop_policy": {"token_order": 0, "score": 1},
    "activation": {"swiglu": 0, "geglu": 1, "gelu": 2, "relu": 3},
    "gated_activation": ("swiglu", "geglu"),
}
ENUMS = _C.enums() if hasattr(_C, "enums") else _ENUMS_WITHOUT_EXTENSION

# torch dtypes by the core's dtype names; their codes come from ENUMS.
_TORCH_DTYPES = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f64": torch.float64,
    "i32": torch.int32,
    "i64": torch.int64,
    "u8": torch.uint8,
}
DTYPE_CODES = {_TORCH_DTYPES[name]: code for name, code in ENUMS["dtype"].items()}
DEVICE_CODES = dict(ENUMS["device"])

# Backend names of the Python API: the C++ core's ("auto", "cpu", "cuda", "simt") plus "reference",
# which never reaches C++ (smoe.reference). "auto" is resolved in one place, the C++ core
# (smoe::resolve_backend: cuda for CUDA tensors, cpu for CPU tensors); Python passes it through.
_BACKEND_CODES = dict(ENUMS["backend"])
BACKENDS = ("auto", "cpu", "reference", "cuda", "simt")
# The backends this build can run: "auto" and "reference" always, the C++ ones that smoe._C reports
# ("cpu"; "simt" when the emulated CUDA backend is linked; "cuda" when nvcc built the CUDA backend).
# Without the extension "cpu" stays listed, so that lib() raises its build instructions.
_CPP_BACKENDS = tuple(_C.built_backends()) if hasattr(_C, "built_backends") else ("cpu",)
BUILT_BACKENDS = tuple(b for b in BACKENDS if b in ("auto", "cpu", "reference") or b in _CPP_BACKENDS)


def _check_cuda_built(cpp_backends: Sequence[str], require_cuda: bool) -> None:
    """SMOE_REQUIRE_CUDA=1 (scripts/gpu_check.sh sets it): ImportError unless smoe._C has the CUDA backend."""
    if require_cuda and "cuda" not in cpp_backends:
        raise ImportError(
            "smoe: SMOE_REQUIRE_CUDA=1 but this smoe._C has no CUDA backend (built backends: "
            f"{', '.join(cpp_backends)}); rebuild with SMOE_ENABLE_CUDA=ON (docs/gpu.md)"
        )


_check_cuda_built(_CPP_BACKENDS, _require_cuda_requested())


def lib():
    """The extension module; raises a RuntimeError that says how to build it when it is missing."""
    if _C is None:
        raise RuntimeError(
            "smoe's C++ extension smoe._C is not built or failed to load "
            f"({_IMPORT_ERROR}). Build it with `pip install --no-build-isolation -e .` from the "
            "repository root, or use backend='reference' (pure PyTorch)."
        )
    return _C


def check_tensor(op: str, arg: str, t, *, optional: bool = False) -> None:
    """TypeError naming the argument when `t` is not a tensor (or None where optional)."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"smoe.{op}: argument '{arg}': expected {expected}, got {type(t).__name__}")


def check_dims(op: str, arg: str, t, ndim: int, layout: str, *, optional: bool = False) -> None:
    """check_tensor, then ValueError naming the argument unless `t` has `ndim` dims."""
    check_tensor(op, arg, t, optional=optional)
    if t is not None and t.dim() != ndim:
        raise ValueError(f"smoe.{op}: argument '{arg}': expected a {ndim}-D tensor {layout}, got shape {list(t.shape)}")


def check_int(
    op: str, arg: str, value, lo: int, hi: Optional[int] = None, what: str = "", *, c_max: int = INT32_MAX
) -> None:
    """TypeError unless `value` is an int (not a bool, not a float such as 2.0); ValueError unless
    lo <= value <= hi, and value <= c_max (the C type the core holds it in: int32, or INT64_MAX)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"smoe.{op}: argument '{arg}': expected an int, got {type(value).__name__} {value!r}")
    if hi is not None and lo <= value <= hi <= c_max:
        return
    if hi is None and lo <= value <= c_max:
        return
    if hi is not None and hi <= c_max:
        rng = f"in [{lo}, {hi}]"
    elif value < lo:
        rng = f"in >= {lo}"
    else:
        rng = f"<= {c_max} (the {'int32' if c_max == INT32_MAX else 'int64'} range of the C core)"
    raise ValueError(f"smoe.{op}: argument '{arg}': expected a value {rng}{what}, got {value}")


def check_c_int(op: str, arg: str, value) -> None:
    """check_int for an argument whose range the C++ core checks: only that it is an int the core's
    int32 can hold (pybind11 would raise a TypeError that names no argument for a larger one)."""
    check_int(op, arg, value, -INT32_MAX - 1)


def check_choice(op: str, arg: str, value, choices) -> None:
    """ValueError naming the argument unless `value` is one of `choices` (a dict's keys or a sequence)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"smoe.{op}: argument '{arg}': expected one of {', '.join(repr(c) for c in choices)}, got {value!r}"
        )


def view(t: torch.Tensor, arg: str = "tensor") -> tuple:
    """The descriptor tuple of a tensor (see the module docstring)."""
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        supported = ", ".join(str(d).replace("torch.", "") for d in DTYPE_CODES)
        raise TypeError(f"argument '{arg}': expected dtype in {{{supported}}}, got {t.dtype}")
    dev = DEVICE_CODES.get(t.device.type)
    if dev is None:
        raise ValueError(
            f"argument '{arg}': expected a tensor on cpu or cuda for the C++ core, got one on {t.device.type}"
        )
    if t.dim() > 4:
        raise ValueError(f"argument '{arg}': expected at most 4 dims, got {t.dim()} ({list(t.shape)})")
    return (t.data_ptr(), code, dev, t.device.index or 0, tuple(t.shape), tuple(t.stride()))


def opt_view(t: Optional[torch.Tensor], arg: str = "tensor") -> Optional[tuple]:
    return None if t is None else view(t, arg)


def check_backend(op: str, backend) -> str:
    """Validates a backend name; returns it. ValueError for unknown names, RuntimeError for known
    backends that this build does not contain."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(
            f"smoe.{op}: argument 'backend': expected one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}"
        )
    if backend not in BUILT_BACKENDS:
        raise RuntimeError(
            f"smoe.{op}: backend {backend!r} is not in this build of smoe "
            f"(available: {', '.join(repr(b) for b in BUILT_BACKENDS)})"
        )
    return backend


def backend_code(backend: str) -> int:
    return _BACKEND_CODES[backend]


def check_same_device(op: str, named: Sequence[tuple]) -> torch.device:
    """All tensors given as (name, tensor-or-None) pairs on one device; returns it."""
    first_name, first = None, None
    for name, t in named:
        if t is None:
            continue
        if first is None:
            first_name, first = name, t
        elif t.device != first.device:
            raise ValueError(
                f"smoe.{op}: argument '{name}': expected a tensor on {first.device} "
                f"(the device of '{first_name}'), got one on {t.device}"
            )
    return first.device if first is not None else torch.device("cpu")

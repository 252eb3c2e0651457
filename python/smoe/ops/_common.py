"""What every op family of smoe.ops shares: enum tables, the execution arguments, argument checks,
output allocation from one shape function, and the per-thread CPU scratch buffer.

The pattern of a family file (smoe/ops/<family>.py, beside csrc/bindings/<family>.cpp):

  * `_<op>_shapes(...)` returns the outputs as [(shape, dtype), ...] and checks only what it needs
    to compute them (the dims it unpacks, the ints that size an output, the enum names it converts,
    int ranges the C types cannot hold). The real op and its fake both allocate from it (`empty`),
    so an output allocation is written once;
  * the torch.library custom op (real implementation: allocate, then one call into smoe._C), its
    fake (register_fake) and its autograd formula;
  * the public keyword-only function (re-exported by smoe.functional): checks the backend name and
    that the tensors share a device (the dispatcher picks the kernel from the devices), then runs
    smoe.reference for backend="reference" or the custom op otherwise.

Everything else (dtypes, layouts, sizes that must agree, value ranges) is checked by the C++ core,
whose ValueError names the argument. "auto" is resolved by the core (smoe::resolve_backend).
"""

from __future__ import annotations

import math
import threading
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from smoe import _core

# Enum names -> codes of the core (csrc/bindings/enums.cpp, the one table).
SCORE_FUNCS = dict(_core.ENUMS["score_func"])
GROUP_SCORES = dict(_core.ENUMS["group_score"])
ACTIVATIONS = dict(_core.ENUMS["activation"])
GATED_ACTIVATIONS = tuple(_core.ENUMS["gated_activation"])
DROP_POLICIES = dict(_core.ENUMS["drop_policy"])


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, routing weights, losses: f32, or f64 when the input is f64 (gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stream(t: Tensor) -> int:
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def exec_args(backend: str, ref: Tensor) -> dict:
    """The backend code ("auto" included: the core resolves it) and the stream of ref's device."""
    return {"backend": _core.backend_code(backend), "stream": _stream(ref)}


def code(op: str, arg: str, table: dict, value) -> int:
    """The core's code of an enum name; ValueError naming the argument for an unknown one."""
    _core.check_choice(op, arg, value, table)
    return table[value]


def dims(op: str, named, *, optional: bool = False) -> None:
    """Each (arg, tensor, ndim, layout) is a tensor with ndim dims (None allowed where optional)."""
    for arg, t, ndim, layout in named:
        _core.check_dims(op, arg, t, ndim, layout, optional=optional)


def empty(ref: Tensor, specs) -> List[Tensor]:
    """Fresh tensors on ref's device for [(shape, dtype), ...] (dtype None: ref's dtype)."""
    return [ref.new_empty(shape, dtype=dtype if dtype is not None else ref.dtype) for shape, dtype in specs]


def v(t: Optional[Tensor], name: str):
    return _core.opt_view(t, name)


def contig(t: Optional[Tensor]) -> Optional[Tensor]:
    """Gradients from autograd may be expanded (stride 0) or otherwise strided; the core reads dense rows."""
    return None if t is None else t.contiguous()


def check_backend(op: str, backend, required: Sequence[tuple] = (), optional: Sequence[tuple] = ()) -> str:
    """The public functions' own checks: the backend name (ValueError; RuntimeError when this build
    lacks it), each (name, tensor) a tensor (None allowed for `optional`), all on one device."""
    _core.check_backend(op, backend)
    for name, t in required:
        _core.check_tensor(op, name, t)
    for name, t in optional:
        _core.check_tensor(op, name, t, optional=True)
    _core.check_same_device(op, list(required) + list(optional))
    return backend


# ---- scratch -------------------------------------------------------------------------------------


class _ScratchCache(threading.local):
    buf: Optional[Tensor] = None


_scratch_cache = _ScratchCache()
_SCRATCH_ALIGN = 64  # bytes: every piece carved by _scratch_views starts on a cache line


def _scratch(nbytes: int, device: torch.device) -> Tensor:
    """uint8 [nbytes] for the duration of ONE op call: it must never be returned, saved or outlive the call.

    On the CPU the buffer is cached per thread and reused by the next call: torch's CPU allocator hands
    large blocks straight to mmap, so a fresh 100-250 MB workspace costs a page fault per 4 KiB page on
    first touch (~0.6 ms/MB on the 2-core bench machine, as much as a third of the expert MLP's backward).
    One live user per thread at a time; different threads get different buffers. Other devices use
    torch's caching allocator, which already reuses memory (and orders it on the stream).
    release_scratch() frees the cached buffer.
    """
    if device.type != "cpu":
        return torch.empty((nbytes,), dtype=torch.uint8, device=device)
    buf = _scratch_cache.buf
    if buf is None or buf.numel() < nbytes:
        _scratch_cache.buf = None  # free the smaller one first
        buf = torch.empty((nbytes,), dtype=torch.uint8)
        _scratch_cache.buf = buf
    return buf[:nbytes]


def release_scratch() -> None:
    """Free this thread's cached CPU scratch buffer (workspaces and no-grad intermediates of smoe ops)."""
    _scratch_cache.buf = None


def _scratch_views(device: torch.device, dtype: torch.dtype, shapes) -> List[Tensor]:
    """Disjoint dense tensors of `shapes` carved from one _scratch buffer (same lifetime rules)."""
    elem = torch.empty((), dtype=dtype).element_size()
    sizes = [math.prod(s) * elem for s in shapes]
    starts, total = [], 0
    for n in sizes:
        starts.append(total)
        total += -(-n // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
    buf = _scratch(total, device)
    return [buf[o : o + n].view(dtype).view(s) for o, n, s in zip(starts, sizes, shapes)]


def workspace(nbytes: int, device: torch.device) -> Optional[Tensor]:
    """A workspace of nbytes for one core call (None when 0): the CPU scratch buffer or a fresh tensor."""
    return _scratch(nbytes, device) if nbytes > 0 else None

"""smoe: sparse mixture-of-experts kernels for PyTorch.

    import smoe.functional as F          # the ops (torch custom ops over the C++ core)
    import smoe.reference                # the same ops, and the whole layer, in readable PyTorch
    from smoe.nn import MoE              # the drop-in layer

Backends: "auto" (cpu for CPU tensors, cuda for CUDA tensors), "cpu", "reference"; see docs/python.md.
"""

from smoe import _core

__version__ = "0.1.0"

BACKENDS = _core.BUILT_BACKENDS


def num_threads() -> int:
    """Threads of the CPU backend's pool (default: hardware threads, or $SMOE_NUM_THREADS)."""
    return _core.lib().num_threads()


def set_num_threads(n: int) -> None:
    """Resizes the CPU backend's pool. Results do not depend on the thread count."""
    _core.lib().set_num_threads(n)


__all__ = ["BACKENDS", "num_threads", "set_num_threads", "__version__"]

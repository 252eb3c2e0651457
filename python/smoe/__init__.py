"""smoe: sparse mixture-of-experts kernels for PyTorch.

    import smoe
    smoe.functional                      # the ops (from smoe.ops: one module per op family, torch custom ops over the C++ core)
    smoe.reference                       # the same ops, and the whole layer, in readable PyTorch
    smoe.nn.MoE                          # the drop-in layer

Backends: "auto" (cpu for CPU tensors, cuda for CUDA tensors), "cpu", "reference", "simt" (the CUDA
kernels run by the SIMT emulator), "cuda" (builds with nvcc); see docs/python.md.
"""

from smoe import _core, functional, nn, reference  # noqa: E402  (public submodules, available after `import smoe`)

__version__ = "0.1.0"

BACKENDS = _core.BUILT_BACKENDS


def num_threads() -> int:
    """Threads of the CPU backend's pool (default: hardware threads, or $SMOE_NUM_THREADS)."""
    return _core.lib().num_threads()


def set_num_threads(n: int) -> None:
    """Resizes the CPU backend's pool. Results do not depend on the thread count.

    RuntimeError when the system cannot start that many threads: the pool then keeps the threads it
    got (num_threads() says how many) and stays usable. After fork() a child gets a fresh pool of
    the same size on its first op."""
    _core.check_int("set_num_threads", "n", n, 1)
    _core.lib().set_num_threads(n)


__all__ = ["BACKENDS", "functional", "nn", "reference", "num_threads", "set_num_threads", "__version__"]

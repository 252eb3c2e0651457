"""The multi-process tests' launcher: smoe.distributed.run_local (gloo ranks, bounded time)."""

from smoe.distributed.launch import run_local as run_ranks  # noqa: F401

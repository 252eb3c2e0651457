"""run_local: run a function on N local gloo ranks (spawned processes), bounded in time.

For tests, examples and benchmarks on one CPU machine; multi-node jobs use torchrun instead. Every rank
runs fn(rank, world, *args) after init_process_group("gloo") on a file store; an exception on any rank
fails the call with that rank's traceback; a run past `timeout` seconds kills the workers and raises
TimeoutError. collective_timeout bounds every collective of the group.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time

__all__ = ["run_local"]


def _entry(rank, world, store, collective_timeout, threads, barrier, fn, args):
    import torch
    import torch.distributed as dist

    if threads:
        torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=collective_timeout),
    )
    try:
        fn(rank, world, *args)
        if barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_local(
    fn,
    world: int,
    *args,
    timeout: float = 120.0,
    collective_timeout: float = 60.0,
    threads: int = 1,
    barrier: bool = True,
) -> None:
    """fn must be importable by the spawned processes (a module-level function). barrier=False skips the
    final barrier (for a test whose ranks leave the group broken on purpose)."""
    import torch.multiprocessing as mp

    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an integer >= 1, got {world!r}")
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "store")
        ctx = mp.start_processes(
            _entry,
            args=(world, store, collective_timeout, threads, barrier, fn, args),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world} ranks did not finish within {timeout} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)

"""Run a function on N gloo ranks (torch.multiprocessing spawn, a file store, a bounded time).

Used by tests/python/test_distributed*.py and examples' tests. Every rank runs `fn(rank, world, *args)`;
an exception on any rank fails the call with that rank's traceback; a run past `timeout` kills the
workers and fails. The process group's own timeout bounds every collective.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60


def _entry(rank, world, store, fn, args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "store")
        ctx = mp.start_processes(_entry, args=(world, store, fn, args), nprocs=world, join=False,
                                 start_method="spawn")
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

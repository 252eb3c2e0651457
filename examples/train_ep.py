"""Train the character MoE LM of examples/train_char_lm.py with expert parallelism on CPU ranks.

    python3 examples/train_ep.py               # 2 gloo ranks, a couple of minutes
    python3 examples/train_ep.py --tiny        # seconds (CI)
    torchrun --nproc-per-node 2 examples/train_ep.py --torchrun    # the same under torchrun

Every MoE layer of the model becomes a smoe.distributed.ExpertParallelMoE: each rank holds E / world of
its experts and its own batches; the tokens travel to their experts by all-to-all. Gradients: the
replicated parameters (embedding, attention, router, norms) are averaged over the ranks and the expert
shards take 1/world of their (already all-rank) gradient: smoe.distributed.all_reduce_gradients.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
try:
    import smoe  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(_HERE, "..", "python"))

from train_char_lm import CharMoELM, load_text  # noqa: E402


def train(rank: int, world: int, args) -> None:
    import smoe.nn
    import torch.distributed as dist
    from smoe.distributed import ExpertParallelMoE, all_reduce_gradients

    if args.tiny:
        cfg = dict(d=32, layers=1, heads=2, context=32, ffn=32)
        steps, batch = 6, 4
    else:
        cfg = dict(d=96, layers=2, heads=4, context=64, ffn=96)
        steps, batch = 100, 8
    steps = args.steps or steps
    torch.manual_seed(args.seed)  # the same initial model on every rank
    # Each rank's loss is a mean over its tokens and gradients are averaged over ranks, which divides
    # the attached aux losses by world (docs/distributed.md): scale their coefficient back.
    model = CharMoELM(**cfg, experts=args.experts, top_k=args.top_k, backend="auto", aux_loss_coef=1e-2 * world)
    for block in model.blocks:
        block.moe = ExpertParallelMoE.from_dense(block.moe, z_loss_coef=1e-4 * world)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    data = torch.tensor(list(load_text(None).encode("utf-8")), dtype=torch.long)
    context = cfg["context"]
    gen = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own batches
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{world} ranks, {args.experts} experts ({args.experts // world} per rank), top-{args.top_k}; "
            f"{n_params:,} parameters per rank; {steps} steps of {batch} x {context} tokens per rank",
            flush=True,
        )
    t0 = time.perf_counter()
    first = None
    for step in range(steps):
        starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + context] for s in starts])
        y = torch.stack([data[s + 1 : s + context + 1] for s in starts])
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + smoe.nn.aux_loss(model)).backward()  # this rank's shares of the aux losses
        all_reduce_gradients(model)  # EP only: replicated grads averaged, expert shards / world
        opt.step()
        smoe.nn.end_step(model)  # once per optimizer step (bias balancing, if on, over stats_group)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean /= world
        if first is None:
            first = mean.item()
        if rank == 0 and (step % 20 == 0 or step == steps - 1):
            load = model.blocks[0].moe.last_stats["tokens_per_expert"].tolist()
            print(f"step {step}: mean loss {mean.item():.3f}; layer 0 load (all ranks) {load}", flush=True)
    # The replicated parameters must still be identical on every rank.
    w = model.embed.weight.detach().clone()
    dist.broadcast(w, 0)
    same = torch.equal(w, model.embed.weight.detach())
    if not same:
        raise RuntimeError(f"rank {rank}: replicated parameters diverged")
    if rank == 0:
        print(
            f"trained {steps} steps in {time.perf_counter() - t0:.1f} s: mean loss {first:.3f} -> "
            f"{mean.item():.3f} (uniform guess {math.log(256):.3f}); replicated parameters identical on all "
            f"ranks",
            flush=True,
        )


def _torchrun_main(args) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        train(dist.get_rank(), dist.get_world_size(), args)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="seconds-long run (CI)")
    p.add_argument("--world", type=int, default=2, help="local gloo ranks to spawn")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torchrun", action="store_true", help="this process is one rank started by torchrun")
    args = p.parse_args(argv)
    if args.experts % args.world != 0 and not args.torchrun:
        p.error(f"--experts ({args.experts}) must be a multiple of --world ({args.world})")
    if args.torchrun:
        _torchrun_main(args)
        return 0
    from smoe.distributed import run_local

    run_local(train, args.world, args, timeout=1800)
    return 0


if __name__ == "__main__":
    sys.exit(main())

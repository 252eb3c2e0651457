"""Expert-parallel all-to-all: bytes moved per step, measured gloo time, analytic NVLink / InfiniBand time.

    python3 bench/dist/bench_ep.py                      # 2 CPU ranks, a Mixtral-like layer scaled down
    python3 bench/dist/bench_ep.py --world 4 --tokens 2048 --hidden 1024 --json out/bench_ep.json

Each rank routes `--tokens` tokens through an ExpertParallelMoE (softmax top-k over random router
weights) and the benchmark records the splits of the dispatch exchange. Per step (forward + backward)
there are four exchanges of [rows, H] activations: dispatch and combine in forward, their reverses in
backward. For the busiest rank, "bytes" counts what it sends to other ranks (its own rows stay local):
  analytic time = max over ranks of max(bytes sent, bytes received) / link bandwidth per direction,
with NVLink 4 at 450 GB/s per direction (H100 SXM, NVIDIA) and 400 Gb/s InfiniBand NDR = 50 GB/s.
The measured gloo time is the median of --iters calls of torch.distributed.all_to_all_single with
those splits (TCP over loopback on this machine), and the whole layer's forward + backward time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

try:
    import smoe  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))

LINKS = {"NVLink 4 (450 GB/s/dir)": 450e9, "InfiniBand 400 Gb/s": 50e9}


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _worker(rank, world, args, out_path):
    import torch
    import torch.distributed as dist

    from smoe.distributed import ExpertParallelMoE

    torch.manual_seed(0)
    layer = ExpertParallelMoE(args.hidden, args.ffn, args.experts, args.top_k)
    torch.manual_seed(100 + rank)
    x = torch.randn(args.tokens, args.hidden, requires_grad=True)
    P, El = world, args.experts // world
    # The dispatch splits of this batch, from the layer's own routing.
    with torch.no_grad():
        layer(x)
    import smoe.functional as F

    logits = layer.router.logits(x.detach())
    _, experts, _ = F.topk_gating(logits, top_k=args.top_k)
    plan = F.routing_plan(experts, num_experts=args.experts)
    send = plan.counts.view(P, El).sum(1).to(torch.int64)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    send_l, recv_l = send.tolist(), recv.tolist()
    esize = x.element_size()
    row_bytes = args.hidden * esize
    sent_remote = (sum(send_l) - send_l[rank]) * row_bytes
    recv_remote = (sum(recv_l) - recv_l[rank]) * row_bytes
    xs = torch.randn(sum(send_l), args.hidden)
    ys = torch.randn(sum(recv_l), args.hidden)

    def timed(fn):
        ts = []
        for i in range(args.iters + 2):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if i >= 2:
                ts.append(time.perf_counter() - t0)
        return _median(ts)

    out_d = torch.empty(sum(recv_l), args.hidden)
    out_c = torch.empty(sum(send_l), args.hidden)
    t_dispatch = timed(lambda: dist.all_to_all_single(out_d, xs, recv_l, send_l))
    t_combine = timed(lambda: dist.all_to_all_single(out_c, ys, send_l, recv_l))

    def step():
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()

    t_layer = timed(step)
    stats = torch.tensor([sent_remote, recv_remote, sum(send_l), t_dispatch, t_combine, t_layer], dtype=torch.float64)
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    if rank == 0:
        rows = [g.tolist() for g in gathered]
        with open(out_path, "w") as f:
            json.dump(rows, f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.world < 1 or args.experts % args.world != 0:
        p.error(f"--experts ({args.experts}) must be a multiple of --world ({args.world})")

    import tempfile

    from smoe.distributed import run_local

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "r.json")
        run_local(_worker, args.world, args, path, timeout=600)
        with open(path) as f:
            rows = json.load(f)
    sent = max(r[0] for r in rows)
    recvd = max(r[1] for r in rows)
    per_exchange = max(sent, recvd)
    t_d = max(r[3] for r in rows)
    t_c = max(r[4] for r in rows)
    t_l = max(r[5] for r in rows)
    total_remote = sum(r[0] for r in rows)
    print(f"EP all-to-all: world {args.world}, {args.tokens} tokens/rank, H={args.hidden}, E={args.experts}, "
          f"top-{args.top_k}, fp32")
    print(f"rows sent per rank: {[int(r[2]) for r in rows]}; bytes to other ranks per exchange: busiest rank "
          f"{int(sent):,} sent / {int(recvd):,} received, all ranks {int(total_remote):,}")
    print(f"per step (fwd+bwd = 4 exchanges): busiest rank moves {int(4 * per_exchange):,} bytes each way")
    hdr = f"{'':40s} {'dispatch':>12s} {'combine':>12s} {'step (4x)':>12s}"
    print(hdr)
    print(f"{'measured gloo (ms)':40s} {1e3 * t_d:12.3f} {1e3 * t_c:12.3f} {1e3 * 2 * (t_d + t_c):12.3f}")
    result = {"world": args.world, "tokens_per_rank": args.tokens, "hidden": args.hidden, "experts": args.experts,
              "top_k": args.top_k, "bytes_per_exchange_busiest": per_exchange, "bytes_per_step_busiest": 4 * per_exchange,
              "gloo_dispatch_s": t_d, "gloo_combine_s": t_c, "layer_fwd_bwd_s": t_l, "analytic_s": {}}
    for name, bw in LINKS.items():
        t = per_exchange / bw
        result["analytic_s"][name] = 4 * t
        print(f"{'analytic ' + name + ' (ms)':40s} {1e3 * t:12.4f} {1e3 * t:12.4f} {1e3 * 4 * t:12.4f}")
    print(f"layer forward + backward (gloo ranks, ms): {1e3 * t_l:.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

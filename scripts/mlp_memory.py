"""Memory of the routed-expert path of one MoE layer: expert_mlp -> combine (docs/layer.md, memory).

  python scripts/mlp_memory.py saved [--T 65536 --H 2048 --F 768 --E 128 --K 8 --dtype bf16]
      Bytes of the tensors autograd saves in one forward of expert_mlp + combine at that shape, on the
      meta device (the ops' fake implementations: nothing is allocated), split into what the ops
      allocate for backward and the references to tensors that exist anyway (x, weights, plan).
      The defaults are Qwen3-30B-A3B's MoE layer (65,536 tokens).
  python scripts/mlp_memory.py rss [--T 4096 --H 512 --F 256 --E 16 --K 4 --dtype f32]
      Peak RSS (ru_maxrss) of one CPU training step (forward, backward) at a small shape, run in a
      fresh interpreter so nothing else has grown the process first.

Run against a tree with PYTHONPATH=<tree>/python; the script uses only smoe.functional, so it also
measures trees whose expert_mlp still saved a permuted copy of x.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import smoe.functional as F
import torch

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def _plan(T, E, K, device):
    """A balanced top-K plan without drops: row r = the r-th (token, k) pair in expert order."""
    R = T * K
    if device == "meta":
        return F.RoutingPlan(
            torch.empty(E, dtype=torch.int32, device=device),
            torch.empty(E + 1, dtype=torch.int64, device=device),
            torch.empty(T, K, dtype=torch.int32, device=device),
            torch.empty(R, dtype=torch.int32, device=device),
        )
    experts = (torch.arange(T).unsqueeze(1) * K + torch.arange(K)).remainder(E).to(torch.int32)
    return F.routing_plan(experts, num_experts=E, backend="cpu")


def saved(args) -> dict:
    dt, dev = DTYPES[args.dtype], "meta"
    T, H, Fd, E, K = args.T, args.H, args.F, args.E, args.K
    x = torch.empty(T, H, dtype=dt, device=dev, requires_grad=True)
    w1 = torch.empty(E, 2 * Fd, H, dtype=dt, device=dev, requires_grad=True)
    w2 = torch.empty(E, H, Fd, dtype=dt, device=dev, requires_grad=True)
    weights = torch.empty(T, K, dtype=torch.float32, device=dev, requires_grad=True)
    plan = _plan(T, E, K, dev)
    inputs = [x, w1, w2, weights, plan.counts, plan.offsets, plan.row_of, plan.token_of_row]
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        ys = F.expert_mlp(x, w1, w2, plan, activation="swiglu", backend="cpu")
        F.combine(ys, weights, plan, backend="cpu")

    def is_input(t):  # a saved input is the same tensor (TensorImpl) as the one passed in
        return any(t is i or t._cdata == i._cdata for i in inputs)

    own = [t for t in packed if not is_input(t)]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    return {
        "shape": dict(T=T, H=H, F=Fd, E=E, K=K, dtype=args.dtype),
        "allocated_for_backward_bytes": nbytes(own),
        "allocated_for_backward": sorted([list(t.shape) for t in own]),
        "references_bytes": nbytes([t for t in packed if is_input(t)]),
    }


def rss_child(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dt = DTYPES[args.dtype]
    T, H, Fd, E, K = args.T, args.H, args.F, args.E, args.K
    x = torch.randn(T, H, dtype=dt, requires_grad=True)
    w1 = (torch.randn(E, 2 * Fd, H, dtype=dt) * 0.05).requires_grad_(True)
    w2 = (torch.randn(E, H, Fd, dtype=dt) * 0.05).requires_grad_(True)
    weights = torch.rand(T, K, requires_grad=True)
    plan = _plan(T, E, K, "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ys = F.expert_mlp(x, w1, w2, plan, activation="swiglu", backend="cpu")
    F.combine(ys, weights, plan, backend="cpu").float().square().sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "shape": dict(T=T, H=H, F=Fd, E=E, K=K, dtype=args.dtype),
        "peak_rss_kib": peak,
        "step_growth_kib": peak - before,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["saved", "rss", "_rss_child"])
    ap.add_argument("--T", type=int)
    ap.add_argument("--H", type=int)
    ap.add_argument("--F", type=int)
    ap.add_argument("--E", type=int)
    ap.add_argument("--K", type=int)
    ap.add_argument("--dtype", choices=sorted(DTYPES))
    a = ap.parse_args()
    big = dict(T=65536, H=2048, F=768, E=128, K=8, dtype="bf16")
    small = dict(T=4096, H=512, F=256, E=16, K=4, dtype="f32")
    for k, v in (big if a.mode == "saved" else small).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.mode == "saved":
        out = saved(a)
    elif a.mode == "_rss_child":
        out = rss_child(a)
    else:
        cmd = [sys.executable, __file__, "_rss_child"] + [f"--{k}={getattr(a, k)}" for k in small]
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Train a small character-level MoE language model on the CPU, plot the expert load, benchmark.

    python3 examples/train_char_lm.py            # a few minutes: train, plot, full benchmark table
    python3 examples/train_char_lm.py --tiny     # seconds (CI): tiny model, quick benchmark

The model: byte embedding -> N x [causal self-attention (torch's scaled_dot_product_attention) +
smoe.nn.MoE (top-k routed SwiGLU experts)], pre-norm residual blocks -> head tied to the embedding.
The text: by default the source of a few Python standard-library modules (present with every Python
installation), or any file given with --text. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import smoe  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import smoe  # noqa: E402,F811
from smoe.nn import MoE  # noqa: E402

# Modules whose source ships with CPython: ~400 KB of English prose (docstrings) and code.
_STDLIB_MODULES = ("argparse", "textwrap", "string", "difflib", "fractions", "statistics", "calendar")


def load_text(path: str | None) -> str:
    if path:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    import importlib

    parts = []
    for name in _STDLIB_MODULES:
        try:
            parts.append(inspect.getsource(importlib.import_module(name)))
        except (OSError, TypeError):  # a Python installed without sources
            continue
    if not parts:
        import codecs
        import this  # noqa: F401  (prints the Zen of Python; its text is ROT13 in this.s)

        parts.append(codecs.decode(this.s, "rot13"))
    return "\n".join(parts)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, moe: MoE):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B,S,d]
        B, S, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B,heads,S,d/heads]
        x = x + self.proj(att.transpose(1, 2).reshape(B, S, d))
        return x + self.moe(self.ln2(x))


class CharMoELM(nn.Module):
    def __init__(
        self,
        *,
        d: int,
        layers: int,
        heads: int,
        context: int,
        experts: int,
        top_k: int,
        ffn: int,
        backend: str,
        aux_loss_coef: float,
        vocab: int = 256,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.ModuleList(
            Block(d, heads, MoE(d, ffn, experts, top_k, aux_loss_coef=aux_loss_coef, z_loss_coef=1e-4, backend=backend))
            for _ in range(layers)
        )
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx [B,S] -> logits [B,S,vocab]
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.embed.weight.t()  # tied head

    def moe_layers(self):
        return [b.moe for b in self.blocks]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n: int, context: int) -> torch.Tensor:
        idx = prompt
        for _ in range(n):
            logits = self(idx[:, -context:])[:, -1]
            idx = torch.cat([idx, torch.multinomial(torch.softmax(logits, dim=-1), 1)], dim=1)
        return idx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="seconds-long run (CI): tiny model, quick benchmark")
    p.add_argument("--text", default=None, help="train on this UTF-8 file instead of stdlib sources")
    p.add_argument("--out", default="out/expert_load.png", help="PNG of the expert load over training")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--backend", default="auto", help="smoe backend: auto, cpu, reference, ...")
    p.add_argument(
        "--bench",
        choices=("full", "quick", "none"),
        default=None,
        help="benchmark after training (default: full, quick with --tiny)",
    )
    p.add_argument("--bench-json", default=None, help="also write the benchmark results as JSON")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.tiny:
        cfg = dict(d=32, layers=1, heads=2, context=32, ffn=32)
        steps, batch = 8, 4
    else:
        cfg = dict(d=128, layers=2, heads=4, context=128, ffn=128)
        steps, batch = 150, 16
    steps = args.steps or steps
    batch = args.batch or batch
    if args.context:
        cfg["context"] = args.context
    bench = args.bench or ("quick" if args.tiny else "full")

    torch.manual_seed(args.seed)
    text = load_text(args.text)
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    context = cfg["context"]
    if data.numel() < context + 2:
        p.error(f"--text must hold at least {context + 2} bytes, got {data.numel()}")
    split = int(0.95 * data.numel())
    train, valid = data[:split], data[split:]

    model = CharMoELM(**cfg, experts=args.experts, top_k=args.top_k, backend=args.backend, aux_loss_coef=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    print(
        f"text: {data.numel():,} bytes; model: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{cfg['layers']} MoE layers x {args.experts} experts (top-{args.top_k}), backend={args.backend!r}"
    )

    def batch_of(source):
        starts = torch.randint(0, source.numel() - context - 1, (batch,))
        x = torch.stack([source[s : s + context] for s in starts])
        y = torch.stack([source[s + 1 : s + context + 1] for s in starts])
        return x, y

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    history, recorded = [], []
    bar = tqdm(range(steps), desc="training", dynamic_ncols=True) if tqdm else range(steps)
    t0 = time.perf_counter()
    for step in bar:
        model.train()
        x, y = batch_of(train)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + smoe.nn.aux_loss(model)).backward()  # the MoE layers' aux losses join the loss before any scaling
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smoe.nn.end_step(model)  # once per optimizer step (per-step routing statistics)
        sched.step()
        counts = torch.stack([m.last_stats["tokens_per_expert"].float() for m in model.moe_layers()])  # [L,E]
        history.append(counts)
        recorded.append(step)
        if tqdm:
            share = counts[0] / counts[0].sum()
            bar.set_postfix_str(f"loss {loss.item():.3f} load[0] " + " ".join(f"{100 * s:.0f}" for s in share))
        elif step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}")
    train_s = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        xv, yv = batch_of(valid)
        vloss = F.cross_entropy(model(xv).reshape(-1, 256), yv.reshape(-1)).item()
    print(
        f"trained {steps} steps in {train_s:.1f} s; final train loss {loss.item():.3f}, "
        f"validation loss {vloss:.3f} (uniform guess: {math.log(256):.3f})"
    )
    for i, m in enumerate(model.moe_layers()):
        print(f"MoE layer {i}: aux loss {m.last_aux_loss.item():.4f}, z-loss {m.last_z_loss.item():.3f}")
    sample = model.generate(xv[:1, :16], 120 if not args.tiny else 16, context)
    print("sample:", repr(bytes(sample[0].tolist()).decode("utf-8", errors="replace")))

    from smoe.viz import plot_expert_load

    path = plot_expert_load(
        history,
        args.out,
        steps=recorded,
        title=f"Expert load while training a character MoE LM ({args.experts} experts, top-{args.top_k})",
    )
    print(f"expert load plot: {path}")

    if bench != "none":
        from smoe.bench import print_table, run_benchmark, write_json

        print("benchmark (this may take a while for the full shapes) ...", flush=True)
        if bench == "quick":
            results = run_benchmark(
                quick=True,
                dtypes=("fp32",) if args.tiny else ("fp32", "bf16"),
                backend=args.backend,
                repeats=1 if args.tiny else 3,
                warmup=1 if args.tiny else 1,
            )
        else:
            results = run_benchmark(repeats=3, backend=args.backend)
        print_table(results)
        if args.bench_json:
            write_json(results, args.bench_json, command="examples/train_char_lm.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A training loop around smoe.nn.MoE: the pattern docs/layer.md ("Training loops") recommends.

A toy next-token model (embedding -> [attention-free MoE block] x L -> head) on random padded sequences, with
what real trainers do around the layer:
  - the aux losses added to the loss before any scaling: loss = task + smoe.nn.aux_loss(model);
  - gradient accumulation over --micro micro-batches (loss / micro);
  - torch.autocast (bf16 by default; --amp fp16 adds a GradScaler) with fp32 master weights;
  - activation checkpointing of each block (torch.utils.checkpoint, non-reentrant);
  - padding left out of routing with token_mask;
  - bias balancing updated once per optimizer step (smoe.nn.end_step_after).

    python examples/train_loop.py --tiny        # a few seconds on a CPU (CI runs it)
    python examples/train_loop.py --steps 200 --hidden 256 --experts 16
"""

import argparse

import smoe.nn
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class Block(nn.Module):
    def __init__(self, hidden, experts, top_k, backend):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.moe = smoe.nn.MoE(
            hidden,
            2 * hidden,
            experts,
            top_k,
            score_func="sigmoid",
            bias_balancing=True,
            aux_loss_coef=1e-2,
            z_loss_coef=1e-3,
            router_jitter_noise=0.01,
            backend=backend,
        )

    def forward(self, h, mask):
        return h + self.moe(self.norm(h), token_mask=mask)


class ToyLM(nn.Module):
    def __init__(self, vocab, hidden, layers, experts, top_k, backend):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, experts, top_k, backend) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens, mask):
        h = self.embed(tokens)
        for block in self.blocks:
            h = checkpoint(block, h, mask, use_reentrant=False) if self.training else block(h, mask)
        return self.head(h)


def batch(gen, args):
    """Random sequences of random length, padded with 0; mask marks the real tokens."""
    lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=gen)
    start = torch.randint(0, args.vocab - 1, (args.batch, 1), generator=gen)
    tokens = (start + torch.arange(args.seq)) % (args.vocab - 1) + 1  # a learnable pattern: next = previous + 1
    mask = torch.arange(args.seq)[None, :] < lengths[:, None]
    return tokens * mask, mask


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="a few small steps (CI)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--micro", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default="bf16")
    p.add_argument("--backend", default="auto")
    args = p.parse_args()
    if args.tiny:
        args.steps, args.micro, args.batch, args.seq, args.hidden, args.experts = 3, 2, 2, 8, 16, 4

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = ToyLM(args.vocab, args.hidden, args.layers, args.experts, args.top_k, args.backend)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    smoe.nn.end_step_after(opt, model)  # bias update (all layers) once per optimizer step
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    scaler = torch.amp.GradScaler("cpu", enabled=amp is torch.float16)

    for step in range(args.steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(args.micro):
            tokens, mask = batch(gen, args)
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                logits = model(tokens[:, :-1], mask[:, :-1])
            target = tokens[:, 1:].masked_fill(~mask[:, 1:], -100)
            task = F.cross_entropy(logits.float().reshape(-1, args.vocab), target.reshape(-1), ignore_index=-100)
            loss = task + smoe.nn.aux_loss(model)  # before any scaling
            scaler.scale(loss / args.micro).backward()
            total += float(task.detach()) / args.micro
        scaler.step(opt)  # calls opt.step() (and so end_step) unless fp16 gradients overflowed
        scaler.update()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            loads = [b.moe.last_stats["routed_per_expert"].tolist() for b in model.blocks]
            print(f"step {step:4d}  task loss {total:.4f}  aux {float(smoe.nn.aux_loss(model)):.4f}  loads {loads}")
    print(f"final loss {total:.4f}")


if __name__ == "__main__":
    main()

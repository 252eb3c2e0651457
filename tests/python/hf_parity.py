"""Parity figures of smoe against transformers for every MoE family (the table in docs/hf.md).

  PYTHONPATH=python python3 tests/python/hf_parity.py            # transformers 4.x: from_hf / patching
  PYTHONPATH=python build/tf5/bin/python tests/python/hf_parity.py  # 5.x: also the experts backend

Per family, max |smoe - HF| over tiny random models (hf_tiny): block output, input gradient and the
largest parameter-gradient difference (fp32, backend cpu); patched-model logits; bf16 error ratio
(smoe's max error and HF's own, both against the fp32 model); and, under 5.x, experts_implementation
"smoe" vs "eager" logits and largest gradient difference.
"""

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_tiny  # noqa: E402
import transformers  # noqa: E402
from smoe.integrations import hf  # noqa: E402

TF5 = int(transformers.__version__.split(".")[0]) >= 5


def _model(family, **kw):
    if TF5:
        kw.setdefault("experts_implementation", "eager")
    return hf_tiny.tiny_model(family, **kw)


def _maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def _block_figures(family):
    block = next(m for m in _model(family).modules() if any(c.__name__ in hf._KINDS for c in type(m).__mro__))
    moe = hf.from_hf(block, backend="cpu")
    torch.manual_seed(1)
    x = torch.randn(2, 7, 32)
    xh, xs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yh = block(xh)
    yh = yh[0] if isinstance(yh, tuple) else yh
    ys = moe(xs)
    g = torch.randn_like(ys)
    yh.backward(g)
    ys.backward(g)
    layout = hf._Layout(block)
    got = layout.write({k: p.grad for k, p in hf._moe_tensors(moe).items() if isinstance(p, torch.nn.Parameter)})
    dp = max(_maxdiff(got[n], p.grad) for n, p in block.named_parameters() if p.grad is not None)
    return _maxdiff(ys, yh), _maxdiff(xs.grad, xh.grad), dp


def _loss_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def main():
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(
        "| family | block y | block dx | block max dW | patched logits | bf16 err smoe / HF |"
        + (" backend logits | backend max dW |" if TF5 else "")
    )
    print("| --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if TF5 else ""))
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    for family in hf_tiny.FAMILIES:
        row = [family]
        if family in hf_tiny.REFUSED:
            row += ["refused"] * 5
        else:
            row += [f"{v:.1e}" for v in _block_figures(family)]
            model = _model(family)
            patched = copy.deepcopy(model)
            hf.replace_moe_blocks(patched)
            with torch.no_grad():
                row.append(f"{_maxdiff(patched(ids).logits, model(ids).logits):.1e}")
                bf = copy.deepcopy(model).to(torch.bfloat16)
                pbf = copy.deepcopy(bf)
                hf.replace_moe_blocks(pbf)
                want = model(ids).logits
                try:
                    err_hf = f"{_maxdiff(bf(ids).logits, want):.1e}"
                except RuntimeError:
                    err_hf = "HF fails in bf16"
                row.append(f"{_maxdiff(pbf(ids).logits, want):.1e} / {err_hf}")
        if TF5:
            if family in ("llama4_text", "jetmoe"):
                row += ["no ExpertsInterface"] * 2
            else:
                hf.register(backend="cpu")
                eager = _model(family)
                sm = copy.deepcopy(eager)
                sm.set_experts_implementation("smoe")
                le, ge = _loss_grads(eager, ids)
                ls, gs = _loss_grads(sm, ids)
                row += [f"{_maxdiff(ls, le):.1e}", f"{max(_maxdiff(gs[n], ge[n]) for n in ge):.1e}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

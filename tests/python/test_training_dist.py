"""smoe.nn.MoE under DDP (gloo, 2 and 3 processes started by smoe.distributed.run_local, bounded by a timeout).

Each rank trains a DDP copy on its slice of every global micro-batch, with bias balancing and the
global-batch balance loss over the world group. Checked against one process running the same steps on the
concatenated batches: every rank ends each step with the single process's bias (bitwise), the mean over
ranks of the ranks' balance losses equals the single-process balance loss at every micro-batch, and the
router weights after the steps agree.
"""

import os

import pytest
import smoe.nn
import torch
import torch.distributed as dist
from smoe.distributed import run_local
from smoe.nn import MoE
from smoe.testing import assert_close

H, F, E, K = 12, 10, 6, 2
T_LOCAL, STEPS, MICRO = 5, 2, 2
TIMEOUT_S = 180


def _model(process_group=None):
    torch.manual_seed(0)
    return MoE(
        H,
        F,
        E,
        K,
        backend="cpu",
        score_func="sigmoid",
        bias_balancing=True,
        bias_update_rate=0.01,
        aux_loss_coef=0.1,
        z_loss_coef=0.01,
        aux_loss_type="global",
        process_group=process_group,
    )


def _batches(world):
    torch.manual_seed(1)
    return [[torch.randn(world * T_LOCAL, H) for _ in range(MICRO)] for _ in range(STEPS)]


def _train(model, module, batches, rank=0, ranks=1):
    """SGD with MICRO micro-batches per step; returns (balance loss per micro-batch, bias after each step)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    smoe.nn.end_step_after(opt, module)
    losses, biases = [], []
    for step in batches:
        opt.zero_grad(set_to_none=True)
        for x in step:
            x = x[rank * (x.shape[0] // ranks) : (rank + 1) * (x.shape[0] // ranks)]
            y = model(x)
            loss = y.square().mean() + smoe.nn.aux_loss(module)
            (loss / MICRO).backward()
            losses.append(module.last_aux_loss.clone())
        opt.step()
        biases.append(module.expert_bias.clone())
    return torch.stack(losses), torch.stack(biases)


def _worker(rank, world, broadcast_buffers, out_dir):
    moe = _model(dist.group.WORLD)
    # broadcast_buffers=False: the biases stay equal because the layer reduces its counts, not because
    # DDP copies rank 0's buffers; True (DDP's default) must not disturb the step's counts
    ddp = torch.nn.parallel.DistributedDataParallel(moe, broadcast_buffers=broadcast_buffers)
    losses, biases = _train(ddp, moe, _batches(world), rank, world)
    mean_loss = losses.clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    gathered = [torch.zeros_like(biases) for _ in range(world)]
    dist.all_gather(gathered, biases)
    torch.save(
        {"mean_loss": mean_loss, "biases": torch.stack(gathered), "router": moe.router.weight.detach().clone()},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def _spawn(world, broadcast_buffers, tmp_path):
    run_local(_worker, world, broadcast_buffers, str(tmp_path), timeout=TIMEOUT_S)  # file store, killed past TIMEOUT_S
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("world,broadcast_buffers", [(2, False), (3, False), (2, True)])
def test_ddp_identical_biases_and_global_loss(world, broadcast_buffers, tmp_path):
    results = _spawn(world, broadcast_buffers, tmp_path)
    single = _model()
    want_losses, want_biases = _train(single, single, _batches(world))
    assert want_biases[-1].abs().sum() > 0
    for r, res in enumerate(results):
        for other in range(world):  # every rank holds the same biases, step after step
            assert torch.equal(res["biases"][other], res["biases"][0]), (r, other)
        assert torch.equal(res["biases"][0], want_biases), r
        assert_close(res["mean_loss"], want_losses, msg=f"rank {r}: mean balance loss")
        assert_close(res["router"], single.router.weight.detach(), msg=f"rank {r}: router after the steps")

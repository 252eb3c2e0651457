"""smoe.distributed on gloo ranks: parity with the single-process layer (bitwise where the issue asks),
skew, empty ranks, capacity, bias balancing, EP x DP, bad input. Each test spawns its ranks once and
runs several checks in them (tests/python/dist_harness.py bounds the time)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks

H, F_, K = 16, 8, 2


def _dense(E, seed=0, **kw):
    from smoe.nn import MoE

    torch.manual_seed(seed)
    return MoE(H, F_, E, K, **kw)


def _batch(sizes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    T = sum(sizes)
    return torch.randn(T, H, generator=gen), torch.randn(T, H, generator=gen)


def _span(sizes, rank):
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


def _check_parity(rank, world, E, sizes, **kw):
    """Outputs, input and expert gradients bitwise; stats exact; router/shared gradients (summed over
    ranks) and the losses within fp32 tolerance (they are sums split over ranks)."""
    from smoe.distributed import ExpertParallelMoE, all_reduce_gradients
    from smoe.testing import assert_close

    dense = _dense(E, **kw)
    ep = ExpertParallelMoE.from_dense(dense)
    x, g = _batch(sizes)
    xd = x.clone().requires_grad_()
    ((dense(xd) * g).sum() + dense.aux_loss).backward()
    lo, hi = _span(sizes, rank)
    xl = x[lo:hi].clone().requires_grad_()
    y = ep(xl)
    ((y * g[lo:hi]).sum() + ep.aux_loss).backward()  # the ranks' aux shares add up to the dense aux loss
    with torch.no_grad():
        yd = dense(x.clone())  # a second forward (no backward) must give the same values
    e = ep.local_experts
    assert torch.equal(y, yd[lo:hi]), f"rank {rank}: y"
    assert torch.equal(xl.grad, xd.grad[lo:hi]), f"rank {rank}: dx"
    assert torch.equal(ep.w1.grad, dense.w1.grad[e.start : e.stop]), f"rank {rank}: w1.grad"
    assert torch.equal(ep.w2.grad, dense.w2.grad[e.start : e.stop]), f"rank {rank}: w2.grad"
    for k in ("tokens_per_expert", "routed_per_expert", "dropped"):
        assert torch.equal(ep.last_stats[k], dense.last_stats[k].to(ep.last_stats[k].dtype)), k
    assert_close(ep.last_aux_loss, dense.last_aux_loss)
    assert_close(ep.last_z_loss, dense.last_z_loss)
    all_reduce_gradients(ep, average=False)  # EP only: replicated grads summed, expert shards kept
    assert torch.equal(ep.w1.grad, dense.w1.grad[e.start : e.stop])
    assert_close(ep.router.weight.grad, dense.router.weight.grad)
    if ep.shared_w1 is not None:
        assert_close(ep.shared_w1.grad, dense.shared_w1.grad)
        assert_close(ep.shared_w2.grad, dense.shared_w2.grad)


def _parity_cases(rank, world):
    E = 12  # divisible by 1, 2, 3, 4
    sizes = [5, 3, 0, 7][:world] if world > 1 else [9]  # rank 2 (world >= 3) has no tokens
    _check_parity(rank, world, E, sizes)
    _check_parity(rank, world, E, sizes, num_shared_experts=1, shared_gate=True, aux_loss_coef=0.01, z_loss_coef=0.001)
    _check_parity(
        rank, world, E, sizes, score_func="sigmoid", n_groups=3, topk_groups=2, routed_scaling=2.0, activation="gelu"
    )


def _skew_and_capacity(rank, world):
    from smoe.distributed import ExpertParallelMoE
    from smoe.nn import MoE

    # All tokens to rank 0's experts (a selection bias does it), other ranks receive nothing: their
    # expert gradients are zeros (not None), outputs and rank 0's gradients match the dense layer.
    E, sizes = 4, [6, 4]
    dense = _dense(E, bias_balancing=True)
    with torch.no_grad():
        dense.expert_bias.copy_(torch.tensor([100.0, 100.0, 0.0, 0.0]))
    dense.eval()
    ep = ExpertParallelMoE.from_dense(dense)
    ep.eval()
    x, g = _batch(sizes)
    xd = x.clone().requires_grad_()
    (dense(xd) * g).sum().backward()
    lo, hi = _span(sizes, rank)
    xl = x[lo:hi].clone().requires_grad_()
    y = ep(xl)
    (y * g[lo:hi]).sum().backward()
    assert torch.equal(y, dense(x)[lo:hi].detach())
    assert torch.equal(xl.grad, xd.grad[lo:hi])
    e = ep.local_experts
    assert ep.w1.grad is not None and torch.equal(ep.w1.grad, dense.w1.grad[e.start : e.stop])
    if rank == 1:
        assert torch.count_nonzero(ep.w1.grad) == 0 and torch.count_nonzero(ep.w2.grad) == 0
    assert ep.last_stats["routed_per_expert"].tolist() == [10, 10, 0, 0]

    # Every rank empty: no hang, zero gradients.
    xe = torch.zeros(0, H, requires_grad=True)
    ep.zero_grad()
    ye = ep(xe)
    ye.sum().backward()
    assert ye.shape == (0, H) and torch.count_nonzero(ep.w1.grad) == 0

    # Capacity is per rank: the EP layer equals the dense layer applied to each rank's own batch.
    dense = _dense(E, capacity_factor=0.5, drop_policy="score")
    ep = ExpertParallelMoE.from_dense(dense)
    x, _ = _batch([8, 8], seed=3)
    xl = x[8 * rank : 8 * rank + 8]
    y = ep(xl)
    assert torch.equal(y, dense(xl))
    dropped_here = dense.last_stats["dropped"].clone()
    dist.all_reduce(dropped_here)
    assert int(ep.last_stats["dropped"]) == int(dropped_here) > 0

    # token_mask: masked tokens stay out of routing and of the counts, as in the dense layer.
    dense = _dense(E)
    ep = ExpertParallelMoE.from_dense(dense)
    x, _ = _batch(sizes, seed=5)
    mask = torch.arange(x.shape[0]) % 3 != 1
    lo, hi = _span(sizes, rank)
    assert torch.equal(ep(x[lo:hi], token_mask=mask[lo:hi]), dense(x, token_mask=mask)[lo:hi])
    assert torch.equal(ep.last_stats["routed_per_expert"], dense.last_stats["routed_per_expert"])

    # Bias balancing sees global counts: the bias after one training step equals the dense layer's
    # after the concatenated batch (sign updates of integer counts: exact).
    dense = _dense(E, bias_balancing=True, bias_update_rate=0.1)
    ep = ExpertParallelMoE.from_dense(dense)
    x, _ = _batch(sizes, seed=4)
    dense.train(), ep.train()
    dense(x)
    dense.end_step()
    lo, hi = _span(sizes, rank)
    ep(x[lo:hi])
    ep.end_step()  # the step's counts, summed over stats_group
    assert torch.equal(ep.expert_bias, dense.expert_bias) and torch.count_nonzero(ep.expert_bias) > 0
    assert isinstance(ep, MoE)


def _bad_inputs(rank, world):
    from smoe.distributed import ExpertParallelMoE

    def expect(fn, *words):
        try:
            fn()
        except ValueError as e:
            for w in words:
                assert w in str(e), (w, str(e))
        else:
            raise AssertionError(f"rank {rank}: no ValueError for {words}")

    E = 2 * world
    expect(lambda: ExpertParallelMoE(H, F_, E + 1, K), f"num_experts ({E + 1}) must be divisible by the EP group size")
    expect(lambda: ExpertParallelMoE(H, F_, E + world * rank, K), "disagree on num_experts")
    expect(lambda: ExpertParallelMoE(H + rank, F_, E, K), "disagree on hidden_size")
    expect(lambda: ExpertParallelMoE(H, F_, E, K + rank % 2), "disagree on top_k")
    expect(lambda: ExpertParallelMoE(H, F_, E, K, ep_size=world + 1), "ep_group must have ep_size")
    # Only rank 1 passes a bad argument: rank 1 names it, the others name rank 1.
    expect(lambda: ExpertParallelMoE(H, F_, E, K if rank != 1 else 99), "top_k" if rank == 1 else "rank(s) [1]")
    expect(lambda: ExpertParallelMoE(H, F_, E, K, backend="reference"), "backend")
    # Mixed devices: rank 1 builds its layer on another device.
    expect(lambda: ExpertParallelMoE(H, F_, E, K, device="meta" if rank == 1 else "cpu"), "disagree on device type")
    layer = ExpertParallelMoE(H, F_, E, K)
    bad = torch.randn(3, H + 1) if rank == 1 else torch.randn(3, H)
    expect(lambda: layer(bad), "hidden_size" if rank == 1 else "rank(s) [1]")
    bad = torch.randn(3, H, dtype=torch.float64) if rank == 0 else torch.randn(3, H)
    expect(lambda: layer(bad), "dtype" if rank == 0 else "rank(s) [0]")
    bad = torch.randn(3, H, device="meta") if rank == world - 1 else torch.randn(3, H)
    expect(lambda: layer(bad), "device" if rank == world - 1 else f"rank(s) [{world - 1}]")
    # The layer still works after those errors (every rank made the same collectives).
    assert layer(torch.randn(2, H)).shape == (2, H)


def _ep_x_dp(rank, world):
    """4 ranks = 2 EP x 2 DP: EP groups {0,1}, {2,3}; DP groups {0,2}, {1,3}. Gradients of the mean of
    the per-rank losses: expert shards reduced over DP, the rest over all 4 ranks."""
    from smoe.distributed import (
        ExpertParallelMoE,
        all_reduce_gradients,
        ddp_ignore_expert_parameters,
        expert_parameters,
    )
    from smoe.testing import assert_close
    from torch.nn.parallel import DistributedDataParallel as DDP

    ep_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    ep_g, dp_g = ep_groups[rank // 2], dp_groups[rank % 2]
    E, sizes = 4, [5, 2, 4, 3]
    dense = _dense(E, num_shared_experts=1, aux_loss_coef=0.01, bias_balancing=True)
    dense.eval()
    x, g = _batch(sizes)
    xd = x.clone().requires_grad_()
    # Reference loss: the mean over the 4 ranks of each rank's sum. Each rank attaches its share of the
    # global aux loss; averaging over 4 ranks divides it by 4, so the EP layer's coefficient is 4x.
    yd = dense(xd)
    ((yd * g).sum().div(4) + dense.aux_loss).backward()
    for use_ddp in (False, True):
        ep = ExpertParallelMoE.from_dense(
            dense, ep_group=ep_g, stats_group=dist.group.WORLD, aux_loss_coef=4 * dense.aux_loss_coef
        )
        ep.eval()
        lo, hi = _span(sizes, rank)
        if use_ddp:
            assert ddp_ignore_expert_parameters(ep) == [n for n, _ in expert_parameters(ep)] == ["w1", "w2"]
            model = DDP(ep)
        else:
            model = ep
        y = model(x[lo:hi])
        ((y * g[lo:hi]).sum() + ep.aux_loss).backward()
        all_reduce_gradients(ep, dp_group=dp_g, experts_only=use_ddp)
        assert torch.equal(y, yd[lo:hi].detach())
        e = ep.local_experts
        assert_close(ep.w1.grad, dense.w1.grad[e.start : e.stop], msg=f"rank {rank} ddp={use_ddp}")
        assert_close(ep.w2.grad, dense.w2.grad[e.start : e.stop])
        assert_close(ep.router.weight.grad, dense.router.weight.grad)
        assert_close(ep.shared_w1.grad, dense.shared_w1.grad)
        assert torch.equal(ep.last_stats["routed_per_expert"], dense.last_stats["routed_per_expert"])


def _a2a(rank, world):
    from smoe.distributed import all_to_all_single, exchange_counts

    # rank r sends (r + p) % 3 rows to rank p; rows carry (source, destination, index).
    send = [(rank + p) % 3 for p in range(world)]
    recv = exchange_counts(torch.tensor(send, dtype=torch.int64).view(world, 1)).view(-1).tolist()
    assert recv == [(p + rank) % 3 for p in range(world)]
    rows = torch.cat(
        [torch.tensor([[rank, p, i] for i in range(n)], dtype=torch.float64).view(n, 3) for p, n in enumerate(send)]
    ).requires_grad_()
    out = all_to_all_single(rows, recv, send)
    expect = torch.cat(
        [torch.tensor([[p, rank, i] for i in range(n)], dtype=torch.float64).view(n, 3) for p, n in enumerate(recv)]
    )
    assert torch.equal(out, expect)
    (out * (rank + 1)).sum().backward()  # the gradient of a row is its destination's factor
    assert torch.equal(rows.grad[:, 0], rows[:, 1].detach() + 1)
    try:
        all_to_all_single(rows, recv, [rows.shape[0] + 1] + [0] * (world - 1))
    except ValueError as e:
        assert "x must have sum(input_split_sizes)" in str(e)
    else:
        raise AssertionError("no ValueError")


def test_local_routing_plan_is_expert_major_in_source_order():
    from smoe.distributed import local_routing_plan

    # 3 sources x 2 local experts; received rank-major: src0 (e0:2, e1:1), src1 (e0:0, e1:2), src2 (e0:1, e1:0)
    plan = local_routing_plan(torch.tensor([[2, 1], [0, 2], [1, 0]]))
    assert plan.counts.tolist() == [3, 3] and plan.offsets.tolist() == [0, 3, 6]
    # expert 0: received rows 0, 1 (src0), 5 (src2); expert 1: row 2 (src0), rows 3, 4 (src1)
    assert plan.token_of_row.tolist() == [0, 1, 5, 2, 3, 4]
    assert plan.row_of.view(-1).tolist() == [0, 1, 3, 4, 5, 2] and plan.row_of.shape == (6, 1)
    empty = local_routing_plan(torch.zeros(2, 3, dtype=torch.int64))
    assert empty.token_of_row.numel() == 0 and empty.offsets.tolist() == [0, 0, 0, 0]


def _timeout(rank, world):
    """Rank 1 never joins: rank 0's forward fails within the group's timeout instead of hanging."""
    import time

    from smoe.distributed import ExpertParallelMoE

    layer = ExpertParallelMoE(H, F_, 2, 1)
    if rank == 0:
        t0 = time.monotonic()
        try:
            layer(torch.randn(3, H))
        except RuntimeError:
            assert time.monotonic() - t0 < 30
        else:
            raise AssertionError("no timeout error")
    else:
        time.sleep(8)


def test_collectives_are_bounded_by_the_group_timeout():
    run_ranks(_timeout, 2, collective_timeout=3, barrier=False, timeout=90)


# One spawn per world size (process start-up dominates on a small machine); each runs several checks.
def _world(rank, world):
    _parity_cases(rank, world)
    if world == 2:
        _skew_and_capacity(rank, world)
    if world in (2, 3):
        _bad_inputs(rank, world)
    if world == 3:
        _a2a(rank, world)
    if world == 4:
        _ep_x_dp(rank, world)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_expert_parallel(world):
    """world 1-4: bitwise parity (3 layer configurations, an empty rank); 2: skew, all-empty, capacity,
    bias balancing, bad input; 3: bad input, all_to_all_single autograd; 4: 2 EP x 2 DP, with and without DDP."""
    run_ranks(_world, world, timeout=240)

"""The routing plan (the expert-sorted row layout): smoe.ops.routing_plan, routing_plan_max_rows,
torch.ops.smoe.routing_plan. C++: include/smoe/ops/routing.h, binding csrc/bindings/routing.cpp.

One call crosses into C++ once: the row bound R_max and the workspace bytes are computed here from
the shapes, with the formulas of smoe::routing_plan_max_rows and smoe::routing_plan_workspace_bytes
mirrored (tests/python/test_ops_routing.py checks both against the C++ queries over a grid of shapes)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from smoe import _core
from smoe import reference as _ref
from smoe.ops._common import DROP_POLICIES, check_backend, code, dims, exec_args, v, workspace
from smoe.reference.ops import RoutingPlan

__all__ = ["routing_plan", "routing_plan_max_rows", "RoutingPlan"]


def max_rows(T: int, K: int, num_experts: int, capacity: int, pad_multiple: int):
    """Rows of token_of_row, from the shapes alone (the formula of smoe::routing_plan_max_rows). capacity
    < 0: dropless. Works on symbolic sizes under torch.compile; the arguments must be valid (T, K >= 0,
    num_experts, pad_multiple >= 1): _routing_plan_shapes checks them."""
    kept = T * K
    if capacity >= 0:
        kept = min(kept, num_experts * min(capacity, T * K))
    return kept + num_experts * (pad_multiple - 1)


# The chunking constants of the backends' counting sort (csrc/cpu/routing.cpp, csrc/cuda/routing.cu):
# (assignments per chunk, most chunks, alignment, extra start [E+1] i32 array when dropping by score).
_SORT_LAYOUTS = {"cpu": (32768, 64, 64, False), "cuda": (1024, 4096, 64, True), "simt": (1024, 4096, 64, True)}


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _backend_workspace_bytes(layout, T: int, K: int, E: int, by_score: bool) -> int:
    per_chunk, most, align, start_array = layout
    chunks = min(max(-(-(T * K) // per_chunk), 1), min(most, max(T, 1)))
    nbytes = _align(chunks * E * 4, align)  # hist [chunks, E] i32
    if by_score:  # the assignments grouped by expert [T*K] i32 and a second [T*K] array (keys or scratch)
        nbytes += 2 * _align(T * K * 4, align) + (_align((E + 1) * 4, align) if start_array else 0)
    return nbytes


def workspace_bytes(T: int, K: int, num_experts: int, capacity: int, drop_policy: str, pad_multiple: int) -> int:
    """smoe::routing_plan_workspace_bytes: the largest need of the C++ backends of this build."""
    if T * K > _core.INT32_MAX or max_rows(T, K, num_experts, capacity, pad_multiple) > _core.INT32_MAX:
        return 0
    by_score = capacity >= 0 and drop_policy == "score"
    return max(
        _backend_workspace_bytes(_SORT_LAYOUTS[b], T, K, num_experts, by_score)
        for b in _core.BUILT_BACKENDS
        if b in _SORT_LAYOUTS
    )


def _routing_plan_shapes(op, experts, num_experts, capacity, drop_policy, pad_multiple):
    """(counts [E] i32, offsets [E+1] i64, row_of [T, K] i32, token_of_row [R_max] i32) and the
    drop-policy code. Every argument here sizes an output, so each is checked before allocating."""
    dims(op, [("experts", experts, 2, "[T, K]")])
    _core.check_int(op, "num_experts", num_experts, 1)
    _core.check_int(op, "capacity", capacity, -1, what=" (-1: dropless)", c_max=_core.INT64_MAX)
    _core.check_int(op, "pad_multiple", pad_multiple, 1)
    policy = code(op, "drop_policy", DROP_POLICIES, drop_policy)
    T, K = experts.shape
    R_max = max_rows(T, K, num_experts, capacity, pad_multiple)
    if isinstance(T, int) and isinstance(K, int):  # concrete sizes: rows are i32 (R <= 2^31 - 1)
        rows = max(T * K, R_max)
        if rows > _core.INT32_MAX:
            raise ValueError(
                f"smoe.{op}: argument 'experts': expected T*K + E*(pad_multiple-1) <= 2^31 - 1 rows (rows are i32), "
                f"got T={T}, K={K}, E={num_experts}, pad_multiple={pad_multiple} ({rows} rows)"
            )
    specs = [
        ((num_experts,), torch.int32),
        ((num_experts + 1,), torch.int64),
        ((T, K), torch.int32),
        ((R_max,), torch.int32),
    ]
    return specs, policy


def _empty_on(device, specs):
    return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]


@torch.library.custom_op("smoe::routing_plan", mutates_args=())
def routing_plan_op(
    experts: Tensor,
    weights: Optional[Tensor],
    num_experts: int,
    capacity: int,
    drop_policy: str,
    pad_multiple: int,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    specs, policy = _routing_plan_shapes("routing_plan", experts, num_experts, capacity, drop_policy, pad_multiple)
    counts, offsets, row_of, token_of_row = _empty_on(experts.device, specs)
    T, K = experts.shape
    # The core allocates nothing: the workspace is the caller's (the CPU scratch buffer, one call long).
    ws = workspace(workspace_bytes(T, K, num_experts, capacity, drop_policy, pad_multiple), experts.device)
    _core.lib().routing_plan(
        **exec_args(backend, experts),
        num_experts=num_experts,
        capacity=capacity,
        drop_policy=policy,
        pad_multiple=pad_multiple,
        experts=v(experts, "experts"),
        weights=v(weights, "weights"),
        counts=v(counts, "counts"),
        offsets=v(offsets, "offsets"),
        row_of=v(row_of, "row_of"),
        token_of_row=v(token_of_row, "token_of_row"),
        workspace=v(ws, "workspace"),
    )
    return counts, offsets, row_of, token_of_row


@routing_plan_op.register_fake
def _(experts, weights, num_experts, capacity, drop_policy, pad_multiple, backend):
    specs, _ = _routing_plan_shapes("routing_plan", experts, num_experts, capacity, drop_policy, pad_multiple)
    return tuple(_empty_on(experts.device, specs))


def routing_plan_max_rows(
    T: int, K: int, *, num_experts: int, capacity: Optional[int] = None, pad_multiple: int = 1
) -> int:
    """Rows R_max of RoutingPlan.token_of_row (and of the permuted buffers) for T tokens and K picks.
    Equal to the C++ query smoe::routing_plan_max_rows; ValueError/TypeError naming a bad argument."""
    op = "routing_plan_max_rows"
    _core.check_int(op, "T", T, 0, c_max=_core.INT64_MAX)
    _core.check_int(op, "K", K, 0, c_max=_core.INT64_MAX)
    _core.check_int(op, "num_experts", num_experts, 1)
    if capacity is not None:
        _core.check_int(op, "capacity", capacity, 0, c_max=_core.INT64_MAX)
    _core.check_int(op, "pad_multiple", pad_multiple, 1)
    return min(max_rows(T, K, num_experts, -1 if capacity is None else capacity, pad_multiple), _core.INT64_MAX)


def routing_plan(
    experts: Tensor,
    *,
    num_experts: int,
    weights: Optional[Tensor] = None,
    capacity: Optional[int] = None,
    drop_policy: str = "token_order",
    pad_multiple: int = 1,
    backend: str = "auto",
) -> RoutingPlan:
    """The expert-sorted row layout of experts [T, K] i32 (not differentiable).

    Returns RoutingPlan(counts [E] i32, offsets [E+1] i64, row_of [T, K] i32 (-1: dropped),
    token_of_row [R_max] i32 (-1: padding, and rows past offsets[E])). Expert e owns rows
    [offsets[e], offsets[e] + counts[e]) in token order, its segment padded to a multiple of
    pad_multiple. capacity=None is dropless; with a capacity C an expert keeps its first C assignments
    ("token_order") or its C highest weights ("score", needs weights [T, K] f32, ties to the lower
    token). R_max = routing_plan_max_rows(T, K, ...) depends on shapes only, so no host sync is needed;
    plan.num_rows (= offsets[-1]) is the number of rows in use.
    """
    op = "routing_plan"
    backend = check_backend(op, backend, [("experts", experts)], [("weights", weights)])
    # ints that reach torch's schema: a float there would raise an error that names no argument
    _core.check_c_int(op, "num_experts", num_experts)
    _core.check_c_int(op, "pad_multiple", pad_multiple)
    if capacity is not None:
        _core.check_int(op, "capacity", capacity, 0, c_max=_core.INT64_MAX)
    cap = -1 if capacity is None else capacity
    w = None if weights is None else weights.detach()
    if backend == "reference":
        _routing_plan_shapes(op, experts, num_experts, cap, drop_policy, pad_multiple)
        return _ref.routing_plan(
            experts,
            num_experts=num_experts,
            weights=w,
            capacity=capacity,
            drop_policy=drop_policy,
            pad_multiple=pad_multiple,
        )
    return RoutingPlan(*routing_plan_op(experts, w, num_experts, cap, drop_policy, pad_multiple, backend))


def as_plan(op: str, plan) -> RoutingPlan:
    """A RoutingPlan, or any 4-tuple of tensors (counts, offsets, row_of, token_of_row) made into one."""
    if not (isinstance(plan, tuple) and len(plan) == 4):
        raise TypeError(
            f"smoe.{op}: argument 'plan': expected a RoutingPlan (counts, offsets, row_of, token_of_row), "
            f"got {type(plan).__name__}"
        )
    plan = plan if isinstance(plan, RoutingPlan) else RoutingPlan(*plan)
    for field, ndim, layout in (
        ("counts", 1, "[E]"),
        ("offsets", 1, "[E+1]"),
        ("row_of", 2, "[T, K]"),
        ("token_of_row", 1, "[R]"),
    ):
        _core.check_dims(op, f"plan.{field}", getattr(plan, field), ndim, layout)
    return plan

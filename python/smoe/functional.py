"""smoe.functional: the ops of a sparse MoE layer, for PyTorch tensors.

A re-export list: each function lives in its family's module of smoe.ops (smoe.functional.X is
smoe.ops.X), beside its torch custom op torch.ops.smoe.<name>, so torch.compile(fullgraph=True)
traces them.

Every function takes its tensors positionally and everything else by keyword, accepts
backend="auto" (cpu for CPU tensors, cuda for CUDA tensors; resolved by the C++ core), "cpu", "cuda"
(CUDA tensors, when the build has nvcc), "simt" (CPU tensors: the CUDA kernels run by the SIMT
emulator, for tests and teaching), or "reference" (smoe.reference: plain PyTorch), and is
differentiable w.r.t. its float tensor inputs. smoe.BACKENDS lists what this build contains. Shapes:
T tokens, H hidden, F expert FFN size (F1 = 2F for gated activations), E experts, K experts per
token, R rows of the expert-sorted buffer, C capacity per expert.

Errors: bad arguments raise ValueError (TypeError for a non-tensor) naming the argument and what was
expected; the C++ core checks them, Python only what it needs to allocate the outputs
(smoe/ops/_common.py).
"""

from __future__ import annotations

from smoe import reference as _ref
from smoe.ops import (  # noqa: F401  (the public functions)
    RoutingPlan,
    activation,
    balancing_bias_update,
    combine,
    expert_choice,
    expert_mlp,
    expert_mlp_combine_top1,
    grouped_gemm,
    load_balancing_loss,
    permute,
    routing_plan,
    routing_plan_max_rows,
    shared_expert,
    topk_gating,
    z_loss,
)

# One op, one name in every layer: the public names are those of the readable reference.
__all__ = list(_ref.ops.__all__)

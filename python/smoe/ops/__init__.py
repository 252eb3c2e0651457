"""smoe.ops: the op layer, one module per op family, mirroring csrc/bindings/.

    topk_gating.py    token-choice top-k gating            csrc/bindings/topk_gating.cpp
    expert_choice.py  expert-choice routing                csrc/bindings/expert_choice.cpp
    router_losses.py  load-balancing loss, z-loss, bias    csrc/bindings/router_losses.cpp
    routing.py        the routing plan                     csrc/bindings/routing.cpp
    permute.py        permute / combine                    csrc/bindings/permute.cpp
    gemm.py           grouped GEMMs                        csrc/bindings/gemm.cpp
    activation.py     expert activations                   csrc/bindings/activation.cpp
    mlp.py            fused expert MLP, shared expert      csrc/bindings/mlp.cpp
    cublas.py         cuBLAS grouped GEMM (GPU baseline)   csrc/bindings/cublas.cpp

Each holds the public keyword-only function (smoe.ops.<name>, re-exported by smoe.functional), the
torch custom op torch.ops.smoe.<name> (registered with torch.library.custom_op: a real implementation
that allocates the outputs with torch and calls smoe._C once, a fake for torch.compile, an autograd
formula calling the backward op), and one output-shape function shared by the real op and the fake.
smoe/ops/_common.py describes the pattern and what Python checks (what it needs to allocate; the rest
is the C++ core's, whose ValueError names the argument).

The custom-op objects of the forward ops are <name>_op (torch.ops.smoe.<name> is the same op); the
backward ops keep their names (smoe.ops.topk_gating_backward is torch.ops.smoe.topk_gating_backward).
"""

# Every name below is part of smoe.ops (the names it had as one module, the ops, their functions).
from smoe.ops._common import (  # noqa: F401
    ACTIVATIONS,
    DROP_POLICIES,
    GATED_ACTIVATIONS,
    GROUP_SCORES,
    SCORE_FUNCS,
    _scratch,
    _scratch_views,
    acc_dtype,
    release_scratch,
)
from smoe.ops.activation import activation, activation_backward, activation_op  # noqa: F401
from smoe.ops.cublas import grouped_gemm_cublas, grouped_gemm_wgrad_cublas, has_cublas  # noqa: F401
from smoe.ops.expert_choice import expert_choice, expert_choice_backward, expert_choice_op  # noqa: F401
from smoe.ops.gemm import grouped_gemm, grouped_gemm_op, grouped_gemm_wgrad  # noqa: F401
from smoe.ops.mlp import (  # noqa: F401
    expert_mlp,
    expert_mlp_backward,
    expert_mlp_combine_top1,
    expert_mlp_combine_top1_op,
    expert_mlp_op,
    shared_expert,
    shared_expert_backward,
    shared_expert_op,
)
from smoe.ops.permute import (  # noqa: F401
    check_permute_x,
    combine,
    combine_backward,
    combine_op,
    permute,
    permute_backward,
    permute_op,
)
from smoe.ops.router_losses import (  # noqa: F401
    balancing_bias_update,
    balancing_bias_update_op,
    load_balancing_loss,
    load_balancing_loss_backward,
    load_balancing_loss_op,
    z_loss,
    z_loss_backward,
    z_loss_op,
)
from smoe.ops.routing import RoutingPlan, routing_plan, routing_plan_max_rows, routing_plan_op  # noqa: F401
from smoe.ops.topk_gating import topk_gating, topk_gating_backward, topk_gating_op  # noqa: F401
from smoe.reference.ops import __all__ as _PUBLIC  # one op, one name in every layer

__all__ = list(_PUBLIC) + [
    "SCORE_FUNCS",
    "GROUP_SCORES",
    "ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "DROP_POLICIES",
    "acc_dtype",
    "release_scratch",
]

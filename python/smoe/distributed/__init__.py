"""Expert parallelism on torch.distributed (docs/distributed.md).

- comm.all_to_all_single / exchange_counts: autograd-aware all-to-all with uneven splits, count exchange;
- ExpertParallelMoE: smoe.nn.MoE with its routed experts sharded over an EP group;
- expert_parameters / all_reduce_gradients: the gradient reduction of EP x data parallel;
- run_local: spawn N local gloo ranks (tests, examples, benchmarks).
"""

from smoe.distributed.comm import all_to_all_single, exchange_counts
from smoe.distributed.grads import (
    all_reduce_gradients,
    ddp_ignore_expert_parameters,
    expert_parameters,
    is_expert_parameter,
)
from smoe.distributed.launch import run_local
from smoe.distributed.layer import ExpertParallelMoE, local_routing_plan

__all__ = [
    "all_to_all_single",
    "exchange_counts",
    "ExpertParallelMoE",
    "local_routing_plan",
    "expert_parameters",
    "is_expert_parameter",
    "all_reduce_gradients",
    "ddp_ignore_expert_parameters",
    "run_local",
]

"""smoe.nn: PyTorch modules built on smoe's ops, and the helpers a training loop calls.

MoE (smoe/nn/moe.py) composes a Router (router.py), RoutedExperts and an optional SharedExpert
(experts.py), all configured by one MoEArgs (args.py); docs/layer.md has the module tree.
"""

from smoe.nn.args import MoEArgs
from smoe.nn.experts import RoutedExperts, SharedExpert
from smoe.nn.moe import AuxLossUnusedWarning, MoE, aux_loss, end_step, end_step_after, set_aux_loss_scale
from smoe.nn.router import Router, Routing, expert_choice_plan

__all__ = [
    "MoE",
    "MoEArgs",
    "Router",
    "Routing",
    "RoutedExperts",
    "SharedExpert",
    "expert_choice_plan",
    "AuxLossUnusedWarning",
    "aux_loss",
    "end_step",
    "end_step_after",
    "set_aux_loss_scale",
]

"""smoe.nn: PyTorch modules built on smoe's ops, and the helpers a training loop calls."""

from smoe.nn.moe import MoE, AuxLossUnusedWarning, aux_loss, end_step, end_step_after, set_aux_loss_scale

__all__ = ["MoE", "AuxLossUnusedWarning", "aux_loss", "end_step", "end_step_after", "set_aux_loss_scale"]

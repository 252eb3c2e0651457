"""The router's auxiliary losses and the aux-loss-free bias update: smoe.ops.load_balancing_loss,
z_loss, balancing_bias_update (torch.ops.smoe.*). C++: include/smoe/ops/gating.h (router_losses.h
after the split), binding csrc/bindings/router_losses.cpp.

The losses take their scratch from the caller (no allocation inside the core): the byte counts are
the formulas of smoe::load_balancing_loss_workspace_bytes / z_loss_workspace_bytes, mirrored here
so that a loss crosses into C++ once (tests/python/test_ops_router_losses.py checks both agree)."""

from __future__ import annotations

import torch
from torch import Tensor

from smoe import _core
from smoe import reference as _ref
from smoe.ops._common import acc_dtype, check_backend, dims, empty, exec_args, v, workspace

__all__ = ["load_balancing_loss", "z_loss", "balancing_bias_update"]


def _align256(n: int) -> int:
    return -(-n // 256) * 256


def load_balancing_loss_workspace_bytes(T: int, E: int) -> int:
    """Scratch of the load-balancing loss (forward and backward): per-expert counts, then one partial
    sum per expert and block of `chunk` tokens (the CUDA kernels' layout)."""
    if T <= 0 or E <= 0:
        return 0
    chunk = 256 if T <= 65536 else -(-T // 256)
    nb = -(-T // chunk)
    return _align256(4 * E) + 4 * E * nb


def z_loss_workspace_bytes(T: int, E: int) -> int:
    """Scratch of the z-loss (forward and backward): one f64 partial per token."""
    return 0 if T <= 0 or E <= 0 else 8 * T


# ---- load-balancing loss -------------------------------------------------------------------------


def _lb_shapes(probs):
    dims("load_balancing_loss", [("probs", probs, 2, "[T, E]")])
    return [((), None)]  # the loss, 0-d, in the probs' dtype


@torch.library.custom_op("smoe::load_balancing_loss", mutates_args=())
def load_balancing_loss_op(probs: Tensor, experts: Tensor, backend: str) -> Tensor:
    (loss,) = empty(probs, _lb_shapes(probs))
    ws = workspace(load_balancing_loss_workspace_bytes(*probs.shape), probs.device)
    _core.lib().load_balancing_loss_forward(
        **exec_args(backend, probs),
        probs=v(probs, "probs"),
        experts=v(experts, "experts"),
        loss=v(loss, "loss"),
        workspace=v(ws, "workspace"),
    )
    return loss


@load_balancing_loss_op.register_fake
def _(probs, experts, backend):
    return empty(probs, _lb_shapes(probs))[0]


def _lb_backward_shapes(probs):
    dims("load_balancing_loss_backward", [("probs", probs, 2, "[T, E]")])
    return [(tuple(probs.shape), None)]  # grad_probs [T, E], dense


@torch.library.custom_op("smoe::load_balancing_loss_backward", mutates_args=())
def load_balancing_loss_backward(probs: Tensor, experts: Tensor, grad_loss: Tensor, backend: str) -> Tensor:
    (grad_probs,) = empty(probs, _lb_backward_shapes(probs))
    ws = workspace(load_balancing_loss_workspace_bytes(*probs.shape), probs.device)
    _core.lib().load_balancing_loss_backward(
        **exec_args(backend, probs),
        probs=v(probs, "probs"),
        experts=v(experts, "experts"),
        grad_loss=v(grad_loss, "grad_loss"),
        grad_probs=v(grad_probs, "grad_probs"),
        workspace=v(ws, "workspace"),
    )
    return grad_probs


@load_balancing_loss_backward.register_fake
def _(probs, experts, grad_loss, backend):
    return empty(probs, _lb_backward_shapes(probs))[0]


def _lb_setup(ctx, inputs, output):
    probs, experts, backend = inputs
    ctx.save_for_backward(probs, experts)
    ctx.backend = backend


def _lb_backward(ctx, grad_loss):
    probs, experts = ctx.saved_tensors
    g = grad_loss.reshape(()).to(probs.dtype).contiguous()
    return torch.ops.smoe.load_balancing_loss_backward(probs, experts, g, ctx.backend), None, None


load_balancing_loss_op.register_autograd(_lb_backward, setup_context=_lb_setup)


def load_balancing_loss(probs: Tensor, experts: Tensor, *, backend: str = "auto") -> Tensor:
    """Switch load-balancing loss, Hugging Face Mixtral's top-k form:
    E * sum_e (count_e / T) * mean_t probs[t, e], count_e = #(t, k) with experts[t, k] == e.
    probs [T, E] f32 (f64), experts [T, K] i32 -> 0-d loss. The counts are constants; probs carries
    the gradient. T = 0 gives 0."""
    op = "load_balancing_loss"
    backend = check_backend(op, backend, [("probs", probs), ("experts", experts)])
    if backend == "reference":
        _lb_shapes(probs)
        return _ref.load_balancing_loss(probs, experts)
    return load_balancing_loss_op(probs, experts, backend)


# ---- z-loss --------------------------------------------------------------------------------------


def _z_shapes(op, logits, out_shape):
    dims(op, [("logits", logits, 2, "[T, E]")])
    return [(out_shape, acc_dtype(logits.dtype))]


@torch.library.custom_op("smoe::z_loss", mutates_args=())
def z_loss_op(logits: Tensor, backend: str) -> Tensor:
    (loss,) = empty(logits, _z_shapes("z_loss", logits, ()))  # 0-d, f32 (f64)
    ws = workspace(z_loss_workspace_bytes(*logits.shape), logits.device)
    _core.lib().z_loss_forward(
        **exec_args(backend, logits), logits=v(logits, "logits"), loss=v(loss, "loss"), workspace=v(ws, "workspace")
    )
    return loss


@z_loss_op.register_fake
def _(logits, backend):
    return empty(logits, _z_shapes("z_loss", logits, ()))[0]


@torch.library.custom_op("smoe::z_loss_backward", mutates_args=())
def z_loss_backward(logits: Tensor, grad_loss: Tensor, backend: str) -> Tensor:
    (grad_logits,) = empty(logits, _z_shapes("z_loss_backward", logits, tuple(logits.shape)))  # [T, E] f32 (f64)
    ws = workspace(z_loss_workspace_bytes(*logits.shape), logits.device)
    _core.lib().z_loss_backward(
        **exec_args(backend, logits),
        logits=v(logits, "logits"),
        grad_loss=v(grad_loss, "grad_loss"),
        grad_logits=v(grad_logits, "grad_logits"),
        workspace=v(ws, "workspace"),
    )
    return grad_logits


@z_loss_backward.register_fake
def _(logits, grad_loss, backend):
    return empty(logits, _z_shapes("z_loss_backward", logits, tuple(logits.shape)))[0]


def _z_setup(ctx, inputs, output):
    logits, backend = inputs
    ctx.save_for_backward(logits)
    ctx.backend = backend


def _z_backward(ctx, grad_loss):
    (logits,) = ctx.saved_tensors
    g = grad_loss.reshape(()).to(acc_dtype(logits.dtype)).contiguous()
    return torch.ops.smoe.z_loss_backward(logits, g, ctx.backend).to(logits.dtype), None


z_loss_op.register_autograd(_z_backward, setup_context=_z_setup)


def z_loss(logits: Tensor, *, backend: str = "auto") -> Tensor:
    """Router z-loss (ST-MoE eq. 5): mean_t logsumexp(logits[t])^2, a 0-d f32 (f64) tensor; T = 0 gives 0."""
    op = "z_loss"
    backend = check_backend(op, backend, [("logits", logits)])
    if backend == "reference":
        _z_shapes(op, logits, ())
        return _ref.z_loss(logits)
    return z_loss_op(logits, backend)


# ---- aux-loss-free balancing ---------------------------------------------------------------------


@torch.library.custom_op("smoe::balancing_bias_update", mutates_args=("bias",))
def balancing_bias_update_op(counts: Tensor, bias: Tensor, rate: float, backend: str) -> None:
    _core.lib().balancing_bias_update(
        **exec_args(backend, counts), counts=v(counts, "counts"), bias=v(bias, "bias"), rate=rate
    )


@balancing_bias_update_op.register_fake
def _(counts, bias, rate, backend):
    return None


def balancing_bias_update(counts: Tensor, bias: Tensor, *, rate: float, backend: str = "auto") -> None:
    """Aux-loss-free balancing (DeepSeek-V3): bias[e] += rate * sign(mean(counts) - counts[e]), in place.
    counts [E] i32 (tokens routed to each expert in a step), bias [E] f32. No gradient."""
    op = "balancing_bias_update"
    backend = check_backend(op, backend, [("counts", counts), ("bias", bias)])
    if backend == "reference":
        return _ref.balancing_bias_update(counts, bias, rate=rate)
    with torch.no_grad():
        balancing_bias_update_op(counts, bias, float(rate), backend)

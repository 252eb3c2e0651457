// csrc/cpu/router_losses.h: CPU backend of the router losses and the bias update (see
// include/smoe/ops/router_losses.h). Validated by csrc/core/router_losses.cpp first; checks here need
// the data (NaN logits, out-of-range experts, negative counts). The CPU backend needs no workspace:
// the trailing argument (the caller's scratch, possibly absent) is ignored.
#pragma once

#include "smoe/ops/router_losses.h"

namespace smoe::cpu {

Status load_balancing_loss_forward(const TensorView& probs, const TensorView& experts, const TensorView& loss,
                                   const TensorView& workspace = {});
Status load_balancing_loss_backward(const TensorView& probs, const TensorView& experts, const TensorView& grad_loss,
                                    const TensorView& grad_probs, const TensorView& workspace = {});

Status z_loss_forward(const TensorView& logits, const TensorView& loss, const TensorView& workspace = {});
Status z_loss_backward(const TensorView& logits, const TensorView& grad_loss, const TensorView& grad_logits,
                       const TensorView& workspace = {});

Status balancing_bias_update(const TensorView& counts, const TensorView& bias, float rate);

}  // namespace smoe::cpu

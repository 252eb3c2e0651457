// csrc/cpu/activation.h: CPU backend of the expert activations (include/smoe/ops/activation.h).
// csrc/core/activation.cpp validates shapes, dtypes and devices before calling these.
#pragma once

#include "smoe/ops/activation.h"

namespace smoe::cpu {

Status activation_forward(Activation act, const TensorView& in, const TensorView& out);
Status activation_backward(Activation act, const TensorView& in, const TensorView& grad_out, const TensorView& grad_in);

}  // namespace smoe::cpu

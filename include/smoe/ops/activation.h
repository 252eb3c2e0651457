// smoe/ops/activation.h: the expert activations, elementwise over rows [R, F1] -> [R, F].
// Same dtype in and out; arithmetic in the accumulation type (smoe/dtype.h), one rounding on store.
#pragma once

#include "smoe/tensor.h"

namespace smoe {

enum class Activation : int32_t {
  kSwiGLU = 0,  // gated: in [R, 2F] = [g | u] -> silu(g) * u      (Shazeer, 2020, arXiv:2002.05202)
  kGeGLU = 1,   // gated: in [R, 2F] = [g | u] -> gelu(g) * u      (exact, erf-based gelu)
  kGELU = 2,    // in [R, F] -> gelu(in)
  kReLU = 3,    // in [R, F] -> max(in, 0)
};

constexpr bool is_gated(Activation a) { return a == Activation::kSwiGLU || a == Activation::kGeGLU; }

// in [R, F1] (F1 = 2F if gated else F), out [R, F]; same dtype.
Status activation_forward(const Exec& exec, Activation act, const TensorView& in, const TensorView& out);
// grad_out [R, F], in [R, F1] -> grad_in [R, F1]
Status activation_backward(const Exec& exec, Activation act, const TensorView& in, const TensorView& grad_out,
                           const TensorView& grad_in);

}  // namespace smoe

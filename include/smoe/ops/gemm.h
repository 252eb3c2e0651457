// smoe/ops/gemm.h: grouped GEMM over expert segments, and the expert activations.
//
// Weights follow nn.Linear: w[e] is [out, in]. Segments come from offsets [E+1] i64 (device memory
// on a GPU; never copied to the host). f32 accumulation for f32/bf16/f16, f64 for f64.
#pragma once

#include "smoe/tensor.h"

namespace smoe {

struct GroupedGemmParams {
  bool trans_b = true;  // true: c[seg] = a[seg] @ b[e]^T (b [E, N, Kd]); false: a[seg] @ b[e] (b [E, Kd, N])
};

// a [R, Kd], b [E, N, Kd] or [E, Kd, N], offsets [E+1] i64, c [R, N] out (same dtype as a and b).
// Rows of c at or past offsets[E] are left untouched.
Status grouped_gemm(const Exec& exec, const GroupedGemmParams& params, const TensorView& a,
                    const TensorView& b, const TensorView& offsets, const TensorView& c);

// The weight-gradient ("variable-K") form: c[e] = a[seg_e]^T @ b[seg_e].
// a [R, M], b [R, N], offsets [E+1] i64, c [E, M, N] out. An empty segment gives exact zeros.
Status grouped_gemm_wgrad(const Exec& exec, const TensorView& a, const TensorView& b,
                          const TensorView& offsets, const TensorView& c);

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
Status activation_backward(const Exec& exec, Activation act, const TensorView& in,
                           const TensorView& grad_out, const TensorView& grad_in);

}  // namespace smoe

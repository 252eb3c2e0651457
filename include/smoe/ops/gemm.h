// smoe/ops/gemm.h: grouped GEMM over expert segments (the expert activations, which every expert
// MLP applies between its two GEMMs, are their own family in smoe/ops/activation.h, included here).
//
// Weights follow nn.Linear: w[e] is [out, in]. Segments come from offsets [E+1] i64 (device memory
// on a GPU; never copied to the host). f32 accumulation for f32/bf16/f16, f64 for f64.
#pragma once

#include "smoe/ops/activation.h"
#include "smoe/tensor.h"

namespace smoe {

struct GroupedGemmParams {
  bool trans_b = true;  // true: c[seg] = a[seg] @ b[e]^T (b [E, N, Kd]); false: a[seg] @ b[e] (b [E, Kd, N])
};

// a [R, Kd], b [E, N, Kd] or [E, Kd, N], offsets [E+1] i64, c [R, N] out (same dtype as a and b).
// Rows of c at or past offsets[E] are left untouched.
Status grouped_gemm(const Exec& exec, const GroupedGemmParams& params, const TensorView& a, const TensorView& b,
                    const TensorView& offsets, const TensorView& c);

// The weight-gradient ("variable-K") form: c[e] = a[seg_e]^T @ b[seg_e].
// a [R, M], b [R, N], offsets [E+1] i64, c [E, M, N] out. An empty segment gives exact zeros.
Status grouped_gemm_wgrad(const Exec& exec, const TensorView& a, const TensorView& b, const TensorView& offsets,
                          const TensorView& c);

}  // namespace smoe

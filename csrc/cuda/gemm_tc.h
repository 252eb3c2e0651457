// csrc/cuda/gemm_tc.h: the tensor-core grouped GEMM of the CUDA backend (sm_80+), with the fusions
// of the expert MLP: a token gather in the A loads, the activation in the first GEMM's epilogue, the
// per-row routing weight in the second GEMM's epilogue; and the variable-K weight-gradient form.
// Kernels: csrc/cuda/gemm_tc.cuh; launchers: csrc/cuda/gemm_tc.cu; design: docs/kernels/grouped_gemm.md.
//
// Like backend.h, declared twice: smoe::cuda (nvcc) and smoe::cuda_simt (the same .cu through the
// SIMT emulator, host pointers). Plain C++: no CUDA header. No launcher synchronises the host; the
// expert segments are read from the device offsets inside the kernels, so a layer that calls them
// can be captured in a CUDA graph.
//
// Supported: bf16 and f16 (mma.m16n8k16 with f32 accumulation), and f32 as 3xTF32 (mma.m16n8k8.tf32).
// Anything else (f32 with b [E, Kd, N] and a gated activation, f64) returns
// kUnsupported naming the fallback: grouped_gemm_naive / grouped_gemm_wgrad_naive (f32), the CPU
// backend (f64). So do grouped_gemm_tc and grouped_gemm_wgrad_gathered_tc while the grouped_gemm
// kernel version is 0 (backend_api.inc), which is how the tests run the callers' v0 fallbacks.
// Any size and stride: 16-byte aligned rows load with cp.async (a partial last chunk through
// src-size), other rows element by element; edges are predicated and zero-filled.
#pragma once

#include <optional>

#include "smoe/smoe.h"

namespace smoe {

struct GroupedGemmTcParams {
  bool trans_b = true;  // true: b [E, N, Kd] (nn.Linear weights); false: b [E, Kd, N]
  // Epilogue activation (absent: plain store). For a gated activation the GEMM's N is 2F with
  // b's output rows ordered [gate | up] (the layout of w1 in include/smoe/ops/mlp.h); c is [R, F].
  std::optional<Activation> activation;
  // Store-row mapping [R] i32 or absent: row r's result goes to c[store_row[r]] (negative or past c's
  // rows: not stored) and row_weights is indexed by that stored row. The top-1 combine in the epilogue
  // (expert_mlp_combine_top1_forward): each stored row is named by at most one r, so plain stores.
  TensorView store_row;
};

}  // namespace smoe

#define SMOE_DETAIL_GEMM_TC_DECLS                                                                                   \
  /* c[r] = epilogue(a[row r] @ op(b[e])) for every row r in expert e's segment [offsets[e], offsets[e+1]). \
     a            [R, Kd], or [T, Kd] with token_of_row: row r reads a[token_of_row[r]] (-1: zeros)         \
     b            [E, N, Kd] (trans_b) or [E, Kd, N]                                                       \
     offsets      [E+1] i64, device; rows past offsets[E] are left untouched                               \
     token_of_row [R] i32 or absent                                                                         \
     row_weights  [R] f32 or absent: the stored value is multiplied by row_weights[r] before rounding       \
     c            [R, N], or [R, F] (N = 2F) with a gated activation                                        \
     pre          absent, or with an activation [R, N]: the pre-activation values (saved for backward);     \
                  the activation is computed from pre rounded to the storage type, as the unfused path     \
                  activation_forward(pre) does. */       \
  Status grouped_gemm_tc(const GroupedGemmTcParams& params, const TensorView& a, const TensorView& b,               \
                         const TensorView& offsets, const TensorView& token_of_row, const TensorView& row_weights,  \
                         const TensorView& c, const TensorView& pre, void* stream);                                 \
  /* The variable-K form (weight gradients): c[e] = a[seg_e]^T @ b[seg_e], the reduction over the rows of   \
     segment e. a [R, M], b [R, N], offsets [E+1] i64, c [E, M, N]; an empty segment writes exact zeros. */       \
  Status grouped_gemm_wgrad_tc(const TensorView& a, const TensorView& b, const TensorView& offsets,                 \
                               const TensorView& c, void* stream);                                                  \
  /* The same with the B operand gathered: row r of B is b[b_token_of_row[r]] (-1 or out of range: zeros), \
     b [T, N], b_token_of_row [R] i32 (R = a.size(0)): the expert MLP's grad_w1 = grad_pre^T x[token_of_row] \
     reads x directly, with no permuted copy. */        \
  Status grouped_gemm_wgrad_gathered_tc(const TensorView& a, const TensorView& b, const TensorView& b_token_of_row, \
                                        const TensorView& offsets, const TensorView& c, void* stream);

namespace smoe::cuda {
SMOE_DETAIL_GEMM_TC_DECLS
}  // namespace smoe::cuda

namespace smoe::cuda_simt {
SMOE_DETAIL_GEMM_TC_DECLS
}  // namespace smoe::cuda_simt

#undef SMOE_DETAIL_GEMM_TC_DECLS

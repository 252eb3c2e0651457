// smoe/ops/mlp.h: the fused expert MLP (gather -> GEMM -> activation -> GEMM) and shared experts.
#pragma once

#include "smoe/ops/gemm.h"

namespace smoe {

struct ExpertMlpParams {
  Activation activation = Activation::kSwiGLU;
};

// x [T, H]; token_of_row [R] i32; offsets [E+1] i64; w1 [E, F1, H]; w2 [E, H, F]   (F1 = 2F if gated)
// Row r of expert e reads x[token_of_row[r]] straight into the first GEMM (-1: a zero row); no
// permuted copy of x is written or kept.
// outputs saved for backward: pre [R, F1] (before activation), act [R, F]
// ys [R, H] out: expert output per row (not yet weighted or combined). All float tensors one dtype.
// Rows outside [offsets[0], offsets[E]) of pre, act and ys become zeros.
Status expert_mlp_forward(const Exec& exec, const ExpertMlpParams& params, const TensorView& x,
                          const TensorView& token_of_row, const TensorView& offsets, const TensorView& w1,
                          const TensorView& w2, const TensorView& pre, const TensorView& act, const TensorView& ys);

// Inference-only top-1 forward with the combine fused into the second GEMM's epilogue (no ys [R, H],
// no combine pass): y[t] = weights[t, 0] * (act(x[t] @ w1[e]^T) @ w2[e]^T) for the one row r of
// expert e with token_of_row[r] == t, and y[t] = 0 for a token with no row (dropped by capacity).
// Precondition (top-1 plans): each token is named by at most one row in [offsets[0], offsets[E]);
// rows with token -1 (padding) or outside the segments are skipped. Same x, token_of_row, offsets,
// w1, w2 as expert_mlp_forward; weights [T, 1] (f32; f64 for f64 x); y [T, H] fully written.
// Nothing is saved for a backward. workspace: bytes from expert_mlp_combine_top1_workspace_bytes
// (pre [R, F1], act [R, F], and [R, H] rows on the CPU backend). The result is the unfused
// expert_mlp_forward + combine_forward's up to one rounding (ys is not rounded before weighting
// on the device backends).
int64_t expert_mlp_combine_top1_workspace_bytes(const ExpertMlpParams& params, DType dtype, int64_t R, int64_t H,
                                                int64_t F);
Status expert_mlp_combine_top1_forward(const Exec& exec, const ExpertMlpParams& params, const TensorView& x,
                                       const TensorView& token_of_row, const TensorView& offsets, const TensorView& w1,
                                       const TensorView& w2, const TensorView& weights, const TensorView& y,
                                       const TensorView& workspace);

// grad_ys [R, H]; x [T, H] and token_of_row [R] of the forward (grad_w1 = sum over the rows r of
// expert e of grad_pre[r]^T x[token_of_row[r]], x read through token_of_row again); row_of [T, K] i32;
// the saved pre, act; outputs grad_x [T, H], grad_w1 [E, F1, H], grad_w2 [E, H, F].
// workspace: bytes from expert_mlp_workspace_bytes (layout: csrc/core/workspace.h).
int64_t expert_mlp_workspace_bytes(const ExpertMlpParams& params, DType dtype, int64_t R, int64_t H, int64_t F);
Status expert_mlp_backward(const Exec& exec, const ExpertMlpParams& params, const TensorView& grad_ys,
                           const TensorView& x, const TensorView& token_of_row, const TensorView& row_of,
                           const TensorView& offsets, const TensorView& w1, const TensorView& w2, const TensorView& pre,
                           const TensorView& act, const TensorView& grad_x, const TensorView& grad_w1,
                           const TensorView& grad_w2, const TensorView& workspace);

// Shared experts (DeepSeekMoE arXiv:2401.06066; Qwen2-MoE): every token passes through one dense
// MLP (several shared experts are one MLP of their summed width), optionally scaled by a sigmoid gate:
//   y[t] += sigmoid(<x[t], gate_w>) * (act(x[t] @ w1^T) @ w2^T)       (gate_w absent: scale 1)
// x [T, H]; w1 [F1, H]; w2 [H, F]; gate_w [H] or absent;
// saved: pre [T, F1], act [T, F], out [T, H] (the MLP output before gating), gate [T] f32 (sigmoid);
// y [T, H] is accumulated into (y += ...).
Status shared_expert_forward(const Exec& exec, const ExpertMlpParams& params, const TensorView& x, const TensorView& w1,
                             const TensorView& w2, const TensorView& gate_w, const TensorView& pre,
                             const TensorView& act, const TensorView& out, const TensorView& gate, const TensorView& y);
// grad_y [T, H] -> grad_x [T, H] (accumulated into: grad_x += ...), grad_w1, grad_w2, grad_gate_w [H] (if gated).
// Without gate_w, `out` is never read by the backward and may be absent (so a caller need not keep the
// [T, H] MLP output, which then equals the y it added).
// workspace: bytes from shared_expert_workspace_bytes.
int64_t shared_expert_workspace_bytes(const ExpertMlpParams& params, DType dtype, int64_t T, int64_t H, int64_t F);
Status shared_expert_backward(const Exec& exec, const ExpertMlpParams& params, const TensorView& grad_y,
                              const TensorView& x, const TensorView& w1, const TensorView& w2, const TensorView& gate_w,
                              const TensorView& pre, const TensorView& act, const TensorView& out,
                              const TensorView& gate, const TensorView& grad_x, const TensorView& grad_w1,
                              const TensorView& grad_w2, const TensorView& grad_gate_w, const TensorView& workspace);

}  // namespace smoe

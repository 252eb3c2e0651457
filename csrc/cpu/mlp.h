// csrc/cpu/mlp.h: CPU backend of the expert MLP and shared-expert ops (include/smoe/ops/mlp.h).
//
// These compose the public ops (permute, grouped_gemm, activation) on the CPU backend; the entry
// points in csrc/core/mlp.cpp have validated every argument before calling them.
#pragma once

#include "smoe/ops/mlp.h"

namespace smoe::cpu {

// Layout of the backward workspaces: each intermediate starts on a kWorkspaceAlign boundary.
inline constexpr int64_t kWorkspaceAlign = 64;
// Bytes one intermediate takes in a workspace, padded to the alignment.
inline int64_t workspace_piece(int64_t bytes) {
  return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

Status expert_mlp_forward(const ExpertMlpParams& params, const TensorView& x, const TensorView& token_of_row,
                          const TensorView& offsets, const TensorView& w1, const TensorView& w2,
                          const TensorView& xs, const TensorView& pre, const TensorView& act, const TensorView& ys);

Status expert_mlp_backward(const ExpertMlpParams& params, const TensorView& grad_ys, const TensorView& row_of,
                           const TensorView& offsets, const TensorView& w1, const TensorView& w2,
                           const TensorView& xs, const TensorView& pre, const TensorView& act,
                           const TensorView& grad_x, const TensorView& grad_w1, const TensorView& grad_w2,
                           const TensorView& workspace);

Status shared_expert_forward(const ExpertMlpParams& params, const TensorView& x, const TensorView& w1,
                             const TensorView& w2, const TensorView& gate_w, const TensorView& pre,
                             const TensorView& act, const TensorView& out, const TensorView& gate,
                             const TensorView& y);

Status shared_expert_backward(const ExpertMlpParams& params, const TensorView& grad_y, const TensorView& x,
                              const TensorView& w1, const TensorView& w2, const TensorView& gate_w,
                              const TensorView& pre, const TensorView& act, const TensorView& out,
                              const TensorView& gate, const TensorView& grad_x, const TensorView& grad_w1,
                              const TensorView& grad_w2, const TensorView& grad_gate_w, const TensorView& workspace);

}  // namespace smoe::cpu

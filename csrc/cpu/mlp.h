// csrc/cpu/mlp.h: CPU backend of the expert MLP and shared-expert ops (include/smoe/ops/mlp.h).
//
// These compose the CPU backend's own functions (cpu::permute_*, cpu::grouped_gemm*_prechecked,
// cpu::activation_*), never the public API; the entry points in csrc/core/mlp.cpp have validated
// every argument before calling them, and the offsets are checked once per call here. Workspace
// layout: csrc/core/workspace.h.
#pragma once

#include "smoe/ops/mlp.h"

namespace smoe::cpu {

Status expert_mlp_forward(const ExpertMlpParams& params, const TensorView& x, const TensorView& token_of_row,
                          const TensorView& offsets, const TensorView& w1, const TensorView& w2, const TensorView& pre,
                          const TensorView& act, const TensorView& ys);

Status expert_mlp_combine_top1_forward(const ExpertMlpParams& params, const TensorView& x,
                                       const TensorView& token_of_row, const TensorView& offsets, const TensorView& w1,
                                       const TensorView& w2, const TensorView& weights, const TensorView& y,
                                       const TensorView& workspace);

Status expert_mlp_backward(const ExpertMlpParams& params, const TensorView& grad_ys, const TensorView& x,
                           const TensorView& token_of_row, const TensorView& row_of, const TensorView& offsets,
                           const TensorView& w1, const TensorView& w2, const TensorView& pre, const TensorView& act,
                           const TensorView& grad_x, const TensorView& grad_w1, const TensorView& grad_w2,
                           const TensorView& workspace);

Status shared_expert_forward(const ExpertMlpParams& params, const TensorView& x, const TensorView& w1,
                             const TensorView& w2, const TensorView& gate_w, const TensorView& pre,
                             const TensorView& act, const TensorView& out, const TensorView& gate, const TensorView& y);

Status shared_expert_backward(const ExpertMlpParams& params, const TensorView& grad_y, const TensorView& x,
                              const TensorView& w1, const TensorView& w2, const TensorView& gate_w,
                              const TensorView& pre, const TensorView& act, const TensorView& out,
                              const TensorView& gate, const TensorView& grad_x, const TensorView& grad_w1,
                              const TensorView& grad_w2, const TensorView& grad_gate_w, const TensorView& workspace);

}  // namespace smoe::cpu

// smoe/ops/router_losses.h: the router's auxiliary losses and the bias update of aux-loss-free
// balancing (the router family's conventions: smoe/ops/topk_gating.h).
//
// Workspace: the losses take a scratch buffer from the caller (u8, at least the queried bytes, on
// the tensors' device), so that no backend allocates on the layer path. It may be absent when the
// query gives 0 or the backend is 'cpu' (which needs none and ignores it). One size serves forward
// and backward; the formulas are csrc/core/workspace.h's (the CUDA kernels' needs).
#pragma once

#include "smoe/tensor.h"

namespace smoe {

// Bytes of workspace load_balancing_loss_forward / _backward need for probs [T, E]
// (0 when T == 0 or E == 0, and for negative sizes).
int64_t load_balancing_loss_workspace_bytes(int64_t T, int64_t E);
// Bytes of workspace z_loss_forward / _backward need for logits [T, E] (0 when T == 0 or E == 0).
int64_t z_loss_workspace_bytes(int64_t T, int64_t E);

// Switch load-balancing loss (Fedus et al., 2021, eq. 4), in the top-k form of Hugging Face Mixtral:
//   loss = E * sum_e f_e * P_e,  f_e = (number of (t,k) with experts[t,k] == e) / T,  P_e = mean_t probs[t,e]
// probs [T, E] f32 (scores of a softmax router), experts [T, K] i32; loss [] f32 out (0-d or [1]).
// f_e is treated as a constant: only P carries gradient.
Status load_balancing_loss_forward(const Exec& exec, const TensorView& probs, const TensorView& experts,
                                   const TensorView& loss, const TensorView& workspace = {});
// grad_loss [] f32 (0-d or [1]) -> grad_probs [T, E]
Status load_balancing_loss_backward(const Exec& exec, const TensorView& probs, const TensorView& experts,
                                    const TensorView& grad_loss, const TensorView& grad_probs,
                                    const TensorView& workspace = {});

// Router z-loss (Zoph et al., 2022, ST-MoE eq. 5): loss = mean_t (logsumexp_e logits[t,e])^2.
Status z_loss_forward(const Exec& exec, const TensorView& logits, const TensorView& loss,
                      const TensorView& workspace = {});
Status z_loss_backward(const Exec& exec, const TensorView& logits, const TensorView& grad_loss,
                       const TensorView& grad_logits, const TensorView& workspace = {});

// Aux-loss-free balancing (DeepSeek-V3, arXiv:2412.19437 section 2.1.2): after a step,
//   bias[e] += rate * sign(mean_count - counts[e])
// counts [E] i32 (tokens routed to e in the step), bias [E] f32 updated in place.
Status balancing_bias_update(const Exec& exec, const TensorView& counts, const TensorView& bias, float rate);

}  // namespace smoe

// csrc/cpu/gating.h: CPU backend of the gating op family (see include/smoe/ops/gating.h).
//
// The entry points in csrc/core/gating.cpp validate every argument (shapes, dtypes, devices, params)
// before calling these; the functions here only check what needs the data itself (NaN logits,
// out-of-range indices) and return kInvalidArgument for it.
#pragma once

#include "smoe/ops/gating.h"

namespace smoe::cpu {

Status topk_gating_forward(const TopkGatingParams& params, const TensorView& logits, const TensorView& bias,
                           const TensorView& weights, const TensorView& experts, const TensorView& scores);

Status topk_gating_backward(const TopkGatingParams& params, const TensorView& scores, const TensorView& experts,
                            const TensorView& grad_weights, const TensorView& grad_scores,
                            const TensorView& grad_logits);

Status expert_choice_forward(const ExpertChoiceParams& params, const TensorView& logits, const TensorView& scores,
                             const TensorView& tokens, const TensorView& row_of, const TensorView& weights);

Status expert_choice_backward(const ExpertChoiceParams& params, const TensorView& scores, const TensorView& row_of,
                              const TensorView& grad_weights, const TensorView& grad_logits);

Status load_balancing_loss_forward(const TensorView& probs, const TensorView& experts, const TensorView& loss);
Status load_balancing_loss_backward(const TensorView& probs, const TensorView& experts, const TensorView& grad_loss,
                                    const TensorView& grad_probs);

Status z_loss_forward(const TensorView& logits, const TensorView& loss);
Status z_loss_backward(const TensorView& logits, const TensorView& grad_loss, const TensorView& grad_logits);

Status balancing_bias_update(const TensorView& counts, const TensorView& bias, float rate);

}  // namespace smoe::cpu

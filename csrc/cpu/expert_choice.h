// csrc/cpu/expert_choice.h: CPU backend of expert-choice routing (see include/smoe/ops/expert_choice.h).
// Validated by csrc/core/expert_choice.cpp first; checks here need the data (NaN logits, bad row_of).
#pragma once

#include "smoe/ops/expert_choice.h"

namespace smoe::cpu {

Status expert_choice_forward(const ExpertChoiceParams& params, const TensorView& logits, const TensorView& scores,
                             const TensorView& tokens, const TensorView& row_of, const TensorView& weights);

// grad_weights and grad_scores may each be absent (smoe/ops/expert_choice.h).
Status expert_choice_backward(const ExpertChoiceParams& params, const TensorView& scores, const TensorView& row_of,
                              const TensorView& grad_weights, const TensorView& grad_scores,
                              const TensorView& grad_logits);

}  // namespace smoe::cpu

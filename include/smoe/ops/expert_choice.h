// smoe/ops/expert_choice.h: expert-choice routing, where each expert picks its tokens (the router
// family's conventions: smoe/ops/topk_gating.h).
#pragma once

#include "smoe/ops/topk_gating.h"  // ScoreFunc

namespace smoe {

// Expert choice (Zhou et al., 2022, arXiv:2202.09368): each expert takes its top-C tokens by score.
struct ExpertChoiceParams {
  int32_t capacity = 1;  // C, 1 <= C <= T
  ScoreFunc score_func = ScoreFunc::kSoftmax;
};

// logits  [T, E]; outputs:
// scores  [T, E] f32: score function of the logits
// tokens  [E, C] i32: token chosen by expert e in slot c, descending score (ties: lower token)
// row_of  [T, E] i32: row e*C + c of the expert-sorted buffer that (t, e) went to, -1 if none
// weights [T, E] f32: the score of (t, e) where chosen, 0 elsewhere (the combine weights)
Status expert_choice_forward(const Exec& exec, const ExpertChoiceParams& params, const TensorView& logits,
                             const TensorView& scores, const TensorView& tokens, const TensorView& row_of,
                             const TensorView& weights);

// The gradient of the logits from the gradients of both outputs that depend on them:
//   g[t, e] = (grad_weights present && row_of[t, e] >= 0 ? grad_weights[t, e] : 0)
//           + (grad_scores present ? grad_scores[t, e] : 0)
//   grad_logits[t] = backward of the score function at scores[t] applied to g[t]
// (weights[t, e] is scores[t, e] where chosen and a constant 0 elsewhere; grad_scores comes from a
// loss on the scores). scores [T, E] f32 (f64), row_of [T, E] i32, grad_weights [T, E] or absent,
// grad_scores [T, E] or absent, grad_logits [T, E] out, every element written (zeros when both are
// absent).
Status expert_choice_backward(const Exec& exec, const ExpertChoiceParams& params, const TensorView& scores,
                              const TensorView& row_of, const TensorView& grad_weights, const TensorView& grad_scores,
                              const TensorView& grad_logits);

}  // namespace smoe

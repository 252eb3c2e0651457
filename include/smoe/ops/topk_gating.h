// smoe/ops/topk_gating.h: top-k gating, the token-choice router (Mixtral, Qwen-MoE, DeepSeek-V2/V3),
// and the conventions of the whole router family (smoe/ops/gating.h includes every member).
//
// Conventions (all router ops): T tokens, E experts, K experts per token, C capacity per expert.
// Scores, weights and gradients are f32. Logits may be f32, bf16, f16 (f64 on the CPU backend, for
// gradient checks; then scores/weights/grads are f64 too: smoe/dtype.h's acc_dtype).
//
// Rules shared by every backend:
//  * ties go to the lower expert index (lower token index for expert choice);
//  * NaN logits: the CPU backend rejects them (kInvalidArgument naming the first bad row); device
//    backends rank a NaN score below every number, so a selected index is always in [0, E).
#pragma once

#include "smoe/tensor.h"

namespace smoe {

enum class ScoreFunc : int32_t { kSoftmax = 0, kSigmoid = 1 };

// How a group of experts is scored for group-limited selection:
// DeepSeek-V2 takes the max score of the group, DeepSeek-V3 the sum of its two best (biased) scores.
enum class GroupScore : int32_t { kMax = 0, kTop2Sum = 1 };

struct TopkGatingParams {
  int32_t top_k = 2;
  ScoreFunc score_func = ScoreFunc::kSoftmax;
  int32_t n_groups = 1;     // E is split into n_groups equal, consecutive groups (E % n_groups == 0)
  int32_t topk_groups = 1;  // only experts of the topk_groups best groups can be picked
  GroupScore group_score = GroupScore::kMax;
  bool renormalize = false;     // weights = s_k / (sum_j s_j + renorm_eps) over the k picked
  float renorm_eps = 0.0f;      // DeepSeek-V3 uses 1e-20
  float routed_scaling = 1.0f;  // weights *= routed_scaling (after renormalisation)
};

// logits  [T, E]  f32|bf16|f16|f64, rows dense (row stride >= E allowed)
// bias    [E]     f32 or absent: added to the scores for *selection only* (DeepSeek-V3)
// weights [T, K]  f32 out (f64 when logits are f64)
// experts [T, K]  i32 out, in descending order of selection score
// scores  [T, E]  f32 out: softmax/sigmoid of the logits (no bias), saved for backward and aux loss
Status topk_gating_forward(const Exec& exec, const TopkGatingParams& params, const TensorView& logits,
                           const TensorView& bias, const TensorView& weights, const TensorView& experts,
                           const TensorView& scores);

// grad_weights [T, K] or absent; grad_scores [T, E] or absent (e.g. from the load-balancing loss);
// grad_logits  [T, E] out, same float dtype as scores.
Status topk_gating_backward(const Exec& exec, const TopkGatingParams& params, const TensorView& scores,
                            const TensorView& experts, const TensorView& grad_weights, const TensorView& grad_scores,
                            const TensorView& grad_logits);

}  // namespace smoe

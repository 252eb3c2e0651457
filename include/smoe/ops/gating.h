// smoe/ops/gating.h: the router's op family — top-k gating, expert-choice routing, aux losses and
// the bias update of aux-loss-free balancing.
//
// Conventions (all ops): T tokens, E experts, K experts per token, C capacity per expert.
// Scores, weights and gradients are f32. Logits may be f32, bf16, f16 (f64 on the CPU backend, for
// gradient checks; then scores/weights/grads are f64 too).
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
                            const TensorView& experts, const TensorView& grad_weights,
                            const TensorView& grad_scores, const TensorView& grad_logits);

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

// grad_weights [T, E] -> grad_logits [T, E]
Status expert_choice_backward(const Exec& exec, const ExpertChoiceParams& params, const TensorView& scores,
                              const TensorView& row_of, const TensorView& grad_weights,
                              const TensorView& grad_logits);

// The expert-choice backward with the scores' own gradient (docs: SPEC A of issue 8):
//   g[t,e] = (grad_weights present && row_of[t,e] >= 0 ? grad_weights[t,e] : 0) + (grad_scores present ? grad_scores[t,e] : 0)
// grad_logits = backward of the score function at `scores` applied to g; both absent => zeros.
// TEMPORARY (py helper, issue 8): forwards to the existing backends; the core helper's version replaces it.
Status expert_choice_backward(const Exec& exec, const ExpertChoiceParams& params, const TensorView& scores,
                              const TensorView& row_of, const TensorView& grad_weights,
                              const TensorView& grad_scores, const TensorView& grad_logits);

// Switch load-balancing loss (Fedus et al., 2021, eq. 4), in the top-k form of Hugging Face Mixtral:
//   loss = E * sum_e f_e * P_e,  f_e = (number of (t,k) with experts[t,k] == e) / T,  P_e = mean_t probs[t,e]
// probs [T, E] f32 (scores of a softmax router), experts [T, K] i32; loss [] f32 out (0-d or [1]).
// f_e is treated as a constant: only P carries gradient.
Status load_balancing_loss_forward(const Exec& exec, const TensorView& probs, const TensorView& experts,
                                   const TensorView& loss);
// grad_loss [] f32 (0-d or [1]) -> grad_probs [T, E]
Status load_balancing_loss_backward(const Exec& exec, const TensorView& probs, const TensorView& experts,
                                    const TensorView& grad_loss, const TensorView& grad_probs);

// Router z-loss (Zoph et al., 2022, ST-MoE eq. 5): loss = mean_t (logsumexp_e logits[t,e])^2.
Status z_loss_forward(const Exec& exec, const TensorView& logits, const TensorView& loss);
Status z_loss_backward(const Exec& exec, const TensorView& logits, const TensorView& grad_loss,
                       const TensorView& grad_logits);

// Router-loss scratch from the caller (SPEC B of issue 13): u8 [>= the query's bytes], absent allowed when
// the query is 0 or the backend is cpu. TEMPORARY (py helper, issue 8): these overloads forward to the
// ones above (the device backends still use their own scratch); the core helper's version replaces them.
int64_t load_balancing_loss_workspace_bytes(int64_t T, int64_t E);
int64_t z_loss_workspace_bytes(int64_t T, int64_t E);
Status load_balancing_loss_forward(const Exec& exec, const TensorView& probs, const TensorView& experts,
                                   const TensorView& loss, const TensorView& workspace);
Status load_balancing_loss_backward(const Exec& exec, const TensorView& probs, const TensorView& experts,
                                    const TensorView& grad_loss, const TensorView& grad_probs,
                                    const TensorView& workspace);
Status z_loss_forward(const Exec& exec, const TensorView& logits, const TensorView& loss, const TensorView& workspace);
Status z_loss_backward(const Exec& exec, const TensorView& logits, const TensorView& grad_loss,
                       const TensorView& grad_logits, const TensorView& workspace);

// Aux-loss-free balancing (DeepSeek-V3, arXiv:2412.19437 section 2.1.2): after a step,
//   bias[e] += rate * sign(mean_count - counts[e])
// counts [E] i32 (tokens routed to e in the step), bias [E] f32 updated in place.
Status balancing_bias_update(const Exec& exec, const TensorView& counts, const TensorView& bias, float rate);

}  // namespace smoe

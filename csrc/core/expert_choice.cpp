// Public entry points of expert-choice routing (smoe/ops/expert_choice.h): validate, resolve the
// backend, return on zero experts, dispatch (csrc/core/dispatch.h). The math lives in
// csrc/cpu/expert_choice.cpp and csrc/cuda/.
#include "smoe/ops/expert_choice.h"

#include <climits>
#include <string>

#include "core/dispatch.h"
#include "core/router_checks.h"
#include "cpu/expert_choice.h"

namespace smoe {
namespace {

using detail::Checker;

// `src` names the [T, E] input that gave T and E (logits in forward, scores in backward).
Status check_capacity(const Checker& c, const ExpertChoiceParams& p, const char* src, int64_t T, int64_t E) {
  SMOE_RETURN_IF_ERROR(detail::check_score_func(c, p.score_func));
  if (p.capacity < 1 || p.capacity > T) {
    return c.invalid("params.capacity", "a value in " + Checker::range(1, T) + " (T = tokens)",
                     std::to_string(p.capacity));
  }
  if (T > INT32_MAX) return c.invalid(src, "T = size(0) <= 2^31 - 1 (tokens are i32)", std::to_string(T));
  if (E * int64_t(p.capacity) > INT32_MAX) {
    return c.invalid("params.capacity", "E * C <= 2^31 - 1 (row_of is i32)", std::to_string(p.capacity));
  }
  return Status::Ok();
}

}  // namespace

Status expert_choice_forward(const Exec& exec, const ExpertChoiceParams& params, const TensorView& logits,
                             const TensorView& scores, const TensorView& tokens, const TensorView& row_of,
                             const TensorView& weights) {
  const Checker c{"expert_choice_forward", logits, "logits"};
  SMOE_RETURN_IF_ERROR(detail::check_logits(c, logits));
  const int64_t T = logits.size(0), E = logits.size(1);
  SMOE_RETURN_IF_ERROR(check_capacity(c, params, "logits", T, E));
  const int64_t C = params.capacity;
  const DType acc = acc_dtype(logits.dtype);
  SMOE_RETURN_IF_ERROR(
      detail::router_matrix(c, "scores", scores, "[T, E]", acc, T, "T = logits.size(0)", E, "E = logits.size(1)"));
  SMOE_RETURN_IF_ERROR(detail::router_matrix(c, "tokens", tokens, "[E, C]", DType::kI32, E, "E = logits.size(1)", C,
                                             "C = params.capacity"));
  SMOE_RETURN_IF_ERROR(detail::router_matrix(c, "row_of", row_of, "[T, E]", DType::kI32, T, "T = logits.size(0)", E,
                                             "E = logits.size(1)"));
  SMOE_RETURN_IF_ERROR(
      detail::router_matrix(c, "weights", weights, "[T, E]", acc, T, "T = logits.size(0)", E, "E = logits.size(1)"));
  // T >= C >= 1 after validation, so E == 0 is the only empty case.
  return SMOE_DISPATCH_WORK(c.op, exec, logits, E > 0, expert_choice_forward, params, logits, scores, tokens, row_of,
                            weights);
}

Status expert_choice_backward(const Exec& exec, const ExpertChoiceParams& params, const TensorView& scores,
                              const TensorView& row_of, const TensorView& grad_weights, const TensorView& grad_scores,
                              const TensorView& grad_logits) {
  const Checker c{"expert_choice_backward", scores, "scores"};
  SMOE_RETURN_IF_ERROR(detail::check_scores(c, "scores", scores));
  const int64_t T = scores.size(0), E = scores.size(1);
  SMOE_RETURN_IF_ERROR(check_capacity(c, params, "scores", T, E));
  SMOE_RETURN_IF_ERROR(detail::router_matrix(c, "row_of", row_of, "[T, E]", DType::kI32, T, "T = scores.size(0)", E,
                                             "E = scores.size(1)"));
  SMOE_RETURN_IF_ERROR(
      detail::check_router_grads(c, scores, grad_weights, "[T, E]", E, "E = scores.size(1)", grad_scores, grad_logits));
  return SMOE_DISPATCH_WORK(c.op, exec, scores, E > 0, expert_choice_backward, params, scores, row_of, grad_weights,
                            grad_scores, grad_logits);
}

}  // namespace smoe

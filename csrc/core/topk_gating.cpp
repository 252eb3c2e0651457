// Public entry points of top-k gating (smoe/ops/topk_gating.h), in the order of every entry point
// (csrc/core/dispatch.h): validate, resolve the backend, return on zero tokens, dispatch. The math
// lives in csrc/cpu/topk_gating.cpp and csrc/cuda/.
#include "smoe/ops/topk_gating.h"

#include <cmath>
#include <string>

#include "core/dispatch.h"
#include "core/router_checks.h"
#include "cpu/topk_gating.h"

namespace smoe {
namespace {

using detail::Checker;

Status check_topk_params(const Checker& c, const TopkGatingParams& p, int64_t E) {
  SMOE_RETURN_IF_ERROR(detail::check_score_func(c, p.score_func));
  if (p.group_score != GroupScore::kMax && p.group_score != GroupScore::kTop2Sum) {
    return c.invalid("params.group_score", "kMax (0) or kTop2Sum (1)",
                     std::to_string(static_cast<int32_t>(p.group_score)));
  }
  if (p.top_k < 1 || p.top_k > E) {
    return c.invalid("params.top_k", "a value in " + Checker::range(1, E) + " (E = logits.size(1))",
                     std::to_string(p.top_k));
  }
  if (p.n_groups < 1 || E % p.n_groups != 0) {
    return c.invalid("params.n_groups", "a divisor of E = " + std::to_string(E), std::to_string(p.n_groups));
  }
  if (p.topk_groups < 1 || p.topk_groups > p.n_groups) {
    return c.invalid("params.topk_groups", "a value in " + Checker::range(1, p.n_groups) + " (n_groups)",
                     std::to_string(p.topk_groups));
  }
  const int64_t reachable = int64_t(p.topk_groups) * (E / p.n_groups);
  if (p.top_k > reachable) {
    return c.invalid("params.top_k",
                     "at most topk_groups * (E / n_groups) = " + std::to_string(reachable) +
                         " (the experts of the kept groups); lower top_k or raise topk_groups",
                     std::to_string(p.top_k));
  }
  if (!std::isfinite(p.renorm_eps) || p.renorm_eps < 0.0f) {
    return c.invalid("params.renorm_eps", "a finite value >= 0", std::to_string(p.renorm_eps));
  }
  if (!std::isfinite(p.routed_scaling)) {
    return c.invalid("params.routed_scaling", "a finite value", std::to_string(p.routed_scaling));
  }
  return Status::Ok();
}

}  // namespace

Status topk_gating_forward(const Exec& exec, const TopkGatingParams& params, const TensorView& logits,
                           const TensorView& bias, const TensorView& weights, const TensorView& experts,
                           const TensorView& scores) {
  const Checker c{"topk_gating_forward", logits, "logits"};
  SMOE_RETURN_IF_ERROR(detail::check_logits(c, logits));
  const int64_t T = logits.size(0), E = logits.size(1);
  SMOE_RETURN_IF_ERROR(check_topk_params(c, params, E));
  const int64_t K = params.top_k;
  const DType acc = acc_dtype(logits.dtype);
  if (bias.defined()) {
    SMOE_RETURN_IF_ERROR(c.arg("bias", bias)
                             .dims(1, "[E]")
                             .dtype(DType::kF32)
                             .size(0, E, "E = logits.size(1)")
                             .contiguous()
                             .same_device());
  }
  SMOE_RETURN_IF_ERROR(
      detail::router_matrix(c, "weights", weights, "[T, K]", acc, T, "T = logits.size(0)", K, "K = params.top_k"));
  SMOE_RETURN_IF_ERROR(detail::router_matrix(c, "experts", experts, "[T, K]", DType::kI32, T, "T = logits.size(0)", K,
                                             "K = params.top_k"));
  SMOE_RETURN_IF_ERROR(
      detail::router_matrix(c, "scores", scores, "[T, E]", acc, T, "T = logits.size(0)", E, "E = logits.size(1)"));
  return SMOE_DISPATCH_WORK(c.op, exec, logits, T > 0, topk_gating_forward, params, logits, bias, weights, experts,
                            scores);
}

Status topk_gating_backward(const Exec& exec, const TopkGatingParams& params, const TensorView& scores,
                            const TensorView& experts, const TensorView& grad_weights, const TensorView& grad_scores,
                            const TensorView& grad_logits) {
  const Checker c{"topk_gating_backward", scores, "scores"};
  SMOE_RETURN_IF_ERROR(detail::check_scores(c, "scores", scores));
  const int64_t T = scores.size(0), E = scores.size(1);
  SMOE_RETURN_IF_ERROR(check_topk_params(c, params, E));
  const int64_t K = params.top_k;
  SMOE_RETURN_IF_ERROR(detail::router_matrix(c, "experts", experts, "[T, K]", DType::kI32, T, "T = scores.size(0)", K,
                                             "K = params.top_k"));
  SMOE_RETURN_IF_ERROR(
      detail::check_router_grads(c, scores, grad_weights, "[T, K]", K, "K = params.top_k", grad_scores, grad_logits));
  return SMOE_DISPATCH_WORK(c.op, exec, scores, T > 0, topk_gating_backward, params, scores, experts, grad_weights,
                            grad_scores, grad_logits);
}

}  // namespace smoe

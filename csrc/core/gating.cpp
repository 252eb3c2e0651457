// Public entry points of the gating op family: validate every argument, return early on zero work,
// then dispatch to a backend. The math lives in csrc/cpu/gating.cpp (and later csrc/cuda/).
#include "smoe/ops/gating.h"

#include <climits>
#include <cmath>
#include <cstring>
#include <vector>
#include <string>

#include "core/dispatch.h"
#include "cpu/gating.h"

namespace smoe {
namespace {

// Scores, weights and gradients are f32, or f64 when the logits are f64 (gradient checks).
DType acc_dtype(DType logits) { return logits == DType::kF64 ? DType::kF64 : DType::kF32; }

std::string range_string(int64_t lo, int64_t hi) {
  return "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
}

// A 2-D tensor [rows, cols] of `dtype` with dense rows (padded rows allowed), on ref's device.
Status expect_matrix(const char* op, const char* arg, const TensorView& v, const char* layout, DType dtype,
                     int64_t rows, const char* rows_meaning, int64_t cols, const char* cols_meaning,
                     const TensorView& ref) {
  SMOE_RETURN_IF_ERROR(expect_dims(op, arg, v, 2, layout));
  SMOE_RETURN_IF_ERROR(expect_dtype(op, arg, v, dtype));
  SMOE_RETURN_IF_ERROR(expect_size(op, arg, v, 0, rows, rows_meaning));
  SMOE_RETURN_IF_ERROR(expect_size(op, arg, v, 1, cols, cols_meaning));
  SMOE_RETURN_IF_ERROR(expect_row_contiguous(op, arg, v));
  return expect_device(op, arg, v, ref.device, ref.device_index);
}

// The scores of the backward ops: [T, E], f32 or f64, dense rows.
Status expect_scores(const char* op, const char* arg, const TensorView& v) {
  SMOE_RETURN_IF_ERROR(expect_dims(op, arg, v, 2, "[T, E]"));
  if (v.dtype != DType::kF32 && v.dtype != DType::kF64) {
    return invalid_argument(op, arg, "dtype f32 (f64 for gradient checks)", dtype_name(v.dtype));
  }
  return expect_row_contiguous(op, arg, v);
}

// Logits: [T, E], any float dtype, dense rows, E fits the i32 expert indices.
Status expect_logits(const char* op, const TensorView& v) {
  SMOE_RETURN_IF_ERROR(expect_dims(op, "logits", v, 2, "[T, E]"));
  SMOE_RETURN_IF_ERROR(expect_float_dtype(op, "logits", v));
  SMOE_RETURN_IF_ERROR(expect_row_contiguous(op, "logits", v));
  if (v.size(1) > INT32_MAX) {
    return invalid_argument(op, "logits", "E = size(1) <= 2^31 - 1 (experts are i32)", shape_string(v));
  }
  return Status::Ok();
}

// A loss or its gradient: a 0-d tensor or a [1] tensor.
Status expect_scalar(const char* op, const char* arg, const TensorView& v, DType dtype, const TensorView& ref) {
  if (!v.defined() || !(v.ndim == 0 || (v.ndim == 1 && v.shape[0] == 1))) {
    return invalid_argument(op, arg, "a 0-d or [1] tensor", v.defined() ? shape_string(v) : "absent");
  }
  if (v.data == nullptr) return invalid_argument(op, arg, "a non-null data pointer", "null");
  SMOE_RETURN_IF_ERROR(expect_dtype(op, arg, v, dtype));
  return expect_device(op, arg, v, ref.device, ref.device_index);
}

Status expect_score_func(const char* op, ScoreFunc f) {
  if (f == ScoreFunc::kSoftmax || f == ScoreFunc::kSigmoid) return Status::Ok();
  return invalid_argument(op, "params.score_func", "kSoftmax (0) or kSigmoid (1)",
                          std::to_string(static_cast<int32_t>(f)));
}

Status check_topk_params(const char* op, const TopkGatingParams& p, int64_t E) {
  SMOE_RETURN_IF_ERROR(expect_score_func(op, p.score_func));
  if (p.group_score != GroupScore::kMax && p.group_score != GroupScore::kTop2Sum) {
    return invalid_argument(op, "params.group_score", "kMax (0) or kTop2Sum (1)",
                            std::to_string(static_cast<int32_t>(p.group_score)));
  }
  if (p.top_k < 1 || p.top_k > E) {
    return invalid_argument(op, "params.top_k", "a value in " + range_string(1, E) + " (E = logits.size(1))",
                            std::to_string(p.top_k));
  }
  if (p.n_groups < 1 || E % p.n_groups != 0) {
    return invalid_argument(op, "params.n_groups", "a divisor of E = " + std::to_string(E),
                            std::to_string(p.n_groups));
  }
  if (p.topk_groups < 1 || p.topk_groups > p.n_groups) {
    return invalid_argument(op, "params.topk_groups", "a value in " + range_string(1, p.n_groups) + " (n_groups)",
                            std::to_string(p.topk_groups));
  }
  const int64_t reachable = int64_t(p.topk_groups) * (E / p.n_groups);
  if (p.top_k > reachable) {
    return invalid_argument(op, "params.top_k",
                            "at most topk_groups * (E / n_groups) = " + std::to_string(reachable) +
                                " (the experts of the kept groups); lower top_k or raise topk_groups",
                            std::to_string(p.top_k));
  }
  if (!std::isfinite(p.renorm_eps) || p.renorm_eps < 0.0f) {
    return invalid_argument(op, "params.renorm_eps", "a finite value >= 0", std::to_string(p.renorm_eps));
  }
  if (!std::isfinite(p.routed_scaling)) {
    return invalid_argument(op, "params.routed_scaling", "a finite value", std::to_string(p.routed_scaling));
  }
  return Status::Ok();
}

// `src` names the [T, E] input that gave T and E (logits in forward, scores in backward).
Status check_capacity(const char* op, const ExpertChoiceParams& p, const char* src, int64_t T, int64_t E) {
  SMOE_RETURN_IF_ERROR(expect_score_func(op, p.score_func));
  if (p.capacity < 1 || p.capacity > T) {
    return invalid_argument(op, "params.capacity", "a value in " + range_string(1, T) + " (T = tokens)",
                            std::to_string(p.capacity));
  }
  if (T > INT32_MAX) {
    return invalid_argument(op, src, "T = size(0) <= 2^31 - 1 (tokens are i32)", std::to_string(T));
  }
  if (E * int64_t(p.capacity) > INT32_MAX) {
    return invalid_argument(op, "params.capacity", "E * C <= 2^31 - 1 (row_of is i32)",
                            std::to_string(p.capacity));
  }
  return Status::Ok();
}


}  // namespace

Status topk_gating_forward(const Exec& exec, const TopkGatingParams& params, const TensorView& logits,
                           const TensorView& bias, const TensorView& weights, const TensorView& experts,
                           const TensorView& scores) {
  const char* op = "topk_gating_forward";
  SMOE_RETURN_IF_ERROR(expect_logits(op, logits));
  const int64_t T = logits.size(0), E = logits.size(1);
  SMOE_RETURN_IF_ERROR(check_topk_params(op, params, E));
  const int64_t K = params.top_k;
  const DType acc = acc_dtype(logits.dtype);
  if (bias.defined()) {
    SMOE_RETURN_IF_ERROR(expect_dims(op, "bias", bias, 1, "[E]"));
    SMOE_RETURN_IF_ERROR(expect_dtype(op, "bias", bias, DType::kF32));
    SMOE_RETURN_IF_ERROR(expect_size(op, "bias", bias, 0, E, "E = logits.size(1)"));
    SMOE_RETURN_IF_ERROR(expect_contiguous(op, "bias", bias));
    SMOE_RETURN_IF_ERROR(expect_device(op, "bias", bias, logits.device, logits.device_index));
  }
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "weights", weights, "[T, K]", acc, T, "T = logits.size(0)", K,
                                     "K = params.top_k", logits));
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "experts", experts, "[T, K]", DType::kI32, T, "T = logits.size(0)", K,
                                     "K = params.top_k", logits));
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "scores", scores, "[T, E]", acc, T, "T = logits.size(0)", E,
                                     "E = logits.size(1)", logits));
  if (T == 0) return Status::Ok();
  return SMOE_DISPATCH(op, exec, logits, topk_gating_forward, params, logits, bias, weights, experts, scores);
}

Status topk_gating_backward(const Exec& exec, const TopkGatingParams& params, const TensorView& scores,
                            const TensorView& experts, const TensorView& grad_weights,
                            const TensorView& grad_scores, const TensorView& grad_logits) {
  const char* op = "topk_gating_backward";
  SMOE_RETURN_IF_ERROR(expect_scores(op, "scores", scores));
  const int64_t T = scores.size(0), E = scores.size(1);
  SMOE_RETURN_IF_ERROR(check_topk_params(op, params, E));
  const int64_t K = params.top_k;
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "experts", experts, "[T, K]", DType::kI32, T, "T = scores.size(0)", K,
                                     "K = params.top_k", scores));
  if (grad_weights.defined()) {
    SMOE_RETURN_IF_ERROR(expect_matrix(op, "grad_weights", grad_weights, "[T, K]", scores.dtype, T,
                                       "T = scores.size(0)", K, "K = params.top_k", scores));
  }
  if (grad_scores.defined()) {
    SMOE_RETURN_IF_ERROR(expect_matrix(op, "grad_scores", grad_scores, "[T, E]", scores.dtype, T,
                                       "T = scores.size(0)", E, "E = scores.size(1)", scores));
  }
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "grad_logits", grad_logits, "[T, E]", scores.dtype, T,
                                     "T = scores.size(0)", E, "E = scores.size(1)", scores));
  if (T == 0) return Status::Ok();
  return SMOE_DISPATCH(op, exec, scores, topk_gating_backward, params, scores, experts, grad_weights, grad_scores, grad_logits);
}

Status expert_choice_forward(const Exec& exec, const ExpertChoiceParams& params, const TensorView& logits,
                             const TensorView& scores, const TensorView& tokens, const TensorView& row_of,
                             const TensorView& weights) {
  const char* op = "expert_choice_forward";
  SMOE_RETURN_IF_ERROR(expect_logits(op, logits));
  const int64_t T = logits.size(0), E = logits.size(1);
  SMOE_RETURN_IF_ERROR(check_capacity(op, params, "logits", T, E));
  const int64_t C = params.capacity;
  const DType acc = acc_dtype(logits.dtype);
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "scores", scores, "[T, E]", acc, T, "T = logits.size(0)", E,
                                     "E = logits.size(1)", logits));
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "tokens", tokens, "[E, C]", DType::kI32, E, "E = logits.size(1)", C,
                                     "C = params.capacity", logits));
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "row_of", row_of, "[T, E]", DType::kI32, T, "T = logits.size(0)", E,
                                     "E = logits.size(1)", logits));
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "weights", weights, "[T, E]", acc, T, "T = logits.size(0)", E,
                                     "E = logits.size(1)", logits));
  if (E == 0) return Status::Ok();
  return SMOE_DISPATCH(op, exec, logits, expert_choice_forward, params, logits, scores, tokens, row_of, weights);
}

Status expert_choice_backward(const Exec& exec, const ExpertChoiceParams& params, const TensorView& scores,
                              const TensorView& row_of, const TensorView& grad_weights,
                              const TensorView& grad_logits) {
  const char* op = "expert_choice_backward";
  SMOE_RETURN_IF_ERROR(expect_scores(op, "scores", scores));
  const int64_t T = scores.size(0), E = scores.size(1);
  SMOE_RETURN_IF_ERROR(check_capacity(op, params, "scores", T, E));
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "row_of", row_of, "[T, E]", DType::kI32, T, "T = scores.size(0)", E,
                                     "E = scores.size(1)", scores));
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "grad_weights", grad_weights, "[T, E]", scores.dtype, T,
                                     "T = scores.size(0)", E, "E = scores.size(1)", scores));
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "grad_logits", grad_logits, "[T, E]", scores.dtype, T,
                                     "T = scores.size(0)", E, "E = scores.size(1)", scores));
  if (E == 0) return Status::Ok();
  return SMOE_DISPATCH(op, exec, scores, expert_choice_backward, params, scores, row_of, grad_weights, grad_logits);
}

namespace {

Status check_lb_inputs(const char* op, const TensorView& probs, const TensorView& experts) {
  SMOE_RETURN_IF_ERROR(expect_scores(op, "probs", probs));
  if (probs.size(1) < 1) return invalid_argument(op, "probs", "E = size(1) >= 1", shape_string(probs));
  SMOE_RETURN_IF_ERROR(expect_dims(op, "experts", experts, 2, "[T, K]"));
  SMOE_RETURN_IF_ERROR(expect_dtype(op, "experts", experts, DType::kI32));
  SMOE_RETURN_IF_ERROR(expect_size(op, "experts", experts, 0, probs.size(0), "T = probs.size(0)"));
  SMOE_RETURN_IF_ERROR(expect_row_contiguous(op, "experts", experts));
  return expect_device(op, "experts", experts, probs.device, probs.device_index);
}

}  // namespace

Status load_balancing_loss_forward(const Exec& exec, const TensorView& probs, const TensorView& experts,
                                   const TensorView& loss) {
  const char* op = "load_balancing_loss_forward";
  SMOE_RETURN_IF_ERROR(check_lb_inputs(op, probs, experts));
  SMOE_RETURN_IF_ERROR(expect_scalar(op, "loss", loss, probs.dtype, probs));
  // T == 0 still writes the loss (0), so there is no early return here.
  return SMOE_DISPATCH(op, exec, probs, load_balancing_loss_forward, probs, experts, loss);
}

Status load_balancing_loss_backward(const Exec& exec, const TensorView& probs, const TensorView& experts,
                                    const TensorView& grad_loss, const TensorView& grad_probs) {
  const char* op = "load_balancing_loss_backward";
  SMOE_RETURN_IF_ERROR(check_lb_inputs(op, probs, experts));
  SMOE_RETURN_IF_ERROR(expect_scalar(op, "grad_loss", grad_loss, probs.dtype, probs));
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "grad_probs", grad_probs, "[T, E]", probs.dtype, probs.size(0),
                                     "T = probs.size(0)", probs.size(1), "E = probs.size(1)", probs));
  if (probs.size(0) == 0) return Status::Ok();
  return SMOE_DISPATCH(op, exec, probs, load_balancing_loss_backward, probs, experts, grad_loss, grad_probs);
}

Status z_loss_forward(const Exec& exec, const TensorView& logits, const TensorView& loss) {
  const char* op = "z_loss_forward";
  SMOE_RETURN_IF_ERROR(expect_logits(op, logits));
  if (logits.size(1) < 1) return invalid_argument(op, "logits", "E = size(1) >= 1", shape_string(logits));
  SMOE_RETURN_IF_ERROR(expect_scalar(op, "loss", loss, acc_dtype(logits.dtype), logits));
  // T == 0 still writes the loss (0), so there is no early return here.
  return SMOE_DISPATCH(op, exec, logits, z_loss_forward, logits, loss);
}

Status z_loss_backward(const Exec& exec, const TensorView& logits, const TensorView& grad_loss,
                       const TensorView& grad_logits) {
  const char* op = "z_loss_backward";
  SMOE_RETURN_IF_ERROR(expect_logits(op, logits));
  if (logits.size(1) < 1) return invalid_argument(op, "logits", "E = size(1) >= 1", shape_string(logits));
  const DType acc = acc_dtype(logits.dtype);
  SMOE_RETURN_IF_ERROR(expect_scalar(op, "grad_loss", grad_loss, acc, logits));
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "grad_logits", grad_logits, "[T, E]", acc, logits.size(0),
                                     "T = logits.size(0)", logits.size(1), "E = logits.size(1)", logits));
  if (logits.size(0) == 0) return Status::Ok();
  return SMOE_DISPATCH(op, exec, logits, z_loss_backward, logits, grad_loss, grad_logits);
}

// ---- TEMPORARY forwarders (py helper, issue 8; replaced by the core helper's versions at merge) -----

Status expert_choice_backward(const Exec& exec, const ExpertChoiceParams& params, const TensorView& scores,
                              const TensorView& row_of, const TensorView& grad_weights,
                              const TensorView& grad_scores, const TensorView& grad_logits) {
  const char* op = "expert_choice_backward";
  SMOE_RETURN_IF_ERROR(expect_scores(op, "scores", scores));
  const int64_t T = scores.size(0), E = scores.size(1);
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "grad_logits", grad_logits, "[T, E]", scores.dtype, T,
                                     "T = scores.size(0)", E, "E = scores.size(1)", scores));
  if (grad_scores.defined()) {
    SMOE_RETURN_IF_ERROR(expect_matrix(op, "grad_scores", grad_scores, "[T, E]", scores.dtype, T,
                                       "T = scores.size(0)", E, "E = scores.size(1)", scores));
  }
  if (!grad_scores.defined() || T == 0 || E == 0) {
    if (grad_weights.defined()) return expert_choice_backward(exec, params, scores, row_of, grad_weights, grad_logits);
    SMOE_RETURN_IF_ERROR(check_capacity(op, params, "scores", T, E));
    if (grad_logits.device != Device::kCPU) return unsupported(op, "no gradient on CUDA tensors (temporary forwarder)");
    for (int64_t t = 0; t < T; ++t) {
      char* row = static_cast<char*>(grad_logits.data) + t * grad_logits.stride(0) * dtype_size(grad_logits.dtype);
      std::memset(row, 0, size_t(E * dtype_size(grad_logits.dtype)));
    }
    return Status::Ok();
  }
  if (scores.device != Device::kCPU) {
    return unsupported(op, "grad_scores on CUDA tensors needs the core helper's expert_choice_backward");
  }
  // The scores' part: top-k gating's backward without weight gradients reads no expert ids.
  const int64_t es = dtype_size(scores.dtype);
  std::vector<char> part(size_t(T * E * es));
  std::vector<int32_t> first(size_t(T), 0);
  TopkGatingParams tp;
  tp.top_k = 1;
  tp.score_func = params.score_func;
  const TensorView part_v = make_view(part.data(), scores.dtype, {T, E});
  SMOE_RETURN_IF_ERROR(topk_gating_backward(exec, tp, scores, make_view(first.data(), {T, 1}), TensorView{},
                                            grad_scores, part_v));
  if (grad_weights.defined()) {
    SMOE_RETURN_IF_ERROR(expert_choice_backward(exec, params, scores, row_of, grad_weights, grad_logits));
  }
  for (int64_t t = 0; t < T; ++t) {
    char* out = static_cast<char*>(grad_logits.data) + t * grad_logits.stride(0) * es;
    const char* add = part.data() + t * E * es;
    for (int64_t e = 0; e < E; ++e) {
      if (scores.dtype == DType::kF64) {
        double* o = reinterpret_cast<double*>(out) + e;
        *o = (grad_weights.defined() ? *o : 0.0) + reinterpret_cast<const double*>(add)[e];
      } else {
        float* o = reinterpret_cast<float*>(out) + e;
        *o = (grad_weights.defined() ? *o : 0.0f) + reinterpret_cast<const float*>(add)[e];
      }
    }
  }
  return Status::Ok();
}

int64_t load_balancing_loss_workspace_bytes(int64_t T, int64_t E) {
  if (T <= 0 || E <= 0) return 0;
  const int64_t chunk = T <= 65536 ? 256 : (T + 255) / 256;
  const int64_t nb = (T + chunk - 1) / chunk;
  return (4 * E + 255) / 256 * 256 + 4 * E * nb;
}

int64_t z_loss_workspace_bytes(int64_t T, int64_t E) { return (T <= 0 || E <= 0) ? 0 : 8 * T; }

Status load_balancing_loss_forward(const Exec& exec, const TensorView& probs, const TensorView& experts,
                                   const TensorView& loss, const TensorView& /*workspace*/) {
  return load_balancing_loss_forward(exec, probs, experts, loss);
}
Status load_balancing_loss_backward(const Exec& exec, const TensorView& probs, const TensorView& experts,
                                    const TensorView& grad_loss, const TensorView& grad_probs,
                                    const TensorView& /*workspace*/) {
  return load_balancing_loss_backward(exec, probs, experts, grad_loss, grad_probs);
}
Status z_loss_forward(const Exec& exec, const TensorView& logits, const TensorView& loss,
                      const TensorView& /*workspace*/) {
  return z_loss_forward(exec, logits, loss);
}
Status z_loss_backward(const Exec& exec, const TensorView& logits, const TensorView& grad_loss,
                       const TensorView& grad_logits, const TensorView& /*workspace*/) {
  return z_loss_backward(exec, logits, grad_loss, grad_logits);
}

Status balancing_bias_update(const Exec& exec, const TensorView& counts, const TensorView& bias, float rate) {
  const char* op = "balancing_bias_update";
  SMOE_RETURN_IF_ERROR(expect_dims(op, "counts", counts, 1, "[E]"));
  SMOE_RETURN_IF_ERROR(expect_dtype(op, "counts", counts, DType::kI32));
  SMOE_RETURN_IF_ERROR(expect_contiguous(op, "counts", counts));
  SMOE_RETURN_IF_ERROR(expect_dims(op, "bias", bias, 1, "[E]"));
  SMOE_RETURN_IF_ERROR(expect_dtype(op, "bias", bias, DType::kF32));
  SMOE_RETURN_IF_ERROR(expect_size(op, "bias", bias, 0, counts.size(0), "E = counts.size(0)"));
  SMOE_RETURN_IF_ERROR(expect_contiguous(op, "bias", bias));
  SMOE_RETURN_IF_ERROR(expect_device(op, "bias", bias, counts.device, counts.device_index));
  if (!std::isfinite(rate)) return invalid_argument(op, "rate", "a finite value", std::to_string(rate));
  if (counts.size(0) == 0) return Status::Ok();
  return SMOE_DISPATCH(op, exec, counts, balancing_bias_update, counts, bias, rate);
}

}  // namespace smoe

// csrc/core/router_checks.h: the argument checks the router family's entry points share
// (csrc/core/topk_gating.cpp, expert_choice.cpp, router_losses.cpp).
#pragma once

#include <climits>
#include <string>

#include "core/check.h"
#include "smoe/ops/gating.h"

namespace smoe::detail {

// A [rows, cols] matrix of `dt` with dense rows (padded rows allowed) on the reference device.
inline ArgCheck router_matrix(const Checker& c, const char* arg, const TensorView& v, const char* layout, DType dt,
                              int64_t rows, const char* rows_meaning, int64_t cols, const char* cols_meaning) {
  ArgCheck a = c.arg(arg, v);
  a.dims(2, layout).dtype(dt).size(0, rows, rows_meaning).size(1, cols, cols_meaning).row_contiguous().same_device();
  return a;
}

// The scores (or probs) of the backward ops and losses: [T, E], f32 or f64, dense rows.
inline Status check_scores(const Checker& c, const char* arg, const TensorView& v) {
  return c.arg(arg, v)
      .dims(2, "[T, E]")
      .dtype_if(v.dtype == DType::kF32 || v.dtype == DType::kF64, "dtype f32 (f64 for gradient checks)")
      .row_contiguous();
}

// Logits: [T, E], any float dtype, dense rows, E fits the i32 expert indices.
inline Status check_logits(const Checker& c, const TensorView& v) {
  return c.arg("logits", v)
      .dims(2, "[T, E]")
      .float_dtype()
      .row_contiguous()
      .expect(v.size(1) <= INT32_MAX, "E = size(1) <= 2^31 - 1 (experts are i32)", shape_string(v));
}

// The gradient arguments of a router backward, in scores' dtype with dense rows: grad_weights
// [T, W] (optional; `w_layout`, W = `w_cols`, `w_meaning`), grad_scores [T, E] (optional) and
// grad_logits [T, E], with T and E from scores.
inline Status check_router_grads(const Checker& c, const TensorView& scores, const TensorView& grad_weights,
                                 const char* w_layout, int64_t w_cols, const char* w_meaning,
                                 const TensorView& grad_scores, const TensorView& grad_logits) {
  const int64_t T = scores.size(0), E = scores.size(1);
  if (grad_weights.defined()) {
    SMOE_RETURN_IF_ERROR(router_matrix(c, "grad_weights", grad_weights, w_layout, scores.dtype, T, "T = scores.size(0)",
                                       w_cols, w_meaning));
  }
  if (grad_scores.defined()) {
    SMOE_RETURN_IF_ERROR(router_matrix(c, "grad_scores", grad_scores, "[T, E]", scores.dtype, T, "T = scores.size(0)",
                                       E, "E = scores.size(1)"));
  }
  return router_matrix(c, "grad_logits", grad_logits, "[T, E]", scores.dtype, T, "T = scores.size(0)", E,
                       "E = scores.size(1)");
}

inline Status check_score_func(const Checker& c, ScoreFunc f) {
  if (f == ScoreFunc::kSoftmax || f == ScoreFunc::kSigmoid) return Status::Ok();
  return c.invalid("params.score_func", "kSoftmax (0) or kSigmoid (1)", std::to_string(static_cast<int32_t>(f)));
}

}  // namespace smoe::detail

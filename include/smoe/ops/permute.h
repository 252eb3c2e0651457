// smoe/ops/permute.h: moving token rows into the expert-sorted buffer and back.
// Deterministic everywhere: the combine and every backward are gathers that sum in k order, never
// float atomics.
#pragma once

#include "smoe/tensor.h"

namespace smoe {

// xs[r] = x[token_of_row[r]], zeros where token_of_row[r] == -1.
// x [T, H] (row stride >= H), token_of_row [R] i32, xs [R, H] out (same dtype as x).
Status permute_forward(const Exec& exec, const TensorView& x, const TensorView& token_of_row, const TensorView& xs);
// grad_x[t] = sum_k grad_xs[row_of[t, k]] over k with row_of[t, k] >= 0.
// grad_xs [R, H], row_of [T, K] i32, grad_x [T, H] out.
Status permute_backward(const Exec& exec, const TensorView& grad_xs, const TensorView& row_of,
                        const TensorView& grad_x);

// y[t] = sum_k weights[t, k] * ys[row_of[t, k]] over k with row_of[t, k] >= 0, accumulated in f32.
// ys [R, H], weights [T, K] f32 (f64 with f64 ys), row_of [T, K] i32, y [T, H] out.
Status combine_forward(const Exec& exec, const TensorView& ys, const TensorView& weights, const TensorView& row_of,
                       const TensorView& y);
// grad_ys[row_of[t,k]] = weights[t,k] * grad_y[t] (rows nobody references: 0);
// grad_weights[t,k] = <grad_y[t], ys[row_of[t,k]]> (0 where dropped). Either output may be absent.
Status combine_backward(const Exec& exec, const TensorView& grad_y, const TensorView& ys, const TensorView& weights,
                        const TensorView& row_of, const TensorView& grad_ys, const TensorView& grad_weights);

}  // namespace smoe

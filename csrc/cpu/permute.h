// csrc/cpu/permute.h: CPU backend of permute and combine (see include/smoe/ops/permute.h).
//
// csrc/core/permute.cpp validates shapes, dtypes, devices and strides before calling these; the
// functions here check only what needs the data itself (row / token indices out of range, a row
// referenced twice where that is ambiguous) and return kInvalidArgument for it before writing any
// output.
#pragma once

#include "smoe/ops/permute.h"

namespace smoe::cpu {

Status permute_forward(const TensorView& x, const TensorView& token_of_row, const TensorView& xs);
Status permute_backward(const TensorView& grad_xs, const TensorView& row_of, const TensorView& grad_x);
Status combine_forward(const TensorView& ys, const TensorView& weights, const TensorView& row_of, const TensorView& y);
Status combine_backward(const TensorView& grad_y, const TensorView& ys, const TensorView& weights,
                        const TensorView& row_of, const TensorView& grad_ys, const TensorView& grad_weights);

}  // namespace smoe::cpu

// csrc/cpu/topk_gating.h: CPU backend of top-k gating (see include/smoe/ops/topk_gating.h).
//
// The entry points in csrc/core validate every argument (shapes, dtypes, devices, params) before
// calling these; the CPU router functions only check what needs the data itself (NaN logits,
// out-of-range indices) and return kInvalidArgument for it.
#pragma once

#include "smoe/ops/topk_gating.h"

namespace smoe::cpu {

Status topk_gating_forward(const TopkGatingParams& params, const TensorView& logits, const TensorView& bias,
                           const TensorView& weights, const TensorView& experts, const TensorView& scores);

Status topk_gating_backward(const TopkGatingParams& params, const TensorView& scores, const TensorView& experts,
                            const TensorView& grad_weights, const TensorView& grad_scores,
                            const TensorView& grad_logits);

}  // namespace smoe::cpu

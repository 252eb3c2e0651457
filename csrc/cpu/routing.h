// csrc/cpu/routing.h: CPU backend of the routing plan (see include/smoe/ops/routing.h).
//
// csrc/core/routing.cpp validates shapes, dtypes, devices and params before calling these; the
// functions here check only what needs the data itself (expert ids out of range, NaN weights when
// dropping by score) and return kInvalidArgument for it before writing any output.
#pragma once

#include "smoe/ops/routing.h"

namespace smoe::cpu {

// Bytes of workspace routing_plan below needs (independent of the thread count).
int64_t routing_plan_workspace_bytes(const RoutingPlanParams& params, int64_t T, int64_t K);

Status routing_plan(const RoutingPlanParams& params, const TensorView& experts, const TensorView& weights,
                    const TensorView& counts, const TensorView& offsets, const TensorView& row_of,
                    const TensorView& token_of_row, const TensorView& workspace);

}  // namespace smoe::cpu

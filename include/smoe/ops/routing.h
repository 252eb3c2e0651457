// smoe/ops/routing.h: the routing plan — from experts[T, K] to the expert-sorted row layout.
//
// Row layout: the rows of expert e are [offsets[e], offsets[e] + counts[e]); within an expert the
// rows follow (t, k) order (token order, stable). Segments may be padded up to a multiple of
// pad_multiple rows (for GEMM tiles); padding rows have token_of_row == -1.
// Indices: counts/row_of/token_of_row are i32 (R < 2^31 always); offsets are i64 so that
// offsets[e] * H never overflows. Every kernel computes row * H in 64-bit.
#pragma once

#include "smoe/tensor.h"

namespace smoe {

enum class DropPolicy : int32_t {
  kByTokenOrder = 0,  // an expert over capacity keeps its first C assignments in token order
  kByScore = 1,       // ... keeps its C highest-weight assignments (ties: lower token), rows still in token order
};

struct RoutingPlanParams {
  int32_t num_experts = 0;  // E
  int64_t capacity = -1;    // C; < 0 means dropless
  DropPolicy drop_policy = DropPolicy::kByTokenOrder;
  int32_t pad_multiple = 1;  // pad every expert segment to a multiple of this many rows
};

// Upper bound of R (rows of the expert-sorted buffer) for T tokens and K picks: size the
// token_of_row output and the permuted buffers with it (no host sync needed on a GPU).
// 0 for parameters routing_plan rejects (E < 1, pad_multiple < 1, T < 0, K < 0); saturates at
// INT64_MAX instead of overflowing (routing_plan accepts at most 2^31 - 1 rows).
int64_t routing_plan_max_rows(const RoutingPlanParams& params, int64_t T, int64_t K);
// Bytes of workspace routing_plan needs.
int64_t routing_plan_workspace_bytes(const RoutingPlanParams& params, int64_t T, int64_t K);

// experts      [T, K] i32 in
// weights      [T, K] f32 in (needed for kByScore with a capacity; may be absent otherwise)
// counts       [E]    i32 out: rows kept per expert (unpadded)
// offsets      [E+1]  i64 out: segment starts (padded); offsets[E] = rows used
// row_of       [T, K] i32 out: row of (t, k), -1 if dropped
// token_of_row [R_max] i32 out: token of each row; -1 for padding and for rows past offsets[E]
// workspace    u8 [routing_plan_workspace_bytes] (absent allowed when it is 0)
Status routing_plan(const Exec& exec, const RoutingPlanParams& params, const TensorView& experts,
                    const TensorView& weights, const TensorView& counts, const TensorView& offsets,
                    const TensorView& row_of, const TensorView& token_of_row, const TensorView& workspace);

}  // namespace smoe

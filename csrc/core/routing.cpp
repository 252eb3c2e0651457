// Public entry points of the routing op family (smoe/ops/routing.h): validate, resolve the backend,
// dispatch (csrc/core/dispatch.h; routing_plan always has work: it writes offsets even for T = 0).
// The sort lives in csrc/cpu/routing.cpp and csrc/cuda/routing.cu.
#include "smoe/ops/routing.h"

#include <algorithm>
#include <climits>
#include <string>

#include "core/check.h"
#include "core/dispatch.h"
#include "cpu/routing.h"

namespace smoe {
namespace {

constexpr const char* kOp = "routing_plan";
bool needs_weights(const RoutingPlanParams& p) { return p.capacity >= 0 && p.drop_policy == DropPolicy::kByScore; }

using detail::Checker;

// A contiguous tensor of `dtype` with `ndim` dims on the experts' device.
detail::ArgCheck dense(const Checker& c, const char* arg, const TensorView& v, int ndim, const char* layout,
                       DType dtype) {
  detail::ArgCheck k = c.arg(arg, v);
  k.dims(ndim, layout).dtype(dtype).contiguous().same_device();
  return k;
}

Status check_params(const RoutingPlanParams& p) {
  if (p.num_experts < 1) {
    return invalid_argument(kOp, "params.num_experts", "E >= 1", std::to_string(p.num_experts));
  }
  if (p.pad_multiple < 1) {
    return invalid_argument(kOp, "params.pad_multiple", ">= 1 (1 = no padding)", std::to_string(p.pad_multiple));
  }
  if (p.drop_policy != DropPolicy::kByTokenOrder && p.drop_policy != DropPolicy::kByScore) {
    return invalid_argument(kOp, "params.drop_policy", "kByTokenOrder (0) or kByScore (1)",
                            std::to_string(static_cast<int32_t>(p.drop_policy)));
  }
  return Status::Ok();
}

}  // namespace

int64_t routing_plan_max_rows(const RoutingPlanParams& params, int64_t T, int64_t K) {
  if (params.num_experts < 1 || params.pad_multiple < 1 || T < 0 || K < 0) return 0;
  const int64_t E = params.num_experts;
  int64_t kept = sat_mul(T, K);  // dropless: every assignment gets a row
  // With a capacity each expert keeps at most C rows (C clamped first so that E * C cannot overflow).
  if (params.capacity >= 0) kept = std::min(kept, sat_mul(E, std::min<int64_t>(params.capacity, kept)));
  // Padding adds at most pad - 1 rows per expert (none to an empty one). Saturates at INT64_MAX.
  return sat_add(kept, sat_mul(E, int64_t(params.pad_multiple) - 1));
}

// One size serves every backend of the build: the largest of their needs.
int64_t routing_plan_workspace_bytes(const RoutingPlanParams& params, int64_t T, int64_t K) {
  // Sizes routing_plan rejects (more than 2^31 - 1 assignments) need no workspace; this also keeps
  // the backends' T*K products far from overflow.
  if (sat_mul(T, K) > INT32_MAX || routing_plan_max_rows(params, T, K) > INT32_MAX) return 0;
  int64_t bytes = cpu::routing_plan_workspace_bytes(params, T, K);
#if defined(SMOE_HAVE_CUDA) && SMOE_HAVE_CUDA
  bytes = std::max(bytes, cuda::routing_plan_workspace_bytes(params, T, K));
#endif
#if defined(SMOE_HAVE_CUDA_SIMT) && SMOE_HAVE_CUDA_SIMT
  bytes = std::max(bytes, cuda_simt::routing_plan_workspace_bytes(params, T, K));
#endif
  return bytes;
}

Status routing_plan(const Exec& exec, const RoutingPlanParams& params, const TensorView& experts,
                    const TensorView& weights, const TensorView& counts, const TensorView& offsets,
                    const TensorView& row_of, const TensorView& token_of_row, const TensorView& workspace) {
  const Checker c{kOp, experts, "experts"};
  SMOE_RETURN_IF_ERROR(check_params(params));
  SMOE_RETURN_IF_ERROR(c.arg("experts", experts).dims(2, "[T, K]").dtype(DType::kI32).contiguous());
  const int64_t T = experts.size(0), K = experts.size(1), E = params.num_experts;
  const int64_t R_max = routing_plan_max_rows(params, T, K);
  if (R_max > INT32_MAX || sat_mul(T, K) > INT32_MAX) {
    return invalid_argument(kOp, "experts", "T*K + E*(pad_multiple-1) <= 2^31 - 1 rows (rows are i32)",
                            shape_string(experts) + " with E = " + std::to_string(E) +
                                ", pad_multiple = " + std::to_string(params.pad_multiple));
  }

  if (needs_weights(params) || weights.defined()) {
    if (!weights.defined()) {
      return invalid_argument(kOp, "weights", "a [T, K] f32 tensor (drop_policy kByScore with a capacity)", "absent");
    }
    SMOE_RETURN_IF_ERROR(dense(c, "weights", weights, 2, "[T, K]", DType::kF32)
                             .size(0, T, "T = experts.size(0)")
                             .size(1, K, "K = experts.size(1)"));
  }
  SMOE_RETURN_IF_ERROR(dense(c, "counts", counts, 1, "[E]", DType::kI32).size(0, E, "E = params.num_experts"));
  SMOE_RETURN_IF_ERROR(
      dense(c, "offsets", offsets, 1, "[E+1]", DType::kI64).size(0, E + 1, "E + 1 = params.num_experts + 1"));
  SMOE_RETURN_IF_ERROR(dense(c, "row_of", row_of, 2, "[T, K]", DType::kI32)
                           .size(0, T, "T = experts.size(0)")
                           .size(1, K, "K = experts.size(1)"));
  SMOE_RETURN_IF_ERROR(dense(c, "token_of_row", token_of_row, 1, "[R_max]", DType::kI32));
  if (token_of_row.size(0) < R_max) {
    return invalid_argument(kOp, "token_of_row", "size(0) >= " + std::to_string(R_max) + " (routing_plan_max_rows)",
                            shape_string(token_of_row));
  }
  const int64_t ws_bytes = routing_plan_workspace_bytes(params, T, K);
  if (ws_bytes > 0 || workspace.defined()) {
    SMOE_RETURN_IF_ERROR(dense(c, "workspace", workspace, 1, "[bytes]", DType::kU8));
    if (workspace.size(0) < ws_bytes) {
      return invalid_argument(kOp, "workspace",
                              "size(0) >= " + std::to_string(ws_bytes) + " bytes (routing_plan_workspace_bytes)",
                              shape_string(workspace));
    }
    if (reinterpret_cast<uintptr_t>(workspace.data) % alignof(int32_t) != 0) {
      return invalid_argument(kOp, "workspace", "data aligned to 4 bytes (it holds i32 counters)",
                              "a misaligned pointer");
    }
  }

  return SMOE_DISPATCH(kOp, exec, experts, routing_plan, params, experts, weights, counts, offsets, row_of,
                       token_of_row, workspace);
}

}  // namespace smoe

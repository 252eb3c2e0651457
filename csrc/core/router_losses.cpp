// Public entry points of the router losses and the balancing-bias update (smoe/ops/router_losses.h):
// validate, resolve the backend, return on empty work, dispatch (csrc/core/dispatch.h). The math
// lives in csrc/cpu/router_losses.cpp and csrc/cuda/.
#include "smoe/ops/router_losses.h"

#include <cmath>
#include <cstdint>
#include <string>

#include "core/dispatch.h"
#include "core/router_checks.h"
#include "core/workspace.h"
#include "cpu/router_losses.h"

namespace smoe {
namespace {

using detail::Checker;

Status check_lb_inputs(const Checker& c, const TensorView& probs, const TensorView& experts) {
  SMOE_RETURN_IF_ERROR(detail::check_scores(c, "probs", probs));
  if (probs.size(1) < 1) return c.invalid("probs", "E = size(1) >= 1", shape_string(probs));
  return c.arg("experts", experts)
      .dims(2, "[T, K]")
      .dtype(DType::kI32)
      .size(0, probs.size(0), "T = probs.size(0)")
      .row_contiguous()
      .same_device();
}

Status check_z_logits(const Checker& c, const TensorView& logits) {
  SMOE_RETURN_IF_ERROR(detail::check_logits(c, logits));
  if (logits.size(1) < 1) return c.invalid("logits", "E = size(1) >= 1", shape_string(logits));
  return Status::Ok();
}

// The caller's scratch: u8 [>= bytes] on the tensors' device, 8-byte aligned (it holds f64 and i32
// pieces at 256-byte offsets); absent allowed when no byte is needed or the backend is 'cpu'.
Status check_workspace(const Checker& c, const Exec& exec, const TensorView& ws, int64_t bytes, const char* query) {
  Backend b;
  SMOE_RETURN_IF_ERROR(resolve_backend(c.op, exec, c.ref, &b));
  if (!ws.defined() && (bytes == 0 || b == Backend::kCpu)) return Status::Ok();
  SMOE_RETURN_IF_ERROR(c.arg("workspace", ws).dims(1, "[bytes]").dtype(DType::kU8).contiguous().same_device());
  if (ws.size(0) < bytes) {
    return c.invalid("workspace", "size(0) >= " + std::to_string(bytes) + " bytes (" + query + ")", shape_string(ws));
  }
  if (bytes > 0 && reinterpret_cast<uintptr_t>(ws.data) % alignof(double) != 0) {
    return c.invalid("workspace", "data aligned to 8 bytes (it holds f64 and i32 pieces)", "a misaligned pointer");
  }
  return Status::Ok();
}

}  // namespace

int64_t load_balancing_loss_workspace_bytes(int64_t T, int64_t E) { return workspace::lb_loss_bytes(T, E); }
int64_t z_loss_workspace_bytes(int64_t T, int64_t E) { return workspace::z_loss_bytes(T, E); }

Status load_balancing_loss_forward(const Exec& exec, const TensorView& probs, const TensorView& experts,
                                   const TensorView& loss, const TensorView& workspace) {
  const Checker c{"load_balancing_loss_forward", probs, "probs"};
  SMOE_RETURN_IF_ERROR(check_lb_inputs(c, probs, experts));
  SMOE_RETURN_IF_ERROR(c.scalar("loss", loss, probs.dtype));
  SMOE_RETURN_IF_ERROR(check_workspace(c, exec, workspace,
                                       load_balancing_loss_workspace_bytes(probs.size(0), probs.size(1)),
                                       "load_balancing_loss_workspace_bytes"));
  // T == 0 still writes the loss (0): always work.
  return SMOE_DISPATCH(c.op, exec, probs, load_balancing_loss_forward, probs, experts, loss, workspace);
}

Status load_balancing_loss_backward(const Exec& exec, const TensorView& probs, const TensorView& experts,
                                    const TensorView& grad_loss, const TensorView& grad_probs,
                                    const TensorView& workspace) {
  const Checker c{"load_balancing_loss_backward", probs, "probs"};
  SMOE_RETURN_IF_ERROR(check_lb_inputs(c, probs, experts));
  SMOE_RETURN_IF_ERROR(c.scalar("grad_loss", grad_loss, probs.dtype));
  SMOE_RETURN_IF_ERROR(detail::router_matrix(c, "grad_probs", grad_probs, "[T, E]", probs.dtype, probs.size(0),
                                             "T = probs.size(0)", probs.size(1), "E = probs.size(1)"));
  SMOE_RETURN_IF_ERROR(check_workspace(c, exec, workspace,
                                       load_balancing_loss_workspace_bytes(probs.size(0), probs.size(1)),
                                       "load_balancing_loss_workspace_bytes"));
  return SMOE_DISPATCH_WORK(c.op, exec, probs, probs.size(0) > 0, load_balancing_loss_backward, probs, experts,
                            grad_loss, grad_probs, workspace);
}

Status z_loss_forward(const Exec& exec, const TensorView& logits, const TensorView& loss, const TensorView& workspace) {
  const Checker c{"z_loss_forward", logits, "logits"};
  SMOE_RETURN_IF_ERROR(check_z_logits(c, logits));
  SMOE_RETURN_IF_ERROR(c.scalar("loss", loss, acc_dtype(logits.dtype)));
  SMOE_RETURN_IF_ERROR(check_workspace(c, exec, workspace, z_loss_workspace_bytes(logits.size(0), logits.size(1)),
                                       "z_loss_workspace_bytes"));
  // T == 0 still writes the loss (0): always work.
  return SMOE_DISPATCH(c.op, exec, logits, z_loss_forward, logits, loss, workspace);
}

Status z_loss_backward(const Exec& exec, const TensorView& logits, const TensorView& grad_loss,
                       const TensorView& grad_logits, const TensorView& workspace) {
  const Checker c{"z_loss_backward", logits, "logits"};
  SMOE_RETURN_IF_ERROR(check_z_logits(c, logits));
  const DType acc = acc_dtype(logits.dtype);
  SMOE_RETURN_IF_ERROR(c.scalar("grad_loss", grad_loss, acc));
  SMOE_RETURN_IF_ERROR(detail::router_matrix(c, "grad_logits", grad_logits, "[T, E]", acc, logits.size(0),
                                             "T = logits.size(0)", logits.size(1), "E = logits.size(1)"));
  SMOE_RETURN_IF_ERROR(check_workspace(c, exec, workspace, z_loss_workspace_bytes(logits.size(0), logits.size(1)),
                                       "z_loss_workspace_bytes"));
  return SMOE_DISPATCH_WORK(c.op, exec, logits, logits.size(0) > 0, z_loss_backward, logits, grad_loss, grad_logits,
                            workspace);
}

Status balancing_bias_update(const Exec& exec, const TensorView& counts, const TensorView& bias, float rate) {
  const Checker c{"balancing_bias_update", counts, "counts"};
  SMOE_RETURN_IF_ERROR(c.arg("counts", counts).dims(1, "[E]").dtype(DType::kI32).contiguous());
  SMOE_RETURN_IF_ERROR(c.arg("bias", bias)
                           .dims(1, "[E]")
                           .dtype(DType::kF32)
                           .size(0, counts.size(0), "E = counts.size(0)")
                           .contiguous()
                           .same_device());
  if (!std::isfinite(rate)) return c.invalid("rate", "a finite value", std::to_string(rate));
  return SMOE_DISPATCH_WORK(c.op, exec, counts, counts.size(0) > 0, balancing_bias_update, counts, bias, rate);
}

}  // namespace smoe

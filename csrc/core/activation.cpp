// Public entry points of the expert activations (smoe/ops/activation.h): validate, resolve the
// backend, return on empty work, dispatch (csrc/core/dispatch.h). The math lives in
// csrc/cpu/activation.cpp and csrc/cuda/activation.cu.
#include "smoe/ops/activation.h"

#include <string>

#include "core/check.h"
#include "core/dispatch.h"
#include "cpu/activation.h"

namespace smoe {

// Every tensor is a 2-D matrix with dense rows in the dtype and on the device of `in` (which may be
// any float dtype): Checker::matrix.
using detail::Checker;

Status activation_forward(const Exec& exec, Activation act, const TensorView& in, const TensorView& out) {
  const Checker c{"activation_forward", in, "in"};
  SMOE_RETURN_IF_ERROR(detail::check_activation(c, "act", act));
  const bool gated = is_gated(act);
  SMOE_RETURN_IF_ERROR(c.matrix("in", in, gated ? "[R, 2F]" : "[R, F]"));
  SMOE_RETURN_IF_ERROR(c.matrix("out", out, "[R, F]"));
  const int64_t R = in.size(0);
  SMOE_RETURN_IF_ERROR(c.arg("out", out).size(0, R, "R (= in.size(0))"));
  const int64_t F = out.size(1);
  SMOE_RETURN_IF_ERROR(c.arg("in", in).size(1, gated ? 2 * F : F,
                                            gated ? "2F (gated activation, F = out.size(1))" : "F (= out.size(1))"));
  return SMOE_DISPATCH_WORK(c.op, exec, in, R > 0 && F > 0, activation_forward, act, in, out);
}

Status activation_backward(const Exec& exec, Activation act, const TensorView& in, const TensorView& grad_out,
                           const TensorView& grad_in) {
  const Checker c{"activation_backward", in, "in"};
  SMOE_RETURN_IF_ERROR(detail::check_activation(c, "act", act));
  const bool gated = is_gated(act);
  SMOE_RETURN_IF_ERROR(c.matrix("in", in, gated ? "[R, 2F]" : "[R, F]"));
  SMOE_RETURN_IF_ERROR(c.matrix("grad_out", grad_out, "[R, F]"));
  const int64_t R = in.size(0);
  SMOE_RETURN_IF_ERROR(c.arg("grad_out", grad_out).size(0, R, "R (= in.size(0))"));
  const int64_t F = grad_out.size(1);
  SMOE_RETURN_IF_ERROR(c.arg("in", in).size(
      1, gated ? 2 * F : F, gated ? "2F (gated activation, F = grad_out.size(1))" : "F (= grad_out.size(1))"));
  SMOE_RETURN_IF_ERROR(c.matrix("grad_in", grad_in, gated ? "[R, 2F]" : "[R, F]")
                           .size(0, R, "R (= in.size(0))")
                           .size(1, in.size(1), "F1 (= in.size(1))"));
  return SMOE_DISPATCH_WORK(c.op, exec, in, R > 0 && F > 0, activation_backward, act, in, grad_out, grad_in);
}

}  // namespace smoe

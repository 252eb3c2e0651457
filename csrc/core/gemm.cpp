// Public entry points of the grouped GEMM / activation op family: validate every argument, return
// early on zero work, then dispatch to a backend. The math lives in csrc/cpu/gemm.cpp and
// csrc/cpu/activation.cpp.
#include "smoe/ops/gemm.h"

#include <climits>
#include <string>

#include "core/dispatch.h"
#include "cpu/gemm.h"

namespace smoe {
namespace {

// The BLAS takes int sizes and leading dimensions.
Status expect_blas_sized(const char* op, const char* arg, const TensorView& v) {
  for (int d = 0; d < v.ndim; ++d) {
    if (v.shape[d] > INT32_MAX || v.strides[d] > INT32_MAX) {
      return invalid_argument(op, arg, "sizes and strides below 2^31 (BLAS int)", shape_string(v));
    }
  }
  return Status::Ok();
}

Status expect_float_matrix(const char* op, const char* arg, const TensorView& v, const char* layout,
                           const TensorView& ref, const char* ref_arg) {
  SMOE_RETURN_IF_ERROR(expect_dims(op, arg, v, 2, layout));
  if (&v == &ref) {
    SMOE_RETURN_IF_ERROR(expect_float_dtype(op, arg, v));
  } else {
    SMOE_RETURN_IF_ERROR(expect_same_dtype(op, arg, v, ref_arg, ref));
  }
  SMOE_RETURN_IF_ERROR(expect_row_contiguous(op, arg, v));
  SMOE_RETURN_IF_ERROR(expect_device(op, arg, v, ref.device, ref.device_index));
  return expect_blas_sized(op, arg, v);
}

Status expect_offsets(const char* op, const TensorView& offsets, const TensorView& ref) {
  SMOE_RETURN_IF_ERROR(expect_dims(op, "offsets", offsets, 1, "[E+1]"));
  SMOE_RETURN_IF_ERROR(expect_dtype(op, "offsets", offsets, DType::kI64));
  SMOE_RETURN_IF_ERROR(expect_contiguous(op, "offsets", offsets));
  SMOE_RETURN_IF_ERROR(expect_device(op, "offsets", offsets, ref.device, ref.device_index));
  if (offsets.size(0) < 1) return invalid_argument(op, "offsets", "E+1 >= 1 entries", shape_string(offsets));
  return Status::Ok();
}

Status expect_activation(const char* op, Activation act) {
  switch (act) {
    case Activation::kSwiGLU:
    case Activation::kGeGLU:
    case Activation::kGELU:
    case Activation::kReLU: return Status::Ok();
  }
  return invalid_argument(op, "act", "kSwiGLU (0), kGeGLU (1), kGELU (2) or kReLU (3)",
                          std::to_string(static_cast<int32_t>(act)));
}

}  // namespace

Status grouped_gemm(const Exec& exec, const GroupedGemmParams& params, const TensorView& a, const TensorView& b,
                    const TensorView& offsets, const TensorView& c) {
  constexpr const char* op = "grouped_gemm";
  SMOE_RETURN_IF_ERROR(expect_float_matrix(op, "a", a, "[R, Kd]", a, "a"));
  const char* b_layout = params.trans_b ? "[E, N, Kd] (trans_b = true)" : "[E, Kd, N] (trans_b = false)";
  SMOE_RETURN_IF_ERROR(expect_dims(op, "b", b, 3, b_layout));
  SMOE_RETURN_IF_ERROR(expect_same_dtype(op, "b", b, "a", a));
  SMOE_RETURN_IF_ERROR(expect_contiguous(op, "b", b));
  SMOE_RETURN_IF_ERROR(expect_device(op, "b", b, a.device, a.device_index));
  SMOE_RETURN_IF_ERROR(expect_blas_sized(op, "b", b));
  SMOE_RETURN_IF_ERROR(expect_offsets(op, offsets, a));
  const int64_t R = a.size(0), Kd = a.size(1), E = offsets.size(0) - 1;
  SMOE_RETURN_IF_ERROR(expect_size(op, "b", b, 0, E, "E (= offsets.size(0) - 1)"));
  SMOE_RETURN_IF_ERROR(expect_size(op, "b", b, params.trans_b ? 2 : 1, Kd, "Kd (= a.size(1))"));
  const int64_t N = b.size(params.trans_b ? 1 : 2);
  SMOE_RETURN_IF_ERROR(expect_float_matrix(op, "c", c, "[R, N]", a, "a"));
  SMOE_RETURN_IF_ERROR(expect_size(op, "c", c, 0, R, "R (= a.size(0))"));
  SMOE_RETURN_IF_ERROR(expect_size(op, "c", c, 1, N, params.trans_b ? "N (= b.size(1))" : "N (= b.size(2))"));

  Backend backend;
  SMOE_RETURN_IF_ERROR(resolve_backend(op, exec, a, &backend));
  if (R == 0 || N == 0) return Status::Ok();
  if (backend != Backend::kCpu) return SMOE_DEVICE_DISPATCH(op, backend, exec, grouped_gemm, params, a, b, offsets, c);
  return cpu::grouped_gemm(params, a, b, offsets, c);
}

Status grouped_gemm_wgrad(const Exec& exec, const TensorView& a, const TensorView& b, const TensorView& offsets,
                          const TensorView& c) {
  constexpr const char* op = "grouped_gemm_wgrad";
  SMOE_RETURN_IF_ERROR(expect_float_matrix(op, "a", a, "[R, M]", a, "a"));
  SMOE_RETURN_IF_ERROR(expect_float_matrix(op, "b", b, "[R, N]", a, "a"));
  const int64_t R = a.size(0), M = a.size(1), N = b.size(1);
  SMOE_RETURN_IF_ERROR(expect_size(op, "b", b, 0, R, "R (= a.size(0))"));
  SMOE_RETURN_IF_ERROR(expect_offsets(op, offsets, a));
  const int64_t E = offsets.size(0) - 1;
  SMOE_RETURN_IF_ERROR(expect_dims(op, "c", c, 3, "[E, M, N]"));
  SMOE_RETURN_IF_ERROR(expect_same_dtype(op, "c", c, "a", a));
  SMOE_RETURN_IF_ERROR(expect_contiguous(op, "c", c));
  SMOE_RETURN_IF_ERROR(expect_device(op, "c", c, a.device, a.device_index));
  SMOE_RETURN_IF_ERROR(expect_size(op, "c", c, 0, E, "E (= offsets.size(0) - 1)"));
  SMOE_RETURN_IF_ERROR(expect_size(op, "c", c, 1, M, "M (= a.size(1))"));
  SMOE_RETURN_IF_ERROR(expect_size(op, "c", c, 2, N, "N (= b.size(1))"));
  SMOE_RETURN_IF_ERROR(expect_blas_sized(op, "c", c));

  Backend backend;
  SMOE_RETURN_IF_ERROR(resolve_backend(op, exec, a, &backend));
  // R == 0 is still work: every c[e] must become zeros.
  if (c.numel() == 0) return Status::Ok();
  if (backend != Backend::kCpu) return SMOE_DEVICE_DISPATCH(op, backend, exec, grouped_gemm_wgrad, a, b, offsets, c);
  return cpu::grouped_gemm_wgrad(a, b, offsets, c);
}

Status activation_forward(const Exec& exec, Activation act, const TensorView& in, const TensorView& out) {
  constexpr const char* op = "activation_forward";
  SMOE_RETURN_IF_ERROR(expect_activation(op, act));
  SMOE_RETURN_IF_ERROR(expect_float_matrix(op, "in", in, is_gated(act) ? "[R, 2F]" : "[R, F]", in, "in"));
  SMOE_RETURN_IF_ERROR(expect_float_matrix(op, "out", out, "[R, F]", in, "in"));
  const int64_t R = in.size(0);
  SMOE_RETURN_IF_ERROR(expect_size(op, "out", out, 0, R, "R (= in.size(0))"));
  const int64_t F = out.size(1);
  SMOE_RETURN_IF_ERROR(expect_size(op, "in", in, 1, is_gated(act) ? 2 * F : F,
                                   is_gated(act) ? "2F (gated activation, F = out.size(1))" : "F (= out.size(1))"));
  Backend backend;
  SMOE_RETURN_IF_ERROR(resolve_backend(op, exec, in, &backend));
  if (R == 0 || F == 0) return Status::Ok();
  if (backend != Backend::kCpu) return SMOE_DEVICE_DISPATCH(op, backend, exec, activation_forward, act, in, out);
  return cpu::activation_forward(act, in, out);
}

Status activation_backward(const Exec& exec, Activation act, const TensorView& in, const TensorView& grad_out,
                           const TensorView& grad_in) {
  constexpr const char* op = "activation_backward";
  SMOE_RETURN_IF_ERROR(expect_activation(op, act));
  SMOE_RETURN_IF_ERROR(expect_float_matrix(op, "in", in, is_gated(act) ? "[R, 2F]" : "[R, F]", in, "in"));
  SMOE_RETURN_IF_ERROR(expect_float_matrix(op, "grad_out", grad_out, "[R, F]", in, "in"));
  const int64_t R = in.size(0);
  SMOE_RETURN_IF_ERROR(expect_size(op, "grad_out", grad_out, 0, R, "R (= in.size(0))"));
  const int64_t F = grad_out.size(1);
  SMOE_RETURN_IF_ERROR(expect_size(op, "in", in, 1, is_gated(act) ? 2 * F : F,
                                   is_gated(act) ? "2F (gated activation, F = grad_out.size(1))"
                                                 : "F (= grad_out.size(1))"));
  SMOE_RETURN_IF_ERROR(expect_float_matrix(op, "grad_in", grad_in, is_gated(act) ? "[R, 2F]" : "[R, F]", in, "in"));
  SMOE_RETURN_IF_ERROR(expect_size(op, "grad_in", grad_in, 0, R, "R (= in.size(0))"));
  SMOE_RETURN_IF_ERROR(expect_size(op, "grad_in", grad_in, 1, in.size(1), "F1 (= in.size(1))"));
  Backend backend;
  SMOE_RETURN_IF_ERROR(resolve_backend(op, exec, in, &backend));
  if (R == 0 || F == 0) return Status::Ok();
  if (backend != Backend::kCpu) return SMOE_DEVICE_DISPATCH(op, backend, exec, activation_backward, act, in, grad_out, grad_in);
  return cpu::activation_backward(act, in, grad_out, grad_in);
}

}  // namespace smoe

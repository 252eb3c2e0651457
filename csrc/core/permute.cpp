// Public entry points of permute and combine (smoe/ops/permute.h): validate, resolve the backend,
// return on empty work, dispatch (csrc/core/dispatch.h). The gathers live in csrc/cpu/permute.cpp
// and csrc/cuda/permute.cu.
#include "smoe/ops/permute.h"

#include <string>

#include "core/check.h"
#include "core/dispatch.h"
#include "cpu/permute.h"

namespace smoe {
namespace {

using detail::ArgCheck;
using detail::Checker;

// The data tensor every other argument is checked against: 2-D, float dtype.
Status check_data(const Checker& c, const char* layout, bool row_strided) {
  return c.arg(c.ref_name, c.ref).dims(2, layout).float_dtype().dense(row_strided);
}

// A 2-D tensor of `dtype` on the data's device, [rows, cols] where a size is >= 0 (-1: any size);
// contiguous (the outputs and the index tensors).
ArgCheck matrix(const Checker& c, const char* arg, const TensorView& v, const char* layout, DType dtype, int64_t rows,
                const char* rows_meaning, int64_t cols, const char* cols_meaning) {
  ArgCheck k = c.arg(arg, v);
  k.dims(2, layout)
      .dtype(dtype)
      .size_if_known(0, rows, rows_meaning)
      .size_if_known(1, cols, cols_meaning)
      .contiguous()
      .same_device();
  return k;
}

// row_of [T, K] i32 contiguous; T is checked against `T` when T >= 0.
ArgCheck row_of_matrix(const Checker& c, const TensorView& row_of, int64_t T, const char* t_meaning) {
  return matrix(c, "row_of", row_of, "[T, K]", DType::kI32, T, t_meaning, -1, "");
}

}  // namespace

Status permute_forward(const Exec& exec, const TensorView& x, const TensorView& token_of_row, const TensorView& xs) {
  const Checker c{"permute_forward", x, "x"};
  SMOE_RETURN_IF_ERROR(check_data(c, "[T, H]", /*row_strided=*/true));
  const int64_t H = x.size(1);
  SMOE_RETURN_IF_ERROR(
      c.arg("token_of_row", token_of_row).dims(1, "[R]").dtype(DType::kI32).contiguous().same_device());
  const int64_t R = token_of_row.size(0);
  SMOE_RETURN_IF_ERROR(matrix(c, "xs", xs, "[R, H]", x.dtype, R, "R = token_of_row.size(0)", H, "H = x.size(1)"));
  return SMOE_DISPATCH_WORK(c.op, exec, x, R > 0 && H > 0, permute_forward, x, token_of_row, xs);
}

Status permute_backward(const Exec& exec, const TensorView& grad_xs, const TensorView& row_of,
                        const TensorView& grad_x) {
  const Checker c{"permute_backward", grad_xs, "grad_xs"};
  SMOE_RETURN_IF_ERROR(check_data(c, "[R, H]", false));
  const int64_t H = grad_xs.size(1);
  SMOE_RETURN_IF_ERROR(row_of_matrix(c, row_of, -1, ""));
  const int64_t T = row_of.size(0);
  SMOE_RETURN_IF_ERROR(
      matrix(c, "grad_x", grad_x, "[T, H]", grad_xs.dtype, T, "T = row_of.size(0)", H, "H = grad_xs.size(1)"));
  return SMOE_DISPATCH_WORK(c.op, exec, grad_xs, T > 0 && H > 0, permute_backward, grad_xs, row_of, grad_x);
}

Status combine_forward(const Exec& exec, const TensorView& ys, const TensorView& weights, const TensorView& row_of,
                       const TensorView& y) {
  const Checker c{"combine_forward", ys, "ys"};
  SMOE_RETURN_IF_ERROR(check_data(c, "[R, H]", false));
  const int64_t H = ys.size(1);
  SMOE_RETURN_IF_ERROR(row_of_matrix(c, row_of, -1, ""));
  const int64_t T = row_of.size(0), K = row_of.size(1);
  SMOE_RETURN_IF_ERROR(
      matrix(c, "weights", weights, "[T, K]", acc_dtype(ys.dtype), T, "T = row_of.size(0)", K, "K = row_of.size(1)"));
  SMOE_RETURN_IF_ERROR(matrix(c, "y", y, "[T, H]", ys.dtype, T, "T = row_of.size(0)", H, "H = ys.size(1)"));
  return SMOE_DISPATCH_WORK(c.op, exec, ys, T > 0 && H > 0, combine_forward, ys, weights, row_of, y);
}

Status combine_backward(const Exec& exec, const TensorView& grad_y, const TensorView& ys, const TensorView& weights,
                        const TensorView& row_of, const TensorView& grad_ys, const TensorView& grad_weights) {
  const Checker c{"combine_backward", grad_y, "grad_y"};
  SMOE_RETURN_IF_ERROR(check_data(c, "[T, H]", /*row_strided=*/true));
  const int64_t T = grad_y.size(0), H = grad_y.size(1);
  const DType wdt = acc_dtype(grad_y.dtype);
  SMOE_RETURN_IF_ERROR(row_of_matrix(c, row_of, T, "T = grad_y.size(0)"));
  const int64_t K = row_of.size(1);
  SMOE_RETURN_IF_ERROR(matrix(c, "weights", weights, "[T, K]", wdt, T, "T = grad_y.size(0)", K, "K = row_of.size(1)"));
  // ys is read only for grad_weights; without it, it may be absent (autograd need not save it).
  int64_t R = -1;
  if (ys.defined() || grad_weights.defined()) {
    SMOE_RETURN_IF_ERROR(matrix(c, "ys", ys, "[R, H]", grad_y.dtype, -1, "", H, "H = grad_y.size(1)"));
    R = ys.size(0);
  }
  if (grad_ys.defined()) {
    SMOE_RETURN_IF_ERROR(
        matrix(c, "grad_ys", grad_ys, "[R, H]", grad_y.dtype, R, "R = ys.size(0)", H, "H = grad_y.size(1)"));
  }
  if (grad_weights.defined()) {
    SMOE_RETURN_IF_ERROR(
        matrix(c, "grad_weights", grad_weights, "[T, K]", wdt, T, "T = grad_y.size(0)", K, "K = row_of.size(1)"));
  }
  return SMOE_DISPATCH_WORK(c.op, exec, grad_y, grad_ys.numel() > 0 || grad_weights.numel() > 0, combine_backward,
                            grad_y, ys, weights, row_of, grad_ys, grad_weights);
}

}  // namespace smoe

// Public entry points of permute and combine: validate every argument, return early on zero work,
// then dispatch to a backend. The gathers live in csrc/cpu/permute.cpp (and later csrc/cuda/).
#include "smoe/ops/permute.h"

#include <string>

#include "core/dispatch.h"
#include "cpu/permute.h"

namespace smoe {
namespace {

// Combine weights and their gradient: f32, or f64 when the data is f64 (gradient checks).
DType weight_dtype(DType data) { return data == DType::kF64 ? DType::kF64 : DType::kF32; }

// A 2-D tensor of `dtype` on ref's device, [rows, cols] where a size is >= 0 (-1: any size).
// Row-strided (stride(0) >= size(1)) when `row_strided`, contiguous otherwise.
Status expect_matrix(const char* op, const char* arg, const TensorView& v, const char* layout, DType dtype,
                     int64_t rows, const char* rows_meaning, int64_t cols, const char* cols_meaning,
                     bool row_strided, const TensorView& ref) {
  SMOE_RETURN_IF_ERROR(expect_dims(op, arg, v, 2, layout));
  SMOE_RETURN_IF_ERROR(expect_dtype(op, arg, v, dtype));
  if (rows >= 0) SMOE_RETURN_IF_ERROR(expect_size(op, arg, v, 0, rows, rows_meaning));
  if (cols >= 0) SMOE_RETURN_IF_ERROR(expect_size(op, arg, v, 1, cols, cols_meaning));
  SMOE_RETURN_IF_ERROR(row_strided ? expect_row_contiguous(op, arg, v) : expect_contiguous(op, arg, v));
  return expect_device(op, arg, v, ref.device, ref.device_index);
}

// The data tensor every other argument is checked against: 2-D, float dtype.
Status expect_data(const char* op, const char* arg, const TensorView& v, const char* layout, bool row_strided) {
  SMOE_RETURN_IF_ERROR(expect_dims(op, arg, v, 2, layout));
  SMOE_RETURN_IF_ERROR(expect_float_dtype(op, arg, v));
  return row_strided ? expect_row_contiguous(op, arg, v) : expect_contiguous(op, arg, v);
}

// row_of [T, K] i32 contiguous; T is checked against `T` when T >= 0.
Status expect_row_of(const char* op, const TensorView& row_of, int64_t T, const char* t_meaning, const TensorView& ref) {
  return expect_matrix(op, "row_of", row_of, "[T, K]", DType::kI32, T, t_meaning, -1, "", false, ref);
}


}  // namespace

Status permute_forward(const Exec& exec, const TensorView& x, const TensorView& token_of_row, const TensorView& xs) {
  constexpr const char* op = "permute_forward";
  SMOE_RETURN_IF_ERROR(expect_data(op, "x", x, "[T, H]", /*row_strided=*/true));
  const int64_t H = x.size(1);
  SMOE_RETURN_IF_ERROR(expect_dims(op, "token_of_row", token_of_row, 1, "[R]"));
  SMOE_RETURN_IF_ERROR(expect_dtype(op, "token_of_row", token_of_row, DType::kI32));
  SMOE_RETURN_IF_ERROR(expect_contiguous(op, "token_of_row", token_of_row));
  SMOE_RETURN_IF_ERROR(expect_device(op, "token_of_row", token_of_row, x.device, x.device_index));
  const int64_t R = token_of_row.size(0);
  SMOE_RETURN_IF_ERROR(
      expect_matrix(op, "xs", xs, "[R, H]", x.dtype, R, "R = token_of_row.size(0)", H, "H = x.size(1)", false, x));
  if (R == 0 || H == 0) return Status::Ok();
  return SMOE_DISPATCH(op, exec, x, permute_forward, x, token_of_row, xs);
}

Status permute_backward(const Exec& exec, const TensorView& grad_xs, const TensorView& row_of,
                        const TensorView& grad_x) {
  constexpr const char* op = "permute_backward";
  SMOE_RETURN_IF_ERROR(expect_data(op, "grad_xs", grad_xs, "[R, H]", false));
  const int64_t H = grad_xs.size(1);
  SMOE_RETURN_IF_ERROR(expect_row_of(op, row_of, -1, "", grad_xs));
  const int64_t T = row_of.size(0);
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "grad_x", grad_x, "[T, H]", grad_xs.dtype, T, "T = row_of.size(0)", H,
                                     "H = grad_xs.size(1)", false, grad_xs));
  if (T == 0 || H == 0) return Status::Ok();
  return SMOE_DISPATCH(op, exec, grad_xs, permute_backward, grad_xs, row_of, grad_x);
}

Status combine_forward(const Exec& exec, const TensorView& ys, const TensorView& weights, const TensorView& row_of,
                       const TensorView& y) {
  constexpr const char* op = "combine_forward";
  SMOE_RETURN_IF_ERROR(expect_data(op, "ys", ys, "[R, H]", false));
  const int64_t H = ys.size(1);
  SMOE_RETURN_IF_ERROR(expect_row_of(op, row_of, -1, "", ys));
  const int64_t T = row_of.size(0), K = row_of.size(1);
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "weights", weights, "[T, K]", weight_dtype(ys.dtype), T,
                                     "T = row_of.size(0)", K, "K = row_of.size(1)", false, ys));
  SMOE_RETURN_IF_ERROR(
      expect_matrix(op, "y", y, "[T, H]", ys.dtype, T, "T = row_of.size(0)", H, "H = ys.size(1)", false, ys));
  if (T == 0 || H == 0) return Status::Ok();
  return SMOE_DISPATCH(op, exec, ys, combine_forward, ys, weights, row_of, y);
}

Status combine_backward(const Exec& exec, const TensorView& grad_y, const TensorView& ys, const TensorView& weights,
                        const TensorView& row_of, const TensorView& grad_ys, const TensorView& grad_weights) {
  constexpr const char* op = "combine_backward";
  SMOE_RETURN_IF_ERROR(expect_data(op, "grad_y", grad_y, "[T, H]", /*row_strided=*/true));
  const int64_t T = grad_y.size(0), H = grad_y.size(1);
  const DType wdt = weight_dtype(grad_y.dtype);
  SMOE_RETURN_IF_ERROR(expect_row_of(op, row_of, T, "T = grad_y.size(0)", grad_y));
  const int64_t K = row_of.size(1);
  SMOE_RETURN_IF_ERROR(expect_matrix(op, "weights", weights, "[T, K]", wdt, T, "T = grad_y.size(0)", K,
                                     "K = row_of.size(1)", false, grad_y));
  // ys is read only for grad_weights; without it, it may be absent (autograd need not save it).
  int64_t R = -1;
  if (ys.defined() || grad_weights.defined()) {
    SMOE_RETURN_IF_ERROR(
        expect_matrix(op, "ys", ys, "[R, H]", grad_y.dtype, -1, "", H, "H = grad_y.size(1)", false, grad_y));
    R = ys.size(0);
  }
  if (grad_ys.defined()) {
    SMOE_RETURN_IF_ERROR(expect_matrix(op, "grad_ys", grad_ys, "[R, H]", grad_y.dtype, R, "R = ys.size(0)", H,
                                       "H = grad_y.size(1)", false, grad_y));
  }
  if (grad_weights.defined()) {
    SMOE_RETURN_IF_ERROR(expect_matrix(op, "grad_weights", grad_weights, "[T, K]", wdt, T, "T = grad_y.size(0)", K,
                                       "K = row_of.size(1)", false, grad_y));
  }
  if (grad_ys.numel() == 0 && grad_weights.numel() == 0) return Status::Ok();
  return SMOE_DISPATCH(op, exec, grad_y, combine_backward, grad_y, ys, weights, row_of, grad_ys, grad_weights);
}

}  // namespace smoe

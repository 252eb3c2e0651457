// csrc/core/check.h: the one argument checker of every public entry point in csrc/core.
//
// An entry point builds one Checker for its op, naming the reference tensor whose dtype and device
// the other arguments follow, and checks each argument with a chain that stops at the first failure:
//
//   const Checker c{"topk_gating_forward", logits, "logits"};
//   SMOE_RETURN_IF_ERROR(c.arg("weights", weights).dims(2, "[T, K]").dtype(acc).size(0, T, "T = logits.size(0)")
//                            .size(1, K, "K = params.top_k").row_contiguous().same_device());
//
// Every message is "op: argument 'arg': expected ..., got ..." (smoe/status.h); the wording of each
// check is the one of the expect_* functions in smoe/tensor.h, which the chain calls in order.
// TEACH: the chain carries a Status and turns every later check into a no-op once one failed, so
// the order of the calls is the order of the checks and the first failure is the one reported.
#pragma once

#include <climits>
#include <string>

#include "smoe/ops/activation.h"  // Activation (check_activation)
#include "smoe/tensor.h"

namespace smoe::detail {

class Checker;

// The checks of one argument; converts to the Status of the first failed check (Ok if none).
class ArgCheck {
 public:
  ArgCheck(const Checker& c, const char* name, const TensorView& v) : c_(c), name_(name), v_(v) {}

  ArgCheck& dims(int ndim, const char* layout);
  ArgCheck& dtype(DType dt);
  ArgCheck& float_dtype();                            // f32, bf16, f16 or f64
  ArgCheck& dtype_if(bool ok, const char* expected);  // a custom dtype rule, e.g. "dtype f32 (f64 for ...)"
  ArgCheck& same_dtype();                             // the reference tensor's dtype
  ArgCheck& ref_dtype();  // the reference tensor itself: float_dtype(); any other: same_dtype()
  ArgCheck& size(int dim, int64_t value, const char* meaning);
  ArgCheck& size_if_known(int dim, int64_t value, const char* meaning) {  // value < 0: any size
    return value < 0 ? *this : size(dim, value, meaning);
  }
  ArgCheck& contiguous();
  ArgCheck& row_contiguous();
  ArgCheck& dense(bool row_strided) { return row_strided ? row_contiguous() : contiguous(); }
  ArgCheck& same_device();  // the reference tensor's device
  ArgCheck& blas_sized();   // sizes and strides below 2^31 (the BLAS takes int)
  // A custom check: when !ok, fails with "expected `expected`, got `got`".
  ArgCheck& expect(bool ok, const std::string& expected, const std::string& got);

  const Status& status() const { return st_; }
  operator Status() const { return st_; }  // NOLINT: used inside SMOE_RETURN_IF_ERROR

 private:
  const Checker& c_;
  const char* name_;
  const TensorView& v_;
  Status st_;
};

class Checker {
 public:
  // `ref`: the tensor whose dtype and device the others follow (same_dtype / same_device).
  Checker(const char* op, const TensorView& ref, const char* ref_name) : op(op), ref(ref), ref_name(ref_name) {}

  const char* const op;
  const TensorView& ref;
  const char* const ref_name;

  ArgCheck arg(const char* name, const TensorView& v) const { return ArgCheck(*this, name, v); }
  // A 2-D BLAS operand: `layout`, ref_dtype(), dense rows, on the reference device, BLAS-sized.
  ArgCheck matrix(const char* name, const TensorView& v, const char* layout) const {
    ArgCheck a = arg(name, v);
    a.dims(2, layout).ref_dtype().row_contiguous().same_device().blas_sized();
    return a;
  }

  // "op: argument 'arg': expected <expected>, got <got>".
  Status invalid(const char* arg, const std::string& expected, const std::string& got) const {
    return invalid_argument(op, arg, expected, got);
  }
  // A loss or its gradient: a 0-d or [1] tensor of `dt` on the reference device.
  Status scalar(const char* arg, const TensorView& v, DType dt) const;
  // offsets [E+1] i64 contiguous with at least one entry, on the reference device.
  Status offsets(const TensorView& v) const;
  // A byte buffer of at least `bytes` bytes on the reference device ("see *_workspace_bytes").
  Status workspace(const TensorView& ws, int64_t bytes) const;
  // "[lo, hi]" for range messages.
  static std::string range(int64_t lo, int64_t hi) {
    return "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  }
};

// ---- ArgCheck ------------------------------------------------------------------------------------

inline ArgCheck& ArgCheck::dims(int ndim, const char* layout) {
  if (st_.ok()) st_ = expect_dims(c_.op, name_, v_, ndim, layout);
  return *this;
}
inline ArgCheck& ArgCheck::dtype(DType dt) {
  if (st_.ok()) st_ = expect_dtype(c_.op, name_, v_, dt);
  return *this;
}
inline ArgCheck& ArgCheck::float_dtype() {
  if (st_.ok()) st_ = expect_float_dtype(c_.op, name_, v_);
  return *this;
}
inline ArgCheck& ArgCheck::dtype_if(bool ok, const char* expected) {
  if (st_.ok() && !ok) st_ = invalid_argument(c_.op, name_, expected, dtype_name(v_.dtype));
  return *this;
}
inline ArgCheck& ArgCheck::same_dtype() {
  if (st_.ok()) st_ = expect_same_dtype(c_.op, name_, v_, c_.ref_name, c_.ref);
  return *this;
}
inline ArgCheck& ArgCheck::ref_dtype() { return &v_ == &c_.ref ? float_dtype() : same_dtype(); }
inline ArgCheck& ArgCheck::size(int dim, int64_t value, const char* meaning) {
  if (st_.ok()) st_ = expect_size(c_.op, name_, v_, dim, value, meaning);
  return *this;
}
inline ArgCheck& ArgCheck::contiguous() {
  if (st_.ok()) st_ = expect_contiguous(c_.op, name_, v_);
  return *this;
}
inline ArgCheck& ArgCheck::row_contiguous() {
  if (st_.ok()) st_ = expect_row_contiguous(c_.op, name_, v_);
  return *this;
}
inline ArgCheck& ArgCheck::same_device() {
  if (st_.ok()) st_ = expect_device(c_.op, name_, v_, c_.ref.device, c_.ref.device_index);
  return *this;
}
inline ArgCheck& ArgCheck::blas_sized() {
  if (!st_.ok()) return *this;
  for (int d = 0; d < v_.ndim; ++d) {
    if (v_.shape[d] > INT32_MAX || v_.strides[d] > INT32_MAX) {
      st_ = invalid_argument(c_.op, name_, "sizes and strides below 2^31 (BLAS int)", shape_string(v_));
      break;
    }
  }
  return *this;
}
inline ArgCheck& ArgCheck::expect(bool ok, const std::string& expected, const std::string& got) {
  if (st_.ok() && !ok) st_ = invalid_argument(c_.op, name_, expected, got);
  return *this;
}

// ---- Checker -------------------------------------------------------------------------------------

inline Status Checker::scalar(const char* arg, const TensorView& v, DType dt) const {
  if (!v.defined() || !(v.ndim == 0 || (v.ndim == 1 && v.shape[0] == 1))) {
    return invalid(arg, "a 0-d or [1] tensor", v.defined() ? shape_string(v) : "absent");
  }
  if (v.data == nullptr) return invalid(arg, "a non-null data pointer", "null");
  return this->arg(arg, v).dtype(dt).same_device();
}

inline Status Checker::offsets(const TensorView& v) const {
  SMOE_RETURN_IF_ERROR(arg("offsets", v).dims(1, "[E+1]").dtype(DType::kI64).contiguous().same_device());
  if (v.size(0) < 1) return invalid("offsets", "E+1 >= 1 entries", shape_string(v));
  return Status::Ok();
}

inline Status Checker::workspace(const TensorView& ws, int64_t bytes) const {
  SMOE_RETURN_IF_ERROR(expect_defined(op, "workspace", ws));
  SMOE_RETURN_IF_ERROR(arg("workspace", ws).contiguous().same_device());
  const int64_t have = ws.numel() * dtype_size(ws.dtype);
  if (have < bytes || (bytes > 0 && ws.data == nullptr)) {
    return invalid("workspace", "at least " + std::to_string(bytes) + " bytes (see *_workspace_bytes)",
                   std::to_string(have) + " bytes");
  }
  return Status::Ok();
}

// An activation enum value the backends know; `arg` is how the op names it ("act", "params.activation").
inline Status check_activation(const Checker& c, const char* arg, Activation act) {
  switch (act) {
    case Activation::kSwiGLU:
    case Activation::kGeGLU:
    case Activation::kGELU:
    case Activation::kReLU:
      return Status::Ok();
  }
  return c.invalid(arg, "kSwiGLU (0), kGeGLU (1), kGELU (2) or kReLU (3)", std::to_string(static_cast<int32_t>(act)));
}

}  // namespace smoe::detail

// Argument checks shared by every op (declared in smoe/tensor.h).
#include "smoe/tensor.h"

#include <string>

namespace smoe {

std::string shape_string(const TensorView& v) {
  if (!v.defined()) return "absent";
  std::string s = "[";
  for (int i = 0; i < v.ndim; ++i) {
    if (i) s += ", ";
    s += std::to_string(v.shape[i]);
  }
  return s + "]";
}

static std::string describe(const TensorView& v) {
  if (!v.defined()) return "absent";
  return std::to_string(v.ndim) + "-D " + dtype_name(v.dtype) + " " + shape_string(v);
}

Status expect_defined(const char* op, const char* arg, const TensorView& v) {
  if (v.defined()) return Status::Ok();
  return invalid_argument(op, arg, "a tensor", "absent");
}

Status expect_dims(const char* op, const char* arg, const TensorView& v, int ndim, const char* layout) {
  if (v.defined() && v.ndim == ndim) {
    for (int i = 0; i < ndim; ++i) {
      if (v.shape[i] < 0) return invalid_argument(op, arg, "non-negative sizes", shape_string(v));
    }
    if (v.numel() == kSizeOverflow) {
      return invalid_argument(op, arg, "sizes whose product fits in int64", shape_string(v));
    }
    if (v.numel() > 0 && v.data == nullptr) return invalid_argument(op, arg, "a non-null data pointer", "null");
    return Status::Ok();
  }
  return invalid_argument(op, arg, std::to_string(ndim) + "-D tensor " + layout, describe(v));
}

Status expect_dtype(const char* op, const char* arg, const TensorView& v, DType dtype) {
  if (v.dtype == dtype) return Status::Ok();
  return invalid_argument(op, arg, std::string("dtype ") + dtype_name(dtype), dtype_name(v.dtype));
}

Status expect_float_dtype(const char* op, const char* arg, const TensorView& v) {
  if (is_floating(v.dtype)) return Status::Ok();
  return invalid_argument(op, arg, "dtype f32, bf16, f16 or f64", dtype_name(v.dtype));
}

Status expect_same_dtype(const char* op, const char* arg, const TensorView& v, const char* ref_arg,
                         const TensorView& ref) {
  if (v.dtype == ref.dtype) return Status::Ok();
  return invalid_argument(op, arg, std::string("dtype ") + dtype_name(ref.dtype) + " (as " + ref_arg + ")",
                          dtype_name(v.dtype));
}

Status expect_size(const char* op, const char* arg, const TensorView& v, int dim, int64_t value, const char* meaning) {
  if (dim < v.ndim && v.shape[dim] == value) return Status::Ok();
  return invalid_argument(
      op, arg, "size(" + std::to_string(dim) + ") == " + std::to_string(value) + " (" + meaning + ")", shape_string(v));
}

Status expect_contiguous(const char* op, const char* arg, const TensorView& v) {
  if (v.is_contiguous()) return Status::Ok();
  return invalid_argument(op, arg, "a contiguous tensor", "strides that are not row-major dense");
}

Status expect_row_contiguous(const char* op, const char* arg, const TensorView& v) {
  if (v.is_row_contiguous()) return Status::Ok();
  return invalid_argument(
      op, arg, "dense rows (stride(1) == 1, stride(0) >= size(1))",
      "stride(0) = " + std::to_string(v.strides[0]) + ", stride(1) = " + std::to_string(v.strides[1]));
}

Status expect_device(const char* op, const char* arg, const TensorView& v, Device device, int32_t index) {
  if (!v.defined() || (v.device == device && (device == Device::kCPU || v.device_index == index))) {
    return Status::Ok();
  }
  auto name = [](Device d, int32_t i) { return d == Device::kCPU ? std::string("cpu") : "cuda:" + std::to_string(i); };
  return invalid_argument(op, arg, "a tensor on " + name(device, index), "one on " + name(v.device, v.device_index));
}

Status resolve_backend(const char* op, const Exec& exec, const TensorView& ref, Backend* out) {
  Backend b = exec.backend;
  if (b != Backend::kAuto && b != Backend::kCpu && b != Backend::kCuda && b != Backend::kSimt) {
    return invalid_argument(op, "backend", "kAuto (0), kCpu (1), kCuda (2) or kSimt (3)",
                            std::to_string(static_cast<int32_t>(b)));
  }
  if (b == Backend::kAuto) b = ref.device == Device::kCUDA ? Backend::kCuda : Backend::kCpu;
  if (b == Backend::kCuda && ref.device != Device::kCUDA) {
    return invalid_argument(op, "backend", "CUDA tensors for backend 'cuda'", "CPU tensors");
  }
  if ((b == Backend::kCpu || b == Backend::kSimt) && ref.device != Device::kCPU) {
    return invalid_argument(op, "backend", "CPU tensors for backends 'cpu' and 'simt'", "CUDA tensors");
  }
  *out = b;
  return Status::Ok();
}

}  // namespace smoe

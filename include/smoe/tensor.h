// smoe/tensor.h: non-owning tensor views, the execution context, and argument checks.
//
// A TensorView is a pointer plus shape, strides (in elements), dtype and device. It owns nothing;
// the caller allocates (ARCHITECTURE.md section 5). A default-constructed view is "absent"
// (ndim == -1): optional arguments are passed that way.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "smoe/dtype.h"
#include "smoe/status.h"

namespace smoe {

// Size arithmetic that cannot overflow: a product or sum of non-negative sizes past INT64_MAX
// saturates at INT64_MAX, which every size check then rejects as too large (no wrap-around to a
// small or negative size that would pass a check and size a buffer too small).
inline constexpr int64_t kSizeOverflow = INT64_MAX;
inline int64_t sat_mul(int64_t a, int64_t b) {
  int64_t r;
  if (a < 0 || b < 0) return a < 0 ? a : b;  // negative sizes are reported by the callers' checks
  return __builtin_mul_overflow(a, b, &r) ? kSizeOverflow : r;
}
inline int64_t sat_add(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_add_overflow(a, b, &r) ? kSizeOverflow : r;
}

enum class Device : int32_t { kCPU = 0, kCUDA = 1 };

inline constexpr int kMaxDims = 4;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Device device = Device::kCPU;
  int32_t device_index = 0;
  int32_t ndim = -1;  // -1: absent (an optional argument that was not given)
  int64_t shape[kMaxDims] = {0, 0, 0, 0};
  int64_t strides[kMaxDims] = {0, 0, 0, 0};  // in elements

  bool defined() const { return ndim >= 0; }
  int64_t size(int d) const { return shape[d]; }
  int64_t stride(int d) const { return strides[d]; }
  // The product of the sizes, saturated at INT64_MAX when it overflows (expect_dims rejects that).
  int64_t numel() const {
    if (ndim < 0) return 0;
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n = sat_mul(n, shape[i]);
    return n;
  }
  // One rule for empty tensors: any zero size makes a tensor empty, and an empty tensor is dense
  // whatever its strides (autograd hands out empty gradients with strides (0, 0)).
  bool is_empty() const {
    for (int i = 0; i < ndim; ++i)
      if (shape[i] == 0) return true;
    return false;
  }
  bool is_contiguous() const {
    if (is_empty()) return true;
    int64_t expect = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }
  // Rows may be padded (stride(0) >= size(1)) but each row is dense: the "row-strided" 2-D case.
  bool is_row_contiguous() const {
    if (ndim != 2) return is_contiguous();
    if (is_empty()) return true;
    return (shape[1] <= 1 || strides[1] == 1) && (shape[0] <= 1 || strides[0] >= shape[1]);
  }
  template <class T>
  T* data_as() const {
    return static_cast<T*>(data);
  }
};

// A contiguous view over memory the caller owns.
inline TensorView make_view(void* data, DType dtype, std::initializer_list<int64_t> shape,
                            Device device = Device::kCPU) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.ndim = static_cast<int32_t>(shape.size());
  int i = 0;
  for (int64_t s : shape) v.shape[i++] = s;
  int64_t st = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.strides[d] = st;
    st *= v.shape[d];
  }
  return v;
}

template <class T>
inline TensorView make_view(T* data, std::initializer_list<int64_t> shape, Device device = Device::kCPU) {
  return make_view(static_cast<void*>(data), DTypeOf<std::remove_const_t<T>>::value, shape, device);
}

// Where an op runs. kAuto picks kCuda for CUDA tensors and kCpu for CPU tensors; kSimt runs the CUDA
// kernels through the SIMT emulator on CPU tensors.
enum class Backend : int32_t { kAuto = 0, kCpu = 1, kCuda = 2, kSimt = 3 };

struct Exec {
  Backend backend = Backend::kAuto;
  void* stream = nullptr;  // cudaStream_t for kCuda; ignored elsewhere
  // CPU backend: at most this many threads of the pool run the op (0 = every thread of the pool,
  // whose size is SMOE_NUM_THREADS or the hardware threads; a value above the pool's size gives the
  // pool's size). Results do not depend on it. Ignored by the device backends; < 0 is rejected.
  int num_threads = 0;
};

// ---- argument checks shared by every op's validation --------------------------------------------

std::string shape_string(const TensorView& v);  // "[2, 3]" or "absent"

// Each returns Ok or an invalid_argument naming op, arg, the expectation and what was found.
Status expect_defined(const char* op, const char* arg, const TensorView& v);
Status expect_dims(const char* op, const char* arg, const TensorView& v, int ndim, const char* layout);
Status expect_dtype(const char* op, const char* arg, const TensorView& v, DType dtype);
Status expect_float_dtype(const char* op, const char* arg, const TensorView& v);  // f32, bf16, f16, f64
Status expect_same_dtype(const char* op, const char* arg, const TensorView& v, const char* ref_arg,
                         const TensorView& ref);
// v.size(dim) == value; `meaning` names the quantity, e.g. "H (= x.size(1))".
Status expect_size(const char* op, const char* arg, const TensorView& v, int dim, int64_t value, const char* meaning);
Status expect_contiguous(const char* op, const char* arg, const TensorView& v);
Status expect_row_contiguous(const char* op, const char* arg, const TensorView& v);
Status expect_device(const char* op, const char* arg, const TensorView& v, Device device, int32_t index);
// Resolves kAuto from the device of `ref` and checks that the backend can run on it.
Status resolve_backend(const char* op, const Exec& exec, const TensorView& ref, Backend* out);

}  // namespace smoe

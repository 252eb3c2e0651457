// smoe/dtype.h: element types and the 16-bit float storage types of the C++ core.
//
// bf16 and f16 are stored as such (2 bytes) and converted to f32 for arithmetic. The one
// accumulation rule of smoe, for every op and backend: f64 stays f64 (f64 inputs exist for gradient
// checks on the CPU), every other float type accumulates in f32 (acc_dtype / AccOf below). The same
// rule gives the dtype of the f32 side tensors (scores, combine weights, gates) of an op.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "smoe/status.h"

namespace smoe {

enum class DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3, kI32 = 4, kI64 = 5, kU8 = 6 };

constexpr int64_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32:
      return 4;
    case DType::kF16:
      return 2;
    case DType::kBF16:
      return 2;
    case DType::kF64:
      return 8;
    case DType::kI32:
      return 4;
    case DType::kI64:
      return 8;
    case DType::kU8:
      return 1;
  }
  return 0;
}

constexpr const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32:
      return "f32";
    case DType::kF16:
      return "f16";
    case DType::kBF16:
      return "bf16";
    case DType::kF64:
      return "f64";
    case DType::kI32:
      return "i32";
    case DType::kI64:
      return "i64";
    case DType::kU8:
      return "u8";
  }
  return "?";
}

constexpr bool is_floating(DType t) {
  return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16 || t == DType::kF64;
}

// Storage types: plain 16-bit payloads; arithmetic happens in f32.
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

inline float bf16_to_float(bf16_t v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN stays NaN (quiet).
inline bf16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x0040u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}

inline float f16_to_float(f16_t v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, overflow to inf, NaN stays NaN.
inline f16_t float_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_t{uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (a >= 0x38800000u) {                                        // normal half
    uint32_t r = a - 0x38000000u;                                // rebias 127 -> 15
    r += 0xfffu + ((r >> 13) & 1u);
    return f16_t{uint16_t(sign | (r >> 13))};
  }
  if (a < 0x33000000u) return f16_t{sign};  // below half of the smallest subnormal
  // subnormal half: shift the implicit-one mantissa, round to nearest even
  const uint32_t e = a >> 23;
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14..24
  uint32_t r = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (r & 1u))) ++r;
  return f16_t{uint16_t(sign | r)};
}

// The accumulation rule on dtypes: f64 -> f64, f32 / bf16 / f16 -> f32.
constexpr DType acc_dtype(DType t) { return t == DType::kF64 ? DType::kF64 : DType::kF32; }

template <class T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kF32;
};
template <>
struct DTypeOf<double> {
  static constexpr DType value = DType::kF64;
};
template <>
struct DTypeOf<bf16_t> {
  static constexpr DType value = DType::kBF16;
};
template <>
struct DTypeOf<f16_t> {
  static constexpr DType value = DType::kF16;
};
template <>
struct DTypeOf<int32_t> {
  static constexpr DType value = DType::kI32;
};
template <>
struct DTypeOf<int64_t> {
  static constexpr DType value = DType::kI64;
};
template <>
struct DTypeOf<uint8_t> {
  static constexpr DType value = DType::kU8;
};

// The accumulation rule on types (acc_dtype above): f32 for f32/bf16/f16, f64 for f64.
template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <class T>
using acc_t = typename AccOf<T>::type;

template <class T>
inline typename AccOf<T>::type to_acc(T v) {
  return v;
}
template <>
inline float to_acc<bf16_t>(bf16_t v) {
  return bf16_to_float(v);
}
template <>
inline float to_acc<f16_t>(f16_t v) {
  return f16_to_float(v);
}

template <class T>
inline T from_acc(typename AccOf<T>::type v) {
  return T(v);
}
template <>
inline bf16_t from_acc<bf16_t>(float v) {
  return float_to_bf16(v);
}
template <>
inline f16_t from_acc<f16_t>(float v) {
  return float_to_f16(v);
}

// ---- the one float-dtype dispatch of both backends -----------------------------------------------
//
//   return dtypes::dispatch_float(x.dtype, "op", [&](auto tag) -> Status {
//     using S = typename decltype(tag)::type;  // the storage type of x's dtype
//     ...
//   });
//
// calls f(Tag<S>{}) with the storage type S that `Types` maps the dtype to and returns its Status.
// HostFloatTypes (the default) maps f32, f64, bf16, f16 to float, double, bf16_t, f16_t (the CPU
// backend). A backend with other storage types passes its own map, e.g. the CUDA backend's
// {float, __nv_bfloat16, __half} with f64 = NoKernel; a dtype mapped to NoKernel returns
// Types::no_kernel(op, dtype), and a non-float dtype (which validation has rejected) kInternal.
// TEACH: the switch turns a runtime dtype into a compile-time type once per call, at the outer
// level, so every inner loop is compiled (and vectorised) for one concrete type.
template <class T>
struct Tag {
  using type = T;
};
struct NoKernel {};  // a dtype a backend has no kernel for

struct HostFloatTypes {
  using f32 = float;
  using f64 = double;
  using bf16 = bf16_t;
  using f16 = f16_t;
};

// In a namespace of its own: argument-dependent lookup on DType (namespace smoe) never finds these,
// so a backend may keep a same-named wrapper with its own type map (csrc/cuda/common.cuh).
namespace dtypes {

namespace detail {
template <class Types, class S, class F>
Status dispatch_one(DType dtype, const char* op, F& f) {
  if constexpr (std::is_same_v<S, NoKernel>) {
    return Types::no_kernel(op, dtype);
  } else {
    return f(Tag<S>{});
  }
}
}  // namespace detail

template <class Types = HostFloatTypes, class F>
Status dispatch_float(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::kF32:
      return detail::dispatch_one<Types, typename Types::f32>(dtype, op, f);
    case DType::kF64:
      return detail::dispatch_one<Types, typename Types::f64>(dtype, op, f);
    case DType::kBF16:
      return detail::dispatch_one<Types, typename Types::bf16>(dtype, op, f);
    case DType::kF16:
      return detail::dispatch_one<Types, typename Types::f16>(dtype, op, f);
    default:
      break;
  }
  return Status(Code::kInternal,
                std::string(op) + ": dtype " + dtype_name(dtype) + " passed validation but has no kernel");
}

// The dispatch on an accumulation dtype (scores, weights and gradients of the router: f32, or f64
// for gradient checks): f(Tag<double>{}) for f64, f(Tag<float>{}) otherwise.
template <class F>
auto dispatch_acc(DType dtype, F&& f) {
  return dtype == DType::kF64 ? f(Tag<double>{}) : f(Tag<float>{});
}

}  // namespace dtypes

}  // namespace smoe

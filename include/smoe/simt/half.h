// smoe SIMT emulator: __half, __nv_bfloat16 and their pairs, with the conversions and arithmetic
// of cuda_fp16.h / cuda_bf16.h that smoe kernels use.
//
// Arithmetic is done in float and rounded once to the 16-bit type. For +, -, *, / and sqrt this is
// the correctly rounded result, because float carries at least 2p+2 bits for both formats
// (p = 11 for half, 8 for bfloat16), which makes double rounding innocuous
// (Figueroa, "When is double rounding innocuous?", SIGNUM 1995).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "smoe/simt/vector_types.h"

namespace smoe::simt::detail {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE binary32 -> binary16, round to nearest even, with overflow to inf and subnormals.
inline uint16_t float_to_half_rn(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520
  if (abs < 0x38800000u) {                                               // half subnormal or zero
    // value = abs_float; half subnormal unit is 2^-24. Scale exactly by adding a magic number.
    const float scaled = bits_float(abs) + bits_float(0x3f000000u);  // 0.5 pushes bits down
    return static_cast<uint16_t>(sign | (float_bits(scaled) - 0x3f000000u));
  }
  const uint32_t mant_odd = (abs >> 13) & 1u;
  uint32_t v = abs + 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  return static_cast<uint16_t>(sign | (v >> 13));
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;  // 2^-24
    return bits_float(float_bits(mag) | sign);
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112) << 23) | (mant << 13));
}

inline uint16_t float_to_bf16_rn(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace smoe::simt::detail

struct __half_raw {
  unsigned short x;
};
struct __nv_bfloat16_raw {
  unsigned short x;
};

struct __attribute__((aligned(2))) __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(__half_raw r) : __x(r.x) {}
  __half(float f) : __x(smoe::simt::detail::float_to_half_rn(f)) {}
  __half(double f) : __half(static_cast<float>(f)) {}
  __half(int i) : __half(static_cast<float>(i)) {}
  __half(unsigned int i) : __half(static_cast<float>(i)) {}
  operator float() const { return smoe::simt::detail::half_to_float(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
};

struct __attribute__((aligned(2))) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(smoe::simt::detail::float_to_bf16_rn(f)) {}
  __nv_bfloat16(double f) : __nv_bfloat16(static_cast<float>(f)) {}
  __nv_bfloat16(int i) : __nv_bfloat16(static_cast<float>(i)) {}
  __nv_bfloat16(unsigned int i) : __nv_bfloat16(static_cast<float>(i)) {}
  operator float() const { return smoe::simt::detail::bf16_to_float(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};

struct __attribute__((aligned(4))) __half2 {
  __half x, y;
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

using half = __half;
using half2 = __half2;
using nv_bfloat16 = __nv_bfloat16;
using nv_bfloat162 = __nv_bfloat162;

// Conversions ----------------------------------------------------------------------------------
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16(__nv_bfloat16_raw{u}); }
inline __half2 __halves2half2(__half lo, __half hi) { return __half2{lo, hi}; }
inline __half2 __half2half2(__half h) { return __half2{h, h}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__half(lo), __half(hi)}; }
inline __half2 __float2half2_rn(float f) { return __half2{__half(f), __half(f)}; }
inline __half2 __float22half2_rn(float2 f) { return __half2{__half(f.x), __half(f.y)}; }
inline float2 __half22float2(__half2 h) { return float2{float(h.x), float(h.y)}; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) { return __nv_bfloat162{lo, hi}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 b) { return __nv_bfloat162{b, b}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__nv_bfloat16(lo), __nv_bfloat16(hi)};
}
inline __nv_bfloat162 __float2bfloat162_rn(float f) { return __nv_bfloat162{__nv_bfloat16(f), __nv_bfloat16(f)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __nv_bfloat162{__nv_bfloat16(f.x), __nv_bfloat16(f.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return float2{float(b.x), float(b.y)}; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 b) { return b.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 b) { return b.y; }

// Arithmetic (scalar) --------------------------------------------------------------------------
#define SMOE_SIMT_HALF_OPS(H, P)                                                       \
  inline H operator+(const H& a, const H& b) { return H(float(a) + float(b)); }        \
  inline H operator-(const H& a, const H& b) { return H(float(a) - float(b)); }        \
  inline H operator*(const H& a, const H& b) { return H(float(a) * float(b)); }        \
  inline H operator/(const H& a, const H& b) { return H(float(a) / float(b)); }        \
  inline H& operator+=(H& a, const H& b) { return a = a + b; }                         \
  inline H& operator-=(H& a, const H& b) { return a = a - b; }                         \
  inline H& operator*=(H& a, const H& b) { return a = a * b; }                         \
  inline H& operator/=(H& a, const H& b) { return a = a / b; }                         \
  inline H operator-(const H& a) { return H(-float(a)); }                              \
  inline bool operator==(const H& a, const H& b) { return float(a) == float(b); }      \
  inline bool operator!=(const H& a, const H& b) { return float(a) != float(b); }      \
  inline bool operator<(const H& a, const H& b) { return float(a) < float(b); }        \
  inline bool operator<=(const H& a, const H& b) { return float(a) <= float(b); }      \
  inline bool operator>(const H& a, const H& b) { return float(a) > float(b); }        \
  inline bool operator>=(const H& a, const H& b) { return float(a) >= float(b); }      \
  inline H P##add(H a, H b) { return a + b; }                                          \
  inline H P##sub(H a, H b) { return a - b; }                                          \
  inline H P##mul(H a, H b) { return a * b; }                                          \
  inline H P##div(H a, H b) { return a / b; }                                          \
  inline H P##neg(H a) { return -a; }                                                  \
  inline H P##abs(H a) { return H(std::fabs(float(a))); }                              \
  inline H P##fma(H a, H b, H c) { return H(std::fma(float(a), float(b), float(c))); } \
  inline H P##max(H a, H b) { return H(std::fmax(float(a), float(b))); }               \
  inline H P##min(H a, H b) { return H(std::fmin(float(a), float(b))); }               \
  inline bool P##eq(H a, H b) { return a == b; }                                       \
  inline bool P##ne(H a, H b) { return a != b; }                                       \
  inline bool P##lt(H a, H b) { return a < b; }                                        \
  inline bool P##le(H a, H b) { return a <= b; }                                       \
  inline bool P##gt(H a, H b) { return a > b; }                                        \
  inline bool P##ge(H a, H b) { return a >= b; }                                       \
  inline bool P##isnan(H a) { return std::isnan(float(a)); }

SMOE_SIMT_HALF_OPS(__half, __h)
// bfloat16 intrinsics carry the same names as half ones in cuda_bf16.h (__hadd(bf16, bf16), ...).
SMOE_SIMT_HALF_OPS(__nv_bfloat16, __h)
#undef SMOE_SIMT_HALF_OPS

// Arithmetic (pairs) ---------------------------------------------------------------------------
#define SMOE_SIMT_HALF2_OPS(H2)                                                                    \
  inline H2 operator+(const H2& a, const H2& b) { return H2{a.x + b.x, a.y + b.y}; }               \
  inline H2 operator-(const H2& a, const H2& b) { return H2{a.x - b.x, a.y - b.y}; }               \
  inline H2 operator*(const H2& a, const H2& b) { return H2{a.x * b.x, a.y * b.y}; }               \
  inline H2 operator/(const H2& a, const H2& b) { return H2{a.x / b.x, a.y / b.y}; }               \
  inline H2& operator+=(H2& a, const H2& b) { return a = a + b; }                                  \
  inline H2& operator*=(H2& a, const H2& b) { return a = a * b; }                                  \
  inline H2 __hadd2(H2 a, H2 b) { return a + b; }                                                  \
  inline H2 __hsub2(H2 a, H2 b) { return a - b; }                                                  \
  inline H2 __hmul2(H2 a, H2 b) { return a * b; }                                                  \
  inline H2 __h2div(H2 a, H2 b) { return a / b; }                                                  \
  inline H2 __hfma2(H2 a, H2 b, H2 c) { return H2{__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; } \
  inline H2 __hmax2(H2 a, H2 b) { return H2{__hmax(a.x, b.x), __hmax(a.y, b.y)}; }                 \
  inline H2 __hmin2(H2 a, H2 b) { return H2{__hmin(a.x, b.x), __hmin(a.y, b.y)}; }                 \
  inline H2 __hneg2(H2 a) { return H2{-a.x, -a.y}; }                                               \
  inline H2 __lowhigh2highlow(H2 a) { return H2{a.y, a.x}; }

SMOE_SIMT_HALF2_OPS(__half2)
SMOE_SIMT_HALF2_OPS(__nv_bfloat162)
#undef SMOE_SIMT_HALF2_OPS

// CPU expert activations: SwiGLU, GeGLU (exact erf gelu), GELU (exact), ReLU, forward and backward.
//
// Row-parallel; each row is computed in the accumulation type and rounded once on store.
// Versions:
//   generic rows   libm exp/erf per element: f64, and GeGLU/GELU in every dtype;
//   SwiGLU rows    f32 (bf16/f16 rows widened to f32 first) with a polynomial exp, 16 lanes of AVX-512
//                  at a time where the CPU has it (the same operations in scalar form elsewhere and for
//                  the tail): libm's expf is a call per element and cost ~10% of a fine-grained layer.
#include <immintrin.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/activation.h"
#include "cpu/parallel.h"

namespace smoe::cpu {
namespace {

template <class Acc>
constexpr Acc kInvSqrt2 = Acc(0.70710678118654752440);
template <class Acc>
constexpr Acc kInvSqrt2Pi = Acc(0.39894228040143267794);

template <class Acc>
inline Acc sigmoid(Acc x) {
  return Acc(1) / (Acc(1) + std::exp(-x));
}
template <class Acc>
inline Acc gelu(Acc x) {
  return Acc(0.5) * x * (Acc(1) + std::erf(x * kInvSqrt2<Acc>));
}
// d/dx [x * Phi(x)] = Phi(x) + x * phi(x)
template <class Acc>
inline Acc gelu_grad(Acc x) {
  const Acc cdf = Acc(0.5) * (Acc(1) + std::erf(x * kInvSqrt2<Acc>));
  return cdf + x * kInvSqrt2Pi<Acc> * std::exp(Acc(-0.5) * x * x);
}

// exp(x) in f32 to about 2 ulp: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r
// (Cephes expf), and 2^n put into the exponent bits. Inputs are clamped to the normal range (a NaN
// passes the clamp and the callers' products keep it). exp_poly16 is the same sequence of IEEE
// operations on 16 lanes (no FMA: -ffp-contract=off), so vector and scalar elements agree bit for bit.
constexpr float kExpLo = -87.3f, kExpHi = 88.7f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

inline float exp_poly(float x) {
  x = x < kExpLo ? kExpLo : x;
  x = x > kExpHi ? kExpHi : x;
  const float n = std::floor(x * kLog2e + 0.5f);
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = kP0;
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r + kP5;
  const float y = p * r * r + r + 1.0f;
  return y * std::bit_cast<float>(uint32_t(int32_t(n) + 127) << 23);
}

#define SMOE_AVX512 [[gnu::target("avx512f")]]
// GCC 12's AVX-512 intrinsic headers trip -Wmaybe-uninitialized on their own undefined vectors.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

SMOE_AVX512 inline __m512 exp_poly16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(kExpLo), x);  // maxps(a, b) = a > b ? a : b: a NaN x passes, as in exp_poly
  x = _mm512_min_ps(_mm512_set1_ps(kExpHi), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF);
  __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(kLn2Hi)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(kLn2Lo)));
  __m512 p = _mm512_set1_ps(kP0);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kP1));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kP2));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kP3));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kP4));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kP5));
  const __m512 y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

#pragma GCC diagnostic pop

bool has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// out[j] = silu(g[j]) * u[j], silu(x) = x / (1 + e^-x); 16 lanes at a time, returns the columns done.
SMOE_AVX512 int64_t swiglu_row_avx512(const float* g, const float* u, float* out, int64_t F) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= F; j += 16) {
    const __m512 x = _mm512_loadu_ps(g + j);
    const __m512 s = _mm512_div_ps(x, _mm512_add_ps(one, exp_poly16(_mm512_sub_ps(zero, x))));
    _mm512_storeu_ps(out + j, _mm512_mul_ps(s, _mm512_loadu_ps(u + j)));
  }
  return j;
}
void swiglu_row(const float* g, const float* u, float* out, int64_t F) {
  int64_t j = has_avx512() ? swiglu_row_avx512(g, u, out, F) : 0;
  for (; j < F; ++j) {
    const float x = g[j];
    out[j] = x / (1.0f + exp_poly(0.0f - x)) * u[j];
  }
}

// s = 1 / (1 + e^-x); silu'(x) = s (1 + x (1 - s)):  gg = d u silu'(g),  gu = d (x s)
SMOE_AVX512 int64_t swiglu_grad_row_avx512(const float* g, const float* u, const float* d, float* gg, float* gu,
                                           int64_t F) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= F; j += 16) {
    const __m512 x = _mm512_loadu_ps(g + j), dj = _mm512_loadu_ps(d + j);
    const __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, exp_poly16(_mm512_sub_ps(zero, x))));
    const __m512 dsilu = _mm512_mul_ps(s, _mm512_add_ps(one, _mm512_mul_ps(x, _mm512_sub_ps(one, s))));
    _mm512_storeu_ps(gg + j, _mm512_mul_ps(_mm512_mul_ps(dj, _mm512_loadu_ps(u + j)), dsilu));
    _mm512_storeu_ps(gu + j, _mm512_mul_ps(dj, _mm512_mul_ps(x, s)));
  }
  return j;
}
void swiglu_grad_row(const float* g, const float* u, const float* d, float* gg, float* gu, int64_t F) {
  int64_t j = has_avx512() ? swiglu_grad_row_avx512(g, u, d, gg, gu, F) : 0;
  for (; j < F; ++j) {
    const float x = g[j];
    const float s = 1.0f / (1.0f + exp_poly(0.0f - x));
    gg[j] = d[j] * u[j] * (s * (1.0f + x * (1.0f - s)));
    gu[j] = d[j] * (x * s);
  }
}

// Per-thread f32 copies of a row for the 16-bit dtypes.
struct RowScratch {
  std::vector<float> in, go, out;
};
RowScratch& row_scratch() {
  thread_local RowScratch s;
  return s;
}
template <class T>
const float* widen_row(const T* src, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    if (int64_t(buf.size()) < n) buf.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) buf[i] = to_acc(src[i]);
    return buf.data();
  }
}
template <class T>
float* out_row(T* dst, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    if (int64_t(buf.size()) < n) buf.resize(size_t(n));
    return buf.data();
  }
}
template <class T>
void narrow_row(const float* src, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = from_acc<T>(src[i]);
  }
}

// Rows of one parallel chunk: about 64K elements, so small inputs stay on one thread.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(cols, 1)); }

template <class T>
void forward_typed(Activation act, const TensorView& in, const TensorView& out) {
  using Acc = typename AccOf<T>::type;
  const int64_t R = out.size(0), F = out.size(1);
  const int64_t ldi = in.stride(0), ldo = out.stride(0);
  const T* pin = in.data_as<const T>();
  T* pout = out.data_as<T>();
  parallel_for(R, row_grain(F), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = pin + r * ldi;
      const T* u = g + F;  // gated layouts: [g | u]
      T* o = pout + r * ldo;
      if constexpr (!std::is_same_v<T, double>) {
        if (act == Activation::kSwiGLU) {
          RowScratch& s = row_scratch();
          const float* in_f = widen_row(g, 2 * F, s.in);
          float* out_f = out_row(o, F, s.out);
          swiglu_row(in_f, in_f + F, out_f, F);
          narrow_row(out_f, o, F);
          continue;
        }
      }
      switch (act) {
        case Activation::kSwiGLU:
          for (int64_t j = 0; j < F; ++j) {
            const Acc x = to_acc(g[j]);
            o[j] = from_acc<T>(x * sigmoid(x) * to_acc(u[j]));
          }
          break;
        case Activation::kGeGLU:
          for (int64_t j = 0; j < F; ++j) o[j] = from_acc<T>(gelu(to_acc(g[j])) * to_acc(u[j]));
          break;
        case Activation::kGELU:
          for (int64_t j = 0; j < F; ++j) o[j] = from_acc<T>(gelu(to_acc(g[j])));
          break;
        case Activation::kReLU:
          for (int64_t j = 0; j < F; ++j) {
            const Acc x = to_acc(g[j]);
            o[j] = from_acc<T>(x > Acc(0) ? x : Acc(0));
          }
          break;
      }
    }
  });
}

template <class T>
void backward_typed(Activation act, const TensorView& in, const TensorView& grad_out, const TensorView& grad_in) {
  using Acc = typename AccOf<T>::type;
  const int64_t R = grad_out.size(0), F = grad_out.size(1);
  const int64_t ldi = in.stride(0), ldgo = grad_out.stride(0), ldgi = grad_in.stride(0);
  const T* pin = in.data_as<const T>();
  const T* pgo = grad_out.data_as<const T>();
  T* pgi = grad_in.data_as<T>();
  parallel_for(R, row_grain(F), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = pin + r * ldi;
      const T* u = g + F;
      const T* go = pgo + r * ldgo;
      T* gg = pgi + r * ldgi;
      T* gu = gg + F;
      if constexpr (!std::is_same_v<T, double>) {
        if (act == Activation::kSwiGLU) {
          RowScratch& s = row_scratch();
          const float* in_f = widen_row(g, 2 * F, s.in);
          const float* go_f = widen_row(go, F, s.go);
          float* gi_f = out_row(gg, 2 * F, s.out);
          swiglu_grad_row(in_f, in_f + F, go_f, gi_f, gi_f + F, F);
          narrow_row(gi_f, gg, 2 * F);
          continue;
        }
      }
      switch (act) {
        case Activation::kSwiGLU:
          // silu(x) = x s(x);  silu'(x) = s(x) (1 + x (1 - s(x)))
          for (int64_t j = 0; j < F; ++j) {
            const Acc x = to_acc(g[j]), uj = to_acc(u[j]), d = to_acc(go[j]);
            const Acc s = sigmoid(x);
            gg[j] = from_acc<T>(d * uj * (s * (Acc(1) + x * (Acc(1) - s))));
            gu[j] = from_acc<T>(d * (x * s));
          }
          break;
        case Activation::kGeGLU:
          for (int64_t j = 0; j < F; ++j) {
            const Acc x = to_acc(g[j]), uj = to_acc(u[j]), d = to_acc(go[j]);
            gg[j] = from_acc<T>(d * uj * gelu_grad(x));
            gu[j] = from_acc<T>(d * gelu(x));
          }
          break;
        case Activation::kGELU:
          for (int64_t j = 0; j < F; ++j) gg[j] = from_acc<T>(to_acc(go[j]) * gelu_grad(to_acc(g[j])));
          break;
        case Activation::kReLU:
          // The subgradient at 0 is 0, as in torch.
          for (int64_t j = 0; j < F; ++j) gg[j] = from_acc<T>(to_acc(g[j]) > Acc(0) ? to_acc(go[j]) : Acc(0));
          break;
      }
    }
  });
}

}  // namespace

Status activation_forward(Activation act, const TensorView& in, const TensorView& out) {
  return dtypes::dispatch_float(in.dtype, "activation_forward", [&](auto tag) {
    forward_typed<typename decltype(tag)::type>(act, in, out);
    return Status::Ok();
  });
}

Status activation_backward(Activation act, const TensorView& in, const TensorView& grad_out,
                           const TensorView& grad_in) {
  return dtypes::dispatch_float(in.dtype, "activation_backward", [&](auto tag) {
    backward_typed<typename decltype(tag)::type>(act, in, grad_out, grad_in);
    return Status::Ok();
  });
}

}  // namespace smoe::cpu

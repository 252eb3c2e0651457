// tests/cpp/core/testing.h: helpers shared by the core tests.
//
// Tolerances: ONE table per dtype, used by every float comparison in the C++ tests. The values are
// a small multiple of the rounding error of one stored value (f32: 2^-24 relative per op over a
// reduction of up to a few thousand terms; bf16: 2^-8; f16: 2^-11) — see docs/testing.md.
// Integers (indices, counts, offsets) are always compared exactly.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <cstdint>
#include <random>
#include <vector>

#include "smoe/smoe.h"

namespace smoe::testing {

struct Tolerance {
  double atol;
  double rtol;
};

inline Tolerance tolerance_for(DType t) {
  switch (t) {
    case DType::kF64:
      return {1e-10, 1e-10};
    case DType::kF32:
      return {1e-5, 1e-5};
    case DType::kF16:
      return {1e-3, 2e-3};
    case DType::kBF16:
      return {1e-2, 1.6e-2};
    default:
      return {0.0, 0.0};
  }
}

// The activations in double, written independently of the CPU code: g is the gate input, u the up
// input of a gated activation (1 for the ungated ones).
inline double reference_act(Activation act, double g, double u) {
  const double gelu = 0.5 * g * (1.0 + std::erf(g / std::sqrt(2.0)));
  switch (act) {
    case Activation::kSwiGLU:
      return g / (1.0 + std::exp(-g)) * u;
    case Activation::kGeGLU:
      return gelu * u;
    case Activation::kGELU:
      return gelu;
    case Activation::kReLU:
      return g > 0 ? g : 0;
  }
  return 0;
}

// Their analytic derivatives d/dg and d/du (du = 0 for the ungated ones).
inline void reference_act_grad(Activation act, double g, double u, double* dg, double* du) {
  const double s = 1.0 / (1.0 + std::exp(-g));
  const double cdf = 0.5 * (1.0 + std::erf(g / std::sqrt(2.0)));
  const double pdf = std::exp(-0.5 * g * g) / std::sqrt(2.0 * M_PI);
  switch (act) {
    case Activation::kSwiGLU:
      *dg = u * (s + g * s * (1 - s));
      *du = g * s;
      break;
    case Activation::kGeGLU:
      *dg = u * (cdf + g * pdf);
      *du = g * cdf;
      break;
    case Activation::kGELU:
      *dg = cdf + g * pdf;
      *du = 0;
      break;
    case Activation::kReLU:
      *dg = g > 0 ? 1 : 0;
      *du = 0;
      break;
  }
}

// Element-wise |a - b| <= atol + rtol * |b|, reporting the first few mismatches.
template <class T>
::testing::AssertionResult all_close(const std::vector<T>& got, const std::vector<T>& want, DType dtype) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << " != " << want.size();
  }
  const Tolerance tol = tolerance_for(dtype);
  int bad = 0;
  ::testing::AssertionResult r = ::testing::AssertionSuccess();
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = double(to_acc(got[i])), w = double(to_acc(want[i]));
    const bool both_nan = std::isnan(g) && std::isnan(w);
    if (!both_nan && !(std::fabs(g - w) <= tol.atol + tol.rtol * std::fabs(w))) {
      if (bad == 0) r = ::testing::AssertionFailure();
      if (bad < 5) r << "[" << i << "] got " << g << " want " << w << "; ";
      ++bad;
    }
  }
  if (bad) r << bad << " of " << got.size() << " elements differ (" << dtype_name(dtype) << " tolerance)";
  return r;
}

// Bitwise equality, for determinism checks.
template <class T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// Small integers stored exactly in every float type: products and sums stay exact in f32.
template <class T>
std::vector<T> small_ints(size_t n, uint32_t seed, int lo = -3, int hi = 3) {
  std::mt19937 g(seed);
  std::uniform_int_distribution<int> d(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = from_acc<T>(static_cast<typename AccOf<T>::type>(d(g)));
  return v;
}

template <class T>
std::vector<T> uniform(size_t n, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = from_acc<T>(static_cast<typename AccOf<T>::type>(d(g)));
  return v;
}

}  // namespace smoe::testing

// The peak microkernels (cpu/peak.h). Each thread of the pool runs `iterations` rounds of kChains
// independent multiply-add chains held in registers: enough chains to cover the FMA latency on every
// pipe (Zen 4/5 and Intel cores: 4-cycle latency, 2 pipes -> 8 chains in flight are needed; 16 leaves
// slack), no loads or stores in the loop. The result is summed into a volatile sink so the compiler
// keeps the work. The loop is the fastest this instruction runs here: a GEMM can only approach it.
#include "cpu/peak.h"

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <vector>

#include "cpu/parallel.h"

namespace smoe::cpu {
namespace {

constexpr int kChains = 16;

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

[[gnu::target("avx512f,fma")]] float fma512(int64_t iters) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(0.001f * float(i));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  __m512 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

[[gnu::target("avx2,fma")]] float fma256(int64_t iters) {
  __m256 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(0.001f * float(i));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  __m256 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm256_add_ps(s, acc[i]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, s);
  float t = 0.f;
  for (float v : lanes) t += v;
  return t;
}

float fma_scalar(int64_t iters) {
  float acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = 0.001f * float(i);
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * 0.999999f + 1e-7f;
  float t = 0.f;
  for (float v : acc) t += v;
  return t;
}

[[gnu::target("avx512f,avx512bw,avx512vl,avx512bf16")]] float dpbf16(int64_t iters) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(0.001f * float(i));
  // 32 bf16 values per operand; small so the sums stay finite.
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(-1e-3f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5f), _mm512_set1_ps(0.5f));
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  }
  __m512 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

#pragma GCC diagnostic pop

volatile float g_sink = 0.f;

}  // namespace

bool peak_has_bf16_dp() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return has;
}

PeakResult measure_peak(const std::string& kind, int64_t iterations) {
  PeakResult r;
  r.threads = num_threads();
  float (*loop)(int64_t) = nullptr;
  double flops_per_iter = 0.0;  // per thread, one round of kChains instructions
  if (kind == "fp32") {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) {
      loop = fma512, flops_per_iter = kChains * 16 * 2, r.isa = "avx512 vfmadd231ps";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      loop = fma256, flops_per_iter = kChains * 8 * 2, r.isa = "avx2 vfmadd231ps";
    } else {
      loop = fma_scalar, flops_per_iter = kChains * 2, r.isa = "scalar";
    }
  } else if (kind == "bf16") {
    if (!peak_has_bf16_dp()) {
      r.isa = "unsupported";
      return r;
    }
    loop = dpbf16, flops_per_iter = kChains * 16 * 4, r.isa = "avx512 vdpbf16ps";
  } else {
    r.isa = "unsupported";
    return r;
  }
  std::vector<float> sink(r.threads, 0.f);
  const auto t0 = std::chrono::steady_clock::now();
  parallel_for(r.threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) sink[i] = loop(iterations);
  });
  const auto t1 = std::chrono::steady_clock::now();
  float s = 0.f;
  for (float v : sink) s += v;
  g_sink = s;
  r.seconds = std::chrono::duration<double>(t1 - t0).count();
  r.gflops = r.seconds > 0 ? flops_per_iter * double(iterations) * r.threads / r.seconds / 1e9 : 0.0;
  return r;
}

}  // namespace smoe::cpu

// The peak microkernels (cpu/peak.h). Each thread of the pool runs `iterations` rounds of kChains
// independent multiply-add chains held in registers: enough chains to cover the FMA latency on every
// pipe (Zen 4/5 and Intel cores: 4-cycle latency, 2 pipes -> 8 chains in flight are needed; 16 leaves
// slack), no loads or stores in the loop. The result is summed into a volatile sink so the compiler
// keeps the work. The loop is the fastest this instruction runs here: a GEMM can only approach it.
#include "cpu/peak.h"

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <chrono>
#include <vector>

#include "cpu/parallel.h"

namespace smoe::cpu {
namespace {

constexpr int kChains = 16;

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

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

// AMX (Intel Sapphire Rapids and later): tdpbf16ps multiplies a 16 x 32 bf16 tile by a 32 x 16 one
// into a 16 x 16 fp32 tile, 16 * 16 * 32 * 2 = 16384 flops per instruction. torch's oneDNN bf16 GEMM
// uses it where present, so on such a CPU it, not vdpbf16ps, is the bf16 peak. Four accumulator
// tiles (tmm0-3) from two A tiles (tmm4-5) and two B tiles (tmm6-7), as a GEMM's inner loop would.
struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

[[gnu::target("amx-tile,amx-bf16")]] float amx_bf16(int64_t iters) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  alignas(64) static thread_local uint16_t ab[16 * 32];
  alignas(64) static thread_local float c[16 * 16];
  for (auto& v : ab) v = 0x3a83;  // bf16 ~1e-3
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, ab, 64);
  _tile_loadd(5, ab, 64);
  _tile_loadd(6, ab, 64);
  _tile_loadd(7, ab, 64);
  for (int64_t it = 0; it < iters; ++it) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  _tile_release();
  return c[0];
}

#pragma GCC diagnostic pop

// Linux gives a process the AMX tile state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM, 5.16+).
bool amx_usable() {
  static const bool ok = [] {
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

volatile float g_sink = 0.f;

}  // namespace

bool peak_has_amx_bf16() { return amx_usable(); }

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
  } else if (kind == "amx_bf16") {
    if (!amx_usable()) {
      r.isa = "unsupported";
      return r;
    }
    loop = amx_bf16, flops_per_iter = 4 * 16384.0, r.isa = "amx tdpbf16ps";
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

// The bf16 GEMM kernel of the CPU backend (AVX512-BF16 vdpbf16ps): v3 of the ladder listed in
// csrc/cpu/grouped_gemm.cpp, measured about 3x the f32-panel path on the dev machine.
#include "cpu/gemm_bf16.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>
#include <atomic>

#include "cpu/gemm.h"

namespace smoe::cpu {
namespace {

// ---- bf16 x bf16 -> f32 with AVX512-BF16 dot products ------------------------------------------
//
// vdpbf16ps multiplies pairs of bf16 (exactly, in f32) and adds both products to an f32 lane, so a bf16
// GEMM runs at twice the f32 FMA rate with the same f32 accumulation, and no f32 copy of the operands
// is made. Operands are packed into pair-words: word(x, q) = X(x, 2q) | X(x, 2q + 1) << 16 (the
// second half zero past an odd K); a micro-kernel keeps a kDpMr x kDpNr f32 tile in 24 registers,
// broadcasting one A word per row and loading 32 B words (two vectors) per pair step.

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int kDpMr = 12;        // rows of a register tile (one broadcast each)
constexpr int kDpNr = 32;        // columns of a register tile (two 16-lane vectors)
constexpr int64_t kDpKc = 1024;  // reduction block: an A panel of 12 rows (24 KB) stays in L1
constexpr int64_t kDpNc = 256;   // column chunk: its packed B (512 KB) stays in L2

// Packs X(x0 .. x0+nx, k0 .. k0+kc) into groups of G x-values: out[group][q][G] pair-words, zero-padded
// past nx and past kc.
template <int G>
[[gnu::target("avx512f,avx512bw,avx512vl")]] void pack_pairs(const Operand16& s, int64_t x0, int64_t nx, int64_t k0,
                                                             int64_t kc, uint32_t* out) {
  const int64_t kp = (kc + 1) / 2;
  for (int64_t g0 = 0; g0 < nx; g0 += G) {
    uint32_t* o = out + (g0 / G) * kp * G;
    const int64_t gx = std::min<int64_t>(G, nx - g0);
    if (s.k_major) {  // two source rows interleave: contiguous, vectorisable
      for (int64_t q = 0; q < kp; ++q) {
        const uint16_t* r0 = s.p + (k0 + 2 * q) * s.ld + x0 + g0;
        uint32_t* oq = o + q * G;
        if (2 * q + 1 < kc) {
          const uint16_t* r1 = r0 + s.ld;
          for (int64_t x = 0; x < gx; ++x) oq[x] = uint32_t(r0[x]) | (uint32_t(r1[x]) << 16);
        } else {
          for (int64_t x = 0; x < gx; ++x) oq[x] = r0[x];
        }
        for (int64_t x = gx; x < G; ++x) oq[x] = 0;
      }
    } else {  // a pair is one 32-bit word of a source row: a 32-bit transpose
      for (int64_t x = 0; x < G; ++x) {
        if (x >= gx) {
          for (int64_t q = 0; q < kp; ++q) o[q * G + x] = 0;
          continue;
        }
        const uint16_t* src = s.p + (x0 + g0 + x) * s.ld + k0;
        for (int64_t q = 0; q < kc / 2; ++q) {
          uint32_t w;
          std::memcpy(&w, src + 2 * q, 4);
          o[q * G + x] = w;
        }
        if (kc % 2) o[(kp - 1) * G + x] = src[kc - 1];
      }
    }
  }
}

// GCC 12's AVX-512 intrinsic headers trip -Wmaybe-uninitialized on their own undefined vectors.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// acc[12][32] = (load ? ct : 0) + sum_q A-words(ap[q][12]) . B-words(bp[q][32]); then either stored to
// ct (f32, row stride ldct) or, when `last`, rounded to bf16 into c (row stride ldc), rows < mi and
// columns < nj only.
[[gnu::target("avx512f,avx512bw,avx512vl,avx512bf16")]] void dp_kernel(int64_t kp, const uint32_t* ap,
                                                                       const uint32_t* bp, float* ct, int64_t ldct,
                                                                       bool load, bool last, int64_t mi, int64_t nj,
                                                                       uint16_t* c, int64_t ldc) {
  __m512 acc[kDpMr][2];
#pragma GCC unroll 12
  for (int i = 0; i < kDpMr; ++i) {
    acc[i][0] = load && i < mi ? _mm512_loadu_ps(ct + i * ldct) : _mm512_setzero_ps();
    acc[i][1] = load && i < mi ? _mm512_loadu_ps(ct + i * ldct + 16) : _mm512_setzero_ps();
  }
  for (int64_t q = 0; q < kp; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp + q * kDpNr);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + q * kDpNr + 16);
#pragma GCC unroll 12
    for (int i = 0; i < kDpMr; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(int(ap[q * kDpMr + i]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, b1);
    }
  }
  if (!last) {
    for (int i = 0; i < mi; ++i) {
      _mm512_storeu_ps(ct + i * ldct, acc[i][0]);
      _mm512_storeu_ps(ct + i * ldct + 16, acc[i][1]);
    }
    return;
  }
  // Round to nearest even like float_to_bf16 (NaN stays a quiet NaN), 16 lanes at a time.
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff), quiet = _mm512_set1_epi32(0x40);
  for (int i = 0; i < mi; ++i) {
    for (int h = 0; h < 2; ++h) {
      const int64_t cols = std::min<int64_t>(16, nj - 16 * h);
      if (cols <= 0) break;
      const __m512i u = _mm512_castps_si512(acc[i][h]);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, lsb)), 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(acc[i][h], acc[i][h], _CMP_UNORD_Q);
      r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), quiet));
      const __mmask16 keep = __mmask16((1u << cols) - 1u);
      _mm256_mask_storeu_epi16(c + i * ldc + 16 * h, keep, _mm512_cvtepi32_epi16(r));
    }
  }
}

#pragma GCC diagnostic pop

std::atomic<bool> g_bf16_dp_enabled{true};

}  // namespace

bool use_bf16_dp() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return has && g_bf16_dp_enabled.load(std::memory_order_relaxed);
}

namespace {

struct DpScratch {
  std::vector<uint32_t> ap, bp;
  std::vector<float> ct;
};
DpScratch& dp_scratch() {
  thread_local DpScratch s;
  return s;
}

}  // namespace

// c[M, N] (bf16, row stride ldc) = sum_k A(m, k) B(n, k), on the calling thread. Per output element the
// sum runs over K blocks of kDpKc in order, pairs in order within a block: fixed by K alone.
void gemm_bf16_dp(const Operand16& A, const Operand16& B, int64_t M, int64_t N, int64_t K, uint16_t* c, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(c + m * ldc, c + m * ldc + N, uint16_t(0));
    return;
  }
  DpScratch& s = dp_scratch();
  const int64_t kp_max = (std::min(K, kDpKc) + 1) / 2;
  const int64_t m_pad = ceil_div(M, kDpMr) * kDpMr;
  const int64_t nc_max = std::min(N, kDpNc), nc_pad = ceil_div(nc_max, kDpNr) * kDpNr;
  if (int64_t(s.ap.size()) < m_pad * kp_max) s.ap.resize(size_t(m_pad * kp_max));
  if (int64_t(s.bp.size()) < nc_pad * kp_max) s.bp.resize(size_t(nc_pad * kp_max));
  const bool blocked_k = K > kDpKc;
  if (blocked_k && int64_t(s.ct.size()) < m_pad * nc_pad) s.ct.resize(size_t(m_pad * nc_pad));
  for (int64_t n0 = 0; n0 < N; n0 += kDpNc) {
    const int64_t nc = std::min(kDpNc, N - n0), ldct = ceil_div(nc, kDpNr) * kDpNr;
    for (int64_t k0 = 0; k0 < K; k0 += kDpKc) {
      const int64_t kc = std::min(kDpKc, K - k0), kp = (kc + 1) / 2;
      pack_pairs<kDpNr>(B, n0, nc, k0, kc, s.bp.data());
      pack_pairs<kDpMr>(A, 0, M, k0, kc, s.ap.data());
      const bool first = k0 == 0, last = k0 + kc >= K;
      for (int64_t i0 = 0; i0 < M; i0 += kDpMr) {
        const uint32_t* ap = s.ap.data() + (i0 / kDpMr) * kp * kDpMr;
        for (int64_t j0 = 0; j0 < nc; j0 += kDpNr) {
          dp_kernel(kp, ap, s.bp.data() + (j0 / kDpNr) * kp * kDpNr, blocked_k ? s.ct.data() + i0 * ldct + j0 : nullptr,
                    ldct, !first, last, std::min<int64_t>(kDpMr, M - i0), std::min<int64_t>(kDpNr, nc - j0),
                    c + i0 * ldc + n0 + j0, ldc);
        }
      }
    }
  }
}

bool set_bf16_dot_product(bool enabled) { return g_bf16_dp_enabled.exchange(enabled); }

}  // namespace smoe::cpu

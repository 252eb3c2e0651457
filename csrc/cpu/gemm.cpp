// CPU grouped GEMM over expert segments.
//
// Versions, each one line on why the next is faster:
//   gemm_blocked   smoe's own cache-blocked GEMM (packed panels, register-tile micro-kernel): the
//                  fallback when the build has no BLAS, and the readable version;
//   gemm_serial    one single-threaded BLAS call (OpenBLAS kernels are hand-tuned assembly);
//   grouped_gemm   cuts every expert segment into fixed tiles and spreads the tiles over smoe's thread
//                  pool, each tile one single-threaded BLAS call. Measured on the 2-core dev machine,
//                  this beats letting OpenBLAS thread inside each call for many small experts
//                  (fine-grained MoE) and matches it for a few large ones (Mixtral), so there is one
//                  path for both. f16 (and bf16 on CPUs without AVX512-BF16) tiles are widened to f32
//                  panels, multiplied with sgemm and rounded once on store;
//   sgemm_avx512   (gemm_avx512.cpp) f32 on CPUs with AVX-512F: 16-lane FMAs where OpenBLAS, pinned to
//                  its AVX2 Haswell kernels by the workplace's OPENBLAS_CORETYPE, uses 8; measured
//                  1.7-2.0x the OpenBLAS tiles at the benchmark shapes (docs/cpu.md). It packs its own
//                  operands, so it takes whole segments per tile; f16 and bf16 f32 panels use it too;
//   gemm_bf16_dp   bf16 on CPUs with AVX512-BF16: vdpbf16ps does two bf16 products per f32 lane, twice
//                  the f32 FMA rate, on operands packed straight from bf16 (no f32 copies); measured
//                  about 3x the f32 path above on the dev machine (whose OpenBLAS 0.3.21 runs its AVX2
//                  Haswell kernels on this Zen 5 CPU).
//
// Determinism: the tiling depends on the shapes only, never on the thread count, and OpenBLAS runs
// single-threaded (it never splits the reduction then), so every output element comes from the
// same call with the same reduction order whatever thread computes it (sgemm_avx512's order depends
// on K alone).
#include "cpu/gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <climits>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/blas.h"
#include "cpu/parallel.h"

namespace smoe::cpu {
namespace {

// ---- smoe's own blocked GEMM -------------------------------------------------------------------

// Register tile of the micro-kernel: kMr rows x (2 vectors of 64 bytes) columns.
constexpr int kMr = 6;
template <class Acc> constexpr int kNr = 2 * 64 / int(sizeof(Acc));
// Cache blocks: a kKc x kNc panel of b stays in L2 while kMc x kKc panels of a stream through L1.
constexpr int64_t kKc = 256;
constexpr int64_t kMc = 96;
constexpr int64_t kNc = 1024;

// c_tile[kMr][kNr] = ap[kc][kMr]^T-panel x bp[kc][kNr]-panel, summed over k in order.
template <class Acc>
[[gnu::always_inline]] inline void micro_kernel(int64_t kc, const Acc* ap, const Acc* bp, Acc* tile) {
  constexpr int nr = kNr<Acc>;
  Acc acc[kMr][nr];
  for (int i = 0; i < kMr; ++i)
    for (int j = 0; j < nr; ++j) acc[i][j] = Acc(0);
  for (int64_t k = 0; k < kc; ++k) {
    const Acc* bk = bp + k * nr;
    for (int i = 0; i < kMr; ++i) {
      const Acc av = ap[k * kMr + i];
      for (int j = 0; j < nr; ++j) acc[i][j] += av * bk[j];
    }
  }
  for (int i = 0; i < kMr; ++i)
    for (int j = 0; j < nr; ++j) tile[i * nr + j] = acc[i][j];
}

// One clone per ISA; the pack and store loops stay scalar-generic, the FLOPs are all in here.
[[gnu::target_clones("avx512f", "avx2", "default")]] void micro_kernel_f32(int64_t kc, const float* ap,
                                                                            const float* bp, float* tile) {
  micro_kernel<float>(kc, ap, bp, tile);
}
[[gnu::target_clones("avx512f", "avx2", "default")]] void micro_kernel_f64(int64_t kc, const double* ap,
                                                                            const double* bp, double* tile) {
  micro_kernel<double>(kc, ap, bp, tile);
}
inline void micro(int64_t kc, const float* ap, const float* bp, float* tile) { micro_kernel_f32(kc, ap, bp, tile); }
inline void micro(int64_t kc, const double* ap, const double* bp, double* tile) {
  micro_kernel_f64(kc, ap, bp, tile);
}

}  // namespace

template <class Acc>
void gemm_blocked(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const Acc* a, int64_t lda,
                  const Acc* b, int64_t ldb, Acc* c, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(c + m * ldc, c + m * ldc + N, Acc(0));
    return;
  }
  constexpr int nr = kNr<Acc>;
  auto A = [&](int64_t m, int64_t k) { return trans_a ? a[k * lda + m] : a[m * lda + k]; };
  auto B = [&](int64_t k, int64_t n) { return trans_b ? b[n * ldb + k] : b[k * ldb + n]; };
  std::vector<Acc> bp(size_t(kKc * kNc)), ap(size_t(kMc * kKc)), tile(size_t(kMr * nr));
  for (int64_t jc = 0; jc < N; jc += kNc) {
    const int64_t nc = std::min(kNc, N - jc);
    for (int64_t pc = 0; pc < K; pc += kKc) {
      const int64_t kc = std::min(kKc, K - pc);
      // bp: panels of nr columns, each [kc][nr], zero-padded past N.
      for (int64_t j0 = 0; j0 < nc; j0 += nr) {
        Acc* panel = bp.data() + j0 * kc;
        for (int64_t k = 0; k < kc; ++k)
          for (int j = 0; j < nr; ++j) panel[k * nr + j] = j0 + j < nc ? B(pc + k, jc + j0 + j) : Acc(0);
      }
      for (int64_t ic = 0; ic < M; ic += kMc) {
        const int64_t mc = std::min(kMc, M - ic);
        for (int64_t i0 = 0; i0 < mc; i0 += kMr) {
          Acc* panel = ap.data() + i0 * kc;
          for (int64_t k = 0; k < kc; ++k)
            for (int i = 0; i < kMr; ++i) panel[k * kMr + i] = i0 + i < mc ? A(ic + i0 + i, pc + k) : Acc(0);
        }
        for (int64_t j0 = 0; j0 < nc; j0 += nr) {
          for (int64_t i0 = 0; i0 < mc; i0 += kMr) {
            micro(kc, ap.data() + i0 * kc, bp.data() + j0 * kc, tile.data());
            const int64_t mi = std::min<int64_t>(kMr, mc - i0), nj = std::min<int64_t>(nr, nc - j0);
            for (int64_t i = 0; i < mi; ++i) {
              Acc* crow = c + (ic + i0 + i) * ldc + jc + j0;
              const Acc* trow = tile.data() + i * nr;
              // The first K block writes, later ones add: c never has to be pre-zeroed.
              if (pc == 0) {
                for (int64_t j = 0; j < nj; ++j) crow[j] = trow[j];
              } else {
                for (int64_t j = 0; j < nj; ++j) crow[j] += trow[j];
              }
            }
          }
        }
      }
    }
  }
}

namespace {

#if SMOE_HAVE_BLAS
// smoe drives OpenBLAS single-threaded from its own pool (see the file comment); set once.
void blas_single_threaded() {
  static std::once_flag once;
  std::call_once(once, [] { SMOE_BLAS_FN(openblas_set_num_threads)(1); });
}
#endif

}  // namespace

template <class Acc>
void gemm_serial(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const Acc* a, int64_t lda,
                 const Acc* b, int64_t ldb, Acc* c, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // not left to the BLAS: the reference BLAS would leave c untouched
    for (int64_t m = 0; m < M; ++m) std::fill(c + m * ldc, c + m * ldc + N, Acc(0));
    return;
  }
#if SMOE_HAVE_BLAS
  blas_single_threaded();
  const int ta = trans_a ? blas::kTrans : blas::kNoTrans, tb = trans_b ? blas::kTrans : blas::kNoTrans;
  // Sizes and leading dimensions fit int: csrc/core/gemm.cpp rejects larger ones.
  if constexpr (std::is_same_v<Acc, float>) {
    SMOE_BLAS_FN(cblas_sgemm)(blas::kRowMajor, ta, tb, int(M), int(N), int(K), 1.f, a, int(lda), b, int(ldb), 0.f,
                              c, int(ldc));
  } else {
    SMOE_BLAS_FN(cblas_dgemm)(blas::kRowMajor, ta, tb, int(M), int(N), int(K), 1.0, a, int(lda), b, int(ldb), 0.0,
                              c, int(ldc));
  }
#else
  gemm_blocked<Acc>(trans_a, trans_b, M, N, K, a, lda, b, ldb, c, ldc);
#endif
}

template void gemm_serial<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                                 int64_t, float*, int64_t);
template void gemm_serial<double>(bool, bool, int64_t, int64_t, int64_t, const double*, int64_t, const double*,
                                  int64_t, double*, int64_t);
template void gemm_blocked<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                                  int64_t, float*, int64_t);
template void gemm_blocked<double>(bool, bool, int64_t, int64_t, int64_t, const double*, int64_t,
                                   const double*, int64_t, double*, int64_t);

void dense_sgemm_roof(int threads, int64_t M, int64_t N, int64_t K, const float* a, const float* b, float* c) {
#if SMOE_HAVE_BLAS
  blas_single_threaded();
  SMOE_BLAS_FN(openblas_set_num_threads)(threads);
  SMOE_BLAS_FN(cblas_sgemm)(blas::kRowMajor, blas::kNoTrans, blas::kNoTrans, int(M), int(N), int(K), 1.f, a, int(K), b,
                            int(N), 0.f, c, int(N));
  SMOE_BLAS_FN(openblas_set_num_threads)(1);
#else
  (void)threads;
  gemm_blocked<float>(false, false, M, N, K, a, K, b, N, c, N);
#endif
}

const char* blas_name() {
#if SMOE_HAVE_BLAS
#define SMOE_STR_(x) #x
#define SMOE_STR(x) SMOE_STR_(x)
  return "OpenBLAS (symbol prefix '" SMOE_STR(SMOE_BLAS_PREFIX) "')";
#else
  return "none (smoe's own blocked GEMM)";
#endif
}

Status check_offsets(const char* op, const TensorView& offsets, int64_t R) {
  const int64_t* o = offsets.data_as<const int64_t>();
  const int64_t E = offsets.size(0) - 1;
  if (o[0] < 0) return invalid_argument(op, "offsets", "offsets[0] >= 0", std::to_string(o[0]));
  for (int64_t e = 0; e < E; ++e) {
    if (o[e + 1] < o[e]) {
      return invalid_argument(op, "offsets", "non-decreasing values",
                              "offsets[" + std::to_string(e + 1) + "] = " + std::to_string(o[e + 1]) + " < offsets[" +
                                  std::to_string(e) + "] = " + std::to_string(o[e]));
    }
  }
  if (o[E] > R) {
    return invalid_argument(op, "offsets", "offsets[E] <= R = " + std::to_string(R) + " (rows of a)",
                            std::to_string(o[E]));
  }
  return Status::Ok();
}

namespace {

// ---- conversions between the 16-bit storage types and f32 panels --------------------------------

[[gnu::target_clones("avx512f", "avx2", "default")]] void widen(const bf16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(uint32_t(src[i].bits) << 16);  // the top half
}
// float_to_bf16 without branches, so that the loop vectorises: round to nearest even, NaN stays quiet.
[[gnu::target_clones("avx512f", "avx2", "default")]] void narrow(const float* src, bf16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = std::bit_cast<uint32_t>(src[i]);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    dst[i].bits = uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
  }
}
void widen(const f16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(src[i]);
}
void narrow(const float* src, f16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_f16(src[i]);
}

// ---- bf16 x bf16 -> f32 with AVX512-BF16 dot products ------------------------------------------
//
// vdpbf16ps multiplies pairs of bf16 (exactly, in f32) and adds both products to an f32 lane, so a bf16
// GEMM runs at twice the f32 FMA rate with the same f32 accumulation, and no f32 copy of the operands
// is made. Operands are packed into pair-words: word(x, q) = X(x, 2q) | X(x, 2q + 1) << 16 (the
// second half zero past an odd K); a micro-kernel keeps a kDpMr x kDpNr f32 tile in 24 registers,
// broadcasting one A word per row and loading 32 B words (two vectors) per pair step.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int kDpMr = 12;           // rows of a register tile (one broadcast each)
constexpr int kDpNr = 32;           // columns of a register tile (two 16-lane vectors)
constexpr int64_t kDpKc = 1024;     // reduction block: an A panel of 12 rows (24 KB) stays in L1
constexpr int64_t kDpNc = 256;      // column chunk: its packed B (512 KB) stays in L2

// A 16-bit operand seen as X(x, k) for x in rows (A) or columns (B): x-major p[x * ld + k] or
// k-major p[k * ld + x].
struct Operand16 {
  const uint16_t* p;
  int64_t ld;
  bool k_major;
};

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

bool use_bf16_dp() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return has && g_bf16_dp_enabled.load(std::memory_order_relaxed);
}

struct DpScratch {
  std::vector<uint32_t> ap, bp;
  std::vector<float> ct;
};
DpScratch& dp_scratch() {
  thread_local DpScratch s;
  return s;
}

// c[M, N] (bf16, row stride ldc) = sum_k A(m, k) B(n, k), on the calling thread. Per output element the
// sum runs over K blocks of kDpKc in order, pairs in order within a block: fixed by K alone.
void gemm_bf16_dp(const Operand16& A, const Operand16& B, int64_t M, int64_t N, int64_t K, uint16_t* c,
                  int64_t ldc) {
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
          dp_kernel(kp, ap, s.bp.data() + (j0 / kDpNr) * kp * kDpNr,
                    blocked_k ? s.ct.data() + i0 * ldct + j0 : nullptr, ldct, !first, last,
                    std::min<int64_t>(kDpMr, M - i0), std::min<int64_t>(kDpNr, nc - j0), c + i0 * ldc + n0 + j0, ldc);
        }
      }
    }
  }
}

// ---- tiles and their distribution over threads -------------------------------------------------

// A tile: rows [r0, r1) of expert e's segment (or, for wgrad, rows [r0, r1) of c[e]) x columns [n0, n1).
struct Tile {
  int64_t e, r0, r1, n0, n1;
  double cost;  // flops, for balancing
};

// Rows per tile: big enough that one BLAS call amortises its packing of b, small enough that a few
// experts still give every thread work.
constexpr int64_t kTileRows = 256;
// The bf16 dot-product path and the AVX-512 f32 GEMM pack their own operands, so they take a whole
// expert segment per tile (up to this many rows): b[e] is then packed once per call.
constexpr int64_t kDpTileRows = 1024;
// With fewer row tiles than this, columns are split too (e.g. a decode step with a handful of rows).
constexpr int64_t kMinTiles = 16;
constexpr int64_t kMinTileCols = 128;


// Column split for `row_tiles` row tiles over N columns; depends on the shapes only.
int64_t tile_cols(int64_t row_tiles, int64_t N) {
  if (row_tiles >= kMinTiles) return N;
  const int64_t splits = ceil_div(kMinTiles, std::max<int64_t>(row_tiles, 1));
  return std::max(kMinTileCols, ceil_div(ceil_div(N, splits), 64) * 64);
}

// Runs fn(tile, scratch_slot) over all tiles: thread p gets a contiguous run of tiles holding about
// 1/threads of the flops. Which thread runs a tile does not change its result.
template <class F>
void run_tiles(const std::vector<Tile>& tiles, F&& fn) {
  if (tiles.empty()) return;
  const int parts = std::max(1, std::min<int>(num_threads(), int(tiles.size())));
  std::vector<double> prefix(tiles.size() + 1, 0.0);
  for (size_t i = 0; i < tiles.size(); ++i) prefix[i + 1] = prefix[i] + tiles[i].cost;
  std::vector<size_t> start(size_t(parts) + 1, tiles.size());
  start[0] = 0;
  for (int p = 1; p < parts; ++p) {
    const double target = prefix.back() * p / parts;
    size_t i = start[p - 1];
    while (i < tiles.size() && prefix[i] + 0.5 * tiles[i].cost < target) ++i;
    start[p] = i;
  }
  parallel_for(parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p)
      for (size_t i = start[p]; i < start[p + 1]; ++i) fn(tiles[i]);
  });
}

// Scratch f32 panels of one thread for the 16-bit paths, reused across calls.
struct Panels {
  std::vector<float> a, b, c;
};
Panels& thread_panels() {
  thread_local Panels p;
  return p;
}
float* grow(std::vector<float>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
  return v.data();
}

// One f32 tile: smoe's AVX-512 GEMM where the CPU has AVX-512F (and it is enabled), else the BLAS.
void sgemm_tile(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* a, int64_t lda,
                const float* b, int64_t ldb, float* c, int64_t ldc) {
  if (use_sgemm_avx512()) {
    sgemm_avx512(trans_a, trans_b, M, N, K, a, lda, b, ldb, c, ldc);
  } else {
    gemm_serial<float>(trans_a, trans_b, M, N, K, a, lda, b, ldb, c, ldc);
  }
}

// Whether a tile of T goes to a kernel that packs its operands itself (and so wants big tiles).
template <class T> bool packs_own_operands() {
  if constexpr (std::is_same_v<T, bf16_t>) return use_bf16_dp();
  if constexpr (std::is_same_v<T, float>) return use_sgemm_avx512();
  return false;
}

// c[seg_e] = a[seg_e] @ op(b[e]).   a [R, Kd], b [E, N, Kd] (trans_b) or [E, Kd, N], c [R, N]
template <class T>
void grouped_gemm_typed(bool trans_b, const TensorView& a, const TensorView& b, const int64_t* offsets, int64_t E,
                        const TensorView& c) {
  using Acc = typename AccOf<T>::type;
  const int64_t Kd = a.size(1), N = c.size(1);
  const int64_t lda = a.stride(0), ldc = c.stride(0);
  const int64_t expert_stride = b.stride(0);  // N * Kd
  const T* pa = a.data_as<const T>();
  const T* pb = b.data_as<const T>();
  T* pc = c.data_as<T>();

  const bool dp = std::is_same_v<T, bf16_t> && use_bf16_dp();
  const int64_t tile_rows = packs_own_operands<T>() ? kDpTileRows : kTileRows;
  int64_t row_tiles = 0;
  for (int64_t e = 0; e < E; ++e) row_tiles += ceil_div(offsets[e + 1] - offsets[e], tile_rows);
  const int64_t nb = tile_cols(row_tiles, N);
  std::vector<Tile> tiles;
  tiles.reserve(size_t(row_tiles * ceil_div(N, nb)));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r0 = offsets[e]; r0 < offsets[e + 1]; r0 += tile_rows)
      for (int64_t n0 = 0; n0 < N; n0 += nb) {
        const int64_t r1 = std::min(r0 + tile_rows, offsets[e + 1]), n1 = std::min(n0 + nb, N);
        tiles.push_back({e, r0, r1, n0, n1, double(r1 - r0) * double(n1 - n0) * double(Kd)});
      }

  run_tiles(tiles, [&](const Tile& t) {
    const int64_t m = t.r1 - t.r0, n = t.n1 - t.n0;
    // Columns [n0, n1) of op(b[e]): rows n0.. of b[e] when transposed, else columns n0.. of each row.
    const T* bt = pb + t.e * expert_stride + (trans_b ? t.n0 * Kd : t.n0);
    const int64_t ldb = trans_b ? Kd : N;
    if constexpr (std::is_same_v<T, bf16_t>) {
      if (dp) {
        const Operand16 A{reinterpret_cast<const uint16_t*>(pa + t.r0 * lda), lda, false};
        const Operand16 B{reinterpret_cast<const uint16_t*>(bt), ldb, !trans_b};
        gemm_bf16_dp(A, B, m, n, Kd, reinterpret_cast<uint16_t*>(pc + t.r0 * ldc + t.n0), ldc);
        return;
      }
    }
    if constexpr (std::is_same_v<T, float>) {
      sgemm_tile(false, trans_b, m, n, Kd, pa + t.r0 * lda, lda, bt, ldb, pc + t.r0 * ldc + t.n0, ldc);
    } else if constexpr (std::is_same_v<T, Acc>) {
      gemm_serial<Acc>(false, trans_b, m, n, Kd, pa + t.r0 * lda, lda, bt, ldb, pc + t.r0 * ldc + t.n0, ldc);
    } else {
      // Widen the a rows and the b block to dense f32 panels, multiply, round once on store.
      Panels& s = thread_panels();
      float* fa = grow(s.a, m * Kd);
      float* fb = grow(s.b, n * Kd);
      float* fc = grow(s.c, m * n);
      for (int64_t i = 0; i < m; ++i) widen(pa + (t.r0 + i) * lda, fa + i * Kd, Kd);
      if (trans_b) {
        widen(bt, fb, n * Kd);  // rows n0..n1 of b[e] are contiguous
      } else {
        for (int64_t k = 0; k < Kd; ++k) widen(bt + k * N, fb + k * n, n);
      }
      sgemm_tile(false, trans_b, m, n, Kd, fa, Kd, fb, trans_b ? Kd : n, fc, n);
      for (int64_t i = 0; i < m; ++i) narrow(fc + i * n, pc + (t.r0 + i) * ldc + t.n0, n);
    }
  });
}

// c[e] = a[seg_e]^T @ b[seg_e].   a [R, M], b [R, N], c [E, M, N]
template <class T>
void grouped_gemm_wgrad_typed(const TensorView& a, const TensorView& b, const int64_t* offsets, int64_t E,
                              const TensorView& c) {
  using Acc = typename AccOf<T>::type;
  const int64_t M = a.size(1), N = b.size(1);
  const int64_t lda = a.stride(0), ldb = b.stride(0);
  const T* pa = a.data_as<const T>();
  const T* pb = b.data_as<const T>();
  T* pc = c.data_as<T>();

  // Tiles cut c[e] into row blocks of M (never the reduction over the segment, which would make the
  // sum order depend on the tiling); an empty segment still gets tiles, which write zeros.
  const bool dp = std::is_same_v<T, bf16_t> && use_bf16_dp();
  const int64_t tile_rows = packs_own_operands<T>() ? kDpTileRows : kTileRows;
  const int64_t row_tiles = E * ceil_div(M, tile_rows);
  const int64_t nb = tile_cols(row_tiles, N);
  std::vector<Tile> tiles;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r0 = 0; r0 < M; r0 += tile_rows)
      for (int64_t n0 = 0; n0 < N; n0 += nb) {
        const int64_t r1 = std::min(r0 + tile_rows, M), n1 = std::min(n0 + nb, N);
        const double rows = double(offsets[e + 1] - offsets[e]);
        tiles.push_back({e, r0, r1, n0, n1, double(r1 - r0) * double(n1 - n0) * (rows + 1.0)});
      }

  run_tiles(tiles, [&](const Tile& t) {
    const int64_t m = t.r1 - t.r0, n = t.n1 - t.n0;
    const int64_t s0 = offsets[t.e], rows = offsets[t.e + 1] - s0;
    T* ct = pc + t.e * M * N + t.r0 * N + t.n0;
    if constexpr (std::is_same_v<T, bf16_t>) {
      if (dp) {  // A(m, r) = a[s0 + r, r0 + m], B(n, r) = b[s0 + r, n0 + n]: both k-major
        const Operand16 A{reinterpret_cast<const uint16_t*>(pa + s0 * lda + t.r0), lda, true};
        const Operand16 B{reinterpret_cast<const uint16_t*>(pb + s0 * ldb + t.n0), ldb, true};
        gemm_bf16_dp(A, B, m, n, rows, reinterpret_cast<uint16_t*>(ct), N);
        return;
      }
    }
    if constexpr (std::is_same_v<T, float>) {
      sgemm_tile(true, false, m, n, rows, pa + s0 * lda + t.r0, lda, pb + s0 * ldb + t.n0, ldb, ct, N);
    } else if constexpr (std::is_same_v<T, Acc>) {
      gemm_serial<Acc>(true, false, m, n, rows, pa + s0 * lda + t.r0, lda, pb + s0 * ldb + t.n0, ldb, ct, N);
    } else {
      Panels& s = thread_panels();
      float* fa = grow(s.a, std::max<int64_t>(rows * m, 1));
      float* fb = grow(s.b, std::max<int64_t>(rows * n, 1));
      float* fc = grow(s.c, m * n);
      for (int64_t i = 0; i < rows; ++i) {
        widen(pa + (s0 + i) * lda + t.r0, fa + i * m, m);
        widen(pb + (s0 + i) * ldb + t.n0, fb + i * n, n);
      }
      sgemm_tile(true, false, m, n, rows, fa, m, fb, n, fc, n);
      for (int64_t i = 0; i < m; ++i) narrow(fc + i * n, ct + i * N, n);
    }
  });
}

template <template <class> class Fn, class... Args>
void dispatch_float(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::kF32: Fn<float>::run(args...); break;
    case DType::kF64: Fn<double>::run(args...); break;
    case DType::kBF16: Fn<bf16_t>::run(args...); break;
    case DType::kF16: Fn<f16_t>::run(args...); break;
    default: break;  // rejected by the validation in csrc/core/gemm.cpp
  }
}

template <class T> struct GroupedGemmFn {
  static void run(bool trans_b, const TensorView& a, const TensorView& b, const int64_t* o, int64_t E,
                  const TensorView& c) {
    grouped_gemm_typed<T>(trans_b, a, b, o, E, c);
  }
};
template <class T> struct WgradFn {
  static void run(const TensorView& a, const TensorView& b, const int64_t* o, int64_t E, const TensorView& c) {
    grouped_gemm_wgrad_typed<T>(a, b, o, E, c);
  }
};

}  // namespace

bool set_bf16_dot_product(bool enabled) { return g_bf16_dp_enabled.exchange(enabled); }

Status grouped_gemm_prechecked(const GroupedGemmParams& params, const TensorView& a, const TensorView& b,
                               const TensorView& offsets, const TensorView& c) {
  const int64_t E = offsets.size(0) - 1;
  dispatch_float<GroupedGemmFn>(a.dtype, params.trans_b, a, b, offsets.data_as<const int64_t>(), E, c);
  return Status::Ok();
}

Status grouped_gemm_wgrad_prechecked(const TensorView& a, const TensorView& b, const TensorView& offsets,
                                     const TensorView& c) {
  const int64_t E = offsets.size(0) - 1;
  dispatch_float<WgradFn>(a.dtype, a, b, offsets.data_as<const int64_t>(), E, c);
  return Status::Ok();
}

Status grouped_gemm(const GroupedGemmParams& params, const TensorView& a, const TensorView& b,
                    const TensorView& offsets, const TensorView& c) {
  SMOE_RETURN_IF_ERROR(check_offsets("grouped_gemm", offsets, a.size(0)));
  return grouped_gemm_prechecked(params, a, b, offsets, c);
}

Status grouped_gemm_wgrad(const TensorView& a, const TensorView& b, const TensorView& offsets,
                          const TensorView& c) {
  SMOE_RETURN_IF_ERROR(check_offsets("grouped_gemm_wgrad", offsets, a.size(0)));
  return grouped_gemm_wgrad_prechecked(a, b, offsets, c);
}

}  // namespace smoe::cpu

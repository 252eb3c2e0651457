// smoe's own f32 GEMM for AVX-512F CPUs: c[M, N] = op(a)[M, K] @ op(b)[K, N], row-major, on the
// calling thread (declared in cpu/gemm.h).
//
// Why it exists: the workplace runs OpenBLAS with OPENBLAS_CORETYPE=Haswell (older OpenBLAS builds
// misbehave on Zen 5), so OpenBLAS's sgemm uses 8-lane AVX2 FMAs, half the 16-lane AVX-512 peak of
// the dev machine. We may not change that variable, so the f32 expert GEMMs get their own kernel.
//
// Algorithm: the Goto/BLIS layering (K. Goto, R. van de Geijn, "Anatomy of high-performance matrix
// multiplication", ACM TOMS 34(3), 2008; F. Van Zee, R. van de Geijn, "BLIS: a framework for rapidly
// instantiating BLAS functionality", ACM TOMS 41(3), 2015), with the loops (outer to inner):
//   pc  K blocks of kKc       pack op(a)[0:M, pc:pc+kc] into kMr-row micro-panels  ap[M/kMr][kc][kMr]
//   jc  N blocks of kNc       pack op(b)[pc:pc+kc, jc:jc+nc] into kNr-column panels bp[nc/kNr][kc][kNr]
//   ir  kMr rows              one A micro-panel (kc x 12 x 4 B = 18 KB at kc = 384) stays in L1
//   jr  kNr columns           B micro-panels stream from the packed block, which stays in L2
//                             (kc x kNc x 4 B = 576 KB; Zen 5 has 1 MB of L2 per core)
//   micro-kernel              prefetches the 12 x 32 tile of c it will add to, then keeps
//                             a kMr x kNr = 12 x 32 tile of c in 24 zmm accumulators; per k: two
//                             loads of b, twelve broadcasts of a (folded into the FMA as {1to16}), 24
//                             vfmadd231ps. 24 FMAs per 2 loads keeps both FMA pipes busy.
// Packing the whole M x kc block of a once per K block (rather than per (jc, ic) block as BLIS does)
// packs every element of a and of b exactly once per call; M is at most a few thousand rows here
// (one expert segment, or one row tile of a weight gradient).
//
// Rounding: every output element is, per K block of kKc (a constant), one chain of fused multiply-adds
// in k order from +0, and the block sums are added to c in block order. So the result depends on K and
// the values only, not on M, N, the tile a caller asks for, or the thread that runs it; it differs
// from OpenBLAS (which also uses FMA, in its own order) by rounding only. Continuing one chain across
// K blocks instead (loading the accumulators back from c) was tried first: at K = 1000 its error
// against an f64 reference was about 3x OpenBLAS's, against the 2x the tolerance rule allows
// (tests/cpp/core/test_gemm.cpp). The rest of smoe_core is built with -ffp-contract=off; the FMAs here
// are explicit intrinsics, which that flag does not touch.
//
// Edges: a is zero-padded to whole kMr-row micro-panels and b to whole kNr-column panels when
// packed; the micro-kernel stores only the rows < mi and, with a lane mask, the columns < nj.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "cpu/gemm.h"

namespace smoe::cpu {
namespace {

constexpr int kMr = 12;       // rows of the register tile: one broadcast of a each
constexpr int kNr = 32;       // columns of the register tile: two 16-lane vectors
constexpr int64_t kKc = 384;  // K block: A micro-panel 18 KB (L1), see the file comment
constexpr int64_t kNc = 384;  // N block: packed b 576 KB (L2)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#define SMOE_AVX512 __attribute__((target("avx512f,fma")))

// GCC 12's AVX-512 intrinsic headers trip -Wmaybe-uninitialized on their own undefined vectors.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Transposes r[0..15] (16 rows of 16 floats) in place: afterwards r[j][i] is the old r[i][j].
// Three stages: 32-bit interleave within 128-bit lanes, 64-bit interleave, then 128-bit lane shuffles.
SMOE_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // Per group g of 4 rows: u[4g + c] holds, in 128-bit lane L, column 4L + c of rows 4g .. 4g+3.
  for (int g = 0; g < 4; ++g) {
    const __m512d t0 = _mm512_castps_pd(t[4 * g]), t1 = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * g + 2]), t3 = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 p = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);  // g0L0 g0L2 g1L0 g1L2
    const __m512 q = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 p1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);  // g0L1 g0L3 g1L1 g1L3
    const __m512 q1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[0 + c] = _mm512_shuffle_f32x4(p, q, 0x88);     // lane L = 0: column c
    r[8 + c] = _mm512_shuffle_f32x4(p, q, 0xDD);     // lane L = 2: column 8 + c
    r[4 + c] = _mm512_shuffle_f32x4(p1, q1, 0x88);   // lane L = 1: column 4 + c
    r[12 + c] = _mm512_shuffle_f32x4(p1, q1, 0xDD);  // lane L = 3: column 12 + c
  }
}

__mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }

// bp[panel][k][kNr] = B(k0 + k, n0 + panel * kNr + j), zero past nc. B(k, n) = b[k * ldb + n], or
// b[n * ldb + k] when trans_b (then 16 x 16 blocks are transposed in registers).
SMOE_AVX512 void pack_b(bool trans_b, const float* b, int64_t ldb, int64_t k0, int64_t kc, int64_t n0, int64_t nc,
                        float* bp) {
  if (!trans_b) {  // k outer: each row of b is read once, front to back
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = b + (k0 + k) * ldb + n0;
      for (int64_t j0 = 0; j0 < nc; j0 += kNr) {
        const __mmask16 m0 = lanes(nc - j0), m1 = lanes(std::max<int64_t>(nc - j0 - 16, 0));
        float* dst = bp + (j0 / kNr) * kc * kNr + k * kNr;
        _mm512_storeu_ps(dst, _mm512_maskz_loadu_ps(m0, src + j0));
        _mm512_storeu_ps(dst + 16, _mm512_maskz_loadu_ps(m1, src + j0 + 16));
      }
    }
    return;
  }
  for (int64_t j0 = 0; j0 < nc; j0 += kNr) {
    float* panel = bp + (j0 / kNr) * kc * kNr;
    for (int h = 0; h < 2; ++h) {
      const int64_t cols = std::min<int64_t>(16, nc - j0 - 16 * h);  // rows of b in this half
      for (int64_t kb = 0; kb < kc; kb += 16) {
        const int64_t kn = std::min<int64_t>(16, kc - kb);
        const __mmask16 km = lanes(kn);
        __m512 r[16];
        for (int i = 0; i < 16; ++i)
          r[i] = i < cols ? _mm512_maskz_loadu_ps(km, b + (n0 + j0 + 16 * h + i) * ldb + k0 + kb) : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t k = 0; k < kn; ++k) _mm512_storeu_ps(panel + (kb + k) * kNr + 16 * h, r[k]);
      }
    }
  }
}

// ap[panel][k][kMr] = A(m0 + panel * kMr + i, k0 + k), zero past M. A(m, k) = a[m * lda + k], or
// a[k * lda + m] when trans_a (then a row of the panel is 12 contiguous floats).
SMOE_AVX512 void pack_a(bool trans_a, const float* a, int64_t lda, int64_t M, int64_t k0, int64_t kc, float* ap) {
  if (trans_a) {  // k outer: each row of a is read once, front to back
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = a + (k0 + k) * lda;
      for (int64_t i0 = 0; i0 < M; i0 += kMr) {
        const __mmask16 m = lanes(std::min<int64_t>(kMr, M - i0));
        _mm512_mask_storeu_ps(ap + (i0 / kMr) * kc * kMr + k * kMr, __mmask16(0x0fff),
                              _mm512_maskz_loadu_ps(m, src + i0));
      }
    }
    return;
  }
  for (int64_t i0 = 0; i0 < M; i0 += kMr) {
    float* panel = ap + (i0 / kMr) * kc * kMr;
    const int64_t mi = std::min<int64_t>(kMr, M - i0);
    // Rows of a are contiguous in k: transpose 16 k-values of the 12 rows at a time.
    for (int64_t kb = 0; kb < kc; kb += 16) {
      const int64_t kn = std::min<int64_t>(16, kc - kb);
      const __mmask16 km = lanes(kn);
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < mi ? _mm512_maskz_loadu_ps(km, a + (i0 + i) * lda + k0 + kb) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t k = 0; k < kn; ++k) _mm512_mask_storeu_ps(panel + (kb + k) * kMr, __mmask16(0x0fff), r[k]);
    }
  }
}

// c[0:mi, 0:nj] (row stride ldc) = (add ? c : 0) + ap[kc][12]^T bp[kc][32]: one FMA chain from +0 per
// element, then one add to c.
SMOE_AVX512 void micro_kernel(int64_t kc, const float* __restrict ap, const float* __restrict bp, float* c, int64_t ldc,
                              bool add, int64_t mi, int64_t nj) {
  const __mmask16 m0 = lanes(nj), m1 = lanes(std::max<int64_t>(nj - 16, 0));
  __m512 acc[kMr][2];
#pragma GCC unroll 12
  for (int i = 0; i < kMr; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  if (add) {  // c is read at the end: start fetching it now, behind kc steps of FMAs
    for (int i = 0; i < mi; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 16), _MM_HINT_T0);
    }
  }
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(bp + k * kNr);
    const __m512 b1 = _mm512_loadu_ps(bp + k * kNr + 16);
#pragma GCC unroll 12
    for (int i = 0; i < kMr; ++i) {
      const __m512 av = _mm512_set1_ps(ap[k * kMr + i]);
      acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
    }
  }
  if (add) {
    for (int i = 0; i < mi; ++i) {
      acc[i][0] = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, c + i * ldc), acc[i][0]);
      acc[i][1] = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, c + i * ldc + 16), acc[i][1]);
    }
  }
  if (mi == kMr && nj == kNr) {
#pragma GCC unroll 12
    for (int i = 0; i < kMr; ++i) {
      _mm512_storeu_ps(c + i * ldc, acc[i][0]);
      _mm512_storeu_ps(c + i * ldc + 16, acc[i][1]);
    }
    return;
  }
  for (int i = 0; i < mi; ++i) {
    _mm512_mask_storeu_ps(c + i * ldc, m0, acc[i][0]);
    _mm512_mask_storeu_ps(c + i * ldc + 16, m1, acc[i][1]);
  }
}

#pragma GCC diagnostic pop

struct Scratch {
  std::vector<float> ap, bp;
};
Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// 64-byte aligned views into the scratch vectors (panels are read with unaligned loads, but aligned
// rows avoid split cache lines).
float* aligned(std::vector<float>& v, int64_t n) {
  if (int64_t(v.size()) < n + 16) v.resize(size_t(n + 16));
  const auto p = reinterpret_cast<uintptr_t>(v.data());
  return v.data() + ((64 - p % 64) % 64) / sizeof(float);
}

std::atomic<bool> g_enabled{true};

}  // namespace

bool sgemm_avx512_supported() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return has;
}

bool use_sgemm_avx512() { return sgemm_avx512_supported() && g_enabled.load(std::memory_order_relaxed); }

bool set_sgemm_avx512(bool enabled) { return g_enabled.exchange(enabled); }

void sgemm_avx512(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* a, int64_t lda,
                  const float* b, int64_t ldb, float* c, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(c + m * ldc, c + m * ldc + N, 0.f);
    return;
  }
  Scratch& s = scratch();
  const int64_t m_pad = ceil_div(M, kMr) * kMr;
  const int64_t kc_max = std::min(K, kKc);
  const int64_t nc_pad = ceil_div(std::min(N, kNc), kNr) * kNr;
  float* ap = aligned(s.ap, m_pad * kc_max);
  float* bp = aligned(s.bp, nc_pad * kc_max);
  for (int64_t pc = 0; pc < K; pc += kKc) {
    const int64_t kc = std::min(kKc, K - pc);
    pack_a(trans_a, a, lda, M, pc, kc, ap);
    for (int64_t jc = 0; jc < N; jc += kNc) {
      const int64_t nc = std::min(kNc, N - jc);
      pack_b(trans_b, b, ldb, pc, kc, jc, nc, bp);
      for (int64_t i0 = 0; i0 < M; i0 += kMr) {
        const float* a_panel = ap + (i0 / kMr) * kc * kMr;
        const int64_t mi = std::min<int64_t>(kMr, M - i0);
        for (int64_t j0 = 0; j0 < nc; j0 += kNr) {
          micro_kernel(kc, a_panel, bp + (j0 / kNr) * kc * kNr, c + i0 * ldc + jc + j0, ldc, pc > 0, mi,
                       std::min<int64_t>(kNr, nc - j0));
        }
      }
    }
  }
}

}  // namespace smoe::cpu

// smoe's own cache-blocked GEMM (v0 of the CPU GEMM ladder; csrc/cpu/grouped_gemm.cpp lists the
// versions): packed panels and a register-tile micro-kernel, the fallback when the build has no BLAS
// and the readable version of what the BLAS does.
//
// TEACH: a GEMM is limited by memory, not arithmetic, unless operands are reused from cache. The
// three loops around the micro-kernel cut b into kKc x kNc panels that stay in L2 and a into
// kMc x kKc panels that stay in L1; the micro-kernel keeps a kMr x kNr tile of c in registers, so
// each loaded element of a and b feeds kNr (resp. kMr) multiply-adds.
#include "cpu/gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace smoe::cpu {
namespace {

// ---- smoe's own blocked GEMM -------------------------------------------------------------------

// Register tile of the micro-kernel: kMr rows x (2 vectors of 64 bytes) columns.
constexpr int kMr = 6;
template <class Acc>
constexpr int kNr = 2 * 64 / int(sizeof(Acc));
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
[[gnu::target_clones("avx512f", "avx2", "default")]] void micro_kernel_f32(int64_t kc, const float* ap, const float* bp,
                                                                           float* tile) {
  micro_kernel<float>(kc, ap, bp, tile);
}
[[gnu::target_clones("avx512f", "avx2", "default")]] void micro_kernel_f64(int64_t kc, const double* ap,
                                                                           const double* bp, double* tile) {
  micro_kernel<double>(kc, ap, bp, tile);
}
inline void micro(int64_t kc, const float* ap, const float* bp, float* tile) { micro_kernel_f32(kc, ap, bp, tile); }
inline void micro(int64_t kc, const double* ap, const double* bp, double* tile) { micro_kernel_f64(kc, ap, bp, tile); }

}  // namespace

template <class Acc>
void gemm_blocked(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const Acc* a, int64_t lda, const Acc* b,
                  int64_t ldb, Acc* c, int64_t ldc) {
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

template void gemm_blocked<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                                  float*, int64_t);
template void gemm_blocked<double>(bool, bool, int64_t, int64_t, int64_t, const double*, int64_t, const double*,
                                   int64_t, double*, int64_t);

}  // namespace smoe::cpu

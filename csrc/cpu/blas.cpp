// The BLAS glue of the CPU backend: gemm_serial (one single-threaded BLAS call, or gemm_blocked
// without a BLAS), the dense roof of the benchmarks and the BLAS's name (csrc/cpu/blas.h binds the
// symbols).
#include <algorithm>
#include <mutex>
#include <type_traits>

#include "cpu/blas.h"
#include "cpu/gemm.h"

namespace smoe::cpu {

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
void gemm_serial(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const Acc* a, int64_t lda, const Acc* b,
                 int64_t ldb, Acc* c, int64_t ldc) {
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
    SMOE_BLAS_FN(cblas_sgemm)
    (blas::kRowMajor, ta, tb, int(M), int(N), int(K), 1.f, a, int(lda), b, int(ldb), 0.f, c, int(ldc));
  } else {
    SMOE_BLAS_FN(cblas_dgemm)
    (blas::kRowMajor, ta, tb, int(M), int(N), int(K), 1.0, a, int(lda), b, int(ldb), 0.0, c, int(ldc));
  }
#else
  gemm_blocked<Acc>(trans_a, trans_b, M, N, K, a, lda, b, ldb, c, ldc);
#endif
}

template void gemm_serial<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                                 float*, int64_t);
template void gemm_serial<double>(bool, bool, int64_t, int64_t, int64_t, const double*, int64_t, const double*, int64_t,
                                  double*, int64_t);

void dense_sgemm_roof(int threads, int64_t M, int64_t N, int64_t K, const float* a, const float* b, float* c) {
#if SMOE_HAVE_BLAS
  blas_single_threaded();
  SMOE_BLAS_FN(openblas_set_num_threads)(threads);
  SMOE_BLAS_FN(cblas_sgemm)
  (blas::kRowMajor, blas::kNoTrans, blas::kNoTrans, int(M), int(N), int(K), 1.f, a, int(K), b, int(N), 0.f, c, int(N));
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

}  // namespace smoe::cpu

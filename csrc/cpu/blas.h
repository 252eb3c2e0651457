// csrc/cpu/blas.h: the few CBLAS / OpenBLAS entry points the CPU backend calls, declared here so that
// no cblas.h is needed. SMOE_BLAS_PREFIX (from cmake/SmoeBlas.cmake) is pasted in front of every
// symbol: empty for the system OpenBLAS, scipy_ for the scipy-openblas32 wheel.
#pragma once

#ifndef SMOE_HAVE_BLAS
#define SMOE_HAVE_BLAS 0
#endif

#if SMOE_HAVE_BLAS

#define SMOE_BLAS_CAT_(prefix, name) prefix##name
#define SMOE_BLAS_CAT(prefix, name) SMOE_BLAS_CAT_(prefix, name)
#define SMOE_BLAS_FN(name) SMOE_BLAS_CAT(SMOE_BLAS_PREFIX, name)

namespace smoe::cpu::blas {

// CBLAS enum values (the ABI passes them as int).
inline constexpr int kRowMajor = 101;
inline constexpr int kNoTrans = 111;
inline constexpr int kTrans = 112;

}  // namespace smoe::cpu::blas

extern "C" {
void SMOE_BLAS_FN(cblas_sgemm)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                               int lda, const float* b, int ldb, float beta, float* c, int ldc);
void SMOE_BLAS_FN(cblas_dgemm)(int order, int trans_a, int trans_b, int m, int n, int k, double alpha, const double* a,
                               int lda, const double* b, int ldb, double beta, double* c, int ldc);
void SMOE_BLAS_FN(openblas_set_num_threads)(int num_threads);
}

#endif  // SMOE_HAVE_BLAS

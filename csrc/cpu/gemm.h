// csrc/cpu/gemm.h: CPU backend of the grouped GEMMs (include/smoe/ops/gemm.h) and the dense GEMMs
// under them. The activations are csrc/cpu/activation.h (included here for the expert MLP).
//
// The entry points in csrc/core/gemm.cpp (and activation.cpp) validate shapes, dtypes and devices before calling these;
// the functions here check only what needs the data (the values of offsets).
#pragma once

#include <cstdint>

#include "cpu/activation.h"
#include "smoe/ops/gemm.h"

namespace smoe::cpu {

Status grouped_gemm(const GroupedGemmParams& params, const TensorView& a, const TensorView& b,
                    const TensorView& offsets, const TensorView& c);
Status grouped_gemm_wgrad(const TensorView& a, const TensorView& b, const TensorView& offsets, const TensorView& c);

// Row-major c[M, N] = op(a)[M, K] @ op(b)[K, N] (overwrites c; K == 0 gives zeros), on the calling
// thread. op(a) = a^T when trans_a (a is then [K, M]); op(b) = b^T when trans_b (b is then [N, K]).
// gemm_serial calls the BLAS when the build has one, else gemm_blocked: smoe's own cache-blocked GEMM,
// kept in the tree (and tested) as the fallback and the readable version.
// Acc is float or double. Per output element the reduction order is fixed by K alone, so the result
// does not depend on which rows or columns a caller asks for in one call.
template <class Acc>
void gemm_serial(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const Acc* a, int64_t lda, const Acc* b,
                 int64_t ldb, Acc* c, int64_t ldc);
template <class Acc>
void gemm_blocked(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const Acc* a, int64_t lda, const Acc* b,
                  int64_t ldb, Acc* c, int64_t ldc);

// smoe's own f32 GEMM for AVX-512F CPUs (gemm_avx512.cpp; Goto/BLIS packed panels, 12 x 32 register
// tile): the same contract as gemm_serial<float>, on the calling thread. Every output element is an FMA
// chain per K block of 384 (block sums added in order): the result depends on K alone, not on M, N,
// the tile or the thread. Call it only
// when sgemm_avx512_supported(); use_sgemm_avx512() also honours set_sgemm_avx512 (default on), which
// tests and benchmarks use to run the OpenBLAS path instead; it returns the old setting.
void sgemm_avx512(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* a, int64_t lda,
                  const float* b, int64_t ldb, float* c, int64_t ldc);
bool sgemm_avx512_supported();
bool use_sgemm_avx512();
bool set_sgemm_avx512(bool enabled);

// The dense roof of the benchmarks: one plain f32 GEMM c[M, N] = a[M, K] @ b[K, N] (row-major), run
// by the BLAS with its own `threads` threads (smoe's own blocked GEMM, single-threaded, without BLAS).
// Leaves the BLAS single-threaded again afterwards. blas_name() says which BLAS the build uses.
void dense_sgemm_roof(int threads, int64_t M, int64_t N, int64_t K, const float* a, const float* b, float* c);
const char* blas_name();

// Whether bf16 GEMMs may use the AVX512-BF16 dot-product kernel where the CPU has it (default true);
// false forces the f32-panel path. For tests and benchmarks of both paths; returns the old setting.
bool set_bf16_dot_product(bool enabled);

// grouped_gemm / grouped_gemm_wgrad for a caller that has run check_offsets on `offsets` (with R =
// a.size(0)) itself: the expert MLP checks its offsets once for all of its GEMMs.
Status grouped_gemm_prechecked(const GroupedGemmParams& params, const TensorView& a, const TensorView& b,
                               const TensorView& offsets, const TensorView& c);
Status grouped_gemm_wgrad_prechecked(const TensorView& a, const TensorView& b, const TensorView& offsets,
                                     const TensorView& c);

// Reads offsets [E+1] i64 and checks 0 <= offsets[0] <= ... <= offsets[E] <= R.
Status check_offsets(const char* op, const TensorView& offsets, int64_t R);

}  // namespace smoe::cpu

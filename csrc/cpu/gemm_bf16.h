// csrc/cpu/gemm_bf16.h: the bf16 GEMM kernel for CPUs with AVX512-BF16 (csrc/cpu/gemm_bf16.cpp),
// used by the grouped tiling (csrc/cpu/grouped_gemm.cpp) for whole expert segments.
#pragma once

#include <cstdint>

namespace smoe::cpu {

// A 16-bit operand seen as X(x, k) for x in rows (A) or columns (B): x-major p[x * ld + k] or
// k-major p[k * ld + x].
struct Operand16 {
  const uint16_t* p;
  int64_t ld;
  bool k_major;
};

// Whether the CPU has AVX512-BF16 (and set_bf16_dot_product has not turned the kernel off).
bool use_bf16_dp();

// c[M, N] (bf16, row stride ldc) = sum_k A(m, k) B(n, k), on the calling thread; K == 0 gives zeros.
// Per output element the sum runs over K blocks of 1024 in order, pairs in order within a block:
// fixed by K alone.
void gemm_bf16_dp(const Operand16& A, const Operand16& B, int64_t M, int64_t N, int64_t K, uint16_t* c, int64_t ldc);

}  // namespace smoe::cpu

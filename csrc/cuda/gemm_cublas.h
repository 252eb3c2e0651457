// csrc/cuda/gemm_cublas.h: the cuBLAS grouped GEMM — the baseline the tensor-core kernels are measured
// against, and a fallback for shapes they refuse (f32, columns that are not multiples of 8).
//
// Built only by nvcc, and only when CMake found cuBLAS (csrc/cuda/gemm_cublas.cmake; the
// compile definition SMOE_HAVE_CUBLAS=1 then reaches smoe_cuda's users): test SMOE_HAVE_CUBLAS before
// calling. The emulator has no cuBLAS, so there is no smoe::cuda_simt twin.
//
// NOT graph-capturable, NOT free of host synchronisation: cublasGemmGroupedBatchedEx takes the
// per-expert sizes in host arrays, so these launchers copy offsets [E+1] to the host and wait for the
// stream (cudaStreamSynchronize) before they enqueue the GEMM. Inside a CUDA-graph capture that
// synchronisation fails (cudaErrorStreamCaptureUnsupported), which the launchers report as an
// error. The graph-safe paths are the tensor-core kernels (gemm_tc.h) and grouped_gemm_naive.
// docs/kernels/grouped_gemm.md, "cuBLAS", says which cuBLASLt mode could lift this.
#pragma once

#include "smoe/smoe.h"

namespace smoe::cuda {

// Same contract as smoe::grouped_gemm (include/smoe/ops/gemm.h): a [R, Kd], b [E, N, Kd] (trans_b) or
// [E, Kd, N], offsets [E+1] i64 (device), c [R, N]; f32, bf16, f16 (f32 accumulation; f32 inputs use
// CUBLAS_COMPUTE_32F, i.e. no TF32).
Status grouped_gemm_cublas(const GroupedGemmParams& params, const TensorView& a, const TensorView& b,
                           const TensorView& offsets, const TensorView& c, void* stream);

// Same contract as smoe::grouped_gemm_wgrad: c[e] = a[seg_e]^T @ b[seg_e]; an empty segment is set to
// zeros with cudaMemsetAsync.
Status grouped_gemm_wgrad_cublas(const TensorView& a, const TensorView& b, const TensorView& offsets,
                                 const TensorView& c, void* stream);

}  // namespace smoe::cuda

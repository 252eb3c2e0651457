// csrc/cuda/gemm_wgmma.h: the sm_90a grouped GEMM (wgmma + TMA + mbarrier ring, warp-specialised;
// kernel in gemm_wgmma.cuh, design and performance model in docs/kernels/grouped_gemm_sm90.md).
//
// Declared for smoe::cuda (nvcc) and smoe::cuda_simt (the same source through the SIMT emulator).
// Not yet dispatched: the backend's grouped_gemm still runs grouped_gemm_tc (sm_80 path) everywhere.
//
// c[r] = a[r] @ b[e]^T for every row r of expert e's segment [offsets[e], offsets[e+1]).
//   a [R, Kd], b [E, N, Kd] (K-major, the nn.Linear layout), offsets [E+1] i64 (device), c [R, N];
//   bf16 or f16, f32 accumulation, plain store; rows past offsets[E] are left untouched.
// Refused with kUnsupported: other dtypes, b as [E, Kd, N], Kd or N not multiples of 8, rows not
// 16-byte aligned, a or b not contiguous in their last dimension, and (under nvcc) devices that are
// not sm_90 or a driver without cuTensorMapEncodeTiled.
#pragma once

#include "smoe/smoe.h"

#define SMOE_DETAIL_GEMM_WGMMA_DECLS                                                               \
  Status grouped_gemm_wgmma(const TensorView& a, const TensorView& b, const TensorView& offsets,   \
                            const TensorView& c, void* stream);

namespace smoe::cuda {
SMOE_DETAIL_GEMM_WGMMA_DECLS
}  // namespace smoe::cuda

namespace smoe::cuda_simt {
SMOE_DETAIL_GEMM_WGMMA_DECLS
}  // namespace smoe::cuda_simt

// csrc/cuda/gemm_wgmma.h: the sm_90a grouped GEMM (wgmma + TMA + mbarrier ring, warp-specialised;
// kernel in gemm_wgmma.cuh, design and performance model in docs/kernels/grouped_gemm_sm90.md).
//
// Declared for smoe::cuda (nvcc) and smoe::cuda_simt (the same source through the SIMT emulator).
// Dispatched from grouped_gemm_tc (gemm_tc.cu), and so from the backend's grouped_gemm and the
// expert MLP's fused first GEMM, when wgmma_selected() holds; what it refuses runs on the sm_80 kernel.
//
// grouped_gemm_wgmma takes grouped_gemm_tc's arguments with its meaning (gemm_tc.h): gathered rows
// through token_of_row, row weights, the plain / activation / gated-activation epilogues and pre.
// Refused with kUnsupported: dtypes other than bf16/f16, b as [E, Kd, N], Kd or N not multiples of 8
// (F for the gated form), rows of a or b not 16-byte aligned, b's experts not stacked as one
// [E * N, Kd] matrix, E * N beyond int32, and (under nvcc) a build without sm_90a code, a device
// that is not compute capability 9.0, or a driver without cuTensorMapEncodeTiled.
//
// wgmma_selected(): under nvcc, this build carries sm_90a code for the kernel (SMOE_HAVE_SM90A,
// set by csrc/cuda/CMakeLists.txt when 90 is among the CUDA architectures) and the current device
// is compute capability 9.0; under the emulator (whose device is 9.0), smoe::simt::options().sm90a
// (SMOE_SIMT_SM90A=1), off by default.
#pragma once

#include "gemm_tc.h"
#include "smoe/smoe.h"

#define SMOE_DETAIL_GEMM_WGMMA_DECLS                                                                                  \
  Status grouped_gemm_wgmma(const GroupedGemmTcParams& params, const TensorView& a, const TensorView& b,              \
                            const TensorView& offsets, const TensorView& token_of_row, const TensorView& row_weights, \
                            const TensorView& c, const TensorView& pre, void* stream);                                \
  bool wgmma_selected();

namespace smoe::cuda {
SMOE_DETAIL_GEMM_WGMMA_DECLS
}  // namespace smoe::cuda

namespace smoe::cuda_simt {
SMOE_DETAIL_GEMM_WGMMA_DECLS
}  // namespace smoe::cuda_simt

#undef SMOE_DETAIL_GEMM_WGMMA_DECLS

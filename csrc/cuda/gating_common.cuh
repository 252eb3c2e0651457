// csrc/cuda/gating_common.cuh: what the gating family's kernel files share (topk_gating.cu,
// expert_choice.cu, router_losses.cu): the warp-per-token launch shape, the row max / sum-of-exp of a
// warp and the shared-memory opt-in. Included after common.cuh, inside no namespace.
#pragma once

#include "common.cuh"

namespace smoe::SMOE_CUDA_NS {
namespace {

constexpr int kWarpsPerBlock = 4;                 // warp-per-token kernels: 4 tokens per block
constexpr int kRowThreads = 32 * kWarpsPerBlock;  // 128 threads: small blocks keep all SMs busy at small T

// Row max (NaN skipped) and sum of exp(x - max) of one row, every lane holding the results.
template <class In>
__device__ __forceinline__ void row_max_sumexp(const In* x, int32_t E, int lane, float* max_out, float* sum_out) {
  float m = -INFINITY;
  for (int e = lane; e < E; e += 32) m = fmaxf(m, to_float(x[e]));
  m = warp_max(m);
  float sum = 0.0f;
  for (int e = lane; e < E; e += 32) sum += expf(to_float(x[e]) - m);
  *max_out = m;
  *sum_out = warp_sum(sum);
}

// Dynamic shared memory above the 48 KiB default needs an opt-in per kernel (sm_70+).
template <class Kernel>
cudaError_t allow_smem(Kernel* kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

}  // namespace
}  // namespace smoe::SMOE_CUDA_NS

// csrc/cuda/gating_common.cuh: what the gating family's kernel files share (topk_gating.cu,
// expert_choice.cu, router_losses.cu, naive/topk_gating_v0.cu): the warp-per-token launch shape, the
// row max / sum-of-exp of a warp, the top-k forward kernels' arguments, the group score of
// group-limited routing and the shared-memory opt-in. Included after common.cuh, inside no namespace.
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

// The score of a group of G experts (group-limited routing, DeepSeek-V2 section 2.1.3) from its
// selection values v(0..G-1), NaN already mapped to -inf by the caller: the best value, or with
// top2sum the sum of the two best (NaN, from inf + -inf, ranks lowest; a group of one expert scores
// that expert alone). The warp, block and v0 top-k kernels all score groups with it.
template <class Value>
__device__ __forceinline__ float group_score(Value v, int G, bool top2sum) {
  float b1 = -INFINITY, b2 = -INFINITY;  // the best and second best
  for (int j = 0; j < G; ++j) {
    const float x = v(j);
    if (x > b1) {
      b2 = b1;
      b1 = x;
    } else if (x > b2) {
      b2 = x;
    }
  }
  if (!top2sum || G < 2) return b1;
  const float sum = b1 + b2;
  return sum == sum ? sum : -INFINITY;
}

// The arguments of the top-k forward kernels, v1 (topk_gating.cu) and v0 (naive/topk_gating_v0.cu).
struct TopkForwardArgs {
  const void* logits;  // [T, E] In, row stride logits_stride
  int64_t logits_stride;
  const float* bias;  // [E] or null
  float* weights;     // [T, K]
  int64_t weights_stride;
  int32_t* experts;  // [T, K]
  int64_t experts_stride;
  float* scores;  // [T, E]
  int64_t scores_stride;
  int64_t T;
  int32_t E, K;
  int32_t n_groups, topk_groups, group_size;
  int32_t smem_floats_per_warp;  // grouped routing: E keys + n_groups group keys + n_groups kept flags
  bool softmax, grouped, top2sum, renormalize;
  float renorm_eps, routed_scaling;
};

inline TopkForwardArgs topk_forward_args(const TopkGatingParams& p, const TensorView& logits, const TensorView& bias,
                                         const TensorView& weights, const TensorView& experts,
                                         const TensorView& scores) {
  const int64_t E = logits.size(1);
  TopkForwardArgs a{};
  a.logits = logits.data;
  a.logits_stride = logits.stride(0);
  a.bias = bias.defined() ? bias.data_as<const float>() : nullptr;
  a.weights = weights.data_as<float>();
  a.weights_stride = weights.stride(0);
  a.experts = experts.data_as<int32_t>();
  a.experts_stride = experts.stride(0);
  a.scores = scores.data_as<float>();
  a.scores_stride = scores.stride(0);
  a.T = logits.size(0);
  a.E = static_cast<int32_t>(E);
  a.K = p.top_k;
  a.n_groups = p.n_groups;
  a.topk_groups = p.topk_groups;
  a.group_size = static_cast<int32_t>(E / p.n_groups);
  a.grouped = p.topk_groups < p.n_groups;  // else every group is kept: plain top-k
  a.smem_floats_per_warp = a.grouped ? static_cast<int32_t>(E + 2 * p.n_groups) : 0;
  a.softmax = p.score_func == ScoreFunc::kSoftmax;
  a.top2sum = p.group_score == GroupScore::kTop2Sum;
  a.renormalize = p.renormalize;
  a.renorm_eps = p.renorm_eps;
  a.routed_scaling = p.routed_scaling;
  return a;
}

// Dynamic shared memory above the 48 KiB default needs an opt-in per kernel (sm_70+).
template <class Kernel>
cudaError_t allow_smem(Kernel* kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

}  // namespace
}  // namespace smoe::SMOE_CUDA_NS

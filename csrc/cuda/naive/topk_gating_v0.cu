// Top-k gating v0 (include/smoe/ops/gating.h): one thread per token, the simplest correct kernel.
// The first rung of the ladder (docs/kernels/gating.md); v1 is csrc/cuda/topk_gating.cu.
//
// A thread writes its row of scores to global memory, then makes K passes over that row, each pass
// keeping the best packed key below the previous pick (keys are distinct: ties go to the lower
// expert, as in every other backend). Group-limited routing first picks topk_groups groups the same
// way and masks the experts of the others. O(K * E) reads of the scores row per token.
#include "../common.cuh"
#include "../gating_common.cuh"
#include "naive.h"

namespace smoe::SMOE_CUDA_NS {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxGroups = 64;  // the kept groups are one 64-bit mask per thread

// Selection value of expert e: the score plus the balancing bias (the bias steers the choice only).
__device__ __forceinline__ float selection(const TopkForwardArgs& a, const float* s, int e) {
  return a.bias ? s[e] + a.bias[e] : s[e];
}

template <class In>
__global__ void __launch_bounds__(kThreads) topk_gating_forward_v0_kernel(TopkForwardArgs a) {
  // TEACH: one thread per token means neighbouring threads read rows E elements apart: every load of
  // a warp touches 32 different cache lines. v1 gives a row to a warp instead, so the 32 lanes read
  // 32 consecutive logits (one or two cache lines) and the reductions become warp shuffles.
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= a.T) return;
  const In* x = static_cast<const In*>(a.logits) + t * a.logits_stride;
  float* s = a.scores + t * a.scores_stride;
  const int E = a.E;

  // 1. Scores: softmax with the row max subtracted (no overflow), or sigmoid.
  if (a.softmax) {
    float m = -INFINITY;
    for (int e = 0; e < E; ++e) m = fmaxf(m, to_float(x[e]));
    float sum = 0.0f;
    for (int e = 0; e < E; ++e) sum += expf(to_float(x[e]) - m);
    for (int e = 0; e < E; ++e) s[e] = expf(to_float(x[e]) - m) / sum;
  } else {
    for (int e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + expf(-to_float(x[e])));
  }

  // 2. Group limit: keep the topk_groups best groups (ties to the lower group).
  // TEACH: the scores row is re-read from global memory (L1 at best) on every pass below. v1 keeps
  // the row in registers (E / 32 values a lane) and never reads it back.
  unsigned long long kept = ~0ull;
  const int G = a.grouped ? a.group_size : E;  // ungrouped: one group of all E experts
  if (a.grouped) {
    kept = 0;
    unsigned long long prev = ~0ull;
    for (int r = 0; r < a.topk_groups; ++r) {
      unsigned long long best = kExcludedKey;
      for (int g = 0; g < a.n_groups; ++g) {
        const float score = group_score(
            [&](int j) {
              const float v = selection(a, s, g * G + j);
              return v == v ? v : -INFINITY;  // NaN ranks lowest
            },
            G, a.top2sum);
        const unsigned long long key = pack_key(score, static_cast<uint32_t>(g));
        if (key < prev && key > best) best = key;
      }
      kept |= 1ull << key_index(best);
      prev = best;
    }
  }

  // 3. K picks, best first: each pass finds the best key strictly below the previous pick.
  // TEACH: K passes of E is O(K * E) work per token; v1 does K rounds of a warp argmax over registers
  // (E / 32 compares and 5 shuffles a round).
  int32_t* ei = a.experts + t * a.experts_stride;
  float* w = a.weights + t * a.weights_stride;
  unsigned long long prev = ~0ull;
  for (int k = 0; k < a.K; ++k) {
    unsigned long long best = kExcludedKey;
    for (int e = 0; e < E; ++e) {
      if (!((kept >> (e / G)) & 1ull)) continue;
      const unsigned long long key = pack_key(selection(a, s, e), static_cast<uint32_t>(e));
      if (key < prev && key > best) best = key;
    }
    prev = best;
    ei[k] = static_cast<int32_t>(key_index(best));
    w[k] = s[ei[k]];
  }
  // 4. Weights: the unbiased scores of the picks, renormalised over the K, then scaled.
  if (a.renormalize) {
    float sum = 0.0f;
    for (int k = 0; k < a.K; ++k) sum += w[k];
    const float denom = sum + a.renorm_eps;
    for (int k = 0; k < a.K; ++k) w[k] = w[k] / denom;
  }
  for (int k = 0; k < a.K; ++k) w[k] = w[k] * a.routed_scaling;
}

}  // namespace

Status topk_gating_forward_v0(const TopkGatingParams& p, const TensorView& logits, const TensorView& bias,
                              const TensorView& weights, const TensorView& experts, const TensorView& scores,
                              void* stream) {
  const char* op = "topk_gating_forward";
  const int64_t T = logits.size(0);
  if (p.topk_groups < p.n_groups && p.n_groups > kMaxGroups) {
    return unsupported(op, "n_groups = " + std::to_string(p.n_groups) +
                               " with the naive v0 kernel, which keeps "
                               "the groups in a 64-bit mask (n_groups <= 64); use kernel version 1");
  }
  if (T == 0) return Status::Ok();
  const TopkForwardArgs a = topk_forward_args(p, logits, bias, weights, experts, scores);
  const cudaStream_t s = as_stream(stream);
  return dispatch_float(logits.dtype, op, [&](auto tag) -> Status {
    auto* kernel = &topk_gating_forward_v0_kernel<typename decltype(tag)::type>;
    // one thread per token
    SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, dim3(static_cast<unsigned>(ceil_div(T, kThreads))), dim3(kThreads), 0, s, a));
    return Status::Ok();
  });
}

}  // namespace smoe::SMOE_CUDA_NS

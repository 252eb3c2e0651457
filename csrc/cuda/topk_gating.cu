// CUDA backend of top-k gating (include/smoe/ops/gating.h): the router's softmax / sigmoid, the
// optional group limit and the K picks per token, and their backward.
//
// Versions (docs/kernels/gating.md has the bytes and FLOPs):
//  v0 (csrc/cuda/naive/topk_gating_v0.cu): one thread per token, K passes over the row in global
//     memory; selected by set_kernel_version(KernelOp::kTopkGating, 0) (docs/cuda.md).
//  v1 (this file) topk_gating: ONE fused kernel per token row, one warp per token. Each lane holds
//     E/32 scores in registers (E <= 512), so logits are read once and scores written once: the
//     kernel moves T*E*(sizeof(logit) + 4) + T*K*8 bytes, the minimum. Top-k is K rounds of a warp
//     argmax over packed 64-bit keys (ordered score << 32 | ~index): one unsigned max ranks by score
//     and breaks ties to the lower index, so the result does not depend on the reduction order.
//     Group-limited routing stages the keys of a row in shared memory so each lane scores whole
//     groups in the CPU's order (bit-identical group keys for identical scores).
//  v1b topk_gating for 512 < E <= 8192: one block per token. The row's packed keys and scores live
//     in shared memory (12 bytes an expert); the softmax, the group limit and the K argmax rounds are
//     block reductions (warp butterflies, then the warp partials in a fixed order). Same bytes as v1;
//     K block barriers a token instead of none, which is cheap next to E exps when E is large.
// The CPU backend (csrc/cpu/gating.cpp) is the reference: a row per iteration, insertion top-k.
#include "backend.h"
#include "common.cuh"
#include "gating_common.cuh"
#include "naive/naive.h"

namespace smoe::SMOE_CUDA_NS {
namespace {

constexpr int kMaxItems = 16;          // register-resident top-k: E <= 32 * 16 = 512
constexpr int kRowBlockThreads = 256;  // block-per-token top-k (E > 512): 8 warps a token
constexpr int kRowBlockWarps = kRowBlockThreads / 32;
constexpr int kMaxBlockExperts = 8192;  // 12 B an expert of smem: 96 KiB (+ groups) fits sm_80's 163 KiB

// ---- topk_gating forward --------------------------------------------------------------------------

// one warp per token; lane l holds experts e = 32 i + l (coalesced loads), i < kItems.
template <class In, int kItems>
__global__ void __launch_bounds__(kRowThreads) topk_gating_forward_kernel(TopkForwardArgs a) {
  SMOE_DYNAMIC_SMEM(float, smem);
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= a.T) return;  // the whole warp leaves together; the kernel has no block barrier

  const In* x = static_cast<const In*>(a.logits) + t * a.logits_stride;
  float s[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int e = 32 * i + lane;
    s[i] = e < a.E ? to_float(x[e]) : -INFINITY;
  }
  // Scores: softmax with the row max subtracted (no overflow), or sigmoid.
  if (a.softmax) {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < kItems; ++i) m = fmaxf(m, s[i]);
    m = warp_max(m);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int e = 32 * i + lane;
      s[i] = e < a.E ? expf(s[i] - m) : 0.0f;
      sum += s[i];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < kItems; ++i) s[i] = s[i] / sum;
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) s[i] = 1.0f / (1.0f + expf(-s[i]));
  }
  float* so = a.scores + t * a.scores_stride;
  unsigned long long key[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int e = 32 * i + lane;
    if (e < a.E) {
      so[e] = s[i];
      // The balancing bias steers the selection only (DeepSeek-V3 section 2.1.2).
      key[i] = pack_key(a.bias ? s[i] + a.bias[e] : s[i], static_cast<uint32_t>(e));
    } else {
      key[i] = kExcludedKey;
    }
  }

  if (a.grouped) {
    // Group-limited routing (DeepSeek-V2 section 2.1.3, V3 section 2.1.2): score the n_groups groups of
    // group_size consecutive experts, keep the topk_groups best (ties: lower group), exclude the rest.
    float* kw = smem + static_cast<int64_t>(warp) * a.smem_floats_per_warp;  // [E] selection keys
    float* gk = kw + a.E;                                                    // [n_groups] group keys
    float* kept = gk + a.n_groups;                                           // [n_groups] 1 = kept
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int e = 32 * i + lane;
      if (e < a.E) {
        float v = a.bias ? s[i] + a.bias[e] : s[i];
        kw[e] = v == v ? v : -INFINITY;  // NaN ranks lowest, as in the CPU backend's rank_key
      }
    }
    __syncwarp();
    const int G = a.group_size;
    for (int g = lane; g < a.n_groups; g += 32) {
      const float* k = kw + static_cast<int64_t>(g) * G;
      gk[g] = group_score([&](int j) { return k[j]; }, G, a.top2sum);
      kept[g] = 0.0f;
    }
    // Group g is read and marked only by lane g % 32 until the __syncwarp below.
    for (int r = 0; r < a.topk_groups; ++r) {
      unsigned long long best = kExcludedKey;
      for (int g = lane; g < a.n_groups; g += 32) {
        if (kept[g] == 0.0f) {
          const unsigned long long k = pack_key(gk[g], static_cast<uint32_t>(g));
          best = k > best ? k : best;
        }
      }
      best = warp_max_u64(best);
      const uint32_t g = key_index(best);
      if (static_cast<int>(g & 31u) == lane) kept[g] = 1.0f;
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int e = 32 * i + lane;
      if (e < a.E && kept[e / G] == 0.0f) key[i] = kExcludedKey;
    }
  }

  // K rounds of warp argmax; pick k is kept by lane k % 32 in slot k / 32.
  float sel_w[kItems];
  int32_t sel_e[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    sel_w[i] = 0.0f;
    sel_e[i] = 0;
  }
  float sum = 0.0f;  // sum of the picked scores in pick order, as the CPU backend adds them
  // TEACH: one 64-bit max carries both the score and the tie rule, so the 5-step butterfly needs no
  // second pass for the index and no comparison of (score, index) pairs; the v0 kernel spends a
  // whole pass over the row per pick instead.
  for (int k = 0; k < a.K; ++k) {
    unsigned long long best = key[0];
#pragma unroll
    for (int i = 1; i < kItems; ++i) best = key[i] > best ? key[i] : best;
    best = warp_max_u64(best);
    const uint32_t e = key_index(best);  // in [0, E): validation guarantees K candidates
    float mine = 0.0f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (static_cast<uint32_t>(32 * i + lane) == e) {
        mine = s[i];
        key[i] = kExcludedKey;
      }
    }
    const float w = __shfl_sync(kFullMask, mine, static_cast<int>(e & 31u));
    sum += w;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (32 * i + lane == k) {
        sel_w[i] = w;
        sel_e[i] = static_cast<int32_t>(e);
      }
    }
  }
  const float denom = sum + a.renorm_eps;
  float* wo = a.weights + t * a.weights_stride;
  int32_t* eo = a.experts + t * a.experts_stride;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int k = 32 * i + lane;
    if (k < a.K) {
      float w = sel_w[i];
      if (a.renormalize) w = w / denom;
      w = w * a.routed_scaling;
      wo[k] = w;
      eo[k] = sel_e[i];
    }
  }
}

// ---- topk_gating forward, block per token (E > 512) ----------------------------------------------

// Block reductions of the block-per-token kernels: a warp butterfly, then every thread combines the
// kRowBlockWarps partials in warp order (a fixed order: deterministic). part is reused by the next
// call only after the trailing barrier.
__device__ __forceinline__ float row_block_sum(float v, float* part) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = part[0];
  for (int w = 1; w < kRowBlockWarps; ++w) r += part[w];
  __syncthreads();
  return r;
}
__device__ __forceinline__ float row_block_max(float v, float* part) {
  v = warp_max(v);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = part[0];
  for (int w = 1; w < kRowBlockWarps; ++w) r = fmaxf(r, part[w]);
  __syncthreads();
  return r;
}
__device__ __forceinline__ unsigned long long row_block_max_u64(unsigned long long v, unsigned long long* part) {
  v = warp_max_u64(v);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  unsigned long long r = part[0];
  for (int w = 1; w < kRowBlockWarps; ++w) r = part[w] > r ? part[w] : r;
  __syncthreads();
  return r;
}

// One block per token; thread i owns experts e = i + kRowBlockThreads * j. Same rules as the warp
// kernel: packed keys, NaN like -inf, group scores in the CPU's order, picks summed in pick order.
template <class In>
__global__ void __launch_bounds__(kRowBlockThreads) topk_gating_forward_block_kernel(TopkForwardArgs a) {
  SMOE_DYNAMIC_SMEM(unsigned long long, key);      // [E] selection keys (0 = excluded)
  float* s = reinterpret_cast<float*>(key + a.E);  // [E] scores
  float* gk = s + a.E;                             // [n_groups] group keys (grouped only)
  float* kept = gk + a.n_groups;                   // [n_groups] 1 = kept
  __shared__ float fpart[kRowBlockWarps];
  __shared__ unsigned long long kpart[kRowBlockWarps];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t t = blockIdx.x;
  const In* x = static_cast<const In*>(a.logits) + t * a.logits_stride;
  if (a.softmax) {
    float m = -INFINITY;
    for (int e = tid; e < a.E; e += kRowBlockThreads) {
      s[e] = to_float(x[e]);
      m = fmaxf(m, s[e]);
    }
    m = row_block_max(m, fpart);
    float sum = 0.0f;
    for (int e = tid; e < a.E; e += kRowBlockThreads) {
      s[e] = expf(s[e] - m);
      sum += s[e];
    }
    sum = row_block_sum(sum, fpart);
    for (int e = tid; e < a.E; e += kRowBlockThreads) s[e] = s[e] / sum;
  } else {
    for (int e = tid; e < a.E; e += kRowBlockThreads) s[e] = 1.0f / (1.0f + expf(-to_float(x[e])));
  }
  float* so = a.scores + t * a.scores_stride;
  for (int e = tid; e < a.E; e += kRowBlockThreads) {
    so[e] = s[e];
    key[e] = pack_key(a.bias ? s[e] + a.bias[e] : s[e], static_cast<uint32_t>(e));
  }
  __syncthreads();

  if (a.grouped) {  // as the warp kernel: DeepSeek-V2 section 2.1.3, V3 section 2.1.2
    const int G = a.group_size;
    for (int g = tid; g < a.n_groups; g += kRowBlockThreads) {
      gk[g] = group_score(
          [&](int j) {
            const int e = g * G + j;
            const float v = a.bias ? s[e] + a.bias[e] : s[e];
            return v == v ? v : -INFINITY;
          },
          G, a.top2sum);
      kept[g] = 0.0f;
    }
    // group g is read and marked only by thread g % kRowBlockThreads between the barriers
    for (int r = 0; r < a.topk_groups; ++r) {
      unsigned long long best = kExcludedKey;
      for (int g = tid; g < a.n_groups; g += kRowBlockThreads) {
        if (kept[g] == 0.0f) {
          const unsigned long long k = pack_key(gk[g], static_cast<uint32_t>(g));
          best = k > best ? k : best;
        }
      }
      best = row_block_max_u64(best, kpart);
      const int g = static_cast<int>(key_index(best));
      if (g % kRowBlockThreads == tid) kept[g] = 1.0f;
    }
    __syncthreads();
    for (int e = tid; e < a.E; e += kRowBlockThreads) {
      if (kept[e / G] == 0.0f) key[e] = kExcludedKey;
    }
    __syncthreads();
  }

  float* wo = a.weights + t * a.weights_stride;
  int32_t* eo = a.experts + t * a.experts_stride;
  // K rounds of block argmax; thread 0 writes the picks and sums them in pick order (the CPU's order)
  float sum = 0.0f;
  for (int k = 0; k < a.K; ++k) {
    unsigned long long best = kExcludedKey;
    for (int e = tid; e < a.E; e += kRowBlockThreads) best = key[e] > best ? key[e] : best;
    best = row_block_max_u64(best, kpart);
    const int e = static_cast<int>(key_index(best));         // in [0, E): validation guarantees K candidates
    if (e % kRowBlockThreads == tid) key[e] = kExcludedKey;  // only the owner reads key[e] again
    if (tid == 0) {
      sum += s[e];
      wo[k] = s[e];
      eo[k] = e;
    }
  }
  if (tid == 0) {
    const float denom = sum + a.renorm_eps;
    for (int k = 0; k < a.K; ++k) {
      float w = wo[k];
      if (a.renormalize) w = w / denom;
      wo[k] = w * a.routed_scaling;
    }
  }
}

// ---- topk_gating backward ---------------------------------------------------------------------------

struct TopkBackwardArgs {
  const float* scores;  // [T, E]
  int64_t scores_stride;
  const int32_t* experts;  // [T, K]
  int64_t experts_stride;
  const float* grad_weights;  // [T, K] or null
  int64_t grad_weights_stride;
  const float* grad_scores;  // [T, E] or null
  int64_t grad_scores_stride;
  float* grad_logits;  // [T, E]
  int64_t grad_logits_stride;
  int64_t T;
  int32_t E, K;
  bool softmax, renormalize;
  float renorm_eps, routed_scaling;
};

// one warp per token, lane l holds experts 32 i + l; picks outside [0, E) are skipped (device rule).
// The renormalisation terms of the top-k backward, shared by the warp and block kernels:
// w_k = c s_k / D, D = sum_j s_j + eps over the picks, so dL/ds_i = c (dw_i / D - <dw, s> / D^2).
// The sums run sequentially in the CPU backend's order (every calling thread gets the same bits).
__device__ __forceinline__ void renorm_backward_terms(const TopkBackwardArgs& a, const int32_t* ei, const float* dw,
                                                      const float* sr, float* denom, float* common) {
  float sum = 0.0f, dot = 0.0f;
  for (int k = 0; k < a.K; ++k) {
    const int32_t e = ei[k];
    if (e >= 0 && e < a.E) sum += sr[e];
  }
  for (int k = 0; k < a.K; ++k) {
    const int32_t e = ei[k];
    if (e >= 0 && e < a.E) dot += dw[k] * sr[e];
  }
  *denom = sum + a.renorm_eps;
  *common = dot / (*denom * *denom);
}

template <int kItems>
__global__ void __launch_bounds__(kRowThreads) topk_gating_backward_kernel(TopkBackwardArgs a) {
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= a.T) return;
  const float* sr = a.scores + t * a.scores_stride;
  const float* gsr = a.grad_scores ? a.grad_scores + t * a.grad_scores_stride : nullptr;
  float s[kItems], g[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int e = 32 * i + lane;
    s[i] = e < a.E ? sr[e] : 0.0f;
    g[i] = (e < a.E && gsr) ? gsr[e] : 0.0f;
  }
  if (a.grad_weights) {
    const int32_t* ei = a.experts + t * a.experts_stride;
    const float* dw = a.grad_weights + t * a.grad_weights_stride;
    float denom = 1.0f, common = 0.0f;
    if (a.renormalize) renorm_backward_terms(a, ei, dw, sr, &denom, &common);
    for (int k = 0; k < a.K; ++k) {
      const int32_t e = ei[k];
      if (e < 0 || e >= a.E) continue;
      const float c = a.renormalize ? a.routed_scaling * (dw[k] / denom - common) : a.routed_scaling * dw[k];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (32 * i + lane == e) g[i] += c;
      }
    }
  }
  float* out = a.grad_logits + t * a.grad_logits_stride;
  if (a.softmax) {  // dx = s * (g - <g, s>)
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) dot += g[i] * s[i];
    dot = warp_sum(dot);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int e = 32 * i + lane;
      if (e < a.E) out[e] = s[i] * (g[i] - dot);
    }
  } else {  // dx = g * s * (1 - s)
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int e = 32 * i + lane;
      if (e < a.E) out[e] = g[i] * s[i] * (1.0f - s[i]);
    }
  }
}

// Block per token (E > 512): grad_scores (or 0) into shared memory, thread 0 adds the picks' terms
// in k order (the CPU's sums), then the softmax / sigmoid backward with a block dot product.
__global__ void __launch_bounds__(kRowBlockThreads) topk_gating_backward_block_kernel(TopkBackwardArgs a) {
  SMOE_DYNAMIC_SMEM(float, g);  // [E]
  __shared__ float fpart[kRowBlockWarps];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t t = blockIdx.x;
  const float* sr = a.scores + t * a.scores_stride;
  const float* gsr = a.grad_scores ? a.grad_scores + t * a.grad_scores_stride : nullptr;
  for (int e = tid; e < a.E; e += kRowBlockThreads) g[e] = gsr ? gsr[e] : 0.0f;
  __syncthreads();
  if (a.grad_weights && tid == 0) {
    const int32_t* ei = a.experts + t * a.experts_stride;
    const float* dw = a.grad_weights + t * a.grad_weights_stride;
    float denom = 1.0f, common = 0.0f;
    if (a.renormalize) renorm_backward_terms(a, ei, dw, sr, &denom, &common);
    for (int k = 0; k < a.K; ++k) {
      const int32_t e = ei[k];
      if (e < 0 || e >= a.E) continue;
      g[e] += a.renormalize ? a.routed_scaling * (dw[k] / denom - common) : a.routed_scaling * dw[k];
    }
  }
  __syncthreads();
  float* out = a.grad_logits + t * a.grad_logits_stride;
  if (a.softmax) {  // dx = s * (g - <g, s>)
    float dot = 0.0f;
    for (int e = tid; e < a.E; e += kRowBlockThreads) dot += g[e] * sr[e];
    dot = row_block_sum(dot, fpart);
    for (int e = tid; e < a.E; e += kRowBlockThreads) out[e] = sr[e] * (g[e] - dot);
  } else {  // dx = g * s * (1 - s)
    for (int e = tid; e < a.E; e += kRowBlockThreads) out[e] = g[e] * sr[e] * (1.0f - sr[e]);
  }
}
// ---- host helpers -----------------------------------------------------------------------------------

// Smallest supported items-per-lane count for E experts: 1, 2, 4, 8 or 16.
int items_for(int64_t E) {
  int items = 1;
  while (32 * items < E) items *= 2;
  return items;
}

Status too_many_experts(const char* op, int64_t E) {
  return unsupported(op, "E = " + std::to_string(E) +
                             " experts; the CUDA backend keeps a row in one block's shared "
                             "memory and supports E <= " +
                             std::to_string(kMaxBlockExperts) + " (use backend 'cpu')");
}

template <class In>
Status launch_topk_forward_block(const TopkForwardArgs& a, cudaStream_t stream) {
  auto* kernel = &topk_gating_forward_block_kernel<In>;
  // keys [E] u64 + scores [E] f32 (+ 2 n_groups f32): <= 96 KiB + 64 KiB for E <= 8192
  const size_t smem = 12 * static_cast<size_t>(a.E) + (a.grouped ? 8 * static_cast<size_t>(a.n_groups) : 0);
  SMOE_CUDA_CHECK(allow_smem(kernel, smem));
  // one block per token: E > 512 does not fit one warp's registers
  SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, dim3(static_cast<unsigned>(a.T)), dim3(kRowBlockThreads), smem, stream, a));
  return Status::Ok();
}

Status launch_topk_backward_block(const TopkBackwardArgs& a, cudaStream_t stream) {
  const size_t smem = sizeof(float) * static_cast<size_t>(a.E);  // <= 32 KiB
  // one block per token: E > 512
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&topk_gating_backward_block_kernel, dim3(static_cast<unsigned>(a.T)),
                              dim3(kRowBlockThreads), smem, stream, a));
  return Status::Ok();
}

template <class In, int kItems>
Status launch_topk_forward(const TopkForwardArgs& a, size_t smem, cudaStream_t stream) {
  auto* kernel = &topk_gating_forward_kernel<In, kItems>;
  // one warp per token, kWarpsPerBlock tokens per block: E <= 32 * kItems values per lane in registers
  const dim3 grid(static_cast<unsigned>(ceil_div(a.T, kWarpsPerBlock)));
  SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, grid, dim3(kRowThreads), smem, stream, a));
  return Status::Ok();
}

template <int kItems>
Status launch_topk_backward(const TopkBackwardArgs& a, cudaStream_t stream) {
  auto* kernel = &topk_gating_backward_kernel<kItems>;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.T, kWarpsPerBlock)));  // one warp per token
  SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, grid, dim3(kRowThreads), 0, stream, a));
  return Status::Ok();
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------------

Status topk_gating_forward(const TopkGatingParams& p, const TensorView& logits, const TensorView& bias,
                           const TensorView& weights, const TensorView& experts, const TensorView& scores,
                           void* stream) {
  if (kernel_version(KernelOp::kTopkGating) == 0) {
    return topk_gating_forward_v0(p, logits, bias, weights, experts, scores, stream);
  }
  const char* op = "topk_gating_forward";
  const int64_t T = logits.size(0), E = logits.size(1);
  if (E > kMaxBlockExperts) return too_many_experts(op, E);
  if (T == 0) return Status::Ok();
  const TopkForwardArgs a = topk_forward_args(p, logits, bias, weights, experts, scores);
  const size_t smem = sizeof(float) * static_cast<size_t>(a.smem_floats_per_warp) * kWarpsPerBlock;  // <= 24 KiB
  const cudaStream_t s = as_stream(stream);
  return dispatch_float(logits.dtype, op, [&](auto tag) -> Status {
    using In = typename decltype(tag)::type;
    if (E > 32 * kMaxItems) return launch_topk_forward_block<In>(a, s);
    switch (items_for(E)) {
      case 1:
        return launch_topk_forward<In, 1>(a, smem, s);
      case 2:
        return launch_topk_forward<In, 2>(a, smem, s);
      case 4:
        return launch_topk_forward<In, 4>(a, smem, s);
      case 8:
        return launch_topk_forward<In, 8>(a, smem, s);
      default:
        return launch_topk_forward<In, 16>(a, smem, s);
    }
  });
}

Status topk_gating_backward(const TopkGatingParams& p, const TensorView& scores, const TensorView& experts,
                            const TensorView& grad_weights, const TensorView& grad_scores,
                            const TensorView& grad_logits, void* stream) {
  const char* op = "topk_gating_backward";
  const int64_t T = scores.size(0), E = scores.size(1);
  if (scores.dtype == DType::kF64) return f64_unsupported(op);
  if (E > kMaxBlockExperts) return too_many_experts(op, E);
  if (T == 0) return Status::Ok();
  TopkBackwardArgs a{};
  a.scores = scores.data_as<const float>();
  a.scores_stride = scores.stride(0);
  a.experts = experts.data_as<const int32_t>();
  a.experts_stride = experts.stride(0);
  a.grad_weights = grad_weights.defined() ? grad_weights.data_as<const float>() : nullptr;
  a.grad_weights_stride = grad_weights.defined() ? grad_weights.stride(0) : 0;
  a.grad_scores = grad_scores.defined() ? grad_scores.data_as<const float>() : nullptr;
  a.grad_scores_stride = grad_scores.defined() ? grad_scores.stride(0) : 0;
  a.grad_logits = grad_logits.data_as<float>();
  a.grad_logits_stride = grad_logits.stride(0);
  a.T = T;
  a.E = static_cast<int32_t>(E);
  a.K = p.top_k;
  a.softmax = p.score_func == ScoreFunc::kSoftmax;
  a.renormalize = p.renormalize;
  a.renorm_eps = p.renorm_eps;
  a.routed_scaling = p.routed_scaling;
  const cudaStream_t s = as_stream(stream);
  if (E > 32 * kMaxItems) return launch_topk_backward_block(a, s);
  switch (items_for(E)) {
    case 1:
      return launch_topk_backward<1>(a, s);
    case 2:
      return launch_topk_backward<2>(a, s);
    case 4:
      return launch_topk_backward<4>(a, s);
    case 8:
      return launch_topk_backward<8>(a, s);
    default:
      return launch_topk_backward<16>(a, s);
  }
}
}  // namespace smoe::SMOE_CUDA_NS

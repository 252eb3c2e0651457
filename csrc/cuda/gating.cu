// CUDA backend of the gating op family: top-k gating, expert choice, the switch load-balancing loss,
// the router z-loss and the aux-loss-free bias update (include/smoe/ops/gating.h).
//
// Versions (docs/kernels/gating.md has the bytes and FLOPs):
//  v0 (the CPU backend, csrc/cpu/topk_gating.cpp): a row per iteration, insertion top-k.
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
//  expert_choice: a score pass (warp per token) then one block per expert that bitonic-sorts the
//     packed keys of its column in shared memory (T <= 16384) and keeps the first C. For larger T
//     the block first finds the C-th best key of the column by a radix select (common.cuh), gathers
//     the C keys >= it, and sorts only those (C <= 16384).
//  losses: deterministic two-pass reductions (per-block partials in a stream-ordered scratch buffer,
//     then one block sums them in a fixed order); expert counts use integer atomics, whose result
//     does not depend on their order. No float atomics anywhere.
#include "backend.h"
#include "common.cuh"

namespace smoe::SMOE_CUDA_NS {
namespace {

constexpr int kWarpsPerBlock = 4;                 // warp-per-token kernels: 4 tokens per block
constexpr int kRowThreads = 32 * kWarpsPerBlock;  // 128 threads: small blocks keep all SMs busy at small T
constexpr int kMaxItems = 16;                     // register-resident top-k: E <= 32 * 16 = 512
constexpr int kMaxExpertChoiceTokens = 16384;     // bitonic sort of T packed keys in <= 128 KiB of smem
constexpr int kSortThreads = 512;
constexpr int kRowBlockThreads = 256;             // block-per-token top-k (E > 512): 8 warps a token
constexpr int kRowBlockWarps = kRowBlockThreads / 32;
constexpr int kMaxBlockExperts = 8192;            // 12 B an expert of smem: 96 KiB (+ groups) fits sm_80's 163 KiB

// ---- topk_gating forward --------------------------------------------------------------------------

struct TopkForwardArgs {
  const void* logits;  // [T, E] In, row stride logits_stride
  int64_t logits_stride;
  const float* bias;   // [E] or null
  float* weights;      // [T, K]
  int64_t weights_stride;
  int32_t* experts;    // [T, K]
  int64_t experts_stride;
  float* scores;       // [T, E]
  int64_t scores_stride;
  int64_t T;
  int32_t E, K;
  int32_t n_groups, topk_groups, group_size;
  int32_t smem_floats_per_warp;  // grouped routing: E keys + n_groups group keys + n_groups kept flags
  bool softmax, grouped, top2sum, renormalize;
  float renorm_eps, routed_scaling;
};

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
      float score;
      if (!a.top2sum) {
        score = k[0];
        for (int j = 1; j < G; ++j) score = k[j] > score ? k[j] : score;
      } else {  // sum of the two best; a group of one expert scores that expert alone
        float b1 = -INFINITY, b2 = -INFINITY;
        for (int j = 0; j < G; ++j) {
          if (k[j] > b1) {
            b2 = b1;
            b1 = k[j];
          } else if (k[j] > b2) {
            b2 = k[j];
          }
        }
        if (G >= 2) {
          score = b1 + b2;
          score = score == score ? score : -INFINITY;
        } else {
          score = b1;
        }
      }
      gk[g] = score;
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
  SMOE_DYNAMIC_SMEM(unsigned long long, key);                // [E] selection keys (0 = excluded)
  float* s = reinterpret_cast<float*>(key + a.E);             // [E] scores
  float* gk = s + a.E;                                       // [n_groups] group keys (grouped only)
  float* kept = gk + a.n_groups;                             // [n_groups] 1 = kept
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
      float b1 = -INFINITY, b2 = -INFINITY, mx = -INFINITY;
      for (int j = 0; j < G; ++j) {
        const int e = g * G + j;
        float v = a.bias ? s[e] + a.bias[e] : s[e];
        v = v == v ? v : -INFINITY;
        if (j == 0 || v > mx) mx = v;
        if (v > b1) {
          b2 = b1;
          b1 = v;
        } else if (v > b2) {
          b2 = v;
        }
      }
      float score = mx;
      if (a.top2sum) {
        if (G >= 2) {
          score = b1 + b2;
          score = score == score ? score : -INFINITY;
        } else {
          score = b1;
        }
      }
      gk[g] = score;
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
    const int e = static_cast<int>(key_index(best));  // in [0, E): validation guarantees K candidates
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

// ---- warp-per-row score pass for any E (expert choice, z-loss) ------------------------------------

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

struct ScoreRowsArgs {
  const void* logits;  // [T, E] In
  int64_t logits_stride;
  float* scores;  // [T, E]
  int64_t scores_stride;
  int32_t* row_of;  // [T, E]: set to -1 (expert choice: "not chosen")
  int64_t row_of_stride;
  float* weights;  // [T, E]: set to 0
  int64_t weights_stride;
  int64_t T;
  int32_t E;
  bool softmax;
};

// one warp per token; three passes over the row (max, sum, write) hit L1 after the first.
template <class In>
__global__ void __launch_bounds__(kRowThreads) expert_choice_scores_kernel(ScoreRowsArgs a) {
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= a.T) return;
  const In* x = static_cast<const In*>(a.logits) + t * a.logits_stride;
  float* so = a.scores + t * a.scores_stride;
  int32_t* ro = a.row_of + t * a.row_of_stride;
  float* wo = a.weights + t * a.weights_stride;
  if (a.softmax) {
    float m, sum;
    row_max_sumexp(x, a.E, lane, &m, &sum);
    for (int e = lane; e < a.E; e += 32) so[e] = expf(to_float(x[e]) - m) / sum;
  } else {
    for (int e = lane; e < a.E; e += 32) so[e] = 1.0f / (1.0f + expf(-to_float(x[e])));
  }
  for (int e = lane; e < a.E; e += 32) {
    ro[e] = -1;
    wo[e] = 0.0f;
  }
}

// Bitonic sort (Batcher 1968) of N = 2^n keys in shared memory, descending; log2(N)*(log2(N)+1)/2
// stages of N/2 compare-exchanges, each followed by a block barrier.
__device__ void block_bitonic_sort_desc(unsigned long long* keys, int32_t N) {
  for (int k = 2; k <= N; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < N; i += blockDim.x) {
        const int p = i ^ j;
        if (p > i) {
          const unsigned long long u = keys[i], v = keys[p];
          // descending where bit k of i is 0, ascending elsewhere: the final merge (k = N) is descending
          const bool swap = (i & k) == 0 ? u < v : u > v;
          if (swap) {
            keys[i] = v;
            keys[p] = u;
          }
        }
      }
      __syncthreads();
    }
  }
}

// The first C sorted keys of expert e: tokens[e, :], row_of and weights of the chosen tokens.
__device__ void write_expert_choice(const unsigned long long* keys, const float* scores, int64_t scores_stride,
                                    int64_t e, int32_t C, int32_t* tokens, int64_t tokens_stride, int32_t* row_of,
                                    int64_t row_of_stride, float* weights, int64_t weights_stride) {
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const int64_t t = key_index(keys[c]);
    tokens[e * tokens_stride + c] = static_cast<int32_t>(t);
    row_of[t * row_of_stride + e] = static_cast<int32_t>(e * C + c);
    weights[t * weights_stride + e] = scores[t * scores_stride + e];
  }
}

// one block per expert: bitonic sort (Batcher 1968) of the column's N = 2^ceil(log2 T) packed keys,
// descending, in shared memory; the first C keys are the expert's tokens, best first, ties to the
// lower token (packed keys are distinct, so the order is total).
__global__ void __launch_bounds__(kSortThreads)
    expert_choice_select_kernel(const float* scores, int64_t scores_stride, int64_t T, int32_t C, int32_t N,
                                int32_t* tokens, int64_t tokens_stride, int32_t* row_of, int64_t row_of_stride,
                                float* weights, int64_t weights_stride) {
  SMOE_DYNAMIC_SMEM(unsigned long long, keys);  // [N]
  const int64_t e = blockIdx.x;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    keys[i] = i < T ? pack_key(scores[i * scores_stride + e], static_cast<uint32_t>(i)) : kExcludedKey;
  }
  __syncthreads();
  block_bitonic_sort_desc(keys, N);
  write_expert_choice(keys, scores, scores_stride, e, C, tokens, tokens_stride, row_of, row_of_stride, weights,
                      weights_stride);
}

// T > kMaxExpertChoiceTokens: one block per expert; a radix select finds the C-th best key of the
// column (8 strided passes over it), the C keys >= it are gathered into shared memory (slot order
// varies with the schedule, the sorted result does not: the keys are distinct), and only they are
// sorted. N = 2^ceil(log2 C).
__global__ void __launch_bounds__(kSortThreads)
    expert_choice_select_radix_kernel(const float* scores, int64_t scores_stride, int64_t T, int32_t C, int32_t N,
                                      int32_t* tokens, int64_t tokens_stride, int32_t* row_of, int64_t row_of_stride,
                                      float* weights, int64_t weights_stride) {
  SMOE_DYNAMIC_SMEM(unsigned long long, keys);  // [N]
  __shared__ int hist[258];
  __shared__ int fill;
  const int64_t e = blockIdx.x;
  const auto key_at = [&](int64_t i) { return pack_key(scores[i * scores_stride + e], static_cast<uint32_t>(i)); };
  // C < T here (C <= 16384 < T): the select is reached by every thread
  const unsigned long long threshold = block_radix_select_desc(key_at, T, C, hist);
  if (threadIdx.x == 0) fill = 0;
  for (int i = threadIdx.x; i < N; i += blockDim.x) keys[i] = kExcludedKey;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < T; i += blockDim.x) {
    const unsigned long long k = key_at(i);
    if (k >= threshold) keys[atomicAdd(&fill, 1)] = k;  // exactly C keys pass
  }
  __syncthreads();
  block_bitonic_sort_desc(keys, N);
  write_expert_choice(keys, scores, scores_stride, e, C, tokens, tokens_stride, row_of, row_of_stride, weights,
                      weights_stride);
}

struct ExpertChoiceBackwardArgs {
  const float* scores;
  int64_t scores_stride;
  const int32_t* row_of;
  int64_t row_of_stride;
  const float* grad_weights;
  int64_t grad_weights_stride;
  float* grad_logits;
  int64_t grad_logits_stride;
  int64_t T;
  int32_t E;
  bool softmax;
  int64_t R;  // E * C rows: a row_of entry outside [-1, R) counts as -1 (docs/cuda.md, data rules)
};

// one warp per token: g = grad_weights where chosen (row_of in [0, R)), then the score function's backward.
__global__ void __launch_bounds__(kRowThreads) expert_choice_backward_kernel(ExpertChoiceBackwardArgs a) {
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= a.T) return;
  const float* s = a.scores + t * a.scores_stride;
  const int32_t* r = a.row_of + t * a.row_of_stride;
  const float* dw = a.grad_weights + t * a.grad_weights_stride;
  float* out = a.grad_logits + t * a.grad_logits_stride;
  auto g = [&](int e) { return r[e] >= 0 && r[e] < a.R ? dw[e] : 0.0f; };
  if (a.softmax) {
    float dot = 0.0f;
    for (int e = lane; e < a.E; e += 32) dot += g(e) * s[e];
    dot = warp_sum(dot);
    for (int e = lane; e < a.E; e += 32) out[e] = s[e] * (g(e) - dot);
  } else {
    for (int e = lane; e < a.E; e += 32) out[e] = g(e) * s[e] * (1.0f - s[e]);
  }
}

// ---- aux losses -------------------------------------------------------------------------------------

constexpr int kCountThreads = 256;
constexpr int kMaxSmemHistogram = 12288;  // E ints in 48 KiB of shared memory

// counts[e] += #{(t, k): experts[t, k] == e}, ids outside [0, E) skipped. Integer atomics: the sum
// does not depend on their order. Per-block shared histogram first (Mixtral: E = 8 hot addresses).
__global__ void __launch_bounds__(kCountThreads)
    count_experts_kernel(const int32_t* experts, int64_t experts_stride, int64_t T, int32_t K, int32_t E,
                         int32_t* counts) {
  SMOE_DYNAMIC_SMEM(int, hist);  // [E] when E <= kMaxSmemHistogram
  const bool local = E <= kMaxSmemHistogram;
  if (local) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  }
  __syncthreads();
  const int64_t n = T * K;
  for (int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; a < n;
       a += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t e = experts[(a / K) * experts_stride + a % K];
    if (e >= 0 && e < E) atomicAdd(local ? &hist[e] : &counts[e], 1);
  }
  __syncthreads();
  if (local) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
      if (hist[e] != 0) atomicAdd(&counts[e], hist[e]);
    }
  }
}

constexpr int kColTile = 32, kColRows = 8;  // column sums: 32 experts x 8 token lanes per block

// part[b, e] = sum of probs[t, e] over the tokens of chunk b: lane x takes expert tile + x, lane y
// tokens t0 + y, t0 + y + 8, ...; the 8 partials are added in y order. Deterministic.
__global__ void __launch_bounds__(kColTile* kColRows)
    column_partial_sums_kernel(const float* probs, int64_t probs_stride, int64_t T, int32_t E, int64_t chunk,
                               float* part) {
  __shared__ float red[kColRows][kColTile + 1];
  const int x = threadIdx.x, y = threadIdx.y;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kColTile + x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t t1 = t0 + chunk < T ? t0 + chunk : T;
  float acc = 0.0f;
  if (e < E) {
    for (int64_t t = t0 + y; t < t1; t += kColRows) acc += probs[t * probs_stride + e];
  }
  red[y][x] = acc;
  __syncthreads();
  if (y == 0 && e < E) {
    float s = red[0][x];
    for (int j = 1; j < kColRows; ++j) s += red[j][x];
    part[static_cast<int64_t>(blockIdx.y) * E + e] = s;
  }
}

constexpr int kFinalThreads = 256;

// Fixed-shape tree over a block's doubles in shared memory; thread 0 returns the total.
__device__ __forceinline__ double block_sum(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kFinalThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  return red[0];
}

// loss = E / T^2 * sum_e counts_e * sum_b part[b, e] (Fedus et al. 2021, eq. 4, top-k form).
__global__ void __launch_bounds__(kFinalThreads)
    lb_loss_finalize_kernel(const float* part, int32_t nb, const int32_t* counts, int32_t E, int64_t T, float* loss) {
  __shared__ double red[kFinalThreads];
  double acc = 0.0;
  for (int e = threadIdx.x; e < E; e += kFinalThreads) {
    double ps = 0.0;
    for (int b = 0; b < nb; ++b) ps += static_cast<double>(part[static_cast<int64_t>(b) * E + e]);
    acc += static_cast<double>(counts[e]) * ps;
  }
  const double total = block_sum(acc, red);
  if (threadIdx.x == 0) *loss = static_cast<float>(static_cast<double>(E) * total / (double(T) * double(T)));
}

// coef[e] = grad_loss * E * counts_e / T^2 (f_e held constant), in f64 as the CPU backend.
__global__ void lb_loss_coef_kernel(const int32_t* counts, const float* grad_loss, int32_t E, int64_t T,
                                    float* coef) {
  const int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e < E) {
    coef[e] = static_cast<float>(static_cast<double>(*grad_loss) * double(E) * double(counts[e]) /
                                 (double(T) * double(T)));
  }
}

// grad_probs[t, e] = coef[e]: a broadcast, grid-stride over T * E.
__global__ void broadcast_rows_kernel(const float* coef, int64_t T, int32_t E, float* out, int64_t out_stride) {
  const int64_t n = T * E;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[(i / E) * out_stride + i % E] = coef[i % E];
  }
}

// z_t^2 with z_t = logsumexp(x_t), one warp per token, into zsq[T] (f64, as the CPU backend sums).
template <class In>
__global__ void __launch_bounds__(kRowThreads)
    z_loss_rows_kernel(const In* logits, int64_t logits_stride, int64_t T, int32_t E, double* zsq) {
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= T) return;
  float m, sum;
  row_max_sumexp(logits + t * logits_stride, E, lane, &m, &sum);
  // A row whose max is +inf or -inf (all -inf) has logsumexp = max, as torch.logsumexp gives: z^2 = inf.
  const bool inf_max = m == INFINITY || m == -INFINITY;
  const double z = static_cast<double>(inf_max ? m : m + logf(sum));
  if (lane == 0) zsq[t] = z * z;
}

// loss = sum_t zsq[t] / T: each thread sums a strided slice in order, then a fixed tree.
__global__ void __launch_bounds__(kFinalThreads) mean_kernel(const double* v, int64_t n, float* out) {
  __shared__ double red[kFinalThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kFinalThreads) acc += v[i];
  const double total = block_sum(acc, red);
  if (threadIdx.x == 0) *out = static_cast<float>(total / static_cast<double>(n));
}

// d/dx_e mean_t z_t^2 = (2 z_t / T) softmax(x_t)_e (ST-MoE eq. 5), one warp per token.
template <class In>
__global__ void __launch_bounds__(kRowThreads)
    z_loss_backward_kernel(const In* logits, int64_t logits_stride, const float* grad_loss, int64_t T, int32_t E,
                           float two_over_t, float* grad_logits, int64_t grad_stride) {
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= T) return;
  const In* x = logits + t * logits_stride;
  float m, sum;
  row_max_sumexp(x, E, lane, &m, &sum);
  const float z = m + logf(sum);
  const float c = *grad_loss * two_over_t * z;
  float* out = grad_logits + t * grad_stride;
  for (int e = lane; e < E; e += 32) out[e] = c * (expf(to_float(x[e]) - m) / sum);
}

// bias[e] += rate * sign(mean - counts[e]) (DeepSeek-V3 section 2.1.2); one block, integer total.
__global__ void __launch_bounds__(kFinalThreads)
    balancing_bias_update_kernel(const int32_t* counts, int32_t E, float* bias, float rate) {
  __shared__ double red[kFinalThreads];
  long long acc = 0;
  for (int e = threadIdx.x; e < E; e += kFinalThreads) acc += counts[e];
  // Integer counts below 2^53 add exactly in f64, in any order.
  const double total = block_sum(static_cast<double>(acc), red);
  const double mean = total / static_cast<double>(E);
  for (int e = threadIdx.x; e < E; e += kFinalThreads) {
    const double d = mean - static_cast<double>(counts[e]);
    const float sign = d > 0 ? 1.0f : (d < 0 ? -1.0f : 0.0f);
    bias[e] = bias[e] + rate * sign;
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
  return unsupported(op, "E = " + std::to_string(E) + " experts; the CUDA backend keeps a row in one block's shared "
                         "memory and supports E <= " + std::to_string(kMaxBlockExperts) + " (use backend 'cpu')");
}

// Dynamic shared memory above the 48 KiB default needs an opt-in per kernel (sm_70+).
template <class Kernel>
cudaError_t allow_smem(Kernel* kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
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

size_t align256(size_t v) { return (v + 255) / 256 * 256; }

// Counts of each expert over experts[T, K] into counts[E] (zeroed here).
Status count_experts(const TensorView& experts, int32_t E, int32_t* counts, cudaStream_t stream) {
  const int64_t T = experts.size(0), K = experts.size(1);
  SMOE_CUDA_CHECK(cudaMemsetAsync(counts, 0, sizeof(int32_t) * static_cast<size_t>(E), stream));
  if (T * K == 0) return Status::Ok();
  const size_t smem = E <= kMaxSmemHistogram ? sizeof(int32_t) * static_cast<size_t>(E) : 0;
  // grid-stride over T*K assignments; few blocks, so few global atomics per expert
  const unsigned grid = grid_for(T * K, kCountThreads, 256);
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&count_experts_kernel, dim3(grid), dim3(kCountThreads), smem, stream,
                              experts.data_as<const int32_t>(), experts.stride(0), T, static_cast<int32_t>(K), E,
                              counts));
  return Status::Ok();
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------------

Status topk_gating_forward(const TopkGatingParams& p, const TensorView& logits, const TensorView& bias,
                           const TensorView& weights, const TensorView& experts, const TensorView& scores,
                           void* stream) {
  const char* op = "topk_gating_forward";
  const int64_t T = logits.size(0), E = logits.size(1);
  if (E > kMaxBlockExperts) return too_many_experts(op, E);
  if (T == 0) return Status::Ok();
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
  a.T = T;
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
  const size_t smem = sizeof(float) * static_cast<size_t>(a.smem_floats_per_warp) * kWarpsPerBlock;  // <= 24 KiB
  const cudaStream_t s = as_stream(stream);
  return dispatch_float(logits.dtype, op, [&](auto tag) -> Status {
    using In = typename decltype(tag)::type;
    if (E > 32 * kMaxItems) return launch_topk_forward_block<In>(a, s);
    switch (items_for(E)) {
      case 1: return launch_topk_forward<In, 1>(a, smem, s);
      case 2: return launch_topk_forward<In, 2>(a, smem, s);
      case 4: return launch_topk_forward<In, 4>(a, smem, s);
      case 8: return launch_topk_forward<In, 8>(a, smem, s);
      default: return launch_topk_forward<In, 16>(a, smem, s);
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
    case 1: return launch_topk_backward<1>(a, s);
    case 2: return launch_topk_backward<2>(a, s);
    case 4: return launch_topk_backward<4>(a, s);
    case 8: return launch_topk_backward<8>(a, s);
    default: return launch_topk_backward<16>(a, s);
  }
}

Status expert_choice_forward(const ExpertChoiceParams& p, const TensorView& logits, const TensorView& scores,
                             const TensorView& tokens, const TensorView& row_of, const TensorView& weights,
                             void* stream) {
  const char* op = "expert_choice_forward";
  const int64_t T = logits.size(0), E = logits.size(1);
  const bool radix = T > kMaxExpertChoiceTokens;  // select the C best first, then sort only those
  if (radix && p.capacity > kMaxExpertChoiceTokens) {
    return unsupported(op, "capacity = " + std::to_string(p.capacity) + " with T = " + std::to_string(T) +
                           " tokens; the CUDA backend sorts an expert's chosen tokens in shared memory and supports "
                           "T <= " + std::to_string(kMaxExpertChoiceTokens) + " or capacity <= " +
                           std::to_string(kMaxExpertChoiceTokens) + " (use backend 'cpu')");
  }
  if (T == 0 || E == 0) return Status::Ok();
  const cudaStream_t s = as_stream(stream);
  ScoreRowsArgs a{logits.data, logits.stride(0), scores.data_as<float>(), scores.stride(0),
                  row_of.data_as<int32_t>(), row_of.stride(0), weights.data_as<float>(), weights.stride(0),
                  T, static_cast<int32_t>(E), p.score_func == ScoreFunc::kSoftmax};
  SMOE_RETURN_IF_ERROR(dispatch_float(logits.dtype, op, [&](auto tag) -> Status {
    auto* kernel = &expert_choice_scores_kernel<typename decltype(tag)::type>;
    const dim3 grid(static_cast<unsigned>(ceil_div(T, kWarpsPerBlock)));  // one warp per token
    SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, grid, dim3(kRowThreads), 0, s, a));
    return Status::Ok();
  }));
  if (radix && p.capacity == 0) return Status::Ok();  // nothing chosen: the score pass wrote row_of and weights
  const int64_t sorted = radix ? p.capacity : T;       // keys sorted per expert
  int32_t N = 2;
  while (N < sorted) N *= 2;
  const size_t smem = sizeof(unsigned long long) * static_cast<size_t>(N);  // <= 128 KiB (<= 16384 keys)
  auto* kernel = radix ? &expert_choice_select_radix_kernel : &expert_choice_select_kernel;
  SMOE_CUDA_CHECK(allow_smem(kernel, smem));
  // one block per expert: the column's T keys (or its C best) are sorted in shared memory
  SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, dim3(static_cast<unsigned>(E)), dim3(kSortThreads), smem,
                              s, scores.data_as<const float>(), scores.stride(0), T, p.capacity, N,
                              tokens.data_as<int32_t>(), tokens.stride(0), row_of.data_as<int32_t>(),
                              row_of.stride(0), weights.data_as<float>(), weights.stride(0)));
  return Status::Ok();
}

Status expert_choice_backward(const ExpertChoiceParams& p, const TensorView& scores, const TensorView& row_of,
                              const TensorView& grad_weights, const TensorView& grad_scores,
                              const TensorView& grad_logits, void* stream) {
  const char* op = "expert_choice_backward";
  if (scores.dtype == DType::kF64) return f64_unsupported(op);
  const int64_t T = scores.size(0), E = scores.size(1);
  if (T == 0 || E == 0) return Status::Ok();
  // Interim (issue 8, core helper): the kernel below reads grad_weights only; the cudal helper's
  // kernel adds grad_scores and handles an absent grad_weights.
  if (grad_scores.defined() || !grad_weights.defined()) {
    return unsupported(op, "grad_scores or an absent grad_weights: not yet in the CUDA backend (use backend 'cpu')");
  }
  ExpertChoiceBackwardArgs a{scores.data_as<const float>(), scores.stride(0), row_of.data_as<const int32_t>(),
                             row_of.stride(0), grad_weights.data_as<const float>(), grad_weights.stride(0),
                             grad_logits.data_as<float>(), grad_logits.stride(0), T, static_cast<int32_t>(E),
                             p.score_func == ScoreFunc::kSoftmax, E * int64_t{p.capacity}};
  const dim3 grid(static_cast<unsigned>(ceil_div(T, kWarpsPerBlock)));  // one warp per token
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&expert_choice_backward_kernel, grid, dim3(kRowThreads), 0, as_stream(stream), a));
  return Status::Ok();
}

Status load_balancing_loss_forward(const TensorView& probs, const TensorView& experts, const TensorView& loss,
                                   const TensorView& /*workspace*/, void* stream) {
  const char* op = "load_balancing_loss_forward";
  if (probs.dtype == DType::kF64) return f64_unsupported(op);
  const int64_t T = probs.size(0);
  const int32_t E = static_cast<int32_t>(probs.size(1));
  const cudaStream_t s = as_stream(stream);
  if (T == 0 || E == 0) {  // no tokens, no imbalance: 0 (all-zero bits)
    SMOE_CUDA_CHECK(cudaMemsetAsync(loss.data, 0, sizeof(float), s));
    return Status::Ok();
  }
  // Token chunks of the column sums: a function of T only (never of the device), so the summation
  // order, hence the result, is the same on every GPU.
  const int64_t chunk = T <= 256 * 256 ? 256 : ceil_div(T, 256);
  const int32_t nb = static_cast<int32_t>(ceil_div(T, chunk));
  StreamScratch scratch(s);
  const size_t counts_bytes = align256(sizeof(int32_t) * static_cast<size_t>(E));
  SMOE_CUDA_CHECK(scratch.allocate(counts_bytes + sizeof(float) * static_cast<size_t>(nb) * E));
  int32_t* counts = scratch.at<int32_t>(0);
  float* part = scratch.at<float>(counts_bytes);
  SMOE_RETURN_IF_ERROR(count_experts(experts, E, counts, s));
  // 32 experts x 8 token lanes per block; blockIdx.y = token chunk (nb <= 256)
  const dim3 grid(static_cast<unsigned>(ceil_div(E, kColTile)), static_cast<unsigned>(nb));
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&column_partial_sums_kernel, grid, dim3(kColTile, kColRows), 0, s,
                              probs.data_as<const float>(), probs.stride(0), T, E, chunk, part));
  // one block: the E terms and the nb partials are few; a fixed order makes the sum deterministic
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&lb_loss_finalize_kernel, dim3(1), dim3(kFinalThreads), 0, s,
                              static_cast<const float*>(part), nb, static_cast<const int32_t*>(counts), E, T,
                              loss.data_as<float>()));
  return Status::Ok();
}

Status load_balancing_loss_backward(const TensorView& probs, const TensorView& experts, const TensorView& grad_loss,
                                    const TensorView& grad_probs, const TensorView& /*workspace*/, void* stream) {
  const char* op = "load_balancing_loss_backward";
  if (probs.dtype == DType::kF64) return f64_unsupported(op);
  const int64_t T = probs.size(0);
  const int32_t E = static_cast<int32_t>(probs.size(1));
  if (T == 0 || E == 0) return Status::Ok();
  const cudaStream_t s = as_stream(stream);
  StreamScratch scratch(s);
  const size_t counts_bytes = align256(sizeof(int32_t) * static_cast<size_t>(E));
  SMOE_CUDA_CHECK(scratch.allocate(counts_bytes + sizeof(float) * static_cast<size_t>(E)));
  int32_t* counts = scratch.at<int32_t>(0);
  float* coef = scratch.at<float>(counts_bytes);
  SMOE_RETURN_IF_ERROR(count_experts(experts, E, counts, s));
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&lb_loss_coef_kernel, dim3(static_cast<unsigned>(ceil_div(E, 256))), dim3(256), 0, s,
                              static_cast<const int32_t*>(counts), grad_loss.data_as<const float>(), E, T, coef));
  // grid-stride broadcast over T*E elements
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&broadcast_rows_kernel, dim3(grid_for(T * E, 256)), dim3(256), 0, s,
                              static_cast<const float*>(coef), T, E, grad_probs.data_as<float>(),
                              grad_probs.stride(0)));
  return Status::Ok();
}

Status z_loss_forward(const TensorView& logits, const TensorView& loss, const TensorView& /*workspace*/,
                      void* stream) {
  const char* op = "z_loss_forward";
  const int64_t T = logits.size(0), E = logits.size(1);
  const cudaStream_t s = as_stream(stream);
  if (logits.dtype == DType::kF64) return f64_unsupported(op);
  if (T == 0 || E == 0) {  // no tokens: 0 (all-zero bits)
    SMOE_CUDA_CHECK(cudaMemsetAsync(loss.data, 0, sizeof(float), s));
    return Status::Ok();
  }
  StreamScratch scratch(s);
  SMOE_CUDA_CHECK(scratch.allocate(sizeof(double) * static_cast<size_t>(T)));
  double* zsq = scratch.at<double>(0);
  SMOE_RETURN_IF_ERROR(dispatch_float(logits.dtype, op, [&](auto tag) -> Status {
    using In = typename decltype(tag)::type;
    auto* kernel = &z_loss_rows_kernel<In>;
    const dim3 grid(static_cast<unsigned>(ceil_div(T, kWarpsPerBlock)));  // one warp per token
    SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, grid, dim3(kRowThreads), 0, s, logits.data_as<const In>(), logits.stride(0),
                                T, static_cast<int32_t>(E), zsq));
    return Status::Ok();
  }));
  // one block sums the T values in a fixed order (8 bytes a token: small next to the logits)
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&mean_kernel, dim3(1), dim3(kFinalThreads), 0, s, static_cast<const double*>(zsq), T,
                              loss.data_as<float>()));
  return Status::Ok();
}

Status z_loss_backward(const TensorView& logits, const TensorView& grad_loss, const TensorView& grad_logits,
                       const TensorView& /*workspace*/, void* stream) {
  const char* op = "z_loss_backward";
  const int64_t T = logits.size(0), E = logits.size(1);
  if (T == 0 || E == 0) return Status::Ok();
  const cudaStream_t s = as_stream(stream);
  const float two_over_t = static_cast<float>(2.0 / static_cast<double>(T));
  return dispatch_float(logits.dtype, op, [&](auto tag) -> Status {
    using In = typename decltype(tag)::type;
    auto* kernel = &z_loss_backward_kernel<In>;
    const dim3 grid(static_cast<unsigned>(ceil_div(T, kWarpsPerBlock)));  // one warp per token
    SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, grid, dim3(kRowThreads), 0, s, logits.data_as<const In>(), logits.stride(0),
                                grad_loss.data_as<const float>(), T, static_cast<int32_t>(E), two_over_t,
                                grad_logits.data_as<float>(), grad_logits.stride(0)));
    return Status::Ok();
  });
}

Status balancing_bias_update(const TensorView& counts, const TensorView& bias, float rate, void* stream) {
  const int64_t E = counts.size(0);
  if (E == 0) return Status::Ok();
  // one block: E is at most a few thousand experts
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&balancing_bias_update_kernel, dim3(1), dim3(kFinalThreads), 0, as_stream(stream),
                              counts.data_as<const int32_t>(), static_cast<int32_t>(E), bias.data_as<float>(), rate));
  return Status::Ok();
}

}  // namespace smoe::SMOE_CUDA_NS

// CUDA backend of expert-choice routing (include/smoe/ops/gating.h; Zhou et al., 2022): every expert
// picks its C best tokens.
//
// Versions (docs/kernels/gating.md):
//  v0: the CPU backend (csrc/cpu/gating.cpp), a column sort per expert.
//  v1 (this file): a score pass (warp per token) then one block per expert that bitonic-sorts the
//     packed keys of its column in shared memory (T <= 16384) and keeps the first C. For larger T
//     the block first finds the C-th best key of the column by a radix select (common.cuh), gathers
//     the C keys >= it, and sorts only those (C <= 16384).
//  backward: one kernel, one warp per token: g = (chosen ? grad_weights : 0) + grad_scores, then the
//     score function's backward (either gradient may be absent).
#include "backend.h"
#include "common.cuh"
#include "gating_common.cuh"

namespace smoe::SMOE_CUDA_NS {
namespace {

constexpr int kMaxExpertChoiceTokens = 16384;  // bitonic sort of T packed keys in <= 128 KiB of smem
constexpr int kSortThreads = 512;

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
  const float* grad_weights;  // null: absent
  int64_t grad_weights_stride;
  const float* grad_scores;  // null: absent
  int64_t grad_scores_stride;
  float* grad_logits;
  int64_t grad_logits_stride;
  int64_t T;
  int32_t E;
  bool softmax;
  int64_t R;  // E * C rows: a row_of entry outside [-1, R) counts as -1 (docs/cuda.md, data rules)
};

// one warp per token: g = (grad_weights where chosen, row_of in [0, R)) + grad_scores, then the score
// function's backward. Both gradients meet in the one pass over the row, so the scores are read once.
__global__ void __launch_bounds__(kRowThreads) expert_choice_backward_kernel(ExpertChoiceBackwardArgs a) {
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= a.T) return;
  const float* s = a.scores + t * a.scores_stride;
  const int32_t* r = a.row_of + t * a.row_of_stride;
  const float* dw = a.grad_weights ? a.grad_weights + t * a.grad_weights_stride : nullptr;
  const float* ds = a.grad_scores ? a.grad_scores + t * a.grad_scores_stride : nullptr;
  float* out = a.grad_logits + t * a.grad_logits_stride;
  auto g = [&](int e) {
    const float w = dw && r[e] >= 0 && r[e] < a.R ? dw[e] : 0.0f;
    return ds ? w + ds[e] : w;
  };
  if (a.softmax) {
    float dot = 0.0f;
    for (int e = lane; e < a.E; e += 32) dot += g(e) * s[e];
    dot = warp_sum(dot);
    for (int e = lane; e < a.E; e += 32) out[e] = s[e] * (g(e) - dot);
  } else {
    for (int e = lane; e < a.E; e += 32) out[e] = g(e) * s[e] * (1.0f - s[e]);
  }
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------------

Status expert_choice_forward(const ExpertChoiceParams& p, const TensorView& logits, const TensorView& scores,
                             const TensorView& tokens, const TensorView& row_of, const TensorView& weights,
                             void* stream) {
  const char* op = "expert_choice_forward";
  const int64_t T = logits.size(0), E = logits.size(1);
  const bool radix = T > kMaxExpertChoiceTokens;  // select the C best first, then sort only those
  if (radix && p.capacity > kMaxExpertChoiceTokens) {
    return unsupported(
        op, "capacity = " + std::to_string(p.capacity) + " with T = " + std::to_string(T) +
                " tokens; the CUDA backend sorts an expert's chosen tokens in shared memory and supports "
                "T <= " +
                std::to_string(kMaxExpertChoiceTokens) + " or capacity <= " + std::to_string(kMaxExpertChoiceTokens) +
                " (use backend 'cpu')");
  }
  if (T == 0 || E == 0) return Status::Ok();
  const cudaStream_t s = as_stream(stream);
  ScoreRowsArgs a{logits.data,
                  logits.stride(0),
                  scores.data_as<float>(),
                  scores.stride(0),
                  row_of.data_as<int32_t>(),
                  row_of.stride(0),
                  weights.data_as<float>(),
                  weights.stride(0),
                  T,
                  static_cast<int32_t>(E),
                  p.score_func == ScoreFunc::kSoftmax};
  SMOE_RETURN_IF_ERROR(dispatch_float(logits.dtype, op, [&](auto tag) -> Status {
    auto* kernel = &expert_choice_scores_kernel<typename decltype(tag)::type>;
    const dim3 grid(static_cast<unsigned>(ceil_div(T, kWarpsPerBlock)));  // one warp per token
    SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, grid, dim3(kRowThreads), 0, s, a));
    return Status::Ok();
  }));
  if (radix && p.capacity == 0) return Status::Ok();  // nothing chosen: the score pass wrote row_of and weights
  const int64_t sorted = radix ? p.capacity : T;      // keys sorted per expert
  int32_t N = 2;
  while (N < sorted) N *= 2;
  const size_t smem = sizeof(unsigned long long) * static_cast<size_t>(N);  // <= 128 KiB (<= 16384 keys)
  auto* kernel = radix ? &expert_choice_select_radix_kernel : &expert_choice_select_kernel;
  SMOE_CUDA_CHECK(allow_smem(kernel, smem));
  // one block per expert: the column's T keys (or its C best) are sorted in shared memory
  SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, dim3(static_cast<unsigned>(E)), dim3(kSortThreads), smem, s,
                              scores.data_as<const float>(), scores.stride(0), T, p.capacity, N,
                              tokens.data_as<int32_t>(), tokens.stride(0), row_of.data_as<int32_t>(), row_of.stride(0),
                              weights.data_as<float>(), weights.stride(0)));
  return Status::Ok();
}

Status expert_choice_backward(const ExpertChoiceParams& p, const TensorView& scores, const TensorView& row_of,
                              const TensorView& grad_weights, const TensorView& grad_scores,
                              const TensorView& grad_logits, void* stream) {
  const char* op = "expert_choice_backward";
  if (scores.dtype == DType::kF64) return f64_unsupported(op);
  const int64_t T = scores.size(0), E = scores.size(1);
  if (T == 0 || E == 0) return Status::Ok();
  ExpertChoiceBackwardArgs a{scores.data_as<const float>(),
                             scores.stride(0),
                             row_of.data_as<const int32_t>(),
                             row_of.stride(0),
                             grad_weights.defined() ? grad_weights.data_as<const float>() : nullptr,
                             grad_weights.defined() ? grad_weights.stride(0) : 0,
                             grad_scores.defined() ? grad_scores.data_as<const float>() : nullptr,
                             grad_scores.defined() ? grad_scores.stride(0) : 0,
                             grad_logits.data_as<float>(),
                             grad_logits.stride(0),
                             T,
                             static_cast<int32_t>(E),
                             p.score_func == ScoreFunc::kSoftmax,
                             E * int64_t{p.capacity}};
  const dim3 grid(static_cast<unsigned>(ceil_div(T, kWarpsPerBlock)));  // one warp per token
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&expert_choice_backward_kernel, grid, dim3(kRowThreads), 0, as_stream(stream), a));
  return Status::Ok();
}

}  // namespace smoe::SMOE_CUDA_NS

// CUDA backend of the router losses (include/smoe/ops/gating.h): the switch load-balancing loss, the
// router z-loss and the aux-loss-free bias update.
//
// Deterministic two-pass reductions: per-block partials in the caller's workspace (layout below,
// byte counts in csrc/core/workspace.h, "router losses"), then one block sums them in a fixed order;
// expert counts use integer atomics, whose result does not depend on their order. No float atomics,
// no allocation: the layer path takes every byte of scratch from the caller (torch's allocator).
#include "backend.h"
#include "common.cuh"
#include "core/workspace.h"
#include "gating_common.cuh"

namespace smoe::SMOE_CUDA_NS {
namespace {

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
__global__ void lb_loss_coef_kernel(const int32_t* counts, const float* grad_loss, int32_t E, int64_t T, float* coef) {
  const int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e < E) {
    coef[e] =
        static_cast<float>(static_cast<double>(*grad_loss) * double(E) * double(counts[e]) / (double(T) * double(T)));
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
// The workspace's bytes as a typed pointer, after checking the caller gave at least `need` of them
// (csrc/core checks too; this keeps the launcher safe when called directly, as the tests do).
Status expect_workspace(const char* op, const TensorView& workspace, int64_t need, uint8_t** out) {
  const int64_t have = workspace.defined() ? workspace.numel() * dtype_size(workspace.dtype) : 0;
  if (have < need) {
    return invalid_argument(op, "workspace", "at least " + std::to_string(need) + " bytes (u8)",
                            std::to_string(have) + " bytes");
  }
  *out = need > 0 ? static_cast<uint8_t*>(workspace.data) : nullptr;
  return Status::Ok();
}

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

Status load_balancing_loss_forward(const TensorView& probs, const TensorView& experts, const TensorView& loss,
                                   const TensorView& workspace, void* stream) {
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
  const int64_t chunk = workspace::lb_loss_chunk(T);
  const int32_t nb = static_cast<int32_t>(ceil_div(T, chunk));
  uint8_t* ws = nullptr;
  SMOE_RETURN_IF_ERROR(expect_workspace(op, workspace, workspace::lb_loss_bytes(T, E), &ws));
  const int64_t counts_bytes = workspace::lb_loss_part_offset(E);  // layout: csrc/core/workspace.h
  int32_t* counts = reinterpret_cast<int32_t*>(ws);
  float* part = reinterpret_cast<float*>(ws + counts_bytes);
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
                                    const TensorView& grad_probs, const TensorView& workspace, void* stream) {
  const char* op = "load_balancing_loss_backward";
  if (probs.dtype == DType::kF64) return f64_unsupported(op);
  const int64_t T = probs.size(0);
  const int32_t E = static_cast<int32_t>(probs.size(1));
  if (T == 0 || E == 0) return Status::Ok();
  const cudaStream_t s = as_stream(stream);
  uint8_t* ws = nullptr;
  SMOE_RETURN_IF_ERROR(expect_workspace(op, workspace, workspace::lb_loss_bytes(T, E), &ws));
  const int64_t counts_bytes = workspace::lb_loss_part_offset(E);  // the forward's layout; coef in the partials
  int32_t* counts = reinterpret_cast<int32_t*>(ws);
  float* coef = reinterpret_cast<float*>(ws + counts_bytes);
  SMOE_RETURN_IF_ERROR(count_experts(experts, E, counts, s));
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&lb_loss_coef_kernel, dim3(static_cast<unsigned>(ceil_div(E, 256))), dim3(256), 0, s,
                              static_cast<const int32_t*>(counts), grad_loss.data_as<const float>(), E, T, coef));
  // grid-stride broadcast over T*E elements
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&broadcast_rows_kernel, dim3(grid_for(T * E, 256)), dim3(256), 0, s,
                              static_cast<const float*>(coef), T, E, grad_probs.data_as<float>(),
                              grad_probs.stride(0)));
  return Status::Ok();
}

Status z_loss_forward(const TensorView& logits, const TensorView& loss, const TensorView& workspace, void* stream) {
  const char* op = "z_loss_forward";
  const int64_t T = logits.size(0), E = logits.size(1);
  const cudaStream_t s = as_stream(stream);
  if (logits.dtype == DType::kF64) return f64_unsupported(op);
  if (T == 0 || E == 0) {  // no tokens: 0 (all-zero bits)
    SMOE_CUDA_CHECK(cudaMemsetAsync(loss.data, 0, sizeof(float), s));
    return Status::Ok();
  }
  uint8_t* ws = nullptr;
  SMOE_RETURN_IF_ERROR(expect_workspace(op, workspace, workspace::z_loss_bytes(T, E), &ws));
  double* zsq = reinterpret_cast<double*>(ws);
  SMOE_RETURN_IF_ERROR(dispatch_float(logits.dtype, op, [&](auto tag) -> Status {
    using In = typename decltype(tag)::type;
    auto* kernel = &z_loss_rows_kernel<In>;
    const dim3 grid(static_cast<unsigned>(ceil_div(T, kWarpsPerBlock)));  // one warp per token
    SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, grid, dim3(kRowThreads), 0, s, logits.data_as<const In>(), logits.stride(0), T,
                                static_cast<int32_t>(E), zsq));
    return Status::Ok();
  }));
  // one block sums the T values in a fixed order (8 bytes a token: small next to the logits)
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&mean_kernel, dim3(1), dim3(kFinalThreads), 0, s, static_cast<const double*>(zsq), T,
                              loss.data_as<float>()));
  return Status::Ok();
}

Status z_loss_backward(const TensorView& logits, const TensorView& grad_loss, const TensorView& grad_logits,
                       const TensorView& workspace, void* stream) {
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

// permute / combine v0 (include/smoe/ops/permute.h): one thread per row, the simplest correct
// kernels. The first rung of the ladder (docs/kernels/permute.md); v1 is csrc/cuda/permute.cu.
//
//   permute_forward:   one thread per row r of xs copies x[token_of_row[r]] element by element
//   permute_backward / combine_forward: one thread per token t sums its K rows in k order (f32)
//   combine_backward:  grad_ys: one thread per row zeroes it, then one thread per (t, k) writes its
//                      row (a row has at most one (t, k) in a valid plan); grad_weights: one thread
//                      per (t, k) dot product of length H, summed in h order
// Indices outside [-1, R) count as -1 (never dereferenced), as in v1.
#include "../common.cuh"
#include "naive.h"

namespace smoe::SMOE_CUDA_NS {
namespace {

constexpr int kThreads = 128;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>(ceil_div(n, kThreads)); }

__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// xs[r] = x[token_of_row[r]] (zeros for -1), as bytes: the copy does not depend on the dtype.
__global__ void permute_forward_v0_kernel(const unsigned char* x, int64_t x_stride_bytes, const int32_t* token_of_row,
                                          int64_t R, int64_t T, int64_t row_bytes, unsigned char* xs) {
  // TEACH: thread r copies row r byte by byte, so the 32 threads of a warp touch 32 rows at once and
  // each load instruction moves one byte per thread from 32 cache lines. v1 gives a row to a warp:
  // lanes move consecutive 16-byte units (LDG.128), 512 contiguous bytes per instruction.
  const int64_t r = thread_index();
  if (r >= R) return;
  const int32_t t = token_of_row[r];
  unsigned char* dst = xs + r * row_bytes;
  if (t >= 0 && t < T) {
    const unsigned char* src = x + static_cast<int64_t>(t) * x_stride_bytes;
    for (int64_t b = 0; b < row_bytes; ++b) dst[b] = src[b];
  } else {
    for (int64_t b = 0; b < row_bytes; ++b) dst[b] = 0;
  }
}

// out[t] = sum_k w[t, k] * src[row_of[t, k]] (w == nullptr: weight 1), f32 in k order, one rounding.
template <class S>
__global__ void gather_sum_v0_kernel(const S* src, int64_t R, const int32_t* row_of, const float* weights, int64_t T,
                                     int32_t K, int64_t H, S* out) {
  const int64_t t = thread_index();
  if (t >= T) return;
  for (int64_t h = 0; h < H; ++h) {
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) {
      const int32_t r = row_of[t * K + k];
      if (r < 0 || r >= R) continue;
      const float v = to_float(src[static_cast<int64_t>(r) * H + h]);
      acc += weights ? weights[t * K + k] * v : v;
    }
    out[t * H + h] = from_float<S>(acc);
  }
}

template <class S>
__global__ void zero_rows_v0_kernel(int64_t R, int64_t H, S* rows) {
  const int64_t r = thread_index();
  if (r >= R) return;
  for (int64_t h = 0; h < H; ++h) rows[r * H + h] = from_float<S>(0.0f);
}

// grad_ys[row_of[a]] = weights[a] * grad_y[a / K] for every valid assignment a.
template <class S>
__global__ void scatter_grad_rows_v0_kernel(const S* grad_y, int64_t gy_stride, const float* weights,
                                            const int32_t* row_of, int64_t n, int64_t R, int32_t K, int64_t H,
                                            S* grad_ys) {
  // TEACH: a scatter: thread a writes the row that row_of names. Two assignments naming one row (a
  // plan the CPU backend rejects) would race here; v1 inverts row_of first (integer atomicMax, the
  // same answer in every order) so each row has one writer.
  const int64_t a = thread_index();
  if (a >= n) return;
  const int32_t r = row_of[a];
  if (r < 0 || r >= R) return;
  const float w = weights[a];
  const S* g = grad_y + (a / K) * gy_stride;
  for (int64_t h = 0; h < H; ++h) grad_ys[static_cast<int64_t>(r) * H + h] = from_float<S>(w * to_float(g[h]));
}

// grad_weights[a] = <grad_y[a / K], ys[row_of[a]]> (0 where dropped), summed in h order.
template <class S>
__global__ void combine_grad_weights_v0_kernel(const S* grad_y, int64_t gy_stride, const S* ys, int64_t R,
                                               const int32_t* row_of, int64_t n, int32_t K, int64_t H,
                                               float* grad_weights) {
  // TEACH: one thread walks the H products alone; v1 spreads them over a warp and adds the 32
  // partials with a fixed butterfly (the same bits on every run), 32x fewer dependent adds.
  const int64_t a = thread_index();
  if (a >= n) return;
  const int32_t r = row_of[a];
  float acc = 0.0f;
  if (r >= 0 && r < R) {
    const S* g = grad_y + (a / K) * gy_stride;
    const S* y = ys + static_cast<int64_t>(r) * H;
    for (int64_t h = 0; h < H; ++h) acc += to_float(g[h]) * to_float(y[h]);
  }
  grad_weights[a] = acc;
}

template <class S>
Status gather_sum_v0(const TensorView& src, const TensorView& row_of, const float* weights, const TensorView& out,
                     cudaStream_t s) {
  const int64_t T = row_of.size(0);
  // one thread per output token row
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&gather_sum_v0_kernel<S>, dim3(blocks_for(T)), dim3(kThreads), 0, s,
                              src.data_as<const S>(), src.size(0), row_of.data_as<const int32_t>(), weights, T,
                              static_cast<int32_t>(row_of.size(1)), src.size(1), out.data_as<S>()));
  return Status::Ok();
}

}  // namespace

Status permute_forward_v0(const TensorView& x, const TensorView& token_of_row, const TensorView& xs, void* stream) {
  const int64_t R = xs.size(0), H = x.size(1), elem = dtype_size(x.dtype);
  if (R == 0 || H == 0) return Status::Ok();
  // one thread per row of xs
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&permute_forward_v0_kernel, dim3(blocks_for(R)), dim3(kThreads), 0, as_stream(stream),
                              static_cast<const unsigned char*>(x.data), x.stride(0) * elem,
                              token_of_row.data_as<const int32_t>(), R, x.size(0), H * elem,
                              static_cast<unsigned char*>(xs.data)));
  return Status::Ok();
}

Status permute_backward_v0(const TensorView& grad_xs, const TensorView& row_of, const TensorView& grad_x,
                           void* stream) {
  const int64_t T = row_of.size(0), H = grad_xs.size(1);
  if (T == 0 || H == 0) return Status::Ok();
  return dispatch_float(grad_xs.dtype, "permute_backward", [&](auto tag) -> Status {
    return gather_sum_v0<typename decltype(tag)::type>(grad_xs, row_of, nullptr, grad_x, as_stream(stream));
  });
}

Status combine_forward_v0(const TensorView& ys, const TensorView& weights, const TensorView& row_of,
                          const TensorView& y, void* stream) {
  const int64_t T = row_of.size(0), H = ys.size(1);
  if (T == 0 || H == 0) return Status::Ok();
  return dispatch_float(ys.dtype, "combine_forward", [&](auto tag) -> Status {
    return gather_sum_v0<typename decltype(tag)::type>(ys, row_of, weights.data_as<const float>(), y,
                                                       as_stream(stream));
  });
}

Status combine_backward_v0(const TensorView& grad_y, const TensorView& ys, const TensorView& weights,
                           const TensorView& row_of, const TensorView& grad_ys, const TensorView& grad_weights,
                           void* stream) {
  const int64_t T = row_of.size(0), K = row_of.size(1), H = grad_y.size(1), n = T * K;
  const int64_t R = grad_ys.defined() ? grad_ys.size(0) : ys.size(0);
  const cudaStream_t s = as_stream(stream);
  return dispatch_float(grad_y.dtype, "combine_backward", [&](auto tag) -> Status {
    using S = typename decltype(tag)::type;
    if (grad_ys.defined() && R > 0 && H > 0) {
      // one thread per row of grad_ys, then one thread per (t, k)
      SMOE_CUDA_CHECK(
          SMOE_LAUNCH(&zero_rows_v0_kernel<S>, dim3(blocks_for(R)), dim3(kThreads), 0, s, R, H, grad_ys.data_as<S>()));
      if (n > 0) {
        SMOE_CUDA_CHECK(SMOE_LAUNCH(&scatter_grad_rows_v0_kernel<S>, dim3(blocks_for(n)), dim3(kThreads), 0, s,
                                    grad_y.data_as<const S>(), grad_y.stride(0), weights.data_as<const float>(),
                                    row_of.data_as<const int32_t>(), n, R, static_cast<int32_t>(K), H,
                                    grad_ys.data_as<S>()));
      }
    }
    if (grad_weights.defined() && n > 0) {
      // one thread per (t, k)
      SMOE_CUDA_CHECK(SMOE_LAUNCH(&combine_grad_weights_v0_kernel<S>, dim3(blocks_for(n)), dim3(kThreads), 0, s,
                                  grad_y.data_as<const S>(), grad_y.stride(0), ys.data_as<const S>(),
                                  ys.defined() ? ys.size(0) : 0, row_of.data_as<const int32_t>(), n,
                                  static_cast<int32_t>(K), H, grad_weights.data_as<float>()));
    }
    return Status::Ok();
  });
}

}  // namespace smoe::SMOE_CUDA_NS

// CUDA backend of permute and combine (include/smoe/ops/permute.h): row gathers into and out of the
// expert-sorted buffer. Every output row is written by one warp, and sums run in k order: no float
// atomics, bitwise-deterministic.
//
// Versions (docs/kernels/permute.md):
//  v0 (csrc/cuda/naive/permute_v0.cu): one thread per row / token / (t, k); selected by
//     set_kernel_version(KernelOp::kPermute or kCombine, 0). The CPU backend (csrc/cpu/permute.cpp)
//     is the reference: a row per iteration, memcpy / f32 row accumulators.
//  v1 (this file): one warp per output row (4 rows per block, grid-stride), lanes over the row in
//     16-byte units (LDG.128/STG.128: 8 bf16/f16 or 4 f32 per lane per step) when the row length,
//     the row strides and the base pointers allow it, else one element per lane. A warp reads and
//     writes 512 contiguous bytes per step, so every access is fully coalesced. permute_forward is
//     a byte copy (dtype-free); the reductions convert to f32 once per element and round once.
//     Row offsets are 64-bit (row * H can exceed 2^31).
//  combine_backward builds the inverse of row_of (row -> (t, k), integer atomicMax, order-free) in
//     the first 4 bytes of each grad_ys row (no allocation), so grad_ys is written row by row (zeros where no (t, k) points),
//     and grad_weights takes one warp per (t, k) dot product with a fixed butterfly reduction.
// Indices outside [-1, R) (rejected by the CPU backend) are treated as -1: never dereferenced.
#include "backend.h"
#include "common.cuh"

namespace smoe::SMOE_CUDA_NS {
namespace {

constexpr int kRowWarps = 4;  // rows per block of the warp-per-row kernels
constexpr int kRowThreads = 32 * kRowWarps;

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & 31; }
__device__ __forceinline__ int64_t first_row() {
  return static_cast<int64_t>(blockIdx.x) * kRowWarps + (static_cast<int>(threadIdx.x) >> 5);
}
__device__ __forceinline__ int64_t row_step() { return static_cast<int64_t>(gridDim.x) * kRowWarps; }

// V elements of S at p (16-byte aligned when V > 1) widened to f32, and back with one rounding.
template <class S, int V>
__device__ __forceinline__ void load_f32(const S* p, float (&out)[V]) {
  const Pack<S, V> pk = *reinterpret_cast<const Pack<S, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_float(pk.v[j]);
}
template <class S, int V>
__device__ __forceinline__ void store_f32(S* p, const float (&v)[V]) {
  Pack<S, V> pk;
#pragma unroll
  for (int j = 0; j < V; ++j) pk.v[j] = from_float<S>(v[j]);
  *reinterpret_cast<Pack<S, V>*>(p) = pk;
}

// xs[r] = x[token_of_row[r]] (zeros for -1), in units U of 2..16 bytes.
// TEACH: a warp per row turns a gather of rows into 32 lanes reading consecutive units: with U =
// uint4 one instruction moves 512 contiguous bytes (four full 128-byte lines), where v0's thread per
// row moves one byte per thread from 32 different rows.
template <class U>
__global__ void __launch_bounds__(kRowThreads)
    permute_forward_kernel(const U* x, int64_t x_stride, const int32_t* token_of_row, int64_t R, int64_t T,
                           int64_t units, U* xs) {
  for (int64_t r = first_row(); r < R; r += row_step()) {
    const int32_t t = token_of_row[r];
    U* dst = xs + r * units;
    if (t >= 0 && t < T) {
      const U* src = x + static_cast<int64_t>(t) * x_stride;
      for (int64_t u = lane_id(); u < units; u += 32) dst[u] = src[u];
    } else {
      for (int64_t u = lane_id(); u < units; u += 32) dst[u] = U{};
    }
  }
}

// out[t] = sum_k w[t, k] * src[row_of[t, k]] over valid rows, in k order (w == nullptr: weight 1).
// Serves permute_backward (no weights) and combine_forward.
template <class S, int V>
__global__ void __launch_bounds__(kRowThreads)
    gather_sum_kernel(const S* src, int64_t R, const int32_t* row_of, const float* weights, int64_t T, int32_t K,
                      int64_t H, S* out) {
  const int64_t chunks = H / V;
  for (int64_t t = first_row(); t < T; t += row_step()) {
    const int32_t* rows = row_of + t * K;
    for (int64_t u = lane_id(); u < chunks; u += 32) {
      float acc[V];
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = 0.0f;
      for (int k = 0; k < K; ++k) {
        const int32_t r = rows[k];
        if (r < 0 || r >= R) continue;
        float v[V];
        load_f32<S, V>(src + static_cast<int64_t>(r) * H + u * V, v);
        if (weights) {
          const float w = weights[t * K + k];
#pragma unroll
          for (int j = 0; j < V; ++j) acc[j] += w * v[j];
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) acc[j] += v[j];
        }
      }
      store_f32<S, V>(out + t * H + u * V, acc);
    }
  }
}

// inverse[row_of[a]] = a. A row referenced twice (the CPU backend rejects it) keeps the largest a:
// atomicMax on integers gives the same answer in every order.
// inverse[r * istride] = -1 for every row (istride: ints between two rows' slots).
__global__ void clear_inverse_kernel(int64_t R, int64_t istride, int32_t* inverse) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < R;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    inverse[r * istride] = -1;
  }
}

__global__ void invert_rows_kernel(const int32_t* row_of, int64_t n, int64_t R, int64_t istride, int32_t* inverse) {
  for (int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; a < n;
       a += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t r = row_of[a];
    if (r >= 0 && r < R) atomicMax(&inverse[r * istride], static_cast<int32_t>(a));
  }
}

// grad_ys[r] = weights[a] * grad_y[a / K] with a = inverse[r]; zeros where no (t, k) points to r.
template <class S, int V>
__global__ void __launch_bounds__(kRowThreads)
    scatter_grad_rows_kernel(const S* grad_y, int64_t gy_stride, const float* weights, const int32_t* inverse,
                             int64_t istride, int64_t R, int32_t K, int64_t H, S* grad_ys) {
  const int64_t chunks = H / V;
  for (int64_t r = first_row(); r < R; r += row_step()) {
    const int32_t a = inverse[r * istride];
    __syncwarp();  // the slot may live in this very row of grad_ys: every lane has read it before any store
    S* dst = grad_ys + r * H;
    if (a < 0) {
      float z[V];
#pragma unroll
      for (int j = 0; j < V; ++j) z[j] = 0.0f;
      for (int64_t u = lane_id(); u < chunks; u += 32) store_f32<S, V>(dst + u * V, z);
      continue;
    }
    const float w = weights[a];
    const S* g = grad_y + static_cast<int64_t>(a / K) * gy_stride;
    for (int64_t u = lane_id(); u < chunks; u += 32) {
      float v[V];
      load_f32<S, V>(g + u * V, v);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = w * v[j];
      store_f32<S, V>(dst + u * V, v);
    }
  }
}

// grad_ys[r] for rows too narrow (or misaligned) to hold the inverse map in place: the warp of row r
// finds the (t, k) that points at it by scanning row_of (the largest a, as atomicMax gives above),
// then writes the row. O(R * T * K) reads instead of O(T * K), but no scratch memory at all; only
// rows under 4 bytes or off 4-byte alignment (never a layer's shapes) come here.
template <class S>
__global__ void __launch_bounds__(kRowThreads)
    scatter_grad_rows_scan_kernel(const S* grad_y, int64_t gy_stride, const float* weights, const int32_t* row_of,
                                  int64_t n, int64_t R, int32_t K, int64_t H, S* grad_ys) {
  for (int64_t r = first_row(); r < R; r += row_step()) {
    int32_t found = -1;
    for (int64_t a = lane_id(); a < n; a += 32) {
      if (row_of[a] == r) found = static_cast<int32_t>(a);  // a grows: the lane keeps its largest
    }
    for (int o = 16; o > 0; o >>= 1) {
      const int32_t other = __shfl_xor_sync(kFullMask, found, o);
      found = other > found ? other : found;
    }
    S* dst = grad_ys + r * H;
    const float w = found >= 0 ? weights[found] : 0.0f;
    const S* g = found >= 0 ? grad_y + static_cast<int64_t>(found / K) * gy_stride : nullptr;
    for (int64_t h = lane_id(); h < H; h += 32) dst[h] = from_float<S>(g ? w * to_float(g[h]) : 0.0f);
  }
}

// grad_weights[a] = <grad_y[a / K], ys[row_of[a]]> (0 where dropped): one warp per (t, k).
template <class S, int V>
__global__ void __launch_bounds__(kRowThreads)
    combine_grad_weights_kernel(const S* grad_y, int64_t gy_stride, const S* ys, int64_t R, const int32_t* row_of,
                                int64_t n, int32_t K, int64_t H, float* grad_weights) {
  const int64_t chunks = H / V;
  for (int64_t a = first_row(); a < n; a += row_step()) {
    const int32_t r = row_of[a];
    float acc = 0.0f;
    if (r >= 0 && r < R) {
      const S* g = grad_y + (a / K) * gy_stride;
      const S* y = ys + static_cast<int64_t>(r) * H;
      for (int64_t u = lane_id(); u < chunks; u += 32) {
        float gv[V], yv[V];
        load_f32<S, V>(g + u * V, gv);
        load_f32<S, V>(y + u * V, yv);
#pragma unroll
        for (int j = 0; j < V; ++j) acc += gv[j] * yv[j];
      }
    }
    acc = warp_sum(acc);
    if (lane_id() == 0) grad_weights[a] = acc;
  }
}

// ---- host side ------------------------------------------------------------------------------------

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Elements per vector unit for rows of H elements of `elem` bytes: 16 / elem when every row start
// (base pointers and row strides in elements) lands on 16 bytes, else 1.
int vector_width(int64_t elem, int64_t H, std::initializer_list<const void*> ptrs,
                 std::initializer_list<int64_t> strides) {
  const int64_t v = 16 / elem;
  if (H % v != 0) return 1;
  for (const void* p : ptrs) {
    if (p && !aligned16(p)) return 1;
  }
  for (int64_t s : strides) {
    if (s % v != 0) return 1;
  }
  return static_cast<int>(v);
}

// Warps-per-row grid: one warp per row, capped (the kernels are grid-stride) at 64K blocks.
unsigned row_grid(int64_t rows) { return grid_for(rows, kRowWarps, 65536); }

template <class U>
Status launch_permute_forward(const TensorView& x, const TensorView& token_of_row, const TensorView& xs,
                              int64_t unit_bytes, cudaStream_t s) {
  const int64_t R = xs.size(0), elem = dtype_size(x.dtype);
  const int64_t units = x.size(1) * elem / unit_bytes;
  const int64_t x_stride = x.stride(0) * elem / unit_bytes;
  auto* kernel = &permute_forward_kernel<U>;
  // one warp per row of xs; lanes copy 16-byte units where aligned
  SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, dim3(row_grid(R)), dim3(kRowThreads), 0, s, static_cast<const U*>(x.data),
                              x_stride, token_of_row.data_as<const int32_t>(), R, x.size(0), units,
                              static_cast<U*>(xs.data)));
  return Status::Ok();
}

template <class S, int V>
Status launch_gather_sum(const TensorView& src, const TensorView& row_of, const float* weights, const TensorView& out,
                         cudaStream_t s) {
  const int64_t T = row_of.size(0);
  auto* kernel = &gather_sum_kernel<S, V>;
  // one warp per output token row, k loop inside: each output element is summed by one thread in k order
  SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, dim3(row_grid(T)), dim3(kRowThreads), 0, s, src.data_as<const S>(), src.size(0),
                              row_of.data_as<const int32_t>(), weights, T, static_cast<int32_t>(row_of.size(1)),
                              src.size(1), out.data_as<S>()));
  return Status::Ok();
}

template <class S>
Status gather_sum(const TensorView& src, const TensorView& row_of, const float* weights, const TensorView& out,
                  cudaStream_t s) {
  constexpr int kV = 16 / sizeof(S);
  if (vector_width(sizeof(S), src.size(1), {src.data, out.data}, {}) == kV) {
    return launch_gather_sum<S, kV>(src, row_of, weights, out, s);
  }
  return launch_gather_sum<S, 1>(src, row_of, weights, out, s);
}

}  // namespace

Status permute_forward(const TensorView& x, const TensorView& token_of_row, const TensorView& xs, void* stream) {
  if (kernel_version(KernelOp::kPermute) == 0) return permute_forward_v0(x, token_of_row, xs, stream);
  const int64_t R = xs.size(0), H = x.size(1), elem = dtype_size(x.dtype);
  if (R == 0 || H == 0) return Status::Ok();
  const cudaStream_t s = as_stream(stream);
  // The widest unit that divides the row, the row stride and both base addresses.
  const int64_t row_bytes = H * elem, stride_bytes = x.stride(0) * elem;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(x.data) | reinterpret_cast<uintptr_t>(xs.data);
  for (int64_t unit : {16, 8, 4, 2}) {
    if (unit < elem) break;
    if (row_bytes % unit != 0 || stride_bytes % unit != 0 || addr % unit != 0) continue;
    switch (unit) {
      case 16:
        return launch_permute_forward<uint4>(x, token_of_row, xs, unit, s);
      case 8:
        return launch_permute_forward<uint2>(x, token_of_row, xs, unit, s);
      case 4:
        return launch_permute_forward<unsigned int>(x, token_of_row, xs, unit, s);
      default:
        return launch_permute_forward<unsigned short>(x, token_of_row, xs, unit, s);
    }
  }
  return Status(Code::kInternal, "permute_forward: no copy unit fits the element size");
}

Status permute_backward(const TensorView& grad_xs, const TensorView& row_of, const TensorView& grad_x, void* stream) {
  if (kernel_version(KernelOp::kPermute) == 0) return permute_backward_v0(grad_xs, row_of, grad_x, stream);
  const int64_t T = row_of.size(0), H = grad_xs.size(1);
  if (T == 0 || H == 0) return Status::Ok();
  return dispatch_float(grad_xs.dtype, "permute_backward", [&](auto tag) -> Status {
    using S = typename decltype(tag)::type;
    return gather_sum<S>(grad_xs, row_of, nullptr, grad_x, as_stream(stream));
  });
}

Status combine_forward(const TensorView& ys, const TensorView& weights, const TensorView& row_of, const TensorView& y,
                       void* stream) {
  if (kernel_version(KernelOp::kCombine) == 0) return combine_forward_v0(ys, weights, row_of, y, stream);
  const int64_t T = row_of.size(0), H = ys.size(1);
  if (T == 0 || H == 0) return Status::Ok();
  return dispatch_float(ys.dtype, "combine_forward", [&](auto tag) -> Status {
    using S = typename decltype(tag)::type;
    return gather_sum<S>(ys, row_of, weights.data_as<const float>(), y, as_stream(stream));
  });
}

Status combine_backward(const TensorView& grad_y, const TensorView& ys, const TensorView& weights,
                        const TensorView& row_of, const TensorView& grad_ys, const TensorView& grad_weights,
                        void* stream) {
  if (kernel_version(KernelOp::kCombine) == 0) {
    return combine_backward_v0(grad_y, ys, weights, row_of, grad_ys, grad_weights, stream);
  }
  const int64_t T = row_of.size(0), K = row_of.size(1), H = grad_y.size(1);
  const int64_t R = grad_ys.defined() ? grad_ys.size(0) : ys.size(0);
  const cudaStream_t s = as_stream(stream);
  return dispatch_float(grad_y.dtype, "combine_backward", [&](auto tag) -> Status {
    using S = typename decltype(tag)::type;
    constexpr int kV = 16 / sizeof(S);
    const int64_t gy_stride = grad_y.stride(0);
    if (grad_ys.defined() && R > 0 && H > 0) {
      // Inverse map row -> (t, k). It lives in the first 4 bytes of each row of grad_ys itself (the row's
      // warp reads it before overwriting the row), so nothing is allocated. Rows narrower than 4 bytes
      // or not 4-byte aligned (never a layer's shapes) take the scanning kernel instead.
      const size_t row_bytes = sizeof(S) * static_cast<size_t>(H);
      const bool in_rows = row_bytes >= 4 && row_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(grad_ys.data) % 4 == 0;
      if (!in_rows) {
        // one warp per row of grad_ys, scanning row_of for the (t, k) that points at it
        SMOE_CUDA_CHECK(SMOE_LAUNCH(&scatter_grad_rows_scan_kernel<S>, dim3(row_grid(R)), dim3(kRowThreads), 0, s,
                                    grad_y.data_as<const S>(), gy_stride, weights.data_as<const float>(),
                                    row_of.data_as<const int32_t>(), T * K, R, static_cast<int32_t>(K), H,
                                    grad_ys.data_as<S>()));
      } else {
        int32_t* inverse = grad_ys.data_as<int32_t>();
        const int64_t istride = static_cast<int64_t>(row_bytes / 4);
        // thread per row
        SMOE_CUDA_CHECK(
            SMOE_LAUNCH(&clear_inverse_kernel, dim3(grid_for(R, 256)), dim3(256), 0, s, R, istride, inverse));
        if (T * K > 0) {
          // grid-stride over the T*K assignments
          SMOE_CUDA_CHECK(SMOE_LAUNCH(&invert_rows_kernel, dim3(grid_for(T * K, 256)), dim3(256), 0, s,
                                      row_of.data_as<const int32_t>(), T * K, R, istride, inverse));
        }
        const bool vec = vector_width(sizeof(S), H, {grad_y.data, grad_ys.data}, {gy_stride}) == kV;
        auto* kernel = vec ? &scatter_grad_rows_kernel<S, kV> : &scatter_grad_rows_kernel<S, 1>;
        // one warp per row of grad_ys: every row written once, zeros included
        SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, dim3(row_grid(R)), dim3(kRowThreads), 0, s, grad_y.data_as<const S>(),
                                    gy_stride, weights.data_as<const float>(), static_cast<const int32_t*>(inverse),
                                    istride, R, static_cast<int32_t>(K), H, grad_ys.data_as<S>()));
      }
    }
    if (grad_weights.defined() && T * K > 0) {
      const bool vec = vector_width(sizeof(S), H, {grad_y.data, ys.data}, {gy_stride}) == kV;
      auto* kernel = vec ? &combine_grad_weights_kernel<S, kV> : &combine_grad_weights_kernel<S, 1>;
      // one warp per (t, k) dot product of length H
      SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, dim3(row_grid(T * K)), dim3(kRowThreads), 0, s, grad_y.data_as<const S>(),
                                  gy_stride, ys.data_as<const S>(), ys.defined() ? ys.size(0) : 0,
                                  row_of.data_as<const int32_t>(), T * K, static_cast<int32_t>(K), H,
                                  grad_weights.data_as<float>()));
    }
    return Status::Ok();
  });
}

}  // namespace smoe::SMOE_CUDA_NS

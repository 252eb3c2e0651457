// Grouped GEMM v0 of the CUDA backend (include/smoe/ops/gemm.h): one thread per output element.
//
// The teaching version and the oracle of the tensor-core kernels (csrc/cuda/gemm_*.cu).
//   grouped_gemm_naive:       c[r, n] = sum_k a[r, k] * op(b[e])[k, n] for the expert e whose segment
//                             [offsets[e], offsets[e+1]) holds r, found by a binary search over the
//                             device offsets (no host copy). 2*R*N*Kd FLOPs; every thread reads a
//                             row of a and a column of op(b): (R*N*Kd*2) element loads, served by
//                             L1/L2 — arithmetic intensity ~0.25 FLOP/byte from L2, which is why the
//                             tiled tensor-core version exists.
//   grouped_gemm_wgrad_naive: c[e, m, n] = sum_{r in seg e} a[r, m] * b[r, n]; an empty segment gives
//                             exact zeros.
//   The *_gathered forms read a (forward) / b (wgrad) rows through token_of_row (-1: a zero row), as
//   the tensor-core kernels do for the expert MLP: the fallbacks of csrc/cuda/mlp.cu.
// f32 accumulation in k order (the same order for every element), one rounding on store.
#include "backend.h"
#include "common.cuh"

namespace smoe::SMOE_CUDA_NS {
namespace {

constexpr int kTile = 16;  // 16 x 16 threads: x over output columns (coalesced c and b^T-free loads)

// Expert of row r: the last e with offsets[e] <= r; -1 outside [offsets[0], offsets[E]).
__device__ __forceinline__ int expert_of_row(const int64_t* offsets, int32_t E, int64_t r) {
  if (r < offsets[0] || r >= offsets[E]) return -1;
  int lo = 0, hi = E - 1;  // invariant: offsets[lo] <= r < offsets[hi + 1]
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= r) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Row of a that row r reads: r, or gathered token_of_row[r] of an [a_rows, *] matrix; -1: a zero row.
__device__ __forceinline__ int64_t a_row(const int32_t* token_of_row, int64_t a_rows, int64_t r) {
  if (token_of_row == nullptr) return r;
  const int64_t t = token_of_row[r];
  return (t >= 0 && t < a_rows) ? t : -1;
}

template <class S>
__global__ void __launch_bounds__(kTile* kTile)
    grouped_gemm_naive_kernel(const S* a, int64_t lda, const int32_t* token_of_row, int64_t a_rows, const S* b,
                              int64_t b_expert_stride, bool trans_b, const int64_t* offsets, int32_t E, int64_t R,
                              int64_t N, int64_t Kd, S* c, int64_t ldc) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t r = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  if (n >= N || r >= R) return;
  const int e = expert_of_row(offsets, E, r);
  if (e < 0) return;  // rows outside every segment are left untouched
  const int64_t src = a_row(token_of_row, a_rows, r);
  if (src < 0) {  // a padding row: zeros
    c[r * ldc + n] = from_float<S>(0.0f);
    return;
  }
  const S* ar = a + src * lda;
  const S* be = b + e * b_expert_stride;
  float acc = 0.0f;
  for (int64_t k = 0; k < Kd; ++k) {
    const float bv = trans_b ? to_float(be[n * Kd + k]) : to_float(be[k * N + n]);
    acc += to_float(ar[k]) * bv;
  }
  c[r * ldc + n] = from_float<S>(acc);
}

template <class S>
__global__ void __launch_bounds__(kTile* kTile)
    grouped_gemm_wgrad_naive_kernel(const S* a, int64_t lda, const S* b, int64_t ldb, const int32_t* b_index,
                                    int64_t b_rows, const int64_t* offsets, int64_t R, int64_t M, int64_t N, S* c) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t m = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  const int64_t e = blockIdx.z;
  if (n >= N || m >= M) return;
  float acc = 0.0f;
  // segments clamped to [0, R), as the tensor-core kernels clamp them
  const int64_t lo = max(int64_t{0}, min(offsets[e], R)), hi = max(lo, min(offsets[e + 1], R));
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t src = a_row(b_index, b_rows, r);  // B's row of row r (gathered: b_index[r])
    if (src >= 0) acc += to_float(a[r * lda + m]) * to_float(b[src * ldb + n]);
  }
  c[(e * M + m) * N + n] = from_float<S>(acc);
}

}  // namespace

Status grouped_gemm_naive(const GroupedGemmParams& params, const TensorView& a, const TensorView& b,
                          const TensorView& offsets, const TensorView& c, void* stream) {
  return grouped_gemm_naive_gathered(params, a, b, offsets, TensorView{}, c, stream);
}

Status grouped_gemm_naive_gathered(const GroupedGemmParams& params, const TensorView& a, const TensorView& b,
                                   const TensorView& offsets, const TensorView& token_of_row, const TensorView& c,
                                   void* stream) {
  const bool gather = token_of_row.defined();
  const int64_t R = gather ? token_of_row.size(0) : a.size(0), Kd = a.size(1), N = c.size(1);
  const int32_t E = static_cast<int32_t>(offsets.size(0) - 1);
  if (R == 0 || N == 0 || E < 1) return Status::Ok();
  if (ceil_div(R, kTile) > 65535) {
    return unsupported("grouped_gemm", "R = " + std::to_string(R) + " rows exceeds the naive kernel's grid (" +
                                           std::to_string(65535 * kTile) + " rows); use the tiled kernel");
  }
  return dispatch_float(a.dtype, "grouped_gemm", [&](auto tag) -> Status {
    using S = typename decltype(tag)::type;
    auto* kernel = &grouped_gemm_naive_kernel<S>;
    // one thread per c[r, n]: 16 x 16 tiles, x over columns
    const dim3 grid(static_cast<unsigned>(ceil_div(N, kTile)), static_cast<unsigned>(ceil_div(R, kTile)));
    SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, grid, dim3(kTile, kTile), 0, as_stream(stream), a.data_as<const S>(),
                                a.stride(0), gather ? token_of_row.data_as<const int32_t>() : nullptr, a.size(0),
                                b.data_as<const S>(), b.stride(0), params.trans_b, offsets.data_as<const int64_t>(), E,
                                R, N, Kd, c.data_as<S>(), c.stride(0)));
    return Status::Ok();
  });
}

Status grouped_gemm_wgrad_naive(const TensorView& a, const TensorView& b, const TensorView& offsets,
                                const TensorView& c, void* stream) {
  return grouped_gemm_wgrad_naive_gathered(a, b, TensorView{}, offsets, c, stream);
}

Status grouped_gemm_wgrad_naive_gathered(const TensorView& a, const TensorView& b, const TensorView& b_token_of_row,
                                         const TensorView& offsets, const TensorView& c, void* stream) {
  const bool gather = b_token_of_row.defined();
  const int64_t M = a.size(1), N = b.size(1);
  const int64_t E = offsets.size(0) - 1;
  if (M == 0 || N == 0 || E < 1) return Status::Ok();
  if (ceil_div(M, kTile) > 65535 || E > 65535) {
    return unsupported("grouped_gemm_wgrad", "M or E beyond the naive kernel's grid; use the tiled kernel");
  }
  return dispatch_float(a.dtype, "grouped_gemm_wgrad", [&](auto tag) -> Status {
    using S = typename decltype(tag)::type;
    auto* kernel = &grouped_gemm_wgrad_naive_kernel<S>;
    // one thread per c[e, m, n]; blockIdx.z = expert
    const dim3 grid(static_cast<unsigned>(ceil_div(N, kTile)), static_cast<unsigned>(ceil_div(M, kTile)),
                    static_cast<unsigned>(E));
    SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, grid, dim3(kTile, kTile), 0, as_stream(stream), a.data_as<const S>(),
                                a.stride(0), b.data_as<const S>(), b.stride(0),
                                gather ? b_token_of_row.data_as<const int32_t>() : nullptr, b.size(0),
                                offsets.data_as<const int64_t>(), a.size(0), M, N, c.data_as<S>()));
    return Status::Ok();
  });
}

}  // namespace smoe::SMOE_CUDA_NS

// CPU backend of permute and combine: row gathers, parallel over output rows, so that every output
// row is written by exactly one thread and sums run in k order (deterministic, no float atomics).
//
// Versions, and why each exists:
//  * permute_forward is a pure copy, so it moves bytes (memcpy per row) and needs no dtype dispatch.
//  * the reductions (permute_backward, combine_forward) accumulate a row of H in the accumulation
//    type (f32, f64 for f64) in a per-chunk buffer that stays in L1/L2 and round once at the store;
//    the element loops take __restrict rows so that the compiler vectorizes them.
//  * combine_backward computes grad_ys and grad_weights from one pass over tokens (grad_y[t] is read
//    and converted once for its K rows); <grad_y, ys> uses 16 partial sums reduced by a fixed tree, so
//    it vectorizes and the order depends on H only. Rows that no (t, k) references are zeroed after.
#include "permute.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "parallel.h"

namespace smoe::cpu {
namespace {

template <class S>
using Acc = acc_t<S>;

// Elements per parallel chunk: enough work to amortize a task, small enough to balance 4097 tokens.
constexpr int64_t kElemsPerChunk = 16384;
int64_t rows_per_chunk(int64_t H) { return std::max<int64_t>(1, kElemsPerChunk / std::max<int64_t>(H, 1)); }

// ---- one row of H elements ---------------------------------------------------------------------

// Rounds an accumulator to the storage type. bf16: the same bits as float_to_bf16 (round to nearest
// even, NaN stays a quiet NaN) written without a branch, so that the store loops vectorize.
template <class S>
inline S round_to(Acc<S> v) {
  return from_acc<S>(v);
}
template <>
inline bf16_t round_to<bf16_t>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x0040u;
  return bf16_t{uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded)};
}

template <class S>
void load_row(Acc<S>* __restrict dst, const S* __restrict src, int64_t H) {
  for (int64_t h = 0; h < H; ++h) dst[h] = to_acc<S>(src[h]);
}

template <class S>
void add_row(Acc<S>* __restrict acc, const S* __restrict src, int64_t H) {
  for (int64_t h = 0; h < H; ++h) acc[h] += to_acc<S>(src[h]);
}

template <class S>
void axpy_row(Acc<S>* __restrict acc, Acc<S> w, const S* __restrict src, int64_t H) {
  for (int64_t h = 0; h < H; ++h) acc[h] += w * to_acc<S>(src[h]);
}

template <class S>
void store_row(S* __restrict dst, const Acc<S>* __restrict acc, int64_t H) {
  for (int64_t h = 0; h < H; ++h) dst[h] = round_to<S>(acc[h]);
}

template <class S>
void scale_store_row(S* __restrict dst, Acc<S> w, const Acc<S>* __restrict g, int64_t H) {
  for (int64_t h = 0; h < H; ++h) dst[h] = round_to<S>(w * g[h]);
}

// <g, y> with kLanes partial sums (lane j takes h = j mod kLanes) reduced by a fixed pairwise tree:
// vectorizable without -ffast-math, and the summation order depends on H only.
template <class S>
Acc<S> dot_row(const Acc<S>* __restrict g, const S* __restrict y, int64_t H) {
  constexpr int kLanes = 16;
  Acc<S> part[kLanes] = {};
  int64_t h = 0;
  for (; h + kLanes <= H; h += kLanes) {
    for (int j = 0; j < kLanes; ++j) part[j] += g[h + j] * to_acc<S>(y[h + j]);
  }
  for (int j = 0; h < H; ++h, ++j) part[j] += g[h] * to_acc<S>(y[h]);
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    for (int j = 0; j < width; ++j) part[j] += part[j + width];
  }
  return part[0];
}

// ---- index checks (they need the data, so they live here) ----------------------------------------

// Index of the first value of idx[0, count) outside [-1, n), or -1 when all are in range.
int64_t first_out_of_range(const int32_t* idx, int64_t count, int64_t n) {
  for (int64_t i = 0; i < count; ++i) {
    if (idx[i] < -1 || idx[i] >= n) return i;
  }
  return -1;
}

Status check_row_of(const char* op, const int32_t* row_of, int64_t T, int64_t K, int64_t R, const char* r_meaning) {
  const int64_t i = first_out_of_range(row_of, T * K, R);
  if (i < 0) return Status::Ok();
  return invalid_argument(
      op, "row_of", "values in [-1, " + std::to_string(R) + ") (" + r_meaning + ")",
      std::to_string(row_of[i]) + " at (t, k) = (" + std::to_string(i / K) + ", " + std::to_string(i % K) + ")");
}

}  // namespace

Status permute_forward(const TensorView& x, const TensorView& token_of_row, const TensorView& xs) {
  const int64_t T = x.size(0), H = x.size(1), R = xs.size(0);
  const int64_t x_stride = x.stride(0);
  const int32_t* tor = token_of_row.data_as<const int32_t>();  // [R]
  if (const int64_t r = first_out_of_range(tor, R, T); r >= 0) {
    return invalid_argument("permute_forward", "token_of_row",
                            "values in [-1, " + std::to_string(T) + ") (T = x.size(0))",
                            std::to_string(tor[r]) + " at row " + std::to_string(r));
  }
  // A gather of whole rows: bytes, whatever the float type (all-zero bits are +0 in every one).
  const int64_t elem = dtype_size(x.dtype), row_bytes = H * elem;
  const auto* src = x.data_as<const uint8_t>();  // [T, x_stride]
  auto* dst = xs.data_as<uint8_t>();             // [R, H]
  parallel_for(R, rows_per_chunk(H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t t = tor[r];
      if (t < 0) {
        std::memset(dst + r * row_bytes, 0, size_t(row_bytes));
      } else {
        std::memcpy(dst + r * row_bytes, src + int64_t(t) * x_stride * elem, size_t(row_bytes));
      }
    }
  });
  return Status::Ok();
}

Status permute_backward(const TensorView& grad_xs, const TensorView& row_of, const TensorView& grad_x) {
  const int64_t R = grad_xs.size(0), H = grad_xs.size(1), T = row_of.size(0), K = row_of.size(1);
  const int32_t* rof = row_of.data_as<const int32_t>();  // [T, K]
  SMOE_RETURN_IF_ERROR(check_row_of("permute_backward", rof, T, K, R, "R = grad_xs.size(0)"));
  SMOE_RETURN_IF_ERROR(dtypes::dispatch_float(grad_xs.dtype, "permute_backward", [&](auto tag) {
    using S = typename decltype(tag)::type;
    const S* gxs = grad_xs.data_as<const S>();  // [R, H]
    S* gx = grad_x.data_as<S>();                // [T, H]
    parallel_for(T, rows_per_chunk(H * K), [&](int64_t t0, int64_t t1) {
      std::vector<Acc<S>> acc(static_cast<size_t>(H));  // [H]
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), Acc<S>(0));
        for (int64_t k = 0; k < K; ++k) {
          const int32_t r = rof[t * K + k];
          if (r >= 0) add_row<S>(acc.data(), gxs + int64_t(r) * H, H);
        }
        store_row<S>(gx + t * H, acc.data(), H);
      }
    });
    return Status::Ok();
  }));
  return Status::Ok();
}

Status combine_forward(const TensorView& ys, const TensorView& weights, const TensorView& row_of, const TensorView& y) {
  const int64_t R = ys.size(0), H = ys.size(1), T = row_of.size(0), K = row_of.size(1);
  const int32_t* rof = row_of.data_as<const int32_t>();  // [T, K]
  SMOE_RETURN_IF_ERROR(check_row_of("combine_forward", rof, T, K, R, "R = ys.size(0)"));
  SMOE_RETURN_IF_ERROR(dtypes::dispatch_float(ys.dtype, "combine_forward", [&](auto tag) {
    using S = typename decltype(tag)::type;
    const S* src = ys.data_as<const S>();               // [R, H]
    const Acc<S>* w = weights.data_as<const Acc<S>>();  // [T, K]
    S* out = y.data_as<S>();                            // [T, H]
    parallel_for(T, rows_per_chunk(H * K), [&](int64_t t0, int64_t t1) {
      std::vector<Acc<S>> acc(static_cast<size_t>(H));  // [H]
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), Acc<S>(0));
        for (int64_t k = 0; k < K; ++k) {
          const int32_t r = rof[t * K + k];
          if (r >= 0) axpy_row<S>(acc.data(), w[t * K + k], src + int64_t(r) * H, H);
        }
        store_row<S>(out + t * H, acc.data(), H);
      }
    });
    return Status::Ok();
  }));
  return Status::Ok();
}

Status combine_backward(const TensorView& grad_y, const TensorView& ys, const TensorView& weights,
                        const TensorView& row_of, const TensorView& grad_ys, const TensorView& grad_weights) {
  const int64_t T = row_of.size(0), K = row_of.size(1), H = grad_y.size(1);
  const int64_t R = grad_ys.defined() ? grad_ys.size(0) : ys.size(0);
  const int32_t* rof = row_of.data_as<const int32_t>();  // [T, K]
  SMOE_RETURN_IF_ERROR(
      check_row_of("combine_backward", rof, T, K, R, grad_ys.defined() ? "R = grad_ys.size(0)" : "R = ys.size(0)"));
  // owner[r]: the (t, k) whose gradient row r receives, -1 if none. grad_ys[r] = w * grad_y[t] is
  // only well defined when at most one (t, k) references r, so a second reference is an error.
  if (H == 0) {  // grad_ys has no elements; every dot product is empty
    if (grad_weights.defined()) {
      SMOE_RETURN_IF_ERROR(dtypes::dispatch_float(grad_y.dtype, "combine_backward", [&](auto tag) {
        using S = typename decltype(tag)::type;
        std::fill(grad_weights.data_as<Acc<S>>(), grad_weights.data_as<Acc<S>>() + T * K, Acc<S>(0));
        return Status::Ok();
      }));
    }
    return Status::Ok();
  }
  std::vector<int32_t> owner;
  if (grad_ys.defined()) {
    owner.assign(size_t(R), -1);
    for (int64_t a = 0; a < T * K; ++a) {
      const int32_t r = rof[a];
      if (r < 0) continue;
      if (owner[r] >= 0) {
        return invalid_argument("combine_backward", "row_of", "each row referenced by at most one (t, k)",
                                "row " + std::to_string(r) + " at (t, k) = (" + std::to_string(owner[r] / K) + ", " +
                                    std::to_string(owner[r] % K) + ") and (" + std::to_string(a / K) + ", " +
                                    std::to_string(a % K) + ")");
      }
      owner[r] = int32_t(a);
    }
  }
  SMOE_RETURN_IF_ERROR(dtypes::dispatch_float(grad_y.dtype, "combine_backward", [&](auto tag) {
    using S = typename decltype(tag)::type;
    const S* gy = grad_y.data_as<const S>();  // [T, gy_stride]
    const int64_t gy_stride = grad_y.stride(0);
    const S* src = ys.data_as<const S>();               // [R, H] (absent without grad_weights)
    const Acc<S>* w = weights.data_as<const Acc<S>>();  // [T, K]
    S* gys = grad_ys.data_as<S>();                      // [R, H] or null
    Acc<S>* gw = grad_weights.data_as<Acc<S>>();        // [T, K] or null
    parallel_for(T, rows_per_chunk(H * K), [&](int64_t t0, int64_t t1) {
      std::vector<Acc<S>> g(static_cast<size_t>(H));  // [H] grad_y[t] in the accumulation type
      for (int64_t t = t0; t < t1; ++t) {
        load_row<S>(g.data(), gy + t * gy_stride, H);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t a = t * K + k;
          const int32_t r = rof[a];
          if (r < 0) {
            if (gw) gw[a] = Acc<S>(0);
            continue;
          }
          if (gys) scale_store_row<S>(gys + int64_t(r) * H, w[a], g.data(), H);
          if (gw) gw[a] = dot_row<S>(g.data(), src + int64_t(r) * H, H);
        }
      }
    });
    if (gys) {
      parallel_for(R, rows_per_chunk(H), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          if (owner[r] < 0) std::memset(gys + r * H, 0, size_t(H) * sizeof(S));
        }
      });
    }
    return Status::Ok();
  }));
  return Status::Ok();
}

}  // namespace smoe::cpu

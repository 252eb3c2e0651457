// CPU grouped GEMM over expert segments: the grouped tiling, and the file of the ladder's overview.
// Files: gemm_blocked.cpp (v0), blas.cpp (the BLAS glue), gemm_avx512.cpp (f32 AVX-512),
// gemm_bf16.cpp (bf16 dot products), this file (tiles over the thread pool).
//
// Versions, each one line on why the next is faster:
//   gemm_blocked   smoe's own cache-blocked GEMM (packed panels, register-tile micro-kernel): the
//                  fallback when the build has no BLAS, and the readable version;
//   gemm_serial    one single-threaded BLAS call (OpenBLAS kernels are hand-tuned assembly);
//   grouped_gemm   cuts every expert segment into fixed tiles and spreads the tiles over smoe's thread
//                  pool, each tile one single-threaded BLAS call. Measured on the 2-core dev machine,
//                  this beats letting OpenBLAS thread inside each call for many small experts
//                  (fine-grained MoE) and matches it for a few large ones (Mixtral), so there is one
//                  path for both. f16 (and bf16 on CPUs without AVX512-BF16) tiles are widened to f32
//                  panels, multiplied with sgemm and rounded once on store;
//   sgemm_avx512   (gemm_avx512.cpp) f32 on CPUs with AVX-512F: 16-lane FMAs where OpenBLAS, pinned to
//                  its AVX2 Haswell kernels by the workplace's OPENBLAS_CORETYPE, uses 8; measured
//                  1.7-2.0x the OpenBLAS tiles at the benchmark shapes (docs/cpu.md). It packs its own
//                  operands, so it takes whole segments per tile; f16 and bf16 f32 panels use it too;
//   gemm_bf16_dp   bf16 on CPUs with AVX512-BF16: vdpbf16ps does two bf16 products per f32 lane, twice
//                  the f32 FMA rate, on operands packed straight from bf16 (no f32 copies); measured
//                  about 3x the f32 path above on the dev machine (whose OpenBLAS 0.3.21 runs its AVX2
//                  Haswell kernels on this Zen 5 CPU).
//
// Determinism: the tiling depends on the shapes only, never on the thread count, and OpenBLAS runs
// single-threaded (it never splits the reduction then), so every output element comes from the
// same call with the same reduction order whatever thread computes it (sgemm_avx512's order depends
// on K alone).
#include "cpu/gemm.h"

#include <algorithm>
#include <bit>
#include <string>
#include <vector>

#include "cpu/gemm_bf16.h"
#include "cpu/parallel.h"

namespace smoe::cpu {

Status check_offsets(const char* op, const TensorView& offsets, int64_t R) {
  const int64_t* o = offsets.data_as<const int64_t>();
  const int64_t E = offsets.size(0) - 1;
  if (o[0] < 0) return invalid_argument(op, "offsets", "offsets[0] >= 0", std::to_string(o[0]));
  for (int64_t e = 0; e < E; ++e) {
    if (o[e + 1] < o[e]) {
      return invalid_argument(op, "offsets", "non-decreasing values",
                              "offsets[" + std::to_string(e + 1) + "] = " + std::to_string(o[e + 1]) + " < offsets[" +
                                  std::to_string(e) + "] = " + std::to_string(o[e]));
    }
  }
  if (o[E] > R) {
    return invalid_argument(op, "offsets", "offsets[E] <= R = " + std::to_string(R) + " (rows of a)",
                            std::to_string(o[E]));
  }
  return Status::Ok();
}

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- conversions between the 16-bit storage types and f32 panels --------------------------------

[[gnu::target_clones("avx512f", "avx2", "default")]] void widen(const bf16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(uint32_t(src[i].bits) << 16);  // the top half
}
// float_to_bf16 without branches, so that the loop vectorises: round to nearest even, NaN stays quiet.
[[gnu::target_clones("avx512f", "avx2", "default")]] void narrow(const float* src, bf16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = std::bit_cast<uint32_t>(src[i]);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    dst[i].bits = uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
  }
}
void widen(const f16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(src[i]);
}
void narrow(const float* src, f16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_f16(src[i]);
}

// ---- tiles and their distribution over threads -------------------------------------------------

// A tile: rows [r0, r1) of expert e's segment (or, for wgrad, rows [r0, r1) of c[e]) x columns [n0, n1).
struct Tile {
  int64_t e, r0, r1, n0, n1;
  double cost;  // flops, for balancing
};

// Rows per tile: big enough that one BLAS call amortises its packing of b, small enough that a few
// experts still give every thread work.
constexpr int64_t kTileRows = 256;
// The bf16 dot-product path and the AVX-512 f32 GEMM pack their own operands, so they take a whole
// expert segment per tile (up to this many rows): b[e] is then packed once per call.
constexpr int64_t kDpTileRows = 1024;
// With fewer row tiles than this, columns are split too (e.g. a decode step with a handful of rows).
constexpr int64_t kMinTiles = 16;
constexpr int64_t kMinTileCols = 128;

// Column split for `row_tiles` row tiles over N columns; depends on the shapes only.
int64_t tile_cols(int64_t row_tiles, int64_t N) {
  if (row_tiles >= kMinTiles) return N;
  const int64_t splits = ceil_div(kMinTiles, std::max<int64_t>(row_tiles, 1));
  return std::max(kMinTileCols, ceil_div(ceil_div(N, splits), 64) * 64);
}

// Runs fn(tile, scratch_slot) over all tiles: thread p gets a contiguous run of tiles holding about
// 1/threads of the flops. Which thread runs a tile does not change its result.
template <class F>
void run_tiles(const std::vector<Tile>& tiles, F&& fn) {
  if (tiles.empty()) return;
  const int parts = std::max(1, std::min<int>(usable_threads(), int(tiles.size())));
  std::vector<double> prefix(tiles.size() + 1, 0.0);
  for (size_t i = 0; i < tiles.size(); ++i) prefix[i + 1] = prefix[i] + tiles[i].cost;
  std::vector<size_t> start(size_t(parts) + 1, tiles.size());
  start[0] = 0;
  for (int p = 1; p < parts; ++p) {
    const double target = prefix.back() * p / parts;
    size_t i = start[p - 1];
    while (i < tiles.size() && prefix[i] + 0.5 * tiles[i].cost < target) ++i;
    start[p] = i;
  }
  parallel_for(parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p)
      for (size_t i = start[p]; i < start[p + 1]; ++i) fn(tiles[i]);
  });
}

// Scratch f32 panels of one thread for the 16-bit paths, reused across calls.
struct Panels {
  std::vector<float> a, b, c;
};
Panels& thread_panels() {
  thread_local Panels p;
  return p;
}
float* grow(std::vector<float>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
  return v.data();
}

// One f32 tile: smoe's AVX-512 GEMM where the CPU has AVX-512F (and it is enabled), else the BLAS.
void sgemm_tile(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* a, int64_t lda,
                const float* b, int64_t ldb, float* c, int64_t ldc) {
  if (use_sgemm_avx512()) {
    sgemm_avx512(trans_a, trans_b, M, N, K, a, lda, b, ldb, c, ldc);
  } else {
    gemm_serial<float>(trans_a, trans_b, M, N, K, a, lda, b, ldb, c, ldc);
  }
}

// Whether a tile of T goes to a kernel that packs its operands itself (and so wants big tiles).
template <class T>
bool packs_own_operands() {
  if constexpr (std::is_same_v<T, bf16_t>) return use_bf16_dp();
  if constexpr (std::is_same_v<T, float>) return use_sgemm_avx512();
  return false;
}

// c[seg_e] = a[seg_e] @ op(b[e]).   a [R, Kd], b [E, N, Kd] (trans_b) or [E, Kd, N], c [R, N]
template <class T>
void grouped_gemm_typed(bool trans_b, const TensorView& a, const TensorView& b, const int64_t* offsets, int64_t E,
                        const TensorView& c) {
  using Acc = typename AccOf<T>::type;
  const int64_t Kd = a.size(1), N = c.size(1);
  const int64_t lda = a.stride(0), ldc = c.stride(0);
  const int64_t expert_stride = b.stride(0);  // N * Kd
  const T* pa = a.data_as<const T>();
  const T* pb = b.data_as<const T>();
  T* pc = c.data_as<T>();

  const bool dp = std::is_same_v<T, bf16_t> && use_bf16_dp();
  const int64_t tile_rows = packs_own_operands<T>() ? kDpTileRows : kTileRows;
  int64_t row_tiles = 0;
  for (int64_t e = 0; e < E; ++e) row_tiles += ceil_div(offsets[e + 1] - offsets[e], tile_rows);
  const int64_t nb = tile_cols(row_tiles, N);
  std::vector<Tile> tiles;
  tiles.reserve(size_t(row_tiles * ceil_div(N, nb)));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r0 = offsets[e]; r0 < offsets[e + 1]; r0 += tile_rows)
      for (int64_t n0 = 0; n0 < N; n0 += nb) {
        const int64_t r1 = std::min(r0 + tile_rows, offsets[e + 1]), n1 = std::min(n0 + nb, N);
        tiles.push_back({e, r0, r1, n0, n1, double(r1 - r0) * double(n1 - n0) * double(Kd)});
      }

  run_tiles(tiles, [&](const Tile& t) {
    const int64_t m = t.r1 - t.r0, n = t.n1 - t.n0;
    // Columns [n0, n1) of op(b[e]): rows n0.. of b[e] when transposed, else columns n0.. of each row.
    const T* bt = pb + t.e * expert_stride + (trans_b ? t.n0 * Kd : t.n0);
    const int64_t ldb = trans_b ? Kd : N;
    if constexpr (std::is_same_v<T, bf16_t>) {
      if (dp) {
        const Operand16 A{reinterpret_cast<const uint16_t*>(pa + t.r0 * lda), lda, false};
        const Operand16 B{reinterpret_cast<const uint16_t*>(bt), ldb, !trans_b};
        gemm_bf16_dp(A, B, m, n, Kd, reinterpret_cast<uint16_t*>(pc + t.r0 * ldc + t.n0), ldc);
        return;
      }
    }
    if constexpr (std::is_same_v<T, float>) {
      sgemm_tile(false, trans_b, m, n, Kd, pa + t.r0 * lda, lda, bt, ldb, pc + t.r0 * ldc + t.n0, ldc);
    } else if constexpr (std::is_same_v<T, Acc>) {
      gemm_serial<Acc>(false, trans_b, m, n, Kd, pa + t.r0 * lda, lda, bt, ldb, pc + t.r0 * ldc + t.n0, ldc);
    } else {
      // Widen the a rows and the b block to dense f32 panels, multiply, round once on store.
      Panels& s = thread_panels();
      float* fa = grow(s.a, m * Kd);
      float* fb = grow(s.b, n * Kd);
      float* fc = grow(s.c, m * n);
      for (int64_t i = 0; i < m; ++i) widen(pa + (t.r0 + i) * lda, fa + i * Kd, Kd);
      if (trans_b) {
        widen(bt, fb, n * Kd);  // rows n0..n1 of b[e] are contiguous
      } else {
        for (int64_t k = 0; k < Kd; ++k) widen(bt + k * N, fb + k * n, n);
      }
      sgemm_tile(false, trans_b, m, n, Kd, fa, Kd, fb, trans_b ? Kd : n, fc, n);
      for (int64_t i = 0; i < m; ++i) narrow(fc + i * n, pc + (t.r0 + i) * ldc + t.n0, n);
    }
  });
}

// c[e] = a[seg_e]^T @ b[seg_e].   a [R, M], b [R, N], c [E, M, N]
template <class T>
void grouped_gemm_wgrad_typed(const TensorView& a, const TensorView& b, const int64_t* offsets, int64_t E,
                              const TensorView& c) {
  using Acc = typename AccOf<T>::type;
  const int64_t M = a.size(1), N = b.size(1);
  const int64_t lda = a.stride(0), ldb = b.stride(0);
  const T* pa = a.data_as<const T>();
  const T* pb = b.data_as<const T>();
  T* pc = c.data_as<T>();

  // Tiles cut c[e] into row blocks of M (never the reduction over the segment, which would make the
  // sum order depend on the tiling); an empty segment still gets tiles, which write zeros.
  const bool dp = std::is_same_v<T, bf16_t> && use_bf16_dp();
  const int64_t tile_rows = packs_own_operands<T>() ? kDpTileRows : kTileRows;
  const int64_t row_tiles = E * ceil_div(M, tile_rows);
  const int64_t nb = tile_cols(row_tiles, N);
  std::vector<Tile> tiles;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r0 = 0; r0 < M; r0 += tile_rows)
      for (int64_t n0 = 0; n0 < N; n0 += nb) {
        const int64_t r1 = std::min(r0 + tile_rows, M), n1 = std::min(n0 + nb, N);
        const double rows = double(offsets[e + 1] - offsets[e]);
        tiles.push_back({e, r0, r1, n0, n1, double(r1 - r0) * double(n1 - n0) * (rows + 1.0)});
      }

  run_tiles(tiles, [&](const Tile& t) {
    const int64_t m = t.r1 - t.r0, n = t.n1 - t.n0;
    const int64_t s0 = offsets[t.e], rows = offsets[t.e + 1] - s0;
    T* ct = pc + t.e * M * N + t.r0 * N + t.n0;
    if constexpr (std::is_same_v<T, bf16_t>) {
      if (dp) {  // A(m, r) = a[s0 + r, r0 + m], B(n, r) = b[s0 + r, n0 + n]: both k-major
        const Operand16 A{reinterpret_cast<const uint16_t*>(pa + s0 * lda + t.r0), lda, true};
        const Operand16 B{reinterpret_cast<const uint16_t*>(pb + s0 * ldb + t.n0), ldb, true};
        gemm_bf16_dp(A, B, m, n, rows, reinterpret_cast<uint16_t*>(ct), N);
        return;
      }
    }
    if constexpr (std::is_same_v<T, float>) {
      sgemm_tile(true, false, m, n, rows, pa + s0 * lda + t.r0, lda, pb + s0 * ldb + t.n0, ldb, ct, N);
    } else if constexpr (std::is_same_v<T, Acc>) {
      gemm_serial<Acc>(true, false, m, n, rows, pa + s0 * lda + t.r0, lda, pb + s0 * ldb + t.n0, ldb, ct, N);
    } else {
      Panels& s = thread_panels();
      float* fa = grow(s.a, std::max<int64_t>(rows * m, 1));
      float* fb = grow(s.b, std::max<int64_t>(rows * n, 1));
      float* fc = grow(s.c, m * n);
      for (int64_t i = 0; i < rows; ++i) {
        widen(pa + (s0 + i) * lda + t.r0, fa + i * m, m);
        widen(pb + (s0 + i) * ldb + t.n0, fb + i * n, n);
      }
      sgemm_tile(true, false, m, n, rows, fa, m, fb, n, fc, n);
      for (int64_t i = 0; i < m; ++i) narrow(fc + i * n, ct + i * N, n);
    }
  });
}

}  // namespace

Status grouped_gemm_prechecked(const GroupedGemmParams& params, const TensorView& a, const TensorView& b,
                               const TensorView& offsets, const TensorView& c) {
  const int64_t E = offsets.size(0) - 1;
  return dtypes::dispatch_float(a.dtype, "grouped_gemm", [&](auto tag) {
    grouped_gemm_typed<typename decltype(tag)::type>(params.trans_b, a, b, offsets.data_as<const int64_t>(), E, c);
    return Status::Ok();
  });
}

Status grouped_gemm_wgrad_prechecked(const TensorView& a, const TensorView& b, const TensorView& offsets,
                                     const TensorView& c) {
  const int64_t E = offsets.size(0) - 1;
  return dtypes::dispatch_float(a.dtype, "grouped_gemm_wgrad", [&](auto tag) {
    grouped_gemm_wgrad_typed<typename decltype(tag)::type>(a, b, offsets.data_as<const int64_t>(), E, c);
    return Status::Ok();
  });
}

Status grouped_gemm(const GroupedGemmParams& params, const TensorView& a, const TensorView& b,
                    const TensorView& offsets, const TensorView& c) {
  SMOE_RETURN_IF_ERROR(check_offsets("grouped_gemm", offsets, a.size(0)));
  return grouped_gemm_prechecked(params, a, b, offsets, c);
}

Status grouped_gemm_wgrad(const TensorView& a, const TensorView& b, const TensorView& offsets, const TensorView& c) {
  SMOE_RETURN_IF_ERROR(check_offsets("grouped_gemm_wgrad", offsets, a.size(0)));
  return grouped_gemm_wgrad_prechecked(a, b, offsets, c);
}

}  // namespace smoe::cpu

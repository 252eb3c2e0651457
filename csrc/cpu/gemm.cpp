// CPU grouped GEMM over expert segments.
//
// Versions, each one line on why the next is faster:
//   gemm_blocked   smoe's own cache-blocked GEMM (packed panels, register-tile micro-kernel): the
//                  fallback when the build has no BLAS, and the readable version;
//   gemm_serial    one single-threaded BLAS call (OpenBLAS kernels are hand-tuned assembly);
//   grouped_gemm   cuts every expert segment into fixed tiles and spreads the tiles over smoe's thread
//                  pool, each tile one single-threaded BLAS call. Measured on the 2-core dev machine,
//                  this beats letting OpenBLAS thread inside each call for many small experts
//                  (fine-grained MoE) and matches it for a few large ones (Mixtral), so there is one
//                  path for both. bf16/f16 tiles are widened to f32 panels, multiplied with sgemm and
//                  rounded once on store.
//
// Determinism: the tiling depends on the shapes only, never on the thread count, and OpenBLAS runs
// single-threaded (it never splits the reduction then), so every output element comes from the
// same call with the same reduction order whatever thread computes it.
#include "cpu/gemm.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/blas.h"
#include "cpu/parallel.h"

namespace smoe::cpu {
namespace {

// ---- smoe's own blocked GEMM -------------------------------------------------------------------

// Register tile of the micro-kernel: kMr rows x (2 vectors of 64 bytes) columns.
constexpr int kMr = 6;
template <class Acc> constexpr int kNr = 2 * 64 / int(sizeof(Acc));
// Cache blocks: a kKc x kNc panel of b stays in L2 while kMc x kKc panels of a stream through L1.
constexpr int64_t kKc = 256;
constexpr int64_t kMc = 96;
constexpr int64_t kNc = 1024;

// c_tile[kMr][kNr] = ap[kc][kMr]^T-panel x bp[kc][kNr]-panel, summed over k in order.
template <class Acc>
[[gnu::always_inline]] inline void micro_kernel(int64_t kc, const Acc* ap, const Acc* bp, Acc* tile) {
  constexpr int nr = kNr<Acc>;
  Acc acc[kMr][nr];
  for (int i = 0; i < kMr; ++i)
    for (int j = 0; j < nr; ++j) acc[i][j] = Acc(0);
  for (int64_t k = 0; k < kc; ++k) {
    const Acc* bk = bp + k * nr;
    for (int i = 0; i < kMr; ++i) {
      const Acc av = ap[k * kMr + i];
      for (int j = 0; j < nr; ++j) acc[i][j] += av * bk[j];
    }
  }
  for (int i = 0; i < kMr; ++i)
    for (int j = 0; j < nr; ++j) tile[i * nr + j] = acc[i][j];
}

// One clone per ISA; the pack and store loops stay scalar-generic, the FLOPs are all in here.
[[gnu::target_clones("avx512f", "avx2", "default")]] void micro_kernel_f32(int64_t kc, const float* ap,
                                                                            const float* bp, float* tile) {
  micro_kernel<float>(kc, ap, bp, tile);
}
[[gnu::target_clones("avx512f", "avx2", "default")]] void micro_kernel_f64(int64_t kc, const double* ap,
                                                                            const double* bp, double* tile) {
  micro_kernel<double>(kc, ap, bp, tile);
}
inline void micro(int64_t kc, const float* ap, const float* bp, float* tile) { micro_kernel_f32(kc, ap, bp, tile); }
inline void micro(int64_t kc, const double* ap, const double* bp, double* tile) {
  micro_kernel_f64(kc, ap, bp, tile);
}

}  // namespace

template <class Acc>
void gemm_blocked(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const Acc* a, int64_t lda,
                  const Acc* b, int64_t ldb, Acc* c, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(c + m * ldc, c + m * ldc + N, Acc(0));
    return;
  }
  constexpr int nr = kNr<Acc>;
  auto A = [&](int64_t m, int64_t k) { return trans_a ? a[k * lda + m] : a[m * lda + k]; };
  auto B = [&](int64_t k, int64_t n) { return trans_b ? b[n * ldb + k] : b[k * ldb + n]; };
  std::vector<Acc> bp(size_t(kKc * kNc)), ap(size_t(kMc * kKc)), tile(size_t(kMr * nr));
  for (int64_t jc = 0; jc < N; jc += kNc) {
    const int64_t nc = std::min(kNc, N - jc);
    for (int64_t pc = 0; pc < K; pc += kKc) {
      const int64_t kc = std::min(kKc, K - pc);
      // bp: panels of nr columns, each [kc][nr], zero-padded past N.
      for (int64_t j0 = 0; j0 < nc; j0 += nr) {
        Acc* panel = bp.data() + j0 * kc;
        for (int64_t k = 0; k < kc; ++k)
          for (int j = 0; j < nr; ++j) panel[k * nr + j] = j0 + j < nc ? B(pc + k, jc + j0 + j) : Acc(0);
      }
      for (int64_t ic = 0; ic < M; ic += kMc) {
        const int64_t mc = std::min(kMc, M - ic);
        for (int64_t i0 = 0; i0 < mc; i0 += kMr) {
          Acc* panel = ap.data() + i0 * kc;
          for (int64_t k = 0; k < kc; ++k)
            for (int i = 0; i < kMr; ++i) panel[k * kMr + i] = i0 + i < mc ? A(ic + i0 + i, pc + k) : Acc(0);
        }
        for (int64_t j0 = 0; j0 < nc; j0 += nr) {
          for (int64_t i0 = 0; i0 < mc; i0 += kMr) {
            micro(kc, ap.data() + i0 * kc, bp.data() + j0 * kc, tile.data());
            const int64_t mi = std::min<int64_t>(kMr, mc - i0), nj = std::min<int64_t>(nr, nc - j0);
            for (int64_t i = 0; i < mi; ++i) {
              Acc* crow = c + (ic + i0 + i) * ldc + jc + j0;
              const Acc* trow = tile.data() + i * nr;
              // The first K block writes, later ones add: c never has to be pre-zeroed.
              if (pc == 0) {
                for (int64_t j = 0; j < nj; ++j) crow[j] = trow[j];
              } else {
                for (int64_t j = 0; j < nj; ++j) crow[j] += trow[j];
              }
            }
          }
        }
      }
    }
  }
}

namespace {

#if SMOE_HAVE_BLAS
// smoe drives OpenBLAS single-threaded from its own pool (see the file comment); set once.
void blas_single_threaded() {
  static std::once_flag once;
  std::call_once(once, [] { SMOE_BLAS_FN(openblas_set_num_threads)(1); });
}
#endif

}  // namespace

template <class Acc>
void gemm_serial(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const Acc* a, int64_t lda,
                 const Acc* b, int64_t ldb, Acc* c, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // not left to the BLAS: the reference BLAS would leave c untouched
    for (int64_t m = 0; m < M; ++m) std::fill(c + m * ldc, c + m * ldc + N, Acc(0));
    return;
  }
#if SMOE_HAVE_BLAS
  blas_single_threaded();
  const int ta = trans_a ? blas::kTrans : blas::kNoTrans, tb = trans_b ? blas::kTrans : blas::kNoTrans;
  // Sizes and leading dimensions fit int: csrc/core/gemm.cpp rejects larger ones.
  if constexpr (std::is_same_v<Acc, float>) {
    SMOE_BLAS_FN(cblas_sgemm)(blas::kRowMajor, ta, tb, int(M), int(N), int(K), 1.f, a, int(lda), b, int(ldb), 0.f,
                              c, int(ldc));
  } else {
    SMOE_BLAS_FN(cblas_dgemm)(blas::kRowMajor, ta, tb, int(M), int(N), int(K), 1.0, a, int(lda), b, int(ldb), 0.0,
                              c, int(ldc));
  }
#else
  gemm_blocked<Acc>(trans_a, trans_b, M, N, K, a, lda, b, ldb, c, ldc);
#endif
}

template void gemm_serial<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                                 int64_t, float*, int64_t);
template void gemm_serial<double>(bool, bool, int64_t, int64_t, int64_t, const double*, int64_t, const double*,
                                  int64_t, double*, int64_t);
template void gemm_blocked<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                                  int64_t, float*, int64_t);
template void gemm_blocked<double>(bool, bool, int64_t, int64_t, int64_t, const double*, int64_t,
                                   const double*, int64_t, double*, int64_t);

void dense_sgemm_roof(int threads, int64_t M, int64_t N, int64_t K, const float* a, const float* b, float* c) {
#if SMOE_HAVE_BLAS
  blas_single_threaded();
  SMOE_BLAS_FN(openblas_set_num_threads)(threads);
  SMOE_BLAS_FN(cblas_sgemm)(blas::kRowMajor, blas::kNoTrans, blas::kNoTrans, int(M), int(N), int(K), 1.f, a, int(K), b,
                            int(N), 0.f, c, int(N));
  SMOE_BLAS_FN(openblas_set_num_threads)(1);
#else
  (void)threads;
  gemm_blocked<float>(false, false, M, N, K, a, K, b, N, c, N);
#endif
}

const char* blas_name() {
#if SMOE_HAVE_BLAS
#define SMOE_STR_(x) #x
#define SMOE_STR(x) SMOE_STR_(x)
  return "OpenBLAS (symbol prefix '" SMOE_STR(SMOE_BLAS_PREFIX) "')";
#else
  return "none (smoe's own blocked GEMM)";
#endif
}

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

// ---- conversions between the 16-bit storage types and f32 panels --------------------------------

[[gnu::target_clones("avx512f", "avx2", "default")]] void widen(const bf16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = uint32_t(src[i].bits) << 16;  // bf16 is the top half of an f32
    std::memcpy(dst + i, &u, 4);
  }
}
[[gnu::target_clones("avx512f", "avx2", "default")]] void narrow(const float* src, bf16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
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
// With fewer row tiles than this, columns are split too (e.g. a decode step with a handful of rows).
constexpr int64_t kMinTiles = 16;
constexpr int64_t kMinTileCols = 128;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
  const int parts = std::max(1, std::min<int>(num_threads(), int(tiles.size())));
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

  int64_t row_tiles = 0;
  for (int64_t e = 0; e < E; ++e) row_tiles += ceil_div(offsets[e + 1] - offsets[e], kTileRows);
  const int64_t nb = tile_cols(row_tiles, N);
  std::vector<Tile> tiles;
  tiles.reserve(size_t(row_tiles * ceil_div(N, nb)));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r0 = offsets[e]; r0 < offsets[e + 1]; r0 += kTileRows)
      for (int64_t n0 = 0; n0 < N; n0 += nb) {
        const int64_t r1 = std::min(r0 + kTileRows, offsets[e + 1]), n1 = std::min(n0 + nb, N);
        tiles.push_back({e, r0, r1, n0, n1, double(r1 - r0) * double(n1 - n0) * double(Kd)});
      }

  run_tiles(tiles, [&](const Tile& t) {
    const int64_t m = t.r1 - t.r0, n = t.n1 - t.n0;
    // Columns [n0, n1) of op(b[e]): rows n0.. of b[e] when transposed, else columns n0.. of each row.
    const T* bt = pb + t.e * expert_stride + (trans_b ? t.n0 * Kd : t.n0);
    const int64_t ldb = trans_b ? Kd : N;
    if constexpr (std::is_same_v<T, Acc>) {
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
      gemm_serial<float>(false, trans_b, m, n, Kd, fa, Kd, fb, trans_b ? Kd : n, fc, n);
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
  const int64_t row_tiles = E * ceil_div(M, kTileRows);
  const int64_t nb = tile_cols(row_tiles, N);
  std::vector<Tile> tiles;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r0 = 0; r0 < M; r0 += kTileRows)
      for (int64_t n0 = 0; n0 < N; n0 += nb) {
        const int64_t r1 = std::min(r0 + kTileRows, M), n1 = std::min(n0 + nb, N);
        const double rows = double(offsets[e + 1] - offsets[e]);
        tiles.push_back({e, r0, r1, n0, n1, double(r1 - r0) * double(n1 - n0) * (rows + 1.0)});
      }

  run_tiles(tiles, [&](const Tile& t) {
    const int64_t m = t.r1 - t.r0, n = t.n1 - t.n0;
    const int64_t s0 = offsets[t.e], rows = offsets[t.e + 1] - s0;
    T* ct = pc + t.e * M * N + t.r0 * N + t.n0;
    if constexpr (std::is_same_v<T, Acc>) {
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
      gemm_serial<float>(true, false, m, n, rows, fa, m, fb, n, fc, n);
      for (int64_t i = 0; i < m; ++i) narrow(fc + i * n, ct + i * N, n);
    }
  });
}

template <template <class> class Fn, class... Args>
void dispatch_float(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::kF32: Fn<float>::run(args...); break;
    case DType::kF64: Fn<double>::run(args...); break;
    case DType::kBF16: Fn<bf16_t>::run(args...); break;
    case DType::kF16: Fn<f16_t>::run(args...); break;
    default: break;  // rejected by the validation in csrc/core/gemm.cpp
  }
}

template <class T> struct GroupedGemmFn {
  static void run(bool trans_b, const TensorView& a, const TensorView& b, const int64_t* o, int64_t E,
                  const TensorView& c) {
    grouped_gemm_typed<T>(trans_b, a, b, o, E, c);
  }
};
template <class T> struct WgradFn {
  static void run(const TensorView& a, const TensorView& b, const int64_t* o, int64_t E, const TensorView& c) {
    grouped_gemm_wgrad_typed<T>(a, b, o, E, c);
  }
};

}  // namespace

Status grouped_gemm(const GroupedGemmParams& params, const TensorView& a, const TensorView& b,
                    const TensorView& offsets, const TensorView& c) {
  SMOE_RETURN_IF_ERROR(check_offsets("grouped_gemm", offsets, a.size(0)));
  const int64_t E = offsets.size(0) - 1;
  dispatch_float<GroupedGemmFn>(a.dtype, params.trans_b, a, b, offsets.data_as<const int64_t>(), E, c);
  return Status::Ok();
}

Status grouped_gemm_wgrad(const TensorView& a, const TensorView& b, const TensorView& offsets,
                          const TensorView& c) {
  SMOE_RETURN_IF_ERROR(check_offsets("grouped_gemm_wgrad", offsets, a.size(0)));
  const int64_t E = offsets.size(0) - 1;
  dispatch_float<WgradFn>(a.dtype, a, b, offsets.data_as<const int64_t>(), E, c);
  return Status::Ok();
}

}  // namespace smoe::cpu

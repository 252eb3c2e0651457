// csrc/cuda/gemm_wgmma.cuh: the sm_90a grouped GEMM kernel (docs/kernels/grouped_gemm_sm90.md).
//
// c[r] = epilogue(a[row r] @ b[e]^T) for the rows r of expert e's segment [offsets[e], offsets[e+1])
// (clamped to [0, R)); a [R, Kd] or, gathered, [T, Kd] through token_of_row; b [E, N, Kd] (nn.Linear
// layout, K-major); bf16/f16 in, f32 accumulate. The epilogues are those of the sm_80 kernel
// (gemm_tc.cuh, with its helpers): plain store, activation, gated activation (c [R, F], N = 2F,
// pre-activation values optionally stored for backward), each scaled by an optional row weight.
//
// One CTA computes 64 rows x 128 GEMM columns with two warpgroups (warp specialisation, PTX 9.7.15.1):
//   warpgroup 0 (producer): gathers the tile's 64 activation rows with cp.async into the
//       128B-swizzled K-major layout wgmma reads (TMA cannot gather rows), fences them into the
//       async proxy, and (thread 0) loads the 128 weight rows as two 64-row TMA boxes (for a gated
//       activation: the gate rows f0.. and the up rows F + f0.., so that gate and up of output f
//       land in the same thread's accumulators, registers i and i + 32); all complete on the
//       stage's `full` mbarrier (128 arrivals + the boxes' tx bytes);
//   warpgroup 1 (consumer): waits on `full`, issues 4 wgmma.m64n128k16 per 64-wide K tile,
//       retires them and releases the stage on its `empty` mbarrier (128 arrivals).
// A 4-stage ring of (A 8 KiB, B 16 KiB) stages: 96 KiB + 1 KiB alignment slack.
// Persistent: min(SMs, tiles) CTAs each walk the tiles t = blockIdx.x, + gridDim.x, ... of a banded
// raster (kBand m-blocks x all n tiles per band, m fastest inside a band: the band's A rows and the
// current n tiles' B stay in L2 while the CTAs that run together sweep them). A tile slot is the
// slot-th 64-row block of the concatenated segments; each thread maps it to (expert, m-block) by
// scanning the device offsets from a cursor that only moves forward (no host synchronisation:
// graph-capturable). The ring's stage and phase run on across a CTA's tiles, so the producer loads
// the next tile while the consumer stores the last one. Slots past the last tile are skipped.
// K tails: TMA zero-fills the columns past Kd, cp.async zero-fills the chunks past Kd (Kd % 8 == 0),
// rows past the segment (or gathered from token -1) are zero-filled and not stored; columns past N
// (past F for the gated form) are computed from other rows (or TMA's zero fill) and not stored.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "gemm_tc.cuh"
#include "smoe/simt/hopper.h"
#include "smoe/simt/kernel.h"

namespace smoe::gemm_wgmma {

namespace gemm_tc = ::smoe::SMOE_CUDA_NS::gemm_tc;
using gemm_tc::Epilogue;

inline constexpr int kBM = 64, kBN = 128, kBK = 64, kStages = 4;
inline constexpr int kBoxRows = kBN / 2;  // each stage's B tile is two TMA boxes of 64 rows
inline constexpr int kGatedBF = kBN / 2;  // outputs per n tile of the gated form
inline constexpr int kBand = 8;           // m-blocks per raster band
inline constexpr int kThreads = 256;
inline constexpr int kABytes = kBM * kBK * 2, kBBytes = kBN * kBK * 2, kBoxBytes = kBBytes / 2;
inline constexpr int kStageBytes = kABytes + kBBytes;
inline constexpr int kSmemBytes = kStages * kStageBytes + 1024;

template <class S>
struct Args {
  const S* a;
  int64_t lda, a_rows;          // a_rows: rows of a (gathered indices outside [0, a_rows) read zeros)
  const int32_t* token_of_row;  // [R] or nullptr
  const int64_t* offsets;       // [E+1]
  int32_t E;
  int64_t R;         // rows of c: segments are clamped to [0, R)
  int64_t N, Kd, F;  // GEMM N (rows of b[e]); reduction length; F = N / 2 when gated
  S* c;              // [R, N] or [R, F]
  int64_t ldc;
  S* pre;  // [R, N] or nullptr
  int64_t ldpre;
  const float* row_weights;  // [R] or nullptr
  int32_t act;
  bool pair_c, pair_pre;   // 4-byte aligned column pairs of c / pre (paired stores)
  int64_t n_tiles, tiles;  // n tiles; raster length (bands * kBand * n_tiles)
};

// One output tile: expert, rows [row0, row_end), first GEMM column (or output f when gated).
struct Tile {
  int64_t expert, row0, row_end, n0;
};
// The tile walk of one thread: a band cursor (the first expert whose blocks reach the band's first
// slot, and the slots before it), moved forward only; per tile a local scan from it.
template <class S>
struct TileWalk {
  const Args<S>& a;
  int e = 0;
  int64_t first = 0;
  __device__ int64_t blocks(int x) const {
    const int64_t lo = max(int64_t{0}, min(a.offsets[x], a.R)), hi = max(lo, min(a.offsets[x + 1], a.R));
    return (hi - lo + kBM - 1) / kBM;
  }
  // 1: *tile is raster tile t; 0: t's slot is past the last tile (skip); -1: so are all later ones.
  __device__ int find(int64_t t, int64_t n_step, Tile* tile) {
    const int64_t per_band = int64_t{kBand} * a.n_tiles;
    const int64_t band = t / per_band, w = t % per_band;
    const int64_t band_slot = band * kBand, slot = band_slot + w % kBand;
    while (e < a.E && band_slot >= first + blocks(e)) first += blocks(e++);
    if (e >= a.E) return -1;
    int x = e;
    int64_t f = first;
    while (x < a.E && slot >= f + blocks(x)) f += blocks(x++);
    if (x >= a.E) return 0;
    const int64_t lo = max(int64_t{0}, min(a.offsets[x], a.R)), hi = max(lo, min(a.offsets[x + 1], a.R));
    tile->expert = x;
    tile->row0 = lo + (slot - f) * kBM;
    tile->row_end = min(hi, tile->row0 + kBM);
    tile->n0 = (w / kBand) * n_step;
    return 1;
  }
};

template <class S, bool kBf16, Epilogue kEpi>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_gemm_wgmma_kernel(const Args<S> args, const __grid_constant__ smoe::simt::TensorMap map_b) {
  namespace hop = smoe::simt;
  constexpr bool kGated = kEpi == Epilogue::kGatedActivation;
  SMOE_DYNAMIC_SMEM(unsigned char, raw);
  unsigned char* smem =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~static_cast<uintptr_t>(1023));
  __shared__ __align__(8) uint64_t full[kStages];
  __shared__ __align__(8) uint64_t empty[kStages];
  const int tid = static_cast<int>(threadIdx.x);
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      hop::mbarrier_init(&full[s], 128);
      hop::mbarrier_init(&empty[s], 128);
    }
    hop::fence_mbarrier_init();
  }
  __syncthreads();
  constexpr int64_t kStep = kGated ? kGatedBF : kBN;  // GEMM columns (plain) or outputs (gated) per n tile
  const int k_tiles = static_cast<int>((args.Kd + kBK - 1) / kBK);
  TileWalk<S> walk{args};
  Tile tile;
  uint32_t it = 0;  // K steps this warpgroup has done over all its tiles: the ring position

  if (tid < 128) {
    // Producer warpgroup: gives registers back (setmaxnreg, warpgroup-uniform, 9.7.17.1). Stage s is
    // free in round q once `empty` completed q phases; round 0 waits on parity 1, the phase before
    // the first, which counts as completed (9.7.13.15.16).
    hop::setmaxnreg_dec<40>();
    const int ch = tid % 8;
    for (int64_t t = blockIdx.x; t < args.tiles; t += gridDim.x) {
      const int found = walk.find(t, kStep, &tile);
      if (found < 0) break;
      if (found == 0) continue;
      // Thread tid copies chunk tid % 8 of rows tid / 8 + 16 j (j < 4) in every K tile: the rows'
      // sources (gathered, or nullptr for zeros) are fixed for the tile.
      const S* src_row[kBM * (kBK / 8) / 128];
#pragma unroll
      for (int j = 0; j < kBM * (kBK / 8) / 128; ++j) {
        const int64_t r = tile.row0 + tid / 8 + 16 * j;
        int64_t src = r < tile.row_end ? r : -1;
        if (src >= 0 && args.token_of_row != nullptr) src = args.token_of_row[r];
        src_row[j] = (src >= 0 && src < args.a_rows) ? args.a + src * args.lda : nullptr;
      }
      // B rows of the two boxes in the stacked [E * N, Kd] weight matrix.
      const int32_t b_row0 = static_cast<int32_t>(tile.expert * args.N + tile.n0);
      const int32_t b_row1 = static_cast<int32_t>(kGated ? tile.expert * args.N + args.F + tile.n0
                                                         : tile.expert * args.N + tile.n0 + kBoxRows);
      for (int kt = 0; kt < k_tiles; ++kt, ++it) {
        const int s = static_cast<int>(it % kStages);
        hop::mbarrier_wait_parity(&empty[s], (it / kStages + 1) & 1u);
        unsigned char* sa = smem + s * kStageBytes;
        unsigned char* sb = sa + kABytes;
        const int64_t k = static_cast<int64_t>(kt) * kBK + ch * 8;
#pragma unroll
        for (int j = 0; j < kBM * (kBK / 8) / 128; ++j) {  // 64 rows x 8 chunks of 16 bytes
          const bool in = src_row[j] != nullptr && k < args.Kd;
          const S* src = in ? src_row[j] + k : args.a;
          void* dst = reinterpret_cast<void*>(smoe::simt::sm90::swizzle128(
              reinterpret_cast<uintptr_t>(sa) + smoe::simt::sm90::kmajor_offset(tid / 8 + 16 * j, ch * 8, 1024)));
          hop::cp_async_16_zfill(dst, src, in ? 16 : 0);
        }
        hop::cp_async_commit();
        hop::cp_async_wait_all();
        hop::fence_proxy_async();  // the generic-proxy writes of cp.async become visible to wgmma
        if (tid == 0) {
          hop::mbarrier_arrive_expect_tx(&full[s], kBBytes);
          hop::tma_load_2d(sb, map_b, kt * kBK, b_row0, &full[s]);
          hop::tma_load_2d(sb + kBoxBytes, map_b, kt * kBK, b_row1, &full[s]);
        } else {
          hop::mbarrier_arrive(&full[s]);
        }
      }
    }
    return;
  }

  // Consumer warpgroup: takes the registers for the 64 accumulators per thread.
  hop::setmaxnreg_inc<232>();
  namespace sm90 = smoe::simt::sm90;
  const int warp = (tid - 128) / 32, lane = tid % 32;
  for (int64_t t = blockIdx.x; t < args.tiles; t += gridDim.x) {
    const int found = walk.find(t, kStep, &tile);
    if (found < 0) break;
    if (found == 0) continue;
    float acc[kBN / 2];
#pragma unroll
    for (int i = 0; i < kBN / 2; ++i) acc[i] = 0.0f;
    for (int kt = 0; kt < k_tiles; ++kt, ++it) {
      const int s = static_cast<int>(it % kStages);
      hop::mbarrier_wait_parity(&full[s], (it / kStages) & 1u);
      unsigned char* sa = smem + s * kStageBytes;
      // SBO 1024: 8-row groups of 128-byte rows (9.7.15.5.1); the two 64-row B boxes are contiguous.
      const uint64_t da = hop::wgmma_desc(sa, 16, 1024), db = hop::wgmma_desc(sa + kABytes, 16, 1024);
      hop::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {  // each k16 slice: +32 bytes = +2 in the address field
        if constexpr (kBf16)
          hop::wgmma_m64n128k16_bf16(acc, da + 2 * kk, db + 2 * kk, (kt > 0 || kk > 0) ? 1 : 0);
        else
          hop::wgmma_m64n128k16_f16(acc, da + 2 * kk, db + 2 * kk, (kt > 0 || kk > 0) ? 1 : 0);
      }
      hop::wgmma_commit_group();
      hop::wgmma_wait_group<0>();
      hop::mbarrier_arrive(&empty[s]);
    }
    const int64_t row0 = tile.row0, row_end = tile.row_end, n0 = tile.n0;
    // Epilogue from the accumulator fragment (9.7.15.5.1.2): registers 2p and 2p + 1 are columns c and
    // c + 1 of one row (c even), stored as a pair where aligned. An empty K range stores zeros (times
    // the activation of zero). Formulas and roundings are gemm_tc's, so the two kernels agree.
#pragma unroll
    for (int i = 0; i < kBN / 2; i += 2) {
      if (kGated && i >= kBN / 4) break;  // registers i + 32 hold the up half
      const int64_t r = row0 + sm90::acc_row(warp, lane, i);
      if (r >= row_end) continue;
      const float w = args.row_weights != nullptr ? args.row_weights[r] : 1.0f;
      const int64_t col = n0 + sm90::acc_col(lane, i);
      if constexpr (kGated) {
        const float g0 = gemm_tc::round_trip<S>(acc[i]), g1 = gemm_tc::round_trip<S>(acc[i + 1]);
        const float u0 = gemm_tc::round_trip<S>(acc[i + kBN / 4]), u1 = gemm_tc::round_trip<S>(acc[i + 1 + kBN / 4]);
        if (args.pre != nullptr) {
          gemm_tc::store_two(args.pre + r * args.ldpre, col, args.F, args.pair_pre, g0, g1);
          gemm_tc::store_two(args.pre + r * args.ldpre + args.F, col, args.F, args.pair_pre, u0, u1);
        }
        gemm_tc::store_two(args.c + r * args.ldc, col, args.F, args.pair_c,
                           w * gemm_tc::apply_activation(args.act, g0, u0),
                           w * gemm_tc::apply_activation(args.act, g1, u1));
      } else {
        float v0 = acc[i], v1 = acc[i + 1];
        if constexpr (kEpi == Epilogue::kActivation) {
          v0 = gemm_tc::round_trip<S>(v0);
          v1 = gemm_tc::round_trip<S>(v1);
          if (args.pre != nullptr) gemm_tc::store_two(args.pre + r * args.ldpre, col, args.N, args.pair_pre, v0, v1);
          v0 = gemm_tc::apply_activation(args.act, v0, 1.0f);
          v1 = gemm_tc::apply_activation(args.act, v1, 1.0f);
        }
        gemm_tc::store_two(args.c + r * args.ldc, col, args.N, args.pair_c, w * v0, w * v1);
      }
    }
  }
}

}  // namespace smoe::gemm_wgmma

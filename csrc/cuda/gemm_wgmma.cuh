// csrc/cuda/gemm_wgmma.cuh: the first sm_90a grouped GEMM kernel (docs/kernels/grouped_gemm_sm90.md).
//
// c[r] = a[r] @ b[e]^T for the rows r of expert e's segment [offsets[e], offsets[e+1]); a [R, Kd],
// b [E, N, Kd] (nn.Linear layout, K-major), c [R, N]; bf16/f16 in, f32 accumulate, plain store.
//
// One CTA computes a 64 x 128 tile with two warpgroups (warp specialisation, PTX 9.7.15.1):
//   warpgroup 0 (producer): gathers the tile's 64 activation rows with cp.async into the
//       128B-swizzled K-major layout wgmma reads (TMA cannot gather rows), fences them into the
//       async proxy, and (thread 0) loads the 128 x 64 weight tile by TMA; both complete on the
//       stage's `full` mbarrier (128 arrivals + the TMA's tx bytes);
//   warpgroup 1 (consumer): waits on `full`, issues 4 wgmma.m64n128k16 per 64-wide K tile,
//       retires them and releases the stage on its `empty` mbarrier (128 arrivals).
// A 4-stage ring of (A 8 KiB, B 16 KiB) stages: 96 KiB + 1 KiB alignment slack.
// The grid is (tile slots, n tiles): slot s is mapped to (expert, m-block) by a scan of the device
// offsets, so no host synchronisation is needed (graph-capturable); slots past the last tile exit.
// K tails: TMA zero-fills the columns past Kd, cp.async zero-fills the chunks past Kd (Kd % 8 == 0),
// rows past the segment are zero-filled and not stored; columns past N are computed from the
// next expert's (or zero-filled) rows and not stored.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "smoe/simt/hopper.h"
#include "smoe/simt/kernel.h"

namespace smoe::gemm_wgmma {

inline constexpr int kBM = 64, kBN = 128, kBK = 64, kStages = 4;
inline constexpr int kThreads = 256;
inline constexpr int kABytes = kBM * kBK * 2, kBBytes = kBN * kBK * 2;
inline constexpr int kStageBytes = kABytes + kBBytes;
inline constexpr int kSmemBytes = kStages * kStageBytes + 1024;

template <class S>
struct Args {
  const S* a;
  int64_t lda;
  const int64_t* offsets;
  int32_t E;
  int64_t N, Kd;
  S* c;
  int64_t ldc;
};

template <class S, bool kBf16>
__global__ void __launch_bounds__(kThreads, 1) grouped_gemm_wgmma_kernel(
    const Args<S> args, const __grid_constant__ smoe::simt::TensorMap map_b) {
  namespace hop = smoe::simt;
  SMOE_DYNAMIC_SMEM(unsigned char, raw);
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(raw) + 1023) & ~static_cast<uintptr_t>(1023));
  __shared__ __align__(8) uint64_t full[kStages];
  __shared__ __align__(8) uint64_t empty[kStages];
  __shared__ int64_t tile_row0, tile_row_end, tile_expert;
  const int tid = static_cast<int>(threadIdx.x);

  if (tid == 0) {
    // Slot -> (expert, m-block): the slot-th 64-row block of the concatenated segments.
    int64_t slot = blockIdx.x, e_found = -1, r0 = 0, r1 = 0;
    for (int e = 0; e < args.E && e_found < 0; ++e) {
      const int64_t b0 = args.offsets[e], b1 = args.offsets[e + 1];
      const int64_t blocks = (b1 - b0 + kBM - 1) / kBM;
      if (slot < blocks) {
        e_found = e;
        r0 = b0 + slot * kBM;
        r1 = b1 < r0 + kBM ? b1 : r0 + kBM;
      } else {
        slot -= blocks;
      }
    }
    tile_expert = e_found;
    tile_row0 = r0;
    tile_row_end = r1;
    for (int s = 0; s < kStages; ++s) {
      hop::mbarrier_init(&full[s], 128);
      hop::mbarrier_init(&empty[s], 128);
    }
    hop::fence_mbarrier_init();
  }
  __syncthreads();
  if (tile_expert < 0) return;  // the whole CTA: no barrier follows
  const int64_t e = tile_expert, row0 = tile_row0, row_end = tile_row_end;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int k_tiles = static_cast<int>((args.Kd + kBK - 1) / kBK);

  if (tid < 128) {
    hop::setmaxnreg_dec<40>();
    // Producer warpgroup: gives registers back (setmaxnreg, warpgroup-uniform, 9.7.17.1). Stage s is free in round q once `empty` completed q phases; round 0
    // waits on parity 1, the phase before the first, which counts as completed (9.7.13.15.16).
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int s = kt % kStages;
      const uint32_t round = static_cast<uint32_t>(kt / kStages);
      hop::mbarrier_wait_parity(&empty[s], (round + 1) & 1u);
      unsigned char* sa = smem + s * kStageBytes;
      unsigned char* sb = sa + kABytes;
      for (int i = tid; i < kBM * (kBK / 8); i += 128) {  // 64 rows x 8 chunks of 16 bytes
        const int r = i / 8, ch = i % 8;
        const int64_t row = row0 + r, k = static_cast<int64_t>(kt) * kBK + ch * 8;
        const bool in = row < row_end && k < args.Kd;
        const S* src = in ? args.a + row * args.lda + k : args.a;
        void* dst = reinterpret_cast<void*>(
            smoe::simt::sm90::swizzle128(reinterpret_cast<uintptr_t>(sa) + smoe::simt::sm90::kmajor_offset(r, ch * 8, 1024)));
        hop::cp_async_16_zfill(dst, src, in ? 16 : 0);
      }
      hop::cp_async_commit();
      hop::cp_async_wait_all();
      hop::fence_proxy_async();  // the generic-proxy writes of cp.async become visible to wgmma
      if (tid == 0) {
        hop::mbarrier_arrive_expect_tx(&full[s], kBBytes);
        hop::tma_load_2d(sb, map_b, kt * kBK, static_cast<int32_t>(e * args.N + n0), &full[s]);
      } else {
        hop::mbarrier_arrive(&full[s]);
      }
    }
    return;
  }

  // Consumer warpgroup: takes the registers for the 64 accumulators per thread.
  hop::setmaxnreg_inc<232>();
  float acc[kBN / 2];
  for (int i = 0; i < kBN / 2; ++i) acc[i] = 0.0f;
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int s = kt % kStages;
    hop::mbarrier_wait_parity(&full[s], static_cast<uint32_t>(kt / kStages) & 1u);
    unsigned char* sa = smem + s * kStageBytes;
    const uint64_t da = hop::wgmma_desc(sa, 16, 1024), db = hop::wgmma_desc(sa + kABytes, 16, 1024);
    hop::wgmma_fence();
    for (int kk = 0; kk < kBK / 16; ++kk) {  // each k16 slice: +32 bytes = +2 in the address field
      if constexpr (kBf16) hop::wgmma_m64n128k16_bf16(acc, da + 2 * kk, db + 2 * kk, (kt > 0 || kk > 0) ? 1 : 0);
      else hop::wgmma_m64n128k16_f16(acc, da + 2 * kk, db + 2 * kk, (kt > 0 || kk > 0) ? 1 : 0);
    }
    hop::wgmma_commit_group();
    hop::wgmma_wait_group<0>();
    hop::mbarrier_arrive(&empty[s]);
  }
  // Plain-store epilogue (an empty K range stores zeros).
  const int warp = (tid - 128) / 32, lane = tid % 32;
  for (int i = 0; i < kBN / 2; ++i) {
    const int64_t r = row0 + smoe::simt::sm90::acc_row(warp, lane, i);
    const int64_t col = n0 + smoe::simt::sm90::acc_col(lane, i);
    if (r < row_end && col < args.N) args.c[r * args.ldc + col] = ::smoe::SMOE_CUDA_NS::from_float<S>(k_tiles > 0 ? acc[i] : 0.0f);
  }
}

}  // namespace smoe::gemm_wgmma

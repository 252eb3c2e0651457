// csrc/cuda/gemm_tc.cuh: the tensor-core grouped GEMM kernels (sm_80+): mma.m16n8k16 (bf16/f16 in,
// f32 accumulate), ldmatrix fragment loads from XOR-swizzled shared memory, a kStages-deep cp.async
// pipeline, the expert of each CTA found from the device offsets, fused gather / activation /
// routing-weight epilogues, and the variable-K weight-gradient form. Launchers: gemm_tc.cu.
//
// Versions (docs/kernels/grouped_gemm.md has the figures):
//   v0 grouped_gemm_naive.cu  one thread per output, operands from L2: ~0.25 FLOP/byte, CUDA cores.
//   v1 this file              128x128x32 CTA tiles staged in shared memory (each loaded element is
//                             reused 128 times: 64 FLOP/byte of global traffic), tensor cores
//                             (16x more math per SM than FFMA on A100), and a 4-stage cp.async
//                             pipeline that overlaps the loads of tile k+3 with the math of tile k.
//
// Everything goes through smoe's wrappers (smoe/simt/tensor_core.h), so the SIMT emulator runs the
// very same source on the CPU.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace smoe::SMOE_CUDA_NS::gemm_tc {

// ---- tile configuration ---------------------------------------------------------------------------
// CTA tile 128 x 128 x 32 with 4 warps in a 2 x 2 grid, each warp owning a 64 x 64 output tile:
// - 64 x 64 per warp is the largest warp tile whose accumulators fit the register file with room
//   to spare: 4 x 8 mma tiles x 4 f32 = 128 accumulator registers per thread, plus 32 for the A/B
//   fragments of one k16 step. Per k16 step a warp loads 4 A + 8 B fragments (8 ldmatrix.x4) and
//   issues 32 mma: 4 mma per ldmatrix, enough to keep shared-memory bandwidth below the tensor
//   cores' demand (CUTLASS's sm80 default for 16-bit inputs uses the same warp tile).
// - 128 x 128 per CTA: global traffic per FLOP is (128 + 128) * 32 * 2 bytes per 2*128*128*32 FLOPs
//   = 1/64 byte per FLOP, below A100's 1.5 TB/s / 312 TFLOP/s = 1/200 only together with L2 reuse
//   across CTAs (neighbouring CTAs share their B tile; see the raster order in gemm_tc.cu).
// - BK = 32: a row of a K-major tile is 64 bytes (4 chunks of 16 bytes), one stage of A + B is
//   16 KiB, so 4 stages take 64 KiB: two CTAs per SM fit A100's 164 KiB (the register file,
//   ~128 x 230 registers per CTA, also allows two), and three tiles are in flight while one is
//   multiplied, which hides global-memory latency at that occupancy.
inline constexpr int kBM = 128, kBN = 128, kBK = 32;
inline constexpr int kWarpsM = 2, kWarpsN = 2;
inline constexpr int kThreads = 32 * kWarpsM * kWarpsN;         // 128
inline constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;  // 64 x 64
inline constexpr int kMI = kWM / 16, kNI = kWN / 8;             // 4 x 8 mma.m16n8k16 tiles per warp
inline constexpr int kStages = 4;
inline constexpr int kChunk = 8;              // 16-bit elements per 16-byte cp.async / ldmatrix row
inline constexpr int kTileElems = kBM * kBK;  // one operand tile (= kBK * kBN)
static_assert(kBM == kBN && kBM * kBK == kBK * kBN, "A and B tiles share the two swizzled layouts");
static_assert(kThreads * 4 * kChunk == kTileElems, "each thread copies 4 chunks of each operand per stage");
inline constexpr int kSmemBytes = kStages * 2 * kTileElems * 2;  // 64 KiB (16-bit elements)
// f32 (3xTF32, mma.m16n8k8): the same 64-byte tile rows, so the same bytes, swizzle and ldmatrix
// addresses: a 16-byte chunk is 4 floats, a tile row 16 k values, one mma step 8 k values. ldmatrix
// of 16-bit pairs hands each lane whole floats in exactly the A / B fragment layout of m16n8k8.tf32
// (lane l: row l/4, 32-bit column l%4 of each 8x4-float matrix). K-major operands only.
template <class S>
inline constexpr int kChunkOf = 16 / static_cast<int>(sizeof(S));
template <class S>
inline constexpr int kBKOf = 64 / static_cast<int>(sizeof(S));
template <class S>
inline constexpr int kTileElemsOf = kBM* kBKOf<S>;
template <class S>
inline constexpr int kMmaK = sizeof(S) == 4 ? 8 : 16;
static_assert(kTileElemsOf<float> * 4 * 2 * kStages == kSmemBytes, "f32 stages take the same bytes");
// A gated activation pairs gate and up columns inside a warp: each warp's 64 accumulator columns
// are 32 gate columns then the 32 matching up columns, so a CTA produces 64 outputs of [R, F].
inline constexpr int kGatedBF = kBN / 2;

enum class Epilogue : int { kStore = 0, kActivation = 1, kGatedActivation = 2 };

// ---- shared-memory layouts --------------------------------------------------------------------------
// Two tile shapes, both XOR-swizzled at 16-byte granularity so that ldmatrix (8 rows of 16 bytes per
// matrix) and the cp.async stores touch 8 distinct 16-byte bank groups, i.e. all 32 banks once: the
// same idea as CUTLASS's crosswise TensorOp layouts / CuTe's Swizzle<B,M,S>, written out here.
//
// K-major tile [128 rows][32 k] (A of the forward GEMM; B when trans_b): a row is 64 bytes = 4 chunks,
// so two rows share a 128-byte bank line. Chunk c of row r goes to slot c ^ ((r >> 1) & 3): for 8
// consecutive rows at one logical chunk the slots (r & 1) * 4 + (c ^ (r >> 1 & 3)) are all distinct.
template <class S>
__device__ __forceinline__ int kmajor_offset(int row, int chunk) {
  return row * kBKOf<S> + ((chunk ^ ((row >> 1) & 3)) * kChunkOf<S>);
}
// MN-major tile [32 k][128 columns] (B when !trans_b; both operands of wgrad): a row is 256 bytes =
// 16 chunks, so every row starts at bank 0. Chunk c of row k goes to c ^ (k & 7): 8 consecutive k
// rows at one logical chunk land in 8 distinct 16-byte slots of the 128-byte bank line.
__device__ __forceinline__ int mnmajor_offset(int k, int chunk) { return k * kBN + ((chunk ^ (k & 7)) * kChunk); }

// ---- global -> shared loaders (cp.async, 16 bytes per copy, zero-filled outside the matrix) ---------
// Any shape and stride: a 16-byte chunk of 8 elements may be partly outside the matrix (a column count
// that is not a multiple of 8). With 16-byte aligned rows (`vec`: base and leading dimension) a chunk is
// one cp.async whose src-size is the bytes inside the matrix (PTX ISA 9.7.9.25.3.1, cp.async with
// src-size: the remaining bytes of the 16 are zeros); otherwise the thread loads the elements inside
// one by one and stores the chunk to shared memory itself. A chunk wholly outside is a plain 16-byte
// store of zeros. Both kinds of store happen at the refill point and are read after the next barriers,
// so the pipeline's schedule is the same.
template <class S>
__device__ __forceinline__ void store_zero_chunk(S* dst) {
  Pack<S, kChunkOf<S>> z;
#pragma unroll
  for (int j = 0; j < kChunkOf<S>; ++j) z.v[j] = from_float<S>(0.0f);
  *reinterpret_cast<Pack<S, kChunkOf<S>>*>(dst) = z;
}
// The first `n` (1..8) elements of src into a shared-memory chunk, zeros after them.
template <class S>
__device__ __forceinline__ void load_chunk(S* dst, const S* src, int64_t n, bool vec) {
  if (vec) {
    smoe::simt::cp_async_16_zfill(dst, src, n >= kChunkOf<S> ? 16 : static_cast<int>(n * sizeof(S)));
    return;
  }
  Pack<S, kChunkOf<S>> q;
#pragma unroll
  for (int j = 0; j < kChunkOf<S>; ++j) q.v[j] = j < n ? src[j] : from_float<S>(0.0f);
  *reinterpret_cast<Pack<S, kChunkOf<S>>*>(dst) = q;
}

// K-major tile: thread t copies chunk t % 4 of rows t / 4 + 32 i (i = 0..3). The source row of each
// of its tile rows is fixed for the whole K loop (gathered rows, expert rows), nullptr = zero row.
template <class S>
struct KMajorLoader {
  const S* row[4];
  int64_t k_len;  // columns of the source rows (the reduction length)
  bool vec;       // every row starts 16-byte aligned

  __device__ __forceinline__ void load(S* tile, int64_t k0) const {
    const int chunk = threadIdx.x & 3;
    const int64_t col = k0 + chunk * kChunkOf<S>;
    const int64_t left = k_len - col;  // elements of this chunk inside the rows
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = (threadIdx.x >> 2) + 32 * i;
      S* dst = tile + kmajor_offset<S>(r, chunk);
      if (left > 0 && row[i] != nullptr) {
        load_chunk(dst, row[i] + col, left, vec);
      } else {
        store_zero_chunk(dst);
      }
    }
  }
};

// Source row of reduction index k of a wgrad operand: k itself, or gathered, index[k] (the row of a
// [src_rows, *] matrix; -1 or out of range: a zero row). Returns -1 for a zero row.
__device__ __forceinline__ int64_t source_row(const int32_t* index, int64_t src_rows, int64_t k) {
  if (index == nullptr) return k;
  const int64_t t = index[k];
  return (t >= 0 && t < src_rows) ? t : -1;
}

// MN-major tile: thread t copies chunk t % 16 (8 columns) of k rows t / 16 + 8 i (i = 0..3).
// base points at (row 0, this thread's first column); rows are ld elements apart. k row k reads
// row k, or row index[k] when gathered (wgrad with x read through token_of_row).
template <class S>
struct MnMajorLoader {
  const S* base;
  int64_t ld;
  int64_t k_len;                   // k rows at or past k_len are zeros
  int64_t cols_left;               // columns of the matrix from this thread's first one on (<= 0: none)
  bool vec;                        // base and ld keep every row's chunk 16-byte aligned
  const int32_t* index = nullptr;  // [k_len] source rows, or nullptr: row k
  int64_t src_rows = 0;            // rows of the gathered matrix

  __device__ __forceinline__ void load(S* tile, int64_t k0) const {
    static_assert(sizeof(S) == 2, "MN-major tiles hold 16-bit elements");
    const int chunk = threadIdx.x & 15;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int kr = (threadIdx.x >> 4) + 8 * i;
      const int64_t k = k0 + kr;
      S* dst = tile + mnmajor_offset(kr, chunk);
      const int64_t src = (cols_left > 0 && k < k_len) ? source_row(index, src_rows, k) : -1;
      if (src >= 0) {
        load_chunk(dst, base + src * ld, cols_left, vec);
      } else {
        store_zero_chunk(dst);
      }
    }
  }
};

// K-major tile filled from an MN-major matrix (f32 wgrad): tile row r is column `first + r` of the
// [k_len, cols] matrix at base (rows ld apart), tile column k its row k. Thread t fills chunk t % 4
// (4 consecutive k) of tile rows t / 4 + 32 i with element loads (f32 tiles must be K-major for
// ldmatrix to hand out whole floats; the transpose happens here instead).
template <class S>
struct TransposingKMajorLoader {
  const S* base;  // element (row 0, column first)
  int64_t ld;
  int64_t k_len;
  int64_t cols_left;               // columns from `first` on (<= 0: none)
  const int32_t* index = nullptr;  // [k_len] source rows (gathered), or nullptr: row k
  int64_t src_rows = 0;

  __device__ __forceinline__ void load(S* tile, int64_t k0) const {
    const int chunk = threadIdx.x & 3;
    const int64_t kc = k0 + chunk * kChunkOf<S>;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = (threadIdx.x >> 2) + 32 * i;
      Pack<S, kChunkOf<S>> q;
#pragma unroll
      for (int j = 0; j < kChunkOf<S>; ++j) {
        const int64_t k = kc + j;
        const int64_t src = (r < cols_left && k < k_len) ? source_row(index, src_rows, k) : -1;
        q.v[j] = src >= 0 ? base[src * ld + r] : from_float<S>(0.0f);
      }
      *reinterpret_cast<Pack<S, kChunkOf<S>>*>(tile + kmajor_offset<S>(r, chunk)) = q;
    }
  }
};

// ---- shared -> register fragments (ldmatrix) ----------------------------------------------------------
// mma.m16n8k16 fragments (PTX ISA 9.7.14.5.8): A 16x16 in 4 registers = the 8x8 matrices
// (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15); B 16x8 (k x n) in 2
// registers = (k 0-7), (k 8-15). ldmatrix.x4 (9.7.14.5.15) loads four 8x8 matrices, matrix j's row
// addresses coming from lanes 8j..8j+7; without .trans lane l receives (row l/4, cols 2(l%4), +1) of
// each, which is the A layout for a [row][k] tile and the B layout for an [n][k] tile; with .trans it
// receives (rows 2(l%4), +1, col l/4): the A layout for a [k][row] tile, the B layout for [k][n].
template <bool kKMajor, class S>
__device__ __forceinline__ void load_a_frags(uint32_t (&af)[kMI][4], const S* tile, int warp_m, int lane, int kk) {
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi) {
    if constexpr (kKMajor) {
      const int row = warp_m * kWM + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      const int chunk = kk / kChunkOf<S> + (lane >> 4);
      smoe::simt::ldmatrix_x4(af[mi], tile + kmajor_offset<S>(row, chunk));
    } else {
      const int k = kk + (lane >> 4) * 8 + (lane & 7);
      const int chunk = (warp_m * kWM + mi * 16) / kChunk + ((lane >> 3) & 1);
      smoe::simt::ldmatrix_x4_trans(af[mi], tile + mnmajor_offset(k, chunk));
    }
  }
}

template <bool kKMajor, class S>
__device__ __forceinline__ void load_b_frags(uint32_t (&bf)[kNI][2], const S* tile, int warp_n, int lane, int kk) {
#pragma unroll
  for (int p = 0; p < kNI / 2; ++p) {  // two n8 tiles per ldmatrix.x4
    uint32_t r[4];
    if constexpr (kKMajor) {
      const int n = warp_n * kWN + p * 16 + (lane & 7) + (lane >> 4) * 8;
      const int chunk = kk / kChunkOf<S> + ((lane >> 3) & 1);
      smoe::simt::ldmatrix_x4(r, tile + kmajor_offset<S>(n, chunk));
    } else {
      const int k = kk + ((lane >> 3) & 1) * 8 + (lane & 7);
      const int chunk = (warp_n * kWN + p * 16) / kChunk + (lane >> 4);
      smoe::simt::ldmatrix_x4_trans(r, tile + mnmajor_offset(k, chunk));
    }
    bf[2 * p][0] = r[0];
    bf[2 * p][1] = r[1];
    bf[2 * p + 1][0] = r[2];
    bf[2 * p + 1][1] = r[3];
  }
}

// 3xTF32 (f32 inputs): x = hi + lo with hi = tf32(x), lo = tf32(x - hi); d += lo_a hi_b + hi_a lo_b +
// hi_a hi_b (the small terms first; lo_a lo_b, below 2^-22 relative, is left out). Error close to an
// f32 FFMA loop's instead of TF32's 2^-11 (docs/kernels/grouped_gemm.md has the measured figures).
__device__ __forceinline__ void split_tf32(uint32_t x, uint32_t* hi, uint32_t* lo) {
  const float v = __uint_as_float(x);
  *hi = smoe::simt::cvt_rna_tf32(v);
  *lo = smoe::simt::cvt_rna_tf32(v - __uint_as_float(*hi));
}

template <class S>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<S, float>) {
    uint32_t ah[4], al[4], bh[2], bl[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) split_tf32(a[i], &ah[i], &al[i]);
#pragma unroll
    for (int i = 0; i < 2; ++i) split_tf32(b[i], &bh[i], &bl[i]);
    smoe::simt::mma_m16n8k8_tf32(d, al, bh, d);
    smoe::simt::mma_m16n8k8_tf32(d, ah, bl, d);
    smoe::simt::mma_m16n8k8_tf32(d, ah, bh, d);
  } else if constexpr (std::is_same_v<S, __nv_bfloat16>) {
    smoe::simt::mma_m16n8k16_bf16(d, a, b, d);
  } else {
    static_assert(std::is_same_v<S, __half>, "the tensor-core GEMM takes bf16 or f16");
    smoe::simt::mma_m16n8k16_f16(d, a, b, d);
  }
}

// ---- the pipelined main loop -------------------------------------------------------------------------
// acc += A(128 x k_len) * B(k_len x 128) for this CTA, k_len split into ceil(k_len / 32) tiles.
// Multistage schedule (as CUTLASS's sm80 "multistage" mainloop): the prologue issues tiles
// 0..kStages-2, one commit group each; iteration kt waits until at most kStages-2 groups are pending
// (tile kt has landed for this thread), barriers (tile kt visible to all threads, and every thread is
// done reading the stage that tile kt+kStages-1 overwrites: it held tile kt-1), issues that tile,
// and multiplies tile kt. Every iteration commits a group, empty at the tail, so the count stays exact.
template <class S, bool kAKMajor, bool kBKMajor, class ALoader, class BLoader>
__device__ __forceinline__ void mainloop(float (&acc)[kMI][kNI][4], S* smem, const ALoader& la, const BLoader& lb,
                                         int64_t k_len) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warp_m = warp % kWarpsM, warp_n = warp / kWarpsM;
  static_assert(sizeof(S) == 2 || (kAKMajor && kBKMajor), "f32 tiles are K-major");
  constexpr int kBKs = kBKOf<S>, kTile = kTileElemsOf<S>;
  const int64_t num_k = (k_len + kBKs - 1) / kBKs;
  auto stage_a = [&](int64_t t) { return smem + (t % kStages) * (2 * kTile); };
  auto stage_b = [&](int64_t t) { return smem + (t % kStages) * (2 * kTile) + kTile; };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_k) {
      la.load(stage_a(s), int64_t{s} * kBKs);
      lb.load(stage_b(s), int64_t{s} * kBKs);
    }
    smoe::simt::cp_async_commit();
  }
  for (int64_t kt = 0; kt < num_k; ++kt) {
    smoe::simt::cp_async_wait<kStages - 2>();
    const int64_t next = kt + kStages - 1;
#if defined(SMOE_TEST_MUTATION) && SMOE_TEST_MUTATION == 1
    // The race the emulator's cp.async landing modes must catch (tests/cpp/cuda/mutation): the
    // refill goes out before the barrier, while slower warps may still read tile kt-1 from the stage
    // it overwrites. Never defined in a real build.
    if (next < num_k) {
      la.load(stage_a(next), next * kBKs);
      lb.load(stage_b(next), next * kBKs);
    }
    smoe::simt::cp_async_commit();
    __syncthreads();
#else
    __syncthreads();
    if (next < num_k) {
      la.load(stage_a(next), next * kBKs);
      lb.load(stage_b(next), next * kBKs);
    }
    smoe::simt::cp_async_commit();
#endif

    const S* ta = stage_a(kt);
    const S* tb = stage_b(kt);
#pragma unroll
    for (int kk = 0; kk < kBKs; kk += kMmaK<S>) {
      uint32_t af[kMI][4], bf[kNI][2];
      load_a_frags<kAKMajor>(af, ta, warp_m, lane, kk);
      load_b_frags<kBKMajor>(bf, tb, warp_n, lane, kk);
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni) mma16816<S>(acc[mi][ni], af[mi], bf[ni]);
      }
    }
  }
  smoe::simt::cp_async_wait_all();  // only empty groups remain; retire them before the CTA exits
}

// ---- epilogue helpers -----------------------------------------------------------------------------------
// The activations with the formulas of activation.cu and the CPU backend (exact erf GELU; SwiGLU:
// Shazeer 2020, arXiv:2002.05202), on f32 values.
__device__ __forceinline__ float act_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float act_gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f)); }
__device__ __forceinline__ float apply_activation(int act, float g, float u) {
  switch (act) {
    case static_cast<int>(Activation::kSwiGLU):
      return g * act_sigmoid(g) * u;
    case static_cast<int>(Activation::kGeGLU):
      return act_gelu(g) * u;
    case static_cast<int>(Activation::kGELU):
      return act_gelu(g);
    default:
      return g > 0.0f ? g : 0.0f;  // kReLU
  }
}
// Values pass through the storage type before the activation, as in the unfused pre -> act path.
template <class S>
__device__ __forceinline__ float round_trip(float v) {
  return to_float(from_float<S>(v));
}
template <class S>
__device__ __forceinline__ void store_pair(S* p, float v0, float v1) {  // p is 4-byte aligned
  Pack<S, 2> q;
  q.v[0] = from_float<S>(v0);
  q.v[1] = from_float<S>(v1);
  *reinterpret_cast<Pack<S, 2>*>(p) = q;
}
// Columns n and n + 1 (n even) of a row, those below `limit`: one 4-byte store when both are inside
// and `pair` (the row base and the column pair are 4-byte aligned), else element by element.
template <class S>
__device__ __forceinline__ void store_two(S* row, int64_t n, int64_t limit, bool pair, float v0, float v1) {
  if (pair && n + 1 < limit) {
    store_pair(row + n, v0, v1);
    return;
  }
  if (n < limit) row[n] = from_float<S>(v0);
  if (n + 1 < limit) row[n + 1] = from_float<S>(v1);
}

// ---- forward kernel ----------------------------------------------------------------------------------------
template <class S>
struct ForwardArgs {
  const S* a;                   // [T or R, Kd]
  int64_t lda, a_rows;          // a_rows: rows of a (gathered indices outside [0, a_rows) read zeros)
  const int32_t* token_of_row;  // [R] or nullptr
  const S* b;                   // [E, N, Kd] or [E, Kd, N]
  int64_t b_expert_stride, ldb;
  const int64_t* offsets;  // [E+1]
  int32_t E;
  int64_t R;         // rows of c: segments are clamped to [0, R)
  int64_t N, Kd, F;  // GEMM N; reduction length; F = N / 2 for a gated activation
  S* c;              // [R, N] or [R, F]
  int64_t ldc;
  S* pre;  // [R, N] or nullptr
  int64_t ldpre;
  const float* row_weights;  // [rows of c] or nullptr: indexed by the stored row
  const int32_t* store_row;  // [R] or nullptr: row r is stored to c[store_row[r]] (outside [0, c_rows): skipped)
  int64_t c_rows;            // rows of c (read only with store_row)
  int32_t act;
  bool vec_a, vec_b;      // 16-byte aligned rows of a / of b's columns (cp.async), else element loads
  bool pair_c, pair_pre;  // 4-byte aligned column pairs of c / pre (paired stores)
};

// Finds the (expert, m tile) of tile slot `slot`: experts take consecutive slots, ceil(rows_e / 128)
// each, in expert order. Each thread sums the tiles of a contiguous run of ceil(E / 128) experts, a
// block-wide exclusive scan gives every run its first slot, and the thread whose run holds `slot`
// publishes it. Returns false (for the whole CTA) when the slot is past the last tile: the grid
// covers the upper bound sum_e ceil(rows_e / 128) <= ceil(R / 128) + E - 1 without reading offsets
// on the host.
__device__ __forceinline__ bool find_tile(const int64_t* offsets, int E, int64_t R, int64_t slot, int* expert,
                                          int64_t* m_tile) {
  __shared__ int64_t s_warp_total[kThreads / 32];
  __shared__ int s_expert;
  __shared__ int64_t s_m_tile;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int per = (E + kThreads - 1) / kThreads;
  const int e_begin = min(E, tid * per), e_end = min(E, e_begin + per);
  auto tiles_of = [&](int e) -> int64_t {
    const int64_t lo = max(int64_t{0}, min(offsets[e], R)), hi = max(lo, min(offsets[e + 1], R));
    return (hi - lo + kBM - 1) / kBM;
  };
  int64_t local = 0;
  for (int e = e_begin; e < e_end; ++e) local += tiles_of(e);
  int64_t incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t v = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) s_warp_total[warp] = incl;
  if (tid == 0) s_expert = -1;
  __syncthreads();
  int64_t base = incl - local;
  for (int w = 0; w < warp; ++w) base += s_warp_total[w];
  for (int e = e_begin; e < e_end; ++e) {
    const int64_t t = tiles_of(e);
    if (slot >= base && slot < base + t) {
      s_expert = e;
      s_m_tile = slot - base;
    }
    base += t;
  }
  __syncthreads();
  *expert = s_expert;
  *m_tile = s_m_tile;
  return *expert >= 0;
}

// Grid: x = tile slots (M, fastest: CTAs that run together share the B tile of one expert in L2),
// y = N tiles (of 128 GEMM columns; of 64 outputs for a gated activation). 128 threads.
template <class S, bool kTransB, Epilogue kEpi>
__global__ void __launch_bounds__(kThreads) grouped_gemm_tc_kernel(const ForwardArgs<S> p) {
  SMOE_DYNAMIC_SMEM(unsigned char, smem_bytes);  // one byte type for every S: extern __shared__ arrays alias
  S* const smem = reinterpret_cast<S*>(smem_bytes);
  int e;
  int64_t m_tile;
  if (!find_tile(p.offsets, p.E, p.R, blockIdx.x, &e, &m_tile)) return;  // uniform over the CTA
  const int64_t seg_begin = max(int64_t{0}, min(p.offsets[e], p.R));
  const int64_t seg_end = max(seg_begin, min(p.offsets[e + 1], p.R));
  const int64_t m0 = seg_begin + m_tile * kBM;
  constexpr bool kGated = kEpi == Epilogue::kGatedActivation;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * (kGated ? kGatedBF : kBN);  // column / output f
  const S* be = p.b + e * p.b_expert_stride;

  // A: K-major, rows gathered through token_of_row; rows past the segment or with token -1 are zeros.
  KMajorLoader<S> la;
  la.k_len = p.Kd;
  la.vec = p.vec_a;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = m0 + (threadIdx.x >> 2) + 32 * i;
    int64_t src = r < seg_end ? r : -1;
    if (src >= 0 && p.token_of_row != nullptr) src = p.token_of_row[r];
    la.row[i] = (src >= 0 && src < p.a_rows) ? p.a + src * p.lda : nullptr;
  }
  // GEMM column of tile column j: plain, or for a gated activation the gate / up column of output f.
  auto b_column = [&](int j, bool* ok) -> int64_t {
    if constexpr (kGated) {
      const int w = j % kWN;
      const int64_t f = n0 + (j / kWN) * (kWN / 2) + (w % (kWN / 2));
      *ok = f < p.F;
      return w < kWN / 2 ? f : p.F + f;
    } else {
      *ok = n0 + j < p.N;
      return n0 + j;
    }
  };
  float acc[kMI][kNI][4] = {};
  if constexpr (kTransB) {  // b[e] [N, Kd]: K-major rows
    KMajorLoader<S> lb;
    lb.k_len = p.Kd;
    lb.vec = p.vec_b;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      bool ok;
      const int64_t n = b_column((threadIdx.x >> 2) + 32 * i, &ok);
      lb.row[i] = ok ? be + n * p.ldb : nullptr;
    }
    mainloop<S, true, true>(acc, smem, la, lb, p.Kd);
  } else if constexpr (sizeof(S) == 4) {  // f32, b[e] [Kd, N], no gated pairs: transposed into K-major tiles
    static_assert(!kGated, "f32 with b [E, Kd, N] takes no gated epilogue");
    const TransposingKMajorLoader<S> lb{be + n0, p.ldb, p.Kd, p.N - n0};
    mainloop<S, true, true>(acc, smem, la, lb, p.Kd);
  } else {  // b[e] [Kd, N]: MN-major
    MnMajorLoader<S> lb;
    bool ok;
    const int j0 = (threadIdx.x & 15) * kChunk;
    const int64_t n = b_column(j0, &ok);
    // the chunk's 8 columns are contiguous in b (one half of a gated pair): valid up to N, or F per half
    int64_t left = p.N - n;
    if constexpr (kGated) left = p.F - (n0 + (j0 / kWN) * (kWN / 2) + (j0 % kWN) % (kWN / 2));
    lb.base = be + n;
    lb.ld = p.ldb;
    lb.k_len = p.Kd;
    lb.cols_left = ok ? left : 0;
    lb.vec = p.vec_b;
    mainloop<S, true, false>(acc, smem, la, lb, p.Kd);
  }

  // Epilogue straight from the accumulators (C fragment, PTX ISA 9.7.14.5.8: lane holds rows
  // lane/4 and lane/4 + 8, columns 2(lane%4) and +1 of each m16n8 tile): 4-byte stores of two
  // adjacent columns.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warp_m = warp % kWarpsM, warp_n = warp / kWarpsM;
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = m0 + warp_m * kWM + mi * 16 + (lane >> 2) + h * 8;
      if (r >= seg_end) continue;
      const int64_t cr = p.store_row != nullptr ? p.store_row[r] : r;  // the row of c it is stored to
      if (p.store_row != nullptr && (cr < 0 || cr >= p.c_rows)) continue;
      const float w = p.row_weights != nullptr ? p.row_weights[cr] : 1.0f;
      if constexpr (kGated) {
#pragma unroll
        for (int ni = 0; ni < kNI / 2; ++ni) {
          const int64_t f = n0 + warp_n * (kWN / 2) + ni * 8 + (lane & 3) * 2;
          if (f >= p.F) continue;
          const float g0 = round_trip<S>(acc[mi][ni][2 * h]), g1 = round_trip<S>(acc[mi][ni][2 * h + 1]);
          const float u0 = round_trip<S>(acc[mi][ni + kNI / 2][2 * h]);
          const float u1 = round_trip<S>(acc[mi][ni + kNI / 2][2 * h + 1]);
          if (p.pre != nullptr) {
            store_two(p.pre + r * p.ldpre, f, p.F, p.pair_pre, g0, g1);
            store_two(p.pre + r * p.ldpre + p.F, f, p.F, p.pair_pre, u0, u1);
          }
          store_two(p.c + cr * p.ldc, f, p.F, p.pair_c, w * apply_activation(p.act, g0, u0),
                    w * apply_activation(p.act, g1, u1));
        }
      } else {
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni) {
          const int64_t n = n0 + warp_n * kWN + ni * 8 + (lane & 3) * 2;
          if (n >= p.N) continue;
          float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
          if constexpr (kEpi == Epilogue::kActivation) {
            v0 = round_trip<S>(v0);
            v1 = round_trip<S>(v1);
            if (p.pre != nullptr) store_two(p.pre + r * p.ldpre, n, p.N, p.pair_pre, v0, v1);
            v0 = apply_activation(p.act, v0, 1.0f);
            v1 = apply_activation(p.act, v1, 1.0f);
          }
          store_two(p.c + cr * p.ldc, n, p.N, p.pair_c, w * v0, w * v1);
        }
      }
    }
  }
}

// ---- weight-gradient kernel (variable K) ------------------------------------------------------------------
template <class S>
struct WgradArgs {
  const S* a;  // [R, M]
  int64_t lda;
  const S* b;  // [R, N], or gathered: [b_rows, N] read through b_index
  int64_t ldb;
  const int32_t* b_index;  // [R] i32 (row r of the B operand is b[b_index[r]]; -1: zeros) or nullptr
  int64_t b_rows;
  const int64_t* offsets;  // [E+1]
  int64_t R, M, N;
  int64_t m_tiles;
  S* c;               // [E, M, N]
  bool vec_a, vec_b;  // 16-byte aligned rows (cp.async), else element loads
  bool pair_c;        // N even and c 4-byte aligned: paired stores
};

// Grid: x = m_tiles * n_tiles (m fastest), y = E. The reduction runs over the segment's rows, so both
// operands are MN-major tiles (a[seg]^T is read row by row); an empty segment skips the loop and
// stores the zero accumulators. With b_index the B rows are gathered (the expert MLP's
// grad_w1 = grad_pre[seg]^T x[token_of_row[seg]], no permuted copy of x).
template <class S>
__global__ void __launch_bounds__(kThreads) grouped_gemm_wgrad_tc_kernel(const WgradArgs<S> p) {
  SMOE_DYNAMIC_SMEM(unsigned char, smem_bytes);  // one byte type for every S: extern __shared__ arrays alias
  S* const smem = reinterpret_cast<S*>(smem_bytes);
  const int64_t e = blockIdx.y;
  const int64_t m0 = (blockIdx.x % p.m_tiles) * kBM, n0 = (blockIdx.x / p.m_tiles) * kBN;
  const int64_t seg_begin = max(int64_t{0}, min(p.offsets[e], p.R));
  const int64_t seg_end = max(seg_begin, min(p.offsets[e + 1], p.R));
  float acc[kMI][kNI][4] = {};
  // B's rows of the segment: b + seg_begin rows, or gathered through b_index[seg_begin ..]
  const bool gather_b = p.b_index != nullptr;
  const S* b_seg = gather_b ? p.b : p.b + seg_begin * p.ldb;
  const int32_t* b_index = gather_b ? p.b_index + seg_begin : nullptr;
  if constexpr (sizeof(S) == 4) {  // f32 (3xTF32): K-major tiles, transposed by the loaders
    const TransposingKMajorLoader<S> la{p.a + seg_begin * p.lda + m0, p.lda, seg_end - seg_begin, p.M - m0};
    const TransposingKMajorLoader<S> lb{b_seg + n0, p.ldb, seg_end - seg_begin, p.N - n0, b_index, p.b_rows};
    mainloop<S, true, true>(acc, smem, la, lb, seg_end - seg_begin);
  } else {
    const int64_t col = (threadIdx.x & 15) * kChunk;
    MnMajorLoader<S> la, lb;
    la.base = p.a + seg_begin * p.lda + m0 + col;
    la.ld = p.lda;
    la.k_len = seg_end - seg_begin;
    la.cols_left = p.M - (m0 + col);
    la.vec = p.vec_a;
    lb.base = b_seg + n0 + col;
    lb.ld = p.ldb;
    lb.k_len = seg_end - seg_begin;
    lb.cols_left = p.N - (n0 + col);
    lb.vec = p.vec_b;
    lb.index = b_index;
    lb.src_rows = p.b_rows;
    mainloop<S, false, false>(acc, smem, la, lb, seg_end - seg_begin);
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warp_m = warp % kWarpsM, warp_n = warp / kWarpsM;
  S* ce = p.c + e * p.M * p.N;
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + warp_m * kWM + mi * 16 + (lane >> 2) + h * 8;
      if (m >= p.M) continue;
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni) {
        const int64_t n = n0 + warp_n * kWN + ni * 8 + (lane & 3) * 2;
        store_two(ce + m * p.N, n, p.N, p.pair_c, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
      }
    }
  }
}

}  // namespace smoe::SMOE_CUDA_NS::gemm_tc

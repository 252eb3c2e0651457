// CUDA backend of routing_plan (include/smoe/ops/routing.h): a stable counting sort of the T*K
// assignments by expert, with capacity, dropping in token order and padding, and no host sync.
//
// Versions (docs/kernels/routing.md):
//  v0 (csrc/cuda/naive/routing_v0.cu): one thread per expert walks all T*K assignments (count,
//     then place in (t, k) order); selected by set_kernel_version(KernelOp::kRoutingPlan, 0). The
//     CPU backend (csrc/cpu/routing.cpp), the reference: per-chunk histograms, a serial scan over
//     (expert, chunk), a stable scatter per chunk.
//  v1 (this file): the same passes as kernels over finer chunks (~1024 assignments, up to 4096
//     chunks; the stable order is the same whatever the chunking, so the result equals the CPU's):
//     1. histogram: one block per chunk, shared-memory integer atomics (order-free), one row of the
//        [chunks, E] table per block; the blocks also fill token_of_row with -1 (padding, unused rows);
//     2a. column scan: one block per expert turns its column of the table into per-chunk rank bases
//        (block scans in chunk order) and writes its total;
//     2b. scan: one block (512 threads) applies the capacity and the padding, then a block scan writes offsets (i64);
//     3. scatter: one warp per chunk walks its assignments in (t, k) order, 32 at a time;
//        __match_any_sync groups the lanes with the same expert, and a lane's rank is its chunk
//        base plus the number of lower lanes in its group, so the order is stable whatever the
//        schedule. Offsets and counts never leave the device.
//  v2 (this file, drop_policy kByScore with a capacity): passes 1-2 as above (the scan also writes
//     the dropless segment starts), then
//     3'. group: the scatter of pass 3 writes each assignment's flat index a = t*K + k and its weight
//        into its expert's dropless segment of two workspace lists, in token order;
//     4'. select: one block per expert; an expert over capacity finds the C-th best of its packed
//        keys (weight desc, then a asc) by a block radix select (common.cuh), keeps the keys >= it
//        (exactly C: keys are distinct), and a block scan of the kept flags in segment (= token)
//        order gives the rows. The kept set is unique, so the result equals the CPU backend's.
// Expert ids outside [0, E) (the CPU backend rejects them) get row_of = -1 and take no row; a NaN
// weight (also rejected by the CPU backend) ranks like -inf, below every number.
#include "backend.h"
#include "common.cuh"

namespace smoe::SMOE_CUDA_NS {
namespace {

// Chunking: ~1024 assignments per chunk (one warp walks a chunk in 32 steps of 32), up to kMaxChunks
// chunks, whole tokens per chunk. Finer than the CPU backend's (8192 per chunk, at most 64): a stable
// counting sort has one answer whatever the chunking (tests/cpp/cuda/test_routing.cpp checks several),
// and many short chunks spread the scatter over the SMs instead of 64 warps of 256 dependent steps.
constexpr int64_t kAssignmentsPerChunk = 1024;
constexpr int64_t kMaxChunks = 4096;
constexpr int kColumnScanThreads = 128;  // pass 2a: one block per expert
constexpr int64_t kAlign = 64;
constexpr int kHistThreads = 256;
constexpr int kScanThreads = 512;         // pass 2b: one block (512: no register spills at the launch bound)
constexpr int kMaxSmemHistogram = 12288;  // E ints in 48 KiB of shared memory
constexpr int kSelectThreads = 256;       // drop by score: one block per expert

int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

int64_t num_chunks(int64_t T, int64_t K, int64_t per_chunk) {
  const int64_t by_size = (T * K + per_chunk - 1) / per_chunk;
  const int64_t hi = kMaxChunks < (T > 1 ? T : 1) ? kMaxChunks : (T > 1 ? T : 1);
  return by_size < 1 ? 1 : (by_size > hi ? hi : by_size);
}

// First token of chunk c of n over T tokens.
__host__ __device__ __forceinline__ int64_t chunk_begin(int64_t T, int64_t n, int64_t c) { return T * c / n; }

// Pass 1: hist[c, e] = assignments of chunk c that go to expert e; token_of_row[:] = -1.
__global__ void __launch_bounds__(kHistThreads)
    routing_histogram_kernel(const int32_t* experts, int64_t T, int32_t K, int32_t E, int32_t n_chunks, int32_t* hist,
                             int32_t* token_of_row, int64_t rows) {
  SMOE_DYNAMIC_SMEM(int, local);  // [E] when E <= kMaxSmemHistogram
  const int c = blockIdx.x;
  int32_t* row = hist + static_cast<int64_t>(c) * E;
  const bool in_smem = E <= kMaxSmemHistogram;
  int* h = in_smem ? local : row;
  for (int e = threadIdx.x; e < E; e += blockDim.x) h[e] = 0;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    token_of_row[r] = -1;
  }
  __syncthreads();
  const int64_t a0 = chunk_begin(T, n_chunks, c) * K, a1 = chunk_begin(T, n_chunks, c + 1) * K;
  for (int64_t a = a0 + threadIdx.x; a < a1; a += blockDim.x) {
    const int32_t e = experts[a];
    if (e >= 0 && e < E) atomicAdd(&h[e], 1);
  }
  __syncthreads();
  if (in_smem) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) row[e] = h[e];
  }
}

// Exclusive scan of one value per thread over the block (warp shuffles, then the warp totals).
__device__ __forceinline__ long long block_exclusive_scan(long long v, long long* warp_totals, long long* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  long long incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const long long u = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += u;
  }
  if (lane == 31) warp_totals[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    long long w = lane < n_warps ? warp_totals[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const long long u = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w += u;
    }
    if (lane < n_warps) warp_totals[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const long long before = (warp > 0 ? warp_totals[warp - 1] : 0) + incl - v;
  *total = warp_totals[n_warps - 1];
  return before;
}

// Pass 2a: one block per expert e turns column e of hist into exclusive rank bases (a block scan over
// the chunks, tile by tile in chunk order) and writes the expert's total to totals[e].
__global__ void __launch_bounds__(kColumnScanThreads)
    routing_column_scan_kernel(int32_t* hist, int32_t n_chunks, int32_t E, int32_t* totals) {
  __shared__ long long warp_totals[32];
  const int e = blockIdx.x;
  long long carry = 0;  // assignments of expert e in the chunks of the earlier tiles
  for (int c0 = 0; c0 < n_chunks; c0 += blockDim.x) {
    const int c = c0 + static_cast<int>(threadIdx.x);
    int32_t* cell = hist + static_cast<int64_t>(c) * E + e;
    const int32_t n = c < n_chunks ? *cell : 0;
    long long tile = 0;
    const long long before = block_exclusive_scan(n, warp_totals, &tile);
    if (c < n_chunks) *cell = static_cast<int32_t>(carry + before);
    carry += tile;
    __syncthreads();  // warp_totals is reused by the next tile's scan
  }
  if (threadIdx.x == 0) totals[e] = static_cast<int32_t>(carry);
}

// Pass 2b: counts (capacity), padded offsets, from the totals of pass 2a (in counts). One block.
__global__ void __launch_bounds__(kScanThreads) routing_scan_kernel(int32_t E, int64_t capacity, int32_t pad_multiple,
                                                                    int32_t* counts, int64_t* offsets, int32_t* start) {
  __shared__ long long warp_totals[32];
  // Thread i owns the contiguous experts [e0, e1): the padded sizes of its range add to one value.
  const int per = static_cast<int>((E + blockDim.x - 1) / blockDim.x);
  const int e0 = min(E, static_cast<int>(threadIdx.x) * per), e1 = min(E, e0 + per);
  long long mine = 0;
  for (int e = e0; e < e1; ++e) {
    const int32_t run = counts[e];  // the expert's total (pass 2a)
    const int32_t kept = capacity < 0 ? run : static_cast<int32_t>(run < capacity ? run : capacity);
    counts[e] = kept;
    if (start) start[e] = run;  // the expert's total for now; its dropless segment start below
    mine += (static_cast<long long>(kept) + pad_multiple - 1) / pad_multiple * pad_multiple;
  }
  long long total = 0;
  long long off = block_exclusive_scan(mine, warp_totals, &total);
  for (int e = e0; e < e1; ++e) {
    offsets[e] = off;
    off += (static_cast<long long>(counts[e]) + pad_multiple - 1) / pad_multiple * pad_multiple;
  }
  if (threadIdx.x == 0) offsets[E] = total;
  if (start) {  // drop by score: dropless, unpadded segment starts of the grouped list (T*K < 2^31)
    long long mine_total = 0;
    for (int e = e0; e < e1; ++e) mine_total += start[e];
    __syncthreads();  // every thread has read warp_totals of the first scan
    long long all = 0;
    long long pos = block_exclusive_scan(mine_total, warp_totals, &all);
    for (int e = e0; e < e1; ++e) {
      const int32_t n = start[e];
      start[e] = static_cast<int32_t>(pos);
      pos += n;
    }
    if (threadIdx.x == 0) start[E] = static_cast<int32_t>(all);
  }
}

// Pass 3: one warp per chunk; the warp owns row c of the base table and walks its assignments in order.
// kGroup (drop by score, pass 3'): write a = t*K + k to grouped[start[e] + rank] instead of a row.
template <bool kGroup>
__global__ void __launch_bounds__(32)
    routing_scatter_kernel(const int32_t* experts, int64_t T, int32_t K, int32_t E, int32_t n_chunks, int32_t* hist,
                           const int32_t* counts, const int64_t* offsets, int32_t* row_of, int32_t* token_of_row,
                           const int32_t* start, int32_t* grouped, const float* weights, float* grouped_w) {
  const int lane = threadIdx.x;
  const int c = blockIdx.x;
  int32_t* base = hist + static_cast<int64_t>(c) * E;
  const int64_t a0 = chunk_begin(T, n_chunks, c) * K, a1 = chunk_begin(T, n_chunks, c + 1) * K;
  for (int64_t t0 = a0; t0 < a1; t0 += 32) {
    const int64_t a = t0 + lane;
    const bool valid = a < a1;
    const int32_t e = valid ? experts[a] : -1;
    const bool routed = e >= 0 && e < E;
    // TEACH: __match_any_sync returns, to each lane, the mask of lanes holding the same value: the
    // lanes of one expert learn their order within these 32 assignments in one instruction, so a
    // chunk is ranked 32 assignments at a time with no atomics (v0: one thread per expert, serial).
    const unsigned peers = __match_any_sync(kFullMask, routed ? e : -1);
    const int32_t rank_in_tile = __popc(peers & ((1u << lane) - 1u));
    const int32_t rank = routed ? base[e] + rank_in_tile : 0;
    __syncwarp();  // every lane has read its base before the last lane of each group advances it
    if (routed && 31 - __clz(static_cast<int>(peers)) == lane) base[e] += __popc(peers);
    __syncwarp();
    if (!valid) continue;
    if (kGroup) {
      if (routed) {
        grouped[start[e] + rank] = static_cast<int32_t>(a);  // row_of is written by the select pass
        grouped_w[start[e] + rank] = weights[a];             // the select reads its keys contiguously
      } else {
        row_of[a] = -1;
      }
    } else if (routed && rank < counts[e]) {
      const int64_t r = offsets[e] + rank;
      row_of[a] = static_cast<int32_t>(r);
      token_of_row[r] = static_cast<int32_t>(a / K);
    } else {
      row_of[a] = -1;  // dropped (over capacity) or an invalid expert id
    }
  }
}

// Pass 4' (drop by score): one block per expert over its dropless segment of the grouped list.
__global__ void __launch_bounds__(kSelectThreads)
    routing_select_by_score_kernel(const int32_t* grouped, const float* grouped_w, const int32_t* start, int32_t K,
                                   const int32_t* counts, const int64_t* offsets, int32_t* row_of,
                                   int32_t* token_of_row) {
  __shared__ int hist[258];
  __shared__ long long warp_totals[32];
  const int e = blockIdx.x;
  const int32_t* seg = grouped + start[e];
  const float* seg_w = grouped_w + start[e];
  const int64_t n = start[e + 1] - start[e], keep = counts[e];
  // (weight desc, a asc) as one unsigned compare: the CPU backend's strict order (csrc/cpu/routing.cpp).
  const auto key_at = [&](int64_t i) {
    const int32_t a = seg[i];
    return pack_key(seg_w[i], static_cast<uint32_t>(a));
  };
  // n, keep are the same in every thread: the branch is uniform, so the barriers inside are reached by all.
  const bool keep_all = keep >= n, keep_none = keep == 0;
  const unsigned long long threshold = keep_all || keep_none ? 0ull : block_radix_select_desc(key_at, n, keep, hist);
  const int64_t row0 = offsets[e];
  long long done = 0;  // kept rows of the earlier tiles
  for (int64_t i0 = 0; i0 < n; i0 += blockDim.x) {
    const int64_t i = i0 + threadIdx.x;
    const bool in = i < n;
    const bool kept = in && !keep_none && (keep_all || key_at(i) >= threshold);
    long long tile_kept = 0;
    const long long before = block_exclusive_scan(kept ? 1 : 0, warp_totals, &tile_kept);
    if (in) {
      const int32_t a = seg[i];
      if (kept) {
        const int64_t r = row0 + done + before;
        row_of[a] = static_cast<int32_t>(r);
        token_of_row[r] = a / K;
      } else {
        row_of[a] = -1;
      }
    }
    done += tile_kept;
    __syncthreads();  // warp_totals is reused by the next tile's scan
  }
}

int64_t grouped_bytes(int64_t T, int64_t K) { return align_up(T * K * int64_t(sizeof(int32_t)), kAlign); }

bool drops_by_score(const RoutingPlanParams& p) { return p.capacity >= 0 && p.drop_policy == DropPolicy::kByScore; }

}  // namespace

int64_t routing_plan_workspace_bytes(const RoutingPlanParams& params, int64_t T, int64_t K) {
  return routing_plan_workspace_bytes_chunked(params, T, K, kAssignmentsPerChunk);
}

int64_t routing_plan_workspace_bytes_chunked(const RoutingPlanParams& params, int64_t T, int64_t K, int64_t per_chunk) {
  if (params.num_experts < 1 || T < 0 || K < 0 || per_chunk < 1) return 0;
  // hist [chunks, E] i32: per-chunk counts, then per-chunk rank bases
  int64_t bytes = align_up(num_chunks(T, K, per_chunk) * params.num_experts * int64_t(sizeof(int32_t)), kAlign);
  // by score: grouped [T*K] i32 (assignments by expert, token order), their weights [T*K] f32 (the
  // select's keys, read contiguously 8 times), start [E+1] i32
  if (drops_by_score(params)) bytes += 2 * grouped_bytes(T, K) + align_up((params.num_experts + 1) * 4, kAlign);
  return bytes;
}

Status routing_plan(const RoutingPlanParams& params, const TensorView& experts, const TensorView& weights,
                    const TensorView& counts, const TensorView& offsets, const TensorView& row_of,
                    const TensorView& token_of_row, const TensorView& workspace, void* stream) {
  if (kernel_version(KernelOp::kRoutingPlan) == 0) {
    return routing_plan_v0(params, experts, weights, counts, offsets, row_of, token_of_row, stream);
  }
  return routing_plan_chunked(params, experts, weights, counts, offsets, row_of, token_of_row, workspace,
                              kAssignmentsPerChunk, stream);
}

Status routing_plan_chunked(const RoutingPlanParams& params, const TensorView& experts, const TensorView& weights,
                            const TensorView& counts, const TensorView& offsets, const TensorView& row_of,
                            const TensorView& token_of_row, const TensorView& workspace, int64_t per_chunk,
                            void* stream) {
  const char* op = "routing_plan";
  if (per_chunk < 1) return invalid_argument(op, "per_chunk", "at least 1", std::to_string(per_chunk));
  const bool by_score = drops_by_score(params);
  const int64_t T = experts.size(0), K = experts.size(1);
  const int32_t E = params.num_experts;
  const int64_t rows = token_of_row.size(0);
  const cudaStream_t s = as_stream(stream);
  const int32_t n_chunks = static_cast<int32_t>(num_chunks(T, K, per_chunk));
  const int64_t ws_bytes = routing_plan_workspace_bytes_chunked(params, T, K, per_chunk);
  if (workspace.numel() * dtype_size(workspace.dtype) < ws_bytes) {
    return invalid_argument(op, "workspace", std::to_string(ws_bytes) + " bytes (CUDA backend)",
                            std::to_string(workspace.numel() * dtype_size(workspace.dtype)) + " bytes");
  }
  int32_t* hist = workspace.data_as<int32_t>();
  uint8_t* ws_tail = workspace.data_as<uint8_t>() + align_up(int64_t(n_chunks) * E * int64_t(sizeof(int32_t)), kAlign);
  int32_t* grouped = by_score ? reinterpret_cast<int32_t*>(ws_tail) : nullptr;                          // [T*K]
  float* grouped_w = by_score ? reinterpret_cast<float*>(ws_tail + grouped_bytes(T, K)) : nullptr;      // [T*K]
  int32_t* start = by_score ? reinterpret_cast<int32_t*>(ws_tail + 2 * grouped_bytes(T, K)) : nullptr;  // [E+1]
  const size_t smem = E <= kMaxSmemHistogram ? sizeof(int32_t) * static_cast<size_t>(E) : 0;
  // one block per chunk of ~per_chunk assignments
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&routing_histogram_kernel, dim3(static_cast<unsigned>(n_chunks)), dim3(kHistThreads),
                              smem, s, experts.data_as<const int32_t>(), T, static_cast<int32_t>(K), E, n_chunks, hist,
                              token_of_row.data_as<int32_t>(), rows));
  // one block per expert: its column of chunk counts -> rank bases, its total into counts
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&routing_column_scan_kernel, dim3(static_cast<unsigned>(E)), dim3(kColumnScanThreads), 0,
                              s, hist, n_chunks, E, counts.data_as<int32_t>()));
  // one block: capacity, padding and one scan over E
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&routing_scan_kernel, dim3(1), dim3(kScanThreads), 0, s, E, params.capacity,
                              params.pad_multiple, counts.data_as<int32_t>(), offsets.data_as<int64_t>(), start));
  if (T * K == 0) return Status::Ok();
  // one warp per chunk: the warp serialises its chunk in (t, k) order, 32 assignments a step (~32 steps)
  auto* scatter = by_score ? &routing_scatter_kernel<true> : &routing_scatter_kernel<false>;
  SMOE_CUDA_CHECK(SMOE_LAUNCH(
      scatter, dim3(static_cast<unsigned>(n_chunks)), dim3(32), 0, s, experts.data_as<const int32_t>(), T,
      static_cast<int32_t>(K), E, n_chunks, hist, counts.data_as<const int32_t>(), offsets.data_as<const int64_t>(),
      row_of.data_as<int32_t>(), token_of_row.data_as<int32_t>(), static_cast<const int32_t*>(start), grouped,
      by_score ? weights.data_as<const float>() : nullptr, grouped_w));
  if (!by_score) return Status::Ok();
  // one block per expert: a radix select over its segment (only experts over capacity), then a block
  // scan of the kept flags in token order
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&routing_select_by_score_kernel, dim3(static_cast<unsigned>(E)), dim3(kSelectThreads), 0,
                              s, static_cast<const int32_t*>(grouped), static_cast<const float*>(grouped_w),
                              static_cast<const int32_t*>(start), static_cast<int32_t>(K),
                              counts.data_as<const int32_t>(), offsets.data_as<const int64_t>(),
                              row_of.data_as<int32_t>(), token_of_row.data_as<int32_t>()));
  return Status::Ok();
}

}  // namespace smoe::SMOE_CUDA_NS

// CUDA backend of routing_plan (include/smoe/ops/routing.h): a stable counting sort of the T*K
// assignments by expert, with capacity, dropping in token order and padding, and no host sync.
//
// Versions (docs/kernels/routing.md):
//  v0 (CPU, csrc/cpu/routing.cpp): per-chunk histograms, a serial scan over (expert, chunk), a
//     stable scatter per chunk.
//  v1 (this file): the same three passes as three kernels, with the CPU's chunking (so the
//     workspace is the same [chunks, E] i32 table and the result is the same permutation):
//     1. histogram: one block per chunk, shared-memory integer atomics (order-free), one row of the
//        table per block; the blocks also fill token_of_row with -1 (padding, unused rows);
//     2. scan: one block; thread-owned expert ranges turn each column of the table into per-chunk
//        rank bases, apply the capacity and the padding, then a block scan writes offsets (i64);
//     3. scatter: one warp per chunk walks its assignments in (t, k) order, 32 at a time;
//        __match_any_sync groups the lanes with the same expert, and a lane's rank is its chunk
//        base plus the number of lower lanes in its group, so the order is stable whatever the
//        schedule. Offsets and counts never leave the device.
// Expert ids outside [0, E) (the CPU backend rejects them) get row_of = -1 and take no row.
// Drop policy kByScore is not implemented here yet: the launcher returns kUnsupported.
#include "backend.h"
#include "common.cuh"

namespace smoe::SMOE_CUDA_NS {
namespace {

// The CPU backend's chunking (csrc/cpu/routing.cpp): a function of T and K only.
constexpr int64_t kAssignmentsPerChunk = 8192;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kAlign = 64;
constexpr int kHistThreads = 256;
constexpr int kScanThreads = 1024;
constexpr int kMaxSmemHistogram = 12288;  // E ints in 48 KiB of shared memory

int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

int64_t num_chunks(int64_t T, int64_t K) {
  const int64_t by_size = (T * K + kAssignmentsPerChunk - 1) / kAssignmentsPerChunk;
  const int64_t hi = kMaxChunks < (T > 1 ? T : 1) ? kMaxChunks : (T > 1 ? T : 1);
  return by_size < 1 ? 1 : (by_size > hi ? hi : by_size);
}

// First token of chunk c of n over T tokens.
__host__ __device__ __forceinline__ int64_t chunk_begin(int64_t T, int64_t n, int64_t c) { return T * c / n; }

// Pass 1: hist[c, e] = assignments of chunk c that go to expert e; token_of_row[:] = -1.
__global__ void __launch_bounds__(kHistThreads)
    routing_histogram_kernel(const int32_t* experts, int64_t T, int32_t K, int32_t E, int32_t n_chunks,
                             int32_t* hist, int32_t* token_of_row, int64_t rows) {
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

// Pass 2: column scans of hist (-> rank bases), counts, padded offsets. One block.
__global__ void __launch_bounds__(kScanThreads)
    routing_scan_kernel(int32_t* hist, int32_t n_chunks, int32_t E, int64_t capacity, int32_t pad_multiple,
                        int32_t* counts, int64_t* offsets) {
  __shared__ long long warp_totals[32];
  // Thread i owns the contiguous experts [e0, e1): the padded sizes of its range add to one value.
  const int per = static_cast<int>((E + blockDim.x - 1) / blockDim.x);
  const int e0 = min(E, static_cast<int>(threadIdx.x) * per), e1 = min(E, e0 + per);
  long long mine = 0;
  for (int e = e0; e < e1; ++e) {
    int32_t run = 0;
    for (int c = 0; c < n_chunks; ++c) {
      const int32_t n = hist[static_cast<int64_t>(c) * E + e];
      hist[static_cast<int64_t>(c) * E + e] = run;
      run += n;
    }
    const int32_t kept = capacity < 0 ? run : static_cast<int32_t>(run < capacity ? run : capacity);
    counts[e] = kept;
    mine += (static_cast<long long>(kept) + pad_multiple - 1) / pad_multiple * pad_multiple;
  }
  long long total = 0;
  long long off = block_exclusive_scan(mine, warp_totals, &total);
  for (int e = e0; e < e1; ++e) {
    offsets[e] = off;
    off += (static_cast<long long>(counts[e]) + pad_multiple - 1) / pad_multiple * pad_multiple;
  }
  if (threadIdx.x == 0) offsets[E] = total;
}

// Pass 3: one warp per chunk; the warp owns row c of the base table and walks its assignments in order.
__global__ void __launch_bounds__(32)
    routing_scatter_kernel(const int32_t* experts, int64_t T, int32_t K, int32_t E, int32_t n_chunks, int32_t* hist,
                           const int32_t* counts, const int64_t* offsets, int32_t* row_of, int32_t* token_of_row) {
  const int lane = threadIdx.x;
  const int c = blockIdx.x;
  int32_t* base = hist + static_cast<int64_t>(c) * E;
  const int64_t a0 = chunk_begin(T, n_chunks, c) * K, a1 = chunk_begin(T, n_chunks, c + 1) * K;
  for (int64_t t0 = a0; t0 < a1; t0 += 32) {
    const int64_t a = t0 + lane;
    const bool valid = a < a1;
    const int32_t e = valid ? experts[a] : -1;
    const bool routed = e >= 0 && e < E;
    const unsigned peers = __match_any_sync(kFullMask, routed ? e : -1);
    const int32_t rank_in_tile = __popc(peers & ((1u << lane) - 1u));
    const int32_t rank = routed ? base[e] + rank_in_tile : 0;
    __syncwarp();  // every lane has read its base before the last lane of each group advances it
    if (routed && 31 - __clz(static_cast<int>(peers)) == lane) base[e] += __popc(peers);
    __syncwarp();
    if (!valid) continue;
    if (routed && rank < counts[e]) {
      const int64_t r = offsets[e] + rank;
      row_of[a] = static_cast<int32_t>(r);
      token_of_row[r] = static_cast<int32_t>(a / K);
    } else {
      row_of[a] = -1;  // dropped (over capacity) or an invalid expert id
    }
  }
}

}  // namespace

int64_t routing_plan_workspace_bytes(const RoutingPlanParams& params, int64_t T, int64_t K) {
  if (params.num_experts < 1 || T < 0 || K < 0) return 0;
  // hist [chunks, E] i32: per-chunk counts, then per-chunk rank bases (the CPU backend's first table)
  return align_up(num_chunks(T, K) * params.num_experts * int64_t(sizeof(int32_t)), kAlign);
}

Status routing_plan(const RoutingPlanParams& params, const TensorView& experts, const TensorView& /*weights*/,
                    const TensorView& counts, const TensorView& offsets, const TensorView& row_of,
                    const TensorView& token_of_row, const TensorView& workspace, void* stream) {
  const char* op = "routing_plan";
  if (params.capacity >= 0 && params.drop_policy == DropPolicy::kByScore) {
    return unsupported(op, "params.drop_policy = kByScore with a capacity is not implemented on the CUDA backend yet; "
                           "use kByTokenOrder, or backend 'cpu'");
  }
  const int64_t T = experts.size(0), K = experts.size(1);
  const int32_t E = params.num_experts;
  const int64_t rows = token_of_row.size(0);
  const cudaStream_t s = as_stream(stream);
  const int32_t n_chunks = static_cast<int32_t>(num_chunks(T, K));
  const int64_t ws_bytes = ::smoe::SMOE_CUDA_NS::routing_plan_workspace_bytes(params, T, K);
  if (workspace.numel() * dtype_size(workspace.dtype) < ws_bytes) {
    return invalid_argument(op, "workspace", std::to_string(ws_bytes) + " bytes (CUDA backend)",
                            std::to_string(workspace.numel() * dtype_size(workspace.dtype)) + " bytes");
  }
  int32_t* hist = workspace.data_as<int32_t>();
  const size_t smem = E <= kMaxSmemHistogram ? sizeof(int32_t) * static_cast<size_t>(E) : 0;
  // one block per chunk of ~8192 assignments (the CPU backend's chunks)
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&routing_histogram_kernel, dim3(static_cast<unsigned>(n_chunks)), dim3(kHistThreads),
                              smem, s, experts.data_as<const int32_t>(), T, static_cast<int32_t>(K), E, n_chunks,
                              hist, token_of_row.data_as<int32_t>(), rows));
  // one block: E columns of at most 64 chunks, then one scan over E
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&routing_scan_kernel, dim3(1), dim3(kScanThreads), 0, s, hist, n_chunks, E,
                              params.capacity, params.pad_multiple, counts.data_as<int32_t>(),
                              offsets.data_as<int64_t>()));
  if (T * K == 0) return Status::Ok();
  // one warp per chunk: the warp serialises its chunk in (t, k) order, 32 assignments a step
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&routing_scatter_kernel, dim3(static_cast<unsigned>(n_chunks)), dim3(32), 0, s,
                              experts.data_as<const int32_t>(), T, static_cast<int32_t>(K), E, n_chunks, hist,
                              counts.data_as<const int32_t>(), offsets.data_as<const int64_t>(),
                              row_of.data_as<int32_t>(), token_of_row.data_as<int32_t>()));
  return Status::Ok();
}

}  // namespace smoe::SMOE_CUDA_NS

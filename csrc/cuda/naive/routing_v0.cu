// routing_plan v0 (include/smoe/ops/routing.h): one thread per expert (and one for the scan), the
// simplest correct counting sort. The first rung of the ladder (docs/kernels/routing.md); v1 is
// csrc/cuda/routing.cu.
//
//   fill:    one thread per element: row_of = -1, token_of_row = -1
//   count:   one thread per expert walks all T*K assignments and counts its own (capped at C)
//   scan:    one thread writes the padded offsets
//   place:   one thread per expert walks the assignments again in (t, k) order and gives each kept
//            one the next row of its segment; kByScore keeps an assignment when fewer than C of the
//            expert's assignments have a better key (weight desc, then lower t*K+k): O(n_e^2)
// The result equals the CPU backend's by construction: a stable sort in (t, k) order. No workspace.
#include "../common.cuh"
#include "naive.h"

namespace smoe::SMOE_CUDA_NS {
namespace {

constexpr int kThreads = 128;

__global__ void routing_v0_fill_kernel(int32_t* row_of, int64_t n, int32_t* token_of_row, int64_t rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) row_of[i] = -1;
  if (i < rows) token_of_row[i] = -1;
}

__global__ void routing_v0_count_kernel(const int32_t* experts, int64_t n, int32_t E, int64_t capacity,
                                        int32_t* counts) {
  // TEACH: every thread reads all T*K expert ids, E times the bytes of the input. v1 reads them once:
  // a block per chunk builds a shared-memory histogram, and a scan over (expert, chunk) gives each
  // chunk its rank bases.
  const int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e >= E) return;
  int64_t c = 0;
  for (int64_t a = 0; a < n; ++a) c += experts[a] == e ? 1 : 0;
  counts[e] = static_cast<int32_t>(capacity >= 0 && c > capacity ? capacity : c);
}

__global__ void routing_v0_scan_kernel(const int32_t* counts, int32_t E, int32_t pad, int64_t* offsets) {
  // TEACH: a single thread runs the E-step scan; v1 uses a block scan (512 threads) for the same.
  int64_t o = 0;
  offsets[0] = 0;
  for (int e = 0; e < E; ++e) {
    o += (static_cast<int64_t>(counts[e]) + pad - 1) / pad * pad;
    offsets[e + 1] = o;
  }
}

__global__ void routing_v0_place_kernel(const int32_t* experts, const float* weights, int64_t n, int32_t K, int32_t E,
                                        int64_t capacity, bool by_score, const int64_t* offsets, int32_t* row_of,
                                        int32_t* token_of_row) {
  // TEACH: E threads walk n assignments each, one after another: the GPU runs E threads where it
  // could run n. v1's scatter gives each warp a chunk of ~1024 assignments and ranks 32 at a time
  // with __match_any_sync.
  const int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e >= E) return;
  int64_t next = offsets[e], taken = 0;
  for (int64_t a = 0; a < n; ++a) {
    if (experts[a] != e) continue;
    bool keep = capacity < 0 || taken < capacity;
    if (by_score && capacity >= 0) {
      const unsigned long long key = pack_key(weights[a], static_cast<uint32_t>(a));
      int64_t better = 0;
      for (int64_t b = 0; b < n && better < capacity; ++b) {
        if (experts[b] == e && pack_key(weights[b], static_cast<uint32_t>(b)) > key) ++better;
      }
      keep = better < capacity;
    }
    if (!keep) continue;
    row_of[a] = static_cast<int32_t>(next);
    token_of_row[next] = static_cast<int32_t>(a / K);
    ++next;
    ++taken;
  }
}

}  // namespace

Status routing_plan_v0(const RoutingPlanParams& params, const TensorView& experts, const TensorView& weights,
                       const TensorView& counts, const TensorView& offsets, const TensorView& row_of,
                       const TensorView& token_of_row, void* stream) {
  const int64_t T = experts.size(0), K = experts.size(1), n = T * K;
  const int32_t E = params.num_experts;
  const int64_t rows = token_of_row.size(0);
  const bool by_score = params.capacity >= 0 && params.drop_policy == DropPolicy::kByScore;
  const cudaStream_t s = as_stream(stream);
  const int32_t* ex = experts.data_as<const int32_t>();
  const int64_t fill = n > rows ? n : rows;
  if (fill > 0) {
    // one thread per element of row_of / token_of_row
    SMOE_CUDA_CHECK(SMOE_LAUNCH(&routing_v0_fill_kernel, dim3(static_cast<unsigned>(ceil_div(fill, kThreads))),
                                dim3(kThreads), 0, s, row_of.data_as<int32_t>(), n, token_of_row.data_as<int32_t>(),
                                rows));
  }
  const dim3 per_expert(static_cast<unsigned>(ceil_div(E, kThreads)));
  // one thread per expert
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&routing_v0_count_kernel, per_expert, dim3(kThreads), 0, s, ex, n, E, params.capacity,
                              counts.data_as<int32_t>()));
  // one thread
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&routing_v0_scan_kernel, dim3(1), dim3(1), 0, s, counts.data_as<const int32_t>(), E,
                              params.pad_multiple, offsets.data_as<int64_t>()));
  if (n == 0) return Status::Ok();
  // one thread per expert
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&routing_v0_place_kernel, per_expert, dim3(kThreads), 0, s, ex,
                              by_score ? weights.data_as<const float>() : nullptr, n, static_cast<int32_t>(K), E,
                              params.capacity, by_score, offsets.data_as<const int64_t>(), row_of.data_as<int32_t>(),
                              token_of_row.data_as<int32_t>()));
  return Status::Ok();
}

}  // namespace smoe::SMOE_CUDA_NS

// CPU backend of routing_plan: a stable counting sort of the T*K assignments by expert.
//
// Versions, and why each exists:
//  1. dropless / drop by token order: per-chunk histograms (parallel over token chunks), a serial
//     exclusive scan over (expert, chunk), then a stable scatter (parallel over chunks) in which each
//     chunk writes its assignments from its own precomputed base per expert. The scatter position is
//     the assignment's rank inside its expert, so "keep the first C in token order" is a compare.
//  2. drop by score: the same sort lays the assignments out per expert in token order (unpadded,
//     dropless) in the workspace; each expert over capacity then selects its C best assignments with
//     nth_element under a strict total order (weight descending, then (t, k) ascending), so the kept
//     set is unique, and a walk in token order writes the kept rows.
// The result of a stable sort is unique, so it does not depend on the chunking or the thread count.
#include "routing.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "parallel.h"

namespace smoe::cpu {
namespace {

// Chunks of the histogram / scatter passes: fixed by T and K (never by the thread count) so that the
// workspace size is a function of the problem only. One chunk sorts ~32K assignments in ~0.1 ms,
// well above the cost of waking the pool; smaller chunks measured slower at T = 4096, K = 8.
constexpr int64_t kAssignmentsPerChunk = 32768;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kAlign = 64;

int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

int64_t num_chunks(int64_t T, int64_t K) {
  const int64_t by_size = (T * K + kAssignmentsPerChunk - 1) / kAssignmentsPerChunk;
  return std::clamp<int64_t>(by_size, 1, std::min<int64_t>(kMaxChunks, std::max<int64_t>(T, 1)));
}

bool drops_by_score(const RoutingPlanParams& p) { return p.capacity >= 0 && p.drop_policy == DropPolicy::kByScore; }

// Tokens [begin, end) of chunk c out of n over T tokens.
int64_t chunk_begin(int64_t T, int64_t n, int64_t c) { return T * c / n; }

std::string tk_string(int64_t a, int64_t K) {
  return "(t, k) = (" + std::to_string(a / K) + ", " + std::to_string(a % K) + ")";
}

}  // namespace

int64_t routing_plan_workspace_bytes(const RoutingPlanParams& params, int64_t T, int64_t K) {
  if (params.num_experts < 1 || T < 0 || K < 0) return 0;
  // hist [chunks, E] i32: per-chunk counts, then per-chunk rank bases
  int64_t bytes = align_up(num_chunks(T, K) * params.num_experts * int64_t(sizeof(int32_t)), kAlign);
  // by score: sorted [T*K] i32 (assignments grouped by expert) + scratch [T*K] i32 for the selection
  if (drops_by_score(params)) bytes += 2 * align_up(T * K * int64_t(sizeof(int32_t)), kAlign);
  return bytes;
}

Status routing_plan(const RoutingPlanParams& params, const TensorView& experts, const TensorView& weights,
                    const TensorView& counts, const TensorView& offsets, const TensorView& row_of,
                    const TensorView& token_of_row, const TensorView& workspace) {
  const int64_t T = experts.size(0), K = experts.size(1), E = params.num_experts;
  const int64_t pad = params.pad_multiple;
  const bool by_score = drops_by_score(params);
  const int32_t* ex = experts.data_as<const int32_t>();                  // [T, K]
  const float* w = by_score ? weights.data_as<const float>() : nullptr;  // [T, K]
  int32_t* cnt = counts.data_as<int32_t>();                              // [E]
  int64_t* off = offsets.data_as<int64_t>();                             // [E+1]
  int32_t* rof = row_of.data_as<int32_t>();                              // [T, K]
  int32_t* tor = token_of_row.data_as<int32_t>();                        // [R_max]
  const int64_t R_size = token_of_row.size(0);

  const int64_t n_chunks = num_chunks(T, K);
  auto* ws = workspace.data_as<uint8_t>();
  int32_t* hist = reinterpret_cast<int32_t*>(ws);  // [chunks, E]
  const int64_t hist_bytes = align_up(n_chunks * E * int64_t(sizeof(int32_t)), kAlign);

  // Pass 1: per-chunk histograms; remember the first bad expert id (and NaN weight) of each chunk.
  std::vector<int64_t> bad_expert(n_chunks, -1), bad_weight(n_chunks, -1);
  parallel_for(n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int32_t* h = hist + c * E;
      std::fill(h, h + E, 0);
      const int64_t a0 = chunk_begin(T, n_chunks, c) * K, a1 = chunk_begin(T, n_chunks, c + 1) * K;
      for (int64_t a = a0; a < a1; ++a) {
        const int32_t e = ex[a];
        if (e < 0 || e >= E) {
          if (bad_expert[c] < 0) bad_expert[c] = a;
          continue;
        }
        ++h[e];
      }
      if (w) {
        for (int64_t a = a0; a < a1; ++a) {
          if (std::isnan(w[a])) {
            bad_weight[c] = a;
            break;
          }
        }
      }
    }
  });
  for (int64_t c = 0; c < n_chunks; ++c) {
    if (bad_expert[c] >= 0) {
      const int64_t a = bad_expert[c];
      return invalid_argument("routing_plan", "experts",
                              "expert ids in [0, " + std::to_string(E) + ") (E = params.num_experts)",
                              std::to_string(ex[a]) + " at " + tk_string(a, K));
    }
  }
  for (int64_t c = 0; c < n_chunks; ++c) {
    if (bad_weight[c] >= 0) {
      return invalid_argument("routing_plan", "weights", "no NaN (drop_policy kByScore ranks by weight)",
                              "NaN at " + tk_string(bad_weight[c], K));
    }
  }

  // Scan: kept counts, padded offsets, and each chunk's rank base per expert (exclusive over chunks).
  std::vector<int64_t> total(E);
  off[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t run = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int32_t n = hist[c * E + e];
      hist[c * E + e] = int32_t(run);
      run += n;
    }
    total[e] = run;
    const int64_t kept = params.capacity < 0 ? run : std::min<int64_t>(run, params.capacity);
    cnt[e] = int32_t(kept);
    off[e + 1] = off[e] + align_up(kept, pad);
  }

  if (!by_score) {
    // Pass 2: stable scatter. An assignment's rank inside its expert is its position in token order,
    // so dropping by token order keeps exactly the ranks below the capacity.
    parallel_for(n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int32_t* base = hist + c * E;
        const int64_t t0 = chunk_begin(T, n_chunks, c), t1 = chunk_begin(T, n_chunks, c + 1);
        for (int64_t t = t0; t < t1; ++t) {
          for (int64_t k = 0; k < K; ++k) {
            const int32_t e = ex[t * K + k];
            const int32_t rank = base[e]++;
            if (rank < cnt[e]) {
              const int64_t r = off[e] + rank;
              rof[t * K + k] = int32_t(r);
              tor[r] = int32_t(t);
            } else {
              rof[t * K + k] = -1;
            }
          }
        }
      }
    });
  } else {
    // Pass 2': group the assignments by expert, token order inside (dropless, unpadded).
    int32_t* sorted = reinterpret_cast<int32_t*>(ws + hist_bytes);                                 // [T*K]
    int32_t* scratch = reinterpret_cast<int32_t*>(ws + hist_bytes + align_up(T * K * 4, kAlign));  // [T*K]
    std::vector<int64_t> start(E + 1, 0);
    for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + total[e];
    parallel_for(n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int32_t* base = hist + c * E;
        const int64_t a0 = chunk_begin(T, n_chunks, c) * K, a1 = chunk_begin(T, n_chunks, c + 1) * K;
        for (int64_t a = a0; a < a1; ++a) {
          const int32_t e = ex[a];
          sorted[start[e] + base[e]++] = int32_t(a);
        }
      }
    });
    // Pass 3': per expert, keep the C best by (weight desc, (t, k) asc) and lay them out in token order.
    // "x ranks before y": a strict total order, so the selected set does not depend on the algorithm.
    auto before = [w](int32_t x, int32_t y) { return w[x] > w[y] || (w[x] == w[y] && x < y); };
    // Experts per task: about kAssignmentsPerChunk assignments each on average.
    const int64_t expert_grain = std::max<int64_t>(1, E * kAssignmentsPerChunk / std::max<int64_t>(T * K, 1));
    parallel_for(E, expert_grain, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const int32_t* seg = sorted + start[e];
        const int64_t n = total[e], keep = cnt[e];
        int64_t r = off[e];
        if (n <= keep) {
          for (int64_t i = 0; i < n; ++i) {
            rof[seg[i]] = int32_t(r);
            tor[r++] = int32_t(seg[i] / K);
          }
          continue;
        }
        if (keep == 0) {
          for (int64_t i = 0; i < n; ++i) rof[seg[i]] = -1;
          continue;
        }
        int32_t* sel = scratch + start[e];
        std::copy(seg, seg + n, sel);
        std::nth_element(sel, sel + (keep - 1), sel + n, before);
        const int32_t last_kept = sel[keep - 1];  // the keep-th best: everything ranked before it stays
        for (int64_t i = 0; i < n; ++i) {
          const int32_t a = seg[i];
          if (a == last_kept || before(a, last_kept)) {
            rof[a] = int32_t(r);
            tor[r++] = int32_t(a / K);
          } else {
            rof[a] = -1;
          }
        }
      }
    });
  }

  // Padding rows of each segment, and every row past offsets[E], hold no token.
  for (int64_t e = 0; e < E; ++e) std::fill(tor + off[e] + cnt[e], tor + off[e + 1], -1);
  std::fill(tor + off[E], tor + R_size, -1);
  return Status::Ok();
}

}  // namespace smoe::cpu

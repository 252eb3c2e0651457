// Benchmark of routing_plan (CPU backend) at T = 4096 for the routings of Mixtral (E=8, K=2),
// Qwen-MoE-like (E=64, K=6) and DeepSeek-V3-like (E=256, K=8) layers.
// GB/s counts the bytes the counting sort must touch: experts [T,K] i32 read twice (histogram and
// scatter), row_of [T,K] i32 and token_of_row [R_max] i32 written, counts and offsets written.
#include <benchmark/benchmark.h>

#include <numeric>
#include <random>
#include <vector>

#include "smoe/smoe.h"

namespace {

using namespace smoe;

// experts [T, K]: K distinct experts per token, uniform (what a balanced top-k router gives).
std::vector<int32_t> random_experts(int64_t T, int64_t K, int64_t E, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<int32_t> perm(E), ex(T * K);
  std::iota(perm.begin(), perm.end(), 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {  // partial Fisher-Yates: the first K of a random permutation
      std::uniform_int_distribution<int64_t> d(k, E - 1);
      std::swap(perm[k], perm[d(g)]);
      ex[t * K + k] = perm[k];
    }
  }
  return ex;
}

// Args: T, E, K, capacity factor in percent (0 = dropless), drop policy.
void BM_RoutingPlan(benchmark::State& state) {
  const int64_t T = state.range(0), E = state.range(1), K = state.range(2), cf = state.range(3);
  RoutingPlanParams p;
  p.num_experts = int32_t(E);
  p.capacity = cf > 0 ? (T * K * cf / 100 + E - 1) / E : -1;
  p.drop_policy = static_cast<DropPolicy>(state.range(4));
  auto experts = random_experts(T, K, E, 1);
  std::vector<float> weights(T * K);
  std::mt19937 g(2);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  for (auto& w : weights) w = u(g);
  const int64_t R_max = routing_plan_max_rows(p, T, K);
  std::vector<int32_t> counts(E), row_of(T * K), token_of_row(R_max);
  std::vector<int64_t> offsets(E + 1);
  std::vector<uint8_t> ws(routing_plan_workspace_bytes(p, T, K));
  for (auto _ : state) {
    const Status s = routing_plan({}, p, make_view(experts.data(), {T, K}), make_view(weights.data(), {T, K}),
                                  make_view(counts.data(), {E}), make_view(offsets.data(), {E + 1}),
                                  make_view(row_of.data(), {T, K}), make_view(token_of_row.data(), {R_max}),
                                  make_view(ws.data(), {int64_t(ws.size())}));
    if (!s.ok()) state.SkipWithError(s.message().c_str());
    benchmark::DoNotOptimize(token_of_row.data());
  }
  const double bytes = double(T * K * 4) * (2 + 1 + (p.drop_policy == DropPolicy::kByScore ? 1 : 0)) +
                       double(R_max * 4) + double(E * 4 + (E + 1) * 8);
  state.counters["GB/s"] = benchmark::Counter(bytes * double(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
  state.counters["Massign/s"] =
      benchmark::Counter(double(T * K) * double(state.iterations()) / 1e6, benchmark::Counter::kIsRate);
}

BENCHMARK(BM_RoutingPlan)
    ->ArgNames({"T", "E", "K", "cf%", "by_score"})
    ->Args({4096, 8, 2, 0, 0})
    ->Args({4096, 64, 6, 0, 0})
    ->Args({4096, 256, 8, 0, 0})
    ->Args({4096, 64, 6, 125, 0})
    ->Args({4096, 64, 6, 125, 1})
    ->Args({4096, 256, 8, 125, 1})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

}  // namespace

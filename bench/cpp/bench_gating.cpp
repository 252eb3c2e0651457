// Microbenchmarks of the gating op family on the CPU backend: topk_gating forward and
// forward+backward at T = 4096 for three routers:
//   0: Mixtral     E = 8,   K = 2, softmax
//   1: Qwen-MoE    E = 64,  K = 6, softmax
//   2: DeepSeek-V3 E = 256, K = 8, sigmoid, 8 groups (top-4 by top-2 sum), bias, renormalise, x2.5
// Gating is memory- and exp-bound (no FLOP roof applies), so it reports tokens/s and the bytes it
// must move per second (counters "tokens" and "GB", both printed as rates, /s): forward reads logits [T, E] and writes scores [T, E], weights and experts
// [T, K]; backward reads scores, experts, grad_weights and writes grad_logits [T, E].
//
//   ./build/bench/cpp/smoe_bench --benchmark_filter=Gating [--benchmark_repetitions=5
//       --benchmark_report_aggregates_only=true --benchmark_format=json]
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "smoe/smoe.h"

namespace {

using namespace smoe;

struct RouterConfig {
  const char* name;
  int64_t E;
  TopkGatingParams params;
  bool bias;
};

RouterConfig router_config(int64_t i) {
  RouterConfig c{};
  switch (i) {
    case 0:
      c = {"mixtral_E8_K2_softmax", 8, {}, false};
      c.params.top_k = 2;
      c.params.renormalize = true;
      break;
    case 1:
      c = {"qwen_E64_K6_softmax", 64, {}, false};
      c.params.top_k = 6;
      break;
    default:
      c = {"deepseek_v3_E256_K8_sigmoid_g8top4_bias", 256, {}, true};
      c.params.top_k = 8;
      c.params.score_func = ScoreFunc::kSigmoid;
      c.params.n_groups = 8;
      c.params.topk_groups = 4;
      c.params.group_score = GroupScore::kTop2Sum;
      c.params.renormalize = true;
      c.params.renorm_eps = 1e-20f;
      c.params.routed_scaling = 2.5f;
      break;
  }
  return c;
}

std::vector<float> random_vector(size_t n, uint32_t seed, float lo, float hi) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

void run_gating(benchmark::State& state, bool backward) {
  const int64_t T = 4096;
  const RouterConfig cfg = router_config(state.range(0));
  const int64_t E = cfg.E, K = cfg.params.top_k;
  std::vector<float> logits = random_vector(size_t(T * E), 1, -4.f, 4.f);
  std::vector<float> bias = random_vector(size_t(E), 2, -0.1f, 0.1f);
  std::vector<float> grad_w = random_vector(size_t(T * K), 3, -1.f, 1.f);
  std::vector<float> weights(size_t(T * K)), scores(size_t(T * E)), grad_logits(size_t(T * E));
  std::vector<int32_t> experts(size_t(T * K));
  const TensorView L = make_view(logits.data(), {T, E});
  const TensorView B = cfg.bias ? make_view(bias.data(), {E}) : TensorView{};
  const TensorView W = make_view(weights.data(), {T, K}), X = make_view(experts.data(), {T, K});
  const TensorView S = make_view(scores.data(), {T, E}), GW = make_view(grad_w.data(), {T, K});
  const TensorView GL = make_view(grad_logits.data(), {T, E});
  const Exec exec{};
  for (auto _ : state) {
    Status s = topk_gating_forward(exec, cfg.params, L, B, W, X, S);
    if (s.ok() && backward) s = topk_gating_backward(exec, cfg.params, S, X, GW, TensorView{}, GL);
    if (!s.ok()) {
      state.SkipWithError(s.message().c_str());
      break;
    }
    benchmark::DoNotOptimize(weights.data());
    benchmark::DoNotOptimize(grad_logits.data());
    benchmark::ClobberMemory();
  }
  const double fwd_bytes = double(T) * (E * 4 /*logits*/ + E * 4 /*scores*/ + K * 8 /*weights, experts*/);
  const double bwd_bytes = double(T) * (E * 8 /*scores, grad_logits*/ + K * 8 /*experts, grad_weights*/);
  const double bytes = fwd_bytes + (backward ? bwd_bytes : 0.0);
  state.SetLabel(cfg.name);
  state.counters["T"] = double(T);
  state.counters["E"] = double(E);
  state.counters["K"] = double(K);
  state.counters["tokens"] = benchmark::Counter(double(T), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GB"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_TopkGatingForward(benchmark::State& state) { run_gating(state, false); }
void BM_TopkGatingForwardBackward(benchmark::State& state) { run_gating(state, true); }

BENCHMARK(BM_TopkGatingForward)->DenseRange(0, 2)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_TopkGatingForwardBackward)->DenseRange(0, 2)->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace

// Benchmarks of permute and combine, forward and backward (CPU backend), at T = 4096, K = 2, E = 8
// (a dropless Mixtral-like routing, R = T*K rows), H = 1024 and 4096, f32 and bf16.
// GB/s counts the bytes each op must move, with s = sizeof(element):
//   permute_forward   R*H*s read (x rows) + R*H*s written (xs)          + R i32
//   permute_backward  R*H*s read (grad_xs) + T*H*s written (grad_x)     + T*K i32
//   combine_forward   R*H*s read (ys) + T*H*s written (y)               + T*K (i32 + f32)
//   combine_backward  T*H*s + R*H*s read (grad_y, ys) + R*H*s written   + T*K (i32 + f32 + f32)
#include <benchmark/benchmark.h>

#include <numeric>
#include <random>
#include <vector>

#include "smoe/smoe.h"

namespace {

using namespace smoe;

constexpr int64_t kT = 4096, kK = 2, kE = 8;

// The row layout of a balanced top-2 routing over 8 experts, built with routing_plan.
struct Layout {
  int64_t R = 0;
  std::vector<int32_t> row_of, token_of_row;
  std::vector<float> weights;
  Layout() {
    std::mt19937 g(3);
    std::vector<int32_t> experts(kT * kK);
    std::uniform_int_distribution<int32_t> d(0, kE - 1), d2(1, kE - 1);
    for (int64_t t = 0; t < kT; ++t) {
      experts[t * kK] = d(g);
      experts[t * kK + 1] = (experts[t * kK] + d2(g)) % kE;  // distinct from the first pick
    }
    RoutingPlanParams p;
    p.num_experts = kE;
    R = routing_plan_max_rows(p, kT, kK);
    std::vector<int32_t> counts(kE);
    std::vector<int64_t> offsets(kE + 1);
    std::vector<uint8_t> ws(routing_plan_workspace_bytes(p, kT, kK));
    row_of.resize(kT * kK);
    token_of_row.resize(R);
    (void)routing_plan({}, p, make_view(experts.data(), {kT, kK}), TensorView{}, make_view(counts.data(), {kE}),
                       make_view(offsets.data(), {kE + 1}), make_view(row_of.data(), {kT, kK}),
                       make_view(token_of_row.data(), {R}), make_view(ws.data(), {int64_t(ws.size())}));
    weights.resize(kT * kK);
    std::uniform_real_distribution<float> u(0.f, 1.f);
    for (auto& w : weights) w = u(g);
  }
};

const Layout& layout() {
  static const Layout l;
  return l;
}

template <class S>
std::vector<S> filled(int64_t n) {
  std::vector<S> v(n);
  std::mt19937 g(5);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (auto& x : v) x = from_acc<S>(u(g));
  return v;
}

void set_rate(benchmark::State& state, double bytes) {
  state.counters["GB/s"] = benchmark::Counter(bytes * double(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

template <class S>
void BM_PermuteForward(benchmark::State& state) {
  const Layout& l = layout();
  const int64_t H = state.range(0), R = l.R, s = sizeof(S);
  auto x = filled<S>(kT * H);
  std::vector<S> xs(R * H);
  auto* tor = const_cast<int32_t*>(l.token_of_row.data());
  for (auto _ : state) {
    const Status st =
        permute_forward({}, make_view(x.data(), {kT, H}), make_view(tor, {R}), make_view(xs.data(), {R, H}));
    if (!st.ok()) state.SkipWithError(st.message().c_str());
    benchmark::DoNotOptimize(xs.data());
  }
  set_rate(state, double(2 * R * H * s + R * 4));
}

template <class S>
void BM_PermuteBackward(benchmark::State& state) {
  const Layout& l = layout();
  const int64_t H = state.range(0), R = l.R, s = sizeof(S);
  auto gxs = filled<S>(R * H);
  std::vector<S> gx(kT * H);
  auto* rof = const_cast<int32_t*>(l.row_of.data());
  for (auto _ : state) {
    const Status st =
        permute_backward({}, make_view(gxs.data(), {R, H}), make_view(rof, {kT, kK}), make_view(gx.data(), {kT, H}));
    if (!st.ok()) state.SkipWithError(st.message().c_str());
    benchmark::DoNotOptimize(gx.data());
  }
  set_rate(state, double(R * H * s + kT * H * s + kT * kK * 4));
}

template <class S>
void BM_CombineForward(benchmark::State& state) {
  const Layout& l = layout();
  const int64_t H = state.range(0), R = l.R, s = sizeof(S);
  auto ys = filled<S>(R * H);
  std::vector<S> y(kT * H);
  auto* rof = const_cast<int32_t*>(l.row_of.data());
  auto* w = const_cast<float*>(l.weights.data());
  for (auto _ : state) {
    const Status st = combine_forward({}, make_view(ys.data(), {R, H}), make_view(w, {kT, kK}),
                                      make_view(rof, {kT, kK}), make_view(y.data(), {kT, H}));
    if (!st.ok()) state.SkipWithError(st.message().c_str());
    benchmark::DoNotOptimize(y.data());
  }
  set_rate(state, double(R * H * s + kT * H * s + kT * kK * 8));
}

template <class S>
void BM_CombineBackward(benchmark::State& state) {
  const Layout& l = layout();
  const int64_t H = state.range(0), R = l.R, s = sizeof(S);
  auto gy = filled<S>(kT * H);
  auto ys = filled<S>(R * H);
  std::vector<S> gys(R * H);
  std::vector<float> gw(kT * kK);
  auto* rof = const_cast<int32_t*>(l.row_of.data());
  auto* w = const_cast<float*>(l.weights.data());
  for (auto _ : state) {
    const Status st =
        combine_backward({}, make_view(gy.data(), {kT, H}), make_view(ys.data(), {R, H}), make_view(w, {kT, kK}),
                         make_view(rof, {kT, kK}), make_view(gys.data(), {R, H}), make_view(gw.data(), {kT, kK}));
    if (!st.ok()) state.SkipWithError(st.message().c_str());
    benchmark::DoNotOptimize(gys.data());
  }
  set_rate(state, double(kT * H * s + 2 * R * H * s + kT * kK * 12));
}

#define SMOE_PERMUTE_BENCH(fn)                                                                                     \
  BENCHMARK_TEMPLATE(fn, float)->ArgName("H")->Arg(1024)->Arg(4096)->Unit(benchmark::kMicrosecond)->UseRealTime(); \
  BENCHMARK_TEMPLATE(fn, bf16_t)->ArgName("H")->Arg(1024)->Arg(4096)->Unit(benchmark::kMicrosecond)->UseRealTime()

SMOE_PERMUTE_BENCH(BM_PermuteForward);
SMOE_PERMUTE_BENCH(BM_PermuteBackward);
SMOE_PERMUTE_BENCH(BM_CombineForward);
SMOE_PERMUTE_BENCH(BM_CombineBackward);

}  // namespace

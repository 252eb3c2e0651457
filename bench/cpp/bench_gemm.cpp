// Grouped GEMM and expert-MLP benchmarks at the two MoE shapes the project is judged on, each beside
// the machine's dense roof: one plain BLAS sgemm of the same FLOPs, measured in the same process.
//
//   Mixtral-like:  T=2048, K=2 -> R=4096 rows over E=8 experts (512 each), H=1024, F=3584 (2F=7168)
//   fine-grained:  T=2048, K=6 -> R=12288 rows over E=64 experts (192 each), H=1024, F=512
//
// Counters: GFLOP/s, and roof_frac = GFLOP/s / (roof GFLOP/s of a dense sgemm with the same FLOPs).
//   ./build/bench/cpp/smoe_bench --benchmark_filter='Gemm|Mlp'
// f32 runs twice: through smoe's AVX-512 GEMM where the CPU has AVX-512F (BM_Gemm/f32, the default),
// and through OpenBLAS tiles (BM_Gemm/f32_openblas), so that one run compares them under one load.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/parallel.h"
#include "smoe/smoe.h"

namespace {

using namespace smoe;

struct Shape {
  const char* name;
  int64_t T, K, E, H, F;
  int64_t R() const { return T * K; }
};
const Shape kShapes[] = {
    {"mixtral", 2048, 2, 8, 1024, 3584},
    {"finegrained", 2048, 6, 64, 1024, 512},
};

template <class T>
std::vector<T> filled(size_t n, uint32_t seed) {
  std::vector<T> v(n);
  uint32_t s = seed;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = from_acc<T>(typename AccOf<T>::type(float(s >> 8) / float(1 << 24) - 0.5f));
  }
  return v;
}

// GFLOP/s of one dense sgemm [M, K] x [K, N] with the BLAS's own threads: the median of 3 runs after a
// warm-up, measured right before each benchmark so that both see the same machine load.
double roof_gflops(int64_t M, int64_t N, int64_t K) {
  static std::vector<float> a, b, c;
  a.resize(size_t(M * K), 0.5f);
  b.resize(size_t(K * N), 0.25f);
  c.resize(size_t(M * N));
  std::vector<double> t;
  for (int i = 0; i < 4; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    cpu::dense_sgemm_roof(cpu::num_threads(), M, N, K, a.data(), b.data(), c.data());
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin() + 1, t.end());  // t[0] is the warm-up
  return 2.0 * double(M) * double(N) * double(K) / t[2] * 1e-9;
}

// Runs the timed loop and sets the counters; `seconds` of the loop are timed here too, so that the
// fraction of the roof can be reported beside the rate.
template <class Fn>
void timed_loop(benchmark::State& state, Fn&& fn, double flops_per_iter, int64_t M, int64_t N, int64_t K) {
  const double roof = roof_gflops(M, N, K);  // before the loop: not timed
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) fn();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double flops = flops_per_iter * double(state.iterations());
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsRate);
  state.counters["roof_GFLOP/s"] = roof;
  state.counters["roof_frac"] = flops * 1e-9 / seconds / roof;
}

std::vector<int64_t> even_offsets(int64_t R, int64_t E) {
  std::vector<int64_t> o(size_t(E + 1));
  for (int64_t e = 0; e <= E; ++e) o[e] = R * e / E;
  return o;
}

std::string gemm_label(const benchmark::State& state) {
  const int op = int(state.range(1));
  return std::string(kShapes[state.range(0)].name) + (op == 0 ? " fwd" : op == 1 ? " dgrad" : " wgrad");
}

// op: 0 forward  pre[R, 2F] = xs[R, H] @ w1[e]^T            (w1 [E, 2F, H])
//     1 dgrad    grad_xs[R, H] = grad_pre[R, 2F] @ w1[e]     (trans_b = false)
//     2 wgrad    grad_w1[e] = grad_pre[seg]^T @ xs[seg]      ([E, 2F, H])
// All three have 2 * R * H * 2F FLOPs: the roof is the dense [R, H] x [H, 2F] sgemm.
template <class T>
void BM_Gemm(benchmark::State& state) {
  const Shape& s = kShapes[state.range(0)];
  const int op = int(state.range(1));
  const int64_t R = s.R(), H = s.H, F1 = 2 * s.F, E = s.E;
  auto xs = filled<T>(size_t(R * H), 3), w1 = filled<T>(size_t(E * F1 * H), 4), g = filled<T>(size_t(R * F1), 5);
  std::vector<T> out(size_t(std::max(R * F1, E * F1 * H)));
  auto offsets = even_offsets(R, E);
  const auto O = make_view(offsets.data(), {E + 1});
  auto run = [&] {
    Status st;
    if (op == 0) {
      st = grouped_gemm(Exec{}, GroupedGemmParams{true}, make_view(xs.data(), {R, H}), make_view(w1.data(), {E, F1, H}),
                        O, make_view(out.data(), {R, F1}));
    } else if (op == 1) {
      st = grouped_gemm(Exec{}, GroupedGemmParams{false}, make_view(g.data(), {R, F1}),
                        make_view(w1.data(), {E, F1, H}), O, make_view(out.data(), {R, H}));
    } else {
      st = grouped_gemm_wgrad(Exec{}, make_view(g.data(), {R, F1}), make_view(xs.data(), {R, H}), O,
                              make_view(out.data(), {E, F1, H}));
    }
    if (!st.ok()) state.SkipWithError(st.message().c_str());
  };
  run();  // warm-up: thread pool, BLAS buffers, page faults of out
  timed_loop(state, run, 2.0 * double(R) * double(H) * double(F1), R, F1, H);
  state.SetLabel(gemm_label(state));
}

// bf16 through the f32-panel + sgemm path (what CPUs without AVX512-BF16 run), for comparison.
void BM_GemmBf16Panels(benchmark::State& state) {
  const bool saved = cpu::set_bf16_dot_product(false);
  BM_Gemm<bf16_t>(state);
  cpu::set_bf16_dot_product(saved);
  state.SetLabel(state.error_occurred() ? "" : std::string(kShapes[state.range(0)].name) + " fwd, f32 panels");
}

// f32 through OpenBLAS tiles instead of smoe's AVX-512 GEMM (where the CPU has AVX-512F the latter is
// the default), measured in the same run so that both see the same machine load.
void BM_GemmF32Blas(benchmark::State& state) {
  const bool saved = cpu::set_sgemm_avx512(false);
  BM_Gemm<float>(state);
  cpu::set_sgemm_avx512(saved);
  state.SetLabel(state.error_occurred() ? "" : gemm_label(state) + ", OpenBLAS tiles");
}

// The roof itself, for reading the ratio off the same table.
void BM_GemmDenseRoof(benchmark::State& state) {
  const Shape& s = kShapes[state.range(0)];
  const int64_t M = s.R(), N = 2 * s.F, K = s.H;
  auto a = filled<float>(size_t(M * K), 1), b = filled<float>(size_t(K * N), 2);
  std::vector<float> c(size_t(M * N));
  auto run = [&] { cpu::dense_sgemm_roof(cpu::num_threads(), M, N, K, a.data(), b.data(), c.data()); };
  run();
  timed_loop(state, run, 2.0 * double(M) * double(N) * double(K), M, N, K);
  state.SetLabel(std::string(s.name) + " dense sgemm, " + cpu::blas_name());
}

// The expert MLP of one MoE layer (SwiGLU), forward + backward: forward 2R*H*2F + 2R*F*H = 6RHF
// FLOPs, backward twice that, 18 RHF in all; roof: the dense sgemm [R, H] x [H, 2F].
template <class T>
void BM_MlpForwardBackward(benchmark::State& state) {
  const Shape& s = kShapes[state.range(0)];
  const int64_t T_ = s.T, K = s.K, E = s.E, H = s.H, F = s.F, F1 = 2 * F, R = s.R();
  // Token t's k-th expert is (t * K + k) % E: every expert gets R / E rows; rows sorted by expert.
  std::vector<int32_t> token_of_row(static_cast<size_t>(R)), row_of(size_t(T_ * K));
  std::vector<int64_t> offsets(size_t(E + 1), 0);
  {
    std::vector<std::vector<int64_t>> per(static_cast<size_t>(E));
    for (int64_t i = 0; i < T_ * K; ++i) per[size_t(i % E)].push_back(i);
    int64_t r = 0;
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t i : per[e]) {
        token_of_row[r] = int32_t(i / K);
        row_of[i] = int32_t(r++);
      }
      offsets[e + 1] = r;
    }
  }
  auto x = filled<T>(size_t(T_ * H), 6), w1 = filled<T>(size_t(E * F1 * H), 7), w2 = filled<T>(size_t(E * H * F), 8);
  auto gys = filled<T>(size_t(R * H), 9);
  std::vector<T> pre(size_t(R * F1)), act(size_t(R * F)), ys(size_t(R * H)), gx(size_t(T_ * H)), gw1(w1.size()),
      gw2(w2.size());
  ExpertMlpParams p;
  std::vector<uint8_t> ws(size_t(expert_mlp_workspace_bytes(p, DTypeOf<T>::value, R, H, F)));
  const auto O = make_view(offsets.data(), {E + 1});
  auto run = [&] {
    Status st =
        expert_mlp_forward(Exec{}, p, make_view(x.data(), {T_, H}), make_view(token_of_row.data(), {R}), O,
                           make_view(w1.data(), {E, F1, H}), make_view(w2.data(), {E, H, F}),
                           make_view(pre.data(), {R, F1}), make_view(act.data(), {R, F}), make_view(ys.data(), {R, H}));
    if (st.ok()) {
      st = expert_mlp_backward(Exec{}, p, make_view(gys.data(), {R, H}), make_view(x.data(), {T_, H}),
                               make_view(token_of_row.data(), {R}), make_view(row_of.data(), {T_, K}), O,
                               make_view(w1.data(), {E, F1, H}), make_view(w2.data(), {E, H, F}),
                               make_view(pre.data(), {R, F1}), make_view(act.data(), {R, F}),
                               make_view(gx.data(), {T_, H}), make_view(gw1.data(), {E, F1, H}),
                               make_view(gw2.data(), {E, H, F}), make_view(ws.data(), {int64_t(ws.size())}));
    }
    if (!st.ok()) state.SkipWithError(st.message().c_str());
  };
  run();
  timed_loop(state, run, 18.0 * double(R) * double(H) * double(F), R, F1, H);
  state.SetLabel(std::string(s.name) + " expert MLP fwd+bwd");
}

void BM_MlpF32Blas(benchmark::State& state) {
  const bool saved = cpu::set_sgemm_avx512(false);
  BM_MlpForwardBackward<float>(state);
  cpu::set_sgemm_avx512(saved);
  state.SetLabel(
      state.error_occurred() ? "" : std::string(kShapes[state.range(0)].name) + " expert MLP fwd+bwd, OpenBLAS tiles");
}

void shapes_and_ops(benchmark::internal::Benchmark* b) {
  for (int s = 0; s < 2; ++s)
    for (int op = 0; op < 3; ++op) b->Args({s, op});
}

}  // namespace

BENCHMARK(BM_GemmDenseRoof)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(1.0);
BENCHMARK(BM_Gemm<float>)
    ->Name("BM_Gemm/f32")
    ->Apply(shapes_and_ops)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(1.0);
BENCHMARK(BM_GemmF32Blas)
    ->Name("BM_Gemm/f32_openblas")
    ->Apply(shapes_and_ops)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(1.0);
BENCHMARK(BM_Gemm<bf16_t>)
    ->Name("BM_Gemm/bf16")
    ->Apply(shapes_and_ops)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(1.0);
BENCHMARK(BM_GemmBf16Panels)
    ->Name("BM_Gemm/bf16_f32panels")
    ->Args({0, 0})
    ->Args({1, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(1.0);
BENCHMARK(BM_MlpForwardBackward<float>)
    ->Name("BM_Mlp/f32")
    ->Arg(0)
    ->Arg(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);
BENCHMARK(BM_MlpF32Blas)
    ->Name("BM_Mlp/f32_openblas")
    ->Arg(0)
    ->Arg(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);
BENCHMARK(BM_MlpForwardBackward<bf16_t>)
    ->Name("BM_Mlp/bf16")
    ->Arg(0)
    ->Arg(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

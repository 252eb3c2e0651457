// The CUDA teaching ladder side by side: the naive v0 kernels (csrc/cuda/naive/) against the fast v1
// kernels, per op family, flipped per run with set_kernel_version (docs/cuda.md, "Kernel versions").
//
//   ./build/dev/bench/cpp/smoe_bench --benchmark_filter=Ladder
//
// Built without nvcc, the kernels run through the SIMT emulator (smoe::cuda_simt, host memory): the
// times then measure the emulator (every thread a fiber, warps serialised), which says how much work
// and how many block barriers each version has, not what a GPU does with them. Built with CUDA
// (SMOE_BENCH_CUDA), the same binary times the real kernels on GPU 0: buffers in device memory, one
// cudaDeviceSynchronize per iteration.
//
// Counters: bytes = the bytes the op must move at minimum (the same for both versions, so GB/s
// compares how close each comes to the one pass over its data), GB/s = bytes per second.
//   topk_gating   T*E*(sizeof(logit) + 4) + T*K*8                (logits in, scores + picks out)
//   routing_plan  T*K*4 read + T*K*4 + R*4 written + E*4 + (E+1)*8 (experts in; row_of, token_of_row,
//                 counts, offsets out)
//   permute       2*R*H*s + R*4                                  (rows gathered into xs)
//   combine       R*H*s + T*H*s + T*K*8                          (ys rows in, y out, row_of + weights)
//   grouped GEMM  2*(R*Kd + E*Kd*N + R*N) + (E+1)*8 (a, b, c in bf16, offsets), and GFLOP/s:
//                 2*R*N*Kd over the experts (v0 naive, v1 tensor cores; KernelOp::kGroupedGemm)
#include <benchmark/benchmark.h>

#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "cuda/backend.h"
#include "smoe/smoe.h"

#if defined(SMOE_BENCH_CUDA) && SMOE_BENCH_CUDA
#include <cuda_runtime.h>
namespace dev = smoe::cuda;
#else
namespace dev = smoe::cuda_simt;
#endif

namespace {

using namespace smoe;

// A buffer where the kernels of `dev` read it: device memory with CUDA, host memory under the emulator.
class Buffer {
 public:
  template <class T>
  explicit Buffer(const std::vector<T>& host) : bytes_(host.size() * sizeof(T)) {
#if defined(SMOE_BENCH_CUDA) && SMOE_BENCH_CUDA
    if (cudaMalloc(&ptr_, bytes_ > 0 ? bytes_ : 1) != cudaSuccess) ptr_ = nullptr;
    if (ptr_ && bytes_ > 0) cudaMemcpy(ptr_, host.data(), bytes_, cudaMemcpyHostToDevice);
#else
    host_.resize(bytes_ > 0 ? bytes_ : 1);
    if (bytes_ > 0) std::memcpy(host_.data(), host.data(), bytes_);
    ptr_ = host_.data();
#endif
  }
  ~Buffer() {
#if defined(SMOE_BENCH_CUDA) && SMOE_BENCH_CUDA
    if (ptr_) cudaFree(ptr_);
#endif
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  TensorView view(DType dt, std::initializer_list<int64_t> shape) const {
#if defined(SMOE_BENCH_CUDA) && SMOE_BENCH_CUDA
    return make_view(ptr_, dt, shape, Device::kCUDA);
#else
    return make_view(ptr_, dt, shape);
#endif
  }

 private:
  size_t bytes_;
  void* ptr_ = nullptr;
  std::vector<unsigned char> host_;
};

void sync() {
#if defined(SMOE_BENCH_CUDA) && SMOE_BENCH_CUDA
  cudaDeviceSynchronize();
#endif
}

// Runs `launch` per iteration under kernel version state.range(0) of `op`; the previous version is
// restored afterwards.
template <class F>
void run_versioned(benchmark::State& state, dev::KernelOp op, double bytes, F&& launch) {
  const int previous = dev::kernel_version(op);
  const Status set = dev::set_kernel_version(op, int(state.range(0)));
  if (!set.ok()) {
    state.SkipWithError(set.message().c_str());
    return;
  }
  for (auto _ : state) {
    const Status s = launch();
    sync();
    if (!s.ok()) {
      state.SkipWithError(s.message().c_str());
      break;
    }
  }
  (void)dev::set_kernel_version(op, previous);
  state.counters["bytes"] = bytes;
  state.counters["GB/s"] = benchmark::Counter(bytes * double(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

std::vector<float> uniform(size_t n, uint32_t seed, float lo = -2.f, float hi = 2.f) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = u(g);
  return v;
}

// experts [T, K]: K distinct experts per token, uniform (a balanced top-k router).
std::vector<int32_t> random_experts(int64_t T, int64_t K, int64_t E, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<int32_t> perm(E), ex(T * K);
  std::iota(perm.begin(), perm.end(), 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      std::uniform_int_distribution<int64_t> d(k, E - 1);
      std::swap(perm[k], perm[d(g)]);
      ex[t * K + k] = perm[k];
    }
  }
  return ex;
}

// Args: version, T, E, K (f32 logits, softmax, plain top-k).
void BM_LadderTopkGating(benchmark::State& state) {
  const int64_t T = state.range(1), E = state.range(2), K = state.range(3);
  TopkGatingParams p;
  p.top_k = int32_t(K);
  Buffer logits{uniform(T * E, 1)}, weights{std::vector<float>(T * K)}, experts{std::vector<int32_t>(T * K)},
      scores{std::vector<float>(T * E)};
  const double bytes = double(T * E * (4 + 4) + T * K * 8);
  run_versioned(state, dev::KernelOp::kTopkGating, bytes, [&] {
    return dev::topk_gating_forward(p, logits.view(DType::kF32, {T, E}), TensorView{},
                                    weights.view(DType::kF32, {T, K}), experts.view(DType::kI32, {T, K}),
                                    scores.view(DType::kF32, {T, E}), nullptr);
  });
}

// Args: version, T, E, K (dropless).
void BM_LadderRoutingPlan(benchmark::State& state) {
  const int64_t T = state.range(1), E = state.range(2), K = state.range(3);
  RoutingPlanParams p;
  p.num_experts = int32_t(E);
  const int64_t R = routing_plan_max_rows(p, T, K);
  Buffer experts{random_experts(T, K, E, 2)}, counts{std::vector<int32_t>(E)}, offsets{std::vector<int64_t>(E + 1)},
      row_of{std::vector<int32_t>(T * K)}, token_of_row{std::vector<int32_t>(R)},
      ws{std::vector<uint8_t>(size_t(dev::routing_plan_workspace_bytes(p, T, K)))};
  const int64_t ws_bytes = dev::routing_plan_workspace_bytes(p, T, K);
  const double bytes = double(T * K * 4 * 2 + R * 4 + E * 4 + (E + 1) * 8);
  run_versioned(state, dev::KernelOp::kRoutingPlan, bytes, [&] {
    return dev::routing_plan(p, experts.view(DType::kI32, {T, K}), TensorView{}, counts.view(DType::kI32, {E}),
                             offsets.view(DType::kI64, {E + 1}), row_of.view(DType::kI32, {T, K}),
                             token_of_row.view(DType::kI32, {R}), ws.view(DType::kU8, {ws_bytes}), nullptr);
  });
}

// A dropless plan of T tokens, K picks over E experts: row r holds token r / K's k-th pick (the
// gathers then read rows in a scattered token order, as a real plan does).
struct Plan {
  int64_t R;
  std::vector<int32_t> row_of, token_of_row;
  Plan(int64_t T, int64_t K) : R(T * K), row_of(T * K), token_of_row(T * K) {
    std::vector<int32_t> perm(T * K);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), std::mt19937(4));
    for (int64_t a = 0; a < T * K; ++a) {
      row_of[a] = perm[a];
      token_of_row[perm[a]] = int32_t(a / K);
    }
  }
};

// Args: version, T, K, H (f32 rows).
void BM_LadderPermute(benchmark::State& state) {
  const int64_t T = state.range(1), K = state.range(2), H = state.range(3);
  const Plan plan(T, K);
  const int64_t R = plan.R;
  Buffer x{uniform(T * H, 5)}, tor{plan.token_of_row}, xs{std::vector<float>(R * H)};
  const double bytes = double(2 * R * H * 4 + R * 4);
  run_versioned(state, dev::KernelOp::kPermute, bytes, [&] {
    return dev::permute_forward(x.view(DType::kF32, {T, H}), tor.view(DType::kI32, {R}), xs.view(DType::kF32, {R, H}),
                                nullptr);
  });
}

// Args: version, T, K, H (f32 rows).
void BM_LadderCombine(benchmark::State& state) {
  const int64_t T = state.range(1), K = state.range(2), H = state.range(3);
  const Plan plan(T, K);
  const int64_t R = plan.R;
  Buffer ys{uniform(R * H, 6)}, w{uniform(T * K, 7, 0.f, 1.f)}, rof{plan.row_of}, y{std::vector<float>(T * H)};
  const double bytes = double(R * H * 4 + T * H * 4 + T * K * 8);
  run_versioned(state, dev::KernelOp::kCombine, bytes, [&] {
    return dev::combine_forward(ys.view(DType::kF32, {R, H}), w.view(DType::kF32, {T, K}),
                                rof.view(DType::kI32, {T, K}), y.view(DType::kF32, {T, H}), nullptr);
  });
}

// Grouped GEMM v0 (one thread per output, csrc/cuda/grouped_gemm_naive.cu) against v1 (tensor
// cores, csrc/cuda/gemm_tc.cu), bf16, E experts of R/E rows: c[R, N] = a[R, Kd] b[e][Kd, N].
// Args: version, R, E, N, Kd.
void BM_LadderGroupedGemm(benchmark::State& state) {
  const int64_t R = state.range(1), E = state.range(2), N = state.range(3), Kd = state.range(4);
  std::vector<uint16_t> a(R * Kd, 0x3f80), b(E * Kd * N, 0x3c00);  // bf16 1.0 and 0.0078125
  std::vector<int64_t> off(E + 1);
  for (int64_t e = 0; e <= E; ++e) off[e] = R * e / E;
  Buffer av{a}, bv{b}, ov{off}, cv{std::vector<uint16_t>(R * N)};
  GroupedGemmParams p;
  p.trans_b = false;  // b [E, Kd, N]
  const TensorView A = av.view(DType::kBF16, {R, Kd}), B = bv.view(DType::kBF16, {E, Kd, N}),
                   O = ov.view(DType::kI64, {E + 1}), C = cv.view(DType::kBF16, {R, N});
  const double bytes = double(2 * (R * Kd + E * Kd * N + R * N) + (E + 1) * 8);
  // grouped_gemm: the tensor cores at v1; at v0 they refuse and grouped_gemm_naive runs
  run_versioned(state, dev::KernelOp::kGroupedGemm, bytes, [&] { return dev::grouped_gemm(p, A, B, O, C, nullptr); });
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * double(R * N * Kd) * double(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

// Shapes small enough for the emulator (a GPU run would want 4-16x more tokens to fill the SMs).
BENCHMARK(BM_LadderTopkGating)
    ->ArgNames({"v", "T", "E", "K"})
    ->ArgsProduct({{0, 1}, {1024}, {8, 64, 256}, {2}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_LadderRoutingPlan)
    ->ArgNames({"v", "T", "E", "K"})
    ->Args({0, 1024, 8, 2})
    ->Args({1, 1024, 8, 2})
    ->Args({0, 1024, 64, 6})
    ->Args({1, 1024, 64, 6})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_LadderPermute)
    ->ArgNames({"v", "T", "K", "H"})
    ->ArgsProduct({{0, 1}, {512}, {2}, {256, 1024}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_LadderCombine)
    ->ArgNames({"v", "T", "K", "H"})
    ->ArgsProduct({{0, 1}, {512}, {2}, {256, 1024}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_LadderGroupedGemm)
    ->ArgNames({"v", "R", "E", "N", "Kd"})
    ->ArgsProduct({{0, 1}, {256}, {4}, {128}, {128}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

// Measures what the SIMT emulator's scheduling costs:
//   * ns per fiber switch: 256 threads each yield `iters` times (__nanosleep is a pure yield
//     point); every yield is two switches (fiber -> scheduler -> next fiber);
//   * ns per switch of glibc's swapcontext, the ucontext route, ping-ponging two contexts;
//   * the 64-block x 256-thread shuffle + barrier reduction of the test suite, end to end.
// Each figure is the median of 7 runs after one warm-up. Prints one JSON object.
#include <ucontext.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "smoe/simt/kernel.h"

__global__ void yield_kernel(int iters) {
  for (int i = 0; i < iters; ++i) __nanosleep(0);
}

__global__ void block_sum_kernel(const float* in, float* out) {
  __shared__ float warp_sums[32];
  float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
  }
}

namespace {
using Clock = std::chrono::steady_clock;

template <class F>
double median_seconds(F f) {
  f();
  std::vector<double> t;
  for (int r = 0; r < 7; ++r) {
    const auto t0 = Clock::now();
    f();
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

ucontext_t g_main, g_other;
long g_remaining = 0;
void other_entry() {
  while (g_remaining-- > 0) swapcontext(&g_other, &g_main);
  swapcontext(&g_other, &g_main);
}
}  // namespace

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 2000;
  const int threads = 256;

  const double fiber_s = median_seconds([&] {
    if (SMOE_LAUNCH(yield_kernel, 1, threads, 0, nullptr, iters) != cudaSuccess) std::abort();
  });
  const double switches = 2.0 * threads * iters;

  const long uc_rounds = 200000;
  std::vector<char> stack(64 * 1024);
  const double uc_s = median_seconds([&] {
    getcontext(&g_other);
    g_other.uc_stack.ss_sp = stack.data();
    g_other.uc_stack.ss_size = stack.size();
    g_other.uc_link = nullptr;
    makecontext(&g_other, &other_entry, 0);
    g_remaining = uc_rounds;
    while (g_remaining >= 0) swapcontext(&g_main, &g_other);
  });

  const int blocks = 64;
  float *in = nullptr, *out = nullptr;
  cudaMalloc(&in, blocks * threads * sizeof(float));
  cudaMalloc(&out, blocks * sizeof(float));
  cudaMemset(in, 0, blocks * threads * sizeof(float));
  const double reduce_s = median_seconds([&] {
    if (SMOE_LAUNCH(block_sum_kernel, blocks, threads, 0, nullptr, in, out) != cudaSuccess) std::abort();
  });
  cudaFree(in);
  cudaFree(out);

  std::printf(
      "{\"fiber_switch_ns\": %.1f, \"swapcontext_switch_ns\": %.1f, "
      "\"reduction_64x256_ms\": %.2f, \"threads\": %d, \"yields_per_thread\": %d}\n",
      fiber_s / switches * 1e9, uc_s / (2.0 * uc_rounds) * 1e9, reduce_s * 1e3, threads, iters);
  return 0;
}

// Tutorial step 3 (docs/tutorial/03_naive_kernel.md): a naive grouped GEMM in CUDA, one thread per
// output element, run on the CPU by smoe's SIMT emulator:
//     python -m smoe.simt run docs/tutorial/grouped_gemm_v0.cu
// The same file compiles with nvcc for a GPU (the kernel uses only CUDA constructs the emulator knows).
// c[r, n] = sum_k a[r, k] * w[e][n, k] for the expert e whose row segment [offsets[e], offsets[e+1])
// holds r: the GEMM 1 of an MoE layer over the expert-sorted rows.
#include <cmath>
#include <cstdio>
#include <vector>

#include "smoe/simt/kernel.h"

__global__ void grouped_gemm_v0(const float* a, const float* w, const long* offsets, int E, int R, int N, int K,
                                float* c) {
  const int r = blockIdx.y * blockDim.y + threadIdx.y;  // output row
  const int n = blockIdx.x * blockDim.x + threadIdx.x;  // output column
  if (r >= R || n >= N) return;
  int e = 0;
  while (e + 1 < E && offsets[e + 1] <= r) ++e;  // the expert owning row r (a linear search: v0)
  const float* we = w + (long)e * N * K;
  float acc = 0.f;
  for (int k = 0; k < K; ++k) acc += a[(long)r * K + k] * we[(long)n * K + k];
  c[(long)r * N + n] = acc;
}

int main() {
  const int E = 3, R = 40, N = 24, K = 16;
  const long offsets_h[E + 1] = {0, 10, 10, 40};  // expert 1 received no token
  std::vector<float> a(R * K), w(E * N * K), c(R * N), want(R * N);
  for (int i = 0; i < R * K; ++i) a[i] = std::sin(0.1f * i);
  for (int i = 0; i < E * N * K; ++i) w[i] = std::cos(0.07f * i);
  for (int e = 0; e < E; ++e)
    for (long r = offsets_h[e]; r < offsets_h[e + 1]; ++r)
      for (int n = 0; n < N; ++n) {
        float acc = 0.f;
        for (int k = 0; k < K; ++k) acc += a[r * K + k] * w[((long)e * N + n) * K + k];
        want[r * N + n] = acc;
      }
  float *da, *dw, *dc;
  long* doff;
  cudaMalloc(&da, a.size() * sizeof(float));
  cudaMalloc(&dw, w.size() * sizeof(float));
  cudaMalloc(&dc, c.size() * sizeof(float));
  cudaMalloc(&doff, sizeof(offsets_h));
  cudaMemcpy(da, a.data(), a.size() * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpy(dw, w.data(), w.size() * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpy(doff, offsets_h, sizeof(offsets_h), cudaMemcpyHostToDevice);
  const dim3 block(8, 8), grid((N + 7) / 8, (R + 7) / 8);
  if (SMOE_LAUNCH(grouped_gemm_v0, grid, block, 0, nullptr, da, dw, doff, E, R, N, K, dc) != cudaSuccess) {
    std::printf("launch failed\n");
    return 1;
  }
  cudaMemcpy(c.data(), dc, c.size() * sizeof(float), cudaMemcpyDeviceToHost);
  double worst = 0;
  for (int i = 0; i < R * N; ++i) worst = std::fmax(worst, std::fabs(c[i] - want[i]));
  std::printf("grouped_gemm_v0: %d x %d outputs, %d threads, max |c - reference| = %.2e\n", R, N,
              grid.x * grid.y * block.x * block.y, worst);
  cudaFree(da);
  cudaFree(dw);
  cudaFree(dc);
  cudaFree(doff);
  return worst < 1e-4 ? 0 : 1;
}

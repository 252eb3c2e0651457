// Smoke test of the cuBLAS grouped-GEMM baseline (csrc/cuda/gemm_cublas.h) on a real GPU: three
// experts (one empty) of a small f32 problem, both trans_b layouts and the wgrad, against a host
// loop in f64. Built only with nvcc and cuBLAS (csrc/cuda/CMakeLists.txt; scripts/nvcc_check.sh
// compiles it without a GPU); exits 77 (ctest: skipped) when no GPU is visible.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "cuda/gemm_cublas.h"

namespace {

using namespace smoe;

int failures = 0;

void expect_close(const std::vector<float>& got, const std::vector<double>& want, const char* what) {
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::fabs(got[i] - want[i]) > 1e-4 * (1.0 + std::fabs(want[i]))) {
      std::printf("FAIL %s: element %zu = %g, expected %g\n", what, i, got[i], want[i]);
      ++failures;
      return;
    }
  }
  std::printf("ok   %s\n", what);
}

template <class T>
T* upload(const std::vector<T>& h) {
  T* d = nullptr;
  cudaMalloc(&d, h.size() * sizeof(T));
  cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

}  // namespace

int main() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("skip: no CUDA device\n");
    return 77;
  }
  const int64_t E = 3, R = 10, Kd = 16, N = 8;
  const std::vector<int64_t> off = {0, 6, 6, 10};  // expert 1 is empty
  std::vector<float> a(R * Kd), b(E * N * Kd), g(R * N);
  for (size_t i = 0; i < a.size(); ++i) a[i] = float(int(i % 7) - 3) / 4;
  for (size_t i = 0; i < b.size(); ++i) b[i] = float(int(i % 5) - 2) / 8;
  for (size_t i = 0; i < g.size(); ++i) g[i] = float(int(i % 3) - 1) / 2;
  float *da = upload(a), *db = upload(b), *dg = upload(g), *dc = nullptr, *dw = nullptr;
  int64_t* doff = upload(off);
  cudaMalloc(&dc, R * N * sizeof(float));
  cudaMalloc(&dw, E * Kd * N * sizeof(float));
  for (bool trans_b : {true, false}) {
    // trans_b: b[e] is [N, Kd]; else the same buffer read as [Kd, N]
    std::vector<double> want(R * N, 0.0);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = off[e]; r < off[e + 1]; ++r)
        for (int64_t c = 0; c < N; ++c)
          for (int64_t k = 0; k < Kd; ++k)
            want[r * N + c] += double(a[r * Kd + k]) * b[e * N * Kd + (trans_b ? c * Kd + k : k * N + c)];
    GroupedGemmParams p;
    p.trans_b = trans_b;
    const TensorView va = make_view(da, {R, Kd}, Device::kCUDA);
    const TensorView vb = trans_b ? make_view(db, {E, N, Kd}, Device::kCUDA) : make_view(db, {E, Kd, N}, Device::kCUDA);
    const Status st = cuda::grouped_gemm_cublas(p, va, vb, make_view(doff, {E + 1}, Device::kCUDA),
                                                make_view(dc, {R, N}, Device::kCUDA), nullptr);
    if (!st.ok()) {
      std::printf("FAIL grouped_gemm_cublas: %s\n", st.message().c_str());
      return 1;
    }
    std::vector<float> got(R * N);
    cudaMemcpy(got.data(), dc, got.size() * sizeof(float), cudaMemcpyDeviceToHost);
    expect_close(got, want, trans_b ? "grouped_gemm_cublas trans_b" : "grouped_gemm_cublas");
  }
  // wgrad: w[e] = a[seg]^T g[seg], [Kd, N]; the empty expert gives zeros
  std::vector<double> want(E * Kd * N, 0.0);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = off[e]; r < off[e + 1]; ++r)
      for (int64_t m = 0; m < Kd; ++m)
        for (int64_t c = 0; c < N; ++c) want[(e * Kd + m) * N + c] += double(a[r * Kd + m]) * g[r * N + c];
  const Status st = cuda::grouped_gemm_wgrad_cublas(
      make_view(da, {R, Kd}, Device::kCUDA), make_view(dg, {R, N}, Device::kCUDA),
      make_view(doff, {E + 1}, Device::kCUDA), make_view(dw, {E, Kd, N}, Device::kCUDA), nullptr);
  if (!st.ok()) {
    std::printf("FAIL grouped_gemm_wgrad_cublas: %s\n", st.message().c_str());
    return 1;
  }
  std::vector<float> got(E * Kd * N);
  cudaMemcpy(got.data(), dw, got.size() * sizeof(float), cudaMemcpyDeviceToHost);
  expect_close(got, want, "grouped_gemm_wgrad_cublas");
  return failures == 0 ? 0 : 1;
}

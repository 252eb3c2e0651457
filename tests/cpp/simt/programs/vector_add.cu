// Standalone CUDA program for `python -m smoe.simt run`: plain <<<>>> launches, extern __shared__,
// printf in a kernel. Exits 0 when the results are right.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(expr)                                                                               \
  do {                                                                                            \
    cudaError_t e_ = (expr);                                                                      \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      return 1;                                                                                   \
    }                                                                                             \
  } while (0)

__global__ void add(const float* a, const float* b, float* c, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) c[i] = a[i] + b[i];
  if (i == 0) printf("hello from thread %d of block %d\n", (int)threadIdx.x, (int)blockIdx.x);
}

// Reverses each block's slice through dynamic shared memory.
__global__ void reverse_blocks(float* x) {
  extern __shared__ float tile[];
  const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
  tile[t] = x[base + t];
  __syncthreads();
  x[base + t] = tile[blockDim.x - 1 - t];
}

int main(int argc, char** argv) {
  const int n = argc > 1 ? std::atoi(argv[1]) : 1000;
  std::vector<float> a(n), b(n), c(n);
  for (int i = 0; i < n; ++i) {
    a[i] = i;
    b[i] = 2 * i;
  }
  float *da, *db, *dc;
  CHECK(cudaMalloc(&da, n * sizeof(float)));
  CHECK(cudaMalloc(&db, n * sizeof(float)));
  CHECK(cudaMalloc(&dc, n * sizeof(float)));
  CHECK(cudaMemcpy(da, a.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(db, b.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  add<<<(n + 127) / 128, 128, 0, stream>>>(da, db, dc, n);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaMemcpy(c.data(), dc, n * sizeof(float), cudaMemcpyDeviceToHost));
  for (int i = 0; i < n; ++i) {
    if (c[i] != 3.0f * i) {
      std::fprintf(stderr, "c[%d] = %g, expected %g\n", i, c[i], 3.0f * i);
      return 1;
    }
  }
  const int blocks = n / 100;
  reverse_blocks<<<blocks, 100, 100 * sizeof(float)>>>(dc);
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaMemcpy(c.data(), dc, n * sizeof(float), cudaMemcpyDeviceToHost));
  for (int i = 0; i < blocks * 100; ++i) {
    const int j = i / 100 * 100 + 99 - i % 100;
    if (c[i] != 3.0f * j) {
      std::fprintf(stderr, "reversed c[%d] = %g, expected %g\n", i, c[i], 3.0f * j);
      return 1;
    }
  }
  CHECK(cudaStreamDestroy(stream));
  cudaFree(da);
  cudaFree(db);
  cudaFree(dc);
  std::printf("ok\n");
  return 0;
}

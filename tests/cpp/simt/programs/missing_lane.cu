// Standalone CUDA program with a bug: lane 3 returns before a full-warp shuffle. The emulator
// reports it; the program prints cudaGetErrorString and exits with status 3.
#include <cuda_runtime.h>

#include <cstdio>

__global__ void broken(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);
}

int main() {
  int* out;
  cudaMalloc(&out, 32 * sizeof(int));
  broken<<<1, 32>>>(out);
  const cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    std::printf("cudaDeviceSynchronize: %s: %s\n", cudaGetErrorName(e), cudaGetErrorString(e));
    return 3;
  }
  return 0;
}

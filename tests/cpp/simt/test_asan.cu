// SIMT emulator under AddressSanitizer: an out-of-bounds access in a kernel is reported with the
// kernel's file and line. Runs only in sanitizer builds (SMOE_SANITIZE=ON); elsewhere it skips.
#include "smoe/simt/kernel.h"

[[maybe_unused]] constexpr int kOutOfBoundsLine = __LINE__ + 3;
__global__ void out_of_bounds_kernel(float* out, int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  out[i + n] = 1.0f;  // one past the end for i == 0
}

__global__ void shared_out_of_bounds_kernel(float* out) {
  SMOE_DYNAMIC_SMEM(float, buf);
  buf[threadIdx.x] = 1.0f;  // dynamic shared memory holds blockDim.x - 1 floats
  __syncthreads();
  out[threadIdx.x] = buf[0];
}

#if defined(SMOE_SIMT) && SMOE_SIMT
#include <string>

#include "simt_test.h"

#if defined(__SANITIZE_ADDRESS__)
namespace {
void run_out_of_bounds() {
  float* p = nullptr;
  cudaMalloc(&p, 32 * sizeof(float));
  SMOE_LAUNCH(out_of_bounds_kernel, 1, 1, 0, nullptr, p, 32);
}
void run_shared_out_of_bounds() {
  float* p = nullptr;
  cudaMalloc(&p, 32 * sizeof(float));
  SMOE_LAUNCH(shared_out_of_bounds_kernel, 1, 32, 31 * sizeof(float), nullptr, p);
}
}  // namespace

TEST(SimtAsan, GlobalOutOfBoundsNamesKernelLine) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(run_out_of_bounds(), "heap-buffer-overflow.*test_asan.cu:" + std::to_string(kOutOfBoundsLine));
}

TEST(SimtAsan, DynamicSharedOutOfBounds) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(run_shared_out_of_bounds(), "heap-buffer-overflow.*test_asan.cu");
}
#else
TEST(SimtAsan, GlobalOutOfBoundsNamesKernelLine) {
  GTEST_SKIP() << "build with SMOE_SANITIZE=ON (AddressSanitizer) to run";
}
#endif
#endif  // SMOE_SIMT

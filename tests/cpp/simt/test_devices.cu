// SIMT emulator: several emulated devices (Options::devices, SMOE_SIMT_DEVICES). Allocations and
// streams remember the device that was current when they were made; a launch on device d with a
// pointer into device d' memory is an illegal address, and a launch into another device's stream
// is refused, so a launcher that forgets to make its tensors' device current fails here.
#include <cstdint>

#include "smoe/simt/kernel.h"

// One struct argument with the pointer inside, as the smoe kernels pass theirs.
struct ScaleArgs {
  const float* in;
  float* out;
  int n;
};
__global__ void scale_kernel(const ScaleArgs a) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < a.n) a.out[i] = 2.0f * a.in[i];
}

#if defined(SMOE_SIMT) && SMOE_SIMT
#include <vector>

#include "simt_test.h"

namespace {

smoe::simt::Options with_devices(int n) {
  smoe::simt::Options o = smoe::simt::options();
  o.devices = n;
  o.quiet = true;
  return o;
}

TEST(SimtDevices, CountAndCurrentDevice) {
  smoe::simt::ScopedOptions two(with_devices(2));
  int n = 0, d = -1;
  SIMT_CHECK(cudaGetDeviceCount(&n));
  EXPECT_EQ(n, 2);
  SIMT_CHECK(cudaSetDevice(1));
  SIMT_CHECK(cudaGetDevice(&d));
  EXPECT_EQ(d, 1);
  EXPECT_EQ(cudaSetDevice(2), cudaErrorInvalidDevice);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidDevice);
  SIMT_CHECK(cudaSetDevice(0));
}

TEST(SimtDevices, LaunchOnTheDeviceOfItsMemoryRuns) {
  smoe::simt::ScopedOptions two(with_devices(2));
  SIMT_CHECK(cudaSetDevice(1));
  std::vector<float> h(40, 1.5f);
  smoe::simt::test::DeviceBuffer<float> in(h), out(40);
  SIMT_CHECK(SMOE_LAUNCH(scale_kernel, 1, 64, 0, nullptr, ScaleArgs{in.ptr, out.ptr, 40}));
  for (float v : out.to_host()) EXPECT_EQ(v, 3.0f);
  SIMT_CHECK(cudaSetDevice(0));
}

TEST(SimtDevices, PointerOfAnotherDeviceIsAnIllegalAddress) {
  smoe::simt::ScopedOptions two(with_devices(2));
  SIMT_CHECK(cudaSetDevice(1));
  float *in = nullptr, *out = nullptr;
  SIMT_CHECK(cudaMalloc(&in, 64 * sizeof(float)));
  SIMT_CHECK(cudaMalloc(&out, 64 * sizeof(float)));
  SIMT_CHECK(cudaSetDevice(0));
  const cudaError_t e = SMOE_LAUNCH(scale_kernel, 1, 64, 0, nullptr, ScaleArgs{in, out, 64});
  EXPECT_EQ(e, cudaErrorIllegalAddress);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorIllegalAddress);  // sticky, as after a GPU fault
  EXPECT_CONTAINS(cudaGetErrorString(cudaErrorIllegalAddress), "on device 0");
  EXPECT_CONTAINS(cudaGetErrorString(cudaErrorIllegalAddress), "allocated on device 1");
  cudaDeviceReset();  // clears the fault and frees both buffers
}

TEST(SimtDevices, StreamOfAnotherDeviceIsRefused) {
  smoe::simt::ScopedOptions two(with_devices(2));
  SIMT_CHECK(cudaSetDevice(1));
  cudaStream_t s1 = nullptr;
  SIMT_CHECK(cudaStreamCreate(&s1));
  SIMT_CHECK(cudaSetDevice(0));
  smoe::simt::test::DeviceBuffer<float> in(64), out(64);
  EXPECT_EQ(SMOE_LAUNCH(scale_kernel, 1, 64, 0, s1, ScaleArgs{in.ptr, out.ptr, 64}), cudaErrorInvalidResourceHandle);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // SMOE_LAUNCH took the error
  SIMT_CHECK(cudaSetDevice(1));
  SIMT_CHECK(cudaStreamDestroy(s1));
  SIMT_CHECK(cudaSetDevice(0));
}

}  // namespace
#endif  // SMOE_SIMT

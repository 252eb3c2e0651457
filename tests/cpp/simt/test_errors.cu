// SIMT emulator: undefined behaviour is reported, not silently executed — barriers not reached by
// every thread, warp collectives whose mask names a lane that cannot arrive, deadlocks — and launch
// configurations the driver rejects return the driver's error codes.
// assert() must stay active in Release builds of this file.
#undef NDEBUG
#include <cassert>
#include <cstdint>

#include "smoe/simt/kernel.h"

// Each kConst names the line of the offending call in the kernel right below it.
[[maybe_unused]] constexpr int kDivergentBarrierLine = __LINE__ + 3;
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

[[maybe_unused]] constexpr int kBarrierAfterExitLine = __LINE__ + 4;
__global__ void barrier_after_exit_kernel(int* out, int n) {
  const int i = static_cast<int>(threadIdx.x);
  if (i >= n) return;
  __syncthreads();
  out[i] = 1;
}

[[maybe_unused]] constexpr int kElseBarrierLine = __LINE__ + 6;
__global__ void two_barriers_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    out[threadIdx.x] = 0;
    __syncthreads();
  } else {
    __syncthreads();
  }
}

[[maybe_unused]] constexpr int kExitedLaneShflLine = __LINE__ + 4;
__global__ void exited_lane_kernel(int* out) {
  const int lane = static_cast<int>(threadIdx.x);
  if (lane == 5) return;
  out[lane] = __shfl_sync(0xffffffffu, lane, 0);
}

[[maybe_unused]] constexpr int kShflLine = __LINE__ + 5;
[[maybe_unused]] constexpr int kBallotLine = __LINE__ + 6;
__global__ void mixed_collectives_kernel(unsigned* out) {
  const unsigned lane = threadIdx.x;
  if (lane < 16) {
    out[lane] = __shfl_sync(0xffffffffu, lane, 0);
  } else {
    out[lane] = __ballot_sync(0xffffffffu, 1);
  }
}

// Lane 0 of the second warp skips the shuffle and waits at the barrier; its warp-mates wait at a
// shuffle whose mask names it.
[[maybe_unused]] constexpr int kDeadlockShflLine = __LINE__ + 3;
[[maybe_unused]] constexpr int kDeadlockBarrierLine = __LINE__ + 3;
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x != 32) out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
  __syncthreads();
}

__global__ void shfl_outside_mask_kernel(int* out) {
  const int lane = static_cast<int>(threadIdx.x);
  if (lane < 16) out[lane] = __shfl_down_sync(0x0000ffffu, lane, 1);
}

__global__ void trap_kernel(int* out) {
  if (threadIdx.x == 3) __trap();
  out[threadIdx.x] = 1;
}

[[maybe_unused]] constexpr int kAssertLine = __LINE__ + 2;
__global__ void assert_kernel(int* out) {
  assert(threadIdx.x != 2);
  out[threadIdx.x] = 1;
}

__global__ void big_smem_kernel(float* out) {
  SMOE_DYNAMIC_SMEM(float, buf);
  buf[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buf[0];
}

#if defined(SMOE_SIMT) && SMOE_SIMT
#include <string>

#include "simt_test.h"

using smoe::simt::test::DeviceBuffer;
using smoe::simt::test::expect_kernel_error;

namespace {
std::string at(int line) { return "test_errors.cu:" + std::to_string(line); }
}  // namespace

TEST(SimtErrors, BarrierNotReachedByEveryThread) {
  DeviceBuffer<int> out(64);
  const std::string msg =
      expect_kernel_error([&] { return SMOE_LAUNCH(divergent_barrier_kernel, 1, 64, 0, nullptr, out.ptr); });
  EXPECT_CONTAINS(msg, "__syncthreads at ");
  EXPECT_CONTAINS(msg, at(kDivergentBarrierLine));
  EXPECT_CONTAINS(msg, "unspecified launch failure");
}

TEST(SimtErrors, BarrierAfterOtherThreadsExitedUnderEverySchedule) {
  for (auto s : {smoe::simt::Schedule::kForward, smoe::simt::Schedule::kReverse, smoe::simt::Schedule::kRandom}) {
    smoe::simt::test::ScopedOptions opt(smoe::simt::test::with_schedule(s, 7));
    DeviceBuffer<int> out(64);
    const std::string msg =
        expect_kernel_error([&] { return SMOE_LAUNCH(barrier_after_exit_kernel, 1, 64, 0, nullptr, out.ptr, 50); });
    EXPECT_CONTAINS(msg, at(kBarrierAfterExitLine));
    EXPECT_CONTAINS(msg, "exit");
  }
}

TEST(SimtErrors, ThreadsMeetAtDifferentBarriers) {
  DeviceBuffer<int> out(8);
  const std::string msg =
      expect_kernel_error([&] { return SMOE_LAUNCH(two_barriers_kernel, 1, 8, 0, nullptr, out.ptr); });
  EXPECT_CONTAINS(msg, at(kElseBarrierLine));
  EXPECT_CONTAINS(msg, "same barrier");
}

TEST(SimtErrors, CollectiveNamesExitedLane) {
  for (auto s : {smoe::simt::Schedule::kForward, smoe::simt::Schedule::kReverse}) {
    smoe::simt::test::ScopedOptions opt(smoe::simt::test::with_schedule(s));
    DeviceBuffer<int> out(32);
    const std::string msg =
        expect_kernel_error([&] { return SMOE_LAUNCH(exited_lane_kernel, 1, 32, 0, nullptr, out.ptr); });
    EXPECT_CONTAINS(msg, "__shfl_sync");
    EXPECT_CONTAINS(msg, at(kExitedLaneShflLine));
    EXPECT_CONTAINS(msg, "exit");
  }
}

TEST(SimtErrors, LaneWaitsAtDifferentCollective) {
  DeviceBuffer<unsigned> out(32);
  const std::string msg =
      expect_kernel_error([&] { return SMOE_LAUNCH(mixed_collectives_kernel, 1, 32, 0, nullptr, out.ptr); });
  EXPECT_CONTAINS(msg, "__ballot_sync");
  EXPECT_CONTAINS(msg, "__shfl_sync at ");
  EXPECT_CONTAINS(msg, at(kShflLine));
  EXPECT_CONTAINS(msg, at(kBallotLine));
}

TEST(SimtErrors, DeadlockListsWhereEachThreadWaits) {
  DeviceBuffer<int> out(64);
  const std::string msg = expect_kernel_error([&] { return SMOE_LAUNCH(deadlock_kernel, 1, 64, 0, nullptr, out.ptr); });
  EXPECT_CONTAINS(msg, "deadlock");
  EXPECT_CONTAINS(msg, "where the threads of the block are");
  EXPECT_CONTAINS(msg, "wait at __syncthreads at ");
  EXPECT_CONTAINS(msg, at(kDeadlockBarrierLine));
  EXPECT_CONTAINS(msg, at(kDeadlockShflLine));
}

TEST(SimtErrors, ShuffleFromLaneOutsideMask) {
  DeviceBuffer<int> out(32);
  const std::string msg =
      expect_kernel_error([&] { return SMOE_LAUNCH(shfl_outside_mask_kernel, 1, 32, 0, nullptr, out.ptr); });
  EXPECT_CONTAINS(msg, "lane 15 reads lane 16");
}

TEST(SimtErrors, TrapIsAStickyLaunchFailure) {
  DeviceBuffer<int> out(8);
  smoe::simt::test::ScopedOptions q(smoe::simt::test::quiet());
  EXPECT_EQ(SMOE_LAUNCH(trap_kernel, 1, 8, 0, nullptr, out.ptr), cudaErrorLaunchFailure);
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);  // sticky
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
  EXPECT_STREQ(cudaGetErrorName(cudaErrorLaunchFailure), "cudaErrorLaunchFailure");
  EXPECT_CONTAINS(cudaGetErrorString(cudaErrorLaunchFailure), "__trap() called");
  EXPECT_EQ(cudaDeviceReset(), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

TEST(SimtErrors, DeviceAssertIsCudaErrorAssert) {
  DeviceBuffer<int> out(8);
  smoe::simt::test::ScopedOptions q(smoe::simt::test::quiet());
  EXPECT_EQ(SMOE_LAUNCH(assert_kernel, 1, 8, 0, nullptr, out.ptr), cudaErrorAssert);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorAssert);
  EXPECT_CONTAINS(cudaGetErrorString(cudaErrorAssert), "device-side assertion `threadIdx.x != 2'");
  EXPECT_CONTAINS(cudaGetErrorString(cudaErrorAssert), at(kAssertLine));
  EXPECT_EQ(cudaDeviceReset(), cudaSuccess);
}

TEST(SimtErrors, LaunchConfigurationsTheDriverRejects) {
  DeviceBuffer<float> out(1024);
  auto launch = [&](dim3 grid, dim3 block, size_t smem) {
    return SMOE_LAUNCH(big_smem_kernel, grid, block, smem, nullptr, out.ptr);
  };
  EXPECT_EQ(launch(1, 1025, 0), cudaErrorInvalidConfiguration);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // not sticky, and SMOE_LAUNCH took it (cudaGetLastError)
  EXPECT_EQ(launch(1, dim3(32, 32, 2), 0), cudaErrorInvalidConfiguration);
  EXPECT_EQ(launch(1, dim3(1, 1, 65), 0), cudaErrorInvalidConfiguration);
  EXPECT_EQ(launch(dim3(1, 65536), 1, 0), cudaErrorInvalidConfiguration);
  EXPECT_EQ(launch(0, 32, 0), cudaErrorInvalidConfiguration);
  EXPECT_EQ(launch(1, dim3(32, 0), 0), cudaErrorInvalidConfiguration);
  cudaGetLastError();
  EXPECT_EQ(launch(1, 32, 48 * 1024), cudaSuccess);
  EXPECT_EQ(launch(1, 32, 48 * 1024 + 4), cudaErrorInvalidValue);
  cudaGetLastError();
  EXPECT_EQ(cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024),
            cudaSuccess);
  EXPECT_EQ(launch(1, 32, 100 * 1024), cudaSuccess);
  EXPECT_EQ(launch(1, 32, 100 * 1024 + 4), cudaErrorInvalidValue);
  EXPECT_EQ(cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024 + 1),
            cudaErrorInvalidValue);
  cudaGetLastError();
}

TEST(SimtErrors, DeviceProperties) {
  cudaDeviceProp p;
  ASSERT_EQ(cudaGetDeviceProperties(&p, 0), cudaSuccess);
  EXPECT_EQ(p.warpSize, 32);
  EXPECT_EQ(p.maxThreadsPerBlock, 1024);
  EXPECT_EQ(p.sharedMemPerBlockOptin, 227u * 1024);
  int v = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0), cudaSuccess);
  EXPECT_EQ(v, 227 * 1024);
}
#endif  // SMOE_SIMT

// SIMT emulator: thread schedules (forward, reverse, random) expose a missing barrier, a correct
// kernel gives bit-identical results under all of them, the block reduction is fast, and the
// parallel mode runs blocks that wait on each other through global memory.
#include <cstdint>

#include "smoe/simt/kernel.h"

// Reads a neighbour's shared slot. Without the barrier the value depends on which thread ran
// first: the schedules disagree.
template <bool kWithBarrier>
__global__ void neighbour_kernel(float* out) {
  __shared__ float slot[128];
  const int t = static_cast<int>(threadIdx.x);
  slot[t] = static_cast<float>(t + 1);
  if (kWithBarrier) __syncthreads();
  out[t] = slot[(t + 1) % blockDim.x];
}

template __global__ void neighbour_kernel<true>(float*);
template __global__ void neighbour_kernel<false>(float*);

// One block reduces blockDim.x values: warp shuffles, then the warp sums through shared memory.
__global__ void block_sum_kernel(const float* in, float* out) {
  __shared__ float warp_sums[32];
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  float v = in[i];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = static_cast<int>(blockDim.x / 32);
    v = lane < nwarps ? warp_sums[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) out[blockIdx.x] = v;
  }
}

// Block 1 publishes a value; block 0 spins on the flag through an atomic, then reads it.
__global__ void producer_consumer_kernel(int* flag, int* data, int* out) {
  if (blockIdx.x == 1) {
    if (threadIdx.x == 0) {
      data[0] = 42;
      __threadfence();
      atomicExch(flag, 1);
    }
  } else if (threadIdx.x == 0) {
    while (atomicAdd(flag, 0) == 0) {}
    __threadfence();
    out[0] = data[0];
  }
}

// Each block keeps its own index in static shared memory across a stretch of yields; blocks
// running at the same time on other OS threads must not see each other's copy.
__global__ void private_shared_kernel(int* out, int* counter) {
  __shared__ int mine[64];
  mine[threadIdx.x] = static_cast<int>(blockIdx.x);
  __syncthreads();
  for (int k = 0; k < 20; ++k) atomicAdd(counter, 1);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = mine[(threadIdx.x + 7) % blockDim.x];
}

#if defined(SMOE_SIMT) && SMOE_SIMT
#include <chrono>
#include <cstring>
#include <vector>

#include "simt_test.h"

using smoe::simt::Schedule;
using smoe::simt::test::DeviceBuffer;
using smoe::simt::test::ScopedOptions;
using smoe::simt::test::with_schedule;

namespace {
template <bool kWithBarrier>
std::vector<float> run_neighbour(Schedule s, uint64_t seed) {
  ScopedOptions opt(with_schedule(s, seed));
  DeviceBuffer<float> out(128);
  EXPECT_EQ(SMOE_LAUNCH(neighbour_kernel<kWithBarrier>, 1, 128, 0, nullptr, out.ptr), cudaSuccess);
  return out.to_host();
}
bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
}  // namespace

TEST(SimtSchedules, ParseScheduleNames) {
  Schedule s;
  uint64_t seed = 0;
  EXPECT_TRUE(smoe::simt::parse_schedule("forward", &s, &seed));
  EXPECT_EQ(s, Schedule::kForward);
  EXPECT_TRUE(smoe::simt::parse_schedule("reverse", &s, &seed));
  EXPECT_EQ(s, Schedule::kReverse);
  EXPECT_TRUE(smoe::simt::parse_schedule("random:1234", &s, &seed));
  EXPECT_EQ(s, Schedule::kRandom);
  EXPECT_EQ(seed, 1234u);
  EXPECT_FALSE(smoe::simt::parse_schedule("random:x", &s, &seed));
  EXPECT_FALSE(smoe::simt::parse_schedule("backwards", &s, &seed));
}

TEST(SimtSchedules, MissingBarrierMakesSchedulesDisagree) {
  const auto fwd = run_neighbour<false>(Schedule::kForward, 0);
  const auto rev = run_neighbour<false>(Schedule::kReverse, 0);
  EXPECT_FALSE(same_bits(fwd, rev));
  // Forward: thread t reads slot t+1 before thread t+1 ran, so it sees the NaN poison.
  EXPECT_TRUE(smoe::simt::test::is_poison(fwd[0]));
  EXPECT_EQ(rev[0], 2.0f);
}

TEST(SimtSchedules, CorrectKernelIsBitIdenticalUnderAllSchedules) {
  const auto ref = run_neighbour<true>(Schedule::kForward, 0);
  for (int t = 0; t < 128; ++t) ASSERT_EQ(ref[t], static_cast<float>((t + 1) % 128 + 1));
  for (const auto& s : smoe::simt::kStandardSchedules)
    EXPECT_TRUE(same_bits(ref, run_neighbour<true>(s.schedule, s.seed))) << s.name;
  for (uint64_t seed : {3u, 4u}) EXPECT_TRUE(same_bits(ref, run_neighbour<true>(Schedule::kRandom, seed)));
}

TEST(SimtSchedules, ScopedScheduleSetsAndRestores) {
  const smoe::simt::Options before = smoe::simt::options();
  {
    smoe::simt::ScopedSchedule s(smoe::simt::kStandardSchedules[2]);
    EXPECT_EQ(smoe::simt::options().schedule, Schedule::kRandom);
    EXPECT_EQ(smoe::simt::options().seed, 1u);
  }
  EXPECT_EQ(smoe::simt::options().schedule, before.schedule);
  EXPECT_EQ(smoe::simt::options().seed, before.seed);
}

TEST(SimtSchedules, BlockReduction64x256IsFastAndExact) {
  const int blocks = 64, threads = 256;
  std::vector<float> in(blocks * threads);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 97);
  DeviceBuffer<float> d_in(in), d_out(blocks);
  for (Schedule s : {Schedule::kForward, Schedule::kReverse, Schedule::kRandom}) {
    ScopedOptions opt(with_schedule(s, 5));
    const auto t0 = std::chrono::steady_clock::now();
    SIMT_CHECK(SMOE_LAUNCH(block_sum_kernel, blocks, threads, 0, nullptr, d_in.ptr, d_out.ptr));
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const auto out = d_out.to_host();
    for (int b = 0; b < blocks; ++b) {
      float ref = 0;
      for (int t = 0; t < threads; ++t) ref += in[b * threads + t];
      ASSERT_EQ(out[b], ref) << "block " << b;  // small integers: exact in any order
    }
#if !defined(__SANITIZE_ADDRESS__)
    EXPECT_LT(seconds, 1.0) << "64 x 256 reduction took " << seconds << " s";
#endif
  }
}

TEST(SimtSchedules, ParallelModeRunsBlocksThatWaitOnEachOther) {
  smoe::simt::Options o = smoe::simt::options();
  o.parallel_blocks = true;
  ScopedOptions opt(o);
  DeviceBuffer<int> flag(std::vector<int>{0}), data(1), out(1);
  SIMT_CHECK(SMOE_LAUNCH(producer_consumer_kernel, 2, 32, 0, nullptr, flag.ptr, data.ptr, out.ptr));
  EXPECT_EQ(out.to_host()[0], 42);
}

TEST(SimtSchedules, SequentialModeReportsCrossBlockSpinAsLivelock) {
  smoe::simt::Options o = smoe::simt::options();
  o.parallel_blocks = false;
  o.schedule = Schedule::kForward;  // block 0 (the consumer) runs first and can never finish
  o.spin_timeout_s = 0.2;
  ScopedOptions opt(o);
  DeviceBuffer<int> flag(std::vector<int>{0}), data(1), out(1);
  const std::string msg = smoe::simt::test::expect_kernel_error(
      [&] { return SMOE_LAUNCH(producer_consumer_kernel, 2, 32, 0, nullptr, flag.ptr, data.ptr, out.ptr); });
  EXPECT_CONTAINS(msg, "SMOE_SIMT_PARALLEL=1");
}

TEST(SimtSchedules, StaticSharedIsPrivateToEachParallelBlock) {
  smoe::simt::Options o = smoe::simt::options();
  o.parallel_blocks = true;
  o.max_os_threads = 8;
  ScopedOptions opt(o);
  const int blocks = 16, threads = 64;
  DeviceBuffer<int> out(blocks * threads), counter(std::vector<int>{0});
  SIMT_CHECK(SMOE_LAUNCH(private_shared_kernel, blocks, threads, 0, nullptr, out.ptr, counter.ptr));
  const auto h = out.to_host();
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t) ASSERT_EQ(h[b * threads + t], b);
  EXPECT_EQ(counter.to_host()[0], blocks * threads * 20);
}
#endif  // SMOE_SIMT

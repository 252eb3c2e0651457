// SIMT emulator: warp collectives — shuffles (32/64-bit, __half2, __nv_bfloat162, widths), votes,
// __activemask, __match_*_sync, __reduce_*_sync, __syncwarp — against plain C++ references
// written from the CUDA C++ Programming Guide's descriptions ("Warp Shuffle Functions").
#include <cstdint>

#include "smoe/simt/kernel.h"

// out[0..31] idx, [32..63] up, [64..95] down, [96..127] xor.
template <class T>
__global__ void shuffle_kernel(const T* in, T* out, int width, int src_lane, unsigned delta, int lane_mask) {
  const int lane = threadIdx.x;
  const T v = in[lane];
  out[lane] = __shfl_sync(0xffffffffu, v, src_lane + lane, width);
  out[32 + lane] = __shfl_up_sync(0xffffffffu, v, delta, width);
  out[64 + lane] = __shfl_down_sync(0xffffffffu, v, delta, width);
  out[96 + lane] = __shfl_xor_sync(0xffffffffu, v, lane_mask, width);
}

// Explicit instantiations, so that nvcc compiles every shuffle type too (simt_nvcc_check).
#define SMOE_SHUFFLE_INSTANCE(T) template __global__ void shuffle_kernel<T>(const T*, T*, int, int, unsigned, int);
SMOE_SHUFFLE_INSTANCE(int)
SMOE_SHUFFLE_INSTANCE(float)
SMOE_SHUFFLE_INSTANCE(double)
SMOE_SHUFFLE_INSTANCE(long long)
SMOE_SHUFFLE_INSTANCE(__half2)
SMOE_SHUFFLE_INSTANCE(__nv_bfloat162)
#undef SMOE_SHUFFLE_INSTANCE

__global__ void vote_kernel(unsigned* out) {
  const unsigned lane = threadIdx.x % 32;
  unsigned* o = out + 16 * threadIdx.x;
  o[0] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  o[1] = __any_sync(0xffffffffu, lane == 31);
  o[2] = __all_sync(0xffffffffu, lane < 31);
  o[3] = __activemask();
  o[4] = __match_any_sync(0xffffffffu, lane % 4);
  int pred = -1;
  o[5] = __match_all_sync(0xffffffffu, 7, &pred);
  o[6] = static_cast<unsigned>(pred);
  o[7] = __match_all_sync(0xffffffffu, lane / 16, &pred);
  o[8] = static_cast<unsigned>(pred);
  o[9] = __reduce_add_sync(0xffffffffu, lane);
  o[10] = __reduce_min_sync(0xffffffffu, lane + 5);
  o[11] = __reduce_max_sync(0xffffffffu, lane * 2);
  o[12] = static_cast<unsigned>(__reduce_min_sync(0xffffffffu, static_cast<int>(lane) - 10));
  o[13] = __reduce_and_sync(0xffffffffu, 0xffu ^ (1u << (lane % 8)));
  o[14] = __reduce_or_sync(0xffffffffu, 1u << lane);
  o[15] = __reduce_xor_sync(0xffffffffu, lane);
}

// Half warps shuffle independently with their own masks, on different lines.
__global__ void half_warp_kernel(int* out) {
  const int lane = threadIdx.x;
  int v = lane * 10;
  if (lane < 16) {
    v = __shfl_down_sync(0x0000ffffu, v, 1, 16);
  } else {
    v = __shfl_xor_sync(0xffff0000u, v, 1);
  }
  out[lane] = v;
}

// __syncwarp orders a shared-memory exchange inside a warp.
__global__ void syncwarp_kernel(int* out) {
  __shared__ int buf[64];
  buf[threadIdx.x] = static_cast<int>(threadIdx.x) * 3;
  __syncwarp();
  out[threadIdx.x] = buf[(threadIdx.x & ~31u) + (threadIdx.x + 5) % 32];
}

#if defined(SMOE_SIMT) && SMOE_SIMT
#include <cstring>
#include <vector>

#include "simt_test.h"

using smoe::simt::test::DeviceBuffer;

namespace {

template <class T>
T value_for_lane(int lane);
template <>
int value_for_lane<int>(int lane) {
  return lane * 17 - 100;
}
template <>
float value_for_lane<float>(int lane) {
  return 0.5f * lane - 3.25f;
}
template <>
double value_for_lane<double>(int lane) {
  return 1e300 / (lane + 1);
}
template <>
long long value_for_lane<long long>(int lane) {
  return (1ll << 40) * lane + lane;
}
template <>
__half2 value_for_lane<__half2>(int lane) {
  return __floats2half2_rn(lane, -lane * 0.5f);
}
template <>
__nv_bfloat162 value_for_lane<__nv_bfloat162>(int lane) {
  return __floats2bfloat162_rn(lane * 2.0f, 100.0f + lane);
}

template <class T>
void check_shuffles(int width, int src, unsigned delta, int lane_mask) {
  std::vector<T> in(32);
  for (int l = 0; l < 32; ++l) in[l] = value_for_lane<T>(l);
  DeviceBuffer<T> d_in(in), d_out(128);
  SIMT_CHECK(SMOE_LAUNCH(shuffle_kernel<T>, 1, 32, 0, nullptr, d_in.ptr, d_out.ptr, width, src, delta, lane_mask));
  const auto out = d_out.to_host();
  for (int lane = 0; lane < 32; ++lane) {
    const int base = lane / width * width;
    const T idx = in[base + (src + lane) % width];
    const T up = lane % width >= static_cast<int>(delta) ? in[lane - delta] : in[lane];
    const T down = lane % width + static_cast<int>(delta) < width ? in[lane + delta] : in[lane];
    const int target = lane ^ lane_mask;
    const T x = target < base + width ? in[target] : in[lane];
    const T expect[4] = {idx, up, down, x};
    for (int k = 0; k < 4; ++k) {
      ASSERT_EQ(std::memcmp(&out[32 * k + lane], &expect[k], sizeof(T)), 0)
          << "op " << k << " lane " << lane << " width " << width;
    }
  }
}

}  // namespace

TEST(SimtWarp, ShufflesAllTypesAndWidths) {
  for (int width : {32, 16, 8, 4, 2, 1}) {
    check_shuffles<int>(width, 3, 1, 1);
    check_shuffles<float>(width, 7, 2, 3);
    check_shuffles<double>(width, 31, 4, 16);
    check_shuffles<long long>(width, 0, 3, 5);
    check_shuffles<__half2>(width, 5, 1, 2);
    check_shuffles<__nv_bfloat162>(width, 9, 8, 7);
  }
}

TEST(SimtWarp, VotesMatchAndReduce) {
  DeviceBuffer<unsigned> out(16 * 64);
  SIMT_CHECK(SMOE_LAUNCH(vote_kernel, 1, 64, 0, nullptr, out.ptr));
  const auto h = out.to_host();
  unsigned ballot = 0;
  for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
  for (int t = 0; t < 64; ++t) {
    const unsigned lane = t % 32;
    const unsigned* o = &h[16 * t];
    EXPECT_EQ(o[0], ballot);
    EXPECT_EQ(o[1], 1u);
    EXPECT_EQ(o[2], 0u);
    EXPECT_EQ(o[3], 0xffffffffu);
    EXPECT_EQ(o[4], 0x11111111u << (lane % 4));
    EXPECT_EQ(o[5], 0xffffffffu);
    EXPECT_EQ(o[6], 1u);
    EXPECT_EQ(o[7], 0u);
    EXPECT_EQ(o[8], 0u);
    EXPECT_EQ(o[9], 496u);
    EXPECT_EQ(o[10], 5u);
    EXPECT_EQ(o[11], 62u);
    EXPECT_EQ(static_cast<int>(o[12]), -10);
    EXPECT_EQ(o[13], 0u);
    EXPECT_EQ(o[14], 0xffffffffu);
    EXPECT_EQ(o[15], 0u);  // xor of 0..31
  }
}

TEST(SimtWarp, HalfWarpsWithDisjointMasks) {
  DeviceBuffer<int> out(32);
  SIMT_CHECK(SMOE_LAUNCH(half_warp_kernel, 1, 32, 0, nullptr, out.ptr));
  const auto h = out.to_host();
  for (int l = 0; l < 16; ++l) EXPECT_EQ(h[l], l < 15 ? (l + 1) * 10 : l * 10);
  for (int l = 16; l < 32; ++l) EXPECT_EQ(h[l], (l ^ 1) * 10);
}

TEST(SimtWarp, SyncwarpOrdersSharedMemory) {
  DeviceBuffer<int> out(64);
  SIMT_CHECK(SMOE_LAUNCH(syncwarp_kernel, 1, 64, 0, nullptr, out.ptr));
  const auto h = out.to_host();
  for (int t = 0; t < 64; ++t) EXPECT_EQ(h[t], ((t & ~31) + (t + 5) % 32) * 3);
}
#endif  // SMOE_SIMT

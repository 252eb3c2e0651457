// SIMT emulator: built-in indices, static and dynamic shared memory (per block, poisoned),
// poisoned cudaMalloc, __syncthreads reductions, atomics, intrinsics, half/bfloat16.
// The kernels compile with nvcc too (tests/cpp/simt/CMakeLists.txt, target simt_nvcc_check).
#include <cstdint>

#include "smoe/simt/kernel.h"

// Writes each thread's global coordinates: out[t] = (tid, bid, bdim, gdim) packed per thread.
__global__ void indices_kernel(uint32_t* out) {
  const uint32_t tx = threadIdx.x, ty = threadIdx.y, tz = threadIdx.z;
  const uint32_t bx = blockIdx.x, by = blockIdx.y, bz = blockIdx.z;
  const uint32_t t = tx + blockDim.x * (ty + blockDim.y * tz);
  const uint32_t b = bx + gridDim.x * (by + gridDim.y * bz);
  const uint32_t nthreads = blockDim.x * blockDim.y * blockDim.z;
  uint32_t* o = out + 4 * (b * nthreads + t);
  o[0] = tx | ty << 8 | tz << 16;
  o[1] = bx | by << 8 | bz << 16;
  o[2] = blockDim.x | blockDim.y << 8 | blockDim.z << 16;
  o[3] = gridDim.x | gridDim.y << 8 | gridDim.z << 16 | static_cast<uint32_t>(warpSize) << 24;
}

// Static shared tile (with padding, written inside the kernel body): transposes 32x32 blocks.
// Thread (x, y) also reports what it read from its tile slot before anyone wrote it.
__global__ void transpose_kernel(const float* in, float* out, float* first_read, int n) {
  __shared__ float tile[32][33];
  const int x = blockIdx.x * 32 + threadIdx.x, y = blockIdx.y * 32 + threadIdx.y;
  first_read[(blockIdx.y * gridDim.x + blockIdx.x) * 1024 + threadIdx.y * 32 + threadIdx.x] =
      tile[threadIdx.y][threadIdx.x];
  __syncthreads();
  tile[threadIdx.y][threadIdx.x] = in[y * n + x];
  __syncthreads();
  const int ox = blockIdx.y * 32 + threadIdx.x, oy = blockIdx.x * 32 + threadIdx.y;
  out[oy * n + ox] = tile[threadIdx.x][threadIdx.y];
}

// Dynamic shared memory: each thread stores its index, then reads its neighbour's; thread 0 also
// reports the untouched element just past the written part.
__global__ void dynamic_smem_kernel(int* out, float* untouched) {
  SMOE_DYNAMIC_SMEM(int, buf);
  buf[threadIdx.x] = static_cast<int>(threadIdx.x + 1000 * blockIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = buf[(threadIdx.x + 1) % blockDim.x];
  if (threadIdx.x == 0) untouched[blockIdx.x] = reinterpret_cast<float*>(buf)[blockDim.x];
}

__global__ void syncthreads_reduce_kernel(int* out) {
  const int p = threadIdx.x % 3 == 0;
  out[0 + 3 * threadIdx.x] = __syncthreads_count(p);
  out[1 + 3 * threadIdx.x] = __syncthreads_and(threadIdx.x < 1000);
  out[2 + 3 * threadIdx.x] = __syncthreads_or(threadIdx.x == 77);
}

struct AtomicCounters {
  int i;
  unsigned u;
  unsigned long long ull;
  float f;
  double d;
  int imin, imax;
  unsigned inc;
  unsigned cas_winner;
  __half h;
  __nv_bfloat16 b;
};

__global__ void atomics_kernel(AtomicCounters* c) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&c->i, 1);
  atomicAdd(&c->u, 2u);
  atomicAdd(&c->ull, 1ull << 33);
  atomicAdd(&c->f, 0.5f);
  atomicAdd(&c->d, 0.25);
  atomicMin(&c->imin, -t);
  atomicMax(&c->imax, t);
  atomicInc(&c->inc, 9u);
  atomicCAS(&c->cas_winner, 0xffffffffu, static_cast<unsigned>(t));
  atomicAdd(&c->h, __float2half(1.0f));
  atomicAdd(&c->b, __float2bfloat16(1.0f));
}

__global__ void intrinsics_kernel(float* f, int* i) {
  f[0] = __saturatef(1.5f);
  f[1] = __saturatef(-0.5f);
  f[2] = __fdividef(1.0f, 4.0f);
  f[3] = rsqrtf(16.0f);
  f[4] = fmaf(2.0f, 3.0f, 1.0f);
  f[5] = __half2float(__float2half(0.1f));
  f[6] = __bfloat162float(__float2bfloat16(0.1f));
  f[7] = __int_as_float(0x3f800000);
  f[8] = __low2float(__floats2half2_rn(1.5f, -2.0f)) + __high2float(__floats2half2_rn(1.5f, -2.0f));
  f[9] = max(1.0f, 2.0f) + min(3.0f, -4.0f);
  f[10] = __ldg(f + 4);
  const float4 v = make_float4(1.f, 2.f, 3.f, 4.f);
  f[11] = v.x + v.y + v.z + v.w;
  i[0] = __popc(0xf0f0u);
  i[1] = __clz(1);
  i[2] = __ffs(8);
  i[3] = static_cast<int>(__brev(1u));
  i[4] = min(3, 7) + max(3, 7);
  i[5] = __float2int_rn(2.5f);
  i[6] = static_cast<int>(__byte_perm(0x33221100u, 0x77665544u, 0x4321u));
  i[7] = static_cast<int>(__umulhi(0x80000000u, 4u));
}

// __constant__ memory filled by cudaMemcpyToSymbol; a __device__ global read back by
// cudaMemcpyFromSymbol.
__constant__ float kScale[4];
__device__ int g_visits;

__global__ void constant_kernel(const float* in, float* out) {
  out[threadIdx.x] = in[threadIdx.x] * kScale[threadIdx.x % 4];
  atomicAdd(&g_visits, 1);
}

#if defined(SMOE_SIMT) && SMOE_SIMT
#include <cmath>
#include <vector>

#include "simt_test.h"

using smoe::simt::test::DeviceBuffer;

TEST(SimtBasics, IndicesCover3dGridAnd3dBlock) {
  const dim3 grid(3, 2, 2), block(4, 3, 2);
  const int nthreads = 24, nblocks = 12;
  DeviceBuffer<uint32_t> out(4 * nthreads * nblocks);
  SIMT_CHECK(SMOE_LAUNCH(indices_kernel, grid, block, 0, nullptr, out.ptr));
  const auto h = out.to_host();
  for (int b = 0; b < nblocks; ++b) {
    for (int t = 0; t < nthreads; ++t) {
      const uint32_t* o = &h[4 * (b * nthreads + t)];
      EXPECT_EQ(o[0], uint32_t(t % 4 | (t / 4 % 3) << 8 | (t / 12) << 16));
      EXPECT_EQ(o[1], uint32_t(b % 3 | (b / 3 % 2) << 8 | (b / 6) << 16));
      EXPECT_EQ(o[2], uint32_t(4 | 3 << 8 | 2 << 16));
      EXPECT_EQ(o[3], uint32_t(3 | 2 << 8 | 2 << 16 | 32u << 24));
    }
  }
}

TEST(SimtBasics, StaticSharedIsPerBlockAndPoisoned) {
  const int n = 96;  // 3x3 blocks of 32x32
  std::vector<float> in(n * n);
  for (int i = 0; i < n * n; ++i) in[i] = static_cast<float>(i);
  DeviceBuffer<float> d_in(in), d_out(n * n), first(9 * 1024);
  SIMT_CHECK(SMOE_LAUNCH(transpose_kernel, dim3(3, 3), dim3(32, 32), 0, nullptr, d_in.ptr, d_out.ptr, first.ptr, n));
  const auto out = d_out.to_host();
  for (int y = 0; y < n; ++y)
    for (int x = 0; x < n; ++x) ASSERT_EQ(out[x * n + y], in[y * n + x]) << x << "," << y;
  // Every block, not only the first, starts from poisoned shared memory.
  for (float f : first.to_host()) ASSERT_TRUE(smoe::simt::test::is_poison(f));
}

TEST(SimtBasics, DynamicSharedMemoryAndFreshAllocationsArePoisoned) {
  const int threads = 64, blocks = 5;
  DeviceBuffer<int> out(threads * blocks);
  DeviceBuffer<float> untouched(blocks);
  for (float f : untouched.to_host()) EXPECT_TRUE(smoe::simt::test::is_poison(f));
  SIMT_CHECK(
      SMOE_LAUNCH(dynamic_smem_kernel, blocks, threads, (threads + 4) * sizeof(int), nullptr, out.ptr, untouched.ptr));
  const auto h = out.to_host();
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t) EXPECT_EQ(h[b * threads + t], (t + 1) % threads + 1000 * b);
  for (float f : untouched.to_host()) EXPECT_TRUE(std::isnan(f));
}

TEST(SimtBasics, SyncthreadsCountAndOr) {
  const int threads = 200;
  DeviceBuffer<int> out(3 * threads);
  SIMT_CHECK(SMOE_LAUNCH(syncthreads_reduce_kernel, 1, threads, 0, nullptr, out.ptr));
  const auto h = out.to_host();
  for (int t = 0; t < threads; ++t) {
    EXPECT_EQ(h[3 * t], 67);  // multiples of 3 in [0, 200)
    EXPECT_EQ(h[3 * t + 1], 1);
    EXPECT_EQ(h[3 * t + 2], 1);
  }
}

TEST(SimtBasics, AtomicsOnEveryType) {
  AtomicCounters init{};
  init.imin = 0;
  init.imax = 0;
  init.cas_winner = 0xffffffffu;
  init.h = __float2half(0.0f);
  init.b = __float2bfloat16(0.0f);
  std::vector<AtomicCounters> host{init};
  DeviceBuffer<AtomicCounters> c(host);
  const int blocks = 4, threads = 64, n = blocks * threads;
  SIMT_CHECK(SMOE_LAUNCH(atomics_kernel, blocks, threads, 0, nullptr, c.ptr));
  const AtomicCounters r = c.to_host()[0];
  EXPECT_EQ(r.i, n);
  EXPECT_EQ(r.u, 2u * n);
  EXPECT_EQ(r.ull, (1ull << 33) * n);
  EXPECT_EQ(r.f, 0.5f * n);
  EXPECT_EQ(r.d, 0.25 * n);
  EXPECT_EQ(r.imin, -(n - 1));
  EXPECT_EQ(r.imax, n - 1);
  EXPECT_EQ(r.inc, static_cast<unsigned>(n % 10));
  EXPECT_LT(r.cas_winner, static_cast<unsigned>(n));
  EXPECT_EQ(__half2float(r.h), 256.0f);  // exact: 256 ones in half
  EXPECT_EQ(__bfloat162float(r.b), 256.0f);
}

TEST(SimtBasics, IntrinsicsMatchCudaDefinitions) {
  DeviceBuffer<float> f(12);
  DeviceBuffer<int> i(8);
  SIMT_CHECK(SMOE_LAUNCH(intrinsics_kernel, 1, 1, 0, nullptr, f.ptr, i.ptr));
  const auto hf = f.to_host();
  const auto hi = i.to_host();
  EXPECT_EQ(hf[0], 1.0f);
  EXPECT_EQ(hf[1], 0.0f);
  EXPECT_EQ(hf[2], 0.25f);
  EXPECT_EQ(hf[3], 0.25f);
  EXPECT_EQ(hf[4], 7.0f);
  EXPECT_EQ(hf[5], 0.0999755859375f);  // nearest half to 0.1
  EXPECT_EQ(hf[6], 0.10009765625f);    // nearest bfloat16 to 0.1
  EXPECT_EQ(hf[7], 1.0f);
  EXPECT_EQ(hf[8], -0.5f);
  EXPECT_EQ(hf[9], -2.0f);
  EXPECT_EQ(hf[10], 7.0f);
  EXPECT_EQ(hf[11], 10.0f);
  EXPECT_EQ(hi[0], 8);
  EXPECT_EQ(hi[1], 31);
  EXPECT_EQ(hi[2], 4);
  EXPECT_EQ(static_cast<unsigned>(hi[3]), 0x80000000u);
  EXPECT_EQ(hi[4], 10);
  EXPECT_EQ(hi[5], 2);
  EXPECT_EQ(static_cast<unsigned>(hi[6]), 0x44332211u);
  EXPECT_EQ(hi[7], 2);
}

TEST(SimtBasics, ConstantAndDeviceSymbols) {
  const float scale[4] = {1.0f, 2.0f, 3.0f, 4.0f};
  SIMT_CHECK(cudaMemcpyToSymbol(kScale, scale, sizeof(scale)));
  const int zero = 0;
  SIMT_CHECK(cudaMemcpyToSymbol(g_visits, &zero, sizeof(zero)));
  std::vector<float> in(8, 1.5f);
  DeviceBuffer<float> d_in(in), d_out(8);
  SIMT_CHECK(SMOE_LAUNCH(constant_kernel, 1, 8, 0, nullptr, d_in.ptr, d_out.ptr));
  const auto out = d_out.to_host();
  for (int t = 0; t < 8; ++t) EXPECT_EQ(out[t], 1.5f * scale[t % 4]);
  int visits = 0;
  SIMT_CHECK(cudaMemcpyFromSymbol(&visits, g_visits, sizeof(visits)));
  EXPECT_EQ(visits, 8);
  EXPECT_EQ(cudaMemcpyToSymbol(kScale, scale, sizeof(scale) + 4), cudaErrorInvalidValue);
  cudaGetLastError();
  int blocks = 0;
  SIMT_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, constant_kernel, 256, 0));
  EXPECT_EQ(blocks, 8);
}

TEST(SimtBasics, HalfAndBfloat16RoundToNearestEven) {
  // Every half value converts to float and back unchanged.
  for (uint32_t u = 0; u < 0x10000u; ++u) {
    const __half h = __ushort_as_half(static_cast<unsigned short>(u));
    const float f = __half2float(h);
    if (std::isnan(f)) continue;
    ASSERT_EQ(__half_as_ushort(__float2half(f)), u) << std::hex << u;
  }
  // Ties go to even: 1 + 2^-11 lies halfway between 1 and 1 + 2^-10.
  EXPECT_EQ(__half_as_ushort(__float2half(1.0f + 0x1p-11f)), 0x3c00);
  EXPECT_EQ(__half_as_ushort(__float2half(1.0f + 3 * 0x1p-11f)), 0x3c02);
  EXPECT_EQ(__half_as_ushort(__float2half(65520.0f)), 0x7c00);  // overflows to inf
  EXPECT_EQ(__half_as_ushort(__float2half(0x1p-25f)), 0x0000);  // tie with 0 -> even (0)
  EXPECT_EQ(__half_as_ushort(__float2half(0x1.8p-24f)), 0x0002);
  EXPECT_EQ(__bfloat16_as_ushort(__float2bfloat16(1.0f + 0x1p-8f)), 0x3f80);
  EXPECT_EQ(__bfloat16_as_ushort(__float2bfloat16(1.0f + 3 * 0x1p-8f)), 0x3f82);
  EXPECT_EQ(alignof(float4), 16u);
  EXPECT_EQ(alignof(float2), 8u);
  EXPECT_EQ(sizeof(float3), 12u);
  EXPECT_EQ(alignof(__half2), 4u);
}
#endif  // SMOE_SIMT

// SIMT emulator: the Hopper wrappers of smoe/simt/hopper.h (mbarrier, TMA with a tensor-map model,
// fence.proxy.async, wgmma m64nNk16 with 128B-swizzled shared-memory descriptors, setmaxnreg).
//
// wgmma is checked against a plain matrix product on integer-valued bf16/f16 inputs (exact in f32),
// under the standard schedules, and every misuse check is fired and its message matched. The
// layouts it relies on are those cited in hopper.h (PTX ISA 9.7.15.5.1 descriptor, swizzle and
// accumulator layouts; 9.7.13.15 mbarrier).
#include <cstdint>
#include <cstring>

#include "smoe/simt/hopper.h"
#include "smoe/simt/kernel.h"

namespace hop = smoe::simt;
using smoe::simt::sm90::acc_col;
using smoe::simt::sm90::acc_row;

constexpr int kTileBytesA = 64 * 128;  // 64 rows x 64 bf16 (128 B per row)

// One or two warpgroups (kGroups), each computing D[64 x N] = A[64 x K] * B[N x K]^T with a
// one-stage TMA + mbarrier pipeline over K tiles of 64 and four wgmma k16 slices per tile. A is
// M x K row-major (K-major), B is N x K row-major (K-major); warpgroup g uses A rows 64g...
template <int N, bool kBf16>
__device__ void wgmma_k16(float (&acc)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (N == 64) {
    if constexpr (kBf16)
      hop::wgmma_m64n64k16_bf16(acc, da, db, scale_d);
    else
      hop::wgmma_m64n64k16_f16(acc, da, db, scale_d);
  } else if constexpr (N == 128) {
    if constexpr (kBf16)
      hop::wgmma_m64n128k16_bf16(acc, da, db, scale_d);
    else
      hop::wgmma_m64n128k16_f16(acc, da, db, scale_d);
  } else {
    if constexpr (kBf16)
      hop::wgmma_m64n256k16_bf16(acc, da, db, scale_d);
    else
      hop::wgmma_m64n256k16_f16(acc, da, db, scale_d);
  }
}

template <bool kBf16, int N, int kGroups>
__global__ void wgmma_tma_kernel(const __grid_constant__ hop::TensorMap map_a,
                                 const __grid_constant__ hop::TensorMap map_b, int k_tiles, float* d, int ldd,
                                 int m_valid, int n_valid) {
  SMOE_DYNAMIC_SMEM(unsigned char, raw);
  // 1024-byte aligned operands: the 128-byte swizzle is a function of the address.
  unsigned char* smem =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~static_cast<uintptr_t>(1023));
  unsigned char* sa = smem;                          // kGroups A tiles
  unsigned char* sb = smem + kGroups * kTileBytesA;  // one B tile, N rows
  __shared__ __align__(8) uint64_t full;
  const int tid = static_cast<int>(threadIdx.x);
  const int group = tid / 128, warp = tid / 32, lane = tid % 32;
  if (tid == 0) {
    hop::mbarrier_init(&full, 1);
    hop::fence_mbarrier_init();
  }
  __syncthreads();
  float acc[N / 2];
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.0f;
  for (int kt = 0; kt < k_tiles; ++kt) {
    if (tid == 0) {
      hop::mbarrier_arrive_expect_tx(&full, (kGroups * 64 + N) * 128);
      for (int g = 0; g < kGroups; ++g) hop::tma_load_2d(sa + g * kTileBytesA, map_a, kt * 64, 64 * g, &full);
      hop::tma_load_2d(sb, map_b, kt * 64, 0, &full);
    }
    hop::mbarrier_wait_parity(&full, static_cast<uint32_t>(kt & 1));
    const uint64_t da = hop::wgmma_desc(sa + group * kTileBytesA, 16, 1024);
    const uint64_t db = hop::wgmma_desc(sb, 16, 1024);
    hop::wgmma_fence();
    for (int kk = 0; kk < 4; ++kk)  // +32 bytes per k16 slice = +2 in the address field
      wgmma_k16<N, kBf16>(acc, da + 2 * kk, db + 2 * kk, 1);
    hop::wgmma_commit_group();
    hop::wgmma_wait_group<0>();
    __syncthreads();  // every warpgroup is done reading before the next tile overwrites the stage
  }
  for (int i = 0; i < N / 2; ++i) {
    const int r = 64 * group + acc_row(warp, lane, i), c = acc_col(lane, i);
    if (r < m_valid && c < n_valid) d[r * ldd + c] = acc[i];
  }
}

// A written by ordinary (generic-proxy) stores, swizzled by hand, B by TMA; with_fence selects
// whether fence.proxy.async separates the stores from the wgmma.
__global__ void generic_store_kernel(const uint16_t* a, const __grid_constant__ hop::TensorMap map_b, float* d,
                                     int with_fence) {
  SMOE_DYNAMIC_SMEM(unsigned char, raw);
  unsigned char* smem =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~static_cast<uintptr_t>(1023));
  unsigned char* sa = smem;
  unsigned char* sb = smem + kTileBytesA;
  __shared__ __align__(8) uint64_t full;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  if (tid == 0) {
    hop::mbarrier_init(&full, 1);
    hop::fence_mbarrier_init();
  }
  for (int e = tid; e < 64 * 64; e += 128) {
    const int r = e / 64, k = e % 64;
    const uintptr_t at =
        smoe::simt::sm90::swizzle128(reinterpret_cast<uintptr_t>(sa) + smoe::simt::sm90::kmajor_offset(r, k, 1024));
    *reinterpret_cast<uint16_t*>(at) = a[e];
  }
  if (with_fence) hop::fence_proxy_async();
  __syncthreads();
  if (tid == 0) {
    hop::mbarrier_arrive_expect_tx(&full, 64 * 128);
    hop::tma_load_2d(sb, map_b, 0, 0, &full);
  }
  hop::mbarrier_wait_parity(&full, 0);
  float acc[32];
  hop::wgmma_fence();
  for (int kk = 0; kk < 4; ++kk)
    wgmma_k16<64, true>(acc, hop::wgmma_desc(sa, 16, 1024) + 2 * kk, hop::wgmma_desc(sb, 16, 1024) + 2 * kk, kk > 0);
  hop::wgmma_commit_group();
  hop::wgmma_wait_group<0>();
  for (int i = 0; i < 32; ++i) d[acc_row(warp, lane, i) * 64 + acc_col(lane, i)] = acc[i];
}

// wgmma issued by warps first_warp..first_warp+3 only (the others return at once).
__global__ void misaligned_warpgroup_kernel(int first_warp) {
  SMOE_DYNAMIC_SMEM(unsigned char, raw);
  unsigned char* smem =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~static_cast<uintptr_t>(1023));
  const int warp = static_cast<int>(threadIdx.x) / 32;
  if (warp < first_warp || warp >= first_warp + 4) return;
  float acc[32];
  for (int i = 0; i < 32; ++i) acc[i] = 0.0f;
  hop::fence_proxy_async();
  hop::wgmma_fence();
  wgmma_k16<64, true>(acc, hop::wgmma_desc(smem, 16, 1024), hop::wgmma_desc(smem, 16, 1024), 0);
  hop::wgmma_commit_group();
  hop::wgmma_wait_group<0>();
}

// wgmma without wgmma_fence before it.
__global__ void unfenced_wgmma_kernel() {
  SMOE_DYNAMIC_SMEM(unsigned char, raw);
  unsigned char* smem =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~static_cast<uintptr_t>(1023));
  float acc[32];
  wgmma_k16<64, true>(acc, hop::wgmma_desc(smem, 16, 1024), hop::wgmma_desc(smem, 16, 1024), 0);
}

// mbarrier misuse: mode 0 waits twice on one completed phase, 1 arrives with a count beyond the
// pending arrivals, 2 expects more tx bytes than the tx-count holds, 3 waits on an uninitialised
// barrier, 4 initialises with count 0. Mode 5 is correct use over three phases.
__global__ void mbarrier_kernel(int mode, int* out) {
  __shared__ __align__(8) uint64_t bar;
  if (threadIdx.x != 0) return;
  if (mode == 3) {
    hop::mbarrier_wait_parity(&bar, 0);
    return;
  }
  hop::mbarrier_init(&bar, mode == 4 ? 0 : 2);
  if (mode == 1) hop::mbarrier_arrive_count(&bar, 3);
  if (mode == 2) hop::mbarrier_arrive_expect_tx(&bar, 1u << 20);
  int polls = 0;
  for (int phase = 0; phase < 3; ++phase) {
    out[2 * phase] = hop::mbarrier_try_wait_parity(&bar, static_cast<uint32_t>(phase & 1));
    hop::mbarrier_arrive(&bar);
    out[2 * phase + 1] = hop::mbarrier_try_wait_parity(&bar, static_cast<uint32_t>(phase & 1));
    hop::mbarrier_arrive(&bar);
    hop::mbarrier_wait_parity(&bar, static_cast<uint32_t>(phase & 1));
    ++polls;
    if (mode == 0) hop::mbarrier_wait_parity(&bar, static_cast<uint32_t>(phase & 1));
  }
  out[6] = polls;
}

// setmaxnreg: mode 0 uniform (fine), 1 warp 1 passes another count than its warpgroup, 2 an
// invalid count.
__global__ void setmaxnreg_kernel(int mode) {
  const int warp = static_cast<int>(threadIdx.x) / 32;
  if (mode == 2) {
#if SMOE_SIMT  // ptxas rejects the count itself, as it should
    hop::setmaxnreg_dec<36>();
#endif
  } else if (mode == 1 && warp == 1) {
    hop::setmaxnreg_dec<48>();
  } else {
    hop::setmaxnreg_dec<40>();
  }
}

#if SMOE_SIMT
#include <vector>

#include "simt_test.h"

namespace {
using smoe::simt::Schedule;
using smoe::simt::sm90::Swizzle;
using namespace smoe::simt::test;

uint16_t to16(float f, bool bf16) {
  return bf16 ? smoe::simt::detail::float_to_bf16_rn(f) : smoe::simt::detail::float_to_half_rn(f);
}

struct Problem {
  int m, n, k;
  std::vector<uint16_t> a, b;  // a: m x k, b: n x k (row-major)
  std::vector<float> ref;      // m x n
};
Problem make_problem(int m, int n, int k, bool bf16, uint32_t seed) {
  Problem p{m, n, k, {}, {}, {}};
  uint32_t s = seed;
  auto next = [&] {
    s = s * 1664525u + 1013904223u;
    return static_cast<int>(s >> 28) - 8;
  };  // -8..7
  std::vector<float> fa(static_cast<size_t>(m) * k), fb(static_cast<size_t>(n) * k);
  for (auto& v : fa) v = static_cast<float>(next());
  for (auto& v : fb) v = static_cast<float>(next());
  for (float v : fa) p.a.push_back(to16(v, bf16));
  for (float v : fb) p.b.push_back(to16(v, bf16));
  p.ref.assign(static_cast<size_t>(m) * n, 0.0f);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double acc = 0;
      for (int kk = 0; kk < k; ++kk) acc += double{fa[i * k + kk]} * fb[j * k + kk];
      p.ref[i * n + j] = static_cast<float>(acc);
    }
  return p;
}

template <bool kBf16, int N, int kGroups>
std::vector<float> run_wgmma(const Problem& p) {
  DeviceBuffer<uint16_t> a(p.a), b(p.b);
  DeviceBuffer<float> d(static_cast<size_t>(p.m) * p.n);
  const int k_tiles = (p.k + 63) / 64;
  // Row strides must be multiples of 16 bytes: pad K for the global copies.
  const char* problem = nullptr;
  auto map_a = hop::make_tensor_map_2d(a.ptr, 2, p.k, p.m, p.k * 2, 64, 64, Swizzle::k128B, &problem);
  EXPECT_EQ(problem, nullptr) << problem;
  auto map_b = hop::make_tensor_map_2d(b.ptr, 2, p.k, p.n, p.k * 2, 64, N, Swizzle::k128B, &problem);
  EXPECT_EQ(problem, nullptr) << problem;
  const size_t smem = 1024 + kGroups * kTileBytesA + N * 128;
  auto kernel = wgmma_tma_kernel<kBf16, N, kGroups>;
  EXPECT_EQ(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
            cudaSuccess);
  EXPECT_EQ(SMOE_LAUNCH(kernel, 1, 128 * kGroups, smem, nullptr, map_a, map_b, k_tiles, d.ptr, p.n, p.m, p.n),
            cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return d.to_host();
}

const Schedule kSchedules[] = {Schedule::kForward, Schedule::kReverse, Schedule::kRandom};

template <bool kBf16, int N, int kGroups>
void check_wgmma(int m, int n, int k) {
  const Problem p = make_problem(m, n, k, kBf16, 17u + static_cast<uint32_t>(N + k));
  std::vector<float> first;
  for (Schedule s : kSchedules) {
    ScopedOptions o(with_schedule(s, 5));
    const std::vector<float> got = run_wgmma<kBf16, N, kGroups>(p);
    ASSERT_EQ(got.size(), p.ref.size());
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_EQ(got[i], p.ref[i]) << "element " << i << " (row " << i / n << ", col " << i % n << ")";
    if (first.empty()) first = got;
    EXPECT_EQ(std::memcmp(first.data(), got.data(), got.size() * 4), 0);
  }
}

TEST(SimtHopper, DescriptorAndLayoutHelpersFollowPtxIsa) {
  using namespace smoe::simt::sm90;
  const uint64_t d = make_desc(0x12340, 16, 1024, Swizzle::k128B);
  EXPECT_EQ(d & 0x3FFF, 0x1234u);      // bits 13..0: address >> 4
  EXPECT_EQ((d >> 16) & 0x3FFF, 1u);   // bits 29..16: LBO >> 4
  EXPECT_EQ((d >> 32) & 0x3FFF, 64u);  // bits 45..32: SBO >> 4
  EXPECT_EQ(d >> 62, 1u);              // bits 63..62: 1 = 128-byte swizzle
  EXPECT_EQ(desc_addr(d), 0x12340u);
  EXPECT_EQ(desc_sbo(d), 1024u);
  // 128B swizzle: chunk (bits 6..4) ^= row in atom (bits 9..7).
  EXPECT_EQ(swizzle128(0x000), 0x000u);
  EXPECT_EQ(swizzle128(0x080), 0x090u);  // row 1, chunk 0 -> chunk 1
  EXPECT_EQ(swizzle128(0x3F0), 0x380u);  // row 7, chunk 7 -> chunk 0
  EXPECT_EQ(swizzle128(0x400 + 0x85), 0x495u);
  // Accumulator: each (row, col) of the 64 x N tile is owned by exactly one (thread, register).
  for (int n : {64, 128, 256}) {
    std::vector<int> owner(static_cast<size_t>(64 * n), 0);
    for (int t = 0; t < 128; ++t)
      for (int i = 0; i < n / 2; ++i) ++owner[static_cast<size_t>(acc_row(t / 32, t % 32, i) * n + acc_col(t % 32, i))];
    for (int c : owner) ASSERT_EQ(c, 1);
  }
  EXPECT_EQ(acc_row(1, 5, 2), 16 + 1 + 8);  // warp 1, lane 5: groupID 1; register 2: +8 rows
  EXPECT_EQ(acc_col(5, 5), 8 + 2 + 1);      // register 5: second n8 block, tig 1, odd
}

TEST(SimtHopper, WgmmaBf16N64MatchesMatrixProduct) { check_wgmma<true, 64, 1>(64, 64, 64); }
TEST(SimtHopper, WgmmaF16N128TwoKTilesMatchesMatrixProduct) { check_wgmma<false, 128, 1>(64, 128, 128); }
TEST(SimtHopper, WgmmaBf16N256MatchesMatrixProduct) { check_wgmma<true, 256, 1>(64, 256, 64); }
TEST(SimtHopper, WgmmaTwoWarpgroupsRaggedTmaZeroFill) {
  // M = 100 of 128 rows, N = 72 of 128, K = 88 (two K tiles, the second 24 wide): the TMA box
  // reads past the tensor and zero-fills, which must not change the product.
  check_wgmma<true, 128, 2>(100, 72, 88);
}

TEST(SimtHopper, WgmmaOperandWrittenByStoresNeedsFenceProxyAsync) {
  const Problem p = make_problem(64, 64, 64, true, 3);
  DeviceBuffer<uint16_t> a(p.a), b(p.b);
  DeviceBuffer<float> d(64 * 64);
  auto map_b = hop::make_tensor_map_2d(b.ptr, 2, 64, 64, 128, 64, 64, Swizzle::k128B);
  const size_t smem = 1024 + 2 * kTileBytesA;
  SIMT_CHECK(SMOE_LAUNCH(generic_store_kernel, 1, 128, smem, nullptr, a.ptr, map_b, d.ptr, 1));
  SIMT_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(d.to_host(), p.ref);
  const std::string err = expect_kernel_error(
      [&] { return SMOE_LAUNCH(generic_store_kernel, 1, 128, smem, nullptr, a.ptr, map_b, d.ptr, 0); });
  EXPECT_CONTAINS(err, "no fence.proxy.async before the wgmma");
  EXPECT_CONTAINS(err, "test_hopper.cu:");
}

TEST(SimtHopper, WarpgroupMustStartAtWarpDivisibleByFour) {
  const size_t smem = 1024 + 2 * kTileBytesA;
  // Warps 1..4 of a 5-warp block: warp 4's warpgroup (4..7) does not exist.
  std::string err =
      expect_kernel_error([&] { return SMOE_LAUNCH(misaligned_warpgroup_kernel, 1, 160, smem, nullptr, 1); });
  EXPECT_CONTAINS(err, "first warp index is divisible by 4");
  // Warps 2..5 of an 8-warp block: warps 0, 1, 6, 7 never issue.
  err = expect_kernel_error([&] { return SMOE_LAUNCH(misaligned_warpgroup_kernel, 1, 256, smem, nullptr, 2); });
  EXPECT_CONTAINS(err, "issued 0 of the 1 wgmma.mma_async");
  EXPECT_CONTAINS(err, "test_hopper.cu:");
  err = expect_kernel_error([&] { return SMOE_LAUNCH(unfenced_wgmma_kernel, 1, 128, smem, nullptr); });
  EXPECT_CONTAINS(err, "no wgmma_fence()");
}

TEST(SimtHopper, MbarrierPhasesAndMisuse) {
  DeviceBuffer<int> out(7);
  SIMT_CHECK(SMOE_LAUNCH(mbarrier_kernel, 1, 32, 0, nullptr, 5, out.ptr));
  SIMT_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(out.to_host(), (std::vector<int>{0, 0, 0, 0, 0, 0, 3}));
  const struct {
    int mode;
    const char* message;
  } cases[] = {
      {0, "was already waited for by this thread"},
      {1, "arrive count 3 overflows the 2 arrivals still pending in phase 0"},
      {2, "tx-count 1048576 of phase 0 outside"},
      {3, "was not initialised by mbarrier_init"},
      {4, "expected arrival count 0 outside [1, 1048575]"},
  };
  for (const auto& c : cases) {
    const std::string err =
        expect_kernel_error([&] { return SMOE_LAUNCH(mbarrier_kernel, 1, 32, 0, nullptr, c.mode, out.ptr); });
    EXPECT_CONTAINS(err, c.message);
    EXPECT_CONTAINS(err, "test_hopper.cu:");
  }
}

TEST(SimtHopper, SetmaxnregRules) {
  SIMT_CHECK(SMOE_LAUNCH(setmaxnreg_kernel, 1, 256, 0, nullptr, 0));
  SIMT_CHECK(cudaDeviceSynchronize());
  std::string err = expect_kernel_error([&] { return SMOE_LAUNCH(setmaxnreg_kernel, 1, 256, 0, nullptr, 1); });
  EXPECT_CONTAINS(err, "must be warpgroup-uniform");
  err = expect_kernel_error([&] { return SMOE_LAUNCH(setmaxnreg_kernel, 1, 128, 0, nullptr, 2); });
  EXPECT_CONTAINS(err, "register count 36 is not a multiple of 8");
  err = expect_kernel_error([&] { return SMOE_LAUNCH(setmaxnreg_kernel, 1, 96, 0, nullptr, 0); });
  EXPECT_CONTAINS(err, "does not fill");
}

TEST(SimtHopper, TensorMapModelRejectsWhatTheDriverRejects) {
  alignas(16) static uint16_t buf[64 * 64];
  const char* problem = nullptr;
  hop::make_tensor_map_2d(buf, 2, 64, 64, 100, 64, 64, Swizzle::k128B, &problem);
  EXPECT_CONTAINS(problem, "multiple of 16 bytes");
  hop::make_tensor_map_2d(buf, 2, 128, 64, 256, 128, 8, Swizzle::k128B, &problem);
  EXPECT_CONTAINS(problem, "at most 128 bytes");
  hop::make_tensor_map_2d(buf, 2, 64, 64, 128, 64, 512, Swizzle::k128B, &problem);
  EXPECT_CONTAINS(problem, "[1, 256]");
  hop::make_tensor_map_2d(buf, 2, 64, 64, 128, 64, 64, Swizzle::k128B, &problem);
  EXPECT_EQ(problem, nullptr);
}

}  // namespace
#endif  // SMOE_SIMT

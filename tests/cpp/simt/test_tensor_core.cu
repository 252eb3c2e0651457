// SIMT emulator: the tensor-core wrappers (mma.m16n8k16, ldmatrix, cp.async).
//
// The fragment layouts are checked element by element against the PTX ISA, section 9.7.14.5.8
// ("Matrix Fragments for mma.m16n8k16 with floating point type": Figure 79 for A, the figures for
// B and C/D that follow) and section 9.7.14.5.15 (ldmatrix), and the emulated mma against a plain
// matrix product for random fragments.
#include <cstdint>
#include <cstring>

#include "smoe/simt/kernel.h"

using smoe::simt::frag::a_col;
using smoe::simt::frag::a_row;
using smoe::simt::frag::b_col;
using smoe::simt::frag::b_row;
using smoe::simt::frag::c_col;
using smoe::simt::frag::c_row;

template <class T>
__device__ uint32_t pack2(T lo, T hi) {
  uint16_t l, h;
  memcpy(&l, &lo, 2);
  memcpy(&h, &hi, 2);
  return static_cast<uint32_t>(l) | static_cast<uint32_t>(h) << 16;
}

// One warp: D[16][8] = A[16][16] * B[16][8] + C[16][8]; fragments gathered with the frag helpers.
template <class T, bool kBf16>
__global__ void mma_kernel(const T* a, const T* b, const float* c, float* d) {
  const int lane = static_cast<int>(threadIdx.x);
  uint32_t fa[4], fb[2];
  float fc[4], fd[4];
  for (int r = 0; r < 4; ++r)
    fa[r] =
        pack2(a[a_row(lane, 2 * r) * 16 + a_col(lane, 2 * r)], a[a_row(lane, 2 * r + 1) * 16 + a_col(lane, 2 * r + 1)]);
  for (int r = 0; r < 2; ++r)
    fb[r] =
        pack2(b[b_row(lane, 2 * r) * 8 + b_col(lane, 2 * r)], b[b_row(lane, 2 * r + 1) * 8 + b_col(lane, 2 * r + 1)]);
  for (int i = 0; i < 4; ++i) fc[i] = c[c_row(lane, i) * 8 + c_col(lane, i)];
  if (kBf16)
    smoe::simt::mma_m16n8k16_bf16(fd, fa, fb, fc);
  else
    smoe::simt::mma_m16n8k16_f16(fd, fa, fb, fc);
  for (int i = 0; i < 4; ++i) d[c_row(lane, i) * 8 + c_col(lane, i)] = fd[i];
}

template __global__ void mma_kernel<__nv_bfloat16, true>(const __nv_bfloat16*, const __nv_bfloat16*, const float*,
                                                         float*);
template __global__ void mma_kernel<__half, false>(const __half*, const __half*, const float*, float*);

// The same product with operands staged in shared memory and loaded with ldmatrix: A with .x4
// (lane l points at row l % 16, column block l / 16), B (stored K x N, row-major) with .x2.trans.
__global__ void ldmatrix_mma_kernel(const __nv_bfloat16* a, const __nv_bfloat16* b, float* d) {
  __shared__ __align__(16) __nv_bfloat16 sa[16 * 16];
  __shared__ __align__(16) __nv_bfloat16 sb[16 * 8];
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < 256; i += 32) sa[i] = a[i];
  for (int i = lane; i < 128; i += 32) sb[i] = b[i];
  __syncwarp();
  uint32_t fa[4], fb[2];
  smoe::simt::ldmatrix_x4(fa, sa + (lane % 16) * 16 + (lane / 16) * 8);
  smoe::simt::ldmatrix_x2_trans(fb, sb + (lane % 16) * 8);
  float fc[4] = {0, 0, 0, 0}, fd[4];
  smoe::simt::mma_m16n8k16_bf16(fd, fa, fb, fc);
  for (int i = 0; i < 4; ++i) d[c_row(lane, i) * 8 + c_col(lane, i)] = fd[i];
}

// Raw ldmatrix registers: four 8x8 matrices of uint16 (matrix j, row r at m + (8j + r) * 8).
__global__ void ldmatrix_kernel(const uint16_t* m, uint32_t* out) {
  __shared__ __align__(16) uint16_t s[4 * 64];
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < 256; i += 32) s[i] = m[i];
  __syncwarp();
  const uint16_t* row = s + lane * 8;
  uint32_t r1[1], r2[2], r4[4], t1[1], t2[2], t4[4];
  smoe::simt::ldmatrix_x1(r1, row);
  smoe::simt::ldmatrix_x2(r2, row);
  smoe::simt::ldmatrix_x4(r4, row);
  smoe::simt::ldmatrix_x1_trans(t1, row);
  smoe::simt::ldmatrix_x2_trans(t2, row);
  smoe::simt::ldmatrix_x4_trans(t4, row);
  uint32_t* o = out + lane * 14;
  o[0] = r1[0];
  o[1] = r2[0];
  o[2] = r2[1];
  for (int j = 0; j < 4; ++j) o[3 + j] = r4[j];
  o[7] = t1[0];
  o[8] = t2[0];
  o[9] = t2[1];
  for (int j = 0; j < 4; ++j) o[10 + j] = t4[j];
}

// cp.async: group 0 = one 16-byte copy per thread, group 1 = an 8-byte and a 4-byte copy, then a
// zero-filling copy of 4 source bytes left uncommitted. snap[] records shared memory before and
// after each wait.
__global__ void cp_async_kernel(const float* src, float* snap) {
  __shared__ __align__(16) float s[4 * 32 + 4 * 32];
  const int t = static_cast<int>(threadIdx.x);
  smoe::simt::cp_async_16(s + 4 * t, src + 4 * t);
  smoe::simt::cp_async_commit();
  smoe::simt::cp_async_8(s + 128 + 4 * t, src + 128 + 4 * t);
  smoe::simt::cp_async_4(s + 128 + 4 * t + 2, src + 128 + 4 * t + 2);
  smoe::simt::cp_async_commit();
  snap[0 * 256 + t] = s[4 * t];
  snap[0 * 256 + 128 + t] = s[128 + 4 * t];
  smoe::simt::cp_async_wait<1>();
  snap[1 * 256 + t] = s[4 * t];
  snap[1 * 256 + 128 + t] = s[128 + 4 * t];
  smoe::simt::cp_async_wait<0>();
  snap[2 * 256 + t] = s[128 + 4 * t + 2];
  smoe::simt::cp_async_16_zfill(s + 4 * t, src + 4 * t, 4);
  smoe::simt::cp_async_wait_all();
  snap[3 * 256 + t] = s[4 * t] + s[4 * t + 1] + s[4 * t + 2] + s[4 * t + 3];
}

// mma.m16n8k8.tf32: lane (g, t) = (lane / 4, lane % 4) holds A (g, t), (g+8, t), (g, t+4), (g+8, t+4)
// and B (t, g), (t+4, g) of row-major A [16][8], B [8][8]; D is stored back through the C layout.
__global__ void mma_tf32_kernel(const float* a, const float* b, float* d) {
  const int lane = static_cast<int>(threadIdx.x), g = lane >> 2, t = lane & 3;
  const uint32_t af[4] = {__float_as_uint(a[g * 8 + t]), __float_as_uint(a[(g + 8) * 8 + t]),
                          __float_as_uint(a[g * 8 + t + 4]), __float_as_uint(a[(g + 8) * 8 + t + 4])};
  const uint32_t bf[2] = {__float_as_uint(b[t * 8 + g]), __float_as_uint(b[(t + 4) * 8 + g])};
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  smoe::simt::mma_m16n8k8_tf32(acc, af, bf, acc);
  for (int i = 0; i < 4; ++i) d[smoe::simt::frag::c_row(lane, i) * 8 + smoe::simt::frag::c_col(lane, i)] = acc[i];
}

#if defined(SMOE_SIMT) && SMOE_SIMT
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "simt_test.h"

using smoe::simt::test::DeviceBuffer;

// The PTX ISA's figures, transcribed as (lane -> elements) tables rather than formulas: in
// Figure 79 the lanes T0..T3 of group g own row g (and g + 8) and, per thread t, the column pair
// 2t, 2t+1 (and 2t + 8, 2t + 9); registers list a0..a7 as (r g, c 2t), (r g, c 2t+1),
// (r g+8, c 2t), (r g+8, c 2t+1), (r g, c 2t+8), (r g, c 2t+9), (r g+8, c 2t+8), (r g+8, c 2t+9).
TEST(SimtTensorCore, FragmentLayoutsMatchPtxIsaTables) {
  struct RC {
    int r, c;
  };
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    const RC a[8] = {{g, 2 * t},     {g, 2 * t + 1}, {g + 8, 2 * t},     {g + 8, 2 * t + 1},
                     {g, 2 * t + 8}, {g, 2 * t + 9}, {g + 8, 2 * t + 8}, {g + 8, 2 * t + 9}};
    for (int i = 0; i < 8; ++i) {
      EXPECT_EQ(a_row(lane, i), a[i].r) << "A lane " << lane << " a" << i;
      EXPECT_EQ(a_col(lane, i), a[i].c) << "A lane " << lane << " a" << i;
    }
    // B (16x8, K x N): b0, b1 at rows 2t, 2t+1 and b2, b3 at rows 2t+8, 2t+9, all in column g.
    const RC b[4] = {{2 * t, g}, {2 * t + 1, g}, {2 * t + 8, g}, {2 * t + 9, g}};
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(b_row(lane, i), b[i].r) << "B lane " << lane << " b" << i;
      EXPECT_EQ(b_col(lane, i), b[i].c) << "B lane " << lane << " b" << i;
    }
    // C/D (16x8 f32): c0, c1 at row g, c2, c3 at row g + 8, columns 2t and 2t+1.
    const RC c[4] = {{g, 2 * t}, {g, 2 * t + 1}, {g + 8, 2 * t}, {g + 8, 2 * t + 1}};
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(c_row(lane, i), c[i].r) << "C lane " << lane << " c" << i;
      EXPECT_EQ(c_col(lane, i), c[i].c) << "C lane " << lane << " c" << i;
    }
  }
  // Spot values read off the figures: T0 holds a0 = A[0][0], a2 = A[8][0], a4 = A[0][8];
  // T5 holds a1 = A[1][3] and a7 = A[9][11]; T31 holds b3 = B[15][7] and c3 = C[15][7].
  EXPECT_EQ(a_row(0, 2) * 16 + a_col(0, 2), 8 * 16 + 0);
  EXPECT_EQ(a_row(0, 4) * 16 + a_col(0, 4), 0 * 16 + 8);
  EXPECT_EQ(a_row(5, 1) * 16 + a_col(5, 1), 1 * 16 + 3);
  EXPECT_EQ(a_row(5, 7) * 16 + a_col(5, 7), 9 * 16 + 11);
  EXPECT_EQ(b_row(31, 3) * 8 + b_col(31, 3), 15 * 8 + 7);
  EXPECT_EQ(c_row(31, 3) * 8 + c_col(31, 3), 15 * 8 + 7);
}

namespace {

template <class T>
T to16(float f);
template <>
__nv_bfloat16 to16<__nv_bfloat16>(float f) {
  return __float2bfloat16(f);
}
template <>
__half to16<__half>(float f) {
  return __float2half(f);
}

template <class T, bool kBf16>
void check_mma(bool small_integers, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> small(-8, 8);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto draw = [&] { return small_integers ? static_cast<float>(small(rng)) : normal(rng); };
  std::vector<T> a(256), b(128);
  std::vector<float> c(128);
  for (auto& x : a) x = to16<T>(draw());
  for (auto& x : b) x = to16<T>(draw());
  for (auto& x : c) x = draw();
  DeviceBuffer<T> da(a), db(b);
  DeviceBuffer<float> dc(c), dd(128);
  SIMT_CHECK(SMOE_LAUNCH((mma_kernel<T, kBf16>), 1, 32, 0, nullptr, da.ptr, db.ptr, dc.ptr, dd.ptr));
  const auto d = dd.to_host();
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 8; ++j) {
      double ref = c[i * 8 + j];
      for (int k = 0; k < 16; ++k)
        ref += static_cast<double>(static_cast<float>(a[i * 16 + k])) * static_cast<float>(b[k * 8 + j]);
      if (small_integers)
        ASSERT_EQ(d[i * 8 + j], static_cast<float>(ref)) << i << "," << j;
      else
        ASSERT_NEAR(d[i * 8 + j], ref, 1e-5 * (1 + std::fabs(ref))) << i << "," << j;
    }
  }
}

}  // namespace

TEST(SimtTensorCore, MmaBf16AndF16MatchPlainMatrixProduct) {
  for (uint32_t seed = 1; seed <= 5; ++seed) {
    check_mma<__nv_bfloat16, true>(true, seed);
    check_mma<__nv_bfloat16, true>(false, seed);
    check_mma<__half, false>(true, seed);
    check_mma<__half, false>(false, seed);
  }
}

TEST(SimtTensorCore, LdmatrixFeedsMma) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> small(-4, 4);
  std::vector<__nv_bfloat16> a(256), b(128);
  for (auto& x : a) x = __float2bfloat16(static_cast<float>(small(rng)));
  for (auto& x : b) x = __float2bfloat16(static_cast<float>(small(rng)));
  DeviceBuffer<__nv_bfloat16> da(a), db(b);
  DeviceBuffer<float> dd(128);
  SIMT_CHECK(SMOE_LAUNCH(ldmatrix_mma_kernel, 1, 32, 0, nullptr, da.ptr, db.ptr, dd.ptr));
  const auto d = dd.to_host();
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      float ref = 0;
      for (int k = 0; k < 16; ++k) ref += float(a[i * 16 + k]) * float(b[k * 8 + j]);
      ASSERT_EQ(d[i * 8 + j], ref) << i << "," << j;
    }
}

TEST(SimtTensorCore, LdmatrixRegistersMatchPtxIsaLayout) {
  std::vector<uint16_t> m(256);
  for (int i = 0; i < 256; ++i) m[i] = static_cast<uint16_t>(i);  // matrix j, row r, col c = 64j+8r+c
  DeviceBuffer<uint16_t> dm(m);
  DeviceBuffer<uint32_t> dout(32 * 14);
  SIMT_CHECK(SMOE_LAUNCH(ldmatrix_kernel, 1, 32, 0, nullptr, dm.ptr, dout.ptr));
  const auto out = dout.to_host();
  // Section 9.7.14.5.15: without .trans lane l holds row l/4, columns 2(l%4) and 2(l%4)+1 of each
  // matrix; with .trans it holds rows 2(l%4) and 2(l%4)+1 of column l/4.
  auto plain = [](int j, int lane) {
    const int r = lane / 4, c = 2 * (lane % 4);
    return static_cast<uint32_t>(64 * j + 8 * r + c) | static_cast<uint32_t>(64 * j + 8 * r + c + 1) << 16;
  };
  auto trans = [](int j, int lane) {
    const int r = 2 * (lane % 4), c = lane / 4;
    return static_cast<uint32_t>(64 * j + 8 * r + c) | static_cast<uint32_t>(64 * j + 8 * (r + 1) + c) << 16;
  };
  for (int lane = 0; lane < 32; ++lane) {
    const uint32_t* o = &out[lane * 14];
    EXPECT_EQ(o[0], plain(0, lane));
    EXPECT_EQ(o[1], plain(0, lane));
    EXPECT_EQ(o[2], plain(1, lane));
    for (int j = 0; j < 4; ++j) EXPECT_EQ(o[3 + j], plain(j, lane)) << lane << " x4 " << j;
    EXPECT_EQ(o[7], trans(0, lane));
    EXPECT_EQ(o[8], trans(0, lane));
    EXPECT_EQ(o[9], trans(1, lane));
    for (int j = 0; j < 4; ++j) EXPECT_EQ(o[10 + j], trans(j, lane)) << lane << " x4.trans " << j;
  }
  EXPECT_EQ(out[5 * 14 + 0], 10u | 11u << 16);  // T5: row 1, cols 2-3
  EXPECT_EQ(out[5 * 14 + 7], 17u | 25u << 16);  // T5 .trans: rows 2-3, col 1
}

TEST(SimtTensorCore, CpAsyncLandsOnlyAtTheWait) {
  std::vector<float> src(256);
  for (int i = 0; i < 256; ++i) src[i] = static_cast<float>(i + 1);
  DeviceBuffer<float> dsrc(src), snap(4 * 256);
  SIMT_CHECK(SMOE_LAUNCH(cp_async_kernel, 1, 32, 0, nullptr, dsrc.ptr, snap.ptr));
  const auto h = snap.to_host();
  using smoe::simt::test::is_poison;
  for (int t = 0; t < 32; ++t) {
    EXPECT_TRUE(is_poison(h[0 * 256 + t])) << "group 0 landed before the wait";
    EXPECT_TRUE(is_poison(h[0 * 256 + 128 + t]));
    EXPECT_EQ(h[1 * 256 + t], src[4 * t]) << "wait_group 1 retires group 0";
    EXPECT_TRUE(is_poison(h[1 * 256 + 128 + t])) << "group 1 still pending";
    EXPECT_EQ(h[2 * 256 + t], src[128 + 4 * t + 2]);
    EXPECT_EQ(h[3 * 256 + t], src[4 * t]) << "zfill keeps 4 source bytes, zeros the other 12";
  }
}

TEST(SimtTensorCore, CpAsyncLandingModes) {
  using smoe::simt::CpAsyncLanding;
  CpAsyncLanding l = CpAsyncLanding::kWait;
  uint64_t seed = 0;
  EXPECT_TRUE(smoe::simt::parse_cp_async_landing("issue", &l, &seed));
  EXPECT_EQ(l, CpAsyncLanding::kIssue);
  EXPECT_TRUE(smoe::simt::parse_cp_async_landing("random:9", &l, &seed));
  EXPECT_EQ(l, CpAsyncLanding::kRandom);
  EXPECT_EQ(seed, 9u);
  EXPECT_TRUE(smoe::simt::parse_cp_async_landing("wait", &l, &seed));
  EXPECT_EQ(l, CpAsyncLanding::kWait);
  EXPECT_FALSE(smoe::simt::parse_cp_async_landing("early", &l, &seed));

  std::vector<float> src(256);
  for (int i = 0; i < 256; ++i) src[i] = static_cast<float>(i + 1);
  using smoe::simt::test::is_poison;
  auto run = [&](CpAsyncLanding landing, uint64_t s) -> std::vector<float> {
    smoe::simt::Options o = smoe::simt::options();
    o.cp_async_landing = landing;
    o.cp_async_seed = s;
    smoe::simt::test::ScopedOptions scope(o);
    DeviceBuffer<float> dsrc(src), snap(4 * 256);
    EXPECT_EQ(SMOE_LAUNCH(cp_async_kernel, 1, 32, 0, nullptr, dsrc.ptr, snap.ptr), cudaSuccess);
    return snap.to_host();
  };
  // At issue: group 0 is in shared memory before any wait.
  const auto at_issue = run(CpAsyncLanding::kIssue, 0);
  for (int t = 0; t < 32; ++t) EXPECT_EQ(at_issue[t], src[4 * t]) << "issue mode: lane " << t;
  // Random: before the wait each copy has landed or not (never anything else); after it, always.
  int early = 0, late = 0;
  for (uint64_t s = 0; s < 8; ++s) {
    const auto h = run(CpAsyncLanding::kRandom, s);
    for (int t = 0; t < 32; ++t) {
      ASSERT_TRUE(is_poison(h[t]) || h[t] == src[4 * t]) << "seed " << s << " lane " << t;
      (is_poison(h[t]) ? late : early) += 1;
      EXPECT_EQ(h[1 * 256 + t], src[4 * t]) << "wait_group 1 retires group 0 whatever the landing";
      EXPECT_EQ(h[2 * 256 + t], src[128 + 4 * t + 2]);
      EXPECT_EQ(h[3 * 256 + t], src[4 * t]);
    }
  }
  EXPECT_GT(early, 0) << "random landing never landed a copy before its wait";
  EXPECT_GT(late, 0) << "random landing always landed before the wait";
}

TEST(SimtTensorCore, Tf32RoundingAndMma) {
  using smoe::simt::cvt_rna_tf32;
  auto f = [](uint32_t u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
  };
  // cvt.rna.tf32.f32: 10 mantissa bits kept, round to nearest, ties away from zero.
  EXPECT_EQ(cvt_rna_tf32(1.0f), 0x3f800000u);
  EXPECT_EQ(cvt_rna_tf32(f(0x3f800fffu)), 0x3f800000u);  // below half an ulp: down
  EXPECT_EQ(cvt_rna_tf32(f(0x3f801000u)), 0x3f802000u);  // exactly half: away from zero
  EXPECT_EQ(cvt_rna_tf32(f(0xbf801000u)), 0xbf802000u);  // negative tie: away from zero too
  EXPECT_EQ(cvt_rna_tf32(f(0x3f803000u)), 0x3f804000u);
  EXPECT_EQ(cvt_rna_tf32(f(0x7f800000u)), 0x7f800000u);  // inf stays
  // mma: the product of tf32 values (the low 13 bits of each operand are not used).
  std::vector<float> a(16 * 8), b(8 * 8);
  for (int i = 0; i < 128; ++i) a[i] = f(0x3f800000u + (uint32_t(i % 7) << 13) + (i % 3 == 0 ? 0x7ffu : 0u));
  for (int i = 0; i < 64; ++i) b[i] = (i % 5) * 0.25f - 0.5f;
  DeviceBuffer<float> da(a), db(b), dd(16 * 8);
  SIMT_CHECK(SMOE_LAUNCH(mma_tf32_kernel, 1, 32, 0, nullptr, da.ptr, db.ptr, dd.ptr));
  const auto d = dd.to_host();
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 8; ++c) {
      double want = 0;
      for (int k = 0; k < 8; ++k) {
        uint32_t u;
        std::memcpy(&u, &a[r * 8 + k], 4);
        want += double(f(u & 0xffffe000u)) * b[k * 8 + c];
      }
      EXPECT_EQ(d[r * 8 + c], static_cast<float>(want)) << r << "," << c;
    }
  }
}
#endif  // SMOE_SIMT

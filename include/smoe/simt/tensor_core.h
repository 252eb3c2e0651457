// smoe tensor-core wrappers: the only place where kernels reach inline PTX. Each wrapper has a
// real PTX body under nvcc and an emulated twin under the SIMT emulator (SMOE_SIMT).
//
//   mma_m16n8k16_bf16(d, a, b, c)   d = A(16x16, row) * B(16x8, col) + c, bf16 in, f32 accumulate
//   mma_m16n8k16_f16(d, a, b, c)    same with f16 inputs
//   mma_m16n8k8_tf32(d, a, b, c)    d = A(16x8) * B(8x8) + c, tf32 in (f32 registers), f32 accumulate
//   cvt_rna_tf32(x)                 f32 -> tf32 bits, round to nearest, ties away (cvt.rna.tf32.f32)
//   ldmatrix_x1/x2/x4(r, row_ptr)   and *_trans: load 1, 2 or 4 8x8 b16 matrices from shared
//   cp_async_4/8/16(dst, src)       asynchronous global -> shared copies; cp_async_16_zfill copies
//                                   src_bytes (0..16) and zero-fills the rest
//   cp_async_commit(); cp_async_wait<N>(); cp_async_wait_all();
//
// Fragment layouts are those of the PTX ISA (version 8.x/9.x), section 9.7.14.5.8 "Matrix Fragments
// for mma.m16n8k16 with floating point type" (Figure 79 for A, the B and C/D figures that follow)
// and section 9.7.14.5.15 "Warp-level matrix load instruction: ldmatrix". The helpers in
// smoe::simt::frag spell them out; the emulation and the tests both use them.
//
// Emulation notes: mma and ldmatrix are warp collectives over all 32 lanes (a missing or exited
// lane is an error). mma computes each output as the float rounding of c + sum(a*b) evaluated in
// double; hardware accumulates in an unspecified order, so results can differ in the last bit
// for inputs that are not small integers. cp.async copies are queued per thread and land (read
// the source and write the destination) only when cp_async_wait retires their group.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SMOE_SIMT_HD __host__ __device__
#else
#define SMOE_SIMT_HD
#endif

namespace smoe::simt {

// PTX ISA 9.7.14.5.8: groupID = laneid >> 2, threadID_in_group = laneid % 4.
namespace frag {
SMOE_SIMT_HD constexpr int group_id(int lane) { return lane >> 2; }
SMOE_SIMT_HD constexpr int thread_in_group(int lane) { return lane & 3; }
// Element i (0..7) of the A fragment: registers hold (a0,a1), (a2,a3), (a4,a5), (a6,a7), low half
// first. row = groupID for i in {0,1,4,5}, groupID + 8 otherwise; col = tig*2 + (i&1) (+8 if i>=4).
SMOE_SIMT_HD constexpr int a_row(int lane, int i) { return group_id(lane) + (((i >> 1) & 1) ? 8 : 0); }
SMOE_SIMT_HD constexpr int a_col(int lane, int i) { return thread_in_group(lane) * 2 + (i & 1) + (i >= 4 ? 8 : 0); }
// Element i (0..3) of the B fragment (16x8, K x N): row = tig*2 + (i&1) (+8 if i>=2), col = groupID.
SMOE_SIMT_HD constexpr int b_row(int lane, int i) { return thread_in_group(lane) * 2 + (i & 1) + (i >= 2 ? 8 : 0); }
SMOE_SIMT_HD constexpr int b_col(int lane, int) { return group_id(lane); }
// Element i (0..3) of C/D (16x8 f32): row = groupID (+8 if i>=2), col = tig*2 + (i&1).
SMOE_SIMT_HD constexpr int c_row(int lane, int i) { return group_id(lane) + (i >= 2 ? 8 : 0); }
SMOE_SIMT_HD constexpr int c_col(int lane, int i) { return thread_in_group(lane) * 2 + (i & 1); }
// ldmatrix (9.7.14.5.15): matrix j's row r address comes from lane 8*j + r; lane l receives in
// register j the elements (row l/4, cols 2*(l%4) and 2*(l%4)+1) — with .trans, the elements
// (rows 2*(l%4) and 2*(l%4)+1, col l/4) — low half first.
SMOE_SIMT_HD constexpr int ldm_row(int lane, int half, bool trans) { return trans ? (lane % 4) * 2 + half : lane / 4; }
SMOE_SIMT_HD constexpr int ldm_col(int lane, int half, bool trans) { return trans ? lane / 4 : (lane % 4) * 2 + half; }
}  // namespace frag

}  // namespace smoe::simt

#if defined(SMOE_SIMT) && SMOE_SIMT
// ------------------------------------------------------------------------------- emulated twin
#include <cstring>

#include "smoe/simt/device.h"

namespace smoe::simt {
namespace detail {

template <bool kBf16>
inline float unpack16(uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  return kBf16 ? bf16_to_float(bits) : half_to_float(bits);
}

template <bool kBf16>
void combine_mma_m16n8k16(uint32_t, LaneIO* lanes, const char*, int) {
  float a[16][16], b[16][8], c[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const LaneIO& io = lanes[lane];
    for (int i = 0; i < 8; ++i) a[frag::a_row(lane, i)][frag::a_col(lane, i)] = unpack16<kBf16>(io.in[i / 2], i & 1);
    for (int i = 0; i < 4; ++i)
      b[frag::b_row(lane, i)][frag::b_col(lane, i)] = unpack16<kBf16>(io.in[4 + i / 2], i & 1);
    for (int i = 0; i < 4; ++i) c[frag::c_row(lane, i)][frag::c_col(lane, i)] = bits_float(io.in[6 + i]);
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) {
      const int row = frag::c_row(lane, i), col = frag::c_col(lane, i);
      double acc = c[row][col];
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(a[row][k]) * b[k][col];
      lanes[lane].out[i] = float_bits(static_cast<float>(acc));
    }
  }
}

template <int kNum, bool kTrans>
void combine_ldmatrix(uint32_t, LaneIO* lanes, const char* file, int line) {
  for (int j = 0; j < kNum; ++j) {
    for (int r = 0; r < 8; ++r) {
      const uintptr_t p = lanes[8 * j + r].in[0] | (uintptr_t{lanes[8 * j + r].in[1]} << 32);
      if (p % 16 != 0)
        fail_at(file, line, "ldmatrix: row address %p from lane %d is not 16-byte aligned", reinterpret_cast<void*>(p),
                8 * j + r);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int j = 0; j < kNum; ++j) {
      uint32_t reg = 0;
      for (int half = 0; half < 2; ++half) {
        const int row = frag::ldm_row(lane, half, kTrans);
        const int col = frag::ldm_col(lane, half, kTrans);
        const LaneIO& src = lanes[8 * j + row];
        const auto* p = reinterpret_cast<const uint16_t*>(static_cast<uintptr_t>(src.in[0]) |
                                                          (static_cast<uintptr_t>(src.in[1]) << 32));
        reg |= static_cast<uint32_t>(p[col]) << (16 * half);
      }
      lanes[lane].out[j] = reg;
    }
  }
}

// mma.m16n8k8 with .tf32 inputs (PTX ISA 9.7.14.5.x, "Matrix Fragments for mma.m16n8k8", .tf32):
// A 16x8 in 4 registers a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4); B 8x8 (k x n) in 2,
// b0 (t, g), b1 (t + 4, g); C/D as for m16n8k16 (g = groupID, t = threadID_in_group). A .tf32 operand
// is an f32 register of which the multiplier uses sign, exponent and the top 10 mantissa bits: the
// twin drops the low 13 bits (kernels round with cvt.rna.tf32.f32 first, so nothing is dropped).
inline void combine_mma_m16n8k8_tf32(uint32_t, LaneIO* lanes, const char*, int) {
  float a[16][8], b[8][8], c[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const LaneIO& io = lanes[lane];
    const int g = lane >> 2, t = lane & 3;
    const int ar[4] = {g, g + 8, g, g + 8}, ac[4] = {t, t, t + 4, t + 4};
    for (int i = 0; i < 4; ++i) a[ar[i]][ac[i]] = bits_float(io.in[i] & 0xffffe000u);
    b[t][g] = bits_float(io.in[4] & 0xffffe000u);
    b[t + 4][g] = bits_float(io.in[5] & 0xffffe000u);
    for (int i = 0; i < 4; ++i) c[frag::c_row(lane, i)][frag::c_col(lane, i)] = bits_float(io.in[6 + i]);
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) {
      const int row = frag::c_row(lane, i), col = frag::c_col(lane, i);
      double acc = c[row][col];
      for (int k = 0; k < 8; ++k) acc += static_cast<double>(a[row][k]) * b[k][col];
      lanes[lane].out[i] = float_bits(static_cast<float>(acc));
    }
  }
}

// cvt.rna.tf32.f32 (PTX ISA, "cvt": .rna = round to nearest, ties away from zero; tf32 keeps 10
// mantissa bits): the f32 bits with the low 13 mantissa bits rounded away. NaN and inf pass through.
inline uint32_t tf32_rna(uint32_t u) {
  if ((u & 0x7f800000u) == 0x7f800000u) return u;
  return (u + 0x1000u) & 0xffffe000u;
}

inline constexpr CollectiveKind kMmaTf32{"mma.m16n8k8.tf32", &combine_mma_m16n8k8_tf32, true};
inline constexpr CollectiveKind kMmaBf16{"mma.m16n8k16.bf16", &combine_mma_m16n8k16<true>, true};
inline constexpr CollectiveKind kMmaF16{"mma.m16n8k16.f16", &combine_mma_m16n8k16<false>, true};
inline constexpr CollectiveKind kLdm1{"ldmatrix.x1", &combine_ldmatrix<1, false>, true};
inline constexpr CollectiveKind kLdm2{"ldmatrix.x2", &combine_ldmatrix<2, false>, true};
inline constexpr CollectiveKind kLdm4{"ldmatrix.x4", &combine_ldmatrix<4, false>, true};
inline constexpr CollectiveKind kLdm1T{"ldmatrix.x1.trans", &combine_ldmatrix<1, true>, true};
inline constexpr CollectiveKind kLdm2T{"ldmatrix.x2.trans", &combine_ldmatrix<2, true>, true};
inline constexpr CollectiveKind kLdm4T{"ldmatrix.x4.trans", &combine_ldmatrix<4, true>, true};

inline void mma(const CollectiveKind& kind, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                const float (&c)[4], const char* file, int line) {
  LaneIO io;
  for (int i = 0; i < 4; ++i) io.in[i] = a[i];
  io.in[4] = b[0];
  io.in[5] = b[1];
  for (int i = 0; i < 4; ++i) io.in[6 + i] = float_bits(c[i]);
  warp_collective(kind, 0xffffffffu, io, file, line);
  for (int i = 0; i < 4; ++i) d[i] = bits_float(io.out[i]);
}

template <int kNum>
inline void ldmatrix(const CollectiveKind& kind, uint32_t* r, const void* row, const char* file, int line) {
  LaneIO io;
  const auto p = reinterpret_cast<uintptr_t>(row);
  io.in[0] = static_cast<uint32_t>(p);
  io.in[1] = static_cast<uint32_t>(static_cast<uint64_t>(p) >> 32);
  warp_collective(kind, 0xffffffffu, io, file, line);
  for (int j = 0; j < kNum; ++j) r[j] = io.out[j];
}

}  // namespace detail

#define SMOE_SIMT_SITE , const char *file = __builtin_FILE(), int line = __builtin_LINE()

inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                              const float (&c)[4] SMOE_SIMT_SITE) {
  detail::mma(detail::kMmaBf16, d, a, b, c, file, line);
}
inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             const float (&c)[4] SMOE_SIMT_SITE) {
  detail::mma(detail::kMmaF16, d, a, b, c, file, line);
}
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             const float (&c)[4] SMOE_SIMT_SITE) {
  detail::mma(detail::kMmaTf32, d, a, b, c, file, line);
}
inline uint32_t cvt_rna_tf32(float x) { return detail::tf32_rna(detail::float_bits(x)); }
inline void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row SMOE_SIMT_SITE) {
  detail::ldmatrix<1>(detail::kLdm1, r, smem_row, file, line);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row SMOE_SIMT_SITE) {
  detail::ldmatrix<2>(detail::kLdm2, r, smem_row, file, line);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row SMOE_SIMT_SITE) {
  detail::ldmatrix<4>(detail::kLdm4, r, smem_row, file, line);
}
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem_row SMOE_SIMT_SITE) {
  detail::ldmatrix<1>(detail::kLdm1T, r, smem_row, file, line);
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row SMOE_SIMT_SITE) {
  detail::ldmatrix<2>(detail::kLdm2T, r, smem_row, file, line);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row SMOE_SIMT_SITE) {
  detail::ldmatrix<4>(detail::kLdm4T, r, smem_row, file, line);
}
inline void cp_async_4(void* smem_dst, const void* gmem_src SMOE_SIMT_SITE) {
  detail::cp_async(smem_dst, gmem_src, 4, 4, file, line);
}
inline void cp_async_8(void* smem_dst, const void* gmem_src SMOE_SIMT_SITE) {
  detail::cp_async(smem_dst, gmem_src, 8, 8, file, line);
}
inline void cp_async_16(void* smem_dst, const void* gmem_src SMOE_SIMT_SITE) {
  detail::cp_async(smem_dst, gmem_src, 16, 16, file, line);
}
inline void cp_async_16_zfill(void* smem_dst, const void* gmem_src, int src_bytes SMOE_SIMT_SITE) {
  detail::cp_async(smem_dst, gmem_src, 16, src_bytes, file, line);
}
inline void cp_async_commit() { detail::cp_async_commit(); }
template <int kPending>
inline void cp_async_wait(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::cp_async_wait(kPending, file, line);
}
inline void cp_async_wait_all(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::cp_async_wait(0, file, line);
}
#undef SMOE_SIMT_SITE

}  // namespace smoe::simt

#else
// ------------------------------------------------------------------------------- nvcc: real PTX
namespace smoe::simt {

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
__device__ __forceinline__ uint32_t cvt_rna_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// .ca allows 4, 8 and 16 bytes; .cg (bypass L1) only 16 (PTX ISA, "Data Movement and Conversion
// Instructions: cp.async").
__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_8(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_16_zfill(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }

}  // namespace smoe::simt
#endif

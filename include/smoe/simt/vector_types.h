// smoe SIMT emulator: CUDA's built-in vector types (float4, int2, ...), uint3 and dim3.
//
// Sizes and alignments follow the CUDA C++ Programming Guide, "Built-in Vector Types"
// (e.g. float2 is 8-byte aligned, float4 and double2 16-byte aligned, float3 4-byte aligned), so
// that structs holding them have the same layout under nvcc and under the emulator.
#pragma once

#include <cstddef>
#include <cstdint>

#define SMOE_SIMT_VEC1(T, N, A)             \
  struct __attribute__((aligned(A))) N##1 { \
    T x;                                    \
  };                                        \
  inline N##1 make_##N##1(T x) { return N##1 {x}; }
#define SMOE_SIMT_VEC2(T, N, A)             \
  struct __attribute__((aligned(A))) N##2 { \
    T x, y;                                 \
  };                                        \
  inline N##2 make_##N##2(T x, T y) { return N##2 {x, y}; }
#define SMOE_SIMT_VEC3(T, N) \
  struct N##3 {              \
    T x, y, z;               \
  };                         \
  inline N##3 make_##N##3(T x, T y, T z) { return N##3 {x, y, z}; }
#define SMOE_SIMT_VEC4(T, N, A)             \
  struct __attribute__((aligned(A))) N##4 { \
    T x, y, z, w;                           \
  };                                        \
  inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4 {x, y, z, w}; }
#define SMOE_SIMT_VEC_ALL(T, N, A1, A2, A4) \
  SMOE_SIMT_VEC1(T, N, A1) SMOE_SIMT_VEC2(T, N, A2) SMOE_SIMT_VEC3(T, N) SMOE_SIMT_VEC4(T, N, A4)

SMOE_SIMT_VEC_ALL(signed char, char, 1, 2, 4)
SMOE_SIMT_VEC_ALL(unsigned char, uchar, 1, 2, 4)
SMOE_SIMT_VEC_ALL(short, short, 2, 4, 8)
SMOE_SIMT_VEC_ALL(unsigned short, ushort, 2, 4, 8)
SMOE_SIMT_VEC_ALL(int, int, 4, 8, 16)
SMOE_SIMT_VEC_ALL(unsigned int, uint, 4, 8, 16)
SMOE_SIMT_VEC_ALL(long, long, 8, 16, 16)
SMOE_SIMT_VEC_ALL(unsigned long, ulong, 8, 16, 16)
SMOE_SIMT_VEC_ALL(long long, longlong, 8, 16, 16)
SMOE_SIMT_VEC_ALL(unsigned long long, ulonglong, 8, 16, 16)
SMOE_SIMT_VEC_ALL(float, float, 4, 8, 16)
SMOE_SIMT_VEC_ALL(double, double, 8, 16, 16)

#undef SMOE_SIMT_VEC1
#undef SMOE_SIMT_VEC2
#undef SMOE_SIMT_VEC3
#undef SMOE_SIMT_VEC4
#undef SMOE_SIMT_VEC_ALL

// dim3: every component defaults to 1, and converts from and to uint3 as in CUDA.
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// csrc/cuda/common.cuh: what every kernel file of the CUDA backend shares — the namespace macro,
// the checked-call macro, device storage types, conversions, warp reductions and launch helpers.
//
// The same source compiles under nvcc (namespace smoe::cuda) and under g++ through the SIMT
// emulator (namespace smoe::cuda_simt; `-include smoe/simt/simt.h` defines SMOE_SIMT). Shared code
// tests SMOE_SIMT, never __CUDA_ARCH__.
#pragma once

#include <cstdint>
#include <string>

#include "smoe/simt/kernel.h"  // SMOE_LAUNCH, SMOE_DYNAMIC_SMEM, CUDA runtime (real or emulated)
#include "smoe/smoe.h"

// A test may compile a kernel header into a namespace of its own by defining SMOE_CUDA_NS first
// (tests/cpp/cuda/mutation: a mutated copy that must not collide with the real kernels).
#if !defined(SMOE_CUDA_NS)
#if defined(SMOE_SIMT) && SMOE_SIMT
#define SMOE_CUDA_NS cuda_simt
#else
#define SMOE_CUDA_NS cuda
#endif
#endif

namespace smoe::SMOE_CUDA_NS {

// Status{kDeviceError, "<expr> failed at <file>:<line>: <cudaGetErrorString>; <hint>"}; the hint
// depends on the error code (out of memory, bad launch configuration, illegal address, no device).
Status cuda_error(cudaError_t err, const char* expr, const char* file, int line);

// Unsupported dtype f64 (the CPU backend keeps it for gradient checks) and E/T beyond a kernel's limit.
Status f64_unsupported(const char* op);

}  // namespace smoe::SMOE_CUDA_NS

// Checks a CUDA runtime call or a launch (SMOE_LAUNCH evaluates to its cudaError_t) and returns the
// Status from the enclosing launcher on failure.
#define SMOE_CUDA_CHECK(expr)                                                             \
  do {                                                                                    \
    const cudaError_t smoe_cuda_err_ = (expr);                                            \
    if (smoe_cuda_err_ != cudaSuccess)                                                    \
      return ::smoe::SMOE_CUDA_NS::cuda_error(smoe_cuda_err_, #expr, __FILE__, __LINE__); \
  } while (0)

namespace smoe::SMOE_CUDA_NS {

inline constexpr unsigned kFullMask = 0xffffffffu;

// The one float dispatch (smoe::dtypes::dispatch_float, include/smoe/dtype.h) with the device storage
// types: the 16-bit types are CUDA's (same bits as smoe::bf16_t/f16_t); f64 has no kernel here
// (f64_unsupported). Runs f(Tag<S>{}) for f32, bf16, f16.
struct DeviceFloatTypes {
  using f32 = float;
  using f64 = NoKernel;
  using bf16 = __nv_bfloat16;
  using f16 = __half;
  static Status no_kernel(const char* op, DType) { return f64_unsupported(op); }
};

template <class F>
Status dispatch_float(DType dtype, const char* op, F&& f) {
  return dtypes::dispatch_float<DeviceFloatTypes>(dtype, op, f);
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <class S>
__device__ __forceinline__ S from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// N consecutive elements moved as one load/store: 16 bytes (LDG.128/STG.128) when N * sizeof(S) == 16.
template <class S, int N>
struct alignas(sizeof(S) * N) Pack {
  S v[N];
};

// Butterfly reductions: after the xor steps every lane holds the same bits (each step adds the same
// two operands on both sides), and the order depends on nothing but the lane layout: deterministic.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
// NaN-skipping max (fmaxf returns the other operand for one NaN).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long w = __shfl_xor_sync(kFullMask, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// ---- selection keys: one unsigned compare ranks (score desc, index asc) -------------------------
//
// ordered_bits maps a float to uint32 so that unsigned order is float order (flip the sign bit of
// positives, every bit of negatives). NaN maps like -inf (the CPU backend's rank_key): a NaN ranks
// below every number. -0 is folded into +0 so that equal floats tie. 0 stays free for "excluded".
__device__ __forceinline__ uint32_t ordered_bits(float v) {
  if (v != v) v = -INFINITY;
  if (v == 0.0f) v = 0.0f;
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
// High word: ordered score; low word: ~index, so among equal scores the lower index is larger.
__device__ __forceinline__ unsigned long long pack_key(float v, uint32_t index) {
  return (static_cast<unsigned long long>(ordered_bits(v)) << 32) | (0xffffffffu - index);
}
__device__ __forceinline__ uint32_t key_index(unsigned long long key) {
  return 0xffffffffu - static_cast<uint32_t>(key);
}
inline constexpr unsigned long long kExcludedKey = 0;  // below every packed score, NaN included

// ---- host-side launch helpers ---------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of a grid-stride loop over n items with `threads` per block: enough blocks to fill a large
// GPU (132 SMs x 16 blocks of 256 threads), never more than the work needs.
inline unsigned grid_for(int64_t n, int threads, int64_t max_blocks = 2048) {
  const int64_t b = ceil_div(n, threads);
  return static_cast<unsigned>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

}  // namespace smoe::SMOE_CUDA_NS

namespace smoe::SMOE_CUDA_NS {

// ---- block-wide radix select -------------------------------------------------------------------
//
// The k-th largest (1-based, 1 <= k <= n) of n distinct 64-bit keys, key_at(i) for i in [0, n):
// an MSD radix select, 8 bits a pass (8 passes), as in the "radix select" of Alabi et al., "Fast
// k-selection algorithms for graphics processing units" (JEA 2012), section 3. Each pass counts,
// in a 256-bin shared-memory histogram, the keys that share the prefix found so far; integer
// atomics give the same counts in any order, so the result is deterministic. Because the keys are
// distinct, exactly k keys are >= the result. Every thread of the block must call it (it holds
// block barriers) with the same n and k; every thread gets the same value. hist: [258] ints of
// shared memory. Work: 8 reads of every key; no extra memory.
template <class KeyAt>
__device__ unsigned long long block_radix_select_desc(const KeyAt& key_at, int64_t n, int64_t k, int* hist) {
  unsigned long long prefix = 0, mask = 0;
  int remaining = static_cast<int>(k);  // rank still to find inside the current prefix (n < 2^31)
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int d = static_cast<int>(threadIdx.x); d < 256; d += static_cast<int>(blockDim.x)) hist[d] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const unsigned long long key = key_at(i);
      if ((key & mask) == prefix) atomicAdd(&hist[static_cast<int>((key >> shift) & 0xffu)], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // 256 bins, from the largest digit down: the bin that holds rank `remaining`
      int d = 255;
      while (d > 0 && remaining > hist[d]) remaining -= hist[d--];
      hist[256] = d;
      hist[257] = remaining;
    }
    __syncthreads();
    // hist[256..257] are rewritten only after the next pass's second barrier: no barrier needed here.
    prefix |= static_cast<unsigned long long>(hist[256]) << shift;
    mask |= 0xffull << shift;
    remaining = hist[257];
  }
  return prefix;
}

}  // namespace smoe::SMOE_CUDA_NS

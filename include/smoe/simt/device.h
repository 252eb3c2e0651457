// smoe SIMT emulator: what device code sees — the built-in index variables, barriers, warp
// collectives, atomics and the device intrinsics that the host C library lacks.
//
// Every thread of a block is a fiber on one OS thread. Barriers and warp collectives are
// scheduling points: a thread that arrives waits until every thread the operation names has
// arrived, and misuse (a thread that never arrives, a lane that exited, mismatched masks) is a
// kernel error that names the file and line, captured through __builtin_FILE/__builtin_LINE
// default arguments. Atomics, __threadfence and __nanosleep are yield points, so a spin loop that
// polls through an atomic lets the thread it waits for run.
#pragma once

#include <math.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "smoe/simt/half.h"
#include "smoe/simt/vector_types.h"

namespace smoe::simt::detail {

// The part of a fiber's and a block's state that inline device code reads directly.
struct ThreadState {
  uint3 thread_idx;
  unsigned lane;
  unsigned warp;
};
struct BlockState {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  void* dynamic_smem;
  size_t dynamic_smem_bytes;
};

// Set by the scheduler before it resumes a fiber (per OS thread: fibers never migrate).
inline thread_local ThreadState* tls_thread = nullptr;
inline thread_local BlockState* tls_block = nullptr;

[[noreturn]] void fail_at(const char* file, int line, const char* fmt, ...) __attribute__((format(printf, 3, 4)));

// One lane's operands and results of a warp collective.
struct LaneIO {
  uint32_t in[12];
  uint32_t out[8];
};
// Runs once, in the last lane to arrive, over the slots of all 32 lanes (only those in `mask`
// are meaningful). It may call fail_at to report undefined behaviour.
using CombineFn = void (*)(uint32_t mask, LaneIO* lanes, const char* file, int line);
struct CollectiveKind {
  const char* name;
  CombineFn combine;
  bool same_site_required;  // false for __syncwarp: sm_70+ lets lanes meet at different calls
};

void warp_collective(const CollectiveKind& kind, unsigned mask, LaneIO& io, const char* file, int line);
void sync_threads(const char* file, int line);
int sync_threads_reduce(int predicate, int op, const char* file, int line);  // 0 count, 1 and, 2 or
void yield_point();
void count_wgmma_issue();  // one warp's wgmma.mma_async (smoe::simt::wgmma_issued_total)
unsigned active_mask();
[[noreturn]] void trap(const char* file, int line);

void cp_async(void* smem_dst, const void* src, int bytes, int src_bytes, const char* file, int line);
void cp_async_commit();
void cp_async_wait(int keep_pending, const char* file, int line);

template <class T>
inline uint64_t to_bits64(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffles move values of at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T>
inline T from_bits64(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// Shuffles follow the pseudo-code of shfl.sync in the PTX ISA ("Parallel Synchronization and
// Communication Instructions: shfl.sync"), with the
// c operand CUDA derives from `width`: ((32 - width) << 8) | 0x1f, and 0 in c[4:0] for up.
template <int kMode>  // 0 idx, 1 up, 2 down, 3 bfly
void combine_shfl(uint32_t mask, LaneIO* lanes, const char* file, int line) {
  static const char* const names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
  int width = -1;
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    const int w = static_cast<int>(lanes[lane].in[3]);
    if (w < 1 || w > 32 || (w & (w - 1)) != 0)
      fail_at(file, line, "%s: width %d is not a power of two in [1, 32]", names[kMode], w);
    if (width >= 0 && w != width)
      fail_at(file, line, "%s: lanes pass different widths (%d and %d)", names[kMode], width, w);
    width = w;
  }
  const uint32_t segmask = static_cast<uint32_t>(32 - width);
  const uint32_t cval = kMode == 1 ? 0u : 0x1fu;
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    const uint32_t b = lanes[lane].in[2];
    const uint32_t max_lane = (lane & segmask) | (cval & ~segmask);
    const uint32_t min_lane = lane & segmask;
    int64_t j = 0;
    bool pval = false;
    switch (kMode) {
      case 0:
        j = min_lane | (b & 31u & ~segmask);
        pval = j <= max_lane;
        break;
      case 1:
        j = static_cast<int64_t>(lane) - b;
        pval = j >= min_lane;
        break;
      case 2:
        j = static_cast<int64_t>(lane) + b;
        pval = j <= max_lane;
        break;
      default:
        j = lane ^ b;
        pval = j <= max_lane;
        break;
    }
    if (!pval) j = lane;
    if (!(mask >> j & 1u))
      fail_at(file, line, "%s: lane %u reads lane %lld, which is not in the mask 0x%08x (undefined value)",
              names[kMode], lane, static_cast<long long>(j), mask);
    lanes[lane].out[0] = lanes[j].in[0];
    lanes[lane].out[1] = lanes[j].in[1];
  }
}

template <int kOp>  // 0 ballot, 1 any, 2 all
void combine_vote(uint32_t mask, LaneIO* lanes, const char*, int) {
  uint32_t ballot = 0;
  for (unsigned lane = 0; lane < 32; ++lane)
    if ((mask >> lane & 1u) && lanes[lane].in[0] != 0) ballot |= 1u << lane;
  const uint32_t r = kOp == 0 ? ballot : kOp == 1 ? (ballot != 0) : (ballot == mask);
  for (unsigned lane = 0; lane < 32; ++lane) lanes[lane].out[0] = r;
}

inline void combine_match_any(uint32_t mask, LaneIO* lanes, const char*, int) {
  for (unsigned a = 0; a < 32; ++a) {
    if (!(mask >> a & 1u)) continue;
    uint32_t same = 0;
    for (unsigned b = 0; b < 32; ++b)
      if ((mask >> b & 1u) && lanes[a].in[0] == lanes[b].in[0] && lanes[a].in[1] == lanes[b].in[1]) same |= 1u << b;
    lanes[a].out[0] = same;
  }
}
inline void combine_match_all(uint32_t mask, LaneIO* lanes, const char* f, int l) {
  combine_match_any(mask, lanes, f, l);
  for (unsigned a = 0; a < 32; ++a) {
    if (!(mask >> a & 1u)) continue;
    const bool all = lanes[a].out[0] == mask;
    lanes[a].out[0] = all ? mask : 0u;
    lanes[a].out[1] = all;
  }
}

template <int kOp>  // 0 add, 1 min_u, 2 max_u, 3 min_s, 4 max_s, 5 and, 6 or, 7 xor
void combine_reduce(uint32_t mask, LaneIO* lanes, const char*, int) {
  bool first = true;
  uint32_t acc = 0;
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    const uint32_t v = lanes[lane].in[0];
    if (first) {
      acc = v;
      first = false;
      continue;
    }
    switch (kOp) {
      case 0:
        acc += v;
        break;
      case 1:
        acc = v < acc ? v : acc;
        break;
      case 2:
        acc = v > acc ? v : acc;
        break;
      case 3:
        acc = static_cast<int32_t>(v) < static_cast<int32_t>(acc) ? v : acc;
        break;
      case 4:
        acc = static_cast<int32_t>(v) > static_cast<int32_t>(acc) ? v : acc;
        break;
      case 5:
        acc &= v;
        break;
      case 6:
        acc |= v;
        break;
      default:
        acc ^= v;
        break;
    }
  }
  for (unsigned lane = 0; lane < 32; ++lane) lanes[lane].out[0] = acc;
}

inline void combine_nothing(uint32_t, LaneIO*, const char*, int) {}

inline constexpr CollectiveKind kShflIdx{"__shfl_sync", &combine_shfl<0>, true};
inline constexpr CollectiveKind kShflUp{"__shfl_up_sync", &combine_shfl<1>, true};
inline constexpr CollectiveKind kShflDown{"__shfl_down_sync", &combine_shfl<2>, true};
inline constexpr CollectiveKind kShflXor{"__shfl_xor_sync", &combine_shfl<3>, true};
inline constexpr CollectiveKind kBallot{"__ballot_sync", &combine_vote<0>, true};
inline constexpr CollectiveKind kAny{"__any_sync", &combine_vote<1>, true};
inline constexpr CollectiveKind kAll{"__all_sync", &combine_vote<2>, true};
inline constexpr CollectiveKind kMatchAny{"__match_any_sync", &combine_match_any, true};
inline constexpr CollectiveKind kMatchAll{"__match_all_sync", &combine_match_all, true};
inline constexpr CollectiveKind kSyncWarp{"__syncwarp", &combine_nothing, false};
inline constexpr CollectiveKind kReduceAdd{"__reduce_add_sync", &combine_reduce<0>, true};
inline constexpr CollectiveKind kReduceMinU{"__reduce_min_sync", &combine_reduce<1>, true};
inline constexpr CollectiveKind kReduceMaxU{"__reduce_max_sync", &combine_reduce<2>, true};
inline constexpr CollectiveKind kReduceMinS{"__reduce_min_sync", &combine_reduce<3>, true};
inline constexpr CollectiveKind kReduceMaxS{"__reduce_max_sync", &combine_reduce<4>, true};
inline constexpr CollectiveKind kReduceAnd{"__reduce_and_sync", &combine_reduce<5>, true};
inline constexpr CollectiveKind kReduceOr{"__reduce_or_sync", &combine_reduce<6>, true};
inline constexpr CollectiveKind kReduceXor{"__reduce_xor_sync", &combine_reduce<7>, true};

template <class T>
inline T shfl(const CollectiveKind& kind, unsigned mask, T var, uint32_t b, int width, const char* file, int line) {
  LaneIO io;
  const uint64_t u = to_bits64(var);
  io.in[0] = static_cast<uint32_t>(u);
  io.in[1] = static_cast<uint32_t>(u >> 32);
  io.in[2] = b;
  io.in[3] = static_cast<uint32_t>(width);
  warp_collective(kind, mask, io, file, line);
  return from_bits64<T>(io.out[0] | static_cast<uint64_t>(io.out[1]) << 32);
}
inline uint32_t collective1(const CollectiveKind& kind, unsigned mask, uint32_t v, const char* file, int line) {
  LaneIO io;
  io.in[0] = v;
  warp_collective(kind, mask, io, file, line);
  return io.out[0];
}

}  // namespace smoe::simt::detail

// Built-in variables ---------------------------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(::smoe::simt::detail::tls_thread->thread_idx))
#define blockIdx (static_cast<const uint3&>(::smoe::simt::detail::tls_block->block_idx))
#define blockDim (static_cast<const dim3&>(::smoe::simt::detail::tls_block->block_dim))
#define gridDim (static_cast<const dim3&>(::smoe::simt::detail::tls_block->grid_dim))
inline constexpr int warpSize = 32;

// Barriers -------------------------------------------------------------------------------------
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  smoe::simt::detail::sync_threads(file, line);
}
inline int __syncthreads_count(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return smoe::simt::detail::sync_threads_reduce(p, 0, file, line);
}
inline int __syncthreads_and(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return smoe::simt::detail::sync_threads_reduce(p, 1, file, line);
}
inline int __syncthreads_or(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return smoe::simt::detail::sync_threads_reduce(p, 2, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  smoe::simt::detail::LaneIO io;
  smoe::simt::detail::warp_collective(smoe::simt::detail::kSyncWarp, mask, io, file, line);
}

// Warp collectives -----------------------------------------------------------------------------
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return smoe::simt::detail::shfl(smoe::simt::detail::kShflIdx, mask, var, static_cast<uint32_t>(src_lane), width, file,
                                  line);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  return smoe::simt::detail::shfl(smoe::simt::detail::kShflUp, mask, var, delta, width, file, line);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return smoe::simt::detail::shfl(smoe::simt::detail::kShflDown, mask, var, delta, width, file, line);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  return smoe::simt::detail::shfl(smoe::simt::detail::kShflXor, mask, var, static_cast<uint32_t>(lane_mask), width,
                                  file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return smoe::simt::detail::collective1(smoe::simt::detail::kBallot, mask, pred != 0, file, line);
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(smoe::simt::detail::collective1(smoe::simt::detail::kAny, mask, pred != 0, file, line));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(smoe::simt::detail::collective1(smoe::simt::detail::kAll, mask, pred != 0, file, line));
}
inline unsigned __activemask() { return smoe::simt::detail::active_mask(); }
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value, const char* file = __builtin_FILE(),
                                 int line = __builtin_LINE()) {
  smoe::simt::detail::LaneIO io;
  const uint64_t u = smoe::simt::detail::to_bits64(value);
  io.in[0] = static_cast<uint32_t>(u);
  io.in[1] = static_cast<uint32_t>(u >> 32);
  smoe::simt::detail::warp_collective(smoe::simt::detail::kMatchAny, mask, io, file, line);
  return io.out[0];
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred, const char* file = __builtin_FILE(),
                                 int line = __builtin_LINE()) {
  smoe::simt::detail::LaneIO io;
  const uint64_t u = smoe::simt::detail::to_bits64(value);
  io.in[0] = static_cast<uint32_t>(u);
  io.in[1] = static_cast<uint32_t>(u >> 32);
  smoe::simt::detail::warp_collective(smoe::simt::detail::kMatchAll, mask, io, file, line);
  *pred = static_cast<int>(io.out[1]);
  return io.out[0];
}
#define SMOE_SIMT_REDUCE(name, T, kind)                                                                         \
  inline T name(unsigned mask, T v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {         \
    return static_cast<T>(                                                                                      \
        smoe::simt::detail::collective1(smoe::simt::detail::kind, mask, static_cast<uint32_t>(v), file, line)); \
  }
SMOE_SIMT_REDUCE(__reduce_add_sync, unsigned, kReduceAdd)
SMOE_SIMT_REDUCE(__reduce_add_sync, int, kReduceAdd)
SMOE_SIMT_REDUCE(__reduce_min_sync, unsigned, kReduceMinU)
SMOE_SIMT_REDUCE(__reduce_min_sync, int, kReduceMinS)
SMOE_SIMT_REDUCE(__reduce_max_sync, unsigned, kReduceMaxU)
SMOE_SIMT_REDUCE(__reduce_max_sync, int, kReduceMaxS)
SMOE_SIMT_REDUCE(__reduce_and_sync, unsigned, kReduceAnd)
SMOE_SIMT_REDUCE(__reduce_or_sync, unsigned, kReduceOr)
SMOE_SIMT_REDUCE(__reduce_xor_sync, unsigned, kReduceXor)
#undef SMOE_SIMT_REDUCE

// Memory ordering and scheduling hints (yield points) ------------------------------------------
inline void __threadfence() {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  smoe::simt::detail::yield_point();
}
inline void __threadfence_block() {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  smoe::simt::detail::yield_point();
}
inline void __threadfence_system() { __threadfence(); }
inline void __nanosleep(unsigned) { smoe::simt::detail::yield_point(); }
inline void __trap(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  smoe::simt::detail::trap(file, line);
}
inline void __brkpt() { __builtin_trap(); }
long long clock64();

// Atomics: real hardware atomics (blocks may run on parallel OS threads), then a yield point ----
namespace smoe::simt::detail {
template <class T, class F>
inline T atomic_update(T* address, F f) {
  using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  static_assert(sizeof(T) == sizeof(U), "atomics act on 2, 4 or 8 bytes");
  U* p = reinterpret_cast<U*>(address);
  U expected = __atomic_load_n(p, __ATOMIC_RELAXED);
  for (;;) {
    T old;
    std::memcpy(&old, &expected, sizeof(T));
    T updated = f(old);
    U desired;
    std::memcpy(&desired, &updated, sizeof(T));
    if (__atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
      yield_point();
      return old;
    }
  }
}
}  // namespace smoe::simt::detail

#define SMOE_SIMT_ATOMIC_INT(T)                                                             \
  inline T atomicAdd(T* a, T v) {                                                           \
    T r = __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                       \
    smoe::simt::detail::yield_point();                                                      \
    return r;                                                                               \
  }                                                                                         \
  inline T atomicSub(T* a, T v) {                                                           \
    T r = __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                       \
    smoe::simt::detail::yield_point();                                                      \
    return r;                                                                               \
  }                                                                                         \
  inline T atomicExch(T* a, T v) {                                                          \
    T r = __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                      \
    smoe::simt::detail::yield_point();                                                      \
    return r;                                                                               \
  }                                                                                         \
  inline T atomicAnd(T* a, T v) {                                                           \
    T r = __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                       \
    smoe::simt::detail::yield_point();                                                      \
    return r;                                                                               \
  }                                                                                         \
  inline T atomicOr(T* a, T v) {                                                            \
    T r = __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                        \
    smoe::simt::detail::yield_point();                                                      \
    return r;                                                                               \
  }                                                                                         \
  inline T atomicXor(T* a, T v) {                                                           \
    T r = __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                       \
    smoe::simt::detail::yield_point();                                                      \
    return r;                                                                               \
  }                                                                                         \
  inline T atomicMin(T* a, T v) {                                                           \
    return smoe::simt::detail::atomic_update(a, [v](T o) { return v < o ? v : o; });        \
  }                                                                                         \
  inline T atomicMax(T* a, T v) {                                                           \
    return smoe::simt::detail::atomic_update(a, [v](T o) { return v > o ? v : o; });        \
  }                                                                                         \
  inline T atomicCAS(T* a, T compare, T v) {                                                \
    __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
    smoe::simt::detail::yield_point();                                                      \
    return compare;                                                                         \
  }
SMOE_SIMT_ATOMIC_INT(int)
SMOE_SIMT_ATOMIC_INT(unsigned int)
SMOE_SIMT_ATOMIC_INT(long long)
SMOE_SIMT_ATOMIC_INT(unsigned long long)
#undef SMOE_SIMT_ATOMIC_INT

inline unsigned short atomicCAS(unsigned short* a, unsigned short compare, unsigned short v) {
  __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  smoe::simt::detail::yield_point();
  return compare;
}
inline unsigned atomicInc(unsigned* a, unsigned limit) {
  return smoe::simt::detail::atomic_update(a, [limit](unsigned o) { return o >= limit ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* a, unsigned limit) {
  return smoe::simt::detail::atomic_update(a, [limit](unsigned o) { return (o == 0 || o > limit) ? limit : o - 1; });
}
inline float atomicAdd(float* a, float v) {
  return smoe::simt::detail::atomic_update(a, [v](float o) { return o + v; });
}
inline double atomicAdd(double* a, double v) {
  return smoe::simt::detail::atomic_update(a, [v](double o) { return o + v; });
}
inline float atomicExch(float* a, float v) {
  return smoe::simt::detail::atomic_update(a, [v](float) { return v; });
}
inline float atomicMax(float* a, float v) {  // not in CUDA; smoe kernels use the int trick
  return smoe::simt::detail::atomic_update(a, [v](float o) { return std::fmax(o, v); });
}
inline __half atomicAdd(__half* a, __half v) {
  return smoe::simt::detail::atomic_update(a, [v](__half o) { return o + v; });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* a, __nv_bfloat16 v) {
  return smoe::simt::detail::atomic_update(a, [v](__nv_bfloat16 o) { return o + v; });
}
inline __half2 atomicAdd(__half2* a, __half2 v) {
  return smoe::simt::detail::atomic_update(a, [v](__half2 o) { return o + v; });
}
inline __nv_bfloat162 atomicAdd(__nv_bfloat162* a, __nv_bfloat162 v) {
  return smoe::simt::detail::atomic_update(a, [v](__nv_bfloat162 o) { return o + v; });
}
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd
#define atomicCAS_block atomicCAS
#define atomicExch_block atomicExch

// Loads and stores with cache hints: plain accesses on the CPU --------------------------------
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}
template <class T>
inline T __ldca(const T* p) {
  return *p;
}
template <class T>
inline T __ldcs(const T* p) {
  return *p;
}
template <class T>
inline T __ldlu(const T* p) {
  return *p;
}
template <class T>
inline T __ldcv(const T* p) {
  return *p;
}
template <class T>
inline void __stcg(T* p, T v) {
  *p = v;
}
template <class T>
inline void __stcs(T* p, T v) {
  *p = v;
}
template <class T>
inline void __stwb(T* p, T v) {
  *p = v;
}
template <class T>
inline void __stwt(T* p, T v) {
  *p = v;
}

// Math intrinsics: the GPU's approximate forms are computed exactly here ----------------------
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) {
  *s = sinf(x);
  *c = cosf(x);
}
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float exp10f(float x) { return powf(10.0f, x); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __frsqrt_rn(float a) { return 1.0f / sqrtf(a); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline long long __double_as_longlong(double d) { return std::bit_cast<long long>(d); }
inline double __longlong_as_double(long long l) { return std::bit_cast<double>(l); }
inline int __float2int_rn(float f) { return static_cast<int>(nearbyintf(f)); }
inline int __float2int_rz(float f) { return static_cast<int>(f); }
inline int __float2int_rd(float f) { return static_cast<int>(floorf(f)); }
inline int __float2int_ru(float f) { return static_cast<int>(ceilf(f)); }
inline unsigned __float2uint_rn(float f) { return static_cast<unsigned>(nearbyintf(f)); }
inline unsigned __float2uint_rz(float f) { return static_cast<unsigned>(f); }
inline long long __float2ll_rn(float f) { return static_cast<long long>(nearbyintf(f)); }
inline float __int2float_rn(int i) { return static_cast<float>(i); }
inline float __uint2float_rn(unsigned i) { return static_cast<float>(i); }
inline float __ll2float_rn(long long i) { return static_cast<float>(i); }
inline float __double2float_rn(double d) { return static_cast<float>(d); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(static_cast<unsigned>(x))) << 32) |
         __brev(static_cast<unsigned>(x >> 32));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (shift & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (shift & 31));
}
inline int __mul24(int a, int b) { return (a << 8 >> 8) * (b << 8 >> 8); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<int64_t>(a) * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32); }
namespace smoe::simt::detail {
__extension__ using int128 = __int128;
__extension__ using uint128 = unsigned __int128;
}  // namespace smoe::simt::detail
inline long long __mul64hi(long long a, long long b) {
  return static_cast<long long>((static_cast<smoe::simt::detail::int128>(a) * b) >> 64);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<smoe::simt::detail::uint128>(a) * b) >> 64);
}

// min/max overloads that CUDA declares in the global namespace for device code.
#define SMOE_SIMT_MINMAX(T)                        \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
SMOE_SIMT_MINMAX(int)
SMOE_SIMT_MINMAX(unsigned int)
SMOE_SIMT_MINMAX(long)
SMOE_SIMT_MINMAX(unsigned long)
SMOE_SIMT_MINMAX(long long)
SMOE_SIMT_MINMAX(unsigned long long)
#undef SMOE_SIMT_MINMAX
inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }
inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double max(double a, float b) { return fmax(a, b); }

// Generic <-> shared address conversion, used by the tensor-core wrappers' nvcc bodies; here the
// "shared address" is the pointer itself.
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }
inline unsigned __isShared(const void*) { return 1; }

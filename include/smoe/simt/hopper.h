// smoe Hopper (sm_90a) wrappers: mbarrier, TMA (cp.async.bulk.tensor 2D), fence.proxy.async,
// wgmma and setmaxnreg. Like tensor_core.h, each wrapper has a real PTX body under nvcc and an
// emulated twin under the SIMT emulator (SMOE_SIMT). See docs/kernels/grouped_gemm_sm90.md.
//
//   mbarrier_init(bar, count)                 mbarrier.init.shared::cta.b64
//   fence_mbarrier_init()                     fence.mbarrier_init.release.cluster
//   mbarrier_arrive(bar) / _arrive_expect_tx(bar, bytes)
//                                             mbarrier.arrive[.expect_tx].shared::cta.b64
//   mbarrier_try_wait_parity(bar, parity)     mbarrier.try_wait.parity.shared::cta.b64
//   mbarrier_wait_parity(bar, parity)         loop over try_wait
//   fence_proxy_async()                       fence.proxy.async.shared::cta
//   tma_load_2d(dst, map, c0, c1, bar)        cp.async.bulk.tensor.2d.shared::cluster.global
//                                             .tile.mbarrier::complete_tx::bytes
//   wgmma_fence(), wgmma_commit_group(), wgmma_wait_group<N>()
//   wgmma_m64n{64,128,256}k16_{bf16,f16}(d, desc_a, desc_b, scale_d)
//                                             wgmma.mma_async.sync.aligned.m64nNk16.f32.X.X
//   wgmma_desc(smem, lbo_bytes, sbo_bytes)    a 64-bit shared-memory matrix descriptor, 128B swizzle
//   setmaxnreg_inc<R>() / setmaxnreg_dec<R>() setmaxnreg.{inc,dec}.sync.aligned.u32 R
//
// Sections cited are those of the PTX ISA 8.x ("Parallel Synchronization and Communication
// Instructions: mbarrier" = 9.7.13.15, "Data Movement: cp.async.bulk.tensor" = 9.7.9.25,
// "Asynchronous Warpgroup Level Matrix Multiply-Accumulate" = 9.7.15, "membar/fence" = 9.7.13.4,
// "setmaxnreg" = 9.7.17.1), and of the CUDA driver API for the tensor map (cuTensorMapEncodeTiled).
//
// Layout facts used by both the emulation and the tests (smoe::simt::sm90):
// - Matrix descriptor (PTX 9.7.15.5.1.1, "Matrix Descriptor Format"): bits 13..0 = (shared address
//   & 0x3FFFF) >> 4; bits 29..16 = leading dimension byte offset >> 4; bits 45..32 = stride
//   dimension byte offset >> 4; bits 51..49 = matrix base offset; bits 63..62 = swizzle mode
//   (0 none, 1 128-byte, 2 64-byte, 3 32-byte).
// - 128-byte swizzle (PTX 9.7.15.5.1, "Shared Memory Matrix Layout", and the TMA swizzle modes of
//   cuTensorMapEncodeTiled): inside each 1024-byte atom of eight 128-byte rows, the 16-byte chunk
//   index (address bits 6..4) is XORed with the row index in the atom (address bits 9..7); the
//   pattern is a function of the shared-memory address, so operands start 1024-byte aligned.
// - K-major operand with 128-byte swizzle (9.7.15.5.1): row r (of M for A, of N for B), element k
//   of a 16-wide K slice lives at start + (r / 8) * SBO + (r % 8) * 128 + 2 * k before swizzling;
//   successive K slices of a 64-element (128-byte) row advance the start address by 32 bytes.
// - Accumulator D of wgmma .m64nNk16 with .f32 (9.7.15.5.1.2, "Register Fragments", figure
//   "WGMMA .m64nNk16 register fragment layout for accumulator matrix D"): warp w = warp % 4 of the
//   warpgroup owns rows 16w..16w+15; thread register i (0..N/2-1) holds row 16w + groupID +
//   8 * ((i >> 1) & 1), column 8 * (i >> 2) + 2 * threadID_in_group + (i & 1), with
//   groupID = lane / 4 and threadID_in_group = lane % 4.
// - A warpgroup (9.7.15.1) is four contiguous warps whose first warp index is a multiple of 4; all
//   128 threads execute each wgmma.mma_async, wgmma.fence, commit_group and wait_group.
// - mbarrier (9.7.13.15.1): a 64-bit shared object with a phase, a pending arrival count (expected
//   count in [1, 2^20 - 1]) and a tx-count (in [-(2^20 - 1), 2^20 - 1]); the current phase
//   completes when the pending count and the tx-count both reach zero, and the next phase starts
//   with the pending count reset to the expected count. try_wait.parity(P) succeeds once the
//   phase whose parity is P has completed, i.e. while the current phase's parity differs from P.
// - setmaxnreg (9.7.17.1): register count in [24, 256] and a multiple of 8, executed by all
//   threads of a warpgroup with the same value.
//
// Emulation notes: a TMA load is queued on its mbarrier and lands (copies, zero-fills out-of-bounds
// elements, applies the swizzle and performs complete_tx of the box's bytes) when a thread polls
// that barrier, so shared memory read before the wait shows the poison. wgmma is computed per
// thread, from shared memory, when wgmma_wait_group retires its group (reading the operands late,
// as the asynchronous hardware may), each output being the float rounding of a double sum. The
// emulator keeps an "async-proxy view" of the block's dynamic shared memory: TMA writes update it,
// fence_proxy_async copies the generic view into it, and a wgmma operand byte that differs between
// the two views was written by ordinary stores (or cp.async) with no fence.proxy.async after them,
// which is reported. Operands of wgmma must lie in dynamic shared memory (SMOE_DYNAMIC_SMEM).
#pragma once

#include <cstdint>

#include "smoe/simt/tensor_core.h"

namespace smoe::simt::sm90 {
enum class Swizzle : uint32_t { kNone = 0, k128B = 1, k64B = 2, k32B = 3 };  // descriptor encoding
SMOE_SIMT_HD constexpr uint64_t make_desc(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes, Swizzle sw) {
  return (uint64_t{(smem_addr & 0x3FFFFu) >> 4}) | (uint64_t{(lbo_bytes >> 4) & 0x3FFFu} << 16) |
         (uint64_t{(sbo_bytes >> 4) & 0x3FFFu} << 32) | (uint64_t{static_cast<uint32_t>(sw)} << 62);
}
SMOE_SIMT_HD constexpr uint32_t desc_addr(uint64_t d) { return static_cast<uint32_t>(d & 0x3FFFu) << 4; }
SMOE_SIMT_HD constexpr uint32_t desc_lbo(uint64_t d) { return static_cast<uint32_t>((d >> 16) & 0x3FFFu) << 4; }
SMOE_SIMT_HD constexpr uint32_t desc_sbo(uint64_t d) { return static_cast<uint32_t>((d >> 32) & 0x3FFFu) << 4; }
SMOE_SIMT_HD constexpr uint32_t desc_swizzle(uint64_t d) { return static_cast<uint32_t>(d >> 62); }
// 128-byte swizzle of a shared-memory byte address.
SMOE_SIMT_HD constexpr uintptr_t swizzle128(uintptr_t addr) { return addr ^ (((addr >> 7) & 7u) << 4); }
// Byte offset (before swizzling) of element (r, k) of a K-major 128B-swizzled operand.
SMOE_SIMT_HD constexpr uint32_t kmajor_offset(int r, int k, uint32_t sbo) {
  return static_cast<uint32_t>(r / 8) * sbo + static_cast<uint32_t>(r % 8) * 128u + 2u * static_cast<uint32_t>(k);
}
// Accumulator fragment of wgmma m64nNk16 (f32): row and column of register i of (warp, lane).
SMOE_SIMT_HD constexpr int acc_row(int warp, int lane, int i) {
  return 16 * (warp % 4) + lane / 4 + 8 * ((i >> 1) & 1);
}
SMOE_SIMT_HD constexpr int acc_col(int lane, int i) { return 8 * (i >> 2) + 2 * (lane % 4) + (i & 1); }
}  // namespace smoe::simt::sm90

#if defined(SMOE_SIMT) && SMOE_SIMT
// ------------------------------------------------------------------------------- emulated twin
#include <pthread.h>

#include <cstddef>
#include <vector>

#include "smoe/simt/device.h"

namespace smoe::simt {

// The tensor-map model: what cuTensorMapEncodeTiled records for a 2D tiled map (global address,
// dimensions, row stride, box, element size, swizzle). Built on the host with make_tensor_map_2d
// and passed to kernels by value (a __grid_constant__ CUtensorMap under nvcc).
struct TensorMap {
  const void* global = nullptr;
  uint32_t elem_bytes = 0;
  uint64_t dims[2] = {0, 0};      // dims[0] innermost (contiguous), dims[1] rows
  uint64_t row_stride_bytes = 0;  // byte distance between rows (dims[1] index)
  uint32_t box[2] = {0, 0};       // box[0] elements per row, box[1] rows
  sm90::Swizzle swizzle = sm90::Swizzle::kNone;
};

namespace detail {
// Rules of cuTensorMapEncodeTiled (CUDA driver API, "Tensor Map Object Management") that the
// model enforces; returns nullptr or what is wrong.
inline const char* tensor_map_problem(const TensorMap& m) {
  if (m.elem_bytes != 1 && m.elem_bytes != 2 && m.elem_bytes != 4 && m.elem_bytes != 8)
    return "element size must be 1, 2, 4 or 8 bytes";
  if (reinterpret_cast<uintptr_t>(m.global) % 16 != 0) return "global address must be 16-byte aligned";
  if (m.dims[0] == 0 || m.dims[1] == 0) return "dimensions must be positive";
  if (m.row_stride_bytes % 16 != 0) return "row stride must be a multiple of 16 bytes";
  if (m.row_stride_bytes < m.dims[0] * m.elem_bytes) return "row stride is shorter than a row";
  if (m.box[0] == 0 || m.box[1] == 0 || m.box[0] > 256 || m.box[1] > 256) return "box dimensions must be in [1, 256]";
  if ((m.box[0] * m.elem_bytes) % 16 != 0) return "box row must be a multiple of 16 bytes";
  if (m.swizzle == sm90::Swizzle::k128B && m.box[0] * m.elem_bytes > 128)
    return "with the 128-byte swizzle the box row must be at most 128 bytes";
  if (m.swizzle != sm90::Swizzle::kNone && m.swizzle != sm90::Swizzle::k128B)
    return "the emulator models the none and 128-byte swizzle modes only";
  return nullptr;
}
}  // namespace detail

inline TensorMap make_tensor_map_2d(const void* global, uint32_t elem_bytes, uint64_t inner, uint64_t rows,
                                    uint64_t row_stride_bytes, uint32_t box_inner, uint32_t box_rows,
                                    sm90::Swizzle swizzle, const char** problem = nullptr) {
  TensorMap m;
  m.global = global;
  m.elem_bytes = elem_bytes;
  m.dims[0] = inner;
  m.dims[1] = rows;
  m.row_stride_bytes = row_stride_bytes;
  m.box[0] = box_inner;
  m.box[1] = box_rows;
  m.swizzle = swizzle;
  if (problem != nullptr) *problem = detail::tensor_map_problem(m);
  return m;
}

namespace detail {

inline constexpr uint32_t kMbarMagic = 0x6d626172u;  // "mbar" in the high word of the object
inline constexpr int64_t kMbarMaxCount = (1 << 20) - 1;
inline constexpr int kWgmmaIssueWaitRounds = 20000;

struct TmaCopy {
  void* dst;
  TensorMap map;
  int32_t c0, c1;
  const char* file;
  int line;
};
struct Mbar {
  int64_t expected = 0, pending = 0, tx = 0;
  int64_t phase = 0;                 // number of completed phases
  std::vector<int64_t> last_waited;  // per thread: the completed phase its last wait observed
  std::vector<TmaCopy> copies;       // TMA loads not yet landed
};
struct WgmmaOp {
  float* d;
  int n;
  bool bf16;
  uint64_t desc_a, desc_b;
  int scale_d;
  const char* file;
  int line;
};
struct HopperThread {
  std::vector<WgmmaOp> ops;
  std::vector<size_t> group_ends;
  bool fenced = false;  // wgmma_fence since the last wait_group
  int64_t issued = 0;   // wgmma.mma_async executed (counted per warp through lane 0)
  int setmaxnreg_calls = 0;
};
struct HopperBlock {
  const void* key_block = nullptr;
  void* key_smem = nullptr;
  uint3 key_idx{};
  int nthreads = 0;
  std::vector<Mbar> bars;
  std::vector<HopperThread> threads;
  std::vector<uint8_t> async_view;           // async proxy's view of dynamic shared memory
  std::vector<int64_t> warp_issued;          // wgmma issued per warp
  std::vector<std::vector<int>> setmaxnreg;  // per warpgroup: value of the k-th call
};
// Per OS thread (a block's fibers share one), held through a pthread key: the scheduler refills the
// kernel module's thread-local storage with poison before each block, so it cannot live there.
inline HopperBlock& hopper_state() {
  static const pthread_key_t key = [] {
    pthread_key_t k;
    pthread_key_create(&k, [](void* p) { delete static_cast<HopperBlock*>(p); });
    return k;
  }();
  auto* h = static_cast<HopperBlock*>(pthread_getspecific(key));
  if (h == nullptr) {
    h = new HopperBlock;
    pthread_setspecific(key, h);
  }
  return *h;
}

// Lives in the kernel module's thread-local storage, which the scheduler fills with 0xff bytes
// before each block: finding it poisoned means a new block has started on this OS thread.
inline thread_local uint64_t tls_hopper_block_marker = 0;

inline HopperBlock& hopper_block() {
  HopperBlock& h = hopper_state();
  BlockState* b = tls_block;
  const uint3 idx = b->block_idx;
  if (tls_hopper_block_marker == ~uint64_t{0} || h.key_block != b || h.key_smem != b->dynamic_smem ||
      h.key_idx.x != idx.x || h.key_idx.y != idx.y || h.key_idx.z != idx.z) {
    h = HopperBlock{};
    h.key_block = b;
    h.key_smem = b->dynamic_smem;
    h.key_idx = idx;
    h.nthreads = static_cast<int>(b->block_dim.x * b->block_dim.y * b->block_dim.z);
    h.threads.resize(static_cast<size_t>(h.nthreads));
    h.async_view.assign(b->dynamic_smem_bytes, 0xff);  // the block starts poisoned (docs/simt.md)
    h.warp_issued.assign(static_cast<size_t>((h.nthreads + 31) / 32), 0);
    h.setmaxnreg.resize(static_cast<size_t>((h.nthreads + 127) / 128));
    tls_hopper_block_marker = 0;
  }
  return h;
}
inline int linear_tid() {
  const uint3 t = tls_thread->thread_idx;
  const dim3 d = tls_block->block_dim;
  return static_cast<int>(t.x + d.x * (t.y + d.y * t.z));
}
inline HopperThread& hopper_thread() { return hopper_block().threads[static_cast<size_t>(linear_tid())]; }

// Offset of [p, p + bytes) in the block's dynamic shared memory, or -1.
inline int64_t smem_offset(const void* p, size_t bytes) {
  const auto base = reinterpret_cast<uintptr_t>(tls_block->dynamic_smem);
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (base == 0 || a < base || a + bytes > base + tls_block->dynamic_smem_bytes) return -1;
  return static_cast<int64_t>(a - base);
}

inline Mbar& mbar_of(uint64_t* bar, const char* what, const char* file, int line) {
  HopperBlock& h = hopper_block();
  if (reinterpret_cast<uintptr_t>(bar) % 8 != 0)
    fail_at(file, line, "%s: mbarrier object %p is not 8-byte aligned", what, static_cast<void*>(bar));
  const uint64_t w = *bar;
  const uint32_t idx = static_cast<uint32_t>(w);
  if (static_cast<uint32_t>(w >> 32) != kMbarMagic || idx >= h.bars.size())
    fail_at(file, line, "%s: the mbarrier at %p was not initialised by mbarrier_init in this block", what,
            static_cast<void*>(bar));
  return h.bars[idx];
}

inline void mbar_init(uint64_t* bar, int64_t count, const char* file, int line) {
  if (count < 1 || count > kMbarMaxCount)
    fail_at(file, line, "mbarrier.init: expected arrival count %lld outside [1, %lld] (PTX 9.7.13.15.1)",
            static_cast<long long>(count), static_cast<long long>(kMbarMaxCount));
  HopperBlock& h = hopper_block();
  if (reinterpret_cast<uintptr_t>(bar) % 8 != 0)
    fail_at(file, line, "mbarrier.init: object %p is not 8-byte aligned", static_cast<void*>(bar));
  Mbar m;
  m.expected = m.pending = count;
  m.last_waited.assign(static_cast<size_t>(h.nthreads), INT64_MIN);  // phase -1 may be waited for once
  h.bars.push_back(std::move(m));
  *bar = (uint64_t{kMbarMagic} << 32) | static_cast<uint32_t>(h.bars.size() - 1);
  yield_point();
}

inline void mbar_try_complete(Mbar& m) {
  if (m.pending == 0 && m.tx == 0) {
    ++m.phase;
    m.pending = m.expected;
  }
}
inline void mbar_tx(Mbar& m, int64_t delta, const char* what, const char* file, int line) {
  m.tx += delta;
  if (m.tx > kMbarMaxCount || m.tx < -kMbarMaxCount)
    fail_at(file, line, "%s: tx-count %lld of phase %lld outside [-(2^20-1), 2^20-1] (PTX 9.7.13.15.1)", what,
            static_cast<long long>(m.tx), static_cast<long long>(m.phase));
}
inline void mbar_arrive(uint64_t* bar, int64_t count, int64_t expect_tx, const char* file, int line) {
  const char* what = expect_tx > 0 ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive";
  Mbar& m = mbar_of(bar, what, file, line);
  if (count < 1 || count > m.pending)
    fail_at(file, line,
            "%s: arrive count %lld overflows the %lld arrivals still pending in phase %lld "
            "(expected count %lld; PTX 9.7.13.15.1)",
            what, static_cast<long long>(count), static_cast<long long>(m.pending), static_cast<long long>(m.phase),
            static_cast<long long>(m.expected));
  if (expect_tx > 0) mbar_tx(m, expect_tx, what, file, line);
  m.pending -= count;
  mbar_try_complete(m);
  yield_point();
}

inline void tma_land(const TmaCopy& c) {
  HopperBlock& h = hopper_block();
  const TensorMap& t = c.map;
  const uint32_t row_bytes = t.box[0] * t.elem_bytes;
  auto* dst = static_cast<uint8_t*>(c.dst);
  const auto* g = static_cast<const uint8_t*>(t.global);
  const int64_t off = smem_offset(dst, size_t{row_bytes} * t.box[1]);
  for (uint32_t r = 0; r < t.box[1]; ++r) {
    const int64_t gr = int64_t{c.c1} + r;
    for (uint32_t e = 0; e < t.box[0]; ++e) {
      const int64_t ge = int64_t{c.c0} + e;
      const bool in =
          gr >= 0 && ge >= 0 && static_cast<uint64_t>(gr) < t.dims[1] && static_cast<uint64_t>(ge) < t.dims[0];
      uintptr_t a = reinterpret_cast<uintptr_t>(dst) + size_t{r} * row_bytes + size_t{e} * t.elem_bytes;
      if (t.swizzle == sm90::Swizzle::k128B) a = sm90::swizzle128(a);
      auto* p = reinterpret_cast<uint8_t*>(a);
      if (in)
        std::memcpy(p, g + static_cast<uint64_t>(gr) * t.row_stride_bytes + static_cast<uint64_t>(ge) * t.elem_bytes,
                    t.elem_bytes);
      else
        std::memset(p, 0, t.elem_bytes);  // out-of-bounds elements of the box are zero-filled
      if (off >= 0)
        std::memcpy(h.async_view.data() + (a - reinterpret_cast<uintptr_t>(tls_block->dynamic_smem)), p, t.elem_bytes);
    }
  }
}

inline bool mbar_try_wait(uint64_t* bar, uint32_t parity, const char* file, int line) {
  Mbar& m0 = mbar_of(bar, "mbarrier.try_wait.parity", file, line);
  // Land the TMA loads that complete on this barrier (they may name it again: re-look it up).
  const size_t idx = static_cast<size_t>(static_cast<uint32_t>(*bar));
  std::vector<TmaCopy> copies;
  copies.swap(m0.copies);
  for (const TmaCopy& c : copies) {
    tma_land(c);
    Mbar& m = hopper_block().bars[idx];
    mbar_tx(m, -int64_t{c.map.box[0]} * c.map.box[1] * c.map.elem_bytes, "cp.async.bulk.tensor complete_tx", c.file,
            c.line);
    mbar_try_complete(m);
  }
  Mbar& m = hopper_block().bars[idx];
  const bool done = static_cast<uint32_t>(m.phase & 1) != (parity & 1u);  // current parity != P
  if (!done) return false;
  int64_t& last = m.last_waited[static_cast<size_t>(linear_tid())];
  const int64_t observed = m.phase - 1;  // the completed phase of parity P
  if (observed == last)
    fail_at(file, line,
            "mbarrier.try_wait.parity(%u): phase %lld was already waited for by this thread; the "
            "parity names a completed phase, so the wait does not wait (flip the parity each phase; "
            "PTX 9.7.13.15.16)",
            parity & 1u, static_cast<long long>(observed));
  last = observed;
  return true;
}

inline void fence_proxy_async_emu() {
  HopperBlock& h = hopper_block();
  if (!h.async_view.empty()) std::memcpy(h.async_view.data(), tls_block->dynamic_smem, h.async_view.size());
  yield_point();
}

inline void tma_load(void* dst, const TensorMap& map, int32_t c0, int32_t c1, uint64_t* bar, const char* file,
                     int line) {
  const char* what = "cp.async.bulk.tensor.2d";
  if (const char* p = tensor_map_problem(map)) fail_at(file, line, "%s: bad tensor map: %s", what, p);
  const size_t bytes = size_t{map.box[0]} * map.box[1] * map.elem_bytes;
  const uintptr_t align = map.swizzle == sm90::Swizzle::k128B ? 1024 : 128;
  if (reinterpret_cast<uintptr_t>(dst) % align != 0)
    fail_at(file, line, "%s: shared destination %p is not %zu-byte aligned", what, dst, static_cast<size_t>(align));
  if (smem_offset(dst, bytes) < 0)
    fail_at(file, line, "%s: the %zu-byte box at %p is not inside the block's dynamic shared memory", what, bytes, dst);
  Mbar& m = mbar_of(bar, what, file, line);
  m.copies.push_back(TmaCopy{dst, map, c0, c1, file, line});
  yield_point();
}

// Warpgroup rules of 9.7.15.1, checked per warp (lane 0 counts the warp's issue).
inline void warpgroup_check(const char* what, const char* file, int line) {
  HopperBlock& h = hopper_block();
  const int warp = static_cast<int>(tls_thread->warp);
  const int first = warp / 4 * 4;
  const int nwarps = static_cast<int>(h.warp_issued.size());
  if (first + 4 > nwarps || h.nthreads % 32 != 0)
    fail_at(file, line,
            "%s: warp %d belongs to the warpgroup of warps %d-%d, which the block (%d threads) "
            "does not fill; a warpgroup is 4 contiguous warps whose first warp index is divisible "
            "by 4 (PTX 9.7.15.1)",
            what, warp, first, first + 3, h.nthreads);
}

inline void wgmma_issue(float* d, int n, bool bf16, uint64_t da, uint64_t db, int scale_d, const char* file, int line) {
  const char* what = "wgmma.mma_async";
  warpgroup_check(what, file, line);
  // A warp collective over all 32 lanes at this call (a missing lane is reported by it).
  __syncwarp(0xffffffffu, file, line);
  HopperThread& t = hopper_thread();
  if (!t.fenced)
    fail_at(file, line,
            "%s: no wgmma_fence() before the first wgmma.mma_async of this batch (the accumulator "
            "registers were written by other instructions; PTX 9.7.15.7.2 wgmma.fence)",
            what);
  if (sm90::desc_swizzle(da) != 1 || sm90::desc_swizzle(db) != 1)
    fail_at(file, line,
            "%s: the emulator models K-major operands with the 128-byte swizzle only "
            "(descriptor swizzle modes %u and %u)",
            what, sm90::desc_swizzle(da), sm90::desc_swizzle(db));
  t.ops.push_back(WgmmaOp{d, n, bf16, da, db, scale_d, file, line});
  ++t.issued;
  if (tls_thread->lane == 0) {
    ++hopper_block().warp_issued[tls_thread->warp];
    count_wgmma_issue();
  }
}

inline void wgmma_fence_emu(const char* file, int line) {
  warpgroup_check("wgmma.fence", file, line);
  hopper_thread().fenced = true;
}
inline void wgmma_commit_emu(const char* file, int line) {
  warpgroup_check("wgmma.commit_group", file, line);
  HopperThread& t = hopper_thread();
  t.group_ends.push_back(t.ops.size());
}

inline float wgmma_operand(const uint8_t* base, uint64_t desc, int r, int k, bool bf16) {
  const uintptr_t a = sm90::swizzle128(reinterpret_cast<uintptr_t>(base) + sm90::desc_addr(desc) +
                                       sm90::kmajor_offset(r, k, sm90::desc_sbo(desc)));
  uint16_t bits;
  std::memcpy(&bits, reinterpret_cast<const void*>(a), 2);
  return bf16 ? bf16_to_float(bits) : half_to_float(bits);
}

inline void wgmma_execute(const WgmmaOp& op) {
  HopperBlock& h = hopper_block();
  const auto* base = static_cast<const uint8_t*>(tls_block->dynamic_smem);
  const size_t smem = tls_block->dynamic_smem_bytes;
  // Both operands must lie in dynamic shared memory and match the async proxy's view.
  auto check = [&](uint64_t desc, int rows, const char* name) {
    for (int r = 0; r < rows; ++r)
      for (int k = 0; k < 16; ++k) {
        const uintptr_t a = sm90::swizzle128(reinterpret_cast<uintptr_t>(base) + sm90::desc_addr(desc) +
                                             sm90::kmajor_offset(r, k, sm90::desc_sbo(desc)));
        const size_t off = a - reinterpret_cast<uintptr_t>(base);
        if (a < reinterpret_cast<uintptr_t>(base) || off + 2 > smem)
          fail_at(op.file, op.line,
                  "wgmma.mma_async: operand %s row %d reaches outside the "
                  "block's %zu bytes of dynamic shared memory",
                  name, r, smem);
        if (std::memcmp(base + off, h.async_view.data() + off, 2) != 0)
          fail_at(op.file, op.line,
                  "wgmma.mma_async: operand %s (row %d, k %d, shared offset %zu) was written by "
                  "ordinary stores with no fence.proxy.async before the wgmma (the async proxy "
                  "may not see them; PTX 9.7.13.4 and 9.7.15.7)",
                  name, r, k, off);
      }
  };
  check(op.desc_a, 64, "A");
  check(op.desc_b, op.n, "B");
  const int warp = static_cast<int>(tls_thread->warp), lane = static_cast<int>(tls_thread->lane);
  for (int i = 0; i < op.n / 2; ++i) {
    const int row = sm90::acc_row(warp, lane, i), col = sm90::acc_col(lane, i);
    double acc = op.scale_d ? static_cast<double>(op.d[i]) : 0.0;
    for (int k = 0; k < 16; ++k)
      acc += static_cast<double>(wgmma_operand(base, op.desc_a, row, k, op.bf16)) *
             wgmma_operand(base, op.desc_b, col, k, op.bf16);
    op.d[i] = static_cast<float>(acc);
  }
}

inline void wgmma_wait_emu(int keep_pending, const char* file, int line) {
  warpgroup_check("wgmma.wait_group", file, line);
  HopperThread& t = hopper_thread();
  const int groups = static_cast<int>(t.group_ends.size());
  const int retire = groups - keep_pending;
  if (retire > 0) {
    // All four warps of the warpgroup must have issued the wgmma this thread retires.
    const int64_t need = t.issued - static_cast<int64_t>(t.ops.size() - t.group_ends[static_cast<size_t>(retire - 1)]);
    const int first = static_cast<int>(tls_thread->warp) / 4 * 4;
    for (int w = first; w < first + 4; ++w) {
      int rounds = 0;
      while (hopper_block().warp_issued[static_cast<size_t>(w)] < need) {
        if (++rounds > kWgmmaIssueWaitRounds)
          fail_at(file, line,
                  "wgmma.wait_group: warp %d of the warpgroup (warps %d-%d) issued %lld of the %lld "
                  "wgmma.mma_async that warp %u waits for; all four warps of a warpgroup, whose "
                  "first warp index is divisible by 4, must issue each wgmma (PTX 9.7.15.1)",
                  w, first, first + 3, static_cast<long long>(hopper_block().warp_issued[static_cast<size_t>(w)]),
                  static_cast<long long>(need), tls_thread->warp);
        yield_point();
      }
    }
    HopperThread& tt = hopper_thread();
    const size_t end = tt.group_ends[static_cast<size_t>(retire - 1)];
    for (size_t i = 0; i < end; ++i) wgmma_execute(tt.ops[i]);
    tt.ops.erase(tt.ops.begin(), tt.ops.begin() + static_cast<std::ptrdiff_t>(end));
    tt.group_ends.erase(tt.group_ends.begin(), tt.group_ends.begin() + retire);
    for (size_t& e : tt.group_ends) e -= end;
  }
  hopper_thread().fenced = false;
}

inline void setmaxnreg_emu(int regs, bool inc, const char* file, int line) {
  const char* what = inc ? "setmaxnreg.inc" : "setmaxnreg.dec";
  if (regs < 24 || regs > 256 || regs % 8 != 0)
    fail_at(file, line, "%s: register count %d is not a multiple of 8 in [24, 256] (PTX 9.7.17.1)", what, regs);
  warpgroup_check(what, file, line);
  int uniform = 0;
  (void)__match_all_sync(0xffffffffu, regs, &uniform, file, line);
  if (!uniform)
    fail_at(file, line,
            "%s: the lanes of warp %u pass different register counts; setmaxnreg must "
            "be warpgroup-uniform (PTX 9.7.17.1)",
            what, tls_thread->warp);
  HopperBlock& h = hopper_block();
  HopperThread& t = hopper_thread();
  auto& calls = h.setmaxnreg[tls_thread->warp / 4];
  const size_t k = static_cast<size_t>(t.setmaxnreg_calls++);
  const int signed_regs = inc ? regs : -regs;
  if (k >= calls.size())
    calls.push_back(signed_regs);
  else if (calls[k] != signed_regs)
    fail_at(file, line,
            "%s %d: warp %u disagrees with its warpgroup (warps %u-%u), whose call %zu was %s %d; "
            "setmaxnreg must be warpgroup-uniform (PTX 9.7.17.1)",
            what, regs, tls_thread->warp, tls_thread->warp / 4 * 4, tls_thread->warp / 4 * 4 + 3, k,
            calls[k] > 0 ? "setmaxnreg.inc" : "setmaxnreg.dec", calls[k] > 0 ? calls[k] : -calls[k]);
}

}  // namespace detail

#define SMOE_SIMT_SITE , const char *file = __builtin_FILE(), int line = __builtin_LINE()
#define SMOE_SIMT_SITE0 const char *file = __builtin_FILE(), int line = __builtin_LINE()

inline void mbarrier_init(uint64_t* bar, uint32_t count SMOE_SIMT_SITE) { detail::mbar_init(bar, count, file, line); }
inline void fence_mbarrier_init() { detail::yield_point(); }
inline void mbarrier_arrive(uint64_t* bar SMOE_SIMT_SITE) { detail::mbar_arrive(bar, 1, 0, file, line); }
inline void mbarrier_arrive_count(uint64_t* bar, uint32_t count SMOE_SIMT_SITE) {
  detail::mbar_arrive(bar, count, 0, file, line);
}
inline void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t tx_bytes SMOE_SIMT_SITE) {
  detail::mbar_arrive(bar, 1, tx_bytes, file, line);
}
inline bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity SMOE_SIMT_SITE) {
  const bool done = detail::mbar_try_wait(bar, parity, file, line);
  detail::yield_point();
  return done;
}
inline void mbarrier_wait_parity(uint64_t* bar, uint32_t parity SMOE_SIMT_SITE) {
  while (!detail::mbar_try_wait(bar, parity, file, line)) detail::yield_point();
}
inline void fence_proxy_async() { detail::fence_proxy_async_emu(); }
inline void tma_load_2d(void* smem_dst, const TensorMap& map, int32_t c0, int32_t c1, uint64_t* bar SMOE_SIMT_SITE) {
  detail::tma_load(smem_dst, map, c0, c1, bar, file, line);
}
inline uint64_t wgmma_desc(const void* smem, uint32_t lbo_bytes, uint32_t sbo_bytes SMOE_SIMT_SITE) {
  const int64_t off = detail::smem_offset(smem, 1);
  if (off < 0) detail::fail_at(file, line, "wgmma_desc: %p is not in the block's dynamic shared memory", smem);
  return sm90::make_desc(static_cast<uint32_t>(off), lbo_bytes, sbo_bytes, sm90::Swizzle::k128B);
}
inline void wgmma_fence(SMOE_SIMT_SITE0) { detail::wgmma_fence_emu(file, line); }
inline void wgmma_commit_group(SMOE_SIMT_SITE0) { detail::wgmma_commit_emu(file, line); }
template <int kPending>
inline void wgmma_wait_group(SMOE_SIMT_SITE0) {
  detail::wgmma_wait_emu(kPending, file, line);
}
#define SMOE_SIMT_WGMMA(N, ty, is_bf16)                                                   \
  inline void wgmma_m64n##N##k16_##ty(float(&d)[N / 2], uint64_t desc_a, uint64_t desc_b, \
                                      int scale_d SMOE_SIMT_SITE) {                       \
    detail::wgmma_issue(d, N, is_bf16, desc_a, desc_b, scale_d, file, line);              \
  }
SMOE_SIMT_WGMMA(64, bf16, true)
SMOE_SIMT_WGMMA(128, bf16, true)
SMOE_SIMT_WGMMA(256, bf16, true)
SMOE_SIMT_WGMMA(64, f16, false)
SMOE_SIMT_WGMMA(128, f16, false)
SMOE_SIMT_WGMMA(256, f16, false)
#undef SMOE_SIMT_WGMMA
template <int kRegs>
inline void setmaxnreg_inc(SMOE_SIMT_SITE0) {
  detail::setmaxnreg_emu(kRegs, true, file, line);
}
template <int kRegs>
inline void setmaxnreg_dec(SMOE_SIMT_SITE0) {
  detail::setmaxnreg_emu(kRegs, false, file, line);
}
#undef SMOE_SIMT_SITE
#undef SMOE_SIMT_SITE0

}  // namespace smoe::simt

#else
// ------------------------------------------------------------------------------- nvcc: real PTX
// mbarrier tx-counts, TMA and fence.proxy.async need sm_90; wgmma and setmaxnreg need sm_90a
// (-gencode=arch=compute_90a,code=sm_90a). Compiled for an older target, or for sm_90 without
// the "a" features, the wrappers trap, so that a file including this header still builds there.
#include <cuda.h>  // CUtensorMap

namespace smoe::simt {
using TensorMap = CUtensorMap;

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define SMOE_SIMT_SM90 1
#else
#define SMOE_SIMT_SM90 0
#endif
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SMOE_SIMT_SM90A 1
#else
#define SMOE_SIMT_SM90A 0
#endif

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
#if SMOE_SIMT_SM90
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
#else
  __trap();
#endif
}
__device__ __forceinline__ void fence_mbarrier_init() {
#if SMOE_SIMT_SM90
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#if SMOE_SIMT_SM90
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(smem_addr(bar)) : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void mbarrier_arrive_count(uint64_t* bar, uint32_t count) {
#if SMOE_SIMT_SM90
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(smem_addr(bar)), "r"(count)
               : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t tx_bytes) {
#if SMOE_SIMT_SM90
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(smem_addr(bar)),
               "r"(tx_bytes)
               : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
  uint32_t ok = 0;
#if SMOE_SIMT_SM90
  asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
               : "=r"(ok)
               : "r"(smem_addr(bar)), "r"(parity)
               : "memory");
#else
  __trap();
#endif
  return ok != 0;
}
__device__ __forceinline__ void mbarrier_wait_parity(uint64_t* bar, uint32_t parity) {
  while (!mbarrier_try_wait_parity(bar, parity)) {}
}
__device__ __forceinline__ void fence_proxy_async() {
#if SMOE_SIMT_SM90
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void tma_load_2d(void* smem_dst, const TensorMap& map, int32_t c0, int32_t c1,
                                            uint64_t* bar) {
#if SMOE_SIMT_SM90
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
      : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ uint64_t wgmma_desc(const void* smem, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return sm90::make_desc(smem_addr(smem), lbo_bytes, sbo_bytes, sm90::Swizzle::k128B);
}
__device__ __forceinline__ void wgmma_fence() {
#if SMOE_SIMT_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void wgmma_commit_group() {
#if SMOE_SIMT_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait_group() {
#if SMOE_SIMT_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#else
  __trap();
#endif
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
#if SMOE_SIMT_SM90A
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#else
  __trap();
#endif
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
#if SMOE_SIMT_SM90A
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#else
  __trap();
#endif
}
// wgmma.mma_async.sync.aligned.m64nNk16.f32.T.T d, a-desc, b-desc, scale-d, imm-scale-a = 1,
// imm-scale-b = 1, imm-trans-a = 0, imm-trans-b = 0: K-major A and B (the operand order of the
// wgmma.mma_async instruction, PTX ISA 9.7.15, "Asynchronous Warpgroup Level Matrix
// Multiply-Accumulate"). The N/2 accumulators are "+f" operands %0..%(N/2-1), then the two
// descriptors and the scale-d predicate's source.
// Each list extends the one for the next smaller N.
#define SMOE_SIMT_WGMMA_REGS_64                                                                                        \
  "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30," \
  "%31"
#define SMOE_SIMT_WGMMA_REGS_128                                                                                   \
  SMOE_SIMT_WGMMA_REGS_64                                                                                          \
  ",%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%" \
  "59,%60,%61,%62,%63"
#define SMOE_SIMT_WGMMA_REGS_256                                                                                   \
  SMOE_SIMT_WGMMA_REGS_128                                                                                         \
  ",%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%" \
  "91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114," \
  "%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
#define SMOE_SIMT_WGMMA_OPS_64                                                                                \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),  \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define SMOE_SIMT_WGMMA_OPS_128                                                                                      \
  SMOE_SIMT_WGMMA_OPS_64, "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), \
      "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]),        \
      "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),        \
      "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),        \
      "+f"(d[63])
#define SMOE_SIMT_WGMMA_OPS_256                                                                                       \
  SMOE_SIMT_WGMMA_OPS_128, "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), \
      "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]),         \
      "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]),         \
      "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]),         \
      "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]),      \
      "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), \
      "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), \
      "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), \
      "+f"(d[127])
#if SMOE_SIMT_SM90A
#define SMOE_SIMT_WGMMA(N, ty, ia, ib, is)                                                                    \
  __device__ __forceinline__ void wgmma_m64n##N##k16_##ty(float(&d)[N / 2], uint64_t desc_a, uint64_t desc_b, \
                                                          int scale_d) {                                      \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #is                                                     \
                 ", 0;\n"                                                                                     \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." #ty "." #ty " {" SMOE_SIMT_WGMMA_REGS_##N  \
                 "}"                                                                                          \
                 ", %" #ia ", %" #ib ", p, 1, 1, 0, 0;\n}\n"                                                  \
                 : SMOE_SIMT_WGMMA_OPS_##N                                                                    \
                 : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                   \
  }
#else
#define SMOE_SIMT_WGMMA(N, ty, ia, ib, is) \
  __device__ __forceinline__ void wgmma_m64n##N##k16_##ty(float(&)[N / 2], uint64_t, uint64_t, int) { __trap(); }
#endif
SMOE_SIMT_WGMMA(64, bf16, 32, 33, 34)
SMOE_SIMT_WGMMA(64, f16, 32, 33, 34)
SMOE_SIMT_WGMMA(128, bf16, 64, 65, 66)
SMOE_SIMT_WGMMA(128, f16, 64, 65, 66)
SMOE_SIMT_WGMMA(256, bf16, 128, 129, 130)
SMOE_SIMT_WGMMA(256, f16, 128, 129, 130)
#undef SMOE_SIMT_WGMMA
#undef SMOE_SIMT_WGMMA_REGS_64
#undef SMOE_SIMT_WGMMA_OPS_64
#undef SMOE_SIMT_WGMMA_REGS_128
#undef SMOE_SIMT_WGMMA_OPS_128
#undef SMOE_SIMT_WGMMA_REGS_256
#undef SMOE_SIMT_WGMMA_OPS_256
#undef SMOE_SIMT_SM90
#undef SMOE_SIMT_SM90A

}  // namespace smoe::simt
#endif

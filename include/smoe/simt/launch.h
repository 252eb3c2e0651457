// smoe SIMT emulator: kernel launches and the emulator's options.
//
// make_launcher(kernel, grid, block, smem, stream)(args...) is what SMOE_LAUNCH and the rewritten
// `kernel<<<grid, block, smem, stream>>>(args...)` expand to. The arguments are converted to the
// kernel's parameter types once, as a CUDA launch does, and every thread receives copies.
#pragma once

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "smoe/simt/runtime_api.h"

namespace smoe::simt {

// kWarps: warp by warp (forward order), each warp runs until all its lanes wait at a barrier or have
// exited (at most 256 passes over its lanes, so a warp that spins on another one lets it run): the
// largest drift between warps, as when one warp is scheduled far ahead of the others on an SM.
enum class Schedule { kForward, kReverse, kRandom, kWarps };
// When an emulated cp.async copy lands (reads global memory and writes shared memory):
//   kWait    when the issuing thread's cp.async.wait_group / wait_all retires its group (the
//            latest moment the PTX ISA allows);
//   kIssue   at once, inside the cp.async call (the earliest);
//   kRandom  per copy, seeded: at issue, at the wait, or at a scheduling point of any thread of
//            the block in between (before the worker resumes a fiber). A stage refilled while
//            other warps still read it then shows up as wrong data in some schedule.
enum class CpAsyncLanding { kWait, kIssue, kRandom };

// Defaults come from the environment (read once):
//   SMOE_SIMT_SCHEDULE = forward | reverse | random[:SEED] | warps   order in which ready
//                                    threads and blocks run (default forward)
//   SMOE_SIMT_PARALLEL = 0 | 1       1: blocks run concurrently on OS threads (default 0)
//   SMOE_SIMT_THREADS  = N           OS threads in parallel mode (default: one per block, <= 256)
//   SMOE_SIMT_STACK_KB = N           fiber stack size (default 64, 256 under AddressSanitizer)
//   SMOE_SIMT_QUIET    = 0 | 1       1: do not print kernel errors to stderr when they happen
//   SMOE_SIMT_SPIN_TIMEOUT = S       sequential mode: a block whose threads only spin (yield in
//                                    atomics/fences) for S seconds is a livelock error (default 20)
//   SMOE_SIMT_CP_ASYNC = wait | issue | random[:SEED]  when cp.async copies land (CpAsyncLanding;
//                                    default wait)
//   SMOE_SIMT_DEVICES  = N           emulated devices (default 1). cudaMalloc and cudaStreamCreate
//                                    remember the current device; a launch into a stream of another
//                                    device fails (cudaErrorInvalidResourceHandle), and a launch whose
//                                    arguments hold a pointer into another device's allocation is an
//                                    illegal address (sticky), as on GPUs without peer access
//   SMOE_SIMT_SM90A    = 0 | 1       1: the emulated build carries sm_90a code (Options::sm90a)
//   SMOE_SIMT_SMS      = N           multiprocessors the device reports (Options::sm_count, default 132)
// SMOE_SIMT_SPIN_TIMEOUT, SMOE_SIMT_SM90A and SMOE_SIMT_SMS take exactly the values above: any other
// (junk, empty, out of range) is reported on stderr and the default kept.
struct Options {
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;
  bool parallel_blocks = false;
  int max_os_threads = 256;
  size_t stack_bytes = 0;  // 0: default
  bool quiet = false;
  double spin_timeout_s = 20.0;
  CpAsyncLanding cp_async_landing = CpAsyncLanding::kWait;
  uint64_t cp_async_seed = 0;
  int devices = 1;
  // The emulated build carries sm_90a code (SMOE_SIMT_SM90A=1): the emulated device is always
  // compute capability 9.0, and with this set the CUDA backend dispatches its grouped GEMM to the
  // sm_90a wgmma kernel as an nvcc build with -gencode=arch=compute_90a,code=sm_90a does on an
  // H100/H200 (csrc/cuda/gemm_wgmma.h, wgmma_selected). Off by default: the sm_80 kernels run.
  bool sm90a = false;
  // Multiprocessors the emulated device reports (SMOE_SIMT_SMS; cudaDevAttrMultiProcessorCount),
  // e.g. few, so that a persistent kernel's CTAs each run several tiles in a small test.
  int sm_count = 132;
};

Options options();
void set_options(const Options& options);
// wgmma.mma_async instructions the emulator has executed in this process (counted per warp), so a
// test can tell which kernel a dispatch ran.
int64_t wgmma_issued_total();
// Parses "forward", "reverse", "random", "random:SEED" or "warps"; returns false on anything else.
bool parse_schedule(const char* text, Schedule* schedule, uint64_t* seed);
// Parses "wait", "issue", "random" or "random:SEED"; returns false on anything else.
bool parse_cp_async_landing(const char* text, CpAsyncLanding* landing, uint64_t* seed);

namespace detail {

struct LaunchDesc {
  const void* kernel;  // identifies the kernel (attributes) and its module (shared memory)
  dim3 grid;
  dim3 block;
  size_t dynamic_smem;
  cudaStream_t stream;
  void (*invoke)(void* pack);  // runs the kernel body for the current thread
  void* pack;
  void* (*tls_probe)();  // touches a thread_local of the caller's module (see scheduler.cpp)
  const char* file;
  int line;
  size_t pack_bytes;  // size of *pack: the launch scans it for pointers (device check)
};

cudaError_t launch(const LaunchDesc& desc);

namespace {
// One per translation unit, so its address lies in the module that holds the kernel.
thread_local char tls_probe_byte;
inline void* tls_probe() { return &tls_probe_byte; }
}  // namespace

template <class... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  const char* file;
  int line;

  template <class... A>
  cudaError_t operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong argument count");
    struct Pack {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> args;
    } pack{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    LaunchDesc d{reinterpret_cast<const void*>(kernel),
                 grid,
                 block,
                 smem,
                 stream,
                 [](void* p) {
                   auto* pk = static_cast<Pack*>(p);
                   std::apply(pk->kernel, pk->args);
                 },
                 &pack,
                 &tls_probe,
                 file,
                 line,
                 sizeof(Pack)};
    return launch(d);
  }
};

template <class... P>
Launcher<P...> make_launcher(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0,
                             cudaStream_t stream = nullptr, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  return Launcher<P...>{kernel, grid, block, smem, stream, file, line};
}

}  // namespace detail
}  // namespace smoe::simt

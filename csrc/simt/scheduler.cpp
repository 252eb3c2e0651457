// smoe SIMT emulator: the block scheduler — fibers, barriers, warp collectives, cp.async, launches.
//
// Execution model
//   * A block runs on one OS thread (a "worker"); each CUDA thread of the block is a fiber with
//     its own stack. A fiber runs until it blocks (barrier, warp collective), yields (atomics,
//     fences) or exits; the worker then picks the next ready fiber. Ready fibers run in rounds,
//     in the order the schedule gives (forward, reverse or a seeded random permutation per round).
//   * Static __shared__ variables are `static thread_local`: the fibers of a block share them
//     because they share the OS thread. Before each block the worker refills the whole
//     thread-local block of the kernel's module with 0xff bytes (NaN for float, half, bf16), so
//     a block starts from poisoned shared memory and never sees the previous block's data.
//   * Sequential mode runs the blocks one after another on one persistent worker; parallel mode
//     (SMOE_SIMT_PARALLEL=1) starts one worker per block (capped by SMOE_SIMT_THREADS), so blocks
//     that wait on each other through global memory make progress.
//   * Misuse of barriers and warp collectives is reported as soon as it is certain, with the
//     file and line of each call involved and a listing of where every thread waits.
#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <sched.h>

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cxxabi.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <queue>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "fiber.h"
#include "internal.h"
#include "smoe/simt/device.h"
#include "smoe/simt/launch.h"

#if defined(SMOE_SIMT_ASAN)
#include <sanitizer/asan_interface.h>
#endif

namespace smoe::simt {

// Options ----------------------------------------------------------------------------------------
bool parse_schedule(const char* text, Schedule* schedule, uint64_t* seed) {
  if (text == nullptr) return false;
  if (std::strcmp(text, "forward") == 0) {
    *schedule = Schedule::kForward;
    return true;
  }
  if (std::strcmp(text, "reverse") == 0) {
    *schedule = Schedule::kReverse;
    return true;
  }
  if (std::strcmp(text, "warps") == 0) {
    *schedule = Schedule::kWarps;
    *seed = 0;
    return true;
  }
  if (std::strncmp(text, "random", 6) == 0) {
    if (text[6] == '\0') {
      *schedule = Schedule::kRandom;
      *seed = 0;
      return true;
    }
    if (text[6] == ':' && text[7] != '\0') {
      char* end = nullptr;
      const unsigned long long s = std::strtoull(text + 7, &end, 10);
      if (*end != '\0') return false;
      *schedule = Schedule::kRandom;
      *seed = s;
      return true;
    }
  }
  return false;
}

bool parse_cp_async_landing(const char* text, CpAsyncLanding* landing, uint64_t* seed) {
  if (text == nullptr) return false;
  if (std::strcmp(text, "wait") == 0) {
    *landing = CpAsyncLanding::kWait;
    return true;
  }
  if (std::strcmp(text, "issue") == 0) {
    *landing = CpAsyncLanding::kIssue;
    return true;
  }
  // "random" and "random:SEED" are spelled as for the schedule.
  Schedule s;
  if (parse_schedule(text, &s, seed) && s == Schedule::kRandom) {
    *landing = CpAsyncLanding::kRandom;
    return true;
  }
  return false;
}

namespace {
std::mutex g_options_mutex;
bool g_options_loaded = false;
Options g_options;

// A whole decimal number in [lo, hi] (strtol's syntax, nothing after it); false for anything else
// (junk, empty, out of range), which the caller reports, keeping its default.
bool parse_whole(const char* s, long lo, long hi, long* out) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(s, &end, 10);
  if (end == s || *end != '\0' || errno != 0 || v < lo || v > hi) return false;
  *out = v;
  return true;
}

Options options_from_env() {
  Options o;
  if (const char* s = std::getenv("SMOE_SIMT_SCHEDULE")) {
    if (!parse_schedule(s, &o.schedule, &o.seed)) {
      std::fprintf(stderr,
                   "smoe-simt: SMOE_SIMT_SCHEDULE=%s is not forward, reverse, random or "
                   "random:SEED; using forward\n",
                   s);
    }
  }
  if (const char* s = std::getenv("SMOE_SIMT_PARALLEL")) o.parallel_blocks = std::atoi(s) != 0;
  if (const char* s = std::getenv("SMOE_SIMT_THREADS")) o.max_os_threads = std::max(1, std::atoi(s));
  if (const char* s = std::getenv("SMOE_SIMT_STACK_KB"))
    o.stack_bytes = static_cast<size_t>(std::max(16, std::atoi(s))) * 1024;
  if (const char* s = std::getenv("SMOE_SIMT_QUIET")) o.quiet = std::atoi(s) != 0;
  if (const char* s = std::getenv("SMOE_SIMT_SPIN_TIMEOUT")) {
    // A number of seconds >= 0 (strtod's syntax, nothing after it). Anything else (nan, inf, junk,
    // empty) would switch livelock detection off or make it fire at once: warn, keep the default.
    char* end = nullptr;
    errno = 0;
    const double v = std::strtod(s, &end);
    if (end != s && *end == '\0' && errno == 0 && std::isfinite(v) && v >= 0.0) {
      o.spin_timeout_s = v;
    } else {
      std::fprintf(stderr,
                   "smoe-simt: SMOE_SIMT_SPIN_TIMEOUT=%s is not a finite number of seconds >= 0; "
                   "using the default %g s\n",
                   s, o.spin_timeout_s);
    }
  }
  if (const char* s = std::getenv("SMOE_SIMT_DEVICES")) o.devices = std::max(1, std::atoi(s));
  if (const char* s = std::getenv("SMOE_SIMT_SM90A")) {
    long v = 0;
    if (parse_whole(s, 0, 1, &v))
      o.sm90a = v != 0;
    else
      std::fprintf(stderr, "smoe-simt: SMOE_SIMT_SM90A=%s is not 0 or 1; using 0\n", s);
  }
  if (const char* s = std::getenv("SMOE_SIMT_SMS")) {
    long v = 0;
    if (parse_whole(s, 1, INT_MAX, &v))
      o.sm_count = static_cast<int>(v);
    else
      std::fprintf(stderr, "smoe-simt: SMOE_SIMT_SMS=%s is not a whole number of multiprocessors >= 1; using %d\n", s,
                   o.sm_count);
  }
  if (const char* s = std::getenv("SMOE_SIMT_CP_ASYNC")) {
    if (!parse_cp_async_landing(s, &o.cp_async_landing, &o.cp_async_seed)) {
      std::fprintf(stderr,
                   "smoe-simt: SMOE_SIMT_CP_ASYNC=%s is not wait, issue, random or random:SEED; "
                   "using wait\n",
                   s);
    }
  }
  return o;
}
}  // namespace

Options options() {
  std::lock_guard<std::mutex> lock(g_options_mutex);
  if (!g_options_loaded) {
    g_options = options_from_env();
    g_options_loaded = true;
  }
  return g_options;
}

void set_options(const Options& o) {
  std::lock_guard<std::mutex> lock(g_options_mutex);
  g_options = o;
  // The livelock check compares `waited > spin_timeout_s`: NaN would disable it silently.
  if (!(o.spin_timeout_s >= 0.0)) g_options.spin_timeout_s = Options{}.spin_timeout_s;
  g_options_loaded = true;
}

namespace {
std::atomic<int64_t> g_wgmma_issued{0};
}  // namespace
int64_t wgmma_issued_total() { return g_wgmma_issued.load(std::memory_order_relaxed); }
void detail::count_wgmma_issue() { g_wgmma_issued.fetch_add(1, std::memory_order_relaxed); }

}  // namespace smoe::simt

namespace smoe::simt::detail {
namespace {

#if defined(SMOE_SIMT_ASAN)
constexpr size_t kDefaultStackBytes = 256 * 1024;
#else
constexpr size_t kDefaultStackBytes = 64 * 1024;
#endif

enum class Wait : uint8_t { kReady, kBarrier, kWarp, kExited };

struct Worker;
struct Block;

struct Copy {
  void* dst;
  const void* src;
  int bytes;
  int src_bytes;
  bool landed;
};

// Reads the source and writes the destination of a copy, once.
void land(Copy& c) {
  if (c.landed) return;
  if (c.src_bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
  if (c.bytes > c.src_bytes)
    std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
  c.landed = true;
}

// A copy that lands at scheduling point `due` of its block (CpAsyncLanding::kRandom).
struct DueCopy {
  uint64_t due;
  int fiber;
  uint64_t seq;  // the copy's sequence number in its fiber
  bool operator>(const DueCopy& o) const { return due > o.due; }
};

struct Fiber {
  ThreadState pub{};
  Context ctx;
  Worker* worker = nullptr;
  int linear = 0;
  Wait wait = Wait::kReady;
  const char* wait_name = nullptr;
  const char* wait_file = nullptr;
  int wait_line = 0;
  int bar_pred = 0;
  int bar_result = 0;
  int group = -1;                  // the warp group this fiber waits in
  std::vector<Copy> copies;        // cp.async, oldest first
  std::vector<size_t> group_ends;  // end index in `copies` of each committed group
  uint64_t first_seq = 0;          // sequence number of copies[0]
};

struct Group {
  const CollectiveKind* kind = nullptr;
  const char* file = nullptr;
  int line = 0;
  uint32_t mask = 0;
  uint32_t arrived = 0;
  uint32_t unread = 0;  // lanes that have not yet copied their result out
  bool complete = false;
  LaneIO io[32];
};

struct Warp {
  uint32_t exists = 0;
  uint32_t exited = 0;
  std::vector<int> groups;  // indices into Block::groups of the groups in use
};

struct Block {
  BlockState pub{};
  int nthreads = 0;
  int live = 0;
  int first_exited = -1;
  int bar_count = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
  int bar_first = -1;
  int bar_sum = 0, bar_and = 1, bar_or = 0;
  std::vector<Warp> warps;
  std::vector<Group> groups;
  std::vector<int> free_groups;
  bool failed = false;
  bool progress = false;
  uint64_t tick = 0;  // scheduling points so far (resumes of a fiber)
  std::priority_queue<DueCopy, std::vector<DueCopy>, std::greater<DueCopy>> due;  // kRandom landing
};

struct LaunchState {
  const LaunchDesc* desc = nullptr;
  Options opt;
  uint64_t launch_index = 0;
  uint64_t nblocks = 0;
  std::vector<uint64_t> block_order;    // random schedule: the shuffled block order
  uint64_t affine_a = 0, affine_b = 0;  // random schedule with more than 2^24 blocks

  // The linear index of the i-th block to run.
  uint64_t block_at(uint64_t i) const {
    switch (opt.schedule) {
      case Schedule::kForward:
      case Schedule::kWarps:
        return i;
      case Schedule::kReverse:
        return nblocks - 1 - i;
      case Schedule::kRandom:
        if (!block_order.empty()) return block_order[i];
        return static_cast<uint64_t>((static_cast<uint128>(affine_a) * i + affine_b) % nblocks);
    }
    return i;
  }
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string message;
  cudaError_t code = cudaErrorLaunchFailure;
};

struct TlsRange {
  char* base = nullptr;
  size_t size = 0;
};

inline thread_local Worker* tls_worker = nullptr;

struct Worker {
  Context main;
  std::vector<Fiber> fibers;
  std::vector<FiberStack> stacks;
  size_t stack_bytes = 0;
  bool guard_pages = true;
  Fiber* current = nullptr;
  Block block;
  LaunchState* launch = nullptr;
  std::vector<int> order;
  std::mt19937_64 rng;
  std::mt19937_64 landing_rng;  // CpAsyncLanding::kRandom
  std::unordered_map<const void*, TlsRange> tls_cache;

  Worker();
  ~Worker();
  char* alt_stack = nullptr;  // this OS thread's alternate signal stack (see the overflow guard)

  void run_launch(LaunchState& ls, uint64_t nworkers);
  void run_block(uint64_t linear);
  void poison_module_tls();
  void resume(Fiber& f);
  void land_due_copies();
  void schedule_round_order();
  std::string where_threads_wait() const;
  // Fixed-size, so that a name passed to fail_at owns no heap memory (see abandon_current).
  struct Name {
    char text[64];
    const char* c_str() const { return text; }
  };
  Name thread_name(int linear) const;
  void fail_in_scheduler(const std::string& message);
};

std::string format(const char* fmt, va_list ap) {
  va_list copy;
  va_copy(copy, ap);
  const int n = std::vsnprintf(nullptr, 0, fmt, copy);
  va_end(copy);
  std::string s(static_cast<size_t>(std::max(n, 0)), '\0');
  std::vsnprintf(s.data(), s.size() + 1, fmt, ap);
  return s;
}
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = format(fmt, ap);
  va_end(ap);
  return s;
}

Worker::Name Worker::thread_name(int linear) const {
  const dim3 d = block.pub.block_dim;
  const unsigned x = linear % d.x, y = (linear / d.x) % d.y, z = linear / (d.x * d.y);
  Name n;
  std::snprintf(n.text, sizeof(n.text), "thread (%u,%u,%u)", x, y, z);
  return n;
}

// One line per run of consecutive threads that wait at the same place.
std::string Worker::where_threads_wait() const {
  std::string out;
  auto describe = [&](const Fiber& f) -> std::string {
    if (&f == current) return "running (reports this error)";
    switch (f.wait) {
      case Wait::kReady:
        return "ready";
      case Wait::kExited:
        return "exited";
      case Wait::kBarrier:
        return format("wait at __syncthreads at %s:%d", f.wait_file, f.wait_line);
      case Wait::kWarp: {
        const Group& g = block.groups[f.group];
        return format("wait at %s (mask 0x%08x, arrived 0x%08x) at %s:%d", g.kind->name, g.mask, g.arrived, g.file,
                      g.line);
      }
    }
    return "?";
  };
  int start = 0;
  std::string cur = block.nthreads > 0 ? describe(fibers[0]) : "";
  for (int t = 1; t <= block.nthreads; ++t) {
    std::string d = t < block.nthreads ? describe(fibers[t]) : "";
    if (t == block.nthreads || d != cur) {
      if (t - 1 == start)
        out += format("    thread %d (warp %d, lane %d): %s\n", start, start / 32, start % 32, cur.c_str());
      else if (start / 32 == (t - 1) / 32)
        out += format("    threads %d-%d (warp %d): %s\n", start, t - 1, start / 32, cur.c_str());
      else
        out += format("    threads %d-%d (warps %d-%d): %s\n", start, t - 1, start / 32, (t - 1) / 32, cur.c_str());
      start = t;
      cur = d;
    }
  }
  return out;
}

void record_launch_failure(LaunchState& ls, const std::string& message, cudaError_t code = cudaErrorLaunchFailure) {
  std::lock_guard<std::mutex> lock(ls.mu);
  if (ls.failed.load()) return;
  ls.message = message;
  ls.code = code;
  ls.failed.store(true);
}

// Records a failure of the running fiber (first error of the launch wins) and fails its block.
// Callers then call abandon_current() outside the scope of their strings: an abandoned fiber's
// frames are never unwound, so anything they own on the heap would leak.
void record_current_failure(const std::string& what, cudaError_t code = cudaErrorLaunchFailure) {
  Worker* w = tls_worker;
  if (w == nullptr || w->current == nullptr) {
    std::fprintf(stderr, "smoe-simt: error outside a kernel: %s\n", what.c_str());
    std::abort();
  }
  Fiber& f = *w->current;
  const uint3 b = w->block.pub.block_idx;
  std::string msg = format("%s\n  in block (%u,%u,%u), %s\n  where the threads of the block are:\n", what.c_str(), b.x,
                           b.y, b.z, w->thread_name(f.linear).c_str());
  msg += w->where_threads_wait();
  record_launch_failure(*w->launch, msg, code);
  w->block.failed = true;
}

// Leaves the running fiber for good after record_current_failure.
[[noreturn]] void abandon_current() {
  Worker* w = tls_worker;
  Fiber& f = *w->current;
  f.wait = Wait::kExited;  // never resumed
  exit_to_context(f.ctx, w->main);
}

void Worker::fail_in_scheduler(const std::string& what) {
  const uint3 b = block.pub.block_idx;
  std::string msg =
      format("%s\n  in block (%u,%u,%u); where the threads of the block are:\n", what.c_str(), b.x, b.y, b.z);
  msg += where_threads_wait();
  record_launch_failure(*launch, msg);
  block.failed = true;
}

Fiber& current_fiber(const char* what) {
  Worker* w = tls_worker;
  if (w == nullptr || w->current == nullptr) {
    std::fprintf(stderr, "smoe-simt: %s called outside a kernel\n", what);
    std::abort();
  }
  return *w->current;
}

// Switches from the running fiber back to the worker; returns when the fiber is resumed.
void block_current(Fiber& f) {
  Worker* w = f.worker;
  switch_context(f.ctx, w->main);
  // Resumed: the scheduler set tls_worker/current before switching back.
}

void fiber_entry(void* arg) {
  Fiber& f = *static_cast<Fiber*>(arg);
  Worker& w = *f.worker;
  fiber_started(w.main);
  w.launch->desc->invoke(w.launch->desc->pack);

  // Thread exit: pending cp.async copies still land (as on the device).
  for (Copy& c : f.copies) land(c);
  f.first_seq += f.copies.size();
  f.copies.clear();
  f.group_ends.clear();

  Block& b = w.block;
  if (b.bar_count > 0) {
    record_current_failure(
        format("%s exits while %d thread(s) wait at __syncthreads at %s:%d: every thread of the "
               "block must reach the barrier (undefined behaviour in CUDA)",
               w.thread_name(f.linear).c_str(), b.bar_count, b.bar_file, b.bar_line));
    abandon_current();
  }
  Warp& warp = b.warps[f.pub.warp];
  for (int gi : warp.groups) {
    const Group& g = b.groups[gi];
    if (!g.complete && (g.mask >> f.pub.lane & 1u) && !(g.arrived >> f.pub.lane & 1u)) {
      record_current_failure(
          format("lane %u exits, but %s at %s:%d names it in its mask 0x%08x "
                 "and waits for it",
                 f.pub.lane, g.kind->name, g.file, g.line, g.mask));
      abandon_current();
    }
  }
  warp.exited |= 1u << f.pub.lane;
  f.wait = Wait::kExited;
  --b.live;
  if (b.first_exited < 0) b.first_exited = f.linear;
  b.progress = true;
  exit_to_context(f.ctx, w.main);
}

// CpAsyncLanding::kRandom: the copies whose scheduling point has come land before the next fiber
// runs. A copy already retired by its thread's wait (seq below first_seq) is gone.
void Worker::land_due_copies() {
  Block& b = block;
  while (!b.due.empty() && b.due.top().due <= b.tick) {
    const DueCopy d = b.due.top();
    b.due.pop();
    Fiber& f = fibers[static_cast<size_t>(d.fiber)];
    if (d.seq < f.first_seq || d.seq - f.first_seq >= f.copies.size()) continue;
    land(f.copies[static_cast<size_t>(d.seq - f.first_seq)]);
  }
}

void Worker::resume(Fiber& f) {
  ++block.tick;
  if (!block.due.empty()) land_due_copies();
  current = &f;
  tls_thread = &f.pub;
  switch_context(main, f.ctx);
  current = nullptr;
}

void Worker::schedule_round_order() {
  const int n = block.nthreads;
  order.resize(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) order[i] = i;
  switch (launch->opt.schedule) {
    case Schedule::kForward:
    case Schedule::kWarps:
      break;
    case Schedule::kReverse:
      std::reverse(order.begin(), order.end());
      break;
    case Schedule::kRandom:
      std::shuffle(order.begin(), order.end(), rng);
      break;
  }
}

int tls_range_callback(dl_phdr_info* info, size_t, void* data) {
  auto* q = static_cast<std::pair<uintptr_t, TlsRange>*>(data);
  bool inside = false;
  size_t tls_size = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_LOAD) {
      const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
      if (q->first >= lo && q->first < lo + ph.p_memsz) inside = true;
    } else if (ph.p_type == PT_TLS) {
      tls_size = ph.p_memsz;
    }
  }
  if (!inside) return 0;
  q->second = TlsRange{static_cast<char*>(info->dlpi_tls_data), tls_size};
  return 1;
}

// Refills this OS thread's copy of the kernel module's thread-local storage (which holds every
// static __shared__ variable of that module) with 0xff bytes. Device code has no thread_local of
// its own (CUDA forbids it), and the runtime's own thread-locals are set again right after.
void Worker::poison_module_tls() {
  const LaunchDesc& d = *launch->desc;
  auto it = tls_cache.find(d.kernel);
  if (it == tls_cache.end()) {
    d.tls_probe();  // makes sure the module's TLS block exists in this thread (dlopen'ed modules)
    std::pair<uintptr_t, TlsRange> q{reinterpret_cast<uintptr_t>(d.kernel), TlsRange{}};
    dl_iterate_phdr(&tls_range_callback, &q);
    it = tls_cache.emplace(d.kernel, q.second).first;
  }
  if (it->second.base == nullptr) return;
#if defined(SMOE_SIMT_ASAN)
  // glibc places a thread's TLS in its stack mapping, and reuses the mappings of finished
  // threads; ASan may still hold stack redzones of the previous owner there.
  ASAN_UNPOISON_MEMORY_REGION(it->second.base, it->second.size);
#endif
  std::memset(it->second.base, 0xff, it->second.size);
}

void Worker::run_block(uint64_t linear) {
  const LaunchDesc& d = *launch->desc;
  poison_module_tls();
  tls_worker = this;
  tls_thread = nullptr;
  current = nullptr;

  Block& b = block;
  b.pub.grid_dim = d.grid;
  b.pub.block_dim = d.block;
  b.pub.block_idx =
      uint3{static_cast<unsigned>(linear % d.grid.x), static_cast<unsigned>((linear / d.grid.x) % d.grid.y),
            static_cast<unsigned>(linear / (uint64_t{d.grid.x} * d.grid.y))};
  // Dynamic shared memory: a fresh heap block of exactly the requested size, so AddressSanitizer
  // reports accesses past its end; poisoned like the static part.
  std::unique_ptr<char, void (*)(void*)> smem(nullptr, &std::free);
  if (d.dynamic_smem > 0) {
    void* p = nullptr;
    if (posix_memalign(&p, 128, d.dynamic_smem) != 0) std::abort();
    smem.reset(static_cast<char*>(p));
    std::memset(p, 0xff, d.dynamic_smem);
  }
  b.pub.dynamic_smem = smem.get();
  b.pub.dynamic_smem_bytes = d.dynamic_smem;
  tls_block = &b.pub;

  const int n = static_cast<int>(d.block.x * d.block.y * d.block.z);
  b.nthreads = n;
  b.live = n;
  b.first_exited = -1;
  b.bar_count = 0;
  b.failed = false;
  const int nwarps = (n + 31) / 32;
  b.warps.assign(static_cast<size_t>(nwarps), Warp{});
  for (int w = 0; w < nwarps; ++w) {
    const int lanes = std::min(32, n - 32 * w);
    b.warps[w].exists = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  }
  b.free_groups.clear();
  for (int i = static_cast<int>(b.groups.size()) - 1; i >= 0; --i) b.free_groups.push_back(i);

  if (stacks.size() < static_cast<size_t>(n)) {
    fibers.resize(static_cast<size_t>(n));
    while (stacks.size() < static_cast<size_t>(n)) stacks.push_back(allocate_stack(stack_bytes, guard_pages));
  }
  for (int t = 0; t < n; ++t) {
    Fiber& f = fibers[t];
    f.worker = this;
    f.linear = t;
    f.pub.thread_idx = uint3{static_cast<unsigned>(t % d.block.x), static_cast<unsigned>((t / d.block.x) % d.block.y),
                             static_cast<unsigned>(t / (d.block.x * d.block.y))};
    f.pub.lane = static_cast<unsigned>(t % 32);
    f.pub.warp = static_cast<unsigned>(t / 32);
    f.wait = Wait::kReady;
    f.group = -1;
    f.copies.clear();
    f.group_ends.clear();
    f.first_seq = 0;
    f.ctx.fake_stack = nullptr;
#if defined(SMOE_SIMT_ASAN)
    // A fiber's last frames never return (they switch away for good), so their redzones stay
    // poisoned in the shadow memory; clear the whole stack before it hosts a new thread.
    ASAN_UNPOISON_MEMORY_REGION(stacks[t].lo, stacks[t].bytes);
#endif
    make_context(f.ctx, stacks[t], &fiber_entry, &f);
  }
  rng.seed(launch->opt.seed * 0x9e3779b97f4a7c15ull + launch->launch_index * 1000003ull + linear);
  landing_rng.seed(launch->opt.cp_async_seed * 0xbf58476d1ce4e5b9ull + launch->launch_index * 1000033ull + linear);
  b.tick = 0;
  while (!b.due.empty()) b.due.pop();

  using Clock = std::chrono::steady_clock;
  int yield_only_rounds = 0;
  Clock::time_point spin_start{};
  const bool parallel = launch->opt.parallel_blocks;
  while (b.live > 0) {
    if (launch->failed.load(std::memory_order_relaxed)) break;
    schedule_round_order();
    bool ran = false;
    b.progress = false;
    if (launch->opt.schedule == Schedule::kWarps) {
      // Each warp in turn runs until none of its lanes is ready (or 256 passes: a spinning warp).
      for (int w0 = 0; w0 < n && !b.failed; w0 += 32) {
        const int w1 = std::min(n, w0 + 32);
        for (int pass = 0; pass < 256 && !b.failed; ++pass) {
          bool any = false;
          for (int t = w0; t < w1; ++t) {
            if (fibers[t].wait != Wait::kReady) continue;
            resume(fibers[t]);
            any = ran = true;
            if (b.failed) break;
          }
          if (!any) break;
        }
      }
    } else {
      for (int idx : order) {
        Fiber& f = fibers[idx];
        if (f.wait != Wait::kReady) continue;
        resume(f);
        ran = true;
        if (b.failed) break;
      }
    }
    if (b.failed) break;
    if (!ran) {
      fail_in_scheduler(
          "deadlock: no thread of the block can proceed (each waits at a barrier or a warp "
          "collective that can never complete)");
      break;
    }
    if (b.progress) {
      yield_only_rounds = 0;
      continue;
    }
    // Only yields this round: threads spin on something. Let other OS threads run (parallel
    // mode); in sequential mode, a spin that outlasts SMOE_SIMT_SPIN_TIMEOUT is reported.
    if (parallel) sched_yield();
    if (++yield_only_rounds == 1) spin_start = Clock::now();
    if ((yield_only_rounds & 255) == 0 && !parallel) {
      const double timeout = launch->opt.spin_timeout_s;
      const double waited = std::chrono::duration<double>(Clock::now() - spin_start).count();
      if (waited > timeout) {
        fail_in_scheduler(
            format("livelock: for %.0f s the threads of the block only spun through atomics or fences "
                   "without reaching a barrier or exiting. Waiting for another block? Blocks run one "
                   "after another unless SMOE_SIMT_PARALLEL=1.",
                   waited));
        break;
      }
    }
  }

  for (int gi = 0; gi < static_cast<int>(b.groups.size()); ++gi) b.groups[gi].complete = false;
  tls_block = nullptr;
  tls_thread = nullptr;
}

void Worker::run_launch(LaunchState& ls, uint64_t nworkers) {
  launch = &ls;
  stack_bytes = ls.opt.stack_bytes ? ls.opt.stack_bytes : kDefaultStackBytes;
  // Guard pages for every stack unless that would take tens of thousands of mappings.
  const uint64_t threads = uint64_t{ls.desc->block.x} * ls.desc->block.y * ls.desc->block.z;
  guard_pages = threads * nworkers <= 16384;
  if (!stacks.empty() && stacks.front().bytes < stack_bytes) {
    for (auto& s : stacks) free_stack(s);
    stacks.clear();
  }
  for (;;) {
    const uint64_t i = ls.next.fetch_add(1);
    if (i >= ls.nblocks || ls.failed.load()) break;
    run_block(ls.block_at(i));
  }
  tls_worker = nullptr;
  launch = nullptr;
}

// The persistent worker of sequential mode: keeps its fiber stacks between launches. Never destroyed
// (see sequential_runner): at exit the process that started its thread stops and joins it, unless a
// launch is running; a forked child must never join a thread of its parent.
class SequentialRunner {
 public:
  const pid_t owner = getpid();
  SequentialRunner* abandoned = nullptr;  // the one this replaced after a fork, kept reachable

  void run(LaunchState& ls) {
    std::lock_guard<std::mutex> one_launch_at_a_time(run_mu_);
    std::unique_lock<std::mutex> lock(mu_);
    if (!thread_.joinable()) {
      stop_ = false;  // (a launch after shutdown, from a late static destructor, gets a new thread)
      thread_ = std::thread([this] { loop(); });
    }
    job_ = &ls;
    done_ = false;
    cv_.notify_all();
    cv_.wait(lock, [this] { return done_; });
  }

  void shutdown() {
    std::unique_lock<std::mutex> one_launch(run_mu_, std::try_to_lock);
    if (!one_launch.owns_lock()) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  void loop() {
    Worker worker;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return stop_ || job_ != nullptr; });
      if (stop_) return;
      LaunchState* ls = job_;
      lock.unlock();
      worker.run_launch(*ls, 1);
      lock.lock();
      job_ = nullptr;
      done_ = true;
      cv_.notify_all();
    }
  }
  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
  LaunchState* job_ = nullptr;
  bool done_ = false;
  bool stop_ = false;
};

// fork(): the child inherits the runner's memory but not its thread (and maybe a mutex held by a
// thread of the parent). Its first launch builds a fresh runner; the inherited one is leaked.
std::atomic<SequentialRunner*> g_runner{nullptr};
SequentialRunner* g_abandoned_runner = nullptr;
std::mutex g_runner_mu;

void forget_runner_in_child() {
  new (&g_runner_mu) std::mutex();  // the child is single-threaded here
  g_abandoned_runner = g_runner.exchange(nullptr, std::memory_order_relaxed);
}

SequentialRunner& sequential_runner() {
  SequentialRunner* r = g_runner.load(std::memory_order_acquire);
  if (r != nullptr && r->owner == getpid()) return *r;
  std::lock_guard<std::mutex> lock(g_runner_mu);
  r = g_runner.load(std::memory_order_relaxed);
  if (r == nullptr || r->owner != getpid()) {  // first launch, or a child forked without atfork handlers
    static std::once_flag atfork_once;
    std::call_once(atfork_once, [] { pthread_atfork(nullptr, nullptr, &forget_runner_in_child); });
    r = new SequentialRunner();
    r->abandoned = g_abandoned_runner != nullptr ? g_abandoned_runner : g_runner.load(std::memory_order_relaxed);
    g_abandoned_runner = nullptr;
    g_runner.store(r, std::memory_order_release);
  }
  return *r;
}

struct JoinRunnerAtExit {
  ~JoinRunnerAtExit() {
    SequentialRunner* r = g_runner.load(std::memory_order_acquire);
    if (r != nullptr && r->owner == getpid()) r->shutdown();
  }
} g_join_runner_at_exit;

// ---- fiber stack overflow guard -----------------------------------------------------------------
// A fiber that runs off the low end of its stack touches the PROT_NONE guard page below it
// (allocate_stack). The SIGSEGV handler runs on the worker thread's alternate signal stack (the
// fiber's own stack is exhausted), recognises an overflow of the running fiber (the fault in its
// guard page, or its stack pointer below its stack) and writes a report naming the kernel, its
// launch site, the block and the thread, using only async-signal-safe calls. The fiber cannot be
// resumed, so the process then ends with SIGSEGV as before. Any other fault goes to the handler
// that was installed before. Under AddressSanitizer, ASan's own stack-overflow report is used.
constexpr size_t kAltStackBytes = 64 * 1024;
struct sigaction g_prev_segv;
// Room for the demangled kernel name, allocated before any fault (__cxa_demangle reallocates it only
// for a longer name).
char* g_name_buf = nullptr;
size_t g_name_len = 0;

void write_err(const char* text) {
  size_t n = std::strlen(text);
  while (n > 0) {
    const ssize_t w = write(2, text, n);
    if (w <= 0) return;
    text += w;
    n -= static_cast<size_t>(w);
  }
}

void write_num(uint64_t v) {
  char buf[24];
  int i = sizeof(buf) - 1;
  buf[i] = '\0';
  do {
    buf[--i] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v != 0 && i > 0);
  write_err(buf + i);
}

uintptr_t fault_stack_pointer(void* uctx) {
#if defined(__x86_64__)
  return static_cast<uintptr_t>(static_cast<ucontext_t*>(uctx)->uc_mcontext.gregs[REG_RSP]);
#elif defined(__aarch64__)
  return static_cast<uintptr_t>(static_cast<ucontext_t*>(uctx)->uc_mcontext.sp);
#else
  (void)uctx;
  return 0;
#endif
}

void on_segv(int sig, siginfo_t* info, void* uctx) {
  Worker* w = tls_worker;
  bool overflow = false;
  if (w != nullptr && w->current != nullptr && w->launch != nullptr) {
    const size_t index = static_cast<size_t>(w->current - w->fibers.data());
    if (index < w->stacks.size()) {
      const FiberStack& st = w->stacks[index];
      const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
      const auto sp = fault_stack_pointer(uctx);
      const auto map_lo = reinterpret_cast<uintptr_t>(st.mapping);
      const auto lo = reinterpret_cast<uintptr_t>(st.lo);
      overflow = (addr >= map_lo && addr < lo) ||                // the guard page
                 (sp != 0 && sp < lo && sp + (1u << 20) >= lo);  // sp ran below the stack (no guard)
    }
  }
  if (!overflow) {
    sigaction(SIGSEGV, &g_prev_segv, nullptr);  // the fault is not ours: the previous handler
    return;                                     // (or the default action) sees it again
  }
  const LaunchDesc& d = *w->launch->desc;
  Dl_info dl{};
  const char* name = dladdr(d.kernel, &dl) != 0 && dl.dli_sname != nullptr ? dl.dli_sname : nullptr;
  if (name != nullptr && g_name_buf != nullptr) {
    int status = -1;
    size_t len = g_name_len;
    char* demangled = abi::__cxa_demangle(name, g_name_buf, &len, &status);
    if (status == 0 && demangled != nullptr) {
      g_name_buf = demangled;
      name = demangled;
    }
  }
  if (name == nullptr) name = "(name not exported: link with -rdynamic)";
  const uint3 b = w->block.pub.block_idx;
  write_err("smoe-simt: stack overflow in kernel ");
  write_err(name);
  write_err(" launched at ");
  write_err(d.file != nullptr ? d.file : "?");
  write_err(":");
  write_num(static_cast<uint64_t>(d.line));
  write_err(", block (");
  write_num(b.x);
  write_err(",");
  write_num(b.y);
  write_err(",");
  write_num(b.z);
  write_err("), thread ");
  write_num(static_cast<uint64_t>(w->current->linear));
  write_err(": its fiber stack of ");
  write_num(w->stack_bytes / 1024);
  write_err(" KiB is exhausted (large local arrays or deep recursion). Raise SMOE_SIMT_STACK_KB.\n");
  signal(sig, SIG_DFL);  // returning re-runs the faulting access: the process ends with SIGSEGV
}

void install_overflow_guard() {
#if !defined(SMOE_SIMT_ASAN)
  static std::once_flag once;
  std::call_once(once, [] {
    g_name_len = 1024;
    g_name_buf = static_cast<char*>(std::malloc(g_name_len));
    struct sigaction sa {};
    sa.sa_sigaction = &on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_prev_segv);
  });
#endif
}

Worker::Worker() {
#if !defined(SMOE_SIMT_ASAN)
  void* m = mmap(nullptr, kAltStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m != MAP_FAILED) {
    stack_t ss{};
    ss.ss_sp = m;
    ss.ss_size = kAltStackBytes;
    if (sigaltstack(&ss, nullptr) == 0) {
      alt_stack = static_cast<char*>(m);
    } else {
      munmap(m, kAltStackBytes);
    }
  }
#endif
}

Worker::~Worker() {
  for (auto& s : stacks) free_stack(s);
  if (alt_stack != nullptr) {
    stack_t ss{};
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, nullptr);
    munmap(alt_stack, kAltStackBytes);
  }
}

std::atomic<uint64_t> g_launch_counter{0};

}  // namespace

// Device-side entry points --------------------------------------------------------------------
void fail_at(const char* file, int line, const char* fmt, ...) {
  {
    va_list ap;
    va_start(ap, fmt);
    const std::string what = format(fmt, ap);
    va_end(ap);
    record_current_failure(format("%s:%d: %s", file, line, what.c_str()));
  }
  abandon_current();
}

void trap(const char* file, int line) { fail_at(file, line, "__trap() called"); }

bool in_kernel() { return tls_worker != nullptr && tls_worker->current != nullptr; }

[[noreturn]] void device_assert(const char* expr, const char* file, unsigned line, const char* function) {
  {
    const std::string what = format("%s:%u: %s: device-side assertion `%s' failed", file, line, function, expr);
    record_current_failure(what, cudaErrorAssert);
  }
  abandon_current();
}

void yield_point() {
  Worker* w = tls_worker;
  if (w == nullptr || w->current == nullptr) return;  // host code
  block_current(*w->current);
}

unsigned active_mask() {
  Fiber& f = current_fiber("__activemask");
  const Warp& warp = f.worker->block.warps[f.pub.warp];
  return warp.exists & ~warp.exited;
}

int sync_threads_reduce(int predicate, int op, const char* file, int line) {
  Fiber& f = current_fiber("__syncthreads");
  Worker& w = *f.worker;
  Block& b = w.block;
  if (b.first_exited >= 0) {
    fail_at(file, line,
            "__syncthreads reached by %s after %s exited: every thread of the block must reach "
            "the barrier (undefined behaviour in CUDA; exit early only after the last barrier)",
            w.thread_name(f.linear).c_str(), w.thread_name(b.first_exited).c_str());
  }
  if (b.bar_count > 0 && (b.bar_line != line || std::strcmp(b.bar_file, file) != 0)) {
    fail_at(file, line,
            "%s reaches this __syncthreads while %s waits at the __syncthreads at %s:%d: "
            "threads of a block must meet at the same barrier",
            w.thread_name(f.linear).c_str(), w.thread_name(b.bar_first).c_str(), b.bar_file, b.bar_line);
  }
  const Warp& warp = b.warps[f.pub.warp];
  for (int gi : warp.groups) {
    const Group& g = b.groups[gi];
    if (!g.complete && (g.mask >> f.pub.lane & 1u) && !(g.arrived >> f.pub.lane & 1u)) {
      fail_at(file, line,
              "deadlock: lane %u reaches __syncthreads while %s at %s:%d (mask 0x%08x) waits for "
              "it",
              f.pub.lane, g.kind->name, g.file, g.line, g.mask);
    }
  }
  if (b.bar_count == 0) {
    b.bar_file = file;
    b.bar_line = line;
    b.bar_first = f.linear;
    b.bar_sum = 0;
    b.bar_and = 1;
    b.bar_or = 0;
  }
  ++b.bar_count;
  const int p = predicate != 0;
  b.bar_sum += p;
  b.bar_and &= p;
  b.bar_or |= p;
  if (b.bar_count == b.live) {
    const int result = op == 0 ? b.bar_sum : op == 1 ? b.bar_and : b.bar_or;
    for (int t = 0; t < b.nthreads; ++t) {
      Fiber& o = w.fibers[t];
      if (o.wait == Wait::kBarrier) {
        o.wait = Wait::kReady;
        o.bar_result = result;
      }
    }
    b.bar_count = 0;
    b.progress = true;
    return result;
  }
  f.wait = Wait::kBarrier;
  f.wait_file = file;
  f.wait_line = line;
  block_current(f);
  return f.bar_result;
}

void sync_threads(const char* file, int line) { sync_threads_reduce(0, 0, file, line); }

void warp_collective(const CollectiveKind& kind, unsigned mask, LaneIO& io, const char* file, int line) {
  Fiber& f = current_fiber(kind.name);
  Worker& w = *f.worker;
  Block& b = w.block;
  Warp& warp = b.warps[f.pub.warp];
  const unsigned lane = f.pub.lane;
  const uint32_t bit = 1u << lane;
  if (!(mask & bit)) fail_at(file, line, "%s: the calling lane %u is not in the mask 0x%08x", kind.name, lane, mask);
  if (mask & ~warp.exists)
    fail_at(file, line, "%s: the mask 0x%08x names lanes 0x%08x that do not exist (the block has %d threads)",
            kind.name, mask, mask & ~warp.exists, b.nthreads);
  if (mask & warp.exited)
    fail_at(file, line, "%s: the mask 0x%08x names lanes 0x%08x that have exited", kind.name, mask, mask & warp.exited);

  auto same_kind = [&](const Group& g) { return g.kind == &kind || std::strcmp(g.kind->name, kind.name) == 0; };
  // Join the open group that names this lane, if any; it must be the same operation.
  int gi = -1;
  for (int candidate : warp.groups) {
    Group& g = b.groups[candidate];
    if (g.complete || !(g.mask & bit) || (g.arrived & bit)) continue;
    const bool site_ok = !kind.same_site_required || (g.line == line && std::strcmp(g.file, file) == 0);
    if (!same_kind(g) || !site_ok) {
      fail_at(file, line, "deadlock: lane %u reaches %s here, while %s at %s:%d (mask 0x%08x) waits for it", lane,
              kind.name, g.kind->name, g.file, g.line, g.mask);
    }
    if (g.mask != mask) {
      fail_at(file, line, "%s: lane %u passes mask 0x%08x, but lanes 0x%08x passed 0x%08x", kind.name, lane, mask,
              g.arrived, g.mask);
    }
    gi = candidate;
    break;
  }
  if (gi < 0) {
    // A new group. Every other lane it names must still be able to arrive.
    for (unsigned l = 0; l < 32; ++l) {
      if (l == lane || !(mask >> l & 1u)) continue;
      const Fiber& o = w.fibers[f.pub.warp * 32 + l];
      if (o.wait == Wait::kBarrier)
        fail_at(file, line, "deadlock: %s (mask 0x%08x) needs lane %u, which waits at __syncthreads at %s:%d",
                kind.name, mask, l, o.wait_file, o.wait_line);
      if (o.wait == Wait::kWarp) {
        const Group& og = b.groups[o.group];
        fail_at(file, line,
                "deadlock: %s (mask 0x%08x) needs lane %u, which waits at %s at %s:%d (mask "
                "0x%08x)",
                kind.name, mask, l, og.kind->name, og.file, og.line, og.mask);
      }
    }
    if (b.free_groups.empty()) {
      b.groups.emplace_back();
      gi = static_cast<int>(b.groups.size()) - 1;
    } else {
      gi = b.free_groups.back();
      b.free_groups.pop_back();
    }
    Group& g = b.groups[gi];
    g.kind = &kind;
    g.file = file;
    g.line = line;
    g.mask = mask;
    g.arrived = 0;
    g.unread = mask;
    g.complete = false;
    warp.groups.push_back(gi);
  }
  Group& g = b.groups[gi];
  g.io[lane] = io;
  g.arrived |= bit;
  if (g.arrived == g.mask) {
    kind.combine(g.mask, g.io, file, line);
    g.complete = true;
    for (unsigned l = 0; l < 32; ++l) {
      if (l == lane || !(g.mask >> l & 1u)) continue;
      w.fibers[f.pub.warp * 32 + l].wait = Wait::kReady;
    }
    b.progress = true;
  } else {
    f.wait = Wait::kWarp;
    f.group = gi;
    block_current(f);
  }
  // Group storage can move when another group is created meanwhile: index again.
  Group& done = b.groups[gi];
  std::memcpy(io.out, done.io[lane].out, sizeof(io.out));
  f.group = -1;
  done.unread &= ~bit;
  if (done.unread == 0) {
    done.complete = false;
    done.kind = nullptr;
    auto& list = warp.groups;
    list.erase(std::find(list.begin(), list.end(), gi));
    b.free_groups.push_back(gi);
  }
}

// cp.async ---------------------------------------------------------------------------------------
void cp_async(void* dst, const void* src, int bytes, int src_bytes, const char* file, int line) {
  Fiber& f = current_fiber("cp.async");
  if (src_bytes < 0 || src_bytes > bytes)
    fail_at(file, line, "cp.async: src-size %d outside [0, %d]", src_bytes, bytes);
  if (reinterpret_cast<uintptr_t>(dst) % static_cast<uintptr_t>(bytes) != 0)
    fail_at(file, line, "cp.async: shared destination %p is not %d-byte aligned", dst, bytes);
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % static_cast<uintptr_t>(bytes) != 0)
    fail_at(file, line, "cp.async: global source %p is not %d-byte aligned", src, bytes);
  f.copies.push_back(Copy{dst, src, bytes, src_bytes, false});
  Worker& w = *f.worker;
  switch (w.launch->opt.cp_async_landing) {
    case CpAsyncLanding::kWait:
      break;
    case CpAsyncLanding::kIssue:
      land(f.copies.back());
      break;
    case CpAsyncLanding::kRandom: {
      // A quarter land at issue, a quarter at the wait, the rest after 1..2^k scheduling points
      // (k uniform in 0..11: from the next thread switch to thousands of them later).
      const uint64_t r = w.landing_rng();
      const uint64_t kind = r & 3;
      if (kind == 0) {
        land(f.copies.back());
      } else if (kind != 1) {
        const uint64_t span = uint64_t{1} << ((r >> 2) % 12);
        const uint64_t delay = 1 + (r >> 8) % span;
        w.block.due.push(DueCopy{w.block.tick + delay, f.linear, f.first_seq + f.copies.size() - 1});
      }
      break;
    }
  }
}

void cp_async_commit() {
  Fiber& f = current_fiber("cp.async.commit_group");
  f.group_ends.push_back(f.copies.size());
}

void cp_async_wait(int keep_pending, const char* file, int line) {
  Fiber& f = current_fiber("cp.async.wait_group");
  (void)file;
  (void)line;
  if (keep_pending == 0 && (f.group_ends.empty() || f.group_ends.back() != f.copies.size()))
    f.group_ends.push_back(f.copies.size());  // wait_all also retires uncommitted copies
  const int groups = static_cast<int>(f.group_ends.size());
  const int retire = groups - keep_pending;
  if (retire <= 0) return;
  const size_t end = f.group_ends[static_cast<size_t>(retire - 1)];
  for (size_t i = 0; i < end; ++i) land(f.copies[i]);
  f.copies.erase(f.copies.begin(), f.copies.begin() + static_cast<std::ptrdiff_t>(end));
  f.first_seq += end;
  f.group_ends.erase(f.group_ends.begin(), f.group_ends.begin() + retire);
  for (size_t& e : f.group_ends) e -= end;
}

// Launch -----------------------------------------------------------------------------------------
cudaError_t launch(const LaunchDesc& d) {
  if (tls_worker != nullptr && tls_worker->current != nullptr) {
    fail_at(d.file, d.line,
            "kernel launch from device code (dynamic parallelism) is not "
            "supported by the emulator");
  }
  if (cudaError_t e = sticky_error(); e != cudaSuccess) return e;
  const uint64_t threads = uint64_t{d.block.x} * d.block.y * d.block.z;
  if (d.block.x == 0 || d.block.y == 0 || d.block.z == 0 || d.grid.x == 0 || d.grid.y == 0 || d.grid.z == 0 ||
      threads > kMaxThreadsPerBlock || d.block.x > 1024 || d.block.y > 1024 || d.block.z > kMaxBlockDimZ ||
      d.grid.x > kMaxGridDimX || d.grid.y > kMaxGridDimYZ || d.grid.z > kMaxGridDimYZ) {
    return record_error(cudaErrorInvalidConfiguration);
  }
  if (d.dynamic_smem > max_dynamic_smem(d.kernel)) return record_error(cudaErrorInvalidValue);
  // Devices: the launch runs on the current device, into a stream of that device, and every pointer
  // among its arguments (each aligned 8-byte word of the argument pack, struct members included)
  // that lies in a cudaMalloc allocation must belong to it.
  const int device = current_device();
  if (stream_device(d.stream) != device) return record_error(cudaErrorInvalidResourceHandle);
  for (size_t off = 0; off + sizeof(void*) <= d.pack_bytes; off += sizeof(void*)) {
    const void* p = nullptr;
    std::memcpy(&p, static_cast<const char*>(d.pack) + off, sizeof(p));
    const int owner = p == nullptr ? -1 : device_of_pointer(p);
    if (owner >= 0 && owner != device) {
      const std::string msg = format(
          "kernel launched at %s:%d on device %d is passed %p, which points into memory allocated on "
          "device %d: make the tensors' device current (cudaSetDevice) before launching",
          d.file, d.line, device, p, owner);
      if (!options().quiet) std::fprintf(stderr, "smoe-simt: %s\n", msg.c_str());
      record_kernel_error(cudaErrorIllegalAddress, msg);
      return cudaErrorIllegalAddress;
    }
  }

  LaunchState ls;
  ls.desc = &d;
  ls.opt = options();
  ls.launch_index = g_launch_counter.fetch_add(1);
  ls.nblocks = uint64_t{d.grid.x} * d.grid.y * d.grid.z;
  if (ls.opt.schedule == Schedule::kRandom) {
    std::mt19937_64 rng(ls.opt.seed ^ (ls.launch_index * 0x2545f4914f6cdd1dull));
    if (ls.nblocks <= (uint64_t{1} << 24)) {
      ls.block_order.resize(ls.nblocks);
      for (uint64_t i = 0; i < ls.nblocks; ++i) ls.block_order[i] = i;
      std::shuffle(ls.block_order.begin(), ls.block_order.end(), rng);
    } else {
      // Too many blocks to list: i -> (a*i + b) mod n with a coprime to n is a permutation.
      uint64_t a = rng() % ls.nblocks | 1;
      while (std::gcd(a, ls.nblocks) != 1) a += 2;
      ls.affine_a = a;
      ls.affine_b = rng() % ls.nblocks;
    }
  }

  install_overflow_guard();
  if (!ls.opt.parallel_blocks || ls.nblocks == 1) {
    sequential_runner().run(ls);
  } else {
    const uint64_t nworkers = std::min<uint64_t>(ls.nblocks, static_cast<uint64_t>(std::max(1, ls.opt.max_os_threads)));
    std::vector<std::thread> threads_;
    threads_.reserve(nworkers);
    for (uint64_t i = 0; i < nworkers; ++i) {
      threads_.emplace_back([&ls, nworkers] {
        Worker worker;
        worker.run_launch(ls, nworkers);
      });
    }
    for (auto& t : threads_) t.join();
  }

  if (ls.failed.load()) {
    const std::string msg = format("kernel launched at %s:%d failed:\n%s", d.file, d.line, ls.message.c_str());
    if (!ls.opt.quiet) std::fprintf(stderr, "smoe-simt: %s", msg.c_str());
    record_kernel_error(ls.code, msg);
    return ls.code;
  }
  return cudaSuccess;
}

}  // namespace smoe::simt::detail

// assert() in a kernel: glibc's assert macro calls __assert_fail, which this definition
// interposes (when the runtime is linked into the executable). Inside a kernel the failure becomes
// the sticky error cudaErrorAssert, as a device-side assert does; elsewhere it behaves like glibc's.
extern "C" [[noreturn]] void __assert_fail(const char* expr, const char* file, unsigned int line,
                                           const char* function) noexcept {
  if (smoe::simt::detail::in_kernel()) smoe::simt::detail::device_assert(expr, file, line, function);
  std::fprintf(stderr, "%s: %s:%u: %s: Assertion `%s' failed.\n", program_invocation_short_name, file, line, function,
               expr);
  std::abort();
}

long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

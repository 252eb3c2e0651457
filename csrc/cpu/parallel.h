// csrc/cpu/parallel.h: the CPU backend's thread pool.
//
// parallel_for(n, grain, fn) calls fn(begin, end) on disjoint chunks covering [0, n). The chunking
// depends only on n, grain and the thread count, never on timing, so results are deterministic as
// long as fn writes disjoint outputs. Nested calls run inline on the calling thread.
#pragma once

#include <cstdint>
#include <functional>

namespace smoe::cpu {

// Threads of the pool (default: hardware threads, or SMOE_NUM_THREADS).
int num_threads();
void set_num_threads(int n);

// Threads a parallel_for on this thread may use: num_threads(), capped by the innermost live
// ThreadLimit of the calling thread. Work splits that size themselves by thread count use this.
int usable_threads();

// Caps the parallel_for calls of the calling thread at `n` threads while it lives (n <= 0: no cap).
// csrc/core sets one from Exec::num_threads around every CPU backend call.
// TEACH: a thread_local cap instead of a pool per call: the pool's workers stay alive between ops
// (starting threads costs tens of microseconds), and a call asks for fewer of them by splitting its
// work into fewer chunks; the chunk boundaries depend only on n, grain and the cap.
class ThreadLimit {
 public:
  explicit ThreadLimit(int n);
  ~ThreadLimit();
  ThreadLimit(const ThreadLimit&) = delete;
  ThreadLimit& operator=(const ThreadLimit&) = delete;

 private:
  int previous_;
};

void parallel_for_impl(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

template <class F>
inline void parallel_for(int64_t n, int64_t grain, F&& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  if (n <= grain || usable_threads() <= 1) {
    fn(int64_t(0), n);
    return;
  }
  parallel_for_impl(n, grain, std::function<void(int64_t, int64_t)>(std::forward<F>(fn)));
}

}  // namespace smoe::cpu

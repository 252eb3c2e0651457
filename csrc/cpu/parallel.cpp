// A small persistent thread pool: workers sleep on a condition variable between jobs.
//
// Robustness rules (issue 9):
//   * A worker that fails to start (std::system_error from std::thread) leaves the pool with the
//     workers it really has: size() reports them, a job is split over them only, and
//     set_num_threads reports the failure.
//   * fork(): the child has the pool's memory but none of its threads. A pthread_atfork child
//     handler abandons the inherited pool (its mutexes may even be held by a thread that no longer
//     exists) and the child's next parallel_for builds a fresh one with the same thread count.
//   * The pool object is never destroyed. At exit, the process that started the workers stops and
//     joins them (unless a job is still running); a forked child never touches the threads of its
//     parent, which do not exist there.
#include "parallel.h"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace smoe::cpu {
namespace {

thread_local bool t_inside_pool = false;
thread_local int t_thread_limit = 0;  // ThreadLimit of this thread, 0: none

class Pool {
 public:
  explicit Pool(int n) : owner_(getpid()) {
    try {
      resize(n);
    } catch (const std::runtime_error&) {
      // A pool built implicitly (first parallel op, or in a forked child) keeps the workers it got.
    }
  }

  int size() const { return threads_.load(std::memory_order_relaxed); }
  pid_t owner() const { return owner_; }
  // The pool this one replaced after a fork, kept reachable (leak checkers stay quiet).
  Pool* abandoned = nullptr;

  // Throws std::runtime_error when a worker cannot be started; the pool then has the workers that
  // did start (size() says how many) and stays usable.
  void resize(int n) {
    std::lock_guard<std::mutex> run_lock(run_mu_);
    stop();
    n = std::max(1, n);
    quit_ = false;
    threads_.store(1, std::memory_order_relaxed);
    workers_.reserve(static_cast<size_t>(n - 1));
    // A new worker starts at the current generation: jobs that finished before it existed are not
    // its to run.
    for (int i = 1; i < n; ++i) {
      try {
        workers_.emplace_back([this, i, g = generation_] { worker(i, g); });
      } catch (const std::system_error& e) {
        threads_.store(i, std::memory_order_relaxed);
        throw std::runtime_error("set_num_threads: could not start thread " + std::to_string(i + 1) + " of " +
                                 std::to_string(n) + " (" + e.what() + "); the pool runs with " + std::to_string(i) +
                                 " thread(s)");
      }
      threads_.store(i + 1, std::memory_order_relaxed);
    }
  }

  // At most `limit` parts (limit <= 0: the pool's size).
  void run(int64_t n, int64_t grain, int limit, const std::function<void(int64_t, int64_t)>& fn) {
    std::lock_guard<std::mutex> run_lock(run_mu_);  // one job at a time
    const int64_t max_chunks = (n + grain - 1) / grain;
    const int threads = limit > 0 ? std::min(limit, size()) : size();
    const int parts = int(std::min<int64_t>(threads, max_chunks));
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      n_ = n;
      parts_ = parts;
      pending_ = parts - 1;
      ++generation_;
    }
    cv_.notify_all();
    t_inside_pool = true;
    chunk(0);
    t_inside_pool = false;
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return pending_ == 0; });
    fn_ = nullptr;
  }

  // At exit, in the owner: join the idle workers; skipped while a job runs on another thread.
  void shutdown() {
    std::unique_lock<std::mutex> run_lock(run_mu_, std::try_to_lock);
    if (run_lock.owns_lock()) stop();
  }

 private:
  void chunk(int part) {
    if (part >= parts_) return;
    const int64_t begin = n_ * part / parts_;
    const int64_t end = n_ * (part + 1) / parts_;
    if (begin < end) (*fn_)(begin, end);
  }

  void worker(int index, uint64_t seen) {
    t_inside_pool = true;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return quit_ || generation_ != seen; });
        if (quit_) return;
        seen = generation_;
      }
      if (index < parts_) {
        chunk(index);
        std::lock_guard<std::mutex> lk(mu_);
        if (--pending_ == 0) done_cv_.notify_one();
      }
    }
  }

  // Joins the workers; only ever called in the process that started them (the owner).
  void stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    threads_.store(1, std::memory_order_relaxed);  // a job after shutdown runs on the caller alone
  }

  const pid_t owner_;
  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  std::atomic<int> threads_{1};
  bool quit_ = false;
  uint64_t generation_ = 0;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int parts_ = 0;
  int pending_ = 0;
};

int default_threads() {
  if (const char* env = std::getenv("SMOE_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// The live pool, created on first use. Never deleted (see the top of the file): an abandoned pool
// of a parent process is leaked in the child on purpose (its std::thread objects would terminate()
// if destroyed without a join, and joining them is impossible there).
std::atomic<Pool*> g_pool{nullptr};
Pool* g_abandoned_pool = nullptr;  // the parent's pool in a forked child, until the child's own exists
std::mutex g_pool_mu;
int g_requested_threads = 0;  // the last set_num_threads (0: default), kept across fork

void forget_pool_in_child() {
  // Runs in the child right after fork, single-threaded: no lock needed (g_pool_mu itself may have
  // been held by another thread of the parent; start the child with a fresh one).
  new (&g_pool_mu) std::mutex();
  g_abandoned_pool = g_pool.exchange(nullptr, std::memory_order_relaxed);
}

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr && p->owner() == getpid()) return *p;
  std::lock_guard<std::mutex> lk(g_pool_mu);
  p = g_pool.load(std::memory_order_relaxed);
  if (p == nullptr || p->owner() != getpid()) {  // first use, or a child of a fork without atfork handlers
    static std::once_flag atfork_once;
    std::call_once(atfork_once, [] { pthread_atfork(nullptr, nullptr, &forget_pool_in_child); });
    p = new Pool(g_requested_threads > 0 ? g_requested_threads : default_threads());
    p->abandoned = g_abandoned_pool != nullptr ? g_abandoned_pool : g_pool.load(std::memory_order_relaxed);
    g_abandoned_pool = nullptr;
    g_pool.store(p, std::memory_order_release);
  }
  return *p;
}

struct JoinAtExit {
  ~JoinAtExit() {
    Pool* p = g_pool.load(std::memory_order_acquire);
    if (p != nullptr && p->owner() == getpid()) p->shutdown();
  }
} g_join_at_exit;

}  // namespace

int num_threads() { return pool().size(); }

int usable_threads() {
  const int n = num_threads();
  return t_thread_limit > 0 ? std::min(n, t_thread_limit) : n;
}

ThreadLimit::ThreadLimit(int n) : previous_(t_thread_limit) {
  // A nested limit can only lower the cap of the one around it.
  if (n > 0) t_thread_limit = previous_ > 0 ? std::min(previous_, n) : n;
}
ThreadLimit::~ThreadLimit() { t_thread_limit = previous_; }

void set_num_threads(int n) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lk(g_pool_mu);
    g_requested_threads = std::max(1, n);
  }
  p.resize(n);
}

void parallel_for_impl(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (t_inside_pool) {
    fn(0, n);
    return;
  }
  pool().run(n, grain, t_thread_limit, fn);
}

}  // namespace smoe::cpu

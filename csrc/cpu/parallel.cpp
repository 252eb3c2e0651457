// A small persistent thread pool: workers sleep on a condition variable between jobs.
#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace smoe::cpu {
namespace {

thread_local bool t_inside_pool = false;

class Pool {
 public:
  explicit Pool(int n) { resize(n); }
  ~Pool() { stop(); }

  int size() const { return threads_; }

  void resize(int n) {
    std::lock_guard<std::mutex> run_lock(run_mu_);
    stop();
    threads_ = std::max(1, n);
    quit_ = false;
    // A new worker starts at the current generation: jobs that finished before it existed are not
    // its to run.
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this, i, g = generation_] { worker(i, g); });
  }

  void run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    std::lock_guard<std::mutex> run_lock(run_mu_);  // one job at a time
    const int64_t max_chunks = (n + grain - 1) / grain;
    const int parts = int(std::min<int64_t>(threads_, max_chunks));
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

  void stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  int threads_ = 1;
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

Pool& pool() {
  static Pool p(default_threads());
  return p;
}

}  // namespace

int num_threads() { return pool().size(); }
void set_num_threads(int n) { pool().resize(n); }

void parallel_for_impl(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (t_inside_pool) {
    fn(0, n);
    return;
  }
  pool().run(n, grain, fn);
}

}  // namespace smoe::cpu

// comm_bench: all-to-all bandwidth of a smoe::comm::Communicator, reported as nccl-tests does
// (nccl-tests doc/PERFORMANCE.md): S = bytes each rank sends in one all-to-all (its whole send
// buffer, self block included), t = time of one call, algbw = S / t, busbw = algbw * (n - 1) / n.
//
//   comm_bench [--ranks N] [--min-bytes B] [--max-bytes B] [--iters I] [--nccl]
// Default: the in-process communicator with N threads as ranks (host memcpy; a teaching baseline).
// --nccl (builds with SMOE_HAVE_NCCL): one thread per GPU, N = the GPU count unless given,
// ncclSend/ncclRecv on device buffers, timed after a stream synchronize.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "comm/communicator.h"
#ifdef SMOE_HAVE_NCCL
#include <cuda_runtime.h>
#endif

using namespace smoe;
using namespace smoe::comm;

namespace {

struct Args {
  int ranks = 4;
  int64_t min_bytes = 1 << 10, max_bytes = 64 << 20;
  int iters = 20;
  bool nccl = false;
};

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// One size: every rank sends S/n bytes to each rank; returns the median time of one call on rank 0.
double time_size(int n, int64_t S, int iters, const std::function<Status(int, int64_t, int64_t, int)>& call) {
  std::vector<double> t(iters);
  std::vector<std::string> err(n);
  run_ranks(n, [&](int r) {
    for (int it = -2; it < iters; ++it) {  // 2 warm-up calls
      const double t0 = now_s();
      Status st = call(r, S, S / n, it);
      if (!st.ok()) err[r] = st.message();
      if (r == 0 && it >= 0) t[it] = now_s() - t0;
    }
  });
  for (auto& e : err)
    if (!e.empty()) {
      std::fprintf(stderr, "comm_bench: %s\n", e.c_str());
      std::exit(1);
    }
  std::sort(t.begin(), t.end());
  return t[iters / 2];
}

void report(const char* name, int n, int64_t S, double t) {
  const double algbw = static_cast<double>(S) / t / 1e9;
  const double busbw = algbw * (n - 1) / n;
  std::printf("%-10s %5d %12lld %12.1f %10.3f %10.3f\n", name, n, static_cast<long long>(S), t * 1e6, algbw, busbw);
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "comm_bench: %s needs a value\n", s.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (s == "--ranks")
      a.ranks = std::atoi(next());
    else if (s == "--min-bytes")
      a.min_bytes = std::atoll(next());
    else if (s == "--max-bytes")
      a.max_bytes = std::atoll(next());
    else if (s == "--iters")
      a.iters = std::atoi(next());
    else if (s == "--nccl")
      a.nccl = true;
    else {
      std::fprintf(stderr, "comm_bench: unknown argument %s\n", s.c_str());
      return 2;
    }
  }
  if (a.ranks < 1 || a.iters < 1 || a.min_bytes < 1 || a.max_bytes < a.min_bytes) {
    std::fprintf(stderr, "comm_bench: need --ranks >= 1, --iters >= 1, 1 <= --min-bytes <= --max-bytes\n");
    return 2;
  }
  std::printf("# all_to_all_v, busbw = algbw * (n-1)/n (nccl-tests)\n");
  std::printf("%-10s %5s %12s %12s %10s %10s\n", "comm", "n", "bytes/rank", "time_us", "algbw_GB/s", "busbw_GB/s");
  if (!a.nccl) {
    const int n = a.ranks;
    auto g = InProcessGroup::create(n);
    std::vector<std::vector<char>> send(n), recv(n);
    for (int64_t S = a.min_bytes; S <= a.max_bytes; S *= 4) {
      const int64_t per = std::max<int64_t>(S / n, 1);
      for (int r = 0; r < n; ++r) send[r].assign(per * n, char(r)), recv[r].assign(per * n, 0);
      std::vector<int64_t> c(n, per), d = displacements(c);
      const double t = time_size(n, per * n, a.iters, [&](int r, int64_t, int64_t, int) {
        return g->comm(r).all_to_all_v(send[r].data(), c.data(), d.data(), recv[r].data(), c.data(), d.data(),
                                       DType::kU8, nullptr);
      });
      report("inprocess", n, per * n, t);
    }
    return 0;
  }
#ifdef SMOE_HAVE_NCCL
  int gpus = 0;
  if (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus < 1) {
    std::fprintf(stderr, "comm_bench: --nccl needs a CUDA device\n");
    return 1;
  }
  const int n = std::min(a.ranks, gpus);
  const std::string id = nccl_unique_id();
  std::vector<std::unique_ptr<Communicator>> comms(n);
  std::vector<std::string> err(n);
  run_ranks(n, [&](int r) {
    Status st = make_nccl_communicator(id, r, n, r, &comms[r]);
    if (!st.ok()) err[r] = st.message();
  });
  for (auto& e : err)
    if (!e.empty()) {
      std::fprintf(stderr, "comm_bench: %s\n", e.c_str());
      return 1;
    }
  std::vector<void*> send(n), recv(n);
  std::vector<cudaStream_t> streams(n);
  for (int r = 0; r < n; ++r) {
    cudaSetDevice(r);
    cudaMalloc(&send[r], a.max_bytes + 64);
    cudaMalloc(&recv[r], a.max_bytes + 64);
    cudaStreamCreate(&streams[r]);
  }
  for (int64_t S = a.min_bytes; S <= a.max_bytes; S *= 4) {
    const int64_t per = std::max<int64_t>(S / n, 1);
    std::vector<int64_t> c(n, per), d = displacements(c);
    const double t = time_size(n, per * n, a.iters, [&](int r, int64_t, int64_t, int) {
      cudaSetDevice(r);
      Status st =
          comms[r]->all_to_all_v(send[r], c.data(), d.data(), recv[r], c.data(), d.data(), DType::kU8, streams[r]);
      cudaStreamSynchronize(streams[r]);
      return st;
    });
    report("nccl", n, per * n, t);
  }
  return 0;
#else
  std::fprintf(stderr, "comm_bench: built without NCCL (configure with SMOE_NCCL_ROOT or a system NCCL)\n");
  return 1;
#endif
}

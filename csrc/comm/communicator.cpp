// Shared checks and the in-process group (threads as ranks) of csrc/comm/communicator.h.
#include "comm/communicator.h"

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

namespace smoe::comm {

Status check_all_to_all_v(const char* op, int size, const void* send, const int64_t* send_counts,
                          const int64_t* send_displs, const void* recv, const int64_t* recv_counts,
                          const int64_t* recv_displs) {
  if (!send_counts || !send_displs || !recv_counts || !recv_displs)
    return invalid_argument(op, "counts", "send/recv counts and displacements (one per rank)", "null");
  for (int p = 0; p < size; ++p) {
    if (send_counts[p] < 0 || send_displs[p] < 0)
      return invalid_argument(
          op, "send_counts", "counts and displacements >= 0",
          std::to_string(send_counts[p]) + " / " + std::to_string(send_displs[p]) + " for rank " + std::to_string(p));
    if (recv_counts[p] < 0 || recv_displs[p] < 0)
      return invalid_argument(
          op, "recv_counts", "counts and displacements >= 0",
          std::to_string(recv_counts[p]) + " / " + std::to_string(recv_displs[p]) + " for rank " + std::to_string(p));
    if (send_counts[p] > 0 && !send) return invalid_argument(op, "send", "a buffer (counts > 0)", "null");
    if (recv_counts[p] > 0 && !recv) return invalid_argument(op, "recv", "a buffer (counts > 0)", "null");
  }
  return Status::Ok();
}

std::vector<int64_t> displacements(const std::vector<int64_t>& counts) {
  std::vector<int64_t> d(counts.size(), 0);
  for (size_t i = 1; i < counts.size(); ++i) d[i] = d[i - 1] + counts[i - 1];
  return d;
}

void run_ranks(int size, const std::function<void(int)>& fn) {
  std::vector<std::thread> ts;
  for (int r = 0; r < size; ++r) ts.emplace_back(fn, r);
  for (auto& t : ts) t.join();
}

namespace {

// Every rank posts its send side, waits for all (barrier 1), checks every pair, copies what peers
// posted for it, and waits again (barrier 2) so no send buffer is reused while a peer still reads it.
class Group;

class InProcessComm final : public Communicator {
 public:
  InProcessComm(Group* g, int rank) : g_(g), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override;
  const char* name() const override { return "inprocess"; }
  Device device() const override { return Device::kCPU; }
  Status all_to_all_v(const void* send, const int64_t* send_counts, const int64_t* send_displs, void* recv,
                      const int64_t* recv_counts, const int64_t* recv_displs, DType dtype, void* stream) override;

 private:
  Group* g_;
  int rank_;
};

struct Posted {
  const char* send = nullptr;
  const int64_t* send_counts = nullptr;
  const int64_t* send_displs = nullptr;
  const int64_t* recv_counts = nullptr;
  DType dtype = DType::kF32;
  bool valid = false;
};

class Group final : public InProcessGroup {
 public:
  Group(int size, int64_t timeout_ms) : size_(size), timeout_ms_(timeout_ms), posted_(size) {
    for (int r = 0; r < size; ++r) comms_.push_back(std::make_unique<InProcessComm>(this, r));
  }
  int size() const override { return size_; }
  Communicator& comm(int rank) override { return *comms_.at(rank); }

  // Generation barrier with a timeout; false on timeout (the group is then broken for good).
  bool barrier() {
    std::unique_lock<std::mutex> lk(mu_);
    if (broken_) return false;
    const int64_t gen = gen_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
      return true;
    }
    if (!cv_.wait_for(lk, std::chrono::milliseconds(timeout_ms_), [&] { return gen_ != gen || broken_; })) {
      broken_ = true;
      cv_.notify_all();
      return false;
    }
    return !broken_;
  }

  std::vector<Posted>& posted() { return posted_; }
  int64_t timeout_ms() const { return timeout_ms_; }

 private:
  int size_;
  int64_t timeout_ms_;
  std::vector<Posted> posted_;
  std::vector<std::unique_ptr<InProcessComm>> comms_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  int64_t gen_ = 0;
  bool broken_ = false;
};

int InProcessComm::size() const { return g_->size(); }

Status InProcessComm::all_to_all_v(const void* send, const int64_t* send_counts, const int64_t* send_displs, void* recv,
                                   const int64_t* recv_counts, const int64_t* recv_displs, DType dtype,
                                   void* /*stream*/) {
  const char* op = "all_to_all_v";
  const int P = g_->size();
  Status st = check_all_to_all_v(op, P, send, send_counts, send_displs, recv, recv_counts, recv_displs);
  Posted& me = g_->posted()[rank_];
  me = Posted{static_cast<const char*>(send), send_counts, send_displs, recv_counts, dtype, st.ok()};
  const Status timeout(Code::kDeviceError, std::string(op) + ": rank " + std::to_string(rank_) +
                                               ": not every rank joined within " + std::to_string(g_->timeout_ms()) +
                                               " ms");
  if (!g_->barrier()) return timeout;
  // Every rank sees every posting: all reach the same verdict.
  Status verdict = Status::Ok();
  for (int p = 0; p < P && verdict.ok(); ++p) {
    const Posted& a = g_->posted()[p];
    if (!a.valid) {
      verdict =
          Status(Code::kInvalidArgument, std::string(op) + ": rank " + std::to_string(p) + " passed invalid arguments" +
                                             (p == rank_ ? ": " + st.message() : ""));
      break;
    }
    if (a.dtype != me.dtype) {
      verdict =
          invalid_argument(op, "dtype", "the same dtype on every rank", "a different one on rank " + std::to_string(p));
      break;
    }
    for (int q = 0; q < P; ++q) {
      const Posted& b = g_->posted()[q];
      if (b.valid && a.send_counts[q] != b.recv_counts[p]) {
        verdict = invalid_argument(op, "recv_counts",
                                   "rank " + std::to_string(q) + " to expect from rank " + std::to_string(p) + " the " +
                                       std::to_string(a.send_counts[q]) + " elements it sends",
                                   std::to_string(b.recv_counts[p]));
        break;
      }
    }
  }
  if (verdict.ok()) {
    const int64_t es = dtype_size(dtype);
    char* out = static_cast<char*>(recv);
    for (int p = 0; p < P; ++p) {
      const Posted& a = g_->posted()[p];
      const int64_t n = recv_counts[p];
      if (n > 0)
        std::memcpy(out + recv_displs[p] * es, a.send + a.send_displs[rank_] * es, static_cast<size_t>(n * es));
    }
  }
  if (!g_->barrier()) return timeout;
  return verdict;
}

}  // namespace

std::shared_ptr<InProcessGroup> InProcessGroup::create(int size, int64_t timeout_ms) {
  if (size < 1) return nullptr;
  return std::make_shared<Group>(size, timeout_ms);
}

}  // namespace smoe::comm

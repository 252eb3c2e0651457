// smoe/comm: communicators for expert parallelism (ARCHITECTURE.md section 2b).
//
// A Communicator is one rank of a group of size() ranks. all_to_all_v sends, to every peer p,
// send_counts[p] elements starting at send + send_displs[p], and receives recv_counts[p] elements from
// p at recv + recv_displs[p] (counts and displacements in elements of dtype; one per peer, self
// included). Every rank of the group must make the same calls in the same order; the counts must
// agree pairwise (what p sends to q is what q expects from p).
//
// Implementations: InProcessGroup (threads of one process as ranks, host memory; for tests, teaching
// and the CPU microbenchmark) and, when built with NCCL (SMOE_HAVE_NCCL), NcclCommunicator (device
// memory, ncclSend/ncclRecv inside ncclGroupStart/End on a caller's stream).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "smoe/dtype.h"
#include "smoe/status.h"
#include "smoe/tensor.h"

namespace smoe::comm {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* name() const = 0;
  virtual Device device() const = 0;  // where the buffers of all_to_all_v live
  virtual Status all_to_all_v(const void* send, const int64_t* send_counts, const int64_t* send_displs, void* recv,
                              const int64_t* recv_counts, const int64_t* recv_displs, DType dtype, void* stream) = 0;
};

// Checks shared by the implementations: counts/displacements >= 0, buffers present where counts > 0.
Status check_all_to_all_v(const char* op, int size, const void* send, const int64_t* send_counts,
                          const int64_t* send_displs, const void* recv, const int64_t* recv_counts,
                          const int64_t* recv_displs);

// Exclusive prefix sum: displacements of rank-major blocks of the given counts.
std::vector<int64_t> displacements(const std::vector<int64_t>& counts);

// ---- in-process group -----------------------------------------------------------------------------
// Threads as ranks. InProcessGroup::create(n) makes the shared rendezvous; comm(r) is rank r's
// communicator (use each from its own thread). A collective that not every rank joins within
// timeout_ms fails with kDeviceError on the ranks that waited (never a hang); a pairwise count
// mismatch fails on every rank with kInvalidArgument naming both ranks.
class InProcessGroup {
 public:
  static std::shared_ptr<InProcessGroup> create(int size, int64_t timeout_ms = 60000);
  virtual ~InProcessGroup() = default;
  virtual int size() const = 0;
  virtual Communicator& comm(int rank) = 0;
};

// Runs fn(rank) on `size` threads and joins them (test and benchmark helper).
void run_ranks(int size, const std::function<void(int)>& fn);

#ifdef SMOE_HAVE_NCCL
// ---- NCCL -------------------------------------------------------------------------------------------
// The unique id is made once by one rank (nccl_unique_id) and handed to every rank by the caller
// (MPI, a file, torch.distributed's store, ...); 128 bytes.
std::string nccl_unique_id();
// Status out: kDeviceError with NCCL's message when ncclCommInitRank fails.
Status make_nccl_communicator(const std::string& unique_id, int rank, int size, int cuda_device,
                              std::unique_ptr<Communicator>* out);
#endif

}  // namespace smoe::comm

// NcclCommunicator: all_to_all_v as ncclSend/ncclRecv pairs inside one ncclGroupStart/End, on the
// caller's CUDA stream. Compiled only when NCCL is found (SMOE_HAVE_NCCL); runs only on GPUs.
#ifdef SMOE_HAVE_NCCL
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>

#include "comm/communicator.h"

namespace smoe::comm {
namespace {

Status nccl_error(const char* op, ncclResult_t r) {
  return Status(Code::kDeviceError, std::string(op) + ": NCCL error: " + ncclGetErrorString(r));
}

bool nccl_type(DType t, ncclDataType_t* out) {
  switch (t) {
    case DType::kF32:
      *out = ncclFloat32;
      return true;
    case DType::kF16:
      *out = ncclFloat16;
      return true;
    case DType::kBF16:
      *out = ncclBfloat16;
      return true;
    case DType::kF64:
      *out = ncclFloat64;
      return true;
    case DType::kI32:
      *out = ncclInt32;
      return true;
    case DType::kI64:
      *out = ncclInt64;
      return true;
    case DType::kU8:
      *out = ncclUint8;
      return true;
  }
  return false;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t c, int rank, int size) : comm_(c), rank_(rank), size_(size) {}
  ~NcclCommunicator() override { ncclCommDestroy(comm_); }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* name() const override { return "nccl"; }
  Device device() const override { return Device::kCUDA; }

  Status all_to_all_v(const void* send, const int64_t* send_counts, const int64_t* send_displs, void* recv,
                      const int64_t* recv_counts, const int64_t* recv_displs, DType dtype, void* stream) override {
    const char* op = "all_to_all_v";
    SMOE_RETURN_IF_ERROR(check_all_to_all_v(op, size_, send, send_counts, send_displs, recv, recv_counts, recv_displs));
    ncclDataType_t t;
    if (!nccl_type(dtype, &t)) return invalid_argument(op, "dtype", "a dtype NCCL can send", "");
    const int64_t es = dtype_size(dtype);
    auto s = static_cast<cudaStream_t>(stream);
    ncclResult_t r = ncclGroupStart();
    if (r != ncclSuccess) return nccl_error(op, r);
    for (int p = 0; p < size_; ++p) {
      if (send_counts[p] > 0) {
        r = ncclSend(static_cast<const char*>(send) + send_displs[p] * es, static_cast<size_t>(send_counts[p]), t, p,
                     comm_, s);
        if (r != ncclSuccess) break;
      }
      if (recv_counts[p] > 0) {
        r = ncclRecv(static_cast<char*>(recv) + recv_displs[p] * es, static_cast<size_t>(recv_counts[p]), t, p, comm_,
                     s);
        if (r != ncclSuccess) break;
      }
    }
    const ncclResult_t end = ncclGroupEnd();
    if (r != ncclSuccess) return nccl_error(op, r);
    if (end != ncclSuccess) return nccl_error(op, end);
    return Status::Ok();
  }

 private:
  ncclComm_t comm_;
  int rank_, size_;
};

}  // namespace

std::string nccl_unique_id() {
  ncclUniqueId id;
  if (ncclGetUniqueId(&id) != ncclSuccess) return std::string();
  return std::string(id.internal, sizeof(id.internal));
}

Status make_nccl_communicator(const std::string& unique_id, int rank, int size, int cuda_device,
                              std::unique_ptr<Communicator>* out) {
  const char* op = "make_nccl_communicator";
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal))
    return invalid_argument(op, "unique_id", std::to_string(sizeof(id.internal)) + " bytes (nccl_unique_id())",
                            std::to_string(unique_id.size()) + " bytes");
  if (size < 1 || rank < 0 || rank >= size)
    return invalid_argument(op, "rank", "0 <= rank < size (size >= 1)",
                            std::to_string(rank) + " of " + std::to_string(size));
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  if (cudaSetDevice(cuda_device) != cudaSuccess)
    return Status(Code::kDeviceError, std::string(op) + ": cudaSetDevice(" + std::to_string(cuda_device) + ") failed");
  ncclComm_t c;
  const ncclResult_t r = ncclCommInitRank(&c, size, id, rank);
  if (r != ncclSuccess) return nccl_error(op, r);
  *out = std::make_unique<NcclCommunicator>(c, rank, size);
  return Status::Ok();
}

}  // namespace smoe::comm
#endif  // SMOE_HAVE_NCCL

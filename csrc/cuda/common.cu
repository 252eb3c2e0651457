// Host helpers of the CUDA backend shared by every launcher file (csrc/cuda/common.cuh).
#include "backend.h"
#include "common.cuh"

namespace smoe::SMOE_CUDA_NS {
namespace {

const char* hint_for(cudaError_t err) {
  switch (err) {
    case cudaErrorMemoryAllocation:
      return "the device is out of memory: free cached memory (torch.cuda.empty_cache()) or use smaller "
             "batches";
    case cudaErrorInvalidConfiguration:
    case cudaErrorLaunchOutOfResources:
      return "a launch configuration exceeds the device's limits: this is a bug in smoe's launcher, please "
             "report the op and the shapes";
    case cudaErrorIllegalAddress:
      return "a kernel accessed memory out of bounds: check that every tensor lives on the current device, "
             "then rerun with backend 'simt' or compute-sanitizer to locate the access";
    case cudaErrorNoDevice:
    case cudaErrorInvalidDevice:
      return "no usable CUDA device: check CUDA_VISIBLE_DEVICES, or run with backend 'cpu' or 'simt'";
    case cudaErrorInvalidDeviceFunction:
      return "this build has no kernel image for the device's architecture: rebuild with "
             "CMAKE_CUDA_ARCHITECTURES including it";
    default:
      return "an asynchronous error from an earlier launch may surface here: rerun with "
             "CUDA_LAUNCH_BLOCKING=1 to find where it starts";
  }
}

}  // namespace

Status cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  std::string m(expr);
  m.append(" failed at ").append(file).append(":").append(std::to_string(line)).append(": ");
  m.append(cudaGetErrorString(err)).append("; ").append(hint_for(err));
  return Status(Code::kDeviceError, std::move(m));
}

DeviceGuard::DeviceGuard(int device) {
  if (device < 0) return;
  int current = 0;
  if (const cudaError_t e = cudaGetDevice(&current); e != cudaSuccess) {
    static_cast<void>(status_ = cuda_error(e, "cudaGetDevice(&current)", __FILE__, __LINE__));
    return;
  }
  if (current == device) return;
  if (const cudaError_t e = cudaSetDevice(device); e != cudaSuccess) {
    static_cast<void>(status_ = cuda_error(e, "cudaSetDevice(device)", __FILE__, __LINE__));
    return;
  }
  previous_ = current;
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) (void)cudaSetDevice(previous_);
}

Status f64_unsupported(const char* op) {
  return unsupported(op,
                     "f64 tensors run on the CPU backend only (they exist for gradient checks); use backend "
                     "'cpu' or convert to f32");
}

}  // namespace smoe::SMOE_CUDA_NS

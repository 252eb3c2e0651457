// The kernel-version switch of the CUDA backend (csrc/cuda/backend_api.inc, docs/cuda.md "Kernel
// versions"): which of the teaching ladder's rungs a launcher runs, per op family.
//   1  the fast kernels (the default): csrc/cuda/{topk_gating,routing,permute}.cu
//   0  the naive kernels of csrc/cuda/naive/: one thread per token or row, the simplest correct code
// The first read takes SMOE_CUDA_KERNEL_VERSION from the environment: "0" or "1" for every op, or a
// comma list of op=version ("permute=0,routing_plan=0"; names as kernel_op_name). Process-wide; set
// it between launches, not while another thread is launching.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../common.cuh"
#include "naive.h"

namespace smoe::SMOE_CUDA_NS {
namespace {

constexpr const char* kOpNames[kNumKernelOps] = {"topk_gating", "routing_plan", "permute", "combine"};

std::atomic<int>* versions() {
  static std::atomic<int> v[kNumKernelOps];
  static const bool initialised = [] {
    for (auto& x : v) x.store(1);
    const char* env = std::getenv("SMOE_CUDA_KERNEL_VERSION");
    if (env == nullptr || *env == '\0') return true;
    const std::string s(env);
    if (s == "0" || s == "1") {
      for (auto& x : v) x.store(s[0] - '0');
      return true;
    }
    size_t pos = 0;
    while (pos <= s.size()) {  // op=version items; unknown names and values are ignored
      const size_t end = s.find(',', pos) == std::string::npos ? s.size() : s.find(',', pos);
      const std::string item = s.substr(pos, end - pos);
      const size_t eq = item.find('=');
      if (eq != std::string::npos) {
        const std::string name = item.substr(0, eq), val = item.substr(eq + 1);
        for (int i = 0; i < kNumKernelOps; ++i) {
          if (name == kOpNames[i] && (val == "0" || val == "1")) v[i].store(val[0] - '0');
        }
      }
      pos = end + 1;
    }
    return true;
  }();
  (void)initialised;
  return v;
}

}  // namespace

const char* kernel_op_name(KernelOp op) {
  const int i = static_cast<int>(op);
  return i >= 0 && i < kNumKernelOps ? kOpNames[i] : "unknown";
}

int kernel_version(KernelOp op) {
  const int i = static_cast<int>(op);
  return i >= 0 && i < kNumKernelOps ? versions()[i].load(std::memory_order_relaxed) : 1;
}

Status set_kernel_version(KernelOp op, int version) {
  const int i = static_cast<int>(op);
  if (i < 0 || i >= kNumKernelOps) {
    return invalid_argument("set_kernel_version", "op", "a KernelOp in [0, " + std::to_string(kNumKernelOps) + ")",
                            std::to_string(i));
  }
  if (version != 0 && version != 1) {
    return invalid_argument("set_kernel_version", "version", "0 (naive v0) or 1 (fast v1)", std::to_string(version));
  }
  versions()[i].store(version, std::memory_order_relaxed);
  return Status::Ok();
}

}  // namespace smoe::SMOE_CUDA_NS

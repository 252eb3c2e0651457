// The kernel-version switch of the CUDA backend (csrc/cuda/backend_api.inc, docs/cuda.md "Kernel
// versions"): which of the teaching ladder's rungs a launcher runs, per op family.
//   1  the fast kernels (the default): csrc/cuda/{topk_gating,routing,permute}.cu
//   0  the naive kernels of csrc/cuda/naive/: one thread per token or row, the simplest correct code
//      (grouped_gemm: the v0 GEMMs of csrc/cuda/grouped_gemm_naive.cu, the tensor-core launchers refuse)
// The first read takes SMOE_CUDA_KERNEL_VERSION from the environment: "0" or "1" for every op, or a
// comma list of op=version ("permute=0,routing_plan=0"; names as kernel_op_name); anything else is
// reported on stderr and leaves every op on 1 (parse_kernel_versions). Process-wide; set it between
// launches, not while another thread is launching.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "../common.cuh"
#include "naive.h"

namespace smoe::SMOE_CUDA_NS {
namespace {

constexpr const char* kOpNames[kNumKernelOps] = {"topk_gating", "routing_plan", "permute", "combine", "grouped_gemm"};

std::atomic<int>* versions() {
  static std::atomic<int> v[kNumKernelOps];
  static const bool initialised = [] {
    int parsed[kNumKernelOps];
    const Status st = parse_kernel_versions(std::getenv("SMOE_CUDA_KERNEL_VERSION"), parsed);
    if (!st.ok()) {
      std::fprintf(stderr, "smoe: SMOE_CUDA_KERNEL_VERSION ignored, every op family runs v1: %s\n",
                   st.message().c_str());
      for (int& x : parsed) x = 1;
    }
    for (int i = 0; i < kNumKernelOps; ++i) v[i].store(parsed[i]);
    return true;
  }();
  (void)initialised;
  return v;
}

}  // namespace

Status parse_kernel_versions(const char* spec, int (&versions)[kNumKernelOps]) {
  constexpr const char* op = "SMOE_CUDA_KERNEL_VERSION";
  int out[kNumKernelOps];
  for (int& x : out) x = 1;
  const std::string s = spec == nullptr ? std::string() : std::string(spec);
  if (s == "0" || s == "1") {
    for (int& x : out) x = s[0] - '0';
  } else {
    size_t pos = 0;
    while (pos < s.size()) {
      const size_t comma = s.find(',', pos);
      const size_t end = comma == std::string::npos ? s.size() : comma;
      const std::string item = s.substr(pos, end - pos);
      pos = end + 1;
      if (item.empty()) continue;
      const size_t eq = item.find('=');
      const std::string name = item.substr(0, eq);
      int i = 0;
      while (i < kNumKernelOps && name != kOpNames[i]) ++i;
      const std::string val = eq == std::string::npos ? std::string() : item.substr(eq + 1);
      if (eq == std::string::npos || i == kNumKernelOps || (val != "0" && val != "1")) {
        return invalid_argument(op, "item",
                                "0, 1, or a comma list of name=0 / name=1 with names topk_gating, routing_plan, "
                                "permute, combine, grouped_gemm",
                                "'" + item + "'");
      }
      out[i] = val[0] - '0';
    }
  }
  for (int i = 0; i < kNumKernelOps; ++i) versions[i] = out[i];
  return Status::Ok();
}

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

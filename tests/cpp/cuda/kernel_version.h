// tests/cpp/cuda/kernel_version.h: runs a block of an emulated test with one kernel family switched to
// a given rung of the teaching ladder (csrc/cuda/naive/, docs/cuda.md "Kernel versions"), restoring
// the previous version afterwards, so the v0 kernels go through the same schedule tests as v1.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "cuda/backend.h"

namespace smoe::testing {

class KernelVersionScope {
 public:
  KernelVersionScope(cuda_simt::KernelOp op, int version) : op_(op), previous_(cuda_simt::kernel_version(op)) {
    const Status st = cuda_simt::set_kernel_version(op, version);
    EXPECT_TRUE(st.ok()) << st.message();
  }
  ~KernelVersionScope() { (void)cuda_simt::set_kernel_version(op_, previous_); }
  KernelVersionScope(const KernelVersionScope&) = delete;
  KernelVersionScope& operator=(const KernelVersionScope&) = delete;

 private:
  cuda_simt::KernelOp op_;
  int previous_;
};

inline std::string version_trace(cuda_simt::KernelOp op) {
  return std::string(cuda_simt::kernel_op_name(op)) + " kernel v" + std::to_string(cuda_simt::kernel_version(op));
}

}  // namespace smoe::testing

// csrc/cuda/naive/naive.h: how the fast launchers (csrc/cuda/{topk_gating,routing,permute}.cu) reach
// the naive v0 kernels of this folder. Each launcher starts with
//
//   if (kernel_version(KernelOp::kPermute) == 0) return permute_forward_v0(x, token_of_row, xs, stream);
//
// (the v0 launchers and the switch are declared in csrc/cuda/backend_api.inc; docs/cuda.md,
// "Kernel versions"). Plain C++, included inside no namespace.
#pragma once

#include "../backend.h"

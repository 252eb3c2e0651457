// csrc/cuda/backend.h: the host launchers of the CUDA backend, for the dispatchers in csrc/core.
//
// Two namespaces carry the same declarations (csrc/cuda/backend_api.inc):
//   smoe::cuda       the .cu files compiled by nvcc (library smoe_cuda, SMOE_HAVE_CUDA=1)
//   smoe::cuda_simt  the same .cu files compiled by g++ through the SIMT emulator (library
//                    smoe_cuda_simt, SMOE_HAVE_CUDA_SIMT=1); pointers are host memory
// Contract of every launcher: arguments were validated by the entry point in csrc/core (shapes,
// dtypes, devices, params); the launcher dispatches on dtype once, enqueues its kernels on `stream`
// and returns without synchronising the host. Data-dependent checks the CPU backend makes (NaN
// logits, indices out of range) cannot be reported without a host sync: the kernels follow the
// documented device rules instead (docs/cuda.md, "Data rules"). f64 returns kUnsupported.
//
// This header compiles with plain g++: it never includes a CUDA header.
#pragma once

#include "smoe/smoe.h"

namespace smoe::cuda {
#include "backend_api.inc"
}  // namespace smoe::cuda

namespace smoe::cuda_simt {
#include "backend_api.inc"
}  // namespace smoe::cuda_simt

// smoe kernel portability header: include it from every kernel source. It gives the same spelling
// under nvcc (real GPU) and under the SIMT emulator (g++ with `-include smoe/simt/simt.h`, which
// defines SMOE_SIMT to 1). Shared code tests SMOE_SIMT, never __CUDA_ARCH__.
//
//   SMOE_LAUNCH(kernel, grid, block, dynamic_smem_bytes, stream, args...)
//       launches and evaluates to the launch's cudaError_t (cudaGetLastError: the error is taken
//       and reported by this launch, not left pending for whichever library checks next). A kernel
//       name with template commas goes in
//       parentheses: SMOE_LAUNCH((my_kernel<float, 4>), grid, block, 0, stream, ...).
//   SMOE_DYNAMIC_SMEM(T, name)
//       declares the block's dynamic shared memory as `name`, usable as T name[].
//   smoe::simt::mma_*, ldmatrix_*, cp_async_*   (smoe/simt/tensor_core.h)
#pragma once

#if defined(SMOE_SIMT) && SMOE_SIMT
#include "smoe/simt/simt.h"

namespace smoe::simt::detail {
// As the nvcc spelling's cudaGetLastError: the launch's error is returned and no longer pending.
inline cudaError_t take_launch_error(cudaError_t launched) {
  const cudaError_t last = cudaGetLastError();
  return launched != cudaSuccess ? launched : last;
}
}  // namespace smoe::simt::detail
#define SMOE_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::smoe::simt::detail::take_launch_error(                  \
      ::smoe::simt::detail::make_launcher(kernel, grid, block, smem, stream)(__VA_ARGS__))
#define SMOE_DYNAMIC_SMEM(T, name) T* const name = static_cast<T*>(::smoe::simt::detail::tls_block->dynamic_smem)

#else  // nvcc
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

// clang-format 14 splits the launch chevrons of a macro body into "< < <": keep it as written.
// clang-format off
#define SMOE_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((kernel)<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__), cudaGetLastError())
// clang-format on
#define SMOE_DYNAMIC_SMEM(T, name) extern __shared__ __align__(16) T name[]
#endif

#include "smoe/simt/tensor_core.h"

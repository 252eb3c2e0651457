// csrc/core/dispatch.h: steps 2-4 of every public entry point.
//
// Every entry point in csrc/core runs the same four steps, in this order:
//   1. validate every argument (csrc/core/check.h);
//   2. resolve the backend: kAuto from the device of `ref`, the tensors' device against the backend,
//      and whether this build has it (so a wrong backend fails the same way for every op, with or
//      without work);
//   3. return Ok when there is no work (has_work == false);
//   4. dispatch: smoe::cpu::<fn>(args...) for kCpu, run with at most exec.num_threads threads of the
//      pool when it is > 0, or the device launcher smoe::cuda::<fn>(args..., stream) /
//      smoe::cuda_simt::<fn>(args..., nullptr) for kCuda / kSimt (csrc/cuda/dispatch.h).
//
//   SMOE_RETURN_IF_ERROR(...validation...);
//   return SMOE_DISPATCH_WORK(op, exec, logits, /*has_work=*/T > 0, topk_gating_forward, params, logits, ...);
//
// SMOE_DISPATCH(op, exec, ref, fn, ...) is the same with has_work = true (ops that always write
// something, e.g. a loss of zero tokens). An op whose backends treat empty work differently calls
// detail::dispatch with its own two callables (csrc/core/mlp.cpp: the CPU returns early on zero
// rows, the device launchers decide themselves, so an f64 refusal is still reported).
#pragma once

#include <string>

#include "cpu/parallel.h"
#include "cuda/dispatch.h"
#include "smoe/tensor.h"

namespace smoe::detail {

// Step 2 beyond resolve_backend: the backend is part of this build, exec.num_threads is valid.
inline Status check_backend_in_build(const char* op, const Exec& exec, Backend b) {
  if (exec.num_threads < 0) {
    return invalid_argument(op, "exec.num_threads", ">= 0 (0 = every thread of the CPU pool)",
                            std::to_string(exec.num_threads));
  }
#if !(defined(SMOE_HAVE_CUDA) && SMOE_HAVE_CUDA)
  if (b == Backend::kCuda) return device_backend_missing(op, b);
#endif
#if !(defined(SMOE_HAVE_CUDA_SIMT) && SMOE_HAVE_CUDA_SIMT)
  if (b == Backend::kSimt) return device_backend_missing(op, b);
#endif
  (void)b;
  return Status::Ok();
}

template <class CpuFn, class DeviceFn>
Status dispatch(const char* op, const Exec& exec, const TensorView& ref, bool has_work, CpuFn&& cpu_fn,
                DeviceFn&& device_fn) {
  Backend b;
  SMOE_RETURN_IF_ERROR(resolve_backend(op, exec, ref, &b));
  SMOE_RETURN_IF_ERROR(check_backend_in_build(op, exec, b));
  if (!has_work) return Status::Ok();
  if (b == Backend::kCpu) {
    const cpu::ThreadLimit limit(exec.num_threads);
    return cpu_fn();
  }
  return device_fn(b);
}

}  // namespace smoe::detail

#define SMOE_DISPATCH_WORK(op, exec, ref, has_work, fn, ...)                 \
  ::smoe::detail::dispatch(                                                  \
      op, exec, ref, has_work, [&] { return ::smoe::cpu::fn(__VA_ARGS__); }, \
      [&](::smoe::Backend smoe_b_) { return SMOE_DEVICE_DISPATCH(op, smoe_b_, exec, fn, __VA_ARGS__); })

#define SMOE_DISPATCH(op, exec, ref, fn, ...) SMOE_DISPATCH_WORK(op, exec, ref, true, fn, __VA_ARGS__)

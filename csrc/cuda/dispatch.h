// csrc/cuda/dispatch.h: one-line dispatch from a csrc/core entry point to the device backends.
//
// After validation and resolve_backend, an entry point writes
//
//   if (b == Backend::kCpu) return cpu::topk_gating_forward(params, logits, ...);
//   return SMOE_DEVICE_DISPATCH("topk_gating_forward", b, exec, topk_gating_forward, params, logits, ...);
//
// kCuda calls smoe::cuda::<fn>(args..., exec.stream) under a DeviceGuard set to the device of the first
// CUDA tensor among the arguments (validation has checked that they all share it) when the build has nvcc (SMOE_HAVE_CUDA, from the
// smoe_cuda_dispatch CMake target), kSimt calls smoe::cuda_simt::<fn>(args..., nullptr) when the
// emulated backend is linked (SMOE_HAVE_CUDA_SIMT); otherwise the result is kUnsupported saying why.
// Plain C++: no CUDA header is included.
#pragma once

#include "smoe/smoe.h"

#if (defined(SMOE_HAVE_CUDA) && SMOE_HAVE_CUDA) || (defined(SMOE_HAVE_CUDA_SIMT) && SMOE_HAVE_CUDA_SIMT)
#include "backend.h"
#endif

#include <type_traits>

namespace smoe::detail {

// The device index of the first defined CUDA TensorView among the arguments; -1 when there is none.
inline int cuda_device_of() { return -1; }
template <class A, class... Rest>
int cuda_device_of(const A& a, const Rest&... rest) {
  if constexpr (std::is_same_v<A, TensorView>) {
    if (a.defined() && a.device == Device::kCUDA) return a.device_index;
  }
  return cuda_device_of(rest...);
}

// Runs f() with `device` current (Guard: smoe::cuda::DeviceGuard or smoe::cuda_simt::DeviceGuard).
template <class Guard, class F>
Status on_device(int device, F&& f) {
  Guard guard(device);
  if (!guard.status().ok()) return guard.status();
  return f();
}

// The launcher's arguments are taken (and ignored) so that a build without the backend has no
// unused-parameter warnings in the entry points.
template <class... Args>
Status device_backend_missing(const char* op, Backend b, const Args&...) {
  if (b == Backend::kCuda) {
    return unsupported(op,
                       "backend 'cuda' is not part of this build (nvcc was not found or SMOE_ENABLE_CUDA=OFF); "
                       "rebuild with the CUDA toolkit, or use backend 'cpu' or 'simt'");
  }
  if (b == Backend::kSimt) {
    return unsupported(op, "backend 'simt' is not part of this build (smoe_cuda_simt is not linked)");
  }
  return Status(Code::kInternal, std::string(op) + ": SMOE_DEVICE_DISPATCH reached with a non-device backend");
}

}  // namespace smoe::detail

#if defined(SMOE_HAVE_CUDA) && SMOE_HAVE_CUDA
#define SMOE_DETAIL_CUDA_CALL(op, fn, stream, ...)                                                  \
  ::smoe::detail::on_device<::smoe::cuda::DeviceGuard>(::smoe::detail::cuda_device_of(__VA_ARGS__), \
                                                       [&] { return ::smoe::cuda::fn(__VA_ARGS__, stream); })
#else
#define SMOE_DETAIL_CUDA_CALL(op, fn, stream, ...) \
  ::smoe::detail::device_backend_missing(op, ::smoe::Backend::kCuda, stream, __VA_ARGS__)
#endif

#if defined(SMOE_HAVE_CUDA_SIMT) && SMOE_HAVE_CUDA_SIMT
#define SMOE_DETAIL_SIMT_CALL(op, fn, ...) ::smoe::cuda_simt::fn(__VA_ARGS__, nullptr)
#else
#define SMOE_DETAIL_SIMT_CALL(op, fn, ...) \
  ::smoe::detail::device_backend_missing(op, ::smoe::Backend::kSimt, __VA_ARGS__)
#endif

// Evaluates to the Status of the device launcher selected by `backend` (kCuda or kSimt).
#define SMOE_DEVICE_DISPATCH(op, backend, exec, fn, ...)                                             \
  ((backend) == ::smoe::Backend::kCuda   ? SMOE_DETAIL_CUDA_CALL(op, fn, (exec).stream, __VA_ARGS__) \
   : (backend) == ::smoe::Backend::kSimt ? SMOE_DETAIL_SIMT_CALL(op, fn, __VA_ARGS__)                \
                                         : ::smoe::detail::device_backend_missing(op, backend))

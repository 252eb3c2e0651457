// csrc/core/dispatch.h: the one dispatch point of every public entry point.
//
//   return SMOE_DISPATCH(op, exec, ref, topk_gating_forward, params, logits, ...);
//
// resolves the backend from exec and the device of `ref` (smoe/tensor.h: resolve_backend), then
// calls smoe::cpu::<fn>(args...) for kCpu, or the device launcher smoe::cuda::<fn>(args..., stream)
// / smoe::cuda_simt::<fn>(args..., nullptr) for kCuda / kSimt (csrc/cuda/dispatch.h), which answers
// kUnsupported with the reason when that backend is not part of the build.
#pragma once

#include "cuda/dispatch.h"
#include "smoe/tensor.h"

namespace smoe::detail {

template <class CpuFn, class DeviceFn>
Status dispatch(const char* op, const Exec& exec, const TensorView& ref, CpuFn&& cpu_fn, DeviceFn&& device_fn) {
  Backend b;
  SMOE_RETURN_IF_ERROR(resolve_backend(op, exec, ref, &b));
  if (b == Backend::kCpu) return cpu_fn();
  return device_fn(b);
}

}  // namespace smoe::detail

#define SMOE_DISPATCH(op, exec, ref, fn, ...)                                              \
  ::smoe::detail::dispatch(                                                                \
      op, exec, ref, [&] { return ::smoe::cpu::fn(__VA_ARGS__); },                         \
      [&](::smoe::Backend smoe_b_) { return SMOE_DEVICE_DISPATCH(op, smoe_b_, exec, fn, __VA_ARGS__); })

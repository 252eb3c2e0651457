// smoe SIMT emulator: state shared between the scheduler and the runtime API (internal).
#pragma once

#include <cstddef>
#include <string>

#include "smoe/simt/launch.h"
#include "smoe/simt/runtime_api.h"

namespace smoe::simt::detail {

// Limits of the emulated device: an sm_90 part (H100), as the launch checks see it.
inline constexpr int kMaxThreadsPerBlock = 1024;
inline constexpr int kMaxBlockDimZ = 64;
inline constexpr unsigned kMaxGridDimX = 2147483647u;
inline constexpr unsigned kMaxGridDimYZ = 65535u;
inline constexpr size_t kDefaultMaxDynamicSmem = 48 * 1024;
inline constexpr size_t kMaxDynamicSmemOptin = 227 * 1024;

// A configuration or API error: returned by the call and by the next cudaGetLastError.
cudaError_t record_error(cudaError_t error);
// A fault inside a kernel: sticky, as a real device's context would be after the fault.
void record_kernel_error(cudaError_t error, const std::string& message);
cudaError_t sticky_error();
size_t max_dynamic_smem(const void* kernel);
// The calling host thread's current device (cudaSetDevice), the device a stream belongs to (the
// legacy and per-thread streams: the current one), and the device of the cudaMalloc allocation that
// contains p (-1: none; host memory, for instance).
int current_device();
int stream_device(cudaStream_t stream);
int device_of_pointer(const void* p);

}  // namespace smoe::simt::detail

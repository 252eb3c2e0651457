// smoe SIMT emulator: the CUDA runtime API subset (memory, streams, events, errors, device
// properties). Everything is synchronous; "device" memory is host memory.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "internal.h"
#include "smoe/simt/runtime_api.h"

struct CUstream_st {
  unsigned flags;
  int device;  // the device current when the stream was created
};
struct CUevent_st {
  std::chrono::steady_clock::time_point when;
  bool recorded;
};

namespace smoe::simt::detail {
namespace {

struct State {
  std::mutex mu;
  cudaError_t last = cudaSuccess;
  cudaError_t sticky = cudaSuccess;
  std::string sticky_text;
  struct Alloc {
    size_t bytes;
    int device;  // the device current at cudaMalloc
  };
  std::map<uintptr_t, Alloc> device_allocs;  // by address, for the launch's pointer check
  std::unordered_set<void*> host_allocs;
  std::unordered_map<const void*, size_t> max_dyn_smem;
  size_t bytes_in_use = 0;
};

State& state() {
  static State* s = new State();  // never destroyed: launches may outlive static destructors
  return *s;
}

// The current device is per host thread, as in CUDA.
thread_local int tls_current_device = 0;

constexpr size_t kTotalMem = size_t{80} << 30;

const char* base_error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInitializationError:
      return "initialization error";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidPitchValue:
      return "invalid pitch argument";
    case cudaErrorInvalidSymbol:
      return "invalid device symbol";
    case cudaErrorInvalidDevicePointer:
      return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection:
      return "invalid copy direction for memcpy";
    case cudaErrorInvalidDeviceFunction:
      return "invalid device function";
    case cudaErrorNoDevice:
      return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle:
      return "invalid resource handle";
    case cudaErrorNotReady:
      return "device not ready";
    case cudaErrorIllegalAddress:
      return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources:
      return "too many resources requested for launch";
    case cudaErrorLaunchTimeout:
      return "the launch timed out and was terminated";
    case cudaErrorAssert:
      return "device-side assert triggered";
    case cudaErrorIllegalInstruction:
      return "an illegal instruction was encountered";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
    default:
      return "unknown error";
  }
}

// API calls made after a kernel fault fail with the fault, as on a device.
cudaError_t api_result(cudaError_t e) {
  const cudaError_t s = sticky_error();
  if (s != cudaSuccess) return s;
  return e == cudaSuccess ? e : record_error(e);
}

}  // namespace

cudaError_t record_error(cudaError_t error) {
  if (error != cudaSuccess) {
    std::lock_guard<std::mutex> lock(state().mu);
    state().last = error;
  }
  return error;
}

void record_kernel_error(cudaError_t error, const std::string& message) {
  std::lock_guard<std::mutex> lock(state().mu);
  if (state().sticky != cudaSuccess) return;
  state().sticky = error;
  state().sticky_text = std::string(base_error_string(error)) + " [smoe-simt] " + message;
  while (!state().sticky_text.empty() && state().sticky_text.back() == '\n') state().sticky_text.pop_back();
}

int current_device() { return tls_current_device; }

int stream_device(cudaStream_t stream) {
  if (stream == nullptr || stream == cudaStreamLegacy || stream == cudaStreamPerThread) return tls_current_device;
  return stream->device;
}

int device_of_pointer(const void* p) {
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(state().mu);
  auto it = state().device_allocs.upper_bound(u);
  if (it == state().device_allocs.begin()) return -1;
  --it;
  return u < it->first + it->second.bytes ? it->second.device : -1;
}

cudaError_t sticky_error() {
  std::lock_guard<std::mutex> lock(state().mu);
  return state().sticky;
}

size_t max_dynamic_smem(const void* kernel) {
  std::lock_guard<std::mutex> lock(state().mu);
  auto it = state().max_dyn_smem.find(kernel);
  return it == state().max_dyn_smem.end() ? kDefaultMaxDynamicSmem : it->second;
}

cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (func == nullptr) return api_result(cudaErrorInvalidDeviceFunction);
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > kMaxDynamicSmemOptin) return api_result(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> lock(state().mu);
    state().max_dyn_smem[func] = static_cast<size_t>(value);
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) {
    return (value < -1 || value > 100) ? api_result(cudaErrorInvalidValue) : api_result(cudaSuccess);
  }
  return api_result(cudaErrorInvalidValue);
}

cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* func) {
  if (attr == nullptr || func == nullptr) return api_result(cudaErrorInvalidValue);
  std::memset(attr, 0, sizeof(*attr));
  attr->maxThreadsPerBlock = kMaxThreadsPerBlock;
  attr->numRegs = 32;
  attr->ptxVersion = 90;
  attr->binaryVersion = 90;
  attr->maxDynamicSharedSizeBytes = static_cast<int>(max_dynamic_smem(func));
  return api_result(cudaSuccess);
}

cudaError_t occupancy(int* blocks, const void* func, int block_size, size_t dynamic_smem) {
  if (blocks == nullptr || func == nullptr || block_size <= 0) return api_result(cudaErrorInvalidValue);
  const int warps = (block_size + 31) / 32;
  int n = std::min(32, 64 / warps);
  const size_t per_block = dynamic_smem + 1024;
  n = std::min<int>(n, static_cast<int>((228 * 1024) / per_block));
  *blocks = std::max(0, n);
  return api_result(cudaSuccess);
}

cudaError_t memcpy_symbol(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (dst == nullptr || src == nullptr) return api_result(cudaErrorInvalidValue);
  return cudaMemcpy(dst, src, bytes, kind);
}

}  // namespace smoe::simt::detail

using smoe::simt::detail::api_result;
using smoe::simt::detail::record_error;
using smoe::simt::detail::state;
using smoe::simt::detail::tls_current_device;
using State = decltype(smoe::simt::detail::state());

// Errors -----------------------------------------------------------------------------------------
cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lock(state().mu);
  if (state().sticky != cudaSuccess) return state().sticky;
  const cudaError_t e = state().last;
  state().last = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::mutex> lock(state().mu);
  return state().sticky != cudaSuccess ? state().sticky : state().last;
}

const char* cudaGetErrorString(cudaError_t error) {
  std::lock_guard<std::mutex> lock(state().mu);
  if (error != cudaSuccess && error == state().sticky) return state().sticky_text.c_str();
  return smoe::simt::detail::base_error_string(error);
}

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
#define SMOE_SIMT_NAME(e) \
  case e:                 \
    return #e;
    SMOE_SIMT_NAME(cudaSuccess)
    SMOE_SIMT_NAME(cudaErrorInvalidValue)
    SMOE_SIMT_NAME(cudaErrorMemoryAllocation)
    SMOE_SIMT_NAME(cudaErrorInitializationError)
    SMOE_SIMT_NAME(cudaErrorInvalidConfiguration)
    SMOE_SIMT_NAME(cudaErrorInvalidPitchValue)
    SMOE_SIMT_NAME(cudaErrorInvalidSymbol)
    SMOE_SIMT_NAME(cudaErrorInvalidDevicePointer)
    SMOE_SIMT_NAME(cudaErrorInvalidMemcpyDirection)
    SMOE_SIMT_NAME(cudaErrorInvalidDeviceFunction)
    SMOE_SIMT_NAME(cudaErrorNoDevice)
    SMOE_SIMT_NAME(cudaErrorInvalidDevice)
    SMOE_SIMT_NAME(cudaErrorInvalidResourceHandle)
    SMOE_SIMT_NAME(cudaErrorNotReady)
    SMOE_SIMT_NAME(cudaErrorIllegalAddress)
    SMOE_SIMT_NAME(cudaErrorLaunchOutOfResources)
    SMOE_SIMT_NAME(cudaErrorLaunchTimeout)
    SMOE_SIMT_NAME(cudaErrorAssert)
    SMOE_SIMT_NAME(cudaErrorIllegalInstruction)
    SMOE_SIMT_NAME(cudaErrorLaunchFailure)
#undef SMOE_SIMT_NAME
    default:
      return "cudaErrorUnknown";
  }
}

// Device -----------------------------------------------------------------------------------------
// SMOE_SIMT_DEVICES (Options::devices) emulated devices share the host's memory; each allocation
// and stream remembers the device that was current when it was made, and a launch checks them.
cudaError_t cudaGetDeviceCount(int* count) {
  if (!count) return api_result(cudaErrorInvalidValue);
  *count = smoe::simt::options().devices;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  if (!device) return api_result(cudaErrorInvalidValue);
  *device = tls_current_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= smoe::simt::options().devices) return api_result(cudaErrorInvalidDevice);
  tls_current_device = device;
  return api_result(cudaSuccess);
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  if (!p) return api_result(cudaErrorInvalidValue);
  if (device < 0 || device >= smoe::simt::options().devices) return api_result(cudaErrorInvalidDevice);
  std::memset(p, 0, sizeof(*p));
  std::snprintf(p->name, sizeof(p->name), "smoe SIMT emulator (sm_90 limits)");
  p->totalGlobalMem = smoe::simt::detail::kTotalMem;
  p->sharedMemPerBlock = smoe::simt::detail::kDefaultMaxDynamicSmem;
  p->sharedMemPerBlockOptin = smoe::simt::detail::kMaxDynamicSmemOptin;
  p->sharedMemPerMultiprocessor = 228 * 1024;
  p->regsPerBlock = 65536;
  p->warpSize = 32;
  p->maxThreadsPerBlock = smoe::simt::detail::kMaxThreadsPerBlock;
  p->maxThreadsDim[0] = 1024;
  p->maxThreadsDim[1] = 1024;
  p->maxThreadsDim[2] = smoe::simt::detail::kMaxBlockDimZ;
  p->maxGridSize[0] = static_cast<int>(smoe::simt::detail::kMaxGridDimX);
  p->maxGridSize[1] = static_cast<int>(smoe::simt::detail::kMaxGridDimYZ);
  p->maxGridSize[2] = static_cast<int>(smoe::simt::detail::kMaxGridDimYZ);
  p->multiProcessorCount = std::max(1, smoe::simt::options().sm_count);
  p->maxThreadsPerMultiProcessor = 2048;
  p->major = 9;
  p->minor = 0;
  p->totalConstMem = 64 * 1024;
  p->clockRate = 1755000;
  p->l2CacheSize = 50 * 1024 * 1024;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (!value) return api_result(cudaErrorInvalidValue);
  if (device < 0 || device >= smoe::simt::options().devices) return api_result(cudaErrorInvalidDevice);
  cudaDeviceProp p;
  cudaGetDeviceProperties(&p, 0);
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock:
      *value = p.maxThreadsPerBlock;
      break;
    case cudaDevAttrMaxBlockDimX:
      *value = p.maxThreadsDim[0];
      break;
    case cudaDevAttrMaxBlockDimY:
      *value = p.maxThreadsDim[1];
      break;
    case cudaDevAttrMaxBlockDimZ:
      *value = p.maxThreadsDim[2];
      break;
    case cudaDevAttrMaxGridDimX:
      *value = p.maxGridSize[0];
      break;
    case cudaDevAttrMaxGridDimY:
      *value = p.maxGridSize[1];
      break;
    case cudaDevAttrMaxGridDimZ:
      *value = p.maxGridSize[2];
      break;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = static_cast<int>(p.sharedMemPerBlock);
      break;
    case cudaDevAttrWarpSize:
      *value = 32;
      break;
    case cudaDevAttrMultiProcessorCount:
      *value = p.multiProcessorCount;
      break;
    case cudaDevAttrComputeCapabilityMajor:
      *value = p.major;
      break;
    case cudaDevAttrComputeCapabilityMinor:
      *value = p.minor;
      break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = static_cast<int>(p.sharedMemPerMultiprocessor);
      break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(p.sharedMemPerBlockOptin);
      break;
    default:
      return api_result(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() { return api_result(cudaSuccess); }

// Frees every allocation and clears the sticky error, like destroying the primary context.
cudaError_t cudaDeviceReset() {
  std::lock_guard<std::mutex> lock(state().mu);
  for (auto& [p, a] : state().device_allocs) std::free(reinterpret_cast<void*>(p));
  state().device_allocs.clear();
  state().bytes_in_use = 0;
  state().max_dyn_smem.clear();
  state().sticky = cudaSuccess;
  state().sticky_text.clear();
  state().last = cudaSuccess;
  return cudaSuccess;
}

// Memory -----------------------------------------------------------------------------------------
// Fresh allocations are filled with 0xff bytes: NaN for float/half/bf16/double, -1 for integers,
// so a kernel that reads memory nobody wrote produces visibly wrong output. Each allocation is
// its own heap block of the exact size, so AddressSanitizer reports accesses past its end.
cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  if (!ptr) return api_result(cudaErrorInvalidValue);
  if (cudaError_t s = smoe::simt::detail::sticky_error(); s != cudaSuccess) return s;
  *ptr = nullptr;
  if (bytes == 0) return cudaSuccess;
  void* p = nullptr;
  if (bytes > smoe::simt::detail::kTotalMem || posix_memalign(&p, 256, bytes) != 0)
    return record_error(cudaErrorMemoryAllocation);
  std::memset(p, 0xff, bytes);
  std::lock_guard<std::mutex> lock(state().mu);
  state().device_allocs[reinterpret_cast<uintptr_t>(p)] =
      std::remove_reference_t<State>::Alloc{bytes, tls_current_device};
  state().bytes_in_use += bytes;
  *ptr = p;
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t) { return cudaMalloc(ptr, bytes); }
cudaError_t cudaMallocManaged(void** ptr, size_t bytes, unsigned int) { return cudaMalloc(ptr, bytes); }
cudaError_t cudaMallocHost(void** ptr, size_t bytes) {
  if (!ptr) return api_result(cudaErrorInvalidValue);
  void* p = nullptr;
  if (posix_memalign(&p, 256, bytes ? bytes : 1) != 0) return record_error(cudaErrorMemoryAllocation);
  std::lock_guard<std::mutex> lock(state().mu);
  state().host_allocs.insert(p);
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  if (ptr == nullptr) return api_result(cudaSuccess);
  {
    std::lock_guard<std::mutex> lock(state().mu);
    auto it = state().device_allocs.find(reinterpret_cast<uintptr_t>(ptr));
    if (it == state().device_allocs.end()) {
      state().last = cudaErrorInvalidValue;
      return state().sticky != cudaSuccess ? state().sticky : cudaErrorInvalidValue;
    }
    state().bytes_in_use -= it->second.bytes;
    state().device_allocs.erase(it);
  }
  std::free(ptr);
  return api_result(cudaSuccess);
}
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t) { return cudaFree(ptr); }
cudaError_t cudaFreeHost(void* ptr) {
  if (ptr == nullptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lock(state().mu);
    if (state().host_allocs.erase(ptr) == 0) return record_error(cudaErrorInvalidValue);
  }
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault) return api_result(cudaErrorInvalidMemcpyDirection);
  if (cudaError_t s = smoe::simt::detail::sticky_error(); s != cudaSuccess) return s;
  if (bytes == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return record_error(cudaErrorInvalidValue);
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}
cudaError_t cudaMemcpy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                         cudaMemcpyKind kind) {
  if (width > dpitch || width > spitch) return api_result(cudaErrorInvalidPitchValue);
  for (size_t r = 0; r < height; ++r) {
    const cudaError_t e =
        cudaMemcpy(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width, kind);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}
cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
  if (cudaError_t s = smoe::simt::detail::sticky_error(); s != cudaSuccess) return s;
  if (bytes == 0) return cudaSuccess;
  if (ptr == nullptr) return record_error(cudaErrorInvalidValue);
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) { return cudaMemset(ptr, value, bytes); }
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  std::lock_guard<std::mutex> lock(state().mu);
  if (free_bytes) *free_bytes = smoe::simt::detail::kTotalMem - state().bytes_in_use;
  if (total_bytes) *total_bytes = smoe::simt::detail::kTotalMem;
  return cudaSuccess;
}

// Streams and events (all work is complete when a call returns) -------------------------------
cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, 0); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  if (!stream) return api_result(cudaErrorInvalidValue);
  *stream = new CUstream_st{flags, tls_current_device};
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  if (stream == nullptr || stream == cudaStreamLegacy || stream == cudaStreamPerThread)
    return api_result(cudaErrorInvalidResourceHandle);
  delete stream;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return api_result(cudaSuccess); }
cudaError_t cudaStreamQuery(cudaStream_t) { return api_result(cudaSuccess); }
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned int) { return api_result(cudaSuccess); }
cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, 0); }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  if (!event) return api_result(cudaErrorInvalidValue);
  *event = new CUevent_st{std::chrono::steady_clock::now(), false};
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  if (!event) return api_result(cudaErrorInvalidResourceHandle);
  delete event;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t) {
  if (!event) return api_result(cudaErrorInvalidResourceHandle);
  event->when = std::chrono::steady_clock::now();
  event->recorded = true;
  return api_result(cudaSuccess);
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  if (!event) return api_result(cudaErrorInvalidResourceHandle);
  return api_result(cudaSuccess);
}
cudaError_t cudaEventQuery(cudaEvent_t event) {
  if (!event) return api_result(cudaErrorInvalidResourceHandle);
  return api_result(cudaSuccess);
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (!ms || !start || !end) return api_result(cudaErrorInvalidValue);
  if (!start->recorded || !end->recorded) return api_result(cudaErrorInvalidResourceHandle);
  *ms = std::chrono::duration<float, std::milli>(end->when - start->when).count();
  return cudaSuccess;
}

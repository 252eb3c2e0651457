// Helpers for the SIMT emulator's GoogleTest suite (emulator builds only).
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "smoe/simt/simt.h"
#include "smoe/simt/testing.h"

namespace smoe::simt::test {

#define SIMT_CHECK(expr)                                                                                 \
  do {                                                                                                   \
    const cudaError_t simt_check_error_ = (expr);                                                        \
    ASSERT_EQ(simt_check_error_, cudaSuccess) << #expr << ": " << cudaGetErrorString(simt_check_error_); \
  } while (0)

// EXPECT_CONTAINS(text, part): `text` (a string) contains `part`; prints `text` otherwise.
#define EXPECT_CONTAINS(text, part) \
  EXPECT_NE(std::string(text).find(part), std::string::npos) << "expected to find: " << (part) << "\nin: " << (text)

// Device buffer that starts as a copy of `host` (or poisoned, when given only a size).
template <class T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) { EXPECT_EQ(cudaMalloc(&ptr, count * sizeof(T)), cudaSuccess); }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
    EXPECT_EQ(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  std::vector<T> to_host() const {
    std::vector<T> h(n);
    EXPECT_EQ(cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
};

using smoe::simt::ScopedOptions;
inline Options with_schedule(Schedule s, uint64_t seed = 0) {
  Options o = options();
  o.schedule = s;
  o.seed = seed;
  return o;
}
inline Options quiet() {
  Options o = options();
  o.quiet = true;
  return o;
}

// Runs a kernel expected to fail: returns the sticky error's text and resets the device.
template <class F>
std::string expect_kernel_error(F launch) {
  ScopedOptions q(quiet());
  const cudaError_t launched = launch();
  const cudaError_t synced = cudaDeviceSynchronize();
  EXPECT_EQ(synced, cudaErrorLaunchFailure);
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
  (void)launched;
  std::string text = cudaGetErrorString(synced);
  cudaDeviceReset();
  return text;
}

inline bool is_poison(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u == 0xffffffffu;
}

}  // namespace smoe::simt::test

// tests/cpp/cuda/cuda_testing.h: helpers of the emulated CUDA-backend tests.
//
// Every kernel runs under the emulator's thread schedules (forward, reverse, random, warps) and cp.async
// landings (at the wait, at issue, at random points between); the
// outputs must be bitwise identical across schedules, and are then compared with the CPU backend
// (integers exactly, floats with tolerance_for(dtype)). Output buffers are filled with a poison
// pattern before each run, so an output the kernels forget to write shows up.
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "cuda/backend.h"
#include "smoe/simt/launch.h"
#include "testing.h"

namespace smoe::testing {

namespace sim = ::smoe::cuda_simt;

// Multiples of 1/8 in [-1/2, 1/2]: products and sums of these are exact in f32 in any order, so GEMM
// results can be compared bit for bit across kernels and schedules.
template <class S>
std::vector<S> eighths(size_t n, uint32_t seed) {
  std::vector<S> v = small_ints<S>(n, seed, -4, 4);
  for (S& x : v) x = from_acc<S>(to_acc(x) / 8.0f);
  return v;
}

// A poison byte: 0x7f in every byte is a NaN in f32/f64/bf16/f16 and a large positive integer.
constexpr unsigned char kPoison = 0x7f;

template <class T>
void poison(std::vector<T>& v) {
  if (!v.empty()) std::memset(static_cast<void*>(v.data()), kPoison, v.size() * sizeof(T));
}

// Sets an emulator schedule and cp.async landing for the scope of the object.
class ScheduleScope {
 public:
  explicit ScheduleScope(simt::Schedule s, uint64_t seed = 0,
                         simt::CpAsyncLanding landing = simt::CpAsyncLanding::kWait, uint64_t landing_seed = 0)
      : saved_(simt::options()) {
    simt::Options o = saved_;
    o.schedule = s;
    o.seed = seed;
    o.cp_async_landing = landing;
    o.cp_async_seed = landing_seed;
    simt::set_options(o);
  }
  ~ScheduleScope() { simt::set_options(saved_); }

 private:
  simt::Options saved_;
};

struct NamedSchedule {
  const char* name;
  simt::Schedule schedule;
  uint64_t seed;
  simt::CpAsyncLanding landing;  // when cp.async copies land (smoe/simt/launch.h)
  uint64_t landing_seed;
};
// cp.async copies land at the wait, at issue, and at random points between issue and wait.
inline const NamedSchedule kSchedules[] = {
    {"forward", simt::Schedule::kForward, 0, simt::CpAsyncLanding::kWait, 0},
    {"reverse cp.async=issue", simt::Schedule::kReverse, 0, simt::CpAsyncLanding::kIssue, 0},
    {"random:7 cp.async=random:7", simt::Schedule::kRandom, 7, simt::CpAsyncLanding::kRandom, 7},
    {"warps cp.async=random:3", simt::Schedule::kWarps, 0, simt::CpAsyncLanding::kRandom, 3},
};

// Runs `run` (which poisons its outputs, launches, and returns the outputs as bytes) under every
// schedule, expects identical bytes, and returns them.
inline std::vector<unsigned char> run_all_schedules(const std::function<std::vector<unsigned char>()>& run) {
  std::vector<unsigned char> first;
  for (const NamedSchedule& s : kSchedules) {
    ScheduleScope scope(s.schedule, s.seed, s.landing, s.landing_seed);
    std::vector<unsigned char> got = run();
    if (&s == &kSchedules[0]) {
      first = std::move(got);
    } else {
      EXPECT_TRUE(got == first) << "outputs differ between the forward and the " << s.name << " schedule";
    }
  }
  return first;
}

// Appends the bytes of v to out (to build run_all_schedules' result).
template <class T>
void append_bytes(std::vector<unsigned char>& out, const std::vector<T>& v) {
  const auto* p = reinterpret_cast<const unsigned char*>(v.data());
  out.insert(out.end(), p, p + v.size() * sizeof(T));
}

#define EXPECT_OK(expr)                                      \
  do {                                                       \
    const ::smoe::Status st_ = (expr);                       \
    EXPECT_TRUE(st_.ok()) << #expr << ": " << st_.message(); \
  } while (0)

}  // namespace smoe::testing

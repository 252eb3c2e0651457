// smoe SIMT emulator: helpers for tests that run kernels under several thread schedules
// (ARCHITECTURE.md, section 4: "tests run each kernel under several thread schedules and demand
// bit-identical results"). Emulator builds only.
//
//   for (const auto& s : smoe::simt::kStandardSchedules) {
//     smoe::simt::ScopedSchedule scope(s);
//     results.push_back(run_my_kernel());          // then compare bit for bit
//   }
#pragma once

#include <cstdint>

#include "smoe/simt/launch.h"

namespace smoe::simt {

struct ScheduleChoice {
  Schedule schedule;
  uint64_t seed;
  const char* name;  // as SMOE_SIMT_SCHEDULE spells it
};

// Forward and reverse catch most missing barriers (each thread runs to its next barrier before
// the next one starts); the random orders interleave threads between yield points as well.
inline constexpr ScheduleChoice kStandardSchedules[] = {
    {Schedule::kForward, 0, "forward"},
    {Schedule::kReverse, 0, "reverse"},
    {Schedule::kRandom, 1, "random:1"},
    {Schedule::kRandom, 2, "random:2"},
};

// Sets the options for its lifetime and restores the previous ones afterwards.
class ScopedOptions {
 public:
  explicit ScopedOptions(const Options& o) : saved_(options()) { set_options(o); }
  ~ScopedOptions() { set_options(saved_); }
  ScopedOptions(const ScopedOptions&) = delete;
  ScopedOptions& operator=(const ScopedOptions&) = delete;

 private:
  Options saved_;
};

// Sets only the schedule (and its seed) for its lifetime.
class ScopedSchedule : public ScopedOptions {
 public:
  explicit ScopedSchedule(const ScheduleChoice& s) : ScopedOptions(with(s)) {}

 private:
  static Options with(const ScheduleChoice& s) {
    Options o = options();
    o.schedule = s.schedule;
    o.seed = s.seed;
    return o;
  }
};

}  // namespace smoe::simt

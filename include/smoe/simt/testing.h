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
  const char* name;  // as SMOE_SIMT_SCHEDULE spells it (and SMOE_SIMT_CP_ASYNC, after a space)
  CpAsyncLanding landing = CpAsyncLanding::kWait;
  uint64_t landing_seed = 0;
};

// Forward and reverse catch most missing barriers (each thread runs to its next barrier before
// the next one starts); the random orders interleave threads between yield points as well; warps
// lets one warp run far ahead of the others (up to the next barrier). The
// cp.async landing varies along: at the wait, at issue, and at random points in between, so a
// shared-memory stage that is refilled while other warps still read it is caught.
inline constexpr ScheduleChoice kStandardSchedules[] = {
    {Schedule::kForward, 0, "forward", CpAsyncLanding::kWait, 0},
    {Schedule::kReverse, 0, "reverse cp.async=issue", CpAsyncLanding::kIssue, 0},
    {Schedule::kRandom, 1, "random:1 cp.async=random:1", CpAsyncLanding::kRandom, 1},
    {Schedule::kRandom, 2, "random:2 cp.async=random:2", CpAsyncLanding::kRandom, 2},
    {Schedule::kWarps, 0, "warps cp.async=issue", CpAsyncLanding::kIssue, 0},
    {Schedule::kWarps, 0, "warps cp.async=random:3", CpAsyncLanding::kRandom, 3},
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

// Sets only the schedule and the cp.async landing (and their seeds) for its lifetime.
class ScopedSchedule : public ScopedOptions {
 public:
  explicit ScopedSchedule(const ScheduleChoice& s) : ScopedOptions(with(s)) {}

 private:
  static Options with(const ScheduleChoice& s) {
    Options o = options();
    o.schedule = s.schedule;
    o.seed = s.seed;
    o.cp_async_landing = s.landing;
    o.cp_async_seed = s.landing_seed;
    return o;
  }
};

}  // namespace smoe::simt

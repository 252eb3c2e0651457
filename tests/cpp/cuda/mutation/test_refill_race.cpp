// The mutation test of the emulator's cp.async landing modes (docs/simt.md, "cp.async landing").
//
// gemm_tc_mutant.cu compiles csrc/cuda/gemm_tc.cuh with SMOE_TEST_MUTATION=1: each thread issues the
// refill of stage (kt + 3) % 4 before the barrier of iteration kt, while slower warps may still read
// tile kt - 1 from that stage. With copies that land only at the issuing thread's wait (the emulator's
// old behaviour, CpAsyncLanding::kWait) the data arrive after every reader is done, so the race is
// invisible; the standard sweep, which also lands copies at issue and at random scheduling points in
// between, must produce a wrong product. The shipped kernel (gemm_tc_control.cu) must be exact under
// every entry of the sweep. K = 544 is 17 k tiles: the 4-stage ring wraps four times.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "smoe/simt/half.h"
#include "smoe/simt/runtime_api.h"
#include "smoe/simt/testing.h"

namespace smoe::cuda_simt_mutant {
cudaError_t race_gemm_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, const int64_t* offsets, int32_t E, int64_t R,
                           int64_t N, int64_t Kd, __nv_bfloat16* c);
}
namespace smoe::cuda_simt_control {
cudaError_t race_gemm_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, const int64_t* offsets, int32_t E, int64_t R,
                           int64_t N, int64_t Kd, __nv_bfloat16* c);
}

namespace {

using Fn = cudaError_t (*)(const __nv_bfloat16*, const __nv_bfloat16*, const int64_t*, int32_t, int64_t, int64_t,
                           int64_t, __nv_bfloat16*);

constexpr int32_t kE = 2;
constexpr int64_t kR = 200, kN = 128, kKd = 544;

struct Case {
  std::vector<__nv_bfloat16> a, b;
  std::vector<int64_t> offsets{0, 130, kR};
  std::vector<float> want;  // exact: multiples of 1/8 in [-1/2, 1/2], sums exact in f32 and bf16-representable
};

float eighth(uint32_t& s) {
  s = s * 1664525u + 1013904223u;
  return static_cast<float>(static_cast<int>((s >> 16) % 9) - 4) / 8.0f;
}

Case make_case() {
  Case c;
  uint32_t s = 12345;
  std::vector<float> a(size_t(kR * kKd)), b(size_t(kE * kN * kKd));
  for (float& v : a) v = eighth(s);
  for (float& v : b) v = eighth(s);
  for (float v : a) c.a.push_back(__float2bfloat16_rn(v));
  for (float v : b) c.b.push_back(__float2bfloat16_rn(v));
  c.want.assign(size_t(kR * kN), 0.0f);
  for (int64_t e = 0; e < kE; ++e)
    for (int64_t r = c.offsets[size_t(e)]; r < c.offsets[size_t(e + 1)]; ++r)
      for (int64_t n = 0; n < kN; ++n) {
        double acc = 0.0;
        for (int64_t k = 0; k < kKd; ++k) acc += double(a[size_t(r * kKd + k)]) * b[size_t((e * kN + n) * kKd + k)];
        c.want[size_t(r * kN + n)] = __bfloat162float(__float2bfloat16_rn(static_cast<float>(acc)));
      }
  return c;
}

// Number of wrong outputs of one launch under the given sweep entry.
int64_t wrong_outputs(Fn fn, const Case& c, const smoe::simt::ScheduleChoice& choice) {
  smoe::simt::ScopedSchedule scope(choice);
  std::vector<__nv_bfloat16> out(size_t(kR * kN), __float2bfloat16_rn(-7.0f));
  EXPECT_EQ(fn(c.a.data(), c.b.data(), c.offsets.data(), kE, kR, kN, kKd, out.data()), cudaSuccess) << choice.name;
  int64_t wrong = 0;
  for (size_t i = 0; i < out.size(); ++i) wrong += __bfloat162float(out[i]) != c.want[i];
  return wrong;
}

TEST(SimtCpAsyncRace, ShippedKernelIsExactUnderTheWholeSweep) {
  const Case c = make_case();
  for (const auto& choice : smoe::simt::kStandardSchedules)
    EXPECT_EQ(wrong_outputs(&smoe::cuda_simt_control::race_gemm_bf16, c, choice), 0) << choice.name;
}

TEST(SimtCpAsyncRace, RefillAboveTheBarrierFailsTheSweep) {
  const Case c = make_case();
  // The blind spot: landing only at the wait, no schedule shows the race.
  for (const auto& choice : smoe::simt::kStandardSchedules) {
    smoe::simt::ScheduleChoice at_wait = choice;
    at_wait.landing = smoe::simt::CpAsyncLanding::kWait;
    EXPECT_EQ(wrong_outputs(&smoe::cuda_simt_mutant::race_gemm_bf16, c, at_wait), 0)
        << choice.name << " with copies landing at the wait";
  }
  // The sweep as the tests run it: some entry must see torn stages.
  std::string report;
  int failing = 0;
  for (const auto& choice : smoe::simt::kStandardSchedules) {
    const int64_t wrong = wrong_outputs(&smoe::cuda_simt_mutant::race_gemm_bf16, c, choice);
    report += std::string(choice.name) + ": " + std::to_string(wrong) + " wrong; ";
    failing += wrong > 0;
  }
  std::printf("refill-above-barrier mutant: %s\n", report.c_str());
  EXPECT_GT(failing, 0) << "the standard sweep does not catch the refill race: " << report;
}

}  // namespace

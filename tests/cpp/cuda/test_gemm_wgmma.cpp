// The sm_90a grouped GEMM (csrc/cuda/gemm_wgmma.cu) through the SIMT emulator: wgmma, TMA, the
// mbarrier ring and cp.async run with their emulated PTX semantics (smoe/simt/hopper.h), under the
// forward, reverse and random schedules (bitwise equal), against cpu::grouped_gemm and a plain
// double reference. Inputs are multiples of 1/8 in [-1/2, 1/2]: products and sums are exact in f32
// whatever the order, so the results must match bit for bit.
#include "cpu/gemm.h"
#include "cuda/gemm_wgmma.h"
#include "cuda_testing.h"

namespace smoe::testing {
namespace {

template <class S>
void check(const std::vector<int64_t>& off, int64_t N, int64_t Kd) {
  const DType dt = std::is_same_v<S, bf16_t> ? DType::kBF16 : DType::kF16;
  std::string trace = std::string(dtype_name(dt)) + " N=" + std::to_string(N) + " Kd=" + std::to_string(Kd) + " offsets={";
  for (int64_t o : off) trace += std::to_string(o) + ",";
  SCOPED_TRACE(trace + "}");
  const int64_t E = int64_t(off.size()) - 1, R = off.back() + 3;  // 3 rows past offsets[E] stay untouched
  std::vector<S> x = eighths<S>(size_t(R * Kd), 1), b = eighths<S>(size_t(E * N * Kd), 2);
  std::vector<int64_t> o = off;
  const S fill = from_acc<S>(-7.0f);
  std::vector<S> want(size_t(R * N), fill);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = off[size_t(e)]; r < off[size_t(e + 1)]; ++r)
      for (int64_t n = 0; n < N; ++n) {
        double acc = 0;
        for (int64_t k = 0; k < Kd; ++k)
          acc += double(to_acc(x[size_t(r * Kd + k)])) * to_acc(b[size_t((e * N + n) * Kd + k)]);
        want[size_t(r * N + n)] = from_acc<S>(float(acc));
      }
  const TensorView xv = make_view(x.data(), dt, {R, Kd}), ov = make_view(o.data(), {E + 1});
  const TensorView bv = make_view(b.data(), dt, {E, N, Kd});
  std::vector<S> c(size_t(R * N));
  run_all_schedules([&] {
    std::fill(c.begin(), c.end(), fill);
    EXPECT_OK(cuda_simt::grouped_gemm_wgmma(xv, bv, ov, make_view(c.data(), dt, {R, N}), nullptr));
    std::vector<unsigned char> out;
    append_bytes(out, c);
    return out;
  });
  EXPECT_TRUE(bitwise_equal(c, want)) << all_close(c, want, dt).message();
  std::vector<S> c_cpu(size_t(R * N), fill);
  GroupedGemmParams pc;
  pc.trans_b = true;
  ASSERT_TRUE(cpu::grouped_gemm(pc, xv, bv, ov, make_view(c_cpu.data(), dt, {R, N})).ok());
  EXPECT_TRUE(bitwise_equal(c, c_cpu)) << all_close(c, c_cpu, dt).message();
}

TEST(SimtGroupedGemmWgmma, ShapesThatHurt) {
  check<bf16_t>({0, 70, 70, 71, 200}, 136, 200);  // empty expert, one-row expert, ragged N, K % 64 != 0
  check<f16_t>({0, 64}, 128, 64);                 // E = 1, exact tiles
  check<bf16_t>({0, 1}, 8, 8);                     // one row, K smaller than one k16 slice
  check<f16_t>({0, 0, 5, 5}, 24, 328);             // empty first and last experts, 6 K tiles (ring wraps)
}

TEST(SimtGroupedGemmWgmma, ManyExperts) {
  // E = 300 (> 256): mostly empty experts, a few with rows; the slot scan finds them on the device.
  std::vector<int64_t> off(301, 0);
  for (int64_t e = 0; e < 300; ++e) off[size_t(e + 1)] = off[size_t(e)] + (e % 97 == 5 ? 3 : 0) + (e == 299 ? 65 : 0);
  check<bf16_t>(off, 16, 24);
}

TEST(SimtGroupedGemmWgmma, RefusesWhatItCannotRun) {
  std::vector<float> x(64), b(64), c(64);
  std::vector<int64_t> o = {0, 8};
  const Status st = cuda_simt::grouped_gemm_wgmma(make_view(x.data(), {8, 8}), make_view(b.data(), {1, 8, 8}),
                                                  make_view(o.data(), {2}), make_view(c.data(), {8, 8}), nullptr);
  EXPECT_EQ(st.code(), Code::kUnsupported);
  EXPECT_NE(st.message().find("bf16 or f16"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace smoe::testing

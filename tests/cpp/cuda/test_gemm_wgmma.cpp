// The sm_90a grouped GEMM (csrc/cuda/gemm_wgmma.cu) through the SIMT emulator: wgmma, TMA, the
// mbarrier ring and cp.async run with their emulated PTX semantics (smoe/simt/hopper.h), under every
// standard schedule (bitwise equal), against cpu::grouped_gemm, cpu::activation_forward, a plain
// double reference and the sm_80 kernel (grouped_gemm_tc, whose epilogues it shares). Inputs are
// multiples of 1/8 in [-1/2, 1/2]: products and sums are exact in f32 whatever the order, so the
// GEMM results must match bit for bit. Then the dispatch: with the emulated build marked as carrying
// sm_90a code, the backend's grouped GEMM and the expert MLP run the wgmma kernel.
#include <optional>
#include <tuple>

#include "cpu/gemm.h"
#include "cuda/gemm_wgmma.h"
#include "cuda_testing.h"
#include "smoe/simt/testing.h"

namespace smoe::testing {
namespace {

template <class S>
void check(const std::vector<int64_t>& off, int64_t N, int64_t Kd) {
  const DType dt = std::is_same_v<S, bf16_t> ? DType::kBF16 : DType::kF16;
  std::string trace =
      std::string(dtype_name(dt)) + " N=" + std::to_string(N) + " Kd=" + std::to_string(Kd) + " offsets={";
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
  auto run = [&] {
    std::fill(c.begin(), c.end(), fill);
    EXPECT_OK(cuda_simt::grouped_gemm_wgmma(GroupedGemmTcParams{}, xv, bv, ov, TensorView{}, TensorView{},
                                            make_view(c.data(), dt, {R, N}), TensorView{}, nullptr));
    std::vector<unsigned char> out;
    append_bytes(out, c);
    return out;
  };
  {
    // Two emulated SMs: the persistent CTAs each walk several tiles, the ring running on across them.
    simt::Options few = simt::options();
    few.sm_count = 2;
    simt::ScopedOptions scope(few);
    run_all_schedules(run);
    EXPECT_TRUE(bitwise_equal(c, want)) << "2 SMs: " << all_close(c, want, dt).message();
  }
  run_all_schedules(run);
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
  check<bf16_t>({0, 1}, 8, 8);                    // one row, K smaller than one k16 slice
  check<f16_t>({0, 0, 5, 5}, 24, 328);            // empty first and last experts, 6 K tiles (ring wraps)
  check<bf16_t>({0, 0, 0}, 16, 16);               // every expert empty: no tile found, c untouched
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
  const Status st = cuda_simt::grouped_gemm_wgmma(
      GroupedGemmTcParams{}, make_view(x.data(), {8, 8}), make_view(b.data(), {1, 8, 8}), make_view(o.data(), {2}),
      TensorView{}, TensorView{}, make_view(c.data(), {8, 8}), TensorView{}, nullptr);
  EXPECT_EQ(st.code(), Code::kUnsupported);
  EXPECT_NE(st.message().find("bf16 or f16"), std::string::npos) << st.message();
  std::vector<bf16_t> xb(64), bb(64), cb(64);
  GroupedGemmTcParams mn;
  mn.trans_b = false;
  const Status st_mn = cuda_simt::grouped_gemm_wgmma(mn, make_view(xb.data(), DType::kBF16, {8, 8}),
                                                     make_view(bb.data(), DType::kBF16, {1, 8, 8}),
                                                     make_view(o.data(), {2}), TensorView{}, TensorView{},
                                                     make_view(cb.data(), DType::kBF16, {8, 8}), TensorView{}, nullptr);
  EXPECT_EQ(st_mn.code(), Code::kUnsupported);
  EXPECT_NE(st_mn.message().find("[E, N, Kd]"), std::string::npos) << st_mn.message();
}

// The fused epilogues (gathered rows with token -1, routing weights, activation / gated activation
// with pre): bitwise equal across schedules and to grouped_gemm_tc with the same arguments; pre (or
// the plain product) bitwise equal to cpu::grouped_gemm on the gathered rows; the activation within
// tolerance_for(dtype) of cpu::activation_forward(pre), times the weight.
template <class S>
void check_fused(std::optional<Activation> act, const std::vector<int64_t>& off, int64_t F, int64_t Kd, bool gather,
                 bool weights) {
  const DType dt = std::is_same_v<S, bf16_t> ? DType::kBF16 : DType::kF16;
  const bool gated = act && is_gated(*act), has_act = act.has_value();
  const int64_t F1 = gated ? 2 * F : F, E = int64_t(off.size()) - 1, R = off.back() + 2, T = R + 3;
  std::string trace = std::string(dtype_name(dt)) + " act=" + (act ? std::to_string(int(*act)) : "none") +
                      " F=" + std::to_string(F) + " Kd=" + std::to_string(Kd) + (gather ? " gather" : "") +
                      (weights ? " weights" : "") + " offsets={";
  for (int64_t o : off) trace += std::to_string(o) + ",";
  SCOPED_TRACE(trace + "}");
  std::vector<S> x = eighths<S>(size_t(T * Kd), 5), b = eighths<S>(size_t(E * F1 * Kd), 6);
  std::vector<int32_t> tok(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) tok[size_t(r)] = (r % 7 == 3) ? -1 : int32_t((r * 5 + 1) % T);
  std::vector<float> w(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) w[size_t(r)] = 0.25f + 0.25f * float(r % 4);
  std::vector<int64_t> o = off;
  const TensorView xv = gather ? make_view(x.data(), dt, {T, Kd}) : make_view(x.data(), dt, {R, Kd});
  const TensorView bv = make_view(b.data(), dt, {E, F1, Kd}), ov = make_view(o.data(), {E + 1});
  const TensorView tv = gather ? make_view(tok.data(), {R}) : TensorView{};
  const TensorView wv = weights ? make_view(w.data(), {R}) : TensorView{};
  GroupedGemmTcParams p;
  p.activation = act;
  const S fill = from_acc<S>(-7.0f);
  std::vector<S> pre(size_t(R * F1)), out(size_t(R * F));
  auto run = [&](bool wgmma) {
    std::fill(pre.begin(), pre.end(), fill);
    std::fill(out.begin(), out.end(), fill);
    const TensorView pv = has_act ? make_view(pre.data(), dt, {R, F1}) : TensorView{};
    const TensorView cv = make_view(out.data(), dt, {R, F});
    EXPECT_OK(wgmma ? cuda_simt::grouped_gemm_wgmma(p, xv, bv, ov, tv, wv, cv, pv, nullptr)
                    : cuda_simt::grouped_gemm_tc(p, xv, bv, ov, tv, wv, cv, pv, nullptr));
    std::vector<unsigned char> bytes;
    append_bytes(bytes, pre), append_bytes(bytes, out);
    return bytes;
  };
  const std::vector<unsigned char> tc = run(false);
  {
    simt::Options few = simt::options();  // 3 emulated SMs: several tiles per persistent CTA
    few.sm_count = 3;
    simt::ScopedOptions scope(few);
    EXPECT_TRUE(run_all_schedules([&] { return run(true); }) == tc)
        << "3 SMs: grouped_gemm_wgmma and grouped_gemm_tc differ";
  }
  const std::vector<unsigned char> got = run_all_schedules([&] { return run(true); });
  EXPECT_TRUE(got == tc) << "grouped_gemm_wgmma and grouped_gemm_tc differ";

  // CPU: the gathered rows (zeros for token -1), the grouped GEMM, the activation, the weights.
  std::vector<S> xs(size_t(R * Kd), from_acc<S>(0.0f));
  for (int64_t r = 0; r < R; ++r) {
    const int64_t src = gather ? tok[size_t(r)] : r;
    if (src >= 0) std::copy_n(&x[size_t(src * Kd)], Kd, &xs[size_t(r * Kd)]);
  }
  std::vector<S> pre_cpu(size_t(R * F1), fill), out_cpu(size_t(R * F), fill);
  GroupedGemmParams pc;
  pc.trans_b = true;
  ASSERT_TRUE(
      cpu::grouped_gemm(pc, make_view(xs.data(), dt, {R, Kd}), bv, ov, make_view(pre_cpu.data(), dt, {R, F1})).ok());
  if (has_act) {
    ASSERT_TRUE(
        cpu::activation_forward(*act, make_view(pre_cpu.data(), dt, {R, F1}), make_view(out_cpu.data(), dt, {R, F}))
            .ok());
    for (int64_t r = off.back(); r < R; ++r) std::fill_n(&out_cpu[size_t(r * F)], F, fill);  // rows past offsets[E]
    for (int64_t r = off.back(); r < R; ++r) std::fill_n(&pre_cpu[size_t(r * F1)], F1, fill);
  } else {
    out_cpu = pre_cpu;
    pre_cpu.assign(pre_cpu.size(), fill);  // no pre without an activation: left as filled
  }
  if (weights)
    for (int64_t r = 0; r < off.back(); ++r)
      for (int64_t f = 0; f < F; ++f)
        out_cpu[size_t(r * F + f)] = from_acc<S>(w[size_t(r)] * to_acc(out_cpu[size_t(r * F + f)]));
  EXPECT_TRUE(bitwise_equal(pre, pre_cpu)) << all_close(pre, pre_cpu, dt).message();
  if (has_act)
    EXPECT_TRUE(all_close(out, out_cpu, dt)) << all_close(out, out_cpu, dt).message();
  else
    EXPECT_TRUE(bitwise_equal(out, out_cpu)) << all_close(out, out_cpu, dt).message();
}

TEST(SimtGroupedGemmWgmma, FusedEpilogues) {
  const std::vector<int64_t> off = {0, 70, 70, 71, 90};  // empty expert, one-row expert, ragged last tiles
  check_fused<bf16_t>(std::nullopt, off, 136, 72, /*gather=*/true, /*weights=*/true);  // plain store, scaled
  check_fused<bf16_t>(Activation::kSwiGLU, off, 72, 200, true, false);                 // gated, K % 64 != 0
  check_fused<f16_t>(Activation::kGeGLU, {0, 1}, 8, 16, false, true);                  // one row, E = 1
  check_fused<f16_t>(Activation::kGELU, {0, 0, 33, 33}, 24, 8, true, true);            // empty first/last experts
  check_fused<bf16_t>(Activation::kReLU, {0, 65}, 128, 64, false, false);              // E = 1, exact N tile
}

TEST(SimtGroupedGemmWgmma, FusedManyExperts) {
  std::vector<int64_t> off(301, 0);  // E = 300 (> 256): the gated form over mostly empty experts
  for (int64_t e = 0; e < 300; ++e) off[size_t(e + 1)] = off[size_t(e)] + (e % 113 == 7 ? 2 : 0) + (e == 298 ? 9 : 0);
  check_fused<bf16_t>(Activation::kSwiGLU, off, 8, 24, true, true);
}

// Dispatch: grouped_gemm_tc (and so the backend's grouped_gemm and the expert MLP) runs the wgmma
// kernel when the emulated build carries sm_90a code, the sm_80 kernel otherwise and for what the
// wgmma kernel refuses; the results are the same bits either way.
TEST(SimtGroupedGemmWgmma, DispatchOnSm90a) {
  const DType dt = DType::kBF16;
  const std::vector<int64_t> off = {0, 5, 5, 40};
  const int64_t E = 3, R = 40, N = 24, Kd = 40;
  std::vector<bf16_t> x = eighths<bf16_t>(size_t(R * Kd), 7), b = eighths<bf16_t>(size_t(E * N * Kd), 8);
  std::vector<int64_t> o = off;
  const TensorView xv = make_view(x.data(), dt, {R, Kd}), ov = make_view(o.data(), {E + 1});
  auto backend_gemm = [&](const TensorView& bv, int64_t n) {
    std::vector<bf16_t> c(size_t(R * n));
    poison(c);
    EXPECT_OK(sim::grouped_gemm(GroupedGemmParams{true}, xv, bv, ov, make_view(c.data(), dt, {R, n}), nullptr));
    return c;
  };
  const TensorView bv = make_view(b.data(), dt, {E, N, Kd});
  const int64_t n0 = simt::wgmma_issued_total();
  EXPECT_FALSE(sim::wgmma_selected());
  const std::vector<bf16_t> c80 = backend_gemm(bv, N);
  EXPECT_EQ(simt::wgmma_issued_total(), n0) << "the sm_80 path issued wgmma";
  simt::Options opt = simt::options();
  opt.sm90a = true;
  simt::ScopedOptions scope(opt);
  EXPECT_TRUE(sim::wgmma_selected());
  const std::vector<bf16_t> c90 = backend_gemm(bv, N);
  EXPECT_GT(simt::wgmma_issued_total(), n0) << "grouped_gemm did not dispatch to the wgmma kernel";
  EXPECT_TRUE(bitwise_equal(c90, c80));
  std::vector<bf16_t> c_ref(size_t(R * N));
  ASSERT_TRUE(cpu::grouped_gemm(GroupedGemmParams{true}, xv, bv, ov, make_view(c_ref.data(), dt, {R, N})).ok());
  EXPECT_TRUE(bitwise_equal(c90, c_ref));
  // Refused by the wgmma kernel (N = 12, not a multiple of 8): the sm_80 kernel runs, no wgmma.
  const int64_t n1 = simt::wgmma_issued_total();
  const std::vector<bf16_t> c_odd = backend_gemm(make_view(b.data(), dt, {E, 12, Kd}), 12);
  EXPECT_EQ(simt::wgmma_issued_total(), n1) << "a refused shape reached the wgmma kernel";
  std::vector<bf16_t> c_cpu(size_t(R * 12));
  ASSERT_TRUE(cpu::grouped_gemm(GroupedGemmParams{true}, xv, make_view(b.data(), dt, {E, 12, Kd}), ov,
                                make_view(c_cpu.data(), dt, {R, 12}))
                  .ok());
  EXPECT_TRUE(bitwise_equal(c_odd, c_cpu));

  // The expert MLP (gated first GEMM with the gather and pre, then the plain second GEMM).
  const int64_t T = 16, H = 16, F = 8;
  std::vector<bf16_t> xt = eighths<bf16_t>(size_t(T * H), 9), w1 = eighths<bf16_t>(size_t(E * 2 * F * H), 10);
  std::vector<bf16_t> w2 = eighths<bf16_t>(size_t(E * H * F), 11);
  std::vector<int32_t> tok(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) tok[size_t(r)] = int32_t((r * 7) % T);
  auto mlp = [&] {
    std::vector<bf16_t> pre(size_t(R * 2 * F)), act(size_t(R * F)), ys(size_t(R * H));
    poison(pre), poison(act), poison(ys);
    ExpertMlpParams mp;
    mp.activation = Activation::kSwiGLU;
    EXPECT_OK(sim::expert_mlp_forward(mp, make_view(xt.data(), dt, {T, H}), make_view(tok.data(), {R}), ov,
                                      make_view(w1.data(), dt, {E, 2 * F, H}), make_view(w2.data(), dt, {E, H, F}),
                                      make_view(pre.data(), dt, {R, 2 * F}), make_view(act.data(), dt, {R, F}),
                                      make_view(ys.data(), dt, {R, H}), nullptr));
    return std::make_tuple(pre, act, ys);
  };
  const int64_t n2 = simt::wgmma_issued_total();
  const auto on = mlp();
  EXPECT_GT(simt::wgmma_issued_total(), n2) << "expert_mlp_forward did not reach the wgmma kernel";
  opt.sm90a = false;
  simt::set_options(opt);
  const auto off80 = mlp();
  EXPECT_TRUE(bitwise_equal(std::get<0>(on), std::get<0>(off80)));
  EXPECT_TRUE(bitwise_equal(std::get<1>(on), std::get<1>(off80)));
  EXPECT_TRUE(bitwise_equal(std::get<2>(on), std::get<2>(off80)));
}

}  // namespace
}  // namespace smoe::testing

// Activations and the naive grouped GEMM of the CUDA backend (csrc/cuda/activation.cu,
// csrc/cuda/grouped_gemm_naive.cu) through the SIMT emulator, against the CPU backend.
#include "cpu/gemm.h"
#include "cuda_testing.h"

namespace smoe::testing {
namespace {

template <class S>
void check_activation(DType dt, Activation act, int64_t R, int64_t F) {
  SCOPED_TRACE(std::string(dtype_name(dt)) + " act=" + std::to_string(int(act)) + " R=" + std::to_string(R) +
               " F=" + std::to_string(F));
  const int64_t F1 = is_gated(act) ? 2 * F : F;
  std::vector<S> in = uniform<S>(size_t(R * F1), 1, -4.f, 4.f), go = uniform<S>(size_t(R * F), 2);
  const TensorView inv = make_view(in.data(), dt, {R, F1}), gov = make_view(go.data(), dt, {R, F});
  std::vector<S> out_cpu(size_t(R * F)), gi_cpu(size_t(R * F1)), out(out_cpu.size()), gi(gi_cpu.size());
  ASSERT_TRUE(cpu::activation_forward(act, inv, make_view(out_cpu.data(), dt, {R, F})).ok());
  ASSERT_TRUE(cpu::activation_backward(act, inv, gov, make_view(gi_cpu.data(), dt, {R, F1})).ok());
  run_all_schedules([&] {
    poison(out), poison(gi);
    EXPECT_OK(sim::activation_forward(act, inv, make_view(out.data(), dt, {R, F}), nullptr));
    EXPECT_OK(sim::activation_backward(act, inv, gov, make_view(gi.data(), dt, {R, F1}), nullptr));
    std::vector<unsigned char> o;
    append_bytes(o, out), append_bytes(o, gi);
    return o;
  });
  EXPECT_TRUE(all_close(out, out_cpu, dt));
  EXPECT_TRUE(all_close(gi, gi_cpu, dt));
}

TEST(SimtActivation, MatchesCpu) {
  for (Activation act : {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGELU, Activation::kReLU}) {
    check_activation<float>(DType::kF32, act, 7, 33);
    check_activation<bf16_t>(DType::kBF16, act, 3, 16);
    check_activation<f16_t>(DType::kF16, act, 1, 5);
  }
  check_activation<float>(DType::kF32, Activation::kSwiGLU, 0, 8);
}

template <class S>
void check_gemm(DType dt, const std::vector<int64_t>& offsets, int64_t R, int64_t N, int64_t Kd, bool trans_b) {
  SCOPED_TRACE(std::string(dtype_name(dt)) + " R=" + std::to_string(R) + " N=" + std::to_string(N) +
               " Kd=" + std::to_string(Kd) + (trans_b ? " b^T" : ""));
  const int64_t E = int64_t(offsets.size()) - 1;
  // Small integers: every product and sum is exact in f32, so both backends agree bit for bit.
  std::vector<S> a = small_ints<S>(size_t(R * Kd), 1), b = small_ints<S>(size_t(E * N * Kd), 2);
  std::vector<int64_t> off = offsets;
  const TensorView av = make_view(a.data(), dt, {R, Kd}), ov = make_view(off.data(), {E + 1});
  const TensorView bv = trans_b ? make_view(b.data(), dt, {E, N, Kd}) : make_view(b.data(), dt, {E, Kd, N});
  GroupedGemmParams p;
  p.trans_b = trans_b;
  std::vector<S> c_cpu(size_t(R * N), from_acc<S>(-7.0f)), c(c_cpu.size());
  ASSERT_TRUE(cpu::grouped_gemm(p, av, bv, ov, make_view(c_cpu.data(), dt, {R, N})).ok());
  // wgrad: a [R, Kd] x b2 [R, N] -> [E, Kd, N]
  std::vector<S> b2 = small_ints<S>(size_t(R * N), 3);
  std::vector<S> w_cpu(size_t(E * Kd * N)), w(w_cpu.size());
  ASSERT_TRUE(
      cpu::grouped_gemm_wgrad(av, make_view(b2.data(), dt, {R, N}), ov, make_view(w_cpu.data(), dt, {E, Kd, N})).ok());
  run_all_schedules([&] {
    std::fill(c.begin(), c.end(), from_acc<S>(-7.0f));  // rows outside every segment stay untouched
    poison(w);
    EXPECT_OK(sim::grouped_gemm_naive(p, av, bv, ov, make_view(c.data(), dt, {R, N}), nullptr));
    EXPECT_OK(sim::grouped_gemm_wgrad_naive(av, make_view(b2.data(), dt, {R, N}), ov,
                                            make_view(w.data(), dt, {E, Kd, N}), nullptr));
    std::vector<unsigned char> o;
    append_bytes(o, c), append_bytes(o, w);
    return o;
  });
  EXPECT_TRUE(bitwise_equal(c, c_cpu));
  EXPECT_TRUE(bitwise_equal(w, w_cpu)) << "empty experts must give exact zeros";
}

TEST(SimtGroupedGemmNaive, MatchesCpu) {
  check_gemm<float>(DType::kF32, {0, 5, 5, 12, 20}, 23, 9, 7, true);  // empty expert 1, rows 20..22 untouched
  check_gemm<float>(DType::kF32, {0, 5, 5, 12, 20}, 20, 9, 7, false);
  check_gemm<float>(DType::kF32, {0, 0, 0}, 4, 3, 5, true);  // every expert empty
  check_gemm<bf16_t>(DType::kBF16, {0, 17, 17, 40}, 40, 16, 24, true);
  check_gemm<f16_t>(DType::kF16, {0, 1}, 1, 1, 1, false);  // E = 1, one row
}

}  // namespace
}  // namespace smoe::testing

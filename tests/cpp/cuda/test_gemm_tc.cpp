// The tensor-core grouped GEMM (csrc/cuda/gemm_tc.cu) through the SIMT emulator: mma / ldmatrix /
// cp.async run with their PTX semantics, under the forward, reverse and random schedules (bitwise
// equal), against the CPU backend and a plain float reference.
//
// Inputs are multiples of 1/8 in [-1/2, 1/2] (or small integers): exact in bf16 and f16, with
// products and sums exact in f32 whatever the summation order, so the GEMM results — and the
// pre-activations and weighted outputs derived from them by one rounding — must match bit for bit.
// Only the activation values go through expf/erff and are compared with tolerance_for(dtype).
#include <cmath>
#include <limits>

#include "cpu/gemm.h"
#include "cuda/gemm_tc.h"
#include "cuda_testing.h"

namespace smoe::testing {
namespace {

template <class S>
DType dtype_of() {
  if constexpr (std::is_same_v<S, float>) return DType::kF32;
  return std::is_same_v<S, bf16_t> ? DType::kBF16 : DType::kF16;
}

std::string trace(const char* what, DType dt, const std::vector<int64_t>& off, int64_t R, int64_t N, int64_t Kd,
                  bool trans_b) {
  std::string s = std::string(what) + " " + dtype_name(dt) + " R=" + std::to_string(R) + " N=" + std::to_string(N) +
                  " Kd=" + std::to_string(Kd) + (trans_b ? " b^T" : " b") + " offsets={";
  for (int64_t o : off) s += std::to_string(o) + ",";
  return s + "}";
}

// The plain float reference: out[r, n] = w[r] * sum_k x[tok(r), k] * op(b[e])[k, n] for the rows
// of every segment (tok(r) = -1: zeros), rounded once; other rows keep `fill`.
template <class S>
std::vector<S> reference_gemm(const std::vector<S>& x, const std::vector<int32_t>* tok, const std::vector<S>& b,
                              const std::vector<int64_t>& off, const std::vector<float>* w, int64_t R, int64_t N,
                              int64_t Kd, bool trans_b, S fill) {
  std::vector<S> out(size_t(R * N), fill);
  const int64_t E = int64_t(off.size()) - 1;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t r = off[size_t(e)]; r < off[size_t(e + 1)]; ++r) {
      const int64_t src = tok ? (*tok)[size_t(r)] : r;
      for (int64_t n = 0; n < N; ++n) {
        float acc = 0.0f;
        for (int64_t k = 0; src >= 0 && k < Kd; ++k) {
          const float bv = to_acc(trans_b ? b[size_t((e * N + n) * Kd + k)] : b[size_t((e * Kd + k) * N + n)]);
          acc += to_acc(x[size_t(src * Kd + k)]) * bv;
        }
        out[size_t(r * N + n)] = from_acc<S>(w ? (*w)[size_t(r)] * acc : acc);
      }
    }
  }
  return out;
}

// Plain, gathered and weighted forward GEMM: bitwise against the float reference and, without the
// fusions, against cpu::grouped_gemm.
template <class S>
void check_forward(const std::vector<int64_t>& off, int64_t R, int64_t N, int64_t Kd, bool trans_b, bool gather,
                   bool weights) {
  const DType dt = dtype_of<S>();
  SCOPED_TRACE(trace("forward", dt, off, R, N, Kd, trans_b) + (gather ? " gather" : "") + (weights ? " weights" : ""));
  const int64_t E = int64_t(off.size()) - 1, T = gather ? R / 2 + 3 : R;
  std::vector<S> x = eighths<S>(size_t(T * Kd), 1), b = eighths<S>(size_t(E * N * Kd), 2);
  std::vector<int32_t> tok(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) tok[size_t(r)] = (r % 7 == 3) ? -1 : int32_t((r * 5 + 1) % T);  // repeats, -1 rows
  std::vector<float> w(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) w[size_t(r)] = 0.25f * float(r % 5) - 0.5f;  // exact, includes 0 and negatives
  std::vector<int64_t> o = off;
  const S fill = from_acc<S>(-7.0f);
  const std::vector<S> want =
      reference_gemm(x, gather ? &tok : nullptr, b, off, weights ? &w : nullptr, R, N, Kd, trans_b, fill);
  const TensorView xv = make_view(x.data(), dt, {T, Kd}), ov = make_view(o.data(), {E + 1});
  const TensorView bv = trans_b ? make_view(b.data(), dt, {E, N, Kd}) : make_view(b.data(), dt, {E, Kd, N});
  const TensorView tv = gather ? make_view(tok.data(), {R}) : TensorView{};
  const TensorView wv = weights ? make_view(w.data(), {R}) : TensorView{};
  GroupedGemmTcParams p;
  p.trans_b = trans_b;
  std::vector<S> c(size_t(R * N));
  const std::vector<unsigned char> bytes = run_all_schedules([&] {
    std::fill(c.begin(), c.end(), fill);  // rows outside every segment stay untouched
    EXPECT_OK(sim::grouped_gemm_tc(p, xv, bv, ov, tv, wv, make_view(c.data(), dt, {R, N}), TensorView{}, nullptr));
    std::vector<unsigned char> out;
    append_bytes(out, c);
    return out;
  });
  EXPECT_TRUE(bitwise_equal(c, want)) << all_close(c, want, dt).message();
  if (!gather && !weights) {
    std::vector<S> c_cpu(size_t(R * N), fill);
    GroupedGemmParams pc;
    pc.trans_b = trans_b;
    ASSERT_TRUE(cpu::grouped_gemm(pc, xv, bv, ov, make_view(c_cpu.data(), dt, {R, N})).ok());
    EXPECT_TRUE(bitwise_equal(c, c_cpu)) << all_close(c, c_cpu, dt).message();
  }
}

TEST(SimtGroupedGemmTc, Forward) {
  // E = 3 with an empty expert, a segment over two m tiles, rows 190..199 past offsets[E]
  check_forward<bf16_t>({0, 150, 150, 190}, 200, 72, 64, true, false, false);
  check_forward<bf16_t>({0, 150, 150, 190}, 200, 72, 64, false, false, false);
  // Kd = 200: 7 k tiles wrap the 4-stage ring; N = 136: two column tiles, the second partial
  check_forward<f16_t>({0, 20, 37}, 37, 136, 200, true, false, false);
  check_forward<f16_t>({0, 20, 37}, 37, 136, 200, false, false, false);
  // E = 5, every row on one expert; E = 1 with one row; R = 0
  check_forward<f16_t>({0, 0, 0, 37, 37, 37}, 37, 24, 72, true, false, false);
  check_forward<bf16_t>({0, 1}, 1, 8, 8, false, false, false);
  check_forward<bf16_t>({0, 0, 0, 0}, 0, 8, 24, true, false, false);
}

TEST(SimtGroupedGemmTc, GatherAndRoutingWeights) {
  check_forward<bf16_t>({0, 11, 11, 40, 61}, 61, 24, 72, true, true, false);  // -1 rows load zeros
  check_forward<f16_t>({0, 11, 11, 40, 61}, 61, 24, 72, false, true, true);
  check_forward<bf16_t>({0, 30, 61}, 61, 64, 8, true, false, true);  // row weights on the plain store
}

// The activation epilogue: pre bitwise equal to cpu::grouped_gemm on the gathered rows, the fused
// activation within tolerance_for(dtype) of cpu::activation_forward(pre).
template <class S>
void check_activation_epilogue(Activation act, const std::vector<int64_t>& off, int64_t R, int64_t F, int64_t Kd,
                               bool trans_b, bool weights) {
  const DType dt = dtype_of<S>();
  const int64_t F1 = is_gated(act) ? 2 * F : F;
  SCOPED_TRACE(trace("activation", dt, off, R, F1, Kd, trans_b) + " act=" + std::to_string(int(act)) +
               (weights ? " weights" : ""));
  const int64_t E = int64_t(off.size()) - 1, T = R + 2;
  std::vector<S> x = eighths<S>(size_t(T * Kd), 3), b = eighths<S>(size_t(E * F1 * Kd), 4);
  std::vector<int32_t> tok(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) tok[size_t(r)] = (r % 5 == 2) ? -1 : int32_t((r * 3 + 2) % T);
  std::vector<float> w(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) w[size_t(r)] = 0.5f + 0.25f * float(r % 3);
  std::vector<int64_t> o = off;
  const TensorView xv = make_view(x.data(), dt, {T, Kd}), ov = make_view(o.data(), {E + 1});
  const TensorView bv = trans_b ? make_view(b.data(), dt, {E, F1, Kd}) : make_view(b.data(), dt, {E, Kd, F1});
  const TensorView tv = make_view(tok.data(), {R});

  // CPU path: permute (zeros for -1), grouped GEMM, activation, weights.
  std::vector<S> xs(size_t(R * Kd), from_acc<S>(0.0f));
  for (int64_t r = 0; r < R; ++r) {
    if (tok[size_t(r)] >= 0) std::copy_n(&x[size_t(tok[size_t(r)] * Kd)], Kd, &xs[size_t(r * Kd)]);
  }
  std::vector<S> pre_cpu(size_t(R * F1)), act_cpu(size_t(R * F));
  GroupedGemmParams pc;
  pc.trans_b = trans_b;
  ASSERT_TRUE(
      cpu::grouped_gemm(pc, make_view(xs.data(), dt, {R, Kd}), bv, ov, make_view(pre_cpu.data(), dt, {R, F1})).ok());
  ASSERT_TRUE(
      cpu::activation_forward(act, make_view(pre_cpu.data(), dt, {R, F1}), make_view(act_cpu.data(), dt, {R, F})).ok());
  if (weights) {
    for (int64_t i = 0; i < R * F; ++i) act_cpu[size_t(i)] = from_acc<S>(w[size_t(i / F)] * to_acc(act_cpu[size_t(i)]));
  }

  GroupedGemmTcParams p;
  p.trans_b = trans_b;
  p.activation = act;
  std::vector<S> pre(size_t(R * F1)), out(size_t(R * F));
  run_all_schedules([&] {
    poison(pre), poison(out);
    EXPECT_OK(sim::grouped_gemm_tc(p, xv, bv, ov, tv, weights ? make_view(w.data(), {R}) : TensorView{},
                                   make_view(out.data(), dt, {R, F}), make_view(pre.data(), dt, {R, F1}), nullptr));
    std::vector<unsigned char> bytes;
    append_bytes(bytes, pre), append_bytes(bytes, out);
    return bytes;
  });
  EXPECT_TRUE(bitwise_equal(pre, pre_cpu)) << all_close(pre, pre_cpu, dt).message();
  EXPECT_TRUE(all_close(out, act_cpu, dt));
}

TEST(SimtGroupedGemmTc, ActivationEpilogue) {
  const std::vector<int64_t> off = {0, 9, 9, 37};
  // gated: F = 72 spans two 64-output CTAs, the second with 8 valid outputs per gate/up half
  check_activation_epilogue<bf16_t>(Activation::kSwiGLU, off, 37, 72, 64, true, false);
  check_activation_epilogue<f16_t>(Activation::kSwiGLU, off, 37, 24, 24, false, true);
  check_activation_epilogue<f16_t>(Activation::kGeGLU, off, 37, 24, 64, true, false);
  check_activation_epilogue<bf16_t>(Activation::kGeGLU, off, 37, 8, 8, false, false);
  check_activation_epilogue<bf16_t>(Activation::kGELU, off, 37, 72, 24, true, true);
  check_activation_epilogue<f16_t>(Activation::kReLU, off, 37, 64, 72, false, false);
}

// wgrad: c[e] = a[seg]^T @ b[seg], bitwise against cpu::grouped_gemm_wgrad and the float reference;
// the output is prefilled with NaN, so an empty expert must write its zeros.
template <class S>
void check_wgrad(const std::vector<int64_t>& off, int64_t R, int64_t M, int64_t N) {
  const DType dt = dtype_of<S>();
  SCOPED_TRACE(trace("wgrad", dt, off, R, N, M, false));
  const int64_t E = int64_t(off.size()) - 1;
  std::vector<S> a = small_ints<S>(size_t(R * M), 5), b = small_ints<S>(size_t(R * N), 6);
  std::vector<int64_t> o = off;
  const TensorView av = make_view(a.data(), dt, {R, M}), bv = make_view(b.data(), dt, {R, N});
  const TensorView ov = make_view(o.data(), {E + 1});
  std::vector<S> want(size_t(E * M * N));
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        float acc = 0.0f;
        for (int64_t r = off[size_t(e)]; r < off[size_t(e + 1)]; ++r)
          acc += to_acc(a[size_t(r * M + m)]) * to_acc(b[size_t(r * N + n)]);
        want[size_t((e * M + m) * N + n)] = from_acc<S>(acc);
      }
    }
  }
  std::vector<S> c_cpu(want.size());
  ASSERT_TRUE(cpu::grouped_gemm_wgrad(av, bv, ov, make_view(c_cpu.data(), dt, {E, M, N})).ok());
  std::vector<S> c(want.size());
  run_all_schedules([&] {
    std::fill(c.begin(), c.end(), from_acc<S>(std::numeric_limits<float>::quiet_NaN()));
    EXPECT_OK(sim::grouped_gemm_wgrad_tc(av, bv, ov, make_view(c.data(), dt, {E, M, N}), nullptr));
    std::vector<unsigned char> bytes;
    append_bytes(bytes, c);
    return bytes;
  });
  EXPECT_TRUE(bitwise_equal(c, want)) << all_close(c, want, dt).message();
  EXPECT_TRUE(bitwise_equal(c, c_cpu)) << all_close(c, c_cpu, dt).message();
}

// K long enough to wrap the 4-stage cp.async ring several times: a stage refilled too early (before
// every warp has read it) shows up under the sweep's warps / cp.async=issue|random entries.
TEST(SimtGroupedGemmTc, LongKWrapsTheRingSeveralTimes) {
  check_forward<bf16_t>({0, 70, 140}, 140, 64, 544, true, true, true);  // 17 k tiles: 4 wraps
  check_forward<f16_t>({0, 140}, 140, 16, 520, false, false, false);    // 17 k tiles, the last partial
  check_wgrad<bf16_t>({0, 600, 610}, 610, 16, 8);                       // 19 k tiles of segment rows
}

TEST(SimtGroupedGemmTc, Wgrad) {
  // E = 5 with two empty experts; a 170-row segment: 6 k tiles wrap the 4-stage ring, the last partial
  check_wgrad<bf16_t>({0, 0, 170, 170, 180, 200}, 200, 72, 24);
  check_wgrad<f16_t>({0, 37, 37}, 37, 136, 8);  // M = 136: two m tiles
  check_wgrad<bf16_t>({0, 0, 0}, 0, 8, 64);     // R = 0: every expert writes zeros
}

// The backend's grouped_gemm / grouped_gemm_wgrad: tensor cores where they apply, v0 otherwise
// (f32; Kd = 12 and M = 12 are not multiples of 8) — the same results as the CPU backend either way.
template <class S>
void check_dispatch(DType dt, int64_t Kd) {
  SCOPED_TRACE(std::string("dispatch ") + dtype_name(dt) + " Kd=" + std::to_string(Kd));
  const std::vector<int64_t> off = {0, 13, 13, 40};
  const int64_t R = 40, N = 16, E = 3;
  std::vector<S> a = small_ints<S>(size_t(R * Kd), 7), b = small_ints<S>(size_t(E * N * Kd), 8);
  std::vector<S> g = small_ints<S>(size_t(R * N), 9);
  std::vector<int64_t> o = off;
  const TensorView av = make_view(a.data(), dt, {R, Kd}), bv = make_view(b.data(), dt, {E, N, Kd});
  const TensorView gv = make_view(g.data(), dt, {R, N}), ov = make_view(o.data(), {E + 1});
  std::vector<S> c_cpu(size_t(R * N)), w_cpu(size_t(E * Kd * N)), c(c_cpu.size()), w(w_cpu.size());
  ASSERT_TRUE(cpu::grouped_gemm({}, av, bv, ov, make_view(c_cpu.data(), dt, {R, N})).ok());
  ASSERT_TRUE(cpu::grouped_gemm_wgrad(av, gv, ov, make_view(w_cpu.data(), dt, {E, Kd, N})).ok());
  run_all_schedules([&] {
    poison(c), poison(w);
    EXPECT_OK(sim::grouped_gemm({}, av, bv, ov, make_view(c.data(), dt, {R, N}), nullptr));
    EXPECT_OK(sim::grouped_gemm_wgrad(av, gv, ov, make_view(w.data(), dt, {E, Kd, N}), nullptr));
    std::vector<unsigned char> bytes;
    append_bytes(bytes, c), append_bytes(bytes, w);
    return bytes;
  });
  EXPECT_TRUE(bitwise_equal(c, c_cpu)) << all_close(c, c_cpu, dt).message();
  EXPECT_TRUE(bitwise_equal(w, w_cpu)) << all_close(w, w_cpu, dt).message();
}

TEST(SimtGroupedGemmTc, BackendDispatch) {
  check_dispatch<bf16_t>(DType::kBF16, 24);  // tensor cores
  check_dispatch<f16_t>(DType::kF16, 12);    // v0: Kd and M = 12
  check_dispatch<float>(DType::kF32, 24);    // v0: f32
}

TEST(SimtGroupedGemmTc, RefusesWhatItDoesNotHandle) {
  std::vector<float> a(16 * 8), b(8 * 8), c(16 * 8);
  std::vector<int64_t> off = {0, 16};
  const TensorView ov = make_view(off.data(), {2});
  GroupedGemmTcParams nn;
  nn.trans_b = false;  // f32 with b [E, Kd, N] takes no gated epilogue on the tensor cores
  nn.activation = Activation::kSwiGLU;
  const Status f32 = sim::grouped_gemm_tc(nn, make_view(a.data(), {16, 8}), make_view(b.data(), {1, 8, 8}), ov, {}, {},
                                          make_view(c.data(), {16, 4}), {}, nullptr);
  EXPECT_EQ(f32.code(), Code::kUnsupported);
  EXPECT_NE(f32.message().find("grouped_gemm_naive"), std::string::npos) << f32.message();
}

// f32 with b [E, N, Kd] on the tensor cores as 3xTF32 (mma.m16n8k8.tf32): eighths are exact in tf32,
// so the results equal the CPU backend bit for bit; uniform inputs stay within the f32 tolerance, and
// the largest error against a double reference is printed (docs/kernels/grouped_gemm.md).
// The f32 wgrad (3xTF32 on K-major tiles that the loaders transpose): bit-equal to the CPU for exact
// inputs, within the f32 tolerance for uniform ones.
TEST(SimtGroupedGemmTc, F32WgradAs3xTf32) {
  check_wgrad<float>({0, 0, 170, 170, 180, 200}, 200, 72, 24);  // empty experts, 11 k tiles of 16 rows
  check_wgrad<float>({0, 37, 37}, 37, 136, 13);                 // two m tiles, odd N
  const int64_t R = 300, M = 40, N = 24, E = 2;
  std::vector<float> a = uniform<float>(size_t(R * M), 31), b = uniform<float>(size_t(R * N), 32);
  std::vector<int64_t> off = {0, 123, 300};
  const TensorView av = make_view(a.data(), {R, M}), bv = make_view(b.data(), {R, N});
  const TensorView ov = make_view(off.data(), {E + 1});
  std::vector<float> want(size_t(E * M * N)), c(want.size());
  ASSERT_TRUE(cpu::grouped_gemm_wgrad(av, bv, ov, make_view(want.data(), {E, M, N})).ok());
  EXPECT_OK(sim::grouped_gemm_wgrad_tc(av, bv, ov, make_view(c.data(), {E, M, N}), nullptr));
  EXPECT_TRUE(all_close(c, want, DType::kF32));
}

TEST(SimtGroupedGemmTc, F32As3xTf32) {
  const DType dt = DType::kF32;
  for (int trial = 0; trial < 2; ++trial) {
    const bool exact = trial == 0;
    const int64_t R = 150, N = 72, Kd = 200, E = 3;  // 13 k tiles of 16: the ring wraps three times
    std::vector<int64_t> off = {0, 60, 60, 150};
    std::vector<float> a(size_t(R * Kd)), b(size_t(E * N * Kd));
    if (exact) {
      a = eighths<float>(a.size(), 21), b = eighths<float>(b.size(), 22);
    } else {
      a = uniform<float>(a.size(), 23), b = uniform<float>(b.size(), 24);
    }
    const TensorView av = make_view(a.data(), {R, Kd}), bv = make_view(b.data(), {E, N, Kd});
    const TensorView ov = make_view(off.data(), {E + 1});
    std::vector<float> want(size_t(R * N)), c(size_t(R * N));
    ASSERT_TRUE(cpu::grouped_gemm({}, av, bv, ov, make_view(want.data(), {R, N})).ok());
    run_all_schedules([&] {
      poison(c);
      EXPECT_OK(sim::grouped_gemm_tc({}, av, bv, ov, {}, {}, make_view(c.data(), {R, N}), {}, nullptr));
      std::vector<unsigned char> bytes;
      append_bytes(bytes, c);
      return bytes;
    });
    // b [E, Kd, N] (the backward's grad_ys @ w2[e]): the same product through the transposing loader.
    std::vector<float> bt(b.size()), c_nn(c.size());
    for (int64_t e = 0; e < E; ++e)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < Kd; ++k) bt[size_t((e * Kd + k) * N + n)] = b[size_t((e * N + n) * Kd + k)];
    GroupedGemmTcParams nn;
    nn.trans_b = false;
    EXPECT_OK(sim::grouped_gemm_tc(nn, av, make_view(bt.data(), {E, Kd, N}), ov, {}, {}, make_view(c_nn.data(), {R, N}),
                                   {}, nullptr));
    EXPECT_TRUE(bitwise_equal(c_nn, c)) << "b [E, Kd, N] differs from b [E, N, Kd]";
    if (exact) {
      EXPECT_TRUE(bitwise_equal(c, want)) << all_close(c, want, dt).message();
      continue;
    }
    EXPECT_TRUE(all_close(c, want, dt));
    double max_abs = 0, max_rel = 0;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = off[size_t(e)]; r < off[size_t(e + 1)]; ++r)
        for (int64_t n = 0; n < N; ++n) {
          double ref = 0;
          for (int64_t k = 0; k < Kd; ++k) ref += double(a[size_t(r * Kd + k)]) * b[size_t((e * N + n) * Kd + k)];
          const double err = std::fabs(double(c[size_t(r * N + n)]) - ref);
          max_abs = std::max(max_abs, err);
          max_rel = std::max(max_rel, err / std::max(1e-30, std::fabs(ref)));
        }
    std::printf(
        "3xTF32 vs double, uniform [-1, 1], Kd = 200: max abs error %.3g (f32 CPU backend: same "
        "check below)\n",
        max_abs);
    double cpu_abs = 0;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = off[size_t(e)]; r < off[size_t(e + 1)]; ++r)
        for (int64_t n = 0; n < N; ++n) {
          double ref = 0;
          for (int64_t k = 0; k < Kd; ++k) ref += double(a[size_t(r * Kd + k)]) * b[size_t((e * N + n) * Kd + k)];
          cpu_abs = std::max(cpu_abs, std::fabs(double(want[size_t(r * N + n)]) - ref));
        }
    std::printf("f32 CPU backend vs double: max abs error %.3g\n", cpu_abs);
    EXPECT_LT(max_abs, 1e-4);
    (void)max_rel;
  }
}

// Any size: column counts that are not multiples of 8 (partial 16-byte chunks), rows that are not
// 16-byte aligned (element loads instead of cp.async), odd column counts (unpaired stores), gated
// F not a multiple of 8 — all on the tensor cores, predicated and zero-filled at the edges.
TEST(SimtGroupedGemmTc, AnySizeRunsOnTheTensorCores) {
  check_forward<bf16_t>({0, 20, 37}, 37, 13, 12, true, false, false);  // Kd = 12, N = 13
  check_forward<f16_t>({0, 20, 37}, 37, 13, 12, false, false, false);
  check_forward<bf16_t>({0, 11, 11, 40, 61}, 61, 19, 37, true, true, true);     // gather + weights, odd sizes
  check_forward<f16_t>({0, 150, 150, 190}, 200, 130, 203, false, true, false);  // two column tiles, 7 k tiles
  check_forward<bf16_t>({0, 1}, 1, 1, 1, true, false, false);                   // 1 x 1 x 1
  const std::vector<int64_t> off = {0, 9, 9, 37};
  check_activation_epilogue<bf16_t>(Activation::kSwiGLU, off, 37, 13, 20, true, false);  // F = 13
  check_activation_epilogue<f16_t>(Activation::kSwiGLU, off, 37, 13, 20, false, true);   // MN-major, up half at F
  check_activation_epilogue<bf16_t>(Activation::kGELU, off, 37, 27, 9, false, true);
  check_wgrad<bf16_t>({0, 0, 170, 170, 180, 200}, 200, 12, 13);  // M = 12, N = 13
  check_wgrad<f16_t>({0, 37, 37}, 37, 131, 5);
}

// 16-byte aligned rows (cp.async) whose column count is not a multiple of 8: the last chunk of a row
// is a cp.async with src-size < 16 (zero fill). Row-strided a (stride 24, Kd 20) against the CPU.
TEST(SimtGroupedGemmTc, AlignedRowsWithPartialChunks) {
  const DType dt = DType::kBF16;
  const int64_t R = 40, Kd = 20, lda = 24, N = 16, E = 2;
  std::vector<bf16_t> a = eighths<bf16_t>(size_t(R * lda), 11), b = eighths<bf16_t>(size_t(E * N * Kd), 12);
  std::vector<int64_t> off = {0, 17, 40};
  TensorView av = make_view(a.data(), dt, {R, Kd});
  av.strides[0] = lda;
  const TensorView bv = make_view(b.data(), dt, {E, N, Kd}), ov = make_view(off.data(), {E + 1});
  std::vector<bf16_t> want(size_t(R * N)), c(size_t(R * N));
  ASSERT_TRUE(cpu::grouped_gemm({}, av, bv, ov, make_view(want.data(), dt, {R, N})).ok());
  run_all_schedules([&] {
    poison(c);
    EXPECT_OK(sim::grouped_gemm_tc({}, av, bv, ov, {}, {}, make_view(c.data(), dt, {R, N}), {}, nullptr));
    std::vector<unsigned char> bytes;
    append_bytes(bytes, c);
    return bytes;
  });
  EXPECT_TRUE(bitwise_equal(c, want)) << all_close(c, want, dt).message();
}

}  // namespace
}  // namespace smoe::testing

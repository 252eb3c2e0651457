// The device expert MLP and shared expert (csrc/cuda/mlp.cu) through the SIMT emulator, against the
// CPU backend (csrc/cpu/mlp.cpp), forward and backward, under the forward, reverse and random
// schedules (bitwise equal across schedules).
//
// Inputs are multiples of 1/8 in [-1/2, 1/2]: exact in bf16, with the first GEMM's products and sums
// exact in f32 whatever the order, so `pre` must match the CPU bit for bit. Everything
// downstream of an activation goes through expf/erff and sums in a different order: tolerance_for(dtype).
// bf16 and f32 (3xTF32) take the tensor-core path (gather and activation fused); the v0 fallbacks run
// under the grouped_gemm kernel version 0 (NaiveGemmFallbacksMatchCpu).
#include <algorithm>

#include "cpu/mlp.h"
#include "cuda/gemm_tc.h"
#include "cuda_testing.h"
#include "kernel_version.h"

namespace smoe::testing {
namespace {

// A routing plan of T tokens, K experts each, over E experts with expert 1 empty (E > 1), plus one row
// before offsets[0] (token 0) and two rows past offsets[E] (token -1): rows of no expert.
struct Plan {
  int64_t R = 0;
  std::vector<int32_t> token_of_row;  // [R]
  std::vector<int64_t> offsets;       // [E+1]
  std::vector<int32_t> row_of;        // [T, K]
};

Plan make_plan(int64_t T, int64_t K, int64_t E) {
  std::vector<int64_t> used;
  for (int64_t e = 0; e < E; ++e) {
    if (E == 1 || e != 1) used.push_back(e);
  }
  auto expert_of = [&](int64_t t, int64_t k) { return used[size_t((t + k) % int64_t(used.size()))]; };
  Plan p;
  constexpr int64_t kLead = 1, kPad = 2;
  p.row_of.assign(size_t(T * K), -1);
  p.token_of_row.push_back(T > 0 ? 0 : -1);  // the lead row
  p.offsets.push_back(kLead);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        if (expert_of(t, k) != e) continue;
        p.row_of[size_t(t * K + k)] = int32_t(p.token_of_row.size());
        p.token_of_row.push_back(int32_t(t));
      }
    }
    p.offsets.push_back(int64_t(p.token_of_row.size()));
  }
  for (int64_t i = 0; i < kPad; ++i) p.token_of_row.push_back(-1);
  p.R = int64_t(p.token_of_row.size());
  return p;
}

std::string trace(const char* what, DType dt, Activation act, int64_t T, int64_t E) {
  return std::string(what) + " " + dtype_name(dt) + " act=" + std::to_string(int(act)) + " T=" + std::to_string(T) +
         " E=" + std::to_string(E);
}

std::vector<unsigned char> workspace_for(int64_t bytes) { return std::vector<unsigned char>(size_t(bytes)); }

template <class S>
void check_expert_mlp(DType dt, Activation act, int64_t T, int64_t E) {
  SCOPED_TRACE(trace("expert_mlp", dt, act, T, E));
  constexpr int64_t H = 16, F = 24, K = 2;
  const int64_t F1 = is_gated(act) ? 2 * F : F;
  const Plan plan = make_plan(T, K, E);
  const int64_t R = plan.R;
  ExpertMlpParams params;
  params.activation = act;
  std::vector<S> x = eighths<S>(size_t(T * H), 1), w1 = eighths<S>(size_t(E * F1 * H), 2),
                 w2 = eighths<S>(size_t(E * H * F), 3), gys = eighths<S>(size_t(R * H), 4);
  std::vector<int32_t> tok = plan.token_of_row, row_of = plan.row_of;
  std::vector<int64_t> off = plan.offsets;
  const TensorView xv = make_view(x.data(), dt, {T, H}), tv = make_view(tok.data(), {R}),
                   ov = make_view(off.data(), {E + 1}), rv = make_view(row_of.data(), {T, K}),
                   w1v = make_view(w1.data(), dt, {E, F1, H}), w2v = make_view(w2.data(), dt, {E, H, F}),
                   gv = make_view(gys.data(), dt, {R, H});

  struct Out {
    std::vector<S> pre, act, ys, gx, gw1, gw2;  // no xs: x is read through token_of_row both ways
  };
  auto alloc = [&] {
    return Out{std::vector<S>(size_t(R * F1)), std::vector<S>(size_t(R * F)),      std::vector<S>(size_t(R * H)),
               std::vector<S>(size_t(T * H)),  std::vector<S>(size_t(E * F1 * H)), std::vector<S>(size_t(E * H * F))};
  };
  const int64_t ws_bytes = expert_mlp_workspace_bytes(params, dt, R, H, F);
  std::vector<unsigned char> ws = workspace_for(ws_bytes);
  const TensorView wsv = make_view(ws.data(), DType::kU8, {ws_bytes});

  Out want = alloc();
  ASSERT_TRUE(cpu::expert_mlp_forward(params, xv, tv, ov, w1v, w2v, make_view(want.pre.data(), dt, {R, F1}),
                                      make_view(want.act.data(), dt, {R, F}), make_view(want.ys.data(), dt, {R, H}))
                  .ok());
  ASSERT_TRUE(cpu::expert_mlp_backward(params, gv, xv, tv, rv, ov, w1v, w2v, make_view(want.pre.data(), dt, {R, F1}),
                                       make_view(want.act.data(), dt, {R, F}), make_view(want.gx.data(), dt, {T, H}),
                                       make_view(want.gw1.data(), dt, {E, F1, H}),
                                       make_view(want.gw2.data(), dt, {E, H, F}), wsv)
                  .ok());

  Out got = alloc();
  run_all_schedules([&] {
    poison(got.pre), poison(got.act), poison(got.ys), poison(got.gx), poison(got.gw1), poison(got.gw2), poison(ws);
    const TensorView prev = make_view(got.pre.data(), dt, {R, F1}), actv = make_view(got.act.data(), dt, {R, F});
    EXPECT_OK(sim::expert_mlp_forward(params, xv, tv, ov, w1v, w2v, prev, actv, make_view(got.ys.data(), dt, {R, H}),
                                      nullptr));
    // The backward reads the device forward's saved tensors, as a layer does.
    EXPECT_OK(sim::expert_mlp_backward(params, gv, xv, tv, rv, ov, w1v, w2v, prev, actv,
                                       make_view(got.gx.data(), dt, {T, H}), make_view(got.gw1.data(), dt, {E, F1, H}),
                                       make_view(got.gw2.data(), dt, {E, H, F}), wsv, nullptr));
    std::vector<unsigned char> o;
    for (const auto* v : {&got.pre, &got.act, &got.ys, &got.gx, &got.gw1, &got.gw2}) append_bytes(o, *v);
    return o;
  });
  EXPECT_TRUE(bitwise_equal(got.pre, want.pre)) << all_close(got.pre, want.pre, dt).message();
  EXPECT_TRUE(all_close(got.act, want.act, dt));
  EXPECT_TRUE(all_close(got.ys, want.ys, dt));
  EXPECT_TRUE(all_close(got.gx, want.gx, dt));
  EXPECT_TRUE(all_close(got.gw1, want.gw1, dt));
  EXPECT_TRUE(all_close(got.gw2, want.gw2, dt));
  // Rows of no expert (the lead row and the padding) are exact zeros; expert 1's weight gradients too.
  const S zero = from_acc<S>(0.0f);
  for (int64_t r : {int64_t{0}, R - 1, R - 2}) {
    for (int64_t h = 0; h < H; ++h) {
      EXPECT_TRUE(bitwise_equal(std::vector<S>{got.ys[size_t(r * H + h)]}, std::vector<S>{zero})) << "ys row " << r;
    }
    for (int64_t f = 0; f < F; ++f) {
      EXPECT_TRUE(bitwise_equal(std::vector<S>{got.act[size_t(r * F + f)]}, std::vector<S>{zero})) << "act row " << r;
    }
  }
  if (E > 1) {
    EXPECT_TRUE(std::all_of(got.gw2.begin() + H * F, got.gw2.begin() + 2 * H * F, [&](S v) {
      return bitwise_equal(std::vector<S>{v}, std::vector<S>{zero});
    })) << "the empty expert's grad_w2 must be exact zeros";
  }
}

TEST(SimtExpertMlp, MatchesCpu) {
  for (int64_t T : {0, 1, 13}) {
    for (int64_t E : {1, 3}) {
      check_expert_mlp<bf16_t>(DType::kBF16, Activation::kSwiGLU, T, E);
      check_expert_mlp<float>(DType::kF32, Activation::kSwiGLU, T, E);
    }
  }
  check_expert_mlp<bf16_t>(DType::kBF16, Activation::kGELU, 13, 3);
  check_expert_mlp<float>(DType::kF32, Activation::kReLU, 13, 3);
}

template <class S>
void check_shared_expert(DType dt, Activation act, int64_t T, bool gated, bool store_gate) {
  SCOPED_TRACE(trace("shared_expert", dt, act, T, 1) + (gated ? " gate_w" : "") + (store_gate ? " gate" : ""));
  constexpr int64_t H = 16, F = 24;
  const int64_t F1 = is_gated(act) ? 2 * F : F;
  ExpertMlpParams params;
  params.activation = act;
  std::vector<S> x = eighths<S>(size_t(T * H), 5), w1 = eighths<S>(size_t(F1 * H), 6),
                 w2 = eighths<S>(size_t(H * F), 7), gate_w = eighths<S>(size_t(H), 8),
                 gy = eighths<S>(size_t(T * H), 9), y0 = eighths<S>(size_t(T * H), 10),
                 gx0 = eighths<S>(size_t(T * H), 11);
  const TensorView xv = make_view(x.data(), dt, {T, H}), w1v = make_view(w1.data(), dt, {F1, H}),
                   w2v = make_view(w2.data(), dt, {H, F}), gyv = make_view(gy.data(), dt, {T, H});
  const TensorView gwv = gated ? make_view(gate_w.data(), dt, {H}) : TensorView{};

  struct Out {
    std::vector<S> pre, act, out, y, gx, gw1, gw2, ggw;
    std::vector<float> gate;
  };
  auto alloc = [&] {
    return Out{std::vector<S>(size_t(T * F1)),
               std::vector<S>(size_t(T * F)),
               std::vector<S>(size_t(T * H)),
               y0,
               gx0,
               std::vector<S>(size_t(F1 * H)),
               std::vector<S>(size_t(H * F)),
               std::vector<S>(size_t(H)),
               std::vector<float>(size_t(T))};
  };
  auto views = [&](Out& o) {
    struct V {
      TensorView pre, act, out, y, gx, gw1, gw2, ggw, gate;
    };
    return V{make_view(o.pre.data(), dt, {T, F1}),
             make_view(o.act.data(), dt, {T, F}),
             make_view(o.out.data(), dt, {T, H}),
             make_view(o.y.data(), dt, {T, H}),
             make_view(o.gx.data(), dt, {T, H}),
             make_view(o.gw1.data(), dt, {F1, H}),
             make_view(o.gw2.data(), dt, {H, F}),
             gated ? make_view(o.ggw.data(), dt, {H}) : TensorView{},
             (gated || store_gate) ? make_view(o.gate.data(), {T}) : TensorView{}};
  };
  const int64_t ws_bytes = shared_expert_workspace_bytes(params, dt, T, H, F);
  std::vector<unsigned char> ws = workspace_for(ws_bytes);
  const TensorView wsv = make_view(ws.data(), DType::kU8, {ws_bytes});

  Out want = alloc();
  {
    const auto v = views(want);
    if (T > 0) {
      ASSERT_TRUE(cpu::shared_expert_forward(params, xv, w1v, w2v, gwv, v.pre, v.act, v.out, v.gate, v.y).ok());
    }
    ASSERT_TRUE(cpu::shared_expert_backward(params, gyv, xv, w1v, w2v, gwv, v.pre, v.act, v.out, v.gate, v.gx, v.gw1,
                                            v.gw2, v.ggw, wsv)
                    .ok());
  }
  Out got = alloc();
  run_all_schedules([&] {
    poison(got.pre), poison(got.act), poison(got.out), poison(got.gw1), poison(got.gw2), poison(got.ggw),
        poison(got.gate), poison(ws);
    got.y = y0, got.gx = gx0;  // both are accumulated into
    const auto v = views(got);
    EXPECT_OK(sim::shared_expert_forward(params, xv, w1v, w2v, gwv, v.pre, v.act, v.out, v.gate, v.y, nullptr));
    EXPECT_OK(sim::shared_expert_backward(params, gyv, xv, w1v, w2v, gwv, v.pre, v.act, v.out, v.gate, v.gx, v.gw1,
                                          v.gw2, v.ggw, wsv, nullptr));
    std::vector<unsigned char> o;
    for (const auto* s : {&got.pre, &got.act, &got.out, &got.y, &got.gx, &got.gw1, &got.gw2}) append_bytes(o, *s);
    if (gated) append_bytes(o, got.ggw);
    if (gated || store_gate) append_bytes(o, got.gate);
    return o;
  });
  EXPECT_TRUE(bitwise_equal(got.pre, want.pre)) << all_close(got.pre, want.pre, dt).message();
  EXPECT_TRUE(all_close(got.act, want.act, dt));
  EXPECT_TRUE(all_close(got.out, want.out, dt));
  EXPECT_TRUE(all_close(got.y, want.y, dt));
  EXPECT_TRUE(all_close(got.gx, want.gx, dt));
  EXPECT_TRUE(all_close(got.gw1, want.gw1, dt));
  EXPECT_TRUE(all_close(got.gw2, want.gw2, dt));
  if (gated) EXPECT_TRUE(all_close(got.ggw, want.ggw, dt));
  if (gated || store_gate) EXPECT_TRUE(all_close(got.gate, want.gate, DType::kF32));
  if (T == 0) {
    const S zero = from_acc<S>(0.0f);
    for (S v : got.gw1) EXPECT_TRUE(bitwise_equal(std::vector<S>{v}, std::vector<S>{zero})) << "T = 0: grad_w1 zeros";
    for (S v : got.ggw) {
      if (gated) EXPECT_TRUE(bitwise_equal(std::vector<S>{v}, std::vector<S>{zero})) << "T = 0: grad_gate_w zeros";
    }
  }
}

TEST(SimtSharedExpert, MatchesCpu) {
  for (int64_t T : {0, 1, 13}) {
    check_shared_expert<bf16_t>(DType::kBF16, Activation::kSwiGLU, T, true, true);
    check_shared_expert<float>(DType::kF32, Activation::kSwiGLU, T, true, true);
  }
  check_shared_expert<bf16_t>(DType::kBF16, Activation::kSwiGLU, 13, false, false);
  check_shared_expert<float>(DType::kF32, Activation::kGeGLU, 13, false, true);  // gate filled with ones
}

// The gathered operands the MLP uses instead of a permuted copy of x (tensor cores and v0): the same
// bits as the plain kernels on x[token_of_row] materialised here (-1 rows: zeros), under every schedule.
template <class S>
void check_gathered(DType dt) {
  SCOPED_TRACE(dtype_name(dt));
  constexpr int64_t T = 37, H = 40, M = 24, E = 4;
  const Plan plan = make_plan(T, 2, E);
  const int64_t R = plan.R;
  std::vector<S> x = eighths<S>(size_t(T * H), 5), g = eighths<S>(size_t(R * M), 6),
                 w = eighths<S>(size_t(E * M * H), 7);
  std::vector<int32_t> tok = plan.token_of_row;
  std::vector<int64_t> off = plan.offsets;
  std::vector<S> xs(size_t(R * H), from_acc<S>(0.0f));
  for (int64_t r = 0; r < R; ++r)
    if (tok[size_t(r)] >= 0) std::copy_n(x.begin() + tok[size_t(r)] * H, H, xs.begin() + r * H);
  const TensorView xv = make_view(x.data(), dt, {T, H}), xsv = make_view(xs.data(), dt, {R, H}),
                   gv = make_view(g.data(), dt, {R, M}), wv = make_view(w.data(), dt, {E, M, H}),
                   tv = make_view(tok.data(), {R}), ov = make_view(off.data(), {E + 1});
  std::vector<S> want(size_t(E * M * H)), got(want.size()), fwd_want(size_t(R * M)), fwd_got(fwd_want.size());
  auto cv = [&](std::vector<S>& v) { return make_view(v.data(), dt, {E, M, H}); };
  auto fv = [&](std::vector<S>& v) { return make_view(v.data(), dt, {R, M}); };
  EXPECT_OK(sim::grouped_gemm_wgrad_tc(gv, xsv, ov, cv(want), nullptr));
  run_all_schedules([&] {
    poison(got);
    EXPECT_OK(sim::grouped_gemm_wgrad_gathered_tc(gv, xv, tv, ov, cv(got), nullptr));
    std::vector<unsigned char> o;
    append_bytes(o, got);
    return o;
  });
  EXPECT_TRUE(bitwise_equal(got, want)) << "tensor-core wgrad, B gathered";
  EXPECT_OK(sim::grouped_gemm_wgrad_naive(gv, xsv, ov, cv(want), nullptr));
  EXPECT_OK(sim::grouped_gemm_wgrad_naive_gathered(gv, xv, tv, ov, cv(got), nullptr));
  EXPECT_TRUE(bitwise_equal(got, want)) << "v0 wgrad, B gathered";
  // v0 forward (the MLP's fallback): rows of the segments only, the rest stay as they were
  std::fill(fwd_want.begin(), fwd_want.end(), from_acc<S>(0.0f));
  std::fill(fwd_got.begin(), fwd_got.end(), from_acc<S>(0.0f));
  EXPECT_OK(sim::grouped_gemm_naive(GroupedGemmParams{true}, xsv, wv, ov, fv(fwd_want), nullptr));
  EXPECT_OK(sim::grouped_gemm_naive_gathered(GroupedGemmParams{true}, xv, wv, ov, tv, fv(fwd_got), nullptr));
  EXPECT_TRUE(bitwise_equal(fwd_got, fwd_want)) << "v0 forward, A gathered";
}

TEST(SimtExpertMlp, GatheredOperandsMatchPermutedCopies) {
  check_gathered<bf16_t>(DType::kBF16);
  check_gathered<f16_t>(DType::kF16);
  check_gathered<float>(DType::kF32);
}

// The public entry points dispatch 'simt' to these launchers, and refuse f64 on the device.
// expert_mlp_combine_top1_forward: the device op (the second GEMM's epilogue scales and scatters into
// y) against the CPU backend's, with K = 1: the lead row (token 0, before offsets[0]) and the padding
// rows must store nothing, the empty expert 1 nothing, and with `drop` the first segment row becomes
// padding (token -1) so its token has no row and must come out as exact zeros.
template <class S>
void check_combine_top1(DType dt, Activation act, int64_t T, int64_t E, bool drop) {
  SCOPED_TRACE(trace("combine_top1", dt, act, T, E) + (drop ? " drop" : ""));
  constexpr int64_t H = 16, F = 24;
  const int64_t F1 = is_gated(act) ? 2 * F : F;
  Plan plan = make_plan(T, 1, E);
  int32_t dropped = -1;
  if (drop && T > 0) {
    dropped = plan.token_of_row[size_t(plan.offsets[0])];
    plan.token_of_row[size_t(plan.offsets[0])] = -1;
  }
  const int64_t R = plan.R;
  ExpertMlpParams params;
  params.activation = act;
  std::vector<S> x = eighths<S>(size_t(T * H), 1), w1 = eighths<S>(size_t(E * F1 * H), 2),
                 w2 = eighths<S>(size_t(E * H * F), 3);
  std::vector<float> w(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) w[size_t(t)] = 0.25f + 0.125f * float(t % 5);
  std::vector<int32_t> tok = plan.token_of_row;
  std::vector<int64_t> off = plan.offsets;
  const TensorView xv = make_view(x.data(), dt, {T, H}), tv = make_view(tok.data(), {R}),
                   ov = make_view(off.data(), {E + 1}), w1v = make_view(w1.data(), dt, {E, F1, H}),
                   w2v = make_view(w2.data(), dt, {E, H, F}), wv = make_view(w.data(), {T, 1});
  const int64_t ws_bytes = expert_mlp_combine_top1_workspace_bytes(params, dt, R, H, F);
  std::vector<unsigned char> ws = workspace_for(ws_bytes);
  const TensorView wsv = make_view(ws.data(), DType::kU8, {ws_bytes});
  std::vector<S> want(size_t(T * H)), got(size_t(T * H));
  poison(want);
  ASSERT_TRUE(
      cpu::expert_mlp_combine_top1_forward(params, xv, tv, ov, w1v, w2v, wv, make_view(want.data(), dt, {T, H}), wsv)
          .ok());
  run_all_schedules([&] {
    poison(got), poison(ws);
    EXPECT_OK(sim::expert_mlp_combine_top1_forward(params, xv, tv, ov, w1v, w2v, wv, make_view(got.data(), dt, {T, H}),
                                                   wsv, nullptr));
    std::vector<unsigned char> o;
    append_bytes(o, got);
    return o;
  });
  EXPECT_TRUE(all_close(got, want, dt));
  if (dropped >= 0) {
    const S zero = from_acc<S>(0.0f);
    for (int64_t h = 0; h < H; ++h) {
      EXPECT_TRUE(bitwise_equal(std::vector<S>{got[size_t(dropped * H + h)]}, std::vector<S>{zero}))
          << "dropped token " << dropped;
    }
  }
}

TEST(SimtExpertMlp, CombineTop1MatchesCpu) {
  for (int64_t T : {0, 1, 13}) {
    for (int64_t E : {1, 3}) {
      for (bool drop : {false, true}) {
        check_combine_top1<bf16_t>(DType::kBF16, Activation::kSwiGLU, T, E, drop);
        check_combine_top1<float>(DType::kF32, Activation::kSwiGLU, T, E, drop);
      }
    }
  }
  check_combine_top1<f16_t>(DType::kF16, Activation::kGELU, 13, 3, true);
}

// The v0 fallbacks of every MLP launcher, reached on real hardware only past CUDA's grid limits: with
// grouped_gemm at kernel version 0 the tensor-core launchers refuse, so the first GEMM is the gathered
// v0 + the activation kernel, grad_w1 the gathered v0 wgrad, and the top-1 combine's second GEMM the v0
// GEMM into the workspace + scale_scatter_rows_kernel. Same checks against the CPU as above.
TEST(SimtExpertMlp, NaiveGemmFallbacksMatchCpu) {
  KernelVersionScope scope(sim::KernelOp::kGroupedGemm, 0);
  SCOPED_TRACE(version_trace(sim::KernelOp::kGroupedGemm));
  for (int64_t T : {0, 1, 13}) {
    for (int64_t E : {1, 3}) {
      for (bool drop : {false, true}) {
        check_combine_top1<bf16_t>(DType::kBF16, Activation::kSwiGLU, T, E, drop);
        check_combine_top1<float>(DType::kF32, Activation::kSwiGLU, T, E, drop);
      }
    }
  }
  check_combine_top1<f16_t>(DType::kF16, Activation::kGELU, 13, 3, true);
  check_expert_mlp<bf16_t>(DType::kBF16, Activation::kSwiGLU, 13, 3);
  check_expert_mlp<float>(DType::kF32, Activation::kReLU, 13, 3);
  check_shared_expert<bf16_t>(DType::kBF16, Activation::kSwiGLU, 13, true, true);
}

// The switch makes the tensor-core launchers refuse (kUnsupported), and only while it is 0.
TEST(SimtExpertMlp, GroupedGemmVersionZeroRefusesTensorCores) {
  constexpr int64_t R = 8, Kd = 16, N = 16;
  std::vector<bf16_t> a = eighths<bf16_t>(size_t(R * Kd), 1), b = eighths<bf16_t>(size_t(N * Kd), 2), c(size_t(R * N)),
                      w(size_t(Kd * N));
  std::vector<int64_t> off = {0, R};
  const TensorView av = make_view(a.data(), DType::kBF16, {R, Kd}), bv = make_view(b.data(), DType::kBF16, {1, N, Kd}),
                   cv = make_view(c.data(), DType::kBF16, {R, N}), ov = make_view(off.data(), {2}),
                   gv = make_view(c.data(), DType::kBF16, {R, N}), wv = make_view(w.data(), DType::kBF16, {1, N, Kd});
  GroupedGemmTcParams tc;
  tc.trans_b = true;
  {
    KernelVersionScope scope(sim::KernelOp::kGroupedGemm, 0);
    const Status st = sim::grouped_gemm_tc(tc, av, bv, ov, TensorView{}, TensorView{}, cv, TensorView{}, nullptr);
    EXPECT_EQ(st.code(), Code::kUnsupported) << st.message();
    EXPECT_NE(st.message().find("kernel version 0"), std::string::npos) << st.message();
    EXPECT_EQ(sim::grouped_gemm_wgrad_gathered_tc(gv, av, TensorView{}, ov, wv, nullptr).code(), Code::kUnsupported);
    EXPECT_OK(sim::grouped_gemm(GroupedGemmParams{true}, av, bv, ov, cv, nullptr));  // the v0 fallback
  }
  if (sim::kernel_version(sim::KernelOp::kGroupedGemm) == 1) {
    EXPECT_OK(sim::grouped_gemm_tc(tc, av, bv, ov, TensorView{}, TensorView{}, cv, TensorView{}, nullptr));
  }
}

TEST(SimtExpertMlp, EntryPointDispatch) {
  constexpr int64_t T = 3, H = 8, F = 8, K = 1, E = 1;
  const Plan plan = make_plan(T, K, E);
  const int64_t R = plan.R;
  std::vector<float> x = eighths<float>(size_t(T * H), 1), w1 = eighths<float>(size_t(2 * F * H), 2),
                     w2 = eighths<float>(size_t(H * F), 3);
  std::vector<float> pre(size_t(R * 2 * F)), act(size_t(R * F)), ys(size_t(R * H)), ys_cpu(size_t(R * H));
  std::vector<int32_t> tok = plan.token_of_row;
  std::vector<int64_t> off = plan.offsets;
  auto run = [&](Backend b, std::vector<float>& out) {
    Exec ex;
    ex.backend = b;
    return expert_mlp_forward(ex, ExpertMlpParams{}, make_view(x.data(), {T, H}), make_view(tok.data(), {R}),
                              make_view(off.data(), {E + 1}), make_view(w1.data(), {E, 2 * F, H}),
                              make_view(w2.data(), {E, H, F}), make_view(pre.data(), {R, 2 * F}),
                              make_view(act.data(), {R, F}), make_view(out.data(), {R, H}));
  };
  EXPECT_OK(run(Backend::kCpu, ys_cpu));
  EXPECT_OK(run(Backend::kSimt, ys));
  EXPECT_TRUE(all_close(ys, ys_cpu, DType::kF32));

  std::vector<double> xd(size_t(T * H)), w1d(size_t(2 * F * H)), w2d(size_t(H * F)), pd(size_t(T * 2 * F)),
      ad(size_t(T * F)), od(size_t(T * H)), yd(size_t(T * H));
  Exec ex;
  ex.backend = Backend::kSimt;
  const Status st = shared_expert_forward(ex, ExpertMlpParams{}, make_view(xd.data(), {T, H}),
                                          make_view(w1d.data(), {2 * F, H}), make_view(w2d.data(), {H, F}),
                                          TensorView{}, make_view(pd.data(), {T, 2 * F}), make_view(ad.data(), {T, F}),
                                          make_view(od.data(), {T, H}), TensorView{}, make_view(yd.data(), {T, H}));
  EXPECT_EQ(st.code(), Code::kUnsupported);
  EXPECT_NE(st.message().find("f64"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace smoe::testing

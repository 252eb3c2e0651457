// Gating kernels of the CUDA backend (csrc/cuda/gating.cu) through the SIMT emulator, against the
// CPU backend: indices exactly, floats with tolerance_for(f32).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <random>
#include <set>

#include "core/workspace.h"
#include "cpu/gating.h"
#include "cuda_testing.h"
#include "kernel_version.h"

namespace smoe::testing {
namespace {

// Logits whose values are pairwise far apart in every row (a shuffled ramp), so that the two
// backends' last-bit differences in the scores cannot reorder a selection; ties=true draws small
// integers instead, so that equal logits give exactly tied scores (the lower index must win).
template <class In>
std::vector<In> make_logits(int64_t T, int64_t E, int64_t stride, uint32_t seed, bool ties) {
  std::mt19937 g(seed);
  std::vector<In> v(static_cast<size_t>(T * stride), from_acc<In>(0.0f));
  std::vector<int> perm(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), g);
    for (int64_t e = 0; e < E; ++e) {
      const float x = ties ? float(int(g() % 5) - 2) : 4.0f * float(perm[e]) / float(E) - 2.0f;
      v[t * stride + e] = from_acc<In>(x);
    }
  }
  return v;
}

TensorView strided(void* p, DType dt, int64_t rows, int64_t cols, int64_t stride) {
  TensorView v = make_view(p, dt, {rows, cols});
  v.strides[0] = stride;
  return v;
}

struct TopkCase {
  int64_t T, E;
  TopkGatingParams p;
  bool bias, ties;
  DType dtype;
};

template <class In>
void check_topk(const TopkCase& c) {
  SCOPED_TRACE("T=" + std::to_string(c.T) + " E=" + std::to_string(c.E) + " K=" + std::to_string(c.p.top_k) +
               " groups=" + std::to_string(c.p.n_groups) + "/" + std::to_string(c.p.topk_groups) + " " +
               dtype_name(c.dtype));
  const int64_t T = c.T, E = c.E, K = c.p.top_k, ls = E + 3;  // padded logits rows
  std::vector<In> logits = make_logits<In>(T, E, ls, uint32_t(T * 31 + E), c.ties);
  std::vector<float> bias = uniform<float>(size_t(E), 5, -0.05f, 0.05f);
  const TensorView lv = strided(logits.data(), c.dtype, T, E, ls);
  const TensorView bv = c.bias ? make_view(bias.data(), {E}) : TensorView{};

  std::vector<float> w_cpu(size_t(T * K)), s_cpu(size_t(T * E));
  std::vector<int32_t> e_cpu(size_t(T * K));
  ASSERT_TRUE(cpu::topk_gating_forward(c.p, lv, bv, make_view(w_cpu.data(), {T, K}), make_view(e_cpu.data(), {T, K}),
                                       make_view(s_cpu.data(), {T, E}))
                  .ok());
  std::vector<float> w(size_t(T * K)), s(size_t(T * E));
  std::vector<int32_t> e(size_t(T * K));
  run_all_schedules([&] {
    poison(w), poison(s), poison(e);
    EXPECT_OK(sim::topk_gating_forward(c.p, lv, bv, make_view(w.data(), {T, K}), make_view(e.data(), {T, K}),
                                       make_view(s.data(), {T, E}), nullptr));
    std::vector<unsigned char> out;
    append_bytes(out, w), append_bytes(out, s), append_bytes(out, e);
    return out;
  });
  EXPECT_EQ(e, e_cpu);
  EXPECT_TRUE(all_close(w, w_cpu, DType::kF32));
  EXPECT_TRUE(all_close(s, s_cpu, DType::kF32));

  // Backward, from the CPU forward's outputs: grad_weights always, grad_scores on odd T.
  std::vector<float> gw = uniform<float>(size_t(T * K), 11), gs = uniform<float>(size_t(T * E), 12);
  const TensorView gsv = (T % 2) ? make_view(gs.data(), {T, E}) : TensorView{};
  std::vector<float> gl_cpu(size_t(T * E)), gl(size_t(T * E));
  ASSERT_TRUE(cpu::topk_gating_backward(c.p, make_view(s_cpu.data(), {T, E}), make_view(e_cpu.data(), {T, K}),
                                        make_view(gw.data(), {T, K}), gsv, make_view(gl_cpu.data(), {T, E}))
                  .ok());
  run_all_schedules([&] {
    poison(gl);
    EXPECT_OK(sim::topk_gating_backward(c.p, make_view(s_cpu.data(), {T, E}), make_view(e_cpu.data(), {T, K}),
                                        make_view(gw.data(), {T, K}), gsv, make_view(gl.data(), {T, E}), nullptr));
    std::vector<unsigned char> out;
    append_bytes(out, gl);
    return out;
  });
  EXPECT_TRUE(all_close(gl, gl_cpu, DType::kF32));
}

TopkGatingParams topk(int K, ScoreFunc f = ScoreFunc::kSoftmax) {
  TopkGatingParams p;
  p.top_k = K;
  p.score_func = f;
  return p;
}

TEST(SimtGating, TopkMatchesCpu) {
  std::vector<TopkCase> cases;
  cases.push_back({0, 8, topk(2), false, false, DType::kF32});
  cases.push_back({1, 1, topk(1), false, false, DType::kF32});  // E = 1
  cases.push_back({7, 5, topk(5), true, false, DType::kF32});   // K = E, odd E
  cases.push_back({7, 8, topk(2), false, true, DType::kF32});   // exact ties: lower index wins
  cases.push_back({33, 8, topk(2, ScoreFunc::kSigmoid), true, true, DType::kF32});
  cases.push_back({300, 64, topk(8), false, false, DType::kBF16});
  cases.push_back({9, 300, topk(7, ScoreFunc::kSigmoid), true, false, DType::kF16});  // E > 256
  cases.push_back({3, 512, topk(512), false, false, DType::kF32});                    // E = K = 512: 16 items a lane
  TopkGatingParams renorm = topk(6, ScoreFunc::kSigmoid);
  renorm.renormalize = true;
  renorm.renorm_eps = 1e-20f;
  renorm.routed_scaling = 2.5f;
  cases.push_back({21, 40, renorm, true, false, DType::kF32});
  TopkGatingParams grouped = renorm;  // DeepSeek-V3 style: 8 groups, keep 4, top-2-sum group score
  grouped.n_groups = 8;
  grouped.topk_groups = 4;
  grouped.group_score = GroupScore::kTop2Sum;
  cases.push_back({37, 64, grouped, true, false, DType::kF32});
  cases.push_back({11, 64, grouped, true, true, DType::kBF16});
  TopkGatingParams gmax = topk(3);  // DeepSeek-V2 style: max group score; groups of one expert
  gmax.n_groups = 20;
  gmax.topk_groups = 3;
  cases.push_back({13, 20, gmax, false, true, DType::kF32});
  gmax.n_groups = 5;
  gmax.topk_groups = 2;
  gmax.group_score = GroupScore::kTop2Sum;
  cases.push_back({13, 300, gmax, true, false, DType::kF32});
  // E > 512: the block-per-token kernels
  cases.push_back({5, 1000, topk(8), false, false, DType::kF32});
  cases.push_back({6, 1000, topk(6, ScoreFunc::kSigmoid), true, true, DType::kBF16});  // ties, bias
  cases.push_back({2, 513, topk(513), false, false, DType::kF32});                     // K = E
  TopkGatingParams big_grouped = renorm;
  big_grouped.top_k = 8;
  big_grouped.n_groups = 8;
  big_grouped.topk_groups = 3;
  big_grouped.group_score = GroupScore::kTop2Sum;
  cases.push_back({4, 1024, big_grouped, true, false, DType::kF32});
  big_grouped.group_score = GroupScore::kMax;
  big_grouped.n_groups = 600;  // groups of one expert, more groups than threads
  big_grouped.topk_groups = 300;
  cases.push_back({3, 600, big_grouped, true, true, DType::kF16});
  // The same cases through the fast kernels (v1) and the naive one-thread-per-token kernel (v0);
  // v0 keeps the kept groups in a 64-bit mask, so the 600-group case is v1's alone.
  for (int version : {1, 0}) {
    KernelVersionScope scope(sim::KernelOp::kTopkGating, version);
    SCOPED_TRACE(version_trace(sim::KernelOp::kTopkGating));
    for (const TopkCase& c : cases) {
      if (version == 0 && c.p.topk_groups < c.p.n_groups && c.p.n_groups > 64) continue;
      switch (c.dtype) {
        case DType::kBF16:
          check_topk<bf16_t>(c);
          break;
        case DType::kF16:
          check_topk<f16_t>(c);
          break;
        default:
          check_topk<float>(c);
          break;
      }
    }
  }
}

TEST(SimtGating, TopkV0NamesItsGroupLimit) {
  KernelVersionScope scope(sim::KernelOp::kTopkGating, 0);
  const int64_t T = 2, E = 130, K = 2;
  TopkGatingParams p = topk(int(K));
  p.n_groups = 65;
  p.topk_groups = 2;
  std::vector<float> x(T * E), w(T * K), s(T * E);
  std::vector<int32_t> e(T * K);
  const Status st = sim::topk_gating_forward(p, make_view(x.data(), {T, E}), TensorView{}, make_view(w.data(), {T, K}),
                                             make_view(e.data(), {T, K}), make_view(s.data(), {T, E}), nullptr);
  EXPECT_EQ(st.code(), Code::kUnsupported) << st.message();
  EXPECT_NE(st.message().find("n_groups = 65"), std::string::npos) << st.message();
}

TEST(SimtGating, KernelVersionSwitchChecksItsArguments) {
  EXPECT_EQ(sim::set_kernel_version(sim::KernelOp::kPermute, 2).code(), Code::kInvalidArgument);
  EXPECT_EQ(sim::set_kernel_version(static_cast<sim::KernelOp>(9), 0).code(), Code::kInvalidArgument);
  EXPECT_STREQ(sim::kernel_op_name(sim::KernelOp::kRoutingPlan), "routing_plan");
  // Relative to the initial values (SMOE_CUDA_KERNEL_VERSION may have set them).
  const int combine0 = sim::kernel_version(sim::KernelOp::kCombine);
  const int permute0 = sim::kernel_version(sim::KernelOp::kPermute);
  {
    KernelVersionScope scope(sim::KernelOp::kCombine, 1 - combine0);
    EXPECT_EQ(sim::kernel_version(sim::KernelOp::kCombine), 1 - combine0);
    EXPECT_EQ(sim::kernel_version(sim::KernelOp::kPermute), permute0) << "one family at a time";
  }
  EXPECT_EQ(sim::kernel_version(sim::KernelOp::kCombine), combine0);
}

// SMOE_CUDA_KERNEL_VERSION's parser: every valid form, and every invalid one refused naming its item
// with the output left as it was (the environment path then warns and keeps v1: the ctest entries
// SimtKernelVersionEnv* below run KernelVersionEnvironmentIsApplied with the variable set).
TEST(SimtGating, KernelVersionParser) {
  using Versions = std::array<int, sim::kNumKernelOps>;
  auto parse = [](const char* spec, Versions* got) {
    int v[sim::kNumKernelOps];
    for (int& x : v) x = 7;
    const Status st = sim::parse_kernel_versions(spec, v);
    std::copy(std::begin(v), std::end(v), got->begin());
    return st;
  };
  const Versions ones{1, 1, 1, 1, 1}, zeros{0, 0, 0, 0, 0}, untouched{7, 7, 7, 7, 7};
  Versions got{};
  for (const char* spec : {static_cast<const char*>(nullptr), "", "1", ",", "permute=1"}) {
    EXPECT_OK(parse(spec, &got));
    EXPECT_EQ(got, ones) << (spec ? spec : "(null)");
  }
  EXPECT_OK(parse("0", &got));
  EXPECT_EQ(got, zeros);
  EXPECT_OK(parse("permute=0,grouped_gemm=0,", &got));
  EXPECT_EQ(got, (Versions{1, 1, 0, 1, 0}));
  EXPECT_OK(parse("topk_gating=0,routing_plan=0,combine=0,topk_gating=1", &got));
  EXPECT_EQ(got, (Versions{1, 0, 1, 0, 1})) << "the last item of a name wins";
  for (const char* spec : {"2", "yes", "permute", "permute=", "permute=2", "permute=01", "gating=0", "permute=0,perm=0",
                           " permute=0", "PERMUTE=0"}) {
    const Status st = parse(spec, &got);
    EXPECT_EQ(st.code(), Code::kInvalidArgument) << spec;
    EXPECT_NE(st.message().find("SMOE_CUDA_KERNEL_VERSION"), std::string::npos) << st.message();
    EXPECT_EQ(got, untouched) << spec << ": nothing applied";
  }
  const Status st = parse("permute=0,combine=9", &got);
  EXPECT_NE(st.message().find("'combine=9'"), std::string::npos) << st.message();
  for (int i = 0; i < sim::kNumKernelOps; ++i) {
    const std::string name = sim::kernel_op_name(static_cast<sim::KernelOp>(i));
    EXPECT_OK(parse((name + "=0").c_str(), &got));
    EXPECT_EQ(got[size_t(i)], 0) << name;
  }
}

// Run by ctest with SMOE_CUDA_KERNEL_VERSION set and SMOE_TEST_EXPECT_KERNEL_VERSIONS the versions it
// must give ("1,1,0,1,0"; tests/cpp/cuda/CMakeLists.txt); skipped otherwise.
TEST(SimtGating, KernelVersionEnvironmentIsApplied) {
  const char* want = std::getenv("SMOE_TEST_EXPECT_KERNEL_VERSIONS");
  if (want == nullptr) GTEST_SKIP() << "run by the SimtKernelVersionEnv* ctest entries";
  std::string got;
  for (int i = 0; i < sim::kNumKernelOps; ++i) {
    got += (i ? "," : "") + std::to_string(sim::kernel_version(static_cast<sim::KernelOp>(i)));
  }
  const char* env = std::getenv("SMOE_CUDA_KERNEL_VERSION");
  EXPECT_EQ(got, want) << "SMOE_CUDA_KERNEL_VERSION=" << (env ? env : "(unset)");
}

TEST(SimtGating, TopkNanLogitsGiveValidDistinctIndices) {
  const int64_t T = 4, E = 40, K = 5;
  std::vector<float> logits = make_logits<float>(T, E, E, 3, false);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t e = 0; e < E; e += 3) logits[e] = nan;   // row 0: some NaN
  for (int64_t e = 0; e < E; ++e) logits[E + e] = nan;  // row 1: all NaN
  logits[2 * E + 39] = nan;
  std::vector<float> w(T * K), s(T * E);
  std::vector<int32_t> ex(T * K);
  TopkGatingParams p = topk(int(K), ScoreFunc::kSigmoid);
  EXPECT_OK(sim::topk_gating_forward(p, make_view(logits.data(), {T, E}), TensorView{}, make_view(w.data(), {T, K}),
                                     make_view(ex.data(), {T, K}), make_view(s.data(), {T, E}), nullptr));
  for (int64_t t = 0; t < T; ++t) {
    std::set<int32_t> seen;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t e = ex[t * K + k];
      EXPECT_TRUE(e >= 0 && e < E) << "row " << t << " pick " << k << " = " << e;
      seen.insert(e);
      if (t == 0) EXPECT_NE(e % 3, 0) << "a NaN score must rank below every number";
    }
    EXPECT_EQ(int64_t(seen.size()), K) << "row " << t;
  }
  for (int64_t k = 0; k < K; ++k) EXPECT_EQ(ex[K + k], k) << "all-NaN row: ties go to the lower index";
}

TEST(SimtGating, TopkLimitsAndF64AreUnsupported) {
  std::vector<float> x(2 * 8193), w(2), s(2 * 8193);
  std::vector<int32_t> e(2);
  const Status big =
      sim::topk_gating_forward(topk(1), make_view(x.data(), {2, 8193}), TensorView{}, make_view(w.data(), {2, 1}),
                               make_view(e.data(), {2, 1}), make_view(s.data(), {2, 8193}), nullptr);
  EXPECT_EQ(big.code(), Code::kUnsupported) << big.message();
  std::vector<double> xd(8), wd(2), sd(8);
  const Status f64 =
      sim::topk_gating_forward(topk(1), make_view(xd.data(), {2, 4}), TensorView{}, make_view(wd.data(), {2, 1}),
                               make_view(e.data(), {2, 1}), make_view(sd.data(), {2, 4}), nullptr);
  EXPECT_EQ(f64.code(), Code::kUnsupported) << f64.message();
}

template <class In>
void check_expert_choice(int64_t T, int64_t E, int32_t C, ScoreFunc f, bool ties, DType dt) {
  SCOPED_TRACE("T=" + std::to_string(T) + " E=" + std::to_string(E) + " C=" + std::to_string(C));
  ExpertChoiceParams p;
  p.capacity = C;
  p.score_func = f;
  // Scores of different rows are compared here: softmax rows with the same values in another order
  // differ in the last bit between backends (different sum orders), so softmax cases draw continuous
  // random logits; exact ties are tested with the sigmoid, which is elementwise.
  std::vector<In> logits = ties ? make_logits<In>(T, E, E, uint32_t(T + 7 * E), true)
                                : uniform<In>(size_t(T * E), uint32_t(T + 7 * E), -2.f, 2.f);
  const TensorView lv = make_view(logits.data(), dt, {T, E});
  std::vector<float> s_cpu(T * E), w_cpu(T * E), s(T * E), w(T * E);
  std::vector<int32_t> tk_cpu(E * C), ro_cpu(T * E), tk(E * C), ro(T * E);
  ASSERT_TRUE(cpu::expert_choice_forward(p, lv, make_view(s_cpu.data(), {T, E}),
                                         make_view(tk_cpu.data(), {E, int64_t(C)}), make_view(ro_cpu.data(), {T, E}),
                                         make_view(w_cpu.data(), {T, E}))
                  .ok());
  run_all_schedules([&] {
    poison(s), poison(w), poison(tk), poison(ro);
    EXPECT_OK(sim::expert_choice_forward(p, lv, make_view(s.data(), {T, E}), make_view(tk.data(), {E, int64_t(C)}),
                                         make_view(ro.data(), {T, E}), make_view(w.data(), {T, E}), nullptr));
    std::vector<unsigned char> out;
    append_bytes(out, s), append_bytes(out, w), append_bytes(out, tk), append_bytes(out, ro);
    return out;
  });
  EXPECT_EQ(tk, tk_cpu);
  EXPECT_EQ(ro, ro_cpu);
  EXPECT_TRUE(all_close(s, s_cpu, DType::kF32));
  EXPECT_TRUE(all_close(w, w_cpu, DType::kF32));

  std::vector<float> gw = uniform<float>(T * E, 9), gs = uniform<float>(T * E, 10), gl_cpu(T * E), gl(T * E);
  ASSERT_TRUE(cpu::expert_choice_backward(p, make_view(s_cpu.data(), {T, E}), make_view(ro_cpu.data(), {T, E}),
                                          make_view(gw.data(), {T, E}), TensorView{}, make_view(gl_cpu.data(), {T, E}))
                  .ok());
  // grad_weights alone: the CPU backend; grad_scores alone, both, and neither: the reference below.
  for (int which = 0; which < 4; ++which) {
    const bool has_w = which == 0 || which == 2, has_s = which == 1 || which == 2;
    SCOPED_TRACE(std::string("grad_weights ") + (has_w ? "given" : "absent") + ", grad_scores " +
                 (has_s ? "given" : "absent"));
    const TensorView gwv = has_w ? make_view(gw.data(), {T, E}) : TensorView{};
    const TensorView gsv = has_s ? make_view(gs.data(), {T, E}) : TensorView{};
    run_all_schedules([&] {
      poison(gl);
      EXPECT_OK(sim::expert_choice_backward(p, make_view(s_cpu.data(), {T, E}), make_view(ro_cpu.data(), {T, E}), gwv,
                                            gsv, make_view(gl.data(), {T, E}), nullptr));
      std::vector<unsigned char> out;
      append_bytes(out, gl);
      return out;
    });
    if (which == 0) {
      EXPECT_TRUE(all_close(gl, gl_cpu, DType::kF32));
      continue;
    }
    // g = (chosen ? grad_weights : 0) + grad_scores, then the score function's backward, in f64.
    std::vector<float> ref(T * E);
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> g(E);
      double dot = 0;
      for (int64_t e = 0; e < E; ++e) {
        const int64_t i = t * E + e;
        g[e] = (has_w && ro_cpu[i] >= 0 ? gw[i] : 0.0) + (has_s ? gs[i] : 0.0);
        dot += g[e] * s_cpu[i];
      }
      for (int64_t e = 0; e < E; ++e) {
        const double sv = s_cpu[t * E + e];
        ref[t * E + e] = float(f == ScoreFunc::kSoftmax ? sv * (g[e] - dot) : g[e] * sv * (1 - sv));
      }
    }
    if (which == 3) {
      EXPECT_TRUE(bitwise_equal(gl, std::vector<float>(T * E, 0.0f))) << "both absent: zeros";
    } else {
      EXPECT_TRUE(all_close(gl, ref, DType::kF32));
    }
  }
}

TEST(SimtGating, ExpertChoiceMatchesCpu) {
  check_expert_choice<float>(1, 1, 1, ScoreFunc::kSoftmax, false, DType::kF32);
  check_expert_choice<float>(7, 5, 7, ScoreFunc::kSigmoid, false, DType::kF32);  // C = T
  check_expert_choice<float>(7, 3, 2, ScoreFunc::kSigmoid, true, DType::kF32);   // ties: lower token
  check_expert_choice<float>(300, 3, 150, ScoreFunc::kSigmoid, true, DType::kF32);
  check_expert_choice<bf16_t>(300, 6, 100, ScoreFunc::kSoftmax, false, DType::kBF16);
  check_expert_choice<f16_t>(33, 40, 5, ScoreFunc::kSigmoid, true, DType::kF16);
}

// T > 16384: radix select of each column's C best, then a sort of those only.
TEST(SimtGating, ExpertChoiceLargeTMatchesCpu) {
  check_expert_choice<float>(20000, 3, 3000, ScoreFunc::kSigmoid, true, DType::kF32);  // heavy ties
  check_expert_choice<bf16_t>(16385, 2, 1, ScoreFunc::kSoftmax, false, DType::kBF16);  // C = 1
}

TEST(SimtGating, ExpertChoiceLargeTAndCapacityIsUnsupported) {
  const int64_t T = 16385, E = 1, C = 16385;
  ExpertChoiceParams p;
  p.capacity = int32_t(C);
  std::vector<float> x(T * E), s(T * E), w(T * E);
  std::vector<int32_t> tk(E * C), ro(T * E);
  const Status st = sim::expert_choice_forward(p, make_view(x.data(), {T, E}), make_view(s.data(), {T, E}),
                                               make_view(tk.data(), {E, C}), make_view(ro.data(), {T, E}),
                                               make_view(w.data(), {T, E}), nullptr);
  EXPECT_EQ(st.code(), Code::kUnsupported) << st.message();
  EXPECT_NE(st.message().find("capacity"), std::string::npos) << st.message();
}

TEST(SimtGating, AuxLossesMatchCpu) {
  for (int64_t T : {0, 1, 7, 300}) {
    for (int64_t E : {1, 5, 64}) {
      SCOPED_TRACE("T=" + std::to_string(T) + " E=" + std::to_string(E));
      const int64_t K = std::min<int64_t>(2, E);
      std::vector<float> logits = uniform<float>(T * E, uint32_t(T + E), -3.f, 3.f);
      std::vector<float> probs(T * E);
      for (int64_t t = 0; t < T; ++t) {  // softmax rows
        float sum = 0;
        for (int64_t e = 0; e < E; ++e) sum += (probs[t * E + e] = std::exp(logits[t * E + e]));
        for (int64_t e = 0; e < E; ++e) probs[t * E + e] /= sum;
      }
      std::vector<int32_t> experts(T * K);
      for (int64_t i = 0; i < T * K; ++i) experts[i] = int32_t((i * 7 + i / 3) % E);  // skewed, some empty
      const TensorView pv = make_view(probs.data(), {T, E}), ev = make_view(experts.data(), {T, K});
      const TensorView lv = make_view(logits.data(), {T, E});
      float g = 0.75f;
      const TensorView gv = make_view(&g, {1});

      float lb_cpu = 0, lb = 0, z_cpu = 0, z = 0;
      ASSERT_TRUE(cpu::load_balancing_loss_forward(pv, ev, make_view(&lb_cpu, {1})).ok());
      ASSERT_TRUE(cpu::z_loss_forward(lv, make_view(&z_cpu, {1})).ok());
      std::vector<float> gp_cpu(T * E), gp(T * E), gz_cpu(T * E), gz(T * E);
      ASSERT_TRUE(cpu::load_balancing_loss_backward(pv, ev, gv, make_view(gp_cpu.data(), {T, E})).ok());
      ASSERT_TRUE(cpu::z_loss_backward(lv, gv, make_view(gz_cpu.data(), {T, E})).ok());
      // The scratch comes from the caller, exactly the queried bytes (poisoned: the kernels must
      // initialise what they read).
      std::vector<uint8_t> lb_ws(size_t(load_balancing_loss_workspace_bytes(T, E)));
      std::vector<uint8_t> z_ws(size_t(z_loss_workspace_bytes(T, E)));
      const TensorView lbw = lb_ws.empty() ? TensorView{} : make_view(lb_ws.data(), {int64_t(lb_ws.size())});
      const TensorView zw = z_ws.empty() ? TensorView{} : make_view(z_ws.data(), {int64_t(z_ws.size())});
      run_all_schedules([&] {
        std::memset(&lb, kPoison, 4), std::memset(&z, kPoison, 4), poison(gp), poison(gz);
        poison(lb_ws), poison(z_ws);
        EXPECT_OK(sim::load_balancing_loss_forward(pv, ev, make_view(&lb, {1}), lbw, nullptr));
        EXPECT_OK(sim::z_loss_forward(lv, make_view(&z, {1}), zw, nullptr));
        poison(lb_ws), poison(z_ws);
        EXPECT_OK(sim::load_balancing_loss_backward(pv, ev, gv, make_view(gp.data(), {T, E}), lbw, nullptr));
        EXPECT_OK(sim::z_loss_backward(lv, gv, make_view(gz.data(), {T, E}), zw, nullptr));
        std::vector<unsigned char> out;
        append_bytes(out, std::vector<float>{lb, z}), append_bytes(out, gp), append_bytes(out, gz);
        return out;
      });
      EXPECT_TRUE(all_close(std::vector<float>{lb, z}, std::vector<float>{lb_cpu, z_cpu}, DType::kF32));
      EXPECT_TRUE(all_close(gp, gp_cpu, DType::kF32));
      EXPECT_TRUE(all_close(gz, gz_cpu, DType::kF32));
    }
  }
}

TEST(SimtGating, RouterLossWorkspaceFormulaAndShortWorkspace) {
  // SPEC.md B: lb = align256(4E) + 4E * nb, nb = ceil(T / chunk), chunk = 256 (T <= 65536) else ceil(T / 256).
  EXPECT_EQ(load_balancing_loss_workspace_bytes(0, 8), 0);
  EXPECT_EQ(load_balancing_loss_workspace_bytes(8, 0), 0);
  EXPECT_EQ(load_balancing_loss_workspace_bytes(1, 8), 256 + 32);
  EXPECT_EQ(load_balancing_loss_workspace_bytes(257, 65), 512 + 4 * 65 * 2);
  EXPECT_EQ(load_balancing_loss_workspace_bytes(65536, 1), 256 + 4 * 256);
  EXPECT_EQ(load_balancing_loss_workspace_bytes(65537, 1), 256 + 4 * 256);  // chunk 257: 256 chunks
  EXPECT_EQ(z_loss_workspace_bytes(300, 5), 2400);
  EXPECT_EQ(z_loss_workspace_bytes(300, 0), 0);
  const int64_t T = 5, E = 3, K = 1;
  std::vector<float> probs(T * E, 1.0f / 3), grad(T * E);
  std::vector<int32_t> experts(T * K, 1);
  std::vector<uint8_t> ws(size_t(load_balancing_loss_workspace_bytes(T, E) - 1));
  float loss = 0, g = 1;
  const Status st =
      sim::load_balancing_loss_forward(make_view(probs.data(), {T, E}), make_view(experts.data(), {T, K}),
                                       make_view(&loss, {1}), make_view(ws.data(), {int64_t(ws.size())}), nullptr);
  EXPECT_EQ(st.code(), Code::kInvalidArgument) << st.message();
  EXPECT_NE(st.message().find("workspace"), std::string::npos) << st.message();
  const Status zst = sim::z_loss_forward(make_view(probs.data(), {T, E}), make_view(&loss, {1}), TensorView{}, nullptr);
  EXPECT_EQ(zst.code(), Code::kInvalidArgument) << zst.message();
  const Status bst =
      sim::load_balancing_loss_backward(make_view(probs.data(), {T, E}), make_view(experts.data(), {T, K}),
                                        make_view(&g, {1}), make_view(grad.data(), {T, E}), TensorView{}, nullptr);
  EXPECT_EQ(bst.code(), Code::kInvalidArgument) << bst.message();
}

// T > 65536: the column sums switch to ceil(T / 256)-token chunks (the workspace formula's other branch).
TEST(SimtGating, LoadBalancingLossLargeTMatchesCpu) {
  const int64_t T = 65537 + 300, E = 3, K = 1;
  std::vector<float> probs = uniform<float>(T * E, 21, 0.0f, 1.0f);
  std::vector<int32_t> experts(T * K);
  for (int64_t t = 0; t < T; ++t) experts[t] = int32_t((t * 5 + t / 7) % E);
  const TensorView pv = make_view(probs.data(), {T, E}), ev = make_view(experts.data(), {T, K});
  float lb_cpu = 0, lb = 0;
  ASSERT_TRUE(cpu::load_balancing_loss_forward(pv, ev, make_view(&lb_cpu, {1})).ok());
  std::vector<uint8_t> ws(size_t(load_balancing_loss_workspace_bytes(T, E)));
  poison(ws);
  EXPECT_OK(sim::load_balancing_loss_forward(pv, ev, make_view(&lb, {1}), make_view(ws.data(), {int64_t(ws.size())}),
                                             nullptr));
  EXPECT_TRUE(all_close(std::vector<float>{lb}, std::vector<float>{lb_cpu}, DType::kF32));
}

TEST(SimtGating, BalancingBiasUpdateIsExact) {
  for (int64_t E : {1, 7, 300}) {
    std::vector<int32_t> counts(E);
    for (int64_t e = 0; e < E; ++e) counts[e] = int32_t((e * 37) % 11);
    std::vector<float> b_cpu = uniform<float>(E, 4), b = b_cpu;
    ASSERT_TRUE(cpu::balancing_bias_update(make_view(counts.data(), {E}), make_view(b_cpu.data(), {E}), 0.01f).ok());
    const std::vector<float> b0 = b;
    run_all_schedules([&] {
      b = b0;
      EXPECT_OK(sim::balancing_bias_update(make_view(counts.data(), {E}), make_view(b.data(), {E}), 0.01f, nullptr));
      std::vector<unsigned char> out;
      append_bytes(out, b);
      return out;
    });
    EXPECT_TRUE(bitwise_equal(b, b_cpu)) << "E=" << E;
  }
}

}  // namespace
}  // namespace smoe::testing

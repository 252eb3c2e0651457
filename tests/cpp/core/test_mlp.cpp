// Tests of expert_mlp_forward/backward and shared_expert_forward/backward against naive references
// (plain loops, double arithmetic, intermediates rounded to the storage type like the kernels store
// them), f64 central finite differences, and bad inputs.
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "cpu/parallel.h"
#include "testing.h"

namespace smoe {
namespace {

using testing::all_close;
using testing::bitwise_equal;
using testing::tolerance_for;
using testing::uniform;

// A routing plan written out by hand: token t's k-th choice is expert (t * 3 + k * 5 + t / 4) % E
// (distinct for K <= E when E is prime or large), rows sorted stably by expert. With `drop_last`,
// the last expert's rows are placed past offsets[E] (dropped): token_of_row = -1, row_of = -1.
struct Plan {
  int64_t T, K, E, R;
  std::vector<int32_t> token_of_row, row_of;
  std::vector<int64_t> offsets, expert_of_row;
};

Plan make_plan(int64_t T, int64_t K, int64_t E, bool drop_last = false, bool one_expert = false) {
  Plan p{T, K, E, T * K, {}, std::vector<int32_t>(size_t(T * K), -1), std::vector<int64_t>(size_t(E + 1), 0), {}};
  std::vector<int64_t> choice(size_t(T * K));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      int64_t e = one_expert ? E / 2 : (t * 3 + k * 5 + t / 4) % E;
      for (int64_t j = 0; j < k && !one_expert; ++j)
        if (choice[t * K + j] == e) e = (e + 1) % E;  // keep a token's experts distinct
      choice[t * K + k] = e;
    }
  const int64_t live_experts = drop_last ? E - 1 : E;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = 0; i < T * K; ++i) {
      if (choice[i] != e) continue;
      const bool dropped = e >= live_experts;
      p.token_of_row.push_back(dropped ? -1 : int32_t(i / K));
      p.expert_of_row.push_back(dropped ? -1 : e);
      if (!dropped) p.row_of[i] = int32_t(p.token_of_row.size() - 1);
    }
    if (e < live_experts) p.offsets[e + 1] = int64_t(p.token_of_row.size());
  }
  for (int64_t e = live_experts; e < E; ++e) p.offsets[e + 1] = p.offsets[live_experts];
  return p;
}

template <class T>
T rnd(double v) {
  return from_acc<T>(typename AccOf<T>::type(v));
}
template <class T>
double val(T v) {
  return double(to_acc(v));
}

// Forward of one row through expert weights w1e [F1, H], w2e [H, F], rounding pre and act to T.
template <class T>
void naive_row(Activation a, const T* xr, const T* w1e, const T* w2e, int64_t H, int64_t F, T* pre, T* act, T* y) {
  const int64_t F1 = is_gated(a) ? 2 * F : F;
  for (int64_t j = 0; j < F1; ++j) {
    double s = 0;
    for (int64_t h = 0; h < H; ++h) s += val(xr[h]) * val(w1e[j * H + h]);
    pre[j] = rnd<T>(s);
  }
  for (int64_t j = 0; j < F; ++j)
    act[j] = rnd<T>(testing::reference_act(a, val(pre[j]), is_gated(a) ? val(pre[F + j]) : 1.0));
  for (int64_t h = 0; h < H; ++h) {
    double s = 0;
    for (int64_t j = 0; j < F; ++j) s += val(act[j]) * val(w2e[h * F + j]);
    y[h] = rnd<T>(s);
  }
}

template <class T>
std::vector<T> nans(size_t n) {
  return std::vector<T>(n, rnd<T>(std::numeric_limits<double>::quiet_NaN()));
}

// Everything an expert-MLP call needs, with outputs prefilled with NaN.
template <class T>
struct MlpCase {
  Plan plan;
  Activation a;
  int64_t H, F, F1;
  std::vector<T> x, w1, w2, xs, pre, act, ys;
  MlpCase(Plan p, Activation act_, int64_t H_, int64_t F_, uint32_t seed)
      : plan(std::move(p)), a(act_), H(H_), F(F_), F1(is_gated(act_) ? 2 * F_ : F_) {
    x = uniform<T>(size_t(plan.T * H), seed, -1.f, 1.f);
    w1 = uniform<T>(size_t(plan.E * F1 * H), seed + 1, -0.7f, 0.7f);
    w2 = uniform<T>(size_t(plan.E * H * F), seed + 2, -0.7f, 0.7f);
    // The test's own x[token_of_row] (zeros for padding rows), for the naive backward: the op keeps no
    // permuted copy of x (it reads x through token_of_row in both directions).
    xs.assign(size_t(plan.R * H), rnd<T>(0.0));
    for (int64_t r = 0; r < plan.R; ++r) {
      const int64_t t = plan.token_of_row[r];
      if (t >= 0) std::copy(x.begin() + t * H, x.begin() + (t + 1) * H, xs.begin() + r * H);
    }
    pre = nans<T>(size_t(plan.R * F1));
    act = nans<T>(size_t(plan.R * F));
    ys = nans<T>(size_t(plan.R * H));
  }
  Status forward() {
    ExpertMlpParams p;
    p.activation = a;
    const int64_t T_ = plan.T, R = plan.R, E = plan.E;
    return expert_mlp_forward(Exec{}, p, make_view(x.data(), {T_, H}), make_view(plan.token_of_row.data(), {R}),
                              make_view(plan.offsets.data(), {E + 1}), make_view(w1.data(), {E, F1, H}),
                              make_view(w2.data(), {E, H, F}), make_view(pre.data(), {R, F1}),
                              make_view(act.data(), {R, F}), make_view(ys.data(), {R, H}));
  }
  // grad_x, grad_w1, grad_w2 for grad_ys = g.
  Status backward(const std::vector<T>& g, std::vector<T>& gx, std::vector<T>& gw1, std::vector<T>& gw2) {
    ExpertMlpParams p;
    p.activation = a;
    const int64_t T_ = plan.T, R = plan.R, E = plan.E;
    gx = nans<T>(size_t(T_ * H));
    gw1 = nans<T>(size_t(E * F1 * H));
    gw2 = nans<T>(size_t(E * H * F));
    std::vector<uint8_t> ws(size_t(expert_mlp_workspace_bytes(p, DTypeOf<T>::value, R, H, F)), 0xff);
    return expert_mlp_backward(Exec{}, p, make_view(const_cast<T*>(g.data()), {R, H}), make_view(x.data(), {T_, H}),
                               make_view(plan.token_of_row.data(), {R}), make_view(plan.row_of.data(), {T_, plan.K}),
                               make_view(plan.offsets.data(), {E + 1}), make_view(w1.data(), {E, F1, H}),
                               make_view(w2.data(), {E, H, F}), make_view(pre.data(), {R, F1}),
                               make_view(act.data(), {R, F}), make_view(gx.data(), {T_, H}),
                               make_view(gw1.data(), {E, F1, H}), make_view(gw2.data(), {E, H, F}),
                               make_view(ws.data(), {int64_t(ws.size())}));
  }
};

template <class T>
class MlpTyped : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, double, bf16_t, f16_t>;
TYPED_TEST_SUITE(MlpTyped, FloatTypes);

TYPED_TEST(MlpTyped, ExpertMlpForwardMatchesNaive) {
  using T = TypeParam;
  const DType dt = DTypeOf<T>::value;
  struct Shape {
    int64_t T, K, E;
    bool drop_last, one_expert;
  };
  const Shape shapes[] = {{0, 2, 3, false, false}, {1, 1, 1, false, false},    {7, 2, 7, false, false},
                          {7, 3, 7, true, false},  {4097, 2, 7, false, false}, {50, 2, 300, false, false},
                          {33, 1, 5, false, true}};
  for (const Shape& s : shapes) {
    for (Activation a : {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGELU, Activation::kReLU}) {
      if (s.T == 4097 && a != Activation::kSwiGLU) continue;  // the big case once is enough
      SCOPED_TRACE("T=" + std::to_string(s.T) + " K=" + std::to_string(s.K) + " E=" + std::to_string(s.E) +
                   " act=" + std::to_string(int(a)) + (s.drop_last ? " drop" : "") + (s.one_expert ? " one" : ""));
      MlpCase<T> c(make_plan(s.T, s.K, s.E, s.drop_last, s.one_expert), a, 6, 5, 21);
      ASSERT_TRUE(c.forward().ok());
      const int64_t R = c.plan.R, H = c.H, F = c.F, F1 = c.F1;
      std::vector<T> pre(size_t(R * F1)), act(size_t(R * F)), ys(size_t(R * H));
      for (int64_t r = 0; r < R; ++r) {
        const int64_t e = c.plan.expert_of_row[r];
        if (e < 0) continue;  // dropped rows: all zeros
        const T* xr = c.x.data() + c.plan.token_of_row[r] * H;
        naive_row<T>(a, xr, c.w1.data() + e * F1 * H, c.w2.data() + e * H * F, H, F, pre.data() + r * F1,
                     act.data() + r * F, ys.data() + r * H);
      }
      EXPECT_TRUE(all_close(c.pre, pre, dt));
      EXPECT_TRUE(all_close(c.act, act, dt));
      EXPECT_TRUE(all_close(c.ys, ys, dt));
    }
  }
}

// Naive backward, from the saved tensors of the kernel's forward (so bf16 rounding of pre/act matches):
// per row r of expert e, with g = grad_ys[r]:
//   grad_act = w2e^T g; grad_pre = act'(pre) * grad_act; grad_x[t] += w1e^T grad_pre;
//   grad_w2e += g act^T; grad_w1e += grad_pre xs^T.
template <class T>
void naive_backward(const MlpCase<T>& c, const std::vector<T>& g, std::vector<T>& gx, std::vector<T>& gw1,
                    std::vector<T>& gw2) {
  const int64_t R = c.plan.R, H = c.H, F = c.F, F1 = c.F1, E = c.plan.E;
  std::vector<double> dx(size_t(c.plan.T * H), 0.0), dw1(size_t(E * F1 * H), 0.0), dw2(size_t(E * H * F), 0.0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t e = c.plan.expert_of_row[r];
    if (e < 0) continue;
    const T* w1e = c.w1.data() + e * F1 * H;
    const T* w2e = c.w2.data() + e * H * F;
    std::vector<double> gpre(static_cast<size_t>(F1), 0.0);
    for (int64_t j = 0; j < F; ++j) {
      double ga = 0;
      for (int64_t h = 0; h < H; ++h) ga += val(w2e[h * F + j]) * val(g[r * H + h]);
      ga = val(rnd<T>(ga));  // the kernel stores grad_act in T
      const double x = val(c.pre[r * F1 + j]);
      const double u = is_gated(c.a) ? val(c.pre[r * F1 + F + j]) : 1.0;
      double dg = 0, du = 0;
      testing::reference_act_grad(c.a, x, u, &dg, &du);
      gpre[j] = val(rnd<T>(ga * dg));
      if (is_gated(c.a)) gpre[F + j] = val(rnd<T>(ga * du));
    }
    const int64_t t = c.plan.token_of_row[r];
    for (int64_t h = 0; h < H; ++h) {
      double s = 0;
      for (int64_t j = 0; j < F1; ++j) s += val(w1e[j * H + h]) * gpre[j];
      dx[t * H + h] += val(rnd<T>(s));  // grad_xs is stored in T, then summed over k
    }
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < F; ++j) dw2[(e * H + h) * F + j] += val(g[r * H + h]) * val(c.act[r * F + j]);
    for (int64_t j = 0; j < F1; ++j)
      for (int64_t h = 0; h < H; ++h) dw1[(e * F1 + j) * H + h] += gpre[j] * val(c.xs[r * H + h]);
  }
  gx.resize(dx.size());
  gw1.resize(dw1.size());
  gw2.resize(dw2.size());
  for (size_t i = 0; i < dx.size(); ++i) gx[i] = rnd<T>(dx[i]);
  for (size_t i = 0; i < dw1.size(); ++i) gw1[i] = rnd<T>(dw1[i]);
  for (size_t i = 0; i < dw2.size(); ++i) gw2[i] = rnd<T>(dw2[i]);
}

TYPED_TEST(MlpTyped, ExpertMlpBackwardMatchesNaive) {
  using T = TypeParam;
  const DType dt = DTypeOf<T>::value;
  struct Shape {
    int64_t T, K, E;
    bool drop_last;
  };
  for (const Shape& s : {Shape{0, 2, 3, false}, Shape{1, 1, 1, false}, Shape{7, 2, 7, true}, Shape{4097, 2, 7, false},
                         Shape{50, 2, 300, false}}) {
    for (Activation a : {Activation::kSwiGLU, Activation::kGELU}) {
      SCOPED_TRACE("T=" + std::to_string(s.T) + " E=" + std::to_string(s.E) + " act=" + std::to_string(int(a)));
      MlpCase<T> c(make_plan(s.T, s.K, s.E, s.drop_last), a, 5, 4, 31);
      ASSERT_TRUE(c.forward().ok());
      auto g = uniform<T>(size_t(c.plan.R * c.H), 32);
      std::vector<T> gx, gw1, gw2, wx, ww1, ww2;
      Status st = c.backward(g, gx, gw1, gw2);
      ASSERT_TRUE(st.ok()) << st.message();
      naive_backward(c, g, wx, ww1, ww2);
      EXPECT_TRUE(all_close(gx, wx, dt));
      EXPECT_TRUE(all_close(gw1, ww1, dt));
      EXPECT_TRUE(all_close(gw2, ww2, dt));
      // Experts without rows: exact zeros, although the outputs were NaN before.
      for (int64_t e = 0; e < s.E; ++e) {
        if (c.plan.offsets[e + 1] != c.plan.offsets[e]) continue;
        for (int64_t i = 0; i < c.F1 * c.H; ++i) ASSERT_EQ(val(gw1[e * c.F1 * c.H + i]), 0.0) << "expert " << e;
        for (int64_t i = 0; i < c.H * c.F; ++i) ASSERT_EQ(val(gw2[e * c.H * c.F + i]), 0.0) << "expert " << e;
      }
    }
  }
}

// f64 central differences of L = sum(ys * G) w.r.t. x, w1 and w2.
TEST(ExpertMlp, GradientMatchesFiniteDifferencesF64) {
  for (Activation a : {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGELU}) {
    MlpCase<double> c(make_plan(5, 2, 3), a, 4, 3, 41);
    ASSERT_TRUE(c.forward().ok());
    auto g = uniform<double>(size_t(c.plan.R * c.H), 42);
    std::vector<double> gx, gw1, gw2;
    ASSERT_TRUE(c.backward(g, gx, gw1, gw2).ok());
    auto loss = [&]() {
      EXPECT_TRUE(c.forward().ok());
      double l = 0;
      for (size_t i = 0; i < g.size(); ++i) l += c.ys[i] * g[i];
      return l;
    };
    auto check = [&](std::vector<double>& param, const std::vector<double>& grad, const char* name) {
      const double h = 1e-6;
      for (size_t i = 0; i < param.size(); ++i) {
        const double keep = param[i];
        param[i] = keep + h;
        const double lp = loss();
        param[i] = keep - h;
        const double lm = loss();
        param[i] = keep;
        EXPECT_NEAR(grad[i], (lp - lm) / (2 * h), 1e-6) << name << "[" << i << "] act " << int(a);
      }
    };
    check(c.x, gx, "x");
    check(c.w1, gw1, "w1");
    check(c.w2, gw2, "w2");
  }
}

TEST(ExpertMlp, BackwardBitwiseIdenticalAcrossThreadCounts) {
  MlpCase<float> c(make_plan(600, 2, 7), Activation::kSwiGLU, 64, 48, 51);
  ASSERT_TRUE(c.forward().ok());
  auto g = uniform<float>(size_t(c.plan.R * c.H), 52);
  auto run = [&](int threads) {
    cpu::parallel_for_impl(1, 1, [](int64_t, int64_t) {});  // see set_threads in test_gemm.cpp
    cpu::set_num_threads(threads);
    std::vector<float> gx, gw1, gw2;
    EXPECT_TRUE(c.forward().ok());
    EXPECT_TRUE(c.backward(g, gx, gw1, gw2).ok());
    gx.insert(gx.end(), gw1.begin(), gw1.end());
    gx.insert(gx.end(), gw2.begin(), gw2.end());
    gx.insert(gx.end(), c.ys.begin(), c.ys.end());
    return gx;
  };
  const int saved = cpu::num_threads();
  const auto a = run(2), b = run(2), one = run(1);
  run(saved);
  EXPECT_TRUE(bitwise_equal(a, b));
  EXPECT_TRUE(bitwise_equal(a, one));
}

// ---- shared experts ------------------------------------------------------------------------------

template <class T>
struct SharedCase {
  Activation a;
  int64_t T_, H, F, F1;
  bool gated;
  std::vector<T> x, w1, w2, gw, pre, act, out, y;
  std::vector<typename AccOf<T>::type> gate;
  SharedCase(Activation act_, int64_t T0, int64_t H_, int64_t F_, bool gated_, uint32_t seed)
      : a(act_), T_(T0), H(H_), F(F_), F1(is_gated(act_) ? 2 * F_ : F_), gated(gated_) {
    x = uniform<T>(size_t(T_ * H), seed);
    w1 = uniform<T>(size_t(F1 * H), seed + 1, -0.7f, 0.7f);
    w2 = uniform<T>(size_t(H * F), seed + 2, -0.7f, 0.7f);
    gw = uniform<T>(size_t(H), seed + 3);
    y = uniform<T>(size_t(T_ * H), seed + 4);  // accumulated into
    pre = nans<T>(size_t(T_ * F1));
    act = nans<T>(size_t(T_ * F));
    out = nans<T>(size_t(T_ * H));
    gate.assign(size_t(T_), std::numeric_limits<typename AccOf<T>::type>::quiet_NaN());
  }
  ExpertMlpParams params() const {
    ExpertMlpParams p;
    p.activation = a;
    return p;
  }
  TensorView gate_w() { return gated ? make_view(gw.data(), {H}) : TensorView{}; }
  Status forward() {
    return shared_expert_forward(Exec{}, params(), make_view(x.data(), {T_, H}), make_view(w1.data(), {F1, H}),
                                 make_view(w2.data(), {H, F}), gate_w(), make_view(pre.data(), {T_, F1}),
                                 make_view(act.data(), {T_, F}), make_view(out.data(), {T_, H}),
                                 make_view(gate.data(), {T_}), make_view(y.data(), {T_, H}));
  }
  Status backward(const std::vector<T>& gy, std::vector<T>& gx, std::vector<T>& gw1, std::vector<T>& gw2,
                  std::vector<T>& ggw) {
    gw1 = nans<T>(size_t(F1 * H));
    gw2 = nans<T>(size_t(H * F));
    ggw = nans<T>(size_t(H));
    std::vector<uint8_t> ws(size_t(shared_expert_workspace_bytes(params(), DTypeOf<T>::value, T_, H, F)), 0xff);
    return shared_expert_backward(
        Exec{}, params(), make_view(const_cast<T*>(gy.data()), {T_, H}), make_view(x.data(), {T_, H}),
        make_view(w1.data(), {F1, H}), make_view(w2.data(), {H, F}), gate_w(), make_view(pre.data(), {T_, F1}),
        make_view(act.data(), {T_, F}), make_view(out.data(), {T_, H}), make_view(gate.data(), {T_}),
        make_view(gx.data(), {T_, H}), make_view(gw1.data(), {F1, H}), make_view(gw2.data(), {H, F}),
        gated ? make_view(ggw.data(), {H}) : TensorView{}, make_view(ws.data(), {int64_t(ws.size())}));
  }
};

TYPED_TEST(MlpTyped, SharedExpertForwardMatchesNaive) {
  using T = TypeParam;
  const DType dt = DTypeOf<T>::value;
  for (int64_t T_ : {0, 1, 7, 4097}) {
    for (bool gated : {false, true}) {
      SCOPED_TRACE("T=" + std::to_string(T_) + " gated=" + std::to_string(gated));
      SharedCase<T> c(Activation::kSwiGLU, T_, 6, 5, gated, 61);
      const auto y0 = c.y;
      ASSERT_TRUE(c.forward().ok());
      std::vector<T> want(y0.size()), pre(size_t(T_ * c.F1)), act(size_t(T_ * c.F)), out(size_t(T_ * c.H));
      for (int64_t t = 0; t < T_; ++t) {
        naive_row<T>(c.a, c.x.data() + t * c.H, c.w1.data(), c.w2.data(), c.H, c.F, pre.data() + t * c.F1,
                     act.data() + t * c.F, out.data() + t * c.H);
        double z = 0;
        for (int64_t h = 0; h < c.H; ++h) z += val(c.x[t * c.H + h]) * val(c.gw[h]);
        const double gate = gated ? 1 / (1 + std::exp(-z)) : 1.0;
        EXPECT_NEAR(double(c.gate[t]), gate, tolerance_for(dt == DType::kF64 ? dt : DType::kF32).atol * 10);
        for (int64_t h = 0; h < c.H; ++h)
          want[t * c.H + h] = rnd<T>(val(y0[t * c.H + h]) + gate * val(out[t * c.H + h]));
      }
      EXPECT_TRUE(all_close(c.out, out, dt));
      EXPECT_TRUE(all_close(c.y, want, dt));
    }
  }
}

// f64 central differences of L = sum(y * G) (y accumulated into from a fixed start) w.r.t. x, w1, w2
// and gate_w; grad_x is accumulated into a non-zero start.
TEST(SharedExpert, GradientMatchesFiniteDifferencesF64) {
  for (bool gated : {false, true}) {
    for (Activation a : {Activation::kSwiGLU, Activation::kReLU}) {
      SharedCase<double> c(a, 5, 4, 3, gated, 71);
      const auto y0 = c.y;
      ASSERT_TRUE(c.forward().ok());
      auto gy = uniform<double>(size_t(c.T_ * c.H), 72);
      auto gx0 = uniform<double>(size_t(c.T_ * c.H), 73);
      auto gx = gx0;
      std::vector<double> gw1, gw2, ggw;
      Status st = c.backward(gy, gx, gw1, gw2, ggw);
      ASSERT_TRUE(st.ok()) << st.message();
      auto loss = [&]() {
        c.y = y0;
        EXPECT_TRUE(c.forward().ok());
        double l = 0;
        for (size_t i = 0; i < gy.size(); ++i) l += c.y[i] * gy[i];
        return l;
      };
      auto check = [&](std::vector<double>& param, const std::vector<double>& grad, const std::vector<double>* base,
                       const char* name) {
        const double h = 1e-6;
        for (size_t i = 0; i < param.size(); ++i) {
          const double keep = param[i];
          param[i] = keep + h;
          const double lp = loss();
          param[i] = keep - h;
          const double lm = loss();
          param[i] = keep;
          const double got = grad[i] - (base ? (*base)[i] : 0.0);
          EXPECT_NEAR(got, (lp - lm) / (2 * h), 1e-6) << name << "[" << i << "] gated " << gated;
        }
      };
      check(c.x, gx, &gx0, "x");
      check(c.w1, gw1, nullptr, "w1");
      check(c.w2, gw2, nullptr, "w2");
      if (gated) check(c.gw, ggw, nullptr, "gate_w");
    }
  }
}

TYPED_TEST(MlpTyped, SharedExpertBackwardEmptyBatchGivesZeroGradients) {
  using T = TypeParam;
  SharedCase<T> c(Activation::kSwiGLU, 0, 6, 5, true, 81);
  std::vector<T> gy, gx, gw1, gw2, ggw;
  ASSERT_TRUE(c.backward(gy, gx, gw1, gw2, ggw).ok());
  for (const auto* v : {&gw1, &gw2, &ggw})
    for (T e : *v) ASSERT_EQ(val(e), 0.0);
}

// ---- bad inputs ----------------------------------------------------------------------------------

void expect_invalid(const Status& s, const std::string& needle) {
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.message();
  EXPECT_NE(s.message().find(needle), std::string::npos) << "message: " << s.message() << "\nwanted: " << needle;
}

TEST(MlpErrors, RejectBadArguments) {
  MlpCase<float> c(make_plan(7, 2, 3), Activation::kSwiGLU, 4, 3, 91);
  ASSERT_TRUE(c.forward().ok());
  const int64_t T_ = 7, R = 14, E = 3, H = 4, F = 3;
  ExpertMlpParams p;
  auto X = make_view(c.x.data(), {T_, H});
  auto TOR = make_view(c.plan.token_of_row.data(), {R});
  auto O = make_view(c.plan.offsets.data(), {E + 1});
  auto W1 = make_view(c.w1.data(), {E, 2 * F, H});
  auto W2 = make_view(c.w2.data(), {E, H, F});
  auto PRE = make_view(c.pre.data(), {R, 2 * F});
  auto ACT = make_view(c.act.data(), {R, F});
  auto YS = make_view(c.ys.data(), {R, H});
  const Exec ex;
  expect_invalid(expert_mlp_forward(ex, p, X, TOR, O, make_view(c.w1.data(), {E, F, H}), W2, PRE, ACT, YS),
                 "argument 'w1': expected size(1) == 6");
  std::vector<double> wd(c.w2.size());
  expect_invalid(expert_mlp_forward(ex, p, X, TOR, O, W1, make_view(wd.data(), {E, H, F}), PRE, ACT, YS),
                 "argument 'w2': expected dtype f32");
  expect_invalid(expert_mlp_forward(ex, p, X, TOR, O, W1, W2, PRE, ACT, make_view(c.ys.data(), {R, H - 1})),
                 "argument 'ys': expected size(1) == 4");
  expect_invalid(expert_mlp_forward(ex, p, X, make_view(c.plan.offsets.data(), {E + 1}), O, W1, W2, PRE, ACT, YS),
                 "argument 'token_of_row': expected dtype i32");
  ExpertMlpParams bad;
  bad.activation = static_cast<Activation>(7);
  expect_invalid(expert_mlp_forward(ex, bad, X, TOR, O, W1, W2, PRE, ACT, YS), "argument 'params.activation'");

  std::vector<float> g(size_t(R * H)), gx(size_t(T_ * H)), gw1(c.w1.size()), gw2(c.w2.size());
  std::vector<uint8_t> small(16);
  expect_invalid(
      expert_mlp_backward(ex, p, make_view(g.data(), {R, H}), X, TOR, make_view(c.plan.row_of.data(), {T_, 2}), O, W1,
                          W2, PRE, ACT, make_view(gx.data(), {T_, H}), make_view(gw1.data(), {E, 2 * F, H}),
                          make_view(gw2.data(), {E, H, F}), make_view(small.data(), {16})),
      "argument 'workspace': expected at least");
  expect_invalid(
      expert_mlp_backward(ex, p, make_view(g.data(), {R, H}), X, TOR, make_view(c.plan.row_of.data(), {T_, 2}), O, W1,
                          W2, PRE, ACT, make_view(gx.data(), {T_ - 1, H}), make_view(gw1.data(), {E, 2 * F, H}),
                          make_view(gw2.data(), {E, H, F}), make_view(small.data(), {16})),
      "argument 'grad_x': expected size(0) == 7");

  SharedCase<float> s(Activation::kSwiGLU, 5, 4, 3, true, 92);
  std::vector<double> gate64(5);
  expect_invalid(shared_expert_forward(ex, p, make_view(s.x.data(), {5, 4}), make_view(s.w1.data(), {6, 4}),
                                       make_view(s.w2.data(), {4, 3}), make_view(s.gw.data(), {4}),
                                       make_view(s.pre.data(), {5, 6}), make_view(s.act.data(), {5, 3}),
                                       make_view(s.out.data(), {5, 4}), make_view(gate64.data(), {5}),
                                       make_view(s.y.data(), {5, 4})),
                 "argument 'gate': expected dtype f32");
  expect_invalid(shared_expert_forward(ex, p, make_view(s.x.data(), {5, 4}), make_view(s.w1.data(), {6, 4}),
                                       make_view(s.w2.data(), {4, 3}), make_view(s.gw.data(), {3}),
                                       make_view(s.pre.data(), {5, 6}), make_view(s.act.data(), {5, 3}),
                                       make_view(s.out.data(), {5, 4}), make_view(s.gate.data(), {5}),
                                       make_view(s.y.data(), {5, 4})),
                 "argument 'gate_w': expected size(0) == 4");
  expect_invalid(shared_expert_forward(ex, p, make_view(s.x.data(), {5, 4}), make_view(s.w1.data(), {6, 4}),
                                       make_view(s.w2.data(), {4, 3}), TensorView{}, make_view(s.pre.data(), {5, 6}),
                                       make_view(s.act.data(), {5, 3}), make_view(s.out.data(), {5, 4}),
                                       make_view(s.gate.data(), {4}), make_view(s.y.data(), {5, 4})),
                 "argument 'gate': expected size(0) == 5");
}

// ---- top-1 forward with the combine in the second GEMM's epilogue ---------------------------------

// y of expert_mlp_combine_top1_forward vs the unfused expert_mlp_forward + combine_forward (K = 1), both
// through the public API; y is prefilled with NaN so every element must be written.
template <class T>
void expect_top1_matches_unfused(const Plan& plan, Activation a, uint32_t seed) {
  const DType dt = DTypeOf<T>::value;
  MlpCase<T> c(plan, a, 6, 5, seed);
  ASSERT_TRUE(c.forward().ok());
  const int64_t T_ = plan.T, R = plan.R, E = plan.E, H = c.H, F = c.F, F1 = c.F1;
  using W = typename AccOf<T>::type;
  std::vector<W> w(static_cast<size_t>(T_));
  for (int64_t t = 0; t < T_; ++t) w[t] = W(0.25 + 0.5 * double(t % 5) / 4.0);
  std::vector<T> y_ref = nans<T>(size_t(T_ * H)), y = nans<T>(size_t(T_ * H));
  std::vector<int32_t> row_of(static_cast<size_t>(T_), -1);
  for (int64_t r = plan.offsets[0]; r < plan.offsets[E]; ++r)
    if (plan.token_of_row[r] >= 0) row_of[plan.token_of_row[r]] = int32_t(r);
  ASSERT_TRUE(combine_forward(Exec{}, make_view(c.ys.data(), {R, H}), make_view(w.data(), {T_, 1}),
                              make_view(row_of.data(), {T_, 1}), make_view(y_ref.data(), {T_, H}))
                  .ok());
  ExpertMlpParams p;
  p.activation = a;
  std::vector<uint8_t> ws(size_t(expert_mlp_combine_top1_workspace_bytes(p, dt, R, H, F)), 0xff);
  const Status st = expert_mlp_combine_top1_forward(
      Exec{}, p, make_view(c.x.data(), {T_, H}), make_view(const_cast<int32_t*>(plan.token_of_row.data()), {R}),
      make_view(const_cast<int64_t*>(plan.offsets.data()), {E + 1}), make_view(c.w1.data(), {E, F1, H}),
      make_view(c.w2.data(), {E, H, F}), make_view(w.data(), {T_, 1}), make_view(y.data(), {T_, H}),
      make_view(ws.data(), {int64_t(ws.size())}));
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_TRUE(all_close(y, y_ref, dt));
  for (int64_t t = 0; t < T_; ++t)
    if (row_of[t] < 0)
      for (int64_t h = 0; h < H; ++h) ASSERT_EQ(val(y[t * H + h]), 0.0) << "token " << t << " has no row";
}

// A plan with padding rows inside the segments (token -1) and a token no row names (dropped).
Plan padded_plan() {
  Plan p{4, 1, 2, 6, {0, -1, 2, 3, -1, -1}, {0, -1, 2, 3}, {0, 2, 6}, {0, 0, 1, 1, 1, 1}};
  return p;
}

TYPED_TEST(MlpTyped, CombineTop1MatchesUnfused) {
  using T = TypeParam;
  struct Shape {
    int64_t T, E;
    bool drop_last, one_expert;
  };
  const Shape shapes[] = {{0, 3, false, false}, {1, 1, false, false}, {9, 7, false, false},
                          {9, 3, true, false},  {33, 5, false, true}, {20, 40, false, false}};
  for (const Shape& s : shapes) {
    for (Activation a : {Activation::kSwiGLU, Activation::kGELU}) {
      SCOPED_TRACE("T=" + std::to_string(s.T) + " E=" + std::to_string(s.E) + " act=" + std::to_string(int(a)) +
                   (s.drop_last ? " drop" : "") + (s.one_expert ? " one" : ""));
      expect_top1_matches_unfused<T>(make_plan(s.T, 1, s.E, s.drop_last, s.one_expert), a, 31);
    }
  }
  SCOPED_TRACE("padding rows");
  expect_top1_matches_unfused<T>(padded_plan(), Activation::kSwiGLU, 32);
}

TEST(MlpErrors, CombineTop1RejectsBadArguments) {
  MlpCase<float> c(make_plan(7, 1, 3), Activation::kSwiGLU, 4, 3, 93);
  const int64_t T_ = 7, R = 7, E = 3, H = 4, F = 3;
  ExpertMlpParams p;
  std::vector<float> w(size_t(T_ * 2)), y(size_t(T_ * H));
  std::vector<double> w64(static_cast<size_t>(T_));
  std::vector<uint8_t> ws(size_t(expert_mlp_combine_top1_workspace_bytes(p, DType::kF32, R, H, F)));
  auto run = [&](const TensorView& wv, const TensorView& yv, const TensorView& wsv) {
    return expert_mlp_combine_top1_forward(
        Exec{}, p, make_view(c.x.data(), {T_, H}), make_view(c.plan.token_of_row.data(), {R}),
        make_view(c.plan.offsets.data(), {E + 1}), make_view(c.w1.data(), {E, 2 * F, H}),
        make_view(c.w2.data(), {E, H, F}), wv, yv, wsv);
  };
  const TensorView Y = make_view(y.data(), {T_, H}), WS = make_view(ws.data(), {int64_t(ws.size())});
  expect_invalid(run(make_view(w.data(), {T_, 2}), Y, WS), "argument 'weights': expected size(1) == 1");
  expect_invalid(run(make_view(w64.data(), {T_, 1}), Y, WS), "argument 'weights': expected dtype f32");
  expect_invalid(run(make_view(w.data(), {T_, 1}), make_view(y.data(), {T_ - 1, H}), WS),
                 "argument 'y': expected size(0) == 7");
  expect_invalid(run(make_view(w.data(), {T_, 1}), Y, make_view(ws.data(), {8})),
                 "argument 'workspace': expected at least");
  EXPECT_TRUE(run(make_view(w.data(), {T_, 1}), Y, WS).ok());
}

}  // namespace
}  // namespace smoe

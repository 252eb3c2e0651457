// Tests of permute_forward/backward and combine_forward/backward (include/smoe/ops/permute.h)
// against naive references written below, for f32, bf16, f16 and f64: dropped and padding rows,
// strided inputs, expert-choice layouts (K = E with many -1), stale outputs, bad inputs, determinism.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu/parallel.h"
#include "testing.h"

namespace smoe {
namespace {

template <class S>
using Acc = typename AccOf<S>::type;

// ---- layouts: which row each (t, k) went to ------------------------------------------------------

struct Layout {
  int64_t T = 0, K = 0, R = 0;
  std::vector<int32_t> row_of;        // [T, K], -1 = dropped
  std::vector<int32_t> token_of_row;  // [R], -1 = padding
};

// Each (t, k) is kept with probability keep_prob and gets a distinct random row of [0, R), where R
// is the number kept plus `extra` rows nobody references (padding).
Layout random_layout(int64_t T, int64_t K, double keep_prob, int64_t extra, uint32_t seed) {
  std::mt19937 g(seed);
  std::bernoulli_distribution keep(keep_prob);
  Layout l;
  l.T = T;
  l.K = K;
  l.row_of.assign(T * K, -1);
  std::vector<int64_t> kept;
  for (int64_t a = 0; a < T * K; ++a) {
    if (keep(g)) kept.push_back(a);
  }
  l.R = int64_t(kept.size()) + extra;
  std::vector<int32_t> rows(l.R);
  std::iota(rows.begin(), rows.end(), 0);
  std::shuffle(rows.begin(), rows.end(), g);
  l.token_of_row.assign(l.R, -1);
  for (size_t i = 0; i < kept.size(); ++i) {
    l.row_of[kept[i]] = rows[i];
    l.token_of_row[rows[i]] = int32_t(kept[i] / K);
  }
  return l;
}

// Expert choice (K = E): expert e takes C distinct tokens into rows e*C .. e*C + C - 1.
Layout expert_choice_layout(int64_t T, int64_t E, int64_t C, uint32_t seed) {
  std::mt19937 g(seed);
  Layout l;
  l.T = T;
  l.K = E;
  l.R = E * C;
  l.row_of.assign(T * E, -1);
  l.token_of_row.assign(l.R, -1);
  std::vector<int32_t> tokens(T);
  std::iota(tokens.begin(), tokens.end(), 0);
  for (int64_t e = 0; e < E; ++e) {
    std::shuffle(tokens.begin(), tokens.end(), g);
    for (int64_t c = 0; c < C; ++c) {
      l.row_of[tokens[c] * E + e] = int32_t(e * C + c);
      l.token_of_row[e * C + c] = tokens[c];
    }
  }
  return l;
}

std::vector<Layout> layouts_that_hurt() {
  std::vector<Layout> ls;
  uint32_t seed = 100;
  for (int64_t T : {0, 1, 7, 4097}) {
    for (int64_t K : {1, 2}) {
      ls.push_back(random_layout(T, K, 1.0, 0, ++seed));  // dropless, no padding
      ls.push_back(random_layout(T, K, 0.7, 5, ++seed));  // dropped assignments and padding rows
    }
  }
  ls.push_back(random_layout(7, 7, 0.5, 3, ++seed));       // K = E = 7
  ls.push_back(random_layout(5, 3, 0.0, 4, ++seed));       // everything dropped
  ls.push_back(expert_choice_layout(64, 300, 2, ++seed));  // [T, E] with E = 300, mostly -1
  return ls;
}

std::string describe(const Layout& l, int64_t H) {
  return "T=" + std::to_string(l.T) + " K=" + std::to_string(l.K) + " R=" + std::to_string(l.R) +
         " H=" + std::to_string(H);
}

// ---- naive references (sums in double, rounded once to the storage type) -----------------------

template <class S>
std::vector<S> ref_permute_forward(const std::vector<S>& x, int64_t x_stride, const Layout& l, int64_t H) {
  std::vector<S> xs(l.R * H, from_acc<S>(0));
  for (int64_t r = 0; r < l.R; ++r) {
    const int32_t t = l.token_of_row[r];
    if (t < 0) continue;
    for (int64_t h = 0; h < H; ++h) xs[r * H + h] = x[t * x_stride + h];
  }
  return xs;
}

template <class S>
std::vector<S> ref_permute_backward(const std::vector<S>& gxs, const Layout& l, int64_t H) {
  std::vector<S> gx(l.T * H);
  for (int64_t t = 0; t < l.T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      double sum = 0;
      for (int64_t k = 0; k < l.K; ++k) {
        const int32_t r = l.row_of[t * l.K + k];
        if (r >= 0) sum += double(to_acc(gxs[r * H + h]));
      }
      gx[t * H + h] = from_acc<S>(Acc<S>(sum));
    }
  }
  return gx;
}

template <class S>
std::vector<S> ref_combine_forward(const std::vector<S>& ys, const std::vector<Acc<S>>& w, const Layout& l, int64_t H) {
  std::vector<S> y(l.T * H);
  for (int64_t t = 0; t < l.T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      double sum = 0;
      for (int64_t k = 0; k < l.K; ++k) {
        const int32_t r = l.row_of[t * l.K + k];
        if (r >= 0) sum += double(w[t * l.K + k]) * double(to_acc(ys[r * H + h]));
      }
      y[t * H + h] = from_acc<S>(Acc<S>(sum));
    }
  }
  return y;
}

template <class S>
void ref_combine_backward(const std::vector<S>& gy, int64_t gy_stride, const std::vector<S>& ys,
                          const std::vector<Acc<S>>& w, const Layout& l, int64_t H, std::vector<S>* gys,
                          std::vector<Acc<S>>* gw) {
  gys->assign(l.R * H, from_acc<S>(0));
  gw->assign(l.T * l.K, Acc<S>(0));
  for (int64_t t = 0; t < l.T; ++t) {
    for (int64_t k = 0; k < l.K; ++k) {
      const int32_t r = l.row_of[t * l.K + k];
      if (r < 0) continue;
      double dot = 0;
      for (int64_t h = 0; h < H; ++h) {
        const double g = double(to_acc(gy[t * gy_stride + h]));
        (*gys)[r * H + h] = from_acc<S>(Acc<S>(double(w[t * l.K + k]) * g));
        dot += g * double(to_acc(ys[r * H + h]));
      }
      (*gw)[t * l.K + k] = Acc<S>(dot);
    }
  }
}

// ---- helpers --------------------------------------------------------------------------------------

// [rows, H] values in [-1, 1] stored with row stride `stride` >= H; the gaps hold NaN so that any read
// of them shows in the result.
template <class S>
std::vector<S> strided_matrix(int64_t rows, int64_t H, int64_t stride, uint32_t seed) {
  const auto dense = testing::uniform<S>(rows * H, seed);
  std::vector<S> m(std::max<int64_t>(rows * stride, 0), from_acc<S>(Acc<S>(std::numeric_limits<float>::quiet_NaN())));
  for (int64_t i = 0; i < rows; ++i)
    std::copy(dense.begin() + i * H, dense.begin() + (i + 1) * H, m.begin() + i * stride);
  return m;
}

template <class S>
TensorView strided_view(std::vector<S>& m, int64_t rows, int64_t H, int64_t stride) {
  TensorView v = make_view(m.data(), {rows, H});
  v.strides[0] = stride;
  return v;
}

template <class S>
S garbage() {
  return from_acc<S>(Acc<S>(123));
}

// Runs fn with every parallel_for on the calling thread: a parallel_for nested in a pool task runs
// inline (csrc/cpu/parallel.h), which is exactly the 1-thread path. Used instead of
// cpu::set_num_threads(1) because resizing the pool after it has run a job can hand a new worker the
// finished job (csrc/cpu/parallel.cpp: a new worker starts with seen = 0 != generation_).
template <class F>
void run_on_one_thread(F&& fn) {
  cpu::parallel_for(2, 1, [&](int64_t begin, int64_t) {
    if (begin == 0) fn();
  });
}

void expect_invalid(const Status& s, const std::string& needle) {
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << needle << ": " << s.message();
  EXPECT_NE(s.message().find(needle), std::string::npos) << "message: " << s.message() << "\nwanted: " << needle;
}

// ---- typed tests over the storage types -------------------------------------------------------------

template <class S>
class PermuteTyped : public ::testing::Test {};
using StorageTypes = ::testing::Types<float, bf16_t, f16_t, double>;
TYPED_TEST_SUITE(PermuteTyped, StorageTypes);

TYPED_TEST(PermuteTyped, ForwardGathersRowsExactly) {
  using S = TypeParam;
  for (const Layout& l : layouts_that_hurt()) {
    for (int64_t H : {1, 37}) {
      for (int64_t pad : {0, 3}) {  // x dense, then row-strided
        const int64_t stride = H + pad;
        auto x = strided_matrix<S>(l.T, H, stride, 7);
        std::vector<S> xs(l.R * H, garbage<S>());
        const Status s = permute_forward({}, strided_view(x, l.T, H, stride),
                                         make_view(const_cast<int32_t*>(l.token_of_row.data()), {l.R}),
                                         make_view(xs.data(), {l.R, H}));
        ASSERT_TRUE(s.ok()) << s.message();
        EXPECT_TRUE(testing::bitwise_equal(xs, ref_permute_forward(x, stride, l, H))) << describe(l, H);
      }
    }
  }
}

TYPED_TEST(PermuteTyped, BackwardSumsRowsInKOrder) {
  using S = TypeParam;
  const DType dt = DTypeOf<S>::value;
  for (const Layout& l : layouts_that_hurt()) {
    for (int64_t H : {1, 37}) {
      const auto gxs = testing::uniform<S>(l.R * H, 11);
      std::vector<S> gx(l.T * H, garbage<S>());
      const Status s = permute_backward({}, make_view(const_cast<S*>(gxs.data()), {l.R, H}),
                                        make_view(const_cast<int32_t*>(l.row_of.data()), {l.T, l.K}),
                                        make_view(gx.data(), {l.T, H}));
      ASSERT_TRUE(s.ok()) << s.message();
      EXPECT_TRUE(testing::all_close(gx, ref_permute_backward(gxs, l, H), dt)) << describe(l, H);
    }
  }
}

TYPED_TEST(PermuteTyped, CombineForwardMatchesReference) {
  using S = TypeParam;
  const DType dt = DTypeOf<S>::value;
  for (const Layout& l : layouts_that_hurt()) {
    for (int64_t H : {1, 37}) {
      const auto ys = testing::uniform<S>(l.R * H, 21);
      const auto w = testing::uniform<Acc<S>>(l.T * l.K, 22, 0.f, 1.f);
      std::vector<S> y(l.T * H, garbage<S>());
      const Status s = combine_forward(
          {}, make_view(const_cast<S*>(ys.data()), {l.R, H}), make_view(const_cast<Acc<S>*>(w.data()), {l.T, l.K}),
          make_view(const_cast<int32_t*>(l.row_of.data()), {l.T, l.K}), make_view(y.data(), {l.T, H}));
      ASSERT_TRUE(s.ok()) << s.message();
      EXPECT_TRUE(testing::all_close(y, ref_combine_forward(ys, w, l, H), dt)) << describe(l, H);
    }
  }
}

TYPED_TEST(PermuteTyped, CombineBackwardMatchesReferenceAndZeroesUnreferencedRows) {
  using S = TypeParam;
  const DType dt = DTypeOf<S>::value;
  for (const Layout& l : layouts_that_hurt()) {
    for (int64_t H : {1, 37}) {
      const int64_t stride = H + 2;  // grad_y row-strided
      auto gy = strided_matrix<S>(l.T, H, stride, 31);
      const auto ys = testing::uniform<S>(l.R * H, 32);
      const auto w = testing::uniform<Acc<S>>(l.T * l.K, 33, 0.f, 1.f);
      std::vector<S> want_gys;
      std::vector<Acc<S>> want_gw;
      ref_combine_backward(gy, stride, ys, w, l, H, &want_gys, &want_gw);
      // Outputs full of garbage: rows nobody references and dropped (t, k) must come back 0.
      std::vector<S> gys(l.R * H, garbage<S>());
      std::vector<Acc<S>> gw(l.T * l.K, Acc<S>(123));
      const TensorView gy_v = strided_view(gy, l.T, H, stride);
      const TensorView ys_v = make_view(const_cast<S*>(ys.data()), {l.R, H});
      const TensorView w_v = make_view(const_cast<Acc<S>*>(w.data()), {l.T, l.K});
      const TensorView rof_v = make_view(const_cast<int32_t*>(l.row_of.data()), {l.T, l.K});
      Status s = combine_backward({}, gy_v, ys_v, w_v, rof_v, make_view(gys.data(), {l.R, H}),
                                  make_view(gw.data(), {l.T, l.K}));
      ASSERT_TRUE(s.ok()) << s.message();
      EXPECT_TRUE(testing::all_close(gys, want_gys, dt)) << describe(l, H);
      EXPECT_TRUE(testing::all_close(gw, want_gw, dt)) << describe(l, H);

      // Only grad_ys, with ys absent (not needed without grad_weights).
      std::vector<S> gys_only(l.R * H, garbage<S>());
      s = combine_backward({}, gy_v, TensorView{}, w_v, rof_v, make_view(gys_only.data(), {l.R, H}), TensorView{});
      ASSERT_TRUE(s.ok()) << s.message();
      EXPECT_TRUE(testing::bitwise_equal(gys_only, gys)) << describe(l, H);

      // Only grad_weights.
      std::vector<Acc<S>> gw_only(l.T * l.K, Acc<S>(123));
      s = combine_backward({}, gy_v, ys_v, w_v, rof_v, TensorView{}, make_view(gw_only.data(), {l.T, l.K}));
      ASSERT_TRUE(s.ok()) << s.message();
      EXPECT_TRUE(testing::bitwise_equal(gw_only, gw)) << describe(l, H);
    }
  }
}

TYPED_TEST(PermuteTyped, DeterministicAcrossRunsAndThreadCounts) {
  using S = TypeParam;
  const Layout l = random_layout(4097, 2, 0.9, 17, 5);
  const int64_t H = 64;
  const auto ys = testing::uniform<S>(l.R * H, 41);
  const auto gy = testing::uniform<S>(l.T * H, 42);
  const auto w = testing::uniform<Acc<S>>(l.T * l.K, 43);
  const TensorView rof_v = make_view(const_cast<int32_t*>(l.row_of.data()), {l.T, l.K});
  const TensorView w_v = make_view(const_cast<Acc<S>*>(w.data()), {l.T, l.K});
  struct Out {
    std::vector<S> y, gx, gys;
    std::vector<Acc<S>> gw;
  };
  auto run = [&] {
    Out o;
    o.y.assign(l.T * H, garbage<S>());
    o.gx.assign(l.T * H, garbage<S>());
    o.gys.assign(l.R * H, garbage<S>());
    o.gw.assign(l.T * l.K, Acc<S>(123));
    const TensorView ys_v = make_view(const_cast<S*>(ys.data()), {l.R, H});
    EXPECT_TRUE(combine_forward({}, ys_v, w_v, rof_v, make_view(o.y.data(), {l.T, H})).ok());
    EXPECT_TRUE(permute_backward({}, ys_v, rof_v, make_view(o.gx.data(), {l.T, H})).ok());
    EXPECT_TRUE(combine_backward({}, make_view(const_cast<S*>(gy.data()), {l.T, H}), ys_v, w_v, rof_v,
                                 make_view(o.gys.data(), {l.R, H}), make_view(o.gw.data(), {l.T, l.K}))
                    .ok());
    return o;
  };
  // a, b: on the pool (all hardware threads); c: on one thread.
  const Out a = run(), b = run();
  Out c;
  run_on_one_thread([&] { c = run(); });
  for (const Out* o : {&b, static_cast<const Out*>(&c)}) {
    EXPECT_TRUE(testing::bitwise_equal(a.y, o->y));
    EXPECT_TRUE(testing::bitwise_equal(a.gx, o->gx));
    EXPECT_TRUE(testing::bitwise_equal(a.gys, o->gys));
    EXPECT_TRUE(testing::bitwise_equal(a.gw, o->gw));
  }
}

// ---- exact results with small integers (f32 sums and products of them are exact) ---------------------

TEST(CombineForward, SmallIntegersAreExact) {
  const Layout l = random_layout(4097, 3, 0.8, 9, 77);
  const int64_t H = 40;
  const auto ys = testing::small_ints<float>(l.R * H, 1);
  const auto w = testing::small_ints<float>(l.T * l.K, 2, -2, 2);
  std::vector<float> y(l.T * H, 123.f);
  ASSERT_TRUE(combine_forward({}, make_view(const_cast<float*>(ys.data()), {l.R, H}),
                              make_view(const_cast<float*>(w.data()), {l.T, l.K}),
                              make_view(const_cast<int32_t*>(l.row_of.data()), {l.T, l.K}),
                              make_view(y.data(), {l.T, H}))
                  .ok());
  EXPECT_TRUE(testing::bitwise_equal(y, ref_combine_forward(ys, w, l, H)));
}

TEST(CombineBackward, SmallIntegersAreExact) {
  const Layout l = random_layout(1000, 2, 0.8, 9, 78);
  const int64_t H = 40;
  const auto ys = testing::small_ints<float>(l.R * H, 3);
  const auto gy = testing::small_ints<float>(l.T * H, 4);
  const auto w = testing::small_ints<float>(l.T * l.K, 5, -2, 2);
  std::vector<float> gys(l.R * H, 123.f), gw(l.T * l.K, 123.f), want_gys, want_gw;
  ASSERT_TRUE(combine_backward({}, make_view(const_cast<float*>(gy.data()), {l.T, H}),
                               make_view(const_cast<float*>(ys.data()), {l.R, H}),
                               make_view(const_cast<float*>(w.data()), {l.T, l.K}),
                               make_view(const_cast<int32_t*>(l.row_of.data()), {l.T, l.K}),
                               make_view(gys.data(), {l.R, H}), make_view(gw.data(), {l.T, l.K}))
                  .ok());
  ref_combine_backward(gy, H, ys, w, l, H, &want_gys, &want_gw);
  EXPECT_TRUE(testing::bitwise_equal(gys, want_gys));
  EXPECT_TRUE(testing::bitwise_equal(gw, want_gw));
}

// ---- rounding: every 16-bit pattern -----------------------------------------------------------------

// The stores round the f32 accumulator with the library's own rule (round to nearest even, NaN stays
// NaN): pass all 65536 bit patterns through permute_backward (0 + v) and combine_backward (1 * v).
template <class S>
void expect_every_pattern_rounds_like_from_acc() {
  const int64_t T = 256, H = 256;
  std::vector<S> x(T * H);
  for (int64_t i = 0; i < T * H; ++i) x[i].bits = uint16_t(i);
  std::vector<int32_t> rof(T);
  std::iota(rof.begin(), rof.end(), 0);
  std::vector<float> ones(T, 1.f);
  std::vector<S> sum(T * H), scaled(T * H);
  ASSERT_TRUE(
      permute_backward({}, make_view(x.data(), {T, H}), make_view(rof.data(), {T, 1}), make_view(sum.data(), {T, H}))
          .ok());
  ASSERT_TRUE(combine_backward({}, make_view(x.data(), {T, H}), TensorView{}, make_view(ones.data(), {T, 1}),
                               make_view(rof.data(), {T, 1}), make_view(scaled.data(), {T, H}), TensorView{})
                  .ok());
  int bad_sum = 0, bad_scaled = 0;
  for (int64_t i = 0; i < T * H; ++i) {
    bad_sum += sum[i].bits != from_acc<S>(0.f + to_acc(x[i])).bits;
    bad_scaled += scaled[i].bits != from_acc<S>(1.f * to_acc(x[i])).bits;
  }
  EXPECT_EQ(bad_sum, 0);
  EXPECT_EQ(bad_scaled, 0);
}

TEST(PermuteBackward, EveryBf16PatternRoundsLikeFromAcc) { expect_every_pattern_rounds_like_from_acc<bf16_t>(); }
TEST(PermuteBackward, EveryF16PatternRoundsLikeFromAcc) { expect_every_pattern_rounds_like_from_acc<f16_t>(); }

// ---- bad inputs -----------------------------------------------------------------------------------------

// A small valid problem each case breaks in one place: T = 3, K = 2, R = 5, H = 4.
struct Problem {
  int64_t T = 3, K = 2, R = 5, H = 4;
  std::vector<float> x = std::vector<float>(T * H, 1.f), xs = std::vector<float>(R * H, 0.f);
  std::vector<float> y = std::vector<float>(T * H, 0.f), w = std::vector<float>(T * K, 0.5f);
  std::vector<float> gw = std::vector<float>(T * K, 0.f);
  std::vector<double> wd = std::vector<double>(T * K, 0.5);
  std::vector<int32_t> tor = {0, 1, -1, 2, 0};
  std::vector<int32_t> rof = {0, 4, 1, -1, 3, -1};
  TensorView x_v = make_view(x.data(), {T, H}), xs_v = make_view(xs.data(), {R, H});
  TensorView y_v = make_view(y.data(), {T, H}), w_v = make_view(w.data(), {T, K});
  TensorView gw_v = make_view(gw.data(), {T, K});
  TensorView tor_v = make_view(tor.data(), {R}), rof_v = make_view(rof.data(), {T, K});
};

TEST(PermuteForward, RejectsBadInputs) {
  {
    Problem p;
    ASSERT_TRUE(permute_forward({}, p.x_v, p.tor_v, p.xs_v).ok());
  }
  {
    Problem p;
    p.x_v = make_view(p.x.data(), {p.T * p.H});
    expect_invalid(permute_forward({}, p.x_v, p.tor_v, p.xs_v), "argument 'x': expected 2-D");
  }
  {
    Problem p;
    p.x_v.dtype = DType::kI32;
    expect_invalid(permute_forward({}, p.x_v, p.tor_v, p.xs_v), "argument 'x': expected dtype f32, bf16, f16 or f64");
  }
  {
    Problem p;
    p.x_v.strides[1] = 2;
    expect_invalid(permute_forward({}, p.x_v, p.tor_v, p.xs_v), "argument 'x': expected dense rows");
  }
  {
    Problem p;
    p.x_v.strides[0] = 2;
    expect_invalid(permute_forward({}, p.x_v, p.tor_v, p.xs_v), "argument 'x': expected dense rows");
  }
  {
    Problem p;
    p.tor_v.dtype = DType::kI64;
    expect_invalid(permute_forward({}, p.x_v, p.tor_v, p.xs_v), "argument 'token_of_row': expected dtype i32");
  }
  {
    Problem p;
    p.tor_v = make_view(p.tor.data(), {1, p.R});
    expect_invalid(permute_forward({}, p.x_v, p.tor_v, p.xs_v), "argument 'token_of_row': expected 1-D");
  }
  {
    Problem p;
    p.tor[3] = 3;
    expect_invalid(permute_forward({}, p.x_v, p.tor_v, p.xs_v),
                   "argument 'token_of_row': expected values in [-1, 3) (T = x.size(0)), got 3 at row 3");
  }
  {
    Problem p;
    p.tor[1] = -2;
    expect_invalid(permute_forward({}, p.x_v, p.tor_v, p.xs_v), "got -2 at row 1");
  }
  {
    Problem p;
    p.xs_v.dtype = DType::kBF16;
    expect_invalid(permute_forward({}, p.x_v, p.tor_v, p.xs_v), "argument 'xs': expected dtype f32");
  }
  {
    Problem p;
    p.xs_v = make_view(p.xs.data(), {p.R - 1, p.H});
    expect_invalid(permute_forward({}, p.x_v, p.tor_v, p.xs_v), "argument 'xs': expected size(0) == 5");
  }
  {
    Problem p;
    p.xs_v = make_view(p.xs.data(), {p.R, p.H - 1});
    expect_invalid(permute_forward({}, p.x_v, p.tor_v, p.xs_v), "argument 'xs': expected size(1) == 4");
  }
  {
    Problem p;
    p.xs_v.strides[0] = 5;
    expect_invalid(permute_forward({}, p.x_v, p.tor_v, p.xs_v), "argument 'xs': expected a contiguous tensor");
  }
  {
    Problem p;
    p.xs_v.device = Device::kCUDA;
    expect_invalid(permute_forward({}, p.x_v, p.tor_v, p.xs_v), "argument 'xs': expected a tensor on cpu");
  }
  {
    Problem p;
    Exec simt;
    simt.backend = Backend::kSimt;
    // Reaches the emulated CUDA kernel (not an error); kCuda on CPU tensors is one.
    EXPECT_TRUE(permute_forward(simt, p.x_v, p.tor_v, p.xs_v).ok());
    Exec cuda;
    cuda.backend = Backend::kCuda;
    expect_invalid(permute_forward(cuda, p.x_v, p.tor_v, p.xs_v), "argument 'backend'");
  }
}

TEST(PermuteBackward, RejectsBadInputs) {
  {
    Problem p;
    ASSERT_TRUE(permute_backward({}, p.xs_v, p.rof_v, p.x_v).ok());
  }
  {
    Problem p;
    p.xs_v.strides[0] = 8;
    expect_invalid(permute_backward({}, p.xs_v, p.rof_v, p.x_v), "argument 'grad_xs': expected a contiguous tensor");
  }
  {
    Problem p;
    p.rof_v.dtype = DType::kF32;
    expect_invalid(permute_backward({}, p.xs_v, p.rof_v, p.x_v), "argument 'row_of': expected dtype i32");
  }
  {
    Problem p;
    p.rof[2] = 5;
    expect_invalid(permute_backward({}, p.xs_v, p.rof_v, p.x_v),
                   "argument 'row_of': expected values in [-1, 5) (R = grad_xs.size(0)), got 5 at (t, k) = (1, 0)");
  }
  {
    Problem p;
    p.x_v = make_view(p.x.data(), {p.T, p.H - 1});
    expect_invalid(permute_backward({}, p.xs_v, p.rof_v, p.x_v), "argument 'grad_x': expected size(1) == 4");
  }
  {
    Problem p;
    p.rof_v = make_view(p.rof.data(), {p.T - 1, p.K});
    expect_invalid(permute_backward({}, p.xs_v, p.rof_v, p.x_v),
                   "argument 'grad_x': expected size(0) == 2 (T = row_of.size(0))");
  }
  {
    Problem p;
    p.x_v.dtype = DType::kF16;
    expect_invalid(permute_backward({}, p.xs_v, p.rof_v, p.x_v), "argument 'grad_x': expected dtype f32");
  }
}

TEST(CombineForward, RejectsBadInputs) {
  {
    Problem p;
    ASSERT_TRUE(combine_forward({}, p.xs_v, p.w_v, p.rof_v, p.y_v).ok());
  }
  {
    Problem p;
    p.xs_v.dtype = DType::kU8;
    expect_invalid(combine_forward({}, p.xs_v, p.w_v, p.rof_v, p.y_v),
                   "argument 'ys': expected dtype f32, bf16, f16 or f64");
  }
  {
    Problem p;
    p.w_v = make_view(p.wd.data(), {p.T, p.K});
    expect_invalid(combine_forward({}, p.xs_v, p.w_v, p.rof_v, p.y_v), "argument 'weights': expected dtype f32");
  }
  {
    Problem p;
    p.w_v = make_view(p.w.data(), {p.K, p.T});
    expect_invalid(combine_forward({}, p.xs_v, p.w_v, p.rof_v, p.y_v),
                   "argument 'weights': expected size(0) == 3 (T = row_of.size(0))");
  }
  {
    Problem p;
    p.rof_v = make_view(p.rof.data(), {p.T * p.K});
    expect_invalid(combine_forward({}, p.xs_v, p.w_v, p.rof_v, p.y_v), "argument 'row_of': expected 2-D");
  }
  {
    Problem p;
    p.rof[5] = -3;
    expect_invalid(combine_forward({}, p.xs_v, p.w_v, p.rof_v, p.y_v),
                   "argument 'row_of': expected values in [-1, 5) (R = ys.size(0)), got -3 at (t, k) = (2, 1)");
  }
  {
    Problem p;
    p.y_v = make_view(p.y.data(), {p.T, 2});
    expect_invalid(combine_forward({}, p.xs_v, p.w_v, p.rof_v, p.y_v),
                   "argument 'y': expected size(1) == 4 (H = ys.size(1))");
  }
  {
    Problem p;
    p.y_v.strides[0] = 6;
    expect_invalid(combine_forward({}, p.xs_v, p.w_v, p.rof_v, p.y_v), "argument 'y': expected a contiguous tensor");
  }
  {  // f64 data takes f64 weights
    Problem p;
    std::vector<double> ys(p.R * p.H, 1.0), y(p.T * p.H);
    expect_invalid(
        combine_forward({}, make_view(ys.data(), {p.R, p.H}), p.w_v, p.rof_v, make_view(y.data(), {p.T, p.H})),
        "argument 'weights': expected dtype f64");
    EXPECT_TRUE(combine_forward({}, make_view(ys.data(), {p.R, p.H}), make_view(p.wd.data(), {p.T, p.K}), p.rof_v,
                                make_view(y.data(), {p.T, p.H}))
                    .ok());
  }
}

TEST(CombineBackward, RejectsBadInputs) {
  // grad_y = y_v [T, H], ys = xs_v [R, H], grad_ys = a second [R, H] buffer.
  {
    Problem p;
    std::vector<float> gys(p.R * p.H);
    ASSERT_TRUE(combine_backward({}, p.y_v, p.xs_v, p.w_v, p.rof_v, make_view(gys.data(), {p.R, p.H}), p.gw_v).ok());
  }
  {
    Problem p;
    p.y_v.strides[1] = 3;
    expect_invalid(combine_backward({}, p.y_v, p.xs_v, p.w_v, p.rof_v, TensorView{}, p.gw_v),
                   "argument 'grad_y': expected dense rows");
  }
  {
    Problem p;
    p.rof_v = make_view(p.rof.data(), {p.K, p.T});
    expect_invalid(combine_backward({}, p.y_v, p.xs_v, p.w_v, p.rof_v, TensorView{}, p.gw_v),
                   "argument 'row_of': expected size(0) == 3 (T = grad_y.size(0))");
  }
  {
    Problem p;
    expect_invalid(combine_backward({}, p.y_v, TensorView{}, p.w_v, p.rof_v, TensorView{}, p.gw_v),
                   "argument 'ys': expected 2-D");
  }
  {
    Problem p;
    p.xs_v = make_view(p.xs.data(), {p.H, p.R});
    expect_invalid(combine_backward({}, p.y_v, p.xs_v, p.w_v, p.rof_v, TensorView{}, p.gw_v),
                   "argument 'ys': expected size(1) == 4 (H = grad_y.size(1))");
  }
  {
    Problem p;
    std::vector<float> gys(p.R * p.H);
    expect_invalid(combine_backward({}, p.y_v, p.xs_v, p.w_v, p.rof_v, make_view(gys.data(), {p.R - 1, p.H}), p.gw_v),
                   "argument 'grad_ys': expected size(0) == 5 (R = ys.size(0))");
  }
  {
    Problem p;
    p.gw_v.dtype = DType::kF64;
    expect_invalid(combine_backward({}, p.y_v, p.xs_v, p.w_v, p.rof_v, TensorView{}, p.gw_v),
                   "argument 'grad_weights': expected dtype f32");
  }
  {
    Problem p;
    p.w_v.dtype = DType::kBF16;
    expect_invalid(combine_backward({}, p.y_v, p.xs_v, p.w_v, p.rof_v, TensorView{}, p.gw_v),
                   "argument 'weights': expected dtype f32");
  }
  {  // grad_ys[r] = w * grad_y[t] is ambiguous when two (t, k) share row r
    Problem p;
    p.rof[4] = 4;
    std::vector<float> gys(p.R * p.H);
    expect_invalid(combine_backward({}, p.y_v, p.xs_v, p.w_v, p.rof_v, make_view(gys.data(), {p.R, p.H}), TensorView{}),
                   "argument 'row_of': expected each row referenced by at most one (t, k), got row 4 at (t, k) = (0, "
                   "1) and (2, 0)");
  }
  {
    Problem p;
    p.rof[0] = 9;
    expect_invalid(combine_backward({}, p.y_v, p.xs_v, p.w_v, p.rof_v, TensorView{}, p.gw_v),
                   "argument 'row_of': expected values in [-1, 5)");
  }
  {  // nothing asked for: nothing to do
    Problem p;
    EXPECT_TRUE(combine_backward({}, p.y_v, p.xs_v, p.w_v, p.rof_v, TensorView{}, TensorView{}).ok());
  }
}

}  // namespace
}  // namespace smoe

// Tests of the gating op family (include/smoe/ops/gating.h) on the CPU backend.
//
// Every op is compared with a naive reference written plainly below (full stable sorts, explicit
// Jacobians, triple loops); the backward ops are also checked against central finite differences
// in f64. Integers (expert and token indices, rows) are compared exactly.
#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "cpu/parallel.h"
#include "testing.h"

namespace smoe {
namespace {

using smoe::testing::all_close;
using smoe::testing::bitwise_equal;
using smoe::testing::small_ints;
using smoe::testing::tolerance_for;
using smoe::testing::uniform;

template <class In>
using Acc = typename AccOf<In>::type;

// A [rows, cols] view whose rows are `ld` elements apart (ld >= cols: padded rows).
template <class T>
TensorView view2d(std::vector<T>& buf, int64_t rows, int64_t cols, int64_t ld = -1) {
  if (ld < 0) ld = cols;
  TensorView v = make_view(buf.data(), {rows, cols});
  v.strides[0] = ld;
  return v;
}

template <class T>
TensorView view1d(std::vector<T>& buf) {
  return make_view(buf.data(), {int64_t(buf.size())});
}

::testing::AssertionResult fails_naming(const Status& s, const std::string& arg) {
  if (s.code() != Code::kInvalidArgument) {
    return ::testing::AssertionFailure() << "expected kInvalidArgument, got code " << int(s.code()) << ": "
                                         << s.message();
  }
  if (s.message().find("'" + arg + "'") == std::string::npos) {
    return ::testing::AssertionFailure() << "message does not name '" << arg << "': " << s.message();
  }
  return ::testing::AssertionSuccess();
}

// ---- naive references ---------------------------------------------------------------------------

template <class A>
std::vector<A> naive_scores(const std::vector<A>& x, int64_t T, int64_t E, ScoreFunc f) {
  std::vector<A> s(static_cast<size_t>(T * E));
  for (int64_t t = 0; t < T; ++t) {
    const A* r = &x[t * E];
    if (f == ScoreFunc::kSoftmax) {
      A m = r[0];
      for (int64_t e = 1; e < E; ++e) m = std::max(m, r[e]);
      A sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += std::exp(r[e] - m);
      for (int64_t e = 0; e < E; ++e) s[t * E + e] = std::exp(r[e] - m) / sum;
    } else {
      for (int64_t e = 0; e < E; ++e) s[t * E + e] = A(1) / (A(1) + std::exp(-r[e]));
    }
  }
  return s;
}

// Indices of v sorted by descending value, ties to the lower index (stable sort).
template <class A>
std::vector<int32_t> order_desc(const std::vector<A>& v) {
  std::vector<int32_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return v[a] > v[b]; });
  return idx;
}

template <class A>
struct Gate {
  std::vector<A> weights, scores;
  std::vector<int32_t> experts;
  Status status;
};

template <class A>
Gate<A> naive_topk_gating(const std::vector<A>& x, int64_t T, int64_t E, const TopkGatingParams& p,
                          const std::vector<float>& bias) {
  Gate<A> out;
  const int64_t K = p.top_k, G = E / p.n_groups;
  out.scores = naive_scores(x, T, E, p.score_func);
  out.weights.resize(size_t(T * K));
  out.experts.resize(size_t(T * K));
  for (int64_t t = 0; t < T; ++t) {
    std::vector<A> key(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) key[e] = out.scores[t * E + e] + (bias.empty() ? A(0) : A(bias[e]));
    // group-limited: mask every expert outside the topk_groups best groups
    std::vector<bool> allowed(size_t(E), true);
    if (p.n_groups > 1) {
      std::vector<A> gscore(static_cast<size_t>(p.n_groups));
      for (int64_t g = 0; g < p.n_groups; ++g) {
        std::vector<A> members(key.begin() + g * G, key.begin() + (g + 1) * G);
        std::sort(members.begin(), members.end(), std::greater<A>());
        gscore[g] = p.group_score == GroupScore::kMax ? members[0] : (G >= 2 ? members[0] + members[1] : members[0]);
      }
      std::vector<int32_t> gorder = order_desc(gscore);
      std::vector<bool> kept(size_t(p.n_groups), false);
      for (int i = 0; i < p.topk_groups; ++i) kept[gorder[i]] = true;
      for (int64_t e = 0; e < E; ++e) allowed[e] = kept[e / G];
    }
    std::vector<int32_t> order = order_desc(key);
    int64_t k = 0;
    for (int32_t e : order) {
      if (k == K) break;
      if (!allowed[e]) continue;
      out.experts[t * K + k++] = e;
    }
    A sum = 0;
    for (k = 0; k < K; ++k) sum += out.scores[t * E + out.experts[t * K + k]];
    for (k = 0; k < K; ++k) {
      A w = out.scores[t * E + out.experts[t * K + k]];
      if (p.renormalize) w = w / (sum + A(p.renorm_eps));
      out.weights[t * K + k] = w * A(p.routed_scaling);
    }
  }
  return out;
}

// Backward through explicit Jacobians: dw_k/ds_j, then ds_j/dx_i.
template <class A>
std::vector<A> naive_topk_gating_backward(const std::vector<A>& s, const std::vector<int32_t>& experts, int64_t T,
                                          int64_t E, const TopkGatingParams& p, const std::vector<A>& gw,
                                          const std::vector<A>& gs) {
  const int64_t K = p.top_k;
  std::vector<A> gx(static_cast<size_t>(T * E));
  for (int64_t t = 0; t < T; ++t) {
    std::vector<A> g(size_t(E), A(0));
    if (!gs.empty()) {
      for (int64_t e = 0; e < E; ++e) g[e] = gs[t * E + e];
    }
    if (!gw.empty()) {
      A sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += s[t * E + experts[t * K + k]];
      const A D = sum + A(p.renorm_eps), c = A(p.routed_scaling);
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t j = 0; j < K; ++j) {
          const int32_t ej = experts[t * K + j];
          A dwk_dsj;
          if (p.renormalize) {
            dwk_dsj = c * ((k == j ? A(1) / D : A(0)) - s[t * E + experts[t * K + k]] / (D * D));
          } else {
            dwk_dsj = k == j ? c : A(0);
          }
          g[ej] += gw[t * K + k] * dwk_dsj;
        }
      }
    }
    for (int64_t i = 0; i < E; ++i) {
      A acc = 0;
      for (int64_t j = 0; j < E; ++j) {
        const A sj = s[t * E + j], si = s[t * E + i];
        A dsj_dxi;
        if (p.score_func == ScoreFunc::kSoftmax) {
          dsj_dxi = sj * ((i == j ? A(1) : A(0)) - si);
        } else {
          dsj_dxi = i == j ? sj * (A(1) - sj) : A(0);
        }
        acc += g[j] * dsj_dxi;
      }
      gx[t * E + i] = acc;
    }
  }
  return gx;
}

// ---- runners ------------------------------------------------------------------------------------

template <class In>
Gate<Acc<In>> run_topk(const std::vector<In>& logits_in, int64_t T, int64_t E, const TopkGatingParams& p,
                       const std::vector<float>& bias = {}, int64_t ld = -1, Exec exec = {}) {
  using A = Acc<In>;
  std::vector<In> logits = logits_in;
  std::vector<float> b = bias;
  Gate<A> out;
  const int64_t K = p.top_k;
  out.weights.assign(size_t(T * K), A(-7));
  out.experts.assign(size_t(T * K), -7);
  out.scores.assign(size_t(T * E), A(-7));
  out.status = topk_gating_forward(exec, p, view2d(logits, T, E, ld), b.empty() ? TensorView{} : view1d(b),
                                   view2d(out.weights, T, K), view2d(out.experts, T, K), view2d(out.scores, T, E));
  return out;
}

template <class A>
std::vector<A> run_topk_backward(const Gate<A>& fw, int64_t T, int64_t E, const TopkGatingParams& p, std::vector<A> gw,
                                 std::vector<A> gs, Status* st = nullptr) {
  std::vector<A> scores = fw.scores, gx(size_t(T * E), A(-7));
  std::vector<int32_t> experts = fw.experts;
  Status s = topk_gating_backward(Exec{}, p, view2d(scores, T, E), view2d(experts, T, p.top_k),
                                  gw.empty() ? TensorView{} : view2d(gw, T, p.top_k),
                                  gs.empty() ? TensorView{} : view2d(gs, T, E), view2d(gx, T, E));
  if (st) {
    *st = s;
  } else {
    EXPECT_TRUE(s.ok()) << s.message();
  }
  return gx;
}

template <class In>
std::vector<Acc<In>> to_acc_vec(const std::vector<In>& v) {
  std::vector<Acc<In>> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = to_acc(v[i]);
  return r;
}

TopkGatingParams make_params(int k, ScoreFunc f, bool renorm, float scaling = 1.0f, int n_groups = 1,
                             int topk_groups = 1, GroupScore gs = GroupScore::kMax, float eps = 0.0f) {
  TopkGatingParams p;
  p.top_k = k;
  p.score_func = f;
  p.renormalize = renorm;
  p.routed_scaling = scaling;
  p.n_groups = n_groups;
  p.topk_groups = topk_groups;
  p.group_score = gs;
  p.renorm_eps = eps;
  return p;
}

// ---- topk_gating forward ------------------------------------------------------------------------

struct Case {
  int64_t T, E;
  TopkGatingParams p;
  bool bias;
  bool int_logits;  // small integers: many exact ties
};

std::vector<Case> forward_cases() {
  std::vector<Case> cs;
  for (ScoreFunc f : {ScoreFunc::kSoftmax, ScoreFunc::kSigmoid}) {
    for (bool renorm : {false, true}) {
      cs.push_back({1, 1, make_params(1, f, renorm), false, false});
      cs.push_back({7, 7, make_params(1, f, renorm), false, true});
      cs.push_back({7, 7, make_params(7, f, renorm, 2.0f), true, true});  // K = E
      cs.push_back({4097, 8, make_params(2, f, renorm), false, false});
      cs.push_back({33, 300, make_params(8, f, renorm, 2.5f), true, false});
      cs.push_back({9, 300, make_params(40, f, renorm), false, true});   // large-K selection path
      cs.push_back({5, 300, make_params(300, f, renorm), true, false});  // K = E > 256
      cs.push_back({65, 64, make_params(6, f, renorm), true, true});
      cs.push_back({65, 64, make_params(6, f, renorm, 1.5f, 8, 3, GroupScore::kMax), true, true});
      cs.push_back({65, 64, make_params(6, f, renorm, 1.0f, 8, 3, GroupScore::kTop2Sum), false, true});
      cs.push_back({65, 64, make_params(20, f, renorm, 1.0f, 16, 9, GroupScore::kTop2Sum), true, false});
      cs.push_back({17, 8, make_params(2, f, renorm, 1.0f, 8, 3, GroupScore::kTop2Sum), true, true});  // G = 1
      cs.push_back({19, 512, make_params(8, f, renorm, 1.0f, 8, 4, GroupScore::kTop2Sum), true, false});
    }
  }
  return cs;
}

template <class In>
void check_forward_against_naive() {
  using A = Acc<In>;
  const DType acc = DTypeOf<A>::value;
  uint32_t seed = 1;
  for (const Case& c : forward_cases()) {
    SCOPED_TRACE(::testing::Message() << "T=" << c.T << " E=" << c.E << " K=" << c.p.top_k
                                      << " func=" << int(c.p.score_func) << " renorm=" << c.p.renormalize
                                      << " groups=" << c.p.n_groups << "/" << c.p.topk_groups << " bias=" << c.bias
                                      << " " << dtype_name(DTypeOf<In>::value));
    const size_t n = size_t(c.T * c.E);
    std::vector<In> logits = c.int_logits ? small_ints<In>(n, seed++) : uniform<In>(n, seed++, -4.f, 4.f);
    std::vector<float> bias = c.bias ? uniform<float>(size_t(c.E), seed++, -0.1f, 0.1f) : std::vector<float>{};
    Gate<A> got = run_topk(logits, c.T, c.E, c.p, bias);
    ASSERT_TRUE(got.status.ok()) << got.status.message();
    Gate<A> want = naive_topk_gating(to_acc_vec(logits), c.T, c.E, c.p, bias);
    ASSERT_EQ(got.experts, want.experts);
    EXPECT_TRUE(all_close(got.scores, want.scores, acc));
    EXPECT_TRUE(all_close(got.weights, want.weights, acc));
  }
}

TEST(TopkGating, ForwardMatchesNaiveF32) { check_forward_against_naive<float>(); }
TEST(TopkGating, ForwardMatchesNaiveF64) { check_forward_against_naive<double>(); }
TEST(TopkGating, ForwardMatchesNaiveBF16) { check_forward_against_naive<bf16_t>(); }
TEST(TopkGating, ForwardMatchesNaiveF16) { check_forward_against_naive<f16_t>(); }

// Mixtral's router takes the top-k of the logits, then a softmax over those k; that is a softmax
// over all E followed by renormalisation of the k picked (the shared partition function cancels).
TEST(TopkGating, MixtralRuleEqualsSoftmaxThenRenormalize) {
  const int64_t T = 257, E = 8, K = 2;
  std::vector<float> logits = uniform<float>(size_t(T * E), 11, -3.f, 3.f);
  Gate<float> got = run_topk(logits, T, E, make_params(K, ScoreFunc::kSoftmax, true));
  ASSERT_TRUE(got.status.ok()) << got.status.message();
  std::vector<float> want_w(static_cast<size_t>(T * K));
  std::vector<int32_t> want_e(static_cast<size_t>(T * K));
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> row(logits.begin() + t * E, logits.begin() + (t + 1) * E);
    std::vector<int32_t> order = order_desc(row);
    float m = row[order[0]], sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += std::exp(row[order[k]] - m);
    for (int64_t k = 0; k < K; ++k) {
      want_e[t * K + k] = order[k];
      want_w[t * K + k] = std::exp(row[order[k]] - m) / sum;
    }
  }
  EXPECT_EQ(got.experts, want_e);
  EXPECT_TRUE(all_close(got.weights, want_w, DType::kF32));
}

// DeepSeek-V3's router (arXiv:2412.19437 section 2.1.2; the released config): 256 experts, sigmoid
// scores, the aux-loss-free bias, 8 groups of which 4 are kept by the sum of their two best biased
// scores, top-8, renormalised with eps 1e-20, scaled by 2.5.
TEST(TopkGating, DeepSeekV3Configuration) {
  const int64_t T = 513, E = 256;
  TopkGatingParams p = make_params(8, ScoreFunc::kSigmoid, true, 2.5f, 8, 4, GroupScore::kTop2Sum, 1e-20f);
  std::vector<float> logits = uniform<float>(size_t(T * E), 21, -4.f, 4.f);
  std::vector<float> bias = uniform<float>(size_t(E), 22, -0.5f, 0.5f);
  Gate<float> got = run_topk(logits, T, E, p, bias);
  ASSERT_TRUE(got.status.ok()) << got.status.message();
  Gate<float> want = naive_topk_gating(logits, T, E, p, bias);
  EXPECT_EQ(got.experts, want.experts);
  EXPECT_TRUE(all_close(got.weights, want.weights, DType::kF32));
  // Renormalised and scaled: each token's weights sum to 2.5.
  for (int64_t t = 0; t < T; ++t) {
    float sum = 0;
    for (int k = 0; k < 8; ++k) sum += got.weights[t * 8 + k];
    EXPECT_NEAR(sum, 2.5f, 1e-5f);
  }
  // Only experts of 4 groups are used per token.
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> groups;
    for (int k = 0; k < 8; ++k) groups.push_back(got.experts[t * 8 + k] / 32);
    std::sort(groups.begin(), groups.end());
    EXPECT_LE(std::unique(groups.begin(), groups.end()) - groups.begin(), 4);
  }
}

// DeepSeek-V2 (arXiv:2405.04434 section 2.1.3): softmax, 160 experts in 8 groups, 3 kept by their
// max score, top-6, no renormalisation, scaling 16.
TEST(TopkGating, DeepSeekV2Configuration) {
  const int64_t T = 129, E = 160;
  TopkGatingParams p = make_params(6, ScoreFunc::kSoftmax, false, 16.0f, 8, 3, GroupScore::kMax);
  std::vector<float> logits = uniform<float>(size_t(T * E), 31, -4.f, 4.f);
  Gate<float> got = run_topk(logits, T, E, p);
  ASSERT_TRUE(got.status.ok()) << got.status.message();
  Gate<float> want = naive_topk_gating(logits, T, E, p, {});
  EXPECT_EQ(got.experts, want.experts);
  EXPECT_TRUE(all_close(got.weights, want.weights, DType::kF32));
}

TEST(TopkGating, AllEqualLogitsPickTheFirstExperts) {
  for (ScoreFunc f : {ScoreFunc::kSoftmax, ScoreFunc::kSigmoid}) {
    for (int K : {1, 3, 12}) {
      for (int groups : {1, 4}) {
        const int64_t T = 7, E = 12;
        const int kept = groups == 1 ? 1 : 3;  // 3 groups of 3 experts reach K = 9 at most
        if (K > kept * (E / groups)) continue;
        std::vector<float> logits(size_t(T * E), 0.5f);
        Gate<float> got = run_topk(logits, T, E, make_params(K, f, false, 1.0f, groups, kept, GroupScore::kTop2Sum));
        ASSERT_TRUE(got.status.ok()) << got.status.message();
        for (int64_t t = 0; t < T; ++t) {
          for (int k = 0; k < K; ++k) EXPECT_EQ(got.experts[t * K + k], k) << "t=" << t << " K=" << K;
        }
      }
    }
  }
}

TEST(TopkGating, GroupTiesGoToTheLowerGroup) {
  // 3 groups of 2 (sigmoid is monotonic, so logits order the scores). Group maxima: 0, 5, 5.
  std::vector<float> logits = {0.f, 0.f, 5.f, 1.f, 5.f, 3.f};
  Gate<float> by_max = run_topk(logits, 1, 6, make_params(1, ScoreFunc::kSigmoid, false, 1.0f, 3, 1, GroupScore::kMax));
  ASSERT_TRUE(by_max.status.ok());
  EXPECT_EQ(by_max.experts[0], 2);  // groups 1 and 2 tie on max: group 1 wins, its best is expert 2
  Gate<float> by_sum =
      run_topk(logits, 1, 6, make_params(1, ScoreFunc::kSigmoid, false, 1.0f, 3, 1, GroupScore::kTop2Sum));
  ASSERT_TRUE(by_sum.status.ok());
  EXPECT_EQ(by_sum.experts[0], 4);  // top-2 sums 6 < 8: group 2, where experts 2 and 4 tie -> 4
  // Exact tie in both group scores: the lower group is kept.
  std::vector<float> tied = {0.f, 0.f, 2.f, 1.f, 1.f, 2.f};
  Gate<float> t = run_topk(tied, 1, 6, make_params(2, ScoreFunc::kSigmoid, false, 1.0f, 3, 1, GroupScore::kTop2Sum));
  ASSERT_TRUE(t.status.ok());
  EXPECT_EQ(t.experts, (std::vector<int32_t>{2, 3}));
}

TEST(TopkGating, BiasChangesSelectionNotWeights) {
  const int64_t E = 4;
  std::vector<float> logits = {3.f, 2.f, 1.f, 0.f};
  std::vector<float> bias = {0.f, 0.f, 0.f, 10.f};
  for (bool renorm : {false, true}) {
    TopkGatingParams p = make_params(2, ScoreFunc::kSoftmax, renorm);
    Gate<float> plain = run_topk(logits, 1, E, p);
    Gate<float> biased = run_topk(logits, 1, E, p, bias);
    ASSERT_TRUE(plain.status.ok() && biased.status.ok());
    EXPECT_EQ(plain.experts, (std::vector<int32_t>{0, 1}));
    EXPECT_EQ(biased.experts, (std::vector<int32_t>{3, 0}));
    EXPECT_TRUE(bitwise_equal(plain.scores, biased.scores));  // scores carry no bias
    // weights are the unbiased scores of the picked experts
    std::vector<float> s = naive_scores(logits, 1, E, ScoreFunc::kSoftmax);
    std::vector<float> want = {s[3], s[0]};
    if (renorm) want = {s[3] / (s[3] + s[0]), s[0] / (s[3] + s[0])};
    EXPECT_TRUE(all_close(biased.weights, want, DType::kF32));
  }
}

TEST(TopkGating, EveryTokenOnOneExpert) {
  const int64_t T = 4097, E = 8;
  std::vector<float> logits = uniform<float>(size_t(T * E), 41, -1.f, 1.f);
  for (int64_t t = 0; t < T; ++t) logits[t * E + 5] = 9.f;
  Gate<float> got = run_topk(logits, T, E, make_params(1, ScoreFunc::kSoftmax, true));
  ASSERT_TRUE(got.status.ok());
  for (int64_t t = 0; t < T; ++t) {
    ASSERT_EQ(got.experts[t], 5);
    ASSERT_EQ(got.weights[t], 1.0f);  // renormalised over one expert
  }
}

TEST(TopkGating, RowPaddedLogits) {
  const int64_t T = 7, E = 7, ld = 11;
  TopkGatingParams p = make_params(3, ScoreFunc::kSigmoid, true);
  std::vector<float> dense = uniform<float>(size_t(T * E), 51);
  std::vector<float> padded(size_t(T * ld), std::numeric_limits<float>::quiet_NaN());
  for (int64_t t = 0; t < T; ++t) std::copy_n(&dense[t * E], E, &padded[t * ld]);
  Gate<float> a = run_topk(dense, T, E, p), b = run_topk(padded, T, E, p, {}, ld);
  ASSERT_TRUE(a.status.ok() && b.status.ok()) << b.status.message();
  EXPECT_EQ(a.experts, b.experts);
  EXPECT_TRUE(bitwise_equal(a.weights, b.weights));
  EXPECT_TRUE(bitwise_equal(a.scores, b.scores));
}

TEST(TopkGating, RowPaddedBackward) {
  const int64_t T = 7, E = 9, K = 3, ld = 13;
  TopkGatingParams p = make_params(int(K), ScoreFunc::kSoftmax, true);
  Gate<float> fw = run_topk(uniform<float>(size_t(T * E), 52), T, E, p);
  ASSERT_TRUE(fw.status.ok());
  std::vector<float> gw = uniform<float>(size_t(T * K), 53), gs = uniform<float>(size_t(T * E), 54);
  std::vector<float> dense = run_topk_backward(fw, T, E, p, gw, gs);
  // the same data with every [T, E] tensor in rows of ld elements
  auto pad = [&](const std::vector<float>& v) {
    std::vector<float> out(size_t(T * ld), std::numeric_limits<float>::quiet_NaN());
    for (int64_t t = 0; t < T; ++t) std::copy_n(&v[t * E], E, &out[t * ld]);
    return out;
  };
  std::vector<float> sp = pad(fw.scores), gsp = pad(gs), gxp(size_t(T * ld), -7.f);
  std::vector<int32_t> ex = fw.experts;
  ASSERT_TRUE(topk_gating_backward(Exec{}, p, view2d(sp, T, E, ld), view2d(ex, T, K), view2d(gw, T, K),
                                   view2d(gsp, T, E, ld), view2d(gxp, T, E, ld))
                  .ok());
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) ASSERT_EQ(gxp[t * ld + e], dense[t * E + e]);
    for (int64_t e = E; e < ld; ++e) ASSERT_EQ(gxp[t * ld + e], -7.f);  // padding untouched
  }
}

TEST(TopkGating, ZeroTokens) {
  std::vector<float> logits;
  Gate<float> got = run_topk(logits, 0, 8, make_params(2, ScoreFunc::kSoftmax, false));
  EXPECT_TRUE(got.status.ok()) << got.status.message();
}

TEST(TopkGating, NaNLogitsNameTheFirstRow) {
  const int64_t T = 4097, E = 16;
  std::vector<float> logits = uniform<float>(size_t(T * E), 61);
  logits[3000 * E + 2] = std::numeric_limits<float>::quiet_NaN();
  logits[1234 * E + 9] = std::numeric_limits<float>::quiet_NaN();
  Gate<float> got = run_topk(logits, T, E, make_params(4, ScoreFunc::kSoftmax, false));
  ASSERT_TRUE(fails_naming(got.status, "logits"));
  EXPECT_NE(got.status.message().find("row 1234"), std::string::npos) << got.status.message();
  for (int32_t e : got.experts) ASSERT_TRUE(e >= 0 && e < E);  // never an out-of-range index
}

TEST(TopkGating, DeterministicAcrossRunsAndThreads) {
  const int64_t T = 4097, E = 64;
  TopkGatingParams p = make_params(6, ScoreFunc::kSigmoid, true, 2.5f, 8, 4, GroupScore::kTop2Sum);
  std::vector<float> logits = uniform<float>(size_t(T * E), 71);
  std::vector<float> bias = uniform<float>(size_t(E), 72, -0.2f, 0.2f);
  std::vector<float> gw = uniform<float>(size_t(T * 6), 73);
  const int threads = cpu::num_threads();
  cpu::set_num_threads(2);
  Gate<float> a = run_topk(logits, T, E, p, bias), b = run_topk(logits, T, E, p, bias);
  std::vector<float> ga = run_topk_backward(a, T, E, p, gw, {});
  cpu::set_num_threads(1);
  Gate<float> c = run_topk(logits, T, E, p, bias);
  std::vector<float> gc = run_topk_backward(c, T, E, p, gw, {});
  cpu::set_num_threads(threads);
  EXPECT_EQ(a.experts, b.experts);
  EXPECT_TRUE(bitwise_equal(a.weights, b.weights));
  EXPECT_EQ(a.experts, c.experts);
  EXPECT_TRUE(bitwise_equal(a.weights, c.weights));
  EXPECT_TRUE(bitwise_equal(a.scores, c.scores));
  EXPECT_TRUE(bitwise_equal(ga, gc));
}

// The public entry point reaches the emulated CUDA kernels with backend kSimt (tests/cpp/cuda holds
// their full suite) and rejects kCuda on CPU tensors.
TEST(TopkGating, SimtBackendMatchesCpuThroughPublicEntry) {
  const int64_t T = 7, E = 8;
  std::vector<float> logits = uniform<float>(size_t(T * E), 11u, -2.f, 2.f);
  const TopkGatingParams p = make_params(2, ScoreFunc::kSoftmax, true);
  Exec simt;
  simt.backend = Backend::kSimt;
  Gate<float> want = run_topk(logits, T, E, p, {});
  Gate<float> got = run_topk(logits, T, E, p, {}, -1, simt);
  ASSERT_TRUE(got.status.ok()) << got.status.message();
  EXPECT_EQ(got.experts, want.experts);
  EXPECT_TRUE(all_close(got.weights, want.weights, DType::kF32));
  Exec cuda;
  cuda.backend = Backend::kCuda;
  Gate<float> bad = run_topk(logits, T, E, p, {}, -1, cuda);
  EXPECT_EQ(bad.status.code(), Code::kInvalidArgument);
  EXPECT_NE(bad.status.message().find("argument 'backend'"), std::string::npos) << bad.status.message();
}

TEST(TopkGating, BadArgumentsAreRejected) {
  const int64_t T = 3, E = 8, K = 2;
  std::vector<float> logits(size_t(T * E), 0.f), w(size_t(T * K)), s(size_t(T * E)), bias(size_t(E), 0.f);
  std::vector<int32_t> ex(static_cast<size_t>(T * K));
  std::vector<int32_t> ilogits(static_cast<size_t>(T * E));
  std::vector<f16_t> w16(static_cast<size_t>(T * K));
  std::vector<double> w64(static_cast<size_t>(T * K));
  const TopkGatingParams ok = make_params(int(K), ScoreFunc::kSoftmax, false);
  auto fwd = [&](TopkGatingParams p, TensorView lg, TensorView b, TensorView wv, TensorView ev, TensorView sv) {
    return topk_gating_forward(Exec{}, p, lg, b, wv, ev, sv);
  };
  TensorView L = view2d(logits, T, E), W = view2d(w, T, K), X = view2d(ex, T, K), S = view2d(s, T, E);
  ASSERT_TRUE(fwd(ok, L, view1d(bias), W, X, S).ok());

  EXPECT_TRUE(fails_naming(fwd(ok, make_view(logits.data(), {T * E}), {}, W, X, S), "logits"));
  EXPECT_TRUE(fails_naming(fwd(ok, view2d(ilogits, T, E), {}, W, X, S), "logits"));
  TensorView Lstrided = L;
  Lstrided.strides[1] = 2;
  EXPECT_TRUE(fails_naming(fwd(ok, Lstrided, {}, W, X, S), "logits"));
  TopkGatingParams p = ok;
  p.top_k = 0;
  EXPECT_TRUE(fails_naming(fwd(p, L, {}, view2d(w, T, 0), view2d(ex, T, 0), S), "params.top_k"));
  p.top_k = 9;
  EXPECT_TRUE(fails_naming(fwd(p, L, {}, W, X, S), "params.top_k"));
  p = ok;
  p.n_groups = 3;
  EXPECT_TRUE(fails_naming(fwd(p, L, {}, W, X, S), "params.n_groups"));
  p = ok;
  p.n_groups = 4;
  p.topk_groups = 0;
  EXPECT_TRUE(fails_naming(fwd(p, L, {}, W, X, S), "params.topk_groups"));
  p.topk_groups = 5;
  EXPECT_TRUE(fails_naming(fwd(p, L, {}, W, X, S), "params.topk_groups"));
  p.n_groups = 8;
  p.topk_groups = 1;  // one group of one expert cannot give K = 2
  EXPECT_TRUE(fails_naming(fwd(p, L, {}, W, X, S), "params.top_k"));
  p = ok;
  p.renorm_eps = -1.f;
  EXPECT_TRUE(fails_naming(fwd(p, L, {}, W, X, S), "params.renorm_eps"));
  p = ok;
  p.routed_scaling = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(fails_naming(fwd(p, L, {}, W, X, S), "params.routed_scaling"));
  p = ok;
  p.score_func = static_cast<ScoreFunc>(7);
  EXPECT_TRUE(fails_naming(fwd(p, L, {}, W, X, S), "params.score_func"));
  p = ok;
  p.group_score = static_cast<GroupScore>(7);
  EXPECT_TRUE(fails_naming(fwd(p, L, {}, W, X, S), "params.group_score"));

  EXPECT_TRUE(fails_naming(fwd(ok, L, make_view(bias.data(), {E - 1}), W, X, S), "bias"));
  EXPECT_TRUE(fails_naming(fwd(ok, L, make_view(w64.data(), {E}), W, X, S), "bias"));
  std::vector<float> nan_bias(size_t(E), 0.f);
  nan_bias[3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(fails_naming(fwd(ok, L, view1d(nan_bias), W, X, S), "bias"));
  EXPECT_TRUE(fails_naming(fwd(ok, L, {}, view2d(w16, T, K), X, S), "weights"));
  EXPECT_TRUE(fails_naming(fwd(ok, L, {}, view2d(w64, T, K), X, S), "weights"));  // f32 logits: f32 weights
  EXPECT_TRUE(fails_naming(fwd(ok, L, {}, view2d(w, T - 1, K), X, S), "weights"));
  EXPECT_TRUE(fails_naming(fwd(ok, L, {}, W, view2d(w, T, K), S), "experts"));
  EXPECT_TRUE(fails_naming(fwd(ok, L, {}, W, view2d(ex, T, K - 1), S), "experts"));
  EXPECT_TRUE(fails_naming(fwd(ok, L, {}, W, X, view2d(s, T, E - 1)), "scores"));
  EXPECT_TRUE(fails_naming(fwd(ok, L, {}, W, X, TensorView{}), "scores"));
  TensorView Lcuda = L;
  Lcuda.device = Device::kCUDA;
  EXPECT_TRUE(fails_naming(fwd(ok, Lcuda, {}, W, X, S), "weights"));  // weights on another device

  // backward
  std::vector<float> gx(static_cast<size_t>(T * E)), gw(size_t(T * K), 1.f);
  std::vector<double> gx64(static_cast<size_t>(T * E));
  auto bwd = [&](TensorView sv, TensorView ev, TensorView gwv, TensorView gsv, TensorView gxv) {
    return topk_gating_backward(Exec{}, ok, sv, ev, gwv, gsv, gxv);
  };
  ASSERT_TRUE(fwd(ok, L, {}, W, X, S).ok());
  TensorView GX = view2d(gx, T, E), GW = view2d(gw, T, K);
  ASSERT_TRUE(bwd(S, X, GW, {}, GX).ok());
  EXPECT_TRUE(fails_naming(bwd(view2d(ilogits, T, E), X, GW, {}, GX), "scores"));
  EXPECT_TRUE(fails_naming(bwd(S, X, view2d(gw, T, 1), {}, GX), "grad_weights"));
  EXPECT_TRUE(fails_naming(bwd(S, X, GW, view2d(gx, T, E - 1), GX), "grad_scores"));
  EXPECT_TRUE(fails_naming(bwd(S, X, GW, {}, view2d(gx64, T, E)), "grad_logits"));
  std::vector<int32_t> bad = ex;
  bad[2 * K + 1] = int32_t(E);
  EXPECT_TRUE(fails_naming(bwd(S, view2d(bad, T, K), GW, {}, GX), "experts"));
  bad[2 * K + 1] = -1;
  Status st = bwd(S, view2d(bad, T, K), GW, {}, GX);
  EXPECT_TRUE(fails_naming(st, "experts"));
  EXPECT_NE(st.message().find("row 2"), std::string::npos) << st.message();
}

// ---- topk_gating backward -----------------------------------------------------------------------

TEST(TopkGating, BackwardMatchesNaiveJacobian) {
  uint32_t seed = 100;
  for (const Case& c : forward_cases()) {
    if (c.T > 300) continue;  // the Jacobian reference is O(T E^2)
    SCOPED_TRACE(::testing::Message() << "T=" << c.T << " E=" << c.E << " K=" << c.p.top_k
                                      << " func=" << int(c.p.score_func) << " renorm=" << c.p.renormalize);
    const int64_t K = c.p.top_k;
    std::vector<float> logits = uniform<float>(size_t(c.T * c.E), seed++, -3.f, 3.f);
    std::vector<float> bias = c.bias ? uniform<float>(size_t(c.E), seed++, -0.1f, 0.1f) : std::vector<float>{};
    Gate<float> fw = run_topk(logits, c.T, c.E, c.p, bias);
    ASSERT_TRUE(fw.status.ok()) << fw.status.message();
    std::vector<float> gw = uniform<float>(size_t(c.T * K), seed++);
    std::vector<float> gs = uniform<float>(size_t(c.T * c.E), seed++);
    for (int variant = 0; variant < 3; ++variant) {  // weights only, scores only, both
      std::vector<float> w_in = variant == 1 ? std::vector<float>{} : gw;
      std::vector<float> s_in = variant == 0 ? std::vector<float>{} : gs;
      std::vector<float> got = run_topk_backward(fw, c.T, c.E, c.p, w_in, s_in);
      std::vector<float> want = naive_topk_gating_backward(fw.scores, fw.experts, c.T, c.E, c.p, w_in, s_in);
      EXPECT_TRUE(all_close(got, want, DType::kF32)) << "variant " << variant;
    }
  }
}

TEST(TopkGating, BackwardWithoutGradientsIsZero) {
  const int64_t T = 5, E = 7;
  TopkGatingParams p = make_params(2, ScoreFunc::kSoftmax, true);
  Gate<float> fw = run_topk(uniform<float>(size_t(T * E), 5), T, E, p);
  ASSERT_TRUE(fw.status.ok());
  std::vector<float> got = run_topk_backward(fw, T, E, p, {}, {});
  EXPECT_EQ(got, std::vector<float>(size_t(T * E), 0.f));
}

// Loss L(x) = <rw, weights(x)> + <rs, scores(x)>: the backward with (rw, rs) is dL/dx. Compared with
// central differences in f64 (step 1e-6: truncation ~1e-12, rounding ~1e-10).
void check_topk_gradient(const TopkGatingParams& p, int64_t T, int64_t E, bool with_bias, bool with_gs, uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << "T=" << T << " E=" << E << " K=" << p.top_k << " func=" << int(p.score_func)
                                    << " renorm=" << p.renormalize << " bias=" << with_bias
                                    << " grad_scores=" << with_gs << " groups=" << p.n_groups);
  const int64_t K = p.top_k;
  std::vector<double> x = uniform<double>(size_t(T * E), seed, -2.f, 2.f);
  std::vector<float> bias = with_bias ? uniform<float>(size_t(E), seed + 1, -0.3f, 0.3f) : std::vector<float>{};
  std::vector<double> rw = uniform<double>(size_t(T * K), seed + 2);
  std::vector<double> rs = with_gs ? uniform<double>(size_t(T * E), seed + 3) : std::vector<double>{};
  Gate<double> fw = run_topk(x, T, E, p, bias);
  ASSERT_TRUE(fw.status.ok()) << fw.status.message();
  std::vector<double> grad = run_topk_backward(fw, T, E, p, rw, rs);
  auto loss = [&](const std::vector<double>& xv) {
    Gate<double> g = run_topk(xv, T, E, p, bias);
    EXPECT_EQ(g.experts, fw.experts);  // the step must not change the selection
    double l = 0;
    for (size_t i = 0; i < rw.size(); ++i) l += rw[i] * g.weights[i];
    for (size_t i = 0; i < rs.size(); ++i) l += rs[i] * g.scores[i];
    return l;
  };
  const double h = 1e-6;
  for (size_t i = 0; i < x.size(); ++i) {
    std::vector<double> xp = x, xm = x;
    xp[i] += h;
    xm[i] -= h;
    const double fd = (loss(xp) - loss(xm)) / (2 * h);
    EXPECT_NEAR(grad[i], fd, 1e-7 + 1e-6 * std::fabs(fd)) << "element " << i;
  }
}

TEST(TopkGating, GradientMatchesFiniteDifferences) {
  uint32_t seed = 200;
  for (ScoreFunc f : {ScoreFunc::kSoftmax, ScoreFunc::kSigmoid}) {
    for (bool renorm : {false, true}) {
      for (bool with_bias : {false, true}) {
        check_topk_gradient(make_params(2, f, renorm, 1.0f), 3, 4, with_bias, false, seed += 4);
        check_topk_gradient(make_params(3, f, renorm, 2.5f, 1, 1, GroupScore::kMax, 1e-3f), 5, 7, with_bias, true,
                            seed += 4);
        check_topk_gradient(make_params(2, f, renorm, 1.5f, 3, 2, GroupScore::kTop2Sum), 4, 6, with_bias, true,
                            seed += 4);
      }
    }
  }
}

// ---- expert choice ------------------------------------------------------------------------------

template <class A>
struct Choice {
  std::vector<A> scores, weights;
  std::vector<int32_t> tokens, row_of;
  Status status;
};

template <class In>
Choice<Acc<In>> run_expert_choice(std::vector<In> logits, int64_t T, int64_t E, ExpertChoiceParams p) {
  using A = Acc<In>;
  Choice<A> c;
  const int64_t C = p.capacity;
  c.scores.assign(size_t(T * E), A(-7));
  c.weights.assign(size_t(T * E), A(-7));
  c.tokens.assign(size_t(E * std::max<int64_t>(C, 0)), -7);
  c.row_of.assign(size_t(T * E), -7);
  c.status = expert_choice_forward(Exec{}, p, view2d(logits, T, E), view2d(c.scores, T, E), view2d(c.tokens, E, C),
                                   view2d(c.row_of, T, E), view2d(c.weights, T, E));
  return c;
}

template <class A>
Choice<A> naive_expert_choice(const std::vector<A>& x, int64_t T, int64_t E, const ExpertChoiceParams& p) {
  Choice<A> c;
  const int64_t C = p.capacity;
  c.scores = naive_scores(x, T, E, p.score_func);
  c.weights.assign(size_t(T * E), A(0));
  c.row_of.assign(size_t(T * E), -1);
  c.tokens.resize(size_t(E * C));
  for (int64_t e = 0; e < E; ++e) {
    std::vector<A> col(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) col[t] = c.scores[t * E + e];
    std::vector<int32_t> order = order_desc(col);
    for (int64_t j = 0; j < C; ++j) {
      const int32_t t = order[j];
      c.tokens[e * C + j] = t;
      c.row_of[t * E + e] = int32_t(e * C + j);
      c.weights[t * E + e] = col[t];
    }
  }
  return c;
}

template <class A>
std::vector<A> run_expert_choice_backward(Choice<A> fw, int64_t T, int64_t E, ExpertChoiceParams p, std::vector<A> gw) {
  std::vector<A> gx(size_t(T * E), A(-7));
  Status s = expert_choice_backward(Exec{}, p, view2d(fw.scores, T, E), view2d(fw.row_of, T, E), view2d(gw, T, E),
                                    TensorView{}, view2d(gx, T, E));
  EXPECT_TRUE(s.ok()) << s.message();
  return gx;
}

template <class In>
void check_expert_choice_against_naive() {
  using A = Acc<In>;
  uint32_t seed = 300;
  struct EC {
    int64_t T, E, C;
    bool ints;
  };
  for (ScoreFunc f : {ScoreFunc::kSoftmax, ScoreFunc::kSigmoid}) {
    for (EC c : {EC{1, 1, 1}, EC{7, 7, 1}, EC{7, 7, 7}, EC{7, 3, 4, true}, EC{4097, 8, 1024}, EC{4097, 8, 5, true},
                 EC{100, 300, 17}, EC{33, 1, 33}}) {
      SCOPED_TRACE(::testing::Message() << "T=" << c.T << " E=" << c.E << " C=" << c.C << " func=" << int(f) << " "
                                        << dtype_name(DTypeOf<In>::value));
      ExpertChoiceParams p{int32_t(c.C), f};
      std::vector<In> x =
          c.ints ? small_ints<In>(size_t(c.T * c.E), seed++) : uniform<In>(size_t(c.T * c.E), seed++, -3.f, 3.f);
      Choice<A> got = run_expert_choice(x, c.T, c.E, p);
      ASSERT_TRUE(got.status.ok()) << got.status.message();
      Choice<A> want = naive_expert_choice(to_acc_vec(x), c.T, c.E, p);
      ASSERT_EQ(got.tokens, want.tokens);
      ASSERT_EQ(got.row_of, want.row_of);
      EXPECT_TRUE(all_close(got.scores, want.scores, DTypeOf<A>::value));
      EXPECT_TRUE(all_close(got.weights, want.weights, DTypeOf<A>::value));
    }
  }
}

TEST(ExpertChoice, ForwardMatchesNaiveF32) { check_expert_choice_against_naive<float>(); }
TEST(ExpertChoice, ForwardMatchesNaiveBF16) { check_expert_choice_against_naive<bf16_t>(); }
TEST(ExpertChoice, ForwardMatchesNaiveF64) { check_expert_choice_against_naive<double>(); }

TEST(ExpertChoice, TiesGoToTheLowerToken) {
  const int64_t T = 9, E = 3, C = 4;
  std::vector<float> logits(size_t(T * E), 1.f);
  Choice<float> got = run_expert_choice(logits, T, E, ExpertChoiceParams{int32_t(C), ScoreFunc::kSigmoid});
  ASSERT_TRUE(got.status.ok());
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t c = 0; c < C; ++c) EXPECT_EQ(got.tokens[e * C + c], c);
  }
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) EXPECT_EQ(got.row_of[t * E + e], t < C ? int32_t(e * C + t) : -1);
  }
}

TEST(ExpertChoice, BackwardMatchesNaiveAndFiniteDifferences) {
  for (ScoreFunc f : {ScoreFunc::kSoftmax, ScoreFunc::kSigmoid}) {
    for (int64_t C : {1, 2, 5}) {
      const int64_t T = 5, E = 6;
      ExpertChoiceParams p{int32_t(C), f};
      std::vector<double> x = uniform<double>(size_t(T * E), uint32_t(400 + C), -2.f, 2.f);
      std::vector<double> rw = uniform<double>(size_t(T * E), uint32_t(500 + C));
      Choice<double> fw = run_expert_choice(x, T, E, p);
      ASSERT_TRUE(fw.status.ok());
      std::vector<double> grad = run_expert_choice_backward(fw, T, E, p, rw);
      // naive: grad_scores = rw masked by the choice, then the score Jacobian
      TopkGatingParams jp = make_params(1, f, false);
      std::vector<int32_t> dummy_experts(size_t(T), 0);
      std::vector<double> masked(static_cast<size_t>(T * E));
      for (int64_t i = 0; i < T * E; ++i) masked[i] = fw.row_of[i] >= 0 ? rw[i] : 0.0;
      std::vector<double> want = naive_topk_gating_backward(fw.scores, dummy_experts, T, E, jp, {}, masked);
      EXPECT_TRUE(all_close(grad, want, DType::kF64));
      auto loss = [&](const std::vector<double>& xv) {
        Choice<double> c = run_expert_choice(xv, T, E, p);
        EXPECT_EQ(c.tokens, fw.tokens);
        double l = 0;
        for (size_t i = 0; i < rw.size(); ++i) l += rw[i] * c.weights[i];
        return l;
      };
      const double h = 1e-6;
      for (size_t i = 0; i < x.size(); ++i) {
        std::vector<double> xp = x, xm = x;
        xp[i] += h;
        xm[i] -= h;
        const double fd = (loss(xp) - loss(xm)) / (2 * h);
        EXPECT_NEAR(grad[i], fd, 1e-7 + 1e-6 * std::fabs(fd)) << "C=" << C << " element " << i;
      }
    }
  }
}

TEST(ExpertChoice, DeterministicAcrossThreads) {
  const int64_t T = 4097, E = 16, C = 600;
  std::vector<float> x = uniform<float>(size_t(T * E), 77);
  const int threads = cpu::num_threads();
  cpu::set_num_threads(2);
  Choice<float> a = run_expert_choice(x, T, E, ExpertChoiceParams{int32_t(C), ScoreFunc::kSoftmax});
  cpu::set_num_threads(1);
  Choice<float> b = run_expert_choice(x, T, E, ExpertChoiceParams{int32_t(C), ScoreFunc::kSoftmax});
  cpu::set_num_threads(threads);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.row_of, b.row_of);
  EXPECT_TRUE(bitwise_equal(a.weights, b.weights));
}

TEST(ExpertChoice, BadArgumentsAreRejected) {
  const int64_t T = 4, E = 3, C = 2;
  std::vector<float> x(size_t(T * E), 0.f), s(size_t(T * E)), w(size_t(T * E)), gx(size_t(T * E));
  std::vector<int32_t> tk(static_cast<size_t>(E * C)), ro(size_t(T * E));
  auto fwd = [&](int64_t cap, TensorView tkv, TensorView rov, TensorView wv) {
    return expert_choice_forward(Exec{}, ExpertChoiceParams{int32_t(cap), ScoreFunc::kSoftmax}, view2d(x, T, E),
                                 view2d(s, T, E), tkv, rov, wv);
  };
  ASSERT_TRUE(fwd(C, view2d(tk, E, C), view2d(ro, T, E), view2d(w, T, E)).ok());
  EXPECT_TRUE(fails_naming(fwd(0, view2d(tk, E, 0), view2d(ro, T, E), view2d(w, T, E)), "params.capacity"));
  EXPECT_TRUE(fails_naming(fwd(T + 1, view2d(tk, E, C), view2d(ro, T, E), view2d(w, T, E)), "params.capacity"));
  EXPECT_TRUE(fails_naming(fwd(C, view2d(tk, E, C + 1), view2d(ro, T, E), view2d(w, T, E)), "tokens"));
  EXPECT_TRUE(fails_naming(fwd(C, view2d(tk, E, C), view2d(w, T, E), view2d(w, T, E)), "row_of"));
  EXPECT_TRUE(fails_naming(fwd(C, view2d(tk, E, C), view2d(ro, T, E), view2d(ro, T, E)), "weights"));
  x[7] = std::numeric_limits<float>::quiet_NaN();
  Status st = fwd(C, view2d(tk, E, C), view2d(ro, T, E), view2d(w, T, E));
  EXPECT_TRUE(fails_naming(st, "logits"));
  EXPECT_NE(st.message().find("row 2"), std::string::npos) << st.message();
  x[7] = 0.f;
  ASSERT_TRUE(fwd(C, view2d(tk, E, C), view2d(ro, T, E), view2d(w, T, E)).ok());
  auto bwd = [&](TensorView rov) {
    return expert_choice_backward(Exec{}, ExpertChoiceParams{int32_t(C), ScoreFunc::kSoftmax}, view2d(s, T, E), rov,
                                  view2d(w, T, E), TensorView{}, view2d(gx, T, E));
  };
  ASSERT_TRUE(bwd(view2d(ro, T, E)).ok());
  std::vector<int32_t> bad = ro;
  bad[1 * E + 2] = 0;  // column 2 may only hold rows [4, 6)
  EXPECT_TRUE(fails_naming(bwd(view2d(bad, T, E)), "row_of"));
  EXPECT_TRUE(fails_naming(bwd(view2d(bad, T, E - 1)), "row_of"));
}

// ---- load-balancing loss ------------------------------------------------------------------------

template <class A>
double naive_lb_loss(const std::vector<A>& probs, const std::vector<int32_t>& experts, int64_t T, int64_t E,
                     int64_t K) {
  double loss = 0;
  for (int64_t e = 0; e < E; ++e) {
    double f = 0, P = 0;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t k = 0; k < K; ++k) f += experts[t * K + k] == e ? 1.0 : 0.0;
      P += double(probs[t * E + e]);
    }
    loss += (f / double(T)) * (P / double(T));
  }
  return double(E) * loss;
}

TEST(LoadBalancingLoss, ForwardMatchesNaive) {
  for (auto [T, E, K] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {7, 7, 2}, {4097, 8, 2}, {300, 300, 8}}) {
    SCOPED_TRACE(::testing::Message() << "T=" << T << " E=" << E << " K=" << K);
    std::vector<float> logits = uniform<float>(size_t(T * E), uint32_t(T + E), -2.f, 2.f);
    TopkGatingParams p = make_params(int(K), ScoreFunc::kSoftmax, false);
    Gate<float> g = run_topk(logits, T, E, p);
    ASSERT_TRUE(g.status.ok());
    float loss = -1.f;
    Status st =
        load_balancing_loss_forward(Exec{}, view2d(g.scores, T, E), view2d(g.experts, T, K), make_view(&loss, {1}));
    ASSERT_TRUE(st.ok()) << st.message();
    const double want = naive_lb_loss(g.scores, g.experts, T, E, K);
    EXPECT_NEAR(loss, want, 1e-5 * std::fabs(want) + 1e-6);
  }
  // Perfectly uniform routing and probabilities: loss = K (its minimum for a fixed K).
  const int64_t T = 8, E = 4, K = 2;
  std::vector<float> probs(size_t(T * E), 0.25f);
  std::vector<int32_t> ex(static_cast<size_t>(T * K));
  for (int64_t i = 0; i < T * K; ++i) ex[i] = int32_t(i % E);
  float loss = -1.f;
  ASSERT_TRUE(load_balancing_loss_forward(Exec{}, view2d(probs, T, E), view2d(ex, T, K), make_view(&loss, {})).ok());
  EXPECT_EQ(loss, 2.0f);
}

TEST(LoadBalancingLoss, ZeroTokensGiveZero) {
  std::vector<float> probs;
  std::vector<int32_t> ex;
  float loss = -1.f;
  ASSERT_TRUE(load_balancing_loss_forward(Exec{}, view2d(probs, 0, 4), view2d(ex, 0, 2), make_view(&loss, {})).ok());
  EXPECT_EQ(loss, 0.f);
}

TEST(LoadBalancingLoss, BackwardMatchesFiniteDifferences) {
  const int64_t T = 5, E = 7, K = 3;
  std::vector<double> probs = uniform<double>(size_t(T * E), 601, 0.f, 1.f);
  std::vector<int32_t> ex = small_ints<int32_t>(size_t(T * K), 602, 0, int(E) - 1);
  double gl = 1.7, loss0 = 0;
  std::vector<double> grad(size_t(T * E), -7.0);
  ASSERT_TRUE(load_balancing_loss_backward(Exec{}, view2d(probs, T, E), view2d(ex, T, K), make_view(&gl, {1}),
                                           view2d(grad, T, E))
                  .ok());
  auto loss = [&](std::vector<double> pv) {
    double l = 0;
    EXPECT_TRUE(load_balancing_loss_forward(Exec{}, view2d(pv, T, E), view2d(ex, T, K), make_view(&l, {})).ok());
    return l;
  };
  loss0 = loss(probs);
  EXPECT_NEAR(loss0, naive_lb_loss(probs, ex, T, E, K), 1e-12);
  const double h = 1e-6;
  for (size_t i = 0; i < probs.size(); ++i) {
    std::vector<double> pp = probs, pm = probs;
    pp[i] += h;
    pm[i] -= h;
    const double fd = gl * (loss(pp) - loss(pm)) / (2 * h);
    EXPECT_NEAR(grad[i], fd, 1e-7 + 1e-6 * std::fabs(fd)) << "element " << i;
  }
}

TEST(LoadBalancingLoss, BadArgumentsAreRejected) {
  const int64_t T = 3, E = 4, K = 2;
  std::vector<float> probs(size_t(T * E), 0.25f), grad(size_t(T * E));
  std::vector<int32_t> ex = {0, 1, 2, 3, 0, 4};
  float loss[2] = {0, 0};
  float gl = 1.f;
  double loss64 = 0;
  Status st = load_balancing_loss_forward(Exec{}, view2d(probs, T, E), view2d(ex, T, K), make_view(loss, {}));
  EXPECT_TRUE(fails_naming(st, "experts"));
  EXPECT_NE(st.message().find("row 2"), std::string::npos) << st.message();
  ex[5] = -1;
  EXPECT_TRUE(fails_naming(load_balancing_loss_backward(Exec{}, view2d(probs, T, E), view2d(ex, T, K),
                                                        make_view(&gl, {}), view2d(grad, T, E)),
                           "experts"));
  ex[5] = 1;
  EXPECT_TRUE(fails_naming(
      load_balancing_loss_forward(Exec{}, view2d(probs, T, E), view2d(ex, T, K), make_view(loss, {2})), "loss"));
  EXPECT_TRUE(fails_naming(
      load_balancing_loss_forward(Exec{}, view2d(probs, T, E), view2d(ex, T, K), make_view(&loss64, {})), "loss"));
  EXPECT_TRUE(fails_naming(
      load_balancing_loss_forward(Exec{}, view2d(probs, T, E), view2d(ex, T - 1, K), make_view(loss, {})), "experts"));
  EXPECT_TRUE(fails_naming(load_balancing_loss_forward(Exec{}, view2d(ex, T, K), view2d(ex, T, K), make_view(loss, {})),
                           "probs"));
  EXPECT_TRUE(fails_naming(
      load_balancing_loss_backward(Exec{}, view2d(probs, T, E), view2d(ex, T, K), TensorView{}, view2d(grad, T, E)),
      "grad_loss"));
  EXPECT_TRUE(fails_naming(load_balancing_loss_backward(Exec{}, view2d(probs, T, E), view2d(ex, T, K),
                                                        make_view(&gl, {}), view2d(grad, T, E - 1)),
                           "grad_probs"));
}

// ---- z-loss -------------------------------------------------------------------------------------

template <class A>
double naive_z_loss(const std::vector<A>& x, int64_t T, int64_t E) {
  double acc = 0;
  for (int64_t t = 0; t < T; ++t) {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t e = 0; e < E; ++e) m = std::max(m, double(to_acc(x[t * E + e])));
    double s = 0;
    for (int64_t e = 0; e < E; ++e) s += std::exp(double(to_acc(x[t * E + e])) - m);
    const double z = m + std::log(s);
    acc += z * z;
  }
  return acc / double(T);
}

TEST(ZLoss, ForwardMatchesNaive) {
  for (auto [T, E] : {std::pair<int64_t, int64_t>{1, 1}, {7, 7}, {4097, 8}, {65, 300}}) {
    std::vector<float> x = uniform<float>(size_t(T * E), uint32_t(700 + E), -5.f, 5.f);
    float loss = -1.f;
    ASSERT_TRUE(z_loss_forward(Exec{}, view2d(x, T, E), make_view(&loss, {})).ok());
    const double want = naive_z_loss(x, T, E);
    EXPECT_NEAR(loss, want, 1e-5 * std::fabs(want)) << "T=" << T << " E=" << E;
    std::vector<bf16_t> xb = uniform<bf16_t>(size_t(T * E), uint32_t(800 + E), -5.f, 5.f);
    ASSERT_TRUE(z_loss_forward(Exec{}, view2d(xb, T, E), make_view(&loss, {1})).ok());
    const double want_b = naive_z_loss(xb, T, E);
    EXPECT_NEAR(loss, want_b, 1e-5 * std::fabs(want_b)) << "bf16 T=" << T << " E=" << E;
  }
  // Large logits: the max is subtracted first, so no overflow. lse = 1000 + log 2.
  std::vector<float> big = {1000.f, 1000.f};
  float loss = 0;
  ASSERT_TRUE(z_loss_forward(Exec{}, view2d(big, 1, 2), make_view(&loss, {})).ok());
  EXPECT_NEAR(loss, std::pow(1000.0 + std::log(2.0), 2), 1e-1);
  std::vector<float> none;
  ASSERT_TRUE(z_loss_forward(Exec{}, view2d(none, 0, 4), make_view(&loss, {})).ok());
  EXPECT_EQ(loss, 0.f);
}

TEST(ZLoss, BackwardMatchesFiniteDifferences) {
  const int64_t T = 4, E = 5;
  std::vector<double> x = uniform<double>(size_t(T * E), 901, -3.f, 3.f);
  double gl = 0.6;
  std::vector<double> grad(size_t(T * E), -7.0);
  ASSERT_TRUE(z_loss_backward(Exec{}, view2d(x, T, E), make_view(&gl, {}), view2d(grad, T, E)).ok());
  const double h = 1e-6;
  for (size_t i = 0; i < x.size(); ++i) {
    std::vector<double> xp = x, xm = x;
    xp[i] += h;
    xm[i] -= h;
    const double fd = gl * (naive_z_loss(xp, T, E) - naive_z_loss(xm, T, E)) / (2 * h);
    EXPECT_NEAR(grad[i], fd, 1e-7 + 1e-6 * std::fabs(fd)) << "element " << i;
  }
}

TEST(ZLoss, BadArgumentsAndDeterminism) {
  const int64_t T = 4097, E = 16;
  std::vector<float> x = uniform<float>(size_t(T * E), 911, -3.f, 3.f), grad(size_t(T * E));
  float loss1 = 0, loss2 = 0, gl = 1.f;
  double gl64 = 1.0;
  const int threads = cpu::num_threads();
  cpu::set_num_threads(2);
  ASSERT_TRUE(z_loss_forward(Exec{}, view2d(x, T, E), make_view(&loss1, {})).ok());
  cpu::set_num_threads(1);
  ASSERT_TRUE(z_loss_forward(Exec{}, view2d(x, T, E), make_view(&loss2, {})).ok());
  cpu::set_num_threads(threads);
  EXPECT_EQ(std::memcmp(&loss1, &loss2, sizeof(float)), 0);
  EXPECT_TRUE(
      fails_naming(z_loss_backward(Exec{}, view2d(x, T, E), make_view(&gl64, {}), view2d(grad, T, E)), "grad_loss"));
  EXPECT_TRUE(fails_naming(z_loss_backward(Exec{}, view2d(x, T, E), make_view(&gl, {}), view2d(grad, T, E - 1)),
                           "grad_logits"));
  EXPECT_TRUE(fails_naming(z_loss_forward(Exec{}, view2d(x, T, E), TensorView{}), "loss"));
  x[10 * E + 3] = std::numeric_limits<float>::quiet_NaN();
  Status st = z_loss_forward(Exec{}, view2d(x, T, E), make_view(&loss1, {}));
  EXPECT_TRUE(fails_naming(st, "logits"));
  EXPECT_NE(st.message().find("row 10"), std::string::npos) << st.message();
}

// ---- balancing bias update ----------------------------------------------------------------------

TEST(BalancingBiasUpdate, MovesTowardsTheMean) {
  std::vector<int32_t> counts = {4, 0, 2, 2, 7};  // mean 3
  std::vector<float> bias = {0.5f, 0.f, -1.f, 0.f, 0.25f};
  ASSERT_TRUE(balancing_bias_update(Exec{}, view1d(counts), view1d(bias), 0.25f).ok());
  EXPECT_EQ(bias, (std::vector<float>{0.25f, 0.25f, -0.75f, 0.25f, 0.f}));
  std::vector<int32_t> even = {3, 3};
  std::vector<float> b2 = {1.f, 2.f};
  ASSERT_TRUE(balancing_bias_update(Exec{}, view1d(even), view1d(b2), 0.5f).ok());
  EXPECT_EQ(b2, (std::vector<float>{1.f, 2.f}));  // at the mean: sign 0
}

TEST(BalancingBiasUpdate, BadArgumentsAreRejected) {
  std::vector<int32_t> counts = {1, -2, 3};
  std::vector<float> bias(3, 0.f), short_bias(2, 0.f);
  EXPECT_TRUE(fails_naming(balancing_bias_update(Exec{}, view1d(counts), view1d(bias), 0.1f), "counts"));
  counts[1] = 2;
  EXPECT_TRUE(fails_naming(balancing_bias_update(Exec{}, view1d(counts), view1d(short_bias), 0.1f), "bias"));
  EXPECT_TRUE(fails_naming(balancing_bias_update(Exec{}, view1d(counts), view1d(bias), NAN), "rate"));
  EXPECT_TRUE(fails_naming(balancing_bias_update(Exec{}, view1d(bias), view1d(bias), 0.1f), "counts"));
}

// ---- expert choice backward with grad_scores (issue 8) --------------------------------------------

// grad_logits from a full Jacobian of the score function, written out in the test:
// softmax  d s_i / d x_j = s_i (delta_ij - s_j);  sigmoid  d s_i / d x_j = delta_ij s_i (1 - s_i).
std::vector<double> jacobian_backward(const std::vector<double>& s, const std::vector<double>& g, int64_t T, int64_t E,
                                      ScoreFunc f) {
  std::vector<double> dx(size_t(T * E), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < E; ++j) {
      double acc = 0;
      for (int64_t i = 0; i < E; ++i) {
        const double si = s[t * E + i], sj = s[t * E + j];
        const double J = f == ScoreFunc::kSoftmax ? si * ((i == j ? 1.0 : 0.0) - sj) : (i == j ? si * (1 - si) : 0.0);
        acc += g[t * E + i] * J;
      }
      dx[t * E + j] = acc;
    }
  }
  return dx;
}

TEST(ExpertChoice, BackwardAddsGradScoresAndTakesEitherInputAbsent) {
  const int64_t T = 7, E = 5, C = 3;
  for (ScoreFunc f : {ScoreFunc::kSoftmax, ScoreFunc::kSigmoid}) {
    const ExpertChoiceParams p{int32_t(C), f};
    std::vector<double> x = uniform<double>(size_t(T * E), 610, -2.f, 2.f);
    std::vector<double> rw = uniform<double>(size_t(T * E), 611), rs = uniform<double>(size_t(T * E), 612);
    Choice<double> fw = run_expert_choice(x, T, E, p);
    ASSERT_TRUE(fw.status.ok());
    for (int variant = 0; variant < 4; ++variant) {  // both, weights only, scores only, neither
      const bool use_w = variant == 0 || variant == 1, use_s = variant == 0 || variant == 2;
      std::vector<double> g(size_t(T * E), 0.0);
      for (int64_t i = 0; i < T * E; ++i) {
        g[i] = (use_w && fw.row_of[i] >= 0 ? rw[i] : 0.0) + (use_s ? rs[i] : 0.0);
      }
      const std::vector<double> want = jacobian_backward(fw.scores, g, T, E, f);
      std::vector<double> got(size_t(T * E), std::numeric_limits<double>::quiet_NaN());  // every element written
      const Status st = expert_choice_backward(Exec{}, p, view2d(fw.scores, T, E), view2d(fw.row_of, T, E),
                                               use_w ? view2d(rw, T, E) : TensorView{},
                                               use_s ? view2d(rs, T, E) : TensorView{}, view2d(got, T, E));
      ASSERT_TRUE(st.ok()) << st.message();
      EXPECT_TRUE(all_close(got, want, DType::kF64)) << "score_func " << int(f) << ", variant " << variant;
      if (variant == 3) {
        for (double v : got) EXPECT_EQ(v, 0.0);
      }
    }
    // Finite differences of L = <rw, weights> + <rs, scores> (the choice is locally constant).
    std::vector<double> got(size_t(T * E));
    ASSERT_TRUE(expert_choice_backward(Exec{}, p, view2d(fw.scores, T, E), view2d(fw.row_of, T, E), view2d(rw, T, E),
                                       view2d(rs, T, E), view2d(got, T, E))
                    .ok());
    auto loss = [&](const std::vector<double>& xv) {
      Choice<double> c = run_expert_choice(xv, T, E, p);
      double l = 0;
      for (size_t i = 0; i < rw.size(); ++i) l += rw[i] * c.weights[i] + rs[i] * c.scores[i];
      return l;
    };
    const double h = 1e-6;
    for (size_t i = 0; i < x.size(); ++i) {
      std::vector<double> xp = x, xm = x;
      xp[i] += h, xm[i] -= h;
      EXPECT_NEAR(got[i], (loss(xp) - loss(xm)) / (2 * h), 1e-6) << "element " << i;
    }
  }
  // grad_scores is checked like grad_weights.
  std::vector<float> s(size_t(T * E), 0.2f), gl(size_t(T * E)), bad(size_t(T * (E + 1)));
  std::vector<int32_t> ro(size_t(T * E), -1);
  EXPECT_TRUE(
      fails_naming(expert_choice_backward(Exec{}, ExpertChoiceParams{int32_t(C), ScoreFunc::kSoftmax}, view2d(s, T, E),
                                          view2d(ro, T, E), TensorView{}, view2d(bad, T, E + 1), view2d(gl, T, E)),
                   "grad_scores"));
}

// ---- router-loss workspace queries (SPEC B) --------------------------------------------------------

TEST(RouterLossWorkspace, QueriesFollowTheFormula) {
  auto align256 = [](int64_t b) { return (b + 255) / 256 * 256; };
  for (int64_t T :
       {int64_t(0), int64_t(1), int64_t(255), int64_t(256), int64_t(65536), int64_t(65537), int64_t(1) << 20}) {
    for (int64_t E : {int64_t(0), int64_t(1), int64_t(8), int64_t(257)}) {
      const int64_t chunk = T <= 65536 ? 256 : (T + 255) / 256;
      const int64_t nb = T == 0 ? 0 : (T + chunk - 1) / chunk;
      const int64_t lb = (T == 0 || E == 0) ? 0 : align256(4 * E) + 4 * E * nb;
      EXPECT_EQ(load_balancing_loss_workspace_bytes(T, E), lb) << T << " x " << E;
      EXPECT_EQ(z_loss_workspace_bytes(T, E), (T == 0 || E == 0) ? 0 : 8 * T) << T << " x " << E;
    }
  }
  EXPECT_EQ(load_balancing_loss_workspace_bytes(-1, 4), 0);
}

// A size past INT64_MAX saturates at kSizeOverflow (4E overflowing used to reach align256's
// `bytes + 255` and wrap to a finite, wrong size), and so do the sizes just below it.
TEST(RouterLossWorkspace, HugeSizesSaturate) {
  EXPECT_EQ(load_balancing_loss_workspace_bytes(1, INT64_MAX / 2), kSizeOverflow);
  EXPECT_EQ(load_balancing_loss_workspace_bytes(1, INT64_MAX / 4 - 10), kSizeOverflow);
  EXPECT_EQ(z_loss_workspace_bytes(INT64_MAX / 4, 1), kSizeOverflow);
}

TEST(RouterLossWorkspace, CheckedWhenGivenAndIgnoredByTheCpu) {
  const int64_t T = 6, E = 4, K = 2;
  std::vector<float> probs(size_t(T * E), 0.25f), loss(1), gl(1, 1.f), grad(size_t(T * E));
  std::vector<int32_t> ex(size_t(T * K), 1);
  const TensorView pv = view2d(probs, T, E), ev = view2d(ex, T, K);
  // Absent: fine on the CPU backend (and a given buffer gives the same loss).
  ASSERT_TRUE(load_balancing_loss_forward(Exec{}, pv, ev, make_view(loss.data(), {1})).ok());
  const float no_ws = loss[0];
  std::vector<double> ws(size_t(load_balancing_loss_workspace_bytes(T, E) / 8 + 1));
  const TensorView wv = make_view(static_cast<void*>(ws.data()), DType::kU8, {int64_t(ws.size() * 8)});
  ASSERT_TRUE(load_balancing_loss_forward(Exec{}, pv, ev, make_view(loss.data(), {1}), wv).ok());
  EXPECT_EQ(loss[0], no_ws);
  ASSERT_TRUE(z_loss_backward(Exec{}, pv, make_view(gl.data(), {1}), view2d(grad, T, E), wv).ok());
  // Given but too small, or not bytes: named.
  const TensorView small = make_view(static_cast<void*>(ws.data()), DType::kU8, {8});
  EXPECT_TRUE(
      fails_naming(load_balancing_loss_forward(Exec{}, pv, ev, make_view(loss.data(), {1}), small), "workspace"));
  EXPECT_TRUE(fails_naming(z_loss_forward(Exec{}, pv, make_view(loss.data(), {1}), view2d(probs, T, E)), "workspace"));
  // The emulated CUDA backend needs it: absent is an error there.
  Exec simt;
  simt.backend = Backend::kSimt;
  EXPECT_TRUE(fails_naming(load_balancing_loss_forward(simt, pv, ev, make_view(loss.data(), {1})), "workspace"));
}

}  // namespace
}  // namespace smoe

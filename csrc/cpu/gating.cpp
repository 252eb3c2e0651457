// CPU backend of the gating op family: top-k gating (Mixtral, Qwen-MoE, DeepSeek-V2/V3 routers),
// expert choice, the switch load-balancing loss, the router z-loss and the aux-loss-free bias update.
//
// Work split: one token (row of the logits) per iteration, tokens chunked over the thread pool; each
// row is independent, so results do not depend on the thread count. Reductions over tokens (losses)
// use fixed blocks of kLossBlock tokens summed in block order, again independent of the thread count.
//
// Top-k selection (select_topk): for K <= kInsertionMaxK a block-maxima bound, a branch-free filter
// and an insertion into K sorted slots (O(E)); for larger K nth_element + sort of the K winners
// (O(E + K log K)); never a full sort of E per token.
#include "cpu/gating.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "cpu/parallel.h"

namespace smoe::cpu {
namespace {

constexpr int kInsertionMaxK = 16;
constexpr int64_t kLossBlock = 256;  // tokens per partial sum of the losses

// Enough rows per chunk that a chunk is worth a thread hand-off (~8K elements).
int64_t row_grain(int64_t E) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(E, 1)); }

// Selection keys never hold NaN: a NaN ranks below every number (as on the device backends), so
// the comparisons below form a strict total order and a picked index is always in range.
template <class A>
inline A rank_key(A v) {
  return v == v ? v : -std::numeric_limits<A>::infinity();
}

// The lowest row that failed a data check, whatever thread found it: integer min is
// order-independent, so the reported row is deterministic.
class FirstBadRow {
 public:
  void note(int64_t row) {
    int64_t cur = row_.load(std::memory_order_relaxed);
    while (row < cur && !row_.compare_exchange_weak(cur, row, std::memory_order_relaxed)) {
    }
  }
  bool any() const { return row_.load() != kNone; }
  int64_t row() const { return row_.load(); }

 private:
  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::atomic<int64_t> row_{kNone};
};

// Writes to pos[0, k) the positions of the k largest keys[0, n), in descending key order, ties to
// the lower position. keys hold no NaN. scratch is reused across calls.
//
// k <= kInsertionMaxK (the routers' case): split the keys into k disjoint blocks; the smallest of
// the k block maxima is a lower bound of the k-th best key (k keys reach it), so only keys >= that
// bound can be picked. A branch-free pass keeps those (typically ~2k of E), in ascending position,
// and an insertion into a sorted array of k picks the winners; "strictly greater" alone then keeps
// the lower position first among equal keys. O(E) with few mispredicted branches, no sort of E.
// Larger k: nth_element + sort of the k winners, O(E + k log k).
template <class A>
void select_topk(const A* keys, int64_t n, int64_t k, int32_t* pos, std::vector<int32_t>& scratch) {
  scratch.resize(static_cast<size_t>(n));
  int32_t* idx = scratch.data();
  if (k <= kInsertionMaxK) {
    int64_t c = 0;
    if (n >= 4 * k) {
      A bound = 0;
      for (int64_t b = 0; b < k; ++b) {
        const int64_t lo = n * b / k, hi = n * (b + 1) / k;
        A mx = keys[lo];
        for (int64_t j = lo + 1; j < hi; ++j) mx = keys[j] > mx ? keys[j] : mx;
        bound = (b == 0 || mx < bound) ? mx : bound;
      }
      for (int64_t j = 0; j < n; ++j) {
        idx[c] = int32_t(j);
        c += keys[j] >= bound;
      }
    } else {
      std::iota(idx, idx + n, 0);
      c = n;
    }
    A top[kInsertionMaxK];
    int64_t m = 0;
    for (int64_t i = 0; i < c; ++i) {
      const A v = keys[idx[i]];
      if (m == k && !(v > top[k - 1])) continue;
      if (m < k) ++m;
      int64_t p = m - 1;  // when full, the k-th best is dropped
      while (p > 0 && v > top[p - 1]) {
        top[p] = top[p - 1];
        pos[p] = pos[p - 1];
        --p;
      }
      top[p] = v;
      pos[p] = idx[i];
    }
    return;
  }
  std::iota(idx, idx + n, 0);
  auto better = [keys](int32_t a, int32_t b) { return keys[a] > keys[b] || (keys[a] == keys[b] && a < b); };
  if (k < n) std::nth_element(idx, idx + k, idx + n, better);
  std::sort(idx, idx + k, better);
  std::copy(idx, idx + k, pos);
}

// ---- score functions (one row of E) -------------------------------------------------------------

// Loads one row of logits into acc precision; returns false if it holds a NaN.
template <class In, class A>
bool load_row(const In* in, int64_t E, A* x) {
  bool ok = true;
  for (int64_t e = 0; e < E; ++e) {
    x[e] = to_acc(in[e]);
    ok &= (x[e] == x[e]);
  }
  return ok;
}

// s = softmax(x) with the max subtracted first (no overflow), or s = sigmoid(x).
template <class A>
void score_row(ScoreFunc f, const A* x, int64_t E, A* s) {
  if (f == ScoreFunc::kSoftmax) {
    A m = x[0];
    for (int64_t e = 1; e < E; ++e) m = x[e] > m ? x[e] : m;
    A sum = 0;
    for (int64_t e = 0; e < E; ++e) {
      s[e] = std::exp(x[e] - m);
      sum += s[e];
    }
    for (int64_t e = 0; e < E; ++e) s[e] = s[e] / sum;
  } else {
    for (int64_t e = 0; e < E; ++e) s[e] = A(1) / (A(1) + std::exp(-x[e]));
  }
}

// grad_x from grad_s, given s: softmax  dx = s * (g - <g, s>);  sigmoid  dx = g * s * (1 - s).
template <class A>
void score_row_backward(ScoreFunc f, const A* s, const A* g, int64_t E, A* dx) {
  if (f == ScoreFunc::kSoftmax) {
    A dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += g[e] * s[e];
    for (int64_t e = 0; e < E; ++e) dx[e] = s[e] * (g[e] - dot);
  } else {
    for (int64_t e = 0; e < E; ++e) dx[e] = g[e] * s[e] * (A(1) - s[e]);
  }
}

Status nan_logits(const char* op, int64_t row) {
  return invalid_argument(op, "logits", "no NaN values", "a NaN in row " + std::to_string(row));
}

// ---- topk_gating --------------------------------------------------------------------------------

template <class In>
Status topk_gating_forward_impl(const TopkGatingParams& p, const TensorView& logits, const TensorView& bias,
                                const TensorView& weights, const TensorView& experts, const TensorView& scores) {
  using A = typename AccOf<In>::type;
  const int64_t T = logits.size(0), E = logits.size(1), K = p.top_k;
  const In* lg = logits.data_as<const In>();
  const float* bs = bias.defined() ? bias.data_as<const float>() : nullptr;
  A* wt = weights.data_as<A>();
  int32_t* ex = experts.data_as<int32_t>();
  A* sc = scores.data_as<A>();
  const int64_t ls = logits.stride(0), ws = weights.stride(0), es = experts.stride(0), ss = scores.stride(0);

  const int64_t G = E / p.n_groups;                 // experts per group
  const bool grouped = p.topk_groups < p.n_groups;  // else every group is kept: plain top-k
  const A eps = A(p.renorm_eps), scale = A(p.routed_scaling);
  FirstBadRow nan_row;

  parallel_for(T, row_grain(E), [&](int64_t t0, int64_t t1) {
    const size_t e_n = static_cast<size_t>(E), g_n = static_cast<size_t>(p.n_groups);
    std::vector<A> x(e_n), key(e_n), gkey(g_n);
    std::vector<int32_t> cand(e_n), pos(static_cast<size_t>(std::max<int64_t>(K, p.topk_groups))), scratch;
    std::vector<uint8_t> kept(g_n);
    for (int64_t t = t0; t < t1; ++t) {
      A* s = sc + t * ss;
      if (!load_row(lg + t * ls, E, x.data())) nan_row.note(t);  // still routed: indices stay valid
      score_row(p.score_func, x.data(), E, s);
      // Selection key: the score plus the balancing bias, which steers the choice only.
      if (bs) {
        for (int64_t e = 0; e < E; ++e) key[e] = rank_key(s[e] + A(bs[e]));
      } else {
        for (int64_t e = 0; e < E; ++e) key[e] = rank_key(s[e]);
      }
      const A* ckey = key.data();  // keys of the candidate experts
      const int32_t* cidx = nullptr;  // expert of each candidate (nullptr: candidate j is expert j)
      int64_t ncand = E;
      if (grouped) {
        // Group-limited routing (DeepSeek-V2 section 2.1.3; V3 section 2.1.2): score each group,
        // keep the topk_groups best (ties to the lower group), pick experts only from those.
        for (int64_t g = 0; g < p.n_groups; ++g) {
          const A* k = key.data() + g * G;
          if (p.group_score == GroupScore::kMax) {
            A b = k[0];
            for (int64_t j = 1; j < G; ++j) b = k[j] > b ? k[j] : b;
            gkey[g] = b;
          } else {  // sum of the two best; a group of one expert scores that expert alone
            A b1 = -std::numeric_limits<A>::infinity(), b2 = b1;
            for (int64_t j = 0; j < G; ++j) {
              if (k[j] > b1) {
                b2 = b1;
                b1 = k[j];
              } else if (k[j] > b2) {
                b2 = k[j];
              }
            }
            gkey[g] = G >= 2 ? rank_key(b1 + b2) : b1;
          }
        }
        select_topk(gkey.data(), p.n_groups, p.topk_groups, pos.data(), scratch);
        std::fill(kept.begin(), kept.end(), uint8_t(0));
        for (int32_t i = 0; i < p.topk_groups; ++i) kept[pos[i]] = 1;
        // Candidates in ascending expert order, as select_topk's tie rule requires.
        A* kk = x.data();  // x is free once the scores are written
        ncand = 0;
        for (int64_t g = 0; g < p.n_groups; ++g) {
          if (!kept[g]) continue;
          for (int64_t j = 0; j < G; ++j) {
            kk[ncand] = key[g * G + j];
            cand[ncand] = int32_t(g * G + j);
            ++ncand;
          }
        }
        ckey = kk;
        cidx = cand.data();
      }
      select_topk(ckey, ncand, K, pos.data(), scratch);

      // Weights: the unbiased scores of the picked experts, renormalised over the K, then scaled.
      A* w = wt + t * ws;
      int32_t* ei = ex + t * es;
      for (int64_t k = 0; k < K; ++k) {
        ei[k] = cidx ? cidx[pos[k]] : pos[k];
        w[k] = s[ei[k]];
      }
      if (p.renormalize) {
        A sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += w[k];
        const A denom = sum + eps;
        for (int64_t k = 0; k < K; ++k) w[k] = w[k] / denom;
      }
      for (int64_t k = 0; k < K; ++k) w[k] = w[k] * scale;
    }
  });
  if (nan_row.any()) return nan_logits("topk_gating_forward", nan_row.row());
  return Status::Ok();
}

template <class A>
Status topk_gating_backward_impl(const TopkGatingParams& p, const TensorView& scores, const TensorView& experts,
                                 const TensorView& grad_weights, const TensorView& grad_scores,
                                 const TensorView& grad_logits) {
  const int64_t T = scores.size(0), E = scores.size(1), K = p.top_k;
  const A* sc = scores.data_as<const A>();
  const int32_t* ex = experts.data_as<const int32_t>();
  const A* gw = grad_weights.defined() ? grad_weights.data_as<const A>() : nullptr;
  const A* gs = grad_scores.defined() ? grad_scores.data_as<const A>() : nullptr;
  A* gl = grad_logits.data_as<A>();
  const int64_t ss = scores.stride(0), es = experts.stride(0), gls = grad_logits.stride(0);
  const int64_t gws = gw ? grad_weights.stride(0) : 0, gss = gs ? grad_scores.stride(0) : 0;
  const A eps = A(p.renorm_eps), scale = A(p.routed_scaling);
  FirstBadRow bad_row;

  parallel_for(T, row_grain(E), [&](int64_t t0, int64_t t1) {
    std::vector<A> g(static_cast<size_t>(E));
    for (int64_t t = t0; t < t1; ++t) {
      const A* s = sc + t * ss;
      const int32_t* ei = ex + t * es;
      if (gs) {
        std::copy(gs + t * gss, gs + t * gss + E, g.begin());
      } else {
        std::fill(g.begin(), g.end(), A(0));
      }
      bool in_range = true;
      for (int64_t k = 0; k < K; ++k) in_range &= (ei[k] >= 0 && ei[k] < E);
      if (!in_range) {
        bad_row.note(t);
        continue;
      }
      if (gw) {
        const A* dw = gw + t * gws;
        if (p.renormalize) {
          // w_k = c s_k / D with D = sum_j s_j + eps over the picked experts:
          // dL/ds_i = c (dw_i / D - <dw, s> / D^2) for each picked i.
          A sum = 0, dot = 0;
          for (int64_t k = 0; k < K; ++k) sum += s[ei[k]];
          for (int64_t k = 0; k < K; ++k) dot += dw[k] * s[ei[k]];
          const A denom = sum + eps;
          const A common = dot / (denom * denom);
          for (int64_t k = 0; k < K; ++k) g[ei[k]] += scale * (dw[k] / denom - common);
        } else {
          for (int64_t k = 0; k < K; ++k) g[ei[k]] += scale * dw[k];
        }
      }
      score_row_backward(p.score_func, s, g.data(), E, gl + t * gls);
    }
  });
  if (bad_row.any()) {
    return invalid_argument("topk_gating_backward", "experts", "indices in [0, E) = [0, " + std::to_string(E) + ")",
                            "an out-of-range index in row " + std::to_string(bad_row.row()));
  }
  return Status::Ok();
}

// ---- expert choice ------------------------------------------------------------------------------

template <class In>
Status expert_choice_forward_impl(const ExpertChoiceParams& p, const TensorView& logits, const TensorView& scores,
                                  const TensorView& tokens, const TensorView& row_of, const TensorView& weights) {
  using A = typename AccOf<In>::type;
  const int64_t T = logits.size(0), E = logits.size(1), C = p.capacity;
  const In* lg = logits.data_as<const In>();
  A* sc = scores.data_as<A>();
  int32_t* tk = tokens.data_as<int32_t>();
  int32_t* ro = row_of.data_as<int32_t>();
  A* wt = weights.data_as<A>();
  const int64_t ls = logits.stride(0), ss = scores.stride(0), ts = tokens.stride(0), rs = row_of.stride(0),
                ws = weights.stride(0);
  FirstBadRow nan_row;

  // Pass 1, over tokens: scores, and row_of / weights cleared to "not chosen".
  parallel_for(T, row_grain(E), [&](int64_t t0, int64_t t1) {
    std::vector<A> x(static_cast<size_t>(E));
    for (int64_t t = t0; t < t1; ++t) {
      if (!load_row(lg + t * ls, E, x.data())) nan_row.note(t);
      score_row(p.score_func, x.data(), E, sc + t * ss);
      std::fill(ro + t * rs, ro + t * rs + E, int32_t(-1));
      std::fill(wt + t * ws, wt + t * ws + E, A(0));
    }
  });
  if (nan_row.any()) return nan_logits("expert_choice_forward", nan_row.row());

  // Pass 2, over experts: expert e takes its C best tokens (Zhou et al. 2022, section 3.1). Experts
  // write disjoint columns of row_of and weights.
  parallel_for(E, std::max<int64_t>(1, 8192 / T), [&](int64_t e0, int64_t e1) {
    std::vector<A> col(static_cast<size_t>(T));
    std::vector<int32_t> pos(static_cast<size_t>(C)), scratch;
    for (int64_t e = e0; e < e1; ++e) {
      for (int64_t t = 0; t < T; ++t) col[t] = rank_key(sc[t * ss + e]);
      select_topk(col.data(), T, C, pos.data(), scratch);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t t = pos[c];
        tk[e * ts + c] = int32_t(t);
        ro[t * rs + e] = int32_t(e * C + c);
        wt[t * ws + e] = sc[t * ss + e];
      }
    }
  });
  return Status::Ok();
}

template <class A>
Status expert_choice_backward_impl(const ExpertChoiceParams& p, const TensorView& scores, const TensorView& row_of,
                                   const TensorView& grad_weights, const TensorView& grad_logits) {
  const int64_t T = scores.size(0), E = scores.size(1), C = p.capacity;
  const A* sc = scores.data_as<const A>();
  const int32_t* ro = row_of.data_as<const int32_t>();
  const A* gw = grad_weights.data_as<const A>();
  A* gl = grad_logits.data_as<A>();
  const int64_t ss = scores.stride(0), rs = row_of.stride(0), gws = grad_weights.stride(0),
                gls = grad_logits.stride(0);
  FirstBadRow bad_row;

  parallel_for(T, row_grain(E), [&](int64_t t0, int64_t t1) {
    std::vector<A> g(static_cast<size_t>(E));
    for (int64_t t = t0; t < t1; ++t) {
      const int32_t* r = ro + t * rs;
      const A* dw = gw + t * gws;
      bool valid = true;
      for (int64_t e = 0; e < E; ++e) {
        // weights[t, e] = scores[t, e] where chosen, a constant 0 elsewhere.
        const bool chosen = r[e] >= 0;
        valid &= (r[e] == -1 || (r[e] >= e * C && r[e] < e * C + C));
        g[e] = chosen ? dw[e] : A(0);
      }
      if (!valid) {
        bad_row.note(t);
        continue;
      }
      score_row_backward(p.score_func, sc + t * ss, g.data(), E, gl + t * gls);
    }
  });
  if (bad_row.any()) {
    return invalid_argument("expert_choice_backward", "row_of", "-1 or a row in [e*C, e*C + C) for column e",
                            "an invalid entry in row " + std::to_string(bad_row.row()));
  }
  return Status::Ok();
}

// ---- aux losses ---------------------------------------------------------------------------------

template <class A>
void write_scalar(const TensorView& v, double value) {
  *v.data_as<A>() = A(value);
}

template <class A>
double read_scalar(const TensorView& v) {
  return double(*v.data_as<const A>());
}

// counts[e] = #{(t, k) : experts[t, k] == e}; returns false (and the first bad row) on an index
// outside [0, E). Also sums probs over tokens into psum[e] when probs is given, in fixed blocks.
template <class A>
bool count_and_sum(const TensorView& experts, int64_t E, const A* probs, int64_t ps, std::vector<int64_t>& counts,
                   std::vector<double>* psum, int64_t* bad) {
  const int64_t T = experts.size(0), K = experts.size(1), es = experts.stride(0);
  const int32_t* ex = experts.data_as<const int32_t>();
  const int64_t nb = (T + kLossBlock - 1) / kLossBlock;
  std::vector<int64_t> bc(static_cast<size_t>(nb * E), 0);
  std::vector<double> bp(psum ? size_t(nb * E) : 0, 0.0);
  FirstBadRow bad_row;
  parallel_for(nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* c = bc.data() + b * E;
      double* ps_b = psum ? bp.data() + b * E : nullptr;
      for (int64_t t = b * kLossBlock; t < std::min(T, (b + 1) * kLossBlock); ++t) {
        for (int64_t k = 0; k < K; ++k) {
          const int32_t e = ex[t * es + k];
          if (e < 0 || e >= E) {
            bad_row.note(t);
          } else {
            ++c[e];
          }
        }
        if (ps_b) {
          const A* pr = probs + t * ps;
          for (int64_t e = 0; e < E; ++e) ps_b[e] += double(pr[e]);
        }
      }
    }
  });
  if (bad_row.any()) {
    *bad = bad_row.row();
    return false;
  }
  counts.assign(static_cast<size_t>(E), 0);
  if (psum) psum->assign(static_cast<size_t>(E), 0.0);
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t e = 0; e < E; ++e) {
      counts[e] += bc[b * E + e];
      if (psum) (*psum)[e] += bp[b * E + e];
    }
  }
  return true;
}

Status bad_expert(const char* op, int64_t E, int64_t row) {
  return invalid_argument(op, "experts", "indices in [0, E) = [0, " + std::to_string(E) + ")",
                          "an out-of-range index in row " + std::to_string(row));
}

template <class A>
Status lb_loss_forward_impl(const TensorView& probs, const TensorView& experts, const TensorView& loss) {
  const int64_t T = probs.size(0), E = probs.size(1);
  std::vector<int64_t> counts;
  std::vector<double> psum;
  int64_t bad = 0;
  if (!count_and_sum(experts, E, probs.data_as<const A>(), probs.stride(0), counts, &psum, &bad)) {
    return bad_expert("load_balancing_loss_forward", E, bad);
  }
  // E * sum_e (counts_e / T) * (psum_e / T); no tokens, no imbalance: 0.
  double acc = 0.0;
  for (int64_t e = 0; e < E; ++e) acc += double(counts[e]) * psum[e];
  write_scalar<A>(loss, T > 0 ? double(E) * acc / (double(T) * double(T)) : 0.0);
  return Status::Ok();
}

template <class A>
Status lb_loss_backward_impl(const TensorView& probs, const TensorView& experts, const TensorView& grad_loss,
                             const TensorView& grad_probs) {
  const int64_t T = probs.size(0), E = probs.size(1);
  std::vector<int64_t> counts;
  int64_t bad = 0;
  if (!count_and_sum<A>(experts, E, nullptr, 0, counts, nullptr, &bad)) {
    return bad_expert("load_balancing_loss_backward", E, bad);
  }
  // d loss / d probs[t, e] = E * f_e / T, f_e = counts_e / T held constant.
  const double gl = read_scalar<A>(grad_loss);
  std::vector<A> coef(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) coef[e] = A(gl * double(E) * double(counts[e]) / (double(T) * double(T)));
  A* gp = grad_probs.data_as<A>();
  const int64_t gs = grad_probs.stride(0);
  parallel_for(T, row_grain(E), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) std::copy(coef.begin(), coef.end(), gp + t * gs);
  });
  return Status::Ok();
}

// logsumexp of one row with the max subtracted; also returns the max and the sum of exp(x - max).
template <class A>
A logsumexp_row(const A* x, int64_t E, A* max_out, A* sum_out) {
  A m = x[0];
  for (int64_t e = 1; e < E; ++e) m = x[e] > m ? x[e] : m;
  A sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += std::exp(x[e] - m);
  *max_out = m;
  *sum_out = sum;
  // A row whose max is +inf or -inf (all -inf) has logsumexp = max, as torch.logsumexp gives.
  return std::isinf(m) ? m : m + std::log(sum);
}

template <class In>
Status z_loss_forward_impl(const TensorView& logits, const TensorView& loss) {
  using A = typename AccOf<In>::type;
  const int64_t T = logits.size(0), E = logits.size(1), ls = logits.stride(0);
  const In* lg = logits.data_as<const In>();
  const int64_t nb = (T + kLossBlock - 1) / kLossBlock;
  std::vector<double> part(static_cast<size_t>(nb), 0.0);
  FirstBadRow nan_row;
  parallel_for(nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> x(static_cast<size_t>(E));
    for (int64_t b = b0; b < b1; ++b) {
      double acc = 0.0;
      for (int64_t t = b * kLossBlock; t < std::min(T, (b + 1) * kLossBlock); ++t) {
        if (!load_row(lg + t * ls, E, x.data())) nan_row.note(t);
        A m, s;
        const double z = double(logsumexp_row(x.data(), E, &m, &s));
        acc += z * z;
      }
      part[b] = acc;
    }
  });
  if (nan_row.any()) return nan_logits("z_loss_forward", nan_row.row());
  double acc = 0.0;
  for (double v : part) acc += v;
  write_scalar<A>(loss, T > 0 ? acc / double(T) : 0.0);  // no tokens: 0
  return Status::Ok();
}

template <class In>
Status z_loss_backward_impl(const TensorView& logits, const TensorView& grad_loss, const TensorView& grad_logits) {
  using A = typename AccOf<In>::type;
  const int64_t T = logits.size(0), E = logits.size(1), ls = logits.stride(0), gs = grad_logits.stride(0);
  const In* lg = logits.data_as<const In>();
  A* gl = grad_logits.data_as<A>();
  // d/dx_e mean_t z_t^2 = (2 z_t / T) softmax(x_t)_e, z_t = logsumexp(x_t).
  const A g = A(read_scalar<A>(grad_loss));
  const A two_over_t = A(2.0 / double(T));
  FirstBadRow nan_row;
  parallel_for(T, row_grain(E), [&](int64_t t0, int64_t t1) {
    std::vector<A> x(static_cast<size_t>(E));
    for (int64_t t = t0; t < t1; ++t) {
      if (!load_row(lg + t * ls, E, x.data())) nan_row.note(t);
      A m, s;
      const A z = logsumexp_row(x.data(), E, &m, &s);
      const A c = g * two_over_t * z;
      A* out = gl + t * gs;
      for (int64_t e = 0; e < E; ++e) out[e] = c * (std::exp(x[e] - m) / s);
    }
  });
  if (nan_row.any()) return nan_logits("z_loss_backward", nan_row.row());
  return Status::Ok();
}

// One dtype dispatch for the ops that read logits.
template <class F>
Status on_logits_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kF32: return f(float{});
    case DType::kF64: return f(double{});
    case DType::kBF16: return f(bf16_t{});
    case DType::kF16: return f(f16_t{});
    default: return Status(Code::kInternal, "gating: unexpected logits dtype after validation");
  }
}

}  // namespace

Status topk_gating_forward(const TopkGatingParams& params, const TensorView& logits, const TensorView& bias,
                           const TensorView& weights, const TensorView& experts, const TensorView& scores) {
  if (bias.defined()) {
    const float* b = bias.data_as<const float>();
    for (int64_t e = 0; e < bias.size(0); ++e) {
      if (std::isnan(b[e])) {
        return invalid_argument("topk_gating_forward", "bias", "no NaN values", "NaN at expert " + std::to_string(e));
      }
    }
  }
  return on_logits_dtype(logits.dtype, [&](auto tag) {
    return topk_gating_forward_impl<decltype(tag)>(params, logits, bias, weights, experts, scores);
  });
}

Status topk_gating_backward(const TopkGatingParams& params, const TensorView& scores, const TensorView& experts,
                            const TensorView& grad_weights, const TensorView& grad_scores,
                            const TensorView& grad_logits) {
  if (scores.dtype == DType::kF64) {
    return topk_gating_backward_impl<double>(params, scores, experts, grad_weights, grad_scores, grad_logits);
  }
  return topk_gating_backward_impl<float>(params, scores, experts, grad_weights, grad_scores, grad_logits);
}

Status expert_choice_forward(const ExpertChoiceParams& params, const TensorView& logits, const TensorView& scores,
                             const TensorView& tokens, const TensorView& row_of, const TensorView& weights) {
  return on_logits_dtype(logits.dtype, [&](auto tag) {
    return expert_choice_forward_impl<decltype(tag)>(params, logits, scores, tokens, row_of, weights);
  });
}

Status expert_choice_backward(const ExpertChoiceParams& params, const TensorView& scores, const TensorView& row_of,
                              const TensorView& grad_weights, const TensorView& grad_logits) {
  if (scores.dtype == DType::kF64) {
    return expert_choice_backward_impl<double>(params, scores, row_of, grad_weights, grad_logits);
  }
  return expert_choice_backward_impl<float>(params, scores, row_of, grad_weights, grad_logits);
}

Status load_balancing_loss_forward(const TensorView& probs, const TensorView& experts, const TensorView& loss) {
  if (probs.dtype == DType::kF64) return lb_loss_forward_impl<double>(probs, experts, loss);
  return lb_loss_forward_impl<float>(probs, experts, loss);
}

Status load_balancing_loss_backward(const TensorView& probs, const TensorView& experts, const TensorView& grad_loss,
                                    const TensorView& grad_probs) {
  if (probs.dtype == DType::kF64) return lb_loss_backward_impl<double>(probs, experts, grad_loss, grad_probs);
  return lb_loss_backward_impl<float>(probs, experts, grad_loss, grad_probs);
}

Status z_loss_forward(const TensorView& logits, const TensorView& loss) {
  return on_logits_dtype(logits.dtype, [&](auto tag) { return z_loss_forward_impl<decltype(tag)>(logits, loss); });
}

Status z_loss_backward(const TensorView& logits, const TensorView& grad_loss, const TensorView& grad_logits) {
  return on_logits_dtype(logits.dtype, [&](auto tag) {
    return z_loss_backward_impl<decltype(tag)>(logits, grad_loss, grad_logits);
  });
}

Status balancing_bias_update(const TensorView& counts, const TensorView& bias, float rate) {
  const int64_t E = counts.size(0);
  const int32_t* c = counts.data_as<const int32_t>();
  float* b = bias.data_as<float>();
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (c[e] < 0) {
      return invalid_argument("balancing_bias_update", "counts", "non-negative token counts",
                              std::to_string(c[e]) + " at expert " + std::to_string(e));
    }
    total += c[e];
  }
  // bias_e += rate * sign(mean - counts_e): underloaded experts become more attractive (DeepSeek-V3
  // section 2.1.2). total / E in f64 is exact enough that an expert at the mean gets sign 0.
  const double mean = double(total) / double(E);
  for (int64_t e = 0; e < E; ++e) {
    const double d = mean - double(c[e]);
    const float sign = d > 0 ? 1.0f : (d < 0 ? -1.0f : 0.0f);
    b[e] = b[e] + rate * sign;
  }
  return Status::Ok();
}

}  // namespace smoe::cpu

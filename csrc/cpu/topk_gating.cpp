// CPU backend of top-k gating (Mixtral, Qwen-MoE, DeepSeek-V2/V3 routers; smoe/ops/topk_gating.h).
//
// Top-k selection (router::select_topk, csrc/cpu/router_rows.h): for K <= 16 a block-maxima bound, a
// branch-free filter and an insertion into K sorted slots (O(E)); for larger K nth_element + sort of
// the K winners (O(E + K log K)); never a full sort of E per token.
#include "cpu/topk_gating.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/router_rows.h"

namespace smoe::cpu {
namespace {

using namespace router;

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
      const A* ckey = key.data();     // keys of the candidate experts
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
  return dtypes::dispatch_float(logits.dtype, "topk_gating_forward", [&](auto tag) {
    return topk_gating_forward_impl<typename decltype(tag)::type>(params, logits, bias, weights, experts, scores);
  });
}

Status topk_gating_backward(const TopkGatingParams& params, const TensorView& scores, const TensorView& experts,
                            const TensorView& grad_weights, const TensorView& grad_scores,
                            const TensorView& grad_logits) {
  return dtypes::dispatch_acc(scores.dtype, [&](auto tag) {
    return topk_gating_backward_impl<typename decltype(tag)::type>(params, scores, experts, grad_weights, grad_scores,
                                                                   grad_logits);
  });
}

}  // namespace smoe::cpu

// CPU backend of expert-choice routing (Zhou et al., 2022, arXiv:2202.09368; smoe/ops/expert_choice.h).
#include "cpu/expert_choice.h"

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
                                   const TensorView& grad_weights, const TensorView& grad_scores,
                                   const TensorView& grad_logits) {
  const int64_t T = scores.size(0), E = scores.size(1), C = p.capacity;
  const A* sc = scores.data_as<const A>();
  const int32_t* ro = row_of.data_as<const int32_t>();
  const A* gw = grad_weights.defined() ? grad_weights.data_as<const A>() : nullptr;
  const A* gs = grad_scores.defined() ? grad_scores.data_as<const A>() : nullptr;
  A* gl = grad_logits.data_as<A>();
  const int64_t ss = scores.stride(0), rs = row_of.stride(0), gls = grad_logits.stride(0);
  const int64_t gws = gw ? grad_weights.stride(0) : 0, gss = gs ? grad_scores.stride(0) : 0;
  FirstBadRow bad_row;

  parallel_for(T, row_grain(E), [&](int64_t t0, int64_t t1) {
    std::vector<A> g(static_cast<size_t>(E));
    for (int64_t t = t0; t < t1; ++t) {
      const int32_t* r = ro + t * rs;
      bool valid = true;
      for (int64_t e = 0; e < E; ++e) {
        // weights[t, e] = scores[t, e] where chosen, a constant 0 elsewhere; scores[t, e] itself
        // also reaches the loss through grad_scores (e.g. an auxiliary loss on the scores).
        valid &= (r[e] == -1 || (r[e] >= e * C && r[e] < e * C + C));
        const A from_weights = gw && r[e] >= 0 ? gw[t * gws + e] : A(0);
        g[e] = gs ? from_weights + gs[t * gss + e] : from_weights;
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

}  // namespace

Status expert_choice_forward(const ExpertChoiceParams& params, const TensorView& logits, const TensorView& scores,
                             const TensorView& tokens, const TensorView& row_of, const TensorView& weights) {
  return dtypes::dispatch_float(logits.dtype, "expert_choice_forward", [&](auto tag) {
    return expert_choice_forward_impl<typename decltype(tag)::type>(params, logits, scores, tokens, row_of, weights);
  });
}

Status expert_choice_backward(const ExpertChoiceParams& params, const TensorView& scores, const TensorView& row_of,
                              const TensorView& grad_weights, const TensorView& grad_scores,
                              const TensorView& grad_logits) {
  return dtypes::dispatch_acc(scores.dtype, [&](auto tag) {
    return expert_choice_backward_impl<typename decltype(tag)::type>(params, scores, row_of, grad_weights, grad_scores,
                                                                     grad_logits);
  });
}

}  // namespace smoe::cpu

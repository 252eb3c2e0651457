// CPU backend of the router losses (the switch load-balancing loss, the router z-loss) and the
// aux-loss-free bias update (smoe/ops/router_losses.h).
//
// Reductions over tokens use fixed blocks of kLossBlock tokens summed in block order, so the losses
// do not depend on the thread count. The CPU backend needs no workspace: it ignores the argument.
#include "cpu/router_losses.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/router_rows.h"

namespace smoe::cpu {
namespace {

using namespace router;

constexpr int64_t kLossBlock = 256;  // tokens per partial sum of the losses

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

}  // namespace

Status load_balancing_loss_forward(const TensorView& probs, const TensorView& experts, const TensorView& loss,
                                   const TensorView& /*workspace*/) {
  return dtypes::dispatch_acc(
      probs.dtype, [&](auto tag) { return lb_loss_forward_impl<typename decltype(tag)::type>(probs, experts, loss); });
}

Status load_balancing_loss_backward(const TensorView& probs, const TensorView& experts, const TensorView& grad_loss,
                                    const TensorView& grad_probs, const TensorView& /*workspace*/) {
  return dtypes::dispatch_acc(probs.dtype, [&](auto tag) {
    return lb_loss_backward_impl<typename decltype(tag)::type>(probs, experts, grad_loss, grad_probs);
  });
}

Status z_loss_forward(const TensorView& logits, const TensorView& loss, const TensorView& /*workspace*/) {
  return dtypes::dispatch_float(logits.dtype, "z_loss_forward", [&](auto tag) {
    return z_loss_forward_impl<typename decltype(tag)::type>(logits, loss);
  });
}

Status z_loss_backward(const TensorView& logits, const TensorView& grad_loss, const TensorView& grad_logits,
                       const TensorView& /*workspace*/) {
  return dtypes::dispatch_float(logits.dtype, "z_loss_backward", [&](auto tag) {
    return z_loss_backward_impl<typename decltype(tag)::type>(logits, grad_loss, grad_logits);
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

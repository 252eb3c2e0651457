// CPU expert MLP and shared experts, composed from the CPU backend's functions (no public-API
// re-entry; the offsets are checked once per call):
//   forward   ys = x[token_of_row] (ys is the gather's transient home); pre = ys @ w1[e]^T;
//             act = act(pre); ys = act @ w2[e]^T (overwrites the gathered rows). No [R, H] copy of x
//             outlives the call or is saved.
//   backward  grad_act = grad_ys @ w2[e]; grad_w2 = wgrad(grad_ys, act); grad_pre = act'(pre, grad_act);
//             grad_xs = x[token_of_row] (gathered into the workspace piece of grad_xs);
//             grad_w1 = wgrad(grad_pre, grad_xs); grad_xs = grad_pre @ w1[e] (overwrites it);
//             grad_x = permute^T(grad_xs)
// The shared expert is the same MLP with one segment covering every token, plus the sigmoid gate.
#include "cpu/mlp.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/workspace.h"
#include "cpu/gemm.h"
#include "cpu/parallel.h"
#include "cpu/permute.h"

namespace smoe::cpu {
namespace {

using mlp_workspace::as_one_expert;
using WorkspaceCarver = mlp_workspace::Carver;

// Rows [r0, r1) of a 2-D view.
TensorView rows(const TensorView& v, int64_t r0, int64_t r1) {
  TensorView s = v;
  s.data = static_cast<char*>(v.data) + r0 * v.stride(0) * dtype_size(v.dtype);
  s.shape[0] = r1 - r0;
  return s;
}

// Rows [r0, r1) of a 2-D view become +0.0 (all-zero bits in every float dtype).
void zero_rows(const TensorView& v, int64_t r0, int64_t r1) {
  const int64_t row_bytes = v.size(1) * dtype_size(v.dtype);
  char* base = static_cast<char*>(v.data);
  for (int64_t r = r0; r < r1; ++r) std::memset(base + r * v.stride(0) * dtype_size(v.dtype), 0, size_t(row_bytes));
}

// Rows outside [o0, oE) belong to no expert: they are given defined values (zeros).
void zero_outside(const TensorView& v, int64_t o0, int64_t oE) {
  zero_rows(v, 0, o0);
  zero_rows(v, oE, v.size(0));
}

// gate[t] = sigmoid(<x[t], gate_w>), in the accumulation type (f32; f64 for f64).
template <class T>
void gate_forward(const TensorView& x, const TensorView& gate_w, const TensorView& gate) {
  const int64_t T_ = x.size(0), H = x.size(1);
  const T* px = x.data_as<const T>();
  const T* pw = gate_w.data_as<const T>();
  acc_t<T>* pg = gate.data_as<acc_t<T>>();
  parallel_for(T_, 256, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      acc_t<T> s = 0;
      for (int64_t h = 0; h < H; ++h) s += to_acc(px[t * x.stride(0) + h]) * to_acc(pw[h]);
      pg[t] = acc_t<T>(1) / (acc_t<T>(1) + std::exp(-s));
    }
  });
}

// dst[t] += scale[t] * src[t] + coef[t] * vec   (scale, coef, vec optional), rounded once.
template <class T>
void accumulate_rows(const TensorView& dst, const TensorView& src, const acc_t<T>* scale, const acc_t<T>* coef,
                     const T* vec) {
  const int64_t T_ = dst.size(0), H = dst.size(1);
  T* pd = dst.data_as<T>();
  const T* ps = src.data_as<const T>();
  parallel_for(T_, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      T* d = pd + t * dst.stride(0);
      const T* s = ps + t * src.stride(0);
      const acc_t<T> g = scale ? scale[t] : acc_t<T>(1);
      const acc_t<T> c = coef ? coef[t] : acc_t<T>(0);
      for (int64_t h = 0; h < H; ++h) {
        acc_t<T> v = to_acc(d[h]) + g * to_acc(s[h]);
        if (vec) v += c * to_acc(vec[h]);
        d[h] = from_acc<T>(v);
      }
    }
  });
}

// Gate backward: grad_out[t] = gate[t] * grad_y[t];
// dlogit[t] = <grad_y[t], out[t]> * gate[t] * (1 - gate[t]);  grad_gate_w[h] = sum_t dlogit[t] x[t, h].
template <class T>
void gate_backward(const TensorView& grad_y, const TensorView& out, const TensorView& gate, const TensorView& x,
                   const TensorView& grad_out, acc_t<T>* dlogit, const TensorView& grad_gate_w) {
  const int64_t T_ = grad_y.size(0), H = grad_y.size(1);
  const T* pgy = grad_y.data_as<const T>();
  const T* po = out.data_as<const T>();
  const acc_t<T>* pg = gate.data_as<const acc_t<T>>();
  T* pgo = grad_out.data_as<T>();
  parallel_for(T_, 256, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const T* gy = pgy + t * grad_y.stride(0);
      const T* o = po + t * out.stride(0);
      T* go = pgo + t * grad_out.stride(0);
      acc_t<T> dot = 0;
      for (int64_t h = 0; h < H; ++h) {
        dot += to_acc(gy[h]) * to_acc(o[h]);
        go[h] = from_acc<T>(pg[t] * to_acc(gy[h]));
      }
      dlogit[t] = dot * pg[t] * (acc_t<T>(1) - pg[t]);
    }
  });
  // Columns in parallel, tokens in order: the sum order is fixed.
  const T* px = x.data_as<const T>();
  T* pgw = grad_gate_w.data_as<T>();
  constexpr int64_t kCols = 64;
  parallel_for((H + kCols - 1) / kCols, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t h0 = b * kCols, h1 = std::min(H, h0 + kCols);
      acc_t<T> acc[kCols] = {};
      for (int64_t t = 0; t < T_; ++t) {
        const T* xr = px + t * x.stride(0);
        for (int64_t h = h0; h < h1; ++h) acc[h - h0] += dlogit[t] * to_acc(xr[h]);
      }
      for (int64_t h = h0; h < h1; ++h) pgw[h] = from_acc<T>(acc[h - h0]);
    }
  });
}

}  // namespace

Status expert_mlp_forward(const ExpertMlpParams& params, const TensorView& x, const TensorView& token_of_row,
                          const TensorView& offsets, const TensorView& w1, const TensorView& w2, const TensorView& pre,
                          const TensorView& act, const TensorView& ys) {
  const int64_t R = ys.size(0);
  SMOE_RETURN_IF_ERROR(check_offsets("expert_mlp_forward", offsets, R));  // the one scan of offsets
  const int64_t E = offsets.size(0) - 1;
  const int64_t o0 = offsets.data_as<const int64_t>()[0], oE = offsets.data_as<const int64_t>()[E];
  const GroupedGemmParams nt{true};
  // ys [R, H] holds the gathered rows until the second GEMM overwrites them with the result.
  SMOE_RETURN_IF_ERROR(permute_forward(x, token_of_row, ys));
  SMOE_RETURN_IF_ERROR(grouped_gemm_prechecked(nt, ys, w1, offsets, pre));
  SMOE_RETURN_IF_ERROR(activation_forward(params.activation, rows(pre, o0, oE), rows(act, o0, oE)));
  SMOE_RETURN_IF_ERROR(grouped_gemm_prechecked(nt, act, w2, offsets, ys));
  zero_outside(pre, o0, oE);
  zero_outside(act, o0, oE);
  zero_outside(ys, o0, oE);
  return Status::Ok();
}

Status expert_mlp_combine_top1_forward(const ExpertMlpParams& params, const TensorView& x,
                                       const TensorView& token_of_row, const TensorView& offsets, const TensorView& w1,
                                       const TensorView& w2, const TensorView& weights, const TensorView& y,
                                       const TensorView& workspace) {
  const int64_t R = token_of_row.size(0), T_ = x.size(0), H = x.size(1), F = w2.size(2), F1 = w1.size(1);
  SMOE_RETURN_IF_ERROR(check_offsets("expert_mlp_combine_top1_forward", offsets, R));  // the one scan of offsets
  const int64_t E = offsets.size(0) - 1;
  const int64_t o0 = offsets.data_as<const int64_t>()[0], oE = offsets.data_as<const int64_t>()[E];
  zero_rows(y, 0, T_);  // tokens with no row stay zero
  if (R == 0 || oE == o0) return Status::Ok();
  WorkspaceCarver ws(workspace);  // layout: csrc/core/workspace.h
  const TensorView pre = ws.take(x.dtype, R, F1);
  const TensorView act = ws.take(x.dtype, R, F);
  const TensorView out = ws.take(x.dtype, R, H);  // the gathered rows, then the second GEMM's output
  const GroupedGemmParams nt{true};
  SMOE_RETURN_IF_ERROR(permute_forward(x, token_of_row, out));
  SMOE_RETURN_IF_ERROR(grouped_gemm_prechecked(nt, out, w1, offsets, pre));
  SMOE_RETURN_IF_ERROR(activation_forward(params.activation, rows(pre, o0, oE), rows(act, o0, oE)));
  SMOE_RETURN_IF_ERROR(grouped_gemm_prechecked(nt, act, w2, offsets, out));
  // y[token_of_row[r]] = weights[token_of_row[r]] * out[r]: one row per token (top-1), so plain stores.
  const int32_t* tok = token_of_row.data_as<const int32_t>();
  return dtypes::dispatch_float(x.dtype, "expert_mlp_combine_top1_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const acc_t<T>* pw = weights.data_as<const acc_t<T>>();
    const T* po = out.data_as<const T>();
    T* py = y.data_as<T>();
    parallel_for(oE - o0, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)), [&](int64_t i0, int64_t i1) {
      for (int64_t r = o0 + i0; r < o0 + i1; ++r) {
        const int64_t t = tok[r];
        if (t < 0 || t >= T_) continue;  // padding row
        const T* s = po + r * out.stride(0);
        T* d = py + t * y.stride(0);
        const acc_t<T> w = pw[t];
        for (int64_t h = 0; h < H; ++h) d[h] = from_acc<T>(w * to_acc(s[h]));
      }
    });
    return Status::Ok();
  });
}

Status expert_mlp_backward(const ExpertMlpParams& params, const TensorView& grad_ys, const TensorView& x,
                           const TensorView& token_of_row, const TensorView& row_of, const TensorView& offsets,
                           const TensorView& w1, const TensorView& w2, const TensorView& pre, const TensorView& act,
                           const TensorView& grad_x, const TensorView& grad_w1, const TensorView& grad_w2,
                           const TensorView& workspace) {
  const int64_t R = grad_ys.size(0), H = grad_ys.size(1), F = act.size(1), F1 = pre.size(1);
  SMOE_RETURN_IF_ERROR(check_offsets("expert_mlp_backward", offsets, R));  // the one scan of offsets
  const int64_t E = offsets.size(0) - 1;
  const int64_t o0 = offsets.data_as<const int64_t>()[0], oE = offsets.data_as<const int64_t>()[E];
  WorkspaceCarver ws(workspace);                              // layout: csrc/core/workspace.h
  const TensorView grad_act = ws.take(grad_ys.dtype, R, F);   // [R, F]
  const TensorView grad_pre = ws.take(grad_ys.dtype, R, F1);  // [R, F1]
  const TensorView grad_xs = ws.take(grad_ys.dtype, R, H);    // [R, H]: first x gathered, then grad_xs
  const GroupedGemmParams nn{false};
  SMOE_RETURN_IF_ERROR(grouped_gemm_prechecked(nn, grad_ys, w2, offsets, grad_act));
  SMOE_RETURN_IF_ERROR(grouped_gemm_wgrad_prechecked(grad_ys, act, offsets, grad_w2));
  SMOE_RETURN_IF_ERROR(
      activation_backward(params.activation, rows(pre, o0, oE), rows(grad_act, o0, oE), rows(grad_pre, o0, oE)));
  SMOE_RETURN_IF_ERROR(permute_forward(x, token_of_row, grad_xs));  // x read through token_of_row again
  SMOE_RETURN_IF_ERROR(grouped_gemm_wgrad_prechecked(grad_pre, grad_xs, offsets, grad_w1));
  SMOE_RETURN_IF_ERROR(grouped_gemm_prechecked(nn, grad_pre, w1, offsets, grad_xs));
  zero_outside(grad_xs, o0, oE);  // rows of no expert send no gradient back
  return permute_backward(grad_xs, row_of, grad_x);
}

Status shared_expert_forward(const ExpertMlpParams& params, const TensorView& x, const TensorView& w1,
                             const TensorView& w2, const TensorView& gate_w, const TensorView& pre,
                             const TensorView& act, const TensorView& out, const TensorView& gate,
                             const TensorView& y) {
  const int64_t T_ = x.size(0);
  int64_t seg[2] = {0, T_};  // one segment over every token: valid by construction
  const TensorView offsets = make_view(seg, {2});
  SMOE_RETURN_IF_ERROR(grouped_gemm_prechecked(GroupedGemmParams{true}, x, as_one_expert(w1), offsets, pre));
  SMOE_RETURN_IF_ERROR(activation_forward(params.activation, pre, act));
  SMOE_RETURN_IF_ERROR(grouped_gemm_prechecked(GroupedGemmParams{true}, act, as_one_expert(w2), offsets, out));
  return dtypes::dispatch_float(x.dtype, "shared_expert_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const acc_t<T>* scale = nullptr;
    if (gate_w.defined()) {
      gate_forward<T>(x, gate_w, gate);
      scale = gate.data_as<const acc_t<T>>();
    } else if (gate.defined()) {
      std::fill(gate.data_as<acc_t<T>>(), gate.data_as<acc_t<T>>() + T_, acc_t<T>(1));
    }
    accumulate_rows<T>(y, out, scale, nullptr, nullptr);
    return Status::Ok();
  });
}

Status shared_expert_backward(const ExpertMlpParams& params, const TensorView& grad_y, const TensorView& x,
                              const TensorView& w1, const TensorView& w2, const TensorView& gate_w,
                              const TensorView& pre, const TensorView& act, const TensorView& out,
                              const TensorView& gate, const TensorView& grad_x, const TensorView& grad_w1,
                              const TensorView& grad_w2, const TensorView& grad_gate_w, const TensorView& workspace) {
  const int64_t T_ = x.size(0), H = x.size(1), F = act.size(1), F1 = pre.size(1);
  const DType dt = x.dtype;
  int64_t seg[2] = {0, T_};
  const TensorView offsets = make_view(seg, {2});
  WorkspaceCarver ws(workspace);
  const TensorView grad_out = ws.take(dt, T_, H);           // [T, H] gate * grad_y
  const TensorView grad_act = ws.take(dt, T_, F);           // [T, F]
  const TensorView grad_pre = ws.take(dt, T_, F1);          // [T, F1]
  const TensorView grad_xs = ws.take(dt, T_, H);            // [T, H]
  const TensorView dlogit = ws.take(acc_dtype(dt), T_, 1);  // [T]

  const bool gated = gate_w.defined();
  if (gated) {
    SMOE_RETURN_IF_ERROR(dtypes::dispatch_float(dt, "shared_expert_backward", [&](auto tag) {
      using T = typename decltype(tag)::type;
      gate_backward<T>(grad_y, out, gate, x, grad_out, dlogit.data_as<acc_t<T>>(), grad_gate_w);
      return Status::Ok();
    }));
  }
  const TensorView& g_out = gated ? grad_out : grad_y;
  const GroupedGemmParams nn{false};
  const TensorView gw1 = as_one_expert(grad_w1), gw2 = as_one_expert(grad_w2);
  SMOE_RETURN_IF_ERROR(grouped_gemm_prechecked(nn, g_out, as_one_expert(w2), offsets, grad_act));
  SMOE_RETURN_IF_ERROR(grouped_gemm_wgrad_prechecked(g_out, act, offsets, gw2));
  SMOE_RETURN_IF_ERROR(activation_backward(params.activation, pre, grad_act, grad_pre));
  SMOE_RETURN_IF_ERROR(grouped_gemm_wgrad_prechecked(grad_pre, x, offsets, gw1));
  SMOE_RETURN_IF_ERROR(grouped_gemm_prechecked(nn, grad_pre, as_one_expert(w1), offsets, grad_xs));
  return dtypes::dispatch_float(dt, "shared_expert_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    accumulate_rows<T>(grad_x, grad_xs, nullptr, gated ? dlogit.data_as<const acc_t<T>>() : nullptr,
                       gated ? gate_w.data_as<const T>() : nullptr);
    return Status::Ok();
  });
}

}  // namespace smoe::cpu

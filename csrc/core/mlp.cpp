// Public entry points of the expert MLP / shared-expert op family: validate every argument, then
// dispatch: the CPU composition (csrc/cpu/mlp.cpp, reads the segment bounds on the host) or the device
// one (csrc/cuda/mlp.cu, reads them only on the device) for 'cuda' and 'simt'.
#include "smoe/ops/mlp.h"

#include <algorithm>
#include <string>

#include "core/check.h"
#include "core/dispatch.h"
#include "core/workspace.h"
#include "cpu/mlp.h"

namespace smoe {
namespace {

// The op-scoped Checker of csrc/core/check.h (`ref`: the first float tensor, whose dtype and device
// are everyone's), with the three argument shapes this family repeats.
struct Checker : detail::Checker {
  using detail::Checker::Checker;

  // A float tensor in ref's dtype (ref itself: any float dtype), dense (rows only: row_strided) on ref's device.
  Status float_tensor(const char* name, const TensorView& v, int ndim, const char* layout, bool row_strided) const {
    return arg(name, v).dims(ndim, layout).ref_dtype().dense(row_strided).same_device();
  }
  Status size(const char* name, const TensorView& v, int dim, int64_t value, const char* meaning) const {
    return arg(name, v).size(dim, value, meaning);
  }
  Status index_tensor(const char* name, const TensorView& v, int ndim, const char* layout, DType dt) const {
    return arg(name, v).dims(ndim, layout).dtype(dt).contiguous().same_device();
  }
};

Status expect_activation(const Checker& c, Activation act) {
  return detail::check_activation(c, "params.activation", act);
}

const char* f1_meaning(const ExpertMlpParams& p) {
  return is_gated(p.activation) ? "F1 = 2F (gated activation, F = w2's last size)" : "F1 = F (= w2's last size)";
}

int64_t nonneg(int64_t v) { return v < 0 ? 0 : v; }

using mlp_workspace::total;  // the one layout contract: csrc/core/workspace.h

}  // namespace

// ---- expert MLP ----------------------------------------------------------------------------------

namespace {

// The expert weights every expert-MLP op takes: offsets [E+1], w2 [E, H, F], w1 [E, F1, H].
// `h_meaning` names where H comes from in the calling op; F is returned.
Status check_expert_weights(const Checker& c, const ExpertMlpParams& params, const TensorView& offsets,
                            const TensorView& w1, const TensorView& w2, int64_t H, const char* h_meaning,
                            int64_t* F_out) {
  SMOE_RETURN_IF_ERROR(c.offsets(offsets));
  const int64_t E = offsets.size(0) - 1;
  SMOE_RETURN_IF_ERROR(c.float_tensor("w2", w2, 3, "[E, H, F]", false));
  SMOE_RETURN_IF_ERROR(c.size("w2", w2, 0, E, "E (= offsets.size(0) - 1)"));
  SMOE_RETURN_IF_ERROR(c.size("w2", w2, 1, H, h_meaning));
  const int64_t F = w2.size(2), F1 = is_gated(params.activation) ? 2 * F : F;
  SMOE_RETURN_IF_ERROR(c.float_tensor("w1", w1, 3, "[E, F1, H]", false));
  SMOE_RETURN_IF_ERROR(c.size("w1", w1, 0, E, "E (= offsets.size(0) - 1)"));
  SMOE_RETURN_IF_ERROR(c.size("w1", w1, 1, F1, f1_meaning(params)));
  SMOE_RETURN_IF_ERROR(c.size("w1", w1, 2, H, h_meaning));
  *F_out = F;
  return Status::Ok();
}

// The tensors the expert MLP's forward and backward share: the expert weights (check_expert_weights)
// and the saved pre [R, F1], act [R, F]. `r_meaning` / `h_meaning` name where R and H come from in
// the calling op; F is returned.
Status check_expert_tensors(const Checker& c, const ExpertMlpParams& params, const TensorView& offsets,
                            const TensorView& w1, const TensorView& w2, const TensorView& pre, const TensorView& act,
                            int64_t R, const char* r_meaning, int64_t H, const char* h_meaning, int64_t* F_out) {
  int64_t F = 0;
  SMOE_RETURN_IF_ERROR(check_expert_weights(c, params, offsets, w1, w2, H, h_meaning, &F));
  const int64_t F1 = is_gated(params.activation) ? 2 * F : F;
  SMOE_RETURN_IF_ERROR(c.float_tensor("pre", pre, 2, "[R, F1]", true));
  SMOE_RETURN_IF_ERROR(c.size("pre", pre, 0, R, r_meaning));
  SMOE_RETURN_IF_ERROR(c.size("pre", pre, 1, F1, f1_meaning(params)));
  SMOE_RETURN_IF_ERROR(c.float_tensor("act", act, 2, "[R, F]", true));
  SMOE_RETURN_IF_ERROR(c.size("act", act, 0, R, r_meaning));
  SMOE_RETURN_IF_ERROR(c.size("act", act, 1, F, "F (= w2.size(2))"));
  *F_out = F;
  return Status::Ok();
}

}  // namespace

Status expert_mlp_forward(const Exec& exec, const ExpertMlpParams& params, const TensorView& x,
                          const TensorView& token_of_row, const TensorView& offsets, const TensorView& w1,
                          const TensorView& w2, const TensorView& pre, const TensorView& act, const TensorView& ys) {
  const Checker c{"expert_mlp_forward", x, "x"};
  SMOE_RETURN_IF_ERROR(expect_activation(c, params.activation));
  SMOE_RETURN_IF_ERROR(c.float_tensor("x", x, 2, "[T, H]", true));
  const int64_t H = x.size(1);
  SMOE_RETURN_IF_ERROR(c.index_tensor("token_of_row", token_of_row, 1, "[R]", DType::kI32));
  const int64_t R = token_of_row.size(0);
  int64_t F = 0;
  SMOE_RETURN_IF_ERROR(check_expert_tensors(c, params, offsets, w1, w2, pre, act, R, "R (= token_of_row.size(0))", H,
                                            "H (= x.size(1))", &F));
  SMOE_RETURN_IF_ERROR(c.float_tensor("ys", ys, 2, "[R, H]", true));
  SMOE_RETURN_IF_ERROR(c.size("ys", ys, 0, R, "R (= token_of_row.size(0))"));
  SMOE_RETURN_IF_ERROR(c.size("ys", ys, 1, H, "H (= x.size(1))"));
  // Zero rows: nothing to compute on the CPU; the device launchers return early themselves (and an
  // unbuilt device backend still says so).
  return detail::dispatch(
      c.op, exec, x, /*has_work=*/true,
      [&] {
        if (R == 0) return Status::Ok();
        return cpu::expert_mlp_forward(params, x, token_of_row, offsets, w1, w2, pre, act, ys);
      },
      [&](Backend b) {
        return SMOE_DEVICE_DISPATCH(c.op, b, exec, expert_mlp_forward, params, x, token_of_row, offsets, w1, w2, pre,
                                    act, ys);
      });
}

int64_t expert_mlp_combine_top1_workspace_bytes(const ExpertMlpParams& params, DType dtype, int64_t R, int64_t H,
                                                int64_t F) {
  R = nonneg(R), H = nonneg(H), F = nonneg(F);
  const int64_t F1 = is_gated(params.activation) ? sat_mul(2, F) : F;
  const int64_t es = dtype_size(dtype);
  // pre [R, F1], act [R, F], rows [R, H] (the CPU backend's gathered x / second GEMM output).
  return total({sat_mul(sat_mul(R, F1), es), sat_mul(sat_mul(R, F), es), sat_mul(sat_mul(R, H), es)});
}

Status expert_mlp_combine_top1_forward(const Exec& exec, const ExpertMlpParams& params, const TensorView& x,
                                       const TensorView& token_of_row, const TensorView& offsets, const TensorView& w1,
                                       const TensorView& w2, const TensorView& weights, const TensorView& y,
                                       const TensorView& workspace) {
  const Checker c{"expert_mlp_combine_top1_forward", x, "x"};
  SMOE_RETURN_IF_ERROR(expect_activation(c, params.activation));
  SMOE_RETURN_IF_ERROR(c.float_tensor("x", x, 2, "[T, H]", true));
  const int64_t T = x.size(0), H = x.size(1);
  SMOE_RETURN_IF_ERROR(c.index_tensor("token_of_row", token_of_row, 1, "[R]", DType::kI32));
  const int64_t R = token_of_row.size(0);
  int64_t F = 0;
  SMOE_RETURN_IF_ERROR(check_expert_weights(c, params, offsets, w1, w2, H, "H (= x.size(1))", &F));
  SMOE_RETURN_IF_ERROR(c.arg("weights", weights)
                           .dims(2, "[T, 1] (f32; f64 for f64 x)")
                           .dtype(acc_dtype(x.dtype))
                           .contiguous()
                           .same_device()
                           .size(0, T, "T (= x.size(0))")
                           .size(1, 1, "1 (top-1 routing)"));
  SMOE_RETURN_IF_ERROR(c.float_tensor("y", y, 2, "[T, H]", true));
  SMOE_RETURN_IF_ERROR(c.size("y", y, 0, T, "T (= x.size(0))"));
  SMOE_RETURN_IF_ERROR(c.size("y", y, 1, H, "H (= x.size(1))"));
  SMOE_RETURN_IF_ERROR(c.workspace(workspace, expert_mlp_combine_top1_workspace_bytes(params, x.dtype, R, H, F)));
  // No early return for R == 0: y must still become zeros.
  return SMOE_DISPATCH(c.op, exec, x, expert_mlp_combine_top1_forward, params, x, token_of_row, offsets, w1, w2,
                       weights, y, workspace);
}

int64_t expert_mlp_workspace_bytes(const ExpertMlpParams& params, DType dtype, int64_t R, int64_t H, int64_t F) {
  R = nonneg(R), H = nonneg(H), F = nonneg(F);
  const int64_t F1 = is_gated(params.activation) ? sat_mul(2, F) : F;
  const int64_t es = dtype_size(dtype);
  // grad_act [R, F], grad_pre [R, F1], grad_xs [R, H], plus room to align the base pointer.
  return total({sat_mul(sat_mul(R, F), es), sat_mul(sat_mul(R, F1), es), sat_mul(sat_mul(R, H), es)});
}

Status expert_mlp_backward(const Exec& exec, const ExpertMlpParams& params, const TensorView& grad_ys,
                           const TensorView& x, const TensorView& token_of_row, const TensorView& row_of,
                           const TensorView& offsets, const TensorView& w1, const TensorView& w2, const TensorView& pre,
                           const TensorView& act, const TensorView& grad_x, const TensorView& grad_w1,
                           const TensorView& grad_w2, const TensorView& workspace) {
  const Checker c{"expert_mlp_backward", grad_ys, "grad_ys"};
  SMOE_RETURN_IF_ERROR(expect_activation(c, params.activation));
  SMOE_RETURN_IF_ERROR(c.float_tensor("grad_ys", grad_ys, 2, "[R, H]", true));
  const int64_t R = grad_ys.size(0), H = grad_ys.size(1);
  SMOE_RETURN_IF_ERROR(c.index_tensor("row_of", row_of, 2, "[T, K]", DType::kI32));
  const int64_t T = row_of.size(0);
  int64_t F = 0;
  SMOE_RETURN_IF_ERROR(c.float_tensor("x", x, 2, "[T, H]", true));
  SMOE_RETURN_IF_ERROR(c.size("x", x, 0, T, "T (= row_of.size(0))"));
  SMOE_RETURN_IF_ERROR(c.size("x", x, 1, H, "H (= grad_ys.size(1))"));
  SMOE_RETURN_IF_ERROR(c.index_tensor("token_of_row", token_of_row, 1, "[R]", DType::kI32));
  SMOE_RETURN_IF_ERROR(c.size("token_of_row", token_of_row, 0, R, "R (= grad_ys.size(0))"));
  SMOE_RETURN_IF_ERROR(check_expert_tensors(c, params, offsets, w1, w2, pre, act, R, "R (= grad_ys.size(0))", H,
                                            "H (= grad_ys.size(1))", &F));
  SMOE_RETURN_IF_ERROR(c.float_tensor("grad_x", grad_x, 2, "[T, H]", false));
  SMOE_RETURN_IF_ERROR(c.size("grad_x", grad_x, 0, T, "T (= row_of.size(0))"));
  SMOE_RETURN_IF_ERROR(c.size("grad_x", grad_x, 1, H, "H (= grad_ys.size(1))"));
  SMOE_RETURN_IF_ERROR(c.float_tensor("grad_w1", grad_w1, 3, "[E, F1, H]", false));
  for (int d = 0; d < 3; ++d) SMOE_RETURN_IF_ERROR(c.size("grad_w1", grad_w1, d, w1.size(d), "w1's size"));
  SMOE_RETURN_IF_ERROR(c.float_tensor("grad_w2", grad_w2, 3, "[E, H, F]", false));
  for (int d = 0; d < 3; ++d) SMOE_RETURN_IF_ERROR(c.size("grad_w2", grad_w2, d, w2.size(d), "w2's size"));
  SMOE_RETURN_IF_ERROR(c.workspace(workspace, expert_mlp_workspace_bytes(params, grad_ys.dtype, R, H, F)));
  // No early return for R == 0: the weight gradients must still become zeros and grad_x too.
  return SMOE_DISPATCH(c.op, exec, grad_ys, expert_mlp_backward, params, grad_ys, x, token_of_row, row_of, offsets, w1,
                       w2, pre, act, grad_x, grad_w1, grad_w2, workspace);
}

// ---- shared experts ------------------------------------------------------------------------------

namespace {

// The arguments both directions share: x, w1, w2, gate_w, pre, act, out, gate. `out_optional`: out may
// be absent when gate_w is (the backward of an ungated shared expert never reads it).
Status check_shared(const Checker& c, const ExpertMlpParams& params, const TensorView& x, const TensorView& w1,
                    const TensorView& w2, const TensorView& gate_w, const TensorView& pre, const TensorView& act,
                    const TensorView& out, const TensorView& gate, bool out_optional) {
  SMOE_RETURN_IF_ERROR(expect_activation(c, params.activation));
  SMOE_RETURN_IF_ERROR(c.float_tensor("x", x, 2, "[T, H]", true));
  const int64_t T = x.size(0), H = x.size(1);
  SMOE_RETURN_IF_ERROR(c.float_tensor("w2", w2, 2, "[H, F]", false));
  SMOE_RETURN_IF_ERROR(c.size("w2", w2, 0, H, "H (= x.size(1))"));
  const int64_t F = w2.size(1), F1 = is_gated(params.activation) ? 2 * F : F;
  SMOE_RETURN_IF_ERROR(c.float_tensor("w1", w1, 2, "[F1, H]", false));
  SMOE_RETURN_IF_ERROR(c.size("w1", w1, 0, F1, f1_meaning(params)));
  SMOE_RETURN_IF_ERROR(c.size("w1", w1, 1, H, "H (= x.size(1))"));
  if (gate_w.defined()) {
    SMOE_RETURN_IF_ERROR(c.float_tensor("gate_w", gate_w, 1, "[H]", false));
    SMOE_RETURN_IF_ERROR(c.size("gate_w", gate_w, 0, H, "H (= x.size(1))"));
  }
  SMOE_RETURN_IF_ERROR(c.float_tensor("pre", pre, 2, "[T, F1]", true));
  SMOE_RETURN_IF_ERROR(c.size("pre", pre, 0, T, "T (= x.size(0))"));
  SMOE_RETURN_IF_ERROR(c.size("pre", pre, 1, F1, f1_meaning(params)));
  SMOE_RETURN_IF_ERROR(c.float_tensor("act", act, 2, "[T, F]", true));
  SMOE_RETURN_IF_ERROR(c.size("act", act, 0, T, "T (= x.size(0))"));
  SMOE_RETURN_IF_ERROR(c.size("act", act, 1, F, "F (= w2.size(1))"));
  if (!(out_optional && !gate_w.defined() && !out.defined())) {
    SMOE_RETURN_IF_ERROR(c.float_tensor("out", out, 2, "[T, H]", true));
    SMOE_RETURN_IF_ERROR(c.size("out", out, 0, T, "T (= x.size(0))"));
    SMOE_RETURN_IF_ERROR(c.size("out", out, 1, H, "H (= x.size(1))"));
  }
  // gate: required with gate_w; optional without it (then it is filled with ones).
  if (gate_w.defined() || gate.defined()) {
    SMOE_RETURN_IF_ERROR(c.arg("gate", gate)
                             .dims(1, "[T] (f32; f64 for f64 x)")
                             .dtype(acc_dtype(x.dtype))
                             .contiguous()
                             .same_device()
                             .size(0, T, "T (= x.size(0))"));
  }
  return Status::Ok();
}

}  // namespace

Status shared_expert_forward(const Exec& exec, const ExpertMlpParams& params, const TensorView& x, const TensorView& w1,
                             const TensorView& w2, const TensorView& gate_w, const TensorView& pre,
                             const TensorView& act, const TensorView& out, const TensorView& gate,
                             const TensorView& y) {
  const Checker c{"shared_expert_forward", x, "x"};
  SMOE_RETURN_IF_ERROR(check_shared(c, params, x, w1, w2, gate_w, pre, act, out, gate, false));
  SMOE_RETURN_IF_ERROR(c.float_tensor("y", y, 2, "[T, H]", true));
  SMOE_RETURN_IF_ERROR(c.size("y", y, 0, x.size(0), "T (= x.size(0))"));
  SMOE_RETURN_IF_ERROR(c.size("y", y, 1, x.size(1), "H (= x.size(1))"));
  // Zero tokens: as in expert_mlp_forward.
  return detail::dispatch(
      c.op, exec, x, /*has_work=*/true,
      [&] {
        if (x.size(0) == 0) return Status::Ok();
        return cpu::shared_expert_forward(params, x, w1, w2, gate_w, pre, act, out, gate, y);
      },
      [&](Backend b) {
        return SMOE_DEVICE_DISPATCH(c.op, b, exec, shared_expert_forward, params, x, w1, w2, gate_w, pre, act, out,
                                    gate, y);
      });
}

int64_t shared_expert_workspace_bytes(const ExpertMlpParams& params, DType dtype, int64_t T, int64_t H, int64_t F) {
  T = nonneg(T), H = nonneg(H), F = nonneg(F);
  const int64_t F1 = is_gated(params.activation) ? sat_mul(2, F) : F;
  const int64_t es = dtype_size(dtype);
  // grad_out [T, H], grad_act [T, F], grad_pre [T, F1], grad_xs [T, H], dlogit [T] (f32, f64 for f64).
  const int64_t th = sat_mul(sat_mul(T, H), es);
  const int64_t bytes = total(
      {th, th, sat_mul(sat_mul(T, F), es), sat_mul(sat_mul(T, F1), es), sat_mul(T, dtype_size(acc_dtype(dtype)))});
  // The device backends carve their gate partials after those pieces (one size serves every backend).
  int64_t extra = 0;
#if defined(SMOE_HAVE_CUDA) && SMOE_HAVE_CUDA
  extra = std::max(extra, cuda::shared_expert_workspace_extra_bytes(T, H));
#endif
#if defined(SMOE_HAVE_CUDA_SIMT) && SMOE_HAVE_CUDA_SIMT
  extra = std::max(extra, cuda_simt::shared_expert_workspace_extra_bytes(T, H));
#endif
  return sat_add(bytes, extra);
}

Status shared_expert_backward(const Exec& exec, const ExpertMlpParams& params, const TensorView& grad_y,
                              const TensorView& x, const TensorView& w1, const TensorView& w2, const TensorView& gate_w,
                              const TensorView& pre, const TensorView& act, const TensorView& out,
                              const TensorView& gate, const TensorView& grad_x, const TensorView& grad_w1,
                              const TensorView& grad_w2, const TensorView& grad_gate_w, const TensorView& workspace) {
  const Checker c{"shared_expert_backward", x, "x"};
  SMOE_RETURN_IF_ERROR(check_shared(c, params, x, w1, w2, gate_w, pre, act, out, gate, true));
  const int64_t T = x.size(0), H = x.size(1);
  SMOE_RETURN_IF_ERROR(c.float_tensor("grad_y", grad_y, 2, "[T, H]", true));
  SMOE_RETURN_IF_ERROR(c.size("grad_y", grad_y, 0, T, "T (= x.size(0))"));
  SMOE_RETURN_IF_ERROR(c.size("grad_y", grad_y, 1, H, "H (= x.size(1))"));
  SMOE_RETURN_IF_ERROR(c.float_tensor("grad_x", grad_x, 2, "[T, H]", true));
  SMOE_RETURN_IF_ERROR(c.size("grad_x", grad_x, 0, T, "T (= x.size(0))"));
  SMOE_RETURN_IF_ERROR(c.size("grad_x", grad_x, 1, H, "H (= x.size(1))"));
  SMOE_RETURN_IF_ERROR(c.float_tensor("grad_w1", grad_w1, 2, "[F1, H]", false));
  for (int d = 0; d < 2; ++d) SMOE_RETURN_IF_ERROR(c.size("grad_w1", grad_w1, d, w1.size(d), "w1's size"));
  SMOE_RETURN_IF_ERROR(c.float_tensor("grad_w2", grad_w2, 2, "[H, F]", false));
  for (int d = 0; d < 2; ++d) SMOE_RETURN_IF_ERROR(c.size("grad_w2", grad_w2, d, w2.size(d), "w2's size"));
  if (gate_w.defined()) {
    SMOE_RETURN_IF_ERROR(c.float_tensor("grad_gate_w", grad_gate_w, 1, "[H] (gate_w is given)", false));
    SMOE_RETURN_IF_ERROR(c.size("grad_gate_w", grad_gate_w, 0, H, "H (= x.size(1))"));
  } else if (grad_gate_w.defined()) {
    return invalid_argument(c.op, "grad_gate_w", "absent (gate_w is absent)", shape_string(grad_gate_w));
  }
  SMOE_RETURN_IF_ERROR(c.workspace(workspace, shared_expert_workspace_bytes(params, x.dtype, T, H, w2.size(1))));
  // No early return for T == 0: the weight gradients must still become zeros.
  return SMOE_DISPATCH(c.op, exec, x, shared_expert_backward, params, grad_y, x, w1, w2, gate_w, pre, act, out, gate,
                       grad_x, grad_w1, grad_w2, grad_gate_w, workspace);
}

}  // namespace smoe

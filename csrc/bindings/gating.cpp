// Bindings of the gating op family (include/smoe/ops/gating.h).
#include <vector>

#include "bindings.h"

namespace py = pybind11;

namespace smoe::bindings {
namespace {

TopkGatingParams topk_params(int top_k, int score_func, int n_groups, int topk_groups, int group_score,
                             bool renormalize, float renorm_eps, float routed_scaling) {
  TopkGatingParams p;
  p.top_k = top_k;
  p.score_func = static_cast<ScoreFunc>(score_func);
  p.n_groups = n_groups;
  p.topk_groups = topk_groups;
  p.group_score = static_cast<GroupScore>(group_score);
  p.renormalize = renormalize;
  p.renorm_eps = renorm_eps;
  p.routed_scaling = routed_scaling;
  return p;
}

#define SMOE_TOPK_PARAM_ARGS                                                                         \
  py::arg("top_k"), py::arg("score_func"), py::arg("n_groups"), py::arg("topk_groups"),              \
      py::arg("group_score"), py::arg("renormalize"), py::arg("renorm_eps"), py::arg("routed_scaling")

// Interim (issue 8, core helper's tree only; the py helper's binding, which takes the workspace from
// Python, replaces this): a host scratch buffer for CPU tensors when the caller passed none, so that
// backend 'simt' keeps working with the Python layer that does not allocate it yet.
struct HostScratch {
  std::vector<double> buf;
  TensorView view;
  HostScratch(const TensorView& given, const TensorView& ref, int64_t bytes) : view(given) {
    if (given.defined() || ref.device != Device::kCPU || bytes <= 0) return;
    buf.resize(size_t(bytes + 7) / 8);
    view = make_view(static_cast<void*>(buf.data()), DType::kU8, {int64_t(buf.size() * 8)});
  }
};

}  // namespace

void bind_gating(py::module_& m) {
  m.def(
      "topk_gating_forward",
      [](int backend, uintptr_t stream, int top_k, int score_func, int n_groups, int topk_groups, int group_score,
         bool renormalize, float renorm_eps, float routed_scaling, py::handle logits, py::handle bias,
         py::handle weights, py::handle experts, py::handle scores) {
        const Exec exec = to_exec(backend, stream);
        const TopkGatingParams p =
            topk_params(top_k, score_func, n_groups, topk_groups, group_score, renormalize, renorm_eps, routed_scaling);
        const TensorView vl = SMOE_VIEW(logits), vb = SMOE_VIEW(bias), vw = SMOE_VIEW(weights),
                         ve = SMOE_VIEW(experts), vs = SMOE_VIEW(scores);
        call_core([&] { return topk_gating_forward(exec, p, vl, vb, vw, ve, vs); });
      },
      py::arg("backend"), py::arg("stream"), SMOE_TOPK_PARAM_ARGS, py::arg("logits"), py::arg("bias"),
      py::arg("weights"), py::arg("experts"), py::arg("scores"));

  m.def(
      "topk_gating_backward",
      [](int backend, uintptr_t stream, int top_k, int score_func, int n_groups, int topk_groups, int group_score,
         bool renormalize, float renorm_eps, float routed_scaling, py::handle scores, py::handle experts,
         py::handle grad_weights, py::handle grad_scores, py::handle grad_logits) {
        const Exec exec = to_exec(backend, stream);
        const TopkGatingParams p =
            topk_params(top_k, score_func, n_groups, topk_groups, group_score, renormalize, renorm_eps, routed_scaling);
        const TensorView vs = SMOE_VIEW(scores), ve = SMOE_VIEW(experts), vgw = SMOE_VIEW(grad_weights),
                         vgs = SMOE_VIEW(grad_scores), vgl = SMOE_VIEW(grad_logits);
        call_core([&] { return topk_gating_backward(exec, p, vs, ve, vgw, vgs, vgl); });
      },
      py::arg("backend"), py::arg("stream"), SMOE_TOPK_PARAM_ARGS, py::arg("scores"), py::arg("experts"),
      py::arg("grad_weights"), py::arg("grad_scores"), py::arg("grad_logits"));

  m.def(
      "expert_choice_forward",
      [](int backend, uintptr_t stream, int capacity, int score_func, py::handle logits, py::handle scores,
         py::handle tokens, py::handle row_of, py::handle weights) {
        const Exec exec = to_exec(backend, stream);
        ExpertChoiceParams p;
        p.capacity = capacity;
        p.score_func = static_cast<ScoreFunc>(score_func);
        const TensorView vl = SMOE_VIEW(logits), vs = SMOE_VIEW(scores), vt = SMOE_VIEW(tokens),
                         vr = SMOE_VIEW(row_of), vw = SMOE_VIEW(weights);
        call_core([&] { return expert_choice_forward(exec, p, vl, vs, vt, vr, vw); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("capacity"), py::arg("score_func"), py::arg("logits"),
      py::arg("scores"), py::arg("tokens"), py::arg("row_of"), py::arg("weights"));

  m.def(
      "expert_choice_backward",
      [](int backend, uintptr_t stream, int capacity, int score_func, py::handle scores, py::handle row_of,
         py::handle grad_weights, py::handle grad_logits) {
        const Exec exec = to_exec(backend, stream);
        ExpertChoiceParams p;
        p.capacity = capacity;
        p.score_func = static_cast<ScoreFunc>(score_func);
        const TensorView vs = SMOE_VIEW(scores), vr = SMOE_VIEW(row_of), vgw = SMOE_VIEW(grad_weights),
                         vgl = SMOE_VIEW(grad_logits);
        call_core([&] { return expert_choice_backward(exec, p, vs, vr, vgw, TensorView{}, vgl); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("capacity"), py::arg("score_func"), py::arg("scores"),
      py::arg("row_of"), py::arg("grad_weights"), py::arg("grad_logits"));

  m.def(
      "load_balancing_loss_forward",
      [](int backend, uintptr_t stream, py::handle probs, py::handle experts, py::handle loss, py::handle workspace) {
        const Exec exec = to_exec(backend, stream);
        const TensorView vp = SMOE_VIEW(probs), ve = SMOE_VIEW(experts), vl = SMOE_VIEW(loss);
        const HostScratch ws(SMOE_VIEW(workspace), vp, load_balancing_loss_workspace_bytes(vp.size(0), vp.size(1)));
        call_core([&] { return load_balancing_loss_forward(exec, vp, ve, vl, ws.view); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("probs"), py::arg("experts"), py::arg("loss"),
      py::arg("workspace") = py::none());

  m.def(
      "load_balancing_loss_backward",
      [](int backend, uintptr_t stream, py::handle probs, py::handle experts, py::handle grad_loss,
         py::handle grad_probs, py::handle workspace) {
        const Exec exec = to_exec(backend, stream);
        const TensorView vp = SMOE_VIEW(probs), ve = SMOE_VIEW(experts), vg = SMOE_VIEW(grad_loss),
                         vgp = SMOE_VIEW(grad_probs);
        const HostScratch ws(SMOE_VIEW(workspace), vp, load_balancing_loss_workspace_bytes(vp.size(0), vp.size(1)));
        call_core([&] { return load_balancing_loss_backward(exec, vp, ve, vg, vgp, ws.view); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("probs"), py::arg("experts"), py::arg("grad_loss"),
      py::arg("grad_probs"), py::arg("workspace") = py::none());

  m.def(
      "z_loss_forward",
      [](int backend, uintptr_t stream, py::handle logits, py::handle loss, py::handle workspace) {
        const Exec exec = to_exec(backend, stream);
        const TensorView vl = SMOE_VIEW(logits), vloss = SMOE_VIEW(loss);
        const HostScratch ws(SMOE_VIEW(workspace), vl, z_loss_workspace_bytes(vl.size(0), vl.size(1)));
        call_core([&] { return z_loss_forward(exec, vl, vloss, ws.view); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("logits"), py::arg("loss"), py::arg("workspace") = py::none());

  m.def(
      "z_loss_backward",
      [](int backend, uintptr_t stream, py::handle logits, py::handle grad_loss, py::handle grad_logits,
         py::handle workspace) {
        const Exec exec = to_exec(backend, stream);
        const TensorView vl = SMOE_VIEW(logits), vg = SMOE_VIEW(grad_loss), vgl = SMOE_VIEW(grad_logits);
        const HostScratch ws(SMOE_VIEW(workspace), vl, z_loss_workspace_bytes(vl.size(0), vl.size(1)));
        call_core([&] { return z_loss_backward(exec, vl, vg, vgl, ws.view); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("logits"), py::arg("grad_loss"), py::arg("grad_logits"),
      py::arg("workspace") = py::none());

  m.def(
      "balancing_bias_update",
      [](int backend, uintptr_t stream, py::handle counts, py::handle bias, float rate) {
        const Exec exec = to_exec(backend, stream);
        const TensorView vc = SMOE_VIEW(counts), vb = SMOE_VIEW(bias);
        call_core([&] { return balancing_bias_update(exec, vc, vb, rate); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("counts"), py::arg("bias"), py::arg("rate"));
}

}  // namespace smoe::bindings

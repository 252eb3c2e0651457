// Bindings of token-choice top-k gating (include/smoe/ops/gating.h); Python side: python/smoe/ops/topk_gating.py.
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

#define SMOE_TOPK_PARAM_ARGS                                                                                    \
  py::arg("top_k"), py::arg("score_func"), py::arg("n_groups"), py::arg("topk_groups"), py::arg("group_score"), \
      py::arg("renormalize"), py::arg("renorm_eps"), py::arg("routed_scaling")

}  // namespace

void bind_topk_gating(py::module_& m) {
  m.def(
      "topk_gating_forward",
      [](int backend, uintptr_t stream, int top_k, int score_func, int n_groups, int topk_groups, int group_score,
         bool renormalize, float renorm_eps, float routed_scaling, py::handle logits, py::handle bias,
         py::handle weights, py::handle experts, py::handle scores) {
        const Exec exec = to_exec(backend, stream);
        const TopkGatingParams p =
            topk_params(top_k, score_func, n_groups, topk_groups, group_score, renormalize, renorm_eps, routed_scaling);
        const TensorView vl = SMOE_VIEW(logits), vb = SMOE_VIEW(bias), vw = SMOE_VIEW(weights), ve = SMOE_VIEW(experts),
                         vs = SMOE_VIEW(scores);
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
}

}  // namespace smoe::bindings

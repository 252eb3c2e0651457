// Bindings of expert-choice routing (include/smoe/ops/gating.h); Python side: python/smoe/ops/expert_choice.py.
#include "bindings.h"

namespace py = pybind11;

namespace smoe::bindings {
void bind_expert_choice(py::module_& m) {
  m.def(
      "expert_choice_forward",
      [](int backend, uintptr_t stream, int capacity, int score_func, py::handle logits, py::handle scores,
         py::handle tokens, py::handle row_of, py::handle weights) {
        const Exec exec = to_exec(backend, stream);
        ExpertChoiceParams p;
        p.capacity = capacity;
        p.score_func = static_cast<ScoreFunc>(score_func);
        const TensorView vl = SMOE_VIEW(logits), vs = SMOE_VIEW(scores), vt = SMOE_VIEW(tokens), vr = SMOE_VIEW(row_of),
                         vw = SMOE_VIEW(weights);
        call_core([&] { return expert_choice_forward(exec, p, vl, vs, vt, vr, vw); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("capacity"), py::arg("score_func"), py::arg("logits"),
      py::arg("scores"), py::arg("tokens"), py::arg("row_of"), py::arg("weights"));

  m.def(
      "expert_choice_backward",
      [](int backend, uintptr_t stream, int capacity, int score_func, py::handle scores, py::handle row_of,
         py::handle grad_weights, py::handle grad_scores, py::handle grad_logits) {
        const Exec exec = to_exec(backend, stream);
        ExpertChoiceParams p;
        p.capacity = capacity;
        p.score_func = static_cast<ScoreFunc>(score_func);
        const TensorView vs = SMOE_VIEW(scores), vr = SMOE_VIEW(row_of), vgw = SMOE_VIEW(grad_weights),
                         vgs = SMOE_VIEW(grad_scores), vgl = SMOE_VIEW(grad_logits);
        call_core([&] { return expert_choice_backward(exec, p, vs, vr, vgw, vgs, vgl); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("capacity"), py::arg("score_func"), py::arg("scores"),
      py::arg("row_of"), py::arg("grad_weights"), py::arg("grad_scores"), py::arg("grad_logits"));
}

}  // namespace smoe::bindings

// Bindings of the router losses and the aux-loss-free bias update (include/smoe/ops/gating.h);
// Python side: python/smoe/ops/router_losses.py.
#include "bindings.h"

namespace py = pybind11;

namespace smoe::bindings {
void bind_router_losses(py::module_& m) {
  // Scratch sizes of the losses (forward and backward); python/smoe/ops/router_losses.py mirrors the
  // formulas and a test checks both agree, so a step does not cross into C++ to ask.
  m.def("load_balancing_loss_workspace_bytes", &load_balancing_loss_workspace_bytes, py::arg("T"), py::arg("E"));
  m.def("z_loss_workspace_bytes", &z_loss_workspace_bytes, py::arg("T"), py::arg("E"));

  m.def(
      "load_balancing_loss_forward",
      [](int backend, uintptr_t stream, py::handle probs, py::handle experts, py::handle loss, py::handle workspace) {
        const Exec exec = to_exec(backend, stream);
        const TensorView vp = SMOE_VIEW(probs), ve = SMOE_VIEW(experts), vl = SMOE_VIEW(loss),
                         vws = SMOE_VIEW(workspace);
        call_core([&] { return load_balancing_loss_forward(exec, vp, ve, vl, vws); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("probs"), py::arg("experts"), py::arg("loss"),
      py::arg("workspace"));

  m.def(
      "load_balancing_loss_backward",
      [](int backend, uintptr_t stream, py::handle probs, py::handle experts, py::handle grad_loss,
         py::handle grad_probs, py::handle workspace) {
        const Exec exec = to_exec(backend, stream);
        const TensorView vp = SMOE_VIEW(probs), ve = SMOE_VIEW(experts), vg = SMOE_VIEW(grad_loss),
                         vgp = SMOE_VIEW(grad_probs), vws = SMOE_VIEW(workspace);
        call_core([&] { return load_balancing_loss_backward(exec, vp, ve, vg, vgp, vws); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("probs"), py::arg("experts"), py::arg("grad_loss"),
      py::arg("grad_probs"), py::arg("workspace"));

  m.def(
      "z_loss_forward",
      [](int backend, uintptr_t stream, py::handle logits, py::handle loss, py::handle workspace) {
        const Exec exec = to_exec(backend, stream);
        const TensorView vl = SMOE_VIEW(logits), vloss = SMOE_VIEW(loss), vws = SMOE_VIEW(workspace);
        call_core([&] { return z_loss_forward(exec, vl, vloss, vws); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("logits"), py::arg("loss"), py::arg("workspace"));

  m.def(
      "z_loss_backward",
      [](int backend, uintptr_t stream, py::handle logits, py::handle grad_loss, py::handle grad_logits,
         py::handle workspace) {
        const Exec exec = to_exec(backend, stream);
        const TensorView vl = SMOE_VIEW(logits), vg = SMOE_VIEW(grad_loss), vgl = SMOE_VIEW(grad_logits),
                         vws = SMOE_VIEW(workspace);
        call_core([&] { return z_loss_backward(exec, vl, vg, vgl, vws); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("logits"), py::arg("grad_loss"), py::arg("grad_logits"),
      py::arg("workspace"));

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

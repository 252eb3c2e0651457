// Bindings of the expert activations (include/smoe/ops/gemm.h); Python side: python/smoe/ops/activation.py.
#include "bindings.h"

namespace py = pybind11;

namespace smoe::bindings {

void bind_activation(py::module_& m) {
  m.def(
      "activation_forward",
      [](int backend, uintptr_t stream, int act, py::handle in, py::handle out) {
        const Exec exec = to_exec(backend, stream);
        const TensorView vi = SMOE_VIEW(in), vo = SMOE_VIEW(out);
        call_core([&] { return activation_forward(exec, static_cast<Activation>(act), vi, vo); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("act"), py::arg("in"), py::arg("out"));

  m.def(
      "activation_backward",
      [](int backend, uintptr_t stream, int act, py::handle in, py::handle grad_out, py::handle grad_in) {
        const Exec exec = to_exec(backend, stream);
        const TensorView vi = SMOE_VIEW(in), vgo = SMOE_VIEW(grad_out), vgi = SMOE_VIEW(grad_in);
        call_core([&] { return activation_backward(exec, static_cast<Activation>(act), vi, vgo, vgi); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("act"), py::arg("in"), py::arg("grad_out"), py::arg("grad_in"));
}

}  // namespace smoe::bindings

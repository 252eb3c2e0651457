// Bindings of the grouped GEMMs and the expert activations (include/smoe/ops/gemm.h).
#include "bindings.h"

namespace py = pybind11;

namespace smoe::bindings {

void bind_gemm(py::module_& m) {
  m.def(
      "grouped_gemm",
      [](int backend, uintptr_t stream, bool trans_b, py::handle a, py::handle b, py::handle offsets, py::handle c) {
        const Exec exec = to_exec(backend, stream);
        GroupedGemmParams p;
        p.trans_b = trans_b;
        const TensorView va = SMOE_VIEW(a), vb = SMOE_VIEW(b), vo = SMOE_VIEW(offsets), vc = SMOE_VIEW(c);
        call_core([&] { return grouped_gemm(exec, p, va, vb, vo, vc); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("trans_b"), py::arg("a"), py::arg("b"), py::arg("offsets"),
      py::arg("c"));

  m.def(
      "grouped_gemm_wgrad",
      [](int backend, uintptr_t stream, py::handle a, py::handle b, py::handle offsets, py::handle c) {
        const Exec exec = to_exec(backend, stream);
        const TensorView va = SMOE_VIEW(a), vb = SMOE_VIEW(b), vo = SMOE_VIEW(offsets), vc = SMOE_VIEW(c);
        call_core([&] { return grouped_gemm_wgrad(exec, va, vb, vo, vc); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("a"), py::arg("b"), py::arg("offsets"), py::arg("c"));

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

// Bindings of the grouped GEMMs (include/smoe/ops/gemm.h); Python side: python/smoe/ops/gemm.py.
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
}

}  // namespace smoe::bindings

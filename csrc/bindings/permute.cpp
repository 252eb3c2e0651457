// Bindings of permute and combine (include/smoe/ops/permute.h).
#include "bindings.h"

namespace py = pybind11;

namespace smoe::bindings {

void bind_permute(py::module_& m) {
  m.def(
      "permute_forward",
      [](int backend, uintptr_t stream, py::handle x, py::handle token_of_row, py::handle xs) {
        const Exec exec = to_exec(backend, stream);
        const TensorView vx = SMOE_VIEW(x), vt = SMOE_VIEW(token_of_row), vxs = SMOE_VIEW(xs);
        call_core([&] { return permute_forward(exec, vx, vt, vxs); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("x"), py::arg("token_of_row"), py::arg("xs"));

  m.def(
      "permute_backward",
      [](int backend, uintptr_t stream, py::handle grad_xs, py::handle row_of, py::handle grad_x) {
        const Exec exec = to_exec(backend, stream);
        const TensorView vg = SMOE_VIEW(grad_xs), vr = SMOE_VIEW(row_of), vgx = SMOE_VIEW(grad_x);
        call_core([&] { return permute_backward(exec, vg, vr, vgx); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("grad_xs"), py::arg("row_of"), py::arg("grad_x"));

  m.def(
      "combine_forward",
      [](int backend, uintptr_t stream, py::handle ys, py::handle weights, py::handle row_of, py::handle y) {
        const Exec exec = to_exec(backend, stream);
        const TensorView vys = SMOE_VIEW(ys), vw = SMOE_VIEW(weights), vr = SMOE_VIEW(row_of), vy = SMOE_VIEW(y);
        call_core([&] { return combine_forward(exec, vys, vw, vr, vy); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("ys"), py::arg("weights"), py::arg("row_of"), py::arg("y"));

  m.def(
      "combine_backward",
      [](int backend, uintptr_t stream, py::handle grad_y, py::handle ys, py::handle weights, py::handle row_of,
         py::handle grad_ys, py::handle grad_weights) {
        const Exec exec = to_exec(backend, stream);
        const TensorView vgy = SMOE_VIEW(grad_y), vys = SMOE_VIEW(ys), vw = SMOE_VIEW(weights), vr = SMOE_VIEW(row_of),
                         vgys = SMOE_VIEW(grad_ys), vgw = SMOE_VIEW(grad_weights);
        call_core([&] { return combine_backward(exec, vgy, vys, vw, vr, vgys, vgw); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("grad_y"), py::arg("ys"), py::arg("weights"), py::arg("row_of"),
      py::arg("grad_ys"), py::arg("grad_weights"));
}

}  // namespace smoe::bindings

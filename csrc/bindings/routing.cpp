// Bindings of the routing plan (include/smoe/ops/routing.h) and its size queries.
#include "bindings.h"

namespace py = pybind11;

namespace smoe::bindings {
namespace {

RoutingPlanParams plan_params(int num_experts, int64_t capacity, int drop_policy, int pad_multiple) {
  RoutingPlanParams p;
  p.num_experts = num_experts;
  p.capacity = capacity;
  p.drop_policy = static_cast<DropPolicy>(drop_policy);
  p.pad_multiple = pad_multiple;
  return p;
}

}  // namespace

void bind_routing(py::module_& m) {
  m.def(
      "routing_plan_max_rows",
      [](int num_experts, int64_t capacity, int drop_policy, int pad_multiple, int64_t T, int64_t K) {
        return routing_plan_max_rows(plan_params(num_experts, capacity, drop_policy, pad_multiple), T, K);
      },
      py::arg("num_experts"), py::arg("capacity"), py::arg("drop_policy"), py::arg("pad_multiple"), py::arg("T"),
      py::arg("K"), "Upper bound of R: the rows of token_of_row and of the permuted buffers.");

  m.def(
      "routing_plan_workspace_bytes",
      [](int num_experts, int64_t capacity, int drop_policy, int pad_multiple, int64_t T, int64_t K) {
        return routing_plan_workspace_bytes(plan_params(num_experts, capacity, drop_policy, pad_multiple), T, K);
      },
      py::arg("num_experts"), py::arg("capacity"), py::arg("drop_policy"), py::arg("pad_multiple"), py::arg("T"),
      py::arg("K"));

  m.def(
      "routing_plan",
      [](int backend, uintptr_t stream, int num_experts, int64_t capacity, int drop_policy, int pad_multiple,
         py::handle experts, py::handle weights, py::handle counts, py::handle offsets, py::handle row_of,
         py::handle token_of_row, py::handle workspace) {
        const Exec exec = to_exec(backend, stream);
        const RoutingPlanParams p = plan_params(num_experts, capacity, drop_policy, pad_multiple);
        const TensorView ve = SMOE_VIEW(experts), vw = SMOE_VIEW(weights), vc = SMOE_VIEW(counts),
                         vo = SMOE_VIEW(offsets), vr = SMOE_VIEW(row_of), vt = SMOE_VIEW(token_of_row),
                         vws = SMOE_VIEW(workspace);
        call_core([&] { return routing_plan(exec, p, ve, vw, vc, vo, vr, vt, vws); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("num_experts"), py::arg("capacity"), py::arg("drop_policy"),
      py::arg("pad_multiple"), py::arg("experts"), py::arg("weights"), py::arg("counts"), py::arg("offsets"),
      py::arg("row_of"), py::arg("token_of_row"), py::arg("workspace"));
}

}  // namespace smoe::bindings

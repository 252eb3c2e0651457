// Bindings of the fused expert MLP and the shared expert (include/smoe/ops/mlp.h).
#include "bindings.h"

namespace py = pybind11;

namespace smoe::bindings {
namespace {

ExpertMlpParams mlp_params(int act) {
  ExpertMlpParams p;
  p.activation = static_cast<Activation>(act);
  return p;
}

}  // namespace

void bind_mlp(py::module_& m) {
  m.def(
      "expert_mlp_workspace_bytes",
      [](int act, int dtype, int64_t R, int64_t H, int64_t F) {
        return expert_mlp_workspace_bytes(mlp_params(act), static_cast<DType>(dtype), R, H, F);
      },
      py::arg("act"), py::arg("dtype"), py::arg("R"), py::arg("H"), py::arg("F"));

  m.def(
      "shared_expert_workspace_bytes",
      [](int act, int dtype, int64_t T, int64_t H, int64_t F) {
        return shared_expert_workspace_bytes(mlp_params(act), static_cast<DType>(dtype), T, H, F);
      },
      py::arg("act"), py::arg("dtype"), py::arg("T"), py::arg("H"), py::arg("F"));

  m.def(
      "expert_mlp_forward",
      [](int backend, uintptr_t stream, int act, py::handle x, py::handle token_of_row, py::handle offsets,
         py::handle w1, py::handle w2, py::handle pre, py::handle act_out, py::handle ys) {
        const Exec exec = to_exec(backend, stream);
        const ExpertMlpParams p = mlp_params(act);
        const TensorView vx = SMOE_VIEW(x), vt = SMOE_VIEW(token_of_row), vo = SMOE_VIEW(offsets), vw1 = SMOE_VIEW(w1),
                         vw2 = SMOE_VIEW(w2), vpre = SMOE_VIEW(pre), va = SMOE_VIEW(act_out), vys = SMOE_VIEW(ys);
        call_core([&] { return expert_mlp_forward(exec, p, vx, vt, vo, vw1, vw2, vpre, va, vys); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("act"), py::arg("x"), py::arg("token_of_row"), py::arg("offsets"),
      py::arg("w1"), py::arg("w2"), py::arg("pre"), py::arg("act_out"), py::arg("ys"));

  m.def(
      "expert_mlp_combine_top1_workspace_bytes",
      [](int act, int dtype, int64_t R, int64_t H, int64_t F) {
        return expert_mlp_combine_top1_workspace_bytes(mlp_params(act), static_cast<DType>(dtype), R, H, F);
      },
      py::arg("act"), py::arg("dtype"), py::arg("R"), py::arg("H"), py::arg("F"));

  m.def(
      "expert_mlp_combine_top1_forward",
      [](int backend, uintptr_t stream, int act, py::handle x, py::handle token_of_row, py::handle offsets,
         py::handle w1, py::handle w2, py::handle weights, py::handle y, py::handle workspace) {
        const Exec exec = to_exec(backend, stream);
        const ExpertMlpParams p = mlp_params(act);
        const TensorView vx = SMOE_VIEW(x), vt = SMOE_VIEW(token_of_row), vo = SMOE_VIEW(offsets), vw1 = SMOE_VIEW(w1),
                         vw2 = SMOE_VIEW(w2), vw = SMOE_VIEW(weights), vy = SMOE_VIEW(y), vws = SMOE_VIEW(workspace);
        call_core([&] { return expert_mlp_combine_top1_forward(exec, p, vx, vt, vo, vw1, vw2, vw, vy, vws); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("act"), py::arg("x"), py::arg("token_of_row"), py::arg("offsets"),
      py::arg("w1"), py::arg("w2"), py::arg("weights"), py::arg("y"), py::arg("workspace"));

  m.def(
      "expert_mlp_backward",
      [](int backend, uintptr_t stream, int act, py::handle grad_ys, py::handle x, py::handle token_of_row,
         py::handle row_of, py::handle offsets, py::handle w1, py::handle w2, py::handle pre, py::handle act_out,
         py::handle grad_x, py::handle grad_w1, py::handle grad_w2, py::handle workspace) {
        const Exec exec = to_exec(backend, stream);
        const ExpertMlpParams p = mlp_params(act);
        const TensorView vg = SMOE_VIEW(grad_ys), vx = SMOE_VIEW(x), vt = SMOE_VIEW(token_of_row),
                         vr = SMOE_VIEW(row_of), vo = SMOE_VIEW(offsets), vw1 = SMOE_VIEW(w1), vw2 = SMOE_VIEW(w2),
                         vpre = SMOE_VIEW(pre), va = SMOE_VIEW(act_out), vgx = SMOE_VIEW(grad_x),
                         vgw1 = SMOE_VIEW(grad_w1), vgw2 = SMOE_VIEW(grad_w2), vws = SMOE_VIEW(workspace);
        call_core(
            [&] { return expert_mlp_backward(exec, p, vg, vx, vt, vr, vo, vw1, vw2, vpre, va, vgx, vgw1, vgw2, vws); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("act"), py::arg("grad_ys"), py::arg("x"), py::arg("token_of_row"),
      py::arg("row_of"), py::arg("offsets"), py::arg("w1"), py::arg("w2"), py::arg("pre"), py::arg("act_out"),
      py::arg("grad_x"), py::arg("grad_w1"), py::arg("grad_w2"), py::arg("workspace"));

  m.def(
      "shared_expert_forward",
      [](int backend, uintptr_t stream, int act, py::handle x, py::handle w1, py::handle w2, py::handle gate_w,
         py::handle pre, py::handle act_out, py::handle out, py::handle gate, py::handle y) {
        const Exec exec = to_exec(backend, stream);
        const ExpertMlpParams p = mlp_params(act);
        const TensorView vx = SMOE_VIEW(x), vw1 = SMOE_VIEW(w1), vw2 = SMOE_VIEW(w2), vgw = SMOE_VIEW(gate_w),
                         vpre = SMOE_VIEW(pre), va = SMOE_VIEW(act_out), vout = SMOE_VIEW(out), vgate = SMOE_VIEW(gate),
                         vy = SMOE_VIEW(y);
        call_core([&] { return shared_expert_forward(exec, p, vx, vw1, vw2, vgw, vpre, va, vout, vgate, vy); });
      },
      py::arg("backend"), py::arg("stream"), py::arg("act"), py::arg("x"), py::arg("w1"), py::arg("w2"),
      py::arg("gate_w"), py::arg("pre"), py::arg("act_out"), py::arg("out"), py::arg("gate"), py::arg("y"));

  m.def(
      "shared_expert_backward",
      [](int backend, uintptr_t stream, int act, py::handle grad_y, py::handle x, py::handle w1, py::handle w2,
         py::handle gate_w, py::handle pre, py::handle act_out, py::handle out, py::handle gate, py::handle grad_x,
         py::handle grad_w1, py::handle grad_w2, py::handle grad_gate_w, py::handle workspace) {
        const Exec exec = to_exec(backend, stream);
        const ExpertMlpParams p = mlp_params(act);
        const TensorView vgy = SMOE_VIEW(grad_y), vx = SMOE_VIEW(x), vw1 = SMOE_VIEW(w1), vw2 = SMOE_VIEW(w2),
                         vgw = SMOE_VIEW(gate_w), vpre = SMOE_VIEW(pre), va = SMOE_VIEW(act_out), vout = SMOE_VIEW(out),
                         vgate = SMOE_VIEW(gate), vgx = SMOE_VIEW(grad_x), vgw1 = SMOE_VIEW(grad_w1),
                         vgw2 = SMOE_VIEW(grad_w2), vggw = SMOE_VIEW(grad_gate_w), vws = SMOE_VIEW(workspace);
        call_core([&] {
          return shared_expert_backward(exec, p, vgy, vx, vw1, vw2, vgw, vpre, va, vout, vgate, vgx, vgw1, vgw2, vggw,
                                        vws);
        });
      },
      py::arg("backend"), py::arg("stream"), py::arg("act"), py::arg("grad_y"), py::arg("x"), py::arg("w1"),
      py::arg("w2"), py::arg("gate_w"), py::arg("pre"), py::arg("act_out"), py::arg("out"), py::arg("gate"),
      py::arg("grad_x"), py::arg("grad_w1"), py::arg("grad_w2"), py::arg("grad_gate_w"), py::arg("workspace"));
}

}  // namespace smoe::bindings

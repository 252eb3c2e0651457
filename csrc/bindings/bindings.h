// csrc/bindings/bindings.h: helpers shared by the binding files of each op family.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "smoe/smoe.h"

namespace smoe::bindings {

// A tensor descriptor tuple (see module.cpp) -> TensorView; None -> an absent view.
TensorView to_view(pybind11::handle h, const char* arg);
// Backend code (smoe::Backend) and CUDA stream handle -> Exec.
Exec to_exec(int backend, uintptr_t stream);
// A failed Status -> ValueError (kInvalidArgument) or RuntimeError, with the core's message.
void throw_if_error(const Status& s);

// Runs a core call without the GIL: the views are plain structs, no Python object is touched.
template <class F>
void call_core(F&& f) {
  Status s;
  {
    pybind11::gil_scoped_release nogil;
    s = f();
  }
  throw_if_error(s);
}

void bind_topk_gating(pybind11::module_& m);
void bind_expert_choice(pybind11::module_& m);
void bind_router_losses(pybind11::module_& m);
void bind_routing(pybind11::module_& m);
void bind_permute(pybind11::module_& m);
void bind_gemm(pybind11::module_& m);
void bind_activation(pybind11::module_& m);
void bind_mlp(pybind11::module_& m);
void bind_peak(pybind11::module_& m);
void bind_cublas(pybind11::module_& m);  // csrc/bindings/cublas.cpp
void bind_enums(pybind11::module_& m);

}  // namespace smoe::bindings

// `name` is both the Python keyword and the argument name in error messages.
#define SMOE_VIEW(name) ::smoe::bindings::to_view(name, #name)

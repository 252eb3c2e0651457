// smoe._C: the pybind11 module, the only place where Python meets the C++ core.
//
// Tensors arrive as descriptors, never as torch objects: the module does not link libtorch, so one
// build works with every torch version (ARCHITECTURE.md section 5). python/smoe/_core.py turns a
// torch.Tensor into the tuple
//     (data_ptr: int, dtype: int, device_type: int, device_index: int, shape: tuple, strides: tuple)
// with dtype and device codes equal to smoe::DType and smoe::Device, strides in elements; None is an
// absent optional tensor. Every op takes its views as keyword arguments named as in the C++ headers,
// runs the core call with the GIL released, and turns a failed smoe::Status into ValueError
// (Code::kInvalidArgument) or RuntimeError (everything else) carrying the core's message.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings.h"
#include "cpu/parallel.h"

namespace py = pybind11;

namespace smoe::bindings {

TensorView to_view(py::handle h, const char* arg) {
  TensorView v;
  if (h.is_none()) return v;
  if (!py::isinstance<py::tuple>(h)) {
    throw py::type_error(std::string("smoe._C: argument '") + arg +
                         "': expected a tensor descriptor tuple from smoe._core.view() or None");
  }
  auto t = h.cast<py::tuple>();
  if (t.size() != 6) {
    throw py::type_error(std::string("smoe._C: argument '") + arg +
                         "': expected a 6-tuple (data_ptr, dtype, device_type, device_index, shape, strides)");
  }
  v.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
  const int dtype = t[1].cast<int>();
  if (dtype < static_cast<int>(DType::kF32) || dtype > static_cast<int>(DType::kU8)) {
    throw py::value_error(std::string("smoe._C: argument '") + arg + "': unknown dtype code " + std::to_string(dtype));
  }
  v.dtype = static_cast<DType>(dtype);
  const int device = t[2].cast<int>();
  if (device != static_cast<int>(Device::kCPU) && device != static_cast<int>(Device::kCUDA)) {
    throw py::value_error(std::string("smoe._C: argument '") + arg + "': unknown device code " +
                          std::to_string(device));
  }
  v.device = static_cast<Device>(device);
  v.device_index = t[3].cast<int32_t>();
  auto shape = t[4].cast<py::tuple>();
  auto strides = t[5].cast<py::tuple>();
  if (shape.size() > static_cast<size_t>(kMaxDims) || strides.size() != shape.size()) {
    throw py::value_error(std::string("smoe._C: argument '") + arg + "': expected at most " + std::to_string(kMaxDims) +
                          " dims with one stride per dim, got " + std::to_string(shape.size()) + " dims and " +
                          std::to_string(strides.size()) + " strides");
  }
  v.ndim = static_cast<int32_t>(shape.size());
  for (int32_t d = 0; d < v.ndim; ++d) {
    v.shape[d] = shape[d].cast<int64_t>();
    v.strides[d] = strides[d].cast<int64_t>();
  }
  return v;
}

Exec to_exec(int backend, uintptr_t stream) {
  if (backend < static_cast<int>(Backend::kAuto) || backend > static_cast<int>(Backend::kSimt)) {
    throw py::value_error("smoe._C: argument 'backend': expected a code in [0, 3], got " + std::to_string(backend));
  }
  Exec e;
  e.backend = static_cast<Backend>(backend);
  e.stream = reinterpret_cast<void*>(stream);
  return e;
}

void throw_if_error(const Status& s) {
  if (s.ok()) return;
  if (s.code() == Code::kInvalidArgument) throw py::value_error(s.message());
  throw std::runtime_error(s.message());
}

}  // namespace smoe::bindings

PYBIND11_MODULE(_C, m) {
  using namespace smoe;
  m.doc() = "smoe's C++ core (see python/smoe/_core.py for how tensors are passed)";

  m.def("num_threads", &cpu::num_threads, "Threads of the CPU backend's pool.");
  m.def(
      "set_num_threads",
      [](int n) {
        if (n < 1) throw py::value_error("set_num_threads: argument 'n': expected >= 1, got " + std::to_string(n));
        py::gil_scoped_release nogil;
        cpu::set_num_threads(n);
      },
      py::arg("n"), "Resizes the CPU backend's thread pool.");

  // The C++ backends of this build, from the definitions smoe_core was compiled with (csrc/cuda/CMakeLists.txt:
  // smoe_cuda_dispatch carries SMOE_HAVE_CUDA when nvcc built the CUDA backend, SMOE_HAVE_CUDA_SIMT when
  // the emulated one is linked). python/smoe/_core.py derives BUILT_BACKENDS from it.
  m.def(
      "built_backends",
      [] {
        py::list names;
        names.append("cpu");
#if defined(SMOE_HAVE_CUDA) && SMOE_HAVE_CUDA
        names.append("cuda");
#endif
#if defined(SMOE_HAVE_CUDA_SIMT) && SMOE_HAVE_CUDA_SIMT
        names.append("simt");
#endif
        return py::tuple(names);
      },
      "Names of the C++ backends this build contains: 'cpu', plus 'cuda' (nvcc) and 'simt' (the emulator).");

  // Codes shared with python/smoe/_core.py; tests check that both sides agree.
  py::dict codes;
  codes["f32"] = static_cast<int>(DType::kF32);
  codes["f16"] = static_cast<int>(DType::kF16);
  codes["bf16"] = static_cast<int>(DType::kBF16);
  codes["f64"] = static_cast<int>(DType::kF64);
  codes["i32"] = static_cast<int>(DType::kI32);
  codes["i64"] = static_cast<int>(DType::kI64);
  codes["u8"] = static_cast<int>(DType::kU8);
  codes["cpu"] = static_cast<int>(Device::kCPU);
  codes["cuda"] = static_cast<int>(Device::kCUDA);
  codes["auto"] = static_cast<int>(Backend::kAuto);
  codes["backend_cpu"] = static_cast<int>(Backend::kCpu);
  codes["backend_cuda"] = static_cast<int>(Backend::kCuda);
  codes["backend_simt"] = static_cast<int>(Backend::kSimt);
  m.attr("CODES") = codes;

  bindings::bind_enums(m);
  bindings::bind_topk_gating(m);
  bindings::bind_expert_choice(m);
  bindings::bind_router_losses(m);
  bindings::bind_routing(m);
  bindings::bind_permute(m);
  bindings::bind_gemm(m);
  bindings::bind_activation(m);
  bindings::bind_mlp(m);
  bindings::bind_peak(m);
  bindings::bind_cublas(m);
}

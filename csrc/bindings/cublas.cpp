// Binding of the cuBLAS grouped GEMM (csrc/cuda/gemm_cublas.h): the baseline the tensor-core kernels
// are measured against (bench/gpu/bench_layer.py). Present only in builds where nvcc built the CUDA
// backend and CMake found cuBLAS (SMOE_HAVE_CUBLAS); elsewhere the functions exist and raise a
// RuntimeError saying so, and has_cublas() is False.
//
// Not part of the layer path: the cuBLAS entry point reads the per-expert sizes on the host, so each
// call copies offsets to the host and synchronises the stream (not CUDA-graph capturable).
#include <string>

#include "bindings.h"

#if defined(SMOE_HAVE_CUBLAS) && SMOE_HAVE_CUBLAS
#include "cuda/backend.h"
#include "cuda/gemm_cublas.h"
#endif

namespace py = pybind11;

namespace smoe::bindings {
namespace {

#if defined(SMOE_HAVE_CUBLAS) && SMOE_HAVE_CUBLAS
// The launchers trust their arguments (csrc/cuda/backend.h's contract): the checks csrc/core makes for
// grouped_gemm, in its words, before anything reaches cuBLAS.
Status check_cublas_args(const char* op, const TensorView& a, const TensorView& b, const TensorView& offsets,
                         const TensorView& c) {
  const TensorView* all[] = {&a, &b, &offsets, &c};
  const char* names[] = {"a", "b", "offsets", "c"};
  for (int i = 0; i < 4; ++i) {
    SMOE_RETURN_IF_ERROR(expect_defined(op, names[i], *all[i]));
    if (all[i]->device != Device::kCUDA) return invalid_argument(op, names[i], "a CUDA tensor", "a CPU tensor");
    if (all[i]->device_index != a.device_index) {
      return invalid_argument(op, names[i], "a tensor on cuda:" + std::to_string(a.device_index),
                              "cuda:" + std::to_string(all[i]->device_index));
    }
  }
  SMOE_RETURN_IF_ERROR(expect_float_dtype(op, "a", a));
  SMOE_RETURN_IF_ERROR(expect_same_dtype(op, "b", b, "a", a));
  SMOE_RETURN_IF_ERROR(expect_dtype(op, "offsets", offsets, DType::kI64));
  SMOE_RETURN_IF_ERROR(expect_dims(op, "offsets", offsets, 1, "[E+1]"));
  return Status::Ok();
}

Status cublas_gemm(bool trans_b, const TensorView& a, const TensorView& b, const TensorView& offsets,
                   const TensorView& c, void* stream) {
  const char* op = "grouped_gemm_cublas";
  SMOE_RETURN_IF_ERROR(check_cublas_args(op, a, b, offsets, c));
  SMOE_RETURN_IF_ERROR(expect_dims(op, "a", a, 2, "[R, Kd]"));
  SMOE_RETURN_IF_ERROR(expect_dims(op, "b", b, 3, trans_b ? "[E, N, Kd]" : "[E, Kd, N]"));
  SMOE_RETURN_IF_ERROR(expect_dims(op, "c", c, 2, "[R, N]"));
  SMOE_RETURN_IF_ERROR(expect_same_dtype(op, "c", c, "a", a));
  const int64_t E = b.size(0), Kd = a.size(1), N = trans_b ? b.size(1) : b.size(2);
  SMOE_RETURN_IF_ERROR(expect_size(op, "offsets", offsets, 0, E + 1, "E + 1 = b.size(0) + 1"));
  SMOE_RETURN_IF_ERROR(expect_size(op, "b", b, trans_b ? 2 : 1, Kd, "Kd = a.size(1)"));
  SMOE_RETURN_IF_ERROR(expect_size(op, "c", c, 0, a.size(0), "R = a.size(0)"));
  SMOE_RETURN_IF_ERROR(expect_size(op, "c", c, 1, N, trans_b ? "N = b.size(1)" : "N = b.size(2)"));
  cuda::DeviceGuard guard(a.device_index);
  if (!guard.status().ok()) return guard.status();
  GroupedGemmParams p;
  p.trans_b = trans_b;
  return cuda::grouped_gemm_cublas(p, a, b, offsets, c, stream);
}

Status cublas_wgrad(const TensorView& a, const TensorView& b, const TensorView& offsets, const TensorView& c,
                    void* stream) {
  const char* op = "grouped_gemm_wgrad_cublas";
  SMOE_RETURN_IF_ERROR(check_cublas_args(op, a, b, offsets, c));
  SMOE_RETURN_IF_ERROR(expect_dims(op, "a", a, 2, "[R, M]"));
  SMOE_RETURN_IF_ERROR(expect_dims(op, "b", b, 2, "[R, N]"));
  SMOE_RETURN_IF_ERROR(expect_dims(op, "c", c, 3, "[E, M, N]"));
  SMOE_RETURN_IF_ERROR(expect_same_dtype(op, "c", c, "a", a));
  SMOE_RETURN_IF_ERROR(expect_size(op, "b", b, 0, a.size(0), "R = a.size(0)"));
  SMOE_RETURN_IF_ERROR(expect_size(op, "offsets", offsets, 0, c.size(0) + 1, "E + 1 = c.size(0) + 1"));
  SMOE_RETURN_IF_ERROR(expect_size(op, "c", c, 1, a.size(1), "M = a.size(1)"));
  SMOE_RETURN_IF_ERROR(expect_size(op, "c", c, 2, b.size(1), "N = b.size(1)"));
  cuda::DeviceGuard guard(a.device_index);
  if (!guard.status().ok()) return guard.status();
  return cuda::grouped_gemm_wgrad_cublas(a, b, offsets, c, stream);
}
#else
Status no_cublas(const char* op) {
  return unsupported(op,
                     "the cuBLAS baseline is not part of this build (it needs the nvcc-built CUDA backend and "
                     "cuBLAS: see csrc/cuda/gemm_cublas.cmake); use grouped_gemm");
}
#endif

}  // namespace

void bind_cublas(py::module_& m) {
  m.def(
      "has_cublas",
      [] {
#if defined(SMOE_HAVE_CUBLAS) && SMOE_HAVE_CUBLAS
        return true;
#else
        return false;
#endif
      },
      "Whether this build contains the cuBLAS grouped-GEMM baseline (grouped_gemm_cublas).");

  m.def(
      "grouped_gemm_cublas",
      [](uintptr_t stream, bool trans_b, py::handle a, py::handle b, py::handle offsets, py::handle c) {
        const TensorView va = SMOE_VIEW(a), vb = SMOE_VIEW(b), vo = SMOE_VIEW(offsets), vc = SMOE_VIEW(c);
#if defined(SMOE_HAVE_CUBLAS) && SMOE_HAVE_CUBLAS
        call_core([&] { return cublas_gemm(trans_b, va, vb, vo, vc, reinterpret_cast<void*>(stream)); });
#else
        (void)stream, (void)trans_b;
        call_core([&] { return no_cublas("grouped_gemm_cublas"); });
#endif
      },
      py::arg("stream"), py::arg("trans_b"), py::arg("a"), py::arg("b"), py::arg("offsets"), py::arg("c"),
      "c[seg e] = a[seg e] @ op(b[e]) through cublasGemmGroupedBatchedEx (CUDA tensors; host sync per call).");

  m.def(
      "grouped_gemm_wgrad_cublas",
      [](uintptr_t stream, py::handle a, py::handle b, py::handle offsets, py::handle c) {
        const TensorView va = SMOE_VIEW(a), vb = SMOE_VIEW(b), vo = SMOE_VIEW(offsets), vc = SMOE_VIEW(c);
#if defined(SMOE_HAVE_CUBLAS) && SMOE_HAVE_CUBLAS
        call_core([&] { return cublas_wgrad(va, vb, vo, vc, reinterpret_cast<void*>(stream)); });
#else
        (void)stream;
        call_core([&] { return no_cublas("grouped_gemm_wgrad_cublas"); });
#endif
      },
      py::arg("stream"), py::arg("a"), py::arg("b"), py::arg("offsets"), py::arg("c"),
      "c[e] = a[seg e]^T @ b[seg e] through cuBLAS (CUDA tensors; host sync per call).");
}

}  // namespace smoe::bindings

// Binding of the in-process peak measurement (csrc/cpu/peak.h), used by python -m smoe.bench.
#include <string>

#include "bindings.h"
#include "cpu/peak.h"

namespace py = pybind11;

namespace smoe::bindings {

void bind_peak(py::module_& m) {
  m.def(
      "measure_peak",
      [](const std::string& kind, int64_t iterations) {
        if (kind != "fp32" && kind != "bf16" && kind != "amx_bf16") {
          throw py::value_error("measure_peak: argument 'kind': expected 'fp32', 'bf16' or 'amx_bf16', got '" + kind +
                                "'");
        }
        if (iterations < 1) {
          throw py::value_error("measure_peak: argument 'iterations': expected >= 1, got " +
                                std::to_string(iterations));
        }
        cpu::PeakResult r;
        {
          py::gil_scoped_release nogil;
          r = cpu::measure_peak(kind, iterations);
        }
        py::dict d;
        d["gflops"] = r.gflops;
        d["seconds"] = r.seconds;
        d["threads"] = r.threads;
        d["isa"] = r.isa;
        return d;
      },
      py::arg("kind"), py::arg("iterations"),
      "Runs the fp32 FMA, bf16 dot-product (vdpbf16ps) or AMX bf16 tile (tdpbf16ps) microkernel on every thread of the "
      "pool; returns "
      "{'gflops', 'seconds', 'threads', 'isa'} (gflops 0 and isa 'unsupported' without the instruction).");
  m.def("peak_has_bf16", &cpu::peak_has_bf16_dp, "Whether this CPU has AVX512-BF16 (vdpbf16ps).");
  m.def("peak_has_amx_bf16", &cpu::peak_has_amx_bf16, "Whether this CPU and kernel let smoe use AMX-BF16 tiles.");
}

}  // namespace smoe::bindings

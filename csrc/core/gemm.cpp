// Public entry points of the grouped GEMMs (smoe/ops/gemm.h): validate, resolve the backend, return
// on empty work, dispatch (csrc/core/dispatch.h). The math lives in csrc/cpu/grouped_gemm.cpp and
// csrc/cuda/.
#include "smoe/ops/gemm.h"

#include <string>

#include "core/check.h"
#include "core/dispatch.h"
#include "cpu/gemm.h"

namespace smoe {

using detail::Checker;

Status grouped_gemm(const Exec& exec, const GroupedGemmParams& params, const TensorView& a, const TensorView& b,
                    const TensorView& offsets, const TensorView& c_out) {
  const Checker c{"grouped_gemm", a, "a"};
  SMOE_RETURN_IF_ERROR(c.matrix("a", a, "[R, Kd]"));
  const char* b_layout = params.trans_b ? "[E, N, Kd] (trans_b = true)" : "[E, Kd, N] (trans_b = false)";
  SMOE_RETURN_IF_ERROR(c.arg("b", b).dims(3, b_layout).same_dtype().contiguous().same_device().blas_sized());
  SMOE_RETURN_IF_ERROR(c.offsets(offsets));
  const int64_t R = a.size(0), Kd = a.size(1), E = offsets.size(0) - 1;
  SMOE_RETURN_IF_ERROR(
      c.arg("b", b).size(0, E, "E (= offsets.size(0) - 1)").size(params.trans_b ? 2 : 1, Kd, "Kd (= a.size(1))"));
  const int64_t N = b.size(params.trans_b ? 1 : 2);
  SMOE_RETURN_IF_ERROR(c.matrix("c", c_out, "[R, N]")
                           .size(0, R, "R (= a.size(0))")
                           .size(1, N, params.trans_b ? "N (= b.size(1))" : "N (= b.size(2))"));
  return SMOE_DISPATCH_WORK(c.op, exec, a, R > 0 && N > 0, grouped_gemm, params, a, b, offsets, c_out);
}

Status grouped_gemm_wgrad(const Exec& exec, const TensorView& a, const TensorView& b, const TensorView& offsets,
                          const TensorView& c_out) {
  const Checker c{"grouped_gemm_wgrad", a, "a"};
  SMOE_RETURN_IF_ERROR(c.matrix("a", a, "[R, M]"));
  SMOE_RETURN_IF_ERROR(c.matrix("b", b, "[R, N]"));
  const int64_t R = a.size(0), M = a.size(1), N = b.size(1);
  SMOE_RETURN_IF_ERROR(c.arg("b", b).size(0, R, "R (= a.size(0))"));
  SMOE_RETURN_IF_ERROR(c.offsets(offsets));
  const int64_t E = offsets.size(0) - 1;
  SMOE_RETURN_IF_ERROR(c.arg("c", c_out)
                           .dims(3, "[E, M, N]")
                           .same_dtype()
                           .contiguous()
                           .same_device()
                           .size(0, E, "E (= offsets.size(0) - 1)")
                           .size(1, M, "M (= a.size(1))")
                           .size(2, N, "N (= b.size(1))")
                           .blas_sized());
  // R == 0 is still work: every c[e] must become zeros.
  return SMOE_DISPATCH_WORK(c.op, exec, a, c_out.numel() > 0, grouped_gemm_wgrad, a, b, offsets, c_out);
}

}  // namespace smoe

// Host launchers of the tensor-core grouped GEMM (csrc/cuda/gemm_tc.h; kernels in gemm_tc.cuh).
//
// Shapes are validated by the callers (the csrc/core entry points); the launchers check what only
// this implementation needs: bf16/f16 and the grid limits. Any size and stride runs on the tensor
// cores: 16-byte aligned rows load with cp.async (partial chunks through src-size), others element
// by element; edges are predicated and zero-filled, stores paired where aligned. They dispatch on dtype, tile layout and epilogue once, and never synchronise.
#include <string>

#include "backend.h"
#include "common.cuh"
#include "gemm_tc.cuh"
#include "gemm_tc.h"
#include "gemm_wgmma.h"

namespace smoe::SMOE_CUDA_NS {
namespace {

using gemm_tc::Epilogue;

constexpr const char* kNaiveHint = "use grouped_gemm_naive / grouped_gemm_wgrad_naive (any dtype and shape)";

// Every row of `v` starts 16-byte aligned: base pointer and the strides of the leading dimensions
// (16-bit elements: multiples of 8). Then the loaders use cp.async; otherwise element loads.
bool rows_16b_aligned(const TensorView& v) {
  const int64_t per16 = 16 / static_cast<int64_t>(dtype_size(v.dtype));
  if (reinterpret_cast<uintptr_t>(v.data) % 16 != 0) return false;
  for (int d = 0; d + 1 < v.ndim; ++d)
    if (v.stride(d) % per16 != 0) return false;
  return true;
}
// Column pairs (n, n + 1), n even, of every row of the 2-D `v` are aligned to two elements (paired stores).
bool pairs_aligned(const TensorView& v) {
  return reinterpret_cast<uintptr_t>(v.data) % (2 * dtype_size(v.dtype)) == 0 && v.stride(0) % 2 == 0;
}

Status require(bool ok, const char* op, const std::string& what) {
  return ok ? Status::Ok() : unsupported(op, what + "; " + kNaiveHint);
}

// kernel_version(kGroupedGemm) == 0 (backend_api.inc): refuse, so the caller runs its v0 fallback.
Status require_v1(const char* op) {
  return require(kernel_version(KernelOp::kGroupedGemm) != 0, op,
                 "grouped_gemm kernel version 0 selected (set_kernel_version / SMOE_CUDA_KERNEL_VERSION)");
}

template <class S, bool kTransB, Epilogue kEpi>
Status launch_forward(const gemm_tc::ForwardArgs<S>& args, int64_t slots, int64_t n_tiles, cudaStream_t stream) {
  auto* kernel = &gemm_tc::grouped_gemm_tc_kernel<S, kTransB, kEpi>;
  // 64 KiB of dynamic shared memory (4 stages of a 128x32 A and a 32x128 B tile) is above the 48 KiB
  // default: opt in (A100 allows 163 KiB per block, H100 227 KiB).
  SMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, gemm_tc::kSmemBytes));
  // x: tile slots (the upper bound of sum_e ceil(rows_e / 128), m fastest so that co-resident CTAs
  // share one expert's B tiles in L2), y: column tiles; 4 warps of 64x64 outputs each.
  const dim3 grid(static_cast<unsigned>(slots), static_cast<unsigned>(n_tiles));
  SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, grid, dim3(gemm_tc::kThreads), gemm_tc::kSmemBytes, stream, args));
  return Status::Ok();
}

}  // namespace

Status grouped_gemm_tc(const GroupedGemmTcParams& params, const TensorView& a, const TensorView& b,
                       const TensorView& offsets, const TensorView& token_of_row, const TensorView& row_weights,
                       const TensorView& c, const TensorView& pre, void* stream) {
  constexpr const char* op = "grouped_gemm_tc";
  SMOE_RETURN_IF_ERROR(require_v1(op));
  const bool gather = token_of_row.defined();
  const int64_t R = gather ? token_of_row.size(0) : a.size(0);
  const int64_t Kd = a.size(1);
  const int64_t E = offsets.size(0) - 1;
  const int64_t N = params.trans_b ? b.size(1) : b.size(2);
  const bool has_act = params.activation.has_value();
  const bool gated = has_act && is_gated(*params.activation);
  const int64_t F = gated ? N / 2 : N;
  SMOE_RETURN_IF_ERROR(require(
      a.dtype == DType::kBF16 || a.dtype == DType::kF16 || (a.dtype == DType::kF32 && (params.trans_b || !gated)), op,
      std::string("dtype ") + dtype_name(a.dtype) +
          (a.dtype == DType::kF32 ? " with b [E, Kd, N] and a gated activation (f32 "
                                    "runs on the tensor cores as 3xTF32 otherwise)"
                                  : " (the tensor cores take bf16, f16, or f32 as 3xTF32)")));
  if (pre.defined() && !has_act) return invalid_argument(op, "pre", "absent without an activation", "given");
  if (R == 0 || N == 0 || E < 1) return Status::Ok();
  if (wgmma_selected() &&
      !params.store_row.defined()) {  // sm_90a kernel (gemm_wgmma.h); what it refuses (before any launch) runs below
    const Status st = grouped_gemm_wgmma(params, a, b, offsets, token_of_row, row_weights, c, pre, stream);
    if (st.code() != Code::kUnsupported) return st;
  }
  const int64_t slots = ceil_div(R, gemm_tc::kBM) + E - 1;
  const int64_t n_tiles = gated ? ceil_div(F, gemm_tc::kGatedBF) : ceil_div(N, gemm_tc::kBN);
  SMOE_RETURN_IF_ERROR(require(slots <= INT32_MAX && n_tiles <= 65535, op, "grid beyond CUDA's limits"));

  return dispatch_float(a.dtype, op, [&](auto tag) -> Status {
    using S = typename decltype(tag)::type;
    {
      gemm_tc::ForwardArgs<S> args{};
      args.a = a.data_as<const S>();
      args.lda = a.stride(0);
      args.a_rows = a.size(0);
      args.token_of_row = gather ? token_of_row.data_as<const int32_t>() : nullptr;
      args.b = b.data_as<const S>();
      args.b_expert_stride = b.stride(0);
      args.ldb = b.stride(1);
      args.offsets = offsets.data_as<const int64_t>();
      args.E = static_cast<int32_t>(E);
      args.R = R;
      args.N = N;
      args.Kd = Kd;
      args.F = F;
      args.c = c.data_as<S>();
      args.ldc = c.stride(0);
      args.pre = pre.defined() ? pre.data_as<S>() : nullptr;
      args.ldpre = pre.defined() ? pre.stride(0) : 0;
      args.row_weights = row_weights.defined() ? row_weights.data_as<const float>() : nullptr;
      args.store_row = params.store_row.defined() ? params.store_row.data_as<const int32_t>() : nullptr;
      args.c_rows = c.size(0);
      args.act = has_act ? static_cast<int32_t>(*params.activation) : 0;
      args.vec_a = rows_16b_aligned(a);
      // MN-major gated: the up half starts F columns after the gate half
      args.vec_b = rows_16b_aligned(b) && (params.trans_b || !gated || F % 8 == 0);
      args.pair_c = pairs_aligned(c);
      args.pair_pre = pre.defined() && pairs_aligned(pre) && (!gated || F % 2 == 0);
      const cudaStream_t s = as_stream(stream);
      // One dispatch point: (trans_b, epilogue) become template parameters here.
      auto go = [&](auto trans_b) -> Status {
        constexpr bool kT = decltype(trans_b)::value;
        if constexpr (std::is_same_v<S, float> && !kT) {  // no gated f32 MN-major kernel (refused above)
          if (gated) return Status(Code::kInternal, "grouped_gemm_tc: gated f32 with b [E, Kd, N] passed the check");
        } else {
          if (gated) return launch_forward<S, kT, Epilogue::kGatedActivation>(args, slots, n_tiles, s);
        }
        if (has_act) return launch_forward<S, kT, Epilogue::kActivation>(args, slots, n_tiles, s);
        return launch_forward<S, kT, Epilogue::kStore>(args, slots, n_tiles, s);
      };
      return params.trans_b ? go(std::true_type{}) : go(std::false_type{});
    }
  });
}

Status grouped_gemm_wgrad_tc(const TensorView& a, const TensorView& b, const TensorView& offsets, const TensorView& c,
                             void* stream) {
  return grouped_gemm_wgrad_gathered_tc(a, b, TensorView{}, offsets, c, stream);
}

Status grouped_gemm_wgrad_gathered_tc(const TensorView& a, const TensorView& b, const TensorView& b_token_of_row,
                                      const TensorView& offsets, const TensorView& c, void* stream) {
  constexpr const char* op = "grouped_gemm_wgrad_tc";
  SMOE_RETURN_IF_ERROR(require_v1(op));
  const int64_t R = a.size(0), M = a.size(1), N = b.size(1);
  const bool gather = b_token_of_row.defined();
  const int64_t E = offsets.size(0) - 1;
  SMOE_RETURN_IF_ERROR(
      require(a.dtype == DType::kBF16 || a.dtype == DType::kF16 || a.dtype == DType::kF32, op,
              std::string("dtype ") + dtype_name(a.dtype) + " (the tensor cores take bf16, f16, or f32 as 3xTF32)"));
  if (M == 0 || N == 0 || E < 1) return Status::Ok();  // R == 0 is work: every c[e] becomes zeros
  const int64_t m_tiles = ceil_div(M, gemm_tc::kBM), n_tiles = ceil_div(N, gemm_tc::kBN);
  SMOE_RETURN_IF_ERROR(require(m_tiles * n_tiles <= INT32_MAX && E <= 65535, op, "grid beyond CUDA's limits"));

  return dispatch_float(a.dtype, op, [&](auto tag) -> Status {
    using S = typename decltype(tag)::type;
    {
      gemm_tc::WgradArgs<S> args{};
      args.a = a.data_as<const S>();
      args.lda = a.stride(0);
      args.b = b.data_as<const S>();
      args.ldb = b.stride(0);
      args.b_index = gather ? b_token_of_row.data_as<const int32_t>() : nullptr;
      args.b_rows = b.size(0);
      args.offsets = offsets.data_as<const int64_t>();
      args.R = R;
      args.M = M;
      args.N = N;
      args.m_tiles = m_tiles;
      args.c = c.data_as<S>();
      args.vec_a = rows_16b_aligned(a);
      args.vec_b = rows_16b_aligned(b);
      args.pair_c = reinterpret_cast<uintptr_t>(c.data) % 4 == 0 && N % 2 == 0;
      auto* kernel = &gemm_tc::grouped_gemm_wgrad_tc_kernel<S>;
      SMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, gemm_tc::kSmemBytes));
      // x: the 128x128 tiles of one c[e] (m fastest), y: experts. Each CTA reduces over its whole
      // segment (no split-K: deterministic, and E * tiles CTAs fill the GPU for the shapes of
      // docs/kernels/grouped_gemm.md).
      const dim3 grid(static_cast<unsigned>(m_tiles * n_tiles), static_cast<unsigned>(E));
      SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, grid, dim3(gemm_tc::kThreads), gemm_tc::kSmemBytes, as_stream(stream), args));
      return Status::Ok();
    }
  });
}

// The backend's grouped_gemm / grouped_gemm_wgrad (backend_api.inc): the tensor-core kernels where
// they apply; what they refuse (f32) runs on v0. The refusal happens before any
// launch, so trying first costs nothing.
Status grouped_gemm(const GroupedGemmParams& params, const TensorView& a, const TensorView& b,
                    const TensorView& offsets, const TensorView& c, void* stream) {
  GroupedGemmTcParams tc;
  tc.trans_b = params.trans_b;
  Status st = grouped_gemm_tc(tc, a, b, offsets, TensorView{}, TensorView{}, c, TensorView{}, stream);
  if (st.code() == Code::kUnsupported) return grouped_gemm_naive(params, a, b, offsets, c, stream);
  return st;
}

Status grouped_gemm_wgrad(const TensorView& a, const TensorView& b, const TensorView& offsets, const TensorView& c,
                          void* stream) {
  Status st = grouped_gemm_wgrad_tc(a, b, offsets, c, stream);
  if (st.code() == Code::kUnsupported) return grouped_gemm_wgrad_naive(a, b, offsets, c, stream);
  return st;
}

}  // namespace smoe::SMOE_CUDA_NS

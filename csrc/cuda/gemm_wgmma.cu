// Host launcher of the sm_90a grouped GEMM (csrc/cuda/gemm_wgmma.h; kernel in gemm_wgmma.cuh).
//
// Builds the weights' 2D tensor map ((Kd inner, E * N rows), box 64 x 64, 128-byte swizzle): with
// the emulator's model (smoe::simt::make_tensor_map_2d) under SMOE_SIMT, with the driver's
// cuTensorMapEncodeTiled (through cudaGetDriverEntryPoint, so no -lcuda) under nvcc. Never
// synchronises: the tile slots are mapped to experts on the device, by the persistent CTAs.
#include <algorithm>
#include <string>
#include <type_traits>

#include "backend.h"
#include "common.cuh"
#include "gemm_wgmma.cuh"
#include "gemm_wgmma.h"

namespace smoe::SMOE_CUDA_NS {
namespace {

using gemm_tc::Epilogue;

Status refuse(const std::string& what) {
  return unsupported("grouped_gemm_wgmma", what + "; use grouped_gemm_tc (sm_80+) or grouped_gemm_naive");
}

Status make_b_map(const TensorView& b, int64_t rows, int64_t Kd, simt::TensorMap* map) {
#if SMOE_SIMT
  const char* problem = nullptr;
  *map = simt::make_tensor_map_2d(b.data, 2, static_cast<uint64_t>(Kd), static_cast<uint64_t>(rows),
                                  static_cast<uint64_t>(b.stride(1)) * 2, gemm_wgmma::kBK, gemm_wgmma::kBoxRows,
                                  simt::sm90::Swizzle::k128B, &problem);
  if (problem != nullptr) return refuse(std::string("tensor map: ") + problem);
  return Status::Ok();
#else
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
  const cudaError_t got = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q);
#else
  const cudaError_t got = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &q);
#endif
  if (got != cudaSuccess || q != cudaDriverEntryPointSuccess || fn == nullptr)
    return refuse("the driver has no cuTensorMapEncodeTiled");
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(Kd), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(b.stride(1)) * 2};
  const cuuint32_t box[2] = {gemm_wgmma::kBK, gemm_wgmma::kBoxRows};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = reinterpret_cast<Encode>(fn)(
      map, b.dtype == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
      const_cast<void*>(b.data), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return refuse("cuTensorMapEncodeTiled failed (code " + std::to_string(int(r)) + ")");
  return Status::Ok();
#endif
}

bool rows_16b_aligned(const TensorView& v) {
  if (reinterpret_cast<uintptr_t>(v.data) % 16 != 0) return false;
  for (int d = 0; d + 1 < v.ndim; ++d)
    if (v.stride(d) % 8 != 0) return false;  // 16-bit elements
  return true;
}
bool pairs_aligned(const TensorView& v) { return reinterpret_cast<uintptr_t>(v.data) % 4 == 0 && v.stride(0) % 2 == 0; }

template <class S, Epilogue kEpi>
Status launch(const gemm_wgmma::Args<S>& args, const simt::TensorMap& map, int64_t ctas, cudaStream_t stream) {
  constexpr bool kBf16 = std::is_same_v<S, __nv_bfloat16>;
  auto* kernel = &gemm_wgmma::grouped_gemm_wgmma_kernel<S, kBf16, kEpi>;
  SMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, gemm_wgmma::kSmemBytes));
  SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, dim3(static_cast<unsigned>(ctas)), dim3(gemm_wgmma::kThreads),
                              gemm_wgmma::kSmemBytes, stream, args, map));
  return Status::Ok();
}

}  // namespace

bool wgmma_selected() {
#if SMOE_SIMT
  return simt::options().sm90a;
#elif defined(SMOE_HAVE_SM90A) && SMOE_HAVE_SM90A
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    (void)cudaGetLastError();  // a failed query selects the sm_80 path, which reports the error itself
    return false;
  }
  return major == 9 && minor == 0;
#else
  return false;  // this build has no sm_90a code for the kernel
#endif
}

Status grouped_gemm_wgmma(const GroupedGemmTcParams& params, const TensorView& a, const TensorView& b,
                          const TensorView& offsets, const TensorView& token_of_row, const TensorView& row_weights,
                          const TensorView& c, const TensorView& pre, void* stream) {
  const bool gather = token_of_row.defined();
  const int64_t R = gather ? token_of_row.size(0) : a.size(0), Kd = a.size(1), E = offsets.size(0) - 1;
  if (a.dtype != DType::kBF16 && a.dtype != DType::kF16)
    return refuse(std::string("dtype ") + dtype_name(a.dtype) + " (wgmma here takes bf16 or f16)");
  if (!params.trans_b || b.ndim != 3 || b.size(2) != Kd) return refuse("b must be [E, N, Kd] (K-major)");
  const int64_t N = b.size(1);
  const bool has_act = params.activation.has_value();
  const bool gated = has_act && is_gated(*params.activation);
  const int64_t F = gated ? N / 2 : N;
  if (pre.defined() && !has_act)
    return invalid_argument("grouped_gemm_wgmma", "pre", "absent without an activation", "given");
  if (Kd % 8 != 0 || N % 8 != 0 || (gated && F % 8 != 0))
    return refuse(gated ? "Kd and F (N / 2) must be multiples of 8" : "Kd and N must be multiples of 8");
  if (a.stride(1) != 1 || b.stride(2) != 1 || c.stride(1) != 1 || !rows_16b_aligned(a) || !rows_16b_aligned(b) ||
      b.stride(0) != N * b.stride(1))
    return refuse("a and b need 16-byte aligned rows and b's experts stacked as one [E*N, Kd] matrix");
  if (E * N > INT32_MAX) return refuse("E * N beyond the tensor map's int32 row coordinate");
  int dev = 0;
  SMOE_CUDA_CHECK(cudaGetDevice(&dev));
#if !SMOE_SIMT
#if defined(SMOE_HAVE_SM90A) && SMOE_HAVE_SM90A
  constexpr bool kHaveSm90a = true;
#else
  constexpr bool kHaveSm90a = false;
#endif
  if (!kHaveSm90a) return refuse("this build has no sm_90a code (build with 90 among CMAKE_CUDA_ARCHITECTURES)");
  int major = 0, minor = 0;
  SMOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  SMOE_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  if (major != 9 || minor != 0) return refuse("the device is not compute capability 9.0 (sm_90a code runs only there)");
#endif
  if (R == 0 || N == 0 || E < 1) return Status::Ok();
  // Persistent grid: one CTA per SM (232 x 256 registers each) over the banded raster of
  // (slot bound ceil(R/64) + E - 1) x (n tiles) tiles; never more CTAs than tiles.
  const int64_t slots = ceil_div(R, gemm_wgmma::kBM) + E - 1;
  const int64_t n_tiles = gated ? ceil_div(F, gemm_wgmma::kGatedBF) : ceil_div(N, gemm_wgmma::kBN);
  const int64_t tiles = ceil_div(slots, gemm_wgmma::kBand) * gemm_wgmma::kBand * n_tiles;
  int sms = 0;
  SMOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t ctas = std::min<int64_t>(std::max(sms, 1), tiles);
  simt::TensorMap map{};
  SMOE_RETURN_IF_ERROR(make_b_map(b, E * N, Kd, &map));
  return dispatch_float(a.dtype, "grouped_gemm_wgmma", [&](auto tag) -> Status {
    using S = typename decltype(tag)::type;
    if constexpr (std::is_same_v<S, float>) {
      return Status(Code::kInternal, "grouped_gemm_wgmma: f32 passed the dtype check");
    } else {
      gemm_wgmma::Args<S> args{};
      args.a = a.data_as<const S>();
      args.lda = a.stride(0);
      args.a_rows = a.size(0);
      args.token_of_row = gather ? token_of_row.data_as<const int32_t>() : nullptr;
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
      args.act = has_act ? static_cast<int32_t>(*params.activation) : 0;
      args.pair_c = pairs_aligned(c);
      args.pair_pre = pre.defined() && pairs_aligned(pre);
      args.n_tiles = n_tiles;
      args.tiles = tiles;
      const cudaStream_t s = as_stream(stream);
      if (gated) return launch<S, Epilogue::kGatedActivation>(args, map, ctas, s);
      if (has_act) return launch<S, Epilogue::kActivation>(args, map, ctas, s);
      return launch<S, Epilogue::kStore>(args, map, ctas, s);
    }
  });
}

}  // namespace smoe::SMOE_CUDA_NS

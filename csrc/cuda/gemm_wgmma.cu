// Host launcher of the sm_90a grouped GEMM (csrc/cuda/gemm_wgmma.h; kernel in gemm_wgmma.cuh).
//
// Builds the weights' 2D tensor map ((Kd inner, E * N rows), box 64 x 128, 128-byte swizzle): with
// the emulator's model (smoe::simt::make_tensor_map_2d) under SMOE_SIMT, with the driver's
// cuTensorMapEncodeTiled (through cudaGetDriverEntryPoint, so no -lcuda) under nvcc. Never
// synchronises: the tile slots are mapped to experts on the device.
#include <string>

#include "backend.h"
#include "common.cuh"
#include "gemm_wgmma.cuh"
#include "gemm_wgmma.h"

namespace smoe::SMOE_CUDA_NS {
namespace {

Status refuse(const std::string& what) {
  return unsupported("grouped_gemm_wgmma", what + "; use grouped_gemm_tc (sm_80+) or grouped_gemm_naive");
}

Status make_b_map(const TensorView& b, int64_t rows, int64_t Kd, simt::TensorMap* map) {
#if SMOE_SIMT
  const char* problem = nullptr;
  *map = simt::make_tensor_map_2d(b.data, 2, static_cast<uint64_t>(Kd), static_cast<uint64_t>(rows),
                                  static_cast<uint64_t>(b.stride(1)) * 2, gemm_wgmma::kBK, gemm_wgmma::kBN,
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
  const cuuint32_t box[2] = {gemm_wgmma::kBK, gemm_wgmma::kBN};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = reinterpret_cast<Encode>(fn)(
      map, b.dtype == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
      const_cast<void*>(b.data), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return refuse("cuTensorMapEncodeTiled failed (code " + std::to_string(int(r)) + ")");
  return Status::Ok();
#endif
}

}  // namespace

Status grouped_gemm_wgmma(const TensorView& a, const TensorView& b, const TensorView& offsets,
                          const TensorView& c, void* stream) {
  const int64_t R = a.size(0), Kd = a.size(1), E = offsets.size(0) - 1, N = b.size(1);
  if (a.dtype != DType::kBF16 && a.dtype != DType::kF16)
    return refuse(std::string("dtype ") + dtype_name(a.dtype) + " (wgmma here takes bf16 or f16)");
  if (b.ndim != 3 || b.size(2) != Kd) return refuse("b must be [E, N, Kd] (K-major)");
  if (Kd % 8 != 0 || N % 8 != 0) return refuse("Kd and N must be multiples of 8");
  if (a.stride(1) != 1 || b.stride(2) != 1 || c.stride(1) != 1 || a.stride(0) % 8 != 0 || b.stride(1) % 8 != 0 ||
      b.stride(0) != N * b.stride(1) || reinterpret_cast<uintptr_t>(a.data) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(b.data) % 16 != 0)
    return refuse("a and b need 16-byte aligned rows and b's experts stacked as one [E*N, Kd] matrix");
#if !SMOE_SIMT
  int dev = 0, major = 0;
  SMOE_CUDA_CHECK(cudaGetDevice(&dev));
  SMOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  if (major != 9) return refuse("the device is not sm_90");
#endif
  if (R == 0 || N == 0 || E < 1) return Status::Ok();
  const int64_t slots = ceil_div(R, gemm_wgmma::kBM) + E - 1, n_tiles = ceil_div(N, gemm_wgmma::kBN);
  if (slots > INT32_MAX || n_tiles > 65535) return refuse("grid beyond CUDA's limits");
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
      args.offsets = offsets.data_as<const int64_t>();
      args.E = static_cast<int32_t>(E);
      args.N = N;
      args.Kd = Kd;
      args.c = c.data_as<S>();
      args.ldc = c.stride(0);
      constexpr bool kBf16 = std::is_same_v<S, __nv_bfloat16>;
      auto* kernel = &gemm_wgmma::grouped_gemm_wgmma_kernel<S, kBf16>;
      SMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, gemm_wgmma::kSmemBytes));
      const dim3 grid(static_cast<unsigned>(slots), static_cast<unsigned>(n_tiles));
      SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, grid, dim3(gemm_wgmma::kThreads), gemm_wgmma::kSmemBytes, as_stream(stream),
                                  args, map));
      return Status::Ok();
    }
  });
}

}  // namespace smoe::SMOE_CUDA_NS

// The cuBLAS grouped GEMM (csrc/cuda/gemm_cublas.h): baseline and fallback of the tensor-core kernels.
//
// Which cuBLAS entry point (CUDA 13, checked against the headers of the nvidia-cublas 13.10 wheel):
// - cublasGemmGroupedBatchedEx(_64) (cuBLAS 12.5+): one launch for groups of GEMMs of different
//   sizes, bf16/f16/f32 in with f32 compute. Its m/n/k/ld/alpha/beta/group_size arguments are HOST
//   arrays (the pointer arrays Aarray/Barray/Carray are device arrays), so the per-expert row counts
//   must be on the host: we copy offsets [E+1] device -> host and synchronise the stream. That
//   breaks CUDA-graph capture and stalls the CPU once per call; it is the path used here.
// - cuBLASLt's CUBLASLT_BATCH_MODE_GROUPED with cublasLtGroupedMatrixLayoutCreate (rows/cols/ld read
//   from DEVICE arrays, int32 or int64) is the no-sync alternative. The 13.10 header marks it
//   "Experimental" and documents neither the supported architectures nor how the pointer arrays
//   are passed to cublasLtMatmul; it is left for when it can be validated on a GPU
//   (docs/kernels/grouped_gemm.md, "cuBLAS").
//
// Row-major smoe matrices are column-major cuBLAS matrices transposed, so c[seg] = a[seg] @ op(b[e])
// is computed as c^T (N x rows) = op(b[e])^T (N x Kd) * a[seg]^T (Kd x rows):
//   m = N, n = rows_e, k = Kd; A = b[e] (trans_b: stored Kd x N, op T, lda Kd; else N x Kd, op N, lda N);
//   B = a[seg] (Kd x rows_e, op N, ldb = row stride of a); C = c[seg] (N x rows_e, ldc = row stride).
// wgrad c[e] = a^T b (M x N) is computed as c[e]^T (N x M) = b[seg]^T (N x rows) * a[seg] (rows x M):
//   m = N, n = M, k = rows_e; A = b[seg] (op N, lda = ldb), B = a[seg] (stored M x rows, op T).
//
// Compiled only with nvcc and cuBLAS (SMOE_HAVE_CUBLAS from gemm_cublas.cmake); the CMake glob also
// hands this file to the emulated build, where it is an empty translation unit.
#if defined(SMOE_HAVE_CUBLAS) && SMOE_HAVE_CUBLAS && !(defined(SMOE_SIMT) && SMOE_SIMT)

#include <cublas_v2.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "common.cuh"
#include "gemm_cublas.h"

namespace smoe::cuda {
namespace {

Status cublas_error(cublasStatus_t st, const char* expr, const char* file, int line) {
  std::string m(expr);
  m.append(" failed at ").append(file).append(":").append(std::to_string(line)).append(": ");
  m.append(cublasGetStatusName(st)).append(" (").append(cublasGetStatusString(st)).append(")");
  if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_ARCH_MISMATCH) {
    m.append("; this cuBLAS cannot run the shape or dtype on this GPU: use grouped_gemm_tc or grouped_gemm_naive");
  }
  return Status(Code::kDeviceError, std::move(m));
}

#define SMOE_CUBLAS_CHECK(expr)                                                                                    \
  do {                                                                                                             \
    const cublasStatus_t smoe_cublas_st_ = (expr);                                                                 \
    if (smoe_cublas_st_ != CUBLAS_STATUS_SUCCESS) return cublas_error(smoe_cublas_st_, #expr, __FILE__, __LINE__); \
  } while (0)

// One handle per (host thread, device), created on first use and kept for the process: cublasCreate
// costs milliseconds and allocates the library's workspace. cuBLAS handles must not be shared by
// threads that call concurrently, hence thread_local.
Status handle_for_current_device(cublasHandle_t* out) {
  thread_local std::map<int, cublasHandle_t> handles;
  int device = 0;
  SMOE_CUDA_CHECK(cudaGetDevice(&device));
  auto it = handles.find(device);
  if (it == handles.end()) {
    cublasHandle_t h = nullptr;
    SMOE_CUBLAS_CHECK(cublasCreate(&h));
    it = handles.emplace(device, h).first;
  }
  *out = it->second;
  return Status::Ok();
}

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::kBF16:
      return CUDA_R_16BF;
    case DType::kF16:
      return CUDA_R_16F;
    default:
      return CUDA_R_32F;
  }
}

// The host copy of offsets [E+1] that cublasGemmGroupedBatchedEx needs. Synchronises `stream`: not
// capturable in a CUDA graph (see the file comment).
Status offsets_to_host(const TensorView& offsets, cudaStream_t stream, std::vector<int64_t>* host) {
  host->resize(static_cast<size_t>(offsets.size(0)));
  SMOE_CUDA_CHECK(
      cudaMemcpyAsync(host->data(), offsets.data, host->size() * sizeof(int64_t), cudaMemcpyDeviceToHost, stream));
  SMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  return Status::Ok();
}

// One group per non-empty expert (group_size 1 each): the groups differ in n (forward) or k (wgrad).
struct Groups {
  std::vector<cublasOperation_t> transa, transb;
  std::vector<int64_t> m, n, k, lda, ldb, ldc, size;
  std::vector<float> alpha, beta;
  std::vector<const void*> A, B;
  std::vector<void*> C;
  void add(cublasOperation_t ta, cublasOperation_t tb, int64_t m_, int64_t n_, int64_t k_, const void* a, int64_t lda_,
           const void* b, int64_t ldb_, void* c, int64_t ldc_) {
    transa.push_back(ta), transb.push_back(tb), m.push_back(m_), n.push_back(n_), k.push_back(k_);
    A.push_back(a), lda.push_back(lda_), B.push_back(b), ldb.push_back(ldb_), C.push_back(c), ldc.push_back(ldc_);
    size.push_back(1), alpha.push_back(1.0f), beta.push_back(0.0f);
  }
};

// Frees a stream-ordered allocation on the early-return (error) paths of run_groups; the success
// path releases it and frees with a checked call.
struct AsyncFreeOnError {
  void* p;
  cudaStream_t stream;
  ~AsyncFreeOnError() {
    if (p != nullptr) (void)cudaFreeAsync(p, stream);  // already reporting another error
  }
};

// Uploads the pointer arrays (device memory, stream-ordered allocation) and runs the grouped GEMM.
Status run_groups(Groups& g, DType dtype, cudaStream_t stream) {
  if (g.m.empty()) return Status::Ok();
  const size_t count = g.m.size();
  void** dev = nullptr;  // [3 * count]: A pointers, B pointers, C pointers
  SMOE_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&dev), 3 * count * sizeof(void*), stream));
  AsyncFreeOnError guard{dev, stream};
  std::vector<const void*> host(3 * count);
  for (size_t i = 0; i < count; ++i) host[i] = g.A[i], host[count + i] = g.B[i], host[2 * count + i] = g.C[i];
  // From pageable memory the call returns once the copy is staged, so `host` may go out of scope.
  SMOE_CUDA_CHECK(cudaMemcpyAsync(dev, host.data(), host.size() * sizeof(void*), cudaMemcpyHostToDevice, stream));
  cublasHandle_t h = nullptr;
  SMOE_RETURN_IF_ERROR(handle_for_current_device(&h));
  SMOE_CUBLAS_CHECK(cublasSetStream(h, stream));
  const cudaDataType_t t = cuda_type(dtype);
  SMOE_CUBLAS_CHECK(cublasGemmGroupedBatchedEx_64(
      h, g.transa.data(), g.transb.data(), g.m.data(), g.n.data(), g.k.data(), g.alpha.data(),
      reinterpret_cast<const void* const*>(dev), t, g.lda.data(), reinterpret_cast<const void* const*>(dev + count), t,
      g.ldb.data(), g.beta.data(), reinterpret_cast<void* const*>(dev + 2 * count), t, g.ldc.data(),
      static_cast<int64_t>(count), g.size.data(), CUBLAS_COMPUTE_32F));
  guard.p = nullptr;
  SMOE_CUDA_CHECK(cudaFreeAsync(dev, stream));
  return Status::Ok();
}

}  // namespace

Status grouped_gemm_cublas(const GroupedGemmParams& params, const TensorView& a, const TensorView& b,
                           const TensorView& offsets, const TensorView& c, void* stream) {
  const int64_t R = a.size(0), Kd = a.size(1), N = c.size(1);
  const int64_t E = offsets.size(0) - 1;
  if (a.dtype == DType::kF64) return f64_unsupported("grouped_gemm_cublas");
  if (R == 0 || N == 0 || E < 1) return Status::Ok();
  const cudaStream_t s = as_stream(stream);
  std::vector<int64_t> off;
  SMOE_RETURN_IF_ERROR(offsets_to_host(offsets, s, &off));
  const size_t es = dtype_size(a.dtype);
  const auto* ap = static_cast<const char*>(a.data);
  const auto* bp = static_cast<const char*>(b.data);
  auto* cp = static_cast<char*>(c.data);
  Groups g;
  for (int64_t e = 0; e < E; ++e) {
    // The device rule of the kernels: segments are clamped to [0, R).
    const int64_t lo = std::max<int64_t>(0, std::min(off[e], R)), hi = std::max(lo, std::min(off[e + 1], R));
    if (hi == lo || Kd == 0) continue;  // Kd == 0 would need zeros: left to the entry point (CPU does the same)
    g.add(params.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, N, hi - lo, Kd, bp + e * b.stride(0) * es,
          params.trans_b ? Kd : N, ap + lo * a.stride(0) * es, a.stride(0), cp + lo * c.stride(0) * es, c.stride(0));
  }
  return run_groups(g, a.dtype, s);
}

Status grouped_gemm_wgrad_cublas(const TensorView& a, const TensorView& b, const TensorView& offsets,
                                 const TensorView& c, void* stream) {
  const int64_t R = a.size(0), M = a.size(1), N = b.size(1);
  const int64_t E = offsets.size(0) - 1;
  if (a.dtype == DType::kF64) return f64_unsupported("grouped_gemm_wgrad_cublas");
  if (M == 0 || N == 0 || E < 1) return Status::Ok();
  const cudaStream_t s = as_stream(stream);
  std::vector<int64_t> off;
  SMOE_RETURN_IF_ERROR(offsets_to_host(offsets, s, &off));
  const size_t es = dtype_size(a.dtype);
  const auto* ap = static_cast<const char*>(a.data);
  const auto* bp = static_cast<const char*>(b.data);
  auto* cp = static_cast<char*>(c.data);
  Groups g;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t lo = std::max<int64_t>(0, std::min(off[e], R)), hi = std::max(lo, std::min(off[e + 1], R));
    char* ce = cp + e * M * N * es;
    if (hi == lo) {  // an empty expert's gradient is exactly zero (all-zero bits are +0 in every float type)
      SMOE_CUDA_CHECK(cudaMemsetAsync(ce, 0, static_cast<size_t>(M * N) * es, s));
      continue;
    }
    g.add(CUBLAS_OP_N, CUBLAS_OP_T, N, M, hi - lo, bp + lo * b.stride(0) * es, b.stride(0), ap + lo * a.stride(0) * es,
          a.stride(0), ce, N);
  }
  return run_groups(g, a.dtype, s);
}

}  // namespace smoe::cuda

#endif  // SMOE_HAVE_CUBLAS && !SMOE_SIMT

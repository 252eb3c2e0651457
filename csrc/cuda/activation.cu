// CUDA backend of the expert activations (include/smoe/ops/gemm.h): SwiGLU, GeGLU, GELU, ReLU,
// forward and backward, elementwise over [R, F] with row strides.
//
// Version v1: a grid-stride loop over the R*F output elements (64-bit index), each thread widening
// to f32, computing, and rounding once on store, with the CPU backend's formulas (exact erf GELU:
// Hendrycks & Gimpel 2016; SwiGLU: Shazeer 2020, arXiv:2002.05202). Memory-bound: forward moves
// R*F*(2 + 1) elements for gated activations, backward R*F*(3 + 2). The next step (fusing into the
// grouped GEMM's epilogue) belongs with the tensor-core GEMM.
#include "backend.h"
#include "common.cuh"

namespace smoe::SMOE_CUDA_NS {
namespace {

constexpr int kThreads = 256;
constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.0f + erff(x * kInvSqrt2)); }
// d/dx [x * Phi(x)] = Phi(x) + x * phi(x)
__device__ __forceinline__ float gelu_grad(float x) {
  const float cdf = 0.5f * (1.0f + erff(x * kInvSqrt2));
  return cdf + x * kInvSqrt2Pi * expf(-0.5f * x * x);
}

template <class S>
__global__ void __launch_bounds__(kThreads)
    activation_forward_kernel(int act, const S* in, int64_t in_stride, int64_t R, int64_t F, S* out,
                              int64_t out_stride) {
  const int64_t n = R * F;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / F, j = i % F;
    const S* g = in + r * in_stride;  // gated layouts: [g | u]
    const float x = to_float(g[j]);
    float y;
    switch (act) {
      case static_cast<int>(Activation::kSwiGLU):
        y = x * sigmoid(x) * to_float(g[F + j]);
        break;
      case static_cast<int>(Activation::kGeGLU):
        y = gelu(x) * to_float(g[F + j]);
        break;
      case static_cast<int>(Activation::kGELU):
        y = gelu(x);
        break;
      default:
        y = x > 0.0f ? x : 0.0f;
        break;  // kReLU
    }
    out[r * out_stride + j] = from_float<S>(y);
  }
}

template <class S>
__global__ void __launch_bounds__(kThreads)
    activation_backward_kernel(int act, const S* in, int64_t in_stride, const S* grad_out, int64_t go_stride, int64_t R,
                               int64_t F, S* grad_in, int64_t gi_stride) {
  const int64_t n = R * F;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / F, j = i % F;
    const S* g = in + r * in_stride;
    S* gg = grad_in + r * gi_stride;
    const float x = to_float(g[j]), d = to_float(grad_out[r * go_stride + j]);
    switch (act) {
      case static_cast<int>(Activation::kSwiGLU): {
        // silu(x) = x s(x);  silu'(x) = s(x) (1 + x (1 - s(x)))
        const float u = to_float(g[F + j]), s = sigmoid(x);
        gg[j] = from_float<S>(d * u * (s * (1.0f + x * (1.0f - s))));
        gg[F + j] = from_float<S>(d * (x * s));
        break;
      }
      case static_cast<int>(Activation::kGeGLU): {
        const float u = to_float(g[F + j]);
        gg[j] = from_float<S>(d * u * gelu_grad(x));
        gg[F + j] = from_float<S>(d * gelu(x));
        break;
      }
      case static_cast<int>(Activation::kGELU):
        gg[j] = from_float<S>(d * gelu_grad(x));
        break;
      default:
        gg[j] = from_float<S>(x > 0.0f ? d : 0.0f);
        break;  // kReLU; subgradient 0 at 0, as torch
    }
  }
}

}  // namespace

Status activation_forward(Activation act, const TensorView& in, const TensorView& out, void* stream) {
  const int64_t R = out.size(0), F = out.size(1);
  if (R * F == 0) return Status::Ok();
  return dispatch_float(in.dtype, "activation_forward", [&](auto tag) -> Status {
    using S = typename decltype(tag)::type;
    auto* kernel = &activation_forward_kernel<S>;
    // grid-stride over R*F outputs, 256 threads a block
    SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, dim3(grid_for(R * F, kThreads, 8192)), dim3(kThreads), 0, as_stream(stream),
                                static_cast<int>(act), in.data_as<const S>(), in.stride(0), R, F, out.data_as<S>(),
                                out.stride(0)));
    return Status::Ok();
  });
}

Status activation_backward(Activation act, const TensorView& in, const TensorView& grad_out, const TensorView& grad_in,
                           void* stream) {
  const int64_t R = grad_out.size(0), F = grad_out.size(1);
  if (R * F == 0) return Status::Ok();
  return dispatch_float(in.dtype, "activation_backward", [&](auto tag) -> Status {
    using S = typename decltype(tag)::type;
    auto* kernel = &activation_backward_kernel<S>;
    // grid-stride over R*F gradient positions (gated: each writes grad_g and grad_u)
    SMOE_CUDA_CHECK(SMOE_LAUNCH(kernel, dim3(grid_for(R * F, kThreads, 8192)), dim3(kThreads), 0, as_stream(stream),
                                static_cast<int>(act), in.data_as<const S>(), in.stride(0), grad_out.data_as<const S>(),
                                grad_out.stride(0), R, F, grad_in.data_as<S>(), grad_in.stride(0)));
    return Status::Ok();
  });
}

}  // namespace smoe::SMOE_CUDA_NS

// CPU expert activations: SwiGLU, GeGLU (exact erf gelu), GELU (exact), ReLU, forward and backward.
//
// Row-parallel; each row is widened to the accumulation type, computed, and rounded once on store.
// The element loops have no cross-element dependency; exp/erf are the libm ones so the results match
// a plain reference to the last bit in f32/f64 arithmetic.
#include <cmath>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/parallel.h"

namespace smoe::cpu {
namespace {

template <class Acc> constexpr Acc kInvSqrt2 = Acc(0.70710678118654752440);
template <class Acc> constexpr Acc kInvSqrt2Pi = Acc(0.39894228040143267794);

template <class Acc> inline Acc sigmoid(Acc x) { return Acc(1) / (Acc(1) + std::exp(-x)); }
template <class Acc> inline Acc gelu(Acc x) { return Acc(0.5) * x * (Acc(1) + std::erf(x * kInvSqrt2<Acc>)); }
// d/dx [x * Phi(x)] = Phi(x) + x * phi(x)
template <class Acc> inline Acc gelu_grad(Acc x) {
  const Acc cdf = Acc(0.5) * (Acc(1) + std::erf(x * kInvSqrt2<Acc>));
  return cdf + x * kInvSqrt2Pi<Acc> * std::exp(Acc(-0.5) * x * x);
}

// Rows of one parallel chunk: about 64K elements, so small inputs stay on one thread.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(cols, 1)); }

template <class T>
void forward_typed(Activation act, const TensorView& in, const TensorView& out) {
  using Acc = typename AccOf<T>::type;
  const int64_t R = out.size(0), F = out.size(1);
  const int64_t ldi = in.stride(0), ldo = out.stride(0);
  const T* pin = in.data_as<const T>();
  T* pout = out.data_as<T>();
  parallel_for(R, row_grain(F), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = pin + r * ldi;
      const T* u = g + F;  // gated layouts: [g | u]
      T* o = pout + r * ldo;
      switch (act) {
        case Activation::kSwiGLU:
          for (int64_t j = 0; j < F; ++j) {
            const Acc x = to_acc(g[j]);
            o[j] = from_acc<T>(x * sigmoid(x) * to_acc(u[j]));
          }
          break;
        case Activation::kGeGLU:
          for (int64_t j = 0; j < F; ++j) o[j] = from_acc<T>(gelu(to_acc(g[j])) * to_acc(u[j]));
          break;
        case Activation::kGELU:
          for (int64_t j = 0; j < F; ++j) o[j] = from_acc<T>(gelu(to_acc(g[j])));
          break;
        case Activation::kReLU:
          for (int64_t j = 0; j < F; ++j) {
            const Acc x = to_acc(g[j]);
            o[j] = from_acc<T>(x > Acc(0) ? x : Acc(0));
          }
          break;
      }
    }
  });
}

template <class T>
void backward_typed(Activation act, const TensorView& in, const TensorView& grad_out, const TensorView& grad_in) {
  using Acc = typename AccOf<T>::type;
  const int64_t R = grad_out.size(0), F = grad_out.size(1);
  const int64_t ldi = in.stride(0), ldgo = grad_out.stride(0), ldgi = grad_in.stride(0);
  const T* pin = in.data_as<const T>();
  const T* pgo = grad_out.data_as<const T>();
  T* pgi = grad_in.data_as<T>();
  parallel_for(R, row_grain(F), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = pin + r * ldi;
      const T* u = g + F;
      const T* go = pgo + r * ldgo;
      T* gg = pgi + r * ldgi;
      T* gu = gg + F;
      switch (act) {
        case Activation::kSwiGLU:
          // silu(x) = x s(x);  silu'(x) = s(x) (1 + x (1 - s(x)))
          for (int64_t j = 0; j < F; ++j) {
            const Acc x = to_acc(g[j]), uj = to_acc(u[j]), d = to_acc(go[j]);
            const Acc s = sigmoid(x);
            gg[j] = from_acc<T>(d * uj * (s * (Acc(1) + x * (Acc(1) - s))));
            gu[j] = from_acc<T>(d * (x * s));
          }
          break;
        case Activation::kGeGLU:
          for (int64_t j = 0; j < F; ++j) {
            const Acc x = to_acc(g[j]), uj = to_acc(u[j]), d = to_acc(go[j]);
            gg[j] = from_acc<T>(d * uj * gelu_grad(x));
            gu[j] = from_acc<T>(d * gelu(x));
          }
          break;
        case Activation::kGELU:
          for (int64_t j = 0; j < F; ++j) gg[j] = from_acc<T>(to_acc(go[j]) * gelu_grad(to_acc(g[j])));
          break;
        case Activation::kReLU:
          // The subgradient at 0 is 0, as in torch.
          for (int64_t j = 0; j < F; ++j) gg[j] = from_acc<T>(to_acc(g[j]) > Acc(0) ? to_acc(go[j]) : Acc(0));
          break;
      }
    }
  });
}

}  // namespace

Status activation_forward(Activation act, const TensorView& in, const TensorView& out) {
  switch (in.dtype) {
    case DType::kF32: forward_typed<float>(act, in, out); break;
    case DType::kF64: forward_typed<double>(act, in, out); break;
    case DType::kBF16: forward_typed<bf16_t>(act, in, out); break;
    case DType::kF16: forward_typed<f16_t>(act, in, out); break;
    default: return Status(Code::kInternal, "activation_forward: dtype passed validation but has no kernel");
  }
  return Status::Ok();
}

Status activation_backward(Activation act, const TensorView& in, const TensorView& grad_out,
                           const TensorView& grad_in) {
  switch (in.dtype) {
    case DType::kF32: backward_typed<float>(act, in, grad_out, grad_in); break;
    case DType::kF64: backward_typed<double>(act, in, grad_out, grad_in); break;
    case DType::kBF16: backward_typed<bf16_t>(act, in, grad_out, grad_in); break;
    case DType::kF16: backward_typed<f16_t>(act, in, grad_out, grad_in); break;
    default: return Status(Code::kInternal, "activation_backward: dtype passed validation but has no kernel");
  }
  return Status::Ok();
}

}  // namespace smoe::cpu

// CUDA backend of the expert MLP and shared experts (include/smoe/ops/mlp.h), composed from the
// backend's own kernels with no host read of offsets or counts: the expert segments stay in device
// memory, so a layer that calls these launchers can be captured in a CUDA graph.
//
// Versions (the CPU composition, csrc/cpu/mlp.cpp, is v0 and the oracle):
//  v1 (this file), forward (no permuted copy of x is written or saved):
//     pre, act = x[token_of_row] @ w1[e]^T, act(.)     one tensor-core GEMM (gemm_tc.h): the gather is in
//                                                      the A loads, the activation in the epilogue (it
//                                                      writes pre and act in one pass)
//     ys  = act @ w2[e]^T                               the backend's grouped_gemm (tensor cores or v0)
//     rows outside [offsets[0], offsets[E]) of pre, act, ys become zeros (zero_rows_outside_kernel,
//     which reads offsets[0] and offsets[E] on the device).
//     Where the tensor-core launcher refuses (its grid limits; f64 never reaches here) the first GEMM
//     is the gathered v0 (grouped_gemm_naive_gathered) -> pre, zeros outside, then activation_forward
//     over all R rows (act(0) = 0 for every activation, so the outside rows of act come out zero too).
//  backward: grad_act = grad_ys @ w2[e]; grad_w2 = wgrad(grad_ys, act); grad_pre = act'(pre, grad_act)
//     over all R rows (grad_act zeroed outside first, so every value is defined); grad_w1 =
//     wgrad(grad_pre, x[token_of_row]) with the gather in the B loads (grouped_gemm_wgrad_gathered_tc);
//     grad_xs = grad_pre @ w1[e], zeros outside; grad_x = permute_backward(grad_xs). Intermediates are
//     carved from the caller's workspace by the one carver of csrc/core/workspace.h.
//  Shared expert: the same MLP over one segment [0, T] of x itself (no gather). Its offsets live in
//     device memory for the GEMM kernels: the constant {0, INT64_MAX} (g_whole_segment), which the
//     kernels clamp to [0, R = T), so nothing is written or allocated per call. The gate reduction's
//     partials are carved from the caller's workspace (shared_expert_workspace_extra_bytes; torch
//     allocates it in Python). The sigmoid gate is one warp per token (fixed butterfly sum);
//     grad_gate_w[h] = sum_t dlogit[t] x[t, h] is a two-pass reduction (per-chunk partials over
//     kGateChunk tokens in token order, then the partials in chunk order): deterministic, no float
//     atomics.
#include "backend.h"
#include "common.cuh"
#include "core/workspace.h"
#include "gemm_tc.h"

namespace smoe::SMOE_CUDA_NS {
namespace {

constexpr int kRowWarps = 4;  // warp-per-row kernels: 4 rows per block
constexpr int kRowThreads = 32 * kRowWarps;
constexpr int kThreads = 256;        // elementwise kernels
constexpr int64_t kGateChunk = 256;  // tokens per partial sum of grad_gate_w

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & 31; }
__device__ __forceinline__ int64_t first_row() {
  return static_cast<int64_t>(blockIdx.x) * kRowWarps + (static_cast<int>(threadIdx.x) >> 5);
}
__device__ __forceinline__ int64_t row_step() { return static_cast<int64_t>(gridDim.x) * kRowWarps; }

// ---- rows of no expert ----------------------------------------------------------------------------

constexpr int kMaxZeroTargets = 3;
// Up to three [R, *] matrices whose rows outside [offsets[0], offsets[E]) become +0.0, in 2-byte units
// (every float dtype's row is a whole number of them; +0.0 is all-zero bits in each).
struct ZeroTargets {
  uint16_t* base[kMaxZeroTargets];
  int64_t stride[kMaxZeroTargets];  // in 2-byte units
  int64_t units[kMaxZeroTargets];   // 2-byte units per row
  int32_t n;
};

// The segment bounds are clamped to [0, R] as the GEMM kernels clamp them (docs/cuda.md, data rules).
__global__ void __launch_bounds__(kRowThreads)
    zero_rows_outside_kernel(const int64_t* offsets, int32_t E, int64_t R, ZeroTargets t) {
  const int64_t lo = max(int64_t{0}, min(offsets[0], R));
  const int64_t hi = max(lo, min(offsets[E], R));
  for (int64_t r = first_row(); r < R; r += row_step()) {
    if (r >= lo && r < hi) continue;
    for (int i = 0; i < t.n; ++i) {
      uint16_t* row = t.base[i] + r * t.stride[i];
      for (int64_t u = lane_id(); u < t.units[i]; u += 32) row[u] = 0;
    }
  }
}

void add_target(ZeroTargets& t, const TensorView& v) {
  const int64_t half = static_cast<int64_t>(dtype_size(v.dtype)) / 2;
  t.base[t.n] = v.data_as<uint16_t>();
  t.stride[t.n] = v.stride(0) * half;
  t.units[t.n] = v.size(1) * half;
  ++t.n;
}

// Rows of a, b, c (each optional) outside the expert segments become zeros.
Status zero_rows_outside(const TensorView& offsets, int64_t R, cudaStream_t stream, const TensorView& a,
                         const TensorView& b = TensorView{}, const TensorView& c = TensorView{}) {
  ZeroTargets t{};
  for (const TensorView* v : {&a, &b, &c}) {
    if (v->defined() && v->size(1) > 0) add_target(t, *v);
  }
  if (R == 0 || t.n == 0) return Status::Ok();
  // one warp per row; rows inside the segments return at once
  SMOE_CUDA_CHECK(SMOE_LAUNCH(&zero_rows_outside_kernel, dim3(grid_for(R, kRowWarps, 4096)), dim3(kRowThreads), 0,
                              stream, offsets.data_as<const int64_t>(), static_cast<int32_t>(offsets.size(0) - 1), R,
                              t));
  return Status::Ok();
}

// ---- workspace and scratch ------------------------------------------------------------------------

// The one workspace layout and carver (csrc/core/workspace.h), shared with the CPU backend.
using mlp_workspace::as_one_expert;
using WorkspaceCarver = mlp_workspace::Carver;

// The shared expert's one segment: {0, INT64_MAX} in device memory, which every GEMM and zero-rows
// kernel clamps to [0, R) (docs/cuda.md, data rules), so no per-call write and no allocation.
__device__ int64_t g_whole_segment[2] = {0, INT64_MAX};

// g_whole_segment of the current device (the tensors' device: DeviceGuard) as an offsets view [2] i64.
Status whole_segment(const TensorView& x, TensorView* offsets) {
  void* seg = nullptr;
  SMOE_CUDA_CHECK(cudaGetSymbolAddress(&seg, g_whole_segment));
  TensorView v = make_view(seg, DType::kI64, {2}, x.device);
  v.device_index = x.device_index;
  *offsets = v;
  return Status::Ok();
}

// ---- the sigmoid gate -----------------------------------------------------------------------------

// One warp per token: gate[t] = sigmoid(<x[t], gate_w>) (gate_w absent: 1; gate absent: not stored);
// y[t] += gate[t] * out[t], widened to f32 and rounded once.
template <class S>
__global__ void __launch_bounds__(kRowThreads)
    gate_forward_kernel(const S* x, int64_t ldx, const S* gate_w, const S* out, int64_t ldo, int64_t T, int64_t H,
                        float* gate, S* y, int64_t ldy) {
  for (int64_t t = first_row(); t < T; t += row_step()) {
    float g = 1.0f;
    if (gate_w != nullptr) {
      const S* xr = x + t * ldx;
      float s = 0.0f;
      for (int64_t h = lane_id(); h < H; h += 32) s += to_float(xr[h]) * to_float(gate_w[h]);
      s = warp_sum(s);  // every lane holds the same bits
      g = 1.0f / (1.0f + expf(-s));
    }
    if (gate != nullptr && lane_id() == 0) gate[t] = g;
    const S* o = out + t * ldo;
    S* yr = y + t * ldy;
    for (int64_t h = lane_id(); h < H; h += 32) yr[h] = from_float<S>(to_float(yr[h]) + g * to_float(o[h]));
  }
}

// One warp per token: grad_out[t] = gate[t] * grad_y[t];
// dlogit[t] = <grad_y[t], out[t]> * gate[t] * (1 - gate[t]).
template <class S>
__global__ void __launch_bounds__(kRowThreads)
    gate_backward_kernel(const S* grad_y, int64_t ldgy, const S* out, int64_t ldo, const float* gate, int64_t T,
                         int64_t H, S* grad_out, int64_t ldgo, float* dlogit) {
  for (int64_t t = first_row(); t < T; t += row_step()) {
    const S* gy = grad_y + t * ldgy;
    const S* o = out + t * ldo;
    S* go = grad_out + t * ldgo;
    const float g = gate[t];
    float dot = 0.0f;
    for (int64_t h = lane_id(); h < H; h += 32) {
      const float v = to_float(gy[h]);
      dot += v * to_float(o[h]);
      go[h] = from_float<S>(g * v);
    }
    dot = warp_sum(dot);
    if (lane_id() == 0) dlogit[t] = dot * g * (1.0f - g);
  }
}

// Pass 1: partial[p, h] = sum over tokens t of chunk p (in order) of dlogit[t] * x[t, h].
template <class S>
__global__ void __launch_bounds__(kThreads)
    gate_w_partial_kernel(const float* dlogit, const S* x, int64_t ldx, int64_t T, int64_t H, float* partial) {
  const int64_t h = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t p = blockIdx.y;
  if (h >= H) return;
  const int64_t t0 = p * kGateChunk, t1 = min(T, t0 + kGateChunk);
  float acc = 0.0f;
  for (int64_t t = t0; t < t1; ++t) acc += dlogit[t] * to_float(x[t * ldx + h]);
  partial[p * H + h] = acc;
}

// Pass 2: grad_gate_w[h] = sum over chunks p (in order) of partial[p, h]; P = 0 gives zeros.
template <class S>
__global__ void __launch_bounds__(kThreads)
    gate_w_reduce_kernel(const float* partial, int64_t P, int64_t H, S* grad_gate_w) {
  for (int64_t h = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; h < H;
       h += static_cast<int64_t>(gridDim.x) * kThreads) {
    float acc = 0.0f;
    for (int64_t p = 0; p < P; ++p) acc += partial[p * H + h];
    grad_gate_w[h] = from_float<S>(acc);
  }
}

// grad_x[t, h] += grad_xs[t, h] + dlogit[t] * gate_w[h]   (dlogit, gate_w absent: the plain sum),
// rounded once.
template <class S>
__global__ void __launch_bounds__(kThreads)
    accumulate_grad_x_kernel(const S* grad_xs, int64_t lds, const float* dlogit, const S* gate_w, int64_t T, int64_t H,
                             S* grad_x, int64_t ldx) {
  const int64_t n = T * H;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = i / H, h = i % H;
    S* d = grad_x + t * ldx + h;
    float v = to_float(*d) + to_float(grad_xs[t * lds + h]);
    if (gate_w != nullptr) v += dlogit[t] * to_float(gate_w[h]);
    *d = from_float<S>(v);
  }
}

// ---- the top-1 combine (expert_mlp_combine_top1_forward) -------------------------------------------

// y [T, H] (row stride ldy) becomes +0.0, one warp per row.
template <class S>
__global__ void __launch_bounds__(kRowThreads) zero_matrix_kernel(S* y, int64_t ldy, int64_t T, int64_t H) {
  for (int64_t t = first_row(); t < T; t += row_step()) {
    for (int64_t h = lane_id(); h < H; h += 32) y[t * ldy + h] = from_float<S>(0.0f);
  }
}

// The fallback where the tensor-core epilogue is refused: y[token_of_row[r]] = weights[that token] * out[r]
// for the rows r inside the (clamped) segments with a token in [0, T); one warp per row.
template <class S>
__global__ void __launch_bounds__(kRowThreads)
    scale_scatter_rows_kernel(const S* out, int64_t ldo, const int64_t* offsets, int32_t E, int64_t R,
                              const int32_t* token_of_row, const float* weights, int64_t T, int64_t H, S* y,
                              int64_t ldy) {
  const int64_t lo = max(int64_t{0}, min(offsets[0], R));
  const int64_t hi = max(lo, min(offsets[E], R));
  for (int64_t r = first_row(); r < R; r += row_step()) {
    if (r < lo || r >= hi) continue;
    const int64_t t = token_of_row[r];
    if (t < 0 || t >= T) continue;
    const float w = weights[t];
    for (int64_t h = lane_id(); h < H; h += 32) y[t * ldy + h] = from_float<S>(w * to_float(out[r * ldo + h]));
  }
}

// ---- the MLP over expert segments --------------------------------------------------------------------

// The first GEMM: pre = x[rows] @ w1[e]^T, act = act(pre) over the segments of `offsets` (device). Row
// r reads x[token_of_row[r]] when token_of_row is given (-1: zeros), else x[r] (the shared expert).
// The tensor cores fuse the gather and the activation; where they refuse, the gathered v0 GEMM, zeros
// outside, then the activation kernel over all R rows (act(0) = 0, so act is zero outside too). With
// `zero_outside` the rows outside the segments of pre and act are zeros on either path.
Status first_gemm(const ExpertMlpParams& params, const TensorView& x, const TensorView& token_of_row,
                  const TensorView& offsets, const TensorView& w1, const TensorView& pre, const TensorView& act,
                  bool zero_outside, cudaStream_t stream) {
  const int64_t R = pre.size(0);
  GroupedGemmTcParams tc;
  tc.trans_b = true;
  tc.activation = params.activation;
  const Status st = grouped_gemm_tc(tc, x, w1, offsets, token_of_row, TensorView{}, act, pre, stream);
  if (st.code() != Code::kUnsupported) {
    SMOE_RETURN_IF_ERROR(st);
    return zero_outside ? zero_rows_outside(offsets, R, stream, pre, act) : Status::Ok();
  }
  SMOE_RETURN_IF_ERROR(grouped_gemm_naive_gathered(GroupedGemmParams{true}, x, w1, offsets, token_of_row, pre, stream));
  SMOE_RETURN_IF_ERROR(zero_rows_outside(offsets, R, stream, pre));
  return activation_forward(params.activation, pre, act, stream);
}

// pre, act as first_gemm, out = act @ w2[e]^T over the segments, rows outside them zeros.
Status mlp_forward(const ExpertMlpParams& params, const TensorView& x, const TensorView& token_of_row,
                   const TensorView& offsets, const TensorView& w1, const TensorView& w2, const TensorView& pre,
                   const TensorView& act, const TensorView& out, cudaStream_t stream) {
  const int64_t R = pre.size(0);
  SMOE_RETURN_IF_ERROR(first_gemm(params, x, token_of_row, offsets, w1, pre, act, true, stream));
  SMOE_RETURN_IF_ERROR(grouped_gemm(GroupedGemmParams{true}, act, w2, offsets, out, stream));
  return zero_rows_outside(offsets, R, stream, out);
}

// grad_w1 = wgrad(grad_pre, x[token_of_row]) (x itself without token_of_row): the tensor cores with
// the gather in the B loads, v0 where they refuse.
Status wgrad_gathered(const TensorView& grad_pre, const TensorView& x, const TensorView& token_of_row,
                      const TensorView& offsets, const TensorView& grad_w1, cudaStream_t stream) {
  Status st = grouped_gemm_wgrad_gathered_tc(grad_pre, x, token_of_row, offsets, grad_w1, stream);
  if (st.code() == Code::kUnsupported) {
    return grouped_gemm_wgrad_naive_gathered(grad_pre, x, token_of_row, offsets, grad_w1, stream);
  }
  return st;
}

// grad_act = g_out @ w2[e]; grad_w2 = wgrad(g_out, act); grad_pre = act'(pre, grad_act);
// grad_w1 = wgrad(grad_pre, x[token_of_row]); grad_xs = grad_pre @ w1[e], zeros outside the segments.
Status mlp_backward(const ExpertMlpParams& params, const TensorView& g_out, const TensorView& x,
                    const TensorView& token_of_row, const TensorView& offsets, const TensorView& w1,
                    const TensorView& w2, const TensorView& pre, const TensorView& act, const TensorView& grad_act,
                    const TensorView& grad_pre, const TensorView& grad_xs, const TensorView& grad_w1,
                    const TensorView& grad_w2, cudaStream_t stream) {
  const int64_t R = g_out.size(0);
  const GroupedGemmParams nn{false};
  SMOE_RETURN_IF_ERROR(grouped_gemm(nn, g_out, w2, offsets, grad_act, stream));
  SMOE_RETURN_IF_ERROR(zero_rows_outside(offsets, R, stream, grad_act));
  SMOE_RETURN_IF_ERROR(grouped_gemm_wgrad(g_out, act, offsets, grad_w2, stream));
  SMOE_RETURN_IF_ERROR(activation_backward(params.activation, pre, grad_act, grad_pre, stream));
  SMOE_RETURN_IF_ERROR(wgrad_gathered(grad_pre, x, token_of_row, offsets, grad_w1, stream));
  SMOE_RETURN_IF_ERROR(grouped_gemm(nn, grad_pre, w1, offsets, grad_xs, stream));
  return zero_rows_outside(offsets, R, stream, grad_xs);  // rows of no expert send no gradient back
}

}  // namespace

Status expert_mlp_forward(const ExpertMlpParams& params, const TensorView& x, const TensorView& token_of_row,
                          const TensorView& offsets, const TensorView& w1, const TensorView& w2, const TensorView& pre,
                          const TensorView& act, const TensorView& ys, void* stream) {
  if (x.dtype == DType::kF64) return f64_unsupported("expert_mlp_forward");
  if (ys.size(0) == 0) return Status::Ok();
  return mlp_forward(params, x, token_of_row, offsets, w1, w2, pre, act, ys, as_stream(stream));
}

Status expert_mlp_combine_top1_forward(const ExpertMlpParams& params, const TensorView& x,
                                       const TensorView& token_of_row, const TensorView& offsets, const TensorView& w1,
                                       const TensorView& w2, const TensorView& weights, const TensorView& y,
                                       const TensorView& workspace, void* stream) {
  constexpr const char* op = "expert_mlp_combine_top1_forward";
  if (x.dtype == DType::kF64) return f64_unsupported(op);
  const int64_t R = token_of_row.size(0), T = x.size(0), H = x.size(1), F = w2.size(2), F1 = w1.size(1);
  if (T == 0 || H == 0) return Status::Ok();
  const cudaStream_t s = as_stream(stream);
  SMOE_RETURN_IF_ERROR(dispatch_float(x.dtype, op, [&](auto tag) -> Status {  // tokens with no row stay zero
    using S = typename decltype(tag)::type;
    SMOE_CUDA_CHECK(SMOE_LAUNCH(&zero_matrix_kernel<S>, dim3(grid_for(T, kRowWarps, 4096)), dim3(kRowThreads), 0, s,
                                y.data_as<S>(), y.stride(0), T, H));
    return Status::Ok();
  }));
  if (R == 0) return Status::Ok();
  WorkspaceCarver ws(workspace);  // layout: csrc/core/workspace.h
  const TensorView pre = ws.take(x.dtype, R, F1);
  const TensorView act = ws.take(x.dtype, R, F);
  // First GEMM (gather + activation epilogue), as the unfused forward; the rows outside the segments
  // are never read below, so the tensor-core path leaves them as they are.
  SMOE_RETURN_IF_ERROR(first_gemm(params, x, token_of_row, offsets, w1, pre, act, false, s));
  // Second GEMM: the epilogue scales row r by weights[token_of_row[r]] and stores it to y[token_of_row[r]]
  // (rows outside the segments and padding rows store nothing).
  GroupedGemmTcParams tc2;
  tc2.trans_b = true;
  tc2.store_row = token_of_row;
  TensorView w_rows = weights;  // [T, 1] f32 read as the per-stored-row weights [T]
  w_rows.ndim = 1;
  const Status st = grouped_gemm_tc(tc2, act, w2, offsets, TensorView{}, w_rows, y, TensorView{}, s);
  if (st.code() != Code::kUnsupported) return st;
  // Refused (grid limits): v0 into the workspace's [R, H] piece, then a scale-and-scatter pass.
  const TensorView out = ws.take(x.dtype, R, H);
  SMOE_RETURN_IF_ERROR(grouped_gemm(GroupedGemmParams{true}, act, w2, offsets, out, s));
  return dispatch_float(x.dtype, op, [&](auto tag) -> Status {
    using S = typename decltype(tag)::type;
    SMOE_CUDA_CHECK(SMOE_LAUNCH(&scale_scatter_rows_kernel<S>, dim3(grid_for(R, kRowWarps, 4096)), dim3(kRowThreads), 0,
                                s, out.data_as<const S>(), out.stride(0), offsets.data_as<const int64_t>(),
                                static_cast<int32_t>(offsets.size(0) - 1), R, token_of_row.data_as<const int32_t>(),
                                weights.data_as<const float>(), T, H, y.data_as<S>(), y.stride(0)));
    return Status::Ok();
  });
}

Status expert_mlp_backward(const ExpertMlpParams& params, const TensorView& grad_ys, const TensorView& x,
                           const TensorView& token_of_row, const TensorView& row_of, const TensorView& offsets,
                           const TensorView& w1, const TensorView& w2, const TensorView& pre, const TensorView& act,
                           const TensorView& grad_x, const TensorView& grad_w1, const TensorView& grad_w2,
                           const TensorView& workspace, void* stream) {
  if (grad_ys.dtype == DType::kF64) return f64_unsupported("expert_mlp_backward");
  const int64_t R = grad_ys.size(0), H = grad_ys.size(1), F = act.size(1), F1 = pre.size(1);
  WorkspaceCarver ws(workspace);                              // layout: csrc/core/workspace.h
  const TensorView grad_act = ws.take(grad_ys.dtype, R, F);   // [R, F]
  const TensorView grad_pre = ws.take(grad_ys.dtype, R, F1);  // [R, F1]
  const TensorView grad_xs = ws.take(grad_ys.dtype, R, H);    // [R, H]
  SMOE_RETURN_IF_ERROR(mlp_backward(params, grad_ys, x, token_of_row, offsets, w1, w2, pre, act, grad_act, grad_pre,
                                    grad_xs, grad_w1, grad_w2, as_stream(stream)));
  return permute_backward(grad_xs, row_of, grad_x, stream);
}

Status shared_expert_forward(const ExpertMlpParams& params, const TensorView& x, const TensorView& w1,
                             const TensorView& w2, const TensorView& gate_w, const TensorView& pre,
                             const TensorView& act, const TensorView& out, const TensorView& gate, const TensorView& y,
                             void* stream) {
  constexpr const char* op = "shared_expert_forward";
  if (x.dtype == DType::kF64) return f64_unsupported(op);
  const int64_t T = x.size(0), H = x.size(1);
  if (T == 0) return Status::Ok();
  const cudaStream_t s = as_stream(stream);
  TensorView offsets;
  SMOE_RETURN_IF_ERROR(whole_segment(x, &offsets));
  // No gather: row t reads x[t] (token_of_row absent).
  SMOE_RETURN_IF_ERROR(
      mlp_forward(params, x, TensorView{}, offsets, as_one_expert(w1), as_one_expert(w2), pre, act, out, s));
  return dispatch_float(x.dtype, op, [&](auto tag) -> Status {
    using S = typename decltype(tag)::type;
    // one warp per token
    SMOE_CUDA_CHECK(SMOE_LAUNCH(
        &gate_forward_kernel<S>, dim3(grid_for(T, kRowWarps, 4096)), dim3(kRowThreads), 0, s, x.data_as<const S>(),
        x.stride(0), gate_w.defined() ? gate_w.data_as<const S>() : nullptr, out.data_as<const S>(), out.stride(0), T,
        H, gate.defined() ? gate.data_as<float>() : nullptr, y.data_as<S>(), y.stride(0)));
    return Status::Ok();
  });
}

int64_t shared_expert_workspace_extra_bytes(int64_t T, int64_t H) {
  if (T < 0 || H < 0) return 0;
  // Saturating, like every size query (include/smoe/tensor.h): huge T*H must not wrap.
  const int64_t bytes = sat_mul(sat_mul(ceil_div(T, kGateChunk), H), static_cast<int64_t>(sizeof(float)));
  return mlp_workspace::piece(bytes);
}

Status shared_expert_backward(const ExpertMlpParams& params, const TensorView& grad_y, const TensorView& x,
                              const TensorView& w1, const TensorView& w2, const TensorView& gate_w,
                              const TensorView& pre, const TensorView& act, const TensorView& out,
                              const TensorView& gate, const TensorView& grad_x, const TensorView& grad_w1,
                              const TensorView& grad_w2, const TensorView& grad_gate_w, const TensorView& workspace,
                              void* stream) {
  constexpr const char* op = "shared_expert_backward";
  const DType dt = x.dtype;
  if (dt == DType::kF64) return f64_unsupported(op);
  const int64_t T = x.size(0), H = x.size(1), F = act.size(1), F1 = pre.size(1);
  const cudaStream_t s = as_stream(stream);
  WorkspaceCarver ws(workspace);
  const TensorView grad_out = ws.take(dt, T, H);         // [T, H] gate * grad_y
  const TensorView grad_act = ws.take(dt, T, F);         // [T, F]
  const TensorView grad_pre = ws.take(dt, T, F1);        // [T, F1]
  const TensorView grad_xs = ws.take(dt, T, H);          // [T, H]
  const TensorView dlogit = ws.take(DType::kF32, T, 1);  // [T]
  const bool gated = gate_w.defined();
  const int64_t P = ceil_div(T, kGateChunk);  // partials of grad_gate_w
  if (gated && P > 65535) {
    return unsupported(op, "T = " + std::to_string(T) + " exceeds the gate reduction's grid (65535 chunks of " +
                               std::to_string(kGateChunk) + " tokens); split the batch");
  }
  // After the CPU backend's pieces: the gate reduction's partials [P, H] f32 (shared_expert_workspace_extra_bytes).
  const TensorView partial = ws.take(DType::kF32, P, H);
  TensorView offsets;
  SMOE_RETURN_IF_ERROR(whole_segment(x, &offsets));

  SMOE_RETURN_IF_ERROR(dispatch_float(dt, op, [&](auto tag) -> Status {
    using S = typename decltype(tag)::type;
    if (!gated || H == 0) return Status::Ok();
    if (T > 0) {
      // one warp per token
      SMOE_CUDA_CHECK(SMOE_LAUNCH(&gate_backward_kernel<S>, dim3(grid_for(T, kRowWarps, 4096)), dim3(kRowThreads), 0, s,
                                  grad_y.data_as<const S>(), grad_y.stride(0), out.data_as<const S>(), out.stride(0),
                                  gate.data_as<const float>(), T, H, grad_out.data_as<S>(), grad_out.stride(0),
                                  dlogit.data_as<float>()));
      // x: column blocks of 256, y: chunks of kGateChunk tokens
      SMOE_CUDA_CHECK(SMOE_LAUNCH(&gate_w_partial_kernel<S>,
                                  dim3(static_cast<unsigned>(ceil_div(H, kThreads)), static_cast<unsigned>(P)),
                                  dim3(kThreads), 0, s, dlogit.data_as<const float>(), x.data_as<const S>(),
                                  x.stride(0), T, H, partial.data_as<float>()));
    }
    // thread per column, partials in chunk order
    SMOE_CUDA_CHECK(SMOE_LAUNCH(&gate_w_reduce_kernel<S>, dim3(grid_for(H, kThreads)), dim3(kThreads), 0, s,
                                partial.data_as<const float>(), P, H, grad_gate_w.data_as<S>()));
    return Status::Ok();
  }));

  const TensorView& g_out = gated ? grad_out : grad_y;
  SMOE_RETURN_IF_ERROR(mlp_backward(params, g_out, x, TensorView{}, offsets, as_one_expert(w1), as_one_expert(w2), pre,
                                    act, grad_act, grad_pre, grad_xs, as_one_expert(grad_w1), as_one_expert(grad_w2),
                                    s));
  if (T * H == 0) return Status::Ok();
  return dispatch_float(dt, op, [&](auto tag) -> Status {
    using S = typename decltype(tag)::type;
    // grid-stride over T*H elements
    SMOE_CUDA_CHECK(
        SMOE_LAUNCH(&accumulate_grad_x_kernel<S>, dim3(grid_for(T * H, kThreads, 8192)), dim3(kThreads), 0, s,
                    grad_xs.data_as<const S>(), grad_xs.stride(0), gated ? dlogit.data_as<const float>() : nullptr,
                    gated ? gate_w.data_as<const S>() : nullptr, T, H, grad_x.data_as<S>(), grad_x.stride(0)));
    return Status::Ok();
  });
}

}  // namespace smoe::SMOE_CUDA_NS

// csrc/core/workspace.h: the layout contracts of the caller-provided workspaces, header-only so that
// csrc/core (the size queries and their checks) and the backends (which carve the buffer) share one
// copy. One section per op family.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "smoe/tensor.h"  // sat_mul / sat_add

namespace smoe::workspace {

// `bytes` (>= 0) rounded up to a multiple of `align`; saturates at kSizeOverflow like every size
// query (no `bytes + align - 1` past INT64_MAX). Both sections below pad with it.
inline int64_t align_up(int64_t bytes, int64_t align) {
  if (bytes >= kSizeOverflow - align) return kSizeOverflow;
  return (bytes + align - 1) / align * align;
}

// Pieces of a router-loss workspace start at multiples of 256 bytes (CUDA's allocation alignment).
inline constexpr int64_t kAlign = 256;
inline int64_t align256(int64_t bytes) { return align_up(bytes, kAlign); }

// ==== router losses (smoe/ops/router_losses.h) =====================================================
//
// load_balancing_loss_forward / _backward, probs [T, E]:
//   [0, align256(4E))               i32 counts[E]      tokens routed to each expert
//   [align256(4E), + 4 * E * nb)    f32 part[nb][E]    per-chunk column sums of probs (forward);
//                                                     the backward uses part[0][0 .. E) for its coefficients
// The tokens are cut into nb chunks of `chunk` tokens; the chunking is a function of T alone (never
// of the device), so the order of the sums, hence the loss, is the same on every GPU.
inline int64_t lb_loss_chunk(int64_t T) { return T <= 65536 ? 256 : (T + 255) / 256; }
inline int64_t lb_loss_chunks(int64_t T) {
  const int64_t chunk = lb_loss_chunk(T);
  return (T + chunk - 1) / chunk;
}
inline int64_t lb_loss_counts_offset() { return 0; }
inline int64_t lb_loss_part_offset(int64_t E) { return align256(sat_mul(4, E)); }
inline int64_t lb_loss_bytes(int64_t T, int64_t E) {
  if (T <= 0 || E <= 0) return 0;
  return sat_add(lb_loss_part_offset(E), sat_mul(sat_mul(4, E), lb_loss_chunks(T)));
}

// z_loss_forward / _backward, logits [T, E]:
//   [0, 8T)   f64 zsq[T]   the squared logsumexp of each token, summed in a fixed order afterwards
inline int64_t z_loss_bytes(int64_t T, int64_t E) {
  if (T <= 0 || E <= 0) return 0;
  return sat_mul(8, T);
}

}  // namespace smoe::workspace

// ==== expert MLP / shared expert (include/smoe/ops/mlp.h) ===========================================
// expert_mlp_backward's workspace, in order, each piece on a kAlign (64-byte) boundary after an
// aligned base:  grad_act [R, F], grad_pre [R, F1], grad_xs [R, H]   (the dtype of grad_ys).
// shared_expert_backward's:  grad_out [T, H], grad_act [T, F], grad_pre [T, F1], grad_xs [T, H],
// dlogit [T] (f32; f64 for f64), then what the device backends carve after them (the gate
// reduction's partials, shared_expert_workspace_extra_bytes in csrc/cuda/backend_api.inc).
// expert_mlp_combine_top1_forward's: pre [R, F1], act [R, F], rows [R, H] (x's dtype; the CPU backend
// gathers x into rows and writes the second GEMM there, the device backends take rows only where the
// tensor-core epilogue is refused); python/smoe/ops/mlp.py computes the same size.
// expert_mlp_forward needs no workspace: the gather of x rows happens inside the first GEMM (CUDA) or into
// ys before the second GEMM overwrites it (CPU), so no [R, H] copy of x exists.
namespace smoe::mlp_workspace {

inline constexpr int64_t kAlign = 64;  // bytes; a cache line, and 16-byte aligned for cp.async

// Bytes one piece takes, padded to kAlign; saturates at kSizeOverflow like every size query.
inline int64_t piece(int64_t bytes) { return workspace::align_up(bytes, kAlign); }

// kAlign (room to align the base pointer) + the padded pieces, saturated.
inline int64_t total(std::initializer_list<int64_t> piece_bytes) {
  int64_t t = kAlign;
  for (int64_t b : piece_bytes) t = sat_add(t, piece(b));
  return t;
}

// Carves the pieces out of the workspace in the order above; every backend uses this one carver.
class Carver {
 public:
  explicit Carver(const TensorView& ws) : device_(ws.device), device_index_(ws.device_index) {
    const auto p = reinterpret_cast<uintptr_t>(ws.data);
    next_ = static_cast<char*>(ws.data) + (kAlign - static_cast<int64_t>(p % kAlign)) % kAlign;
  }
  TensorView take(DType dtype, int64_t r, int64_t c) {
    TensorView v = make_view(static_cast<void*>(next_), dtype, {r, c}, device_);
    v.device_index = device_index_;
    next_ += piece(r * c * static_cast<int64_t>(dtype_size(dtype)));
    return v;
  }

 private:
  char* next_;
  Device device_;
  int device_index_;
};

// A 2-D weight [N, Kd] of the shared expert seen as the single expert [1, N, Kd] of a grouped GEMM,
// on the same device (type and index) as the weight.
inline TensorView as_one_expert(const TensorView& w) {
  TensorView v = make_view(w.data, w.dtype, {1, w.size(0), w.size(1)}, w.device);
  v.device_index = w.device_index;
  return v;
}

}  // namespace smoe::mlp_workspace
// ==== end of the expert MLP section =================================================================

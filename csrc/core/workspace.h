// csrc/core/workspace.h: the layout contracts of the caller-provided workspaces, header-only so that
// csrc/core (the size queries and their checks) and the backends (which carve the buffer) share one
// copy. One section per op family.
#pragma once

#include <cstdint>

#include "smoe/tensor.h"  // sat_mul / sat_add

namespace smoe::workspace {

// Pieces of a workspace start at multiples of 256 bytes (CUDA's allocation alignment).
inline constexpr int64_t kAlign = 256;
inline int64_t align256(int64_t bytes) { return sat_mul((bytes + kAlign - 1) / kAlign, kAlign); }

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

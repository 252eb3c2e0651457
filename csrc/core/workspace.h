// csrc/core/workspace.h: workspace layouts shared by csrc/core and the backends (header-only).
//
// NOTE (cudal branch): only the "router losses" section, written to SPEC.md B so that the CUDA
// router-loss kernels compile; the core helper's copy of this file is the one to keep at the merge.
#pragma once

#include <cstdint>

namespace smoe::detail {

inline int64_t align256(int64_t v) { return (v + 255) / 256 * 256; }

// ---- router losses ------------------------------------------------------------------------------
// load_balancing_loss (forward and backward): [counts i32 E, padded to 256 B][partials f32 nb x E]
// with nb = ceil(T / chunk), chunk = 256 tokens (T <= 65536) else ceil(T / 256) (a function of T only,
// so the summation order is the same on every GPU). The backward uses the first E floats of the
// partials for its per-expert coefficients. 0 bytes when T == 0 or E == 0.
inline int64_t lb_loss_chunk(int64_t T) { return T <= 65536 ? 256 : (T + 255) / 256; }
inline int64_t load_balancing_loss_workspace_bytes(int64_t T, int64_t E) {
  if (T <= 0 || E <= 0) return 0;
  const int64_t chunk = lb_loss_chunk(T), nb = (T + chunk - 1) / chunk;
  return align256(4 * E) + 4 * E * nb;
}
// z_loss (forward and backward): z_t^2 per token, f64 [T]. 0 bytes when T == 0 or E == 0.
inline int64_t z_loss_workspace_bytes(int64_t T, int64_t E) { return T <= 0 || E <= 0 ? 0 : 8 * T; }

}  // namespace smoe::detail

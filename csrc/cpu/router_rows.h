// csrc/cpu/router_rows.h: the per-token (row) building blocks the CPU router family shares
// (csrc/cpu/topk_gating.cpp, expert_choice.cpp, router_losses.cpp): top-k selection, the score
// functions and their backward, the first-bad-row report of the data checks.
//
// Work split of every router op: one token (row of the logits) per iteration, tokens chunked over the
// thread pool; each row is independent, so results do not depend on the thread count.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "smoe/ops/topk_gating.h"  // ScoreFunc

namespace smoe::cpu::router {

constexpr int kInsertionMaxK = 16;

// Enough rows per chunk that a chunk is worth a thread hand-off (~8K elements).
inline int64_t row_grain(int64_t E) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(E, 1)); }

// Selection keys never hold NaN: a NaN ranks below every number (as on the device backends), so
// the comparisons below form a strict total order and a picked index is always in range.
template <class A>
inline A rank_key(A v) {
  return v == v ? v : -std::numeric_limits<A>::infinity();
}

// The lowest row that failed a data check, whatever thread found it: integer min is
// order-independent, so the reported row is deterministic.
class FirstBadRow {
 public:
  void note(int64_t row) {
    int64_t cur = row_.load(std::memory_order_relaxed);
    while (row < cur && !row_.compare_exchange_weak(cur, row, std::memory_order_relaxed)) {}
  }
  bool any() const { return row_.load() != kNone; }
  int64_t row() const { return row_.load(); }

 private:
  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::atomic<int64_t> row_{kNone};
};

// Writes to pos[0, k) the positions of the k largest keys[0, n), in descending key order, ties to
// the lower position. keys hold no NaN. scratch is reused across calls.
//
// TEACH: k <= kInsertionMaxK (the routers' case): split the keys into k disjoint blocks; the smallest of
// the k block maxima is a lower bound of the k-th best key (k keys reach it), so only keys >= that
// bound can be picked. A branch-free pass keeps those (typically ~2k of E), in ascending position,
// and an insertion into a sorted array of k picks the winners; "strictly greater" alone then keeps
// the lower position first among equal keys. O(E) with few mispredicted branches, no sort of E.
// Larger k: nth_element + sort of the k winners, O(E + k log k).
template <class A>
inline void select_topk(const A* keys, int64_t n, int64_t k, int32_t* pos, std::vector<int32_t>& scratch) {
  scratch.resize(static_cast<size_t>(n));
  int32_t* idx = scratch.data();
  if (k <= kInsertionMaxK) {
    int64_t c = 0;
    if (n >= 4 * k) {
      A bound = 0;
      for (int64_t b = 0; b < k; ++b) {
        const int64_t lo = n * b / k, hi = n * (b + 1) / k;
        A mx = keys[lo];
        for (int64_t j = lo + 1; j < hi; ++j) mx = keys[j] > mx ? keys[j] : mx;
        bound = (b == 0 || mx < bound) ? mx : bound;
      }
      for (int64_t j = 0; j < n; ++j) {
        idx[c] = int32_t(j);
        c += keys[j] >= bound;
      }
    } else {
      std::iota(idx, idx + n, 0);
      c = n;
    }
    A top[kInsertionMaxK];
    int64_t m = 0;
    for (int64_t i = 0; i < c; ++i) {
      const A v = keys[idx[i]];
      if (m == k && !(v > top[k - 1])) continue;
      if (m < k) ++m;
      int64_t p = m - 1;  // when full, the k-th best is dropped
      while (p > 0 && v > top[p - 1]) {
        top[p] = top[p - 1];
        pos[p] = pos[p - 1];
        --p;
      }
      top[p] = v;
      pos[p] = idx[i];
    }
    return;
  }
  std::iota(idx, idx + n, 0);
  auto better = [keys](int32_t a, int32_t b) { return keys[a] > keys[b] || (keys[a] == keys[b] && a < b); };
  if (k < n) std::nth_element(idx, idx + k, idx + n, better);
  std::sort(idx, idx + k, better);
  std::copy(idx, idx + k, pos);
}

// ---- score functions (one row of E) -------------------------------------------------------------

// Loads one row of logits into acc precision; returns false if it holds a NaN.
template <class In, class A>
inline bool load_row(const In* in, int64_t E, A* x) {
  bool ok = true;
  for (int64_t e = 0; e < E; ++e) {
    x[e] = to_acc(in[e]);
    ok &= (x[e] == x[e]);
  }
  return ok;
}

// s = softmax(x) with the max subtracted first (no overflow), or s = sigmoid(x).
template <class A>
inline void score_row(ScoreFunc f, const A* x, int64_t E, A* s) {
  if (f == ScoreFunc::kSoftmax) {
    A m = x[0];
    for (int64_t e = 1; e < E; ++e) m = x[e] > m ? x[e] : m;
    A sum = 0;
    for (int64_t e = 0; e < E; ++e) {
      s[e] = std::exp(x[e] - m);
      sum += s[e];
    }
    for (int64_t e = 0; e < E; ++e) s[e] = s[e] / sum;
  } else {
    for (int64_t e = 0; e < E; ++e) s[e] = A(1) / (A(1) + std::exp(-x[e]));
  }
}

// grad_x from grad_s, given s: softmax  dx = s * (g - <g, s>);  sigmoid  dx = g * s * (1 - s).
template <class A>
inline void score_row_backward(ScoreFunc f, const A* s, const A* g, int64_t E, A* dx) {
  if (f == ScoreFunc::kSoftmax) {
    A dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += g[e] * s[e];
    for (int64_t e = 0; e < E; ++e) dx[e] = s[e] * (g[e] - dot);
  } else {
    for (int64_t e = 0; e < E; ++e) dx[e] = g[e] * s[e] * (A(1) - s[e]);
  }
}

inline Status nan_logits(const char* op, int64_t row) {
  return invalid_argument(op, "logits", "no NaN values", "a NaN in row " + std::to_string(row));
}

}  // namespace smoe::cpu::router

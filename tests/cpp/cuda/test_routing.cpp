// routing_plan of the CUDA backend (csrc/cuda/routing.cu) through the SIMT emulator: counts,
// offsets, row_of and token_of_row must equal the CPU backend's exactly, for both drop policies.
#include <limits>
#include <random>

#include "cpu/routing.h"
#include "cuda_testing.h"
#include "kernel_version.h"

namespace smoe::testing {
namespace {

struct RoutingCase {
  int64_t T, K;
  int32_t E;
  int64_t capacity;
  int32_t pad;
  int skew;  // 0 uniform, 1 every token on expert E-1, 2 half the experts empty
  DropPolicy policy = DropPolicy::kByTokenOrder;
  bool tied_weights = false;  // weights drawn from {0, 0.25, 0.5}: many exact ties (lower (t, k) wins)
};

std::vector<float> make_weights(const RoutingCase& c, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<float> w(size_t(c.T * c.K));
  for (float& x : w) x = c.tied_weights ? 0.25f * float(g() % 3) : u(g);
  return w;
}

std::vector<int32_t> make_experts(const RoutingCase& c, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<int32_t> ex(size_t(c.T * c.K));
  for (int64_t t = 0; t < c.T; ++t) {
    for (int64_t k = 0; k < c.K; ++k) {
      int32_t e;
      switch (c.skew) {
        case 1:
          e = (c.E - 1 - int32_t(k) + c.E) % c.E;
          break;  // distinct per token when K <= E
        case 2:
          e = int32_t(2 * ((t + 3 * k) % ((c.E + 1) / 2))) % c.E;
          break;
        default:
          e = int32_t(g() % uint32_t(c.E));
          break;
      }
      ex[size_t(t * c.K + k)] = e;
    }
  }
  return ex;
}

void check(const RoutingCase& c, int64_t per_chunk = 0) {
  SCOPED_TRACE("T=" + std::to_string(c.T) + " K=" + std::to_string(c.K) + " E=" + std::to_string(c.E) +
               " C=" + std::to_string(c.capacity) + " pad=" + std::to_string(c.pad) +
               " skew=" + std::to_string(c.skew) + (c.policy == DropPolicy::kByScore ? " by score" : "") +
               (c.tied_weights ? " tied" : "") + " per_chunk=" + std::to_string(per_chunk));
  RoutingPlanParams p;
  p.num_experts = c.E;
  p.capacity = c.capacity;
  p.pad_multiple = c.pad;
  p.drop_policy = c.policy;
  const int64_t T = c.T, K = c.K, E = c.E;
  std::vector<int32_t> ex = make_experts(c, uint32_t(T * 13 + K));
  const int64_t R = routing_plan_max_rows(p, T, K);
  const int64_t ws_cpu = cpu::routing_plan_workspace_bytes(p, T, K);
  const int64_t ws_sim = per_chunk > 0 ? sim::routing_plan_workspace_bytes_chunked(p, T, K, per_chunk)
                                       : sim::routing_plan_workspace_bytes(p, T, K);
  // The public routing_plan_workspace_bytes is meant to be the max over the backends.
  std::vector<uint8_t> ws(size_t(std::max<int64_t>({ws_cpu, ws_sim, 1})));
  const TensorView wsv = make_view(ws.data(), {int64_t(ws.size())});
  const TensorView ev = make_view(ex.data(), {T, K});
  std::vector<float> w = make_weights(c, uint32_t(T * 7 + E));
  const TensorView wv = c.policy == DropPolicy::kByScore ? make_view(w.data(), {T, K}) : TensorView{};

  std::vector<int32_t> cnt_cpu(E), rof_cpu(T * K), tor_cpu(R), cnt(E), rof(T * K), tor(R);
  std::vector<int64_t> off_cpu(E + 1), off(E + 1);
  ASSERT_TRUE(cpu::routing_plan(p, ev, wv, make_view(cnt_cpu.data(), {E}), make_view(off_cpu.data(), {E + 1}),
                                make_view(rof_cpu.data(), {T, K}), make_view(tor_cpu.data(), {R}), wsv)
                  .ok());
  run_all_schedules([&] {
    poison(cnt), poison(off), poison(rof), poison(tor), poison(ws);
    if (per_chunk > 0) {
      EXPECT_OK(sim::routing_plan_chunked(p, ev, wv, make_view(cnt.data(), {E}), make_view(off.data(), {E + 1}),
                                          make_view(rof.data(), {T, K}), make_view(tor.data(), {R}), wsv, per_chunk,
                                          nullptr));
    } else {
      EXPECT_OK(sim::routing_plan(p, ev, wv, make_view(cnt.data(), {E}), make_view(off.data(), {E + 1}),
                                  make_view(rof.data(), {T, K}), make_view(tor.data(), {R}), wsv, nullptr));
    }
    std::vector<unsigned char> out;
    append_bytes(out, cnt), append_bytes(out, off), append_bytes(out, rof), append_bytes(out, tor);
    return out;
  });
  EXPECT_EQ(cnt, cnt_cpu);
  EXPECT_EQ(off, off_cpu);
  EXPECT_EQ(rof, rof_cpu);
  EXPECT_EQ(tor, tor_cpu);
}

TEST(SimtRouting, PlanMatchesCpuExactly) {
  const RoutingCase cases[] = {
      {0, 2, 4, -1, 1, 0},                                 // no tokens
      {1, 1, 1, -1, 1, 0},                                 // E = 1
      {7, 2, 5, -1, 1, 0},                                 // odd E
      {7, 5, 5, -1, 4, 1},                                 // K = E, padding
      {300, 4, 7, -1, 8, 0},     {300, 2, 300, -1, 1, 0},  // E > 256, many empty experts
      {300, 2, 9, -1, 16, 2},                              // half the experts empty, padded
      {300, 1, 4, -1, 1, 1},                               // every token on one expert
      {300, 2, 6, 37, 1, 0},                               // capacity: drops in token order
      {300, 1, 4, 5, 8, 1},                                // capacity on the only used expert, padding
      {300, 2, 6, 0, 1, 0},                                // capacity 0: everything dropped
      {5000, 4, 13, -1, 1, 0},                             // 3 chunks of the scatter
      {5000, 4, 13, 1000, 4, 0},
  };
  // v1 (csrc/cuda/routing.cu) and the naive v0 (csrc/cuda/naive/routing_v0.cu): the same exact plan.
  for (int version : {1, 0}) {
    KernelVersionScope scope(sim::KernelOp::kRoutingPlan, version);
    SCOPED_TRACE(version_trace(sim::KernelOp::kRoutingPlan));
    for (const RoutingCase& c : cases) check(c);
  }
}

// The stable order has one answer: any chunking (one token per chunk, odd sizes, one chunk for all,
// more chunks than a column-scan tile) gives the CPU backend's plan exactly.
TEST(SimtRouting, ResultDoesNotDependOnTheChunking) {
  const DropPolicy S = DropPolicy::kByScore;
  const RoutingCase cases[] = {
      {300, 4, 7, -1, 8, 0},
      {300, 2, 6, 37, 1, 0},
      {300, 2, 300, -1, 1, 0},
      {300, 4, 7, 100, 8, 0, S, true},
  };
  for (const RoutingCase& c : cases)
    for (int64_t per_chunk : {1, 3, 7, 32, 100, 1 << 20}) check(c, per_chunk);
}

TEST(SimtRouting, DropByScoreMatchesCpuExactly) {
  const DropPolicy S = DropPolicy::kByScore;
  const RoutingCase cases[] = {
      {0, 2, 4, 3, 1, 0, S, false},         // no tokens
      {1, 1, 1, 0, 1, 0, S, false},         // capacity 0 on E = 1
      {7, 2, 5, 1, 1, 0, S, true},          // ties: the lower (t, k) wins
      {7, 5, 5, 2, 4, 1, S, false},         // K = E, padding
      {300, 4, 7, 100, 8, 0, S, true},      // some experts over capacity, some not
      {300, 2, 300, 1, 1, 0, S, true},      // E > 256, many empty experts
      {300, 2, 9, 20, 16, 2, S, false},     // half the experts empty, padded
      {300, 1, 4, 37, 1, 1, S, true},       // every token on one expert, heavy ties
      {300, 2, 6, 0, 1, 0, S, false},       // capacity 0: everything dropped
      {300, 2, 6, 1000, 1, 0, S, false},    // capacity above every count: nothing dropped
      {5000, 4, 13, 1000, 4, 0, S, false},  // several chunks; segments of ~1500 > one select tile
      {5000, 4, 13, 777, 1, 0, S, true},
      {4097, 2, 3, 2049, 1, 0, S, true},  // one radix digit holds most keys: all 8 passes matter
  };
  // v1 (csrc/cuda/routing.cu) and the naive v0 (csrc/cuda/naive/routing_v0.cu): the same exact plan.
  for (int version : {1, 0}) {
    KernelVersionScope scope(sim::KernelOp::kRoutingPlan, version);
    SCOPED_TRACE(version_trace(sim::KernelOp::kRoutingPlan));
    for (const RoutingCase& c : cases) check(c);
  }
}

// The CPU backend rejects NaN weights; the device backends rank a NaN like -inf (docs/kernels/routing.md).
TEST(SimtRouting, DropByScoreRanksNanLowest) {
  const int64_t T = 6, K = 1;
  RoutingPlanParams p;
  p.num_experts = 1;
  p.capacity = 3;
  p.drop_policy = DropPolicy::kByScore;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<int32_t> ex(T, 0), cnt(1), rof(T), tor(T);
  std::vector<float> w = {nan, 0.5f, nan, -1.0f, 0.25f, nan};
  std::vector<int64_t> off(2);
  std::vector<uint8_t> ws(size_t(sim::routing_plan_workspace_bytes(p, T, K)));
  for (int version : {1, 0}) {
    KernelVersionScope scope(sim::KernelOp::kRoutingPlan, version);
    SCOPED_TRACE(version_trace(sim::KernelOp::kRoutingPlan));
    EXPECT_OK(sim::routing_plan(p, make_view(ex.data(), {T, K}), make_view(w.data(), {T, K}),
                                make_view(cnt.data(), {1}), make_view(off.data(), {2}), make_view(rof.data(), {T, K}),
                                make_view(tor.data(), {T}), make_view(ws.data(), {int64_t(ws.size())}), nullptr));
    EXPECT_EQ(cnt, std::vector<int32_t>({3}));
    EXPECT_EQ(off, std::vector<int64_t>({0, 3}));
    EXPECT_EQ(rof, std::vector<int32_t>({-1, 0, -1, 1, 2, -1}));  // kept: 0.5, -1, 0.25 in token order
    EXPECT_EQ(tor, std::vector<int32_t>({1, 3, 4, -1, -1, -1}));
  }
}

}  // namespace
}  // namespace smoe::testing

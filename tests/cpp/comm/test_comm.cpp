// The in-process communicator (threads as ranks) and ep_moe_forward against the single-rank pipeline.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>

#include "comm/communicator.h"
#include "comm/ep.h"

using namespace smoe;
using namespace smoe::comm;

namespace {

// rank r sends (r + 2p) % 3 + p elements to rank p; element value = 1000*src + 100*dst + index.
int64_t n_of(int src, int dst) { return (src + 2 * dst) % 3 + dst; }

TEST(InProcessComm, AllToAllVUnevenCountsArriveInRankOrder) {
  for (int P = 1; P <= 4; ++P) {
    auto g = InProcessGroup::create(P);
    std::vector<std::string> errors(P);
    run_ranks(P, [&](int r) {
      std::vector<int64_t> sc(P), rc(P);
      for (int p = 0; p < P; ++p) sc[p] = n_of(r, p), rc[p] = n_of(p, r);
      auto sd = displacements(sc), rd = displacements(rc);
      std::vector<double> send, recv(static_cast<size_t>(std::accumulate(rc.begin(), rc.end(), int64_t{0})), -1);
      for (int p = 0; p < P; ++p)
        for (int64_t i = 0; i < sc[p]; ++i) send.push_back(1000.0 * r + 100.0 * p + i);
      Status st = g->comm(r).all_to_all_v(send.data(), sc.data(), sd.data(), recv.data(), rc.data(), rd.data(),
                                          DType::kF64, nullptr);
      if (!st.ok()) errors[r] = st.message();
      for (int p = 0; p < P; ++p)
        for (int64_t i = 0; i < rc[p]; ++i)
          if (recv[rd[p] + i] != 1000.0 * p + 100.0 * r + i) errors[r] = "wrong element from rank " + std::to_string(p);
    });
    for (int r = 0; r < P; ++r) EXPECT_EQ(errors[r], "") << "P=" << P << " rank " << r;
  }
}

TEST(InProcessComm, CountMismatchFailsOnEveryRank) {
  const int P = 3;
  auto g = InProcessGroup::create(P);
  std::vector<Status> st(P);
  run_ranks(P, [&](int r) {
    std::vector<int64_t> sc(P, 1), rc(P, 1);
    if (r == 2) rc[0] = 2;  // rank 2 expects 2 from rank 0, which sends 1
    auto sd = displacements(sc), rd = displacements(rc);
    std::vector<float> send(3, 1.f), recv(4, 0.f);
    st[r] = g->comm(r).all_to_all_v(send.data(), sc.data(), sd.data(), recv.data(), rc.data(), rd.data(), DType::kF32,
                                    nullptr);
  });
  for (int r = 0; r < P; ++r) {
    EXPECT_EQ(st[r].code(), Code::kInvalidArgument) << r;
    EXPECT_NE(st[r].message().find("rank 2 to expect from rank 0 the 1 elements it sends"), std::string::npos)
        << st[r].message();
  }
}

TEST(InProcessComm, NegativeCountFailsOnEveryRankAndMissingRankTimesOut) {
  {
    auto g = InProcessGroup::create(2);
    std::vector<Status> st(2);
    run_ranks(2, [&](int r) {
      std::vector<int64_t> sc{0, r == 1 ? -1 : 0}, rc{0, 0}, d{0, 0};
      st[r] = g->comm(r).all_to_all_v(nullptr, sc.data(), d.data(), nullptr, rc.data(), d.data(), DType::kF32, nullptr);
    });
    EXPECT_EQ(st[0].code(), Code::kInvalidArgument);
    EXPECT_NE(st[0].message().find("rank 1 passed invalid arguments"), std::string::npos) << st[0].message();
    EXPECT_NE(st[1].message().find("counts and displacements >= 0"), std::string::npos) << st[1].message();
  }
  auto g = InProcessGroup::create(2, /*timeout_ms=*/100);
  std::vector<int64_t> c{0, 0}, d{0, 0};
  Status st = g->comm(0).all_to_all_v(nullptr, c.data(), d.data(), nullptr, c.data(), d.data(), DType::kF32, nullptr);
  EXPECT_EQ(st.code(), Code::kDeviceError);
  EXPECT_NE(st.message().find("not every rank joined within 100 ms"), std::string::npos) << st.message();
}

// ---- ep_moe_forward ----------------------------------------------------------------------------

struct Problem {
  int64_t H = 16, F = 8, K = 2;
  int32_t E = 12;
  std::vector<int64_t> T;  // tokens per rank
  std::vector<float> x, w, w1, w2;
  std::vector<int32_t> ex;
  int64_t total() const { return std::accumulate(T.begin(), T.end(), int64_t{0}); }
};

Problem make_problem(std::vector<int64_t> T, bool skew, uint32_t seed = 7) {
  Problem pr;
  pr.T = std::move(T);
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const int64_t N = pr.total();
  pr.x.resize(N * pr.H);
  for (auto& v : pr.x) v = u(gen);
  pr.w1.resize(pr.E * 2 * pr.F * pr.H);
  for (auto& v : pr.w1) v = 0.25f * u(gen);
  pr.w2.resize(pr.E * pr.H * pr.F);
  for (auto& v : pr.w2) v = 0.25f * u(gen);
  for (int64_t t = 0; t < N; ++t) {
    std::vector<int32_t> es(pr.E);
    std::iota(es.begin(), es.end(), 0);
    std::shuffle(es.begin(), es.end(), gen);
    if (skew) es = {0, 1};  // everything to rank 0's experts
    for (int64_t k = 0; k < pr.K; ++k) pr.ex.push_back(es[k]), pr.w.push_back(0.5f + 0.25f * u(gen));
  }
  return pr;
}

// The single-process pipeline (routing_plan, expert_mlp_forward, combine_forward) on rows [t0, t0+T).
std::vector<float> single(const Problem& pr, int64_t t0, int64_t T, int64_t capacity) {
  RoutingPlanParams rp;
  rp.num_experts = pr.E;
  rp.capacity = capacity;
  const int64_t R = routing_plan_max_rows(rp, T, pr.K);
  std::vector<int32_t> counts(pr.E), row_of(std::max<int64_t>(T * pr.K, 1)), tor(std::max<int64_t>(R, 1));
  std::vector<int64_t> off(pr.E + 1);
  std::vector<unsigned char> ws(std::max<int64_t>(routing_plan_workspace_bytes(rp, T, pr.K), 1));
  auto ex = make_view(const_cast<int32_t*>(pr.ex.data() + t0 * pr.K), {T, pr.K});
  auto w = make_view(const_cast<float*>(pr.w.data() + t0 * pr.K), {T, pr.K});
  Exec exec;
  EXPECT_TRUE(routing_plan(exec, rp, ex, w, make_view(counts.data(), {pr.E}), make_view(off.data(), {pr.E + 1}),
                           make_view(row_of.data(), {T, pr.K}), make_view(tor.data(), {R}),
                           make_view(ws.data(), {static_cast<int64_t>(ws.size())}))
                  .ok());
  std::vector<float> pre(std::max<int64_t>(R, 1) * 2 * pr.F), act(std::max<int64_t>(R, 1) * pr.F),
      ys(std::max<int64_t>(R, 1) * pr.H), y(std::max<int64_t>(T, 1) * pr.H);
  auto x = make_view(const_cast<float*>(pr.x.data() + t0 * pr.H), {T, pr.H});
  ExpertMlpParams mp;
  EXPECT_TRUE(expert_mlp_forward(exec, mp, x, make_view(tor.data(), {R}), make_view(off.data(), {pr.E + 1}),
                                 make_view(const_cast<float*>(pr.w1.data()), {pr.E, 2 * pr.F, pr.H}),
                                 make_view(const_cast<float*>(pr.w2.data()), {pr.E, pr.H, pr.F}),
                                 make_view(pre.data(), {R, 2 * pr.F}), make_view(act.data(), {R, pr.F}),
                                 make_view(ys.data(), {R, pr.H}))
                  .ok());
  EXPECT_TRUE(combine_forward(exec, make_view(ys.data(), {R, pr.H}), w, make_view(row_of.data(), {T, pr.K}),
                              make_view(y.data(), {T, pr.H}))
                  .ok());
  y.resize(T * pr.H);
  return y;
}

void check_ep(const Problem& pr, int64_t capacity) {
  const int P = static_cast<int>(pr.T.size());
  auto g = InProcessGroup::create(P);
  std::vector<std::vector<float>> ys(P);
  std::vector<EpLayout> layouts(P);
  std::vector<Status> st(P);
  run_ranks(P, [&](int r) {
    const int64_t t0 = std::accumulate(pr.T.begin(), pr.T.begin() + r, int64_t{0}), T = pr.T[r];
    const int64_t El = pr.E / P;
    ys[r].assign(std::max<int64_t>(T, 1) * pr.H, -7.f);
    EpMoeParams p;
    p.num_experts = pr.E;
    p.capacity = capacity;
    Exec exec;
    exec.num_threads = 1;
    st[r] = ep_moe_forward(g->comm(r), exec, p, make_view(const_cast<float*>(pr.x.data() + t0 * pr.H), {T, pr.H}),
                           make_view(const_cast<int32_t*>(pr.ex.data() + t0 * pr.K), {T, pr.K}),
                           make_view(const_cast<float*>(pr.w.data() + t0 * pr.K), {T, pr.K}),
                           make_view(const_cast<float*>(pr.w1.data() + r * El * 2 * pr.F * pr.H), {El, 2 * pr.F, pr.H}),
                           make_view(const_cast<float*>(pr.w2.data() + r * El * pr.H * pr.F), {El, pr.H, pr.F}),
                           make_view(ys[r].data(), {T, pr.H}), &layouts[r]);
    ys[r].resize(T * pr.H);
  });
  const int64_t El = pr.E / P;
  int64_t t0 = 0;
  for (int r = 0; r < P; ++r) {
    ASSERT_TRUE(st[r].ok()) << st[r].message();
    // Dropless: parity with the single-process layer on the concatenated batch; with a per-rank
    // capacity: with the single-process layer on this rank's batch.
    const std::vector<float> ref = capacity < 0 ? single(pr, 0, pr.total(), -1) : single(pr, t0, pr.T[r], capacity);
    const int64_t off = capacity < 0 ? t0 * pr.H : 0;
    ASSERT_EQ(0, std::memcmp(ys[r].data(), ref.data() + off, ys[r].size() * sizeof(float)))
        << "P=" << P << " rank " << r;
    if (capacity < 0) {  // layout: counts received from each source for each local expert
      for (int p = 0; p < P; ++p) {
        const int64_t s0 = std::accumulate(pr.T.begin(), pr.T.begin() + p, int64_t{0});
        for (int64_t e = 0; e < El; ++e) {
          int64_t n = 0;
          for (int64_t i = s0 * pr.K; i < (s0 + pr.T[p]) * pr.K; ++i) n += pr.ex[i] == r * El + e;
          EXPECT_EQ(layouts[r].recv_counts[p * El + e], n);
        }
      }
    }
    t0 += pr.T[r];
  }
}

TEST(EpMoeForward, BitwiseEqualToSingleRankOnConcatenatedBatch) {
  check_ep(make_problem({9}, false), -1);
  check_ep(make_problem({5, 3}, false), -1);
  check_ep(make_problem({5, 3, 0}, false), -1);  // an empty rank
  check_ep(make_problem({4, 0, 6, 2}, false), -1);
}

TEST(EpMoeForward, AllTokensToOneRankAndPerRankCapacity) {
  check_ep(make_problem({5, 3, 4}, true), -1);
  check_ep(make_problem({6, 6}, false), 1);  // capacity 1 per expert per rank: drops on each rank
}

TEST(EpMoeForward, BadArgumentsNameThem) {
  auto g = InProcessGroup::create(1);
  std::vector<float> x(16), y(16), w(2), w1(1), w2(1);
  std::vector<int32_t> e(2);
  EpMoeParams p;
  p.num_experts = 0;
  Status st = ep_moe_forward(g->comm(0), Exec{}, p, make_view(x.data(), {1, 16}), make_view(e.data(), {1, 2}),
                             make_view(w.data(), {1, 2}), make_view(w1.data(), {1, 1, 1}),
                             make_view(w2.data(), {1, 1, 1}), make_view(y.data(), {1, 16}));
  EXPECT_EQ(st.code(), Code::kInvalidArgument);
  EXPECT_NE(st.message().find("argument 'num_experts'"), std::string::npos) << st.message();
  p.num_experts = 4;
  st = ep_moe_forward(g->comm(0), Exec{}, p, make_view(x.data(), {1, 16}), make_view(e.data(), {1, 2}),
                      make_view(w.data(), {1, 2}), make_view(w1.data(), {1, 1, 1}), make_view(w2.data(), {1, 1, 1}),
                      make_view(y.data(), {1, 16}));
  EXPECT_NE(st.message().find("argument 'w1'"), std::string::npos) << st.message();
}

}  // namespace

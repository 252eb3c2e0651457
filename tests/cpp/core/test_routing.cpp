// Tests of routing_plan (include/smoe/ops/routing.h) against a naive reference written below:
// every integer output compared exactly, on the shapes that hurt, under both drop policies, with
// padding; bad inputs; determinism across runs and thread counts.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu/parallel.h"
#include "testing.h"

namespace smoe {
namespace {

// ---- naive reference --------------------------------------------------------------------------

struct Plan {
  std::vector<int32_t> counts;        // [E]
  std::vector<int64_t> offsets;       // [E+1]
  std::vector<int32_t> row_of;        // [T, K]
  std::vector<int32_t> token_of_row;  // [R_size]
};

// Plainly: list each expert's assignments in (t, k) order, decide which are kept, number the kept
// ones from the expert's padded offset.
Plan reference_plan(const std::vector<int32_t>& experts, const std::vector<float>& weights, int64_t T, int64_t K,
                    const RoutingPlanParams& p, int64_t R_size) {
  const int64_t E = p.num_experts;
  Plan plan;
  plan.counts.assign(E, 0);
  plan.offsets.assign(E + 1, 0);
  plan.row_of.assign(T * K, -1);
  plan.token_of_row.assign(R_size, -1);
  std::vector<std::vector<int64_t>> kept(E);
  for (int64_t e = 0; e < E; ++e) {
    std::vector<int64_t> mine;
    for (int64_t a = 0; a < T * K; ++a) {
      if (experts[a] == e) mine.push_back(a);
    }
    if (p.capacity < 0 || int64_t(mine.size()) <= p.capacity) {
      kept[e] = mine;
    } else if (p.drop_policy == DropPolicy::kByTokenOrder) {
      kept[e].assign(mine.begin(), mine.begin() + p.capacity);
    } else {
      std::vector<int64_t> ranked = mine;
      std::stable_sort(ranked.begin(), ranked.end(), [&](int64_t x, int64_t y) { return weights[x] > weights[y]; });
      ranked.resize(p.capacity);
      std::sort(ranked.begin(), ranked.end());
      kept[e] = ranked;
    }
    plan.counts[e] = int32_t(kept[e].size());
    const int64_t padded = (int64_t(kept[e].size()) + p.pad_multiple - 1) / p.pad_multiple * p.pad_multiple;
    plan.offsets[e + 1] = plan.offsets[e] + padded;
  }
  for (int64_t e = 0; e < E; ++e) {
    for (size_t i = 0; i < kept[e].size(); ++i) {
      const int64_t row = plan.offsets[e] + int64_t(i);
      plan.row_of[kept[e][i]] = int32_t(row);
      plan.token_of_row[row] = int32_t(kept[e][i] / K);
    }
  }
  return plan;
}

// ---- routings -----------------------------------------------------------------------------------

enum class Routing { kUniform, kSkewed, kOneExpert, kEvenExpertsOnly };

// experts [T, K]: K distinct experts per token (as top-k gives), drawn as `kind` says.
std::vector<int32_t> make_experts(int64_t T, int64_t K, int64_t E, Routing kind, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<int32_t> ex(T * K);
  std::vector<double> prob(E, 1.0);
  if (kind == Routing::kSkewed) {
    for (int64_t e = 0; e < E; ++e) prob[e] = 1.0 / double((e + 1) * (e + 1));
  }
  if (kind == Routing::kEvenExpertsOnly && K <= (E + 1) / 2) {
    for (int64_t e = 1; e < E; e += 2) prob[e] = 0.0;
  }
  for (int64_t t = 0; t < T; ++t) {
    if (kind == Routing::kOneExpert) {  // every token on expert E-1 (then E-2, ... for k > 0)
      for (int64_t k = 0; k < K; ++k) ex[t * K + k] = int32_t(E - 1 - k);
      continue;
    }
    for (int64_t k = 0; k < K; ++k) {
      std::vector<double> p = prob;
      for (int64_t j = 0; j < k; ++j) p[ex[t * K + j]] = 0.0;
      if (std::all_of(p.begin(), p.end(), [](double v) { return v == 0.0; })) {  // K > support: any unpicked
        p.assign(E, 1.0);
        for (int64_t j = 0; j < k; ++j) p[ex[t * K + j]] = 0.0;
      }
      std::discrete_distribution<int> d(p.begin(), p.end());
      ex[t * K + k] = d(g);
    }
  }
  return ex;
}

// Weights with many exact ties (multiples of 1/4), so that the tie-break of kByScore is exercised.
std::vector<float> make_tied_weights(int64_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_int_distribution<int> d(0, 4);
  std::vector<float> w(n);
  for (auto& v : w) v = float(d(g)) * 0.25f;
  return w;
}

// ---- running the op -----------------------------------------------------------------------------

struct PlanRun {
  Status status;
  Plan plan;
};

// Calls routing_plan with outputs prefilled with garbage, so that every unwritten element shows.
PlanRun run_plan(const std::vector<int32_t>& experts, const std::vector<float>& weights, int64_t T, int64_t K,
                 const RoutingPlanParams& p, Exec exec = {}) {
  const int64_t R_max = routing_plan_max_rows(p, T, K);
  PlanRun run;
  run.plan.counts.assign(std::max<int64_t>(p.num_experts, 0), 77);
  run.plan.offsets.assign(std::max<int64_t>(p.num_experts + 1, 0), 77);
  run.plan.row_of.assign(T * K, 77);
  run.plan.token_of_row.assign(R_max, 77);
  std::vector<uint8_t> ws(std::max<int64_t>(routing_plan_workspace_bytes(p, T, K), 1), 0xAB);
  auto& pl = run.plan;
  TensorView wv = weights.empty() && T * K > 0 ? TensorView{} : make_view(const_cast<float*>(weights.data()), {T, K});
  run.status = routing_plan(exec, p, make_view(const_cast<int32_t*>(experts.data()), {T, K}), wv,
                            make_view(pl.counts.data(), {p.num_experts}),
                            make_view(pl.offsets.data(), {p.num_experts + 1}), make_view(pl.row_of.data(), {T, K}),
                            make_view(pl.token_of_row.data(), {R_max}), make_view(ws.data(), {int64_t(ws.size())}));
  return run;
}

void expect_plan_eq(const Plan& got, const Plan& want, const std::string& what) {
  EXPECT_EQ(got.counts, want.counts) << what;
  EXPECT_EQ(got.offsets, want.offsets) << what;
  EXPECT_EQ(got.row_of, want.row_of) << what;
  EXPECT_EQ(got.token_of_row, want.token_of_row) << what;
}

// Runs fn with every parallel_for on the calling thread: a parallel_for nested in a pool task runs
// inline (csrc/cpu/parallel.h), which is exactly the 1-thread path. Used instead of
// cpu::set_num_threads(1) because resizing the pool after it has run a job can hand a new worker the
// finished job (csrc/cpu/parallel.cpp: a new worker starts with seen = 0 != generation_).
template <class F>
void run_on_one_thread(F&& fn) {
  cpu::parallel_for(2, 1, [&](int64_t begin, int64_t) {
    if (begin == 0) fn();
  });
}

// ---- tests --------------------------------------------------------------------------------------

TEST(RoutingPlan, MatchesReferenceOnShapesThatHurt) {
  struct EK {
    int64_t E, K;
  };
  const EK eks[] = {{1, 1}, {7, 1}, {7, 3}, {7, 7}, {300, 8}};
  const Routing kinds[] = {Routing::kUniform, Routing::kSkewed, Routing::kOneExpert, Routing::kEvenExpertsOnly};
  uint32_t seed = 1;
  int cases = 0;
  for (int64_t T : {0, 1, 7, 4097}) {
    for (const EK& ek : eks) {
      for (Routing kind : kinds) {
        if (T == 4097 && ek.E == 300 && kind != Routing::kSkewed) continue;  // keep the suite fast
        const auto experts = make_experts(T, ek.K, ek.E, kind, ++seed);
        const auto weights = make_tied_weights(T * ek.K, ++seed);
        const int64_t fair = (T * ek.K + ek.E - 1) / ek.E;  // capacity factor 1.0
        for (int64_t cap : {int64_t(-1), int64_t(0), fair, fair / 2 + 1, T * ek.K + 5}) {
          for (DropPolicy policy : {DropPolicy::kByTokenOrder, DropPolicy::kByScore}) {
            if (cap < 0 && policy == DropPolicy::kByScore) continue;  // identical to dropless
            for (int32_t pad : {1, 4}) {
              RoutingPlanParams p;
              p.num_experts = int32_t(ek.E);
              p.capacity = cap;
              p.drop_policy = policy;
              p.pad_multiple = pad;
              const std::string what = "T=" + std::to_string(T) + " E=" + std::to_string(ek.E) +
                                       " K=" + std::to_string(ek.K) + " kind=" + std::to_string(int(kind)) +
                                       " C=" + std::to_string(cap) + " policy=" + std::to_string(int(policy)) +
                                       " pad=" + std::to_string(pad);
              const PlanRun run = run_plan(experts, weights, T, ek.K, p);
              ASSERT_TRUE(run.status.ok()) << what << ": " << run.status.message();
              const Plan want = reference_plan(experts, weights, T, ek.K, p, routing_plan_max_rows(p, T, ek.K));
              expect_plan_eq(run.plan, want, what);
              EXPECT_LE(run.plan.offsets[ek.E], routing_plan_max_rows(p, T, ek.K)) << what;
              ++cases;
            }
          }
        }
      }
    }
  }
  EXPECT_GT(cases, 500);
}

TEST(RoutingPlan, EveryTokenOnOneExpertWithCapacityKeepsTheBestByScore) {
  // T = 7, K = 1, all on expert 2 of 3, C = 3: kByScore keeps the 3 highest weights, ties to the
  // lower token; kept rows stay in token order.
  const std::vector<int32_t> experts = {2, 2, 2, 2, 2, 2, 2};
  const std::vector<float> weights = {0.1f, 0.9f, 0.5f, 0.9f, 0.5f, 0.2f, 0.5f};
  RoutingPlanParams p;
  p.num_experts = 3;
  p.capacity = 3;
  p.drop_policy = DropPolicy::kByScore;
  p.pad_multiple = 2;
  const PlanRun run = run_plan(experts, weights, 7, 1, p);
  ASSERT_TRUE(run.status.ok()) << run.status.message();
  EXPECT_EQ(run.plan.counts, (std::vector<int32_t>{0, 0, 3}));
  EXPECT_EQ(run.plan.offsets, (std::vector<int64_t>{0, 0, 0, 4}));
  EXPECT_EQ(run.plan.row_of, (std::vector<int32_t>{-1, 0, 1, 2, -1, -1, -1}));
  // max rows = min(7, 3*3) + 3*(2-1) = 10
  EXPECT_EQ(run.plan.token_of_row, (std::vector<int32_t>{1, 2, 3, -1, -1, -1, -1, -1, -1, -1}));

  p.drop_policy = DropPolicy::kByTokenOrder;
  const PlanRun first = run_plan(experts, weights, 7, 1, p);
  ASSERT_TRUE(first.status.ok());
  EXPECT_EQ(first.plan.row_of, (std::vector<int32_t>{0, 1, 2, -1, -1, -1, -1}));
}

TEST(RoutingPlan, MaxRowsAndWorkspaceBounds) {
  RoutingPlanParams p;
  p.num_experts = 4;
  EXPECT_EQ(routing_plan_max_rows(p, 10, 2), 20);  // dropless: T*K
  p.pad_multiple = 8;
  EXPECT_EQ(routing_plan_max_rows(p, 10, 2), 20 + 4 * 7);  // + E*(pad-1)
  p.capacity = 3;
  EXPECT_EQ(routing_plan_max_rows(p, 10, 2), 12 + 28);  // min(T*K, E*C) + E*(pad-1)
  p.capacity = std::numeric_limits<int64_t>::max();     // E*C must not overflow
  EXPECT_EQ(routing_plan_max_rows(p, 10, 2), 20 + 28);
  p.capacity = 0;
  EXPECT_EQ(routing_plan_max_rows(p, 10, 2), 28);
  EXPECT_EQ(routing_plan_max_rows(p, 0, 2), 28);
  p.num_experts = 0;
  EXPECT_EQ(routing_plan_max_rows(p, 10, 2), 0);  // invalid params: routing_plan reports them
  p.num_experts = 4;
  p.capacity = 3;
  p.drop_policy = DropPolicy::kByTokenOrder;
  const int64_t by_order = routing_plan_workspace_bytes(p, 4096, 8);
  p.drop_policy = DropPolicy::kByScore;
  EXPECT_GE(routing_plan_workspace_bytes(p, 4096, 8), by_order + 2 * 4096 * 8 * 4);
  EXPECT_GT(by_order, 0);
}

TEST(RoutingPlan, DeterministicAcrossRunsAndThreadCounts) {
  const int64_t T = 3 * 4097, K = 6, E = 64;  // T*K spans several sort chunks
  const auto experts = make_experts(T, K, E, Routing::kSkewed, 11);
  const auto weights = make_tied_weights(T * K, 12);
  for (DropPolicy policy : {DropPolicy::kByTokenOrder, DropPolicy::kByScore}) {
    RoutingPlanParams p;
    p.num_experts = int32_t(E);
    p.capacity = T * K / E;
    p.drop_policy = policy;
    p.pad_multiple = 16;
    // a, b: on the pool (all hardware threads); c: on one thread.
    const PlanRun a = run_plan(experts, weights, T, K, p);
    const PlanRun b = run_plan(experts, weights, T, K, p);
    PlanRun c;
    run_on_one_thread([&] { c = run_plan(experts, weights, T, K, p); });
    ASSERT_TRUE(a.status.ok() && b.status.ok() && c.status.ok());
    for (const PlanRun* r : {&b, static_cast<const PlanRun*>(&c)}) {
      EXPECT_TRUE(testing::bitwise_equal(a.plan.row_of, r->plan.row_of));
      EXPECT_TRUE(testing::bitwise_equal(a.plan.token_of_row, r->plan.token_of_row));
      EXPECT_TRUE(testing::bitwise_equal(a.plan.counts, r->plan.counts));
      EXPECT_TRUE(testing::bitwise_equal(a.plan.offsets, r->plan.offsets));
    }
  }
}

// ---- bad inputs -----------------------------------------------------------------------------------

// A valid call that each case breaks in one place.
struct Args {
  int64_t T = 5, K = 2;
  RoutingPlanParams p;
  std::vector<int32_t> experts, counts, row_of, token_of_row;
  std::vector<float> weights;
  std::vector<int64_t> offsets;
  std::vector<uint8_t> ws;
  TensorView ex_v, w_v, counts_v, offsets_v, row_of_v, tor_v, ws_v;
  Exec exec;

  Args() {
    p.num_experts = 3;
    p.capacity = 2;
    p.drop_policy = DropPolicy::kByScore;
    experts = {0, 1, 1, 2, 2, 0, 0, 1, 2, 1};
    weights.assign(T * K, 0.5f);
    counts.assign(3, 0);
    offsets.assign(4, 0);
    row_of.assign(T * K, 0);
    token_of_row.assign(routing_plan_max_rows(p, T, K), 0);
    ws.assign(routing_plan_workspace_bytes(p, T, K), 0);
    ex_v = make_view(experts.data(), {T, K});
    w_v = make_view(weights.data(), {T, K});
    counts_v = make_view(counts.data(), {3});
    offsets_v = make_view(offsets.data(), {4});
    row_of_v = make_view(row_of.data(), {T, K});
    tor_v = make_view(token_of_row.data(), {int64_t(token_of_row.size())});
    ws_v = make_view(ws.data(), {int64_t(ws.size())});
  }
  Status call() const { return routing_plan(exec, p, ex_v, w_v, counts_v, offsets_v, row_of_v, tor_v, ws_v); }
};

void expect_invalid(const Args& a, const std::string& needle) {
  const Status s = a.call();
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << needle << ": " << s.message();
  EXPECT_NE(s.message().find(needle), std::string::npos) << "message: " << s.message() << "\nwanted: " << needle;
}

TEST(RoutingPlan, ValidArgsBaselineSucceeds) {
  Args a;
  const Status s = a.call();
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(a.counts, (std::vector<int32_t>{2, 2, 2}));
}

TEST(RoutingPlan, RejectsBadParams) {
  {
    Args a;
    a.p.num_experts = 0;
    expect_invalid(a, "argument 'params.num_experts'");
  }
  {
    Args a;
    a.p.pad_multiple = 0;
    expect_invalid(a, "argument 'params.pad_multiple'");
  }
  {
    Args a;
    a.p.drop_policy = static_cast<DropPolicy>(7);
    expect_invalid(a, "argument 'params.drop_policy'");
  }
}

TEST(RoutingPlan, RejectsBadExperts) {
  {
    Args a;
    a.ex_v = make_view(a.experts.data(), {10});
    expect_invalid(a, "argument 'experts': expected 2-D");
  }
  {
    Args a;
    a.ex_v.dtype = DType::kI64;
    expect_invalid(a, "argument 'experts': expected dtype i32");
  }
  {
    Args a;
    a.ex_v = make_view(a.experts.data(), {a.K, a.T});
    std::swap(a.ex_v.shape[0], a.ex_v.shape[1]);
    std::swap(a.ex_v.strides[0], a.ex_v.strides[1]);  // [T, K] viewed transposed: not contiguous
    expect_invalid(a, "argument 'experts': expected a contiguous tensor");
  }
  {
    Args a;
    a.experts[5] = 3;
    expect_invalid(a, "argument 'experts': expected expert ids in [0, 3)");
  }
  {
    Args a;
    a.experts[5] = 3;
    expect_invalid(a, "3 at (t, k) = (2, 1)");
  }
  {
    Args a;
    a.experts[8] = -1;
    a.experts[9] = 9;
    expect_invalid(a, "-1 at (t, k) = (4, 0)");
  }
  {
    Args a;
    a.ex_v.device = Device::kCUDA;
    expect_invalid(a, "argument 'weights': expected a tensor on cuda:0");
  }
}

TEST(RoutingPlan, RejectsBadWeights) {
  {
    Args a;
    a.w_v = TensorView{};
    expect_invalid(a, "argument 'weights': expected a [T, K] f32 tensor");
  }
  {
    Args a;
    a.w_v.dtype = DType::kF64;
    expect_invalid(a, "argument 'weights': expected dtype f32");
  }
  {
    Args a;
    a.w_v = make_view(a.weights.data(), {a.K, a.T});
    expect_invalid(a, "argument 'weights': expected size(0) == 5");
  }
  {
    Args a;
    a.weights[3] = std::numeric_limits<float>::quiet_NaN();
    expect_invalid(a, "argument 'weights': expected no NaN");
  }
  {  // not needed without a capacity, so absent is fine
    Args a;
    a.p.capacity = -1;
    a.w_v = TensorView{};
    a.token_of_row.assign(routing_plan_max_rows(a.p, a.T, a.K), 0);
    a.tor_v = make_view(a.token_of_row.data(), {int64_t(a.token_of_row.size())});
    a.ws.assign(routing_plan_workspace_bytes(a.p, a.T, a.K), 0);
    a.ws_v = make_view(a.ws.data(), {int64_t(a.ws.size())});
    EXPECT_TRUE(a.call().ok());
  }
}

TEST(RoutingPlan, RejectsBadOutputsAndWorkspace) {
  {
    Args a;
    a.counts_v.shape[0] = 2;
    expect_invalid(a, "argument 'counts': expected size(0) == 3");
  }
  {
    Args a;
    a.counts_v.dtype = DType::kI64;
    expect_invalid(a, "argument 'counts': expected dtype i32");
  }
  {
    Args a;
    a.offsets_v.shape[0] = 3;
    expect_invalid(a, "argument 'offsets': expected size(0) == 4");
  }
  {
    Args a;
    a.offsets_v.dtype = DType::kI32;
    expect_invalid(a, "argument 'offsets': expected dtype i64");
  }
  {
    Args a;
    a.row_of_v = make_view(a.row_of.data(), {a.T * a.K});
    expect_invalid(a, "argument 'row_of': expected 2-D");
  }
  {
    Args a;
    a.row_of_v = make_view(a.row_of.data(), {a.T, 1});
    expect_invalid(a, "argument 'row_of': expected size(1) == 2");
  }
  {
    Args a;
    a.tor_v.shape[0] -= 1;
    expect_invalid(a, "argument 'token_of_row': expected size(0) >= 6");
  }
  {
    Args a;
    a.ws_v.shape[0] -= 1;
    expect_invalid(a, "argument 'workspace': expected size(0) >= ");
  }
  {
    Args a;
    a.ws_v = TensorView{};
    expect_invalid(a, "argument 'workspace': expected 1-D");
  }
  {
    Args a;
    a.ws_v.dtype = DType::kI32;
    expect_invalid(a, "argument 'workspace': expected dtype u8");
  }
  {
    Args a;
    a.ws.push_back(0);
    a.ws_v = make_view(a.ws.data() + 1, {int64_t(a.ws.size()) - 1});
    expect_invalid(a, "argument 'workspace': expected data aligned");
  }
}

TEST(RoutingPlan, BackendsOtherThanCpu) {
  Args a;
  a.exec.backend = Backend::kCuda;  // CPU tensors
  expect_invalid(a, "argument 'backend'");
  // The emulated CUDA backend gives the CPU backend's plan exactly, for both drop policies.
  for (DropPolicy policy : {DropPolicy::kByScore, DropPolicy::kByTokenOrder}) {
    Args cpu_args, simt_args;
    cpu_args.p.drop_policy = simt_args.p.drop_policy = policy;
    simt_args.exec.backend = Backend::kSimt;
    ASSERT_TRUE(cpu_args.call().ok());
    const Status s = simt_args.call();
    ASSERT_TRUE(s.ok()) << s.message();
    EXPECT_EQ(simt_args.counts, cpu_args.counts);
    EXPECT_EQ(simt_args.offsets, cpu_args.offsets);
    EXPECT_EQ(simt_args.row_of, cpu_args.row_of);
    EXPECT_EQ(simt_args.token_of_row, cpu_args.token_of_row);
  }
}

}  // namespace
}  // namespace smoe

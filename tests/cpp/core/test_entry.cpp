// The entry order every public op follows (csrc/core/dispatch.h): validate, resolve the backend,
// return on empty work, dispatch. Swept over every op with empty inputs: a wrong backend fails the
// same way for every op (the backend error wins over "nothing to do"), and a right one succeeds.
// Also Exec::num_threads, which caps the CPU backend's threads.
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "cpu/parallel.h"
#include "smoe/smoe.h"
#include "testing.h"

namespace smoe {
namespace {

// One buffer behind every view: empty views need no memory, the non-empty ones here are tiny.
struct Buffers {
  alignas(64) double f[256] = {};
  alignas(64) int64_t i64[64] = {};
  alignas(64) int32_t i32[64] = {};
  TensorView f32(std::initializer_list<int64_t> s) { return make_view(static_cast<void*>(f), DType::kF32, s); }
  TensorView i32v(std::initializer_list<int64_t> s) { return make_view(static_cast<void*>(i32), DType::kI32, s); }
  TensorView i64v(std::initializer_list<int64_t> s) { return make_view(static_cast<void*>(i64), DType::kI64, s); }
};

struct EmptyCall {
  std::string op;
  std::function<Status(const Exec&)> call;
};

std::vector<EmptyCall> empty_calls(Buffers& b) {
  std::vector<EmptyCall> calls;
  const int64_t E = 4, K = 2, H = 8, F = 4;
  TopkGatingParams tp;
  tp.top_k = K;
  calls.push_back({"topk_gating_forward", [&b, tp](const Exec& x) {
                     return topk_gating_forward(x, tp, b.f32({0, E}), {}, b.f32({0, K}), b.i32v({0, K}), b.f32({0, E}));
                   }});
  calls.push_back(
      {"topk_gating_backward", [&b, tp](const Exec& x) {
         return topk_gating_backward(x, tp, b.f32({0, E}), b.i32v({0, K}), b.f32({0, K}), {}, b.f32({0, E}));
       }});
  // Expert choice: T >= C >= 1, so the empty case is E = 0.
  const ExpertChoiceParams ep{1, ScoreFunc::kSoftmax};
  calls.push_back({"expert_choice_forward", [&b, ep](const Exec& x) {
                     return expert_choice_forward(x, ep, b.f32({3, 0}), b.f32({3, 0}), b.i32v({0, 1}), b.i32v({3, 0}),
                                                  b.f32({3, 0}));
                   }});
  calls.push_back(
      {"expert_choice_backward", [&b, ep](const Exec& x) {
         return expert_choice_backward(x, ep, b.f32({3, 0}), b.i32v({3, 0}), b.f32({3, 0}), {}, b.f32({3, 0}));
       }});
  calls.push_back({"load_balancing_loss_backward", [&b](const Exec& x) {
                     return load_balancing_loss_backward(x, b.f32({0, E}), b.i32v({0, K}), b.f32({}), b.f32({0, E}));
                   }});
  calls.push_back({"z_loss_backward", [&b](const Exec& x) {
                     return z_loss_backward(x, b.f32({0, E}), b.f32({}), b.f32({0, E}));
                   }});
  calls.push_back({"balancing_bias_update",
                   [&b](const Exec& x) { return balancing_bias_update(x, b.i32v({0}), b.f32({0}), 0.1f); }});
  calls.push_back({"permute_forward", [&b](const Exec& x) {
                     return permute_forward(x, b.f32({2, H}), b.i32v({0}), b.f32({0, H}));
                   }});
  calls.push_back({"permute_backward", [&b](const Exec& x) {
                     return permute_backward(x, b.f32({3, H}), b.i32v({0, K}), b.f32({0, H}));
                   }});
  calls.push_back({"combine_forward", [&b](const Exec& x) {
                     return combine_forward(x, b.f32({3, H}), b.f32({0, K}), b.i32v({0, K}), b.f32({0, H}));
                   }});
  calls.push_back({"combine_backward", [&b](const Exec& x) {
                     return combine_backward(x, b.f32({0, H}), b.f32({3, H}), b.f32({0, K}), b.i32v({0, K}),
                                             TensorView{}, b.f32({0, K}));
                   }});
  const GroupedGemmParams gp;
  calls.push_back({"grouped_gemm", [&b, gp](const Exec& x) {
                     return grouped_gemm(x, gp, b.f32({0, H}), b.f32({2, F, H}), b.i64v({3}), b.f32({0, F}));
                   }});
  calls.push_back({"grouped_gemm_wgrad", [&b](const Exec& x) {
                     return grouped_gemm_wgrad(x, b.f32({0, H}), b.f32({0, F}), b.i64v({1}), b.f32({0, H, F}));
                   }});
  calls.push_back({"activation_forward", [&b](const Exec& x) {
                     return activation_forward(x, Activation::kGELU, b.f32({0, F}), b.f32({0, F}));
                   }});
  calls.push_back({"activation_backward", [&b](const Exec& x) {
                     return activation_backward(x, Activation::kGELU, b.f32({0, F}), b.f32({0, F}), b.f32({0, F}));
                   }});
  ExpertMlpParams mp;
  mp.activation = Activation::kReLU;
  calls.push_back({"expert_mlp_forward", [&b, mp](const Exec& x) {
                     return expert_mlp_forward(x, mp, b.f32({2, H}), b.i32v({0}), b.i64v({2}), b.f32({1, F, H}),
                                               b.f32({1, H, F}), b.f32({0, F}), b.f32({0, F}), b.f32({0, H}));
                   }});
  calls.push_back({"shared_expert_forward", [&b, mp](const Exec& x) {
                     return shared_expert_forward(x, mp, b.f32({0, H}), b.f32({F, H}), b.f32({H, F}), {}, b.f32({0, F}),
                                                  b.f32({0, F}), b.f32({0, H}), {}, b.f32({0, H}));
                   }});
  return calls;
}

bool names(const Status& s, const std::string& what) { return s.message().find(what) != std::string::npos; }

TEST(EntryOrder, EmptyCallsSucceedOnTheCpuAndSimtBackends) {
  Buffers b;
  for (const EmptyCall& c : empty_calls(b)) {
    for (Backend be : {Backend::kAuto, Backend::kCpu, Backend::kSimt}) {
      Exec x;
      x.backend = be;
      const Status s = c.call(x);
      EXPECT_TRUE(s.ok()) << c.op << " backend " << int(be) << ": " << s.message();
    }
  }
}

TEST(EntryOrder, WrongBackendFailsEveryOpEvenWithNoWork) {
  Buffers b;
  for (const EmptyCall& c : empty_calls(b)) {
    Exec cuda;
    cuda.backend = Backend::kCuda;  // CPU tensors
    const Status s = c.call(cuda);
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << c.op << ": " << s.message();
    EXPECT_TRUE(names(s, c.op + ": argument 'backend'")) << s.message();

    Exec bogus;
    bogus.backend = static_cast<Backend>(9);
    const Status t = c.call(bogus);
    EXPECT_EQ(t.code(), Code::kInvalidArgument) << c.op << ": " << t.message();
    EXPECT_TRUE(names(t, "argument 'backend'") && names(t, "got 9")) << t.message();

    Exec threads;
    threads.num_threads = -1;
    const Status u = c.call(threads);
    EXPECT_EQ(u.code(), Code::kInvalidArgument) << c.op << ": " << u.message();
    EXPECT_TRUE(names(u, "argument 'exec.num_threads'")) << u.message();
  }
}

// Validation comes before the backend: a bad argument is reported as such with any backend.
TEST(EntryOrder, ValidationComesFirst) {
  Buffers b;
  Exec cuda;
  cuda.backend = Backend::kCuda;
  TopkGatingParams tp;
  tp.top_k = 2;
  const Status s = topk_gating_forward(cuda, tp, b.f32({0, 4}), {}, b.f32({0, 3}), b.i32v({0, 2}), b.f32({0, 4}));
  EXPECT_TRUE(names(s, "argument 'weights'")) << s.message();
}

// ---- Exec::num_threads ---------------------------------------------------------------------------

TEST(ExecNumThreads, CapsTheThreadsOfACpuCall) {
  const int pool = cpu::num_threads();
  {
    const cpu::ThreadLimit one(1);
    EXPECT_EQ(cpu::usable_threads(), 1);
    {
      const cpu::ThreadLimit more(pool + 5);  // a nested limit never raises the cap
      EXPECT_EQ(cpu::usable_threads(), 1);
    }
  }
  EXPECT_EQ(cpu::usable_threads(), pool);
  {
    const cpu::ThreadLimit none(0);
    EXPECT_EQ(cpu::usable_threads(), pool);
  }
}

// An op run with num_threads = 1 splits its work into one chunk (every parallel_for runs inline on
// the caller) and gives the bits of the default run.
TEST(ExecNumThreads, OneThreadGivesTheSameBits) {
  const int64_t T = 600, E = 64, K = 4;
  std::vector<float> logits = testing::uniform<float>(size_t(T * E), 7, -3.f, 3.f);
  TopkGatingParams p;
  p.top_k = K;
  auto run = [&](int threads, std::vector<float>& w, std::vector<int32_t>& ex, std::vector<float>& s) {
    w.assign(size_t(T * K), 0.f), ex.assign(size_t(T * K), 0), s.assign(size_t(T * E), 0.f);
    Exec x;
    x.num_threads = threads;
    return topk_gating_forward(x, p, make_view(logits.data(), {T, E}), {}, make_view(w.data(), {T, K}),
                               make_view(ex.data(), {T, K}), make_view(s.data(), {T, E}));
  };
  std::vector<float> w0, s0, w1, s1;
  std::vector<int32_t> e0, e1;
  ASSERT_TRUE(run(0, w0, e0, s0).ok());
  ASSERT_TRUE(run(1, w1, e1, s1).ok());
  EXPECT_TRUE(testing::bitwise_equal(w0, w1));
  EXPECT_TRUE(testing::bitwise_equal(s0, s1));
  EXPECT_EQ(e0, e1);
  // The cap is visible inside the call: a parallel_for under a limit of 1 is one chunk on the caller.
  const cpu::ThreadLimit one(1);
  int chunks = 0;
  cpu::parallel_for(1000, 1, [&](int64_t, int64_t) { ++chunks; });
  EXPECT_EQ(chunks, 1);
}

}  // namespace
}  // namespace smoe

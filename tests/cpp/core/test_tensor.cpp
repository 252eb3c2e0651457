// Tests of the argument checks every op relies on.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>

#include "testing.h"

namespace smoe {
namespace {

TEST(TensorView, AbsentByDefault) {
  TensorView v;
  EXPECT_FALSE(v.defined());
  EXPECT_EQ(v.numel(), 0);
  Status s = expect_defined("op", "x", v);
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_EQ(s.message(), "op: argument 'x': expected a tensor, got absent");
}

TEST(TensorView, DimsMessageNamesLayout) {
  float buf[6];
  TensorView v = make_view(buf, {2, 3});
  EXPECT_TRUE(expect_dims("topk_gating", "logits", v, 2, "[T, E]").ok());
  Status s = expect_dims("topk_gating", "logits", v, 3, "[T, E, X]");
  EXPECT_EQ(s.message(), "topk_gating: argument 'logits': expected 3-D tensor [T, E, X], got 2-D f32 [2, 3]");
}

TEST(TensorView, RowContiguous) {
  float buf[12];
  TensorView v = make_view(buf, {2, 3});
  EXPECT_TRUE(v.is_contiguous());
  v.strides[0] = 5;  // padded rows
  EXPECT_FALSE(v.is_contiguous());
  EXPECT_TRUE(v.is_row_contiguous());
  v.strides[1] = 2;
  EXPECT_FALSE(v.is_row_contiguous());
  EXPECT_EQ(expect_row_contiguous("op", "x", v).code(), Code::kInvalidArgument);
}

// Issue 9: a shape whose product overflows int64 saturates, and expect_dims rejects it before the
// null-pointer check could be fooled by a wrapped product of 0.
TEST(TensorView, NumelOverflowSaturatesAndIsRejected) {
  TensorView v = make_view(static_cast<float*>(nullptr), {int64_t{1} << 62, 4});
  EXPECT_EQ(v.numel(), kSizeOverflow);
  Status s = expect_dims("permute_forward", "x", v, 2, "[T, H]");
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "permute_forward: argument 'x': expected sizes whose product fits in int64, got [4611686018427387904, 4]");
  EXPECT_EQ(sat_mul(int64_t{1} << 40, int64_t{1} << 40), kSizeOverflow);
  EXPECT_EQ(sat_add(kSizeOverflow, 1), kSizeOverflow);
  EXPECT_EQ(sat_mul(0, kSizeOverflow), 0);
}

// Issue 9: one rule for empty tensors: any zero size makes a tensor empty, and empty is dense.
TEST(TensorView, EmptyIsDenseWhateverTheStrides) {
  TensorView v = make_view(static_cast<float*>(nullptr), {0, 8});
  v.strides[0] = 0;
  v.strides[1] = 0;  // autograd's empty gradient
  EXPECT_TRUE(v.is_empty());
  EXPECT_TRUE(v.is_contiguous());
  EXPECT_TRUE(v.is_row_contiguous());
  TensorView w = make_view(static_cast<float*>(nullptr), {3, 0, 5});
  w.strides[0] = 7;
  w.strides[2] = 3;
  EXPECT_TRUE(w.is_contiguous());
  EXPECT_TRUE(expect_dims("op", "w", w, 3, "[E, N, Kd]").ok());
  TensorView x = make_view(static_cast<float*>(nullptr), {3, 5});
  x.strides[0] = 1;
  EXPECT_FALSE(x.is_empty());
  EXPECT_FALSE(x.is_contiguous());
}

// Issue 9: the size queries never wrap around.
TEST(SizeQueries, SaturateInsteadOfOverflowing) {
  ExpertMlpParams mp;
  const int64_t big = int64_t{1} << 40;
  EXPECT_EQ(expert_mlp_workspace_bytes(mp, DType::kF32, big, big, big), kSizeOverflow);
  EXPECT_EQ(shared_expert_workspace_bytes(mp, DType::kF32, big, big, big), kSizeOverflow);
  RoutingPlanParams rp;
  rp.num_experts = 8;
  EXPECT_EQ(routing_plan_max_rows(rp, int64_t{1} << 62, 4), kSizeOverflow);
  rp.capacity = 3;
  rp.drop_policy = DropPolicy::kByScore;
  EXPECT_EQ(routing_plan_workspace_bytes(rp, int64_t{1} << 62, 4), 0);  // routing_plan rejects that size
  EXPECT_EQ(routing_plan_max_rows(rp, 100, 2), 8 * 3);                  // min(T*K, E*C)
}

TEST(TensorView, ResolveBackend) {
  float buf[1];
  TensorView cpu = make_view(buf, {1});
  Backend b;
  ASSERT_TRUE(resolve_backend("op", Exec{}, cpu, &b).ok());
  EXPECT_EQ(b, Backend::kCpu);
  Exec e;
  e.backend = Backend::kCuda;
  EXPECT_EQ(resolve_backend("op", e, cpu, &b).code(), Code::kInvalidArgument);
}

TEST(DType, Bf16RoundTripAndRounding) {
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f)), 1.0f);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties to even (down to 1.0).
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
}

TEST(DType, F16RoundTripAllValues) {
  // Every finite f16 survives f16 -> f32 -> f16 unchanged.
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    if ((h & 0x7c00u) == 0x7c00u) continue;
    f16_t v{uint16_t(h)};
    EXPECT_EQ(float_to_f16(f16_to_float(v)).bits, v.bits) << h;
  }
  EXPECT_EQ(f16_to_float(float_to_f16(65504.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(f16_to_float(float_to_f16(70000.0f))));
}

}  // namespace
}  // namespace smoe

#include "cpu/parallel.h"

namespace smoe {
namespace {

// Resizing the pool after it has run jobs must not make new workers replay an old job.
TEST(ThreadPool, ResizeAfterUseAndChunkCoverage) {
  const int before = cpu::num_threads();
  for (int threads : {2, 1, 3, 2}) {
    cpu::set_num_threads(threads);
    EXPECT_EQ(cpu::num_threads(), threads);
    std::vector<int> hits(1000, 0);
    cpu::parallel_for(1000, 7, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i] += 1;
    });
    for (int h : hits) ASSERT_EQ(h, 1);
  }
  cpu::set_num_threads(before);
}

// Issue 9: a fork()ed child runs parallel work on a fresh pool (the parent's workers do not exist
// there), and exits without joining threads it does not own.
TEST(ThreadPool, ForkedChildGetsAFreshPool) {
  cpu::set_num_threads(3);
  std::vector<int> hits(1000, 0);
  cpu::parallel_for(1000, 7, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) hits[i] += 1;
  });
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    alarm(20);  // a hang fails the test instead of stalling it
    std::vector<int> child_hits(1000, 0);
    cpu::parallel_for(1000, 7, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) child_hits[i] += 1;
    });
    for (int h : child_hits)
      if (h != 1) _exit(3);
    std::exit(cpu::num_threads() == 3 ? 0 : 4);  // exit(): static destructors run
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "child ended by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

}  // namespace
}  // namespace smoe

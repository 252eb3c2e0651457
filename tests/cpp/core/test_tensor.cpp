// Tests of the argument checks every op relies on.
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

}  // namespace
}  // namespace smoe

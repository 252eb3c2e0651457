// permute / combine of the CUDA backend (csrc/cuda/permute.cu) through the SIMT emulator, against
// the CPU backend, for every float dtype, vector (H multiple of 8) and scalar (odd H) paths,
// dropped and padding rows, and row-strided x / grad_y.
#include "cpu/permute.h"
#include "cpu/routing.h"
#include "cuda_testing.h"
#include "kernel_version.h"

namespace smoe::testing {
namespace {

struct Plan {
  int64_t T, K, R;
  std::vector<int32_t> row_of, token_of_row;
};

// A CPU routing plan with drops (capacity) and padding, so that some rows are -1 / padding.
Plan make_plan(int64_t T, int64_t K, int32_t E, int64_t capacity, int32_t pad) {
  RoutingPlanParams p;
  p.num_experts = E;
  p.capacity = capacity;
  p.pad_multiple = pad;
  Plan plan{T, K, routing_plan_max_rows(p, T, K), {}, {}};
  std::vector<int32_t> ex(static_cast<size_t>(T * K)), cnt(static_cast<size_t>(E));
  for (int64_t i = 0; i < T * K; ++i) ex[size_t(i)] = int32_t((i * 5 + i / K) % E);
  std::vector<int64_t> off(size_t(E + 1));
  std::vector<uint8_t> ws(size_t(std::max<int64_t>(cpu::routing_plan_workspace_bytes(p, T, K), 1)));
  plan.row_of.resize(size_t(T * K));
  plan.token_of_row.resize(size_t(plan.R));
  EXPECT_TRUE(cpu::routing_plan(p, make_view(ex.data(), {T, K}), TensorView{}, make_view(cnt.data(), {int64_t(E)}),
                                make_view(off.data(), {int64_t(E) + 1}), make_view(plan.row_of.data(), {T, K}),
                                make_view(plan.token_of_row.data(), {plan.R}),
                                make_view(ws.data(), {int64_t(ws.size())}))
                  .ok());
  return plan;
}

template <class S>
// gys_shift: grad_ys starts this many elements into its buffer (a misaligned row start when the
// shift times the element size is not a multiple of 4).
void check(DType dt, int64_t T, int64_t K, int64_t H, int32_t E, int64_t capacity, int32_t pad, int64_t gys_shift = 0) {
  SCOPED_TRACE(std::string(dtype_name(dt)) + " T=" + std::to_string(T) + " K=" + std::to_string(K) +
               " H=" + std::to_string(H));
  const Plan plan = make_plan(T, K, E, capacity, pad);
  const int64_t R = plan.R, xs_stride = H + 8;  // row-strided x and grad_y (stride keeps 16-byte rows)
  std::vector<S> x = small_ints<S>(size_t(T * xs_stride), 1), ys = uniform<S>(size_t(R * H), 2),
                 gy = uniform<S>(size_t(T * xs_stride), 3), gxs = uniform<S>(size_t(R * H), 4);
  std::vector<float> w = uniform<float>(size_t(T * K), 5);
  TensorView xv = make_view(x.data(), dt, {T, H}), gyv = make_view(gy.data(), dt, {T, H});
  xv.strides[0] = gyv.strides[0] = xs_stride;
  const TensorView rov = make_view(const_cast<int32_t*>(plan.row_of.data()), {T, K});
  const TensorView torv = make_view(const_cast<int32_t*>(plan.token_of_row.data()), {R});
  const TensorView wv = make_view(w.data(), {T, K});

  std::vector<S> xs_cpu(size_t(R * H)), gx_cpu(size_t(T * H)), y_cpu(size_t(T * H)), gys_cpu(size_t(R * H));
  std::vector<float> gw_cpu(size_t(T * K));
  ASSERT_TRUE(cpu::permute_forward(xv, torv, make_view(xs_cpu.data(), dt, {R, H})).ok());
  ASSERT_TRUE(cpu::permute_backward(make_view(gxs.data(), dt, {R, H}), rov, make_view(gx_cpu.data(), dt, {T, H})).ok());
  ASSERT_TRUE(
      cpu::combine_forward(make_view(ys.data(), dt, {R, H}), wv, rov, make_view(y_cpu.data(), dt, {T, H})).ok());
  ASSERT_TRUE(cpu::combine_backward(gyv, make_view(ys.data(), dt, {R, H}), wv, rov,
                                    make_view(gys_cpu.data(), dt, {R, H}), make_view(gw_cpu.data(), {T, K}))
                  .ok());

  std::vector<S> xs(xs_cpu.size()), gx(gx_cpu.size()), y(y_cpu.size()), gys_buf(gys_cpu.size() + size_t(gys_shift));
  std::vector<float> gw(gw_cpu.size());
  S* gys_data = gys_buf.data() + gys_shift;
  run_all_schedules([&] {
    poison(xs), poison(gx), poison(y), poison(gys_buf), poison(gw);
    EXPECT_OK(sim::permute_forward(xv, torv, make_view(xs.data(), dt, {R, H}), nullptr));
    EXPECT_OK(sim::permute_backward(make_view(gxs.data(), dt, {R, H}), rov, make_view(gx.data(), dt, {T, H}), nullptr));
    EXPECT_OK(
        sim::combine_forward(make_view(ys.data(), dt, {R, H}), wv, rov, make_view(y.data(), dt, {T, H}), nullptr));
    EXPECT_OK(sim::combine_backward(gyv, make_view(ys.data(), dt, {R, H}), wv, rov, make_view(gys_data, dt, {R, H}),
                                    make_view(gw.data(), {T, K}), nullptr));
    std::vector<unsigned char> out;
    append_bytes(out, xs), append_bytes(out, gx), append_bytes(out, y), append_bytes(out, gys_buf),
        append_bytes(out, gw);
    return out;
  });
  const std::vector<S> gys(gys_data, gys_data + gys_cpu.size());
  EXPECT_TRUE(bitwise_equal(xs, xs_cpu)) << "permute_forward is a copy";
  EXPECT_TRUE(all_close(gx, gx_cpu, dt));
  EXPECT_TRUE(all_close(y, y_cpu, dt));
  EXPECT_TRUE(all_close(gys, gys_cpu, dt));
  EXPECT_TRUE(all_close(gw, gw_cpu, DType::kF32));
}

void check_all_shapes() {
  check<float>(DType::kF32, 0, 2, 8, 4, -1, 1);
  check<float>(DType::kF32, 1, 1, 1, 1, -1, 1);
  check<float>(DType::kF32, 7, 2, 3, 5, -1, 4);      // scalar path, padding rows
  check<float>(DType::kF32, 300, 4, 64, 7, 150, 8);  // vector path, drops and padding
  check<bf16_t>(DType::kBF16, 33, 2, 72, 6, 10, 1);  // bf16 x 8 per 16 bytes
  check<bf16_t>(DType::kBF16, 7, 3, 5, 3, -1, 1);    // bf16 scalar; 10-byte rows: combine_backward's scan
  check<f16_t>(DType::kF16, 19, 5, 40, 5, -1, 2);    // K = E
  // combine_backward's edge shapes: grad_ys rows that cannot hold the inverse map in place (under 4
  // bytes, or not 4-byte aligned) take the scanning kernel, which allocates nothing.
  check<bf16_t>(DType::kBF16, 9, 2, 1, 3, 4, 2);       // 2-byte rows, drops and padding
  check<f16_t>(DType::kF16, 6, 3, 1, 3, -1, 1);        // 2-byte rows
  check<bf16_t>(DType::kBF16, 11, 2, 2, 4, -1, 1, 1);  // 4-byte rows starting 2 bytes off alignment
  check<float>(DType::kF32, 5, 2, 4, 3, -1, 3, 1);     // f32 rows are 4-byte aligned: in place, shifted
}

TEST(SimtPermute, MatchesCpu) { check_all_shapes(); }

// The naive one-thread-per-row kernels (csrc/cuda/naive/permute_v0.cu) through the same cases.
TEST(SimtPermute, V0MatchesCpu) {
  KernelVersionScope permute(sim::KernelOp::kPermute, 0), combine(sim::KernelOp::kCombine, 0);
  check_all_shapes();
}

TEST(SimtPermute, F64CopyWorksAndReductionsAreUnsupported) {
  const int64_t T = 3, K = 1, H = 4;
  const Plan plan = make_plan(T, K, 2, -1, 1);
  std::vector<double> x = small_ints<double>(size_t(T * H), 3), xs(size_t(plan.R * H)), xs_cpu(xs.size());
  const TensorView torv = make_view(const_cast<int32_t*>(plan.token_of_row.data()), {plan.R});
  ASSERT_TRUE(cpu::permute_forward(make_view(x.data(), {T, H}), torv, make_view(xs_cpu.data(), {plan.R, H})).ok());
  EXPECT_OK(sim::permute_forward(make_view(x.data(), {T, H}), torv, make_view(xs.data(), {plan.R, H}), nullptr));
  EXPECT_TRUE(bitwise_equal(xs, xs_cpu));
  std::vector<double> gx(size_t(T * H));
  const Status st = sim::permute_backward(make_view(xs.data(), {plan.R, H}),
                                          make_view(const_cast<int32_t*>(plan.row_of.data()), {T, K}),
                                          make_view(gx.data(), {T, H}), nullptr);
  EXPECT_EQ(st.code(), Code::kUnsupported) << st.message();
}

}  // namespace
}  // namespace smoe::testing

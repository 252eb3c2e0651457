// Index arithmetic past 2^31 elements (the design promises 64-bit row * stride math, smoe/ops/routing.h):
// the row-strided inputs get a view whose row stride is 2^31 + 64 elements (8 GiB of address space in
// f32) over a mapping of which only the pages under the two rows are ever backed by memory. Each op's
// result must equal, bit for bit, the result on a dense copy of the same rows. A 32-bit `t * stride`
// would wrap to a wrong row (or fault on an unmapped page).
//
// TEACH: mmap with PROT_NONE reserves address space without committing memory (the kernel does not
// even count it against overcommit); mprotect then makes just the pages under each row usable. This
// is how a test gets a "huge" tensor for the price of a few pages, as FlashInfer's int64-stride tests
// do with as_strided views.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "smoe/smoe.h"
#include "testing.h"

namespace smoe {
namespace {

constexpr int64_t kHugeStride = (int64_t(1) << 31) + 64;  // elements

// `rows` rows of `cols` floats, row r at element r * kHugeStride of one reserved region.
class HugeStrideRows {
 public:
  HugeStrideRows(int64_t rows, int64_t cols) : rows_(rows), cols_(cols) {
    page_ = sysconf(_SC_PAGESIZE);
    bytes_ = size_t((rows - 1) * kHugeStride + cols) * sizeof(float) + size_t(page_);
    void* p = mmap(nullptr, bytes_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return;
    base_ = static_cast<float*>(p);
    for (int64_t r = 0; r < rows; ++r) {
      const uintptr_t lo = reinterpret_cast<uintptr_t>(row(r)) & ~uintptr_t(page_ - 1);
      const uintptr_t hi = reinterpret_cast<uintptr_t>(row(r) + cols);
      if (mprotect(reinterpret_cast<void*>(lo), hi - lo, PROT_READ | PROT_WRITE) != 0) {
        munmap(base_, bytes_);
        base_ = nullptr;
        return;
      }
    }
  }
  ~HugeStrideRows() {
    if (base_) munmap(base_, bytes_);
  }
  bool ok() const { return base_ != nullptr; }
  float* row(int64_t r) const { return base_ + r * kHugeStride; }
  void fill(const std::vector<float>& dense) const {
    for (int64_t r = 0; r < rows_; ++r) std::memcpy(row(r), dense.data() + r * cols_, size_t(cols_) * sizeof(float));
  }
  TensorView view() const {
    TensorView v = make_view(base_, {rows_, cols_});
    v.strides[0] = kHugeStride;
    return v;
  }

 private:
  int64_t rows_, cols_;
  long page_ = 4096;
  size_t bytes_ = 0;
  float* base_ = nullptr;
};

#define REQUIRE_MAPPING(m) \
  if (!(m).ok()) GTEST_SKIP() << "could not reserve the address space of an 8 GiB strided view"

TEST(LargeStrides, ViewIsLargeInAddressSpace) {
  HugeStrideRows m(2, 16);
  REQUIRE_MAPPING(m);
  const TensorView v = m.view();
  EXPECT_TRUE(v.is_row_contiguous());
  EXPECT_GT(v.stride(0) * int64_t(sizeof(float)), int64_t(1) << 32);  // past 4 GiB in bytes, 2^31 in elements
}

std::vector<Backend> backends() { return {Backend::kCpu, Backend::kSimt}; }

TEST(LargeStrides, PermuteForwardReadsTheRightRows) {
  const int64_t T = 2, H = 48, R = 5;
  const std::vector<float> dense = testing::uniform<float>(size_t(T * H), 11);
  HugeStrideRows m(T, H);
  REQUIRE_MAPPING(m);
  m.fill(dense);
  std::vector<int32_t> tor = {1, 0, -1, 1, 0};
  for (Backend b : backends()) {
    Exec x;
    x.backend = b;
    std::vector<float> want(size_t(R * H), -1.f), got(size_t(R * H), -2.f);
    ASSERT_TRUE(permute_forward(x, make_view(const_cast<float*>(dense.data()), {T, H}), make_view(tor.data(), {R}),
                                make_view(want.data(), {R, H}))
                    .ok());
    const Status s = permute_forward(x, m.view(), make_view(tor.data(), {R}), make_view(got.data(), {R, H}));
    ASSERT_TRUE(s.ok()) << s.message();
    EXPECT_TRUE(testing::bitwise_equal(got, want)) << "backend " << int(b);
  }
}

TEST(LargeStrides, CombineBackwardReadsTheRightGradientRows) {
  const int64_t T = 2, H = 40, K = 2, R = 4;
  const std::vector<float> gy = testing::uniform<float>(size_t(T * H), 12);
  std::vector<float> ys = testing::uniform<float>(size_t(R * H), 13), w = {0.5f, 0.25f, 1.f, -2.f};
  std::vector<int32_t> row_of = {2, 0, 1, 3};
  HugeStrideRows m(T, H);
  REQUIRE_MAPPING(m);
  m.fill(gy);
  for (Backend b : backends()) {
    Exec x;
    x.backend = b;
    std::vector<float> gys_want(size_t(R * H)), gw_want(size_t(T * K)), gys(size_t(R * H), 9.f), gw(size_t(T * K), 9.f);
    ASSERT_TRUE(combine_backward(x, make_view(const_cast<float*>(gy.data()), {T, H}), make_view(ys.data(), {R, H}),
                                 make_view(w.data(), {T, K}), make_view(row_of.data(), {T, K}),
                                 make_view(gys_want.data(), {R, H}), make_view(gw_want.data(), {T, K}))
                    .ok());
    const Status s =
        combine_backward(x, m.view(), make_view(ys.data(), {R, H}), make_view(w.data(), {T, K}),
                         make_view(row_of.data(), {T, K}), make_view(gys.data(), {R, H}), make_view(gw.data(), {T, K}));
    ASSERT_TRUE(s.ok()) << s.message();
    EXPECT_TRUE(testing::bitwise_equal(gys, gys_want)) << "backend " << int(b);
    EXPECT_TRUE(testing::bitwise_equal(gw, gw_want)) << "backend " << int(b);
  }
}

TEST(LargeStrides, GatingReadsTheRightLogitRows) {
  const int64_t T = 2, E = 16, K = 4;
  const std::vector<float> dense = testing::uniform<float>(size_t(T * E), 14, -3.f, 3.f);
  HugeStrideRows m(T, E);
  REQUIRE_MAPPING(m);
  m.fill(dense);
  TopkGatingParams p;
  p.top_k = K;
  for (Backend b : backends()) {
    Exec x;
    x.backend = b;
    auto run = [&](const TensorView& logits, std::vector<float>& w, std::vector<int32_t>& ex, std::vector<float>& s) {
      w.assign(size_t(T * K), 0.f), ex.assign(size_t(T * K), -1), s.assign(size_t(T * E), 0.f);
      return topk_gating_forward(x, p, logits, {}, make_view(w.data(), {T, K}), make_view(ex.data(), {T, K}),
                                 make_view(s.data(), {T, E}));
    };
    std::vector<float> w0, s0, w1, s1;
    std::vector<int32_t> e0, e1;
    ASSERT_TRUE(run(make_view(const_cast<float*>(dense.data()), {T, E}), w0, e0, s0).ok());
    const Status st = run(m.view(), w1, e1, s1);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_TRUE(testing::bitwise_equal(w1, w0)) << "backend " << int(b);
    EXPECT_TRUE(testing::bitwise_equal(s1, s0)) << "backend " << int(b);
    EXPECT_EQ(e1, e0) << "backend " << int(b);

    // Expert choice and the z-loss read the same strided logits.
    const ExpertChoiceParams ep{1, ScoreFunc::kSigmoid};
    auto choose = [&](const TensorView& logits, std::vector<float>& sc, std::vector<int32_t>& tk,
                      std::vector<int32_t>& ro, std::vector<float>& wt) {
      sc.assign(size_t(T * E), 0.f), tk.assign(size_t(E), -1), ro.assign(size_t(T * E), -2),
          wt.assign(size_t(T * E), 0.f);
      return expert_choice_forward(x, ep, logits, make_view(sc.data(), {T, E}), make_view(tk.data(), {E, 1}),
                                   make_view(ro.data(), {T, E}), make_view(wt.data(), {T, E}));
    };
    std::vector<float> sc0, wt0, sc1, wt1;
    std::vector<int32_t> tk0, ro0, tk1, ro1;
    ASSERT_TRUE(choose(make_view(const_cast<float*>(dense.data()), {T, E}), sc0, tk0, ro0, wt0).ok());
    ASSERT_TRUE(choose(m.view(), sc1, tk1, ro1, wt1).ok());
    EXPECT_TRUE(testing::bitwise_equal(sc1, sc0) && testing::bitwise_equal(wt1, wt0)) << "backend " << int(b);
    EXPECT_EQ(tk1, tk0);
    EXPECT_EQ(ro1, ro0);

    std::vector<double> ws(size_t(z_loss_workspace_bytes(T, E) / 8 + 1));
    const TensorView wv = make_view(static_cast<void*>(ws.data()), DType::kU8, {int64_t(ws.size() * 8)});
    float z0 = -1.f, z1 = -2.f;
    ASSERT_TRUE(z_loss_forward(x, make_view(const_cast<float*>(dense.data()), {T, E}), make_view(&z0, {}), wv).ok());
    ASSERT_TRUE(z_loss_forward(x, m.view(), make_view(&z1, {}), wv).ok());
    EXPECT_EQ(z1, z0) << "backend " << int(b);
  }
}

}  // namespace
}  // namespace smoe

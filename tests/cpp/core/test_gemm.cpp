// Tests of grouped_gemm, grouped_gemm_wgrad, the activations and smoe's own blocked GEMM, against
// naive references written plainly below (double accumulation of the stored values).
#include <bit>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/parallel.h"
#include "testing.h"

namespace smoe {
namespace {

using testing::all_close;
using testing::bitwise_equal;
using testing::small_ints;
using testing::uniform;

// ---- naive references ----------------------------------------------------------------------------

// c[r] = a[r] @ op(b[e]) for rows r of segment e; other rows keep their value.
template <class T>
void naive_grouped_gemm(bool trans_b, const std::vector<T>& a, const std::vector<T>& b,
                        const std::vector<int64_t>& offsets, int64_t Kd, int64_t N, std::vector<T>& c) {
  const int64_t E = int64_t(offsets.size()) - 1;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t k = 0; k < Kd; ++k) {
          const T bv = trans_b ? b[(e * N + n) * Kd + k] : b[(e * Kd + k) * N + n];
          s += double(to_acc(a[r * Kd + k])) * double(to_acc(bv));
        }
        c[r * N + n] = from_acc<T>(typename AccOf<T>::type(s));
      }
}

// c[e] = a[seg_e]^T @ b[seg_e]
template <class T>
std::vector<T> naive_wgrad(const std::vector<T>& a, const std::vector<T>& b, const std::vector<int64_t>& offsets,
                           int64_t M, int64_t N) {
  const int64_t E = int64_t(offsets.size()) - 1;
  std::vector<T> c(size_t(E * M * N));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r)
          s += double(to_acc(a[r * M + m])) * double(to_acc(b[r * N + n]));
        c[(e * M + m) * N + n] = from_acc<T>(typename AccOf<T>::type(s));
      }
  return c;
}

std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> o(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) o[e + 1] = o[e] + counts[e];
  return o;
}

// Counts for R rows over E experts: "even", "one" (all on expert E/2), "skewed" (geometric, with
// empty experts), "gaps" (every other expert empty).
std::vector<int64_t> make_counts(const std::string& kind, int64_t R, int64_t E) {
  std::vector<int64_t> c(static_cast<size_t>(E), 0);
  if (kind == "even") {
    for (int64_t e = 0; e < E; ++e) c[e] = R / E + (e < R % E ? 1 : 0);
  } else if (kind == "one") {
    c[size_t(E / 2)] = R;
  } else if (kind == "skewed") {
    int64_t left = R;
    for (int64_t e = 0; e < E && left > 0; e += 2) {
      const int64_t take = e + 2 >= E ? left : (left + 1) / 2;
      c[e] = take;
      left -= take;
    }
    if (left > 0) c[0] += left;
  } else {  // gaps
    const int64_t slots = (E + 1) / 2;
    for (int64_t e = 0; e < E; e += 2) c[e] = R / slots + (e / 2 < R % slots ? 1 : 0);
  }
  return c;
}

template <class T>
std::vector<T> nan_filled(size_t n) {
  return std::vector<T>(n, from_acc<T>(std::numeric_limits<typename AccOf<T>::type>::quiet_NaN()));
}

template <class T>
bool is_nan(T v) {
  return std::isnan(double(to_acc(v)));
}

// cpu::set_num_threads restarts the pool's workers, and a restarted worker re-runs the last job it
// remembers (Pool::resize keeps generation_ but the new worker starts from seen = 0). A one-chunk job
// just before the resize leaves nothing for it to re-run. Remove once csrc/cpu/parallel.cpp is fixed.
void set_threads(int n) {
  cpu::parallel_for_impl(1, 1, [](int64_t, int64_t) {});
  cpu::set_num_threads(n);
}

template <class T>
class GemmTyped : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, double, bf16_t, f16_t>;
TYPED_TEST_SUITE(GemmTyped, FloatTypes);

// ---- grouped_gemm ------------------------------------------------------------------------------

template <class T>
void check_grouped_gemm_against_naive() {
  const DType dt = DTypeOf<T>::value;
  struct Case {
    int64_t R, E, Kd, N;
    const char* counts;
  };
  const Case cases[] = {
      {0, 3, 5, 4, "even"},         {1, 1, 3, 5, "even"},       {7, 7, 9, 6, "even"},
      {7, 3, 4, 5, "one"},          {4097, 7, 8, 12, "skewed"}, {4097, 1, 5, 3, "even"},
      {600, 300, 3, 2, "gaps"},     {300, 300, 2, 3, "even"},   {65, 4, 0, 5, "even"},  // Kd = 0: c must be zeros
      {530, 3, 300, 150, "skewed"},  // several row tiles and a split of the columns
      {40, 2, 1100, 40, "even"},     // a reduction longer than one K block of the bf16 path
  };
  for (const Case& cs : cases) {
    for (bool trans_b : {true, false}) {
      SCOPED_TRACE("R=" + std::to_string(cs.R) + " E=" + std::to_string(cs.E) + " Kd=" + std::to_string(cs.Kd) +
                   " N=" + std::to_string(cs.N) + " " + cs.counts + " trans_b=" + std::to_string(trans_b));
      const auto counts = make_counts(cs.counts, cs.R, cs.E);
      auto offsets = offsets_of(counts);
      auto a = small_ints<T>(size_t(cs.R * cs.Kd), 1);
      auto b = small_ints<T>(size_t(cs.E * cs.N * cs.Kd), 2);
      auto c = nan_filled<T>(size_t(cs.R * cs.N));
      auto want = c;
      naive_grouped_gemm(trans_b, a, b, offsets, cs.Kd, cs.N, want);
      GroupedGemmParams p;
      p.trans_b = trans_b;
      const auto bv = trans_b ? make_view(b.data(), {cs.E, cs.N, cs.Kd}) : make_view(b.data(), {cs.E, cs.Kd, cs.N});
      Status s = grouped_gemm(Exec{}, p, make_view(a.data(), {cs.R, cs.Kd}), bv, make_view(offsets.data(), {cs.E + 1}),
                              make_view(c.data(), {cs.R, cs.N}));
      ASSERT_TRUE(s.ok()) << s.message();
      EXPECT_TRUE(all_close(c, want, dt));
    }
  }
}

TYPED_TEST(GemmTyped, GroupedGemmLeavesRowsPastSegmentsUntouched) {
  using T = TypeParam;
  // offsets[E] = 10 < R = 13 (dropped rows at the end); row stride of a and c padded.
  const int64_t R = 13, Kd = 6, N = 5, E = 3, lda = 8, ldc = 7;
  std::vector<int64_t> offsets = {0, 4, 4, 10};
  auto a = small_ints<T>(size_t(R * lda), 3);
  auto b = small_ints<T>(size_t(E * N * Kd), 4);
  auto c = nan_filled<T>(size_t(R * ldc));
  TensorView av = make_view(a.data(), {R, Kd});
  av.strides[0] = lda;
  TensorView cv = make_view(c.data(), {R, N});
  cv.strides[0] = ldc;
  ASSERT_TRUE(
      grouped_gemm(Exec{}, {}, av, make_view(b.data(), {E, N, Kd}), make_view(offsets.data(), {E + 1}), cv).ok());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t n = 0; n < ldc; ++n) {
      const bool written = r < 10 && n < N;
      if (!written) {
        EXPECT_TRUE(is_nan(c[r * ldc + n])) << r << "," << n;
        continue;
      }
      const int64_t e = r < 4 ? 0 : 2;
      double s = 0;
      for (int64_t k = 0; k < Kd; ++k) s += double(to_acc(a[r * lda + k])) * double(to_acc(b[(e * N + n) * Kd + k]));
      EXPECT_EQ(double(to_acc(c[r * ldc + n])), double(to_acc(from_acc<T>(typename AccOf<T>::type(s)))));
    }
}

// ---- grouped_gemm_wgrad ------------------------------------------------------------------------

template <class T>
void check_wgrad_against_naive() {
  const DType dt = DTypeOf<T>::value;
  struct Case {
    int64_t R, E, M, N;
    const char* counts;
  };
  const Case cases[] = {
      {0, 3, 4, 5, "even"},      {1, 1, 3, 2, "even"},     {7, 7, 5, 6, "gaps"},         {7, 4, 3, 3, "one"},
      {4097, 7, 5, 4, "skewed"}, {600, 300, 2, 3, "gaps"}, {900, 3, 300, 140, "skewed"},
  };
  for (const Case& cs : cases) {
    SCOPED_TRACE("R=" + std::to_string(cs.R) + " E=" + std::to_string(cs.E) + " " + cs.counts);
    const auto counts = make_counts(cs.counts, cs.R, cs.E);
    auto offsets = offsets_of(counts);
    auto a = small_ints<T>(size_t(cs.R * cs.M), 5);
    auto b = small_ints<T>(size_t(cs.R * cs.N), 6);
    auto c = nan_filled<T>(size_t(cs.E * cs.M * cs.N));  // NaN: stale memory must not survive
    Status s = grouped_gemm_wgrad(Exec{}, make_view(a.data(), {cs.R, cs.M}), make_view(b.data(), {cs.R, cs.N}),
                                  make_view(offsets.data(), {cs.E + 1}), make_view(c.data(), {cs.E, cs.M, cs.N}));
    ASSERT_TRUE(s.ok()) << s.message();
    EXPECT_TRUE(all_close(c, naive_wgrad(a, b, offsets, cs.M, cs.N), dt));
    for (int64_t e = 0; e < cs.E; ++e) {
      if (counts[e] != 0) continue;
      for (int64_t i = 0; i < cs.M * cs.N; ++i) {
        const T v = c[e * cs.M * cs.N + i];
        uint64_t bits = 0;
        std::memcpy(&bits, &v, sizeof(T));
        ASSERT_EQ(bits, 0u) << "expert " << e << " is empty: its gradient must be +0.0 exactly";
      }
    }
  }
}

TYPED_TEST(GemmTyped, GroupedGemmMatchesNaive) { check_grouped_gemm_against_naive<TypeParam>(); }
TYPED_TEST(GemmTyped, WgradMatchesNaiveAndZeroesEmptyExperts) { check_wgrad_against_naive<TypeParam>(); }

// bf16 has two kernels (AVX512-BF16 dot products where the CPU has them, else f32 panels + sgemm):
// the second must be right too, also on machines where the first is the default.
TEST(GemmBf16, F32PanelPathMatchesNaive) {
  const bool saved = cpu::set_bf16_dot_product(false);
  check_grouped_gemm_against_naive<bf16_t>();
  check_wgrad_against_naive<bf16_t>();
  cpu::set_bf16_dot_product(saved);
}

// ---- determinism ---------------------------------------------------------------------------------

TYPED_TEST(GemmTyped, BitwiseIdenticalAcrossRunsAndThreadCounts) {
  using T = TypeParam;
  const int64_t R = 700, E = 3, Kd = 300, N = 260;
  std::vector<int64_t> offsets = {0, 450, 450, 700};
  auto a = uniform<T>(size_t(R * Kd), 7);
  auto b = uniform<T>(size_t(E * N * Kd), 8);
  auto run = [&](int threads) {
    set_threads(threads);
    std::vector<T> c(size_t(R * N)), w(size_t(E * Kd * N));
    EXPECT_TRUE(grouped_gemm(Exec{}, {}, make_view(a.data(), {R, Kd}), make_view(b.data(), {E, N, Kd}),
                             make_view(offsets.data(), {E + 1}), make_view(c.data(), {R, N}))
                    .ok());
    EXPECT_TRUE(grouped_gemm_wgrad(Exec{}, make_view(a.data(), {R, Kd}), make_view(c.data(), {R, N}),
                                   make_view(offsets.data(), {E + 1}), make_view(w.data(), {E, Kd, N}))
                    .ok());
    c.insert(c.end(), w.begin(), w.end());
    return c;
  };
  const int saved = cpu::num_threads();
  const auto two = run(2);
  const auto two_again = run(2);
  const auto one = run(1);
  set_threads(saved);
  EXPECT_TRUE(bitwise_equal(two, two_again));
  EXPECT_TRUE(bitwise_equal(two, one));
}

// ---- smoe's own blocked GEMM (the no-BLAS fallback) ------------------------------------------------

TEST(GemmBlocked, MatchesNaiveForAllTransposes) {
  // Sizes cross the micro-tile (6 x 32), the row block (96) and the reduction block (256).
  const int64_t M = 101, N = 70, K = 300;
  auto a = small_ints<float>(size_t(M * K), 9);
  auto b = small_ints<float>(size_t(K * N), 10);
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      std::vector<float> c(size_t(M * N), std::nanf("")), want(size_t(M * N));
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double s = 0;
          for (int64_t k = 0; k < K; ++k)
            s += double(ta ? a[k * M + m] : a[m * K + k]) * double(tb ? b[n * K + k] : b[k * N + n]);
          want[m * N + n] = float(s);
        }
      cpu::gemm_blocked<float>(ta, tb, M, N, K, a.data(), ta ? M : K, b.data(), tb ? K : N, c.data(), N);
      EXPECT_TRUE(bitwise_equal(c, want)) << "trans_a=" << ta << " trans_b=" << tb;  // small ints: exact
    }
  // f64 with real values, and K = 0 gives zeros.
  auto ad = uniform<double>(size_t(M * K), 11);
  auto bd = uniform<double>(size_t(N * K), 12);
  std::vector<double> cd(size_t(M * N)), wd(size_t(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += ad[m * K + k] * bd[n * K + k];
      wd[m * N + n] = s;
    }
  cpu::gemm_blocked<double>(false, true, M, N, K, ad.data(), K, bd.data(), K, cd.data(), N);
  EXPECT_TRUE(all_close(cd, wd, DType::kF64));
  std::vector<double> z(size_t(M * N), 5.0);
  cpu::gemm_blocked<double>(false, true, M, N, 0, ad.data(), K, bd.data(), K, z.data(), N);
  EXPECT_TRUE(bitwise_equal(z, std::vector<double>(size_t(M * N), 0.0)));
}

// ---- smoe's AVX-512 f32 GEMM ---------------------------------------------------------------------

// The three forms the grouped GEMM uses: forward c = a @ b^T, dgrad c = a @ b, wgrad c = a^T @ b.
struct GemmForm {
  bool trans_a, trans_b;
  const char* name;
};
constexpr GemmForm kForms[] = {{false, true, "a @ b^T"}, {false, false, "a @ b"}, {true, false, "a^T @ b"}};

// Runs sgemm_avx512 on row-major operands with padded leading dimensions (ld = cols + 3) into a
// NaN-prefilled c, checks that the padding of c is untouched, and returns c without the padding.
std::vector<float> run_sgemm_avx512(const GemmForm& f, int64_t M, int64_t N, int64_t K, const std::vector<float>& a,
                                    const std::vector<float>& b) {
  const int64_t a_rows = f.trans_a ? K : M, a_cols = f.trans_a ? M : K;
  const int64_t b_rows = f.trans_b ? N : K, b_cols = f.trans_b ? K : N;
  const int64_t lda = a_cols + 3, ldb = b_cols + 3, ldc = N + 3;
  std::vector<float> ap(size_t(a_rows * lda), std::nanf("")), bp(size_t(b_rows * ldb), std::nanf(""));
  for (int64_t i = 0; i < a_rows; ++i) std::copy_n(a.begin() + i * a_cols, a_cols, ap.begin() + i * lda);
  for (int64_t i = 0; i < b_rows; ++i) std::copy_n(b.begin() + i * b_cols, b_cols, bp.begin() + i * ldb);
  std::vector<float> cp(size_t(M * ldc), std::nanf("")), c(size_t(M * N));
  cpu::sgemm_avx512(f.trans_a, f.trans_b, M, N, K, ap.data(), lda, bp.data(), ldb, cp.data(), ldc);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = N; n < ldc; ++n)
      EXPECT_TRUE(std::isnan(cp[m * ldc + n])) << "padding written at " << m << "," << n;
    std::copy_n(cp.begin() + m * ldc, N, c.begin() + m * N);
  }
  return c;
}

std::vector<float> naive_gemm(const GemmForm& f, int64_t M, int64_t N, int64_t K, const std::vector<float>& a,
                              const std::vector<float>& b) {
  std::vector<float> c(size_t(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k)
        s += double(f.trans_a ? a[k * M + m] : a[m * K + k]) * double(f.trans_b ? b[n * K + k] : b[k * N + n]);
      c[m * N + n] = float(s);
    }
  return c;
}

#define SKIP_WITHOUT_AVX512F() \
  if (!cpu::sgemm_avx512_supported()) GTEST_SKIP() << "this CPU has no AVX-512F: OpenBLAS runs f32"

TEST(GemmAvx512, SmallIntegersBitwiseOnAwkwardShapes) {
  SKIP_WITHOUT_AVX512F();
  // Sizes cross the register tile (12 x 32), the N block (384) and the K block (384). Small integers
  // keep every partial sum exact in f32, so any order of summation must give the naive bits.
  const int64_t sizes[] = {1, 7, 13, 31, 33, 100, 257, 1000};
  for (const GemmForm& f : kForms)
    for (int64_t M : sizes)
      for (int64_t N : sizes)
        for (int64_t K : sizes) {
          if (M * N * K > 1'100'000) continue;  // the naive reference's budget; 1000 still appears in each role
          SCOPED_TRACE(std::string(f.name) + " M=" + std::to_string(M) + " N=" + std::to_string(N) +
                       " K=" + std::to_string(K));
          const auto a = small_ints<float>(size_t(M * K), uint32_t(M + 3 * N + 7 * K));
          const auto b = small_ints<float>(size_t(K * N), uint32_t(5 * M + N + K));
          ASSERT_TRUE(bitwise_equal(run_sgemm_avx512(f, M, N, K, a, b), naive_gemm(f, M, N, K, a, b)));
        }
}

// Real values: the rule of the tolerance table, against the f64-accumulated reference, with OpenBLAS
// (or the blocked GEMM) as the baseline: the kernel's largest error is at most twice the baseline's.
// A plain per-element f32 tolerance does not hold at K = 1000 for either (cancellation).
TEST(GemmAvx512, RealValuesWithinTwiceTheBlasErrorOfAnF64Reference) {
  SKIP_WITHOUT_AVX512F();
  struct Shape {
    int64_t M, N, K;
  };
  auto max_err = [](const std::vector<float>& x, const std::vector<float>& ref) {
    double e = 0;
    for (size_t i = 0; i < x.size(); ++i) e = std::max(e, std::abs(double(x[i]) - double(ref[i])));
    return e;
  };
  for (const Shape sh : {Shape{257, 1000, 300}, Shape{100, 33, 1000}, Shape{13, 513, 257}})
    for (const GemmForm& f : kForms) {
      SCOPED_TRACE(std::string(f.name) + " M=" + std::to_string(sh.M) + " N=" + std::to_string(sh.N) +
                   " K=" + std::to_string(sh.K));
      const auto a = uniform<float>(size_t(sh.M * sh.K), 21);
      const auto b = uniform<float>(size_t(sh.K * sh.N), 22);
      const auto got = run_sgemm_avx512(f, sh.M, sh.N, sh.K, a, b);
      const auto ref = naive_gemm(f, sh.M, sh.N, sh.K, a, b);
      std::vector<float> blas(size_t(sh.M * sh.N));
      cpu::gemm_serial<float>(f.trans_a, f.trans_b, sh.M, sh.N, sh.K, a.data(), f.trans_a ? sh.M : sh.K, b.data(),
                              f.trans_b ? sh.K : sh.N, blas.data(), sh.N);
      const double e_own = max_err(got, ref), e_blas = max_err(blas, ref);
      EXPECT_LE(e_own, std::max(2 * e_blas, 1e-6)) << "baseline error " << e_blas;
      if (sh.K <= 300) EXPECT_TRUE(all_close(got, ref, DType::kF32));
    }
}

TEST(GemmAvx512, ZeroKGivesZerosAndRowsDoNotDependOnTheTile) {
  SKIP_WITHOUT_AVX512F();
  const GemmForm fwd = kForms[0];
  const auto a = uniform<float>(size_t(40 * 7), 23), b = uniform<float>(size_t(7 * 50), 24);
  const auto z = run_sgemm_avx512(fwd, 40, 50, 0, a, b);
  EXPECT_TRUE(bitwise_equal(z, std::vector<float>(z.size(), 0.f)));
  // The summation order depends on K alone: a sub-block computed alone equals that block of the whole.
  const int64_t M = 300, N = 70, K = 600;
  const auto a2 = uniform<float>(size_t(M * K), 25), b2 = uniform<float>(size_t(N * K), 26);
  std::vector<float> whole(size_t(M * N)), part(size_t(30 * N));
  cpu::sgemm_avx512(false, true, M, N, K, a2.data(), K, b2.data(), K, whole.data(), N);
  cpu::sgemm_avx512(false, true, 30, N - 3, K, a2.data() + 5 * K, K, b2.data() + 3 * K, K, part.data(), N);
  for (int64_t m = 0; m < 30; ++m)
    for (int64_t n = 0; n < N - 3; ++n)
      ASSERT_EQ(std::bit_cast<uint32_t>(part[m * N + n]), std::bit_cast<uint32_t>(whole[(m + 5) * N + n + 3]));
}

// The grouped ops with each f32 kernel: segments of awkward sizes (and empty ones), NaN-prefilled outputs.
TEST(GemmF32, BothKernelsMatchNaiveInTheGroupedOps) {
  for (bool own : {true, false}) {
    if (own && !cpu::sgemm_avx512_supported()) continue;
    SCOPED_TRACE(own ? "smoe's AVX-512 GEMM" : "OpenBLAS tiles");
    const bool saved = cpu::set_sgemm_avx512(own);
    check_grouped_gemm_against_naive<float>();
    check_wgrad_against_naive<float>();
    auto offsets = offsets_of({0, 1, 7, 13, 0, 31, 33, 100, 257, 1000, 0});
    const int64_t E = int64_t(offsets.size()) - 1, R = offsets.back();
    for (auto [Kd, N] : {std::pair<int64_t, int64_t>{33, 100}, {257, 13}}) {
      auto a = small_ints<float>(size_t(R * Kd), 31);
      auto b = small_ints<float>(size_t(E * N * Kd), 32);
      for (bool trans_b : {true, false}) {
        auto c = nan_filled<float>(size_t(R * N));
        auto want = c;
        naive_grouped_gemm(trans_b, a, b, offsets, Kd, N, want);
        const auto bv = trans_b ? make_view(b.data(), {E, N, Kd}) : make_view(b.data(), {E, Kd, N});
        ASSERT_TRUE(grouped_gemm(Exec{}, GroupedGemmParams{trans_b}, make_view(a.data(), {R, Kd}), bv,
                                 make_view(offsets.data(), {E + 1}), make_view(c.data(), {R, N}))
                        .ok());
        EXPECT_TRUE(bitwise_equal(c, want)) << "Kd=" << Kd << " N=" << N << " trans_b=" << trans_b;
      }
      auto g = small_ints<float>(size_t(R * N), 33);
      auto w = nan_filled<float>(size_t(E * Kd * N));
      ASSERT_TRUE(grouped_gemm_wgrad(Exec{}, make_view(a.data(), {R, Kd}), make_view(g.data(), {R, N}),
                                     make_view(offsets.data(), {E + 1}), make_view(w.data(), {E, Kd, N}))
                      .ok());
      EXPECT_TRUE(bitwise_equal(w, naive_wgrad(a, g, offsets, Kd, N)));  // empty experts: +0.0, bit for bit
    }
    cpu::set_sgemm_avx512(saved);
  }
}

TEST(GemmAvx512, GroupedOpsBitwiseIdenticalAcrossThreadCounts) {
  SKIP_WITHOUT_AVX512F();
  // Real values (rounding matters), K past two K blocks, N past the N block, segments of several tiles.
  const int64_t R = 2300, E = 3, Kd = 600, N = 530;
  std::vector<int64_t> offsets = {0, 1500, 1500, 2300};
  auto a = uniform<float>(size_t(R * Kd), 41);
  auto b = uniform<float>(size_t(E * N * Kd), 42);
  auto run = [&](int threads) {
    set_threads(threads);
    std::vector<float> c(size_t(R * N)), d(size_t(R * Kd)), w(size_t(E * Kd * N));
    const auto O = make_view(offsets.data(), {E + 1});
    EXPECT_TRUE(grouped_gemm(Exec{}, {}, make_view(a.data(), {R, Kd}), make_view(b.data(), {E, N, Kd}), O,
                             make_view(c.data(), {R, N}))
                    .ok());
    EXPECT_TRUE(grouped_gemm(Exec{}, GroupedGemmParams{false}, make_view(c.data(), {R, N}),
                             make_view(b.data(), {E, N, Kd}), O, make_view(d.data(), {R, Kd}))
                    .ok());
    EXPECT_TRUE(grouped_gemm_wgrad(Exec{}, make_view(a.data(), {R, Kd}), make_view(c.data(), {R, N}), O,
                                   make_view(w.data(), {E, Kd, N}))
                    .ok());
    c.insert(c.end(), d.begin(), d.end());
    c.insert(c.end(), w.begin(), w.end());
    return c;
  };
  const bool saved_own = cpu::set_sgemm_avx512(true);
  const int saved = cpu::num_threads();
  const auto two = run(2);
  const auto one = run(1);
  const auto two_again = run(2);
  set_threads(saved);
  cpu::set_sgemm_avx512(saved_own);
  EXPECT_TRUE(bitwise_equal(two, one));
  EXPECT_TRUE(bitwise_equal(two, two_again));
}

// ---- activations ---------------------------------------------------------------------------------

TYPED_TEST(GemmTyped, ActivationsMatchNaive) {
  using T = TypeParam;
  const DType dt = DTypeOf<T>::value;
  for (Activation act : {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGELU, Activation::kReLU}) {
    for (int64_t R : {0, 1, 7, 4097}) {
      SCOPED_TRACE("act=" + std::to_string(int(act)) + " R=" + std::to_string(R));
      const int64_t F = 37, F1 = is_gated(act) ? 2 * F : F;  // 37: two 16-lane blocks and a tail
      auto in = uniform<T>(size_t(R * F1), 13, -4.f, 4.f);
      if (R > 0) in[0] = from_acc<T>(0);  // ReLU's kink: subgradient 0
      auto go = uniform<T>(size_t(R * F), 14);
      auto out = nan_filled<T>(size_t(R * F));
      auto gi = nan_filled<T>(size_t(R * F1));
      std::vector<T> want_out(size_t(R * F)), want_gi(size_t(R * F1));
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < F; ++j) {
          const double g = to_acc(in[r * F1 + j]);
          const double u = is_gated(act) ? double(to_acc(in[r * F1 + F + j])) : 1.0;
          const double d = to_acc(go[r * F + j]);
          want_out[r * F + j] = from_acc<T>(typename AccOf<T>::type(testing::reference_act(act, g, u)));
          double dg, du;
          testing::reference_act_grad(act, g, u, &dg, &du);
          want_gi[r * F1 + j] = from_acc<T>(typename AccOf<T>::type(d * dg));
          if (is_gated(act)) want_gi[r * F1 + F + j] = from_acc<T>(typename AccOf<T>::type(d * du));
        }
      ASSERT_TRUE(activation_forward(Exec{}, act, make_view(in.data(), {R, F1}), make_view(out.data(), {R, F})).ok());
      ASSERT_TRUE(activation_backward(Exec{}, act, make_view(in.data(), {R, F1}), make_view(go.data(), {R, F}),
                                      make_view(gi.data(), {R, F1}))
                      .ok());
      EXPECT_TRUE(all_close(out, want_out, dt));
      EXPECT_TRUE(all_close(gi, want_gi, dt));
    }
  }
}

// The SwiGLU rows run 16 lanes at a time plus a scalar tail: the same input must give the same bits
// in either, including at the clamps of the exponential.
TEST(Activation, SwigluVectorLanesAndTailAgreeBitwise) {
  const int64_t F = 17;
  const float probe[] = {0.f, -0.f, 1e-3f, -2.5f, 3.75f, 20.f, -20.f, 90.f, -90.f, 1e30f, -1e30f, 0.3333f};
  for (float v : probe) {
    std::vector<float> in(static_cast<size_t>(2 * F), 1.5f), out(static_cast<size_t>(F)),
        go(static_cast<size_t>(F), -0.75f), gi(static_cast<size_t>(2 * F));
    in[0] = in[16] = v;  // lane 0 of the vector block and the tail element
    ASSERT_TRUE(
        activation_forward(Exec{}, Activation::kSwiGLU, make_view(in.data(), {1, 2 * F}), make_view(out.data(), {1, F}))
            .ok());
    ASSERT_TRUE(activation_backward(Exec{}, Activation::kSwiGLU, make_view(in.data(), {1, 2 * F}),
                                    make_view(go.data(), {1, F}), make_view(gi.data(), {1, 2 * F}))
                    .ok());
    EXPECT_EQ(std::bit_cast<uint32_t>(out[0]), std::bit_cast<uint32_t>(out[16])) << v;
    EXPECT_EQ(std::bit_cast<uint32_t>(gi[0]), std::bit_cast<uint32_t>(gi[16])) << v;
    EXPECT_EQ(std::bit_cast<uint32_t>(gi[F]), std::bit_cast<uint32_t>(gi[F + 16])) << v;
    const double want = double(v) / (1.0 + std::exp(-double(v))) * 1.5;
    EXPECT_NEAR(out[0], want, 1e-5 + 1e-5 * std::fabs(want)) << v;
  }
}

TEST(Activation, BackwardMatchesFiniteDifferencesF64) {
  const int64_t R = 3, F = 4;
  for (Activation act : {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGELU}) {
    const int64_t F1 = is_gated(act) ? 2 * F : F;
    auto in = uniform<double>(size_t(R * F1), 15, -2.f, 2.f);
    auto go = uniform<double>(size_t(R * F), 16);
    std::vector<double> gi(size_t(R * F1)), out(size_t(R * F));
    ASSERT_TRUE(activation_backward(Exec{}, act, make_view(in.data(), {R, F1}), make_view(go.data(), {R, F}),
                                    make_view(gi.data(), {R, F1}))
                    .ok());
    auto loss = [&](std::vector<double>& x) {
      EXPECT_TRUE(activation_forward(Exec{}, act, make_view(x.data(), {R, F1}), make_view(out.data(), {R, F})).ok());
      double l = 0;
      for (size_t i = 0; i < out.size(); ++i) l += out[i] * go[i];
      return l;
    };
    const double h = 1e-6;
    for (size_t i = 0; i < in.size(); ++i) {
      auto xp = in, xm = in;
      xp[i] += h;
      xm[i] -= h;
      EXPECT_NEAR(gi[i], (loss(xp) - loss(xm)) / (2 * h), 1e-7) << "act " << int(act) << " element " << i;
    }
  }
}

// ---- bad inputs ----------------------------------------------------------------------------------

void expect_invalid(const Status& s, const std::string& needle) {
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.message();
  EXPECT_NE(s.message().find(needle), std::string::npos) << "message: " << s.message() << "\nwanted: " << needle;
}

TEST(GemmErrors, GroupedGemmRejectsBadArguments) {
  std::vector<float> a(12), b(2 * 5 * 4), c(15);
  std::vector<double> bd(40);
  std::vector<int64_t> off = {0, 1, 3};
  std::vector<int32_t> off32 = {0, 1, 3};
  const Exec ex;
  const GroupedGemmParams p;
  auto A = make_view(a.data(), {3, 4});
  auto B = make_view(b.data(), {2, 5, 4});
  auto O = make_view(off.data(), {3});
  auto C = make_view(c.data(), {3, 5});
  EXPECT_TRUE(grouped_gemm(ex, p, A, B, O, C).ok());
  expect_invalid(grouped_gemm(ex, p, make_view(a.data(), {12}), B, O, C), "argument 'a': expected 2-D");
  expect_invalid(grouped_gemm(ex, p, A, make_view(bd.data(), {2, 5, 4}), O, C), "argument 'b': expected dtype f32");
  expect_invalid(grouped_gemm(ex, p, A, make_view(b.data(), {2, 4, 5}), O, C), "argument 'b': expected size(2) == 4");
  expect_invalid(grouped_gemm(ex, p, A, make_view(b.data(), {1, 5, 4}), O, C), "argument 'b': expected size(0) == 2");
  expect_invalid(grouped_gemm(ex, p, A, B, make_view(off32.data(), {3}), C), "argument 'offsets': expected dtype i64");
  expect_invalid(grouped_gemm(ex, p, A, B, O, make_view(c.data(), {3, 4})), "argument 'c': expected size(1) == 5");
  expect_invalid(grouped_gemm(ex, p, A, B, O, make_view(c.data(), {2, 5})), "argument 'c': expected size(0) == 3");
  GroupedGemmParams nt;
  nt.trans_b = false;
  expect_invalid(grouped_gemm(ex, nt, A, B, O, C), "argument 'b': expected size(1) == 4");
  std::vector<int64_t> dec = {0, 2, 1};
  expect_invalid(grouped_gemm(ex, p, A, B, make_view(dec.data(), {3}), C),
                 "argument 'offsets': expected non-decreasing");
  std::vector<int64_t> big = {0, 1, 4};
  expect_invalid(grouped_gemm(ex, p, A, B, make_view(big.data(), {3}), C),
                 "argument 'offsets': expected offsets[E] <= R");
  std::vector<int64_t> neg = {-1, 1, 3};
  expect_invalid(grouped_gemm(ex, p, A, B, make_view(neg.data(), {3}), C),
                 "argument 'offsets': expected offsets[0] >= 0");
  TensorView strided = C;
  strided.strides[1] = 2;
  expect_invalid(grouped_gemm(ex, p, A, B, O, strided), "argument 'c': expected dense rows");
  TensorView on_gpu = C;
  on_gpu.device = Device::kCUDA;
  expect_invalid(grouped_gemm(ex, p, A, B, O, on_gpu), "argument 'c': expected a tensor on cpu");
  std::vector<int32_t> ai(12);
  expect_invalid(grouped_gemm(ex, p, make_view(ai.data(), {3, 4}), B, O, C), "argument 'a': expected dtype f32, bf16");
  Exec cuda;
  cuda.backend = Backend::kCuda;
  expect_invalid(grouped_gemm(cuda, p, A, B, O, C), "argument 'backend'");
}

TEST(GemmErrors, WgradAndActivationRejectBadArguments) {
  std::vector<float> a(12), b(15), c(2 * 4 * 5);
  std::vector<int64_t> off = {0, 1, 3};
  const Exec ex;
  auto A = make_view(a.data(), {3, 4});
  auto B = make_view(b.data(), {3, 5});
  auto O = make_view(off.data(), {3});
  EXPECT_TRUE(grouped_gemm_wgrad(ex, A, B, O, make_view(c.data(), {2, 4, 5})).ok());
  expect_invalid(grouped_gemm_wgrad(ex, A, make_view(b.data(), {5, 3}), O, make_view(c.data(), {2, 4, 5})),
                 "argument 'b': expected size(0) == 3");
  expect_invalid(grouped_gemm_wgrad(ex, A, B, O, make_view(c.data(), {2, 5, 4})),
                 "argument 'c': expected size(1) == 4");
  expect_invalid(grouped_gemm_wgrad(ex, A, B, O, make_view(c.data(), {40})), "argument 'c': expected 3-D");
  expect_invalid(grouped_gemm_wgrad(ex, A, B, make_view(off.data(), {2}), make_view(c.data(), {2, 4, 5})),
                 "argument 'c': expected size(0) == 1");

  std::vector<float> in(3 * 8), out(3 * 4), gi(3 * 8);
  auto IN = make_view(in.data(), {3, 8});
  auto OUT = make_view(out.data(), {3, 4});
  EXPECT_TRUE(activation_forward(ex, Activation::kSwiGLU, IN, OUT).ok());
  expect_invalid(activation_forward(ex, Activation::kGELU, IN, OUT), "argument 'in': expected size(1) == 4");
  expect_invalid(activation_forward(ex, static_cast<Activation>(9), IN, OUT), "argument 'act'");
  expect_invalid(activation_forward(ex, Activation::kSwiGLU, IN, make_view(out.data(), {2, 4})),
                 "argument 'out': expected size(0) == 3");
  expect_invalid(activation_backward(ex, Activation::kSwiGLU, IN, OUT, make_view(gi.data(), {3, 4})),
                 "argument 'grad_in': expected size(1) == 8");
  std::vector<double> od(12);
  expect_invalid(
      activation_backward(ex, Activation::kSwiGLU, IN, make_view(od.data(), {3, 4}), make_view(gi.data(), {3, 8})),
      "argument 'grad_out': expected dtype f32");
}

}  // namespace
}  // namespace smoe

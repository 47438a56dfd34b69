// Dense products: correct against a double reference, and bit-identical for any thread count.
#include "lowbit/core/dense_product.hpp"

#include <gtest/gtest.h>

#include <cstring>

#include "test_util.hpp"

namespace lowbit {
namespace {

bool same_bits(const Matrix<float>& a, const Matrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<std::size_t>(a.size())) == 0;
}

template <class Lhs, class Rhs>
double rel_error(const Matrix<float>& got, const Lhs& lhs, const Rhs& rhs) {
  const Matrix<double> want = lhs.template cast<double>() * rhs.template cast<double>();
  return (got.cast<double>() - want).norm() / std::max(want.norm(), 1e-300);
}

struct Shape {
  Index m, k, n;
};

// Around the 128-wide panels, both cut directions, and degenerate sizes.
// Serial (< 65536 multiply-adds), serial panels (< 2^22) and parallel panels.
const Shape kShapes[] = {{1, 1, 1},     {1, 300, 1},    {127, 64, 5},    {128, 33, 128}, {129, 257, 3},
                         {5, 70, 300},  {40, 3000, 30}, {150, 400, 140}, {0, 4, 3},      {3, 0, 4}};

TEST(DenseProduct, MatchesADoubleProductForEveryOperandForm) {
  for (const Shape s : kShapes) {
    const Matrix<float> A = test::random_matrix<float>(s.m, s.k, 1), B = test::random_matrix<float>(s.k, s.n, 2);
    const Matrix<float> At = A.transpose(), Bt = B.transpose();
    const Matrix<float> nn = detail::dense_product<float>(A, B);
    const Matrix<float> nt = detail::dense_product<float>(A, Bt.transpose());
    const Matrix<float> tn = detail::dense_product<float>(At.transpose(), B);
    if (s.m * s.n == 0) {
      EXPECT_EQ(nn.size(), 0);
      continue;
    }
    if (s.k == 0) {
      EXPECT_TRUE(nn.isZero()) << "empty inner dimension must give zeros";
      continue;
    }
    EXPECT_LT(rel_error(nn, A, B), 1e-6) << s.m << "x" << s.k << "x" << s.n;
    EXPECT_LT(rel_error(nt, A, B), 1e-6) << s.m << "x" << s.k << "x" << s.n;
    EXPECT_LT(rel_error(tn, A, B), 1e-6) << s.m << "x" << s.k << "x" << s.n;
  }
}

TEST(DenseProduct, IsBitIdenticalForAnyThreadCount) {
  const int threads = num_threads();
  // Depths above Eigen's per-thread blocking (where its own threaded GEMM differs).
  for (const Shape s : {Shape{160, 1100, 140}, Shape{40, 2048, 300}, Shape{1, 5000, 1}}) {
    const Matrix<float> A = test::random_matrix<float>(s.m, s.k, 3), B = test::random_matrix<float>(s.n, s.k, 4);
    set_num_threads(1);
    const Matrix<float> one = detail::dense_product<float>(A, B.transpose());
    set_num_threads(2);
    const Matrix<float> two = detail::dense_product<float>(A, B.transpose());
    set_num_threads(threads);
    EXPECT_TRUE(same_bits(one, two)) << s.m << "x" << s.k << "x" << s.n;
  }
}

TEST(DenseProduct, RejectsMismatchedShapes) {
  const Matrix<float> A(3, 4), B(5, 2);
  Matrix<float> out(3, 2);
  EXPECT_THROW(detail::dense_product<float>(A, B, out), Error);
  const Matrix<float> C(4, 2);
  Matrix<float> wrong(2, 2);
  EXPECT_THROW(detail::dense_product<float>(A, C, wrong), Error);
}

}  // namespace
}  // namespace lowbit

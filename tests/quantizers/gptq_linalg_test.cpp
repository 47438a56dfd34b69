// GPTQ's Hessian algebra against Eigen in double: the streamed Gram matrix, the blocked
// Cholesky, the blocked triangular inverse and the reverse factor V (H = V V^T); and
// thread-count independence of each.
#include "lowbit/quantizers/gptq_linalg.hpp"

#include <gtest/gtest.h>

#include <Eigen/Cholesky>
#include <Eigen/LU>
#include <vector>

#include "test_util.hpp"

namespace lowbit {
namespace {

// A well-conditioned SPD matrix: (1/k) A A^T + I, A [n x k] Gaussian.
Matrix<double> spd_matrix(Index n, std::uint64_t seed) {
  const Matrix<double> A = test::random_matrix<double>(n, n + 8, seed);
  Matrix<double> H = A * A.transpose() / static_cast<double>(n + 8);
  H.diagonal().array() += 1.0;
  return H;
}

// Sizes around the 64 / 256 blocks and the 192 tiles.
const Index kSizes[] = {1, 3, 64, 65, 200, 256, 257, 300};

template <class T>
double tolerance();
template <>
double tolerance<float>() {
  return 2e-4;
}
template <>
double tolerance<double>() {
  return 1e-11;
}

template <class T>
void check_cholesky() {
  for (Index n : kSizes) {
    const Matrix<double> H = spd_matrix(n, static_cast<std::uint64_t>(n));
    Matrix<T> A = H.cast<T>();
    ASSERT_TRUE(detail::linalg::cholesky_lower(A.data(), n, n)) << n;
    const Matrix<double> L = A.template cast<double>().template triangularView<Eigen::Lower>();
    const Matrix<double> expected = Eigen::LLT<Matrix<double>>(H).matrixL();
    EXPECT_LE((L - expected).cwiseAbs().maxCoeff(), tolerance<T>()) << n;
  }
}

TEST(GptqLinalg, CholeskyMatchesEigenFloat) { check_cholesky<float>(); }
TEST(GptqLinalg, CholeskyMatchesEigenDouble) { check_cholesky<double>(); }

TEST(GptqLinalg, CholeskyRejectsIndefiniteMatrices) {
  for (Index n : {Index(2), Index(100), Index(300)}) {
    Matrix<double> H = spd_matrix(n, 5);
    H(n - 1, n - 1) = -1.0;  // the last pivot goes negative
    Matrix<float> A = H.cast<float>();
    EXPECT_FALSE(detail::linalg::cholesky_lower(A.data(), n, n)) << n;
  }
  Matrix<float> nan_matrix = Matrix<float>::Identity(70, 70);
  nan_matrix(69, 0) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(detail::linalg::cholesky_lower(nan_matrix.data(), 70, 70));
}

template <class T>
void check_inverse() {
  for (Index n : kSizes) {
    const Matrix<double> L = Eigen::LLT<Matrix<double>>(spd_matrix(n, static_cast<std::uint64_t>(n) + 1)).matrixL();
    Matrix<T> A = L.cast<T>();
    A.template triangularView<Eigen::StrictlyUpper>().setConstant(T(7));  // scratch the inverse must ignore
    detail::linalg::invert_lower(A.data(), n, n);
    const Matrix<double> expected = L.triangularView<Eigen::Lower>().solve(Matrix<double>::Identity(n, n));
    EXPECT_LE((A.template cast<double>() - expected).cwiseAbs().maxCoeff(), tolerance<T>()) << n;
    EXPECT_TRUE((A.template triangularView<Eigen::StrictlyUpper>().toDenseMatrix().array() == T(0)).all()) << n;
  }
}

TEST(GptqLinalg, TriangularInverseMatchesEigenFloat) { check_inverse<float>(); }
TEST(GptqLinalg, TriangularInverseMatchesEigenDouble) { check_inverse<double>(); }

// V upper triangular with H = V V^T and V_ii > 0; and V^-1 is the reference's U, the
// upper Cholesky factor of H^-1 (Cholesky, inverse, Cholesky).
template <class T>
void check_reverse_cholesky() {
  for (Index n : kSizes) {
    const Matrix<double> H = spd_matrix(n, static_cast<std::uint64_t>(n) + 2);
    Matrix<T> V = H.cast<T>();
    ASSERT_TRUE(detail::linalg::reverse_cholesky(V.data(), n)) << n;
    const Matrix<double> Vd = V.template cast<double>();
    EXPECT_TRUE((Vd.triangularView<Eigen::StrictlyLower>().toDenseMatrix().array() == 0.0).all()) << n;
    EXPECT_GT(Vd.diagonal().minCoeff(), 0.0) << n;
    EXPECT_LE((Vd * Vd.transpose() - H).cwiseAbs().maxCoeff(), 10 * tolerance<T>()) << n;
    const Matrix<double> U = Eigen::LLT<Matrix<double>>(H.inverse()).matrixU();
    const Matrix<double> V_inverse = Vd.triangularView<Eigen::Upper>().solve(Matrix<double>::Identity(n, n));
    EXPECT_LE((V_inverse - U).cwiseAbs().maxCoeff(), 10 * tolerance<T>()) << n;
  }
}

TEST(GptqLinalg, ReverseCholeskyFloat) { check_reverse_cholesky<float>(); }
TEST(GptqLinalg, ReverseCholeskyDouble) { check_reverse_cholesky<double>(); }

TEST(GptqLinalg, ReverseCholeskyRejectsIndefiniteMatrices) {
  Matrix<double> H = spd_matrix(300, 4);
  H(0, 0) = -1.0;  // the reversed factorization meets it last
  Matrix<float> V = H.cast<float>();
  EXPECT_FALSE(detail::linalg::reverse_cholesky(V.data(), 300));
}

TEST(GptqLinalg, GramMatchesDoubleProductWithinItsBound) {
  const std::pair<Index, Index> shapes[] = {{1, 1}, {1, 1500}, {33, 100}, {33, 1500}, {200, 1}, {200, 600}, {385, 300}};
  for (const auto& [n, tokens] : shapes) {
    const Matrix<float> X = test::random_matrix<float>(tokens, n, static_cast<std::uint64_t>(n * tokens));
    Matrix<double> S = Matrix<double>::Zero(n, n);
    detail::linalg::gram_lower_accumulate<float>(X.data(), tokens, n, n, S.data(), n);
    const Matrix<double> Xd = X.cast<double>();
    const Matrix<double> expected = Xd.transpose() * Xd;
    const Matrix<double> magnitude = Xd.cwiseAbs().transpose() * Xd.cwiseAbs();
    // Bound of the header: 256 * 2^-24 * sum |x_i x_j| (+ the double accumulation).
    const double gamma = 256.0 * std::ldexp(1.0, -24);
    for (Index i = 0; i < n; ++i)
      for (Index j = 0; j <= i; ++j)
        ASSERT_LE(std::abs(S(i, j) - expected(i, j)), gamma * magnitude(i, j) + 1e-12)
            << n << "x" << tokens << " at " << i << "," << j;
  }
}

TEST(GptqLinalg, GramAccumulatesAcrossCallsAndStrides) {
  const Index n = 70, tokens = 300;
  const Matrix<float> wide = test::random_matrix<float>(tokens, n + 5, 3);
  Matrix<double> S = Matrix<double>::Zero(n, n);
  detail::linalg::gram_lower_accumulate<float>(wide.data(), 100, n, n + 5, S.data(), n);
  detail::linalg::gram_lower_accumulate<float>(wide.data() + 100 * (n + 5), 200, n, n + 5, S.data(), n);
  const Matrix<double> X = wide.leftCols(n).cast<double>();
  const Matrix<double> expected = X.transpose() * X;
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j <= i; ++j) EXPECT_NEAR(S(i, j), expected(i, j), 1e-3) << i << "," << j;
}

// Every parallel step splits work into fixed items: 1 and 2 threads give the same bits.
TEST(GptqLinalg, ResultsDoNotDependOnThreadCount) {
  const int threads = num_threads();
  const Index n = 1024, tokens = 100;  // large enough for every parallel step (worth_parallel)
  const Matrix<float> X = test::random_matrix<float>(tokens, n, 11);
  std::vector<Matrix<double>> grams;
  std::vector<Matrix<float>> factors;
  for (int t : {1, 2}) {
    set_num_threads(t);
    Matrix<double> S = Matrix<double>::Zero(n, n);
    detail::linalg::gram_lower_accumulate<float>(X.data(), tokens, n, n, S.data(), n);
    grams.push_back(S);
    Matrix<double> H = S.triangularView<Eigen::Lower>();
    H = (H + H.transpose()).eval() / tokens;
    H.diagonal() = S.diagonal() / tokens + Vector<double>::Ones(n);
    Matrix<float> V = H.cast<float>();
    EXPECT_TRUE(detail::linalg::reverse_cholesky(V.data(), n));
    factors.push_back(V);
    Matrix<float> M = V.transpose();  // lower triangular
    detail::linalg::invert_lower(M.data(), n, n);
    factors.push_back(M);
  }
  set_num_threads(threads);
  EXPECT_TRUE(grams[0].triangularView<Eigen::Lower>().toDenseMatrix() ==
              grams[1].triangularView<Eigen::Lower>().toDenseMatrix());
  EXPECT_TRUE(factors[0] == factors[2]);
  EXPECT_TRUE(factors[1] == factors[3]);
}

}  // namespace
}  // namespace lowbit

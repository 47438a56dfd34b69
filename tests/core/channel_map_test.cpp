// ChannelMap: apply / fold_weight / fold_into_previous_* against the dense matrices M and N
// they stand for (built here, in double), the exactness of splits, the merge error
// formula, folding into the previous layer, storage size and argument checks.
#include "lowbit/core/channel_map.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "lowbit/core/threading.hpp"
#include "test_util.hpp"

namespace lowbit {
namespace {

using MatrixD = Matrix<double>;

// M [C, C'] with M(s, k) = factor, N [C, C'] with N(s, k) = 1, the map's definition.
template <class T>
MatrixD activation_matrix(const ChannelMap<T>& map) {
  MatrixD M = MatrixD::Zero(map.source_channels(), map.channels());
  for (Index k = 0; k < map.channels(); ++k)
    for (const auto& e : map.entries(k)) M(e.source, k) += static_cast<double>(e.factor);
  return M;
}
template <class T>
MatrixD weight_matrix(const ChannelMap<T>& map) {
  MatrixD N = MatrixD::Zero(map.source_channels(), map.channels());
  for (Index k = 0; k < map.channels(); ++k)
    for (const auto& e : map.entries(k)) N(e.source, k) += 1.0;
  return N;
}

double rel_error(const Matrix<float>& got, const MatrixD& want) {
  return (got.cast<double>() - want).norm() / want.norm();
}

// A map with every kind of channel: copies, a 3-way split, merges, a 2-way split, and a
// hand-made three-source channel.
ChannelMap<float> mixed_map() {
  ChannelMap<float> map(10);
  map.append_copy(0);
  map.append_split(1, 3);
  map.append_merge(2, 5);
  map.append_copy(3);
  map.append_merge(4, 7);
  map.append_copy(6);
  map.append_split(8, 2);
  map.append({{9, 0.25f}, {0, -1.5f}, {6, 2.0f}});
  return map;
}

TEST(ChannelMap, EmptyMapIsTheIdentityOnAnyWidth) {
  const ChannelMap<float> map;
  EXPECT_TRUE(map.empty());
  EXPECT_EQ(map.channels(), 0);
  EXPECT_EQ(map.bytes(), 0u);
  for (Index width : {1, 7, 64}) {
    const Matrix<float> X = test::random_matrix<float>(5, width, 1);
    EXPECT_EQ(map.apply(X), X);
    EXPECT_EQ(map.fold_weight(X), X);
  }
  const Matrix<float> W_prev = test::random_matrix<float>(6, 4, 2);
  EXPECT_EQ(map.fold_into_previous_weight(W_prev), W_prev);
  const Vector<float> b = Vector<float>::LinSpaced(6, -1, 1);
  EXPECT_EQ(map.fold_into_previous_bias(b), b);
}

TEST(ChannelMap, IdentityWrittenOutChangesNothing) {
  const ChannelMap<float> map = ChannelMap<float>::identity(12);
  EXPECT_FALSE(map.empty());
  EXPECT_EQ(map.channels(), 12);
  const Matrix<float> X = test::random_matrix<float>(9, 12, 3), W = test::random_matrix<float>(4, 12, 4);
  EXPECT_EQ(map.apply(X), X);
  EXPECT_EQ(map.fold_weight(W), W);
}

TEST(ChannelMap, ApplyAndFoldsAreTheDenseMatrices) {
  const ChannelMap<float> map = mixed_map();
  ASSERT_EQ(map.channels(), 11);
  ASSERT_EQ(map.source_channels(), 10);
  const Matrix<float> X = test::random_matrix<float>(17, 10, 5), W = test::random_matrix<float>(6, 10, 6);
  const MatrixD M = activation_matrix(map), N = weight_matrix(map);
  EXPECT_LT(rel_error(map.apply(X), X.cast<double>() * M), 1e-6);
  EXPECT_LT(rel_error(map.fold_weight(W), W.cast<double>() * N), 1e-6);
  const Matrix<float> W_prev = test::random_matrix<float>(10, 7, 7);
  const Vector<float> b_prev = Vector<float>::LinSpaced(10, -2, 3);
  EXPECT_LT(rel_error(map.fold_into_previous_weight(W_prev), M.transpose() * W_prev.cast<double>()), 1e-6);
  const Vector<double> b_want = M.transpose() * b_prev.cast<double>();
  EXPECT_LT((map.fold_into_previous_bias(b_prev).cast<double>() - b_want).norm() / b_want.norm(), 1e-6);
}

TEST(ChannelMap, OneTokenApplyIsTheRowOfTheBatchApply) {
  const ChannelMap<float> map = mixed_map();
  const Matrix<float> X = test::random_matrix<float>(4, 10, 8), batch = map.apply(X);
  Vector<float> token(map.channels());
  for (Index t = 0; t < X.rows(); ++t) {
    const Vector<float> x = X.row(t).transpose();
    map.apply(x.data(), token.data());
    EXPECT_EQ(token.transpose(), batch.row(t)) << t;
  }
  const float x[1] = {1.0f};
  float out[1];
  EXPECT_THROW(ChannelMap<float>().apply(x, out), Error);  // the identity has no width
}

TEST(ChannelMap, SplitsLeaveTheFloatOutputUnchanged) {
  // Every channel split 1..5 ways: M N^T = I, so X' W'^T = X W^T to float rounding.
  const Index C = 48;
  ChannelMap<float> map(C);
  for (Index j = 0; j < C; ++j) map.append_split(j, 1 + j % 5);
  const MatrixD M = activation_matrix(map), N = weight_matrix(map);
  EXPECT_LT((M * N.transpose() - MatrixD::Identity(C, C)).norm(), 1e-6);
  const Matrix<float> X = test::random_matrix<float>(40, C, 8), W = test::random_matrix<float>(12, C, 9);
  const Matrix<float> Y = map.apply(X) * map.fold_weight(W).transpose();
  EXPECT_LT(rel_error(Y, X.cast<double>() * W.cast<double>().transpose()), 1e-6);
  // The activation range shrinks by the split count.
  const Matrix<float> X_split = map.apply(X);
  Index k = 0;
  for (Index j = 0; j < C; ++j)
    for (Index p = 0; p < 1 + j % 5; ++p, ++k)
      EXPECT_NEAR(X_split.col(k).cwiseAbs().maxCoeff(), X.col(j).cwiseAbs().maxCoeff() / (1 + j % 5), 1e-6);
}

TEST(ChannelMap, MergeChangesTheOutputByHalfTheOuterProductOfDifferences) {
  // (x_i + x_j)/2 (w_i + w_j) - x_i w_i - x_j w_j = -(x_i - x_j)(w_i - w_j) / 2 per token.
  const Index C = 6;
  ChannelMap<double> map(C);
  map.append_merge(1, 4);
  for (Index j : {0, 2, 3, 5}) map.append_copy(j);
  const MatrixD X = test::random_matrix<double>(30, C, 10), W = test::random_matrix<double>(5, C, 11);
  const MatrixD change = map.apply(X) * map.fold_weight(W).transpose() - X * W.transpose();
  const MatrixD want = -0.5 * (X.col(1) - X.col(4)) * (W.col(1) - W.col(4)).transpose();
  EXPECT_LT((change - want).norm(), 1e-12 * want.norm());
  // Identical activations (or identical weight columns) merge exactly.
  MatrixD X_same = X;
  X_same.col(4) = X_same.col(1);
  EXPECT_LT((map.apply(X_same) * map.fold_weight(W).transpose() - X_same * W.transpose()).norm(), 1e-12);
  MatrixD W_same = W;
  W_same.col(4) = W_same.col(1);
  EXPECT_LT((map.apply(X) * map.fold_weight(W_same).transpose() - X * W_same.transpose()).norm(), 1e-12);
}

TEST(ChannelMap, FoldIntoThePreviousLayerEqualsApplyingTheMap) {
  // X = X_prev W_prev^T + b_prev feeds the map: the folded previous layer makes X' itself.
  const ChannelMap<float> map = mixed_map();
  const Matrix<float> X_prev = test::random_matrix<float>(25, 7, 12), W_prev = test::random_matrix<float>(10, 7, 13);
  const Vector<float> b_prev = Vector<float>::LinSpaced(10, -1, 2);
  Matrix<float> X = X_prev * W_prev.transpose();
  X.rowwise() += b_prev.transpose();
  Matrix<float> X_folded = X_prev * map.fold_into_previous_weight(W_prev).transpose();
  X_folded.rowwise() += map.fold_into_previous_bias(b_prev).transpose();
  EXPECT_LT(rel_error(X_folded, map.apply(X).cast<double>()), 1e-6);
}

TEST(ChannelMap, ApplyIsTheSameForAnyThreadCount) {
  ChannelMap<float> map(300);
  for (Index j = 0; j < 300; ++j) {
    if (j % 7 == 0) map.append_split(j, 3);
    else if (j % 7 == 1 && j + 1 < 300) map.append_merge(j, j + 1);
    else if (j % 7 != 2) map.append_copy(j);
  }
  const Matrix<float> X = test::random_matrix<float>(700, 300, 14);
  const int threads = num_threads();
  set_num_threads(1);
  const Matrix<float> one = map.apply(X);
  set_num_threads(2);
  const Matrix<float> two = map.apply(X);
  set_num_threads(threads);
  EXPECT_EQ(one, two);
}

TEST(ChannelMap, BytesCountOffsetsSourcesAndFactors) {
  const ChannelMap<float> map = mixed_map();
  // 12 offsets, 15 entries of a 4-byte source and a 4-byte factor.
  EXPECT_EQ(map.entry_count(), 15);
  EXPECT_EQ(map.bytes(), 12u * 4 + 15u * 8);
  EXPECT_EQ(ChannelMap<double>::identity(3).bytes(), 4u * 4 + 3u * 12);
}

TEST(ChannelMap, EqualityComparesEveryEntry) {
  EXPECT_EQ(mixed_map(), mixed_map());
  ChannelMap<float> other = mixed_map();
  other.append_copy(0);
  EXPECT_FALSE(other == mixed_map());
  EXPECT_FALSE(ChannelMap<float>::identity(4) == ChannelMap<float>());
}

TEST(ChannelMap, RejectsBadEntriesAndWidths) {
  EXPECT_THROW(ChannelMap<float>(-1), Error);
  ChannelMap<float> map(4);
  EXPECT_THROW(map.append_copy(4), Error);
  EXPECT_THROW(map.append_copy(-1), Error);
  EXPECT_THROW(map.append_split(0, 0), Error);
  EXPECT_THROW(map.append({}), Error) << "a channel needs an entry";
  try {
    map.append({{1, std::numeric_limits<float>::quiet_NaN()}});
    FAIL() << "NaN factor accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("source 1"), std::string::npos) << e.what();
  }
  EXPECT_EQ(map.channels(), 0) << "failed appends leave the map unchanged";
  ChannelMap<float> empty;
  EXPECT_THROW(empty.append_copy(0), Error) << "the identity has no width to append to";
  map.append_copy(2);
  EXPECT_THROW((void)map.entries(1), Error);
  try {
    (void)map.apply(Matrix<float>::Zero(3, 5));
    FAIL() << "width mismatch accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("5"), std::string::npos) << e.what();
  }
  EXPECT_THROW((void)map.fold_weight(Matrix<float>::Zero(3, 3)), Error);
  EXPECT_THROW((void)map.fold_into_previous_weight(Matrix<float>::Zero(5, 2)), Error);
  EXPECT_THROW((void)map.fold_into_previous_bias(Vector<float>::Zero(3)), Error);
}

}  // namespace
}  // namespace lowbit

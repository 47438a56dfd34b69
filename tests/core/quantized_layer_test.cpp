// QuantizedLayer: forward() as its definition spells it out (each part checked against a
// double reference built here), the equivalent transform's invariance, and argument checks.
#include "lowbit/core/quantized_layer.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <set>

#include "lowbit/quantizers/rtn.hpp"
#include "test_util.hpp"

namespace lowbit {
namespace {

using MatrixD = Matrix<double>;

double rel_error(const Matrix<float>& got, const MatrixD& want) {
  return (got.cast<double>() - want).norm() / want.norm();
}

QuantizedLayer<float> plain_layer(const Matrix<float>& W, int bits = 4, Index group = 32) {
  QuantizedLayer<float> layer;
  layer.weights = RTN<float>(QuantSpec{.bits = bits, .group_size = group}).quantize(W);
  return layer;
}

Vector<float> random_vector(Index n, std::uint64_t seed, double lo, double hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  Vector<float> v(n);
  for (Index i = 0; i < n; ++i) v(i) = static_cast<float>(dist(rng));
  return v;
}

TEST(QuantizedLayer, PlainForwardIsInputTimesDequantizedWeights) {
  const Matrix<float> W = test::random_matrix<float>(48, 96, 1, 0.05), X = test::random_matrix<float>(20, 96, 2);
  const QuantizedLayer<float> layer = plain_layer(W);
  const MatrixD want = X.cast<double>() * layer.weights.dequantize().cast<double>().transpose();
  EXPECT_LT(rel_error(layer.forward(X), want), 1e-6);
  EXPECT_EQ(layer.in_features(), 96);
  EXPECT_EQ(layer.out_features(), 48);
}

TEST(QuantizedLayer, UnitScaleAndZeroShiftAreTheIdentity) {
  const Matrix<float> W = test::random_matrix<float>(16, 64, 3, 0.05), X = test::random_matrix<float>(10, 64, 4);
  QuantizedLayer<float> with_transform = plain_layer(W);
  with_transform.input_transform = {Vector<float>::Ones(64), Vector<float>::Zero(64)};
  with_transform.activation = QuantSpec{.bits = 4, .group_size = 0};
  QuantizedLayer<float> without = plain_layer(W);
  without.activation = with_transform.activation;
  EXPECT_EQ(with_transform.input_transform.apply(X), X);
  EXPECT_EQ(with_transform.input_transform.fold_weight(W), W);
  EXPECT_EQ(with_transform.forward(X), without.forward(X));
}

TEST(QuantizedLayer, EquivalentTransformLeavesTheFloatOutputUnchanged) {
  // ((X - delta) / s) (W diag(s))^T + (b + W delta) = X W^T + b, to float rounding.
  const Index in = 256, out = 64;
  const Matrix<float> W = test::random_matrix<float>(out, in, 5, 0.02), X = test::random_matrix<float>(32, in, 6);
  const Vector<float> b = random_vector(out, 7, -1, 1);
  InputTransform<float> t{random_vector(in, 8, 0.1, 10), random_vector(in, 9, -2, 2)};
  const Vector<float> folded_bias = t.fold_bias(W, b);
  Matrix<float> Y = detail::dense_product<float>(t.apply(X), t.fold_weight(W).transpose());
  Y.rowwise() += folded_bias.transpose();
  MatrixD want = X.cast<double>() * W.cast<double>().transpose();
  want.rowwise() += b.cast<double>().transpose();
  EXPECT_LT(rel_error(Y, want), 1e-5);
  // Negative scales are as valid.
  t.scale = -t.scale;
  Matrix<float> Y_neg = detail::dense_product<float>(t.apply(X), t.fold_weight(W).transpose());
  Y_neg.rowwise() += t.fold_bias(W, b).transpose();
  EXPECT_LT(rel_error(Y_neg, want), 1e-5);
}

TEST(QuantizedLayer, ForwardAppliesTransformActivationQuantizationAndBias) {
  const Index in = 80, out = 24;
  const Matrix<float> W = test::random_matrix<float>(out, in, 10, 0.05), X = test::random_matrix<float>(12, in, 11);
  QuantizedLayer<float> layer = plain_layer(W, 3, 16);
  layer.input_transform = {random_vector(in, 12, 0.5, 2), random_vector(in, 13, -0.5, 0.5)};
  layer.activation = QuantSpec{.bits = 4, .group_size = 0};
  layer.bias = random_vector(out, 14, -1, 1);
  // Reference: transform, then per-token asymmetric 4-bit codes in double.
  MatrixD X_q(12, in);
  for (Index t = 0; t < 12; ++t) {
    Eigen::RowVectorXd x(in);
    for (Index j = 0; j < in; ++j)
      x(j) = (static_cast<double>(X(t, j)) - layer.input_transform.shift(j)) / layer.input_transform.scale(j);
    const double lo = std::min(x.minCoeff(), 0.0), hi = std::max(x.maxCoeff(), 0.0);
    const double h = (hi - lo) / 15, z = std::nearbyint(-lo / h);
    for (Index j = 0; j < in; ++j) X_q(t, j) = (std::clamp(std::nearbyint(x(j) / h + z), 0.0, 15.0) - z) * h;
    std::set<double> levels(X_q.row(t).data(), X_q.row(t).data() + in);
    EXPECT_LE(levels.size(), 16u);
  }
  MatrixD want = X_q * layer.weights.dequantize().cast<double>().transpose();
  want.rowwise() += layer.bias.cast<double>().transpose();
  EXPECT_LT(rel_error(layer.forward(X), want), 1e-5);
  EXPECT_LT(rel_error(layer.quantized_input(X), X_q), 1e-5);
}

TEST(QuantizedLayer, PerTokenGroupsQuantizeEachGroupOnItsOwn) {
  const Matrix<float> W = test::random_matrix<float>(8, 64, 15, 0.05);
  Matrix<float> X = test::random_matrix<float>(4, 64, 16);
  X.rightCols(32) *= 100.0f;  // the second half of each token is far larger
  QuantizedLayer<float> layer = plain_layer(W);
  layer.activation = QuantSpec{.bits = 4, .group_size = 32};
  const Matrix<float> grouped = layer.quantized_input(X);
  layer.activation->group_size = 0;
  const Matrix<float> whole = layer.quantized_input(X);
  // With its own range the small half keeps its detail; sharing the large range it does not.
  const double err_grouped = (grouped - X).leftCols(32).norm(), err_whole = (whole - X).leftCols(32).norm();
  EXPECT_LT(err_grouped * 10, err_whole);
}

TEST(QuantizedLayer, LowRankSideTermActsOnTheQuantizedInput) {
  const Index in = 64, out = 32, rank = 4;
  const Matrix<float> W = test::random_matrix<float>(out, in, 17, 0.05), X = test::random_matrix<float>(9, in, 18);
  QuantizedLayer<float> layer = plain_layer(W);
  layer.activation = QuantSpec{.bits = 8, .group_size = 0};
  layer.lowrank_a = test::random_matrix<float>(out, rank, 19, 0.1);
  layer.lowrank_b = test::random_matrix<float>(rank, in, 20, 0.1);
  EXPECT_EQ(layer.rank(), rank);
  const MatrixD X_q = layer.quantized_input(X).cast<double>();
  const MatrixD corrected = layer.weights.dequantize().cast<double>() +
                            layer.lowrank_a.cast<double>() * layer.lowrank_b.cast<double>();
  EXPECT_LT(rel_error(layer.forward(X), X_q * corrected.transpose()), 1e-6);
}

TEST(QuantizedLayer, ForwardIsBitIdenticalForAnyThreadCount) {
  const Matrix<float> W = test::random_matrix<float>(300, 512, 21, 0.05), X = test::random_matrix<float>(200, 512, 22);
  QuantizedLayer<float> layer = plain_layer(W);
  layer.input_transform = {random_vector(512, 23, 0.5, 2), random_vector(512, 24, -0.5, 0.5)};
  layer.activation = QuantSpec{.bits = 6, .group_size = 0};
  const int threads = num_threads();
  set_num_threads(1);
  const Matrix<float> one = layer.forward(X);
  set_num_threads(2);
  const Matrix<float> two = layer.forward(X);
  set_num_threads(threads);
  ASSERT_EQ(one.size(), two.size());
  EXPECT_EQ(std::memcmp(one.data(), two.data(), sizeof(float) * static_cast<std::size_t>(one.size())), 0);
}

TEST(QuantizedLayer, PackedBytesCountTheSideParameters) {
  const Matrix<float> W = test::random_matrix<float>(16, 64, 25, 0.05);
  QuantizedLayer<float> layer = plain_layer(W);
  const std::size_t base = layer.weights.packed_bytes();
  EXPECT_EQ(layer.packed_bytes(), base);
  layer.input_transform = {Vector<float>::Ones(64), Vector<float>::Zero(64)};
  layer.bias = Vector<float>::Zero(16);
  EXPECT_EQ(layer.packed_bytes(), base + (64 + 64 + 16) * sizeof(float));
}

// A layer with every part: channel map (a split and a copy), transform, activation
// quantization, low-rank term and bias.
QuantizedLayer<float> full_layer(bool quantize_activations) {
  const Index source = 40, in = 41, out = 24;
  QuantizedLayer<float> layer = plain_layer(test::random_matrix<float>(out, in, 30, 0.05), 4, 16);
  layer.channel_map = ChannelMap<float>(source);
  layer.channel_map.append_split(0, 2);
  for (Index s = 1; s < source; ++s) layer.channel_map.append_copy(s);
  layer.input_transform = {random_vector(in, 31, 0.5, 2.0), random_vector(in, 32, -0.2, 0.2)};
  if (quantize_activations) layer.activation = QuantSpec{.bits = 6, .group_size = 16};
  layer.lowrank_a = test::random_matrix<float>(out, 3, 33, 0.1);
  layer.lowrank_b = test::random_matrix<float>(3, in, 34, 0.1);
  layer.bias = random_vector(out, 35, -1, 1);
  layer.validate();
  return layer;
}

TEST(QuantizedLayer, OneTokenInputIsTheRowOfTheBatchInput) {
  for (bool quantize_activations : {false, true}) {
    const QuantizedLayer<float> layer = full_layer(quantize_activations);
    const Matrix<float> X = test::random_matrix<float>(5, layer.source_features(), 36);
    const Matrix<float> batch = layer.quantized_input(X);
    Vector<float> token(3);  // reused storage of another size
    for (Index t = 0; t < X.rows(); ++t) {
      layer.quantized_input(X.row(t).transpose(), token);
      ASSERT_EQ(token.size(), layer.in_features());
      EXPECT_EQ(token.transpose(), batch.row(t)) << "token " << t << " activations " << quantize_activations;
    }
  }
  const QuantizedLayer<float> layer = full_layer(false);
  Vector<float> out;
  EXPECT_THROW(layer.quantized_input(Vector<float>::Ones(layer.source_features() + 1), out), Error);
  Vector<float> nan_x = Vector<float>::Ones(layer.source_features());
  nan_x(7) = std::nanf("");
  EXPECT_THROW(layer.quantized_input(nan_x, out), Error);
  QuantizedLayer<float> bad = layer;
  bad.bias = Vector<float>::Ones(3);  // shapes are checked per token, values by validate()
  EXPECT_THROW(bad.quantized_input(Vector<float>::Ones(layer.source_features()), out), Error);
}

TEST(QuantizedLayer, RejectsBadLayersAndInputs) {
  const Matrix<float> W = test::random_matrix<float>(8, 32, 26, 0.05), X = test::random_matrix<float>(3, 32, 27);
  const QuantizedLayer<float> good = plain_layer(W);
  EXPECT_THROW((void)good.forward(Matrix<float>::Ones(3, 31)), Error);
  Matrix<float> nan_x = X;
  nan_x(1, 2) = std::nanf("");
  EXPECT_THROW((void)good.forward(nan_x), Error);
  auto expect_invalid = [&](auto&& edit) {
    QuantizedLayer<float> layer = good;
    edit(layer);
    EXPECT_THROW((void)layer.forward(X), Error);
  };
  expect_invalid([](auto& l) { l.input_transform.scale = Vector<float>::Ones(31); });
  expect_invalid([](auto& l) { l.input_transform.shift = Vector<float>::Ones(33); });
  expect_invalid([](auto& l) { l.input_transform.scale = Vector<float>::Zero(32); });
  expect_invalid([](auto& l) { l.bias = Vector<float>::Ones(7); });
  expect_invalid([](auto& l) { l.activation = QuantSpec{.bits = 9}; });
  expect_invalid([](auto& l) { l.activation = QuantSpec{.bits = 4, .symmetric = true}; });
  expect_invalid([](auto& l) {
    l.lowrank_a = Matrix<float>::Ones(8, 2);
    l.lowrank_b = Matrix<float>::Ones(3, 32);
  });
  expect_invalid([](auto& l) {
    l.lowrank_a = Matrix<float>::Ones(7, 2);
    l.lowrank_b = Matrix<float>::Ones(2, 32);
  });
  InputTransform<float> t{Vector<float>::Ones(4), {}};
  EXPECT_THROW((void)t.apply(X), Error);
  EXPECT_THROW((void)t.fold_bias(Matrix<float>::Ones(2, 4), Vector<float>::Ones(3)), Error);
}

}  // namespace
}  // namespace lowbit

// Linear: packed projections (plain, act-order permuted, and with a method's input
// transform) compute what their dequantized weights compute, one token or many.
#include "llama2c/linear.hpp"

#include <gtest/gtest.h>

#include <lowbit/quantizers/gptq.hpp>
#include <lowbit/quantizers/rtn.hpp>

#include <random>

#include "test_model.hpp"

namespace llama2c {
namespace {

float max_abs(const MatrixF& a) { return a.cwiseAbs().maxCoeff(); }

// Both apply paths of `linear` against Y = X W_hat^T computed densely.
void expect_matches_dense(const Linear& linear, const MatrixF& X, const MatrixF& expected, float tolerance) {
  MatrixF rows(X.rows(), linear.out_features());
  linear.apply_rows(X, rows);
  EXPECT_LT(max_abs(rows - expected), tolerance);
  VectorF y(linear.out_features());
  for (Index t = 0; t < X.rows(); ++t) {
    linear.apply_token(X.row(t).transpose(), y);
    EXPECT_LT(max_abs(y.transpose() - expected.row(t)), tolerance) << "token " << t;
  }
}

TEST(Linear, DenseIsPlainProduct) {
  std::mt19937 rng(1);
  const MatrixF W = test::random_matrix(20, 33, rng, 1.0f), X = test::random_matrix(5, 33, rng, 1.0f);
  const Linear linear(W);
  EXPECT_FALSE(linear.quantized());
  EXPECT_EQ(linear.packed(), nullptr);
  EXPECT_EQ(linear.bytes(), 20u * 33u * 4u);
  expect_matches_dense(linear, X, X * W.transpose(), 1e-5f);
}

// Ragged groups (172 = 2 * 64 + 44) and every bit width the evaluation uses.
TEST(Linear, PackedMatchesDequantizedWeights) {
  std::mt19937 rng(2);
  const MatrixF W = test::random_matrix(64, 172, rng, 0.1f), X = test::random_matrix(7, 172, rng, 1.0f);
  for (int bits : {2, 3, 4, 8}) {
    for (Index group : {32, 64}) {
      auto q = lowbit::RTN<float>(lowbit::QuantSpec{.bits = bits, .group_size = group}).quantize(W);
      const MatrixF W_hat = q.dequantize();
      const std::size_t bytes = q.packed_bytes();
      const Linear linear(std::move(q));
      EXPECT_TRUE(linear.quantized());
      ASSERT_NE(linear.packed(), nullptr);
      EXPECT_EQ(linear.bytes(), bytes);
      SCOPED_TRACE(::testing::Message() << bits << "-bit g" << group);
      expect_matches_dense(linear, X, X * W_hat.transpose(), 1e-4f);
    }
  }
}

TEST(Linear, ActOrderPermutationIsApplied) {
  std::mt19937 rng(3);
  const MatrixF W = test::random_matrix(32, 64, rng, 0.1f);
  MatrixF X = test::random_matrix(256, 64, rng, 1.0f);
  X.col(5) *= 20.0f;  // uneven diag(H) makes act-order permute
  lowbit::GPTQ<float> gptq(64, {.spec = {.bits = 4, .group_size = 32}, .act_order = true});
  gptq.add_batch(X);
  auto q = gptq.quantize(W);
  ASSERT_FALSE(q.permutation().empty());
  const MatrixF W_hat = q.dequantize();
  const MatrixF Xs = X.topRows(6);
  expect_matches_dense(Linear(std::move(q)), Xs, Xs * W_hat.transpose(), 1e-3f);
}

// A method's layer: input transform, bias and low-rank term all applied.
TEST(Linear, QuantizedLayerMatchesItsForward) {
  std::mt19937 rng(4);
  const MatrixF W = test::random_matrix(24, 40, rng, 0.1f), X = test::random_matrix(6, 40, rng, 1.0f);
  lowbit::QuantizedLayer<float> layer;
  layer.weights = lowbit::RTN<float>(lowbit::QuantSpec{.bits = 4, .group_size = 32}).quantize(W);
  layer.input_transform.scale = (test::random_matrix(40, 1, rng, 0.2f).array().abs() + 0.5f).matrix().reshaped();
  layer.input_transform.shift = test::random_matrix(40, 1, rng, 0.1f).reshaped();
  layer.bias = test::random_matrix(24, 1, rng, 0.1f).reshaped();
  layer.lowrank_a = test::random_matrix(24, 2, rng, 0.1f);
  layer.lowrank_b = test::random_matrix(2, 40, rng, 0.1f);
  const MatrixF expected = layer.forward(X);
  const std::size_t bytes = layer.packed_bytes();
  const Linear linear(std::move(layer));
  EXPECT_TRUE(linear.quantized());
  EXPECT_EQ(linear.bytes(), bytes);
  EXPECT_EQ(linear.in_features(), 40);
  EXPECT_EQ(linear.out_features(), 24);
  expect_matches_dense(linear, X, expected, 1e-4f);
}

// QLLM's channel disassembly: channel 0 split in two halves, its weight column repeated.
// The layer reads the original 40 channels and computes its own forward().
TEST(Linear, ChannelMapReadsTheOriginalChannels) {
  std::mt19937 rng(5);
  const MatrixF W = test::random_matrix(24, 40, rng, 0.1f), X = test::random_matrix(6, 40, rng, 1.0f);
  using Map = lowbit::ChannelMap<float>;
  Map map(40);
  const Map::Entry half{0, 0.5f};
  map.append(std::span(&half, 1));
  for (Index s = 1; s < 40; ++s) map.append_copy(s);
  map.append(std::span(&half, 1));
  MatrixF W_split(24, 41);
  W_split << W, W.col(0);
  lowbit::QuantizedLayer<float> layer;
  layer.weights = lowbit::RTN<float>(lowbit::QuantSpec{.bits = 4, .group_size = 32}).quantize(W_split);
  layer.channel_map = map;
  const MatrixF expected = layer.forward(X);
  const Linear linear(std::move(layer));
  EXPECT_EQ(linear.in_features(), 40);
  EXPECT_EQ(linear.out_features(), 24);
  expect_matches_dense(linear, X, expected, 1e-4f);
}

}  // namespace
}  // namespace llama2c

// gemv and matmul of a QuantizedLayer: the layer's forward() from packed weights, with
// every part (channel map, transform, activation quantization, low-rank term, bias).
#include "lowbit/kernels/layer_product.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "kernel_test_util.hpp"
#include "lowbit/quantizers/rtn.hpp"

namespace lowbit {
namespace {

QuantizedLayer<float> full_layer(Index source, Index out, bool quantize_activations, std::uint64_t seed) {
  const Index in = source + 1;  // channel 0 split in two
  QuantizedLayer<float> layer;
  layer.weights = RTN<float>(QuantSpec{.bits = 4, .group_size = 32}).quantize(test::random_matrix<float>(out, in, seed));
  layer.channel_map = ChannelMap<float>(source);
  layer.channel_map.append_split(0, 2);
  for (Index s = 1; s < source; ++s) layer.channel_map.append_copy(s);
  layer.input_transform = {(test::random_matrix<float>(in, 1, seed + 1).array().abs() + 0.5f).matrix(),
                           test::random_matrix<float>(in, 1, seed + 2) * 0.1f};
  if (quantize_activations) layer.activation = QuantSpec{.bits = 8, .group_size = 32};
  layer.lowrank_a = test::random_matrix<float>(out, 4, seed + 3) * 0.1f;
  layer.lowrank_b = test::random_matrix<float>(4, in, seed + 4) * 0.1f;
  layer.bias = test::random_matrix<float>(out, 1, seed + 5);
  layer.validate();
  return layer;
}

// |Y - forward(X)| within float rounding of the sums: the packed product sums in another
// order than forward()'s dense product.
void expect_matches_forward(const Matrix<float>& Y, const Matrix<float>& want, const std::string& what) {
  ASSERT_EQ(Y.rows(), want.rows());
  ASSERT_EQ(Y.cols(), want.cols());
  const double scale = want.cwiseAbs().maxCoeff() + 1.0;
  EXPECT_LT((Y - want).cwiseAbs().maxCoeff(), 1e-5 * scale) << what;
}

TEST(LayerProduct, GemvAndMatmulAreTheLayersForward) {
  test::ThreadScope single(1);
  for (const auto& [source, out] : {std::pair<Index, Index>{63, 64}, {171, 40}, {300, 9}})
    for (bool quantize_activations : {false, true}) {
      const QuantizedLayer<float> layer = full_layer(source, out, quantize_activations, 7);
      const Matrix<float> X = test::random_matrix<float>(6, source, 8);
      const Matrix<float> want = layer.forward(X);
      const std::string what = std::to_string(source) + "->" + std::to_string(out) + (quantize_activations ? " A8" : "");
      Matrix<float> Y(X.rows(), out);
      matmul(layer, X, Y);
      expect_matches_forward(Y, want, "matmul " + what);
      Matrix<float> rows(X.rows(), out);
      for (Index t = 0; t < X.rows(); ++t) {
        Vector<float> y(out);
        gemv(layer, X.row(t).transpose(), y);
        rows.row(t) = y.transpose();
      }
      expect_matches_forward(rows, want, "gemv " + what);
      // One token through matmul is that token's gemv.
      Matrix<float> one(1, out);
      matmul(layer, X.topRows(1), one);
      EXPECT_EQ(one.row(0), rows.row(0)) << what;
    }
}

TEST(LayerProduct, OutputMayAliasTheInput) {
  const QuantizedLayer<float> layer = full_layer(64, 64, false, 9);
  Vector<float> x = test::random_matrix<float>(64, 1, 10);
  Vector<float> y(64);
  gemv(layer, x, y);
  gemv(layer, x, x);
  EXPECT_EQ(x, y);
}

TEST(LayerProduct, APlainLayerIsItsPackedWeights) {
  QuantizedLayer<float> layer;  // no channel map, transform, side terms
  layer.weights = RTN<float>(QuantSpec{.bits = 3, .group_size = 64}).quantize(test::random_matrix<float>(70, 130, 12));
  const Vector<float> x = test::random_matrix<float>(130, 1, 13);
  Vector<float> via_layer(70), via_weights(70);
  gemv(layer, x, via_layer);
  gemv(layer.weights, x, via_weights);
  EXPECT_EQ(via_layer, via_weights);
}

TEST(LayerProduct, MatmulIsBitIdenticalForAnyThreadCount) {
  QuantizedLayer<float> layer = full_layer(300, 96, false, 14);
  layer.lowrank_a = test::random_matrix<float>(96, 64, 15) * 0.1f;  // a side term worth threading
  layer.lowrank_b = test::random_matrix<float>(64, 301, 16) * 0.1f;
  const Matrix<float> X = test::random_matrix<float>(256, 300, 17);
  Matrix<float> one(256, 96), two(256, 96);
  {
    test::ThreadScope threads(1);
    matmul(layer, X, one);
  }
  {
    test::ThreadScope threads(2);
    matmul(layer, X, two);
  }
  EXPECT_EQ(one, two);
}

// Parameter values are not checked per token up front, but a bad one never passes
// silently: it is named once the output comes out non-finite.
TEST(LayerProduct, BadParameterValuesAreNamedForOneTokenToo) {
  const QuantizedLayer<float> good = full_layer(40, 8, false, 18);
  const Vector<float> x = Vector<float>::Ones(40);
  Vector<float> y(8);
  Matrix<float> Y(1, 8);
  const auto expect_named = [&](const QuantizedLayer<float>& layer, const std::string& name) {
    try {
      gemv(layer, x, y);
      ADD_FAILURE() << "no error for " << name;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
    EXPECT_THROW(matmul(layer, x.transpose(), Y), Error) << name;
  };
  QuantizedLayer<float> bad = good;
  bad.bias(5) = std::nanf("");
  expect_named(bad, "QuantizedLayer.bias");
  bad = good;
  bad.input_transform.scale(2) = 0.0f;
  expect_named(bad, "InputTransform.scale");
  bad = good;
  bad.lowrank_a(1, 1) = std::numeric_limits<float>::infinity();
  expect_named(bad, "QuantizedLayer.lowrank_a");
}

TEST(LayerProduct, RejectsBadShapesAndInputs) {
  const QuantizedLayer<float> layer = full_layer(40, 8, false, 11);
  Vector<float> y(8), short_y(7);
  EXPECT_THROW(gemv(layer, Vector<float>::Ones(41), y), Error);  // reads 40 source channels
  EXPECT_THROW(gemv(layer, Vector<float>::Ones(40), short_y), Error);
  Vector<float> nan_x = Vector<float>::Ones(40);
  nan_x(3) = std::nanf("");
  EXPECT_THROW(gemv(layer, nan_x, y), Error);
  Matrix<float> Y(2, 8), bad_Y(2, 9);
  EXPECT_THROW(matmul(layer, Matrix<float>::Ones(2, 41), Y), Error);
  EXPECT_THROW(matmul(layer, Matrix<float>::Ones(2, 40), bad_Y), Error);
  QuantizedLayer<float> bad = layer;
  bad.lowrank_b = Matrix<float>::Ones(4, 3);
  EXPECT_THROW(gemv(bad, Vector<float>::Ones(40), y), Error);
  bad.lowrank_a = Matrix<float>(0, 2);  // rank 2 with no entries
  bad.lowrank_b = Matrix<float>(2, 0);
  EXPECT_THROW(gemv(bad, Vector<float>::Ones(40), y), Error);
}

}  // namespace
}  // namespace lowbit

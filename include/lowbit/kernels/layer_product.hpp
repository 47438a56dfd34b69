// y = layer(x) and Y = layer(X) for a QuantizedLayer straight from its packed weights:
// the layer's forward() through lowbit::gemv (decode) and lowbit::matmul (prefill)
// instead of a dequantized copy:
//   X_q = Q_a((X M - shift) / scale),   Y = X_q W_hat^T + (X_q B^T) A^T + bias
// (core/quantized_layer.hpp). The one-token gemv reuses per-thread buffers, so a decode
// step allocates nothing once warm (unless the layer quantizes activations), and checks
// shapes and x up front; the parameters' values (QuantizedLayer::validate(), O(their
// count)) are looked at only when the output comes out non-finite, so a bad parameter
// is still an Error naming it, never a silent NaN.
#pragma once

#include <cmath>
#include <type_traits>

#include "lowbit/core/error.hpp"
#include "lowbit/core/quantized_layer.hpp"
#include "lowbit/core/types.hpp"
#include "lowbit/kernels/gemv.hpp"
#include "lowbit/kernels/matmul.hpp"

namespace lowbit {

// y = layer(x): x [layer.source_features()], y [layer.out_features()]; y may alias x.
template <class T>
void gemv(const QuantizedLayer<T>& layer, const Eigen::Ref<const Vector<std::type_identity_t<T>>>& x,
          Eigen::Ref<Vector<std::type_identity_t<T>>> y) {
  detail::require(y.size() == layer.out_features(), "gemv: y has ", y.size(), " entries, the layer has ",
                  layer.out_features(), " outputs");
  thread_local Vector<T> input, projected;
  layer.quantized_input(x, input);  // reads x before y is written
  gemv(layer.weights, input, y);
  if (layer.rank() > 0) {
    projected.noalias() = layer.lowrank_b * input;
    y.noalias() += layer.lowrank_a * projected;
  }
  if (layer.bias.size() != 0) y += layer.bias;
  if (!std::isfinite(static_cast<double>(y.sum()))) {
    layer.validate();  // names a non-finite parameter
    detail::require_finite(y, "gemv: the layer's output y");
  }
}

// Y = layer(X): X [tokens, layer.source_features()], Y [tokens, layer.out_features()];
// one token is that token's gemv.
template <class T>
void matmul(const QuantizedLayer<T>& layer, const Eigen::Ref<const Matrix<std::type_identity_t<T>>>& X,
            Eigen::Ref<Matrix<std::type_identity_t<T>>> Y) {
  detail::require(Y.rows() == X.rows() && Y.cols() == layer.out_features(), "matmul: Y shape ", Y.rows(), "x",
                  Y.cols(), " != ", X.rows(), "x", layer.out_features(), " (tokens x layer outputs)");
  if (X.rows() == 1) {  // one token: gemv, side terms included
    auto y = Y.row(0).transpose();
    return gemv(layer, X.row(0).transpose(), y);
  }
  const Matrix<T> input = layer.quantized_input(X);
  matmul(layer.weights, input, Y);
  layer.add_side_terms(input, Y);
}

}  // namespace lowbit

// QuantizedLayer<T>: a quantized linear layer as calibrated methods (OmniQuant, QLLM)
// return it. The packed weights alone are not the layer when the method also changed
// the input (an equivalent transform, activation quantization) or added terms (bias
// fold, a low-rank correction); this struct holds all of it, and forward() is the
// quantized layer's output for any input:
//
//   X_m = X M                                     channel map (QLLM's reassembly), [tokens, in]
//   X' = (X_m - shift) / scale                   per input channel (input_transform)
//   X_q = Q_a(X')                                 per-token fake quantization (activation)
//   Y  = X_q W_hat^T + (X_q B^T) A^T + bias       W_hat = weights.dequantize()
#pragma once

#include <cmath>
#include <optional>
#include <vector>

#include "lowbit/core/channel_map.hpp"
#include "lowbit/core/dense_product.hpp"
#include "lowbit/core/error.hpp"
#include "lowbit/core/fake_quant.hpp"
#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/core/spec.hpp"
#include "lowbit/core/tensor.hpp"
#include "lowbit/core/types.hpp"

namespace lowbit {

// A per-input-channel affine change of variables, x' = (x - shift) / scale (OmniQuant's
// learnable equivalent transform). It leaves the float layer unchanged once folded:
//   ((X - shift) / scale) (W diag(scale))^T + (b + W shift) = X W^T + b.
// Empty vectors mean scale 1 / shift 0.
template <class T = float>
struct InputTransform {
  Vector<T> scale;
  Vector<T> shift;

  [[nodiscard]] bool empty() const { return scale.size() == 0 && shift.size() == 0; }

  void check_shapes(Index in_features) const {
    detail::require(scale.size() == 0 || scale.size() == in_features, "InputTransform.scale size ", scale.size(),
                    " != in_features ", in_features);
    detail::require(shift.size() == 0 || shift.size() == in_features, "InputTransform.shift size ", shift.size(),
                    " != in_features ", in_features);
  }

  // Shapes, then values: finite, and no zero scale.
  void validate(Index in_features) const {
    check_shapes(in_features);
    detail::require_finite(scale, "InputTransform.scale");
    detail::require_finite(shift, "InputTransform.shift");
    for (Index j = 0; j < scale.size(); ++j)
      detail::require(scale(j) != T(0), "InputTransform.scale(", j, ") = 0");
  }

  // X' = (X - shift) / scale, [tokens, in].
  [[nodiscard]] Matrix<T> apply(const Eigen::Ref<const Matrix<T>>& X) const {
    validate(X.cols());
    Matrix<T> out = X;
    if (shift.size() != 0) out.rowwise() -= shift.transpose();
    if (scale.size() != 0) out.array().rowwise() /= scale.transpose().array();
    return out;
  }

  // W' = W diag(scale), [out, in].
  [[nodiscard]] Matrix<T> fold_weight(const Eigen::Ref<const Matrix<T>>& W) const {
    validate(W.cols());
    Matrix<T> out = W;
    if (scale.size() != 0) out.array().rowwise() *= scale.transpose().array();
    return out;
  }

  // b' = b + W shift (an empty bias counts as 0), [out].
  [[nodiscard]] Vector<T> fold_bias(const Eigen::Ref<const Matrix<T>>& W, const Vector<T>& bias) const {
    validate(W.cols());
    detail::require(bias.size() == 0 || bias.size() == W.rows(), "bias size ", bias.size(), " != out_features ",
                    W.rows());
    Vector<T> out = bias.size() == 0 ? Vector<T>::Zero(W.rows()) : bias;
    if (shift.size() != 0) out.noalias() += W * shift;
    return out;
  }
};

// What training recorded.
struct TrainingHistory {
  std::vector<double> loss;  // training loss per epoch: the mean over the epoch's steps
};

template <class T = float>
struct QuantizedLayer {
  QuantizedMatrix<T> weights;               // [out, in], in the transformed coordinates
  ChannelMap<T> channel_map;                // applied to X before everything; empty: identity
  InputTransform<T> input_transform;        // applied after the channel map; empty: identity
  std::optional<QuantSpec> activation;      // Q_a: bits, group_size (0: whole token); asymmetric
  Vector<T> bias;                           // [out]; empty: none
  Matrix<T> lowrank_a;                      // [out, rank] side term; empty: none
  Matrix<T> lowrank_b;                      // [rank, in]
  TrainingHistory history;

  [[nodiscard]] Index out_features() const { return weights.rows(); }
  [[nodiscard]] Index in_features() const { return weights.cols(); }
  [[nodiscard]] Index rank() const { return lowrank_a.cols(); }

  // Columns of the input X the layer reads (before its channel map).
  [[nodiscard]] Index source_features() const {
    return channel_map.empty() ? in_features() : channel_map.source_channels();
  }

  // That the parts fit together: O(1), cheap enough for every decode step.
  void check_shapes() const {
    detail::require(channel_map.empty() || channel_map.channels() == in_features(), "QuantizedLayer.channel_map "
                    "makes ", channel_map.channels(), " channels, the weights have in_features ", in_features());
    input_transform.check_shapes(in_features());
    if (activation) {
      activation->validate();
      detail::require(!activation->symmetric, "QuantizedLayer.activation.symmetric = true: activation "
                                              "quantization is asymmetric");
    }
    detail::require(bias.size() == 0 || bias.size() == out_features(), "QuantizedLayer.bias size ", bias.size(),
                    " != out_features ", out_features());
    detail::require(lowrank_a.cols() == lowrank_b.rows(), "QuantizedLayer low-rank inner sizes ", lowrank_a.cols(),
                    " != ", lowrank_b.rows());
    if (rank() != 0 || lowrank_a.size() != 0 || lowrank_b.size() != 0) {
      detail::require(lowrank_a.rows() == out_features() && lowrank_b.cols() == in_features(),
                      "QuantizedLayer low-rank shapes ", lowrank_a.rows(), "x", lowrank_a.cols(), " and ",
                      lowrank_b.rows(), "x", lowrank_b.cols(), " do not fit ", out_features(), "x", in_features());
    }
  }

  // Shapes, then the parameters' values (finite, no zero transform scale): O(parameters).
  void validate() const {
    check_shapes();
    input_transform.validate(in_features());
    detail::require_finite(bias, "QuantizedLayer.bias");
    detail::require_finite(lowrank_a, "QuantizedLayer.lowrank_a");
    detail::require_finite(lowrank_b, "QuantizedLayer.lowrank_b");
  }

  // The layer's input after the transform and activation quantization: X_q [tokens, in].
  [[nodiscard]] Matrix<T> quantized_input(const Eigen::Ref<const Matrix<T>>& X) const {
    validate();
    const Index columns = source_features();
    detail::require(X.cols() == columns, "QuantizedLayer.forward: X has ", X.cols(), " columns, the layer reads ",
                    columns);
    detail::require_finite(X, "X");
    Matrix<T> input = channel_map.apply(X);
    if (!input_transform.empty()) input = input_transform.apply(input);
    if (activation) {
      Matrix<T> quantized(input.rows(), input.cols());
      GroupFakeQuantizer<T>(activation->bits, activation->group_size).forward(input, quantized);
      input.swap(quantized);
    }
    return input;
  }

  // quantized_input() of one token, x [source_features()], into `out` [in] (not x's
  // storage), whose storage is reused (no allocation once warm, unless activations are
  // quantized): the same arithmetic as that token's row of quantized_input(). Checks
  // shapes and x; the transform's values only if the result is not finite (a zero or
  // non-finite scale or shift is then an Error naming it).
  void quantized_input(const Eigen::Ref<const Vector<T>>& x, Vector<T>& out) const {
    check_shapes();
    detail::require(x.size() == source_features(), "QuantizedLayer: x has ", x.size(), " entries, the layer reads ",
                    source_features());
    detail::require_finite(x, "x");
    out.resize(in_features());
    if (channel_map.empty()) out = x;
    else channel_map.apply(x.data(), out.data());
    if (input_transform.shift.size() != 0) out -= input_transform.shift;
    if (input_transform.scale.size() != 0) out.array() /= input_transform.scale.array();
    if (!std::isfinite(static_cast<double>(out.sum()))) {
      input_transform.validate(in_features());
      detail::require_finite(out, "QuantizedLayer: transformed x");
    }
    if (activation) {
      const Matrix<T> row = out.transpose();
      Matrix<T> quantized(1, row.cols());
      GroupFakeQuantizer<T>(activation->bits, activation->group_size).forward(row, quantized);
      out = quantized.transpose();
    }
  }

  // Y [tokens, out] for X [tokens, in]; bit-identical for any thread count.
  [[nodiscard]] Matrix<T> forward(const Eigen::Ref<const Matrix<T>>& X) const {
    const Matrix<T> input = quantized_input(X);
    const Matrix<T> W_hat = weights.dequantize();
    Matrix<T> Y = detail::dense_product<T>(input, W_hat.transpose());
    add_side_terms(input, Y);
    return Y;
  }

  // Y += (X_q B^T) A^T + bias for X_q = quantized_input(X): what follows the weights'
  // product, bit-identical for any thread count (dense_product).
  void add_side_terms(const Matrix<T>& input, Eigen::Ref<Matrix<T>> Y) const {
    if (rank() > 0) {
      const Matrix<T> projected = detail::dense_product<T>(input, lowrank_b.transpose());
      Y += detail::dense_product<T>(projected, lowrank_a.transpose());
    }
    if (bias.size() != 0) Y.rowwise() += bias.transpose();
  }

  template <RowMajorTensor2 Tensor>
  [[nodiscard]] Matrix<T> forward(const Tensor& X) const {
    return forward(as_matrix(X));
  }

  // Bytes to store the layer: packed weights, the channel map, and its float side
  // parameters (transform, bias, low-rank factors) at sizeof(T) each.
  [[nodiscard]] std::size_t packed_bytes() const {
    const auto side = input_transform.scale.size() + input_transform.shift.size() + bias.size() + lowrank_a.size() +
                      lowrank_b.size();
    return weights.packed_bytes() + channel_map.bytes() + static_cast<std::size_t>(side) * sizeof(T);
  }
};

}  // namespace lowbit

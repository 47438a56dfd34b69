// Linear: one projection of the model, y = W x, held either as float weights or as
// lowbit's packed weights (a QuantizedMatrix, or a QuantizedLayer when the method also
// transforms the input). Decode runs y = W x per token (lowbit::gemv on packed
// weights); prefill runs Y = X W^T over a whole sequence (lowbit::matmul).
#pragma once

#include <lowbit/core/quantized_layer.hpp>
#include <lowbit/core/quantized_matrix.hpp>
#include <lowbit/kernels/gemv.hpp>
#include <lowbit/kernels/layer_product.hpp>
#include <lowbit/kernels/matmul.hpp>

#include <cstddef>
#include <utility>
#include <variant>

#include "llama2c/checkpoint.hpp"

namespace llama2c {

class Linear {
 public:
  using Packed = lowbit::QuantizedMatrix<float>;
  using Layer = lowbit::QuantizedLayer<float>;

  Linear() = default;
  explicit Linear(MatrixF weight) : weights_(std::move(weight)) {}
  explicit Linear(Packed packed) : weights_(std::move(packed)) {}
  explicit Linear(Layer layer) : weights_(std::move(layer)) {}

  [[nodiscard]] Index out_features() const { return std::visit([](const auto& w) { return rows(w); }, weights_); }
  [[nodiscard]] Index in_features() const { return std::visit([](const auto& w) { return cols(w); }, weights_); }
  [[nodiscard]] bool quantized() const { return !std::holds_alternative<MatrixF>(weights_); }

  // The float weights (nullptr when quantized).
  [[nodiscard]] const MatrixF* dense() const { return std::get_if<MatrixF>(&weights_); }
  // The packed weights (nullptr when float).
  [[nodiscard]] const Packed* packed() const {
    if (const auto* p = std::get_if<Packed>(&weights_)) return p;
    if (const auto* l = std::get_if<Layer>(&weights_)) return &l->weights;
    return nullptr;
  }

  // Bytes the layer is stored in: float32 weights, or the packed form with its side
  // parameters.
  [[nodiscard]] std::size_t bytes() const {
    if (const auto* w = dense()) return static_cast<std::size_t>(w->size()) * sizeof(float);
    if (const auto* l = std::get_if<Layer>(&weights_)) return l->packed_bytes();
    return std::get<Packed>(weights_).packed_bytes();
  }

  // y = W x for one token.
  void apply_token(const Eigen::Ref<const VectorF>& x, Eigen::Ref<VectorF> y) const {
    if (const auto* w = dense()) {
      y.noalias() = *w * x;
    } else if (const auto* p = std::get_if<Packed>(&weights_)) {
      lowbit::gemv(*p, x, y);
    } else {
      lowbit::gemv(std::get<Layer>(weights_), x, y);
    }
  }

  // Y = X W^T for X [tokens, in], Y [tokens, out].
  void apply_rows(const Eigen::Ref<const MatrixF>& X, Eigen::Ref<MatrixF> Y) const {
    if (const auto* w = dense()) {
      Y.noalias() = X * w->transpose();
    } else if (const auto* p = std::get_if<Packed>(&weights_)) {
      lowbit::matmul(*p, X, Y);
    } else {
      lowbit::matmul(std::get<Layer>(weights_), X, Y);  // input transform, packed weights, side terms
    }
  }

  [[nodiscard]] MatrixF operator()(const Eigen::Ref<const MatrixF>& X) const {
    MatrixF Y(X.rows(), out_features());
    apply_rows(X, Y);
    return Y;
  }

 private:
  static Index rows(const MatrixF& w) { return w.rows(); }
  static Index cols(const MatrixF& w) { return w.cols(); }
  static Index rows(const Packed& w) { return w.rows(); }
  static Index cols(const Packed& w) { return w.cols(); }
  static Index rows(const Layer& l) { return l.weights.rows(); }
  // A channel map (QLLM) reads the layer's original input channels.
  static Index cols(const Layer& l) { return l.channel_map.empty() ? l.weights.cols() : l.channel_map.source_channels(); }

  std::variant<MatrixF, Packed, Layer> weights_;
};

}  // namespace llama2c

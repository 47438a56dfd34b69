// Quantizing the whole model: every linear layer of every decoder layer, with any
// lowbit method, and for calibrated methods the calibration capture that feeds them.
//
// Calibration is true-sequential, as GPTQ does it for Llama: layer by layer, and within
// a layer in four groups, [wq, wk, wv], [wo], [w1, w3], [w2]. Each group's inputs are
// computed on the calibration sequences with everything before it already quantized
// (the earlier layers and the earlier groups of this layer), so each method corrects
// the errors the quantized model will really see. The embedding (shared with the
// classifier) and the norms stay float.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "llama2c/parallel.hpp"
#include "llama2c/text.hpp"
#include "llama2c/transformer.hpp"

namespace llama2c {

// How to quantize one linear layer: its float weights W [out, in] and, for a calibrated
// method, the layer's inputs on the calibration text X [tokens, in] (empty otherwise).
struct Method {
  std::string name;
  bool calibrated = false;
  std::function<Linear(const MatrixF& W, const MatrixF& X)> quantize;
};

// Sees every calibration batch before it is handed to the method (tests use it).
using InputObserver = std::function<void(int layer, std::string_view projection, const MatrixF& X)>;

struct QuantizedModel {
  Transformer model;
  double seconds = 0;  // wall time of calibration capture plus quantization
};

namespace detail {

// The rows of all matrices, stacked: [sum of rows, cols].
[[nodiscard]] inline MatrixF stack_rows(const std::vector<MatrixF>& parts) {
  Index rows = 0;
  for (const MatrixF& p : parts) rows += p.rows();
  MatrixF out(rows, parts.empty() ? 0 : parts.front().cols());
  Index at = 0;
  for (const MatrixF& p : parts) {
    out.middleRows(at, p.rows()) = p;
    at += p.rows();
  }
  return out;
}

// fn applied to each sequence's matrix, sequences in parallel.
template <class Fn>
[[nodiscard]] std::vector<MatrixF> map_each(const std::vector<MatrixF>& inputs, Fn&& fn) {
  std::vector<MatrixF> out(inputs.size());
  parallel_tasks(inputs.size(), [&](std::size_t i) { out[i] = fn(inputs[i]); });
  return out;
}

}  // namespace detail

// Quantizes every linear layer of `w` with `method`. Calibrated methods see the inputs
// `calibration` produces (true-sequential, see above); others never run the model.
[[nodiscard]] inline QuantizedModel quantize_model(const Weights& w, const Method& method,
                                                   const std::vector<Sequence>& calibration,
                                                   const InputObserver& observer = {}) {
  check(static_cast<bool>(method.quantize), "quantize_model: method '", method.name, "' has no quantize function");
  check(!method.calibrated || !calibration.empty(), "quantize_model: method '", method.name,
        "' needs calibration sequences and got none");
  const auto start = std::chrono::steady_clock::now();
  const Config& c = w.config;
  std::vector<Layer> layers = Transformer::float_layers(w);

  if (!method.calibrated) {
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const LayerWeights& f = w.layers[l];
      Layer& q = layers[l];
      const MatrixF none;
      q.wq = method.quantize(f.wq, none);
      q.wk = method.quantize(f.wk, none);
      q.wv = method.quantize(f.wv, none);
      q.wo = method.quantize(f.wo, none);
      q.w1 = method.quantize(f.w1, none);
      q.w3 = method.quantize(f.w3, none);
      q.w2 = method.quantize(f.w2, none);
    }
  } else {
    const Transformer float_model(w);
    const Rope& rope = float_model.rope();
    std::vector<MatrixF> hidden;  // per sequence, the input of the current layer
    for (const Sequence& s : calibration) hidden.push_back(float_model.embed(s));

    for (std::size_t l = 0; l < layers.size(); ++l) {
      const LayerWeights& f = w.layers[l];
      Layer& q = layers[l];
      const int layer_index = static_cast<int>(l);
      const auto quantize = [&](const char* name, const MatrixF& W, const MatrixF& X) {
        if (observer) observer(layer_index, name, X);
        return method.quantize(W, X);
      };

      // [wq, wk, wv] read the normalized residual stream.
      const std::vector<MatrixF> attn_in =
          detail::map_each(hidden, [&](const MatrixF& h) { return stages::rmsnorm(h, q.rms_att); });
      const MatrixF X_attn = detail::stack_rows(attn_in);
      q.wq = quantize("wq", f.wq, X_attn);
      q.wk = quantize("wk", f.wk, X_attn);
      q.wv = quantize("wv", f.wv, X_attn);

      // [wo] reads the attention output of the quantized q, k, v.
      const std::vector<MatrixF> mixed =
          detail::map_each(attn_in, [&](const MatrixF& x) { return stages::attention_mix(c, rope, q, x); });
      q.wo = quantize("wo", f.wo, detail::stack_rows(mixed));
      parallel_tasks(hidden.size(), [&](std::size_t i) { hidden[i] += q.wo(mixed[i]); });

      // [w1, w3] read the normalized stream after the quantized attention block.
      const std::vector<MatrixF> ffn_in =
          detail::map_each(hidden, [&](const MatrixF& h) { return stages::rmsnorm(h, q.rms_ffn); });
      const MatrixF X_ffn = detail::stack_rows(ffn_in);
      q.w1 = quantize("w1", f.w1, X_ffn);
      q.w3 = quantize("w3", f.w3, X_ffn);

      // [w2] reads silu(w1 x) * w3 x of the quantized w1, w3.
      const std::vector<MatrixF> ffn_hidden =
          detail::map_each(ffn_in, [&](const MatrixF& x) { return stages::ffn_hidden(q, x); });
      q.w2 = quantize("w2", f.w2, detail::stack_rows(ffn_hidden));
      parallel_tasks(hidden.size(), [&](std::size_t i) { hidden[i] += q.w2(ffn_hidden[i]); });
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return {Transformer(w, std::move(layers)), seconds};
}

}  // namespace llama2c

// The Llama forward pass of llama2.c, on float or packed linear layers.
//
//   h = embedding[token]
//   per layer:  x = rmsnorm(h) * rms_att                      rmsnorm(v) = v / sqrt(mean(v^2) + 1e-5)
//               q, k, v = wq x, wk x, wv x;  RoPE on q, k      pairs (2i, 2i+1) of each head turned
//                                                              by position * 10000^(-2i / head_size)
//               a = softmax(q k^T / sqrt(head_size), causal) v  query head h reads kv head
//                                                              h / (n_heads / n_kv_heads)
//               h += wo a
//               x = rmsnorm(h) * rms_ffn;  h += w2 (silu(w1 x) * w3 x)
//   logits = output · (rmsnorm(h) * rms_final)
//
// Two ways to run it: forward() takes a whole sequence at once (prefill: every
// projection is one Y = X W^T), Session::step() one token at a time with a KV cache
// (decode: every projection is one y = W x). Both produce the same logits up to float
// rounding. The block's stages are free functions so that calibration (quantize.hpp)
// can run them with some projections already quantized.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <utility>
#include <vector>

#include "llama2c/checkpoint.hpp"
#include "llama2c/linear.hpp"

namespace llama2c {

inline constexpr float kNormEps = 1e-5f;

// One decoder layer with its projections as Linear (float or packed).
struct Layer {
  VectorF rms_att, rms_ffn;
  Linear wq, wk, wv, wo, w1, w2, w3;

  // The projections by name, in execution order.
  template <class Fn>
  void for_each_linear(Fn&& fn) const {
    for (auto [name, linear] : {std::pair{"wq", &wq}, {"wk", &wk}, {"wv", &wv}, {"wo", &wo}, {"w1", &w1},
                                {"w3", &w3}, {"w2", &w2}})
      fn(name, *linear);
  }
};

// cos / sin of position * 10000^(-2i / head_size), [seq_len, head_size / 2] each.
struct Rope {
  MatrixF cos, sin;

  explicit Rope(const Config& c) : cos(c.seq_len, c.head_size() / 2), sin(c.seq_len, c.head_size() / 2) {
    for (Index pos = 0; pos < cos.rows(); ++pos)
      for (Index i = 0; i < cos.cols(); ++i) {
        const double angle = static_cast<double>(pos) * std::pow(10000.0, -2.0 * static_cast<double>(i) / c.head_size());
        cos(pos, i) = static_cast<float>(std::cos(angle));
        sin(pos, i) = static_cast<float>(std::sin(angle));
      }
  }

  // Rotates the pairs of every head of one token's q or k (`size` floats) at `position`.
  void rotate(float* v, Index size, Index position, Index head_size) const {
    for (Index j = 0; j < size; j += 2) {
      const Index i = (j % head_size) / 2;
      const float c = cos(position, i), s = sin(position, i), a = v[j], b = v[j + 1];
      v[j] = a * c - b * s;
      v[j + 1] = a * s + b * c;
    }
  }
};

namespace stages {

// s = softmax(scale * s) over s[0, n), in place; plain loops, as every attention row of
// prefill and decode goes through here.
inline void softmax(float* s, Index n, float scale) {
  float max = -std::numeric_limits<float>::infinity();
  for (Index i = 0; i < n; ++i) {
    s[i] *= scale;
    max = std::max(max, s[i]);
  }
  float sum = 0;
  for (Index i = 0; i < n; ++i) {
    s[i] = std::exp(s[i] - max);
    sum += s[i];
  }
  for (Index i = 0; i < n; ++i) s[i] /= sum;
}

// Each row of X normalized to unit root-mean-square, then scaled by `weight`.
inline MatrixF rmsnorm(const Eigen::Ref<const MatrixF>& X, const VectorF& weight) {
  MatrixF out(X.rows(), X.cols());
  for (Index t = 0; t < X.rows(); ++t) {
    const float inv = 1.0f / std::sqrt(X.row(t).squaredNorm() / static_cast<float>(X.cols()) + kNormEps);
    out.row(t) = (X.row(t).array() * inv) * weight.transpose().array();
  }
  return out;
}

// silu(a) * b elementwise, silu(a) = a / (1 + e^-a).
inline MatrixF swiglu(const MatrixF& gate, const MatrixF& up) {
  return (gate.array() / (1.0f + (-gate.array()).exp()) * up.array()).matrix();
}

// Causal multi-head attention over a whole sequence: Q [T, dim] (already rotated),
// K, V [T, kv_dim]; returns the heads' outputs side by side, [T, dim]. Queries go in
// blocks that only meet the keys at or before their last position, so little of the
// masked upper triangle is computed.
inline MatrixF attention(const Config& c, const MatrixF& Q, const MatrixF& K, const MatrixF& V) {
  constexpr Index kQueryBlock = 32;
  const Index T = Q.rows(), hs = c.head_size(), group = c.n_heads / c.n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  MatrixF out(T, c.dim);
  MatrixF scores;
  for (Index h = 0; h < c.n_heads; ++h) {
    const Index kv = h / group;
    for (Index first = 0; first < T; first += kQueryBlock) {
      const Index rows = std::min(kQueryBlock, T - first), keys = first + rows;
      scores.noalias() = Q.block(first, h * hs, rows, hs) * K.block(0, kv * hs, keys, hs).transpose();
      for (Index r = 0; r < rows; ++r) {
        const Index visible = first + r + 1;
        softmax(scores.row(r).data(), visible, scale);
        scores.row(r).tail(keys - visible).setZero();
      }
      out.block(first, h * hs, rows, hs).noalias() = scores * V.block(0, kv * hs, keys, hs);
    }
  }
  return out;
}

// The attention block's input to wo: projections, RoPE from position 0, attention.
inline MatrixF attention_mix(const Config& c, const Rope& rope, const Layer& layer, const MatrixF& x) {
  MatrixF Q = layer.wq(x), K = layer.wk(x);
  const MatrixF V = layer.wv(x);
  for (Index t = 0; t < x.rows(); ++t) {
    rope.rotate(Q.row(t).data(), Q.cols(), t, c.head_size());
    rope.rotate(K.row(t).data(), K.cols(), t, c.head_size());
  }
  return attention(c, Q, K, V);
}

// The feed-forward block's input to w2.
inline MatrixF ffn_hidden(const Layer& layer, const MatrixF& x) { return swiglu(layer.w1(x), layer.w3(x)); }

// h after one whole decoder layer.
inline void decoder_layer(const Config& c, const Rope& rope, const Layer& layer, MatrixF& h) {
  h += layer.wo(attention_mix(c, rope, layer, rmsnorm(h, layer.rms_att)));
  h += layer.w2(ffn_hidden(layer, rmsnorm(h, layer.rms_ffn)));
}

}  // namespace stages

class Transformer {
 public:
  // The float model.
  explicit Transformer(const Weights& w) : Transformer(w, float_layers(w)) {}

  // The model with the given layers (same shapes as w's), norms and embedding from w.
  Transformer(const Weights& w, std::vector<Layer> layers)
      : config_(w.config), embedding_(w.token_embedding), output_(w.output()), rms_final_(w.rms_final),
        layers_(std::move(layers)), rope_(w.config) {
    check(static_cast<int>(layers_.size()) == config_.n_layers, "Transformer: ", layers_.size(),
          " layers given, the config has ", config_.n_layers);
    const Index dim = config_.dim, kv = config_.kv_dim(), hidden = config_.hidden_dim;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Layer& layer = layers_[l];
      const std::pair<Index, Index> shapes[] = {{dim, dim}, {kv, dim}, {kv, dim}, {dim, dim},
                                                {hidden, dim}, {hidden, dim}, {dim, hidden}};
      int k = 0;
      layer.for_each_linear([&](const char* name, const Linear& linear) {
        check(linear.out_features() == shapes[k].first && linear.in_features() == shapes[k].second, "Transformer: layer ",
              l, " ", name, " is ", linear.out_features(), "x", linear.in_features(), ", expected ", shapes[k].first, "x",
              shapes[k].second);
        ++k;
      });
      check(layer.rms_att.size() == dim && layer.rms_ffn.size() == dim, "Transformer: layer ", l, " norm sizes ",
            layer.rms_att.size(), ", ", layer.rms_ffn.size(), " != dim ", dim);
    }
  }

  static std::vector<Layer> float_layers(const Weights& w) {
    std::vector<Layer> layers;
    for (const LayerWeights& lw : w.layers)
      layers.push_back({lw.rms_att, lw.rms_ffn, Linear(lw.wq), Linear(lw.wk), Linear(lw.wv), Linear(lw.wo),
                        Linear(lw.w1), Linear(lw.w2), Linear(lw.w3)});
    return layers;
  }

  [[nodiscard]] const Config& config() const { return config_; }
  [[nodiscard]] const std::vector<Layer>& layers() const { return layers_; }
  [[nodiscard]] const Rope& rope() const { return rope_; }

  // Bytes and weight count of the linear layers (the embedding, shared with the
  // classifier, and the norms stay float and are not counted).
  [[nodiscard]] std::size_t linear_bytes() const {
    std::size_t bytes = 0;
    for (const Layer& layer : layers_) layer.for_each_linear([&](const char*, const Linear& l) { bytes += l.bytes(); });
    return bytes;
  }
  [[nodiscard]] Index linear_weights() const {
    Index count = 0;
    for (const Layer& layer : layers_)
      layer.for_each_linear([&](const char*, const Linear& l) { count += l.out_features() * l.in_features(); });
    return count;
  }

  // Hidden states entering the first layer: the tokens' embeddings, [T, dim].
  [[nodiscard]] MatrixF embed(std::span<const int> tokens) const {
    check(!tokens.empty() && static_cast<int>(tokens.size()) <= config_.seq_len, "forward: ", tokens.size(),
          " tokens, expected 1..seq_len ", config_.seq_len);
    MatrixF h(static_cast<Index>(tokens.size()), config_.dim);
    for (std::size_t t = 0; t < tokens.size(); ++t) {
      check(tokens[t] >= 0 && tokens[t] < config_.vocab_size, "forward: token ", tokens[t], " at position ", t,
            " is outside 0..", config_.vocab_size - 1);
      h.row(static_cast<Index>(t)) = embedding_.row(tokens[t]);
    }
    return h;
  }

  // Logits [T, vocab] of every position of a sequence (prefill).
  [[nodiscard]] MatrixF forward(std::span<const int> tokens) const {
    MatrixF h = embed(tokens);
    for (const Layer& layer : layers_) stages::decoder_layer(config_, rope_, layer, h);
    return stages::rmsnorm(h, rms_final_) * output_.transpose();
  }

  // Token-by-token decoding with a KV cache; buffers are allocated once.
  class Session {
   public:
    explicit Session(const Transformer& model) : model_(&model) {
      const Config& c = model.config_;
      const Index layers = c.n_layers, kv = c.kv_dim();
      keys_.assign(static_cast<std::size_t>(layers), MatrixF(c.seq_len, kv));
      values_.assign(static_cast<std::size_t>(layers), MatrixF(c.seq_len, kv));
      h_.resize(c.dim);
      x_.resize(c.dim);
      q_.resize(c.dim);
      att_.resize(c.dim);
      proj_.resize(c.dim);
      k_.resize(kv);
      v_.resize(kv);
      gate_.resize(c.hidden_dim);
      up_.resize(c.hidden_dim);
      scores_.resize(c.seq_len);
      logits_.resize(c.vocab_size);
    }

    [[nodiscard]] Index position() const { return position_; }
    void reset() { position_ = 0; }

    // Feeds `token` at the next position; returns the logits for the position after it.
    const VectorF& step(int token) {
      const Transformer& m = *model_;
      const Config& c = m.config_;
      check(position_ < c.seq_len, "Session::step: position ", position_, " reached seq_len ", c.seq_len);
      check(token >= 0 && token < c.vocab_size, "Session::step: token ", token, " is outside 0..", c.vocab_size - 1);
      const Index hs = c.head_size(), group = c.n_heads / c.n_kv_heads, pos = position_;
      const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
      h_ = m.embedding_.row(token).transpose();
      for (std::size_t l = 0; l < m.layers_.size(); ++l) {
        const Layer& layer = m.layers_[l];
        normalize(h_, layer.rms_att);
        layer.wq.apply_token(x_, q_);
        layer.wk.apply_token(x_, k_);
        layer.wv.apply_token(x_, v_);
        m.rope_.rotate(q_.data(), q_.size(), pos, hs);
        m.rope_.rotate(k_.data(), k_.size(), pos, hs);
        keys_[l].row(pos) = k_.transpose();
        values_[l].row(pos) = v_.transpose();
        for (Index h = 0; h < c.n_heads; ++h) {
          const Index kv = h / group;
          auto scores = scores_.head(pos + 1);
          scores.noalias() = keys_[l].block(0, kv * hs, pos + 1, hs) * q_.segment(h * hs, hs);
          stages::softmax(scores.data(), pos + 1, scale);
          att_.segment(h * hs, hs).noalias() = values_[l].block(0, kv * hs, pos + 1, hs).transpose() * scores;
        }
        layer.wo.apply_token(att_, proj_);
        h_ += proj_;
        normalize(h_, layer.rms_ffn);
        layer.w1.apply_token(x_, gate_);
        layer.w3.apply_token(x_, up_);
        gate_ = (gate_.array() / (1.0f + (-gate_.array()).exp()) * up_.array()).matrix();
        layer.w2.apply_token(gate_, proj_);
        h_ += proj_;
      }
      normalize(h_, m.rms_final_);
      logits_.noalias() = m.output_ * x_;
      ++position_;
      return logits_;
    }

   private:
    // x_ = rmsnorm(v) * weight.
    void normalize(const VectorF& v, const VectorF& weight) {
      const float inv = 1.0f / std::sqrt(v.squaredNorm() / static_cast<float>(v.size()) + kNormEps);
      x_ = (v.array() * inv * weight.array()).matrix();
    }

    const Transformer* model_;
    std::vector<MatrixF> keys_, values_;  // [seq_len, kv_dim] per layer
    VectorF h_, x_, q_, k_, v_, att_, proj_, gate_, up_, scores_, logits_;
    Index position_ = 0;
  };

  [[nodiscard]] Session session() const { return Session(*this); }

 private:
  Config config_;
  MatrixF embedding_, output_;
  VectorF rms_final_;
  std::vector<Layer> layers_;
  Rope rope_;
};

}  // namespace llama2c

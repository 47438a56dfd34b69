// Shared by the llama2c tests: the real model (loaded once, for the *OnModel suites),
// its reference figures, and small random models for everything else.
#pragma once

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "llama2c/checkpoint.hpp"
#include "llama2c/model_files.hpp"
#include "llama2c/text.hpp"
#include "llama2c/tokenizer.hpp"

namespace llama2c::test {

// The engine runs Eigen's products on one thread (lowbit's kernels bring their own
// threading); on a shared 2-core machine Eigen's OpenMP GEMM is much slower than that.
inline const bool kEigenSingleThreaded = (Eigen::setNbThreads(1), true);

inline ModelFiles model_files() { return ModelFiles::in(model_dir(LLAMA2C_MODEL_DIR)); }

struct RealModel {
  Weights weights;
  Tokenizer tokenizer;
  std::vector<std::string> lines;
  nlohmann::json reference;
};

inline const RealModel& real_model() {
  static const RealModel model = [] {
    const ModelFiles files = model_files();
    RealModel m;
    m.weights = load_checkpoint(files.checkpoint);
    m.tokenizer = Tokenizer::load(files.tokenizer, m.weights.config.vocab_size);
    m.lines = read_lines(files.text);
    std::ifstream in(files.reference);
    m.reference = nlohmann::json::parse(in);
    return m;
  }();
  return model;
}

inline MatrixF random_matrix(Index rows, Index cols, std::mt19937& rng, float stddev) {
  std::normal_distribution<float> dist(0.0f, stddev);
  MatrixF m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

// A random model of the given shape with weights scaled like a trained one's
// (std 1/sqrt(in) per projection, norms near 1).
inline Weights random_weights(const Config& c, unsigned seed) {
  std::mt19937 rng(seed);
  Weights w;
  w.config = c;
  const Index dim = c.dim, kv = c.kv_dim(), hidden = c.hidden_dim;
  const float s_dim = 1.0f / std::sqrt(static_cast<float>(dim)), s_hidden = 1.0f / std::sqrt(static_cast<float>(hidden));
  const auto norm = [&] {
    VectorF v = random_matrix(dim, 1, rng, 0.1f).reshaped();
    return VectorF((v.array() + 1.0f).matrix());
  };
  w.token_embedding = random_matrix(c.vocab_size, dim, rng, 1.0f);
  for (int l = 0; l < c.n_layers; ++l) {
    LayerWeights lw;
    lw.rms_att = norm();
    lw.rms_ffn = norm();
    lw.wq = random_matrix(dim, dim, rng, s_dim);
    lw.wk = random_matrix(kv, dim, rng, s_dim);
    lw.wv = random_matrix(kv, dim, rng, s_dim);
    lw.wo = random_matrix(dim, dim, rng, s_dim);
    lw.w1 = random_matrix(hidden, dim, rng, s_dim);
    lw.w2 = random_matrix(dim, hidden, rng, s_hidden);
    lw.w3 = random_matrix(hidden, dim, rng, s_dim);
    w.layers.push_back(std::move(lw));
  }
  w.rms_final = norm();
  if (!c.shared_classifier) w.classifier = random_matrix(c.vocab_size, dim, rng, s_dim);
  return w;
}

// A small model with the real one's structure (grouped KV heads, ragged hidden size).
inline Config small_config(bool shared_classifier = true) {
  return {.dim = 32, .hidden_dim = 44, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .vocab_size = 300,
          .seq_len = 64, .shared_classifier = shared_classifier};
}

inline std::vector<Sequence> random_sequences(int count, int length, int vocab, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> token(3, vocab - 1);
  std::vector<Sequence> out;
  for (int i = 0; i < count; ++i) {
    Sequence s{Tokenizer::kBos};
    while (static_cast<int>(s.size()) < length) s.push_back(token(rng));
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace llama2c::test

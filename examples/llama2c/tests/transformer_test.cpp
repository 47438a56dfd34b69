// The float forward pass: against the independent float64 reference figures of the real
// model, and prefill against decode on random models.
#include "llama2c/transformer.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "llama2c/metrics.hpp"
#include "test_model.hpp"

namespace llama2c {
namespace {

TEST(TransformerOnModel, FirstLineNllMatchesReference) {
  const auto& m = test::real_model();
  const Transformer model(m.weights);
  const std::vector<int> tokens = m.reference["first_line_tokens_128"].get<std::vector<int>>();
  const Scores s = score_logits(tokens, model.forward(tokens));
  EXPECT_EQ(s.count, 127);
  EXPECT_NEAR(s.mean_nll(), m.reference["first_line_128_mean_nll"].get<double>(), 1e-4);
}

TEST(TransformerOnModel, BosTopFiveLogitsMatchReference) {
  const auto& m = test::real_model();
  const Transformer model(m.weights);
  const std::vector<int> bos{Tokenizer::kBos};
  const MatrixF logits = model.forward(bos);
  std::vector<int> order(static_cast<std::size_t>(logits.cols()));
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + 5, order.end(),
                    [&](int a, int b) { return logits(0, a) > logits(0, b); });
  const auto& top5 = m.reference["bos_logits_top5"];
  ASSERT_EQ(top5.size(), 5u);
  for (std::size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(order[i], top5[i][0].get<int>()) << "rank " << i;
    EXPECT_NEAR(logits(0, order[i]), top5[i][1].get<double>(), 1e-3) << "rank " << i;
  }
}

// Perplexity 5.1747 over the whole text, each line with BOS, cut to 512 tokens.
TEST(TransformerOnModel, WholeTextPerplexityMatchesReference) {
  const auto& m = test::real_model();
  const Transformer model(m.weights);
  const auto sequences = encode_lines(m.tokenizer, m.lines, m.weights.config.seq_len);
  EXPECT_EQ(sequences.size(), m.reference["eval_lines"].get<std::size_t>());
  const Scores s = evaluate(model, sequences);
  EXPECT_EQ(s.count, m.reference["eval_tokens_scored"].get<Index>());
  EXPECT_NEAR(s.mean_nll(), m.reference["eval_mean_nll"].get<double>(), 1e-4);
  EXPECT_NEAR(s.perplexity(), m.reference["eval_ppl"].get<double>(), 1e-3);
}

TEST(TransformerOnModel, DecodeMatchesPrefill) {
  const auto& m = test::real_model();
  const Transformer model(m.weights);
  std::vector<int> tokens = m.reference["first_line_tokens_128"].get<std::vector<int>>();
  tokens.resize(48);
  const MatrixF prefill = model.forward(tokens);
  auto session = model.session();
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    const VectorF& logits = session.step(tokens[t]);
    EXPECT_LT((logits.transpose() - prefill.row(static_cast<Index>(t))).cwiseAbs().maxCoeff(), 1e-4f) << "position " << t;
  }
}

TEST(Transformer, DecodeMatchesPrefillOnRandomModels) {
  for (bool shared : {true, false}) {
    const Weights w = test::random_weights(test::small_config(shared), 7);
    const Transformer model(w);
    const auto sequences = test::random_sequences(1, 40, w.config.vocab_size, 3);
    const MatrixF prefill = model.forward(sequences[0]);
    auto session = model.session();
    for (std::size_t t = 0; t < sequences[0].size(); ++t) {
      const VectorF& logits = session.step(sequences[0][t]);
      EXPECT_LT((logits.transpose() - prefill.row(static_cast<Index>(t))).cwiseAbs().maxCoeff(), 1e-4f)
          << "position " << t << " shared " << shared;
    }
    EXPECT_EQ(session.position(), 40);
    session.reset();
    EXPECT_LT((session.step(sequences[0][0]).transpose() - prefill.row(0)).cwiseAbs().maxCoeff(), 1e-4f);
  }
}

// Causality: the logits of a prefix do not depend on the tokens after it.
TEST(Transformer, PrefixLogitsIgnoreLaterTokens) {
  const Weights w = test::random_weights(test::small_config(), 11);
  const Transformer model(w);
  auto a = test::random_sequences(1, 30, w.config.vocab_size, 5)[0];
  auto b = a;
  b[20] = (b[20] + 1) % w.config.vocab_size;
  const MatrixF la = model.forward(a), lb = model.forward(b);
  EXPECT_LT((la.topRows(20) - lb.topRows(20)).cwiseAbs().maxCoeff(), 1e-6f);
  EXPECT_GT((la.row(20) - lb.row(20)).cwiseAbs().maxCoeff(), 1e-3f);
}

// The rotation of RoPE keeps each pair's length, and is the identity at position 0.
TEST(Transformer, RopeRotatesPairs) {
  const Config c = test::small_config();
  const Rope rope(c);
  std::vector<float> v(static_cast<std::size_t>(c.dim));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = 0.1f * static_cast<float>(i) - 1.0f;
  auto at0 = v;
  rope.rotate(at0.data(), c.dim, 0, c.head_size());
  EXPECT_EQ(at0, v);
  auto at5 = v;
  rope.rotate(at5.data(), c.dim, 5, c.head_size());
  for (std::size_t j = 0; j < v.size(); j += 2) {
    // Pair i of a head turns by 5 * 10000^(-2i / head_size).
    const double i = static_cast<double>((j % static_cast<std::size_t>(c.head_size())) / 2);
    const double angle = 5.0 * std::pow(10000.0, -2.0 * i / c.head_size());
    EXPECT_NEAR(at5[j], v[j] * std::cos(angle) - v[j + 1] * std::sin(angle), 1e-5);
    EXPECT_NEAR(at5[j + 1], v[j] * std::sin(angle) + v[j + 1] * std::cos(angle), 1e-5);
  }
}

TEST(Transformer, RefusesBadInput) {
  const Weights w = test::random_weights(test::small_config(), 1);
  const Transformer model(w);
  EXPECT_THROW((void)model.forward(std::vector<int>{}), lowbit::Error);
  EXPECT_THROW((void)model.forward(std::vector<int>{1, w.config.vocab_size}), lowbit::Error);
  EXPECT_THROW((void)model.forward(std::vector<int>(static_cast<std::size_t>(w.config.seq_len + 1), 1)), lowbit::Error);
  auto session = model.session();
  EXPECT_THROW((void)session.step(-1), lowbit::Error);
  for (int t = 0; t < w.config.seq_len; ++t) (void)session.step(1);
  EXPECT_THROW((void)session.step(1), lowbit::Error);

  auto layers = Transformer::float_layers(w);
  layers[1].w2 = Linear(MatrixF(w.config.dim, w.config.hidden_dim + 1));
  EXPECT_THROW(Transformer(w, layers), lowbit::Error);
  layers.pop_back();
  EXPECT_THROW(Transformer(w, layers), lowbit::Error);
}

}  // namespace
}  // namespace llama2c

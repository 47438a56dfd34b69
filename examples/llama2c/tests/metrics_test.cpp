// Scores: NLL, KL divergence and top-1 agreement against values worked out by hand.
#include "llama2c/metrics.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "test_model.hpp"

namespace llama2c {
namespace {

TEST(Metrics, LogSoftmaxIsNormalizedAndShiftInvariant) {
  Eigen::RowVectorXf logits(4);
  logits << 1.0f, -2.0f, 0.5f, 30.0f;
  const Eigen::VectorXd a = log_softmax(logits);
  EXPECT_NEAR(a.array().exp().sum(), 1.0, 1e-12);
  const Eigen::VectorXd b = log_softmax((logits.array() + 100.0f).matrix());
  EXPECT_LT((a - b).cwiseAbs().maxCoeff(), 1e-5);
  // Uniform logits: log(1/4) each.
  EXPECT_NEAR(log_softmax(Eigen::RowVectorXf::Zero(4))(2), std::log(0.25), 1e-12);
}

// Two scored positions with distributions small enough to write down.
TEST(Metrics, ScoresMatchHandComputedValues) {
  const std::vector<int> tokens{0, 1, 0};
  MatrixF logits(3, 2), reference(3, 2);
  logits << 0.0f, 0.0f,                        // p = (1/2, 1/2): predicts token 1 with 1/2
      std::log(3.0f), 0.0f,                    // p = (3/4, 1/4): predicts token 0 with 3/4
      5.0f, 5.0f;                              // last row: nothing to predict
  reference << std::log(3.0f), 0.0f,           // q = (3/4, 1/4)
      std::log(3.0f), 0.0f,                    // q = (3/4, 1/4)
      0.0f, 0.0f;
  const Scores s = score_logits(tokens, logits, &reference);
  EXPECT_EQ(s.count, 2);
  EXPECT_NEAR(s.nll_sum, std::log(2.0) + std::log(4.0 / 3.0), 1e-6);
  EXPECT_NEAR(s.perplexity(), std::exp((std::log(2.0) + std::log(4.0 / 3.0)) / 2), 1e-6);
  // KL(q || p) at position 0: 3/4 log(3/2) + 1/4 log(1/2); position 1: 0.
  EXPECT_NEAR(s.kl_sum, 0.75 * std::log(1.5) + 0.25 * std::log(0.5), 1e-6);
  // Position 0: argmax p is a tie resolved to token 0, as q's; position 1 agrees.
  EXPECT_EQ(s.top1_agree, 2);

  const Scores alone = score_logits(tokens, logits);
  EXPECT_EQ(alone.kl_sum, 0.0);
  EXPECT_EQ(alone.top1_agree, 0);
  EXPECT_NEAR(alone.nll_sum, s.nll_sum, 1e-12);
}

TEST(Metrics, KlIsZeroAgainstItselfAndPositiveOtherwise) {
  const Weights w = test::random_weights(test::small_config(), 31);
  const Transformer model(w);
  const auto sequences = test::random_sequences(2, 20, w.config.vocab_size, 32);
  const auto logits = reference_logits(model, sequences);
  const Scores same = evaluate(model, sequences, &logits);
  EXPECT_NEAR(same.mean_kl(), 0.0, 1e-9);
  EXPECT_EQ(same.top1(), 1.0);
  EXPECT_EQ(same.count, 2 * 19);

  Weights other = w;
  other.layers[0].wv *= 1.5f;
  const Scores differ = evaluate(Transformer(other), sequences, &logits);
  EXPECT_GT(differ.mean_kl(), 1e-6);
}

TEST(Metrics, RefusesMismatchedShapes) {
  const std::vector<int> tokens{0, 1};
  const MatrixF logits = MatrixF::Zero(3, 2), reference = MatrixF::Zero(2, 3);
  EXPECT_THROW((void)score_logits(tokens, logits), lowbit::Error);
  const MatrixF two = MatrixF::Zero(2, 2);
  EXPECT_THROW((void)score_logits(tokens, two, &reference), lowbit::Error);
}

}  // namespace
}  // namespace llama2c

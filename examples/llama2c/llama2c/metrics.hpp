// Scores of a model on token sequences, alone (negative log-likelihood, perplexity) or
// against a reference model (KL divergence of the next-token distributions, top-1
// agreement). Log-probabilities are computed in double.
#pragma once

#include <cmath>
#include <span>
#include <vector>

#include "llama2c/parallel.hpp"
#include "llama2c/text.hpp"
#include "llama2c/transformer.hpp"

namespace llama2c {

// log softmax(logits) in double.
[[nodiscard]] inline Eigen::VectorXd log_softmax(const Eigen::Ref<const Eigen::RowVectorXf>& logits) {
  const Eigen::VectorXd z = logits.transpose().cast<double>();
  const double max = z.maxCoeff();
  return z.array() - (max + std::log((z.array() - max).exp().sum()));
}

struct Scores {
  double nll_sum = 0;   // sum over scored positions of -log p(next token)
  double kl_sum = 0;    // sum of KL(p_reference || p) (0 without a reference)
  Index top1_agree = 0; // positions where argmax p == argmax p_reference
  Index count = 0;      // scored positions: every token after the first

  [[nodiscard]] double mean_nll() const { return count ? nll_sum / static_cast<double>(count) : 0.0; }
  [[nodiscard]] double perplexity() const { return std::exp(mean_nll()); }
  [[nodiscard]] double mean_kl() const { return count ? kl_sum / static_cast<double>(count) : 0.0; }
  [[nodiscard]] double top1() const { return count ? static_cast<double>(top1_agree) / static_cast<double>(count) : 0.0; }

  Scores& operator+=(const Scores& o) {
    nll_sum += o.nll_sum;
    kl_sum += o.kl_sum;
    top1_agree += o.top1_agree;
    count += o.count;
    return *this;
  }
};

// Scores logits [T, vocab] of `tokens` (row t predicts tokens[t + 1]); with reference
// logits of the same shape, also KL(reference || logits) and top-1 agreement.
[[nodiscard]] inline Scores score_logits(std::span<const int> tokens, const MatrixF& logits,
                                         const MatrixF* reference = nullptr) {
  const Index T = static_cast<Index>(tokens.size());
  check(logits.rows() == T, "score_logits: ", logits.rows(), " logit rows for ", T, " tokens");
  check(reference == nullptr || (reference->rows() == logits.rows() && reference->cols() == logits.cols()),
        "score_logits: reference logits shape differs");
  Scores s;
  for (Index t = 0; t + 1 < T; ++t) {
    const Eigen::VectorXd logp = log_softmax(logits.row(t));
    s.nll_sum -= logp(tokens[static_cast<std::size_t>(t + 1)]);
    if (reference) {
      const Eigen::VectorXd logr = log_softmax(reference->row(t));
      s.kl_sum += (logr.array().exp() * (logr - logp).array()).sum();
      Index mine = 0, theirs = 0;
      logits.row(t).maxCoeff(&mine);
      reference->row(t).maxCoeff(&theirs);
      s.top1_agree += mine == theirs;
    }
    ++s.count;
  }
  return s;
}

// A model's scores over sequences, optionally against reference logits (one matrix
// per sequence, from reference_logits()). Sequences run in parallel; the sum is taken
// in sequence order, so the result does not depend on the thread count.
[[nodiscard]] inline Scores evaluate(const Transformer& model, const std::vector<Sequence>& sequences,
                                     const std::vector<MatrixF>* reference = nullptr) {
  check(reference == nullptr || reference->size() == sequences.size(), "evaluate: ", reference ? reference->size() : 0,
        " reference logit matrices for ", sequences.size(), " sequences");
  std::vector<Scores> each(sequences.size());
  parallel_tasks(sequences.size(), [&](std::size_t i) {
    each[i] = score_logits(sequences[i], model.forward(sequences[i]), reference ? &(*reference)[i] : nullptr);
  });
  Scores total;
  for (const Scores& s : each) total += s;
  return total;
}

[[nodiscard]] inline std::vector<MatrixF> reference_logits(const Transformer& model, const std::vector<Sequence>& sequences) {
  std::vector<MatrixF> logits(sequences.size());
  parallel_tasks(sequences.size(), [&](std::size_t i) { logits[i] = model.forward(sequences[i]); });
  return logits;
}

}  // namespace llama2c

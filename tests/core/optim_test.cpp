// AdamW against its published update rule, written out independently here in double.
#include "lowbit/core/optim.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "test_util.hpp"

namespace lowbit {
namespace {

// torch.optim.AdamW's update for one parameter vector, in double.
struct ReferenceAdamW {
  double lr, beta1, beta2, eps, weight_decay;
  std::vector<double> m, v;
  int t = 0;

  void step(std::vector<double>& p, const std::vector<double>& g) {
    ++t;
    for (std::size_t i = 0; i < p.size(); ++i) {
      p[i] -= lr * weight_decay * p[i];
      m[i] = beta1 * m[i] + (1 - beta1) * g[i];
      v[i] = beta2 * v[i] + (1 - beta2) * g[i] * g[i];
      const double m_hat = m[i] / (1 - std::pow(beta1, t)), v_hat = v[i] / (1 - std::pow(beta2, t));
      p[i] -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
  }
};

TEST(AdamW, FirstStepMovesEachEntryByTheLearningRate) {
  // After one step m_hat = g and v_hat = g^2: the move is lr * g / (|g| + eps).
  AdamW<double> opt(4, {.lr = 0.1});
  Eigen::VectorXd p(4), g(4);
  p << 1, -2, 3, 0.5;
  g << 2.0, -0.5, 1e-3, 0.0;
  const Eigen::VectorXd before = p;
  opt.step(p, g);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(p(i), before(i) - 0.1 * g(i) / (std::abs(g(i)) + 1e-8), 1e-15) << i;
  EXPECT_EQ(opt.steps(), 1);
}

TEST(AdamW, MatchesTheUpdateRuleOverManySteps) {
  const AdamW<double>::Options o{.lr = 3e-2, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-6, .weight_decay = 0.05};
  const std::size_t n = 7;
  AdamW<double> opt(static_cast<Index>(n), o);
  ReferenceAdamW ref{o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, std::vector<double>(n), std::vector<double>(n)};
  std::mt19937_64 rng(5);
  std::normal_distribution<double> dist;
  std::vector<double> p(n), p_ref(n), g(n);
  for (auto& x : p) x = dist(rng);
  p_ref = p;
  for (int t = 0; t < 50; ++t) {
    for (auto& x : g) x = dist(rng) * (1 + t % 3);
    opt.step(std::span<double>(p), std::span<const double>(g));
    ref.step(p_ref, g);
  }
  for (std::size_t i = 0; i < n; ++i) EXPECT_NEAR(p[i], p_ref[i], 1e-12 * (1 + std::abs(p_ref[i]))) << i;
}

TEST(AdamW, FloatFollowsTheDoubleReference) {
  AdamW<float> opt(3, {.lr = 1e-2f});
  ReferenceAdamW ref{1e-2, 0.9, 0.999, 1e-8, 0, std::vector<double>(3), std::vector<double>(3)};
  Eigen::VectorXf p = Eigen::VectorXf::Constant(3, 4.0f);
  std::vector<double> p_ref(3, 4.0);
  for (int t = 0; t < 20; ++t) {
    Eigen::VectorXf g(3);
    g << 1.0f + t, -0.25f, 1e-4f * t;
    opt.step(p, g);
    ref.step(p_ref, {g(0), g(1), g(2)});
  }
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(p(i), p_ref[static_cast<std::size_t>(i)], 1e-5) << i;
}

TEST(AdamW, WeightDecayIsDecoupledFromTheGradient) {
  // Zero gradient: the moments stay 0 and only the decay acts, p_t = p_0 (1 - lr wd)^t.
  AdamW<double> opt(2, {.lr = 0.1, .weight_decay = 0.5});
  Eigen::VectorXd p(2);
  p << 2.0, -1.0;
  const Eigen::VectorXd zero = Eigen::VectorXd::Zero(2);
  for (int t = 0; t < 5; ++t) opt.step(p, zero);
  EXPECT_NEAR(p(0), 2.0 * std::pow(0.95, 5), 1e-15);
  EXPECT_NEAR(p(1), -1.0 * std::pow(0.95, 5), 1e-15);
}

TEST(AdamW, MinimizesAQuadratic) {
  // f(p) = sum_i c_i (p_i - target_i)^2, very different curvatures: Adam's per-entry
  // normalisation still brings every entry to its target.
  const Index n = 5;
  Eigen::VectorXd target(n), curvature(n), p = Eigen::VectorXd::Zero(n);
  target << 1, -2, 0.5, 3, -0.25;
  curvature << 1e-3, 1, 10, 1e2, 1e3;
  AdamW<double> opt(n, {.lr = 0.05});
  for (int t = 0; t < 3000; ++t) {
    const Eigen::VectorXd g = 2 * curvature.cwiseProduct(p - target);
    opt.step(p, g);
  }
  EXPECT_LT((p - target).cwiseAbs().maxCoeff(), 1e-2);
}

TEST(AdamW, WorksOnMatricesAsFlatArrays) {
  AdamW<float> opt(6, {.lr = 0.5f});
  Matrix<float> p = Matrix<float>::Zero(2, 3), g = Matrix<float>::Ones(2, 3);
  g(1, 2) = -1;
  opt.step(p, g);
  EXPECT_NEAR(p(0, 0), -0.5f, 1e-6f);
  EXPECT_NEAR(p(1, 2), 0.5f, 1e-6f);
}

TEST(AdamW, RejectsBadArguments) {
  EXPECT_THROW(AdamW<float>(-1, {}), Error);
  EXPECT_THROW(AdamW<float>(1, {.lr = -1}), Error);
  EXPECT_THROW(AdamW<float>(1, {.beta1 = 1}), Error);
  EXPECT_THROW(AdamW<float>(1, {.beta2 = -0.1f}), Error);
  EXPECT_THROW(AdamW<float>(1, {.eps = 0}), Error);
  EXPECT_THROW(AdamW<float>(1, {.weight_decay = -1}), Error);
  AdamW<float> opt(2, {});
  Eigen::VectorXf p = Eigen::VectorXf::Zero(2), short_grad = Eigen::VectorXf::Zero(1);
  EXPECT_THROW(opt.step(p, short_grad), Error);
  Eigen::VectorXf bad(2);
  bad << 1.0f, std::nanf("");
  try {
    opt.step(p, bad);
    FAIL() << "NaN gradient accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("grad[1]"), std::string::npos) << e.what();
  }
  EXPECT_EQ(p, Eigen::VectorXf::Zero(2)) << "a rejected step must not change the parameters";
  EXPECT_EQ(opt.steps(), 0);
}

}  // namespace
}  // namespace lowbit

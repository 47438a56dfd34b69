// Fake quantization: the forward against its definition (written out here in double),
// plain min-max agreement with RTN, the zero rule, and the straight-through backward
// against finite differences of the surrogate (rounding replaced by the identity).
#include "lowbit/core/fake_quant.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "lowbit/quantizers/rtn.hpp"
#include "test_util.hpp"

namespace lowbit {
namespace {

using MatrixD = Matrix<double>;

// One group's forward and STE backward, spelled out from the header's formulas in the
// plainest form (no shared code with the quantizer).
struct ReferenceGroup {
  std::vector<double> w;
  double gamma = 1, beta = 1;
  int max_code = 7;
  bool identity = false;

  double rnd(double u) const { return identity ? u : std::nearbyint(u); }
  std::size_t argmax() const { return static_cast<std::size_t>(std::max_element(w.begin(), w.end()) - w.begin()); }
  std::size_t argmin() const { return static_cast<std::size_t>(std::min_element(w.begin(), w.end()) - w.begin()); }
  double hi() const { return std::max(gamma * w[argmax()], 0.0); }
  double lo() const { return std::min(beta * w[argmin()], 0.0); }
  double step() const { return hi() - lo() > 0 ? (hi() - lo()) / max_code : 1.0; }
  double zero() const { return hi() - lo() > 0 ? std::nearbyint(-lo() / step()) : 0.0; }
  double code(std::size_t i) const { return rnd(w[i] / step() + zero()); }
  double value(std::size_t i) const {
    return (std::min(std::max(code(i), 0.0), double(max_code)) - zero()) * step();
  }

  // dL/dw, dL/da, dL/db for dL/dw_hat = g.
  void backward(const std::vector<double>& g, std::vector<double>& grad_w, double& grad_a, double& grad_b) const {
    const double h = step(), z = zero();
    double grad_h = 0;
    grad_w.assign(w.size(), 0.0);
    for (std::size_t i = 0; i < w.size(); ++i) {
      const double u = w[i] / h, c = rnd(u + z);
      if (c >= 0 && c <= max_code) {
        grad_w[i] = g[i];
        grad_h += g[i] * (identity ? 0.0 : c - z - u);
      } else {
        grad_h += g[i] * ((c < 0 ? 0.0 : double(max_code)) - z);
      }
    }
    grad_a = grad_b = 0;
    if (!(hi() - lo() > 0)) return;
    const double mx = w[argmax()], mn = w[argmin()];
    if (gamma * mx > 0) {
      grad_w[argmax()] += grad_h / max_code * gamma;
      grad_a = grad_h / max_code * mx * gamma * (1 - gamma);
    }
    if (beta * mn < 0) {
      grad_w[argmin()] -= grad_h / max_code * beta;
      grad_b = -grad_h / max_code * mn * beta * (1 - beta);
    }
  }
};

ClipLogits<double> random_logits(Index rows, Index groups, std::uint64_t seed, double lo, double hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  ClipLogits<double> c{MatrixD(rows, groups), MatrixD(rows, groups)};
  for (Index i = 0; i < c.upper.size(); ++i) {
    c.upper.data()[i] = dist(rng);
    c.lower.data()[i] = dist(rng);
  }
  return c;
}

ReferenceGroup reference_group(const MatrixD& x, Index r, Index begin, Index n, const ClipLogits<double>* clip, Index g,
                               int bits, bool identity) {
  ReferenceGroup ref;
  for (Index i = begin; i < begin + n; ++i) ref.w.push_back(x(r, i));
  if (clip) {
    ref.gamma = 1 / (1 + std::exp(-clip->upper(r, g)));
    ref.beta = 1 / (1 + std::exp(-clip->lower(r, g)));
  }
  ref.max_code = (1 << bits) - 1;
  ref.identity = identity;
  return ref;
}

TEST(GroupFakeQuantizer, ForwardFollowsTheDefinition) {
  const MatrixD x = test::random_matrix<double>(5, 45, 11);  // groups of 16: last one 13 long
  const auto clip = random_logits(5, 3, 12, 0.5, 4.0);
  for (int bits : {2, 3, 4, 8}) {
    GroupFakeQuantizer<double> fq(bits, 16);
    MatrixD x_hat(5, 45);
    fq.forward(x, x_hat, &clip);
    for (Index r = 0; r < 5; ++r)
      for (Index g = 0; g < 3; ++g) {
        const Index begin = g * 16, n = std::min<Index>(16, 45 - begin);
        const ReferenceGroup ref = reference_group(x, r, begin, n, &clip, g, bits, false);
        EXPECT_NEAR(fq.steps()(r, g), ref.step(), 1e-15 * ref.step());
        EXPECT_EQ(fq.zeros()(r, g), ref.zero());
        for (Index i = 0; i < n; ++i)
          EXPECT_NEAR(x_hat(r, begin + i), ref.value(static_cast<std::size_t>(i)), 1e-14) << bits << " " << r;
      }
  }
}

TEST(GroupFakeQuantizer, WithoutClippingEqualsMinMaxRtn) {
  // gamma = beta = 1: the integral-zero min-max RTN, scales, zeros and values.
  const Matrix<float> W = test::random_matrix<float>(64, 300, 21, 0.02);
  for (int bits : {2, 3, 4, 8})
    for (Index group : {Index(0), Index(64), Index(128)}) {
      const QuantSpec spec{.bits = bits, .group_size = group, .integral_zero = true};
      const QuantizedMatrix<float> rtn = RTN<float>(spec).quantize(W);
      GroupFakeQuantizer<float> fq(bits, group);
      Matrix<float> W_hat(W.rows(), W.cols());
      fq.forward(W, W_hat);
      const Matrix<float> rtn_hat = rtn.dequantize();
      EXPECT_EQ((fq.steps().array() != rtn.scales().array()).count(), 0) << bits << " g" << group;
      EXPECT_EQ((fq.zeros().array() != rtn.zeros().array()).count(), 0) << bits << " g" << group;
      EXPECT_EQ((W_hat.array() != rtn_hat.array()).count(), 0) << bits << " g" << group;
    }
}

TEST(GroupFakeQuantizer, ZeroIsAlwaysACode) {
  // Row 0 all positive, row 1 all negative, row 2 mixed, row 3 all zero; strong clipping.
  MatrixD x(4, 8);
  x.row(0) << 0.5, 1.0, 2.0, 0.75, 1.5, 0.6, 1.1, 1.9;
  x.row(1) = -x.row(0);
  x.row(2) << -1.0, 0.3, 2.0, -0.4, 0.1, 0.0, -0.2, 1.2;
  x.row(3).setZero();
  const ClipLogits<double> clip{MatrixD::Constant(4, 1, 0.5), MatrixD::Constant(4, 1, 1.5)};
  for (int bits : {2, 3, 4}) {
    const double max_code = (1 << bits) - 1;
    GroupFakeQuantizer<double> fq(bits, 0);
    MatrixD x_hat(4, 8);
    fq.forward(x, x_hat, &clip);
    EXPECT_EQ(fq.zeros()(0, 0), 0.0) << "all-positive group: lo = 0";
    EXPECT_EQ(fq.zeros()(1, 0), max_code) << "all-negative group: hi = 0";
    EXPECT_GE(fq.zeros()(2, 0), 0.0);
    EXPECT_LE(fq.zeros()(2, 0), max_code);
    // Mixed signs: exactly the reference's zero-point, -round(beta * min / h).
    const double gamma = 1 / (1 + std::exp(-0.5)), beta = 1 / (1 + std::exp(-1.5));
    const double h = (gamma * 2.0 + beta * 1.0) / max_code;
    EXPECT_EQ(fq.zeros()(2, 0), std::nearbyint(beta * 1.0 / h));
    EXPECT_EQ(x_hat(2, 5), 0.0) << "0 decodes to exactly 0";
    // The all-positive group spans [0, gamma max]; the all-negative one [beta min, 0].
    EXPECT_NEAR(fq.steps()(0, 0), gamma * 2.0 / max_code, 1e-15);
    EXPECT_NEAR(fq.steps()(1, 0), beta * 2.0 / max_code, 1e-15);
    EXPECT_EQ(x_hat.row(3), MatrixD::Zero(1, 8)) << "an all-zero group decodes exactly";
    EXPECT_EQ(fq.steps()(3, 0), 1.0);
    EXPECT_TRUE(x_hat.allFinite());
  }
}

// Central differences of a scalar function of one parameter.
double central_difference(const std::function<double()>& loss, double& parameter, double step) {
  const double saved = parameter;
  parameter = saved + step;
  const double up = loss();
  parameter = saved - step;
  const double down = loss();
  parameter = saved;
  return (up - down) / (2 * step);
}

double relative_error(const MatrixD& analytic, const MatrixD& numeric) {
  return (analytic - numeric).norm() / std::max(numeric.norm(), 1e-300);
}

// L = sum(C .* Q(x)) under the identity surrogate: the backward with dL/dx_hat = C must
// equal L's finite differences in x and in both logits.
void check_surrogate_gradients(int bits, Index rows, Index cols, Index group, bool clipped, std::uint64_t seed) {
  MatrixD x = test::random_matrix<double>(rows, cols, seed);
  const MatrixD C = test::random_matrix<double>(rows, cols, seed + 1);
  GroupFakeQuantizer<double> fq(bits, group, SteRounding::Identity);
  const Index groups = fq.groups_per_row(cols);
  ClipLogits<double> clip = random_logits(rows, groups, seed + 2, 0.5, 3.0);
  const ClipLogits<double>* clip_ptr = clipped ? &clip : nullptr;
  MatrixD x_hat(rows, cols);
  auto loss = [&] {
    GroupFakeQuantizer<double> q(bits, group, SteRounding::Identity);
    MatrixD out(rows, cols);
    q.forward(x, out, clip_ptr);
    return (C.array() * out.array()).sum();
  };
  fq.forward(x, x_hat, clip_ptr);
  MatrixD grad_x;
  ClipLogits<double> grad_clip;
  fq.backward(x, C, &grad_x, &grad_clip);

  const double step = 1e-6;
  MatrixD numeric_x(rows, cols);
  for (Index i = 0; i < x.size(); ++i) numeric_x.data()[i] = central_difference(loss, x.data()[i], step);
  EXPECT_LT(relative_error(grad_x, numeric_x), 1e-6) << "dL/dx, bits " << bits;
  if (!clipped) return;
  MatrixD numeric_upper(rows, groups), numeric_lower(rows, groups);
  for (Index i = 0; i < clip.upper.size(); ++i) {
    numeric_upper.data()[i] = central_difference(loss, clip.upper.data()[i], step);
    numeric_lower.data()[i] = central_difference(loss, clip.lower.data()[i], step);
  }
  // Clipping is active at these logits, so the gradients are far from zero.
  EXPECT_GT(numeric_upper.norm(), 1e-2);
  EXPECT_GT(numeric_lower.norm(), 1e-2);
  EXPECT_LT(relative_error(grad_clip.upper, numeric_upper), 1e-6) << "dL/da, bits " << bits;
  EXPECT_LT(relative_error(grad_clip.lower, numeric_lower), 1e-6) << "dL/db, bits " << bits;
}

TEST(GroupFakeQuantizer, WeightGradientsMatchSurrogateFiniteDifferences) {
  for (int bits : {2, 3, 4}) check_surrogate_gradients(bits, 6, 40, 16, true, 100 + static_cast<unsigned>(bits));
}

TEST(GroupFakeQuantizer, PerTokenGradientsMatchSurrogateFiniteDifferences) {
  // Activation use: no clipping, one group per row, gradient through each row's range.
  for (int bits : {4, 8}) check_surrogate_gradients(bits, 5, 24, 0, false, 200 + static_cast<unsigned>(bits));
}

TEST(GroupFakeQuantizer, RoundedBackwardIsTheStraightThroughEstimator) {
  // With real rounding the backward keeps d round(u)/du = 1 and the (r - u) term of dh.
  const MatrixD x = test::random_matrix<double>(4, 40, 31);
  const MatrixD C = test::random_matrix<double>(4, 40, 32);
  const auto clip = random_logits(4, 3, 33, 0.5, 3.0);
  GroupFakeQuantizer<double> fq(3, 16);
  MatrixD x_hat(4, 40), grad_x;
  ClipLogits<double> grad_clip;
  fq.forward(x, x_hat, &clip);
  fq.backward(x, C, &grad_x, &grad_clip);
  for (Index r = 0; r < 4; ++r)
    for (Index g = 0; g < 3; ++g) {
      const Index begin = g * 16, n = std::min<Index>(16, 40 - begin);
      const ReferenceGroup ref = reference_group(x, r, begin, n, &clip, g, 3, false);
      std::vector<double> grad(C.row(r).data() + begin, C.row(r).data() + begin + n), grad_w;
      double grad_a = 0, grad_b = 0;
      ref.backward(grad, grad_w, grad_a, grad_b);
      for (Index i = 0; i < n; ++i) EXPECT_NEAR(grad_x(r, begin + i), grad_w[static_cast<std::size_t>(i)], 1e-12);
      EXPECT_NEAR(grad_clip.upper(r, g), grad_a, 1e-12);
      EXPECT_NEAR(grad_clip.lower(r, g), grad_b, 1e-12);
    }
}

TEST(GroupFakeQuantizer, ResultsDoNotDependOnTheThreadCount) {
  const Matrix<float> x = test::random_matrix<float>(300, 256, 41);
  const Matrix<float> C = test::random_matrix<float>(300, 256, 42);
  ClipLogits<float> clip{Matrix<float>::Constant(300, 2, 2.0f), Matrix<float>::Constant(300, 2, 3.0f)};
  const int threads = num_threads();
  Matrix<float> out[2], grad[2];
  ClipLogits<float> grad_clip[2];
  for (int t = 0; t < 2; ++t) {
    set_num_threads(t + 1);
    GroupFakeQuantizer<float> fq(4, 128);
    out[t].resize(300, 256);
    fq.forward(x, out[t], &clip);
    fq.backward(x, C, &grad[t], &grad_clip[t]);
  }
  set_num_threads(threads);
  EXPECT_EQ(out[0], out[1]);
  EXPECT_EQ(grad[0], grad[1]);
  EXPECT_EQ(grad_clip[0].upper, grad_clip[1].upper);
  EXPECT_EQ(grad_clip[0].lower, grad_clip[1].lower);
}

TEST(GroupFakeQuantizer, CodesMatchTheForward) {
  const Matrix<float> x = test::random_matrix<float>(3, 64, 51);
  GroupFakeQuantizer<float> fq(3, 32);
  Matrix<float> x_hat(3, 64);
  fq.forward(x, x_hat);
  for (Index r = 0; r < 3; ++r)
    for (Index j = 0; j < 64; ++j) {
      const float step = fq.steps()(r, j / 32), zero = fq.zeros()(r, j / 32);
      const int q = GroupFakeQuantizer<float>::code(x(r, j), step, zero, 7);
      ASSERT_LE(q, 7);
      EXPECT_EQ((static_cast<float>(q) - zero) * step, x_hat(r, j));
    }
}

TEST(GroupFakeQuantizer, RejectsBadArguments) {
  EXPECT_THROW(GroupFakeQuantizer<float>(0, 16), Error);
  EXPECT_THROW(GroupFakeQuantizer<float>(9, 16), Error);
  EXPECT_THROW(GroupFakeQuantizer<float>(4, -1), Error);
  GroupFakeQuantizer<float> fq(4, 16);
  const Matrix<float> x = Matrix<float>::Ones(2, 32);
  Matrix<float> wrong(2, 31), x_hat(2, 32);
  EXPECT_THROW(fq.forward(x, wrong), Error);
  const ClipLogits<float> bad_clip{Matrix<float>::Zero(2, 1), Matrix<float>::Zero(2, 1)};
  EXPECT_THROW(fq.forward(x, x_hat, &bad_clip), Error);
  fq.forward(x, x_hat);
  Matrix<float> grad;
  EXPECT_THROW(fq.backward(Matrix<float>::Ones(3, 32), Matrix<float>::Ones(3, 32), &grad, nullptr), Error);
}

}  // namespace
}  // namespace lowbit

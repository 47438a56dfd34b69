// QLLM: the threshold and budget arithmetic, disassembly and assembly against their
// definitions (exact float output, the merge error formula, matching rules), the low-rank
// step's gradients and its closed-form optimum, the layer it returns, determinism, and the
// held-out W4A4 / W4A8 error on the fixture layer against plain min-max quantization.
#include "lowbit/quantizers/qllm.hpp"

#include <gtest/gtest.h>

#include <Eigen/SVD>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <utility>

#include "lowbit/quantizers/rtn.hpp"
#include "reference_figures.hpp"
#include "test_util.hpp"

namespace lowbit {
namespace {

using MatrixD = Matrix<double>;
constexpr double kInf = std::numeric_limits<double>::infinity();

// A layer whose activations have log-normal channel scales and two outlier channels
// (25x and 40x), as the fixture's have.
struct SmallLayer {
  Matrix<float> W, X, Xeval;
  Vector<float> bias;
};

SmallLayer small_layer(Index out = 32, Index in = 96, Index tokens = 256, std::uint64_t seed = 1) {
  SmallLayer s{test::random_matrix<float>(out, in, seed, 0.05), test::random_matrix<float>(tokens, in, seed + 1),
               test::random_matrix<float>(tokens / 2, in, seed + 2), Vector<float>::LinSpaced(out, -0.5f, 0.5f)};
  std::mt19937_64 rng(seed + 3);
  std::normal_distribution<float> log_scale(0.0f, 0.5f);
  for (Index j = 0; j < in; ++j) {
    const float scale = std::exp(log_scale(rng)) * (j == 3 ? 25.0f : j == 10 ? 40.0f : 1.0f);
    s.X.col(j) *= scale;
    s.Xeval.col(j) *= scale;
  }
  return s;
}

MatrixD float_output(const Matrix<float>& X, const Matrix<float>& W, const Vector<float>& bias = {}) {
  MatrixD Y = X.cast<double>() * W.cast<double>().transpose();
  if (bias.size()) Y.rowwise() += bias.cast<double>().transpose();
  return Y;
}

double output_error(const QuantizedLayer<float>& layer, const Matrix<float>& W, const Vector<float>& bias,
                    const Matrix<float>& X) {
  const MatrixD Y = float_output(X, W, bias);
  return (layer.forward(X).cast<double>() - Y).norm() / Y.norm();
}

// Plain min-max W/A quantization of the same layer: RTN weights, per-token activations.
QuantizedLayer<float> plain_layer(const Matrix<float>& W, const QuantSpec& weight, std::optional<QuantSpec> activation,
                                  const Vector<float>& bias = {}) {
  QuantizedLayer<float> layer;
  layer.weights = RTN<float>(weight).quantize(W);
  layer.activation = activation;
  layer.bias = bias;
  return layer;
}

QuantizedLayer<float> without_lowrank(QuantizedLayer<float> layer) {
  layer.lowrank_a.resize(0, 0);
  layer.lowrank_b.resize(0, 0);
  return layer;
}

bool same_layer(const QuantizedLayer<float>& a, const QuantizedLayer<float>& b) {
  return a.weights == b.weights && a.channel_map == b.channel_map && a.lowrank_a == b.lowrank_a &&
         a.lowrank_b == b.lowrank_b && a.bias == b.bias && a.history.loss == b.history.loss;
}

// ---------------------------------------------------------------------------------------
// Threshold arithmetic.

TEST(QllmThreshold, SplitPartsIsTheCeilingOfMaxOverTheta) {
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<double> value(0.01, 100.0);
  for (int i = 0; i < 2000; ++i) {
    const double a = value(rng), theta = value(rng);
    const Index parts = detail::split_parts(a, theta);
    if (a <= theta) {
      EXPECT_EQ(parts, 1);
      continue;
    }
    EXPECT_EQ(parts, static_cast<Index>(std::ceil(a / theta))) << a << " / " << theta;
    EXPECT_LE(a / static_cast<double>(parts), theta);
    EXPECT_GT(a / static_cast<double>(parts - 1), theta);
  }
  for (Index m = 1; m <= 50; ++m) EXPECT_EQ(detail::split_parts(7.3, 7.3 / static_cast<double>(m)), m);
  EXPECT_EQ(detail::split_parts(1e30, kInf), 1);
  EXPECT_EQ(detail::split_parts(0.0, 1e-30), 1);
  EXPECT_THROW((void)detail::split_parts(1.0, 1e-20), Error) << "absurd split counts are refused";
}

TEST(QllmThreshold, BudgetGivesTheSmallestThetaWithinIt) {
  std::mt19937_64 rng(2);
  std::lognormal_distribution<float> value(0.0f, 1.0f);
  Vector<float> absmax(60);
  for (Index j = 0; j < absmax.size(); ++j) absmax(j) = value(rng);
  absmax(7) = absmax(8) = 100.0f;  // ties
  absmax(9) = 0.0f;               // a dead channel is never split
  for (Index budget = 0; budget <= 40; ++budget) {
    const double theta = detail::theta_for_budget(absmax, budget);
    EXPECT_LE(detail::extra_channels(absmax, theta), budget) << budget;
    EXPECT_GT(detail::extra_channels(absmax, std::nextafter(theta, 0.0)), budget) << budget;
  }
  EXPECT_EQ(detail::theta_for_budget(absmax, 0), 100.0) << "budget 0: the largest max, nothing split";
  EXPECT_EQ(detail::theta_for_budget(Vector<float>(Vector<float>::Zero(5)), 3), kInf);
}

// ---------------------------------------------------------------------------------------
// Disassembly and assembly.

TEST(QllmReassembly, DisassemblyAloneLeavesTheFloatOutputUnchanged) {
  const SmallLayer s = small_layer();
  const Vector<float> absmax = s.X.cwiseAbs().colwise().maxCoeff().transpose();
  for (Index budget : {1, 5, 12}) {
    const double theta = detail::theta_for_budget(absmax, budget);
    const std::vector<Index> parts = detail::disassembly_parts(absmax, theta);
    const ChannelMap<float> map = detail::reassembly_map<float>(parts, {});
    const Index extra = detail::extra_channels(absmax, theta);
    ASSERT_GT(extra, 0);
    EXPECT_EQ(map.channels(), s.X.cols() + extra);
    const Matrix<float> X_split = map.apply(s.X);
    EXPECT_LE(X_split.cwiseAbs().maxCoeff(), theta * (1 + 1e-6)) << "every channel's range is capped at theta";
    const Matrix<float> Y = detail::dense_product<float>(X_split, map.fold_weight(s.W).transpose());
    const MatrixD want = float_output(s.X, s.W);
    EXPECT_LT((Y.cast<double>() - want).norm() / want.norm(), 1e-5) << "budget " << budget;
  }
}

TEST(QllmReassembly, AssemblyOfIdenticalPairsIsExact) {
  // Three (even, odd) pairs hold identical activations: they cost nothing to merge, the
  // matching finds exactly them, and the merged layer computes the float output.
  SmallLayer s = small_layer(24, 32, 128, 3);
  const std::set<std::pair<Index, Index>> identical{{2, 5}, {8, 13}, {20, 31}};
  for (const auto& [even, odd] : identical) s.X.col(odd) = s.X.col(even);
  const auto x = detail::PairGeometry<float>::of_columns(s.X), w = detail::PairGeometry<float>::of_columns(s.W);
  const std::vector<detail::MergePair> pairs = detail::assembly_pairs(x, w, std::vector<bool>(32, true), 3);
  std::set<std::pair<Index, Index>> found;
  for (const auto& p : pairs) found.insert({p.even, p.odd});
  EXPECT_EQ(found, identical);
  const ChannelMap<float> map = detail::reassembly_map<float>(std::vector<Index>(32, 1), pairs);
  EXPECT_EQ(map.channels(), 32 - 3);
  const Matrix<float> Y = detail::dense_product<float>(map.apply(s.X), map.fold_weight(s.W).transpose());
  const MatrixD want = float_output(s.X, s.W);
  EXPECT_LT((Y.cast<double>() - want).norm() / want.norm(), 1e-6);
}

TEST(QllmReassembly, PairScoreIsTheMeasuredMergeErrorAndTheMatchingTakesTheLowest) {
  const Index C = 12;
  const MatrixD X = test::random_matrix<double>(50, C, 4), W = test::random_matrix<double>(9, C, 5);
  const auto x = detail::PairGeometry<double>::of_columns(X), w = detail::PairGeometry<double>::of_columns(W);
  double lowest = kInf;
  std::pair<Index, Index> lowest_pair;
  for (Index a = 0; a < C; a += 2)
    for (Index b = 1; b < C; b += 2) {
      ChannelMap<double> map(C);
      for (Index j = 0; j < C; ++j)
        if (j == a) map.append_merge(a, b);
        else if (j != b) map.append_copy(j);
      const double measured = (map.apply(X) * map.fold_weight(W).transpose() - X * W.transpose()).squaredNorm();
      const double score = 0.25 * x.distance(a / 2, b / 2) * w.distance(a / 2, b / 2);
      EXPECT_NEAR(score, measured, 1e-9 * measured) << a << ", " << b;
      if (measured < lowest) {
        lowest = measured;
        lowest_pair = {a, b};
      }
    }
  const auto pairs = detail::assembly_pairs(x, w, std::vector<bool>(C, true), 1);
  ASSERT_EQ(pairs.size(), 1u);
  EXPECT_EQ(std::make_pair(pairs[0].even, pairs[0].odd), lowest_pair);
}

TEST(QllmReassembly, MatchingIsOneToOneEvenWithOddAndSkipsDisassembledChannels) {
  const SmallLayer s = small_layer(16, 40, 64, 6);
  const auto x = detail::PairGeometry<float>::of_columns(s.X), w = detail::PairGeometry<float>::of_columns(s.W);
  std::vector<bool> mergeable(40, true);
  for (Index j : {0, 3, 4, 17, 22, 39}) mergeable[static_cast<std::size_t>(j)] = false;
  const auto pairs = detail::assembly_pairs(x, w, mergeable, 12);
  ASSERT_EQ(pairs.size(), 12u);
  std::set<Index> used;
  for (std::size_t i = 0; i < pairs.size(); ++i) {
    const auto& p = pairs[i];
    EXPECT_EQ(p.even % 2, 0);
    EXPECT_EQ(p.odd % 2, 1);
    EXPECT_TRUE(mergeable[static_cast<std::size_t>(p.even)] && mergeable[static_cast<std::size_t>(p.odd)]);
    EXPECT_TRUE(used.insert(p.even).second && used.insert(p.odd).second) << "a channel merged twice";
    if (i > 0) {
      EXPECT_GE(p.score, pairs[i - 1].score) << "greedy takes the lowest remaining first";
    }
  }
  // 17 mergeable odd channels: 18 merges cannot be found.
  EXPECT_THROW((void)detail::assembly_pairs(x, w, mergeable, 18), Error);
}

TEST(QllmReassembly, PreservesTheChannelCountAndNeverMergesSplitChannels) {
  const SmallLayer s = small_layer();
  QLLM<float> qllm(QLLMOptions<float>{});
  qllm.calibrate(s.X);
  const Index C = s.X.cols();
  for (double ratio : {0.02, 0.05, 0.1, 0.25}) {
    const double theta = qllm.theta_for_ratio(ratio);
    const ChannelMap<float> map = qllm.reassembly(s.W, theta);
    ASSERT_FALSE(map.empty()) << ratio;
    EXPECT_EQ(map.source_channels(), C);
    EXPECT_EQ(map.channels(), C) << "ratio " << ratio;
    // Each original channel feeds either copies/parts of itself only, or one merge.
    std::vector<int> merged(static_cast<std::size_t>(C), 0), alone(static_cast<std::size_t>(C), 0);
    for (Index k = 0; k < map.channels(); ++k) {
      const auto entries = map.entries(k);
      for (const auto& e : entries) (entries.size() == 2 ? merged : alone)[static_cast<std::size_t>(e.source)] += 1;
    }
    const Vector<float> absmax = s.X.cwiseAbs().colwise().maxCoeff().transpose();
    for (Index j = 0; j < C; ++j) {
      EXPECT_EQ(merged[static_cast<std::size_t>(j)] + (alone[static_cast<std::size_t>(j)] > 0), 1) << j;
      EXPECT_EQ(alone[static_cast<std::size_t>(j)] > 1, absmax(j) > theta) << "channel " << j;
    }
  }
}

// ---------------------------------------------------------------------------------------
// The layer QLLM returns.

TEST(Qllm, ThetaInfinityDisablesReassemblyExactly) {
  const SmallLayer s = small_layer();
  const QuantSpec activation{.bits = 4, .group_size = 0};
  QLLM<float> at_infinity({.theta = std::numeric_limits<float>::infinity(), .rank = 0});
  at_infinity.calibrate(s.X);
  const QuantizedLayer<float> layer = at_infinity.quantize(s.W, s.bias);
  const QuantizedLayer<float> plain = plain_layer(s.W, {.bits = 4, .group_size = 0}, activation, s.bias);
  EXPECT_TRUE(layer.channel_map.empty());
  EXPECT_TRUE(layer.weights == plain.weights);
  EXPECT_EQ(layer.forward(s.Xeval), plain.forward(s.Xeval));
  ASSERT_EQ(at_infinity.report().candidates.size(), 1u);
  EXPECT_EQ(at_infinity.report().candidates[0].extra_channels, 0);
  // With the low-rank step too: the same layer as an empty search grid.
  QLLM<float> infinite({.theta = std::numeric_limits<float>::infinity()}), no_grid({.extra_channel_ratios = {}});
  infinite.calibrate(s.X);
  no_grid.calibrate(s.X);
  const QuantizedLayer<float> a = infinite.quantize(s.W, s.bias), b = no_grid.quantize(s.W, s.bias);
  EXPECT_TRUE(a.channel_map.empty());
  EXPECT_EQ(a.rank(), 4);
  EXPECT_TRUE(same_layer(a, b));
}

TEST(Qllm, ForwardAppliesTheMapFirstAndReportsEachModesError) {
  const SmallLayer s = small_layer();
  for (LowRankMode mode : {LowRankMode::SideTerm, LowRankMode::Requantize, LowRankMode::RequantizeFloat}) {
    QLLM<float> qllm({.lowrank = mode});
    qllm.calibrate(s.X);
    const QuantizedLayer<float> layer = qllm.quantize(s.W, s.bias);
    const QLLMReport& r = qllm.report();
    ASSERT_FALSE(layer.channel_map.empty()) << "the outlier channels make reassembly win";
    EXPECT_GT(r.candidates[r.chosen].extra_channels, 0);
    EXPECT_EQ(r.reassembly_error, r.candidates[r.chosen].error);
    for (const auto& c : r.candidates) EXPECT_GE(c.error, r.reassembly_error);
    EXPECT_LT(r.reassembly_error, r.candidates[0].error) << "better than no reassembly";
    EXPECT_GT(r.assembly_error, 0.0);
    const double measured = output_error(layer, s.W, s.bias, s.X);
    const double reported = mode == LowRankMode::SideTerm     ? r.side_term_error
                            : mode == LowRankMode::Requantize ? r.requantized_error
                                                              : r.requantized_float_error;
    EXPECT_NEAR(measured, reported, 1e-4 * reported);
    EXPECT_EQ(layer.rank(), mode == LowRankMode::SideTerm ? 4 : 0);
    if (mode != LowRankMode::SideTerm) continue;
    EXPECT_EQ(qllm.reassembly(s.W, r.candidates[r.chosen].theta), layer.channel_map);
    EXPECT_EQ(r.candidates[r.chosen].theta, qllm.theta_for_ratio(r.candidates[r.chosen].ratio));
    EXPECT_NEAR(output_error(without_lowrank(layer), s.W, s.bias, s.X), r.reassembly_error, 1e-4 * r.reassembly_error);
    EXPECT_LT(r.side_term_error, r.reassembly_error);
    // The definition, spelled out: Q_a(X M) W_hat^T + (Q_a(X M) B^T) A^T + b.
    const Matrix<float> mapped = layer.channel_map.apply(s.Xeval);
    Matrix<float> input(mapped.rows(), mapped.cols());
    GroupFakeQuantizer<float>(4, 0).forward(mapped, input);
    MatrixD want = input.cast<double>() * layer.weights.dequantize().cast<double>().transpose();
    want += input.cast<double>() * layer.lowrank_b.cast<double>().transpose() * layer.lowrank_a.cast<double>().transpose();
    want.rowwise() += s.bias.cast<double>().transpose();
    EXPECT_LT((layer.forward(s.Xeval).cast<double>() - want).norm() / want.norm(), 1e-6);
    EXPECT_EQ(layer.packed_bytes(), layer.weights.packed_bytes() + layer.channel_map.bytes() +
                                        (32 + 32 * 4 + 4 * 96) * sizeof(float));
  }
}

TEST(Qllm, QuantizedLayerChecksTheMapAgainstItsShapes) {
  const SmallLayer s = small_layer();
  QLLM<float> qllm({.rank = 0});
  qllm.calibrate(s.X);
  QuantizedLayer<float> layer = qllm.quantize(s.W);
  ASSERT_FALSE(layer.channel_map.empty());
  EXPECT_THROW((void)layer.forward(s.X.leftCols(95)), Error) << "X must have the map's source width";
  layer.channel_map = ChannelMap<float>::identity(95);
  EXPECT_THROW((void)layer.forward(s.X.leftCols(95)), Error) << "the map must produce in_features channels";
}

TEST(Qllm, TrainingIsDeterministicForASeedAndAnyThreadCount) {
  // Large enough (2 x 48 x 256 x 128 multiply-adds) that the products run in parallel.
  const SmallLayer s = small_layer(48, 128, 512, 7);
  for (LowRankInit init : {LowRankInit::ClosedForm, LowRankInit::Zero}) {
    const QLLMOptions<float> o{.extra_channel_ratios = {0.05}, .epochs = 2, .lr = 2e-3f, .batch_tokens = 128,
                               .init = init, .seed = 5};
    auto run = [&](const QLLMOptions<float>& options) {
      QLLM<float> qllm(options);
      qllm.calibrate(s.X.topRows(200));
      qllm.calibrate(s.X.bottomRows(312));  // calibration accumulates
      return qllm.quantize(s.W, s.bias);
    };
    const int threads = num_threads();
    set_num_threads(1);
    const QuantizedLayer<float> one = run(o);
    set_num_threads(2);
    const QuantizedLayer<float> two = run(o);
    set_num_threads(threads);
    EXPECT_FALSE(one.channel_map.empty());
    EXPECT_TRUE(same_layer(one, two));
    ASSERT_EQ(one.history.loss.size(), 2u);
    if (init == LowRankInit::ClosedForm) continue;
    QLLMOptions<float> reseeded = o;
    reseeded.seed = 6;
    const QuantizedLayer<float> other = run(reseeded);
    EXPECT_NE(other.history.loss, one.history.loss) << "the seed drives A's start and the token order";
    EXPECT_FALSE(other.lowrank_a == one.lowrank_a);
  }
}

TEST(Qllm, ProgressReportsEachEpochsLoss) {
  const SmallLayer s = small_layer();
  std::vector<std::pair<int, double>> seen;
  QLLM<float> qllm({.epochs = 4, .batch_tokens = 32, .init = LowRankInit::Zero,
                    .progress = [&](int epoch, double loss) { seen.emplace_back(epoch, loss); }});
  qllm.calibrate(s.X);
  const QuantizedLayer<float> layer = qllm.quantize(s.W);
  ASSERT_EQ(seen.size(), 4u);
  ASSERT_EQ(layer.history.loss.size(), 4u);
  for (std::size_t e = 0; e < 4; ++e) {
    EXPECT_EQ(seen[e].first, static_cast<int>(e) + 1);
    EXPECT_EQ(seen[e].second, layer.history.loss[e]);
  }
  EXPECT_LT(layer.history.loss.back(), layer.history.loss.front());
}

TEST(Qllm, DoublePrecisionAgreesWithFloat) {
  const SmallLayer s = small_layer();
  QLLM<float> single(QLLMOptions<float>{});
  single.calibrate(s.X);
  (void)single.quantize(s.W, s.bias);
  const QLLMReport& r = single.report();
  QLLM<double> twice({.theta = r.candidates[r.chosen].theta});
  twice.calibrate(s.X.cast<double>());
  const QuantizedLayer<double> layer = twice.quantize(s.W.cast<double>(), s.bias.cast<double>());
  EXPECT_EQ(twice.report().candidates[0].extra_channels, r.candidates[r.chosen].extra_channels);
  EXPECT_NEAR(twice.report().reassembly_error, r.reassembly_error, 0.02 * r.reassembly_error);
  EXPECT_NEAR(twice.report().side_term_error, r.side_term_error, 0.02 * r.side_term_error);
  EXPECT_EQ(layer.rank(), 4);
}

TEST(Qllm, RejectsBadOptionsAndInputs) {
  using O = QLLMOptions<float>;
  EXPECT_THROW(QLLM<float>(O{.weight = {.bits = 9}}), Error);
  EXPECT_THROW(QLLM<float>(O{.activation = QuantSpec{.bits = 4, .symmetric = true}}), Error);
  EXPECT_THROW(QLLM<float>(O{.extra_channel_ratios = {0.1, 0.3}}), Error);
  EXPECT_THROW(QLLM<float>(O{.extra_channel_ratios = {0.0}}), Error);
  EXPECT_THROW(QLLM<float>(O{.theta = 0.0f}), Error);
  EXPECT_THROW(QLLM<float>(O{.theta = std::nanf("")}), Error);
  EXPECT_THROW(QLLM<float>(O{.rank = -1}), Error);
  EXPECT_THROW(QLLM<float>(O{.epochs = -1}), Error);
  EXPECT_THROW(QLLM<float>(O{.lr = -1.0f}), Error);
  EXPECT_THROW(QLLM<float>(O{.batch_tokens = 0}), Error);
  EXPECT_THROW(QLLM<float>(O{.ridge = -1.0}), Error);

  QLLM<float> qllm(O{});
  const Matrix<float> W = test::random_matrix<float>(8, 16, 1);
  EXPECT_THROW((void)qllm.quantize(W), Error) << "quantize before calibrate";
  EXPECT_THROW((void)qllm.theta_for_ratio(0.1), Error);
  Matrix<float> X = test::random_matrix<float>(32, 16, 2);
  qllm.calibrate(X);
  EXPECT_THROW(qllm.calibrate(Matrix<float>::Ones(4, 9)), Error);
  X(3, 4) = std::numeric_limits<float>::infinity();
  try {
    qllm.calibrate(X);
    FAIL() << "Inf accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("X(3, 4)"), std::string::npos) << e.what();
  }
  EXPECT_THROW((void)qllm.quantize(Matrix<float>::Ones(8, 9)), Error);
  Matrix<float> bad_W = W;
  bad_W(0, 0) = std::nanf("");
  EXPECT_THROW((void)qllm.quantize(bad_W), Error);
  EXPECT_THROW((void)qllm.quantize(W, Vector<float>::Ones(3)), Error);
  EXPECT_THROW((void)qllm.theta_for_ratio(0.5), Error);
  EXPECT_THROW((void)qllm.reassembly(W, 0.0), Error);
  QLLM<float> high_rank(O{.rank = 9});
  high_rank.calibrate(test::random_matrix<float>(32, 16, 3));
  EXPECT_THROW((void)high_rank.quantize(W), Error) << "rank above min(out, in)";
  QLLM<float> tiny_theta(O{.theta = 1e-3f});
  tiny_theta.calibrate(test::random_matrix<float>(32, 16, 3));
  EXPECT_THROW((void)tiny_theta.quantize(W), Error) << "more extra channels than assembly can merge";
}

// ---------------------------------------------------------------------------------------
// The low-rank step.

struct LowRankProblem {
  MatrixD X, R;
  detail::LowRankFactors<double> factors;
};

LowRankProblem lowrank_problem(Index tokens, Index in, Index out, Index rank, std::uint64_t seed) {
  return {test::random_matrix<double>(tokens, in, seed), test::random_matrix<double>(tokens, out, seed + 1),
          {test::random_matrix<double>(out, rank, seed + 2), test::random_matrix<double>(rank, in, seed + 3, 0.3)}};
}

MatrixD numeric_gradient(const std::function<double()>& loss, MatrixD& parameter) {
  const double step = 1e-6;
  MatrixD grad(parameter.rows(), parameter.cols());
  for (Index i = 0; i < parameter.size(); ++i) {
    double& p = parameter.data()[i];
    const double saved = p;
    p = saved + step;
    const double up = loss();
    p = saved - step;
    const double down = loss();
    p = saved;
    grad.data()[i] = (up - down) / (2 * step);
  }
  return grad;
}

TEST(QllmLowRank, GradientsMatchFiniteDifferences) {
  LowRankProblem p = lowrank_problem(20, 12, 7, 3, 1);
  auto loss = [&] { return detail::lowrank_loss<double>(p.X, p.R, p.factors); };
  MatrixD grad_a, grad_b;
  (void)detail::lowrank_loss<double>(p.X, p.R, p.factors, &grad_a, &grad_b);
  const MatrixD numeric_a = numeric_gradient(loss, p.factors.a), numeric_b = numeric_gradient(loss, p.factors.b);
  EXPECT_GT(numeric_a.norm(), 1e-3);
  EXPECT_LT((grad_a - numeric_a).norm() / numeric_a.norm(), 1e-7);
  EXPECT_LT((grad_b - numeric_b).norm() / numeric_b.norm(), 1e-7);
  // At the published start (B = 0) only B receives a gradient.
  p.factors.b.setZero();
  (void)detail::lowrank_loss<double>(p.X, p.R, p.factors, &grad_a, &grad_b);
  EXPECT_EQ(grad_a.norm(), 0.0);
  const MatrixD numeric_b0 = numeric_gradient(loss, p.factors.b);
  EXPECT_GT(numeric_b0.norm(), 1e-3);
  EXPECT_LT((grad_b - numeric_b0).norm() / numeric_b0.norm(), 1e-7);
}

TEST(QllmLowRank, ClosedFormIsTheOptimumAndAdamWReachesIt) {
  const LowRankProblem p = lowrank_problem(300, 24, 16, 3, 2);
  // Full rank: M = A B is ordinary least squares, R^T X (X^T X)^-1.
  const auto full = detail::reduced_rank_fit<double>(p.X, p.R, 16, 0.0);
  const MatrixD ols = (p.X.transpose() * p.X).ldlt().solve(p.X.transpose() * p.R).transpose();
  EXPECT_LT((full.product() - ols).norm(), 1e-8 * ols.norm());
  // Rank 3: no perturbation and no truncated SVD of the OLS solution does better.
  const auto best = detail::reduced_rank_fit<double>(p.X, p.R, 3, 0.0);
  const double optimum = detail::lowrank_loss<double>(p.X, p.R, best);
  std::mt19937_64 rng(3);
  std::normal_distribution<double> noise(0.0, 1e-3);
  for (int trial = 0; trial < 20; ++trial) {
    detail::LowRankFactors<double> moved = best;
    for (Index i = 0; i < moved.a.size(); ++i) moved.a.data()[i] += noise(rng);
    for (Index i = 0; i < moved.b.size(); ++i) moved.b.data()[i] += noise(rng);
    EXPECT_GT(detail::lowrank_loss<double>(p.X, p.R, moved), optimum);
  }
  const Eigen::JacobiSVD<MatrixD> svd(ols, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const detail::LowRankFactors<double> truncated{svd.matrixU().leftCols(3) * svd.singularValues().head(3).asDiagonal(),
                                                 svd.matrixV().leftCols(3).transpose()};
  EXPECT_LT(optimum, detail::lowrank_loss<double>(p.X, p.R, truncated));
  // AdamW from B = 0 converges to the closed form's loss, never below it.
  detail::LowRankFactors<double> trained = detail::lowrank_start<double>(16, 24, 3, 4);
  TrainingHistory history;
  detail::train_lowrank<double>(p.X, p.R, trained, {.epochs = 100, .lr = 0.1, .batch_tokens = 50, .seed = 5}, history);
  const double reached = detail::lowrank_loss<double>(p.X, p.R, trained);
  const double start = p.R.squaredNorm();
  EXPECT_GE(reached, optimum * (1 - 1e-12));
  EXPECT_LT(reached - optimum, 0.01 * (start - optimum)) << "99% of the way from B = 0 to the optimum";
}

TEST(QllmLowRank, RidgeShrinksTheCorrectionAndDegenerateInputsAreHandled) {
  const LowRankProblem p = lowrank_problem(200, 20, 10, 2, 6);
  const double plain = detail::reduced_rank_fit<double>(p.X, p.R, 2, 0.0).product().norm();
  const double ridged = detail::reduced_rank_fit<double>(p.X, p.R, 2, 1.0).product().norm();
  EXPECT_LT(ridged, plain);
  // A dead input channel makes X^T X singular: refused without ridge, fine with it.
  MatrixD X = p.X;
  X.col(4).setZero();
  EXPECT_THROW((void)detail::reduced_rank_fit<double>(X, p.R, 2, 0.0), Error) << "singular X^T X without ridge";
  EXPECT_TRUE(detail::reduced_rank_fit<double>(X, p.R, 2, 1e-2).product().allFinite());
  // No signal at all: nothing to correct.
  EXPECT_EQ(detail::reduced_rank_fit<double>(MatrixD::Zero(10, 4), MatrixD::Ones(10, 3), 1, 0.0).product().norm(), 0.0);
}

// ---------------------------------------------------------------------------------------
// The fixture layer: calibrate on X_2048x1024, score on Xeval_512x1024. Sanitizer builds
// (Debug, ~100x slower) run the same comparisons on a slice (64 outputs x 256 inputs,
// 512 / 256 tokens); the reference figure is for the full layer.

using test::kFullFixture;
using Fixture = test::FixtureLayer;
const Fixture& fixture() { return test::affordable_fixture(); }
double reference_figure(const nlohmann::json& match) { return test::reference_out_rel_eval(match); }

// Held-out errors of plain min-max, reassembly alone, the low-rank step alone, and both.
struct Figures {
  double plain, reassembly, lowrank, both, requantized, requantized_float;
};

Figures fixture_figures(int activation_bits) {
  const Fixture& f = fixture();
  const QuantSpec weight{.bits = 4, .group_size = 0}, activation{.bits = activation_bits, .group_size = 0};
  const Vector<float> none;
  Figures out{};
  out.plain = output_error(plain_layer(f.W, weight, activation), f.W, none, f.Xeval);
  QLLM<float> both({.weight = weight, .activation = activation});
  both.calibrate(f.X);
  const QuantizedLayer<float> layer = both.quantize(f.W);
  out.both = output_error(layer, f.W, none, f.Xeval);
  out.reassembly = output_error(without_lowrank(layer), f.W, none, f.Xeval);  // the same weights and map
  for (LowRankMode mode : {LowRankMode::Requantize, LowRankMode::RequantizeFloat}) {
    QuantizedLayer<float> merged = without_lowrank(layer);
    merged.weights = RTN<float>(weight).quantize(
        (mode == LowRankMode::Requantize ? layer.weights.dequantize() : layer.channel_map.fold_weight(f.W)) +
        layer.lowrank_a * layer.lowrank_b);
    (mode == LowRankMode::Requantize ? out.requantized : out.requantized_float) = output_error(merged, f.W, none, f.Xeval);
  }
  QLLM<float> lowrank({.weight = weight, .activation = activation, .extra_channel_ratios = {}});
  lowrank.calibrate(f.X);
  out.lowrank = output_error(lowrank.quantize(f.W), f.W, none, f.Xeval);
  std::printf("[ fixture ] W4A%d held-out error: plain %.4f, reassembly %.4f (theta %.4g, %ld extra), low-rank %.4f, "
              "both %.4f; merged and requantized: W_hat + AB %.4f, W' + AB %.4f\n",
              activation_bits, out.plain, out.reassembly, both.report().candidates[both.report().chosen].theta,
              static_cast<long>(both.report().candidates[both.report().chosen].extra_channels), out.lowrank, out.both,
              out.requantized, out.requantized_float);
  return out;
}

TEST(QllmFixture, W4A4ReassemblyAndLowRankCutTheErrorByAQuarter) {
  const Figures f = fixture_figures(4);
  EXPECT_LE(f.both, 0.75 * f.plain);
  EXPECT_LT(f.reassembly, f.plain);
  EXPECT_LT(f.lowrank, f.plain);
}

TEST(QllmFixture, W4A8LowRankLowersTheError) {
  // 8-bit activations leave little for reassembly (the search may keep the channels as
  // they are); the low-rank step still corrects the 4-bit weights.
  const Figures f = fixture_figures(8);
  EXPECT_LE(f.reassembly, 1.01 * f.plain);
  EXPECT_LT(f.lowrank, 0.9 * f.plain);
  EXPECT_LT(f.both, 0.9 * f.plain);
}

TEST(QllmFixture, WeightOnlyWithoutReassemblyReproducesTheReferenceRtn) {
  // No activation quantization, no reassembly, no low-rank: per-channel 4-bit min-max with
  // an integral zero, which reference_small.jsonl measured (GPTQ's nearest rounding).
  const Fixture& f = fixture();
  QLLM<float> qllm({.weight = {.bits = 4, .group_size = 0, .integral_zero = true}, .activation = std::nullopt,
                    .extra_channel_ratios = {}, .rank = 0});
  qllm.calibrate(f.X);
  const double error = output_error(qllm.quantize(f.W), f.W, {}, f.Xeval);
  if (kFullFixture) {
    EXPECT_NEAR(error, reference_figure({{"tool", "rtn"}, {"flavor", "gptq_nearest"}, {"wbits", 4},
                                         {"groupsize", -1}, {"sym", false}}),
                1e-3);
  }
  const QuantizedLayer<float> plain = plain_layer(f.W, {.bits = 4, .group_size = 0, .integral_zero = true}, std::nullopt);
  EXPECT_EQ(error, output_error(plain, f.W, {}, f.Xeval));
}

}  // namespace
}  // namespace lowbit

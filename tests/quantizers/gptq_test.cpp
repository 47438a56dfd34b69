// GPTQ: conformance with the reference (IST-DASLab/gptq) on the fixture layer, a
// textbook unblocked GPTQ written here in double, and the properties issue 4 lists.
#include "lowbit/quantizers/gptq.hpp"

#include <gtest/gtest.h>

#include <Eigen/Cholesky>
#include <Eigen/LU>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>
#include <string>
#include <unsupported/Eigen/CXX11/Tensor>
#include <vector>

#include "lowbit/quantizers/rtn.hpp"
#include "test_util.hpp"

namespace lowbit {
namespace {

using Options = GPTQ<float>::Options;

// Expects `call` to throw lowbit::Error whose message contains every part.
template <class Call>
void expect_error(Call&& call, std::initializer_list<std::string> parts) {
  try {
    call();
    ADD_FAILURE() << "no lowbit::Error thrown";
  } catch (const Error& e) {
    for (const auto& part : parts) EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

// ---- the fixture layer against the reference's figures ----------------------------

std::vector<nlohmann::json> reference_rows(const std::string& tool) {
  std::ifstream in(test::data_path("reference_small.jsonl"));
  std::vector<nlohmann::json> rows;
  std::string line;
  while (std::getline(in, line)) {
    auto row = nlohmann::json::parse(line);
    if (row["tool"] == tool) rows.push_back(row);
  }
  return rows;
}

// X Y^T in float with the packed GEMM (tested against double products in
// gptq_gemm_test), on both threads; Eigen's SSE2 product would dominate this
// program's run time.
Matrix<float> product_transposed(const Matrix<float>& X, const Matrix<float>& Y) {
  Matrix<float> out = Matrix<float>::Zero(X.rows(), Y.rows());
  const Index rows_per_item = 256;
  detail::linalg::for_each_item((X.rows() + rows_per_item - 1) / rows_per_item, true, [&](Index item) {
    const Index r0 = item * rows_per_item, rows = std::min(rows_per_item, X.rows() - r0);
    detail::gemm::multiply(detail::gemm::active_kernel<float>(), rows, Y.rows(), X.cols(),
                           detail::gemm::row_major(X.data() + r0 * X.cols(), X.cols()),
                           detail::gemm::row_major(Y.data(), Y.cols()).transposed(), out.data() + r0 * out.cols(),
                           out.cols(), false);
  });
  return out;
}

// out_rel on the fixture, fast: the products in float (relative error ~1e-6, far below
// the 1% tolerance), ||X W^T|| computed once.
double fixture_out_rel(const Matrix<float>& X, const Matrix<float>& W_hat) {
  const auto& layer = test::fixture_layer();
  static const double calibration_norm = product_transposed(layer.X, layer.W).cast<double>().norm();
  static const double eval_norm = product_transposed(layer.Xeval, layer.W).cast<double>().norm();
  const double norm = &X == &layer.X ? calibration_norm : eval_norm;
  return product_transposed(X, layer.W - W_hat).cast<double>().norm() / norm;
}

// The fixture's calibration set streamed as the reference did: 8 sequences of 256.
GPTQ<float>& fixture_gptq() {
  static GPTQ<float> gptq = [] {
    const auto& layer = test::fixture_layer();
    GPTQ<float> g(layer.W.cols());
    for (Index s = 0; s < 8; ++s) g.add_batch(layer.X.middleRows(s * 256, 256));
    return g;
  }();
  return gptq;
}

TEST(Gptq, FixtureHessianMatchesTheReference) {
  const auto& gptq = fixture_gptq();
  EXPECT_EQ(gptq.tokens(), 2048);
  for (const auto& row : reference_rows("gptq_ref")) {
    if (!row.contains("stage")) continue;
    // The reference divides by the number of add_batch calls (8 sequences), lowbit by
    // the number of tokens: its H is 2048 / 8 = 256 times lowbit's.
    const double scale = static_cast<double>(row["tokens"].get<int>()) / row["nsamples"].get<double>();
    const Matrix<double> H = gptq.hessian();
    EXPECT_NEAR(H.diagonal().mean() * scale / row["H_diag_mean"].get<double>(), 1.0, 1e-5);
    EXPECT_EQ((H.diagonal().array() == 0).count(), row["H_dead_cols"].get<int>());
    EXPECT_TRUE(H.isApprox(H.transpose(), 0.0));
  }
}

// For wbits 4/3/2, groupsize 128 and -1, sym, act_order and static groups: out_rel and
// out_rel_eval within 1% of the reference, and its loss (x256, see above) within 1%.
TEST(Gptq, FixtureMatchesReferenceWithinOnePercent) {
  const auto& layer = test::fixture_layer();
  auto& gptq = fixture_gptq();
  int checked = 0;
  for (const auto& row : reference_rows("gptq_ref")) {
    if (row.contains("stage")) continue;
    const int groupsize = row["groupsize"].get<int>();
    Options options;
    options.spec = {.bits = row["wbits"].get<int>(),
                    .group_size = groupsize < 0 ? 0 : groupsize,
                    .symmetric = row["sym"].get<bool>()};
    options.act_order = row["act_order"].get<bool>();
    options.static_groups = row["static_groups"].get<bool>();
    options.mse = row["mse"].get<bool>();
    gptq.set_options(options);
    const auto result = gptq.quantize_with_report(layer.W);
    const Matrix<float> W_hat = result.weights.dequantize();
    const std::string config = row.dump();
    const double out_rel = fixture_out_rel(layer.X, W_hat);
    const double out_rel_eval = fixture_out_rel(layer.Xeval, W_hat);
    EXPECT_NEAR(out_rel / row["out_rel"].get<double>(), 1.0, 0.01) << config << " out_rel " << out_rel;
    EXPECT_NEAR(out_rel_eval / row["out_rel_eval"].get<double>(), 1.0, 0.01) << config << " eval " << out_rel_eval;
    const double scale = 2048.0 / row["nsamples"].get<double>();
    EXPECT_NEAR(result.loss * scale / row["gptq_loss"].get<double>(), 1.0, 0.01) << config << " loss " << result.loss;
    EXPECT_EQ(result.weights.permutation().empty(), !(options.act_order && groupsize > 0 && !options.static_groups));
    ++checked;
  }
  EXPECT_EQ(checked, 30);
}

// ---- a textbook GPTQ in double ----------------------------------------------------

// The reference quantizer's parameters: range [min(w,0), max(w,0)], integral zero;
// symmetric [-a, a] with a = max|w|, zero 2^(b-1). Scales are stored as float.
GroupParams reference_fit(const double* w, Index n, const QuantSpec& spec) {
  double lo = 0, hi = 0;
  for (Index i = 0; i < n; ++i) {
    lo = std::min(lo, w[i]);
    hi = std::max(hi, w[i]);
  }
  const int max_code = spec.max_code();
  GroupParams p;
  if (spec.symmetric) {
    const double a = std::max(-lo, hi);
    p.scale = static_cast<float>(2 * a / max_code);
    p.zero = static_cast<float>(1 << (spec.bits - 1));
  } else {
    p.scale = static_cast<float>((hi - lo) / max_code);
    p.zero = static_cast<float>(std::nearbyint(-lo / static_cast<double>(p.scale)));
  }
  return p;
}

struct Textbook {
  Matrix<double> W_hat;
  double loss = 0;
};

// Paper Algorithm 1 one column at a time (no blocks, no lazy updates, no chunks), with
// U = chol(inverse(H'), upper) from Eigen.
Textbook textbook_gptq(const Matrix<double>& W_in, Matrix<double> H, const Options& o) {
  const Index rows = W_in.rows(), n = W_in.cols();
  Matrix<double> W = W_in;
  for (Index i = 0; i < n; ++i)
    if (H(i, i) == 0) {
      H(i, i) = 1;
      W.col(i).setZero();
    }
  std::vector<Index> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  if (o.act_order) std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return H(a, a) > H(b, b); });
  const Index group = o.spec.group_size;
  const int max_code = o.spec.max_code();
  // Static groups: parameters of input-column groups, fitted on W before any update.
  std::vector<std::vector<GroupParams>> fixed(static_cast<std::size_t>(rows));
  if (o.static_groups && group > 0)
    for (Index r = 0; r < rows; ++r)
      for (Index c0 = 0; c0 < n; c0 += group)
        fixed[static_cast<std::size_t>(r)].push_back(reference_fit(&W(r, c0), std::min(group, n - c0), o.spec));
  Matrix<double> P(n, n);
  for (Index a = 0; a < n; ++a)
    for (Index b = 0; b < n; ++b) P(a, b) = H(order[static_cast<std::size_t>(a)], order[static_cast<std::size_t>(b)]);
  P.diagonal().array() += o.damp * H.diagonal().mean();
  const Matrix<double> U = Eigen::LLT<Matrix<double>>(P.inverse()).matrixU();
  Textbook out{Matrix<double>::Zero(rows, n), 0.0};
  for (Index r = 0; r < rows; ++r) {
    std::vector<double> w(static_cast<std::size_t>(n));
    for (Index j = 0; j < n; ++j) w[static_cast<std::size_t>(j)] = W(r, order[static_cast<std::size_t>(j)]);
    GroupParams p;
    for (Index i = 0; i < n; ++i) {
      const Index column = order[static_cast<std::size_t>(i)];
      if (o.static_groups && group > 0)
        p = fixed[static_cast<std::size_t>(r)][static_cast<std::size_t>(column / group)];
      else if (group == 0 ? i == 0 : i % group == 0) {
        const Index length = group == 0 ? n : std::min(group, n - i);
        p = reference_fit(w.data() + i, length, o.spec);
      }
      const double scale = p.scale, zero = p.zero;
      const double q =
          std::clamp(std::nearbyint(w[static_cast<std::size_t>(i)] / scale + zero), 0.0, static_cast<double>(max_code));
      const double w_hat = (q - zero) * scale;
      const double e = (w[static_cast<std::size_t>(i)] - w_hat) / U(i, i);
      out.loss += e * e / 2;
      out.W_hat(r, column) = w_hat;
      for (Index j = i + 1; j < n; ++j) w[static_cast<std::size_t>(j)] -= e * U(i, j);
    }
  }
  return out;
}

// Activations with channel scales spread over two decades, so diag(H) is far from flat
// and act-order reorders.
Matrix<double> scaled_activations(Index tokens, Index n, std::uint64_t seed) {
  Matrix<double> X = test::random_matrix<double>(tokens, n, seed);
  for (Index c = 0; c < n; ++c)
    X.col(c) *= std::pow(10.0, static_cast<double>((c * 37) % n) / static_cast<double>(n) * 2 - 1);
  return X;
}

// Blocks of 32, groups smaller than, not dividing, and larger than a block, 70 rows
// (a full and a partial chunk of 64): codes and loss equal the textbook's.
TEST(Gptq, DoubleMatchesTextbookGptqExactly) {
  const Index rows = 70, n = 100;
  const Matrix<double> X = scaled_activations(400, n, 1);
  const Matrix<double> W = test::random_matrix<double>(rows, n, 2, 0.02);
  GPTQ<double> gptq(n);
  gptq.add_batch(X);
  int configs = 0;
  for (int bits : {2, 4})
    for (Index group : {Index(0), Index(16), Index(48)})
      for (bool symmetric : {false, true})
        for (bool act_order : {false, true})
          for (bool static_groups : {false, true}) {
            if (static_groups && group == 0) continue;
            GPTQ<double>::Options o;
            o.spec = {.bits = bits, .group_size = group, .symmetric = symmetric};
            o.block_size = 32;
            o.act_order = act_order;
            o.static_groups = static_groups;
            gptq.set_options(o);
            const auto result = gptq.quantize_with_report(W);
            Options of;
            of.spec = o.spec;
            of.act_order = act_order;
            of.static_groups = static_groups;
            const Textbook expected = textbook_gptq(W, gptq.hessian(), of);
            const Matrix<double> W_hat = result.weights.dequantize();
            const std::string config = std::to_string(bits) + "-bit g" + std::to_string(group) + " sym " +
                                       std::to_string(symmetric) + " act " + std::to_string(act_order) + " static " +
                                       std::to_string(static_groups);
            EXPECT_EQ((W_hat - expected.W_hat).cwiseAbs().maxCoeff(), 0.0) << config;
            EXPECT_NEAR(result.loss / expected.loss, 1.0, 1e-9) << config;
            ++configs;
          }
  EXPECT_EQ(configs, 40);
}

// Any block size (one column, not dividing the groups, wider than the layer) is the
// same algorithm.
TEST(Gptq, BlockSizeDoesNotChangeTheResult) {
  const Index rows = 20, n = 100;
  const Matrix<double> X = scaled_activations(300, n, 23);
  const Matrix<double> W = test::random_matrix<double>(rows, n, 24, 0.02);
  GPTQ<double> gptq(n);
  gptq.add_batch(X);
  for (Index block_size : {Index(1), Index(7), Index(1000)})
    for (Index group : {Index(0), Index(16)}) {
      GPTQ<double>::Options o{.spec = {.bits = 3, .group_size = group}, .block_size = block_size, .act_order = true};
      gptq.set_options(o);
      const auto result = gptq.quantize_with_report(W);
      Options of{.spec = o.spec, .act_order = true};
      const Textbook expected = textbook_gptq(W, gptq.hessian(), of);
      EXPECT_EQ((result.weights.dequantize() - expected.W_hat).cwiseAbs().maxCoeff(), 0.0)
          << "block " << block_size << " group " << group;
      EXPECT_NEAR(result.loss / expected.loss, 1.0, 1e-9) << "block " << block_size << " group " << group;
    }
}

// fp16 scales and zeros: the stored (rounded) values are the ones quantized with, so the
// loss identity still holds.
TEST(Gptq, Float16ParametersAreTheOnesUsed) {
  const Index n = 128;
  const Matrix<float> X = scaled_activations(256, n, 25).cast<float>();
  const Matrix<float> W = test::random_matrix<float>(30, n, 26, 0.02);
  GPTQ<float> gptq(n, {.spec = {.bits = 4, .group_size = 32, .param_type = ParamType::Float16}, .act_order = true});
  gptq.add_batch(X);
  const auto result = gptq.quantize_with_report(W);
  const auto scales = result.weights.scales();
  for (Index i = 0; i < scales.size(); ++i)
    EXPECT_EQ(scales.data()[i], round_param(scales.data()[i], ParamType::Float16));
  Matrix<double> H = gptq.hessian();
  H.diagonal().array() += result.damping;
  const Matrix<double> D = (W - result.weights.dequantize()).cast<double>();
  EXPECT_NEAR(result.loss / ((D * H * D.transpose()).trace() / 2), 1.0, 2e-3);
}

TEST(Gptq, FloatAgreesWithTextbookGptq) {
  const Index rows = 100, n = 300;
  const Matrix<double> X = scaled_activations(500, n, 3);
  const Matrix<double> W = test::random_matrix<double>(rows, n, 4, 0.02);
  GPTQ<float> gptq(n, {.spec = {.bits = 3, .group_size = 64}, .act_order = true});
  gptq.add_batch(X.cast<float>());
  const auto result = gptq.quantize_with_report(W.cast<float>());
  Options o = gptq.options();
  const Textbook expected = textbook_gptq(W, gptq.hessian(), o);
  const Matrix<double> W_hat = result.weights.dequantize().cast<double>();
  const double differing = static_cast<double>(((W_hat - expected.W_hat).array().abs() > 1e-6).count());
  EXPECT_LT(differing / static_cast<double>(W.size()), 0.01);
  EXPECT_NEAR(result.loss / expected.loss, 1.0, 1e-3);
}

// ---- properties ---------------------------------------------------------------------

// H = c I: U is diagonal, no error moves, every group keeps its original weights: RTN.
TEST(Gptq, DiagonalEqualHessianEqualsRtn) {
  const Index n = 96;
  const Matrix<float> W = test::random_matrix<float>(40, n, 5, 0.05);
  for (Index group : {Index(0), Index(32), Index(40)})
    for (bool symmetric : {false, true})
      for (bool act_order : {false, true})
        for (bool mse : {false, true}) {
          if (mse && act_order) continue;  // act-order does not change a diagonal H's order
          QuantSpec spec{.bits = 3, .group_size = group, .symmetric = symmetric};
          GPTQ<float> gptq(n, {.spec = spec, .act_order = act_order, .mse = mse});
          gptq.add_batch(Matrix<float>(3.0f * Matrix<float>::Identity(n, n)));  // H = (18 / n) I
          const auto q = gptq.quantize(W);
          spec.integral_zero = true;  // GPTQ's quantizer rounds the zero
          const auto r = RTN<float>({.spec = spec, .mse = mse}).quantize(W);
          EXPECT_TRUE(q == r) << "g" << group << " sym " << symmetric << " act " << act_order << " mse " << mse;
        }
}

// loss = sum e^2 / 2 = tr((W - W_hat) H' (W - W_hat)^T) / 2, H' the damped Hessian.
template <class T>
void check_loss_identity(double tolerance) {
  const Index n = 200;
  Matrix<double> X = scaled_activations(150, n, 6);  // fewer tokens than columns
  X.col(7).setZero();
  const Matrix<T> W = test::random_matrix<T>(50, n, 7, 0.02);
  for (bool act_order : {false, true}) {
    GPTQ<T> gptq(n, {.spec = {.bits = 3, .group_size = 32}, .act_order = act_order});
    gptq.add_batch(X.cast<T>());
    const auto result = gptq.quantize_with_report(W);
    Matrix<double> H = gptq.hessian();
    for (Index i = 0; i < n; ++i)
      if (H(i, i) == 0) H(i, i) = 1;
    H.diagonal().array() += result.damping;
    Matrix<double> W0 = W.template cast<double>();
    W0.col(7).setZero();  // dead: GPTQ quantizes a zero column
    const Matrix<double> D = W0 - result.weights.dequantize().template cast<double>();
    const double expected = (D * H * D.transpose()).trace() / 2;
    EXPECT_NEAR(result.loss / expected, 1.0, tolerance) << "act_order " << act_order;
  }
}

TEST(Gptq, LossEqualsTheSumItDefinesDouble) { check_loss_identity<double>(1e-9); }
TEST(Gptq, LossEqualsTheSumItDefinesFloat) { check_loss_identity<float>(2e-3); }

TEST(Gptq, RankDeficientCalibrationWithDeadColumnsWorks) {
  const Index n = 64;
  Matrix<float> X = test::random_matrix<float>(20, n, 8);  // rank 20 < 64
  for (Index c : {5, 40, 41}) X.col(c).setZero();
  const Matrix<float> W = test::random_matrix<float>(30, n, 9, 0.02);
  for (bool act_order : {false, true}) {
    GPTQ<float> gptq(n, {.spec = {.bits = 4, .group_size = 16}, .act_order = act_order});
    gptq.add_batch(X);
    const auto result = gptq.quantize_with_report(W);
    EXPECT_EQ(result.dead_columns, 3);
    EXPECT_TRUE(std::isfinite(result.loss));
    const Matrix<float> W_hat = result.weights.dequantize();
    EXPECT_TRUE(W_hat.allFinite());
    for (Index c : {5, 40, 41}) EXPECT_EQ(W_hat.col(c).cwiseAbs().maxCoeff(), 0.0f) << c;
    // On its own calibration data GPTQ beats plain rounding.
    const auto rtn = RTN<float>(QuantSpec{.bits = 4, .group_size = 16, .integral_zero = true}).quantize(W);
    EXPECT_LT(test::out_rel(X, W, W_hat), test::out_rel(X, W, rtn.dequantize()));
  }
}

// An indefinite H: damping grows x10 per failed Cholesky; once out of retries, an
// Error naming the layer size and the last damping.
TEST(Gptq, DampingGrowsUntilCholeskySucceedsThenGivesUp) {
  Matrix<double> H(2, 2);
  H << 1, 3, 3, 1;  // eigenvalues -2 and 4; mean diag 1
  const Matrix<float> W = test::random_matrix<float>(4, 2, 10);
  GPTQ<float> gptq(2, {.spec = {.bits = 4, .group_size = 0}});
  gptq.set_hessian(H, 10);
  const auto result = gptq.quantize_with_report(W);  // 0.01, 0.1, 1 fail; 10 works
  EXPECT_NEAR(result.damp, 10.0, 1e-12);
  EXPECT_NEAR(result.damping, 10.0, 1e-12);
  GPTQ<float> limited(2, {.spec = {.bits = 4, .group_size = 0}, .damp_retries = 2});
  limited.set_hessian(H, 10);
  expect_error([&] { (void)limited.quantize(W); }, {"in_features = 2", "last damp = 1", "not positive definite"});
}

TEST(Gptq, BadInputThrows) {
  const Matrix<float> X = test::random_matrix<float>(10, 8, 11), W = test::random_matrix<float>(4, 8, 12);
  GPTQ<float> gptq(8);
  expect_error([&] { (void)gptq.quantize(W); }, {"no calibration data"});
  expect_error([&] { gptq.add_batch(test::random_matrix<float>(10, 9, 1)); }, {"X has 9 columns", "in_features is 8"});
  Matrix<float> bad = X;
  bad(3, 4) = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { gptq.add_batch(bad); }, {"X(3, 4)"});
  EXPECT_EQ(gptq.tokens(), 0);
  gptq.add_batch(X);
  expect_error([&] { (void)gptq.quantize(test::random_matrix<float>(4, 7, 1)); }, {"W has 7 columns"});
  Matrix<float> bad_w = W;
  bad_w(1, 2) = std::numeric_limits<float>::infinity();
  expect_error([&] { (void)gptq.quantize(bad_w); }, {"W(1, 2)"});
  expect_error([] { GPTQ<float> g(0); }, {"in_features = 0"});
  expect_error([] { GPTQ<float> g(8, {.block_size = 0}); }, {"block_size = 0"});
  expect_error([] { GPTQ<float> g(8, {.damp = -1}); }, {"damp = -1"});
  expect_error([] { GPTQ<float> g(8, {.damp = std::numeric_limits<double>::quiet_NaN()}); }, {"damp = nan"});
  expect_error([] { GPTQ<float> g(8, {.spec = {.bits = 9}}); }, {"bits = 9"});
  expect_error([] { GPTQ<float> g(8, {.spec = {.group_axis = GroupAxis::Output}}); }, {"group_axis"});
  expect_error([&] { gptq.set_hessian(Matrix<double>::Identity(7, 7), 1); }, {"7x7", "in_features is 8"});
  Matrix<double> asymmetric = Matrix<double>::Identity(8, 8);
  asymmetric(2, 1) = 0.5;
  expect_error([&] { gptq.set_hessian(asymmetric, 1); }, {"not symmetric at (2, 1)"});
  // A custom fit returning a zero scale is refused, not divided by.
  GPTQ<float> custom(8, {.group_fit = [](const float*, Index, const QuantSpec&) { return GroupParams{0.0f, 0.0f}; }});
  custom.add_batch(X);
  expect_error([&] { (void)custom.quantize(W); }, {"scale = 0"});
}

TEST(Gptq, ResultsDoNotDependOnThreadCount) {
  const int threads = num_threads();
  const Index n = 1024;  // large enough for every parallel step (worth_parallel)
  const Matrix<float> X = scaled_activations(300, n, 13).cast<float>();
  const Matrix<float> W = test::random_matrix<float>(150, n, 14, 0.02);  // 2 full chunks and a partial one
  std::vector<Matrix<double>> hessians;
  std::vector<QuantizedMatrix<float>> results;
  std::vector<double> losses;
  for (int t : {1, 2}) {
    set_num_threads(t);
    GPTQ<float> gptq(n, {.spec = {.bits = 4, .group_size = 32}, .act_order = true});
    gptq.add_batch(X);
    hessians.push_back(gptq.hessian());
    const auto result = gptq.quantize_with_report(W);
    results.push_back(result.weights);
    losses.push_back(result.loss);
  }
  set_num_threads(threads);
  EXPECT_TRUE(hessians[0] == hessians[1]);
  EXPECT_TRUE(results[0] == results[1]);
  EXPECT_EQ(losses[0], losses[1]);
}

// AVX2 and AVX-512 run the same FMA arithmetic: identical results. The scalar path
// (separate multiply and add) lands within rounding.
TEST(Gptq, IsaVariantsAgree) {
  const Isa original = active_isa();
  const Index n = 200;
  const Matrix<float> X = scaled_activations(300, n, 15).cast<float>();
  const Matrix<float> W = test::random_matrix<float>(70, n, 16, 0.02);
  std::vector<QuantizedMatrix<float>> results;
  std::vector<double> losses;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512}) {
    ASSERT_TRUE(isa_supported(isa)) << isa_name(isa);
    set_isa(isa);
    GPTQ<float> gptq(n, {.spec = {.bits = 4, .group_size = 64}});
    gptq.add_batch(X);
    const auto result = gptq.quantize_with_report(W);
    results.push_back(result.weights);
    losses.push_back(result.loss);
  }
  set_isa(original);
  EXPECT_TRUE(results[1] == results[2]);
  EXPECT_EQ(losses[1], losses[2]);
  EXPECT_NEAR(losses[0] / losses[2], 1.0, 1e-2);
  EXPECT_NEAR(test::out_rel(X, W, results[0].dequantize()) / test::out_rel(X, W, results[2].dequantize()), 1.0, 1e-2);
}

// Act-order with groups: stored permuted (groups contiguous), columns by descending
// diag(H); g_idx is the classic per-column group index; decoding through g_idx gives
// dequantize().
TEST(Gptq, ActOrderStoresPermutationAndExportsGIdx) {
  const Index n = 100, group = 16;
  const Matrix<float> X = scaled_activations(200, n, 17).cast<float>();
  const Matrix<float> W = test::random_matrix<float>(20, n, 18, 0.02);
  GPTQ<float> gptq(n, {.spec = {.bits = 4, .group_size = group}, .act_order = true});
  gptq.add_batch(X);
  const auto q = gptq.quantize(W);
  const auto& perm = q.permutation();
  ASSERT_EQ(static_cast<Index>(perm.size()), n);
  const Matrix<double> H = gptq.hessian();
  for (Index j = 1; j < n; ++j) EXPECT_GE(H(perm[j - 1], perm[j - 1]), H(perm[j], perm[j])) << j;
  const auto g_idx = gptq_g_idx(q);
  for (Index j = 0; j < n; ++j)
    EXPECT_EQ(g_idx[static_cast<std::size_t>(perm[static_cast<std::size_t>(j)])], j / group);
  const Matrix<float> W_hat = q.dequantize();
  for (Index r = 0; r < W.rows(); ++r)
    for (Index c = 0; c < n; ++c) {
      const Index g = g_idx[static_cast<std::size_t>(c)];
      EXPECT_EQ(W_hat(r, c), (static_cast<float>(q.code(r, c)) - q.zeros()(r, g)) * q.scales()(r, g));
    }
  // Static groups and one group per row keep input order.
  for (const Options& o : {Options{.spec = {.bits = 4, .group_size = group}, .act_order = true, .static_groups = true},
                           Options{.spec = {.bits = 4, .group_size = 0}, .act_order = true}}) {
    gptq.set_options(o);
    const auto plain = gptq.quantize(W);
    EXPECT_TRUE(plain.permutation().empty());
    const auto plain_g_idx = gptq_g_idx(plain);
    for (Index c = 0; c < n; ++c)
      EXPECT_EQ(plain_g_idx[static_cast<std::size_t>(c)], o.spec.group_size == 0 ? 0 : c / group);
  }
}

TEST(Gptq, StreamedBatchesEqualOneBatch) {
  const Index n = 130;
  const Matrix<float> X = test::random_matrix<float>(777, n, 19);
  GPTQ<float> once(n), streamed(n);
  once.add_batch(X);
  streamed.add_batch(X.topRows(1));
  streamed.add_batch(X.middleRows(1, 300));
  streamed.add_batch(X.bottomRows(476));
  streamed.add_batch(X.topRows(0));  // empty batches are fine
  EXPECT_EQ(streamed.tokens(), 777);
  const Matrix<double> Xd = X.cast<double>();
  const Matrix<double> expected = 2.0 / 777.0 * Xd.transpose() * Xd;
  EXPECT_LE((once.hessian() - expected).cwiseAbs().maxCoeff(), 1e-4);
  EXPECT_LE((streamed.hessian() - expected).cwiseAbs().maxCoeff(), 1e-4);
  // Tensor overloads are the same calls.
  Eigen::TensorMap<Eigen::Tensor<const float, 2, Eigen::RowMajor>> view(X.data(), 777, n);
  GPTQ<float> from_tensor(n);
  from_tensor.add_batch(view);
  EXPECT_TRUE(from_tensor.hessian() == once.hessian());
}

// Strided views (blocks of larger matrices) are read in place and give the same result.
TEST(Gptq, StridedViewsAreTheSameCall) {
  const Index n = 70;
  const Matrix<float> X_wide = test::random_matrix<float>(120, n + 9, 27);
  const Matrix<float> W_wide = test::random_matrix<float>(33, n + 5, 28, 0.02);
  GPTQ<float> viewed(n, {.spec = {.bits = 3, .group_size = 16}, .act_order = true}), copied(n, viewed.options());
  viewed.add_batch(X_wide.leftCols(n));
  copied.add_batch(Matrix<float>(X_wide.leftCols(n)));
  EXPECT_TRUE(viewed.hessian() == copied.hessian());
  EXPECT_TRUE(viewed.quantize(W_wide.rightCols(n)) == copied.quantize(Matrix<float>(W_wide.rightCols(n))));
}

TEST(Gptq, SaveLoadRoundTripsExactly) {
  const Index n = 40;
  GPTQ<float> gptq(n, {.spec = {.bits = 3, .group_size = 8}});
  gptq.add_batch(test::random_matrix<float>(90, n, 20));
  std::stringstream stream;
  gptq.save(stream);
  const std::string bytes = stream.str();
  EXPECT_EQ(bytes.size(), 8u + 4 + 4 + 8 + 8 + 8 + 8u * n * (n + 1) / 2 + 8);
  EXPECT_EQ(bytes.substr(0, 7), "LBGPTQH");
  GPTQ<float> loaded(n, gptq.options());
  std::stringstream in(bytes);
  loaded.load(in);
  EXPECT_EQ(loaded.tokens(), 90);
  EXPECT_TRUE(loaded.hessian() == gptq.hessian());
  const Matrix<float> W = test::random_matrix<float>(10, n, 21);
  EXPECT_TRUE(loaded.quantize(W) == gptq.quantize(W));

  const auto path = (std::filesystem::temp_directory_path() / "lowbit_gptq_hessian_test.bin").string();
  gptq.save(path);
  GPTQ<float> from_file(n);
  from_file.load(path);
  std::filesystem::remove(path);
  EXPECT_TRUE(from_file.hessian() == gptq.hessian());

  // A file that cannot be written leaves nothing behind and names the directory.
  const auto missing = std::filesystem::temp_directory_path() / "lowbit_gptq_no_such_dir";
  std::filesystem::remove_all(missing);
  expect_error([&] { gptq.save((missing / "h.bin").string()); }, {"lowbit_gptq_no_such_dir", "does not exist"});
  EXPECT_FALSE(std::filesystem::exists(missing));
}

TEST(Gptq, LoadRejectsMalformedFiles) {
  const Index n = 6;
  GPTQ<float> gptq(n);
  gptq.add_batch(test::random_matrix<float>(9, n, 22));
  std::stringstream stream;
  gptq.save(stream);
  const std::string good = stream.str();
  auto load = [](const std::string& bytes, Index in_features = 6) {
    GPTQ<float> target(in_features);
    std::stringstream in(bytes);
    target.load(in);
  };
  std::string bad_magic = good;
  bad_magic[0] = 'X';
  expect_error([&] { load(bad_magic); }, {"bad magic"});
  std::string bad_version = good;
  bad_version[8] = 2;
  expect_error([&] { load(bad_version); }, {"version 2"});
  expect_error([&] { load(good, 7); }, {"in_features = 6", "in_features = 7"});
  expect_error([&] { load(good.substr(0, good.size() - 20)); }, {"truncated"});
  expect_error([&] { load(good.substr(0, 20)); }, {"truncated"});
  std::string flipped = good;
  flipped[48] = static_cast<char>(flipped[48] ^ 1);
  expect_error([&] { load(flipped); }, {"checksum"});
  expect_error([&] { GPTQ<float>(n).load(std::string("/nonexistent/lowbit/h.bin")); }, {"cannot open"});
}

// ---- pluggable group fits -------------------------------------------------------------

// On the fixture layer's first 64 rows (one chunk), to keep the slower fits cheap.
TEST(Gptq, CustomAndHqqFitsPlugIn) {
  const auto& layer = test::fixture_layer();
  const Matrix<float> W = layer.W.topRows(64);
  auto out_rel = [&](const QuantizedMatrix<float>& q) {
    return product_transposed(layer.X, W - q.dequantize()).cast<double>().norm() /
           product_transposed(layer.X, W).cast<double>().norm();
  };
  auto& gptq = fixture_gptq();
  const QuantSpec spec{.bits = 4, .group_size = 128};
  gptq.set_options({.spec = spec});
  const double minmax = out_rel(gptq.quantize(W));
  const double rtn = out_rel(RTN<float>(spec).quantize(W));
  // A custom callable sees each group's current weights; returning min-max's answer
  // reproduces min-max.
  QuantSpec integral = spec;
  integral.integral_zero = true;
  gptq.set_options(
      {.spec = integral, .group_fit = [](const float* w, Index n, const QuantSpec& s) { return fit_minmax(w, n, s); }});
  EXPECT_EQ(out_rel(gptq.quantize(W)), minmax);
  // HQQ's fit (fractional zero) under GPTQ's error feedback: far better than RTN and
  // within a few percent of min-max on this layer.
  gptq.set_options({.spec = spec, .group_fit = GPTQ<float>::hqq_fit()});
  const auto hqq = gptq.quantize(W);
  EXPECT_LT(out_rel(hqq), 0.8 * rtn);
  EXPECT_LT(out_rel(hqq), 1.05 * minmax);
  const auto zeros = hqq.zeros();
  EXPECT_GT((zeros.array() != zeros.array().round()).count(), 0);  // HQQ zeros are fractional
  // MSE search: better than RTN.
  gptq.set_options({.spec = spec, .mse = true});
  EXPECT_LT(out_rel(gptq.quantize(W)), 0.8 * rtn);
}

}  // namespace
}  // namespace lowbit

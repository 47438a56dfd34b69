// Size and value limits across the library: what every quantizer, kernel and the
// QuantizedMatrix constructor do at the edges (overflowing shapes, empty matrices,
// oversized groups, bad bit widths, NaN/Inf, denormals, constant groups, a Hessian that
// no damping rescues). Each case checks the exact lowbit::Error (a stable substring
// naming the argument and its value) or the defined result.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/kernels/gemv.hpp"
#include "lowbit/kernels/gemv_int8.hpp"
#include "lowbit/kernels/matmul.hpp"
#include "lowbit/quantizers/gptq.hpp"
#include "lowbit/quantizers/hqq.hpp"
#include "lowbit/quantizers/omniquant.hpp"
#include "lowbit/quantizers/qllm.hpp"
#include "lowbit/quantizers/rtn.hpp"
#include "test_util.hpp"

namespace lowbit {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr Index kMaxIndex = std::numeric_limits<Index>::max();

// Runs fn, expecting lowbit::Error whose message holds every one of `parts`.
void expect_error(const std::function<void()>& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string message = e.what();
    for (const auto& part : parts) EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message;
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected lowbit::Error, got another exception: " << e.what();
    return;
  }
  ADD_FAILURE() << "expected lowbit::Error holding '" << *parts.begin() << "', nothing was thrown";
}

// Every scale positive and finite, every zero finite, the dequantized matrix finite.
template <class T>
void expect_well_formed(const QuantizedMatrix<T>& q) {
  EXPECT_TRUE(q.scales().allFinite());
  EXPECT_TRUE((q.scales().array() > 0).all()) << "a zero scale decodes every code to 0 and hides the zero";
  EXPECT_TRUE(q.zeros().allFinite());
  EXPECT_TRUE(q.dequantize().allFinite());
}

HQQ<float> small_hqq(QuantSpec spec) { return HQQ<float>(HQQ<float>::Options{.spec = spec, .iters = 5}); }

GPTQ<float> calibrated_gptq(Index in_features, QuantSpec spec) {
  GPTQ<float> gptq(in_features, {.spec = spec});
  gptq.add_batch(test::random_matrix<float>(4 * in_features, in_features, 3));
  return gptq;
}

// ---- Shapes whose storage size overflows Eigen::Index / size_t -------------------------

TEST(Limits, QuantizedMatrixRefusesShapesWhoseByteCountOverflows) {
  const QuantSpec spec{.bits = 4, .group_size = 64};
  const Index big = Index{1} << 40;
  // codes: 2^40 rows x 2^39 bytes; scales: 2^40 x 2^34 groups: both overflow 64 bits.
  expect_error([&] { QuantizedMatrix<float> q(big, big, spec); }, {"QuantizedMatrix shape 1099511627776x1099511627776", "overflows"});
  // Padding the row to 32 codes overflows.
  expect_error([&] { QuantizedMatrix<float> q(1, kMaxIndex, spec); },
               {"QuantizedMatrix shape 1x" + std::to_string(kMaxIndex), "overflows"});
  // No rows, but one row's byte count alone overflows.
  expect_error([&] { QuantizedMatrix<float> q(0, kMaxIndex, spec); }, {"QuantizedMatrix shape 0x", "overflows"});
  // Output-axis groups store W^T: the same limits, on the transposed shape.
  expect_error([&] { QuantizedMatrix<float> q(kMaxIndex, 1, QuantSpec{.bits = 2, .group_axis = GroupAxis::Output}); },
               {"QuantizedMatrix shape " + std::to_string(kMaxIndex) + "x1", "overflows"});
  expect_error([&] { QuantizedMatrix<float> q(-1, 4, spec); }, {"QuantizedMatrix shape -1x4 is negative"});
}

TEST(Limits, PackedBytesCountsEveryStoredByte) {
  const QuantSpec spec{.bits = 3, .group_size = 32, .param_type = ParamType::Float16};
  const QuantizedMatrix<float> q(5, 70, spec);  // 70 codes pad to 96: 36 bytes a row; 3 groups
  EXPECT_EQ(q.row_bytes(), 36);
  EXPECT_EQ(q.packed_bytes(), std::size_t{5 * 36 + 2 * 5 * 3 * 2});
  EXPECT_EQ(QuantizedMatrix<float>(0, 70, spec).packed_bytes(), 0u);
  EXPECT_EQ(QuantizedMatrix<float>(5, 0, spec).packed_bytes(), 0u);
  EXPECT_EQ(QuantizedMatrix<float>(0, 0, spec).bits_per_weight(), 0.0);
}

// ---- Group sizes larger than the row -------------------------------------------------

TEST(Limits, GroupLargerThanTheRowIsOneGroupPerRow) {
  const Matrix<float> W = test::random_matrix<float>(6, 100, 1);
  const RTN<float> per_row(QuantSpec{.bits = 3, .group_size = 0});
  for (Index group_size : {Index{101}, Index{1} << 40, kMaxIndex}) {
    SCOPED_TRACE(group_size);
    const QuantSpec spec{.bits = 3, .group_size = group_size};
    // ASSERT: with a wrong group count the quantizers below write out of bounds.
    ASSERT_EQ(spec.groups_per_row(100), 1);
    EXPECT_NO_THROW({
      const QuantizedMatrix<float> q(6, 100, spec);
      EXPECT_EQ(q.groups_per_row(), 1);
    });
    EXPECT_NO_THROW({
      const auto q = RTN<float>(spec).quantize(W);
      EXPECT_TRUE(q.dequantize() == per_row.quantize(W).dequantize());
    });
    EXPECT_NO_THROW(EXPECT_EQ(small_hqq(spec).quantize(W).groups_per_row(), 1));
    EXPECT_NO_THROW(EXPECT_EQ(calibrated_gptq(100, spec).quantize(W).groups_per_row(), 1));
  }
  expect_error([] { QuantSpec{.bits = 4, .group_size = -1}.validate(); }, {"QuantSpec.group_size = -1 is negative"});
}

// ---- Zero-row and zero-column matrices --------------------------------------------------

TEST(Limits, EmptyMatricesThroughRtnHqqAndGptq) {
  const QuantSpec spec{.bits = 4, .group_size = 32};
  for (auto [rows, cols] : {std::pair<Index, Index>{0, 64}, {7, 0}, {0, 0}}) {
    SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(cols));
    const Matrix<float> W(rows, cols);
    for (const auto& q : {RTN<float>(spec).quantize(W), small_hqq(spec).quantize(W)}) {
      EXPECT_EQ(q.rows(), rows);
      EXPECT_EQ(q.cols(), cols);
      const Matrix<float> W_hat = q.dequantize();
      EXPECT_EQ(W_hat.rows(), rows);
      EXPECT_EQ(W_hat.cols(), cols);
    }
  }
  // GPTQ needs at least one input feature; zero output rows are fine.
  expect_error([&] { GPTQ<float> gptq(0, {.spec = spec}); }, {"GPTQ: in_features = 0 must be >= 1"});
  const auto q = calibrated_gptq(64, spec).quantize(Matrix<float>(0, 64));
  EXPECT_EQ(q.rows(), 0);
  EXPECT_EQ(q.cols(), 64);
  // Calibration with no tokens adds nothing: quantize still asks for data.
  GPTQ<float> empty(64, {.spec = spec});
  empty.add_batch(Matrix<float>(0, 64));
  expect_error([&] { (void)empty.quantize(test::random_matrix<float>(4, 64, 2)); }, {"GPTQ.quantize: no calibration data"});
}

TEST(Limits, EmptyMatricesThroughOmniQuantAndQllm) {
  const Matrix<float> X = test::random_matrix<float>(64, 32, 4);
  OmniQuant<float> omni(OmniQuantOptions<float>{.weight = {.bits = 4, .group_size = 32}, .epochs = 1});
  expect_error([&] { omni.calibrate(Matrix<float>(5, 0)); }, {"calibrate: X has no columns"});
  expect_error([&] { (void)omni.quantize(test::random_matrix<float>(4, 32, 5)); }, {"call calibrate() with activations first"});
  omni.calibrate(X);
  const QuantizedLayer<float> omni_layer = omni.quantize(Matrix<float>(0, 32));
  EXPECT_EQ(omni_layer.out_features(), 0);
  EXPECT_EQ(omni_layer.in_features(), 32);
  EXPECT_EQ(omni_layer.forward(X).rows(), 64);
  EXPECT_EQ(omni_layer.forward(X).cols(), 0);

  QLLM<float> qllm(QLLMOptions<float>{.weight = {.bits = 4, .group_size = 32}, .extra_channel_ratios = {0.1}, .epochs = 1});
  expect_error([&] { qllm.calibrate(Matrix<float>(5, 0)); }, {"QLLM.calibrate: X has no columns"});
  qllm.calibrate(X);
  const QuantizedLayer<float> qllm_layer = qllm.quantize(Matrix<float>(0, 32));
  EXPECT_EQ(qllm_layer.out_features(), 0);
  EXPECT_EQ(qllm_layer.forward(X).rows(), 64);
  EXPECT_EQ(qllm_layer.forward(X).cols(), 0);
}

TEST(Limits, EmptyMatricesThroughTheKernels) {
  const QuantSpec spec{.bits = 4, .group_size = 32};
  // No rows: y and Y are empty and nothing is read.
  const auto no_rows = RTN<float>(spec).quantize(Matrix<float>(0, 40));
  Vector<float> y(0);
  gemv(no_rows, Vector<float>::Ones(40), y);
  gemv_int8(no_rows, Vector<float>::Ones(40), y);
  Matrix<float> Y(3, 0);
  matmul(no_rows, Matrix<float>::Ones(3, 40), Y);
  EXPECT_EQ(no_rows.dequantize().size(), 0);
  // No columns: W x is a sum over nothing, 0 (y starts as NaN to see it written).
  for (GroupAxis axis : {GroupAxis::Input, GroupAxis::Output}) {
    QuantSpec s = spec;
    s.group_axis = axis;
    const auto no_cols = RTN<float>(s).quantize(Matrix<float>(5, 0));
    Vector<float> y5 = Vector<float>::Constant(5, kNaN);
    gemv(no_cols, Vector<float>(0), y5);
    EXPECT_TRUE((y5.array() == 0).all());
    y5.setConstant(kNaN);
    gemv_int8(no_cols, Vector<float>(0), y5);
    EXPECT_TRUE((y5.array() == 0).all());
    Matrix<float> Y5 = Matrix<float>::Constant(3, 5, kNaN);
    matmul(no_cols, Matrix<float>(3, 0), Y5);
    EXPECT_TRUE((Y5.array() == 0).all());
  }
  // No tokens: Y has no rows.
  const auto W = RTN<float>(spec).quantize(test::random_matrix<float>(5, 40, 6));
  Matrix<float> none(0, 5);
  matmul(W, Matrix<float>(0, 40), none);
  expect_error([&] { gemv(W, Vector<float>(0), y); }, {"gemv: x has 0 entries, W has 40 columns"});
}

// ---- Bits outside 1..8 --------------------------------------------------------------------

TEST(Limits, BitsOutsideOneToEightAreRefusedEverywhere) {
  for (int bits : {0, 9, -1, 16}) {
    SCOPED_TRACE(bits);
    const std::string named = "QuantSpec.bits = " + std::to_string(bits) + " is outside 1..8";
    const QuantSpec spec{.bits = bits, .group_size = 32};
    expect_error([&] { spec.validate(); }, {named});
    expect_error([&] { QuantizedMatrix<float> q(4, 32, spec); }, {named});
    expect_error([&] { (void)RTN<float>(spec).quantize(Matrix<float>::Ones(2, 32)); }, {named});
    expect_error([&] { HQQ<float> hqq(HQQ<float>::Options{.spec = spec}); }, {named});
    expect_error([&] { GPTQ<float> gptq(32, {.spec = spec}); }, {named});
    expect_error([&] { OmniQuant<float> omni(OmniQuantOptions<float>{.weight = spec}); }, {named});
    expect_error([&] { QLLM<float> qllm(QLLMOptions<float>{.weight = spec}); }, {named});
  }
  // Both ends of the range work, 1 bit included.
  const Matrix<float> W = test::random_matrix<float>(4, 64, 7);
  for (int bits : {1, 8}) expect_well_formed(RTN<float>(QuantSpec{.bits = bits, .group_size = 32}).quantize(W));
}

// ---- NaN and Inf ----------------------------------------------------------------------

TEST(Limits, NonFiniteWeightsAreRefusedByEveryQuantizer) {
  const QuantSpec spec{.bits = 4, .group_size = 32};
  const Matrix<float> X = test::random_matrix<float>(64, 32, 8);
  for (float bad : {kNaN, kInf, -kInf}) {
    Matrix<float> W = test::random_matrix<float>(4, 32, 9);
    W(2, 5) = bad;
    const std::string value = std::isnan(bad) ? "nan" : bad > 0 ? "inf" : "-inf";
    const std::string named = "W(2, 5) = " + value + " is not finite";
    SCOPED_TRACE(value);
    expect_error([&] { (void)RTN<float>(spec).quantize(W); }, {named});
    expect_error([&] { (void)small_hqq(spec).quantize(W); }, {named});
    expect_error([&] { (void)calibrated_gptq(32, spec).quantize(W); }, {named});
    OmniQuant<float> omni(OmniQuantOptions<float>{.weight = spec, .epochs = 1});
    omni.calibrate(X);
    expect_error([&] { (void)omni.quantize(W); }, {named});
    QLLM<float> qllm(QLLMOptions<float>{.weight = spec, .extra_channel_ratios = {}, .rank = 0, .epochs = 1});
    qllm.calibrate(X);
    expect_error([&] { (void)qllm.quantize(W); }, {named});
  }
}

TEST(Limits, NonFiniteCalibrationActivationsAreRefused) {
  for (float bad : {kNaN, kInf, -kInf}) {
    Matrix<float> X = test::random_matrix<float>(40, 32, 10);
    X(17, 3) = bad;
    const std::string value = std::isnan(bad) ? "nan" : bad > 0 ? "inf" : "-inf";
    const std::string named = "X(17, 3) = " + value + " is not finite";
    SCOPED_TRACE(value);
    GPTQ<float> gptq(32, {});
    expect_error([&] { gptq.add_batch(X); }, {named});
    EXPECT_EQ(gptq.tokens(), 0) << "a refused batch adds nothing";
    OmniQuant<float> omni(OmniQuantOptions<float>{});
    expect_error([&] { omni.calibrate(X); }, {named});
    QLLM<float> qllm(QLLMOptions<float>{});
    expect_error([&] { qllm.calibrate(X); }, {named});
  }
}

TEST(Limits, NonFiniteActivationsAreRefusedByTheKernels) {
  const auto W = RTN<float>(QuantSpec{.bits = 4, .group_size = 32}).quantize(test::random_matrix<float>(8, 64, 11));
  for (float bad : {kNaN, kInf, -kInf}) {
    const std::string value = std::isnan(bad) ? "nan" : bad > 0 ? "inf" : "-inf";
    SCOPED_TRACE(value);
    Vector<float> x = Vector<float>::Ones(64), y(8);
    x(41) = bad;
    expect_error([&] { gemv(W, x, y); }, {"x(41, 0) = " + value + " is not finite"});
    expect_error([&] { gemv_int8(W, x, y); }, {"x(41, 0) = " + value + " is not finite"});
    Matrix<float> X = Matrix<float>::Ones(3, 64), Y(3, 8);
    X(2, 9) = bad;
    expect_error([&] { matmul(W, X, Y); }, {"X(2, 9) = " + value + " is not finite"});
  }
  // Finite inputs whose products overflow float: the result is not finite (inf, or NaN
  // where the folded zero-point term subtracts inf from inf), never a finite wrong value.
  // (256 columns: gemv_int8 takes its integer path only for rows of a full block.)
  Vector<float> huge = Vector<float>::Constant(256, 3e38f), y(8);
  const auto positive = RTN<float>(QuantSpec{.bits = 4, .group_size = 32}).quantize(Matrix<float>::Constant(8, 256, 2.0f));
  gemv(positive, huge, y);
  EXPECT_FALSE(y.array().isFinite().any()) << y.transpose();
  gemv_int8(positive, huge, y);
  EXPECT_FALSE(y.array().isFinite().any()) << y.transpose();
}

// ---- Denormals --------------------------------------------------------------------------

TEST(Limits, DenormalWeightsGiveFiniteParametersAndCodes) {
  const float tiny = std::numeric_limits<float>::denorm_min();
  // Groups: all denormal of both signs; one denormal step wide; denormals beside a normal value.
  Matrix<float> W(3, 32);
  for (Index c = 0; c < 32; ++c) {
    W(0, c) = (c % 2 ? 1 : -1) * tiny * static_cast<float>(c + 1);
    W(1, c) = c % 2 ? tiny : 0.0f;
    W(2, c) = c == 0 ? 1.0f : tiny * static_cast<float>(c);
  }
  for (bool integral_zero : {false, true})
    for (ParamType param : {ParamType::Float32, ParamType::Float16}) {
      SCOPED_TRACE(std::to_string(integral_zero) + (param == ParamType::Float16 ? " f16" : " f32"));
      const QuantSpec spec{.bits = 4, .group_size = 32, .integral_zero = integral_zero, .param_type = param};
      const std::pair<const char*, std::function<QuantizedMatrix<float>()>> quantizers[] = {
          {"RTN", [&] { return RTN<float>(spec).quantize(W); }},
          {"HQQ", [&] { return small_hqq(spec).quantize(W); }},
          {"GPTQ", [&] { return calibrated_gptq(32, spec).quantize(W); }}};
      for (const auto& [name, quantize] : quantizers) {
        SCOPED_TRACE(name);
        try {
          const auto q = quantize();
          expect_well_formed(q);
          // Denormal rows round to within a step of their range (at most 2^-126 here).
          const Matrix<float> error = (q.dequantize() - W).cwiseAbs();
          EXPECT_LE(error.topRows(2).maxCoeff(), std::numeric_limits<float>::min());
        } catch (const Error& e) {
          ADD_FAILURE() << e.what();
        }
      }
    }
  // Denormal activations: the kernels match the float product of the dequantized matrix.
  const auto q = RTN<float>(QuantSpec{.bits = 4, .group_size = 32}).quantize(test::random_matrix<float>(8, 256, 12));
  const Vector<float> x = Vector<float>::Constant(256, 1e-40f);
  Vector<float> y(8), y8(8);
  gemv(q, x, y);
  gemv_int8(q, x, y8);
  const Vector<double> reference = q.dequantize().cast<double>() * x.cast<double>();
  EXPECT_TRUE(y.allFinite() && y8.allFinite());
  EXPECT_LE((y.cast<double>() - reference).cwiseAbs().maxCoeff(), 1e-42);
  EXPECT_LE((y8.cast<double>() - reference).cwiseAbs().maxCoeff(), 1e-42);
}

// ---- All-equal groups ---------------------------------------------------------------------

TEST(Limits, AllEqualGroupsDecodeToTheirValueWithoutNaN) {
  for (float value : {0.0f, 0.5f, -3.0f, 1e-30f, 6e4f}) {
    const Matrix<float> W = Matrix<float>::Constant(4, 64, value);
    for (bool symmetric : {false, true})
      for (bool integral_zero : {false, true}) {
        const QuantSpec spec{.bits = 3, .group_size = 32, .symmetric = symmetric, .integral_zero = integral_zero};
        const std::pair<const char*, std::function<QuantizedMatrix<float>()>> quantizers[] = {
            {"RTN", [&] { return RTN<float>(spec).quantize(W); }},
            {"HQQ", [&] { return small_hqq(spec).quantize(W); }},
            {"GPTQ", [&] { return calibrated_gptq(64, spec).quantize(W); }}};
        for (const auto& [name, quantize] : quantizers) {
          if (symmetric && std::string(name) == "HQQ") continue;  // HQQ always fits a zero
          SCOPED_TRACE(std::string(name) + " value " + std::to_string(value) + " symmetric " +
                       std::to_string(symmetric) + " integral_zero " + std::to_string(integral_zero));
          const auto q = quantize();
          expect_well_formed(q);
          // GPTQ's error feedback moves a symmetric grid's clamping error onto later
          // columns, so only its parameters are checked there.
          if (symmetric && std::string(name) == "GPTQ") continue;
          const float error = (q.dequantize().array() - value).abs().maxCoeff();
          // Asymmetric: a constant group is an end point of its range [min(v, 0), max(v, 0)],
          // exact up to float rounding. Symmetric (codes -4..3 times 2|v| / 7 at 3 bits):
          // +|v| is half a step from code 3 and -|v| is clamped half a step in: |v| / 7.
          // HQQ with a rounded zero: a group whose range is <= 1e-4 starts from scale 1,
          // as the reference does, and with an integral zero that grid is the integers:
          // a constant group decodes to its nearest integer (0.5 -> 0, half to even).
          const bool hqq_rounded = std::string(name) == "HQQ" && integral_zero;
          const float bound = symmetric     ? std::abs(value) / 7 * 1.0001f
                              : hqq_rounded ? std::max(1e-6f * std::abs(value), 0.5f)
                                            : 1e-6f * std::abs(value);
          EXPECT_LE(error, bound) << name << " value " << value << " decodes to " << q.dequantize()(0, 0);
        }
      }
  }
}

// ---- A Hessian no damping can rescue ---------------------------------------------------

TEST(Limits, HessianSingularAfterEveryDampingNamesLayerAndLastDamp) {
  // Eigenvalues 1 +- 1e12: indefinite; the largest damping tried (0.01 * 10^6 * mean
  // diag = 1e4) is far too small, so every Cholesky attempt fails.
  Matrix<double> H(2, 2);
  H << 1.0, 1e12, 1e12, 1.0;
  GPTQ<float> gptq(2, {.spec = {.bits = 4, .group_size = 0}});
  gptq.set_hessian(H, 10);
  expect_error([&] { (void)gptq.quantize(test::random_matrix<float>(3, 2, 13)); },
               {"in_features = 2", "not positive definite after 7 damping attempts", "last damp = 10000"});
  GPTQ<float> fewer(2, {.spec = {.bits = 4, .group_size = 0}, .damp_retries = 2});
  fewer.set_hessian(H, 10);
  expect_error([&] { (void)fewer.quantize(test::random_matrix<float>(3, 2, 13)); },
               {"in_features = 2", "after 3 damping attempts", "last damp = 1 "});
  // A zero Hessian (no signal in any input) is not an error: every column is dead.
  GPTQ<float> dead(3, {.spec = {.bits = 4, .group_size = 0}});
  dead.set_hessian(Matrix<double>::Zero(3, 3), 10);
  const auto result = dead.quantize_with_report(test::random_matrix<float>(2, 3, 14));
  EXPECT_EQ(result.dead_columns, 3);
  expect_well_formed(result.weights);
  // Hessians that are not Hessians are refused at the door.
  Matrix<double> asymmetric = Matrix<double>::Identity(2, 2);
  asymmetric(0, 1) = 0.5;
  expect_error([&] { gptq.set_hessian(asymmetric, 10); }, {"H is not symmetric at (1, 0)"});
  expect_error([&] { gptq.set_hessian(-Matrix<double>::Identity(2, 2), 10); }, {"H(0, 0) = -1 is negative"});
  Matrix<double> infinite = Matrix<double>::Identity(2, 2);
  infinite(1, 1) = std::numeric_limits<double>::infinity();
  expect_error([&] { gptq.set_hessian(infinite, 10); }, {"H(1, 1) = inf is not finite"});
}

}  // namespace
}  // namespace lowbit

// RTN: the defining properties of round-to-nearest, and the reference figures on the
// fixture layer to 4 significant digits.
#include "lowbit/quantizers/rtn.hpp"

#include <gtest/gtest.h>

#include <unsupported/Eigen/CXX11/Tensor>

#include "reference_figures.hpp"
#include "test_util.hpp"

namespace lowbit {
namespace {

using test::fixture_layer;

// Agreement to 4 significant digits.
void expect_four_digits(double actual, double expected, const std::string& what) {
  EXPECT_LT(test::relative_difference(actual, expected), 5e-4) << what << ": " << actual << " vs " << expected;
}

// HQQ-style axis 0 reshapes the flat matrix to [group_size, -1]: a group is one column
// and rows r0, r0 + S, r0 + 2S, ... (S = rows / group_size). Reordering rows so those
// become consecutive turns it into our GroupAxis::Output.
Matrix<float> hqq_axis0_row_order(const Matrix<float>& W, Index group_size, bool inverse) {
  const Index stride = W.rows() / group_size;
  Matrix<float> out(W.rows(), W.cols());
  for (Index r = 0; r < W.rows(); ++r) {
    const Index p = (r % stride) * group_size + r / stride;
    if (inverse) out.row(r) = W.row(p);
    else out.row(p) = W.row(r);
  }
  return out;
}

// `rtn` rows, flavour minmax: axis 1 groups along the input (ours), axis 0 along the
// output; zero "float" or "int" (rounded, range widened to contain 0).
TEST(RtnConformance, MinMaxRowsToFourDigits) {
  const auto rows = test::reference_rows([](const nlohmann::json& r) {
    return r["tool"] == "rtn" && r.value("flavor", "") == "minmax";
  });
  ASSERT_EQ(rows.size(), 32u);
  const auto& layer = fixture_layer();
  for (const auto& row : rows) {
    const Index group = row["group_size"];
    QuantSpec spec{.bits = row["nbits"], .group_size = group};
    spec.integral_zero = row["zero"] == "int";
    Matrix<float> W_hat;
    if (row["axis"] == 1) {
      W_hat = RTN<float>(spec).quantize(layer.W).dequantize();
    } else {
      spec.group_axis = GroupAxis::Output;
      const Matrix<float> reordered = hqq_axis0_row_order(layer.W, group, false);
      W_hat = hqq_axis0_row_order(RTN<float>(spec).quantize(reordered).dequantize(), group, true);
    }
    const std::string what = row.dump();
    expect_four_digits(test::rel_fro(layer.W, W_hat), row["rel_fro"], what);
    expect_four_digits(test::out_rel(layer.Xeval, layer.W, W_hat), row["out_rel_eval"], what);
  }
}

// `rtn` rows, flavour gptq_nearest: GPTQ's quantizer without error feedback (range
// contains 0, integral zero; symmetric centres the codes).
TEST(RtnConformance, GptqNearestRowsToFourDigits) {
  const auto rows = test::reference_rows([](const nlohmann::json& r) {
    return r["tool"] == "rtn" && r.value("flavor", "") == "gptq_nearest";
  });
  ASSERT_EQ(rows.size(), 12u);
  const auto& layer = fixture_layer();
  for (const auto& row : rows) {
    const int group = row["groupsize"];
    const QuantSpec spec{.bits = row["wbits"], .group_size = group < 0 ? 0 : group, .symmetric = row["sym"],
                         .integral_zero = true};
    const Matrix<float> W_hat = RTN<float>(spec).quantize(layer.W).dequantize();
    const std::string what = row.dump();
    expect_four_digits(test::rel_fro(layer.W, W_hat), row["rel_fro"], what);
    expect_four_digits(test::out_rel(layer.Xeval, layer.W, W_hat), row["out_rel_eval"], what);
  }
}

TEST(Rtn, EveryCodeIsTheNearestGridPoint) {
  const Matrix<double> W = test::random_matrix<double>(7, 200, 3);
  for (int bits : {2, 3, 4, 8}) {
    const QuantSpec spec{.bits = bits, .group_size = 64};
    const auto q = RTN<double>(spec).quantize(W);
    for (Index r = 0; r < W.rows(); ++r)
      for (Index c = 0; c < W.cols(); ++c) {
        const double scale = q.scales()(r, c / 64), zero = q.zeros()(r, c / 64);
        const double w_hat = (q.code(r, c) - zero) * scale;
        for (int other = 0; other <= spec.max_code(); ++other)
          ASSERT_LE(std::abs(W(r, c) - w_hat), std::abs(W(r, c) - (other - zero) * scale) + 1e-12);
      }
  }
}

TEST(Rtn, MinAndMaxOfEachGroupAreExact) {
  const Matrix<double> W = test::random_matrix<double>(4, 130, 5);
  const auto q = RTN<double>(QuantSpec{.bits = 3, .group_size = 32}).quantize(W);
  const Matrix<double> W_hat = q.dequantize();
  for (Index r = 0; r < W.rows(); ++r)
    for (Index begin = 0; begin < W.cols(); begin += 32) {
      const Index n = std::min<Index>(32, W.cols() - begin);
      Index lo, hi;
      W.row(r).segment(begin, n).minCoeff(&lo);
      W.row(r).segment(begin, n).maxCoeff(&hi);
      EXPECT_NEAR(W_hat(r, begin + lo), W(r, begin + lo), 1e-6 * std::abs(W(r, begin + lo)));  // float params
      EXPECT_NEAR(W_hat(r, begin + hi), W(r, begin + hi), 1e-6 * std::abs(W(r, begin + hi)));
    }
}

TEST(Rtn, MseSearchNeverLosesToMinMax) {
  const Matrix<float> W = test::random_matrix<float>(16, 256, 9);
  for (int bits : {2, 3, 4}) {
    const QuantSpec spec{.bits = bits, .group_size = 64, .integral_zero = true};
    const Matrix<float> minmax = RTN<float>(spec).quantize(W).dequantize();
    const Matrix<float> mse = RTN<float>(RTN<float>::Options{.spec = spec, .mse = true}).quantize(W).dequantize();
    for (Index r = 0; r < W.rows(); ++r)
      for (Index g = 0; g < 4; ++g) {
        auto err = [&](const Matrix<float>& Q) {
          return (W.row(r).segment(g * 64, 64) - Q.row(r).segment(g * 64, 64)).cwiseAbs().array().pow(2.4f).sum();
        };
        EXPECT_LE(err(mse), err(minmax) * (1 + 1e-5f)) << "bits " << bits;
      }
    EXPECT_LT((W - mse).norm(), (W - minmax).norm()) << "bits " << bits;  // heavy tails: clipping pays
  }
}

TEST(Rtn, ConstantAndZeroGroupsDecodeExactly) {
  Matrix<float> W(3, 70);
  W.row(0).setConstant(0.37f);
  W.row(1).setZero();
  W.row(2).setConstant(-1234.5f);
  for (bool integral : {false, true}) {
    const QuantSpec spec{.bits = 2, .group_size = 32, .integral_zero = integral};
    const Matrix<float> W_hat = RTN<float>(spec).quantize(W).dequantize();
    EXPECT_LE((W_hat - W).cwiseAbs().maxCoeff(), 1e-6f * 1234.5f) << "integral zero " << integral;
    EXPECT_EQ(W_hat.row(1), W.row(1));
  }
  // Symmetric (GPTQ's grid, step 2*amax/max_code): zero is a code, and every entry,
  // the constant included, is within half a step.
  const Matrix<float> W_sym = RTN<float>(QuantSpec{.bits = 2, .group_size = 32, .symmetric = true}).quantize(W).dequantize();
  EXPECT_EQ(W_sym.row(1), W.row(1));
  for (Index r : {0, 2}) {
    const float half_step = std::abs(W(r, 0)) / 3.0f;
    EXPECT_LE((W_sym.row(r) - W.row(r)).cwiseAbs().maxCoeff(), half_step * (1 + 1e-6f)) << r;
  }
}

TEST(Rtn, RaggedLastGroupHasItsOwnRange) {
  Matrix<float> W = Matrix<float>::Constant(1, 65, 1.0f);
  W(0, 64) = -50.0f;  // alone in the last group
  const Matrix<float> W_hat = RTN<float>(QuantSpec{.bits = 4, .group_size = 64}).quantize(W).dequantize();
  EXPECT_EQ(W_hat, W);
}

TEST(Rtn, HalfParamsAreStoredRounded) {
  const Matrix<float> W = test::random_matrix<float>(8, 128, 2, 0.02);
  const auto q = RTN<float>(QuantSpec{.bits = 4, .group_size = 64, .param_type = ParamType::Float16}).quantize(W);
  for (Index i = 0; i < q.scales().size(); ++i) {
    EXPECT_EQ(q.scales().data()[i], static_cast<float>(Eigen::half(q.scales().data()[i])));
    EXPECT_EQ(q.zeros().data()[i], static_cast<float>(Eigen::half(q.zeros().data()[i])));
  }
  const auto q32 = RTN<float>(QuantSpec{.bits = 4, .group_size = 64}).quantize(W);
  EXPECT_LT(q.packed_bytes(), q32.packed_bytes());
  EXPECT_LT(test::rel_fro(W, q.dequantize()), 1.01 * test::rel_fro(W, q32.dequantize()));
}

TEST(Rtn, RefusesNonFiniteInputNamingTheEntry) {
  Matrix<float> W = Matrix<float>::Ones(4, 8);
  W(2, 5) = std::numeric_limits<float>::quiet_NaN();
  try {
    (void)RTN<float>(QuantSpec{}).quantize(W);
    FAIL() << "expected lowbit::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("W(2, 5)"), std::string::npos) << e.what();
  }
  W(2, 5) = std::numeric_limits<float>::infinity();
  EXPECT_THROW((void)RTN<float>(QuantSpec{}).quantize(W), Error);
}

TEST(Rtn, RefusesBadOptions) {
  EXPECT_THROW(RTN<float>(QuantSpec{.bits = 9}), Error);
  EXPECT_THROW(RTN<float>(QuantSpec{.bits = 0}), Error);
  EXPECT_THROW(RTN<float>(QuantSpec{.group_size = -1}), Error);
  EXPECT_THROW(RTN<float>(RTN<float>::Options{.mse = true, .grid = 0}), Error);
  EXPECT_THROW(RTN<float>(RTN<float>::Options{.max_shrink = 1.5}), Error);
}

TEST(Rtn, TensorOverloadIsTheSameQuantization) {
  const Matrix<float> W = test::random_matrix<float>(6, 96, 4);
  Eigen::Tensor<float, 2, Eigen::RowMajor> tensor(6, 96);
  std::copy(W.data(), W.data() + W.size(), tensor.data());
  const RTN<float> rtn(QuantSpec{.bits = 3, .group_size = 32});
  EXPECT_TRUE(rtn.quantize(tensor) == rtn.quantize(W));
  Eigen::TensorMap<Eigen::Tensor<const float, 2, Eigen::RowMajor>> view(W.data(), 6, 96);
  EXPECT_TRUE(rtn.quantize(view) == rtn.quantize(W));
}

TEST(Rtn, IdenticalForAnyThreadCount) {
  const Matrix<float> W = test::random_matrix<float>(64, 512, 8);
  const RTN<float> rtn(RTN<float>::Options{.spec = {.bits = 3, .group_size = 64}, .mse = true});
  set_num_threads(1);
  const auto one = rtn.quantize(W);
  set_num_threads(2);
  const auto two = rtn.quantize(W);
  EXPECT_TRUE(one == two);
}

}  // namespace
}  // namespace lowbit

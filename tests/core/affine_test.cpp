#include "lowbit/core/affine.hpp"

#include <gtest/gtest.h>

#include <limits>
#include <vector>

namespace lowbit {
namespace {

TEST(Affine, RoundsHalfToEven) {
  EXPECT_EQ(detail::round_half_even(0.5f), 0.0f);
  EXPECT_EQ(detail::round_half_even(1.5f), 2.0f);
  EXPECT_EQ(detail::round_half_even(2.5f), 2.0f);
  EXPECT_EQ(detail::round_half_even(-0.5), -0.0);
  EXPECT_EQ(detail::encode(2.5f, 1.0f, 0.0f, 15), 2);
  EXPECT_EQ(detail::encode(3.5f, 1.0f, 0.0f, 15), 4);
}

TEST(Affine, EncodeClampsAndNeverCastsNaN) {
  EXPECT_EQ(detail::encode(100.0f, 1.0f, 0.0f, 15), 15);
  EXPECT_EQ(detail::encode(-100.0f, 1.0f, 0.0f, 15), 0);
  EXPECT_EQ(detail::encode(0.0f, 0.0f, 0.0f, 15), 0);  // 0/0
  EXPECT_EQ(detail::encode(1.0f, 0.0f, 0.0f, 15), 15);  // +inf
}

TEST(Affine, MinMaxMapsTheRangeOntoTheCodes) {
  const std::vector<float> w = {-1.0f, 0.25f, 2.0f};
  const GroupParams p = fit_minmax(w.data(), 3, QuantSpec{.bits = 2});
  EXPECT_FLOAT_EQ(p.scale, 1.0f);
  EXPECT_FLOAT_EQ(p.zero, 1.0f);
  EXPECT_EQ(detail::encode(-1.0f, p.scale, p.zero, 3), 0);
  EXPECT_EQ(detail::encode(2.0f, p.scale, p.zero, 3), 3);
}

TEST(Affine, FloatZeroIsFractionalIntegralZeroIsACode) {
  const std::vector<double> w = {0.3, 1.0, 2.2};
  const GroupParams fractional = fit_minmax(w.data(), 3, QuantSpec{.bits = 4});
  EXPECT_NEAR(fractional.zero, -0.3 / ((2.2 - 0.3) / 15), 1e-5);
  const GroupParams integral = fit_minmax(w.data(), 3, QuantSpec{.bits = 4, .integral_zero = true});
  EXPECT_EQ(integral.zero, 0.0f);  // range widened to [0, 2.2]: zero is code 0
  EXPECT_NEAR(integral.scale, 2.2 / 15, 1e-7);
}

TEST(Affine, SymmetricCentresTheCodes) {
  const std::vector<float> w = {-0.5f, 0.1f, 2.0f};
  const GroupParams p = fit_minmax(w.data(), 3, QuantSpec{.bits = 4, .symmetric = true});
  EXPECT_EQ(p.zero, 8.0f);
  EXPECT_FLOAT_EQ(p.scale, 4.0f / 15);
}

TEST(Affine, NarrowGroupsStayFinite) {
  // A range far below float resolution of the values: widened to contain 0.
  const std::vector<float> w = {1.0f, std::nextafter(1.0f, 2.0f)};
  const GroupParams p = fit_minmax(w.data(), 2, QuantSpec{.bits = 4});
  EXPECT_TRUE(std::isfinite(p.scale) && std::isfinite(p.zero));
  EXPECT_NEAR(detail::decode(detail::encode(1.0f, p.scale, p.zero, 15), p.scale, p.zero), 1.0f, 1e-6f);
}

TEST(Affine, MseSearchChoosesClippingForOutliers) {
  std::vector<float> w(64);
  for (int i = 0; i < 64; ++i) w[i] = 0.01f * static_cast<float>(i % 7 - 3);
  w[10] = 1.0f;  // one outlier
  const QuantSpec spec{.bits = 3};
  const GroupParams minmax = fit_minmax(w.data(), 64, spec);
  const GroupParams mse = fit_mse(w.data(), 64, spec);
  EXPECT_LT(mse.scale, minmax.scale);
  EXPECT_LT(detail::group_error(w.data(), 64, mse, 7, 2.4), detail::group_error(w.data(), 64, minmax, 7, 2.4));
}

}  // namespace
}  // namespace lowbit

#include "lowbit/core/tensor.hpp"

#include <gtest/gtest.h>

#include <unsupported/Eigen/CXX11/Tensor>

namespace lowbit {
namespace {

TEST(Tensor, RowMajorTensorViewsAsMatrixWithoutCopy) {
  Eigen::Tensor<float, 2, Eigen::RowMajor> t(3, 5);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<float>(i);
  const auto m = as_matrix(t);
  EXPECT_EQ(m.rows(), 3);
  EXPECT_EQ(m.cols(), 5);
  EXPECT_EQ(m(1, 2), 7.0f);
  EXPECT_EQ(m.data(), t.data());
  static_assert(!RowMajorTensor2<Eigen::Tensor<float, 2, Eigen::ColMajor>>);
  static_assert(!RowMajorTensor2<Eigen::Tensor<float, 3, Eigen::RowMajor>>);
}

}  // namespace
}  // namespace lowbit

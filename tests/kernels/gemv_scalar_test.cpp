// The scalar GEMV kernels (the reference of the SIMD variants, and the path for double
// and for group sizes the SIMD kernels leave out) against dequantize().
#include "lowbit/kernels/gemv_scalar.hpp"

#include <gtest/gtest.h>

#include "kernel_test_util.hpp"
#include "lowbit/kernels/gemv.hpp"

namespace lowbit {
namespace {

using test::Case;

TEST(GemvScalar, MatchesDequantizedReferenceOnEveryShapeBitWidthAndGroupSize) {
  test::IsaScope scope(Isa::Scalar);
  test::sweep_gemv_cases([](const QuantizedMatrix<float>& q, const Vector<float>& x, const Vector<double>& ref,
                            const Vector<double>& bound, const std::string& name) {
    Vector<float> y(q.rows());
    gemv(q, x, y);
    test::expect_within(y.cast<double>(), ref, bound, "scalar " + name);
  });
}

// The kernel entry points themselves, on a block of rows in the middle of the matrix.
TEST(GemvScalar, RowKernelWritesExactlyItsRows) {
  const Case c{11, 300, 3, 64};
  const auto q = test::quantized_case<float>(c, 5);
  const Vector<float> x = test::random_matrix<float>(c.cols, 1, 6);
  const auto input = detail::prepare_gemv_input(q, x.data(), 0);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(c.cols));
  Vector<float> y = Vector<float>::Constant(c.rows, -7.0f);
  detail::scalar::gemv_rows(q, input.x.data(), input.group_sums.data(), 3, 5, codes.data(), y.data() + 3);
  const Vector<double> ref = test::reference_gemv(q, x);
  const Vector<double> bound = test::gemv_bound(q, test::logical_params(q), x.cast<double>());
  for (Index r = 0; r < c.rows; ++r) {
    if (r < 3 || r >= 8) {
      EXPECT_EQ(y[r], -7.0f) << r;
    } else {
      EXPECT_LE(std::abs(y[r] - ref[r]), bound[r]) << r;
    }
  }
}

TEST(GemvScalar, DoubleMatricesMeetTheDoubleBound) {
  for (const Case& c : {Case{13, 300, 4, 64}, Case{6, 777, 3, 100}, Case{9, 256, 2, 0},
                        Case{7, 333, 4, 32, GroupAxis::Output}, Case{8, 500, 5, 64, GroupAxis::Input, true}}) {
    const auto q = test::quantized_case<double>(c, 11);
    const Vector<double> x = test::random_matrix<double>(c.cols, 1, 12);
    Vector<double> y(c.rows);
    gemv(q, x, y);
    test::expect_within(y, test::reference_gemv(q, x), test::gemv_bound(q, test::logical_params(q), x), c.name());
  }
}

TEST(GemvScalar, OutputAxisBlocksCoverEveryOutputOnce) {
  const Case c{600, 40, 4, 64, GroupAxis::Output};  // three block columns, the last one short
  const auto q = test::quantized_case<float>(c, 21);
  const Vector<float> x = test::random_matrix<float>(c.cols, 1, 22);
  Vector<float> y = Vector<float>::Constant(c.rows, std::nanf(""));
  for (Index blk = 0; blk < 3; ++blk) detail::scalar::gemv_transposed_block(q, x.data(), blk, y.data());
  test::expect_within(y.cast<double>(), test::reference_gemv(q, x),
                      test::gemv_bound(q, test::logical_params(q), x.cast<double>()), c.name());
}

}  // namespace
}  // namespace lowbit

// lowbit::gemv, the public entry point: arguments, dispatch, threads, element types and
// the fixture layer. The kernels' arithmetic is swept in gemv_{scalar,avx2,avx512}_test.
#include "lowbit/kernels/gemv.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>

#include "kernel_test_util.hpp"

namespace lowbit {
namespace {

using test::Case;

TEST(Gemv, ShapeMismatchesThrowNamingTheArgument) {
  const auto q = test::quantized_case<float>(Case{5, 40, 4, 32}, 1);
  Vector<float> x(40), y(5), short_x(39), long_y(6);
  x.setOnes();
  try {
    gemv(q, short_x, y);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("x has 39"), std::string::npos) << e.what();
  }
  try {
    gemv(q, x, long_y);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("y has 6"), std::string::npos) << e.what();
  }
}

TEST(Gemv, NonFiniteInputThrows) {
  const auto q = test::quantized_case<float>(Case{5, 40, 4, 32}, 1);
  Vector<float> x = Vector<float>::Ones(40), y(5);
  x[17] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(gemv(q, x, y), Error);
  x[17] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(gemv(q, x, y), Error);
}

TEST(Gemv, EmptyShapes) {
  QuantizedMatrix<float> no_rows(0, 10, QuantSpec{});
  Vector<float> x = Vector<float>::Ones(10), y0(0);
  EXPECT_NO_THROW(gemv(no_rows, x, y0));
  QuantizedMatrix<float> no_cols(3, 0, QuantSpec{});
  Vector<float> x0(0), y = Vector<float>::Constant(3, 5.0f);
  gemv(no_cols, x0, y);
  EXPECT_EQ(y, Vector<float>::Zero(3));
}

// Every variant, for matrices big enough to be split among threads: the same bits.
TEST(Gemv, BitIdenticalForOneAndTwoThreads) {
  test::expect_thread_invariant({Case{301, 1000, 4, 64}, Case{130, 777, 3, 12, GroupAxis::Input, true},
                                 Case{200, 600, 2, 7}, Case{700, 200, 4, 64, GroupAxis::Output}, Case{257, 512, 8, 0}},
                                [](const auto& q, const auto& x, auto& y) { gemv(q, x, y); });
}

// Row tasks: every row exactly once, four rows a quarter of the matrix apart per
// kernel call, then the remainder one by one.
TEST(Gemv, RowTasksTakeEveryRowOnce) {
  for (Index rows : {1, 2, 3, 4, 5, 7, 8, 13, 4099}) {
    const QuantizedMatrix<float> W(rows, 300, QuantSpec{});
    const auto row_of = [&](const std::uint8_t* packed) { return static_cast<float>((packed - W.packed_row(0)) / W.row_bytes()); };
    std::vector<float> y(static_cast<std::size_t>(rows), -1.0f);
    Index quads = 0;
    for (Index task = 0; task < detail::row_tasks(rows); ++task)
      detail::row_task(
          W, task, y.data(),
          [&](const std::uint8_t* const* packed, const float* const*, const float* const*, float* out) {
            for (Index r = 0; r < detail::kKernelRows; ++r) {
              out[r] = y[static_cast<std::size_t>(row_of(packed[r]))] + 1 + row_of(packed[r]);  // -1 + 1 + row if unvisited
              EXPECT_EQ(row_of(packed[r]) - row_of(packed[0]), static_cast<float>(r * (rows / detail::kKernelRows)));
            }
            ++quads;
          },
          [&](const std::uint8_t* const* packed, const float* const*, const float* const*, float* out) {
            *out = y[static_cast<std::size_t>(row_of(packed[0]))] + 1 + row_of(packed[0]);
          });
    for (Index r = 0; r < rows; ++r) EXPECT_EQ(y[static_cast<std::size_t>(r)], static_cast<float>(r)) << rows << " rows";
    EXPECT_EQ(quads, rows / detail::kKernelRows);
  }
}

// The SIMD variants really run for the sizes they claim (and hand the rest to scalar).
TEST(Gemv, DispatchTakesTheSimdKernelWhereItApplies) {
#if defined(LOWBIT_HAVE_AVX512)
  EXPECT_EQ(detail::gemv_lanes(Isa::Avx512, 4096, 64), 16);
  EXPECT_EQ(detail::gemv_lanes(Isa::Avx512, 4096, 100), 16);
  EXPECT_EQ(detail::gemv_lanes(Isa::Avx512, 4096, 7), 0);
  EXPECT_EQ(detail::gemv_lanes(Isa::Avx2, 4096, 64), 8);
#endif
  EXPECT_EQ(detail::gemv_lanes(Isa::Scalar, 4096, 64), 0);
}

TEST(Gemv, DoubleMatricesUseTheScalarPath) {
  const Case c{33, 500, 4, 64, GroupAxis::Input, true};
  const auto q = test::quantized_case<double>(c, 4);
  const Vector<double> x = test::random_matrix<double>(c.cols, 1, 5);
  Vector<double> y(c.rows);
  gemv(q, x, y);
  test::expect_within(y, test::reference_gemv(q, x), test::gemv_bound(q, test::logical_params(q), x), c.name());
}

TEST(Gemv, BindsEigenBlocksMapsAndAliasedOutput) {
  const Case c{40, 40, 4, 32};
  const auto q = test::quantized_case<float>(c, 6);
  const Matrix<float> X = test::random_matrix<float>(3, 40, 7);  // row-major: rows are contiguous
  Vector<float> expected(40);
  const Vector<float> x = X.row(1).transpose();
  gemv(q, x, expected);

  Eigen::MatrixXf out(40, 2);  // column-major: a column is contiguous
  gemv(q, X.row(1).transpose(), out.col(1));
  EXPECT_EQ(out.col(1), expected);

  std::vector<float> raw_x(x.data(), x.data() + 40), raw_y(40);
  gemv(q, Eigen::Map<const Vector<float>>(raw_x.data(), 40), Eigen::Map<Vector<float>>(raw_y.data(), 40));
  EXPECT_EQ(Eigen::Map<Vector<float>>(raw_y.data(), 40), expected);

  Vector<float> inplace = x;  // y = W y on a square matrix
  gemv(q, inplace, inplace);
  EXPECT_EQ(inplace, expected);
}

nlohmann::json reference_entry(int bits, int group_size, int axis) {
  std::ifstream in(test::data_path("reference_small.jsonl"));
  std::string line;
  while (std::getline(in, line)) {
    const auto entry = nlohmann::json::parse(line);
    if (entry.value("tool", "") == "rtn" && entry.value("flavor", "") == "minmax" && entry.value("nbits", 0) == bits &&
        entry.value("group_size", 0) == group_size && entry.value("axis", -1) == axis && entry.value("zero", "") == "float")
      return entry;
  }
  throw std::runtime_error("no reference entry");
}

// On the fixture layer, y = W_hat x from the packed weights carries the reference
// RTN's output error: the kernel adds none of its own.
TEST(Gemv, FixtureLayerOutputErrorMatchesTheReference) {
  const auto& layer = test::fixture_layer();
  const Index tokens = 96;
  for (int axis : {1, 0}) {
    QuantSpec spec{.bits = 4, .group_size = 64};
    spec.group_axis = axis == 1 ? GroupAxis::Input : GroupAxis::Output;  // the reference's axis 1 is ours
    const auto q = RTN<float>(spec).quantize(layer.W);
    const Matrix<double> X = layer.Xeval.topRows(tokens).cast<double>();
    const Matrix<double> Y_hat = X * q.dequantize().cast<double>().transpose();
    const Matrix<double> Y_exact = X * layer.W.cast<double>().transpose();
    Matrix<double> Y(tokens, q.rows());
    for (Index t = 0; t < tokens; ++t) {
      const Vector<float> x = layer.Xeval.row(t).transpose();
      Vector<float> y(q.rows());
      gemv(q, x, y);
      Y.row(t) = y.cast<double>().transpose();
    }
    const double out_rel = (Y - Y_exact).norm() / Y_exact.norm();
    const double expected = reference_entry(4, 64, axis)["out_rel_eval"].get<double>();
    EXPECT_NEAR(out_rel, expected, 0.03 * expected) << "axis " << axis;
    EXPECT_LT((Y - Y_hat).norm() / Y_exact.norm(), 1e-5) << "axis " << axis;
  }
}

}  // namespace
}  // namespace lowbit

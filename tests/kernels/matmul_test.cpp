// lowbit::matmul against X W_hat^T from dequantize(): every ISA variant, every shape,
// bit width and group size; thread-count invariance; the one-token route to gemv.
#include "lowbit/kernels/matmul.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>
#include <numeric>

#include "kernel_test_util.hpp"

namespace lowbit {
namespace {

using test::Case;

// The bound of kernel_test_util.hpp for every token (matmul sums x * w_hat directly, a
// subset of the terms that bound covers).
template <class T>
Matrix<double> matmul_bound(const QuantizedMatrix<T>& q, const Matrix<T>& X) {
  const auto params = test::logical_params(q);
  Matrix<double> bound(X.rows(), q.rows());
  for (Index t = 0; t < X.rows(); ++t)
    bound.row(t) = test::gemv_bound(q, params, X.row(t).transpose().template cast<double>()).transpose();
  return bound;
}

void expect_within(const Matrix<double>& Y, const Matrix<double>& ref, const Matrix<double>& bound,
                   const std::string& what) {
  for (Index t = 0; t < Y.rows(); ++t)
    for (Index r = 0; r < Y.cols(); ++r)
      if (!(std::abs(Y(t, r) - ref(t, r)) <= bound(t, r))) {
        ADD_FAILURE() << what << ": Y(" << t << ", " << r << ") = " << Y(t, r) << ", reference " << ref(t, r)
                      << ", bound " << bound(t, r);
        return;
      }
}

TEST(Matmul, EveryVariantMatchesTheDequantizedReference) {
  test::ThreadScope single(1);
  for (Isa isa : test::runnable_isas()) {
    test::IsaScope scope(isa);
    std::uint64_t seed = 100;
    for (const auto& [rows, cols] : test::kernel_shapes())
      for (int bits : {1, 2, 3, 4, 8})  // the decode is the tested dequantize_row; the tiling is what varies
        for (Index group : {32, 64, 0, 100, 7})
          for (int variant = 0; variant < 3; ++variant) {
            Case c{rows, cols, bits, group};
            c.permuted = variant == 1 && cols > 1;
            c.axis = variant == 2 ? GroupAxis::Output : GroupAxis::Input;
            const Index tokens = 2 + (++seed % 6);  // 2..7: whole and partial register blocks
            const auto q = test::quantized_case<float>(c, seed);
            const Matrix<float> X = test::random_matrix<float>(tokens, cols, seed + 1);
            Matrix<float> Y(tokens, rows);
            matmul(q, X, Y);
            const Matrix<double> ref = X.cast<double>() * q.dequantize().cast<double>().transpose();
            expect_within(Y.cast<double>(), ref, matmul_bound(q, X), std::string(isa_name(isa)) + " " + c.name());

            const auto exact = test::exact_case(c, seed);
            const Matrix<float> Xi = test::small_integers(tokens, cols, seed + 2);
            matmul(exact, Xi, Y);
            const Matrix<double> exact_ref = Xi.cast<double>() * exact.dequantize().cast<double>().transpose();
            expect_within(Y.cast<double>(), exact_ref, Matrix<double>::Zero(tokens, rows),
                          std::string(isa_name(isa)) + " exact " + c.name());
            if (HasFailure()) return;
          }
  }
}

// Long rows take several input chunks (boundaries at whole blocks and groups).
TEST(Matmul, ChunkedRowsMatchTheReference) {
  for (Isa isa : test::runnable_isas()) {
    test::IsaScope scope(isa);
    for (const Case& c : {Case{14, 2600, 4, 64}, Case{9, 2100, 3, 128, GroupAxis::Input, true}, Case{7, 3000, 2, 96},
                          Case{8, 1500, 4, 100}, Case{300, 700, 4, 64, GroupAxis::Output}}) {
      const Index chunk = detail::matmul_chunk(c.cols, c.group_size);
      EXPECT_TRUE(chunk == c.cols || chunk % std::lcm<Index>(256, c.group_size) == 0) << chunk;
      const auto q = test::quantized_case<float>(c, 7);
      const Matrix<float> X = test::random_matrix<float>(9, c.cols, 8);
      Matrix<float> Y(9, c.rows);
      matmul(q, X, Y);
      const Matrix<double> ref = X.cast<double>() * q.dequantize().cast<double>().transpose();
      expect_within(Y.cast<double>(), ref, matmul_bound(q, X), std::string(isa_name(isa)) + " " + c.name());
    }
  }
}

TEST(Matmul, BitIdenticalForOneAndTwoThreads) {
  for (Isa isa : test::runnable_isas()) {
    test::IsaScope scope(isa);
    for (const Case& c : {Case{130, 1100, 4, 64}, Case{61, 900, 3, 12, GroupAxis::Input, true},
                          Case{600, 200, 2, 32, GroupAxis::Output}}) {
      const auto q = test::quantized_case<float>(c, 9);
      const Matrix<float> X = test::random_matrix<float>(11, c.cols, 10);
      Matrix<float> one(11, c.rows), two(11, c.rows);
      {
        test::ThreadScope threads(1);
        matmul(q, X, one);
      }
      {
        test::ThreadScope threads(2);
        matmul(q, X, two);
      }
      EXPECT_EQ(std::memcmp(one.data(), two.data(), sizeof(float) * static_cast<std::size_t>(one.size())), 0)
          << isa_name(isa) << " " << c.name();
    }
  }
}

TEST(Matmul, OneTokenIsGemv) {
  for (Isa isa : test::runnable_isas()) {
    test::IsaScope scope(isa);
    const auto q = test::quantized_case<float>(Case{37, 300, 4, 64, GroupAxis::Input, true}, 11);
    const Matrix<float> X = test::random_matrix<float>(1, 300, 12);
    Matrix<float> Y(1, 37);
    matmul(q, X, Y);
    Vector<float> y(37);
    gemv(q, X.row(0).transpose(), y);
    EXPECT_EQ(Y.row(0), y.transpose()) << isa_name(isa);
  }
}

TEST(Matmul, ShapeMismatchesThrowNamingTheArgument) {
  const auto q = test::quantized_case<float>(Case{5, 40, 4, 32}, 1);
  const Matrix<float> X = Matrix<float>::Ones(3, 40), X_bad = Matrix<float>::Ones(3, 41);
  Matrix<float> Y(3, 5), Y_bad(3, 6);
  try {
    matmul(q, X_bad, Y);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("X has 41"), std::string::npos) << e.what();
  }
  try {
    matmul(q, X, Y_bad);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Y shape 3x6"), std::string::npos) << e.what();
  }
  Matrix<float> X_nan = X;
  X_nan(2, 7) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(matmul(q, X_nan, Y), Error);
}

TEST(Matmul, EmptyShapes) {
  const auto q = test::quantized_case<float>(Case{5, 40, 4, 32}, 1);
  Matrix<float> X0(0, 40), Y0(0, 5);
  EXPECT_NO_THROW(matmul(q, X0, Y0));
  QuantizedMatrix<float> no_cols(5, 0, QuantSpec{});
  Matrix<float> X(3, 0), Y = Matrix<float>::Constant(3, 5, 2.0f);
  matmul(no_cols, X, Y);
  EXPECT_EQ(Y, Matrix<float>::Zero(3, 5));
}

TEST(Matmul, DoubleMatrices) {
  for (const Case& c : {Case{13, 700, 4, 64, GroupAxis::Input, true}, Case{300, 90, 3, 32, GroupAxis::Output}}) {
    const auto q = test::quantized_case<double>(c, 13);
    const Matrix<double> X = test::random_matrix<double>(5, c.cols, 14);
    Matrix<double> Y(5, c.rows);
    matmul(q, X, Y);
    expect_within(Y, X * q.dequantize().transpose(), matmul_bound(q, X), c.name());
  }
}

// The fixture layer's held-out tokens through the packed weights reproduce the
// reference RTN's output error (2/3/4-bit, groups of 64, both group axes).
TEST(Matmul, FixtureLayerOutputErrorMatchesTheReference) {
  const auto& layer = test::fixture_layer();
  const Matrix<double> exact = layer.Xeval.cast<double>() * layer.W.cast<double>().transpose();
  std::ifstream in(test::data_path("reference_small.jsonl"));
  std::string line;
  int checked = 0;
  while (std::getline(in, line)) {
    const auto entry = nlohmann::json::parse(line);
    if (entry.value("tool", "") != "rtn" || entry.value("flavor", "") != "minmax" || entry.value("zero", "") != "float" ||
        entry.value("group_size", 0) != 64)
      continue;
    QuantSpec spec{.bits = entry["nbits"].get<int>(), .group_size = entry["group_size"].get<Index>()};
    spec.group_axis = entry["axis"].get<int>() == 1 ? GroupAxis::Input : GroupAxis::Output;  // reference axis 1 is ours
    const auto q = RTN<float>(spec).quantize(layer.W);
    Matrix<float> Y(layer.Xeval.rows(), q.rows());
    matmul(q, layer.Xeval, Y);
    const double out_rel = (Y.cast<double>() - exact).norm() / exact.norm();
    const double expected = entry["out_rel_eval"].get<double>();
    EXPECT_NEAR(out_rel, expected, 0.03 * expected) << line;
    ++checked;
  }
  EXPECT_EQ(checked, 6);
}

}  // namespace
}  // namespace lowbit

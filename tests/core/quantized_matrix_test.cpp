#include "lowbit/core/quantized_matrix.hpp"

#include <gtest/gtest.h>

#include <numeric>

#include "test_util.hpp"

namespace lowbit {
namespace {

struct Parts {
  CodeMatrix codes;
  Matrix<float> scales, zeros;
};

Parts random_parts(Index rows, Index cols, const QuantSpec& spec, std::uint64_t seed) {
  const Index groups = spec.groups_per_row(cols);
  const auto flat = test::random_codes(rows * cols, spec.bits, seed);
  Parts p{Eigen::Map<const CodeMatrix>(flat.data(), rows, cols),
          test::random_matrix<float>(rows, groups, seed + 1, 0.1).cwiseAbs(),
          test::random_matrix<float>(rows, groups, seed + 2, 4.0)};
  p.scales.array() += 1e-3f;
  return p;
}

// The decode of DESIGN.md, spelled out per element.
Matrix<float> reference_dequantize(const Parts& p, Index group) {
  Matrix<float> out(p.codes.rows(), p.codes.cols());
  for (Index r = 0; r < out.rows(); ++r)
    for (Index c = 0; c < out.cols(); ++c)
      out(r, c) = (float(p.codes(r, c)) - p.zeros(r, c / group)) * p.scales(r, c / group);
  return out;
}

TEST(QuantizedMatrix, FromCodesDequantizesAndGivesCodesBack) {
  for (int bits = 1; bits <= 8; ++bits)
    for (Index group : {Index{0}, Index{32}, Index{48}, Index{64}}) {
      const QuantSpec spec{.bits = bits, .group_size = group};
      const Parts p = random_parts(5, 172, spec, static_cast<std::uint64_t>(bits * 100 + group));
      const auto q = QuantizedMatrix<float>::from_codes(spec, 5, 172, p.codes, p.scales, p.zeros);
      EXPECT_EQ(q.dequantize(), reference_dequantize(p, spec.group_length(172))) << bits << " " << group;
      for (Index r = 0; r < 5; ++r)
        for (Index c = 0; c < 172; c += 13) ASSERT_EQ(q.code(r, c), p.codes(r, c));
    }
}

TEST(QuantizedMatrix, PackedBytesCountsEveryStoredByte) {
  const QuantSpec spec{.bits = 4, .group_size = 64};
  const Parts p = random_parts(8, 4096, spec, 1);
  const auto q = QuantizedMatrix<float>::from_codes(spec, 8, 4096, p.codes, p.scales, p.zeros);
  EXPECT_EQ(q.packed_bytes(), 8u * 2048 + 2 * 8 * 64 * 4);
  EXPECT_DOUBLE_EQ(q.bits_per_weight(), 4.0 + 64.0 / 64);
  const QuantSpec half{.bits = 3, .group_size = 128, .param_type = ParamType::Float16};
  const Parts h = random_parts(2, 300, half, 2);
  const auto qh = QuantizedMatrix<float>::from_codes(half, 2, 300, h.codes, h.scales, h.zeros);
  EXPECT_EQ(qh.packed_bytes(), 2u * (320 * 3 / 8) + 2 * 2 * 3 * 2);
}

TEST(QuantizedMatrix, HalfParamsAreRoundedOnce) {
  const QuantSpec spec{.bits = 4, .group_size = 64, .param_type = ParamType::Float16};
  Parts p = random_parts(2, 64, spec, 3);
  p.scales(0, 0) = 0.1f;  // not representable in fp16
  const auto q = QuantizedMatrix<float>::from_codes(spec, 2, 64, p.codes, p.scales, p.zeros);
  EXPECT_EQ(q.scales()(0, 0), static_cast<float>(Eigen::half(0.1f)));
  EXPECT_NE(q.scales()(0, 0), 0.1f);
}

TEST(QuantizedMatrix, PermutationRestoresInputOrder) {
  const QuantSpec spec{.bits = 3, .group_size = 32};
  const Parts p = random_parts(4, 96, spec, 4);
  std::vector<std::int32_t> perm(96);
  std::iota(perm.begin(), perm.end(), 0);
  std::reverse(perm.begin(), perm.end());
  std::rotate(perm.begin(), perm.begin() + 17, perm.end());
  const auto q = QuantizedMatrix<float>::from_codes(spec, 4, 96, p.codes, p.scales, p.zeros, perm);
  const Matrix<float> stored = reference_dequantize(p, 32);
  const Matrix<float> W_hat = q.dequantize();
  for (Index j = 0; j < 96; ++j) EXPECT_EQ(W_hat.col(perm[j]), stored.col(j));
  for (Index j = 0; j < 96; ++j) EXPECT_EQ(q.code(1, perm[j]), p.codes(1, j));
  EXPECT_EQ(q.packed_bytes(), 4u * 36 + 2 * 4 * 3 * 4 + 96 * 4);
}

TEST(QuantizedMatrix, OutputAxisStoresTheTranspose) {
  const QuantSpec spec{.bits = 4, .group_size = 16, .group_axis = GroupAxis::Output};
  const Parts p = random_parts(40, 24, spec, 5);  // stored [in = 40 rows of W^T, out = 24]
  const auto q = QuantizedMatrix<float>::from_codes(spec, 24, 40, p.codes, p.scales, p.zeros);
  EXPECT_EQ(q.rows(), 24);
  EXPECT_EQ(q.stored_rows(), 40);
  EXPECT_EQ(q.dequantize(), Matrix<float>(reference_dequantize(p, 16).transpose()));
  EXPECT_EQ(q.code(3, 7), p.codes(7, 3));
}

TEST(QuantizedMatrix, DequantizeIntoCallerStorageAndBlocks) {
  const QuantSpec spec{.bits = 2, .group_size = 64};
  const Parts p = random_parts(6, 256, spec, 6);
  const auto q = QuantizedMatrix<float>::from_codes(spec, 6, 256, p.codes, p.scales, p.zeros);
  Matrix<float> out(6, 256);
  q.dequantize(out);
  EXPECT_EQ(out, q.dequantize());
  Matrix<float> wide = Matrix<float>::Zero(6, 300);
  q.dequantize(wide.leftCols(256));  // a strided block
  EXPECT_EQ(Matrix<float>(wide.leftCols(256)), out);
  EXPECT_TRUE(wide.rightCols(44).isZero());
  Matrix<float> wrong(5, 256);
  EXPECT_THROW(q.dequantize(wrong), Error);
}

TEST(QuantizedMatrix, DoubleDequantizesTheSameCodes) {
  const QuantSpec spec{.bits = 4, .group_size = 32};
  const Parts p = random_parts(3, 100, spec, 7);
  const auto qf = QuantizedMatrix<float>::from_codes(spec, 3, 100, p.codes, p.scales, p.zeros);
  const auto qd = QuantizedMatrix<double>::from_codes(spec, 3, 100, p.codes, p.scales, p.zeros);
  EXPECT_LT((qd.dequantize().cast<float>() - qf.dequantize()).cwiseAbs().maxCoeff(), 1e-5f);
}

TEST(QuantizedMatrix, RefusesInconsistentParts) {
  const QuantSpec spec{.bits = 2, .group_size = 32};
  Parts p = random_parts(2, 64, spec, 8);
  EXPECT_THROW((void)QuantizedMatrix<float>::from_codes(spec, 2, 65, p.codes, p.scales, p.zeros), Error);
  EXPECT_THROW((void)QuantizedMatrix<float>::from_codes(spec, 2, 64, p.codes, p.scales.leftCols(1), p.zeros), Error);
  p.codes(1, 3) = 4;  // does not fit 2 bits
  try {
    (void)QuantizedMatrix<float>::from_codes(spec, 2, 64, p.codes, p.scales, p.zeros);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("codes(1, 3) = 4"), std::string::npos) << e.what();
  }
  p.codes(1, 3) = 0;
  p.scales(0, 1) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW((void)QuantizedMatrix<float>::from_codes(spec, 2, 64, p.codes, p.scales, p.zeros), Error);
  p.scales(0, 1) = 1.0f;
  EXPECT_THROW((void)QuantizedMatrix<float>::from_codes(spec, 2, 64, p.codes, p.scales, p.zeros, {0, 1}), Error);
  std::vector<std::int32_t> repeated(64, 0);
  EXPECT_THROW((void)QuantizedMatrix<float>::from_codes(spec, 2, 64, p.codes, p.scales, p.zeros, repeated), Error);
}

TEST(QuantizedMatrix, EmptyShapesAreValid) {
  const QuantizedMatrix<float> q(0, 64, QuantSpec{});
  EXPECT_EQ(q.dequantize().size(), 0);
  EXPECT_EQ(q.packed_bytes(), 0u);
  const QuantizedMatrix<float> none(3, 0, QuantSpec{});
  EXPECT_EQ(none.dequantize().rows(), 3);
  EXPECT_EQ(none.bits_per_weight(), 0.0);
}

}  // namespace
}  // namespace lowbit

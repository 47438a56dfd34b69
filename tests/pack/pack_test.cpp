// Packing: the scalar reference against the layout's definition, and every SIMD
// variant the CPU runs bit-exact against the scalar reference.
#include "lowbit/pack/pack.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "test_util.hpp"

namespace lowbit {
namespace {

std::vector<Isa> runnable_isas() {
  std::vector<Isa> isas;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon})
    if (isa_supported(isa)) isas.push_back(isa);
  return isas;
}

// Sizes around every boundary of the layout: 32-code padding, 256-code blocks, and
// the widths of AVX2 / AVX-512 vectors.
const Index kSizes[] = {1, 7, 31, 32, 33, 63, 64, 100, 172, 255, 256, 257, 300, 511, 512, 513, 1000, 1024, 4096 + 37};

TEST(Layout, PlaneTableCoversEveryBitOnce) {
  for (int bits = 1; bits <= 8; ++bits) {
    const auto set = detail::planes_for_bits(bits);
    int covered = 0;
    for (int k = 0; k < set.count; ++k) {
      EXPECT_EQ(set.planes[k].shift, covered) << "bits " << bits;
      covered += set.planes[k].width;
    }
    EXPECT_EQ(covered, bits);
  }
}

TEST(Layout, RowBytesAreExactlyBitsPerPaddedCode) {
  EXPECT_EQ(detail::packed_row_bytes(1, 4), 16);
  EXPECT_EQ(detail::packed_row_bytes(4096, 4), 2048);
  EXPECT_EQ(detail::packed_row_bytes(4096, 3), 1536);
  EXPECT_EQ(detail::packed_row_bytes(4096, 2), 1024);
  EXPECT_EQ(detail::packed_row_bytes(172, 2), 48);
  EXPECT_EQ(detail::packed_row_bytes(0, 4), 0);
}

// The layout spelled out independently for one 4-bit block: byte j holds code j in
// its low nibble and code j + 128 in its high nibble.
TEST(Layout, FourBitBlockMatchesTheDiagram) {
  const auto codes = test::random_codes(256, 4, 1);
  std::vector<std::uint8_t> packed(128);
  detail::scalar::pack_row(codes.data(), 256, 4, packed.data());
  for (int j = 0; j < 128; ++j) {
    EXPECT_EQ(packed[j] & 0xF, codes[j]);
    EXPECT_EQ(packed[j] >> 4, codes[j + 128]);
  }
}

// 3-bit: a 64-byte 2-bit plane, then a 32-byte plane of the codes' bit 2.
TEST(Layout, ThreeBitBlockMatchesTheDiagram) {
  const auto codes = test::random_codes(256, 3, 2);
  std::vector<std::uint8_t> packed(96);
  detail::scalar::pack_row(codes.data(), 256, 3, packed.data());
  for (int c = 0; c < 256; ++c) {
    EXPECT_EQ((packed[c % 64] >> (2 * (c / 64))) & 3, codes[c] & 3) << c;
    EXPECT_EQ((packed[64 + c % 32] >> (c / 32)) & 1, codes[c] >> 2) << c;
  }
}

TEST(Layout, ShortLastBlockUsesItsOwnPlaneLength) {
  // 40 codes pad to 64: one block of t = 64, 1-bit... here 4-bit: L = 32.
  const auto codes = test::random_codes(40, 4, 3);
  std::vector<std::uint8_t> packed(32);
  detail::scalar::pack_row(codes.data(), 40, 4, packed.data());
  for (int j = 0; j < 32; ++j) {
    EXPECT_EQ(packed[j] & 0xF, codes[j]);
    EXPECT_EQ(packed[j] >> 4, j + 32 < 40 ? codes[j + 32] : 0);
  }
}

TEST(ScalarPack, RoundTripsEveryWidthAndSize) {
  for (int bits = 1; bits <= 8; ++bits)
    for (Index n : kSizes) {
      const auto codes = test::random_codes(n, bits, static_cast<std::uint64_t>(bits * 1000 + n));
      std::vector<std::uint8_t> packed(static_cast<std::size_t>(detail::packed_row_bytes(n, bits)));
      std::vector<std::uint8_t> back(static_cast<std::size_t>(n));
      detail::scalar::pack_row(codes.data(), n, bits, packed.data());
      detail::scalar::unpack_row(packed.data(), n, bits, back.data());
      ASSERT_EQ(back, codes) << "bits " << bits << " n " << n;
    }
}

TEST(SimdPack, EveryVariantPacksAndUnpacksBitExact) {
  for (Isa isa : runnable_isas())
    for (int bits = 1; bits <= 8; ++bits)
      for (Index n : kSizes) {
        SCOPED_TRACE(testing::Message() << isa_name(isa) << " bits " << bits << " n " << n);
        const auto codes = test::random_codes(n, bits, static_cast<std::uint64_t>(7 * bits + n));
        const auto bytes = static_cast<std::size_t>(detail::packed_row_bytes(n, bits));
        std::vector<std::uint8_t> reference(bytes), packed(bytes, 0xAB);
        detail::scalar::pack_row(codes.data(), n, bits, reference.data());
        detail::pack_row(codes.data(), n, bits, packed.data(), isa);
        ASSERT_EQ(packed, reference);
        std::vector<std::uint8_t> unpacked(static_cast<std::size_t>(n), 0xCD);
        detail::unpack_row(reference.data(), n, bits, unpacked.data(), isa);
        ASSERT_EQ(unpacked, codes);
      }
}

TEST(SimdPack, ExtremeCodesAllZerosAndAllOnes) {
  for (Isa isa : runnable_isas())
    for (int bits = 1; bits <= 8; ++bits)
      for (std::uint8_t value : {std::uint8_t{0}, static_cast<std::uint8_t>((1 << bits) - 1)}) {
        const Index n = 768;
        std::vector<std::uint8_t> codes(n, value), packed(static_cast<std::size_t>(detail::packed_row_bytes(n, bits)));
        std::vector<std::uint8_t> back(n);
        detail::pack_row(codes.data(), n, bits, packed.data(), isa);
        detail::unpack_row(packed.data(), n, bits, back.data(), isa);
        EXPECT_EQ(back, codes) << isa_name(isa) << " bits " << bits;
      }
}

TEST(SimdDequantize, EveryVariantBitExactAgainstScalar) {
  const Index group_sizes[] = {8, 16, 24, 32, 64, 100, 128, 256, 5000};
  for (Isa isa : runnable_isas())
    for (int bits = 1; bits <= 8; ++bits)
      for (Index n : kSizes)
        for (Index group : group_sizes) {
          SCOPED_TRACE(testing::Message() << isa_name(isa) << " bits " << bits << " n " << n << " g " << group);
          const auto codes = test::random_codes(n, bits, static_cast<std::uint64_t>(n * 31 + bits));
          std::vector<std::uint8_t> packed(static_cast<std::size_t>(detail::packed_row_bytes(n, bits)));
          detail::scalar::pack_row(codes.data(), n, bits, packed.data());
          const Index groups = (n + group - 1) / group;
          const Matrix<float> scales = test::random_matrix<float>(1, groups, 5 + n, 1e-2).cwiseAbs();
          const Matrix<float> zeros = test::random_matrix<float>(1, groups, 6 + n, 3.0);
          std::vector<float> expected(n), actual(n, -1.0f);
          detail::scalar::dequantize_row(packed.data(), n, bits, scales.data(), zeros.data(), group, expected.data());
          detail::dequantize_row(packed.data(), n, bits, scales.data(), zeros.data(), group, actual.data(), isa);
          ASSERT_EQ(0, std::memcmp(expected.data(), actual.data(), expected.size() * sizeof(float)));
          // And the reference is the affine decode of the codes it was given.
          for (Index i = 0; i < n; i += 37)
            ASSERT_EQ(expected[i], (float(codes[i]) - zeros(0, i / group)) * scales(0, i / group));
        }
}

TEST(SimdDequantize, ExtremeParametersStayBitExact) {
  const Index n = 1024, group = 64, groups = n / group;
  const float extremes[][2] = {{3.4e38f, 0.0f}, {1e-38f, 255.0f}, {1.4e-45f, -1e6f}, {-2.0f, 0.5f}, {0.0f, 7.0f}};
  for (Isa isa : runnable_isas())
    for (const auto& e : extremes) {
      const auto codes = test::random_codes(n, 4, 9);
      std::vector<std::uint8_t> packed(static_cast<std::size_t>(detail::packed_row_bytes(n, 4)));
      detail::scalar::pack_row(codes.data(), n, 4, packed.data());
      std::vector<float> scales(groups, e[0]), zeros(groups, e[1]), expected(n), actual(n);
      detail::scalar::dequantize_row(packed.data(), n, 4, scales.data(), zeros.data(), group, expected.data());
      detail::dequantize_row(packed.data(), n, 4, scales.data(), zeros.data(), group, actual.data(), isa);
      EXPECT_EQ(0, std::memcmp(expected.data(), actual.data(), n * sizeof(float))) << isa_name(isa);
    }
}

TEST(Dequantize, DoubleUsesTheSameFormula) {
  const Index n = 300, group = 64;
  const auto codes = test::random_codes(n, 3, 11);
  std::vector<std::uint8_t> packed(static_cast<std::size_t>(detail::packed_row_bytes(n, 3)));
  detail::pack_row(codes.data(), n, 3, packed.data());
  std::vector<float> scales = {0.5f, 0.25f, 2.0f, 1.0f, 3.0f}, zeros = {3.5f, 4.0f, 0.0f, 7.0f, 1.25f};
  std::vector<double> out(n);
  detail::dequantize_row(packed.data(), n, 3, scales.data(), zeros.data(), group, out.data());
  for (Index i = 0; i < n; ++i)
    EXPECT_EQ(out[i], (double(codes[i]) - double(zeros[i / group])) * double(scales[i / group]));
}

}  // namespace
}  // namespace lowbit

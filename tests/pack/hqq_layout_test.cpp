// HQQ's checkpoint packing, byte for byte against the reference packer's output.
#include "lowbit/pack/hqq_layout.hpp"

#include <gtest/gtest.h>

#include "test_util.hpp"

namespace lowbit {
namespace {

CodeMatrix load_codes(int bits, Index rows, Index cols) {
  const auto bytes = test::read_binary<std::uint8_t>("hqq_pack" + std::to_string(bits) + "_codes_u8.bin");
  EXPECT_EQ(static_cast<Index>(bytes.size()), rows * cols);
  return Eigen::Map<const CodeMatrix>(bytes.data(), rows, cols);
}

class HqqBytes : public testing::TestWithParam<int> {};

TEST_P(HqqBytes, PackMatchesReferenceBytesAndUnpacks) {
  const int bits = GetParam();
  const CodeMatrix codes = load_codes(bits, 64, 96);
  const auto expected = test::read_binary<std::uint8_t>("hqq_pack" + std::to_string(bits) + "_packed.bin");
  const hqq_layout::ByteMatrix packed = hqq_layout::pack_bytes(codes, bits);
  ASSERT_EQ(packed.rows(), 64 / hqq_layout::codes_per_element(bits));
  ASSERT_EQ(static_cast<std::size_t>(packed.size()), expected.size());
  EXPECT_TRUE(std::equal(expected.begin(), expected.end(), packed.data()));
  EXPECT_EQ(hqq_layout::unpack_bytes(packed, bits), codes);
}

INSTANTIATE_TEST_SUITE_P(Widths, HqqBytes, testing::Values(2, 4, 8));

TEST(HqqWords, ThreeBitMatchesReferenceWords) {
  const CodeMatrix codes = load_codes(3, 60, 96);
  const auto expected = test::read_binary<std::int32_t>("hqq_pack3_packed.bin");
  const hqq_layout::WordMatrix packed = hqq_layout::pack_words(codes);
  ASSERT_EQ(packed.rows(), 6);
  ASSERT_EQ(static_cast<std::size_t>(packed.size()), expected.size());
  EXPECT_TRUE(std::equal(expected.begin(), expected.end(), packed.data()));
  EXPECT_EQ(hqq_layout::unpack_words(packed), codes);
}

TEST(HqqLayout, RefusesBadInput) {
  CodeMatrix odd = CodeMatrix::Zero(3, 4);
  EXPECT_THROW((void)hqq_layout::pack_bytes(odd, 4), Error);
  CodeMatrix big = CodeMatrix::Constant(4, 4, 16);
  try {
    (void)hqq_layout::pack_bytes(big, 4);
    FAIL() << "expected lowbit::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("codes(0, 0) = 16"), std::string::npos) << e.what();
  }
  EXPECT_THROW((void)hqq_layout::codes_per_element(5), Error);
}

}  // namespace
}  // namespace lowbit

// The AVX2 GEMV kernels against dequantize(), on every shape, bit width and group
// size (within the bound of kernel_test_util.hpp, and exactly where float is exact).
#include "lowbit/kernels/gemv_avx2.hpp"

#include <gtest/gtest.h>

#include "kernel_test_util.hpp"
#include "lowbit/kernels/gemv.hpp"

namespace lowbit {
namespace {

TEST(GemvAvx2, MatchesDequantizedReferenceOnEveryShapeBitWidthAndGroupSize) {
  if (test::variant_runs(Isa::Avx2)) test::expect_variant_matches_reference(Isa::Avx2);
}

TEST(GemvAvx2, AgreesWithScalarOnAWiderLayer) {
  if (test::variant_runs(Isa::Avx2)) test::expect_variant_agrees_with_scalar(Isa::Avx2);
}

#if defined(LOWBIT_HAVE_AVX2)
// The lane order the kernels decode matches the layout: decoding every slice of a
// block of known codes gives code 32u + 4k + b in lane k of slice (u, b).
template <int Bits, int U, int B>
LOWBIT_TARGET_AVX2 void decode_slice_to(const std::uint8_t* block, float* lanes) {
  _mm256_storeu_ps(lanes, detail::avx2::decode_slice<Bits, U, B>(block, detail::avx2::decode_table<Bits>()));
}

template <int Bits, int U, int B>
void expect_slice(const std::uint8_t* block, const std::vector<std::uint8_t>& codes) {
  float lanes[8];
  decode_slice_to<Bits, U, B>(block, lanes);
  for (int k = 0; k < 8; ++k)
    ASSERT_EQ(lanes[k], codes[static_cast<std::size_t>(32 * U + 4 * k + B)]) << Bits << "-bit slice " << U << "," << B;
}

template <int Bits>
void expect_block_decodes() {
  const auto codes = test::random_codes(256, Bits, Bits);
  std::vector<std::uint8_t> packed(static_cast<std::size_t>(32 * Bits + detail::kOverread));
  detail::scalar::pack_row(codes.data(), 256, Bits, packed.data());
  expect_slice<Bits, 0, 0>(packed.data(), codes);
  expect_slice<Bits, 0, 3>(packed.data(), codes);
  expect_slice<Bits, 1, 1>(packed.data(), codes);
  expect_slice<Bits, 2, 2>(packed.data(), codes);
  expect_slice<Bits, 3, 0>(packed.data(), codes);
  expect_slice<Bits, 5, 3>(packed.data(), codes);
  expect_slice<Bits, 7, 1>(packed.data(), codes);
}

TEST(GemvAvx2, SlicesDecodeTheLayoutInLaneOrder) {
  if (!test::variant_runs(Isa::Avx2)) return;
  expect_block_decodes<1>();
  expect_block_decodes<2>();
  expect_block_decodes<3>();
  expect_block_decodes<4>();
  expect_block_decodes<5>();
  expect_block_decodes<6>();
  expect_block_decodes<7>();
  expect_block_decodes<8>();
}
#endif

}  // namespace
}  // namespace lowbit

// The AVX-512 GEMV kernels against dequantize(), on every shape, bit width and group
// size (within the bound of kernel_test_util.hpp, and exactly where float is exact).
#include "lowbit/kernels/gemv_avx512.hpp"

#include <gtest/gtest.h>

#include "kernel_test_util.hpp"
#include "lowbit/kernels/gemv.hpp"

namespace lowbit {
namespace {

TEST(GemvAvx512, MatchesDequantizedReferenceOnEveryShapeBitWidthAndGroupSize) {
  if (test::variant_runs(Isa::Avx512)) test::expect_variant_matches_reference(Isa::Avx512);
}

TEST(GemvAvx512, AgreesWithScalarOnAWiderLayer) {
  if (test::variant_runs(Isa::Avx512)) test::expect_variant_agrees_with_scalar(Isa::Avx512);
}

#if defined(LOWBIT_HAVE_AVX512)
// The lane order the kernels decode matches the layout: decoding each of the 16 slices
// of a block of known codes gives code 64u + 4k + b in lane k of slice (u, b).
template <int Bits, int U, int B>
LOWBIT_TARGET_AVX512 void decode_slice_to(const std::uint8_t* block, float* lanes) {
  _mm512_storeu_ps(lanes, detail::avx512::decode_slice<Bits, U, B>(block, detail::avx512::decode_tables<Bits>()));
}

template <int Bits, int U, int B>
void expect_slice(const std::uint8_t* block, const std::vector<std::uint8_t>& codes) {
  float lanes[16];
  decode_slice_to<Bits, U, B>(block, lanes);
  for (int k = 0; k < 16; ++k)
    ASSERT_EQ(lanes[k], codes[static_cast<std::size_t>(64 * U + 4 * k + B)]) << Bits << "-bit slice " << U << "," << B;
}

template <int Bits, int U>
void expect_unit(const std::uint8_t* block, const std::vector<std::uint8_t>& codes) {
  expect_slice<Bits, U, 0>(block, codes);
  expect_slice<Bits, U, 1>(block, codes);
  expect_slice<Bits, U, 2>(block, codes);
  expect_slice<Bits, U, 3>(block, codes);
}

template <int Bits>
void expect_block_decodes() {
  const auto codes = test::random_codes(256, Bits, Bits);
  std::vector<std::uint8_t> packed(static_cast<std::size_t>(32 * Bits + detail::kOverread));
  detail::scalar::pack_row(codes.data(), 256, Bits, packed.data());
  expect_unit<Bits, 0>(packed.data(), codes);
  expect_unit<Bits, 1>(packed.data(), codes);
  expect_unit<Bits, 2>(packed.data(), codes);
  expect_unit<Bits, 3>(packed.data(), codes);
}

TEST(GemvAvx512, SlicesDecodeTheLayoutInLaneOrder) {
  if (!test::variant_runs(Isa::Avx512)) return;
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

// The AVX-512 GEMV kernels against dequantize(), on every shape, bit width and group
// size (within the bound of kernel_test_util.hpp, and exactly where float is exact).
#include "lowbit/kernels/gemv_avx512.hpp"

#include <gtest/gtest.h>

#include "kernel_test_util.hpp"
#include "lowbit/kernels/gemv.hpp"

namespace lowbit {
namespace {

using test::Case;

bool avx512_runs() {
  if (isa_supported(Isa::Avx512)) return true;
  EXPECT_THROW(set_isa(Isa::Avx512), Error);  // this CPU cannot be forced onto the variant
  return false;
}

TEST(GemvAvx512, MatchesDequantizedReferenceOnEveryShapeBitWidthAndGroupSize) {
  if (!avx512_runs()) return;
  test::IsaScope scope(Isa::Avx512);
  test::sweep_gemv_cases([](const QuantizedMatrix<float>& q, const Vector<float>& x, const Vector<double>& ref,
                            const Vector<double>& bound, const std::string& name) {
    Vector<float> y(q.rows());
    gemv(q, x, y);
    test::expect_within(y.cast<double>(), ref, bound, "avx512 " + name);
  });
}

#if defined(LOWBIT_HAVE_AVX512)
// The lane order the kernels decode matches the layout: decoding every slice of a
// block of known codes gives code 64u + 4k + b in lane k of slice (u, b).
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
  expect_slice<Bits, 3, 3>(packed.data(), codes);
}

TEST(GemvAvx512, SlicesDecodeTheLayoutInLaneOrder) {
  if (!avx512_runs()) return;
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

TEST(GemvAvx512, AgreesWithScalarOnAWiderLayer) {
  if (!avx512_runs()) return;
  for (const Case& c : {Case{67, 2500, 4, 64}, Case{33, 1111, 3, 128, GroupAxis::Input, true},
                        Case{20, 700, 2, 32, GroupAxis::Output}, Case{40, 1000, 8, 0}}) {
    const auto q = test::quantized_case<float>(c, 31);
    const Vector<float> x = test::random_matrix<float>(c.cols, 1, 32);
    const Vector<double> bound = test::gemv_bound(q, test::logical_params(q), x.cast<double>());
    Vector<float> simd(c.rows), scalar(c.rows);
    {
      test::IsaScope scope(Isa::Avx512);
      gemv(q, x, simd);
    }
    {
      test::IsaScope scope(Isa::Scalar);
      gemv(q, x, scalar);
    }
    // Both are within the bound of the exact value, so within twice of each other.
    test::expect_within(simd.cast<double>(), scalar.cast<double>(), 2 * bound, c.name());
  }
}

}  // namespace
}  // namespace lowbit

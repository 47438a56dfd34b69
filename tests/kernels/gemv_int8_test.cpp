// lowbit::gemv_int8: the int8-activation GEMV against W_hat x, within the error of
// quantizing x to int8 per activation block (64 inputs or one group), on every variant.
#include "lowbit/kernels/gemv_int8.hpp"

#include <gtest/gtest.h>

#include <cstring>

#include "kernel_test_util.hpp"

namespace lowbit {
namespace {

using test::Case;

// |y - W_hat x| <= sum_j |w_hat_rj| e_j + (gamma_K + 3u) M(|x| + e), where e_j, the
// int8 rounding error of input j, is at most half the step of its activation block of
// stored columns: max |x| over the block / 254 (with a few ulps for the step's own
// rounding).
Vector<double> int8_bound(const QuantizedMatrix<float>& q, const Vector<float>& x) {
  const Index n = q.cols(), block = detail::activation_block(q.stored_cols(), q.group_length());
  const auto logical = [&](Index stored) {
    return q.permutation().empty() ? stored : static_cast<Index>(q.permutation()[static_cast<std::size_t>(stored)]);
  };
  Vector<double> step_error(n);
  for (Index j = 0; j < n; ++j) {  // j runs over stored columns
    double max_abs = 0;
    for (Index k = j / block * block; k < std::min(n, j / block * block + block); ++k)
      max_abs = std::max(max_abs, std::abs(static_cast<double>(x[logical(k)])));
    step_error[logical(j)] = max_abs / 254 * (1 + 1e-6);
  }
  const auto params = test::logical_params(q);
  const Matrix<double> W_hat = q.dequantize().cast<double>();
  const Vector<double> x_plus = x.cast<double>().cwiseAbs() + step_error;
  return W_hat.cwiseAbs() * step_error + test::gemv_bound(q, params, x_plus);
}

TEST(GemvInt8, EveryVariantIsWithinTheInt8InputError) {
  test::ThreadScope single(1);
  for (Isa isa : test::runnable_isas()) {
    test::IsaScope scope(isa);
    std::uint64_t seed = 40;
    for (const auto& [rows, cols] : test::kernel_shapes())
      for (int bits = 1; bits <= 8; ++bits)
        for (Index group : {32, 64, 128, 192, 256, 0, 96, 12})
          for (int variant = 0; variant < 3; ++variant) {
            Case c{rows, cols, bits, group};
            c.permuted = variant == 1 && cols > 1;
            c.axis = variant == 2 ? GroupAxis::Output : GroupAxis::Input;  // runs gemv
            const auto q = test::quantized_case<float>(c, ++seed);
            const Vector<float> x = test::random_matrix<float>(cols, 1, seed + 1);
            Vector<float> y(rows);
            gemv_int8(q, x, y);
            test::expect_within(y.cast<double>(), test::reference_gemv(q, x), int8_bound(q, x),
                                std::string(isa_name(isa)) + " " + c.name());
            if (HasFailure()) return;
          }
  }
}

// An input that int8 holds exactly (integers with each block's max |x| = 127) on a matrix
// whose float arithmetic is exact (every partial sum is a multiple of 1/16 below 2^20:
// n max_code 127 (|sum q x|) plus as much for |z S| stays below 2^20 for these widths
// and columns): the integer path must give W_hat x bit for bit.
TEST(GemvInt8, ExactWhenTheInputIsAlreadyInt8) {
  test::ThreadScope single(1);
  for (Isa isa : test::runnable_isas()) {
    test::IsaScope scope(isa);
    for (const Case& c : {Case{9, 264, 4, 32}, Case{5, 300, 2, 64, GroupAxis::Input, true}, Case{6, 300, 3, 0},
                          Case{7, 288, 1, 32}}) {
      const auto q = test::exact_case(c, 3);
      ASSERT_TRUE(detail::int8_path_applies(q, isa)) << c.name();
      std::mt19937_64 rng(5);
      Vector<float> x(c.cols);
      for (Index j = 0; j < c.cols; ++j) x[j] = static_cast<float>(static_cast<int>(rng() % 255) - 127);
      for (Index j = 0; j < c.cols; j += 32) {  // stored block j/32 holds a 127
        const Index stored = j;
        x[q.permutation().empty() ? stored : q.permutation()[static_cast<std::size_t>(stored)]] = 127;
      }
      Vector<float> y(c.rows);
      gemv_int8(q, x, y);
      test::expect_within(y.cast<double>(), test::reference_gemv(q, x), Vector<double>::Zero(c.rows),
                          std::string(isa_name(isa)) + " " + c.name());
    }
  }
}

// An x tiny throughout is scaled by a power of two before it is quantized and y after:
// the result keeps the int8 input's error bound (1e-30), and stays close where y is
// subnormal (1e-44, where max |x| / 127 underflows to 0 unscaled), and the next call,
// with an ordinary x, is not affected.
TEST(GemvInt8, TinyInputsKeepTheirPrecision) {
  test::ThreadScope single(1);
  const auto q = test::quantized_case<float>(Case{13, 300, 4, 64}, 5);
  const Vector<float> x = test::random_matrix<float>(300, 1, 6);
  Vector<float> y_before(13), y_after(13), y(13);
  gemv_int8(q, x, y_before);
  for (Isa isa : test::runnable_isas()) {
    test::IsaScope scope(isa);
    const Vector<float> x_small = x * 1e-30f;
    gemv_int8(q, x_small, y);
    test::expect_within(y.cast<double>(), test::reference_gemv(q, x_small), int8_bound(q, x_small),
                        std::string(isa_name(isa)) + " 1e-30");
    const Vector<float> x_subnormal = x * 1e-44f;
    gemv_int8(q, x_subnormal, y);
    const Vector<double> reference = test::reference_gemv(q, x_subnormal);
    const double subnormal_step = std::numeric_limits<float>::denorm_min();
    test::expect_within(y.cast<double>(), reference,
                        int8_bound(q, x_subnormal).array() + subnormal_step, std::string(isa_name(isa)) + " 1e-44");
    EXPECT_GT(y.cwiseAbs().maxCoeff(), 0.0f) << isa_name(isa);
  }
  gemv_int8(q, x, y_after);
  EXPECT_EQ(y_before, y_after);
}

TEST(GemvInt8, BitIdenticalForOneAndTwoThreads) {
  test::expect_thread_invariant(
      {Case{301, 1000, 4, 64}, Case{130, 777, 3, 32, GroupAxis::Input, true}, Case{257, 512, 8, 0}},
      [](const auto& q, const auto& x, auto& y) { gemv_int8(q, x, y); });
}

// The integer kernels really run where they apply (the result carries the int8 input
// error, so it differs from gemv), and the rest (transposed, groups that are no multiple
// of 32, rows of at most 224 codes, 8-bit codes on AVX2) is exactly gemv.
TEST(GemvInt8, IntegerPathRunsWhereItAppliesAndGemvElsewhere) {
#if defined(LOWBIT_HAVE_AVX512)
  if (isa_supported(Isa::Avx512) && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi")) {
    EXPECT_EQ(detail::int8_kernel(Isa::Avx512), 2);
  }
#endif
  if (isa_supported(Isa::Avx2)) {
    EXPECT_EQ(detail::int8_kernel(Isa::Avx2), 1);
  }
  EXPECT_EQ(detail::int8_kernel(Isa::Scalar), 0);
  for (Isa isa : test::runnable_isas()) {
    test::IsaScope scope(isa);
    for (const Case& c : {Case{37, 300, 4, 64}, Case{37, 300, 8, 32}, Case{37, 300, 4, 12},
                          Case{300, 37, 4, 64, GroupAxis::Output}, Case{37, 224, 4, 32}, Case{37, 240, 4, 32}}) {
      const auto q = test::quantized_case<float>(c, 8);
      const Vector<float> x = test::random_matrix<float>(c.cols, 1, 9);
      Vector<float> y_int8(c.rows), y_float(c.rows);
      gemv_int8(q, x, y_int8);
      gemv(q, x, y_float);
      const bool integer = detail::int8_path_applies(q, detail::int8_kernel(isa) == 1 ? Isa::Avx2 : isa);
      EXPECT_EQ(integer, c.group_size != 12 && c.axis == GroupAxis::Input && c.cols > 224 &&
                             !(c.bits == 8 && detail::int8_kernel(isa) == 1))
          << isa_name(isa) << " " << c.name();
      if (integer) {
        EXPECT_NE(y_int8, y_float) << isa_name(isa) << " " << c.name();
      } else {
        EXPECT_EQ(y_int8, y_float) << isa_name(isa) << " " << c.name();
      }
    }
  }
}

#if defined(LOWBIT_HAVE_AVX512)
// Codes left in place (2-, 3- and 4-bit, in_place_codes): the integer sums carry 2^bit and
// the block scales d / 2^bit, exactly, so the result is the shifting kernel's bit for bit.
template <int Bits, detail::ScaleBlock Mode>
void expect_in_place_matches_shifted(const QuantizedMatrix<float>& q, const Vector<float>& x) {
  detail::Int8Input input = detail::quantize_activation(q, x.data(), Isa::Avx512);
  ASSERT_EQ(detail::scale_block(input, q.stored_cols(), q.group_length()), Mode) << q.group_length();
  const detail::Int8RowsArgs args{&input, q.stored_cols(), q.groups_per_row(), input.block / 64, q.row_bytes(),
                                  q.packed_codes().data() + q.packed_codes().size(),
                                  q.scales().data() + q.scales().size(), q.zeros().data() + q.zeros().size(),
                                  input.block_scales.data()};
  ASSERT_TRUE(detail::in_place_codes(Bits, Mode, args.chunks_per_group));
  detail::set_in_place_scales(input, Bits);
  detail::Int8RowsArgs in_place_args = args;
  in_place_args.block_scales = input.in_place_scales.data();
  Vector<float> shifted(q.rows()), in_place(q.rows());
  for (Index task = 0; task < detail::row_tasks(q.rows()); ++task) {
    detail::row_task(q, task, shifted.data(),
                     [&](auto... a) { detail::avx512::gemv_int8_rows<Bits, detail::kKernelRows, Mode, false>(args, a...); },
                     [&](auto... a) { detail::avx512::gemv_int8_rows<Bits, 1, Mode, false>(args, a...); });
    detail::row_task(q, task, in_place.data(),
                     [&](auto... a) { detail::avx512::gemv_int8_rows<Bits, detail::kKernelRows, Mode, true>(in_place_args, a...); },
                     [&](auto... a) { detail::avx512::gemv_int8_rows<Bits, 1, Mode, true>(in_place_args, a...); });
  }
  EXPECT_EQ(std::memcmp(shifted.data(), in_place.data(), sizeof(float) * static_cast<std::size_t>(q.rows())), 0)
      << Bits << "-bit group " << q.group_length();
}

TEST(GemvInt8, CodesInPlaceGiveTheShiftedResultExactly) {
  if (detail::int8_kernel(Isa::Avx512) != 2) return;
  using detail::ScaleBlock;
  const auto run = [](int bits, Index group, auto expect) {
    const auto q = test::quantized_case<float>(Case{11, 1000, bits, group}, 21);  // 2 row quads, 3 single rows, 3.9 blocks a row
    expect(q, test::random_matrix<float>(1000, 1, 22));
  };
  run(4, 64, [](const auto& q, const auto& x) { expect_in_place_matches_shifted<4, ScaleBlock::Group>(q, x); });
  run(4, 128, [](const auto& q, const auto& x) { expect_in_place_matches_shifted<4, ScaleBlock::Group>(q, x); });
  run(4, 32, [](const auto& q, const auto& x) { expect_in_place_matches_shifted<4, ScaleBlock::TwoGroups>(q, x); });
  run(4, 0, [](const auto& q, const auto& x) { expect_in_place_matches_shifted<4, ScaleBlock::Chunk>(q, x); });
  run(2, 64, [](const auto& q, const auto& x) { expect_in_place_matches_shifted<2, ScaleBlock::Group>(q, x); });
  run(2, 320, [](const auto& q, const auto& x) { expect_in_place_matches_shifted<2, ScaleBlock::Chunk>(q, x); });
  run(3, 64, [](const auto& q, const auto& x) { expect_in_place_matches_shifted<3, ScaleBlock::Group>(q, x); });
  run(3, 128, [](const auto& q, const auto& x) { expect_in_place_matches_shifted<3, ScaleBlock::Group>(q, x); });
  run(3, 96, [](const auto& q, const auto& x) { expect_in_place_matches_shifted<3, ScaleBlock::TwoGroups>(q, x); });
  run(3, 0, [](const auto& q, const auto& x) { expect_in_place_matches_shifted<3, ScaleBlock::Chunk>(q, x); });
  EXPECT_FALSE(detail::in_place_codes(2, ScaleBlock::Group, 2));  // chunks at bits 0 and 2 in one integer sum
  EXPECT_FALSE(detail::in_place_codes(4, ScaleBlock::Group, 4));
  EXPECT_FALSE(detail::in_place_codes(5, ScaleBlock::Chunk, 1));
}
#endif

#if defined(LOWBIT_HAVE_AVX2)
// A row's tail as a full block (the int8 kernels' view of a row that does not end on a
// full block): the run-by-run unpack and the SIMD pack give the bytes of the scalar
// reference's code-by-code unpack and pack, for every width and every kind of tail
// (short blocks of 32..224 codes, alone or after full blocks; a full block ending in
// padding).
TEST(GemvInt8, TailBlockMatchesTheScalarRepack) {
  if (!isa_supported(Isa::Avx2)) return;
  std::mt19937_64 rng(31);
  for (int bits = 1; bits <= 8; ++bits) {
    for (Index n : {1, 31, 32, 33, 100, 224, 255, 257, 287, 456, 511, 736, 4090}) {
      std::vector<std::uint8_t> codes(static_cast<std::size_t>(n));
      for (auto& code : codes) code = static_cast<std::uint8_t>(rng() & ((1u << bits) - 1u));
      std::vector<std::uint8_t> row(static_cast<std::size_t>(detail::packed_row_bytes(n, bits)));
      detail::scalar::pack_row(codes.data(), n, bits, row.data());
      const Index first = n / detail::kBlockCodes * detail::kBlockCodes;
      std::uint8_t tail_codes[detail::kBlockCodes] = {}, expected[detail::kBlockCodes] = {}, actual[detail::kBlockCodes] = {};
      std::copy(codes.begin() + first, codes.end(), tail_codes);
      detail::scalar::pack_block(tail_codes, detail::kBlockCodes, bits, expected);
      detail::with_bits(bits, [&](auto b) { detail::repack_tail_block<decltype(b)::value>(row.data(), n, actual); });
      EXPECT_EQ(std::memcmp(expected, actual, static_cast<std::size_t>(detail::kBlockCodes * bits / 8)), 0) << bits << "-bit, n " << n;
    }
  }
}
#endif

#if defined(LOWBIT_HAVE_AVX2)
// The activation quantizer's AVX2 and scalar forms give the same scale and codes,
// including ties (x / d exactly halfway) and all-zero blocks.
TEST(GemvInt8, ActivationQuantizersAgree) {
  if (!isa_supported(Isa::Avx2)) return;
  std::mt19937_64 rng(17);
  std::normal_distribution<float> normal;
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<float> x(64);
    for (auto& v : x) v = trial % 3 == 0 ? static_cast<float>(static_cast<int>(rng() % 509) - 254) / 2 : normal(rng);
    if (trial % 3 == 0) x[5] = 127;  // d = 1: every half-integer is a tie
    if (trial == 1) std::fill(x.begin(), x.end(), 0.0f);
    std::vector<std::int8_t> scalar(64), simd(64);
    const float d_scalar = detail::quantize_activation_block_scalar(x.data(), 64, scalar.data());
    const float d_simd = detail::quantize_activation_block_avx2(x.data(), 64, simd.data());
    ASSERT_EQ(d_scalar, d_simd) << trial;
    ASSERT_EQ(scalar, simd) << trial;
    if (trial % 3 == 0) {
      EXPECT_EQ(scalar[0], static_cast<std::int8_t>(std::nearbyint(x[0])));  // ties to even
    }
  }
}
#endif

TEST(GemvInt8, ShapeMismatchesAndNonFiniteInputThrow) {
  const auto q = test::quantized_case<float>(Case{5, 64, 4, 32}, 1);
  Vector<float> x = Vector<float>::Ones(64), y(5), short_x(63), long_y(6);
  EXPECT_THROW(gemv_int8(q, short_x, y), Error);
  EXPECT_THROW(gemv_int8(q, x, long_y), Error);
  x[3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(gemv_int8(q, x, y), Error);
}

// On the fixture layer the int8 input adds little to the weights' own output error.
TEST(GemvInt8, FixtureLayerOutputErrorStaysCloseToTheFloatPath) {
  const auto& layer = test::fixture_layer();
  const auto q = RTN<float>(QuantSpec{.bits = 4, .group_size = 64}).quantize(layer.W);
  const Index tokens = 64;
  const Matrix<double> exact = layer.Xeval.topRows(tokens).cast<double>() * layer.W.cast<double>().transpose();
  Matrix<double> Y_float(tokens, q.rows()), Y_int8(tokens, q.rows());
  for (Index t = 0; t < tokens; ++t) {
    const Vector<float> x = layer.Xeval.row(t).transpose();
    Vector<float> y(q.rows());
    gemv(q, x, y);
    Y_float.row(t) = y.cast<double>().transpose();
    gemv_int8(q, x, y);
    Y_int8.row(t) = y.cast<double>().transpose();
  }
  const double float_rel = (Y_float - exact).norm() / exact.norm();
  const double int8_rel = (Y_int8 - exact).norm() / exact.norm();
  EXPECT_LT(int8_rel, 1.02 * float_rel);
  EXPECT_LT((Y_int8 - Y_float).norm() / exact.norm(), 0.02);
}

}  // namespace
}  // namespace lowbit

// The packed GEMM behind GPTQ: every ISA's kernel against a double-precision product,
// the FMA kernels bit-exact against each other, and results independent of how C is
// cut into tiles.
#include "lowbit/quantizers/gptq_gemm.hpp"

#include <gtest/gtest.h>

#include <vector>

#include "test_util.hpp"

namespace lowbit {
namespace {

using detail::gemm::Kernel;
using detail::gemm::View;

std::vector<Isa> runnable_isas() {
  std::vector<Isa> isas;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512})
    if (isa_supported(isa)) isas.push_back(isa);
  return isas;
}

// Shapes around the register tiles (MR 4/6/12, NR 8/16/32), the depth block (256)
// and the row block (192).
struct Shape {
  Index m, n, k;
};
const Shape kShapes[] = {{1, 1, 1},     {5, 7, 3},      {12, 32, 16},   {13, 33, 17}, {37, 70, 255},
                         {64, 64, 256}, {100, 40, 257}, {193, 65, 300}, {250, 9, 513}};

template <class T>
void check_against_double(Isa isa, bool transposed_a, bool subtract) {
  const Kernel<T> kernel = detail::gemm::kernel_for<T>(isa);
  for (const Shape& s : kShapes) {
    const Matrix<T> A =
        transposed_a ? Matrix<T>(test::random_matrix<T>(s.k, s.m, 1)) : test::random_matrix<T>(s.m, s.k, 1);
    const Matrix<T> B = test::random_matrix<T>(s.k, s.n, 2);
    const Matrix<T> C0 = test::random_matrix<T>(s.m, s.n, 3);
    Matrix<T> C = C0;
    const View<T> a = transposed_a ? View<T>{A.data(), 1, s.m} : detail::gemm::row_major(A.data(), s.k);
    detail::gemm::multiply(kernel, s.m, s.n, s.k, a, detail::gemm::row_major(B.data(), s.n), C.data(), s.n, subtract);
    const Matrix<double> Ad =
        transposed_a ? Matrix<double>(A.template cast<double>().transpose()) : A.template cast<double>();
    const Matrix<double> product = Ad * B.template cast<double>();
    const Matrix<double> expected = C0.template cast<double>() + (subtract ? -1.0 : 1.0) * product;
    // |error| <= k * eps * sum |a||b| (+ the final rounding), with sum |a||b| ~ k for N(0,1) data.
    const double eps = std::numeric_limits<T>::epsilon();
    const double bound = 2.0 * eps * static_cast<double>(s.k + 2) * (static_cast<double>(s.k) + 4.0);
    EXPECT_LE((C.template cast<double>() - expected).cwiseAbs().maxCoeff(), bound)
        << isa_name(isa) << " " << s.m << "x" << s.n << "x" << s.k;
  }
}

TEST(GptqGemm, MatchesDoubleProductFloat) {
  for (Isa isa : runnable_isas())
    for (bool transposed : {false, true})
      for (bool subtract : {false, true}) check_against_double<float>(isa, transposed, subtract);
}

TEST(GptqGemm, MatchesDoubleProductDouble) {
  for (Isa isa : runnable_isas())
    for (bool subtract : {false, true}) check_against_double<double>(isa, false, subtract);
}

// AVX2 and AVX-512 both run one FMA chain per element in the same order, so their
// results are the same bits.
template <class T>
void check_fma_kernels_agree() {
  if (!isa_supported(Isa::Avx2) || !isa_supported(Isa::Avx512)) GTEST_FAIL() << "this CPU lacks AVX2 or AVX-512";
  for (const Shape& s : kShapes) {
    const Matrix<T> A = test::random_matrix<T>(s.m, s.k, 4), B = test::random_matrix<T>(s.k, s.n, 5);
    Matrix<T> C2 = test::random_matrix<T>(s.m, s.n, 6), C5 = C2;
    detail::gemm::multiply(detail::gemm::kernel_for<T>(Isa::Avx2), s.m, s.n, s.k,
                           detail::gemm::row_major(A.data(), s.k), detail::gemm::row_major(B.data(), s.n), C2.data(),
                           s.n, true);
    detail::gemm::multiply(detail::gemm::kernel_for<T>(Isa::Avx512), s.m, s.n, s.k,
                           detail::gemm::row_major(A.data(), s.k), detail::gemm::row_major(B.data(), s.n), C5.data(),
                           s.n, true);
    EXPECT_TRUE(C2 == C5) << s.m << "x" << s.n << "x" << s.k;
  }
}

TEST(GptqGemm, FmaKernelsAreBitExactAcrossIsas) {
  check_fma_kernels_agree<float>();
  check_fma_kernels_agree<double>();
}

// A product computed whole equals the same product computed tile by tile (each element
// is the same chain), for every kernel: what makes thread counts irrelevant.
TEST(GptqGemm, TilingDoesNotChangeBits) {
  const Index m = 150, n = 100, k = 300;
  const Matrix<float> A = test::random_matrix<float>(m, k, 7), B = test::random_matrix<float>(k, n, 8);
  for (Isa isa : runnable_isas()) {
    const Kernel<float> kernel = detail::gemm::kernel_for<float>(isa);
    Matrix<float> whole = Matrix<float>::Zero(m, n), tiled = whole;
    detail::gemm::multiply(kernel, m, n, k, detail::gemm::row_major(A.data(), k), detail::gemm::row_major(B.data(), n),
                           whole.data(), n, false);
    for (Index i0 = 0; i0 < m; i0 += 48)
      for (Index j0 = 0; j0 < n; j0 += 64) {
        const Index rows = std::min<Index>(48, m - i0), cols = std::min<Index>(64, n - j0);
        detail::gemm::multiply(kernel, rows, cols, k, detail::gemm::row_major(A.data() + i0 * k, k),
                               detail::gemm::row_major(B.data() + j0, n), tiled.data() + i0 * n + j0, n, false);
      }
    EXPECT_TRUE(whole == tiled) << isa_name(isa);
  }
}

TEST(GptqGemm, PackingPadsWithZeros) {
  const Kernel<float> kernel = detail::gemm::kernel_for<float>(Isa::Scalar);  // MR 4, NR 8
  const Matrix<float> A = test::random_matrix<float>(5, 3, 9);
  std::vector<float> packed(static_cast<std::size_t>(kernel.packed_a_size(5, 3)), -1.0f);
  detail::gemm::pack_a(kernel, 5, 3, detail::gemm::row_major(A.data(), 3), packed.data());
  ASSERT_EQ(packed.size(), 2u * 4u * 3u);
  for (Index panel = 0; panel < 2; ++panel)
    for (Index p = 0; p < 3; ++p)
      for (Index r = 0; r < 4; ++r) {
        const Index row = panel * 4 + r;
        EXPECT_EQ(packed[static_cast<std::size_t>((panel * 3 + p) * 4 + r)], row < 5 ? A(row, p) : 0.0f);
      }
  std::vector<float> packed_b(static_cast<std::size_t>(kernel.packed_b_size(3, 5)), -1.0f);
  const Matrix<float> B = test::random_matrix<float>(3, 5, 10);
  detail::gemm::pack_b(kernel, 3, 5, detail::gemm::row_major(B.data(), 5), packed_b.data());
  ASSERT_EQ(packed_b.size(), 8u * 3u);
  for (Index p = 0; p < 3; ++p)
    for (Index s = 0; s < 8; ++s) EXPECT_EQ(packed_b[static_cast<std::size_t>(p * 8 + s)], s < 5 ? B(p, s) : 0.0f);
}

TEST(GptqGemm, EmptyProductsLeaveCAlone) {
  const Kernel<float> kernel = detail::gemm::active_kernel<float>();
  Matrix<float> C = Matrix<float>::Constant(3, 3, 2.0f);
  const Matrix<float> A(3, 0), B(0, 3);
  detail::gemm::multiply(kernel, 3, 3, 0, detail::gemm::row_major(A.data(), 0), detail::gemm::row_major(B.data(), 3),
                         C.data(), 3, true);
  EXPECT_TRUE(C == Matrix<float>::Constant(3, 3, 2.0f));
}

}  // namespace
}  // namespace lowbit

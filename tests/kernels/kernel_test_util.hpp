// Shared checks for the GEMV / matmul tests: quantized test matrices, a double
// reference from dequantize(), and the error bound the kernels are held to.
//
// Tolerance. Every kernel computes, per output, a float sum whose terms are (in exact
// arithmetic) s (q - z) x over the row, regrouped as s (sum q x) - s z S_g. However the
// sum is ordered, each term goes through at most K = cols + groups + 8 roundings
// (products, lane sums, group scaling, lane reduction), so by the standard bound
//   |y - y_exact| <= gamma_K * M,   gamma_K = K u / (1 - K u),  u = 2^-24,
//   M = sum_c |s_c| (q_c + |z_c|) |x_c|
// (the absolute values of every term of both sums). The reference uses dequantize()'s
// w_hat = fl(fl(q - z) s), within 2u |(q - z) s| of exact, and the kernels round S_g
// once more (u |S_g|): 3u M in all. The checks use (gamma_K + 3u) M.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "lowbit/core/isa.hpp"
#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/kernels/gemv.hpp"
#include "lowbit/quantizers/rtn.hpp"
#include "test_util.hpp"

namespace lowbit::test {

inline std::vector<Isa> runnable_isas() {
  std::vector<Isa> isas;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon})
    if (isa_supported(isa)) isas.push_back(isa);
  return isas;
}

// Restores the active ISA when a test ends.
class IsaScope {
 public:
  explicit IsaScope(Isa isa) : saved_(active_isa()) { set_isa(isa); }
  ~IsaScope() { set_isa(saved_); }
  IsaScope(const IsaScope&) = delete;
  IsaScope& operator=(const IsaScope&) = delete;

 private:
  Isa saved_;
};

// Sets lowbit's thread count for a scope. The sweeps run single-threaded: they check
// arithmetic on thousands of small cases, where waking a thread team for each would
// dominate; thread-count invariance has tests of its own.
class ThreadScope {
 public:
  explicit ThreadScope(int threads) : saved_(num_threads()) { set_num_threads(threads); }
  ~ThreadScope() { set_num_threads(saved_); }
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;

 private:
  int saved_;
};

// A deterministic permutation of n columns (act-order stand-in).
inline std::vector<std::int32_t> shuffled_columns(Index n, std::uint64_t seed) {
  std::vector<std::int32_t> p(static_cast<std::size_t>(n));
  std::iota(p.begin(), p.end(), 0);
  std::shuffle(p.begin(), p.end(), std::mt19937_64(seed));
  return p;
}

struct Case {
  Index rows, cols;
  int bits;
  Index group_size;
  GroupAxis axis = GroupAxis::Input;
  bool permuted = false;
  ParamType params = ParamType::Float32;

  [[nodiscard]] std::string name() const {
    return std::to_string(rows) + "x" + std::to_string(cols) + " bits " + std::to_string(bits) + " group " +
           std::to_string(group_size) + (axis == GroupAxis::Output ? " output-axis" : "") +
           (permuted ? " permuted" : "") + (params == ParamType::Float16 ? " fp16" : "");
  }
};

// RTN of a random Gaussian W, optionally act-order permuted.
template <class T>
QuantizedMatrix<T> quantized_case(const Case& c, std::uint64_t seed) {
  QuantSpec spec{.bits = c.bits, .group_size = c.group_size};
  spec.group_axis = c.axis;
  spec.param_type = c.params;
  QuantizedMatrix<T> q = RTN<T>(spec).quantize(random_matrix<T>(c.rows, c.cols, seed));
  if (c.permuted) q.set_permutation(shuffled_columns(c.cols, seed + 1));
  return q;
}

// Codes, scales and zeros of every logical element W(r, c), in double.
struct LogicalParams {
  Matrix<double> code, scale, zero;
};

template <class T>
LogicalParams logical_params(const QuantizedMatrix<T>& q) {
  LogicalParams p{Matrix<double>(q.rows(), q.cols()), Matrix<double>(q.rows(), q.cols()),
                  Matrix<double>(q.rows(), q.cols())};
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(q.stored_cols()));
  for (Index s = 0; s < q.stored_rows(); ++s) {
    q.stored_row_codes(s, codes.data());
    for (Index j = 0; j < q.stored_cols(); ++j) {
      Index r = s, c = j;
      if (q.transposed()) std::swap(r, c);
      else if (!q.permutation().empty()) c = q.permutation()[static_cast<std::size_t>(j)];
      const Index g = j / q.group_length();
      p.code(r, c) = codes[static_cast<std::size_t>(j)];
      p.scale(r, c) = q.scales()(s, g);
      p.zero(r, c) = q.zeros()(s, g);
    }
  }
  return p;
}

// Per output row: the bound (gamma_K + 3u) M of the header comment, for input x.
template <class T>
Vector<double> gemv_bound(const QuantizedMatrix<T>& q, const LogicalParams& p, const Vector<double>& x) {
  const double u = std::ldexp(1.0, std::is_same_v<T, float> ? -24 : -53);
  const double K = static_cast<double>(q.cols() + q.groups_per_row() + 8);
  const double gamma = K * u / (1 - K * u);
  const Matrix<double> magnitude = p.scale.cwiseAbs().cwiseProduct(p.code + p.zero.cwiseAbs());
  return (gamma + 3 * u) * (magnitude * x.cwiseAbs());
}

// Double reference y = W_hat x from dequantize().
template <class T>
Vector<double> reference_gemv(const QuantizedMatrix<T>& q, const Vector<T>& x) {
  return q.dequantize().template cast<double>() * x.template cast<double>();
}

// Expects |y - ref| <= bound entry by entry, naming the first failure.
inline void expect_within(const Vector<double>& y, const Vector<double>& ref, const Vector<double>& bound,
                          const std::string& what) {
  ASSERT_EQ(y.size(), ref.size()) << what;
  for (Index i = 0; i < y.size(); ++i) {
    const double err = std::abs(y[i] - ref[i]);
    if (!(err <= bound[i])) {
      ADD_FAILURE() << what << ": output " << i << " = " << y[i] << ", reference " << ref[i] << ", error " << err
                    << " > bound " << bound[i];
      return;
    }
  }
}

// A matrix whose GEMV and matmul are exact in float for inputs of integers in [-2, 2]
// and at most 512 columns: scales are powers of two down to 1/8 and zeros multiples of
// 1/2, so every product, group sum (|sum q x|, |z S| <= 255 * 2 * 512) and partial sum
// is a multiple of 1/16 below 2^19 (fewer than 2^24 sixteenths): every summation order
// gives the exact result, and each kernel must equal the double reference bit for bit.
inline QuantizedMatrix<float> exact_case(const Case& c, std::uint64_t seed) {
  QuantSpec spec{.bits = c.bits, .group_size = c.group_size};
  spec.group_axis = c.axis;
  QuantizedMatrix<float> shape(c.rows, c.cols, spec);
  std::mt19937_64 rng(seed);
  const int max_code = spec.max_code();
  CodeMatrix codes(shape.stored_rows(), shape.stored_cols());
  for (Index i = 0; i < codes.size(); ++i) codes.data()[i] = static_cast<std::uint8_t>(rng() % (max_code + 1));
  Matrix<float> scales(shape.stored_rows(), shape.groups_per_row()), zeros(scales.rows(), scales.cols());
  for (Index i = 0; i < scales.size(); ++i) {
    scales.data()[i] = std::ldexp(1.0f, -static_cast<int>(rng() % 4));
    zeros.data()[i] = static_cast<float>(rng() % (2 * max_code + 1)) / 2;
  }
  return QuantizedMatrix<float>::from_codes(spec, c.rows, c.cols, codes, scales, zeros,
                                            c.permuted ? shuffled_columns(c.cols, seed + 1) : std::vector<std::int32_t>{});
}

inline Matrix<float> small_integers(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Matrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(static_cast<int>(rng() % 5) - 2);
  return m;
}

// Shapes around every boundary the kernels have: 1x1, rows that are not a multiple of
// the 4-row unroll, columns inside one 32-code pad, across 64-code units and 256-code
// blocks, and with a short last block.
inline const std::vector<std::pair<Index, Index>>& kernel_shapes() {
  static const std::vector<std::pair<Index, Index>> shapes{{1, 1}, {3, 5}, {7, 33}, {5, 64}, {13, 100},
                                                           {9, 256}, {6, 300}, {17, 512}, {4, 777}};
  return shapes;
}

// Group sizes: 32/64/128, whole blocks (256), whole row, one that splits 64-code units
// (12), a ragged one that is a multiple of 4 (100) and one the SIMD kernels leave to the
// scalar path (7).
inline const std::vector<Index>& kernel_group_sizes() {
  static const std::vector<Index> sizes{32, 64, 128, 256, 0, 12, 100, 7};
  return sizes;
}

// Every shape x bit width x group size, input-axis, permuted and output-axis, through
// `run` (a GEMV or a matmul wrapper) on the active ISA: within the bound on RTN data,
// and exact on exact_case data.
template <class Run>
void sweep_gemv_cases(Run&& run) {
  ThreadScope single(1);
  std::uint64_t seed = 1;
  for (const auto& [rows, cols] : kernel_shapes())
    for (int bits = 1; bits <= 8; ++bits)
      for (Index group : kernel_group_sizes())
        for (int variant = 0; variant < 3; ++variant) {
          Case c{rows, cols, bits, group};
          c.permuted = variant == 1 && cols > 1;
          c.axis = variant == 2 ? GroupAxis::Output : GroupAxis::Input;
          ++seed;
          const QuantizedMatrix<float> q = quantized_case<float>(c, seed);
          const Vector<float> x = random_matrix<float>(cols, 1, seed + 7);
          const LogicalParams params = logical_params(q);
          run(q, x, reference_gemv(q, x), gemv_bound(q, params, x.cast<double>()), c.name());
          if (::testing::Test::HasFailure()) return;

          const QuantizedMatrix<float> exact = exact_case(c, seed);
          const Vector<float> xi = small_integers(cols, 1, seed + 3);
          run(exact, xi, reference_gemv(exact, xi), Vector<double>::Zero(rows), "exact " + c.name());
          if (::testing::Test::HasFailure()) return;
        }
}

// product(q, x, y) on every runnable ISA with 1 and 2 threads gives the same bits, for
// matrices big enough to be split among threads.
template <class Product>
void expect_thread_invariant(const std::vector<Case>& cases, Product&& product) {
  for (Isa isa : runnable_isas()) {
    IsaScope scope(isa);
    for (const Case& c : cases) {
      const auto q = quantized_case<float>(c, 2);
      const Vector<float> x = random_matrix<float>(c.cols, 1, 3);
      Vector<float> one(c.rows), two(c.rows);
      {
        ThreadScope threads(1);
        product(q, x, one);
      }
      {
        ThreadScope threads(2);
        product(q, x, two);
      }
      EXPECT_EQ(std::memcmp(one.data(), two.data(), sizeof(float) * static_cast<std::size_t>(c.rows)), 0)
          << isa_name(isa) << " " << c.name();
    }
  }
}

// The checks every SIMD GEMV variant passes, for the per-ISA test programs.

// Whether `isa` runs here; where it does not, forcing it must throw.
inline bool variant_runs(Isa isa) {
  if (isa_supported(isa)) return true;
  EXPECT_THROW(set_isa(isa), Error);  // this CPU cannot be forced onto the variant
  return false;
}

// gemv forced onto `isa` against dequantize() on every shape, bit width and group size.
inline void expect_variant_matches_reference(Isa isa) {
  IsaScope scope(isa);
  const std::string label(isa_name(isa));
  sweep_gemv_cases([&](const QuantizedMatrix<float>& q, const Vector<float>& x, const Vector<double>& ref,
                       const Vector<double>& bound, const std::string& name) {
    Vector<float> y(q.rows());
    gemv(q, x, y);
    expect_within(y.cast<double>(), ref, bound, label + " " + name);
  });
}

// gemv forced onto `isa` against the scalar reference on wider layers (both within the
// bound of the exact value, so within twice the bound of each other).
inline void expect_variant_agrees_with_scalar(Isa isa) {
  for (const Case& c : {Case{67, 2500, 4, 64}, Case{33, 1111, 3, 128, GroupAxis::Input, true},
                        Case{20, 700, 2, 32, GroupAxis::Output}, Case{40, 1000, 8, 0}}) {
    const auto q = quantized_case<float>(c, 31);
    const Vector<float> x = random_matrix<float>(c.cols, 1, 32);
    const Vector<double> bound = gemv_bound(q, logical_params(q), x.cast<double>());
    Vector<float> simd(c.rows), scalar(c.rows);
    {
      IsaScope scope(isa);
      gemv(q, x, simd);
    }
    {
      IsaScope scope(Isa::Scalar);
      gemv(q, x, scalar);
    }
    expect_within(simd.cast<double>(), scalar.cast<double>(), 2 * bound, c.name());
  }
}

}  // namespace lowbit::test

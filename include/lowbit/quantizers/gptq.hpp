// GPTQ (Frantar et al., 2022): round one input column at a time and push each column's
// rounding error onto the columns not yet rounded, weighted by the inverse Hessian of
// the layer's squared output error, H = (2/N) sum_t x_t x_t^T.
//
// The reference takes U, the upper Cholesky factor of H^-1 (H^-1 = U^T U), rounds column
// i of a row to q_i and moves the rest of the row (paper, Algorithm 1):
//   e_i = (w_i - q_i) / U_ii,    w_j -= e_i U_ij   (j > i).
// Unrolled, W - Q = E U, so E = (W - Q) V with V = U^-1, upper triangular with
// H = V V^T: the reverse Cholesky factor of H itself. With R = W - Q (residuals against
// the original weights), the weight column i is rounded from is
//   w_i = W_i + sum_{j<i} R_j V_ji / V_ii,     e_i = (w_i - q_i) V_ii,
// the same numbers without forming any inverse of H: one Cholesky of H is all the
// factorization there is (the reference runs Cholesky, inverse, Cholesky). Updates are
// lazy on two levels: the rest of the row moves once per block (GEMM R_block V'), the
// rest of a block once per 16-column segment, and only inside a segment column by column.
// Group fits see the reference's running weights, recovered at each group start from the
// group's own g x g block of V (see quantize_with_report).
// The loss it reports, sum e_i^2 / 2, equals tr((W - W_hat) H' (W - W_hat)^T) / 2 with
// H' the damped Hessian, because R H' R^T = (R V)(R V)^T = E E^T.
//
// Reference behaviour (IST-DASLab/gptq): dead columns (H_ii = 0) get H_ii = 1 and
// W[:, i] = 0; damping adds damp * mean(diag H); group parameters are fitted at each
// group start from the current, error-updated weights; act-order processes columns by
// descending diag(H); static groups fit every group on the unpermuted W first.
// Parameter fit: the range [min(w, 0), max(w, 0)] with an integral zero (symmetric:
// [-max|w|, max|w|], zero 2^(b-1)), optionally GPTQ's MSE shrink search, HQQ's fit, or
// any callable.
//
// Act-order without the g_idx penalty: with groups, the result is stored with its input
// dimension permuted (QuantizedMatrix::permutation), so each group is contiguous and
// kernels apply the permutation once per input vector. gptq_g_idx() gives the classic
// per-column group index for checkpoint formats.
//
// Speed: rows are independent given V, so rows are cut into fixed chunks that threads
// take whole; each chunk is kept transposed (columns contiguous across its rows) so the
// per-column rounding and updates are vector loops, and the lazy updates are packed
// GEMMs (gptq_gemm.hpp) against V pre-packed once per call. V comes from the blocked
// Cholesky of gptq_linalg.hpp and is cached until H changes. Results are bit-identical
// for any thread count.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <fstream>
#include <functional>
#include <istream>
#include <numeric>
#include <ostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "lowbit/core/affine.hpp"
#include "lowbit/core/error.hpp"
#include "lowbit/core/isa.hpp"
#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/core/tensor.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/io/atomic_file.hpp"
#include "lowbit/quantizers/gptq_gemm.hpp"
#include "lowbit/quantizers/gptq_linalg.hpp"
#include "lowbit/quantizers/hqq.hpp"

namespace lowbit {

template <class T = float>
class GPTQ {
 public:
  // Fits one group's (scale, zero) from its current weights w[0..n). Called from several
  // threads at once, so it must be safe to call concurrently.
  using GroupFit = std::function<GroupParams(const T* w, Index n, const QuantSpec& spec)>;

  struct Options {
    QuantSpec spec{};            // bits, group_size (0: one group per row), symmetric, param_type
    double damp = 0.01;          // diag(H) += damp * mean(diag H)
    Index block_size = 128;      // columns per lazy-update block
    bool act_order = false;      // process columns by descending diag(H)
    bool static_groups = false;  // fit all groups on the unpermuted W before any update
    bool mse = false;            // GPTQ's MSE clipping search instead of plain min-max
    int grid = 100;              // MSE: shrink steps of 1/grid ...
    double max_shrink = 0.8;     // ... up to this fraction ...
    double norm = 2.4;           // ... minimizing sum |w - w_hat|^norm
    GroupFit group_fit{};        // custom fit (overrides min-max / mse), e.g. hqq_fit()
    int damp_retries = 6;        // Cholesky failed: damp *= damp_growth, at most this often
    double damp_growth = 10.0;
  };

  struct Result {
    QuantizedMatrix<T> weights;
    // GPTQ's loss: sum over rows and columns of e^2 / 2, e = (w - w_hat) / U_ii with w the
    // running weight the column was rounded from; = tr((W - W_hat) H' (W - W_hat)^T) / 2.
    double loss = 0;
    double damp = 0;         // relative damping used (options.damp unless Cholesky needed more)
    double damping = 0;      // the absolute value added to diag(H)
    Index dead_columns = 0;  // input columns with H_ii = 0 (quantized as 0)
  };

  // HQQ's per-group fit (its zero optimization on GPTQ's running weights).
  [[nodiscard]] static GroupFit hqq_fit(typename HQQ<T>::Options hqq_options = {}) {
    return [hqq_options](const T* w, Index n, const QuantSpec& spec) {
      return detail::hqq_fit_group<T>(w, n, spec, hqq_options);
    };
  }

  explicit GPTQ(Index in_features, Options options = {});

  [[nodiscard]] Index in_features() const { return in_features_; }
  [[nodiscard]] const Options& options() const { return options_; }
  // New options for later quantize calls; the Hessian (and its factorization, when
  // damp and act_order stay the same) is kept.
  void set_options(Options options);
  // Calibration tokens seen so far.
  [[nodiscard]] std::int64_t tokens() const { return tokens_; }

  // Streams calibration activations X [tokens, in_features] into the Hessian; any
  // number of batches of any size. Bit-identical for any thread count.
  void add_batch(const Eigen::Ref<const Matrix<T>>& X);
  template <RowMajorTensor2 Tensor>
  void add_batch(const Tensor& X) {
    add_batch(as_matrix(X));
  }

  // H = (2/N) sum X^T X over the N tokens added (zero before any), [in, in].
  [[nodiscard]] Matrix<double> hessian() const;

  // Replaces the calibration state by a Hessian computed elsewhere, H = (2/N) sum X^T X
  // with N = tokens: symmetric, finite, non-negative diagonal.
  void set_hessian(const Eigen::Ref<const Matrix<double>>& H, std::int64_t tokens);

  // Calibrate once, quantize many times: the sum X^T X and N in a small binary format
  // (little-endian): "LBGPTQH" + NUL, u32 version = 1, u32 element = 8 (float64),
  // u64 in_features, u64 tokens, u64 count = n(n+1)/2, count f64 (lower triangle, row
  // by row), u64 FNV-1a checksum of those bytes. load() checks all of it.
  void save(std::ostream& out) const;
  void save(const std::string& path) const;
  void load(std::istream& in);
  void load(const std::string& path);

  [[nodiscard]] QuantizedMatrix<T> quantize(const Eigen::Ref<const Matrix<T>>& W) {
    return quantize_with_report(W).weights;
  }
  template <RowMajorTensor2 Tensor>
  [[nodiscard]] QuantizedMatrix<T> quantize(const Tensor& W) {
    return quantize(as_matrix(W));
  }

  // The weights plus the loss GPTQ minimizes and the damping it needed.
  [[nodiscard]] Result quantize_with_report(const Eigen::Ref<const Matrix<T>>& W);

  // quantize() keeps V (in_features^2 values of T) for the next call with the same H,
  // damp and act_order; this frees it.
  void clear_cache() { factorization_ = Factorization{}; }

 private:
  // V and the column order for the current H and options; kept until H changes, so
  // layers sharing an input (q/k/v) factor H once.
  struct Factorization {
    bool valid = false;
    double requested_damp = 0;
    bool act_order = false;
    Isa isa = Isa::Scalar;
    // H' = V V^T (V upper) in processing order, stored as V_ii on the diagonal and
    // V_ji / V_ii at (j, i) above it.
    Matrix<T> V;
    std::vector<std::int32_t> order;  // processing column j is input column order[j]
    std::vector<char> dead;           // per input column
    Index dead_columns = 0;
    double damp = 0, damping = 0;
  };

  const Factorization& factorize();
  void invalidate() { factorization_.valid = false; }
  // Copies gram_'s lower triangle to its upper one once after batches.
  void symmetrize();

  Index in_features_;
  Options options_;
  Matrix<double> gram_;         // sum X^T X; lower triangle maintained by add_batch
  bool gram_symmetric_ = true;  // upper triangle up to date
  std::int64_t tokens_ = 0;
  Factorization factorization_;
};

// The classic GPTQ g_idx (AutoGPTQ / GPTQModel): for each input column, the index of
// its group; stored columns j form group j / group_length, and with a permutation
// stored column j is input column permutation()[j].
template <class T>
[[nodiscard]] std::vector<std::int32_t> gptq_g_idx(const QuantizedMatrix<T>& q) {
  detail::require(!q.transposed(), "gptq_g_idx: output-axis groups have no g_idx");
  const auto inverse = q.inverse_permutation();
  std::vector<std::int32_t> g_idx(static_cast<std::size_t>(q.cols()));
  for (Index c = 0; c < q.cols(); ++c) {
    const Index stored = inverse.empty() ? c : inverse[static_cast<std::size_t>(c)];
    g_idx[static_cast<std::size_t>(c)] = static_cast<std::int32_t>(stored / q.group_length());
  }
  return g_idx;
}

namespace detail::gptq {

// Groups of a row of n (0 when group is 0: no refits by group).
// No n + group - 1: group may be near 2^63.
[[nodiscard]] inline Index groups_per_row_of(Index n, Index group) { return group > 0 && n > 0 ? (n - 1) / group + 1 : 0; }

// Rows of W per chunk: the unit of parallel work. A multiple of every GEMM kernel's NR;
// a chunk's working copy (in_features x 64) stays in L2.
inline constexpr Index kChunkRows = 64;
// Columns per segment of a block (see quantize_with_report).
inline constexpr Index kSegment = 16;

// Columns [begin, end), all with the same per-row parameters, of the block starting at
// block_begin. W is the chunk transposed (column i of the chunk at W + i * R), original
// the same before any update; V holds rows and columns first.. of V as stored by the
// factorization (V_ii, V_ji / V_ii), V(i, j) at V[(i - first) * ldv + j - first]:
//   q = clamp(round(w / scale + zero), 0, max_code),  w_hat = (q - zero) scale,
//   r = original - w_hat (the residual, kept for the lazy updates),
//   loss += ((w - w_hat) V_ii)^2,  W[j] += (V_ij / V_jj) r for columns i < j < block_end.
// Plain loops over the chunk's rows; the ISA wrappers below compile them for each ISA.
// One column across the chunk's R rows. Restrict-qualified (the arrays never overlap),
// so the compiler vectorizes it.
template <class T>
[[gnu::always_inline]] inline void round_column(const T* __restrict w, const T* __restrict w0,
                                                const T* __restrict scale, const T* __restrict zero, T max_code,
                                                T diagonal, T* __restrict residual, std::uint8_t* __restrict code,
                                                double* __restrict loss) {
  for (Index r = 0; r < kChunkRows; ++r) {
    T x = w[r] / scale[r] + zero[r];
    x = x > T(0) ? x : T(0);  // clamping before rounding is the same as after; NaN -> 0
    x = x < max_code ? x : max_code;
    const T q = std::nearbyint(x);
    const T w_hat = (q - zero[r]) * scale[r];
    residual[r] = w0[r] - w_hat;
    const T error = (w[r] - w_hat) * diagonal;
    loss[r] += static_cast<double>(error) * static_cast<double>(error);
    code[r] = static_cast<std::uint8_t>(q);
  }
}

// w_j += v r across the chunk's rows.
template <class T>
[[gnu::always_inline]] inline void add_scaled(T* __restrict w_j, T v, const T* __restrict residual) {
  for (Index r = 0; r < kChunkRows; ++r) w_j[r] += v * residual[r];
}

template <class T>
[[gnu::always_inline]] inline void sweep_columns_impl(const T* V, Index ldv, Index first, Index begin, Index end,
                                                      Index block_begin, Index block_end, T* W, const T* original,
                                                      const T* scale, const T* zero, T max_code, T* residuals,
                                                      std::uint8_t* codes, double* loss) {
  constexpr Index R = kChunkRows;
  for (Index i = begin; i < end; ++i) {
    T* residual = residuals + (i - block_begin) * R;
    const T* v = V + (i - first) * ldv;  // v[j - first] = V(i, j)
    round_column(W + i * R, original + i * R, scale, zero, max_code, v[i - first], residual, codes + i * R, loss);
    for (Index j = i + 1; j < block_end; ++j) add_scaled(W + j * R, v[j - first], residual);
  }
}

template <class T>
using SweepFn = void (*)(const T*, Index, Index, Index, Index, Index, Index, T*, const T*, const T*, const T*, T, T*,
                         std::uint8_t*, double*);

template <class T>
void sweep_columns_scalar(const T* V, Index ldv, Index first, Index begin, Index end, Index block_begin,
                          Index block_end, T* W, const T* original, const T* scale, const T* zero, T max_code,
                          T* residuals, std::uint8_t* codes, double* loss) {
  sweep_columns_impl(V, ldv, first, begin, end, block_begin, block_end, W, original, scale, zero, max_code, residuals,
                     codes, loss);
}
#if defined(LOWBIT_HAVE_AVX2)
template <class T>
LOWBIT_TARGET_AVX2 void sweep_columns_avx2(const T* V, Index ldv, Index first, Index begin, Index end,
                                           Index block_begin, Index block_end, T* W, const T* original, const T* scale,
                                           const T* zero, T max_code, T* residuals, std::uint8_t* codes, double* loss) {
  sweep_columns_impl(V, ldv, first, begin, end, block_begin, block_end, W, original, scale, zero, max_code, residuals,
                     codes, loss);
}
#endif
#if defined(LOWBIT_HAVE_AVX512)
template <class T>
LOWBIT_TARGET_AVX512 void sweep_columns_avx512(const T* V, Index ldv, Index first, Index begin, Index end,
                                               Index block_begin, Index block_end, T* W, const T* original,
                                               const T* scale, const T* zero, T max_code, T* residuals,
                                               std::uint8_t* codes, double* loss) {
  sweep_columns_impl(V, ldv, first, begin, end, block_begin, block_end, W, original, scale, zero, max_code, residuals,
                     codes, loss);
}
#endif

template <class T>
[[nodiscard]] SweepFn<T> sweep_for(Isa isa) {
#if defined(LOWBIT_HAVE_AVX512)
  if (isa == Isa::Avx512) return &sweep_columns_avx512<T>;
#endif
#if defined(LOWBIT_HAVE_AVX2)
  if (isa == Isa::Avx2) return &sweep_columns_avx2<T>;
#endif
  (void)isa;
  return &sweep_columns_scalar<T>;
}

// Lazy-update blocks: [starts[b], starts[b + 1]). Group fits must see fully updated
// weights, so blocks hold whole groups (group <= block) or end at group starts
// (group > block). With 128/128 (the reference's default) both are plain 128-column blocks.
[[nodiscard]] inline std::vector<Index> block_starts(Index n, Index block, Index group) {
  std::vector<Index> starts;
  for (Index i = 0; i < n;) {
    starts.push_back(i);
    Index next = i + block;
    if (group > 0 && group <= block) next = i + block / group * group;
    if (group > block) next = std::min(next, (i / group + 1) * group);
    i = std::min(next, n);
  }
  starts.push_back(n);
  return starts;
}

// Refuses NaN/Inf like require_finite, with a vectorizable first pass (x * 0 is 0 for
// finite x and NaN otherwise).
template <class Derived>
void require_finite_fast(const Derived& m, const char* name) {
  using Scalar = typename Derived::Scalar;
  bool finite = true;
  for (Index r = 0; r < m.rows() && finite; ++r) {
    const Scalar* row = m.data() + r * m.outerStride();
    Scalar sum = 0;
    for (Index c = 0; c < m.cols(); ++c) sum += row[c] * Scalar(0);
    finite = sum == Scalar(0);
  }
  if (!finite) require_finite(m, name);
}

// out = factor * (the lower triangle of `lower` mirrored), in cache-sized tiles.
inline void mirror_lower(const Matrix<double>& lower, double factor, Matrix<double>& out) {
  constexpr Index kTile = 64;
  const Index n = lower.rows();
  const Index tiles = (n + kTile - 1) / kTile;
  linalg::for_each_item(tiles, linalg::worth_parallel_copy(static_cast<double>(n) * static_cast<double>(n)),
                        [&](Index I) {
                          for (Index J = 0; J <= I; ++J)
                            for (Index i = I * kTile; i < std::min(n, (I + 1) * kTile); ++i)
                              for (Index j = J * kTile; j < std::min(i + 1, (J + 1) * kTile); ++j) {
                                const double v = factor * lower(i, j);
                                out(i, j) = v;
                                out(j, i) = v;
                              }
                        });
}

// Where the lazy updates happen. Blocks (block_size columns, see block_starts): the
// rest of the row moves once per block, by R_block V'[block, rest]. Segments (at most
// kSegment columns, never across a group start when groups are refitted) inside a
// block: the rest of the block moves once per segment, by R_segment V'[segment, rest of
// block]. Only inside a segment is the update column by column. Each piece's
// V'^T[end:rest_end, begin:end] is packed once (at `offset`) for every chunk.
struct UpdatePlan {
  struct Piece {
    Index begin, end, rest_end, offset;  // V'^T[end:rest_end, begin:end] at packed offset
  };
  std::vector<Piece> blocks, segments;
  std::vector<Index> first_segment;  // segments of block b: [first_segment[b], first_segment[b + 1])
  Index packed_size = 0, max_block = 0;
};

template <class T>
[[nodiscard]] UpdatePlan plan_updates(const gemm::Kernel<T>& kernel, Index n, Index block_size, Index group,
                                      bool refit_groups) {
  UpdatePlan plan;
  const auto starts = block_starts(n, block_size, group);
  for (std::size_t b = 0; b + 1 < starts.size(); ++b) {
    const Index i1 = starts[b], i2 = starts[b + 1];
    plan.max_block = std::max(plan.max_block, i2 - i1);
    plan.blocks.push_back({i1, i2, n, plan.packed_size});
    plan.packed_size += kernel.packed_a_size(n - i2, i2 - i1);
    plan.first_segment.push_back(static_cast<Index>(plan.segments.size()));
    for (Index s1 = i1; s1 < i2;) {
      Index s2 = std::min(s1 + kSegment, i2);
      if (refit_groups && group > 0) s2 = std::min(s2, (s1 / group + 1) * group);
      plan.segments.push_back({s1, s2, i2, plan.packed_size});
      plan.packed_size += kernel.packed_a_size(i2 - s2, s2 - s1);
      s1 = s2;
    }
  }
  plan.first_segment.push_back(static_cast<Index>(plan.segments.size()));
  return plan;
}

// Little-endian scalar I/O for the Hessian file.
inline void put_u64(std::ostream& out, std::uint64_t v) {
  char bytes[8];
  for (int k = 0; k < 8; ++k) bytes[k] = static_cast<char>((v >> (8 * k)) & 0xFF);
  out.write(bytes, 8);
}
inline void put_u32(std::ostream& out, std::uint32_t v) {
  char bytes[4];
  for (int k = 0; k < 4; ++k) bytes[k] = static_cast<char>((v >> (8 * k)) & 0xFF);
  out.write(bytes, 4);
}
[[nodiscard]] inline std::uint64_t get_uint(std::istream& in, int size, const char* what) {
  unsigned char bytes[8] = {};
  in.read(reinterpret_cast<char*>(bytes), size);
  require(in.gcount() == size, "GPTQ Hessian file: truncated while reading ", what);
  std::uint64_t v = 0;
  for (int k = size - 1; k >= 0; --k) v = (v << 8) | bytes[k];
  return v;
}
inline void fnv1a(std::uint64_t& hash, const unsigned char* bytes, std::size_t size) {
  for (std::size_t k = 0; k < size; ++k) hash = (hash ^ bytes[k]) * 0x100000001b3ULL;
}
inline constexpr char kHessianMagic[8] = {'L', 'B', 'G', 'P', 'T', 'Q', 'H', '\0'};
inline constexpr std::uint32_t kHessianVersion = 1;
inline constexpr std::uint32_t kHessianElementF64 = 8;

}  // namespace detail::gptq

template <class T>
GPTQ<T>::GPTQ(Index in_features, Options options) : in_features_(in_features) {
  detail::require(in_features >= 1, "GPTQ: in_features = ", in_features, " must be >= 1");
  set_options(std::move(options));
  gram_ = Matrix<double>::Zero(in_features, in_features);
}

template <class T>
void GPTQ<T>::set_options(Options options) {
  const Options& o = options;
  o.spec.validate();
  detail::require(o.spec.group_axis == GroupAxis::Input, "GPTQ: QuantSpec.group_axis must be Input (GPTQ groups ",
                  "run along the input dimension)");
  detail::require(std::isfinite(o.damp) && o.damp >= 0, "GPTQ.damp = ", o.damp, " must be finite and >= 0");
  detail::require(o.block_size >= 1, "GPTQ.block_size = ", o.block_size, " must be >= 1");
  detail::require(o.grid >= 1, "GPTQ.grid = ", o.grid, " must be >= 1");
  detail::require(o.max_shrink >= 0 && o.max_shrink < 1, "GPTQ.max_shrink = ", o.max_shrink, " is outside [0, 1)");
  detail::require(o.norm > 0 && std::isfinite(o.norm), "GPTQ.norm = ", o.norm, " must be positive");
  detail::require(o.damp_retries >= 0 && o.damp_retries <= 64, "GPTQ.damp_retries = ", o.damp_retries,
                  " is outside 0..64");
  detail::require(o.damp_growth > 1 && std::isfinite(o.damp_growth), "GPTQ.damp_growth = ", o.damp_growth,
                  " must be > 1");
  options_ = std::move(options);
}

template <class T>
void GPTQ<T>::add_batch(const Eigen::Ref<const Matrix<T>>& X) {
  detail::require(X.cols() == in_features_, "GPTQ.add_batch: X has ", X.cols(), " columns, in_features is ",
                  in_features_);
  detail::gptq::require_finite_fast(X, "X");
  if (X.rows() == 0) return;
  detail::linalg::gram_lower_accumulate<T>(X.data(), X.rows(), in_features_, X.outerStride(), gram_.data(),
                                           in_features_);
  tokens_ += static_cast<std::int64_t>(X.rows());
  gram_symmetric_ = false;
  invalidate();
}

template <class T>
Matrix<double> GPTQ<T>::hessian() const {
  Matrix<double> H(in_features_, in_features_);
  detail::gptq::mirror_lower(gram_, tokens_ > 0 ? 2.0 / static_cast<double>(tokens_) : 0.0, H);
  return H;
}

template <class T>
void GPTQ<T>::symmetrize() {
  if (gram_symmetric_) return;
  detail::gptq::mirror_lower(gram_, 1.0, gram_);
  gram_symmetric_ = true;
}

template <class T>
void GPTQ<T>::set_hessian(const Eigen::Ref<const Matrix<double>>& H, std::int64_t tokens) {
  const Index n = in_features_;
  detail::require(H.rows() == n && H.cols() == n, "GPTQ.set_hessian: H is ", H.rows(), "x", H.cols(),
                  ", in_features is ", n);
  detail::require(tokens >= 1, "GPTQ.set_hessian: tokens = ", tokens, " must be >= 1");
  detail::require_finite(H, "H");
  for (Index i = 0; i < n; ++i) {
    detail::require(H(i, i) >= 0, "GPTQ.set_hessian: H(", i, ", ", i, ") = ", H(i, i), " is negative");
    for (Index j = 0; j < i; ++j)
      detail::require(H(i, j) == H(j, i), "GPTQ.set_hessian: H is not symmetric at (", i, ", ", j, "): ", H(i, j),
                      " != ", H(j, i));
  }
  gram_ = H * (static_cast<double>(tokens) / 2.0);
  gram_symmetric_ = true;
  tokens_ = tokens;
  invalidate();
}

template <class T>
void GPTQ<T>::save(std::ostream& out) const {
  namespace g = detail::gptq;
  const Index n = in_features_;
  out.write(g::kHessianMagic, 8);
  g::put_u32(out, g::kHessianVersion);
  g::put_u32(out, g::kHessianElementF64);
  g::put_u64(out, static_cast<std::uint64_t>(n));
  g::put_u64(out, static_cast<std::uint64_t>(tokens_));
  g::put_u64(out, static_cast<std::uint64_t>(n) * static_cast<std::uint64_t>(n + 1) / 2);
  std::uint64_t hash = 0xcbf29ce484222325ULL;
  std::vector<unsigned char> bytes;
  for (Index i = 0; i < n; ++i) {
    bytes.resize(static_cast<std::size_t>(8 * (i + 1)));
    for (Index j = 0; j <= i; ++j) {
      const auto bits = std::bit_cast<std::uint64_t>(gram_(i, j));
      for (int k = 0; k < 8; ++k)
        bytes[static_cast<std::size_t>(8 * j + k)] = static_cast<unsigned char>(bits >> (8 * k));
    }
    g::fnv1a(hash, bytes.data(), bytes.size());
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  g::put_u64(out, hash);
  detail::require(static_cast<bool>(out), "GPTQ.save: writing the Hessian failed");
}

template <class T>
void GPTQ<T>::save(const std::string& path) const {
  std::ostringstream buffer(std::ios::binary);
  save(buffer);
  const std::string bytes = std::move(buffer).str();
  AtomicFile file(path);  // the file appears complete or not at all
  file.write_at(0, bytes.data(), bytes.size());
  file.commit();
}

template <class T>
void GPTQ<T>::load(std::istream& in) {
  namespace g = detail::gptq;
  char magic[8] = {};
  in.read(magic, 8);
  detail::require(in.gcount() == 8 && std::memcmp(magic, g::kHessianMagic, 8) == 0,
                  "GPTQ Hessian file: bad magic (not a lowbit GPTQ Hessian)");
  const auto version = g::get_uint(in, 4, "version");
  detail::require(version == g::kHessianVersion, "GPTQ Hessian file: version ", version, " is not ",
                  g::kHessianVersion);
  const auto element = g::get_uint(in, 4, "element type");
  detail::require(element == g::kHessianElementF64, "GPTQ Hessian file: element type ", element, " is not 8 (float64)");
  const auto n = g::get_uint(in, 8, "in_features");
  detail::require(n == static_cast<std::uint64_t>(in_features_), "GPTQ Hessian file: in_features = ", n,
                  ", this GPTQ has in_features = ", in_features_);
  const auto tokens = g::get_uint(in, 8, "tokens");
  detail::require(tokens <= static_cast<std::uint64_t>(INT64_MAX), "GPTQ Hessian file: tokens = ", tokens,
                  " is out of range");
  const auto count = g::get_uint(in, 8, "count");
  detail::require(count == n * (n + 1) / 2, "GPTQ Hessian file: count = ", count, " != n(n+1)/2 = ", n * (n + 1) / 2);
  Matrix<double> gram = Matrix<double>::Zero(in_features_, in_features_);
  std::uint64_t hash = 0xcbf29ce484222325ULL;
  std::vector<unsigned char> bytes;
  for (Index i = 0; i < in_features_; ++i) {
    bytes.resize(static_cast<std::size_t>(8 * (i + 1)));
    in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    detail::require(in.gcount() == static_cast<std::streamsize>(bytes.size()), "GPTQ Hessian file: truncated in row ",
                    i, " of ", in_features_);
    g::fnv1a(hash, bytes.data(), bytes.size());
    for (Index j = 0; j <= i; ++j) {
      std::uint64_t bits = 0;
      for (int k = 7; k >= 0; --k) bits = (bits << 8) | bytes[static_cast<std::size_t>(8 * j + k)];
      const double v = std::bit_cast<double>(bits);
      detail::require(std::isfinite(v), "GPTQ Hessian file: entry (", i, ", ", j, ") = ", v, " is not finite");
      gram(i, j) = v;
    }
    detail::require(gram(i, i) >= 0, "GPTQ Hessian file: diagonal entry ", i, " = ", gram(i, i), " is negative");
  }
  const auto stored_hash = g::get_uint(in, 8, "checksum");
  detail::require(stored_hash == hash, "GPTQ Hessian file: checksum mismatch (corrupt file)");
  detail::require(tokens > 0 || gram.isZero(0.0), "GPTQ Hessian file: tokens = 0 with a non-zero sum");
  gram_ = std::move(gram);
  gram_symmetric_ = false;
  tokens_ = static_cast<std::int64_t>(tokens);
  invalidate();
}

template <class T>
void GPTQ<T>::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  detail::require(static_cast<bool>(in), "GPTQ.load: cannot open '", path, "'");
  load(in);
}

template <class T>
const typename GPTQ<T>::Factorization& GPTQ<T>::factorize() {
  const Options& o = options_;
  const Isa isa = active_isa();
  Factorization& f = factorization_;
  if (f.valid && f.requested_damp == o.damp && f.act_order == o.act_order && f.isa == isa) return f;
  f.valid = false;
  const Index n = in_features_;
  symmetrize();
  // H = (2/N) gram; dead columns get H_ii = 1 (their W columns are zeroed).
  const double factor = 2.0 / static_cast<double>(tokens_);
  std::vector<double> diagonal(static_cast<std::size_t>(n));
  f.dead.assign(static_cast<std::size_t>(n), 0);
  f.dead_columns = 0;
  for (Index i = 0; i < n; ++i) {
    diagonal[static_cast<std::size_t>(i)] = factor * gram_(i, i);
    if (gram_(i, i) == 0) {
      diagonal[static_cast<std::size_t>(i)] = 1;
      f.dead[static_cast<std::size_t>(i)] = 1;
      ++f.dead_columns;
    }
  }
  f.order.resize(static_cast<std::size_t>(n));
  std::iota(f.order.begin(), f.order.end(), 0);
  if (o.act_order)
    std::stable_sort(f.order.begin(), f.order.end(), [&](std::int32_t a, std::int32_t b) {
      return diagonal[static_cast<std::size_t>(a)] > diagonal[static_cast<std::size_t>(b)];
    });
  const double mean_diagonal = std::accumulate(diagonal.begin(), diagonal.end(), 0.0) / static_cast<double>(n);
  f.V.resize(n, n);
  const bool copy_parallel = detail::linalg::worth_parallel_copy(static_cast<double>(n) * static_cast<double>(n));
  double damp = o.damp;
  for (int attempt = 0;; ++attempt) {
    const double damping = damp * mean_diagonal;
    // J H' J in processing order (lower triangle): (a, b) = H'(order[n-1-a], order[n-1-b]).
    detail::linalg::for_each_item(n, copy_parallel, [&](Index a) {
      const Index i = f.order[static_cast<std::size_t>(n - 1 - a)];
      const double* gram_row = gram_.data() + i * n;
      T* out = f.V.data() + a * n;
      for (Index b = 0; b < a; ++b)
        out[b] = static_cast<T>(factor * gram_row[f.order[static_cast<std::size_t>(n - 1 - b)]]);
      out[a] = static_cast<T>(diagonal[static_cast<std::size_t>(i)] + damping);
    });
    if (detail::linalg::reverse_cholesky_from_reversed(f.V.data(), n)) {
      f.damp = damp;
      f.damping = damping;
      break;
    }
    if (attempt == o.damp_retries)
      detail::fail("GPTQ: the Hessian of the layer with in_features = ", n, " (", tokens_,
                   " tokens) is not positive definite after ", attempt + 1, " damping attempts; last damp = ", damp,
                   " (added ", damping, " to the diagonal, mean diag = ", mean_diagonal, ")");
    damp = std::max(damp * o.damp_growth, 1e-6);
  }
  // Above the diagonal, V_ji / V_ii: the weight of residual j in column i.
  std::vector<T> v_diagonal(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) v_diagonal[static_cast<std::size_t>(i)] = f.V(i, i);
  detail::linalg::for_each_item(n, copy_parallel, [&](Index j) {
    T* row = f.V.data() + j * n;
    for (Index i = j + 1; i < n; ++i) row[i] /= v_diagonal[static_cast<std::size_t>(i)];
  });
  f.requested_damp = o.damp;
  f.act_order = o.act_order;
  f.isa = isa;
  f.valid = true;
  return f;
}

template <class T>
typename GPTQ<T>::Result GPTQ<T>::quantize_with_report(const Eigen::Ref<const Matrix<T>>& W) {
  namespace g = detail::gptq;
  using detail::gemm::Kernel;
  const Options& o = options_;
  const Index n = in_features_, rows = W.rows();
  detail::require(W.cols() == n, "GPTQ.quantize: W has ", W.cols(), " columns, in_features is ", n);
  detail::gptq::require_finite_fast(W, "W");
  detail::require(tokens_ > 0, "GPTQ.quantize: no calibration data (call add_batch first)");
  const Factorization& f = factorize();

  const bool custom_fit = static_cast<bool>(o.group_fit);
  QuantSpec spec = o.spec;
  if (!custom_fit) spec.integral_zero = true;  // GPTQ's quantizer rounds the zero
  const Index group = spec.group_size;         // 0: one group per row
  const bool static_groups = o.static_groups && group > 0;
  bool identity_order = true;
  for (Index j = 0; j < n; ++j) identity_order &= f.order[static_cast<std::size_t>(j)] == j;
  // Only groups need the stored permutation: one group per row, static groups (fitted
  // on input columns) and an order that did not change are stored unpermuted.
  const bool store_permuted = o.act_order && group > 0 && !static_groups && !identity_order;
  QuantizedMatrix<T> q(rows, n, spec);
  if (store_permuted) q.set_permutation(f.order);
  auto scales = q.mutable_scales();
  auto zeros = q.mutable_zeros();
  const T max_code = static_cast<T>(spec.max_code());

  auto fit = [&](const T* w, Index length, Index row, Index group_index) {
    GroupParams p = custom_fit ? o.group_fit(w, length, spec)
                    : o.mse    ? fit_mse(w, length, spec, o.grid, o.max_shrink, o.norm)
                               : fit_minmax(w, length, spec);
    p.scale = round_param(p.scale, spec.param_type);
    p.zero = round_param(p.zero, spec.param_type);
    detail::require(std::isfinite(p.scale) && p.scale != 0 && std::isfinite(p.zero), "GPTQ: group ", group_index,
                    " of row ", row, " got scale = ", p.scale, ", zero = ", p.zero,
                    " (scale must be finite, non-zero)");
    scales(row, group_index) = p.scale;
    zeros(row, group_index) = p.zero;
    return p;
  };

  // V'^T's pieces for both levels of lazy updates, packed once for every chunk.
  const Kernel<T> kernel = detail::gemm::active_kernel<T>();
  const g::UpdatePlan plan = g::plan_updates(kernel, n, o.block_size, group, !static_groups);
  using Piece = g::UpdatePlan::Piece;
  const Index blocks = static_cast<Index>(plan.blocks.size());
  std::vector<T> packed_v(static_cast<std::size_t>(plan.packed_size));
  const T* V = f.V.data();
  const double flops = 2.0 * static_cast<double>(rows) * static_cast<double>(n) * static_cast<double>(n);
  // Group fits need the reference's running weights, which the residual form does not
  // keep: at a group start s, after the columns before s, the reference's weights of
  // the group's columns G are t_G = W_G + c_G U_GG (U = V^-1), while the work array
  // holds y_G = W_G + c_G D_G^-1 (c = R_<s V[<s, G], D = diag V). With V'_GG = V_GG D^-1
  // (unit upper triangular): t_G = W_G + (y_G - W_G) V'_GG^-1. The inverses, transposed
  // (lower triangular), packed once per group as GEMM A operands.
  const bool group_refits = group > 0 && !static_groups;
  const Index refit_groups = group_refits ? g::groups_per_row_of(n, group) : 0;
  std::vector<Index> refit_offset(static_cast<std::size_t>(refit_groups + 1), 0);
  for (Index k = 0; k < refit_groups; ++k) {
    const Index length = std::min(group, n - k * group);
    refit_offset[static_cast<std::size_t>(k + 1)] =
        refit_offset[static_cast<std::size_t>(k)] + kernel.packed_a_size(length, length);
  }
  std::vector<T> packed_refit(static_cast<std::size_t>(refit_offset.back()));
  auto pack_refit = [&](Index k) {
    const Index s0 = k * group, length = std::min(group, n - s0);
    thread_local std::vector<T> lower;
    lower.assign(static_cast<std::size_t>(length * length), T(0));
    for (Index a = 0; a < length; ++a) {
      for (Index b = 0; b < a; ++b) lower[static_cast<std::size_t>(a * length + b)] = V[(s0 + b) * n + s0 + a];
      lower[static_cast<std::size_t>(a * length + a)] = T(1);
    }
    detail::linalg::invert_lower(lower.data(), length, length, detail::linalg::kBlock, false);
    detail::gemm::pack_a(kernel, length, length, detail::gemm::row_major(lower.data(), length),
                         packed_refit.data() + refit_offset[static_cast<std::size_t>(k)]);
  };
  // Each segment's own square of V, contiguous: the column-by-column part reads only these.
  const Index segments = static_cast<Index>(plan.segments.size());
  std::vector<Index> square_offset(static_cast<std::size_t>(segments + 1), 0);
  for (Index t = 0; t < segments; ++t) {
    const Index length =
        plan.segments[static_cast<std::size_t>(t)].end - plan.segments[static_cast<std::size_t>(t)].begin;
    square_offset[static_cast<std::size_t>(t + 1)] = square_offset[static_cast<std::size_t>(t)] + length * length;
  }
  std::vector<T> squares(static_cast<std::size_t>(square_offset.back()));
  for (Index t = 0; t < segments; ++t) {
    const Piece& segment = plan.segments[static_cast<std::size_t>(t)];
    const Index length = segment.end - segment.begin;
    T* square = squares.data() + square_offset[static_cast<std::size_t>(t)];
    for (Index a = 0; a < length; ++a)
      std::copy(V + (segment.begin + a) * n + segment.begin, V + (segment.begin + a) * n + segment.end,
                square + a * length);
  }
  // All packing in one step: update pieces first, then group inverses.
  const Index pieces = blocks + static_cast<Index>(plan.segments.size());
  const double packed_elements = static_cast<double>(plan.packed_size + refit_offset.back());
  detail::linalg::for_each_item(
      pieces + refit_groups, detail::linalg::worth_parallel_copy(packed_elements), [&](Index t) {
        if (t >= pieces) return pack_refit(t - pieces);
        const Piece& piece =
            t < blocks ? plan.blocks[static_cast<std::size_t>(t)] : plan.segments[static_cast<std::size_t>(t - blocks)];
        detail::gemm::pack_a(kernel, piece.rest_end - piece.end, piece.end - piece.begin,
                             detail::gemm::View<T>{V + piece.begin * n + piece.end, 1, n},
                             packed_v.data() + piece.offset);
      });

  const g::SweepFn<T> sweep = g::sweep_for<T>(active_isa());
  constexpr Index R = g::kChunkRows;
  const Index chunks = (rows + R - 1) / R;
  const Index groups_per_row = q.groups_per_row();
  std::vector<double> chunk_loss(static_cast<std::size_t>(chunks), 0.0);
  std::vector<std::exception_ptr> failures(static_cast<std::size_t>(chunks));
  const auto& order = f.order;
  const auto& dead = f.dead;

  detail::linalg::for_each_item(chunks, detail::linalg::worth_parallel(flops), [&](Index chunk) {
    try {
      const Index r0 = chunk * R, valid = std::min(R, rows - r0);
      thread_local std::vector<T> work, original, residuals, packed_residuals, group_scale, group_zero, buffer,
          difference, packed_difference, group_running;
      thread_local std::vector<std::uint8_t> codes, row_codes;
      thread_local std::vector<double> loss;
      work.assign(static_cast<std::size_t>(n * R), T(0));
      residuals.assign(static_cast<std::size_t>(plan.max_block * R), T(0));
      packed_residuals.resize(static_cast<std::size_t>(kernel.packed_b_size(plan.max_block, R)));
      codes.assign(static_cast<std::size_t>(n * R), 0);
      loss.assign(static_cast<std::size_t>(R), 0.0);
      buffer.resize(static_cast<std::size_t>(n));
      // Per-row parameters, one R-vector per group (static) or for the current group.
      const Index param_sets = static_groups ? groups_per_row : 1;
      group_scale.assign(static_cast<std::size_t>(param_sets * R), T(1));
      group_zero.assign(static_cast<std::size_t>(param_sets * R), T(0));

      // The chunk transposed, in processing order, dead columns zeroed.
      for (Index r = 0; r < valid; ++r) {
        const T* row = W.data() + (r0 + r) * W.outerStride();
        for (Index j = 0; j < n; ++j) {
          const Index c = order[static_cast<std::size_t>(j)];
          work[static_cast<std::size_t>(j * R + r)] = dead[static_cast<std::size_t>(c)] ? T(0) : row[c];
        }
      }
      original = work;
      if (static_groups) {
        for (Index r = 0; r < valid; ++r) {
          const T* row = W.data() + (r0 + r) * W.outerStride();
          for (Index c = 0; c < n; ++c)
            buffer[static_cast<std::size_t>(c)] = dead[static_cast<std::size_t>(c)] ? T(0) : row[c];
          for (Index k = 0; k < groups_per_row; ++k) {
            const GroupParams p = fit(buffer.data() + k * group, std::min(group, n - k * group), r0 + r, k);
            group_scale[static_cast<std::size_t>(k * R + r)] = static_cast<T>(p.scale);
            group_zero[static_cast<std::size_t>(k * R + r)] = static_cast<T>(p.zero);
          }
        }
      }
      // Parameters of the group starting at column i, from its running weights (transposed,
      // length x R): W itself for the one group of a row, t_G (see above) otherwise.
      auto refit = [&](Index i, Index length, Index group_index) {
        const T* running = work.data() + i * R;
        if (group_refits) {
          const std::size_t size = static_cast<std::size_t>(length * R);
          difference.resize(size);
          for (std::size_t t = 0; t < size; ++t)
            difference[t] = work[static_cast<std::size_t>(i * R) + t] - original[static_cast<std::size_t>(i * R) + t];
          packed_difference.resize(static_cast<std::size_t>(kernel.packed_b_size(length, R)));
          detail::gemm::pack_b(kernel, length, R, detail::gemm::row_major(difference.data(), R),
                               packed_difference.data());
          group_running.assign(original.begin() + i * R, original.begin() + (i + length) * R);
          detail::gemm::multiply_packed(kernel, length, R, length,
                                        packed_refit.data() + refit_offset[static_cast<std::size_t>(group_index)],
                                        packed_difference.data(), group_running.data(), R, false);
          running = group_running.data();
        }
        for (Index r = 0; r < valid; ++r) {
          for (Index t = 0; t < length; ++t) buffer[static_cast<std::size_t>(t)] = running[t * R + r];
          const GroupParams p = fit(buffer.data(), length, r0 + r, group_index);
          group_scale[static_cast<std::size_t>(r)] = static_cast<T>(p.scale);
          group_zero[static_cast<std::size_t>(r)] = static_cast<T>(p.zero);
        }
      };

      // Chunk columns [end, rest_end) += V'^T piece x R[begin:end] (R: residuals of the block).
      auto update = [&](const Piece& piece, Index block_begin) {
        const Index depth = piece.end - piece.begin;
        detail::gemm::pack_b(kernel, depth, R,
                             detail::gemm::row_major(residuals.data() + (piece.begin - block_begin) * R, R),
                             packed_residuals.data());
        detail::gemm::multiply_packed(kernel, piece.rest_end - piece.end, R, depth, packed_v.data() + piece.offset,
                                      packed_residuals.data(), work.data() + piece.end * R, R, false);
      };
      for (Index b = 0; b < blocks; ++b) {
        const Piece& block = plan.blocks[static_cast<std::size_t>(b)];
        const Index i1 = block.begin, i2 = block.end;
        for (Index t = plan.first_segment[static_cast<std::size_t>(b)];
             t < plan.first_segment[static_cast<std::size_t>(b + 1)]; ++t) {
          const Piece& segment = plan.segments[static_cast<std::size_t>(t)];
          const Index s1 = segment.begin, s2 = segment.end;
          const T* square = squares.data() + square_offset[static_cast<std::size_t>(t)];
          if (static_groups) {
            // Each column takes its own group's parameters (by its input column).
            for (Index i = s1; i < s2; ++i) {
              const Index k = order[static_cast<std::size_t>(i)] / group;
              sweep(square, s2 - s1, s1, i, i + 1, i1, s2, work.data(), original.data(), group_scale.data() + k * R,
                    group_zero.data() + k * R, max_code, residuals.data(), codes.data(), loss.data());
            }
          } else {
            if (group == 0 && s1 == 0) refit(0, n, 0);
            if (group > 0 && s1 % group == 0) refit(s1, std::min(group, n - s1), s1 / group);
            sweep(square, s2 - s1, s1, s1, s2, i1, s2, work.data(), original.data(), group_scale.data(),
                  group_zero.data(), max_code, residuals.data(), codes.data(), loss.data());
          }
          if (s2 < i2) update(segment, i1);
        }
        if (i2 < n) update(block, i1);
      }

      row_codes.resize(static_cast<std::size_t>(n));
      for (Index r = 0; r < valid; ++r) {
        for (Index j = 0; j < n; ++j) {
          const Index stored = store_permuted ? j : order[static_cast<std::size_t>(j)];
          row_codes[static_cast<std::size_t>(stored)] = codes[static_cast<std::size_t>(j * R + r)];
        }
        q.set_stored_row(r0 + r, row_codes.data());
      }
      double total = 0;
      for (Index r = 0; r < valid; ++r) total += loss[static_cast<std::size_t>(r)];
      chunk_loss[static_cast<std::size_t>(chunk)] = total;
    } catch (...) {
      failures[static_cast<std::size_t>(chunk)] = std::current_exception();
    }
  });
  for (const auto& failure : failures)
    if (failure) std::rethrow_exception(failure);

  Result result;
  result.weights = std::move(q);
  result.loss = 0.5 * std::accumulate(chunk_loss.begin(), chunk_loss.end(), 0.0);
  result.damp = f.damp;
  result.damping = f.damping;
  result.dead_columns = f.dead_columns;
  return result;
}

}  // namespace lowbit

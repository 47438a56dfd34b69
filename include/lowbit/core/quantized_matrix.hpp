// QuantizedMatrix<T>: packed codes plus per-group scale and zero, the output of every
// quantizer and the input of every kernel and file writer.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "lowbit/core/error.hpp"
#include "lowbit/core/spec.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/core/types.hpp"
#include "lowbit/pack/pack.hpp"

namespace lowbit {

// Rounds a scale or zero to what the spec stores (fp16 keeps 11 significant bits).
[[nodiscard]] inline float round_param(float value, ParamType type) {
  return type == ParamType::Float16 ? static_cast<float>(Eigen::half(value)) : value;
}

// A weight matrix W [rows = out_features, cols = in_features] stored as b-bit codes.
//
// Storage. With GroupAxis::Input the stored code matrix is W itself, its columns in
// `permutation()` order when one is set (GPTQ act-order keeps groups contiguous this
// way: stored column j is input column permutation()[j]). With GroupAxis::Output it
// is W^T, so groups again run along stored rows. Each stored row is packed as
// pack/layout.hpp describes; scales()/zeros() are [stored_rows, groups_per_row] and
// decode a code as w_hat = (q - zero) * scale.
template <class T = float>
class QuantizedMatrix {
 public:
  using Scalar = T;
  using ParamMatrix = Eigen::Map<const Matrix<float>>;
  using MutableParamMatrix = Eigen::Map<Matrix<float>>;

  QuantizedMatrix() = default;

  // An all-zero-code matrix of the given logical shape; quantizers fill it in with
  // set_stored_row() and mutable_scales()/mutable_zeros().
  QuantizedMatrix(Index rows, Index cols, const QuantSpec& spec) : spec_(spec), rows_(rows), cols_(cols) {
    spec_.validate();
    detail::require(rows >= 0 && cols >= 0, "QuantizedMatrix shape ", rows, "x", cols, " is negative");
    const Index stored_cols = this->stored_cols();
    // Every byte count below must fit in Index (and so in size_t): a row padded to
    // kPadCodes codes times bits, then rows x row bytes and rows x groups x 4 bytes.
    constexpr Index kMaxCodes = std::numeric_limits<Index>::max() / 8 - detail::kPadCodes;
    Index code_bytes = 0, params = 0;
    detail::require(stored_cols <= kMaxCodes &&
                        !__builtin_mul_overflow(stored_rows(), detail::packed_row_bytes(stored_cols, spec_.bits), &code_bytes) &&
                        !__builtin_mul_overflow(stored_rows(), stored_cols == 0 ? 0 : spec_.groups_per_row(stored_cols), &params) &&
                        params <= std::numeric_limits<Index>::max() / 8,
                    "QuantizedMatrix shape ", rows, "x", cols, " at ", spec_.bits, " bits overflows a 64-bit byte count");
    row_bytes_ = detail::packed_row_bytes(stored_cols, spec_.bits);
    // A group longer than the row is the whole row (buffers are sized by group_length()).
    group_length_ = std::min(spec_.group_length(stored_cols), std::max<Index>(stored_cols, 1));
    groups_per_row_ = stored_cols == 0 ? 0 : spec_.groups_per_row(stored_cols);
    codes_.assign(static_cast<std::size_t>(stored_rows() * row_bytes_), 0);
    scales_.assign(static_cast<std::size_t>(stored_rows() * groups_per_row_), 1.0f);
    zeros_.assign(static_cast<std::size_t>(stored_rows() * groups_per_row_), 0.0f);
  }

  // Builds a matrix from unpacked codes in storage order ([stored_rows, stored_cols])
  // and per-group parameters ([stored_rows, groups_per_row]).
  static QuantizedMatrix from_codes(const QuantSpec& spec, Index rows, Index cols,
                                    const Eigen::Ref<const CodeMatrix>& codes,
                                    const Eigen::Ref<const Matrix<float>>& scales,
                                    const Eigen::Ref<const Matrix<float>>& zeros,
                                    std::vector<std::int32_t> permutation = {}) {
    QuantizedMatrix q(rows, cols, spec);
    detail::require(codes.rows() == q.stored_rows() && codes.cols() == q.stored_cols(), "codes shape ",
                    codes.rows(), "x", codes.cols(), " != stored shape ", q.stored_rows(), "x", q.stored_cols());
    detail::require(scales.rows() == q.stored_rows() && scales.cols() == q.groups_per_row(), "scales shape ",
                    scales.rows(), "x", scales.cols(), " != ", q.stored_rows(), "x", q.groups_per_row());
    detail::require(zeros.rows() == scales.rows() && zeros.cols() == scales.cols(), "zeros shape ",
                    zeros.rows(), "x", zeros.cols(), " != ", scales.rows(), "x", scales.cols());
    detail::require_finite(scales, "scales");
    detail::require_finite(zeros, "zeros");
    const int max_code = spec.max_code();
    for (Index r = 0; r < codes.rows(); ++r)
      for (Index c = 0; c < codes.cols(); ++c)
        detail::require(codes(r, c) <= max_code, "codes(", r, ", ", c, ") = ", int(codes(r, c)),
                        " exceeds ", max_code, " for ", spec.bits, "-bit");
    for (Index r = 0; r < codes.rows(); ++r) q.set_stored_row(r, codes.data() + r * codes.outerStride());
    q.mutable_scales() = scales;
    q.mutable_zeros() = zeros;
    q.round_params();
    q.set_permutation(std::move(permutation));
    return q;
  }

  // Logical shape of W.
  [[nodiscard]] Index rows() const { return rows_; }
  [[nodiscard]] Index cols() const { return cols_; }
  [[nodiscard]] const QuantSpec& spec() const { return spec_; }
  [[nodiscard]] bool transposed() const { return spec_.group_axis == GroupAxis::Output; }

  // Shape of the stored code matrix (W, or W^T for output-axis groups).
  [[nodiscard]] Index stored_rows() const { return transposed() ? cols_ : rows_; }
  [[nodiscard]] Index stored_cols() const { return transposed() ? rows_ : cols_; }
  [[nodiscard]] Index group_length() const { return group_length_; }
  [[nodiscard]] Index groups_per_row() const { return groups_per_row_; }
  [[nodiscard]] Index row_bytes() const { return row_bytes_; }

  [[nodiscard]] const std::uint8_t* packed_row(Index stored_row) const {
    return codes_.data() + stored_row * row_bytes_;
  }
  [[nodiscard]] const std::vector<std::uint8_t>& packed_codes() const { return codes_; }

  [[nodiscard]] ParamMatrix scales() const { return ParamMatrix(scales_.data(), stored_rows(), groups_per_row_); }
  [[nodiscard]] ParamMatrix zeros() const { return ParamMatrix(zeros_.data(), stored_rows(), groups_per_row_); }
  [[nodiscard]] MutableParamMatrix mutable_scales() { return MutableParamMatrix(scales_.data(), stored_rows(), groups_per_row_); }
  [[nodiscard]] MutableParamMatrix mutable_zeros() { return MutableParamMatrix(zeros_.data(), stored_rows(), groups_per_row_); }

  // Stored column j holds input column permutation()[j]; empty means identity.
  [[nodiscard]] const std::vector<std::int32_t>& permutation() const { return permutation_; }

  void set_permutation(std::vector<std::int32_t> permutation) {
    if (!permutation.empty()) {
      detail::require(!transposed(), "permutation: only input-axis groups can be permuted");
      detail::require(static_cast<Index>(permutation.size()) == cols_, "permutation size ",
                      permutation.size(), " != cols ", cols_);
      std::vector<bool> seen(permutation.size(), false);
      for (std::size_t j = 0; j < permutation.size(); ++j) {
        const auto p = permutation[j];
        detail::require(p >= 0 && p < cols_ && !seen[static_cast<std::size_t>(p)], "permutation[", j,
                        "] = ", p, " is out of range or repeated");
        seen[static_cast<std::size_t>(p)] = true;
      }
    }
    permutation_ = std::move(permutation);
  }

  // Packs one stored row of codes (stored_cols() of them, each <= max_code).
  void set_stored_row(Index stored_row, const std::uint8_t* codes) {
    detail::pack_row(codes, stored_cols(), spec_.bits, codes_.data() + stored_row * row_bytes_);
  }

  // Unpacks one stored row into codes[0 .. stored_cols()).
  void stored_row_codes(Index stored_row, std::uint8_t* codes) const {
    detail::unpack_row(packed_row(stored_row), stored_cols(), spec_.bits, codes);
  }

  // Rounds scales and zeros to the spec's storage type; quantizers call it once
  // after fitting, before they compute the codes.
  void round_params() {
    if (spec_.param_type == ParamType::Float32) return;
    for (float& s : scales_) s = round_param(s, spec_.param_type);
    for (float& z : zeros_) z = round_param(z, spec_.param_type);
  }

  // The code of logical element W(r, c); for tests and converters, not hot loops.
  [[nodiscard]] int code(Index r, Index c) const {
    Index stored_row = r, stored_col = c;
    if (transposed()) std::swap(stored_row, stored_col);
    else if (!permutation_.empty()) stored_col = inverse_permutation()[static_cast<std::size_t>(c)];
    std::vector<std::uint8_t> row(static_cast<std::size_t>(stored_cols()));
    stored_row_codes(stored_row, row.data());
    return row[static_cast<std::size_t>(stored_col)];
  }

  // Decodes one stored row: out[j] = (q - zero) * scale, j in storage order.
  void dequantize_stored_row(Index stored_row, T* out) const {
    detail::dequantize_row<T>(packed_row(stored_row), stored_cols(), spec_.bits,
                              scales_.data() + stored_row * groups_per_row_,
                              zeros_.data() + stored_row * groups_per_row_, group_length_, out);
  }

  // W_hat [rows, cols] in the original column order.
  [[nodiscard]] Matrix<T> dequantize() const {
    Matrix<T> out(rows_, cols_);
    dequantize(out);
    return out;
  }

  // Into the caller's storage; allocates nothing unless a permutation or output-axis
  // groups need a row buffer.
  void dequantize(Eigen::Ref<Matrix<T>> out) const {
    detail::require(out.rows() == rows_ && out.cols() == cols_, "dequantize: out shape ", out.rows(), "x",
                    out.cols(), " != ", rows_, "x", cols_);
    const bool direct = !transposed() && permutation_.empty() && out.outerStride() == cols_;
    if (direct) {
      detail::parallel_for(rows_, [&](Index r) { dequantize_stored_row(r, out.data() + r * cols_); });
      return;
    }
    detail::parallel_for(stored_rows(), [&](Index s) {
      thread_local std::vector<T> row;
      row.resize(static_cast<std::size_t>(stored_cols()));
      dequantize_stored_row(s, row.data());
      for (Index j = 0; j < stored_cols(); ++j) {
        if (transposed()) out(j, s) = row[static_cast<std::size_t>(j)];
        else out(s, permutation_.empty() ? j : permutation_[static_cast<std::size_t>(j)]) = row[static_cast<std::size_t>(j)];
      }
    });
  }

  // Bytes of the stored form: packed codes (rows padded to 32 codes) + scales + zeros
  // (4 or 2 bytes each) + the permutation (4 bytes per input column, when set).
  [[nodiscard]] std::size_t packed_bytes() const {
    const std::size_t param_bytes = spec_.param_type == ParamType::Float16 ? 2 : 4;
    return codes_.size() + 2 * scales_.size() * param_bytes + permutation_.size() * sizeof(std::int32_t);
  }

  // packed_bytes() * 8 / (rows * cols).
  [[nodiscard]] double bits_per_weight() const {
    const double count = static_cast<double>(rows_) * static_cast<double>(cols_);
    return count == 0 ? 0.0 : static_cast<double>(packed_bytes()) * 8.0 / count;
  }

  // inverse[c] = stored column of input column c.
  [[nodiscard]] std::vector<std::int32_t> inverse_permutation() const {
    std::vector<std::int32_t> inverse(permutation_.size());
    for (std::size_t j = 0; j < permutation_.size(); ++j)
      inverse[static_cast<std::size_t>(permutation_[j])] = static_cast<std::int32_t>(j);
    return inverse;
  }

  friend bool operator==(const QuantizedMatrix& a, const QuantizedMatrix& b) {
    return a.rows_ == b.rows_ && a.cols_ == b.cols_ && a.spec_.bits == b.spec_.bits &&
           a.spec_.group_size == b.spec_.group_size && a.spec_.symmetric == b.spec_.symmetric &&
           a.spec_.integral_zero == b.spec_.integral_zero && a.spec_.param_type == b.spec_.param_type &&
           a.spec_.group_axis == b.spec_.group_axis && a.codes_ == b.codes_ && a.scales_ == b.scales_ &&
           a.zeros_ == b.zeros_ && a.permutation_ == b.permutation_;
  }

 private:
  QuantSpec spec_{};
  Index rows_ = 0, cols_ = 0;
  Index row_bytes_ = 0, group_length_ = 1, groups_per_row_ = 0;
  std::vector<std::uint8_t> codes_;
  std::vector<float> scales_, zeros_;
  std::vector<std::int32_t> permutation_;
};

}  // namespace lowbit

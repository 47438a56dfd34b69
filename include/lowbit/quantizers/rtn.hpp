// RTN: round-to-nearest with min-max (or MSE-searched) group ranges. The baseline
// every other method is measured against, and the parameter fit GPTQ reuses.
#pragma once

#include <vector>

#include "lowbit/core/affine.hpp"
#include "lowbit/core/error.hpp"
#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/core/tensor.hpp"
#include "lowbit/core/threading.hpp"

namespace lowbit {

namespace detail {

// Quantizes W group by group: fit(group_ptr, length) -> GroupParams, then encodes.
// Handles both group axes (output-axis groups quantize W^T).
template <class T, class Fit>
QuantizedMatrix<T> quantize_groupwise(const Eigen::Ref<const Matrix<T>>& W, const QuantSpec& spec, Fit&& fit) {
  spec.validate();
  require_finite(W, "W");
  QuantizedMatrix<T> q(W.rows(), W.cols(), spec);
  const Matrix<T> transposed = q.transposed() ? Matrix<T>(W.transpose()) : Matrix<T>();
  const Index stored_cols = q.stored_cols(), group = q.group_length();
  auto scales = q.mutable_scales();
  auto zeros = q.mutable_zeros();
  parallel_for(q.stored_rows(), [&](Index r) {
    thread_local std::vector<std::uint8_t> codes;
    codes.resize(static_cast<std::size_t>(stored_cols));
    const T* row = q.transposed() ? transposed.data() + r * stored_cols : W.data() + r * W.outerStride();
    for (Index g = 0; g * group < stored_cols; ++g) {
      const Index begin = g * group, length = std::min(group, stored_cols - begin);
      GroupParams p = fit(row + begin, length);
      p.scale = round_param(p.scale, spec.param_type);
      p.zero = round_param(p.zero, spec.param_type);
      scales(r, g) = p.scale;
      zeros(r, g) = p.zero;
      encode_group(row + begin, length, p, spec.max_code(), codes.data() + begin);
    }
    q.set_stored_row(r, codes.data());
  });
  return q;
}

}  // namespace detail

template <class T = float>
class RTN {
 public:
  struct Options {
    QuantSpec spec{};
    bool mse = false;         // search a shrunk clipping range per group (GPTQ's grid search)
    int grid = 100;           // shrink steps of 1/grid
    double max_shrink = 0.8;  // try shrinks up to this fraction
    double norm = 2.4;        // error norm of the search
  };

  explicit RTN(QuantSpec spec) : RTN(Options{.spec = spec}) {}
  explicit RTN(Options options) : options_(options) {
    options_.spec.validate();
    detail::require(options_.grid >= 1, "RTN.grid = ", options_.grid, " must be >= 1");
    detail::require(options_.max_shrink >= 0 && options_.max_shrink < 1, "RTN.max_shrink = ",
                    options_.max_shrink, " is outside [0, 1)");
    detail::require(options_.norm > 0, "RTN.norm = ", options_.norm, " must be positive");
  }

  [[nodiscard]] const Options& options() const { return options_; }

  [[nodiscard]] QuantizedMatrix<T> quantize(const Eigen::Ref<const Matrix<T>>& W) const {
    const Options& o = options_;
    if (o.mse)
      return detail::quantize_groupwise<T>(W, o.spec, [&](const T* w, Index n) {
        return fit_mse(w, n, o.spec, o.grid, o.max_shrink, o.norm);
      });
    return detail::quantize_groupwise<T>(W, o.spec, [&](const T* w, Index n) { return fit_minmax(w, n, o.spec); });
  }

  template <RowMajorTensor2 Tensor>
  [[nodiscard]] QuantizedMatrix<T> quantize(const Tensor& W) const { return quantize(as_matrix(W)); }

 private:
  Options options_;
};

}  // namespace lowbit

// Fake quantization with straight-through gradients: the differentiable stand-in for
// affine group quantization that gradient-trained quantizers (OmniQuant, QLLM) train
// through. Weights use it with learnable clipping (LWC); activations use it per token.
//
// Per group of entries w (group_size consecutive entries of a row; 0: the whole row),
// with clipping factors gamma = sigmoid(a), beta = sigmoid(b) (both 1 without LWC):
//   lo = min(beta * min(w), 0),   hi = max(gamma * max(w), 0)
//   h  = (hi - lo) / (2^N - 1),   z = round(-lo / h)
//   w_hat = (clamp(round(w / h + z), 0, 2^N - 1) - z) * h
// (z is an integer, so round(w / h + z) = round(w / h) + z; it is computed as lowbit's
// affine encode does, which makes gamma = beta = 1 reproduce min-max RTN bit for bit.)
// This is OmniQuant's LWC (eq. 2 of the paper) with one stated rule added: the range
// [lo, hi] always contains 0. For a group holding both signs, the usual case, nothing
// changes. An all-positive group gets lo = 0 (z = 0), an all-negative one hi = 0
// (z = 2^N - 1): the zero is then always a code in [0, 2^N - 1], so every checkpoint
// format (unsigned packed zeros included) stores it exactly, 0 decodes to exactly 0, and
// the packed matrix decodes to exactly the fake-quantized values training saw. (The
// reference leaves z unclamped, e.g. negative for an all-positive group, which unsigned
// zero formats cannot hold.) An all-zero group uses h = 1, z = 0 and decodes exactly.
//
// Backward, straight-through (STE): d round(u)/du = 1; the zero's rounding passes no
// gradient; clamp passes gradient inside [0, 2^N - 1], bounds included (torch.clamp);
// min and max pass theirs to the first entry attaining them. Per entry, with
// u = w / h, c = round(u + z):
//   inside:  d w_hat / d w = 1,  d w_hat / d h = (c - z) - u
//   clamped: d w_hat / d w = 0,  d w_hat / d h = clamp(c) - z
// and h = (hi - lo) / (2^N - 1) carries the group's gradient to max/min (and a, b).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "lowbit/core/affine.hpp"
#include "lowbit/core/error.hpp"
#include "lowbit/core/spec.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/core/types.hpp"

namespace lowbit {

// How the forward rounds w / h. Nearest (half to even) is quantization. Identity is the
// straight-through surrogate: the same forward with that rounding removed, a piecewise
// smooth function whose finite differences the STE backward must reproduce (how the
// gradients are checked). The zero-point stays rounded in both: it passes no gradient.
enum class SteRounding { Nearest, Identity };

// Learnable clipping (LWC) logits, one pair per group: [rows, groups_per_row].
template <class T>
struct ClipLogits {
  Matrix<T> upper;  // gamma = sigmoid(upper) scales the group's max
  Matrix<T> lower;  // beta  = sigmoid(lower) scales the group's min
};

namespace detail {
template <class T>
[[nodiscard]] inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}
}  // namespace detail

// Fake quantizer of a [rows, cols] matrix in groups along its rows. forward() keeps the
// per-group state that backward() needs; backward() also takes the forward's input back
// (callers hold it anyway), so the quantizer stores O(groups), not O(entries).
template <class T>
class GroupFakeQuantizer {
 public:
  GroupFakeQuantizer() = default;
  GroupFakeQuantizer(int bits, Index group_size, SteRounding rounding = SteRounding::Nearest)
      : bits_(bits), group_size_(group_size), rounding_(rounding) {
    detail::require(bits >= 1 && bits <= 8, "fake quantizer bits = ", bits, " is outside 1..8");
    detail::require(group_size >= 0, "fake quantizer group_size = ", group_size,
                    " is negative (use 0 for one group per row)");
  }

  [[nodiscard]] int bits() const { return bits_; }
  [[nodiscard]] Index group_size() const { return group_size_; }
  [[nodiscard]] int max_code() const { return (1 << bits_) - 1; }
  [[nodiscard]] SteRounding rounding() const { return rounding_; }
  [[nodiscard]] Index group_length(Index cols) const { return group_size_ == 0 ? std::max<Index>(cols, 1) : group_size_; }
  [[nodiscard]] Index groups_per_row(Index cols) const { return (cols + group_length(cols) - 1) / group_length(cols); }

  // x_hat = Q(x). With `clip` (logits [rows, groups_per_row]) the ranges are clipped
  // (LWC); without, gamma = beta = 1 (plain min-max). x_hat may not alias x.
  void forward(const Eigen::Ref<const Matrix<T>>& x, Eigen::Ref<Matrix<T>> x_hat, const ClipLogits<T>* clip = nullptr) {
    detail::require(x_hat.rows() == x.rows() && x_hat.cols() == x.cols(), "fake quantizer: x_hat shape ",
                    x_hat.rows(), "x", x_hat.cols(), " != x shape ", x.rows(), "x", x.cols());
    rows_ = x.rows();
    cols_ = x.cols();
    groups_ = cols_ == 0 ? 0 : groups_per_row(cols_);
    if (clip) {
      detail::require(clip->upper.rows() == rows_ && clip->upper.cols() == groups_ && clip->lower.rows() == rows_ &&
                          clip->lower.cols() == groups_,
                      "fake quantizer: clip logits shape ", clip->upper.rows(), "x", clip->upper.cols(), " / ",
                      clip->lower.rows(), "x", clip->lower.cols(), " != ", rows_, "x", groups_);
    }
    clipped_ = clip != nullptr;
    state_.resize(static_cast<std::size_t>(rows_ * groups_));
    steps_.resize(rows_, groups_);
    zeros_.resize(rows_, groups_);
    const Index length = group_length(cols_);
    const T max_code = static_cast<T>(this->max_code());
    detail::parallel_for(rows_, [&](Index r) {
      const T* row = x.data() + r * x.outerStride();
      T* out = x_hat.data() + r * x_hat.outerStride();
      for (Index g = 0; g < groups_; ++g) {
        const Index begin = g * length, n = std::min(length, cols_ - begin);
        GroupState& s = state_[static_cast<std::size_t>(r * groups_ + g)];
        s.argmax = s.argmin = begin;
        s.max = s.min = row[begin];
        for (Index i = begin + 1; i < begin + n; ++i) {
          if (row[i] > s.max) { s.max = row[i]; s.argmax = i; }
          if (row[i] < s.min) { s.min = row[i]; s.argmin = i; }
        }
        s.gamma = clip ? detail::sigmoid(clip->upper(r, g)) : T(1);
        s.beta = clip ? detail::sigmoid(clip->lower(r, g)) : T(1);
        const T hi = s.gamma * s.max, lo = s.beta * s.min;
        s.hi_active = hi > T(0);
        s.lo_active = lo < T(0);
        const T range = (s.hi_active ? hi : T(0)) - (s.lo_active ? lo : T(0));
        s.degenerate = !(range > T(0));
        s.step = s.degenerate ? T(1) : range / max_code;
        // + 0 turns the -0 of an all-positive group into +0.
        s.zero = s.degenerate ? T(0) : detail::round_half_even(-(s.lo_active ? lo : T(0)) / s.step) + T(0);
        steps_(r, g) = s.step;
        zeros_(r, g) = s.zero;
        for (Index i = begin; i < begin + n; ++i) {
          const T c = round(row[i] / s.step + s.zero);
          out[i] = (std::clamp(c, T(0), max_code) - s.zero) * s.step;
        }
      }
    }, min_parallel_rows());
  }

  // Given the forward's x and grad_x_hat = dL/dx_hat: dL/dx into *grad_x (when not null)
  // and, when the forward was clipped, dL/d(logits) into *clip_grad (when not null).
  void backward(const Eigen::Ref<const Matrix<T>>& x, const Eigen::Ref<const Matrix<T>>& grad_x_hat, Matrix<T>* grad_x,
                ClipLogits<T>* clip_grad) const {
    detail::require(x.rows() == rows_ && x.cols() == cols_ && grad_x_hat.rows() == rows_ &&
                        grad_x_hat.cols() == cols_,
                    "fake quantizer backward: x ", x.rows(), "x", x.cols(), ", grad ", grad_x_hat.rows(), "x",
                    grad_x_hat.cols(), " != forward shape ", rows_, "x", cols_);
    if (grad_x) grad_x->resize(rows_, cols_);
    const bool want_clip = clip_grad && clipped_;
    if (want_clip) {
      clip_grad->upper.resize(rows_, groups_);
      clip_grad->lower.resize(rows_, groups_);
    }
    const Index length = group_length(cols_);
    const T max_code = static_cast<T>(this->max_code());
    detail::parallel_for(rows_, [&](Index r) {
      const T* row = x.data() + r * x.outerStride();
      const T* grad = grad_x_hat.data() + r * grad_x_hat.outerStride();
      T* grad_row = grad_x ? grad_x->data() + r * cols_ : nullptr;
      for (Index g = 0; g < groups_; ++g) {
        const Index begin = g * length, n = std::min(length, cols_ - begin);
        const GroupState& s = state_[static_cast<std::size_t>(r * groups_ + g)];
        T grad_step = 0;  // dL/dh
        for (Index i = begin; i < begin + n; ++i) {
          const T u = row[i] / s.step, c = round(u + s.zero);
          const bool inside = c >= T(0) && c <= max_code;
          // Inside: d/dh of (c - z) h with d c/d u = 1 is (c - z) - u, the rounding residual
          // (exactly 0 for the identity surrogate).
          const T residual = rounding_ == SteRounding::Nearest ? (c - s.zero) - u : T(0);
          grad_step += grad[i] * (inside ? residual : std::clamp(c, T(0), max_code) - s.zero);
          if (grad_row) grad_row[i] = inside ? grad[i] : T(0);
        }
        // h = (hi - lo) / (2^N - 1); hi = gamma * max, lo = beta * min where active.
        const T grad_range = s.degenerate ? T(0) : grad_step / max_code;
        if (grad_row && !s.degenerate) {
          if (s.hi_active) grad_row[s.argmax] += grad_range * s.gamma;
          if (s.lo_active) grad_row[s.argmin] -= grad_range * s.beta;
        }
        if (want_clip) {
          clip_grad->upper(r, g) = s.hi_active ? grad_range * s.max * s.gamma * (T(1) - s.gamma) : T(0);
          clip_grad->lower(r, g) = s.lo_active ? -grad_range * s.min * s.beta * (T(1) - s.beta) : T(0);
        }
      }
    }, min_parallel_rows());
  }

  // The last forward's per-group step h and integer zero z, [rows, groups_per_row].
  [[nodiscard]] const Matrix<T>& steps() const { return steps_; }
  [[nodiscard]] const Matrix<T>& zeros() const { return zeros_; }

  // clamp(round(w / step + zero), 0, 2^N - 1): the code the forward gives w.
  [[nodiscard]] static std::uint8_t code(T w, T step, T zero, int max_code) {
    return detail::encode(w, step, zero, max_code);
  }

 private:
  struct GroupState {
    T max = 0, min = 0, gamma = 1, beta = 1, step = 1, zero = 0;
    Index argmax = 0, argmin = 0;
    bool hi_active = false, lo_active = false, degenerate = true;
  };

  // Small matrices stay on the calling thread: a parallel region costs more than they do.
  [[nodiscard]] Index min_parallel_rows() const { return rows_ * cols_ >= (Index(1) << 16) ? 2 : rows_ + 1; }

  [[nodiscard]] T round(T u) const { return rounding_ == SteRounding::Nearest ? detail::round_half_even(u) : u; }

  int bits_ = 4;
  Index group_size_ = 0;
  SteRounding rounding_ = SteRounding::Nearest;
  Index rows_ = 0, cols_ = 0, groups_ = 0;
  bool clipped_ = false;
  std::vector<GroupState> state_;
  Matrix<T> steps_, zeros_;
};

}  // namespace lowbit

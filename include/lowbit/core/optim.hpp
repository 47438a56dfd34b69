// AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019): the
// optimizer of lowbit's gradient-trained quantizers (OmniQuant, QLLM).
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "lowbit/core/error.hpp"
#include "lowbit/core/types.hpp"

namespace lowbit {

// AdamW state for one parameter tensor (any shape, seen as a flat array). Step t = 1, 2, ...
// updates every element as PyTorch's torch.optim.AdamW does:
//   p <- p * (1 - lr * weight_decay)                       decoupled decay
//   m <- beta1 * m + (1 - beta1) * g
//   v <- beta2 * v + (1 - beta2) * g^2
//   p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// Elementwise and serial, so the result does not depend on the thread count.
template <class T = float>
class AdamW {
 public:
  struct Options {
    T lr = T(1e-3);
    T beta1 = T(0.9);
    T beta2 = T(0.999);
    T eps = T(1e-8);
    T weight_decay = T(0);  // OmniQuant trains its clipping and transform without decay
  };

  AdamW() = default;
  AdamW(Index size, Options options) : options_(options) {
    detail::require(size >= 0, "AdamW size = ", size, " is negative");
    const auto finite = [](T x) { return std::isfinite(static_cast<double>(x)); };
    detail::require(finite(options_.lr) && options_.lr >= 0, "AdamW.lr = ", options_.lr, " must be >= 0");
    detail::require(options_.beta1 >= 0 && options_.beta1 < 1, "AdamW.beta1 = ", options_.beta1,
                    " is outside [0, 1)");
    detail::require(options_.beta2 >= 0 && options_.beta2 < 1, "AdamW.beta2 = ", options_.beta2,
                    " is outside [0, 1)");
    detail::require(finite(options_.eps) && options_.eps > 0, "AdamW.eps = ", options_.eps, " must be > 0");
    detail::require(finite(options_.weight_decay) && options_.weight_decay >= 0, "AdamW.weight_decay = ",
                    options_.weight_decay, " must be >= 0");
    first_moment_.assign(static_cast<std::size_t>(size), T(0));
    second_moment_.assign(static_cast<std::size_t>(size), T(0));
  }

  [[nodiscard]] Index size() const { return static_cast<Index>(first_moment_.size()); }
  [[nodiscard]] std::int64_t steps() const { return steps_; }
  [[nodiscard]] const Options& options() const { return options_; }

  // One update of `param` with gradient `grad` (both size() long). A non-finite gradient
  // throws before anything changes.
  void step(std::span<T> param, std::span<const T> grad) {
    const std::size_t n = first_moment_.size();
    detail::require(param.size() == n, "AdamW.step: param size ", param.size(), " != ", n);
    detail::require(grad.size() == n, "AdamW.step: grad size ", grad.size(), " != ", n);
    for (std::size_t i = 0; i < n; ++i)
      if (!std::isfinite(static_cast<double>(grad[i])))
        detail::fail("AdamW.step: grad[", i, "] = ", static_cast<double>(grad[i]), " is not finite");
    ++steps_;
    const Options& o = options_;
    const double t = static_cast<double>(steps_);
    const T step_size = static_cast<T>(static_cast<double>(o.lr) / (1.0 - std::pow(static_cast<double>(o.beta1), t)));
    const T correction2_sqrt = static_cast<T>(std::sqrt(1.0 - std::pow(static_cast<double>(o.beta2), t)));
    const T decay = T(1) - o.lr * o.weight_decay;
    for (std::size_t i = 0; i < n; ++i) {
      T& m = first_moment_[i];
      T& v = second_moment_[i];
      const T g = grad[i];
      m = o.beta1 * m + (T(1) - o.beta1) * g;
      v = o.beta2 * v + (T(1) - o.beta2) * g * g;
      param[i] = param[i] * decay - step_size * m / (std::sqrt(v) / correction2_sqrt + o.eps);
    }
  }

  // Plain Eigen matrices, vectors or arrays (contiguous storage).
  template <class Param, class Grad>
    requires std::is_base_of_v<Eigen::PlainObjectBase<Param>, Param> &&
             std::is_base_of_v<Eigen::PlainObjectBase<Grad>, Grad>
  void step(Param& param, const Grad& grad) {
    step(std::span<T>(param.data(), static_cast<std::size_t>(param.size())),
         std::span<const T>(grad.data(), static_cast<std::size_t>(grad.size())));
  }

 private:
  Options options_{};
  std::int64_t steps_ = 0;
  std::vector<T> first_moment_, second_moment_;
};

}  // namespace lowbit

// OmniQuant (Shao et al., "OmniQuant: Omnidirectionally Calibrated Quantization for Large
// Language Models", ICLR 2024): quantization parameters learned by gradient descent on
// the output error, with hand-written gradients.
//
// Learnable weight clipping (LWC), per weight group: gamma = sigmoid(a), beta = sigmoid(b),
// a = b = 4 at the start (a 1.8% shrink), in the fake quantizer of core/fake_quant.hpp.
// Learnable equivalent transform (LET), per input channel j: scale s_j and shift delta_j,
//   X' = (X - delta) / s,   W' = W diag(s),   b' = b + W delta      (float output unchanged)
//   Y_hat = Q_a(X') Q_w(W')^T + b'
// initialised as s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha), delta_j = (max X_j + min X_j) / 2
// over the calibration tokens (delta = 0 weight-only, see initial_transform); |s_j| < 0.01
// is reset to +-0.01 after every step.
// Objective ||X W^T + b - Y_hat||^2 over the calibration tokens, AdamW, no weight decay,
// no schedule. Q_a (optional) is per-token asymmetric fake quantization with STE.
//
// Weight-only, the error of token x is E (x - delta) with E = Q_w(W S) S^-1 - W, so the
// loss over all tokens is exactly tr(E H_delta E^T), H_delta = sum_t (x_t - delta)(x_t - delta)^T
// = H - m delta^T - delta m^T + N delta delta^T with H = X^T X and m = sum_t x_t built once:
// the "Hessian" objective, whose cost per step does not depend on the token count.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include "lowbit/core/dense_product.hpp"
#include "lowbit/core/error.hpp"
#include "lowbit/core/fake_quant.hpp"
#include "lowbit/core/optim.hpp"
#include "lowbit/core/quantized_layer.hpp"
#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/core/spec.hpp"
#include "lowbit/core/tensor.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/core/types.hpp"

namespace lowbit {

// Which loss the layer-wise trainer differentiates.
// Either way an epoch is ceil(tokens / batch_tokens) AdamW steps.
enum class OmniObjective {
  Auto,     // Hessian when weight-only and cheaper (in_features <= 2 * batch tokens), else Tokens
  Tokens,   // each step: the output error of one mini-batch of calibration tokens
  Hessian,  // weight-only, each step: the exact loss over all tokens, tr(E H_delta E^T)
};

template <class T = float>
struct OmniQuantOptions {
  QuantSpec weight{};                     // asymmetric, input-axis groups; zeros are always integers
  std::optional<QuantSpec> activation{};  // per-token asymmetric Q_a: bits, group_size (0: whole token)
  bool lwc = true;                        // learnable weight clipping
  bool let = true;                        // learnable equivalent transform
  int epochs = 20;                        // the reference trains 2-bit weights for 40
  T lr_lwc = T(1e-2);
  T lr_let = T(5e-3);
  Index batch_tokens = 256;  // tokens per step; an epoch is ceil(tokens / batch_tokens) steps
  std::uint64_t seed = 0;    // token order of each epoch
  std::optional<T> let_alpha{};  // LET init exponent; default 0.5, 0.75 with activations at <= 4 bits
  OmniObjective objective = OmniObjective::Auto;
  std::function<void(int epoch, double loss)> progress{};  // after each epoch (1-based); silent if empty

  [[nodiscard]] T alpha() const { return let_alpha.value_or(activation && activation->bits <= 4 ? T(0.75) : T(0.5)); }

  void validate() const {
    weight.validate();
    detail::require(!weight.symmetric, "OmniQuant.weight.symmetric = true: LWC learns an asymmetric range");
    detail::require(weight.group_axis == GroupAxis::Input,
                    "OmniQuant.weight.group_axis must be Input (LET scales input channels)");
    if (activation) {
      activation->validate();
      detail::require(!activation->symmetric, "OmniQuant.activation.symmetric = true: activation quantization "
                                              "is per-token asymmetric");
    }
    detail::require(epochs >= 0, "OmniQuant.epochs = ", epochs, " is negative");
    const auto finite = [](T x) { return std::isfinite(static_cast<double>(x)); };
    detail::require(finite(lr_lwc) && lr_lwc >= 0, "OmniQuant.lr_lwc = ", lr_lwc, " must be >= 0");
    detail::require(finite(lr_let) && lr_let >= 0, "OmniQuant.lr_let = ", lr_let, " must be >= 0");
    detail::require(batch_tokens >= 1, "OmniQuant.batch_tokens = ", batch_tokens, " must be >= 1");
    if (let_alpha)
      detail::require(*let_alpha >= 0 && *let_alpha <= 1, "OmniQuant.let_alpha = ", *let_alpha,
                      " is outside [0, 1]");
    detail::require(!(objective == OmniObjective::Hessian && activation),
                    "OmniQuant.objective = Hessian needs weight-only quantization (activation is set)");
  }
};

namespace detail {

inline constexpr double kClipLogitInit = 4.0;    // LWC logits start here: sigmoid(4) = 0.982
inline constexpr double kLetScaleFloor = 1e-2;   // |s| below this is reset to +-0.01
inline constexpr double kLetStatFloor = 1e-5;    // floor of max|X_j| and max|W_:,j| in the LET init

// Per-input-channel range of calibration activations (LET's initialisation).
template <class T>
struct ChannelStats {
  Vector<T> absmax, min, max;
  Index tokens = 0;

  void add(const Eigen::Ref<const Matrix<T>>& X) {
    if (X.rows() == 0) return;
    const Vector<T> batch_min = X.colwise().minCoeff().transpose(), batch_max = X.colwise().maxCoeff().transpose();
    if (tokens == 0) {
      min = batch_min;
      max = batch_max;
    } else {
      require(X.cols() == min.size(), "calibration batch has ", X.cols(), " columns, earlier ones ", min.size());
      min = min.cwiseMin(batch_min);
      max = max.cwiseMax(batch_max);
    }
    absmax = min.cwiseAbs().cwiseMax(max.cwiseAbs());
    tokens += X.rows();
  }
};

// H = sum_t x_t x_t^T, m = sum_t x_t, N: what the weight-only loss needs of the tokens.
template <class T>
struct HessianStats {
  Matrix<T> xtx;
  Vector<T> sum;
  Index tokens = 0;

  static HessianStats from(const Eigen::Ref<const Matrix<T>>& X) {
    HessianStats s;
    s.xtx = dense_product<T>(X.transpose(), X);
    s.sum = X.colwise().sum().transpose();
    s.tokens = X.rows();
    return s;
  }
};

// LET's starting point: s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) (both maxima floored
// at 1e-5, as the reference does) and, when activations are quantized, delta_j =
// (max X_j + min X_j) / 2, centring each channel's range for Q_a. Weight-only, the shift
// only acts as a learned bias correction (the error is E (x - delta)) and starts at 0:
// the mid-range start measurably hurt there (fixture W3A16g128: 0.154 -> 0.170 at init).
template <class T>
[[nodiscard]] InputTransform<T> initial_transform(const ChannelStats<T>& stats, const Eigen::Ref<const Matrix<T>>& W,
                                                  T alpha, bool centre) {
  require(stats.absmax.size() == W.cols(), "LET init: activation stats for ", stats.absmax.size(),
          " channels, W has ", W.cols());
  InputTransform<T> t;
  const T floor = static_cast<T>(kLetStatFloor);
  const Vector<T> weight_absmax =
      W.rows() > 0 ? Vector<T>(W.cwiseAbs().colwise().maxCoeff().transpose()) : Vector<T>::Zero(W.cols());
  t.scale.resize(W.cols());
  for (Index j = 0; j < W.cols(); ++j)
    t.scale(j) = std::pow(std::max(stats.absmax(j), floor), alpha) /
                 std::pow(std::max(weight_absmax(j), floor), T(1) - alpha);
  t.shift = centre ? Vector<T>((stats.max + stats.min) / T(2)) : Vector<T>::Zero(W.cols());
  return t;
}

// The reference's truncation: a scale of magnitude below 0.01 becomes +-0.01 (0 -> +0.01).
template <class T>
void clamp_scale(Vector<T>& scale) {
  const T floor = static_cast<T>(kLetScaleFloor);
  for (Index j = 0; j < scale.size(); ++j)
    if (std::abs(scale(j)) < floor) scale(j) = scale(j) < T(0) ? -floor : floor;
}

// sum_o A(o, j) * B(o, j) for [rows, cols] matrices: column blocks in parallel, each
// column summed over rows in order (same result for any thread count).
template <class T>
[[nodiscard]] Vector<T> column_dot(const Eigen::Ref<const Matrix<T>>& A, const Eigen::Ref<const Matrix<T>>& B) {
  constexpr Index kBlock = 256;
  Vector<T> out(A.cols());
  const Index blocks = (A.cols() + kBlock - 1) / kBlock;
  parallel_for(
      blocks,
      [&](Index blk) {
        const Index begin = blk * kBlock, width = std::min(A.cols() - begin, kBlock);
        T sums[kBlock] = {};  // a local accumulator, so the inner loop vectorizes
        for (Index o = 0; o < A.rows(); ++o) {
          const T* a = A.data() + o * A.outerStride() + begin;
          const T* b = B.data() + o * B.outerStride() + begin;
          for (Index j = 0; j < width; ++j) sums[j] += a[j] * b[j];
        }
        for (Index j = 0; j < width; ++j) out(begin + j) = sums[j];
      },
      A.size() >= (Index(1) << 16) ? 2 : blocks + 1);
  return out;
}

// Token order of each epoch: a Fisher-Yates shuffle driven by a seeded mt19937_64, so it
// is the same on every platform and for any thread count.
class EpochOrder {
 public:
  EpochOrder(Index tokens, std::uint64_t seed) : rng_(seed), order_(static_cast<std::size_t>(tokens)) {
    std::iota(order_.begin(), order_.end(), Index(0));
  }
  const std::vector<Index>& next() {
    for (std::size_t i = order_.size(); i > 1; --i) std::swap(order_[i - 1], order_[rng_() % i]);
    return order_;
  }

 private:
  std::mt19937_64 rng_;
  std::vector<Index> order_;
};

template <class T>
[[nodiscard]] Matrix<T> gather_rows(const Eigen::Ref<const Matrix<T>>& M, const Index* rows, Index count) {
  Matrix<T> out(count, M.cols());
  for (Index k = 0; k < count; ++k) out.row(k) = M.row(rows[k]);
  return out;
}

// One linear layer y = x W^T + b under OmniQuant training: its learnable parameters, their
// gradients and AdamW states, the fake-quantized forward and the hand-written backward.
template <class T>
class OmniLinear {
 public:
  struct Settings {
    QuantSpec weight{};
    std::optional<QuantSpec> activation{};
    bool lwc = true;
    bool let = true;
    T lr_lwc = T(1e-2);
    T lr_let = T(5e-3);
    SteRounding rounding = SteRounding::Nearest;  // Identity: the surrogate of the gradient checks
  };

  // Parameters (LWC logits [out, groups], empty without LWC; LET scale/shift [in], empty
  // without LET) and the gradients of the last backward() / hessian_loss().
  ClipLogits<T> clip, clip_grad;
  Vector<T> scale, shift, scale_grad, shift_grad;

  OmniLinear(const Eigen::Ref<const Matrix<T>>& W, const Vector<T>& bias, const Settings& settings)
      : W_(W), bias_(bias), settings_(settings),
        weight_fq_(settings.weight.bits, settings.weight.group_size, settings.rounding) {
    require(bias.size() == 0 || bias.size() == W.rows(), "bias size ", bias.size(), " != out_features ", W.rows());
    const Index groups = W.cols() == 0 ? 0 : weight_fq_.groups_per_row(W.cols());
    if (settings.lwc) {
      clip.upper = Matrix<T>::Constant(W.rows(), groups, static_cast<T>(kClipLogitInit));
      clip.lower = clip.upper;
      opt_upper_ = AdamW<T>(clip.upper.size(), {.lr = settings.lr_lwc});
      opt_lower_ = AdamW<T>(clip.lower.size(), {.lr = settings.lr_lwc});
    }
    if (settings.let) {
      scale = Vector<T>::Ones(W.cols());
      shift = Vector<T>::Zero(W.cols());
      opt_scale_ = AdamW<T>(W.cols(), {.lr = settings.lr_let});
      opt_shift_ = AdamW<T>(W.cols(), {.lr = settings.lr_let});
    }
    if (settings.activation)
      act_fq_ = GroupFakeQuantizer<T>(settings.activation->bits, settings.activation->group_size, settings.rounding);
  }

  [[nodiscard]] Index in_features() const { return W_.cols(); }
  [[nodiscard]] Index out_features() const { return W_.rows(); }
  [[nodiscard]] const Settings& settings() const { return settings_; }
  [[nodiscard]] const Matrix<T>& weight() const { return W_; }
  [[nodiscard]] const Vector<T>& bias() const { return bias_; }

  void set_transform(const InputTransform<T>& t) {
    require(settings_.let, "set_transform on a layer without LET");
    t.validate(in_features());
    scale = t.scale.size() ? t.scale : Vector<T>::Ones(in_features());
    shift = t.shift.size() ? t.shift : Vector<T>::Zero(in_features());
    clamp_scale(scale);
  }

  // The float layer: X W^T + b.
  [[nodiscard]] Matrix<T> reference(const Eigen::Ref<const Matrix<T>>& X) const {
    require(X.cols() == in_features(), "layer input has ", X.cols(), " columns, in_features is ", in_features());
    Matrix<T> Y = dense_product<T>(X, W_.transpose());
    if (bias_.size()) Y.rowwise() += bias_.transpose();
    return Y;
  }

  // Y = Q_a(X') Q_w(W')^T + b + W delta, [tokens, out]; keeps what backward() needs.
  void forward(const Eigen::Ref<const Matrix<T>>& X, Eigen::Ref<Matrix<T>> Y) {
    require(X.cols() == in_features(), "layer input has ", X.cols(), " columns, in_features is ", in_features());
    require(Y.rows() == X.rows() && Y.cols() == out_features(), "layer output shape ", Y.rows(), "x", Y.cols(),
            " != ", X.rows(), "x", out_features());
    quantize_weight();
    X_t_ = settings_.let ? transform().apply(X) : Matrix<T>(X);
    if (settings_.activation) {
      X_q_.resize(X_t_.rows(), X_t_.cols());
      act_fq_.forward(X_t_, X_q_);
    }
    dense_product<T>(quantized_input(), W_hat_.transpose(), Y);
    const Vector<T> bias = effective_bias();
    if (bias.size()) Y.rowwise() += bias.transpose();
    has_forward_ = true;
  }

  // From grad_Y = dL/dY of the last forward: the parameter gradients, and dL/dX into
  // *grad_X when not null.
  void backward(const Eigen::Ref<const Matrix<T>>& grad_Y, Matrix<T>* grad_X) {
    require(has_forward_, "backward() without a forward() on this layer");
    require(grad_Y.rows() == X_t_.rows() && grad_Y.cols() == out_features(), "grad_Y shape ", grad_Y.rows(), "x",
            grad_Y.cols(), " != ", X_t_.rows(), "x", out_features());
    has_forward_ = false;
    const Matrix<T>& X_q = quantized_input();
    const Matrix<T> grad_W_hat = dense_product<T>(grad_Y.transpose(), X_q);  // [out, in]
    const Vector<T> grad_Y_sum = grad_Y.colwise().sum().transpose();
    // dL/dX' is needed for the caller, or for LET behind activation quantization.
    const bool input_grad = grad_X || (settings_.let && settings_.activation);
    Matrix<T> grad_X_t;
    if (input_grad) {
      Matrix<T> grad_X_q = dense_product<T>(grad_Y, W_hat_);  // [tokens, in]
      if (settings_.activation) act_fq_.backward(X_t_, grad_X_q, &grad_X_t, nullptr);
      else grad_X_t = std::move(grad_X_q);
    }
    Matrix<T> grad_W_scaled;
    weight_fq_.backward(weight_scaled(), grad_W_hat, settings_.let ? &grad_W_scaled : nullptr,
                        settings_.lwc ? &clip_grad : nullptr);
    if (settings_.let) {
      // W' = W diag(s): dL/ds_j += sum_o dL/dW'_oj W_oj. b' = b + W delta: dL/ddelta += W^T sum_t dL/dy_t.
      scale_grad = column_dot<T>(grad_W_scaled, W_);
      shift_grad.noalias() = W_.transpose() * grad_Y_sum;
      // X' = (X - delta) / s: dL/ds_j -= sum_t dL/dX'_tj X'_tj / s_j, dL/ddelta_j -= sum_t dL/dX'_tj / s_j.
      Vector<T> grad_dot_input, grad_sum;
      if (input_grad) {
        grad_dot_input = column_dot<T>(grad_X_t, X_t_);
        grad_sum = grad_X_t.colwise().sum().transpose();
      } else {
        // Weight-only, dL/dX' = dL/dY W_hat, so without forming it:
        // sum_t dL/dX'_tj X'_tj = sum_o W_hat_oj dL/dW_hat_oj and sum_t dL/dX'_tj = (W_hat^T sum_t dL/dy_t)_j.
        grad_dot_input = column_dot<T>(W_hat_, grad_W_hat);
        grad_sum.noalias() = W_hat_.transpose() * grad_Y_sum;
      }
      scale_grad.array() -= grad_dot_input.array() / scale.array();
      shift_grad.array() -= grad_sum.array() / scale.array();
    }
    if (grad_X) {
      *grad_X = std::move(grad_X_t);
      if (settings_.let) grad_X->array().rowwise() /= scale.transpose().array();
    }
    has_gradient_ = true;
  }

  // Weight-only exact loss over the tokens summarized by `stats` (bias cancels):
  // tr(E H_delta E^T), E = Q_w(W S) S^-1 - W. Fills the parameter gradients; returns the loss.
  double hessian_loss(const HessianStats<T>& stats) {
    require(!settings_.activation, "the Hessian objective is exact only without activation quantization");
    require(stats.xtx.rows() == in_features() && stats.xtx.cols() == in_features() &&
                stats.sum.size() == in_features(),
            "Hessian stats are for ", stats.xtx.rows(), " channels, the layer has ", in_features());
    quantize_weight();
    Matrix<T> E = W_hat_;
    if (settings_.let) E.array().rowwise() /= scale.transpose().array();
    E -= W_;
    Matrix<T> EH = dense_product<T>(E, stats.xtx);
    const T N = static_cast<T>(stats.tokens);
    Vector<T> E_offset;  // E (m - N delta): the shift's term, sum_t E (x_t - delta) = E (m - N delta)
    if (settings_.let) {
      // E H_delta = E H - (E m) delta^T - (E delta) m^T + N (E delta) delta^T
      //           = E H - (E m) delta^T + (E delta) (N delta - m)^T
      const Vector<T> Em = E * stats.sum, Ed = E * shift;
      const Vector<T> centred = N * shift - stats.sum;
      EH.noalias() -= Em * shift.transpose();
      EH.noalias() += Ed * centred.transpose();
      E_offset = Em - N * Ed;
    }
    const double loss = static_cast<double>((E.array() * EH.array()).sum());
    Matrix<T> grad_W_hat = T(2) * EH;  // dL/dE = 2 E H_delta (H_delta symmetric)
    if (settings_.let) grad_W_hat.array().rowwise() /= scale.transpose().array();
    Matrix<T> grad_W_scaled;
    weight_fq_.backward(weight_scaled(), grad_W_hat, settings_.let ? &grad_W_scaled : nullptr,
                        settings_.lwc ? &clip_grad : nullptr);
    if (settings_.let) {
      // E = W_hat S^-1 - W: dL/ds_j = sum_o dL/dW'_oj W_oj - (1/s_j) sum_o dL/dW_hat_oj W_hat_oj.
      scale_grad = column_dot<T>(grad_W_scaled, W_);
      scale_grad.array() -= column_dot<T>(grad_W_hat, W_hat_).array() / scale.array();
      // d/ddelta tr(E H_delta E^T) = -2 E^T E (m - N delta).
      shift_grad.noalias() = T(-2) * (E.transpose() * E_offset);
    }
    has_gradient_ = true;
    return loss;
  }

  // One AdamW step on every learnable tensor from the last gradients, then LET's clamp.
  void step() {
    if (!has_gradient_) return;
    if (settings_.lwc) {
      opt_upper_.step(clip.upper, clip_grad.upper);
      opt_lower_.step(clip.lower, clip_grad.lower);
    }
    if (settings_.let) {
      opt_scale_.step(scale, scale_grad);
      opt_shift_.step(shift, shift_grad);
      clamp_scale(scale);
    }
    has_gradient_ = false;
  }

  // The packed layer the current parameters define. Codes are recomputed from the stored
  // (possibly fp16-rounded) scale, so decoding reproduces them exactly.
  [[nodiscard]] QuantizedLayer<T> export_layer(TrainingHistory history) const {
    const QuantSpec& spec = settings_.weight;
    const Matrix<T> W_scaled = settings_.let ? transform().fold_weight(W_) : W_;
    GroupFakeQuantizer<T> fq(spec.bits, spec.group_size, SteRounding::Nearest);
    Matrix<T> unused(W_scaled.rows(), W_scaled.cols());
    fq.forward(W_scaled, unused, settings_.lwc ? &clip : nullptr);
    QuantizedLayer<T> layer;
    layer.weights = QuantizedMatrix<T>(out_features(), in_features(), spec);
    auto scales = layer.weights.mutable_scales();
    auto zeros = layer.weights.mutable_zeros();
    const Index length = layer.weights.group_length(), groups = layer.weights.groups_per_row();
    const int max_code = spec.max_code();
    parallel_for(out_features(), [&](Index r) {
      thread_local std::vector<std::uint8_t> codes;
      codes.resize(static_cast<std::size_t>(in_features()));
      for (Index g = 0; g < groups; ++g) {
        scales(r, g) = round_param(static_cast<float>(fq.steps()(r, g)), spec.param_type);
        zeros(r, g) = static_cast<float>(fq.zeros()(r, g));  // an integer in [0, 2^N - 1]: exact in fp16 too
        const T step = static_cast<T>(scales(r, g)), zero = static_cast<T>(zeros(r, g));
        for (Index j = g * length; j < std::min(in_features(), (g + 1) * length); ++j)
          codes[static_cast<std::size_t>(j)] = GroupFakeQuantizer<T>::code(W_scaled(r, j), step, zero, max_code);
      }
      layer.weights.set_stored_row(r, codes.data());
    });
    if (settings_.let) layer.input_transform = transform();
    if (settings_.let || bias_.size()) layer.bias = effective_bias();
    layer.activation = settings_.activation;
    layer.history = std::move(history);
    return layer;
  }

 private:
  [[nodiscard]] InputTransform<T> transform() const { return InputTransform<T>{scale, shift}; }
  [[nodiscard]] const Matrix<T>& weight_scaled() const { return settings_.let ? W_scaled_ : W_; }
  [[nodiscard]] const Matrix<T>& quantized_input() const { return settings_.activation ? X_q_ : X_t_; }

  // b + W delta (empty when there is neither).
  [[nodiscard]] Vector<T> effective_bias() const {
    if (!settings_.let) return bias_;
    return transform().fold_bias(W_, bias_);
  }

  // W' = W diag(s) and W_hat = Q_w(W') for the current parameters.
  void quantize_weight() {
    if (settings_.let) {
      W_scaled_.resize(W_.rows(), W_.cols());
      parallel_for(
          W_.rows(), [&](Index r) { W_scaled_.row(r) = W_.row(r).cwiseProduct(scale.transpose()); },
          W_.size() >= (Index(1) << 16) ? 2 : W_.rows() + 1);
    }
    W_hat_.resize(W_.rows(), W_.cols());
    weight_fq_.forward(weight_scaled(), W_hat_, settings_.lwc ? &clip : nullptr);
  }

  Matrix<T> W_;
  Vector<T> bias_;
  Settings settings_;
  GroupFakeQuantizer<T> weight_fq_, act_fq_;
  Matrix<T> W_scaled_, W_hat_, X_t_, X_q_;
  bool has_forward_ = false, has_gradient_ = false;
  AdamW<T> opt_upper_, opt_lower_, opt_scale_, opt_shift_;
};

template <class T>
[[nodiscard]] typename OmniLinear<T>::Settings omni_settings(const OmniQuantOptions<T>& o, bool let) {
  return {.weight = o.weight, .activation = o.activation, .lwc = o.lwc, .let = let, .lr_lwc = o.lr_lwc,
          .lr_let = o.lr_let, .rounding = SteRounding::Nearest};
}

inline void require_finite_loss(double loss, int epoch) {
  require(std::isfinite(loss), "OmniQuant: training loss is ", loss, " in epoch ", epoch);
}

}  // namespace detail

// Layer-wise OmniQuant: calibrate() with the layer's input activations, then quantize()
// each weight matrix that reads them (q/k/v projections can share one calibration).
template <class T = float>
class OmniQuant {
 public:
  using Options = OmniQuantOptions<T>;

  explicit OmniQuant(Options options) : options_(std::move(options)) { options_.validate(); }

  [[nodiscard]] const Options& options() const { return options_; }
  [[nodiscard]] Index tokens() const { return X_.rows(); }
  [[nodiscard]] Index in_features() const { return X_.cols(); }

  // Adds calibration tokens X [tokens, in]; calls accumulate.
  void calibrate(const Eigen::Ref<const Matrix<T>>& X) {
    detail::require_finite(X, "X");
    detail::require(X.cols() > 0, "calibrate: X has no columns");
    detail::require(tokens() == 0 || X.cols() == in_features(), "calibrate: X has ", X.cols(),
                    " columns, earlier batches ", in_features());
    const Index old = tokens();
    X_.conservativeResize(old + X.rows(), X.cols());
    X_.bottomRows(X.rows()) = X;
    stats_.add(X);
    hessian_.reset();
  }

  // True when quantize() will train on the Hessian objective.
  [[nodiscard]] bool uses_hessian() const {
    if (options_.activation) return false;
    if (options_.objective != OmniObjective::Auto) return options_.objective == OmniObjective::Hessian;
    return in_features() <= 2 * std::min(options_.batch_tokens, std::max<Index>(tokens(), 1));
  }

  [[nodiscard]] QuantizedLayer<T> quantize(const Eigen::Ref<const Matrix<T>>& W) { return quantize(W, Vector<T>()); }

  // W [out, in] with bias b [out] (empty: none). The returned layer's forward() is the
  // quantized layer; its history holds the training loss per epoch (mean squared output
  // error per element).
  [[nodiscard]] QuantizedLayer<T> quantize(const Eigen::Ref<const Matrix<T>>& W, const Eigen::Ref<const Vector<T>>& bias) {
    detail::require(tokens() > 0, "OmniQuant.quantize: call calibrate() with activations first");
    detail::require(W.cols() == in_features(), "OmniQuant.quantize: W has ", W.cols(),
                    " columns, the calibration activations ", in_features());
    detail::require_finite(W, "W");
    detail::require(bias.size() == 0 || bias.size() == W.rows(), "OmniQuant.quantize: bias size ", bias.size(),
                    " != out_features ", W.rows());
    detail::require_finite(bias, "bias");
    const Options& o = options_;
    detail::OmniLinear<T> layer(W, Vector<T>(bias), detail::omni_settings(o, o.let));
    if (o.let) layer.set_transform(detail::initial_transform<T>(stats_, W, o.alpha(), o.activation.has_value()));
    TrainingHistory history;
    if ((o.lwc || o.let) && o.epochs > 0 && W.rows() > 0) {
      if (uses_hessian()) train_hessian(layer, history);
      else train_tokens(layer, history);
    }
    return layer.export_layer(std::move(history));
  }

  template <RowMajorTensor2 Tensor>
  void calibrate(const Tensor& X) { calibrate(as_matrix(X)); }
  template <RowMajorTensor2 Tensor>
  [[nodiscard]] QuantizedLayer<T> quantize(const Tensor& W) { return quantize(as_matrix(W)); }

 private:
  [[nodiscard]] Index steps_per_epoch() const { return (tokens() + options_.batch_tokens - 1) / options_.batch_tokens; }

  void finish_epoch(int epoch, double loss, TrainingHistory& history) const {
    detail::require_finite_loss(loss, epoch);
    history.loss.push_back(loss);
    if (options_.progress) options_.progress(epoch, loss);
  }

  void train_hessian(detail::OmniLinear<T>& layer, TrainingHistory& history) {
    if (!hessian_) hessian_ = detail::HessianStats<T>::from(X_);
    const double elements = static_cast<double>(tokens()) * static_cast<double>(layer.out_features());
    const Index steps = steps_per_epoch();
    for (int epoch = 1; epoch <= options_.epochs; ++epoch) {
      double total = 0;
      for (Index s = 0; s < steps; ++s) {
        const double loss = layer.hessian_loss(*hessian_);
        detail::require_finite_loss(loss, epoch);
        total += loss;
        layer.step();
      }
      finish_epoch(epoch, total / static_cast<double>(steps) / elements, history);
    }
  }

  void train_tokens(detail::OmniLinear<T>& layer, TrainingHistory& history) {
    const Matrix<T> target = layer.reference(X_);
    const double elements = static_cast<double>(tokens()) * static_cast<double>(layer.out_features());
    detail::EpochOrder order(tokens(), options_.seed);
    Matrix<T> output;
    for (int epoch = 1; epoch <= options_.epochs; ++epoch) {
      const std::vector<Index>& tokens_order = order.next();
      double total = 0;
      for (Index begin = 0; begin < tokens(); begin += options_.batch_tokens) {
        const Index count = std::min(options_.batch_tokens, tokens() - begin);
        const Matrix<T> X = detail::gather_rows<T>(X_, tokens_order.data() + begin, count);
        output.resize(count, layer.out_features());
        layer.forward(X, output);
        output -= detail::gather_rows<T>(target, tokens_order.data() + begin, count);  // E = Y_hat - Y
        const double loss = static_cast<double>(output.squaredNorm());
        detail::require_finite_loss(loss, epoch);
        total += loss;
        layer.backward(T(2) * output, nullptr);
        layer.step();
      }
      finish_epoch(epoch, total / elements, history);
    }
  }

  Options options_;
  Matrix<T> X_;
  detail::ChannelStats<T> stats_;
  std::optional<detail::HessianStats<T>> hessian_;
};

// Block-wise OmniQuant: several linear layers trained together on the block's output
// error (the reference's setting: a transformer block at a time). The caller owns the
// block's structure (nonlinearities, residuals, the loss); lowbit owns the parameters,
// the fake quantizers with STE and the optimizer. Each step hands the caller a Pass:
//
//   block.add_layer(W_up, b_up);  block.add_layer(W_down, b_down);
//   block.train(X, [&](auto& pass) {
//     const auto& X = pass.input();
//     Matrix Y = pass.reference(1, act(pass.reference(0, X)));        // float target
//     Matrix U = pass.forward(0, X), A = act(U), Y_hat = pass.forward(1, A);
//     Matrix E = Y_hat - Y;
//     Matrix dA = pass.backward(1, 2 * E);
//     pass.backward(0, act_backward(U, dA), false);                   // no dL/dX needed
//     return E.squaredNorm();
//   });
//
// Before training, when any layer uses LET, every batch is run once with
// pass.calibrating() true: forward() is then the float layer and records the statistics
// of its input that initialise LET, and backward() returns zeros.
template <class T = float>
class OmniQuantBlock {
 public:
  using Options = OmniQuantOptions<T>;

  class Pass {
   public:
    // The mini-batch of block inputs and their rows in train()'s X.
    [[nodiscard]] const Matrix<T>& input() const { return input_; }
    [[nodiscard]] const std::vector<Index>& tokens() const { return tokens_; }
    [[nodiscard]] bool calibrating() const { return calibrating_; }

    // The float layer: X W^T + b.
    [[nodiscard]] Matrix<T> reference(Index layer, const Eigen::Ref<const Matrix<T>>& X) const {
      return block_->at(layer).reference(X);
    }

    // The quantized layer with STE: Q_a(X') Q_w(W')^T + b + W delta. A second forward of the
    // same layer in one pass replaces the first for backward().
    [[nodiscard]] Matrix<T> forward(Index layer, const Eigen::Ref<const Matrix<T>>& X) {
      detail::OmniLinear<T>& l = block_->at(layer);
      if (calibrating_) {
        block_->stats_[static_cast<std::size_t>(layer)].add(X);
        return l.reference(X);
      }
      Matrix<T> Y(X.rows(), l.out_features());
      l.forward(X, Y);
      return Y;
    }

    // From dL/dY of the layer's forward: stores the parameter gradients (applied after the
    // step callback returns) and returns dL/dX (an empty matrix if !input_gradient).
    Matrix<T> backward(Index layer, const Eigen::Ref<const Matrix<T>>& grad_Y, bool input_gradient = true) {
      detail::OmniLinear<T>& l = block_->at(layer);
      detail::require_finite(grad_Y, "grad_Y");
      if (calibrating_) return input_gradient ? Matrix<T>::Zero(grad_Y.rows(), l.in_features()) : Matrix<T>();
      Matrix<T> grad_X;
      l.backward(grad_Y, input_gradient ? &grad_X : nullptr);
      return grad_X;
    }

   private:
    friend class OmniQuantBlock;
    Pass(OmniQuantBlock* block, Matrix<T> input, std::vector<Index> tokens, bool calibrating)
        : block_(block), input_(std::move(input)), tokens_(std::move(tokens)), calibrating_(calibrating) {}
    OmniQuantBlock* block_;
    Matrix<T> input_;
    std::vector<Index> tokens_;
    bool calibrating_;
  };

  // Runs one mini-batch; returns the loss it differentiated (history() averages it).
  using Step = std::function<double(Pass&)>;

  explicit OmniQuantBlock(Options options) : options_(std::move(options)) {
    options_.validate();
    detail::require(options_.objective != OmniObjective::Hessian,
                    "OmniQuantBlock trains on tokens: objective Hessian is for the layer-wise OmniQuant");
  }

  [[nodiscard]] const Options& options() const { return options_; }

  // Adds the block's linear layer y = x W^T + b (bias empty: none); returns its index.
  // `let` overrides Options::let for this layer (e.g. off where no transform is wanted).
  Index add_layer(const Eigen::Ref<const Matrix<T>>& W, const Vector<T>& bias = Vector<T>(),
                  std::optional<bool> let = std::nullopt) {
    detail::require_finite(W, "W");
    detail::require_finite(bias, "bias");
    detail::require(W.rows() > 0 && W.cols() > 0, "add_layer: W is empty (", W.rows(), "x", W.cols(), ")");
    layers_.emplace_back(W, bias, detail::omni_settings(options_, let.value_or(options_.let)));
    stats_.emplace_back();
    return static_cast<Index>(layers_.size()) - 1;
  }

  [[nodiscard]] Index layers() const { return static_cast<Index>(layers_.size()); }
  [[nodiscard]] const TrainingHistory& history() const { return history_; }

  // Trains on the block inputs X [tokens, features]: options().epochs passes over X in
  // mini-batches of batch_tokens, in a seeded order. history() holds the mean of step's
  // returned losses per epoch.
  void train(const Eigen::Ref<const Matrix<T>>& X, const Step& step) {
    detail::require(!layers_.empty(), "OmniQuantBlock.train: add_layer() first");
    detail::require(X.rows() > 0, "OmniQuantBlock.train: X has no tokens");
    detail::require_finite(X, "X");
    detail::require(static_cast<bool>(step), "OmniQuantBlock.train: step callback is empty");
    const Index tokens = X.rows(), batch = options_.batch_tokens;
    bool any_let = false;
    for (const auto& l : layers_) any_let = any_let || l.settings().let;
    if (any_let) {
      for (auto& s : stats_) s = {};
      for (Index begin = 0; begin < tokens; begin += batch) {
        const Index count = std::min(batch, tokens - begin);
        std::vector<Index> rows(static_cast<std::size_t>(count));
        std::iota(rows.begin(), rows.end(), begin);
        Pass pass(this, Matrix<T>(X.middleRows(begin, count)), std::move(rows), true);
        (void)step(pass);
      }
      for (std::size_t i = 0; i < layers_.size(); ++i) {
        if (!layers_[i].settings().let) continue;
        detail::require(stats_[i].tokens > 0, "OmniQuantBlock: layer ", i,
                        " uses LET but the step callback never ran its forward()");
        layers_[i].set_transform(
            detail::initial_transform<T>(stats_[i], layers_[i].weight(), options_.alpha(), options_.activation.has_value()));
      }
    }
    if (!(options_.lwc || any_let)) return;
    detail::EpochOrder order(tokens, options_.seed);
    for (int epoch = 1; epoch <= options_.epochs; ++epoch) {
      const std::vector<Index>& tokens_order = order.next();
      double total = 0;
      Index steps = 0;
      for (Index begin = 0; begin < tokens; begin += batch) {
        const Index count = std::min(batch, tokens - begin);
        std::vector<Index> rows(tokens_order.begin() + begin, tokens_order.begin() + begin + count);
        Matrix<T> input = detail::gather_rows<T>(X, rows.data(), count);
        Pass pass(this, std::move(input), std::move(rows), false);
        const double loss = step(pass);
        detail::require_finite_loss(loss, epoch);
        total += loss;
        ++steps;
        for (auto& l : layers_) l.step();
      }
      const double mean = total / static_cast<double>(steps);
      history_.loss.push_back(mean);
      if (options_.progress) options_.progress(epoch, mean);
    }
  }

  // Layer i as trained so far (packed weights, transform, activation spec, bias).
  [[nodiscard]] QuantizedLayer<T> layer(Index i) const { return at(i).export_layer(history_); }

 private:
  [[nodiscard]] detail::OmniLinear<T>& at(Index i) {
    detail::require(i >= 0 && i < layers(), "layer index ", i, " is outside [0, ", layers(), ")");
    return layers_[static_cast<std::size_t>(i)];
  }
  [[nodiscard]] const detail::OmniLinear<T>& at(Index i) const {
    detail::require(i >= 0 && i < layers(), "layer index ", i, " is outside [0, ", layers(), ")");
    return layers_[static_cast<std::size_t>(i)];
  }

  Options options_;
  std::vector<detail::OmniLinear<T>> layers_;
  std::vector<detail::ChannelStats<T>> stats_;
  TrainingHistory history_;
};

}  // namespace lowbit

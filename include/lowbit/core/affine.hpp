// Affine group quantization: fitting (scale, zero) to a group and encoding it.
//
//   q = clamp(round_half_even(w / scale + zero), 0, 2^bits - 1),   w_hat = (q - zero) * scale
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "lowbit/core/spec.hpp"

namespace lowbit {

struct GroupParams {
  float scale = 1.0f;
  float zero = 0.0f;
};

namespace detail {

// Round half to even: nearbyint under the default rounding mode, which lowbit never
// changes. std::round would round half away from zero.
template <class T>
[[nodiscard]] inline T round_half_even(T x) { return std::nearbyint(x); }

template <class T>
[[nodiscard]] inline std::uint8_t encode(T w, T scale, T zero, int max_code) {
  const T q = round_half_even(w / scale + zero);
  // Written so that NaN (0/0 from a zero scale) lands on code 0, never on a bad cast.
  return static_cast<std::uint8_t>(q >= T(0) ? std::min(q, static_cast<T>(max_code)) : T(0));
}

template <class T>
[[nodiscard]] inline T decode(int q, T scale, T zero) { return (static_cast<T>(q) - zero) * scale; }

template <class T>
void encode_group(const T* w, Index n, GroupParams p, int max_code, std::uint8_t* codes) {
  const T scale = static_cast<T>(p.scale), zero = static_cast<T>(p.zero);
  for (Index i = 0; i < n; ++i) codes[i] = encode(w[i], scale, zero, max_code);
}

// Sum of |w - w_hat|^norm over a group: the MSE search's objective.
template <class T>
[[nodiscard]] double group_error(const T* w, Index n, GroupParams p, int max_code, double norm) {
  const T scale = static_cast<T>(p.scale), zero = static_cast<T>(p.zero);
  double total = 0;
  for (Index i = 0; i < n; ++i) {
    const double e = std::abs(static_cast<double>(decode(encode(w[i], scale, zero, max_code), scale, zero) - w[i]));
    total += norm == 2.0 ? e * e : std::pow(e, norm);
  }
  return total;
}

// Smallest positive scale a group can store: fp16's smallest subnormal (2^-24) or
// float's; a smaller one would round to 0 when stored.
[[nodiscard]] inline float min_scale(const QuantSpec& spec) {
  return spec.param_type == ParamType::Float16 ? 0x1p-24f : std::numeric_limits<float>::denorm_min();
}

// Parameters for the range [lo, hi] (lo <= 0 <= hi when the zero must be a code).
template <class T>
[[nodiscard]] GroupParams params_for_range(T lo, T hi, const QuantSpec& spec) {
  const int max_code = spec.max_code();
  GroupParams p;
  if (spec.symmetric) {
    // Codes centred on 2^(bits-1): the range [-amax, amax] spans max_code steps.
    const T amax = std::max(std::abs(lo), std::abs(hi));
    p.zero = static_cast<float>(1 << (spec.bits - 1));
    p.scale = amax > 0 ? std::max(static_cast<float>(2 * amax / max_code), min_scale(spec)) : 1.0f;
    if (spec.bits == 1) p.scale = amax > 0 ? std::max(static_cast<float>(amax), min_scale(spec)) : 1.0f;
    return p;
  }
  const T range = hi - lo;
  if (!(range > 0)) return p;  // all-zero group: scale 1, zero 0 decodes it exactly
  // A denormal range divided by max_code can underflow to 0 (then zero = -lo / 0 is NaN):
  // use the smallest scale the parameter type stores instead.
  p.scale = std::max(static_cast<float>(range / max_code), min_scale(spec));
  const T zero = -lo / static_cast<T>(p.scale);
  p.zero = static_cast<float>(spec.integral_zero ? round_half_even(zero) : zero);
  return p;
}

}  // namespace detail

// Min-max fit of one group. Asymmetric: the group's [min, max] onto codes [0, 2^b-1].
// With an integral zero (or a group too narrow to resolve, range <= 1e-6 * max|w|)
// the range is widened to contain 0, as GPTQ does, so the zero is an exact code and a
// constant group decodes exactly. Symmetric: [-max|w|, max|w|] with zero 2^(b-1).
template <class T>
[[nodiscard]] GroupParams fit_minmax(const T* w, Index n, const QuantSpec& spec) {
  T lo = std::numeric_limits<T>::infinity(), hi = -lo;
  for (Index i = 0; i < n; ++i) { lo = std::min(lo, w[i]); hi = std::max(hi, w[i]); }
  if (n == 0) lo = hi = 0;
  const T amax = std::max(std::abs(lo), std::abs(hi));
  if (spec.integral_zero || spec.symmetric || hi - lo <= amax * T(1e-6)) {
    lo = std::min(lo, T(0));
    hi = std::max(hi, T(0));
  }
  return detail::params_for_range(lo, hi, spec);
}

// GPTQ's MSE clipping search: shrink the min-max range by p = 1 - i/grid for
// i < max_shrink*grid and keep the p minimizing sum |w - w_hat|^norm.
template <class T>
[[nodiscard]] GroupParams fit_mse(const T* w, Index n, const QuantSpec& spec, int grid = 100,
                                  double max_shrink = 0.8, double norm = 2.4) {
  GroupParams best = fit_minmax(w, n, spec);
  T lo = std::numeric_limits<T>::infinity(), hi = -lo;
  for (Index i = 0; i < n; ++i) { lo = std::min(lo, w[i]); hi = std::max(hi, w[i]); }
  if (n == 0 || !(hi > lo)) return best;
  if (spec.integral_zero || spec.symmetric) { lo = std::min(lo, T(0)); hi = std::max(hi, T(0)); }
  double best_error = detail::group_error(w, n, best, spec.max_code(), norm);
  for (int i = 1; i < static_cast<int>(max_shrink * grid); ++i) {
    const T shrink = T(1) - static_cast<T>(i) / static_cast<T>(grid);
    const GroupParams candidate = detail::params_for_range(shrink * lo, shrink * hi, spec);
    const double error = detail::group_error(w, n, candidate, spec.max_code(), norm);
    if (error < best_error) { best_error = error; best = candidate; }
  }
  return best;
}

}  // namespace lowbit

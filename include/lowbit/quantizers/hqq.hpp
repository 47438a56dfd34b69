// HQQ: half-quadratic quantization (Badri & Shaji, 2023), calibration-free.
//
// Per group, HQQ fixes the inverse scale s = (2^b - 1) / (max - min) and fits the zero z
// to minimize the lp error sum |W - (W_q - z) / s|^p (p < 1, robust to outliers) by a
// half-quadratic splitting: alternate W_e = shrink_p(W - W_r) (the proximal step of the
// lp term, hqq_kernel.hpp) and z = mean(W_q - (W - W_e) s), with the penalty beta
// growing by kappa each step.
//
// Variant::Reference reproduces mobiusml/hqq's legacy solver (v0.2.8,
// optimize_weights_proximal_legacy): s guarded to 1 where max - min <= 1e-4 and capped
// at 2e4, z = -min * s (rounded when round_zero), one early stop for the whole matrix
// once the mean |W - W_r| stops falling, keeping the zero of that last step.
// Variant::Improved (ours) judges each group alone, keeps the zero with the lowest
// squared error, stops a group after `patience` steps without improvement, and can also
// try a few larger inverse scales (clipping the range) per group.
//
// Work is group-batched: a batch holds one group per SIMD lane and runs all its steps in
// registers/L1 (hqq_ops.hpp), in parallel over blocks of rows. Results do not depend on
// the thread count or the ISA.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "lowbit/core/affine.hpp"
#include "lowbit/core/error.hpp"
#include "lowbit/core/isa.hpp"
#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/core/tensor.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/quantizers/hqq_ops.hpp"

namespace lowbit {

enum class HqqVariant { Reference, Improved };

template <class T = float>
class HQQ {
 public:
  using Variant = HqqVariant;

  struct Options {
    QuantSpec spec{};
    T lp_norm = T(0.7);  // p of the lp error, in (0, 1]
    T beta = T(10);      // initial half-quadratic penalty
    T kappa = T(1.01);   // beta *= kappa after each step
    int iters = 20;      // proximal steps (0: HQQ's min-max start, RTN with a float zero)
    bool early_stop = true;
    Variant variant = Variant::Reference;
    // Round the starting zero to an integer; unset: HQQ's default, on for 4-bit only.
    std::optional<bool> round_zero{};
    // Improved only: steps without improvement before a group stops.
    int patience = 2;
    // Improved only: also try inverse scales s * (1 + k * scale_step), k = 1..scale_steps,
    // each started from the range's centre, and keep the best per group.
    int scale_steps = 8;
    T scale_step = T(0.05);
  };

  explicit HQQ(Options options) : options_(std::move(options)) {
    const Options& o = options_;
    o.spec.validate();
    detail::require(!o.spec.symmetric, "HQQ: QuantSpec.symmetric = true is not supported (HQQ fits the zero)");
    detail::require(o.lp_norm > 0 && o.lp_norm <= 1, "HQQ.lp_norm = ", o.lp_norm, " is outside (0, 1]");
    detail::require(o.beta > 0 && std::isfinite(static_cast<double>(o.beta)), "HQQ.beta = ", o.beta,
                    " must be positive and finite");
    detail::require(o.kappa >= 1 && std::isfinite(static_cast<double>(o.kappa)), "HQQ.kappa = ", o.kappa,
                    " must be >= 1 and finite");
    detail::require(o.iters >= 0 && o.iters <= 100000, "HQQ.iters = ", o.iters, " is outside 0..100000");
    detail::require(o.patience >= 1, "HQQ.patience = ", o.patience, " must be >= 1");
    detail::require(o.scale_steps >= 0 && o.scale_steps <= 1000, "HQQ.scale_steps = ", o.scale_steps,
                    " is outside 0..1000");
    detail::require(o.scale_step > 0 && std::isfinite(static_cast<double>(o.scale_step)), "HQQ.scale_step = ",
                    o.scale_step, " must be positive and finite");
    detail::require(std::isfinite(static_cast<double>(o.beta) * std::pow(static_cast<double>(o.kappa), o.iters)),
                    "HQQ.beta * kappa^iters overflows (beta = ", o.beta, ", kappa = ", o.kappa, ", iters = ",
                    o.iters, ")");
  }

  [[nodiscard]] const Options& options() const { return options_; }

  [[nodiscard]] QuantizedMatrix<T> quantize(const Eigen::Ref<const Matrix<T>>& W) const;

  template <RowMajorTensor2 Tensor>
  [[nodiscard]] QuantizedMatrix<T> quantize(const Tensor& W) const { return quantize(as_matrix(W)); }

 private:
  Options options_;
};

namespace detail {

// What the solver needs from Options, resolved once.
template <class T>
struct HqqSetup {
  HqqVariant variant;
  T max_code;
  bool round_zero;
  T p_minus_1;
  int iters;
  bool early_stop;
  int patience;
  int scale_steps;
  T scale_step;
  std::vector<T> inv_beta;  // 1 / (beta kappa^i), i < iters; beta grows in double, as in HQQ
  std::vector<T> tau;       // (1 / beta_i)^(1 / (2 - p)): the shrink is 0 for |residual| <= tau
};

template <class T>
[[nodiscard]] HqqSetup<T> hqq_setup(const typename HQQ<T>::Options& o) {
  HqqSetup<T> setup{o.variant, static_cast<T>(o.spec.max_code()), o.round_zero.value_or(o.spec.bits == 4),
                    o.lp_norm - T(1), o.iters, o.early_stop, o.patience, o.scale_steps, o.scale_step, {}, {}};
  double beta = static_cast<double>(o.beta);
  for (int i = 0; i < o.iters; ++i, beta *= static_cast<double>(o.kappa)) {
    setup.inv_beta.push_back(static_cast<T>(1.0 / beta));
    setup.tau.push_back(static_cast<T>(std::pow(1.0 / beta, 1.0 / (2.0 - static_cast<double>(o.lp_norm)))));
  }
  return setup;
}

// HQQ's starting point for a group with range [lo, hi]: inverse scale
// s = max_code / (hi - lo), 1 where hi - lo <= 1e-4 (no tiny denominators), at most 2e4
// (1/s stays an fp16 normal); zero = -lo * s, rounded when round_zero.
template <class T>
void hqq_start(T lo, T hi, const HqqSetup<T>& setup, T& inverse_scale, T& zero) {
  const T range = hi - lo;
  inverse_scale = range <= T(1e-4) ? T(1) : std::min(setup.max_code / range, T(2e4));
  zero = -lo * inverse_scale;
  if (setup.round_zero) zero = round_half_even(zero);
}

// HQQ's legacy early stop: the first step whose mean |W - W_r| (a float, as torch
// reports it) is not below the best so far ends the loop after its update, so that
// step's new zero is kept. Returns the number of steps to run.
[[nodiscard]] inline int hqq_stop_step(const std::vector<double>& sum_abs_error, double count, int iters) {
  double best = 1e4;
  for (int i = 0; i < iters; ++i) {
    const double error = static_cast<float>(sum_abs_error[static_cast<std::size_t>(i)] / count);
    if (error < best) best = error;
    else return i + 1;
  }
  return iters;
}

// Fits every lane of a batch: w is [n][lanes], interleaved. Reference runs `steps`
// steps (l1: [steps][lanes] error sums, or null); Improved runs its own search.
// inverse_scale and zero receive the result per lane.
template <class T>
void hqq_solve_batch(const hqq::Kernels<T>& kernels, const T* w, Index n, const HqqSetup<T>& setup, int steps,
                     T* inverse_scale, T* zero, T* l1) {
  constexpr int kMaxLanes = hqq::kMaxLanes;
  const int lanes = kernels.lanes;
  T lo[kMaxLanes], hi[kMaxLanes];
  kernels.range(w, n, lo, hi);
  T scale[kMaxLanes];
  for (int l = 0; l < lanes; ++l) {
    hqq_start(lo[l], hi[l], setup, inverse_scale[l], zero[l]);
    scale[l] = T(1) / inverse_scale[l];
  }
  const T p = setup.p_minus_1, top = setup.max_code;
  if (setup.variant == HqqVariant::Reference) {
    kernels.reference(w, n, inverse_scale, scale, zero, steps, setup.inv_beta.data(), setup.tau.data(), p, top, l1);
    return;
  }
  T best[kMaxLanes], s[kMaxLanes], z[kMaxLanes], error[kMaxLanes];
  for (int k = 0; k <= setup.scale_steps; ++k) {
    for (int l = 0; l < lanes; ++l) {
      s[l] = inverse_scale[l];
      z[l] = zero[l];
      if (k > 0) {  // a narrower range around the centre, clipping the extremes
        s[l] = std::min(s[l] * (T(1) + static_cast<T>(k) * setup.scale_step), T(2e4));
        z[l] = top / 2 - (lo[l] + hi[l]) / 2 * s[l];
        if (setup.round_zero) z[l] = round_half_even(z[l]);
      }
      scale[l] = T(1) / s[l];
    }
    kernels.improved(w, n, s, scale, z, error, setup.iters, setup.inv_beta.data(), setup.tau.data(), p, top,
                     setup.patience, setup.early_stop);
    for (int l = 0; l < lanes; ++l)
      if (k == 0 || error[l] < best[l]) {
        best[l] = error[l];
        inverse_scale[l] = s[l];
        zero[l] = z[l];
      }
  }
}

// Below this many weights the OpenMP start-up costs more than it saves.
inline constexpr Index kHqqParallelWeights = Index{1} << 16;

// Refuses NaN/Inf and a range max - min that overflows T, in one parallel pass.
template <class T>
void hqq_check_input(const Eigen::Ref<const Matrix<T>>& W) {
  std::vector<T> lo(static_cast<std::size_t>(W.rows())), hi(lo.size());
  std::vector<unsigned char> finite(lo.size());
  parallel_for(W.rows(), [&](Index r) {
    const Eigen::Map<const Vector<T>> row(W.data() + r * W.outerStride(), W.cols());
    const auto i = static_cast<std::size_t>(r);
    lo[i] = row.minCoeff();
    hi[i] = row.maxCoeff();
    finite[i] = std::isfinite(row.sum());  // NaN/Inf make the sum non-finite (so may a huge row)
  }, W.size() >= kHqqParallelWeights ? 2 : W.rows() + 1);
  for (std::size_t i = 0; i < finite.size(); ++i)
    if (!finite[i]) require_finite(W, "W");  // the exact check; names the first bad entry
  const T min = *std::min_element(lo.begin(), lo.end()), max = *std::max_element(hi.begin(), hi.end());
  require(std::isfinite(max - min), "W: max - min = ", static_cast<double>(max), " - ", static_cast<double>(min),
          " overflows the element type");
}

// Quantizes W; steps_run (optional) receives the number of proximal steps whose zero
// was kept by the Reference variant (HQQ's own count), or iters for Improved.
template <class T>
QuantizedMatrix<T> hqq_quantize(const Eigen::Ref<const Matrix<T>>& W, const typename HQQ<T>::Options& options,
                                int* steps_run = nullptr) {
  const QuantSpec& spec = options.spec;
  QuantizedMatrix<T> q(W.rows(), W.cols(), spec);
  if (steps_run != nullptr) *steps_run = 0;
  if (W.size() == 0) return q;
  hqq_check_input<T>(W);

  const HqqSetup<T> setup = hqq_setup<T>(options);
  const hqq::Kernels<T> kernels = hqq::kernels_for<T>(active_isa());
  const int lanes = kernels.lanes;
  const bool transposed = q.transposed();
  const Index rows = q.stored_rows(), cols = q.stored_cols(), group = q.group_length();
  const Index full_groups = cols / group, tail = cols % group, ld = W.outerStride();
  // Fixed by the shape alone, so results do not depend on the thread count. Output-axis
  // tasks take 16 stored rows (W columns): a batch then reads 16 adjacent floats.
  const Index rows_per_task = transposed ? 16 : std::max<Index>(1, 64 / q.groups_per_row());
  const Index tasks = (rows + rows_per_task - 1) / rows_per_task;
  const bool record = setup.variant == HqqVariant::Reference && setup.early_stop && setup.iters > 0;
  std::vector<double> row_l1(record ? static_cast<std::size_t>(rows * setup.iters) : 0);
  auto scales = q.mutable_scales();
  auto zeros = q.mutable_zeros();

  const auto run_pass = [&](int steps, bool record_errors) {
    parallel_for(tasks, [&](Index task) {
      thread_local std::vector<std::pair<Index, Index>> items;  // (stored row, group)
      thread_local std::vector<T> batch, code_values, l1;
      thread_local std::vector<std::uint8_t> codes;  // this task's stored rows
      const Index r0 = task * rows_per_task, r1 = std::min(rows, r0 + rows_per_task);
      items.clear();
      for (Index outer = 0; outer < (transposed ? full_groups : r1 - r0); ++outer)
        for (Index inner = 0; inner < (transposed ? r1 - r0 : full_groups); ++inner)
          items.emplace_back(transposed ? std::pair{r0 + inner, outer} : std::pair{r0 + outer, inner});
      const std::size_t full_items = items.size();
      if (tail > 0)
        for (Index r = r0; r < r1; ++r) items.emplace_back(r, full_groups);
      batch.resize(static_cast<std::size_t>(group * lanes));
      code_values.resize(batch.size());
      l1.resize(static_cast<std::size_t>(std::max(steps, 1) * lanes));
      codes.resize(static_cast<std::size_t>((r1 - r0) * cols));
      for (std::size_t first = 0; first < items.size();) {
        // Batches never mix full groups with the shorter last ones.
        const std::size_t end_of_kind = first < full_items ? full_items : items.size();
        const int used = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(lanes), end_of_kind - first));
        const Index n = first < full_items ? group : tail;
        const auto item = [&](int l) { return items[first + static_cast<std::size_t>(l)]; };
        std::fill(batch.begin(), batch.end(), T(0));
        for (int l = 0; l < used; ++l) {  // interleave: batch[i * lanes + l]
          const auto [r, g] = item(l);
          const T* src = transposed ? W.data() + g * group * ld + r : W.data() + r * ld + g * group;
          const Index stride = transposed ? ld : 1;
          for (Index i = 0; i < n; ++i) batch[static_cast<std::size_t>(i * lanes + l)] = src[i * stride];
        }
        T s[hqq::kMaxLanes], z[hqq::kMaxLanes];
        hqq_solve_batch(kernels, batch.data(), n, setup, steps, s, z, record_errors ? l1.data() : nullptr);
        if (spec.integral_zero)
          for (int l = 0; l < lanes; ++l) z[l] = round_half_even(z[l]);
        kernels.encode(batch.data(), n, s, z, setup.max_code, code_values.data());
        for (int l = 0; l < used; ++l) {
          const auto [r, g] = item(l);
          std::uint8_t* out = codes.data() + (r - r0) * cols + g * group;
          GroupParams p{static_cast<float>(T(1) / s[l]), static_cast<float>(z[l])};
          if (spec.param_type == ParamType::Float32) {
            for (Index i = 0; i < n; ++i)
              out[i] = static_cast<std::uint8_t>(code_values[static_cast<std::size_t>(i * lanes + l)]);
          } else {  // the stored parameters are rounded: encode against them
            p.scale = round_param(p.scale, spec.param_type);
            p.zero = round_param(p.zero, spec.param_type);
            for (Index i = 0; i < n; ++i)
              out[i] = encode(batch[static_cast<std::size_t>(i * lanes + l)], static_cast<T>(p.scale),
                              static_cast<T>(p.zero), spec.max_code());
          }
          scales(r, g) = p.scale;
          zeros(r, g) = p.zero;
          if (record_errors)  // in group order within each row: the same sums for any ISA
            for (int i = 0; i < steps; ++i)
              row_l1[static_cast<std::size_t>(r * setup.iters + i)] +=
                  static_cast<double>(l1[static_cast<std::size_t>(i * lanes + l)]);
        }
        first += static_cast<std::size_t>(used);
      }
      for (Index r = r0; r < r1; ++r) q.set_stored_row(r, codes.data() + (r - r0) * cols);
    }, W.size() >= kHqqParallelWeights ? 2 : tasks + 1);
  };

  run_pass(setup.iters, record);
  int steps = setup.iters;
  if (record) {
    std::vector<double> total(static_cast<std::size_t>(setup.iters), 0.0);
    for (Index r = 0; r < rows; ++r)
      for (int i = 0; i < setup.iters; ++i)
        total[static_cast<std::size_t>(i)] += row_l1[static_cast<std::size_t>(r * setup.iters + i)];
    steps = hqq_stop_step(total, static_cast<double>(W.size()), setup.iters);
    if (steps < setup.iters) run_pass(steps, false);  // the same trajectories, cut at the stop
  }
  if (steps_run != nullptr) *steps_run = steps;
  // Only a double W far outside float's range can get here (scales and zeros are floats).
  for (Index r = 0; r < rows; ++r)
    for (Index g = 0; g < q.groups_per_row(); ++g)
      require(std::isfinite(scales(r, g)) && std::isfinite(zeros(r, g)), "W: group (", r, ", ", g,
              ") needs scale ", scales(r, g), " and zero ", zeros(r, g), ", beyond float parameters");
  return q;
}

// HQQ's (scale = 1/s, zero) for one group of n values, for quantizers that fit groups
// one at a time (GPTQ). Reference's early stop looks at this group alone.
template <class T>
[[nodiscard]] GroupParams hqq_fit_group(const T* w, Index n, const QuantSpec& spec,
                                        const typename HQQ<T>::Options& options) {
  require(n >= 1, "hqq_fit_group: n = ", n, " must be >= 1");
  for (Index i = 0; i < n; ++i)
    require(std::isfinite(static_cast<double>(w[i])), "hqq_fit_group: w[", i, "] = ", w[i], " is not finite");
  typename HQQ<T>::Options o = options;
  o.spec = spec;
  (void)HQQ<T>(o);  // validates
  const HqqSetup<T> setup = hqq_setup<T>(o);
  const hqq::Kernels<T> kernels = hqq::kernels_for<T>(Isa::Scalar);  // one lane: w is the batch
  T s = 1, z = 0;
  std::vector<T> l1(static_cast<std::size_t>(std::max(setup.iters, 1)));
  const bool record = setup.variant == HqqVariant::Reference && setup.early_stop && setup.iters > 0;
  hqq_solve_batch(kernels, w, n, setup, setup.iters, &s, &z, record ? l1.data() : nullptr);
  if (record) {
    const std::vector<double> sums(l1.begin(), l1.end());
    const int steps = hqq_stop_step(sums, static_cast<double>(n), setup.iters);
    if (steps < setup.iters) hqq_solve_batch<T>(kernels, w, n, setup, steps, &s, &z, nullptr);
  }
  if (spec.integral_zero) z = round_half_even(z);
  const GroupParams p{round_param(static_cast<float>(T(1) / s), spec.param_type),
                      round_param(static_cast<float>(z), spec.param_type)};
  require(std::isfinite(p.scale) && std::isfinite(p.zero), "hqq_fit_group: scale ", p.scale, " and zero ", p.zero,
          " are beyond float parameters");
  return p;
}

}  // namespace detail

template <class T>
QuantizedMatrix<T> HQQ<T>::quantize(const Eigen::Ref<const Matrix<T>>& W) const {
  return detail::hqq_quantize<T>(W, options_);
}

}  // namespace lowbit

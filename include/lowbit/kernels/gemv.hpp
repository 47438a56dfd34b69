// y = W x straight from the packed weights: lowbit::gemv.
//
// Per call, x is permuted into stored order once (act-order), its per-group sums are
// computed once, and every output row then runs a fused unpack + FMA over its packed
// codes with the zero folded out (gemv_input.hpp):
//   y_r = sum_g s_rg * (sum_{j in g} q_rj x_j - z_rg * S_g).
// Rows are split among threads in fixed blocks of rows, and each row's arithmetic is the
// same whichever thread runs it, so results are bit-identical for any thread count.
// Variants: AVX-512 and AVX2 (float, group sizes that are multiples of 4 or one group
// per row), scalar otherwise and for double; chosen by lowbit::active_isa().
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "lowbit/core/error.hpp"
#include "lowbit/core/isa.hpp"
#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/core/types.hpp"
#include "lowbit/kernels/gemv_avx2.hpp"
#include "lowbit/kernels/gemv_avx512.hpp"
#include "lowbit/kernels/gemv_input.hpp"
#include "lowbit/kernels/gemv_scalar.hpp"

namespace lowbit {
namespace detail {

// Loops with fewer multiply-adds than this stay on the calling thread: below it, waking
// the thread team costs more than the work.
inline constexpr Index kParallelWork = Index{1} << 16;

[[nodiscard]] inline Index min_parallel_tasks(Index tasks, Index work) { return work < kParallelWork ? tasks + 1 : 2; }

// Lanes of the float SIMD kernel `isa` runs for this matrix, or 0 for the scalar path.
[[nodiscard]] inline int gemv_lanes(Isa isa, Index n, Index group_length) {
  int lanes = 0;
#if defined(LOWBIT_HAVE_AVX512)
  if (isa == Isa::Avx512) lanes = avx512::kLanes;
#endif
#if defined(LOWBIT_HAVE_AVX2)
  if (isa == Isa::Avx2) lanes = avx2::kLanes;
#endif
  if (lanes != 0 && scale_mode(n, group_length, lanes) == ScaleMode::Generic) return 0;
  return lanes;
}

// Rows per SIMD kernel call: they share the loads of x.
inline constexpr Index kKernelRows = 4;

// Rows [first, first + count) of W: `block` takes kKernelRows rows at once, `single`
// one; both take (packed rows, scale rows, zero rows, y).
template <class Block, class Single>
void row_blocks(const QuantizedMatrix<float>& W, Index first, Index count, float* y, Block&& block, Single&& single) {
  const Index groups = W.groups_per_row();
  const std::uint8_t* rows[kKernelRows];
  const float *scales[kKernelRows], *zeros[kKernelRows];
  for (Index r = 0; r < count; ++r) {
    rows[r] = W.packed_row(first + r);
    scales[r] = W.scales().data() + (first + r) * groups;
    zeros[r] = W.zeros().data() + (first + r) * groups;
  }
  if (count == kKernelRows) return block(rows, scales, zeros, y);
  for (Index r = 0; r < count; ++r) single(rows + r, scales + r, zeros + r, y + r);
}

// Input-axis groups. x is the logical input (cols() entries), y the output (rows()).
template <class T>
void gemv_rows_dispatch(const QuantizedMatrix<T>& W, const T* x, T* y, Isa isa) {
  const Index n = W.stored_cols(), rows = W.rows();
  const int lanes = std::is_same_v<T, float> ? gemv_lanes(isa, n, W.group_length()) : 0;
  const GemvInput<T> input = prepare_gemv_input(W, x, lanes);
  if (lanes == 0) {
    constexpr Index kRowsPerTask = 8;
    const Index tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
    parallel_for(tasks, [&](Index task) {
      thread_local std::vector<std::uint8_t> codes;
      codes.resize(static_cast<std::size_t>(n));
      const Index first = task * kRowsPerTask;
      scalar::gemv_rows(W, input.x.data(), input.group_sums.data(), first, std::min(kRowsPerTask, rows - first),
                        codes.data(), y + first);
    }, min_parallel_tasks(tasks, rows * n));
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    const ScaleMode mode = scale_mode(n, W.group_length(), lanes);
    const LaneGroups plan = mode == ScaleMode::PerLane ? lane_groups(n, W.group_length(), lanes) : LaneGroups{};
    const Index unit = unit_codes(lanes);
    const Index units_per_group = W.group_length() >= n ? (n + unit - 1) / unit : W.group_length() / unit;
    const Index groups = W.groups_per_row();
    const std::uint8_t* storage_end = W.packed_codes().data() + W.packed_codes().size();
    const Index tasks = (rows + kKernelRows - 1) / kKernelRows;
    with_bits(W.spec().bits, [&](auto bits_constant) {
      constexpr int Bits = decltype(bits_constant)::value;
      const auto run = [&](auto mode_constant) {
        constexpr ScaleMode Mode = decltype(mode_constant)::value;
        parallel_for(tasks, [&](Index task) {
          const Index first = task * kKernelRows, count = std::min(kKernelRows, rows - first);
#if defined(LOWBIT_HAVE_AVX512)
          if (lanes == avx512::kLanes) {
            const avx512::GemvRowsArgs args{input.x.data(), input.group_sums.data(), &plan, n, groups,
                                            units_per_group, storage_end};
            return row_blocks(W, first, count, y + first,
                              [&](auto... a) { avx512::gemv_rows<Bits, kKernelRows, Mode>(args, a...); },
                              [&](auto... a) { avx512::gemv_rows<Bits, 1, Mode>(args, a...); });
          }
#endif
#if defined(LOWBIT_HAVE_AVX2)
          const avx2::GemvRowsArgs args{input.x.data(), input.group_sums.data(), &plan, n, groups,
                                        units_per_group, storage_end};
          row_blocks(W, first, count, y + first,
                     [&](auto... a) { avx2::gemv_rows<Bits, kKernelRows, Mode>(args, a...); },
                     [&](auto... a) { avx2::gemv_rows<Bits, 1, Mode>(args, a...); });
#endif
        }, min_parallel_tasks(tasks, rows * n));
      };
      if (mode == ScaleMode::PerLane) run(std::integral_constant<ScaleMode, ScaleMode::PerLane>{});
      else run(std::integral_constant<ScaleMode, ScaleMode::PerGroup>{});
    });
  }
}

// Output-axis groups: parallel over blocks of 256 outputs.
template <class T>
void gemv_transposed_dispatch(const QuantizedMatrix<T>& W, const T* x, T* y, Isa isa) {
  const Index n = W.stored_cols();
  const Index blocks = (n + kBlockCodes - 1) / kBlockCodes;
  const Index min_tasks = min_parallel_tasks(blocks, W.rows() * W.cols());
  const int lanes = std::is_same_v<T, float> ? gemv_lanes(isa, n, W.group_length()) : 0;
  if constexpr (std::is_same_v<T, float>) {
    if (lanes != 0) {
      const ScaleMode mode = scale_mode(n, W.group_length(), lanes);
      const LaneGroups plan = mode == ScaleMode::PerLane ? lane_groups(n, W.group_length(), lanes) : LaneGroups{};
      with_bits(W.spec().bits, [&](auto bits_constant) {
        constexpr int Bits = decltype(bits_constant)::value;
        parallel_for(blocks, [&](Index blk) {
#if defined(LOWBIT_HAVE_AVX512)
          const bool per_lane = mode == ScaleMode::PerLane;
          if (lanes == avx512::kLanes) {
            if (per_lane) avx512::gemv_transposed_block<Bits, ScaleMode::PerLane>(W, x, &plan, blk, y);
            else avx512::gemv_transposed_block<Bits, ScaleMode::PerGroup>(W, x, &plan, blk, y);
            return;
          }
#endif
#if defined(LOWBIT_HAVE_AVX2)
          if (mode == ScaleMode::PerLane) avx2::gemv_transposed_block<Bits, ScaleMode::PerLane>(W, x, &plan, blk, y);
          else avx2::gemv_transposed_block<Bits, ScaleMode::PerGroup>(W, x, &plan, blk, y);
#endif
        }, min_tasks);
      });
      return;
    }
  }
  parallel_for(blocks, [&](Index blk) { scalar::gemv_transposed_block(W, x, blk, y); }, min_tasks);
}

template <class T>
void gemv(const QuantizedMatrix<T>& W, const T* x, T* y, Isa isa) {
  if (W.rows() == 0) return;
  if (W.cols() == 0) {
    std::fill(y, y + W.rows(), T(0));
    return;
  }
  if (W.transposed()) {
    const std::vector<T> x_copy(x, x + W.cols());  // y may alias x
    gemv_transposed_dispatch(W, x_copy.data(), y, isa);
  } else {
    gemv_rows_dispatch(W, x, y, isa);  // reads x fully before writing y
  }
}

template <class T>
void check_gemv_shapes(const QuantizedMatrix<T>& W, Index x_size, Index y_size) {
  require(x_size == W.cols(), "gemv: x has ", x_size, " entries, W has ", W.cols(), " columns");
  require(y_size == W.rows(), "gemv: y has ", y_size, " entries, W has ", W.rows(), " rows");
}

}  // namespace detail

// y = W x, W [rows, cols] quantized, x [cols], y [rows]; y must not overlap W's storage.
// Throws lowbit::Error on a shape mismatch or a non-finite x.
template <class T>
void gemv(const QuantizedMatrix<T>& W, const Eigen::Ref<const Vector<std::type_identity_t<T>>>& x,
          Eigen::Ref<Vector<std::type_identity_t<T>>> y) {
  detail::check_gemv_shapes(W, x.size(), y.size());
  detail::require_finite(x, "x");
  detail::gemv(W, x.data(), y.data(), active_isa());
}

}  // namespace lowbit

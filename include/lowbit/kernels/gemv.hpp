// y = W x straight from the packed weights: lowbit::gemv.
//
// Per call, x is permuted into stored order once (act-order), its per-group sums are
// computed once, and every output row then runs a fused unpack + FMA over its packed
// codes with the zero folded out (gemv_input.hpp):
//   y_r = sum_g s_rg * (sum_{j in g} q_rj x_j - z_rg * S_g).
// Rows are split among threads in fixed tasks (row_task: four rows a quarter of the
// matrix apart), and each row's arithmetic is the same whichever thread runs it, so
// results are bit-identical for any thread count.
// Variants: AVX-512 and AVX2 (float, group sizes that are multiples of 4 or one group
// per row, any group size for rows shorter than one 256-code block), scalar otherwise
// and for double; chosen by lowbit::active_isa().
//
// Per-call overhead matters for small matrices (a decode step of a small model is
// dozens of 64 x 64 products): x is prepared into thread_local buffers, the scale plans
// of a matrix shape are kept per thread for the last few shapes, matrices below
// kParallelWork multiply-adds never open an OpenMP region, and on AVX-512 rows shorter
// than one 256-code block are walked by one kernel call per task (short_rows_range).
#pragma once

#include <algorithm>
#include <array>
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
#include "lowbit/kernels/gemv_short_block.hpp"

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
  // Generic group sizes only matter in full blocks: the short block takes any size.
  if (lanes != 0 && full_block_layout_codes(n) > 0 && scale_mode(n, group_length, lanes) == ScaleMode::Generic)
    return 0;
  return lanes;
}

// What the SIMD kernels need of a matrix shape besides its data: built once per shape
// and thread, not per call.
struct GemvShapePlan {
  Index n = -1, group_length = -1;
  int lanes = -1;
  ScaleMode mode = ScaleMode::PerGroup;  // of the full blocks
  LaneGroups lane_groups;                // ScaleMode::PerLane, over the full blocks' codes
  ShortBlockPlan short_block;
};

// The plan of a shape, from a per-thread cache of the last few shapes (a model cycles
// through a handful: rebuilding the plan per call would cost more than a small GEMV).
[[nodiscard]] inline const GemvShapePlan& shape_plan(Index n, Index group_length, int lanes) {
  thread_local std::array<GemvShapePlan, 8> plans;
  thread_local std::size_t next = 0;
  for (const GemvShapePlan& plan : plans)
    if (plan.n == n && plan.group_length == group_length && plan.lanes == lanes) return plan;
  GemvShapePlan& plan = plans[next];
  next = (next + 1) % plans.size();
  plan.n = n;
  plan.group_length = group_length;
  plan.lanes = lanes;
  const Index lane_codes = std::min(n, full_block_layout_codes(n));
  plan.mode = lane_codes == 0 ? ScaleMode::PerGroup : scale_mode(n, group_length, lanes);
  if (plan.mode == ScaleMode::PerLane) lane_groups(lane_codes, group_length, lanes, plan.lane_groups);
  plan_short_block(n, group_length, plan.short_block);
  return plan;
}

// Rows per SIMD kernel call: they share the loads of x.
inline constexpr Index kKernelRows = 4;

// Tasks of a row-wise GEMV: task t < Q = rows / kKernelRows takes the rows t, t + Q,
// t + 2Q, t + 3Q in one kernel call; the rows from kKernelRows * Q on follow one per
// task. A thread runs consecutive tasks (a static schedule), so it reads four long
// sequential streams through the packed codes, as the hardware prefetcher wants;
// four consecutive rows would be four streams that jump every row group (on Zen 4 that
// pattern alone capped a cold read at 20 GB/s, the quarters read at 27-29 GB/s). Each
// row's arithmetic is the same in either kind of task.
[[nodiscard]] inline Index row_tasks(Index rows) { return rows / kKernelRows + rows % kKernelRows; }

// Runs task `task` of W's rows (row_tasks): `block` takes kKernelRows rows at once,
// `single` one; both take (packed rows, scale rows, zero rows, y of those rows).
template <class Block, class Single>
void row_task(const QuantizedMatrix<float>& W, Index task, float* y, Block&& block, Single&& single) {
  const Index groups = W.groups_per_row(), quarter = W.rows() / kKernelRows;
  const bool quad = task < quarter;
  const int count = quad ? static_cast<int>(kKernelRows) : 1;
  Index index[kKernelRows];
  const std::uint8_t* rows[kKernelRows];
  const float *scales[kKernelRows], *zeros[kKernelRows];
  for (int r = 0; r < count; ++r) {
    index[r] = quad ? task + r * quarter : kKernelRows * quarter + (task - quarter);
    rows[r] = W.packed_row(index[r]);
    scales[r] = W.scales().data() + index[r] * groups;
    zeros[r] = W.zeros().data() + index[r] * groups;
  }
  if (!quad) return single(rows, scales, zeros, y + index[0]);
  float out[kKernelRows];
  block(rows, scales, zeros, out);
  for (int r = 0; r < count; ++r) y[index[r]] = out[r];
}

// Input-axis groups. x is the logical input (cols() entries), y the output (rows()).
template <class T>
void gemv_rows_dispatch(const QuantizedMatrix<T>& W, const T* x, T* y, Isa isa) {
  const Index n = W.stored_cols(), rows = W.rows();
  const int lanes = std::is_same_v<T, float> ? gemv_lanes(isa, n, W.group_length()) : 0;
  // A reference, so the worker threads read this thread's buffers, not their own.
  thread_local GemvInput<T> input_buffers;
  GemvInput<T>& input = input_buffers;
  const GemvShapePlan* plan = lanes == 0 ? nullptr : &shape_plan(n, W.group_length(), lanes);
  // Rows that are one short block each take, on AVX-512, tables with the zeros folded
  // in (gemv_avx512.hpp): no group sums to compute.
  bool short_rows = false, fold_zeros = false;
#if defined(LOWBIT_HAVE_AVX512)
  short_rows = lanes == avx512::kLanes && full_block_layout_codes(n) == 0;
  fold_zeros = short_rows && avx512::short_block_takes_table(plan->short_block, W.spec().bits);
#endif
  prepare_gemv_input(W, x, lanes, input, !fold_zeros);
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
    const Index unit = unit_codes(lanes), lane_codes = std::min(n, full_block_layout_codes(n));
    const Index units_per_group = W.group_length() >= n ? (n + unit - 1) / unit : W.group_length() / unit;
    const GemvRowsArgs args{input.x.data(),
                            input.group_sums.data(),
                            &plan->lane_groups,
                            &plan->short_block,
                            full_block_layout_codes(n) / kBlockCodes,
                            (lane_codes + unit - 1) / unit,
                            W.groups_per_row(),
                            units_per_group,
                            W.packed_codes().data() + W.packed_codes().size(),
                            W.row_bytes(),
                            W.packed_codes().data(),
                            W.scales().data(),
                            W.zeros().data(),
                            W.scales().data() + W.scales().size(),
                            W.zeros().data() + W.zeros().size()};
    const Index tasks = row_tasks(rows);
    with_bits(W.spec().bits, [&](auto bits_constant) {
      constexpr int Bits = decltype(bits_constant)::value;
#if defined(LOWBIT_HAVE_AVX512)
      if (short_rows) {
        constexpr Index kShortRowsPerTask = 64;  // a multiple of every short_rows_range step
        const Index short_tasks = (rows + kShortRowsPerTask - 1) / kShortRowsPerTask;
        parallel_for(short_tasks, [&](Index task) {
          const Index first = task * kShortRowsPerTask;
          avx512::short_rows_range<Bits>(args, first, std::min(kShortRowsPerTask, rows - first), y + first);
        }, min_parallel_tasks(short_tasks, rows * n));
        return;
      }
#endif
      const auto run = [&](auto mode_constant) {
        constexpr ScaleMode Mode = decltype(mode_constant)::value;
        parallel_for(tasks, [&](Index task) {
#if defined(LOWBIT_HAVE_AVX512)
          if (lanes == avx512::kLanes) {
            return row_task(W, task, y,
                            [&](auto... a) { avx512::gemv_rows<Bits, kKernelRows, Mode>(args, a...); },
                            [&](auto... a) { avx512::gemv_rows<Bits, 1, Mode>(args, a...); });
          }
#endif
#if defined(LOWBIT_HAVE_AVX2)
          row_task(W, task, y,
                   [&](auto... a) { avx2::gemv_rows<Bits, kKernelRows, Mode>(args, a...); },
                   [&](auto... a) { avx2::gemv_rows<Bits, 1, Mode>(args, a...); });
#endif
        }, min_parallel_tasks(tasks, rows * n));
      };
      if (plan->mode == ScaleMode::PerLane) run(std::integral_constant<ScaleMode, ScaleMode::PerLane>{});
      else run(std::integral_constant<ScaleMode, ScaleMode::PerGroup>{});
    });
  }
}

// Output-axis groups: parallel over blocks of 256 outputs (the last one may be short).
template <class T>
void gemv_transposed_dispatch(const QuantizedMatrix<T>& W, const T* x, T* y, Isa isa) {
  const Index n = W.stored_cols();
  const Index blocks = (n + kBlockCodes - 1) / kBlockCodes;
  const Index min_tasks = min_parallel_tasks(blocks, W.rows() * W.cols());
  const int lanes = std::is_same_v<T, float> ? gemv_lanes(isa, n, W.group_length()) : 0;
  if constexpr (std::is_same_v<T, float>) {
    if (lanes != 0) {
      const GemvShapePlan& plan = shape_plan(n, W.group_length(), lanes);
      const Index full_blocks = full_block_layout_codes(n) / kBlockCodes;
      with_bits(W.spec().bits, [&](auto bits_constant) {
        constexpr int Bits = decltype(bits_constant)::value;
        parallel_for(blocks, [&](Index blk) {
          const bool per_lane = plan.mode == ScaleMode::PerLane;
#if defined(LOWBIT_HAVE_AVX512)
          if (lanes == avx512::kLanes) {
            if (blk == full_blocks) avx512::gemv_transposed_short_block<Bits>(W, x, plan.short_block, y);
            else if (per_lane) avx512::gemv_transposed_block<Bits, ScaleMode::PerLane>(W, x, &plan.lane_groups, blk, y);
            else avx512::gemv_transposed_block<Bits, ScaleMode::PerGroup>(W, x, &plan.lane_groups, blk, y);
            return;
          }
#endif
#if defined(LOWBIT_HAVE_AVX2)
          if (blk == full_blocks) avx2::gemv_transposed_short_block<Bits>(W, x, plan.short_block, y);
          else if (per_lane) avx2::gemv_transposed_block<Bits, ScaleMode::PerLane>(W, x, &plan.lane_groups, blk, y);
          else avx2::gemv_transposed_block<Bits, ScaleMode::PerGroup>(W, x, &plan.lane_groups, blk, y);
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
    thread_local std::vector<T> x_copy;  // y may alias x
    x_copy.assign(x, x + W.cols());
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

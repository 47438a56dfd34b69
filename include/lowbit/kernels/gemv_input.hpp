// What a GEMV call computes once from x and shares across all rows: x in stored column
// order (act-order permutation applied once), zero-padded to whole 256-code blocks and
// laid out in the SIMD kernels' lane order, plus the per-group sums of x that fold the
// zero-point out of the inner loop:
//
//   sum_{j in g} (q_j - z_g) s_g x_j = s_g * (sum_{j in g} q_j x_j - z_g * S_g),
//   S_g = sum_{j in g} x_j.
//
// Lane order. The SIMD kernels read a full block's packed bytes as 32-bit lanes, so one
// shift + mask yields, in lane k, code 4k + b of a unit of 4 * lanes consecutive codes
// (b = 0..3 is the byte within the lane; see pack/layout.hpp). Instead of shuffling
// codes into natural order for every row, x is shuffled once to match: within each unit,
// x[4k + b] moves to position b * lanes + k. A short last block (gemv_short_block.hpp)
// is read in natural order, so its part of x stays in natural order.
//
// The buffers live in a thread_local GemvInput reused from call to call: after the first
// call of a given size, a GEMV allocates nothing.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/core/types.hpp"
#include "lowbit/pack/layout.hpp"

namespace lowbit::detail {

// Lanes per vector of the kernel: 0 (scalar, natural order), 8 (AVX2) or 16 (AVX-512).
[[nodiscard]] constexpr Index unit_codes(int lanes) { return 4 * static_cast<Index>(lanes); }

// Stored row length rounded up to whole blocks: the SIMD kernels read whole blocks.
[[nodiscard]] constexpr Index block_padded(Index n) { return (n + kBlockCodes - 1) / kBlockCodes * kBlockCodes; }

// Codes of a row of n that lie in full 256-code blocks of the layout (the padded row is
// cut into 256-code blocks; only the last may be shorter).
[[nodiscard]] constexpr Index full_block_layout_codes(Index n) { return padded_codes(n) / kBlockCodes * kBlockCodes; }

// Padded length m of the row's short last block (a multiple of 32), 0 when it has none.
[[nodiscard]] constexpr Index short_block_codes(Index n) { return padded_codes(n) - full_block_layout_codes(n); }

// Position of stored column c in the lane order of `lanes`-wide vectors (full blocks).
[[nodiscard]] constexpr Index lane_position(Index c, int lanes) {
  if (lanes == 0) return c;
  const Index unit = unit_codes(lanes), within = c % unit;
  return c - within + (within % 4) * lanes + within / 4;
}

// Position of stored column c of a row of n in the x a kernel reads: lane order in the
// full blocks, natural order in the short last block.
[[nodiscard]] constexpr Index input_position(Index c, Index n, int lanes) {
  return c < full_block_layout_codes(n) ? lane_position(c, lanes) : c;
}

// x in stored column order: x[permutation[j]] (input-axis groups only).
template <class T, class Vec>
void gather_stored_order(const QuantizedMatrix<T>& W, const Vec& x, T* out) {
  const auto& permutation = W.permutation();
  const Index n = W.cols();
  if (permutation.empty()) {
    for (Index j = 0; j < n; ++j) out[j] = x[j];
  } else {
    for (Index j = 0; j < n; ++j) out[j] = x[permutation[static_cast<std::size_t>(j)]];
  }
}

template <class T>
struct GemvInput {
  std::vector<T> x;           // stored order, block-padded with zeros, in kernel order
  std::vector<T> group_sums;  // S_g of the stored-order x, one per group of a stored row
  int lanes = 0;
  Index written = 0;  // x[written..] is zero (the buffer never shrinks)
};

// Prepares x for a non-transposed matrix (stored rows = output rows) into `input`,
// reusing its buffers; the group sums only when `with_group_sums` (a kernel that folds
// the zeros into its tables does not read them).
template <class T, class Vec>
void prepare_gemv_input(const QuantizedMatrix<T>& W, const Vec& x, int lanes, GemvInput<T>& input,
                        bool with_group_sums = true) {
  const Index n = W.stored_cols(), group = W.group_length();
  input.lanes = lanes;
  // Padding past n must read as zero. New entries are zero, so only what an earlier,
  // longer x wrote is cleared (a small model alternates a few lengths: clearing the
  // whole padded block per call would cost as much as its product).
  const auto padded = static_cast<std::size_t>(block_padded(n));
  if (input.x.size() < padded) input.x.resize(padded);
  T* out = input.x.data();
  gather_stored_order(W, x, out);
  if (input.written > n) std::fill(out + n, out + input.written, T(0));
  input.written = n;  // the lane reorder below may raise it

  // S_g in double, rounded once: the fold's only extra rounding is then that of S_g
  // itself. Four partial sums: one chain of dependent additions would cost more than
  // a small matrix's whole product.
  input.group_sums.resize(static_cast<std::size_t>(W.groups_per_row()));
  for (Index g = 0; with_group_sums && g < W.groups_per_row(); ++g) {
    const Index begin = g * group, end = std::min(n, (g + 1) * group);
    double part[4] = {0, 0, 0, 0};
    Index j = begin;
    for (; j + 4 <= end; j += 4)
      for (int k = 0; k < 4; ++k) part[k] += static_cast<double>(out[j + k]);
    for (; j < end; ++j) part[0] += static_cast<double>(out[j]);
    input.group_sums[static_cast<std::size_t>(g)] = static_cast<T>((part[0] + part[1]) + (part[2] + part[3]));
  }

  if (lanes == 0) return;
  const Index unit = unit_codes(lanes), lane_codes = std::min(n, full_block_layout_codes(n));
  T natural[unit_codes(16)];
  for (Index start = 0; start < lane_codes; start += unit) {  // lane_position, unit by unit
    std::copy(out + start, out + start + unit, natural);
    for (Index k = 0; k < lanes; ++k)
      for (Index b = 0; b < 4; ++b) out[start + b * lanes + k] = natural[4 * k + b];
    input.written = std::max(input.written, start + unit);  // a unit past n moves x into its padding
  }
}

template <class T, class Vec>
GemvInput<T> prepare_gemv_input(const QuantizedMatrix<T>& W, const Vec& x, int lanes) {
  GemvInput<T> input;
  prepare_gemv_input(W, x, lanes, input);
  return input;
}

// Per-lane groups for group sizes that split a unit (group_size % 4 == 0, not a
// multiple of the unit). Lane k of unit u covers codes u*U + 4k .. u*U + 4k + 3, which
// share a group, so lane k's scale is scales[first[u] + offset[u*lanes + k]]; a unit
// touches count[u] <= lanes groups, read with one masked load and one permute.
struct LaneGroups {
  std::vector<std::int32_t> first, count, offset;
};

// The plan for the first n codes of a row (callers pass the codes in full blocks).
inline void lane_groups(Index n, Index group_size, int lanes, LaneGroups& plan) {
  const Index unit = unit_codes(lanes), units = (n + unit - 1) / unit;
  const Index groups = (n + group_size - 1) / group_size;
  plan.first.resize(static_cast<std::size_t>(units));
  plan.count.resize(static_cast<std::size_t>(units));
  plan.offset.resize(static_cast<std::size_t>(units * lanes));
  for (Index u = 0; u < units; ++u) {
    const Index first = u * unit / group_size;
    const Index last = std::min(groups - 1, (u * unit + unit - 1) / group_size);
    plan.first[static_cast<std::size_t>(u)] = static_cast<std::int32_t>(first);
    plan.count[static_cast<std::size_t>(u)] = static_cast<std::int32_t>(last - first + 1);
    for (Index k = 0; k < lanes; ++k) {
      // Lanes past the row's end hold zero x; any in-range group serves them.
      const Index g = std::min(last, (u * unit + 4 * k) / group_size);
      plan.offset[static_cast<std::size_t>(u * lanes + k)] = static_cast<std::int32_t>(g - first);
    }
  }
}

[[nodiscard]] inline LaneGroups lane_groups(Index n, Index group_size, int lanes) {
  LaneGroups plan;
  lane_groups(n, group_size, lanes, plan);
  return plan;
}

// How a SIMD kernel applies scales in full blocks: once per group when every unit lies
// in one group, per lane when groups split units, or not at all (generic path) otherwise.
enum class ScaleMode { PerGroup, PerLane, Generic };

[[nodiscard]] inline ScaleMode scale_mode(Index n, Index group_size, int lanes) {
  if (n <= group_size || group_size % unit_codes(lanes) == 0) return ScaleMode::PerGroup;
  if (group_size % 4 == 0) return ScaleMode::PerLane;
  return ScaleMode::Generic;
}

}  // namespace lowbit::detail

// What the AVX-512 and AVX2 GEMV kernels share, independent of the vector width: the
// arguments of a row kernel, the full-block bookkeeping, and the plan for a row's short
// last block.
//
// Short last block. A row whose padded length is not a multiple of 256 ends in a block
// of m = 32c codes (c = 1..7) with its own plane lengths (pack/layout.hpp): a plane of
// width p takes L_p = m p / 8 bytes and code j sits at byte j % L_p, bit p (j / L_p).
// Rows shorter than 256 codes (every row of a small model) are nothing but this block.
// The kernels read it in place, in natural code order, instead of repacking it into a
// full block on every call:
//   - positions are visited slot by slot of the narrowest plane (width p_min, slot s =
//     positions s L_min .. (s + 1) L_min - 1). Every wider plane's slot boundaries are
//     multiples of L_min, so a run of positions inside one such slot is a run of
//     consecutive bytes of every plane, at a fixed bit shift (plane_slot below): one
//     zero-extending load, shift and mask per plane gives the codes, for every bit width
//     (single-plane widths are the one-plane case, 3/5/6/7 bits OR their planes);
//   - runs are cut into vectors of `lanes` positions; the last vector of a slot is
//     masked (L_min is a multiple of 4 bytes, so loads never leave the plane, and so
//     never leave the matrix storage);
//   - x of the short block stays in natural order (gemv_input.hpp), and each position's
//     group index (relative to the block's first group) is computed once per matrix
//     shape and shared by all rows, so any group size works, ragged or splitting a
//     vector: each row loads its block's scales once and permutes them into place (a
//     gather when the block touches more groups than a vector holds).
// The arithmetic per position is fma(q x, s_g, total): the zero point stays folded
// (sum_g s_g z_g S_g is subtracted once per row, as in the full blocks).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>

#include "lowbit/core/types.hpp"
#include "lowbit/kernels/gemv_input.hpp"
#include "lowbit/pack/layout.hpp"

namespace lowbit::detail {

// Loads for lane byte b of a full block start b bytes into a plane, so a full-block
// kernel may read this many bytes past a block (a row's last full block is read from a
// copy when that would leave the storage).
inline constexpr Index kOverread = 3;

// Byte offset of plane `plane` in a full block.
[[nodiscard]] constexpr int plane_byte_offset(const PlaneSet& set, int plane) {
  int offset = 0;
  for (int k = 0; k < plane; ++k) offset += 32 * set.planes[static_cast<std::size_t>(k)].width;
  return offset;
}

// Full blocks of a row that a kernel reads in place: all of them, but for a last one
// whose overread would leave the storage (then read from a zero-padded copy).
[[nodiscard]] inline Index direct_full_blocks(const std::uint8_t* row, Index full_blocks, Index block_bytes,
                                              const std::uint8_t* storage_end) {
  if (full_blocks == 0) return 0;
  const std::uint8_t* last = row + (full_blocks - 1) * block_bytes;
  return storage_end - last < block_bytes + kOverread ? full_blocks - 1 : full_blocks;
}

// The short last block of a row of n codes with groups of group_size, shared by all
// rows of a matrix.
struct ShortBlockPlan {
  static constexpr Index kSlack = 16;  // entries past the block, for whole-vector loads
  Index begin = 0;                     // first code of the block in the row
  Index codes = 0;                     // m (0: the row has no short block)
  std::int32_t first_group = 0;        // group of code `begin`
  std::int32_t group_count = 0;        // groups the block's codes touch
  Index group_size = 1;                // of the matrix
  std::array<std::int32_t, kBlockCodes + kSlack> group{};  // group of each position - first_group
};

inline void plan_short_block(Index n, Index group_size, ShortBlockPlan& plan) {
  plan.begin = full_block_layout_codes(n);
  plan.codes = short_block_codes(n);
  plan.group_size = group_size;
  plan.first_group = plan.codes == 0 ? 0 : static_cast<std::int32_t>(plan.begin / group_size);
  const Index last = plan.codes == 0 ? plan.begin : n - 1;  // padding positions hold zero x
  plan.group_count = plan.codes == 0 ? 0 : static_cast<std::int32_t>(last / group_size - plan.first_group + 1);
  // Walk the positions once instead of dividing each: the group advances at each multiple.
  std::int32_t g = 0;
  Index group_end = (plan.first_group + 1) * group_size;
  for (Index j = 0; j < kBlockCodes + ShortBlockPlan::kSlack; ++j) {
    if (plan.begin + j >= group_end && g + 1 < plan.group_count) {
      ++g;
      group_end += group_size;
    }
    plan.group[static_cast<std::size_t>(j)] = g;
  }
}

// Width of the narrowest plane of a bit width: its slots are the runs the kernels read.
[[nodiscard]] constexpr int narrowest_plane(int bits) {
  const PlaneSet set = planes_for_bits(bits);
  return set.planes[static_cast<std::size_t>(set.count - 1)].width;
}

// Slots of the narrowest plane, and positions per slot, in a short block of m codes.
[[nodiscard]] constexpr int short_slots(int bits) { return 8 / narrowest_plane(bits); }
[[nodiscard]] constexpr Index short_slot_codes(int bits, Index m) { return m * narrowest_plane(bits) / 8; }

// Where slot s of the narrowest plane lies in plane `plane` of a short block of m codes:
// position s L_min is in the plane's slot t = s / r (r = p / p_min, as L_p = r L_min),
// at byte (s % r) L_min of the plane, bit p t.
struct PlaneSlot {
  Index byte;  // from the start of the block
  int shift;   // right shift that brings the plane's bits to bit 0
};

[[nodiscard]] constexpr PlaneSlot plane_slot(const PlaneSet& set, int plane, Index m, int slot) {
  const int narrowest = set.planes[static_cast<std::size_t>(set.count - 1)].width;
  Index base = 0;
  for (int k = 0; k < plane; ++k) base += m * set.planes[static_cast<std::size_t>(k)].width / 8;
  const int width = set.planes[static_cast<std::size_t>(plane)].width, ratio = width / narrowest;
  const Index slot_codes = m * narrowest / 8;
  return {base + (slot % ratio) * slot_codes, width * (slot / ratio)};
}

[[nodiscard]] constexpr PlaneSlot plane_slot(int bits, int plane, Index m, int slot) {
  return plane_slot(planes_for_bits(bits), plane, m, slot);
}

// True when every run of `lanes` positions the kernels visit in the short block of a
// `bits`-wide matrix (runs start at multiples of `lanes` within a slot of the narrowest
// plane) lies inside one group: the block is one group, or both the slot length and the
// group size are multiples of `lanes` (the block starts at a multiple of 256).
[[nodiscard]] inline bool short_block_runs_in_one_group(const ShortBlockPlan& plan, int bits, Index lanes) {
  return plan.group_count <= 1 || (short_slot_codes(bits, plan.codes) % lanes == 0 && plan.group_size % lanes == 0);
}

// Everything a row kernel reads besides the packed rows, for either vector width.
struct GemvRowsArgs {
  const float* x;                     // kernel order (gemv_input.hpp), block padded
  const float* group_sums;            // S_g
  const LaneGroups* lane_groups;      // ScaleMode::PerLane
  const ShortBlockPlan* short_block;  // the row's short last block
  Index full_blocks;                  // 256-code blocks before the short block
  Index full_units;                   // units of the full blocks that hold codes of the row
  Index groups;                       // groups per row
  Index units_per_group;              // ScaleMode::PerGroup: units between scale applications
  const std::uint8_t* storage_end;    // end of the packed codes (see kOverread)
  Index row_bytes;                    // stride of the packed rows (prefetch.hpp)
  const std::uint8_t* packed;         // the matrix: row r's codes at packed + r row_bytes,
  const float* scales;                // its scales and zeros at + r groups
  const float* zeros;
  const float *scales_end, *zeros_end;  // end of the scales and zeros
};

}  // namespace lowbit::detail

// AVX2 GEMV kernels: the AVX-512 scheme (gemv_avx512.hpp) on 8 lanes. A unit is 32
// codes; slice (u, b) of a full block holds code 32u + 4k + b in lane k:
//   plane width p, L = 32p bytes:  lane byte (32u) % L + 4k + b,  bit 8b + p * (32u / L).
// vpermps reads 3 index bits, so codes of 1..3 bits decode with one permute; wider
// codes are masked and converted. A row's short last block is read in place in
// natural order (gemv_short_block.hpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "lowbit/core/isa.hpp"
#include "lowbit/kernels/gemv_input.hpp"
#include "lowbit/kernels/gemv_short_block.hpp"
#include "lowbit/kernels/prefetch.hpp"
#include "lowbit/pack/layout.hpp"

#if defined(LOWBIT_HAVE_AVX2)

namespace lowbit::detail::avx2 {

inline constexpr int kLanes = 8;
inline constexpr Index kUnit = 32;  // codes per unit: 4 slices of 8 lanes

// Plane P's bits of slice (U, B), at the code's bit position in each lane (other bits
// garbage). Loading at byte offset B puts lane byte B at bit 0.
template <int Bits, int P, int U, int B>
LOWBIT_TARGET_AVX2 inline __m256i plane_slice(const std::uint8_t* block) {
  constexpr PlaneSet set = planes_for_bits(Bits);
  constexpr Plane plane = set.planes[P];
  constexpr int L = 32 * plane.width;
  const __m256i v = _mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(block + plane_byte_offset(set, P) + (32 * U) % L + B));
  const int shift = plane.width * (32 * U / L) - plane.shift;
  if (shift > 0) return _mm256_srl_epi32(v, _mm_cvtsi32_si128(shift));
  if (shift < 0) return _mm256_sll_epi32(v, _mm_cvtsi32_si128(-shift));
  return v;
}

template <int Bits, int P, int U, int B>
LOWBIT_TARGET_AVX2 inline __m256i combine_planes(const std::uint8_t* block) {
  constexpr PlaneSet set = planes_for_bits(Bits);
  constexpr Plane plane = set.planes[P];
  const __m256i part = _mm256_and_si256(plane_slice<Bits, P, U, B>(block),
                                        _mm256_set1_epi32(((1 << plane.width) - 1) << plane.shift));
  if constexpr (P + 1 < set.count) return _mm256_or_si256(part, combine_planes<Bits, P + 1, U, B>(block));
  else return part;
}

// Entry i is float(i & max_code), for the permute decode of codes up to 3 bits.
template <int Bits>
LOWBIT_TARGET_AVX2 inline __m256 decode_table() {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cvtepi32_ps(_mm256_and_si256(index, _mm256_set1_epi32((1 << std::min(Bits, 3)) - 1)));
}

template <int Bits, int U, int B>
LOWBIT_TARGET_AVX2 inline __m256 decode_slice(const std::uint8_t* block, __m256 table) {
  if constexpr (Bits == 1 || Bits == 2) {
    return _mm256_permutevar8x32_ps(table, plane_slice<Bits, 0, U, B>(block));
  } else if constexpr (Bits == 3) {
    const __m256i low = _mm256_and_si256(plane_slice<3, 0, U, B>(block), _mm256_set1_epi32(3));
    const __m256i high = _mm256_andnot_si256(_mm256_set1_epi32(3), plane_slice<3, 1, U, B>(block));
    return _mm256_permutevar8x32_ps(table, _mm256_or_si256(low, high));  // bits above 2 are ignored
  } else if constexpr (Bits == 4 || Bits == 8) {
    const __m256i lane = plane_slice<Bits, 0, U, B>(block);
    return _mm256_cvtepi32_ps(_mm256_and_si256(lane, _mm256_set1_epi32((1 << Bits) - 1)));
  } else {
    return _mm256_cvtepi32_ps(combine_planes<Bits, 0, U, B>(block));
  }
}

template <int Bits, int Rows, int U, int B>
LOWBIT_TARGET_AVX2 inline void slice_fma(const std::uint8_t* const* blocks, const float* x_unit, __m256 table,
                                         __m256* acc) {
  const __m256 x = in_register(_mm256_loadu_ps(x_unit + kLanes * B));
  for (int r = 0; r < Rows; ++r) acc[r] = _mm256_fmadd_ps(decode_slice<Bits, U, B>(blocks[r], table), x, acc[r]);
}

// Sum of the 8 lanes in a fixed order.
LOWBIT_TARGET_AVX2 inline float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lanes [0, count) set, for maskload.
LOWBIT_TARGET_AVX2 inline __m256i first_lanes(Index count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<Index>(count, kLanes))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// total - sum_g s_g z_g S_g, 8 groups at a time, spread over the lanes (one reduction
// per row then gives y).
LOWBIT_TARGET_AVX2 inline __m256 subtract_zero_correction(__m256 total, const float* scales, const float* zeros,
                                                          const float* sums, Index groups) {
  for (Index g = 0; g < groups; g += kLanes) {
    const __m256i mask = first_lanes(groups - g);
    const __m256 sz = _mm256_mul_ps(_mm256_maskload_ps(scales + g, mask), _mm256_maskload_ps(zeros + g, mask));
    total = _mm256_fnmadd_ps(sz, _mm256_maskload_ps(sums + g, mask), total);
  }
  return total;
}

// sum_g s_g z_g S_g.
LOWBIT_TARGET_AVX2 inline float zero_correction(const float* scales, const float* zeros, const float* sums,
                                                Index groups) {
  return -reduce_add(subtract_zero_correction(_mm256_setzero_ps(), scales, zeros, sums, groups));
}

template <int Bits, int Rows, ScaleMode Mode, int U>
LOWBIT_TARGET_AVX2 inline bool unit_step(const GemvRowsArgs& args, const std::uint8_t* const* blocks,
                                         const float* const* scales, const float* x_block, __m256 table,
                                         Index& unit, Index& group, Index& units_left, __m256* acc,
                                         __m256* total) {
  const Index units = args.full_units;
  if (unit >= units) return false;
  const float* x_unit = x_block + kUnit * U;
  slice_fma<Bits, Rows, U, 0>(blocks, x_unit, table, acc);
  slice_fma<Bits, Rows, U, 1>(blocks, x_unit, table, acc);
  slice_fma<Bits, Rows, U, 2>(blocks, x_unit, table, acc);
  slice_fma<Bits, Rows, U, 3>(blocks, x_unit, table, acc);
  if constexpr (Mode == ScaleMode::PerLane) {
    const LaneGroups& plan = *args.lane_groups;
    const auto u = static_cast<std::size_t>(unit);
    const __m256i index = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plan.offset.data() + u * kLanes));
    const __m256i mask = first_lanes(plan.count[u]);
    for (int r = 0; r < Rows; ++r) {
      const __m256 s = _mm256_permutevar8x32_ps(_mm256_maskload_ps(scales[r] + plan.first[u], mask), index);
      total[r] = _mm256_fmadd_ps(s, acc[r], total[r]);
      acc[r] = _mm256_setzero_ps();
    }
  } else {
    if (--units_left == 0 || unit + 1 == units) {
      for (int r = 0; r < Rows; ++r) {
        total[r] = _mm256_fmadd_ps(_mm256_set1_ps(scales[r][group]), acc[r], total[r]);
        acc[r] = _mm256_setzero_ps();
      }
      ++group;
      units_left = args.units_per_group;
    }
  }
  ++unit;
  return true;
}

// The 8 units of one block; false once the row has ended.
template <int Bits, int Rows, ScaleMode Mode>
LOWBIT_TARGET_AVX2 inline bool block_step(const GemvRowsArgs& args, const std::uint8_t* const* blocks,
                                          const float* const* scales, const float* x_block, __m256 table,
                                          Index& unit, Index& group, Index& units_left, __m256* acc, __m256* total) {
  return unit_step<Bits, Rows, Mode, 0>(args, blocks, scales, x_block, table, unit, group, units_left, acc, total) &&
         unit_step<Bits, Rows, Mode, 1>(args, blocks, scales, x_block, table, unit, group, units_left, acc, total) &&
         unit_step<Bits, Rows, Mode, 2>(args, blocks, scales, x_block, table, unit, group, units_left, acc, total) &&
         unit_step<Bits, Rows, Mode, 3>(args, blocks, scales, x_block, table, unit, group, units_left, acc, total) &&
         unit_step<Bits, Rows, Mode, 4>(args, blocks, scales, x_block, table, unit, group, units_left, acc, total) &&
         unit_step<Bits, Rows, Mode, 5>(args, blocks, scales, x_block, table, unit, group, units_left, acc, total) &&
         unit_step<Bits, Rows, Mode, 6>(args, blocks, scales, x_block, table, unit, group, units_left, acc, total) &&
         unit_step<Bits, Rows, Mode, 7>(args, blocks, scales, x_block, table, unit, group, units_left, acc, total);
}

// Codes of positions slot * L_min + within + k (lane k < count, count 4 or 8) of a
// short block of m codes, as 32-bit integers; lanes past count hold 0.
template <int Bits>
LOWBIT_TARGET_AVX2 inline __m256i short_codes(const std::uint8_t* block, Index m, int slot, Index within,
                                              Index count) {
  constexpr PlaneSet set = planes_for_bits(Bits);
  __m256i codes = _mm256_setzero_si256();
  for (int plane = 0; plane < set.count; ++plane) {
    const PlaneSlot where = plane_slot(set, plane, m, slot);
    const int width = set.planes[static_cast<std::size_t>(plane)].width;
    const std::uint8_t* source = block + where.byte + within;
    std::int32_t word;  // L_min is a multiple of 4 bytes: a slot ends on 4 or 8 bytes
    std::memcpy(&word, source, sizeof word);
    const __m128i loaded = count >= kLanes ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(source))
                                           : _mm_cvtsi32_si128(word);
    const __m256i bytes = _mm256_cvtepu8_epi32(loaded);
    if (width == 8) return bytes;  // one plane, one slot
    const __m256i bits = _mm256_and_si256(_mm256_srl_epi32(bytes, _mm_cvtsi32_si128(where.shift)),
                                          _mm256_set1_epi32((1 << width) - 1));
    if (set.count == 1) return bits;
    const int shift = set.planes[static_cast<std::size_t>(plane)].shift;
    codes = _mm256_or_si256(codes, shift == 0 ? bits : _mm256_sll_epi32(bits, _mm_cvtsi32_si128(shift)));
  }
  return codes;
}

// The scales of a short block's positions for one row: a permute of the block's scales
// when they fit one vector, else a gather.
struct ShortScales {
  const float* scales;  // the row's scale of the block's first group
  __m256 table;         // its group_count scales, when permuting
};

LOWBIT_TARGET_AVX2 inline ShortScales short_scales(const ShortBlockPlan& plan, const float* row_scales) {
  const float* scales = row_scales + plan.first_group;
  if (plan.group_count > kLanes) return {scales, _mm256_setzero_ps()};
  return {scales, _mm256_maskload_ps(scales, first_lanes(plan.group_count))};
}

LOWBIT_TARGET_AVX2 inline __m256 position_scales(const ShortBlockPlan& plan, const ShortScales& row, __m256i group) {
  if (plan.group_count > kLanes) return _mm256_i32gather_ps(row.scales, group, 4);
  return _mm256_permutevar8x32_ps(row.table, group);
}

// total[r] += s_g(j) q_rj x_j over the short block of Rows rows (see gemv_avx512.hpp:
// vectors inside one group accumulate q x and are scaled when the group ends).
template <int Bits, int Rows, bool Gather>
LOWBIT_TARGET_AVX2 inline void short_block_rows(const GemvRowsArgs& args, const std::uint8_t* const* rows,
                                                const float* const* scales, __m256* total_out) {
  const ShortBlockPlan& plan = *args.short_block;
  constexpr int slots = short_slots(Bits), narrowest = narrowest_plane(Bits);
  const Index m = plan.codes, slot_codes = m * narrowest / 8;
  const std::uint8_t* blocks[Rows];
  const float* block_scales[Rows];
  __m256 table[Rows], total[Rows], acc[Rows];
  const __m256i group_mask = first_lanes(plan.group_count);
  for (int r = 0; r < Rows; ++r) {
    blocks[r] = rows[r] + plan.begin * Bits / 8;
    block_scales[r] = scales[r] + plan.first_group;
    table[r] = Gather ? _mm256_setzero_ps() : _mm256_maskload_ps(block_scales[r], group_mask);
    total[r] = total_out[r];
    acc[r] = _mm256_setzero_ps();
  }
  std::int32_t current = 0;  // the group acc belongs to
  const float* x = args.x + plan.begin;
  for (int slot = 0; slot < slots; ++slot) {
    for (Index within = 0; within < slot_codes; within += kLanes) {
      const Index j = slot * slot_codes + within, count = std::min<Index>(kLanes, slot_codes - within);
      const __m256 xj = _mm256_maskload_ps(x + j, first_lanes(count));
      __m256 q[Rows];
      for (int r = 0; r < Rows; ++r) q[r] = _mm256_cvtepi32_ps(short_codes<Bits>(blocks[r], m, slot, within, count));
      const std::int32_t first = plan.group[static_cast<std::size_t>(j)];
      if (first == plan.group[static_cast<std::size_t>(j + count - 1)]) {
        if (first != current) {
          for (int r = 0; r < Rows; ++r) {
            total[r] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(block_scales[r][current]), total[r]);
            acc[r] = _mm256_setzero_ps();
          }
          current = first;
        }
        for (int r = 0; r < Rows; ++r) acc[r] = _mm256_fmadd_ps(q[r], xj, acc[r]);
      } else {
        const __m256i group = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plan.group.data() + j));
        for (int r = 0; r < Rows; ++r) {
          const __m256 s = Gather ? _mm256_i32gather_ps(block_scales[r], group, 4) : _mm256_permutevar8x32_ps(table[r], group);
          total[r] = _mm256_fmadd_ps(_mm256_mul_ps(q[r], xj), s, total[r]);
        }
      }
    }
  }
  for (int r = 0; r < Rows; ++r)
    total_out[r] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(block_scales[r][current]), total[r]);
}

template <int Bits, int Rows>
LOWBIT_TARGET_AVX2 inline void short_block_fma(const GemvRowsArgs& args, const std::uint8_t* const* rows,
                                               const float* const* scales, __m256* total) {
  if (args.short_block->group_count > kLanes) short_block_rows<Bits, Rows, true>(args, rows, scales, total);
  else short_block_rows<Bits, Rows, false>(args, rows, scales, total);
}

template <int Bits, int Rows, ScaleMode Mode>
LOWBIT_TARGET_AVX2 void gemv_rows(const GemvRowsArgs& args, const std::uint8_t* const* rows,
                                  const float* const* scales, const float* const* zeros, float* y) {
  constexpr Index block_bytes = kBlockCodes * Bits / 8;
  __m256 acc[Rows], total[Rows];
  for (int r = 0; r < Rows; ++r) acc[r] = total[r] = _mm256_setzero_ps();
  if (args.full_blocks > 0) {
    prefetch_next_row_params(scales, zeros, Rows, args.groups, args.scales_end, args.zeros_end);
    // A last full block whose overread would leave the storage is read from a copy.
    alignas(32) std::uint8_t tail[Rows][block_bytes + kOverread];
    Index direct_blocks[Rows];
    for (int r = 0; r < Rows; ++r) {
      direct_blocks[r] = direct_full_blocks(rows[r], args.full_blocks, block_bytes, args.storage_end);
      if (direct_blocks[r] == args.full_blocks) continue;
      const std::uint8_t* last = rows[r] + direct_blocks[r] * block_bytes;
      std::copy(last, last + block_bytes, tail[r]);
      std::fill(tail[r] + block_bytes, tail[r] + block_bytes + kOverread, std::uint8_t{0});
    }
    const __m256 table = decode_table<Bits>();
    Index unit = 0, group = 0, units_left = args.units_per_group;
    for (Index blk = 0; blk < args.full_blocks; ++blk) {
      const std::uint8_t* block[Rows];
      for (int r = 0; r < Rows; ++r) block[r] = blk < direct_blocks[r] ? rows[r] + blk * block_bytes : tail[r];
      prefetch_next_rows(rows, Rows, args.row_bytes, block_bytes, blk, args.storage_end);
      if (!block_step<Bits, Rows, Mode>(args, block, scales, args.x + blk * kBlockCodes, table, unit, group,
                                        units_left, acc, total))
        break;
    }
  }
  if (args.short_block->codes > 0) short_block_fma<Bits, Rows>(args, rows, scales, total);
  for (int r = 0; r < Rows; ++r)
    y[r] = reduce_add(subtract_zero_correction(total[r], scales[r], zeros[r], args.group_sums, args.groups));
}

// acc[4U + b] += codes of slice (U, b) * a.
template <int Bits, int U>
LOWBIT_TARGET_AVX2 inline void transposed_unit(const std::uint8_t* block, __m256 table, __m256 a, __m256* acc) {
  acc[4 * U + 0] = _mm256_fmadd_ps(decode_slice<Bits, U, 0>(block, table), a, acc[4 * U + 0]);
  acc[4 * U + 1] = _mm256_fmadd_ps(decode_slice<Bits, U, 1>(block, table), a, acc[4 * U + 1]);
  acc[4 * U + 2] = _mm256_fmadd_ps(decode_slice<Bits, U, 2>(block, table), a, acc[4 * U + 2]);
  acc[4 * U + 3] = _mm256_fmadd_ps(decode_slice<Bits, U, 3>(block, table), a, acc[4 * U + 3]);
}

// Output-axis groups: the 256 outputs of full block column `blk` (see gemv_avx512.hpp).
template <int Bits, ScaleMode Mode>
LOWBIT_TARGET_AVX2 void gemv_transposed_block(const QuantizedMatrix<float>& W, const float* x,
                                              const LaneGroups* lane_groups, Index blk, float* y) {
  constexpr Index block_bytes = kBlockCodes * Bits / 8;
  const Index n = W.stored_cols(), group = W.group_length(), groups = W.groups_per_row();
  const Index begin = blk * kBlockCodes, length = std::min(kBlockCodes, n - begin);
  const Index units = (length + kUnit - 1) / kUnit, first_unit = begin / kUnit;
  const Index first_group = begin / group, last_group = (begin + length - 1) / group;
  const __m256 table = decode_table<Bits>();
  __m256 acc[32];
  for (auto& a : acc) a = _mm256_setzero_ps();
  float offsets[kBlockCodes] = {};
  alignas(32) std::uint8_t tail[block_bytes + kOverread] = {};
  const std::uint8_t* storage_end = W.packed_codes().data() + W.packed_codes().size();
  for (Index i = 0; i < W.stored_rows(); ++i) {
    const std::uint8_t* block = W.packed_row(i) + blk * block_bytes;
    if (direct_full_blocks(block, 1, block_bytes, storage_end) == 0) {
      std::copy(block, block + block_bytes, tail);
      block = tail;
    }
    const float* scales = W.scales().data() + i * groups;
    const float* zeros = W.zeros().data() + i * groups;
    for (Index g = first_group; g <= last_group; ++g) offsets[g - first_group] += scales[g] * x[i] * zeros[g];
    __m256 a[8];
    for (Index u = 0; u < units; ++u) {
      if constexpr (Mode == ScaleMode::PerLane) {
        const auto plan_unit = static_cast<std::size_t>(first_unit + u);
        const __m256i index =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lane_groups->offset.data() + plan_unit * kLanes));
        const __m256 s = _mm256_maskload_ps(scales + lane_groups->first[plan_unit],
                                            first_lanes(lane_groups->count[plan_unit]));
        a[u] = _mm256_mul_ps(_mm256_permutevar8x32_ps(s, index), _mm256_set1_ps(x[i]));
      } else {
        a[u] = _mm256_set1_ps(scales[(begin + kUnit * u) / group] * x[i]);
      }
    }
    for (Index u = units; u < 8; ++u) a[u] = a[units - 1];  // zero codes past the end
    transposed_unit<Bits, 0>(block, table, a[0], acc);
    transposed_unit<Bits, 1>(block, table, a[1], acc);
    transposed_unit<Bits, 2>(block, table, a[2], acc);
    transposed_unit<Bits, 3>(block, table, a[3], acc);
    transposed_unit<Bits, 4>(block, table, a[4], acc);
    transposed_unit<Bits, 5>(block, table, a[5], acc);
    transposed_unit<Bits, 6>(block, table, a[6], acc);
    transposed_unit<Bits, 7>(block, table, a[7], acc);
  }
  alignas(32) float lanes[kBlockCodes];
  for (int s = 0; s < 32; ++s) _mm256_store_ps(lanes + kLanes * s, acc[s]);
  for (Index o = 0; o < length; ++o)
    y[begin + o] = lanes[lane_position(o, kLanes)] - offsets[(begin + o) / group - first_group];
}

// Output-axis groups, the short last block column (see gemv_avx512.hpp).
template <int Bits>
LOWBIT_TARGET_AVX2 void gemv_transposed_short_block(const QuantizedMatrix<float>& W, const float* x,
                                                    const ShortBlockPlan& plan, float* y) {
  const Index n = W.stored_cols(), groups = W.groups_per_row();
  constexpr int slots = short_slots(Bits), narrowest = narrowest_plane(Bits);
  const Index m = plan.codes, slot_codes = m * narrowest / 8, length = n - plan.begin;
  __m256 acc[kBlockCodes / kLanes + slots];
  for (auto& a : acc) a = _mm256_setzero_ps();
  float offsets[kBlockCodes] = {};  // sum_i a_ig z_ig per group of the block
  for (Index i = 0; i < W.stored_rows(); ++i) {
    const std::uint8_t* block = W.packed_row(i) + plan.begin * Bits / 8;
    const float* scales = W.scales().data() + i * groups;
    const float* zeros = W.zeros().data() + i * groups;
    for (std::int32_t g = 0; g < plan.group_count; ++g)
      offsets[g] += scales[plan.first_group + g] * x[i] * zeros[plan.first_group + g];
    const ShortScales row_scales = short_scales(plan, scales);
    const __m256 xi = _mm256_set1_ps(x[i]);
    int vector = 0;
    for (int slot = 0; slot < slots; ++slot) {
      for (Index within = 0; within < slot_codes; within += kLanes, ++vector) {
        const Index j = slot * slot_codes + within, count = std::min<Index>(kLanes, slot_codes - within);
        const __m256i group = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plan.group.data() + j));
        const __m256 a = _mm256_mul_ps(position_scales(plan, row_scales, group), xi);
        const __m256 q = _mm256_cvtepi32_ps(short_codes<Bits>(block, m, slot, within, count));
        acc[vector] = _mm256_fmadd_ps(q, a, acc[vector]);
      }
    }
  }
  alignas(32) float out[kBlockCodes + kLanes];
  int vector = 0;
  for (int slot = 0; slot < slots; ++slot)
    for (Index within = 0; within < slot_codes; within += kLanes, ++vector)
      _mm256_storeu_ps(out + slot * slot_codes + within, acc[vector]);  // ascending: overhang is overwritten
  for (Index o = 0; o < length; ++o) y[plan.begin + o] = out[o] - offsets[plan.group[static_cast<std::size_t>(o)]];
}

}  // namespace lowbit::detail::avx2

#endif  // LOWBIT_HAVE_AVX2

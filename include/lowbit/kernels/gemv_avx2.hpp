// AVX2 GEMV kernels: the AVX-512 scheme (gemv_avx512.hpp) on 8 lanes. A unit is 32
// codes; slice (u, b) of a full block holds code 32u + 4k + b in lane k:
//   plane width p, L = 32p bytes:  lane byte (32u) % L + 4k + b,  bit 8b + p * (32u / L).
// vpermps reads 3 index bits, so codes of 1..3 bits decode with one permute; wider
// codes are masked and converted.
#pragma once

#include <algorithm>
#include <cstdint>

#include "lowbit/core/isa.hpp"
#include "lowbit/kernels/gemv_input.hpp"
#include "lowbit/pack/avx2.hpp"
#include "lowbit/pack/layout.hpp"
#include "lowbit/pack/scalar.hpp"

#if defined(LOWBIT_HAVE_AVX2)

namespace lowbit::detail::avx2 {

inline constexpr int kLanes = 8;
inline constexpr Index kUnit = 32;  // codes per unit: 4 slices of 8 lanes

[[nodiscard]] constexpr int plane_byte_offset(const PlaneSet& set, int plane) {
  int offset = 0;
  for (int k = 0; k < plane; ++k) offset += 32 * set.planes[static_cast<std::size_t>(k)].width;
  return offset;
}

// Loads for lane byte b start b bytes into a plane: a kernel may read this many bytes
// past a block (callers copy a row's last block when that would leave the storage).
inline constexpr Index kOverread = 3;

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
  const __m256 x = _mm256_loadu_ps(x_unit + kLanes * B);
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

struct GemvRowsArgs {
  const float* x;             // lane order, block padded
  const float* group_sums;    // S_g
  const LaneGroups* lane_groups;
  Index n;                    // stored columns
  Index groups;               // groups per row
  Index units_per_group;      // ScaleMode::PerGroup: units between scale applications
  const std::uint8_t* storage_end;  // end of the packed codes (see kOverread)
};

// sum_g s_g z_g S_g, 8 groups at a time.
LOWBIT_TARGET_AVX2 inline float zero_correction(const float* scales, const float* zeros, const float* sums,
                                                Index groups) {
  __m256 acc = _mm256_setzero_ps();
  for (Index g = 0; g < groups; g += kLanes) {
    const __m256i mask = first_lanes(groups - g);
    const __m256 sz = _mm256_mul_ps(_mm256_maskload_ps(scales + g, mask), _mm256_maskload_ps(zeros + g, mask));
    acc = _mm256_fmadd_ps(sz, _mm256_maskload_ps(sums + g, mask), acc);
  }
  return reduce_add(acc);
}

template <int Bits, int Rows, ScaleMode Mode, int U>
LOWBIT_TARGET_AVX2 inline bool unit_step(const GemvRowsArgs& args, const std::uint8_t* const* blocks,
                                         const float* const* scales, const float* x_block, __m256 table,
                                         Index& unit, Index& group, Index& units_left, __m256* acc,
                                         __m256* total) {
  const Index units = (args.n + kUnit - 1) / kUnit;
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

template <int Bits, int Rows, ScaleMode Mode>
LOWBIT_TARGET_AVX2 void gemv_rows(const GemvRowsArgs& args, const std::uint8_t* const* rows,
                                  const float* const* scales, const float* const* zeros, float* y) {
  constexpr Index block_bytes = kBlockCodes * Bits / 8;
  const Index blocks = (args.n + kBlockCodes - 1) / kBlockCodes, full_blocks = args.n / kBlockCodes;
  // The last block is read from a copy when it is short (repacked as a zero-padded full
  // block) or when reading it would leave the storage.
  alignas(32) std::uint8_t tail[Rows][block_bytes + kOverread];
  Index direct_blocks[Rows];
  for (int r = 0; r < Rows; ++r) {
    const std::uint8_t* last = rows[r] + (blocks - 1) * block_bytes;
    direct_blocks[r] = blocks;
    if (full_blocks < blocks) {
      std::uint8_t codes[kBlockCodes] = {};
      scalar::unpack_block(last, padded_codes(args.n) - full_blocks * kBlockCodes, Bits, codes);
      pack_full_block<Bits>(codes, tail[r]);
      direct_blocks[r] = blocks - 1;
    } else if (args.storage_end - last < block_bytes + kOverread) {
      std::copy(last, last + block_bytes, tail[r]);
      direct_blocks[r] = blocks - 1;
    }
    std::fill(tail[r] + block_bytes, tail[r] + block_bytes + kOverread, std::uint8_t{0});
  }
  const __m256 table = decode_table<Bits>();
  __m256 acc[Rows], total[Rows];
  for (int r = 0; r < Rows; ++r) acc[r] = total[r] = _mm256_setzero_ps();
  Index unit = 0, group = 0, units_left = args.units_per_group;
  for (Index blk = 0; blk < blocks; ++blk) {
    const std::uint8_t* block[Rows];
    for (int r = 0; r < Rows; ++r) block[r] = blk < direct_blocks[r] ? rows[r] + blk * block_bytes : tail[r];
    if (!block_step<Bits, Rows, Mode>(args, block, scales, args.x + blk * kBlockCodes, table, unit, group,
                                      units_left, acc, total))
      break;
  }
  for (int r = 0; r < Rows; ++r)
    y[r] = reduce_add(total[r]) - zero_correction(scales[r], zeros[r], args.group_sums, args.groups);
}

// acc[4U + b] += codes of slice (U, b) * a.
template <int Bits, int U>
LOWBIT_TARGET_AVX2 inline void transposed_unit(const std::uint8_t* block, __m256 table, __m256 a, __m256* acc) {
  acc[4 * U + 0] = _mm256_fmadd_ps(decode_slice<Bits, U, 0>(block, table), a, acc[4 * U + 0]);
  acc[4 * U + 1] = _mm256_fmadd_ps(decode_slice<Bits, U, 1>(block, table), a, acc[4 * U + 1]);
  acc[4 * U + 2] = _mm256_fmadd_ps(decode_slice<Bits, U, 2>(block, table), a, acc[4 * U + 2]);
  acc[4 * U + 3] = _mm256_fmadd_ps(decode_slice<Bits, U, 3>(block, table), a, acc[4 * U + 3]);
}

// Output-axis groups: the 256 outputs of block column `blk` (see gemv_avx512.hpp).
template <int Bits, ScaleMode Mode>
LOWBIT_TARGET_AVX2 void gemv_transposed_block(const QuantizedMatrix<float>& W, const float* x,
                                              const LaneGroups* lane_groups, Index blk, float* y) {
  constexpr Index block_bytes = kBlockCodes * Bits / 8;
  const Index n = W.stored_cols(), group = W.group_length(), groups = W.groups_per_row();
  const Index begin = blk * kBlockCodes, length = std::min(kBlockCodes, n - begin);
  const Index units = (length + kUnit - 1) / kUnit, first_unit = begin / kUnit;
  const Index first_group = begin / group, last_group = (begin + length - 1) / group;
  const bool full = length == kBlockCodes;
  const __m256 table = decode_table<Bits>();
  __m256 acc[32];
  for (auto& a : acc) a = _mm256_setzero_ps();
  float offsets[kBlockCodes] = {};
  alignas(32) std::uint8_t tail[block_bytes + kOverread] = {};
  const std::uint8_t* storage_end = W.packed_codes().data() + W.packed_codes().size();
  for (Index i = 0; i < W.stored_rows(); ++i) {
    const std::uint8_t* block = W.packed_row(i) + blk * block_bytes;
    if (!full) {  // a short last block, repacked as a full one
      std::uint8_t codes[kBlockCodes] = {};
      scalar::unpack_block(block, padded_codes(length), Bits, codes);
      pack_full_block<Bits>(codes, tail);
      block = tail;
    } else if (storage_end - block < block_bytes + kOverread) {
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

}  // namespace lowbit::detail::avx2

#endif  // LOWBIT_HAVE_AVX2

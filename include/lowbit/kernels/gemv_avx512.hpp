// AVX-512 GEMV kernels: fused unpack + FMA straight from the packed layout.
//
// A block's plane bytes are read as 32-bit lanes; for slice (u, b) of a full block
// (u = 64-code unit, b = byte within the lane) code 64u + 4k + b sits in lane k at
// (pack/layout.hpp):
//   plane width p, L = 32p bytes:  lane byte (64u) % L + 4k + b,  bit 8b + p * (64u / L)
// (the 32-byte 1-bit plane is read twice, the upper 8 lanes one bit later). Codes of up
// to 4 bits become floats with one permute from a 16-entry table (vpermps reads only
// the low 4 bits of each lane, so no mask is needed); wider codes are masked and
// converted. x was shuffled into this lane order once per call (gemv_input.hpp).
// 2-, 3- and 4-bit blocks are decoded from "nibble vectors" (below), loaded once per
// block, which saves the shifts and the cache-line-splitting loads that dominate a
// compute-bound GEMV.
// Per row: y_r = sum_g s_g * (sum_{j in g} q_j x_j) - sum_g s_g z_g S_g.
// A row's short last block is read in place in natural order (gemv_short_block.hpp).
#pragma once

#include <algorithm>
#include <cstdint>

#include "lowbit/core/isa.hpp"
#include "lowbit/kernels/gemv_input.hpp"
#include "lowbit/kernels/gemv_short_block.hpp"
#include "lowbit/kernels/prefetch.hpp"
#include "lowbit/pack/layout.hpp"

#if defined(LOWBIT_HAVE_AVX512)

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 AVX-512 headers, see pack/avx512.hpp
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace lowbit::detail::avx512 {

inline constexpr int kLanes = 16;
inline constexpr Index kUnit = 64;  // codes per unit: 4 slices of 16 lanes

// Lanes [0, count) set.
[[nodiscard]] inline __mmask16 first_lanes(Index count) {
  return static_cast<__mmask16>(count >= kLanes ? 0xFFFF : (1u << count) - 1u);
}

// Plane P's bits of slice (U, B) of a full block, at the code's bit position
// (plane.shift) in each lane; the lane's other bits are garbage. Loading at byte offset
// B puts lane byte B at bit 0, so only the bit within the byte needs a shift.
template <int Bits, int P, int U, int B>
LOWBIT_TARGET_AVX512 inline __m512i plane_slice(const std::uint8_t* block) {
  constexpr PlaneSet set = planes_for_bits(Bits);
  constexpr Plane plane = set.planes[P];
  constexpr int L = 32 * plane.width;
  const std::uint8_t* bytes = block + plane_byte_offset(set, P) + B;
  __m512i v;
  int bit;
  if constexpr (L >= 64) {
    v = _mm512_loadu_si512(bytes + (64 * U) % L);
    bit = plane.width * (64 * U / L);
  } else {  // 1-bit plane: code 64u + 4k + b is at bit 2u + k/8 of byte 4(k%8) + b
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
    v = _mm512_inserti64x4(_mm512_castsi256_si512(half), _mm256_srli_epi32(half, 1), 1);
    bit = 2 * U;
  }
  const int shift = bit - plane.shift;
  if (shift > 0) return _mm512_srl_epi32(v, _mm_cvtsi32_si128(shift));
  if (shift < 0) return _mm512_sll_epi32(v, _mm_cvtsi32_si128(-shift));
  return v;
}

// OR of the planes P.. of a code wider than 4 bits, each masked to its own bits.
template <int Bits, int P, int U, int B>
LOWBIT_TARGET_AVX512 inline __m512i combine_planes(const std::uint8_t* block) {
  constexpr PlaneSet set = planes_for_bits(Bits);
  constexpr Plane plane = set.planes[P];
  const __m512i part = _mm512_and_si512(plane_slice<Bits, P, U, B>(block),
                                        _mm512_set1_epi32(((1 << plane.width) - 1) << plane.shift));
  if constexpr (P + 1 < set.count) return _mm512_or_si512(part, combine_planes<Bits, P + 1, U, B>(block));
  else return part;
}

// Permute tables: entry i of `low` is float(i & max_code); for 2-bit codes, where the
// 4 index bits hold two codes, entry i of `high` is float(i >> 2). The `words` forms
// hold the same tables for vpermw (32 entries of 16 bits, entry i = the upper half of
// the float of entry i % 16: a small integer's float has a zero lower half).
struct DecodeTables {
  __m512 low, high;
  __m512i low_words, high_words;
};

// Entries i % 16 of `table` as the upper 16 bits of 32 words.
LOWBIT_TARGET_AVX512 inline __m512i word_table(__m512 table) {
  const __m512i upper = _mm512_srli_epi32(_mm512_castps_si512(table), 16);  // entry k in word 2k
  // Word i takes word 2 (i % 16).
  return _mm512_permutexvar_epi16(
      _mm512_setr_epi32(0x00020000, 0x00060004, 0x000A0008, 0x000E000C, 0x00120010, 0x00160014, 0x001A0018, 0x001E001C,
                        0x00020000, 0x00060004, 0x000A0008, 0x000E000C, 0x00120010, 0x00160014, 0x001A0018, 0x001E001C),
      upper);
}

template <int Bits>
LOWBIT_TARGET_AVX512 inline DecodeTables decode_tables() {
  const __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 low = _mm512_cvtepi32_ps(_mm512_and_si512(index, _mm512_set1_epi32((1 << std::min(Bits, 4)) - 1)));
  const __m512 high = _mm512_cvtepi32_ps(_mm512_srli_epi32(index, 2));
  return {low, high, word_table(low), word_table(high)};
}

// 3-bit codes of a whole block as two vectors of nibbles: nibble 8b + 4h of `even`
// holds slice (2h, b), that of `odd` slice (2h + 1, b). Bits 0-1 come from the 2-bit
// plane (slice (u, b) at bit 8b + 2u), bit 2 from the 1-bit plane read the same way.
template <int Odd>
LOWBIT_TARGET_AVX512 inline __m512i three_bit_nibbles(const std::uint8_t* block) {
  const __m512i low = _mm512_loadu_si512(block);
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64));
  const __m512i high = _mm512_inserti64x4(_mm512_castsi256_si512(half), _mm256_srli_epi32(half, 1), 1);
  const __m512i keep = _mm512_set1_epi32(0x33333333);
  if constexpr (Odd) return _mm512_ternarylogic_epi32(_mm512_srli_epi32(low, 2), high, keep, 0xE4);
  else return _mm512_ternarylogic_epi32(low, _mm512_slli_epi32(high, 2), keep, 0xE4);  // (a & c) | (b & ~c)
}

// Nibble vectors. A full block of 2-, 3- or 4-bit codes is one or two vectors whose
// 32-bit lanes hold eight 4-bit fields (field f at bits 4f .. 4f + 3); slice (u, b)
// is field 2b + u/2 of vector `vector`:
//   4-bit: the two 64-byte halves of the plane (slice (u, b) at byte (64u) % 128 + 4k + b,
//          bit 4 (u / 2)), vector u % 2;
//   3-bit: three_bit_nibbles, vector u % 2;
//   2-bit: the 64-byte plane (bit 8b + 2u), one vector whose field holds the codes of
//          slices 2 (u / 2) and 2 (u / 2) + 1 (`high` for odd u).
struct SliceField {
  int vector, field;
  bool high;
};

[[nodiscard]] constexpr SliceField slice_field(int bits, int u, int b) {
  return {bits == 2 ? 0 : u % 2, 2 * b + u / 2, bits == 2 && u % 2 == 1};
}

template <int Bits, int V>
LOWBIT_TARGET_AVX512 inline __m512i nibble_vector(const std::uint8_t* block) {
  static_assert(Bits >= 2 && Bits <= 4);
  if constexpr (Bits == 3) return three_bit_nibbles<V>(block);
  else return _mm512_loadu_si512(block + 64 * V);
}

// Field F of every lane of `nibbles` as the float its table gives. Fields 0-3 go
// through vpermps (the index is the lane's low 4 bits), fields 4-7 through vpermw on
// the upper 16 bits (index bits 16-20; the table repeats every 16 entries, so bit 20,
// the next field's, does not matter) writing only the upper half of each lane. Field F
// and F + 4 share one shift by 4 (F % 4): three shifts per vector instead of seven.
template <int F, bool High>
LOWBIT_TARGET_AVX512 inline __m512 decode_field(__m512i nibbles, const DecodeTables& tables) {
  const __m512i shifted = F % 4 == 0 ? nibbles : _mm512_srli_epi32(nibbles, 4 * (F % 4));
  if constexpr (F < 4) return _mm512_permutexvar_ps(shifted, High ? tables.high : tables.low);
  else return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAA, shifted, High ? tables.high_words : tables.low_words));
}

// The 16 codes of slice (U, B) of a full block as floats. The compiler shares loads and
// shifts among the slices of a block.
template <int Bits, int U, int B>
LOWBIT_TARGET_AVX512 inline __m512 decode_slice(const std::uint8_t* block, const DecodeTables& tables) {
  if constexpr (Bits >= 2 && Bits <= 4) {
    constexpr SliceField where = slice_field(Bits, U, B);
    return decode_field<where.field, where.high>(nibble_vector<Bits, where.vector>(block), tables);
  } else if constexpr (Bits == 1) {
    return _mm512_permutexvar_ps(plane_slice<Bits, 0, U, B>(block), tables.low);
  } else if constexpr (Bits == 8) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(plane_slice<8, 0, U, B>(block), _mm512_set1_epi32(0xFF)));
  } else {
    return _mm512_cvtepi32_ps(combine_planes<Bits, 0, U, B>(block));
  }
}

template <int Bits, int Rows, int U, int B>
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline void slice_fma(const std::uint8_t* const* blocks,
                                                                  const float* x_unit, const DecodeTables& tables,
                                                                  __m512* acc) {
  const __m512 x = in_register(_mm512_loadu_ps(x_unit + kLanes * B));
  for (int r = 0; r < Rows; ++r) acc[r] = _mm512_fmadd_ps(decode_slice<Bits, U, B>(blocks[r], tables), x, acc[r]);
}

// total - sum_g s_g z_g S_g, 16 groups at a time, spread over the lanes (one reduction
// per row then gives y).
LOWBIT_TARGET_AVX512 inline __m512 subtract_zero_correction(__m512 total, const float* scales, const float* zeros,
                                                            const float* sums, Index groups) {
  for (Index g = 0; g < groups; g += kLanes) {
    const __mmask16 mask = first_lanes(groups - g);
    const __m512 sz = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, scales + g), _mm512_maskz_loadu_ps(mask, zeros + g));
    total = _mm512_fnmadd_ps(sz, _mm512_maskz_loadu_ps(mask, sums + g), total);
  }
  return total;
}

// y[r] = the sum of the lanes of v[r], r = 0..3: the four reductions share their
// shuffles (128-bit chunks first, then one permute gathers each row's four partial
// sums into one lane of each chunk), and y is written with one store.
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline void reduce_add_4(const __m512* v, float* y) {
  // [a0 + a2, a1 + a3, b0 + b2, b1 + b3] in 128-bit chunks, and the same for c, d.
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x44), _mm512_shuffle_f32x4(v[0], v[1], 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(v[2], v[3], 0x44), _mm512_shuffle_f32x4(v[2], v[3], 0xEE));
  // Chunk k: four partial sums of row k.
  const __m512 w = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  // Chunk i: partial sum i of rows 0..3.
  const __m512 t = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), w);
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
  _mm_storeu_ps(y, _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1)));
}

// total[r] += s_rg acc[r], and acc[r] starts over: a group of Rows rows ends.
template <int Rows>
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline void scale_group(const float* const* scales, Index group,
                                                                    __m512* acc, __m512* total) {
  for (int r = 0; r < Rows; ++r) {
    total[r] = _mm512_fmadd_ps(_mm512_set1_ps(scales[r][group]), acc[r], total[r]);
    acc[r] = _mm512_setzero_ps();
  }
}

// One unit (4 slices) of Rows rows, then the scales: per group when this unit ends
// its group, else per lane. Returns false past the last unit of the row.
template <int Bits, int Rows, ScaleMode Mode, int U>
LOWBIT_TARGET_AVX512 inline bool unit_step(const GemvRowsArgs& args, const std::uint8_t* const* blocks,
                                           const float* const* scales, const float* x_block,
                                           const DecodeTables& tables, Index& unit, Index& group, Index& units_left, __m512* acc,
                                           __m512* total) {
  const Index units = args.full_units;
  if (unit >= units) return false;
  const float* x_unit = x_block + kUnit * U;
  slice_fma<Bits, Rows, U, 0>(blocks, x_unit, tables, acc);
  slice_fma<Bits, Rows, U, 1>(blocks, x_unit, tables, acc);
  slice_fma<Bits, Rows, U, 2>(blocks, x_unit, tables, acc);
  slice_fma<Bits, Rows, U, 3>(blocks, x_unit, tables, acc);
  if constexpr (Mode == ScaleMode::PerLane) {
    const LaneGroups& plan = *args.lane_groups;
    const auto u = static_cast<std::size_t>(unit);
    const __m512i index = _mm512_loadu_si512(plan.offset.data() + u * kLanes);
    const __mmask16 mask = first_lanes(plan.count[u]);
    for (int r = 0; r < Rows; ++r) {
      const __m512 s = _mm512_permutexvar_ps(index, _mm512_maskz_loadu_ps(mask, scales[r] + plan.first[u]));
      total[r] = _mm512_fmadd_ps(s, acc[r], total[r]);
      acc[r] = _mm512_setzero_ps();
    }
  } else {
    if (--units_left == 0 || unit + 1 == units) {
      scale_group<Rows>(scales, group, acc, total);
      ++group;
      units_left = args.units_per_group;
    }
  }
  ++unit;
  return true;
}

// Codes of positions slot * L_min + within + k (lane k, lanes of `mask`) of a short block
// of m codes, as 32-bit integers; masked lanes read nothing and hold 0.
template <int Bits>
LOWBIT_TARGET_AVX512 inline __m512i short_codes(const std::uint8_t* block, Index m, int slot, Index within,
                                                __mmask16 mask) {
  constexpr PlaneSet set = planes_for_bits(Bits);
  __m512i codes = _mm512_setzero_si512();
  for (int plane = 0; plane < set.count; ++plane) {
    const PlaneSlot where = plane_slot(set, plane, m, slot);
    const int width = set.planes[static_cast<std::size_t>(plane)].width;
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, block + where.byte + within));
    if (width == 8) return bytes;  // one plane, one slot
    const __m512i bits = _mm512_and_si512(_mm512_srl_epi32(bytes, _mm_cvtsi32_si128(where.shift)),
                                          _mm512_set1_epi32((1 << width) - 1));
    if (set.count == 1) return bits;
    const int shift = set.planes[static_cast<std::size_t>(plane)].shift;
    codes = _mm512_or_si512(codes, shift == 0 ? bits : _mm512_sll_epi32(bits, _mm_cvtsi32_si128(shift)));
  }
  return codes;
}

// The scales of a short block's positions for one row: a permute of the block's scales
// when they fit one vector, else a gather.
struct ShortScales {
  const float* scales;  // the row's scale of the block's first group
  __m512 table;         // its group_count scales, when permuting
};

LOWBIT_TARGET_AVX512 inline ShortScales short_scales(const ShortBlockPlan& plan, const float* row_scales) {
  const float* scales = row_scales + plan.first_group;
  if (plan.group_count > kLanes) return {scales, _mm512_setzero_ps()};
  return {scales, _mm512_maskz_loadu_ps(first_lanes(plan.group_count), scales)};
}

LOWBIT_TARGET_AVX512 inline __m512 position_scales(const ShortBlockPlan& plan, const ShortScales& row, __m512i group) {
  if (plan.group_count > kLanes) return _mm512_i32gather_ps(group, row.scales, 4);
  return _mm512_permutexvar_ps(group, row.table);
}

// total[r] += s_g(j) q_rj x_j over the short block of Rows rows. A vector of positions
// inside one group (the usual case: group sizes that are multiples of 16) accumulates
// q x, scaled once when the group ends; a vector that straddles groups takes its scales
// per lane. Groups only grow along the visit order (slots are consecutive runs).
template <int Bits, int Rows, bool Gather>
LOWBIT_TARGET_AVX512 inline void short_block_rows(const GemvRowsArgs& args, const std::uint8_t* const* rows,
                                                  const float* const* scales, __m512* total_out) {
  const ShortBlockPlan& plan = *args.short_block;
  constexpr int slots = short_slots(Bits), narrowest = narrowest_plane(Bits);
  const Index m = plan.codes, slot_codes = m * narrowest / 8;
  const std::uint8_t* blocks[Rows];
  const float* block_scales[Rows];
  __m512 table[Rows], total[Rows], acc[Rows];
  const __mmask16 group_mask = first_lanes(plan.group_count);
  for (int r = 0; r < Rows; ++r) {
    blocks[r] = rows[r] + plan.begin * Bits / 8;
    block_scales[r] = scales[r] + plan.first_group;
    table[r] = Gather ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(group_mask, block_scales[r]);
    total[r] = total_out[r];
    acc[r] = _mm512_setzero_ps();
  }
  std::int32_t current = 0;  // the group acc belongs to
  const float* x = args.x + plan.begin;
  for (int slot = 0; slot < slots; ++slot) {
    for (Index within = 0; within < slot_codes; within += kLanes) {
      const Index j = slot * slot_codes + within, count = std::min<Index>(kLanes, slot_codes - within);
      const __mmask16 mask = first_lanes(count);
      const __m512 xj = _mm512_maskz_loadu_ps(mask, x + j);
      __m512 q[Rows];
      for (int r = 0; r < Rows; ++r) q[r] = _mm512_cvtepi32_ps(short_codes<Bits>(blocks[r], m, slot, within, mask));
      const std::int32_t first = plan.group[static_cast<std::size_t>(j)];
      if (first == plan.group[static_cast<std::size_t>(j + count - 1)]) {
        if (first != current) {
          for (int r = 0; r < Rows; ++r) {
            total[r] = _mm512_fmadd_ps(acc[r], _mm512_set1_ps(block_scales[r][current]), total[r]);
            acc[r] = _mm512_setzero_ps();
          }
          current = first;
        }
        for (int r = 0; r < Rows; ++r) acc[r] = _mm512_fmadd_ps(q[r], xj, acc[r]);
      } else {
        const __m512i group = _mm512_loadu_si512(plan.group.data() + j);
        for (int r = 0; r < Rows; ++r) {
          const __m512 s = Gather ? _mm512_i32gather_ps(group, block_scales[r], 4) : _mm512_permutexvar_ps(group, table[r]);
          total[r] = _mm512_fmadd_ps(_mm512_mul_ps(q[r], xj), s, total[r]);
        }
      }
    }
  }
  for (int r = 0; r < Rows; ++r)
    total_out[r] = _mm512_fmadd_ps(acc[r], _mm512_set1_ps(block_scales[r][current]), total[r]);
}

// Entry i of a table-path row's table for `group`: code i times the scale, minus the
// zero first when it is folded in.
template <bool FoldZeros>
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline __m512 short_table(__m512 codes, const float* scales,
                                                                      const float* zeros, std::int32_t group) {
  if constexpr (FoldZeros) codes = _mm512_sub_ps(codes, _mm512_set1_ps(zeros[group]));
  return _mm512_mul_ps(codes, _mm512_set1_ps(scales[group]));
}

// The short block of a one-plane width of at most 4 bits (1, 2, 4) whose runs each lie
// in one group (short_block_runs_in_one_group): the common case of small models. Byte
// j of the plane (L bytes) holds position s L + j at bit Bits * s for every slot s, so
// one zero-extending load of 16 bytes serves all 8 / Bits slots, and a permute of the
// 16-entry table t_g[i] = (i mod 2^Bits) s_g (vpermps reads only the low 4 bits of each
// lane: no mask) turns the codes into q s_g at once:
//   total += (q_j s_g) x_j,
// one permute and one FMA per 16 positions. Each slot keeps its own table per row;
// within a slot the group only grows, so a table is rebuilt when its group changes.
// With FoldZeros (rows that are nothing but this block) the table holds the decoded
// weight t_g[i] = (i mod 2^Bits - z_g) s_g, so no zero correction follows.
template <int Bits, int Rows, bool FoldZeros>
LOWBIT_TARGET_AVX512 inline void short_block_table_rows(const GemvRowsArgs& args, const std::uint8_t* const* rows,
                                                        const float* const* scales, const float* const* zeros,
                                                        __m512* total) {
  static_assert(Bits == 1 || Bits == 2 || Bits == 4);
  constexpr int slots = 8 / Bits;
  const ShortBlockPlan& plan = *args.short_block;
  const Index plane_bytes = plan.codes * Bits / 8;
  const __m512 codes = decode_tables<Bits>().low;  // float(i mod 2^Bits)
  const std::uint8_t* blocks[Rows];
  const float *block_scales[Rows], *block_zeros[Rows];
  // Unrolled over slots and rows so that tables and sums stay in registers; even and
  // odd slots add into separate sums, halving each row's chain of dependent FMAs.
  constexpr int chains = Rows >= 8 ? 1 : 2;  // eight rows give the FMAs enough chains
  __m512 table[slots][Rows], sum[chains][Rows];
  std::int32_t current[slots];  // the group each slot's tables hold
#pragma GCC unroll 8
  for (int slot = 0; slot < slots; ++slot) {
    current[slot] = plan.group[static_cast<std::size_t>(slot * plane_bytes)];
#pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r) {
      if (slot == 0) {
        blocks[r] = rows[r] + plan.begin * Bits / 8;
        block_scales[r] = scales[r] + plan.first_group;
        block_zeros[r] = zeros[r] + plan.first_group;
        sum[0][r] = total[r];
        if constexpr (chains == 2) sum[chains - 1][r] = _mm512_setzero_ps();
      }
      table[slot][r] = short_table<FoldZeros>(codes, block_scales[r], block_zeros[r], current[slot]);
    }
  }
  const float* x = args.x + plan.begin;
  for (Index within = 0; within < plane_bytes; within += kLanes) {
    const __mmask16 mask = first_lanes(plane_bytes - within);
    __m512i bytes[Rows];
#pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r) bytes[r] = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, blocks[r] + within));
#pragma GCC unroll 8
    for (int slot = 0; slot < slots; ++slot) {
      const Index j = slot * plane_bytes + within;
      const std::int32_t group = plan.group[static_cast<std::size_t>(j)];
      if (group != current[slot]) {
#pragma GCC unroll 8
        for (int r = 0; r < Rows; ++r) table[slot][r] = short_table<FoldZeros>(codes, block_scales[r], block_zeros[r], group);
        current[slot] = group;
      }
      const __m512 xj = _mm512_maskz_loadu_ps(mask, x + j);
#pragma GCC unroll 8
      for (int r = 0; r < Rows; ++r) {
        const __m512i index = slot == 0 ? bytes[r] : _mm512_srli_epi32(bytes[r], static_cast<unsigned>(Bits * slot));
        sum[slot % chains][r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(index, table[slot][r]), xj, sum[slot % chains][r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) total[r] = chains == 2 ? _mm512_add_ps(sum[0][r], sum[chains - 1][r]) : sum[0][r];
}

// True when a short block of a `bits`-wide matrix takes the table path
// (short_block_table_rows). Rows that are nothing but such a block then fold the zeros
// into the tables, and the GEMV needs no group sums of x.
[[nodiscard]] inline bool short_block_takes_table(const ShortBlockPlan& plan, int bits) {
  return (bits == 1 || bits == 2 || bits == 4) && short_block_runs_in_one_group(plan, bits, kLanes);
}

// Scales of a straddling vector: permuted from one vector of the block's scales when
// they fit, else gathered.
template <int Bits, int Rows>
LOWBIT_TARGET_AVX512 inline void short_block_fma(const GemvRowsArgs& args, const std::uint8_t* const* rows,
                                                 const float* const* scales, const float* const* zeros, __m512* total) {
  if constexpr (Bits == 1 || Bits == 2 || Bits == 4) {
    if (short_block_takes_table(*args.short_block, Bits))
      return short_block_table_rows<Bits, Rows, false>(args, rows, scales, zeros, total);
  }
  if (args.short_block->group_count > kLanes) short_block_rows<Bits, Rows, true>(args, rows, scales, total);
  else short_block_rows<Bits, Rows, false>(args, rows, scales, total);
}

// y[r] = the sum of the lanes of total[r], for Rows rows: four at a time where they
// come in fours (each row's additions are the same either way within one Rows).
template <int Rows>
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline void reduce_rows(const __m512* total, float* y) {
  if constexpr (Rows % 4 == 0) {
    for (int r = 0; r < Rows; r += 4) reduce_add_4(total + r, y + r);
  } else {
    for (int r = 0; r < Rows; ++r) y[r] = _mm512_reduce_add_ps(total[r]);
  }
}

// y[r] = sum over lanes of total[r] minus the zero correction, for Rows rows.
template <int Rows>
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline void finish_rows(const GemvRowsArgs& args, const float* const* scales,
                                                                    const float* const* zeros, __m512* total, float* y) {
  for (int r = 0; r < Rows; ++r)
    total[r] = subtract_zero_correction(total[r], scales[r], zeros[r], args.group_sums, args.groups);
  reduce_rows<Rows>(total, y);
}

// y[r] for Rows rows that are nothing but a short block.
template <int Bits, int Rows>
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline void short_rows(const GemvRowsArgs& args,
                                                                   const std::uint8_t* const* rows,
                                                                   const float* const* scales,
                                                                   const float* const* zeros, float* y) {
  __m512 total[Rows];
  for (int r = 0; r < Rows; ++r) total[r] = _mm512_setzero_ps();
  if constexpr (Bits == 1 || Bits == 2 || Bits == 4) {
    if (short_block_takes_table(*args.short_block, Bits)) {
      short_block_table_rows<Bits, Rows, true>(args, rows, scales, zeros, total);
      return reduce_rows<Rows>(total, y);
    }
  }
  short_block_fma<Bits, Rows>(args, rows, scales, zeros, total);
  finish_rows<Rows>(args, scales, zeros, total, y);
}

// Rows [first, first + count) of a matrix whose rows are nothing but a short block,
// in one call (per-call overhead is most of a small GEMV): kStep rows at a time (8 for
// 4-bit codes, whose two tables per row leave registers for eight rows; 4 otherwise),
// then a 4-row step, then single rows. `first` is a multiple of kStep, so each row's
// arithmetic does not depend on how rows are split among threads.
template <int Bits>
LOWBIT_TARGET_AVX512 void short_rows_range(const GemvRowsArgs& args, Index first, Index count, float* y) {
  constexpr int kStep = Bits == 4 ? 8 : 4;
  const std::uint8_t* rows[kStep];
  const float *scales[kStep], *zeros[kStep];
  const auto point_at = [&](Index r) {  // rows r.. of the range, as many as remain (<= kStep)
    for (Index k = 0; k < std::min<Index>(kStep, count - r); ++k) {
      const Index row = first + r + k;
      rows[k] = args.packed + row * args.row_bytes;
      scales[k] = args.scales + row * args.groups;
      zeros[k] = args.zeros + row * args.groups;
    }
  };
  Index r = 0;
  for (; r + kStep <= count; r += kStep) {
    point_at(r);
    short_rows<Bits, kStep>(args, rows, scales, zeros, y + r);
  }
  if constexpr (kStep == 8) {
    if (r + 4 <= count) {
      point_at(r);
      short_rows<Bits, 4>(args, rows, scales, zeros, y + r);
      r += 4;
    }
  }
  point_at(r);
  for (int k = 0; r < count; ++r, ++k) short_rows<Bits, 1>(args, rows + k, scales + k, zeros + k, y + r);
}

// Unit U of a full block in ScaleMode::PerGroup when a group is UnitsPerGroup (1 or 2)
// units, or (UnitsPerGroup 0) whole blocks: scales apply at fixed units, so the loop
// over full blocks checks no bounds or counters per unit. The arithmetic is unit_step's.
template <int Bits, int Rows, int UnitsPerGroup, int U>
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline void group_unit(const std::uint8_t* const* block, const float* const* scales,
                                            const float* x_block, const DecodeTables& tables, Index group,
                                            __m512* acc, __m512* total) {
  const float* x_unit = x_block + kUnit * U;
  slice_fma<Bits, Rows, U, 0>(block, x_unit, tables, acc);
  slice_fma<Bits, Rows, U, 1>(block, x_unit, tables, acc);
  slice_fma<Bits, Rows, U, 2>(block, x_unit, tables, acc);
  slice_fma<Bits, Rows, U, 3>(block, x_unit, tables, acc);
  if constexpr (UnitsPerGroup != 0 && (U + 1) % UnitsPerGroup == 0)
    scale_group<Rows>(scales, group + U / UnitsPerGroup, acc, total);
}

// The first `blocks` full blocks (whole groups, read in place); returns the groups done.
template <int Bits, int Rows, int UnitsPerGroup>
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline Index group_blocks(const GemvRowsArgs& args, const std::uint8_t* const* rows,
                                               const float* const* scales, const DecodeTables& tables, Index blocks,
                                               __m512* acc, __m512* total) {
  constexpr Index block_bytes = kBlockCodes * Bits / 8;
  const Index blocks_per_group = UnitsPerGroup == 0 ? args.units_per_group / 4 : 1;
  Index group = 0, blocks_left = blocks_per_group;
  for (Index blk = 0; blk < blocks; ++blk) {
    const std::uint8_t* block[Rows];
    for (int r = 0; r < Rows; ++r) block[r] = rows[r] + blk * block_bytes;
    const float* x_block = args.x + blk * kBlockCodes;
    prefetch_next_rows(rows, Rows, args.row_bytes, block_bytes, blk, args.storage_end);
    group_unit<Bits, Rows, UnitsPerGroup, 0>(block, scales, x_block, tables, group, acc, total);
    group_unit<Bits, Rows, UnitsPerGroup, 1>(block, scales, x_block, tables, group, acc, total);
    group_unit<Bits, Rows, UnitsPerGroup, 2>(block, scales, x_block, tables, group, acc, total);
    group_unit<Bits, Rows, UnitsPerGroup, 3>(block, scales, x_block, tables, group, acc, total);
    if constexpr (UnitsPerGroup == 0) {
      if (--blocks_left == 0) {
        scale_group<Rows>(scales, group, acc, total);
        ++group;
        blocks_left = blocks_per_group;
      }
    } else {
      group += 4 / UnitsPerGroup;
    }
  }
  return group;
}

// y[r] for Rows stored rows (row_task: a quarter of the matrix apart).
template <int Bits, int Rows, ScaleMode Mode>
LOWBIT_TARGET_AVX512 void gemv_rows(const GemvRowsArgs& args, const std::uint8_t* const* rows,
                                    const float* const* scales, const float* const* zeros, float* y) {
  constexpr Index block_bytes = kBlockCodes * Bits / 8;
  __m512 acc[Rows], total[Rows];
  for (int r = 0; r < Rows; ++r) acc[r] = total[r] = _mm512_setzero_ps();
  if (args.full_blocks > 0) {
    prefetch_next_row_params(scales, zeros, Rows, args.groups, args.scales_end, args.zeros_end);
    // A last full block whose overread would leave the storage is read from a copy.
    alignas(64) std::uint8_t tail[Rows][block_bytes + kOverread];
    Index direct_blocks[Rows];
    for (int r = 0; r < Rows; ++r) {
      direct_blocks[r] = direct_full_blocks(rows[r], args.full_blocks, block_bytes, args.storage_end);
      if (direct_blocks[r] == args.full_blocks) continue;
      const std::uint8_t* last = rows[r] + direct_blocks[r] * block_bytes;
      std::copy(last, last + block_bytes, tail[r]);
      std::fill(tail[r] + block_bytes, tail[r] + block_bytes + kOverread, std::uint8_t{0});
    }
    const DecodeTables tables = decode_tables<Bits>();
    Index unit = 0, group = 0, units_left = args.units_per_group, first_block = 0;
    if constexpr (Mode == ScaleMode::PerGroup) {
      // Blocks of whole groups, read in place and filled with codes, first.
      const Index upg = args.units_per_group;
      Index blocks = std::min(args.full_units / 4, *std::min_element(direct_blocks, direct_blocks + Rows));
      if (upg % 4 == 0) blocks -= blocks % (upg / 4);
      if (upg == 1) group = group_blocks<Bits, Rows, 1>(args, rows, scales, tables, blocks, acc, total);
      else if (upg == 2) group = group_blocks<Bits, Rows, 2>(args, rows, scales, tables, blocks, acc, total);
      else if (upg % 4 == 0) group = group_blocks<Bits, Rows, 0>(args, rows, scales, tables, blocks, acc, total);
      else blocks = 0;
      first_block = blocks;
      unit = 4 * blocks;
    }
    for (Index blk = first_block; blk < args.full_blocks; ++blk) {
      const std::uint8_t* block[Rows];
      for (int r = 0; r < Rows; ++r) block[r] = blk < direct_blocks[r] ? rows[r] + blk * block_bytes : tail[r];
      const float* x_block = args.x + blk * kBlockCodes;
      prefetch_next_rows(rows, Rows, args.row_bytes, block_bytes, blk, args.storage_end);
      if (!unit_step<Bits, Rows, Mode, 0>(args, block, scales, x_block, tables, unit, group, units_left, acc, total)) break;
      if (!unit_step<Bits, Rows, Mode, 1>(args, block, scales, x_block, tables, unit, group, units_left, acc, total)) break;
      if (!unit_step<Bits, Rows, Mode, 2>(args, block, scales, x_block, tables, unit, group, units_left, acc, total)) break;
      if (!unit_step<Bits, Rows, Mode, 3>(args, block, scales, x_block, tables, unit, group, units_left, acc, total)) break;
    }
  }
  if (args.short_block->codes > 0) short_block_fma<Bits, Rows>(args, rows, scales, zeros, total);
  finish_rows<Rows>(args, scales, zeros, total, y);
}

// acc[4U + b] += codes of slice (U, b) * a, b = 0..3.
template <int Bits, int U>
LOWBIT_TARGET_AVX512 inline void transposed_unit(const std::uint8_t* block, const DecodeTables& tables, __m512 a,
                                                 __m512* acc) {
  acc[4 * U + 0] = _mm512_fmadd_ps(decode_slice<Bits, U, 0>(block, tables), a, acc[4 * U + 0]);
  acc[4 * U + 1] = _mm512_fmadd_ps(decode_slice<Bits, U, 1>(block, tables), a, acc[4 * U + 1]);
  acc[4 * U + 2] = _mm512_fmadd_ps(decode_slice<Bits, U, 2>(block, tables), a, acc[4 * U + 2]);
  acc[4 * U + 3] = _mm512_fmadd_ps(decode_slice<Bits, U, 3>(block, tables), a, acc[4 * U + 3]);
}

// Output-axis groups (W^T stored, stored row i = input column i): the 256 outputs of
// full block column `blk`, y_o = sum_i a_{i,g(o)} q_io - sum_i a_{i,g(o)} z_{i,g(o)} with
// a_ig = s_ig x_i. The accumulators hold the block in lane order; every output sums
// over the stored rows in order, whatever thread runs the block.
template <int Bits, ScaleMode Mode>
LOWBIT_TARGET_AVX512 void gemv_transposed_block(const QuantizedMatrix<float>& W, const float* x,
                                                const LaneGroups* lane_groups, Index blk, float* y) {
  constexpr Index block_bytes = kBlockCodes * Bits / 8;
  const Index n = W.stored_cols(), group = W.group_length(), groups = W.groups_per_row();
  const Index begin = blk * kBlockCodes, length = std::min(kBlockCodes, n - begin);
  const Index units = (length + kUnit - 1) / kUnit, first_unit = begin / kUnit;
  const Index first_group = begin / group, last_group = (begin + length - 1) / group;
  const DecodeTables tables = decode_tables<Bits>();
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  float offsets[kBlockCodes] = {};  // sum_i a_ig z_ig for the groups this block touches
  alignas(64) std::uint8_t tail[block_bytes + kOverread] = {};
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
    __m512 a[4];
    for (Index u = 0; u < units; ++u) {
      if constexpr (Mode == ScaleMode::PerLane) {
        const auto plan_unit = static_cast<std::size_t>(first_unit + u);
        const __m512i index = _mm512_loadu_si512(lane_groups->offset.data() + plan_unit * kLanes);
        const __m512 s = _mm512_maskz_loadu_ps(first_lanes(lane_groups->count[plan_unit]),
                                               scales + lane_groups->first[plan_unit]);
        a[u] = _mm512_mul_ps(_mm512_permutexvar_ps(index, s), _mm512_set1_ps(x[i]));
      } else {
        a[u] = _mm512_set1_ps(scales[(begin + kUnit * u) / group] * x[i]);
      }
    }
    // Units past the end hold zero codes; their a is a copy of the last real one.
    for (Index u = units; u < 4; ++u) a[u] = a[units - 1];
    transposed_unit<Bits, 0>(block, tables, a[0], acc);
    transposed_unit<Bits, 1>(block, tables, a[1], acc);
    transposed_unit<Bits, 2>(block, tables, a[2], acc);
    transposed_unit<Bits, 3>(block, tables, a[3], acc);
  }
  alignas(64) float lanes[kBlockCodes];
  for (int s = 0; s < 16; ++s) _mm512_store_ps(lanes + kLanes * s, acc[s]);
  for (Index o = 0; o < length; ++o)
    y[begin + o] = lanes[lane_position(o, kLanes)] - offsets[(begin + o) / group - first_group];
}

// Output-axis groups, the short last block column (gemv_short_block.hpp): outputs
// plan.begin + j in natural order, one accumulator per vector of positions.
template <int Bits>
LOWBIT_TARGET_AVX512 void gemv_transposed_short_block(const QuantizedMatrix<float>& W, const float* x,
                                                      const ShortBlockPlan& plan, float* y) {
  const Index n = W.stored_cols(), groups = W.groups_per_row();
  constexpr int slots = short_slots(Bits), narrowest = narrowest_plane(Bits);
  const Index m = plan.codes, slot_codes = m * narrowest / 8, length = n - plan.begin;
  __m512 acc[kBlockCodes / kLanes + slots];
  for (auto& a : acc) a = _mm512_setzero_ps();
  float offsets[kBlockCodes] = {};  // sum_i a_ig z_ig per group of the block
  for (Index i = 0; i < W.stored_rows(); ++i) {
    const std::uint8_t* block = W.packed_row(i) + plan.begin * Bits / 8;
    const float* scales = W.scales().data() + i * groups;
    const float* zeros = W.zeros().data() + i * groups;
    for (std::int32_t g = 0; g < plan.group_count; ++g)
      offsets[g] += scales[plan.first_group + g] * x[i] * zeros[plan.first_group + g];
    const ShortScales row_scales = short_scales(plan, scales);
    const __m512 xi = _mm512_set1_ps(x[i]);
    int vector = 0;
    for (int slot = 0; slot < slots; ++slot) {
      for (Index within = 0; within < slot_codes; within += kLanes, ++vector) {
        const Index j = slot * slot_codes + within;
        const __mmask16 mask = first_lanes(slot_codes - within);
        const __m512i group = _mm512_loadu_si512(plan.group.data() + j);
        const __m512 a = _mm512_mul_ps(position_scales(plan, row_scales, group), xi);
        const __m512 q = _mm512_cvtepi32_ps(short_codes<Bits>(block, m, slot, within, mask));
        acc[vector] = _mm512_fmadd_ps(q, a, acc[vector]);
      }
    }
  }
  alignas(64) float out[kBlockCodes + kLanes];
  int vector = 0;
  for (int slot = 0; slot < slots; ++slot)
    for (Index within = 0; within < slot_codes; within += kLanes, ++vector)
      _mm512_mask_storeu_ps(out + slot * slot_codes + within, first_lanes(slot_codes - within), acc[vector]);
  for (Index o = 0; o < length; ++o) y[plan.begin + o] = out[o] - offsets[plan.group[static_cast<std::size_t>(o)]];
}

}  // namespace lowbit::detail::avx512

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // LOWBIT_HAVE_AVX512

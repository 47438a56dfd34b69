// y = W x with int8 activations: lowbit::gemv_int8, the path fast CPU engines take for
// decode. x is quantized once per call, per block of consecutive stored columns (the
// group itself when groups are 64..256 long and a multiple of 64, else 64 columns):
//   d_b = max_{j in b} |x_j| / 127,   xq_j = round(x_j / d_b) in [-127, 127],
// and every row then takes integer dot products of its codes (unsigned bytes) with xq
// (AVX-512 VNNI vpdpbusd, or AVX2 vpmaddubsw + vpmaddwd), scaled per block in float:
//   y_r = sum_g s_g * (sum_{b} d_b * sum_{j in b, g} q_j xq_j - z_g * S^_g),
//   S^_g = sum_{j in g} d_b(j) xq_j,
// which is exactly W_hat x^ for the quantized input x^_j = d_b xq_j: the only error
// beyond float rounding is |x^_j - x_j| <= d_b / 2 per input. With one block per group,
// a group's integer sum is converted and scaled once (by s_g d_g, formed per row).
//
// The integer path covers input-axis groups whose size is a multiple of 32 (or one
// group per row), rows with a full 256-code block of the layout (more than 224 codes),
// and codes of up to 7 bits on AVX2 (8-bit codes would saturate vpmaddubsw); other
// matrices, and double, run lowbit::gemv. Rows of at most 224 codes are a small
// model's: there quantizing x and repacking each row's block cost more than gemv's
// whole short-row kernel (64 x 64 to 512 x 200, 2/3/4-bit: gemv 1.5-7x faster on
// AVX-512, 1.1-4.5x on AVX2). An x tiny throughout is scaled by a power of two first
// (kTinyInput). The buffers of x's quantized form are the calling thread's, reused.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "lowbit/core/error.hpp"
#include "lowbit/core/isa.hpp"
#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/kernels/gemv.hpp"
#include "lowbit/kernels/gemv_avx512.hpp"
#include "lowbit/kernels/prefetch.hpp"
#include "lowbit/pack/avx2.hpp"
#include "lowbit/pack/avx512.hpp"
#include "lowbit/pack/scalar.hpp"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 AVX-512 headers, see pack/avx512.hpp
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace lowbit::detail {

// Inputs per int8 scale for a row of n codes in groups of `group_length`.
[[nodiscard]] inline Index activation_block(Index n, Index group_length) {
  if (group_length < n && group_length % 64 == 0 && group_length <= 256) return group_length;
  return 64;
}

// One activation block (a multiple of 8 inputs): returns d = max |x| / 127 and writes
// xq = clamp(round(x / d), -127, 127). Adding and subtracting 1.5 * 2^23 rounds
// |v| < 2^22 to the nearest integer, ties to even, as std::nearbyint does in the
// default rounding mode; the AVX2 version computes the same values 8 at a time.
inline float quantize_activation_block_scalar(const float* x, Index length, std::int8_t* out) {
  constexpr float kRound = 12582912.0f;
  float max_abs = 0;
  for (Index j = 0; j < length; ++j) max_abs = std::max(max_abs, std::abs(x[j]));
  const float d = max_abs / 127.0f;
  for (Index j = 0; j < length; ++j) {
    const float shifted = d == 0 ? kRound : x[j] / d + kRound;  // IEEE arithmetic: never reassociated
    out[j] = static_cast<std::int8_t>(std::clamp(shifted - kRound, -127.0f, 127.0f));
  }
  return d;
}

#if defined(LOWBIT_HAVE_AVX2)
LOWBIT_TARGET_AVX2 inline float quantize_activation_block_avx2(const float* x, Index length, std::int8_t* out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 max_abs = _mm256_setzero_ps();
  for (Index j = 0; j < length; j += 8) max_abs = _mm256_max_ps(max_abs, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(max_abs), _mm256_extractf128_ps(max_abs, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float d = _mm_cvtss_f32(m) / 127.0f;
  if (d == 0) {
    std::fill(out, out + length, std::int8_t{0});
    return d;
  }
  const __m256 divisor = _mm256_set1_ps(d), round = _mm256_set1_ps(12582912.0f);
  const __m256 low = _mm256_set1_ps(-127.0f), high = _mm256_set1_ps(127.0f);
  for (Index j = 0; j < length; j += 8) {
    const __m256 shifted = _mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(x + j), divisor), round);
    const __m256 q = _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(shifted, round), low), high);
    const __m128i lanes = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(_mm256_cvtps_epi32(q), _mm256_setzero_si256()), _mm256_setzero_si256()),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + j), lanes);
  }
  return d;
}
#endif


struct Int8Input {
  Index block = 64;                  // inputs per scale
  std::vector<std::int8_t> xq;       // stored order; zeros past n, over whole activation blocks and 256-code blocks
  std::vector<float> block_scales;   // d_b
  std::vector<float> in_place_scales;  // d_b / 2^bit for kernels that keep codes in place (in_place_codes)
  std::vector<float> group_sums;     // S^_g
  std::vector<std::int32_t> half_groups;  // group of each 32 stored columns (kernels: no division)
  int exponent = 0;                  // x was taken as 2^exponent x (kTinyInput), so y comes out 2^exponent y
};

// An x whose largest |x_j| is below this is scaled up by a power of two, to max |x| in
// [2^-64, 2^-63), before it is quantized: its block scales d_b, and the factors
// s d_b / 2^bit built from them, would otherwise be subnormal and lose bits (at |x| ~
// 1e-40 the result was ~1% off; below ~1e-43 d_b underflows to 0). Scaling by 2^k is
// exact for x, and y is scaled back by 2^-k, exact unless y is subnormal (then one
// rounding). Real activations are never this small.
inline constexpr float kTinyInput = 0x1p-64f;

// Every activation block of `stored` (input.block inputs each) into input.xq and
// input.block_scales.
inline void quantize_activation_blocks(const float* stored, Isa isa, Int8Input& input) {
  const bool simd = isa == Isa::Avx2 || isa == Isa::Avx512;
  for (std::size_t b = 0; b < input.block_scales.size(); ++b) {
    const float* block_x = stored + static_cast<Index>(b) * input.block;
    std::int8_t* block_q = input.xq.data() + static_cast<Index>(b) * input.block;
#if defined(LOWBIT_HAVE_AVX2)
    if (simd) {
      input.block_scales[b] = quantize_activation_block_avx2(block_x, input.block, block_q);
      continue;
    }
#endif
    input.block_scales[b] = quantize_activation_block_scalar(block_x, input.block, block_q);
  }
  (void)simd;
}

// x (logical order) -> stored order, quantized per activation block (the AVX2 and
// scalar quantizers give the same bytes), into `input`, whose buffers are reused: this
// runs once per call, and for a matrix of few rows it is most of the call.
inline void quantize_activation(const QuantizedMatrix<float>& W, const float* x, Isa isa, Int8Input& input) {
  const Index n = W.stored_cols(), padded = block_padded(n), group = W.group_length();
  input.block = activation_block(n, group);
  const Index blocks = (padded + input.block - 1) / input.block, length = blocks * input.block;
  thread_local std::vector<float> stored;
  stored.resize(static_cast<std::size_t>(length));
  gather_stored_order(W, x, stored.data());
  std::fill(stored.begin() + n, stored.end(), 0.0f);
  input.xq.resize(static_cast<std::size_t>(length));
  input.block_scales.resize(static_cast<std::size_t>(blocks));
  input.exponent = 0;
  quantize_activation_blocks(stored.data(), isa, input);
  // max |x| ~ 127 max_b d_b: only an x that looks tiny (or zero: d_b underflows to 0
  // below 127 * 2^-149) is scanned, scaled and quantized again.
  if (127.0f * *std::max_element(input.block_scales.begin(), input.block_scales.end()) < kTinyInput) {
    float max_abs = 0;
    for (Index j = 0; j < n; ++j) max_abs = std::max(max_abs, std::abs(stored[static_cast<std::size_t>(j)]));
    if (max_abs > 0 && max_abs < kTinyInput) {
      input.exponent = -64 - std::ilogb(max_abs);  // max |x| to [2^-64, 2^-63)
      for (Index j = 0; j < n; ++j) stored[static_cast<std::size_t>(j)] = std::ldexp(stored[static_cast<std::size_t>(j)], input.exponent);
      quantize_activation_blocks(stored.data(), isa, input);
    }
  }
  // Group of each 32 stored columns, and S^_g = sum_b d_b sum_{j in b, g} xq_j: exact
  // integer sums per piece of a block inside a group, d_b times each in double (exact:
  // 24 + 15 bits), added in double (exact unless the d_b of a group's pieces span more
  // than 14 binary orders) and rounded to float once.
  const Index groups = W.groups_per_row();
  input.half_groups.resize(static_cast<std::size_t>(padded / 32));
  for (Index h = 0, g = 0; h < padded / 32; ++h) {
    while (g + 1 < groups && 32 * h >= (g + 1) * group) ++g;
    input.half_groups[static_cast<std::size_t>(h)] = static_cast<std::int32_t>(g);
  }
  input.group_sums.resize(static_cast<std::size_t>(groups));
  for (Index g = 0; g < groups; ++g) {
    const Index begin = g * group, end = std::min(n, (g + 1) * group);
    double sum = 0;
    for (Index piece = begin; piece < end;) {
      const Index b = piece / input.block, piece_end = std::min(end, (b + 1) * input.block);
      std::int32_t integer = 0;
      for (Index j = piece; j < piece_end; ++j) integer += input.xq[static_cast<std::size_t>(j)];
      sum += static_cast<double>(input.block_scales[static_cast<std::size_t>(b)]) * integer;
      piece = piece_end;
    }
    input.group_sums[static_cast<std::size_t>(g)] = static_cast<float>(sum);
  }
}

inline Int8Input quantize_activation(const QuantizedMatrix<float>& W, const float* x, Isa isa) {
  Int8Input input;
  quantize_activation(W, x, isa, input);
  return input;
}

// Whether the integer path takes this matrix on `isa` (else gemv_int8 runs gemv).
[[nodiscard]] inline bool int8_path_applies(const QuantizedMatrix<float>& W, Isa isa) {
  const bool groups_fit = W.group_length() >= W.stored_cols() || W.group_length() % 32 == 0;
  if (W.transposed() || !groups_fit || full_block_layout_codes(W.stored_cols()) == 0) return false;
  if (isa == Isa::Avx2) return W.spec().bits <= 7;
  return true;
}

namespace scalar {

// The integer path in plain C++: exact integer dots per (block, group) piece.
inline void gemv_int8_rows(const QuantizedMatrix<float>& W, const Int8Input& input, Index first, Index count,
                           std::uint8_t* codes, float* y) {
  const Index n = W.stored_cols(), group = W.group_length(), groups = W.groups_per_row();
  for (Index r = first; r < first + count; ++r) {
    detail::unpack_row(W.packed_row(r), n, W.spec().bits, codes, Isa::Scalar);
    const float* scales = W.scales().data() + r * groups;
    const float* zeros = W.zeros().data() + r * groups;
    float sum = 0;
    for (Index g = 0; g < groups; ++g) {
      float dot = 0;
      const Index block = input.block;
      for (Index b = g * group / block; b * block < std::min(n, (g + 1) * group); ++b) {
        std::int32_t integer = 0;
        for (Index j = std::max(b * block, g * group); j < std::min({n, (b + 1) * block, (g + 1) * group}); ++j)
          integer += codes[j] * input.xq[static_cast<std::size_t>(j)];
        dot += input.block_scales[static_cast<std::size_t>(b)] * static_cast<float>(integer);
      }
      sum += scales[g] * (dot - zeros[g] * input.group_sums[static_cast<std::size_t>(g)]);
    }
    y[r - first] = sum;
  }
}

}  // namespace scalar

#if defined(LOWBIT_HAVE_AVX2)
// The codes of a row after its last complete 256 codes, for rows that do not end there, as
// a zero-padded full block that the chunk decoders read like any other: a last
// full-layout block (padding at its end) is copied, a short block (gemv_short_block.hpp)
// is unpacked run by run (plane_slot: per plane one byte loop, which the compiler
// vectorizes) and packed by the SIMD packer. Code by code this took ~0.3 us per row
// per call, more than the rest of a 4096-wide row.
template <int Bits>
LOWBIT_TARGET_AVX2 void repack_tail_block(const std::uint8_t* row, Index n, std::uint8_t* out) {
  constexpr Index block_bytes = kBlockCodes * Bits / 8;
  constexpr PlaneSet set = planes_for_bits(Bits);
  const Index full_blocks = n / kBlockCodes, m = padded_codes(n) - full_blocks * kBlockCodes;
  const std::uint8_t* block = row + full_blocks * block_bytes;
  if (m == kBlockCodes) {
    std::copy(block, block + block_bytes, out);
    return;
  }
  alignas(32) std::uint8_t codes[kBlockCodes] = {};
  const Index slot_codes = short_slot_codes(Bits, m);
  for (int slot = 0; slot < short_slots(Bits); ++slot) {
    std::uint8_t* slot_out = codes + slot * slot_codes;
    for (int plane = 0; plane < set.count; ++plane) {
      const PlaneSlot where = plane_slot(set, plane, m, slot);
      const Plane part = set.planes[static_cast<std::size_t>(plane)];
      const std::uint8_t* in = block + where.byte;
      const unsigned mask = (1u << part.width) - 1u;
      for (Index j = 0; j < slot_codes; ++j) {
        const unsigned bits = (static_cast<unsigned>(in[j]) >> where.shift) & mask;
        slot_out[j] = static_cast<std::uint8_t>(slot_out[j] | bits << part.shift);
      }
    }
  }
  avx2::pack_full_block<Bits>(codes, out);
}
#endif

struct Int8RowsArgs {
  const Int8Input* input;
  Index n, groups;
  Index chunks_per_group;            // ScaleBlock::Group: integer sums run this many chunks
  Index row_bytes;                   // stride of the packed rows (prefetch.hpp)
  const std::uint8_t* storage_end;   // end of the packed codes
  const float *scales_end, *zeros_end;  // ... and of the scales and zeros
  const float* block_scales;         // d_b, or in_place_scales for kernels that keep codes in place
};

// How a kernel scales its integer sums: once per group (one activation block per
// group), or per chunk (64-code activation blocks; a chunk may straddle two groups of
// 32, TwoGroups).
enum class ScaleBlock { Group, Chunk, TwoGroups };

[[nodiscard]] inline ScaleBlock scale_block(const Int8Input& input, Index n, Index group_length) {
  if (input.block == group_length) return ScaleBlock::Group;
  return group_length % 64 == 0 || group_length >= n ? ScaleBlock::Chunk : ScaleBlock::TwoGroups;
}

// Codes left in place. A chunk (64 codes of a full block) of 2-, 3- or 4-bit codes can
// be brought to one bit position of its bytes, bit(M) (2-bit: 2M; 3- and 4-bit: 0, 0, 4,
// 4), by masks alone (3-bit: plus shifts shared by the whole block). The byte then
// holds 2^bit q, so the integer sum is 2^bit sum q xq, exact (below 2^24 for any block
// here), and the block scale d / 2^bit takes the factor out exactly in float (unless
// d / 2^bit or s d / 2^bit is subnormal, below 2^-126: a block of |x| < 1e-36 beside
// larger ones, as an x that small throughout is scaled up first, kTinyInput).
// That needs every integer sum to run over chunks of one bit position: per chunk, or
// per group of one chunk or (3- and 4-bit) two.
[[nodiscard]] constexpr int chunk_bit(int bits, Index chunk) {
  return bits == 2 ? 2 * static_cast<int>(chunk % 4) : 4 * static_cast<int>(chunk % 4 / 2);
}

[[nodiscard]] inline bool in_place_codes(int bits, ScaleBlock mode, Index chunks_per_group) {
  if (bits < 2 || bits > 4) return false;
  return mode != ScaleBlock::Group || chunks_per_group == 1 || (bits != 2 && chunks_per_group == 2);
}

// d_b / 2^bit for activation block b (of `input.block` codes, a multiple of 64: its
// chunks share one bit position when in_place_codes holds).
inline void set_in_place_scales(Int8Input& input, int bits) {
  input.in_place_scales.resize(input.block_scales.size());
  for (std::size_t b = 0; b < input.block_scales.size(); ++b)
    input.in_place_scales[b] = std::ldexp(input.block_scales[b], -chunk_bit(bits, static_cast<Index>(b) * input.block / 64));
}

#if defined(LOWBIT_HAVE_AVX512)
namespace avx512 {

// vpmultishiftqb controls that move plane P's bits of chunk M (codes 64M .. 64M+63 of a
// full block) to the code's bit position in output byte j: the plane's byte for code
// c = 64M + j is (64M) % L + j (or j % 32 for the 32-byte 1-bit plane, read into both
// halves), its bit p * (c / L); each output byte takes the 8 bits starting there,
// minus the plane's shift within the code (offsets wrap within the 64-bit word).
template <int Bits, int P, int M>
struct ChunkControl {
  static constexpr std::array<std::uint8_t, 64> bytes = [] {
    constexpr Plane plane = planes_for_bits(Bits).planes[P];
    constexpr int L = 32 * plane.width;
    std::array<std::uint8_t, 64> control{};
    for (int j = 0; j < 64; ++j) {
      const int bit = plane.width * ((64 * M + j) / L);
      control[static_cast<std::size_t>(j)] = static_cast<std::uint8_t>((8 * (j % 8) + bit - plane.shift + 64) % 64);
    }
    return control;
  }();
  // Every byte takes its own bits: no select needed.
  static constexpr bool identity = [] {
    for (int j = 0; j < 64; ++j)
      if (bytes[static_cast<std::size_t>(j)] != 8 * (j % 8)) return false;
    return true;
  }();
};

// Plane P's part of the codes of chunk M, masked to its bits.
template <int Bits, int P, int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma,f16c"))) inline __m512i
plane_chunk(const std::uint8_t* block) {
  constexpr PlaneSet set = planes_for_bits(Bits);
  constexpr Plane plane = set.planes[P];
  constexpr int L = 32 * plane.width;
  const std::uint8_t* bytes = block + plane_byte_offset(set, P);
  const __m512i v = L >= 64 ? _mm512_loadu_si512(bytes + (64 * M) % L)
                            : _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  const __m512i mask = _mm512_set1_epi8(static_cast<char>(((1 << plane.width) - 1) << plane.shift));
  using Control = ChunkControl<Bits, P, M>;
  if constexpr (Control::identity) return plane.width == 8 ? v : _mm512_and_si512(v, mask);
  else return _mm512_and_si512(_mm512_multishift_epi64_epi8(_mm512_loadu_si512(Control::bytes.data()), v), mask);
}

template <int Bits, int P, int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma,f16c"))) inline __m512i
combine_chunk(const std::uint8_t* block) {
  if constexpr (P + 1 < planes_for_bits(Bits).count)
    return _mm512_or_si512(plane_chunk<Bits, P, M>(block), combine_chunk<Bits, P + 1, M>(block));
  else return plane_chunk<Bits, P, M>(block);
}

// Codes 64M .. 64M+63 of a full block, one per byte (as pack/avx512.hpp's unpack_chunk),
// with bit-field selects on port 5 instead of shifts on port 0, which vpdpbusd needs;
// InPlace (in_place_codes): 2^chunk_bit q.
template <int Bits, int M, bool InPlace>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma,f16c"))) inline __m512i
codes_chunk(const std::uint8_t* block) {
  if constexpr (InPlace && Bits == 3) {
    // Bits 0-1 from the 2-bit plane (code 64M + j at bits 2M, 2M + 1 of byte j), bit 2
    // from the 1-bit plane (at bit 2M + (j >= 32) of byte j % 32, read into both
    // halves), merged per pair of chunks: chunks 0 and 2 into bits 0-2 and 4-6 of
    // `fields` as they lie (the 1-bit plane moved up by 2 or 1), chunks 1 and 3 after a
    // shift down by 2. Bits that 64-bit shifts carry across bytes land where the 0x33
    // select and the final 0x07 / 0x70 mask drop them. The compiler shares all of it
    // per block.
    const __m512i two = in_register(_mm512_loadu_si512(block));
    const __m512i one = in_register(_mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64))));
    const __m512i fields =
        M % 2 == 0
            ? _mm512_ternarylogic_epi32(two, _mm512_sllv_epi64(one, _mm512_setr_epi64(2, 2, 2, 2, 1, 1, 1, 1)),
                                        _mm512_set1_epi8(0x33), 0xE4)  // (a & c) | (b & ~c)
            : _mm512_ternarylogic_epi32(_mm512_srli_epi64(two, 2),
                                        _mm512_srlv_epi64(one, _mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1)),
                                        _mm512_set1_epi8(0x33), 0xE4);
    return _mm512_and_si512(fields, _mm512_set1_epi8(M < 2 ? 0x07 : 0x70));
  } else if constexpr (InPlace) {
    static_assert(Bits == 2 || Bits == 4);
    constexpr int L = 32 * Bits;
    // One load serves the chunks that share these bytes (kept in a register, in_register).
    const __m512i v = in_register(_mm512_loadu_si512(block + (64 * M) % L));
    return _mm512_and_si512(v, _mm512_set1_epi8(static_cast<char>(((1 << Bits) - 1) << chunk_bit(Bits, M))));
  } else {
    return combine_chunk<Bits, 0, M>(block);
  }
}

// s_g d_g for the groups of one row, 16 at a time.
LOWBIT_TARGET_AVX512 inline void group_factors(const float* scales, const float* block_scales, Index groups, float* out) {
  for (Index g = 0; g < groups; g += 16) {
    const __mmask16 mask = static_cast<__mmask16>(groups - g >= 16 ? 0xFFFF : (1u << (groups - g)) - 1u);
    _mm512_mask_storeu_ps(out + g, mask,
                          _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, scales + g), _mm512_maskz_loadu_ps(mask, block_scales + g)));
  }
}

// total[r] += f_rg float(dot[r]) with f = s d (group_factors), and dot[r] starts over:
// a group's integer sums end.
template <int Rows>
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline void scale_group_sums(const float* factors, Index groups, Index group,
                                                                         __m512i* dot, __m512* total) {
  for (int r = 0; r < Rows; ++r) {
    total[r] = _mm512_fmadd_ps(_mm512_set1_ps(factors[r * groups + group]), _mm512_cvtepi32_ps(dot[r]), total[r]);
    dot[r] = _mm512_setzero_si512();
  }
}

// One 64-code chunk of Rows rows. ScaleBlock::Group: integer sums run on and are
// converted and scaled when the group ends; otherwise each chunk is scaled by its
// block's d and, per half, by its group's s.
template <int Bits, int Rows, ScaleBlock Mode, bool InPlace, int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma,f16c"))) inline bool int8_chunk(
    const Int8RowsArgs& args, const std::uint8_t* const* blocks, const float* const* scales, const float* factors,
    Index groups, Index blk, Index& chunks_left, Index& group, __m512i* dot, __m512* total) {
  const Index chunk = 4 * blk + M, start = 64 * chunk;
  if (start >= args.n) return false;
  const Int8Input& input = *args.input;
  const __m512i xq = in_register(_mm512_loadu_si512(input.xq.data() + start));
  if constexpr (Mode == ScaleBlock::Group) {
    for (int r = 0; r < Rows; ++r) dot[r] = _mm512_dpbusd_epi32(dot[r], codes_chunk<Bits, M, InPlace>(blocks[r]), xq);
    if (--chunks_left == 0 || start + 64 >= args.n) {
      scale_group_sums<Rows>(factors, groups, group, dot, total);
      ++group;
      chunks_left = args.chunks_per_group;
    }
  } else {
    const __m512 d = _mm512_set1_ps(args.block_scales[chunk]);
    const auto half = static_cast<std::size_t>(2 * chunk);
    for (int r = 0; r < Rows; ++r) {
      const __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes_chunk<Bits, M, InPlace>(blocks[r]), xq);
      __m512 s = _mm512_set1_ps(scales[r][input.half_groups[half]]);
      if constexpr (Mode == ScaleBlock::TwoGroups)
        s = _mm512_mask_blend_ps(0xFF00, s, _mm512_set1_ps(scales[r][input.half_groups[half + 1]]));
      total[r] = _mm512_fmadd_ps(s, _mm512_mul_ps(_mm512_cvtepi32_ps(sum), d), total[r]);
    }
  }
  return true;
}

// Chunk M of a full block in ScaleBlock::Group mode when a group is ChunksPerGroup
// (1, 2 or 4) chunks: groups end at fixed chunks of every block, so the loop over full
// blocks needs no bounds or counters. The arithmetic is int8_chunk's.
template <int Bits, int Rows, bool InPlace, int ChunksPerGroup, int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma,f16c"))) inline void int8_group_chunk(
    const std::uint8_t* const* blocks, const std::int8_t* xq_block, const float* factors, Index groups, Index group,
    __m512i* dot, __m512* total) {
  const __m512i xq = in_register(_mm512_loadu_si512(xq_block + 64 * M));
  for (int r = 0; r < Rows; ++r) dot[r] = _mm512_dpbusd_epi32(dot[r], codes_chunk<Bits, M, InPlace>(blocks[r]), xq);
  if constexpr ((M + 1) % ChunksPerGroup == 0) scale_group_sums<Rows>(factors, groups, group + M / ChunksPerGroup, dot, total);
}

template <int Bits, int Rows, bool InPlace, int ChunksPerGroup>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma,f16c"))) inline void int8_group_blocks(
    const Int8RowsArgs& args, const std::uint8_t* const* rows, const float* factors, Index full_blocks, __m512i* dot,
    __m512* total) {
  constexpr Index block_bytes = kBlockCodes * Bits / 8;
  for (Index blk = 0; blk < full_blocks; ++blk) {
    const std::uint8_t* block[Rows];
    for (int r = 0; r < Rows; ++r) block[r] = rows[r] + blk * block_bytes;
    prefetch_next_rows(rows, Rows, args.row_bytes, block_bytes, blk, args.storage_end);
    const std::int8_t* xq = args.input->xq.data() + blk * kBlockCodes;
    const Index group = blk * (4 / ChunksPerGroup);
    int8_group_chunk<Bits, Rows, InPlace, ChunksPerGroup, 0>(block, xq, factors, args.groups, group, dot, total);
    int8_group_chunk<Bits, Rows, InPlace, ChunksPerGroup, 1>(block, xq, factors, args.groups, group, dot, total);
    int8_group_chunk<Bits, Rows, InPlace, ChunksPerGroup, 2>(block, xq, factors, args.groups, group, dot, total);
    int8_group_chunk<Bits, Rows, InPlace, ChunksPerGroup, 3>(block, xq, factors, args.groups, group, dot, total);
  }
}

template <int Bits, int Rows, ScaleBlock Mode, bool InPlace>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma,f16c"))) void gemv_int8_rows(
    const Int8RowsArgs& args, const std::uint8_t* const* rows, const float* const* scales, const float* const* zeros,
    float* y) {
  constexpr Index block_bytes = kBlockCodes * Bits / 8;
  const Index blocks = (args.n + kBlockCodes - 1) / kBlockCodes, full_blocks = args.n / kBlockCodes;
  prefetch_next_row_params(scales, zeros, Rows, args.groups, args.scales_end, args.zeros_end);
  alignas(64) std::uint8_t tail[Rows][block_bytes];
  if (full_blocks < blocks)
    for (int r = 0; r < Rows; ++r) repack_tail_block<Bits>(rows[r], args.n, tail[r]);
  thread_local std::vector<float> factors;
  if constexpr (Mode == ScaleBlock::Group) {
    factors.resize(static_cast<std::size_t>(Rows * args.groups));
    for (int r = 0; r < Rows; ++r)
      group_factors(scales[r], args.block_scales, args.groups, factors.data() + r * args.groups);
  }
  __m512 total[Rows];
  __m512i dot[Rows];
  for (int r = 0; r < Rows; ++r) {
    total[r] = _mm512_setzero_ps();
    dot[r] = _mm512_setzero_si512();
  }
  Index chunks_left = args.chunks_per_group, group = 0, first_block = 0;
  if constexpr (Mode == ScaleBlock::Group) {
    if (4 % args.chunks_per_group == 0) {
      if (args.chunks_per_group == 1) int8_group_blocks<Bits, Rows, InPlace, 1>(args, rows, factors.data(), full_blocks, dot, total);
      else if (args.chunks_per_group == 2) int8_group_blocks<Bits, Rows, InPlace, 2>(args, rows, factors.data(), full_blocks, dot, total);
      else int8_group_blocks<Bits, Rows, InPlace, 4>(args, rows, factors.data(), full_blocks, dot, total);
      first_block = full_blocks;
      group = full_blocks * 4 / args.chunks_per_group;
    }
  }
  for (Index blk = first_block; blk < blocks; ++blk) {
    const std::uint8_t* block[Rows];
    for (int r = 0; r < Rows; ++r) block[r] = blk < full_blocks ? rows[r] + blk * block_bytes : tail[r];
    prefetch_next_rows(rows, Rows, args.row_bytes, block_bytes, blk, args.storage_end);
    if (!int8_chunk<Bits, Rows, Mode, InPlace, 0>(args, block, scales, factors.data(), args.groups, blk, chunks_left, group, dot, total) ||
        !int8_chunk<Bits, Rows, Mode, InPlace, 1>(args, block, scales, factors.data(), args.groups, blk, chunks_left, group, dot, total) ||
        !int8_chunk<Bits, Rows, Mode, InPlace, 2>(args, block, scales, factors.data(), args.groups, blk, chunks_left, group, dot, total) ||
        !int8_chunk<Bits, Rows, Mode, InPlace, 3>(args, block, scales, factors.data(), args.groups, blk, chunks_left, group, dot, total))
      break;
  }
  // The zero correction joins the lanes before the one reduction per row (four rows share it).
  for (int r = 0; r < Rows; ++r)
    total[r] = subtract_zero_correction(total[r], scales[r], zeros[r], args.input->group_sums.data(), args.groups);
  reduce_rows<Rows>(total, y);
}

// The 512-bit integer kernel needs VNNI (vpdpbusd) and VBMI (vpmultishiftqb).
[[nodiscard]] inline bool has_vnni_vbmi() {
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
}

}  // namespace avx512
#endif

#if defined(LOWBIT_HAVE_AVX2)
namespace avx2 {

// One 32-code chunk of Rows rows (one group; half of a 64-code activation block, or
// part of a group-long one). Codes <= 127 keep vpmaddubsw's pair sums within int16.
template <int Bits, int Rows, ScaleBlock Mode, int M>
LOWBIT_TARGET_AVX2 inline bool int8_chunk(const Int8RowsArgs& args, const std::uint8_t* const* blocks,
                                          const float* const* scales, Index blk, Index& chunks_left, Index& group,
                                          __m256i* dot, __m256* total) {
  const Index chunk = 8 * blk + M, start = 32 * chunk;
  if (start >= args.n) return false;
  const Int8Input& input = *args.input;
  const __m256i xq = in_register(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(input.xq.data() + start)));
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (Mode == ScaleBlock::Group) {
    for (int r = 0; r < Rows; ++r)
      dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(_mm256_maddubs_epi16(unpack_chunk<Bits>(blocks[r], M), xq), ones));
    if (--chunks_left == 0 || start + 32 >= args.n) {
      const float d = input.block_scales[static_cast<std::size_t>(group)];
      for (int r = 0; r < Rows; ++r) {
        total[r] = _mm256_fmadd_ps(_mm256_set1_ps(scales[r][group] * d), _mm256_cvtepi32_ps(dot[r]), total[r]);
        dot[r] = _mm256_setzero_si256();
      }
      ++group;
      chunks_left = args.chunks_per_group;
    }
  } else {
    const float d = input.block_scales[static_cast<std::size_t>(chunk / 2)];
    const auto g = static_cast<std::size_t>(input.half_groups[static_cast<std::size_t>(chunk)]);
    for (int r = 0; r < Rows; ++r) {
      const __m256i sum = _mm256_madd_epi16(_mm256_maddubs_epi16(unpack_chunk<Bits>(blocks[r], M), xq), ones);
      total[r] = _mm256_fmadd_ps(_mm256_set1_ps(scales[r][g] * d), _mm256_cvtepi32_ps(sum), total[r]);
    }
  }
  return true;
}

template <int Bits, int Rows, ScaleBlock Mode>
LOWBIT_TARGET_AVX2 void gemv_int8_rows(const Int8RowsArgs& args, const std::uint8_t* const* rows,
                                       const float* const* scales, const float* const* zeros, float* y) {
  constexpr Index block_bytes = kBlockCodes * Bits / 8;
  const Index blocks = (args.n + kBlockCodes - 1) / kBlockCodes, full_blocks = args.n / kBlockCodes;
  prefetch_next_row_params(scales, zeros, Rows, args.groups, args.scales_end, args.zeros_end);
  alignas(32) std::uint8_t tail[Rows][block_bytes];
  if (full_blocks < blocks)
    for (int r = 0; r < Rows; ++r) repack_tail_block<Bits>(rows[r], args.n, tail[r]);
  __m256 total[Rows];
  __m256i dot[Rows];
  for (int r = 0; r < Rows; ++r) {
    total[r] = _mm256_setzero_ps();
    dot[r] = _mm256_setzero_si256();
  }
  Index chunks_left = args.chunks_per_group, group = 0;
  for (Index blk = 0; blk < blocks; ++blk) {
    const std::uint8_t* block[Rows];
    for (int r = 0; r < Rows; ++r) block[r] = blk < full_blocks ? rows[r] + blk * block_bytes : tail[r];
    prefetch_next_rows(rows, Rows, args.row_bytes, block_bytes, blk, args.storage_end);
    if (!int8_chunk<Bits, Rows, Mode, 0>(args, block, scales, blk, chunks_left, group, dot, total) ||
        !int8_chunk<Bits, Rows, Mode, 1>(args, block, scales, blk, chunks_left, group, dot, total) ||
        !int8_chunk<Bits, Rows, Mode, 2>(args, block, scales, blk, chunks_left, group, dot, total) ||
        !int8_chunk<Bits, Rows, Mode, 3>(args, block, scales, blk, chunks_left, group, dot, total) ||
        !int8_chunk<Bits, Rows, Mode, 4>(args, block, scales, blk, chunks_left, group, dot, total) ||
        !int8_chunk<Bits, Rows, Mode, 5>(args, block, scales, blk, chunks_left, group, dot, total) ||
        !int8_chunk<Bits, Rows, Mode, 6>(args, block, scales, blk, chunks_left, group, dot, total) ||
        !int8_chunk<Bits, Rows, Mode, 7>(args, block, scales, blk, chunks_left, group, dot, total))
      break;
  }
  for (int r = 0; r < Rows; ++r)
    y[r] = reduce_add(total[r]) - zero_correction(scales[r], zeros[r], args.input->group_sums.data(), args.groups);
}

}  // namespace avx2
#endif

// Which integer kernel runs: 2 = AVX-512 VNNI + VBMI, 1 = AVX2, 0 = scalar.
[[nodiscard]] inline int int8_kernel(Isa isa) {
#if defined(LOWBIT_HAVE_AVX512)
  if (isa == Isa::Avx512 && avx512::has_vnni_vbmi()) return 2;
#endif
#if defined(LOWBIT_HAVE_AVX2)
  if (isa == Isa::Avx2 || isa == Isa::Avx512) return 1;
#endif
  return 0;
}

inline void gemv_int8(const QuantizedMatrix<float>& W, const float* x, float* y, Isa isa) {
  const int kernel = int8_kernel(isa);
  if (W.rows() == 0 || W.cols() == 0 || !int8_path_applies(W, kernel == 1 ? Isa::Avx2 : isa)) {
    gemv(W, x, y, isa);
    return;
  }
  // A reference, so the worker threads read this thread's buffers, not their own.
  thread_local Int8Input input_buffers;
  Int8Input& input = input_buffers;
  quantize_activation(W, x, isa, input);
  const Index rows = W.rows(), n = W.stored_cols();
  const ScaleBlock mode = scale_block(input, n, W.group_length());
  const Index chunks_per_group = kernel == 2 ? input.block / 64 : input.block / 32;
  const bool in_place = kernel == 2 && in_place_codes(W.spec().bits, mode, chunks_per_group);
  if (in_place) set_in_place_scales(input, W.spec().bits);
  const Int8RowsArgs args{&input,
                          n,
                          W.groups_per_row(),
                          chunks_per_group,
                          W.row_bytes(),
                          W.packed_codes().data() + W.packed_codes().size(),
                          W.scales().data() + W.scales().size(),
                          W.zeros().data() + W.zeros().size(),
                          (in_place ? input.in_place_scales : input.block_scales).data()};
  const Index tasks = row_tasks(rows);
  with_bits(W.spec().bits, [&](auto bits_constant) {
    constexpr int Bits = decltype(bits_constant)::value;
    const auto run = [&](auto mode_constant) {
      constexpr ScaleBlock Mode = decltype(mode_constant)::value;
      if (kernel == 0) {
        constexpr Index kRowsPerTask = 4;
        const Index scalar_tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
        return parallel_for(scalar_tasks, [&](Index task) {
          thread_local std::vector<std::uint8_t> codes;
          codes.resize(static_cast<std::size_t>(n));
          const Index first = task * kRowsPerTask;
          scalar::gemv_int8_rows(W, input, first, std::min(kRowsPerTask, rows - first), codes.data(), y + first);
        }, min_parallel_tasks(scalar_tasks, rows * n));
      }
      parallel_for(tasks, [&](Index task) {
#if defined(LOWBIT_HAVE_AVX512)
        if (kernel == 2) {
          if constexpr (Bits >= 2 && Bits <= 4) {
            if (in_place)
              return row_task(W, task, y,
                              [&](auto... a) { avx512::gemv_int8_rows<Bits, kKernelRows, Mode, true>(args, a...); },
                              [&](auto... a) { avx512::gemv_int8_rows<Bits, 1, Mode, true>(args, a...); });
          }
          return row_task(W, task, y,
                          [&](auto... a) { avx512::gemv_int8_rows<Bits, kKernelRows, Mode, false>(args, a...); },
                          [&](auto... a) { avx512::gemv_int8_rows<Bits, 1, Mode, false>(args, a...); });
        }
#endif
#if defined(LOWBIT_HAVE_AVX2)
        // 8-bit codes never get here (int8_path_applies); a 32-code chunk is in one group.
        constexpr ScaleBlock Avx2Mode = Mode == ScaleBlock::Group ? ScaleBlock::Group : ScaleBlock::Chunk;
        if constexpr (Bits <= 7)
          row_task(W, task, y,
                   [&](auto... a) { avx2::gemv_int8_rows<Bits, kKernelRows, Avx2Mode>(args, a...); },
                   [&](auto... a) { avx2::gemv_int8_rows<Bits, 1, Avx2Mode>(args, a...); });
#endif
      }, min_parallel_tasks(tasks, rows * n));
    };
    if (mode == ScaleBlock::Group) run(std::integral_constant<ScaleBlock, ScaleBlock::Group>{});
    else if (mode == ScaleBlock::Chunk) run(std::integral_constant<ScaleBlock, ScaleBlock::Chunk>{});
    else run(std::integral_constant<ScaleBlock, ScaleBlock::TwoGroups>{});
  });
  if (input.exponent != 0)
    for (Index r = 0; r < rows; ++r) y[r] = std::ldexp(y[r], -input.exponent);
}

}  // namespace lowbit::detail

namespace lowbit {

// y = W x with x quantized to int8 per block of 64 (or one group) inputs (see above):
// faster than gemv, with the error of an int8 input, |y - W_hat x| <= sum_j |w_hat_j|
// d_b(j) / 2 plus float rounding. Matrices the integer path does not take (rows of at
// most 224 codes, output-axis groups, see int8_path_applies) run gemv. Throws
// lowbit::Error on a shape mismatch or a non-finite x.
inline void gemv_int8(const QuantizedMatrix<float>& W, const Eigen::Ref<const Vector<float>>& x,
                      Eigen::Ref<Vector<float>> y) {
  detail::check_gemv_shapes(W, x.size(), y.size());
  detail::require_finite(x, "x");
  detail::gemv_int8(W, x.data(), y.data(), active_isa());
}

}  // namespace lowbit

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

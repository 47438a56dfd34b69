// AVX2 pack / unpack / dequantize for full 256-code blocks; everything else (short
// last blocks, rows ending inside a block, group sizes not a multiple of 8, double)
// goes to the scalar reference, so results are bit-identical to it.
#pragma once

#include "lowbit/core/isa.hpp"
#include "lowbit/pack/scalar.hpp"

#if defined(LOWBIT_HAVE_AVX2)

namespace lowbit::detail::avx2 {

LOWBIT_TARGET_AVX2 inline __m256i shift_right_bytes(__m256i v, int count, int width) {
  // 16-bit shifts leak the neighbour byte into the top bits; the mask drops them.
  v = _mm256_srl_epi16(v, _mm_cvtsi32_si128(count));
  return _mm256_and_si256(v, _mm256_set1_epi8(static_cast<char>((1 << width) - 1)));
}

// Codes 32m .. 32m+31 of a full block, one per byte.
template <int Bits>
LOWBIT_TARGET_AVX2 inline __m256i unpack_chunk(const std::uint8_t* block, int m) {
  constexpr PlaneSet set = planes_for_bits(Bits);
  if constexpr (Bits == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * m));
  } else {
    __m256i codes = _mm256_setzero_si256();
    int plane_byte = 0;
    for (int k = 0; k < set.count; ++k) {
      const Plane plane = set.planes[static_cast<std::size_t>(k)];
      const int L = 32 * plane.width;
      const __m256i bytes =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + plane_byte + (32 * m) % L));
      __m256i part = shift_right_bytes(bytes, plane.width * ((32 * m) / L), plane.width);
      part = _mm256_sll_epi16(part, _mm_cvtsi32_si128(plane.shift));  // stays inside the byte
      codes = _mm256_or_si256(codes, part);
      plane_byte += L;
    }
    return codes;
  }
}

template <int Bits>
LOWBIT_TARGET_AVX2 inline void pack_full_block(const std::uint8_t* codes, std::uint8_t* packed) {
  constexpr PlaneSet set = planes_for_bits(Bits);
  int plane_byte = 0;
  for (int k = 0; k < set.count; ++k) {
    const Plane plane = set.planes[static_cast<std::size_t>(k)];
    const int L = 32 * plane.width;
    for (int offset = 0; offset < L; offset += 32) {
      __m256i out = _mm256_setzero_si256();
      for (int i = 0; i < 8 / plane.width; ++i) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + offset + i * L));
        const __m256i part = shift_right_bytes(v, plane.shift, plane.width);
        out = _mm256_or_si256(out, _mm256_sll_epi16(part, _mm_cvtsi32_si128(plane.width * i)));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + plane_byte + offset), out);
    }
    plane_byte += L;
  }
}

// Converts 8 codes (low 8 bytes of `codes`) to (q - zero) * scale.
LOWBIT_TARGET_AVX2 inline __m256 decode8(__m128i codes, float scale, float zero) {
  const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
  return _mm256_mul_ps(_mm256_sub_ps(q, _mm256_set1_ps(zero)), _mm256_set1_ps(scale));
}

// Full blocks (256 codes, all inside the row) take the vector path; the rest of the
// row goes to the scalar reference. Plain loops: lambdas would lose the target attribute.
[[nodiscard]] inline Index full_block_codes(Index n) { return n / kBlockCodes * kBlockCodes; }

template <int Bits>
LOWBIT_TARGET_AVX2 void pack_row(const std::uint8_t* codes, Index n, std::uint8_t* packed) {
  const Index full = full_block_codes(n);
  for (Index start = 0; start < full; start += kBlockCodes)
    pack_full_block<Bits>(codes + start, packed + start * Bits / 8);
  if (full < n) scalar::pack_row(codes + full, n - full, Bits, packed + full * Bits / 8);
}

template <int Bits>
LOWBIT_TARGET_AVX2 void unpack_row(const std::uint8_t* packed, Index n, std::uint8_t* codes) {
  const Index full = full_block_codes(n);
  for (Index start = 0; start < full; start += kBlockCodes)
    for (int m = 0; m < 8; ++m)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + start + 32 * m),
                          unpack_chunk<Bits>(packed + start * Bits / 8, m));
  if (full < n) scalar::unpack_row(packed + full * Bits / 8, n - full, Bits, codes + full);
}

// The scalar tail of a dequantized row: codes [full, n) with their own groups.
template <int Bits>
void dequantize_tail(const std::uint8_t* packed, Index full, Index n, const float* scales,
                     const float* zeros, Index group_size, float* out) {
  std::uint8_t block[kBlockCodes];
  scalar::for_each_block(n - full, Bits, [&](Index start, Index t, Index offset) {
    scalar::unpack_block(packed + full * Bits / 8 + offset, t, Bits, block);
    scalar::dequantize_codes(block, full + start, std::min(t, n - full - start), scales, zeros,
                             group_size, out + full + start);
  });
}

template <int Bits>
LOWBIT_TARGET_AVX2 void dequantize_row(const std::uint8_t* packed, Index n, const float* scales,
                                       const float* zeros, Index group_size, float* out) {
  if (group_size % 8 != 0) return scalar::dequantize_row(packed, n, Bits, scales, zeros, group_size, out);
  const Index full = full_block_codes(n);
  Index group = 0, group_end = group_size;
  for (Index start = 0; start < full; start += kBlockCodes) {
    for (int m = 0; m < 8; ++m) {
      const __m256i codes = unpack_chunk<Bits>(packed + start * Bits / 8, m);
      const __m128i low = _mm256_castsi256_si128(codes), high = _mm256_extracti128_si256(codes, 1);
      const __m128i eights[4] = {low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)};
      for (int k = 0; k < 4; ++k) {
        const Index i = start + 32 * m + 8 * k;
        if (i >= group_end) { ++group; group_end += group_size; }  // runs of 8 never straddle
        _mm256_storeu_ps(out + i, decode8(eights[k], scales[group], zeros[group]));
      }
    }
  }
  if (full < n) dequantize_tail<Bits>(packed, full, n, scales, zeros, group_size, out);
}

}  // namespace lowbit::detail::avx2

#endif  // LOWBIT_HAVE_AVX2

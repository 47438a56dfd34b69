// AVX-512 (F+BW) pack / unpack / dequantize for full 256-code blocks, 64 codes per
// step; the rest goes to the AVX2 or scalar path, so results are bit-identical.
#pragma once

#include "lowbit/pack/avx2.hpp"

#if defined(LOWBIT_HAVE_AVX512)

// GCC 12's AVX-512 intrinsics initialise their "undefined" vectors from themselves,
// which -Wmaybe-uninitialized reports at every use; the warning is about the
// compiler's header, not this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lowbit::detail::avx512 {

LOWBIT_TARGET_AVX512 inline __m512i shift_right_bytes(__m512i v, int count, int width) {
  v = _mm512_srl_epi16(v, _mm_cvtsi32_si128(count));
  return _mm512_and_si512(v, _mm512_set1_epi8(static_cast<char>((1 << width) - 1)));
}

// Codes 64m .. 64m+63 of a full block, one per byte.
template <int Bits>
LOWBIT_TARGET_AVX512 inline __m512i unpack_chunk(const std::uint8_t* block, int m) {
  constexpr PlaneSet set = planes_for_bits(Bits);
  if constexpr (Bits == 8) {
    return _mm512_loadu_si512(block + 64 * m);
  } else {
    __m512i codes = _mm512_setzero_si512();
    int plane_byte = 0;
    for (int k = 0; k < set.count; ++k) {
      const Plane plane = set.planes[static_cast<std::size_t>(k)];
      const int L = 32 * plane.width;
      __m512i bytes;
      int shift;
      if (L >= 64) {
        bytes = _mm512_loadu_si512(block + plane_byte + (64 * m) % L);
        shift = plane.width * ((64 * m) / L);
      } else {
        // A 1-bit plane is 32 bytes: both halves read the same bytes, one bit apart.
        const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + plane_byte));
        const __m256i upper = _mm256_srli_epi16(half, 1);
        bytes = _mm512_inserti64x4(_mm512_castsi256_si512(half), upper, 1);
        shift = 2 * m;
      }
      __m512i part = shift_right_bytes(bytes, shift, plane.width);
      part = _mm512_sll_epi16(part, _mm_cvtsi32_si128(plane.shift));
      codes = _mm512_or_si512(codes, part);
      plane_byte += L;
    }
    return codes;
  }
}

LOWBIT_TARGET_AVX512 inline __m512 decode16(__m128i codes, float scale, float zero) {
  const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
  return _mm512_mul_ps(_mm512_sub_ps(q, _mm512_set1_ps(zero)), _mm512_set1_ps(scale));
}

template <int Bits>
LOWBIT_TARGET_AVX512 void unpack_row(const std::uint8_t* packed, Index n, std::uint8_t* codes) {
  const Index full = avx2::full_block_codes(n);
  for (Index start = 0; start < full; start += kBlockCodes)
    for (int m = 0; m < 4; ++m)
      _mm512_storeu_si512(codes + start + 64 * m, unpack_chunk<Bits>(packed + start * Bits / 8, m));
  if (full < n) scalar::unpack_row(packed + full * Bits / 8, n - full, Bits, codes + full);
}

template <int Bits>
LOWBIT_TARGET_AVX512 void dequantize_row(const std::uint8_t* packed, Index n, const float* scales,
                                         const float* zeros, Index group_size, float* out) {
  if (group_size % 16 != 0) return avx2::dequantize_row<Bits>(packed, n, scales, zeros, group_size, out);
  const Index full = avx2::full_block_codes(n);
  Index group = 0, group_end = group_size;
  for (Index start = 0; start < full; start += kBlockCodes) {
    for (int m = 0; m < 4; ++m) {
      const __m512i codes = unpack_chunk<Bits>(packed + start * Bits / 8, m);
      const __m128i quarters[4] = {_mm512_extracti32x4_epi32(codes, 0), _mm512_extracti32x4_epi32(codes, 1),
                                   _mm512_extracti32x4_epi32(codes, 2), _mm512_extracti32x4_epi32(codes, 3)};
      for (int k = 0; k < 4; ++k) {
        const Index i = start + 64 * m + 16 * k;
        if (i >= group_end) { ++group; group_end += group_size; }  // runs of 16 never straddle
        _mm512_storeu_ps(out + i, decode16(quarters[k], scales[group], zeros[group]));
      }
    }
  }
  if (full < n) avx2::dequantize_tail<Bits>(packed, full, n, scales, zeros, group_size, out);
}

}  // namespace lowbit::detail::avx512

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // LOWBIT_HAVE_AVX512

// Lane arithmetic for the HQQ solver (hqq_kernel.hpp) and its per-ISA instantiation.
//
// Each `Ops` struct gives the same operations with the same rounding on 1 (scalar),
// 8 (AVX2) or 16 (AVX-512) floats, so every variant is bit-identical to the scalar
// one. Every multiply-add is an explicit fused fma: a compiler allowed to contract
// a*b + c would otherwise fuse some of them in one variant and not in another. The
// operations are always inlined, also in unoptimized (Debug, sanitizer) builds.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "lowbit/core/isa.hpp"
#include "lowbit/core/types.hpp"

namespace lowbit::detail::hqq {

// log2(1 + f) ~= f * P(f) on f in [sqrt(1/2) - 1, sqrt(2) - 1], relative error < 1.7e-7;
// 2^r ~= Q(r) on r in [-1/2, 1/2], relative error < 1.9e-9. Our own fits (least squares
// on Chebyshev nodes, reweighted towards minimax), lowest degree first.
inline constexpr int kLog2Degree = 7;
inline constexpr float kLog2Poly[kLog2Degree + 1] = {1.442694962e+00f, -7.213527881e-01f, 4.809232420e-01f,
                                                     -3.602396387e-01f, 2.870987096e-01f, -2.488768887e-01f,
                                                     2.340422972e-01f, -1.458115173e-01f};
inline constexpr int kExp2Degree = 6;
inline constexpr float kExp2Poly[kExp2Degree + 1] = {1.000000001e+00f, 6.931472057e-01f, 2.402264689e-01f,
                                                     5.550328777e-02f, 9.618488959e-03f, 1.339993122e-03f,
                                                     1.534581160e-04f};
inline constexpr float kSqrt2 = 1.41421356f;
inline constexpr float kSmallestNormal = std::numeric_limits<float>::min();
template <class S>
inline constexpr S kInfinity = std::numeric_limits<S>::infinity();

namespace scalar {

// One lane. float uses the same polynomial power as the SIMD variants; double (for
// checks) uses std::pow.
template <class S>
struct Ops {
  using V = S;
  using Mask = bool;
  static constexpr int lanes = 1;
  static constexpr bool kExactPow = std::is_same_v<S, double>;

  [[gnu::always_inline]] static V set1(S x) { return x; }
  [[gnu::always_inline]] static V load(const S* p) { return *p; }
  [[gnu::always_inline]] static void store(S* p, V v) { *p = v; }
  [[gnu::always_inline]] static V add(V a, V b) { return a + b; }
  [[gnu::always_inline]] static V sub(V a, V b) { return a - b; }
  [[gnu::always_inline]] static V mul(V a, V b) { return a * b; }
  [[gnu::always_inline]] static V div(V a, V b) { return a / b; }
  [[gnu::always_inline]] static V fma(V a, V b, V c) { return std::fma(a, b, c); }    // a*b + c
  [[gnu::always_inline]] static V fnma(V a, V b, V c) { return std::fma(-a, b, c); }  // c - a*b
  [[gnu::always_inline]] static V min(V a, V b) { return a < b ? a : b; }
  [[gnu::always_inline]] static V max(V a, V b) { return a > b ? a : b; }
  [[gnu::always_inline]] static V abs(V a) { return std::fabs(a); }
  [[gnu::always_inline]] static V round(V a) { return std::nearbyint(a); }
  [[gnu::always_inline]] static V copysign(V magnitude, V sign) { return std::copysign(magnitude, sign); }
  [[gnu::always_inline]] static Mask lt(V a, V b) { return a < b; }
  [[gnu::always_inline]] static bool any(Mask m) { return m; }
  [[gnu::always_inline]] static V select(Mask m, V a, V b) { return m ? a : b; }
  [[gnu::always_inline]] static V pow(V a, V y) { return std::pow(std::max(a, std::numeric_limits<S>::min()), y); }

  // a = 2^e * m with m in [sqrt(1/2), sqrt(2)), for a positive normal float.
  [[gnu::always_inline]] static V split_exponent(V a, V& e) {
    const std::uint32_t bits = std::bit_cast<std::uint32_t>(a);
    std::int32_t exponent = static_cast<std::int32_t>(bits >> 23) - 127;
    V m = std::bit_cast<float>((bits & 0x7fffffu) | 0x3f800000u);
    if (m > kSqrt2) { m *= 0.5f; exponent += 1; }
    e = static_cast<float>(exponent);
    return m;
  }
  // 2^k for integral k in [-126, 127].
  [[gnu::always_inline]] static V exp2_int(V k) {
    return std::bit_cast<float>(static_cast<std::uint32_t>(static_cast<std::int32_t>(k) + 127) << 23);
  }
};

#include "lowbit/quantizers/hqq_kernel.hpp"

}  // namespace scalar
}  // namespace lowbit::detail::hqq

#if defined(LOWBIT_HAVE_AVX2)

// GCC 12's AVX-512 intrinsics initialise their "undefined" vectors from themselves,
// which -Wmaybe-uninitialized reports at every use (see pack/avx512.hpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace lowbit::detail::hqq::avx2 {

struct Ops {
  using V = __m256;
  using Mask = __m256;
  static constexpr int lanes = 8;
  static constexpr bool kExactPow = false;

  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V set1(float x) { return _mm256_set1_ps(x); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V load(const float* p) { return _mm256_loadu_ps(p); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V add(V a, V b) { return _mm256_add_ps(a, b); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V div(V a, V b) { return _mm256_div_ps(a, b); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V fnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V min(V a, V b) { return _mm256_min_ps(a, b); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V max(V a, V b) { return _mm256_max_ps(a, b); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V round(V a) {
    return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // magnitude >= 0 here, so or-ing in the sign bit is copysign.
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V copysign(V magnitude, V sign) {
    return _mm256_or_ps(magnitude, _mm256_and_ps(sign, _mm256_set1_ps(-0.0f)));
  }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static Mask lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static bool any(Mask m) { return _mm256_movemask_ps(m) != 0; }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V select(Mask m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V pow(V a, V) { return a; }  // unused: kExactPow is false

  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V split_exponent(V a, V& e) {
    const __m256i bits = _mm256_castps_si256(a);
    __m256i exponent = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
    V m = _mm256_castsi256_ps(
        _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffff)), _mm256_set1_epi32(0x3f800000)));
    const V big = _mm256_cmp_ps(m, _mm256_set1_ps(kSqrt2), _CMP_GT_OQ);
    m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
    exponent = _mm256_sub_epi32(exponent, _mm256_castps_si256(big));  // big lanes are -1
    e = _mm256_cvtepi32_ps(exponent);
    return m;
  }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX2 static V exp2_int(V k) {
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  }
};

#include "lowbit/quantizers/hqq_kernel.hpp"

}  // namespace lowbit::detail::hqq::avx2

#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif

namespace lowbit::detail::hqq::avx512 {

struct Ops {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int lanes = 16;
  static constexpr bool kExactPow = false;

  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V set1(float x) { return _mm512_set1_ps(x); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V load(const float* p) { return _mm512_loadu_ps(p); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V add(V a, V b) { return _mm512_add_ps(a, b); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V div(V a, V b) { return _mm512_div_ps(a, b); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V fnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V min(V a, V b) { return _mm512_min_ps(a, b); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V max(V a, V b) { return _mm512_max_ps(a, b); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V abs(V a) { return _mm512_andnot_ps(_mm512_set1_ps(-0.0f), a); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V round(V a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V copysign(V magnitude, V sign) {
    return _mm512_or_ps(magnitude, _mm512_and_ps(sign, _mm512_set1_ps(-0.0f)));
  }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static Mask lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static bool any(Mask m) { return m != 0; }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V select(Mask m, V a, V b) {
    return _mm512_mask_blend_ps(m, b, a);
  }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V pow(V a, V) { return a; }  // unused: kExactPow is false

  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V split_exponent(V a, V& e) {
    const __m512i bits = _mm512_castps_si512(a);
    __m512i exponent = _mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(127));
    V m = _mm512_castsi512_ps(
        _mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffff)), _mm512_set1_epi32(0x3f800000)));
    const Mask big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(kSqrt2), _CMP_GT_OQ);
    m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
    exponent = _mm512_mask_add_epi32(exponent, big, exponent, _mm512_set1_epi32(1));
    e = _mm512_cvtepi32_ps(exponent);
    return m;
  }
  [[gnu::always_inline]] LOWBIT_TARGET_AVX512 static V exp2_int(V k) {
    const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
  }
};

#include "lowbit/quantizers/hqq_kernel.hpp"

}  // namespace lowbit::detail::hqq::avx512

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // LOWBIT_HAVE_AVX2

namespace lowbit::detail::hqq {

// The widest batch any variant uses (AVX-512: 16 floats).
inline constexpr int kMaxLanes = 16;

// The solver's entry points for one ISA; a batch holds `lanes` <= kMaxLanes groups.
template <class S>
struct Kernels {
  int lanes;
  void (*reference)(const S* w, Index n, const S* inverse_scale, const S* scale, S* zero, int steps,
                    const S* inv_beta, const S* tau, S p_minus_1, S max_code, S* l1);
  void (*improved)(const S* w, Index n, const S* inverse_scale, const S* scale, S* zero, S* best_error,
                   int steps, const S* inv_beta, const S* tau, S p_minus_1, S max_code, int patience,
                   bool early_stop);
  void (*encode)(const S* w, Index n, const S* inverse_scale, const S* zero, S max_code, S* codes);
  void (*range)(const S* w, Index n, S* lo, S* hi);
};

// SIMD variants exist for float; double runs the scalar kernel.
template <class S>
[[nodiscard]] inline Kernels<S> kernels_for(Isa isa) {
  if constexpr (std::is_same_v<S, float>) {
#if defined(LOWBIT_HAVE_AVX2)
    if (isa == Isa::Avx512)
      return {avx512::Ops::lanes, &avx512::reference_steps<avx512::Ops, float>,
              &avx512::improved_steps<avx512::Ops, float>, &avx512::encode_steps<avx512::Ops, float>,
              &avx512::lane_range<avx512::Ops, float>};
    if (isa == Isa::Avx2)
      return {avx2::Ops::lanes, &avx2::reference_steps<avx2::Ops, float>, &avx2::improved_steps<avx2::Ops, float>,
              &avx2::encode_steps<avx2::Ops, float>, &avx2::lane_range<avx2::Ops, float>};
#endif
  }
  (void)isa;
  using Ops = scalar::Ops<S>;
  return {Ops::lanes, &scalar::reference_steps<Ops, S>, &scalar::improved_steps<Ops, S>,
          &scalar::encode_steps<Ops, S>, &scalar::lane_range<Ops, S>};
}

}  // namespace lowbit::detail::hqq

// Dense GEMM for GPTQ's Hessian work: C -= A B or C += A B on packed panels, with a
// register-blocked micro-kernel per ISA (scalar, AVX2+FMA, AVX-512F).
//
// The build needs no -march flag (the kernels carry target attributes), so Eigen's own
// products would run on SSE2 here; these reach the FMA units. Determinism: every C
// element is c +/- (fixed-order FMA chain over k) per k block of kGemmDepth, whatever
// tile, thread or panel position it falls in. Callers split C into fixed tiles, so
// results are bit-identical for any thread count.
//
// Packed formats (MR, NR from the active kernel):
//   A [m x k] -> ceil(m/MR) panels, panel i holds A(i*MR + r, p) at [p*MR + r]
//   B [k x n] -> ceil(n/NR) panels, panel j holds B(p, j*NR + c) at [p*NR + c]
// Rows/columns past the matrix are zero.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include "lowbit/core/isa.hpp"
#include "lowbit/core/types.hpp"

#if defined(LOWBIT_HAVE_AVX512) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lowbit::detail::gemm {

// k is processed in blocks of this many terms; part of the arithmetic's definition.
inline constexpr Index kGemmDepth = 256;
// Rows of A packed at once by gemm() (a multiple of every MR).
inline constexpr Index kGemmRows = 192;

// A strided read-only view: element (i, j) at data[i * row_stride + j * col_stride].
// Transposes are views with the strides swapped.
template <class T>
struct View {
  const T* data = nullptr;
  Index row_stride = 0, col_stride = 1;
  [[nodiscard]] T operator()(Index i, Index j) const { return data[i * row_stride + j * col_stride]; }
  [[nodiscard]] View block(Index i, Index j) const {
    return {data + i * row_stride + j * col_stride, row_stride, col_stride};
  }
  [[nodiscard]] View transposed() const { return {data, col_stride, row_stride}; }
};

template <class T>
[[nodiscard]] View<T> row_major(const T* data, Index stride) {
  return {data, stride, 1};
}

// The A stream (packed U in GPTQ's updates) often comes from L3: the kernels prefetch
// it this many depth steps ahead (measured: +30% on 4096 x 64 x 128 from L3).
inline constexpr Index kPrefetchSteps = 32;

// One MR x NR tile: c[r * ldc + s] -/+= sum_p a[p*MR + r] * b[p*NR + s].
template <class T>
using TileFn = void (*)(Index depth, const T* a, const T* b, T* c, Index ldc, bool subtract);

template <class T>
struct Kernel {
  int mr = 1, nr = 1;
  TileFn<T> tile = nullptr;
  [[nodiscard]] Index packed_a_size(Index m, Index k) const { return (m + mr - 1) / mr * mr * k; }
  [[nodiscard]] Index packed_b_size(Index k, Index n) const { return (n + nr - 1) / nr * nr * k; }
};

// ---- scalar reference kernel ---------------------------------------------------
template <class T, int MR, int NR>
void tile_scalar(Index depth, const T* a, const T* b, T* c, Index ldc, bool subtract) {
  T acc[MR][NR] = {};
  for (Index p = 0; p < depth; ++p, a += MR, b += NR)
    for (int r = 0; r < MR; ++r)
      for (int s = 0; s < NR; ++s) acc[r][s] += a[r] * b[s];
  for (int r = 0; r < MR; ++r)
    for (int s = 0; s < NR; ++s) c[r * ldc + s] = subtract ? c[r * ldc + s] - acc[r][s] : c[r * ldc + s] + acc[r][s];
}

#if defined(LOWBIT_HAVE_AVX2)
// ---- AVX2 + FMA: MR rows x 2 vectors ------------------------------------------------
// (Helpers always inlined, so unoptimized builds do not pay a call per FMA.)
[[gnu::always_inline]] LOWBIT_TARGET_AVX2 inline __m256 avx2_load(const float* p) { return _mm256_loadu_ps(p); }
[[gnu::always_inline]] LOWBIT_TARGET_AVX2 inline __m256d avx2_load(const double* p) { return _mm256_loadu_pd(p); }
[[gnu::always_inline]] LOWBIT_TARGET_AVX2 inline void avx2_store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
[[gnu::always_inline]] LOWBIT_TARGET_AVX2 inline void avx2_store(double* p, __m256d v) { _mm256_storeu_pd(p, v); }
[[gnu::always_inline]] LOWBIT_TARGET_AVX2 inline __m256 avx2_broadcast(const float* p) {
  return _mm256_broadcast_ss(p);
}
[[gnu::always_inline]] LOWBIT_TARGET_AVX2 inline __m256d avx2_broadcast(const double* p) {
  return _mm256_broadcast_sd(p);
}
[[gnu::always_inline]] LOWBIT_TARGET_AVX2 inline __m256 avx2_fma(__m256 a, __m256 b, __m256 c) {
  return _mm256_fmadd_ps(a, b, c);
}
[[gnu::always_inline]] LOWBIT_TARGET_AVX2 inline __m256d avx2_fma(__m256d a, __m256d b, __m256d c) {
  return _mm256_fmadd_pd(a, b, c);
}
[[gnu::always_inline]] LOWBIT_TARGET_AVX2 inline __m256 avx2_combine(__m256 c, __m256 acc, bool subtract) {
  return subtract ? _mm256_sub_ps(c, acc) : _mm256_add_ps(c, acc);
}
[[gnu::always_inline]] LOWBIT_TARGET_AVX2 inline __m256d avx2_combine(__m256d c, __m256d acc, bool subtract) {
  return subtract ? _mm256_sub_pd(c, acc) : _mm256_add_pd(c, acc);
}

template <class T, int MR>
LOWBIT_TARGET_AVX2 void tile_avx2(Index depth, const T* a, const T* b, T* c, Index ldc, bool subtract) {
  using V = decltype(avx2_load(b));
  constexpr int L = 32 / sizeof(T);
  V acc0[MR], acc1[MR];  // every loop over MR unrolled, so the accumulators stay in registers
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = V{};
  for (Index p = 0; p < depth; ++p, a += MR, b += 2 * L) {
    _mm_prefetch(reinterpret_cast<const char*>(a + kPrefetchSteps * MR), _MM_HINT_T0);
    const V b0 = avx2::in_register(avx2_load(b)), b1 = avx2::in_register(avx2_load(b + L));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V ar = avx2_broadcast(a + r);
      acc0[r] = avx2_fma(ar, b0, acc0[r]);
      acc1[r] = avx2_fma(ar, b1, acc1[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    T* row = c + r * ldc;
    avx2_store(row, avx2_combine(avx2_load(row), acc0[r], subtract));
    avx2_store(row + L, avx2_combine(avx2_load(row + L), acc1[r], subtract));
  }
}
#endif

#if defined(LOWBIT_HAVE_AVX512)
// ---- AVX-512F: MR rows x 2 vectors ------------------------------------------------
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline __m512 avx512_load(const float* p) { return _mm512_loadu_ps(p); }
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline __m512d avx512_load(const double* p) { return _mm512_loadu_pd(p); }
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline void avx512_store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline void avx512_store(double* p, __m512d v) { _mm512_storeu_pd(p, v); }
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline __m512 avx512_broadcast(const float* p) {
  return _mm512_set1_ps(*p);
}
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline __m512d avx512_broadcast(const double* p) {
  return _mm512_set1_pd(*p);
}
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline __m512 avx512_fma(__m512 a, __m512 b, __m512 c) {
  return _mm512_fmadd_ps(a, b, c);
}
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline __m512d avx512_fma(__m512d a, __m512d b, __m512d c) {
  return _mm512_fmadd_pd(a, b, c);
}
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline __m512 avx512_combine(__m512 c, __m512 acc, bool subtract) {
  return subtract ? _mm512_sub_ps(c, acc) : _mm512_add_ps(c, acc);
}
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline __m512d avx512_combine(__m512d c, __m512d acc, bool subtract) {
  return subtract ? _mm512_sub_pd(c, acc) : _mm512_add_pd(c, acc);
}

template <class T, int MR>
LOWBIT_TARGET_AVX512 void tile_avx512(Index depth, const T* a, const T* b, T* c, Index ldc, bool subtract) {
  using V = decltype(avx512_load(b));
  constexpr int L = 64 / sizeof(T);
  V acc0[MR], acc1[MR];  // every loop over MR unrolled, so the accumulators stay in registers
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = V{};
  for (Index p = 0; p < depth; ++p, a += MR, b += 2 * L) {
    _mm_prefetch(reinterpret_cast<const char*>(a + kPrefetchSteps * MR), _MM_HINT_T0);
    const V b0 = avx512::in_register(avx512_load(b)), b1 = avx512::in_register(avx512_load(b + L));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V ar = avx512_broadcast(a + r);
      acc0[r] = avx512_fma(ar, b0, acc0[r]);
      acc1[r] = avx512_fma(ar, b1, acc1[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    T* row = c + r * ldc;
    avx512_store(row, avx512_combine(avx512_load(row), acc0[r], subtract));
    avx512_store(row + L, avx512_combine(avx512_load(row + L), acc1[r], subtract));
  }
}
#endif

// The kernel for an ISA: register tiles sized to fill the vector register file
// (AVX-512: 24 of 32 zmm accumulate; AVX2: 12 of 16 ymm).
template <class T>
[[nodiscard]] Kernel<T> kernel_for(Isa isa) {
#if defined(LOWBIT_HAVE_AVX512)
  if (isa == Isa::Avx512) return {12, static_cast<int>(128 / sizeof(T)), &tile_avx512<T, 12>};
#endif
#if defined(LOWBIT_HAVE_AVX2)
  if (isa == Isa::Avx2) return {6, static_cast<int>(64 / sizeof(T)), &tile_avx2<T, 6>};
#endif
  (void)isa;
  return {4, 8, &tile_scalar<T, 4, 8>};
}

template <class T>
[[nodiscard]] Kernel<T> active_kernel() {
  return kernel_for<T>(active_isa());
}

// Packs A [m x k] into MR-row panels (see the header comment).
template <class T>
void pack_a(const Kernel<T>& kernel, Index m, Index k, View<T> A, T* out) {
  const Index mr = kernel.mr;
  for (Index i0 = 0; i0 < m; i0 += mr) {
    const Index rows = std::min(mr, m - i0);
    for (Index p = 0; p < k; ++p, out += mr) {
      for (Index r = 0; r < rows; ++r) out[r] = A(i0 + r, p);
      for (Index r = rows; r < mr; ++r) out[r] = T(0);
    }
  }
}

// Packs B [k x n] into NR-column panels.
template <class T>
void pack_b(const Kernel<T>& kernel, Index k, Index n, View<T> B, T* out) {
  const Index nr = kernel.nr;
  for (Index j0 = 0; j0 < n; j0 += nr) {
    const Index cols = std::min(nr, n - j0);
    for (Index p = 0; p < k; ++p, out += nr) {
      for (Index s = 0; s < cols; ++s) out[s] = B(p, j0 + s);
      for (Index s = cols; s < nr; ++s) out[s] = T(0);
    }
  }
}

// C [m x n] -/+= A B from packed A (m x depth) and packed B (depth x n). Panel i of A
// starts at a + i * a_stride (a_stride >= MR * depth; larger when A is a slice of a
// deeper packing), likewise B. Depth runs in kGemmDepth blocks. Partial edge tiles go
// through a zeroed buffer: 0 + acc is exact, so their elements get the same single
// rounding c -/+ acc as full tiles.
template <class T>
void multiply_packed(const Kernel<T>& kernel, Index m, Index n, Index depth, const T* a, Index a_stride, const T* b,
                     Index b_stride, T* c, Index ldc, bool subtract) {
  const Index mr = kernel.mr, nr = kernel.nr;
  const Index row_panels = (m + mr - 1) / mr, col_panels = (n + nr - 1) / nr;
  alignas(64) T edge[16 * 64];  // >= the largest MR x NR
  for (Index p0 = 0; p0 < depth; p0 += kGemmDepth) {
    const Index block = std::min(kGemmDepth, depth - p0);
    auto run = [&](Index ip, Index jp) {
      const Index rows = std::min(mr, m - ip * mr), cols = std::min(nr, n - jp * nr);
      const T* a_panel = a + ip * a_stride + p0 * mr;
      const T* b_panel = b + jp * b_stride + p0 * nr;
      T* tile = c + ip * mr * ldc + jp * nr;
      if (rows == mr && cols == nr) {
        kernel.tile(block, a_panel, b_panel, tile, ldc, subtract);
        return;
      }
      std::fill(edge, edge + mr * nr, T(0));
      kernel.tile(block, a_panel, b_panel, edge, nr, false);
      for (Index r = 0; r < rows; ++r)
        for (Index s = 0; s < cols; ++s)
          tile[r * ldc + s] = subtract ? tile[r * ldc + s] - edge[r * nr + s] : tile[r * ldc + s] + edge[r * nr + s];
    };
    // Keep the smaller packed operand in cache across the inner loop.
    if (row_panels >= col_panels) {
      for (Index ip = 0; ip < row_panels; ++ip)
        for (Index jp = 0; jp < col_panels; ++jp) run(ip, jp);
    } else {
      for (Index jp = 0; jp < col_panels; ++jp)
        for (Index ip = 0; ip < row_panels; ++ip) run(ip, jp);
    }
  }
}

// The same with panels packed back to back (a_stride = MR * depth, b_stride = NR * depth).
template <class T>
void multiply_packed(const Kernel<T>& kernel, Index m, Index n, Index depth, const T* a, const T* b, T* c, Index ldc,
                     bool subtract) {
  multiply_packed(kernel, m, n, depth, a, kernel.mr * depth, b, kernel.nr * depth, c, ldc, subtract);
}

// Single-threaded C [m x n] -/+= A [m x k] B [k x n] for any strided views; C
// row-major with stride ldc. Callers parallelize over fixed tiles of C.
template <class T>
void multiply(const Kernel<T>& kernel, Index m, Index n, Index k, View<T> A, View<T> B, T* c, Index ldc,
              bool subtract) {
  if (m <= 0 || n <= 0 || k <= 0) return;
  thread_local std::vector<T> buffer_a, buffer_b;
  const Index depth_max = std::min(k, kGemmDepth);
  buffer_b.resize(static_cast<std::size_t>(kernel.packed_b_size(depth_max, n)));
  buffer_a.resize(static_cast<std::size_t>(kernel.packed_a_size(std::min(m, kGemmRows), depth_max)));
  for (Index p0 = 0; p0 < k; p0 += kGemmDepth) {
    const Index depth = std::min(kGemmDepth, k - p0);
    pack_b(kernel, depth, n, B.block(p0, 0), buffer_b.data());
    for (Index i0 = 0; i0 < m; i0 += kGemmRows) {
      const Index rows = std::min(kGemmRows, m - i0);
      pack_a(kernel, rows, depth, A.block(i0, p0), buffer_a.data());
      multiply_packed(kernel, rows, n, depth, buffer_a.data(), buffer_b.data(), c + i0 * ldc, ldc, subtract);
    }
  }
}

}  // namespace lowbit::detail::gemm

#if defined(LOWBIT_HAVE_AVX512) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

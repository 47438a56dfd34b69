// The Hessian algebra of GPTQ on the packed GEMM of gptq_gemm.hpp: the streamed Gram
// matrix X^T X, a blocked Cholesky factorization (with a blocked triangular inverse for
// its diagonal blocks), and the reverse factor V (H = V V^T, V upper) GPTQ's error
// feedback uses.
//
// Every parallel loop runs over a fixed list of tiles whose arithmetic does not depend
// on which thread computes it, so results are bit-identical for any thread count.
// Parallel steps are few and coarse (one or two per 256-column block): on a shared
// machine each synchronization can cost a scheduler time slice.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "lowbit/core/threading.hpp"
#include "lowbit/core/types.hpp"
#include "lowbit/quantizers/gptq_gemm.hpp"

namespace lowbit::detail::linalg {

using gemm::Kernel;
using gemm::View;

// Edge of the C tiles the parallel products split into: a multiple of every kernel's
// MR (12, 6, 4) and NR (32, 16, 8), so tiles start on packed panel boundaries.
inline constexpr Index kTile = 192;
// Block of the parallel Cholesky / triangular inverse, and of their serial inner calls
// on diagonal blocks.
inline constexpr Index kBlock = 256;
inline constexpr Index kSmallBlock = 64;
// Tokens packed at once by gram_lower_accumulate (bounds its scratch memory).
inline constexpr Index kGramTokens = 1024;

// Whether a step of this many flops (about a millisecond on one core) is worth a
// parallel region: a region costs microseconds on an idle machine, but on a busy one
// its closing barrier can wait a scheduler time slice for the other thread.
[[nodiscard]] inline bool worth_parallel(double flops) { return flops >= 1e8; }
// The same for steps that move this many matrix elements (memory-bound copies).
[[nodiscard]] inline bool worth_parallel_copy(double elements) { return elements >= 4e6; }

// body(i) for i in [0, count): handed out one at a time to the threads when `parallel`
// (items may differ in size; each item's arithmetic is fixed, so the assignment to
// threads does not change results), in order on the calling thread otherwise.
template <class Body>
void for_each_item(Index count, bool parallel, Body&& body) {
#if defined(_OPENMP)
  if (parallel && count >= 2 && omp_get_max_threads() > 1 && !omp_in_parallel()) {
#pragma omp parallel for schedule(dynamic, 1)
    for (Index i = 0; i < count; ++i) body(i);
    return;
  }
#else
  (void)parallel;
#endif
  for (Index i = 0; i < count; ++i) body(i);
}

// The lower-triangle tiles (I >= J) of an m x m matrix cut into kTile tiles.
[[nodiscard]] inline std::vector<std::pair<Index, Index>> lower_tiles(Index m) {
  std::vector<std::pair<Index, Index>> tiles;
  const Index count = (m + kTile - 1) / kTile;
  for (Index I = 0; I < count; ++I)
    for (Index J = 0; J <= I; ++J) tiles.emplace_back(I, J);
  return tiles;
}

// Lower-triangle tiles of C [m x m] -/+= P P^T for P [m x depth] given packed twice:
// as the GEMM A operand (packed_a) and P^T as the B operand (packed_b). Diagonal tiles
// are computed whole, so C's upper triangle next to the diagonal is written too.
// Out = T: C updated in place. Out = double: each kGemmDepth block of the depth is
// summed in T (a fixed-order FMA chain), then added to C in double.
template <class T, class Out>
void lower_tiles_update(const Kernel<T>& kernel, Index m, Index depth, const T* packed_a, const T* packed_b, Out* C,
                        Index ldc, bool subtract, bool parallel) {
  const auto tiles = lower_tiles(m);
  for_each_item(static_cast<Index>(tiles.size()), parallel, [&](Index t) {
    const auto [I, J] = tiles[static_cast<std::size_t>(t)];
    const Index i0 = I * kTile, j0 = J * kTile;
    const Index rows = std::min(kTile, m - i0), cols = std::min(kTile, m - j0);
    const T* a = packed_a + i0 * depth;  // i0 is a multiple of MR: panel i0 / MR
    const T* b = packed_b + j0 * depth;
    if constexpr (std::is_same_v<Out, T>) {
      gemm::multiply_packed(kernel, rows, cols, depth, a, b, C + i0 * ldc + j0, ldc, subtract);
    } else {
      thread_local std::vector<T> partial;
      for (Index p0 = 0; p0 < depth; p0 += gemm::kGemmDepth) {
        const Index d = std::min(gemm::kGemmDepth, depth - p0);
        partial.assign(static_cast<std::size_t>(rows * cols), T(0));
        gemm::multiply_packed(kernel, rows, cols, d, a + p0 * kernel.mr, kernel.mr * depth, b + p0 * kernel.nr,
                              kernel.nr * depth, partial.data(), cols, false);
        for (Index r = 0; r < rows; ++r) {
          Out* out = C + (i0 + r) * ldc + j0;
          const T* in = partial.data() + r * cols;
          for (Index s = 0; s < cols; ++s)
            out[s] = subtract ? out[s] - static_cast<Out>(in[s]) : out[s] + static_cast<Out>(in[s]);
        }
      }
    }
  });
}

// S += X^T X into S's lower triangle (double, row-major n x n with stride lds), for
// X [tokens x n] row-major with stride ldx. Products are summed in T over blocks of
// kGemmDepth tokens, then accumulated in double: for T = float an entry's error is at
// most about kGemmDepth * 2^-24 * sum_t |x_ti x_tj| (the gamma_k bound of a k-term sum).
template <class T>
void gram_lower_accumulate(const T* X, Index tokens, Index n, Index ldx, double* S, Index lds) {
  const Kernel<T> kernel = gemm::active_kernel<T>();
  const Index chunk = std::min(tokens, kGramTokens);
  std::vector<T> packed_a(static_cast<std::size_t>(kernel.packed_a_size(n, chunk)));
  std::vector<T> packed_b(static_cast<std::size_t>(kernel.packed_b_size(chunk, n)));
  const Index mr = kernel.mr, nr = kernel.nr;
  const Index a_panels = (n + mr - 1) / mr, b_panels = (n + nr - 1) / nr;
  const bool parallel = worth_parallel(static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(chunk));
  for (Index t0 = 0; t0 < tokens; t0 += chunk) {
    const Index depth = std::min(chunk, tokens - t0);
    // P = X^T [n x depth]: A panels are column strips of X, B panels too.
    const View<T> P{X + t0 * ldx, 1, ldx};
    for_each_item(a_panels + b_panels, parallel, [&](Index item) {
      if (item < a_panels)
        gemm::pack_a(kernel, std::min(mr, n - item * mr), depth, P.block(item * mr, 0),
                     packed_a.data() + item * mr * depth);
      else {
        const Index jp = item - a_panels;
        gemm::pack_b(kernel, depth, std::min(nr, n - jp * nr), P.transposed().block(0, jp * nr),
                     packed_b.data() + jp * nr * depth);
      }
    });
    lower_tiles_update<T, double>(kernel, n, depth, packed_a.data(), packed_b.data(), S, lds, false, parallel);
  }
}

// Unblocked Cholesky of the lower triangle of A [n x n] in place (A = L L^T), dot
// products in double. False when a pivot is not positive and finite.
template <class T>
[[nodiscard]] bool cholesky_unblocked(T* A, Index n, Index lda) {
  for (Index j = 0; j < n; ++j) {
    const T* row_j = A + j * lda;
    double pivot = static_cast<double>(row_j[j]);
    for (Index p = 0; p < j; ++p) pivot -= static_cast<double>(row_j[p]) * static_cast<double>(row_j[p]);
    if (!(pivot > 0) || !std::isfinite(pivot)) return false;
    const double diagonal = std::sqrt(pivot);
    A[j * lda + j] = static_cast<T>(diagonal);
    for (Index i = j + 1; i < n; ++i) {
      T* row_i = A + i * lda;
      double sum = static_cast<double>(row_i[j]);
      for (Index p = 0; p < j; ++p) sum -= static_cast<double>(row_i[p]) * static_cast<double>(row_j[p]);
      row_i[j] = static_cast<T>(sum / diagonal);
    }
  }
  return true;
}

// Unblocked in-place inverse of the lower-triangular L in A [n x n]; the strict upper
// triangle becomes zero. Row i of M = L^-1 from the rows above it (in double):
//   M_i. = -(sum_{p<i} L_ip M_p.) / L_ii,  M_ii = 1 / L_ii.
template <class T>
void invert_lower_unblocked(T* A, Index n, Index lda) {
  std::vector<double> row(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) {
    T* a_row = A + i * lda;
    std::fill(row.begin(), row.begin() + i, 0.0);
    for (Index p = 0; p < i; ++p) {
      const double l_ip = static_cast<double>(a_row[p]);
      const T* m_row = A + p * lda;  // already inverted, zero past column p
      for (Index j = 0; j <= p; ++j) row[static_cast<std::size_t>(j)] += l_ip * static_cast<double>(m_row[j]);
    }
    const double diagonal = static_cast<double>(a_row[i]);
    for (Index j = 0; j < i; ++j) a_row[j] = static_cast<T>(-row[static_cast<std::size_t>(j)] / diagonal);
    a_row[i] = static_cast<T>(1.0 / diagonal);
    std::fill(a_row + i + 1, a_row + n, T(0));
  }
}

template <class T>
void invert_lower(T* A, Index n, Index lda, Index block = kBlock, bool parallel = true);

// Blocked right-looking Cholesky of the lower triangle of A [n x n] in place (row-major,
// stride lda); the strict upper triangle is scratch. Per block: factor the diagonal
// block (serially, in smaller blocks), L21 = A21 L11^-T (a product with the explicit
// inverse of L11), then A22 -= L21 L21^T on the lower tiles. False when a pivot is not
// positive.
template <class T>
[[nodiscard]] bool cholesky_lower(T* A, Index n, Index lda, Index block = kBlock, bool parallel = true) {
  if (n <= kSmallBlock) return cholesky_unblocked(A, n, lda);
  const Kernel<T> kernel = gemm::active_kernel<T>();
  std::vector<T> inverse, packed_inverse, packed_a, packed_b;
  for (Index k0 = 0; k0 < n; k0 += block) {
    const Index kb = std::min(block, n - k0), k1 = k0 + kb, below = n - k1;
    T* A11 = A + k0 * lda + k0;
    if (!cholesky_lower(A11, kb, lda, kSmallBlock, false)) return false;
    if (below == 0) break;
    inverse.assign(static_cast<std::size_t>(kb * kb), T(0));
    for (Index r = 0; r < kb; ++r) std::copy(A11 + r * lda, A11 + r * lda + r + 1, inverse.data() + r * kb);
    invert_lower(inverse.data(), kb, kb, kSmallBlock, false);
    packed_inverse.resize(static_cast<std::size_t>(kernel.packed_b_size(kb, kb)));
    gemm::pack_b(kernel, kb, kb, View<T>{inverse.data(), 1, kb}, packed_inverse.data());  // (L11^-1)^T
    // L21 = A21 L11^-T by row tiles, each then packed as both operands of the update.
    packed_a.resize(static_cast<std::size_t>(kernel.packed_a_size(below, kb)));
    packed_b.resize(static_cast<std::size_t>(kernel.packed_b_size(kb, below)));
    const bool step_parallel =
        parallel && worth_parallel(static_cast<double>(below) * static_cast<double>(below) * static_cast<double>(kb));
    for_each_item((below + kTile - 1) / kTile, step_parallel, [&](Index t) {
      const Index r0 = t * kTile, rows = std::min(kTile, below - r0);
      T* panel = A + (k1 + r0) * lda + k0;
      thread_local std::vector<T> packed_rows;
      packed_rows.resize(static_cast<std::size_t>(kernel.packed_a_size(rows, kb)));
      gemm::pack_a(kernel, rows, kb, gemm::row_major(panel, lda), packed_rows.data());
      for (Index r = 0; r < rows; ++r) std::fill(panel + r * lda, panel + r * lda + kb, T(0));
      gemm::multiply_packed(kernel, rows, kb, kb, packed_rows.data(), packed_inverse.data(), panel, lda, false);
      gemm::pack_a(kernel, rows, kb, gemm::row_major(panel, lda), packed_a.data() + r0 * kb);
      gemm::pack_b(kernel, kb, rows, gemm::row_major(panel, lda).transposed(), packed_b.data() + r0 * kb);
    });
    lower_tiles_update<T, T>(kernel, below, kb, packed_a.data(), packed_b.data(), A + k1 * lda + k1, lda, true,
                             step_parallel);
  }
  return true;
}

// Blocked in-place inverse of the lower-triangular L in A [n x n] (row-major, stride
// lda); the strict upper triangle of the result is zero. Block row i of M = L^-1:
//   M_ij = -L_ii^-1 sum_{j<=p<i} L_ip M_pj   (j < i),   M_ii = L_ii^-1,
// one parallel step per block row, one item per column block j. Finished rows of M are
// kept packed as GEMM B operands (one strip per column block), and block row i of L is
// packed once before its step, so items read L only from that copy while they write M
// over it.
template <class T>
void invert_lower(T* A, Index n, Index lda, Index block, bool parallel) {
  if (n <= kSmallBlock) {
    invert_lower_unblocked(A, n, lda);
    return;
  }
  const Kernel<T> kernel = gemm::active_kernel<T>();
  const Index mr = kernel.mr, nr = kernel.nr;
  const Index blocks = (n + block - 1) / block;
  const Index strip = (block + nr - 1) / nr * nr;  // padded width of a column block
  std::vector<T> packed_m(static_cast<std::size_t>(blocks * strip * n));
  auto packed_column = [&](Index j) { return packed_m.data() + j * strip * n; };
  std::vector<T> inverse, packed_inverse, packed_rows;
  for (Index i = 0; i < blocks; ++i) {
    const Index r0 = i * block, rb = std::min(block, n - r0);
    T* row_block = A + r0 * lda;
    inverse.assign(static_cast<std::size_t>(rb * rb), T(0));
    for (Index r = 0; r < rb; ++r)
      std::copy(row_block + r * lda + r0, row_block + r * lda + r0 + r + 1, inverse.data() + r * rb);
    invert_lower(inverse.data(), rb, rb, kSmallBlock, false);
    packed_inverse.resize(static_cast<std::size_t>(kernel.packed_a_size(rb, rb)));
    gemm::pack_a(kernel, rb, rb, gemm::row_major(inverse.data(), rb), packed_inverse.data());
    packed_rows.resize(static_cast<std::size_t>(kernel.packed_a_size(rb, r0)));
    gemm::pack_a(kernel, rb, r0, gemm::row_major(row_block, lda), packed_rows.data());
    const double step_flops = 2.0 * static_cast<double>(rb) * static_cast<double>(rb) * static_cast<double>(r0);
    for_each_item(i + 1, parallel && worth_parallel(step_flops), [&](Index j) {
      const Index c0 = j * block, width = std::min(block, n - c0);
      T* out = row_block + c0;
      if (j == i) {  // M_ii, and zeros to its right
        for (Index r = 0; r < rb; ++r) {
          std::copy(inverse.data() + r * rb, inverse.data() + (r + 1) * rb, out + r * lda);
          std::fill(out + r * lda + rb, row_block + r * lda + n, T(0));
        }
      } else {
        thread_local std::vector<T> sums, packed_sums;
        sums.assign(static_cast<std::size_t>(rb * width), T(0));
        gemm::multiply_packed(kernel, rb, width, r0 - c0, packed_rows.data() + c0 * mr, mr * r0,
                              packed_column(j) + c0 * nr, nr * n, sums.data(), width, false);
        packed_sums.resize(static_cast<std::size_t>(kernel.packed_b_size(rb, width)));
        gemm::pack_b(kernel, rb, width, gemm::row_major(sums.data(), width), packed_sums.data());
        for (Index r = 0; r < rb; ++r) std::fill(out + r * lda, out + r * lda + width, T(0));
        gemm::multiply_packed(kernel, rb, width, rb, packed_inverse.data(), packed_sums.data(), out, lda, true);
      }
      // Rows r0.. of column block j, appended to its packed strip (zero-padded columns).
      for (Index q = 0; q * nr < width; ++q) {
        T* panel = packed_column(j) + q * nr * n;
        for (Index p = 0; p < rb; ++p)
          for (Index s = 0; s < nr; ++s) {
            const Index col = q * nr + s;
            panel[(r0 + p) * nr + s] = col < width ? out[p * lda + col] : T(0);
          }
      }
    });
  }
}

// The "reverse" Cholesky factor: V upper triangular with H = V V^T. From the lower
// factor of J H J (J the exchange matrix, (J H J)_ab = H_{n-1-a, n-1-b}): if
// J H J = L L^T then H = (J L J)(J L J)^T and V = J L J. On a contiguous row-major
// matrix J M J reverses the element order. In place of R = J H J [n x n] (lower
// triangle read); false when H is not numerically positive definite.
//
// GPTQ needs U = V^-1, the upper Cholesky factor of H^-1 (U^T U = H^-1), only through
// products that V gives directly (see gptq.hpp), so no inverse is formed.
template <class T>
[[nodiscard]] bool reverse_cholesky_from_reversed(T* R, Index n) {
  const bool parallel = worth_parallel(static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n) / 3);
  if (!cholesky_lower(R, n, n, kBlock, parallel)) return false;
  // J L J: row a becomes row n-1-a reversed, in row pairs; the strict lower triangle of
  // V (upper of L) is zeroed, and V must be finite.
  const Index pairs = (n + 1) / 2, rows_per_item = 64;
  std::vector<char> finite(static_cast<std::size_t>((pairs + rows_per_item - 1) / rows_per_item), 1);
  for_each_item(static_cast<Index>(finite.size()), worth_parallel_copy(static_cast<double>(n) * static_cast<double>(n)),
                [&](Index item) {
                  for (Index a = item * rows_per_item; a < std::min(pairs, (item + 1) * rows_per_item); ++a) {
                    const Index b = n - 1 - a;
                    T* top = R + a * n;
                    T* bottom = R + b * n;
                    std::fill(top + a + 1, top + n, T(0));  // upper of L's rows a and b
                    std::fill(bottom + b + 1, bottom + n, T(0));
                    std::reverse(top, top + n);
                    if (top != bottom) {
                      std::reverse(bottom, bottom + n);
                      std::swap_ranges(top, top + n, bottom);
                    }
                    T sum = 0;  // x * 0 is 0 for finite x, NaN otherwise
                    for (Index j = 0; j < n; ++j) sum += top[j] * T(0) + bottom[j] * T(0);
                    if (sum != T(0)) finite[static_cast<std::size_t>(item)] = 0;
                  }
                });
  return std::all_of(finite.begin(), finite.end(), [](char f) { return f != 0; });
}

// The same from H itself (symmetric, both triangles set), in place.
template <class T>
[[nodiscard]] bool reverse_cholesky(T* H, Index n) {
  std::reverse(H, H + n * n);
  return reverse_cholesky_from_reversed(H, n);
}

}  // namespace lowbit::detail::linalg

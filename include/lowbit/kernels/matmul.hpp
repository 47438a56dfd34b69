// Y = X W^T straight from the packed weights: lowbit::matmul (prefill, many tokens).
//
// The packed matrix is cut into tiles of a few output rows by a chunk of the input
// dimension. Each tile is dequantized once, with the same decode as dequantize()
// (w_hat = (q - zero) * scale, bit for bit), into a small buffer that stays in L1/L2,
// and then serves every token through a register-blocked microkernel:
//   partial[t][r][lane] += sum_k X[t][k] * w_hat[r][k]  over k = lane (mod lanes),
// reduced to Y[t][r] after the last chunk. Tiles of rows are split among threads, and
// each Y entry's summation order is fixed by the tiling alone, so results are
// bit-identical for any thread count. One token routes to gemv.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "lowbit/core/error.hpp"
#include "lowbit/core/isa.hpp"
#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/core/types.hpp"
#include "lowbit/kernels/gemv.hpp"
#include "lowbit/pack/pack.hpp"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 AVX-512 headers, see pack/avx512.hpp
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace lowbit::detail {

// Register block of a microkernel: Tokens x Rows accumulators of Lanes floats.
struct MicroShape {
  int tokens, rows, lanes;
};

inline constexpr MicroShape kScalarMicro{1, 1, 1};
#if defined(LOWBIT_HAVE_AVX512)
inline constexpr MicroShape kAvx512Micro{4, 6, 16};  // 24 accumulators + 4 x + 1 w of 32 registers
#endif
#if defined(LOWBIT_HAVE_AVX2)
inline constexpr MicroShape kAvx2Micro{3, 4, 8};  // 12 accumulators + 3 x + 1 w of 16 registers
#endif

// Input-dimension chunk: about this many weights per tile row, so that a tile and the
// tokens' chunk of X stay in L2.
inline constexpr Index kTargetChunk = 1024;

#if defined(LOWBIT_HAVE_AVX512)
namespace avx512 {

// partial[t][r][:] (+)= X[t][k..] . W[r][k..] lane-wise over k_len (a multiple of 16).
template <int Tokens, int Rows>
LOWBIT_TARGET_AVX512 void matmul_micro(const float* x, Index x_stride, const float* w, Index w_stride, Index k_len,
                                       float* partial, bool first) {
  __m512 acc[Tokens][Rows];
  for (int t = 0; t < Tokens; ++t)
    for (int r = 0; r < Rows; ++r)
      acc[t][r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(partial + (t * Rows + r) * 16);
  for (Index k = 0; k < k_len; k += 16) {
    __m512 xv[Tokens];
    for (int t = 0; t < Tokens; ++t) xv[t] = in_register(_mm512_loadu_ps(x + t * x_stride + k));
    for (int r = 0; r < Rows; ++r) {
      const __m512 wv = in_register(_mm512_loadu_ps(w + r * w_stride + k));
      for (int t = 0; t < Tokens; ++t) acc[t][r] = _mm512_fmadd_ps(xv[t], wv, acc[t][r]);
    }
  }
  for (int t = 0; t < Tokens; ++t)
    for (int r = 0; r < Rows; ++r) _mm512_storeu_ps(partial + (t * Rows + r) * 16, acc[t][r]);
}

LOWBIT_TARGET_AVX512 inline float lane_sum(const float* lanes) { return _mm512_reduce_add_ps(_mm512_loadu_ps(lanes)); }

}  // namespace avx512
#endif

#if defined(LOWBIT_HAVE_AVX2)
namespace avx2 {

template <int Tokens, int Rows>
LOWBIT_TARGET_AVX2 void matmul_micro(const float* x, Index x_stride, const float* w, Index w_stride, Index k_len,
                                     float* partial, bool first) {
  __m256 acc[Tokens][Rows];
  for (int t = 0; t < Tokens; ++t)
    for (int r = 0; r < Rows; ++r)
      acc[t][r] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(partial + (t * Rows + r) * 8);
  for (Index k = 0; k < k_len; k += 8) {
    __m256 xv[Tokens];
    for (int t = 0; t < Tokens; ++t) xv[t] = in_register(_mm256_loadu_ps(x + t * x_stride + k));
    for (int r = 0; r < Rows; ++r) {
      const __m256 wv = in_register(_mm256_loadu_ps(w + r * w_stride + k));
      for (int t = 0; t < Tokens; ++t) acc[t][r] = _mm256_fmadd_ps(xv[t], wv, acc[t][r]);
    }
  }
  for (int t = 0; t < Tokens; ++t)
    for (int r = 0; r < Rows; ++r) _mm256_storeu_ps(partial + (t * Rows + r) * 8, acc[t][r]);
}

LOWBIT_TARGET_AVX2 inline float lane_sum(const float* lanes) { return reduce_add(_mm256_loadu_ps(lanes)); }

}  // namespace avx2
#endif

namespace scalar {

// The scalar microkernel: one token, one row, sequential sum.
template <class T>
void matmul_micro(const T* x, const T* w, Index k_len, T* partial, bool first) {
  T sum = first ? T(0) : *partial;
  for (Index k = 0; k < k_len; ++k) sum += x[k] * w[k];
  *partial = sum;
}

}  // namespace scalar

// The microkernel and lane reduction of one ISA, for T.
template <class T>
struct MicroKernel {
  MicroShape shape = kScalarMicro;
  Isa isa = Isa::Scalar;

  static MicroKernel select(Isa isa) {
    if constexpr (std::is_same_v<T, float>) {
#if defined(LOWBIT_HAVE_AVX512)
      if (isa == Isa::Avx512) return {kAvx512Micro, isa};
#endif
#if defined(LOWBIT_HAVE_AVX2)
      if (isa == Isa::Avx2) return {kAvx2Micro, isa};
#endif
    }
    (void)isa;
    return {};
  }

  // One register block: shape.tokens tokens x shape.rows rows.
  void run(const T* x, Index x_stride, const T* w, Index w_stride, Index k_len, T* partial, bool first) const {
    if constexpr (std::is_same_v<T, float>) {
#if defined(LOWBIT_HAVE_AVX512)
      if (isa == Isa::Avx512)
        return avx512::matmul_micro<kAvx512Micro.tokens, kAvx512Micro.rows>(x, x_stride, w, w_stride, k_len, partial, first);
#endif
#if defined(LOWBIT_HAVE_AVX2)
      if (isa == Isa::Avx2)
        return avx2::matmul_micro<kAvx2Micro.tokens, kAvx2Micro.rows>(x, x_stride, w, w_stride, k_len, partial, first);
#endif
    }
    (void)x_stride;
    (void)w_stride;
    scalar::matmul_micro(x, w, k_len, partial, first);
  }

  [[nodiscard]] T lane_sum(const T* lanes) const {
    if constexpr (std::is_same_v<T, float>) {
#if defined(LOWBIT_HAVE_AVX512)
      if (isa == Isa::Avx512) return avx512::lane_sum(lanes);
#endif
#if defined(LOWBIT_HAVE_AVX2)
      if (isa == Isa::Avx2) return avx2::lane_sum(lanes);
#endif
    }
    return lanes[0];
  }
};

[[nodiscard]] constexpr Index round_up(Index value, Index multiple) { return (value + multiple - 1) / multiple * multiple; }

// Input-dimension chunks of a matrix: boundaries at whole blocks and whole groups
// (dequantize_row starts at a block and a group), about kTargetChunk long.
[[nodiscard]] inline Index matmul_chunk(Index n, Index group_length) {
  if (group_length >= n) return n;
  const Index align = std::lcm(kBlockCodes, group_length);
  if (align >= n) return n;
  return std::max<Index>(1, kTargetChunk / align) * align;
}

// X (logical column order) -> [tokens_pad, k_pad] in stored order, zero padded.
template <class T>
std::vector<T> pack_tokens(const QuantizedMatrix<T>& W, const Eigen::Ref<const Matrix<T>>& X, Index tokens_pad,
                           Index k_pad) {
  std::vector<T> packed(static_cast<std::size_t>(tokens_pad * k_pad), T(0));
  const auto& permutation = W.permutation();
  for (Index t = 0; t < X.rows(); ++t) {
    T* out = packed.data() + t * k_pad;
    if (permutation.empty()) {
      for (Index j = 0; j < X.cols(); ++j) out[j] = X(t, j);
    } else {
      for (Index j = 0; j < X.cols(); ++j) out[j] = X(t, permutation[static_cast<std::size_t>(j)]);
    }
  }
  return packed;
}

// Tile rows = output rows (input-axis groups): rows [first, first + count) of the
// chunk [k0, k0 + length) into tile rows of stride `stride` (zero padded).
template <class T>
void dequantize_row_tile(const QuantizedMatrix<T>& W, Index first, Index count, Index rows_pad, Index k0,
                         Index length, Index stride, T* tile, Isa isa) {
  const int bits = W.spec().bits;
  const Index groups = W.groups_per_row(), group = W.group_length();
  std::fill(tile, tile + rows_pad * stride, T(0));
  for (Index r = 0; r < count; ++r) {
    const Index row = first + r;
    dequantize_row<T>(W.packed_row(row) + k0 * bits / 8, length, bits, W.scales().data() + row * groups + k0 / group,
                      W.zeros().data() + row * groups + k0 / group, group, tile + r * stride, isa);
  }
}

// Tile rows = outputs of one block column (output-axis groups): outputs
// [256 blk, 256 blk + 256) x stored rows (inputs) [k0, k0 + length), transposed into
// rows of stride `stride`.
template <class T>
void dequantize_column_tile(const QuantizedMatrix<T>& W, Index blk, Index rows_pad, Index k0, Index length,
                            Index stride, T* tile, Isa isa) {
  const int bits = W.spec().bits;
  const Index n = W.stored_cols(), groups = W.groups_per_row(), group = W.group_length();
  const Index begin = blk * kBlockCodes, outputs = std::min(kBlockCodes, n - begin);
  std::fill(tile, tile + rows_pad * stride, T(0));
  std::uint8_t codes[kBlockCodes];
  for (Index k = 0; k < length; ++k) {
    const Index i = k0 + k;
    unpack_row(W.packed_row(i) + begin * bits / 8, outputs, bits, codes, isa);
    const float* scales = W.scales().data() + i * groups;
    const float* zeros = W.zeros().data() + i * groups;
    for (Index o = 0; o < outputs; ++o) {
      const Index g = (begin + o) / group;
      tile[o * stride + k] = (static_cast<T>(codes[o]) - static_cast<T>(zeros[g])) * static_cast<T>(scales[g]);
    }
  }
}

template <class T>
void matmul_tiles(const QuantizedMatrix<T>& W, const Eigen::Ref<const Matrix<T>>& X, Eigen::Ref<Matrix<T>> Y,
                  Isa isa) {
  const MicroKernel<T> micro = MicroKernel<T>::select(isa);
  const MicroShape shape = micro.shape;
  const Index tokens = X.rows(), K = W.cols(), outputs = W.rows();
  const Index tokens_pad = round_up(tokens, shape.tokens), k_pad = round_up(K, shape.lanes);
  const std::vector<T> Xp = pack_tokens(W, X, tokens_pad, k_pad);
  const Index token_blocks = tokens_pad / shape.tokens;
  const Index block_lanes = Index{shape.tokens} * shape.rows * shape.lanes;  // partial sums of one register block
  const Index work = tokens * K * outputs;

  if (!W.transposed()) {
    // Tasks: shape.rows output rows each, all chunks, all tokens; partial sums stay
    // lane-wise until the last chunk.
    const Index chunk = matmul_chunk(K, W.group_length());
    const Index stride = round_up(std::min(chunk, K), shape.lanes);
    const Index tasks = (outputs + shape.rows - 1) / shape.rows;
    parallel_for(tasks, [&](Index task) {
      thread_local std::vector<T> tile, partial;
      tile.resize(static_cast<std::size_t>(shape.rows * stride));
      partial.resize(static_cast<std::size_t>(token_blocks * block_lanes));
      const Index first = task * shape.rows, count = std::min<Index>(shape.rows, outputs - first);
      for (Index k0 = 0; k0 < K; k0 += chunk) {
        const Index length = std::min(chunk, K - k0);
        dequantize_row_tile(W, first, count, shape.rows, k0, length, stride, tile.data(), isa);
        for (Index tb = 0; tb < token_blocks; ++tb)
          micro.run(Xp.data() + tb * shape.tokens * k_pad + k0, k_pad, tile.data(), stride,
                    round_up(length, shape.lanes), partial.data() + tb * block_lanes, k0 == 0);
      }
      for (Index t = 0; t < tokens; ++t)
        for (Index r = 0; r < count; ++r) {
          const Index tb = t / shape.tokens, lane_block = (t % shape.tokens) * shape.rows + r;
          Y(t, first + r) = micro.lane_sum(partial.data() + tb * block_lanes + lane_block * shape.lanes);
        }
    }, min_parallel_tasks(tasks, work));
    return;
  }

  // Output-axis groups: tasks are block columns of 256 outputs, tiles [256 x chunk],
  // reduced into Y after every chunk (each output's sum order is still fixed).
  const Index chunk = std::min<Index>(K, 256);
  const Index stride = round_up(chunk, shape.lanes), rows_pad = round_up(kBlockCodes, shape.rows);
  const Index tasks = (outputs + kBlockCodes - 1) / kBlockCodes;
  parallel_for(tasks, [&](Index blk) {
    thread_local std::vector<T> tile, partial;
    tile.resize(static_cast<std::size_t>(rows_pad * stride));
    partial.resize(static_cast<std::size_t>(block_lanes));
    const Index begin = blk * kBlockCodes, count = std::min(kBlockCodes, outputs - begin);
    for (Index k0 = 0; k0 < K; k0 += chunk) {
      const Index length = std::min(chunk, K - k0);
      dequantize_column_tile(W, blk, rows_pad, k0, length, stride, tile.data(), isa);
      for (Index r0 = 0; r0 < count; r0 += shape.rows)
        for (Index tb = 0; tb < token_blocks; ++tb) {
          micro.run(Xp.data() + tb * shape.tokens * k_pad + k0, k_pad, tile.data() + r0 * stride, stride,
                    round_up(length, shape.lanes), partial.data(), true);
          for (Index t = tb * shape.tokens; t < std::min(tokens, (tb + 1) * shape.tokens); ++t)
            for (Index r = r0; r < std::min(count, r0 + shape.rows); ++r) {
              const Index lane_block = (t % shape.tokens) * shape.rows + (r - r0);
              const T sum = micro.lane_sum(partial.data() + lane_block * shape.lanes);
              Y(t, begin + r) = k0 == 0 ? sum : Y(t, begin + r) + sum;
            }
        }
    }
  }, min_parallel_tasks(tasks, work));
}

}  // namespace lowbit::detail

namespace lowbit {

// Y = X W^T: X [tokens, cols] (input activations, one token per row), W [rows, cols]
// quantized, Y [tokens, rows]. Y must not overlap W's storage. Throws lowbit::Error on
// a shape mismatch or a non-finite X.
template <class T>
void matmul(const QuantizedMatrix<T>& W, const Eigen::Ref<const Matrix<std::type_identity_t<T>>>& X,
            Eigen::Ref<Matrix<std::type_identity_t<T>>> Y) {
  detail::require(X.cols() == W.cols(), "matmul: X has ", X.cols(), " columns, W has ", W.cols());
  detail::require(Y.rows() == X.rows() && Y.cols() == W.rows(), "matmul: Y shape ", Y.rows(), "x", Y.cols(),
                  " != ", X.rows(), "x", W.rows(), " (tokens x rows of W)");
  detail::require_finite(X, "X");
  if (X.rows() == 0 || W.rows() == 0) return;
  if (W.cols() == 0) {
    Y.setZero();
    return;
  }
  if (X.rows() == 1) {  // rows are contiguous (inner stride 1), and gemv reads x before writing y
    detail::gemv(W, X.data(), Y.data(), active_isa());
    return;
  }
  detail::matmul_tiles<T>(W, X, Y, active_isa());
}

}  // namespace lowbit

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// ChannelMap<T>: a sparse linear re-wiring of a layer's input channels, the form QLLM's
// channel reassembly takes (and any split, merge or permutation of channels).
//
// New channel k of channels() is a weighted sum of original channels:
//   x'_k = sum_{(s, f) in entries(k)} f * x_s          X' = X M,  M(s, k) = f   [C, C']
// The layer that reads X' uses W' whose column k is the sum of its sources' columns:
//   W'[:, k] = sum_{(s, f) in entries(k)} W[:, s]       W' = W N,  N(s, k) = 1   [out, C']
// so X' W'^T = X (M N^T) W^T, the float output unchanged whenever M N^T = I: every new
// channel has one source and each source's factors sum to 1. QLLM's disassembly is such
// a map (channel s split into T channels carrying x_s / T, its weight column repeated).
// Its assembly is not: a merged channel (x_i + x_j) / 2 with column w_i + w_j changes
// the output by (x_i - x_j)(w_i - w_j)^T / 2 per token.
//
// The previous layer X = X_prev W_prev^T + b_prev yields X' directly once folded:
//   W_prev' = M^T W_prev  [C', in_prev],   b_prev' = M^T b_prev  [C'].
// A default-constructed (empty) map is the identity on any number of channels.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <vector>

#include "lowbit/core/error.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/core/types.hpp"

namespace lowbit {

template <class T = float>
class ChannelMap {
 public:
  struct Entry {
    std::int32_t source = 0;  // original channel
    T factor = T(1);          // its weight in the new channel's activation
    friend bool operator==(const Entry&, const Entry&) = default;
  };

  // The identity on any width (empty()).
  ChannelMap() = default;

  // A map reading `source_channels` channels and producing none yet: append() adds them.
  explicit ChannelMap(Index source_channels) : source_channels_(source_channels), offsets_{0} {
    detail::require(source_channels >= 0 && source_channels <= kMaxChannels, "ChannelMap source_channels = ",
                    source_channels, " is outside [0, ", kMaxChannels, "]");
  }

  // Channel k = original channel k for k < channels: the identity written out.
  [[nodiscard]] static ChannelMap identity(Index channels) {
    ChannelMap map(channels);
    for (Index s = 0; s < channels; ++s) map.append_copy(s);
    return map;
  }

  // Appends the new channel sum_e factor_e * x_{source_e}; returns its index.
  Index append(std::span<const Entry> entries) {
    detail::require(!empty(), "ChannelMap.append on an empty (identity) map: construct it with source_channels");
    detail::require(!entries.empty(), "ChannelMap.append: new channel ", channels(), " has no entries");
    for (const Entry& e : entries) {
      detail::require(e.source >= 0 && e.source < source_channels_, "ChannelMap.append: source ", e.source,
                      " is outside [0, ", source_channels_, ")");
      detail::require(std::isfinite(static_cast<double>(e.factor)), "ChannelMap.append: factor of source ",
                      e.source, " = ", static_cast<double>(e.factor), " is not finite");
    }
    detail::require(entries_.size() + entries.size() <= static_cast<std::size_t>(kMaxChannels),
                    "ChannelMap.append: more than ", kMaxChannels, " entries");
    entries_.insert(entries_.end(), entries.begin(), entries.end());
    offsets_.push_back(static_cast<std::int32_t>(entries_.size()));
    return channels() - 1;
  }
  Index append(std::initializer_list<Entry> entries) { return append(std::span<const Entry>(entries.begin(), entries.size())); }

  // x'_k = x_source.
  Index append_copy(Index source) { return append({Entry{checked(source), T(1)}}); }

  // `parts` channels, each x_source / parts (QLLM's disassembly); returns the first.
  Index append_split(Index source, Index parts) {
    detail::require(parts >= 1, "ChannelMap.append_split: parts = ", parts, " must be >= 1");
    const Index first = channels();
    const T factor = T(1) / static_cast<T>(parts);
    for (Index p = 0; p < parts; ++p) append({Entry{checked(source), factor}});
    return first;
  }

  // x'_k = (x_a + x_b) / 2 (QLLM's assembly).
  Index append_merge(Index a, Index b) { return append({Entry{checked(a), T(0.5)}, Entry{checked(b), T(0.5)}}); }

  [[nodiscard]] bool empty() const { return offsets_.empty(); }
  // C and C' (both 0 for the empty map, which takes any width).
  [[nodiscard]] Index source_channels() const { return source_channels_; }
  [[nodiscard]] Index channels() const { return empty() ? 0 : static_cast<Index>(offsets_.size()) - 1; }

  [[nodiscard]] std::span<const Entry> entries(Index k) const {
    detail::require(k >= 0 && k < channels(), "ChannelMap.entries: channel ", k, " is outside [0, ", channels(), ")");
    return entries_of(k);
  }
  [[nodiscard]] Index entry_count() const { return static_cast<Index>(entries_.size()); }

  // Stored size: per new channel a 4-byte offset, per entry a 4-byte source and a factor.
  [[nodiscard]] std::size_t bytes() const {
    if (empty()) return 0;
    return offsets_.size() * sizeof(std::int32_t) + entries_.size() * (sizeof(std::int32_t) + sizeof(T));
  }

  // Throws unless X (or W) with `columns` columns can go through this map.
  void require_source_width(Index columns, const char* what) const {
    detail::require(empty() || columns == source_channels_, "ChannelMap: ", what, " has ", columns,
                    " channels, the map reads ", source_channels_);
  }

  // X' = X M: [tokens, C] -> [tokens, C']. Each entry is summed in order, so the result
  // is the same for any thread count.
  [[nodiscard]] Matrix<T> apply(const Eigen::Ref<const Matrix<T>>& X) const {
    require_source_width(X.cols(), "X");
    if (empty()) return X;
    Matrix<T> out(X.rows(), channels());
    detail::parallel_for(X.rows(), [&](Index t) {
      const T* x = X.data() + t * X.outerStride();
      T* y = out.data() + t * out.outerStride();
      gather_row(x, y);
    }, min_parallel(X.rows()));
    return out;
  }

  // x' = x M for one token: x [C] -> out [C'] (out may not alias x); the same sums, in
  // the same order, as apply() gives that token. The identity (empty()) has no width:
  // callers copy x themselves.
  void apply(const T* x, T* out) const {
    detail::require(!empty(), "ChannelMap.apply(x, out) on an empty (identity) map: x is already the output");
    gather_row(x, out);
  }

  // This layer's W' = W N: [out, C] -> [out, C'], column k = sum of its sources' columns.
  [[nodiscard]] Matrix<T> fold_weight(const Eigen::Ref<const Matrix<T>>& W) const {
    require_source_width(W.cols(), "W");
    if (empty()) return W;
    Matrix<T> out(W.rows(), channels());
    detail::parallel_for(W.rows(), [&](Index o) {
      const T* w = W.data() + o * W.outerStride();
      T* y = out.data() + o * out.outerStride();
      for (Index k = 0; k < channels(); ++k) {
        T sum = 0;
        for (const Entry& e : entries_of(k)) sum += w[e.source];
        y[k] = sum;
      }
    }, min_parallel(W.rows()));
    return out;
  }

  // The previous layer's W_prev' = M^T W_prev: [C, in_prev] -> [C', in_prev].
  [[nodiscard]] Matrix<T> fold_into_previous_weight(const Eigen::Ref<const Matrix<T>>& W_prev) const {
    detail::require(empty() || W_prev.rows() == source_channels_, "ChannelMap: previous layer's W has ",
                    W_prev.rows(), " output channels, the map reads ", source_channels_);
    if (empty()) return W_prev;
    Matrix<T> out(channels(), W_prev.cols());
    detail::parallel_for(channels(), [&](Index k) {
      out.row(k).setZero();
      for (const Entry& e : entries_of(k)) out.row(k) += e.factor * W_prev.row(e.source);
    }, min_parallel(channels()));
    return out;
  }

  // The previous layer's b_prev' = M^T b_prev: [C] -> [C'].
  [[nodiscard]] Vector<T> fold_into_previous_bias(const Eigen::Ref<const Vector<T>>& b_prev) const {
    detail::require(empty() || b_prev.size() == source_channels_, "ChannelMap: previous layer's bias has ",
                    b_prev.size(), " entries, the map reads ", source_channels_);
    if (empty()) return b_prev;
    Vector<T> out(channels());
    gather_row(b_prev.data(), out.data());
    return out;
  }

  friend bool operator==(const ChannelMap& a, const ChannelMap& b) {
    return a.source_channels_ == b.source_channels_ && a.offsets_ == b.offsets_ && a.entries_ == b.entries_;
  }

 private:
  static constexpr Index kMaxChannels = INT32_MAX;

  [[nodiscard]] std::int32_t checked(Index source) const {
    detail::require(source >= 0 && source < source_channels_, "ChannelMap: source ", source, " is outside [0, ",
                    source_channels_, ")");
    return static_cast<std::int32_t>(source);
  }

  [[nodiscard]] std::span<const Entry> entries_of(Index k) const {
    const auto begin = static_cast<std::size_t>(offsets_[static_cast<std::size_t>(k)]);
    const auto end = static_cast<std::size_t>(offsets_[static_cast<std::size_t>(k) + 1]);
    return std::span<const Entry>(entries_.data() + begin, end - begin);
  }

  // y[k] = sum_e factor_e * x[source_e], entries in order.
  void gather_row(const T* x, T* y) const {
    for (Index k = 0; k < channels(); ++k) {
      T sum = 0;
      for (const Entry& e : entries_of(k)) sum += e.factor * x[e.source];
      y[k] = sum;
    }
  }

  // Small inputs stay on the calling thread: a parallel region costs more than they do.
  [[nodiscard]] Index min_parallel(Index rows) const {
    return rows * static_cast<Index>(entries_.size()) >= (Index(1) << 15) ? 2 : rows + 1;
  }

  Index source_channels_ = 0;
  std::vector<std::int32_t> offsets_;  // channels() + 1 of them once constructed with a width
  std::vector<Entry> entries_;
};

}  // namespace lowbit

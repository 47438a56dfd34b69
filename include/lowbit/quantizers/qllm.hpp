// QLLM (Liu et al., "QLLM: Accurate and Efficient Low-Bitwidth Quantization for Large
// Language Models", ICLR 2024): weight-and-activation quantization (W4A4, W4A8) made
// accurate by reshaping the input channels that hold activation outliers, then by a
// learned low-rank correction on top of the frozen quantized weights.
//
// Channel disassembly: channel j with a_j = max_t |x_tj| > theta becomes
//   T_j = ceil(a_j / theta) channels carrying x_j / T_j, its weight column repeated,
// which leaves the float output unchanged and caps every channel's range at theta.
// Channel assembly keeps the channel count: as many pairs (i, j) as disassembly added are
// merged into one channel (x_i + x_j) / 2 with weight column w_i + w_j. Per token that
// changes the output by (x_i - x_j)(w_i - w_j)^T / 2, so over the calibration tokens the
// merge costs exactly
//   e(i, j) = 1/4 ||x_i - x_j||^2 ||w_i - w_j||^2,
// the score of the bipartite matching between the even and the odd channels (greedy,
// lowest score first, one partner per channel); disassembled channels are never merged.
// The whole reassembly is a ChannelMap (core/channel_map.hpp) the layer applies to X.
//
// Adaptive theta: a budget of extra channels, ratio * C, gives the smallest theta whose
// disassembly adds at most that many; each ratio of the grid and "no reassembly" is
// scored by the quantized output error on the calibration tokens, the best one wins.
//
// Low-rank error correction: with X_q = Q_a(X') and W_hat = Q_w(W') frozen, A [out, r]
// and B [r, C'] minimize
//   L(A, B) = ||X_q (W_hat + A B)^T - X W^T||^2 = ||X_q B^T A^T - R||^2,  R = X W^T - X_q W_hat^T
// by AdamW on mini-batches of tokens with a linearly decaying learning rate, from the
// closed-form reduced-rank solution (reduced_rank_fit, the optimum on the calibration
// tokens) or, as published, from B = 0. A B is kept as a side term of the layer, or merged
// and quantized again with fresh ranges: W_hat + A B, or W' + A B as the reference merges.
// A B is mostly below one quantization step and also corrects W' - W_hat, so both merges
// lose the gain (fixture W4A4 held-out: side term 0.244, W_hat + A B 0.360, W' + A B 0.495,
// no correction 0.361).
#pragma once

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <queue>
#include <random>
#include <utility>
#include <vector>

#include "lowbit/core/channel_map.hpp"
#include "lowbit/core/dense_product.hpp"
#include "lowbit/core/error.hpp"
#include "lowbit/core/fake_quant.hpp"
#include "lowbit/core/optim.hpp"
#include "lowbit/core/quantized_layer.hpp"
#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/core/spec.hpp"
#include "lowbit/core/tensor.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/core/types.hpp"
#include "lowbit/quantizers/omniquant.hpp"
#include "lowbit/quantizers/rtn.hpp"

namespace lowbit {

// Where the learned low-rank correction A B goes.
enum class LowRankMode {
  SideTerm,         // kept beside the packed weights: Y = X_q W_hat^T + (X_q B^T) A^T
  Requantize,       // W_hat + A B (the trained weight) quantized again with fresh ranges
  RequantizeFloat,  // W' + A B quantized with fresh ranges: the reference's merge into the float weight
};

// Where AdamW starts.
enum class LowRankInit {
  ClosedForm,  // the reduced-rank ridge solution, optimal on the calibration tokens
  Zero,        // B = 0, A seeded uniform in [-1/sqrt(r), 1/sqrt(r)]: the method as published,
               // which needs about 1000 steps to get there (e.g. batch_tokens 16, lr 2e-3)
};

template <class T = float>
struct QLLMOptions {
  QuantSpec weight{.bits = 4, .group_size = 0};                        // per-channel by default
  std::optional<QuantSpec> activation = QuantSpec{.bits = 4, .group_size = 0};  // per-token, asymmetric
  // Theta search grid: budgets of extra channels as fractions of C, each in (0, 0.25];
  // "no reassembly" is always a candidate too. Empty: no reassembly.
  std::vector<double> extra_channel_ratios{0.01, 0.02, 0.05, 0.1, 0.2};
  std::optional<T> theta{};  // a fixed threshold instead of the search; +infinity: no reassembly
  Index rank = 4;            // 0: no low-rank correction
  int epochs = 10;           // AdamW epochs over the calibration tokens, lr decayed linearly to 0
  T lr = T(5e-4);
  Index batch_tokens = 256;  // tokens per AdamW step; an epoch is ceil(tokens / batch_tokens) steps
  LowRankInit init = LowRankInit::ClosedForm;
  LowRankMode lowrank = LowRankMode::SideTerm;
  // Ridge of the closed form, as a fraction of mean(diag(X_q^T X_q)).
  double ridge = 1e-2;
  std::uint64_t seed = 0;  // A's start and the token order of each epoch
  std::function<void(int epoch, double loss)> progress{};  // after each epoch (1-based); silent if empty

  void validate() const {
    weight.validate();
    if (activation) {
      activation->validate();
      detail::require(!activation->symmetric, "QLLM.activation.symmetric = true: activation quantization is "
                                              "per-token asymmetric");
    }
    for (std::size_t i = 0; i < extra_channel_ratios.size(); ++i)
      detail::require(extra_channel_ratios[i] > 0 && extra_channel_ratios[i] <= 0.25, "QLLM.extra_channel_ratios[",
                      i, "] = ", extra_channel_ratios[i], " is outside (0, 0.25]");
    if (theta)
      detail::require(*theta > 0, "QLLM.theta = ", static_cast<double>(*theta), " must be > 0 (+infinity: none)");
    detail::require(rank >= 0, "QLLM.rank = ", rank, " is negative");
    detail::require(epochs >= 0, "QLLM.epochs = ", epochs, " is negative");
    detail::require(std::isfinite(static_cast<double>(lr)) && lr >= 0, "QLLM.lr = ", static_cast<double>(lr),
                    " must be >= 0");
    detail::require(batch_tokens >= 1, "QLLM.batch_tokens = ", batch_tokens, " must be >= 1");
    detail::require(std::isfinite(ridge) && ridge >= 0, "QLLM.ridge = ", ridge, " must be >= 0");
  }
};

// One theta candidate of the search.
struct QLLMCandidate {
  double ratio = 0;          // budget of extra channels / C (0: "no reassembly" or a fixed theta)
  double theta = std::numeric_limits<double>::infinity();
  Index extra_channels = 0;  // added by disassembly = pairs merged by assembly
  double error = 0;          // relative quantized output error on the calibration tokens
};

// What quantize() found; every error is ||Y_hat - Y||_F / ||Y||_F on the calibration
// tokens, Y = X W^T + b the float layer.
struct QLLMReport {
  std::vector<QLLMCandidate> candidates;  // the search; [0] is "no reassembly" unless theta was fixed
  std::size_t chosen = 0;
  double assembly_error = 0;    // float output error the merges introduce (disassembly adds none)
  double reassembly_error = 0;  // quantized, before the low-rank step (candidates[chosen].error)
  double side_term_error = 0;          // with A B beside W_hat (LowRankMode::SideTerm)
  double requantized_error = 0;        // with Q_w(W_hat + A B) (LowRankMode::Requantize)
  double requantized_float_error = 0;  // with Q_w(W' + A B) (LowRankMode::RequantizeFloat)
};

namespace detail {

// T = ceil(a / theta) for a > theta, else 1, as the least t >= 1 with a / t <= theta in
// double arithmetic (the very comparison theta_for_budget's candidates are made of).
[[nodiscard]] inline Index split_parts(double absmax, double theta) {
  if (!(absmax > theta)) return 1;
  const double estimate = std::ceil(absmax / theta);
  require(estimate < 1e12, "QLLM: theta = ", theta, " splits a channel of max |x| = ", absmax, " into ", estimate,
          " parts");
  auto parts = static_cast<Index>(estimate);
  while (parts > 1 && absmax / static_cast<double>(parts - 1) <= theta) --parts;
  while (absmax / static_cast<double>(parts) > theta) ++parts;
  return parts;
}

// Extra channels disassembly at theta adds: sum_j (T_j - 1).
template <class T>
[[nodiscard]] Index extra_channels(const Vector<T>& absmax, double theta) {
  Index extra = 0;
  for (Index j = 0; j < absmax.size(); ++j) extra += split_parts(static_cast<double>(absmax(j)), theta) - 1;
  return extra;
}

// The smallest theta whose disassembly adds at most `budget` channels. Channel j gains its
// m-th extra channel when theta drops below a_j / m, so extra(theta) = #{(j, m) : a_j / m > theta}
// and the answer is the (budget + 1)-th largest of all a_j / m (a heap walk, O(budget log C)).
// +infinity when no channel is non-zero.
template <class T>
[[nodiscard]] double theta_for_budget(const Vector<T>& absmax, Index budget) {
  require(budget >= 0, "QLLM: extra channel budget ", budget, " is negative");
  struct Event {
    double value;
    Index channel, divisor;
    bool operator<(const Event& other) const {
      return value < other.value || (value == other.value && channel > other.channel);
    }
  };
  std::priority_queue<Event> heap;
  for (Index j = 0; j < absmax.size(); ++j)
    if (absmax(j) > T(0)) heap.push({static_cast<double>(absmax(j)), j, 1});
  if (heap.empty()) return std::numeric_limits<double>::infinity();
  for (Index k = 0; k < budget; ++k) {
    const Event e = heap.top();
    heap.pop();
    heap.push({static_cast<double>(absmax(e.channel)) / static_cast<double>(e.divisor + 1), e.channel, e.divisor + 1});
  }
  return heap.top().value;
}

// What assembly scores pairs with: squared norms of every channel and the inner products
// between even and odd channels, of the calibration activations (columns of X) and of the
// weight columns.
template <class T>
struct PairGeometry {
  Vector<double> norms;  // [C]: ||v_j||^2
  Matrix<T> cross;       // [ceil(C/2), floor(C/2)]: <v_{2a}, v_{2b+1}>

  // Columns of V [rows, C].
  static PairGeometry of_columns(const Eigen::Ref<const Matrix<T>>& V) {
    const Index C = V.cols(), even = (C + 1) / 2, odd = C / 2;
    Matrix<T> V_even(V.rows(), even), V_odd(V.rows(), odd);
    for (Index r = 0; r < V.rows(); ++r) {
      for (Index a = 0; a < even; ++a) V_even(r, a) = V(r, 2 * a);
      for (Index b = 0; b < odd; ++b) V_odd(r, b) = V(r, 2 * b + 1);
    }
    PairGeometry g;
    g.cross = dense_product<T>(V_even.transpose(), V_odd);
    g.norms = Vector<double>::Zero(C);
    for (Index r = 0; r < V.rows(); ++r)
      for (Index j = 0; j < C; ++j) g.norms(j) += static_cast<double>(V(r, j)) * static_cast<double>(V(r, j));
    return g;
  }

  // ||v_{2a} - v_{2b+1}||^2 (>= 0 despite rounding).
  [[nodiscard]] double distance(Index a, Index b) const {
    const double d = norms(2 * a) + norms(2 * b + 1) - 2.0 * static_cast<double>(cross(a, b));
    return std::max(d, 0.0);
  }
};

struct MergePair {
  Index even, odd;  // original channels 2a and 2b + 1
  double score;     // 1/4 ||x_i - x_j||^2 ||w_i - w_j||^2
};

// `merges` disjoint (even, odd) pairs of mergeable channels, lowest merge error first:
// every even channel proposes its best odd partner; the lowest proposal is taken; an even
// channel whose partner was taken proposes again. Ties go to the lower channel index.
template <class T>
[[nodiscard]] std::vector<MergePair> assembly_pairs(const PairGeometry<T>& x, const PairGeometry<T>& w,
                                                    const std::vector<bool>& mergeable, Index merges) {
  const Index C = static_cast<Index>(mergeable.size()), even = (C + 1) / 2, odd = C / 2;
  std::vector<MergePair> pairs;
  if (merges == 0) return pairs;
  std::vector<bool> taken(static_cast<std::size_t>(odd), false);
  auto score = [&](Index a, Index b) { return 0.25 * x.distance(a, b) * w.distance(a, b); };
  auto best_partner = [&](Index a) {
    MergePair best{2 * a, -1, std::numeric_limits<double>::infinity()};
    for (Index b = 0; b < odd; ++b) {
      if (taken[static_cast<std::size_t>(b)] || !mergeable[static_cast<std::size_t>(2 * b + 1)]) continue;
      const double s = score(a, b);
      if (best.odd < 0 || s < best.score) best = {2 * a, 2 * b + 1, s};
    }
    return best;
  };
  auto later = [](const MergePair& l, const MergePair& r) {
    return l.score > r.score || (l.score == r.score && l.even > r.even);
  };
  std::priority_queue<MergePair, std::vector<MergePair>, decltype(later)> proposals(later);
  for (Index a = 0; a < even; ++a) {
    if (!mergeable[static_cast<std::size_t>(2 * a)]) continue;
    const MergePair p = best_partner(a);
    if (p.odd >= 0) proposals.push(p);
  }
  while (static_cast<Index>(pairs.size()) < merges && !proposals.empty()) {
    const MergePair p = proposals.top();
    proposals.pop();
    if (taken[static_cast<std::size_t>(p.odd / 2)]) {
      const MergePair again = best_partner(p.even / 2);
      if (again.odd >= 0) proposals.push(again);
      continue;
    }
    taken[static_cast<std::size_t>(p.odd / 2)] = true;
    pairs.push_back(p);
  }
  require(static_cast<Index>(pairs.size()) == merges, "QLLM: assembly needs ", merges,
          " channel pairs, only ", pairs.size(), " even/odd pairs of undisassembled channels exist");
  return pairs;
}

// T_j of every channel at threshold theta.
template <class T>
[[nodiscard]] std::vector<Index> disassembly_parts(const Vector<T>& absmax, double theta) {
  std::vector<Index> parts(static_cast<std::size_t>(absmax.size()));
  for (Index j = 0; j < absmax.size(); ++j)
    parts[static_cast<std::size_t>(j)] = split_parts(static_cast<double>(absmax(j)), theta);
  return parts;
}

// The map of a disassembly (parts[j] channels for channel j) and an assembly (pairs):
// channels in original order, a split channel's parts in place, a merged pair at the
// place of its lower channel. Empty (the identity) when nothing is split or merged.
template <class T>
[[nodiscard]] ChannelMap<T> reassembly_map(const std::vector<Index>& parts, const std::vector<MergePair>& pairs) {
  const auto C = static_cast<Index>(parts.size());
  const bool split = std::any_of(parts.begin(), parts.end(), [](Index p) { return p > 1; });
  if (!split && pairs.empty()) return {};
  std::vector<Index> partner(static_cast<std::size_t>(C), -1);
  for (const MergePair& p : pairs) {
    require(p.even >= 0 && p.even < C && p.odd >= 0 && p.odd < C && p.even != p.odd, "QLLM: merge pair (", p.even,
            ", ", p.odd, ") is outside [0, ", C, ")");
    require(partner[static_cast<std::size_t>(p.even)] < 0 && partner[static_cast<std::size_t>(p.odd)] < 0,
            "QLLM: channel ", p.even, " or ", p.odd, " is in two merge pairs");
    require(parts[static_cast<std::size_t>(p.even)] == 1 && parts[static_cast<std::size_t>(p.odd)] == 1,
            "QLLM: merge pair (", p.even, ", ", p.odd, ") holds a disassembled channel");
    partner[static_cast<std::size_t>(p.even)] = p.odd;
    partner[static_cast<std::size_t>(p.odd)] = p.even;
  }
  ChannelMap<T> map(C);
  for (Index j = 0; j < C; ++j) {
    const Index other = partner[static_cast<std::size_t>(j)];
    if (parts[static_cast<std::size_t>(j)] > 1) map.append_split(j, parts[static_cast<std::size_t>(j)]);
    else if (other < 0) map.append_copy(j);
    else if (other > j) map.append_merge(j, other);  // at the lower channel's place; skipped at the higher
  }
  return map;
}

// Reassembly at threshold theta: disassembly, then assembly of as many pairs as it added.
template <class T>
struct Reassembly {
  ChannelMap<T> map;  // empty: theta splits nothing
  Index extra_channels = 0;
  std::vector<MergePair> pairs;
};

template <class T>
[[nodiscard]] Reassembly<T> reassembly_for(const Vector<T>& absmax, double theta, const PairGeometry<T>& x,
                                           const PairGeometry<T>& w) {
  const Index C = absmax.size();
  const std::vector<Index> parts = disassembly_parts(absmax, theta);
  Reassembly<T> r;
  std::vector<bool> mergeable(static_cast<std::size_t>(C));
  for (Index j = 0; j < C; ++j) {
    mergeable[static_cast<std::size_t>(j)] = parts[static_cast<std::size_t>(j)] == 1;
    r.extra_channels += parts[static_cast<std::size_t>(j)] - 1;
  }
  if (r.extra_channels == 0) return r;
  require(r.extra_channels <= C / 2, "QLLM: theta = ", theta, " adds ", r.extra_channels,
          " channels, more than assembly can merge back (", C / 2, ")");
  r.pairs = assembly_pairs(x, w, mergeable, r.extra_channels);
  r.map = reassembly_map<T>(parts, r.pairs);
  return r;
}

// Runs body() with Eigen's own GEMM threading off (inside a one-iteration OpenMP loop
// Eigen never spawns threads), so dense factorizations give the same result for any
// thread count. body must not throw.
template <class Body>
void run_serially(Body&& body) {
  parallel_for(1, [&](Index) { body(); }, 1);
}

// A B, the low-rank correction: A [out, r], B [r, in].
template <class T>
struct LowRankFactors {
  Matrix<T> a, b;
  [[nodiscard]] Matrix<T> product() const { return dense_product<T>(a, b); }
};

// L = ||X B^T A^T - R||_F^2 over the rows of X, and its gradients
//   dL/dA = 2 E^T (X B^T),   dL/dB = 2 (E A)^T X,   E = X B^T A^T - R.
template <class T>
double lowrank_loss(const Eigen::Ref<const Matrix<T>>& X, const Eigen::Ref<const Matrix<T>>& R,
                    const LowRankFactors<T>& f, Matrix<T>* grad_a = nullptr, Matrix<T>* grad_b = nullptr) {
  require(X.rows() == R.rows() && f.b.cols() == X.cols() && f.a.rows() == R.cols() && f.a.cols() == f.b.rows(),
          "low-rank loss: shapes X ", X.rows(), "x", X.cols(), ", R ", R.rows(), "x", R.cols(), ", A ", f.a.rows(), "x",
          f.a.cols(), ", B ", f.b.rows(), "x", f.b.cols(), " do not fit");
  const Matrix<T> projected = dense_product<T>(X, f.b.transpose());  // [n, r]
  Matrix<T> E = dense_product<T>(projected, f.a.transpose());        // [n, out]
  E -= R;
  if (grad_a) *grad_a = T(2) * dense_product<T>(E.transpose(), projected);
  if (grad_b) {
    const Matrix<T> EA = dense_product<T>(E, f.a);  // [n, r]
    *grad_b = T(2) * dense_product<T>(EA.transpose(), X);
  }
  double loss = 0;
  for (Index i = 0; i < E.size(); ++i) loss += static_cast<double>(E.data()[i]) * static_cast<double>(E.data()[i]);
  return loss;
}

// The closed-form minimizer of ||X M^T - R||^2 + lambda ||M||^2 over rank(M) <= r (reduced-
// rank ridge regression), lambda = ridge * mean(diag(X^T X)). With H = X^T X + lambda I =
// L L^T and S = X^T R:
//   Z = H^-1 S                     the full-rank ridge solution M_full^T [in, out]
//   V = top r eigenvectors of S^T H^-1 S = U^T U,  U = L^-1 S   (the fitted values' Gram)
//   M = V V^T Z^T:  A = V, B = (Z V)^T = (L^-T U V)^T,  each rank-1 term then balanced
//   (|A_:k| = |B_k:|). ridge = 0 needs X^T X nonsingular.
template <class T>
[[nodiscard]] LowRankFactors<T> reduced_rank_fit(const Eigen::Ref<const Matrix<T>>& X,
                                                 const Eigen::Ref<const Matrix<T>>& R, Index rank, double ridge) {
  const Index in = X.cols(), out = R.cols();
  require(X.rows() == R.rows(), "reduced_rank_fit: X has ", X.rows(), " rows, R ", R.rows());
  require(rank >= 0 && rank <= std::min(in, out), "reduced_rank_fit: rank = ", rank, " is outside [0, ",
          std::min(in, out), "]");
  require(std::isfinite(ridge) && ridge >= 0, "reduced_rank_fit: ridge = ", ridge, " must be >= 0");
  LowRankFactors<T> f{Matrix<T>::Zero(out, rank), Matrix<T>::Zero(rank, in)};
  if (rank == 0) return f;
  const Matrix<T> gram = dense_product<T>(X.transpose(), X);   // [in, in]
  const Matrix<T> cross = dense_product<T>(X.transpose(), R);  // [in, out]
  bool singular = false;
  run_serially([&] {
    using MatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
    MatrixD H = gram.template cast<double>();
    const double mean_diagonal = H.diagonal().mean();
    if (!(mean_diagonal > 0)) return;  // X = 0: nothing to correct, A B = 0
    H.diagonal().array() += ridge * mean_diagonal;
    const Eigen::LLT<MatrixD> llt(H);
    if (llt.info() != Eigen::Success) {
      singular = true;
      return;
    }
    MatrixD U = cross.template cast<double>();
    llt.matrixL().solveInPlace(U);  // L^-1 S
    MatrixD Q = MatrixD::Zero(out, out);
    Q.template selfadjointView<Eigen::Lower>().rankUpdate(U.transpose());
    const Eigen::SelfAdjointEigenSolver<MatrixD> eigen(Q);
    const MatrixD V = eigen.eigenvectors().rightCols(rank).rowwise().reverse();  // largest first
    MatrixD ZV = U * V;
    llt.matrixU().solveInPlace(ZV);  // H^-1 S V
    for (Index k = 0; k < rank; ++k) {
      const double norm = ZV.col(k).norm();
      const double balance = norm > 0 ? std::sqrt(norm) : 1.0;  // |V_:k| = 1 before
      f.a.col(k) = (V.col(k) * balance).template cast<T>();
      f.b.row(k) = (ZV.col(k).transpose() / balance).template cast<T>();
    }
  });
  require(!singular, "reduced_rank_fit: X^T X + ", ridge, " * mean(diag) I is not positive definite (raise ridge)");
  return f;
}

// A in [-1/sqrt(r), 1/sqrt(r)] from a seeded mt19937_64 (53-bit uniforms: the same on every
// platform), B = 0.
template <class T>
[[nodiscard]] LowRankFactors<T> lowrank_start(Index out, Index in, Index rank, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const double bound = rank > 0 ? 1.0 / std::sqrt(static_cast<double>(rank)) : 0.0;
  LowRankFactors<T> f{Matrix<T>(out, rank), Matrix<T>::Zero(rank, in)};
  for (Index i = 0; i < f.a.size(); ++i) {
    const double unit = static_cast<double>(rng() >> 11) * 0x1.0p-53;
    f.a.data()[i] = static_cast<T>((2 * unit - 1) * bound);
  }
  return f;
}

// AdamW with a learning rate that changes every step. With weight decay 0 core/optim.hpp's
// update is linear in lr, so an AdamW at lr = 1 stepping a zero buffer yields the unit
// update d, and the parameter moves by lr_t * d.
template <class T>
class ScheduledAdamW {
 public:
  explicit ScheduledAdamW(Index size) : unit_(size, {.lr = T(1)}), direction_(static_cast<std::size_t>(size)) {}

  void step(Matrix<T>& param, const Matrix<T>& grad, T lr) {
    std::fill(direction_.begin(), direction_.end(), T(0));
    unit_.step(std::span<T>(direction_), std::span<const T>(grad.data(), static_cast<std::size_t>(grad.size())));
    for (Index i = 0; i < param.size(); ++i) param.data()[i] += lr * direction_[static_cast<std::size_t>(i)];
  }

 private:
  AdamW<T> unit_;
  std::vector<T> direction_;
};

// AdamW on mini-batches of the rows of X (a seeded order per epoch), lr_t = lr (1 - t / steps)
// over all steps t; history gets each epoch's mean squared error per element of R.
template <class T>
void train_lowrank(const Eigen::Ref<const Matrix<T>>& X, const Eigen::Ref<const Matrix<T>>& R, LowRankFactors<T>& f,
                   const QLLMOptions<T>& o, TrainingHistory& history) {
  if (o.epochs == 0 || X.rows() == 0 || f.a.cols() == 0) return;
  const Index n = X.rows(), steps_per_epoch = (n + o.batch_tokens - 1) / o.batch_tokens;
  const double total_steps = static_cast<double>(steps_per_epoch) * o.epochs;
  const double elements = static_cast<double>(n) * static_cast<double>(R.cols());
  ScheduledAdamW<T> adam_a(f.a.size()), adam_b(f.b.size());
  EpochOrder order(n, o.seed);
  Matrix<T> grad_a, grad_b;
  Index step = 0;
  for (int epoch = 1; epoch <= o.epochs; ++epoch) {
    const std::vector<Index>& tokens = order.next();
    double total = 0;
    for (Index begin = 0; begin < n; begin += o.batch_tokens, ++step) {
      const Index count = std::min(o.batch_tokens, n - begin);
      const Matrix<T> X_batch = gather_rows<T>(X, tokens.data() + begin, count);
      const Matrix<T> R_batch = gather_rows<T>(R, tokens.data() + begin, count);
      const double loss = lowrank_loss<T>(X_batch, R_batch, f, &grad_a, &grad_b);
      require(std::isfinite(loss), "QLLM: low-rank training loss is ", loss, " in epoch ", epoch);
      total += loss;
      const T lr = static_cast<T>(static_cast<double>(o.lr) * (1.0 - static_cast<double>(step) / total_steps));
      adam_a.step(f.a, grad_a, lr);
      adam_b.step(f.b, grad_b, lr);
    }
    history.loss.push_back(total / elements);
    if (o.progress) o.progress(epoch, total / elements);
  }
}

}  // namespace detail

// Layer-wise QLLM: calibrate() with the layer's input activations, then quantize() each
// weight matrix that reads them. report() describes the last quantize().
template <class T = float>
class QLLM {
 public:
  using Options = QLLMOptions<T>;

  explicit QLLM(Options options) : options_(std::move(options)) { options_.validate(); }

  [[nodiscard]] const Options& options() const { return options_; }
  [[nodiscard]] Index tokens() const { return X_.rows(); }
  [[nodiscard]] Index in_features() const { return X_.cols(); }
  [[nodiscard]] const QLLMReport& report() const { return report_; }

  // Adds calibration tokens X [tokens, in]; calls accumulate.
  void calibrate(const Eigen::Ref<const Matrix<T>>& X) {
    detail::require_finite(X, "X");
    detail::require(X.cols() > 0, "QLLM.calibrate: X has no columns");
    detail::require(tokens() == 0 || X.cols() == in_features(), "QLLM.calibrate: X has ", X.cols(),
                    " columns, earlier batches ", in_features());
    const Index old = tokens();
    X_.conservativeResize(old + X.rows(), X.cols());
    X_.bottomRows(X.rows()) = X;
    const Vector<T> batch_absmax = X.cwiseAbs().colwise().maxCoeff().transpose();
    absmax_ = old == 0 ? batch_absmax : Vector<T>(absmax_.cwiseMax(batch_absmax));
    x_geometry_.reset();
  }

  // The smallest theta whose disassembly adds at most ratio * C channels.
  [[nodiscard]] double theta_for_ratio(double ratio) const {
    detail::require(tokens() > 0, "QLLM.theta_for_ratio: call calibrate() first");
    detail::require(ratio >= 0 && ratio <= 0.25, "QLLM.theta_for_ratio: ratio = ", ratio, " is outside [0, 0.25]");
    const auto budget = static_cast<Index>(std::floor(ratio * static_cast<double>(in_features())));
    return detail::theta_for_budget(absmax_, budget);
  }

  // The reassembly map of threshold theta for the layer W reads through (empty: none).
  [[nodiscard]] ChannelMap<T> reassembly(const Eigen::Ref<const Matrix<T>>& W, double theta) {
    check_weight(W);
    detail::require(theta > 0, "QLLM.reassembly: theta = ", theta, " must be > 0");
    return detail::reassembly_for(absmax_, theta, x_geometry(), detail::PairGeometry<T>::of_columns(W)).map;
  }

  [[nodiscard]] QuantizedLayer<T> quantize(const Eigen::Ref<const Matrix<T>>& W) { return quantize(W, Vector<T>()); }

  // W [out, in] with bias [out] (empty: none).
  [[nodiscard]] QuantizedLayer<T> quantize(const Eigen::Ref<const Matrix<T>>& W, const Eigen::Ref<const Vector<T>>& bias) {
    check_weight(W);
    detail::require(bias.size() == 0 || bias.size() == W.rows(), "QLLM.quantize: bias size ", bias.size(),
                    " != out_features ", W.rows());
    detail::require_finite(bias, "bias");
    const Options& o = options_;
    detail::require(W.rows() == 0 || o.rank <= std::min(W.rows(), W.cols()), "QLLM.rank = ", o.rank, " exceeds min(out, in) = ",
                    std::min(W.rows(), W.cols()));
    report_ = {};
    const Matrix<T> Y = detail::dense_product<T>(X_, W.transpose());  // float output without bias
    const double scale = output_norm(Y, bias);
    auto relative = [&](double squared) { return scale > 0 ? std::sqrt(squared) / scale : std::sqrt(squared); };

    // Theta candidates: "none" first, then the grid (or the one fixed theta).
    std::vector<QLLMCandidate> candidates;
    if (o.theta) {
      candidates.push_back({0.0, static_cast<double>(*o.theta), 0, 0.0});
    } else {
      candidates.push_back({});
      for (double ratio : o.extra_channel_ratios) candidates.push_back({ratio, theta_for_ratio(ratio), 0, 0.0});
    }
    const detail::PairGeometry<T> w_geometry = detail::PairGeometry<T>::of_columns(W);
    Trial best;
    for (std::size_t i = 0; i < candidates.size(); ++i) {
      QLLMCandidate& c = candidates[i];
      const auto same = std::find_if(candidates.begin(), candidates.begin() + static_cast<std::ptrdiff_t>(i),
                                     [&](const QLLMCandidate& earlier) { return earlier.theta == c.theta; });
      if (same != candidates.begin() + static_cast<std::ptrdiff_t>(i)) {  // two ratios, one theta
        c.extra_channels = same->extra_channels;
        c.error = same->error;
        continue;
      }
      Trial trial = evaluate(W, Y, c.theta, w_geometry);
      c.extra_channels = trial.reassembly.extra_channels;
      c.error = relative(trial.squared_error);
      if (i == 0 || trial.squared_error < best.squared_error) {
        best = std::move(trial);
        report_.chosen = i;
      }
    }
    report_.candidates = candidates;
    report_.reassembly_error = candidates[report_.chosen].error;
    if (!best.reassembly.map.empty()) {
      const Matrix<T> Y_float = detail::dense_product<T>(best.reassembly.map.apply(X_), best.weight.transpose());
      report_.assembly_error = relative(squared_difference(Y_float, Y));
    }

    QuantizedLayer<T> layer;
    layer.channel_map = best.reassembly.map;
    layer.activation = o.activation;
    if (bias.size() != 0) layer.bias = bias;
    const Index in = best.weight.cols(), out = W.rows();
    if (o.rank == 0 || out == 0) {
      layer.weights = std::move(best.quantized);
      report_.side_term_error = report_.requantized_error = report_.requantized_float_error = report_.reassembly_error;
      return layer;
    }
    // R = X W^T - X_q W_hat^T: what A B has to produce from X_q.
    Matrix<T> R = Y;
    R.noalias() -= detail::dense_product<T>(best.input, best.dequantized.transpose());
    detail::LowRankFactors<T> factors = o.init == LowRankInit::ClosedForm
                                            ? detail::reduced_rank_fit<T>(best.input, R, o.rank, o.ridge)
                                            : detail::lowrank_start<T>(out, in, o.rank, o.seed);
    detail::train_lowrank<T>(best.input, R, factors, o, layer.history);
    report_.side_term_error = relative(detail::lowrank_loss<T>(best.input, R, factors));
    // Both merges, fresh ranges: W_hat + A B (what training fitted) and W' + A B (the reference's).
    const Matrix<T> correction = factors.product();
    QuantizedMatrix<T> requantized = RTN<T>(o.weight).quantize(best.dequantized + correction);
    QuantizedMatrix<T> requantized_float = RTN<T>(o.weight).quantize(best.weight + correction);
    auto error_of = [&](const QuantizedMatrix<T>& q) {
      return relative(squared_difference(detail::dense_product<T>(best.input, q.dequantize().transpose()), Y));
    };
    report_.requantized_error = error_of(requantized);
    report_.requantized_float_error = error_of(requantized_float);
    switch (o.lowrank) {
      case LowRankMode::SideTerm:
        layer.weights = std::move(best.quantized);
        layer.lowrank_a = std::move(factors.a);
        layer.lowrank_b = std::move(factors.b);
        break;
      case LowRankMode::Requantize: layer.weights = std::move(requantized); break;
      case LowRankMode::RequantizeFloat: layer.weights = std::move(requantized_float); break;
    }
    return layer;
  }

  template <RowMajorTensor2 Tensor>
  void calibrate(const Tensor& X) { calibrate(as_matrix(X)); }
  template <RowMajorTensor2 Tensor>
  [[nodiscard]] QuantizedLayer<T> quantize(const Tensor& W) { return quantize(as_matrix(W)); }

 private:
  // One theta: its map, the reassembled float weight W', the quantized input and weight.
  struct Trial {
    detail::Reassembly<T> reassembly;
    Matrix<T> weight, input, dequantized;
    QuantizedMatrix<T> quantized;
    double squared_error = 0;
  };

  void check_weight(const Eigen::Ref<const Matrix<T>>& W) const {
    detail::require(tokens() > 0, "QLLM.quantize: call calibrate() with activations first");
    detail::require(W.cols() == in_features(), "QLLM.quantize: W has ", W.cols(), " columns, the calibration "
                    "activations ", in_features());
    detail::require_finite(W, "W");
  }

  const detail::PairGeometry<T>& x_geometry() {
    if (!x_geometry_) x_geometry_ = detail::PairGeometry<T>::of_columns(X_);
    return *x_geometry_;
  }

  static double squared_difference(const Matrix<T>& a, const Matrix<T>& b) {
    double sum = 0;
    for (Index i = 0; i < a.size(); ++i) {
      const double d = static_cast<double>(a.data()[i]) - static_cast<double>(b.data()[i]);
      sum += d * d;
    }
    return sum;
  }

  // ||X W^T + b||_F.
  static double output_norm(const Matrix<T>& Y, const Eigen::Ref<const Vector<T>>& bias) {
    double sum = 0;
    for (Index t = 0; t < Y.rows(); ++t)
      for (Index o = 0; o < Y.cols(); ++o) {
        const double y = static_cast<double>(Y(t, o)) + (bias.size() ? static_cast<double>(bias(o)) : 0.0);
        sum += y * y;
      }
    return std::sqrt(sum);
  }

  Trial evaluate(const Eigen::Ref<const Matrix<T>>& W, const Matrix<T>& Y, double theta,
                 const detail::PairGeometry<T>& w_geometry) {
    Trial t;
    if (theta < std::numeric_limits<double>::infinity())
      t.reassembly = detail::reassembly_for(absmax_, theta, x_geometry(), w_geometry);
    const ChannelMap<T>& map = t.reassembly.map;
    t.weight = map.fold_weight(W);
    t.input = map.apply(X_);
    if (options_.activation) {
      Matrix<T> quantized(t.input.rows(), t.input.cols());
      GroupFakeQuantizer<T>(options_.activation->bits, options_.activation->group_size).forward(t.input, quantized);
      t.input.swap(quantized);
    }
    t.quantized = RTN<T>(options_.weight).quantize(t.weight);
    t.dequantized = t.quantized.dequantize();
    t.squared_error = squared_difference(detail::dense_product<T>(t.input, t.dequantized.transpose()), Y);
    return t;
  }

  Options options_;
  Matrix<T> X_;
  Vector<T> absmax_;
  std::optional<detail::PairGeometry<T>> x_geometry_;
  QLLMReport report_;
};

}  // namespace lowbit

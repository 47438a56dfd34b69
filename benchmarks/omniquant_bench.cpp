// OmniQuant training cost on one 4096 x 4096 layer with 512 calibration tokens, W4A16g128.
//
//   BM_EigenGemm            Y = X W^T, [512 x 4096] x [4096 x 4096], Eigen's own (threaded) GEMM
//   BM_DenseProduct         the same product as lowbit computes it (fixed panels, thread-count
//                           independent)
//   BM_ForwardBackward/a    one training step's forward + backward on a 512-token batch
//                           (a = 0: W4A16g128, a = 1: W4A4, which needs one more GEMM for
//                           dL/dX'); counter gemm_ratio = its time over an Eigen GEMM of the
//                           same shape timed right after it in the same iteration
//   BM_OmniQuantEpochs      OmniQuant::quantize with 3 epochs of 2 steps (batch_tokens 256),
//                           counter s_per_epoch from the progress callback's timestamps
#include <benchmark/benchmark.h>

#include <chrono>
#include <random>
#include <vector>

#include "lowbit/quantizers/omniquant.hpp"

namespace {

using lowbit::Index;
using lowbit::Matrix;
using Clock = std::chrono::steady_clock;

constexpr Index kOut = 4096, kIn = 4096, kTokens = 512;

Matrix<float> random_matrix(Index rows, Index cols, std::uint64_t seed, float stddev) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  Matrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

const Matrix<float>& weights() {
  static const Matrix<float> W = random_matrix(kOut, kIn, 1, 0.02f);
  return W;
}

const Matrix<float>& activations() {
  static const Matrix<float> X = [] {
    Matrix<float> X = random_matrix(kTokens, kIn, 2, 1.0f);
    for (Index j = 0; j < kIn; j += 97) X.col(j) *= 20.0f;  // a few outlier channels
    return X;
  }();
  return X;
}

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

void BM_EigenGemm(benchmark::State& state) {
  const Matrix<float>& W = weights();
  const Matrix<float>& X = activations();
  Matrix<float> Y(kTokens, kOut);
  for (auto _ : state) {
    Y.noalias() = X * W.transpose();
    benchmark::DoNotOptimize(Y.data());
  }
  state.counters["GFLOPs"] =
      benchmark::Counter(2.0 * kTokens * kIn * kOut * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_EigenGemm)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_DenseProduct(benchmark::State& state) {
  const Matrix<float>& W = weights();
  const Matrix<float>& X = activations();
  Matrix<float> Y(kTokens, kOut);
  for (auto _ : state) {
    lowbit::detail::dense_product<float>(X, W.transpose(), Y);
    benchmark::DoNotOptimize(Y.data());
  }
  state.counters["GFLOPs"] =
      benchmark::Counter(2.0 * kTokens * kIn * kOut * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_DenseProduct)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_ForwardBackward(benchmark::State& state) {
  const bool activation = state.range(0) != 0;
  const Matrix<float>& W = weights();
  const Matrix<float>& X = activations();
  lowbit::detail::OmniLinear<float> layer(
      W, {},
      {.weight = activation ? lowbit::QuantSpec{.bits = 4, .group_size = 0} : lowbit::QuantSpec{.bits = 4, .group_size = 128},
       .activation = activation ? std::optional<lowbit::QuantSpec>(lowbit::QuantSpec{.bits = 4, .group_size = 0})
                                : std::nullopt});
  const Matrix<float> target = layer.reference(X);
  Matrix<float> Y(kTokens, kOut), gemm(kTokens, kOut);
  double step_seconds = 0, gemm_seconds = 0;
  for (auto _ : state) {
    const auto start = Clock::now();
    layer.forward(X, Y);
    Y -= target;
    layer.backward(2 * Y, nullptr);
    const double step = seconds_since(start);
    const auto gemm_start = Clock::now();
    gemm.noalias() = X * W.transpose();
    benchmark::DoNotOptimize(gemm.data());
    gemm_seconds += seconds_since(gemm_start);
    step_seconds += step;
    state.SetIterationTime(step);
  }
  state.counters["gemm_ratio"] = step_seconds / gemm_seconds;
}
BENCHMARK(BM_ForwardBackward)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseManualTime();

void BM_OmniQuantEpochs(benchmark::State& state) {
  constexpr int kEpochs = 3;
  std::vector<Clock::time_point> epoch_ends;
  lowbit::OmniQuant<float> omni({.weight = {.bits = 4, .group_size = 128}, .epochs = kEpochs, .batch_tokens = 256,
                                 .progress = [&](int, double) { epoch_ends.push_back(Clock::now()); }});
  omni.calibrate(activations());
  double per_epoch = 0;
  int runs = 0;
  for (auto _ : state) {
    epoch_ends.clear();
    auto layer = omni.quantize(weights());
    benchmark::DoNotOptimize(layer.weights.packed_codes().data());
    per_epoch += std::chrono::duration<double>(epoch_ends.back() - epoch_ends.front()).count() / (kEpochs - 1);
    ++runs;
  }
  state.counters["s_per_epoch"] = per_epoch / runs;
  state.counters["steps_per_epoch"] = static_cast<double>(kTokens / 256);
}
BENCHMARK(BM_OmniQuantEpochs)->Unit(benchmark::kSecond)->UseRealTime()->Iterations(1);

}  // namespace

BENCHMARK_MAIN();

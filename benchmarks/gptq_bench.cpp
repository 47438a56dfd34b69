// GPTQ timings (wall clock; thread count from OMP_NUM_THREADS):
//   AddBatch          the streamed Hessian, 2048 tokens x 4096, against
//   EigenGram         Eigen's own float GEMM H = X^T X on the same X, and
//   EigenRankUpdate   Eigen's symmetric rank-k update (lower half only);
//   Quantize          4096 x 4096, 4-bit, group 128, factorization of H included
//                     (what the reference's fasterquant times);
//   QuantizeCached    the same with U reused (layers sharing an input: q/k/v);
//   FixtureConfig     the reference's 30 fixture configurations (512 x 1024 layer).
// GFLOPS counters use 2 n^2 tokens for every Hessian row (the full GEMM's count), so
// their ratio is the ratio of wall times.
#include <benchmark/benchmark.h>

#include <ctime>
#include <random>
#include <string>

#include "lowbit/quantizers/gptq.hpp"

namespace {

using lowbit::Index;
using lowbit::Matrix;

Matrix<float> random_matrix(Index rows, Index cols, std::uint64_t seed, float stddev) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  Matrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

// Activations with channel scales spread over two decades (diag H far from flat).
Matrix<float> activations(Index tokens, Index n) {
  Matrix<float> X = random_matrix(tokens, n, 1, 1.0f);
  for (Index c = 0; c < n; ++c)
    X.col(c) *= std::pow(10.0f, static_cast<float>((c * 37) % n) / static_cast<float>(n) * 2 - 1);
  return X;
}

// CPU seconds of the whole process (all threads): with the real time it shows how much
// of a busy machine the run got.
double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

void set_process_cpu_counter(benchmark::State& state, double start) {
  state.counters["process_cpu_s"] =
      benchmark::Counter(process_cpu_seconds() - start, benchmark::Counter::kAvgIterations);
}

void set_gram_counter(benchmark::State& state, Index n, Index tokens) {
  state.counters["GFLOPS"] =
      benchmark::Counter(2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(tokens) * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
}

void BM_AddBatch(benchmark::State& state) {
  const Index n = state.range(0), tokens = state.range(1);
  const Matrix<float> X = activations(tokens, n);
  lowbit::GPTQ<float> gptq(n);
  const double cpu_start = process_cpu_seconds();
  for (auto _ : state) {
    gptq.add_batch(X);
    benchmark::ClobberMemory();
  }
  set_process_cpu_counter(state, cpu_start);
  set_gram_counter(state, n, tokens);
}

void BM_EigenGram(benchmark::State& state) {
  const Index n = state.range(0), tokens = state.range(1);
  const Matrix<float> X = activations(tokens, n);
  Matrix<float> H(n, n);
  const double cpu_start = process_cpu_seconds();
  for (auto _ : state) {
    H.noalias() = X.transpose() * X;
    benchmark::DoNotOptimize(H.data());
  }
  set_process_cpu_counter(state, cpu_start);
  set_gram_counter(state, n, tokens);
}

void BM_EigenRankUpdate(benchmark::State& state) {
  const Index n = state.range(0), tokens = state.range(1);
  const Matrix<float> X = activations(tokens, n);
  Matrix<float> H = Matrix<float>::Zero(n, n);
  const double cpu_start = process_cpu_seconds();
  for (auto _ : state) {
    H.selfadjointView<Eigen::Lower>().rankUpdate(X.transpose());
    benchmark::DoNotOptimize(H.data());
  }
  set_process_cpu_counter(state, cpu_start);
  set_gram_counter(state, n, tokens);
}

// A calibrated GPTQ for an out x in layer (2048 tokens), 4-bit, group 128.
lowbit::GPTQ<float> calibrated(Index in, bool act_order) {
  lowbit::GPTQ<float> gptq(in, {.spec = {.bits = 4, .group_size = 128}, .act_order = act_order});
  gptq.add_batch(activations(2048, in));
  return gptq;
}

void BM_Quantize(benchmark::State& state) {
  const Index out = state.range(0), in = state.range(1);
  auto gptq = calibrated(in, state.range(2) != 0);
  const Matrix<float> W = random_matrix(out, in, 2, 0.02f);
  const double cpu_start = process_cpu_seconds();
  for (auto _ : state) {
    gptq.clear_cache();  // factor H every time, as the reference does
    auto q = gptq.quantize(W);
    benchmark::DoNotOptimize(q.packed_codes().data());
  }
  set_process_cpu_counter(state, cpu_start);
}

void BM_QuantizeCached(benchmark::State& state) {
  const Index out = state.range(0), in = state.range(1);
  auto gptq = calibrated(in, state.range(2) != 0);
  const Matrix<float> W = random_matrix(out, in, 2, 0.02f);
  (void)gptq.quantize(W);
  const double cpu_start = process_cpu_seconds();
  for (auto _ : state) {
    auto q = gptq.quantize(W);
    benchmark::DoNotOptimize(q.packed_codes().data());
  }
  set_process_cpu_counter(state, cpu_start);
}

// The reference's 30 fixture configurations on a 512 x 1024 layer (same shape, synthetic
// data), factorization included: {bits, group (0 = per row), sym, act_order, static}.
void BM_FixtureConfig(benchmark::State& state, int bits, Index group, bool symmetric, bool act_order,
                      bool static_groups) {
  lowbit::GPTQ<float> gptq(1024, {.spec = {.bits = bits, .group_size = group, .symmetric = symmetric},
                                  .act_order = act_order,
                                  .static_groups = static_groups});
  gptq.add_batch(activations(2048, 1024));
  const Matrix<float> W = random_matrix(512, 1024, 2, 0.02f);
  const double cpu_start = process_cpu_seconds();
  for (auto _ : state) {
    gptq.clear_cache();
    auto q = gptq.quantize(W);
    benchmark::DoNotOptimize(q.packed_codes().data());
  }
  set_process_cpu_counter(state, cpu_start);
}

const bool fixture_configs_registered = [] {
  for (int bits : {4, 3, 2})
    for (Index group : {Index(128), Index(0)})
      for (bool act_order : {false, true})
        for (bool symmetric : {false, true})
          for (bool static_groups : {false, true}) {
            if (static_groups && (group == 0 || !act_order)) continue;
            const std::string name = "BM_FixtureConfig/w" + std::to_string(bits) + "/g" +
                                     std::to_string(group == 0 ? -1 : group) + "/act" + std::to_string(act_order) +
                                     "/sym" + std::to_string(symmetric) + "/static" + std::to_string(static_groups);
            benchmark::RegisterBenchmark(name.c_str(), BM_FixtureConfig, bits, group, symmetric, act_order,
                                         static_groups)
                ->Unit(benchmark::kMillisecond)
                ->UseRealTime();
          }
  return true;
}();

}  // namespace

BENCHMARK(BM_AddBatch)->Args({4096, 2048})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_EigenGram)->Args({4096, 2048})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_EigenRankUpdate)->Args({4096, 2048})->Unit(benchmark::kMillisecond)->UseRealTime();
// {out, in, act_order}
BENCHMARK(BM_Quantize)->Args({4096, 4096, 0})->Args({4096, 4096, 1})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_QuantizeCached)->Args({4096, 4096, 0})->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();

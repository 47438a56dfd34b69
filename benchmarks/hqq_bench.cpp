// HQQ quantization time per configuration, variant and ISA, beside RTN on the same
// matrix in the same binary. The counter s_per_Mweight is seconds per million weights
// (wall clock); the CPU column is the whole process's CPU time, all threads summed, which
// stays meaningful when other jobs share the machine.
//
//   OMP_NUM_THREADS=1 ./hqq_bench --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
//   OMP_NUM_THREADS=2 ./hqq_bench ...
#include <benchmark/benchmark.h>

#include <cmath>
#include <lowbit/lowbit.hpp>
#include <lowbit/quantizers/hqq.hpp>
#include <map>
#include <random>
#include <utility>

namespace {

using lowbit::Index;

// LLM-like weights: Student-t (5 degrees of freedom) scaled to std ~0.02, rare 10x
// outliers; built once per shape.
const lowbit::Matrix<float>& weights(Index rows, Index cols) {
  static std::map<std::pair<Index, Index>, lowbit::Matrix<float>> cache;
  auto [it, inserted] = cache.try_emplace({rows, cols});
  if (inserted) {
    std::mt19937_64 rng(42);
    std::normal_distribution<double> normal(0.0, 0.016);
    std::chi_squared_distribution<double> chi2(5.0);
    std::uniform_real_distribution<double> uniform(0.0, 1.0);
    it->second.resize(rows, cols);
    for (Index i = 0; i < it->second.size(); ++i) {
      double v = normal(rng) / std::sqrt(chi2(rng) / 5.0);
      if (uniform(rng) < 0.001) v *= 10;
      it->second.data()[i] = static_cast<float>(v);
    }
  }
  return it->second;
}

void set_counters(benchmark::State& state, Index rows, Index cols) {
  state.counters["s_per_Mweight"] = benchmark::Counter(static_cast<double>(rows * cols) / 1e6,
                                                       benchmark::Counter::kIsIterationInvariantRate |
                                                           benchmark::Counter::kInvert);
}

// Args: rows, cols, bits, group_size, variant (0 Reference, 1 Improved), isa.
void BM_Hqq(benchmark::State& state) {
  const Index rows = state.range(0), cols = state.range(1);
  const auto isa = static_cast<lowbit::Isa>(state.range(5));
  if (!lowbit::isa_supported(isa)) {
    state.SkipWithError("ISA not supported on this CPU");
    return;
  }
  lowbit::set_isa(isa);
  const lowbit::HQQ<float> hqq({.spec = {.bits = static_cast<int>(state.range(2)), .group_size = state.range(3)},
                                .variant = state.range(4) == 0 ? lowbit::HqqVariant::Reference
                                                               : lowbit::HqqVariant::Improved});
  const auto& W = weights(rows, cols);
  for (auto _ : state) {
    auto q = hqq.quantize(W);
    benchmark::DoNotOptimize(q.packed_codes().data());
  }
  set_counters(state, rows, cols);
}

// RTN (min-max) on the same matrix: the floor of any quantizer's cost.
void BM_Rtn(benchmark::State& state) {
  const Index rows = state.range(0), cols = state.range(1);
  const lowbit::RTN<float> rtn(
      lowbit::QuantSpec{.bits = static_cast<int>(state.range(2)), .group_size = state.range(3)});
  const auto& W = weights(rows, cols);
  for (auto _ : state) {
    auto q = rtn.quantize(W);
    benchmark::DoNotOptimize(q.packed_codes().data());
  }
  set_counters(state, rows, cols);
}

constexpr int64_t kAvx512 = static_cast<int64_t>(lowbit::Isa::Avx512);
constexpr int64_t kAvx2 = static_cast<int64_t>(lowbit::Isa::Avx2);
constexpr int64_t kScalar = static_cast<int64_t>(lowbit::Isa::Scalar);

void configurations(benchmark::internal::Benchmark* b) {
  const int64_t shapes[][2] = {{4096, 4096}, {11008, 4096}};
  const int64_t bits_groups[][2] = {{4, 64}, {4, 128}, {3, 64}, {3, 128}, {2, 16}, {2, 32}, {2, 64}, {2, 128}};
  for (const auto& shape : shapes)
    for (const auto& bg : bits_groups)
      for (int64_t variant : {0, 1}) b->Args({shape[0], shape[1], bg[0], bg[1], variant, kAvx512});
  // The ISA variants on the headline configuration (scalar on a quarter of it).
  for (int64_t variant : {0, 1}) {
    b->Args({4096, 4096, 4, 64, variant, kAvx2});
    b->Args({1024, 4096, 4, 64, variant, kAvx512});
    b->Args({1024, 4096, 4, 64, variant, kScalar});
  }
}

BENCHMARK(BM_Hqq)
    ->Apply(configurations)
    ->ArgNames({"rows", "cols", "bits", "group", "improved", "isa"})
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime()
    ->UseRealTime();
BENCHMARK(BM_Rtn)
    ->Args({4096, 4096, 4, 64})
    ->Args({11008, 4096, 4, 64})
    ->ArgNames({"rows", "cols", "bits", "group"})
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime()
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();

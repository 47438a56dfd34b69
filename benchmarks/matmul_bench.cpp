// GEMV / matmul straight from packed weights, against Eigen's float kernels and the
// machine's streaming-read bandwidth, all in one run.
//
//   OMP_NUM_THREADS=1 ./matmul_bench --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
//
// After the benchmarks, a summary prints for every lowbit run: its speed-up over the
// Eigen baseline of the same shape (float GEMV for gemv and gemv_int8, float GEMM on
// the dequantized matrix for matmul), the GB/s of packed bytes it reads, for the cold
// runs that as a fraction of the streaming read of a 1 GiB buffer, and the time per
// token. Medians are used when the run has repetitions. Arguments: rows, cols, bits,
// group size, ISA (0 scalar, 1 AVX2, 2 AVX-512), then cold (1: weights cycled through
// 1 GiB of copies, see kColdBytes) for gemv, the token count for matmul.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "lowbit/kernels/gemv_int8.hpp"
#include "lowbit/kernels/matmul.hpp"
#include "lowbit/quantizers/rtn.hpp"

namespace {

using lowbit::Index;
using lowbit::Isa;
using lowbit::Matrix;
using lowbit::Vector;

// One random layer per shape, and its RTN quantizations, built once.
const Matrix<float>& layer(Index rows, Index cols) {
  static std::map<std::pair<Index, Index>, std::unique_ptr<Matrix<float>>> cache;
  auto& slot = cache[{rows, cols}];
  if (!slot) slot = std::make_unique<Matrix<float>>(Matrix<float>::Random(rows, cols) * 0.02f);
  return *slot;
}

const lowbit::QuantizedMatrix<float>& quantized(Index rows, Index cols, int bits, Index group) {
  static std::map<std::tuple<Index, Index, int, Index>, std::unique_ptr<lowbit::QuantizedMatrix<float>>> cache;
  auto& slot = cache[{rows, cols, bits, group}];
  if (!slot)
    slot = std::make_unique<lowbit::QuantizedMatrix<float>>(
        lowbit::RTN<float>(lowbit::QuantSpec{.bits = bits, .group_size = group}).quantize(layer(rows, cols)));
  return *slot;
}

bool use_isa(benchmark::State& state, Index arg) {
  const Isa isa = static_cast<Isa>(arg);
  if (!lowbit::isa_supported(isa)) {
    state.SkipWithError("ISA not supported on this CPU");
    return false;
  }
  lowbit::set_isa(isa);
  return true;
}

// Sum of a buffer with wide loads: the streaming-read bandwidth reference. It reads four
// quarters of the buffer at once, as a GEMV reads several rows: one sequential stream
// per core leaves bandwidth unused on this machine (Eigen's GEMV outran it).
LOWBIT_TARGET_AVX2 float stream_sum(const float* data, Index n) {
  constexpr int kStreams = 4;
  const Index quarter = n / kStreams / 8 * 8;
  __m256 acc[kStreams] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (Index i = 0; i < quarter; i += 8)
    for (int k = 0; k < kStreams; ++k) acc[k] = _mm256_add_ps(acc[k], _mm256_loadu_ps(data + k * quarter + i));
  float total = lowbit::detail::avx2::reduce_add(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (Index i = kStreams * quarter; i < n; ++i) total += data[i];
  return total;
}

void BM_StreamRead(benchmark::State& state) {
  const Index n = Index{1} << 28;  // 1 GiB of floats
  static std::vector<float> buffer(static_cast<std::size_t>(n), 1.0f);
  const Index chunks = 256, chunk = n / chunks;
  std::vector<float> partial(chunks);
  for (auto _ : state) {
    lowbit::detail::parallel_for(chunks, [&](Index c) { partial[static_cast<std::size_t>(c)] = stream_sum(buffer.data() + c * chunk, chunk); });
    benchmark::DoNotOptimize(partial.data());
  }
  state.SetBytesProcessed(state.iterations() * n * static_cast<Index>(sizeof(float)));
}
BENCHMARK(BM_StreamRead)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_EigenGemv(benchmark::State& state) {
  const Index rows = state.range(0), cols = state.range(1);
  const Matrix<float>& W = layer(rows, cols);
  const Vector<float> x = Vector<float>::Random(cols);
  Vector<float> y(rows);
  for (auto _ : state) {
    y.noalias() = W * x;
    benchmark::DoNotOptimize(y.data());
  }
  state.SetBytesProcessed(state.iterations() * rows * cols * static_cast<Index>(sizeof(float)));
}

// The cold variants cycle through copies of the weights that together span 1 GiB, more
// than any cache, so every call streams its weights from memory the way decoding a
// model too large for the cache does. The hot variants run one matrix again and again:
// on a machine with a large last-level cache (this one has 480 MiB) it stays resident.
constexpr std::size_t kColdBytes = std::size_t{1} << 30;

template <class Weights>
const std::vector<Weights>& cold_copies(const Weights& one, std::size_t bytes_each) {
  static std::vector<Weights> copies;  // one configuration at a time: they are large
  static const Weights* source = nullptr;
  if (source != &one) {
    copies.clear();
    const std::size_t count = std::max<std::size_t>(2, (kColdBytes + bytes_each - 1) / bytes_each);
    copies.assign(count, one);
    source = &one;
  }
  return copies;
}

void BM_EigenGemvCold(benchmark::State& state) {
  const Index rows = state.range(0), cols = state.range(1);
  const Matrix<float>& one = layer(rows, cols);
  const auto& copies = cold_copies(one, static_cast<std::size_t>(one.size()) * sizeof(float));
  const Vector<float> x = Vector<float>::Random(cols);
  Vector<float> y(rows);
  std::size_t next = 0;
  for (auto _ : state) {
    y.noalias() = copies[next] * x;
    next = (next + 1) % copies.size();
    benchmark::DoNotOptimize(y.data());
  }
  state.SetBytesProcessed(state.iterations() * rows * cols * static_cast<Index>(sizeof(float)));
}

// y = W x through `kernel` (lowbit::gemv or lowbit::gemv_int8).
template <auto Kernel>
void gemv_benchmark(benchmark::State& state) {
  const Index rows = state.range(0), cols = state.range(1), group = state.range(3);
  const int bits = static_cast<int>(state.range(2));
  if (!use_isa(state, state.range(4))) return;
  const auto& one = quantized(rows, cols, bits, group);
  const bool cold = state.range(5) != 0;
  const std::vector<lowbit::QuantizedMatrix<float>>* copies = cold ? &cold_copies(one, one.packed_bytes()) : nullptr;
  const Vector<float> x = Vector<float>::Random(cols);
  Vector<float> y(rows);
  std::size_t next = 0;
  for (auto _ : state) {
    Kernel(cold ? (*copies)[next] : one, x, y);
    if (cold) next = (next + 1) % copies->size();
    benchmark::DoNotOptimize(y.data());
  }
  state.SetBytesProcessed(state.iterations() * static_cast<Index>(one.packed_bytes()));
  lowbit::set_isa(lowbit::best_isa());
}

void gemv_float(const lowbit::QuantizedMatrix<float>& W, const Vector<float>& x, Vector<float>& y) { lowbit::gemv(W, x, y); }
void gemv_int8(const lowbit::QuantizedMatrix<float>& W, const Vector<float>& x, Vector<float>& y) { lowbit::gemv_int8(W, x, y); }

void BM_Gemv(benchmark::State& state) { gemv_benchmark<gemv_float>(state); }
void BM_GemvInt8(benchmark::State& state) { gemv_benchmark<gemv_int8>(state); }

void BM_EigenGemm(benchmark::State& state) {
  const Index rows = state.range(0), cols = state.range(1), tokens = state.range(2);
  const Matrix<float> W_hat = quantized(rows, cols, 4, 64).dequantize();
  const Matrix<float> X = Matrix<float>::Random(tokens, cols);
  Matrix<float> Y(tokens, rows);
  for (auto _ : state) {
    Y.noalias() = X * W_hat.transpose();
    benchmark::DoNotOptimize(Y.data());
  }
  state.SetBytesProcessed(state.iterations() * rows * cols * static_cast<Index>(sizeof(float)));
  state.counters["tokens"] = static_cast<double>(tokens);
}

void BM_Matmul(benchmark::State& state) {
  const Index rows = state.range(0), cols = state.range(1), tokens = state.range(2), group = state.range(4);
  const int bits = static_cast<int>(state.range(3));
  if (!use_isa(state, state.range(5))) return;
  const auto& q = quantized(rows, cols, bits, group);
  const Matrix<float> X = Matrix<float>::Random(tokens, cols);
  Matrix<float> Y(tokens, rows);
  for (auto _ : state) {
    lowbit::matmul(q, X, Y);
    benchmark::DoNotOptimize(Y.data());
  }
  state.SetBytesProcessed(state.iterations() * static_cast<Index>(q.packed_bytes()));
  state.counters["tokens"] = static_cast<double>(tokens);
  lowbit::set_isa(lowbit::best_isa());
}

const std::vector<std::pair<Index, Index>> kShapes{{4096, 4096}, {11008, 4096}, {4096, 11008}};
// A width that does not end on a full 256-code block (16 blocks and a 64-code short
// block per row): what a row's tail costs each kernel, hot, 4-bit.
constexpr std::pair<Index, Index> kRaggedShape{1024, 4160};

void register_benchmarks() {
  for (const auto& [rows, cols] : kShapes) {
    benchmark::RegisterBenchmark("BM_EigenGemv", BM_EigenGemv)->Args({rows, cols})->Unit(benchmark::kMicrosecond)->UseRealTime();
    benchmark::RegisterBenchmark("BM_EigenGemvCold", BM_EigenGemvCold)->Args({rows, cols})->Unit(benchmark::kMicrosecond)->UseRealTime();
    for (Index cold : {0, 1})
      for (Index isa : {2, 1})
        for (Index bits : {2, 3, 4, 8})
          benchmark::RegisterBenchmark("BM_Gemv", BM_Gemv)->Args({rows, cols, bits, 64, isa, cold})->Unit(benchmark::kMicrosecond)->UseRealTime();
    for (Index cold : {0, 1})
      for (Index isa : {2, 1})
        for (Index bits : {2, 3, 4})
          benchmark::RegisterBenchmark("BM_GemvInt8", BM_GemvInt8)->Args({rows, cols, bits, 64, isa, cold})->Unit(benchmark::kMicrosecond)->UseRealTime();
    benchmark::RegisterBenchmark("BM_EigenGemm", BM_EigenGemm)->Args({rows, cols, 128})->Unit(benchmark::kMillisecond)->UseRealTime();
    for (Index isa : {2, 1})
      benchmark::RegisterBenchmark("BM_Matmul", BM_Matmul)->Args({rows, cols, 128, 4, 64, isa})->Unit(benchmark::kMillisecond)->UseRealTime();
  }
  const auto [rows, cols] = kRaggedShape;
  benchmark::RegisterBenchmark("BM_EigenGemv", BM_EigenGemv)->Args({rows, cols})->Unit(benchmark::kMicrosecond)->UseRealTime();
  for (Index isa : {2, 1}) {
    benchmark::RegisterBenchmark("BM_Gemv", BM_Gemv)->Args({rows, cols, 4, 64, isa, 0})->Unit(benchmark::kMicrosecond)->UseRealTime();
    benchmark::RegisterBenchmark("BM_GemvInt8", BM_GemvInt8)->Args({rows, cols, 4, 64, isa, 0})->Unit(benchmark::kMicrosecond)->UseRealTime();
  }
}

// Collects the reported runs and prints the ratio table once all have run.
class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.error_occurred) continue;
      if (run.run_type == Run::RT_Aggregate && run.aggregate_name != "median") continue;
      const std::string name = run.run_name.str();
      const double seconds = run.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(run.time_unit);
      const auto bytes = run.counters.find("bytes_per_second");
      Result& r = results_[name];
      r.seconds = seconds;
      r.bytes_per_second = bytes == run.counters.end() ? 0 : static_cast<double>(bytes->second);
      const auto tokens = run.counters.find("tokens");
      r.tokens = tokens == run.counters.end() ? 1 : static_cast<double>(tokens->second);
    }
  }

  void Finalize() override {
    ConsoleReporter::Finalize();
    double stream = 0;
    for (const auto& [name, r] : results_)
      if (name.rfind("BM_StreamRead", 0) == 0) stream = r.bytes_per_second;
    std::printf("\nSummary (threads %d, streaming read %.1f GB/s)\n", lowbit::num_threads(), stream / 1e9);
    std::printf("%-44s %10s %12s %8s %9s %11s\n", "run", "ms", "ms/token", "GB/s", "% stream", "vs Eigen");
    for (const auto& [name, r] : results_) {
      const bool gemv = name.rfind("BM_Gemv/", 0) == 0 || name.rfind("BM_GemvInt8/", 0) == 0;
      const bool matmul = name.rfind("BM_Matmul/", 0) == 0;
      if (!gemv && !matmul) continue;
      const std::string shape = shape_of(name);
      const bool cold = gemv && name.find("/1/real_time") != std::string::npos;
      const std::string baseline = gemv ? (cold ? "BM_EigenGemvCold/" : "BM_EigenGemv/") + shape + "/real_time"
                                        : "BM_EigenGemm/" + shape + "/" + std::to_string(static_cast<int>(r.tokens)) + "/real_time";
      const auto base = results_.find(baseline);
      const double ratio = base == results_.end() ? 0 : base->second.seconds / r.seconds;
      std::printf("%-44s %10.3f %12.4f %8.2f %8.0f%% %10.2fx\n", name.c_str(), r.seconds * 1e3, r.seconds * 1e3 / r.tokens,
                  r.bytes_per_second / 1e9, cold && stream > 0 ? 100 * r.bytes_per_second / stream : 0.0, ratio);
    }
    for (const auto& [name, r] : results_)
      if (name.rfind("BM_Eigen", 0) == 0)
        std::printf("%-44s %10.3f %12.4f %8.2f\n", name.c_str(), r.seconds * 1e3, r.seconds * 1e3 / r.tokens,
                    r.bytes_per_second / 1e9);
  }

 private:
  struct Result {
    double seconds = 0, bytes_per_second = 0, tokens = 1;
  };

  // "BM_Gemv/4096/4096/4/64/2/real_time" -> "4096/4096"
  static std::string shape_of(const std::string& name) {
    const auto first = name.find('/');
    const auto second = name.find('/', first + 1);
    const auto third = name.find('/', second + 1);
    return name.substr(first + 1, third - first - 1);
  }

  std::map<std::string, Result> results_;
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_benchmarks();
  SummaryReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}

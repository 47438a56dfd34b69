// Pack, unpack and dequantize throughput per bit width and ISA, beside a memcpy of the
// same output bytes in the same binary (the yardstick RESULTS.md ratios use).
//
//   OMP_NUM_THREADS=1 ./pack_bench        (dequantize and memcpy use OpenMP threads)
#include <benchmark/benchmark.h>

#include <cstring>
#include <lowbit/lowbit.hpp>
#include <random>
#include <vector>

namespace {

using lowbit::Index;

constexpr Index kCols = 4096;
// rows: 32 (512 KiB of float output, L2-resident) and 4096 (64 MiB, DRAM).
const std::vector<int64_t> kRows = {32, 4096};

lowbit::QuantizedMatrix<float> random_quantized(Index rows, int bits, Index group_size) {
  std::mt19937 rng(42);
  lowbit::Matrix<float> W(rows, kCols);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (Index i = 0; i < W.size(); ++i) W.data()[i] = normal(rng);
  return lowbit::RTN<float>(lowbit::QuantSpec{.bits = bits, .group_size = group_size}).quantize(W);
}

void set_isa_or_skip(benchmark::State& state, lowbit::Isa isa) {
  if (!lowbit::isa_supported(isa)) state.SkipWithError("ISA not supported on this CPU");
  else lowbit::set_isa(isa);
}

// The yardstick: copy rows*cols floats, split by rows across the same threads.
void BM_Memcpy(benchmark::State& state) {
  const Index rows = state.range(0);
  std::vector<float> source(static_cast<std::size_t>(rows * kCols), 1.0f), target(source.size());
  for (auto _ : state) {
    lowbit::detail::parallel_for(rows, [&](Index r) {
      std::memcpy(target.data() + r * kCols, source.data() + r * kCols, kCols * sizeof(float));
    });
    benchmark::DoNotOptimize(target.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * rows * kCols * static_cast<int64_t>(sizeof(float)));
}
BENCHMARK(BM_Memcpy)->ArgsProduct({kRows})->ArgNames({"rows"})->UseRealTime();

// Dequantize rows x 4096, group 64, into caller storage: output bytes per second.
void BM_Dequantize(benchmark::State& state) {
  const Index rows = state.range(0);
  const int bits = static_cast<int>(state.range(1));
  set_isa_or_skip(state, static_cast<lowbit::Isa>(state.range(2)));
  const auto q = random_quantized(rows, bits, 64);
  lowbit::Matrix<float> out(rows, kCols);
  for (auto _ : state) {
    q.dequantize(out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * rows * kCols * static_cast<int64_t>(sizeof(float)));
  lowbit::set_isa(lowbit::best_isa());
}
BENCHMARK(BM_Dequantize)
    ->ArgsProduct({kRows, {2, 3, 4, 8}, {0, 1, 2}})
    ->ArgNames({"rows", "bits", "isa"})
    ->UseRealTime();

// Pack and unpack of rows x 4096 codes, one thread: code bytes per second.
void BM_Pack(benchmark::State& state) {
  const Index rows = state.range(0);
  const int bits = static_cast<int>(state.range(1));
  const auto isa = static_cast<lowbit::Isa>(state.range(2));
  set_isa_or_skip(state, isa);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(rows * kCols));
  std::mt19937 rng(1);
  for (auto& c : codes) c = static_cast<std::uint8_t>(rng() & ((1u << bits) - 1));
  const Index row_bytes = lowbit::detail::packed_row_bytes(kCols, bits);
  std::vector<std::uint8_t> packed(static_cast<std::size_t>(rows * row_bytes));
  for (auto _ : state) {
    for (Index r = 0; r < rows; ++r)
      lowbit::detail::pack_row(codes.data() + r * kCols, kCols, bits, packed.data() + r * row_bytes, isa);
    benchmark::DoNotOptimize(packed.data());
  }
  state.SetBytesProcessed(state.iterations() * rows * kCols);
}
BENCHMARK(BM_Pack)->ArgsProduct({{32}, {2, 3, 4, 8}, {0, 1, 2}})->ArgNames({"rows", "bits", "isa"});

void BM_Unpack(benchmark::State& state) {
  const Index rows = state.range(0);
  const int bits = static_cast<int>(state.range(1));
  const auto isa = static_cast<lowbit::Isa>(state.range(2));
  set_isa_or_skip(state, isa);
  const auto q = random_quantized(rows, bits, 64);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(rows * kCols));
  for (auto _ : state) {
    for (Index r = 0; r < rows; ++r)
      lowbit::detail::unpack_row(q.packed_row(r), kCols, bits, codes.data() + r * kCols, isa);
    benchmark::DoNotOptimize(codes.data());
  }
  state.SetBytesProcessed(state.iterations() * rows * kCols);
}
BENCHMARK(BM_Unpack)->ArgsProduct({{32}, {2, 3, 4, 8}, {0, 1, 2}})->ArgNames({"rows", "bits", "isa"});

}  // namespace

BENCHMARK_MAIN();

// QLLM timings on the fixture layer (W 512x1024, 2048 calibration tokens, 512 held-out
// tokens): quantize() end to end and its parts, and the cost of the channel map and the
// low-rank side term in QuantizedLayer::forward. Run with OMP_NUM_THREADS=1 and =2.
#include <benchmark/benchmark.h>

#include <fstream>
#include <stdexcept>
#include <string>

#include "lowbit/quantizers/qllm.hpp"
#include "lowbit/quantizers/rtn.hpp"

namespace {

using lowbit::Index;
using lowbit::Matrix;

Matrix<float> load(const std::string& name, Index rows, Index cols) {
  std::ifstream in(std::string(LOWBIT_FIXTURE_DIR) + "/" + name, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + name);
  Matrix<float> m(rows, cols);
  in.read(reinterpret_cast<char*>(m.data()), static_cast<std::streamsize>(m.size() * sizeof(float)));
  return m;
}

struct Fixture {
  Matrix<float> W = load("W_512x1024.f32", 512, 1024);
  Matrix<float> X = load("X_2048x1024.f32", 2048, 1024);
  Matrix<float> Xeval = load("Xeval_512x1024.f32", 512, 1024);
};

const Fixture& fixture() {
  static const Fixture f;
  return f;
}

lowbit::QLLMOptions<float> w4a4() { return {.weight = {.bits = 4, .group_size = 0}, .activation = lowbit::QuantSpec{.bits = 4, .group_size = 0}}; }

void quantize_with(benchmark::State& state, lowbit::QLLMOptions<float> options) {
  const Fixture& f = fixture();
  for (auto _ : state) {
    lowbit::QLLM<float> qllm(options);
    qllm.calibrate(f.X);
    auto layer = qllm.quantize(f.W);
    benchmark::DoNotOptimize(layer.weights.packed_bytes());
  }
}

// Reassembly search (6 candidates) + closed-form low rank + 10 AdamW epochs.
void BM_QllmQuantizeW4A4(benchmark::State& state) { quantize_with(state, w4a4()); }
// The theta search alone.
void BM_QllmReassemblyOnly(benchmark::State& state) {
  auto o = w4a4();
  o.rank = 0;
  quantize_with(state, o);
}
// The low-rank step alone (closed form + 10 epochs), no reassembly.
void BM_QllmLowRankOnly(benchmark::State& state) {
  auto o = w4a4();
  o.extra_channel_ratios = {};
  quantize_with(state, o);
}
// Plain min-max W4: the baseline's quantization cost.
void BM_RtnW4PerChannel(benchmark::State& state) {
  const Fixture& f = fixture();
  for (auto _ : state) benchmark::DoNotOptimize(lowbit::RTN<float>(lowbit::QuantSpec{.bits = 4, .group_size = 0}).quantize(f.W).packed_bytes());
}

const lowbit::QuantizedLayer<float>& qllm_layer() {
  static const lowbit::QuantizedLayer<float> layer = [] {
    lowbit::QLLM<float> qllm(w4a4());
    qllm.calibrate(fixture().X);
    return qllm.quantize(fixture().W);
  }();
  return layer;
}

void BM_ChannelMapApply(benchmark::State& state) {
  const auto& map = qllm_layer().channel_map;
  for (auto _ : state) benchmark::DoNotOptimize(map.apply(fixture().Xeval).data());
  state.SetItemsProcessed(state.iterations() * fixture().Xeval.rows());
}

// forward() on the 512 held-out tokens: plain W4A4 layer vs the QLLM layer (map + side term).
void BM_ForwardPlainW4A4(benchmark::State& state) {
  lowbit::QuantizedLayer<float> plain;
  plain.weights = lowbit::RTN<float>(lowbit::QuantSpec{.bits = 4, .group_size = 0}).quantize(fixture().W);
  plain.activation = lowbit::QuantSpec{.bits = 4, .group_size = 0};
  for (auto _ : state) benchmark::DoNotOptimize(plain.forward(fixture().Xeval).data());
  state.SetItemsProcessed(state.iterations() * fixture().Xeval.rows());
}
void BM_ForwardQllmW4A4(benchmark::State& state) {
  const auto& layer = qllm_layer();
  for (auto _ : state) benchmark::DoNotOptimize(layer.forward(fixture().Xeval).data());
  state.SetItemsProcessed(state.iterations() * fixture().Xeval.rows());
}

BENCHMARK(BM_QllmQuantizeW4A4)->Unit(benchmark::kMillisecond)->Iterations(1);
BENCHMARK(BM_QllmReassemblyOnly)->Unit(benchmark::kMillisecond)->Iterations(1);
BENCHMARK(BM_QllmLowRankOnly)->Unit(benchmark::kMillisecond)->Iterations(1);
BENCHMARK(BM_RtnW4PerChannel)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ChannelMapApply)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ForwardPlainW4A4)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ForwardQllmW4A4)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();

// llama2c_bench: decode and prefill speed of the real llama2.c model, float against
// lowbit's packed weights, and the time of each projection shape alone (where a tiny
// model spends its decode time).
//
//   LOWBIT_LLAMA2C_DIR=DIR llama2c_bench [--benchmark_filter=...]
//
// Names: Decode/<weights> is one token of Session::step, averaged over positions
// 0..255; Prefill/<weights> one 256-token forward(); Projection/<name>/<weights> one
// y = W x of layer 0's projection (float: Eigen; packed: lowbit::gemv); Square/<n>/...
// one y = W x of a random n x n matrix, to show at what size packed weights start to
// pay (this model's are all below it).
#include <benchmark/benchmark.h>

#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "llama2c/methods.hpp"
#include "llama2c/model_files.hpp"
#include "llama2c/quantize.hpp"

namespace {

using namespace llama2c;

struct Setup {
  Weights weights;
  Sequence tokens;  // 256 tokens of the evaluation text (calibration lines)
  std::vector<Sequence> calibration;
};

const Setup& setup() {
  static const Setup s = [] {
    Eigen::setNbThreads(1);
    const ModelFiles files = ModelFiles::in(model_dir(LLAMA2C_MODEL_DIR));
    Setup out;
    out.weights = load_checkpoint(files.checkpoint);
    const Tokenizer tokenizer = Tokenizer::load(files.tokenizer, out.weights.config.vocab_size);
    const TextSplit split = split_lines(read_lines(files.text), 6);
    out.calibration = encode_lines(tokenizer, split.calibration, out.weights.config.seq_len);
    for (const Sequence& line : out.calibration)
      for (int token : line)
        if (out.tokens.size() < 256) out.tokens.push_back(token);
    return out;
  }();
  return s;
}

// The models benchmarked, built once: name -> model.
const Transformer& model(const std::string& name) {
  static std::map<std::string, Transformer> models;
  if (auto it = models.find(name); it != models.end()) return it->second;
  const Setup& s = setup();
  const std::map<std::string, std::function<Method()>> methods = {
      {"rtn4_g32", [] { return rtn({.bits = 4, .group_size = 32}); }},
      {"rtn4_g64", [] { return rtn({.bits = 4, .group_size = 64}); }},
      {"gptq4_g32_act_order", [] { return gptq({.bits = 4, .group_size = 32}, {.act_order = true}); }},
      {"rtn3_g32", [] { return rtn({.bits = 3, .group_size = 32}); }},
      {"rtn2_g32", [] { return rtn({.bits = 2, .group_size = 32}); }},
      {"rtn8_g64", [] { return rtn({.bits = 8, .group_size = 64}); }},
      {"omniquant4_g32", [] { return omniquant({.bits = 4, .group_size = 32}); }},
      {"qllm4_g32", [] { return qllm({.bits = 4, .group_size = 32}); }},
  };
  if (name == "float") return models.emplace(name, Transformer(s.weights)).first->second;
  return models.emplace(name, quantize_model(s.weights, methods.at(name)(), s.calibration).model).first->second;
}

const char* const kModels[] = {"float",    "rtn8_g64", "rtn4_g32",       "rtn4_g64", "gptq4_g32_act_order",
                               "rtn3_g32", "rtn2_g32", "omniquant4_g32", "qllm4_g32"};

void decode(benchmark::State& state, const std::string& name) {
  const Transformer& m = model(name);
  const Sequence& tokens = setup().tokens;
  auto session = m.session();
  std::size_t t = 0;
  for (auto _ : state) {
    if (t == tokens.size()) {
      session.reset();
      t = 0;
    }
    benchmark::DoNotOptimize(session.step(tokens[t++]).data());
  }
  state.SetItemsProcessed(state.iterations());  // tokens
}

void prefill(benchmark::State& state, const std::string& name) {
  const Transformer& m = model(name);
  const Sequence& tokens = setup().tokens;
  for (auto _ : state) benchmark::DoNotOptimize(m.forward(tokens).data());
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(tokens.size()));
}

void projection(benchmark::State& state, const std::string& name, const std::string& projection_name) {
  const Layer& layer = model(name).layers().front();
  const Linear* linear = nullptr;
  layer.for_each_linear([&](const char* n, const Linear& l) {
    if (projection_name == n) linear = &l;
  });
  const VectorF x = VectorF::Random(linear->in_features());
  VectorF y(linear->out_features());
  for (auto _ : state) {
    linear->apply_token(x, y);
    benchmark::DoNotOptimize(y.data());
  }
}

// y = W x of a random n x n matrix, float (Eigen) or 4-bit g64 (lowbit::gemv).
void square(benchmark::State& state, bool packed) {
  const Index n = state.range(0);
  const MatrixF W = MatrixF::Random(n, n);
  const Linear linear = packed ? Linear(lowbit::RTN<float>(lowbit::QuantSpec{.bits = 4, .group_size = 64}).quantize(W))
                               : Linear(W);
  const VectorF x = VectorF::Random(n);
  VectorF y(n);
  for (auto _ : state) {
    linear.apply_token(x, y);
    benchmark::DoNotOptimize(y.data());
  }
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(linear.bytes()));
}

const bool kRegistered = [] {
  for (const char* name : kModels) {
    benchmark::RegisterBenchmark((std::string("Decode/") + name).c_str(), decode, std::string(name));
    benchmark::RegisterBenchmark((std::string("Prefill/") + name).c_str(), prefill, std::string(name));
  }
  for (const char* p : {"wq", "wk", "w1", "w2"})
    for (const char* name : {"float", "rtn4_g32", "rtn4_g64", "gptq4_g32_act_order", "omniquant4_g32", "qllm4_g32"})
      benchmark::RegisterBenchmark((std::string("Projection/") + p + "/" + name).c_str(), projection, std::string(name),
                                   std::string(p));
  benchmark::RegisterBenchmark("Square/float", square, false)->RangeMultiplier(4)->Range(64, 4096);
  benchmark::RegisterBenchmark("Square/rtn4_g64", square, true)->RangeMultiplier(4)->Range(64, 4096);
  return true;
}();

}  // namespace

BENCHMARK_MAIN();

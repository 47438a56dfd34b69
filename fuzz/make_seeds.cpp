// Writes the seed corpora of the fuzz targets: small valid files of each format, one
// directory per target (DIR/<target>/), so each fuzzer starts from inputs that reach
// deep into its reader.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "llama2c/checkpoint.hpp"
#include "lowbit/io/gptq_format.hpp"
#include "lowbit/io/hqq_format.hpp"
#include "lowbit/io/lowbit_format.hpp"
#include "lowbit/quantizers/rtn.hpp"

namespace {

namespace fs = std::filesystem;

// Reads a file back (the writers only write to paths).
std::vector<char> slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const fs::path& path, const std::vector<char>& prefix, const std::vector<char>& body) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(prefix.data(), static_cast<std::streamsize>(prefix.size()));
  out.write(body.data(), static_cast<std::streamsize>(body.size()));
}

// A tiny llama2.c model: every tensor kind present, a few hundred floats in all.
llama2c::Weights tiny_model(bool shared) {
  llama2c::Weights w;
  w.config = {.dim = 8, .hidden_dim = 12, .n_layers = 2, .n_heads = 2, .n_kv_heads = 1, .vocab_size = 10,
              .seq_len = 4, .shared_classifier = shared};
  const auto& c = w.config;
  const auto m = [](lowbit::Index rows, lowbit::Index cols) { return llama2c::MatrixF::Random(rows, cols).eval(); };
  w.token_embedding = m(c.vocab_size, c.dim);
  for (int l = 0; l < c.n_layers; ++l) {
    llama2c::LayerWeights layer;
    layer.rms_att = llama2c::VectorF::Ones(c.dim);
    layer.rms_ffn = llama2c::VectorF::Ones(c.dim);
    layer.wq = m(c.dim, c.dim);
    layer.wk = m(c.kv_dim(), c.dim);
    layer.wv = m(c.kv_dim(), c.dim);
    layer.wo = m(c.dim, c.dim);
    layer.w1 = m(c.hidden_dim, c.dim);
    layer.w2 = m(c.dim, c.hidden_dim);
    layer.w3 = m(c.hidden_dim, c.dim);
    w.layers.push_back(std::move(layer));
  }
  w.rms_final = llama2c::VectorF::Ones(c.dim);
  if (!shared) w.classifier = m(c.vocab_size, c.dim);
  return w;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const fs::path dir = argv[1];
  for (const char* target :
       {"safetensors_fuzz", "lowbit_format_fuzz", "hqq_format_fuzz", "gptq_format_fuzz", "llama2c_checkpoint_fuzz"})
    fs::create_directories(dir / target);
  const fs::path scratch = dir / "scratch.safetensors";
  int n = 0;
  // Writes one safetensors seed to the generic reader's corpus and to `target`'s.
  const auto add_seed = [&](const char* target, const std::vector<char>& prefix, auto&& fill) {
    {
      lowbit::SafeTensorsWriter w(scratch.string());
      fill(w);
      w.commit();
    }
    const auto body = slurp(scratch);
    const std::string name = "seed" + std::to_string(n++);
    write_bytes(dir / "safetensors_fuzz" / name, {}, body);
    write_bytes(dir / target / name, prefix, body);
  };
  for (int bits : {2, 3, 4, 8})
    for (lowbit::Index group_size : {32, 64}) {
      const lowbit::QuantSpec spec{.bits = bits, .group_size = group_size, .integral_zero = true,
                                   .param_type = lowbit::ParamType::Float16};
      const auto q = lowbit::RTN<float>(spec).quantize(lowbit::Matrix<float>::Random(32, 64));
      add_seed("lowbit_format_fuzz", {}, [&](lowbit::SafeTensorsWriter& w) {
        lowbit::lowbit_format::save(w, "m", q);
        w.set_metadata("format", "pt");
      });
      add_seed("hqq_format_fuzz", {}, [&](lowbit::SafeTensorsWriter& w) { lowbit::hqq_format::save(w, "l", q); });
      // gptq_format_fuzz's first byte encodes the config (see gptq_format_fuzz.cpp).
      const int bits_index = bits == 2 ? 0 : bits == 3 ? 1 : bits == 4 ? 2 : 3;
      const int group_index = group_size == 32 ? 4 : 5;
      const std::vector<char> config_byte = {static_cast<char>(bits_index | group_index << 2)};
      add_seed("gptq_format_fuzz", config_byte, [&](lowbit::SafeTensorsWriter& w) { lowbit::gptq_format::save(w, "l", q); });
    }
  // A permuted (act-order) matrix and an output-axis one.
  {
    lowbit::QuantSpec spec{.bits = 3, .group_size = 16};
    auto q = lowbit::RTN<float>(spec).quantize(lowbit::Matrix<float>::Random(8, 48));
    std::vector<std::int32_t> permutation(48);
    for (int i = 0; i < 48; ++i) permutation[static_cast<std::size_t>(i)] = (i * 7) % 48;
    q.set_permutation(permutation);
    add_seed("lowbit_format_fuzz", {}, [&](lowbit::SafeTensorsWriter& w) { lowbit::lowbit_format::save(w, "p", q); });
    spec.group_axis = lowbit::GroupAxis::Output;
    const auto t = lowbit::RTN<float>(spec).quantize(lowbit::Matrix<float>::Random(16, 40));
    add_seed("lowbit_format_fuzz", {}, [&](lowbit::SafeTensorsWriter& w) { lowbit::lowbit_format::save(w, "t", t); });
  }
  fs::remove(scratch);
  for (bool shared : {true, false})
    for (auto format : {llama2c::CheckpointFormat::Legacy, llama2c::CheckpointFormat::V1}) {
      const auto bytes = llama2c::serialize_checkpoint(tiny_model(shared), format);
      std::ofstream out(dir / "llama2c_checkpoint_fuzz" / ("seed" + std::to_string(n++)), std::ios::binary);
      out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    }
  return 0;
}

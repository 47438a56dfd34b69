// lowbit-quantize end to end: a model-shaped safetensors file made here (several layers,
// F16 and BF16 weights, norms and embeddings) quantized by the command into every
// format and bit width, re-loaded and compared with the library's own quantization;
// every refusal; and runs of the built program as a separate process.
#include "../examples/lowbit-quantize/quantize_tool.hpp"

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdlib>

#include "io/io_test_util.hpp"
#include "test_util.hpp"

namespace lowbit {
namespace {

using test::expect_error;

constexpr Index kHidden = 64, kInter = 96;

// What a float matrix reads back as after being stored as `dtype`.
Matrix<float> stored_as(const Matrix<float>& m, DType dtype) {
  if (dtype == DType::F16) return m.unaryExpr([](float x) { return static_cast<float>(Eigen::half(x)); });
  if (dtype == DType::BF16) return m.unaryExpr([](float x) { return static_cast<float>(Eigen::bfloat16(x)); });
  return m;
}

// A small decoder: embeddings, `layers` blocks of attention (F16) and MLP (BF16)
// projections with norms, a final norm and lm_head.
std::map<std::string, Matrix<float>> write_model(const std::string& path, int layers, std::uint64_t seed = 1) {
  std::map<std::string, Matrix<float>> weights;
  SafeTensorsWriter writer(path);
  auto add = [&](const std::string& name, Index rows, Index cols, DType dtype) {
    Matrix<float> m = test::random_matrix<float>(rows, cols, seed++, 0.02);
    writer.add_matrix(name, m, dtype);
    weights[name] = stored_as(m, dtype);
  };
  add("model.embed_tokens.weight", 50, kHidden, DType::F16);
  for (int l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (const char* proj : {"q_proj", "k_proj", "v_proj", "o_proj"}) add(p + "self_attn." + proj + ".weight", kHidden, kHidden, DType::F16);
    add(p + "mlp.gate_proj.weight", kInter, kHidden, DType::BF16);
    add(p + "mlp.up_proj.weight", kInter, kHidden, DType::BF16);
    add(p + "mlp.down_proj.weight", kHidden, kInter, DType::BF16);
    const std::vector<float> ones(kHidden, 1.0f);
    writer.add(lowbit::detail::float_tensor(p + "input_layernorm.weight", DType::F32, {kHidden}, ones));
  }
  add("lm_head.weight", 50, kHidden, DType::F16);
  writer.set_metadata("format", "pt");
  writer.set_metadata("source", "lowbit test");
  writer.commit();
  return weights;
}

struct ToolRun {
  int code;
  std::string out, err;
};

ToolRun run_tool(tool::Options options) {
  std::ostringstream out, err;
  const int code = tool::run(options, out, err, false);
  return {code, out.str(), err.str()};
}

tool::Options options_for(const std::string& input, const std::string& output, const std::string& format, int bits,
                          Index group_size = 32) {
  tool::Options o;
  o.input = input;
  o.output = output;
  o.format = format;
  o.bits = bits;
  o.group_size = group_size;
  return o;
}

bool is_default_weight(const std::string& name) {
  return name.find("_proj.weight") != std::string::npos;
}

// The spec the command uses for a format.
QuantSpec spec_for(const std::string& format, int bits, Index group_size) {
  QuantSpec spec{.bits = bits, .group_size = group_size, .param_type = ParamType::Float16};
  spec.integral_zero = format == "gptq";
  return spec;
}

QuantizedMatrix<float> load_any(const SafeTensors& file, const std::string& format, const std::string& module,
                                const gptq_format::Config& config) {
  if (format == "lowbit") return lowbit_format::load<float>(file, module);
  if (format == "hqq") return hqq_format::load<float>(file, module);
  return gptq_format::load<float>(file, module, config);
}

class EveryFormatAndWidth : public testing::TestWithParam<std::tuple<std::string, int>> {};

// The command's output re-loads to exactly what the library's RTN makes of each weight,
// every other tensor is copied byte for byte, and metadata is kept.
TEST_P(EveryFormatAndWidth, QuantizesTheModelAndReloadsExactly) {
  const auto [format, bits] = GetParam();
  test::ScratchDir dir;
  const auto weights = write_model(dir.file("model.safetensors"), 1);
  const ToolRun run = run_tool(options_for(dir.file("model.safetensors"), dir.file("out.safetensors"), format, bits));
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_TRUE(run.err.empty()) << run.err;
  EXPECT_NE(run.out.find("model.layers.0.mlp.down_proj.weight"), std::string::npos) << run.out;
  EXPECT_NE(run.out.find("quantized 7 tensors"), std::string::npos) << run.out;

  const auto input = SafeTensors::open(dir.file("model.safetensors"));
  const auto output = SafeTensors::open(dir.file("out.safetensors"));
  EXPECT_EQ(output.metadata().at("source"), "lowbit test");
  EXPECT_EQ(output.metadata().at("format"), "pt");
  gptq_format::Config config;
  if (format == "gptq") {
    config = gptq_format::Config::read(dir.file("quantize_config.json"));
    EXPECT_EQ(config.bits, bits);
    EXPECT_EQ(config.group_size, 32);
    EXPECT_FALSE(config.desc_act);
    EXPECT_EQ(config.model_file_base_name, "out");
  } else {
    EXPECT_FALSE(std::filesystem::exists(dir.file("quantize_config.json")));
  }
  const QuantSpec spec = spec_for(format, bits, 32);
  for (const auto& [name, W] : weights) {
    if (!is_default_weight(name)) {
      ASSERT_TRUE(output.contains(name)) << name;
      EXPECT_TRUE(std::ranges::equal(output.bytes(name), input.bytes(name))) << name;
      continue;
    }
    EXPECT_FALSE(output.contains(name)) << name;
    const std::string module = name.substr(0, name.size() - 7);
    const auto loaded = load_any(output, format, module, config);
    const auto expected = RTN<float>(spec).quantize(W);
    EXPECT_TRUE(loaded == expected) << name;
    EXPECT_LT(test::rel_fro(W, loaded.dequantize()), bits >= 4 ? 0.15 : 0.7) << name;
  }
  for (const auto& t : input.tensors()) {  // norms are copied too
    if (t.rank() == 1) {
      EXPECT_TRUE(output.contains(t.name)) << t.name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, EveryFormatAndWidth,
                         testing::Combine(testing::Values("lowbit", "hqq", "gptq"), testing::Values(2, 3, 4, 8)),
                         [](const auto& info) { return std::get<0>(info.param) + std::to_string(std::get<1>(info.param)); });

TEST(LowbitQuantize, ShardedInputEqualsSingleFile) {
  test::ScratchDir dir;
  const auto weights = write_model(dir.file("single.safetensors"), 2);
  // Split the same tensors over two shards with an index.
  const auto single = SafeTensors::open(dir.file("single.safetensors"));
  std::filesystem::create_directory(dir.file("sharded"));
  SafeTensorsWriter a(dir.file("sharded/model-00001-of-00002.safetensors")), b(dir.file("sharded/model-00002-of-00002.safetensors"));
  nlohmann::json map;
  int i = 0;
  for (const auto& t : single.tensors()) {
    auto& w = (i++ % 2 == 0) ? a : b;
    const auto bytes = single.bytes(t);
    w.add(t.name, t.dtype, t.shape, std::vector<std::uint8_t>(bytes.begin(), bytes.end()));
    map[t.name] = (&w == &a) ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  a.set_metadata("source", "lowbit test");
  a.commit();
  b.commit();
  std::ofstream(dir.file("sharded/model.safetensors.index.json")) << nlohmann::json{{"metadata", {{"total_size", 1}}}, {"weight_map", map}};

  ASSERT_EQ(run_tool(options_for(dir.file("single.safetensors"), dir.file("one.safetensors"), "lowbit", 4)).code, 0);
  const ToolRun sharded = run_tool(options_for(dir.file("sharded"), dir.file("two.safetensors"), "lowbit", 4));
  ASSERT_EQ(sharded.code, 0) << sharded.err;
  const auto one = SafeTensors::open(dir.file("one.safetensors")), two = SafeTensors::open(dir.file("two.safetensors"));
  ASSERT_EQ(one.tensors().size(), two.tensors().size());
  for (const auto& t : one.tensors()) EXPECT_TRUE(std::ranges::equal(one.bytes(t), two.bytes(t.name))) << t.name;
}

TEST(LowbitQuantize, GlobsChooseTheTensors) {
  test::ScratchDir dir;
  write_model(dir.file("m.safetensors"), 1);
  auto o = options_for(dir.file("m.safetensors"), dir.file("o.safetensors"), "lowbit", 4);
  o.include = {"*mlp*", "lm_head.weight"};
  o.exclude = {"*down_proj*"};
  const ToolRun run = run_tool(o);
  ASSERT_EQ(run.code, 0) << run.err;
  const auto out = SafeTensors::open(dir.file("o.safetensors"));
  EXPECT_TRUE(out.contains("model.layers.0.mlp.gate_proj.codes"));
  EXPECT_TRUE(out.contains("lm_head.codes"));
  EXPECT_TRUE(out.contains("model.layers.0.mlp.down_proj.weight"));  // excluded: copied
  EXPECT_TRUE(out.contains("model.layers.0.self_attn.q_proj.weight"));  // not included: copied
  EXPECT_EQ(lowbit_format::matrix_names(out).size(), 3u);
}

TEST(LowbitQuantize, DryRunListsAndWritesNothing) {
  test::ScratchDir dir;
  write_model(dir.file("m.safetensors"), 1);
  auto o = options_for(dir.file("m.safetensors"), dir.file("o.safetensors"), "gptq", 4);
  o.dry_run = true;
  const ToolRun run = run_tool(o);
  ASSERT_EQ(run.code, 0) << run.err;
  EXPECT_NE(run.out.find("model.layers.0.mlp.up_proj.weight"), std::string::npos);
  EXPECT_NE(run.out.find("would quantize 7 of 10 tensors"), std::string::npos) << run.out;
  EXPECT_EQ(dir.entries(), std::set<std::string>{"m.safetensors"});
}

// Every refusal: exit code 1, one line naming the problem, and no output file.
TEST(LowbitQuantize, RefusalsLeaveNoOutput) {
  test::ScratchDir dir;
  write_model(dir.file("m.safetensors"), 1);
  const std::string in = dir.file("m.safetensors"), out = dir.file("o.safetensors");
  auto refuse = [&](tool::Options o, const std::string& fragment) {
    const auto before = test::read_file(in);
    const ToolRun run = run_tool(o);
    EXPECT_EQ(run.code, 1) << fragment;
    EXPECT_NE(run.err.find(fragment), std::string::npos) << run.err;
    EXPECT_EQ(std::count(run.err.begin(), run.err.end(), '\n'), 1) << run.err;
    EXPECT_EQ(run.err.rfind("lowbit-quantize: ", 0), 0u) << run.err;
    EXPECT_FALSE(std::filesystem::exists(out)) << fragment;
    EXPECT_FALSE(std::filesystem::exists(dir.file("quantize_config.json"))) << fragment;
    EXPECT_EQ(test::read_file(in), before);
  };
  refuse(options_for(in, in, "lowbit", 4), "refusing to overwrite the input");
  refuse(options_for(in, out, "lowbit", 9), "--bits 9");
  refuse(options_for(in, out, "lowbit", 4, -1), "--group-size -1");
  refuse(options_for(in, out, "gguf", 4), "--format gguf");
  refuse(options_for(in, out, "hqq", 5), "bits = 5");
  refuse(options_for(dir.file("missing.safetensors"), out, "lowbit", 4), "does not exist");
  auto o = options_for(in, out, "lowbit", 4);
  o.method = "awq";
  refuse(o, "--method awq");
  o.method = "gptq";
  refuse(o, "--method gptq");  // no calibration (or not in this build)
  o.method = "qllm";
  refuse(o, "qllm");
  o = options_for(in, out, "lowbit", 4);
  o.calibration = in;
  refuse(o, "--calibration is used by");
  o = options_for(in, out, "gptq", 3, 32);
  o.include = {"model.embed_tokens.weight"};  // 50 rows: 50*3 bits do not fill int32 words
  refuse(o, "out_features = 50");
  o = options_for(in, out, "lowbit", 4);
  o.include = {"*input_layernorm*"};
  refuse(o, "only non-empty 2-D float tensors");
  o.include = {"nothing*"};
  refuse(o, "no tensor selected");
  o = options_for(in, out, "gptq", 4);
  o.param_type = "f32";
  refuse(o, "--param-type f16");

  // A name the output needs is taken by an input tensor.
  {
    SafeTensorsWriter w(dir.file("clash.safetensors"));
    w.add_matrix("a.q_proj.weight", Matrix<float>::Ones(4, 32));
    w.add_matrix("a.q_proj.codes", Matrix<float>::Ones(1, 1));
    w.commit();
  }
  refuse(options_for(dir.file("clash.safetensors"), out, "lowbit", 4), "'a.q_proj.codes' declared twice");
  // A malformed input.
  test::write_file(dir.file("bad.safetensors"), test::raw_safetensors("{\"a\":1}", {}));
  refuse(options_for(dir.file("bad.safetensors"), out, "lowbit", 4), "tensor 'a'");
}

// A failure after some tensors were written (a NaN in the third weight) removes the
// partial output: nothing appears under the output name, no temporary is left.
TEST(LowbitQuantize, FailingHalfwayLeavesNoOutput) {
  test::ScratchDir dir;
  {
    SafeTensorsWriter w(dir.file("m.safetensors"));
    for (int l = 0; l < 4; ++l) {
      Matrix<float> m = test::random_matrix<float>(32, 64, static_cast<std::uint64_t>(l));
      if (l == 2) m(3, 5) = NAN;
      w.add_matrix("layers." + std::to_string(l) + ".o_proj.weight", m, DType::BF16);
    }
    w.commit();
  }
  for (const char* format : {"lowbit", "hqq", "gptq"}) {
    const ToolRun run = run_tool(options_for(dir.file("m.safetensors"), dir.file("o.safetensors"), format, 4));
    EXPECT_EQ(run.code, 1);
    EXPECT_NE(run.err.find("layers.2.o_proj.weight(3, 5)"), std::string::npos) << run.err;
    EXPECT_NE(run.out.find("layers.1.o_proj.weight"), std::string::npos);  // two tensors were done
    EXPECT_EQ(dir.entries(), std::set<std::string>{"m.safetensors"}) << format;
  }
}

TEST(LowbitQuantize, CalibratedMethodsUseTheCalibrationFile) {
  test::ScratchDir dir;
  const auto weights = write_model(dir.file("m.safetensors"), 1);
  SafeTensorsWriter calib(dir.file("calib.safetensors"));
  for (const auto& [name, W] : weights)
    if (is_default_weight(name)) calib.add_matrix(name, test::random_matrix<float>(128, W.cols(), 99));
  calib.commit();
  auto o = options_for(dir.file("m.safetensors"), dir.file("o.safetensors"), "lowbit", 4);
  o.calibration = dir.file("calib.safetensors");
  o.include = {"*.q_proj.weight"};
  for (const char* method : {"gptq", "omniquant"}) {
    o.method = method;
    std::filesystem::remove(dir.file("o.safetensors"));
    const ToolRun run = run_tool(o);
    ASSERT_EQ(run.code, 0) << method << ": " << run.err;
    const auto loaded = lowbit_format::load<float>(SafeTensors::open(dir.file("o.safetensors")), "model.layers.0.self_attn.q_proj");
    EXPECT_LT(test::rel_fro(weights.at("model.layers.0.self_attn.q_proj.weight"), loaded.dequantize()), 0.2) << method;
  }
  o.method = "omniquant";
  const ToolRun run = run_tool(o);
  // Calibration inputs of the wrong width are refused before any work.
  SafeTensorsWriter wrong(dir.file("wrong.safetensors"));
  wrong.add_matrix("model.layers.0.self_attn.q_proj.weight", Matrix<float>::Ones(8, 5));
  wrong.commit();
  o.calibration = dir.file("wrong.safetensors");
  std::filesystem::remove(dir.file("o.safetensors"));
  const ToolRun refused = run_tool(o);
  EXPECT_EQ(refused.code, 1);
  EXPECT_NE(refused.err.find("expected [tokens, 64]"), std::string::npos) << refused.err;
  EXPECT_FALSE(std::filesystem::exists(dir.file("o.safetensors")));
}

// GPTQ with act-order through the command: the lowbit file holds GPTQ's exact matrix
// (permutation included), the GPTQ file decodes to it with desc_act and a g_idx.
TEST(LowbitQuantize, GptqActOrderKeepsThePermutation) {
  test::ScratchDir dir;
  const auto weights = write_model(dir.file("m.safetensors"), 1);
  const std::string name = "model.layers.0.mlp.down_proj.weight";
  const Matrix<float> X = test::random_matrix<float>(256, kInter, 5).array().colwise() * Vector<float>::LinSpaced(256, 0.1f, 3.0f).array();
  SafeTensorsWriter calib(dir.file("calib.safetensors"));
  calib.add_matrix(name, X);
  calib.commit();
  std::vector<Matrix<float>> decoded;
  for (const char* format : {"lowbit", "gptq"}) {
    auto o = options_for(dir.file("m.safetensors"), dir.file(std::string(format) + ".safetensors"), format, 4);
    o.method = "gptq";
    o.act_order = true;
    o.calibration = dir.file("calib.safetensors");
    o.include = {name};
    const ToolRun run = run_tool(o);
    ASSERT_EQ(run.code, 0) << run.err;
    const auto file = SafeTensors::open(dir.file(std::string(format) + ".safetensors"));
    const std::string module = "model.layers.0.mlp.down_proj";
    const auto loaded = std::string(format) == "lowbit"
                            ? lowbit_format::load<float>(file, module)
                            : gptq_format::load<float>(file, module, gptq_format::Config::read(dir.file("quantize_config.json")));
    EXPECT_FALSE(loaded.permutation().empty()) << format;
    if (std::string(format) == "gptq") {
      EXPECT_TRUE(gptq_format::Config::read(dir.file("quantize_config.json")).desc_act);
      const auto g_idx = file.values<std::int32_t>(module + ".g_idx");
      std::vector<int> count(static_cast<std::size_t>(kInter / 32), 0);
      bool sequential = true;
      for (std::size_t c = 0; c < g_idx.size(); ++c) {
        ++count[static_cast<std::size_t>(g_idx[c])];
        sequential = sequential && g_idx[c] == static_cast<std::int32_t>(c / 32);
      }
      for (int c : count) EXPECT_EQ(c, 32);
      EXPECT_FALSE(sequential);  // columns were reordered by the Hessian diagonal
    }
    EXPECT_LT(test::rel_fro(weights.at(name), loaded.dequantize()), 0.2) << format;
    decoded.push_back(loaded.dequantize());
  }
  ASSERT_EQ(decoded.size(), 2u);
  EXPECT_EQ(decoded[0], decoded[1]);  // both files hold the same matrix
}

TEST(LowbitQuantize, DefaultSelectionFollowsLayerNames) {
  for (const char* name : {"model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight", "h.0.mlp.fc1.weight",
                           "encoder.layer.0.attention.output.dense.weight", "transformer.h.0.self_attention.query_key_value.weight",
                           "model.layers.0.block_sparse_moe.experts.0.w2.weight", "out_proj.weight"})
    EXPECT_TRUE(tool::detail::default_selected(name)) << name;
  for (const char* name : {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias",
                           "model.layers.0.input_layernorm.weight", "model.layers.0.block_sparse_moe.gate.weight"})
    EXPECT_FALSE(tool::detail::default_selected(name)) << name;
}

#if defined(LOWBIT_QUANTIZE_BIN)  // set when the examples (and so the program) are built
// The built program as its own process: exit codes, stdout table, one-line errors.
TEST(LowbitQuantizeProcess, RunsTheInstalledCommand) {
  test::ScratchDir dir;
  write_model(dir.file("m.safetensors"), 1);
  const std::string bin = LOWBIT_QUANTIZE_BIN;
  auto shell = [&](const std::string& args) {
    const std::string command = "'" + bin + "' " + args + " >'" + dir.file("stdout") + "' 2>'" + dir.file("stderr") + "'";
    const int status = std::system(command.c_str());
    const auto out = test::read_file(dir.file("stdout")), err = test::read_file(dir.file("stderr"));
    std::filesystem::remove(dir.file("stdout"));
    std::filesystem::remove(dir.file("stderr"));
    return ToolRun{WIFEXITED(status) ? WEXITSTATUS(status) : -1, std::string(out.begin(), out.end()), std::string(err.begin(), err.end())};
  };
  const ToolRun ok = shell("'" + dir.file("m.safetensors") + "' -o '" + dir.file("q.safetensors") + "' --method rtn --bits 3 --group-size 32 --format hqq --threads 2");
  EXPECT_EQ(ok.code, 0) << ok.err;
  EXPECT_NE(ok.out.find("model.layers.0.self_attn.v_proj.weight"), std::string::npos) << ok.out;
  EXPECT_NE(ok.out.find("rel err"), std::string::npos);
  EXPECT_TRUE(ok.err.empty()) << ok.err;  // not a terminal: no progress bar
  EXPECT_NO_THROW((void)hqq_format::load<float>(SafeTensors::open(dir.file("q.safetensors")), "model.layers.0.mlp.up_proj"));

  const ToolRun same = shell("'" + dir.file("m.safetensors") + "' -o '" + dir.file("m.safetensors") + "'");
  EXPECT_NE(same.code, 0);
  EXPECT_EQ(same.err.rfind("lowbit-quantize: refusing to overwrite the input", 0), 0u) << same.err;
  const ToolRun bad = shell("'" + dir.file("m.safetensors") + "' -o '" + dir.file("x.safetensors") + "' --bits four");
  EXPECT_NE(bad.code, 0);
  EXPECT_EQ(std::count(bad.err.begin(), bad.err.end(), '\n'), 1) << bad.err;
  EXPECT_FALSE(std::filesystem::exists(dir.file("x.safetensors")));
  const ToolRun help = shell("--help");
  EXPECT_EQ(help.code, 0);
  EXPECT_NE(help.out.find("--group-size"), std::string::npos);
}
#endif

}  // namespace
}  // namespace lowbit

// lowbit's own format: save/load gives an identical matrix for every bit width, group
// axis, parameter type and permutation; the plan matches what is written; every
// malformed field is refused with the matrix and problem named.
#include "lowbit/io/lowbit_format.hpp"

#include <gtest/gtest.h>

#include <fstream>
#include <numeric>
#include <random>

#include "io/io_test_util.hpp"
#include "lowbit/quantizers/rtn.hpp"
#include "test_util.hpp"

namespace lowbit {
namespace {

using test::expect_error;

QuantizedMatrix<float> quantized(Index rows, Index cols, QuantSpec spec, std::uint64_t seed, bool permuted = false) {
  auto q = RTN<float>(spec).quantize(test::random_matrix<float>(rows, cols, seed));
  if (permuted) {
    std::vector<std::int32_t> p(static_cast<std::size_t>(cols));
    std::iota(p.begin(), p.end(), 0);
    std::shuffle(p.begin(), p.end(), std::mt19937(static_cast<unsigned>(seed)));
    q.set_permutation(std::move(p));
  }
  return q;
}

SafeTensors save_and_open(const test::ScratchDir& dir, const std::vector<std::pair<std::string, const QuantizedMatrix<float>*>>& mats) {
  SafeTensorsWriter writer(dir.file("q.safetensors"));
  for (const auto& [name, q] : mats) lowbit_format::save(writer, name, *q);
  writer.commit();
  return SafeTensors::open(dir.file("q.safetensors"));
}

class LowbitRoundTrip : public testing::TestWithParam<std::tuple<int, GroupAxis, ParamType>> {};

TEST_P(LowbitRoundTrip, LoadGivesAnIdenticalMatrix) {
  const auto [bits, axis, param] = GetParam();
  test::ScratchDir dir;
  std::vector<QuantizedMatrix<float>> mats;
  // Shapes around the layout's 32-code padding and 256-code blocks; groups that do and
  // do not divide the row; one group per row.
  const std::tuple<Index, Index, Index> shapes[] = {{8, 300, 64}, {33, 64, 0}, {1, 1, 1}, {5, 257, 100}};
  for (const auto& [rows, cols, group] : shapes)
    mats.push_back(quantized(rows, cols, {.bits = bits, .group_size = group, .param_type = param, .group_axis = axis},
                             static_cast<std::uint64_t>(rows * cols + bits)));
  if (axis == GroupAxis::Input)
    mats.push_back(quantized(16, 96, {.bits = bits, .group_size = 32, .integral_zero = true, .param_type = param}, 9, true));
  std::vector<std::pair<std::string, const QuantizedMatrix<float>*>> named;
  for (std::size_t i = 0; i < mats.size(); ++i) named.emplace_back("layers." + std::to_string(i) + ".proj", &mats[i]);
  const auto file = save_and_open(dir, named);
  EXPECT_EQ(lowbit_format::matrix_names(file).size(), mats.size());
  for (const auto& [name, q] : named) {
    const auto back = lowbit_format::load<float>(file, name);
    EXPECT_TRUE(back == *q) << name;
    EXPECT_EQ(back.dequantize(), q->dequantize()) << name;
    for (const auto& d : lowbit_format::plan(name, q->rows(), q->cols(), q->spec(), !q->permutation().empty())) {
      EXPECT_EQ(file.info(d.name).dtype, d.dtype) << d.name;
      EXPECT_EQ(file.info(d.name).shape, d.shape) << d.name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Everything, LowbitRoundTrip,
                         testing::Combine(testing::Range(1, 9), testing::Values(GroupAxis::Input, GroupAxis::Output),
                                          testing::Values(ParamType::Float32, ParamType::Float16)));

// The fixture layer through a file keeps the reference RTN error (reference_small.jsonl:
// rtn min-max, 4-bit, group 64, float zero, groups along the input = the file's axis 1).
TEST(LowbitFormat, FixtureLayerKeepsTheReferenceError) {
  std::ifstream in(test::data_path("reference_small.jsonl"));
  double reference = -1;
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.value("tool", "") == "rtn" && j.value("flavor", "") == "minmax" && j.value("nbits", 0) == 4 &&
        j.value("group_size", 0) == 64 && j.value("axis", -1) == 1 && j.value("zero", "") == "float")
      reference = j.at("rel_fro");
  }
  ASSERT_GT(reference, 0);
  const auto& W = test::fixture_layer().W;
  const auto q = RTN<float>(QuantSpec{.bits = 4, .group_size = 64}).quantize(W);
  test::ScratchDir dir;
  const auto file = save_and_open(dir, {{"model.layers.0.mlp.down_proj", &q}});
  const auto back = lowbit_format::load<float>(file, "model.layers.0.mlp.down_proj");
  EXPECT_TRUE(back == q);
  EXPECT_NEAR(test::rel_fro(W, back.dequantize()), reference, 0.01 * reference);
  // 4-bit codes, fp32 scale + zero per 64 weights: 4 + 64/64 = 5 bits per weight.
  EXPECT_EQ(file.info("model.layers.0.mlp.down_proj.codes").byte_size(), 512u * 1024 / 2);
}

// A writer that declares first and writes later produces the same file as save().
TEST(LowbitFormat, StreamingWriteEqualsSave) {
  const auto q = quantized(40, 200, {.bits = 3, .group_size = 64, .param_type = ParamType::Float16}, 4);
  test::ScratchDir dir;
  {
    SafeTensorsWriter writer(dir.file("a.safetensors"));
    lowbit_format::save(writer, "m", q);
    writer.commit();
  }
  {
    SafeTensorsWriter writer(dir.file("b.safetensors"));
    lowbit_format::declare(writer, "m", q.rows(), q.cols(), q.spec(), false);
    writer.start();
    lowbit_format::write(writer, "m", q);
    writer.commit();
  }
  EXPECT_EQ(test::read_file(dir.file("a.safetensors")), test::read_file(dir.file("b.safetensors")));
}

// Rewrites one metadata value or tensor of a saved file and expects the load to fail.
class LowbitMalformed : public testing::Test {
 protected:
  void SetUp() override {
    q_ = quantized(8, 64, {.bits = 4, .group_size = 32}, 2, true);
    good_ = load_tensors(q_);
  }

  static std::vector<TensorData> load_tensors(const QuantizedMatrix<float>& q) { return lowbit_format::encode("m", q); }

  SafeTensors build(const std::vector<TensorData>& tensors, const std::string& meta) {
    SafeTensorsWriter writer(dir_.file("bad" + std::to_string(count_) + ".safetensors"));
    for (auto t : tensors) writer.add(std::move(t));
    if (!meta.empty()) writer.set_metadata("m.lowbit", meta);
    writer.commit();
    return SafeTensors::open(dir_.file("bad" + std::to_string(count_++) + ".safetensors"));
  }

  std::string meta(const std::string& key, const nlohmann::json& value) const {
    auto j = nlohmann::json::parse(lowbit_format::describe(8, 64, q_.spec()));
    if (value.is_null()) j.erase(key);
    else j[key] = value;
    return j.dump();
  }

  void expect_refused(const std::vector<TensorData>& tensors, const std::string& meta, std::initializer_list<std::string> fragments) {
    const auto file = build(tensors, meta);
    expect_error([&] { (void)lowbit_format::load<float>(file, "m"); }, fragments);
  }

  test::ScratchDir dir_;
  int count_ = 0;
  QuantizedMatrix<float> q_;
  std::vector<TensorData> good_;
};

TEST_F(LowbitMalformed, MetadataFields) {
  const std::string ok = lowbit_format::describe(8, 64, q_.spec());
  EXPECT_TRUE(lowbit_format::load<float>(build(good_, ok), "m") == q_);
  expect_refused(good_, "", {"'m'", "no metadata 'm.lowbit'"});
  expect_refused(good_, "{not json", {"'m'", "not valid JSON"});
  expect_refused(good_, "[1]", {"not a JSON object"});
  expect_refused(good_, meta("layout", 2), {"layout version 2"});
  expect_refused(good_, meta("bits", 9), {"bits = 9", "1..8"});
  expect_refused(good_, meta("bits", nullptr), {"'bits' is missing"});
  expect_refused(good_, meta("bits", "4"), {"'bits' is missing or not an integer"});
  expect_refused(good_, meta("group_size", -3), {"group_size = -3"});
  expect_refused(good_, meta("rows", -1), {"rows = -1"});
  expect_refused(good_, meta("cols", 1ll << 40), {"cols = 1099511627776"});
  expect_refused(good_, meta("symmetric", 1), {"'symmetric'", "not a boolean"});
  expect_refused(good_, meta("param_type", "f64"), {"'param_type' must be"});
  expect_refused(good_, meta("group_axis", "rows"), {"'group_axis' must be"});
  expect_refused(good_, meta("rows", 9), {"'m.codes' is U8 [8, 32], expected U8 [9, 32]"});
  expect_refused(good_, meta("param_type", "f16"), {"'m.scales' is F32", "expected F16"});
  expect_refused(good_, meta("group_axis", "output"), {"'m.codes'"});
}

TEST_F(LowbitMalformed, Tensors) {
  const std::string ok = lowbit_format::describe(8, 64, q_.spec());
  auto without = [&](const std::string& name) {
    auto t = good_;
    std::erase_if(t, [&](const TensorData& d) { return d.name == name; });
    return t;
  };
  expect_refused(without("m.codes"), ok, {"'m.codes' is missing"});
  expect_refused(without("m.zeros"), ok, {"'m.zeros' is missing"});
  auto nan = good_;
  const float not_a_number = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(nan[1].bytes.data() + 4 * 5, &not_a_number, 4);  // scales entry 5
  expect_refused(nan, ok, {"'m.scales' entry 5", "not finite"});
  auto repeated = good_;
  std::memcpy(repeated[3].bytes.data(), repeated[3].bytes.data() + 4, 4);  // permutation[0] = permutation[1]
  expect_refused(repeated, ok, {"'m.permutation' is not a permutation"});
  auto out_of_range = good_;
  const std::int32_t big = 64;
  std::memcpy(out_of_range[3].bytes.data(), &big, 4);
  expect_refused(out_of_range, ok, {"'m.permutation'", "= 64"});
  auto short_perm = good_;
  short_perm[3].shape = {15};
  short_perm[3].bytes.resize(60);
  expect_refused(short_perm, ok, {"'m.permutation' is I32 [15], expected I32 [64]"});
  // Output-axis groups never carry a permutation.
  QuantSpec output = q_.spec();
  output.group_axis = GroupAxis::Output;
  const auto q_out = quantized(8, 64, output, 3);
  auto tensors = lowbit_format::encode("m", q_out);
  tensors.push_back(good_[3]);
  expect_refused(tensors, lowbit_format::describe(8, 64, output), {"output-axis groups cannot have a permutation"});
  // No stored columns but a huge row count: refused before it loops.
  const QuantSpec by_output{.group_axis = GroupAxis::Output};
  auto empty = lowbit_format::encode("m", QuantizedMatrix<float>(0, 4, by_output));  // stored [4, 0]
  for (auto& t : empty) t.shape[0] = 1ull << 30;
  expect_refused(empty, lowbit_format::describe(0, 1ll << 30, by_output), {"no stored columns"});
}

// Bytes beyond the codes in a row (padding) do not change what loads.
TEST(LowbitFormat, PaddingBitsAreIgnoredAndTheLoadIsCanonical) {
  const auto q = quantized(2, 40, {.bits = 4, .group_size = 0}, 8);  // 40 codes padded to 64
  auto tensors = lowbit_format::encode("m", q);
  for (Index r = 0; r < 2; ++r) tensors[0].bytes[static_cast<std::size_t>(r * q.row_bytes() + 31)] ^= 0xF0;  // high nibble: padding code 63
  test::ScratchDir dir;
  SafeTensorsWriter writer(dir.file("p.safetensors"));
  for (auto& t : tensors) writer.add(std::move(t));
  writer.set_metadata("m.lowbit", lowbit_format::describe(2, 40, q.spec()));
  writer.commit();
  EXPECT_TRUE(lowbit_format::load<float>(SafeTensors::open(dir.file("p.safetensors")), "m") == q);
}

}  // namespace
}  // namespace lowbit

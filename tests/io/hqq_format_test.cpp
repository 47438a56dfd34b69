// HQQ's checkpoint layout: W_q byte for byte against the reference packer, the state
// dict keys and dtypes HQQLinear.load_state_dict reads, round trips for 2/3/4/8 bits
// on both axes, and refusals.
#include "lowbit/io/hqq_format.hpp"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <fstream>

#include "io/io_test_util.hpp"
#include "lowbit/quantizers/rtn.hpp"
#include "test_util.hpp"

namespace lowbit {
namespace {

using test::expect_error;

CodeMatrix fixture_codes(int bits) {
  std::ifstream in(test::data_path("hqq_pack.json"));
  const auto shape = nlohmann::json::parse(in).at(std::to_string(bits)).at("codes_shape");
  const auto bytes = test::read_binary<std::uint8_t>("hqq_pack" + std::to_string(bits) + "_codes_u8.bin");
  return Eigen::Map<const CodeMatrix>(bytes.data(), shape[0], shape[1]);
}

const TensorData& find(const std::vector<TensorData>& tensors, const std::string& name) {
  for (const auto& t : tensors)
    if (t.name == name) return t;
  throw std::runtime_error("no tensor " + name);
}

class HqqBytes : public testing::TestWithParam<int> {};

// The fixture's code matrix [n, m] is what HQQ's packer sees for axis 1 with group m:
// a W whose row-major codes are the same, with any shape rows x cols = n*m, cols % m == 0.
TEST_P(HqqBytes, WqMatchesTheReferencePackerForAnyShapeWithTheSameGroups) {
  const int bits = GetParam();
  const CodeMatrix codes = fixture_codes(bits);
  const auto expected = test::read_binary<std::uint8_t>("hqq_pack" + std::to_string(bits) + "_packed.bin");
  const Index n = codes.rows(), m = codes.cols();
  for (const Index factor : {Index{1}, Index{2}}) {  // W [n, m] and W [n/2, 2m]
    const Index rows = n / factor, cols = m * factor;
    const CodeMatrix w_codes = Eigen::Map<const CodeMatrix>(codes.data(), rows, cols);
    const QuantSpec spec{.bits = bits, .group_size = m, .param_type = lowbit::ParamType::Float16};
    const Index groups = cols / m;
    const auto q = QuantizedMatrix<float>::from_codes(spec, rows, cols, w_codes, Matrix<float>::Constant(rows, groups, 0.5f),
                                                      Matrix<float>::Constant(rows, groups, 3.0f));
    const auto tensors = hqq_format::encode("layer", q);
    const auto& wq = find(tensors, "layer.W_q");
    EXPECT_EQ(wq.dtype, bits == 3 ? DType::I32 : DType::U8);
    EXPECT_EQ(wq.shape[1], static_cast<std::uint64_t>(m));
    ASSERT_EQ(wq.bytes.size(), expected.size());
    EXPECT_EQ(wq.bytes, expected) << bits << "-bit, W " << rows << "x" << cols;
    EXPECT_EQ(find(tensors, "layer.scale").shape, (std::vector<std::uint64_t>{static_cast<std::uint64_t>(n), 1}));
  }
}

INSTANTIATE_TEST_SUITE_P(Widths, HqqBytes, testing::Values(2, 3, 4, 8));

// Every key HQQLinear.load_state_dict decodes, with the encoding HQQ's own
// encode_safetensor_type gives it: ints and bools as 0-d uint8, strings as uint8 codes,
// shape as int64.
TEST(HqqFormat, StateDictKeysAndEncodings) {
  const auto q = RTN<float>(QuantSpec{.bits = 4, .group_size = 64, .integral_zero = true, .param_type = ParamType::Float16})
                     .quantize(test::random_matrix<float>(16, 128, 1));
  const auto tensors = hqq_format::encode("model.layers.0.self_attn.q_proj", q, {.optimized = true});
  const std::string p = "model.layers.0.self_attn.q_proj.";
  auto scalar = [&](const char* key) {
    const auto& t = find(tensors, p + key);
    EXPECT_EQ(t.dtype, DType::U8) << key;
    EXPECT_TRUE(t.shape.empty()) << key;
    return int(t.bytes.at(0));
  };
  auto text = [&](const char* key) {
    const auto& t = find(tensors, p + key);
    EXPECT_EQ(t.dtype, DType::U8);
    EXPECT_EQ(t.shape.size(), 1u);
    return std::string(t.bytes.begin(), t.bytes.end());
  };
  EXPECT_EQ(scalar("nbits"), 4);
  EXPECT_EQ(scalar("group_size"), 64);
  EXPECT_EQ(scalar("axis"), 1);
  EXPECT_EQ(scalar("channel_wise"), 1);
  EXPECT_EQ(scalar("optimize"), 1);
  EXPECT_EQ(scalar("round_zero"), 1);
  EXPECT_EQ(scalar("view_as_float"), 0);
  EXPECT_EQ(scalar("quant_scale"), 0);
  EXPECT_EQ(scalar("quant_zero"), 0);
  EXPECT_EQ(scalar("offload_meta"), 0);
  EXPECT_EQ(scalar("encoded_state_dict"), 1);
  EXPECT_EQ(scalar("stores_quant_config"), 1);
  EXPECT_EQ(text("packing"), "4bit_u8");
  EXPECT_EQ(text("unpack_view_dtype"), "torch.uint8");
  EXPECT_EQ(text("compute_dtype"), "torch.float16");
  const auto& shape = find(tensors, p + "shape");
  EXPECT_EQ(shape.dtype, DType::I64);
  std::int64_t dims[2];
  std::memcpy(dims, shape.bytes.data(), 16);
  EXPECT_EQ(dims[0], 16);
  EXPECT_EQ(dims[1], 128);
  EXPECT_EQ(find(tensors, p + "scale").dtype, DType::F16);
  EXPECT_EQ(find(tensors, p + "zero").shape, (std::vector<std::uint64_t>{32, 1}));
  EXPECT_EQ(tensors.size(), 19u);
  // plan() names exactly these tensors with the same dtypes and shapes.
  const auto plan = hqq_format::plan("model.layers.0.self_attn.q_proj", 16, 128, q.spec(), {.optimized = true});
  ASSERT_EQ(plan.size(), tensors.size());
  for (std::size_t i = 0; i < plan.size(); ++i) {
    EXPECT_EQ(plan[i].name, tensors[i].name);
    EXPECT_EQ(plan[i].dtype, tensors[i].dtype);
    EXPECT_EQ(plan[i].shape, tensors[i].shape);
  }
}

class HqqRoundTrip : public testing::TestWithParam<std::tuple<int, ParamType>> {};

TEST_P(HqqRoundTrip, ThroughAFileGivesTheSameMatrix) {
  const auto [bits, param] = GetParam();
  test::ScratchDir dir;
  // Axis 1 with groups of 32 (36 groups: 3-bit pads W_q to 40 rows) and 64, one group
  // per row, and axis 0 with one group per column.
  const std::vector<QuantizedMatrix<float>> mats = {
      RTN<float>(QuantSpec{.bits = bits, .group_size = 32, .param_type = param}).quantize(test::random_matrix<float>(12, 96, 1)),
      RTN<float>(QuantSpec{.bits = bits, .group_size = 64, .integral_zero = true, .param_type = param})
          .quantize(test::random_matrix<float>(8, 128, 2)),
      RTN<float>(QuantSpec{.bits = bits, .group_size = 0, .param_type = param}).quantize(test::random_matrix<float>(40, 300, 3)),
      RTN<float>(QuantSpec{.bits = bits, .group_size = 0, .param_type = param, .group_axis = GroupAxis::Output})
          .quantize(test::random_matrix<float>(40, 24, 4)),
  };
  SafeTensorsWriter writer(dir.file("h.safetensors"));
  for (std::size_t i = 0; i < mats.size(); ++i) hqq_format::save(writer, "l" + std::to_string(i), mats[i]);
  writer.commit();
  const auto file = SafeTensors::open(dir.file("h.safetensors"));
  for (std::size_t i = 0; i < mats.size(); ++i) {
    const auto back = hqq_format::load<float>(file, "l" + std::to_string(i));
    EXPECT_EQ(back.dequantize(), mats[i].dequantize()) << i;
    // group_size 0 (one group per row) reads back as HQQ's explicit group size.
    QuantSpec spec = mats[i].spec();
    if (spec.group_size == 0) {
      auto expected = mats[i];
      EXPECT_EQ(back.spec().group_size, mats[i].transposed() ? mats[i].rows() : mats[i].cols());
      continue;
    }
    EXPECT_TRUE(back == mats[i]) << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Widths, HqqRoundTrip,
                         testing::Combine(testing::Values(2, 3, 4, 8), testing::Values(ParamType::Float32, ParamType::Float16)));

TEST(HqqFormat, ViewAsFloatWeightsLoad) {
  const auto q = RTN<float>(QuantSpec{.bits = 4, .group_size = 32, .param_type = ParamType::Float16})
                     .quantize(test::random_matrix<float>(8, 64, 5));
  auto tensors = hqq_format::encode("l", q);
  for (auto& t : tensors) {
    if (t.name == "l.W_q") {  // [128, 32] uint8 viewed as [128, 16] float16, as HQQ does with view_as_float
      t.dtype = DType::F16;
      t.shape[1] /= 2;
    }
    if (t.name == "l.view_as_float") t.bytes[0] = 1;
  }
  test::ScratchDir dir;
  SafeTensorsWriter writer(dir.file("v.safetensors"));
  for (auto& t : tensors) writer.add(std::move(t));
  writer.commit();
  EXPECT_TRUE(hqq_format::load<float>(SafeTensors::open(dir.file("v.safetensors")), "l") == q);
}

TEST(HqqFormat, Refusals) {
  const auto base = RTN<float>(QuantSpec{.bits = 4, .group_size = 32}).quantize(test::random_matrix<float>(6, 64, 6));
  expect_error([] { hqq_format::check_exportable(4, 60, QuantSpec{.bits = 4, .group_size = 32}); }, {"in_features = 60", "group_size 32"});
  expect_error([] { hqq_format::check_exportable(4, 64, QuantSpec{.bits = 5, .group_size = 32}); }, {"bits = 5"});
  expect_error([] { hqq_format::check_exportable(3, 32, QuantSpec{.bits = 2, .group_size = 32}); }, {"3 groups", "4 planes"});
  expect_error([] { hqq_format::check_exportable(64, 8, QuantSpec{.bits = 4, .group_size = 16, .group_axis = GroupAxis::Output}); },
               {"axis-0", "one group per column"});
  auto permuted = base;
  std::vector<std::int32_t> p(64);
  for (int i = 0; i < 64; ++i) p[static_cast<std::size_t>(i)] = 63 - i;
  permuted.set_permutation(p);
  expect_error([&] { (void)hqq_format::encode("l", permuted); }, {"permuted"});

  // Files HQQ could have written that lowbit cannot hold, and broken ones.
  test::ScratchDir dir;
  int n = 0;
  auto load_modified = [&](auto&& modify, std::initializer_list<std::string> fragments) {
    auto tensors = hqq_format::encode("l", base);
    modify(tensors);
    const std::string path = dir.file(std::to_string(n++) + ".safetensors");
    SafeTensorsWriter writer(path);
    for (auto& t : tensors) writer.add(std::move(t));
    writer.commit();
    const auto file = SafeTensors::open(path);
    expect_error([&] { (void)hqq_format::load<float>(file, "l"); }, fragments);
  };
  auto set = [](const char* key, std::uint8_t value) {
    return [key, value](std::vector<TensorData>& t) {
      for (auto& d : t)
        if (d.name == std::string("l.") + key) d.bytes[0] = value;
    };
  };
  auto drop = [](const char* key) {
    return [key](std::vector<TensorData>& t) { std::erase_if(t, [&](const TensorData& d) { return d.name == std::string("l.") + key; }); };
  };
  load_modified(set("quant_zero", 1), {"HQQ layer 'l'", "quant_zero"});
  load_modified(set("nbits", 5), {"nbits = 5"});
  load_modified(set("axis", 2), {"axis = 2"});
  load_modified(set("axis", 0), {"axis 0 with group_size 32 != out_features 6"});
  load_modified(set("group_size", 0), {"group_size = 0"});
  load_modified(drop("scale"), {"scale or zero is missing"});
  load_modified(drop("nbits"), {"'l.nbits'", "not in the file"});
  load_modified([](std::vector<TensorData>& t) {
    for (auto& d : t)
      if (d.name == "l.packing") d.bytes = {'2', 'b', 'i', 't', '_', 'u', '8'}, d.shape = {7};
  }, {"packing '2bit_u8' does not match nbits = 4"});
  load_modified([](std::vector<TensorData>& t) {
    for (auto& d : t)
      if (d.name == "l.W_q") d.shape = {d.shape[0] / 2, d.shape[1]}, d.bytes.resize(d.bytes.size() / 2);
  }, {"W_q is U8 [3, 32], expected 6x32"});
  load_modified([](std::vector<TensorData>& t) {
    for (auto& d : t)
      if (d.name == "l.zero") {
        const float inf = std::numeric_limits<float>::infinity();
        std::memcpy(d.bytes.data(), &inf, 4);
      }
  }, {"entry 0 is not finite"});
  load_modified([](std::vector<TensorData>& t) {
    for (auto& d : t)
      if (d.name == "l.shape") {
        const std::int64_t bad[2] = {-6, 64};
        std::memcpy(d.bytes.data(), bad, 16);
      }
  }, {"shape [-6, 64]"});
}

}  // namespace
}  // namespace lowbit

// AutoGPTQ / GPTQModel v1 layout: byte for byte against the reference packer's output
// for 2/3/4/8 bits, round trips, act-order g_idx, and refusals.
#include "lowbit/io/gptq_format.hpp"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <fstream>
#include <numeric>
#include <random>

#include "io/io_test_util.hpp"
#include "lowbit/quantizers/rtn.hpp"
#include "test_util.hpp"

namespace lowbit {
namespace {

using test::expect_error;

struct Fixture {
  Index out, in, group;
  CodeMatrix codes;       // [out, in]
  Matrix<float> zeros;    // [out, in/group], integers >= 1
  Matrix<float> scales;   // [out, in/group]
  gptq_format::WordMatrix qweight, qzeros;
};

Fixture load_fixture(int bits) {
  std::ifstream in(test::data_path("gptq_pack.json"));
  const auto shapes = nlohmann::json::parse(in).at(std::to_string(bits));
  Fixture f;
  f.out = shapes.at("out");
  f.in = shapes.at("in");
  f.group = shapes.at("group_size");
  const std::string prefix = "gptq_pack" + std::to_string(bits) + "_";
  const auto codes = test::read_binary<std::uint8_t>(prefix + "codes_u8.bin");
  const auto zeros = test::read_binary<std::uint8_t>(prefix + "zeros_u8.bin");
  const auto scales = test::read_binary<float>(prefix + "scales_f32.bin");
  const auto qweight = test::read_binary<std::int32_t>(prefix + "qweight_i32.bin");
  const auto qzeros = test::read_binary<std::int32_t>(prefix + "qzeros_i32.bin");
  const Index groups = f.in / f.group;
  f.codes = Eigen::Map<const CodeMatrix>(codes.data(), f.out, f.in);
  f.zeros = Eigen::Map<const CodeMatrix>(zeros.data(), f.out, groups).cast<float>();
  f.scales = Eigen::Map<const Matrix<float>>(scales.data(), f.out, groups);
  f.qweight = Eigen::Map<const gptq_format::WordMatrix>(qweight.data(), shapes.at("qweight_shape")[0], shapes.at("qweight_shape")[1]);
  f.qzeros = Eigen::Map<const gptq_format::WordMatrix>(qzeros.data(), shapes.at("qzeros_shape")[0], shapes.at("qzeros_shape")[1]);
  return f;
}

QuantSpec gptq_spec(int bits, Index group) {
  return {.bits = bits, .group_size = group, .symmetric = false, .integral_zero = true, .param_type = ParamType::Float16};
}

class GptqBytes : public testing::TestWithParam<int> {};

TEST_P(GptqBytes, ExportMatchesTheReferencePackerByteForByte) {
  const int bits = GetParam();
  const Fixture f = load_fixture(bits);
  ASSERT_GE(f.zeros.minCoeff(), 1.0f);
  const auto q = QuantizedMatrix<float>::from_codes(gptq_spec(bits, f.group), f.out, f.in, f.codes, f.scales, f.zeros);
  const auto ck = gptq_format::to_checkpoint(q);
  ASSERT_EQ(ck.qweight.rows(), f.qweight.rows());
  ASSERT_EQ(ck.qweight.cols(), f.qweight.cols());
  EXPECT_EQ(ck.qweight, f.qweight);
  ASSERT_EQ(ck.qzeros.rows(), f.qzeros.rows());
  ASSERT_EQ(ck.qzeros.cols(), f.qzeros.cols());
  EXPECT_EQ(ck.qzeros, f.qzeros);
  for (Index o = 0; o < f.out; ++o)
    for (Index g = 0; g < f.in / f.group; ++g)
      EXPECT_EQ(ck.scales(g, o), static_cast<float>(Eigen::half(f.scales(o, g))));
  for (Index c = 0; c < f.in; ++c) EXPECT_EQ(ck.g_idx[static_cast<std::size_t>(c)], c / f.group);
}

TEST_P(GptqBytes, ImportOfTheReferenceBytesGivesTheCodes) {
  const int bits = GetParam();
  const Fixture f = load_fixture(bits);
  EXPECT_EQ(gptq_format::unpack_rows(f.qweight, bits), CodeMatrix(f.codes.transpose()));
  gptq_format::Checkpoint ck;
  ck.qweight = f.qweight;
  ck.qzeros = f.qzeros;
  ck.scales = f.scales.transpose().unaryExpr([](float s) { return static_cast<float>(Eigen::half(s)); });
  for (Index c = 0; c < f.in; ++c) ck.g_idx.push_back(static_cast<std::int32_t>(c / f.group));
  gptq_format::Config config;
  config.bits = bits;
  config.group_size = f.group;
  config.sym = false;
  const auto q = gptq_format::from_checkpoint<float>(ck, config);
  const auto expected = QuantizedMatrix<float>::from_codes(gptq_spec(bits, f.group), f.out, f.in, f.codes, f.scales, f.zeros);
  EXPECT_TRUE(q == expected);
}

INSTANTIATE_TEST_SUITE_P(Widths, GptqBytes, testing::Values(2, 3, 4, 8));

// A random matrix with integral zeros in [1, 2^bits] (what the layout can hold).
QuantizedMatrix<float> random_matrix(int bits, Index out, Index in, Index group, std::uint64_t seed, bool permuted) {
  const QuantSpec spec = gptq_spec(bits, group);
  const Index groups = spec.groups_per_row(in);
  std::mt19937_64 rng(seed);
  CodeMatrix codes(out, in);
  for (Index i = 0; i < codes.size(); ++i) codes.data()[i] = static_cast<std::uint8_t>(rng() % (1u << bits));
  Matrix<float> scales(out, groups), zeros(out, groups);
  for (Index i = 0; i < scales.size(); ++i) {
    scales.data()[i] = static_cast<float>(Eigen::half(0.001f + static_cast<float>(rng() % 1000) * 1e-5f));
    zeros.data()[i] = static_cast<float>(1 + rng() % (1u << bits));
  }
  std::vector<std::int32_t> permutation;
  if (permuted) {
    permutation.resize(static_cast<std::size_t>(in));
    std::iota(permutation.begin(), permutation.end(), 0);
    std::shuffle(permutation.begin(), permutation.end(), rng);
  }
  return QuantizedMatrix<float>::from_codes(spec, out, in, codes, scales, zeros, permutation);
}

class GptqRoundTrip : public testing::TestWithParam<std::tuple<int, Index, bool>> {};

TEST_P(GptqRoundTrip, ThroughAFileGivesTheSameMatrix) {
  const auto [bits, group, permuted] = GetParam();
  const auto q = random_matrix(bits, 64, 256, group, 11 + static_cast<std::uint64_t>(bits), permuted);
  test::ScratchDir dir;
  SafeTensorsWriter writer(dir.file("g.safetensors"));
  gptq_format::save(writer, "model.layers.0.mlp.up_proj", q);
  writer.commit();
  const auto config = gptq_format::config_for(q.spec(), permuted);
  config.write(dir.file("quantize_config.json"));
  const auto read_config = gptq_format::Config::read(dir.file("quantize_config.json"));
  EXPECT_EQ(read_config.desc_act, permuted);
  EXPECT_EQ(read_config.group_size, group == 0 ? -1 : group);
  const auto file = SafeTensors::open(dir.file("g.safetensors"));
  const auto back = gptq_format::load<float>(file, "model.layers.0.mlp.up_proj", read_config);
  EXPECT_EQ(back.dequantize(), q.dequantize());
  if (!permuted) {
    EXPECT_TRUE(back == q);
  } else {
    // g_idx keeps which group each column is in, not the order inside a group: the
    // import is the canonical (ascending within groups) equivalent, which exports to
    // the same tensors.
    const auto a = gptq_format::to_checkpoint(q), b = gptq_format::to_checkpoint(back);
    EXPECT_EQ(a.qweight, b.qweight);
    EXPECT_EQ(a.qzeros, b.qzeros);
    EXPECT_EQ(a.scales, b.scales);
    EXPECT_EQ(a.g_idx, b.g_idx);
    EXPECT_EQ(back.permutation().empty(), group == 0);  // one group: any order is the identity
  }
  // The declared plan is exactly what was written.
  for (const auto& d : gptq_format::plan("model.layers.0.mlp.up_proj", 64, 256, q.spec())) {
    EXPECT_EQ(file.info(d.name).dtype, d.dtype);
    EXPECT_EQ(file.info(d.name).shape, d.shape);
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, GptqRoundTrip,
                         testing::Combine(testing::Values(2, 3, 4, 8), testing::Values(Index{0}, Index{32}, Index{100}),
                                          testing::Bool()));

// Act-order: the v1 tensors decode (w = scale[g_idx[c]] * (q - (qzero + 1))) to the
// matrix's own dequantization, column by column in input order.
TEST(GptqActOrder, GIdxIsTheGroupOfEachInputColumnsStoredPosition) {
  for (int bits : {3, 4}) {
    const auto q = random_matrix(bits, 32, 128, 32, 5, true);
    ASSERT_FALSE(q.permutation().empty());
    const auto ck = gptq_format::to_checkpoint(q);
    const auto inverse = q.inverse_permutation();
    for (Index c = 0; c < 128; ++c) EXPECT_EQ(ck.g_idx[static_cast<std::size_t>(c)], inverse[static_cast<std::size_t>(c)] / 32);
    const CodeMatrix codes = gptq_format::unpack_rows(ck.qweight, bits);  // [in, out]
    const gptq_format::WordMatrix qzeros_t = ck.qzeros.transpose();
    const CodeMatrix zero_codes = gptq_format::unpack_rows(qzeros_t, bits);  // [out, groups]
    const Matrix<float> expected = q.dequantize();
    for (Index o = 0; o < 32; ++o)
      for (Index c = 0; c < 128; ++c) {
        const auto g = ck.g_idx[static_cast<std::size_t>(c)];
        const float w = (static_cast<float>(codes(c, o)) - (static_cast<float>(zero_codes(o, g)) + 1.0f)) * ck.scales(g, o);
        ASSERT_EQ(w, expected(o, c)) << "bits " << bits << " (" << o << ", " << c << ")";
      }
    // Import turns g_idx back into a permutation with the same groups.
    const auto back = gptq_format::from_checkpoint<float>(ck, gptq_format::config_for(q.spec(), true));
    EXPECT_EQ(back.dequantize(), expected);
    for (Index j = 0; j < 128; ++j)
      EXPECT_EQ(back.inverse_permutation()[static_cast<std::size_t>(back.permutation()[static_cast<std::size_t>(j)])] / 32,
                ck.g_idx[static_cast<std::size_t>(back.permutation()[static_cast<std::size_t>(j)])]);
  }
}

TEST(GptqRefusals, ZerosTheV1LayoutCannotHold) {
  const QuantSpec spec = gptq_spec(4, 32);
  const CodeMatrix codes = CodeMatrix::Zero(32, 64);
  const Matrix<float> scales = Matrix<float>::Constant(32, 2, 0.5f);
  Matrix<float> zeros = Matrix<float>::Constant(32, 2, 8.0f);
  zeros(3, 1) = 0.0f;  // stored as zero - 1 = -1: impossible
  expect_error([&] { (void)gptq_format::to_checkpoint(QuantizedMatrix<float>::from_codes(spec, 32, 64, codes, scales, zeros)); },
               {"zero(3, 1) = 0", "[1, 16]"});
  zeros(3, 1) = 17.0f;
  expect_error([&] { (void)gptq_format::to_checkpoint(QuantizedMatrix<float>::from_codes(spec, 32, 64, codes, scales, zeros)); },
               {"zero(3, 1) = 17"});
  zeros(3, 1) = 2.5f;
  expect_error([&] { (void)gptq_format::to_checkpoint(QuantizedMatrix<float>::from_codes(spec, 32, 64, codes, scales, zeros)); },
               {"zero(3, 1) = 2.5", "not an integer"});
  zeros(3, 1) = 16.0f;  // the largest that fits: stored as 15
  EXPECT_NO_THROW((void)gptq_format::to_checkpoint(QuantizedMatrix<float>::from_codes(spec, 32, 64, codes, scales, zeros)));
}

TEST(GptqRefusals, ShapesAndSpecsWithoutALayout) {
  expect_error([] { gptq_format::check_exportable(32, 60, gptq_spec(4, 32)); }, {"in_features = 60"});
  expect_error([] { gptq_format::check_exportable(33, 64, gptq_spec(3, 32)); }, {"out_features = 33"});
  expect_error([] { gptq_format::check_exportable(32, 64, gptq_spec(5, 32)); }, {"bits = 5"});
  QuantSpec output = gptq_spec(4, 32);
  output.group_axis = GroupAxis::Output;
  expect_error([&] { gptq_format::check_exportable(32, 64, output); }, {"input dimension"});
  expect_error([] { (void)gptq_format::pack_rows(CodeMatrix::Constant(8, 1, 16), 4); }, {"code(0, 0) = 16"});
}

TEST(GptqRefusals, MalformedCheckpoints) {
  const auto q = random_matrix(4, 32, 64, 32, 3, false);
  const auto good = gptq_format::to_checkpoint(q);
  const auto config = gptq_format::config_for(q.spec(), false);
  auto ck = good;
  ck.g_idx[5] = 7;
  expect_error([&] { (void)gptq_format::from_checkpoint<float>(ck, config); }, {"g_idx[5] = 7"});
  ck = good;
  ck.g_idx[0] = 1;  // group 1 now has 33 columns
  expect_error([&] { (void)gptq_format::from_checkpoint<float>(ck, config); }, {"group 0 has 31 columns"});
  ck = good;
  ck.g_idx.pop_back();
  expect_error([&] { (void)gptq_format::from_checkpoint<float>(ck, config); }, {"63 entries"});
  ck = good;
  ck.scales.conservativeResize(1, 32);
  expect_error([&] { (void)gptq_format::from_checkpoint<float>(ck, config); }, {"GPTQ scales"});
  ck = good;
  ck.qzeros.conservativeResize(2, 3);
  expect_error([&] { (void)gptq_format::from_checkpoint<float>(ck, config); }, {"GPTQ qzeros"});
  expect_error([] { (void)gptq_format::Config::from_json(nlohmann::json{{"bits", 5}, {"group_size", 128}}); }, {"bits = 5"});
  expect_error([] { (void)gptq_format::Config::from_json(nlohmann::json{{"bits", 4}, {"group_size", 0}}); }, {"group_size = 0"});
  expect_error([] { (void)gptq_format::Config::from_json(nlohmann::json{{"bits", 4}, {"group_size", 128}, {"checkpoint_format", "gptq_v2"}}); },
               {"gptq_v2"});
  expect_error([] { (void)gptq_format::Config::from_json(nlohmann::json{{"bits", "4"}, {"group_size", 128}}); }, {"'bits'"});
}

// A file without g_idx (some exporters drop it when it is trivial) reads as i / group.
TEST(GptqFile, MissingGIdxMeansSequentialGroups) {
  const auto q = random_matrix(2, 32, 64, 16, 4, false);
  test::ScratchDir dir;
  SafeTensorsWriter writer(dir.file("g.safetensors"));
  for (auto& t : gptq_format::encode("layer", q))
    if (t.name != "layer.g_idx") writer.add(std::move(t));
  writer.commit();
  const auto file = SafeTensors::open(dir.file("g.safetensors"));
  EXPECT_TRUE(gptq_format::load<float>(file, "layer", gptq_format::config_for(q.spec(), false)) == q);
  expect_error([&] { (void)gptq_format::load<float>(file, "other", gptq_format::config_for(q.spec(), false)); },
               {"'other.qweight'", "not in the file"});
}

}  // namespace
}  // namespace lowbit

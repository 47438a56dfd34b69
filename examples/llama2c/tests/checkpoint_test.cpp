// The checkpoint loader: both formats round-trip, and every truncated or corrupt file is
// refused with lowbit::Error before anything is read past its end.
#include "llama2c/checkpoint.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <limits>
#include <string>

#include "test_model.hpp"

namespace llama2c {
namespace {

void expect_same(const Weights& a, const Weights& b) {
  EXPECT_EQ(a.config, b.config);
  EXPECT_EQ(a.token_embedding, b.token_embedding);
  EXPECT_EQ(a.rms_final, b.rms_final);
  EXPECT_EQ(a.classifier, b.classifier);
  ASSERT_EQ(a.layers.size(), b.layers.size());
  for (std::size_t l = 0; l < a.layers.size(); ++l) {
    const LayerWeights &x = a.layers[l], &y = b.layers[l];
    EXPECT_EQ(x.rms_att, y.rms_att);
    EXPECT_EQ(x.rms_ffn, y.rms_ffn);
    EXPECT_EQ(x.wq, y.wq);
    EXPECT_EQ(x.wk, y.wk);
    EXPECT_EQ(x.wv, y.wv);
    EXPECT_EQ(x.wo, y.wo);
    EXPECT_EQ(x.w1, y.w1);
    EXPECT_EQ(x.w2, y.w2);
    EXPECT_EQ(x.w3, y.w3);
  }
}

// The message of the lowbit::Error `fn` throws ("" if it throws none).
template <class Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const lowbit::Error& e) {
    return e.what();
  }
  return "";
}

void put_int(std::vector<std::byte>& bytes, std::size_t offset, std::int32_t value) {
  std::memcpy(bytes.data() + offset, &value, sizeof value);
}

TEST(Checkpoint, BothFormatsRoundTrip) {
  for (bool shared : {true, false}) {
    const Weights w = test::random_weights(test::small_config(shared), 3);
    for (CheckpointFormat format : {CheckpointFormat::Legacy, CheckpointFormat::V1}) {
      const auto bytes = serialize_checkpoint(w, format);
      SCOPED_TRACE(::testing::Message() << "shared " << shared << " v1 " << (format == CheckpointFormat::V1));
      expect_same(parse_checkpoint(bytes), w);
    }
  }
}

// The sizes each format defines, spelled out for the small config: a legacy file is its
// 28-byte header plus the floats (RoPE tables included), v1 a 256-byte header plus the
// floats without them.
TEST(Checkpoint, FileSizesFollowTheFormats) {
  const Config c = test::small_config();
  const Weights w = test::random_weights(c, 4);
  const std::size_t per_layer = 2 * 32 + 2 * 32 * 32 + 2 * 16 * 32 + 3 * 44 * 32;
  const std::size_t weights = 300 * 32 + 2 * per_layer + 32;
  const std::size_t rope = 2 * 64 * 4;
  EXPECT_EQ(serialize_checkpoint(w, CheckpointFormat::Legacy).size(), 28 + 4 * (weights + rope));
  EXPECT_EQ(serialize_checkpoint(w, CheckpointFormat::V1).size(), 256 + 4 * weights);
  Weights unshared = test::random_weights(test::small_config(false), 4);
  EXPECT_EQ(serialize_checkpoint(unshared, CheckpointFormat::V1).size(), 256 + 4 * (weights + 300 * 32));
}

TEST(Checkpoint, SavesAndLoadsFiles) {
  const Weights w = test::random_weights(test::small_config(false), 5);
  const auto path = std::filesystem::path(::testing::TempDir()) / "llama2c_checkpoint_test.bin";
  save_checkpoint(w, path, CheckpointFormat::V1);
  expect_same(load_checkpoint(path), w);
  std::filesystem::remove(path);
  const std::string missing = error_of([&] { (void)load_checkpoint(path); });
  EXPECT_NE(missing.find("cannot open"), std::string::npos) << missing;
}

// Cuts of the file inside every part of the header, mid-file and one byte short are
// refused, as is one byte too many.
TEST(Checkpoint, RefusesTruncatedFiles) {
  const Weights w = test::random_weights(test::small_config(), 6);
  for (CheckpointFormat format : {CheckpointFormat::Legacy, CheckpointFormat::V1}) {
    const auto bytes = serialize_checkpoint(w, format);
    for (std::size_t length : {std::size_t{0}, std::size_t{3}, std::size_t{4}, std::size_t{27}, std::size_t{36},
                               std::size_t{255}, std::size_t{256}, bytes.size() / 2, bytes.size() - 1}) {
      const std::string message = error_of([&] { (void)parse_checkpoint(std::span(bytes).first(length), "cut"); });
      EXPECT_NE(message.find("cut"), std::string::npos) << "length " << length << ": '" << message << "'";
      EXPECT_NE(message.find("truncated"), std::string::npos) << "length " << length << ": '" << message << "'";
    }
    auto longer = bytes;
    longer.push_back(std::byte{0});
    const std::string message = error_of([&] { (void)parse_checkpoint(longer); });
    EXPECT_NE(message.find("trailing"), std::string::npos) << message;
  }
}

TEST(Checkpoint, RefusesCorruptHeaders) {
  const Weights w = test::random_weights(test::small_config(), 7);
  const auto legacy = serialize_checkpoint(w, CheckpointFormat::Legacy);
  struct Case {
    std::size_t field;  // int32 index in the legacy header
    std::int32_t value;
    const char* expected;  // in the message
  };
  const Case cases[] = {
      {0, -32, "dim = -32"},
      {0, 0, "dim = 0"},
      {0, 30, "not a multiple of n_heads"},           // 30 % 4 != 0
      {3, 5, "not a multiple of n_heads"},            // dim 32 % 5
      {4, 3, "not a multiple of n_kv_heads"},         // 4 % 3
      {3, 32, "head_size"},                           // head_size 1 is odd
      {2, 1 << 20, "bytes"},                          // huge: the size check refuses it before allocating
      {5, std::numeric_limits<std::int32_t>::min(), "vocab_size"},
      {6, 0, "seq_len = 0"},
      {1, 1 << 21, "hidden_dim = 2097152"},
  };
  for (const Case& c : cases) {
    auto bytes = legacy;
    put_int(bytes, c.field * 4, c.value);
    const std::string message = error_of([&] { (void)parse_checkpoint(bytes); });
    EXPECT_NE(message.find(c.expected), std::string::npos) << "field " << c.field << " = " << c.value << ": '" << message << "'";
  }

  const auto v1 = serialize_checkpoint(w, CheckpointFormat::V1);
  auto version2 = v1;
  put_int(version2, 4, 2);
  EXPECT_NE(error_of([&] { (void)parse_checkpoint(version2); }).find("version 2"), std::string::npos);
  auto bad_flag = v1;
  bad_flag[36] = std::byte{7};
  EXPECT_NE(error_of([&] { (void)parse_checkpoint(bad_flag); }).find("shared_classifier = 7"), std::string::npos);
  // A legacy file whose vocab_size turns negative has its classifier missing.
  auto unshared = legacy;
  put_int(unshared, 20, -300);
  EXPECT_NE(error_of([&] { (void)parse_checkpoint(unshared); }).find("truncated"), std::string::npos);
}

TEST(Checkpoint, RefusesNonFiniteWeights) {
  const Weights w = test::random_weights(test::small_config(), 8);
  auto bytes = serialize_checkpoint(w, CheckpointFormat::Legacy);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(bytes.data() + 28 + 5 * sizeof(float), &nan, sizeof nan);  // inside token_embedding
  const std::string message = error_of([&] { (void)parse_checkpoint(bytes); });
  EXPECT_NE(message.find("token_embedding"), std::string::npos) << message;
}

TEST(CheckpointOnModel, LoadsStories260K) {
  const Weights& w = test::real_model().weights;
  const Config expected{.dim = 64, .hidden_dim = 172, .n_layers = 5, .n_heads = 8, .n_kv_heads = 4,
                        .vocab_size = 512, .seq_len = 512, .shared_classifier = true};
  EXPECT_EQ(w.config, expected);
  EXPECT_EQ(w.config.kv_dim(), 32);
  EXPECT_EQ(w.config.head_size(), 8);
  EXPECT_EQ(w.layers[4].w2.rows(), 64);
  EXPECT_EQ(w.layers[4].w2.cols(), 172);
}

// Re-exporting the real model gives its file back: byte for byte up to the RoPE
// tables (which we recompute), and the same weights through the v1 format.
TEST(CheckpointOnModel, ReexportMatchesTheFile) {
  const Weights& w = test::real_model().weights;
  const auto original = read_file_bytes(test::model_files().checkpoint);
  const auto legacy = serialize_checkpoint(w, CheckpointFormat::Legacy);
  ASSERT_EQ(legacy.size(), original.size());
  const std::size_t rope_bytes = 2 * 512 * 4 * sizeof(float);
  EXPECT_EQ(std::memcmp(legacy.data(), original.data(), original.size() - rope_bytes), 0);
  expect_same(parse_checkpoint(serialize_checkpoint(w, CheckpointFormat::V1)), w);
}

}  // namespace
}  // namespace llama2c

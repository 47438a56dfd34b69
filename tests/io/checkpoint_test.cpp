// Checkpoint: one file, a directory of shards with its index, and broken indexes.
#include "lowbit/io/checkpoint.hpp"

#include <gtest/gtest.h>

#include <fstream>

#include "io/io_test_util.hpp"
#include "test_util.hpp"

namespace lowbit {
namespace {

using test::expect_error;

void shard(const std::string& path, const std::vector<std::string>& names, const std::string& meta = "") {
  SafeTensorsWriter writer(path);
  std::uint64_t seed = 1;
  for (const auto& name : names) writer.add_matrix(name, test::random_matrix<float>(2, 3, seed++), DType::BF16);
  if (!meta.empty()) writer.set_metadata("format", meta);
  writer.commit();
}

void index(const std::string& path, const nlohmann::json& map) {
  std::ofstream(path) << nlohmann::json{{"metadata", {{"total_size", 123}}}, {"weight_map", map}}.dump();
}

TEST(Checkpoint, SingleFileAndDirectoryWithOneFile) {
  test::ScratchDir dir;
  shard(dir.file("model.safetensors"), {"a", "b"}, "pt");
  for (const auto& path : {dir.file("model.safetensors"), dir.path(), dir.path() + "/"}) {
    const auto ck = Checkpoint::open(path);
    EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b"}));
    EXPECT_EQ(ck.info("b").dtype, DType::BF16);
    EXPECT_EQ(ck.metadata().at("format"), "pt");
    EXPECT_EQ(ck.file_ids().size(), 1u);
  }
}

TEST(Checkpoint, ShardsFromTheIndex) {
  test::ScratchDir dir;
  shard(dir.file("m-1.safetensors"), {"x.0", "x.1"}, "pt");
  shard(dir.file("m-2.safetensors"), {"y"});
  index(dir.file("model.safetensors.index.json"), {{"x.0", "m-1.safetensors"}, {"x.1", "m-1.safetensors"}, {"y", "m-2.safetensors"}});
  const auto ck = Checkpoint::open(dir.path());
  EXPECT_EQ(ck.shards().size(), 2u);
  EXPECT_EQ(ck.names().size(), 3u);
  EXPECT_EQ(ck.file_of("y").source(), dir.file("m-2.safetensors"));
  EXPECT_EQ(ck.file_of("x.1").matrix("x.1"), SafeTensors::open(dir.file("m-1.safetensors")).matrix("x.1"));
  EXPECT_EQ(ck.file_ids().size(), 3u);  // two shards and the index
  expect_error([&] { (void)ck.info("z"); }, {"'z'", "not in the input"});
}

TEST(Checkpoint, BrokenIndexes) {
  test::ScratchDir dir;
  shard(dir.file("a.safetensors"), {"t"});
  shard(dir.file("b.safetensors"), {"t"});
  const std::string idx = dir.file("model.safetensors.index.json");
  index(idx, {{"t", "../a.safetensors"}});
  expect_error([&] { (void)Checkpoint::open(dir.path()); }, {"'../a.safetensors'", "not a plain file name"});
  index(idx, {{"t", "/etc/passwd"}});
  expect_error([&] { (void)Checkpoint::open(dir.path()); }, {"not a plain file name"});
  index(idx, {{"t", "missing.safetensors"}});
  expect_error([&] { (void)Checkpoint::open(dir.path()); }, {"missing.safetensors"});
  index(idx, {{"t", "a.safetensors"}, {"u", "b.safetensors"}});
  expect_error([&] { (void)Checkpoint::open(dir.path()); }, {"tensor 't' is in both"});
  index(idx, {{"u", "a.safetensors"}});
  expect_error([&] { (void)Checkpoint::open(dir.path()); }, {"maps tensor 'u'", "does not hold it"});
  index(idx, {{"t", 5}});
  expect_error([&] { (void)Checkpoint::open(dir.path()); }, {"'t' is not a file name"});
  std::ofstream(idx) << "{\"weight_map\": ";
  expect_error([&] { (void)Checkpoint::open(dir.path()); }, {"not valid JSON"});
  std::ofstream(idx) << "{\"metadata\": {}}";
  expect_error([&] { (void)Checkpoint::open(dir.path()); }, {"no \"weight_map\""});
  std::filesystem::remove(idx);
  expect_error([&] { (void)Checkpoint::open(dir.path()); }, {"neither"});
  expect_error([&] { (void)Checkpoint::open(dir.file("nope")); }, {"does not exist"});
}

}  // namespace
}  // namespace lowbit

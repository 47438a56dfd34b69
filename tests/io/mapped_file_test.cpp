// MappedFile: contents, identity, moves, and refusals.
#include "lowbit/io/mapped_file.hpp"

#include <gtest/gtest.h>

#include "io/io_test_util.hpp"

namespace lowbit {
namespace {

TEST(MappedFile, MapsTheWholeFile) {
  test::ScratchDir dir;
  const std::vector<std::uint8_t> bytes = {1, 2, 3, 250, 0, 7};
  test::write_file(dir.file("f"), bytes);
  const MappedFile file(dir.file("f"));
  ASSERT_EQ(file.size(), bytes.size());
  EXPECT_TRUE(std::equal(bytes.begin(), bytes.end(), file.data()));
  EXPECT_EQ(file.path(), dir.file("f"));
  FileId id;
  ASSERT_TRUE(detail::file_id(dir.file("f"), id));
  EXPECT_EQ(file.id(), id);
  ASSERT_EQ(::link(dir.file("f").c_str(), dir.file("g").c_str()), 0);  // another name, same file
  EXPECT_EQ(MappedFile(dir.file("g")).id(), file.id());
  test::write_file(dir.file("h"), bytes);
  EXPECT_FALSE(MappedFile(dir.file("h")).id() == file.id());
}

TEST(MappedFile, EmptyFilesAndMoves) {
  test::ScratchDir dir;
  test::write_file(dir.file("empty"), {});
  MappedFile empty(dir.file("empty"));
  EXPECT_EQ(empty.size(), 0u);
  EXPECT_TRUE(empty.bytes().empty());
  test::write_file(dir.file("f"), {9, 8});
  MappedFile a(dir.file("f"));
  MappedFile b(std::move(a));
  EXPECT_EQ(b.size(), 2u);
  EXPECT_EQ(a.size(), 0u);  // NOLINT(bugprone-use-after-move): moved-from is empty by contract
  empty = std::move(b);
  EXPECT_EQ(empty.bytes()[1], 8);
}

TEST(MappedFile, Refusals) {
  test::ScratchDir dir;
  test::expect_error([&] { MappedFile f(dir.file("missing")); }, {"cannot open", "missing"});
  test::expect_error([&] { MappedFile f(dir.path()); }, {"not a regular file"});
}

}  // namespace
}  // namespace lowbit

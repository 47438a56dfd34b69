// AtomicFile: the file appears complete on commit and never otherwise, even when the
// writing process is killed.
#include "lowbit/io/atomic_file.hpp"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include "io/io_test_util.hpp"

namespace lowbit {
namespace {

TEST(AtomicFile, CommitMakesTheFileAppear) {
  test::ScratchDir dir;
  AtomicFile file(dir.file("out"));
  file.write_at(3, "def", 3);
  file.write_at(0, "abc", 3);
  EXPECT_TRUE(dir.entries().empty());  // nothing visible before commit
  file.commit();
  EXPECT_TRUE(file.committed());
  EXPECT_EQ(test::read_file(dir.file("out")), (std::vector<std::uint8_t>{'a', 'b', 'c', 'd', 'e', 'f'}));
  EXPECT_EQ(dir.entries(), std::set<std::string>{"out"});
  test::expect_error([&] { file.write_at(0, "x", 1); }, {"after commit"});
}

TEST(AtomicFile, ReplacesAnExistingFileWhole) {
  test::ScratchDir dir;
  test::write_file(dir.file("out"), {1, 2, 3, 4, 5, 6, 7, 8});
  AtomicFile file(dir.file("out"));
  file.resize(4);
  file.write_at(0, "ab", 2);
  EXPECT_EQ(test::read_file(dir.file("out")).size(), 8u);  // old content until commit
  file.commit();
  EXPECT_EQ(test::read_file(dir.file("out")), (std::vector<std::uint8_t>{'a', 'b', 0, 0}));
  EXPECT_EQ(dir.entries().size(), 1u);
}

TEST(AtomicFile, DiscardAndDestructionLeaveNothing) {
  test::ScratchDir dir;
  {
    AtomicFile file(dir.file("a"));
    file.write_at(0, "data", 4);
  }
  AtomicFile b(dir.file("b"));
  b.write_at(0, "data", 4);
  b.discard();
  EXPECT_TRUE(dir.entries().empty());
}

TEST(AtomicFile, AKilledProcessLeavesNothing) {
  test::ScratchDir dir;
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    AtomicFile file(dir.file("out"));
    const std::vector<char> block(1 << 20, 'x');
    file.write_at(0, block.data(), block.size());
    ::raise(SIGKILL);
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFSIGNALED(status));
  EXPECT_TRUE(dir.entries().empty());
}

TEST(AtomicFile, Refusals) {
  test::ScratchDir dir;
  test::expect_error([&] { AtomicFile f(dir.file("no/such/dir/out")); }, {"does not exist"});
  test::expect_error([&] { AtomicFile f(dir.path() + "/"); }, {"names no file"});
}

}  // namespace
}  // namespace lowbit

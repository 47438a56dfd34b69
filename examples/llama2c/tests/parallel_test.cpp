// parallel_tasks: every index runs once, and an exception is rethrown on the caller's
// thread after all tasks finished (the first by index), never inside the parallel region.
#include "llama2c/parallel.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

namespace llama2c {
namespace {

TEST(Parallel, RunsEveryTaskOnce) {
  std::vector<int> runs(37, 0);
  parallel_tasks(runs.size(), [&](std::size_t i) { ++runs[i]; });
  for (std::size_t i = 0; i < runs.size(); ++i) EXPECT_EQ(runs[i], 1) << i;
  parallel_tasks(0, [](std::size_t) { ADD_FAILURE() << "no task expected"; });
}

TEST(Parallel, RethrowsTheFirstErrorAfterAllTasks) {
  std::atomic<int> finished{0};
  try {
    parallel_tasks(16, [&](std::size_t i) {
      ++finished;
      if (i == 11 || i == 5) throw std::runtime_error("task " + std::to_string(i));
    });
    ADD_FAILURE() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "task 5");
  }
  EXPECT_EQ(finished.load(), 16);
}

}  // namespace
}  // namespace llama2c

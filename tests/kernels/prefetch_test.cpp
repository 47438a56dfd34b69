// prefetch_ahead: the lines it asks for cover the span and never pass the end of the storage.
#include "lowbit/kernels/prefetch.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

namespace lowbit::detail {
namespace {

TEST(Prefetch, AsksForEveryLineOfTheSpan) {
  const std::vector<std::uint8_t> storage(4096);
  const std::uint8_t* end = storage.data() + storage.size();
  EXPECT_EQ(prefetch_ahead(storage.data(), 0, 1024, end), 16);
  EXPECT_EQ(prefetch_ahead(storage.data(), 100, 65, end), 2);   // lines start at 100 and 164
  EXPECT_EQ(prefetch_ahead(storage.data(), 0, 0, end), 0);
}

TEST(Prefetch, StopsAtTheEndOfTheStorage) {
  const std::vector<std::uint8_t> storage(1000);
  const std::uint8_t* end = storage.data() + storage.size();
  EXPECT_EQ(prefetch_ahead(storage.data(), 900, 1024, end), 2);  // 900 and 964; 1028 is past the end
  EXPECT_EQ(prefetch_ahead(storage.data(), 1000, 64, end), 0);
  EXPECT_EQ(prefetch_ahead(storage.data(), 5000, 64, end), 0);   // the last row group has no successor
}

}  // namespace
}  // namespace lowbit::detail

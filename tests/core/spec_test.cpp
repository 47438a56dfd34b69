#include "lowbit/core/spec.hpp"

#include <gtest/gtest.h>

#include <string>

namespace lowbit {
namespace {

std::string error_of(const QuantSpec& spec) {
  try {
    spec.validate();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(QuantSpec, DefaultsAreFourBitGroupsOf64) {
  const QuantSpec spec;
  EXPECT_EQ(spec.bits, 4);
  EXPECT_EQ(spec.group_size, 64);
  EXPECT_FALSE(spec.symmetric);
  EXPECT_EQ(spec.max_code(), 15);
  EXPECT_NO_THROW(spec.validate());
}

TEST(QuantSpec, ErrorsNameTheFieldAndValue) {
  EXPECT_NE(error_of({.bits = 9}).find("QuantSpec.bits = 9"), std::string::npos);
  EXPECT_NE(error_of({.bits = 0}).find("QuantSpec.bits = 0"), std::string::npos);
  EXPECT_NE(error_of({.group_size = -3}).find("QuantSpec.group_size = -3"), std::string::npos);
  for (int bits = 1; bits <= 8; ++bits) EXPECT_EQ(error_of({.bits = bits}), "");
}

TEST(QuantSpec, GroupsCoverRaggedRowsAndWholeRows) {
  const QuantSpec spec{.group_size = 64};
  EXPECT_EQ(spec.groups_per_row(172), 3);
  EXPECT_EQ(spec.groups_per_row(128), 2);
  const QuantSpec per_row{.group_size = 0};
  EXPECT_EQ(per_row.group_length(172), 172);
  EXPECT_EQ(per_row.groups_per_row(172), 1);
  EXPECT_EQ(QuantSpec{.group_size = 500}.groups_per_row(100), 1);  // a group longer than the row
}

}  // namespace
}  // namespace lowbit

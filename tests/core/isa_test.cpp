#include "lowbit/core/isa.hpp"

#include <gtest/gtest.h>

namespace lowbit {
namespace {

TEST(Isa, NamesRoundTrip) {
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon}) EXPECT_EQ(parse_isa(isa_name(isa)), isa);
  EXPECT_THROW((void)parse_isa("sse9"), Error);
}

TEST(Isa, ScalarAlwaysRunsAndBestIsSupported) {
  EXPECT_TRUE(isa_supported(Isa::Scalar));
  EXPECT_TRUE(isa_supported(best_isa()));
  EXPECT_TRUE(isa_supported(active_isa()));
}

TEST(Isa, SetIsaSwitchesAndRefusesWhatTheCpuLacks) {
  const Isa before = active_isa();
  set_isa(Isa::Scalar);
  EXPECT_EQ(active_isa(), Isa::Scalar);
  for (Isa isa : {Isa::Avx2, Isa::Avx512, Isa::Neon}) {
    if (isa_supported(isa)) {
      set_isa(isa);
      EXPECT_EQ(active_isa(), isa);
    } else {
      EXPECT_THROW(set_isa(isa), Error);
    }
  }
  set_isa(before);
}

}  // namespace
}  // namespace lowbit

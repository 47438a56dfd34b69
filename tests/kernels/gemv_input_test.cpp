// Preparing x for the GEMV kernels: stored order, lane order, group sums, and the
// per-lane group plan.
#include "lowbit/kernels/gemv_input.hpp"

#include <gtest/gtest.h>

#include <set>

#include "kernel_test_util.hpp"
#include "lowbit/kernels/gemv.hpp"

namespace lowbit {
namespace {

TEST(GemvInput, LanePositionPermutesEachUnit) {
  for (int lanes : {8, 16}) {
    const Index unit = detail::unit_codes(lanes);
    for (Index start : {Index{0}, unit, 5 * unit}) {
      std::set<Index> seen;
      for (Index c = start; c < start + unit; ++c) {
        const Index p = detail::lane_position(c, lanes);
        EXPECT_GE(p, start);
        EXPECT_LT(p, start + unit);
        seen.insert(p);
      }
      EXPECT_EQ(static_cast<Index>(seen.size()), unit) << lanes;
    }
    // Code 4k + b of a unit sits in lane k of slice b.
    EXPECT_EQ(detail::lane_position(4 * 3 + 2, lanes), 2 * lanes + 3);
    EXPECT_EQ(detail::lane_position(unit + 1, lanes), unit + lanes);
  }
  EXPECT_EQ(detail::lane_position(37, 0), 37);
}

TEST(GemvInput, PermutesOncePadsWithZerosAndSumsGroups) {
  const test::Case c{4, 300, 4, 64, GroupAxis::Input, true};
  const auto q = test::quantized_case<float>(c, 3);
  const Vector<float> x = test::random_matrix<float>(c.cols, 1, 4);
  for (int lanes : {0, 8, 16}) {
    const auto input = detail::prepare_gemv_input(q, x.data(), lanes);
    ASSERT_EQ(static_cast<Index>(input.x.size()), 512);  // two whole blocks
    for (Index j = 0; j < 512; ++j) {
      const float expected = j < c.cols ? x[q.permutation()[static_cast<std::size_t>(j)]] : 0.0f;
      // Lane order in the full block, natural order in the short last block (codes 256..319).
      EXPECT_EQ(input.x[static_cast<std::size_t>(detail::input_position(j, c.cols, lanes))], expected) << j;
    }
    ASSERT_EQ(static_cast<Index>(input.group_sums.size()), 5);
    for (Index g = 0; g < 5; ++g) {
      double sum = 0;
      for (Index j = 64 * g; j < std::min<Index>(c.cols, 64 * (g + 1)); ++j)
        sum += x[q.permutation()[static_cast<std::size_t>(j)]];
      EXPECT_EQ(input.group_sums[static_cast<std::size_t>(g)], static_cast<float>(sum)) << g;
    }
  }
}

// The buffers are reused from call to call and never shrink: after a longer x, a
// shorter one must still read zeros past its end (a folded-zero table kernel turns a
// stale padding entry x_j into -z s x_j), and a call without group sums leaves them.
TEST(GemvInput, ReusedBuffersPadAShorterInputWithZeros) {
  detail::GemvInput<float> input;
  const auto longer = test::quantized_case<float>(test::Case{2, 300, 4, 64}, 5);
  const Vector<float> x_long = Vector<float>::Constant(300, 7.0f);
  detail::prepare_gemv_input(longer, x_long.data(), 16, input);
  ASSERT_EQ(input.x.size(), 512u);
  const auto shorter = test::quantized_case<float>(test::Case{2, 40, 4, 32}, 6);
  const Vector<float> x_short = test::random_matrix<float>(40, 1, 7);
  detail::prepare_gemv_input(shorter, x_short.data(), 16, input, /*with_group_sums=*/false);
  ASSERT_GE(input.x.size(), 256u);
  for (Index j = 0; j < 256; ++j) EXPECT_EQ(input.x[static_cast<std::size_t>(j)], j < 40 ? x_short[j] : 0.0f) << j;

  // Through gemv on one thread (so through one thread's buffers): a 300-wide product,
  // then 40-wide ones on the table path, against dequantize().
  test::ThreadScope single(1);
  Vector<float> y_long(2), y_short(2);
  gemv(longer, x_long, y_long);
  gemv(shorter, x_short, y_short);
  test::expect_within(y_short.cast<double>(), test::reference_gemv(shorter, x_short),
                      test::gemv_bound(shorter, test::logical_params(shorter), x_short.cast<double>()), "40 after 300");
}

TEST(GemvInput, LaneGroupsGiveEachLaneItsGroup) {
  for (int lanes : {8, 16})
    for (Index group : {4, 12, 32, 100}) {
      const Index n = 1000, unit = detail::unit_codes(lanes);
      const auto plan = detail::lane_groups(n, group, lanes);
      const Index groups = (n + group - 1) / group;
      for (Index u = 0; u * unit < n; ++u) {
        const auto count = plan.count[static_cast<std::size_t>(u)];
        EXPECT_GE(count, 1);
        EXPECT_LE(count, lanes);  // one masked load of `lanes` scales covers the unit
        EXPECT_LE(plan.first[static_cast<std::size_t>(u)] + count, groups);
        for (Index k = 0; k < lanes; ++k) {
          const auto offset = plan.offset[static_cast<std::size_t>(u * lanes + k)];
          EXPECT_LT(offset, count);
          const Index code = u * unit + 4 * k;  // the lane's four codes share this group
          if (code < n) {
            EXPECT_EQ(plan.first[static_cast<std::size_t>(u)] + offset, code / group) << group << " " << u;
          }
        }
      }
    }
}

TEST(GemvInput, ScaleModeFollowsTheGroupSize) {
  using detail::ScaleMode;
  EXPECT_EQ(detail::scale_mode(4096, 64, 16), ScaleMode::PerGroup);
  EXPECT_EQ(detail::scale_mode(4096, 32, 16), ScaleMode::PerLane);
  EXPECT_EQ(detail::scale_mode(4096, 32, 8), ScaleMode::PerGroup);
  EXPECT_EQ(detail::scale_mode(4096, 100, 16), ScaleMode::PerLane);
  EXPECT_EQ(detail::scale_mode(4096, 7, 16), ScaleMode::Generic);
  EXPECT_EQ(detail::scale_mode(300, 300, 16), ScaleMode::PerGroup);  // one group per row
}

}  // namespace
}  // namespace lowbit

// Rows whose last block is shorter than 256 codes (gemv_short_block.hpp): the short-block
// plan and geometry against the packed layout, the SIMD decode of a short block, every
// ISA variant of lowbit::gemv against dequantize() on row lengths around every short
// block size, thread-count invariance, and no heap allocation per call once warm.
#include "lowbit/kernels/gemv_short_block.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>

#include "kernel_test_util.hpp"
#include "lowbit/kernels/gemv.hpp"
#include "lowbit/pack/scalar.hpp"

// Counts heap allocations of this test program (for the no-allocation-per-call test).
namespace {
std::atomic<long> g_allocations{0};
}  // namespace

// None of the replacements is inlined: GCC would otherwise pair the malloc() and free()
// inside them with new and delete expressions and warn (-Wmismatched-new-delete).
[[gnu::noinline]] void* operator new(std::size_t size) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace lowbit {
namespace {

using test::Case;

// Row lengths of the issue: inside one 32-code pad, every short block size, a full
// single block (255), and a full block followed by a short one.
const std::vector<Index>& short_row_lengths() {
  static const std::vector<Index> lengths{1, 31, 32, 33, 64, 100, 172, 200, 255, 257, 300, 511};
  return lengths;
}

TEST(GemvShortBlock, LayoutSplitsRowsIntoFullAndShortBlocks) {
  EXPECT_EQ(detail::full_block_layout_codes(64), 0);
  EXPECT_EQ(detail::short_block_codes(64), 64);
  EXPECT_EQ(detail::short_block_codes(172), 192);
  EXPECT_EQ(detail::full_block_layout_codes(255), 256);  // padded to 256: one full block
  EXPECT_EQ(detail::short_block_codes(255), 0);
  EXPECT_EQ(detail::full_block_layout_codes(300), 256);
  EXPECT_EQ(detail::short_block_codes(300), 64);
  EXPECT_EQ(detail::short_block_codes(512), 0);
}

// plane_slot finds every code of a short block where the scalar packer put it.
TEST(GemvShortBlock, PlaneSlotsLocateEveryCodeOfTheLayout) {
  for (int bits = 1; bits <= 8; ++bits)
    for (Index m = 32; m < 256; m += 32) {
      const auto codes = test::random_codes(m, bits, static_cast<std::uint64_t>(bits * 1000 + m));
      std::vector<std::uint8_t> packed(static_cast<std::size_t>(m * bits / 8));
      detail::scalar::pack_row(codes.data(), m, bits, packed.data());
      const detail::PlaneSet set = detail::planes_for_bits(bits);
      const Index slot_codes = detail::short_slot_codes(bits, m);
      ASSERT_EQ(detail::short_slots(bits) * slot_codes, m);
      for (int slot = 0; slot < detail::short_slots(bits); ++slot)
        for (Index within = 0; within < slot_codes; ++within) {
          int code = 0;
          for (int plane = 0; plane < set.count; ++plane) {
            const auto where = detail::plane_slot(bits, plane, m, slot);
            const detail::Plane p = set.planes[static_cast<std::size_t>(plane)];
            code |= ((packed[static_cast<std::size_t>(where.byte + within)] >> where.shift) & ((1 << p.width) - 1))
                    << p.shift;
          }
          ASSERT_EQ(code, codes[static_cast<std::size_t>(slot * slot_codes + within)])
              << bits << " bits, m " << m << ", slot " << slot << ", position " << within;
        }
    }
}

TEST(GemvShortBlock, PlanGivesEveryPositionItsGroup) {
  for (Index n : short_row_lengths())
    for (Index group : {Index{4}, Index{7}, Index{12}, Index{32}, Index{64}, Index{100}, n}) {
      detail::ShortBlockPlan plan;
      detail::plan_short_block(n, group, plan);
      EXPECT_EQ(plan.codes, detail::short_block_codes(n));
      if (plan.codes == 0) continue;
      EXPECT_EQ(plan.first_group, plan.begin / group);
      EXPECT_EQ(plan.first_group + plan.group_count, (n + group - 1) / group) << n << " " << group;
      for (Index j = 0; j < static_cast<Index>(plan.group.size()); ++j) {
        const auto g = plan.group[static_cast<std::size_t>(j)];
        ASSERT_GE(g, 0);
        ASSERT_LT(g, plan.group_count);  // every entry, padding included, indexes a real group
        if (plan.begin + j < n) {
          ASSERT_EQ(plan.first_group + g, (plan.begin + j) / group) << n << " " << group << " " << j;
        }
      }
    }
}

TEST(GemvShortBlock, DirectFullBlocksStopBeforeTheStorageEnd) {
  std::vector<std::uint8_t> storage(3 * 128);
  const std::uint8_t* end = storage.data() + storage.size();
  EXPECT_EQ(detail::direct_full_blocks(storage.data(), 3, 128, end), 2);  // the last would overread
  EXPECT_EQ(detail::direct_full_blocks(storage.data(), 2, 128, end), 2);
  EXPECT_EQ(detail::direct_full_blocks(storage.data(), 0, 128, end), 0);
}

// The short-block paths take group sizes the full-block kernels leave to scalar.
TEST(GemvShortBlock, ShortRowsTakeTheSimdKernelForAnyGroupSize) {
#if defined(LOWBIT_HAVE_AVX512)
  EXPECT_EQ(detail::gemv_lanes(Isa::Avx512, 172, 7), 16);
  EXPECT_EQ(detail::gemv_lanes(Isa::Avx2, 200, 7), 8);
  EXPECT_EQ(detail::gemv_lanes(Isa::Avx512, 255, 7), 0);  // one full block: generic
  EXPECT_EQ(detail::gemv_lanes(Isa::Avx512, 300, 7), 0);
#endif
}

#if defined(LOWBIT_HAVE_AVX512)
template <int Bits>
LOWBIT_TARGET_AVX512 void avx512_short_codes(const std::uint8_t* block, Index m, int slot, Index within,
                                             std::int32_t* out) {
  const Index count = std::min<Index>(16, detail::short_slot_codes(Bits, m) - within);
  _mm512_storeu_si512(out, detail::avx512::short_codes<Bits>(block, m, slot, within, detail::avx512::first_lanes(count)));
}
#endif
#if defined(LOWBIT_HAVE_AVX2)
template <int Bits>
LOWBIT_TARGET_AVX2 void avx2_short_codes(const std::uint8_t* block, Index m, int slot, Index within,
                                         std::int32_t* out) {
  const Index count = std::min<Index>(8, detail::short_slot_codes(Bits, m) - within);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), detail::avx2::short_codes<Bits>(block, m, slot, within, count));
}
#endif

// The vector decode of a short block, lane by lane, on an exactly sized buffer (ASan
// sees any read past the block): lane k holds the code at slot * L_min + within + k,
// and lanes past the slot hold 0.
template <int Bits>
void expect_short_block_decodes(Isa isa) {
  for (Index m = 32; m < 256; m += 32) {
    const auto codes = test::random_codes(m, Bits, static_cast<std::uint64_t>(Bits * 77 + m));
    std::vector<std::uint8_t> packed(static_cast<std::size_t>(m * Bits / 8));
    detail::scalar::pack_row(codes.data(), m, Bits, packed.data());
    const Index slot_codes = detail::short_slot_codes(Bits, m);
    const Index lanes = isa == Isa::Avx512 ? 16 : 8;
    for (int slot = 0; slot < detail::short_slots(Bits); ++slot)
      for (Index within = 0; within < slot_codes; within += lanes) {
        std::int32_t out[16] = {};
#if defined(LOWBIT_HAVE_AVX512)
        if (isa == Isa::Avx512) avx512_short_codes<Bits>(packed.data(), m, slot, within, out);
#endif
#if defined(LOWBIT_HAVE_AVX2)
        if (isa == Isa::Avx2) avx2_short_codes<Bits>(packed.data(), m, slot, within, out);
#endif
        for (Index k = 0; k < lanes; ++k) {
          const int expected =
              within + k < slot_codes ? codes[static_cast<std::size_t>(slot * slot_codes + within + k)] : 0;
          ASSERT_EQ(out[k], expected) << isa_name(isa) << " " << Bits << " bits, m " << m << ", slot " << slot
                                      << ", lane " << within + k;
        }
      }
  }
}

TEST(GemvShortBlock, VectorDecodeReadsTheShortLayoutInPlace) {
  for (Isa isa : test::runnable_isas()) {
    if (isa != Isa::Avx2 && isa != Isa::Avx512) continue;
    expect_short_block_decodes<1>(isa);
    expect_short_block_decodes<2>(isa);
    expect_short_block_decodes<3>(isa);
    expect_short_block_decodes<4>(isa);
    expect_short_block_decodes<5>(isa);
    expect_short_block_decodes<6>(isa);
    expect_short_block_decodes<7>(isa);
    expect_short_block_decodes<8>(isa);
  }
}

// Every ISA, row length, bit width and group size (32/64/128, whole row, units split
// by 12, ragged 100, and 7, which only the short block takes on SIMD), input-axis,
// act-order permuted and output-axis (whose short block is in the outputs): within the
// bound of kernel_test_util.hpp on RTN data, exact on exact_case data.
TEST(GemvShortBlock, EveryIsaMatchesTheDequantizedReferenceOnShortRows) {
  test::ThreadScope single(1);
  for (Isa isa : test::runnable_isas()) {
    test::IsaScope scope(isa);
    std::uint64_t seed = 100;
    for (Index n : short_row_lengths())
      for (int bits = 1; bits <= 8; ++bits)
        for (Index group : {Index{32}, Index{64}, Index{128}, Index{0}, Index{12}, Index{100}, Index{7}})
          for (int variant = 0; variant < 3; ++variant) {
            Case c{13, n, bits, group};  // 13 rows: an 8-row, a 4-row and a 1-row kernel call
            c.permuted = variant == 1 && n > 1;
            if (variant == 2) c = Case{n, 5, bits, group, GroupAxis::Output};
            ++seed;
            const std::string name = std::string(isa_name(isa)) + " " + c.name();
            const QuantizedMatrix<float> q = test::quantized_case<float>(c, seed);
            const Vector<float> x = test::random_matrix<float>(c.cols, 1, seed + 7);
            Vector<float> y(c.rows);
            gemv(q, x, y);
            test::expect_within(y.cast<double>(), test::reference_gemv(q, x),
                                test::gemv_bound(q, test::logical_params(q), x.cast<double>()), name);
            const QuantizedMatrix<float> exact = test::exact_case(c, seed);
            const Vector<float> xi = test::small_integers(c.cols, 1, seed + 3);
            gemv(exact, xi, y);
            test::expect_within(y.cast<double>(), test::reference_gemv(exact, xi), Vector<double>::Zero(c.rows),
                                "exact " + name);
            if (::testing::Test::HasFailure()) return;
          }
  }
}

// Matrices big enough to be split among threads, with short last blocks: the same bits.
TEST(GemvShortBlock, BitIdenticalForOneAndTwoThreads) {
  test::expect_thread_invariant({Case{400, 172, 4, 32}, Case{301, 64, 4, 32}, Case{301, 64, 2, 32},
                                 Case{600, 300, 3, 64, GroupAxis::Input, true},
                                 Case{1100, 64, 2, 7}, Case{172, 400, 4, 32, GroupAxis::Output},
                                 Case{200, 333, 5, 12, GroupAxis::Output}},
                                [](const auto& q, const auto& x, auto& y) { gemv(q, x, y); });
}

// Once a thread has run the shapes of a model, further calls allocate nothing (the
// shapes of a stories260K layer: 64 x 64, 172 x 64, 64 x 172, g32 and act-order).
TEST(GemvShortBlock, WarmCallsDoNotAllocate) {
  test::ThreadScope single(1);
  for (Isa isa : test::runnable_isas()) {
    test::IsaScope scope(isa);
    std::vector<QuantizedMatrix<float>> layers;
    for (const Case& c : {Case{64, 64, 4, 32}, Case{172, 64, 4, 32, GroupAxis::Input, true}, Case{64, 172, 4, 32},
                          Case{64, 172, 3, 64, GroupAxis::Output}})
      layers.push_back(test::quantized_case<float>(c, 10));
    std::vector<Vector<float>> xs, ys;
    for (const auto& q : layers) {
      xs.push_back(test::random_matrix<float>(q.cols(), 1, 11));
      ys.emplace_back(q.rows());
    }
    for (std::size_t i = 0; i < layers.size(); ++i) gemv(layers[i], xs[i], ys[i]);  // warm up
    const long before = g_allocations.load();
    for (int round = 0; round < 3; ++round)
      for (std::size_t i = 0; i < layers.size(); ++i) gemv(layers[i], xs[i], ys[i]);
    EXPECT_EQ(g_allocations.load() - before, 0) << isa_name(isa);
  }
}

}  // namespace
}  // namespace lowbit

// safetensors reader and writer: round trips of every float and integer dtype, metadata,
// views, every malformed-file case the reader must refuse, and atomic writing.
#include "lowbit/io/safetensors.hpp"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <random>

#include "io/io_test_util.hpp"
#include "test_util.hpp"

namespace lowbit {
namespace {

using test::expect_error;
using test::raw_safetensors;

TEST(SafeTensors, FloatMatricesRoundTripInEveryFloatDtype) {
  test::ScratchDir dir;
  const Matrix<float> m = test::random_matrix<float>(7, 13, 1);
  SafeTensorsWriter writer(dir.file("m.safetensors"));
  writer.add_matrix("f32", m, DType::F32);
  writer.add_matrix("f16", m, DType::F16);
  writer.add_matrix("bf16", m, DType::BF16);
  writer.add_matrix("f64", m, DType::F64);
  writer.commit();

  const auto file = SafeTensors::open(dir.file("m.safetensors"));
  ASSERT_EQ(file.tensors().size(), 4u);
  EXPECT_EQ(file.matrix("f32"), m);
  EXPECT_EQ(file.matrix("f64"), m);
  for (Index i = 0; i < m.size(); ++i) {
    // Each conversion is the round-to-nearest value of its type.
    EXPECT_EQ(file.matrix("f16").data()[i], static_cast<float>(Eigen::half(m.data()[i])));
    EXPECT_EQ(file.matrix("bf16").data()[i], static_cast<float>(Eigen::bfloat16(m.data()[i])));
  }
  EXPECT_EQ(file.info("f16").dtype, DType::F16);
  EXPECT_EQ(file.info("bf16").shape, (std::vector<std::uint64_t>{7, 13}));
}

TEST(SafeTensors, ViewsAreZeroCopyAndAligned) {
  test::ScratchDir dir;
  const Matrix<float> m = test::random_matrix<float>(5, 3, 2);
  SafeTensorsWriter writer(dir.file("v.safetensors"));
  writer.add_matrix("half", m, DType::F16);  // declared first, laid out after the 4-byte tensors
  writer.add_matrix("w", m);
  const std::uint8_t odd[3] = {1, 2, 3};
  writer.add_values<std::uint8_t>("odd", {3}, odd);
  writer.commit();
  const auto file = SafeTensors::open(dir.file("v.safetensors"));
  const auto view = file.view("w");
  EXPECT_EQ(Matrix<float>(view), m);
  EXPECT_EQ(reinterpret_cast<const std::uint8_t*>(view.data()), file.bytes("w").data());
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(view.data()) % 4, 0u);
  expect_error([&] { (void)file.view("half"); }, {"'half'", "F16", "matrix()"});
}

TEST(SafeTensors, RawIntegerTensorsAndMetadataSurvive) {
  test::ScratchDir dir;
  const std::vector<std::int8_t> i8 = {-128, -1, 0, 127};
  const std::vector<std::uint8_t> u8 = {0, 7, 255};
  const std::vector<std::int32_t> i32 = {INT32_MIN, -5, 0, INT32_MAX, 9, 10};
  const std::vector<std::int64_t> i64 = {INT64_MIN, INT64_MAX};
  SafeTensorsWriter writer(dir.file("raw.safetensors"));
  writer.add_values<std::int8_t>("i8", {2, 2}, i8);
  writer.add_values<std::uint8_t>("u8", {3}, u8);
  writer.add_values<std::int32_t>("i32", {2, 3}, i32);
  writer.add_values<std::int64_t>("scalar_pair", {2}, i64);
  const std::int64_t one = 42;
  writer.add_values<std::int64_t>("scalar", {}, std::span<const std::int64_t>(&one, 1));
  writer.add("empty", DType::F32, {0, 4}, {});
  writer.set_metadata("format", "pt");
  writer.set_metadata("note", "Grüße \xe2\x9c\x93");
  writer.commit();

  const auto file = SafeTensors::open(dir.file("raw.safetensors"));
  EXPECT_EQ(file.values<std::int8_t>("i8"), i8);
  EXPECT_EQ(file.values<std::uint8_t>("u8"), u8);
  EXPECT_EQ(file.values<std::int32_t>("i32"), i32);
  EXPECT_EQ(file.values<std::int64_t>("scalar_pair"), i64);
  EXPECT_EQ(file.integers("scalar"), std::vector<std::int64_t>{42});
  EXPECT_EQ(file.info("scalar").rank(), 0u);
  EXPECT_EQ(file.integers("i32"), std::vector<std::int64_t>(i32.begin(), i32.end()));
  EXPECT_EQ(file.matrix("empty").rows(), 0);
  EXPECT_EQ(file.metadata().at("format"), "pt");
  EXPECT_EQ(file.metadata().at("note"), "Grüße \xe2\x9c\x93");
  expect_error([&] { (void)file.values<float>("i32"); }, {"'i32'", "I32", "not F32"});
  expect_error([&] { (void)file.matrix("i8"); }, {"'i8'", "not a float tensor"});
  expect_error([&] { (void)file.info("missing"); }, {"'missing'", "not in the file"});
}

TEST(SafeTensors, StreamedTensorsCanBeWrittenInAnyOrder) {
  test::ScratchDir dir;
  const Matrix<float> a = test::random_matrix<float>(4, 4, 3), b = test::random_matrix<float>(2, 8, 4);
  SafeTensorsWriter writer(dir.file("s.safetensors"));
  writer.declare("a", DType::F32, {4, 4});
  writer.declare("b", DType::F32, {2, 8});
  writer.start();
  writer.write("b", std::span(reinterpret_cast<const std::uint8_t*>(b.data()), 64));
  writer.write("a", std::span(reinterpret_cast<const std::uint8_t*>(a.data()), 64));
  writer.commit();
  const auto file = SafeTensors::open(dir.file("s.safetensors"));
  EXPECT_EQ(file.matrix("a"), a);
  EXPECT_EQ(file.matrix("b"), b);
}

TEST(SafeTensors, WriterRefusesBadDeclarations) {
  test::ScratchDir dir;
  SafeTensorsWriter writer(dir.file("bad.safetensors"));
  writer.declare("a", DType::F32, {2});
  expect_error([&] { writer.declare("a", DType::F32, {2}); }, {"'a'", "declared twice"});
  expect_error([&] { writer.declare("bad\xff", DType::F32, {2}); }, {"not valid UTF-8"});
  expect_error([&] { writer.declare("__metadata__", DType::F32, {2}); }, {"__metadata__"});
  expect_error([&] { writer.add("b", DType::F32, {3}, std::vector<std::uint8_t>(4)); }, {"'b'", "4 bytes", "12"});
  expect_error([&] { writer.declare("huge", DType::F32, {1ull << 62, 8}); }, {"'huge'", "overflows"});
  writer.start();
  expect_error([&] { writer.write("a", std::vector<std::uint8_t>(7)); }, {"'a'", "7 bytes"});
  expect_error([&] { writer.write("nope", std::vector<std::uint8_t>(8)); }, {"'nope'", "not declared"});
  expect_error([&] { writer.commit(); }, {"'a'", "never written"});
  EXPECT_TRUE(dir.entries().empty());  // nothing appeared, not even a temporary
}

TEST(SafeTensors, AnErrorMidWriteLeavesNoFile) {
  test::ScratchDir dir;
  const std::string path = dir.file("out.safetensors");
  try {
    SafeTensorsWriter writer(path);
    writer.declare("a", DType::F32, {1024});
    writer.declare("b", DType::F32, {1024});
    writer.start();
    writer.write("a", std::vector<std::uint8_t>(4096, 1));
    throw std::runtime_error("simulated failure before 'b' is written");
  } catch (const std::runtime_error&) {
  }
  EXPECT_TRUE(dir.entries().empty());
}

TEST(SafeTensors, AnErrorMidWriteKeepsTheOldFile) {
  test::ScratchDir dir;
  const std::string path = dir.file("out.safetensors");
  test::write_file(path, {1, 2, 3});
  {
    SafeTensorsWriter writer(path);
    writer.add_matrix("a", Matrix<float>::Ones(2, 2));
    writer.start();
  }  // destroyed without commit
  EXPECT_EQ(test::read_file(path), (std::vector<std::uint8_t>{1, 2, 3}));
  EXPECT_EQ(dir.entries(), std::set<std::string>{"out.safetensors"});
}

// A process killed in the middle of writing leaves neither the output nor a temporary.
TEST(SafeTensors, AKilledWriterLeavesNoFile) {
  test::ScratchDir dir;
  const std::string path = dir.file("killed.safetensors");
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    SafeTensorsWriter writer(path);
    writer.declare("a", DType::F32, {1 << 16});
    writer.declare("b", DType::F32, {1 << 16});
    writer.start();
    writer.write("a", std::vector<std::uint8_t>(1 << 18, 7));
    ::raise(SIGKILL);
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status));
  EXPECT_TRUE(dir.entries().empty());
}

// A write that fails in the kernel (file size limit: EFBIG) throws and leaves nothing.
TEST(SafeTensors, AFailedSystemWriteThrowsAndLeavesNoFile) {
  test::ScratchDir dir;
  const std::string path = dir.file("big.safetensors");
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::signal(SIGXFSZ, SIG_IGN);
    struct rlimit limit = {1 << 16, 1 << 16};
    ::setrlimit(RLIMIT_FSIZE, &limit);
    int code = 1;
    try {
      SafeTensorsWriter writer(path);
      writer.add("a", DType::U8, {1 << 20}, std::vector<std::uint8_t>(1 << 20, 1));
      writer.commit();
    } catch (const Error& e) {
      code = std::string(e.what()).find(path) != std::string::npos ? 0 : 2;
    }
    ::_exit(code);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_TRUE(dir.entries().empty());
}

// ---- malformed files ------------------------------------------------------------------

SafeTensors parse_raw(const std::string& header, const std::vector<std::uint8_t>& data, std::uint64_t length = UINT64_MAX) {
  return SafeTensors::from_bytes(raw_safetensors(header, data, length), "bad.safetensors");
}

const std::vector<std::uint8_t> k8(8, 0);

TEST(SafeTensorsMalformed, TruncatedBeforeTheHeaderLength) {
  expect_error([] { (void)SafeTensors::from_bytes({1, 2, 3}, "tiny"); }, {"'tiny'", "3 bytes", "truncated"});
  expect_error([] { (void)SafeTensors::from_bytes({}, "empty"); }, {"0 bytes"});
}

TEST(SafeTensorsMalformed, HeaderLengthBeyondTheFile) {
  expect_error([] { (void)parse_raw("{}", {}, 1000); }, {"header length 1000", "past the end of the file", "truncated"});
}

TEST(SafeTensorsMalformed, HugeHeaderIsCapped) {
  expect_error([] { (void)parse_raw("{}", {}, 1ull << 40); }, {"exceeds the cap"});
  expect_error([] { (void)parse_raw("{}", {}, UINT64_MAX - 1); }, {"exceeds the cap"});
}

TEST(SafeTensorsMalformed, HeaderMustBeAJsonObject) {
  expect_error([] { (void)parse_raw("[1, 2]", {}); }, {"does not start with '{'"});
  expect_error([] { (void)parse_raw("", {}); }, {"does not start with '{'"});
  expect_error([] { (void)parse_raw("{\"a\": ", {}); }, {"not valid JSON"});
  expect_error([] { (void)parse_raw("{} trailing", {}); }, {"not valid JSON"});
  expect_error([] { (void)parse_raw("{\"a\": 5}", {}); }, {"tensor 'a'", "must be an object"});
  expect_error([] { (void)parse_raw(std::string("{\"a\": ") + std::string(10000, '[') , {}); }, {"tensor 'a'", "must be an object"});
}

TEST(SafeTensorsMalformed, NonUtf8Names) {
  expect_error([] { (void)parse_raw("{\"na\xff\xfeme\": {}}", {}); }, {"not valid UTF-8", "na\\xff"});
  expect_error([] { (void)parse_raw("{\"\xc0\xaf\": {}}", {}); }, {"not valid UTF-8"});           // overlong '/'
  expect_error([] { (void)parse_raw("{\"\xed\xa0\x80\": {}}", {}); }, {"not valid UTF-8"});       // surrogate
  expect_error([] { (void)parse_raw("{\"\\ud800\": {}}", {}); }, {"not valid JSON"});            // escaped lone surrogate
}

TEST(SafeTensorsMalformed, DuplicateNames) {
  const std::string entry = R"({"dtype":"U8","shape":[4],"data_offsets":[0,4]})";
  expect_error([&] { (void)parse_raw("{\"w\":" + entry + ",\"w\":" + entry + "}", {1, 2, 3, 4}); },
               {"duplicate tensor name 'w'"});
  expect_error([] { (void)parse_raw(R"({"__metadata__":{},"__metadata__":{}})", {}); }, {"__metadata__ appears twice"});
  expect_error([] { (void)parse_raw(R"({"__metadata__":{"k":"a","k":"b"}})", {}); }, {"'k' appears twice"});
  expect_error([] { (void)parse_raw(R"({"w":{"dtype":"U8","dtype":"U8","shape":[0],"data_offsets":[0,0]}})", {}); },
               {"tensor 'w'", "'dtype' appears twice"});
}

TEST(SafeTensorsMalformed, UnknownDtype) {
  expect_error([] { (void)parse_raw(R"({"w":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", k8); },
               {"tensor 'w'", "unknown dtype 'F33'"});
  expect_error([] { (void)parse_raw(R"({"w":{"dtype":7,"shape":[2],"data_offsets":[0,8]}})", k8); },
               {"tensor 'w'", "dtype must be a string"});
}

TEST(SafeTensorsMalformed, ShapeDisagreesWithByteSize) {
  expect_error([] { (void)parse_raw(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", k8); },
               {"tensor 'w'", "[3]", "12 bytes", "hold 8 bytes"});
  expect_error([] { (void)parse_raw(R"({"w":{"dtype":"F32","shape":[],"data_offsets":[0,8]}})", k8); },
               {"tensor 'w'", "4 bytes"});
}

TEST(SafeTensorsMalformed, ShapeProductOverflows) {
  expect_error([] { (void)parse_raw(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", k8); },
               {"tensor 'w'", "overflows 64 bits"});
  expect_error([] { (void)parse_raw(R"({"w":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]}})", k8); },
               {"tensor 'w'", "overflows"});
  expect_error([] { (void)parse_raw(R"({"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,8]}})", k8); },
               {"tensor 'w'", "negative"});
  expect_error([] { (void)parse_raw(R"({"w":{"dtype":"U8","shape":[2.5],"data_offsets":[0,8]}})", k8); },
               {"tensor 'w'", "not an integer"});
  expect_error([] { (void)parse_raw(R"({"w":{"dtype":"U8","shape":[99999999999999999999999],"data_offsets":[0,8]}})", k8); },
               {"tensor 'w'", "not an integer"});
}

TEST(SafeTensorsMalformed, OverlappingOffsets) {
  const std::string header = R"({"a":{"dtype":"U8","shape":[6],"data_offsets":[0,6]},)"
                             R"("b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})";
  expect_error([&] { (void)parse_raw(header, k8); }, {"tensor 'b'", "overlapping tensor 'a'"});
}

TEST(SafeTensorsMalformed, OutOfRangeOffsets) {
  expect_error([] { (void)parse_raw(R"({"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}})", k8); },
               {"tensor 'a'", "past the end of the data (8 bytes)"});
  expect_error([] { (void)parse_raw(R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[9,9]}})", k8); },
               {"tensor 'a'", "past the end"});
  expect_error([] { (void)parse_raw(R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[8,4]}})", k8); },
               {"tensor 'a'", "end before they begin"});
  expect_error([] { (void)parse_raw(R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8,9]}})", k8); },
               {"tensor 'a'", "3 entries"});
}

TEST(SafeTensorsMalformed, HolesAndUnindexedBytes) {
  expect_error([] { (void)parse_raw(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})", k8); },
               {"tensor 'a'", "unindexed data bytes [0, 4)"});
  expect_error([] { (void)parse_raw(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", k8); },
               {"[4, 8)", "not indexed"});
}

TEST(SafeTensorsMalformed, MissingOrUnknownFieldsAndBadMetadata) {
  expect_error([] { (void)parse_raw(R"({"a":{"shape":[0],"data_offsets":[0,0]}})", {}); }, {"tensor 'a'", "no dtype"});
  expect_error([] { (void)parse_raw(R"({"a":{"dtype":"U8","data_offsets":[0,0]}})", {}); }, {"tensor 'a'", "no shape"});
  expect_error([] { (void)parse_raw(R"({"a":{"dtype":"U8","shape":[0]}})", {}); }, {"tensor 'a'", "no data_offsets"});
  expect_error([] { (void)parse_raw(R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":1}})", {}); },
               {"tensor 'a'", "unknown field 'x'"});
  expect_error([] { (void)parse_raw(R"({"__metadata__":{"k":1}})", {}); }, {"__metadata__ 'k'", "must be a string"});
  expect_error([] { (void)parse_raw(R"({"__metadata__":"x"})", {}); }, {"__metadata__ must be an object"});
  expect_error([] { (void)parse_raw(R"({"a":{"dtype":"U8","shape":[[0]],"data_offsets":[0,0]}})", {}); },
               {"tensor 'a'", "shape entries must be integers"});
}

// Every strict prefix of a valid file is refused with lowbit::Error (never a crash).
TEST(SafeTensorsMalformed, EveryTruncationIsAnError) {
  test::ScratchDir dir;
  SafeTensorsWriter writer(dir.file("t.safetensors"));
  writer.add_matrix("w", test::random_matrix<float>(3, 5, 5), DType::BF16);
  writer.add_values<std::int32_t>("i", {3}, std::vector<std::int32_t>{1, 2, 3});
  writer.set_metadata("format", "pt");
  writer.commit();
  const auto bytes = test::read_file(dir.file("t.safetensors"));
  ASSERT_NO_THROW((void)SafeTensors::from_bytes(bytes));
  for (std::size_t n = 0; n < bytes.size(); ++n)
    EXPECT_THROW((void)SafeTensors::from_bytes(std::vector<std::uint8_t>(bytes.begin(), bytes.begin() + n)), Error) << n;
}

// Random byte corruption: every outcome is a parsed file or lowbit::Error.
TEST(SafeTensorsMalformed, RandomCorruptionNeverCrashes) {
  test::ScratchDir dir;
  SafeTensorsWriter writer(dir.file("c.safetensors"));
  writer.add_matrix("a.weight", test::random_matrix<float>(4, 8, 6), DType::F16);
  writer.add_values<std::uint8_t>("b", {5}, std::vector<std::uint8_t>{1, 2, 3, 4, 5});
  writer.commit();
  const auto bytes = test::read_file(dir.file("c.safetensors"));
  std::mt19937 rng(7);
  int parsed = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    auto corrupt = bytes;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < flips; ++f) corrupt[rng() % std::min<std::size_t>(corrupt.size(), 200)] = static_cast<std::uint8_t>(rng());
    try {
      const auto file = SafeTensors::from_bytes(corrupt);
      for (const auto& t : file.tensors())
        if (is_float_dtype(t.dtype) && t.rank() <= 2) (void)file.matrix(t.name);
      ++parsed;
    } catch (const Error&) {
    }
  }
  EXPECT_GT(parsed, 0);  // flips inside the data leave a valid file
}

}  // namespace
}  // namespace lowbit

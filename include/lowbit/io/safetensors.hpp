// safetensors files: a memory-mapped reader that trusts nothing in the file, and an
// atomic writer.
//
// Format (little-endian):  [u64 N] [N bytes of JSON header] [data]
//   header = { "__metadata__": {str: str},               (optional)
//              name: {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ... }
// Offsets are relative to the start of the data. The reader accepts only what the
// reference implementation accepts: a header of at most 100 MB that is a UTF-8 JSON
// object, no duplicate names, a known dtype, end - begin == prod(shape) * dtype size
// (with overflow checks), and ranges that tile the data exactly (no overlap, no gap,
// nothing unindexed, nothing past the end). Any violation throws lowbit::Error naming
// the file, the tensor and the problem.
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lowbit/core/error.hpp"
#include "lowbit/core/types.hpp"
#include "lowbit/io/atomic_file.hpp"
#include "lowbit/io/mapped_file.hpp"

namespace lowbit {

static_assert(std::endian::native == std::endian::little, "lowbit's safetensors I/O assumes a little-endian host");

enum class DType : std::uint8_t { Bool, U8, I8, U16, I16, F16, BF16, U32, I32, F32, U64, I64, F64, F8_E4M3, F8_E5M2 };

namespace detail {

struct DTypeInfo {
  DType dtype;
  std::string_view name;
  std::size_t size;
};

inline constexpr std::array<DTypeInfo, 15> kDTypes = {{
    {DType::Bool, "BOOL", 1}, {DType::U8, "U8", 1},   {DType::I8, "I8", 1},           {DType::U16, "U16", 2},
    {DType::I16, "I16", 2},   {DType::F16, "F16", 2}, {DType::BF16, "BF16", 2},       {DType::U32, "U32", 4},
    {DType::I32, "I32", 4},   {DType::F32, "F32", 4}, {DType::U64, "U64", 8},         {DType::I64, "I64", 8},
    {DType::F64, "F64", 8},   {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1},
}};

[[nodiscard]] inline const DTypeInfo& dtype_info(DType dtype) {
  for (const auto& info : kDTypes)
    if (info.dtype == dtype) return info;
  fail("dtype ", static_cast<int>(dtype), " is not a safetensors dtype");
}

}  // namespace detail

[[nodiscard]] inline std::string_view dtype_name(DType dtype) { return detail::dtype_info(dtype).name; }
[[nodiscard]] inline std::size_t dtype_size(DType dtype) { return detail::dtype_info(dtype).size; }
[[nodiscard]] inline bool is_float_dtype(DType d) { return d == DType::F16 || d == DType::BF16 || d == DType::F32 || d == DType::F64; }
[[nodiscard]] inline bool is_integer_dtype(DType d) {
  return d == DType::U8 || d == DType::I8 || d == DType::U16 || d == DType::I16 || d == DType::U32 ||
         d == DType::I32 || d == DType::U64 || d == DType::I64 || d == DType::Bool;
}

[[nodiscard]] inline std::optional<DType> parse_dtype(std::string_view name) {
  for (const auto& info : detail::kDTypes)
    if (info.name == name) return info.dtype;
  return std::nullopt;
}

// One tensor of a file: where its bytes are and what they hold.
struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0, end = 0;  // byte range within the data section

  [[nodiscard]] std::uint64_t elements() const {
    std::uint64_t count = 1;
    for (auto d : shape) count *= d;  // checked for overflow when the file was parsed
    return count;
  }
  [[nodiscard]] std::uint64_t byte_size() const { return end - begin; }
  [[nodiscard]] std::size_t rank() const { return shape.size(); }
};

// A tensor as a writer sees it: declared (name, dtype, shape), then with its bytes.
struct TensorDecl {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::uint64_t> shape;
};

struct TensorData {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::uint64_t> shape;
  std::vector<std::uint8_t> bytes;

  [[nodiscard]] TensorDecl decl() const { return {name, dtype, shape}; }
};

namespace detail {

[[nodiscard]] inline std::string shape_text(const std::vector<std::uint64_t>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// Element count of a shape times an element size, or nullopt on 64-bit overflow.
[[nodiscard]] inline std::optional<std::uint64_t> checked_bytes(const std::vector<std::uint64_t>& shape, std::size_t size) {
  std::uint64_t count = size;
  for (auto d : shape)
    if (__builtin_mul_overflow(count, d, &count)) return std::nullopt;
  return count;
}

// Offset of the first byte that is not well-formed UTF-8 (overlong forms, surrogates
// and code points above U+10FFFF are ill-formed), or npos.
[[nodiscard]] inline std::size_t invalid_utf8_at(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = s[i];
    if (c < 0x80) { ++i; continue; }
    std::size_t length;
    unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) length = 2;
    else if (c >= 0xE0 && c <= 0xEF) { length = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { length = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else return i;
    if (i + length > n) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (std::size_t k = 2; k < length; ++k)
      if (s[i + k] < 0x80 || s[i + k] > 0xBF) return i;
    i += length;
  }
  return std::string_view::npos;
}

// Printable form of untrusted bytes for an error message (non-ASCII as \xNN).
[[nodiscard]] inline std::string printable(std::string_view text, std::size_t limit = 80) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < text.size() && i < limit; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c >= 0x20 && c < 0x7F) out += static_cast<char>(c);
    else { out += "\\x"; out += kHex[c >> 4]; out += kHex[c & 15]; }
  }
  if (text.size() > limit) out += "...";
  return out;
}

// Streaming (SAX) reader of the header against the safetensors schema. Nothing deeper
// than the schema is ever built, so a hostile header cannot nest, repeat or bloat.
class HeaderReader {
 public:
  struct Entry {
    std::string name, dtype;
    std::vector<std::uint64_t> shape, offsets;
    bool has_dtype = false, has_shape = false, has_offsets = false;
  };

  std::vector<Entry> entries;
  std::map<std::string, std::string> metadata;
  std::string error;

  bool null() { return unexpected("null"); }
  bool boolean(bool) { return unexpected("a boolean"); }
  bool number_integer(std::int64_t value) {
    if (state_ == State::Array) return failed("tensor '", entry_name(), "': ", field_, " entry ", value, " is negative");
    return unexpected("a number");
  }
  bool number_unsigned(std::uint64_t value) {
    if (state_ != State::Array) return unexpected("a number");
    auto& array = field_ == "shape" ? entries.back().shape : entries.back().offsets;
    array.push_back(value);
    return true;
  }
  bool number_float(double, const std::string& text) {
    if (state_ == State::Array)
      return failed("tensor '", entry_name(), "': ", field_, " entry ", printable(text), " is not an integer in 0..2^64-1");
    return unexpected("a number");
  }
  bool string(std::string& value) {
    if (state_ == State::FieldValue && field_ == "dtype") {
      entries.back().dtype = value;
      entries.back().has_dtype = true;
      state_ = State::Entry;
      return true;
    }
    if (state_ == State::MetaValue) {
      metadata.emplace(meta_key_, value);
      state_ = State::Metadata;
      return true;
    }
    return unexpected("a string");
  }
  bool binary(nlohmann::json::binary_t&) { return unexpected("binary data"); }

  bool start_object(std::size_t) {
    if (state_ == State::Top) { state_ = State::Root; return true; }
    if (state_ == State::EntryValue) { state_ = in_metadata_ ? State::Metadata : State::Entry; return true; }
    return unexpected("an object");
  }
  bool key(std::string& key) {
    switch (state_) {
      case State::Root:
        if (!top_keys_.insert(key).second)
          return failed(key == "__metadata__" ? std::string("__metadata__ appears twice")
                                              : concat("duplicate tensor name '", printable(key), "'"));
        in_metadata_ = key == "__metadata__";
        if (!in_metadata_) {
          entries.emplace_back();
          entries.back().name = key;
        }
        state_ = State::EntryValue;
        return true;
      case State::Entry: {
        auto& e = entries.back();
        bool* seen = key == "dtype" ? &e.has_dtype : key == "shape" ? &e.has_shape : key == "data_offsets" ? &e.has_offsets : nullptr;
        if (seen == nullptr) return failed("tensor '", entry_name(), "': unknown field '", printable(key), "'");
        if (*seen) return failed("tensor '", entry_name(), "': field '", key, "' appears twice");
        *seen = true;
        field_ = key;
        state_ = State::FieldValue;
        return true;
      }
      case State::Metadata:
        if (metadata.count(key) != 0) return failed("__metadata__ key '", printable(key), "' appears twice");
        meta_key_ = key;
        state_ = State::MetaValue;
        return true;
      default:
        return failed("unexpected key '", printable(key), "'");
    }
  }
  bool end_object() {
    if (state_ == State::Root) { state_ = State::Done; return true; }
    if (state_ == State::Metadata) { state_ = State::Root; return true; }
    if (state_ == State::Entry) {
      const auto& e = entries.back();
      if (!e.has_dtype) return failed("tensor '", entry_name(), "': no dtype");
      if (!e.has_shape) return failed("tensor '", entry_name(), "': no shape");
      if (!e.has_offsets) return failed("tensor '", entry_name(), "': no data_offsets");
      state_ = State::Root;
      return true;
    }
    return failed("unexpected end of object");
  }
  bool start_array(std::size_t) {
    if (state_ == State::FieldValue && field_ != "dtype") { state_ = State::Array; return true; }
    return unexpected("an array");
  }
  bool end_array() {
    if (state_ != State::Array) return failed("unexpected end of array");
    if (field_ == "data_offsets" && entries.back().offsets.size() != 2)
      return failed("tensor '", entry_name(), "': data_offsets has ", entries.back().offsets.size(),
                    " entries instead of 2");
    state_ = State::Entry;
    return true;
  }
  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& ex) {
    if (error.empty()) error = concat("header is not valid JSON at byte ", position, " (", ex.what(), ")");
    return false;
  }

  [[nodiscard]] bool done() const { return state_ == State::Done; }

 private:
  enum class State { Top, Root, EntryValue, Entry, FieldValue, Array, Metadata, MetaValue, Done };

  [[nodiscard]] std::string entry_name() const { return entries.empty() ? std::string() : printable(entries.back().name); }

  template <class... Parts>
  bool failed(Parts&&... parts) {
    if (error.empty()) error = concat(std::forward<Parts>(parts)...);
    return false;
  }
  bool unexpected(const char* what) {
    switch (state_) {
      case State::Top: return failed("header must be a JSON object, not ", what);
      case State::EntryValue:
        return in_metadata_ ? failed("__metadata__ must be an object of strings, not ", what)
                            : failed("tensor '", entry_name(), "': entry must be an object, not ", what);
      case State::FieldValue:
        return failed("tensor '", entry_name(), "': ", field_, " must be ",
                      field_ == "dtype" ? "a string" : "an array of integers", ", not ", what);
      case State::Array: return failed("tensor '", entry_name(), "': ", field_, " entries must be integers, not ", what);
      case State::MetaValue: return failed("__metadata__ '", printable(meta_key_), "' must be a string, not ", what);
      default: return failed("unexpected ", what, " in the header");
    }
  }

  State state_ = State::Top;
  std::set<std::string> top_keys_;
  bool in_metadata_ = false;
  std::string field_, meta_key_;
};

[[nodiscard]] inline float half_to_float(std::uint16_t bits) {
  return static_cast<float>(Eigen::half(Eigen::half_impl::raw_uint16_to_half(bits)));
}
[[nodiscard]] inline float bfloat16_to_float(std::uint16_t bits) { return std::bit_cast<float>(std::uint32_t{bits} << 16); }
[[nodiscard]] inline std::uint16_t float_to_half(float value) {  // round to nearest even
  return Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(value));
}
[[nodiscard]] inline std::uint16_t float_to_bfloat16(float value) {  // round to nearest even
  return Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(value));
}

template <class T>
[[nodiscard]] T load_unaligned(const std::uint8_t* p) {
  T value;
  std::memcpy(&value, p, sizeof(T));
  return value;
}

// count elements of a float dtype (F16/BF16/F32/F64) into floats; any alignment.
inline void floats_from_bytes(DType dtype, const std::uint8_t* src, std::size_t count, float* dst) {
  if (count == 0 && is_float_dtype(dtype)) return;  // empty tensors may have null pointers
  switch (dtype) {
    case DType::F32: std::memcpy(dst, src, count * 4); return;
    case DType::F16: for (std::size_t i = 0; i < count; ++i) dst[i] = half_to_float(load_unaligned<std::uint16_t>(src + 2 * i)); return;
    case DType::BF16: for (std::size_t i = 0; i < count; ++i) dst[i] = bfloat16_to_float(load_unaligned<std::uint16_t>(src + 2 * i)); return;
    case DType::F64: for (std::size_t i = 0; i < count; ++i) dst[i] = static_cast<float>(load_unaligned<double>(src + 8 * i)); return;
    default: fail("dtype ", dtype_name(dtype), " is not a float dtype");
  }
}

// count floats into bytes of a float dtype.
inline void floats_to_bytes(DType dtype, const float* src, std::size_t count, std::uint8_t* dst) {
  if (count == 0 && is_float_dtype(dtype)) return;
  switch (dtype) {
    case DType::F32: std::memcpy(dst, src, count * 4); return;
    case DType::F16: for (std::size_t i = 0; i < count; ++i) { const auto b = float_to_half(src[i]); std::memcpy(dst + 2 * i, &b, 2); } return;
    case DType::BF16: for (std::size_t i = 0; i < count; ++i) { const auto b = float_to_bfloat16(src[i]); std::memcpy(dst + 2 * i, &b, 2); } return;
    case DType::F64: for (std::size_t i = 0; i < count; ++i) { const double d = src[i]; std::memcpy(dst + 8 * i, &d, 8); } return;
    default: fail("dtype ", dtype_name(dtype), " is not a float dtype");
  }
}

// Float values stored as a float dtype.
[[nodiscard]] inline TensorData float_tensor(std::string name, DType dtype, std::vector<std::uint64_t> shape,
                                             std::span<const float> values) {
  TensorData t{std::move(name), dtype, std::move(shape), std::vector<std::uint8_t>(values.size() * dtype_size(dtype))};
  floats_to_bytes(dtype, values.data(), values.size(), t.bytes.data());
  return t;
}

// Integer (or any trivially copyable) values stored as their own dtype.
template <class T>
[[nodiscard]] TensorData value_tensor(std::string name, DType dtype, std::vector<std::uint64_t> shape, std::span<const T> values) {
  require(dtype_size(dtype) == sizeof(T), "value_tensor: dtype ", dtype_name(dtype), " is not ", sizeof(T), " bytes");
  TensorData t{std::move(name), dtype, std::move(shape), std::vector<std::uint8_t>(values.size() * sizeof(T))};
  if (!values.empty()) std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
  return t;
}

// Integer element i of an integer dtype, widened.
[[nodiscard]] inline std::int64_t integer_at(DType dtype, const std::uint8_t* src, std::size_t i, const std::string& what) {
  switch (dtype) {
    case DType::Bool:
    case DType::U8: return src[i];
    case DType::I8: return static_cast<std::int8_t>(src[i]);
    case DType::U16: return load_unaligned<std::uint16_t>(src + 2 * i);
    case DType::I16: return load_unaligned<std::int16_t>(src + 2 * i);
    case DType::U32: return load_unaligned<std::uint32_t>(src + 4 * i);
    case DType::I32: return load_unaligned<std::int32_t>(src + 4 * i);
    case DType::I64: return load_unaligned<std::int64_t>(src + 8 * i);
    case DType::U64: {
      const auto v = load_unaligned<std::uint64_t>(src + 8 * i);
      require(v <= static_cast<std::uint64_t>(INT64_MAX), what, "[", i, "] = ", v, " does not fit in int64");
      return static_cast<std::int64_t>(v);
    }
    default: fail(what, ": dtype ", dtype_name(dtype), " is not an integer dtype");
  }
}

template <class T>
[[nodiscard]] constexpr std::optional<DType> dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::F32;
  else if constexpr (std::is_same_v<T, double>) return DType::F64;
  else if constexpr (std::is_same_v<T, std::uint8_t>) return DType::U8;
  else if constexpr (std::is_same_v<T, std::int8_t>) return DType::I8;
  else if constexpr (std::is_same_v<T, std::uint16_t>) return DType::U16;
  else if constexpr (std::is_same_v<T, std::int16_t>) return DType::I16;
  else if constexpr (std::is_same_v<T, std::uint32_t>) return DType::U32;
  else if constexpr (std::is_same_v<T, std::int32_t>) return DType::I32;
  else if constexpr (std::is_same_v<T, std::uint64_t>) return DType::U64;
  else if constexpr (std::is_same_v<T, std::int64_t>) return DType::I64;
  else return std::nullopt;
}

}  // namespace detail

// A parsed safetensors file. Tensor data stays in the mapped (or caller's) bytes until
// a tensor is asked for; copies are cheap (the mapping is shared).
class SafeTensors {
 public:
  // The reference implementation's cap; real headers are a few MB at most.
  static constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

  SafeTensors() = default;

  // Maps and parses a file.
  [[nodiscard]] static SafeTensors open(const std::string& path) {
    auto mapped = std::make_shared<MappedFile>(path);
    SafeTensors file(mapped->bytes(), path);
    file.mapped_ = std::move(mapped);
    return file;
  }

  // Parses bytes the caller keeps alive for the lifetime of the result.
  [[nodiscard]] static SafeTensors parse(std::span<const std::uint8_t> bytes, std::string source = "<memory>") {
    return SafeTensors(bytes, std::move(source));
  }

  // Parses bytes it takes ownership of.
  [[nodiscard]] static SafeTensors from_bytes(std::vector<std::uint8_t> bytes, std::string source = "<memory>") {
    auto owned = std::make_shared<std::vector<std::uint8_t>>(std::move(bytes));
    SafeTensors file(std::span<const std::uint8_t>(owned->data(), owned->size()), std::move(source));
    file.owner_ = std::move(owned);
    return file;
  }

  [[nodiscard]] const std::string& source() const { return source_; }
  // Tensors in data order.
  [[nodiscard]] const std::vector<TensorInfo>& tensors() const { return tensors_; }
  [[nodiscard]] const std::map<std::string, std::string>& metadata() const { return metadata_; }
  [[nodiscard]] std::uint64_t file_size() const { return file_.size(); }
  // The file's identity on disk when it was opened from a path.
  [[nodiscard]] std::optional<FileId> file_id() const {
    if (mapped_) return mapped_->id();
    return std::nullopt;
  }

  [[nodiscard]] const TensorInfo* find(std::string_view name) const {
    const auto it = index_.find(std::string(name));
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  [[nodiscard]] bool contains(std::string_view name) const { return find(name) != nullptr; }
  [[nodiscard]] const TensorInfo& info(std::string_view name) const {
    const TensorInfo* t = find(name);
    if (t == nullptr) fail_at(name, "is not in the file");
    return *t;
  }

  // The raw little-endian bytes of a tensor.
  [[nodiscard]] std::span<const std::uint8_t> bytes(const TensorInfo& t) const {
    return file_.subspan(static_cast<std::size_t>(data_start_ + t.begin), static_cast<std::size_t>(t.byte_size()));
  }
  [[nodiscard]] std::span<const std::uint8_t> bytes(std::string_view name) const { return bytes(info(name)); }

  // Shape of a tensor read as a matrix: rank 2 as is, rank 1 as one row, rank 0 as 1x1.
  [[nodiscard]] std::pair<Index, Index> matrix_shape(std::string_view name) const {
    const TensorInfo& t = info(name);
    if (t.rank() > 2) fail_at(name, "has rank ", t.rank(), " ", detail::shape_text(t.shape), "; a matrix needs rank <= 2");
    const std::uint64_t rows = t.rank() == 2 ? t.shape[0] : 1, cols = t.rank() == 0 ? 1 : t.shape.back();
    return {static_cast<Index>(rows), static_cast<Index>(cols)};  // rows*cols*size <= file size: fits
  }

  // A float copy of an F32/F16/BF16/F64 tensor of rank <= 2.
  [[nodiscard]] Matrix<float> matrix(std::string_view name) const {
    const auto [rows, cols] = matrix_shape(name);
    Matrix<float> out(rows, cols);
    read_floats(name, std::span<float>(out.data(), static_cast<std::size_t>(out.size())));
    return out;
  }

  // A view (no copy) of an F32 tensor of rank <= 2 whose data is 4-byte aligned.
  [[nodiscard]] Eigen::Map<const Matrix<float>> view(std::string_view name) const {
    const TensorInfo& t = info(name);
    if (t.dtype != DType::F32) fail_at(name, "is ", dtype_name(t.dtype), "; only F32 tensors can be viewed (use matrix() to convert)");
    const auto [rows, cols] = matrix_shape(name);
    const std::uint8_t* p = bytes(t).data();
    if (reinterpret_cast<std::uintptr_t>(p) % alignof(float) != 0) fail_at(name, "is not 4-byte aligned in the file; use matrix()");
    return Eigen::Map<const Matrix<float>>(reinterpret_cast<const float*>(p), rows, cols);
  }

  // All elements of a float tensor (any rank), converted into `out` (size must match).
  void read_floats(std::string_view name, std::span<float> out) const {
    const TensorInfo& t = info(name);
    if (!is_float_dtype(t.dtype)) fail_at(name, "is ", dtype_name(t.dtype), ", not a float tensor (F32, F16, BF16, F64)");
    if (out.size() != t.elements()) fail_at(name, "has ", t.elements(), " elements, not ", out.size());
    detail::floats_from_bytes(t.dtype, bytes(t).data(), out.size(), out.data());
  }
  [[nodiscard]] std::vector<float> floats(std::string_view name) const {
    std::vector<float> out(static_cast<std::size_t>(info(name).elements()));
    read_floats(name, out);
    return out;
  }

  // All elements of an integer (or BOOL) tensor, widened to int64.
  [[nodiscard]] std::vector<std::int64_t> integers(std::string_view name) const {
    const TensorInfo& t = info(name);
    if (!is_integer_dtype(t.dtype)) fail_at(name, "is ", dtype_name(t.dtype), ", not an integer tensor");
    std::vector<std::int64_t> out(static_cast<std::size_t>(t.elements()));
    const auto* p = bytes(t).data();
    const std::string what = detail::concat("tensor '", detail::printable(name), "'");
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = detail::integer_at(t.dtype, p, i, what);
    return out;
  }

  // A typed copy of a tensor whose dtype is exactly T's (float: F32, int32_t: I32, ...).
  template <class T>
  [[nodiscard]] std::vector<T> values(std::string_view name) const {
    constexpr auto dtype = detail::dtype_of<T>();
    static_assert(dtype.has_value(), "values<T>: T has no safetensors dtype");
    const TensorInfo& t = info(name);
    if (t.dtype != *dtype) fail_at(name, "is ", dtype_name(t.dtype), ", not ", dtype_name(*dtype));
    std::vector<T> out(static_cast<std::size_t>(t.elements()));
    if (!out.empty()) std::memcpy(out.data(), bytes(t).data(), out.size() * sizeof(T));
    return out;
  }

  template <class... Parts>
  [[noreturn]] void fail_at(std::string_view tensor, Parts&&... parts) const {
    detail::fail("safetensors '", source_, "': tensor '", detail::printable(tensor), "' ", std::forward<Parts>(parts)...);
  }

 private:
  SafeTensors(std::span<const std::uint8_t> file, std::string source) : file_(file), source_(std::move(source)) { parse(); }

  template <class... Parts>
  [[noreturn]] void malformed(Parts&&... parts) const {
    detail::fail("safetensors '", source_, "': ", std::forward<Parts>(parts)...);
  }

  void parse() {
    const std::uint64_t size = file_.size();
    if (size < 8) malformed("file is ", size, " bytes, too short for the 8-byte header length (truncated)");
    const auto header_bytes = detail::load_unaligned<std::uint64_t>(file_.data());
    if (header_bytes > kMaxHeaderBytes) malformed("header length ", header_bytes, " exceeds the cap of ", kMaxHeaderBytes, " bytes");
    if (header_bytes > size - 8)
      malformed("header length ", header_bytes, " runs past the end of the file (", size, " bytes): truncated or corrupt");
    data_start_ = 8 + header_bytes;
    const std::string_view header(reinterpret_cast<const char*>(file_.data() + 8), static_cast<std::size_t>(header_bytes));
    if (header.empty() || header.front() != '{') malformed("header does not start with '{'");
    if (const auto bad = detail::invalid_utf8_at(header); bad != std::string_view::npos) {
      const auto quote = header.rfind('"', bad);
      malformed("header is not valid UTF-8 at byte ", bad, " (in the name or string starting \"",
                detail::printable(header.substr(quote == std::string_view::npos ? bad : quote + 1, 40)), "\")");
    }

    detail::HeaderReader reader;
    const bool ok = nlohmann::json::sax_parse(header.begin(), header.end(), &reader);
    if (!ok || !reader.done()) malformed(reader.error.empty() ? std::string("header is not valid JSON") : reader.error);
    metadata_ = std::move(reader.metadata);

    const std::uint64_t data_bytes = size - data_start_;
    tensors_.reserve(reader.entries.size());
    for (auto& e : reader.entries) {
      TensorInfo t;
      t.name = std::move(e.name);
      const auto dtype = parse_dtype(e.dtype);
      if (!dtype) fail_at(t.name, "has unknown dtype '", detail::printable(e.dtype), "'");
      t.dtype = *dtype;
      t.shape = std::move(e.shape);
      t.begin = e.offsets[0];
      t.end = e.offsets[1];
      const auto needed = detail::checked_bytes(t.shape, dtype_size(t.dtype));
      if (!needed) fail_at(t.name, "has shape ", detail::shape_text(t.shape), " whose byte size overflows 64 bits");
      if (t.end < t.begin) fail_at(t.name, "has data_offsets [", t.begin, ", ", t.end, "] that end before they begin");
      if (t.end > data_bytes)
        fail_at(t.name, "has data_offsets [", t.begin, ", ", t.end, "] past the end of the data (", data_bytes,
                " bytes): truncated or out of range");
      if (t.end - t.begin != *needed)
        fail_at(t.name, "has shape ", detail::shape_text(t.shape), " of ", dtype_name(t.dtype), " (", *needed,
                " bytes) but data_offsets [", t.begin, ", ", t.end, "] hold ", t.end - t.begin, " bytes");
      tensors_.push_back(std::move(t));
    }
    // The ranges must tile [0, data_bytes): sorted, each begins where the last ended.
    std::stable_sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    std::uint64_t expected = 0;
    const TensorInfo* previous = nullptr;
    for (const auto& t : tensors_) {
      if (t.begin < expected)
        fail_at(t.name, "has data_offsets [", t.begin, ", ", t.end, "] overlapping tensor '", detail::printable(previous->name),
                "' [", previous->begin, ", ", previous->end, "]");
      if (t.begin > expected) fail_at(t.name, "begins at ", t.begin, ", leaving unindexed data bytes [", expected, ", ", t.begin, ")");
      expected = t.end;
      previous = &t;
    }
    if (expected != data_bytes)
      malformed("data bytes [", expected, ", ", data_bytes, ") after the last tensor are not indexed by the header");
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  }

  std::shared_ptr<const MappedFile> mapped_;  // keeps the mapping alive
  std::shared_ptr<const void> owner_;         // or the owned bytes
  std::span<const std::uint8_t> file_;
  std::string source_;
  std::uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Writes a safetensors file atomically. Declare every tensor first (with its data, or
// without to stream it later), then start() fixes the layout and writes the header,
// write() stores each streamed tensor (any order, any thread), and commit() makes the
// file appear. Tensors are laid out by decreasing element size so each is aligned to
// its element in the file (the header is padded to a multiple of 8 bytes). An
// uncommitted writer leaves nothing behind.
class SafeTensorsWriter {
 public:
  explicit SafeTensorsWriter(std::string path) : path_(std::move(path)) {}

  [[nodiscard]] const std::string& path() const { return path_; }

  void set_metadata(const std::string& key, const std::string& value) {
    require_declaring("set_metadata");
    check_utf8(key, "metadata key");
    check_utf8(value, "metadata value");
    metadata_[key] = value;
  }

  // A tensor whose bytes come later through write().
  void declare(const std::string& name, DType dtype, std::vector<std::uint64_t> shape) {
    require_declaring("declare");
    check_utf8(name, "tensor name");
    detail::require(name != "__metadata__", "safetensors writer '", path_, "': '__metadata__' cannot name a tensor");
    detail::require(index_.count(name) == 0, "safetensors writer '", path_, "': tensor '", name, "' declared twice");
    const auto bytes = detail::checked_bytes(shape, dtype_size(dtype));
    detail::require(bytes.has_value(), "safetensors writer '", path_, "': tensor '", name, "' shape ",
                    detail::shape_text(shape), " overflows");
    index_.emplace(name, entries_.size());
    entries_.push_back(Entry{name, dtype, std::move(shape), *bytes, 0, {}, false, false});
  }

  void declare(const TensorDecl& decl) { declare(decl.name, decl.dtype, decl.shape); }

  // A tensor with its bytes (copied or moved in).
  void add(const std::string& name, DType dtype, std::vector<std::uint64_t> shape, std::vector<std::uint8_t> bytes) {
    declare(name, dtype, std::move(shape));
    Entry& e = entries_.back();
    detail::require(bytes.size() == e.bytes, "safetensors writer '", path_, "': tensor '", name, "' has ", bytes.size(),
                    " bytes, its shape needs ", e.bytes);
    e.data = std::move(bytes);
    e.has_data = true;
  }

  void add(TensorData tensor) { add(tensor.name, tensor.dtype, std::move(tensor.shape), std::move(tensor.bytes)); }

  // A matrix stored as F32, F16, BF16 or F64 (row-major, shape [rows, cols]).
  template <class Derived>
  void add_matrix(const std::string& name, const Eigen::MatrixBase<Derived>& m, DType dtype = DType::F32) {
    detail::require(is_float_dtype(dtype), "add_matrix: dtype ", dtype_name(dtype), " is not a float dtype");
    const Matrix<float> values = m.template cast<float>();
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(values.size()) * dtype_size(dtype));
    detail::floats_to_bytes(dtype, values.data(), static_cast<std::size_t>(values.size()), bytes.data());
    add(name, dtype, {static_cast<std::uint64_t>(values.rows()), static_cast<std::uint64_t>(values.cols())}, std::move(bytes));
  }

  // Any trivially copyable values of a safetensors dtype, with a shape.
  template <class T>
  void add_values(const std::string& name, std::vector<std::uint64_t> shape, std::span<const T> values) {
    constexpr auto dtype = detail::dtype_of<T>();
    static_assert(dtype.has_value(), "add_values<T>: T has no safetensors dtype");
    std::vector<std::uint8_t> bytes(values.size() * sizeof(T));
    if (!values.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
    add(name, *dtype, std::move(shape), std::move(bytes));
  }

  [[nodiscard]] bool contains(const std::string& name) const { return index_.count(name) != 0; }
  [[nodiscard]] std::size_t tensor_count() const { return entries_.size(); }

  // Bytes of the whole file (valid once started).
  [[nodiscard]] std::uint64_t file_bytes() const { return data_start_ + data_bytes_; }

  void start() {
    require_declaring("start");
    std::vector<std::size_t> order(entries_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return dtype_size(entries_[a].dtype) > dtype_size(entries_[b].dtype);
    });
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (std::size_t i : order) {
      Entry& e = entries_[i];
      e.begin = offset;
      offset += e.bytes;
      header[e.name] = {{"dtype", std::string(dtype_name(e.dtype))}, {"shape", e.shape}, {"data_offsets", {e.begin, offset}}};
    }
    data_bytes_ = offset;
    std::string text = header.dump();
    text.append((8 - (8 + text.size()) % 8) % 8, ' ');  // data starts 8-byte aligned
    data_start_ = 8 + text.size();

    file_.emplace(path_);
    file_->resize(file_bytes());
    const std::uint64_t length = text.size();
    file_->write_at(0, &length, 8);
    file_->write_at(8, text.data(), text.size());
    for (Entry& e : entries_) {
      if (!e.has_data) continue;
      file_->write_at(data_start_ + e.begin, e.data.data(), e.data.size());
      std::vector<std::uint8_t>().swap(e.data);
      e.written = true;
    }
  }

  // The bytes of a declared tensor (exactly its size). Distinct tensors may be written
  // from different threads.
  void write(const std::string& name, std::span<const std::uint8_t> bytes) {
    detail::require(file_.has_value(), "safetensors writer '", path_, "': write('", name, "') before start()");
    const auto it = index_.find(name);
    detail::require(it != index_.end(), "safetensors writer '", path_, "': tensor '", name, "' was not declared");
    Entry& e = entries_[it->second];
    detail::require(!e.written, "safetensors writer '", path_, "': tensor '", name, "' written twice");
    detail::require(bytes.size() == e.bytes, "safetensors writer '", path_, "': tensor '", name, "' got ", bytes.size(),
                    " bytes, its shape needs ", e.bytes);
    if (!bytes.empty()) file_->write_at(data_start_ + e.begin, bytes.data(), bytes.size());
    e.written = true;
  }

  // A declared tensor's bytes; its dtype and shape must be the declared ones.
  void write(const TensorData& tensor) {
    const auto it = index_.find(tensor.name);
    detail::require(it != index_.end(), "safetensors writer '", path_, "': tensor '", tensor.name, "' was not declared");
    const Entry& e = entries_[it->second];
    detail::require(e.dtype == tensor.dtype && e.shape == tensor.shape, "safetensors writer '", path_, "': tensor '",
                    tensor.name, "' is ", dtype_name(tensor.dtype), " ", detail::shape_text(tensor.shape), ", declared ",
                    dtype_name(e.dtype), " ", detail::shape_text(e.shape));
    write(tensor.name, tensor.bytes);
  }

  // Checks every tensor was written, then makes the file appear under its name.
  void commit() {
    if (!file_) start();
    for (const Entry& e : entries_)
      detail::require(e.written, "safetensors writer '", path_, "': tensor '", e.name, "' was declared but never written");
    file_->commit();
  }

  // Abandons the file (also what destruction without commit() does).
  void discard() noexcept {
    if (file_) file_->discard();
  }

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<std::uint64_t> shape;
    std::uint64_t bytes, begin;
    std::vector<std::uint8_t> data;
    bool has_data, written;
  };

  void require_declaring(const char* what) const {
    detail::require(!file_.has_value(), "safetensors writer '", path_, "': ", what, "() after start()");
  }
  void check_utf8(const std::string& text, const char* what) const {
    const auto bad = detail::invalid_utf8_at(text);
    detail::require(bad == std::string_view::npos, "safetensors writer '", path_, "': ", what, " '", detail::printable(text),
                    "' is not valid UTF-8 at byte ", bad);
  }

  std::string path_;
  std::vector<Entry> entries_;
  std::unordered_map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
  std::optional<AtomicFile> file_;
  std::uint64_t data_start_ = 0, data_bytes_ = 0;
};

}  // namespace lowbit

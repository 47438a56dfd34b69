// lowbit's own file format: a QuantizedMatrix as a group of tensors in a safetensors
// file, loaded back bit for bit.
//
//   <name>.codes        U8   [stored_rows, row_bytes]        packed rows (pack/layout.hpp)
//   <name>.scales       F32 | F16 [stored_rows, groups_per_row]
//   <name>.zeros        F32 | F16 [stored_rows, groups_per_row]
//   <name>.permutation  I32  [cols]                          only when the matrix has one
//   metadata "<name>.lowbit" = {"layout": 1, "bits", "group_size", "symmetric",
//       "integral_zero", "param_type": "f32"|"f16", "group_axis": "input"|"output",
//       "rows", "cols"}
//
// A loader checks every field and shape against the spec before it allocates, so a
// hostile file cannot make it allocate more than the file holds.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

#include "lowbit/core/error.hpp"
#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/io/safetensors.hpp"

namespace lowbit::lowbit_format {

inline constexpr int kLayoutVersion = 1;
// Largest dimension a loader accepts (permutations are int32).
inline constexpr Index kMaxDimension = 0x7fffffff;

[[nodiscard]] inline std::string metadata_key(const std::string& name) { return name + ".lowbit"; }

[[nodiscard]] inline DType param_dtype(const QuantSpec& spec) {
  return spec.param_type == ParamType::Float16 ? DType::F16 : DType::F32;
}

// The metadata value describing a matrix.
[[nodiscard]] inline std::string describe(Index rows, Index cols, const QuantSpec& spec) {
  const nlohmann::ordered_json j = {
      {"layout", kLayoutVersion},
      {"bits", spec.bits},
      {"group_size", spec.group_size},
      {"symmetric", spec.symmetric},
      {"integral_zero", spec.integral_zero},
      {"param_type", spec.param_type == ParamType::Float16 ? "f16" : "f32"},
      {"group_axis", spec.group_axis == GroupAxis::Output ? "output" : "input"},
      {"rows", rows},
      {"cols", cols},
  };
  return j.dump();
}

namespace detail {

struct Shape {
  Index stored_rows, stored_cols, row_bytes, groups;
};

[[nodiscard]] inline Shape stored_shape(Index rows, Index cols, const QuantSpec& spec) {
  const bool transposed = spec.group_axis == GroupAxis::Output;
  Shape s{};
  s.stored_rows = transposed ? cols : rows;
  s.stored_cols = transposed ? rows : cols;
  s.row_bytes = lowbit::detail::packed_row_bytes(s.stored_cols, spec.bits);
  s.groups = s.stored_cols == 0 ? 0 : spec.groups_per_row(s.stored_cols);
  return s;
}

[[nodiscard]] inline std::vector<std::uint64_t> dims(Index a, Index b) {
  return {static_cast<std::uint64_t>(a), static_cast<std::uint64_t>(b)};
}

}  // namespace detail

// The tensors a matrix of this shape and spec is saved as.
[[nodiscard]] inline std::vector<TensorDecl> plan(const std::string& name, Index rows, Index cols, const QuantSpec& spec,
                                                  bool permuted) {
  spec.validate();
  const auto s = detail::stored_shape(rows, cols, spec);
  std::vector<TensorDecl> tensors = {
      {name + ".codes", DType::U8, detail::dims(s.stored_rows, s.row_bytes)},
      {name + ".scales", param_dtype(spec), detail::dims(s.stored_rows, s.groups)},
      {name + ".zeros", param_dtype(spec), detail::dims(s.stored_rows, s.groups)},
  };
  if (permuted) tensors.push_back({name + ".permutation", DType::I32, {static_cast<std::uint64_t>(cols)}});
  return tensors;
}

// The tensors of a matrix with their bytes (in plan() order).
template <class T>
[[nodiscard]] std::vector<TensorData> encode(const std::string& name, const QuantizedMatrix<T>& q) {
  const QuantSpec& spec = q.spec();
  auto tensors = plan(name, q.rows(), q.cols(), spec, !q.permutation().empty());
  std::vector<TensorData> out;
  out.push_back({tensors[0].name, DType::U8, tensors[0].shape, q.packed_codes()});
  const auto scales = q.scales(), zeros = q.zeros();
  out.push_back(lowbit::detail::float_tensor(tensors[1].name, param_dtype(spec), tensors[1].shape,
                                             {scales.data(), static_cast<std::size_t>(scales.size())}));
  out.push_back(lowbit::detail::float_tensor(tensors[2].name, param_dtype(spec), tensors[2].shape,
                                             {zeros.data(), static_cast<std::size_t>(zeros.size())}));
  if (!q.permutation().empty())
    out.push_back(lowbit::detail::value_tensor<std::int32_t>(tensors[3].name, DType::I32, tensors[3].shape, q.permutation()));
  return out;
}

// Declares a matrix's tensors and metadata on a writer; its bytes follow with write().
inline void declare(SafeTensorsWriter& writer, const std::string& name, Index rows, Index cols, const QuantSpec& spec,
                    bool permuted) {
  for (const auto& t : plan(name, rows, cols, spec, permuted)) writer.declare(t);
  writer.set_metadata(metadata_key(name), describe(rows, cols, spec));
}

// Writes a declared matrix (after writer.start()).
template <class T>
void write(SafeTensorsWriter& writer, const std::string& name, const QuantizedMatrix<T>& q) {
  for (const auto& t : encode(name, q)) writer.write(t);
}

// Adds a matrix with its bytes to a writer that has not started.
template <class T>
void save(SafeTensorsWriter& writer, const std::string& name, const QuantizedMatrix<T>& q) {
  for (auto& t : encode(name, q)) writer.add(std::move(t));
  writer.set_metadata(metadata_key(name), describe(q.rows(), q.cols(), q.spec()));
}

// Names of the lowbit matrices a file holds.
[[nodiscard]] inline std::vector<std::string> matrix_names(const SafeTensors& file) {
  std::vector<std::string> names;
  static constexpr std::string_view kSuffix = ".lowbit";
  for (const auto& [key, value] : file.metadata())
    if (key.size() > kSuffix.size() && key.compare(key.size() - kSuffix.size(), kSuffix.size(), kSuffix) == 0)
      names.push_back(key.substr(0, key.size() - kSuffix.size()));
  return names;
}

namespace detail {

template <class... Parts>
[[noreturn]] void malformed(const SafeTensors& file, const std::string& name, Parts&&... parts) {
  lowbit::detail::fail("safetensors '", file.source(), "': lowbit matrix '", lowbit::detail::printable(name), "': ",
                       std::forward<Parts>(parts)...);
}

// The spec and shape a file's metadata claims, every field checked.
inline void read_description(const SafeTensors& file, const std::string& name, QuantSpec& spec, Index& rows, Index& cols) {
  const auto it = file.metadata().find(metadata_key(name));
  if (it == file.metadata().end()) malformed(file, name, "no metadata '", metadata_key(name), "'");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(it->second);
  } catch (const nlohmann::json::exception& e) {
    malformed(file, name, "metadata is not valid JSON (", e.what(), ")");
  }
  if (!j.is_object()) malformed(file, name, "metadata is not a JSON object");
  auto integer = [&](const char* key, std::int64_t lo, std::int64_t hi) {
    const auto f = j.find(key);
    if (f == j.end() || !f->is_number_integer()) malformed(file, name, "metadata field '", key, "' is missing or not an integer");
    const auto v = f->get<std::int64_t>();
    if (v < lo || v > hi) malformed(file, name, "metadata ", key, " = ", v, " is outside ", lo, "..", hi);
    return v;
  };
  auto boolean = [&](const char* key) {
    const auto f = j.find(key);
    if (f == j.end() || !f->is_boolean()) malformed(file, name, "metadata field '", key, "' is missing or not a boolean");
    return f->get<bool>();
  };
  auto choice = [&](const char* key, const char* first, const char* second) {
    const auto f = j.find(key);
    if (f == j.end() || !f->is_string() || (*f != first && *f != second))
      malformed(file, name, "metadata field '", key, "' must be \"", first, "\" or \"", second, "\"");
    return *f == second;
  };
  const auto layout = integer("layout", 0, 1'000'000);
  if (layout != kLayoutVersion) malformed(file, name, "layout version ", layout, " is not ", kLayoutVersion, " (written by another lowbit)");
  spec.bits = static_cast<int>(integer("bits", 1, 8));
  spec.group_size = integer("group_size", 0, kMaxDimension);
  spec.symmetric = boolean("symmetric");
  spec.integral_zero = boolean("integral_zero");
  spec.param_type = choice("param_type", "f32", "f16") ? ParamType::Float16 : ParamType::Float32;
  spec.group_axis = choice("group_axis", "input", "output") ? GroupAxis::Output : GroupAxis::Input;
  rows = integer("rows", 0, kMaxDimension);
  cols = integer("cols", 0, kMaxDimension);
}

inline const TensorInfo& expect_tensor(const SafeTensors& file, const std::string& name, const std::string& tensor, DType dtype,
                                       const std::vector<std::uint64_t>& shape) {
  const TensorInfo* t = file.find(tensor);
  if (t == nullptr) malformed(file, name, "tensor '", tensor, "' is missing");
  if (t->dtype != dtype || t->shape != shape)
    malformed(file, name, "tensor '", tensor, "' is ", dtype_name(t->dtype), " ", lowbit::detail::shape_text(t->shape), ", expected ",
              dtype_name(dtype), " ", lowbit::detail::shape_text(shape));
  return *t;
}

inline void read_params(const SafeTensors& file, const std::string& name, const std::string& tensor, Matrix<float>::MapType out) {
  file.read_floats(tensor, std::span<float>(out.data(), static_cast<std::size_t>(out.size())));
  if (!out.allFinite())
    for (Index i = 0; i < out.size(); ++i)
      if (!std::isfinite(out.data()[i])) malformed(file, name, "tensor '", tensor, "' entry ", i, " = ", out.data()[i], " is not finite");
}

}  // namespace detail

// Loads matrix `name` from a file; the result == the saved matrix.
template <class T = float>
[[nodiscard]] QuantizedMatrix<T> load(const SafeTensors& file, const std::string& name) {
  QuantSpec spec;
  Index rows = 0, cols = 0;
  detail::read_description(file, name, spec, rows, cols);
  const auto s = detail::stored_shape(rows, cols, spec);
  const auto& codes = detail::expect_tensor(file, name, name + ".codes", DType::U8, detail::dims(s.stored_rows, s.row_bytes));
  detail::expect_tensor(file, name, name + ".scales", param_dtype(spec), detail::dims(s.stored_rows, s.groups));
  detail::expect_tensor(file, name, name + ".zeros", param_dtype(spec), detail::dims(s.stored_rows, s.groups));
  const bool permuted = file.contains(name + ".permutation");
  if (permuted) {
    if (spec.group_axis == GroupAxis::Output) detail::malformed(file, name, "output-axis groups cannot have a permutation");
    detail::expect_tensor(file, name, name + ".permutation", DType::I32, {static_cast<std::uint64_t>(cols)});
  }
  // A matrix with no columns has no codes to bound its row count by: refuse absurd ones.
  if (s.stored_cols == 0 && s.stored_rows > (Index{1} << 24))
    detail::malformed(file, name, "shape ", rows, "x", cols, " has no stored columns but ", s.stored_rows, " stored rows");

  QuantizedMatrix<T> q(rows, cols, spec);
  if (s.stored_cols > 0) {
    const std::uint8_t* packed = file.bytes(codes).data();
    std::vector<std::uint8_t> row(static_cast<std::size_t>(s.stored_cols));
    // Unpack and repack: any byte pattern is a valid row, and the result is canonical
    // (padding codes zero) whatever the file held there.
    for (Index r = 0; r < s.stored_rows; ++r) {
      lowbit::detail::unpack_row(packed + r * s.row_bytes, s.stored_cols, spec.bits, row.data());
      q.set_stored_row(r, row.data());
    }
  }
  detail::read_params(file, name, name + ".scales", q.mutable_scales());
  detail::read_params(file, name, name + ".zeros", q.mutable_zeros());
  if (permuted) {
    try {
      q.set_permutation(file.values<std::int32_t>(name + ".permutation"));
    } catch (const Error& e) {
      detail::malformed(file, name, "tensor '", name, ".permutation' is not a permutation: ", e.what());
    }
  }
  return q;
}

}  // namespace lowbit::lowbit_format

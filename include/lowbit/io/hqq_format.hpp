// HQQ's checkpoint layout (mobiusml/hqq, HQQLinear's safetensors-encoded state dict),
// both ways, for 2, 3, 4 and 8 bits. A layer W [out, in] under `prefix` is stored as
//
//   <prefix>.W_q     packed codes (pack/hqq_layout.hpp): U8, or I32 for 3-bit
//   <prefix>.scale   [groups, 1] (axis 1) or [1, groups] (axis 0), F16 or F32, = 1/s
//   <prefix>.zero    same shape; w = (q - zero) * scale
//   <prefix>.shape   I64 [2] = {out, in}
//   scalars (0-d U8 tensors): nbits, group_size, axis, channel_wise, optimize, round_zero,
//   view_as_float, quant_scale, quant_zero, offload_meta, encoded_state_dict,
//   stores_quant_config; strings (U8 character codes): packing, unpack_view_dtype,
//   compute_dtype.
//
// HQQ groups a flattened W: axis 1 reshapes it to [in*out/g, g] (our input-axis groups,
// when g divides in_features); axis 0 reshapes it to [g, in*out/g], whose groups are
// the rows r0, r0 + out/g, r0 + 2*out/g, ... of one column, which match our contiguous
// output-axis groups only when g == out_features (one group per column). The packer
// works along the first dimension of the reshaped code matrix.
#pragma once

#include <string>
#include <vector>

#include "lowbit/core/error.hpp"
#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/io/safetensors.hpp"
#include "lowbit/pack/hqq_layout.hpp"

namespace lowbit::hqq_format {

struct Options {
  bool optimized = false;  // recorded as the `optimize` flag (HQQ's proximal solver was used)
};

namespace detail {

// How a matrix maps onto HQQ's reshape: the code matrix [n, m] the packer sees.
struct Geometry {
  int axis;
  Index group;    // HQQ's group_size
  Index n, m;     // reshaped code matrix
  Index groups;   // number of (scale, zero) pairs
};

[[nodiscard]] inline const char* packing_name(int bits) {
  switch (bits) {
    case 8: return "8bit_u8";
    case 4: return "4bit_u8";
    case 3: return "3bit_32";
    case 2: return "2bit_u8";
    default: lowbit::detail::fail("HQQ layout: bits = ", bits, " is not one of 2, 3, 4, 8");
  }
}

// Rows of W_q for n codes along the packed dimension (3-bit pads n to a multiple of 10).
[[nodiscard]] inline Index packed_rows(Index n, int bits) {
  const int per = hqq_layout::codes_per_element(bits);
  return bits == 3 ? (n + per - 1) / per : n / per;
}

[[nodiscard]] inline Geometry geometry(Index rows, Index cols, const QuantSpec& spec) {
  (void)packing_name(spec.bits);  // refuses unsupported widths
  detail::Geometry g{};
  const bool output_axis = spec.group_axis == GroupAxis::Output;
  const Index stored_cols = output_axis ? rows : cols;
  const Index length = spec.group_length(stored_cols);
  const bool one_group = stored_cols == 0 || spec.groups_per_row(stored_cols) == 1;
  lowbit::detail::require(rows > 0 && cols > 0, "HQQ layout: shape ", rows, "x", cols, " is empty");
  if (output_axis) {
    lowbit::detail::require(one_group, "HQQ layout: axis-0 groups of ", length, " rows interleave rows with stride out/",
                            "group_size in HQQ; only one group per column (group_size >= out_features = ", rows,
                            ") maps onto lowbit's output-axis groups");
    g = Geometry{0, rows, rows, cols, cols};
  } else {
    const Index group = one_group ? cols : length;
    lowbit::detail::require(cols % group == 0, "HQQ layout: in_features = ", cols, " is not a multiple of group_size ", group,
                            " (HQQ groups a flattened W, so a group would span two rows)");
    g = Geometry{1, group, rows * cols / group, group, rows * cols / group};
  }
  if (spec.bits != 3)
    lowbit::detail::require(g.n % hqq_layout::codes_per_element(spec.bits) == 0, "HQQ layout: ", g.n, " groups of ", spec.bits,
                            "-bit codes do not split into ", hqq_layout::codes_per_element(spec.bits), " planes");
  return g;
}

[[nodiscard]] inline TensorData scalar(const std::string& name, std::int64_t value) {
  if (value >= 0 && value < 256) {  // what HQQ itself writes (a uint8 0-d tensor)
    const auto v = static_cast<std::uint8_t>(value);
    return lowbit::detail::value_tensor(name, DType::U8, {}, std::span<const std::uint8_t>(&v, 1));
  }
  return lowbit::detail::value_tensor(name, DType::I64, {}, std::span<const std::int64_t>(&value, 1));  // HQQ reads it with int()
}

[[nodiscard]] inline TensorData text(const std::string& name, const std::string& value) {
  return {name, DType::U8, {value.size()}, std::vector<std::uint8_t>(value.begin(), value.end())};
}

[[nodiscard]] inline DType param_dtype(const QuantSpec& spec) { return spec.param_type == ParamType::Float16 ? DType::F16 : DType::F32; }

}  // namespace detail

// Throws unless a matrix of this shape and spec has an HQQ layout.
inline void check_exportable(Index rows, Index cols, const QuantSpec& spec) { (void)detail::geometry(rows, cols, spec); }

// The tensors of a layer, with their bytes.
template <class T>
[[nodiscard]] std::vector<TensorData> encode(const std::string& prefix, const QuantizedMatrix<T>& q, const Options& options = {}) {
  const QuantSpec& spec = q.spec();
  lowbit::detail::require(q.permutation().empty(), "HQQ layout: a permuted (act-order) matrix has no HQQ layout");
  const auto g = detail::geometry(q.rows(), q.cols(), spec);
  const std::string p = prefix + ".";

  // Codes in HQQ's reshaped order. Axis 1: W's codes row-major, cut into rows of `group`.
  // Axis 0 (one group per column): W's codes as they are. Either way the flat order is W's.
  CodeMatrix codes(g.n, g.m);
  {
    std::vector<std::uint8_t> row(static_cast<std::size_t>(q.stored_cols()));
    for (Index s = 0; s < q.stored_rows(); ++s) {
      q.stored_row_codes(s, row.data());
      for (Index j = 0; j < q.stored_cols(); ++j) {
        const Index flat = q.transposed() ? j * q.cols() + s : s * q.cols() + j;  // index into W row-major
        codes.data()[flat] = row[static_cast<std::size_t>(j)];
      }
    }
  }
  // Scales and zeros in group order (axis 1: row-major over (row, group); axis 0: column).
  const auto scales = q.scales(), zeros = q.zeros();
  const std::vector<float> scale(scales.data(), scales.data() + scales.size()), zero(zeros.data(), zeros.data() + zeros.size());
  const std::vector<std::uint64_t> param_shape =
      g.axis == 1 ? std::vector<std::uint64_t>{static_cast<std::uint64_t>(g.groups), 1} : std::vector<std::uint64_t>{1, static_cast<std::uint64_t>(g.groups)};

  std::vector<TensorData> out;
  if (spec.bits == 3) {
    CodeMatrix padded = CodeMatrix::Zero(detail::packed_rows(g.n, 3) * 10, g.m);
    padded.topRows(g.n) = codes;
    const auto words = hqq_layout::pack_words(padded);
    out.push_back(lowbit::detail::value_tensor(p + "W_q", DType::I32, {static_cast<std::uint64_t>(words.rows()), static_cast<std::uint64_t>(words.cols())},
                                               std::span<const std::int32_t>(words.data(), static_cast<std::size_t>(words.size()))));
  } else {
    const auto bytes = hqq_layout::pack_bytes(codes, spec.bits);
    out.push_back({p + "W_q", DType::U8, {static_cast<std::uint64_t>(bytes.rows()), static_cast<std::uint64_t>(bytes.cols())},
                   std::vector<std::uint8_t>(bytes.data(), bytes.data() + bytes.size())});
  }
  out.push_back(lowbit::detail::float_tensor(p + "scale", detail::param_dtype(spec), param_shape, scale));
  out.push_back(lowbit::detail::float_tensor(p + "zero", detail::param_dtype(spec), param_shape, zero));
  const std::int64_t shape[2] = {q.rows(), q.cols()};
  out.push_back(lowbit::detail::value_tensor(p + "shape", DType::I64, {2}, std::span<const std::int64_t>(shape, 2)));
  out.push_back(detail::scalar(p + "nbits", spec.bits));
  out.push_back(detail::scalar(p + "group_size", g.group));
  out.push_back(detail::scalar(p + "axis", g.axis));
  out.push_back(detail::scalar(p + "channel_wise", 1));
  out.push_back(detail::scalar(p + "optimize", options.optimized ? 1 : 0));
  out.push_back(detail::scalar(p + "round_zero", spec.integral_zero ? 1 : 0));
  out.push_back(detail::scalar(p + "view_as_float", 0));
  out.push_back(detail::scalar(p + "quant_scale", 0));
  out.push_back(detail::scalar(p + "quant_zero", 0));
  out.push_back(detail::scalar(p + "offload_meta", 0));
  out.push_back(detail::scalar(p + "encoded_state_dict", 1));
  out.push_back(detail::scalar(p + "stores_quant_config", 1));
  out.push_back(detail::text(p + "packing", detail::packing_name(spec.bits)));
  out.push_back(detail::text(p + "unpack_view_dtype", spec.bits == 3 ? "torch.int32" : "torch.uint8"));
  out.push_back(detail::text(p + "compute_dtype", spec.param_type == ParamType::Float16 ? "torch.float16" : "torch.float32"));
  return out;
}

// The tensors encode() makes for a layer of this shape and spec (names, dtypes, shapes).
[[nodiscard]] inline std::vector<TensorDecl> plan(const std::string& prefix, Index rows, Index cols, const QuantSpec& spec,
                                                  const Options& options = {}) {
  spec.validate();
  const auto g = detail::geometry(rows, cols, spec);
  std::vector<TensorDecl> decls;
  const std::string p = prefix + ".";
  const std::uint64_t packed = static_cast<std::uint64_t>(detail::packed_rows(g.n, spec.bits));
  decls.push_back({p + "W_q", spec.bits == 3 ? DType::I32 : DType::U8, {packed, static_cast<std::uint64_t>(g.m)}});
  const std::vector<std::uint64_t> param_shape =
      g.axis == 1 ? std::vector<std::uint64_t>{static_cast<std::uint64_t>(g.groups), 1} : std::vector<std::uint64_t>{1, static_cast<std::uint64_t>(g.groups)};
  decls.push_back({p + "scale", detail::param_dtype(spec), param_shape});
  decls.push_back({p + "zero", detail::param_dtype(spec), param_shape});
  decls.push_back({p + "shape", DType::I64, {2}});
  for (const auto& [name, value] : std::vector<std::pair<const char*, std::int64_t>>{
           {"nbits", spec.bits}, {"group_size", g.group}, {"axis", g.axis}, {"channel_wise", 1},
           {"optimize", options.optimized}, {"round_zero", spec.integral_zero}, {"view_as_float", 0},
           {"quant_scale", 0}, {"quant_zero", 0}, {"offload_meta", 0}, {"encoded_state_dict", 1},
           {"stores_quant_config", 1}})
    decls.push_back(detail::scalar(p + name, value).decl());
  decls.push_back(detail::text(p + "packing", detail::packing_name(spec.bits)).decl());
  decls.push_back(detail::text(p + "unpack_view_dtype", spec.bits == 3 ? "torch.int32" : "torch.uint8").decl());
  decls.push_back(detail::text(p + "compute_dtype", spec.param_type == ParamType::Float16 ? "torch.float16" : "torch.float32").decl());
  return decls;
}

inline void declare(SafeTensorsWriter& writer, const std::string& prefix, Index rows, Index cols, const QuantSpec& spec,
                    const Options& options = {}) {
  for (const auto& t : plan(prefix, rows, cols, spec, options)) writer.declare(t);
}

template <class T>
void write(SafeTensorsWriter& writer, const std::string& prefix, const QuantizedMatrix<T>& q, const Options& options = {}) {
  for (const auto& t : encode(prefix, q, options)) writer.write(t);
}

template <class T>
void save(SafeTensorsWriter& writer, const std::string& prefix, const QuantizedMatrix<T>& q, const Options& options = {}) {
  for (auto& t : encode(prefix, q, options)) writer.add(std::move(t));
}

namespace detail {

[[nodiscard]] inline std::int64_t read_scalar(const SafeTensors& file, const std::string& name) {
  const auto values = file.integers(name);
  if (values.size() != 1) file.fail_at(name, "has ", values.size(), " elements; expected one integer");
  return values[0];
}

[[nodiscard]] inline std::string read_text(const SafeTensors& file, const std::string& name) {
  const TensorInfo& t = file.info(name);
  if (t.dtype != DType::U8 || t.rank() != 1) file.fail_at(name, "is not a 1-D U8 string");
  const auto bytes = file.bytes(t);
  return std::string(bytes.begin(), bytes.end());
}

}  // namespace detail

// Reads an HQQ layer written by HQQ (or by encode()).
template <class T = float>
[[nodiscard]] QuantizedMatrix<T> load(const SafeTensors& file, const std::string& prefix) {
  const std::string p = prefix + ".";
  auto flag = [&](const char* key) { return file.contains(p + key) && detail::read_scalar(file, p + key) != 0; };
  auto bad = [&](auto&&... parts) { lowbit::detail::fail("safetensors '", file.source(), "': HQQ layer '", prefix, "': ", parts...); };
  if (flag("quant_scale") || flag("quant_zero")) bad("quantized scale/zero (quant_scale/quant_zero) are not supported");
  if (!file.contains(p + "scale") || !file.contains(p + "zero"))
    bad(file.contains(p + "zero_scale") ? "offloaded zero_scale meta is not supported" : "scale or zero is missing");

  const auto bits64 = detail::read_scalar(file, p + "nbits");
  if (bits64 != 2 && bits64 != 3 && bits64 != 4 && bits64 != 8) bad("nbits = ", bits64, " is not one of 2, 3, 4, 8");
  const int bits = static_cast<int>(bits64);
  const auto group = detail::read_scalar(file, p + "group_size");
  const auto axis = detail::read_scalar(file, p + "axis");
  if (axis != 0 && axis != 1) bad("axis = ", axis, " is not 0 or 1");
  const auto shape = file.integers(p + "shape");
  if (shape.size() != 2) bad("shape has ", shape.size(), " entries, expected [out, in]");
  const Index rows = shape[0], cols = shape[1];
  if (rows <= 0 || cols <= 0 || rows > 0x7fffffff || cols > 0x7fffffff) bad("shape [", rows, ", ", cols, "] is not a matrix shape");
  if (group <= 0) bad("group_size = ", group, " must be positive");
  if (file.contains(p + "packing") && detail::read_text(file, p + "packing") != detail::packing_name(bits))
    bad("packing '", lowbit::detail::printable(detail::read_text(file, p + "packing")), "' does not match nbits = ", bits);

  QuantSpec spec;
  spec.bits = bits;
  spec.integral_zero = flag("round_zero");
  const DType param = file.info(p + "scale").dtype;
  spec.param_type = param == DType::F16 ? ParamType::Float16 : ParamType::Float32;
  if (axis == 1) {
    spec.group_axis = GroupAxis::Input;
    spec.group_size = group;
  } else {
    if (group != rows) bad("axis 0 with group_size ", group, " != out_features ", rows, " interleaves rows; lowbit cannot hold it");
    spec.group_axis = GroupAxis::Output;
    spec.group_size = group;
  }
  detail::Geometry g{};
  try {
    g = detail::geometry(rows, cols, spec);
  } catch (const Error& e) {
    bad(e.what());
  }
  if (g.group != group) bad("group_size ", group, " does not divide the matrix as HQQ does");

  // W_q: its dtype may be viewed as a float type (view_as_float); the bytes are what count.
  const TensorInfo& wq = file.info(p + "W_q");
  const Index packed_rows = detail::packed_rows(g.n, bits);
  const std::size_t element = bits == 3 ? 4 : 1;
  if (wq.rank() != 2 || wq.byte_size() != static_cast<std::uint64_t>(packed_rows * g.m) * element)
    bad("W_q is ", dtype_name(wq.dtype), " ", lowbit::detail::shape_text(wq.shape), ", expected ", packed_rows, "x", g.m, " ",
        bits == 3 ? "I32" : "U8");
  if (!flag("view_as_float") && wq.dtype != (bits == 3 ? DType::I32 : DType::U8))
    bad("W_q is ", dtype_name(wq.dtype), ", expected ", bits == 3 ? "I32" : "U8");
  const auto bytes = file.bytes(wq);
  CodeMatrix codes;
  if (bits == 3) {
    hqq_layout::WordMatrix words(packed_rows, g.m);
    std::memcpy(words.data(), bytes.data(), bytes.size());
    codes = hqq_layout::unpack_words(words).topRows(g.n);
  } else {
    const hqq_layout::ByteMatrix packed = Eigen::Map<const hqq_layout::ByteMatrix>(bytes.data(), packed_rows, g.m);
    codes = hqq_layout::unpack_bytes(packed, bits);
  }

  const auto scale = file.floats(p + "scale"), zero = file.floats(p + "zero");
  if (static_cast<Index>(scale.size()) != g.groups || static_cast<Index>(zero.size()) != g.groups)
    bad("scale/zero have ", scale.size(), "/", zero.size(), " entries, expected ", g.groups);
  if (file.info(p + "zero").dtype != param) bad("scale and zero have different dtypes");
  QuantizedMatrix<T> q(rows, cols, spec);
  // Flat W order back to stored rows (see encode()).
  std::vector<std::uint8_t> row(static_cast<std::size_t>(q.stored_cols()));
  for (Index s = 0; s < q.stored_rows(); ++s) {
    for (Index j = 0; j < q.stored_cols(); ++j)
      row[static_cast<std::size_t>(j)] = codes.data()[q.transposed() ? j * cols + s : s * cols + j];
    q.set_stored_row(s, row.data());
  }
  auto scales = q.mutable_scales();
  auto zeros = q.mutable_zeros();
  for (Index i = 0; i < g.groups; ++i) {
    const auto k = static_cast<std::size_t>(i);
    if (!std::isfinite(scale[k]) || !std::isfinite(zero[k])) bad("scale/zero entry ", i, " is not finite");
    scales.data()[i] = round_param(scale[k], spec.param_type);
    zeros.data()[i] = round_param(zero[k], spec.param_type);
  }
  return q;
}

}  // namespace lowbit::hqq_format

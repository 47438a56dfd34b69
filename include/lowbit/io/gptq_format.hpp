// The AutoGPTQ / GPTQModel v1 checkpoint layout ("checkpoint_format": "gptq"), both
// ways, for 2, 3, 4 and 8 bits. For a layer W [out, in] with `groups` input groups:
//
//   <prefix>.qweight  I32 [in*bits/32, out]      codes along the input dimension
//   <prefix>.qzeros   I32 [groups, out*bits/32]  zero - 1, along the output dimension
//   <prefix>.scales   F16 [groups, out]
//   <prefix>.g_idx    I32 [in]                   group of each input column
//
// Packing: the codes of one column form a little-endian bit stream, code k at bits
// [bits*k, bits*k + bits), cut into 32-bit words. For 2/4/8 bits that is 32/bits codes
// per word, least significant first; for 3 bits 32 codes fill 3 words and codes 10 and
// 21 spill across word boundaries, exactly as AutoGPTQ's QuantLinear.pack does.
// Dequantization: w = scale[g] * (q - (qzero[g] + 1)), g = g_idx[input column].
//
// v1 stores zero - 1 in `bits` bits, so integral zeros must lie in [1, 2^bits]; a zero
// of 0 (a group with no negative weight) cannot be stored and is refused.
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include "lowbit/core/error.hpp"
#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/io/atomic_file.hpp"
#include "lowbit/io/safetensors.hpp"

namespace lowbit::gptq_format {

using WordMatrix = Eigen::Matrix<std::int32_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// What quantize_config.json says (the fields loaders read).
struct Config {
  int bits = 4;
  Index group_size = 128;  // -1: one group per row
  bool desc_act = false;   // act-order: g_idx is not i / group_size
  bool sym = true;
  double damp_percent = 0.01;
  bool static_groups = false;
  bool true_sequential = true;
  std::string model_file_base_name = "model";

  [[nodiscard]] nlohmann::ordered_json to_json() const {
    return {{"bits", bits},
            {"group_size", group_size},
            {"damp_percent", damp_percent},
            {"desc_act", desc_act},
            {"static_groups", static_groups},
            {"sym", sym},
            {"true_sequential", true_sequential},
            {"model_name_or_path", nullptr},
            {"model_file_base_name", model_file_base_name},
            {"quant_method", "gptq"},
            {"checkpoint_format", "gptq"}};
  }

  [[nodiscard]] static Config from_json(const nlohmann::json& j) {
    detail::require(j.is_object(), "quantize_config: not a JSON object");
    Config c;
    auto get = [&](const char* key, auto& value) {
      const auto it = j.find(key);
      if (it == j.end()) return;
      try {
        it->get_to(value);
      } catch (const nlohmann::json::exception&) {
        detail::fail("quantize_config: field '", key, "' = ", it->dump(), " has the wrong type");
      }
    };
    detail::require(j.contains("bits") && j.contains("group_size"), "quantize_config: 'bits' and 'group_size' are required");
    get("bits", c.bits);
    get("group_size", c.group_size);
    get("desc_act", c.desc_act);
    get("sym", c.sym);
    get("damp_percent", c.damp_percent);
    get("static_groups", c.static_groups);
    get("true_sequential", c.true_sequential);
    if (j.contains("model_file_base_name") && j["model_file_base_name"].is_string()) get("model_file_base_name", c.model_file_base_name);
    if (const auto it = j.find("checkpoint_format"); it != j.end())
      detail::require(*it == "gptq", "quantize_config: checkpoint_format ", it->dump(), " is not \"gptq\" (v1)");
    detail::require(c.bits == 2 || c.bits == 3 || c.bits == 4 || c.bits == 8, "quantize_config: bits = ", c.bits,
                    " is not one of 2, 3, 4, 8");
    detail::require(c.group_size == -1 || c.group_size >= 1, "quantize_config: group_size = ", c.group_size,
                    " must be -1 or positive");
    return c;
  }

  [[nodiscard]] static Config read(const std::string& path) {
    std::ifstream in(path);
    detail::require(static_cast<bool>(in), "cannot open '", path, "'");
    try {
      return from_json(nlohmann::json::parse(in));
    } catch (const nlohmann::json::exception& e) {
      detail::fail("'", path, "' is not valid JSON (", e.what(), ")");
    }
  }

  // Writes the file atomically.
  void write(const std::string& path) const {
    AtomicFile file(path);
    const std::string text = to_json().dump(2) + "\n";
    file.write_at(0, text.data(), text.size());
    file.commit();
  }
};

// The quantize_config of a matrix's spec (desc_act when it carries a permutation).
[[nodiscard]] inline Config config_for(const QuantSpec& spec, bool desc_act) {
  Config c;
  c.bits = spec.bits;
  c.group_size = spec.group_size == 0 ? -1 : spec.group_size;
  c.desc_act = desc_act;
  c.sym = spec.symmetric;
  return c;
}

// codes [n, m] -> words [n*bits/32, m]: each column a little-endian bit stream.
[[nodiscard]] inline WordMatrix pack_rows(const Eigen::Ref<const CodeMatrix>& codes, int bits) {
  detail::require((codes.rows() * bits) % 32 == 0, "gptq pack: ", codes.rows(), " codes of ", bits,
                  " bits do not fill whole 32-bit words");
  WordMatrix words = WordMatrix::Zero(codes.rows() * bits / 32, codes.cols());
  for (Index k = 0; k < codes.rows(); ++k) {
    const Index bit = k * bits, word = bit / 32;
    const int shift = static_cast<int>(bit % 32);
    for (Index c = 0; c < codes.cols(); ++c) {
      const std::uint32_t q = codes(k, c);
      detail::require(q < (1u << bits), "gptq pack: code(", k, ", ", c, ") = ", q, " exceeds ", (1 << bits) - 1);
      words(word, c) = static_cast<std::int32_t>(static_cast<std::uint32_t>(words(word, c)) | (q << shift));
      if (shift + bits > 32)  // 3-bit spill into the next word
        words(word + 1, c) = static_cast<std::int32_t>(static_cast<std::uint32_t>(words(word + 1, c)) | (q >> (32 - shift)));
    }
  }
  return words;
}

// words [n*bits/32, m] -> codes [n, m].
[[nodiscard]] inline CodeMatrix unpack_rows(const Eigen::Ref<const WordMatrix>& words, int bits) {
  detail::require((words.rows() * 32) % bits == 0, "gptq unpack: ", words.rows(), " words do not hold whole ", bits, "-bit codes");
  const Index n = words.rows() * 32 / bits;
  const std::uint32_t mask = (1u << bits) - 1;
  CodeMatrix codes(n, words.cols());
  for (Index k = 0; k < n; ++k) {
    const Index bit = k * bits, word = bit / 32;
    const int shift = static_cast<int>(bit % 32);
    for (Index c = 0; c < words.cols(); ++c) {
      std::uint32_t q = static_cast<std::uint32_t>(words(word, c)) >> shift;
      if (shift + bits > 32) q |= static_cast<std::uint32_t>(words(word + 1, c)) << (32 - shift);
      codes(k, c) = static_cast<std::uint8_t>(q & mask);
    }
  }
  return codes;
}

// One layer in the v1 layout.
struct Checkpoint {
  WordMatrix qweight;               // [in*bits/32, out]
  WordMatrix qzeros;                // [groups, out*bits/32]
  Matrix<float> scales;             // [groups, out], fp16 values
  std::vector<std::int32_t> g_idx;  // [in]
};

// Throws unless a matrix of this shape and spec has a v1 layout.
inline void check_exportable(Index rows, Index cols, const QuantSpec& spec) {
  const int b = spec.bits;
  detail::require(b == 2 || b == 3 || b == 4 || b == 8, "GPTQ layout: bits = ", b, " is not one of 2, 3, 4, 8");
  detail::require(spec.group_axis == GroupAxis::Input, "GPTQ layout: groups must run along the input dimension");
  detail::require((cols * b) % 32 == 0, "GPTQ layout: in_features = ", cols, " times ", b,
                  " bits is not a multiple of 32 (qweight packs whole int32 words)");
  detail::require((rows * b) % 32 == 0, "GPTQ layout: out_features = ", rows, " times ", b,
                  " bits is not a multiple of 32 (qzeros packs whole int32 words)");
}

namespace detail {
[[nodiscard]] inline Index groups_of(Index cols, const QuantSpec& spec) { return cols == 0 ? 0 : spec.groups_per_row(cols); }
}  // namespace detail

template <class T>
[[nodiscard]] Checkpoint to_checkpoint(const QuantizedMatrix<T>& q) {
  const QuantSpec& spec = q.spec();
  check_exportable(q.rows(), q.cols(), spec);
  const Index out = q.rows(), in = q.cols(), groups = q.groups_per_row(), group = q.group_length();
  const int max_zero = 1 << spec.bits;
  const auto scales = q.scales(), zeros = q.zeros();
  CodeMatrix zero_codes(groups, out);  // zero - 1, transposed to [groups, out]
  Checkpoint ck;
  ck.scales.resize(groups, out);
  for (Index o = 0; o < out; ++o)
    for (Index g = 0; g < groups; ++g) {
      const float z = zeros(o, g), s = scales(o, g);
      lowbit::detail::require(z == std::nearbyint(z) && z >= 1 && z <= max_zero, "GPTQ layout: zero(", o, ", ", g, ") = ", z,
                              " is not an integer in [1, ", max_zero, "] (v1 stores zero - 1 in ", spec.bits, " bits)");
      const float s16 = round_param(s, ParamType::Float16);
      lowbit::detail::require(std::isfinite(s16), "GPTQ layout: scale(", o, ", ", g, ") = ", s, " overflows fp16");
      zero_codes(g, o) = static_cast<std::uint8_t>(z - 1);
      ck.scales(g, o) = s16;
    }
  // Codes in input-column order: input column c sits at stored position inverse[c].
  const auto inverse = q.inverse_permutation();
  ck.g_idx.resize(static_cast<std::size_t>(in));
  CodeMatrix codes(in, out);  // [in, out]
  std::vector<std::uint8_t> row(static_cast<std::size_t>(in));
  for (Index o = 0; o < out; ++o) {
    q.stored_row_codes(o, row.data());
    for (Index c = 0; c < in; ++c) codes(c, o) = row[static_cast<std::size_t>(inverse.empty() ? c : inverse[static_cast<std::size_t>(c)])];
  }
  for (Index c = 0; c < in; ++c) {
    const Index stored = inverse.empty() ? c : inverse[static_cast<std::size_t>(c)];
    ck.g_idx[static_cast<std::size_t>(c)] = static_cast<std::int32_t>(stored / group);
  }
  ck.qweight = pack_rows(codes, spec.bits);
  const CodeMatrix zero_rows = zero_codes.transpose();  // pack along the output dimension
  ck.qzeros = pack_rows(zero_rows, spec.bits).transpose();
  return ck;
}

// A QuantizedMatrix from a v1 layer. Act-order g_idx become a permutation (input columns
// stably sorted by group), which needs every group to hold group_size columns (the last
// one the rest), as GPTQ's act-order produces.
template <class T = float>
[[nodiscard]] QuantizedMatrix<T> from_checkpoint(const Checkpoint& ck, const Config& config) {
  const int bits = config.bits;
  lowbit::detail::require(bits == 2 || bits == 3 || bits == 4 || bits == 8, "GPTQ layout: bits = ", bits, " is not one of 2, 3, 4, 8");
  lowbit::detail::require((ck.qweight.rows() * 32) % bits == 0, "GPTQ qweight: ", ck.qweight.rows(), " rows do not hold whole ",
                          bits, "-bit codes");
  const Index in = ck.qweight.rows() * 32 / bits, out = ck.qweight.cols();
  QuantSpec spec;
  spec.bits = bits;
  spec.group_size = config.group_size == -1 ? 0 : config.group_size;
  spec.symmetric = config.sym;
  spec.integral_zero = true;
  spec.param_type = ParamType::Float16;
  spec.validate();
  const Index groups = detail::groups_of(in, spec), group = spec.group_length(in);
  lowbit::detail::require(ck.scales.rows() == groups && ck.scales.cols() == out, "GPTQ scales: shape ", ck.scales.rows(), "x",
                          ck.scales.cols(), " != [groups = ", groups, ", out = ", out, "]");
  lowbit::detail::require(ck.qzeros.rows() == groups && (out * bits) % 32 == 0 && ck.qzeros.cols() == out * bits / 32,
                          "GPTQ qzeros: shape ", ck.qzeros.rows(), "x", ck.qzeros.cols(), " != [", groups, ", ", out, " * ", bits,
                          " / 32]");
  lowbit::detail::require(static_cast<Index>(ck.g_idx.size()) == in, "GPTQ g_idx: ", ck.g_idx.size(), " entries != in_features ", in);
  std::vector<Index> count(static_cast<std::size_t>(groups), 0);
  for (Index c = 0; c < in; ++c) {
    const auto g = ck.g_idx[static_cast<std::size_t>(c)];
    lowbit::detail::require(g >= 0 && g < groups, "GPTQ g_idx[", c, "] = ", g, " is outside 0..", groups - 1);
    ++count[static_cast<std::size_t>(g)];
  }
  for (Index g = 0; g < groups; ++g)
    lowbit::detail::require(count[static_cast<std::size_t>(g)] == std::min(group, in - g * group), "GPTQ g_idx: group ", g, " has ",
                            count[static_cast<std::size_t>(g)], " columns, expected ", std::min(group, in - g * group),
                            " (groups must be contiguous after sorting by g_idx)");
  std::vector<std::int32_t> permutation(static_cast<std::size_t>(in));
  std::iota(permutation.begin(), permutation.end(), 0);
  std::stable_sort(permutation.begin(), permutation.end(), [&](std::int32_t a, std::int32_t b) {
    return ck.g_idx[static_cast<std::size_t>(a)] < ck.g_idx[static_cast<std::size_t>(b)];
  });
  bool identity = true;
  for (Index j = 0; j < in; ++j) identity = identity && permutation[static_cast<std::size_t>(j)] == j;
  if (identity) permutation.clear();

  const CodeMatrix by_input = unpack_rows(ck.qweight, bits);  // [in, out]
  CodeMatrix codes(out, in);
  for (Index o = 0; o < out; ++o)
    for (Index j = 0; j < in; ++j) codes(o, j) = by_input(permutation.empty() ? j : permutation[static_cast<std::size_t>(j)], o);
  const WordMatrix qzeros_t = ck.qzeros.transpose();
  const CodeMatrix zero_codes = unpack_rows(qzeros_t, bits);  // [out, groups]
  const Matrix<float> zeros = zero_codes.cast<float>().array() + 1.0f;
  const Matrix<float> scales = ck.scales.transpose();
  return QuantizedMatrix<T>::from_codes(spec, out, in, codes, scales, zeros, std::move(permutation));
}

// The four tensors of a layer under `prefix` (e.g. "model.layers.0.self_attn.q_proj").
[[nodiscard]] inline std::vector<TensorDecl> plan(const std::string& prefix, Index rows, Index cols, const QuantSpec& spec) {
  spec.validate();
  check_exportable(rows, cols, spec);
  const auto groups = static_cast<std::uint64_t>(detail::groups_of(cols, spec));
  const auto out = static_cast<std::uint64_t>(rows), in = static_cast<std::uint64_t>(cols);
  const auto b = static_cast<std::uint64_t>(spec.bits);
  return {{prefix + ".qweight", DType::I32, {in * b / 32, out}},
          {prefix + ".qzeros", DType::I32, {groups, out * b / 32}},
          {prefix + ".scales", DType::F16, {groups, out}},
          {prefix + ".g_idx", DType::I32, {in}}};
}

template <class T>
[[nodiscard]] std::vector<TensorData> encode(const std::string& prefix, const QuantizedMatrix<T>& q) {
  const Checkpoint ck = to_checkpoint(q);
  const auto decls = plan(prefix, q.rows(), q.cols(), q.spec());
  auto words = [](const WordMatrix& m) { return std::span<const std::int32_t>(m.data(), static_cast<std::size_t>(m.size())); };
  return {lowbit::detail::value_tensor(decls[0].name, DType::I32, decls[0].shape, words(ck.qweight)),
          lowbit::detail::value_tensor(decls[1].name, DType::I32, decls[1].shape, words(ck.qzeros)),
          lowbit::detail::float_tensor(decls[2].name, DType::F16, decls[2].shape,
                                       {ck.scales.data(), static_cast<std::size_t>(ck.scales.size())}),
          lowbit::detail::value_tensor(decls[3].name, DType::I32, decls[3].shape, std::span<const std::int32_t>(ck.g_idx))};
}

inline void declare(SafeTensorsWriter& writer, const std::string& prefix, Index rows, Index cols, const QuantSpec& spec) {
  for (const auto& t : plan(prefix, rows, cols, spec)) writer.declare(t);
}

template <class T>
void write(SafeTensorsWriter& writer, const std::string& prefix, const QuantizedMatrix<T>& q) {
  for (const auto& t : encode(prefix, q)) writer.write(t);
}

template <class T>
void save(SafeTensorsWriter& writer, const std::string& prefix, const QuantizedMatrix<T>& q) {
  for (auto& t : encode(prefix, q)) writer.add(std::move(t));
}

// Reads layer `prefix` from a file; `config` is the checkpoint's quantize_config. A
// missing g_idx means i / group_size.
template <class T = float>
[[nodiscard]] QuantizedMatrix<T> load(const SafeTensors& file, const std::string& prefix, const Config& config) {
  lowbit::detail::require(config.bits == 2 || config.bits == 3 || config.bits == 4 || config.bits == 8, "GPTQ layout: bits = ",
                          config.bits, " is not one of 2, 3, 4, 8");
  lowbit::detail::require(config.group_size == -1 || config.group_size >= 1, "GPTQ layout: group_size = ", config.group_size,
                          " must be -1 or positive");
  auto words = [&](const std::string& name) {
    const TensorInfo& t = file.info(name);
    if (t.dtype != DType::I32 || t.rank() != 2)
      file.fail_at(name, "is ", dtype_name(t.dtype), " ", lowbit::detail::shape_text(t.shape), ", expected a 2-D I32 tensor");
    const auto v = file.values<std::int32_t>(name);
    return WordMatrix(Eigen::Map<const WordMatrix>(v.data(), static_cast<Index>(t.shape[0]), static_cast<Index>(t.shape[1])));
  };
  Checkpoint ck;
  ck.qweight = words(prefix + ".qweight");
  ck.qzeros = words(prefix + ".qzeros");
  const std::string scales = prefix + ".scales";
  const auto [rows, cols] = file.matrix_shape(scales);
  if (file.info(scales).rank() != 2) file.fail_at(scales, "must be 2-D [groups, out]");
  ck.scales = file.matrix(scales);
  if (!ck.scales.allFinite()) file.fail_at(scales, "has a non-finite entry");
  (void)rows;
  (void)cols;
  const std::string g_idx = prefix + ".g_idx";
  const Index in = ck.qweight.rows() * 32 / config.bits;
  if (file.contains(g_idx)) {
    const auto values = file.integers(g_idx);
    if (file.info(g_idx).rank() != 1) file.fail_at(g_idx, "must be 1-D [in_features]");
    ck.g_idx.resize(values.size());
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (values[i] < 0 || values[i] > INT32_MAX) file.fail_at(g_idx, "entry ", i, " = ", values[i], " is not a group index");
      ck.g_idx[i] = static_cast<std::int32_t>(values[i]);
    }
  } else {
    const Index group = config.group_size == -1 ? std::max<Index>(in, 1) : config.group_size;
    ck.g_idx.resize(static_cast<std::size_t>(in));
    for (Index c = 0; c < in; ++c) ck.g_idx[static_cast<std::size_t>(c)] = static_cast<std::int32_t>(c / group);
  }
  try {
    return from_checkpoint<T>(ck, config);
  } catch (const Error& e) {
    lowbit::detail::fail("safetensors '", file.source(), "': GPTQ layer '", prefix, "': ", e.what());
  }
}

}  // namespace lowbit::gptq_format

// Checkpoint: the tensors of a model, from one .safetensors file or from a directory of
// shards listed by model.safetensors.index.json ({"weight_map": {name: shard file}}).
// Every shard is memory-mapped once; tensor names are unique across the checkpoint.
#pragma once

#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "lowbit/core/error.hpp"
#include "lowbit/io/safetensors.hpp"

namespace lowbit {

class Checkpoint {
 public:
  static constexpr const char* kIndexName = "model.safetensors.index.json";

  // A .safetensors file, or a directory holding model.safetensors.index.json (or a
  // single model.safetensors).
  [[nodiscard]] static Checkpoint open(const std::string& path) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) detail::fail("input '", path, "' does not exist");
    Checkpoint ck;
    if (!S_ISDIR(st.st_mode)) {
      ck.add_shard(SafeTensors::open(path));
      ck.index_all();
      return ck;
    }
    const std::string dir = path.back() == '/' ? path.substr(0, path.size() - 1) : path;
    const std::string index = dir + "/" + kIndexName;
    if (::stat(index.c_str(), &st) != 0) {
      const std::string single = dir + "/model.safetensors";
      if (::stat(single.c_str(), &st) == 0) return open(single);
      detail::fail("input directory '", path, "' has neither ", kIndexName, " nor model.safetensors");
    }
    ck.index_path_ = index;
    ck.open_index(dir, index);
    return ck;
  }

  // Tensor names in file order (shards in index order).
  [[nodiscard]] const std::vector<std::string>& names() const { return names_; }
  [[nodiscard]] const std::vector<SafeTensors>& shards() const { return shards_; }
  [[nodiscard]] const std::string& index_path() const { return index_path_; }

  [[nodiscard]] bool contains(const std::string& name) const { return where_.count(name) != 0; }
  [[nodiscard]] const SafeTensors& file_of(const std::string& name) const {
    const auto it = where_.find(name);
    if (it == where_.end()) detail::fail("checkpoint: tensor '", detail::printable(name), "' is not in the input");
    return shards_[it->second];
  }
  [[nodiscard]] const TensorInfo& info(const std::string& name) const { return file_of(name).info(name); }

  // The shards' __metadata__ merged (the first shard's value wins on a conflict).
  [[nodiscard]] std::map<std::string, std::string> metadata() const {
    std::map<std::string, std::string> merged;
    for (const auto& shard : shards_) merged.insert(shard.metadata().begin(), shard.metadata().end());
    return merged;
  }

  // Identities of every input file (shards and index), to refuse overwriting one.
  [[nodiscard]] std::vector<FileId> file_ids() const {
    std::vector<FileId> ids;
    for (const auto& shard : shards_)
      if (const auto id = shard.file_id()) ids.push_back(*id);
    FileId id;
    if (!index_path_.empty() && detail::file_id(index_path_, id)) ids.push_back(id);
    return ids;
  }

  [[nodiscard]] std::uint64_t total_bytes() const {
    std::uint64_t total = 0;
    for (const auto& shard : shards_) total += shard.file_size();
    return total;
  }

 private:
  void add_shard(SafeTensors shard) { shards_.push_back(std::move(shard)); }

  void index_all() {
    for (std::size_t s = 0; s < shards_.size(); ++s)
      for (const auto& t : shards_[s].tensors()) {
        const auto [it, inserted] = where_.emplace(t.name, s);
        if (!inserted)
          detail::fail("checkpoint: tensor '", detail::printable(t.name), "' is in both '", shards_[it->second].source(), "' and '",
                       shards_[s].source(), "'");
        names_.push_back(t.name);
      }
  }

  void open_index(const std::string& dir, const std::string& index) {
    nlohmann::json j;
    try {
      std::ifstream in(index);
      if (!in) detail::fail("cannot open '", index, "'");
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      detail::fail("'", index, "' is not valid JSON (", e.what(), ")");
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      detail::fail("'", index, "' has no \"weight_map\" object");
    std::map<std::string, std::size_t> shard_of_file;
    std::vector<std::pair<std::string, std::string>> listed;
    for (const auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string()) detail::fail("'", index, "': weight_map entry '", detail::printable(name), "' is not a file name");
      const std::string shard = file.get<std::string>();
      // Shards live beside the index: no paths, so an index cannot point anywhere else.
      if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..")
        detail::fail("'", index, "': shard '", detail::printable(shard), "' of tensor '", detail::printable(name),
                     "' is not a plain file name");
      if (shard_of_file.count(shard) == 0) {
        shard_of_file.emplace(shard, shards_.size());
        add_shard(SafeTensors::open(dir + "/" + shard));
      }
      listed.emplace_back(name, shard);
    }
    index_all();
    for (const auto& [name, shard] : listed) {
      const auto it = where_.find(name);
      if (it == where_.end() || it->second != shard_of_file.at(shard))
        detail::fail("'", index, "' maps tensor '", detail::printable(name), "' to '", shard, "', which does not hold it");
    }
  }

  std::vector<SafeTensors> shards_;
  std::vector<std::string> names_;
  std::map<std::string, std::size_t> where_;
  std::string index_path_;
};

}  // namespace lowbit

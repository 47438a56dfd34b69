// MappedFile: a whole file mapped read-only (POSIX mmap), so a model's tensors are read
// straight from the page cache without a copy.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <utility>

#include "lowbit/core/error.hpp"

namespace lowbit {

// Identity of a file on disk (device, inode): two paths name the same file when equal.
struct FileId {
  dev_t device = 0;
  ino_t inode = 0;
  friend bool operator==(const FileId&, const FileId&) = default;
};

namespace detail {

[[nodiscard]] inline std::string errno_text(int error) { return std::strerror(error); }

// The id of an existing path, or false when it does not exist.
[[nodiscard]] inline bool file_id(const std::string& path, FileId& id) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return false;
  id = FileId{st.st_dev, st.st_ino};
  return true;
}

}  // namespace detail

class MappedFile {
 public:
  MappedFile() = default;

  explicit MappedFile(std::string path) : path_(std::move(path)) {
    const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) detail::fail("cannot open '", path_, "': ", detail::errno_text(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int error = errno;
      ::close(fd);
      detail::fail("cannot stat '", path_, "': ", detail::errno_text(error));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      detail::fail("'", path_, "' is not a regular file");
    }
    id_ = FileId{st.st_dev, st.st_ino};
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* mapped = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (mapped == MAP_FAILED) {
        const int error = errno;
        ::close(fd);
        detail::fail("cannot map '", path_, "' (", size_, " bytes): ", detail::errno_text(error));
      }
      data_ = static_cast<const std::uint8_t*>(mapped);
    }
    ::close(fd);  // the mapping keeps the file alive
  }

  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& other) noexcept { swap(other); }
  MappedFile& operator=(MappedFile&& other) noexcept {
    if (this != &other) {
      unmap();
      swap(other);
    }
    return *this;
  }
  ~MappedFile() { unmap(); }

  [[nodiscard]] const std::uint8_t* data() const { return data_; }
  [[nodiscard]] std::size_t size() const { return size_; }
  [[nodiscard]] std::span<const std::uint8_t> bytes() const { return {data_, size_}; }
  [[nodiscard]] const std::string& path() const { return path_; }
  [[nodiscard]] FileId id() const { return id_; }

 private:
  void unmap() {
    if (data_ != nullptr) ::munmap(const_cast<std::uint8_t*>(data_), size_);
    data_ = nullptr;
    size_ = 0;
  }
  void swap(MappedFile& other) noexcept {
    std::swap(path_, other.path_);
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(id_, other.id_);
  }

  std::string path_;
  const std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
  FileId id_{};
};

}  // namespace lowbit

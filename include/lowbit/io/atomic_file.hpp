// AtomicFile: a file that appears under its final name complete or not at all.
//
// Data goes to a temporary file in the destination's directory (same filesystem, so the
// final rename is atomic). commit() fsyncs the data, renames it over the destination
// and fsyncs the directory. Destroying an uncommitted AtomicFile (an error, an
// exception) removes the temporary. On Linux the temporary is an unnamed O_TMPFILE
// inode, so even a killed process leaves nothing behind; elsewhere it is a hidden
// `.<name>.XXXXXX` file that only a hard kill can leave.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "lowbit/core/error.hpp"
#include "lowbit/io/mapped_file.hpp"

namespace lowbit {

class AtomicFile {
 public:
  explicit AtomicFile(std::string path) : path_(std::move(path)) {
    detail::require(!path_.empty() && path_.back() != '/', "AtomicFile: path '", path_, "' names no file");
    const auto slash = path_.find_last_of('/');
    directory_ = slash == std::string::npos ? "." : (slash == 0 ? "/" : path_.substr(0, slash));
    base_ = slash == std::string::npos ? path_ : path_.substr(slash + 1);
    struct stat st {};
    if (::stat(directory_.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
      detail::fail("cannot write '", path_, "': directory '", directory_, "' does not exist");
#if defined(O_TMPFILE)
    fd_ = ::open(directory_.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0644);
    if (fd_ >= 0 && ::access("/proc/self/fd", X_OK) != 0) {  // linkat needs /proc to name the inode
      ::close(fd_);
      fd_ = -1;
    }
#endif
    if (fd_ < 0) {
      std::string pattern = directory_ + "/." + base_ + ".XXXXXX";
      std::vector<char> name(pattern.begin(), pattern.end());
      name.push_back('\0');
      fd_ = ::mkostemp(name.data(), O_CLOEXEC);
      if (fd_ < 0) detail::fail("cannot create a temporary file in '", directory_, "': ", detail::errno_text(errno));
      temp_path_ = name.data();
      ::fchmod(fd_, 0644);
    }
  }

  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile() { discard(); }

  [[nodiscard]] const std::string& path() const { return path_; }
  [[nodiscard]] bool committed() const { return committed_; }

  // Writes `size` bytes at `offset` (positioned: distinct ranges may be written from
  // several threads at once).
  void write_at(std::uint64_t offset, const void* data, std::size_t size) {
    detail::require(fd_ >= 0, "AtomicFile '", path_, "': write after commit or discard");
    const auto* bytes = static_cast<const std::uint8_t*>(data);
    while (size > 0) {
      const std::size_t chunk = std::min<std::size_t>(size, std::size_t{1} << 30);
      const ssize_t written = ::pwrite(fd_, bytes, chunk, static_cast<off_t>(offset));
      if (written < 0 && errno == EINTR) continue;
      if (written <= 0)
        detail::fail("cannot write '", path_, "' at byte ", offset, ": ",
                     written < 0 ? detail::errno_text(errno) : std::string("no progress"));
      bytes += written;
      offset += static_cast<std::uint64_t>(written);
      size -= static_cast<std::size_t>(written);
    }
  }

  // Sets the final size (a sparse tail reads as zeros).
  void resize(std::uint64_t size) {
    detail::require(fd_ >= 0, "AtomicFile '", path_, "': resize after commit or discard");
    if (::ftruncate(fd_, static_cast<off_t>(size)) != 0)
      detail::fail("cannot size '", path_, "' to ", size, " bytes: ", detail::errno_text(errno));
  }

  // Makes the data durable and puts it under the final name, replacing any old file.
  void commit() {
    detail::require(fd_ >= 0, "AtomicFile '", path_, "': commit after commit or discard");
    if (::fsync(fd_) != 0) detail::fail("cannot flush '", path_, "': ", detail::errno_text(errno));
    if (temp_path_.empty()) link_unnamed();
    if (::rename(temp_path_.c_str(), path_.c_str()) != 0)
      detail::fail("cannot rename '", temp_path_, "' to '", path_, "': ", detail::errno_text(errno));
    temp_path_.clear();
    ::close(fd_);
    fd_ = -1;
    committed_ = true;
    sync_directory();
  }

  // Drops everything written; the destination is untouched.
  void discard() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    if (!temp_path_.empty()) ::unlink(temp_path_.c_str());
    temp_path_.clear();
  }

 private:
  // Gives the unnamed O_TMPFILE inode a temporary name (linkat cannot replace a file;
  // the rename that follows can).
  void link_unnamed() {
    static std::atomic<unsigned> counter{0};
    const std::string proc = "/proc/self/fd/" + std::to_string(fd_);
    for (int attempt = 0; attempt < 100; ++attempt) {
      std::string candidate = directory_ + "/." + base_ + ".tmp" + std::to_string(::getpid()) + "." +
                              std::to_string(counter.fetch_add(1));
      if (::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, candidate.c_str(), AT_SYMLINK_FOLLOW) == 0) {
        temp_path_ = std::move(candidate);
        return;
      }
      if (errno != EEXIST) detail::fail("cannot name the temporary file of '", path_, "': ", detail::errno_text(errno));
    }
    detail::fail("cannot name the temporary file of '", path_, "': every candidate name exists");
  }

  void sync_directory() const {
    const int dir = ::open(directory_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0) return;  // the rename is done; a directory we cannot open cannot be synced
    ::fsync(dir);
    ::close(dir);
  }

  std::string path_, directory_, base_, temp_path_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace lowbit

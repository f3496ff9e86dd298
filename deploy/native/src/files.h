// File I/O the runner trusts its state to: sha256, atomic writes, image listing.
#pragma once
#include "errors.h"

#include <functional>
#include <string>
#include <vector>

namespace edgetl {

std::string sha256_file(const std::string& path);
std::string sha256_bytes(const std::string& data);
std::string read_file(const std::string& path);
bool is_file(const std::string& path);
bool is_dir(const std::string& path);
// Writes `data` to a temporary file beside `path`, fsyncs it, renames it over `path` and fsyncs
// the directory: after a crash `path` holds either the old or the new bytes, never a mix. On any
// failure (full disk, read-only directory) the temporary file is removed and DeviceError thrown.
void atomic_write(const std::string& path, const std::string& data);
// The same, with the bytes streamed by `produce` through the sink it is given (no full copy in memory).
using ByteSink = std::function<void(const void* data, size_t size)>;
void atomic_write(const std::string& path, const std::function<void(const ByteSink&)>& produce);
// Atomically makes `path` name the same bytes as `existing` (a hard link; a streamed copy where
// the file system has no links).
void atomic_link(const std::string& existing, const std::string& path);
// Creates `dir` (and parents) and checks that files can be created in it.
void ensure_writable_dir(const std::string& dir);
// Removes the temporaries a killed writer left in `dir` for targets whose names start with one of `prefixes`.
void remove_stale_temporaries(const std::string& dir, const std::vector<std::string>& prefixes);
// Image files (by suffix, as the Python runner) under `dir`, recursively, sorted by path.
std::vector<std::string> list_images(const std::string& dir);
// Sorted names of the subdirectories of `dir`.
std::vector<std::string> subdirectories(const std::string& dir);
std::string join(const std::string& a, const std::string& b);
// `name` when it is a plain file name (not empty, no '/', not "." or "..", no NUL byte); else
// DeviceError naming `what`. Every name read from a manifest or a state.json passes through here
// before it is joined to a directory, so none can reach outside it.
const std::string& plain_name(const std::string& name, const std::string& what);

// One writer per directory: an advisory flock(LOCK_EX) on DIR/.edgetl.lock, held while this object
// lives (the OS releases it when the process dies, kill -9 included, so no lock is ever stale).
// The holder's pid is written into the file as decimal text and a newline (the Python side uses
// the same file and convention for run directories). A second writer gets DeviceError naming it.
class DirLock {
 public:
  explicit DirLock(const std::string& dir);
  ~DirLock();
  DirLock(const DirLock&) = delete;
  DirLock& operator=(const DirLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace edgetl

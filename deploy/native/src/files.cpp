#include "files.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

namespace fs = std::filesystem;

namespace edgetl {

namespace {
const char* const kImageSuffixes[] = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"};

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}
}  // namespace

std::string join(const std::string& a, const std::string& b) { return (fs::path(a) / b).string(); }

const std::string& plain_name(const std::string& name, const std::string& what) {
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos || name.find('\0') != std::string::npos)
    throw DeviceError(what + ": '" + name + "' is not a plain file name (no '/', not '..', not empty)");
  return name;
}

DirLock::DirLock(const std::string& dir) {
  const std::string path = join(dir, ".edgetl.lock");
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) throw DeviceError("cannot open the lock " + path + ": " + std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char pid[32] = {0};
    const ssize_t n = ::pread(fd_, pid, sizeof pid - 1, 0);
    std::string holder = n > 0 ? std::string(pid, static_cast<size_t>(n)) : "";
    holder.erase(std::find_if(holder.begin(), holder.end(), [](char c) { return c < '0' || c > '9'; }), holder.end());
    ::close(fd_);
    fd_ = -1;
    if (err != EWOULDBLOCK) throw DeviceError("cannot lock " + path + ": " + std::strerror(err));
    throw DeviceError(dir + " is in use by another process (pid " + (holder.empty() ? "unknown" : holder) + " holds " + path +
                      "); wait for it to finish or use another directory");
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    const int err = errno;
    ::close(fd_);
    fd_ = -1;
    throw DeviceError("cannot write the lock " + path + ": " + std::strerror(err));
  }
}

DirLock::~DirLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the lock; the file stays (removing it would race a waiting writer)
}

bool is_file(const std::string& path) {
  std::error_code ec;
  return fs::is_regular_file(path, ec);
}

bool is_dir(const std::string& path) {
  std::error_code ec;
  return fs::is_directory(path, ec);
}

namespace {
std::string hex_digest(EVP_MD_CTX* ctx) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, digest, &len);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}
}  // namespace

std::string sha256_bytes(const std::string& data) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr);
  EVP_DigestUpdate(ctx.get(), data.data(), data.size());
  return hex_digest(ctx.get());
}

std::string sha256_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DeviceError("cannot read " + path);
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<size_t>(in.gcount()));
  }
  return hex_digest(ctx.get());
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DeviceError("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

namespace {
// The umask, read once: umask() can only be read by setting it, so set it straight back.
mode_t process_umask() {
  static const mode_t mask = [] {
    mode_t m = ::umask(0);
    ::umask(m);
    return m;
  }();
  return mask;
}

// A temporary file beside `path`; renamed over it by commit(), removed if never committed.
class TempFile {
 public:
  explicit TempFile(const std::string& path) : path_(path) {
    fs::path target(path);
    dir_ = target.parent_path().empty() ? "." : target.parent_path().string();
    std::string tmp = join(dir_, "." + target.filename().string() + ".XXXXXX");
    name_.assign(tmp.begin(), tmp.end());
    name_.push_back('\0');
    fd_ = ::mkstemp(name_.data());
    if (fd_ < 0) throw DeviceError("cannot write in " + dir_ + ": " + std::strerror(errno));
    ::fchmod(fd_, 0666 & ~process_umask());  // mkstemp makes 0600; a saved file gets the user's usual mode
  }
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(name_.data());
  }
  void write(const void* data, size_t size) {
    const char* p = static_cast<const char*>(data);
    while (size > 0) {
      ssize_t n = ::write(fd_, p, size);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) fail("write");
      p += n;
      size -= static_cast<size_t>(n);
    }
  }
  void commit() {
    if (::fsync(fd_) != 0) fail("flush");
    int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) fail("write");
    if (::rename(name_.data(), path_.c_str()) != 0) fail("replace");
    committed_ = true;
    fsync_dir(dir_);
  }
  const char* name() const { return name_.data(); }

 private:
  [[noreturn]] void fail(const char* what) {
    throw DeviceError(std::string("cannot ") + what + " " + path_ + ": " + std::strerror(errno) + " (the previous file is kept)");
  }
  std::string path_, dir_;
  std::vector<char> name_;
  int fd_ = -1;
  bool committed_ = false;
};
}  // namespace

void atomic_write(const std::string& path, const std::function<void(const ByteSink&)>& produce) {
  TempFile tmp(path);
  produce([&](const void* data, size_t size) { tmp.write(data, size); });
  tmp.commit();
}

void atomic_write(const std::string& path, const std::string& data) {
  atomic_write(path, [&](const ByteSink& sink) { sink(data.data(), data.size()); });
}

void atomic_link(const std::string& existing, const std::string& path) {
  std::string tmp = path + ".link-tmp";
  ::unlink(tmp.c_str());
  if (::link(existing.c_str(), tmp.c_str()) == 0) {
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      ::unlink(tmp.c_str());
      throw DeviceError("cannot replace " + path + ": " + std::strerror(errno));
    }
    fsync_dir(fs::path(path).parent_path().empty() ? "." : fs::path(path).parent_path().string());
    return;
  }
  std::ifstream in(existing, std::ios::binary);
  if (!in) throw DeviceError("cannot read " + existing);
  atomic_write(path, [&](const ByteSink& sink) {
    std::vector<char> buf(1 << 20);
    while (in) {
      in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
      sink(buf.data(), static_cast<size_t>(in.gcount()));
    }
  });
}

void ensure_writable_dir(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw DeviceError("cannot create state directory " + dir + ": " + ec.message());
  std::string probe = join(dir, ".edgetl-write-test-XXXXXX");
  std::vector<char> name(probe.begin(), probe.end());
  name.push_back('\0');
  int fd = ::mkstemp(name.data());
  if (fd < 0) throw DeviceError("state directory " + dir + " is not writable: " + std::strerror(errno));
  ::close(fd);
  ::unlink(name.data());
}

void remove_stale_temporaries(const std::string& dir, const std::vector<std::string>& prefixes) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    // TempFile's names: "." + target name + "." + six random characters
    if (name.size() < 9 || name[0] != '.' || name[name.size() - 7] != '.') continue;
    for (const auto& prefix : prefixes)
      if (name.compare(1, prefix.size(), prefix) == 0) {
        fs::remove(entry.path(), ec);
        break;
      }
  }
}

std::vector<std::string> list_images(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (!it->is_regular_file(ec)) continue;
    std::string ext = lower(it->path().extension().string());
    for (const char* s : kImageSuffixes)
      if (ext == s) out.push_back(it->path().string());
  }
  if (ec) throw DeviceError("cannot list " + dir + ": " + ec.message());
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> subdirectories(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec))
    if (entry.is_directory()) out.push_back(entry.path().filename().string());
  if (ec) throw DeviceError("cannot list " + dir + ": " + ec.message());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace edgetl

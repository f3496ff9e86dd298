#include "npy.h"

#include <cstdlib>
#include <cstring>
#include <map>

#include "files.h"

namespace edgetl {

namespace {
constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;

size_t itemsize(const std::string& descr) {
  if (descr.size() < 3 || (descr[0] != '<' && descr[0] != '|')) return 0;
  return static_cast<size_t>(std::atoi(descr.c_str() + 2));
}

// The value after 'key': in numpy's header dict (a Python literal numpy itself writes).
std::string field(const std::string& header, const std::string& key, const std::string& path) {
  size_t at = header.find("'" + key + "':");
  if (at == std::string::npos) throw DeviceError(path + " is not a .npy file numpy wrote (no '" + key + "' in its header)");
  at = header.find_first_not_of(' ', at + key.size() + 3);
  if (at == std::string::npos) throw DeviceError(path + ": truncated .npy header");
  if (header[at] == '\'') {
    size_t end = header.find('\'', at + 1);
    if (end == std::string::npos) throw DeviceError(path + ": truncated .npy header");
    return header.substr(at + 1, end - at - 1);
  }
  if (header[at] == '(') {
    size_t end = header.find(')', at);
    if (end == std::string::npos) throw DeviceError(path + ": truncated .npy header");
    return header.substr(at + 1, end - at - 1);
  }
  size_t end = header.find_first_of(",}", at);
  return header.substr(at, end == std::string::npos ? std::string::npos : end - at);
}
}  // namespace

std::string npy_descr(const std::string& dtype) {
  static const std::map<std::string, std::string> table = {
      {"float32", "<f4"}, {"float64", "<f8"}, {"int64", "<i8"}, {"int32", "<i4"}, {"uint8", "|u1"}, {"bool", "|b1"}};
  auto it = table.find(dtype);
  if (it == table.end()) throw DeviceError("no .npy type for tensor dtype " + dtype);
  return it->second;
}

NpyArray read_npy(const std::string& path) {
  const std::string bytes = read_file(path);
  if (bytes.size() < kMagicSize + 4 || bytes.compare(0, kMagicSize, kMagic, kMagicSize) != 0)
    throw DeviceError(path + " is not a .npy file");
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0, start = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | static_cast<unsigned char>(bytes[9]) << 8;
    start = 10;
  } else if ((major == 2 || major == 3) && bytes.size() >= 12) {
    for (int i = 3; i >= 0; --i) header_len = header_len << 8 | static_cast<unsigned char>(bytes[8 + i]);
    start = 12;
  } else {
    throw DeviceError(path + ": unsupported .npy version " + std::to_string(major));
  }
  if (start + header_len > bytes.size()) throw DeviceError(path + ": truncated .npy header");
  const std::string header = bytes.substr(start, header_len);
  NpyArray a;
  a.descr = field(header, "descr", path);
  if (field(header, "fortran_order", path).find("False") == std::string::npos)
    throw DeviceError(path + ": Fortran-order arrays are not accepted (write it with numpy.ascontiguousarray)");
  const std::string shape = field(header, "shape", path);
  size_t numel = 1;
  for (size_t at = 0; at < shape.size();) {
    size_t end = shape.find(',', at);
    std::string dim = shape.substr(at, end == std::string::npos ? std::string::npos : end - at);
    if (dim.find_first_not_of(' ') != std::string::npos) {
      char* stop = nullptr;
      long long d = std::strtoll(dim.c_str(), &stop, 10);
      if (d < 0 || stop == dim.c_str()) throw DeviceError(path + ": bad shape (" + shape + ")");
      a.shape.push_back(d);
      numel *= static_cast<size_t>(d);
    }
    if (end == std::string::npos) break;
    at = end + 1;
  }
  const size_t item = itemsize(a.descr);
  if (item == 0 || a.descr[0] == '>') throw DeviceError(path + ": dtype '" + a.descr + "' is not a little-endian number type");
  if (bytes.size() - start - header_len != numel * item)
    throw DeviceError(path + " holds " + std::to_string(bytes.size() - start - header_len) + " data bytes, its shape needs " +
                      std::to_string(numel * item));
  a.data = bytes.substr(start + header_len);
  return a;
}

void write_npy(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape, const void* data, size_t size) {
  std::string dims;  // numpy's spelling: (), (5,), (3, 4)
  for (size_t i = 0; i < shape.size(); ++i) dims += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1) dims += ",";
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  // numpy pads the header with spaces to a multiple of 64 bytes (data aligned), ending in '\n'
  const size_t total = (kMagicSize + 4 + header.size() + 1 + 63) / 64 * 64;
  header.append(total - kMagicSize - 4 - header.size() - 1, ' ');
  header += '\n';
  std::string prefix(kMagic, kMagicSize);
  prefix += '\x01';
  prefix += '\x00';
  prefix += static_cast<char>(header.size() & 0xff);
  prefix += static_cast<char>(header.size() >> 8);
  atomic_write(path, [&](const ByteSink& sink) {
    sink(prefix.data(), prefix.size());
    sink(header.data(), header.size());
    sink(data, size);
  });
}

}  // namespace edgetl

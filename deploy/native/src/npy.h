// NumPy's .npy format (version 1-3), the one tensor file format a fleet exchanges: Flower carries
// arrays as .npy bytes, so a device client writes and reads exactly those, never pickles.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace edgetl {

struct NpyArray {
  std::string descr;           // numpy's dtype string, e.g. "<f4"
  std::vector<int64_t> shape;  // () for a 0-d array
  std::string data;            // the raw little-endian C-order bytes
};

// numpy's descr for one of the runner's dtype names ("float32" -> "<f4"); DeviceError if unknown.
std::string npy_descr(const std::string& dtype);
// Reads `path`; DeviceError naming the file for anything but a C-order array whose bytes fit its shape.
NpyArray read_npy(const std::string& path);
// Writes `size` bytes at `data` as a C-order array, atomically.
void write_npy(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape, const void* data, size_t size);

}  // namespace edgetl

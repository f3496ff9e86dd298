#include "npy.h"

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>

#include "files.h"

namespace edgetl {

namespace {
constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;

// numpy's header: a Python dict literal with exactly the keys 'descr' (a string), 'fortran_order'
// (True/False) and 'shape' (a tuple of non-negative integers), e.g.
//   {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
// parsed as the literal it is (numpy reads it with ast.literal_eval), so text inside a string can
// never be taken for a key, and anything numpy would read as another dtype (a list: a structured
// or object type) is refused.
struct Header {
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
};

class HeaderParser {
 public:
  HeaderParser(const std::string& text, const std::string& path) : s_(text), path_(path) {}

  Header parse() {
    Header h;
    std::set<std::string> seen;
    expect('{');
    while (!take('}')) {
      const std::string key = string_literal();
      expect(':');
      if (!seen.insert(key).second) fail("key '" + key + "' appears twice");
      if (key == "descr") {
        if (peek() != '\'' && peek() != '"') fail("'descr' is not a plain dtype string (a structured or object dtype?)");
        h.descr = string_literal();
      } else if (key == "fortran_order") {
        h.fortran_order = boolean();
      } else if (key == "shape") {
        h.shape = tuple();
      } else {
        fail("unexpected key '" + key + "'");
      }
      if (!take(',')) {
        expect('}');
        break;
      }
    }
    skip();
    if (at_ != s_.size()) fail("text after the header dict");
    if (seen.size() != 3) fail("it needs the keys 'descr', 'fortran_order' and 'shape'");
    return h;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const { throw DeviceError(path_ + " has a malformed .npy header: " + why); }
  void skip() {
    while (at_ < s_.size() && (s_[at_] == ' ' || s_[at_] == '\n' || s_[at_] == '\t')) ++at_;
  }
  char peek() {
    skip();
    return at_ < s_.size() ? s_[at_] : '\0';
  }
  bool take(char c) {
    if (peek() != c) return false;
    ++at_;
    return true;
  }
  void expect(char c) {
    if (!take(c)) fail(std::string("expected '") + c + "'");
  }
  std::string string_literal() {
    const char quote = peek();
    if (quote != '\'' && quote != '"') fail("expected a string");
    const size_t end = s_.find(quote, ++at_);
    if (end == std::string::npos) fail("unterminated string");
    std::string out = s_.substr(at_, end - at_);
    if (out.find('\\') != std::string::npos) fail("escapes in a string");
    at_ = end + 1;
    return out;
  }
  bool boolean() {
    skip();
    for (const auto& [word, value] : {std::pair<const char*, bool>{"True", true}, {"False", false}})
      if (s_.compare(at_, std::strlen(word), word) == 0) {
        at_ += std::strlen(word);
        return value;
      }
    fail("'fortran_order' is not True or False");
  }
  std::vector<int64_t> tuple() {
    std::vector<int64_t> out;
    expect('(');
    while (!take(')')) {
      skip();
      size_t digits = 0;
      while (at_ + digits < s_.size() && std::isdigit(static_cast<unsigned char>(s_[at_ + digits]))) ++digits;
      if (digits == 0 || digits > 18) fail("'shape' holds something other than a non-negative integer");
      out.push_back(std::stoll(s_.substr(at_, digits)));
      at_ += digits;
      if (!take(',')) {
        expect(')');
        break;
      }
    }
    return out;
  }

  const std::string& s_;
  const std::string& path_;
  size_t at_ = 0;
};

}  // namespace

namespace {
const std::map<std::string, std::string>& descr_table() {
  static const std::map<std::string, std::string> table = {{"float32", "<f4"}, {"float64", "<f8"}, {"int64", "<i8"},
                                                           {"int32", "<i4"},   {"uint8", "|u1"},   {"bool", "|b1"}};
  return table;
}

// Bytes per item of one of the descrs above; 0 for any other (object, big-endian, structured ...).
size_t itemsize(const std::string& descr) {
  for (const auto& [dtype, d] : descr_table())
    if (d == descr) return static_cast<size_t>(descr[2] - '0');
  return 0;
}
}  // namespace

std::string npy_descr(const std::string& dtype) {
  auto it = descr_table().find(dtype);
  if (it == descr_table().end()) throw DeviceError("no .npy type for tensor dtype " + dtype);
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
  const Header header = HeaderParser(bytes.substr(start, header_len), path).parse();
  if (header.fortran_order) throw DeviceError(path + ": Fortran-order arrays are not accepted (write it with numpy.ascontiguousarray)");
  NpyArray a;
  a.descr = header.descr;
  a.shape = header.shape;
  const size_t item = itemsize(a.descr);
  if (item == 0) throw DeviceError(path + ": dtype '" + a.descr + "' is not one of the number types the runner reads");
  const size_t data_bytes = bytes.size() - start - header_len;
  size_t numel = 1;
  for (int64_t d : a.shape)  // a shape whose product overflows cannot match the bytes there are
    if (d != 0 && numel > data_bytes / static_cast<size_t>(d)) numel = data_bytes + 1;
    else numel *= static_cast<size_t>(d);
  if (data_bytes != numel * item)
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

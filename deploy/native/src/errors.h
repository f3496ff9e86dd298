// The runner's one error type a user can cause (bad bundle, bad image, bad flag, full disk).
#pragma once
#include <stdexcept>

namespace edgetl {

// Printed by main() as one line "edgetl-device: error: ...", exit status 2. Any other exception
// is a bug: "internal error", exit status 1.
struct DeviceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace edgetl

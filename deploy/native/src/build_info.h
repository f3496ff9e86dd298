// What this edgetl-device is: its architecture and the ExecuTorch release it was built against
// (EDGETL_EXECUTORCH_VERSION, the wheel's version, set by CMakeLists.txt).
#pragma once
#include <string>

namespace edgetl {

#if defined(__aarch64__)
constexpr const char* kArch = "aarch64";
#elif defined(__x86_64__)
constexpr const char* kArch = "x86_64";
#elif defined(__arm__)
constexpr const char* kArch = "arm";
#else
constexpr const char* kArch = "unknown";
#endif

#ifndef EDGETL_EXECUTORCH_VERSION
#error "EDGETL_EXECUTORCH_VERSION must be set by the build (CMakeLists.txt)"
#endif
constexpr const char* kExecutorchVersion = EDGETL_EXECUTORCH_VERSION;

// DeviceError unless a bundle made for ExecuTorch `series` ("MAJOR.MINOR", manifest.json ->
// runtime.executorch_series) can run on the runtime this runner was built against: a program
// from a newer release may use operators or a format this runtime lacks.
void check_runtime_series(const std::string& series, const std::string& manifest_path);

}  // namespace edgetl

# Cross-building edgetl-device for 64-bit ARM Linux (Raspberry Pi OS Bookworm = Debian 12 arm64)
# on a Debian 12 x86-64 machine: build.sh --target aarch64 passes this file to CMake.
# Needs g++-aarch64-linux-gnu and the arm64 -dev packages (dpkg --add-architecture arm64).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64;-L;/)
# Without it FindOpenSSL takes pkg-config's hint to the host's amd64 libcrypto ("file in wrong format").
set(ENV{PKG_CONFIG_LIBDIR} "/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig")
# Headers and libraries of the target come from multiarch paths; programs (cmake's tools) from the host.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)

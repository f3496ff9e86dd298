// ExecuTorch's shared thread pool (libexecutorch_threadpool.so): the one place edgetl's C++
// declares it. The wheel ships the library but not threadpool.h; these members are all edgetl
// calls (a non-virtual member's symbol does not depend on the class layout). XNNPACK, ExecuTorch's
// optimized kernels and edgetl's kernels share the pool, so `--threads` sizes all of them.
#pragma once

#include <cstddef>
#include <cstdint>

#include <executorch/runtime/core/function_ref.h>

namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count() const;
  // fn(i) for every i in [0, range), spread over the pool's threads; returns when all are done
  void run(::executorch::runtime::FunctionRef<void(size_t)> fn, size_t range);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace edgetl_kernels {

// fn(i) for i in [0, range) on the shared pool (inline when range is 1). Callers make each i
// write its own outputs only, with a fixed summation order, so results do not depend on the
// number of threads.
inline size_t thread_count() { return ::executorch::extension::threadpool::get_threadpool()->get_thread_count(); }

// Resize the shared pool to n threads. ExecuTorch marks this member unsafe (not to be called while
// the pool runs work): the runner calls it once, before it loads any program, and it is the only
// way to size the pool that XNNPACK and these kernels share, so it is reached here and nowhere else.
inline void set_thread_count(uint32_t n) { ::executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(n); }

template <typename F>
void parallel_for(size_t range, F&& fn) {
  if (range == 0) return;
  if (range == 1) {
    fn(size_t{0});
    return;
  }
  ::executorch::extension::threadpool::get_threadpool()->run(fn, range);
}

// f(begin, end) over [0, n) in ranges of `size` (the last one shorter), spread over the pool:
// for elementwise work, where any split gives the same bits.
template <typename F>
void parallel_ranges(int64_t n, int64_t size, F&& f) {
  parallel_for(static_cast<size_t>((n + size - 1) / size), [&](size_t i) {
    const int64_t b = static_cast<int64_t>(i) * size;
    f(b, b + size < n ? b + size : n);
  });
}

}  // namespace edgetl_kernels

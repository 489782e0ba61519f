// Small helpers shared by dhjax's CPU FFI handlers.
//
// parallel_for(n, fn): runs fn(i) for i in [0, n) on a few std::threads with dynamic scheduling
// (an atomic work counter), so tiles of uneven cost balance. The thread count is
// DHJAX_NUM_THREADS when set, else std::thread::hardware_concurrency(); work smaller than
// `min_per_thread` items per thread runs on fewer threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

namespace dhjax {

inline int num_threads() {
  if (const char* env = std::getenv("DHJAX_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

// fn(item, thread_index). thread_index in [0, threads_used) lets callers keep per-thread buffers.
template <typename Fn>
inline int parallel_for(int64_t n, Fn&& fn, int max_threads = 0, int64_t min_per_thread = 1) {
  if (n <= 0) return 0;
  int threads = max_threads > 0 ? max_threads : num_threads();
  threads = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_thread))));
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return 1;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&](int t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i, t);
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (auto& th : pool) th.join();
  return threads;
}

// Maximum number of threads parallel_for may use (to size per-thread buffers).
inline int max_threads_for(int64_t n, int max_threads = 0, int64_t min_per_thread = 1) {
  if (n <= 0) return 1;
  int threads = max_threads > 0 ? max_threads : num_threads();
  return static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_thread))));
}

}  // namespace dhjax

// Every kernel library exports its ABI version; dhjax/ops/_ffi.py refuses a library whose
// version differs from KERNEL_ABI there (a stale build). Use DHJAX_EXPORT_ABI() once per library.
#define DHJAX_KERNEL_ABI 1
#define DHJAX_EXPORT_ABI() \
  extern "C" __attribute__((visibility("default"))) int dhjax_kernel_abi() { return DHJAX_KERNEL_ABI; }

// parallel_for on XLA's intra-op thread pool (ffi::ThreadPool), shared by the CPU backend's FFI
// libraries (native/conv_cpu.cc, onednn/conv_onednn.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace fr {

// Runs body(item) for item in [0, n) on the calling thread and up to pool.num_threads() - 1
// pool tasks, items claimed one at a time. Returns once every item is done; a task that starts
// late finds no item left and touches only the shared state it co-owns.
inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> body) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n));
  if (threads == 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n;
    std::function<void(int64_t)> body;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->body = std::move(body);
  auto work = [](State& s) {
    for (int64_t i; (i = s.next.fetch_add(1, std::memory_order_relaxed)) < s.n;) {
      s.body(i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([state, work] { work(*state); });
  work(*state);
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace fr

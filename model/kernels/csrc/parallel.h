// Shared by the xlrt CPU kernels (int8_matmul.cc, paged_attention.cc, f32_nk.cc, f32_gemv.cc,
// f32_gemm.cc): work sharing over XLA's intra-op thread pool, and the float32 matmuls' FFI
// signature.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace xlrt {

// Runs work(0 .. items-1) on the calling thread and up to `threads - 1` pool tasks.
inline void parallel_for(ffi::ThreadPool& pool, int64_t items, const std::function<void(int64_t)>& work) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), items);
  if (threads <= 1) {
    for (int64_t i = 0; i < items; ++i) work(i);
    return;
  }
  auto shared = std::make_shared<Shared>();
  const std::function<void(int64_t)>* fn = &work;
  auto run = [shared, fn, items]() {
    for (int64_t i; (i = shared->next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      (*fn)(i);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([run]() { run(); });
  run();
  // Only tiles that were taken are outstanding: each is running on some thread right now.
  while (shared->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

// The float32 matmuls' FFI signature: (thread pool, x, w) -> y, all float32.
inline auto F32MatmulBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace xlrt

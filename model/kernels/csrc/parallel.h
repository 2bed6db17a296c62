// Shared by the xlrt CPU kernels (int8_matmul.cc, paged_attention.cc, f32_nk.cc, f32_gemv.cc,
// f32_gemm.cc): work sharing over XLA's intra-op thread pool, and the float32 matmuls' FFI
// signature.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
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

// The float32 matmuls' shapes, x [M, K] and w [K, N] (or [N, K] with nk) into y [M, N]: sets
// M, K and N, or names the problem (`name`: the FFI target).
template <typename Dims>
ffi::Error check_f32_matmul(const std::string& name, Dims xd, Dims wd, Dims yd, bool nk,
                            int64_t* M, int64_t* K, int64_t* N) {
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2) {
    return ffi::Error::InvalidArgument(name + ": x, w and y must be 2-D");
  }
  *M = xd[0];
  *K = xd[1];
  *N = nk ? wd[0] : wd[1];
  if ((nk ? wd[1] : wd[0]) != *K || yd[0] != *M || yd[1] != *N) {
    return ffi::Error::InvalidArgument(name + (nk ? ": expected x [M, K], w [N, K], y [M, N]"
                                                  : ": expected x [M, K], w [K, N], y [M, N]"));
  }
  return ffi::Error::Success();
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



// xlrt CPU kernel: y[M, N] (int32) = x[M, K] (int8) @ w (int8), exact integer accumulation.
//
// The w8a8 decode matmul (model.layers.matmul_2d) for few rows. XLA:CPU runs this dot through a
// generic GEMM that streams int8 weights at ~6 GB/s for one or two rows; this kernel reads every
// weight byte once for all rows and multiplies with AVX-512 VNNI (vpdpbusd) where the compiler
// targets it, else with plain loops the compiler vectorizes. The result is bit-identical to
// XLA's int8 x int8 -> int32 dot (integer sums are exact), so either path may run.
//
// w is [K, N] ("kn", a layer weight) or, with transpose_w, [N, K] ("nk", the tied embedding used
// as the LM head). Work is split over output columns across XLA's intra-op thread pool: tasks
// and the calling thread take tiles from a shared counter, and the caller waits only for tiles
// already taken, so a task that starts late finds nothing to do and the call never waits on a
// busy pool.
//
// Built at first use by model/kernels/cpu_ffi.py (c++ -O3 -march=native) and registered as the
// XLA FFI target "xlrt_int8_matmul".

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && \
    !defined(XLRT_FORCE_GENERIC)  // the tests build the portable path this way too
#include <immintrin.h>
#define XLRT_VNNI 1
#else
#define XLRT_VNNI 0
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kKnTile = 64;   // output columns per work item, [K, N] weights
constexpr int64_t kKnRange = 256;  // columns per work item, [K, N] weights and few rows
constexpr int64_t kRangeMaxRows = 2;
constexpr int64_t kPrefetchRows = 16;  // [K, N] ranges: weight rows fetched ahead of use
constexpr int64_t kNkTile = 16;   // output columns (weight rows) per work item, [N, K] weights

// ---------------------------------------------------------------------------------------------
// Portable paths (any CPU): int32 loops that the compiler vectorizes.

void kn_tile_generic(const int8_t* x, const int8_t* w, int32_t* y, int64_t M, int64_t K,
                     int64_t N, int64_t n0, int64_t n1) {
  int32_t acc[kKnTile];
  const int64_t width = n1 - n0;
  for (int64_t m = 0; m < M; ++m) {
    std::fill(acc, acc + width, 0);
    const int8_t* xm = x + m * K;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t xv = xm[k];
      const int8_t* wr = w + k * N + n0;
      for (int64_t j = 0; j < width; ++j) acc[j] += xv * static_cast<int32_t>(wr[j]);
    }
    std::memcpy(y + m * N + n0, acc, width * sizeof(int32_t));
  }
}

void nk_tile_generic(const int8_t* x, const int8_t* w, int32_t* y, int64_t M, int64_t K,
                     int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xm = x + m * K;
      int32_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<int32_t>(xm[k]) * wr[k];
      y[m * N + n] = acc;
    }
  }
}

#if XLRT_VNNI
// vpdpbusd multiplies unsigned by signed bytes, so x is shifted to x + 128 (unsigned, xu) and
// 128 * sum(w) is subtracted: (x + 128) . w - 128 . w = x . w, exactly, in int32.

// [K, N]: 64 columns per tile, four k rows per step. The four rows are interleaved into dwords
// (one column's four bytes each) with byte and word unpacks, which work within 128-bit lanes:
// dword 4L + i of q[j] holds column 16L + 4j + i. Up to 4 x rows share each weight load.
void kn_tile_vnni(const uint8_t* xu, int64_t kp, const int8_t* w, int32_t* y, int64_t M,
                  int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t width = n1 - n0;
  const __mmask64 mask = width >= 64 ? ~0ULL : ((1ULL << width) - 1);
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i zero = _mm512_setzero_si512();
  alignas(64) int32_t buf[4][16];
  for (int64_t mb = 0; mb < M; mb += 4) {
    const int64_t mc = std::min<int64_t>(4, M - mb);
    __m512i acc[4][4], corr[4];
    for (int j = 0; j < 4; ++j) {
      corr[j] = zero;
      for (int i = 0; i < 4; ++i) acc[i][j] = zero;
    }
    for (int64_t k = 0; k < K; k += 4) {
      const int8_t* base = w + k * N + n0;
      const __m512i r0 = _mm512_maskz_loadu_epi8(mask, base);
      const __m512i r1 = k + 1 < K ? _mm512_maskz_loadu_epi8(mask, base + N) : zero;
      const __m512i r2 = k + 2 < K ? _mm512_maskz_loadu_epi8(mask, base + 2 * N) : zero;
      const __m512i r3 = k + 3 < K ? _mm512_maskz_loadu_epi8(mask, base + 3 * N) : zero;
      const __m512i t0 = _mm512_unpacklo_epi8(r0, r1), t1 = _mm512_unpackhi_epi8(r0, r1);
      const __m512i t2 = _mm512_unpacklo_epi8(r2, r3), t3 = _mm512_unpackhi_epi8(r2, r3);
      const __m512i q[4] = {_mm512_unpacklo_epi16(t0, t2), _mm512_unpackhi_epi16(t0, t2),
                            _mm512_unpacklo_epi16(t1, t3), _mm512_unpackhi_epi16(t1, t3)};
      for (int j = 0; j < 4; ++j) corr[j] = _mm512_dpbusd_epi32(corr[j], c128, q[j]);
      for (int64_t i = 0; i < mc; ++i) {
        int32_t xs;
        std::memcpy(&xs, xu + (mb + i) * kp + k, 4);
        const __m512i xb = _mm512_set1_epi32(xs);
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xb, q[j]);
      }
    }
    for (int64_t i = 0; i < mc; ++i) {
      for (int j = 0; j < 4; ++j) _mm512_store_si512(buf[j], _mm512_sub_epi32(acc[i][j], corr[j]));
      int32_t* yr = y + (mb + i) * N + n0;
      if (width == 64) {
        for (int L = 0; L < 4; ++L)
          for (int j = 0; j < 4; ++j) std::memcpy(yr + 16 * L + 4 * j, &buf[j][4 * L], 16);
      } else {
        for (int L = 0; L < 4; ++L)
          for (int j = 0; j < 4; ++j)
            for (int e = 0; e < 4; ++e) {
              const int64_t col = 16 * L + 4 * j + e;
              if (col < width) yr[col] = buf[j][4 * L + e];
            }
      }
    }
  }
}

// [K, N], few rows: the same arithmetic over a range of kKnRange columns at a time, k outermost,
// with the accumulators in L1 instead of registers. Each step reads kKnRange contiguous bytes
// of four weight rows, where a single 64-column tile reads 64 bytes per row and leaves the
// hardware prefetcher a stride of N bytes to follow.
void kn_range_vnni(const uint8_t* xu, int64_t kp, const int8_t* w, int32_t* y, int64_t M,
                   int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t tiles = (n1 - n0 + 63) / 64;
  const int64_t per_tile = 4 * (M + 1);  // M rows of 4 accumulators, then 4 corrections
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i zero = _mm512_setzero_si512();
  std::vector<__m512i> acc(tiles * per_tile, zero);
  std::vector<__m512i> xb(M);
  const int64_t last = n1 - n0 - 64 * (tiles - 1);
  const __mmask64 last_mask = last >= 64 ? ~0ULL : ((1ULL << last) - 1);
  for (int64_t k = 0; k < K; k += 4) {
    for (int64_t i = 0; i < M; ++i) {
      int32_t xs;
      std::memcpy(&xs, xu + i * kp + k, 4);
      xb[i] = _mm512_set1_epi32(xs);
    }
    const int8_t* base = w + k * N + n0;
    for (int64_t t = 0; t < tiles; ++t, base += 64) {
      const __mmask64 mask = t + 1 < tiles ? ~0ULL : last_mask;
      if (k + kPrefetchRows + 3 < K) {
        const char* pf = reinterpret_cast<const char*>(base + kPrefetchRows * N);
        _mm_prefetch(pf, _MM_HINT_T0); _mm_prefetch(pf + N, _MM_HINT_T0);
        _mm_prefetch(pf + 2 * N, _MM_HINT_T0); _mm_prefetch(pf + 3 * N, _MM_HINT_T0);
      }
      const __m512i r0 = _mm512_maskz_loadu_epi8(mask, base);
      const __m512i r1 = k + 1 < K ? _mm512_maskz_loadu_epi8(mask, base + N) : zero;
      const __m512i r2 = k + 2 < K ? _mm512_maskz_loadu_epi8(mask, base + 2 * N) : zero;
      const __m512i r3 = k + 3 < K ? _mm512_maskz_loadu_epi8(mask, base + 3 * N) : zero;
      const __m512i t0 = _mm512_unpacklo_epi8(r0, r1), t1 = _mm512_unpackhi_epi8(r0, r1);
      const __m512i t2 = _mm512_unpacklo_epi8(r2, r3), t3 = _mm512_unpackhi_epi8(r2, r3);
      const __m512i q[4] = {_mm512_unpacklo_epi16(t0, t2), _mm512_unpackhi_epi16(t0, t2),
                            _mm512_unpacklo_epi16(t1, t3), _mm512_unpackhi_epi16(t1, t3)};
      __m512i* a = acc.data() + t * per_tile;
      for (int j = 0; j < 4; ++j) a[4 * M + j] = _mm512_dpbusd_epi32(a[4 * M + j], c128, q[j]);
      for (int64_t i = 0; i < M; ++i)
        for (int j = 0; j < 4; ++j) a[4 * i + j] = _mm512_dpbusd_epi32(a[4 * i + j], xb[i], q[j]);
    }
  }
  alignas(64) int32_t buf[4][16];
  for (int64_t t = 0; t < tiles; ++t) {
    const __m512i* a = acc.data() + t * per_tile;
    const int64_t width = std::min<int64_t>(64, n1 - n0 - 64 * t);
    for (int64_t i = 0; i < M; ++i) {
      for (int j = 0; j < 4; ++j) _mm512_store_si512(buf[j], _mm512_sub_epi32(a[4 * i + j], a[4 * M + j]));
      int32_t* yr = y + i * N + n0 + 64 * t;
      for (int L = 0; L < 4; ++L)
        for (int j = 0; j < 4; ++j)
          for (int e = 0; e < 4; ++e) {
            const int64_t col = 16 * L + 4 * j + e;
            if (col < width) yr[col] = buf[j][4 * L + e];
          }
    }
  }
}

// [N, K]: each output is a dot of two contiguous rows; 4 weight rows x up to 4 x rows per pass,
// 64 bytes of k per step (the tail masked).
void nk_tile_vnni(const uint8_t* xu, int64_t kp, const int8_t* w, int32_t* y, int64_t M,
                  int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t nc = std::min<int64_t>(4, n1 - n);
    for (int64_t mb = 0; mb < M; mb += 4) {
      const int64_t mc = std::min<int64_t>(4, M - mb);
      __m512i acc[4][4], corr[4];
      for (int j = 0; j < 4; ++j) {
        corr[j] = zero;
        for (int i = 0; i < 4; ++i) acc[i][j] = zero;
      }
      for (int64_t k = 0; k < K; k += 64) {
        const __mmask64 mask = K - k >= 64 ? ~0ULL : ((1ULL << (K - k)) - 1);
        __m512i wv[4];
        for (int64_t j = 0; j < nc; ++j) {
          wv[j] = _mm512_maskz_loadu_epi8(mask, w + (n + j) * K + k);
          corr[j] = _mm512_dpbusd_epi32(corr[j], c128, wv[j]);
        }
        for (int64_t i = 0; i < mc; ++i) {
          const __m512i xv = _mm512_maskz_loadu_epi8(mask, xu + (mb + i) * kp + k);
          for (int64_t j = 0; j < nc; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv, wv[j]);
        }
      }
      for (int64_t j = 0; j < nc; ++j) {
        const int32_t c = _mm512_reduce_add_epi32(corr[j]);
        for (int64_t i = 0; i < mc; ++i)
          y[(mb + i) * N + n + j] = _mm512_reduce_add_epi32(acc[i][j]) - c;
      }
    }
  }
}
#endif  // XLRT_VNNI

// Runs work(0 .. items-1) on the calling thread and up to `threads - 1` pool tasks.
void parallel_for(ffi::ThreadPool& pool, int64_t items, const std::function<void(int64_t)>& work) {
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

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                          ffi::ResultBuffer<ffi::S32> y, int64_t transpose_w) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) {
    return ffi::Error::InvalidArgument("xlrt_int8_matmul: x and w must be 2-D");
  }
  const int64_t M = xd[0], K = xd[1];
  const int64_t N = transpose_w ? wd[0] : wd[1];
  if ((transpose_w ? wd[1] : wd[0]) != K) {
    return ffi::Error::InvalidArgument("xlrt_int8_matmul: contracting dimensions differ");
  }
  const auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != M || yd[1] != N) {
    return ffi::Error::InvalidArgument("xlrt_int8_matmul: output must be [M, N]");
  }
  const int8_t* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  int32_t* yp = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(yp, 0, M * N * sizeof(int32_t));
    return ffi::Error::Success();
  }
  const bool ranged = !transpose_w && M <= kRangeMaxRows && XLRT_VNNI;
  const int64_t tile = transpose_w ? kNkTile : ranged ? kKnRange : kKnTile;
  const int64_t items = (N + tile - 1) / tile;
#if XLRT_VNNI
  const int64_t kp = (K + 3) / 4 * 4;
  std::vector<uint8_t> xu(M * kp, 128);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xu[m * kp + k] = static_cast<uint8_t>(xp[m * K + k] + 128);
  const uint8_t* xup = xu.data();
  parallel_for(pool, items, [&](int64_t i) {
    const int64_t n0 = i * tile, n1 = std::min(N, n0 + tile);
    if (transpose_w) nk_tile_vnni(xup, kp, wp, yp, M, K, N, n0, n1);
    else if (ranged) kn_range_vnni(xup, kp, wp, yp, M, K, N, n0, n1);
    else kn_tile_vnni(xup, kp, wp, yp, M, K, N, n0, n1);
  });
#else
  parallel_for(pool, items, [&](int64_t i) {
    const int64_t n0 = i * tile, n1 = std::min(N, n0 + tile);
    if (transpose_w) nk_tile_generic(xp, wp, yp, M, K, N, n0, n1);
    else kn_tile_generic(xp, wp, yp, M, K, N, n0, n1);
  });
#endif
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlrtInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("transpose_w"));

extern "C" int xlrt_int8_matmul_vnni() { return XLRT_VNNI; }

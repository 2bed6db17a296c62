

// xlrt CPU kernels for int8 weights (decode; w8a8 prefill with VNNI), called from XLA programs
// through the FFI.
//
// XlrtInt8Matmul (w8a8): y[M, N] (int32) = x[M, K] (int8) @ w (int8), exact integer sums.
// XLA:CPU runs this dot through a generic GEMM that streams int8 weights at ~6 GB/s for one or
// two rows; this kernel reads every weight byte once for all rows and multiplies with AVX-512
// VNNI (vpdpbusd) where the compiler targets it, else with plain loops the compiler vectorizes.
// The result is bit-identical to XLA's int8 x int8 -> int32 dot, so either path may run.
//
// XlrtF32Int8Matmul (weight-only int8): y (f32) = x (f32) @ float(w), widening each weight
// byte in registers. XLA converts the whole weight to float in memory first (weight-only int8
// decode was ~9x slower than float32). Float sums: equal to XLA's up to rounding.
//
// w is [K, N] (a layer weight) or, with transpose_w, [N, K] (the tied embedding used as the LM
// head). Work is split over output columns across XLA's intra-op thread pool: tasks and the
// calling thread take tiles from a shared counter, and the caller waits only for tiles already
// taken, so a task that starts late finds nothing to do and the call never waits on a busy
// pool.
//
// Built at first use by model/kernels/cpu_ffi.py (c++ -O3 -march=native) and registered as the
// XLA FFI targets "xlrt_int8_matmul" and "xlrt_f32_int8_matmul".

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <string>
#include <vector>

// The tests also build the portable paths (XLRT_FORCE_GENERIC) and, on AVX-512 CPUs, the AVX2
// ones (XLRT_FORCE_AVX2).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && \
    !defined(XLRT_FORCE_GENERIC) && !defined(XLRT_FORCE_AVX2)
#include <immintrin.h>
#define XLRT_VNNI 1
#else
#define XLRT_VNNI 0
#endif

#include "layer_parts.h"

#if defined(__AVX2__) && defined(__FMA__) && !defined(XLRT_FORCE_GENERIC) && \
    (!defined(__AVX512F__) || defined(XLRT_FORCE_AVX2))
#include "gemm_avx2.h"
#define XLRT_WO_AVX2 1
#else
#define XLRT_WO_AVX2 0
#endif

// Vector quantization of float rows (xlrt_w8a8_matmul) on every AVX2 build, AVX-512 ones too.
#if defined(__AVX2__) && !defined(XLRT_FORCE_GENERIC)
#include <immintrin.h>
#define XLRT_QUANT_AVX2 1
#else
#define XLRT_QUANT_AVX2 0
#endif

namespace {

using xlrt::parallel_for;

constexpr int64_t kKnTile = 64;   // output columns per work item, [K, N] weights
constexpr int64_t kKnRange = 256;  // columns per work item, [K, N] weights and few rows
constexpr int64_t kRangeMaxRows = 2;
constexpr int64_t kPrefetchRows = 16;  // [K, N] ranges: weight rows fetched ahead of use
constexpr int64_t kNkTile = 64;   // output columns (weight rows) per work item, [N, K] weights

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

// Four weight rows (k .. k+3, the ones past `rows_left` read as zero) of 64 columns, interleaved
// into dwords with byte and word unpacks, which work within 128-bit lanes: dword 4L + i of q[j]
// holds column 16L + 4j + i's four bytes.
inline void interleave4(const int8_t* base, int64_t N, __mmask64 mask, int64_t rows_left,
                        __m512i q[4]) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i r0 = _mm512_maskz_loadu_epi8(mask, base);
  const __m512i r1 = rows_left > 1 ? _mm512_maskz_loadu_epi8(mask, base + N) : zero;
  const __m512i r2 = rows_left > 2 ? _mm512_maskz_loadu_epi8(mask, base + 2 * N) : zero;
  const __m512i r3 = rows_left > 3 ? _mm512_maskz_loadu_epi8(mask, base + 3 * N) : zero;
  const __m512i t0 = _mm512_unpacklo_epi8(r0, r1), t1 = _mm512_unpackhi_epi8(r0, r1);
  const __m512i t2 = _mm512_unpacklo_epi8(r2, r3), t3 = _mm512_unpackhi_epi8(r2, r3);
  q[0] = _mm512_unpacklo_epi16(t0, t2);
  q[1] = _mm512_unpackhi_epi16(t0, t2);
  q[2] = _mm512_unpacklo_epi16(t1, t3);
  q[3] = _mm512_unpackhi_epi16(t1, t3);
}

// interleave4 of the four rows at base, after prefetching the same columns kPrefetchRows rows
// ahead (where there are that many left).
inline void fetch_quad(const int8_t* base, int64_t N, __mmask64 mask, int64_t rows_left,
                       __m512i q[4]) {
  if (rows_left > kPrefetchRows + 3) {
    const char* pf = reinterpret_cast<const char*>(base + kPrefetchRows * N);
    _mm_prefetch(pf, _MM_HINT_T0); _mm_prefetch(pf + N, _MM_HINT_T0);
    _mm_prefetch(pf + 2 * N, _MM_HINT_T0); _mm_prefetch(pf + 3 * N, _MM_HINT_T0);
  }
  interleave4(base, N, mask, rows_left, q);
}

// acc - corr for one row of a 64-column tile, written back in column order (`width` columns).
// The accumulators come by value, so that a caller's stay in registers through its loop.
inline void store_tile(__m512i a0, __m512i a1, __m512i a2, __m512i a3, const __m512i corr[4],
                       int32_t* yr, int64_t width) {
  alignas(64) int32_t buf[4][16];
  _mm512_store_si512(buf[0], _mm512_sub_epi32(a0, corr[0]));
  _mm512_store_si512(buf[1], _mm512_sub_epi32(a1, corr[1]));
  _mm512_store_si512(buf[2], _mm512_sub_epi32(a2, corr[2]));
  _mm512_store_si512(buf[3], _mm512_sub_epi32(a3, corr[3]));
  for (int L = 0; L < 4; ++L)
    for (int j = 0; j < 4; ++j) {
      const int64_t col = 16 * L + 4 * j;
      if (col + 4 <= width) {
        std::memcpy(yr + col, &buf[j][4 * L], 16);
      } else {
        for (int e = 0; e < 4 && col + e < width; ++e) yr[col + e] = buf[j][4 * L + e];
      }
    }
}

inline void store_tile(const __m512i acc[4], const __m512i corr[4], int32_t* yr, int64_t width) {
  store_tile(acc[0], acc[1], acc[2], acc[3], corr, yr, width);
}

// [K, N], three or more rows: a 64-column tile of the weight is interleaved once per panel of
// rows (interleave4) into a buffer of this thread, with its corrections, and every block of
// kPackRows rows then reads it back: 4 weight loads, kPackRows broadcasts and 4 * kPackRows
// vpdpbusd per four k, the accumulators in registers. Interleaving per block of rows instead
// (4 rows per pass) spent as many shuffles as multiplies: 25% of vpdpbusd's peak at 32 rows.
constexpr int64_t kPackRows = 6;
constexpr int64_t kPanelRows = 8 * kPackRows;  // rows per work item
static_assert(kKnTile == 64 && kNkTile == 64, "a packed tile is 64 columns (4 vectors)");

// acc + u8(a) . s8(b) per dword, accumulated in place. GCC 12 compiles _mm512_dpbusd_epi32 in a
// register-blocked loop with a copy of the accumulator and a stack store per multiply (25% of
// vpdpbusd's peak rate); this form keeps them in registers.
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// acc - corr for one row of a 64-column tile whose dword i of vector j is column 16 j + i.
inline void store_plain(__m512i a0, __m512i a1, __m512i a2, __m512i a3, const __m512i corr[4],
                        int32_t* yr, int64_t width) {
  const __m512i a[4] = {a0, a1, a2, a3};
  for (int j = 0; j < 4 && 16 * j < width; ++j) {
    const int64_t left = width - 16 * j;
    const __mmask16 mask = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1u);
    _mm512_mask_storeu_epi32(yr + 16 * j, mask, _mm512_sub_epi32(a[j], corr[j]));
  }
}

// One block of R <= 6 rows, the 4 * R accumulators named variables. Interleaved: the column
// order of interleave4 (store_tile), else that of transpose16 (store_plain).
template <int R, bool Interleaved>
void packed_rows(const uint8_t* xu, int64_t kp, const __m512i* pk, const __m512i corr[4],
                 int32_t* y, int64_t N, int64_t width) {
  static_assert(R >= 1 && R <= kPackRows, "rows per block");
#define XLRT_ACC(i)                                                                       \
  __m512i a##i##0 = _mm512_setzero_si512(), a##i##1 = _mm512_setzero_si512(),               \
          a##i##2 = _mm512_setzero_si512(), a##i##3 = _mm512_setzero_si512();
  XLRT_ACC(0) XLRT_ACC(1) XLRT_ACC(2) XLRT_ACC(3) XLRT_ACC(4) XLRT_ACC(5)
#undef XLRT_ACC
  for (int64_t k = 0; k < kp; k += 4, pk += 4) {
    const __m512i q0 = _mm512_load_si512(pk), q1 = _mm512_load_si512(pk + 1);
    const __m512i q2 = _mm512_load_si512(pk + 2), q3 = _mm512_load_si512(pk + 3);
#define XLRT_ROW(i)                                                                       \
    if constexpr (R > i) {                                                                  \
      int32_t xs;                                                                           \
      std::memcpy(&xs, xu + i * kp + k, 4);                                                 \
      const __m512i xb = _mm512_set1_epi32(xs);                                             \
      a##i##0 = dpbusd(a##i##0, xb, q0);                                       \
      a##i##1 = dpbusd(a##i##1, xb, q1);                                       \
      a##i##2 = dpbusd(a##i##2, xb, q2);                                       \
      a##i##3 = dpbusd(a##i##3, xb, q3);                                       \
    }
    XLRT_ROW(0) XLRT_ROW(1) XLRT_ROW(2) XLRT_ROW(3) XLRT_ROW(4) XLRT_ROW(5)
#undef XLRT_ROW
  }
#define XLRT_STORE(i)                                                                     \
  if constexpr (R > i) {                                                                  \
    if constexpr (Interleaved)                                                            \
      store_tile(a##i##0, a##i##1, a##i##2, a##i##3, corr, y + i * N, width);             \
    else                                                                                  \
      store_plain(a##i##0, a##i##1, a##i##2, a##i##3, corr, y + i * N, width);            \
  }
  XLRT_STORE(0) XLRT_STORE(1) XLRT_STORE(2) XLRT_STORE(3) XLRT_STORE(4) XLRT_STORE(5)
#undef XLRT_STORE
}

// Every block of kPackRows rows of xu against the packed tile pk.
template <bool Interleaved>
void packed_all_rows(const uint8_t* xu, int64_t kp, const __m512i* pk, const __m512i corr[4],
                     int32_t* y, int64_t M, int64_t N, int64_t n0, int64_t width) {
  for (int64_t mb = 0; mb < M; mb += kPackRows) {
    const uint8_t* xr = xu + mb * kp;
    int32_t* yr = y + mb * N + n0;
    switch (std::min<int64_t>(kPackRows, M - mb)) {
      case 1: packed_rows<1, Interleaved>(xr, kp, pk, corr, yr, N, width); break;
      case 2: packed_rows<2, Interleaved>(xr, kp, pk, corr, yr, N, width); break;
      case 3: packed_rows<3, Interleaved>(xr, kp, pk, corr, yr, N, width); break;
      case 4: packed_rows<4, Interleaved>(xr, kp, pk, corr, yr, N, width); break;
      case 5: packed_rows<5, Interleaved>(xr, kp, pk, corr, yr, N, width); break;
      default: packed_rows<6, Interleaved>(xr, kp, pk, corr, yr, N, width); break;
    }
  }
}

// This thread's buffer for one packed tile: kp / 4 groups of 4 vectors, 64-byte aligned
// (std::vector<__m512i> does not align them).
inline __m512i* pack_buffer(int64_t kp) {
  thread_local std::vector<uint8_t> storage;
  const size_t bytes = static_cast<size_t>(kp) * 64 + 64;
  if (storage.size() < bytes) storage.resize(bytes);
  return reinterpret_cast<__m512i*>(
      (reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~static_cast<uintptr_t>(63));
}

void kn_packed_vnni(const uint8_t* xu, int64_t kp, const int8_t* w, int32_t* y, int64_t M,
                    int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t width = n1 - n0;
  const __mmask64 mask = width >= 64 ? ~0ULL : ((1ULL << width) - 1);
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i* pk = pack_buffer(kp);
  __m512i corr[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                     _mm512_setzero_si512()};
  for (int64_t k = 0; k < K; k += 4) {
    const int8_t* base = w + k * N + n0;
    __m512i q[4];
    fetch_quad(base, N, mask, K - k, q);
    for (int j = 0; j < 4; ++j) {
      corr[j] = _mm512_dpbusd_epi32(corr[j], c128, q[j]);
      _mm512_store_si512(pk + k + j, q[j]);
    }
  }
  packed_all_rows<true>(xu, kp, pk, corr, y, M, N, n0, width);
}

// 16 rows of 16 dwords -> 16 vectors, dword i of out[t] = dword t of row i (unpacks within
// 128-bit lanes, then a 4 x 4 transpose of the lanes).
inline void transpose16(const __m512i r[16], __m512i out[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // lane L of u[4g + c]: dword 4L + c of rows 4g .. 4g + 3
    u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i x0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i x1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    out[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    out[4 + c] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    out[8 + c] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    out[12 + c] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
}

// [N, K], three or more rows: the tile's 64 weight rows (output columns) are transposed into
// the packed form of kn_packed_vnni, 16 rows by 64 bytes of k at a time (transpose16), so the
// same register blocks run over it; dword i of vector j is then column 16 j + i.
void nk_packed_vnni(const uint8_t* xu, int64_t kp, const int8_t* w, int32_t* y, int64_t M,
                    int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t width = n1 - n0;
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i zero = _mm512_setzero_si512();
  __m512i* pk = pack_buffer(kp);
  __m512i corr[4] = {zero, zero, zero, zero};
  const int64_t quads = kp / 4;
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 kmask = K - k >= 64 ? ~0ULL : ((1ULL << (K - k)) - 1);
    const int64_t q0 = k / 4, nq = std::min<int64_t>(16, quads - q0);
    for (int j = 0; j < 4; ++j) {
      __m512i rows[16], out[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t n = n0 + 16 * j + i;
        rows[i] = n < n1 ? _mm512_maskz_loadu_epi8(kmask, w + n * K + k) : zero;
      }
      transpose16(rows, out);
      for (int64_t t = 0; t < nq; ++t) {
        corr[j] = _mm512_dpbusd_epi32(corr[j], c128, out[t]);
        _mm512_store_si512(pk + 4 * (q0 + t) + j, out[t]);
      }
    }
  }
  packed_all_rows<false>(xu, kp, pk, corr, y, M, N, n0, width);
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
  // Stack arrays (a std::vector of __m512i drops its 64-byte alignment): M <= kRangeMaxRows.
  __m512i acc[kKnRange / 64 * 4 * (kRangeMaxRows + 1)];
  __m512i xb[kRangeMaxRows];
  for (int64_t i = 0; i < tiles * per_tile; ++i) acc[i] = zero;
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
      __m512i q[4];
      fetch_quad(base, N, mask, K - k, q);
      __m512i* a = acc + t * per_tile;
      for (int j = 0; j < 4; ++j) a[4 * M + j] = _mm512_dpbusd_epi32(a[4 * M + j], c128, q[j]);
      for (int64_t i = 0; i < M; ++i)
        for (int j = 0; j < 4; ++j) a[4 * i + j] = _mm512_dpbusd_epi32(a[4 * i + j], xb[i], q[j]);
    }
  }
  for (int64_t t = 0; t < tiles; ++t) {
    const __m512i* a = acc + t * per_tile;
    const int64_t width = std::min<int64_t>(64, n1 - n0 - 64 * t);
    for (int64_t i = 0; i < M; ++i)
      store_tile(a + 4 * i, a + 4 * M, y + i * N + n0 + 64 * t, width);
  }
}

// [N, K]: each output is a dot of two contiguous rows; 4 weight rows x up to 4 x rows per pass,
// 64 bytes of k per step (the tail masked). The same bytes of the rows 8 ahead are prefetched
// (without, the LM head read about 5 GB/s on an AMD EPYC).
void nk_tile_vnni(const uint8_t* xu, int64_t kp, const int8_t* w, int32_t* y, int64_t M,
                  int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t nc = std::min<int64_t>(4, n1 - n);
    if (n + 12 <= N) {
      const char* ahead = reinterpret_cast<const char*>(w + (n + 8) * K);
      for (int64_t b = 0; b < 4 * K; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    for (int64_t mb = 0; mb < M; mb += 4) {
      const int64_t mc = std::min<int64_t>(4, M - mb);
      __m512i acc[4][4] = {}, corr[4] = {};  // zeros
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

#if XLRT_WO_AVX2
// [N, K], AVX2 (no VNNI): each output is a dot of two contiguous rows. x is widened to int16 once
// per call (xw, rows kp apart, zero-padded to a multiple of 32); each 16 weight bytes are widened
// once for the MC x rows of a block and multiplied with vpmaddwd, which sums pairs of int16
// products into int32: exact for every int8 value, -128 included, as XLA's dot is. Two
// accumulators per row, in registers (MC is a template argument); 2 KiB ahead of the weight
// stream is prefetched.
template <int MC>
void nk_rows_avx2(const int16_t* xw, int64_t kp, const int8_t* w, int32_t* y, int64_t K,
                  int64_t N, int64_t n0, int64_t n1) {
  const int64_t kv = K / 32 * 32;
  const int8_t* end = w + N * K;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    __m256i acc[MC][2];
#pragma GCC unroll 4
    for (int m = 0; m < MC; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int64_t k = 0; k < kv; k += 32) {
      if (row + k + 2048 < end) {
        _mm_prefetch(reinterpret_cast<const char*>(row + k + 2048), _MM_HINT_T0);
      }
      const __m256i w0 = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
      const __m256i w1 = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16)));
#pragma GCC unroll 4
      for (int m = 0; m < MC; ++m) {
        const int16_t* xm = xw + m * kp + k;
        acc[m][0] = _mm256_add_epi32(
            acc[m][0], _mm256_madd_epi16(
                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm)), w0));
        acc[m][1] = _mm256_add_epi32(
            acc[m][1], _mm256_madd_epi16(
                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + 16)), w1));
      }
    }
#pragma GCC unroll 4
    for (int m = 0; m < MC; ++m) {
      const __m256i a = _mm256_add_epi32(acc[m][0], acc[m][1]);
      const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
      const __m128i s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
      int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
      for (int64_t k = kv; k < K; ++k) sum += static_cast<int32_t>(xw[m * kp + k]) * row[k];
      y[m * N + n] = sum;
    }
  }
}

void nk_tile_avx2(const int16_t* xw, int64_t kp, const int8_t* w, int32_t* y, int64_t M,
                  int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; m += 4) {
    const int16_t* xm = xw + m * kp;
    int32_t* ym = y + m * N;
    switch (std::min<int64_t>(4, M - m)) {
      case 1: nk_rows_avx2<1>(xm, kp, w, ym, K, N, n0, n1); break;
      case 2: nk_rows_avx2<2>(xm, kp, w, ym, K, N, n0, n1); break;
      case 3: nk_rows_avx2<3>(xm, kp, w, ym, K, N, n0, n1); break;
      default: nk_rows_avx2<4>(xm, kp, w, ym, K, N, n0, n1); break;
    }
  }
}
#endif  // XLRT_WO_AVX2

// x [M, K], w [K, N] (or [N, K] with transpose_w), y [M, N]: sets M, K, N or names the problem.
template <typename Dims>
ffi::Error CheckDims(const std::string& name, Dims xd, Dims wd, Dims yd, int64_t transpose_w,
                     int64_t* M, int64_t* K, int64_t* N) {
  if (xd.size() != 2 || wd.size() != 2) {
    return ffi::Error::InvalidArgument(name + ": x and w must be 2-D");
  }
  *M = xd[0];
  *K = xd[1];
  *N = transpose_w ? wd[0] : wd[1];
  if ((transpose_w ? wd[1] : wd[0]) != *K) {
    return ffi::Error::InvalidArgument(name + ": contracting dimensions differ");
  }
  if (yd.size() != 2 || yd[0] != *M || yd[1] != *N) {
    return ffi::Error::InvalidArgument(name + ": output must be [M, N]");
  }
  return ffi::Error::Success();
}

// CheckDims, then the empty cases: *done is true when the call is finished (an error, no rows or
// columns, or K == 0, where y is all zeros).
template <typename X, typename Y>
ffi::Error CheckOrFinish(const std::string& name, X& x, ffi::Buffer<ffi::S8>& w, Y& y,
                         int64_t transpose_w, int64_t* M, int64_t* K, int64_t* N, bool* done) {
  *done = true;
  ffi::Error error = CheckDims(name, x.dimensions(), w.dimensions(), y->dimensions(),
                               transpose_w, M, K, N);
  if (error.failure() || *M == 0 || *N == 0) return error;
  if (*K == 0) {
    std::memset(y->typed_data(), 0, *M * *N * sizeof(*y->typed_data()));
    return error;
  }
  *done = false;
  return error;
}

// Rows per task when a call prepares its rows (the flip to x + 128 below, or the quantization
// of float rows) on the pool: only calls of many rows (prefill) share that work.
constexpr int64_t kPrepRows = 32;

// fn(m0, m1) over the rows [0, M) in blocks of kPrepRows, spread over the pool when there are
// several blocks.
template <typename Fn>
void for_row_blocks(ffi::ThreadPool& pool, int64_t M, const Fn& fn) {
  const int64_t blocks = (M + kPrepRows - 1) / kPrepRows;
  if (blocks <= 1) {
    fn(int64_t{0}, M);
    return;
  }
  parallel_for(pool, blocks, [&](int64_t i) {
    fn(i * kPrepRows, std::min(M, (i + 1) * kPrepRows));
  });
}

// Bytes per row of the packed paths' x operand: K rounded up to a multiple of 4.
inline int64_t padded_k(int64_t K) { return (K + 3) / 4 * 4; }

// A buffer of n bytes left uninitialized: every byte of a row operand is written by the rows'
// preparation (values, then pad_row), so zero-filling it first would be a second pass.
inline std::unique_ptr<uint8_t[]> row_buffer(int64_t n) {
  return std::unique_ptr<uint8_t[]>(new uint8_t[n]);
}

// Bytes K .. kp of a packed operand row: 128, which is x = 0.
inline void pad_row(uint8_t* row, int64_t K, int64_t kp) {
  for (int64_t k = K; k < kp; ++k) row[k] = 0x80;
}

// y[M, N] (int32) = x (int8 [M, K]) @ w, then epilogue(m0, m1, n0, n1) for each block of rows
// and columns, on the thread that computed it (the block still in cache). M, N, K > 0. x comes
// as xp, or on VNNI builds as xu: x + 128 as unsigned bytes (the sign bit flipped), rows
// padded_k(K) apart, the padding 128 (zero); with xu null the call makes xu from xp.
template <typename Epilogue>
void Int8Matmul(ffi::ThreadPool& pool, const int8_t* xp, const uint8_t* xu_ready, const int8_t* wp,
                int32_t* yp, int64_t M, int64_t K, int64_t N, bool transpose_w,
                const Epilogue& epilogue) {
  const bool ranged = !transpose_w && M <= kRangeMaxRows && XLRT_VNNI;
  const int64_t tile = transpose_w ? kNkTile : ranged ? kKnRange : kKnTile;
  const int64_t tiles = (N + tile - 1) / tile;
#if XLRT_VNNI
  // More rows than kRangeMaxRows, either layout: work items are panels of kPanelRows rows by
  // one packed tile of columns, so a prefill's rows stay in cache while they pass over it.
  const bool packed = M > kRangeMaxRows;
  const int64_t panels = packed ? (M + kPanelRows - 1) / kPanelRows : 1;
  const int64_t kp = padded_k(K);
  std::unique_ptr<uint8_t[]> xu_own;
  if (!xu_ready) {
    xu_own = row_buffer(M * kp);
    for_row_blocks(pool, M, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const uint8_t* __restrict src = reinterpret_cast<const uint8_t*>(xp + m * K);
        uint8_t* __restrict dst = xu_own.get() + m * kp;
        for (int64_t k = 0; k < K; ++k) dst[k] = src[k] ^ 0x80;
        pad_row(dst, K, kp);
      }
    });
  }
  const uint8_t* xup = xu_ready ? xu_ready : xu_own.get();
  parallel_for(pool, panels * tiles, [&](int64_t i) {
    const int64_t n0 = (i % tiles) * tile, n1 = std::min(N, n0 + tile);
    if (packed) {
      const int64_t m0 = (i / tiles) * kPanelRows, m1 = std::min(M, m0 + kPanelRows);
      if (transpose_w) nk_packed_vnni(xup + m0 * kp, kp, wp, yp + m0 * N, m1 - m0, K, N, n0, n1);
      else kn_packed_vnni(xup + m0 * kp, kp, wp, yp + m0 * N, m1 - m0, K, N, n0, n1);
      epilogue(m0, m1, n0, n1);
      return;
    }
    if (transpose_w) nk_tile_vnni(xup, kp, wp, yp, M, K, N, n0, n1);
    else kn_range_vnni(xup, kp, wp, yp, M, K, N, n0, n1);
    epilogue(0, M, n0, n1);
  });
#else
#if XLRT_WO_AVX2
  // [N, K]: the AVX2 dot over x widened once; [K, N] keeps the portable loops (AVX2 engines
  // store int8 weights [N, K], cpu_ffi.int8_weight_layout).
  std::vector<int16_t> xw;
  int64_t kp = 0;
  if (transpose_w) {
    kp = (K + 31) / 32 * 32;
    xw.assign(M * kp, 0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xw[m * kp + k] = xp[m * K + k];
  }
#endif
  parallel_for(pool, tiles, [&](int64_t i) {
    const int64_t n0 = i * tile, n1 = std::min(N, n0 + tile);
#if XLRT_WO_AVX2
    if (transpose_w) nk_tile_avx2(xw.data(), kp, wp, yp, M, K, N, n0, n1);
#else
    if (transpose_w) nk_tile_generic(xp, wp, yp, M, K, N, n0, n1);
#endif
    else kn_tile_generic(xp, wp, yp, M, K, N, n0, n1);
    epilogue(0, M, n0, n1);
  });
#endif
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                          ffi::ResultBuffer<ffi::S32> y, int64_t transpose_w) {
  int64_t M, K, N;
  bool done;
  ffi::Error error = CheckOrFinish("xlrt_int8_matmul", x, w, y, transpose_w, &M, &K, &N, &done);
  if (done) return error;
  Int8Matmul(pool, x.typed_data(), nullptr, w.typed_data(), y->typed_data(), M, K, N,
             transpose_w != 0,
             [](int64_t, int64_t, int64_t, int64_t) {});
  return error;
}

// One float row xr[K] quantized as W8a8MatmulImpl below describes, into out[K], each byte
// XORed with flip (0x80 gives the packed paths' x + 128); returns the row's scale s.
inline float quantize_row(const float* __restrict xr, int64_t K, uint8_t* __restrict out,
                          uint8_t flip) {
  constexpr float kInv127 = static_cast<float>(1.0 / 127.0);
  int64_t k = 0;
  float amax = 0.0f;
#if XLRT_QUANT_AVX2
  // 8 lanes at a time (max is exact in any order; rounding, clamp and conversion per element)
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + k)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  for (float v : lanes) amax = std::max(amax, v);
#endif
  for (; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
  const float s = amax > 0.0f ? amax * kInv127 : 1.0f;
  const float inv = 1.0f / s;
  k = 0;
#if XLRT_QUANT_AVX2
  const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m128i vflip = _mm_set1_epi8(static_cast<char>(flip));
  for (; k + 8 <= K; k += 8) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), vinv),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i q = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, r)));
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k),
                     _mm_xor_si128(_mm_packs_epi16(q16, q16), vflip));
  }
#endif
  for (; k < K; ++k) {
    const float r = std::nearbyint(xr[k] * inv);  // the default rounding: half to even
    out[k] = static_cast<uint8_t>(static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)))) ^ flip;
  }
  return s;
}

// w8a8 from float rows: y[M, N] (f32) = float(q(x) @ w) * s, where each row of x is quantized
// as model.layers.int8_rows does: s = max|x| * float(1/127) (1 for a zero row), q(x) =
// clip(round_half_even(x * (1 / s)), -127, 127). The same float operations in the same order, so
// the result has the bits of int8_rows, the int8 dot and the rescale run as XLA ops. Doing the
// quantization and the rescale here saves XLA the fusions around each matmul (a max reduction,
// the quantizing pass over x and the int32-to-float pass over y).
//
// col_scale [N] then multiplies each output column (the weight's per-channel scale, where the
// caller has no other use for the unscaled product: the LM head), after the row's scale, as
// XLA's separate multiply would.
ffi::Error W8a8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> col_scale, ffi::ResultBuffer<ffi::F32> y,
                          int64_t transpose_w) {
  int64_t M, K, N;
  bool done;
  ffi::Error error = CheckOrFinish("xlrt_w8a8_matmul", x, w, y, transpose_w, &M, &K, &N, &done);
  if (error.failure()) return error;
  if (static_cast<int64_t>(col_scale.element_count()) != N) {
    return ffi::Error::InvalidArgument("xlrt_w8a8_matmul: col_scale has " +
                                       std::to_string(col_scale.element_count()) +
                                       " values for " + std::to_string(N) + " output columns");
  }
  if (done) return error;
  const float* cs = col_scale.typed_data();
  float* yp = y->typed_data();
  const float* xp = x.typed_data();
  // VNNI builds quantize straight into the packed paths' operand (x + 128, rows padded to 4
  // bytes), others into int8 rows.
  const int64_t stride = XLRT_VNNI ? padded_k(K) : K;
  const uint8_t flip = XLRT_VNNI ? 0x80 : 0;
  std::unique_ptr<uint8_t[]> xq = row_buffer(M * stride);
  std::vector<float> scale(M);
  for_row_blocks(pool, M, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      scale[m] = quantize_row(xp + m * K, K, xq.get() + m * stride, flip);
      pad_row(xq.get() + m * stride, K, stride);
    }
  });
  // The int32 sums go to y's own bytes (same size) and become floats in place, tile by tile.
  int32_t* acc = reinterpret_cast<int32_t*>(yp);
  const int8_t* xq_signed = XLRT_VNNI ? nullptr : reinterpret_cast<const int8_t*>(xq.get());
  const uint8_t* xq_unsigned = XLRT_VNNI ? xq.get() : nullptr;
  Int8Matmul(pool, xq_signed, xq_unsigned, w.typed_data(), acc, M, K, N, transpose_w != 0,
             [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
               // In place: each float replaces the int32 it is made from, (sum * row scale) *
               // column scale as XLA's two multiplies; 8 at a time where the CPU has AVX2 (the
               // conversion rounds to nearest, as the scalar cast does).
               for (int64_t m = m0; m < m1; ++m) {
                 const float sm = scale[m];
                 int32_t* row = acc + m * N;
                 int64_t n = n0;
#if XLRT_QUANT_AVX2
                 const __m256 vsm = _mm256_set1_ps(sm);
                 for (; n + 8 <= n1; n += 8) {
                   const __m256 sum = _mm256_cvtepi32_ps(
                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + n)));
                   _mm256_storeu_ps(reinterpret_cast<float*>(row + n),
                                    _mm256_mul_ps(_mm256_mul_ps(sum, vsm), _mm256_loadu_ps(cs + n)));
                 }
#endif
                 for (; n < n1; ++n) {
                   const float v = static_cast<float>(row[n]) * sm * cs[n];
                   std::memcpy(&row[n], &v, sizeof(v));
                 }
               }
             });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Weight-only int8: y[M, N] (f32) = x[M, K] (f32) @ float(w) (int8), the per-channel scale applied
// by the caller. Each weight byte is read once, widened and multiplied in registers; XLA instead
// converts the whole weight to float in memory first. Plain loops the compiler vectorizes
// (vpmovsxbd, vcvtdq2ps, vfmadd on x86; the same on NEON), so one path serves every CPU. Float
// sums run in a different order than XLA's dot: results agree to float rounding, not bits.

constexpr int64_t kF32Range = 256;  // [K, N]: columns per work item
constexpr int64_t kRowRangeAvx2 = 96;  // [K, N], few rows, AVX2: columns per work item (12 x 8)
constexpr int64_t kRowsAvx2 = 4;  // [K, N], AVX2: up to this many rows stream the weight once
constexpr int64_t kBlockTileAvx2 = 24;  // [K, N], several rows, AVX2: xlrt::avx2::kTileCols
constexpr int64_t kF32NkTile = xlrt::kInt8NkItemRows;  // [N, K]: weight rows per work item
constexpr int64_t kLanes = 16;      // partial sums per dot product, one vector register

void f32_kn_range(const float* x, const int8_t* w, float* y, int64_t M, int64_t K, int64_t N,
                  int64_t n0, int64_t n1) {
  const int64_t width = n1 - n0;
  std::vector<float> acc(M * width, 0.0f);
  alignas(64) float wf[kF32Range];
  for (int64_t k = 0; k < K; ++k) {
    const int8_t* wr = w + k * N + n0;
    if (k + kPrefetchRows < K) {
      for (int64_t c = 0; c < width; c += 64) __builtin_prefetch(wr + kPrefetchRows * N + c);
    }
    if (M == 1) {  // widen and multiply in one pass
      const float xv = x[k];
      float* a = acc.data();
      for (int64_t j = 0; j < width; ++j) a[j] += xv * static_cast<float>(wr[j]);
      continue;
    }
    for (int64_t j = 0; j < width; ++j) wf[j] = static_cast<float>(wr[j]);  // once for all rows
    for (int64_t m = 0; m < M; ++m) {
      const float xv = x[m * K + k];
      float* a = acc.data() + m * width;
      for (int64_t j = 0; j < width; ++j) a[j] += xv * wf[j];
    }
  }
  for (int64_t m = 0; m < M; ++m)
    std::memcpy(y + m * N + n0, acc.data() + m * width, width * sizeof(float));
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    !defined(XLRT_FORCE_GENERIC) && !defined(XLRT_FORCE_AVX2)
#define XLRT_AVX512 1
// The first n of 16 lanes (none for n <= 0, all for n >= 16).
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// [K, N] with AVX-512: 64 columns x MB rows of float accumulators in registers; each k widens
// 64 weight bytes once (4 x 16 floats) and feeds MB rows of FMAs.
template <int MB>
void f32_kn_block_avx512(const float* x, const int8_t* w, float* y, int64_t K, int64_t N,
                         int64_t n0, int64_t width) {
  const __mmask64 mask = width >= 64 ? ~0ULL : ((1ULL << width) - 1);
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  const int8_t* wr = w + n0;
  for (int64_t k = 0; k < K; ++k, wr += N) {
    if (k + kPrefetchRows < K) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchRows * N), _MM_HINT_T0);
    }
    const __m512i bytes = _mm512_maskz_loadu_epi8(mask, wr);
    __m512 wf[4];
    for (int j = 0; j < 4; ++j)
      wf[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(bytes, j)));
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * K + k]);
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_fmadd_ps(xv, wf[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    float* yr = y + m * N + n0;
    for (int j = 0; j < 4; ++j) {
      const int64_t left = width - 16 * j;
      if (left <= 0) break;
      _mm512_mask_storeu_ps(yr + 16 * j, first_lanes(left), acc[m][j]);
    }
  }
}

void f32_kn_tile_avx512(const float* x, const int8_t* w, float* y, int64_t M, int64_t K,
                        int64_t N, int64_t n0, int64_t n1) {
  const int64_t width = n1 - n0;
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) f32_kn_block_avx512<6>(x + m * K, w, y + m * N, K, N, n0, width);
  switch (M - m) {
    case 5: f32_kn_block_avx512<5>(x + m * K, w, y + m * N, K, N, n0, width); break;
    case 4: f32_kn_block_avx512<4>(x + m * K, w, y + m * N, K, N, n0, width); break;
    case 3: f32_kn_block_avx512<3>(x + m * K, w, y + m * N, K, N, n0, width); break;
    case 2: f32_kn_block_avx512<2>(x + m * K, w, y + m * N, K, N, n0, width); break;
    case 1: f32_kn_block_avx512<1>(x + m * K, w, y + m * N, K, N, n0, width); break;
    default: break;
  }
}

// One row, [K, N]: C chunks of 64 columns (up to kF32Range) with all 4C accumulators in
// registers, so each k reads C * 64 contiguous weight bytes and touches no accumulator memory.
template <int C>
void f32_kn_row_avx512(const float* x, const int8_t* w, float* y, int64_t K, int64_t N,
                       int64_t n0, int64_t width) {
  __mmask64 mask[C];
  for (int c = 0; c < C; ++c) {
    const int64_t left = width - 64 * c;
    mask[c] = left >= 64 ? ~0ULL : ((1ULL << left) - 1);
  }
  __m512 acc[4 * C] = {};  // zeros
  const int8_t* wr = w + n0;
  for (int64_t k = 0; k < K; ++k, wr += N) {
    if (k + kPrefetchRows < K) {
      for (int c = 0; c < C; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchRows * N + 64 * c), _MM_HINT_T0);
    }
    const __m512 xv = _mm512_set1_ps(x[k]);
    for (int c = 0; c < C; ++c) {
      const __m512i bytes = _mm512_maskz_loadu_epi8(mask[c], wr + 64 * c);
      for (int j = 0; j < 4; ++j) {
        const __m512 wf =
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(bytes, j)));
        acc[4 * c + j] = _mm512_fmadd_ps(xv, wf, acc[4 * c + j]);
      }
    }
  }
  for (int i = 0; i < 4 * C; ++i) {
    const int64_t left = width - 16 * i;
    if (left <= 0) break;
    _mm512_mask_storeu_ps(y + n0 + 16 * i, first_lanes(left), acc[i]);
  }
}

void f32_kn_row_tile_avx512(const float* x, const int8_t* w, float* y, int64_t K, int64_t N,
                            int64_t n0, int64_t n1) {
  const int64_t width = n1 - n0;
  switch ((width + 63) / 64) {
    case 1: f32_kn_row_avx512<1>(x, w, y, K, N, n0, width); break;
    case 2: f32_kn_row_avx512<2>(x, w, y, K, N, n0, width); break;
    case 3: f32_kn_row_avx512<3>(x, w, y, K, N, n0, width); break;
    default: f32_kn_row_avx512<4>(x, w, y, K, N, n0, width); break;
  }
}

// [N, K], one row: one weight row at a time, so that each thread reads one sequential stream,
// 64 k per step widened to four vectors of floats, the same multiply-adds in the same order as
// the several-row path below (one accumulator per output: the same bits). The same bytes of the
// row 4 ahead are prefetched. In a two-thread read of a [147456, 576] weight this ran at 30 GB/s
// against 17.7 for 4 rows side by side (a plain read: 32.4; docs/PERFORMANCE.md, session 21).
void f32_nk_row_avx512(const float* x, const int8_t* w, float* y, int64_t K, int64_t N,
                       int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    const bool ahead = n + 4 < N;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
      const int64_t left = K - k;
      const __mmask64 mb = left >= 64 ? ~0ULL : ((1ULL << left) - 1);
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(wr + 4 * K + k), _MM_HINT_T0);
      const __m512i bytes = _mm512_maskz_loadu_epi8(mb, wr + k);
      for (int i = 0; i < 4; ++i) {
        const __mmask16 mi = first_lanes(left - 16 * i);
        const __m512 wf =
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(bytes, i)));
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mi, x + k + 16 * i), wf, acc);
      }
    }
    y[n] = _mm512_reduce_add_ps(acc);
  }
}

// [N, K], several rows (the LM head of batched decode, or every matmul with int8_weight_layout
// "nk"): 4 weight rows times a block of up to 6 x rows, 24 accumulators in registers; each 16
// weight bytes are widened to floats once for the block's rows, and each output gets the
// multiply-adds of the one-row path in its order (the same bits for a row alone or batched).
// The same bytes of the rows 8 ahead are prefetched with the first block: with 16-byte loads
// and one prefetch per row an earlier path read 4.5 GB/s on an AMD EPYC (docs/PERFORMANCE.md).
template <int MB>
void f32_nk_block_avx512(const float* x, const int8_t* const rows[4], float* y, int64_t K,
                         int64_t N, int64_t m0, int64_t n, int64_t nc, bool prefetch) {
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    const int64_t left = K - k;
    if (prefetch) {
      for (int j = 0; j < 4; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(rows[j] + 8 * K + k), _MM_HINT_T0);
    }
    for (int i = 0; i < 4; ++i) {
      const __mmask16 mi = first_lanes(left - 16 * i);
      __m512 wf[4];
      for (int j = 0; j < 4; ++j)
        wf[j] = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mi, rows[j] + k + 16 * i)));
      for (int m = 0; m < MB; ++m) {
        const __m512 xv = _mm512_maskz_loadu_ps(mi, x + (m0 + m) * K + k + 16 * i);
        for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_fmadd_ps(xv, wf[j], acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int64_t j = 0; j < nc; ++j) y[(m0 + m) * N + n + j] = _mm512_reduce_add_ps(acc[m][j]);
}

void f32_nk_tile_avx512(const float* x, const int8_t* w, float* y, int64_t M, int64_t K,
                        int64_t N, int64_t n0, int64_t n1) {
  if (M == 1) return f32_nk_row_avx512(x, w, y, K, N, n0, n1);
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t nc = std::min<int64_t>(4, n1 - n);
    const int8_t* rows[4];
    for (int64_t j = 0; j < 4; ++j) rows[j] = w + (n + std::min<int64_t>(j, nc - 1)) * K;
    const bool ahead = n + 12 <= N;
    for (int64_t m0 = 0; m0 < M; m0 += 6) {
      const bool prefetch = m0 == 0 && ahead;
      switch (std::min<int64_t>(6, M - m0)) {
        case 1: f32_nk_block_avx512<1>(x, rows, y, K, N, m0, n, nc, prefetch); break;
        case 2: f32_nk_block_avx512<2>(x, rows, y, K, N, m0, n, nc, prefetch); break;
        case 3: f32_nk_block_avx512<3>(x, rows, y, K, N, m0, n, nc, prefetch); break;
        case 4: f32_nk_block_avx512<4>(x, rows, y, K, N, m0, n, nc, prefetch); break;
        case 5: f32_nk_block_avx512<5>(x, rows, y, K, N, m0, n, nc, prefetch); break;
        default: f32_nk_block_avx512<6>(x, rows, y, K, N, m0, n, nc, prefetch); break;
      }
    }
  }
}
#else
#define XLRT_AVX512 0
#endif

#if XLRT_WO_AVX2
// [K, N], several rows, AVX2: each chunk of kChunk weight rows of a 24-column tile is widened to
// float once into a packed buffer (in L1), then every block of 4 rows multiplies it from
// registers (gemm_avx2.h). Widening per row block, as the AVX-512 path does with 6 rows, would
// repeat the conversions M / 4 times with half the registers.
void f32_kn_tile_avx2(const float* x, const int8_t* w, float* y, int64_t M, int64_t K, int64_t N,
                      int64_t n0, int64_t n1) {
  using namespace xlrt::avx2;
  static_assert(kTileCols == kBlockTileAvx2, "work items are one packed tile wide");
  alignas(32) float packed[kChunk * kTileCols];
  const int64_t width = n1 - n0;
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t k1 = std::min(K, k0 + kChunk);
    for (int64_t k = k0; k < k1; ++k) {
      const int8_t* wk = w + k * N + n0;
      if (k + kPrefetchRows < K) {
        _mm_prefetch(reinterpret_cast<const char*>(wk + kPrefetchRows * N), _MM_HINT_T0);
      }
      float* pk = packed + (k - k0) * kTileCols;
      if (width == kTileCols) {
        const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wk));
        const __m128i hi = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wk + 16));
        _mm256_store_ps(pk, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)));
        _mm256_store_ps(pk + 8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))));
        _mm256_store_ps(pk + 16, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)));
      } else {
        for (int64_t j = 0; j < kTileCols; ++j) pk[j] = j < width ? float(wk[j]) : 0.0f;
      }
    }
    rows_times_chunk(x, packed, y, M, K, N, n0, width, k0, k1);
  }
}
// 8 weight bytes widened to 8 floats.
inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// R rows (1-4), [K, N], AVX2: V vectors of 8 columns (R * V <= 12) accumulate in registers for
// each row; each k reads 8V contiguous weight bytes, widens them once for the R rows and
// prefetches the same bytes kPrefetchRows rows ahead. Columns past the last whole vector (ragged
// N) are summed by a scalar loop, in the same k order.
template <int R, int V>
void f32_kn_rows_avx2(const float* x, const int8_t* w, float* y, int64_t K, int64_t N,
                      int64_t n0, int64_t width) {
  __m256 acc[R][V > 0 ? V : 1];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 12
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_ps();
  }
  const int8_t* wr = w + n0;
  for (int64_t k = 0; k < K; ++k, wr += N) {
    if (k + kPrefetchRows < K) {
      for (int c = 0; c < 8 * V; c += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchRows * N + c), _MM_HINT_T0);
      }
    }
#pragma GCC unroll 12
    for (int v = 0; v < V; ++v) {
      const __m256 wv = widen8(wr + 8 * v);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        acc[r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * K + k), wv, acc[r][v]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 12
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(y + r * N + n0 + 8 * v, acc[r][v]);
    for (int64_t j = 8 * V; j < width; ++j) {
      float a = 0.0f;
      for (int64_t k = 0; k < K; ++k) a += x[r * K + k] * static_cast<float>(w[k * N + n0 + j]);
      y[r * N + n0 + j] = a;
    }
  }
}

// Columns n0 .. n1 (at most kRowRangeAvx2) of up to kRowsAvx2 rows: one pass over the weight
// range for all the rows, as many vectors as the rows leave registers for.
void f32_kn_rows_tile_avx2(const float* x, const int8_t* w, float* y, int64_t M, int64_t K,
                           int64_t N, int64_t n0, int64_t n1) {
  using Fn = void (*)(const float*, const int8_t*, float*, int64_t, int64_t, int64_t, int64_t);
  // [rows - 1][vectors]: 12 vectors for one row, 6 for two, 4 for three, 3 for four.
  constexpr Fn kFns[4][13] = {
      {f32_kn_rows_avx2<1, 0>, f32_kn_rows_avx2<1, 1>, f32_kn_rows_avx2<1, 2>,
       f32_kn_rows_avx2<1, 3>, f32_kn_rows_avx2<1, 4>, f32_kn_rows_avx2<1, 5>,
       f32_kn_rows_avx2<1, 6>, f32_kn_rows_avx2<1, 7>, f32_kn_rows_avx2<1, 8>,
       f32_kn_rows_avx2<1, 9>, f32_kn_rows_avx2<1, 10>, f32_kn_rows_avx2<1, 11>,
       f32_kn_rows_avx2<1, 12>},
      {f32_kn_rows_avx2<2, 0>, f32_kn_rows_avx2<2, 1>, f32_kn_rows_avx2<2, 2>,
       f32_kn_rows_avx2<2, 3>, f32_kn_rows_avx2<2, 4>, f32_kn_rows_avx2<2, 5>,
       f32_kn_rows_avx2<2, 6>},
      {f32_kn_rows_avx2<3, 0>, f32_kn_rows_avx2<3, 1>, f32_kn_rows_avx2<3, 2>,
       f32_kn_rows_avx2<3, 3>, f32_kn_rows_avx2<3, 4>},
      {f32_kn_rows_avx2<4, 0>, f32_kn_rows_avx2<4, 1>, f32_kn_rows_avx2<4, 2>,
       f32_kn_rows_avx2<4, 3>}};
  const int64_t vectors = 12 / M;  // per sub-range
  for (int64_t c0 = n0; c0 < n1; c0 += 8 * vectors) {
    const int64_t width = std::min(n1, c0 + 8 * vectors) - c0;
    kFns[M - 1][width / 8](x, w, y, K, N, c0, width);
  }
}

// [N, K] (the LM head), AVX2: the tile's rows are contiguous, so it is read as one stream, row
// after row, 32 k per step, widened once for a block of up to 4 x rows (one accumulator each);
// 2 KiB ahead of the stream is prefetched.
template <int MC>
void f32_nk_rows_avx2(const float* x, const int8_t* w, float* y, int64_t K, int64_t N,
                      int64_t n0, int64_t n1) {
  const int64_t kv = K / 32 * 32;
  const int8_t* end = w + N * K;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    __m256 acc[MC][2];
#pragma GCC unroll 4
    for (int m = 0; m < MC; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kv; k += 32) {
      if (row + k + 2048 < end) {
        _mm_prefetch(reinterpret_cast<const char*>(row + k + 2048), _MM_HINT_T0);
      }
      __m256 wv[4];
      for (int i = 0; i < 4; ++i) wv[i] = widen8(row + k + 8 * i);
#pragma GCC unroll 4
      for (int m = 0; m < MC; ++m) {
        const float* xm = x + m * K + k;
        for (int i = 0; i < 4; ++i) {
          acc[m][i & 1] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8 * i), wv[i], acc[m][i & 1]);
        }
      }
    }
#pragma GCC unroll 4
    for (int m = 0; m < MC; ++m) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, _mm256_add_ps(acc[m][0], acc[m][1]));
      float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                  ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
      for (int64_t k = kv; k < K; ++k) sum += x[m * K + k] * static_cast<float>(row[k]);
      y[m * N + n] = sum;
    }
  }
}

void f32_nk_tile_avx2(const float* x, const int8_t* w, float* y, int64_t M, int64_t K, int64_t N,
                      int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; m += 4) {
    float* ym = y + m * N;
    const float* xm = x + m * K;
    switch (std::min<int64_t>(4, M - m)) {
      case 1: f32_nk_rows_avx2<1>(xm, w, ym, K, N, n0, n1); break;
      case 2: f32_nk_rows_avx2<2>(xm, w, ym, K, N, n0, n1); break;
      case 3: f32_nk_rows_avx2<3>(xm, w, ym, K, N, n0, n1); break;
      default: f32_nk_rows_avx2<4>(xm, w, ym, K, N, n0, n1); break;
    }
  }
}

#endif  // XLRT_WO_AVX2

void f32_nk_tile(const float* x, const int8_t* w, float* y, int64_t M, int64_t K, int64_t N,
                 int64_t n0, int64_t n1) {
  const int64_t kv = K / kLanes * kLanes;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    __builtin_prefetch(wr + 4 * K);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float part[kLanes] = {};
      for (int64_t k = 0; k < kv; k += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) part[l] += xm[k + l] * static_cast<float>(wr[k + l]);
      float sum = 0.0f;
      for (int64_t l = 0; l < kLanes; ++l) sum += part[l];
      for (int64_t k = kv; k < K; ++k) sum += xm[k] * static_cast<float>(wr[k]);
      y[m * N + n] = sum;
    }
  }
}

// Outputs n0 .. n1 of every row of x [M, K] against w [N, K], by this build's path.
void f32_nk_any(const float* x, const int8_t* w, float* y, int64_t M, int64_t K, int64_t N,
                int64_t n0, int64_t n1) {
#if XLRT_AVX512
  f32_nk_tile_avx512(x, w, y, M, K, N, n0, n1);
#elif XLRT_WO_AVX2
  f32_nk_tile_avx2(x, w, y, M, K, N, n0, n1);
#else
  f32_nk_tile(x, w, y, M, K, N, n0, n1);
#endif
}

// y = epilogue(x @ float(w)) for x [M, K] (already through any prologue), w [K, N] or [N, K].
void f32_int8_matmul(ffi::ThreadPool& pool, const float* xp, const int8_t* wp, float* yp,
                     int64_t M, int64_t K, int64_t N, int64_t transpose_w,
                     const xlrt::Fusion& f) {
  // One row streams best as wide column ranges; more rows reuse each widened weight from
  // registers (AVX-512) across up to 6 rows. kF32Range is 4 chunks of 64 columns.
  // AVX2: up to kRowsAvx2 rows share one pass over a column range, more use packed tiles.
  const bool blocked = !transpose_w && (XLRT_AVX512 ? M > 1 : XLRT_WO_AVX2 && M > kRowsAvx2);
  const int64_t tile = transpose_w ? kF32NkTile
                       : blocked   ? (XLRT_AVX512 ? 64 : kBlockTileAvx2)
                       : XLRT_WO_AVX2 ? kRowRangeAvx2 : kF32Range;
  parallel_for(pool, (N + tile - 1) / tile, [&](int64_t i) {
    const int64_t n0 = i * tile, n1 = std::min(N, n0 + tile);
    if (transpose_w) f32_nk_any(xp, wp, yp, M, K, N, n0, n1);
#if XLRT_AVX512
    else if (blocked) f32_kn_tile_avx512(xp, wp, yp, M, K, N, n0, n1);
    else f32_kn_row_tile_avx512(xp, wp, yp, K, N, n0, n1);  // M == 1
#elif XLRT_WO_AVX2
    else if (blocked) f32_kn_tile_avx2(xp, wp, yp, M, K, N, n0, n1);
    else f32_kn_rows_tile_avx2(xp, wp, yp, M, K, N, n0, n1);  // M <= kRowsAvx2
#else
    else f32_kn_range(xp, wp, yp, M, K, N, n0, n1);
#endif
    xlrt::run_epilogue(f, yp, M, N, n0, n1);
  });
}

ffi::Error F32Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::S8> w, ffi::ResultBuffer<ffi::F32> y,
                             int64_t transpose_w) {
  int64_t M, K, N;
  ffi::Error error = CheckDims("xlrt_f32_int8_matmul", x.dimensions(), w.dimensions(),
                               y->dimensions(), transpose_w, &M, &K, &N);
  if (error.failure()) return error;
  if (M == 0 || N == 0) return ffi::Error::Success();
  f32_int8_matmul(pool, x.typed_data(), w.typed_data(), y->typed_data(), M, K, N, transpose_w,
                  xlrt::Fusion{});
  return ffi::Error::Success();
}

// Weight-only int8 with the work of parallel.h's Fusion around it: x [M, K], or [M, 2K] for
// silu(gate) * up.
ffi::Error F32Int8MatmulFusedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> weight,
                                  ffi::Buffer<ffi::F32> col_scale,
                                  ffi::Buffer<ffi::F32> residual, ffi::ResultBuffer<ffi::F32> y,
                                  int64_t prologue, float eps, int64_t transpose_w) {
  int64_t M, K, N;
  xlrt::Fusion f;
  ffi::Error error = xlrt::read_fusion(
      "xlrt_f32_int8_matmul_fused", x.dimensions(), w.dimensions(), y->dimensions(),
      transpose_w != 0, "w [K, N] (or [N, K] with transpose_w),", prologue, eps, weight,
      col_scale, residual, &M, &K, &N, &f);
  if (error.failure()) return error;
  if (M == 0 || N == 0) return ffi::Error::Success();
  std::vector<float> scratch;
  const float* xp = xlrt::run_prologue(f, x.typed_data(), M, K, scratch);
  f32_int8_matmul(pool, xp, w.typed_data(), y->typed_data(), M, K, N, transpose_w, f);
  return ffi::Error::Success();
}

}  // namespace

// The int8 and weight-only matmuls' signature: (thread pool, x of type X, int8 w) -> y of type
// Y, transpose_w. The w8a8 one adds col_scale after w.
template <ffi::DataType X, ffi::DataType Y>
auto MatmulBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<X>>()
      .template Arg<ffi::Buffer<ffi::S8>>()
      .template Ret<ffi::Buffer<Y>>()
      .template Attr<int64_t>("transpose_w");
}

void xlrt::int8_nk_range(const float* x, const int8_t* w, float* y, int64_t M, int64_t K,
                         int64_t N, int64_t n0, int64_t n1, const Fusion& f) {
  items_with_epilogue(f, y, M, N, n0, n1, kF32NkTile, [&](int64_t i0, int64_t i1) {
    f32_nk_any(x, w, y, M, K, N, i0, i1);
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlrtInt8Matmul, Int8MatmulImpl,
                              (MatmulBinding<ffi::S8, ffi::S32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(XlrtW8a8Matmul, W8a8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::S8>>()   // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // col_scale [N]
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("transpose_w"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(XlrtF32Int8Matmul, F32Int8MatmulImpl,
                              (MatmulBinding<ffi::F32, ffi::F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(XlrtF32Int8MatmulFused, F32Int8MatmulFusedImpl,
                              xlrt::FusedBinding<ffi::S8>().Attr<int64_t>("transpose_w"));

extern "C" int xlrt_int8_matmul_vnni() { return XLRT_VNNI; }

// xlrt CPU kernel: float32 matrix products of batched decode, y[M, N] = x[M, K] @ w[K, N] for
// decode batches (any number of rows), called from XLA programs through the FFI.
//
// With 16-32 sequences in a decode batch each weight is reused across the rows, and a float32 step
// is bound by multiply-adds more than by memory. This kernel keeps a block of 8 rows x 48 columns
// of the output in 24 AVX-512 registers; for each k it loads three vectors of the weight row and
// multiplies them by 8 broadcast activations: 24 FMAs per 11 loads. Work items are 48-column
// tiles; each walks K in chunks of 128 weight rows, packed contiguously so that the chunk stays in
// L1 while every 8-row block of x uses it. Measured against XLA's dot (docs/PERFORMANCE.md): a
// few percent on the whole decode step at 16-32 rows, slower below 8 rows, where the split-K
// GEMV (f32_gemv.cc) or XLA's dot run instead.
//
// Each output element is summed over k in one fixed order whatever the batch size, the row's
// place in it or the threads, so a sequence gets the same bits in any batch this kernel runs.
// Float sums run in another order than XLA's: results agree to float rounding. Without AVX-512,
// plain loops that the compiler vectorizes.

#include <algorithm>
#include <cstdint>

// XLRT_FORCE_GENERIC builds the portable loops, XLRT_FORCE_AVX2 the AVX2 path on an AVX-512 CPU
// (the tests build both).
#if defined(__AVX512F__) && !defined(XLRT_FORCE_GENERIC) && !defined(XLRT_FORCE_AVX2)
#include <immintrin.h>
#define XLRT_GEMM_AVX512 1
#define XLRT_GEMM_AVX2 0
#elif defined(__AVX2__) && defined(__FMA__) && !defined(XLRT_FORCE_GENERIC)
#include "gemm_avx2.h"
#define XLRT_GEMM_AVX512 0
#define XLRT_GEMM_AVX2 1
#else
#define XLRT_GEMM_AVX512 0
#define XLRT_GEMM_AVX2 0
#endif

#include "parallel.h"

namespace {

using xlrt::parallel_for;

#if XLRT_GEMM_AVX2
constexpr int64_t kTileCols = xlrt::avx2::kTileCols;  // 24: output columns per work item
#else
constexpr int64_t kTileCols = 48;   // output columns per work item (3 vectors)
constexpr int64_t kChunk = 128;     // weight rows per pass over the row blocks (24 KB, in L1)
constexpr int64_t kRowBlock = 8;    // x rows per register block
#endif

#if XLRT_GEMM_AVX512

// The first n of 16 lanes (none for n <= 0).
inline __mmask16 tail_mask(int64_t n) {
  if (n <= 0) return 0;
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// y[m0:m0+R, n0:n0+width] (+)= x[m0:m0+R, k0:k1] @ p[0:k1-k0, 0:width], p a packed chunk of the
// weight tile (rows 48 floats apart, zero past width <= 48); the first chunk (k0 == 0) starts
// from zero, later ones add to what y holds.
template <int R>
void kn_block(const float* x, const float* p, float* y, int64_t K, int64_t N, int64_t m0,
              int64_t n0, int64_t width, int64_t k0, int64_t k1) {
  const __mmask16 m0k = tail_mask(width), m1k = tail_mask(width - 16), m2k = tail_mask(width - 32);
  __m512 a0[R], a1[R], a2[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    if (k0 == 0) {
      a0[r] = a1[r] = a2[r] = _mm512_setzero_ps();
    } else {
      float* yr = y + (m0 + r) * N + n0;
      a0[r] = _mm512_maskz_loadu_ps(m0k, yr);
      a1[r] = _mm512_maskz_loadu_ps(m1k, yr + 16);
      a2[r] = _mm512_maskz_loadu_ps(m2k, yr + 32);
    }
  }
  const float* xr = x + m0 * K;
  for (int64_t k = k0; k < k1; ++k, p += kTileCols) {
    const __m512 w0 = _mm512_load_ps(p);
    const __m512 w1 = _mm512_load_ps(p + 16);
    const __m512 w2 = _mm512_load_ps(p + 32);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(xr[r * K + k]);
      a0[r] = _mm512_fmadd_ps(xv, w0, a0[r]);
      a1[r] = _mm512_fmadd_ps(xv, w1, a1[r]);
      a2[r] = _mm512_fmadd_ps(xv, w2, a2[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* yr = y + (m0 + r) * N + n0;
    _mm512_mask_storeu_ps(yr, m0k, a0[r]);
    _mm512_mask_storeu_ps(yr + 16, m1k, a1[r]);
    _mm512_mask_storeu_ps(yr + 32, m2k, a2[r]);
  }
}

using KnBlockFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t, int64_t);
constexpr KnBlockFn kKnBlocks[kRowBlock + 1] = {nullptr,       kn_block<1>, kn_block<2>,
                                                kn_block<3>,   kn_block<4>, kn_block<5>,
                                                kn_block<6>,   kn_block<7>, kn_block<8>};

// Columns n0 .. n0 + width of y. Each chunk of kChunk weight rows is first copied into a packed
// buffer (contiguous, in L1): the tile's rows lie N floats apart, and for N a multiple of 1024
// (gate|up, N = 3072) they all fall in the same few cache sets and would not stay in L1 (or L2)
// while the row blocks reuse them. The next chunk is prefetched while this one is copied.
void kn_tile(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
             int64_t n0, int64_t width) {
  alignas(64) float packed[kChunk * kTileCols];
  const __mmask16 m0k = tail_mask(width), m1k = tail_mask(width - 16), m2k = tail_mask(width - 32);
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t k1 = std::min(K, k0 + kChunk);
    for (int64_t k = k0; k < k1; ++k) {
      const float* wk = w + k * N + n0;
      if (k + kChunk < K) {
        const char* next = reinterpret_cast<const char*>(wk + kChunk * N);
        _mm_prefetch(next, _MM_HINT_T0);
        _mm_prefetch(next + 64, _MM_HINT_T0);
        _mm_prefetch(next + 128, _MM_HINT_T0);
      }
      float* pk = packed + (k - k0) * kTileCols;
      _mm512_store_ps(pk, _mm512_maskz_loadu_ps(m0k, wk));
      _mm512_store_ps(pk + 16, _mm512_maskz_loadu_ps(m1k, wk + 16));
      _mm512_store_ps(pk + 32, _mm512_maskz_loadu_ps(m2k, wk + 32));
    }
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, M - m0);
      kKnBlocks[rows](x, packed, y, K, N, m0, n0, width, k0, k1);
    }
  }
}

#elif XLRT_GEMM_AVX2

// As the AVX-512 kn_tile with 8-float vectors (gemm_avx2.h): 4 rows x 24 columns in registers.
void kn_tile(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
             int64_t n0, int64_t width) {
  using namespace xlrt::avx2;
  alignas(32) float packed[kChunk * kTileCols];
  const __m256i m0k = tail_mask(width), m1k = tail_mask(width - 8), m2k = tail_mask(width - 16);
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t k1 = std::min(K, k0 + kChunk);
    for (int64_t k = k0; k < k1; ++k) {
      const float* wk = w + k * N + n0;
      if (k + kChunk < K) {
        const char* next = reinterpret_cast<const char*>(wk + kChunk * N);
        _mm_prefetch(next, _MM_HINT_T0);
        _mm_prefetch(next + 64, _MM_HINT_T0);
      }
      float* pk = packed + (k - k0) * kTileCols;
      _mm256_store_ps(pk, _mm256_maskload_ps(wk, m0k));
      _mm256_store_ps(pk + 8, _mm256_maskload_ps(wk + 8, m1k));
      _mm256_store_ps(pk + 16, _mm256_maskload_ps(wk + 16, m2k));
    }
    rows_times_chunk(x, packed, y, M, K, N, n0, width, k0, k1);
  }
}

#else  // portable loops

void kn_tile(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
             int64_t n0, int64_t width) {
  for (int64_t m = 0; m < M; ++m) {
    float* yr = y + m * N + n0;
    std::fill(yr, yr + width, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float a = x[m * K + k];
      const float* wk = w + k * N + n0;
      for (int64_t j = 0; j < width; ++j) yr[j] += a * wk[j];
    }
  }
}

#endif

ffi::Error F32GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  int64_t M, K, N;
  ffi::Error error = xlrt::check_f32_matmul("xlrt_f32_gemm", x.dimensions(), w.dimensions(),
                                            y->dimensions(), false, &M, &K, &N);
  if (error.failure()) return error;
  float* yp = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(yp, yp + M * N, 0.0f);
    return ffi::Error::Success();
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  parallel_for(pool, (N + kTileCols - 1) / kTileCols, [&](int64_t i) {
    const int64_t n0 = i * kTileCols;
    kn_tile(xp, wp, yp, M, K, N, n0, std::min(N, n0 + kTileCols) - n0);
  });
  return ffi::Error::Success();
}

}  // namespace

// Which path this build runs: 2 AVX-512, 1 AVX2, 0 portable loops (cpu_ffi uses the kernel only
// with vectors; the portable loops are slower than XLA's dot).
extern "C" int xlrt_f32_gemm_path() { return XLRT_GEMM_AVX512 ? 2 : XLRT_GEMM_AVX2 ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlrtF32Gemm, F32GemmImpl,
                              xlrt::F32MatmulBinding());

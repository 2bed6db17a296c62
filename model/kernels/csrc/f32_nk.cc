// xlrt CPU kernel: float32 matmuls of decode against weights stored output channel first,
// y[M, N] = x[M, K] @ w[N, K]^T (Engine(f32_weight_layout="nk"), the default with the kernels),
// for any number of rows, called from XLA programs through the FFI.
//
// Each output is a dot product of two contiguous rows, x[m] and w[n]. The kernel keeps a block
// of R x rows times C weight rows of them in vector registers, one 16-float vector of partial
// sums per output (a pair of 8-float vectors with AVX2): for each 16 values of k it loads R + C
// vectors and does R x C fused multiply-adds. At one row (batch-1 decode) every work item is one
// sequential read of its weight rows; at 16-32 rows each weight vector loaded feeds R
// multiply-adds and each x vector C, as in llamafile's tinyBLAS (which this follows in form, not
// in code).
//
// Every output is summed in one fixed order whatever R, C, M, the row's place in the batch or
// the thread: lane j of its vector accumulates the terms k = j (mod 16) in ascending k (the
// last partial vector loaded with zeros past K), then the lanes are added in a fixed tree (four
// outputs at a time, each in the same tree). So a sequence gets the same bits alone or in any
// batch, and the AVX2 and AVX-512 builds give the same bits. Float sums run in another order
// than XLA's: results agree to float rounding, not bits. Without AVX2, plain loops.

#if defined(__AVX512F__) && !defined(XLRT_FORCE_GENERIC) && !defined(XLRT_FORCE_AVX2)
#include <immintrin.h>
#define XLRT_NK_AVX512 1
#define XLRT_NK_AVX2 0
#elif defined(__AVX2__) && defined(__FMA__) && !defined(XLRT_FORCE_GENERIC)
#include <immintrin.h>
#define XLRT_NK_AVX512 0
#define XLRT_NK_AVX2 1
#else
#define XLRT_NK_AVX512 0
#define XLRT_NK_AVX2 0
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "layer_parts.h"

namespace {

constexpr int64_t kItemRows = xlrt::kNkItemRows;  // weight rows (outputs) per work item
constexpr int64_t kL1Bytes = 28 * 1024;  // a group and a row block fit this in L1 (32 or 48 KB)

#if XLRT_NK_AVX512

struct Vec {
  using T = __m512;
  static constexpr int64_t kLanes = 16;
  // 24 accumulators + 6 weight vectors + 1 of x, of the 32 registers. One row (batch-1
  // decode) reads one weight row at a time, as the AVX2 build: 6 rows side by side streamed
  // ~30% slower in a two-thread read of the LM head and made the float32 batch-1 step 1.10-1.14x
  // slower (docs/PERFORMANCE.md, session 21).
  static constexpr int kMaxR = 4, kMaxC = 6, kOneRowC = 1;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T load_tail(const float* p, int64_t n) {  // the first n < 16 floats, zeros after
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static void pin(T& v) { asm("" : "+v"(v)); }
  // The sums of a, b, c and d, each added in the same tree: lanes j + j+8, then + j+4, + j+2,
  // + j+1 (so an output's bits do not depend on which outputs share its group).
  static __m128 sum4(T a, T b, T c, T d) {
    const __m512 ab =
        _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    const __m512 cd =
        _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    // 128-bit blocks: [a, b, c, d] lanes 0-3 + [a, b, c, d] lanes 4-7.
    __m512 s =
        _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));
    s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1));
    return _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, s));
  }
};

#elif XLRT_NK_AVX2

// Two 8-float vectors as one of 16 lanes (lo: k mod 16 < 8, hi: the rest), summed in the
// AVX-512 build's tree: the same operations on every lane, so the same bits as that build.
struct Vec {
  struct T {
    __m256 lo, hi;
  };
  static constexpr int64_t kLanes = 16;
  // 2 x 2 blocks: 8 accumulators + 2 weight vectors + 1 of x, in 14 of the 16 registers. One
  // row (batch-1 decode) streams one weight row at a time: side by side, 2 to 4 rows of it read
  // 20-30% slower (an AVX2 build on the AVX-512 machine of session 17; docs/KERNELS.md).
  static constexpr int kMaxR = 2, kMaxC = 2, kOneRowC = 1;
  static T zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static T load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static __m256 first(const float* p, int64_t n) {  // the first n floats (none for n <= 0)
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int count = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(8, n)));
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(count), lanes));
  }
  static T load_tail(const float* p, int64_t n) {  // the first n < 16 floats, zeros after
    return {first(p, n), n > 8 ? first(p + 8, n - 8) : _mm256_setzero_ps()};
  }
  static T fma(T a, T b, T c) {
    return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
  }
  static void pin(T& v) { asm("" : "+v"(v.lo), "+v"(v.hi)); }
  // As the AVX-512 sum4: lanes j + j+8 (lo + hi), then + j+4, + j+2, + j+1.
  static __m128 sum4(T a8, T b8, T c8, T d8) {
    const __m256 a = _mm256_add_ps(a8.lo, a8.hi), b = _mm256_add_ps(b8.lo, b8.hi);
    const __m256 c = _mm256_add_ps(c8.lo, c8.hi), d = _mm256_add_ps(d8.lo, d8.hi);
    const __m256 ab =
        _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    const __m256 cd =
        _mm256_add_ps(_mm256_permute2f128_ps(c, d, 0x20), _mm256_permute2f128_ps(c, d, 0x31));
    // Per 128-bit half: [a, a, c, c] (low) and [b, b, d, d] (high), lanes j + j+2.
    __m256 s = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
    s = _mm256_hadd_ps(s, s);  // [a, c, a, c | b, d, b, d]
    return _mm_unpacklo_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  }
};

#endif

#if XLRT_NK_AVX512 || XLRT_NK_AVX2

// y[m0 + r, n0 + c] = x[m0 + r] . w[n0 + c] for r < R, c < C.
template <int R, int C>
void nk_block(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m0,
              int64_t n0) {
  using T = Vec::T;
  constexpr int64_t L = Vec::kLanes;
  T acc[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 6
    for (int c = 0; c < C; ++c) acc[r][c] = Vec::zero();
  }
  const float* xr = x + m0 * K;
  const float* wr = w + n0 * K;
  const int64_t kv = K / L * L;
  for (int64_t k = 0; k < kv; k += L) {
    T wv[C];
#pragma GCC unroll 6
    for (int c = 0; c < C; ++c) {
      wv[c] = Vec::load(wr + c * K + k);
      // Held in a register for the R multiply-adds: left alone, GCC folds the load into each
      // of them and the loop does R x C + R loads instead of C + R.
      Vec::pin(wv[c]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const T xv = Vec::load(xr + r * K + k);
#pragma GCC unroll 6
      for (int c = 0; c < C; ++c) acc[r][c] = Vec::fma(xv, wv[c], acc[r][c]);
    }
  }
  if (kv < K) {
    T wv[C];
#pragma GCC unroll 6
    for (int c = 0; c < C; ++c) wv[c] = Vec::load_tail(wr + c * K + kv, K - kv);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const T xv = Vec::load_tail(xr + r * K + kv, K - kv);
#pragma GCC unroll 6
      for (int c = 0; c < C; ++c) acc[r][c] = Vec::fma(xv, wv[c], acc[r][c]);
    }
  }
  // Four outputs per reduction; a group of fewer repeats its last one.
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    float* yr = y + (m0 + r) * N + n0;
#pragma GCC unroll 2
    for (int c = 0; c < C; c += 4) {
      const __m128 s = Vec::sum4(acc[r][c], acc[r][std::min(c + 1, C - 1)],
                                 acc[r][std::min(c + 2, C - 1)], acc[r][std::min(c + 3, C - 1)]);
      if (C - c >= 4) {
        _mm_storeu_ps(yr + c, s);
      } else {
        alignas(16) float part[4];
        _mm_store_ps(part, s);
        for (int i = 0; i < C - c; ++i) yr[c + i] = part[i];
      }
    }
  }
}

using BlockFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);

template <int R, int... Cs>
constexpr auto row_of_blocks(std::integer_sequence<int, Cs...>) {
  return std::array<BlockFn, sizeof...(Cs)>{nk_block<R, Cs + 1>...};
}

template <int... Rs>
constexpr auto table_of_blocks(std::integer_sequence<int, Rs...>) {
  return std::array<std::array<BlockFn, Vec::kMaxC>, sizeof...(Rs)>{
      row_of_blocks<Rs + 1>(std::make_integer_sequence<int, Vec::kMaxC>())...};
}

// kBlocks[R - 1][C - 1] computes an R x C block.
constexpr auto kBlocks = table_of_blocks(std::make_integer_sequence<int, Vec::kMaxR>());

// The next group's weight rows (`lines` cache lines from `next`), a share per row block.
struct Prefetch {
  const char* next;
  int64_t lines, per_block, line = 0;
  void some(int hint_l2) {
    for (const int64_t end = std::min(lines, line + per_block); line < end; ++line) {
      if (hint_l2) {
        _mm_prefetch(next + line * 64, _MM_HINT_T1);
      } else {
        _mm_prefetch(next + line * 64, _MM_HINT_T0);
      }
    }
  }
};

// Outputs n0 .. n1 of every row, in R x C blocks. With a short K a group of C weight rows and a
// block of R x rows fit in L1 together ((R + C) * K floats within kL1Bytes: K <= 716 with
// AVX-512's 4 x 6 blocks, K <= 1792 with AVX2's 2 x 2): each group stays there while all the row
// blocks pass over it, and x (all rows) is re-read from L2 per group. With a longer K (the MLP
// down projection, K = 1536, on AVX-512) they do not: then each row block stays in L1 while the
// item's weight rows pass over it from L2. Past one row block, the next group's weight rows are
// prefetched while the current one is in use: the multiply-adds no longer hide the memory
// latency alone.
// One row takes kOneRowC weight rows per block (the blocks' shapes do not change the bits).
void nk_item(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
             int64_t n0, int64_t n1) {
  constexpr int64_t R = Vec::kMaxR;
  const int64_t C = M == 1 ? Vec::kOneRowC : Vec::kMaxC;
  const int64_t blocks = (M + R - 1) / R;
  auto next_group = [&](int64_t n, int64_t share) {
    const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(C, n1 - n - C));
    const int64_t lines = M > R ? rows * K * 4 / 64 : 0;
    return Prefetch{reinterpret_cast<const char*>(rows > 0 ? w + (n + C) * K : w), lines,
                    (lines + share - 1) / share};
  };
  if ((R + C) * K * 4 <= kL1Bytes) {
    for (int64_t n = n0; n < n1; n += C) {
      Prefetch prefetch = next_group(n, blocks);
      for (int64_t m = 0; m < M; m += R) {
        prefetch.some(0);
        kBlocks[std::min(R, M - m) - 1][std::min(C, n1 - n) - 1](x, w, y, K, N, m, n);
      }
    }
  } else {
    for (int64_t m = 0; m < M; m += R) {
      for (int64_t n = n0; n < n1; n += C) {
        if (m == 0) next_group(n, 1).some(1);  // later row blocks find the rows in L2
        kBlocks[std::min(R, M - m) - 1][std::min(C, n1 - n) - 1](x, w, y, K, N, m, n);
      }
    }
  }
}

#else  // portable loops: one output at a time, k ascending

void nk_item(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
             int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += x[m * K + k] * w[n * K + k];
      y[m * N + n] = sum;
    }
  }
}

#endif

// All N outputs of every row: work items of kItemRows weight rows, claimed by the threads in
// contiguous runs that shrink as the work runs out (parallel.h parallel_ranges), the epilogue of
// f on each item's outputs. Against one item per claim: 0.975-0.981x the float32 decode step at
// one row, 0.976x at 8 rows, 0.996x at 32 (docs/PERFORMANCE.md, session 19).
void nk_items(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t M,
              int64_t K, int64_t N, const xlrt::Fusion& f) {
  xlrt::parallel_ranges(pool, N, kItemRows, [&](int64_t r0, int64_t r1) {
    xlrt::f32_nk_range(x, w, y, M, K, N, r0, r1, f);
  });
}

ffi::Error F32MatmulNkImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  int64_t M, K, N;
  ffi::Error error = xlrt::check_f32_matmul("xlrt_f32_matmul_nk", x.dimensions(), w.dimensions(),
                                            y->dimensions(), true, &M, &K, &N);
  if (error.failure()) return error;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  nk_items(pool, xp, wp, yp, M, K, N, xlrt::Fusion());
  return ffi::Error::Success();
}

// y = epilogue(prologue(x) @ w^T) (parallel.h Fusion): x [M, K], or [M, 2K] for silu(gate) * up.
ffi::Error F32MatmulNkFusedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> weight,
                                ffi::Buffer<ffi::F32> col_scale, ffi::Buffer<ffi::F32> residual,
                                ffi::ResultBuffer<ffi::F32> y, int64_t prologue, float eps) {
  int64_t M, K, N;
  xlrt::Fusion f;
  ffi::Error error = xlrt::read_fusion(
      "xlrt_f32_matmul_nk_fused", x.dimensions(), w.dimensions(), y->dimensions(), true,
      "w [N, K] and", prologue, eps, weight, col_scale, residual, &M, &K, &N, &f);
  if (error.failure()) return error;
  float* yp = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  std::vector<float> scratch;
  const float* xp = xlrt::run_prologue(f, x.typed_data(), M, K, scratch);
  const float* wp = w.typed_data();
  nk_items(pool, xp, wp, yp, M, K, N, f);
  return ffi::Error::Success();
}

}  // namespace

void xlrt::f32_nk_range(const float* x, const float* w, float* y, int64_t M, int64_t K,
                        int64_t N, int64_t n0, int64_t n1, const Fusion& f) {
  items_with_epilogue(f, y, M, N, n0, n1, kItemRows, [&](int64_t i0, int64_t i1) {
    nk_item(x, w, y, M, K, N, i0, i1);
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlrtF32MatmulNk, F32MatmulNkImpl, xlrt::F32MatmulBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(XlrtF32MatmulNkFused, F32MatmulNkFusedImpl,
                              xlrt::FusedBinding<ffi::F32>());

// Shared by the xlrt CPU kernels (f32_gemm.cc, int8_matmul.cc) on CPUs with AVX2 and FMA but
// not AVX-512: a register-blocked float32 micro-kernel over a packed chunk of weight rows.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace xlrt::avx2 {

// 16 registers of 8 floats: 4 rows x 3 vectors of accumulators, 3 weight vectors, 1 broadcast.
constexpr int64_t kTileCols = 24;  // output columns per tile (3 vectors)
constexpr int64_t kChunk = 256;    // weight rows per packed chunk (24 KB of floats, in L1)
constexpr int64_t kRowBlock = 4;   // x rows per register block

// Lane i is set for i < n: AVX2's masked loads and stores take a vector of lanes.
inline __m256i tail_mask(int64_t n) {
  const int64_t c = std::max<int64_t>(0, std::min<int64_t>(8, n));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(c)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// y[m0:m0+R, n0:n0+width] (+)= x[m0:m0+R, k0:k1] @ p[0:k1-k0, 0:width], p a packed chunk of the
// weight tile (rows kTileCols floats apart, zero past width <= kTileCols); the first chunk
// (k0 == 0) starts from zero, later ones add to what y holds. Each output is summed over k in
// ascending order with one FMA per term, whatever R, so a row's bits do not depend on its batch.
template <int R>
void kn_block(const float* x, const float* p, float* y, int64_t K, int64_t N, int64_t m0,
              int64_t n0, int64_t width, int64_t k0, int64_t k1) {
  const __m256i m0k = tail_mask(width), m1k = tail_mask(width - 8), m2k = tail_mask(width - 16);
  __m256 a0[R], a1[R], a2[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    if (k0 == 0) {
      a0[r] = a1[r] = a2[r] = _mm256_setzero_ps();
    } else {
      float* yr = y + (m0 + r) * N + n0;
      a0[r] = _mm256_maskload_ps(yr, m0k);
      a1[r] = _mm256_maskload_ps(yr + 8, m1k);
      a2[r] = _mm256_maskload_ps(yr + 16, m2k);
    }
  }
  const float* xr = x + m0 * K;
  for (int64_t k = k0; k < k1; ++k, p += kTileCols) {
    const __m256 w0 = _mm256_load_ps(p);
    const __m256 w1 = _mm256_load_ps(p + 8);
    const __m256 w2 = _mm256_load_ps(p + 16);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(xr + r * K + k);
      a0[r] = _mm256_fmadd_ps(xv, w0, a0[r]);
      a1[r] = _mm256_fmadd_ps(xv, w1, a1[r]);
      a2[r] = _mm256_fmadd_ps(xv, w2, a2[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    float* yr = y + (m0 + r) * N + n0;
    _mm256_maskstore_ps(yr, m0k, a0[r]);
    _mm256_maskstore_ps(yr + 8, m1k, a1[r]);
    _mm256_maskstore_ps(yr + 16, m2k, a2[r]);
  }
}

// All rows of x against one packed chunk, in blocks of kRowBlock.
inline void rows_times_chunk(const float* x, const float* packed, float* y, int64_t M, int64_t K,
                             int64_t N, int64_t n0, int64_t width, int64_t k0, int64_t k1) {
  using Fn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                      int64_t, int64_t, int64_t);
  constexpr Fn kBlocks[kRowBlock + 1] = {nullptr, kn_block<1>, kn_block<2>, kn_block<3>,
                                         kn_block<4>};
  for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
    kBlocks[std::min(kRowBlock, M - m0)](x, packed, y, K, N, m0, n0, width, k0, k1);
  }
}

}  // namespace xlrt::avx2

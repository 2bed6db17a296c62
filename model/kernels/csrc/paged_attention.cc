// xlrt CPU kernel: decode attention straight from the paged KV cache, called from XLA programs
// through the FFI.
//
// out[b, t, n, :] = softmax_j(scale * q[b, t, n, :] . k_j) v_j over the keys j of sequence b that
// query t may see (j < kv_lens[b], j <= q_pos[b, t], and within the sliding window if any).
// Keys and values are read where they lie, page by page through the sequence's page table; the
// XLA path gathers them into a dense copy first and then reads that copy twice, which made
// attention about 60% of a float32 decode step at batch 32 (docs/PERFORMANCE.md). Each work item
// is one (sequence, kv head) pair, or a range of its pages when there are too few pairs to keep
// the threads busy; it keeps an online softmax (running max, sum and weighted values) per query
// row, so every key and value byte is read once. Split ranges are merged at the end.
//
// Cache layout (model/layers.py write_kv_pages): k, v [layers, kv_heads, num_pages, page_size,
// head_dim], float32 or int8; an int8 cache has scales [layers, kv_heads, num_pages, 1,
// page_size] and is dequantized on read (k_j = scale_j * int8_j). Rows without a visible key
// output zeros, as in model/kernels/reference.py. Float sums run in another order than XLA's:
// results agree to float rounding, not bits.
//
// Plain loops that the compiler vectorizes (-O3 -march=native) serve every CPU; pages without a
// logit soft-cap take register paths with AVX-512 (pages of 16 keys) or AVX2 + FMA (pages of a
// multiple of 8 keys) for the common head sizes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "layer_parts.h"

namespace {

using xlrt::parallel_for;
using Shape = xlrt::AttentionShape;
using Args = xlrt::AttentionArgs;

constexpr int64_t kLanes = 16;  // partial sums per dot product: one AVX-512 register
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += a[i + j] * static_cast<float>(b[i + j]);
  float sum = 0.0f;
  for (int64_t j = 0; j < kLanes; ++j) sum += lanes[j];
  for (; i < n; ++i) sum += a[i] * static_cast<float>(b[i]);
  return sum;
}

template <typename T>
inline void axpy(float alpha, const T* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * static_cast<float>(x[i]);
}

// A register path for one page: (q, k page, v page, k scales, v scales, rows, keys, first
// position, row positions, window, m, l, acc), as page_avx512 and page_avx2 below.
template <typename T>
using PageFn = void (*)(const float*, const T*, const T*, const float*, const float*, int64_t,
                        int64_t, int64_t, const int32_t*, int64_t, float*, float*, float*);

#if defined(__AVX512F__) && !defined(XLRT_FORCE_GENERIC) && !defined(XLRT_FORCE_AVX2)
#define XLRT_ATTN_AVX512 1
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Lane i of the result = the sum of the 16 lanes of v[i] (a transpose-and-add tree: 15 merges
// instead of 16 horizontal reductions).
inline __m512 reduce16(const __m512 v[16]) {
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit block: [a0+a2, b0+b2, a1+a3, b1+b3]
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit block: the four keys' block sums
    const __m512d a = _mm512_castps_pd(x[2 * i]), b = _mm512_castps_pd(x[2 * i + 1]);
    y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // blocks: [keys 4i.. (b0+b1), (b2+b3), keys 4i+4.. (b0+b1), (b2+b3)]
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#else
#define XLRT_ATTN_AVX512 0
#endif

// s[r * PS + i] = q_r . k_i for the R query rows q [R, H] and keys i < n of one page k [PS, H].
template <typename T>
void page_scores(const float* q, const T* k, int64_t R, int64_t H, int64_t n, int64_t PS,
                 float* s) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t r = 0; r < R; ++r) s[r * PS + i] = dot(q + r * H, k + i * H, H);
}

// e[i] = exp(s[i] - m) for i < n (s <= m); masked scores (-inf) give exactly 0. The polynomial
// of parallel.h exp_nonpositive, which the compiler vectorizes.
inline void exp_shifted(const float* s, float m, float* e, int64_t n) {
  for (int64_t i = 0; i < n; ++i) e[i] = s[i] == kNegInf ? 0.0f : xlrt::exp_nonpositive(s[i] - m);
}

#if XLRT_ATTN_AVX512
// exp(x) for x <= 0 lanes, the polynomial of exp_shifted; scalef applies 2^k.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

// One page of 16 keys for R query rows with head_dim 16 * C, all in registers: the scores of a
// row come out of one reduce16 tree, masking and exp run on whole vectors, and the row's
// weighted values accumulate in C registers, stored once per page.
template <typename T, int C>
void page_avx512(const float* q, const T* kp, const T* vp, const float* ks, const float* vs,
                 int64_t R, int64_t n, int64_t base, const int32_t* rpos, int64_t window,
                 float* m, float* l, float* acc) {
  constexpr int64_t H = 16 * C;
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
  const __m512i pos = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(base)),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                         12, 13, 14, 15));
  const __m512 kscale = ks ? _mm512_maskz_loadu_ps(valid, ks) : _mm512_set1_ps(1.0f);
  const __m512 vscale = vs ? _mm512_maskz_loadu_ps(valid, vs) : _mm512_set1_ps(1.0f);
  __m512 part[16];
  for (int64_t r = 0; r < R; ++r) {
    __m512 qc[C];
    for (int c = 0; c < C; ++c) qc[c] = _mm512_loadu_ps(q + r * H + 16 * c);
    for (int64_t i = 0; i < 16; ++i) {
      __m512 dot = _mm512_setzero_ps();
      if (i < n)
        for (int c = 0; c < C; ++c) dot = _mm512_fmadd_ps(qc[c], load16(kp + i * H + 16 * c), dot);
      part[i] = dot;
    }
    const __m512 sc = _mm512_mul_ps(reduce16(part), kscale);
    const __m512i qp = _mm512_set1_epi32(rpos[r]);
    __mmask16 vis = valid & _mm512_cmple_epi32_mask(pos, qp);
    if (window > 0)
      vis &= _mm512_cmplt_epi32_mask(_mm512_sub_epi32(qp, pos),
                                     _mm512_set1_epi32(static_cast<int32_t>(window)));
    if (!vis) continue;
    const float mx = _mm512_mask_reduce_max_ps(vis, sc);
    const float m_new = std::max(m[r], mx);
    const float alpha = m[r] == kNegInf ? 0.0f : std::exp(m[r] - m_new);
    m[r] = m_new;
    const __m512 e = _mm512_maskz_mov_ps(vis, exp512(_mm512_sub_ps(sc, _mm512_set1_ps(m_new))));
    l[r] = l[r] * alpha + _mm512_reduce_add_ps(e);
    alignas(64) float w[16];
    _mm512_store_ps(w, _mm512_mul_ps(e, vscale));
    __m512 a[C];
    const __m512 al = _mm512_set1_ps(alpha);
    for (int c = 0; c < C; ++c) a[c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * H + 16 * c), al);
    for (int64_t i = 0; i < n; ++i) {
      const __m512 wi = _mm512_set1_ps(w[i]);
      for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(wi, load16(vp + i * H + 16 * c), a[c]);
    }
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + r * H + 16 * c, a[c]);
  }
}

// The register path for this head_dim (a multiple of 16 up to 128, or 256), else null.
template <typename T>
PageFn<T> page_fn(int64_t H) {
  switch (H) {
    case 16: return page_avx512<T, 1>;
    case 32: return page_avx512<T, 2>;
    case 48: return page_avx512<T, 3>;
    case 64: return page_avx512<T, 4>;
    case 80: return page_avx512<T, 5>;
    case 96: return page_avx512<T, 6>;
    case 112: return page_avx512<T, 7>;
    case 128: return page_avx512<T, 8>;
    case 256: return page_avx512<T, 16>;
    default: return nullptr;
  }
}
#endif

#if !XLRT_ATTN_AVX512 && defined(__AVX2__) && defined(__FMA__) && !defined(XLRT_FORCE_GENERIC)
#define XLRT_ATTN_AVX2 1
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Lane i of the result = the sum of the 8 lanes of v[i] (two rounds of hadd, then the halves).
inline __m256 reduce8(const __m256 v[8]) {
  const __m256 y0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 y1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(y0, y1, 0x20), _mm256_permute2f128_ps(y0, y1, 0x31));
}

inline float hsum8(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

inline float hmax8(__m256 v) {
  const __m128 s4 = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_max_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_max_ss(s2, _mm_movehdup_ps(s2)));
}

// exp(x) for x <= 0 lanes: exp_shifted's polynomial; 2^k built in the exponent bits.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// One page (a multiple of 8 keys) for R query rows with head_dim 8 * C, AVX2: 8 keys at a time,
// their scores out of one reduce8 tree, masking and exp on whole vectors, and the row's weighted
// values accumulated in C registers, stored once per 8 keys.
template <typename T, int C>
void page_avx2(const float* q, const T* kp, const T* vp, const float* ks, const float* vs,
               int64_t R, int64_t n, int64_t base, const int32_t* rpos, int64_t window,
               float* m, float* l, float* acc) {
  constexpr int64_t H = 8 * C;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    const int64_t cnt = std::min<int64_t>(8, n - i0);
    const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(cnt)), lane);
    const __m256i pos = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(base + i0)), lane);
    const __m256 kscale = ks ? _mm256_maskload_ps(ks + i0, valid) : _mm256_set1_ps(1.0f);
    const __m256 vscale = vs ? _mm256_maskload_ps(vs + i0, valid) : _mm256_set1_ps(1.0f);
    const T* kg = kp + i0 * H;
    const T* vg = vp + i0 * H;
    for (int64_t r = 0; r < R; ++r) {
      const __m256i qp = _mm256_set1_epi32(rpos[r]);
      __m256i vis = _mm256_andnot_si256(_mm256_cmpgt_epi32(pos, qp), valid);  // pos <= qp
      if (window > 0)  // qp - pos < window
        vis = _mm256_and_si256(vis, _mm256_cmpgt_epi32(
            _mm256_set1_epi32(static_cast<int32_t>(window)), _mm256_sub_epi32(qp, pos)));
      if (_mm256_testz_si256(vis, vis)) continue;
      const float* qr = q + r * H;
      __m256 part[8];
      for (int64_t i = 0; i < 8; ++i) {
        __m256 dot = _mm256_setzero_ps();
        if (i < cnt)
          for (int c = 0; c < C; ++c)
            dot = _mm256_fmadd_ps(_mm256_loadu_ps(qr + 8 * c), load8(kg + i * H + 8 * c), dot);
        part[i] = dot;
      }
      const __m256 vmask = _mm256_castsi256_ps(vis);
      const __m256 sc = _mm256_blendv_ps(neg_inf, _mm256_mul_ps(reduce8(part), kscale), vmask);
      const float m_new = std::max(m[r], hmax8(sc));
      const float alpha = m[r] == kNegInf ? 0.0f : std::exp(m[r] - m_new);
      m[r] = m_new;
      const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(sc, _mm256_set1_ps(m_new))), vmask);
      l[r] = l[r] * alpha + hsum8(e);
      alignas(32) float w[8];
      _mm256_store_ps(w, _mm256_mul_ps(e, vscale));
      __m256 a[C];
      const __m256 al = _mm256_set1_ps(alpha);
      for (int c = 0; c < C; ++c) a[c] = _mm256_mul_ps(_mm256_loadu_ps(acc + r * H + 8 * c), al);
      for (int64_t i = 0; i < cnt; ++i) {
        if (w[i] == 0.0f) continue;
        const __m256 wi = _mm256_set1_ps(w[i]);
        for (int c = 0; c < C; ++c) a[c] = _mm256_fmadd_ps(wi, load8(vg + i * H + 8 * c), a[c]);
      }
      for (int c = 0; c < C; ++c) _mm256_storeu_ps(acc + r * H + 8 * c, a[c]);
    }
  }
}

// The register path for this head_dim, else null.
template <typename T>
PageFn<T> page_fn(int64_t H) {
  switch (H) {
    case 16: return page_avx2<T, 2>;
    case 24: return page_avx2<T, 3>;
    case 32: return page_avx2<T, 4>;
    case 48: return page_avx2<T, 6>;
    case 64: return page_avx2<T, 8>;
    case 96: return page_avx2<T, 12>;
    case 128: return page_avx2<T, 16>;
    default: return nullptr;
  }
}
#else
#define XLRT_ATTN_AVX2 0
#endif

// rot[i] = x[i] cos[i] - x[i + H/2] sin[i], rot[i + H/2] = x[i + H/2] cos[i] + x[i] sin[i] (the
// "rotate half" convention of model/layers.py apply_rope).
inline void rope(const float* x, const float* cos, const float* sin, int64_t H, float* rot) {
  const int64_t half = H / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    rot[i] = x1 * cos[i] - x2 * sin[i];
    rot[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

// Stores one token's vector x [H] of kv head `kvh` at (page, slot): as it is into a float cache,
// or by model.kernels.quantize_int8's rule into an int8 one (scale = max|x| / 127, values
// round-half-even(x / scale) clipped to +-127; an all-zero x gets scale 0 and zeros). Whether
// XLA divides by the scale or multiplies by its reciprocal is its own choice, so a value at a
// rounding tie may land one step apart from the XLA path's.
inline void store(const float* x, int64_t H, float* cache, float*, int64_t at, int64_t) {
  std::memcpy(cache + at * H, x, H * sizeof(float));
}
inline void store(const float* x, int64_t H, int8_t* cache, float* scales, int64_t at,
                  int64_t scale_at) {
  float amax = 0.0f;
  for (int64_t h = 0; h < H; ++h) amax = std::max(amax, std::fabs(x[h]));
  const float scale = amax * (1.0f / 127.0f);  // as XLA computes max / 127 (it folds it)
  const float safe = scale > 0.0f ? scale : 1.0f;
  for (int64_t h = 0; h < H; ++h) {
    const float r = std::nearbyint(x[h] / safe);
    cache[at * H + h] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
  }
  scales[scale_at] = scale;
}


// The new tokens of sequence b whose pages are pages [p0, p1) of its page table: kv head kvh's
// rotated key and its value stored at their slots (those at positions >= kv_lens, padding, are
// not stored; the XLA path sends them to the reserved page 0, which nothing reads). Each token's
// page lies in exactly one item's range, and no other item reads that range of the sequence.
template <typename T>
void write_new(const Args& a, int64_t b, int64_t kvh, int64_t p0, int64_t p1, float* rot) {
  const Shape& d = a.d;
  const int64_t heads = d.N + 2 * d.KVH, H = d.H, half = H / 2;
  const int64_t len = std::min<int64_t>(a.kv_lens[b], d.W * d.PS);
  T* kc = static_cast<T*>(a.k);
  T* vc = static_cast<T*>(a.v);
  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t pos = a.q_pos[b * d.T + t];
    if (pos < 0 || pos >= len || pos / d.PS < p0 || pos / d.PS >= p1) continue;
    const int64_t page = a.page_table[b * d.W + pos / d.PS], slot = pos % d.PS;
    const float* token = a.qkv + (b * d.T + t) * heads * H;
    const int64_t at = ((a.layer * d.KVH + kvh) * d.P + page) * d.PS + slot;
    rope(token + (d.N + kvh) * H, a.cos + (b * d.T + t) * half, a.sin + (b * d.T + t) * half, H,
         rot);
    store(rot, H, kc, a.k_scale, at, at);
    store(token + (d.N + d.KVH + kvh) * H, H, vc, a.v_scale, at, at);
  }
}

// Online softmax over pages [p0, p1) of sequence b for the g * T query rows of kv head kvh:
// m[R], l[R], acc[R, H] (unnormalized).
template <typename T>
void attend(const Args& a, int64_t b, int64_t kvh, int64_t p0, int64_t p1, float* m, float* l,
            float* acc) {
  const Shape& d = a.d;
  const int64_t g = d.N / d.KVH, R = g * d.T, H = d.H, PS = d.PS;
  std::vector<float> qr(R * H), s(R * PS), e(PS);
  if (a.qkv) write_new<T>(a, b, kvh, p0, p1, qr.data());  // qr: scratch until filled below
  std::fill(m, m + R, kNegInf);
  std::fill(l, l + R, 0.0f);
  std::fill(acc, acc + R * H, 0.0f);
  const int32_t* qpos = a.q_pos + b * d.T;
  int32_t max_pos = -1;
  for (int64_t t = 0; t < d.T; ++t) max_pos = std::max(max_pos, qpos[t]);
  // Keys past the page table's width are not part of the call (as in the XLA gather).
  const int64_t kv_len = std::min<int64_t>({int64_t{a.kv_lens[b]}, int64_t{max_pos} + 1,
                                            d.W * d.PS});
  p1 = std::min(p1, (kv_len + PS - 1) / PS);
  if (kv_len <= 0 || p0 >= p1) return;
  // Query rows r = gi * T + t (rotated first with qkv), pre-scaled.
  std::vector<int32_t> rpos(R);
  for (int64_t gi = 0; gi < g; ++gi)
    for (int64_t t = 0; t < d.T; ++t) {
      const int64_t r = gi * d.T + t;
      float* row = &qr[r * H];
      if (a.qkv) {
        const int64_t bt = b * d.T + t;
        rope(a.qkv + (bt * (d.N + 2 * d.KVH) + kvh * g + gi) * H, a.cos + bt * (H / 2),
             a.sin + bt * (H / 2), H, row);
      } else {
        std::memcpy(row, a.q + ((b * d.T + t) * d.N + kvh * g + gi) * H, H * sizeof(float));
      }
      for (int64_t h = 0; h < H; ++h) row[h] *= a.scale;
      rpos[r] = qpos[t];
    }
  const T* kc = static_cast<const T*>(a.k);
  const T* vc = static_cast<const T*>(a.v);
  const int64_t head = (a.layer * d.KVH + kvh) * d.P;  // first page of this layer and head
#if XLRT_ATTN_AVX512
  // Pages of 16 tokens without a logit soft-cap take the register path.
  const PageFn<T> fast = PS == 16 && a.softcap <= 0.0f ? page_fn<T>(H) : nullptr;
#elif XLRT_ATTN_AVX2
  // AVX2: pages of a multiple of 8 tokens without a logit soft-cap.
  const PageFn<T> fast = PS % 8 == 0 && a.softcap <= 0.0f ? page_fn<T>(H) : nullptr;
#endif
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t page = a.page_table[b * d.W + p];
    const int64_t base = p * PS, n = std::min(PS, kv_len - base);
    const T* kp = kc + (head + page) * PS * H;
    const T* vp = vc + (head + page) * PS * H;
    const float* ks = a.k_scale ? a.k_scale + (head + page) * PS : nullptr;
    const float* vs = a.v_scale ? a.v_scale + (head + page) * PS : nullptr;
    if (p + 1 < p1) {  // the next page of this sequence is elsewhere in memory
      const int64_t next = a.page_table[b * d.W + p + 1];
      const char* nk = reinterpret_cast<const char*>(kc + (head + next) * PS * H);
      const char* nv = reinterpret_cast<const char*>(vc + (head + next) * PS * H);
      for (int64_t off = 0; off < int64_t(PS * H * sizeof(T)); off += 64) {
        __builtin_prefetch(nk + off);
        __builtin_prefetch(nv + off);
      }
    }
#if XLRT_ATTN_AVX512 || XLRT_ATTN_AVX2
    if (fast) {
      fast(qr.data(), kp, vp, ks, vs, R, n, base, rpos.data(), a.window, m, l, acc);
      continue;
    }
#endif
    page_scores(qr.data(), kp, R, H, n, PS, s.data());
    if (ks) {
      for (int64_t r = 0; r < R; ++r)
        for (int64_t i = 0; i < n; ++i) s[r * PS + i] *= ks[i];
    }
    for (int64_t r = 0; r < R; ++r) {
      float* sr = &s[r * PS];
      float mx = kNegInf;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t pos = base + i;
        float x = sr[i];
        if (a.softcap > 0.0f) x = a.softcap * std::tanh(x / a.softcap);
        const bool visible = pos <= rpos[r] && (a.window <= 0 || rpos[r] - pos < a.window);
        sr[i] = visible ? x : kNegInf;
        mx = std::max(mx, sr[i]);
      }
      if (mx == kNegInf) continue;
      const float m_new = std::max(m[r], mx);
      float* ar = acc + r * H;
      if (m[r] != m_new) {
        const float alpha = m[r] == kNegInf ? 0.0f : std::exp(m[r] - m_new);
        l[r] *= alpha;
        for (int64_t h = 0; h < H; ++h) ar[h] *= alpha;
        m[r] = m_new;
      }
      exp_shifted(sr, m_new, e.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        if (e[i] == 0.0f) continue;
        l[r] += e[i];
        axpy(vs ? e[i] * vs[i] : e[i], vp + i * H, ar, H);
      }
    }
  }
}

// Keys per work item: a (sequence, kv head) pair's pages are cut into fixed ranges of this many
// tokens, so that a long sequence keeps both threads busy at batch 1. The ranges depend only on
// positions, never on the batch, so a sequence gets the same bits alone or batched.
constexpr int64_t kChunkTokens = 256;

// out [B, T, N, H]: the rows of pair `pair`, from the parts of all its splits.
void merge_pair(const xlrt::AttentionPlan& p, const float* part, int64_t pair, float* out) {
  const Shape& d = p.a.d;
  const int64_t g = d.N / d.KVH, R = g * d.T, H = d.H;
  const int64_t b = pair / d.KVH, kvh = pair % d.KVH;
  for (int64_t r = 0; r < R; ++r) {
    float m_all = kNegInf;
    for (int64_t sp = 0; sp < p.splits; ++sp)
      m_all = std::max(m_all, part[(pair * p.splits + sp) * p.stride + r]);
    const int64_t gi = r / d.T, t = r % d.T;
    float* o = out + ((b * d.T + t) * d.N + kvh * g + gi) * H;
    std::fill(o, o + H, 0.0f);
    if (m_all == kNegInf) continue;  // no visible key: zeros
    float l_all = 0.0f;
    for (int64_t sp = 0; sp < p.splits; ++sp) {
      const float* base = part + (pair * p.splits + sp) * p.stride;
      if (base[r] == kNegInf) continue;
      const float w = std::exp(base[r] - m_all);
      l_all += w * base[R + r];
      axpy(w, base + 2 * R + r * H, o, H);
    }
    const float inv = 1.0f / l_all;
    for (int64_t h = 0; h < H; ++h) o[h] *= inv;
  }
}

// The plan's items on XLA's pool.
ffi::Error Run(ffi::ThreadPool& pool, const xlrt::AttentionPlan& plan, float* out) {
  std::vector<float> part(plan.part_floats());
  xlrt::AttentionCounts counts(plan);
  parallel_for(pool, plan.items(),
               [&](int64_t item) { xlrt::attention_item(plan, part.data(), counts, item, out); });
  return ffi::Error::Success();
}

using Dims = ffi::Span<const int64_t>;

ffi::Error CheckShapes(const std::string& name, Dims q, Dims k, Dims v, Dims table, Dims qpos,
                       Dims kv_lens, Dims out, Shape* d) {
  if (q.size() != 4 || k.size() != 5 || v.size() != 5 || table.size() != 2 ||
      qpos.size() != 2 || kv_lens.size() != 1 || out.size() != 4) {
    return ffi::Error::InvalidArgument(
        name + ": expected q [B, T, N, H], k and v [L, KVH, P, PS, H], page_table [B, W], "
               "q_pos [B, T], kv_lens [B] and out [B, T, N, H]");
  }
  *d = Shape{q[0], q[1], q[2], q[3], k[0], k[1], k[2], k[3], table[1]};
  for (int i = 0; i < 5; ++i) {
    if (k[i] != v[i]) return ffi::Error::InvalidArgument(name + ": k and v shapes differ");
  }
  if (k[4] != d->H || d->KVH <= 0 || d->N % d->KVH != 0) {
    return ffi::Error::InvalidArgument(name + ": q heads must be a multiple of kv heads and "
                                       "head_dim must match the cache");
  }
  if (table[0] != d->B || qpos[0] != d->B || qpos[1] != d->T || kv_lens[0] != d->B) {
    return ffi::Error::InvalidArgument(name + ": batch or query length mismatch");
  }
  for (int i = 0; i < 4; ++i) {
    if (out[i] != q[i]) return ffi::Error::InvalidArgument(name + ": out must be shaped as q");
  }
  return ffi::Error::Success();
}

// The layer and every page the call reads or writes (those below kv_lens) lie in the cache.
ffi::Error Validate(const std::string& name, const Args& a) {
  const Shape& d = a.d;
  if (a.layer < 0 || a.layer >= d.L) {
    return ffi::Error::InvalidArgument(name + ": layer " + std::to_string(a.layer) +
                                       " outside the cache's " + std::to_string(d.L));
  }
  for (int64_t b = 0; b < d.B; ++b) {
    const int64_t len = std::min<int64_t>(a.kv_lens[b], d.W * d.PS);
    for (int64_t p = 0; p * d.PS < len; ++p) {
      const int32_t page = a.page_table[b * d.W + p];
      if (page < 0 || page >= d.P) {
        return ffi::Error::InvalidArgument(
            name + ": page table entry " + std::to_string(page) + " outside the cache's " +
            std::to_string(d.P) + " pages");
      }
    }
  }
  return ffi::Error::Success();
}

// The layer, the paging operands and the attributes into *a (the layer must be a scalar), then
// Validate.
ffi::Error ReadPaging(const std::string& name, ffi::Buffer<ffi::S32> layer,
                      ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> q_pos,
                      ffi::Buffer<ffi::S32> kv_lens, float scale, float softcap, int64_t window,
                      Args* a) {
  if (layer.element_count() != 1) {
    return ffi::Error::InvalidArgument(name + ": layer must be a scalar");
  }
  a->layer = layer.typed_data()[0];
  a->page_table = page_table.typed_data();
  a->q_pos = q_pos.typed_data();
  a->kv_lens = kv_lens.typed_data();
  a->scale = scale;
  a->softcap = softcap;
  a->window = window;
  return Validate(name, *a);
}

template <typename T, typename KBuf>
ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, KBuf k, KBuf v, float* k_scale,
                float* v_scale, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> page_table,
                ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_lens,
                ffi::ResultBuffer<ffi::F32> out, float scale, float softcap, int64_t window) {
  const std::string name = "xlrt_paged_decode_attention";
  Args a;
  ffi::Error error = CheckShapes(name, q.dimensions(), k.dimensions(), v.dimensions(),
                                 page_table.dimensions(), q_pos.dimensions(),
                                 kv_lens.dimensions(), out->dimensions(), &a.d);
  if (error.failure()) return error;
  error = ReadPaging(name, layer, page_table, q_pos, kv_lens, scale, softcap, window, &a);
  if (error.failure()) return error;
  // Read only: without qkv nothing is written to the caches.
  a.q = q.typed_data();
  a.k = const_cast<T*>(k.typed_data());
  a.v = const_cast<T*>(v.typed_data());
  a.k_scale = k_scale;
  a.v_scale = v_scale;
  return Run(pool, xlrt::plan_attention(a, std::is_same_v<T, int8_t>), out->typed_data());
}

ffi::Error F32Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> layer,
                   ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> q_pos,
                   ffi::Buffer<ffi::S32> kv_lens, ffi::ResultBuffer<ffi::F32> out, float scale,
                   float softcap, int64_t window) {
  return Impl<float>(pool, q, k, v, nullptr, nullptr, layer, page_table, q_pos, kv_lens, out,
                     scale, softcap, window);
}

ffi::Error Int8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S8> k,
                    ffi::Buffer<ffi::S8> v, ffi::Buffer<ffi::F32> k_scale,
                    ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::S32> layer,
                    ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> q_pos,
                    ffi::Buffer<ffi::S32> kv_lens, ffi::ResultBuffer<ffi::F32> out, float scale,
                    float softcap, int64_t window) {
  ffi::Error error = xlrt::check_scales("xlrt_paged_decode_attention", k.dimensions(),
                                        k_scale.dimensions(), k_scale.element_count(),
                                        v_scale.element_count());
  if (error.failure()) return error;
  return Impl<int8_t>(pool, q, k, v, const_cast<float*>(k_scale.typed_data()),
                      const_cast<float*>(v_scale.typed_data()), layer, page_table, q_pos,
                      kv_lens, out, scale, softcap, window);
}

// ---- Decode attention with RoPE and the cache write folded in ----------------------------------
//
// The model's decode step otherwise runs, per layer, XLA ops between the q|k|v matmul and this
// kernel: the rotary embedding of q and k (slices, products and a concatenate), and for k and v a
// scatter of the new token into its page (plus, for an int8 cache, the per-token quantization).
// On the CPU each is a separate small loop over a few hundred floats, together ~15% of a
// weight-only int8 batch-1 step (docs/PERFORMANCE.md, session 18). This entry does the same work
// in the kernel: q and the new k (one q | k | v operand, the fused projection's output as it
// is) rotated with cos / sin the model computed (the same frequencies and Llama-3 scaling as its
// XLA path), k and v stored at their slots in the cache buffers, which XLA passes in and out
// aliased (updated in place), then attention as above.

template <typename T, typename CacheBuf>
ffi::Error RopeWriteImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                         ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                         ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> page_table,
                         ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_lens,
                         ffi::ResultBuffer<ffi::F32> out, CacheBuf k, CacheBuf v,
                         float* k_scale, float* v_scale, float scale, float softcap,
                         int64_t window) {
  Args a;
  ffi::Error error = xlrt::check_rope_attention(
      "xlrt_paged_decode_attention_rope", qkv.dimensions(), cos.dimensions(), sin.dimensions(),
      k->dimensions(), v->dimensions(), layer, page_table, q_pos, kv_lens, scale, softcap,
      window, &a);
  if (error.failure()) return error;
  const auto od = out->dimensions();
  if (od.size() != 4 || od[0] != a.d.B || od[1] != a.d.T || od[2] != a.d.N || od[3] != a.d.H) {
    return ffi::Error::InvalidArgument(
        "xlrt_paged_decode_attention_rope: out must be [B, T, N, H]");
  }
  a.qkv = qkv.typed_data();
  a.cos = cos.typed_data();
  a.sin = sin.typed_data();
  a.k = k->typed_data();
  a.v = v->typed_data();
  a.k_scale = k_scale;
  a.v_scale = v_scale;
  return Run(pool, xlrt::plan_attention(a, std::is_same_v<T, int8_t>), out->typed_data());
}

ffi::Error RopeF32Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> cos,
                       ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                       ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> page_table,
                       ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_lens,
                       ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> k,
                       ffi::ResultBuffer<ffi::F32> v, float scale, float softcap,
                       int64_t window) {
  return RopeWriteImpl<float>(pool, qkv, cos, sin, layer, page_table, q_pos, kv_lens, out, k, v,
                              nullptr, nullptr, scale, softcap, window);
}

ffi::Error RopeInt8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                        ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                        ffi::Buffer<ffi::S8>, ffi::Buffer<ffi::S8>, ffi::Buffer<ffi::F32>,
                        ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::S32> layer,
                        ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> q_pos,
                        ffi::Buffer<ffi::S32> kv_lens, ffi::ResultBuffer<ffi::F32> out,
                        ffi::ResultBuffer<ffi::S8> k, ffi::ResultBuffer<ffi::S8> v,
                        ffi::ResultBuffer<ffi::F32> k_scale, ffi::ResultBuffer<ffi::F32> v_scale,
                        float scale, float softcap, int64_t window) {
  ffi::Error error = xlrt::check_scales("xlrt_paged_decode_attention_rope", k->dimensions(),
                                        k_scale->dimensions(), k_scale->element_count(),
                                        v_scale->element_count());
  if (error.failure()) return error;
  return RopeWriteImpl<int8_t>(pool, qkv, cos, sin, layer, page_table, q_pos, kv_lens, out, k,
                               v, k_scale->typed_data(), v_scale->typed_data(), scale, softcap,
                               window);
}

}  // namespace

xlrt::AttentionPlan xlrt::plan_attention(const AttentionArgs& a, bool int8) {
  const Shape& d = a.d;
  AttentionPlan p;
  p.a = a;
  p.int8 = int8;
  p.pairs = d.B * d.KVH;
  p.per = std::max<int64_t>(kChunkTokens / d.PS, 1);  // pages per range
  p.splits = std::max<int64_t>((d.W + p.per - 1) / p.per, 1);
  p.stride = (d.N / d.KVH) * d.T * (d.H + 2);  // m, l, acc per item
  return p;
}

void xlrt::attention_item(const AttentionPlan& p, float* part, AttentionCounts& counts,
                          int64_t item, float* out) {
  const Shape& d = p.a.d;
  const int64_t R = (d.N / d.KVH) * d.T;
  const int64_t pair = item / p.splits, sp = item % p.splits;
  float* m = part + item * p.stride;
  const auto run = p.int8 ? attend<int8_t> : attend<float>;
  run(p.a, pair / d.KVH, pair % d.KVH, sp * p.per, (sp + 1) * p.per, m, m + R, m + 2 * R);
  // acq_rel: the last one sees every other item's parts of the pair
  if (counts.left[pair].fetch_sub(1, std::memory_order_acq_rel) == 1) {
    merge_pair(p, part, pair, out);
  }
}

ffi::Error xlrt::check_rope_attention(const std::string& name, Dims qkv, Dims cos, Dims sin,
                                      Dims k, Dims v, ffi::Buffer<ffi::S32> layer,
                                      ffi::Buffer<ffi::S32> page_table,
                                      ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_lens,
                                      float scale, float softcap, int64_t window,
                                      AttentionArgs* a) {
  if (qkv.size() != 4 || k.size() != 5 || qkv[2] <= 2 * k[1]) {
    return ffi::Error::InvalidArgument(
        name + ": qkv must be [B, T, N + 2 KVH, H] (each token's query heads, then its new key "
        "heads and value heads) with N > 0, and the caches [L, KVH, P, PS, H]");
  }
  // The queries' shape [B, T, N, H]
  const std::vector<int64_t> q = {qkv[0], qkv[1], qkv[2] - 2 * k[1], qkv[3]};
  ffi::Error error = CheckShapes(name, q, k, v, page_table.dimensions(), q_pos.dimensions(),
                                 kv_lens.dimensions(), q, &a->d);
  if (error.failure()) return error;
  const Shape& d = a->d;
  if (d.H % 2 != 0 || cos.size() != 3 || sin.size() != 3 || cos[0] != d.B || cos[1] != d.T ||
      cos[2] != d.H / 2 || !(sin == cos)) {
    return ffi::Error::InvalidArgument(name + ": cos and sin must be [B, T, H / 2], H even");
  }
  // Also every page the new tokens go to: they lie below kv_lens.
  return ReadPaging(name, layer, page_table, q_pos, kv_lens, scale, softcap, window, a);
}

ffi::Error xlrt::check_scales(const std::string& name, Dims kd, Dims sd, int64_t k_scales,
                              int64_t v_scales) {
  if (kd.size() != 5 || sd.size() != 5 || sd[0] != kd[0] || sd[1] != kd[1] || sd[2] != kd[2] ||
      sd[3] != 1 || sd[4] != kd[3] || v_scales != k_scales) {
    return ffi::Error::InvalidArgument(name + ": int8 cache scales must be [L, KVH, P, 1, PS]");
  }
  return ffi::Error::Success();
}


XLA_FFI_DEFINE_HANDLER_SYMBOL(XlrtPagedDecodeF32, F32Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k cache
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlrtPagedDecodeInt8, Int8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::S8>>()   // k cache
                                  .Arg<ffi::Buffer<ffi::S8>>()   // v cache
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k scales
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v scales
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window"));

// The cache operands (k, v and an int8 cache's scales) are aliased to the results of the same
// name (cpu_ffi.paged_decode_attention_rope): the kernel reads and writes the result buffers.
XLA_FFI_DEFINE_HANDLER_SYMBOL(XlrtPagedDecodeRopeF32, RopeF32Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q | k | v, not rotated
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos [B, T, H / 2]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k cache (aliased)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v cache (aliased)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Ret<ffi::Buffer<ffi::F32>>()  // attention output
                                  .Ret<ffi::Buffer<ffi::F32>>()  // k cache
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v cache
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlrtPagedDecodeRopeInt8, RopeInt8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q | k | v, not rotated
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos [B, T, H / 2]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin
                                  .Arg<ffi::Buffer<ffi::S8>>()   // k cache (aliased)
                                  .Arg<ffi::Buffer<ffi::S8>>()   // v cache (aliased)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k scales (aliased)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v scales (aliased)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Ret<ffi::Buffer<ffi::F32>>()  // attention output
                                  .Ret<ffi::Buffer<ffi::S8>>()   // k cache
                                  .Ret<ffi::Buffer<ffi::S8>>()   // v cache
                                  .Ret<ffi::Buffer<ffi::F32>>()  // k scales
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v scales
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window"));

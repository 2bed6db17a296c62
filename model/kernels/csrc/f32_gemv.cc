// xlrt CPU kernel: float32 matrix-vector products of decode, y[M, N] = x[M, K] @ w[K, N] for up
// to four rows, called from XLA programs through the FFI.
//
// At batch 1 a decode step streams every weight once, so its speed is the rate at which the
// matmuls read memory. XLA:CPU splits a GEMV over output columns: for the layers whose output is
// narrow (the attention output and MLP down projections, N = d_model) each thread then reads a
// slice of every weight row, and those GEMVs ran at about 17 GB/s where wide ones reach 24-27
// (docs/PERFORMANCE.md). This kernel splits over K instead: each work item streams a contiguous
// block of weight rows (whole rows, or ranges of up to 1024 columns of wider ones) into partial
// sums (in L1), and the partial sums are added in a fixed order at the end, so the result does
// not depend on which thread ran what.
// Float sums run in another order than XLA's: results agree to float rounding, not bits.
//
// Plain loops that the compiler vectorizes (-O3 -march=native): one source for every CPU.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "parallel.h"

namespace {

using xlrt::parallel_for;

constexpr int64_t kRowsPerItem = 64;  // weight rows (k) per work item
constexpr int64_t kMaxRows = 4;       // x rows handled per call
constexpr int64_t kMaxCols = 1024;    // output columns per work item

// part[m, 0:width] = sum over k in [k0, k1) of x[m, k] * w[k, n0:n0 + width], four weight rows
// per pass; part rows are `width` apart.
void accumulate(const float* x, const float* w, float* part, int64_t M, int64_t K, int64_t N,
                int64_t k0, int64_t k1, int64_t n0, int64_t width) {
  std::fill(part, part + M * width, 0.0f);
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const float* w0 = w + k * N + n0;
    const float* w1 = w0 + N;
    const float* w2 = w1 + N;
    const float* w3 = w2 + N;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K + k;
      const float a0 = xm[0], a1 = xm[1], a2 = xm[2], a3 = xm[3];
      float* p = part + m * width;
      for (int64_t j = 0; j < width; ++j)
        p[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j];
    }
  }
  for (; k < k1; ++k) {
    const float* wk = w + k * N + n0;
    for (int64_t m = 0; m < M; ++m) {
      const float a = x[m * K + k];
      float* p = part + m * width;
      for (int64_t j = 0; j < width; ++j) p[j] += a * wk[j];
    }
  }
}

ffi::Error F32GemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  int64_t M, K, N;
  ffi::Error error = xlrt::check_f32_matmul("xlrt_f32_gemv", x.dimensions(), w.dimensions(),
                                            y->dimensions(), false, &M, &K, &N);
  if (error.failure()) return error;
  if (M > kMaxRows) {
    return ffi::Error::InvalidArgument("xlrt_f32_gemv: at most " + std::to_string(kMaxRows) +
                                       " rows");
  }
  float* yp = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  // Items: blocks of kRowsPerItem weight rows times column ranges of at most kMaxCols.
  const int64_t kblocks = std::max<int64_t>((K + kRowsPerItem - 1) / kRowsPerItem, 1);
  const int64_t ranges = (N + kMaxCols - 1) / kMaxCols;
  const int64_t cols = (N + ranges - 1) / ranges;
  std::vector<float> part(kblocks * M * N);  // [kblock, range][M, width]
  parallel_for(pool, kblocks * ranges, [&](int64_t i) {
    const int64_t kb = i / ranges, r = i % ranges;
    const int64_t k0 = kb * kRowsPerItem, k1 = std::min(K, k0 + kRowsPerItem);
    const int64_t n0 = r * cols, width = std::min(N, n0 + cols) - n0;
    accumulate(xp, wp, part.data() + kb * M * N + M * n0, M, K, N, k0, k1, n0, width);
  });
  for (int64_t r = 0; r < ranges; ++r) {
    const int64_t n0 = r * cols, width = std::min(N, n0 + cols) - n0;
    for (int64_t m = 0; m < M; ++m) {
      float* yr = yp + m * N + n0;
      std::memcpy(yr, part.data() + M * n0 + m * width, width * sizeof(float));
      for (int64_t kb = 1; kb < kblocks; ++kb) {
        const float* p = part.data() + kb * M * N + M * n0 + m * width;
        for (int64_t j = 0; j < width; ++j) yr[j] += p[j];
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlrtF32Gemv, F32GemvImpl,
                              xlrt::F32MatmulBinding());

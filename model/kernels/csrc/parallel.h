// Shared by the xlrt CPU kernels (int8_matmul.cc, paged_attention.cc, f32_nk.cc, f32_gemv.cc,
// f32_gemm.cc): work sharing over XLA's intra-op thread pool, and the float32 matmuls' FFI
// signature.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace xlrt {

// run() on the calling thread and threads - 1 others, then waits while outstanding().
template <typename Run, typename Outstanding>
void fork_join(ffi::ThreadPool& pool, int64_t threads, const Run& run,
               const Outstanding& outstanding) {
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([run]() { run(); });
  run();
  while (outstanding()) std::this_thread::yield();
}

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
  // Only tiles that were taken are outstanding: each is running on some thread right now.
  fork_join(pool, threads, run,
            [&] { return shared->done.load(std::memory_order_acquire) < items; });
}

// Where a claim that starts at `at` of work ending at `end` ends: `grain` items, or with `guided`
// max(grain, remaining / (2 * threads)) rounded up to a multiple of grain (as parallel_ranges).
inline int64_t claim_end(int64_t at, int64_t end, int64_t grain, bool guided, int64_t threads) {
  const int64_t want = guided ? std::max(grain, (end - at) / (2 * threads)) : grain;
  return std::min(end, at + (want + grain - 1) / grain * grain);
}

// Runs work(n0, n1) over the ranges of [0, n) on the calling thread and up to `threads - 1`
// pool tasks. Ranges shrink as the work runs out (guided self-scheduling): each claim takes
// max(grain, remaining / (2 * threads)) rounded up to a multiple of grain, so every thread first
// reads one long contiguous stretch (the hardware prefetcher stays on one stream) and the last
// claims are one grain each (the threads finish together).
inline void parallel_ranges(ffi::ThreadPool& pool, int64_t n, int64_t grain,
                            const std::function<void(int64_t, int64_t)>& work) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1),
                                            (n + grain - 1) / grain);
  if (threads <= 1) {
    if (n > 0) work(0, n);
    return;
  }
  auto shared = std::make_shared<Shared>();
  const std::function<void(int64_t, int64_t)>* fn = &work;
  auto run = [shared, fn, n, grain, threads]() {
    int64_t n0 = shared->next.load(std::memory_order_relaxed);
    while (n0 < n) {
      const int64_t n1 = claim_end(n0, n, grain, true, threads);
      if (!shared->next.compare_exchange_weak(n0, n1, std::memory_order_relaxed)) continue;
      (*fn)(n0, n1);
      shared->done.fetch_add(n1 - n0, std::memory_order_release);
      n0 = shared->next.load(std::memory_order_relaxed);
    }
  };
  fork_join(pool, threads, run, [&] { return shared->done.load(std::memory_order_acquire) < n; });
}

// ---- Teams: the threads of one kernel call running several dependent steps ------------------
//
// A kernel that runs several dependent steps (decode_layer.cc: a whole decoder layer) forks once
// over XLA's pool instead of once per step: every member of the team runs the same program, each
// step's work items are shared out by atomic claims, and no member starts a step before all have
// finished the one before. A member done early reserves its first claim of the next step and
// prefetches that claim's weights while it waits, so the wait (the threads never finish a step
// together: the last claims end apart) still feeds the memory stream. Measured against a
// fork/join per step: 0.983-0.988x the float32 batch-1 decode step (docs/PERFORMANCE.md, session
// 20): what a fork/join costs is mostly that same uneven finish, not the start of the task.
//
// Helpers are pool tasks and may start late, or only after the caller has finished: a helper
// joins at the step the team is on (it skips the earlier steps' work) and a barrier counts only
// the members that have joined. So the caller never waits for a helper that has not started,
// and the program completes on the calling thread alone when no pool thread comes.

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until done(), pausing; past a few thousand rounds (tens of microseconds) it yields the
// core, so a waiting member does not starve the one it waits for when threads outnumber cores.
template <typename Done>
void spin_until(const Done& done) {
  for (int64_t round = 0; !done(); ++round) {
    if (round < 4096) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
}

struct TeamState {
  // bit 63: closed (the caller has finished; late helpers return at once); bits 32-62: the step
  // the team is on; bits 16-31: members joined and not left; bits 0-15: members arrived at this
  // step's barrier. One word, so that joining, arriving and releasing are each one atomic change.
  static constexpr uint64_t kMember = uint64_t{1} << 16, kStep = uint64_t{1} << 32;
  static constexpr uint64_t kClosed = uint64_t{1} << 63;
  std::atomic<uint64_t> word{kMember};  // step 0, the caller
  // Work claims: step s's items are [base_s, base_s + n_s) of one counter that only grows (each
  // member knows base_s: the sum of the earlier steps' item counts).
  std::atomic<int64_t> next{0};
  static int64_t step(uint64_t w) { return static_cast<int64_t>((w & ~kClosed) >> 32); }
  static int64_t members(uint64_t w) { return static_cast<int64_t>((w >> 16) & 0xffff); }
  static int64_t arrived(uint64_t w) { return static_cast<int64_t>(w & 0xffff); }
};

// One thread's view of its team: every member makes the same sequence of ranges() calls.
class TeamMember {
 public:
  TeamMember(TeamState* state, int64_t first_step, int64_t threads)
      : s_(state), first_(first_step), threads_(threads) {}

  // One step: work(i0, i1) over claimed ranges of [0, n). Claims are `grain` items, or with
  // `guided` runs that shrink as the work runs out (claim_end). No member starts a step's work
  // before every member has finished the step before: a member that is done early reserves its
  // first claim of this step, and while it waits for the others it prefetches that claim's
  // memory, `bytes` per item from `memory` (the step's weight rows; null: none), so the time is
  // not lost to the memory stream. prepare() runs once on each member before its first claim of
  // the step (per-thread work its items share, such as the norm of the step's input); a member
  // that claims nothing skips it.
  template <typename Prepare, typename Work>
  void ranges(int64_t n, int64_t grain, bool guided, const void* memory, int64_t bytes,
              const Prepare& prepare, const Work& work) {
    const int64_t base = base_, end = base_ + n;
    base_ = end;
    const int64_t step = step_++;
    if (step < first_) return;  // joined later: this step is done
    int64_t i0, i1;
    bool prepared = false;
    if (step > first_) {  // others may still be in the step before
      const bool reserved = claim(end, grain, guided, &i0, &i1);
      const char* from = reserved && memory ? static_cast<const char*>(memory) +
                                                  (i0 - base) * bytes : nullptr;
      arrive_and_wait(from, from ? std::min((i1 - i0) * bytes, kPrefetchBytes) : 0);
      if (reserved) {
        prepare();
        prepared = true;
        work(i0 - base, i1 - base);
      }
    }
    while (claim(end, grain, guided, &i0, &i1)) {
      if (!prepared) {
        prepare();
        prepared = true;
      }
      work(i0 - base, i1 - base);
    }
  }

  // One step of single items: work(i) for i < n, one claim each.
  template <typename Work>
  void each(int64_t n, const Work& work) {
    ranges(n, 1, false, nullptr, 0, [] {}, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) work(i);
    });
  }

 private:
  // At most this much of a reserved claim is prefetched (into L2) while waiting.
  static constexpr int64_t kPrefetchBytes = 256 * 1024;

  // Claims the next run of this step's items (the counter's [.., end)) into [*i0, *i1).
  bool claim(int64_t end, int64_t grain, bool guided, int64_t* i0, int64_t* i1) {
    int64_t at = s_->next.load(std::memory_order_relaxed);
    while (at < end) {
      const int64_t to = claim_end(at, end, grain, guided, threads_);
      if (s_->next.compare_exchange_weak(at, to, std::memory_order_relaxed)) {
        *i0 = at;
        *i1 = to;
        return true;
      }
    }
    return false;
  }

  // The barrier: counts this member in; the last of the members to arrive moves the team to the
  // next step, the others wait for that, prefetching [from, from + bytes) meanwhile.
  void arrive_and_wait(const char* from, int64_t bytes) {
    uint64_t w = s_->word.load(std::memory_order_acquire);
    uint64_t update;
    bool last;
    do {
      last = TeamState::arrived(w) + 1 == TeamState::members(w);
      update = last ? (w & ~uint64_t{0xffff}) + TeamState::kStep : w + 1;
    } while (!s_->word.compare_exchange_weak(w, update, std::memory_order_acq_rel,
                                             std::memory_order_acquire));
    if (last) return;
    const int64_t step = TeamState::step(w);
    int64_t at = 0;
    spin_until([&] {
      if (TeamState::step(s_->word.load(std::memory_order_acquire)) != step) return true;
      for (int i = 0; i < 8 && at < bytes; ++i, at += 64) __builtin_prefetch(from + at, 0, 2);
      return false;
    });
  }

  TeamState* s_;
  int64_t first_, threads_;
  int64_t step_ = 0, base_ = 0;
};

// Runs program(member) on the calling thread and up to `threads - 1` pool tasks as one team
// (above); returns when the program is done and no helper is still inside it.
template <typename Program>
void run_team(ffi::ThreadPool& pool, int64_t threads, const Program& program) {
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, 0xffff));
  auto state = std::make_shared<TeamState>();
  const Program* fn = &program;  // valid while a helper is a member: the caller waits for it
  for (int64_t t = 1; t < threads; ++t) {
    pool.Schedule([state, fn, threads]() {
      uint64_t w = state->word.load(std::memory_order_acquire);
      do {
        if (w & TeamState::kClosed) return;
      } while (!state->word.compare_exchange_weak(w, w + TeamState::kMember,
                                                  std::memory_order_acq_rel,
                                                  std::memory_order_acquire));
      TeamMember member(state.get(), TeamState::step(w), threads);
      (*fn)(member);
      state->word.fetch_sub(TeamState::kMember, std::memory_order_release);
    });
  }
  TeamMember member(state.get(), 0, threads);
  program(member);
  state->word.fetch_or(TeamState::kClosed, std::memory_order_acq_rel);
  spin_until([&] {
    return TeamState::members(state->word.load(std::memory_order_acquire)) == 1;
  });
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

// ---- Work fused around a decode matmul y = x @ w (cpu_ffi.fused_matmul) ----------------------
//
// Around each layer matmul of a decode step the model otherwise runs small XLA ops: RMSNorm before
// the q|k|v and gate|up projections, silu(gate) * up before the down projection, the weight's
// per-channel scale and the residual add after the attention output and down projections. Each
// is a separate pass over a few hundred to a few thousand floats; on the CPU together ~6% of a
// weight-only int8 batch-1 step. The fused entries do them in the kernel call: the prologue once
// per call on the calling thread (M x K values), the epilogue on each work item's outputs.

enum Prologue : int64_t {
  kNoPrologue = 0,
  // x * rsqrt(mean(x^2) + eps) * weight (weight [K]), as model.layers.RMSNorm.
  kRmsNorm = 1,
  // x [M, 2K] holds gate | up (times `weight` [2K] if given: a quantized projection's scale):
  // silu(gate) * up, as model.layers.MLP.
  kSiluMul = 2,
};

struct Fusion {
  int64_t prologue = kNoPrologue;
  const float* weight = nullptr;     // the norm's weight, or the gate | up scale (null: none)
  float eps = 0.0f;
  const float* col_scale = nullptr;  // [N]: y * col_scale (null: none)
  const float* residual = nullptr;   // [M, N]: residual + y (null: none)
};

// sum of v[k]^2 over k < n: 16 partial sums the compiler vectorizes, then added in order.
inline float sum_squares(const float* v, int64_t n) {
  float lanes[16] = {};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += v[k + j] * v[k + j];
  float sum = 0.0f;
  for (int j = 0; j < 16; ++j) sum += lanes[j];
  for (; k < n; ++k) sum += v[k] * v[k];
  return sum;
}

// exp(x) for x <= 0, written so the compiler vectorizes loops that call it (a call to expf per
// value would not be): 2^k * exp(r) with k = round(x / ln2), |r| <= ln2 / 2, exp(r) a degree-6
// Taylor polynomial (relative error < 2e-7); below -87, where exp underflows, exp(-87).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float k = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return p * two_k;
}

// out[i] = silu(g) * u with g = gate[i] (* gate_scale[i]), u = up[i] (* up_scale[i]) and
// silu(g) = g / (1 + exp(-g)), from e = exp(-|g|), so that it vectorizes (kScaled a template
// argument: a null test inside the loop kept GCC to scalar code, 40x slower).
template <bool kScaled>
void silu_mul(const float* gate, const float* up, const float* gate_scale,
              const float* up_scale, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = kScaled ? gate[i] * gate_scale[i] : gate[i];
    const float u = kScaled ? up[i] * up_scale[i] : up[i];
    const float e = exp_nonpositive(-std::fabs(g));
    const float sigmoid = g >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
    out[i] = g * sigmoid * u;
  }
}

// The rows the matmul multiplies: x itself, or the prologue's result in `scratch` (x [M, Kx]
// with Kx = K, or 2K for kSiluMul).
inline const float* run_prologue(const Fusion& f, const float* x, int64_t M, int64_t K,
                                 std::vector<float>& scratch) {
  if (f.prologue == kNoPrologue) return x;
  // 64-byte aligned, as XLA's buffers: the kernels' unaligned vector loads then never split a
  // cache line.
  scratch.resize(M * K + 16);
  float* rows = scratch.data() + (16 - reinterpret_cast<uintptr_t>(scratch.data()) / 4 % 16) % 16;
  for (int64_t m = 0; m < M; ++m) {
    float* out = rows + m * K;
    if (f.prologue == kRmsNorm) {
      const float* xm = x + m * K;
      const float inv = 1.0f / std::sqrt(sum_squares(xm, K) / static_cast<float>(K) + f.eps);
      for (int64_t k = 0; k < K; ++k) out[k] = xm[k] * inv * f.weight[k];
    } else {
      const float* xm = x + m * 2 * K;
      if (f.weight) {
        silu_mul<true>(xm, xm + K, f.weight, f.weight + K, out, K);
      } else {
        silu_mul<false>(xm, xm + K, nullptr, nullptr, out, K);
      }
    }
  }
  return rows;
}

// Columns n0 .. n1 of every row of y [M, N]: times col_scale, then plus residual (two roundings,
// as the separate XLA ops).
inline void run_epilogue(const Fusion& f, float* y, int64_t M, int64_t N, int64_t n0,
                         int64_t n1) {
  if (!f.col_scale && !f.residual) return;
  for (int64_t m = 0; m < M; ++m) {
    float* ym = y + m * N;
    if (f.col_scale)
      for (int64_t n = n0; n < n1; ++n) ym[n] = ym[n] * f.col_scale[n];
    if (f.residual) {
      const float* rm = f.residual + m * N;
      for (int64_t n = n0; n < n1; ++n) ym[n] = rm[n] + ym[n];
    }
  }
}

// item(i0, i1) over the outputs [n0, n1) in pieces of `rows`, each followed by the epilogue of f
// on its outputs of y [M, N] while they are in cache: what the [N, K] matmuls run per claim.
template <typename Item>
void items_with_epilogue(const Fusion& f, float* y, int64_t M, int64_t N, int64_t n0, int64_t n1,
                         int64_t rows, const Item& item) {
  for (int64_t i0 = n0; i0 < n1; i0 += rows) {
    const int64_t i1 = std::min(n1, i0 + rows);
    item(i0, i1);
    run_epilogue(f, y, M, N, i0, i1);
  }
}

// The fused entries' shapes and operands after x and w: x [M, Kx] (Kx = K, or 2K for
// kSiluMul), w [N, K] (nk) or [K, N], y [M, N] (`w_shapes` names w's in the error); then
// (weight, col_scale, residual), each empty when not used, and the attributes prologue and eps.
// Sets M, K, N and *f, or names the problem.
template <typename Dims, typename Buf>
ffi::Error read_fusion(const std::string& name, Dims xd, Dims wd, Dims yd, bool nk,
                       const std::string& w_shapes, int64_t prologue, float eps,
                       const Buf& weight, const Buf& col_scale, const Buf& residual,
                       int64_t* M, int64_t* K, int64_t* N, Fusion* f) {
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2) {
    return ffi::Error::InvalidArgument(name + ": x, w and y must be 2-D");
  }
  *M = xd[0];
  *K = nk ? wd[1] : wd[0];
  *N = nk ? wd[0] : wd[1];
  if (xd[1] != (prologue == kSiluMul ? 2 * *K : *K) || yd[0] != *M || yd[1] != *N) {
    return ffi::Error::InvalidArgument(name + ": expected x [M, K] ([M, 2K] for silu(gate) * "
                                       "up), " + w_shapes + " y [M, N]");
  }
  f->prologue = prologue;
  f->eps = eps;
  const int64_t nw = weight.element_count();
  if (prologue == kRmsNorm ? nw != *K
      : prologue == kSiluMul ? nw != 0 && nw != 2 * *K
      : prologue == kNoPrologue ? nw != 0 : true) {
    return ffi::Error::InvalidArgument(
        name + ": prologue " + std::to_string(prologue) + " (0 none, 1 RMSNorm with a weight " +
        "[K], 2 silu(gate) * up with an optional scale [2K]) got a weight of " +
        std::to_string(nw) + " values for K = " + std::to_string(*K));
  }
  if ((col_scale.element_count() != 0 && col_scale.element_count() != *N) ||
      (residual.element_count() != 0 && residual.element_count() != *M * *N)) {
    return ffi::Error::InvalidArgument(name + ": col_scale must be [N] and residual [M, N], "
                                       "or empty");
  }
  f->weight = nw ? weight.typed_data() : nullptr;
  f->col_scale = col_scale.element_count() ? col_scale.typed_data() : nullptr;
  f->residual = residual.element_count() ? residual.typed_data() : nullptr;
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

// The fused matmuls' FFI signature: (thread pool, x, w of type W, weight, col_scale, residual)
// -> y, with attributes prologue and eps (and transpose_w for the int8 ones).
template <ffi::DataType W>
auto FusedBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<ffi::F32>>()  // x
      .template Arg<ffi::Buffer<W>>()         // w
      .template Arg<ffi::Buffer<ffi::F32>>()  // the prologue's weight (or empty)
      .template Arg<ffi::Buffer<ffi::F32>>()  // col_scale [N] (or empty)
      .template Arg<ffi::Buffer<ffi::F32>>()  // residual [M, N] (or empty)
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Attr<int64_t>("prologue")
      .template Attr<float>("eps");
}

}  // namespace xlrt

// The parts of a decoder layer's decode step that decode_layer.cc runs as the steps of one team
// (parallel.h run_team): declared here, defined beside their own FFI entries in f32_nk.cc (the
// float32 [N, K] matmul), int8_matmul.cc (the weight-only int8 [N, K] one) and
// paged_attention.cc (attention with RoPE and the cache write).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "parallel.h"

namespace xlrt {

// ---- f32_nk.cc --------------------------------------------------------------------------------

// Weight rows (outputs) per work item of the float32 [N, K] matmul.
constexpr int64_t kNkItemRows = 48;

// y[m, n] = x[m] . w[n] for every row m < M and n0 <= n < n1, then the epilogue of f on those
// outputs, in work items of kNkItemRows outputs: what f32_matmul_nk's threads run on each claim,
// each output summed in that kernel's fixed order.
void f32_nk_range(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
                  int64_t n0, int64_t n1, const Fusion& f);

// ---- int8_matmul.cc ---------------------------------------------------------------------------

// Weight rows (outputs) per work item of the weight-only int8 [N, K] matmul.
constexpr int64_t kInt8NkItemRows = 64;

// y[m, n] = x[m] . float(w[n]) for every row m < M and n0 <= n < n1 (w int8 [N, K]), then the
// epilogue of f on those outputs, in work items of kInt8NkItemRows outputs: what the weight-only
// matmul's threads run on each tile of a [N, K] weight, each output summed in its fixed order.
void int8_nk_range(const float* x, const int8_t* w, float* y, int64_t M, int64_t K, int64_t N,
                   int64_t n0, int64_t n1, const Fusion& f);

// ---- paged_attention.cc -----------------------------------------------------------------------

struct AttentionShape {
  int64_t B, T, N, H;      // queries [B, T, N, H]
  int64_t L, KVH, P, PS;   // cache [L, KVH, P, PS, H]
  int64_t W;               // page table [B, W]
};

struct AttentionArgs {
  AttentionShape d;
  const float* q = nullptr;  // [B, T, N, H]; or null with qkv
  // With qkv [B, T, N + 2 KVH, H] (each token's query heads, then its new key and value heads,
  // not rotated) and cos, sin [B, T, H / 2]: the queries are qkv's, rotated, and each work item
  // first stores the rotated new keys and the values that fall in its pages (k, v and the scales
  // are then written).
  const float* qkv = nullptr;
  const float* cos = nullptr;
  const float* sin = nullptr;
  void* k = nullptr;  // [L, KVH, P, PS, H] float32 or int8
  void* v = nullptr;
  float* k_scale = nullptr;  // int8 cache: [L, KVH, P, 1, PS]; null for float
  float* v_scale = nullptr;
  int64_t layer = 0;
  const int32_t* page_table = nullptr;
  const int32_t* q_pos = nullptr;
  const int32_t* kv_lens = nullptr;
  float scale = 1.0f, softcap = 0.0f;  // softcap 0: none
  int64_t window = 0;                  // 0: none
};

// Attention as work items: pairs (sequence, kv head) times splits (fixed ranges of their pages);
// each item keeps stride floats of partial results (running max, sum and weighted values per
// query row), and the last of a pair's items to finish merges them into the pair's outputs.
struct AttentionPlan {
  AttentionArgs a;
  bool int8 = false;
  int64_t pairs = 0, splits = 0, per = 0, stride = 0;
  int64_t items() const { return pairs * splits; }
  int64_t part_floats() const { return items() * stride; }
};

AttentionPlan plan_attention(const AttentionArgs& a, bool int8);

// Per pair, its items not yet finished (start: splits each).
struct AttentionCounts {
  explicit AttentionCounts(const AttentionPlan& p) : left(new std::atomic<int64_t>[p.pairs]) {
    for (int64_t i = 0; i < p.pairs; ++i) left[i].store(p.splits, std::memory_order_relaxed);
  }
  std::unique_ptr<std::atomic<int64_t>[]> left;
};

// Work item `item`: its partial results into part; if it is the last of its pair to finish,
// then the pair's rows of out [B, T, N, H] from the parts of all its splits.
void attention_item(const AttentionPlan& p, float* part, AttentionCounts& counts, int64_t item,
                    float* out);

// The rope entry's checks: qkv [B, T, N + 2 KVH, H], cos and sin [B, T, H / 2], the caches, the
// paging operands and attributes (`name`: the FFI target, for the messages). Sets *a's shape and
// paging fields (not its pointers to qkv, cos, sin and the caches).
ffi::Error check_rope_attention(const std::string& name, ffi::Span<const int64_t> qkv,
                                ffi::Span<const int64_t> cos, ffi::Span<const int64_t> sin,
                                ffi::Span<const int64_t> k, ffi::Span<const int64_t> v,
                                ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> page_table,
                                ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_lens,
                                float scale, float softcap, int64_t window, AttentionArgs* a);
// An int8 cache's scales: k_scale [L, KVH, P, 1, PS] for k [L, KVH, P, PS, H], v_scale as many.
ffi::Error check_scales(const std::string& name, ffi::Span<const int64_t> k,
                        ffi::Span<const int64_t> k_scale, int64_t k_scales, int64_t v_scales);

}  // namespace xlrt

// xlrt CPU kernel: one whole decoder layer of a decode step with float32 rows in one FFI call,
// its steps run by one team of threads (parallel.h run_team) instead of a fork/join over XLA's
// pool per kernel call.
//
// x [M, D] (M = B x T rows: B sequences of T query tokens) goes through the layer of
// model/layers.py Block with fused projections and [N, K] weights, float32 or int8 (weight-only,
// each projection with its per-output-channel scale s_*; for float32 weights the scales are
// empty and the products below are not scaled):
//   1. qkv = (rms_norm(x) @ w_qkv^T) * s_qkv             (each member normalizes x for itself)
//   2. RoPE, the new keys and values into the cache, attention over the paged cache, per
//      (sequence, kv head, page range) item; the last item of a (sequence, kv head) to finish
//      merges its items' partial results
//   3. x1 = x + (attn @ w_o^T) * s_o
//   4. gate_up = rms_norm(x1) @ w_gate_up^T
//   5. out = x1 + ((silu(gate * s_gate) * up * s_up) @ w_down^T) * s_down
//                                                        (each member forms silu(gate) * up)
// Each step's outputs are shared out as the standalone kernels share theirs, and every step
// runs the code of its standalone entry (f32_nk.cc or int8_matmul.cc, paged_attention.cc,
// parallel.h's prologue and epilogue) with the same order of operations per output: the results
// are bit for bit those of the five separate fused calls (tests/model/test_decode_layer.py).
// Only the threads meet at a barrier between steps instead of forking and joining five times.

#include <string>
#include <type_traits>
#include <vector>

#include "layer_parts.h"

namespace {

bool is_shape(ffi::Span<const int64_t> d, std::initializer_list<int64_t> want) {
  return d.size() == want.size() && std::equal(want.begin(), want.end(), d.begin());
}

// The four projections' weights, float32 or int8, and with int8 their scales (else null).
struct Projections {
  ffi::AnyBuffer qkv, o, gate_up, down;
  ffi::Buffer<ffi::F32> s_qkv, s_o, s_gate_up, s_down;
};

// Outputs n0 .. n1 of rows x [M, K] against w [N, K] with the epilogue of f: the standalone
// matmul's code for W (float32 or int8 weights).
template <typename W>
void nk_range(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0,
              int64_t n1, const xlrt::Fusion& f) {
  if constexpr (std::is_same_v<W, float>) {
    xlrt::f32_nk_range(x, w, y, M, K, N, n0, n1, f);
  } else {
    xlrt::int8_nk_range(x, w, y, M, K, N, n0, n1, f);
  }
}

// The team's program over checked operands (LayerImpl). W: the weights' element type.
template <typename W>
void run_layer(ffi::ThreadPool& pool, const xlrt::AttentionArgs& args, bool int8_cache,
               const float* xp, const float* attn_norm, const float* mlp_norm,
               const Projections& p, float eps, float* y, int64_t M, int64_t D, int64_t Q,
               int64_t NH, int64_t F) {
  xlrt::AttentionPlan plan = xlrt::plan_attention(args, int8_cache);
  // The call's intermediate results, shared by the team: in a buffer of the calling thread kept
  // from call to call (a heap allocation per call cost several microseconds here), each part
  // 64-byte aligned as XLA's buffers are (the kernels' vector loads then never split a line).
  float *qkv, *attn, *x1, *gate_up, *part;
  {
    auto padded = [](int64_t n) { return (n + 15) / 16 * 16; };
    const int64_t sizes[5] = {padded(M * Q), padded(M * NH), padded(M * D), padded(M * 2 * F),
                              padded(plan.part_floats())};
    int64_t total = 16;
    for (int64_t n : sizes) total += n;
    thread_local std::vector<float> scratch;
    if (static_cast<int64_t>(scratch.size()) < total) scratch.resize(total);
    float* at = scratch.data() + (16 - reinterpret_cast<uintptr_t>(scratch.data()) / 4 % 16) % 16;
    float** parts[5] = {&qkv, &attn, &x1, &gate_up, &part};
    for (int i = 0; i < 5; ++i) {
      *parts[i] = at;
      at += sizes[i];
    }
    std::fill(scratch.data(), scratch.data() + total, 0.0f);
  }
  plan.a.qkv = qkv;
  xlrt::AttentionCounts counts(plan);

  auto scale = [](const ffi::Buffer<ffi::F32>& s) {
    return s.element_count() ? s.typed_data() : nullptr;
  };
  xlrt::Fusion norm1, norm2, silu, residual1, residual2;
  norm1.prologue = norm2.prologue = xlrt::kRmsNorm;
  norm1.weight = attn_norm;
  norm2.weight = mlp_norm;
  norm1.eps = norm2.eps = eps;
  norm1.col_scale = scale(p.s_qkv);
  silu.prologue = xlrt::kSiluMul;
  silu.weight = scale(p.s_gate_up);  // gate | up times their scale, as the down call's prologue
  residual1.residual = xp;
  residual1.col_scale = scale(p.s_o);
  residual2.residual = x1;
  residual2.col_scale = scale(p.s_down);
  constexpr int64_t kGrain = std::is_same_v<W, float> ? xlrt::kNkItemRows : xlrt::kInt8NkItemRows;
  constexpr int64_t kBytes = sizeof(W);
  const W* wq = static_cast<const W*>(p.qkv.untyped_data());
  const W* wo = static_cast<const W*>(p.o.untyped_data());
  const W* wgu = static_cast<const W*>(p.gate_up.untyped_data());
  const W* wd = static_cast<const W*>(p.down.untyped_data());
  xlrt::run_team(pool, pool.num_threads(), [&](xlrt::TeamMember& team) {
    std::vector<float> scratch;  // this member's normalized rows, or silu(gate) * up
    const float* rows = nullptr;
    team.ranges(Q, kGrain, true, wq, D * kBytes,
                [&] { rows = xlrt::run_prologue(norm1, xp, M, D, scratch); },
                [&](int64_t i0, int64_t i1) {
                  nk_range(rows, wq, qkv, M, D, Q, i0, i1, norm1);
                });
    team.each(plan.items(), [&](int64_t i) {
      xlrt::attention_item(plan, part, counts, i, attn);
    });
    team.ranges(D, kGrain, true, wo, NH * kBytes, [] {}, [&](int64_t i0, int64_t i1) {
      nk_range(attn, wo, x1, M, NH, D, i0, i1, residual1);
    });
    team.ranges(2 * F, kGrain, true, wgu, D * kBytes,
                [&] { rows = xlrt::run_prologue(norm2, x1, M, D, scratch); },
                [&](int64_t i0, int64_t i1) {
                  nk_range(rows, wgu, gate_up, M, D, 2 * F, i0, i1, norm2);
                });
    team.ranges(D, kGrain, true, wd, F * kBytes,
                [&] { rows = xlrt::run_prologue(silu, gate_up, M, F, scratch); },
                [&](int64_t i0, int64_t i1) {
                  nk_range(rows, wd, y, M, F, D, i0, i1, residual2);
                });
  });
}

template <typename CacheBuf>
ffi::Error LayerImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                     ffi::Buffer<ffi::F32> attn_norm, ffi::Buffer<ffi::F32> mlp_norm,
                     const Projections& p, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                     ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> page_table,
                     ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_lens,
                     ffi::ResultBuffer<ffi::F32> out, CacheBuf k, CacheBuf v, float* k_scale,
                     float* v_scale, bool int8_cache, float eps, float scale, float softcap,
                     int64_t window) {
  const std::string name = "xlrt_decode_layer";
  const auto xd = x.dimensions(), qd = p.qkv.dimensions(), od = p.o.dimensions();
  const auto gd = p.gate_up.dimensions(), dd = p.down.dimensions(), kd = k->dimensions();
  const auto td = page_table.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || od.size() != 2 || gd.size() != 2 || dd.size() != 2 ||
      kd.size() != 5 || td.size() != 2) {
    return ffi::Error::InvalidArgument(
        name + ": x, w_qkv, w_o, w_gate_up, w_down and page_table must be 2-D and the caches "
        "[L, KVH, P, PS, H]");
  }
  const ffi::DataType wt = p.qkv.element_type();
  if ((wt != ffi::DataType::F32 && wt != ffi::DataType::S8) || p.o.element_type() != wt ||
      p.gate_up.element_type() != wt || p.down.element_type() != wt) {
    return ffi::Error::InvalidArgument(
        name + ": w_qkv, w_o, w_gate_up and w_down must all be float32 or all int8");
  }
  const int64_t M = xd[0], D = xd[1], Q = qd[0], F = dd[1], B = td[0], H = kd[4];
  if (B <= 0 || M % B != 0 || H <= 0 || Q % H != 0) {
    return ffi::Error::InvalidArgument(
        name + ": x must hold T query tokens of each of the page table's B sequences, and w_qkv "
        "whole heads of the cache's head_dim");
  }
  const int64_t T = M / B;
  xlrt::AttentionArgs a;
  ffi::Error error = xlrt::check_rope_attention(
      name, std::vector<int64_t>{B, T, Q / H, H}, cos.dimensions(), sin.dimensions(), kd,
      v->dimensions(), layer, page_table, q_pos, kv_lens, scale, softcap, window, &a);
  if (error.failure()) return error;
  const int64_t NH = a.d.N * H;
  if (!is_shape(qd, {Q, D}) || !is_shape(od, {D, NH}) || !is_shape(gd, {2 * F, D}) ||
      !is_shape(dd, {D, F}) || !is_shape(attn_norm.dimensions(), {D}) ||
      !is_shape(mlp_norm.dimensions(), {D}) || !is_shape(out->dimensions(), {M, D})) {
    return ffi::Error::InvalidArgument(
        name + ": expected x [M, D], attn_norm [D], w_qkv [(N + 2 KVH) H, D], w_o [D, N H], "
        "mlp_norm [D], w_gate_up [2 F, D], w_down [D, F] and out [M, D] (weights [N, K], output "
        "channel first)");
  }
  const bool int8 = wt == ffi::DataType::S8;
  const int64_t scales[4] = {p.s_qkv.element_count(), p.s_o.element_count(),
                             p.s_gate_up.element_count(), p.s_down.element_count()};
  if (int8 ? scales[0] != Q || scales[1] != D || scales[2] != 2 * F || scales[3] != D
           : scales[0] || scales[1] || scales[2] || scales[3]) {
    return ffi::Error::InvalidArgument(
        name + (int8 ? ": int8 weights need their scales s_qkv [(N + 2 KVH) H], s_o [D], "
                       "s_gate_up [2 F] and s_down [D]"
                     : ": float32 weights take empty scales"));
  }
  if (M == 0) return ffi::Error::Success();
  a.cos = cos.typed_data();
  a.sin = sin.typed_data();
  a.k = k->untyped_data();
  a.v = v->untyped_data();
  a.k_scale = k_scale;
  a.v_scale = v_scale;
  if (int8) {
    run_layer<int8_t>(pool, a, int8_cache, x.typed_data(), attn_norm.typed_data(),
                      mlp_norm.typed_data(), p, eps, out->typed_data(), M, D, Q, NH, F);
  } else {
    run_layer<float>(pool, a, int8_cache, x.typed_data(), attn_norm.typed_data(),
                     mlp_norm.typed_data(), p, eps, out->typed_data(), M, D, Q, NH, F);
  }
  return ffi::Error::Success();
}

ffi::Error LayerF32Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> attn_norm, ffi::AnyBuffer w_qkv,
                        ffi::AnyBuffer w_o, ffi::Buffer<ffi::F32> mlp_norm,
                        ffi::AnyBuffer w_gate_up, ffi::AnyBuffer w_down,
                        ffi::Buffer<ffi::F32> s_qkv, ffi::Buffer<ffi::F32> s_o,
                        ffi::Buffer<ffi::F32> s_gate_up, ffi::Buffer<ffi::F32> s_down,
                        ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                        ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                        ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> page_table,
                        ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_lens,
                        ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> k,
                        ffi::ResultBuffer<ffi::F32> v, float eps, float scale, float softcap,
                        int64_t window) {
  const Projections p{w_qkv, w_o, w_gate_up, w_down, s_qkv, s_o, s_gate_up, s_down};
  return LayerImpl(pool, x, attn_norm, mlp_norm, p, cos, sin, layer, page_table, q_pos, kv_lens,
                   out, k, v, nullptr, nullptr, false, eps, scale, softcap, window);
}

ffi::Error LayerInt8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> attn_norm, ffi::AnyBuffer w_qkv,
                         ffi::AnyBuffer w_o, ffi::Buffer<ffi::F32> mlp_norm,
                         ffi::AnyBuffer w_gate_up, ffi::AnyBuffer w_down,
                         ffi::Buffer<ffi::F32> s_qkv, ffi::Buffer<ffi::F32> s_o,
                         ffi::Buffer<ffi::F32> s_gate_up, ffi::Buffer<ffi::F32> s_down,
                         ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                         ffi::Buffer<ffi::S8>, ffi::Buffer<ffi::S8>, ffi::Buffer<ffi::F32>,
                         ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::S32> layer,
                         ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> q_pos,
                         ffi::Buffer<ffi::S32> kv_lens, ffi::ResultBuffer<ffi::F32> out,
                         ffi::ResultBuffer<ffi::S8> k, ffi::ResultBuffer<ffi::S8> v,
                         ffi::ResultBuffer<ffi::F32> k_scale,
                         ffi::ResultBuffer<ffi::F32> v_scale, float eps, float scale,
                         float softcap, int64_t window) {
  ffi::Error error = xlrt::check_scales("xlrt_decode_layer", k->dimensions(),
                                        k_scale->dimensions(), k_scale->element_count(),
                                        v_scale->element_count());
  if (error.failure()) return error;
  const Projections p{w_qkv, w_o, w_gate_up, w_down, s_qkv, s_o, s_gate_up, s_down};
  return LayerImpl(pool, x, attn_norm, mlp_norm, p, cos, sin, layer, page_table, q_pos, kv_lens,
                   out, k, v, k_scale->typed_data(), v_scale->typed_data(), true, eps, scale,
                   softcap, window);
}

// The layer's operands before the caches: x, attn_norm, w_qkv, w_o, mlp_norm, w_gate_up,
// w_down (float32 or int8), s_qkv, s_o, s_gate_up, s_down (the int8 weights' scales, else
// empty), cos, sin.
auto LayerHead() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

}  // namespace

// The cache operands (k, v and an int8 cache's scales) are aliased to the results of the same
// name (cpu_ffi.decode_layer): the kernel reads and writes the result buffers.
XLA_FFI_DEFINE_HANDLER_SYMBOL(XlrtDecodeLayerF32, LayerF32Impl,
                              LayerHead()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k cache (aliased)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v cache (aliased)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Ret<ffi::Buffer<ffi::F32>>()  // the layer's output [M, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // k cache
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v cache
                                  .Attr<float>("eps")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlrtDecodeLayerInt8, LayerInt8Impl,
                              LayerHead()
                                  .Arg<ffi::Buffer<ffi::S8>>()   // k cache (aliased)
                                  .Arg<ffi::Buffer<ffi::S8>>()   // v cache (aliased)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k scales (aliased)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v scales (aliased)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Ret<ffi::Buffer<ffi::F32>>()  // the layer's output [M, D]
                                  .Ret<ffi::Buffer<ffi::S8>>()   // k cache
                                  .Ret<ffi::Buffer<ffi::S8>>()   // v cache
                                  .Ret<ffi::Buffer<ffi::F32>>()  // k scales
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v scales
                                  .Attr<float>("eps")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window"));

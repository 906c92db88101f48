// oneDNN convolutions behind XLA's FFI (CPU; float32 or bfloat16 operands).
//
//   flax_resnet_onednn_forward(x[N,H,W,C], w[KH,KW,C,CO], [bias[CO]], [residual[N,OH,OW,CO]]) -> y[N,OH,OW,CO]
//     y = [relu](conv(x, w) [+ bias] [+ residual]); attributes bias, sum, relu (bools) say which. The
//     residual is oneDNN's sum post-op: the caller aliases it with y (it is added in place).
//   flax_resnet_onednn_bwd_data(g[N,OH,OW,CO], w[KH,KW,C,CO]) -> dx[N,H,W,C]
//   flax_resnet_onednn_bwd_weights(x[N,H,W,C], g[N,OH,OW,CO]) -> dw[KH,KW,C,CO]
// attributes: stride, pt, pb, pl, pr (zero padding top/bottom/left/right).
//
// Activations stay NHWC and kernels HWIO in XLA's buffers, described to oneDNN by strides; the
// kernel takes whatever layout the chosen implementation wants ("any"), reordered per call. One
// primitive (and its reorder) per shape, dtype and operation, created once and kept for the
// process; one engine per process and one stream per calling thread. Written against the C API
// of oneDNN 2.x (operation descriptors) and 3.x (primitive descriptors made directly).
// Built on first use by flax_resnet/cpu/onednn/__init__.py.
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../native/pool.h"
#include "oneapi/dnnl/dnnl.h"
#include "runtime.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace fr_onednn;

enum Op : int64_t { kForward = 0, kBwdData = 1, kBwdWeights = 2 };


// The shape, dtypes and operation one primitive serves.
struct Spec {
  int64_t op, n, h, w, c, co, kh, kw, stride, pt, pb, pl, pr;
  dnnl_data_type_t dt_x, dt_w, dt_y;  // input/g, kernel, result (forward: y, bwd_data: dx, bwd_weights: dw)
  // Forward only: the bias's dtype (undef: none), the residual added (sum post-op), a ReLU last.
  dnnl_data_type_t dt_b = dnnl_data_type_undef;
  bool sum = false, relu = false;
  int64_t oh() const { return (h + pt + pb - kh) / stride + 1; }
  int64_t ow() const { return (w + pl + pr - kw) / stride + 1; }
  std::array<int64_t, 19> key() const {
    return {op, n, h, w, c, co, kh, kw, stride, pt, pb, pl, pr, dt_x, dt_w, dt_y, dt_b, sum, relu};
  }
};

struct Primitive {
  dnnl_primitive_desc_t pd = nullptr;
  dnnl_primitive_t prim = nullptr;
  dnnl_primitive_desc_t reorder_pd = nullptr;  // HWIO -> the primitive's kernel layout, or back (bwd_weights)
  dnnl_primitive_t reorder = nullptr;
  Md x, w, y, b;  // NHWC / HWIO / [CO] as XLA holds them (x: src or diff_src, y: dst or diff_dst)
  MdRef w_prim = nullptr, scratch = nullptr, reorder_scratch = nullptr;
  size_t w_prim_bytes = 0;
};


// `w_hint`: the kernel of the forward convolution that hints the backward ones (its dtype is the
// operands', while a bfloat16 kernel gradient may be float32).
dnnl_status_t create_pd(const Spec& s, const Primitive& p, const Md& w_any, const Md& w_hint,
                        dnnl_primitive_attr_t attr, dnnl_primitive_desc_t* out) {
  const dnnl_dims_t strides = {s.stride, s.stride}, dil = {0, 0}, pad_l = {s.pt, s.pl}, pad_r = {s.pb, s.pr};
  const bool fwd = s.op == kForward;
  const MdRef bias = fwd && s.dt_b != dnnl_data_type_undef ? p.b.get() : nullptr;
#if DNNL_VERSION_MAJOR >= 3
  dnnl_primitive_desc_t hint = nullptr;
  if (!fwd) {
    dnnl_status_t st = dnnl_convolution_forward_primitive_desc_create(
        &hint, engine(), dnnl_forward_training, dnnl_convolution_direct, p.x.get(), w_hint.get(), nullptr, p.y.get(),
        strides, dil, pad_l, pad_r, nullptr);
    if (st != dnnl_success) return st;
  }
  dnnl_status_t st;
  if (fwd)
    st = dnnl_convolution_forward_primitive_desc_create(out, engine(), dnnl_forward_inference, dnnl_convolution_direct,
                                                        p.x.get(), w_any.get(), bias, p.y.get(), strides, dil,
                                                        pad_l, pad_r, attr);
  else if (s.op == kBwdData)
    st = dnnl_convolution_backward_data_primitive_desc_create(out, engine(), dnnl_convolution_direct, p.x.get(),
                                                              w_any.get(), p.y.get(), strides, dil, pad_l, pad_r, hint,
                                                              attr);
  else
    st = dnnl_convolution_backward_weights_primitive_desc_create(out, engine(), dnnl_convolution_direct, p.x.get(),
                                                                 w_any.get(), nullptr, p.y.get(), strides, dil, pad_l,
                                                                 pad_r, hint, attr);
  if (hint) dnnl_primitive_desc_destroy(hint);
  return st;
#else
  (void)dil;
  dnnl_convolution_desc_t hint_d, d;
  dnnl_primitive_desc_t hint = nullptr;
  dnnl_status_t st = dnnl_convolution_forward_desc_init(&hint_d, fwd ? dnnl_forward_inference : dnnl_forward_training,
                                                        dnnl_convolution_direct, p.x.get(), w_hint.get(), bias,
                                                        p.y.get(), strides, pad_l, pad_r);
  if (st != dnnl_success) return st;
  if (fwd) return dnnl_primitive_desc_create(out, &hint_d, attr, engine(), nullptr);
  if ((st = dnnl_primitive_desc_create(&hint, &hint_d, nullptr, engine(), nullptr)) != dnnl_success) return st;
  if (s.op == kBwdData)
    st = dnnl_convolution_backward_data_desc_init(&d, dnnl_convolution_direct, p.x.get(), w_any.get(), p.y.get(),
                                                  strides, pad_l, pad_r);
  else
    st = dnnl_convolution_backward_weights_desc_init(&d, dnnl_convolution_direct, p.x.get(), w_any.get(), nullptr,
                                                     p.y.get(), strides, pad_l, pad_r);
  if (st == dnnl_success) st = dnnl_primitive_desc_create(out, &d, attr, engine(), hint);
  dnnl_primitive_desc_destroy(hint);
  return st;
#endif
}

// Builds the primitive for `s` (nullptr and a message on failure).
std::unique_ptr<Primitive> make(const Spec& s, std::string* error) {
  auto p = std::make_unique<Primitive>();
  const dnnl_dims_t xd = {s.n, s.c, s.h, s.w}, xs = {s.h * s.w * s.c, 1, s.w * s.c, s.c};
  const dnnl_dims_t yd = {s.n, s.co, s.oh(), s.ow()}, ys = {s.oh() * s.ow() * s.co, 1, s.ow() * s.co, s.co};
  const dnnl_dims_t wd = {s.co, s.c, s.kh, s.kw}, ws = {1, s.co, s.kw * s.c * s.co, s.c * s.co};  // HWIO
  // x/y of the primitive: forward x=src (dt_x), y=dst (dt_y); bwd_data x=diff_src (dt_y), y=diff_dst (dt_x);
  // bwd_weights x=src, y=diff_dst (both dt_x).
  const dnnl_data_type_t x_dt = s.op == kBwdData ? s.dt_y : s.dt_x;
  const dnnl_data_type_t y_dt = s.op == kForward ? s.dt_y : s.dt_x;
  const dnnl_data_type_t w_dt = s.op == kBwdWeights ? s.dt_y : s.dt_w;
  const dnnl_dims_t bd = {s.co}, bs = {1};
  Md w_any, w_hint;
  dnnl_primitive_attr_t attr = nullptr, conv_attr = nullptr;  // the reorder's; the convolution's (+ post-ops)
  dnnl_status_t st = p->x.strided(4, xd, x_dt, xs);
  if (st == dnnl_success && s.dt_b != dnnl_data_type_undef) st = p->b.strided(1, bd, s.dt_b, bs);
  if (st == dnnl_success) st = p->y.strided(4, yd, y_dt, ys);
  if (st == dnnl_success) st = p->w.strided(4, wd, w_dt, ws);
  if (st == dnnl_success) st = w_any.any(4, wd, w_dt);
  if (st == dnnl_success) st = w_hint.any(4, wd, s.dt_x);
  if (st == dnnl_success) st = dnnl_primitive_attr_create(&attr);
  if (st == dnnl_success) st = dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user);
  if (st == dnnl_success) st = dnnl_primitive_attr_clone(&conv_attr, attr);
  if (st == dnnl_success) st = set_post_ops(s.sum, s.relu, conv_attr);
  if (st == dnnl_success) st = create_pd(s, *p, w_any, w_hint, conv_attr, &p->pd);
  if (st == dnnl_success) st = dnnl_primitive_create(&p->prim, p->pd);
  if (st == dnnl_success) {
    p->w_prim = dnnl_primitive_desc_query_md(p->pd, s.op == kBwdWeights ? dnnl_query_diff_weights_md
                                                                        : dnnl_query_weights_md, 0);
    p->scratch = dnnl_primitive_desc_query_md(p->pd, dnnl_query_scratchpad_md, 0);
    p->w_prim_bytes = dnnl_memory_desc_get_size(p->w_prim);
    if (!dnnl_memory_desc_equal(p->w_prim, p->w.get())) {
      st = s.op == kBwdWeights
               ? dnnl_reorder_primitive_desc_create(&p->reorder_pd, p->w_prim, engine(), p->w.get(), engine(), attr)
               : dnnl_reorder_primitive_desc_create(&p->reorder_pd, p->w.get(), engine(), p->w_prim, engine(), attr);
      if (st == dnnl_success) st = dnnl_primitive_create(&p->reorder, p->reorder_pd);
      if (st == dnnl_success) p->reorder_scratch = dnnl_primitive_desc_query_md(p->reorder_pd, dnnl_query_scratchpad_md, 0);
    }
  }
  if (attr) dnnl_primitive_attr_destroy(attr);
  if (conv_attr) dnnl_primitive_attr_destroy(conv_attr);
  if (st != dnnl_success) {
    *error = "oneDNN could not create the primitive (status " + std::to_string(static_cast<int>(st)) + ")";
    return nullptr;  // the handles leak: a failure is reported once and the shape falls back in Python
  }
  return p;
}

const Primitive* lookup(const Spec& s, std::string* error) {
  static std::mutex mu;
  static std::map<std::array<int64_t, 19>, std::unique_ptr<Primitive>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(s.key());
  if (it != cache.end()) return it->second.get();
  auto made = make(s, error);
  return made ? cache.emplace(s.key(), std::move(made)).first->second.get() : nullptr;
}


dnnl_status_t run(const dnnl_primitive_t prim, std::initializer_list<dnnl_exec_arg_t> args) {
  std::vector<dnnl_exec_arg_t> present;
  for (const auto& a : args)
    if (a.memory) present.push_back(a);
  return dnnl_primitive_execute(prim, stream(), static_cast<int>(present.size()), present.data());
}

// Reorders between XLA's HWIO kernel and the primitive's layout (to_prim: HWIO -> primitive's).
dnnl_status_t reorder(const Primitive& p, void* hwio, void* prim_layout, bool to_prim) {
  thread_local std::vector<char> scratch;
  Mem user(p.w.get(), hwio), mine(p.w_prim, prim_layout), sp(p.reorder_scratch, buffer(scratch, p.reorder_scratch));
  return run(p.reorder, {{DNNL_ARG_FROM, to_prim ? user.m : mine.m}, {DNNL_ARG_TO, to_prim ? mine.m : user.m},
                         {DNNL_ARG_SCRATCHPAD, sp.m}});
}

// One primitive call on images [n0, n0 + s.n) of the operands: a (x or g), b (w or g), out (y, dx or dw);
// `bias`: the forward's, or null.
dnnl_status_t run_chunk(const Primitive& p, const Spec& s, const char* a, const char* b, char* out, const char* bias) {
  thread_local std::vector<char> scratch;
  Mem sp(p.scratch, buffer(scratch, p.scratch));
  if (s.op == kForward) {
    Mem x(p.x.get(), const_cast<char*>(a)), w(p.w_prim, const_cast<char*>(b)), y(p.y.get(), out);
    Mem bm(bias ? p.b.get() : nullptr, const_cast<char*>(bias));
    return run(p.prim, {{DNNL_ARG_SRC, x.m}, {DNNL_ARG_WEIGHTS, w.m}, {DNNL_ARG_BIAS, bm.m}, {DNNL_ARG_DST, y.m},
                        {DNNL_ARG_SCRATCHPAD, sp.m}});
  }
  if (s.op == kBwdData) {
    Mem g(p.y.get(), const_cast<char*>(a)), w(p.w_prim, const_cast<char*>(b)), dx(p.x.get(), out);
    return run(p.prim, {{DNNL_ARG_DIFF_DST, g.m}, {DNNL_ARG_WEIGHTS, w.m}, {DNNL_ARG_DIFF_SRC, dx.m},
                        {DNNL_ARG_SCRATCHPAD, sp.m}});
  }
  Mem x(p.x.get(), const_cast<char*>(a)), g(p.y.get(), const_cast<char*>(b)), dw(p.w_prim, out);
  return run(p.prim, {{DNNL_ARG_SRC, x.m}, {DNNL_ARG_DIFF_DST, g.m}, {DNNL_ARG_DIFF_WEIGHTS, dw.m},
                      {DNNL_ARG_SCRATCHPAD, sp.m}});
}

size_t width(dnnl_data_type_t t) { return t == dnnl_f32 ? 4 : 2; }

// The batch is cut into equal chunks, one single-threaded primitive call each, spread over XLA's
// pool. Forward and input gradients: up to one chunk per thread (each image's result is the same
// whatever the chunking). Kernel gradients: a chunk count set by the batch alone (4, 2 or 1),
// each chunk's sum in its own buffer, the buffers then added in chunk order: the same bits
// whatever the thread count.
ffi::Error execute(ffi::ThreadPool& pool, const Spec& whole, const void* a, const void* b, void* out,
                   const void* bias = nullptr) {
  OneThread single;
  if (!engine() || !stream()) return ffi::Error::Internal("flax_resnet onednn: no CPU engine");
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t chunks = whole.op == kBwdWeights ? 4 : std::min(threads, whole.n);
  while (whole.n % chunks != 0) --chunks;
  Spec s = whole;
  s.n = whole.n / chunks;
  std::string error;
  const Primitive* p = lookup(s, &error);
  if (!p) return ffi::Error::Internal("flax_resnet onednn: " + error);
  // Bytes per image of the primitive's a and b operands.
  const size_t in_image = s.h * s.w * s.c, out_image = s.oh() * s.ow() * s.co;
  const size_t a_step = (s.op == kBwdData ? out_image : in_image) * width(s.dt_x);
  const size_t b_step = s.op == kBwdWeights ? out_image * width(s.dt_x) : 0;
  const size_t out_step = s.op == kForward ? out_image * width(s.dt_y) : s.op == kBwdData ? in_image * width(s.dt_y) : 0;
  std::vector<char> weights;  // the kernel in the primitive's layout (forward, bwd_data) or the partial sums
  const char* w = static_cast<const char*>(b);
  dnnl_status_t st = dnnl_success;
  if (s.op != kBwdWeights && p->reorder) {
    weights.resize(p->w_prim_bytes);
    st = reorder(*p, const_cast<void*>(b), weights.data(), true);
    w = weights.data();
  }
  const bool direct = s.op == kBwdWeights && chunks == 1 && !p->reorder;
  if (s.op == kBwdWeights && !direct) weights.assign(chunks * p->w_prim_bytes, 0);
  std::atomic<int> failed{dnnl_success};
  if (st == dnnl_success) {
    fr::parallel_for(pool, chunks, [&](int64_t k) {
      OneThread single_here;
      const char* ak = static_cast<const char*>(a) + k * s.n * a_step;
      const char* bk = s.op == kBwdWeights ? static_cast<const char*>(b) + k * s.n * b_step : w;
      char* ok = s.op == kBwdWeights ? (direct ? static_cast<char*>(out) : weights.data() + k * p->w_prim_bytes)
                                     : static_cast<char*>(out) + k * s.n * out_step;
      dnnl_status_t r = run_chunk(*p, s, ak, bk, ok, static_cast<const char*>(bias));
      if (r == dnnl_success) r = dnnl_stream_wait(stream());
      if (r != dnnl_success) failed.store(r);
    });
    st = static_cast<dnnl_status_t>(failed.load());
  }
  if (st == dnnl_success && s.op == kBwdWeights && !direct) {
    float* sum = reinterpret_cast<float*>(weights.data());  // float32 sums: the FFI asks for a float32 dw
    const int64_t count = p->w_prim_bytes / sizeof(float), per = (count + threads - 1) / threads;
    fr::parallel_for(pool, threads, [&](int64_t t) {
      for (int64_t e = t * per; e < std::min(count, (t + 1) * per); ++e)
        for (int64_t k = 1; k < chunks; ++k) sum[e] += sum[k * count + e];
    });
    if (p->reorder) st = reorder(*p, out, weights.data(), false);
    else std::copy(weights.begin(), weights.begin() + p->w_prim_bytes, static_cast<char*>(out));
  }
  if (st != dnnl_success)
    return ffi::Error::Internal("flax_resnet onednn: execution failed (status " + std::to_string(static_cast<int>(st)) +
                                ")");
  return ffi::Error::Success();
}

bool dnnl_type(ffi::DataType t, dnnl_data_type_t* out) {
  if (t == ffi::DataType::F32) *out = dnnl_f32;
  else if (t == ffi::DataType::BF16) *out = dnnl_bf16;
  else return false;
  return true;
}

bool dims_are(ffi::Span<const int64_t> d, std::initializer_list<int64_t> want) {
  return d.size() == want.size() && std::equal(want.begin(), want.end(), d.begin());
}

// Checks and fills the geometry shared by the three operations; `x` and `y` are NHWC, `w` HWIO dims.
ffi::Error geometry(Spec& s, ffi::Span<const int64_t> x, ffi::Span<const int64_t> y, int64_t kh, int64_t kw,
                    ffi::DataType tx, ffi::DataType tw, ffi::DataType ty) {
  if (x.size() != 4 || y.size() != 4) return ffi::Error::InvalidArgument("flax_resnet onednn: operands must be NHWC");
  s.n = x[0], s.h = x[1], s.w = x[2], s.c = x[3], s.co = y[3], s.kh = kh, s.kw = kw;
  if (!dnnl_type(tx, &s.dt_x) || !dnnl_type(tw, &s.dt_w) || !dnnl_type(ty, &s.dt_y))
    return ffi::Error::InvalidArgument("flax_resnet onednn: float32 or bfloat16 operands only");
  if (s.stride < 1 || kh < 1 || kw < 1 || s.c < 1 || s.co < 1 || s.pt < 0 || s.pb < 0 || s.pl < 0 || s.pr < 0 ||
      s.h + s.pt + s.pb < kh || s.w + s.pl + s.pr < kw)
    return ffi::Error::InvalidArgument("flax_resnet onednn: bad stride, padding, window or channel count");
  if (!dims_are(y, {s.n, s.oh(), s.ow(), s.co}))
    return ffi::Error::InvalidArgument("flax_resnet onednn: the output-side operand does not match the convolution");
  return ffi::Error::Success();
}

// `rest`: the bias (if `bias`), then the residual (if `sum`), which the caller aliases with y.
ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::RemainingArgs rest,
                   ffi::Result<ffi::AnyBuffer> y, int64_t stride, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                   bool bias, bool sum, bool relu) {
  Spec s{kForward, 0, 0, 0, 0, 0, 0, 0, stride, pt, pb, pl, pr, dnnl_f32, dnnl_f32, dnnl_f32};
  s.sum = sum, s.relu = relu;
  if (rest.size() != static_cast<size_t>(bias) + static_cast<size_t>(sum))
    return ffi::Error::InvalidArgument("flax_resnet onednn: operands do not match the bias and sum attributes");
  const void* bias_data = nullptr;
  if (bias) {
    auto b = rest.get<ffi::AnyBuffer>(0);
    if (b.has_error()) return b.error();
    if (!dims_are(b->dimensions(), {w.dimensions().size() == 4 ? w.dimensions()[3] : -1}) ||
        !dnnl_type(b->element_type(), &s.dt_b))
      return ffi::Error::InvalidArgument("flax_resnet onednn: the bias must be [CO], float32 or bfloat16");
    bias_data = b->untyped_data();
  }
  auto wd = w.dimensions();
  if (wd.size() != 4 || x.dimensions().size() != 4 || wd[2] != x.dimensions()[3] || y->dimensions().size() != 4 ||
      wd[3] != y->dimensions()[3])
    return ffi::Error::InvalidArgument("flax_resnet onednn: x must be NHWC and w HWIO with matching channels");
  if (ffi::Error e = geometry(s, x.dimensions(), y->dimensions(), wd[0], wd[1], x.element_type(), w.element_type(),
                              y->element_type());
      e.failure())
    return e;
  if (s.n == 0) return ffi::Error::Success();
  if (sum) {  // the residual is the sum post-op's operand: it must be in y already
    auto r = rest.get<ffi::AnyBuffer>(bias ? 1 : 0);
    if (r.has_error()) return r.error();
    if (r->element_type() != y->element_type() || !dims_are(r->dimensions(), {s.n, s.oh(), s.ow(), s.co}))
      return ffi::Error::InvalidArgument("flax_resnet onednn: the residual must match the output");
    if (r->untyped_data() != y->untyped_data())  // not aliased by the caller
      std::memcpy(y->untyped_data(), r->untyped_data(), y->size_bytes());
  }
  return execute(pool, s, x.untyped_data(), w.untyped_data(), y->untyped_data(), bias_data);
}

ffi::Error BwdData(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx, int64_t stride, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr) {
  Spec s{kBwdData, 0, 0, 0, 0, 0, 0, 0, stride, pt, pb, pl, pr, dnnl_f32, dnnl_f32, dnnl_f32};
  auto wd = w.dimensions();
  if (wd.size() != 4 || g.dimensions().size() != 4 || dx->dimensions().size() != 4 || wd[3] != g.dimensions()[3] ||
      wd[2] != dx->dimensions()[3])
    return ffi::Error::InvalidArgument("flax_resnet onednn: g and dx must be NHWC and w HWIO with matching channels");
  if (ffi::Error e = geometry(s, dx->dimensions(), g.dimensions(), wd[0], wd[1], g.element_type(), w.element_type(),
                              dx->element_type());
      e.failure())
    return e;
  if (s.n == 0) return ffi::Error::Success();
  return execute(pool, s, g.untyped_data(), w.untyped_data(), dx->untyped_data());
}

ffi::Error BwdWeights(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> dw, int64_t stride, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr) {
  Spec s{kBwdWeights, 0, 0, 0, 0, 0, 0, 0, stride, pt, pb, pl, pr, dnnl_f32, dnnl_f32, dnnl_f32};
  auto wd = dw->dimensions();
  if (wd.size() != 4 || x.dimensions().size() != 4 || g.dimensions().size() != 4 || wd[2] != x.dimensions()[3] ||
      wd[3] != g.dimensions()[3])
    return ffi::Error::InvalidArgument("flax_resnet onednn: x and g must be NHWC and dw HWIO with matching channels");
  if (x.element_type() != g.element_type() || dw->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("flax_resnet onednn: x and g must have one dtype, dw float32");
  if (ffi::Error e = geometry(s, x.dimensions(), g.dimensions(), wd[0], wd[1], x.element_type(), x.element_type(),
                              dw->element_type());
      e.failure())
    return e;
  if (s.n == 0) {  // nothing to sum: zeros
    std::fill_n(static_cast<char*>(dw->untyped_data()), dw->size_bytes(), 0);
    return ffi::Error::Success();
  }
  return execute(pool, s, x.untyped_data(), g.untyped_data(), dw->untyped_data());
}

}  // namespace

#define FLAX_RESNET_ONEDNN_BIND(name, fn)                                                                       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, fn,                                                                       \
                                ffi::Ffi::Bind()                                                                \
                                    .Ctx<ffi::ThreadPool>()                                                     \
                                    .Arg<ffi::AnyBuffer>()                                                      \
                                    .Arg<ffi::AnyBuffer>()                                                      \
                                    .Ret<ffi::AnyBuffer>()                                                      \
                                    .Attr<int64_t>("stride")                                                    \
                                    .Attr<int64_t>("pt")                                                        \
                                    .Attr<int64_t>("pb")                                                        \
                                    .Attr<int64_t>("pl")                                                        \
                                    .Attr<int64_t>("pr"))

XLA_FFI_DEFINE_HANDLER_SYMBOL(flax_resnet_onednn_forward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pb")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("pr")
                                  .Attr<bool>("bias")
                                  .Attr<bool>("sum")
                                  .Attr<bool>("relu"));
FLAX_RESNET_ONEDNN_BIND(flax_resnet_onednn_bwd_data, BwdData);
FLAX_RESNET_ONEDNN_BIND(flax_resnet_onednn_bwd_weights, BwdWeights);

// The oneDNN version compiled against, major * 10000 + minor * 100 + patch.
extern "C" int flax_resnet_onednn_version() {
  return DNNL_VERSION_MAJOR * 10000 + DNNL_VERSION_MINOR * 100 + DNNL_VERSION_PATCH;
}

// 1 where this CPU's oneDNN has bfloat16 convolutions: the primitives of a small 3x3 convolution
// (forward with and without bias + sum + ReLU, input and float32 kernel gradients) can be created.
// oneDNN 2.x has none below AVX-512 (`unimplemented`: an AVX2-only CPU). The primitives made stay
// cached like any others.
extern "C" int flax_resnet_onednn_bfloat16() {
  std::string error;
  Spec fused{kForward, 2, 8, 8, 16, 16, 3, 3, 1, 1, 1, 1, 1, dnnl_bf16, dnnl_bf16, dnnl_bf16};
  fused.dt_b = dnnl_f32, fused.sum = true, fused.relu = true;
  for (const Spec& s : {Spec{kForward, 2, 8, 8, 16, 16, 3, 3, 1, 1, 1, 1, 1, dnnl_bf16, dnnl_bf16, dnnl_bf16}, fused,
                        Spec{kBwdData, 2, 8, 8, 16, 16, 3, 3, 1, 1, 1, 1, 1, dnnl_bf16, dnnl_bf16, dnnl_bf16},
                        Spec{kBwdWeights, 2, 8, 8, 16, 16, 3, 3, 1, 1, 1, 1, 1, dnnl_bf16, dnnl_bf16, dnnl_f32}})
    if (!lookup(s, &error)) return 0;
  return 1;
}

// XLA FFI handlers for the direct convolutions of conv_kernels.h (CPU, float32).
//
//   flax_resnet_conv_forward(x[N,H,W,C], w[KH,KW,C,CO]) -> y[N,OH,OW,CO]
//   flax_resnet_conv_wgrad(x[N,H,W,C], g[N,OH,OW,CO]) -> dw[KH,KW,C,CO]
// attributes: stride, pt, pb, pl, pr (zero padding top/bottom/left/right); kh, kw (wgrad).
//
// Work is shared with XLA's own intra-op thread pool (no threads of our own). Built on first
// use by flax_resnet/native/__init__.py with the host's C++ compiler.
#include <initializer_list>
#include <vector>

#include "conv_kernels.h"
#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

fr::Geometry geometry(ffi::Span<const int64_t> x, int64_t kh, int64_t kw, int64_t co, int64_t stride, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr) {
  return fr::Geometry{x[0], x[1], x[2], x[3], kh, kw, stride, pt, pb, pl, pr, co};
}

ffi::Error check(const fr::Geometry& g) {
  if (g.co % fr::kLanes != 0 || g.co < 1)
    return ffi::Error::InvalidArgument("flax_resnet conv: output channels must be a multiple of the vector width");
  if (g.stride < 1 || g.kh < 1 || g.kw < 1 || g.c < 1 || g.pt < 0 || g.pb < 0 || g.pl < 0 || g.pr < 0 ||
      g.h + g.pt + g.pb < g.kh || g.w + g.pl + g.pr < g.kw)
    return ffi::Error::InvalidArgument("flax_resnet conv: bad stride, padding, window or channel count");
  return ffi::Error::Success();
}

bool dims_are(ffi::Span<const int64_t> d, std::initializer_list<int64_t> want) {
  return d.size() == want.size() && std::equal(want.begin(), want.end(), d.begin());
}

ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto wd = w.dimensions();
  if (x.dimensions().size() != 4 || wd.size() != 4 || wd[2] != x.dimensions()[3])
    return ffi::Error::InvalidArgument("flax_resnet conv: x must be NHWC and w HWIO with matching C");
  const fr::Geometry g = geometry(x.dimensions(), wd[0], wd[1], wd[3], stride, pt, pb, pl, pr);
  if (ffi::Error e = check(g); e.failure()) return e;
  if (!dims_are(y->dimensions(), {g.n, g.oh(), g.ow(), g.co}))
    return ffi::Error::InvalidArgument("flax_resnet conv: the output buffer does not match the convolution");
  if (g.n == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  std::vector<float> packed(wd[0] * wd[1] * wd[2] * wd[3]);
  fr::pack_weights(w.typed_data(), g, packed.data());
  const float* wp = packed.data();
  float* yp = y->typed_data();
  const int64_t oh = g.oh(), image_in = g.h * g.w * g.c, image_out = oh * g.ow() * g.co;
  // Whole images per item when there are enough of them; else blocks of rows.
  const int64_t want = 4 * std::max<int64_t>(1, pool.num_threads());
  const int64_t rows = g.n >= want ? oh : std::max<int64_t>(1, (oh * g.n + want - 1) / want);
  const int64_t blocks = (oh + rows - 1) / rows;
  fr::parallel_for(pool, g.n * blocks, [&](int64_t item) {
    thread_local std::vector<float> scratch;
    const int64_t n = item / blocks, r0 = (item % blocks) * rows;
    fr::forward_rows(xp + n * image_in, wp, yp + n * image_out, g, r0, std::min(oh, r0 + rows), scratch);
  });
  return ffi::Error::Success();
}

ffi::Error ConvWgrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gy,
                     ffi::ResultBuffer<ffi::F32> dw, int64_t kh, int64_t kw, int64_t stride, int64_t pt, int64_t pb,
                     int64_t pl, int64_t pr) {
  auto gd = gy.dimensions();
  if (x.dimensions().size() != 4 || gd.size() != 4)
    return ffi::Error::InvalidArgument("flax_resnet conv wgrad: x and g must be NHWC");
  const fr::Geometry g = geometry(x.dimensions(), kh, kw, gd[3], stride, pt, pb, pl, pr);
  if (ffi::Error e = check(g); e.failure()) return e;
  if (gd[0] != g.n || gd[1] != g.oh() || gd[2] != g.ow())
    return ffi::Error::InvalidArgument("flax_resnet conv wgrad: g does not match the convolution's output");
  if (!dims_are(dw->dimensions(), {kh, kw, g.c, g.co}))
    return ffi::Error::InvalidArgument("flax_resnet conv wgrad: the output buffer does not match the kernel");
  const float* xp = x.typed_data();
  const float* gp = gy.typed_data();
  const int64_t size = kh * kw * g.c * g.co, image_in = g.h * g.w * g.c, image_out = g.oh() * g.ow() * g.co;
  float* out = dw->typed_data();
  if (g.n == 0) {
    std::fill(out, out + size, 0.0f);
    return ffi::Error::Success();
  }
  // Chunks of images, each summed into its own partial in image order, the partials then added
  // in chunk order: the same sums whatever thread runs which chunk. The chunk count depends on
  // the shape only (16 where the batch allows, at most 64 MB of partials), not on the threads:
  // the same bits on any machine with the same vector width.
  const int64_t by_memory = std::max<int64_t>(1, (int64_t{64} << 20) / (size * int64_t{sizeof(float)}));
  const int64_t chunks = std::min({g.n, int64_t{16}, by_memory});
  std::vector<float> partial(chunks * size, 0.0f);
  fr::parallel_for(pool, chunks, [&](int64_t k) {
    thread_local std::vector<float> scratch;
    float* acc = partial.data() + k * size;
    for (int64_t n = k * g.n / chunks; n < (k + 1) * g.n / chunks; ++n)
      fr::wgrad_image(xp + n * image_in, gp + n * image_out, acc, g, scratch);
  });
  for (int64_t e = 0; e < size; ++e) {
    float s = partial[e];
    for (int64_t k = 1; k < chunks; ++k) s += partial[k * size + e];
    out[e] = s;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(flax_resnet_conv_forward, ConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pb")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("pr"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(flax_resnet_conv_wgrad, ConvWgrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pb")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("pr"));

// The vector width the kernels were compiled for: output channels must be a multiple of it.
extern "C" int flax_resnet_conv_lanes() { return fr::kLanes; }

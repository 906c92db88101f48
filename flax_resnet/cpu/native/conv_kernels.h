// Direct convolutions for the CPU (NHWC activations, HWIO kernels, float32), written for the
// shapes of residual networks: register-blocked outer products of GCC vectors (AVX2 or AVX-512
// when compiled with -march=native), no im2col buffers. Used through XLA's FFI (conv_cpu.cc).
//
//   conv_forward:  y[n, r, q, o]   = sum_{i, j, c} xpad[n, s*r + i, s*q + j, c] * w[i, j, c, o]
//   conv_wgrad:    dw[i, j, c, o]  = sum_{n, r, q} xpad[n, s*r + i, s*q + j, c] * g[n, r, q, o]
//
// xpad is x zero-padded by (pt, pb) rows and (pl, pr) columns. The input gradient of a
// convolution is a forward convolution of g (flax_resnet/models/blocks.py builds it).
// Every output element is summed in one fixed order, whatever the threading: results are
// deterministic run to run.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fr {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kFwdPixels = 12;   // output pixels per forward tile (x 2 vectors of channels)
constexpr int kGradRows = 12;    // input channels per weight-gradient tile (x 2 vectors)
#else
constexpr int kLanes = 8;
constexpr int kFwdPixels = 6;
constexpr int kGradRows = 6;
#endif

typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));

static inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

struct Geometry {
  int64_t n, h, w, c;         // input
  int64_t kh, kw, stride;     // kernel window
  int64_t pt, pb, pl, pr;     // zero padding
  int64_t co;                 // output channels
  int64_t oh() const { return (h + pt + pb - kh) / stride + 1; }
  int64_t ow() const { return (w + pl + pr - kw) / stride + 1; }
  int64_t padded_w() const { return w + pl + pr; }
};

// Rows [r0, r1) of the zero-padded image `img` (h x w x c) into `out` (r1 - r0 rows of padded_w x c).
static inline void pad_rows(const float* img, const Geometry& g, int64_t r0, int64_t r1, float* out) {
  const int64_t pw = g.padded_w(), row = pw * g.c;
  for (int64_t r = r0; r < r1; ++r) {
    float* dst = out + (r - r0) * row;
    const int64_t src_r = r - g.pt;
    if (src_r < 0 || src_r >= g.h) {
      std::memset(dst, 0, row * sizeof(float));
      continue;
    }
    std::memset(dst, 0, g.pl * g.c * sizeof(float));
    std::memcpy(dst + g.pl * g.c, img + src_r * g.w * g.c, g.w * g.c * sizeof(float));
    std::memset(dst + (g.pl + g.w) * g.c, 0, g.pr * g.c * sizeof(float));
  }
}

// The forward kernels read w packed per block of output channels: the block of width b (two
// vectors, then a one-vector tail) starting at channel o holds w[i, j, c, o:o+b] at
// w_packed[o*kh*kw*c + ((i*kw + j)*c + ci)*b + lane], so a tile streams its weights contiguously (HWIO's
// stride of co floats between rows maps them onto a few cache sets once co reaches 64).
static inline int64_t block_width(int64_t o, int64_t co) { return o + 2 * kLanes <= co ? 2 * kLanes : kLanes; }

static void pack_weights(const float* w, const Geometry& g, float* packed) {
  const int64_t taps = g.kh * g.kw * g.c;
  for (int64_t o = 0; o < g.co; o += block_width(o, g.co)) {
    const int64_t b = block_width(o, g.co);
    float* dst = packed + o * taps;
    for (int64_t t = 0; t < taps; ++t) std::memcpy(dst + t * b, w + t * g.co + o, b * sizeof(float));
  }
}

// One forward tile: P output pixels (consecutive in row-major order, possibly across rows) x NV
// vectors of output channels. xs: the padded rows; off[p]: where pixel p's window starts in xs;
// w: this channel block's packed weights.
template <int P, int NV>
static inline void forward_tile(const float* xs, const int64_t* off, int64_t xrow, const Geometry& g,
                                const float* w, float* y) {
  vf acc[P][NV] = {};
  const int64_t c = g.c, co = g.co;
  int64_t o[P];
#pragma GCC unroll 32
  for (int p = 0; p < P; ++p) o[p] = off[p];
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      const float* xp = xs + i * xrow + j * c;
      const float* wp = w + (i * g.kw + j) * c * (NV * kLanes);
      for (int64_t ci = 0; ci < c; ++ci) {
        vf wv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) wv[v] = load(wp + (ci * NV + v) * kLanes);
#pragma GCC unroll 32
        for (int p = 0; p < P; ++p) {
          const float s = xp[o[p] + ci];
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[p][v] += wv[v] * s;
        }
      }
    }
  }
#pragma GCC unroll 32
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(y + p * co + v * kLanes, acc[p][v]);
}

// forward_tile<P, NV> for a run-time P in [1, PMAX].
template <int NV, int P>
static inline void forward_tile_n(const float* xs, const int64_t* off, int64_t xrow, const Geometry& g,
                                  const float* w, float* y, int64_t pixels) {
  if constexpr (P > 0) {
    if (pixels == P) return forward_tile<P, NV>(xs, off, xrow, g, w, y);
    return forward_tile_n<NV, P - 1>(xs, off, xrow, g, w, y, pixels);
  }
}

// Splits `len` into ceil(len / most) runs of near-equal length (none much shorter than the
// others: a short run has too few accumulators to hide the FMA latency).
static inline void balanced_runs(int64_t len, int64_t most, std::vector<int64_t>& runs) {
  runs.clear();
  const int64_t t = (len + most - 1) / most, base = len / t, extra = len % t;
  for (int64_t k = 0; k < t; ++k) runs.push_back(base + (k < extra ? 1 : 0));
}

// Output rows [r0, r1) of image `img` into y (the image's output), scratch reused per call;
// w packed by pack_weights.
static void forward_rows(const float* img, const float* w, float* y, const Geometry& g, int64_t r0,
                         int64_t r1, std::vector<float>& scratch) {
  const int64_t ow = g.ow(), co = g.co, c = g.c, s = g.stride, xrow = g.padded_w() * c, taps = g.kh * g.kw * c;
  const int64_t pr0 = r0 * s, pr1 = (r1 - 1) * s + g.kh;
  scratch.resize((pr1 - pr0) * xrow);
  pad_rows(img, g, pr0, pr1, scratch.data());
  const int64_t pixels = (r1 - r0) * ow;
  std::vector<int64_t> off(pixels);
  for (int64_t t = 0; t < pixels; ++t) off[t] = (t / ow) * s * xrow + (t % ow) * s * c;
  float* y0 = y + r0 * ow * co;
  std::vector<int64_t> runs;
  int64_t o = 0;
  if (co >= 2 * kLanes) {  // two vectors of output channels per tile
    balanced_runs(pixels, kFwdPixels, runs);
    for (; o + 2 * kLanes <= co; o += 2 * kLanes) {
      int64_t t = 0;
      for (int64_t p : runs) {
        forward_tile_n<2, kFwdPixels>(scratch.data(), off.data() + t, xrow, g, w + o * taps, y0 + t * co + o, p);
        t += p;
      }
    }
  }
  if (o < co) {  // one vector (the channel tail)
    balanced_runs(pixels, 2 * kFwdPixels, runs);
    for (; o + kLanes <= co; o += kLanes) {
      int64_t t = 0;
      for (int64_t p : runs) {
        forward_tile_n<1, 2 * kFwdPixels>(scratch.data(), off.data() + t, xrow, g, w + o * taps, y0 + t * co + o, p);
        t += p;
      }
    }
  }
}

// Weight-gradient tile: R input channels x NV vectors of output channels, summed over the
// output pixels of rows [r0, r1) of one image, added to acc_out (the running partial sum).
template <int R, int NV>
static inline void wgrad_tile(const float* xs /* padded rows, at (i, j, c0) of row r0 */, int64_t xrow,
                              const float* gimg /* g at (r0, 0, o0) */, int64_t rows, const Geometry& g,
                              float* acc_out) {
  vf acc[R][NV];
  const int64_t co = g.co, sc = g.stride * g.c, ow = g.ow(), srow = g.stride * xrow;
#pragma GCC unroll 32
  for (int k = 0; k < R; ++k)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[k][v] = load(acc_out + k * co + v * kLanes);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xs + r * srow;
    const float* gr = gimg + r * ow * co;
    for (int64_t q = 0; q < ow; ++q) {
      vf gv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) gv[v] = load(gr + q * co + v * kLanes);
      const float* xp = xr + q * sc;
#pragma GCC unroll 32
      for (int k = 0; k < R; ++k) {
        const float s = xp[k];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[k][v] += gv[v] * s;
      }
    }
  }
#pragma GCC unroll 32
  for (int k = 0; k < R; ++k)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(acc_out + k * co + v * kLanes, acc[k][v]);
}

// wgrad_tile<R, NV> for a run-time R in [1, kGradRows].
template <int NV, int R = kGradRows>
static inline void wgrad_tile_n(const float* xs, int64_t xrow, const float* gimg, int64_t rows, const Geometry& g,
                              float* acc_out, int64_t left) {
  if constexpr (R > 0) {
    if (left == R) return wgrad_tile<R, NV>(xs, xrow, gimg, rows, g, acc_out);
    return wgrad_tile_n<NV, R - 1>(xs, xrow, gimg, rows, g, acc_out, left);
  }
}

// Adds image `img`'s contribution to the kernel gradient `dw` (kh x kw x c x co).
static void wgrad_image(const float* img, const float* gimg, float* dw, const Geometry& g,
                        std::vector<float>& scratch) {
  const int64_t oh = g.oh(), ow = g.ow(), c = g.c, co = g.co, s = g.stride, xrow = g.padded_w() * c;
  const int64_t ph = (oh - 1) * s + g.kh;
  scratch.resize(ph * xrow);
  pad_rows(img, g, 0, ph, scratch.data());
  // Output rows per block: about 128 pixels, so the block's g and x stay in L1/L2.
  const int64_t block = std::max<int64_t>(1, 128 / ow);
  std::vector<int64_t> crun;
  balanced_runs(c, kGradRows, crun);
  for (int64_t r0 = 0; r0 < oh; r0 += block) {
    const int64_t rows = std::min(block, oh - r0);
    const float* xb = scratch.data() + r0 * s * xrow;
    const float* gb = gimg + r0 * ow * co;
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        float* dwij = dw + (i * g.kw + j) * c * co;
        const float* xij = xb + i * xrow + j * c;
        int64_t c0 = 0;
        for (int64_t left : crun) {
          int64_t o = 0;
          for (; o + 2 * kLanes <= co; o += 2 * kLanes)
            wgrad_tile_n<2>(xij + c0, xrow, gb + o, rows, g, dwij + c0 * co + o, left);
          for (; o + kLanes <= co; o += kLanes)
            wgrad_tile_n<1>(xij + c0, xrow, gb + o, rows, g, dwij + c0 * co + o, left);
          c0 += left;
        }
      }
    }
  }
}

}  // namespace fr

// What dhjax's two splat handlers (splat_cpu.cc, splat_cuda.cu) share: the constants of the
// image formation (dhjax/ops/splat.py), the dimensions and size checks of the operands, the
// clamped tile rectangle of a Gaussian, the pixel range of a tile and the Gaussian's exponent at
// a pixel. Functions marked DHJAX_SPLAT_HD compile for the host and, under nvcc, for the device.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

#ifdef __CUDACC__
#define DHJAX_SPLAT_HD __host__ __device__ __forceinline__
#else
#define DHJAX_SPLAT_HD inline
#endif

namespace dhjax_splat {

namespace ffi = xla::ffi;

constexpr int kTile = 16;                   // tiles are kTile x kTile pixels
constexpr float kAlphaMin = 1.0f / 255.0f;  // alpha below this: the Gaussian is skipped
constexpr float kAlphaMax = 0.99f;          // alpha = min(kAlphaMax, o exp(power))
constexpr float kTMin = 1e-4f;              // stop before the Gaussian that brings T below this

// Operand sizes: B cameras (the flattened leading dims), N Gaussians each, K channels, an H x W
// image of tx x ty = T tiles.
struct Dims {
  int64_t B = 1, N = 0, K = 0, H = 0, W = 0;
  int64_t tx = 0, ty = 0, T = 0;
};

// Clamped tile rectangle [x0, x1) x [y0, y1) of one Gaussian's rect (tx0, ty0, tx1, ty1) in a
// tx x ty tile grid; false when it is empty.
DHJAX_SPLAT_HD bool clamp_rect(const int32_t* r, int64_t tx, int64_t ty, int& x0, int& y0, int& x1, int& y1) {
  x0 = r[0] > 0 ? r[0] : 0;
  y0 = r[1] > 0 ? r[1] : 0;
  x1 = r[2] < tx ? r[2] : static_cast<int>(tx);
  y1 = r[3] < ty ? r[3] : static_cast<int>(ty);
  return x1 > x0 && y1 > y0;
}

// Pixel column and row of the top-left pixel of tile t (row-major, tx tiles per row).
DHJAX_SPLAT_HD int tile_x0(int64_t t, int64_t tx) { return static_cast<int>(t % tx) * kTile; }
DHJAX_SPLAT_HD int tile_y0(int64_t t, int64_t tx) { return static_cast<int>(t / tx) * kTile; }

// Exponent of a Gaussian with conic (a, b, c) at offset (dx, dy) = pixel - mean:
//   power = -0.5 (a dx^2 + c dy^2) - b dx dy, evaluated left to right without FMA contraction on
// both platforms (the device code spells out the round-to-nearest operations, which
// --use_fast_math leaves alone; -ftz=false keeps their subnormals), so the CPU and CUDA handlers
// make the same skip decisions. The CPU handler evaluates it four pixels at a time (`row_power`
// in splat_cpu.cc: these operations in this order on 4-lane vectors, the same bits).
DHJAX_SPLAT_HD float power(float a, float b, float c, float dx, float dy) {
#ifdef __CUDA_ARCH__
  const float quad = __fadd_rn(__fmul_rn(__fmul_rn(a, dx), dx), __fmul_rn(__fmul_rn(c, dy), dy));
  return __fsub_rn(__fmul_rn(-0.5f, quad), __fmul_rn(__fmul_rn(b, dx), dy));
#else
  return -0.5f * (a * dx * dx + c * dy * dy) - b * dx * dy;
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side: operand dimensions and size checks, the same for both platforms.

// Dimensions from means2d [...,N,2] and the image [...,H,W,K]; checks their ranks.
inline ffi::Error get_dims(ffi::Span<const int64_t> md, ffi::Span<const int64_t> img, Dims* d) {
  if (md.size() < 2 || md[md.size() - 1] != 2) {
    return ffi::Error::InvalidArgument("dhjax_splat: means2d must be [...,N,2]");
  }
  if (img.size() != md.size() + 1) {
    return ffi::Error::InvalidArgument("dhjax_splat: the image must be [...,H,W,K] with the batch dims of means2d");
  }
  d->N = md[md.size() - 2];
  d->B = 1;
  for (size_t i = 0; i + 2 < md.size(); ++i) d->B *= md[i];
  const size_t r = img.size();
  d->H = img[r - 3];
  d->W = img[r - 2];
  d->K = img[r - 1];
  d->tx = (d->W + kTile - 1) / kTile;
  d->ty = (d->H + kTile - 1) / kTile;
  d->T = d->tx * d->ty;
  return ffi::Error::Success();
}

inline ffi::Error check_count(const char* name, size_t got, int64_t want) {
  if (static_cast<int64_t>(got) != want) {
    return ffi::Error::InvalidArgument(std::string("dhjax_splat: ") + name + " has " + std::to_string(got) +
                                       " elements, expected " + std::to_string(want));
  }
  return ffi::Error::Success();
}

// Sizes of the per-Gaussian inputs (means2d is checked by get_dims).
inline ffi::Error check_inputs(const Dims& d, ffi::Buffer<ffi::F32>& conics, ffi::Buffer<ffi::F32>& colors,
                               ffi::Buffer<ffi::F32>& opac, ffi::Buffer<ffi::F32>& depths,
                               ffi::Buffer<ffi::S32>& rects) {
  const int64_t BN = d.B * d.N;
  if (auto e = check_count("conics", conics.element_count(), BN * 3); e.failure()) return e;
  if (auto e = check_count("colors", colors.element_count(), BN * d.K); e.failure()) return e;
  if (auto e = check_count("opacities", opac.element_count(), BN); e.failure()) return e;
  if (auto e = check_count("depths", depths.element_count(), BN); e.failure()) return e;
  if (auto e = check_count("rects", rects.element_count(), BN * 4); e.failure()) return e;
  return ffi::Error::Success();
}

// Sizes of the forward results beyond the image (transmittance and last, [...,H,W] each).
inline ffi::Error check_forward_results(const Dims& d, size_t trans, size_t last) {
  const int64_t BHW = d.B * d.H * d.W;
  if (auto e = check_count("transmittance", trans, BHW); e.failure()) return e;
  return check_count("last", last, BHW);
}

// Sizes of the backward's extra inputs and of its results.
inline ffi::Error check_backward(const Dims& d, ffi::Buffer<ffi::F32>& trans, ffi::Buffer<ffi::S32>& last,
                                 ffi::Buffer<ffi::F32>& d_out, ffi::Buffer<ffi::F32>& d_trans,
                                 ffi::ResultBuffer<ffi::F32>& g_means2d, ffi::ResultBuffer<ffi::F32>& g_conics,
                                 ffi::ResultBuffer<ffi::F32>& g_colors, ffi::ResultBuffer<ffi::F32>& g_opac) {
  const int64_t BHW = d.B * d.H * d.W, BN = d.B * d.N;
  if (auto e = check_forward_results(d, trans.element_count(), last.element_count()); e.failure()) return e;
  if (auto e = check_count("d_out", d_out.element_count(), BHW * d.K); e.failure()) return e;
  if (auto e = check_count("d_transmittance", d_trans.element_count(), BHW); e.failure()) return e;
  if (auto e = check_count("d_means2d", g_means2d->element_count(), BN * 2); e.failure()) return e;
  if (auto e = check_count("d_conics", g_conics->element_count(), BN * 3); e.failure()) return e;
  if (auto e = check_count("d_colors", g_colors->element_count(), BN * d.K); e.failure()) return e;
  return check_count("d_opacities", g_opac->element_count(), BN);
}

}  // namespace dhjax_splat

// What dhjax's two raymarch handlers (raymarch_cpu.cc, raymarch_cuda.cu) share: the marching rule
// (slab test, candidate count, sample position, occupancy cell), the compositing recurrence's
// termination test, and the host-side shape checks. The rule is defined in dhjax/ops/raymarch.py
// (module docstring); the pure-JAX reference there evaluates the same float32 operations in the
// same order. Functions marked DHJAX_RM_HD compile for the host and, under nvcc, for the device.
//
// Float agreement: every operation that decides which samples exist (slab, K, t_k, p, cell) is
// spelled out one rounding at a time. On the device with the __f*_rn intrinsics, which
// --use_fast_math leaves alone (no FMA contraction, IEEE division; the CMake flag -ftz=false
// keeps their subnormals, which fast-math would flush); on the host the CPU library is
// compiled with -ffp-contract=off (kernels/raymarch/CMakeLists.txt).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "xla/ffi/api/ffi.h"

#ifdef __CUDACC__
#define DHJAX_RM_HD __host__ __device__ __forceinline__
#else
#define DHJAX_RM_HD inline
#endif

namespace dhjax_raymarch {

namespace ffi = xla::ffi;

// Safety guard: at most this many candidate steps per ray (K is clipped to it). Documented in
// dhjax/ops/raymarch.py as MAX_STEPS; the same constant in every implementation.
constexpr int32_t kMaxSteps = 1 << 20;

DHJAX_RM_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
DHJAX_RM_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
DHJAX_RM_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
DHJAX_RM_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
DHJAX_RM_HD bool finite(float x) {
#ifdef __CUDA_ARCH__
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// Candidate steps of one ray: slab intersection [t0, t1] of p = o + t d with the box, t0 clipped
// to >= 0, and K = min(floor((t1 - t0) / step), kMaxSteps) full steps. K = 0 when: any of o, d,
// box_min, box_max is not finite; box_max <= box_min on some axis; d_a == 0 and o_a outside
// [box_min_a, box_max_a]; t1 <= t0 (missed, or box behind); t1 infinite (d == 0).
DHJAX_RM_HD int32_t ray_range(const float* o, const float* d, const float* bmin, const float* bmax, float step,
                              float* t0_out) {
  const float inf = INFINITY;  // <cmath> macro: usable on host and device
  float t0 = 0.0f, t1 = inf;
  for (int a = 0; a < 3; ++a) {
    if (!finite(o[a]) || !finite(d[a]) || !finite(bmin[a]) || !finite(bmax[a]) || !(bmax[a] > bmin[a])) return 0;
  }
  for (int a = 0; a < 3; ++a) {
    float lo, hi;
    if (d[a] != 0.0f) {
      const float ta = div_rn(sub_rn(bmin[a], o[a]), d[a]);
      const float tb = div_rn(sub_rn(bmax[a], o[a]), d[a]);
      lo = ta < tb ? ta : tb;
      hi = ta < tb ? tb : ta;
    } else {
      if (!(o[a] >= bmin[a] && o[a] <= bmax[a])) return 0;
      lo = -inf;
      hi = inf;
    }
    t0 = lo > t0 ? lo : t0;
    t1 = hi < t1 ? hi : t1;
  }
  if (!(t1 > t0) || t1 == inf) return 0;
  const float q = floorf(div_rn(sub_rn(t1, t0), step));
  *t0_out = t0;
  return q >= static_cast<float>(kMaxSteps) ? kMaxSteps : static_cast<int32_t>(q);
}

// Distance of candidate k: t_k = t0 + (k + 0.5) * step (k + 0.5 is exact for k < 2^23).
DHJAX_RM_HD float sample_t(float t0, int32_t k, float step) {
  return add_rn(t0, mul_rn(add_rn(static_cast<float>(k), 0.5f), step));
}

// Occupancy cell along one axis: floor(((o + t d) - bmin) / (bmax - bmin) * D) clamped to
// [0, D-1] (a NaN goes to 0).
DHJAX_RM_HD int32_t cell_index(float o, float d, float bmin, float bmax, float t, float Df, int32_t D) {
  const float p = add_rn(o, mul_rn(t, d));
  const float u = mul_rn(div_rn(sub_rn(p, bmin), sub_rn(bmax, bmin)), Df);
  const float c = floorf(u);
  if (!(c >= 1.0f)) return 0;
  return c < Df ? static_cast<int32_t>(c) : D - 1;
}

// Flat index of the cell of candidate at distance t in one group's grid [D, D, D] (x, y, z).
DHJAX_RM_HD int64_t cell_of(const float* o, const float* d, const float* bmin, const float* bmax, float t, int32_t D) {
  const float Df = static_cast<float>(D);
  const int64_t i = cell_index(o[0], d[0], bmin[0], bmax[0], t, Df, D);
  const int64_t j = cell_index(o[1], d[1], bmin[1], bmax[1], t, Df, D);
  const int64_t k = cell_index(o[2], d[2], bmin[2], bmax[2], t, Df, D);
  return (i * D + j) * D + k;
}

DHJAX_RM_HD float exp_f(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  return std::exp(x);
#endif
}
DHJAX_RM_HD float expm1_f(float x) {
#ifdef __CUDA_ARCH__
  return expm1f(x);
#else
  return std::expm1(x);
#endif
}

// Compositing of one ray whose samples are slots [lo, hi) (see dhjax/ops/raymarch.py):
//   x_n = sigma_n delta_n, S_0 = 0, S_{n+1} = S_n + x_n (float32, in order, no FMA),
//   sample n is processed while S_n <= s_max (s_max = -log(min_transmittance)), then the ray stops;
//   T_n = exp(-S_n), alpha_n = -expm1(-x_n), w_n = T_n alpha_n;
//   color = sum w_n rgb_n, depth = sum w_n t_n, trans = exp(-S_end) (S after the last processed).
// weights[lo, hi) must be zero on entry (slots after the stop stay zero).
DHJAX_RM_HD void composite_forward_ray(const float* sigma, const float* rgb, const float* t, const float* delta,
                                       int64_t lo, int64_t hi, float s_max, float* color, float* depth,
                                       float* trans, float* weights) {
  float S = 0.0f, c0 = 0.0f, c1 = 0.0f, c2 = 0.0f, dep = 0.0f;
  for (int64_t n = lo; n < hi; ++n) {
    if (!(S <= s_max)) break;
    const float x = mul_rn(sigma[n], delta[n]);
    const float w = exp_f(-S) * -expm1_f(-x);
    weights[n] = w;
    c0 += w * rgb[3 * n];
    c1 += w * rgb[3 * n + 1];
    c2 += w * rgb[3 * n + 2];
    dep += w * t[n];
    S = add_rn(S, x);
  }
  color[0] = c0;
  color[1] = c1;
  color[2] = c2;
  *depth = dep;
  *trans = exp_f(-S);
}

// Exact gradient of composite_forward_ray (the stop decision held fixed). With cotangents gc (color),
// gd (depth), gt (trans), gw_n (weights) and g_n = gc . rgb_n + gd t_n + gw_n over processed n:
//   dL/drgb_n = w_n gc,
//   dL/dsigma_n = delta_n (g_n T_{n+1} - sum_{m>n} w_m g_m - gt T_end)
// (dw_n/dx_n = T_{n+1}, dw_m/dx_n = -w_m for m > n, dT_end/dx_n = -T_end). One forward walk stores
// S_n in d_sigma[n] (scratch), then a reverse walk accumulates the suffix sum exactly (no
// total-minus-prefix cancellation). d_sigma and d_rgb of [lo, hi) must be zero on entry.
DHJAX_RM_HD void composite_backward_ray(const float* sigma, const float* rgb, const float* t, const float* delta,
                                        int64_t lo, int64_t hi, float s_max, const float* gc, float gd, float gt,
                                        const float* gw, float* d_sigma, float* d_rgb) {
  float S = 0.0f;
  int64_t end = lo;
  for (int64_t n = lo; n < hi; ++n) {
    if (!(S <= s_max)) break;
    d_sigma[n] = S;
    S = add_rn(S, mul_rn(sigma[n], delta[n]));
    end = n + 1;
  }
  const float gt_end = gt * exp_f(-S);
  float suffix = 0.0f, s_next = S;
  for (int64_t n = end - 1; n >= lo; --n) {
    const float sn = d_sigma[n];
    const float x = mul_rn(sigma[n], delta[n]);
    const float w = exp_f(-sn) * -expm1_f(-x);
    const float g = gc[0] * rgb[3 * n] + gc[1] * rgb[3 * n + 1] + gc[2] * rgb[3 * n + 2] + gd * t[n] + gw[n];
    d_sigma[n] = (g * exp_f(-s_next) - suffix - gt_end) * delta[n];
    d_rgb[3 * n] = w * gc[0];
    d_rgb[3 * n + 1] = w * gc[1];
    d_rgb[3 * n + 2] = w * gc[2];
    suffix += w * g;
    s_next = sn;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: operand dimensions (leading batch dims "..." flattened into G groups).

struct MarchDims {
  int64_t G = 1, R = 0, D = 0, C = 0;
};

inline ffi::Error march_dims(ffi::Span<const int64_t> od, ffi::Span<const int64_t> dd, ffi::Span<const int64_t> gd,
                             ffi::Span<const int64_t> bmn, ffi::Span<const int64_t> bmx, ffi::Span<const int64_t> td,
                             MarchDims* m) {
  const size_t k = bmn.size();
  if (k < 1 || bmn[k - 1] != 3 || bmx.size() != k || od.size() != k + 1 || dd.size() != k + 1 ||
      gd.size() != k + 2 || td.size() != k) {
    return ffi::Error::InvalidArgument(
        "dhjax_raymarch: expected origins/directions [...,R,3], grid [...,D,D,D], box [...,3], samples [...,C]");
  }
  m->G = 1;
  for (size_t i = 0; i + 1 < k; ++i) {
    if (od[i] != bmn[i] || dd[i] != bmn[i] || gd[i] != bmn[i] || bmx[i] != bmn[i] || td[i] != bmn[i]) {
      return ffi::Error::InvalidArgument("dhjax_raymarch: leading (group) dims of the operands differ");
    }
    m->G *= bmn[i];
  }
  m->R = od[k - 1];
  m->D = gd[k - 1];
  m->C = td[k - 1];
  if (od[k] != 3 || dd[k - 1] != m->R || dd[k] != 3 || bmx[k - 1] != 3 || gd[k] != m->D || gd[k + 1] != m->D) {
    return ffi::Error::InvalidArgument("dhjax_raymarch: origins/directions must be [...,R,3] and grid [...,D,D,D]");
  }
  if (m->D > (int64_t{1} << 20) || m->R >= (int64_t{1} << 31) || m->C >= (int64_t{1} << 31)) {
    return ffi::Error::InvalidArgument("dhjax_raymarch: D <= 2^20, R < 2^31 and capacity < 2^31 are required");
  }
  return ffi::Error::Success();
}

struct CompositeDims {
  int64_t G = 1, C = 0, R = 0;
};

// sigma [...,C], rgb [...,C,3], t [...,C], delta [...,C], ray_start [...,R], ray_count [...,R].
inline ffi::Error composite_dims(ffi::Span<const int64_t> sg, ffi::Span<const int64_t> rgb,
                                 ffi::Span<const int64_t> t, ffi::Span<const int64_t> dl,
                                 ffi::Span<const int64_t> rs, ffi::Span<const int64_t> rc, CompositeDims* c) {
  const size_t k = sg.size();
  if (k < 1 || rgb.size() != k + 1 || t.size() != k || dl.size() != k || rs.size() != k || rc.size() != k ||
      rgb[k] != 3) {
    return ffi::Error::InvalidArgument(
        "dhjax_raymarch: expected sigma/t/delta [...,C], rgb [...,C,3], ray_start/ray_count [...,R]");
  }
  c->G = 1;
  for (size_t i = 0; i + 1 < k; ++i) {
    if (rgb[i] != sg[i] || t[i] != sg[i] || dl[i] != sg[i] || rs[i] != sg[i] || rc[i] != sg[i]) {
      return ffi::Error::InvalidArgument("dhjax_raymarch: leading (group) dims of the operands differ");
    }
    c->G *= sg[i];
  }
  c->C = sg[k - 1];
  c->R = rs[k - 1];
  if (rgb[k - 1] != c->C || t[k - 1] != c->C || dl[k - 1] != c->C || rc[k - 1] != c->R) {
    return ffi::Error::InvalidArgument("dhjax_raymarch: sample arrays [...,C] or ray arrays [...,R] disagree");
  }
  return ffi::Error::Success();
}

// Slots [lo, hi) of a ray in its group's compacted list, clipped to [0, C).
DHJAX_RM_HD void ray_slots(int32_t start, int32_t count, int64_t C, int64_t* lo, int64_t* hi) {
  int64_t a = start < 0 ? 0 : start;
  int64_t b = static_cast<int64_t>(start) + (count > 0 ? count : 0);
  if (a > C) a = C;
  if (b > C) b = C;
  *lo = a;
  *hi = b > a ? b : a;
}

}  // namespace dhjax_raymarch

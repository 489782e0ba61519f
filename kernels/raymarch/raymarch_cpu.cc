// CPU handlers of dhjax's ray marching and volume compositing (XLA FFI): march, composite forward,
// composite backward. The rules are defined in dhjax/ops/raymarch.py and raymarch_common.h; the
// pure-JAX reference there is the oracle (march: bit-exact; composite: to float rounding).
//
// Operands (leading dims "..." flattened into G groups; every operand has the same leading dims):
//   march:   origins [...,R,3] f32, directions [...,R,3] f32, grid [...,D,D,D] u8, box_min/max
//            [...,3] f32, attribute step f32 -> t, delta [...,C] f32, ray [...,C] s32, ray_start,
//            ray_count [...,R] s32, n_samples [...] s32, complete [...,R] pred.
//   composite forward: sigma [...,C], rgb [...,C,3], t, delta [...,C] f32, ray_start, ray_count
//            [...,R] s32, attribute s_max f32 -> color [...,R,3] (no background), depth [...,R],
//            trans [...,R] (T_end), weights [...,C].
//   composite backward: the same plus d_color, d_depth, d_trans, d_weights -> d_sigma [...,C],
//            d_rgb [...,C,3].
//
// Threads (dhjax::parallel_for) over rays in chunks; march runs a counting pass, a per-group
// exclusive scan (int64, sequential), then a writing pass that marches again. Every output slot
// is written by one ray's task only, so all results are deterministic for any thread count.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "dhjax_parallel.h"
#include "raymarch_common.h"
#include "raymarch_ffi.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace rm = dhjax_raymarch;

namespace {

constexpr int64_t kRayChunk = 64;  // rays per parallel task

template <typename Fn>
void for_rays(int64_t n, Fn&& fn) {
  const int64_t chunks = (n + kRayChunk - 1) / kRayChunk;
  dhjax::parallel_for(chunks, [&](int64_t c, int) {
    const int64_t end = std::min(n, (c + 1) * kRayChunk);
    for (int64_t i = c * kRayChunk; i < end; ++i) fn(i);
  });
}

ffi::Error MarchImpl(ffi::Buffer<ffi::F32> origins, ffi::Buffer<ffi::F32> directions, ffi::Buffer<ffi::U8> grid,
                     ffi::Buffer<ffi::F32> box_min, ffi::Buffer<ffi::F32> box_max, float step,
                     ffi::ResultBuffer<ffi::F32> t_out, ffi::ResultBuffer<ffi::F32> delta_out,
                     ffi::ResultBuffer<ffi::S32> ray_out, ffi::ResultBuffer<ffi::S32> start_out,
                     ffi::ResultBuffer<ffi::S32> count_out, ffi::ResultBuffer<ffi::S32> n_out,
                     ffi::ResultBuffer<ffi::PRED> complete_out) {
  rm::MarchDims m;
  if (auto e = rm::march_dims(origins.dimensions(), directions.dimensions(), grid.dimensions(), box_min.dimensions(),
                              box_max.dimensions(), t_out->dimensions(), &m);
      e.failure())
    return e;
  if (!(step > 0.0f) || !std::isfinite(step)) {
    return ffi::Error::InvalidArgument("dhjax_raymarch: step must be a positive finite float");
  }
  const float* O = origins.typed_data();
  const float* Dr = directions.typed_data();
  const uint8_t* Gr = grid.typed_data();
  const float* Bmn = box_min.typed_data();
  const float* Bmx = box_max.typed_data();
  float* T = t_out->typed_data();
  float* Dl = delta_out->typed_data();
  int32_t* Ry = ray_out->typed_data();
  int32_t* St = start_out->typed_data();
  int32_t* Ct = count_out->typed_data();
  int32_t* Ns = n_out->typed_data();
  bool* Cp = complete_out->typed_data();
  const int64_t G = m.G, R = m.R, C = m.C, D = m.D, D3 = D * D * D;
  const int32_t Di = static_cast<int32_t>(D);

  // 1. True per-ray counts.
  std::vector<int32_t> counts(static_cast<size_t>(G * R), 0);
  for_rays(G * R, [&](int64_t i) {
    const int64_t g = i / R;
    const float *o = O + 3 * i, *d = Dr + 3 * i, *bmn = Bmn + 3 * g, *bmx = Bmx + 3 * g;
    const uint8_t* gg = Gr + g * D3;
    float t0 = 0.0f;
    const int32_t K = D3 > 0 ? rm::ray_range(o, d, bmn, bmx, step, &t0) : 0;
    int32_t n = 0;
    for (int32_t k = 0; k < K; ++k) n += gg[rm::cell_of(o, d, bmn, bmx, rm::sample_t(t0, k, step), Di)] != 0;
    counts[i] = n;
  });
  // 2. Exclusive scan per group.
  for (int64_t g = 0; g < G; ++g) {
    int64_t acc = 0;
    for (int64_t r = 0; r < R; ++r) {
      St[g * R + r] = static_cast<int32_t>(std::min<int64_t>(acc, std::numeric_limits<int32_t>::max()));
      acc += counts[g * R + r];
    }
    if (acc > std::numeric_limits<int32_t>::max()) {
      return ffi::Error::InvalidArgument("dhjax_raymarch: more than 2^31 - 1 samples in one group (" +
                                         std::to_string(acc) + "); use a larger step or fewer rays per group");
    }
    Ns[g] = static_cast<int32_t>(acc);
  }
  // 3. Unused slots, then every ray's stored samples.
  std::fill(T, T + G * C, 0.0f);
  std::fill(Dl, Dl + G * C, 0.0f);
  std::fill(Ry, Ry + G * C, -1);
  for_rays(G * R, [&](int64_t i) {
    const int64_t g = i / R;
    const int64_t start = St[i];
    const int64_t stored = std::max<int64_t>(0, std::min<int64_t>(counts[i], C - start));
    Ct[i] = static_cast<int32_t>(stored);
    Cp[i] = stored == counts[i];
    if (stored == 0) return;
    const float *o = O + 3 * i, *d = Dr + 3 * i, *bmn = Bmn + 3 * g, *bmx = Bmx + 3 * g;
    const uint8_t* gg = Gr + g * D3;
    float t0 = 0.0f;
    const int32_t K = rm::ray_range(o, d, bmn, bmx, step, &t0);
    int64_t j = g * C + start;
    const int64_t stop = j + stored;
    const int32_t r = static_cast<int32_t>(i - g * R);
    for (int32_t k = 0; k < K && j < stop; ++k) {
      const float tk = rm::sample_t(t0, k, step);
      if (gg[rm::cell_of(o, d, bmn, bmx, tk, Di)] == 0) continue;
      T[j] = tk;
      Dl[j] = step;
      Ry[j] = r;
      ++j;
    }
  });
  return ffi::Error::Success();
}

ffi::Error CompositeForwardImpl(ffi::Buffer<ffi::F32> sigma, ffi::Buffer<ffi::F32> rgb, ffi::Buffer<ffi::F32> t,
                                ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::S32> ray_start,
                                ffi::Buffer<ffi::S32> ray_count, float s_max, ffi::ResultBuffer<ffi::F32> color,
                                ffi::ResultBuffer<ffi::F32> depth, ffi::ResultBuffer<ffi::F32> trans,
                                ffi::ResultBuffer<ffi::F32> weights) {
  rm::CompositeDims c;
  if (auto e = rm::composite_dims(sigma.dimensions(), rgb.dimensions(), t.dimensions(), delta.dimensions(),
                                  ray_start.dimensions(), ray_count.dimensions(), &c);
      e.failure())
    return e;
  const float *Sg = sigma.typed_data(), *Rgb = rgb.typed_data(), *Tt = t.typed_data(), *Dl = delta.typed_data();
  const int32_t *St = ray_start.typed_data(), *Ct = ray_count.typed_data();
  float *Co = color->typed_data(), *De = depth->typed_data(), *Tr = trans->typed_data(), *W = weights->typed_data();
  std::fill(W, W + c.G * c.C, 0.0f);
  for_rays(c.G * c.R, [&](int64_t i) {
    const int64_t g = i / c.R, base = g * c.C;
    int64_t lo, hi;
    rm::ray_slots(St[i], Ct[i], c.C, &lo, &hi);
    rm::composite_forward_ray(Sg + base, Rgb + 3 * base, Tt + base, Dl + base, lo, hi, s_max, Co + 3 * i, De + i,
                              Tr + i, W + base);
  });
  return ffi::Error::Success();
}

ffi::Error CompositeBackwardImpl(ffi::Buffer<ffi::F32> sigma, ffi::Buffer<ffi::F32> rgb, ffi::Buffer<ffi::F32> t,
                                 ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::S32> ray_start,
                                 ffi::Buffer<ffi::S32> ray_count, ffi::Buffer<ffi::F32> d_color,
                                 ffi::Buffer<ffi::F32> d_depth, ffi::Buffer<ffi::F32> d_trans,
                                 ffi::Buffer<ffi::F32> d_weights, float s_max, ffi::ResultBuffer<ffi::F32> d_sigma,
                                 ffi::ResultBuffer<ffi::F32> d_rgb) {
  rm::CompositeDims c;
  if (auto e = rm::composite_dims(sigma.dimensions(), rgb.dimensions(), t.dimensions(), delta.dimensions(),
                                  ray_start.dimensions(), ray_count.dimensions(), &c);
      e.failure())
    return e;
  if (d_color.element_count() != static_cast<size_t>(3 * c.G * c.R) ||
      d_depth.element_count() != static_cast<size_t>(c.G * c.R) ||
      d_trans.element_count() != static_cast<size_t>(c.G * c.R) ||
      d_weights.element_count() != static_cast<size_t>(c.G * c.C)) {
    return ffi::Error::InvalidArgument("dhjax_raymarch: cotangent shapes do not match the forward's results");
  }
  const float *Sg = sigma.typed_data(), *Rgb = rgb.typed_data(), *Tt = t.typed_data(), *Dl = delta.typed_data();
  const int32_t *St = ray_start.typed_data(), *Ct = ray_count.typed_data();
  const float *Gc = d_color.typed_data(), *Gd = d_depth.typed_data(), *Gt = d_trans.typed_data(),
              *Gw = d_weights.typed_data();
  float *Ds = d_sigma->typed_data(), *Dr = d_rgb->typed_data();
  std::fill(Ds, Ds + c.G * c.C, 0.0f);
  std::fill(Dr, Dr + 3 * c.G * c.C, 0.0f);
  for_rays(c.G * c.R, [&](int64_t i) {
    const int64_t g = i / c.R, base = g * c.C;
    int64_t lo, hi;
    rm::ray_slots(St[i], Ct[i], c.C, &lo, &hi);
    rm::composite_backward_ray(Sg + base, Rgb + 3 * base, Tt + base, Dl + base, lo, hi, s_max, Gc + 3 * i, Gd[i],
                               Gt[i], Gw + base, Ds + base, Dr + 3 * base);
  });
  return ffi::Error::Success();
}

}  // namespace

DHJAX_EXPORT_ABI()

XLA_FFI_DEFINE_HANDLER_SYMBOL(RaymarchMarch, MarchImpl, ffi::Ffi::Bind() DHJAX_RAYMARCH_MARCH_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RaymarchCompositeForward, CompositeForwardImpl,
                              ffi::Ffi::Bind() DHJAX_RAYMARCH_COMPOSITE_FWD_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RaymarchCompositeBackward, CompositeBackwardImpl,
                              ffi::Ffi::Bind() DHJAX_RAYMARCH_COMPOSITE_BWD_SIGNATURE);

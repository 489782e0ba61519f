// CPU handlers of dhjax's tile-based Gaussian compositing (XLA FFI): forward and backward.
//
// The image formation is defined in dhjax/ops/splat.py (module docstring) and implemented there
// in pure JAX as the oracle; this file must agree with it bit for bit in its decisions (tile
// binning from the given rects, depth order with index tie-break, power > 0 and alpha < 1/255
// skips, the 1e-4 transmittance stop) and to float rounding in its values.
//
// Inputs (leading batch dims "..." flattened to B cameras):
//   means2d [...,N,2] f32, conics [...,N,3] f32, colors [...,N,K] f32, opacities [...,N] f32,
//   depths [...,N] f32, rects [...,N,4] s32 (tx0, ty0, tx1, ty1), half-open.
// Forward results: out [...,H,W,K] f32, transmittance [...,H,W] f32, last [...,H,W] s32 (number
//   of entries of the pixel's tile list that were walked, i.e. one past the last composited).
// Backward extra inputs: out, transmittance, last, d_out [...,H,W,K], d_transmittance [...,H,W].
// Backward results: d_means2d, d_conics, d_colors, d_opacities (shapes of the inputs).
//
// Work is split over tiles with dhjax::parallel_for; each tile sorts its own list. The backward
// walks each pixel front to back again (exact transmittances) and uses
//   dC_k/dalpha_i = c_ik T_i - (C_k - P_ik) / (1 - alpha_i),   dT/dalpha_i = -T / (1 - alpha_i)
// with P_ik the composited prefix up to and including i. Each tile sums its pixels' gradients
// per list entry into its own slice of a buffer laid out like the tile lists (one record per
// (tile, Gaussian) intersection); then every Gaussian sums its records in tile order. No atomics
// and no per-thread buffers: the gradients are the same bits for any thread count and any
// scheduling. So dhjax/ops/splat.py registers SplatBackward as both dhjax_splat_bwd and
// dhjax_splat_bwd_deterministic (the target that `deterministic=True` asks for; on CUDA it is
// a separate handler).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include "dhjax_parallel.h"
#include "splat_common.h"
#include "splat_ffi.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace dhjax_splat;  // constants, Dims, checks and tile helpers (splat_common.h)

// Tile lists of one camera: offsets [T+1] into ids (Gaussian indices, tile-major; within a tile
// in increasing index order until the forward sorts them by depth). With slots: Gaussian i's
// entries are ids[slots[s]] for s in [slot_offsets[i], slot_offsets[i+1]), tiles in row-major
// order.
struct Bins {
  std::vector<int64_t> offsets;
  std::vector<int32_t> ids;
  std::vector<int64_t> slot_offsets, slots;
};

void bin_camera(const Dims& d, const int32_t* rects, Bins& bins, bool with_slots = false) {
  const int64_t T = d.T;
  bins.offsets.assign(T + 1, 0);
  if (with_slots) bins.slot_offsets.assign(d.N + 1, 0);
  int x0, y0, x1, y1;
  for (int64_t i = 0; i < d.N; ++i) {
    if (!clamp_rect(rects + 4 * i, d.tx, d.ty, x0, y0, x1, y1)) continue;
    for (int y = y0; y < y1; ++y)
      for (int x = x0; x < x1; ++x) ++bins.offsets[y * d.tx + x + 1];
    if (with_slots) bins.slot_offsets[i + 1] = static_cast<int64_t>(x1 - x0) * (y1 - y0);
  }
  for (int64_t t = 0; t < T; ++t) bins.offsets[t + 1] += bins.offsets[t];
  bins.ids.resize(bins.offsets[T]);
  if (with_slots) {
    for (int64_t i = 0; i < d.N; ++i) bins.slot_offsets[i + 1] += bins.slot_offsets[i];
    bins.slots.resize(bins.offsets[T]);
  }
  std::vector<int64_t> cursor(bins.offsets.begin(), bins.offsets.end() - 1);
  for (int64_t i = 0; i < d.N; ++i) {
    if (!clamp_rect(rects + 4 * i, d.tx, d.ty, x0, y0, x1, y1)) continue;
    int64_t s = with_slots ? bins.slot_offsets[i] : 0;
    for (int y = y0; y < y1; ++y) {
      for (int x = x0; x < x1; ++x) {
        const int64_t slot = cursor[y * d.tx + x]++;
        bins.ids[slot] = static_cast<int32_t>(i);
        if (with_slots) bins.slots[s++] = slot;
      }
    }
  }
}

// Depth order of the tile lists: NaN depths sort last (they never arrive: culled Gaussians have
// no rect). Used with a stable sort of lists in increasing index order (the index tie-break).
inline bool depth_less(float da, float db) {
  if (std::isnan(db)) return !std::isnan(da);
  return da < db;
}

// Sorts one tile's list of Gaussian indices by depth, in place.
void sort_tile(const float* depths, int32_t* begin, int32_t* end) {
  std::stable_sort(begin, end, [depths](int32_t a, int32_t b) { return depth_less(depths[a], depths[b]); });
}

// Calls fn(px, py) for the pixels of tile t, row by row.
template <typename Fn>
void for_tile_pixels(const Dims& d, int64_t t, Fn&& fn) {
  const int x0 = tile_x0(t, d.tx), y0 = tile_y0(t, d.tx);
  for (int py = y0; py < std::min<int64_t>(y0 + kTile, d.H); ++py)
    for (int px = x0; px < std::min<int64_t>(x0 + kTile, d.W); ++px) fn(px, py);
}

// Gathered parameters of one tile's list, contiguous for the pixel loops.
struct TileData {
  std::vector<float> mx, my, ca, cb, cc, op, col;  // col: [n, K]
  // skip[j]: below this power, o exp(power) < 1/255 for sure (log(1/(255 o)) minus a margin far
  // above float rounding), so the pixel loops skip the exp; the exact test decides the rest.
  std::vector<float> skip;
  // Opacity of Gaussian j at pixel (fx, fy): offset (dx, dy) = pixel - mean, g = exp(power),
  // raw = o g, alpha = min(0.99, raw). False where the Gaussian is skipped: the numerical guard
  // (power > 0), alpha certainly below 1/255 (no exp evaluated), or alpha < 1/255. Forward and
  // backward share this so they make the same decisions.
  bool eval_alpha(int64_t j, float fx, float fy, float& dx, float& dy, float& g, float& raw, float& alpha) const {
    dx = fx - mx[j];
    dy = fy - my[j];
    const float p = power(ca[j], cb[j], cc[j], dx, dy);
    if (p > 0.0f || p < skip[j]) return false;
    g = std::exp(p);
    raw = op[j] * g;
    alpha = std::min(kAlphaMax, raw);
    return !(alpha < kAlphaMin);
  }
  void gather(const int32_t* ids, int64_t n, int64_t K, const float* means2d, const float* conics,
              const float* colors, const float* opac) {
    mx.resize(n); my.resize(n); ca.resize(n); cb.resize(n); cc.resize(n); op.resize(n);
    skip.resize(n);
    col.resize(n * K);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t g = ids[j];
      mx[j] = means2d[2 * g]; my[j] = means2d[2 * g + 1];
      ca[j] = conics[3 * g]; cb[j] = conics[3 * g + 1]; cc[j] = conics[3 * g + 2];
      op[j] = opac[g];
      skip[j] = op[j] > 0.0f ? std::log(kAlphaMin / op[j]) - 1e-3f : std::numeric_limits<float>::infinity();
      std::memcpy(&col[j * K], colors + g * K, sizeof(float) * K);
    }
  }
};

ffi::Error SplatForwardImpl(ffi::Buffer<ffi::F32> means2d, ffi::Buffer<ffi::F32> conics,
                            ffi::Buffer<ffi::F32> colors, ffi::Buffer<ffi::F32> opac,
                            ffi::Buffer<ffi::F32> depths, ffi::Buffer<ffi::S32> rects,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> trans,
                            ffi::ResultBuffer<ffi::S32> last) {
  Dims d;
  if (auto e = get_dims(means2d.dimensions(), out->dimensions(), &d); e.failure()) return e;
  if (auto e = check_inputs(d, conics, colors, opac, depths, rects); e.failure()) return e;
  if (auto e = check_forward_results(d, trans->element_count(), last->element_count()); e.failure())
    return e;
  const int64_t K = d.K, HW = d.H * d.W;
  Bins bins;
  for (int64_t b = 0; b < d.B; ++b) {
    const float* m2 = means2d.typed_data() + b * d.N * 2;
    const float* cn = conics.typed_data() + b * d.N * 3;
    const float* cl = colors.typed_data() + b * d.N * K;
    const float* op = opac.typed_data() + b * d.N;
    const float* dp = depths.typed_data() + b * d.N;
    const int32_t* rc = rects.typed_data() + b * d.N * 4;
    float* o_img = out->typed_data() + b * HW * K;
    float* o_t = trans->typed_data() + b * HW;
    int32_t* o_last = last->typed_data() + b * HW;
    bin_camera(d, rc, bins);
    dhjax::parallel_for(d.T, [&](int64_t t, int) {
      const int64_t begin = bins.offsets[t], n = bins.offsets[t + 1] - begin;
      int32_t* ids = bins.ids.data() + begin;
      sort_tile(dp, ids, ids + n);
      TileData td;
      td.gather(ids, n, K, m2, cn, cl, op);
      std::vector<float> acc(K);
      for_tile_pixels(d, t, [&](int px, int py) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        float tr = 1.0f;
        int32_t walked = 0;
        const float fx = static_cast<float>(px), fy = static_cast<float>(py);
        float dx, dy, g, raw, alpha;
        for (int64_t j = 0; j < n; ++j) {
          if (!td.eval_alpha(j, fx, fy, dx, dy, g, raw, alpha)) continue;
          const float next_t = tr * (1.0f - alpha);
          if (next_t < kTMin) break;
          const float w = alpha * tr;
          const float* c = &td.col[j * K];
          for (int64_t k = 0; k < K; ++k) acc[k] += w * c[k];
          tr = next_t;
          walked = static_cast<int32_t>(j + 1);
        }
        const int64_t p = static_cast<int64_t>(py) * d.W + px;
        std::memcpy(o_img + p * K, acc.data(), sizeof(float) * K);
        o_t[p] = tr;
        o_last[p] = walked;
      });
    });
  }
  return ffi::Error::Success();
}

ffi::Error SplatBackwardImpl(ffi::Buffer<ffi::F32> means2d, ffi::Buffer<ffi::F32> conics,
                             ffi::Buffer<ffi::F32> colors, ffi::Buffer<ffi::F32> opac,
                             ffi::Buffer<ffi::F32> depths, ffi::Buffer<ffi::S32> rects,
                             ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> trans,
                             ffi::Buffer<ffi::S32> last, ffi::Buffer<ffi::F32> d_out,
                             ffi::Buffer<ffi::F32> d_trans, ffi::ResultBuffer<ffi::F32> g_means2d,
                             ffi::ResultBuffer<ffi::F32> g_conics, ffi::ResultBuffer<ffi::F32> g_colors,
                             ffi::ResultBuffer<ffi::F32> g_opac) {
  Dims d;
  if (auto e = get_dims(means2d.dimensions(), out.dimensions(), &d); e.failure()) return e;
  if (auto e = check_inputs(d, conics, colors, opac, depths, rects); e.failure()) return e;
  if (auto e = check_backward(d, trans, last, d_out, d_trans, g_means2d, g_conics, g_colors, g_opac);
      e.failure())
    return e;
  const int64_t K = d.K, HW = d.H * d.W, N = d.N;
  const int64_t stride = 2 + 3 + K + 1;  // per-intersection gradient record: mean, conic, colour, opacity
  // records[e * stride ...]: gradient of tile list entry e (the layout of bins.ids), written only
  // by the task of e's tile; sized for the largest camera.
  std::unique_ptr<float[]> records;
  int64_t records_size = 0;
  Bins bins;
  for (int64_t b = 0; b < d.B; ++b) {
    const float* m2 = means2d.typed_data() + b * N * 2;
    const float* cn = conics.typed_data() + b * N * 3;
    const float* cl = colors.typed_data() + b * N * K;
    const float* op = opac.typed_data() + b * N;
    const float* dp = depths.typed_data() + b * N;
    const int32_t* rc = rects.typed_data() + b * N * 4;
    const float* i_img = out.typed_data() + b * HW * K;
    const float* i_t = trans.typed_data() + b * HW;
    const int32_t* i_last = last.typed_data() + b * HW;
    const float* gi = d_out.typed_data() + b * HW * K;
    const float* gt = d_trans.typed_data() + b * HW;
    bin_camera(d, rc, bins, /*with_slots=*/true);
    const int64_t M = bins.offsets[d.T];
    if (M * stride > records_size) {
      records_size = M * stride;
      records.reset(new float[records_size]);
    }
    dhjax::parallel_for(d.T, [&](int64_t t, int) {
      const int64_t begin = bins.offsets[t], n = bins.offsets[t + 1] - begin;
      if (n == 0) return;
      const int32_t* ids = bins.ids.data() + begin;
      // order[j]: the list position (in bins.ids, index order) of the j-th Gaussian by depth.
      std::vector<int32_t> order(n), sorted(n);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [dp, ids](int32_t a, int32_t c) { return depth_less(dp[ids[a]], dp[ids[c]]); });
      for (int64_t j = 0; j < n; ++j) sorted[j] = ids[order[j]];
      TileData td;
      td.gather(sorted.data(), n, K, m2, cn, cl, op);
      float* tile_records = records.get() + begin * stride;
      std::fill(tile_records, tile_records + n * stride, 0.0f);
      std::vector<float> prefix(K), gk(K);
      for_tile_pixels(d, t, [&](int px, int py) {
        const int64_t p = static_cast<int64_t>(py) * d.W + px;
        const int64_t walk = std::min<int64_t>(i_last[p], n);
        if (walk <= 0) return;
        const float t_final = i_t[p], g_t = gt[p];
        const float* c_out = i_img + p * K;
        bool any = g_t != 0.0f;
        for (int64_t k = 0; k < K; ++k) {
          gk[k] = gi[p * K + k];
          any = any || gk[k] != 0.0f;
        }
        if (!any) return;
        std::fill(prefix.begin(), prefix.end(), 0.0f);
        float tr = 1.0f;
        const float fx = static_cast<float>(px), fy = static_cast<float>(py);
        float dx, dy, g, raw, alpha;
        for (int64_t j = 0; j < walk; ++j) {
          if (!td.eval_alpha(j, fx, fy, dx, dy, g, raw, alpha)) continue;
          const float w = alpha * tr;
          const float inv = 1.0f / (1.0f - alpha);
          const float* c = &td.col[j * K];
          float* rec = tile_records + static_cast<int64_t>(order[j]) * stride;
          float d_alpha = -g_t * t_final * inv;
          for (int64_t k = 0; k < K; ++k) {
            rec[5 + k] += w * gk[k];
            prefix[k] += w * c[k];
            d_alpha += gk[k] * (c[k] * tr - (c_out[k] - prefix[k]) * inv);
          }
          tr *= (1.0f - alpha);
          if (raw > kAlphaMax) continue;  // clamped: alpha no longer depends on o or the Gaussian
          rec[5 + K] += d_alpha * g;
          const float d_power = d_alpha * raw;
          rec[0] += d_power * (td.ca[j] * dx + td.cb[j] * dy);
          rec[1] += d_power * (td.cc[j] * dy + td.cb[j] * dx);
          rec[2] += d_power * (-0.5f * dx * dx);
          rec[3] += d_power * (-dx * dy);
          rec[4] += d_power * (-0.5f * dy * dy);
        }
      });
    });
    // Every Gaussian sums its records in tile order: a fixed order, whatever ran where.
    float* o_m = g_means2d->typed_data() + b * N * 2;
    float* o_q = g_conics->typed_data() + b * N * 3;
    float* o_c = g_colors->typed_data() + b * N * K;
    float* o_o = g_opac->typed_data() + b * N;
    constexpr int64_t kChunk = 4096;
    dhjax::parallel_for((N + kChunk - 1) / kChunk, [&](int64_t chunk, int) {
      std::vector<float> r(stride);
      const int64_t i0 = chunk * kChunk, i1 = std::min<int64_t>(N, i0 + kChunk);
      for (int64_t i = i0; i < i1; ++i) {
        std::fill(r.begin(), r.end(), 0.0f);
        for (int64_t s = bins.slot_offsets[i]; s < bins.slot_offsets[i + 1]; ++s) {
          const float* rec = records.get() + bins.slots[s] * stride;
          for (int64_t k = 0; k < stride; ++k) r[k] += rec[k];
        }
        o_m[2 * i] = r[0]; o_m[2 * i + 1] = r[1];
        o_q[3 * i] = r[2]; o_q[3 * i + 1] = r[3]; o_q[3 * i + 2] = r[4];
        for (int64_t k = 0; k < K; ++k) o_c[i * K + k] = r[5 + k];
        o_o[i] = r[5 + K];
      }
    });
  }
  return ffi::Error::Success();
}

}  // namespace

DHJAX_EXPORT_ABI()

XLA_FFI_DEFINE_HANDLER_SYMBOL(SplatForward, SplatForwardImpl,
                              ffi::Ffi::Bind() DHJAX_SPLAT_FORWARD_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SplatBackward, SplatBackwardImpl,
                              ffi::Ffi::Bind() DHJAX_SPLAT_BACKWARD_SIGNATURE);

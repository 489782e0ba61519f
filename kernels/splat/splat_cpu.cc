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
// with P_ik the composited prefix up to and including i. Gradients of a tile are summed locally,
// then into per-thread buffers that are reduced at the end (no atomics, deterministic for a
// fixed thread count up to the order of the final reduction).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "dhjax_parallel.h"
#include "splat_ffi.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 16;
constexpr float kAlphaMin = 1.0f / 255.0f;
constexpr float kAlphaMax = 0.99f;
constexpr float kTMin = 1e-4f;

struct Dims {
  int64_t B = 1, N = 0, K = 0, H = 0, W = 0;
  int tx = 0, ty = 0;
};

// Tile lists of one camera: offsets [T+1] into ids (Gaussian indices, tile-major, unsorted).
struct Bins {
  std::vector<int64_t> offsets;
  std::vector<int32_t> ids;
};

void bin_camera(const Dims& d, const int32_t* rects, Bins& bins) {
  const int T = d.tx * d.ty;
  bins.offsets.assign(T + 1, 0);
  for (int64_t i = 0; i < d.N; ++i) {
    const int32_t* r = rects + 4 * i;
    const int x0 = std::max(r[0], 0), y0 = std::max(r[1], 0);
    const int x1 = std::min(r[2], d.tx), y1 = std::min(r[3], d.ty);
    for (int y = y0; y < y1; ++y)
      for (int x = x0; x < x1; ++x) ++bins.offsets[y * d.tx + x + 1];
  }
  for (int t = 0; t < T; ++t) bins.offsets[t + 1] += bins.offsets[t];
  bins.ids.resize(bins.offsets[T]);
  std::vector<int64_t> cursor(bins.offsets.begin(), bins.offsets.end() - 1);
  for (int64_t i = 0; i < d.N; ++i) {
    const int32_t* r = rects + 4 * i;
    const int x0 = std::max(r[0], 0), y0 = std::max(r[1], 0);
    const int x1 = std::min(r[2], d.tx), y1 = std::min(r[3], d.ty);
    for (int y = y0; y < y1; ++y)
      for (int x = x0; x < x1; ++x) bins.ids[cursor[y * d.tx + x]++] = static_cast<int32_t>(i);
  }
}

// Sorts one tile's list by depth; ids arrive in increasing index order, so a stable sort gives
// the index tie-break. NaN depths sort last (they never arrive: culled Gaussians have no rect).
void sort_tile(const float* depths, int32_t* begin, int32_t* end) {
  std::stable_sort(begin, end, [depths](int32_t a, int32_t b) {
    const float da = depths[a], db = depths[b];
    if (std::isnan(db)) return !std::isnan(da);
    return da < db;
  });
}

// Gathered parameters of one tile's list, contiguous for the pixel loops.
struct TileData {
  std::vector<float> mx, my, ca, cb, cc, op, col;  // col: [n, K]
  // skip[j]: below this power, o exp(power) < 1/255 for sure (log(1/(255 o)) minus a margin far
  // above float rounding), so the pixel loops skip the exp; the exact test decides the rest.
  std::vector<float> skip;
  // Exponent of Gaussian j at offset (dx, dy) = pixel - mean: -(a dx^2 + c dy^2)/2 - b dx dy.
  float power(int64_t j, float dx, float dy) const {
    return -0.5f * (ca[j] * dx * dx + cc[j] * dy * dy) - cb[j] * dx * dy;
  }
  // Skipped before any exp: the numerical guard (power > 0) or alpha certainly below 1/255.
  // Forward and backward share this so they make the same decisions.
  bool skipped(int64_t j, float p) const { return p > 0.0f || p < skip[j]; }
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

ffi::Error check_inputs(const Dims& d, ffi::Buffer<ffi::F32>& means2d, ffi::Buffer<ffi::F32>& conics,
                        ffi::Buffer<ffi::F32>& colors, ffi::Buffer<ffi::F32>& opac,
                        ffi::Buffer<ffi::F32>& depths, ffi::Buffer<ffi::S32>& rects) {
  const int64_t BN = d.B * d.N;
  if (static_cast<int64_t>(conics.element_count()) != BN * 3 ||
      static_cast<int64_t>(colors.element_count()) != BN * d.K ||
      static_cast<int64_t>(opac.element_count()) != BN ||
      static_cast<int64_t>(depths.element_count()) != BN ||
      static_cast<int64_t>(rects.element_count()) != BN * 4 ||
      static_cast<int64_t>(means2d.element_count()) != BN * 2)
    return ffi::Error::InvalidArgument("dhjax_splat: input sizes do not match means2d [...,N,2]");
  return ffi::Error::Success();
}

Dims dims_from(ffi::Buffer<ffi::F32>& means2d, const ffi::Span<const int64_t>& out_dims) {
  Dims d;
  auto md = means2d.dimensions();
  d.N = md[md.size() - 2];
  d.B = 1;
  for (size_t i = 0; i + 2 < md.size(); ++i) d.B *= md[i];
  const size_t r = out_dims.size();
  d.H = out_dims[r - 3];
  d.W = out_dims[r - 2];
  d.K = out_dims[r - 1];
  d.tx = static_cast<int>((d.W + kTile - 1) / kTile);
  d.ty = static_cast<int>((d.H + kTile - 1) / kTile);
  return d;
}

ffi::Error SplatForwardImpl(ffi::Buffer<ffi::F32> means2d, ffi::Buffer<ffi::F32> conics,
                            ffi::Buffer<ffi::F32> colors, ffi::Buffer<ffi::F32> opac,
                            ffi::Buffer<ffi::F32> depths, ffi::Buffer<ffi::S32> rects,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> trans,
                            ffi::ResultBuffer<ffi::S32> last) {
  const Dims d = dims_from(means2d, out->dimensions());
  if (auto err = check_inputs(d, means2d, conics, colors, opac, depths, rects); err.failure()) return err;
  const int64_t K = d.K, HW = d.H * d.W;
  const int T = d.tx * d.ty;
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
    dhjax::parallel_for(T, [&](int64_t t, int) {
      const int64_t begin = bins.offsets[t], n = bins.offsets[t + 1] - begin;
      int32_t* ids = bins.ids.data() + begin;
      sort_tile(dp, ids, ids + n);
      TileData td;
      td.gather(ids, n, K, m2, cn, cl, op);
      std::vector<float> acc(K);
      const int x_base = static_cast<int>(t % d.tx) * kTile, y_base = static_cast<int>(t / d.tx) * kTile;
      for (int py = y_base; py < std::min<int64_t>(y_base + kTile, d.H); ++py) {
        for (int px = x_base; px < std::min<int64_t>(x_base + kTile, d.W); ++px) {
          std::fill(acc.begin(), acc.end(), 0.0f);
          float tr = 1.0f;
          int32_t walked = 0;
          const float fx = static_cast<float>(px), fy = static_cast<float>(py);
          for (int64_t j = 0; j < n; ++j) {
            const float dx = fx - td.mx[j], dy = fy - td.my[j];
            const float power = td.power(j, dx, dy);
            if (td.skipped(j, power)) continue;
            const float alpha = std::min(kAlphaMax, td.op[j] * std::exp(power));
            if (alpha < kAlphaMin) continue;
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
        }
      }
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
  const Dims d = dims_from(means2d, out.dimensions());
  if (auto err = check_inputs(d, means2d, conics, colors, opac, depths, rects); err.failure()) return err;
  const int64_t K = d.K, HW = d.H * d.W, N = d.N;
  const int T = d.tx * d.ty;
  const int64_t stride = 2 + 3 + K + 1;  // per-Gaussian gradient record: mean, conic, colour, opacity
  const int threads = dhjax::max_threads_for(T);
  std::vector<std::vector<float>> per_thread(threads);
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
    for (auto& buf : per_thread) buf.assign(N * stride, 0.0f);
    bin_camera(d, rc, bins);
    dhjax::parallel_for(T, [&](int64_t t, int thread) {
      const int64_t begin = bins.offsets[t], n = bins.offsets[t + 1] - begin;
      if (n == 0) return;
      int32_t* ids = bins.ids.data() + begin;
      sort_tile(dp, ids, ids + n);
      TileData td;
      td.gather(ids, n, K, m2, cn, cl, op);
      std::vector<float> local(n * stride, 0.0f), prefix(K), gk(K);
      const int x_base = static_cast<int>(t % d.tx) * kTile, y_base = static_cast<int>(t / d.tx) * kTile;
      for (int py = y_base; py < std::min<int64_t>(y_base + kTile, d.H); ++py) {
        for (int px = x_base; px < std::min<int64_t>(x_base + kTile, d.W); ++px) {
          const int64_t p = static_cast<int64_t>(py) * d.W + px;
          const int64_t walk = std::min<int64_t>(i_last[p], n);
          if (walk == 0) continue;
          const float t_final = i_t[p], g_t = gt[p];
          const float* c_out = i_img + p * K;
          bool any = g_t != 0.0f;
          for (int64_t k = 0; k < K; ++k) {
            gk[k] = gi[p * K + k];
            any = any || gk[k] != 0.0f;
          }
          if (!any) continue;
          std::fill(prefix.begin(), prefix.end(), 0.0f);
          float tr = 1.0f;
          const float fx = static_cast<float>(px), fy = static_cast<float>(py);
          for (int64_t j = 0; j < walk; ++j) {
            const float dx = fx - td.mx[j], dy = fy - td.my[j];
            const float power = td.power(j, dx, dy);
            if (td.skipped(j, power)) continue;
            const float g = std::exp(power);
            const float raw = td.op[j] * g;
            const float alpha = std::min(kAlphaMax, raw);
            if (alpha < kAlphaMin) continue;
            const float w = alpha * tr;
            const float inv = 1.0f / (1.0f - alpha);
            const float* c = &td.col[j * K];
            float* rec = &local[j * stride];
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
        }
      }
      float* acc = per_thread[thread].data();
      for (int64_t j = 0; j < n; ++j) {
        float* dst = acc + static_cast<int64_t>(ids[j]) * stride;
        const float* src = &local[j * stride];
        for (int64_t s = 0; s < stride; ++s) dst[s] += src[s];
      }
    });
    float* o_m = g_means2d->typed_data() + b * N * 2;
    float* o_q = g_conics->typed_data() + b * N * 3;
    float* o_c = g_colors->typed_data() + b * N * K;
    float* o_o = g_opac->typed_data() + b * N;
    dhjax::parallel_for((N + 4095) / 4096, [&](int64_t chunk, int) {
      const int64_t i0 = chunk * 4096, i1 = std::min<int64_t>(N, i0 + 4096);
      for (int64_t i = i0; i < i1; ++i) {
        float rec[64];
        std::vector<float> big;
        float* r = rec;
        if (stride > 64) { big.assign(stride, 0.0f); r = big.data(); }
        std::fill(r, r + stride, 0.0f);
        for (const auto& buf : per_thread)
          for (int64_t s = 0; s < stride; ++s) r[s] += buf[i * stride + s];
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

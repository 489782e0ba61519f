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
// Work is split over tiles with dhjax::parallel_for; each tile sorts its own list. Within a tile,
// both passes go row by row: for each Gaussian in depth order, one SIMD test over the row's 16
// pixels (`row_power`: the exponent and its two skip tests, the same float operations as the
// scalar rule) picks the pixels it may reach, exp runs on the groups of four that hold them
// (`row_exp`: glibc's expf algorithm in double lanes; equal to x86-64 glibc's std::exp, see
// there), and the compositing (or its gradient) updates them four at a time with masked vector
// operations. A pixel still sees its Gaussians in depth order and a Gaussian's record still
// sums its pixels in row-major order, so the results are the same bits as a pixel-by-pixel loop (on targets that
// fused multiply-adds by default, e.g. aarch64, earlier builds did not follow the rule's
// left-to-right rounding; -ffp-contract=off now makes every build do so). The backward
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
#include <cfloat>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#if defined(__SSE2__) && !defined(DHJAX_SPLAT_SCALAR)
#include <emmintrin.h>
#endif

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

// Gathered parameters of one tile's list, contiguous for the pixel loops.
struct TileData {
  std::vector<float> mx, my, ca, cb, cc, op, col;  // col: [n, K]
  // skip[j]: below this power, o exp(power) < 1/255 for sure (log(1/(255 o)) minus a margin far
  // above float rounding), so the pixel loops skip the exp; the exact test decides the rest.
  std::vector<float> skip;
  // The pixel rule, which forward and backward both apply (row_power, row_exp and the masked
  // updates; the CUDA handlers' eval_alpha is the same rule): Gaussian j at pixel (fx, fy) has
  // offset (dx, dy) = (fx - mx, fy - my), p = power(a, b, c, dx, dy) and is skipped where
  // p > 0 (the numerical guard) or p < skip[j] (no exp evaluated); else g = exp(p) (row_exp),
  // raw = o g, alpha = std::min(0.99f, raw), and it is skipped where alpha < 1/255.
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

// ---------------------------------------------------------------------------------------------
// Four float lanes: SSE2 where the target has it (every x86-64), plain arrays elsewhere. Each
// operation is one IEEE operation per lane, as the scalar code's, so both give its bits (no
// fused multiply-adds: the CPU targets are built with -ffp-contract=off).
#if defined(__SSE2__) && !defined(DHJAX_SPLAT_SCALAR)
struct F4 { __m128 v; };
struct M4 { __m128 v; };  // lane masks: all bits set or clear
inline F4 f4(float x) { return {_mm_set1_ps(x)}; }
inline F4 load4(const float* p) { return {_mm_loadu_ps(p)}; }
inline void store4(float* p, F4 a) { _mm_storeu_ps(p, a.v); }
inline F4 operator+(F4 a, F4 b) { return {_mm_add_ps(a.v, b.v)}; }
inline F4 operator-(F4 a, F4 b) { return {_mm_sub_ps(a.v, b.v)}; }
inline F4 operator*(F4 a, F4 b) { return {_mm_mul_ps(a.v, b.v)}; }
inline F4 operator/(F4 a, F4 b) { return {_mm_div_ps(a.v, b.v)}; }
inline F4 negate(F4 a) { return {_mm_xor_ps(a.v, _mm_set1_ps(-0.0f))}; }
inline F4 min_of(F4 a, F4 b) { return {_mm_min_ps(a.v, b.v)}; }  // a < b ? a : b
inline M4 operator<(F4 a, F4 b) { return {_mm_cmplt_ps(a.v, b.v)}; }
inline M4 operator>(F4 a, F4 b) { return {_mm_cmpgt_ps(a.v, b.v)}; }
inline M4 operator>=(F4 a, F4 b) { return {_mm_cmpge_ps(a.v, b.v)}; }
inline M4 operator&(M4 a, M4 b) { return {_mm_and_ps(a.v, b.v)}; }
inline M4 operator|(M4 a, M4 b) { return {_mm_or_ps(a.v, b.v)}; }
inline M4 and_not(M4 a, M4 b) { return {_mm_andnot_ps(b.v, a.v)}; }  // a & ~b
inline F4 select(M4 m, F4 a, F4 b) { return {_mm_or_ps(_mm_and_ps(m.v, a.v), _mm_andnot_ps(m.v, b.v))}; }
inline uint32_t bits(M4 m) { return static_cast<uint32_t>(_mm_movemask_ps(m.v)); }
inline M4 lanes(uint32_t b) {  // bit l of b -> lane l
  return {_mm_castsi128_ps(_mm_set_epi32(-static_cast<int>((b >> 3) & 1u), -static_cast<int>((b >> 2) & 1u),
                                         -static_cast<int>((b >> 1) & 1u), -static_cast<int>(b & 1u)))};
}
inline F4 iota4(float x) { return {_mm_add_ps(_mm_set1_ps(x), _mm_set_ps(3.0f, 2.0f, 1.0f, 0.0f))}; }
// p[l] = v in the lanes of m, p[l] kept in the others (integers: no rounding involved).
inline void store_where(int32_t* p, M4 m, int32_t v) {
  const __m128i mi = _mm_castps_si128(m.v);
  const __m128i old = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_or_si128(_mm_and_si128(mi, _mm_set1_epi32(v)), _mm_andnot_si128(mi, old)));
}
#else
struct F4 { float v[4]; };
struct M4 { bool v[4]; };
#define DHJAX_F4_LANES(expr) for (int l = 0; l < 4; ++l) expr
inline F4 f4(float x) { return {{x, x, x, x}}; }
inline F4 load4(const float* p) { return {{p[0], p[1], p[2], p[3]}}; }
inline void store4(float* p, F4 a) { DHJAX_F4_LANES(p[l] = a.v[l]); }
inline F4 operator+(F4 a, F4 b) { F4 r; DHJAX_F4_LANES(r.v[l] = a.v[l] + b.v[l]); return r; }
inline F4 operator-(F4 a, F4 b) { F4 r; DHJAX_F4_LANES(r.v[l] = a.v[l] - b.v[l]); return r; }
inline F4 operator*(F4 a, F4 b) { F4 r; DHJAX_F4_LANES(r.v[l] = a.v[l] * b.v[l]); return r; }
inline F4 operator/(F4 a, F4 b) { F4 r; DHJAX_F4_LANES(r.v[l] = a.v[l] / b.v[l]); return r; }
inline F4 negate(F4 a) { F4 r; DHJAX_F4_LANES(r.v[l] = -a.v[l]); return r; }
inline F4 min_of(F4 a, F4 b) { F4 r; DHJAX_F4_LANES(r.v[l] = a.v[l] < b.v[l] ? a.v[l] : b.v[l]); return r; }
inline M4 operator<(F4 a, F4 b) { M4 r; DHJAX_F4_LANES(r.v[l] = a.v[l] < b.v[l]); return r; }
inline M4 operator>(F4 a, F4 b) { M4 r; DHJAX_F4_LANES(r.v[l] = a.v[l] > b.v[l]); return r; }
inline M4 operator>=(F4 a, F4 b) { M4 r; DHJAX_F4_LANES(r.v[l] = a.v[l] >= b.v[l]); return r; }
inline M4 operator&(M4 a, M4 b) { M4 r; DHJAX_F4_LANES(r.v[l] = a.v[l] && b.v[l]); return r; }
inline M4 operator|(M4 a, M4 b) { M4 r; DHJAX_F4_LANES(r.v[l] = a.v[l] || b.v[l]); return r; }
inline M4 and_not(M4 a, M4 b) { M4 r; DHJAX_F4_LANES(r.v[l] = a.v[l] && !b.v[l]); return r; }
inline F4 select(M4 m, F4 a, F4 b) { F4 r; DHJAX_F4_LANES(r.v[l] = m.v[l] ? a.v[l] : b.v[l]); return r; }
inline uint32_t bits(M4 m) { uint32_t b = 0; DHJAX_F4_LANES(b |= static_cast<uint32_t>(m.v[l]) << l); return b; }
inline M4 lanes(uint32_t b) { M4 r; DHJAX_F4_LANES(r.v[l] = (b >> l) & 1u); return r; }
inline F4 iota4(float x) { return {{x, x + 1.0f, x + 2.0f, x + 3.0f}}; }
inline void store_where(int32_t* p, M4 m, int32_t v) { DHJAX_F4_LANES(if (m.v[l]) p[l] = v); }
#undef DHJAX_F4_LANES
#endif

constexpr int kQuads = kTile / 4;  // a tile row is kQuads groups of 4 lanes

// One tile row (pixels (x0 + l, fy), l < 16) against Gaussian j: the exponent `power` of each
// pixel into pw[16], and the bitmask of the pixels where the pixel rule (TileData) goes on to
// evaluate the exp (neither power > 0 nor power below the skip bound). The same float
// operations in the same order as `power`: the same bits.
// Pixel columns are integers below 2^24, exact as floats, as static_cast<float>(px) is.
inline uint32_t row_power(const TileData& td, int64_t j, int x0, float fy, float* pw) {
  const float dy = fy - td.my[j];
  const F4 mx = f4(td.mx[j]), a = f4(td.ca[j]), b = f4(td.cb[j]), vdy = f4(dy);
  const F4 cdd = f4(td.cc[j] * dy * dy), half = f4(-0.5f), zero = f4(0.0f), skip = f4(td.skip[j]);
  uint32_t mask = 0;
  for (int q = 0; q < kQuads; ++q) {
    const F4 dx = iota4(static_cast<float>(x0 + 4 * q)) - mx;
    const F4 p = half * (a * dx * dx + cdd) - b * dx * vdy;
    store4(pw + 4 * q, p);
    mask |= (~bits((p > zero) | (p < skip)) & 0xFu) << (4 * q);
  }
  return mask;
}

// exp of the pixel rule, four lanes at a time. The algorithm is the one glibc's expf uses
// (Szabolcs Nagy's, from Arm's optimized-routines): x / ln 2 = (k + r) / 32 with k an integer and
// |r| <= 1/2, 2^(k/32) from a 32-entry table of 2^(i/32) with k / 32's integer part added to the
// exponent bits, 2^(r/32) by a cubic, all in double precision, then rounded to float once, with
// no fused multiply-add. On every float x in [kExpFastMin, 0] (and +0) exp_fast was checked to
// equal std::exp bit for bit on x86-64 with glibc 2.36, whose expf this CPU dispatches to its FMA
// variant (so the equality is the check's finding, not a consequence of the code);
// `dhjax.ops.splat.exp_agreement` runs that exhaustive check and a test samples it. Lanes below
// kExpFastMin (or NaN) take std::exp. So the kernel's exps no longer depend on the C library in
// [kExpFastMin, 0], the range the pixel rule needs for opacities up to 1: where another libm's
// expf differs (musl, macOS, perhaps glibc on aarch64), the kernel now differs from a std::exp
// loop there, by at most an ulp. A build that evaluates double arithmetic in x87 registers
// (FLT_EVAL_METHOD != 0) cannot round as the algorithm needs and uses std::exp throughout.
constexpr float kExpFastMin = -60.0f;
// bits[i] = asuint64(2^(i/32)) - (i << 47), 2^(i/32) correctly rounded to double, so that
// adding k << 47 to bits[k % 32] gives 2^(k/32) for an integer k.
struct ExpTable {
  uint64_t bits[32];
};
constexpr ExpTable kExpTable = {{
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51,
    0x3fef72b83c7d517b, 0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715, 0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
    0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429, 0x3feea47eb03a5585,
    0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
    0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069,
    0x3fef5818dcfba487, 0x3fef7c97337b9b5f, 0x3fefa4afa2a490da, 0x3fefd0765b6e4540,
}};
constexpr double kExpInvLn2N = 0x1.71547652b82fep+0 * 32;  // 32 / ln 2
constexpr double kExpShift = 0x1.8p+52;                     // rounds to an integer when added
constexpr double kExpC0 = 0x1.c6af84b912394p-5 / (32.0 * 32.0 * 32.0);
constexpr double kExpC1 = 0x1.ebfce50fac4f3p-3 / (32.0 * 32.0);
constexpr double kExpC2 = 0x1.62e42ff0c52d6p-1 / 32.0;

#if defined(__SSE2__) && !defined(DHJAX_SPLAT_SCALAR)
inline __m128d exp_pd(__m128d xd) {
  const __m128d shift = _mm_set1_pd(kExpShift);
  const __m128d z = _mm_mul_pd(_mm_set1_pd(kExpInvLn2N), xd);
  __m128d kd = _mm_add_pd(z, shift);
  const __m128i ki = _mm_castpd_si128(kd);
  kd = _mm_sub_pd(kd, shift);
  const __m128d r = _mm_sub_pd(z, kd);
  // k mod 32 of each lane from its low 32 bits (two's complement: the same residue).
  const uint32_t k0 = static_cast<uint32_t>(_mm_cvtsi128_si32(ki)) % 32;
  const uint32_t k1 = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm_unpackhi_epi64(ki, ki))) % 32;
  __m128i t = _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(&kExpTable.bits[k0])),
                                 _mm_loadl_epi64(reinterpret_cast<const __m128i*>(&kExpTable.bits[k1])));
  t = _mm_add_epi64(t, _mm_slli_epi64(ki, 47));
  const __m128d s = _mm_castsi128_pd(t);
  const __m128d zz = _mm_add_pd(_mm_mul_pd(_mm_set1_pd(kExpC0), r), _mm_set1_pd(kExpC1));
  const __m128d r2 = _mm_mul_pd(r, r);
  __m128d y = _mm_add_pd(_mm_mul_pd(_mm_set1_pd(kExpC2), r), _mm_set1_pd(1.0));
  y = _mm_add_pd(_mm_mul_pd(zz, r2), y);
  return _mm_mul_pd(y, s);
}
inline F4 exp_fast(F4 x) {  // valid for lanes in [kExpFastMin, 0]
  const __m128 lo = _mm_cvtpd_ps(exp_pd(_mm_cvtps_pd(x.v)));
  const __m128 hi = _mm_cvtpd_ps(exp_pd(_mm_cvtps_pd(_mm_movehl_ps(x.v, x.v))));
  return {_mm_movelh_ps(lo, hi)};
}
#else
inline float exp_fast1(float x) {
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0
  return std::exp(x);  // excess precision would keep kd - shift from rounding (see above)
#endif
  const double z = kExpInvLn2N * static_cast<double>(x);
  double kd = z + kExpShift;
  uint64_t ki;
  std::memcpy(&ki, &kd, sizeof ki);
  kd -= kExpShift;
  const double r = z - kd;
  const uint64_t t = kExpTable.bits[ki % 32] + (ki << 47);
  double s;
  std::memcpy(&s, &t, sizeof s);
  const double zz = kExpC0 * r + kExpC1;
  const double r2 = r * r;
  double y = kExpC2 * r + 1.0;
  y = zz * r2 + y;
  return static_cast<float>(y * s);
}
inline F4 exp_fast(F4 x) { F4 r; for (int l = 0; l < 4; ++l) r.v[l] = exp_fast1(x.v[l]); return r; }
#endif

// exp of the exponents of the pixels in `mask`, 0 for the others: four lanes at a time, std::exp
// for a lane below kExpFastMin (the pixel rule rarely asks for one: its skip bound is about -5.5
// for opacities up to 1).
inline void row_exp(uint32_t mask, const float* pw, float* g) {
  for (int q = 0; q < kQuads; ++q) {
    const uint32_t mq = (mask >> (4 * q)) & 0xFu;
    if (!mq) {
      store4(g + 4 * q, f4(0.0f));
      continue;
    }
    const M4 sel = lanes(mq);
    const F4 x = load4(pw + 4 * q);
    // Unselected lanes compute exp(0): no garbage exponents (spurious flags, denormal scales).
    store4(g + 4 * q, select(sel, exp_fast(select(sel, x, f4(0.0f))), f4(0.0f)));
    for (uint32_t slow = mq & ~bits(x >= f4(kExpFastMin)); slow; slow &= slow - 1) {
      const int l = 4 * q + __builtin_ctz(slow);
      g[l] = std::exp(pw[l]);
    }
  }
}

// For dhjax.ops.splat.exp_agreement: compares the kernel's exp with std::exp on +0.0 and the
// floats x in [lo, 0] (lo < 0) whose bit patterns are -0.0's plus multiples of `stride`, in
// batches of 16. Both the kernel's path (row_exp, std::exp below kExpFastMin included) and, on
// the lanes at or above kExpFastMin, exp_fast alone are compared, so a fast path that never ran
// cannot pass. Returns the number of values compared and writes the number of values where
// either differs, the largest difference in units in the last place (float bit patterns) and
// the number of values that exp_fast evaluated to *mismatches, *max_ulp and *fast.
int64_t compare_exp(float lo, int64_t stride, int64_t* mismatches, int64_t* max_ulp, int64_t* fast) {
  uint32_t lo_bits;
  std::memcpy(&lo_bits, &lo, sizeof lo_bits);
  int64_t n = 0, bad = 0, worst = 0, n_fast = 0;
  float pw[kTile], g[kTile], e[kTile];
  int cnt = 0;
  auto ulps = [](float a, float b) {
    int32_t ia, ib;
    std::memcpy(&ia, &a, sizeof ia);
    std::memcpy(&ib, &b, sizeof ib);
    return static_cast<int64_t>(std::llabs(static_cast<long long>(ia) - static_cast<long long>(ib)));
  };
  auto flush = [&](int m) {
    row_exp((m == kTile) ? 0xFFFFu : ((1u << m) - 1u), pw, g);
    for (int q = 0; q < kQuads; ++q) store4(e + 4 * q, exp_fast(load4(pw + 4 * q)));
    for (int l = 0; l < m; ++l) {
      const float ref = std::exp(pw[l]);
      int64_t d = ulps(g[l], ref);
      if (pw[l] >= kExpFastMin) {
        ++n_fast;
        d = std::max(d, ulps(e[l], ref));
      }
      if (d != 0) {
        ++bad;
        worst = std::max(worst, d);
      }
    }
    n += m;
  };
  pw[cnt++] = 0.0f;
  for (uint64_t u = 0x80000000u; u <= lo_bits; u += static_cast<uint64_t>(stride)) {
    const uint32_t ub = static_cast<uint32_t>(u);
    std::memcpy(&pw[cnt], &ub, sizeof ub);
    if (++cnt == kTile) {
      flush(kTile);
      cnt = 0;
    }
  }
  if (cnt) {
    for (int l = cnt; l < kTile; ++l) pw[l] = 0.0f;
    flush(cnt);
  }
  *mismatches = bad;
  *max_ulp = worst;
  *fast = n_fast;
  return n;
}

// The pixel rule's alpha for quad q (pixels 4q .. 4q + 3) of a row, whose candidate pixels are
// the bits cq and whose exps are g[4q ..]: raw = o g, alpha = std::min(0.99f, raw) (_mm_min_ps
// and the fallback keep std::min's choice of 0.99 for a NaN raw) and `pass`, the candidates whose
// alpha reaches 1/255. Forward and backward both use it, so they make the same decisions.
struct QuadAlpha {
  F4 raw, alpha;
  M4 pass;
};
inline QuadAlpha quad_alpha(float opacity, const float* g, int q, uint32_t cq) {
  const F4 raw = f4(opacity) * load4(g + 4 * q);
  const F4 alpha = min_of(raw, f4(kAlphaMax));
  return {raw, alpha, and_not(lanes(cq), alpha < f4(kAlphaMin))};
}

// r + t[l] for the lanes l < 4 set in `lanes`, added in increasing l: a pixel loop's order of
// additions into one record field.
inline float add_lanes(float r, const float* t, uint32_t lanes) {
  for (int l = 0; l < 4; ++l)
    if ((lanes >> l) & 1u) r += t[l];
  return r;
}

// The pixels of tile t: columns x0 .. x0 + nx - 1 and rows y0 .. y0 + ny - 1 (nx, ny <= 16, less
// at the image's right and bottom edges).
struct TileRect {
  int x0, y0, nx, ny;
};
inline TileRect tile_rect(const Dims& d, int64_t t) {
  const int x0 = tile_x0(t, d.tx), y0 = tile_y0(t, d.tx);
  return {x0, y0, static_cast<int>(std::min<int64_t>(kTile, d.W - x0)),
          static_cast<int>(std::min<int64_t>(kTile, d.H - y0))};
}

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
      // One row of the tile at a time, 16 pixels as four groups of 4 lanes: per pixel l its
      // accumulated channels acc[k * 16 + l], transmittance tr[l] and list entries walked[l];
      // `live` holds the pixels still compositing. Per pixel, the Gaussians in depth order with
      // the pixel rule's operations, as a pixel-by-pixel loop would.
      std::vector<float> acc(kTile * K);
      float tr[kTile], pw[kTile], g[kTile];
      int32_t walked[kTile];
      const auto [x0, y0, nx, ny] = tile_rect(d, t);
      const uint32_t row = (1u << nx) - 1u;  // nx <= 16
      const F4 one = f4(1.0f), t_min = f4(kTMin);
      for (int py = y0; py < y0 + ny; ++py) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        std::fill(tr, tr + kTile, 1.0f);
        std::fill(walked, walked + kTile, 0);
        const float fy = static_cast<float>(py);
        uint32_t live = row;
        for (int64_t j = 0; j < n && live; ++j) {
          const uint32_t cand = row_power(td, j, x0, fy, pw) & live;
          if (!cand) continue;
          row_exp(cand, pw, g);
          const float* c = &td.col[j * K];
          for (int q = 0; q < kQuads; ++q) {
            const uint32_t cq = (cand >> (4 * q)) & 0xFu;
            if (!cq) continue;
            const auto [raw, alpha, pass] = quad_alpha(td.op[j], g, q, cq);
            const F4 t_q = load4(tr + 4 * q);
            const F4 next_t = t_q * (one - alpha);
            const M4 stop = pass & (next_t < t_min);  // done: stops before Gaussian j
            const M4 upd = and_not(pass, stop);
            const F4 w = alpha * t_q;
            for (int64_t k = 0; k < K; ++k) {
              float* a = &acc[k * kTile + 4 * q];
              const F4 a_q = load4(a);
              store4(a, select(upd, a_q + w * f4(c[k]), a_q));
            }
            store4(tr + 4 * q, select(upd, next_t, t_q));
            store_where(walked + 4 * q, upd, static_cast<int32_t>(j + 1));
            live &= ~(bits(stop) << (4 * q));
          }
        }
        for (int l = 0; l < nx; ++l) {
          const int64_t p = static_cast<int64_t>(py) * d.W + x0 + l;
          for (int64_t k = 0; k < K; ++k) o_img[p * K + k] = acc[k * kTile + l];
          o_t[p] = tr[l];
          o_last[p] = walked[l];
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
      // Row by row, as the forward, with per pixel l of the row (at k * 16 + l): its composited
      // prefix, incoming gradients gk and output channels c_out; its transmittance tr[l], final
      // transmittance tf[l], minus its transmittance gradient ngt[l], and the list entries it
      // walks, walk[l]. Per pixel, the Gaussians in depth order with the pixel loop's operations;
      // a record gets its pixels' terms in row-major order (rows outer, the pixels of a row in
      // order), as a pixel-by-pixel loop would add them.
      std::vector<float> prefix(kTile * K), gk(kTile * K), c_out(kTile * K), terms(4 * (6 + K));
      float tr[kTile], tf[kTile], ngt[kTile], pw[kTile], g[kTile];
      int64_t walk[kTile];
      int by_walk[kTile];
      const auto [x0, y0, nx, ny] = tile_rect(d, t);
      const F4 one = f4(1.0f), alpha_max = f4(kAlphaMax), half = f4(-0.5f);
      for (int py = y0; py < y0 + ny; ++py) {
        std::fill(prefix.begin(), prefix.end(), 0.0f);
        std::fill(gk.begin(), gk.end(), 0.0f);
        std::fill(c_out.begin(), c_out.end(), 0.0f);
        std::fill(tr, tr + kTile, 1.0f);
        std::fill(tf, tf + kTile, 0.0f);
        std::fill(ngt, ngt + kTile, 0.0f);
        uint32_t live = 0;
        int n_live = 0;
        for (int l = 0; l < nx; ++l) {
          const int64_t p = static_cast<int64_t>(py) * d.W + x0 + l;
          walk[l] = std::min<int64_t>(i_last[p], n);
          if (walk[l] <= 0) continue;
          bool any = gt[p] != 0.0f;
          for (int64_t k = 0; k < K; ++k) any = any || gi[p * K + k] != 0.0f;
          if (!any) continue;
          for (int64_t k = 0; k < K; ++k) {
            gk[k * kTile + l] = gi[p * K + k];
            c_out[k * kTile + l] = i_img[p * K + k];
          }
          tf[l] = i_t[p];
          ngt[l] = -gt[p];
          live |= 1u << l;
          by_walk[n_live++] = l;
        }
        if (!live) continue;
        std::sort(by_walk, by_walk + n_live, [&](int u, int v) { return walk[u] < walk[v]; });
        const int64_t longest = walk[by_walk[n_live - 1]];
        const float fy = static_cast<float>(py);
        int next_done = 0;  // by_walk[next_done..] are the pixels that still walk
        for (int64_t j = 0; j < longest; ++j) {
          while (walk[by_walk[next_done]] <= j) live &= ~(1u << by_walk[next_done++]);
          const uint32_t cand = row_power(td, j, x0, fy, pw) & live;
          if (!cand) continue;
          row_exp(cand, pw, g);
          const float* c = &td.col[j * K];
          const float dy = fy - td.my[j];
          const F4 mx = f4(td.mx[j]), ca = f4(td.ca[j]), cb = f4(td.cb[j]), vdy = f4(dy);
          const F4 cb_dy = f4(td.cb[j] * dy), cc_dy = f4(td.cc[j] * dy), dy2 = f4(-0.5f * dy * dy);
          float* rec = tile_records + static_cast<int64_t>(order[j]) * stride;
          for (int q = 0; q < kQuads; ++q) {
            const uint32_t cq = (cand >> (4 * q)) & 0xFu;
            if (!cq) continue;
            const F4 g_q = load4(g + 4 * q);
            const auto [raw, alpha, pass] = quad_alpha(td.op[j], g, q, cq);
            const uint32_t pass_bits = bits(pass);
            if (!pass_bits) continue;
            const F4 t_q = load4(tr + 4 * q);
            const F4 w = alpha * t_q;
            const F4 inv = one / (one - alpha);
            F4 d_alpha = load4(ngt + 4 * q) * load4(tf + 4 * q) * inv;
            for (int64_t k = 0; k < K; ++k) {
              const int64_t at = k * kTile + 4 * q;
              const F4 gk_q = load4(&gk[at]), col = f4(c[k]);
              store4(&terms[4 * (5 + k)], w * gk_q);
              const F4 pre = load4(&prefix[at]) + w * col;
              store4(&prefix[at], select(pass, pre, load4(&prefix[at])));
              d_alpha = d_alpha + gk_q * (col * t_q - (load4(&c_out[at]) - pre) * inv);
            }
            store4(tr + 4 * q, select(pass, t_q * (one - alpha), t_q));
            // Clamped pixels (raw > 0.99): alpha no longer depends on o or the Gaussian.
            const uint32_t free_bits = pass_bits & ~bits(raw > alpha_max);
            if (free_bits) {
              const F4 dx = iota4(static_cast<float>(x0 + 4 * q)) - mx;
              const F4 d_power = d_alpha * raw;
              store4(&terms[0], d_power * (ca * dx + cb_dy));
              store4(&terms[4], d_power * (cc_dy + cb * dx));
              store4(&terms[8], d_power * (half * dx * dx));
              store4(&terms[12], d_power * (negate(dx) * vdy));
              store4(&terms[16], d_power * dy2);
              store4(&terms[4 * (5 + K)], d_alpha * g_q);
            }
            // Each record field adds its pixels' terms in pixel order, as a pixel loop would;
            // the fields are independent sums, so they are added one field at a time.
            for (int64_t k = 0; k < K; ++k) rec[5 + k] = add_lanes(rec[5 + k], &terms[4 * (5 + k)], pass_bits);
            if (free_bits) {
              rec[5 + K] = add_lanes(rec[5 + K], &terms[4 * (5 + K)], free_bits);
              for (int e = 0; e < 5; ++e) rec[e] = add_lanes(rec[e], &terms[4 * e], free_bits);
            }
          }
        }
      }
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

extern "C" __attribute__((visibility("default"))) int64_t dhjax_splat_compare_exp(float lo, int64_t stride,
                                                                              int64_t* mismatches,
                                                                              int64_t* max_ulp,
                                                                              int64_t* fast) {
  if (!(lo < 0.0f) || stride <= 0 || !mismatches || !max_ulp || !fast) return -1;
  return compare_exp(lo, stride, mismatches, max_ulp, fast);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SplatForward, SplatForwardImpl,
                              ffi::Ffi::Bind() DHJAX_SPLAT_FORWARD_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SplatBackward, SplatBackwardImpl,
                              ffi::Ffi::Bind() DHJAX_SPLAT_BACKWARD_SIGNATURE);

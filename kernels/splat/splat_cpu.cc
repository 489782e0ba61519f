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
// scalar rule) picks the pixels it may reach, exp runs on the lane groups that hold them
// (`row_exp`: glibc's expf algorithm in double lanes; equal to x86-64 glibc's std::exp, see
// there), and the compositing (or its gradient) updates a group at a time with masked vector
// operations. A pixel still sees its Gaussians in depth order and a Gaussian's record still
// sums its pixels in row-major order, so the results are the same bits as a pixel-by-pixel loop (on targets that
// fused multiply-adds by default, e.g. aarch64, earlier builds did not follow the rule's
// left-to-right rounding; -ffp-contract=off now makes every build do so).
//
// Lane groups: the per-tile passes (splat_cpu_lanes.inc) are compiled twice, for groups of 4
// (SSE2 on x86-64, plain arrays elsewhere: namespace lanes4) and, with GCC on x86-64, for groups
// of 8 with AVX2 (namespace lanes8, under `#pragma GCC target("avx2")`: no FMA, so the same
// bits). Each call takes the 8-lane passes when the CPU has AVX2 (`__builtin_cpu_supports`,
// which also checks that the OS saves the YMM registers) unless DHJAX_SPLAT_LANES=4 asks for the
// 4-lane ones; `dhjax_splat_simd_lanes()` says which a call would use. The backward
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
// The 8-lane AVX2 passes: GCC on x86-64 (clang reads `#pragma GCC target` as no-op: the 4-lane
// passes only there). DHJAX_SPLAT_NO_AVX2 leaves them out of a build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(DHJAX_SPLAT_NO_AVX2)
#define DHJAX_SPLAT_AVX2 1
#include <immintrin.h>
#endif
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
// exp of the pixel rule, a lane group at a time. The algorithm is the one glibc's expf uses
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

namespace lanes4 {

// Four float lanes: SSE2 where the target has it (every x86-64), plain arrays elsewhere. Each
// operation is one IEEE operation per lane, as the scalar code's, so both give its bits (no
// fused multiply-adds: the CPU targets are built with -ffp-contract=off).
constexpr int kL = 4;
#if defined(__SSE2__) && !defined(DHJAX_SPLAT_SCALAR)
struct V { __m128 v; };
struct M { __m128 v; };  // lane masks: all bits set or clear
inline V vset(float x) { return {_mm_set1_ps(x)}; }
inline V vload(const float* p) { return {_mm_loadu_ps(p)}; }
inline void vstore(float* p, V a) { _mm_storeu_ps(p, a.v); }
inline V operator+(V a, V b) { return {_mm_add_ps(a.v, b.v)}; }
inline V operator-(V a, V b) { return {_mm_sub_ps(a.v, b.v)}; }
inline V operator*(V a, V b) { return {_mm_mul_ps(a.v, b.v)}; }
inline V operator/(V a, V b) { return {_mm_div_ps(a.v, b.v)}; }
inline V negate(V a) { return {_mm_xor_ps(a.v, _mm_set1_ps(-0.0f))}; }
inline V min_of(V a, V b) { return {_mm_min_ps(a.v, b.v)}; }  // a < b ? a : b
inline M operator<(V a, V b) { return {_mm_cmplt_ps(a.v, b.v)}; }
inline M operator>(V a, V b) { return {_mm_cmpgt_ps(a.v, b.v)}; }
inline M operator>=(V a, V b) { return {_mm_cmpge_ps(a.v, b.v)}; }
inline M operator&(M a, M b) { return {_mm_and_ps(a.v, b.v)}; }
inline M operator|(M a, M b) { return {_mm_or_ps(a.v, b.v)}; }
inline M and_not(M a, M b) { return {_mm_andnot_ps(b.v, a.v)}; }  // a & ~b
inline V select(M m, V a, V b) { return {_mm_or_ps(_mm_and_ps(m.v, a.v), _mm_andnot_ps(m.v, b.v))}; }
inline uint32_t bits(M m) { return static_cast<uint32_t>(_mm_movemask_ps(m.v)); }
inline M from_bits(uint32_t b) {  // bit l of b -> lane l
  return {_mm_castsi128_ps(_mm_set_epi32(-static_cast<int>((b >> 3) & 1u), -static_cast<int>((b >> 2) & 1u),
                                         -static_cast<int>((b >> 1) & 1u), -static_cast<int>(b & 1u)))};
}
inline V iota(float x) { return {_mm_add_ps(_mm_set1_ps(x), _mm_set_ps(3.0f, 2.0f, 1.0f, 0.0f))}; }
// p[l] = v in the lanes of m, p[l] kept in the others (integers: no rounding involved).
inline void store_where(int32_t* p, M m, int32_t v) {
  const __m128i mi = _mm_castps_si128(m.v);
  const __m128i old = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_or_si128(_mm_and_si128(mi, _mm_set1_epi32(v)), _mm_andnot_si128(mi, old)));
}
#else
struct V { float v[4]; };
struct M { bool v[4]; };
#define DHJAX_V_LANES(expr) for (int l = 0; l < 4; ++l) expr
inline V vset(float x) { return {{x, x, x, x}}; }
inline V vload(const float* p) { return {{p[0], p[1], p[2], p[3]}}; }
inline void vstore(float* p, V a) { DHJAX_V_LANES(p[l] = a.v[l]); }
inline V operator+(V a, V b) { V r; DHJAX_V_LANES(r.v[l] = a.v[l] + b.v[l]); return r; }
inline V operator-(V a, V b) { V r; DHJAX_V_LANES(r.v[l] = a.v[l] - b.v[l]); return r; }
inline V operator*(V a, V b) { V r; DHJAX_V_LANES(r.v[l] = a.v[l] * b.v[l]); return r; }
inline V operator/(V a, V b) { V r; DHJAX_V_LANES(r.v[l] = a.v[l] / b.v[l]); return r; }
inline V negate(V a) { V r; DHJAX_V_LANES(r.v[l] = -a.v[l]); return r; }
inline V min_of(V a, V b) { V r; DHJAX_V_LANES(r.v[l] = a.v[l] < b.v[l] ? a.v[l] : b.v[l]); return r; }
inline M operator<(V a, V b) { M r; DHJAX_V_LANES(r.v[l] = a.v[l] < b.v[l]); return r; }
inline M operator>(V a, V b) { M r; DHJAX_V_LANES(r.v[l] = a.v[l] > b.v[l]); return r; }
inline M operator>=(V a, V b) { M r; DHJAX_V_LANES(r.v[l] = a.v[l] >= b.v[l]); return r; }
inline M operator&(M a, M b) { M r; DHJAX_V_LANES(r.v[l] = a.v[l] && b.v[l]); return r; }
inline M operator|(M a, M b) { M r; DHJAX_V_LANES(r.v[l] = a.v[l] || b.v[l]); return r; }
inline M and_not(M a, M b) { M r; DHJAX_V_LANES(r.v[l] = a.v[l] && !b.v[l]); return r; }
inline V select(M m, V a, V b) { V r; DHJAX_V_LANES(r.v[l] = m.v[l] ? a.v[l] : b.v[l]); return r; }
inline uint32_t bits(M m) { uint32_t b = 0; DHJAX_V_LANES(b |= static_cast<uint32_t>(m.v[l]) << l); return b; }
inline M from_bits(uint32_t b) { M r; DHJAX_V_LANES(r.v[l] = (b >> l) & 1u); return r; }
inline V iota(float x) { return {{x, x + 1.0f, x + 2.0f, x + 3.0f}}; }
inline void store_where(int32_t* p, M m, int32_t v) { DHJAX_V_LANES(if (m.v[l]) p[l] = v); }
#undef DHJAX_V_LANES
#endif

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
inline V exp_fast(V x) {  // valid for lanes in [kExpFastMin, 0]
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
inline V exp_fast(V x) { V r; for (int l = 0; l < 4; ++l) r.v[l] = exp_fast1(x.v[l]); return r; }
#endif

#include "splat_cpu_lanes.inc"

}  // namespace lanes4

#if DHJAX_SPLAT_AVX2
#pragma GCC push_options
#pragma GCC target("avx2")
namespace lanes8 {

// Eight float lanes (AVX2; every function here is compiled for AVX2 by the pragma and runs only
// where the CPU has it). The operations and their rounding are lanes4's: comparisons are the
// ordered signalling predicates of SSE's cmplt/cmpgt/cmpge, min keeps the second operand for a
// NaN as _mm_min_ps does, and blends pick by all-set or all-clear masks, so they equal lanes4's
// and/or selects.
constexpr int kL = 8;
struct V { __m256 v; };
struct M { __m256 v; };
inline V vset(float x) { return {_mm256_set1_ps(x)}; }
inline V vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void vstore(float* p, V a) { _mm256_storeu_ps(p, a.v); }
inline V operator+(V a, V b) { return {_mm256_add_ps(a.v, b.v)}; }
inline V operator-(V a, V b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline V operator*(V a, V b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline V operator/(V a, V b) { return {_mm256_div_ps(a.v, b.v)}; }
inline V negate(V a) { return {_mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f))}; }
inline V min_of(V a, V b) { return {_mm256_min_ps(a.v, b.v)}; }  // a < b ? a : b
inline M operator<(V a, V b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OS)}; }
inline M operator>(V a, V b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OS)}; }
inline M operator>=(V a, V b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GE_OS)}; }
inline M operator&(M a, M b) { return {_mm256_and_ps(a.v, b.v)}; }
inline M operator|(M a, M b) { return {_mm256_or_ps(a.v, b.v)}; }
inline M and_not(M a, M b) { return {_mm256_andnot_ps(b.v, a.v)}; }  // a & ~b
inline V select(M m, V a, V b) { return {_mm256_blendv_ps(b.v, a.v, m.v)}; }
inline uint32_t bits(M m) { return static_cast<uint32_t>(_mm256_movemask_ps(m.v)); }
inline M from_bits(uint32_t b) {  // bit l of b -> lane l
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i on = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(b)), sel);
  return {_mm256_castsi256_ps(_mm256_cmpeq_epi32(on, sel))};
}
inline V iota(float x) {
  return {_mm256_add_ps(_mm256_set1_ps(x), _mm256_setr_ps(0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f))};
}
// p[l] = v in the lanes of m, p[l] kept in the others (integers: no rounding involved).
inline void store_where(int32_t* p, M m, int32_t v) {
  const __m256i old = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm256_blendv_epi8(old, _mm256_set1_epi32(v), _mm256_castps_si256(m.v)));
}
// lanes4's exp_pd on four doubles: the same operations per lane, the table read by a gather.
inline __m256d exp_pd(__m256d xd) {
  const __m256d shift = _mm256_set1_pd(kExpShift);
  const __m256d z = _mm256_mul_pd(_mm256_set1_pd(kExpInvLn2N), xd);
  __m256d kd = _mm256_add_pd(z, shift);
  const __m256i ki = _mm256_castpd_si256(kd);
  kd = _mm256_sub_pd(kd, shift);
  const __m256d r = _mm256_sub_pd(z, kd);
  // k mod 32 of each lane from its low bits (two's complement: the same residue).
  const __m256i idx = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
  __m256i t = _mm256_i64gather_epi64(reinterpret_cast<const long long*>(kExpTable.bits), idx, 8);
  t = _mm256_add_epi64(t, _mm256_slli_epi64(ki, 47));
  const __m256d s = _mm256_castsi256_pd(t);
  const __m256d zz = _mm256_add_pd(_mm256_mul_pd(_mm256_set1_pd(kExpC0), r), _mm256_set1_pd(kExpC1));
  const __m256d r2 = _mm256_mul_pd(r, r);
  __m256d y = _mm256_add_pd(_mm256_mul_pd(_mm256_set1_pd(kExpC2), r), _mm256_set1_pd(1.0));
  y = _mm256_add_pd(_mm256_mul_pd(zz, r2), y);
  return _mm256_mul_pd(y, s);
}
inline V exp_fast(V x) {  // valid for lanes in [kExpFastMin, 0]
  const __m128 lo = _mm256_cvtpd_ps(exp_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x.v))));
  const __m128 hi = _mm256_cvtpd_ps(exp_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x.v, 1))));
  return {_mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1)};
}

#include "splat_cpu_lanes.inc"

}  // namespace lanes8
#pragma GCC pop_options
#endif

// The lane group width a call uses: 8 where built and the CPU has AVX2, unless
// DHJAX_SPLAT_LANES=4; else 4. (The CPU's answer does not change while the process runs.)
int simd_lanes() {
#if DHJAX_SPLAT_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2");
  const char* env = std::getenv("DHJAX_SPLAT_LANES");
  if (avx2 && !(env && std::atoi(env) == 4)) return 8;
#endif
  return 4;
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
  auto forward_tile = lanes4::forward_tile;
#if DHJAX_SPLAT_AVX2
  if (simd_lanes() == 8) forward_tile = lanes8::forward_tile;
#endif
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
      forward_tile(d, tile_rect(d, t), bins.ids.data() + begin, n, m2, cn, cl, op, dp, o_img, o_t, o_last);
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
  auto backward_tile = lanes4::backward_tile;
#if DHJAX_SPLAT_AVX2
  if (simd_lanes() == 8) backward_tile = lanes8::backward_tile;
#endif
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
      backward_tile(d, tile_rect(d, t), bins.ids.data() + begin, n, m2, cn, cl, op, dp, i_img, i_t, i_last, gi, gt,
                    records.get() + begin * stride, stride);
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
#if DHJAX_SPLAT_AVX2
  if (simd_lanes() == 8) return lanes8::compare_exp(lo, stride, mismatches, max_ulp, fast);
#endif
  return lanes4::compare_exp(lo, stride, mismatches, max_ulp, fast);
}

// The lane group width (4 or 8) the handlers and dhjax_splat_compare_exp use in this process
// now (DHJAX_SPLAT_LANES is read at each call).
extern "C" __attribute__((visibility("default"))) int32_t dhjax_splat_simd_lanes() { return simd_lanes(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(SplatForward, SplatForwardImpl,
                              ffi::Ffi::Bind() DHJAX_SPLAT_FORWARD_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SplatBackward, SplatBackwardImpl,
                              ffi::Ffi::Bind() DHJAX_SPLAT_BACKWARD_SIGNATURE);

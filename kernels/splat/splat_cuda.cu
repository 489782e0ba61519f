// CUDA handlers of dhjax's tile-based Gaussian compositing (XLA FFI): forward and backward.
//
// Same operands, results, dtypes and shapes as the CPU handlers (splat_cpu.cc; leading batch
// dims "..." flattened to B cameras) and the same decisions: tile binning from the given int32
// rects, per-tile order by depth with index tie-break, power > 0 skip,
// alpha = min(0.99, o exp(power)), alpha < 1/255 skip, stop before the Gaussian that would bring
// T below 1e-4, `last` = one past the last composited entry of the pixel's tile list, and a
// front-to-back backward with the same formulas. The image formation is defined in
// dhjax/ops/splat.py.
//
// Binning (all B cameras at once, gsplat-like, exact: nothing is ever truncated):
//   1. count_kernel: tiles covered by each Gaussian (clamped rect area), int64.
//   2. cub::DeviceScan::ExclusiveSum over the B*N+1 counts -> offsets; offsets[B*N] is the
//      number M of (Gaussian, tile) intersections. It is copied to the host (one 8-byte read back
//      and a cudaStreamSynchronize: the price of allocating exactly M entries from the
//      ScratchAllocator; the handlers do not declare the command-buffer trait, so XLA never
//      captures them into a CUDA graph).
//   3. emit_kernel: per Gaussian, in index order at its scan offset, keys
//      (b*T + tile) << 32 | orderable(depth) and values b*N + i.
//   4. cub::DeviceRadixSort::SortPairs. It is stable, and entries were emitted in index order,
//      so equal depths keep the index order (the CPU's stable_sort tie-break).
//   5. ranges_kernel: [start, end) of every (camera, tile) in the sorted list.
// Forward (render_kernel): one 16x16 thread block per (camera, tile), one thread per pixel;
//   batches of 256 list entries go through shared memory; the block stops when all its pixels
//   are done (__syncthreads_count vote), like 3DGS / gsplat.
// Backward (backward_kernel): the binning is redone (the forward only returns out / trans /
//   last). One block per tile again; every pixel walks its list front to back up to last[p]
//   with exact transmittances (no division by 1 - alpha to recover T), using
//     dC_k/dalpha_i = c_ik T_i - (C_k - P_ik) / (1 - alpha_i),   dT/dalpha_i = -T / (1 - alpha_i)
//   with P_ik the composited prefix up to and including i. Per-Gaussian gradients are summed
//   over each warp with shuffles (a fixed tree), then:
//   * SplatBackwardCuda (target dhjax_splat_bwd): added to the zeroed outputs with atomicAdd, so
//     their float summation order, and the gradients' last bits, vary from call to call.
//   * SplatBackwardDeterministicCuda (target dhjax_splat_bwd_deterministic, Python
//     `deterministic=True`): the CPU handler's scheme. The block sums each list entry's warp
//     partials in warp order (staged in shared memory, kGroup entries per barrier pair) into one
//     record per (tile, Gaussian) intersection, in a scratch buffer of M x (6 * chunks + K)
//     floats in sorted-list order. The radix sort carries each entry's emit position (step 4
//     sorts positions instead of indices; gather_kernel recovers the indices and the inverse
//     permutation), so reduce_kernel can sum every Gaussian's records in emit order, i.e. its
//     tiles in row-major order, one thread per (Gaussian, gradient column). The same bits on
//     every call. Extra cost: the records (4 (6 + K) bytes per intersection for K <= 8), two
//     int32 per intersection, one more pass over the records, and two barriers per 32 list
//     entries in the backward kernel. Compiled here but NOT yet run on a GPU (none was
//     available): tests/test_ops_splat_cuda.py::test_deterministic_backward checks it.
// Channels: K is arbitrary. Kernels are templated on a channel chunk CH in {1, 2, 3, 4, 8};
//   K > 8 runs ceil(K / 8) chunks (grid.y), each recomputing the alphas (which do not depend on
//   the channels). The mean / conic / opacity gradients are linear in dL/dalpha, whose channel
//   sum splits over chunks; the transmittance term is added by chunk 0 only.
//
// Numerics and agreement with the CPU handler. CMake compiles this file with --use_fast_math
// -ftz=false: subnormals are kept, as on the CPU (fast-math alone flushes them, even in the
// __f*_rn intrinsics below); fast-math still brings approximate division, FMA contraction and
// expf -> __expf with an error that grows to ~8 ulp at power = -5.5. A few ulp in alpha can flip the alpha < 1/255 or T < 1e-4 decisions
// near the thresholds, and one flipped Gaussian changes a pixel by up to ~0.004 * colour, far more
// than the 1e-4 the tests allow. So every quantity that feeds a decision is computed without
// relying on those flags: the power with __fmul_rn / __fadd_rn / __fsub_rn (never contracted to
// FMA, same evaluation order as the C++), exp with exp_nonpos below (range reduction + degree-7
// polynomial with explicit fmaf, about 1 ulp, unaffected by fast-math), 1 / (1 - alpha) with
// __frcp_rn (correctly rounded), T with __fmul_rn. The colour accumulation and the gradient
// arithmetic may use fast-math freely.
//
// Scratch memory comes from XLA's ScratchAllocator and is released when the handler returns,
// while the kernels may still be running: this is safe because XLA's device allocator is
// ordered on the compute stream these kernels are enqueued on (as for XLA's own temporaries).
//
// Limits (checked, with an error message; never a silent cut): B*N < 2^31 - 1,
// B * tiles < 2^31, M <= 2^31 - 1 intersections (cub's int item counts and the int32 ranges).

#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#define DHJAX_CUDA_OP "dhjax_splat"
#include "dhjax_cuda.h"
#include "dhjax_parallel.h"
#include "splat_common.h"
#include "splat_ffi.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace dhjax_splat;  // constants, Dims, checks and tile helpers (splat_common.h)

constexpr int kBlock = kTile * kTile;  // threads per render block = list entries per batch
constexpr int kLinear = 256;           // threads per block of the 1D helper kernels
constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

// ---------------------------------------------------------------------------------------------
// Device math shared by forward and backward (bit-identical decisions in both).

__host__ __device__ __forceinline__ float pow2i(int j) {  // 2^j for -126 <= j <= 127
  const int32_t bits = (j + 127) << 23;
#ifdef __CUDA_ARCH__
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// exp(x) for x <= 0 (NaN propagates), about 1 ulp, independent of --use_fast_math.
// exp(x) = 2^j exp(r), j = rint(x / ln 2), r = x - j ln 2 (Cody-Waite, two fmaf), |r| <= 0.35;
// exp(r) by its Taylor series to degree 7 (truncation error < 6e-9 relative) with fmaf Horner.
// x < -87 returns 0 (exp(-87) = 1.6e-38; such an alpha is far below 1/255 for any o < 1e35).
__host__ __device__ __forceinline__ float exp_nonpos(float x) {
  if (x < -87.0f) return 0.0f;
  const float j = rintf(x * 1.44269504088896341f);
  float r = fmaf(j, -0.693145751953125f, x);  // ln 2 high part (exact j * hi for |j| < 2^12)
  r = fmaf(j, -1.428606765330187e-06f, r);    // ln 2 low part
  float p = 1.98412698412698e-4f;             // 1/7!
  p = fmaf(p, r, 1.38888888888889e-3f);       // 1/6!
  p = fmaf(p, r, 8.33333333333333e-3f);       // 1/5!
  p = fmaf(p, r, 4.16666666666667e-2f);       // 1/4!
  p = fmaf(p, r, 1.66666666666667e-1f);       // 1/3!
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  return p * pow2i(x == x ? static_cast<int>(j) : 0);
}

// Opacity of one Gaussian at pixel (fx, fy), as the CPU handler computes it:
//   power = dhjax_splat::power (left to right, no FMA)
//   skip where power > 0; g = exp(power); raw = o*g; alpha = std::min(0.99f, raw);
//   skip where alpha < 1/255.
// std::min(0.99f, raw) is (raw < 0.99f) ? raw : 0.99f (a NaN raw gives 0.99, as on the CPU).
// Returns false where the Gaussian is skipped.
__device__ __forceinline__ bool eval_alpha(float fx, float fy, float2 m, float4 q, float& dx, float& dy,
                                           float& g, float& raw, float& alpha) {
  dx = __fsub_rn(fx, m.x);
  dy = __fsub_rn(fy, m.y);
  const float p = power(q.x, q.y, q.z, dx, dy);
  if (p > 0.0f) return false;
  g = exp_nonpos(p);
  raw = __fmul_rn(q.w, g);
  alpha = raw < kAlphaMax ? raw : kAlphaMax;
  return !(alpha < kAlphaMin);
}

// Depth -> uint32 whose unsigned order is the float order: +-0 are equal (the CPU's `<` treats
// them so) and NaN sorts after everything (the CPU comparator puts NaN last). Integer only, so
// flush-to-zero cannot touch it.
__device__ __forceinline__ uint32_t depth_key(float d) {
  const uint32_t u = __float_as_uint(d);
  const uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return 0xffffffffu;  // NaN
  if (mag == 0u) return 0x80000000u;          // +0 and -0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// ---------------------------------------------------------------------------------------------
// Binning kernels.

// counts[i] = tiles covered by flattened Gaussian i < BN; counts[BN] = 0 (so that the exclusive
// scan's last element is the total).
__global__ void count_kernel(const int32_t* __restrict__ rects, int64_t* __restrict__ counts, int64_t BN, int tx,
                             int ty) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i > BN) return;
  int64_t c = 0;
  int x0, y0, x1, y1;
  if (i < BN && clamp_rect(rects + 4 * i, tx, ty, x0, y0, x1, y1)) {
    c = static_cast<int64_t>(x1 - x0) * (y1 - y0);
  }
  counts[i] = c;
}

// Writes Gaussian i's entries at offsets[i] .. offsets[i+1]-1, tiles in row-major order. With
// `positions` (deterministic backward only), also each entry's emit position o at positions[o].
__global__ void emit_kernel(const int32_t* __restrict__ rects, const float* __restrict__ depths,
                            const int64_t* __restrict__ offsets, uint64_t* __restrict__ keys,
                            int32_t* __restrict__ values, int32_t* __restrict__ positions, int64_t BN, int64_t N,
                            int tx, int ty, int64_t T) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= BN) return;
  int x0, y0, x1, y1;
  if (!clamp_rect(rects + 4 * i, tx, ty, x0, y0, x1, y1)) return;
  const int64_t b = i / N;
  const uint64_t dk = depth_key(depths[i]);
  int64_t o = offsets[i];
  for (int y = y0; y < y1; ++y) {
    for (int x = x0; x < x1; ++x) {
      const uint64_t tile = static_cast<uint64_t>(b * T + static_cast<int64_t>(y) * tx + x);
      keys[o] = (tile << 32) | dk;
      values[o] = static_cast<int32_t>(i);
      if (positions != nullptr) positions[o] = static_cast<int32_t>(o);  // o < M <= 2^31 - 1
      ++o;
    }
  }
}

// ranges[2*t], ranges[2*t+1] = [start, end) of global tile t in the sorted list (pre-zeroed, so
// tiles without entries stay [0, 0)).
__global__ void ranges_kernel(const uint64_t* __restrict__ keys, int M, int* __restrict__ ranges) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= M) return;
  const uint32_t tile = static_cast<uint32_t>(keys[i] >> 32);
  if (i == 0) {
    ranges[2 * static_cast<int64_t>(tile)] = 0;
  } else {
    const uint32_t prev = static_cast<uint32_t>(keys[i - 1] >> 32);
    if (prev != tile) {
      ranges[2 * static_cast<int64_t>(prev) + 1] = i;
      ranges[2 * static_cast<int64_t>(tile)] = i;
    }
  }
  if (i == M - 1) ranges[2 * static_cast<int64_t>(tile) + 1] = M;
}

// Deterministic backward only: the radix sort carried emit positions (sorted[e] = emit position
// of sorted entry e) instead of Gaussian indices. Recovers the sorted Gaussian indices
// ids[e] = gauss_of_pos[sorted[e]] (the same as sorting the indices: the keys and their order
// are the same) and the inverse permutation slot_of_pos[sorted[e]] = e, where Gaussian i's
// entries are slot_of_pos[offsets[i] .. offsets[i+1]-1] in row-major tile order.
__global__ void gather_kernel(const int32_t* __restrict__ sorted, const int32_t* __restrict__ gauss_of_pos,
                              int32_t* __restrict__ ids, int32_t* __restrict__ slot_of_pos, int M) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= M) return;
  const int32_t o = sorted[e];
  ids[e] = gauss_of_pos[o];
  slot_of_pos[o] = e;
}

// ---------------------------------------------------------------------------------------------
// Render kernels.

struct Geometry {
  int W, H, K, tx, T;  // image, channels, tiles per row, tiles per camera
};

struct Scene {
  const float* means2d;  // [B*N, 2]
  const float* conics;   // [B*N, 3]
  const float* colors;   // [B*N, K]
  const float* opac;     // [B*N]
  const int* ranges;     // [B*T, 2]
  const int32_t* ids;    // [M] flattened Gaussian index b*N + i, sorted
};

// The block's global tile gt = b * T + t (camera b) and channel chunk (first channel k0 = chunk * CH)
// of a render or backward launch, this thread's pixel (px, py) and its index tid in the block.
struct BlockPixel {
  int gt, chunk, k0, b, px, py, tid;
};

template <int CH>
__device__ __forceinline__ BlockPixel block_pixel(const Geometry& g) {
  const int gt = blockIdx.x;
  const int b = gt / g.T, t = gt - b * g.T;
  return BlockPixel{gt,
                    static_cast<int>(blockIdx.y),
                    static_cast<int>(blockIdx.y) * CH,
                    b,
                    tile_x0(t, g.tx) + static_cast<int>(threadIdx.x),
                    tile_y0(t, g.tx) + static_cast<int>(threadIdx.y),
                    static_cast<int>(threadIdx.y * kTile + threadIdx.x)};
}

// Shared-memory batch of list entries: position, conic + opacity, CH colour channels.
template <int CH>
struct Batch {
  int id[kBlock];
  float2 mean[kBlock];
  float4 cono[kBlock];  // (a, b, c, opacity)
  float col[kBlock * CH];
};

template <int CH>
__device__ __forceinline__ void load_entry(const Scene& s, const Geometry& g, int k0, int e, int slot,
                                           Batch<CH>& sh) {
  const int64_t gi = s.ids[e];
  sh.id[slot] = static_cast<int>(gi);
  sh.mean[slot] = make_float2(s.means2d[2 * gi], s.means2d[2 * gi + 1]);
  sh.cono[slot] = make_float4(s.conics[3 * gi], s.conics[3 * gi + 1], s.conics[3 * gi + 2], s.opac[gi]);
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    sh.col[slot * CH + k] = (k0 + k < g.K) ? s.colors[gi * g.K + k0 + k] : 0.0f;
  }
}

// grid (B*T, chunks), block (16, 16). Writes out[..., k0:k0+CH] and, for chunk 0, trans, last.
template <int CH>
__global__ void __launch_bounds__(kBlock) render_kernel(Scene s, Geometry g, float* __restrict__ out,
                                                        float* __restrict__ trans, int32_t* __restrict__ last) {
  __shared__ Batch<CH> sh;
  const auto [gt, chunk, k0, b, px, py, tid] = block_pixel<CH>(g);
  const bool inside = px < g.W && py < g.H;
  const int start = s.ranges[2 * static_cast<int64_t>(gt)];
  const int end = s.ranges[2 * static_cast<int64_t>(gt) + 1];
  const float fx = static_cast<float>(px), fy = static_cast<float>(py);

  float acc[CH];
#pragma unroll
  for (int k = 0; k < CH; ++k) acc[k] = 0.0f;
  float tr = 1.0f;
  int walked = 0;
  bool done = !inside;

  for (int base = start; base < end; base += kBlock) {
    // Barrier for every thread of the block (also protects the previous batch's readers).
    if (__syncthreads_count(done) == kBlock) break;
    if (base + tid < end) load_entry<CH>(s, g, k0, base + tid, tid, sh);
    __syncthreads();
    const int cnt = min(kBlock, end - base);
    for (int j = 0; !done && j < cnt; ++j) {
      float dx, dy, gauss, raw, alpha;
      if (!eval_alpha(fx, fy, sh.mean[j], sh.cono[j], dx, dy, gauss, raw, alpha)) continue;
      const float next_t = __fmul_rn(tr, __fsub_rn(1.0f, alpha));
      if (next_t < kTMin) {
        done = true;
        break;
      }
      const float w = __fmul_rn(alpha, tr);
#pragma unroll
      for (int k = 0; k < CH; ++k) acc[k] += w * sh.col[j * CH + k];
      tr = next_t;
      walked = base - start + j + 1;
    }
  }
  if (!inside) return;
  const int64_t p = (static_cast<int64_t>(b) * g.H + py) * g.W + px;
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    if (k0 + k < g.K) out[p * g.K + k0 + k] = acc[k];
  }
  if (chunk == 0) {
    trans[p] = tr;
    last[p] = walked;
  }
}

struct Grads {
  const float* out;      // [B, H, W, K] forward image
  const float* trans;    // [B, H, W]
  const int32_t* last;   // [B, H, W]
  const float* d_out;    // [B, H, W, K]
  const float* d_trans;  // [B, H, W]
  float* g_means2d;      // [B*N, 2], zeroed
  float* g_conics;       // [B*N, 3], zeroed
  float* g_colors;       // [B*N, K], zeroed
  float* g_opac;         // [B*N], zeroed
};

// Per-intersection gradient records of the deterministic backward: record e (sorted tile-list
// entry e) is rec[e * stride ...] with stride = 6 * chunks + K: the mean (2), conic (3) and
// opacity (1) gradients of each channel chunk c at 6c .. 6c+5 (each chunk contributes its part of
// dL/dalpha), then the K colour gradients at 6 * chunks + k. Zeroed before the backward kernel,
// which writes the entries its pixels walk; reduce_kernel sums them per Gaussian.
struct Records {
  float* rec;          // [M, stride]
  int64_t stride;      // 6 * chunks + K
  int chunks;          // channel chunks of the launch
};

__device__ __forceinline__ void add_if_nonzero(float* dst, float v) {
  if (v != 0.0f) atomicAdd(dst, v);
}

constexpr int kWarps = kBlock / 32;  // warps per render block
constexpr int kGroup = 32;           // list entries whose warp partials are staged at once (deterministic)

// grid (B*T, chunks), block (16, 16).
// Deterministic = false: each warp's per-entry sum is added to the gradients with atomicAdd.
// Deterministic = true: the lane 0 of each warp stages its warp's per-entry sums in shared memory
// for kGroup entries at a time; then the block sums the kWarps partials of each entry in warp
// order and writes the entry's record (Records). No atomics: the same bits on every run.
template <int CH, bool Deterministic>
__global__ void __launch_bounds__(kBlock) backward_kernel(Scene s, Geometry g, Grads io, Records recs) {
  constexpr int R = 6 + CH;  // record: d mean (2), d conic (3), d opacity, d colour (CH)
  __shared__ Batch<CH> sh;
  __shared__ int s_walk;
  // [kWarps][kGroup][R] warp partials (deterministic only; 14 KiB at CH = 8, plus 15 KiB of
  // batch: within the 48 KiB of static shared memory).
  __shared__ float part[Deterministic ? kWarps * kGroup * R : 1];
  const auto [gt, chunk, k0, b, px, py, tid] = block_pixel<CH>(g);
  const int lane = tid & 31, warp = tid >> 5;
  const bool inside = px < g.W && py < g.H;
  const int start = s.ranges[2 * static_cast<int64_t>(gt)];
  const int n = s.ranges[2 * static_cast<int64_t>(gt) + 1] - start;
  const float fx = static_cast<float>(px), fy = static_cast<float>(py);

  if (tid == 0) s_walk = 0;
  __syncthreads();

  float gk[CH], c_out[CH], prefix[CH];
#pragma unroll
  for (int k = 0; k < CH; ++k) gk[k] = c_out[k] = prefix[k] = 0.0f;
  float g_t = 0.0f, t_final = 0.0f;
  int walk = 0;
  if (inside && n > 0) {
    const int64_t p = (static_cast<int64_t>(b) * g.H + py) * g.W + px;
    bool any = false;
    if (chunk == 0) {  // the transmittance term is added once, by chunk 0
      g_t = io.d_trans[p];
      any = g_t != 0.0f;
    }
    t_final = io.trans[p];
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      if (k0 + k < g.K) {
        gk[k] = io.d_out[p * g.K + k0 + k];
        c_out[k] = io.out[p * g.K + k0 + k];
        any = any || gk[k] != 0.0f;
      }
    }
    if (any) walk = max(0, min(io.last[p], n));
    if (walk > 0) atomicMax(&s_walk, walk);  // a maximum: the same whatever the order
  }
  __syncthreads();
  const int max_walk = s_walk;  // block-uniform

  float tr = 1.0f;
  for (int base = 0; base < max_walk; base += kBlock) {
    const int cnt = min(kBlock, max_walk - base);
    __syncthreads();  // the previous batch is no longer read
    if (tid < cnt) load_entry<CH>(s, g, k0, start + base + tid, tid, sh);
    __syncthreads();
    for (int j0 = 0; j0 < cnt; j0 += kGroup) {  // block-uniform bounds: every thread reaches the barriers
      const int group = min(kGroup, cnt - j0);
      for (int jj = 0; jj < group; ++jj) {  // uniform over the block: all lanes reach the shuffles
        const int j = j0 + jj;
        float rec[R];
#pragma unroll
        for (int r = 0; r < R; ++r) rec[r] = 0.0f;
        bool has = false;
        float dx, dy, gauss, raw, alpha;
        const float4 q = sh.cono[j];
        if (base + j < walk && eval_alpha(fx, fy, sh.mean[j], q, dx, dy, gauss, raw, alpha)) {
          has = true;
          const float w = __fmul_rn(alpha, tr);
          const float inv = __frcp_rn(__fsub_rn(1.0f, alpha));
          float d_alpha = -g_t * t_final * inv;
#pragma unroll
          for (int k = 0; k < CH; ++k) {
            const float c = sh.col[j * CH + k];
            rec[6 + k] = w * gk[k];
            prefix[k] += w * c;
            d_alpha += gk[k] * (c * tr - (c_out[k] - prefix[k]) * inv);
          }
          tr = __fmul_rn(tr, __fsub_rn(1.0f, alpha));
          if (!(raw > kAlphaMax)) {  // clamped: alpha no longer depends on o or the Gaussian
            rec[5] = d_alpha * gauss;
            const float d_power = d_alpha * raw;
            rec[0] = d_power * (q.x * dx + q.y * dy);
            rec[1] = d_power * (q.z * dy + q.y * dx);
            rec[2] = d_power * (-0.5f * dx * dx);
            rec[3] = d_power * (-dx * dy);
            rec[4] = d_power * (-0.5f * dy * dy);
          }
        }
        const bool warp_has = __any_sync(0xffffffffu, has);
        if (warp_has) {  // a fixed shuffle tree: the warp's sum is the same bits on every run
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
            for (int r = 0; r < R; ++r) rec[r] += __shfl_down_sync(0xffffffffu, rec[r], off);
          }
        }
        if (lane == 0) {
          if constexpr (Deterministic) {
            // Zeros too when no lane of the warp composited entry j (rec stayed 0).
#pragma unroll
            for (int r = 0; r < R; ++r) part[(warp * kGroup + jj) * R + r] = rec[r];
          } else if (warp_has) {
            const int64_t gi = sh.id[j];
            add_if_nonzero(io.g_means2d + 2 * gi, rec[0]);
            add_if_nonzero(io.g_means2d + 2 * gi + 1, rec[1]);
            add_if_nonzero(io.g_conics + 3 * gi, rec[2]);
            add_if_nonzero(io.g_conics + 3 * gi + 1, rec[3]);
            add_if_nonzero(io.g_conics + 3 * gi + 2, rec[4]);
            add_if_nonzero(io.g_opac + gi, rec[5]);
#pragma unroll
            for (int k = 0; k < CH; ++k) {
              if (k0 + k < g.K) add_if_nonzero(io.g_colors + gi * g.K + k0 + k, rec[6 + k]);
            }
          }
        }
      }
      if constexpr (Deterministic) {
        __syncthreads();  // the group's warp partials are in `part`
        for (int idx = tid; idx < group * R; idx += kBlock) {
          const int jj = idx / R, r = idx - jj * R;
          float v = 0.0f;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) v += part[(w * kGroup + jj) * R + r];  // warp order
          const int64_t e = static_cast<int64_t>(start) + base + j0 + jj;  // sorted-list entry
          if (r < 6) {
            recs.rec[e * recs.stride + 6 * chunk + r] = v;
          } else if (k0 + r - 6 < g.K) {
            recs.rec[e * recs.stride + 6 * static_cast<int64_t>(recs.chunks) + k0 + (r - 6)] = v;
          }
        }
        __syncthreads();  // `part` may be overwritten by the next group
      }
    }
  }
}

// Deterministic backward: gradient column c of flattened Gaussian i (c < 2 mean, < 5 conic, 5
// opacity, 6 + k colour k), one thread per (i, c), consecutive threads on the columns of one
// Gaussian (coalesced reads of its records). Sums Gaussian i's records in emit order (its tiles
// in row-major order, the CPU handler's order), the chunks of each record in chunk order, and
// writes the result (zero for a Gaussian without intersections): every output is written.
__global__ void reduce_kernel(Records recs, const int64_t* __restrict__ offsets, const int32_t* __restrict__ slot_of_pos,
                              int64_t BN, int K, Grads io) {
  const int64_t C = 6 + static_cast<int64_t>(K);
  const int64_t total = BN * C;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / C;
    const int c = static_cast<int>(idx - i * C);
    float v = 0.0f;
    for (int64_t o = offsets[i]; o < offsets[i + 1]; ++o) {
      const float* rec = recs.rec + static_cast<int64_t>(slot_of_pos[o]) * recs.stride;
      if (c < 6) {
        for (int ch = 0; ch < recs.chunks; ++ch) v += rec[6 * ch + c];
      } else {
        v += rec[6 * static_cast<int64_t>(recs.chunks) + (c - 6)];
      }
    }
    if (c < 2) {
      io.g_means2d[2 * i + c] = v;
    } else if (c < 5) {
      io.g_conics[3 * i + (c - 2)] = v;
    } else if (c == 5) {
      io.g_opac[i] = v;
    } else {
      io.g_colors[i * K + (c - 6)] = v;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

using dhjax_cuda::check_launch;
using dhjax_cuda::cuda_error;
using dhjax_cuda::run_cub;
using dhjax_cuda::scratch_alloc;

// Dimensions from means2d [...,N,2] and the image [...,H,W,K] (dhjax_splat::get_dims), the sizes
// of the per-Gaussian inputs, and this handler's index limits.
ffi::Error get_dims(ffi::Buffer<ffi::F32>& means2d, ffi::Span<const int64_t> img, ffi::Buffer<ffi::F32>& conics,
                    ffi::Buffer<ffi::F32>& colors, ffi::Buffer<ffi::F32>& opac, ffi::Buffer<ffi::F32>& depths,
                    ffi::Buffer<ffi::S32>& rects, Dims* d) {
  if (auto e = dhjax_splat::get_dims(means2d.dimensions(), img, d); e.failure()) return e;
  if (auto e = dhjax_splat::check_inputs(*d, conics, colors, opac, depths, rects); e.failure()) return e;
  if (d->B * d->N >= kIntMax) {
    return ffi::Error::InvalidArgument("dhjax_splat CUDA: at most 2^31 - 2 Gaussians over all cameras");
  }
  if (d->B * d->T > kIntMax) {
    return ffi::Error::InvalidArgument("dhjax_splat CUDA: at most 2^31 - 1 tiles over all cameras");
  }
  return ffi::Error::Success();
}

// What the deterministic backward needs beyond the tile lists: Gaussian i's entries in the sorted
// list are slot_of_pos[offsets[i] .. offsets[i+1]-1], its tiles in row-major order.
struct EntryIndex {
  const int64_t* offsets = nullptr;      // [B*N + 1] exclusive scan of the tile counts
  const int32_t* slot_of_pos = nullptr;  // [M] sorted-list entry of each emit position
  int M = 0;                             // number of intersections
};

// Bins the Gaussians of all B cameras into tiles (steps 1-5 of the file comment). On success,
// tiles->ranges is [B*T, 2] and tiles->ids the sorted list (nullptr when there is no entry).
// With `index` (deterministic backward), the sort carries emit positions instead of Gaussian
// indices and gather_kernel derives both the same tile->ids and *index.
ffi::Error bin_gaussians(cudaStream_t stream, ffi::ScratchAllocator& scratch, const Dims& d, const float* depths,
                         const int32_t* rects, Scene* tiles, EntryIndex* index = nullptr) {
  const int64_t BN = d.B * d.N, BT = d.B * d.T;
  int* ranges = nullptr;
  if (auto e = scratch_alloc(scratch, 2 * BT, &ranges, "tile ranges"); e.failure()) return e;
  if (cudaError_t err = cudaMemsetAsync(ranges, 0, sizeof(int) * 2 * BT, stream); err != cudaSuccess) {
    return cuda_error(err, "memset of the tile ranges");
  }
  tiles->ranges = ranges;
  tiles->ids = nullptr;
  if (BN == 0) return ffi::Error::Success();

  // 1-2. Tiles per Gaussian and their exclusive prefix sum (int64: the total cannot overflow).
  int64_t *counts = nullptr, *offsets = nullptr;
  if (auto e = scratch_alloc(scratch, BN + 1, &counts, "tile counts"); e.failure()) return e;
  if (auto e = scratch_alloc(scratch, BN + 1, &offsets, "tile offsets"); e.failure()) return e;
  const unsigned count_blocks = static_cast<unsigned>((BN + 1 + kLinear - 1) / kLinear);
  count_kernel<<<count_blocks, kLinear, 0, stream>>>(rects, counts, BN, static_cast<int>(d.tx),
                                                     static_cast<int>(d.ty));
  if (auto e = check_launch("count_kernel"); e.failure()) return e;
  if (auto e = run_cub(scratch, "cub::DeviceScan::ExclusiveSum",
                       [&](void* temp, size_t& bytes) {
                         return cub::DeviceScan::ExclusiveSum(temp, bytes, counts, offsets, static_cast<int>(BN + 1),
                                                              stream);
                       });
      e.failure())
    return e;

  // The number of intersections, read back to allocate exactly that much.
  int64_t total = 0;
  if (cudaError_t err = cudaMemcpyAsync(&total, offsets + BN, sizeof(int64_t), cudaMemcpyDeviceToHost, stream);
      err != cudaSuccess) {
    return cuda_error(err, "copy of the intersection count");
  }
  if (cudaError_t err = cudaStreamSynchronize(stream); err != cudaSuccess) {
    return cuda_error(err, "stream synchronisation after the tile count");
  }
  if (total < 0 || total > kIntMax) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "dhjax_splat CUDA: " + std::to_string(total) +
                          " Gaussian-tile intersections; this kernel handles at most 2^31 - 1 per call "
                          "(split the cameras into several calls)");
  }
  if (total == 0) return ffi::Error::Success();
  const int M = static_cast<int>(total);
  if (index != nullptr) {
    index->offsets = offsets;
    index->M = M;
  }

  // 3. Keys and values, in Gaussian index order.
  uint64_t *keys_in = nullptr, *keys_out = nullptr;
  int32_t *vals_in = nullptr, *vals_out = nullptr;
  if (auto e = scratch_alloc(scratch, M, &keys_in, "sort keys"); e.failure()) return e;
  if (auto e = scratch_alloc(scratch, M, &keys_out, "sorted keys"); e.failure()) return e;
  if (auto e = scratch_alloc(scratch, M, &vals_in, "sort values"); e.failure()) return e;
  if (auto e = scratch_alloc(scratch, M, &vals_out, "sorted values"); e.failure()) return e;
  const unsigned gauss_blocks = static_cast<unsigned>((BN + kLinear - 1) / kLinear);
  int32_t *pos_in = nullptr, *pos_out = nullptr;
  if (index != nullptr) {
    if (auto e = scratch_alloc(scratch, M, &pos_in, "emit positions"); e.failure()) return e;
    if (auto e = scratch_alloc(scratch, M, &pos_out, "sorted emit positions"); e.failure()) return e;
  }
  emit_kernel<<<gauss_blocks, kLinear, 0, stream>>>(rects, depths, offsets, keys_in, vals_in, pos_in, BN, d.N,
                                                    static_cast<int>(d.tx), static_cast<int>(d.ty), d.T);
  if (auto e = check_launch("emit_kernel"); e.failure()) return e;

  // 4. Stable radix sort on (tile, depth); only the bits in use.
  int tile_bits = 0;
  while ((int64_t{1} << tile_bits) < BT) ++tile_bits;
  const int end_bit = 32 + tile_bits;
  // The deterministic backward sorts the emit positions along (same keys, so the same stable
  // order) and gathers the indices from them.
  int32_t* sort_in = index != nullptr ? pos_in : vals_in;
  int32_t* sort_out = index != nullptr ? pos_out : vals_out;
  if (auto e = run_cub(scratch, "cub::DeviceRadixSort::SortPairs",
                       [&](void* temp, size_t& bytes) {
                         return cub::DeviceRadixSort::SortPairs(temp, bytes, keys_in, keys_out, sort_in, sort_out, M,
                                                                0, end_bit, stream);
                       });
      e.failure())
    return e;
  if (index != nullptr) {
    // pos_in is free after the sort (cub leaves its inputs unchanged and the sort is complete in
    // stream order): it becomes slot_of_pos.
    gather_kernel<<<static_cast<unsigned>((M + kLinear - 1) / kLinear), kLinear, 0, stream>>>(pos_out, vals_in,
                                                                                              vals_out, pos_in, M);
    if (auto e = check_launch("gather_kernel"); e.failure()) return e;
    index->slot_of_pos = pos_in;
  }

  // 5. Per-tile ranges.
  ranges_kernel<<<static_cast<unsigned>((M + kLinear - 1) / kLinear), kLinear, 0, stream>>>(keys_out, M, ranges);
  if (auto e = check_launch("ranges_kernel"); e.failure()) return e;
  tiles->ids = vals_out;
  return ffi::Error::Success();
}

// Calls fn(std::integral_constant<int, CH>) with the channel chunk for K channels.
template <typename Fn>
void with_chunk(int64_t K, Fn&& fn) {
  if (K <= 1) {
    fn(std::integral_constant<int, 1>{});
  } else if (K == 2) {
    fn(std::integral_constant<int, 2>{});
  } else if (K == 3) {
    fn(std::integral_constant<int, 3>{});
  } else if (K == 4) {
    fn(std::integral_constant<int, 4>{});
  } else {
    fn(std::integral_constant<int, 8>{});
  }
}

int64_t num_chunks(int64_t K, int ch) { return std::max<int64_t>(1, (K + ch - 1) / ch); }

// The per-Gaussian inputs of the scene (its tile lists come from bin_gaussians) and the image
// geometry, as the forward and the backward kernels read them.
Geometry fill_scene(const Dims& d, ffi::Buffer<ffi::F32>& means2d, ffi::Buffer<ffi::F32>& conics,
                    ffi::Buffer<ffi::F32>& colors, ffi::Buffer<ffi::F32>& opac, Scene* s) {
  s->means2d = means2d.typed_data();
  s->conics = conics.typed_data();
  s->colors = colors.typed_data();
  s->opac = opac.typed_data();
  return Geometry{static_cast<int>(d.W), static_cast<int>(d.H), static_cast<int>(d.K), static_cast<int>(d.tx),
                  static_cast<int>(d.T)};
}

// Launches one block per (tile, channel chunk): picks the chunk width CH for d.K channels and
// calls launch(std::integral_constant<int, CH>, grid) with grid (B*T, chunks); `kernel` names
// the launch in the error.
template <typename Launch>
ffi::Error launch_tiles(const Dims& d, const char* kernel, Launch&& launch) {
  bool too_many_chunks = false;
  with_chunk(d.K, [&](auto ch) {
    constexpr int CH = decltype(ch)::value;
    const int64_t chunks = num_chunks(d.K, CH);
    if (chunks > 65535) {
      too_many_chunks = true;
      return;
    }
    launch(ch, dim3(static_cast<unsigned>(d.B * d.T), static_cast<unsigned>(chunks)));
  });
  if (too_many_chunks) return ffi::Error::InvalidArgument("dhjax_splat CUDA: too many channels");
  return check_launch(kernel);
}

ffi::Error SplatForwardCudaImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::Buffer<ffi::F32> means2d,
                                ffi::Buffer<ffi::F32> conics, ffi::Buffer<ffi::F32> colors,
                                ffi::Buffer<ffi::F32> opac, ffi::Buffer<ffi::F32> depths,
                                ffi::Buffer<ffi::S32> rects, ffi::ResultBuffer<ffi::F32> out,
                                ffi::ResultBuffer<ffi::F32> trans, ffi::ResultBuffer<ffi::S32> last) {
  Dims d;
  if (auto e = get_dims(means2d, out->dimensions(), conics, colors, opac, depths, rects, &d); e.failure()) return e;
  if (auto e = check_forward_results(d, trans->element_count(), last->element_count()); e.failure())
    return e;
  const int64_t HW = d.H * d.W;
  if (d.B == 0 || HW == 0) return ffi::Error::Success();  // nothing to write

  Scene s;
  if (auto e = bin_gaussians(stream, scratch, d, depths.typed_data(), rects.typed_data(), &s); e.failure()) return e;
  const Geometry g = fill_scene(d, means2d, conics, colors, opac, &s);
  return launch_tiles(d, "render_kernel", [&](auto ch, dim3 grid) {
    render_kernel<decltype(ch)::value><<<grid, dim3(kTile, kTile), 0, stream>>>(s, g, out->typed_data(),
                                                                                 trans->typed_data(),
                                                                                 last->typed_data());
  });
}

// Deterministic = false (target dhjax_splat_bwd): warp sums added with atomicAdd, so the last
// bits of the gradients vary from call to call. Deterministic = true (target
// dhjax_splat_bwd_deterministic): per-intersection records (M x (6 * chunks + K) floats of
// scratch memory) summed per Gaussian in a fixed order by reduce_kernel: the same bits on every
// call. Both compute the same formulas and make the same decisions.
template <bool Deterministic>
ffi::Error SplatBackwardCudaImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::Buffer<ffi::F32> means2d,
                                 ffi::Buffer<ffi::F32> conics, ffi::Buffer<ffi::F32> colors,
                                 ffi::Buffer<ffi::F32> opac, ffi::Buffer<ffi::F32> depths,
                                 ffi::Buffer<ffi::S32> rects, ffi::Buffer<ffi::F32> out,
                                 ffi::Buffer<ffi::F32> trans, ffi::Buffer<ffi::S32> last,
                                 ffi::Buffer<ffi::F32> d_out, ffi::Buffer<ffi::F32> d_trans,
                                 ffi::ResultBuffer<ffi::F32> g_means2d, ffi::ResultBuffer<ffi::F32> g_conics,
                                 ffi::ResultBuffer<ffi::F32> g_colors, ffi::ResultBuffer<ffi::F32> g_opac) {
  Dims d;
  if (auto e = get_dims(means2d, out.dimensions(), conics, colors, opac, depths, rects, &d); e.failure()) return e;
  if (auto e = check_backward(d, trans, last, d_out, d_trans, g_means2d, g_conics, g_colors, g_opac);
      e.failure())
    return e;
  const int64_t HW = d.H * d.W, BN = d.B * d.N;

  // Zeroed outputs: the atomics accumulate into them; the deterministic reduction overwrites every
  // element, but only runs when there is at least one intersection.
  for (auto* res : {&g_means2d, &g_conics, &g_colors, &g_opac}) {
    if ((*res)->size_bytes() == 0) continue;
    if (cudaError_t err = cudaMemsetAsync((*res)->typed_data(), 0, (*res)->size_bytes(), stream);
        err != cudaSuccess) {
      return cuda_error(err, "memset of the gradients");
    }
  }
  if (BN == 0 || HW == 0) return ffi::Error::Success();

  Scene s;
  EntryIndex index;
  if (auto e = bin_gaussians(stream, scratch, d, depths.typed_data(), rects.typed_data(), &s,
                             Deterministic ? &index : nullptr);
      e.failure())
    return e;
  if (s.ids == nullptr) return ffi::Error::Success();  // no intersections: all gradients are zero
  const Geometry g = fill_scene(d, means2d, conics, colors, opac, &s);
  const Grads io{out.typed_data(),        trans.typed_data(),      last.typed_data(),
                 d_out.typed_data(),      d_trans.typed_data(),    g_means2d->typed_data(),
                 g_conics->typed_data(),  g_colors->typed_data(),  g_opac->typed_data()};
  Records recs{nullptr, 0, 0};
  if constexpr (Deterministic) {
    int width = 1;  // the chunk width launch_tiles will pick
    with_chunk(d.K, [&](auto ch) { width = decltype(ch)::value; });
    const int64_t chunks = num_chunks(d.K, width);
    if (chunks > 65535) return ffi::Error::InvalidArgument("dhjax_splat CUDA: too many channels");
    recs.chunks = static_cast<int>(chunks);
    recs.stride = 6 * chunks + d.K;
    const int64_t count = static_cast<int64_t>(index.M) * recs.stride;  // M < 2^31: no overflow
    if (auto e = scratch_alloc(scratch, count, &recs.rec, "per-intersection gradient records"); e.failure()) return e;
    // Entries beyond a tile's longest walk are not written by backward_kernel: they stay zero.
    if (cudaError_t err = cudaMemsetAsync(recs.rec, 0, sizeof(float) * static_cast<size_t>(count), stream);
        err != cudaSuccess) {
      return cuda_error(err, "memset of the gradient records");
    }
  }
  if (auto e = launch_tiles(d, "backward_kernel",
                            [&](auto ch, dim3 grid) {
                              backward_kernel<decltype(ch)::value, Deterministic>
                                  <<<grid, dim3(kTile, kTile), 0, stream>>>(s, g, io, recs);
                            });
      e.failure())
    return e;
  if constexpr (Deterministic) {
    const int64_t total = BN * (6 + d.K);
    const int64_t blocks = std::min<int64_t>((total + kLinear - 1) / kLinear, int64_t{1} << 20);  // grid-stride
    reduce_kernel<<<static_cast<unsigned>(blocks), kLinear, 0, stream>>>(recs, index.offsets, index.slot_of_pos, BN,
                                                                        static_cast<int>(d.K), io);
    return check_launch("reduce_kernel");
  }
  return ffi::Error::Success();
}

}  // namespace

DHJAX_EXPORT_ABI()

XLA_FFI_DEFINE_HANDLER_SYMBOL(SplatForwardCuda, SplatForwardCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>() DHJAX_SPLAT_FORWARD_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SplatBackwardCuda, SplatBackwardCudaImpl<false>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>() DHJAX_SPLAT_BACKWARD_SIGNATURE);

// The deterministic backward: same signature, its own target (dhjax_splat_bwd_deterministic), so
// that neither the shared FFI signature nor the CPU library changes (the CPU registers that target
// to its SplatBackward, which is deterministic already).
XLA_FFI_DEFINE_HANDLER_SYMBOL(SplatBackwardDeterministicCuda, SplatBackwardCudaImpl<true>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>() DHJAX_SPLAT_BACKWARD_SIGNATURE);

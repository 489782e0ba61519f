// CUDA handlers of dhjax's ray marching and volume compositing (XLA FFI): march, composite forward,
// composite backward. Same operands, results and rules as the CPU handlers (raymarch_cpu.cc; the
// rules in dhjax/ops/raymarch.py and raymarch_common.h, whose host/device functions both use).
//
// march, in one FFI call with no host round trip:
//   1. count_kernel: one thread per ray, the number of kept samples (int64 in scratch; entry G*R
//      is a zero pad so the scan's last element is the grand total).
//   2. cub::DeviceScan::ExclusiveSum over the G*R+1 counts -> global offsets (int64).
//   3. fill_kernel: every slot t = 0, delta = 0, ray = -1.
//   4. write_kernel: one thread per ray: ray_start = offsets[i] - offsets[g*R], the stored count
//      clipped to the capacity, complete, n_samples (thread r = 0 of each group), then it marches
//      again and writes its kept samples. A group total above 2^31 - 1 saturates at 2^31 - 1
//      here (the CPU handler returns an error instead); K <= 2^20 per ray makes that need
//      > 2048 fully occupied rays of a million steps each.
// composite forward / backward: one thread per ray (raymarch_common.h's composite_*_ray, the
// code the CPU runs), after zeroing the per-sample outputs.
//
// Numerics: CMake compiles this with --use_fast_math -ftz=false (subnormals kept, as on the
// host: fast-math alone would flush them, even in the __f*_rn intrinsics). The marching rule and
// the compositing stop decision (S_n <= s_max, S a float32 running sum) use __f*_rn intrinsics
// (no FMA contraction, IEEE division), so which samples exist and which are composited is
// bit-identical to the CPU handler and the reference. exp/expm1 of the weights may differ by
// about 2 + 1.17|x| ulp (fast-math __expf: ~13 ulp at the default stop S = 9.2), which moves
// values, never decisions.
//
// Written and compiled with nvcc (sm_80) but NOT yet run on a GPU (none was available): the
// gpu-marked tests in tests/test_ops_raymarch.py are its first run.

#include <cuda_runtime.h>

#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#define DHJAX_CUDA_OP "dhjax_raymarch"
#include "dhjax_cuda.h"
#include "dhjax_parallel.h"
#include "raymarch_common.h"
#include "raymarch_ffi.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace rm = dhjax_raymarch;

namespace {

constexpr int kThreads = 256;

using dhjax_cuda::check_launch;
using dhjax_cuda::cuda_error;
using dhjax_cuda::run_cub;
using dhjax_cuda::scratch_alloc;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

struct MarchIn {
  const float* o;
  const float* d;
  const uint8_t* grid;
  const float* bmin;
  const float* bmax;
  float step;
  int64_t G, R, D, C;
};

__device__ int32_t count_ray(const MarchIn& in, int64_t i) {
  const int64_t g = i / in.R;
  const float *o = in.o + 3 * i, *d = in.d + 3 * i, *bmn = in.bmin + 3 * g, *bmx = in.bmax + 3 * g;
  const int64_t D3 = in.D * in.D * in.D;
  if (D3 == 0) return 0;
  const uint8_t* gg = in.grid + g * D3;
  float t0 = 0.0f;
  const int32_t K = rm::ray_range(o, d, bmn, bmx, in.step, &t0);
  const int32_t Di = static_cast<int32_t>(in.D);
  int32_t n = 0;
  for (int32_t k = 0; k < K; ++k) n += gg[rm::cell_of(o, d, bmn, bmx, rm::sample_t(t0, k, in.step), Di)] != 0;
  return n;
}

__global__ void count_kernel(MarchIn in, int64_t* counts) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = in.G * in.R;
  if (i < n) counts[i] = count_ray(in, i);
  if (i == n) counts[n] = 0;
}

__global__ void fill_kernel(float* t, float* delta, int32_t* ray, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  t[i] = 0.0f;
  delta[i] = 0.0f;
  ray[i] = -1;
}

__device__ int32_t saturate32(int64_t v) {
  return static_cast<int32_t>(v > 2147483647LL ? 2147483647LL : v);
}

__global__ void write_kernel(MarchIn in, const int64_t* counts, const int64_t* offsets, float* t, float* delta,
                             int32_t* ray, int32_t* ray_start, int32_t* ray_count, int32_t* n_samples,
                             bool* complete) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= in.G * in.R) return;
  const int64_t g = i / in.R, r = i - g * in.R;
  const int64_t base = offsets[g * in.R];
  const int64_t start = offsets[i] - base;
  if (r == 0) n_samples[g] = saturate32(offsets[(g + 1) * in.R] - base);
  const int64_t count = counts[i];
  int64_t stored = in.C - start;
  stored = stored < count ? stored : count;
  stored = stored > 0 ? stored : 0;
  ray_start[i] = saturate32(start);
  ray_count[i] = static_cast<int32_t>(stored);
  complete[i] = stored == count;
  if (stored == 0) return;
  const float *o = in.o + 3 * i, *d = in.d + 3 * i, *bmn = in.bmin + 3 * g, *bmx = in.bmax + 3 * g;
  const uint8_t* gg = in.grid + g * in.D * in.D * in.D;
  const int32_t Di = static_cast<int32_t>(in.D);
  float t0 = 0.0f;
  const int32_t K = rm::ray_range(o, d, bmn, bmx, in.step, &t0);
  int64_t j = g * in.C + start;
  const int64_t stop = j + stored;
  for (int32_t k = 0; k < K && j < stop; ++k) {
    const float tk = rm::sample_t(t0, k, in.step);
    if (gg[rm::cell_of(o, d, bmn, bmx, tk, Di)] == 0) continue;
    t[j] = tk;
    delta[j] = in.step;
    ray[j] = static_cast<int32_t>(r);
    ++j;
  }
}

ffi::Error MarchCudaImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::Buffer<ffi::F32> origins,
                         ffi::Buffer<ffi::F32> directions, ffi::Buffer<ffi::U8> grid, ffi::Buffer<ffi::F32> box_min,
                         ffi::Buffer<ffi::F32> box_max, float step, ffi::ResultBuffer<ffi::F32> t_out,
                         ffi::ResultBuffer<ffi::F32> delta_out, ffi::ResultBuffer<ffi::S32> ray_out,
                         ffi::ResultBuffer<ffi::S32> start_out, ffi::ResultBuffer<ffi::S32> count_out,
                         ffi::ResultBuffer<ffi::S32> n_out, ffi::ResultBuffer<ffi::PRED> complete_out) {
  rm::MarchDims m;
  if (auto e = rm::march_dims(origins.dimensions(), directions.dimensions(), grid.dimensions(), box_min.dimensions(),
                              box_max.dimensions(), t_out->dimensions(), &m);
      e.failure())
    return e;
  if (!(step > 0.0f) || !std::isfinite(step)) {
    return ffi::Error::InvalidArgument("dhjax_raymarch: step must be a positive finite float");
  }
  const int64_t GR = m.G * m.R;
  if (m.G * m.C > 0) {
    fill_kernel<<<blocks_for(m.G * m.C), kThreads, 0, stream>>>(t_out->typed_data(), delta_out->typed_data(),
                                                              ray_out->typed_data(), m.G * m.C);
    if (auto e = check_launch("fill_kernel"); e.failure()) return e;
  }
  if (GR == 0) {
    if (m.G > 0) {
      if (cudaError_t err = cudaMemsetAsync(n_out->typed_data(), 0, sizeof(int32_t) * m.G, stream);
          err != cudaSuccess)
        return cuda_error(err, "memset of n_samples");
    }
    return ffi::Error::Success();
  }
  if (GR >= (int64_t{1} << 31) - 1) {
    return ffi::Error::InvalidArgument("dhjax_raymarch CUDA: at most 2^31 - 2 rays over all groups");
  }
  MarchIn in{origins.typed_data(), directions.typed_data(), grid.typed_data(), box_min.typed_data(),
             box_max.typed_data(), step, m.G, m.R, m.D, m.C};
  int64_t* counts = nullptr;
  int64_t* offsets = nullptr;
  if (auto e = scratch_alloc(scratch, GR + 1, &counts, "ray counts"); e.failure()) return e;
  if (auto e = scratch_alloc(scratch, GR + 1, &offsets, "ray offsets"); e.failure()) return e;
  count_kernel<<<blocks_for(GR + 1), kThreads, 0, stream>>>(in, counts);
  if (auto e = check_launch("count_kernel"); e.failure()) return e;
  if (auto e = run_cub(scratch, "cub::DeviceScan::ExclusiveSum",
                       [&](void* temp, size_t& bytes) {
                         return cub::DeviceScan::ExclusiveSum(temp, bytes, counts, offsets, static_cast<int>(GR + 1),
                                                              stream);
                       });
      e.failure())
    return e;
  write_kernel<<<blocks_for(GR), kThreads, 0, stream>>>(in, counts, offsets, t_out->typed_data(),
                                                         delta_out->typed_data(), ray_out->typed_data(),
                                                         start_out->typed_data(), count_out->typed_data(),
                                                         n_out->typed_data(), complete_out->typed_data());
  return check_launch("write_kernel");
}

struct CompositeIn {
  const float* sigma;
  const float* rgb;
  const float* t;
  const float* delta;
  const int32_t* start;
  const int32_t* count;
  float s_max;
  int64_t G, R, C;
};

__global__ void composite_forward_kernel(CompositeIn in, float* color, float* depth, float* trans, float* weights) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= in.G * in.R) return;
  const int64_t base = (i / in.R) * in.C;
  int64_t lo, hi;
  rm::ray_slots(in.start[i], in.count[i], in.C, &lo, &hi);
  rm::composite_forward_ray(in.sigma + base, in.rgb + 3 * base, in.t + base, in.delta + base, lo, hi, in.s_max,
                            color + 3 * i, depth + i, trans + i, weights + base);
}

__global__ void composite_backward_kernel(CompositeIn in, const float* gc, const float* gd, const float* gt,
                                          const float* gw, float* d_sigma, float* d_rgb) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= in.G * in.R) return;
  const int64_t base = (i / in.R) * in.C;
  int64_t lo, hi;
  rm::ray_slots(in.start[i], in.count[i], in.C, &lo, &hi);
  rm::composite_backward_ray(in.sigma + base, in.rgb + 3 * base, in.t + base, in.delta + base, lo, hi, in.s_max,
                             gc + 3 * i, gd[i], gt[i], gw + base, d_sigma + base, d_rgb + 3 * base);
}

ffi::Error composite_in(ffi::Buffer<ffi::F32>& sigma, ffi::Buffer<ffi::F32>& rgb, ffi::Buffer<ffi::F32>& t,
                        ffi::Buffer<ffi::F32>& delta, ffi::Buffer<ffi::S32>& ray_start,
                        ffi::Buffer<ffi::S32>& ray_count, float s_max, CompositeIn* in) {
  rm::CompositeDims c;
  if (auto e = rm::composite_dims(sigma.dimensions(), rgb.dimensions(), t.dimensions(), delta.dimensions(),
                                  ray_start.dimensions(), ray_count.dimensions(), &c);
      e.failure())
    return e;
  *in = CompositeIn{sigma.typed_data(), rgb.typed_data(),       t.typed_data(), delta.typed_data(),
                    ray_start.typed_data(), ray_count.typed_data(), s_max,          c.G,
                    c.R,                    c.C};
  return ffi::Error::Success();
}

ffi::Error CompositeForwardCudaImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> sigma, ffi::Buffer<ffi::F32> rgb,
                                    ffi::Buffer<ffi::F32> t, ffi::Buffer<ffi::F32> delta,
                                    ffi::Buffer<ffi::S32> ray_start, ffi::Buffer<ffi::S32> ray_count, float s_max,
                                    ffi::ResultBuffer<ffi::F32> color, ffi::ResultBuffer<ffi::F32> depth,
                                    ffi::ResultBuffer<ffi::F32> trans, ffi::ResultBuffer<ffi::F32> weights) {
  CompositeIn in;
  if (auto e = composite_in(sigma, rgb, t, delta, ray_start, ray_count, s_max, &in); e.failure()) return e;
  if (in.G * in.C > 0) {
    if (cudaError_t err = cudaMemsetAsync(weights->typed_data(), 0, sizeof(float) * in.G * in.C, stream);
        err != cudaSuccess)
      return cuda_error(err, "memset of the weights");
  }
  if (in.G * in.R == 0) return ffi::Error::Success();
  composite_forward_kernel<<<blocks_for(in.G * in.R), kThreads, 0, stream>>>(
      in, color->typed_data(), depth->typed_data(), trans->typed_data(), weights->typed_data());
  return check_launch("composite_forward_kernel");
}

ffi::Error CompositeBackwardCudaImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> sigma, ffi::Buffer<ffi::F32> rgb,
                                     ffi::Buffer<ffi::F32> t, ffi::Buffer<ffi::F32> delta,
                                     ffi::Buffer<ffi::S32> ray_start, ffi::Buffer<ffi::S32> ray_count,
                                     ffi::Buffer<ffi::F32> d_color, ffi::Buffer<ffi::F32> d_depth,
                                     ffi::Buffer<ffi::F32> d_trans, ffi::Buffer<ffi::F32> d_weights, float s_max,
                                     ffi::ResultBuffer<ffi::F32> d_sigma, ffi::ResultBuffer<ffi::F32> d_rgb) {
  CompositeIn in;
  if (auto e = composite_in(sigma, rgb, t, delta, ray_start, ray_count, s_max, &in); e.failure()) return e;
  if (d_color.element_count() != static_cast<size_t>(3 * in.G * in.R) ||
      d_depth.element_count() != static_cast<size_t>(in.G * in.R) ||
      d_trans.element_count() != static_cast<size_t>(in.G * in.R) ||
      d_weights.element_count() != static_cast<size_t>(in.G * in.C)) {
    return ffi::Error::InvalidArgument("dhjax_raymarch: cotangent shapes do not match the forward's results");
  }
  if (in.G * in.C > 0) {
    if (cudaError_t err = cudaMemsetAsync(d_sigma->typed_data(), 0, sizeof(float) * in.G * in.C, stream);
        err != cudaSuccess)
      return cuda_error(err, "memset of d_sigma");
    if (cudaError_t err = cudaMemsetAsync(d_rgb->typed_data(), 0, sizeof(float) * 3 * in.G * in.C, stream);
        err != cudaSuccess)
      return cuda_error(err, "memset of d_rgb");
  }
  if (in.G * in.R == 0) return ffi::Error::Success();
  composite_backward_kernel<<<blocks_for(in.G * in.R), kThreads, 0, stream>>>(
      in, d_color.typed_data(), d_depth.typed_data(), d_trans.typed_data(), d_weights.typed_data(),
      d_sigma->typed_data(), d_rgb->typed_data());
  return check_launch("composite_backward_kernel");
}

}  // namespace

DHJAX_EXPORT_ABI()

XLA_FFI_DEFINE_HANDLER_SYMBOL(RaymarchMarchCuda, MarchCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>() DHJAX_RAYMARCH_MARCH_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RaymarchCompositeForwardCuda, CompositeForwardCudaImpl,
                              ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  DHJAX_RAYMARCH_COMPOSITE_FWD_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RaymarchCompositeBackwardCuda, CompositeBackwardCudaImpl,
                              ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  DHJAX_RAYMARCH_COMPOSITE_BWD_SIGNATURE);

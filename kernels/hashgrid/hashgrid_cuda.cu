// CUDA handlers of dhjax's multi-resolution hash-grid encoding (XLA FFI): forward and backward.
//
// Same operands, attributes and results as the CPU handlers (hashgrid_cpu.cc), plus: the table
// may be f32 or f16. With an f16 table, the features are interpolated in f32 from the f16 values
// and the table gradient is accumulated in f32 (d_table is always f32; the Python wrapper casts
// it to the table's dtype).
//
// Launch layout: one thread per (point, level) in the forward and the table gradient, with the
// level on blockIdx.y so the threads of a block touch a single level (its part of the table stays
// in cache); table gradients are summed with atomicAdd into the zeroed f32 d_table. The points
// gradient uses one thread per point looping over the levels (no atomics).

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "dhjax_parallel.h"
#include "hashgrid_common.h"
#include "hashgrid_ffi.h"
#include "hashgrid_host.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dhjax_hashgrid::Batch;
using dhjax_hashgrid::Levels;
using dhjax_hashgrid::Shapes;

namespace {

constexpr int kThreads = 256;

template <typename T>
struct TypeTag {
  using type = T;
};

__device__ __forceinline__ float as_float(float v) { return v; }
__device__ __forceinline__ float as_float(__half v) { return __half2float(v); }

template <typename TT, int F>
__global__ void encode_kernel(const float* __restrict__ P, const TT* __restrict__ Tab, float* __restrict__ O,
                              Levels lv, Batch bt, int64_t N, int64_t T) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int l = blockIdx.y;
  if (i >= bt.count * N) return;
  const int64_t b = i / N, n = i - b * N;
  const float* x = P + dhjax_hashgrid::batch_index(bt, b, bt.stride_points) + 3 * n;
  const TT* tl = Tab + dhjax_hashgrid::batch_index(bt, b, bt.stride_table) + static_cast<int64_t>(l) * T * F;
  uint32_t rows[8];
  float w[8];
  dhjax_hashgrid::corners(x, lv, l, rows, w, nullptr);
  float acc[F];
#pragma unroll
  for (int f = 0; f < F; ++f) acc[f] = 0.0f;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const TT* v = tl + static_cast<int64_t>(rows[k]) * F;
#pragma unroll
    for (int f = 0; f < F; ++f) acc[f] += w[k] * as_float(v[f]);
  }
  float* o = O + i * lv.n_levels * F + l * F;
#pragma unroll
  for (int f = 0; f < F; ++f) o[f] = acc[f];
}

template <int F>
__global__ void table_grad_kernel(const float* __restrict__ P, const float* __restrict__ G, float* __restrict__ GT,
                                  Levels lv, Batch bt, int64_t N, int64_t T) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int l = blockIdx.y;
  if (i >= bt.count * N) return;
  const int64_t b = i / N, n = i - b * N;
  const float* gn = G + dhjax_hashgrid::batch_index(bt, b, bt.stride_grad) + n * lv.n_levels * F + l * F;
  float g[F];
  bool any = false;
#pragma unroll
  for (int f = 0; f < F; ++f) {
    g[f] = gn[f];
    any |= g[f] != 0.0f;
  }
  if (!any) return;
  const float* x = P + dhjax_hashgrid::batch_index(bt, b, bt.stride_points) + 3 * n;
  float* gtl = GT + (b * lv.n_levels + l) * T * F;
  uint32_t rows[8];
  float w[8];
  dhjax_hashgrid::corners(x, lv, l, rows, w, nullptr);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    float* dst = gtl + static_cast<int64_t>(rows[k]) * F;
#pragma unroll
    for (int f = 0; f < F; ++f) atomicAdd(dst + f, w[k] * g[f]);
  }
}

template <typename TT, int F>
__global__ void points_grad_kernel(const float* __restrict__ P, const TT* __restrict__ Tab,
                                   const float* __restrict__ G, float* __restrict__ GP, Levels lv, Batch bt,
                                   int64_t N, int64_t T) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= bt.count * N) return;
  const int64_t b = i / N, n = i - b * N;
  const float* x = P + dhjax_hashgrid::batch_index(bt, b, bt.stride_points) + 3 * n;
  const TT* tb = Tab + dhjax_hashgrid::batch_index(bt, b, bt.stride_table);
  const float* gb = G + dhjax_hashgrid::batch_index(bt, b, bt.stride_grad) + n * lv.n_levels * F;
  float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f;
  uint32_t rows[8];
  float w[8];
  float dw[8][3];
  for (int l = 0; l < lv.n_levels; ++l) {
    dhjax_hashgrid::corners(x, lv, l, rows, w, dw);
    const TT* tl = tb + static_cast<int64_t>(l) * T * F;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const TT* v = tl + static_cast<int64_t>(rows[k]) * F;
      float dot = 0.0f;
#pragma unroll
      for (int f = 0; f < F; ++f) dot += gb[l * F + f] * as_float(v[f]);
      acc0 += dot * dw[k][0];
      acc1 += dot * dw[k][1];
      acc2 += dot * dw[k][2];
    }
  }
  GP[3 * i + 0] = acc0;
  GP[3 * i + 1] = acc1;
  GP[3 * i + 2] = acc2;
}

template <typename Fn>
ffi::Error dispatch(ffi::DataType dtype, int64_t F, Fn&& fn) {
  auto with_f = [&](auto tag) {
    switch (F) {
      case 1: fn(tag, std::integral_constant<int, 1>{}); break;
      case 2: fn(tag, std::integral_constant<int, 2>{}); break;
      case 4: fn(tag, std::integral_constant<int, 4>{}); break;
      default: fn(tag, std::integral_constant<int, 8>{}); break;
    }
  };
  if (dtype == ffi::DataType::F32) {
    with_f(TypeTag<float>{});
  } else if (dtype == ffi::DataType::F16) {
    with_f(TypeTag<__half>{});
  } else {
    return ffi::Error::InvalidArgument("hashgrid: the CUDA table must be float32 or float16");
  }
  return ffi::Error::Success();
}

ffi::Error last_error(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("hashgrid CUDA ") + what + ": " + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

ffi::Error HashEncodeForwardCudaImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> points, ffi::AnyBuffer table,
                                     ffi::Span<const float> scales, ffi::Span<const int64_t> res,
                                     ffi::Span<const int64_t> sizes, ffi::ResultBuffer<ffi::F32> out) {
  Shapes s;
  Levels lv;
  Batch bt;
  if (auto e = dhjax_hashgrid::check_forward(points.dimensions(), table.dimensions(), scales, res, sizes,
                                             out->dimensions(), &s, &lv, &bt);
      e.failure())
    return e;
  const int64_t total = bt.count * s.N;
  if (total == 0) return ffi::Error::Success();
  const dim3 grid(static_cast<unsigned>((total + kThreads - 1) / kThreads), static_cast<unsigned>(s.L));
  auto e = dispatch(table.element_type(), s.F, [&](auto tag, auto fc) {
    using TT = typename decltype(tag)::type;
    constexpr int F = decltype(fc)::value;
    encode_kernel<TT, F><<<grid, kThreads, 0, stream>>>(points.typed_data(),
                                                        static_cast<const TT*>(table.untyped_data()),
                                                        out->typed_data(), lv, bt, s.N, s.T);
  });
  if (e.failure()) return e;
  return last_error("forward");
}

ffi::Error HashEncodeBackwardCudaImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> points, ffi::AnyBuffer table,
                                      ffi::Buffer<ffi::F32> d_features, ffi::Span<const float> scales,
                                      ffi::Span<const int64_t> res, ffi::Span<const int64_t> sizes,
                                      ffi::ResultBuffer<ffi::F32> d_table, ffi::ResultBuffer<ffi::F32> d_points) {
  Shapes s;
  Levels lv;
  Batch bt;
  bool want_points = false;
  if (auto e = dhjax_hashgrid::check_backward(points.dimensions(), table.dimensions(), d_features.dimensions(), scales,
                                              res, sizes, d_table->dimensions(), d_points->element_count(), &s, &lv,
                                              &bt, &want_points);
      e.failure())
    return e;
  if (cudaMemsetAsync(d_table->typed_data(), 0, d_table->size_bytes(), stream) != cudaSuccess) {
    return last_error("memset");
  }
  const int64_t total = bt.count * s.N;
  if (total == 0) return ffi::Error::Success();
  const dim3 grid(static_cast<unsigned>((total + kThreads - 1) / kThreads), static_cast<unsigned>(s.L));
  const unsigned blocks1 = static_cast<unsigned>((total + kThreads - 1) / kThreads);
  auto e = dispatch(table.element_type(), s.F, [&](auto tag, auto fc) {
    using TT = typename decltype(tag)::type;
    constexpr int F = decltype(fc)::value;
    table_grad_kernel<F><<<grid, kThreads, 0, stream>>>(points.typed_data(), d_features.typed_data(),
                                                        d_table->typed_data(), lv, bt, s.N, s.T);
    if (want_points) {
      points_grad_kernel<TT, F><<<blocks1, kThreads, 0, stream>>>(
          points.typed_data(), static_cast<const TT*>(table.untyped_data()), d_features.typed_data(),
          d_points->typed_data(), lv, bt, s.N, s.T);
    }
  });
  if (e.failure()) return e;
  return last_error("backward");
}

}  // namespace

DHJAX_EXPORT_ABI()

XLA_FFI_DEFINE_HANDLER_SYMBOL(HashEncodeForwardCuda, HashEncodeForwardCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                      DHJAX_HASHGRID_FORWARD_SIGNATURE(ffi::AnyBuffer));

XLA_FFI_DEFINE_HANDLER_SYMBOL(HashEncodeBackwardCuda, HashEncodeBackwardCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                      DHJAX_HASHGRID_BACKWARD_SIGNATURE(ffi::AnyBuffer));

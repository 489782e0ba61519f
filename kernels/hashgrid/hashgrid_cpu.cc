// CPU handlers of dhjax's multi-resolution hash-grid encoding (XLA FFI): forward and backward.
//
// The encoding (tiny-cuda-nn's HashGrid with trilinear interpolation) is defined in
// dhjax/ops/hashgrid.py and hashgrid_common.h; the pure-JAX reference there is the oracle.
//
// Operands (leading vmapped batch dims "..." broadcast like numpy: each is 1 or the result's):
//   points [...,N,3] f32, table [...,L,T,F] f32 (F in {1,2,4,8}), attributes
//   scales [L] f32, resolutions [L] s64, sizes [L] s64 (rows of the table each level uses).
// Forward result: features [...,N,L*F] f32, features[n, l*F + f] = level l, feature f.
// Backward extra operand: d_features [...,N,L*F] f32. Results: d_table [...,L,T,F] f32 (rows a
//   level does not use are zero) and d_points [...,N,3] f32, or [...,0,3] to skip that pass.
//
// Threads (dhjax::parallel_for): the forward and the points gradient split the points into
// chunks of 1024 and walk them level by level (one level's table slice stays in cache); the table gradient gives each (batch element, level) pair to one task, which owns that
// slice of d_table outright. No atomics and no per-thread copies of the table are needed, and the
// sums are deterministic (the same bits for any thread count). The price: at most B*L tasks run
// in parallel in that pass (16 levels keep 16 cores busy).

#include <algorithm>
#include <cstdint>
#include <cstring>
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

constexpr int64_t kChunk = 1024;  // points per forward / points-gradient task

// Levels outer, points inner: one level's slice of the table (T*F floats, 4 MiB at T = 2^19,
// F = 2) is hot in cache while a chunk of points reads it.
template <int F>
void encode_chunk(const float* pts, const float* tab, float* out, int64_t n0, int64_t n1, const Shapes& s,
                  const Levels& lv) {
  uint32_t rows[8];
  float w[8];
  for (int l = 0; l < lv.n_levels; ++l) {
    const float* tl = tab + static_cast<int64_t>(l) * s.T * F;
    for (int64_t n = n0; n < n1; ++n) {
      dhjax_hashgrid::corners(pts + 3 * n, lv, l, rows, w, nullptr);
      float acc[F] = {};
      for (int k = 0; k < 8; ++k) {
        const float* v = tl + static_cast<int64_t>(rows[k]) * F;
        for (int f = 0; f < F; ++f) acc[f] += w[k] * v[f];
      }
      float* o = out + n * s.L * F + l * F;
      for (int f = 0; f < F; ++f) o[f] = acc[f];
    }
  }
}

template <int F>
void table_grad_level(const float* pts, const float* g, float* gt, const Shapes& s, const Levels& lv, int l) {
  uint32_t rows[8];
  float w[8];
  std::memset(gt, 0, sizeof(float) * s.T * F);
  const int64_t LF = s.L * F;
  for (int64_t n = 0; n < s.N; ++n) {
    const float* gn = g + n * LF + l * F;
    bool any = false;
    for (int f = 0; f < F; ++f) any |= gn[f] != 0.0f;
    if (!any) continue;  // a zero cotangent adds nothing (and keeps rays with no samples cheap)
    dhjax_hashgrid::corners(pts + 3 * n, lv, l, rows, w, nullptr);
    for (int k = 0; k < 8; ++k) {
      float* dst = gt + static_cast<int64_t>(rows[k]) * F;
      for (int f = 0; f < F; ++f) dst[f] += w[k] * gn[f];
    }
  }
}

template <int F>
void points_grad_chunk(const float* pts, const float* tab, const float* g, float* gp, int64_t n0, int64_t n1,
                       const Shapes& s, const Levels& lv) {
  uint32_t rows[8];
  float w[8];
  float dw[8][3];
  const int64_t LF = s.L * F;
  for (int64_t n = n0; n < n1; ++n) gp[3 * n] = gp[3 * n + 1] = gp[3 * n + 2] = 0.0f;
  for (int l = 0; l < lv.n_levels; ++l) {  // levels outer, as in encode_chunk
    const float* tl = tab + static_cast<int64_t>(l) * s.T * F;
    for (int64_t n = n0; n < n1; ++n) {
      const float* gn = g + n * LF + l * F;
      dhjax_hashgrid::corners(pts + 3 * n, lv, l, rows, w, dw);
      float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f;
      for (int k = 0; k < 8; ++k) {
        const float* v = tl + static_cast<int64_t>(rows[k]) * F;
        float dot = 0.0f;
        for (int f = 0; f < F; ++f) dot += gn[f] * v[f];
        a0 += dot * dw[k][0];
        a1 += dot * dw[k][1];
        a2 += dot * dw[k][2];
      }
      gp[3 * n + 0] += a0;
      gp[3 * n + 1] += a1;
      gp[3 * n + 2] += a2;
    }
  }
}

template <typename Fn>
void dispatch_f(int64_t F, Fn&& fn) {
  switch (F) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

ffi::Error HashEncodeForwardImpl(ffi::Buffer<ffi::F32> points, ffi::Buffer<ffi::F32> table,
                                 ffi::Span<const float> scales, ffi::Span<const int64_t> res,
                                 ffi::Span<const int64_t> sizes, ffi::ResultBuffer<ffi::F32> out) {
  Shapes s;
  Levels lv;
  Batch bt;
  if (auto e = dhjax_hashgrid::check_forward(points.dimensions(), table.dimensions(), scales, res, sizes,
                                             out->dimensions(), &s, &lv, &bt);
      e.failure())
    return e;
  const float* P = points.typed_data();
  const float* Tb = table.typed_data();
  float* O = out->typed_data();
  const int64_t chunks = (s.N + kChunk - 1) / kChunk;
  dispatch_f(s.F, [&](auto fc) {
    constexpr int F = decltype(fc)::value;
    dhjax::parallel_for(bt.count * chunks, [&](int64_t task, int) {
      const int64_t b = task / chunks, c = task % chunks;
      const float* pb = P + dhjax_hashgrid::batch_index(bt, b, bt.stride_points);
      const float* tb = Tb + dhjax_hashgrid::batch_index(bt, b, bt.stride_table);
      float* ob = O + b * s.N * s.L * F;
      encode_chunk<F>(pb, tb, ob, c * kChunk, std::min(s.N, (c + 1) * kChunk), s, lv);
    });
  });
  return ffi::Error::Success();
}

ffi::Error HashEncodeBackwardImpl(ffi::Buffer<ffi::F32> points, ffi::Buffer<ffi::F32> table,
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
  const float* P = points.typed_data();
  const float* Tb = table.typed_data();
  const float* G = d_features.typed_data();
  float* GT = d_table->typed_data();
  float* GP = d_points->typed_data();
  dispatch_f(s.F, [&](auto fc) {
    constexpr int F = decltype(fc)::value;
    dhjax::parallel_for(bt.count * s.L, [&](int64_t task, int) {
      const int64_t b = task / s.L;
      const int l = static_cast<int>(task % s.L);
      const float* pb = P + dhjax_hashgrid::batch_index(bt, b, bt.stride_points);
      const float* gb = G + dhjax_hashgrid::batch_index(bt, b, bt.stride_grad);
      float* gtl = GT + (b * s.L + l) * s.T * F;
      table_grad_level<F>(pb, gb, gtl, s, lv, l);
    });
    if (want_points) {
      const int64_t chunks = (s.N + kChunk - 1) / kChunk;
      dhjax::parallel_for(bt.count * chunks, [&](int64_t task, int) {
        const int64_t b = task / chunks, c = task % chunks;
        const float* pb = P + dhjax_hashgrid::batch_index(bt, b, bt.stride_points);
        const float* tb = Tb + dhjax_hashgrid::batch_index(bt, b, bt.stride_table);
        const float* gb = G + dhjax_hashgrid::batch_index(bt, b, bt.stride_grad);
        points_grad_chunk<F>(pb, tb, gb, GP + b * s.N * 3, c * kChunk, std::min(s.N, (c + 1) * kChunk), s, lv);
      });
    }
  });
  return ffi::Error::Success();
}

}  // namespace

DHJAX_EXPORT_ABI()

XLA_FFI_DEFINE_HANDLER_SYMBOL(HashEncodeForward, HashEncodeForwardImpl,
                              ffi::Ffi::Bind() DHJAX_HASHGRID_FORWARD_SIGNATURE(ffi::Buffer<ffi::F32>));

XLA_FFI_DEFINE_HANDLER_SYMBOL(HashEncodeBackward, HashEncodeBackwardImpl,
                              ffi::Ffi::Bind() DHJAX_HASHGRID_BACKWARD_SIGNATURE(ffi::Buffer<ffi::F32>));

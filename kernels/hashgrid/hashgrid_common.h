// Shared maths of dhjax's multi-resolution hash-grid encoding (CPU and CUDA handlers).
//
// The encoding is defined in dhjax/ops/hashgrid.py (module docstring), following
// tiny-cuda-nn's HashGrid: for level l with scale s_l and resolution R_l (computed on the host
// and passed in as attributes), a point x in [0,1]^3 maps to p = fma(s_l, x, 0.5), c = floor(p)
// (as uint32, wrapping for negative values), fraction w = p - c. Corner k (bit d of k selects
// c_d + 1) has the trilinear weight prod_d (bit ? w_d : 1 - w_d) and the table row
//   dense level  (R_l^3 <= T):  (c_0 + c_1 R_l + c_2 R_l^2)                mod size_l
//   hashed level (otherwise):   (c_0 * 1 ^ c_1 * 2654435761 ^ c_2 * 805459861) mod size_l
// with size_l = min(next_multiple(R_l^3, 8), T) and all arithmetic in uint32.
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define HG_FN __host__ __device__ __forceinline__
#else
#define HG_FN inline
#endif

namespace dhjax_hashgrid {

constexpr int kMaxLevels = 32;
constexpr int kMaxBatchRank = 8;

// Per-level constants, small enough to pass to a CUDA kernel by value.
struct Levels {
  int n_levels;
  float scale[kMaxLevels];
  uint32_t res[kMaxLevels];
  uint32_t size[kMaxLevels];   // rows of the table this level uses (<= T)
  uint32_t dense[kMaxLevels];  // 1 when R^3 <= T: row = linear index of the vertex
};

// Leading (vmapped) batch dimensions: dims of the result and, per operand, the stride of its
// batch element along each dim (0 where the operand has size 1 there: broadcast).
struct Batch {
  int rank;
  int64_t dims[kMaxBatchRank];
  int64_t stride_points[kMaxBatchRank];
  int64_t stride_table[kMaxBatchRank];
  int64_t stride_grad[kMaxBatchRank];
  int64_t count;  // product of dims
};

// Element offset, in an operand, of the batch element serving result batch element b (b is
// row-major over dims; the operand strides come from Batch).
HG_FN int64_t batch_index(const Batch& bt, int64_t b, const int64_t* stride) {
  int64_t idx = 0;
  for (int i = bt.rank - 1; i >= 0; --i) {
    const int64_t d = bt.dims[i];
    idx += (b % d) * stride[i];
    b /= d;
  }
  return idx;
}

HG_FN uint32_t vertex_row(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t res, uint32_t size, uint32_t dense) {
  uint32_t h;
  if (dense) {
    h = c0 + c1 * res + c2 * (res * res);
  } else {
    h = c0 ^ (c1 * 2654435761u) ^ (c2 * 805459861u);
  }
  return (size & (size - 1u)) == 0u ? (h & (size - 1u)) : (h % size);
}

// Cell and fractional position of x along one axis at the given level scale. p is s x + 0.5
// rounded once to float32, as tcnn's fmaf(scale, x, 0.5f), so cells and fractions agree with
// tcnn bit for bit. CUDA has the fused multiply-add in hardware; x86-64 CPUs without -mfma would
// call libm's fmaf, so the CPU computes in double instead: the product of two floats is exact in
// double and so is adding 0.5 while the sum spans <= 53 bits (always for |x s| >= 2^-6 or so;
// below that a double rounding could differ from the fma only on an exact float32 tie).
HG_FN void locate(float x, float scale, uint32_t* cell, float* frac) {
#if defined(__CUDA_ARCH__)
  const float p = fmaf(scale, x, 0.5f);
#else
  const float p = static_cast<float>(static_cast<double>(scale) * static_cast<double>(x) + 0.5);
#endif
  const float f = floorf(p);
  *cell = static_cast<uint32_t>(static_cast<int32_t>(f));
  *frac = p - f;
}

// The eight corners of the cell of point x at one level: table rows and trilinear weights, and
// (when dw is non-null) the derivatives dweight/dx_d = scale * (+-1) * prod_{e != d} (...).
HG_FN void corners(const float* x, const Levels& lv, int level, uint32_t rows[8], float w[8], float (*dw)[3]) {
  const float s = lv.scale[level];
  uint32_t c[3];
  float f[3];
  locate(x[0], s, &c[0], &f[0]);
  locate(x[1], s, &c[1], &f[1]);
  locate(x[2], s, &c[2], &f[2]);
  const uint32_t res = lv.res[level], size = lv.size[level], dense = lv.dense[level];
  for (int k = 0; k < 8; ++k) {
    const uint32_t b0 = k & 1, b1 = (k >> 1) & 1, b2 = (k >> 2) & 1;
    const float a0 = b0 ? f[0] : 1.0f - f[0];
    const float a1 = b1 ? f[1] : 1.0f - f[1];
    const float a2 = b2 ? f[2] : 1.0f - f[2];
    rows[k] = vertex_row(c[0] + b0, c[1] + b1, c[2] + b2, res, size, dense);
    w[k] = a0 * a1 * a2;
    if (dw) {
      dw[k][0] = (b0 ? s : -s) * a1 * a2;
      dw[k][1] = (b1 ? s : -s) * a0 * a2;
      dw[k][2] = (b2 ? s : -s) * a0 * a1;
    }
  }
}

}  // namespace dhjax_hashgrid

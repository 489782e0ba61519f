// The FFI side of dhjax's closest-point handlers, shared by bvh_cpu.cc and bvh_cuda.cu so the two
// platforms cannot drift apart: the operand/result signature and the host-side shape checks.
// Use the signature after the platform's own context bindings, e.g.
//   ffi::Ffi::Bind() DHJAX_BVH_CLOSEST_POINT_SIGNATURE
//   ffi::Ffi::Bind().Ctx<...>().Ctx<...>() DHJAX_BVH_CLOSEST_POINT_SIGNATURE
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

#define DHJAX_BVH_CLOSEST_POINT_SIGNATURE                                              \
  .Arg<ffi::Buffer<ffi::F32>>() /* vertices [M..., V, 3] */                            \
      .Arg<ffi::Buffer<ffi::S32>>() /* faces [G..., F, 3] */                           \
      .Arg<ffi::Buffer<ffi::F32>>() /* points [Q..., N, 3] */                          \
      .Ret<ffi::Buffer<ffi::S32>>() /* face [Q..., N] */                               \
      .Ret<ffi::Buffer<ffi::F32>>() /* closest point [Q..., N, 3] */                   \
      .Ret<ffi::Buffer<ffi::F32>>() /* barycentrics [Q..., N, 3] */                    \
      .Ret<ffi::Buffer<ffi::F32>>() /* squared distance [Q..., N] */

namespace dhjax {
namespace bvh {

// Product of the leading (batch) dims of a [..., X, 3] operand.
inline int64_t lead(xla::ffi::Span<const int64_t> dims) {
  int64_t n = 1;
  for (size_t i = 0; i + 2 < dims.size(); ++i) n *= dims[i];
  return n;
}

// Sizes of one closest-point call: V vertices, F faces, N points per batch element; M vertex,
// G face and Q point batch elements.
struct Dims {
  int64_t V, F, N, M, G, Q;
};

// Checks the operand ranks and fills *d. When there is nothing to query (Q * N == 0) it returns
// success without checking the batch sizes; otherwise it also checks G | M | Q. The mesh-size
// checks (no faces, ...) are the caller's, as they differ between the platforms.
inline xla::ffi::Error check_dims(xla::ffi::Span<const int64_t> vd, xla::ffi::Span<const int64_t> fd,
                                  xla::ffi::Span<const int64_t> pd, Dims* d) {
  using xla::ffi::Error;
  if (vd.size() < 2 || vd.back() != 3) return Error::InvalidArgument("closest_point: vertices must be [..., V, 3]");
  if (fd.size() < 2 || fd.back() != 3) return Error::InvalidArgument("closest_point: faces must be [..., F, 3]");
  if (pd.size() < 2 || pd.back() != 3) return Error::InvalidArgument("closest_point: points must be [..., N, 3]");
  d->V = vd[vd.size() - 2];
  d->F = fd[fd.size() - 2];
  d->N = pd[pd.size() - 2];
  d->M = lead(vd);
  d->G = lead(fd);
  d->Q = lead(pd);
  if (d->Q * d->N == 0) return Error::Success();
  if (d->M == 0 || d->G == 0 || d->Q % d->M != 0 || d->M % d->G != 0)
    return Error::InvalidArgument("closest_point: batch sizes must satisfy faces | vertices | points, got " +
                                  std::to_string(d->G) + ", " + std::to_string(d->M) + ", " + std::to_string(d->Q));
  return Error::Success();
}

}  // namespace bvh
}  // namespace dhjax

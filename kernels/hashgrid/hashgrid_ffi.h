// The FFI signature of dhjax's hash-grid handlers, shared by hashgrid_cpu.cc and hashgrid_cuda.cu
// so the two platforms cannot drift apart (dhjax/ops/hashgrid.py calls both with the same
// operands and attributes). The table's buffer type is the one difference: the CPU handlers take
// ffi::Buffer<ffi::F32>, the CUDA handlers ffi::AnyBuffer (f32 or f16). Use after the platform's
// own context bindings, e.g.
//   ffi::Ffi::Bind() DHJAX_HASHGRID_FORWARD_SIGNATURE(ffi::Buffer<ffi::F32>)
//   ffi::Ffi::Bind().Ctx<...>() DHJAX_HASHGRID_FORWARD_SIGNATURE(ffi::AnyBuffer)
#pragma once

#define DHJAX_HASHGRID_LEVEL_ATTRS                                                     \
  .Attr<ffi::Span<const float>>("scales")                                              \
      .Attr<ffi::Span<const int64_t>>("resolutions")                                   \
      .Attr<ffi::Span<const int64_t>>("sizes")

#define DHJAX_HASHGRID_FORWARD_SIGNATURE(TableBuffer)                                  \
  .Arg<ffi::Buffer<ffi::F32>>() /* points [...,N,3] */                                 \
      .Arg<TableBuffer>() /* table [...,L,T,F] */                                      \
      DHJAX_HASHGRID_LEVEL_ATTRS                                                       \
      .Ret<ffi::Buffer<ffi::F32>>() /* features [...,N,L*F] */

#define DHJAX_HASHGRID_BACKWARD_SIGNATURE(TableBuffer)                                 \
  .Arg<ffi::Buffer<ffi::F32>>() /* points [...,N,3] */                                 \
      .Arg<TableBuffer>() /* table [...,L,T,F] */                                      \
      .Arg<ffi::Buffer<ffi::F32>>() /* d_features [...,N,L*F] */                       \
      DHJAX_HASHGRID_LEVEL_ATTRS                                                       \
      .Ret<ffi::Buffer<ffi::F32>>() /* d_table [...,L,T,F] f32 */                      \
      .Ret<ffi::Buffer<ffi::F32>>() /* d_points [...,N,3] or [...,0,3] */

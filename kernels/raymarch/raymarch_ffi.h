// The FFI signatures of dhjax's raymarch handlers, shared by raymarch_cpu.cc and raymarch_cuda.cu
// so the two platforms cannot drift apart (dhjax/ops/raymarch.py calls both with the same
// operands and attributes). Leading dims "..." are flattened into G groups by the handlers
// (vmap_method="broadcast_all" gives every operand the same leading dims). Use after the
// platform's own context bindings, e.g.
//   ffi::Ffi::Bind() DHJAX_RAYMARCH_MARCH_SIGNATURE
//   ffi::Ffi::Bind().Ctx<...>().Ctx<...>() DHJAX_RAYMARCH_MARCH_SIGNATURE
#pragma once

#define DHJAX_RAYMARCH_MARCH_SIGNATURE                                                 \
  .Arg<ffi::Buffer<ffi::F32>>() /* origins [...,R,3] */                                \
      .Arg<ffi::Buffer<ffi::F32>>() /* directions [...,R,3] */                         \
      .Arg<ffi::Buffer<ffi::U8>>() /* grid [...,D,D,D], nonzero = occupied */          \
      .Arg<ffi::Buffer<ffi::F32>>() /* box_min [...,3] */                              \
      .Arg<ffi::Buffer<ffi::F32>>() /* box_max [...,3] */                              \
      .Attr<float>("step")                                                             \
      .Ret<ffi::Buffer<ffi::F32>>() /* t [...,C] */                                    \
      .Ret<ffi::Buffer<ffi::F32>>() /* delta [...,C] */                                \
      .Ret<ffi::Buffer<ffi::S32>>() /* ray [...,C] */                                  \
      .Ret<ffi::Buffer<ffi::S32>>() /* ray_start [...,R] */                            \
      .Ret<ffi::Buffer<ffi::S32>>() /* ray_count [...,R] (stored) */                   \
      .Ret<ffi::Buffer<ffi::S32>>() /* n_samples [...] (needed) */                     \
      .Ret<ffi::Buffer<ffi::PRED>>() /* complete [...,R] */

#define DHJAX_RAYMARCH_COMPOSITE_INPUTS                                                \
  .Arg<ffi::Buffer<ffi::F32>>() /* sigma [...,C] */                                    \
      .Arg<ffi::Buffer<ffi::F32>>() /* rgb [...,C,3] */                                \
      .Arg<ffi::Buffer<ffi::F32>>() /* t [...,C] */                                    \
      .Arg<ffi::Buffer<ffi::F32>>() /* delta [...,C] */                                \
      .Arg<ffi::Buffer<ffi::S32>>() /* ray_start [...,R] */                            \
      .Arg<ffi::Buffer<ffi::S32>>() /* ray_count [...,R] */

#define DHJAX_RAYMARCH_COMPOSITE_FWD_SIGNATURE                                         \
  DHJAX_RAYMARCH_COMPOSITE_INPUTS                                                      \
      .Attr<float>("s_max")                                                            \
      .Ret<ffi::Buffer<ffi::F32>>() /* color (no background) [...,R,3] */              \
      .Ret<ffi::Buffer<ffi::F32>>() /* depth [...,R] */                                \
      .Ret<ffi::Buffer<ffi::F32>>() /* trans (T_end) [...,R] */                        \
      .Ret<ffi::Buffer<ffi::F32>>() /* weights [...,C] */

#define DHJAX_RAYMARCH_COMPOSITE_BWD_SIGNATURE                                         \
  DHJAX_RAYMARCH_COMPOSITE_INPUTS                                                      \
      .Arg<ffi::Buffer<ffi::F32>>() /* d_color [...,R,3] */                            \
      .Arg<ffi::Buffer<ffi::F32>>() /* d_depth [...,R] */                              \
      .Arg<ffi::Buffer<ffi::F32>>() /* d_trans [...,R] */                              \
      .Arg<ffi::Buffer<ffi::F32>>() /* d_weights [...,C] */                            \
      .Attr<float>("s_max")                                                            \
      .Ret<ffi::Buffer<ffi::F32>>() /* d_sigma [...,C] */                              \
      .Ret<ffi::Buffer<ffi::F32>>() /* d_rgb [...,C,3] */

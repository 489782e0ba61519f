// The FFI signature of dhjax's splat handlers, shared by splat_cpu.cc and splat_cuda.cu so the
// two platforms cannot drift apart (dhjax/ops/splat.py calls both through one target name).
// Use after the platform's own context bindings, e.g.
//   ffi::Ffi::Bind() DHJAX_SPLAT_FORWARD_SIGNATURE
//   ffi::Ffi::Bind().Ctx<...>().Ctx<...>() DHJAX_SPLAT_FORWARD_SIGNATURE
#pragma once

#define DHJAX_SPLAT_INPUTS                                                             \
  .Arg<ffi::Buffer<ffi::F32>>() /* means2d [...,N,2] */                                \
      .Arg<ffi::Buffer<ffi::F32>>() /* conics [...,N,3] */                             \
      .Arg<ffi::Buffer<ffi::F32>>() /* colors [...,N,K] */                             \
      .Arg<ffi::Buffer<ffi::F32>>() /* opacities [...,N] */                            \
      .Arg<ffi::Buffer<ffi::F32>>() /* depths [...,N] */                               \
      .Arg<ffi::Buffer<ffi::S32>>() /* rects [...,N,4] */

#define DHJAX_SPLAT_FORWARD_SIGNATURE                                                  \
  DHJAX_SPLAT_INPUTS                                                                   \
      .Ret<ffi::Buffer<ffi::F32>>() /* out [...,H,W,K] */                              \
      .Ret<ffi::Buffer<ffi::F32>>() /* transmittance [...,H,W] */                      \
      .Ret<ffi::Buffer<ffi::S32>>() /* last [...,H,W] */

#define DHJAX_SPLAT_BACKWARD_SIGNATURE                                                 \
  DHJAX_SPLAT_INPUTS                                                                   \
      .Arg<ffi::Buffer<ffi::F32>>() /* out */                                          \
      .Arg<ffi::Buffer<ffi::F32>>() /* transmittance */                                \
      .Arg<ffi::Buffer<ffi::S32>>() /* last */                                         \
      .Arg<ffi::Buffer<ffi::F32>>() /* d_out */                                        \
      .Arg<ffi::Buffer<ffi::F32>>() /* d_transmittance */                              \
      .Ret<ffi::Buffer<ffi::F32>>() /* d_means2d */                                    \
      .Ret<ffi::Buffer<ffi::F32>>() /* d_conics */                                     \
      .Ret<ffi::Buffer<ffi::F32>>() /* d_colors */                                     \
      .Ret<ffi::Buffer<ffi::F32>>() /* d_opacities */

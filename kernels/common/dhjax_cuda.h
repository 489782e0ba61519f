// Host-side helpers shared by the CUDA handlers of the ops: CUDA errors as FFI errors, scratch
// allocation, and running a cub device algorithm with scratch temporary storage. A .cu file
// defines DHJAX_CUDA_OP (its op's name in the messages, e.g. "dhjax_splat") before including it.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include "xla/ffi/api/ffi.h"

#ifndef DHJAX_CUDA_OP
#error "define DHJAX_CUDA_OP (the op's name in error messages) before including dhjax_cuda.h"
#endif

namespace dhjax_cuda {

inline xla::ffi::Error cuda_error(cudaError_t err, const char* what) {
  return xla::ffi::Error::Internal(std::string(DHJAX_CUDA_OP " CUDA: ") + what + ": " + cudaGetErrorString(err));
}

inline xla::ffi::Error check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_error(err, what);
  return xla::ffi::Error::Success();
}

template <typename T>
xla::ffi::Error scratch_alloc(xla::ffi::ScratchAllocator& scratch, int64_t count, T** ptr, const char* what) {
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T);
  std::optional<void*> p = scratch.Allocate(bytes, 256);
  if (!p.has_value() || *p == nullptr) {
    return xla::ffi::Error(xla::ffi::ErrorCode::kResourceExhausted,
                           std::string(DHJAX_CUDA_OP " CUDA: cannot allocate ") + std::to_string(bytes) +
                               " bytes of scratch memory for " + what);
  }
  *ptr = static_cast<T*>(*p);
  return xla::ffi::Error::Success();
}

// Runs a cub device algorithm with its temporary storage from the scratch allocator: the size
// query, the allocation and the run. `algo(temp, bytes)` calls the algorithm (temp = nullptr is
// cub's size query); `what` names it in the errors.
template <typename Algo>
xla::ffi::Error run_cub(xla::ffi::ScratchAllocator& scratch, const char* what, Algo&& algo) {
  size_t bytes = 0;
  if (cudaError_t err = algo(nullptr, bytes); err != cudaSuccess) {
    return cuda_error(err, (std::string(what) + " (size query)").c_str());
  }
  char* temp = nullptr;
  if (auto e = scratch_alloc(scratch, static_cast<int64_t>(bytes), &temp, what); e.failure()) return e;
  if (cudaError_t err = algo(temp, bytes); err != cudaSuccess) return cuda_error(err, what);
  return xla::ffi::Error::Success();
}

}  // namespace dhjax_cuda

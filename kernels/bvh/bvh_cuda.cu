// CUDA handler of dhjax.ops.closest_point: a linear BVH built on the device on every call,
// then one thread per query point.
//
// Build (per mesh, all on the call's stream, no host synchronisation):
//   1. bounds of the triangle centroids (one block, shared-memory reduction);
//   2. 30-bit Morton code of every centroid, quantised in those bounds;
//   3. radix sort of (code, face) pairs (cub::DeviceRadixSort);
//   4. the hierarchy of Karras, "Maximizing parallelism in the construction of BVHs, octrees and
//      k-d trees" (HPG 2012): internal node i finds its key range and split from the longest
//      common prefixes of the sorted codes (ties between equal codes broken by index), in
//      parallel for all F - 1 internal nodes;
//   5. leaf boxes and a copy of each triangle in leaf order, then boxes bottom-up: each leaf
//      walks to the root and an atomic counter per internal node lets the second child to
//      arrive compute the union (the first stops).
// Node numbering: internal nodes 0 .. F-2 (root 0), leaf j is node F-1+j; with F == 1 the root
// is the single leaf. Query: depth-first, nearer child first, subtrees skipped when their box
// is not closer than the best triangle so far (as the CPU handler).
//
// Operands and results as the CPU handler (bvh_cpu.cc): vertices [M..., V, 3] f32,
// faces [G..., F, 3] s32, points [Q..., N, 3] f32 with G | M | Q; face [Q..., N] s32,
// closest [Q..., N, 3], bary [Q..., N, 3], sq_dist [Q..., N] f32. Scratch memory for one mesh
// comes from XLA's scratch allocator and is reused mesh after mesh (same stream). Face indices
// outside [0, V) are clamped on the device (the Python wrapper checks concrete faces first).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include <cub/device/device_radix_sort.cuh>

#include "bvh_common.h"
#include "bvh_ffi.h"
#include "dhjax_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace dhjax {
namespace bvh {
namespace {

constexpr int kThreads = 256;
constexpr int kBoundsThreads = 1024;

__device__ __forceinline__ int32_t clamp_index(int32_t i, int64_t V) {
  return i < 0 ? 0 : (i >= V ? static_cast<int32_t>(V - 1) : i);
}

__device__ __forceinline__ V3 load_vertex(const float* verts, int32_t i) {
  return v3(verts[3 * static_cast<int64_t>(i)], verts[3 * static_cast<int64_t>(i) + 1],
            verts[3 * static_cast<int64_t>(i) + 2]);
}

__device__ __forceinline__ void face_corners(const float* verts, const int32_t* faces, int64_t V, int64_t f,
                                             V3* a, V3* b, V3* c) {
  *a = load_vertex(verts, clamp_index(faces[3 * f], V));
  *b = load_vertex(verts, clamp_index(faces[3 * f + 1], V));
  *c = load_vertex(verts, clamp_index(faces[3 * f + 2], V));
}

// 1. Centroid bounds: one block of kBoundsThreads threads, out[0..2] = lo, out[3..5] = hi.
__global__ void centroid_bounds_kernel(const float* verts, const int32_t* faces, int64_t V, int64_t F,
                                       float* out) {
  __shared__ float s_lo[3][kBoundsThreads];
  __shared__ float s_hi[3][kBoundsThreads];
  const int tid = threadIdx.x;
  float lo[3] = {INFINITY, INFINITY, INFINITY};
  float hi[3] = {-INFINITY, -INFINITY, -INFINITY};
  for (int64_t f = tid; f < F; f += blockDim.x) {
    V3 a, b, c;
    face_corners(verts, faces, V, f, &a, &b, &c);
    const float cx = (a.x + b.x + c.x) * (1.0f / 3.0f);
    const float cy = (a.y + b.y + c.y) * (1.0f / 3.0f);
    const float cz = (a.z + b.z + c.z) * (1.0f / 3.0f);
    lo[0] = fminf(lo[0], cx);
    lo[1] = fminf(lo[1], cy);
    lo[2] = fminf(lo[2], cz);
    hi[0] = fmaxf(hi[0], cx);
    hi[1] = fmaxf(hi[1], cy);
    hi[2] = fmaxf(hi[2], cz);
  }
  for (int k = 0; k < 3; ++k) {
    s_lo[k][tid] = lo[k];
    s_hi[k][tid] = hi[k];
  }
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (tid < stride) {
      for (int k = 0; k < 3; ++k) {
        s_lo[k][tid] = fminf(s_lo[k][tid], s_lo[k][tid + stride]);
        s_hi[k][tid] = fmaxf(s_hi[k][tid], s_hi[k][tid + stride]);
      }
    }
    __syncthreads();
  }
  if (tid == 0) {
    for (int k = 0; k < 3; ++k) {
      out[k] = s_lo[k][0];
      out[3 + k] = s_hi[k][0];
    }
  }
}

// Spreads the low 10 bits of x so that there are two zero bits between consecutive ones.
__device__ __forceinline__ uint32_t spread_bits(uint32_t x) {
  x &= 0x3ffu;
  x = (x | (x << 16)) & 0x030000ffu;
  x = (x | (x << 8)) & 0x0300f00fu;
  x = (x | (x << 4)) & 0x030c30c3u;
  x = (x | (x << 2)) & 0x09249249u;
  return x;
}

__device__ __forceinline__ uint32_t quantise(float x, float lo, float hi) {
  const float ext = hi - lo;
  float t = ext > 0.0f ? (x - lo) / ext : 0.0f;
  t = t * 1024.0f;
  if (!(t > 0.0f)) return 0u;  // also NaN
  if (t >= 1023.0f) return 1023u;
  return static_cast<uint32_t>(t);
}

// 2. Morton codes of the centroids; values = face indices.
__global__ void morton_kernel(const float* verts, const int32_t* faces, int64_t V, int64_t F,
                              const float* bounds, uint32_t* keys, int32_t* vals) {
  const int64_t f = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (f >= F) return;
  V3 a, b, c;
  face_corners(verts, faces, V, f, &a, &b, &c);
  const float cx = (a.x + b.x + c.x) * (1.0f / 3.0f);
  const float cy = (a.y + b.y + c.y) * (1.0f / 3.0f);
  const float cz = (a.z + b.z + c.z) * (1.0f / 3.0f);
  const uint32_t qx = quantise(cx, bounds[0], bounds[3]);
  const uint32_t qy = quantise(cy, bounds[1], bounds[4]);
  const uint32_t qz = quantise(cz, bounds[2], bounds[5]);
  keys[f] = (spread_bits(qx) << 2) | (spread_bits(qy) << 1) | spread_bits(qz);
  vals[f] = static_cast<int32_t>(f);
}

// Length of the common prefix of sorted keys i and j (index bits appended to break ties);
// -1 when j is out of range.
__device__ __forceinline__ int prefix(const uint32_t* keys, int64_t n, int64_t i, int64_t j) {
  if (j < 0 || j >= n) return -1;
  const uint32_t ki = keys[i], kj = keys[j];
  if (ki == kj) return 32 + __clz(static_cast<uint32_t>(i) ^ static_cast<uint32_t>(j));
  return __clz(ki ^ kj);
}

// 4. Internal node i of n - 1 (n = F >= 2). Children are written as node ids (leaf j -> n-1+j).
__global__ void hierarchy_kernel(const uint32_t* keys, int64_t n, int32_t* left, int32_t* right,
                                 int32_t* parent) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n - 1) return;
  // Direction of the range: towards the neighbour with the longer common prefix.
  const int d = (prefix(keys, n, i, i + 1) - prefix(keys, n, i, i - 1)) >= 0 ? 1 : -1;
  const int min_prefix = prefix(keys, n, i, i - d);
  // Upper bound of the range length, then binary search of the other end j.
  int64_t lmax = 2;
  while (prefix(keys, n, i, i + lmax * d) > min_prefix) lmax *= 2;
  int64_t l = 0;
  for (int64_t t = lmax / 2; t >= 1; t /= 2) {
    if (prefix(keys, n, i, i + (l + t) * d) > min_prefix) l += t;
  }
  const int64_t j = i + l * d;
  // Split: the last position whose prefix with i is longer than the node's prefix.
  const int node_prefix = prefix(keys, n, i, j);
  int64_t s = 0;
  int64_t div = 1;
  int64_t t;
  do {
    div *= 2;
    t = (l + div - 1) / div;
    if (prefix(keys, n, i, i + (s + t) * d) > node_prefix) s += t;
  } while (t > 1);
  const int64_t gamma = i + s * d + (d < 0 ? -1 : 0);
  const int64_t lo = i < j ? i : j, hi = i < j ? j : i;
  const int32_t lchild = static_cast<int32_t>(lo == gamma ? (n - 1) + gamma : gamma);
  const int32_t rchild = static_cast<int32_t>(hi == gamma + 1 ? (n - 1) + gamma + 1 : gamma + 1);
  left[i] = lchild;
  right[i] = rchild;
  parent[lchild] = static_cast<int32_t>(i);
  parent[rchild] = static_cast<int32_t>(i);
}

// 5. Leaf boxes, triangles in leaf order, and boxes bottom-up. boxes: [2F-1, 6] (lo, hi).
__global__ void refit_kernel(const float* verts, const int32_t* faces, int64_t V, int64_t n, const int32_t* sorted_face,
                             const int32_t* left, const int32_t* right, const int32_t* parent, int32_t* visits,
                             float* boxes, float* tris) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= n) return;
  V3 a, b, c;
  face_corners(verts, faces, V, sorted_face[j], &a, &b, &c);
  float* t = tris + 9 * j;
  t[0] = a.x; t[1] = a.y; t[2] = a.z;
  t[3] = b.x; t[4] = b.y; t[5] = b.z;
  t[6] = c.x; t[7] = c.y; t[8] = c.z;
  const int64_t leaf = (n - 1) + j;
  float* bx = boxes + 6 * leaf;
  bx[0] = fminf(a.x, fminf(b.x, c.x));
  bx[1] = fminf(a.y, fminf(b.y, c.y));
  bx[2] = fminf(a.z, fminf(b.z, c.z));
  bx[3] = fmaxf(a.x, fmaxf(b.x, c.x));
  bx[4] = fmaxf(a.y, fmaxf(b.y, c.y));
  bx[5] = fmaxf(a.z, fmaxf(b.z, c.z));
  if (n == 1) return;
  int32_t node = parent[leaf];
  while (node >= 0) {
    // Publish this child's box before signalling; the second arrival reads both children.
    __threadfence();
    if (atomicAdd(&visits[node], 1) == 0) return;  // the sibling is not done yet
    __threadfence();
    const float* l = boxes + 6 * static_cast<int64_t>(left[node]);
    const float* r = boxes + 6 * static_cast<int64_t>(right[node]);
    float* o = boxes + 6 * static_cast<int64_t>(node);
    for (int k = 0; k < 3; ++k) {
      // __ldcg: read from L2, never a stale L1 line written by another SM's thread.
      o[k] = fminf(__ldcg(l + k), __ldcg(r + k));
      o[3 + k] = fmaxf(__ldcg(l + 3 + k), __ldcg(r + 3 + k));
    }
    node = parent[node];
  }
}

// Query: one thread per point of this mesh.
__global__ void query_kernel(const float* points, int64_t count, int64_t n, const int32_t* left, const int32_t* right,
                             const float* boxes, const float* tris, const int32_t* sorted_face, int32_t* face_out,
                             float* point_out, float* bary_out, float* d2_out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  const V3 p = v3(points[3 * i], points[3 * i + 1], points[3 * i + 2]);
  float best = INFINITY;
  TriHit best_hit;
  best_hit.q = v3(NAN, NAN, NAN);
  best_hit.u = best_hit.v = best_hit.w = NAN;
  best_hit.d2 = NAN;
  int64_t best_leaf = -1;
  // Non-finite query: every box distance would be 0 (fmax drops NaN) and the whole tree would be
  // walked for nothing; skip straight to the "nothing found" result below.
  const bool finite = isfinite(p.x) && isfinite(p.y) && isfinite(p.z);
  int32_t stack_node[kStackSize];
  float stack_d2[kStackSize];
  int sp = 0;
  int32_t node = 0;  // root: internal 0, or the only leaf (id 0) when n == 1
  for (; finite;) {
    bool descend = false;
    if (node >= n - 1) {
      const int64_t j = node - (n - 1);
      const float* t = tris + 9 * j;
      const TriHit h = closest_point_triangle(p, v3(t[0], t[1], t[2]), v3(t[3], t[4], t[5]), v3(t[6], t[7], t[8]));
      if (h.d2 < best) {
        best = h.d2;
        best_hit = h;
        best_leaf = j;
      }
    } else {
      int32_t a = left[node], b = right[node];
      float da = box_distance_sq(p, boxes + 6 * static_cast<int64_t>(a), boxes + 6 * static_cast<int64_t>(a) + 3);
      float db = box_distance_sq(p, boxes + 6 * static_cast<int64_t>(b), boxes + 6 * static_cast<int64_t>(b) + 3);
      if (db < da) {
        const int32_t tn = a; a = b; b = tn;
        const float td = da; da = db; db = td;
      }
      if (da < best) {
        if (db < best && sp < kStackSize) {
          stack_node[sp] = b;
          stack_d2[sp] = db;
          ++sp;
        }
        node = a;
        descend = true;
      }
    }
    if (descend) continue;
    bool found = false;
    while (sp > 0) {
      --sp;
      if (stack_d2[sp] < best) {
        node = stack_node[sp];
        found = true;
        break;
      }
    }
    if (!found) break;
  }
  face_out[i] = best_leaf >= 0 ? sorted_face[best_leaf] : 0;
  point_out[3 * i] = best_hit.q.x;
  point_out[3 * i + 1] = best_hit.q.y;
  point_out[3 * i + 2] = best_hit.q.z;
  bary_out[3 * i] = best_hit.u;
  bary_out[3 * i + 1] = best_hit.v;
  bary_out[3 * i + 2] = best_hit.w;
  d2_out[i] = best_hit.d2;
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

ffi::Error check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("closest_point (cuda): ") + what + ": " + cudaGetErrorString(err));
}

template <typename T>
T* take(ffi::ScratchAllocator& scratch, int64_t count, bool* ok) {
  std::optional<void*> p = scratch.Allocate(static_cast<size_t>(count > 0 ? count : 1) * sizeof(T), 256);
  if (!p.has_value()) {
    *ok = false;
    return nullptr;
  }
  return static_cast<T*>(*p);
}

ffi::Error ClosestPointCudaImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::Buffer<ffi::F32> vertices,
                                ffi::Buffer<ffi::S32> faces, ffi::Buffer<ffi::F32> points,
                                ffi::ResultBuffer<ffi::S32> face_out, ffi::ResultBuffer<ffi::F32> point_out,
                                ffi::ResultBuffer<ffi::F32> bary_out, ffi::ResultBuffer<ffi::F32> d2_out) {
  Dims dims;
  if (auto e = check_dims(vertices.dimensions(), faces.dimensions(), points.dimensions(), &dims); e.failure())
    return e;
  const int64_t V = dims.V, F = dims.F, N = dims.N, M = dims.M, G = dims.G, Q = dims.Q;
  if (Q * N == 0) return ffi::Error::Success();
  if (F == 0 || V == 0) return ffi::Error::InvalidArgument("closest_point: the mesh has no faces or no vertices");
  if (F >= (int64_t{1} << 30)) return ffi::Error::InvalidArgument("closest_point (cuda): more than 2^30 faces");

  // Scratch for one mesh, reused for every mesh (all work is ordered on `stream`).
  bool ok = true;
  float* bounds = take<float>(scratch, 6, &ok);
  uint32_t* keys_in = take<uint32_t>(scratch, F, &ok);
  uint32_t* keys_out = take<uint32_t>(scratch, F, &ok);
  int32_t* vals_in = take<int32_t>(scratch, F, &ok);
  int32_t* sorted_face = take<int32_t>(scratch, F, &ok);
  int32_t* left = take<int32_t>(scratch, F - 1, &ok);
  int32_t* right = take<int32_t>(scratch, F - 1, &ok);
  int32_t* parent = take<int32_t>(scratch, 2 * F - 1, &ok);
  int32_t* visits = take<int32_t>(scratch, F - 1, &ok);
  float* boxes = take<float>(scratch, 6 * (2 * F - 1), &ok);
  float* tris = take<float>(scratch, 9 * F, &ok);
  size_t sort_bytes = 0;
  if (cudaError_t e = cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys_in, keys_out, vals_in, sorted_face,
                                                      static_cast<int>(F), 0, 30, stream);
      e != cudaSuccess)
    return check(e, "radix sort size query");
  void* sort_tmp = take<unsigned char>(scratch, static_cast<int64_t>(sort_bytes), &ok);
  if (!ok) return ffi::Error::Internal("closest_point (cuda): could not allocate scratch memory for the BVH");

  const float* vptr = vertices.typed_data();
  const int32_t* fptr = faces.typed_data();
  const float* pptr = points.typed_data();
  const int64_t per_mesh = Q / M, faces_per = M / G;
  for (int64_t m = 0; m < M; ++m) {
    const float* verts = vptr + m * V * 3;
    const int32_t* fc = fptr + (m / faces_per) * F * 3;
    centroid_bounds_kernel<<<1, kBoundsThreads, 0, stream>>>(verts, fc, V, F, bounds);
    morton_kernel<<<blocks_for(F), kThreads, 0, stream>>>(verts, fc, V, F, bounds, keys_in, vals_in);
    if (cudaError_t e = cub::DeviceRadixSort::SortPairs(sort_tmp, sort_bytes, keys_in, keys_out, vals_in, sorted_face,
                                                        static_cast<int>(F), 0, 30, stream);
        e != cudaSuccess)
      return check(e, "radix sort");
    if (F > 1) {
      if (cudaError_t e = cudaMemsetAsync(visits, 0, sizeof(int32_t) * (F - 1), stream); e != cudaSuccess)
        return check(e, "memset");
      if (cudaError_t e = cudaMemsetAsync(parent, 0xff, sizeof(int32_t), stream); e != cudaSuccess)  // root: -1
        return check(e, "memset");
      hierarchy_kernel<<<blocks_for(F - 1), kThreads, 0, stream>>>(keys_out, F, left, right, parent);
    }
    refit_kernel<<<blocks_for(F), kThreads, 0, stream>>>(verts, fc, V, F, sorted_face, left, right, parent, visits,
                                                         boxes, tris);
    const int64_t count = per_mesh * N;
    const int64_t offset = m * count;
    query_kernel<<<blocks_for(count), kThreads, 0, stream>>>(
        pptr + 3 * offset, count, F, left, right, boxes, tris, sorted_face, face_out->typed_data() + offset,
        point_out->typed_data() + 3 * offset, bary_out->typed_data() + 3 * offset, d2_out->typed_data() + offset);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return check(e, "kernel launch");
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace bvh
}  // namespace dhjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(DhjaxBvhClosestPointCuda, dhjax::bvh::ClosestPointCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>() DHJAX_BVH_CLOSEST_POINT_SIGNATURE);

DHJAX_EXPORT_ABI()

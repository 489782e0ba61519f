// Geometry shared by the CPU (bvh_cpu.cc) and CUDA (bvh_cuda.cu) closest-point handlers:
// small float3 helpers, the exact point-triangle test and the point-box distance.
//
// The point-triangle test is the same construction as the pure-JAX
// dhjax.geometry.mesh.closest_point_on_triangle, with the same thresholds, so that the kernels
// and the reference agree to float rounding, degenerate triangles included:
//   * if the triangle is not degenerate and the orthogonal projection of p onto its plane lies
//     inside (all barycentrics >= 0), that projection is the closest point;
//   * otherwise the closest point is on the boundary: the best of the three clamped segment
//     projections, ties broken in the order edge 01, edge 12, edge 20.
// A degenerate triangle (zero area, collapsed edges, coincident corners) has no interior
// candidate and reduces to its segments, which reduce to points; nothing divides by zero.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DHJAX_HD __host__ __device__ __forceinline__
#else
#define DHJAX_HD inline
#endif

namespace dhjax {
namespace bvh {

// Squared lengths below this count as zero (as _TINY_SQ in dhjax/geometry/mesh.py).
constexpr float kTinySq = 1e-24f;
// A triangle is degenerate when |n|^2 <= kFlatRel * (max squared edge length)^2 (as in mesh.py).
constexpr float kFlatRel = 1e-12f;

struct V3 {
  float x, y, z;
};

DHJAX_HD V3 v3(float x, float y, float z) { return V3{x, y, z}; }
DHJAX_HD V3 operator-(V3 a, V3 b) { return V3{a.x - b.x, a.y - b.y, a.z - b.z}; }
DHJAX_HD V3 operator+(V3 a, V3 b) { return V3{a.x + b.x, a.y + b.y, a.z + b.z}; }
DHJAX_HD V3 operator*(float s, V3 a) { return V3{s * a.x, s * a.y, s * a.z}; }
DHJAX_HD float dot(V3 a, V3 b) { return a.x * b.x + a.y * b.y + a.z * b.z; }
DHJAX_HD V3 cross(V3 a, V3 b) {
  return V3{a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x};
}
DHJAX_HD float fmin2(float a, float b) { return a < b ? a : b; }
DHJAX_HD float fmax2(float a, float b) { return a > b ? a : b; }

// Result of one point-triangle test: closest point q, barycentrics (u, v, w) w.r.t. corners
// (a, b, c) with q = u a + v b + w c, and the squared distance |p - q|^2.
struct TriHit {
  V3 q;
  float u, v, w;
  float d2;
};

// Closest point of segment [a, b] to p; t in [0, 1] with q = a + t (b - a).
DHJAX_HD void closest_on_segment(V3 p, V3 a, V3 b, V3* q, float* t) {
  V3 ab = b - a;
  float l2 = dot(ab, ab);
  float s = 0.0f;
  if (l2 > kTinySq) {
    s = dot(p - a, ab) / l2;
    s = s < 0.0f ? 0.0f : (s > 1.0f ? 1.0f : s);
  }
  *t = s;
  *q = a + s * ab;
}

DHJAX_HD TriHit closest_point_triangle(V3 p, V3 a, V3 b, V3 c) {
  TriHit hit;
  V3 ab = b - a, ac = c - a, ap = p - a;
  V3 n = cross(ab, ac);
  float n2 = dot(n, n);
  float scale2 = fmax2(dot(ab, ab), dot(ac, ac));
  bool tri_ok = (n2 > kTinySq) && (n2 > kFlatRel * scale2 * scale2);
  if (tri_ok) {
    float inv = 1.0f / n2;
    float v = dot(cross(ap, ac), n) * inv;
    float w = dot(cross(ab, ap), n) * inv;
    float u = 1.0f - v - w;
    if (u >= 0.0f && v >= 0.0f && w >= 0.0f) {
      hit.q = a + v * ab + w * ac;
      V3 d = p - hit.q;
      hit.d2 = dot(d, d);
      hit.u = u;
      hit.v = v;
      hit.w = w;
      return hit;
    }
  }
  // Boundary: best of the three edges, first one wins ties (edge 01, 12, 20).
  V3 q;
  float t;
  closest_on_segment(p, a, b, &q, &t);
  V3 d = p - q;
  hit.q = q;
  hit.d2 = dot(d, d);
  hit.u = 1.0f - t;
  hit.v = t;
  hit.w = 0.0f;
  closest_on_segment(p, b, c, &q, &t);
  d = p - q;
  float d2 = dot(d, d);
  if (d2 < hit.d2) {
    hit.q = q;
    hit.d2 = d2;
    hit.u = 0.0f;
    hit.v = 1.0f - t;
    hit.w = t;
  }
  closest_on_segment(p, c, a, &q, &t);
  d = p - q;
  d2 = dot(d, d);
  if (d2 < hit.d2) {
    hit.q = q;
    hit.d2 = d2;
    hit.u = t;
    hit.v = 0.0f;
    hit.w = 1.0f - t;
  }
  return hit;
}

// Squared distance from p to the axis-aligned box [lo, hi] (0 inside).
DHJAX_HD float box_distance_sq(V3 p, const float* lo, const float* hi) {
  float dx = fmax2(fmax2(lo[0] - p.x, p.x - hi[0]), 0.0f);
  float dy = fmax2(fmax2(lo[1] - p.y, p.y - hi[1]), 0.0f);
  float dz = fmax2(fmax2(lo[2] - p.z, p.z - hi[2]), 0.0f);
  return dx * dx + dy * dy + dz * dz;
}

// Traversal stack depth. The CPU builder bounds the tree depth below this (it switches to
// median splits deep in the tree); an LBVH over 30-bit Morton codes with index tie-breaks has
// depth at most 62.
constexpr int kStackSize = 96;

}  // namespace bvh
}  // namespace dhjax

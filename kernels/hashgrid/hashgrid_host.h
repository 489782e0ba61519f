// Host-side argument checks of the hash-grid FFI handlers (shared by the CPU and CUDA handlers).
// check_forward / check_backward run every check a handler needs, in one order for both platforms.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "hashgrid_common.h"
#include "xla/ffi/api/ffi.h"

namespace dhjax_hashgrid {

namespace ffi = xla::ffi;

inline ffi::Error fill_levels(ffi::Span<const float> scales, ffi::Span<const int64_t> res,
                              ffi::Span<const int64_t> sizes, int64_t n_levels, int64_t table_rows,
                              Levels* lv) {
  const int64_t L = static_cast<int64_t>(scales.size());
  if (L != n_levels || static_cast<int64_t>(res.size()) != L || static_cast<int64_t>(sizes.size()) != L) {
    return ffi::Error::InvalidArgument("hashgrid: per-level attributes do not match the table's level count");
  }
  if (L < 1 || L > kMaxLevels) {
    return ffi::Error::InvalidArgument("hashgrid: the number of levels must be in [1, 32]");
  }
  lv->n_levels = static_cast<int>(L);
  for (int64_t l = 0; l < L; ++l) {
    if (res[l] < 1 || sizes[l] < 1 || sizes[l] > table_rows) {
      return ffi::Error::InvalidArgument("hashgrid: bad level resolution or size (table too small?)");
    }
    lv->scale[l] = scales[l];
    lv->res[l] = static_cast<uint32_t>(res[l]);
    lv->size[l] = static_cast<uint32_t>(sizes[l]);
    // tcnn's rule: a level is dense when all R^3 vertices fit in the rows it uses.
    const double cube = static_cast<double>(res[l]) * res[l] * res[l];
    lv->dense[l] = cube <= static_cast<double>(sizes[l]) ? 1u : 0u;
  }
  return ffi::Error::Success();
}

// Batch dims: result dims `out` (rank k + tail_out), operands with k leading dims each, every
// operand dim either 1 (broadcast) or equal to the result's. `grad` may be null (forward).
inline ffi::Error fill_batch(ffi::Span<const int64_t> out, int tail_out, ffi::Span<const int64_t> points,
                             ffi::Span<const int64_t> table, const ffi::Span<const int64_t>* grad, Batch* bt) {
  const int64_t k = static_cast<int64_t>(out.size()) - tail_out;
  if (k < 0 || k > kMaxBatchRank || static_cast<int64_t>(points.size()) != k + 2 ||
      static_cast<int64_t>(table.size()) != k + 3 || (grad && static_cast<int64_t>(grad->size()) != k + 2)) {
    return ffi::Error::InvalidArgument("hashgrid: operand ranks do not agree (points [...,N,3], table [...,L,T,F])");
  }
  bt->rank = static_cast<int>(k);
  bt->count = 1;
  int64_t sp = points[k] * points[k + 1];
  int64_t st = table[k] * table[k + 1] * table[k + 2];
  int64_t sg = grad ? (*grad)[k] * (*grad)[k + 1] : 0;
  for (int64_t i = k - 1; i >= 0; --i) {
    const int64_t d = out[i];
    auto ok = [d](int64_t v) { return v == d || v == 1; };
    if (!ok(points[i]) || !ok(table[i]) || (grad && !ok((*grad)[i]))) {
      return ffi::Error::InvalidArgument("hashgrid: batch dims of the operands do not broadcast to the result");
    }
    bt->dims[i] = d;
    bt->stride_points[i] = points[i] == 1 ? 0 : sp;
    bt->stride_table[i] = table[i] == 1 ? 0 : st;
    bt->stride_grad[i] = grad ? ((*grad)[i] == 1 ? 0 : sg) : 0;
    sp *= points[i];
    st *= table[i];
    if (grad) sg *= (*grad)[i];
    bt->count *= d;
  }
  return ffi::Error::Success();
}

// Trailing dims of the operands: points [...,N,3], table [...,L,T,F].
struct Shapes {
  int64_t N, L, T, F;
};

inline ffi::Error check_shapes(ffi::Span<const int64_t> pd, ffi::Span<const int64_t> td, Shapes* s) {
  if (pd.size() < 2 || td.size() < 3 || pd[pd.size() - 1] != 3) {
    return ffi::Error::InvalidArgument("hashgrid: points must be [...,N,3] and table [...,L,T,F]");
  }
  s->N = pd[pd.size() - 2];
  s->L = td[td.size() - 3];
  s->T = td[td.size() - 2];
  s->F = td[td.size() - 1];
  if (s->F != 1 && s->F != 2 && s->F != 4 && s->F != 8) {
    return ffi::Error::InvalidArgument("hashgrid: n_features_per_level must be 1, 2, 4 or 8");
  }
  if (s->T < 1 || s->T > (int64_t{1} << 31)) {
    return ffi::Error::InvalidArgument("hashgrid: table rows must be in [1, 2^31]");
  }
  return ffi::Error::Success();
}

// All argument checks of a forward handler (points, table, level attributes, result dims `out`).
inline ffi::Error check_forward(ffi::Span<const int64_t> points, ffi::Span<const int64_t> table,
                                ffi::Span<const float> scales, ffi::Span<const int64_t> res,
                                ffi::Span<const int64_t> sizes, ffi::Span<const int64_t> out, Shapes* s,
                                Levels* lv, Batch* bt) {
  if (auto e = check_shapes(points, table, s); e.failure()) return e;
  if (auto e = fill_levels(scales, res, sizes, s->L, s->T, lv); e.failure()) return e;
  return fill_batch(out, 2, points, table, nullptr, bt);
}

// All argument checks of a backward handler: as the forward (with d_table's dims as the result
// dims), plus d_features [...,N,L*F] and d_points [...,N,3] or [...,0,3] (*want_points: not empty).
inline ffi::Error check_backward(ffi::Span<const int64_t> points, ffi::Span<const int64_t> table,
                                 ffi::Span<const int64_t> d_features, ffi::Span<const float> scales,
                                 ffi::Span<const int64_t> res, ffi::Span<const int64_t> sizes,
                                 ffi::Span<const int64_t> d_table, size_t d_points_count, Shapes* s, Levels* lv,
                                 Batch* bt, bool* want_points) {
  if (auto e = check_shapes(points, table, s); e.failure()) return e;
  if (auto e = fill_levels(scales, res, sizes, s->L, s->T, lv); e.failure()) return e;
  if (auto e = fill_batch(d_table, 3, points, table, &d_features, bt); e.failure()) return e;
  if (d_features[d_features.size() - 2] != s->N || d_features[d_features.size() - 1] != s->L * s->F) {
    return ffi::Error::InvalidArgument("hashgrid: d_features must be [...,N,L*F]");
  }
  *want_points = d_points_count > 0;
  if (*want_points && d_points_count != static_cast<size_t>(bt->count * s->N * 3)) {
    return ffi::Error::InvalidArgument("hashgrid: d_points must be [...,N,3] or [...,0,3]");
  }
  return ffi::Error::Success();
}

}  // namespace dhjax_hashgrid

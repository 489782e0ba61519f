"""Multi-resolution hash-grid encoding (instant-ngp), compatible with tiny-cuda-nn's HashGrid.

This is the positional encoding of INSTA's canonical field. A point x in [0, 1]^3 is looked up in
L grids of growing resolution; each grid vertex owns a row of F trainable features in a table of
T rows per level, and the point's features at each level are the trilinear interpolation of its
cell's eight vertices. The L levels' features are concatenated: output [N, L*F] with
`features[n, l*F + f]` = level l, feature f (tiny-cuda-nn's order).

The formula follows tiny-cuda-nn (include/tiny-cuda-nn/encodings/grid.h, "Linear"
interpolation, grid type "Hash"), level l = 0 .. L-1:

* scale  s_l = 2^(l * log2(b)) * N_min - 1   (float32; b = per_level_scale, N_min = base_resolution)
* resolution R_l = ceil(s_l) + 1 vertices per axis
* rows used  size_l = min(next_multiple(R_l^3, 8), T)      (T = 2^log2_hashmap_size)
* p = s_l x + 0.5 per axis, rounded once to float32 (tcnn's fmaf; the reference emulates the
  fused multiply-add exactly, so every implementation picks the same cells and fractions),
  cell c = floor(p) as uint32 (the 0.5 staggers the levels; negative cells wrap around as
  uint32), fraction w = p - c
* vertex row: dense levels (R_l^3 <= size_l):  (c_0 + c_1 R_l + c_2 R_l^2) mod size_l;
  hashed levels: (c_0 * 1 XOR c_1 * 2654435761 XOR c_2 * 805459861) mod size_l, all uint32
  (the +1 vertex of the last cell of a dense level can wrap onto the next row, as in tcnn)
* features_l = sum over the 8 corners of prod_d (w_d or 1 - w_d) * table[l, row].

Points outside [0, 1]^3 are not clamped (as in tcnn): they alias onto other cells.

Table layout: one array `table [L, T, F]`; level l uses rows 0 .. size_l - 1 of `table[l]` (the
rest is never read and gets zero gradient). tcnn stores the levels back to back in one flat
parameter vector; `to_tcnn_params` / `from_tcnn_params` convert between the two.

Implementations of the one op:
* `backend="reference"`: pure JAX (`hash_encode_reference`), differentiable by autodiff
  (also to second order); the oracle of the tests.
* `backend="cpu"`: C++ handler (kernels/hashgrid/hashgrid_cpu.cc), threads over points for the
  forward and over (batch, level) for the table gradient (no atomics, deterministic).
* `backend="cuda"`: CUDA handler (kernels/hashgrid/hashgrid_cuda.cu), one thread per
  (point, level), atomicAdd for the table gradient.
The kernels are XLA FFI custom calls wrapped in a `jax.custom_vjp` whose backward is a second
custom call (first-order gradients only). The gradient to the points (analytic derivative of
the trilinear weights, d w / d x_d = +-s_l prod_{e != d}(...)) is computed only when the points
are being differentiated, and skipped altogether with `points_grad=False`.
`backend="auto"` picks the kernel of JAX's default backend when it is built, else the reference.

Precision: the CUDA handler also accepts a float16 table (features interpolated in float32,
table gradient accumulated in float32 and cast back to float16). The CPU kernel takes float32
only: `backend="cpu"` with a float16 table raises a TypeError, and `backend="auto"` on a CPU
runs such a table through the reference (which computes in float32). Outputs are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.ops import _ffi

_PRIMES = (1, 2654435761, 805459861)
_MAX_LEVELS = 32

_TARGETS = {
    "cpu": (("dhjax_hashgrid_fwd_cpu", "HashEncodeForward"), ("dhjax_hashgrid_bwd_cpu", "HashEncodeBackward")),
    "cuda": (
        ("dhjax_hashgrid_fwd_cuda", "HashEncodeForwardCuda"),
        ("dhjax_hashgrid_bwd_cuda", "HashEncodeBackwardCuda"),
    ),
}


@dataclasses.dataclass(frozen=True)
class HashGridConfig:
    """Hyper-parameters of a 3D hash grid (tiny-cuda-nn's names; its defaults).

    Attributes:
      n_levels: L, number of resolution levels (1 .. 32).
      n_features_per_level: F, features per vertex and level (1, 2, 4 or 8 for the kernels).
      log2_hashmap_size: log2 of T, the table rows per level.
      base_resolution: N_min, vertices per axis of the coarsest level.
      per_level_scale: b, growth of the resolution from one level to the next. INSTA and
        instant-ngp derive it from a finest resolution: see `per_level_scale_for`.
    """

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 2.0

    def __post_init__(self):
        if not 1 <= self.n_levels <= _MAX_LEVELS:
            raise ValueError(f"n_levels must be in [1, {_MAX_LEVELS}], got {self.n_levels}")
        if self.n_features_per_level < 1:
            raise ValueError(f"n_features_per_level must be >= 1, got {self.n_features_per_level}")
        if not 0 <= self.log2_hashmap_size <= 31:
            raise ValueError(f"log2_hashmap_size must be in [0, 31], got {self.log2_hashmap_size}")
        if self.base_resolution < 1 or not self.per_level_scale > 0:
            raise ValueError("base_resolution must be >= 1 and per_level_scale > 0")

    @property
    def table_size(self) -> int:
        """T = 2^log2_hashmap_size rows per level."""
        return 1 << self.log2_hashmap_size

    @property
    def n_output_dims(self) -> int:
        """L * F, the width of the encoding."""
        return self.n_levels * self.n_features_per_level

    @property
    def table_shape(self) -> tuple[int, int, int]:
        """(L, T, F), the shape of the table."""
        return (self.n_levels, self.table_size, self.n_features_per_level)


def per_level_scale_for(finest_resolution: float, base_resolution: int = 16, n_levels: int = 16) -> float:
    """Per-level scale b that takes base_resolution to finest_resolution in n_levels levels.

    b = exp(ln(finest / base) / (n_levels - 1)), as instant-ngp and INSTA configure their grids
    (INSTA: finest = 2048 * bound). Returns 1.0 for a single level.
    """
    if n_levels <= 1:
        return 1.0
    return float(math.exp(math.log(float(finest_resolution) / float(base_resolution)) / (n_levels - 1)))


def level_scales(cfg: HashGridConfig) -> np.ndarray:
    """[L] float32 scales s_l = 2^(l log2 b) N_min - 1, computed in float32 as tcnn does."""
    log2_b = np.log2(np.float32(cfg.per_level_scale), dtype=np.float32)
    lv = np.arange(cfg.n_levels, dtype=np.float32)
    return (np.exp2(lv * log2_b, dtype=np.float32) * np.float32(cfg.base_resolution) - np.float32(1.0)).astype(
        np.float32
    )


def level_resolutions(cfg: HashGridConfig) -> np.ndarray:
    """[L] int64 vertices per axis R_l = ceil(s_l) + 1."""
    return np.ceil(level_scales(cfg)).astype(np.int64) + 1


def level_sizes(cfg: HashGridConfig) -> np.ndarray:
    """[L] int64 table rows each level uses: min(next_multiple(R_l^3, 8), T)."""
    cube = level_resolutions(cfg) ** 3
    return np.minimum((cube + 7) // 8 * 8, cfg.table_size)


def level_is_dense(cfg: HashGridConfig) -> np.ndarray:
    """[L] bool, True where the level indexes its vertices densely (R_l^3 <= rows used)."""
    return level_resolutions(cfg) ** 3 <= level_sizes(cfg)


def init_table(key: jax.Array, cfg: HashGridConfig, dtype=jnp.float32) -> jax.Array:
    """A fresh table [L, T, F] of `dtype`, uniform in [-1e-4, 1e-4] as tiny-cuda-nn initialises it."""
    return jax.random.uniform(key, cfg.table_shape, jnp.float32, -1e-4, 1e-4).astype(dtype)


def to_tcnn_params(table: jax.Array, cfg: HashGridConfig) -> jax.Array:
    """Table [L, T, F] -> tcnn's flat parameters [sum_l size_l * F] (levels back to back)."""
    _check_table(table, cfg)
    return jnp.concatenate([table[l, : int(s)].reshape(-1) for l, s in enumerate(level_sizes(cfg))])


def from_tcnn_params(params: jax.Array, cfg: HashGridConfig) -> jax.Array:
    """tcnn's flat parameters [sum_l size_l * F] -> table [L, T, F] (unused rows zero)."""
    sizes = level_sizes(cfg)
    F = cfg.n_features_per_level
    if params.shape != (int(sizes.sum()) * F,):
        raise ValueError(f"expected tcnn parameters of shape ({int(sizes.sum()) * F},), got {params.shape}")
    offsets = np.concatenate([[0], np.cumsum(sizes)]) * F
    levels = []
    for l, s in enumerate(sizes):
        lvl = params[offsets[l] : offsets[l + 1]].reshape(int(s), F)
        levels.append(jnp.pad(lvl, ((0, cfg.table_size - int(s)), (0, 0))))
    return jnp.stack(levels)


def _check_table(table, cfg: HashGridConfig):
    if tuple(table.shape) != cfg.table_shape:
        raise ValueError(f"table must have shape [L, T, F] = {cfg.table_shape} for this config, got {table.shape}")


def _vertex_rows(cells, res, size, dense):
    """uint32 cells [..., 3] -> uint32 table rows [...] of one level (see the module docstring).

    res, size: uint32 scalars of the level; dense: bool scalar (dense index, else the hash).
    """
    c0, c1, c2 = cells[..., 0], cells[..., 1], cells[..., 2]
    linear = c0 + c1 * res + c2 * (res * res)
    hashed = c0 ^ (c1 * np.uint32(_PRIMES[1])) ^ (c2 * np.uint32(_PRIMES[2]))
    return jnp.where(dense, linear, hashed) % size


def _split_hi_lo(a):
    """float32 a -> (hi, lo) with hi = a truncated to its top 12 significant bits, lo = a - hi.

    Both are exact and each has at most 12 significant bits, so any product of two of them is
    exact in float32. Bit masking (no multiply) keeps XLA from fusing it into an FMA.
    """
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    hi = jax.lax.bitcast_convert_type(bits & np.uint32(0xFFFFF000), jnp.float32)
    return hi, a - hi


@jax.custom_jvp
def _fma_half(x, s):
    """fl(x * s + 0.5) with a single rounding, as tcnn's fmaf(scale, x, 0.5f); float32.

    XLA fuses x * s + 0.5 into an FMA in some programs (jit) and not in others (eager), which
    moves p by one float32 ulp and can change a cell. Here the product is made exact as
    prod + err (Dekker's two-product over the 12-bit splits, every partial product exact, so
    fusing them is harmless), prod + 0.5 is split exactly (two-sum), and the pieces are added
    back with one final rounding. The barriers keep XLA from fusing the product into the sums.
    """
    prod = jax.lax.optimization_barrier(x * s)
    xh, xl = _split_hi_lo(x)
    sh, sl = _split_hi_lo(s)
    err = (((xh * sh - prod) + xh * sl) + xl * sh) + xl * sl  # x * s - prod, exactly
    s1 = jax.lax.optimization_barrier(prod + np.float32(0.5))
    bb = s1 - prod
    e1 = (prod - (s1 - bb)) + (np.float32(0.5) - bb)  # prod + 0.5 - s1, exactly
    return s1 + (e1 + err)


@_fma_half.defjvp
def _fma_half_jvp(primals, tangents):
    x, s = primals
    dx, ds = tangents
    return _fma_half(x, s), dx * s + ds * x


def hash_encode_reference(points: jax.Array, table: jax.Array, cfg: HashGridConfig) -> jax.Array:
    """Pure-JAX hash-grid encoding (the oracle; differentiable to any order by autodiff).

    Args:
      points: [..., 3] float32 positions, expected in [0, 1]^3 (not clamped).
      table: [L, T, F] float table (computed in float32).
      cfg: the grid's HashGridConfig; table.shape must be cfg.table_shape.
    Returns:
      [..., L*F] float32 features, level-major (`features[..., l*F + f]`).
    """
    _check_table(table, cfg)
    x = jnp.asarray(points, jnp.float32)
    tab = jnp.asarray(table).astype(jnp.float32)
    bits = np.array([[(k >> d) & 1 for d in range(3)] for k in range(8)], np.uint32)  # [8, 3]

    def level(carry, per_level):
        tab_l, scale, res, size, dense = per_level
        p = _fma_half(x, jnp.full_like(x, scale))  # s_l x + 0.5 rounded once, as in tcnn
        c = jnp.floor(p)
        frac = p - c  # [..., 3]
        cells = c.astype(jnp.int32).astype(jnp.uint32)[..., None, :] + bits  # [..., 8, 3]
        rows = _vertex_rows(cells, res, size, dense)  # [..., 8]
        f = frac[..., None, :]
        a = jnp.where(bits == 1, f, 1.0 - f)  # [..., 8, 3]
        w = a[..., 0] * a[..., 1] * a[..., 2]  # [..., 8]
        vals = tab_l[rows.astype(jnp.int32)]  # [..., 8, F]
        return carry, jnp.sum(w[..., None] * vals, axis=-2)  # [..., F]

    per_level = (
        tab,
        jnp.asarray(level_scales(cfg)),
        jnp.asarray(level_resolutions(cfg).astype(np.uint32)),
        jnp.asarray(level_sizes(cfg).astype(np.uint32)),
        jnp.asarray(level_is_dense(cfg)),
    )
    _, feats = jax.lax.scan(level, None, per_level)  # [L, ..., F]
    feats = jnp.moveaxis(feats, 0, -2)  # [..., L, F]
    return feats.reshape(feats.shape[:-2] + (cfg.n_output_dims,))


# ---------------------------------------------------------------------------------------------
# Kernel path


def _attrs(cfg: HashGridConfig) -> dict:
    return dict(
        scales=level_scales(cfg),
        resolutions=level_resolutions(cfg).astype(np.int64),
        sizes=level_sizes(cfg).astype(np.int64),
    )


def _ffi_forward(points, table, cfg: HashGridConfig, platform: str):
    out = jax.ShapeDtypeStruct(points.shape[:-1] + (cfg.n_output_dims,), jnp.float32)
    call = jax.ffi.ffi_call(_TARGETS[platform][0][0], out, vmap_method="expand_dims")
    return call(points, table, **_attrs(cfg))


def _ffi_backward(points, table, d_features, cfg: HashGridConfig, platform: str, with_points: bool):
    n = points.shape[-2] if with_points else 0
    outs = (
        jax.ShapeDtypeStruct(table.shape, jnp.float32),
        jax.ShapeDtypeStruct(points.shape[:-2] + (n, 3), jnp.float32),
    )
    call = jax.ffi.ffi_call(_TARGETS[platform][1][0], outs, vmap_method="expand_dims")
    return call(points, table, d_features, **_attrs(cfg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _encode_kernel(points, table, cfg, platform, points_grad):
    return _ffi_forward(points, table, cfg, platform)


def _encode_kernel_fwd(points, table, cfg, platform, points_grad):
    want_points = bool(points_grad) and points.perturbed
    out = _ffi_forward(points.value, table.value, cfg, platform)
    return out, (points.value, table.value, want_points)


def _encode_kernel_bwd(cfg, platform, points_grad, res, g):
    points, table, want_points = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None
    d_table, d_points = _ffi_backward(points, table, g, cfg, platform, want_points)
    return (d_points if want_points else None), d_table.astype(table.dtype)


_encode_kernel.defvjp(_encode_kernel_fwd, _encode_kernel_bwd, symbolic_zeros=True)


def hash_encode(
    points: jax.Array,
    table: jax.Array,
    cfg: HashGridConfig,
    *,
    backend: str = "auto",
    points_grad: bool = True,
) -> jax.Array:
    """Multi-resolution hash-grid encoding of points (tiny-cuda-nn's HashGrid, trilinear).

    Args:
      points: [..., 3] float32 positions in [0, 1]^3 (outside values alias, as in tcnn).
      table: [L, T, F] float32 table (float16 also on the CUDA kernel), T = 2^log2_hashmap_size;
        `init_table` makes one.
      cfg: HashGridConfig (static).
      backend: "auto" | "reference" | "cpu" | "cuda" (see the module docstring).
      points_grad: with the kernels, compute the gradient to the points when they are being
        differentiated (the default). False treats the points as constants (zero gradient, a
        cheaper backward), as tcnn does when no input gradient is requested. The reference is
        always differentiated by autodiff.
    Returns:
      [..., L*F] float32 features, `features[..., l*F + f]` = level l, feature f.

    jit, vmap (over points and/or tables) and grad work on every backend; the kernels give first
    derivatives only.
    """
    _check_table(table, cfg)
    if points.shape[-1:] != (3,):
        raise ValueError(f"points must be [..., 3], got {points.shape}")
    table = jnp.asarray(table)
    if not jnp.issubdtype(table.dtype, jnp.floating):
        raise TypeError(f"table must be a floating-point array, got {table.dtype}")
    impl = _ffi.resolve_backend(backend, "hashgrid", _TARGETS)
    if impl == "cpu" and table.dtype != jnp.float32:
        if backend == "auto":
            impl = "reference"
        else:
            raise TypeError(
                f"the CPU hash-grid kernel takes a float32 table, got {table.dtype}: cast it with "
                "table.astype(jnp.float32) or use backend='reference' (float16 tables run on the CUDA kernel)"
            )
    if impl == "cuda" and table.dtype not in (jnp.float32, jnp.float16):
        raise TypeError(f"the CUDA hash-grid kernel takes a float32 or float16 table, got {table.dtype}")
    if impl != "reference" and cfg.n_features_per_level not in (1, 2, 4, 8):
        raise ValueError(f"the kernels support n_features_per_level in (1, 2, 4, 8), got {cfg.n_features_per_level}")
    if impl == "reference":
        return hash_encode_reference(points, table, cfg)
    x = jnp.asarray(points, jnp.float32)
    lead = x.shape[:-1]
    flat = x.reshape(-1, 3)
    out = _encode_kernel(flat, table, cfg, impl, bool(points_grad))
    return out.reshape(lead + (cfg.n_output_dims,))

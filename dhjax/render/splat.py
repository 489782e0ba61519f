"""Differentiable 3D Gaussian splatting (3DGS) for one or more pinhole cameras.

`rasterize(...)` is dhjax's one entry point for rendering Gaussians (SynShot renders through it).
Image formation, as in Kerbl et al. 2023 (3DGS), with the conventions of `dhjax.render.camera`
(OpenCV cameras, pixel (j, i) centred at (u, v) = (j, i)):

1. Covariance: Sigma = R S S^T R^T from a unit quaternion (w, x, y, z) and per-axis scales, or
   given directly (`covariances`, e.g. a deformed J Sigma J^T).
2. EWA projection: camera-space mean t = R_cam mu + t_cam; 2D covariance
   Sigma' = J W Sigma W^T J^T with the perspective Jacobian
   J = [[fx/z, s/z, -(fx x + s y)/z^2], [0, fy/z, -fy y/z^2]] (s = K[0, 1], the skew), where
   x/z and y/z are clamped to a window 0.3 tan(fov/2) beyond the image's edges at -0.5 and
   W - 0.5 (H - 0.5), so Gaussians far outside the frustum stay bounded: 3DGS's 1.3x the field
   of view for a centred camera (c = (W - 1) / 2), and gsplat's window for pixel centres at
   +0.5 translated to dhjax's pixel centres at integers; a mirrored scene renders mirrored.
   A 0.3 pixel^2 low-pass is added to the diagonal. Antialiased mode (Mip-Splatting / gsplat's
   "antialiased") multiplies the opacity by sqrt(det(Sigma') / det(Sigma' + 0.3 I)).
3. Culling and extent: a Gaussian is dropped when z <= near, z >= far, or its box lies outside
   the image, and in every camera when any of its inputs is NaN or infinite (`rasterize`). Its
   screen extent is the axis-aligned box of the 3-sigma ellipse, radius ceil(3 sqrt(Sigma'_uu))
   by ceil(3 sqrt(Sigma'_vv)) pixels (`radius_sigma`).
4. Colour: either given per Gaussian, or spherical harmonics up to degree 3 evaluated at the
   view direction (mean - camera centre, normalised) with 3DGS's real SH basis, plus 0.5,
   clamped at 0.
5. Compositing in 16x16 tiles, per-tile depth order, alpha = min(0.99, o exp(-d^T Sigma'^-1 d / 2)),
   Gaussians with alpha < 1/255 skipped, a pixel stops when its transmittance would fall below
   1e-4 (see `dhjax.ops.splat`, which implements this stage three times: pure JAX, C++, CUDA).
6. Background: image = sum_i c_i w_i + T_final * background.

Render modes: "rgb", "depth" (expected depth: sum_i z_i w_i / alpha, 0 where alpha = 0),
"rgb+depth", "alpha". Gradients reach means, quaternions, scales, opacities, colours / SH and
covariances, for every backend (the kernels' backward equals the reference's autodiff).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.ops import splat as splat_op
from dhjax.render.camera import Camera, camera_centre, check_camera

_HI = jax.lax.Precision.HIGHEST

# 3DGS real spherical harmonics constants (bands 0..3).
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (
    -0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
    -0.4570457994644658, 1.445305721320277, -0.5900435899266435,
)

RENDER_MODES = ("rgb", "depth", "rgb+depth", "alpha")


def num_sh_bases(degree: int) -> int:
    """(degree + 1)^2 coefficients per colour channel."""
    return (int(degree) + 1) ** 2


def sh_basis(degree: int, dirs) -> jax.Array:
    """3DGS's real SH basis of unit directions.

    Args:
      degree: 0..3.
      dirs: [..., 3] unit directions.
    Returns:
      [..., (degree + 1)^2] float32.
    """
    if degree not in (0, 1, 2, 3):
        raise ValueError(f"SH degree must be 0..3, got {degree}")
    d = jnp.asarray(dirs, jnp.float32)
    x, y, z = d[..., 0], d[..., 1], d[..., 2]
    out = [jnp.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            SH_C2[0] * x * y,
            SH_C2[1] * y * z,
            SH_C2[2] * (2.0 * zz - xx - yy),
            SH_C2[3] * x * z,
            SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            SH_C3[0] * y * (3.0 * xx - yy),
            SH_C3[1] * x * y * z,
            SH_C3[2] * y * (4.0 * zz - xx - yy),
            SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy),
            SH_C3[4] * x * (4.0 * zz - xx - yy),
            SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3.0 * yy),
        ]
    return jnp.stack(out, -1)


def eval_sh(degree: int, dirs, coeffs) -> jax.Array:
    """Evaluate SH colour (without the +0.5 offset and clamp).

    Args:
      degree: bands used, 0..3 (coefficients beyond (degree+1)^2 are ignored).
      dirs: [..., 3] directions (normalised here; zero vectors give the DC term only).
      coeffs: [..., M, 3] with M >= (degree + 1)^2.
    Returns:
      [..., 3] float32.
    """
    m = num_sh_bases(degree)
    coeffs = jnp.asarray(coeffs, jnp.float32)
    if coeffs.shape[-2] < m:
        raise ValueError(f"SH degree {degree} needs {m} coefficients per channel, got {coeffs.shape[-2]}")
    d = jnp.asarray(dirs, jnp.float32)
    n2 = jnp.sum(d * d, -1, keepdims=True)
    d = d * jnp.where(n2 > 0, jax.lax.rsqrt(jnp.where(n2 > 0, n2, 1.0)), 0.0)
    return jnp.einsum("...m,...mc->...c", sh_basis(degree, d), coeffs[..., :m, :], precision=_HI)


def quat_to_rotmat(quats) -> jax.Array:
    """Rotation matrices of quaternions (w, x, y, z), normalised first.

    Args:
      quats: [..., 4]; a zero quaternion gives the identity.
    Returns:
      [..., 3, 3] float32.
    """
    q = jnp.asarray(quats, jnp.float32)
    n2 = jnp.sum(q * q, -1, keepdims=True)
    ok = n2 > 0
    q = jnp.where(ok, q * jax.lax.rsqrt(jnp.where(ok, n2, 1.0)), jnp.array([1.0, 0.0, 0.0, 0.0], jnp.float32))
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return jnp.stack(rows, -1).reshape(q.shape[:-1] + (3, 3))


def covariance(quats, scales) -> jax.Array:
    """3D covariances R S S^T R^T.

    Args:
      quats: [..., 4] (w, x, y, z).
      scales: [..., 3] standard deviations along the rotated axes, metres.
    Returns:
      [..., 3, 3] float32, metres^2.
    """
    m = quat_to_rotmat(quats) * jnp.asarray(scales, jnp.float32)[..., None, :]
    return jnp.einsum("...ij,...kj->...ik", m, m, precision=_HI)


class Projection(NamedTuple):
    """Per-camera projected Gaussians. Shapes [C, N, ...] for C cameras and N Gaussians."""

    means2d: jax.Array  # [C, N, 2] pixel coordinates (u, v)
    conics: jax.Array  # [C, N, 3] (a, b, c) of the inverse 2D covariance
    depths: jax.Array  # [C, N] camera-space z, metres
    radii: jax.Array  # [C, N, 2] int32 pixel radii along u, v (0 = culled)
    compensations: jax.Array  # [C, N] antialiasing opacity factor sqrt(det / det_blur)
    cov2d: jax.Array  # [C, N, 2, 2] blurred 2D covariance, pixels^2


def _as_camera_batch(cameras: Camera) -> Camera:
    check_camera(cameras, "cameras")
    bs = cameras.batch_shape
    if len(bs) == 0:
        return jax.tree.map(lambda a: a[None], cameras)
    if len(bs) != 1:
        raise ValueError(f"cameras must have batch shape () or [C], got {bs}")
    return cameras


def project(means, covs, cameras: Camera, width: int, height: int, *, eps2d: float = 0.3, near: float = 0.01,
            far: float = 1e10, radius_sigma: float = 3.0) -> Projection:
    """EWA projection of 3D Gaussians into each camera (step 2-3 of the module docstring).

    Args:
      means: [N, 3] world positions, metres.
      covs: [N, 3, 3] world covariances, metres^2.
      cameras: Camera with batch shape [C] (or a single camera, C = 1).
      width, height: image size in pixels.
      eps2d: low-pass added to the 2D covariance diagonal, pixels^2.
      near, far: depth range kept, metres.
      radius_sigma: extent of the screen-space box in standard deviations.
    Returns:
      `Projection` with [C, N, ...] arrays. Culled Gaussians have radii 0; their other fields
      are finite but meaningless.
    """
    cams = _as_camera_batch(cameras)
    means = jnp.asarray(means, jnp.float32)
    covs = jnp.asarray(covs, jnp.float32)
    R, t, K = cams.R, cams.t, cams.K
    pc = jnp.einsum("cij,nj->cni", R, means, precision=_HI) + t[:, None, :]  # [C, N, 3]
    cov_c = jnp.einsum("cij,njk,clk->cnil", R, covs, R, precision=_HI)
    z = pc[..., 2]
    depth_ok = (z > near) & (z < far)
    zs = jnp.where(depth_ok, z, 1.0)
    fx, fy, skew = K[:, 0, 0][:, None], K[:, 1, 1][:, None], K[:, 0, 1][:, None]
    cx, cy = K[:, 0, 2][:, None], K[:, 1, 2][:, None]
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    # The image spans [-0.5, W - 0.5] x [-0.5, H - 0.5] (pixel centres at integers); the window
    # reaches 0.3 tan(fov / 2) beyond its edges, so a centred camera gets 3DGS's symmetric 1.3 x fov.
    lim_xp, lim_xn = (width - 0.5 - cx) / fx + 0.3 * tan_x, (cx + 0.5) / fx + 0.3 * tan_x
    lim_yp, lim_yn = (height - 0.5 - cy) / fy + 0.3 * tan_y, (cy + 0.5) / fy + 0.3 * tan_y
    tx = zs * jnp.clip(pc[..., 0] / zs, -lim_xn, lim_xp)
    ty = zs * jnp.clip(pc[..., 1] / zs, -lim_yn, lim_yp)
    zero = jnp.zeros_like(zs)
    # d(u, v)/d(x, y, z) of u = (fx x + s y) / z + cx, v = fy y / z + cy (s = K[0, 1], the skew)
    J = jnp.stack([fx / zs, skew / zs, -(fx * tx + skew * ty) / (zs * zs),
                   zero, fy / zs, -fy * ty / (zs * zs)], -1).reshape(zs.shape + (2, 3))
    cov2d = jnp.einsum("cnij,cnjk,cnlk->cnil", J, cov_c, J, precision=_HI)
    uv = jnp.einsum("cij,cnj->cni", K[:, :2, :3], jnp.where(depth_ok[..., None], pc, jnp.array([0.0, 0.0, 1.0])), precision=_HI)
    means2d = uv / zs[..., None]
    det_orig = cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0]
    cov2d = cov2d + eps2d * jnp.eye(2, dtype=jnp.float32)
    det = jnp.maximum(cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0], 1e-10)
    ratio = det_orig / det
    comp = jnp.where(ratio > 0, jnp.sqrt(jnp.where(ratio > 0, ratio, 1.0)), 0.0)
    conics = jnp.stack([cov2d[..., 1, 1] / det, -0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]) / det, cov2d[..., 0, 0] / det], -1)
    var = jax.lax.stop_gradient(jnp.stack([cov2d[..., 0, 0], cov2d[..., 1, 1]], -1))
    radius = jnp.ceil(radius_sigma * jnp.sqrt(jnp.maximum(var, 0.0)))
    m = jax.lax.stop_gradient(means2d)
    inside = (
        (m[..., 0] + radius[..., 0] > -0.5) & (m[..., 0] - radius[..., 0] < width - 0.5)
        & (m[..., 1] + radius[..., 1] > -0.5) & (m[..., 1] - radius[..., 1] < height - 0.5)
    )
    keep = depth_ok & (det > 0) & inside & jnp.all(jnp.isfinite(m), -1) & jnp.all(jnp.isfinite(radius), -1)
    radii = jnp.where(keep[..., None], radius, 0.0).astype(jnp.int32)
    return Projection(means2d, conics, z, radii, comp, cov2d)


class RenderOutput(NamedTuple):
    """Result of `rasterize`. C cameras, H x W pixels."""

    image: jax.Array | None  # [C, H, W, D] colour channels (D = 3 for RGB/SH) incl. background
    alpha: jax.Array  # [C, H, W, 1] accumulated opacity, 1 - T_final
    depth: jax.Array | None  # [C, H, W, 1] expected depth, metres (render modes with depth)
    meta: dict | None  # with return_meta: Projection fields, rects, tile_counts, num_intersections


def _check_gaussians(means, quats, scales, opacities, covariances):
    """Shapes checked; returns (means, quats or None, scales or None, opacities, covariances or None)."""
    means = jnp.asarray(means, jnp.float32)
    if means.ndim != 2 or means.shape[-1] != 3:
        raise ValueError(f"means must be [N, 3], got {means.shape}")
    n = means.shape[0]
    opacities = jnp.asarray(opacities, jnp.float32)
    if opacities.shape != (n,):
        raise ValueError(f"opacities must be [N] = [{n}] (activated, in [0, 1]), got {opacities.shape}")
    if not isinstance(opacities, jax.core.Tracer):      # concrete (outside jit): check the range
        o = np.asarray(opacities)
        o = o[np.isfinite(o)]                           # non-finite Gaussians are dropped (docstring)
        if o.size and (o.min() < 0.0 or o.max() > 1.0):
            raise ValueError(f"opacities must be activated values in [0, 1] (e.g. jax.nn.sigmoid(logits)), "
                             f"got values in [{o.min():.4g}, {o.max():.4g}]")
    if covariances is not None:
        covariances = jnp.asarray(covariances, jnp.float32)
        if covariances.shape != (n, 3, 3):
            raise ValueError(f"covariances must be [N, 3, 3] = [{n}, 3, 3], got {covariances.shape}")
        return means, None, None, opacities, covariances
    if quats is None or scales is None:
        raise ValueError("pass quats [N, 4] and scales [N, 3], or covariances [N, 3, 3]")
    quats = jnp.asarray(quats, jnp.float32)
    scales = jnp.asarray(scales, jnp.float32)
    if quats.shape != (n, 4):
        raise ValueError(f"quats must be [N, 4] = [{n}, 4] (w, x, y, z), got {quats.shape}")
    if scales.shape != (n, 3):
        raise ValueError(f"scales must be [N, 3] = [{n}, 3] (standard deviations, metres), got {scales.shape}")
    return means, quats, scales, opacities, None


def _check_colors(colors_or_sh, sh_degree, n: int, c: int) -> jax.Array:
    """Shape checked (in every render mode); colours [N, D] or [C, N, D], or SH [N, M, 3]."""
    x = jnp.asarray(colors_or_sh, jnp.float32)
    if sh_degree is None:
        if not ((x.ndim == 2 and x.shape[0] == n) or (x.ndim == 3 and x.shape[:2] == (c, n))):
            raise ValueError(f"colors must be [N, D] or [C, N, D] with N={n}, C={c}, got {x.shape}")
    elif x.ndim != 3 or x.shape[0] != n or x.shape[2] != 3:
        raise ValueError(f"SH coefficients must be [N, M, 3] with N={n}, got {x.shape}")
    return x


def _rows_finite(x, axis: int = 0) -> jax.Array:
    """[N] bool: every value of Gaussian i's row of x (Gaussians along `axis`) is finite."""
    x = jnp.moveaxis(x, axis, 0)
    return jnp.all(jnp.isfinite(x.reshape(x.shape[:1] + (math.prod(x.shape[1:]),))), -1)  # N may be 0


def _where_rows(ok, x, fill, axis: int = 0) -> jax.Array:
    """x with Gaussian i's row (Gaussians along `axis`) replaced by `fill` where ok[i] is False."""
    shape = [1] * x.ndim
    shape[axis] = ok.shape[0]
    return jnp.where(ok.reshape(shape), x, fill)


def _colors(x, sh_degree, means, cams: Camera, n: int, c: int) -> jax.Array:
    """[C, N, D] colours from `_check_colors`' result."""
    if sh_degree is None:
        return jnp.broadcast_to(x[None], (c,) + x.shape) if x.ndim == 2 else x
    dirs = means[None] - camera_centre(cams)[:, None, :]  # [C, N, 3]
    rgb = eval_sh(int(sh_degree), dirs, jnp.broadcast_to(x[None], (c,) + x.shape))
    return jnp.maximum(rgb + 0.5, 0.0)


def rasterize(means, quats, scales, opacities, colors_or_sh, cameras: Camera, width: int | None = None,
              height: int | None = None, *, sh_degree: int | None = None, covariances=None, background=None,
              near: float = 0.01, far: float = 1e10, render_mode: str = "rgb", antialiased: bool = False,
              eps2d: float = 0.3, radius_sigma: float = 3.0, backend: str = "auto", capacity: int | None = None,
              deterministic: bool = False, return_meta: bool = False) -> RenderOutput:
    """Render 3D Gaussians into C cameras (image formation: module docstring).

    Args:
      means: [N, 3] world positions, metres.
      quats: [N, 4] rotations (w, x, y, z), any norm (normalised here); ignored with `covariances`.
      scales: [N, 3] standard deviations, metres (already activated, e.g. exp(log_scales)).
      opacities: [N] in [0, 1] (already activated, e.g. sigmoid(logits)); outside jit, values
        outside [0, 1] (e.g. logits) raise a ValueError.
      colors_or_sh: colours [N, D] or per camera [C, N, D] when `sh_degree` is None (any D,
        rendered as channels), else SH coefficients [N, M, 3] with M >= (sh_degree + 1)^2.
      cameras: `dhjax.render.camera.Camera` with batch shape [C] (a single camera is C = 1).
      width, height: image size; default the cameras' own.
      sh_degree: None or 0..3.
      covariances: [N, 3, 3] world covariances, metres^2; overrides quats/scales.
      background: None (black), [D] or [C, D] added as T_final * background to the colour channels.
      near, far: kept depth range, metres.
      render_mode: "rgb" | "depth" | "rgb+depth" | "alpha".
      antialiased: multiply opacities by the EWA compensation (gsplat's antialiased mode).
      eps2d, radius_sigma: low-pass (pixels^2) and box extent (sigmas), 0.3 and 3 in 3DGS.
      backend: "auto" | "reference" | "cpu" | "cuda" (see `dhjax.ops.splat`).
      capacity: per-tile capacity of the reference backend (see `dhjax.ops.splat`).
      deterministic: CUDA backend: a backward with the same bits on every call (fixed-order
        sums instead of atomics; more GPU memory; not yet run on a GPU). Ignored by the CPU
        kernel, which is always deterministic, and by the reference (see `dhjax.ops.splat`).
      return_meta: also return the projection and tiling in `meta`.
    Returns:
      `RenderOutput(image [C,H,W,D] or None, alpha [C,H,W,1], depth [C,H,W,1] or None, meta)`.

    Non-finite Gaussians are dropped: Gaussian i is culled in every camera, by every backend, when
    any value of its row of means, quats or scales (of covariances instead when they are given;
    quats and scales are then not read), opacities or colors_or_sh (every channel or SH
    coefficient, in every camera for per-camera colours, in every render mode) is NaN or
    infinite. The outputs are then finite and equal the render without Gaussian i (its radii in
    `meta` are 0), and its gradients are zero for all its attributes, not NaN. After projection,
    `dhjax.ops.splat.rasterize` applies the same rule per (camera, Gaussian) to what is derived
    (e.g. SH colours that overflow to infinity).
    """
    if render_mode not in RENDER_MODES:
        raise ValueError(f"render_mode must be one of {RENDER_MODES}, got {render_mode!r}")
    cams = _as_camera_batch(cameras)
    width = int(cams.width if width is None else width)
    height = int(cams.height if height is None else height)
    means, quats, scales, opacities, covs = _check_gaussians(means, quats, scales, opacities, covariances)
    n, c = means.shape[0], cams.t.shape[0]
    colors_or_sh = _check_colors(colors_or_sh, sh_degree, n, c)
    # Non-finite Gaussians are dropped (docstring): replaced by finite stand-ins *before* any
    # arithmetic, so that no NaN is formed anywhere (a NaN partial derivative times a zero
    # cotangent is still NaN) and jnp.where passes them zero gradients; then culled below.
    # The barrier keeps these checks from changing how XLA fuses the inputs' producers (typically
    # a network in the same jitted program): extra consumers changed their fusion and with it
    # their float rounding (SynShot's stage-1 loss moved by 7e-5 relative). Forward: identity.
    means, quats, scales, opacities, covs, colors_or_sh = jax.lax.optimization_barrier(
        (means, quats, scales, opacities, covs, colors_or_sh))
    col_axis = 1 if sh_degree is None and colors_or_sh.ndim == 3 else 0  # [C, N, D]: per camera
    ok = _rows_finite(means) & jnp.isfinite(opacities) & _rows_finite(colors_or_sh, col_axis)
    if covs is None:
        ok = ok & _rows_finite(quats) & _rows_finite(scales)
        covs = covariance(_where_rows(ok, quats, jnp.array([1.0, 0.0, 0.0, 0.0], jnp.float32)),
                          _where_rows(ok, scales, 0.0))
    else:
        ok = ok & _rows_finite(covs)
        covs = _where_rows(ok, covs, 0.0)
    means = _where_rows(ok, means, 0.0)
    opacities = _where_rows(ok, opacities, 0.0)
    colors_or_sh = _where_rows(ok, colors_or_sh, 0.0, col_axis)
    proj = project(means, covs, cams, width, height, eps2d=eps2d, near=near, far=far, radius_sigma=radius_sigma)
    proj = proj._replace(radii=jnp.where(ok[None, :, None], proj.radii, 0))  # culled in every camera
    opac = jnp.broadcast_to(opacities[None], (c, n))
    if antialiased:
        opac = opac * proj.compensations
    want_rgb = render_mode in ("rgb", "rgb+depth")
    want_depth = render_mode in ("depth", "rgb+depth")
    chans = []
    if want_rgb:
        chans.append(_colors(colors_or_sh, sh_degree, means, cams, n, c))
    if want_depth or not want_rgb:
        chans.append(proj.depths[..., None])
    feats = jnp.concatenate(chans, -1) if len(chans) > 1 else chans[0]
    rects = splat_op.tile_rects(jax.lax.stop_gradient(proj.means2d), proj.radii, width, height)
    acc, trans = splat_op.rasterize(
        proj.means2d, proj.conics, feats, opac, jax.lax.stop_gradient(proj.depths), rects, width, height,
        backend=backend, capacity=capacity, deterministic=deterministic,
    )
    alpha = (1.0 - trans)[..., None]
    image = depth = None
    if want_rgb:
        d = feats.shape[-1] - (1 if want_depth else 0)
        image = acc[..., :d]
        if background is not None:
            bg = jnp.asarray(background, jnp.float32)
            if bg.shape not in ((d,), (c, d)):
                raise ValueError(f"background must be [{d}] or [{c}, {d}], got {bg.shape}")
            bg = bg if bg.ndim == 2 else jnp.broadcast_to(bg[None], (c, d))
            image = image + trans[..., None] * bg[:, None, None, :]
    if want_depth:
        dsum = acc[..., -1:]
        ok = alpha > 1e-10
        depth = jnp.where(ok, dsum / jnp.where(ok, alpha, 1.0), 0.0)
    meta = None
    if return_meta:
        meta = dict(proj._asdict(), rects=rects, opacities=opac,
                    tile_counts=splat_op.tile_counts(rects, width, height),
                    num_intersections=splat_op.num_intersections(rects))
    return RenderOutput(image, alpha, depth, meta)

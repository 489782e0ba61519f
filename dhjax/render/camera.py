"""Pinhole cameras in the OpenCV convention, plus a few camera rigs.

Conventions (used by every function in `dhjax.render`):

* World: metres, y up; the FLAME head looks along +z.
* Camera (OpenCV): ``x_cam = R @ x_world + t``. The camera looks along its +z axis, image x
  points right and image y points down. ``R`` is a rotation (world -> camera).
* Intrinsics ``K = [[fx, s, cx], [0, fy, cy], [0, 0, 1]]`` map camera coordinates to image
  coordinates (u, v) = (fx x/z + s y/z + cx, fy y/z + cy).
* Pixels: the centre of the pixel in column j, row i has image coordinates (u, v) = (j, i)
  (OpenCV), so the image covers u in [-0.5, W - 0.5], v in [-0.5, H - 0.5] and a centred
  principal point is ((W - 1) / 2, (H - 1) / 2).

A `Camera` holds K [..., 3, 3], R [..., 3, 3] and t [..., 3] with any leading batch shape (for
example [C] cameras of one rig) and the static image size (width, height). All functions are
pure and jit/vmap/grad compatible.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from dhjax.geometry.vectors import safe_normalize

# Full float32 matrix products (no TF32 on GPUs): projections must stay sub-pixel accurate.
_HI = jax.lax.Precision.HIGHEST

__all__ = [
    "Camera",
    "make_camera",
    "intrinsics",
    "focal_from_fov",
    "camera_from_fov",
    "look_at",
    "camera_centre",
    "world_to_camera",
    "project",
    "unproject",
    "pixel_rays",
    "to_opencv",
    "rig_from_angles",
    "orbit_rig",
    "synshot_rig",
]

# Depths with |z| below this are divided by _PROJ_EPS instead (finite values and gradients).
_PROJ_EPS = 1e-6


@flax.struct.dataclass
class Camera:
    """A (possibly batched) pinhole camera, OpenCV convention (see the module docstring).

    Attributes:
      K: [..., 3, 3] float32 intrinsics in pixels.
      R: [..., 3, 3] float32 world -> camera rotation.
      t: [..., 3] float32 world -> camera translation, metres (x_cam = R x_world + t).
      width: static int, image width W in pixels.
      height: static int, image height H in pixels.

    `camera[i]` / `camera.take(i)` index the leading batch dimensions of K, R and t.
    """

    K: jax.Array
    R: jax.Array
    t: jax.Array
    width: int = flax.struct.field(pytree_node=False)
    height: int = flax.struct.field(pytree_node=False)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading batch shape of the camera (() for a single camera)."""
        return tuple(jnp.shape(self.t)[:-1])

    def take(self, index) -> "Camera":
        """Index the batch dimensions, e.g. `rig.take(3)` or `rig.take(slice(0, 2))`."""
        if not isinstance(index, tuple):
            index = (index,)
        if any(i is Ellipsis or i is None for i in index):
            raise ValueError("Camera indexing supports ints, slices and arrays, not ... or None")
        if len(index) > len(self.batch_shape):
            raise ValueError(
                f"too many indices ({len(index)}) for camera batch_shape {self.batch_shape}"
            )
        return jax.tree.map(lambda a: a[index], self)

    def __getitem__(self, index) -> "Camera":
        return self.take(index)


def _f32(x) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float32)


def check_camera(cam: Camera, name: str = "camera") -> None:
    """Raise ValueError if K, R, t of `cam` do not have shapes [..., 3, 3], [..., 3, 3], [..., 3]."""
    if not isinstance(cam, Camera):
        raise ValueError(f"{name} must be a dhjax.render.Camera, got {type(cam).__name__}")
    ks, rs, ts = jnp.shape(cam.K), jnp.shape(cam.R), jnp.shape(cam.t)
    batch = ts[:-1]
    if len(ts) < 1 or ts[-1] != 3:
        raise ValueError(f"{name}.t must have shape [..., 3], got {ts}")
    if ks != batch + (3, 3):
        raise ValueError(f"{name}.K must have shape {batch + (3, 3)} (batch of t), got {ks}")
    if rs != batch + (3, 3):
        raise ValueError(f"{name}.R must have shape {batch + (3, 3)} (batch of t), got {rs}")
    if int(cam.width) <= 0 or int(cam.height) <= 0:
        raise ValueError(f"{name} width/height must be positive, got {cam.width}x{cam.height}")


def _check_last(x, size: int, name: str, min_ndim: int = 1) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < min_ndim or x.shape[-1] != size:
        spec = f"[..., N, {size}]" if min_ndim > 1 else f"[..., {size}]"
        raise ValueError(f"{name} must have shape {spec}, got {x.shape}")
    return x


def make_camera(K, R, t, width: int, height: int) -> Camera:
    """Build a validated Camera.

    Args:
      K: [..., 3, 3] intrinsics; R: [..., 3, 3] rotation; t: [..., 3] translation (metres).
      width, height: image size in pixels (static ints).
    Returns:
      Camera with float32 arrays.
    """
    cam = Camera(K=_f32(K), R=_f32(R), t=_f32(t), width=int(width), height=int(height))
    check_camera(cam)
    return cam


def intrinsics(fx, fy, cx, cy) -> jax.Array:
    """Intrinsic matrix from focal lengths and principal point (pixels, OpenCV pixel centres).

    Functions that invert K assume this upper-triangular form (an optional skew K[0, 1] is
    allowed, K[1, 0] = K[2, 0] = K[2, 1] = 0, K[2, 2] = 1).

    Args:
      fx, fy, cx, cy: scalars or broadcastable arrays [...].
    Returns:
      K: [..., 3, 3] float32, [[fx, 0, cx], [0, fy, cy], [0, 0, 1]].
    """
    fx, fy, cx, cy = jnp.broadcast_arrays(_f32(fx), _f32(fy), _f32(cx), _f32(cy))
    zero, one = jnp.zeros_like(fx), jnp.ones_like(fx)
    rows = [
        jnp.stack([fx, zero, cx], -1),
        jnp.stack([zero, fy, cy], -1),
        jnp.stack([zero, zero, one], -1),
    ]
    return jnp.stack(rows, -2)


def focal_from_fov(fov_deg, size: int) -> jax.Array:
    """Focal length in pixels for a full field of view `fov_deg` spanning `size` pixels.

    The image spans `size` pixels edge to edge, so f = (size / 2) / tan(fov / 2).
    Returns a float32 array with the shape of `fov_deg`.
    """
    return 0.5 * size / jnp.tan(0.5 * jnp.deg2rad(_f32(fov_deg)))


def camera_from_fov(fov_y_deg, width: int, height: int, R, t) -> Camera:
    """Camera with square pixels, vertical field of view `fov_y_deg` and centred principal point.

    Args:
      fov_y_deg: scalar or [...] vertical field of view in degrees.
      width, height: image size in pixels.
      R: [..., 3, 3] world -> camera rotation; t: [..., 3] translation, metres.
    Returns:
      Camera with batch shape broadcast(fov_y_deg.shape, R.shape[:-2], t.shape[:-1]).
    """
    R = _f32(R)
    t = _f32(t)
    if R.ndim < 2 or R.shape[-2:] != (3, 3):
        raise ValueError(f"R must have shape [..., 3, 3], got {R.shape}")
    if t.ndim < 1 or t.shape[-1] != 3:
        raise ValueError(f"t must have shape [..., 3], got {t.shape}")
    f = focal_from_fov(fov_y_deg, height)
    batch = jnp.broadcast_shapes(jnp.shape(f), R.shape[:-2], t.shape[:-1])
    K = intrinsics(f, f, (width - 1) / 2.0, (height - 1) / 2.0)
    return make_camera(
        jnp.broadcast_to(K, batch + (3, 3)),
        jnp.broadcast_to(R, batch + (3, 3)),
        jnp.broadcast_to(t, batch + (3,)),
        width,
        height,
    )


def look_at(eye, target, up: Sequence[float] = (0.0, 1.0, 0.0)) -> tuple[jax.Array, jax.Array]:
    """World -> camera rotation and translation of a camera at `eye` looking at `target`.

    The camera's +z axis points from eye to target, and image "up" (smaller v) is the
    projection of `up`, so with world y up the image is upright. When the viewing direction
    is parallel to `up`, world +z (or +x) is used as the up hint instead.

    Args:
      eye: [..., 3] camera centre, metres.
      target: [..., 3] point that lands on the principal point.
      up: [..., 3] up hint (default world +y).
    Returns:
      R: [..., 3, 3], t: [..., 3] float32 with x_cam = R x_world + t.
    """
    eye = _check_last(_f32(eye), 3, "eye")
    target = _check_last(_f32(target), 3, "target")
    up = _check_last(_f32(up), 3, "up")
    eye, target, up = jnp.broadcast_arrays(eye, target, up)
    fwd = safe_normalize(target - eye)
    right = jnp.cross(fwd, up)
    # Fallback up hints for views along `up`.
    for alt in ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0)):
        bad = jnp.sum(right * right, -1, keepdims=True) < 1e-10
        right = jnp.where(bad, jnp.cross(fwd, jnp.asarray(alt, jnp.float32)), right)
    right = safe_normalize(right)
    down = jnp.cross(fwd, right)
    R = jnp.stack([right, down, fwd], axis=-2)
    t = -jnp.einsum("...ij,...j->...i", R, eye, precision=_HI)
    return R, t


def camera_centre(cam: Camera) -> jax.Array:
    """Camera centre in world coordinates, C = -R^T t.

    Returns:
      [..., 3] float32, metres (batch shape of the camera).
    """
    check_camera(cam)
    return -jnp.einsum("...ji,...j->...i", cam.R, cam.t, precision=_HI)


def world_to_camera(cam: Camera, x) -> jax.Array:
    """Transform world points into camera coordinates.

    Args:
      cam: Camera with batch shape [...c].
      x: [..., N, 3] world points, metres; leading dims broadcast against the camera batch.
    Returns:
      [..., N, 3] float32 camera coordinates (z is the depth along the optical axis).
    """
    check_camera(cam)
    x = _check_last(_f32(x), 3, "x", min_ndim=2)
    return jnp.einsum("...ij,...nj->...ni", cam.R, x, precision=_HI) + cam.t[..., None, :]


def _camera_to_pixels(K: jax.Array, xc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Project camera-space points [..., N, 3] with K [..., 3, 3]; safe division by depth."""
    z = xc[..., 2]
    ok = jnp.abs(z) > _PROJ_EPS
    zs = jnp.where(ok, z, _PROJ_EPS)
    xn = xc[..., 0] / zs
    yn = xc[..., 1] / zs
    Kx = K[..., None, :, :]
    u = Kx[..., 0, 0] * xn + Kx[..., 0, 1] * yn + Kx[..., 0, 2]
    v = Kx[..., 1, 0] * xn + Kx[..., 1, 1] * yn + Kx[..., 1, 2]
    return jnp.stack([u, v], -1), z


def _pixels_to_rays(K: jax.Array, uv: jax.Array) -> jax.Array:
    """Camera-frame rays (x/z, y/z, 1) of image points uv [..., 2]; K [..., 3, 3] broadcasts.

    Inverts K analytically, assuming the OpenCV form [[fx, s, cx], [0, fy, cy], [0, 0, 1]].
    """
    yn = (uv[..., 1] - K[..., 1, 2]) / K[..., 1, 1]
    xn = (uv[..., 0] - K[..., 0, 2] - K[..., 0, 1] * yn) / K[..., 0, 0]
    return jnp.stack([xn, yn, jnp.ones_like(xn)], -1)


def project(cam: Camera, points) -> tuple[jax.Array, jax.Array]:
    """Project world points to image coordinates (OpenCV pixel centres).

    Depths with |z| <= 1e-6 are replaced by 1e-6 in the division, so points at (or very close
    to) the camera centre give finite coordinates and finite gradients (never NaN); such
    points are meaningless and callers should mask them by `depth`.

    Args:
      cam: Camera with batch shape [...c].
      points: [..., N, 3] world points, metres (leading dims broadcast with the camera batch).
    Returns:
      uv: [..., N, 2] float32 image coordinates (u right, v down), pixels.
      depth: [..., N] float32 camera-space z, metres (negative behind the camera).
    """
    xc = world_to_camera(cam, points)
    return _camera_to_pixels(cam.K, xc)


def unproject(cam: Camera, uv, depth) -> jax.Array:
    """Lift image coordinates with camera-space depth z back to world points (inverse of project).

    Args:
      cam: Camera with batch shape [...c].
      uv: [..., N, 2] image coordinates, pixels.
      depth: [..., N] camera-space z, metres.
    Returns:
      [..., N, 3] float32 world points.
    """
    check_camera(cam)
    uv = _check_last(_f32(uv), 2, "uv", min_ndim=2)
    depth = _f32(depth)
    if depth.shape[-1:] != uv.shape[-2:-1]:
        raise ValueError(
            f"depth must have shape [..., N] with N = uv.shape[-2] = {uv.shape[-2]}, got {depth.shape}"
        )
    rays = _pixels_to_rays(cam.K[..., None, :, :], uv)
    xc = rays * depth[..., None]
    return jnp.einsum("...ji,...nj->...ni", cam.R, xc - cam.t[..., None, :], precision=_HI)


def pixel_rays(cam: Camera) -> tuple[jax.Array, jax.Array]:
    """World-space rays through the pixel centres.

    Returns:
      origins: [..., H, W, 3] float32 camera centre (broadcast), metres.
      directions: [..., H, W, 3] float32 unit directions; pixel (row i, column j) goes through
        image point (u, v) = (j, i).
    """
    check_camera(cam)
    H, W = int(cam.height), int(cam.width)
    jj, ii = jnp.meshgrid(jnp.arange(W, dtype=jnp.float32), jnp.arange(H, dtype=jnp.float32))
    uv = jnp.stack([jj, ii], -1)  # [H, W, 2]
    rays = _pixels_to_rays(cam.K[..., None, None, :, :], uv)  # [..., H, W, 3] camera frame
    dirs = jnp.einsum("...ji,...hwj->...hwi", cam.R, rays, precision=_HI)
    dirs = safe_normalize(dirs)
    origins = jnp.broadcast_to(camera_centre(cam)[..., None, None, :], dirs.shape)
    return origins, dirs


def to_opencv(cam: Camera) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Return (K [..., 3, 3], R [..., 3, 3], t [..., 3]) in OpenCV convention (x_cam = R x + t)."""
    check_camera(cam)
    return cam.K, cam.R, cam.t


def _eyes_from_angles(azimuth_deg, elevation_deg, radius, target) -> np.ndarray:
    """Eye positions [n, 3]; azimuth 0 is in front (+z), positive azimuth towards +x."""
    az = np.deg2rad(np.asarray(azimuth_deg, np.float64))
    el = np.deg2rad(np.asarray(elevation_deg, np.float64))
    d = np.stack([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)], -1)
    return np.asarray(target, np.float64) + radius * d


def rig_from_angles(
    azimuths_deg,
    elevations_deg,
    radius: float,
    target: Sequence[float] = (0.0, 0.0, 0.0),
    fov_y_deg: float = 30.0,
    width: int = 512,
    height: int = 512,
) -> Camera:
    """Cameras at given azimuths/elevations around `target`, all looking at it, upright.

    Args:
      azimuths_deg: [n] degrees, 0 = in front of the head (+z), positive towards +x.
      elevations_deg: [n] degrees above the horizontal plane through `target`.
      radius: distance to the target, metres.
    Returns:
      Camera with batch shape [n], square pixels, centred principal point.
    """
    az = np.atleast_1d(np.asarray(azimuths_deg, np.float64))
    el = np.broadcast_to(np.asarray(elevations_deg, np.float64), az.shape)
    eyes = _eyes_from_angles(az, el, radius, target)
    R, t = look_at(eyes, np.broadcast_to(np.asarray(target, np.float32), eyes.shape))
    return camera_from_fov(fov_y_deg, width, height, R, t)


def orbit_rig(
    n: int,
    radius: float,
    target: Sequence[float] = (0.0, 0.0, 0.0),
    elevation_deg: float = 0.0,
    fov_y_deg: float = 30.0,
    width: int = 512,
    height: int = 512,
) -> Camera:
    """`n` cameras on a circle around the world y axis through `target`, all looking at it.

    Camera k sits at azimuth 360 k / n degrees (0 = in front of the head, on +z; increasing
    towards +x) and elevation `elevation_deg`, at distance `radius` (metres) from the target.

    Returns:
      Camera with batch shape [n], image width x height, square pixels, centred principal point.
    """
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    az = 360.0 * np.arange(n) / n
    eyes = _eyes_from_angles(az, np.full(n, elevation_deg), radius, target)
    R, t = look_at(eyes, np.broadcast_to(np.asarray(target, np.float32), eyes.shape))
    return camera_from_fov(fov_y_deg, width, height, R, t)


_GOLDEN_ANGLE_DEG = 180.0 * (3.0 - math.sqrt(5.0))  # ~137.508 degrees


def synshot_rig(
    radius: float = 1.0,
    target: Sequence[float] = (0.0, 0.0, 0.0),
    width: int = 512,
    height: int = 768,
    n_frontal: int = 14,
    n_upper: int = 14,
    fov_y_deg: float = 25.0,
) -> Camera:
    """SynShot-style capture rig: a frontal arc plus cameras on the upper hemisphere.

    SynShot renders its synthetic heads at 768 x 512 (portrait: H = 768, W = 512), the
    default here. Layout (deterministic, no randomness):

    * `n_frontal` cameras on an arc at head height: azimuths evenly spread over [-80, 80]
      degrees (0 = in front, +z), elevations cycling through (0, +5, -5) degrees.
    * `n_upper` cameras on the upper hemisphere: elevations evenly spread over [20, 70]
      degrees, azimuths k * golden angle (~137.5 degrees) wrapped to [-180, 180).

    All cameras are at distance `radius` (metres) from `target` and look at it, upright.

    Returns:
      Camera with batch shape [n_frontal + n_upper] (frontal arc first).
    """
    if int(n_frontal) < 0 or int(n_upper) < 0 or int(n_frontal) + int(n_upper) < 1:
        raise ValueError(f"need n_frontal, n_upper >= 0 and at least one camera, got {n_frontal}, {n_upper}")
    az_f = np.linspace(-80.0, 80.0, n_frontal) if n_frontal > 1 else np.zeros(n_frontal)
    el_f = np.array([0.0, 5.0, -5.0])[np.arange(n_frontal) % 3]
    el_u = np.linspace(20.0, 70.0, n_upper) if n_upper > 1 else np.full(n_upper, 45.0)
    az_u = (np.arange(n_upper) * _GOLDEN_ANGLE_DEG + 180.0) % 360.0 - 180.0
    az = np.concatenate([az_f, az_u])
    el = np.concatenate([el_f, el_u])
    eyes = _eyes_from_angles(az, el, radius, target)
    R, t = look_at(eyes, np.broadcast_to(np.asarray(target, np.float32), eyes.shape))
    return camera_from_fov(fov_y_deg, width, height, R, t)

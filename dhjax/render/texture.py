"""Texture extraction: fuse a few photos of a tracked head into one UV albedo map.

SynShot initialises a personal avatar from a handful of images whose head mesh (FLAME layout)
has been tracked; the colours seen in the photos are projected back into the model's UV layout
to give a first texture. `extract_texture` does that "unprojection":

  for every texel of the UV layout (rasterised at size x size with `rasterize_uv`) and every
  view n:
    1. the texel's world position P and unit normal N are interpolated from the posed vertices
       of view n (vertex normals, area weighted);
    2. P is projected into camera n (pixel (u, v), camera depth z);
    3. visibility: a pixel "shows P" when view n's rasterisation of the same mesh covers it and
       the surface seen there is not in front of P by more than `depth_tol` (below). P is
       visible in view n only if the pixel nearest to (u, v) shows it; then, of the 4 pixels
       around (u, v) that bilinear sampling reads, only those that show P are counted (so no
       colour leaks in from an occluder or the background next to P);
    4. colour = bilinear image sample over the counted pixels, weighted by their mask values and
       renormalised; view weight w_n = cos * m, where cos = N . (camera centre - P) / |...| is
       used only when cos >= min_cos (else w_n = 0) and m is the bilinear mask value restricted
       to the counted pixels (m equals the plain bilinear mask where all 4 pixels are counted);
  the texel's colour is the w-weighted mean of its per-view colours and its weight is sum_n w_n.

Depth test: comparing P's depth with the z-buffer at pixel centres would need a tolerance that
grows with the surface slope (the centres are up to ~1.4 pixels away from P's projection, which
at 64 px is several millimetres on a cheek seen at 60 degrees). Instead the face visible at each
pixel (the rasteriser's face id) is extended as a plane to P's own camera ray, and P counts as
visible from that pixel when z_P <= z_plane + depth_tol. On the same smooth surface the two agree
up to curvature (a fraction of a millimetre on the smooth parts of a head at 64 px), while real occluders (a nose in
front of a cheek, an eyeball in front of the eyelid skin it pierces) lie in front by more than
the tolerance. Where two surfaces touch or intersect (eyeball and eyelid) the test cannot decide
and both may contribute.

Texels that no view sees (weight 0), including texels outside the UV layout, are filled: with
fill="mean" by the weighted mean colour of all seen texels, with fill="none" by 0.

Conventions as in `dhjax.render` (metres, OpenCV cameras, pixel (row i, column j) centred at
image coordinates (u, v) = (j, i); UV texel centres as in `rasterize_uv`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.geometry.mesh import vertex_normals
from dhjax.render.camera import Camera, check_camera
from dhjax.render.raster import Fragments, interpolate, rasterize, rasterize_uv
from dhjax.geometry.vectors import safe_normalize

__all__ = ["extract_texture"]

_HI = jax.lax.Precision.HIGHEST
_FILLS = ("mean", "none")


# ----------------------------------------------------------------------------------------------
# Host-side validation.


def _stack_cameras(cameras, n_images: int) -> Camera:
    """A Camera with batch [N] from a batched Camera or a sequence of single cameras."""
    if isinstance(cameras, Camera):
        check_camera(cameras, "cameras")
        batch = cameras.batch_shape
        if batch == () and n_images == 1:
            return jax.tree.map(lambda a: a[None], cameras)
        if len(batch) != 1:
            raise ValueError(
                f"cameras must have batch shape [N] (one camera per image), got batch shape {batch} "
                f"for {n_images} images"
            )
        return cameras
    if isinstance(cameras, (list, tuple)):
        if len(cameras) == 0:
            raise ValueError("cameras is an empty sequence")
        for i, cam in enumerate(cameras):
            check_camera(cam, f"cameras[{i}]")
            if cam.batch_shape != ():
                raise ValueError(
                    f"cameras[{i}] must be a single camera (batch shape ()), got {cam.batch_shape}"
                )
        sizes = {(int(c.width), int(c.height)) for c in cameras}
        if len(sizes) != 1:
            raise ValueError(f"all cameras must share one image size, got (width, height) {sorted(sizes)}")
        (w, h), = sizes
        return Camera(
            K=jnp.stack([jnp.asarray(c.K, jnp.float32) for c in cameras]),
            R=jnp.stack([jnp.asarray(c.R, jnp.float32) for c in cameras]),
            t=jnp.stack([jnp.asarray(c.t, jnp.float32) for c in cameras]),
            width=w,
            height=h,
        )
    raise ValueError(
        f"cameras must be a dhjax.render.Camera with batch [N] or a list of N cameras, got {type(cameras).__name__}"
    )


def _int_array(x, name):
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {a.dtype}")
    return a


# ----------------------------------------------------------------------------------------------
# Jitted core.


def _view_samples(image, mask, K, R, t, verts, faces, zbuf, face_id, pos, nrm, valid, min_cos, depth_tol, near):
    """Colour [S, S, 3] and weight [S, S] of every texel as seen by one view.

    image [H, W, 3]; mask, zbuf [H, W]; face_id [H, W] int (-1 empty); K, R [3, 3]; t [3];
    verts [V, 3] world vertices of this view; faces [F, 3];
    pos, nrm [S, S, 3] texel world positions / unit normals; valid [S, S] bool (inside layout).
    """
    H, W = zbuf.shape
    xc = jnp.einsum("ij,...j->...i", R, pos, precision=_HI) + t
    z = xc[..., 2]
    zs = jnp.where(z > near, z, 1.0)
    ray = xc / zs[..., None]  # camera-frame ray (x/z, y/z, 1) through the texel
    u = K[0, 0] * ray[..., 0] + K[0, 1] * ray[..., 1] + K[0, 2]
    v = K[1, 1] * ray[..., 1] + K[1, 2]
    centre = -jnp.einsum("ji,j->i", R, t, precision=_HI)
    cos = jnp.sum(nrm * safe_normalize(centre - pos), -1)
    inside = (u >= -0.5) & (u <= W - 0.5) & (v >= -0.5) & (v <= H - 0.5)
    front = valid & (z > near) & (cos >= min_cos) & inside

    # Planes of the faces in camera coordinates: n_f . x = d_f.
    vc = jnp.einsum("ij,vj->vi", R, verts, precision=_HI) + t
    tri = vc[faces]  # [F, 3, 3]
    fn = jnp.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    fd = jnp.sum(fn * tri[:, 0], -1)

    uc = jnp.where(front, u, 0.0)
    vcoord = jnp.where(front, v, 0.0)
    x0 = jnp.floor(uc)
    y0 = jnp.floor(vcoord)
    fx, fy = uc - x0, vcoord - y0
    near_x, near_y = fx >= 0.5, fy >= 0.5  # which of the 4 pixels is the nearest
    acc_c = jnp.zeros(pos.shape, jnp.float32)
    acc_w = jnp.zeros(z.shape, jnp.float32)
    own = jnp.zeros(z.shape, bool)
    for dx in (0, 1):
        for dy in (0, 1):
            xi = x0 + dx
            yi = y0 + dy
            bw = (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy)
            in_img = (xi >= 0) & (xi <= W - 1) & (yi >= 0) & (yi <= H - 1)
            xi_i = jnp.clip(xi, 0, W - 1).astype(jnp.int32)
            yi_i = jnp.clip(yi, 0, H - 1).astype(jnp.int32)
            fk = face_id[yi_i, xi_i]
            covered = fk >= 0
            # Depth of the surface visible at that pixel, extended (as its face's plane) to the
            # texel's own ray; falls back to the pixel-centre depth for faces seen edge-on.
            nk = fn[jnp.maximum(fk, 0)]
            den = jnp.sum(nk * ray, -1)
            ok = jnp.abs(den) > 1e-3 * jnp.linalg.norm(nk, axis=-1) * jnp.linalg.norm(ray, axis=-1)
            zk = jnp.where(ok, fd[jnp.maximum(fk, 0)] / jnp.where(ok, den, 1.0), zbuf[yi_i, xi_i])
            seen = in_img & covered & (z <= zk + depth_tol)
            own = own | (seen & (near_x == bool(dx)) & (near_y == bool(dy)))
            wk = jnp.where(seen, bw * mask[yi_i, xi_i], 0.0)
            acc_c = acc_c + wk[..., None] * image[yi_i, xi_i]
            acc_w = acc_w + wk
    colour = acc_c / jnp.where(acc_w > 0, acc_w, 1.0)[..., None]
    weight = jnp.where(front & own & (acc_w > 0), cos * acc_w, 0.0)
    return colour, weight


@jax.jit
def _fuse_views(images, masks, K, R, t, vertices, faces, face_id, depth, uv_face_id, uv_bary, uv_mask,
                min_cos, depth_tol, near, fill_mean):
    """Jitted core: per-view samples of every texel, fused over views.

    images [N, H, W, 3]; masks [N, H, W]; K, R [N, 3, 3]; t [N, 3]; vertices [N, V, 3];
    faces [F, 3]; face_id, depth [N, H, W] (the views' rasterisation of the mesh);
    uv_face_id [1, S, S], uv_bary [1, S, S, 3], uv_mask [1, S, S] (`rasterize_uv`);
    scalars min_cos, depth_tol, near (float32) and fill_mean (bool).
    Returns texture [S, S, 3] and weight [S, S], float32.
    """
    uv_frags = Fragments(face_id=uv_face_id, bary=uv_bary, depth=uv_mask.astype(jnp.float32),
                         mask=uv_mask, overflow=jnp.zeros((1,), bool))
    pos = interpolate(vertices, faces, uv_frags)  # [N, S, S, 3]
    nrm = safe_normalize(interpolate(vertex_normals(vertices, faces), faces, uv_frags))
    colour, weight = jax.vmap(
        _view_samples, in_axes=(0, 0, 0, 0, 0, 0, None, 0, 0, 0, 0, None, None, None, None)
    )(images, masks, K, R, t, vertices, faces, depth, face_id, pos, nrm, uv_mask[0],
      min_cos, depth_tol, near)
    wsum = jnp.sum(weight, 0)  # [S, S]
    csum = jnp.sum(weight[..., None] * colour, 0)  # [S, S, 3]
    seen = wsum > 0
    texture = csum / jnp.where(seen, wsum, 1.0)[..., None]
    total = jnp.sum(wsum)
    mean = jnp.sum(csum, (0, 1)) / jnp.where(total > 0, total, 1.0)
    filler = jnp.where(fill_mean, mean, 0.0)
    texture = jnp.where(seen[..., None], texture, filler)
    return texture, wsum


# ----------------------------------------------------------------------------------------------
# Public entry point.


def extract_texture(
    images,
    masks,
    cameras: Camera | Sequence[Camera],
    vertices,
    faces,
    uv_coords,
    uv_faces,
    size: int,
    *,
    min_cos: float = 0.2,
    fill: str = "mean",
    depth_tol: float = 0.002,
    near: float = 1e-3,
) -> tuple[jax.Array, jax.Array]:
    """Project N photos of a tracked mesh into its UV layout and average them (module docstring).

    Host-side entry point (inputs must be concrete, not traced): it validates the inputs,
    rasterises the UV layout and the N views eagerly (exact rasteriser capacity), then runs one
    jitted core that is compiled once per combination of N, image size, texture size and
    vertex/face counts (the options are traced, not static).

    Args:
      images: [N, H, W, 3] float colours in [0, 1].
      masks: [N, H, W] (or [N, H, W, 1]) float in [0, 1], 1 on the subject (pass a skin or
        face segmentation to keep hair, hands or background out of the texture); None = all 1.
      cameras: a Camera with batch shape [N] (one per image; batch () is accepted for N = 1), or
        a list of N single Cameras sharing one size; each camera's size must be W x H.
      vertices: [N, V, 3] float posed world-space vertices of the tracked mesh in each image,
        metres; [V, 3] is shared by all views (one rigid multi-view capture).
      faces: [F, 3] int mesh faces (outward normals, counter-clockwise from outside).
      uv_coords: [T, 2] float texture coordinates in [0, 1] (u right, v up).
      uv_faces: [F, 3] int indices into uv_coords, in the face order of `faces`.
      size: texture edge in texels (the output is size x size).
      min_cos: views see a texel only where cos(normal, direction to camera) >= min_cos.
      fill: "mean" (unseen texels get the weighted mean colour of the seen ones) or "none"
        (unseen texels are 0).
      depth_tol: visibility tolerance in metres (module docstring): a texel hidden less than this
        far behind the visible surface still counts as seen.
      near: faces with a vertex at camera depth <= near are not rasterised and texels at
        depth <= near are not sampled, metres.
    Returns:
      texture: [size, size, 3] float32 fused colours (unseen texels filled as `fill` says).
      weight: [size, size] float32 sum over views of the per-view weights cos * mask (0 for
        texels no view sees or outside the UV layout; at most N).
    Raises:
      ValueError: on bad shapes, mismatched counts of images / masks / cameras / vertex sets,
        non-finite vertices, camera sizes that differ from the images, or bad options.
    """
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((images, masks, cameras, vertices))):
        raise ValueError("extract_texture runs on the host (it sizes the rasteriser from concrete "
                         "inputs); call it outside jit/vmap/grad")
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [N, H, W, 3], got {images.shape}")
    N, H, W, _ = images.shape
    if N < 1:
        raise ValueError("images must hold at least one image (N >= 1)")

    if masks is None:
        masks = jnp.ones((N, H, W), jnp.float32)
    masks = jnp.asarray(masks, jnp.float32)
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape [N, H, W] or [N, H, W, 1], got {masks.shape}")

    vertices = jnp.asarray(vertices, jnp.float32)
    if vertices.ndim == 2:
        vertices = jnp.broadcast_to(vertices, (N,) + vertices.shape)
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must have shape [N, V, 3] or [V, 3], got {vertices.shape}")

    if isinstance(cameras, (list, tuple)):
        n_cams = len(cameras)
    elif isinstance(cameras, Camera):
        n_cams = cameras.batch_shape[0] if len(cameras.batch_shape) == 1 else 1
    else:
        n_cams = None
    counts = dict(images=N, masks=masks.shape[0], cameras=n_cams, vertices=vertices.shape[0])
    if any(c is not None and c != N for c in counts.values()):
        raise ValueError(
            "extract_texture needs one mask, camera and vertex set per image; got "
            + ", ".join(f"{c} {k}" for k, c in counts.items())
        )
    camera = _stack_cameras(cameras, N)
    if camera.batch_shape != (N,):
        raise ValueError(f"cameras must have batch shape [{N}] for {N} images, got {camera.batch_shape}")
    if (int(camera.width), int(camera.height)) != (W, H):
        raise ValueError(
            f"camera image size {camera.width}x{camera.height} (W x H) does not match the images' {W}x{H}"
        )
    if masks.shape[1:] != (H, W):
        raise ValueError(f"masks must have the images' size [N, {H}, {W}], got {masks.shape}")
    if not bool(jnp.all(jnp.isfinite(vertices))):
        bad = np.argwhere(~np.all(np.isfinite(np.asarray(vertices)), axis=(1, 2)))[:, 0]
        raise ValueError(f"vertices must be finite; views {bad.tolist()} contain NaN or inf")

    faces_np = _int_array(faces, "faces")
    uv_faces_np = _int_array(uv_faces, "uv_faces")
    V = vertices.shape[1]
    if faces_np.ndim != 2 or faces_np.shape[1] != 3 or faces_np.shape[0] < 1:
        raise ValueError(f"faces must have shape [F, 3], got {faces_np.shape}")
    if faces_np.min() < 0 or faces_np.max() >= V:
        raise ValueError(f"faces index vertices in [{faces_np.min()}, {faces_np.max()}], but V = {V}")
    if uv_faces_np.shape != faces_np.shape:
        raise ValueError(f"uv_faces must have the shape of faces {faces_np.shape}, got {uv_faces_np.shape}")

    size = int(size)
    if size < 1:
        raise ValueError(f"size must be a positive number of texels, got {size}")
    if fill not in _FILLS:
        raise ValueError(f"fill must be one of {_FILLS}, got {fill!r}")
    if not 0.0 <= float(min_cos) < 1.0:
        raise ValueError(f"min_cos must lie in [0, 1), got {min_cos}")
    if not float(depth_tol) >= 0.0:
        raise ValueError(f"depth_tol must be >= 0 metres, got {depth_tol}")

    faces_j = jnp.asarray(faces_np, jnp.int32)
    uv_frags = rasterize_uv(uv_coords, uv_faces_np, size, size)  # validates uv_coords
    # Eager rasterisation sizes its own capacity (never truncated) and shares compiled code
    # with other eager renders of the same shapes.
    frags = rasterize(vertices, faces_j, camera, near=float(near))
    texture, weight = _fuse_views(
        images, masks, camera.K, camera.R, camera.t, vertices, faces_j, frags.face_id, frags.depth,
        uv_frags.face_id, uv_frags.bary, uv_frags.mask,
        jnp.float32(min_cos), jnp.float32(depth_tol), jnp.float32(near), jnp.asarray(fill == "mean"),
    )
    return texture, weight

"""Spherical-harmonics lighting, texture sampling and a Lambertian mesh renderer.

SH convention: real spherical harmonics of bands 0..2 (9 functions) of a unit direction
n = (x, y, z), in this order and with these signs (no Condon-Shortley phase; this equals
Y_lm^real = sqrt(2) (-1)^m Re/Im of the complex Y_l^|m| that includes the phase):

  index  name    function
  0      Y00     0.282095
  1      Y1-1    0.488603 y
  2      Y10     0.488603 z
  3      Y11     0.488603 x
  4      Y2-2    1.092548 x y
  5      Y2-1    1.092548 y z
  6      Y20     0.315392 (3 z^2 - 1)
  7      Y21     1.092548 x z
  8      Y22     0.546274 (x^2 - y^2)

Lighting: `sh_coeffs` [..., 9, 3] are the SH coefficients of the incident radiance per RGB
channel, L(w) = sum_k c_k Y_k(w), in world coordinates (y up, the head faces +z). The diffuse
reflected radiance of a Lambertian surface with albedo 1 is E(n) / pi, where the irradiance E is
computed with the Ramamoorthi-Hanrahan band factors A_0 = pi, A_1 = 2 pi / 3, A_2 = pi / 4
(exact for radiance limited to bands 0..2). So a white surface under uniform radiance L
(c_0 = L / 0.282095) returns L. Results are not clamped to be non-negative.

Texture convention (same as `rasterize_uv`): u right, v up; texel (row i, column j) of an
Ht x Wt texture has its centre at (u, v) = ((j + 0.5) / Wt, 1 - (i + 0.5) / Ht).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dhjax.geometry.mesh import vertex_normals
from dhjax.render.camera import Camera
from dhjax.render.raster import interpolate, rasterize
from dhjax.geometry.vectors import safe_normalize

# Full float32 matrix products (no TF32 on GPUs): projections must stay sub-pixel accurate.
_HI = jax.lax.Precision.HIGHEST

__all__ = ["SH_BAND_FACTORS", "sh_basis", "sh_irradiance", "sample_texture", "render_mesh"]

_C0 = 0.282095
_C1 = 0.488603
_C2 = 1.092548
_C3 = 0.315392
_C4 = 0.546274

# Lambertian band factors A_l / pi per coefficient (band 0: 1, band 1: 2/3, band 2: 1/4).
SH_BAND_FACTORS = (1.0,) + (2.0 / 3.0,) * 3 + (0.25,) * 5


def sh_basis(normals) -> jax.Array:
    """Real SH basis of bands 0..2 at unit directions (order and signs: module docstring).

    Args:
      normals: [..., 3] float unit vectors (not renormalised).
    Returns:
      [..., 9] float32.
    """
    n = jnp.asarray(normals, jnp.float32)
    if n.ndim < 1 or n.shape[-1] != 3:
        raise ValueError(f"normals must have shape [..., 3], got {n.shape}")
    x, y, z = n[..., 0], n[..., 1], n[..., 2]
    return jnp.stack(
        [
            jnp.full_like(x, _C0),
            _C1 * y,
            _C1 * z,
            _C1 * x,
            _C2 * x * y,
            _C2 * y * z,
            _C3 * (3.0 * z * z - 1.0),
            _C2 * x * z,
            _C4 * (x * x - y * y),
        ],
        -1,
    )


def sh_irradiance(normals, sh_coeffs) -> jax.Array:
    """Lambertian shading E(n) / pi under SH radiance (albedo-1 surface; see module docstring).

    Args:
      normals: [..., 3] unit normals (world space).
      sh_coeffs: [..., 9, 3] radiance SH coefficients per RGB channel; leading dims broadcast
        with those of normals.
    Returns:
      [..., 3] float32 reflected radiance of a white Lambertian surface.
    """
    sh_coeffs = jnp.asarray(sh_coeffs, jnp.float32)
    if sh_coeffs.ndim < 2 or sh_coeffs.shape[-2:] != (9, 3):
        raise ValueError(f"sh_coeffs must have shape [..., 9, 3], got {sh_coeffs.shape}")
    basis = sh_basis(normals) * jnp.asarray(SH_BAND_FACTORS, jnp.float32)
    return jnp.einsum("...k,...kc->...c", basis, sh_coeffs, precision=_HI)


def sample_texture(texture, uv) -> jax.Array:
    """Bilinear texture lookup with clamp-to-edge borders.

    Args:
      texture: [Ht, Wt, C] float texture.
      uv: [..., 2] texture coordinates (u right, v up; texel centres as in the module docstring).
    Returns:
      [..., C] float32, differentiable w.r.t. texture and uv (zero uv-gradient where clamped).
    """
    texture = jnp.asarray(texture, jnp.float32)
    uv = jnp.asarray(uv, jnp.float32)
    if texture.ndim != 3:
        raise ValueError(f"texture must have shape [Ht, Wt, C], got {texture.shape}")
    if uv.ndim < 1 or uv.shape[-1] != 2:
        raise ValueError(f"uv must have shape [..., 2], got {uv.shape}")
    Ht, Wt, _ = texture.shape
    x = jnp.clip(uv[..., 0] * Wt - 0.5, 0.0, Wt - 1.0)
    y = jnp.clip((1.0 - uv[..., 1]) * Ht - 0.5, 0.0, Ht - 1.0)
    x0f = jnp.floor(x)
    y0f = jnp.floor(y)
    fx = (x - x0f)[..., None]
    fy = (y - y0f)[..., None]
    x0 = x0f.astype(jnp.int32)
    y0 = y0f.astype(jnp.int32)
    x1 = jnp.minimum(x0 + 1, Wt - 1)
    y1 = jnp.minimum(y0 + 1, Ht - 1)
    top = texture[y0, x0] * (1.0 - fx) + texture[y0, x1] * fx
    bottom = texture[y1, x0] * (1.0 - fx) + texture[y1, x1] * fx
    return top * (1.0 - fy) + bottom * fy


def render_mesh(
    vertices,
    faces,
    camera: Camera,
    *,
    vertex_colors=None,
    uv_coords=None,
    uv_faces=None,
    albedo_texture=None,
    sh_coeffs=None,
    background=(0.0, 0.0, 0.0),
    tile_size: int = 8,
    capacity: int | None = None,
    near: float = 1e-3,
    cull_backfaces: bool = False,
) -> dict:
    """Rasterise and shade meshes: albedo (vertex colours or texture) times SH Lambertian light.

    Args:
      vertices: [B, V, 3] float32 world positions, metres (B = 1 broadcasts over a camera batch).
      faces: [F, 3] int32, counter-clockwise seen from outside (outward normals).
      camera: Camera with batch shape [B] or ().
      vertex_colors: [B, V, 3] or [V, 3] albedo per vertex, or None.
      uv_coords: [T, 2] texture coordinates; uv_faces: [F, 3] indices into uv_coords (same
        face order as `faces`); albedo_texture: [Ht, Wt, 3] or [B, Ht, Wt, 3]. Used when
        vertex_colors is None. With neither, the albedo is 1 (white).
      sh_coeffs: [B, 9, 3] or [9, 3] radiance SH (world space, see module docstring); None
        renders unlit albedo.
      background: [3] colour of empty pixels.
      tile_size, capacity, near, cull_backfaces: passed to `rasterize` (capacity is required
        under jit).
    Returns:
      dict with image [B, H, W, 3], mask [B, H, W, 1] float32, depth [B, H, W] camera z
      (0 where empty), normals [B, H, W, 3] unit world-space shading normals (0 where empty),
      fragments (Fragments). Differentiable w.r.t. albedo, SH and vertex positions (through
      interpolation; visibility is held fixed).
    """
    vertices = jnp.asarray(vertices, jnp.float32)
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must have shape [B, V, 3], got {vertices.shape}")
    frags = rasterize(
        vertices, faces, camera, tile_size=tile_size, capacity=capacity, near=near, cull_backfaces=cull_backfaces
    )
    B, H, W = frags.face_id.shape
    faces = jnp.asarray(faces, jnp.int32)
    normals = safe_normalize(interpolate(vertex_normals(vertices, faces), faces, frags))

    if vertex_colors is not None:
        vc = jnp.asarray(vertex_colors, jnp.float32)
        if vc.ndim not in (2, 3) or vc.shape[-1] != 3 or vc.shape[-2] != vertices.shape[1]:
            raise ValueError(
                f"vertex_colors must have shape [B, V, 3] or [V, 3] with V = {vertices.shape[1]}, got {vc.shape}"
            )
        albedo = interpolate(vc, faces, frags)
    elif albedo_texture is not None:
        if uv_coords is None or uv_faces is None:
            raise ValueError("albedo_texture needs uv_coords [T, 2] and uv_faces [F, 3]")
        uv_coords = jnp.asarray(uv_coords, jnp.float32)
        uv_faces = jnp.asarray(uv_faces)
        if uv_coords.ndim != 2 or uv_coords.shape[1] != 2:
            raise ValueError(f"uv_coords must have shape [T, 2], got {uv_coords.shape}")
        if uv_faces.shape != faces.shape:
            raise ValueError(f"uv_faces must have the shape of faces {faces.shape}, got {uv_faces.shape}")
        tex = jnp.asarray(albedo_texture, jnp.float32)
        if tex.ndim not in (3, 4) or tex.shape[-1] != 3:
            raise ValueError(f"albedo_texture must have shape [Ht, Wt, 3] or [B, Ht, Wt, 3], got {tex.shape}")
        pix_uv = interpolate(uv_coords, uv_faces, frags)  # [B, H, W, 2]
        if tex.ndim == 3:
            albedo = sample_texture(tex, pix_uv)
        else:
            if tex.shape[0] not in (1, B):
                raise ValueError(f"albedo_texture batch must be 1 or {B}, got {tex.shape[0]}")
            tex = jnp.broadcast_to(tex, (B,) + tex.shape[1:])
            albedo = jax.vmap(sample_texture)(tex, pix_uv)
    else:
        albedo = jnp.ones((B, H, W, 3), jnp.float32)

    if sh_coeffs is None:
        color = albedo
    else:
        sh = jnp.asarray(sh_coeffs, jnp.float32)
        if sh.ndim == 2:
            sh = sh[None]
        if sh.ndim != 3 or sh.shape[1:] != (9, 3) or sh.shape[0] not in (1, B):
            raise ValueError(f"sh_coeffs must have shape [B, 9, 3] or [9, 3] with B = {B}, got {sh.shape}")
        color = albedo * sh_irradiance(normals, sh[:, None, None])

    background = jnp.asarray(background, jnp.float32)
    if background.shape != (3,):
        raise ValueError(f"background must have shape [3], got {background.shape}")
    m = frags.mask[..., None]
    return dict(
        image=jnp.where(m, color, background),
        mask=m.astype(jnp.float32),
        depth=frags.depth,
        normals=normals,
        fragments=frags,
    )

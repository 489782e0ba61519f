"""UV-space maps of a head model: baking per-vertex data, position maps, procedural albedo.

Everything here lives in the head model's own UV layout (`model.uv_coords`, `model.uv_faces`;
texel (row i, column j) of an S x S map has its centre at (u, v) = ((j + 0.5) / S, 1 - (i + 0.5)
/ S), as in `dhjax.render.raster.rasterize_uv`). `uv_fields` rasterises the layout once per
model and map size and precomputes per-texel template data; the per-identity functions
(`position_map`, `expression_offset_map`, `albedo_texture`) are then pure jittable JAX.

The albedo is procedural, in display RGB in [0, 1]: a skin tone drawn along a continuous scale
from very light to very dark skin with a warm/cool undertone, low-frequency blotches, redness
on cheeks/nose/ears, freckles, pores, lips, eyebrows, eye colour (sclera, iris, pupil), stubble
and the scalp under the hair (`dhjax.data.hair` fields). It is a proxy with real variety, not a
model of real skin.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dhjax.data import hair as hair_lib
from dhjax.models.hair_region import head_centre  # noqa: F401  (textures.head_centre)
from dhjax.render import raster

# Skin tone anchors (display RGB albedo), light to dark; a tone t in [0, 1] interpolates them.
SKIN_ANCHORS = np.array([
    [0.96, 0.80, 0.70], [0.90, 0.70, 0.58], [0.80, 0.58, 0.44], [0.66, 0.45, 0.31],
    [0.47, 0.30, 0.19], [0.29, 0.18, 0.11], [0.18, 0.11, 0.07]], np.float32)
# Iris colours: dark brown, brown, hazel, green, blue, grey-blue, grey.
IRIS_COLOURS = np.array([
    [0.10, 0.05, 0.025], [0.24, 0.13, 0.06], [0.38, 0.30, 0.12], [0.25, 0.36, 0.20],
    [0.22, 0.38, 0.62], [0.38, 0.46, 0.55], [0.45, 0.46, 0.46]], np.float32)
IRIS_PROBS = np.array([0.35, 0.2, 0.1, 0.08, 0.15, 0.07, 0.05])
SCLERA = np.array([0.86, 0.84, 0.80], np.float32)
IRIS_COS = float(np.cos(np.deg2rad(32.0)))      # angular radius of the iris on the eyeball
PUPIL_COS = float(np.cos(np.deg2rad(13.0)))


@flax.struct.dataclass
class UVFields:
    """Per-texel data of a head model's UV layout at size S x S (template, rest pose).

    face_id [S, S] int32 (-1 outside the layout); bary [S, S, 3] barycentrics of that face;
    mask [S, S] bool; position [S, S, 3] template position (metres); phi, theta [S, S] head
    angles (`hair.head_angles`); regions {name: [S, S] float32 in [0, 1]} (the model's region
    masks, interpolated); eye_cos [S, S] cosine of the angle from the eyeball's front pole
    (-1 off the eyeballs); brow_dist [S, S] metres to the eyebrow line (landmarks 17..26).
    """

    face_id: jax.Array
    bary: jax.Array
    mask: jax.Array
    position: jax.Array
    phi: jax.Array
    theta: jax.Array
    regions: dict
    eye_cos: jax.Array
    brow_dist: jax.Array

    @property
    def size(self) -> int:
        """The UV map's side in texels."""
        return int(self.face_id.shape[0])


def bake(fields: UVFields, faces, attrs) -> jax.Array:
    """Per-vertex attributes -> UV map (`dhjax.render.raster.bake_uv` on the fields' texels).

    Args:
      fields: UVFields; faces: [F, 3] int mesh faces (same face order as the model's uv_faces);
      attrs: [V, C] or [B, V, C].
    Returns:
      [S, S, C] or [B, S, S, C] float32, 0 outside the layout.
    """
    return raster.bake_uv(attrs, faces, fields.face_id, fields.bary, fields.mask)


def _brow_distance(points, model_template, faces, lmk_faces, lmk_bary):
    """Distance [N] (metres) of points [N, 3] to the two brow polylines (iBUG 17-21, 22-26)."""
    tri = model_template[faces[lmk_faces]]
    lmk = np.einsum("lkc,lk->lc", tri, lmk_bary)
    segs = [(lmk[i], lmk[i + 1]) for i in list(range(17, 21)) + list(range(22, 26))]
    a = np.stack([s[0] for s in segs])
    b = np.stack([s[1] for s in segs])
    ab = b - a
    t = np.clip(np.einsum("nsc,sc->ns", points[:, None] - a[None], ab) / np.sum(ab * ab, -1), 0, 1)
    closest = a[None] + t[..., None] * ab[None]
    return np.min(np.linalg.norm(points[:, None] - closest, axis=-1), axis=1)


def uv_fields(model, size: int) -> UVFields:
    """Rasterises the model's UV layout at size x size and precomputes per-texel data.

    Needs a model with uv_coords/uv_faces, region masks and a 68-point landmark embedding (the
    embedded default head). Host-side, once per model and size.
    """
    if model.uv_coords is None or model.uv_faces is None:
        raise ValueError(f"model {model.name!r} has no UV layout")
    if model.lmk_faces is None or model.lmk_faces.shape[0] != 68:
        raise ValueError(f"model {model.name!r} needs the 68-point landmark embedding (eyebrows)")
    frags = raster.rasterize_uv(model.uv_coords, model.uv_faces, size, size)
    face_id = np.asarray(frags.face_id[0])
    bary = np.asarray(frags.bary[0])
    mask = face_id >= 0
    template = np.asarray(model.v_template, np.float64)
    faces = np.asarray(model.faces)
    partial = UVFields(face_id=jnp.asarray(face_id), bary=jnp.asarray(bary), mask=jnp.asarray(mask),
                       position=None, phi=None, theta=None, regions=None, eye_cos=None, brow_dist=None)
    position = np.asarray(bake(partial, faces, template))
    phi, theta = hair_lib.head_angles(position, head_centre(model))
    names = sorted(model.regions)
    reg = np.stack([np.asarray(model.regions[k], np.float32) for k in names], -1)
    reg_maps = np.asarray(bake(partial, faces, reg))
    # Eyeballs: direction from the eye joint (rest) to each eyeball vertex.
    joints = np.asarray(model.j_regressor, np.float64) @ template
    w = np.asarray(model.lbs_weights, np.float64)
    centre = w[:, 3:4] * joints[3] + w[:, 4:5] * joints[4]
    on_eye = (w[:, 3] + w[:, 4]) > 0.5
    d = np.where(on_eye[:, None], template - centre, 0.0)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    dirs = np.asarray(bake(partial, faces, d))
    eye_map = np.asarray(bake(partial, faces, on_eye[:, None].astype(np.float32)))[..., 0]
    cosang = dirs[..., 2] / np.maximum(np.linalg.norm(dirs, axis=-1), 1e-9)
    eye_cos = np.where(eye_map > 0.5, cosang, -1.0)
    flat = position.reshape(-1, 3)
    brow = _brow_distance(flat, template, faces, np.asarray(model.lmk_faces),
                          np.asarray(model.lmk_bary, np.float64)).reshape(size, size)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return UVFields(face_id=jnp.asarray(face_id, jnp.int32), bary=f32(bary), mask=jnp.asarray(mask),
                    position=f32(position), phi=f32(phi), theta=f32(theta),
                    regions={k: f32(reg_maps[..., i]) for i, k in enumerate(names)},
                    eye_cos=f32(eye_cos), brow_dist=f32(np.where(mask, brow, 1.0)))


def position_map(model, fields: UVFields, shape) -> jax.Array:
    """Neutral position map: template + shape blendshapes (no expression, rest pose).

    Args:
      model: FlameModel; fields: UVFields of the model; shape: [S'] coefficients (S' <= S).
    Returns:
      [S, S, 3] float32 metres (model coordinates), 0 outside the layout.
    """
    shape = jnp.asarray(shape, jnp.float32)
    dirs = model.shapedirs[: shape.shape[0]]
    verts = model.v_template + jnp.einsum("k,kvc->vc", shape, dirs, precision=jax.lax.Precision.HIGHEST)
    return bake(fields, model.faces, verts)


def expression_offset_map(model, fields: UVFields, expression) -> jax.Array:
    """Expression-offset map: the displacement of the expression blendshapes (rest pose).

    Blendshapes are linear, so this is v(shape, expression) - v(shape, 0) for every shape.

    Args:
      model: FlameModel; fields: UVFields; expression: [E'] coefficients (E' <= E).
    Returns:
      [S, S, 3] float32 metres, 0 outside the layout.
    """
    expression = jnp.asarray(expression, jnp.float32)
    dirs = model.exprdirs[: expression.shape[0]]
    offsets = jnp.einsum("k,kvc->vc", expression, dirs, precision=jax.lax.Precision.HIGHEST)
    return bake(fields, model.faces, offsets)


def sample_skin(key) -> dict:
    """Random skin, lip, eyebrow and eye appearance (scalars and colours as jnp arrays).

    Returns: tone (0 light .. 1 dark, uniform over the scale), colour [3], redness, blotch,
    freckles (density 0..0.15), pores, lip_colour [3], brow_thickness (metres), brow_density,
    brow_darkness, iris [3].
    """
    u = hair_lib.draws(key, 16)
    lerp = lambda i, lo, hi: lo + (hi - lo) * u[i]
    tone = u[0]
    anchors = jnp.asarray(SKIN_ANCHORS)
    x = tone * (len(SKIN_ANCHORS) - 1)
    i0 = jnp.clip(jnp.floor(x).astype(jnp.int32), 0, len(SKIN_ANCHORS) - 2)
    f = x - i0
    colour = anchors[i0] * (1 - f) + anchors[i0 + 1] * f
    undertone = lerp(1, -1.0, 1.0)                               # -1 cool/pink .. +1 warm/olive
    colour = colour * (1.0 + 0.05 * undertone * jnp.array([-0.3, 0.5, -1.0]))
    colour = colour * lerp(2, 0.94, 1.06)
    freckle_on = u[3] < 0.25 * (1.2 - tone)
    lip_tint = jnp.array([0.92, 0.62, 0.62]) * (1 - 0.4 * tone) + jnp.array([0.85, 0.72, 0.72]) * 0.4 * tone
    lip_colour = colour * lip_tint * lerp(4, 0.8, 1.0)
    iris = jnp.asarray(IRIS_COLOURS)[hair_lib.choice(u[5], IRIS_PROBS)] * lerp(6, 0.8, 1.2)
    return dict(
        tone=tone, colour=jnp.clip(colour, 0.0, 1.0).astype(jnp.float32),
        redness=u[7], blotch=lerp(8, 0.01, 0.05),
        freckles=jnp.where(freckle_on, lerp(9, 0.03, 0.15), 0.0),
        pores=lerp(10, 0.01, 0.03), lip_colour=jnp.clip(lip_colour, 0, 1).astype(jnp.float32),
        brow_thickness=lerp(11, 0.0025, 0.0055), brow_density=lerp(12, 0.55, 0.95),
        brow_darkness=lerp(13, 0.6, 1.0), iris=jnp.clip(iris, 0, 1).astype(jnp.float32),
    )


def _noise3(key, points, wavelengths):
    """Smooth random fields of ~unit variance on 3D points [..., 3], one per (lo, hi) band.

    Each field is a sum of n plane waves with random directions, log-uniform wavelengths in
    [lo, hi] and random phases; all fields come from one PRNG call. Returns [..., len(bands)].
    """
    n = 12
    K = len(wavelengths)
    r = jax.random.normal(key, (K, n, 5))
    dirs = r[..., :3] / jnp.linalg.norm(r[..., :3], axis=-1, keepdims=True)
    u = jax.scipy.special.ndtr(r[..., 3:])                        # uniform from normal draws
    lo = jnp.log(jnp.asarray([w[0] for w in wavelengths]))[:, None]
    hi = jnp.log(jnp.asarray([w[1] for w in wavelengths]))[:, None]
    wl = jnp.exp(lo + (hi - lo) * u[..., 0])
    phase = 2 * np.pi * u[..., 1]
    arg = 2 * np.pi * jnp.einsum("...c,knc->...kn", points, dirs) / wl + phase
    return jnp.sum(jnp.sin(arg), -1) * np.sqrt(2.0 / n)


def _blur3(x):
    """3x3 box blur of [H, W] (edges replicated)."""
    p = jnp.pad(x, 1, mode="edge")
    H, W = x.shape
    return sum(p[i:i + H, j:j + W] for i in range(3) for j in range(3)) / 9.0


def _gauss(phi, theta, phi0, theta0, sp, st):
    dphi = hair_lib.wrap_angle(phi - phi0)
    return jnp.exp(-0.5 * ((dphi / sp) ** 2 + ((theta - theta0) / st) ** 2))


def albedo_texture(key, fields: UVFields, skin: dict, hair: dict, beard: dict) -> jax.Array:
    """Procedural albedo in the model's UV layout.

    Args:
      key: PRNG key (pores, freckles, stubble, blotches); fields: UVFields;
      skin: `sample_skin` dict; hair: `hair.sample_hair` dict; beard: `hair.sample_beard` dict.
    Returns:
      [S, S, 3] float32 display RGB in [0, 1] (texels outside the layout hold the skin colour,
      so bilinear lookups at seams do not bleed).
    """
    k_noise, k_uniform = jax.random.split(key)
    S = fields.size
    rnd = jax.random.uniform(k_uniform, (S, S, 3))                # freckles, pores, stubble
    noise = _noise3(k_noise, fields.position, ((0.015, 0.08), (0.02, 0.06), (0.004, 0.015)))
    p, phi, theta = fields.position, fields.phi, fields.theta
    reg = fields.regions
    base = jnp.broadcast_to(skin["colour"], (S, S, 3))
    # Optimisation barriers cut the texture into a few kernels: one fused kernel of everything
    # takes XLA:CPU several times longer to compile.
    noise = jax.lax.optimization_barrier(noise)
    lum, red, fine = noise[..., 0], noise[..., 1], noise[..., 2]
    col = base * (1.0 + skin["blotch"] * lum[..., None]) * (
        1.0 + 0.5 * skin["blotch"] * red[..., None] * jnp.array([1.0, -0.5, -0.5]))
    flush = (sum(_gauss(phi, theta, s * 0.62, 0.53, 0.28, 0.05) for s in (-1, 1))
             + 0.8 * _gauss(phi, theta, 0.0, 0.53, 0.12, 0.05) + 0.5 * reg["ears"])
    col = col * (1.0 + 0.12 * skin["redness"] * (1 - skin["tone"]) * flush[..., None] *
                 jnp.array([0.3, -0.6, -0.5]))
    under_eye = sum(_gauss(phi, theta, s * 0.37, 0.46, 0.22, 0.02) for s in (-1, 1))
    col = col * (1.0 - 0.08 * under_eye[..., None])
    # Freckles: sparse specks over cheeks and nose, softened.
    freckle_zone = sum(_gauss(phi, theta, s * 0.45, 0.5, 0.35, 0.07) for s in (-1, 1)) + \
        _gauss(phi, theta, 0.0, 0.5, 0.15, 0.06)
    specks = (rnd[..., 0] < skin["freckles"] * jnp.clip(freckle_zone, 0, 1))
    specks = jnp.clip(_blur3(specks.astype(jnp.float32)) * 2.0, 0.0, 1.0)
    col = col * (1.0 - 0.2 * specks[..., None] * jnp.array([0.8, 1.0, 1.2]))
    col = col * (1.0 + 3.4 * skin["pores"] * (rnd[..., 1:2] - 0.5))
    col = jax.lax.optimization_barrier(col)
    # Lips.
    lips = jnp.clip(reg["lips"] * 1.4, 0.0, 1.0)[..., None]
    col = col * (1 - lips) + skin["lip_colour"] * (1.0 + 0.5 * skin["pores"] * lum[..., None]) * lips
    # Eyebrows: thicker at the inner end, with strands.
    strands = 0.75 + 0.25 * jnp.sin(2 * np.pi * (p[..., 0] * 900.0 + p[..., 1] * 350.0))
    inner = _smoothstep_j((0.35 - jnp.abs(phi)) / 0.25)
    thick = skin["brow_thickness"] * (0.8 + 0.5 * inner)
    brow = _smoothstep_j((thick - fields.brow_dist) / 0.0015) * skin["brow_density"] * strands
    brow = brow * (reg["eyes"] < 0.5)
    brow_col = hair["colour"] * (1.0 - 0.5 * skin["brow_darkness"]) + 0.02
    col = col * (1 - brow[..., None]) + brow_col * brow[..., None]
    # Stubble and the skin under a beard.
    beard_area = hair_lib.beard_weight(phi, theta, beard, style_override=4)
    dots = rnd[..., 2] < 0.5
    stub = beard_area * beard["stubble"] * (0.55 + 0.45 * dots)
    col = col * (1 - stub[..., None]) + beard["colour"] * stub[..., None]
    shell_beard = hair_lib.beard_weight(phi, theta, beard) * (beard["length"] > 0)
    col = col * (1 - shell_beard[..., None]) + beard["colour"] * shell_beard[..., None]
    col = jax.lax.optimization_barrier(col)
    # Scalp under the hair (buzz cuts are this texture only).
    hw = hair_lib.hair_weight(phi, theta, hair) * hair["cover"]
    hair_tex = hair["colour"] * (0.85 + 0.15 * fine[..., None])
    col = col * (1 - hw[..., None]) + hair_tex * hw[..., None]
    # Eyes: sclera, iris (with a darker limbal ring and radial streaks), pupil.
    c = fields.eye_cos
    on_eye = (c > -0.99)[..., None]
    ang = jnp.arccos(jnp.clip(c, -1.0, 1.0))
    iris_t = _smoothstep_j((c - IRIS_COS) / 0.02)
    limbal = jnp.exp(-(((ang - np.arccos(IRIS_COS)) / 0.05) ** 2))
    streak = 1.0 + 0.25 * jnp.sin(40.0 * jnp.arctan2(p[..., 1], p[..., 0]))
    iris = skin["iris"] * streak[..., None] * (1.0 - 0.5 * limbal[..., None])
    pupil = _smoothstep_j((c - PUPIL_COS) / 0.004)
    sclera = jnp.asarray(SCLERA) * (1.0 - 0.15 * _smoothstep_j((0.2 - c) / 0.6))[..., None]
    eye = sclera * (1 - iris_t[..., None]) + iris * iris_t[..., None]
    eye = eye * (1 - pupil[..., None]) + 0.02 * pupil[..., None]
    col = jnp.where(on_eye, jax.lax.optimization_barrier(eye), col)
    col = jnp.where(fields.mask[..., None], col, skin["colour"])
    return jnp.clip(col, 0.0, 1.0).astype(jnp.float32)


def _smoothstep_j(x):
    x = jnp.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)

"""Procedural garments over the body: shirts, jackets, trousers and skirts with thickness and
looseness, skinned so that they do not follow the body rigidly.

A garment is built once per (body, style) on the rest (T-pose, mean shape) body of
`dhjax.models.body` and is posed with the body's joint transforms:

* Shirts, jackets and trousers are offset layers: the body faces of the garment's region
  (torso + sleeves; pelvis + legs), pushed out along the body normals by a looseness field
  (tight at the collar, shoulders and waistband, loose towards hems and cuffs), smoothed, and
  closed into a shell of the given thickness (outer and inner surfaces stitched at the rims),
  so cuffs and hems show their thickness.
* Skirts are their own surface: a flared tube from the waist down to the hem, not a copy of the
  legs, so one garment spans the gap between the legs.

Skinning is what makes cages necessary (D3GA's point): garment vertices take the body weights
of their source vertex (skirts: of the closest waist vertex) DIFFUSED over the garment, which
blurs the transitions between bones (cloth does not crease at each joint), and a skirt's
weights move from the pelvis at the waist to the mean of both hips at the hem, so it swings
with the legs' average and never follows one leg. Posed garments then get, in order: secondary
motion (the hem lags behind the pelvis's acceleration, a damped response evaluated from the
pose trajectory, so every frame stays a pure function of its time), and collision handling
(every vertex within `margin` of the posed body, or inside it, is pushed out along the body
normal at its closest point, `dhjax.ops.closest_point`).

Everything is deterministic; there is no simulation state. Units: metres.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.geometry import lbs as lbs_lib

UPPER_KINDS = ("shirt", "jacket")
LOWER_KINDS = ("trousers", "skirt")
LAYERS = ("body", "upper", "lower")            # layer labels of the segmentation (1, 2, 3; 0 = background)


@dataclasses.dataclass(frozen=True)
class Garment:
    """A garment mesh on the rest body (numpy; static per style).

    vertices [G, 3] rest positions (mean shape); faces [Fg, 3] int32; weights [G, J] skinning
    weights (rows sum to 1); shapedirs [G, 3, S] blendshapes (those of the source body vertex,
    so the garment follows the body's shape); hem [G] in [0, 1] (how much secondary motion a
    vertex gets: 0 at waistbands and collars, 1 at free hems); rest_coords [G, 3] rest-space
    positions for procedural patterns; outer [G] bool (outer surface vs inner/rim);
    n_outer_faces: faces[:n_outer_faces] are the outer surface (then inner, then rims);
    kind ("shirt" | "jacket" | "trousers" | "skirt") and layer ("upper" | "lower").
    """

    vertices: np.ndarray
    faces: np.ndarray
    weights: np.ndarray
    shapedirs: np.ndarray
    hem: np.ndarray
    rest_coords: np.ndarray
    outer: np.ndarray
    n_outer_faces: int
    kind: str
    layer: str


def _edges(faces):
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    return np.unique(np.sort(e, axis=1), axis=0)


def _umbrella(x, edges, n):
    acc = np.zeros((n,) + x.shape[1:])
    np.add.at(acc, edges[:, 0], x[edges[:, 1]])
    np.add.at(acc, edges[:, 1], x[edges[:, 0]])
    deg = np.bincount(edges.ravel(), minlength=n).astype(np.float64)
    return acc / np.maximum(deg, 1).reshape((-1,) + (1,) * (x.ndim - 1))


def vertex_normals_np(v, f):
    """[V, 3] area-weighted unit vertex normals of a triangle mesh (numpy)."""
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    n = np.zeros_like(v, dtype=np.float64)
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def _boundary_edges(faces):
    """Directed boundary edges (each appears in one face only), as [E, 2] in face order."""
    d = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    key = np.sort(d, axis=1)
    _, inv, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    return d[counts[inv.ravel()] == 1]


def _shell(outer_v, inner_v, faces):
    """A closed shell from an open surface's outer and inner copies: vertices [2G, 3], faces
    (outer as given, inner reversed, and two triangles per boundary edge joining them)."""
    G = outer_v.shape[0]
    b = _boundary_edges(faces)
    rim = np.concatenate([np.stack([b[:, 1], b[:, 0], b[:, 0] + G], 1),
                          np.stack([b[:, 1], b[:, 0] + G, b[:, 1] + G], 1)])
    return np.concatenate([outer_v, inner_v]), np.concatenate([faces, faces[:, ::-1] + G, rim])


def _submesh(faces, keep_faces):
    f = faces[keep_faces]
    used, inv = np.unique(f, return_inverse=True)
    return used, inv.reshape(-1, 3)


def _clean_region(faces, face_in, n_vertices, rounds=2):
    """Face selection with jagged single faces removed: drop faces with <= 1 selected neighbour
    and add faces with >= 2 (a one-face-wide fringe looks like noise at the rim)."""
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    key = np.sort(e, axis=1)
    _, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.ravel()
    F = faces.shape[0]
    owner = np.tile(np.arange(F), 3)
    order = np.argsort(inv, kind="stable")
    pair = owner[order].reshape(-1, 2)              # closed mesh: every edge has two faces
    nb = np.full((F, 3), -1)
    slot = np.zeros(F, int)
    for a, b in pair:
        nb[a, slot[a]] = b
        slot[a] += 1
        nb[b, slot[b]] = a
        slot[b] += 1
    sel = face_in.copy()
    for _ in range(rounds):
        count = sel[nb].sum(1)
        sel = count >= 2
    return sel


def _region(arrays, kind, params):
    """Body faces covered by a garment (rest pose), and a [V] hem factor."""
    from dhjax.models import body_default as bd

    v, f = arrays["v_template"].astype(np.float64), arrays["faces"]
    part = np.asarray(arrays["part_labels"])
    P = {n: i for i, n in enumerate(bd.PART_NAMES)}
    c = v[f].mean(1)
    fpart = part[f[:, 0]]
    x, y = np.abs(c[:, 0]), c[:, 1]
    if kind in UPPER_KINDS:
        hem_y = params["hem_y"]
        # Torso, and the tops of the thighs above the hem (the leg labels reach the hip line).
        torso = np.isin(fpart, [P["torso"], P["left_leg"], P["right_leg"]]) & (y > hem_y) & (y < params["collar_y"])
        arm = np.isin(fpart, [P["left_arm"], P["right_arm"], P["torso"]]) & (x > 0.12) & (x < params["sleeve_x"]) & (y > 0.3)
        sel = torso | arm
        vy, vx = v[:, 1], np.abs(v[:, 0])
        hem = np.maximum(np.clip((params["hem_y"] + 0.25 - vy) / 0.25, 0, 1) * (vx < 0.2),
                         np.clip((vx - 0.25) / max(params["sleeve_x"] - 0.25, 1e-3), 0, 1))
    else:
        legs = [P["left_leg"], P["right_leg"], P["torso"]]
        sel = np.isin(fpart, legs) & (y < params["waist_y"]) & (y > params["hem_y"])
        hem = np.clip((params["waist_y"] - v[:, 1]) / max(params["waist_y"] - params["hem_y"], 1e-3), 0, 1)
    return _clean_region(f, sel, v.shape[0]), hem


def _diffuse_weights(w, faces, iters):
    edges = _edges(faces)
    n = w.shape[0]
    for _ in range(iters):
        w = 0.5 * w + 0.5 * _umbrella(w, edges, n)
    return w / w.sum(1, keepdims=True)


def _offset_garment(arrays, kind, params) -> Garment:
    v = arrays["v_template"].astype(np.float64)
    f = np.asarray(arrays["faces"])
    sel, hem_v = _region(arrays, kind, params)
    used, gf = _submesh(f, sel)
    n = vertex_normals_np(v, f)[used]
    base = v[used]
    hem = hem_v[used]
    # Looseness: tight at the collar/waistband (hem factor 0), loose at free hems.
    loose = params["looseness"] * (0.35 + 0.65 * hem)
    outer = base + n * (loose + params["thickness"])[:, None]
    edges = _edges(gf)
    rim = np.zeros(len(used), bool)
    rim[np.unique(_boundary_edges(gf))] = True
    for _ in range(8):             # smooth the offset surface (offsets cross in concave places)
        sm = _umbrella(outer, edges, len(used))
        outer = np.where(rim[:, None], outer, 0.5 * outer + 0.5 * sm)
    inner = outer - n * params["thickness"]
    verts, faces = _shell(outer, inner, gf)
    G = len(used)
    w = _diffuse_weights(np.asarray(arrays["lbs_weights"], np.float64)[used], gf, params["weight_smoothing"])
    sd = np.asarray(arrays["shapedirs"])[used]
    return Garment(vertices=verts.astype(np.float32), faces=faces.astype(np.int32),
                   weights=np.concatenate([w, w]).astype(np.float32),
                   shapedirs=np.concatenate([sd, sd]).astype(np.float32),
                   hem=np.concatenate([hem, hem]).astype(np.float32),
                   rest_coords=np.concatenate([base, base]).astype(np.float32),
                   outer=np.concatenate([np.ones(G, bool), np.zeros(G, bool)]),
                   n_outer_faces=int(gf.shape[0]), kind=kind,
                   layer="upper" if kind in UPPER_KINDS else "lower")


def _skirt(arrays, params) -> Garment:
    from dhjax.models import body_default as bd

    v = arrays["v_template"].astype(np.float64)
    w_body = np.asarray(arrays["lbs_weights"], np.float64)
    waist_y, hem_y = params["waist_y"], params["hem_y"]
    # Waist ellipse from the body's cross-section there, plus looseness.
    slab = np.abs(v[:, 1] - waist_y) < 0.015
    rx = np.abs(v[slab, 0]).max() + params["looseness"] * 0.3
    zc = 0.5 * (v[slab, 2].max() + v[slab, 2].min())
    rz = 0.5 * (v[slab, 2].max() - v[slab, 2].min()) + params["looseness"] * 0.3
    n_rings, n_seg = 36, 96
    s = np.linspace(0.0, 1.0, n_rings)                                   # 0 waist .. 1 hem
    flare = params["flare"]
    ax = rx + s * flare
    az = rz + s * flare * 0.8
    ys = waist_y + s * (hem_y - waist_y)
    ang = 2 * np.pi * np.arange(n_seg) / n_seg
    pos = np.stack([np.sin(ang)[None] * ax[:, None], np.broadcast_to(ys[:, None], (n_rings, n_seg)),
                    zc + np.cos(ang)[None] * az[:, None]], -1).reshape(-1, 3)
    idx = np.arange(n_rings * n_seg).reshape(n_rings, n_seg)
    a, b = idx[:-1], np.roll(idx[:-1], -1, axis=1)
    c, d = idx[1:], np.roll(idx[1:], -1, axis=1)
    faces = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    # Outward normals of the tube (radial in x/z).
    nrm = pos.copy()
    nrm[:, 1] = 0
    nrm[:, 2] -= zc
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    inner = pos - nrm * params["thickness"]
    verts, sfaces = _shell(pos, inner, faces)
    # Weights: the waist vertex's body weights at the top, blending to the mean of both hips.
    waist_idx = np.argmin(((v[None, slab] - pos[:, None]) ** 2).sum(-1), axis=1)
    w_waist = w_body[slab][waist_idx]
    hips = np.zeros_like(w_waist)
    hips[:, bd.J["left_hip"]] = hips[:, bd.J["right_hip"]] = 0.5
    t = np.repeat(s, n_seg)[:, None] * params["hip_share"]
    w = (1 - t) * w_waist + t * hips
    w = _diffuse_weights(w, faces, params["weight_smoothing"])
    sd = np.asarray(arrays["shapedirs"])[slab][waist_idx]
    hem = np.repeat(s, n_seg)
    G = pos.shape[0]
    return Garment(vertices=verts.astype(np.float32), faces=sfaces.astype(np.int32),
                   weights=np.concatenate([w, w]).astype(np.float32),
                   shapedirs=np.concatenate([sd, sd]).astype(np.float32),
                   hem=np.concatenate([hem, hem]).astype(np.float32),
                   rest_coords=np.concatenate([pos, pos]).astype(np.float32),
                   outer=np.concatenate([np.ones(G, bool), np.zeros(G, bool)]),
                   n_outer_faces=int(faces.shape[0]), kind="skirt", layer="lower")


DEFAULTS = {
    "shirt": dict(hem_y=-0.12, collar_y=0.45, sleeve_x=0.34, looseness=0.012, thickness=0.004,
                  weight_smoothing=30),
    "jacket": dict(hem_y=-0.13, collar_y=0.47, sleeve_x=0.64, looseness=0.025, thickness=0.008,
                   weight_smoothing=40),
    "trousers": dict(waist_y=0.03, hem_y=-0.84, looseness=0.008, thickness=0.004, weight_smoothing=20),
    "skirt": dict(waist_y=0.04, hem_y=-0.5, looseness=0.01, thickness=0.004, flare=0.12, hip_share=0.7,
                  weight_smoothing=10),
}


def make_garment(arrays, kind: str, **overrides) -> Garment:
    """A garment on the rest body.

    Args:
      arrays: the body's arrays (`dhjax.models.body_default.build_default_body_arrays()` or
        `body.official_arrays(model)` + part_labels): v_template, faces, lbs_weights,
        shapedirs, part_labels.
      kind: "shirt", "jacket", "trousers" or "skirt".
      overrides: any of DEFAULTS[kind] (metres: hem_y / collar_y / waist_y heights, sleeve_x
        half-span of the sleeves, looseness, thickness, flare; weight_smoothing diffusion
        steps; hip_share of the skirt hem's weight given to the hips).
    """
    if kind not in DEFAULTS:
        raise ValueError(f"unknown garment kind {kind!r}; choose from {tuple(DEFAULTS)}")
    unknown = set(overrides) - set(DEFAULTS[kind])
    if unknown:
        raise ValueError(f"unknown {kind} parameters {sorted(unknown)}; known: {sorted(DEFAULTS[kind])}")
    params = {**DEFAULTS[kind], **overrides}
    for k in ("looseness", "thickness"):
        if not params[k] > 0:
            raise ValueError(f"{kind}: {k} must be positive, got {params[k]}")
    for k in ("part_labels", "v_template", "faces", "lbs_weights", "shapedirs"):
        if arrays.get(k) is None:
            raise ValueError(f"garments need the body's {k!r}")
    return _skirt(arrays, params) if kind == "skirt" else _offset_garment(arrays, kind, params)


# ----------------------------------------------------------------------------------------------
# Posing.


def skin_points(points, weights, rel):
    """Linear blend skinning of points with given joint transforms.

    Args:
      points: [B, N, 3] rest points (metres); weights: [N, J]; rel: [B, J, 4, 4] the
        transforms of `dhjax.geometry.lbs.batch_rigid_transform` (rest -> posed).
    Returns:
      [B, N, 3] posed points.
    """
    tf = jnp.einsum("nj,bjrc->bnrc", weights, rel[..., :3, :], precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("bnrc,bnc->bnr", tf[..., :3], points, precision=jax.lax.Precision.HIGHEST) + tf[..., 3]


def joint_transforms(body_model, v_shaped, rot_mats):
    """[B, J, 4, 4] rest -> posed joint transforms of the body (no translation).

    v_shaped: [B, V, 3] shaped template; rot_mats: [B, J, 3, 3] local rotations.
    """
    joints = jnp.einsum("jv,bvc->bjc", body_model.j_regressor, v_shaped, precision=jax.lax.Precision.HIGHEST)
    return lbs_lib.batch_rigid_transform(rot_mats, joints, body_model.parents)[1]


def push_out(points, body_vertices, body_faces, margin):
    """Moves points that are inside a closed surface or within `margin` of it to `margin`
    outside, along the surface normal at their closest point.

    points [N, 3], body_vertices [V, 3], body_faces [F, 3] (outward oriented); margin: scalar
    or [N] (metres). Returns [N, 3].
    """
    from dhjax.ops import closest_point

    res = closest_point(body_vertices, body_faces, points)
    tri = body_vertices[body_faces[res.face]]
    n = jnp.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n = n / jnp.maximum(jnp.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    s = jnp.sum((points - res.point) * n, -1)
    margin = jnp.broadcast_to(jnp.asarray(margin, points.dtype), s.shape)
    return jnp.where((s < margin)[:, None], res.point + n * margin[:, None], points)


def pose_garment(garment: Garment, betas, rel, translation, collider_vertices, collider_faces, *,
                 sway=None, margin: float = 0.003, drape_steps: int = 6):
    """Poses one garment with its body.

    Args:
      garment: a Garment; betas: [S'] body shape coefficients; rel: [J, 4, 4] the body's
        rest -> posed joint transforms (`joint_transforms`); translation: [3];
      collider_vertices [V, 3] + collider_faces [F, 3]: what the garment must stay outside of
        (the posed body, plus the outer surface of the lower garment for an upper one);
      sway: [3] world-space secondary-motion offset of a free hem (scaled by hem factor^2), or
        None; margin: clearance of the inner surface (the outer one keeps the thickness);
      drape_steps: how far (in edges) a collision push spreads to the neighbours (each vertex
        keeps the larger of its own push and its neighbours' mean push).
    Returns:
      [G, 3] posed garment vertices (metres).
    """
    S = garment.shapedirs.shape[-1]
    betas = jnp.asarray(betas, jnp.float32)
    b = jnp.zeros(S).at[:min(S, betas.shape[0])].set(betas[:S])
    rest = jnp.asarray(garment.vertices) + jnp.einsum("gck,k->gc", jnp.asarray(garment.shapedirs), b)
    posed = skin_points(rest[None], jnp.asarray(garment.weights), rel[None])[0] + translation
    if sway is not None:
        posed = posed + jnp.asarray(garment.hem)[:, None] ** 2 * sway
    half = int(garment.outer.sum())
    thickness = np.linalg.norm(garment.vertices[:half] - garment.vertices[half:], axis=-1)
    clearance = margin + jnp.asarray(np.concatenate([thickness, np.zeros_like(thickness)]))
    pushed = push_out(posed, collider_vertices, collider_faces, clearance)
    # Drape: spread each push over the neighbourhood (cloth around a knee moves as a piece, not
    # as single vertices), then push once more so no vertex stays inside.
    e = jnp.asarray(_edges(garment.faces))
    deg = jnp.asarray(np.maximum(np.bincount(np.asarray(e).ravel(), minlength=posed.shape[0]), 1), jnp.float32)
    delta = pushed - posed
    for _ in range(drape_steps):
        nb = jnp.zeros_like(delta).at[e[:, 0]].add(delta[e[:, 1]]).at[e[:, 1]].add(delta[e[:, 0]])
        mean = nb / deg[:, None]
        keep = jnp.linalg.norm(delta, axis=-1, keepdims=True) >= jnp.linalg.norm(mean, axis=-1, keepdims=True)
        delta = jnp.where(keep, delta, mean)
    return push_out(posed + delta, collider_vertices, collider_faces, clearance)

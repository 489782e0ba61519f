"""Per-part tetrahedral cages of a clothed body (D3GA's layers) and a picture of them.

    cages = body_cages.build_cages(arrays, {"upper": shirt, "lower": skirt})
    cages["body"].mesh, cages["body"].weights, cages["body"].stats

The body gets a SOLID cage of its rest (T-pose, mean shape) surface, inflated by `body_margin`
so the convex limbs stay inside the piecewise-linear boundary (`tetra.solid_cage`); every
garment gets a HOLLOW cage of all points within `shell_radius` of its outer surface
(`tetra.shell_cage`). Cage nodes take the skinning weights of their closest template vertex
(`tetra.skin_nodes`): the body's for the body cage, the garment's own (diffused) weights for a
garment cage, so a garment cage moves as its garment does. Units: metres.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dhjax.geometry import tetra


@dataclasses.dataclass(frozen=True)
class PartCage:
    """mesh: tetra.TetMesh (rest nodes [N, 3], tets [M, 4]); weights [N, J] node skinning
    weights; stats: tetra.cage_stats (+ build_s)."""

    mesh: tetra.TetMesh
    weights: np.ndarray
    stats: dict


def default_body_margin(spacing: float, limb_radius: float = 0.035, alpha: float = tetra.ALPHA) -> float:
    """Inflation that keeps a convex surface of curvature radius `limb_radius` inside a solid
    cage of this lattice spacing: 3 (1/2 + alpha)^2 h^2 / (2 rho) (see `tetra.solid_cage`)."""
    return 3.0 * (0.5 + alpha) ** 2 * spacing ** 2 / (2.0 * limb_radius)


def build_cages(arrays, garments: dict | None = None, *, body_spacing: float = 0.025,
                body_margin: float | None = None, shell_radius: float = 0.02,
                shell_spacing: float = 0.015) -> dict:
    """Cages of the body and its garments on the rest body.

    Args:
      arrays: the body's arrays (v_template [V, 3], faces [F, 3], lbs_weights [V, J]).
      garments: {name: `garments.Garment`} (e.g. {"upper": ..., "lower": ...}) or None.
      body_spacing: lattice spacing of the body cage (metres); body_margin: its inflation
        (None: `default_body_margin(body_spacing)`).
      shell_radius, shell_spacing: garment shells' radius (D3GA: 1-3 cm) and lattice spacing
        (at most 0.878 shell_radius).
    Returns:
      {"body": PartCage, name: PartCage, ...}.
    """
    from dhjax.ops import closest_point

    v = np.asarray(arrays["v_template"], np.float64)
    f = np.asarray(arrays["faces"])
    w = np.asarray(arrays["lbs_weights"])
    margin = default_body_margin(body_spacing) if body_margin is None else float(body_margin)
    mesh, dt = tetra.timed(tetra.solid_cage, v, f, body_spacing, margin=margin, closest_point=closest_point)
    out = {"body": PartCage(mesh, tetra.skin_nodes(mesh.nodes, v, w), tetra.cage_stats(mesh, dt))}
    for name, g in (garments or {}).items():
        gv = np.asarray(g.vertices[g.outer], np.float64)
        gf = np.asarray(g.faces[:g.n_outer_faces])
        mesh, dt = tetra.timed(tetra.shell_cage, gv, gf, shell_radius, shell_spacing, closest_point=closest_point)
        out[name] = PartCage(mesh, tetra.skin_nodes(mesh.nodes, gv, g.weights[g.outer]), tetra.cage_stats(mesh, dt))
    return out


def _cutaway_faces(mesh: tetra.TetMesh, z_cut: float):
    """All faces of the tetrahedra whose centroid lies behind z = z_cut ([K, 3] node ids)."""
    tets = np.asarray(mesh.tets)
    keep = np.asarray(mesh.nodes)[tets].mean(1)[:, 2] < z_cut
    t = tets[keep]
    return np.concatenate([t[:, [0, 2, 1]], t[:, [0, 1, 3]], t[:, [0, 3, 2]], t[:, [1, 2, 3]]])


def cage_picture(arrays, cages: dict, garments: dict | None = None, *, size=(400, 400),
                 z_cut: float = 0.0) -> np.ndarray:
    """A picture [H, W', 3] float in [0, 1]: the clothed rest body, then each cage cut open at
    z = z_cut (the front half removed, so the tetrahedra show) with its edges drawn, seen from
    the front. size: (width, height) of each panel."""
    import jax.numpy as jnp

    from dhjax.render import camera as camera_lib
    from dhjax.render import raster

    W, H = size
    cam = camera_lib.rig_from_angles([20.0], [10.0], 3.3, (0.0, -0.08, 0.0), 36.0, W, H)
    colours = {"body": np.array([0.92, 0.76, 0.62]), "upper": np.array([0.85, 0.35, 0.3]),
               "lower": np.array([0.3, 0.45, 0.85])}
    light = np.array([0.35, 0.45, 0.82])

    def draw(layers, edges):
        verts, faces, cols, off = [], [], [], 0
        for v, f, c in layers:
            verts.append(np.asarray(v, np.float32))
            faces.append(np.asarray(f) + off)
            cols.append(np.broadcast_to(c, (len(f), 3)))
            off += len(v)
        v = np.concatenate(verts)
        f = np.concatenate(faces).astype(np.int32)
        c = np.concatenate(cols)
        fr = raster.rasterize(jnp.asarray(v[None]), jnp.asarray(f), cam)
        fid = np.asarray(fr.face_id[0])
        p = v[f]
        n = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        shade = 0.35 + 0.65 * np.abs(n @ light)
        img = c[np.maximum(fid, 0)] * shade[np.maximum(fid, 0)][..., None]
        if edges:
            b = np.asarray(fr.bary[0]).min(-1)
            img = np.where((b < 0.04)[..., None], img * 0.6, img)
        return np.where((fid >= 0)[..., None], img, 1.0)

    panels = []
    clothed = [(arrays["v_template"], arrays["faces"], colours["body"])]
    for name, g in (garments or {}).items():
        clothed.append((g.vertices, g.faces, colours.get(name, np.array([0.5, 0.5, 0.5]))))
    panels.append(draw(clothed, False))
    for name, cage in cages.items():
        panels.append(draw([(cage.mesh.nodes, _cutaway_faces(cage.mesh, z_cut),
                             colours.get(name, np.array([0.5, 0.5, 0.5])))], True))
    return np.clip(np.concatenate(panels, axis=1), 0.0, 1.0)

"""The embedded default head model: procedural, deterministic, with FLAME's structure.

dhjax cannot ship FLAME (it is licensed), yet every system builds on a head model. This module
builds one procedurally so that everything runs on a fresh machine. It has FLAME's array layout
and semantics (template, faces, shape and expression blendshapes, pose correctives for joints
1..4, a joint regressor, LBS weights, five joints global/neck/jaw/left eye/right eye with parents
[-1, 0, 1, 1, 1]) plus what later systems need: a UV layout, region masks, a 68-point landmark
embedding in the iBUG order, a mediapipe-compatible landmark subset, eyeballs that rotate with the
eye joints, a lip seam that the jaw joint opens, and the metrical tracker's extras: two eyelid
closing blendshapes (`flame.forward(..., eyelids=)`) and mediapipe's ten iris points on the eyeballs.

IT IS NOT A STATISTICAL MODEL OF REAL PEOPLE. Its shape and expression spaces are hand-designed
smooth deformation fields (a few semantic ones such as head size, width, face height, nose length,
smile, brow raise, followed by random smooth fields of decaying amplitude), orthogonalised in
order. They vary head size and proportions by millimetres per unit coefficient (tens of millimetres
over the range of coefficients), so metric and scale-aligned errors differ as they do for real
faces, but the distribution of shapes is not learned from scans and must not be used to make
claims about human faces.

Conventions (as FLAME): metres, y up, the face looks along +z, +x is the subject's left. The
surface is a latitude/longitude grid (rows run from the top of the skull down the neck, columns
around the head with the seam at the back), which gives the UV layout directly: u runs around the
head with the face in the middle (u = 0.5), v runs from the neck (v = 0.16) to the top of the head
(v = 1); the two eyeballs occupy two squares in the strip v < 0.15.

Everything here is numpy on the host (the model is built once); `dhjax.models.flame` turns the
arrays into a pytree of jax arrays.
"""

from __future__ import annotations

import functools

import numpy as np

# The head embeds points of two landmark schemes that describe other tools (iBUG-68: `lmk_*`,
# mediapipe's face mesh: `mp_*`); their tables live on the io floor, shared with dhjax.capture.
from dhjax.io.landmark_schemes import MEDIAPIPE_INDICES, MEDIAPIPE_TO_IBUG

# --------------------------------------------------------------------------------------------
# Layout constants (documented; tests rely on them only through the returned arrays).
N_COLS = 80            # vertices around the head
N_HEAD_ROWS = 54       # rings from below the top pole down to the end of the skull/jaw
N_NECK_ROWS = 8        # rings down the neck
THETA_END = 0.80 * np.pi   # polar angle of the last head ring
EYE_RINGS = 10         # latitude bands of each eyeball (poles front and back)
EYE_SEGMENTS = 16
EYE_RADIUS = 0.0122
N_SHAPE = 300
N_EXPR = 100
IRIS_ANGLE_DEG = 32.0   # angular radius of the iris on the eyeball (the synthetic textures' too)

# Anatomical anchors in (phi, theta): phi = azimuth (0 = front, + towards the subject's left),
# theta = polar angle from the top of the head.
PHI_EYE, THETA_EYE = 0.50, 0.462 * np.pi
THETA_BROW = 0.405 * np.pi
THETA_NOSE_TIP, THETA_SUBNASALE = 0.565 * np.pi, 0.598 * np.pi
THETA_MOUTH, PHI_MOUTH = 0.652 * np.pi, 0.36
PHI_EAR, THETA_EAR = 1.62, 0.505 * np.pi

REGION_NAMES = ("face", "scalp", "back_of_head", "forehead", "eye_region", "nose", "eyes",
                "ears", "lips", "neck")


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _phi_of_w(w):
    """Column parameter w in [-1, 1) -> azimuth; denser sampling at the face (w = 0)."""
    return np.pi * (0.55 * w + 0.45 * w ** 3)


def _theta_table():
    """Monotonic map from the head row parameter s in [0, 1] to the polar angle, denser on the face."""
    theta = np.linspace(0.0, THETA_END, 4001)
    density = 1.0 + 1.3 * np.exp(-(((theta - 0.58 * np.pi) / (0.17 * np.pi)) ** 2))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(theta))])
    return cdf / cdf[-1], theta


def _theta_of_s(s):
    cdf, theta = _theta_table()
    return np.interp(s, cdf, theta)


def _s_of_theta(th):
    cdf, theta = _theta_table()
    return np.interp(th, theta, cdf)


def _w_of_phi(phi):
    w = np.linspace(-1.0, 1.0, 20001)
    return np.interp(phi, _phi_of_w(w), w)


def _ang_gauss(phi, theta, phi0, theta0, sp, st):
    dphi = np.angle(np.exp(1j * (phi - phi0)))
    return np.exp(-0.5 * ((dphi / sp) ** 2 + ((theta - theta0) / st) ** 2))


def _base_head_point(phi, theta):
    """Smooth head surface (no features) at azimuth phi, polar angle theta. Returns [..., 3]."""
    ax, ay, yc, zc = 0.078, 0.112, 0.0, -0.004
    az = 0.104 + (0.097 - 0.104) * (0.5 + 0.5 * np.cos(phi))
    st, ct = np.sin(theta), np.cos(theta)
    front = np.clip(np.cos(phi), 0.0, None) ** 1.5
    lower = _smoothstep((theta - 0.5 * np.pi) / (THETA_END - 0.5 * np.pi))
    jaw = _smoothstep((theta - 0.55 * np.pi) / (0.25 * np.pi))
    x = ax * st * np.sin(phi) * (1.0 - 0.22 * jaw * (0.3 + 0.7 * front))
    y = yc + ay * ct - 0.042 * lower * front
    z = zc + az * st * np.cos(phi) + 0.012 * lower * front
    return np.stack([x, y, z], axis=-1)


def _neck_point(phi, t, head_ring):
    """Neck ring at fraction t in (0, 1] below the last head ring (head_ring [..., 3])."""
    neck = np.stack([0.052 * np.sin(phi), -0.105 - 0.105 * t + 0.0 * phi,
                     -0.018 + 0.056 * np.cos(phi)], axis=-1)
    blend = _smoothstep(t * 2.2)[..., None]
    return (1.0 - blend) * head_ring + blend * neck


def _base_normal(phi, theta, eps=1e-5):
    """Outward unit normal [3] of the smooth head surface at (phi, theta)."""
    d_theta = _base_head_point(np.array(phi), np.array(theta + eps)) - _base_head_point(
        np.array(phi), np.array(theta - eps))
    d_phi = _base_head_point(np.array(phi + eps), np.array(theta)) - _base_head_point(
        np.array(phi - eps), np.array(theta))
    n = np.cross(d_phi, d_theta)
    n = n / np.linalg.norm(n)
    return n if n[2] > 0 or abs(phi) > np.pi / 2 else -n


def _vertex_normals_np(v, f):
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    vn = np.zeros_like(v)
    for k in range(3):
        np.add.at(vn, f[:, k], fn)
    return vn / np.maximum(np.linalg.norm(vn, axis=-1, keepdims=True), 1e-12)


def _seam_normals(verts, faces, orig_ids, dup_ids):
    """Vertex normals where the two sides of the lip seam share one normal (so they stay closed)."""
    n = _vertex_normals_np(verts, faces)
    both = n[orig_ids] + n[dup_ids]
    both /= np.maximum(np.linalg.norm(both, axis=-1, keepdims=True), 1e-12)
    n[orig_ids] = both
    n[dup_ids] = both
    return n


def _grid_faces(rows_idx):
    """Triangulates consecutive rings. rows_idx: [R, N] vertex ids. Returns [2 (R-1) N, 3]."""
    faces = []
    n = rows_idx.shape[1]
    for i in range(rows_idx.shape[0] - 1):
        for j in range(n):
            j1 = (j + 1) % n
            v00, v01, v10, v11 = rows_idx[i, j], rows_idx[i, j1], rows_idx[i + 1, j], rows_idx[i + 1, j1]
            faces.append((v00, v10, v11))
            faces.append((v00, v11, v01))
    return np.asarray(faces, dtype=np.int64)


def _features(phi, theta, side):
    """Displacement along the normal (metres) of the facial features at (phi, theta)."""
    g = _ang_gauss
    d = np.zeros_like(phi)
    # Nose: a ridge along phi = 0 from the bridge to the tip, dropping at the subnasale.
    th = theta
    prof = np.where(th < THETA_NOSE_TIP,
                    0.004 + 0.022 * _smoothstep((th - 0.43 * np.pi) / (THETA_NOSE_TIP - 0.43 * np.pi)),
                    0.026 * (1.0 - _smoothstep((th - THETA_NOSE_TIP) / (THETA_SUBNASALE - THETA_NOSE_TIP))))
    prof = prof * (th > 0.42 * np.pi)
    sig = 0.075 + 0.09 * _smoothstep((th - 0.45 * np.pi) / (0.12 * np.pi))
    d += prof * np.exp(-0.5 * (np.angle(np.exp(1j * phi)) / sig) ** 2)
    for s in (-1, 1):  # nostril wings
        d += 0.006 * g(phi, theta, s * 0.15, 0.585 * np.pi, 0.06, 0.018 * np.pi)
        # eye sockets: wide horizontally, narrow vertically
        d -= 0.016 * g(phi, theta, s * PHI_EYE, THETA_EYE, 0.26, 0.026 * np.pi)
        d += 0.0045 * g(phi, theta, s * 0.40, THETA_BROW, 0.28, 0.022 * np.pi)   # brow ridge
        d += 0.0045 * g(phi, theta, s * 0.78, 0.53 * np.pi, 0.2, 0.05 * np.pi)   # cheekbones
        d += 0.015 * g(phi, theta, s * PHI_EAR, THETA_EAR, 0.085, 0.055 * np.pi)  # ears
    # Lips: upper and lower lip bulges on either side of the seam.
    lipw = 1.0 - _smoothstep((np.abs(np.angle(np.exp(1j * phi))) - 0.24) / 0.16)
    d += 0.0055 * lipw * np.exp(-0.5 * ((theta - (THETA_MOUTH - 0.018 * np.pi)) / (0.014 * np.pi)) ** 2)
    d += 0.0060 * lipw * np.exp(-0.5 * ((theta - (THETA_MOUTH + 0.022 * np.pi)) / (0.016 * np.pi)) ** 2)
    d += 0.005 * g(phi, theta, 0.0, 0.755 * np.pi, 0.25, 0.035 * np.pi)  # chin
    return d


@functools.lru_cache(maxsize=None)
def _build_mesh():
    """Template mesh, UVs, per-vertex parameters. Pure function of nothing (cached)."""
    w = -1.0 + 2.0 * np.arange(N_COLS) / N_COLS
    phi_cols = _phi_of_w(w)
    s_rows = np.arange(1, N_HEAD_ROWS + 1) / N_HEAD_ROWS
    theta_rows = _theta_of_s(s_rows)

    # Head rings (after the pole) and neck rings.
    P, T = np.meshgrid(phi_cols, theta_rows)                 # [Rh, N]
    head = _base_head_point(P, T)
    t_neck = np.arange(1, N_NECK_ROWS + 1) / N_NECK_ROWS
    Pn, Tn = np.meshgrid(phi_cols, t_neck)
    neck = _neck_point(Pn, Tn, np.broadcast_to(head[-1], Pn.shape + (3,)))
    pole = _base_head_point(np.zeros(()), np.zeros(()))[None]
    grid = np.concatenate([head, neck], axis=0)             # [R, N, 3]
    n_rows = grid.shape[0]
    # Row "theta" for the neck continues past THETA_END so that masks can use one coordinate.
    theta_grid = np.concatenate([T, THETA_END + 0.25 * np.pi * Tn], axis=0)
    phi_grid = np.concatenate([P, Pn], axis=0)

    verts = np.concatenate([pole, grid.reshape(-1, 3)], axis=0)
    phi_v = np.concatenate([[0.0], phi_grid.ravel()])
    theta_v = np.concatenate([[0.0], theta_grid.ravel()])
    rows_idx = 1 + np.arange(n_rows * N_COLS).reshape(n_rows, N_COLS)

    # Lip seam: duplicate the vertices of the mouth row strictly inside the mouth corners; the
    # faces below the seam use the duplicates, so the jaw can pull the lower lip away.
    mouth_row = int(np.argmin(np.abs(theta_rows - THETA_MOUTH)))
    inside = np.where(np.abs(phi_cols) < PHI_MOUTH)[0]
    corners = (inside.min() - 1, inside.max() + 1)
    dup_ids = len(verts) + np.arange(len(inside))
    verts = np.concatenate([verts, verts[rows_idx[mouth_row, inside]]], axis=0)
    phi_v = np.concatenate([phi_v, phi_v[rows_idx[mouth_row, inside]]])
    theta_v = np.concatenate([theta_v, theta_v[rows_idx[mouth_row, inside]]])
    side = np.zeros(len(verts))
    side[rows_idx[mouth_row, inside]] = 1.0   # upper lip edge
    side[dup_ids] = -1.0                        # lower lip edge

    faces = [np.stack([np.zeros(N_COLS, np.int64), rows_idx[0], np.roll(rows_idx[0], -1)], 1)]
    upper = _grid_faces(rows_idx[: mouth_row + 1])
    lower_rows = rows_idx[mouth_row:].copy()
    lower_rows[0, inside] = dup_ids
    lower = _grid_faces(lower_rows)
    faces = np.concatenate(faces + [upper, lower], axis=0)
    n_skin = len(verts)

    # Facial features displace the smooth surface along its normal.
    normals = _seam_normals(verts, faces, rows_idx[mouth_row, inside], dup_ids)
    verts = verts + _features(phi_v, theta_v, side)[:, None] * normals

    # Eyeballs: spheres whose front pole (the iris) looks along +z, sunk into the sockets.
    eye_centres, eye_verts, eye_faces, eye_uv_local = [], [], [], []
    for sgn in (+1, -1):   # left eye (+x) first: joint 3 is the left eye, joint 4 the right eye
        # Sunk along the socket's normal, so that the socket (a depression along the same normal)
        # wraps the eyeball evenly and the eyelid contour is centred on it.
        p_surf = _base_head_point(np.array(sgn * PHI_EYE), np.array(THETA_EYE))
        centre = p_surf - _base_normal(sgn * PHI_EYE, THETA_EYE) * (EYE_RADIUS + 0.003)
        ev, ef, euv = _uv_sphere(centre, EYE_RADIUS)
        eye_faces.append(ef + len(verts) + sum(len(x) for x in eye_verts))
        eye_verts.append(ev)
        eye_uv_local.append(euv)
        eye_centres.append(centre)
    eye_start = len(verts)
    verts = np.concatenate([verts] + eye_verts, axis=0)
    faces = np.concatenate([faces] + eye_faces, axis=0)
    n_eye = len(eye_verts[0])
    eye_id = np.zeros(len(verts), np.int64)          # 0 skin, 1 left eye, 2 right eye
    eye_id[eye_start: eye_start + n_eye] = 1
    eye_id[eye_start + n_eye:] = 2
    phi_v = np.concatenate([phi_v, np.full(2 * n_eye, 0.0)])
    theta_v = np.concatenate([theta_v, np.full(2 * n_eye, 0.0)])
    phi_v[eye_id == 1], theta_v[eye_id == 1] = PHI_EYE, THETA_EYE
    phi_v[eye_id == 2], theta_v[eye_id == 2] = -PHI_EYE, THETA_EYE
    side = np.concatenate([side, np.zeros(2 * n_eye)])

    uv_coords, uv_faces = _uv_layout(rows_idx, n_rows, mouth_row, inside, dup_ids, faces,
                                     eye_uv_local, n_skin, eye_start, n_eye)
    return dict(
        verts=verts, faces=faces, phi=phi_v, theta=theta_v, side=side, eye_id=eye_id,
        eye_centres=np.stack(eye_centres), rows_idx=rows_idx, mouth_row=mouth_row,
        mouth_inside=inside, mouth_corners=np.array(corners), dup_ids=dup_ids,
        theta_rows=theta_rows, phi_cols=phi_cols, uv_coords=uv_coords, uv_faces=uv_faces,
        n_skin=n_skin)


def _uv_sphere(centre, radius):
    """Closed sphere with poles on the z axis (front pole first). Returns verts, faces, polar uv."""
    alphas = np.pi * np.arange(1, EYE_RINGS) / EYE_RINGS
    betas = 2 * np.pi * np.arange(EYE_SEGMENTS) / EYE_SEGMENTS
    A, B = np.meshgrid(alphas, betas, indexing="ij")
    ring = np.stack([np.sin(A) * np.cos(B), np.sin(A) * np.sin(B), np.cos(A)], -1).reshape(-1, 3)
    local = np.concatenate([[[0, 0, 1.0]], ring, [[0, 0, -1.0]]])
    v = centre + radius * local
    ids = 1 + np.arange((EYE_RINGS - 1) * EYE_SEGMENTS).reshape(EYE_RINGS - 1, EYE_SEGMENTS)
    back = len(local) - 1
    f = [np.stack([np.zeros(EYE_SEGMENTS, np.int64), ids[0], np.roll(ids[0], -1)], 1),
         _grid_faces(ids),
         np.stack([np.full(EYE_SEGMENTS, back), np.roll(ids[-1], -1), ids[-1]], 1)]
    f = np.concatenate(f)
    # Orient outwards (the sphere is convex, so the centroid direction decides).
    tri = v[f]
    nrm = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    flip = np.einsum("fc,fc->f", nrm, tri.mean(1) - centre) < 0
    f[flip] = f[flip][:, [0, 2, 1]]
    # Polar layout: the iris (front pole) at the centre of the square, radius growing with the
    # angle from the front pole. The back pole would map to the whole rim, so each of its
    # triangles gets its own rim point (between its two ring vertices): no triangle overlaps.
    alpha_v = np.arccos(np.clip(local[:, 2], -1, 1))
    beta_v = np.arctan2(local[:, 1], local[:, 0])
    rad = 0.5 * alpha_v / np.pi
    uv = np.stack([0.5 + rad * np.cos(beta_v), 0.5 + rad * np.sin(beta_v)], -1)
    uv_faces = f.copy()
    extra = []
    for i in np.where((f == back).any(1))[0]:
        others = [k for k in f[i] if k != back]
        mid = local[others, :2].mean(0)
        beta = np.arctan2(mid[1], mid[0])
        uv_faces[i][f[i] == back] = len(uv) + len(extra)
        extra.append([0.5 + 0.5 * np.cos(beta), 0.5 + 0.5 * np.sin(beta)])
    return v, f, (np.concatenate([uv, np.asarray(extra)]), uv_faces)


def _uv_layout(rows_idx, n_rows, mouth_row, inside, dup_ids, faces, eye_uv_local, n_skin,
               eye_start, n_eye):
    """UV coordinates [T, 2] and UV faces [F, 3] (separate indexing, seams duplicated)."""
    v_lo, v_hi = 0.16, 1.0
    row_v = v_hi - (v_hi - v_lo) * np.arange(1, n_rows + 1) / n_rows
    # Grid UV vertices: (n_rows, N_COLS + 1), the last column duplicates the seam at u = 1.
    u = np.arange(N_COLS + 1) / N_COLS
    U, Vv = np.meshgrid(u, row_v)
    grid_uv = np.stack([U, Vv], -1).reshape(-1, 2)
    grid_uv_idx = np.arange(n_rows * (N_COLS + 1)).reshape(n_rows, N_COLS + 1)
    pole_uv = np.stack([(np.arange(N_COLS) + 0.5) / N_COLS, np.full(N_COLS, v_hi)], -1)
    pole_uv_idx = len(grid_uv) + np.arange(N_COLS)
    uv = [grid_uv, pole_uv]
    uv_faces = [np.stack([pole_uv_idx, grid_uv_idx[0, :-1], grid_uv_idx[0, 1:]], 1)]
    for i in range(n_rows - 1):
        for j in range(N_COLS):
            a, b = grid_uv_idx[i, j], grid_uv_idx[i, j + 1]
            c, d = grid_uv_idx[i + 1, j], grid_uv_idx[i + 1, j + 1]
            uv_faces.append(np.array([[a, c, d], [a, d, b]]))
    uv_faces = [uv_faces[0], np.concatenate(uv_faces[1:])]
    # Eyeballs: two squares in the bottom strip; faces map one-to-one (offset).
    n_uv = len(grid_uv) + len(pole_uv)
    # Eyeballs: two squares in the bottom strip, faces in the order of the mesh (left eye first).
    eye_faces_uv = []
    for u0, (loc, loc_faces) in zip((0.02, 0.18), eye_uv_local):
        eye_faces_uv.append(loc_faces + n_uv)
        uv.append(np.array([u0, 0.005]) + 0.14 * loc)
        n_uv += len(loc)
    uv_coords = np.concatenate(uv, 0)
    uv_faces = np.concatenate(uv_faces + eye_faces_uv, 0)
    if len(uv_faces) != len(faces):
        raise AssertionError("UV faces must match mesh faces one to one")
    return uv_coords, uv_faces


# --------------------------------------------------------------------------------------------
# Deformation spaces.

def _gauss3(p, c, sigma):
    return np.exp(-0.5 * np.sum((p - c) ** 2, -1) / sigma ** 2)


def _rigidify_eyes(field, mesh):
    """Eyeball vertices move rigidly: each takes the field value at its socket point."""
    out = field.copy()
    for k in (1, 2):
        sel = mesh["eye_id"] == k
        # The socket moves the eye: mean field over the skin within 2 cm of the eyeball centre.
        skin = mesh["verts"][: mesh["n_skin"]]
        near = np.sum((skin - mesh["eye_centres"][k - 1]) ** 2, -1) < 0.02 ** 2
        out[sel] = field[: mesh["n_skin"]][near].mean(0)
    return out


def _orthogonalise(fields, peak):
    """Gram-Schmidt over [V, 3, K] in order, then rescale column k to a peak displacement peak[k].

    The peak (largest vertex displacement per unit coefficient) rather than the RMS over the
    whole head sets the scale, so that localised fields do not get amplified into folds."""
    V, _, K = fields.shape
    flat = fields.reshape(V * 3, K).astype(np.float64)
    # Cholesky QR, twice for stability (much faster than Householder QR here; R has a positive
    # diagonal, so every column keeps the sign of its raw field).
    q = flat
    for _ in range(2):
        chol = np.linalg.cholesky(q.T @ q)
        q = np.linalg.solve(chol, q.T).T
    q = q.reshape(V, 3, K)
    q = q / np.max(np.linalg.norm(q, axis=1), axis=0)[None, None]
    return q * np.asarray(peak)[None, None]


# Peak displacement (metres per unit coefficient) of the semantic shape components, in the order
# of _semantic_shape_fields: size, width, length, cranium height, lower face height, nose
# protrusion, nose width, jaw width, chin, cheekbones, eye spacing, brow ridge, forehead, lips,
# ears, neck thickness, face flatness, occiput.
SHAPE_SEMANTIC_PEAKS = np.array([7.0, 3.0, 3.5, 3.0, 4.0, 3.0, 2.0, 2.5, 3.0, 2.0, 2.0, 2.0, 2.0,
                                 1.5, 3.0, 3.0, 2.0, 3.0]) * 1e-3


def _semantic_shape_fields(mesh, normals):
    p = mesh["verts"]
    phi, theta = mesh["phi"], mesh["theta"]
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    front = np.clip(np.cos(phi), 0, None)
    face_w = front ** 2 * (theta > 0.3 * np.pi) * (theta < THETA_END + 0.05)
    lower = _smoothstep((theta - 0.56 * np.pi) / (0.2 * np.pi)) * (theta <= THETA_END + 1e-6)
    neckw = theta > THETA_END + 1e-6
    nose = _gauss3(p, p[np.argmax(z)], 0.02)
    ears = sum(np.exp(-0.5 * (((phi - s * PHI_EAR) / 0.12) ** 2 + ((theta - THETA_EAR) / (0.07 * np.pi)) ** 2))
               for s in (-1, 1))
    zero = np.zeros_like(x)
    f = []
    f.append(np.stack([x, y + 0.02, z], -1))                                   # overall size
    f.append(np.stack([x, zero, zero], -1))                                    # head width
    f.append(np.stack([zero, zero, z + 0.004], -1))                            # head length
    f.append(np.stack([zero, np.clip(y, 0, None), zero], -1))                  # cranium height
    f.append(np.stack([zero, -lower - neckw, 0.3 * lower], -1))                # lower face height
    f.append(nose[:, None] * np.array([0, -0.3, 1.0]))                         # nose protrusion
    f.append(nose[:, None] * np.stack([x / 0.02, zero, zero], -1))             # nose width
    f.append(np.stack([x * lower, zero, zero], -1))                            # jaw width
    f.append(np.stack([zero, zero, lower * front ** 4], -1))                   # chin protrusion
    f.append(normals * sum(_ang_gauss(phi, theta, s * 0.78, 0.53 * np.pi, 0.25, 0.06 * np.pi)
                           for s in (-1, 1))[:, None])                         # cheekbones
    f.append(np.stack([np.tanh(x / 0.012) * sum(_ang_gauss(phi, theta, s * PHI_EYE, THETA_EYE, 0.3, 0.08 * np.pi)
                                        for s in (-1, 1)), zero, zero], -1))   # eye spacing
    f.append(normals * sum(_ang_gauss(phi, theta, s * 0.4, THETA_BROW, 0.3, 0.03 * np.pi)
                           for s in (-1, 1))[:, None])                         # brow ridge
    f.append(normals * (face_w * _smoothstep((0.4 * np.pi - theta) / (0.15 * np.pi)))[:, None])  # forehead
    f.append(normals * (np.abs(mesh["side"]) + _ang_gauss(phi, theta, 0, THETA_MOUTH, 0.3, 0.03 * np.pi))[:, None])
    f.append(normals * ears[:, None])                                          # ear protrusion
    f.append(np.stack([x, zero, z + 0.018], -1) * neckw[:, None])               # neck thickness
    f.append(np.stack([zero, zero, face_w * (z > 0) * z], -1))                 # face flatness
    f.append(normals * np.clip(-np.cos(phi), 0, None)[:, None] ** 2 * (theta < THETA_END)[:, None])  # occiput
    return np.stack(f, -1)


def _random_fields(mesh, normals, k, rng, weight=None, centres_from=None, sym_prob=0.8):
    """k random smooth fields: each a sum of 3 Gaussian RBFs with random vectors, mostly mirror-symmetric."""
    p = mesh["verts"]
    pool = np.arange(mesh["n_skin"]) if centres_from is None else centres_from
    mirror = np.array([-1.0, 1.0, 1.0])
    out = np.zeros((len(p), 3, k))
    for i in range(k):
        field = np.zeros_like(p)
        for _ in range(3):
            c_id = rng.choice(pool)
            c = p[c_id]
            sig = rng.uniform(0.03, 0.08)
            vec = normals[c_id] * rng.normal() + 0.4 * rng.normal(size=3)
            field += _gauss3(p, c, sig)[:, None] * vec
            if rng.uniform() < sym_prob:
                field += _gauss3(p, c * mirror, sig)[:, None] * (vec * mirror)
        out[:, :, i] = field
    if weight is not None:
        out = out * weight[:, None, None]
    return out


def _semantic_expression_fields(mesh, normals):
    p = mesh["verts"]
    phi, theta, side = mesh["phi"], mesh["theta"], mesh["side"]
    x = p[:, 0]
    skin = (mesh["eye_id"] == 0).astype(float)
    corner = {s: _ang_gauss(phi, theta, s * PHI_MOUTH, THETA_MOUTH, 0.2, 0.05 * np.pi) * skin for s in (-1, 1)}
    lips = (1 - _smoothstep((np.abs(phi) - 0.3) / 0.2)) * np.exp(
        -0.5 * ((theta - THETA_MOUTH) / (0.04 * np.pi)) ** 2) * skin
    up_lip = lips * (theta <= THETA_MOUTH + 1e-9) * (side >= 0)
    lo_lip = lips * ((theta > THETA_MOUTH + 1e-9) | (side < 0))
    brow = {s: _ang_gauss(phi, theta, s * 0.4, THETA_BROW, 0.3, 0.05 * np.pi) * skin for s in (-1, 1)}
    inner_brow = sum(_ang_gauss(phi, theta, s * 0.15, THETA_BROW, 0.12, 0.05 * np.pi) for s in (-1, 1)) * skin
    cheek = {s: _ang_gauss(phi, theta, s * 0.6, 0.56 * np.pi, 0.25, 0.06 * np.pi) * skin for s in (-1, 1)}
    lid = {s: _ang_gauss(phi, theta, s * PHI_EYE, THETA_EYE - 0.03 * np.pi, 0.2, 0.03 * np.pi) * skin
           for s in (-1, 1)}
    nose = _ang_gauss(phi, theta, 0, 0.5 * np.pi, 0.15, 0.05 * np.pi) * skin
    sx = np.tanh(x / 0.01)
    f = []
    smile = lambda s: corner[s][:, None] * np.array([s * 0.5, 1.0, -0.6])
    f.append(smile(-1) + smile(1))                                            # smile
    f.append(sum(corner[s][:, None] * np.array([s * 1.0, 0, -0.2]) for s in (-1, 1)))  # mouth stretch
    f.append((up_lip + lo_lip)[:, None] * np.stack([-0.6 * x / 0.03, 0 * x, 0.8 + 0 * x], -1))  # pucker
    f.append(sum(brow.values())[:, None] * np.array([0, 1.0, 0.1]))         # brow raise
    f.append(inner_brow[:, None] * np.stack([-sx, -0.7 + 0 * x, 0 * x], -1))  # brow furrow
    f.append(sum(cheek.values())[:, None] * np.array([0, 1.0, 0.4]))        # cheek raise
    f.append(up_lip[:, None] * np.array([0, 1.0, 0.2]))                       # upper lip raise
    f.append(lo_lip[:, None] * np.array([0, -1.0, 0.1]))                      # lower lip depress
    f.append((up_lip - lo_lip)[:, None] * np.array([0, -0.5, -0.6]))          # lip press
    f.append(sum(cheek.values())[:, None] * normals)                          # cheek puff
    f.append(nose[:, None] * np.array([0, 0.6, -0.3]))                        # nose wrinkle
    f.append((up_lip + lo_lip + corner[-1] + corner[1])[:, None] * np.array([1.0, 0, 0]))  # mouth left/right
    f.append(smile(1) - smile(-1))                                            # smile asymmetry
    f.append(sum(lid.values())[:, None] * np.array([0, -1.0, 0.5]))           # eyelids down
    f.append(brow[1][:, None] * np.array([0, 1.0, 0.1]))                      # left brow raise
    return np.stack(f, -1)


def _region_masks(mesh):
    phi, theta = np.abs(np.angle(np.exp(1j * mesh["phi"]))), mesh["theta"]
    skin = mesh["eye_id"] == 0
    head = skin & (theta <= THETA_END + 1e-6)
    jaw_line = 0.56 * np.pi + 0.22 * np.pi * np.clip(np.cos(phi / 1.45 * np.pi / 2), 0, 1) ** 0.7
    ears = head & (_ang_gauss(phi, theta, PHI_EAR, THETA_EAR, 0.16, 0.085 * np.pi) > 0.25)
    face = head & (phi < 1.4) & (theta > 0.33 * np.pi) & (theta < jaw_line + 0.02 * np.pi) & ~ears
    eye_region = head & (_ang_gauss(phi, theta, PHI_EYE, THETA_EYE, 0.3, 0.07 * np.pi) > 0.3)
    lips = head & (phi < PHI_MOUTH + 0.02) & (theta > THETA_MOUTH - 0.024 * np.pi) & (
        theta < THETA_MOUTH + 0.03 * np.pi)
    nose = head & (phi < 0.22) & (theta > 0.44 * np.pi) & (theta < THETA_SUBNASALE + 0.01 * np.pi)
    forehead = face & (theta < THETA_BROW + 0.01 * np.pi)
    scalp = head & ~face & ~ears & (theta < 0.62 * np.pi) & ~((phi < 1.6) & (theta > 0.45 * np.pi))
    back = head & (phi > 1.9)
    neck = skin & ~face & ~ears & ~scalp & ~back
    return dict(face=face, scalp=scalp, back_of_head=back, forehead=forehead, eye_region=eye_region,
                nose=nose, eyes=~skin, ears=ears, lips=lips, neck=neck)


def _skinning(mesh):
    """LBS weights [V, 5] and joint regressor [5, V]."""
    phi, theta, side = np.abs(np.angle(np.exp(1j * mesh["phi"]))), mesh["theta"], mesh["side"]
    V = len(phi)
    W = np.zeros((V, 5))
    skin = mesh["eye_id"] == 0
    # Jaw: everything below the lip seam inside the mouth corners (a hard split across the seam),
    # fading towards the cheeks and down the neck.
    tm_row = mesh["theta_rows"][mesh["mouth_row"]]
    corner_fade = 1.0 - _smoothstep((phi - PHI_MOUTH) / 0.9)
    inside = ((theta > tm_row + 1e-9) | (side < 0)).astype(float)
    width = 0.02 * np.pi + 0.2 * np.pi * np.clip(phi - PHI_MOUTH, 0, None)
    below = np.where(phi < PHI_MOUTH, inside, _smoothstep((theta - tm_row) / width))
    under = 1.0 - _smoothstep((theta - (THETA_END + 0.02 * np.pi)) / (0.06 * np.pi))
    jaw = np.clip(below * corner_fade * under * skin, 0, 1)
    jaw = np.where(phi < 1.5, jaw, 0.0)
    # Neck vs global: the lower neck follows the root.
    lower_neck = _smoothstep((theta - (THETA_END + 0.08 * np.pi)) / (0.15 * np.pi)) * skin
    W[:, 2] = jaw
    W[:, 0] = lower_neck * (1 - jaw)
    W[:, 1] = (1 - jaw) * (1 - lower_neck) * skin
    W[mesh["eye_id"] == 1, 3] = 1.0
    W[mesh["eye_id"] == 2, 4] = 1.0
    W = W / W.sum(1, keepdims=True)

    J = np.zeros((5, V))
    rows = mesh["rows_idx"]
    J[0, rows[-1]] = 1.0                                                   # bottom of the neck
    J[1, rows[N_HEAD_ROWS + N_NECK_ROWS // 4]] = 1.0                        # upper neck ring
    tmj = np.where(skin & (_ang_gauss(phi, theta, 1.3, 0.56 * np.pi, 0.08, 0.03 * np.pi) > 0.5))[0]
    J[2, tmj] = 1.0                                                         # jaw hinge (both sides)
    J[3, mesh["eye_id"] == 1] = 1.0
    J[4, mesh["eye_id"] == 2] = 1.0
    J = J / J.sum(1, keepdims=True)
    return W, J


def _posedirs(mesh, normals, W, rng):
    """Pose correctives [V, 3, 36]: smooth fields on the region each joint moves (neck, jaw).

    Eye joints get none: eyeballs are rigid. Peak 3 mm per unit of (R - I) entry."""
    V = len(W)
    pd = np.zeros((V, 3, 36))
    for j, region in ((1, W[:, 1] * (W[:, 1] < 0.999) + W[:, 0] * (W[:, 0] > 0)), (2, W[:, 2])):
        fields = _random_fields(mesh, normals, 9, rng, weight=region * (mesh["eye_id"] == 0),
                                centres_from=np.where(region > 0.2)[0], sym_prob=0.5)
        peak = np.max(np.linalg.norm(fields, axis=1), axis=0) + 1e-12
        pd[:, :, 9 * (j - 1): 9 * j] = fields / peak * 0.003
    return pd


def _landmarks68_param():
    """(phi, theta, side) of the 68 iBUG landmarks on the template surface."""
    pts = []
    for k in range(17):  # jaw contour from the subject's right ear to the left ear
        ph = -1.42 + 2.84 * k / 16
        th = 0.56 * np.pi + 0.215 * np.pi * np.clip(np.cos(ph / 1.42 * np.pi / 2), 0, 1) ** 0.7
        pts.append((ph, th, 0))
    for s, order in ((-1, (0.72, 0.6, 0.45, 0.3, 0.14)), (1, (0.14, 0.3, 0.45, 0.6, 0.72))):
        for a in order:   # brows: outer->inner (right), inner->outer (left)
            pts.append((s * a, THETA_BROW - 0.018 * np.pi * np.sin(np.pi * (a - 0.1) / 0.65), 0))
    for th in (0.47, 0.50, 0.535, THETA_NOSE_TIP / np.pi):
        pts.append((0.0, th * np.pi, 0))
    for ph in (-0.14, -0.07, 0.0, 0.07, 0.14):
        pts.append((ph, 0.596 * np.pi, 0))
    de, dt = 0.14, 0.022 * np.pi
    for s in (-1, 1):   # right eye 36-41 then left eye 42-47, clockwise in the image
        e = s * PHI_EYE
        if s < 0:
            seq = [(e - de, 0), (e - de / 2, -1), (e + de / 2, -1), (e + de, 0), (e + de / 2, 1), (e - de / 2, 1)]
        else:
            seq = [(e - de, 0), (e - de / 2, -1), (e + de / 2, -1), (e + de, 0), (e + de / 2, 1), (e - de / 2, 1)]
        for ph, v in seq:
            pts.append((ph, THETA_EYE + v * dt, 0))
    tm = THETA_MOUTH
    outer = [(-PHI_MOUTH, tm), (-0.22, tm - 0.022 * np.pi), (-0.09, tm - 0.03 * np.pi), (0.0, tm - 0.027 * np.pi),
             (0.09, tm - 0.03 * np.pi), (0.22, tm - 0.022 * np.pi), (PHI_MOUTH, tm),
             (0.22, tm + 0.03 * np.pi), (0.11, tm + 0.04 * np.pi), (0.0, tm + 0.042 * np.pi),
             (-0.11, tm + 0.04 * np.pi), (-0.22, tm + 0.03 * np.pi)]
    pts += [(ph, th, 0) for ph, th in outer]
    inner = [(-0.30, tm, 0), (-0.12, tm, 1), (0.0, tm, 1), (0.12, tm, 1), (0.30, tm, 0),
             (0.12, tm, -1), (0.0, tm, -1), (-0.12, tm, -1)]
    pts += inner
    return np.array(pts, dtype=np.float64)


def _eyelid_params(mesh):
    """(phi, theta, 0) of the 12 iBUG eye landmarks (36-47) where the skin meets the eyeball.

    Skin inside an eyeball sphere is hidden, so the visible eye opening is bounded by the curve
    where the skin leaves the sphere. Along six directions around each socket (corner, two upper
    lid, corner, two lower lid points, clockwise in the image from the subject's right), the
    crossing is found by bisection on the skin surface.
    """
    angles = np.deg2rad([180.0, 120.0, 60.0, 0.0, -60.0, -120.0])
    out = []
    for eye, sgn in ((2, -1), (1, 1)):      # iBUG 36-41: subject's right eye (joint 4, -x)
        centre = mesh["eye_centres"][eye - 1]
        phi0 = sgn * PHI_EYE

        def dist(ph, th):
            f, b = _embed_param_points(mesh, np.array([[ph, th, 0.0]]))
            p = np.einsum("k,kc->c", b[0], mesh["verts"][mesh["faces"][f[0]]])
            return np.linalg.norm(p - centre) - EYE_RADIUS

        for a in angles:
            # Metric-ish steps: 1 rad of phi is ~78 mm, 1 rad of theta ~110 mm at the eye.
            point = lambda t: (phi0 + t * np.cos(a) / 0.078, THETA_EYE - t * np.sin(a) / 0.11)
            ts = np.linspace(0.0, 0.03, 61)
            inside = [dist(*point(t)) < 0 for t in ts]
            k = int(np.argmin(inside)) if not all(inside) else len(ts) - 1
            if k == 0:
                raise AssertionError("eye socket centre is not inside the eyeball")
            lo, hi = ts[k - 1], ts[k]
            for _ in range(30):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if dist(*point(mid)) < 0 else (lo, mid)
            out.append((*point(hi), 0.0))
    return np.asarray(out)


def _eyelid_fields(mesh):
    """Eyelid closing blendshapes [V, 3, 2] (left eye, right eye): at 1 the eye is shut.

    Each upper lid turns down about the horizontal axis through its eyeball's centre (it slides
    over the eyeball, as a real lid does) and the lower lid turns up: 85% and 15% of the angle
    between the upper and the lower lid at that point across the eye. That angle is measured at
    the lid landmarks (iBUG 37/41 and 38/40 for the right eye, 43/47 and 44/46 for the left, at
    a quarter of the eye's width from its centre) and follows a cosine profile across the eye,
    zero at the corners (an ellipse would fit the opening better but its infinite slope at the
    corners tears the mesh there; near the corners the shut lid leaves a thin gap). The angle
    fades over the lid skin towards the brow and the cheek, so that skin stretches.
    A blendshape is linear, so a lid point moves along the chord of its arc: shut (1) and open
    (0) are exact, but in between the lid edge passes inside the eyeball (at 0.5 by up to
    r (1 - cos(alpha / 2)), a few millimetres for this head's wide eyes), so a half-closed lid
    shows less than half of its travel.
    """
    verts, phi, theta = mesh["verts"], mesh["phi"], mesh["theta"]
    skin = (mesh["eye_id"] == 0).astype(float)
    f_lmk, b_lmk = _embed_param_points(mesh, mesh["eyelid_landmarks"])
    lmk = np.einsum("lk,lkc->lc", b_lmk, verts[mesh["faces"][f_lmk]])
    out = np.zeros(verts.shape + (2,))
    lp = mesh["eyelid_landmarks"]              # (phi, theta, 0) of iBUG 36-47
    for k, (sgn, base) in enumerate(((1, 6), (-1, 0))):   # left eye (+x, iBUG 42-47) first
        c = mesh["eye_centres"][k]
        ang = lambda q: np.arctan2(q[..., 1] - c[1], q[..., 2] - c[2])   # about x, 0 = front
        # x: -1 .. 1 across the eye between its corners (base, base + 3).
        mid, half = 0.5 * (lp[base, 0] + lp[base + 3, 0]), 0.5 * abs(lp[base + 3, 0] - lp[base, 0])
        xs = lambda ph: (ph - mid) / half
        # Upper lid points base+1, base+2 face the lower lid points base+5, base+4.
        up, lo = [base + 1, base + 2], [base + 5, base + 4]
        gaps = ang(lmk[up]) - ang(lmk[lo])
        x_l = xs(0.5 * (lp[up, 0] + lp[lo, 0]))
        g0 = gaps / np.cos(0.5 * np.pi * x_l)  # the profile's height at the eye's centre
        order = np.argsort(x_l)
        x = xs(sgn * PHI_EYE + np.angle(np.exp(1j * (phi - sgn * PHI_EYE))))
        g = np.interp(x, x_l[order], g0[order]) * np.cos(0.5 * np.pi * np.clip(x, -1.0, 1.0))
        # Full turn up to the lid's edge, fading to none ~8 mm beyond it.
        above = theta <= THETA_EYE
        edge_up = THETA_EYE - np.mean(lp[up, 1])
        edge_lo = np.mean(lp[lo, 1]) - THETA_EYE
        w_up = (1 - _smoothstep((THETA_EYE - theta - edge_up) / (0.026 * np.pi))) * above * skin
        w_lo = (1 - _smoothstep((theta - THETA_EYE - edge_lo) / (0.025 * np.pi))) * (~above) * skin
        rel = verts - c
        # The shut lid: each point turned by its own angle (fading towards brow and cheek), so the
        # skin between the lid and the brow stretches instead of sweeping over the eye.
        alpha = w_up * (-0.85 * g) + w_lo * (0.15 * g)
        ca, sa = np.cos(alpha), np.sin(alpha)
        rot = np.stack([rel[:, 0], ca * rel[:, 1] + sa * rel[:, 2], -sa * rel[:, 1] + ca * rel[:, 2]], -1)
        out[:, :, k] = (rot - rel) * skin[:, None]
    return out


def _iris_embedding(mesh):
    """Faces [10] + barycentrics [10, 3] of mediapipe's ten iris points (refined face mesh
    468-477) on the eyeballs: 468 the subject's right iris centre (the eyeball's front pole),
    then four points of its contour at `IRIS_ANGLE_DEG` from the pole: 469 towards +x, 470 up,
    471 towards -x, 472 down; 473-477 the same for the left eye (not mirrored). That is the
    order mediapipe's refined mesh gave on a frontal photo (tests/test_capture_landmarks.py:
    469/474 image-right of their centres, 470/475 above); mediapipe does not document it, so
    the tracker's iris term matches each horizontal pair in either order.
    """
    faces, verts = mesh["faces"], mesh["verts"]
    a = np.deg2rad(IRIS_ANGLE_DEG)
    dirs = np.array([[0, 0, 1.0], [np.sin(a), 0, np.cos(a)], [0, np.sin(a), np.cos(a)],
                     [-np.sin(a), 0, np.cos(a)], [0, -np.sin(a), np.cos(a)]])
    out_f, out_b = [], []
    for eye in (2, 1):                         # the subject's right eye (eye_id 2) first
        c = mesh["eye_centres"][eye - 1]
        fid = np.where((mesh["eye_id"][faces] == eye).all(1))[0]
        tri = verts[faces[fid]]
        for d in dirs:
            # The ray from the centre along d crosses exactly one triangle of the closed sphere.
            e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
            pv = np.cross(d, e2)
            det = np.einsum("fc,fc->f", e1, pv)
            s = c - tri[:, 0]
            u = np.einsum("fc,fc->f", s, pv) / det
            qv = np.cross(s, e1)
            v = np.einsum("c,fc->f", d, qv) / det
            t = np.einsum("fc,fc->f", e2, qv) / det
            hit = np.where((u >= -1e-9) & (v >= -1e-9) & (u + v <= 1 + 1e-9) & (t > 0))[0]
            if len(hit) == 0:
                raise AssertionError("iris ray missed the eyeball")
            h = hit[0]
            out_f.append(fid[h])
            out_b.append((1 - u[h] - v[h], u[h], v[h]))
    return np.asarray(out_f, np.int64), np.asarray(out_b, np.float64)


def _embed_param_points(mesh, params):
    """Face index + barycentrics of (phi, theta, side) points on the skin grid."""
    n_tri_pole = N_COLS
    faces_out, bary_out = [], []
    for ph, th, sd in params:
        w = _w_of_phi(ph)
        colf = (w + 1.0) / 2.0 * N_COLS
        j = int(np.floor(colf)) % N_COLS
        a = colf - np.floor(colf)
        s = _s_of_theta(th) * N_HEAD_ROWS  # ring index (1-based) as a float
        i = int(np.floor(s)) - 1            # the band between ring i and i + 1 (0-based rows)
        b = s - np.floor(s)
        mr = mesh["mouth_row"]
        if sd == 1:      # on the upper lip edge: band above the seam, bottom edge
            i, b = mr - 1, 1.0
        elif sd == -1:   # on the lower lip edge: band below the seam, top edge
            i, b = mr, 0.0
        if i < 0:
            raise ValueError("landmark too close to the top pole")
        # Face numbering follows _build_mesh: pole fan, bands above the seam, bands below.
        band = i
        face_base = n_tri_pole + 2 * N_COLS * band
        if b >= a:
            f = face_base + 2 * j
            bary = (1 - b, b - a, a)      # (v00, v10, v11)
        else:
            f = face_base + 2 * j + 1
            bary = (1 - a, b, a - b)      # (v00, v11, v01)
        faces_out.append(f)
        bary_out.append(bary)
    return np.asarray(faces_out, np.int64), np.asarray(bary_out, np.float64)


@functools.lru_cache(maxsize=None)
def build_default_head_arrays() -> dict:
    """Builds the default head model as numpy arrays in dhjax's FLAME layout.

    Returns a dict (cached; do not mutate) with:
      v_template [V, 3] f32 metres; faces [F, 3] i32; shapedirs [V, 3, 300]; exprdirs [V, 3, 100];
      posedirs [V, 3, 36]; j_regressor [5, V]; lbs_weights [V, 5]; parents [5] (-1, 0, 1, 1, 1);
      lmk_faces [68] i32 + lmk_bary [68, 3] (iBUG order, `landmark_schemes.LANDMARK68_NAMES`);
      mp_lmk_faces [51] + mp_lmk_bary [51, 3] + mp_indices [51] (mediapipe face-mesh ids,
      `landmark_schemes.MEDIAPIPE_INDICES`; point k is iBUG point MEDIAPIPE_TO_IBUG[k]);
      uv_coords [T, 2], uv_faces [F, 3]; regions {name: [V] bool} (REGION_NAMES);
      eyelids [V, 3, 2] (left, right eyelid closing blendshapes, `_eyelid_fields`);
      iris_faces [10] + iris_bary [10, 3] (mediapipe's iris points 468-477, `_iris_embedding`).
    Deterministic: the same arrays on every call and machine (fixed seeds, float64 maths).
    """
    mesh = _build_mesh()
    faces = mesh["faces"]
    normals = _seam_normals(mesh["verts"], faces,
                            mesh["rows_idx"][mesh["mouth_row"], mesh["mouth_inside"]], mesh["dup_ids"])
    rng = np.random.default_rng(20250425)

    sem = _semantic_shape_fields(mesh, normals)
    rnd = _random_fields(mesh, normals, N_SHAPE - sem.shape[-1], rng)
    shape_raw = _rigidify_eyes(np.concatenate([sem, rnd], -1), mesh)
    # Per-component peak displacement (metres per unit coefficient): a few mm for the semantic
    # components, chosen so that e.g. head breadth varies with a std of ~7 mm as in adults, then
    # 2.5 mm decaying for the random smooth fields.
    rnd_peak = 0.0025 * (1.0 + np.arange(N_SHAPE - len(SHAPE_SEMANTIC_PEAKS)) / 8.0) ** -1.0
    shapedirs = _orthogonalise(shape_raw, np.concatenate([SHAPE_SEMANTIC_PEAKS, rnd_peak]))

    regions = _region_masks(mesh)
    face_weight = np.clip(regions["face"] + 0.5 * regions["lips"], 0, 1).astype(float)
    esem = _semantic_expression_fields(mesh, normals)
    face_ids = np.where(regions["face"])[0]
    ernd = _random_fields(mesh, normals, N_EXPR - esem.shape[-1], rng, weight=face_weight,
                          centres_from=face_ids, sym_prob=0.7)
    expr_raw = np.concatenate([esem, ernd], -1)
    expr_raw[mesh["eye_id"] > 0] = 0.0
    # Peaks: 6 mm per unit for the semantic expressions, 3 mm decaying for the random fields, so
    # that coefficients ~N(0, 1) give moderate expressions (as FLAME's do).
    n_sem = esem.shape[-1]
    expr_peak = np.concatenate([np.full(n_sem, 0.006),
                                0.003 * (1.0 + np.arange(N_EXPR - n_sem) / 5.0) ** -1.5])
    exprdirs = _orthogonalise(expr_raw, expr_peak)

    W, J = _skinning(mesh)
    posedirs = _posedirs(mesh, normals, W, rng)

    lmk_params = _landmarks68_param()
    lmk_params[36:48] = _eyelid_params(mesh)
    lmk_faces, lmk_bary = _embed_param_points(mesh, lmk_params)
    eyelids = _eyelid_fields(dict(mesh, eyelid_landmarks=lmk_params[36:48]))
    iris_faces, iris_bary = _iris_embedding(mesh)
    mp_faces, mp_bary = lmk_faces[MEDIAPIPE_TO_IBUG], lmk_bary[MEDIAPIPE_TO_IBUG]

    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
    return dict(
        v_template=f32(mesh["verts"]), faces=faces.astype(np.int32), shapedirs=f32(shapedirs),
        exprdirs=f32(exprdirs), posedirs=f32(posedirs), j_regressor=f32(J), lbs_weights=f32(W),
        parents=np.array([-1, 0, 1, 1, 1], np.int32),
        lmk_faces=lmk_faces.astype(np.int32), lmk_bary=f32(lmk_bary),
        mp_lmk_faces=mp_faces.astype(np.int32), mp_lmk_bary=f32(mp_bary),
        mp_indices=MEDIAPIPE_INDICES.copy(),
        uv_coords=f32(mesh["uv_coords"]), uv_faces=mesh["uv_faces"].astype(np.int32),
        regions={k2: v.astype(bool) for k2, v in regions.items()},
        eyelids=f32(eyelids), iris_faces=iris_faces.astype(np.int32), iris_bary=f32(iris_bary),
    )

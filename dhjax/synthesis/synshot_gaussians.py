"""SynShot's Gaussians: initial Gaussians from a position map on a part's UV grid, the regressed
offsets applied, linear blend skinning of the head model, splatting into cameras, and export.

Shapes: [B, N, ...] Gaussians of B examples (N over all parts); maps [S, S, C] in the head
model's UV layout (metres for positions). Used by `dhjax.synthesis.synshot`.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.geometry import lbs as lbs_lib
from dhjax.geometry import rotations
from dhjax.geometry.vectors import nearest_neighbour_distance, safe_normalize
from dhjax.render import camera as camera_lib
from dhjax.render import shading
from dhjax.render import splat

_HI = jax.lax.Precision.HIGHEST
INIT_OPACITY = 0.7
SH_COEFFS = 16          # degree 3


def sample_grid(maps, uv):
    """Bilinear samples of maps [B,H,W,C] at uv [N,2] -> [B,N,C] (any map resolution)."""
    return jax.vmap(lambda m: shading.sample_texture(m, uv))(maps)


class Gaussians(NamedTuple):
    """Gaussians in model space (rest pose) or world space; [B, N, ...] with a batch axis.

    means [.., N, 3] metres; rotations [.., N, 3, 3]; log_scales [.., N, 3]; opacity_logits
    [.., N]; sh [.., N, 16, 3]; lbs_weights [.., N, J]; offsets: the raw regressor offsets
    {position [.., N, 3] (metres), rotation [.., N, 4], scale [.., N, 3], opacity [.., N]}.
    """

    means: jax.Array
    rotations: jax.Array
    log_scales: jax.Array
    opacity_logits: jax.Array
    sh: jax.Array
    lbs_weights: jax.Array
    offsets: dict


def grid_neighbour_distance(grid_points, valid):
    """Distance to the nearest of the 8 grid neighbours that are valid (a fast stand-in for the
    nearest neighbour on densely sampled smooth surfaces).

    Args:
      grid_points: [h, w, 3]; valid: [h, w] bool. Returns: [h, w] (inf where no neighbour).
    """
    h, w, _ = grid_points.shape
    p = jnp.pad(grid_points, ((1, 1), (1, 1), (0, 0)))
    v = jnp.pad(valid, ((1, 1), (1, 1)))
    best = jnp.full((h, w), jnp.inf, grid_points.dtype)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di == dj == 0:
                continue
            q = p[1 + di:1 + di + h, 1 + dj:1 + dj + w]
            ok = v[1 + di:1 + di + h, 1 + dj:1 + dj + w]
            d = jnp.sqrt(jnp.maximum(jnp.sum((grid_points - q) ** 2, -1), 1e-20))
            best = jnp.minimum(best, jnp.where(ok, d, jnp.inf))
    return best


def tbn_rotation(dpdu, dpdv):
    """Rotation [.., 3, 3] with columns (T, B, N): T = dphi/du normalised, N = T x B
    normalised, and B replaced by N x T so the frame is orthonormal (det +1)."""
    t = safe_normalize(dpdu)
    n = safe_normalize(jnp.cross(dpdu, dpdv))
    b = jnp.cross(n, t)
    return jnp.stack([t, b, n], -1)


def sample_positions_and_frames(phi, uv):
    """Bilinear samples of a position map and its exact UV derivatives.

    Args:
      phi: [S, S, 3] positions (metres); uv: [N, 2]. Returns: p [N, 3], dp/du [N, 3], dp/dv [N, 3].
    """
    f = lambda q: shading.sample_texture(phi, q)
    p, dpdu = jax.jvp(f, (uv,), (jnp.tile(jnp.array([[1.0, 0.0]]), (uv.shape[0], 1)),))
    _, dpdv = jax.jvp(f, (uv,), (jnp.tile(jnp.array([[0.0, 1.0]]), (uv.shape[0], 1)),))
    return p, dpdu, dpdv


def initial_gaussians(phi_map, part, nn_mode: str = "exact"):
    """Initial per-part Gaussians from one position map (before the regressed offsets).

    Args:
      phi_map: [S, S, 3] rest-pose positions (metres); part: `synshot.PartGrid`.
    Returns:
      dict(means [N, 3], rotations [N, 3, 3], log_scales [N, 3] (isotropic: log of the
      nearest-neighbour distance), opacity_logits [N] (logit 0.7)) for the part's N used points.
    """
    uv = part.uv[part.index]
    p, dpdu, dpdv = sample_positions_and_frames(phi_map, uv)
    if nn_mode == "exact":
        d = nearest_neighbour_distance(p)
    elif nn_mode == "grid":
        full = jnp.zeros((part.h * part.w, 3), p.dtype).at[part.index].set(p)
        valid = jnp.zeros((part.h * part.w,), bool).at[part.index].set(True)
        d = grid_neighbour_distance(full.reshape(part.h, part.w, 3), valid.reshape(part.h, part.w))
        d = d.reshape(-1)[part.index]
    else:
        raise ValueError(f"nn_mode must be 'exact' or 'grid', got {nn_mode!r}")
    d = jnp.clip(d, 1e-5, 0.05)
    n = p.shape[0]
    return dict(means=p, rotations=tbn_rotation(dpdu, dpdv),
                log_scales=jnp.broadcast_to(jnp.log(d)[:, None], (n, 3)),
                opacity_logits=jnp.full((n,), float(np.log(INIT_OPACITY / (1 - INIT_OPACITY))), jnp.float32))


def apply_offsets(parts, offset_scale: float) -> Gaussians:
    """Initial Gaussians + regressed offsets of every part, concatenated along N.

    Args:
      parts: per part (initial dict of `initial_gaussians` batched [B,N,...], SH [B,N,48],
        offsets [B,N,11] (position 3, rotation quaternion 4, log-scale 3, opacity logit 1),
        skinning weights [B,N,J]); offset_scale: metres per unit of the position offset.
    """
    cat = lambda xs: jnp.concatenate(xs, axis=1)
    means, rots, logs, ops, shs, ws, off_p, off_r, off_s, off_o = ([] for _ in range(10))
    for init, col, off, w in parts:
        b, n = col.shape[:2]
        dp = off[..., 0:3] * offset_scale
        dq = off[..., 3:7]
        ds, do = off[..., 7:10], off[..., 10]
        rot_delta = rotations.quaternion_to_matrix(dq + jnp.array([1.0, 0.0, 0.0, 0.0]))
        means.append(init["means"] + dp)
        rots.append(jnp.matmul(init["rotations"], rot_delta, precision=_HI))
        logs.append(init["log_scales"] + ds)
        ops.append(init["opacity_logits"] + do)
        shs.append(col.reshape(b, n, SH_COEFFS, 3))
        ws.append(w)
        off_p.append(dp), off_r.append(dq), off_s.append(ds), off_o.append(do)
    return Gaussians(means=cat(means), rotations=cat(rots), log_scales=cat(logs),
                     opacity_logits=cat(ops), sh=cat(shs), lbs_weights=cat(ws),
                     offsets=dict(position=cat(off_p), rotation=cat(off_r), scale=cat(off_s),
                                  opacity=cat(off_o)))


# ----------------------------------------------------------------------------------------------
# Posing and rendering.


def joint_transforms(assets, shape, expression, pose):
    """Relative joint transforms [B, J, 4, 4] of the head model for the given parameters (assets:
    `synshot.Assets`, whose joint basis, parents and coefficient counts are used).

    shape [B, S'], expression [B, E'], pose [B, J, 3] axis-angle (global, neck, jaw, eyes)."""
    b = shape.shape[0]
    coeffs = jnp.concatenate([
        jnp.ones((b, 1), jnp.float32),
        jnp.pad(shape, ((0, 0), (0, assets.n_shape - shape.shape[1]))),
        jnp.pad(expression, ((0, 0), (0, assets.n_expression - expression.shape[1])))], 1)
    joints = jnp.einsum("bk,kjc->bjc", coeffs, assets.joint_basis, precision=_HI)
    rot = rotations.axis_angle_to_matrix(pose)
    _, rel = lbs_lib.batch_rigid_transform(rot, joints, assets.parents)
    return rel


def pose_gaussians(g: Gaussians, rel, translation):
    """Model-space Gaussians [B,N,...] -> world means [B,N,3] and covariances [B,N,3,3] by
    linear blend skinning (rel [B,J,4,4]) plus translation [B,3]."""
    A = jnp.einsum("bnj,bjkl->bnkl", g.lbs_weights, rel, precision=_HI)          # [B,N,4,4]
    M = A[..., :3, :3]
    means = jnp.einsum("bnkl,bnl->bnk", M, g.means, precision=_HI) + A[..., :3, 3] + translation[:, None]
    R = jnp.matmul(M, g.rotations, precision=_HI)
    s2 = jnp.exp(2.0 * g.log_scales)
    cov = jnp.matmul(R * s2[..., None, :], jnp.swapaxes(R, -1, -2), precision=_HI)
    return means, cov


def make_cameras(K, R, t, width: int, height: int) -> camera_lib.Camera:
    """Batched Camera [B] from K [B,3,3], R [B,3,3], t [B,3]."""
    return camera_lib.Camera(K=jnp.asarray(K, jnp.float32), R=jnp.asarray(R, jnp.float32),
                             t=jnp.asarray(t, jnp.float32), width=int(width), height=int(height))


def render_gaussians(g: Gaussians, params: Mapping, assets, K, R, t, width: int, height: int,
                     *, backend: str = "auto", deterministic: bool = False):
    """Poses and splats each example's Gaussians into its camera (`backend` and `deterministic`:
    those of `dhjax.render.splat.rasterize`; deterministic only changes the CUDA backward).

    Args:
      g: Gaussians [B, N, ...] (model space); params: shape, expression, pose, translation [B, ...];
      K, R, t: [B, 3, 3], [B, 3, 3], [B, 3] (one camera per example) or [B, C, ...] (C cameras).
    Returns: image [B, (C,) H, W, 3] (black background), alpha [B, (C,) H, W, 1].
    """
    rel = joint_transforms(assets, params["shape"], params["expression"], params["pose"])
    means, cov = pose_gaussians(g, rel, params["translation"])
    opac = jax.nn.sigmoid(g.opacity_logits)
    multi = jnp.ndim(K) == 4

    def one(m, c, o, sh, k, r, tt):
        if not multi:
            k, r, tt = k[None], r[None], tt[None]
        cams = make_cameras(k, r, tt, width, height)
        out = splat.rasterize(m, None, None, o, sh, cams, sh_degree=3, covariances=c, render_mode="rgb",
                              backend=backend, deterministic=deterministic)
        img, alpha = out.image, out.alpha
        return (img, alpha) if multi else (img[0], alpha[0])

    return jax.vmap(one)(means, cov, opac, g.sh, K, R, t)


def export_gaussians(out, rel_index: int = 0):
    """World-independent (model space, rest pose) Gaussians of example `rel_index` as numpy arrays
    for `dhjax.io.save_gaussians_ply`: means [N,3], quats [N,4] (w,x,y,z), scales [N,3],
    opacities [N], sh [N,16,3]."""
    g = out["gaussians"]
    R = np.asarray(g.rotations[rel_index])
    quats = np.asarray(rotations.matrix_to_quaternion(jnp.asarray(R)))
    return dict(means=np.asarray(g.means[rel_index]), quats=quats,
                scales=np.exp(np.asarray(g.log_scales[rel_index])),
                opacities=np.asarray(jax.nn.sigmoid(g.opacity_logits[rel_index])),
                sh=np.asarray(g.sh[rel_index]))

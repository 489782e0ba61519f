"""The optimiser of `dhjax.capture.registration`: Adam in coordinates whitened by the Gauss-Newton
Hessian of the loss at the neutral head, for the rigid transform, pose, shape and expression.

    layout, D = body_layout(n_shape, n_expr)
    H_rigid, H_all = body_hessians(model, n_shape, n_expr, face_idx, weights)
    tx = whitened_adam(inverse_sqrt(H_rigid), inverse_sqrt(H_all), rigid_steps, schedule,
                       n_shape, n_expr, eps)                   # an optax.GradientTransformation
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dhjax.capture.registration_surface import MM, model_space
from dhjax.geometry import mesh as mesh_lib
from dhjax.geometry import rotations

__all__ = ["body_layout", "body_hessians", "inverse_sqrt", "WhitenedAdamState", "whitened_adam",
           "cosine"]


def body_layout(n_shape: int, n_expr: int):
    """Slices of the per-scan vector u = [omega (3), t (3), pose of joints 1..4 (12), shape,
    expression] the optimiser works on (omega, t: rigid motion in the head's own frame).

    Returns: ({name: slice}, D = len(u)).
    """
    sizes = dict(omega=3, t=3, pose=12, shape=n_shape, expression=n_expr)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = slice(start, start + size)
        start += size
    return out, start


def body_hessians(model, n_shape: int, n_expr: int, face_idx, w: Mapping[str, float]):
    """Gauss-Newton Hessians of the loss in u (see `body_layout`) at the neutral head.

    The Jacobian of the vertices (and landmarks) in u is taken at u = 0 in the head's frame, which
    is where every rigid pose looks the same: the loss is invariant to moving head and scan
    together, so a perturbation of the rotation and translation in the head's frame has the same
    Hessian for any scan pose. Terms: scan -> model (area-weighted mean squared normal
    displacement, plus the full displacement at the point-to-point weight), model -> scan (face
    region, normal displacement), landmarks, and the priors; distances in mm, as in the loss.

    Args:
      model: FlameModel. n_shape, n_expr: fitted coefficients. face_idx: [Vf] int vertices of
        the model -> scan term. w: the loss weights (`registration.default_config().weights`).
    Returns:
      (H_rigid [D, D] float64 for the rigid stage: only the 6 rigid rows/columns, landmarks at
      w['landmarks']; H_all [D, D] float64: everything, landmarks at w['landmarks_fine']).
    """
    layout, D = body_layout(n_shape, n_expr)

    def geometry(u):
        params = dict(shape=u[None, layout["shape"]], expression=u[None, layout["expression"]],
                      pose=jnp.concatenate([jnp.zeros((1, 1, 3)), u[layout["pose"]].reshape(1, 4, 3)], 1))
        verts, lmk = model_space(model, params)
        R = rotations.axis_angle_to_matrix(u[layout["omega"]])
        move = lambda x: x @ R.T + u[layout["t"]]
        return move(verts[0]), (None if lmk is None else move(lmk[0]))

    u0 = jnp.zeros((D,))
    jv, jl = jax.jacfwd(geometry)(u0)                     # [V, 3, D], [L, 3, D]
    verts, _ = geometry(u0)
    faces = model.faces
    normals = mesh_lib.vertex_normals(verts, faces)
    face_area = mesh_lib.face_areas(verts, faces)
    vert_area = jnp.zeros(verts.shape[0]).at[faces.reshape(-1)].add(jnp.repeat(face_area, 3) / 3.0)
    wa = vert_area / jnp.sum(vert_area)
    jv = jv * MM
    jn = jnp.einsum("vcd,vc->vd", jv, normals, precision="highest")
    hi = "highest"
    g_normal = jnp.einsum("vd,ve,v->de", jn, jn, wa, precision=hi)
    g_full = jnp.einsum("vcd,vce,v->de", jv, jv, wa, precision=hi)
    jf = jn[face_idx]
    g_face = jnp.einsum("vd,ve->de", jf, jf, precision=hi) / max(len(face_idx), 1)
    g_data = w["scan_to_model"] * (g_normal + w["point_to_point"] * g_full) + w["model_to_scan"] * g_face
    g_lmk = jnp.zeros((D, D))
    if jl is not None:
        jl = jl * MM
        g_lmk = jnp.einsum("lcd,lce->de", jl, jl, precision=hi) / jl.shape[0]
    prior = np.zeros(D)
    prior[layout["pose"]] = w["pose"]
    prior[layout["shape"]] = w["shape"]
    prior[layout["expression"]] = w["expression"]
    H_all = 2.0 * np.asarray(g_data + w["landmarks_fine"] * g_lmk, np.float64) + 2.0 * np.diag(prior)
    H_rigid = np.zeros((D, D))
    H_rigid[:6, :6] = 2.0 * np.asarray(g_data + w["landmarks"] * g_lmk, np.float64)[:6, :6]
    return H_rigid, H_all


def inverse_sqrt(H) -> np.ndarray:
    """Symmetric H^(-1/2) [D, D] float32 on the range of H [D, D] (eigenvalues below 1e-9 of the
    largest are left out)."""
    evals, evecs = np.linalg.eigh(H)
    keep = evals > 1e-9 * max(float(evals.max()), 1e-30)
    inv = np.where(keep, 1.0 / np.sqrt(np.where(keep, evals, 1.0)), 0.0)
    return np.asarray((evecs * inv) @ evecs.T, np.float32)


class WhitenedAdamState(NamedTuple):
    """State of `whitened_adam`: the step count and Adam's moments of the whitened vector z."""
    count: jax.Array      # [] int32 steps taken
    mu: jax.Array         # [S, D] first moment in whitened coordinates
    nu: jax.Array         # [S, D] second moment


def whitened_adam(P_rigid, P_all, rigid_steps: int, schedule: Callable, n_shape: int, n_expr: int,
                  eps: float, b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    """Adam on the whitened per-scan vector z = P^-1 u of `body_layout` (an optax transformation
    over the params dict; leaves other than the body's are passed through unchanged).

    Gradients are mapped to u: rotation (6D) gradients to a rotation vector in the head's frame
    (R -> R exp(omega)), translation gradients to the head's frame; then g_z = P g_u, an Adam step
    in z, and back: du = P dz, the rotation updated as R exp(domega) (written as a 6D difference,
    so the stored 6D stays orthonormal), the translation by R dt. P = H^(-1/2) of the rigid-only
    Hessian for the first `rigid_steps` steps (so nothing else moves), then of the full one; the
    moments restart at the switch. A large `eps` (against gradients in z, which are O(loss / mm))
    makes small steps plain momentum gradient descent with step lr / eps, while Adam's
    normalisation caps the early large ones at about lr.

    Args:
      P_rigid, P_all: [D, D] float32. rigid_steps: steps of the rigid stage.
      schedule: step count -> learning rate. n_shape, n_expr: fitted coefficients.
      eps, b1, b2: Adam's constants.
    """
    layout, D = body_layout(n_shape, n_expr)
    P_rigid, P_all = jnp.asarray(P_rigid), jnp.asarray(P_all)
    basis = jnp.asarray(np.stack([np.cross(np.eye(3)[k], -np.eye(3)) for k in range(3)]))  # [3,3,3]: [e_k]x

    def init_fn(params):
        S = params["shape"].shape[0]
        z = jnp.zeros((S, D), jnp.float32)
        return WhitenedAdamState(count=jnp.zeros((), jnp.int32), mu=z, nu=z)

    def update_fn(updates, state, params=None):
        R = rotations.rotation_6d_to_matrix(params["rotation"])            # [S, 3, 3]
        dR = jnp.einsum("sij,kjl->skil", R, basis)                          # d(R exp w)/dw_k
        d6 = jnp.concatenate([dR[..., :, 0], dR[..., :, 1]], -1)           # [S, 3, 6]
        g_omega = jnp.einsum("skd,sd->sk", d6, updates["rotation"])
        g_t = jnp.einsum("sji,sj->si", R, updates["translation"])         # R^T g
        g_u = jnp.concatenate([g_omega, g_t, updates["pose"][:, 1:].reshape(-1, 12),
                               updates["shape"], updates["expression"]], -1)
        count = state.count
        rigid = count < rigid_steps
        P = jnp.where(rigid, P_rigid, P_all)
        restart = count == rigid_steps
        mu = jnp.where(restart, 0.0, state.mu)
        nu = jnp.where(restart, 0.0, state.nu)
        t_stage = (jnp.where(rigid, count, count - rigid_steps) + 1).astype(jnp.float32)
        g_z = g_u @ P
        mu = b1 * mu + (1 - b1) * g_z
        nu = b2 * nu + (1 - b2) * g_z * g_z
        m_hat = mu / (1 - b1 ** t_stage)
        v_hat = nu / (1 - b2 ** t_stage)
        d_z = -schedule(count) * m_hat / (jnp.sqrt(v_hat) + eps)
        d_u = d_z @ P
        R_new = R @ rotations.axis_angle_to_matrix(d_u[:, layout["omega"]])
        out = dict(updates)
        out["rotation"] = rotations.matrix_to_rotation_6d(R_new) - params["rotation"]
        out["translation"] = jnp.einsum("sij,sj->si", R, d_u[:, layout["t"]])
        out["pose"] = jnp.concatenate([jnp.zeros_like(updates["pose"][:, :1]),
                                       d_u[:, layout["pose"]].reshape(-1, 4, 3)], 1)
        out["shape"] = d_u[:, layout["shape"]]
        out["expression"] = d_u[:, layout["expression"]]
        return out, WhitenedAdamState(count=count + 1, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def cosine(step, steps: int, final: float):
    """Cosine decay from 1 at step 0 to `final` at `steps` (held after)."""
    x = jnp.clip(step / steps, 0.0, 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * x))

"""GEM from a SynShot avatar: distils a SynShot avatar (the prior with a subject's identity maps,
or an avatar inverted from a few images, `synshot_invert`) into a Gaussian eigen model
(`dhjax.synthesis.gem`, thesis section A.4; the thesis's future-work item "distil any dhjax
Gaussian avatar into a GEM").

Collection (`collect`): for each of N expression/pose parameter sets, SynShot's network
(`synshot.forward`, the same entry point `synshot.predict` renders through) gives the avatar's
Gaussians in model space (rest pose) with their skinning weights; they are posed by SynShot's
linear blend skinning (`synshot_gaussians.joint_transforms`) with the global rotation zeroed and
no translation, which is GEM's *head frame* (neck, jaw and eyes kept). A head-frame point x lies
in the world at ``R_0 (x - j_0) + j_0 + t`` (j_0 the root joint of the frame's shape and
expression), so SynShot's world render of a frame equals the head-frame render seen by the
frame's cameras moved into the head frame (`gem.head_cameras` with `head_rigid`'s R_0, T).

GEM's attributes per Gaussian and frame: position [3] metres, rotation [4] unit quaternion
(w, x, y, z), log-scale [3] (log metres), opacity [1] logit. SynShot's posed covariance is
``C = F F^T`` with ``F = M R diag(s)`` (M: the Gaussian's skinning-weighted joint rotations,
R: its model-space rotation, s: its scales); GEM's rotation and scales come from
(`head_covariance_attributes`):

    rotation  U = polar rotation of M R          (= U_M R for a rotation R)
    log-scale 1/2 log diag(U^T C U)              (the variances along U's axes)

Deviations, stated:
  * Covariance. A blend of joint rotations is not a rotation, so C need not be diagonal in U's
    frame; its off-diagonal part is dropped (GEM needs rotation and scale as separate attributes
    for its per-attribute PCA; `gem.pose_gaussians` drops the anisotropic part of its deformation
    gradients likewise, keeping log det^(1/3) instead of the axis variances). It is exact where M
    is a rotation: every Gaussian when neck, jaw and eyes are at rest. `collect` reports the
    largest relative covariance error per frame (``covariance_error``, relative to
    max(|C|, (0.1 mm)^2)).
  * Degenerate SynShot frames. SynShot's tangent frame is singular where the decoded position
    map has a zero UV derivative (e.g. grid points on the map's last row or column, where the
    clamped bilinear derivative vanishes): R has zero columns and C is flat, a needle or a point.
    There U is the eigenframe of C (exact), scales below 1e-8 m are floored at 1e-8 m, and the
    rotation about the zero axes is arbitrary (it changes no render, but is not smooth over the
    frames). `collect` counts such Gaussians (``n_degenerate``).
  * Quaternion signs. q and -q are one rotation; each Gaussian's quaternions are put in the
    hemisphere of a fixed per-Gaussian reference (default: its quaternion of the first frame),
    otherwise sign flips would break the PCA. `distil_collected` then moves each Gaussian's
    quaternions into the hemisphere of their own mean (`mean_hemisphere`), the reference that
    `project` uses for any frame, so that the training frames' coefficients are their
    projections even where a Gaussian turns by more than 90 degrees from its first frame.
  * Colour. SynShot regresses SH colours (degree 3) per frame; a GEM has one colour per Gaussian
    (`gem.EigenModel.sh`). `distil_synshot` uses the mean of the N frames' head-frame SH
    coefficients and reports the RMS of the per-frame deviation from it (`info`).
  * SH frame. SynShot evaluates SH at world view directions; GEM at head-frame ones. The
    collected SH of a frame are SynShot's coefficients rotated by the frame's global rotation
    (``c_head(d) = c_world(R_0 d)``, `rotate_sh`), so that each frame's head-frame render equals
    SynShot's world render; with a zero global rotation they are SynShot's own.
  * Background. SynShot renders on black; the distilled GEM's background is black by default.

Evaluation (`evaluate`): SynShot's own renders (`synshot.predict`) of held-out frames against
GEM renders at the frames' projected coefficients (k = (x - mean) B^T per attribute) and at
coefficients fitted to SynShot's renders (`gem.fit_coefficients`), PSNR per frame, and the
GEM's size against the SynShot avatar's parameters. `run_distillation` does all of this for the
folder of a `synshot_run.run_invert` run (`load_inverted_avatar` reads it: the inverted network,
its identity code q_id, and the subject's tracked shape and held-out images from its dataset).
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dhjax import io as dio
from dhjax import losses
from dhjax.data import synthetic
from dhjax.data import textures
from dhjax.geometry import rotations
from dhjax.models import flame
from dhjax.render import camera as camera_lib
from dhjax.render import splat
from dhjax.synthesis import gem
from dhjax.synthesis import synshot
from dhjax.synthesis import synshot_gaussians as gs
from dhjax.synthesis import synshot_invert as inv
from dhjax.synthesis import synshot_run
from dhjax.train import app
from dhjax.train import checkpoint as ckpt_lib

_HI = jax.lax.Precision.HIGHEST
ATTRIBUTES = gem.ATTRIBUTES
# Directions at which SH are sampled to rotate them (a Fibonacci sphere, well conditioned for
# degree <= 3: 64 samples of 16 basis functions).
_N_SH_DIRS = 64
MIN_SCALE = 1e-8        # metres: floor of the collected scales (flat or point-like Gaussians)
ERROR_FLOOR = 1e-4      # metres: covariance errors are relative to max(|C|, ERROR_FLOOR^2)


# ----------------------------------------------------------------------------------------------
# Inputs.


def check_frames(expression, pose, translation=None, *, n_joints: int = 5, n_expression: int | None = None):
    """Validates N frames' parameters; returns them as float32 numpy arrays.

    Args:
      expression: [N, E] coefficients; pose: [N, J, 3] axis-angle (global, neck, jaw, eyes);
      translation: optional [N, 3] metres; n_joints: J; n_expression: the most coefficients
        the head model has (None: unchecked).
    Raises ValueError (naming the argument and shapes) for no frames, mismatched N, wrong
    shapes or non-finite values.
    """
    expr = np.asarray(expression, np.float32)
    pose = np.asarray(pose, np.float32)
    if expr.ndim != 2:
        raise ValueError(f"expression must be [N, E] (N frames), got shape {expr.shape}")
    if expr.shape[0] == 0:
        raise ValueError("no frames: expression has N = 0 rows; give at least one expression/pose set")
    if pose.shape != (expr.shape[0], n_joints, 3):
        if pose.ndim == 3 and pose.shape[0] != expr.shape[0]:
            raise ValueError(f"expression has {expr.shape[0]} frames but pose has {pose.shape[0]} "
                             f"(expression [N, E] and pose [N, {n_joints}, 3] must have the same N)")
        raise ValueError(f"pose must be [N, {n_joints}, 3] = [{expr.shape[0]}, {n_joints}, 3] axis-angle, "
                         f"got shape {pose.shape}")
    if n_expression is not None and expr.shape[1] > n_expression:
        raise ValueError(f"expression has {expr.shape[1]} coefficients, the head model only {n_expression}")
    out = [expr, pose]
    if translation is not None:
        tr = np.asarray(translation, np.float32)
        if tr.shape != (expr.shape[0], 3):
            raise ValueError(f"translation must be [N, 3] = [{expr.shape[0]}, 3] metres, got shape {tr.shape}")
        out.append(tr)
    for name, a in zip(("expression", "pose", "translation"), out):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} has non-finite values")
    return tuple(out)


def _check_identity(identity: Mapping, ctx: synshot.Context, q_id):
    """(shape [S'], uv_albedo [T,T,3], uv_position [T,T,3]) of an identity; zero maps at
    model.map_size when q_id is given and the maps are not (the network ignores them then)."""
    if "shape" not in identity:
        raise ValueError("identity lacks 'shape' (the subject's [S'] head-model shape coefficients, "
                         "needed for the skinning joints)")
    shape = np.asarray(identity["shape"], np.float32)
    if shape.ndim != 1 or not np.all(np.isfinite(shape)):
        raise ValueError(f"identity 'shape' must be a finite [S'] vector, got shape {shape.shape}")
    if shape.shape[0] > ctx.assets.n_shape:
        raise ValueError(f"identity 'shape' has {shape.shape[0]} coefficients, the head model only "
                         f"{ctx.assets.n_shape}")
    have = [k for k in ("uv_albedo", "uv_position") if k in identity and identity[k] is not None]
    if len(have) < 2:
        if q_id is None:
            raise ValueError("identity lacks 'uv_albedo' and/or 'uv_position' ([T, T, 3] maps, e.g. from "
                             "synshot_invert.subject_maps): the prior needs them unless the identity code "
                             "q_id of an inverted avatar is given")
        S = ctx.assets.map_size
        return shape, np.zeros((S, S, 3), np.float32), np.zeros((S, S, 3), np.float32)
    alb = np.asarray(identity["uv_albedo"], np.float32)
    pos = np.asarray(identity["uv_position"], np.float32)
    if alb.ndim != 3 or alb.shape[0] != alb.shape[1] or alb.shape[2] != 3 or pos.shape != alb.shape:
        raise ValueError(f"identity maps must both be [T, T, 3], got uv_albedo {alb.shape} and "
                         f"uv_position {pos.shape}")
    return shape, alb, pos


def _check_q_id(q_id):
    if q_id is None:
        return None
    q = jnp.asarray(q_id, jnp.float32)
    if q.ndim == 3:
        q = q[None]
    if q.ndim != 4 or q.shape[0] != 1:
        raise ValueError(f"q_id must be the avatar's identity code [1, h, w, n] (or [h, w, n]), got "
                         f"shape {tuple(q.shape)}")
    return q


def expression_maps(head_model, expression, uv_size: int, *, fields=None) -> np.ndarray:
    """SynShot's expression input maps of N expressions: [N, T, T, 3] metres (T = uv_size), the
    displacement of the head model's expression blendshapes (`textures.expression_offset_map`).

    expression: [N, E]; fields: the model's `textures.UVFields` at T (rasterised when None)."""
    fields = textures.uv_fields(head_model, int(uv_size)) if fields is None else fields
    return np.asarray(_expression_maps(head_model, fields, jnp.asarray(expression, jnp.float32)))


@jax.jit
def _expression_maps(head_model, fields, expression):
    return jax.vmap(lambda e: textures.expression_offset_map(head_model, fields, e))(expression)


def _default_head_model(head_model):
    return flame.load() if head_model is None else head_model


# ----------------------------------------------------------------------------------------------
# SH rotation and the rigid head pose.


@functools.lru_cache(maxsize=None)
def _sh_frame(degree: int):
    """(directions [P, 3], pinv(Y(directions)) [K, P]) in float32 for `rotate_sh`."""
    i = np.arange(_N_SH_DIRS) + 0.5
    z = 1.0 - 2.0 * i / _N_SH_DIRS
    r = np.sqrt(1.0 - z * z)
    phi = np.pi * (1.0 + 5.0 ** 0.5) * i
    dirs = np.stack([r * np.cos(phi), r * np.sin(phi), z], -1)
    with jax.ensure_compile_time_eval():
        Y = np.asarray(splat.sh_basis(degree, jnp.asarray(dirs, jnp.float32)), np.float64)
    return dirs.astype(np.float32), np.linalg.pinv(Y).astype(np.float32)


def rotate_sh(sh, R) -> jax.Array:
    """SH colour coefficients of ``d -> c(R d)``: the colour function c (3DGS's real SH basis,
    degree 0..3) seen in a frame rotated by R.

    Args:
      sh: [..., K, 3] coefficients, K = (degree + 1)^2; R: [..., 3, 3] rotations (broadcast
        against sh's leading axes).
    Returns:
      [..., K, 3]. Exact up to float round-off: each band is closed under rotation, so the
      rotated function is fitted by least squares at 64 directions without residual.
    """
    sh = jnp.asarray(sh, jnp.float32)
    K = sh.shape[-2]
    degree = int(round(math.sqrt(K))) - 1
    if (degree + 1) ** 2 != K or not 0 <= degree <= 3:
        raise ValueError(f"sh must be [..., (d+1)^2, 3] with d in 0..3, got shape {tuple(sh.shape)}")
    dirs, pinv = _sh_frame(degree)
    rd = jnp.einsum("...ij,pj->...pi", jnp.asarray(R, jnp.float32), dirs, precision=_HI)
    values = jnp.einsum("...pk,...kc->...pc", splat.sh_basis(degree, rd), sh, precision=_HI)
    return jnp.einsum("kp,...pc->...kc", pinv, values, precision=_HI)


def head_rigid(assets: synshot.Assets, shape, expression, pose, translation):
    """The rigid head pose of N frames under SynShot's skinning: (R_0 [N, 3, 3], T [N, 3]) with
    world = R_0 x + T for head-frame points x (T = j_0 - R_0 j_0 + translation, j_0 the root
    joint of the frame's shape and expression).

    shape [S'] (or [N, S']), expression [N, E], pose [N, J, 3] axis-angle, translation [N, 3]."""
    expression = jnp.asarray(expression, jnp.float32)
    n = expression.shape[0]
    shape = jnp.asarray(shape, jnp.float32)
    shape = jnp.broadcast_to(shape, (n, shape.shape[-1]))
    rel = gs.joint_transforms(assets, shape, expression, jnp.asarray(pose, jnp.float32))
    return rel[:, 0, :3, :3], rel[:, 0, :3, 3] + jnp.asarray(translation, jnp.float32)


# ----------------------------------------------------------------------------------------------
# Collection.


def _flip_last_column(W, flip):
    f = jnp.where(flip, -1.0, 1.0)
    return W * jnp.stack([jnp.ones_like(f), jnp.ones_like(f), f], -1)[..., None, :]


def head_covariance_attributes(M, R, log_scales):
    """GEM rotation and log-scale of skinned Gaussians (module docstring, "Covariance").

    Args:
      M: [..., 3, 3] skinning-weighted joint rotations; R: [..., 3, 3] model-space rotations
        (SynShot's; degenerate where its tangent frame is); log_scales: [..., 3].
    Returns:
      (rotation matrices [..., 3, 3], log-scales [..., 3], relative Frobenius error [...] of the
      covariance they give against the skinned covariance F F^T, F = M R diag(exp(log_scales))).
    """
    MR = jnp.matmul(M, R, precision=_HI)
    F = MR * jnp.exp(log_scales)[..., None, :]
    cov = jnp.matmul(F, jnp.swapaxes(F, -1, -2), precision=_HI)
    W, _, Vt = jnp.linalg.svd(MR)
    W = _flip_last_column(W, jnp.linalg.det(W) * jnp.linalg.det(Vt) < 0)
    polar = jnp.matmul(W, Vt, precision=_HI)                       # rotation of M R's polar decomposition
    var_polar = jnp.einsum("...ji,...jk,...ki->...i", polar, cov, polar, precision=_HI)
    Wf, svf, _ = jnp.linalg.svd(F)                                 # eigenframe of F F^T (exact)
    Wf = _flip_last_column(Wf, jnp.linalg.det(Wf) < 0)
    degenerate = jnp.abs(jnp.linalg.det(R)) < 0.5
    rot = jnp.where(degenerate[..., None, None], Wf, polar)
    var = jnp.where(degenerate[..., None], svf ** 2, var_polar)
    scale = 0.5 * jnp.log(jnp.maximum(var, MIN_SCALE ** 2))
    approx = jnp.matmul(rot * jnp.exp(2.0 * scale)[..., None, :], jnp.swapaxes(rot, -1, -2), precision=_HI)
    norm = jnp.maximum(jnp.sqrt(jnp.sum(cov ** 2, (-1, -2))), ERROR_FLOOR ** 2)
    err = jnp.sqrt(jnp.sum((approx - cov) ** 2, (-1, -2))) / norm
    return rot, scale, err


@functools.partial(jax.jit, static_argnames=("ctx",))
def _collect_chunk(variables, maps_in, q_id, shape, expression, pose, ctx):
    n = expression.shape[0]
    q = None if q_id is None else jnp.broadcast_to(q_id, (n,) + q_id.shape[1:])
    out, _ = synshot.forward(variables, maps_in, ctx, train=False, q_id=q)
    g = out["gaussians"]
    shape_b = jnp.broadcast_to(shape, (n, shape.shape[-1]))
    rel = gs.joint_transforms(ctx.assets, shape_b, expression, pose.at[:, 0].set(0.0))   # head frame
    A = jnp.einsum("bnj,bjkl->bnkl", g.lbs_weights, rel, precision=_HI)
    M = A[..., :3, :3]
    position = jnp.einsum("bnkl,bnl->bnk", M, g.means, precision=_HI) + A[..., :3, 3]
    R, scale, err = head_covariance_attributes(M, g.rotations, g.log_scales)
    R0, _ = head_rigid(ctx.assets, shape, expression, pose, jnp.zeros((n, 3), jnp.float32))
    sh = rotate_sh(g.sh, R0[:, None])
    degenerate = jnp.abs(jnp.linalg.det(g.rotations)) < 0.5
    return dict(position=position, rotation=rotations.matrix_to_quaternion(R), scale=scale,
                opacity=g.opacity_logits[..., None], sh=sh, covariance_error=jnp.max(err, -1),
                n_degenerate=jnp.sum(degenerate, -1))


def _chunks(n: int, chunk: int, *arrays):
    """Yields (number of real frames, arrays[s:s + chunk] padded to `chunk` frames by repeating
    the last one): every call then has the same shapes, so one compiled program serves any N."""
    chunk = int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 frames, got {chunk}")
    for s in range(0, n, chunk):
        real = min(chunk, n - s)
        pad = lambda a: np.concatenate([a[s:s + real], np.repeat(a[s + real - 1:s + real], chunk - real, 0)], 0)
        yield real, tuple(pad(np.asarray(a)) for a in arrays)


def _align(q, ref):
    s = jnp.sign(jnp.sum(q * ref, -1, keepdims=True))
    return q * jnp.where(s == 0, 1.0, s)


def collect(state: Mapping, ctx: synshot.Context, identity: Mapping, expression, pose, *, q_id=None,
            head_model=None, reference=None, chunk: int = 8) -> dict:
    """Head-frame attributes of a SynShot avatar at N expression/pose parameter sets, in GEM's
    convention (module docstring).

    Args:
      state: SynShot's {params, stats} (a prior's or an inverted avatar's state; other entries,
        e.g. opt_state, are ignored).
      ctx: `synshot.make_context(model_cfg, assets, width, height)` of the model the state is of.
      identity: {shape [S'] (required: skinning joints), uv_albedo [T, T, 3] in [0, 1],
        uv_position [T, T, 3] metres (the neutral position map)} as `synshot_invert.subject_maps`
        makes them; the maps may be left out when q_id is given (the network ignores them).
      expression: [N, E] head-model expression coefficients; pose: [N, 5, 3] axis-angle (its
        global rotation only rotates the SH, see the module docstring).
      q_id: the identity code [1, h, w, n] of an inverted avatar (`synshot_invert.frozen_code`),
        or None (the prior's encoder codes the identity maps).
      head_model: the FlameModel SynShot's assets were built from (default: the embedded head);
        used for the expression input maps.
      reference: [G, 4] hemisphere reference of the quaternions (default: the first frame's).
      chunk: frames per network call (a memory bound; the last call is padded to chunk frames,
        so that one compiled program serves every N).
    Returns:
      {position [N, G, 3] metres, rotation [N, G, 4] unit quaternions (w, x, y, z) with
      q . reference >= 0, scale [N, G, 3] log metres, opacity [N, G, 1] logits, sh [N, G, 16, 3]
      head-frame SH colours (degree 3), covariance_error [N] (the largest relative Frobenius error
      of a Gaussian's covariance, module docstring; float round-off when neck, jaw and eyes are at
      rest), n_degenerate [N] (Gaussians with a singular SynShot tangent frame)}, numpy.
    """
    head_model = _default_head_model(head_model)
    q = _check_q_id(q_id)
    shape, alb, pos = _check_identity(identity, ctx, q)
    expr, pose = check_frames(expression, pose, n_joints=len(ctx.assets.parents), n_expression=ctx.assets.n_expression)
    n, T = expr.shape[0], alb.shape[0]
    exmaps = expression_maps(head_model, expr, T)
    variables = synshot.net_variables(state["params"], state.get("stats", {}))
    parts = []
    for real, (e, p, x) in _chunks(n, chunk, expr, pose, exmaps):
        maps_in = synshot.normalise_maps(ctx.assets, ctx.model_cfg, np.broadcast_to(alb, x.shape),
                                         np.broadcast_to(pos, x.shape), x)
        out = _collect_chunk(variables, maps_in, q, jnp.asarray(shape), jnp.asarray(e), jnp.asarray(p), ctx)
        parts.append({k: np.asarray(v)[:real] for k, v in out.items()})
    res = {k: np.concatenate([p_[k] for p_ in parts], 0) for k in parts[0]}
    ref = res["rotation"][0] if reference is None else np.asarray(reference, np.float32)
    if ref.shape != res["rotation"].shape[1:]:
        raise ValueError(f"reference must be [G, 4] = {list(res['rotation'].shape[1:])}, got {list(ref.shape)}")
    res["rotation"] = np.asarray(_align(jnp.asarray(res["rotation"]), jnp.asarray(ref)[None]))
    return res


# ----------------------------------------------------------------------------------------------
# Distillation.


def colour_statistics(sh) -> dict:
    """How much per-frame SH colours [N, G, K, 3] deviate from their mean over the frames:
    {rms: RMS over frames, Gaussians, coefficients and channels (SH units), rms_dc_rgb: RMS of the
    view-independent colour's deviation (RGB units, SH_C0 x the DC deviation), max_rgb_bound:
    the largest deviation of any Gaussian's colour in any view direction (RGB units,
    |Y(d)| |delta c| with |Y(d)| = sqrt(K / (4 pi)), an upper bound on a render's per-pixel change
    from the mean colours)}."""
    sh = np.asarray(sh, np.float64)
    dev = sh - sh.mean(0, keepdims=True)
    K = sh.shape[2]
    per = np.sqrt(np.sum(dev ** 2, axis=2))                   # [N, G, 3]
    return dict(rms=float(np.sqrt(np.mean(dev ** 2))),
                rms_dc_rgb=float(splat.SH_C0 * np.sqrt(np.mean(dev[:, :, 0] ** 2))),
                max_rgb_bound=float(np.sqrt(K / (4 * np.pi)) * per.max()))


def mean_hemisphere(rotation) -> np.ndarray:
    """Quaternions [N, G, 4] with signs chosen so that each Gaussian's N quaternions all lie in
    the hemisphere of their mean: q_i . sum_j q_j >= 0 for every i, in float32 (the rotations
    are unchanged).

    Flips the quaternions on the wrong side, round after round, until none is. Flipping a set F
    of them, each with q . S < 0, lengthens S = sum_j q_j (|S - 2 sum_F q|^2 = |S|^2 - 4 sum_F
    q . S + 4 |sum_F q|^2), so it ends; random quaternions took up to 45 rounds for N = 256.
    Each round only revisits the Gaussians that changed. float32 throughout (sums in float64):
    one copy of a paper-scale capture. RuntimeError if it has not ended after 4N + 64 rounds
    (a safeguard: the bound on the rounds is not proven, only that they are finite)."""
    q = np.array(rotation, np.float32)
    if q.ndim != 3 or q.shape[-1] != 4:
        raise ValueError(f"rotation must be [N, G, 4] quaternions, got {list(q.shape)}")
    active = np.arange(q.shape[1])
    for _ in range(4 * q.shape[0] + 64):
        sub = q[:, active]
        wrong = np.einsum("ngc,gc->ng", sub, sub.sum(0, dtype=np.float64).astype(np.float32)) < 0
        changed = wrong.any(0)
        if not changed.any():
            return q
        active, sub, wrong = active[changed], sub[:, changed], wrong[:, changed]
        sub[wrong] *= -1.0
        q[:, active] = sub
    raise RuntimeError(f"mean_hemisphere: {len(active)} Gaussians still flip after {4 * q.shape[0] + 64} rounds")


def distil_collected(collected: Mapping, n_components: int, *, sh_degree: int = 3, background=(0.0, 0.0, 0.0),
                     method: str = "auto") -> tuple[gem.EigenModel, dict, dict]:
    """`gem.distil` of `collect`'s output with the mean of the frames' SH as the colour.

    Args:
      collected: `collect`'s dict ({attribute: [N, G, A]}, sh [N, G, K, 3]); n_components: M,
        1 <= M <= N - 1.
    Returns:
      (EigenModel, k {attribute: [N, M]}, info {explained_variance_ratio {attribute: [M]},
      colour: `colour_statistics`, covariance_error (largest over the frames), n_frames}).
    """
    missing = [a for a in ATTRIBUTES + ("sh",) if a not in collected]
    if missing:
        raise ValueError(f"collected attributes lack {missing} (use gem_synshot.collect)")
    n = int(np.shape(collected["position"])[0])
    for a in ATTRIBUTES + ("sh",):
        if np.shape(collected[a])[0] != n:
            raise ValueError(f"collected '{a}' has {np.shape(collected[a])[0]} frames, 'position' {n}")
    if n < 2:
        raise ValueError(f"distilling needs at least 2 frames (a PCA of N frames has at most N - 1 "
                         f"components), got {n}")
    if not 1 <= int(n_components) <= n - 1:
        raise ValueError(f"n_components={n_components} must be in [1, N - 1] = [1, {n - 1}] for {n} frames")
    sh = np.asarray(collected["sh"], np.float32)
    # The quaternions in the hemisphere of their mean, which `project` aligns any frame to.
    collected = dict(collected, rotation=mean_hemisphere(collected["rotation"]))
    model, k, ratio = gem.distil(collected, sh.mean(0), int(n_components), sh_degree=sh_degree,
                                 background=background, method=method)
    cov_err = float(np.max(collected["covariance_error"])) if "covariance_error" in collected else 0.0
    info = dict(explained_variance_ratio={a: np.asarray(r) for a, r in ratio.items()},
                colour=colour_statistics(sh), n_frames=n, covariance_error=cov_err)
    return model, k, info


def distil_synshot(state: Mapping, ctx: synshot.Context, identity: Mapping, expression, pose, n_components: int, *,
                   q_id=None, head_model=None, background=(0.0, 0.0, 0.0), method: str = "auto",
                   chunk: int = 8) -> tuple[gem.EigenModel, dict, dict]:
    """Distils a SynShot avatar into a GEM: `collect` at N expression/pose sets, one PCA per
    attribute with M components (`gem.distil`).

    Deviation, stated: a GEM has one colour per Gaussian, SynShot regresses one per frame; the
    GEM's colours are the mean of the N frames' head-frame SH coefficients, and
    info["colour"] reports the RMS of the per-frame deviation from that mean (`colour_statistics`;
    its max_rgb_bound bounds the per-pixel change this makes to any render).

    Args: as `collect`; n_components: M in [1, N - 1]; background: the GEM's background colour
      (SynShot renders on black).
    Returns:
      (EigenModel, k {attribute: [N, M]} the frames' coefficients, info (`distil_collected`)).
    """
    expr, pose = check_frames(expression, pose, n_joints=len(ctx.assets.parents),
                              n_expression=ctx.assets.n_expression)
    if expr.shape[0] < 2 or not 1 <= int(n_components) <= expr.shape[0] - 1:
        raise ValueError(f"n_components={n_components} must be in [1, N - 1] for N = {expr.shape[0]} frames "
                         f"(distilling needs at least 2 frames)")
    collected = collect(state, ctx, identity, expr, pose, q_id=q_id, head_model=head_model, chunk=chunk)
    return distil_collected(collected, n_components, sh_degree=3, background=background, method=method)


def project(model: gem.EigenModel, attrs: Mapping) -> dict:
    """Coefficients of head-frame attributes: k_a = (x_a - mean_a) B_a^T.

    attrs: {attribute: [..., G, A]} (quaternions are first put in the hemisphere of the model's
    mean rotation). Returns {attribute: [..., M]}."""
    G = model.n_gaussians
    for a in ATTRIBUTES:
        if a not in attrs or tuple(np.shape(attrs[a])[-2:]) != (G, gem.ATTRIBUTE_DIMS[a]):
            raise ValueError(f"attrs['{a}'] must be [..., {G}, {gem.ATTRIBUTE_DIMS[a]}], got "
                             f"{None if a not in attrs else tuple(np.shape(attrs[a]))}")
    x = {a: jnp.asarray(attrs[a], jnp.float32) for a in ATTRIBUTES}
    x["rotation"] = _align(x["rotation"], model.mean["rotation"].reshape(G, 4))
    flat = gem.flatten_attributes(x)
    return {a: jnp.einsum("...d,md->...m", flat[a] - model.mean[a], model.basis[a], precision=_HI)
            for a in ATTRIBUTES}


# ----------------------------------------------------------------------------------------------
# Evaluation.


def parameter_bytes(state: Mapping, q_id=None) -> int:
    """Bytes of a SynShot avatar as stored: all its network parameters (an inverted avatar's
    identity encoder included, though with q_id it is not run), codebook statistics and the
    identity code q_id [1, h, w, n] (when given)."""
    leaves = jax.tree_util.tree_leaves((state["params"], state.get("stats", {}), q_id))
    return int(sum(np.asarray(x).nbytes for x in leaves))


@functools.partial(jax.jit, static_argnames=("backend",))
def _render_gem(model, k, cameras, backend="auto"):
    return gem.render(model, k, cameras, backend=backend)


def frame_cameras(cameras: camera_lib.Camera, n: int) -> camera_lib.Camera:
    """Cameras of N frames: one camera, cameras [C] shared by every frame, or per frame [N, C]
    -> Camera with batch [N, C]."""
    t = np.shape(cameras.t)
    if len(t) not in (1, 2, 3) or (len(t) == 3 and t[0] != n):
        raise ValueError(f"cameras must be one camera, a batch [C] or per frame [N, C] = [{n}, C]; got t of "
                         f"shape {t}")
    C = 1 if len(t) == 1 else t[-2]
    bc = lambda a, tail: jnp.broadcast_to(jnp.asarray(a, jnp.float32).reshape((-1, C) + tail)
                                          if len(t) == 3 else jnp.asarray(a, jnp.float32).reshape((C,) + tail),
                                          (n, C) + tail)
    return camera_lib.Camera(K=bc(cameras.K, (3, 3)), R=bc(cameras.R, (3, 3)), t=bc(cameras.t, (3,)),
                             width=int(cameras.width), height=int(cameras.height))


def synshot_render(state: Mapping, ctx: synshot.Context, identity: Mapping, expression, pose, translation,
                   cameras: camera_lib.Camera, *, q_id=None, head_model=None, chunk: int = 8) -> np.ndarray:
    """SynShot's own render (`synshot.predict`) of N frames in world cameras: [N, C, H, W, 3] on
    black (H, W: the cameras' size). Arguments as `collect`; translation [N, 3] metres; cameras:
    one, [C] shared by the frames, or [N, C] (`frame_cameras`)."""
    head_model = _default_head_model(head_model)
    q = _check_q_id(q_id)
    shape, alb, pos = _check_identity(identity, ctx, q)
    expr, pose, tr = check_frames(expression, pose, translation, n_joints=len(ctx.assets.parents),
                                  n_expression=ctx.assets.n_expression)
    n, T = expr.shape[0], alb.shape[0]
    cams = frame_cameras(cameras, n)
    rctx = ctx if (ctx.width, ctx.height) == (cams.width, cams.height) else ctx.replace(
        width=int(cams.width), height=int(cams.height))
    exmaps = expression_maps(head_model, expr, T)
    images = []
    for real, (e, p, t_, x, K, R, t) in _chunks(n, chunk, expr, pose, tr, exmaps, cams.K, cams.R, cams.t):
        m = e.shape[0]
        bc = lambda a: np.broadcast_to(np.asarray(a, np.float32), (m,) + np.shape(a))
        batch = dict(uv_albedo=bc(alb), uv_position=bc(pos), uv_expression_offset=x, shape=bc(shape), expression=e,
                     pose=p, translation=t_, K=K, R=R, t=t)
        qb = None if q is None else jnp.broadcast_to(q, (m,) + q.shape[1:])
        image, _, _ = _predict(state, batch, qb, rctx)
        images.append(np.asarray(image)[:real])
    return np.concatenate(images, 0)


@functools.partial(jax.jit, static_argnames=("ctx",))
def _predict(state, batch, q_id, ctx):
    return synshot.predict({"params": state["params"], "stats": state.get("stats", {})}, batch, ctx, q_id=q_id)


def evaluate(model: gem.EigenModel, state: Mapping, ctx: synshot.Context, identity: Mapping, expression, pose,
             translation, cameras: camera_lib.Camera, *, q_id=None, head_model=None, fit_steps: int = 100,
             fit_lr: float = 0.05, fit_prior_weight: float = 1e-3, backend: str = "auto",
             return_images: bool = False, chunk: int = 8) -> dict:
    """A distilled GEM against its SynShot avatar on held-out frames.

    For each of N held-out frames, SynShot's own render in world cameras (`synshot_render`, the
    reference) is compared with the GEM rendered (`gem.render`, on the model's background: black
    from `distil_synshot`) in the same cameras moved into the frame's head frame
    (`gem.head_cameras` with `head_rigid`), at three coefficient sets:
      projected: the frame's collected attributes projected on the bases (`project`),
      fitted: `gem.fit_coefficients` on SynShot's renders, from k = 0 (fit_steps, fit_lr,
        fit_prior_weight; fit_steps = 0 skips it),
      mean: k = 0 (the GEM's mean avatar, a baseline).

    Args: model: the GEM; the rest as `synshot_render` (translation [N, 3]; cameras one, [C]
      or [N, C]; chunk as `collect`).
    Returns:
      {psnr_projected, psnr_fitted, psnr_mean: dB, the mean over frames and cameras of per-image
      PSNRs (`losses.psnr`); per_frame: the same as lists [N]; gem_mb (`gem.size_bytes`) and
      synshot_mb (`parameter_bytes`), MB = 2^20 bytes (as gem_run's gem_mb); n_frames, n_cameras; with return_images:
      images {synshot, projected, fitted, mean} [N, C, H, W, 3]}.
    """
    expr, pose, tr = check_frames(expression, pose, translation, n_joints=len(ctx.assets.parents),
                                  n_expression=ctx.assets.n_expression)
    n = expr.shape[0]
    cams = frame_cameras(cameras, n)
    ref = synshot_render(state, ctx, identity, expr, pose, tr, cams, q_id=q_id, head_model=head_model, chunk=chunk)
    attrs = collect(state, ctx, identity, expr, pose, q_id=q_id, head_model=head_model, chunk=chunk)
    if attrs["position"].shape[1] != model.n_gaussians:
        raise ValueError(f"the GEM has {model.n_gaussians} Gaussians, the SynShot avatar "
                         f"{attrs['position'].shape[1]}: distil this avatar first")
    k_proj = project(model, attrs)
    shape, _, _ = _check_identity(identity, ctx, _check_q_id(q_id))
    R0, T = head_rigid(ctx.assets, shape, expr, pose, tr)
    bg = jnp.asarray(model.background, jnp.float32)
    names = ("projected", "fitted", "mean") if int(fit_steps) > 0 else ("projected", "mean")
    psnrs = {name: [] for name in names}
    images = {name: [] for name in names}
    for i in range(n):
        hc = gem.head_cameras(cams[i], R0[i], T[i])
        target = jnp.asarray(ref[i])
        ks = {"projected": {a: k_proj[a][i] for a in ATTRIBUTES}, "mean": gem.zero_coefficients(model)}
        if "fitted" in names:
            ks["fitted"], _ = gem.fit_coefficients(model, target, hc, steps=int(fit_steps), lr=float(fit_lr),
                                                   background=bg, prior_weight=float(fit_prior_weight),
                                                   backend=backend)
        for name in names:
            img = _render_gem(model, ks[name], hc, backend=backend)
            psnrs[name].append(float(jnp.mean(losses.psnr(img, target))))
            if return_images:
                images[name].append(np.asarray(img))
    res = {f"psnr_{k}": float(np.mean(v)) for k, v in psnrs.items()}
    res.update(per_frame=psnrs, gem_mb=gem.size_bytes(model) / 2 ** 20, synshot_mb=parameter_bytes(state, q_id) / 2 ** 20,
               n_frames=int(n), n_cameras=int(cams.t.shape[1]))
    if return_images:
        res["images"] = dict(synshot=ref, **{k: np.stack(v) for k, v in images.items()})
    return res


# ----------------------------------------------------------------------------------------------
# A SynShot inversion run -> its GEM.

INVERT_EXPERIMENT = "synshot_invert"


def load_inverted_avatar(workdir) -> dict:
    """Reads the folder of a `synshot_run.run_invert` run: its config.json, its prior's
    config.json, its checkpoint {state, q_id} and the subject's images (the inversion does not
    store the subject's tracked shape, which the skinning needs, so the subject's samples are
    read again from the dataset named in the config, as the run read them).

    Returns {state {params, stats, opt_state}, q_id [1, h, w, n], ctx (`synshot.Context` of the
    prior's model config at the subject's image size), identity {shape [S']}, inputs, heldout
    (the subject's sample dicts, `synshot_invert.split_inputs`), cfg, prior_cfg, step}.

    Raises FileNotFoundError / ValueError naming the folder when it is not an inversion run, its
    prior or dataset is missing, or the checkpoint does not fit the prior's model config.
    """
    cfg = app.read_config(workdir, experiment=INVERT_EXPERIMENT)
    if not cfg.prior_workdir:
        raise ValueError(f"{workdir}/config.json names no prior_workdir: not a finished inversion run")
    prior_cfg, _, inputs, heldout = synshot_run.invert_subject(cfg)
    h, w = inputs[0]["image"].shape[:2]
    assets = synshot.build_assets(prior_cfg.model)
    ctx = synshot.make_context(prior_cfg.model, assets, w, h, backend=cfg.backend)
    S = assets.map_size

    def template():
        z = jnp.zeros((1, S, S, 3), jnp.float32)
        variables = ctx.net.init(jax.random.PRNGKey(0), z, z, z)
        params = variables["params"]
        labels = inv.inversion_labels(params, 2)          # the optimiser state of stage 2 is saved
        state = dict(params=params, stats=variables.get("vq_stats", {}),
                     opt_state=synshot.make_optimizer(cfg.optim, labels).init(params))
        q_id = inv.frozen_code(state, dict(uv_albedo=z, uv_position=z, uv_expression_offset=z), ctx)
        return {"state": state, "q_id": q_id}

    try:
        restored, _, step = ckpt_lib.load_latest(str(workdir), jax.eval_shape(template))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"inversion run '{workdir}' has no checkpoint ({err})") from err
    return dict(state=restored["state"], q_id=restored["q_id"], ctx=ctx,
                identity={"shape": np.asarray(inputs[0]["shape"], np.float32)}, inputs=inputs, heldout=heldout,
                cfg=cfg, prior_cfg=prior_cfg, step=step)


def sample_frames(n: int, n_expression: int, *, seed: int = 0, expression_std: float = 0.8,
                  jaw_open_max: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """N random training frames for a distillation: expression [N, E] ~ N(0, expression_std) and
    pose [N, 5, 3] (neck, jaw and eyes as the synthetic generator samples them,
    `synthetic.sample_frame_params`; the global rotation is 0: it does not change the head frame)."""
    if int(n) < 1:
        raise ValueError(f"n_frames must be >= 1, got {n}")
    keys = jax.random.split(jax.random.PRNGKey(int(seed)), int(n))
    p = jax.vmap(lambda k: synthetic.sample_frame_params(k, int(n_expression), expression_std=float(expression_std),
                                                         jaw_open_max=float(jaw_open_max), global_std=0.0,
                                                         translation_std=0.0))(keys)
    return np.asarray(p["expression"]), np.asarray(p["pose"])


def _group_frames(samples) -> list:
    """Samples grouped by frame: [(expression [E], pose [5, 3], translation [3], samples)]."""
    groups: dict = {}
    for s in samples:
        groups.setdefault(int(s.get("frame", 0)), []).append(s)
    return [(g[0]["expression"], g[0]["pose"], g[0]["translation"], g) for _, g in sorted(groups.items())]


def run_distillation(workdir, out_dir, *, n_frames: int = 64, n_components: int = 16, seed: int = 0,
                     expression_std: float = 0.8, jaw_open_max: float = 0.3, fit_steps: int = 100,
                     log=print) -> dict:
    """Distils the avatar of a SynShot inversion run (`synshot_run.run_invert`'s folder) into a
    GEM and evaluates it on the run's held-out images.

    Training frames: the inversion's input frame plus n_frames - 1 random frames
    (`sample_frames`; expression coefficients as many as the subject's tracked ones). Held-out
    frames: the run's held-out images grouped by frame, each frame seen by its held-out cameras
    (`evaluate`, with `gem.fit_coefficients` from k = 0 for fit_steps steps per frame; the ground
    truth is also scored).

    Writes into out_dir: gem.npz (`gem.save_eigenmodel`; extra arrays k_<attribute> [N, M], the
    training frames' coefficients, and training_expression / training_pose), metrics.json
    (PSNRs against SynShot and against the ground truth, sizes, colour deviation, covariance
    error, explained variance) and renders.png (per held-out image: ground truth, SynShot, GEM
    at the projected and at the fitted coefficients).
    Returns the metrics.
    """
    app.quiet_library_logs()
    out = Path(out_dir)
    av = load_inverted_avatar(workdir)
    ctx, state, q_id, ident = av["ctx"], av["state"], av["q_id"], av["identity"]
    if not av["heldout"]:
        raise ValueError(f"inversion run '{workdir}' has no held-out images to evaluate on")
    n_expr = min(int(np.shape(av["inputs"][0]["expression"])[0]), ctx.assets.n_expression)
    expr, pose = sample_frames(int(n_frames) - 1, n_expr, seed=seed, expression_std=expression_std,
                               jaw_open_max=jaw_open_max)
    first = av["inputs"][0]
    p0 = np.asarray(first["pose"], np.float32).copy()
    p0[0] = 0.0
    expr = np.concatenate([np.asarray(first["expression"], np.float32)[None, :n_expr], expr], 0)
    pose = np.concatenate([p0[None], pose], 0)
    log(f"distilling the avatar of {workdir} (step {av['step']}, {ctx.assets.n_gaussians} Gaussians) from "
        f"{expr.shape[0]} frames into a GEM of {n_components} components")
    model, k, info = distil_synshot(state, ctx, ident, expr, pose, int(n_components), q_id=q_id)
    gem.save_eigenmodel(out / "gem.npz", model, extra=dict(
        {f"k_{a}": np.asarray(k[a]) for a in ATTRIBUTES}, training_expression=expr, training_pose=pose))
    rows, per = [], {"projected": [], "fitted": [], "mean": [], "synshot_vs_truth": [], "projected_vs_truth": [],
                     "fitted_vs_truth": []}
    for e, p, t, group in _group_frames(av["heldout"]):
        cams = camera_lib.Camera(K=jnp.asarray(np.stack([s["K"] for s in group]), jnp.float32),
                                 R=jnp.asarray(np.stack([s["R"] for s in group]), jnp.float32),
                                 t=jnp.asarray(np.stack([s["t"] for s in group]), jnp.float32),
                                 width=ctx.width, height=ctx.height)
        res = evaluate(model, state, ctx, ident, np.asarray(e, np.float32)[None, :n_expr], np.asarray(p)[None],
                       np.asarray(t)[None], cams, q_id=q_id, fit_steps=fit_steps, return_images=True)
        truth = np.stack([s["image"] * s["mask"][..., None] for s in group]).astype(np.float32)
        ims = {name: res["images"][name][0] for name in ("synshot", "projected", "fitted")}
        for name in ("projected", "fitted", "mean"):
            per[name] += [res["per_frame"][name][0]] * len(group)
        for name in ("synshot", "projected", "fitted"):
            per[f"{name}_vs_truth"] += [float(v) for v in np.asarray(losses.psnr(jnp.asarray(ims[name]), truth))]
        rows += [np.concatenate([truth[c], ims["synshot"][c], ims["projected"][c], ims["fitted"][c]], 1)
                 for c in range(len(group))]
    metrics = {f"psnr_gem_{k_}_vs_synshot": float(np.mean(v)) for k_, v in per.items() if "truth" not in k_}
    metrics.update({f"psnr_{k_}": float(np.mean(v)) for k_, v in per.items() if "truth" in k_})
    metrics.update(n_heldout_images=len(rows), n_training_frames=int(expr.shape[0]), n_components=int(n_components),
                   gem_mb=gem.size_bytes(model) / 2 ** 20, synshot_mb=parameter_bytes(state, q_id) / 2 ** 20,
                   colour_deviation=info["colour"], covariance_error=info["covariance_error"],
                   explained_variance={a: float(np.sum(r)) for a, r in info["explained_variance_ratio"].items()},
                   inversion_run=os.path.abspath(str(workdir)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    dio.save_image(str(out / "renders.png"), np.clip(np.concatenate(rows[:8], 0), 0.0, 1.0))
    log(f"GEM vs SynShot on {len(rows)} held-out images: PSNR {metrics['psnr_gem_projected_vs_synshot']:.2f} dB "
        f"(projected), {metrics['psnr_gem_fitted_vs_synshot']:.2f} dB (fitted); GEM {metrics['gem_mb']:.3f} MB, "
        f"SynShot {metrics['synshot_mb']:.3f} MB; wrote {out}")
    return metrics

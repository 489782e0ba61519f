"""GEM: Gaussian eigen models of one head (thesis section A.4), the CNN avatar it is distilled
from, the distillation, the refinement and the drivers.

Four stages, all pure functions over pytrees (the run that chains them: `gem_run.run`):

A. **Net** (`init_state`, `net_gaussians`, `loss_terms`, `train_step`): a StyleUNet
   (`dhjax.nn.unet.StyleUNet`) maps UV maps of the frame's tracked mesh to per-texel Gaussian
   attributes. Every texel of the head model's UV layout (map size S x S) inside the layout is
   one Gaussian, attached to the triangle under it. Inputs (9 channels, head frame, see below):
   the displacement of the tracked surface from the canonical one (centimetres), its normals and
   the expression blendshape offsets (centimetres). Outputs per texel (11 channels): a position
   offset (canonical, `offset_scale` metres per unit), a rotation (quaternion delta added to the
   identity), a log-scale offset and an opacity-logit offset. Colour is one learned texture of SH
   coefficients (degree `sh_degree`) shared by all frames (GEM keeps colour out of the PCA so that
   a Gaussian keeps its meaning across expressions). Posing (Sumner deformation gradients
   `J_f = E_def E_canon^-1` of the texel's triangle, `geometry.deformation`):

       position  x = sum_i b_i v_def[f_i] + J_f delta            (exact: J_f maps the triangle)
       rotation  q = quat(U_f R_tbn,f R(q_net))                  (U_f: rotation of J_f's polar
                                                                    decomposition; R_tbn: canonical
                                                                    tangent frame of the texel's face)
       log-scale s = s_0 + ds + log det(J_f)^(1/3)                (s_0: log of the texel spacing
                                                                    x (1, 1, 1/4): thin discs)
       opacity   o = logit(0.9) + do

   Deviation, stated: 3DGS-on-mesh methods carry the covariance as J Sigma J^T; GEM needs
   rotation and scale as separate attributes for its per-attribute PCA, so the deformation
   gradient's rotation and isotropic stretch are applied (as Gaussian Avatars does); the
   anisotropic part of J is dropped. Quaternions are kept in the hemisphere of the texel's
   canonical frame (the sign ambiguity of quaternions would otherwise break the PCA).

   Loss: (1 - w) L1 + w D-SSIM (w = 0.2) (+ zeta LPIPS when LPIPS weights are given: the thesis's
   zeta VGG term of eq. 2, whose VGG weights cannot ship; zeta = `loss.lpips_weight`, 0.1, chosen
   here, as the thesis leaves it to its supplement) on images composited on
   a background, plus regularisers (the thesis defers them to its supplement; chosen here): the
   mean squared position offset in units of `offset_scale` (weight 1e-2) and a hinge on
   log-scales above `max_scale` metres (weight 1). Adam; the Net at 5e-4, the colours at 2.5e-3
   (3DGS's feature rate).

   The **head frame**: the tracked mesh posed with its global rotation and translation removed
   (expression, jaw, neck and eyes kept). The global part is rigid (FLAME's root joint), so a
   head-frame point x lies in the world at ``R_0 (x - j_0) + j_0 + t`` (`head_to_world`), and a
   render moves the cameras into the head frame instead (`head_cameras`); SH view directions are
   then head-relative, as they should be. GEM lives in the head frame: it needs no head model at
   test time, only the rigid head pose (from tracking, or any other source).

B. **Distillation** (`gem_run.collect`, `distil`): the Net over all training frames gives each attribute
   per Gaussian per frame; one PCA per attribute (`dhjax.geometry.pca`) with M components:
   ``G = {mu_a + k_a B_a, c}``, a in (position, rotation, scale, opacity) (thesis eq. 1).

C. **Refinement** (`refine_params`, `refine_loss`, `reorthonormalise`; the loop is
   `gem_run.refine_stage`): photometric fine-tuning of the means and
   bases with the training frames' coefficients fixed; every `qr_every` steps each basis is
   re-orthonormalised by QR with signs from diag(R), and the coefficients of the training frames
   are carried along (k <- k R^T), so that renders do not change at the re-orthonormalisation.

D. **Driving**: (a) `fit_coefficients`: analysis-by-synthesis of k for one frame against its
   images; (b) `regressor_*`: features relative to a neutral frame, PCA to <= 50 values, an MLP of
   3 x 256 (ReLU), k = 3 sigma_k tanh(MLP) (thesis eqs. 3-4). EMOCA's features cannot ship; the
   drivers offered are the tracked head-model parameters and 2D face landmarks (`gem_run`).

The eigenmodel (`EigenModel`, `save_eigenmodel` / `load_eigenmodel`, `render`) is the product:
means, bases, sigmas and colours in one small npz; `render(model, k, cameras)` splats it with no
network. Units are metres; images [C, H, W, 3] (ground truth in [0, 1]; renders are clamped at 0
only, as in 3DGS).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dhjax import io as dio
from dhjax import losses
from dhjax.data import textures
from dhjax.geometry import deformation
from dhjax.geometry import mesh as mesh_lib
from dhjax.geometry import pca as pca_lib
from dhjax.geometry import rotations
from dhjax.models import flame
from dhjax.nn import unet
from dhjax.render import camera as camera_lib
from dhjax.render import splat
from dhjax.synthesis.synshot_gaussians import grid_neighbour_distance

_HI = jax.lax.Precision.HIGHEST
ATTRIBUTES = ("position", "rotation", "scale", "opacity")
ATTRIBUTE_DIMS = {"position": 3, "rotation": 4, "scale": 3, "opacity": 1}
NET_OUT = 11
NET_IN = 9
INIT_OPACITY = 0.9
# Initial log-scales relative to the texel spacing along (tangent, bitangent, normal): discs as
# wide as the spacing and a quarter of it thick (surface elements; 3DGS starts isotropic).
INIT_LOG_SCALE = np.log(np.array([1.0, 1.0, 0.25], np.float32))
EIGENMODEL_FORMAT = "dhjax.gem/1"


# ----------------------------------------------------------------------------------------------
# Configuration.


def default_model_config() -> ml_collections.ConfigDict:
    """map_size S (Gaussian map S x S; thesis 256), widths/style_dim of the StyleUNet, sh_degree,
    offset_scale (metres per unit of the position output), max_scale (metres, regulariser),
    background (evaluation colour), backend (splatting: "auto" | "reference" | "cpu" | "cuda")."""
    return ml_collections.ConfigDict(dict(
        map_size=256, widths=(32, 64, 128, 128, 128), style_dim=64, sh_degree=3, offset_scale=0.01,
        max_scale=0.01, background=(1.0, 1.0, 1.0), backend="auto"))


def default_loss_config() -> ml_collections.ConfigDict:
    """ssim_weight w of (1-w) L1 + w D-SSIM, lpips_weight zeta (of the Net's and the refinement's
    loss, used when LPIPS weights are given: `make_context`'s lpips_fn), offset_weight,
    scale_weight (regularisers, module docstring)."""
    return ml_collections.ConfigDict(dict(ssim_weight=0.2, lpips_weight=0.1, offset_weight=1e-2,
                                          scale_weight=1.0))


def default_optim_config() -> ml_collections.ConfigDict:
    """Adam rates of the Net and the colour texture; b1, b2, eps."""
    return ml_collections.ConfigDict(dict(lr=5e-4, color_lr=2.5e-3, b1=0.9, b2=0.999, eps=1e-15))


# ----------------------------------------------------------------------------------------------
# Context: everything fixed for one subject (static in jit).


@flax.struct.dataclass
class Context:
    """One subject's fixed data.

    model: the head model (FlameModel); fields: its `textures.UVFields` at S x S;
    canon_verts [V, 3] (template + shape, rest pose, metres); texel [G] flat indices of the
    Gaussians' texels; face [G] their triangles; bary [G, 3]; canon_position [G, 3];
    canon_frame [G, 3, 3] (tangent frames of the canonical faces); ref_quat [G, 4] (their
    quaternions: the hemisphere reference); log_spacing [G] (log of the canonical texel spacing);
    canon_map [S, S, 3] (canonical position map). Static: map_size, net (StyleUNet), sh_degree,
    offset_scale, max_scale, background, backend, ssim_weight, offset_weight, scale_weight,
    lpips_fn (None, or (a, b) -> [...] LPIPS distance of images [..., H, W, 3]) and lpips_weight.
    """

    model: Any
    fields: Any
    canon_verts: jax.Array
    texel: jax.Array
    face: jax.Array
    bary: jax.Array
    canon_position: jax.Array
    canon_frame: jax.Array
    ref_quat: jax.Array
    log_spacing: jax.Array
    canon_map: jax.Array
    map_size: int = flax.struct.field(pytree_node=False, default=256)
    net: Any = flax.struct.field(pytree_node=False, default=None)
    sh_degree: int = flax.struct.field(pytree_node=False, default=3)
    offset_scale: float = flax.struct.field(pytree_node=False, default=0.01)
    max_scale: float = flax.struct.field(pytree_node=False, default=0.01)
    background: tuple = flax.struct.field(pytree_node=False, default=(1.0, 1.0, 1.0))
    backend: str = flax.struct.field(pytree_node=False, default="auto")
    ssim_weight: float = flax.struct.field(pytree_node=False, default=0.2)
    offset_weight: float = flax.struct.field(pytree_node=False, default=1e-2)
    scale_weight: float = flax.struct.field(pytree_node=False, default=1.0)
    color_lr: float = flax.struct.field(pytree_node=False, default=2.5e-3)
    lr: float = flax.struct.field(pytree_node=False, default=5e-4)
    lpips_fn: Any = flax.struct.field(pytree_node=False, default=None)
    lpips_weight: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def n_gaussians(self) -> int:
        """Number of Gaussians G (texels of the UV map inside the layout)."""
        return int(self.texel.shape[0])


def make_context(model, shape, model_cfg=None, loss_cfg=None, optim_cfg=None, lpips_fn=None) -> Context:
    """The Context of a subject (host side, once).

    Args:
      model: FlameModel with a UV layout, regions and the 68-point landmark embedding (the
        embedded default head; `textures.uv_fields` says what it needs).
      shape: [S'] the subject's shape coefficients.
      model_cfg / loss_cfg / optim_cfg: `default_*_config()`-like (None = defaults).
      lpips_fn: None (no perceptual term), or an LPIPS distance `(a, b) -> [...]` of images
        [..., H, W, 3] in [0, 1] (`dhjax.nn.lpips.make_lpips`): the losses of stages A and C
        then add loss.lpips_weight times its mean.
    """
    mc = default_model_config() if model_cfg is None else model_cfg
    lc = default_loss_config() if loss_cfg is None else loss_cfg
    oc = default_optim_config() if optim_cfg is None else optim_cfg
    S = int(mc.map_size)
    widths = tuple(int(w) for w in mc.widths)
    if S % (2 ** (len(widths) - 1)):
        raise ValueError(f"model.map_size={S} must divide by 2^{len(widths) - 1} (the StyleUNet's "
                         f"{len(widths)} levels)")
    shape = np.asarray(shape, np.float32)
    if shape.ndim != 1 or not np.all(np.isfinite(shape)):
        raise ValueError(f"shape must be a finite [S'] vector, got shape {shape.shape}")
    fields = textures.uv_fields(model, S)
    canon = np.asarray(flame.forward(model, jnp.asarray(shape)[None]).vertices[0], np.float32)
    mask = np.asarray(fields.mask).reshape(-1)
    texel = np.nonzero(mask)[0].astype(np.int32)
    face = np.asarray(fields.face_id).reshape(-1)[texel].astype(np.int32)
    bary = np.asarray(fields.bary).reshape(-1, 3)[texel].astype(np.float32)
    faces = np.asarray(model.faces)
    canon_pos = np.einsum("gk,gkc->gc", bary, canon[faces[face]])
    frames = np.asarray(mesh_lib.face_tbn(jnp.asarray(canon), faces, model.uv_coords, model.uv_faces))[face]
    ref_quat = np.asarray(rotations.matrix_to_quaternion(jnp.asarray(frames)))
    canon_map = np.zeros((S * S, 3), np.float32)
    canon_map[texel] = canon_pos
    canon_map = canon_map.reshape(S, S, 3)
    d = np.asarray(grid_neighbour_distance(jnp.asarray(canon_map), jnp.asarray(mask.reshape(S, S))))
    d = np.clip(d.reshape(-1)[texel], 1e-4, 0.02)
    net = unet.StyleUNet(out_features=NET_OUT, widths=widths, style_dim=int(mc.style_dim))
    return Context(model=model, fields=fields, canon_verts=jnp.asarray(canon), texel=jnp.asarray(texel),
                   face=jnp.asarray(face), bary=jnp.asarray(bary), canon_position=jnp.asarray(canon_pos),
                   canon_frame=jnp.asarray(frames), ref_quat=jnp.asarray(ref_quat),
                   log_spacing=jnp.asarray(np.log(d), jnp.float32), canon_map=jnp.asarray(canon_map),
                   map_size=S, net=net, sh_degree=int(mc.sh_degree), offset_scale=float(mc.offset_scale),
                   lpips_fn=lpips_fn, lpips_weight=float(lc.get("lpips_weight", 0.0)),
                   max_scale=float(mc.max_scale), background=tuple(float(b) for b in mc.background),
                   backend=str(mc.backend), ssim_weight=float(lc.ssim_weight),
                   offset_weight=float(lc.offset_weight), scale_weight=float(lc.scale_weight),
                   color_lr=float(oc.color_lr), lr=float(oc.lr))


# ----------------------------------------------------------------------------------------------
# Head frame, tracked mesh, input maps.


def head_rigid(ctx: Context, shape, pose, translation):
    """The rigid head pose of a frame: (R_0 [3, 3], T [3]) with world = R_0 x + T for head-frame
    points x (module docstring: R_0 the global rotation about the rest root joint j_0,
    T = j_0 - R_0 j_0 + translation).

    shape [S'], pose [5, 3] axis-angle, translation [3] (metres)."""
    model = ctx.model
    v = flame.forward(model, jnp.asarray(shape)[None]).v_shaped[0]
    j0 = jnp.einsum("v,vc->c", model.j_regressor[0], v, precision=_HI)
    R0 = rotations.axis_angle_to_matrix(jnp.asarray(pose)[0])
    return R0, j0 - R0 @ j0 + jnp.asarray(translation)


def head_vertices(ctx: Context, shape, expression, pose):
    """Tracked mesh in the head frame: [V, 3] metres (global rotation and translation removed).

    shape [S'], expression [E'], pose [5, 3] axis-angle."""
    pose = jnp.asarray(pose).at[0].set(0.0)
    return flame.forward(ctx.model, jnp.asarray(shape)[None], jnp.asarray(expression)[None],
                         pose[None]).vertices[0]


def head_cameras(cameras: camera_lib.Camera, R0, T) -> camera_lib.Camera:
    """Cameras [C] (world) -> the same cameras seeing the head frame: R' = R R_0, t' = R T + t."""
    R = jnp.einsum("...ij,jk->...ik", cameras.R, R0, precision=_HI)
    t = jnp.einsum("...ij,j->...i", cameras.R, T, precision=_HI) + cameras.t
    return camera_lib.Camera(K=cameras.K, R=R, t=t, width=cameras.width, height=cameras.height)


def head_to_world(x, R0, T):
    """Head-frame points [..., 3] -> world [..., 3]."""
    return jnp.einsum("ij,...j->...i", R0, x, precision=_HI) + T


def input_maps(ctx: Context, verts, expression) -> jax.Array:
    """The Net's input: [S, S, 9] = (head-frame surface - canonical surface, normals, expression
    blendshape offsets), offsets in centimetres, 0 outside the layout.

    verts: [V, 3] head-frame tracked mesh; expression [E'] coefficients."""
    faces = ctx.model.faces
    normals = mesh_lib.vertex_normals(verts, faces)
    expr = jnp.asarray(expression, jnp.float32)
    offs = jnp.einsum("k,kvc->vc", expr, ctx.model.exprdirs[: expr.shape[0]], precision=_HI)
    attrs = jnp.concatenate([(verts - ctx.canon_verts) * 100.0, normals, offs * 100.0], -1)
    return textures.bake(ctx.fields, faces, attrs)


def face_transforms(ctx: Context, verts):
    """Per-Gaussian (J [G, 3, 3], U [G, 3, 3] polar rotation of J, log det(J)^(1/3) [G])."""
    J = deformation.triangle_deformation_gradients(ctx.canon_verts, verts, ctx.model.faces)
    W, sv, Vt = jnp.linalg.svd(J)
    det = jnp.linalg.det(W @ Vt)
    flip = jnp.where(det < 0, -1.0, 1.0)
    W = W * jnp.stack([jnp.ones_like(flip), jnp.ones_like(flip), flip], -1)[..., None, :]
    U = W @ Vt
    log_stretch = jnp.sum(jnp.log(jnp.maximum(sv, 1e-8)), -1) / 3.0
    return J[ctx.face], U[ctx.face], log_stretch[ctx.face]


def _align_hemisphere(q, ref):
    s = jnp.sign(jnp.sum(q * ref, -1, keepdims=True))
    return q * jnp.where(s == 0, 1.0, s)


def pose_gaussians(ctx: Context, raw, verts) -> dict:
    """Net outputs at the Gaussians -> head-frame attributes.

    Args:
      raw: [G, 11] (position offset 3, quaternion delta 4, log-scale offset 3, opacity 1).
      verts: [V, 3] head-frame tracked mesh.
    Returns:
      {position [G, 3] metres, rotation [G, 4] unit quaternions (w, x, y, z, hemisphere of
      ref_quat), scale [G, 3] log metres, opacity [G, 1] logits}.
    """
    J, U, log_stretch = face_transforms(ctx, verts)
    faces = ctx.model.faces[ctx.face]
    surf = jnp.einsum("gk,gkc->gc", ctx.bary, verts[faces], precision=_HI)
    delta = raw[:, 0:3] * ctx.offset_scale
    position = surf + jnp.einsum("gij,gj->gi", J, delta, precision=_HI)
    q_net = raw[:, 3:7] + jnp.array([1.0, 0.0, 0.0, 0.0])
    R_net = rotations.quaternion_to_matrix(q_net / jnp.linalg.norm(q_net, axis=-1, keepdims=True))
    R = jnp.matmul(jnp.matmul(U, ctx.canon_frame, precision=_HI), R_net, precision=_HI)
    q = _align_hemisphere(rotations.matrix_to_quaternion(R), ctx.ref_quat)
    scale = ctx.log_spacing[:, None] + INIT_LOG_SCALE + raw[:, 7:10] + log_stretch[:, None]
    opacity = float(np.log(INIT_OPACITY / (1 - INIT_OPACITY))) + raw[:, 10:11]
    return dict(position=position, rotation=q, scale=scale, opacity=opacity)


# ----------------------------------------------------------------------------------------------
# Stage A: the Net.


def net_raw(ctx: Context, net_params, maps) -> jax.Array:
    """StyleUNet on input maps [S, S, 9] -> raw outputs at the Gaussians [G, 11]."""
    out = ctx.net.apply({"params": net_params}, maps[None])[0]
    return out.reshape(-1, NET_OUT)[ctx.texel]


def net_gaussians(ctx: Context, net_params, frame: Mapping) -> tuple[dict, jax.Array]:
    """The Net's head-frame Gaussians of one frame: (attributes (`pose_gaussians`), raw [G, 11]).

    frame: shape [S'], expression [E'], pose [5, 3]."""
    verts = head_vertices(ctx, frame["shape"], frame["expression"], frame["pose"])
    maps = input_maps(ctx, verts, frame["expression"])
    raw = net_raw(ctx, net_params, maps)
    return pose_gaussians(ctx, raw, verts), raw


def splat_attributes(ctx: Context, attrs: Mapping, sh, cameras: camera_lib.Camera, background=None):
    """Splats head-frame attributes into head-frame cameras [C]: `splat.RenderOutput` with
    image [C, H, W, 3] on `background` ([3] or [C, 3]; default ctx.background)."""
    bg = jnp.asarray(ctx.background if background is None else background, jnp.float32)
    return splat.rasterize(attrs["position"], attrs["rotation"], jnp.exp(attrs["scale"]),
                           jax.nn.sigmoid(attrs["opacity"][:, 0]), sh, cameras, sh_degree=ctx.sh_degree,
                           background=bg, backend=ctx.backend)


def composite(images, masks, background):
    """Ground-truth images [C, H, W, 3] on a background [3] or [C, 3] through masks [C, H, W]."""
    bg = jnp.asarray(background, jnp.float32)
    bg = bg[:, None, None, :] if bg.ndim == 2 else bg
    m = jnp.asarray(masks, jnp.float32)[..., None]
    return images * m + bg * (1.0 - m)


def init_sh(ctx: Context, key=None) -> jax.Array:
    """Initial colour texture [G, (d+1)^2, 3]: DC 0 (grey 0.5 after the +0.5 offset), rest 0."""
    del key
    return jnp.zeros((ctx.n_gaussians, splat.num_sh_bases(ctx.sh_degree), 3), jnp.float32)


def make_optimizer(ctx: Context):
    """Adam on the Net's weights with lr `ctx.lr` and on the SH colour texture with `ctx.color_lr`."""
    return optax.multi_transform({"net": optax.adam(ctx.lr), "sh": optax.adam(ctx.color_lr)},
                                 {"net": "net", "sh": "sh"})


def init_state(key, ctx: Context) -> dict:
    """{params: {net, sh}, opt} (Net initialised near zero output: the template Gaussians)."""
    S = ctx.map_size
    net_params = ctx.net.init(key, jnp.zeros((1, S, S, NET_IN), jnp.float32))["params"]
    params = {"net": net_params, "sh": init_sh(ctx)}
    return {"params": params, "opt": make_optimizer(ctx).init(params)}


def regularisers(ctx: Context, raw) -> dict:
    """{offset: mean squared position offset (units of offset_scale), scale: mean hinge of the
    canonical log-scales above log(max_scale)} on raw [G, 11] (the raw output + the texel spacing,
    before posing: J's stretch is not included)."""
    s = ctx.log_spacing[:, None] + INIT_LOG_SCALE + raw[:, 7:10]
    return {"offset": jnp.mean(jnp.sum(raw[:, 0:3] ** 2, -1)),
            "scale": jnp.mean(jax.nn.relu(s - float(np.log(ctx.max_scale))))}


def loss_terms(params, batch, ctx: Context) -> tuple[jax.Array, dict]:
    """Stage A loss of one frame seen by C cameras.

    batch: shape [S'], expression [E'], pose [5, 3], translation [3], image [C, H, W, 3],
    mask [C, H, W], K [C, 3, 3], R [C, 3, 3], t [C, 3], background [3] (any colour: the ground
    truth is composited on it).
    Returns: (total, {loss, photo, offset, scale, psnr}, and lpips when ctx has an LPIPS
    distance and lpips_weight > 0: photo then includes lpips_weight x lpips).
    """
    attrs, raw = net_gaussians(ctx, params["net"], batch)
    R0, T = head_rigid(ctx, batch["shape"], batch["pose"], batch["translation"])
    W, H = batch["image"].shape[-2], batch["image"].shape[-3]
    cams = head_cameras(camera_lib.Camera(batch["K"], batch["R"], batch["t"], W, H), R0, T)
    bg = batch["background"]
    pred = splat_attributes(ctx, attrs, params["sh"], cams, bg).image
    gt = composite(batch["image"], batch["mask"], bg)
    photo, extra = _color_loss(ctx.ssim_weight, ctx.lpips_fn, ctx.lpips_weight, pred, gt)
    reg = regularisers(ctx, raw)
    total = photo + ctx.offset_weight * reg["offset"] + ctx.scale_weight * reg["scale"]
    return total, {"loss": total, "photo": photo, "offset": reg["offset"], "scale": reg["scale"],
                   "psnr": losses.psnr(pred, gt), **extra}


def _color_loss(ssim_weight: float, lpips_fn, lpips_weight: float, pred, gt) -> tuple[jax.Array, dict]:
    """The thesis's eq. 2 with LPIPS for its VGG term: (1 - w) L1 + w D-SSIM + zeta LPIPS (the
    last only with an LPIPS distance and zeta > 0), and {"lpips": its value} then."""
    loss = losses.l1_ssim_loss(pred, gt, ssim_weight=ssim_weight)
    if lpips_fn is None or not lpips_weight > 0:
        return loss, {}
    lp = jnp.mean(lpips_fn(pred, gt))
    return loss + lpips_weight * lp, {"lpips": lp}


def batch_loss(params, batch, ctx: Context) -> tuple[jax.Array, dict]:
    """`loss_terms` averaged over a batch of B frames (every array of `batch` gets a leading [B])."""
    total, metrics = jax.vmap(lambda b: loss_terms(params, b, ctx))(batch)
    return jnp.mean(total), jax.tree.map(jnp.mean, metrics)


def train_step(state, batch, key, ctx: Context):
    """One Adam step of stage A on a batch of B frames (`batch_loss`). Returns (state, metrics)."""
    del key
    (_, metrics), grads = jax.value_and_grad(batch_loss, has_aux=True)(state["params"], batch, ctx)
    updates, opt = make_optimizer(ctx).update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt": opt}, metrics


def evaluate_batch(state, batch, ctx: Context) -> dict:
    """Held-out metrics of a batch (`batch_loss`'s metrics, no update)."""
    return batch_loss(state["params"], batch, ctx)[1]


def method_functions(ctx: Context):
    """(init, train_step, evaluate) for `dhjax.train.loop.Method`."""
    return (lambda key, batch: init_state(key, ctx), functools.partial(train_step, ctx=ctx),
            functools.partial(evaluate_batch, ctx=ctx))


def render_net(ctx: Context, params, frame: Mapping, cameras: camera_lib.Camera, background=None):
    """The Net's render of one frame in world cameras [C]: image [C, H, W, 3]."""
    attrs, _ = net_gaussians(ctx, params["net"], frame)
    R0, T = head_rigid(ctx, frame["shape"], frame["pose"], frame["translation"])
    return splat_attributes(ctx, attrs, params["sh"], head_cameras(cameras, R0, T), background).image


# ----------------------------------------------------------------------------------------------
# Stage B: distillation.


def flatten_attributes(attrs: Mapping) -> dict:
    """{attribute: [..., G, A]} -> {attribute: [..., G * A]}."""
    return {a: attrs[a].reshape(attrs[a].shape[:-2] + (-1,)) for a in ATTRIBUTES}


def unflatten_attributes(flat: Mapping, n_gaussians: int) -> dict:
    """Inverse of `flatten_attributes`; rotations are renormalised (a linear combination of
    unit quaternions is not unit)."""
    out = {a: flat[a].reshape(flat[a].shape[:-1] + (n_gaussians, ATTRIBUTE_DIMS[a])) for a in ATTRIBUTES}
    return out


class EigenModel(NamedTuple):
    """A GEM: per attribute a mean [D_a] and a basis [M, D_a] (orthonormal rows), the coefficient
    std sigma [M]; colours sh [G, K, 3]; sh_degree; background [3]. D_a = G * dims(a)."""

    mean: dict
    basis: dict
    sigma: dict
    sh: jax.Array
    sh_degree: int
    background: tuple

    @property
    def n_components(self) -> int:
        """Number of components M per attribute."""
        return int(self.basis["position"].shape[0])

    @property
    def n_gaussians(self) -> int:
        """Number of Gaussians G."""
        return int(self.sh.shape[0])


jax.tree_util.register_pytree_node(
    EigenModel,
    lambda m: ((m.mean, m.basis, m.sigma, m.sh), (m.sh_degree, m.background)),
    lambda aux, ch: EigenModel(*ch, *aux))


def distil(collected: Mapping, sh, n_components: int, *, sh_degree: int, background=(1.0, 1.0, 1.0),
           method: str = "auto") -> tuple[EigenModel, dict, dict]:
    """One PCA per attribute (stage B).

    Args:
      collected: {attribute: [N, G, A]} the Net's head-frame attributes of N training frames.
      sh: [G, K, 3] colours; n_components: M (<= N - 1).
    Returns:
      (EigenModel, k {attribute: [N, M]} the frames' coefficients, {attribute: explained variance
      ratio [M]}).
    """
    flat = flatten_attributes({a: jnp.asarray(collected[a]) for a in ATTRIBUTES})
    mean, basis, sigma, coeffs, ratio = {}, {}, {}, {}, {}
    for a in ATTRIBUTES:
        p = pca_lib.fit(np.asarray(flat[a]), int(n_components), method=method)
        mean[a], basis[a], sigma[a] = (jnp.asarray(p.mean, jnp.float32), jnp.asarray(p.components, jnp.float32),
                                       jnp.asarray(p.sigma, jnp.float32))
        coeffs[a] = jnp.asarray(pca_lib.project(p, flat[a]), jnp.float32)
        ratio[a] = np.asarray(p.explained_variance_ratio)
    model = EigenModel(mean, basis, sigma, jnp.asarray(sh, jnp.float32), int(sh_degree),
                       tuple(float(b) for b in background))
    return model, coeffs, ratio


def truncate(model: EigenModel, m: int) -> EigenModel:
    """The first m components of every basis."""
    if not 1 <= int(m) <= model.n_components:
        raise ValueError(f"cannot keep {m} of {model.n_components} components")
    return model._replace(basis={a: b[:m] for a, b in model.basis.items()},
                          sigma={a: s[:m] for a, s in model.sigma.items()})


def check_coefficients(model: EigenModel, k: Mapping) -> None:
    """Raises ValueError unless k holds every attribute with [..., M] values."""
    missing = [a for a in ATTRIBUTES if a not in k]
    if missing:
        raise ValueError(f"coefficients lack {missing}; expected a dict with {list(ATTRIBUTES)}")
    M = model.n_components
    for a in ATTRIBUTES:
        if jnp.shape(k[a])[-1:] != (M,):
            raise ValueError(f"coefficients '{a}' must be [..., {M}] for a GEM of {M} components, "
                             f"got shape {tuple(jnp.shape(k[a]))}")


def zero_coefficients(model: EigenModel) -> dict:
    """k = 0 for every attribute, {attribute: [M]}: the eigenmodel's mean avatar."""
    return {a: jnp.zeros((model.n_components,), jnp.float32) for a in ATTRIBUTES}


def eigen_attributes(model: EigenModel, k: Mapping) -> dict:
    """G = {mu_a + k_a B_a}: head-frame attributes {attribute: [G, A]} of coefficients
    k {attribute: [M]} (rotations renormalised)."""
    check_coefficients(model, k)
    flat = {a: model.mean[a] + jnp.einsum("m,md->d", jnp.asarray(k[a], jnp.float32), model.basis[a],
                                           precision=_HI) for a in ATTRIBUTES}
    attrs = unflatten_attributes(flat, model.n_gaussians)
    q = attrs["rotation"]
    attrs["rotation"] = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    return attrs


def _splat_eigen(model: EigenModel, attrs, sh, cameras, background, backend):
    bg = jnp.asarray(model.background if background is None else background, jnp.float32)
    return splat.rasterize(attrs["position"], attrs["rotation"], jnp.exp(attrs["scale"]),
                           jax.nn.sigmoid(attrs["opacity"][:, 0]), sh, cameras, sh_degree=model.sh_degree,
                           background=bg, backend=backend)


def render(model: EigenModel, k: Mapping, cameras: camera_lib.Camera, *, background=None,
           backend: str = "auto") -> jax.Array:
    """Renders a GEM with coefficients k {attribute: [M]} into cameras [C] given in the head frame
    (`head_cameras` moves world cameras there): image [C, H, W, 3], colours clamped at 0 as in
    3DGS (not at 1). No network."""
    return _splat_eigen(model, eigen_attributes(model, k), model.sh, cameras, background, backend).image


# ----------------------------------------------------------------------------------------------
# Stage C: refinement.


def refine_params(model: EigenModel) -> dict:
    """The refined parameters: {mean, basis} (colours stay fixed, as in the thesis)."""
    return {"mean": dict(model.mean), "basis": dict(model.basis)}


def with_params(model: EigenModel, p: Mapping) -> EigenModel:
    """The eigenmodel with means and bases replaced by those of refinement parameters p
    (`refine_params`' layout); colours and sigma are kept."""
    return model._replace(mean=dict(p["mean"]), basis=dict(p["basis"]))


def refine_loss(p, model: EigenModel, k: Mapping, images, cameras, background, ssim_weight: float,
                backend: str = "auto", lpips_fn=None, lpips_weight: float = 0.0):
    """Photometric loss of a GEM with parameters p at coefficients k {attribute: [M]} against
    images [C, H, W, 3] (already composited on background [3]) seen by head-frame cameras [C]:
    the Net's objective (thesis: "the same objectives"), (1 - w) L1 + w D-SSIM, plus
    lpips_weight x LPIPS when lpips_fn is given (then also in the metrics)."""
    m = with_params(model, p)
    pred = render(m, k, cameras, background=background, backend=backend)
    loss, extra = _color_loss(ssim_weight, lpips_fn, lpips_weight, pred, images)
    return loss, {"loss": loss, "psnr": losses.psnr(pred, images), **extra}


def reorthonormalise(model: EigenModel, coeffs: Mapping) -> tuple[EigenModel, dict]:
    """QR re-orthonormalisation of every basis (signs from diag R) with the training coefficients
    carried along: B = R^T Q^T, so k B = (k R^T) Q^T and renders are unchanged. Sigmas are the
    new coefficients' std. coeffs: {attribute: [N, M]}."""
    basis, new_k, sigma = {}, {}, {}
    for a in ATTRIBUTES:
        B = model.basis[a]
        Q = pca_lib.orthonormalize(B)                    # [M, D], same span
        Rt = jnp.einsum("md,nd->mn", B, Q, precision=_HI)  # B = Rt Q  (Rt = R^T, lower triangular)
        basis[a] = Q
        new_k[a] = jnp.einsum("nm,mj->nj", coeffs[a], Rt, precision=_HI)
        sigma[a] = jnp.std(new_k[a], axis=0, ddof=1) if new_k[a].shape[0] > 1 else model.sigma[a]
    return model._replace(basis=basis, sigma=sigma), new_k


# ----------------------------------------------------------------------------------------------
# Stage D: coefficients from images (analysis by synthesis) and the regressor.


def fit_loss(k, model: EigenModel, images, cameras, background, ssim_weight: float, prior_weight: float,
             backend: str = "auto"):
    """Photometric loss + prior_weight * mean((k / sigma)^2) of coefficients k {attribute: [M]}."""
    pred = render(model, k, cameras, background=background, backend=backend)
    photo = losses.l1_ssim_loss(pred, images, ssim_weight=ssim_weight)
    prior = sum(jnp.mean((k[a] / jnp.maximum(model.sigma[a], 1e-8)) ** 2) for a in ATTRIBUTES) / len(ATTRIBUTES)
    return photo + prior_weight * prior, {"photo": photo, "prior": prior, "psnr": losses.psnr(pred, images)}


def fit_coefficients(model: EigenModel, images, cameras, *, k0=None, steps: int = 100, lr: float = 0.05,
                     background=None, ssim_weight: float = 0.2, prior_weight: float = 1e-3,
                     backend: str = "auto") -> tuple[dict, dict]:
    """Analysis-by-synthesis of one frame's coefficients (stage D a).

    Args:
      images: [C, H, W, 3] the frame's images composited on `background`; cameras: head-frame
        cameras [C]; k0: start (e.g. the previous frame's k; default 0 = the mean); steps, lr:
        Adam in units of sigma (the optimised variable is k / sigma).
    Returns: (k {attribute: [M]}, metrics of the last step).
    """
    bg = jnp.asarray(model.background if background is None else background, jnp.float32)
    sig = {a: jnp.maximum(model.sigma[a], 1e-8) for a in ATTRIBUTES}
    z0 = {a: (jnp.zeros_like(sig[a]) if k0 is None else jnp.asarray(k0[a]) / sig[a]) for a in ATTRIBUTES}
    return _fit_loop(model, jnp.asarray(images, jnp.float32), cameras, bg, z0, sig, jnp.float32(lr), int(steps),
                     float(ssim_weight), float(prior_weight), backend)


@functools.partial(jax.jit, static_argnames=("steps", "ssim_weight", "prior_weight", "backend"))
def _fit_loop(model, images, cameras, bg, z0, sig, lr, steps, ssim_weight, prior_weight, backend):
    # The learning rate is traced (not static), so fitting frame after frame compiles once.
    opt = optax.adam(lr)

    def loss_z(z):
        k = {a: z[a] * sig[a] for a in ATTRIBUTES}
        return fit_loss(k, model, images, cameras, bg, ssim_weight, prior_weight, backend)

    def body(carry, _):
        z, s = carry
        (_, m), g = jax.value_and_grad(loss_z, has_aux=True)(z)
        u, s = opt.update(g, s, z)
        return (optax.apply_updates(z, u), s), m

    (z, _), ms = jax.lax.scan(body, (z0, opt.init(z0)), None, length=steps)
    return {a: z[a] * sig[a] for a in ATTRIBUTES}, jax.tree.map(lambda x: x[-1], ms)


class Regressor(NamedTuple):
    """Stage D (b): driver features -> coefficients. neutral [F] (features of the neutral frame),
    pca (`pca.PCA` of relative features, <= 50 components), mlp (the head's parameters: the
    MLP's, or {"linear": {"kernel": [P, 4 M], "bias": [4 M]}} for `train_linear_regressor`),
    sigma {attribute: [M]}."""

    neutral: jax.Array
    pca: Any
    mlp: Any
    sigma: dict


class MLP(flax.linen.Module):
    """3 x 256 ReLU -> out (the thesis's regressor head)."""

    out: int
    hidden: int = 256
    depth: int = 3

    @flax.linen.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = flax.linen.relu(flax.linen.Dense(self.hidden)(x))
        return flax.linen.Dense(self.out, kernel_init=flax.linen.initializers.zeros)(x)


def _whiten(pca, kappa):
    """kappa / sigma per component (0 for components without variance)."""
    s = pca.sigma
    ok = s > 1e-6 * jnp.max(s)
    return jnp.where(ok, kappa / jnp.where(ok, s, 1.0), 0.0)


def regressor_features(reg: Regressor, features) -> jax.Array:
    """kappa = (f - f_neutral - Rbar) R^T (thesis eq. 3), divided by each component's std (the
    MLP sees unit-variance inputs): [..., F] -> [..., P]."""
    return _whiten(reg.pca, pca_lib.project(reg.pca, jnp.asarray(features, jnp.float32) - reg.neutral))


def is_linear(reg: Regressor) -> bool:
    """Whether the regressor's head is `train_linear_regressor`'s linear map."""
    return "linear" in reg.mlp


def regressor_apply(reg: Regressor, features) -> dict:
    """k = 3 sigma tanh(MLP(kappa)) (thesis eq. 4), or for a linear head k = sigma clip(kappa W + b,
    -3, 3): [..., F] -> {attribute: [..., M]}."""
    kappa = regressor_features(reg, features)
    M = reg.sigma["position"].shape[0]
    if is_linear(reg):
        lin = reg.mlp["linear"]
        out = jnp.clip(kappa @ lin["kernel"] + lin["bias"], -3.0, 3.0)
    else:
        out = 3.0 * jnp.tanh(MLP(out=len(ATTRIBUTES) * M).apply({"params": reg.mlp}, kappa))
    out = out.reshape(out.shape[:-1] + (len(ATTRIBUTES), M))
    return {a: reg.sigma[a] * out[..., i, :] for i, a in enumerate(ATTRIBUTES)}


def _regressor_inputs(features, coeffs: Mapping, sigma: Mapping, neutral_index: int, n_pca: int):
    """(neutral [F], PCA (float32), whitened kappa [N, P], target [N, 4, M] in units of sigma,
    attribute weights w [4, M], sigma {a: [M]}) of `train_regressor`'s arguments."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or not np.all(np.isfinite(f)):
        raise ValueError(f"features must be a finite [N, F] array, got shape {f.shape}")
    n = f.shape[0]
    if not 0 <= int(neutral_index) < n:
        raise ValueError(f"neutral_index {neutral_index} outside the {n} training frames")
    neutral = f[int(neutral_index)]
    rel = f - neutral
    p = _pca_f32(pca_lib.fit(rel, int(min(n_pca, n - 1, f.shape[1]))))
    kappa = _whiten(p, pca_lib.project(p, jnp.asarray(rel, jnp.float32)))
    sig = {a: jnp.maximum(jnp.asarray(sigma[a], jnp.float32), 1e-8) for a in ATTRIBUTES}
    target = jnp.stack([jnp.asarray(coeffs[a], jnp.float32) / sig[a] for a in ATTRIBUTES], 1)   # [N, 4, M]
    s2 = jnp.stack([sig[a] ** 2 for a in ATTRIBUTES])                                            # [4, M]
    w = s2 / jnp.sum(s2, -1, keepdims=True)
    return neutral, p, kappa, target, w, sig


RIDGE_GRID = tuple(float(x) for x in np.logspace(-3, 4, 29))


def train_linear_regressor(features, coeffs: Mapping, sigma: Mapping, neutral_index: int, *, n_pca: int = 50,
                           ridges=RIDGE_GRID, log=None) -> Regressor:
    """A linear alternative to the thesis's MLP (beyond the thesis): k / sigma = kappa W + b on the
    same whitened relative-feature PCA (`train_regressor`), fitted in closed form by ridge
    regression (float64) with the ridge chosen from `ridges` by the exact leave-one-out error of
    `train_regressor`'s loss (the residuals e_i / (1 - h_ii) of the hat matrix, intercept
    included). Applied, it is clipped to +-3 sigma like eq. 4's tanh. With the few frames of a
    small capture a linear map generalises where the MLP memorises."""
    neutral, p, kappa, target, w, sig = _regressor_inputs(features, coeffs, sigma, neutral_index, n_pca)
    X = np.asarray(kappa, np.float64)
    n = X.shape[0]
    Y = np.asarray(target, np.float64).reshape(n, -1)
    wf = np.asarray(w, np.float64).reshape(-1)
    xm, ym = X.mean(0), Y.mean(0)
    Xc, Yc = X - xm, Y - ym
    U, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    best = None
    for lam in ridges:
        d = s ** 2 / (s ** 2 + float(lam))
        h = np.sum(U ** 2 * d, 1) + 1.0 / n                     # the hat matrix's diagonal, intercept included
        fit = U @ (d[:, None] * (U.T @ Yc)) + ym
        loo = (Y - fit) / np.maximum(1.0 - h, 1e-12)[:, None]
        err = float(np.mean(np.sum(wf * loo ** 2, 1)) / len(ATTRIBUTES))
        err = err if np.isfinite(err) else float("inf")
        if best is None or err < best[0]:
            best = (err, float(lam))
    err, lam = best
    W = Vt.T @ ((s / (s ** 2 + lam))[:, None] * (U.T @ Yc))
    b = ym - xm @ W
    if log is not None:
        log(f"linear regressor: ridge {lam:.3g}, leave-one-out unexplained variance {err:.4f}")
    head = {"linear": {"kernel": jnp.asarray(W, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}}
    return Regressor(jnp.asarray(neutral, jnp.float32), p, head, sig)


def train_regressor(features, coeffs: Mapping, sigma: Mapping, neutral_index: int, *, steps: int = 2000,
                    lr: float = 1e-3, weight_decay: float = 1.0, n_pca: int = 50, seed: int = 0,
                    log=None) -> Regressor:
    """Fits the regressor on training frames: features [N, F], coeffs {attribute: [N, M]} (the
    frames' GEM coefficients), sigma {attribute: [M]}. Loss (full-batch Adam): per attribute the
    squared coefficient error over the attribute's total variance, sum_m (k - k*)^2 / sum_m
    sigma_m^2, i.e. the fraction of the attribute's variance left unexplained (the bases are
    orthonormal, so this is the error of the attributes themselves); averaged over frames and
    attributes. (A per-component k / sigma error weights the many small, noise-like components
    as much as the first ones and generalised worse.) The relative-feature PCA keeps
    min(n_pca, N - 1, F) components; its coefficients are whitened (`regressor_features`). AdamW
    with `weight_decay` (decoupled, times lr): with the few frames of a small capture an MLP of
    3 x 256 memorises them (held-out error near that of predicting the mean); whitening and a
    strong decay roughly halve its held-out error there (measured on the tiny capture)."""
    neutral, p, kappa, target, w, sig = _regressor_inputs(features, coeffs, sigma, neutral_index, n_pca)
    n = kappa.shape[0]
    M = int(sigma["position"].shape[0])
    mlp = MLP(out=len(ATTRIBUTES) * M)
    params = mlp.init(jax.random.PRNGKey(seed), kappa[:1])["params"]
    opt = optax.adamw(lr, weight_decay=float(weight_decay))

    def loss(prm):
        out = mlp.apply({"params": prm}, kappa).reshape(n, len(ATTRIBUTES), M)
        return jnp.mean(jnp.sum(w * (3.0 * jnp.tanh(out) - target) ** 2, -1))

    @jax.jit
    def step(prm, s):
        v, g = jax.value_and_grad(loss)(prm)
        u, s = opt.update(g, s, prm)
        return optax.apply_updates(prm, u), s, v

    s = opt.init(params)
    for i in range(int(steps)):
        params, s, v = step(params, s)
        if log is not None and (i + 1) % max(1, steps // 4) == 0:
            log(f"regressor step {i + 1}/{steps}: unexplained variance {float(v):.4f}")
    return Regressor(jnp.asarray(neutral, jnp.float32), p, params, sig)


def _pca_f32(p):
    return p._replace(**{f: (jnp.asarray(getattr(p, f), jnp.float32) if isinstance(getattr(p, f), (np.ndarray, jax.Array))
                             else getattr(p, f)) for f in p._fields})


def save_regressor(path, reg: Regressor, driver: str) -> Path:
    """Writes a regressor as one npz: driver name, neutral features, the relative-feature PCA
    (mean, components, sigma), the MLP's weights (mlp/<layer>/<kernel|bias>) and sigma_<a>."""
    arrays = {"driver": np.asarray(str(driver)), "neutral": np.asarray(reg.neutral, np.float32),
              "pca_mean": np.asarray(reg.pca.mean, np.float32), "pca_components": np.asarray(reg.pca.components, np.float32),
              "pca_sigma": np.asarray(reg.pca.sigma, np.float32)}
    for layer, leaves in reg.mlp.items():
        for name, v in leaves.items():
            arrays[f"mlp/{layer}/{name}"] = np.asarray(v, np.float32)
    for a in ATTRIBUTES:
        arrays[f"sigma_{a}"] = np.asarray(reg.sigma[a], np.float32)
    path = Path(path)
    np.savez(path, **arrays)
    return path


def load_regressor(path) -> tuple[Regressor, str]:
    """Reads `save_regressor`'s file: (Regressor, driver name)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GEM regressor file '{path}'")
    data = dio.read_npz(path, what="a GEM regressor")
    need = ["driver", "neutral", "pca_mean", "pca_components", "pca_sigma"] + [f"sigma_{a}" for a in ATTRIBUTES]
    missing = [k for k in need if k not in data]
    if missing or not any(k.startswith("mlp/") for k in data):
        raise ValueError(f"{path}: not a GEM regressor, missing arrays {missing or ['mlp/...']}")
    mlp: dict = {}
    for k, v in data.items():
        if k.startswith("mlp/"):
            _, layer, name = k.split("/")
            mlp.setdefault(layer, {})[name] = jnp.asarray(v)
    sig2 = jnp.asarray(data["pca_sigma"]) ** 2
    p = pca_lib.PCA(mean=jnp.asarray(data["pca_mean"]), components=jnp.asarray(data["pca_components"]),
                    explained_variance=sig2, explained_variance_ratio=sig2 / jnp.maximum(jnp.sum(sig2), 1e-30),
                    sigma=jnp.asarray(data["pca_sigma"]), n_samples=0)
    reg = Regressor(jnp.asarray(data["neutral"]), p, mlp, {a: jnp.asarray(data[f"sigma_{a}"]) for a in ATTRIBUTES})
    return reg, str(data["driver"])


# ----------------------------------------------------------------------------------------------
# The eigenmodel file.


def save_eigenmodel(path, model: EigenModel, *, extra: Mapping | None = None) -> Path:
    """Writes a GEM as one npz (float32): mean_<a>, basis_<a>, sigma_<a> for every attribute,
    sh [G, K, 3], sh_degree, background [3], format; plus `extra` arrays (e.g. texel indices)."""
    arrays = {"format": np.asarray(EIGENMODEL_FORMAT), "sh": np.asarray(model.sh, np.float32),
              "sh_degree": np.int32(model.sh_degree), "background": np.asarray(model.background, np.float32)}
    for a in ATTRIBUTES:
        arrays[f"mean_{a}"] = np.asarray(model.mean[a], np.float32)
        arrays[f"basis_{a}"] = np.asarray(model.basis[a], np.float32)
        arrays[f"sigma_{a}"] = np.asarray(model.sigma[a], np.float32)
    for k, v in (extra or {}).items():
        arrays[k] = np.asarray(v)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def load_eigenmodel(path) -> EigenModel:
    """Reads `save_eigenmodel`'s file; errors name the file and what is missing or inconsistent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GEM eigenmodel file '{path}'")
    data = dio.read_npz(path, what="a GEM eigenmodel")
    need = ["sh", "sh_degree", "background"] + [f"{p}_{a}" for a in ATTRIBUTES for p in ("mean", "basis", "sigma")]
    missing = [k for k in need if k not in data]
    if missing:
        raise ValueError(f"{path}: not a GEM eigenmodel, missing arrays {missing}")
    if "format" in data and str(data["format"]) != EIGENMODEL_FORMAT:
        raise ValueError(f"{path}: format {str(data['format'])!r}, expected {EIGENMODEL_FORMAT!r}")
    sh = data["sh"]
    if sh.ndim != 3 or sh.shape[2] != 3:
        raise ValueError(f"{path}: 'sh' must be [G, K, 3], got {sh.shape}")
    G = sh.shape[0]
    M = data["basis_position"].shape[0]
    for a in ATTRIBUTES:
        D = G * ATTRIBUTE_DIMS[a]
        for key, shp in ((f"mean_{a}", (D,)), (f"basis_{a}", (M, D)), (f"sigma_{a}", (M,))):
            if data[key].shape != shp:
                raise ValueError(f"{path}: '{key}' must be {list(shp)} for {G} Gaussians and {M} components, "
                                 f"got {list(data[key].shape)}")
            if not np.all(np.isfinite(data[key])):
                raise ValueError(f"{path}: '{key}' has non-finite values")
    f32 = lambda k: jnp.asarray(data[k], jnp.float32)
    return EigenModel(mean={a: f32(f"mean_{a}") for a in ATTRIBUTES}, basis={a: f32(f"basis_{a}") for a in ATTRIBUTES},
                      sigma={a: f32(f"sigma_{a}") for a in ATTRIBUTES}, sh=f32("sh"),
                      sh_degree=int(data["sh_degree"]), background=tuple(float(b) for b in data["background"]))


def size_bytes(model: EigenModel) -> int:
    """Bytes of a GEM's arrays in float32 (means, bases, sigmas, colours)."""
    n = sum(int(np.prod(model.mean[a].shape)) + int(np.prod(model.basis[a].shape)) +
            int(np.prod(model.sigma[a].shape)) for a in ATTRIBUTES)
    return 4 * (n + int(np.prod(model.sh.shape)))


def export_ply(path, attrs: Mapping, sh, *, R0=None, T=None) -> Path:
    """A 3DGS PLY of head-frame attributes (moved to the world by R0, T when given)."""
    from dhjax.io.gaussians import save_gaussians_ply

    pos = np.asarray(attrs["position"], np.float32)
    q = np.asarray(attrs["rotation"], np.float32)
    if R0 is not None:
        pos = np.asarray(head_to_world(jnp.asarray(pos), R0, T))
        qr = np.asarray(rotations.matrix_to_quaternion(jnp.asarray(R0)))
        q = np.asarray(rotations.quaternion_multiply(jnp.asarray(qr)[None], jnp.asarray(q)))
    q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    return save_gaussians_ply(path, pos, q, np.exp(np.asarray(attrs["scale"], np.float32)),
                              1.0 / (1.0 + np.exp(-np.asarray(attrs["opacity"][:, 0], np.float32))),
                              sh=np.asarray(sh, np.float32))


# The house names of a method's pure functions.
init = init_state
loss = loss_terms

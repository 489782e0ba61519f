"""D3GA: drivable 3D Gaussian avatars in tetrahedral cages, as pure functions (thesis A.3).

An avatar is a set of layers ("parts"): the body, the face (the body cage's tetrahedra in front
of the head, driven by face keypoints instead of joint angles) and one per garment (upper,
lower). Each part owns a tetrahedral cage in the subject's rest (T-pose) space
(`dhjax.synthesis.d3ga_data.build_parts`), its Gaussians and three MLPs (3 hidden layers x 128,
ReLU):

* Psi(phi, posenc(v)) -> a canonical offset of every cage node v; the nodes are then posed by
  linear blend skinning with their skinning weights: v_hat = LBS(v + offset_scale tanh(Psi)).
  The offsets (and Pi's corrections below, each s tanh(Pi) with its own size s) are bounded by
  a tanh, a choice of dhjax (the thesis's outputs are unbounded). J is taken against the rest
  nodes without the offsets.
* Gaussian i sits in a fixed tetrahedron t_i with learnable barycentrics b_i (4): its posed mean
  is x_i = sum_j b_ij v_hat_tj (Eq. 5), its covariance J Sigma J^T with J = E_hat E^-1 the
  tetrahedron's deformation gradient (Eqs. 6-8) and Sigma = R S S^T R^T from the Gaussian's
  rotation q and scale s, after the corrections Pi(phi, b, q, s) -> (delta b, delta s, delta q).
  As in the thesis, b is not constrained to its tetrahedron: it is normalised to sum 1 but may
  go negative, and a Gaussian then follows the tetrahedron's affine map outside it. After the
  tiny variant's 1500 steps 17% (body), 26% (face), 33% (upper) and 28% (lower garment) of the
  Gaussians had a negative coordinate, the lowest -0.34, 1-8% below -0.1. `model.bary_domain =
  "simplex"` (beyond the thesis, an ablation) keeps every Gaussian in its cell: the normalised b
  is replaced by its Euclidean projection onto the simplex {b >= 0, sum b = 1}
  (`simplex_projection`), which leaves b inside the cell unchanged.
* Gamma(phi, SH(view direction, 4 bands), h_i, e_f) -> colour and opacity, with h_i an
  auto-decoded per-Gaussian feature and e_f a per-frame embedding (the mean embedding at test
  time).

phi is the part's driving signal: the axis-angle body pose of joints 1..21 (63 values; the global
orientation and translation are in the skinning), or for the face part a code of its 51 face
keypoints in the head joint's frame, normalised by their training mean and std, through a small
MLP (`face_net`: 153 -> 64 -> 32, one hidden layer of 64).

Loss (thesis Eq. 9-12): 10 L_color + 10 L_garment + 0.005 L_neo, with L_color = 0.8 L1 + 0.2
D-SSIM on images composited on random background colours, L_garment = L1 between a render with
one constant colour per layer (body and face red, upper green, lower blue) and the one-hot layer
segmentation, and L_neo the Neo-Hookean energy of every tetrahedron's J with lambda = 10,
mu = 1 (`dhjax.geometry.tetra.neo_hookean_energy`; the thesis's form, whose rest state is not a
minimum: alone it would shrink a tetrahedron by 3.6% per edge, 10.4% in volume, negligible at
weight 0.005; `neo_stable`
switches to the rest-stable form). The colour and layers come from ONE splatting pass with six
channels. Adam 5e-4 with a multistep decay of 0.33, batch 1. The perceptual term is not used
(no VGG weights ship; LPIPS is reported when weights are given).

Ablations (config `model.geometry`, `loss.garment_weight`, `parts.layers`, `model.bary_domain`):
Gaussians on the surface triangles of each part with triangle deformation gradients instead of
tetrahedra; no garment loss; one layer (`d3ga_data.build_parts`): one cage and one set of MLPs
for body and garments, each Gaussian labelled with the layer of the surface it was sampled on
(`Part.gauss_layer`), so the garment loss still supervises its layer render; barycentrics kept
in the simplex (beyond the thesis).

Units: metres; images in [0, 1].
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dhjax import losses
from dhjax.geometry import deformation, lbs as lbs_lib, rotations, tetra
from dhjax.render import camera as camera_lib
from dhjax.render import splat

POSE_JOINTS = tuple(range(1, 22))           # the body joints of phi (SMPL-X's body_pose)
N_FACE_KEYPOINTS = 51
HEAD_JOINT = 15
LAYER_COLOURS = {1: (1.0, 0.0, 0.0), 2: (0.0, 1.0, 0.0), 3: (0.0, 0.0, 1.0)}
SH_DEGREE = 3                                # "4 bands" of the view encoding
_HI = jax.lax.Precision.HIGHEST
BARY_DOMAINS = ("affine", "simplex")         # model.bary_domain: the thesis's free b | b kept in its cell


def default_model_config() -> ml_collections.ConfigDict:
    """hidden (MLP width) / depth (hidden layers), feature_dim (h_i), frame_dim (e_f), face_dim
    (face code), posenc (frequencies of the node positional encoding), geometry ("tets" |
    "triangles"), offset_scale (the node offsets' bound, metres: offset_scale tanh(Psi) per axis),
    bary_scale / scale_scale / quat_scale (the bounds of Pi's corrections of b, log s and q, each
    scale tanh(Pi)), init_opacity, bary_domain ("affine": b normalised to sum 1, free to leave its
    cell, as in the thesis; "simplex": then projected onto the simplex, so it stays inside)."""
    return ml_collections.ConfigDict(dict(
        hidden=128, depth=3, feature_dim=16, frame_dim=16, face_dim=32, posenc=4, geometry="tets",
        offset_scale=0.02, bary_scale=0.1, scale_scale=0.5, quat_scale=0.2, init_opacity=0.9,
        bary_domain="affine"))


def default_loss_config() -> ml_collections.ConfigDict:
    """Loss weights: colour 10 x (0.8 L1 + 0.2 D-SSIM; `ssim_weight` is the D-SSIM share),
    garment segmentation 10, Neo-Hookean 0.005 with Lame parameters lambda 10 and mu 1
    (`neo_stable`: the rest-stable form instead of the thesis's)."""
    return ml_collections.ConfigDict(dict(color_weight=10.0, ssim_weight=0.2, garment_weight=10.0,
                                          neo_weight=0.005, neo_lambda=10.0, neo_mu=1.0, neo_stable=False))


def default_optim_config() -> ml_collections.ConfigDict:
    """lr, decay (multiplied at each boundary), decay_at (fractions of train_steps)."""
    return ml_collections.ConfigDict(dict(lr=5e-4, decay=0.33, decay_at=(0.5, 0.75, 0.9), train_steps=1000))


# ----------------------------------------------------------------------------------------------
# Context: the static description of an avatar.


@flax.struct.dataclass
class Part:
    """One layer's geometry (arrays; `d3ga_data.build_parts` makes them).

    rest_nodes [N, 3] (metres, rest space), cells [M, K] node ids (K = 4 tetrahedra, or K = 3
    triangles in the triangle ablation), rest_inv [M, 3, 3] (the inverse rest edge frames:
    tetrahedra E_rest^-1, triangles [e1, e2, n / sqrt|n|]^-1), node_weights [N, 55] skinning weights, node_enc [N, P] positional encoding of
    the rest nodes, gauss_cell [G] the fixed cell of each Gaussian, gauss_layer [G] int32 the
    layer label of each Gaussian (the layer of the surface it was sampled on: the part's own
    layer, except in the single-layer ablation, whose one part holds body and garment
    Gaussians), and initial bary [G, K], log_scale [G, 3], quat [G, 4] (w, x, y, z).
    """

    rest_nodes: jax.Array
    cells: jax.Array
    rest_inv: jax.Array
    node_weights: jax.Array
    node_enc: jax.Array
    gauss_cell: jax.Array
    gauss_layer: jax.Array
    bary: jax.Array
    log_scale: jax.Array
    quat: jax.Array

    @property
    def n_gaussians(self) -> int:
        """Number of Gaussians G of the part."""
        return self.gauss_cell.shape[0]


@flax.struct.dataclass
class Context:
    """Everything static about one avatar: parts, the subject's rest joints [55, 3], face keypoint
    statistics (mean, std [51, 3], head frame), configs. Static: names, drivers ("pose" | "face"),
    layers (1 body, 2 upper, 3 lower), parents, n_frames (frame embeddings), and the hashable
    configs."""

    parts: tuple
    rest_joints: jax.Array
    face_mean: jax.Array
    face_std: jax.Array
    names: tuple = flax.struct.field(pytree_node=False, default=())
    drivers: tuple = flax.struct.field(pytree_node=False, default=())
    layers: tuple = flax.struct.field(pytree_node=False, default=())
    parents: tuple = flax.struct.field(pytree_node=False, default=())
    n_frames: int = flax.struct.field(pytree_node=False, default=1)
    model_cfg: tuple = flax.struct.field(pytree_node=False, default=())
    loss_cfg: tuple = flax.struct.field(pytree_node=False, default=())
    optim_cfg: tuple = flax.struct.field(pytree_node=False, default=())

    def m(self, key):
        """A field of the model config."""
        return dict(self.model_cfg)[key]

    def l(self, key):
        """A field of the loss config."""
        return dict(self.loss_cfg)[key]

    def o(self, key):
        """A field of the optimiser config."""
        return dict(self.optim_cfg)[key]


def _frozen(cfg) -> tuple:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def posenc(x, n_freq: int):
    """NeRF positional encoding of [..., 3] points: [x, sin(2^k pi x) for every k, cos(2^k pi x)
    for every k], k < n_freq (sines of frequency k at 3 + 3 k .. 3 + 3 k + 2): [..., 3 + 6 n_freq]."""
    x = jnp.asarray(x, jnp.float32)
    freqs = (2.0 ** jnp.arange(n_freq)) * jnp.pi
    ang = x[..., None, :] * freqs[:, None]
    return jnp.concatenate([x, jnp.sin(ang).reshape(x.shape[:-1] + (-1,)),
                            jnp.cos(ang).reshape(x.shape[:-1] + (-1,))], -1)


def make_context(parts: Sequence[Mapping], rest_joints, parents, *, n_frames: int, face_mean=None, face_std=None,
                 model_cfg=None, loss_cfg=None, optim_cfg=None) -> Context:
    """A Context from `d3ga_data.build_parts` dicts.

    Args:
      parts: part dicts (name, layer, driver, rest_nodes, tets, rest_inv, node_weights, gauss_tet,
        gauss_bary, gauss_log_scale, gauss_quat, optionally gauss_layer [G] (default: the part's
        layer for every Gaussian), and for geometry="triangles" surf_vertices,
        surf_faces, surf_weights, gauss_face, gauss_face_bary).
      rest_joints: [55, 3] the subject's rest joints (metres); parents: the kinematic tree.
      n_frames: training frames (frame embeddings); face_mean / face_std: [51, 3] statistics of
        the head-frame face keypoints (required when a part is driven by the face).
    """
    mc = default_model_config() if model_cfg is None else model_cfg
    lc = default_loss_config() if loss_cfg is None else loss_cfg
    oc = default_optim_config() if optim_cfg is None else optim_cfg
    if mc.geometry not in ("tets", "triangles"):
        raise ValueError(f"model.geometry must be 'tets' or 'triangles', got {mc.geometry!r}")
    if mc.bary_domain not in BARY_DOMAINS:
        raise ValueError(f"model.bary_domain must be one of {BARY_DOMAINS}, got {mc.bary_domain!r}")
    built = []
    for p in parts:
        missing = [k for k in ("name", "layer", "driver") if k not in p]
        if missing:
            raise ValueError(f"part dict lacks {missing}")
        if mc.geometry == "tets":
            nodes, cells = p["rest_nodes"], p["tets"]
            rest_inv, w = p["rest_inv"], p["node_weights"]
            cell, bary = p["gauss_tet"], p["gauss_bary"]
        else:
            nodes, cells = p["surf_vertices"], p["surf_faces"]
            rest_inv = np.asarray(deformation.triangle_canonical_inverse(
                jnp.asarray(nodes, jnp.float32), jnp.asarray(cells, jnp.int32)))
            w = p["surf_weights"]
            cell, bary = p["gauss_face"], p["gauss_face_bary"]
        nodes = np.asarray(nodes, np.float32)
        n_g = np.asarray(cell).shape[0]
        g_layer = np.asarray(p.get("gauss_layer", np.full(n_g, int(p["layer"]))), np.int32)
        if g_layer.shape != (n_g,) or not np.isin(g_layer, (1, 2, 3)).all():
            raise ValueError(f"part {p['name']!r}: gauss_layer must be [{n_g}] layer ids in {{1, 2, 3}}, "
                             f"got shape {g_layer.shape}")
        built.append(Part(
            rest_nodes=jnp.asarray(nodes), cells=jnp.asarray(cells, jnp.int32),
            rest_inv=jnp.asarray(rest_inv, jnp.float32), node_weights=jnp.asarray(w, jnp.float32),
            node_enc=posenc(nodes, int(mc.posenc)), gauss_cell=jnp.asarray(cell, jnp.int32),
            gauss_layer=jnp.asarray(g_layer),
            bary=jnp.asarray(bary, jnp.float32), log_scale=jnp.asarray(p["gauss_log_scale"], jnp.float32),
            quat=jnp.asarray(p["gauss_quat"], jnp.float32)))
    drivers = tuple(str(p["driver"]) for p in parts)
    if "face" in drivers and (face_mean is None or face_std is None):
        raise ValueError("a face-driven part needs face_mean and face_std (d3ga_data.face_keypoint_stats)")
    fm = np.zeros((N_FACE_KEYPOINTS, 3), np.float32) if face_mean is None else np.asarray(face_mean, np.float32)
    fs = np.ones((N_FACE_KEYPOINTS, 3), np.float32) if face_std is None else np.asarray(face_std, np.float32)
    return Context(parts=tuple(built), rest_joints=jnp.asarray(rest_joints, jnp.float32),
                   face_mean=jnp.asarray(fm), face_std=jnp.asarray(np.maximum(fs, 1e-4)),
                   names=tuple(str(p["name"]) for p in parts), drivers=drivers,
                   layers=tuple(int(p["layer"]) for p in parts), parents=tuple(int(x) for x in parents),
                   n_frames=int(n_frames), model_cfg=_frozen(mc), loss_cfg=_frozen(lc), optim_cfg=_frozen(oc))


# ----------------------------------------------------------------------------------------------
# MLPs (plain pytrees: {"layers": {"l0": {"w_in", "w_cond", "b"}, "l1": {"w", "b"}, ...}}).


def mlp_init(key, n_in: int, n_cond: int, hidden: int, depth: int, n_out: int, out_bias=None) -> dict:
    """An MLP with `depth` hidden ReLU layers whose first layer takes a per-item input [.., n_in]
    and a shared conditioning vector [n_cond] (its product is computed once, not per item); the
    last layer starts at zero (the MLP's first output is its bias: no correction at init)."""
    ks = jax.random.split(key, depth + 1)
    he = lambda k, a, b: jax.random.normal(k, (a, b), jnp.float32) * np.sqrt(2.0 / a)
    first = he(ks[0], n_in + n_cond, hidden)
    layers = [{"w_in": first[:n_in], "w_cond": first[n_in:], "b": jnp.zeros(hidden, jnp.float32)}]
    for i in range(1, depth):
        layers.append({"w": he(ks[i], hidden, hidden), "b": jnp.zeros(hidden, jnp.float32)})
    bias = jnp.zeros(n_out, jnp.float32) if out_bias is None else jnp.asarray(out_bias, jnp.float32)
    layers.append({"w": jnp.zeros((hidden, n_out), jnp.float32), "b": bias})
    return {"layers": {f"l{i}": layer for i, layer in enumerate(layers)}}


def _layers(params) -> list:
    d = params["layers"]
    return [d[f"l{i}"] for i in range(len(d))]


def mlp_apply(params, x, cond):
    """x [..., n_in], cond [n_cond] -> [..., n_out]."""
    layers = _layers(params)
    h = jax.nn.relu(jnp.matmul(x, layers[0]["w_in"], precision=_HI)
                    + (jnp.matmul(cond, layers[0]["w_cond"], precision=_HI) + layers[0]["b"]))
    for layer in layers[1:-1]:
        h = jax.nn.relu(jnp.matmul(h, layer["w"], precision=_HI) + layer["b"])
    return jnp.matmul(h, layers[-1]["w"], precision=_HI) + layers[-1]["b"]


def cond_dim(ctx: Context, driver: str) -> int:
    """Size of a part's conditioning vector: the face code's size for driver "face", else 3 values
    (axis-angle) per joint of POSE_JOINTS."""
    return int(ctx.m("face_dim")) if driver == "face" else 3 * len(POSE_JOINTS)


def init_params(key, ctx: Context) -> dict:
    """Learnable parameters: per part {bary, log_scale, quat, feature, psi, pi, gamma}, the frame
    embeddings [n_frames, frame_dim] and, with a face-driven part, face_net."""
    H, D = int(ctx.m("hidden")), int(ctx.m("depth"))
    fd, ed = int(ctx.m("feature_dim")), int(ctx.m("frame_dim"))
    keys = jax.random.split(key, len(ctx.parts) + 2)
    op = float(ctx.m("init_opacity"))
    parts = {}
    for name, drv, part, k in zip(ctx.names, ctx.drivers, ctx.parts, keys):
        kk = jax.random.split(k, 4)
        nc = cond_dim(ctx, drv)
        K = part.cells.shape[1]
        n_sh = (SH_DEGREE + 1) ** 2
        parts[name] = {
            "bary": part.bary, "log_scale": part.log_scale, "quat": part.quat,
            "feature": 0.01 * jax.random.normal(kk[0], (part.n_gaussians, fd), jnp.float32),
            "psi": mlp_init(kk[1], part.node_enc.shape[1], nc, H, D, 3),
            "pi": mlp_init(kk[2], K + 4 + 3, nc, H, D, K + 3 + 4),
            "gamma": mlp_init(kk[3], n_sh + fd + ed, nc, H, D, 4,
                              out_bias=[0.0, 0.0, 0.0, float(np.log(op / (1 - op)))]),
        }
    out = {"parts": parts, "frame_embed": 0.01 * jax.random.normal(keys[-2], (ctx.n_frames, ed), jnp.float32)}
    if "face" in ctx.drivers:
        out["face_net"] = {"layers": {
            "l0": {"w": jax.random.normal(keys[-1], (3 * N_FACE_KEYPOINTS, 64), jnp.float32) * np.sqrt(2.0 / 153),
                   "b": jnp.zeros(64, jnp.float32)},
            "l1": {"w": jax.random.normal(jax.random.fold_in(keys[-1], 1), (64, int(ctx.m("face_dim"))), jnp.float32)
                   * np.sqrt(1.0 / 64), "b": jnp.zeros(int(ctx.m("face_dim")), jnp.float32)}}}
    return out


# ----------------------------------------------------------------------------------------------
# Driving signals and posing.


def joint_transforms(ctx: Context, pose):
    """pose [55, 3] axis-angle -> (rotations [55, 3, 3], rel [55, 4, 4] rest -> posed transforms)."""
    rot = rotations.axis_angle_to_matrix(jnp.asarray(pose, jnp.float32))
    _, rel = lbs_lib.batch_rigid_transform(rot[None], ctx.rest_joints[None], ctx.parents)
    return rot, rel[0]


def face_keypoints_local(rel, translation, keypoints):
    """The 51 face keypoints [51, 3] in the head joint's frame: the posed head transform (rel of
    the head joint, plus the translation) removed from keypoints [106, 3] (55 joints first)."""
    T = rel[HEAD_JOINT]
    face = keypoints[55:55 + N_FACE_KEYPOINTS] - translation
    return jnp.einsum("ji,nj->ni", T[:3, :3], face - T[:3, 3], precision=_HI)   # R^T (x - t)


def face_code(params, ctx: Context, rel, translation, keypoints):
    """[face_dim] code of the face keypoints (normalised by the training statistics)."""
    z = ((face_keypoints_local(rel, translation, keypoints) - ctx.face_mean) / ctx.face_std).reshape(-1)
    l0, l1 = _layers(params["face_net"])
    return jnp.tanh(jnp.matmul(jax.nn.relu(jnp.matmul(z, l0["w"], precision=_HI) + l0["b"]), l1["w"],
                               precision=_HI) + l1["b"])


def _skin(points, weights, rel):
    return lbs_lib.skin_dense(points[None], rel[None], weights)[0]


def _quat_rot(q):
    return splat.quat_to_rotmat(q)


def part_gaussians(ctx: Context, i: int, pp, cond, rel, translation) -> dict:
    """Posed Gaussians of part i: means [G, 3], covariances [G, 3, 3], J [M, 3, 3] (per cell),
    and the per-Gaussian inputs of Gamma.

    pp: the part's parameters; cond: [n_cond] its driving signal; rel: [55, 4, 4]; translation [3].
    """
    part = ctx.parts[i]
    offs = float(ctx.m("offset_scale")) * jnp.tanh(mlp_apply(pp["psi"], part.node_enc, cond))
    posed = _skin(part.rest_nodes + offs, part.node_weights, rel) + translation        # [N, 3]
    if ctx.m("geometry") == "tets":
        J = tetra.deformation_gradients(None, posed, part.cells, part.rest_inv)         # [M, 3, 3]
    else:
        J = deformation.triangle_deformation_gradients(None, posed, part.cells, canon_inv=part.rest_inv)
    K = part.cells.shape[1]
    corr = mlp_apply(pp["pi"], jnp.concatenate([pp["bary"], pp["quat"], pp["log_scale"]], -1), cond)
    bary = pp["bary"] + float(ctx.m("bary_scale")) * jnp.tanh(corr[:, :K])
    log_s = pp["log_scale"] + float(ctx.m("scale_scale")) * jnp.tanh(corr[:, K:K + 3])
    q = pp["quat"] + float(ctx.m("quat_scale")) * jnp.tanh(corr[:, K + 3:])
    means, cov = embedded_gaussians(posed, part.cells, J, part.gauss_cell, bary, log_s, q,
                                    bary_domain=ctx.m("bary_domain"))
    return {"means": means, "covariances": cov, "J": J, "feature": pp["feature"]}


def simplex_projection(y):
    """Euclidean projection of each row of y [..., K] onto the probability simplex
    {x : x >= 0, sum x = 1}: x = max(y - tau, 0) with the threshold tau from the sorted row (the
    rule of Held, Wolfe and Crowder 1974; Duchi et al. 2008). Rows already in the simplex are
    returned unchanged (up to rounding). Differentiable almost everywhere (piecewise affine in y)."""
    y = jnp.asarray(y)
    K = y.shape[-1]
    u = -jnp.sort(-y, axis=-1)                                   # descending
    css = jnp.cumsum(u, -1)
    j = jnp.arange(1, K + 1, dtype=y.dtype)
    rho = jnp.sum(u - (css - 1.0) / j > 0, -1, keepdims=True)   # >= 1: the first term is always 1
    tau = (jnp.take_along_axis(css, rho - 1, -1) - 1.0) / rho.astype(y.dtype)
    return jnp.maximum(y - tau, 0.0)


def embedded_gaussians(posed_nodes, cells, J, gauss_cell, bary, log_scale, quat, *, bary_domain: str = "affine"):
    """Gaussians embedded in cells of a deformed cage (D3GA Eqs. 5-8).

    Args:
      posed_nodes: [N, 3] deformed nodes (metres); cells: [M, K] node ids; J: [M, 3, 3] the cells'
        deformation gradients; gauss_cell: [G] fixed cell per Gaussian; bary: [G, K] barycentrics
        (normalised to sum 1 here); log_scale: [G, 3]; quat: [G, 4] (w, x, y, z, any norm) of the
        canonical covariance R S S^T R^T; bary_domain: "affine" (the thesis: b may leave its cell)
        or "simplex" (the normalised b projected onto the simplex: the mean stays in its cell).
    Returns:
      means [G, 3] = sum_k b_k v_k and covariances [G, 3, 3] = J R S S^T R^T J^T.
    """
    if bary_domain not in BARY_DOMAINS:
        raise ValueError(f"bary_domain must be one of {BARY_DOMAINS}, got {bary_domain!r}")
    bary = bary / jnp.sum(bary, -1, keepdims=True)
    if bary_domain == "simplex":
        bary = simplex_projection(bary)
    corners = posed_nodes[cells[gauss_cell]]                                               # [G, K, 3]
    means = jnp.einsum("gk,gkc->gc", bary, corners, precision=_HI)
    R = _quat_rot(quat)
    S2 = jnp.exp(2.0 * log_scale)
    sigma = jnp.einsum("gij,gj,gkj->gik", R, S2, R, precision=_HI)
    Jg = J[gauss_cell]
    return means, jnp.einsum("gij,gjk,glk->gil", Jg, sigma, Jg, precision=_HI)


def conditioning(params, ctx: Context, frame: Mapping, rel):
    """{driver: cond vector}: the pose of joints 1..21 and, when used, the face code."""
    out = {"pose": jnp.asarray(frame["pose"], jnp.float32)[jnp.asarray(POSE_JOINTS)].reshape(-1)}
    if "face" in ctx.drivers:
        out["face"] = face_code(params, ctx, rel, jnp.asarray(frame["translation"], jnp.float32),
                                jnp.asarray(frame["keypoints"], jnp.float32))
    return out


def posed_avatar(params, ctx: Context, frame: Mapping) -> dict:
    """Every part's posed Gaussians of one frame (pose [55, 3], translation [3], keypoints
    [106, 3]): {means [N, 3], covariances [N, 3, 3], feature [N, Fh], layer [N] (layer ids),
    part ids [N], J: tuple of per-part [M, 3, 3], conds: per-part conditioning}."""
    _, rel = joint_transforms(ctx, frame["pose"])
    t = jnp.asarray(frame["translation"], jnp.float32)
    conds = conditioning(params, ctx, frame, rel)
    outs = [part_gaussians(ctx, i, params["parts"][name], conds[drv], rel, t)
            for i, (name, drv) in enumerate(zip(ctx.names, ctx.drivers))]
    layer = jnp.concatenate([part.gauss_layer for part in ctx.parts])
    part_id = jnp.concatenate([jnp.full(ctx.parts[i].n_gaussians, i, jnp.int32) for i in range(len(ctx.parts))])
    return {"means": jnp.concatenate([o["means"] for o in outs]),
            "covariances": jnp.concatenate([o["covariances"] for o in outs]),
            "feature": jnp.concatenate([o["feature"] for o in outs]),
            "layer": layer, "part": part_id, "J": tuple(o["J"] for o in outs),
            "conds": tuple(conds[d] for d in ctx.drivers)}


def appearance(params, ctx: Context, avatar: Mapping, cam_centre, frame_embed):
    """Colours [N, 3] and opacities [N] of the posed Gaussians seen from cam_centre [3]."""
    d = avatar["means"] - cam_centre
    d = d / jnp.maximum(jnp.linalg.norm(d, axis=-1, keepdims=True), 1e-9)
    enc = splat.sh_basis(SH_DEGREE, d)
    outs, start = [], 0
    for i, name in enumerate(ctx.names):
        G = ctx.parts[i].n_gaussians
        x = jnp.concatenate([enc[start:start + G], avatar["feature"][start:start + G],
                             jnp.broadcast_to(frame_embed, (G, frame_embed.shape[-1]))], -1)
        outs.append(mlp_apply(params["parts"][name]["gamma"], x, avatar["conds"][i]))
        start += G
    o = jnp.concatenate(outs)
    return jax.nn.sigmoid(o[:, :3]), jax.nn.sigmoid(o[:, 3])


def frame_embedding(params, index, train: bool):
    """The per-frame embedding of training frame `index`, or the mean embedding (test time)."""
    E = params["frame_embed"]
    return E[index] if train else jnp.mean(E, 0)


def render(params, ctx: Context, frame: Mapping, cameras: camera_lib.Camera, background, *,
           train: bool = False, index=0, backend: str = "auto") -> dict:
    """Renders one frame in cameras [C]: image [C, H, W, 3], layers [C, H, W, 3] (the one-colour-
    per-layer render), alpha [C, H, W, 1], and the avatar dict.

    frame: pose [55, 3], translation [3], keypoints [106, 3]; background: [3] or [C, 3];
    train: use frame `index`'s embedding (else the mean embedding).
    """
    avatar = posed_avatar(params, ctx, frame)
    emb = frame_embedding(params, index, train)
    centres = camera_lib.camera_centre(cameras)                                          # [C, 3]
    lay = jnp.asarray(np.array([LAYER_COLOURS[k] for k in (1, 2, 3)], np.float32))[avatar["layer"] - 1]
    C = centres.shape[0]
    rgb, opac = jax.vmap(lambda c: appearance(params, ctx, avatar, c, emb))(centres)   # [C, N, 3], [C, N]
    # One opacity per Gaussian: the splatter takes [N]; the view dependence of opacity is averaged
    # over the batch's cameras (with one camera per step, as in training, it is exact).
    opacity = jnp.mean(opac, 0)
    colours = jnp.concatenate([rgb, jnp.broadcast_to(lay, (C,) + lay.shape)], -1)        # [C, N, 6]
    bg = jnp.broadcast_to(jnp.asarray(background, jnp.float32), (C, 3))
    bg6 = jnp.concatenate([bg, jnp.zeros((C, 3), jnp.float32)], -1)
    N = avatar["means"].shape[0]
    out = splat.rasterize(avatar["means"], jnp.zeros((N, 4)).at[:, 0].set(1.0), jnp.ones((N, 3)), opacity,
                          colours, cameras, covariances=avatar["covariances"], background=bg6, backend=backend)
    return {"image": out.image[..., :3], "layers": out.image[..., 3:], "alpha": out.alpha, "avatar": avatar,
            "opacity": opacity}


# ----------------------------------------------------------------------------------------------
# Loss and training.


def layer_targets(layers):
    """[..., H, W] labels (0 background, 1 body, 2 upper, 3 lower) -> [..., H, W, 3] colours."""
    lut = jnp.asarray(np.array([(0.0, 0.0, 0.0)] + [LAYER_COLOURS[k] for k in (1, 2, 3)], np.float32))
    return lut[jnp.clip(jnp.asarray(layers, jnp.int32), 0, 3)]


def neo_energy(ctx: Context, avatar) -> jax.Array:
    """Mean Neo-Hookean energy over every part's cells (tetrahedra; 0 for the triangle ablation)."""
    if ctx.m("geometry") != "tets":
        return jnp.zeros((), jnp.float32)
    Js = jnp.concatenate(avatar["J"])
    return tetra.neo_hookean_energy(Js, float(ctx.l("neo_lambda")), float(ctx.l("neo_mu")),
                                    stable=bool(ctx.l("neo_stable")))


def _cameras(batch) -> camera_lib.Camera:
    H, W = batch["image"].shape[-3], batch["image"].shape[-2]
    return camera_lib.Camera(batch["K"], batch["R"], batch["t"], W, H)


def check_batch(batch: Mapping) -> None:
    """Clear errors for a batch that D3GA cannot train on (missing layer labels, wrong pose)."""
    for k in ("image", "layers", "K", "R", "t", "pose", "translation", "keypoints", "background", "index"):
        if k not in batch:
            raise ValueError(f"D3GA batch lacks {k!r}" + (" (the garment loss needs the layer segmentation)"
                                                          if k == "layers" else ""))
    if tuple(np.shape(batch["pose"])[-2:]) != (55, 3):
        raise ValueError(f"pose must be [..., 55, 3] (SMPL-X joints, axis-angle), got {np.shape(batch['pose'])}")
    if np.shape(batch["keypoints"])[-1] != 3 or np.shape(batch["keypoints"])[-2] < 55 + N_FACE_KEYPOINTS:
        raise ValueError(f"keypoints must be [..., 106, 3] (55 joints + 51 face points), got "
                         f"{np.shape(batch['keypoints'])}")


def loss_terms(params, batch, ctx: Context, *, train: bool = True) -> tuple[jax.Array, dict]:
    """D3GA's loss of one frame seen by V cameras.

    batch: image [V, H, W, 3] (composited on background), layers [V, H, W] int, K [V, 3, 3],
    R [V, 3, 3], t [V, 3], pose [55, 3], translation [3], keypoints [106, 3], background [3] or
    [V, 3], index (training frame position).
    Returns (total, {loss, color, garment, neo, psnr, l1}).
    """
    out = render(params, ctx, batch, _cameras(batch), batch["background"], train=train, index=batch["index"])
    gt = batch["image"]
    color = losses.l1_ssim_loss(out["image"], gt, ssim_weight=float(ctx.l("ssim_weight")))
    garment = jnp.mean(jnp.abs(out["layers"] - layer_targets(batch["layers"])))
    neo = neo_energy(ctx, out["avatar"])
    total = (float(ctx.l("color_weight")) * color + float(ctx.l("garment_weight")) * garment
             + float(ctx.l("neo_weight")) * neo)
    return total, {"loss": total, "color": color, "garment": garment, "neo": neo,
                   "psnr": losses.psnr(out["image"], gt), "l1": losses.l1(out["image"], gt)}


def batch_loss(params, batch, ctx: Context, train: bool = True):
    """`loss_terms` averaged over a batch of B frames (every array with a leading [B])."""
    total, metrics = jax.vmap(lambda b: loss_terms(params, b, ctx, train=train))(batch)
    return jnp.mean(total), jax.tree.map(jnp.mean, metrics)


def make_optimizer(ctx: Context):
    """Adam with lr `optim.lr`, multiplied by `optim.decay` at each fraction `optim.decay_at` of
    `optim.train_steps`."""
    steps = int(ctx.o("train_steps"))
    bounds = {int(f * steps): float(ctx.o("decay")) for f in ctx.o("decay_at") if 0 < int(f * steps) < steps}
    return optax.adam(optax.piecewise_constant_schedule(float(ctx.o("lr")), bounds))


def init_state(key, ctx: Context) -> dict:
    """{"params": `init_params`, "opt": the optimizer's state}."""
    params = init_params(key, ctx)
    return {"params": params, "opt": make_optimizer(ctx).init(params)}


def train_step(state, batch, key, ctx: Context):
    """One Adam step on a batch of B frames. Returns (state, metrics)."""
    del key
    (_, metrics), grads = jax.value_and_grad(batch_loss, has_aux=True)(state["params"], batch, ctx)
    updates, opt = make_optimizer(ctx).update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, metrics


def evaluate_batch(state, batch, ctx: Context) -> dict:
    """Held-out metrics (mean frame embedding)."""
    return batch_loss(state["params"], batch, ctx, train=False)[1]


def method_functions(ctx: Context):
    """(init, train_step, evaluate) for `dhjax.train.loop.Method`."""
    return (lambda key, batch: init_state(key, ctx), functools.partial(train_step, ctx=ctx),
            functools.partial(evaluate_batch, ctx=ctx))


# ----------------------------------------------------------------------------------------------
# Export and size.


def export_gaussians(params, ctx: Context, frame: Mapping, cam_centre) -> dict:
    """A posed avatar as plain 3DGS attributes for a PLY (`dhjax.io.save_gaussians_ply`): means
    [N, 3], quats [N, 4], scales [N, 3] (from the eigen-decomposition of each covariance),
    opacities [N], colours [N, 3] as seen from cam_centre [3] (mean frame embedding)."""
    av = posed_avatar(params, ctx, frame)
    rgb, op = appearance(params, ctx, av, jnp.asarray(cam_centre, jnp.float32), frame_embedding(params, 0, False))
    w, V = jnp.linalg.eigh(av["covariances"])                     # covariance = V diag(w) V^T
    V = V.at[:, :, 2].multiply(jnp.sign(jnp.linalg.det(V))[:, None])     # a rotation (det +1)
    return {"means": av["means"], "quats": rotations.matrix_to_quaternion(V), "scales": jnp.sqrt(jnp.maximum(w, 1e-12)),
            "opacities": op, "colors": rgb}


def size_table(params) -> dict:
    """{parameters, megabytes (float32), per group {parameters}} of an avatar's parameters."""
    leaves = lambda t: sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(t))
    groups = {"gaussians": 0, "mlps": 0, "frame_embed": leaves(params["frame_embed"]),
              "face_net": leaves(params.get("face_net", {}))}
    for pp in params["parts"].values():
        groups["gaussians"] += sum(leaves(pp[k]) for k in ("bary", "log_scale", "quat", "feature"))
        groups["mlps"] += sum(leaves(pp[k]) for k in ("psi", "pi", "gamma"))
    total = sum(groups.values())
    return {"parameters": total, "megabytes": total * 4 / 2 ** 20, "groups": groups}

"""INSTA: instant volumetric head avatars (thesis section A.2), as pure functions.

A neural radiance field lives in the canonical space of a head model; every frame of a tracked
monocular video deforms it through that frame's tracked mesh M_i. Per training step:

1. Rays of a few frames are marched through an occupancy grid (`dhjax.ops.raymarch.march`) in
   deformed (world) space, giving a compacted list of samples p (step `step`, metres).
2. Each sample is canonicalised by the nearest triangle of M_i (`dhjax.ops.closest_point`, a BVH)
   and the smoothed INSTA deformation gradient (`dhjax.geometry.deformation.canonicalize`, eqs.
   2-4): p' = F_hat p.
3. The canonical field: a multi-resolution hash encoding of p' (`dhjax.ops.hash_encode`,
   tiny-cuda-nn's HashGrid), a density MLP (width 64, 16 outputs, the first is the log density,
   sigma = exp), and a colour MLP (width 64) on those 16 values, the degree-4 spherical-harmonics
   encoding of the view direction (16 values) and the expression condition: the frame's first 16
   expression coefficients for samples whose nearest triangle lies in the mouth region, a constant
   vector of ones elsewhere (thesis: "bounded to the dynamically changing mouth region").
4. Volume rendering (`dhjax.ops.raymarch.composite`, eq. 5): alpha_n = 1 - exp(-sigma_n delta),
   early termination at transmittance 1e-4, background colour, expected depth z = sum w_n t_n.
5. Loss (eqs. 6-8): Huber (rho = 0.1) on the colour error norm, weight 40 on mouth pixels and 1
   elsewhere, plus 1.25 x L1 between the rendered depth and the tracked mesh's rasterised depth
   on face pixels. Adam (lr 2.5e-3, betas 0.9/0.99, eps 1e-15), an exponential moving average of
   the weights (0.95, the reference implementation's) is what evaluation renders.

The occupancy grid (instant-ngp style) is a D^3 grid over the canonical box (the canonical mesh's
bounding box grown by `margin`): every `occupancy.every` steps the density of a random subset of
cells (jittered cell points) is evaluated, the grid keeps max(decay * old, sigma * step) and a
cell is occupied when that optical thickness exceeds min(threshold, mean). For marching a frame,
the occupied canonical cells are carried into that frame's space: each cell centre is mapped by
the inverse deformation gradient of its nearest canonical triangle (found once at init) into a
D^3 grid over the deformed mesh's box (grown by `margin`), then dilated by one cell. This
forward warp stands in for a grid per frame (which would need a closest-point query per cell
and frame). It approximates the per-point map: the dilation absorbs the smoothing and the cell
size, but where a cell's nearest canonical triangle is not the deformed nearest triangle of the
points that map into it (folds, an open jaw), some samples whose canonical point is occupied
land in empty cells of the frame's grid and are skipped. Measured on the default head (a 64^3
grid occupying a 1 cm shell, three frames with random expressions, two with the jaw open 0.3
rad, uniform points in each frame's box): 0.01-0.17% of the points within 1 cm of the deformed
surface whose canonical point is occupied were skipped, up to 9% of those in the whole box
(mostly more than 1 cm from the surface, many inside the head).

Deliberate deviations and choices where the thesis is silent (also in the README):
* The mouth region (expression conditioning) is the set of triangles of the lips and of the
  mouth-interior proxy (the default head's synthetic assets add a closed mouth cavity, the
  thesis's "additional set of triangles in the mouth region"); the per-pixel mouth and face
  regions of the loss come from the rasterised tracked mesh (triangle labels), not from a face
  parser, intersected with the dataset's segmentation when it has one.
* The scale lambda of eq. 3 is the inverse length ratio sqrt(a_canon / a_def) (the map that
  sends a uniformly scaled triangle back exactly), not the area ratio a_def / a_canon as
  written; the nearest triangle's own weight is 1. Both readings were decided by an ablation
  (README).
* The view direction is rotated into canonical space by F_hat before its SH encoding.
* The loss is the mean over rays (the thesis writes a sum; the same up to Adam's scale
  invariance).
* Samples whose canonical point leaves the canonical box have zero density (the hash grid would
  alias them).
* The expression reaches the colour MLP only (the thesis: "concatenated" with the density
  output for the colour network); mouth geometry moves with the mesh's canonicalisation.
* The depth term is in metres (the marching step is scaled by the box, the depth is not), so
  lambda_geom = 1.25 weighs metres, not box units.
* Ablation "no deformation field" (NeRFace-like): samples are mapped into the head's rigid frame
  (inverse global pose) instead of canonicalised, and both MLPs get the expression and a learned
  per-frame latent code (the mean code at test time).

Shapes: G = frames per step (groups), R = rays per frame, C = sample capacity per frame, V / F =
vertices / faces of the head mesh (with the mouth proxy), D = occupancy resolution. Units: metres.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dhjax import ops
from dhjax.geometry import deformation
from dhjax.ops import hashgrid as hg
from dhjax.ops import raymarch
from dhjax.render import splat as splat_render

CONDITIONING = ("local", "global")
DEFORMATION = ("mesh", "none")
DEPTH_REGIONS = ("face", "face_mouth")


def default_model_config() -> ml_collections.ConfigDict:
    """The paper's field and rendering settings (see `configs/insta.py` for the variants).

    hash: tiny-cuda-nn HashGrid (16 levels x 2 features, T = 2^19; the thesis gives neither the
      base nor the finest resolution: base 16 as tcnn's default and finest 2048 per box, as
      instant-ngp's NeRF config for a unit scene); density_width/density_hidden, color_width/
      color_hidden: MLP widths and hidden layer counts (instant-ngp's NeRF: 1 and 2 hidden
      layers); geo_features: density MLP outputs (16, the first is log density); n_expression:
      expression coefficients of the condition (16); conditioning: 'local' (mouth region only,
      thesis) or 'global'; deformation: 'mesh' (canonicalisation) or 'none' (per-frame latent
      codes in the rigid head frame, the NeRFace ablation); latent_dim: size of those codes;
      beta, nearest_beta, scale: the canonicalisation's options (`deformation.canonicalize`;
      nearest_beta < 0: the nearest triangle weighs 1; scale 'length_ratio', sqrt(a_canon /
      a_def), instead of the thesis's literal a_def / a_canon: the two readings the thesis leaves
      open, decided by the tiny ablation in the README, where the length ratio was better on
      every held-out metric and the nearest triangle's weight made no measurable difference);
      margin: canonical and deformed boxes grow by this around the meshes (m); step_divisor:
      the marching step is sqrt(3) * box_extent / step_divisor (thesis: 1024); occupancy:
      resolution, every (steps between updates), cells (cells evaluated per update, 0 = all),
      decay, threshold (optical thickness); background: RGB in [0, 1]; max_log_density: clamp of
      the log density before exp.
    """
    c = ml_collections.ConfigDict()
    c.hash = ml_collections.ConfigDict(dict(n_levels=16, n_features_per_level=2, log2_hashmap_size=19,
                                            base_resolution=16, finest_resolution=2048.0))
    c.density_width = 64
    c.density_hidden = 1
    c.geo_features = 16
    c.color_width = 64
    c.color_hidden = 2
    c.n_expression = 16
    c.conditioning = "local"
    c.deformation = "mesh"
    c.latent_dim = 32
    c.beta = 4.0
    c.nearest_beta = -1.0          # < 0: the nearest triangle has weight 1; >= 0: exp(-nearest_beta d)
    c.scale = "length_ratio"       # decided by the ablation (README): the thesis's area ratio scored lower
    c.margin = 0.04
    c.step_divisor = 1024.0
    c.occupancy = ml_collections.ConfigDict(dict(resolution=128, every=16, cells=0, decay=0.95,
                                                 threshold=0.01))
    c.background = (1.0, 1.0, 1.0)
    c.max_log_density = 15.0
    return c


def default_loss_config() -> ml_collections.ConfigDict:
    """huber_rho (0.1), mouth_weight (40), depth_weight (1.25), eqs. 6-8; depth_region: the pixels
    of the depth term, 'face' (the thesis's face region: facial skin without the eyes and the
    mouth interior) or 'face_mouth' (also the mouth region's pixels: lips and mouth interior, an
    ablation beyond the thesis, README); distortion_weight: weight of mip-NeRF 360's distortion
    loss on every ray's weights, distances in units of the canonical box's largest extent (0, the
    thesis: none; beyond the thesis, an ablation in the README)."""
    return ml_collections.ConfigDict(dict(huber_rho=0.1, mouth_weight=40.0, depth_weight=1.25, depth_region="face",
                                          distortion_weight=0.0))


def default_optim_config() -> ml_collections.ConfigDict:
    """Adam with instant-ngp's betas and eps; ema: decay of the weight average used to render."""
    return ml_collections.ConfigDict(dict(lr=2.5e-3, b1=0.9, b2=0.99, eps=1e-15, ema=0.95))


# ----------------------------------------------------------------------------------------------
# The static context of an avatar.


@dataclasses.dataclass(frozen=True, eq=False)
class Context:
    """What the functions need besides the state and the batch (static; hashes by identity).

    canon_verts: [V, 3] canonical mesh (the identity's neutral head with the mouth proxy), m.
    faces: [F, 3] int32; neighbours: [F, 3] int32 edge neighbours (-1: none); mouth_faces: [F]
    bool, the mouth region; box_min/box_max: [3] canonical box, m; cell_face: [D^3] int32
    nearest canonical face of each occupancy cell centre; n_frames: training frames (latent
    codes); model_cfg/loss_cfg/optim_cfg: the ConfigDicts; hash_cfg: HashGridConfig; capacity:
    samples per frame in a training step; backend: kernel backend of every op.
    """

    canon_verts: np.ndarray
    faces: np.ndarray
    neighbours: np.ndarray
    mouth_faces: np.ndarray
    box_min: np.ndarray
    box_max: np.ndarray
    cell_face: np.ndarray
    n_frames: int
    model_cfg: ml_collections.ConfigDict
    loss_cfg: ml_collections.ConfigDict
    optim_cfg: ml_collections.ConfigDict
    hash_cfg: hg.HashGridConfig
    capacity: int
    backend: str = "auto"

    def replace(self, **changes) -> "Context":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def resolution(self) -> int:
        """Side D of the occupancy grid (D^3 cells)."""
        return int(self.model_cfg.occupancy.resolution)

    @property
    def step(self) -> float:
        """Marching step (m): sqrt(3) * max box extent / step_divisor."""
        extent = float(np.max(self.box_max - self.box_min))
        return math.sqrt(3.0) * extent / float(self.model_cfg.step_divisor)


def hash_config(model_cfg) -> hg.HashGridConfig:
    """The hash-grid settings of a model config's `hash` block; the per-level scale is derived from
    the base and finest resolutions."""
    h = model_cfg.hash
    return hg.HashGridConfig(
        n_levels=int(h.n_levels), n_features_per_level=int(h.n_features_per_level),
        log2_hashmap_size=int(h.log2_hashmap_size), base_resolution=int(h.base_resolution),
        per_level_scale=hg.per_level_scale_for(float(h.finest_resolution), int(h.base_resolution),
                                               int(h.n_levels)))


def cell_centres(box_min, box_max, resolution: int) -> np.ndarray:
    """[D^3, 3] centres of the grid cells, flat index i + D (j + D k) (i along x), metres."""
    d = int(resolution)
    ii = (np.arange(d) + 0.5) / d
    z, y, x = np.meshgrid(ii, ii, ii, indexing="ij")
    u = np.stack([x, y, z], -1).reshape(-1, 3)
    return (np.asarray(box_min) + u * (np.asarray(box_max) - np.asarray(box_min))).astype(np.float32)


def make_context(canon_verts, faces, mouth_faces, *, n_frames: int, model_cfg, loss_cfg=None,
                 optim_cfg=None, capacity: int = 1 << 16, backend: str = "auto") -> Context:
    """Builds the context of an avatar from its canonical mesh (host side, once).

    Args:
      canon_verts: [V, 3] float canonical vertices (metres); faces: [F, 3] int; mouth_faces: [F]
        bool mouth region; n_frames: number of training frames; model_cfg: like
        `default_model_config()`; loss_cfg/optim_cfg: defaults when None; capacity: samples
        per frame and training step; backend: "auto" | "reference" | "cpu" | "cuda".
    """
    mc = model_cfg
    loss_cfg = loss_cfg if loss_cfg is not None else default_loss_config()
    if loss_cfg.depth_region not in DEPTH_REGIONS:
        raise ValueError(f"loss.depth_region must be one of {DEPTH_REGIONS}, got {loss_cfg.depth_region!r}")
    if not float(loss_cfg.distortion_weight) >= 0:
        raise ValueError(f"loss.distortion_weight must be >= 0 (0: none), got {loss_cfg.distortion_weight!r}")
    if mc.conditioning not in CONDITIONING:
        raise ValueError(f"model.conditioning must be one of {CONDITIONING}, got {mc.conditioning!r}")
    if mc.deformation not in DEFORMATION:
        raise ValueError(f"model.deformation must be one of {DEFORMATION}, got {mc.deformation!r}")
    canon = np.asarray(canon_verts, np.float32)
    faces = np.asarray(faces, np.int32)
    mouth = np.asarray(mouth_faces, bool)
    if canon.ndim != 2 or canon.shape[1] != 3 or not np.all(np.isfinite(canon)):
        raise ValueError(f"canon_verts: expected finite [V, 3], got {canon.shape}")
    if mouth.shape != (faces.shape[0],):
        raise ValueError(f"mouth_faces: expected [{faces.shape[0]}] bool, got {mouth.shape}")
    margin = float(mc.margin)
    lo, hi = canon.min(0) - margin, canon.max(0) + margin
    centres = cell_centres(lo, hi, int(mc.occupancy.resolution))
    cell_face = np.asarray(ops.closest_point(canon, faces, centres, backend=backend).face, np.int32)
    return Context(canon_verts=canon, faces=faces, neighbours=deformation.face_neighbours(faces),
                   mouth_faces=mouth, box_min=lo.astype(np.float32), box_max=hi.astype(np.float32),
                   cell_face=cell_face, n_frames=int(n_frames), model_cfg=mc,
                   loss_cfg=loss_cfg,
                   optim_cfg=optim_cfg if optim_cfg is not None else default_optim_config(),
                   hash_cfg=hash_config(mc), capacity=int(capacity), backend=backend)


# ----------------------------------------------------------------------------------------------
# The field.


def _dense_init(key, n_in: int, n_out: int):
    lim = math.sqrt(6.0 / n_in)        # He uniform (ReLU layers)
    return {"w": jax.random.uniform(key, (n_in, n_out), jnp.float32, -lim, lim),
            "b": jnp.zeros((n_out,), jnp.float32)}


def _mlp_init(key, n_in: int, width: int, hidden: int, n_out: int) -> dict:
    """{"layer_0": {"w", "b"}, ...}: hidden ReLU layers of `width`, a linear output."""
    sizes = [n_in] + [width] * hidden + [n_out]
    keys = jax.random.split(key, len(sizes) - 1)
    return {f"layer_{i}": _dense_init(k, a, b) for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def _mlp(layers, x):
    n = len(layers)
    for i in range(n):
        layer = layers[f"layer_{i}"]
        x = x @ layer["w"] + layer["b"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def _condition_dim(mc) -> int:
    extra = int(mc.latent_dim) if mc.deformation == "none" else 0
    return int(mc.n_expression) + extra


def init_params(key, ctx: Context) -> dict:
    """Parameters: hash table [L, T, F], density MLP, colour MLP (+ latent codes [N, latent_dim]
    and the condition input of the density MLP with deformation='none')."""
    mc = ctx.model_cfg
    k_tab, k_den, k_col, k_lat = jax.random.split(key, 4)
    n_enc = ctx.hash_cfg.n_output_dims
    den_in = n_enc + (_condition_dim(mc) if mc.deformation == "none" else 0)
    col_in = int(mc.geo_features) + 16 + _condition_dim(mc)
    params = {
        "table": hg.init_table(k_tab, ctx.hash_cfg),
        "density": _mlp_init(k_den, den_in, int(mc.density_width), int(mc.density_hidden), int(mc.geo_features)),
        "color": _mlp_init(k_col, col_in, int(mc.color_width), int(mc.color_hidden), 3),
    }
    if mc.deformation == "none":
        params["latent"] = 0.01 * jax.random.normal(k_lat, (ctx.n_frames, int(mc.latent_dim)), jnp.float32)
    return params


class FieldOut(NamedTuple):
    """The radiance field at sample points: density and colour."""
    sigma: jax.Array    # [..., N] density (1/m)
    rgb: jax.Array      # [..., N, 3] in [0, 1]


def _encode(params, ctx: Context, x_canon):
    """Hash features of canonical points [..., N, 3] and an inside-the-box flag [..., N]."""
    lo, hi = jnp.asarray(ctx.box_min), jnp.asarray(ctx.box_max)
    u = (x_canon - lo) / (hi - lo)
    inside = jnp.all((u >= 0.0) & (u <= 1.0), axis=-1)
    feats = ops.hash_encode(jnp.clip(u, 0.0, 1.0), params["table"], ctx.hash_cfg, backend=ctx.backend,
                            points_grad=False)
    return feats, inside


def density_features(params, ctx: Context, x_canon, condition=None):
    """Density MLP outputs [..., N, geo_features] (the first is log density) and the inside flag."""
    feats, inside = _encode(params, ctx, x_canon)
    if ctx.model_cfg.deformation == "none":
        feats = jnp.concatenate([feats, jnp.broadcast_to(condition, feats.shape[:-1] + condition.shape[-1:])], -1)
    return _mlp(params["density"], feats), inside


def _sigma(h, inside, ctx: Context):
    return jnp.where(inside, jnp.exp(jnp.minimum(h[..., 0], float(ctx.model_cfg.max_log_density))), 0.0)


def field(params, ctx: Context, x_canon, dirs_canon, condition) -> FieldOut:
    """The canonical radiance field.

    Args:
      x_canon: [..., N, 3] canonical points (m); dirs_canon: [..., N, 3] unit view directions;
      condition: [..., N, n_expression (+ latent_dim)] the expression condition per sample.
    Returns:
      FieldOut(sigma [..., N], rgb [..., N, 3]).
    """
    h, inside = density_features(params, ctx, x_canon, condition)
    sh = splat_render.sh_basis(3, dirs_canon)           # bands 0..3: 16 values ("degree 4" in tcnn)
    col_in = jnp.concatenate([h, sh, jnp.broadcast_to(condition, h.shape[:-1] + condition.shape[-1:])], -1)
    rgb = jax.nn.sigmoid(_mlp(params["color"], col_in))
    return FieldOut(_sigma(h, inside, ctx), rgb)


# ----------------------------------------------------------------------------------------------
# Occupancy.


def init_occupancy(ctx: Context) -> dict:
    """All cells occupied (the first updates prune), density grid at zero."""
    n = ctx.resolution ** 3
    return {"density": jnp.zeros((n,), jnp.float32), "bits": jnp.ones((n,), jnp.uint8)}


def canonical_density_at(params, ctx: Context, x_canon, mean_condition=None):
    """sigma [N] at canonical points [N, 3] (deformation='none' uses `mean_condition`)."""
    cond = None
    if ctx.model_cfg.deformation == "none":
        cond = mean_condition[None]
    h, inside = density_features(params, ctx, x_canon, cond)
    return _sigma(h, inside, ctx)


def mean_condition(params, ctx: Context) -> jax.Array:
    """The condition used where no frame is given: ones (the 'elsewhere' constant) with
    deformation='mesh'; zero expression and the mean latent code with deformation='none' (the
    occupancy grid of that ablation is updated with this one condition, so density that exists
    only for other expressions or frames can be pruned: a bias against the ablation)."""
    mc = ctx.model_cfg
    cond = jnp.ones((int(mc.n_expression),), jnp.float32)
    if mc.deformation == "none":
        cond = jnp.concatenate([jnp.zeros_like(cond), jnp.mean(params["latent"], 0)])
    return cond


def update_occupancy(occ: dict, params, ctx: Context, key) -> dict:
    """One instant-ngp grid update: evaluate `occupancy.cells` random cells (all when 0) at a
    jittered point, keep max(decay * old, sigma * step) there, decay the rest, threshold at
    min(threshold, mean). Returns the new {"density" [D^3], "bits" [D^3] uint8}."""
    oc = ctx.model_cfg.occupancy
    d = ctx.resolution
    n = d ** 3
    m = int(oc.cells) if 0 < int(oc.cells) < n else n
    k_idx, k_jit = jax.random.split(key)
    idx = jnp.arange(n) if m == n else jax.random.choice(k_idx, n, (m,), replace=False)
    i, j, k = idx % d, (idx // d) % d, idx // (d * d)
    cell = jnp.stack([i, j, k], -1).astype(jnp.float32)
    u = (cell + jax.random.uniform(k_jit, (m, 3))) / d
    lo, hi = jnp.asarray(ctx.box_min), jnp.asarray(ctx.box_max)
    x = lo + u * (hi - lo)
    sigma = jax.lax.stop_gradient(canonical_density_at(params, ctx, x, mean_condition(params, ctx)))
    decayed = occ["density"] * float(oc.decay)
    density = decayed.at[idx].max(sigma * ctx.step)
    thresh = jnp.minimum(float(oc.threshold), jnp.mean(density))
    return {"density": density, "bits": (density > thresh).astype(jnp.uint8)}


def _affine_inverse(F):
    """[..., 4, 4] affine -> inverse (A^-1, -A^-1 b)."""
    A, b = F[..., :3, :3], F[..., :3, 3]
    Ai = jnp.linalg.inv(A)
    return Ai, -jnp.einsum("...ij,...j->...i", Ai, b)


def frame_boxes(ctx: Context, verts):
    """Deformed boxes [G, 3], [G, 3]: the frame meshes' bounding boxes grown by the margin."""
    m = float(ctx.model_cfg.margin)
    return jnp.min(verts, axis=-2) - m, jnp.max(verts, axis=-2) + m


def deformed_grids(bits, ctx: Context, verts, head_R=None, head_t=None):
    """Occupancy of each frame's space from the canonical bits (module docstring).

    Args:
      bits: [D^3] uint8 canonical occupancy; verts: [G, V, 3] frame meshes (m); head_R [G, 3, 3]
        and head_t [G, 3]: the rigid head transforms (used with deformation='none').
    Returns:
      grids [G, D, D, D] uint8 (indexed [g, i, j, k], i along x), box_min [G, 3], box_max [G, 3].
    """
    d = ctx.resolution
    centres = jnp.asarray(cell_centres(ctx.box_min, ctx.box_max, d))              # [D^3, 3]
    if ctx.model_cfg.deformation == "mesh":
        F = deformation.insta_face_gradients(jnp.asarray(ctx.canon_verts), verts, ctx.faces,
                                             scale=ctx.model_cfg.scale)                # [G, F, 4, 4]
        Ai, bi = _affine_inverse(F)
        cf = jnp.asarray(ctx.cell_face)
        x = jnp.einsum("gnij,nj->gni", Ai[:, cf], centres) + bi[:, cf]                 # [G, D^3, 3]
    else:
        x = jnp.einsum("gij,nj->gni", head_R, centres) + head_t[:, None]
    lo, hi = frame_boxes(ctx, verts)
    cell = jnp.floor((x - lo[:, None]) / (hi - lo)[:, None] * d).astype(jnp.int32)
    ok = jnp.all((cell >= 0) & (cell < d), -1) & (bits[None] > 0)
    flat = jnp.where(ok, cell[..., 0] + d * (cell[..., 1] + d * cell[..., 2]), d ** 3)
    G = verts.shape[0]
    grid = jnp.zeros((G, d ** 3 + 1), jnp.uint8).at[jnp.arange(G)[:, None], flat].max(ok.astype(jnp.uint8))
    grid = grid[:, :-1].reshape(G, d, d, d)                                            # [g, k, j, i]
    grid = jax.lax.reduce_window(grid, jnp.uint8(0), jax.lax.max, (1, 3, 3, 3), (1, 1, 1, 1), "SAME")
    return jnp.transpose(grid, (0, 3, 2, 1)), lo, hi


# ----------------------------------------------------------------------------------------------
# Rendering.


class Frames(NamedTuple):
    """Per-frame inputs of a render (G frames): verts [G, V, 3] tracked mesh (m), expression
    [G, n_expression], head_R [G, 3, 3] / head_t [G, 3] rigid head transform (canonical ->
    world), frame [G] int32 training frame index (latent codes; -1: use the mean code)."""

    verts: jax.Array
    expression: jax.Array
    head_R: jax.Array
    head_t: jax.Array
    frame: jax.Array


class RenderOut(NamedTuple):
    """Rendered rays of G frames x R rays: composited colour, depth and opacity, whether each ray
    fitted into the sample capacity, and the samples each frame's rays needed."""
    color: jax.Array        # [G, R, 3]
    depth: jax.Array        # [G, R] expected ray termination distance (m), not normalised
    opacity: jax.Array      # [G, R]
    complete: jax.Array     # [G, R] bool: every sample of the ray fitted into the capacity
    n_samples: jax.Array    # [G] samples the rays needed
    distortion: jax.Array | None = None   # [G, R] `raymarch.distortion` (with loss.distortion_weight > 0)


def march_frames(bits, ctx: Context, frames: Frames, origins, dirs, capacity=None) -> raymarch.Samples:
    """Marches rays [G, R, 3] through each frame's occupancy (capacity None: sized exactly,
    eager only)."""
    grids, lo, hi = deformed_grids(bits, ctx, frames.verts, frames.head_R, frames.head_t)
    return raymarch.march(origins, dirs, grids, lo, hi, step=ctx.step, capacity=capacity, backend=ctx.backend)


def _frame_conditions(params, ctx: Context, frames: Frames):
    """[G, n_expression (+ latent)] per-frame condition and the 'elsewhere' constant [n_cond]."""
    mc = ctx.model_cfg
    expr = frames.expression[:, : int(mc.n_expression)]
    ones = jnp.ones((int(mc.n_expression),), jnp.float32)
    if mc.deformation == "none":
        codes = params["latent"]
        lat = jnp.where(frames.frame[:, None] >= 0, codes[jnp.clip(frames.frame, 0, codes.shape[0] - 1)],
                        jnp.mean(codes, 0)[None])
        return jnp.concatenate([expr, lat], -1), None
    return expr, ones


def shade(params, ctx: Context, frames: Frames, origins, dirs, samples: raymarch.Samples, background) -> RenderOut:
    """Canonicalises the samples, evaluates the field and composites (steps 2-4 of the module
    docstring). origins/dirs [G, R, 3]; background broadcastable to [G, R, 3]."""
    mc = ctx.model_cfg
    ray = jnp.maximum(samples.ray, 0)
    o = jnp.take_along_axis(origins, ray[..., None], axis=1)
    d = jnp.take_along_axis(dirs, ray[..., None], axis=1)
    p = o + samples.t[..., None] * d                                                    # [G, C, 3]
    # Unused slots (ray -1) would sit at the camera centre, far from the mesh, where a BVH query
    # is slowest; park them on a vertex of the frame's mesh (their density is zeroed below).
    p = jnp.where((samples.ray >= 0)[..., None], p, frames.verts[:, :1])
    cond_frame, ones = _frame_conditions(params, ctx, frames)
    if mc.deformation == "mesh":
        face = ops.closest_point(frames.verts, ctx.faces, jax.lax.stop_gradient(p), backend=ctx.backend).face
        nb = None if float(mc.nearest_beta) < 0 else float(mc.nearest_beta)
        can = deformation.canonicalize(p, frames.verts, jnp.asarray(ctx.canon_verts)[None], ctx.faces,
                                       face=face, beta=float(mc.beta), nearest_beta=nb, scale=mc.scale,
                                       neighbours=ctx.neighbours)
        x = can.points
        dc = jnp.einsum("gnij,gnj->gni", can.gradient[..., :3, :3], d)
        if mc.conditioning == "local":
            mouth = jnp.asarray(ctx.mouth_faces)[face]
            cond = jnp.where(mouth[..., None], cond_frame[:, None], ones)
        else:
            cond = jnp.broadcast_to(cond_frame[:, None], p.shape[:2] + cond_frame.shape[-1:])
    else:
        x = jnp.einsum("gji,gnj->gni", frames.head_R, p - frames.head_t[:, None])
        dc = jnp.einsum("gji,gnj->gni", frames.head_R, d)
        cond = jnp.broadcast_to(cond_frame[:, None], p.shape[:2] + cond_frame.shape[-1:])
    dc = dc / jnp.maximum(jnp.linalg.norm(dc, axis=-1, keepdims=True), 1e-12)
    out = field(params, ctx, x, dc, cond)
    sigma = jnp.where(samples.ray >= 0, out.sigma, 0.0)
    comp = raymarch.composite(sigma, out.rgb, samples, background, backend=ctx.backend)
    dist = None
    if float(ctx.loss_cfg.distortion_weight) > 0:
        dist = raymarch.distortion(comp.weights, samples, scale=float(np.max(ctx.box_max - ctx.box_min)))
    return RenderOut(comp.color, comp.depth, comp.opacity, samples.complete, samples.n_samples, dist)


def render_rays(params, bits, ctx: Context, frames: Frames, origins, dirs, background, capacity=None) -> RenderOut:
    """March + shade for rays [G, R, 3] of G frames (capacity None: sized exactly, eager)."""
    samples = march_frames(bits, ctx, frames, origins, dirs, capacity)
    return shade(params, ctx, frames, origins, dirs, samples, background)


# ----------------------------------------------------------------------------------------------
# Loss and training.


def huber(err_sq, rho: float):
    """Eq. 6 on the error norm n = sqrt(err_sq): n^2/2 if n < rho, else rho (n - rho/2)."""
    small = err_sq < rho * rho
    n = jnp.sqrt(jnp.where(small, 1.0, err_sq))
    return jnp.where(small, 0.5 * err_sq, rho * (n - 0.5 * rho))


def loss_terms(out: RenderOut, batch, ctx: Context) -> tuple[jax.Array, dict]:
    """Eqs. 6-8 as a mean over the rays that fitted into the capacity.

    batch: color [G, R, 3] target, mouth [G, R] and face [G, R] region flags, mesh_t [G, R]
    the tracked mesh's ray distance (m; 0 where the mesh is not hit). The depth term covers the
    face pixels, and the mouth pixels too with loss.depth_region = 'face_mouth'. With
    loss.distortion_weight > 0 the mean of out.distortion over the complete rays is added.
    """
    lc = ctx.loss_cfg
    valid = out.complete.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(valid), 1.0)
    err_sq = jnp.sum((out.color - batch["color"]) ** 2, -1)
    w = jnp.where(batch["mouth"] > 0.5, float(lc.mouth_weight), 1.0)
    color = jnp.sum(valid * w * huber(err_sq, float(lc.huber_rho))) / n
    region = batch["face"] > 0.5
    if lc.depth_region == "face_mouth":
        region = region | (batch["mouth"] > 0.5)
    face = valid * region * (batch["mesh_t"] > 0)
    depth = jnp.sum(face * jnp.abs(out.depth - batch["mesh_t"])) / n
    loss = color + float(lc.depth_weight) * depth
    extra = {}
    if float(lc.distortion_weight) > 0:
        extra["distortion"] = jnp.sum(valid * out.distortion) / n
        loss = loss + float(lc.distortion_weight) * extra["distortion"]
    mse = jnp.sum(valid[..., None] * (out.color - batch["color"]) ** 2) / (3.0 * n)
    return loss, {"loss": loss, "color": color, "depth": depth, **extra, "mse": mse,
                  "psnr": -10.0 * jnp.log10(jnp.maximum(mse, 1e-10)),
                  "truncated_rays": 1.0 - jnp.mean(valid),
                  "samples_per_ray": jnp.mean(out.n_samples) / out.color.shape[1]}


def batch_frames(batch) -> Frames:
    """The `Frames` (tracked mesh, expression, head pose, frame index) of a training batch's keys."""
    return Frames(verts=batch["verts"], expression=batch["expression"], head_R=batch["head_R"],
                  head_t=batch["head_t"], frame=batch["frame"])


def optimizer(ctx: Context):
    """Adam with the config's lr, betas and eps (paper: lr 2.5e-3)."""
    oc = ctx.optim_cfg
    return optax.adam(float(oc.lr), b1=float(oc.b1), b2=float(oc.b2), eps=float(oc.eps))


def init_state(key, ctx: Context) -> dict:
    """{"params", "ema", "opt", "occ" (occupancy), "step"}."""
    params = init_params(key, ctx)
    return {"params": params, "ema": params, "opt": optimizer(ctx).init(params),
            "occ": init_occupancy(ctx), "step": jnp.zeros((), jnp.int32)}


def background_of(ctx: Context):
    """The config's background colour [3] in [0, 1]."""
    return jnp.asarray(ctx.model_cfg.background, jnp.float32)


def train_step(state, batch, key, ctx: Context):
    """One step: (maybe) update the occupancy, render the batch's rays with the capacity of the
    context, Adam on eqs. 6-8, EMA of the weights. batch: `loss_terms`' keys plus origins/dirs
    [G, R, 3], the `Frames` keys and optionally background [G, R, 3] (per-ray colours; default
    the config's background)."""
    oc = ctx.model_cfg.occupancy
    k_occ, _ = jax.random.split(key)
    step = state["step"]
    occ = jax.lax.cond((step % int(oc.every) == 0) & (step > 0),
                       lambda o: update_occupancy(o, state["params"], ctx, k_occ), lambda o: o, state["occ"])
    frames = batch_frames(batch)
    samples = march_frames(occ["bits"], ctx, frames, batch["origins"], batch["dirs"], capacity=ctx.capacity)

    background = batch["background"] if "background" in batch else background_of(ctx)

    def loss_fn(params):
        out = shade(params, ctx, frames, batch["origins"], batch["dirs"], samples, background)
        return loss_terms(out, batch, ctx)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = optimizer(ctx).update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    a = float(ctx.optim_cfg.ema)
    ema = jax.tree_util.tree_map(lambda e, p: a * e + (1.0 - a) * p, state["ema"], params)
    metrics["occupied"] = jnp.mean(occ["bits"].astype(jnp.float32))
    return {"params": params, "ema": ema, "opt": opt, "occ": occ, "step": step + 1}, metrics


def evaluate_batch(state, batch, ctx: Context) -> dict:
    """Loss terms of the EMA weights on a ray batch (as the training batch)."""
    frames = batch_frames(batch)
    samples = march_frames(state["occ"]["bits"], ctx, frames, batch["origins"], batch["dirs"], capacity=ctx.capacity)
    out = shade(state["ema"], ctx, frames, batch["origins"], batch["dirs"], samples, background_of(ctx))
    return loss_terms(out, batch, ctx)[1]


def method_functions(ctx: Context):
    """(init, train_step, evaluate) for `dhjax.train.loop.Method`."""
    return (lambda key, batch: init_state(key, ctx),
            functools.partial(train_step, ctx=ctx),
            functools.partial(evaluate_batch, ctx=ctx))


# The house names of a method's pure functions.
init = init_state
render = render_rays
loss = loss_terms


def parameter_count(params) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


__all__ = [
    "Context", "Frames", "RenderOut", "FieldOut", "default_model_config", "default_loss_config",
    "default_optim_config", "make_context", "hash_config", "init_params", "field", "init_state",
    "init_occupancy", "update_occupancy", "deformed_grids", "march_frames", "shade", "render_rays",
    "huber", "loss_terms", "train_step", "evaluate_batch", "method_functions", "cell_centres",
    "mean_condition", "canonical_density_at", "parameter_count", "background_of", "batch_frames",
    "init", "render", "loss",
]

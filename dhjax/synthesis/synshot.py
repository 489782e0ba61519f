"""SynShot's prior: a VQ-VAE of Gaussian head avatars in UV space, trained on synthetic heads
(Zielonka et al., CVPR 2025; thesis section A.5).

Data flow of one example (maps are S x S in the head model's UV layout, metres):

    x_tex [S,S,3] albedo, x_verts [S,S,3] neutral positions, x_expr [S,S,3] expression offsets
      -> E_id(x_tex, x_verts) = z_id [h,w,n],  E_expr(x_expr) = z_expr [h,w,n]   (encoders)
      -> q(z) nearest codebook entries, straight-through (one codebook per branch; optional
         transformer over the code grid)                                         (quantisers)
      -> D_feat(q_id, q_expr) = feat [S',S',F];  D_id(q_id) = (tex^, verts^);  D_expr(q_expr) = expr^
      -> phi = verts^ + expr^ (rest-pose positions in model space)
      -> per part r (face, hair): a regular grid of UV points inside the part's UV region;
         bilinear samples phi_r = B(phi, u_r, v_r), s_r = B(feat, u_r, v_r)   (densification:
         the grid density, not the map size, sets the number of Gaussians)
      -> initial Gaussians: scale = nearest-neighbour distance within the part, opacity 0.7,
         rotation = orthonormalised [dphi/du, dphi/dv, normal] (exact derivatives of B)
      -> regressors R_color(s_r) = SH (degree 3), R_gauss(s_r) = additive offsets of position,
         rotation, log-scale and opacity logit (four conv blocks with skips on the grid)
      -> LBS of the head model (joints from the example's shape/expression, skinning weights
         sampled from a UV map of the model's weights), global rotation and translation
      -> splatting (`dhjax.render.splat.rasterize`) into the example's camera.

Normalised network units: x_tex in [-1, 1], x_verts = (positions - head centre) / pos_scale,
x_expr = offsets / expr_scale (config `model.pos_scale`, `model.expr_scale`, metres).

Functions here are pure. `build_assets` (host side, once) and `make_context` bundle everything a
step needs besides its state and batch into a frozen `Context`, which `init_state`, `forward`,
`loss_fn`, `train_step` (data-parallel through `jax.shard_map` over all devices) and `predict`
take; `image_metrics` scores their renders. The Gaussians (initialisation, offsets, posing,
splatting, export) are `dhjax.synthesis.synshot_gaussians`, the few-shot inversion
`dhjax.synthesis.synshot_invert`, dataset glue `dhjax.synthesis.synshot_data`, the runs
`dhjax.synthesis.synshot_run` (experiments `synshot_prior`, `synshot_invert`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from dhjax import losses
from dhjax.data import textures
from dhjax.models import hair_region
from dhjax.nn import conv, vq
from dhjax.synthesis import synshot_gaussians as gs
from dhjax.synthesis.synshot_gaussians import SH_COEFFS
from dhjax.train import loop

MAP_KEYS = ("uv_albedo", "uv_position", "uv_expression_offset")
PARAM_KEYS = ("shape", "expression", "pose", "translation")
BATCH_KEYS = ("image", "mask", "K", "R", "t") + PARAM_KEYS + MAP_KEYS


# ----------------------------------------------------------------------------------------------
# Configuration.


def default_model_config() -> ml_collections.ConfigDict:
    """Network and Gaussian settings (the paper values where the thesis states them).

    map_size: S of the input/decoded maps; channels: encoder widths per level (the decoders
      mirror them; the latent grid is S / 2^(len-1)); latent_dim n; num_codes K; beta
      (commitment weight); use_vq (False: the 'w/o VQ' ablation); vq_ema (EMA codebook
      updates instead of the codebook loss); restart_threshold (usage EMA below which a code is
      re-seeded from a batch latent, 0 = off); transformer_layers (0 = no transformer over codes);
      feat_dim F; feat_drop_levels (1: D_feat stops one level early and its S/2 map is
      bilinearly up-sampled by the part sampling, the 'Tex. up-sampling' ablation);
      parts / part_density: the Gaussian layers and their UV grid sizes ('face' = the whole
      head surface, 'hair' = the scalp and beard area, 'all' = whole surface as one layer);
      sampling (False: the 'No sampling' ablation, one layer of Gaussians at the decoded map's
      own texels with 1x1 heads instead of the regressors); regressor_width, regressor_blocks;
      nn_mode: 'exact' (brute force) or 'grid' (8 grid neighbours) nearest-neighbour distances;
      pos_scale, expr_scale (metres per network unit); offset_scale (metres per unit of the
      position offset output); dead Gaussians: none.
    """
    return ml_collections.ConfigDict(dict(
        map_size=512, channels=(64, 128, 256, 256), latent_dim=16, num_codes=1024, beta=0.25,
        use_vq=True, vq_ema=False, ema_decay=0.99, restart_threshold=0.0, transformer_layers=0,
        transformer_heads=4, feat_dim=128, feat_drop_levels=0, parts=("face", "hair"),
        part_density=(512, 384), sampling=True, regressor_width=64, regressor_blocks=4,
        nn_mode="grid", pos_scale=0.1, expr_scale=0.01, offset_scale=0.01))


MAP_NAMES = ("tex", "verts", "expr")   # the decoded maps: albedo, neutral position, expression offset


def default_loss_config() -> ml_collections.ConfigDict:
    """Loss weights, as the thesis's "L1 + SSIM + LPIPS on maps and renders + L1 geometry":

    on renders l1 L1 + ssim (1 - SSIM) (+ lpips LPIPS when weights are given); on the maps
    map_l1 L1 on the albedo map, geom L1 on the position and expression maps (network units),
    and map_ssim (1 - SSIM) (+ lpips LPIPS when weights are given) on each map named in
    `map_ssim_on` (of MAP_NAMES; each map's network units mapped to x / 2 + 1/2 inside the UV
    mask, the albedo's [-1, 1] to [0, 1], position and expression maps about [-1, 1] at
    model.pos_scale and model.expr_scale). `map_ssim_on=("tex",)` is the loss of dhjax before
    2026-12-05 (SSIM on the albedo map only, no LPIPS on maps);
    L2 regularisers on position offsets, log-scale offsets, opacity offsets and SH bands >= 1;
    VQ losses (codebook + beta commitment) weighted by `vq`; `alpha` weights an optional L1
    between the rendered alpha and the mask (0 in the thesis)."""
    return ml_collections.ConfigDict(dict(
        l1=1.0, ssim=0.2, lpips=0.0, map_l1=1.0, map_ssim=0.2, map_ssim_on=MAP_NAMES, geom=1.0,
        reg_position=0.01, reg_scale=0.001, reg_opacity=0.001, reg_sh=0.001, vq=1.0, alpha=0.0,
        lpips_path=""))


def check_loss_config(loss_cfg) -> None:
    """Raise ValueError naming the field when `loss_cfg.map_ssim_on` names an unknown map."""
    on = tuple(loss_cfg.get("map_ssim_on", ("tex",)))
    bad = [n for n in on if n not in MAP_NAMES]
    if bad or len(set(on)) != len(on):
        raise ValueError(f"config field loss.map_ssim_on must name distinct maps of {MAP_NAMES}, got {on}")


@dataclasses.dataclass(frozen=True)
class NetConfig:
    """Hashable network settings (static fields of the flax module)."""

    channels: tuple
    latent_dim: int
    num_codes: int
    beta: float
    use_vq: bool
    vq_ema: bool
    ema_decay: float
    restart_threshold: float
    transformer_layers: int
    transformer_heads: int
    feat_dim: int
    feat_drop_levels: int
    parts: tuple
    regressor_width: int
    regressor_blocks: int

    @classmethod
    def from_config(cls, mc) -> "NetConfig":
        """The network settings of a model config (`parts` only when sampling per part)."""
        parts = tuple(mc.parts) if mc.sampling else ("all",)
        return cls(channels=tuple(int(c) for c in mc.channels), latent_dim=int(mc.latent_dim),
                   num_codes=int(mc.num_codes), beta=float(mc.beta), use_vq=bool(mc.use_vq),
                   vq_ema=bool(mc.vq_ema), ema_decay=float(mc.ema_decay),
                   restart_threshold=float(mc.restart_threshold),
                   transformer_layers=int(mc.transformer_layers), transformer_heads=int(mc.transformer_heads),
                   feat_dim=int(mc.feat_dim), feat_drop_levels=int(mc.feat_drop_levels), parts=parts,
                   regressor_width=int(mc.regressor_width),
                   regressor_blocks=int(mc.regressor_blocks) if mc.sampling else 0)


# ----------------------------------------------------------------------------------------------
# Static assets: UV grids of the parts, skinning-weight map, joint regression.


@flax.struct.dataclass
class PartGrid:
    """One Gaussian layer: a regular h x w grid of UV points, of which `index` are used.

    uv [h*w, 2] grid UV coordinates (row-major, row 0 at v = 1); index [N] int32 the grid points
    inside the part whose bilinear footprint lies inside the UV layout; name, h, w static.
    """

    uv: jax.Array
    index: jax.Array
    name: str = flax.struct.field(pytree_node=False)
    h: int = flax.struct.field(pytree_node=False)
    w: int = flax.struct.field(pytree_node=False)

    @property
    def count(self) -> int:
        """Number of Gaussians of the part."""
        return int(self.index.shape[0])


@flax.struct.dataclass
class Assets:
    """Head-model-derived constants of the SynShot model (built once by `build_assets`).

    centre [3] head centre (normalisation origin, metres); map_mask [S, S] float32 UV layout mask;
    lbs_map [S, S, J] skinning weights in UV; joint_basis [1 + Sh + E, J, 3] joints of the
    template | shape | expression blendshapes (joints are linear in the coefficients); parts:
    tuple of PartGrid; parents, map_size, n_shape, n_expression static.
    """

    centre: jax.Array
    map_mask: jax.Array
    lbs_map: jax.Array
    joint_basis: jax.Array
    parts: tuple
    parents: tuple = flax.struct.field(pytree_node=False)
    map_size: int = flax.struct.field(pytree_node=False)
    n_shape: int = flax.struct.field(pytree_node=False)
    n_expression: int = flax.struct.field(pytree_node=False)

    @property
    def n_gaussians(self) -> int:
        """Number of Gaussians over all parts."""
        return sum(p.count for p in self.parts)


def grid_uv(h: int, w: int) -> np.ndarray:
    """UV coordinates [h*w, 2] of the centres of an h x w grid (texel convention of
    `dhjax.render.shading`: u right, v up, row 0 at the top)."""
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    return np.stack([(jj + 0.5) / w, 1.0 - (ii + 0.5) / h], -1).reshape(-1, 2).astype(np.float32)


def _footprint_inside(mask: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """True where all (up to 4) texels of the bilinear footprint of uv lie inside mask [S, S]."""
    S = mask.shape[0]
    x = np.clip(uv[:, 0] * S - 0.5, 0, S - 1)
    y = np.clip((1 - uv[:, 1]) * S - 0.5, 0, S - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, S - 1), np.minimum(y0 + 1, S - 1)
    return mask[y0, x0] & mask[y0, x1] & mask[y1, x0] & mask[y1, x1]


def part_masks(model, fields) -> dict:
    """UV masks [S, S] bool of the parts: 'face'/'all' the whole layout, 'hair' the scalp and beard
    area of the head model (`dhjax.models.hair_region.hair_area`, baked into UV, weight > 0.05)."""
    area = hair_region.hair_area(model)
    hair = np.asarray(textures.bake(fields, model.faces, area[:, None]))[..., 0]
    layout = np.asarray(fields.mask)
    return {"face": layout, "all": layout, "hair": layout & (hair > 0.05)}


def build_assets(model_cfg, model=None) -> Assets:
    """Precomputes the UV grids, skinning-weight map and joint basis (host side, once).

    Args:
      model_cfg: `default_model_config()`-like ConfigDict.
      model: FlameModel with a UV layout (None = the embedded default head).
    """
    from dhjax.models import flame

    model = flame.load() if model is None else model
    S = int(model_cfg.map_size)
    fields = textures.uv_fields(model, S)
    layout = np.asarray(fields.mask)
    masks = part_masks(model, fields)
    lbs_map = np.asarray(textures.bake(fields, model.faces, model.lbs_weights))
    joint_basis = np.einsum("jv,kvc->kjc", np.asarray(model.j_regressor, np.float64),
                            np.asarray(model.blend_basis, np.float64)).astype(np.float32)
    if model_cfg.sampling:
        names, dens = tuple(model_cfg.parts), tuple(int(d) for d in model_cfg.part_density)
        if len(names) != len(dens):
            raise ValueError(f"model.parts {names} and model.part_density {dens} differ in length")
    else:
        names, dens = ("all",), (S,)
    parts = []
    for name, d in zip(names, dens):
        if name not in masks:
            raise ValueError(f"unknown part {name!r}; known: {sorted(masks)}")
        uv = grid_uv(d, d)
        inside = _footprint_inside(layout, uv) & _footprint_inside(masks[name], uv)
        idx = np.nonzero(inside)[0].astype(np.int32)
        if idx.size < 2:
            raise ValueError(f"part {name!r} at density {d} has {idx.size} UV points")
        parts.append(PartGrid(uv=jnp.asarray(uv), index=jnp.asarray(idx), name=name, h=d, w=d))
    return Assets(centre=jnp.asarray(hair_region.head_centre(model), jnp.float32),
                  map_mask=jnp.asarray(layout, jnp.float32), lbs_map=jnp.asarray(lbs_map),
                  joint_basis=jnp.asarray(joint_basis), parts=tuple(parts),
                  parents=tuple(int(p) for p in model.parents), map_size=S,
                  n_shape=int(model.num_shape), n_expression=int(model.num_expression))


# ----------------------------------------------------------------------------------------------
# The network.


class SynShotNet(nn.Module):
    """Encoders, quantisers, decoders and per-part regressors (shapes: module docstring).

    Top-level parameter groups (used by the inversion stages): enc_id, enc_expr, vq_id,
    vq_expr, tf_id, tf_expr (with transformer_layers > 0), dec_feat, dec_id, dec_expr, and
    reg_<part>_color, reg_<part>_gauss per part.
    """

    cfg: NetConfig

    def setup(self):
        """Flax hook: the identity and expression encoders, their VQ layers and code transformers
        (when configured), the decoders and the per-part colour and Gaussian regressors."""
        c = self.cfg
        self.enc_id = conv.Encoder(c.channels, c.latent_dim)
        self.enc_expr = conv.Encoder(c.channels, c.latent_dim)
        if c.use_vq:
            mk = functools.partial(vq.VectorQuantizer, num_codes=c.num_codes, dim=c.latent_dim, beta=c.beta,
                                   use_ema=c.vq_ema, ema_decay=c.ema_decay)
            # dead-code restarts happen in `train_step` (identically on every device)
            self.vq_id, self.vq_expr = mk(), mk()
        if c.transformer_layers > 0:
            mk = functools.partial(vq.CodeTransformer, dim=c.latent_dim, num_layers=c.transformer_layers,
                                   num_heads=c.transformer_heads)
            self.tf_id, self.tf_expr = mk(), mk()
        feat_channels = c.channels[c.feat_drop_levels:] if c.feat_drop_levels else c.channels
        self.dec_feat = conv.Decoder(feat_channels, c.feat_dim)
        self.dec_id = conv.Decoder(c.channels, 6, out_init_scale=0.1)
        self.dec_expr = conv.Decoder(c.channels, 3, out_init_scale=0.1)
        regs = {}
        for name in c.parts:
            if c.regressor_blocks > 0:
                regs[f"reg_{name}_color"] = conv.Regressor(3 * SH_COEFFS, c.regressor_width, c.regressor_blocks,
                                                           name=f"reg_{name}_color")
                regs[f"reg_{name}_gauss"] = conv.Regressor(11, c.regressor_width, c.regressor_blocks,
                                                           name=f"reg_{name}_gauss")
            else:   # 'No sampling': the decoded feature map is the Gaussian map, 1x1 heads only
                regs[f"reg_{name}_color"] = nn.Conv(3 * SH_COEFFS, (1, 1), kernel_init=nn.initializers.zeros,
                                                    name=f"reg_{name}_color")
                regs[f"reg_{name}_gauss"] = nn.Conv(11, (1, 1), kernel_init=nn.initializers.zeros,
                                                    name=f"reg_{name}_gauss")
        self.regs = regs

    def encode(self, x_tex, x_verts, x_expr):
        """[B,S,S,3] x 3 -> z_id, z_expr [B,h,w,n]."""
        return self.enc_id(jnp.concatenate([x_tex, x_verts], -1)), self.enc_expr(x_expr)

    def quantize(self, z_id, z_expr, train: bool = False):
        """-> q_id, q_expr [B,h,w,n], aux {vq_loss, perplexity_id, perplexity_expr}."""
        if not self.cfg.use_vq:
            zero = jnp.zeros((), jnp.float32)
            return z_id, z_expr, dict(vq_loss=zero, perplexity_id=zero, perplexity_expr=zero)
        q_id, a_id = self.vq_id(z_id, train=train)
        q_expr, a_expr = self.vq_expr(z_expr, train=train)
        q_id, q_expr = self.refine_codes(q_id, q_expr)
        return q_id, q_expr, dict(vq_loss=a_id["loss"] + a_expr["loss"], perplexity_id=a_id["perplexity"],
                                  perplexity_expr=a_expr["perplexity"], usage_id=a_id["usage"],
                                  usage_expr=a_expr["usage"])

    def refine_codes(self, q_id, q_expr):
        """The bidirectional code transformers over quantised codes [B,h,w,n] (model.
        transformer_layers > 0), else the codes unchanged."""
        if self.cfg.transformer_layers > 0:
            return self.tf_id(q_id), self.tf_expr(q_expr)
        return q_id, q_expr

    def decode(self, q_id, q_expr):
        """-> feat [B,S',S',F], tex [B,S,S,3], verts [B,S,S,3], expr [B,S,S,3] (network units)."""
        feat = self.dec_feat(jnp.concatenate([q_id, q_expr], -1))
        ident = self.dec_id(q_id)
        return feat, ident[..., :3], ident[..., 3:], self.dec_expr(q_expr)

    def regress(self, name: str, s):
        """Sampled features [B,h,w,F] -> SH [B,h,w,48], offsets [B,h,w,11]."""
        return self.regs[f"reg_{name}_color"](s), self.regs[f"reg_{name}_gauss"](s)

    def __call__(self, x_tex, x_verts, x_expr, train: bool = False):
        """Everything once (used by `init`): returns the decoded maps and the regressor outputs
        on the decoded feature map itself."""
        z_id, z_expr = self.encode(x_tex, x_verts, x_expr)
        q_id, q_expr, aux = self.quantize(z_id, z_expr, train)
        feat, tex, verts, expr = self.decode(q_id, q_expr)
        outs = [self.regress(name, feat) for name in self.cfg.parts]
        return feat, tex, verts, expr, outs, aux


def make_net(model_cfg) -> SynShotNet:
    """The network of a `default_model_config()`-like config."""
    return SynShotNet(NetConfig.from_config(model_cfg))


# ----------------------------------------------------------------------------------------------
# The context of a run.


@dataclasses.dataclass(frozen=True, eq=False)
class Context:
    """Everything the model's functions need besides the state and the batch (built once per run
    by `make_context`; static under jit: close over it with functools.partial or pass it as a
    static argument, it hashes by identity).

    net: SynShotNet; assets: Assets; model_cfg: the `default_model_config()`-like ConfigDict both
    were built from; width, height: image size in pixels; loss_cfg (`default_loss_config()`-like)
    and optim_cfg (lr, gamma, milestones, clip): for training and `init_state` (None when only
    predicting); backend: the splatting backend (`dhjax.ops.splat`); deterministic: the CUDA
    splat backward in a fixed summation order (`dhjax.render.splat.rasterize`; the CPU kernel
    always is, so it changes nothing there); lpips_fn: optional
    (a, b) -> [B] perceptual distance (used with loss.lpips > 0); extra_loss: optional
    (render [B,H,W,3], batch) -> (scalar, metrics) added to the loss (the inversion's ArcFace
    terms).
    """

    net: SynShotNet
    assets: Assets
    model_cfg: ml_collections.ConfigDict
    width: int
    height: int
    loss_cfg: ml_collections.ConfigDict | None = None
    optim_cfg: ml_collections.ConfigDict | None = None
    backend: str = "auto"
    deterministic: bool = False
    lpips_fn: Callable | None = None
    extra_loss: Callable | None = None

    def replace(self, **changes) -> "Context":
        """A copy with some fields changed (e.g. the inversion's optimiser and ArcFace terms)."""
        return dataclasses.replace(self, **changes)


def make_context(model_cfg, assets: Assets, width: int, height: int, **fields) -> Context:
    """Context of a model config (its network is built here), its `build_assets` result and the
    image size; `fields`: the optional Context fields (loss_cfg, optim_cfg, backend, deterministic,
    lpips_fn, extra_loss)."""
    if fields.get("loss_cfg") is not None:
        check_loss_config(fields["loss_cfg"])
    return Context(net=make_net(model_cfg), assets=assets, model_cfg=model_cfg, width=int(width),
                   height=int(height), **fields)


# ----------------------------------------------------------------------------------------------
# Maps <-> network units.


def _resize_maps(x, size: int):
    """[B,T,T,C] -> [B,size,size,C] by area averaging (T a multiple of size) or identity."""
    T = x.shape[-2]
    if T == size:
        return x
    if T % size:
        raise ValueError(f"UV maps of size {T} cannot be reduced to model.map_size {size} "
                         f"(need a multiple); regenerate the data or change model.map_size")
    f = T // size
    return x.reshape(x.shape[:-3] + (size, f, size, f, x.shape[-1])).mean((-4, -2))


def normalise_maps(assets: Assets, model_cfg, uv_albedo, uv_position, uv_expression_offset):
    """Data maps [B,T,T,3] (albedo in [0,1], metres) -> network inputs [B,S,S,3] x 3."""
    S = assets.map_size
    m = assets.map_mask[..., None]
    tex = _resize_maps(jnp.asarray(uv_albedo, jnp.float32), S) * 2.0 - 1.0
    verts = (_resize_maps(jnp.asarray(uv_position, jnp.float32), S) - assets.centre) / model_cfg.pos_scale
    expr = _resize_maps(jnp.asarray(uv_expression_offset, jnp.float32), S) / model_cfg.expr_scale
    return tex * m, verts * m, expr * m


def batch_maps(batch, ctx: Context):
    """`normalise_maps` of a batch's uv_albedo, uv_position and uv_expression_offset."""
    return normalise_maps(ctx.assets, ctx.model_cfg, batch["uv_albedo"], batch["uv_position"],
                          batch["uv_expression_offset"])


def net_variables(params, stats) -> dict:
    """Flax variables of the network: params, plus vq_stats when there are any (EMA codebooks,
    usage EMAs)."""
    return {"params": params, **({"vq_stats": stats} if stats else {})}


def decode_parts(mdl, qi, qe, assets: Assets, model_cfg) -> dict:
    """Inside a flax apply of the SynShotNet `mdl`: quantised codes q_id, q_expr [B,h,w,n] ->
    dict tex, verts, expr [B,S,S,3] decoded maps (network units), phi [B,S,S,3] metres and
    parts: per part (initial Gaussians, SH colours, raw offsets, LBS weights), the input of
    `synshot_gaussians.apply_offsets`."""
    feat, tex, verts, expr = mdl.decode(qi, qe)
    phi = assets.centre + verts * model_cfg.pos_scale + expr * model_cfg.expr_scale
    parts = []
    for part in assets.parts:
        uv = part.uv[part.index]
        init = jax.vmap(lambda m: gs.initial_gaussians(m, part, model_cfg.nn_mode))(phi)
        s = gs.sample_grid(feat, part.uv).reshape(feat.shape[0], part.h, part.w, feat.shape[-1])
        col, off = mdl.regress(part.name, s)
        col = col.reshape(col.shape[0], -1, col.shape[-1])[:, part.index]
        off = off.reshape(off.shape[0], -1, off.shape[-1])[:, part.index]
        w = gs.sample_grid(assets.lbs_map[None], uv)[0]
        w = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-8)
        parts.append((init, col, off, jnp.broadcast_to(w, (phi.shape[0],) + w.shape)))
    return dict(tex=tex, verts=verts, expr=expr, phi=phi, parts=parts)


def forward(variables, maps_in, ctx: Context, *, train: bool = False, q_id=None):
    """Network forward: normalised input maps -> decoded maps and Gaussians (model space).

    Args:
      variables: the network's variables (`net_variables`).
      maps_in: (x_tex, x_verts, x_expr) [B,S,S,3] each (network units, `normalise_maps`).
      q_id: optional fixed quantised identity code [B,h,w,n] (inversion stage 2).
    Returns:
      (out dict: tex, verts, expr [B,S,S,3] decoded maps (network units), phi [B,S,S,3] metres,
       q_id, gaussians: `synshot_gaussians.Gaussians` [B,N,...], vq_loss, perplexity_id, perplexity_expr),
      new mutable collections (vq_stats) or {}.
    """
    mutable = ["vq_stats"] if (train and "vq_stats" in variables) else False
    assets, model_cfg = ctx.assets, ctx.model_cfg

    def body(mdl, x_tex, x_verts, x_expr):
        z_id, z_expr = mdl.encode(x_tex, x_verts, x_expr)
        qi, qe, aux = mdl.quantize(z_id, z_expr, train)
        if q_id is not None:
            qi = q_id
        return dict(decode_parts(mdl, qi, qe, assets, model_cfg), q_id=qi, **aux)

    res = nn.apply(body, ctx.net, mutable=mutable)(variables, *maps_in)
    out, new_cols = res if mutable else (res, {})
    out["gaussians"] = gs.apply_offsets(out.pop("parts"), model_cfg.offset_scale)
    return out, new_cols


# ----------------------------------------------------------------------------------------------
# Losses and the training step.


def loss_fn(params, stats, batch, ctx: Context, *, train: bool = True, q_id=None):
    """Total SynShot loss of a batch (weights: ctx.loss_cfg, see `default_loss_config`).

    Args:
      params / stats: network parameters and vq_stats ({} when unused); batch: BATCH_KEYS
        arrays with leading axis B (image [B,H,W,3], mask [B,H,W], maps [B,T,T,3], ...);
      q_id: optional fixed quantised identity code [B,h,w,n] (inversion stage 2).
    Returns: (loss, (metrics dict, new stats, out)); the metrics hold the batch's mean squared
    render error `mse` (the step turns it into a PSNR).
    """
    maps_in = batch_maps(batch, ctx)
    out, new_cols = forward(net_variables(params, stats), maps_in, ctx, train=train, q_id=q_id)
    assets, model_cfg = ctx.assets, ctx.model_cfg
    m = assets.map_mask[None, ..., None]
    x_tex, x_verts, x_expr = maps_in
    lc = ctx.loss_cfg
    map_color = lc.map_l1 * losses.l1(out["tex"], x_tex, m)
    targets = dict(zip(MAP_NAMES, maps_in))
    use_lpips = ctx.lpips_fn is not None and lc.lpips > 0
    metrics = {}
    for name in tuple(lc.get("map_ssim_on", ("tex",))):
        a, b = out[name] * m * 0.5 + 0.5, targets[name] * m * 0.5 + 0.5
        if lc.map_ssim:
            map_color += lc.map_ssim * losses.one_minus_ssim(a, b)
        if use_lpips:
            lp_map = jnp.mean(ctx.lpips_fn(a, b))
            map_color += lc.lpips * lp_map
            metrics[f"lpips_{name}_map"] = lp_map
    geom = lc.geom * (losses.l1(out["verts"], x_verts, m) + losses.l1(out["expr"], x_expr, m))
    params_b = {k: batch[k] for k in PARAM_KEYS}
    image, alpha = gs.render_gaussians(out["gaussians"], params_b, assets, batch["K"], batch["R"], batch["t"],
                                    ctx.width, ctx.height, backend=ctx.backend,
                                    deterministic=ctx.deterministic)
    mask = batch["mask"][..., None]
    target = batch["image"] * mask
    l1 = jnp.mean(jnp.abs(image - target))
    ssim = jnp.mean(losses.ssim(image, target))
    color = lc.l1 * l1 + lc.ssim * (1.0 - ssim)
    if use_lpips:
        lp = jnp.mean(ctx.lpips_fn(image, target))
        color += lc.lpips * lp
        metrics["lpips"] = lp
    if lc.alpha:
        color += lc.alpha * jnp.mean(jnp.abs(alpha - mask))
    g = out["gaussians"]
    reg = (lc.reg_position * jnp.mean(jnp.sum((g.offsets["position"] / model_cfg.offset_scale) ** 2, -1))
           + lc.reg_scale * jnp.mean(g.offsets["scale"] ** 2)
           + lc.reg_opacity * jnp.mean(g.offsets["opacity"] ** 2)
           + lc.reg_sh * jnp.mean(g.sh[:, :, 1:] ** 2))
    total = color + map_color + geom + reg + lc.vq * out["vq_loss"]
    if ctx.extra_loss is not None:
        e, em = ctx.extra_loss(image, batch)
        total = total + e
        metrics.update(em)
    mse = jnp.mean((image - target) ** 2)
    metrics.update(mse=mse, loss=total, render_l1=l1, render_ssim=ssim,
                   map_loss=map_color, geom_loss=geom, reg_loss=reg, vq_loss=out["vq_loss"],
                   perplexity_id=out["perplexity_id"], perplexity_expr=out["perplexity_expr"])
    new_stats = new_cols.get("vq_stats", stats) if new_cols else stats
    return total, (metrics, new_stats, out)


def make_optimizer(optim_cfg, labels=None):
    """Adam with a multi-step schedule (lr x gamma at every milestone) and optional global-norm
    clipping; with `labels` (a pytree of 'train' | 'freeze' like the params) frozen leaves get
    exactly zero updates."""
    sched = optax.piecewise_constant_schedule(
        float(optim_cfg.lr), {int(m): float(optim_cfg.gamma) for m in optim_cfg.milestones})
    parts = [optax.clip_by_global_norm(float(optim_cfg.clip))] if optim_cfg.clip else []
    tx = optax.chain(*parts, optax.adam(sched))
    if labels is None:
        return tx
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def init_state(rng, batch, ctx: Context, *, labels_fn=None):
    """Fresh training state {params, stats, opt_state} from one batch's map shapes (optimiser:
    ctx.optim_cfg; labels_fn: params -> 'train' | 'freeze' labels, see `make_optimizer`)."""
    maps_in = batch_maps({k: batch[k][:1] for k in MAP_KEYS}, ctx)
    params_and_stats = ctx.net.init(rng, *maps_in, train=False)
    params = params_and_stats["params"]
    stats = params_and_stats.get("vq_stats", {})
    labels = labels_fn(params) if labels_fn else None
    return dict(params=params, stats=stats, opt_state=make_optimizer(ctx.optim_cfg, labels).init(params))


def _restart_codes(params, stats, z_all, rng, net_cfg: NetConfig):
    """Re-seeds codes whose usage EMA (vq_stats) is below `restart_threshold` with latents of
    the global batch; runs outside the per-device region, so every device gets the same codes."""
    params, stats = dict(params), dict(stats)
    total = jnp.zeros((), jnp.int32)
    for i, name in enumerate(("vq_id", "vq_expr")):
        st = dict(stats[name])
        book = st["codebook"] if net_cfg.vq_ema else params[name]["codebook"]
        dead = vq.dead_code_mask(st["usage_ema"], net_cfg.restart_threshold)
        new_book, n = vq.restart_dead_codes(book, st["usage_ema"], z_all[i], jax.random.fold_in(rng, i),
                                            threshold=net_cfg.restart_threshold)
        st["usage_ema"] = jnp.where(dead, jnp.mean(st["usage_ema"]), st["usage_ema"])
        if net_cfg.vq_ema:
            size = jnp.mean(st["cluster_size"])
            st.update(codebook=new_book, cluster_size=jnp.where(dead, size, st["cluster_size"]),
                      embed_sum=jnp.where(dead[:, None], size * new_book, st["embed_sum"]))
        else:
            params[name] = dict(params[name], codebook=new_book)
        stats[name] = st
        total = total + n
    return params, stats, total


def train_step(state, batch, rng, ctx: Context, *, labels=None, q_id=None):
    """One data-parallel optimisation step.

    The loss and gradients are computed per device on its shard of the batch inside
    `jax.shard_map` (the splatting custom call sees only local data), then averaged over the
    'data' axis, so N devices give the same step as one device on the whole batch.

    Args:
      labels: optional 'train' | 'freeze' pytree like the params (frozen leaves get zero
        updates, no dead codes are restarted, and the VQ statistics (vq_stats: usage EMAs and,
        with model.vq_ema, the EMA codebooks) stay as they are, so the codebooks are frozen in
        either VQ mode, as the inversion's stages need); q_id: optional fixed identity code [B,h,w,n].
    Returns (new state, metrics).
    """
    mesh = loop.data_mesh()
    net_cfg = ctx.net.cfg
    keys = [k for k in BATCH_KEYS if k in batch]
    local_batch = {k: batch[k] for k in keys}
    tx = make_optimizer(ctx.optim_cfg, labels)

    def local(params, stats, lb, qid):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (metrics, new_stats, out)), grads = grad_fn(params, stats, lb, ctx, train=True, q_id=qid)
        grads = jax.lax.pmean(grads, "data")
        metrics = dict(metrics, perplexity_id=0.0, perplexity_expr=0.0)
        metrics = jax.lax.pmean(metrics, "data")
        d = net_cfg.ema_decay
        new_stats = jax.tree_util.tree_map(lambda n, o: d * o + jax.lax.psum(n - d * o, "data"), new_stats, stats)
        mse = jax.lax.pmean(metrics.pop("mse"), "data")
        # of the global batch's MSE; clamped so a perfect batch logs 100 dB, not an inf the loop
        # would count as a non-finite step
        metrics["psnr"] = losses.psnr_from_mse(jnp.maximum(mse, 1e-10))
        if net_cfg.use_vq:
            for k in ("id", "expr"):
                metrics[f"perplexity_{k}"] = vq.perplexity(jax.lax.psum(out[f"usage_{k}"], "data"))
        if net_cfg.use_vq and net_cfg.vq_ema:     # codebook = smoothed mean of the averaged sums
            new_stats = {k: dict(v, codebook=vq.codebook_from_ema(v["cluster_size"], v["embed_sum"]))
                         for k, v in new_stats.items()}
        return grads, metrics, new_stats

    qspec = None if q_id is None else P("data")
    grads, metrics, new_stats = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(), P("data"), qspec), out_specs=(P(), P(), P()),
        check_vma=False)(state["params"], state["stats"], local_batch, q_id)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    stats = new_stats if labels is None else state["stats"]
    if net_cfg.use_vq and net_cfg.restart_threshold > 0 and labels is None:
        z_all = _batch_latents(params, local_batch, ctx)
        params, stats, n = _restart_codes(params, stats, z_all, rng, net_cfg)
        metrics = dict(metrics, restarted_codes=n)
    return dict(params=params, stats=stats, opt_state=opt_state), metrics


def _batch_latents(params, batch, ctx: Context):
    """Flattened encoder outputs [M, n] of both branches for dead-code restarts."""
    z_id, z_expr = ctx.net.apply({"params": params}, *batch_maps(batch, ctx), method=SynShotNet.encode)
    z_id, z_expr = jax.lax.stop_gradient((z_id, z_expr))
    return z_id.reshape(-1, z_id.shape[-1]), z_expr.reshape(-1, z_expr.shape[-1])


# ----------------------------------------------------------------------------------------------
# Evaluation, pictures, export.


def image_metrics(pred, target):
    """L1, PSNR (dB), SSIM of images [B,H,W,3] in [0, 1] (means over the batch of per-image
    values)."""
    return dict(l1=jnp.mean(jnp.abs(pred - target)), psnr=jnp.mean(losses.psnr(pred, target)),
                ssim=jnp.mean(losses.ssim(pred, target)))


def predict(state, batch, ctx: Context, *, q_id=None):
    """Renders of a batch (encoder-decoder on its maps, each example into its own camera):
    image [B,H,W,3], alpha [B,H,W,1], out (maps, Gaussians); q_id: optional fixed identity code
    [B,h,w,n]."""
    out, _ = forward(net_variables(state["params"], state["stats"]), batch_maps(batch, ctx), ctx, train=False,
                     q_id=q_id)
    image, alpha = gs.render_gaussians(out["gaussians"], {k: batch[k] for k in PARAM_KEYS}, ctx.assets,
                                    batch["K"], batch["R"], batch["t"], ctx.width, ctx.height, backend=ctx.backend,
                                    deterministic=ctx.deterministic)
    return image, alpha, out

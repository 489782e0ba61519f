"""ArcFace identity network: the "improved" ResNet (iresnet) of insightface's arcface_torch.

MICA's identity encoder and SynShot's inversion read a 512-d ArcFace embedding of an aligned
112x112 face crop (see `dhjax.capture.align.arcface_crop`). This module is that network in flax
linen, laid out so that insightface's released weights (ONNX, through
`dhjax.io.onnx_weights.load_iresnet_onnx`) map onto it one to one:

    stem    conv3x3(3 -> w) -> BN -> PReLU                         -> [B, 112, 112, w]
    stages  s = 0..3 with `layers[s]` IBasicBlocks of width w 2^s   -> 56, 28, 14, 7 pixels
            block(x) = [BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN](x) + shortcut(x)
            the first block of a stage has stride 2 and shortcut conv1x1(stride 2) -> BN,
            the others stride 1 and the identity
    head    BN2d -> flatten (channel-major, see below) -> dropout -> FC(8w 7 7 -> E) -> BN1d

All convolutions are bias-free, padding 1 (3x3) or 0 (1x1), PReLU has one slope per channel,
every BatchNorm uses epsilon 1e-5. insightface's sizes: r18 (2,2,2,2), r34 (3,4,6,3),
r50 (3,4,14,3), r100 (3,13,30,3), all with w = 64 and E = 512.

Layout: activations are NHWC inside. The FC layer of the released weights was trained on
PyTorch's NCHW flatten, i.e. input index ``c * 49 + h * 7 + w``; the head therefore transposes
the final [B, 7, 7, C] map to [B, C, 7, 7] before flattening, so that ``fc.kernel`` is simply
the transpose of PyTorch's ``fc.weight`` ([in, out] = [C 7 7, E]).

Variable names mirror the PyTorch module names (with ``layer{s}.{b}`` written ``layer{s}_{b}``,
s = 1..4, b = 0..): top level ``conv1``, ``bn1``, ``prelu``; blocks ``layer1_0`` ... with
``bn1``, ``conv1``, ``bn2``, ``prelu``, ``conv2``, ``bn3`` and, on the first block of a stage,
``downsample_conv``, ``downsample_bn``; head ``bn2``, ``fc``, ``features``. Convolutions hold
``kernel`` [kh, kw, in, out] (HWIO), PReLUs ``slope`` [C], BatchNorms ``scale``/``bias`` in
`params` and ``mean``/``var`` in `batch_stats`, the FC ``kernel`` [in, out] and ``bias`` [out].

Input: [B, 112, 112, 3] RGB normalised as (x - 127.5) / 127.5 for x in 0..255 (`preprocess`).
Output: [B, E] float32 features (not normalised; `embed` returns unit vectors).

    model = IResNet(layers=(3, 13, 30, 3))
    variables = model.init(rng, jnp.zeros((1, 112, 112, 3)))
    feats = model.apply(variables, preprocess(crops01))                 # eval mode
    feats, upd = model.apply(variables, x, train=True, mutable=["batch_stats"],
                             rngs={"dropout": key})                     # training mode
    emb = embed(variables, crops01)                                     # [B, 512] unit norm
    labels = jax.tree.map(lambda t: "train" if t else "freeze",
                          trainable_mask(variables["params"], last_blocks=3))
    opt = optax.multi_transform({"train": optax.adam(1e-5), "freeze": optax.set_to_zero()},
                                labels)                                  # MICA-style fine-tuning
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "ARCH_LAYERS",
    "INPUT_SIZE",
    "IResNet",
    "IBasicBlock",
    "PReLU",
    "preprocess",
    "embed",
    "config_from_variables",
    "model_from_config",
    "trainable_mask",
]

INPUT_SIZE = 112
"""Side of the aligned face crop the FC layer is sized for (112 / 2^4 = 7)."""

ARCH_LAYERS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
}
"""Blocks per stage of insightface's released iresnets."""

_BLOCK_RE = re.compile(r"^layer(\d+)_(\d+)$")
_STEM = ("conv1", "bn1", "prelu")
_HEAD = ("bn2", "fc", "features")


class PReLU(nn.Module):
    """Per-channel PReLU: ``max(x, 0) + slope * min(x, 0)``, slope [C] over the last axis
    (initialised to 0.25 as in PyTorch). [..., C] -> [..., C]."""

    init_slope: float = 0.25

    @nn.compact
    def __call__(self, x):
        slope = self.param("slope", nn.initializers.constant(self.init_slope), (x.shape[-1],),
                           jnp.float32)
        return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


def _conv(features: int, k: int, stride: int, name: str) -> nn.Conv:
    # explicit symmetric padding as in PyTorch (flax "SAME" pads (0, 1) for stride 2 on even sizes)
    p = (k - 1) // 2
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=((p, p), (p, p)),
                   use_bias=False, name=name)


def _bn(train: bool, eps: float, momentum: float, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=eps, name=name)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the shortcut (identity, or
    conv1x1(stride) -> BN with `downsample`).

    [B, H, W, C_in] -> [B, H / stride, W / stride, features].
    """

    features: int
    stride: int = 1
    downsample: bool = False
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: _bn(train, self.bn_eps, self.bn_momentum, name)  # noqa: E731
        y = bn("bn1")(x)
        y = _conv(self.features, 3, 1, "conv1")(y)
        y = bn("bn2")(y)
        y = PReLU(name="prelu")(y)
        y = _conv(self.features, 3, self.stride, "conv2")(y)
        y = bn("bn3")(y)
        if self.downsample:
            x = _conv(self.features, 1, self.stride, "downsample_conv")(x)
            x = bn("downsample_bn")(x)
        elif x.shape[-1] != self.features or self.stride != 1:
            raise ValueError(
                f"identity shortcut needs stride 1 and equal widths, got stride {self.stride}, "
                f"{x.shape[-1]} -> {self.features} channels"
            )
        return y + x


class IResNet(nn.Module):
    """insightface's iresnet (arcface_torch), NHWC. See the module docstring for the layout.

    Attributes:
      layers: blocks per stage, 4 ints (`ARCH_LAYERS`: r100 = (3, 13, 30, 3)).
      width: channels of the stem and the first stage; stage s has width * 2^s.
      embedding: output feature size E.
      dropout: dropout rate before the FC layer (active only with train=True; needs a
        "dropout" rng then). insightface's released models use 0.
      bn_eps: BatchNorm epsilon (1e-5 in insightface).
      bn_momentum: flax BatchNorm momentum, i.e. 1 - PyTorch's momentum (0.1).

    __call__(x, train=False):
      x: [B, 112, 112, 3] float, preprocessed crops (`preprocess`).
      train: BatchNorm on batch statistics (pass mutable=["batch_stats"]) and dropout on.
      returns: [B, embedding] float features, not normalised.
    """

    layers: Sequence[int] = ARCH_LAYERS["r100"]
    width: int = 64
    embedding: int = 512
    dropout: float = 0.0
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool = False):
        if len(tuple(self.layers)) != 4 or any(int(n) < 1 for n in self.layers):
            raise ValueError(f"layers: expected 4 positive block counts, got {tuple(self.layers)}")
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"x: expected shape [B, {INPUT_SIZE}, {INPUT_SIZE}, 3], got {x.shape}")
        if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(
                f"x: expected {INPUT_SIZE}x{INPUT_SIZE} crops (the FC layer is sized for a 7x7 "
                f"final map), got {x.shape[1]}x{x.shape[2]}; see dhjax.capture.align.arcface_crop"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.float32)
        bn = lambda name: _bn(train, self.bn_eps, self.bn_momentum, name)  # noqa: E731

        x = _conv(self.width, 3, 1, "conv1")(x)
        x = bn("bn1")(x)
        x = PReLU(name="prelu")(x)
        for s, n_blocks in enumerate(self.layers):
            for b in range(int(n_blocks)):
                x = IBasicBlock(
                    self.width * 2 ** s, stride=2 if b == 0 else 1, downsample=b == 0,
                    bn_eps=self.bn_eps, bn_momentum=self.bn_momentum, name=f"layer{s + 1}_{b}",
                )(x, train)
        x = bn("bn2")(x)
        # channel-major flatten, as PyTorch's torch.flatten on NCHW (the FC weights expect it)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(x)
        x = nn.Dense(self.embedding, name="fc")(x)
        return bn("features")(x)


def preprocess(images):
    """RGB images -> ArcFace network input ``(v - 127.5) / 127.5`` with v in 0..255.

    Args:
      images: [..., H, W, 3] RGB; floats in [0, 1], or uint8 in 0..255.

    Returns:
      [..., H, W, 3] float32 in [-1, 1].
    """
    images = jnp.asarray(images)
    if images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"images: expected shape [..., H, W, 3] (RGB), got {images.shape}")
    if images.dtype == jnp.uint8:
        v = images.astype(jnp.float32)
    elif jnp.issubdtype(images.dtype, jnp.floating):
        v = images.astype(jnp.float32) * 255.0
    else:
        raise ValueError(f"images: expected floats in [0, 1] or uint8, got dtype {images.dtype}")
    return (v - 127.5) / 127.5


def config_from_variables(variables: Mapping[str, Any]) -> dict:
    """Reads the architecture back from a variable tree of `IResNet`.

    Args:
      variables: {"params": ..., "batch_stats": ...} as made by `IResNet.init` or
        `dhjax.io.onnx_weights.load_iresnet_onnx` (arrays or jax.ShapeDtypeStructs).

    Returns:
      {"layers": (n1, n2, n3, n4), "width": int, "embedding": int}.
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables: expected a mapping with 'params' (and 'batch_stats')")
    params = variables["params"]
    counts = {}
    for key in params:
        m = _BLOCK_RE.match(key)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            counts[s] = max(counts.get(s, 0), b + 1)
    missing = [k for k in _STEM + _HEAD if k not in params]
    if missing or sorted(counts) != [1, 2, 3, 4]:
        raise ValueError(
            f"variables: not an IResNet tree (stages found {sorted(counts)}, missing {missing})"
        )
    return {
        "layers": tuple(counts[s] for s in (1, 2, 3, 4)),
        "width": int(params["conv1"]["kernel"].shape[-1]),
        "embedding": int(params["fc"]["kernel"].shape[-1]),
    }


def model_from_config(config: Mapping[str, Any], **overrides) -> IResNet:
    """`IResNet` from a config dict with "layers", "width", "embedding" (and optionally
    "bn_eps"), as returned by `config_from_variables` or `dhjax.io.onnx_weights.load_iresnet_onnx`;
    `overrides` set further attributes (e.g. dropout)."""
    kw = {k: config[k] for k in ("layers", "width", "embedding", "bn_eps") if k in config}
    kw["layers"] = tuple(int(n) for n in kw["layers"])
    kw.update(overrides)
    return IResNet(**kw)


def embed(variables: Mapping[str, Any], images):
    """Unit-norm ArcFace identity embeddings of aligned crops (eval mode).

    The architecture is read from the variables (`config_from_variables`), so this works
    under jax.jit with `variables` as an argument.

    Args:
      variables: IResNet variables {"params", "batch_stats"}.
      images: [B, 112, 112, 3] RGB crops, floats in [0, 1] or uint8 (see `preprocess`);
        aligned with `dhjax.capture.align.arcface_crop`.

    Returns:
      [B, E] float32, L2-normalised along the last axis.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images: expected shape [B, {INPUT_SIZE}, {INPUT_SIZE}, 3], got {images.shape}")
    model = model_from_config(config_from_variables(variables))
    feats = model.apply(variables, preprocess(images), train=False)
    norm = jnp.sqrt(jnp.sum(feats * feats, axis=-1, keepdims=True))
    return feats / jnp.maximum(norm, 1e-12)


def trainable_mask(params: Mapping[str, Any], last_blocks: int | None = 3, head: bool = True,
                   freeze_feature_scale: bool = True):
    """Boolean pytree (True = trainable) that freezes all but the last `last_blocks` residual
    blocks.

    Use it to label an optax.multi_transform (trainable -> the optimiser, frozen ->
    optax.set_to_zero(), see the module docstring); note that optax.masked alone passes the
    frozen leaves' gradients through unchanged instead of zeroing them.

    MICA fine-tunes only the last 3 blocks of r100 (its whole last stage) plus the head and
    keeps the stem and earlier blocks fixed. Blocks are counted across stages in forward order
    (layer4's last block is the last one).

    Args:
      params: the "params" collection of an IResNet (not the whole variables dict).
      last_blocks: number of trailing blocks left trainable (0: none); None makes every
        parameter trainable (also the stem), apart from the feature scale below.
      head: leave the head (bn2, fc, features) trainable.
      freeze_feature_scale: keep ``features.scale`` fixed, as arcface_torch does (it sets
        requires_grad = False on that BatchNorm's weight, and MICA inherits it).

    Returns:
      a pytree of Python bools with the structure of `params`.
    """
    if not isinstance(params, Mapping):
        raise ValueError("params: expected the 'params' mapping of an IResNet")
    if "params" in params:
        raise ValueError("params: pass variables['params'], not the whole variables dict")
    blocks = []
    for key in params:
        m = _BLOCK_RE.match(key)
        if m:
            blocks.append((int(m.group(1)), int(m.group(2)), key))
        elif key not in _STEM + _HEAD:
            raise ValueError(f"params: unexpected entry '{key}' (not an IResNet parameter tree)")
    if not blocks:
        raise ValueError("params: no residual blocks 'layer{s}_{b}' found (not an IResNet tree)")
    if last_blocks is not None and (int(last_blocks) != last_blocks or last_blocks < 0):
        raise ValueError(f"last_blocks: expected an int >= 0 or None, got {last_blocks!r}")
    order = [k for _, _, k in sorted(blocks)]
    if last_blocks is None:
        trainable = set(params)
    else:
        trainable = set(order[len(order) - int(last_blocks):] if last_blocks else [])
        if head:
            trainable |= set(_HEAD)
    mask = {k: jax.tree_util.tree_map(lambda _, t=k in trainable: t, v) for k, v in params.items()}
    if freeze_feature_scale and "features" in mask and "scale" in mask["features"]:
        mask["features"] = dict(mask["features"])
        mask["features"]["scale"] = False
    return mask

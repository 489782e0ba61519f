"""MICA's networks: the encoder (insightface's ArcFace iresnet, or the landmark encoder of
`dhjax.capture.mica.landmark_net`) and the mapping network to shape coefficients.

    iresnet:   crop [112, 112, 3] -> e = E(crop) / |E(crop)| [E] -> z = 0.25 * M(e) [300]
    landmarks: crop [96, 96, 3] -> p = HeatmapNet(crop) [68, 2] -> z = 0.25 * M(descriptor(p)) [300]

M is `n_hidden` fully connected layers of `hidden_dim` units with leaky ReLU (slope 0.2) and a
linear output layer, scaled by `OUTPUT_SCALE` (the reference implementation's 0.25). With
ONNX weights (config `encoder.onnx_path`, `load_encoder_weights`) the iresnet's architecture
comes from the file; without, it is built from `encoder.layers` / `width` / `embedding`.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from dhjax.capture.mica import landmark_net as mlm
from dhjax.capture.mica.config import N_SHAPE
from dhjax.nn import iresnet

OUTPUT_SCALE = 0.25
"""The mapping network's output is multiplied by this (reference implementation)."""
LEAKY_SLOPE = 0.2
"""Negative slope of the mapping network's leaky ReLUs (reference implementation)."""
CROP_SIZE = iresnet.INPUT_SIZE
"""Side of the aligned ArcFace crop (112)."""
ENCODER_KINDS = ("iresnet", "landmarks")
"""Encoders (`encoder.kind`): MICA's iresnet on the ArcFace crop, or the landmark encoder of
`dhjax.capture.mica.landmark_net` on its 96 x 96 landmark crop."""


class MappingNetwork(nn.Module):
    """Identity embedding -> shape coefficients: `n_hidden` x (Dense(hidden_dim) -> leaky ReLU
    0.2), then Dense(n_shape), times `OUTPUT_SCALE`. [..., E] -> [..., n_shape]."""

    hidden_dim: int = 300
    n_hidden: int = 3
    n_shape: int = N_SHAPE

    @nn.compact
    def __call__(self, x):
        for i in range(int(self.n_hidden)):
            x = nn.leaky_relu(nn.Dense(int(self.hidden_dim), name=f"hidden{i}")(x), LEAKY_SLOPE)
        return OUTPUT_SCALE * nn.Dense(int(self.n_shape), name="output")(x)


class MicaNet(nn.Module):
    """Encoder + mapping. Variables: params {"encoder": IResNet params, "mapping": ...},
    batch_stats {"encoder": ...}.

    __call__(crops, train=False): crops [B, 112, 112, 3] RGB floats in [0, 1] (or uint8);
    train: BatchNorm on batch statistics (pass mutable=["batch_stats"]). Returns z [B, n_shape].
    `embed` gives the unit-norm identity embedding [B, E].
    """

    layers: tuple = (1, 1, 1, 1)
    width: int = 16
    embedding: int = 512
    bn_eps: float = 1e-5
    hidden_dim: int = 300
    n_hidden: int = 3
    n_shape: int = N_SHAPE

    def setup(self):
        """Flax hook: the IResNet encoder and the mapping network."""
        self.encoder = iresnet.IResNet(layers=tuple(int(n) for n in self.layers), width=int(self.width),
                                       embedding=int(self.embedding), bn_eps=float(self.bn_eps))
        self.mapping = MappingNetwork(self.hidden_dim, self.n_hidden, self.n_shape)

    def embed(self, crops, train: bool = False):
        """The unit-norm identity embedding [B, E] of crops [B, 112, 112, 3] (as `__call__`)."""
        feats = self.encoder(iresnet.preprocess(crops), train)
        norm = jnp.sqrt(jnp.sum(feats * feats, axis=-1, keepdims=True))
        return feats / jnp.maximum(norm, 1e-12)

    def __call__(self, crops, train: bool = False):
        return self.mapping(self.embed(crops, train))


class LandmarkMicaNet(nn.Module):
    """Landmark encoder + mapping (encoder.kind "landmarks", `dhjax.capture.mica.landmark_net`).
    Variables: params {"heatmap": HeatmapNet params, "mapping": ...}; no batch statistics.

    __call__(crops, train=False): landmark crops [B, 96, 96, 3] (floats in [0, 1] or uint8;
    `crop_from_landmarks(..., kind="landmarks")`) -> z [B, n_shape] (`train` is accepted for
    the iresnet net's signature; nothing depends on it). `shape_and_landmarks` also returns the
    68 landmarks [B, 68, 2] in crop pixels. The mapping network reads the descriptor of the
    landmarks through a stop-gradient: the shape loss trains only the mapping network, the
    landmark network learns from its per-image landmark targets alone (so it cannot memorise
    the training identities' shapes).
    """

    width: int = 16
    hidden_dim: int = 300
    n_hidden: int = 3
    n_shape: int = N_SHAPE

    def setup(self):
        """Flax hook: the heatmap landmark network and the mapping network."""
        self.heatmap = mlm.HeatmapNet(width=int(self.width))
        self.mapping = MappingNetwork(self.hidden_dim, self.n_hidden, self.n_shape)

    def shape_and_landmarks(self, crops):
        """(z [B, n_shape], landmarks [B, 68, 2] in crop pixels) of crops [B, 96, 96, 3]; z reads the
        landmarks' descriptor through a stop-gradient."""
        pts = self.heatmap(crops)
        return self.mapping(mlm.descriptor(jax.lax.stop_gradient(pts))), pts

    def landmarks(self, crops):
        """The 68 landmarks [B, 68, 2] (crop pixels) of crops [B, 96, 96, 3]."""
        return self.heatmap(crops)

    def __call__(self, crops, train: bool = False):
        del train
        return self.shape_and_landmarks(crops)[0]


def check_kind(kind: str) -> str:
    """Returns an encoder kind, raising ValueError unless it is one of `ENCODER_KINDS`."""
    if kind not in ENCODER_KINDS:
        raise ValueError(f"encoder.kind must be one of {ENCODER_KINDS}, got {kind!r}")
    return kind


def crop_size(kind: str = "iresnet") -> int:
    """Side of the crops an encoder kind reads: 112 (ArcFace crop) or 96 (landmark crop)."""
    return CROP_SIZE if check_kind(kind) == "iresnet" else mlm.CROP_SIZE


def arch_kind(arch: Mapping[str, Any]) -> str:
    """The encoder kind of an architecture dict (`encoder_arch`; "iresnet" when unnamed)."""
    return check_kind(arch.get("kind", "iresnet"))


def encoder_arch(cfg) -> dict:
    """The encoder architecture of a config without loading weights: {"kind": "landmarks",
    "width"} for the landmark encoder; for iresnet {"kind", "layers", "width", "embedding",
    "bn_eps"}, read from the ONNX file when `encoder.onnx_path` is set, else the from-scratch
    settings."""
    kind = check_kind(cfg.encoder.get("kind", "iresnet"))
    if kind == "landmarks":
        if cfg.encoder.onnx_path:
            raise ValueError("encoder.onnx_path is an iresnet (ArcFace) weight file; the landmark "
                             "encoder (encoder.kind='landmarks') is trained from scratch")
        return {"kind": "landmarks", "width": int(cfg.encoder.heatmap_width)}
    if cfg.encoder.onnx_path:
        conf, _ = load_encoder_weights(cfg.encoder.onnx_path)
        return {"kind": "iresnet", **{k: conf[k] for k in ("layers", "width", "embedding", "bn_eps")}}
    return {"kind": "iresnet", "layers": tuple(int(n) for n in cfg.encoder.layers),
            "width": int(cfg.encoder.width), "embedding": int(cfg.encoder.embedding), "bn_eps": 1e-5}


def make_net(cfg, arch: Mapping[str, Any]) -> MicaNet | LandmarkMicaNet:
    """The network (MicaNet or LandmarkMicaNet) of a config and an encoder architecture
    (`encoder_arch`)."""
    if arch_kind(arch) == "landmarks":
        return LandmarkMicaNet(width=int(arch["width"]), hidden_dim=int(cfg.mapping.hidden_dim),
                               n_hidden=int(cfg.mapping.n_hidden), n_shape=int(cfg.n_shape))
    return MicaNet(layers=tuple(int(n) for n in arch["layers"]), width=int(arch["width"]),
                   embedding=int(arch["embedding"]), bn_eps=float(arch.get("bn_eps", 1e-5)),
                   hidden_dim=int(cfg.mapping.hidden_dim), n_hidden=int(cfg.mapping.n_hidden),
                   n_shape=int(cfg.n_shape))


def variables_kind(variables: Mapping[str, Any]) -> str:
    """The encoder kind of MICA variables, "iresnet" or "landmarks" (from their parameter names)."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables: expected {'params': {'encoder' or 'heatmap', 'mapping'}, "
                         "'batch_stats': ...}")
    params = variables["params"]
    if "mapping" not in params or ("encoder" in params) == ("heatmap" in params):
        raise ValueError(f"variables: not MICA variables (params has {sorted(params)}, needs "
                         "'mapping' and one of 'encoder' (iresnet) or 'heatmap' (landmarks))")
    return "iresnet" if "encoder" in params else "landmarks"


def net_from_variables(variables: Mapping[str, Any]) -> MicaNet | LandmarkMicaNet:
    """Reads the network architecture back from its variables (shapes only; works in jit)."""
    kind = variables_kind(variables)
    params = variables["params"]
    mapping = params["mapping"]
    n_hidden = sum(1 for k in mapping if k.startswith("hidden"))
    if kind == "landmarks" and "output" in mapping and n_hidden == 0:
        # a calibrated mapping (`with_linear_mapping`): one linear layer
        return LandmarkMicaNet(width=int(params["heatmap"]["stem"]["kernel"].shape[-1]), hidden_dim=1,
                               n_hidden=0, n_shape=int(mapping["output"]["kernel"].shape[-1]))
    if "output" not in mapping or n_hidden == 0:
        raise ValueError(f"variables: mapping has {sorted(mapping)}, expected hidden0.. and output")
    if kind == "landmarks":
        return LandmarkMicaNet(width=int(params["heatmap"]["stem"]["kernel"].shape[-1]),
                               hidden_dim=int(mapping["hidden0"]["kernel"].shape[-1]), n_hidden=n_hidden,
                               n_shape=int(mapping["output"]["kernel"].shape[-1]))
    arch = iresnet.config_from_variables({"params": params["encoder"]})
    return MicaNet(layers=arch["layers"], width=arch["width"], embedding=arch["embedding"],
                   hidden_dim=int(mapping["hidden0"]["kernel"].shape[-1]), n_hidden=n_hidden,
                   n_shape=int(mapping["output"]["kernel"].shape[-1]))


def load_encoder_weights(path) -> tuple[dict, dict]:
    """insightface ArcFace ONNX weights -> (arch config, IResNet variables {"params",
    "batch_stats"}); see `dhjax.io.onnx_weights.load_iresnet_onnx` (errors name the file)."""
    from dhjax.io import onnx_weights

    return onnx_weights.load_iresnet_onnx(path)

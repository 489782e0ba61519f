"""MICA: a metric neutral head shape from one image (Zielonka et al., ECCV 2022; thesis A.1).

    crop = arcface_crop(image, five points)                     [112, 112, 3] in [0, 1]
    e    = E(crop) / |E(crop)|                                   [512]   identity encoder (iresnet)
    z    = 0.25 * M(e)                                           [300]   shape coefficients
    mesh = template + shapedirs . z                              [V, 3]  metres, neutral pose

E is insightface's ArcFace iresnet (`dhjax.nn.iresnet`). M is the mapping network: `n_hidden`
fully connected layers of `hidden_dim` units with leaky ReLU (slope 0.2) and a linear output
layer to the shape coefficients, scaled by 0.25 (`OUTPUT_SCALE`, as the reference
implementation). The neutral mesh is the head model's forward pass with zero expression and
pose, i.e. the shaped template (`neutral_vertices`).

Encoder weights. The thesis fine-tunes an iresnet100 pretrained on Glint360K (only its last 3
residual blocks, plus the head). Given insightface's ONNX file (config `encoder.onnx_path`,
read by `dhjax.io.onnx_weights.load_iresnet_onnx`) that is what runs here: the architecture
comes from the file and `dhjax.nn.iresnet.trainable_mask(last_blocks=encoder.last_blocks)`
freezes the rest. Such weights cannot ship with dhjax (licence; nothing is downloaded and no
PyPI package carries usable face-descriptor weights offline), and the embedded default head
is not a real face anyway, so without a file the encoder is an IResNet of `encoder.layers` /
`encoder.width` trained from scratch on the synthetic data with every parameter trainable.

Encoder kinds (`encoder.kind`). "iresnet" is MICA's identity encoder above, on ArcFace's
112 x 112 crop. "landmarks" (`dhjax.capture.mica_landmarks`, `LandmarkMicaNet`) replaces it by
a heatmap network that finds the 68 iBUG landmarks in a zoomed-out 96 x 96 crop placed by the
same five points, and feeds the mapping network their similarity-normalised positions (a
136-d descriptor) instead of an identity embedding:

    crop = landmark_crop(image, five points)                     [96, 96, 3]
    p    = HeatmapNet(crop)                                       [68, 2]   crop pixels
    z    = 0.25 * M(descriptor(stop_gradient(p)))                 [300]

It trains from scratch on the synthetic pairs with two losses: the mean absolute landmark error
(crop pixels, weight `loss.landmark_weight`) against the projected ground-truth landmarks moved
into the jittered crop, which trains the heatmap network, and the shape loss below, which
trains only the mapping network (the stop-gradient). Its targets differ per image, so it
learns to localise instead of memorising identities; see "What the embedded head lets MICA
learn" below for why that matters. Its crops are not ArcFace crops: `crop_from_landmarks`,
`crop_batch`, `eval_batch` take the kind, `predict` checks the crop size against the
network's kind (`variables_kind`), `predict_image` crops and predicts one image for either.

BatchNorm (`encoder.batch_stats`): "auto" trains a from-scratch encoder with batch statistics
(running averages updated, as any network trained from scratch needs) and runs a pretrained
encoder on its frozen running statistics: insightface's released ONNX files fold most
BatchNorms into the convolutions (imported as identity BatchNorms), so batch statistics would
renormalise those layers and start fine-tuning from a different function, and batches of 8
faces of few subjects give noisy statistics. "train" / "frozen" force either mode.

Loss (`loss_fn`): L1 between predicted and ground-truth neutral vertices (metres), weighted
per vertex by region (`region_weights`: face 150, back of head 1, eyes and ears 0.01, every
other vertex 1 in the thesis), averaged over batch, vertices and coordinates and multiplied by
1000 (reference implementation). Model selection: the training state keeps a copy of the
network with the lowest validation error seen so far (`validation_error`: mean face-region
vertex distance in mm between predicted and true neutral meshes, both in the model's canonical
frame, so it is a metric error without any alignment), evaluated every `select_every` steps
inside the jitted step; `best_variables(state)` returns it.

Data (`generate_split`, `cached_split`): image / neutral-shape pairs rendered by the synthetic
generator (`dhjax.data.synthetic`): identities (disjoint identity-number ranges per split) with
random expressions, head poses and lights, seen by cameras at random azimuths / elevations /
distances around the front of the head. The five alignment points are the projected
ground-truth 68 landmarks of the posed mesh (what a perfect detector gives); training adds
Gaussian pixel noise to them (`data.landmark_noise_px`) before cropping, inside the step.

Mapping calibration (`calibrate_mapping`, config `calibration.enabled`, landmark encoder
only): after training, the mapping is refitted as one linear layer (ridge regression from the
descriptor to the shape, its strength chosen by 5-fold cross-validation of
`aligned_face_errors_mm`) on the landmarks the trained heatmap network finds in a separate
calibration split (`data.calib_identities`, identities used for nothing else). Trained on its
own training images, the mapping reads landmarks that are better than the network's landmarks
on new faces, and on new faces the network also pulls its points towards a typical face; fitted
on held-out identities (cross-fitting) it learns the relation that holds at test time. The fit
is stored next to the checkpoints (`CALIBRATION_FILE`, `save_calibration`) and
`calibrated_variables` combines it with the heatmap network of the last training step.

Benchmark (`synthetic_scans`, `benchmark`): the NoW-style metric evaluation of
`dhjax.capture.metric` on held-out identities: scans are ground-truth neutral meshes cropped to
the face region, sampled with noise and moved by a random rigid transform, with the 7 NoW
landmarks; predictions are MICA's meshes and the mean face (zero shape), aligned rigidly
(metric) or with a scale (non-metric). `compare_per_identity` compares MICA with the mean face
identity by identity (paired Wilcoxon test).

What the embedded head lets MICA learn. Its shape coefficients are independent N(0, 1) and
the first component is almost a uniform scaling of the head (correlation 0.98 with the radial
direction; 39% of the face region's shape variance). A five-point similarity-aligned crop
removes image scale, and a scaled head seen from proportionally further away gives the same
picture, so that component cannot be read from a crop: unlike real faces, whose size
correlates with their proportions, nothing in a synthetic crop tells it apart. Rigid
alignment to a face-only scan absorbs most of it, though: on the tiny config's test
identities the true shapes with that component zeroed score 0.38 mm median metric error
against the mean face's 1.32 mm, so nearly all of the mean face's error is learnable in
principle. In practice the from-scratch iresnet of the CPU configs (`configs/mica.py:
tiny_iresnet`) does not learn it: it memorises its training identities and stays at the mean
face's error on held-out ones (test: 1.326 / 1.679 mm median / mean against the mean face's
1.316 / 1.659). What can be read: a ridge regression from the exact projected 68 landmarks of
an image to its shape reaches 0.93 mm median on the same test identities, 1.17 mm with 1 px of
landmark noise (160 px images), so the face's proportions are in its landmarks, but only to a
pixel or so. The landmark encoder (the `tiny` config) localises held-out faces to about 3 px
(1.7 px of its 96 px crop) after 1000 steps. With its mapping trained on the training images
it is no better than the mean face (on 256 test identities better on 117, one-sided Wilcoxon p
= 0.90); calibrated (above) it is, by a little: metric median / mean 1.214 / 1.545 mm against
the mean face's 1.241 / 1.588, better on 140 of 256 identities, p = 0.0015. Measured ceilings
(issue 8's session notes): a mapping from the exact landmarks of the test images, fitted on
41k landmark sets sampled from the head model, wins on 24 of 32 identities (1.172 / 1.472 mm
against 1.316 / 1.659), so a better landmark network is what would raise the gain; one with the
face 1.5x larger in the crop, heatmaps at 1/2 resolution and 3000 steps (about 12 minutes)
reaches 2.1 px, which did not help behind a mapping fitted on noisy true landmarks (13 of 32),
because its errors are not noise: trained on a few hundred identities it pulls its points
towards a typical face. Landmarks good to about a pixel on unseen identities (a much larger
training budget) are what this encoder would need.

Everything here is a pure function of its arguments; the training loop, checkpoints and logs
are `dhjax.train`'s (`experiments.mica_train`).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dhjax.capture import align
from dhjax.capture import landmarks as lmk_lib
from dhjax.capture import mica_landmarks as mlm
from dhjax.data import cache as cache_lib
from dhjax.data import synthetic
from dhjax.geometry import alignment
from dhjax.geometry import mesh as mesh_lib
from dhjax.geometry import rotations
from dhjax.models import flame
from dhjax.nn import iresnet
from dhjax.render import camera as camera_lib

__all__ = [
    "N_SHAPE", "OUTPUT_SCALE", "LEAKY_SLOPE", "CROP_SIZE", "NOW_LANDMARKS", "DATA_FORMAT",
    "ENCODER_KINDS", "crop_size", "arch_kind", "variables_kind", "predict_image",
    "default_config", "MappingNetwork", "MicaNet", "LandmarkMicaNet", "make_net", "net_from_variables",
    "encoder_arch", "load_encoder_weights", "region_weights", "neutral_vertices",
    "neutral_landmarks", "check_crops", "crop_from_landmarks", "crop_batch", "predict",
    "loss_fn", "make_optimizer", "labels", "init_state", "state_template", "train_step",
    "validation_error", "vertex_errors_mm", "best_variables", "method_functions",
    "sample_cameras", "generate_split", "cached_split", "cached_splits", "split_dataset", "eval_batch",
    "synthetic_scans", "mesh_prediction", "benchmark", "compare_per_identity", "write_run_model", "read_run",
    "CALIBRATION_FILE", "landmark_descriptors", "aligned_face_errors_mm", "fit_linear_mapping",
    "calibration_enabled", "calibrate_mapping", "with_linear_mapping", "save_calibration", "calibrated_variables",
]

N_SHAPE = 300
"""Shape coefficients MICA predicts (FLAME's identity space)."""
OUTPUT_SCALE = 0.25
"""The mapping network's output is multiplied by this (reference implementation)."""
LEAKY_SLOPE = 0.2
"""Negative slope of the mapping network's leaky ReLUs (reference implementation)."""
CROP_SIZE = iresnet.INPUT_SIZE
"""Side of the aligned ArcFace crop (112)."""
ENCODER_KINDS = ("iresnet", "landmarks")
"""Encoders (`encoder.kind`): MICA's iresnet on the ArcFace crop, or the landmark encoder of
`dhjax.capture.mica_landmarks` on its 96 x 96 landmark crop."""
NOW_LANDMARKS = (36, 39, 42, 45, 30, 48, 54)
"""iBUG-68 indices of the 7 landmarks the NoW benchmark aligns with: eye corners (outer and
inner of both eyes), nose tip, mouth corners."""
DATA_FORMAT = 1
"""Version of the cached data layout (part of the cache key)."""
STREAM_CAMERA = 21
"""Random stream of MICA's camera sampling (`dhjax.data.synthetic.key`)."""
STREAM_SCAN = 22
"""Random stream of the synthetic benchmark scans."""

_HI = jax.lax.Precision.HIGHEST
_MM = 1000.0
_NO_BEST = 1e30  # validation error before the first selection (finite: the loop skips non-finite states)


# ----------------------------------------------------------------------------------------------
# Configuration.


def default_config() -> ml_collections.ConfigDict:
    """The method's settings (the thesis / reference implementation unless a comment says
    otherwise); `configs/mica.py` builds its variants on it.

    encoder: kind ("iresnet": MICA's identity encoder on the ArcFace crop; "landmarks": the
      heatmap landmark network of `dhjax.capture.mica_landmarks` and its similarity-normalised
      landmark descriptor, trained from scratch); for iresnet: onnx_path ("" = train
      `layers`/`width`/`embedding` from scratch), last_blocks (blocks fine-tuned with pretrained
      weights), batch_stats ("auto" | "train" | "frozen"); for landmarks: heatmap_width (channels
      of the U-Net's first level).
    mapping: hidden_dim, n_hidden. n_shape: predicted coefficients.
    loss: region_weights {region of the head model: weight} (a vertex in several listed
      regions takes the weight of the smallest of them, so a sub-region refines its parent),
      default_weight (vertices in no listed region), scale (x1000); landmark_weight: weight of
      the landmark encoder's landmark loss (mean absolute error, crop pixels).
    optim: AdamW lr, weight_decay, warmup_steps (linear from 0), schedule ("constant" |
      "cosine" to 0 at train.steps), clip (global gradient norm, 0 = off).
    data: see `default_data_config`. select_every: steps between validations for model selection.
    calibration (landmark encoder only, `calibrate_mapping`): enabled, lambdas (ridge strengths
      tried), folds (cross-validation folds over the calibration identities).
    """
    c = ml_collections.ConfigDict()
    c.n_shape = N_SHAPE
    c.encoder = ml_collections.ConfigDict(dict(
        kind="iresnet",               # "iresnet" (MICA) | "landmarks" (mica_landmarks)
        heatmap_width=16,             # landmarks: U-Net width
        onnx_path="",                 # insightface ArcFace ONNX (e.g. glint360k_r100.onnx); "" = from scratch
        last_blocks=3,                # thesis: only the last 3 ResNet blocks are fine-tuned
        layers=(3, 13, 30, 3), width=64, embedding=512,   # from-scratch architecture (iresnet100)
        batch_stats="auto"))
    c.mapping = ml_collections.ConfigDict(dict(hidden_dim=300, n_hidden=3))
    c.loss = ml_collections.ConfigDict(dict(
        # Thesis: face 150, back of head 1, eyes + ears 0.01, the rest 1. nose/lips/forehead lie
        # inside the face region, so listing them at 150 is the thesis setting; the reference
        # implementation weights them 50 (--config.loss.region_weights.nose=50 etc.).
        region_weights=ml_collections.ConfigDict(dict(
            face=150.0, nose=150.0, lips=150.0, forehead=150.0, back_of_head=1.0, eyes=0.01,
            ears=0.01)),
        default_weight=1.0, scale=1000.0, landmark_weight=1.0))
    c.optim = ml_collections.ConfigDict(dict(lr=1e-5, weight_decay=2e-4, warmup_steps=0,
                                             schedule="constant", clip=0.0))
    c.select_every = 1000
    c.calibration = ml_collections.ConfigDict(dict(
        enabled=False, lambdas=(1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0), folds=5))
    c.data = default_data_config()
    return c


def default_data_config() -> ml_collections.ConfigDict:
    """Synthetic image / neutral-shape pairs.

    synthetic: `dhjax.data.synthetic.default_config()` (seed, shape/expression std, uv_size,
      multiview.global_std / translation_std: head pose jitter).
    image_size (square, pixels), fov_y_deg, radius (min, max) metres, azimuth_deg (max |az|),
    elevation_deg (min, max), target (look-at point, model space), target_jitter (m, per axis);
    train / val / test / calib_identities: (first identity number, count), disjoint ranges
      (calib: the landmark encoder's mapping calibration, `calibrate_mapping`; count 0 = none);
    train_expressions, train_views: expressions per identity and views per expression;
    eval_expressions, eval_views: the same for validation and test; calib_expressions,
      calib_views: for the calibration split;
    landmark_noise_px: std of the pixel noise added to the five points when training;
    cache_dir: "" = $DHJAX_CACHE or ~/.cache/dhjax.
    """
    syn = synthetic.default_config()
    syn.uv_size = 256
    return ml_collections.ConfigDict(dict(
        synthetic=syn, image_size=192, fov_y_deg=19.0, radius=(0.9, 1.1), azimuth_deg=30.0,
        elevation_deg=(-10.0, 15.0), target=(0.0, -0.035, 0.0), target_jitter=0.01,
        train_identities=(0, 5000), val_identities=(500_000, 100), test_identities=(1_000_000, 100),
        calib_identities=(250_000, 0), train_expressions=2, train_views=2, eval_expressions=1, eval_views=2,
        calib_expressions=1, calib_views=1,
        landmark_noise_px=1.0, cache_dir=""))


# ----------------------------------------------------------------------------------------------
# Networks.


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
        self.encoder = iresnet.IResNet(layers=tuple(int(n) for n in self.layers), width=int(self.width),
                                       embedding=int(self.embedding), bn_eps=float(self.bn_eps))
        self.mapping = MappingNetwork(self.hidden_dim, self.n_hidden, self.n_shape)

    def embed(self, crops, train: bool = False):
        feats = self.encoder(iresnet.preprocess(crops), train)
        norm = jnp.sqrt(jnp.sum(feats * feats, axis=-1, keepdims=True))
        return feats / jnp.maximum(norm, 1e-12)

    def __call__(self, crops, train: bool = False):
        return self.mapping(self.embed(crops, train))


class LandmarkMicaNet(nn.Module):
    """Landmark encoder + mapping (encoder.kind "landmarks", `dhjax.capture.mica_landmarks`).
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
        self.heatmap = mlm.HeatmapNet(width=int(self.width))
        self.mapping = MappingNetwork(self.hidden_dim, self.n_hidden, self.n_shape)

    def shape_and_landmarks(self, crops):
        pts = self.heatmap(crops)
        return self.mapping(mlm.descriptor(jax.lax.stop_gradient(pts))), pts

    def landmarks(self, crops):
        return self.heatmap(crops)

    def __call__(self, crops, train: bool = False):
        del train
        return self.shape_and_landmarks(crops)[0]


def _check_kind(kind: str) -> str:
    if kind not in ENCODER_KINDS:
        raise ValueError(f"encoder.kind must be one of {ENCODER_KINDS}, got {kind!r}")
    return kind


def crop_size(kind: str = "iresnet") -> int:
    """Side of the crops an encoder kind reads: 112 (ArcFace crop) or 96 (landmark crop)."""
    return CROP_SIZE if _check_kind(kind) == "iresnet" else mlm.CROP_SIZE


def arch_kind(arch: Mapping[str, Any]) -> str:
    """The encoder kind of an architecture dict (`encoder_arch`; "iresnet" when unnamed)."""
    return _check_kind(arch.get("kind", "iresnet"))


def encoder_arch(cfg) -> dict:
    """The encoder architecture of a config without loading weights: {"kind": "landmarks",
    "width"} for the landmark encoder; for iresnet {"kind", "layers", "width", "embedding",
    "bn_eps"}, read from the ONNX file when `encoder.onnx_path` is set, else the from-scratch
    settings."""
    kind = _check_kind(cfg.encoder.get("kind", "iresnet"))
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


# ----------------------------------------------------------------------------------------------
# Geometry and loss.


def region_weights(model: flame.FlameModel, weights: Mapping[str, float], default: float = 1.0) -> np.ndarray:
    """Per-vertex loss weights [V] float32 from region weights.

    Each vertex in a listed region gets that region's weight; a vertex in several listed regions
    gets the weight of the smallest of them (fewest vertices: a sub-region such as the nose
    refines the face); vertices in no listed region get `default`.

    Args:
      model: a FlameModel with `regions` ({name: [V] bool}).
      weights: {region name: weight >= 0}.
    """
    if model.regions is None:
        raise ValueError(f"model {model.name!r} has no region masks; MICA's loss weights need them")
    unknown = [k for k in weights if k not in model.regions]
    if unknown:
        raise ValueError(f"loss.region_weights: unknown region(s) {unknown}; the model has "
                         f"{sorted(model.regions)}")
    bad = {k: v for k, v in weights.items() if not (np.isfinite(float(v)) and float(v) >= 0)}
    if bad:
        raise ValueError(f"loss.region_weights: weights must be finite and >= 0, got {bad}")
    V = model.num_vertices
    w = np.full(V, float(default), np.float32)
    masks = {k: np.asarray(model.regions[k], bool) for k in weights}
    for name in sorted(masks, key=lambda k: -int(masks[k].sum())):   # largest first, smallest wins
        w[masks[name]] = float(weights[name])
    return w


def neutral_vertices(model: flame.FlameModel, shape):
    """Neutral mesh of shape coefficients: template + shapedirs . shape (the forward pass with
    zero expression and pose). shape [B, S] (S <= model.num_shape) -> [B, V, 3] metres."""
    shape = jnp.asarray(shape, jnp.float32)
    if shape.ndim != 2 or shape.shape[-1] > model.num_shape:
        raise ValueError(f"shape: expected [B, S] with S <= {model.num_shape}, got {shape.shape}")
    S = shape.shape[-1]
    return model.v_template[None] + jnp.einsum("bs,svc->bvc", shape, model.shapedirs[:S], precision=_HI)


def neutral_landmarks(model: flame.FlameModel, vertices, indices: Sequence[int] | None = None):
    """The model's 68 landmarks (or `indices` of them) on meshes vertices [B, V, 3] -> [B, L, 3]."""
    if model.lmk_faces is None:
        raise ValueError(f"model {model.name!r} has no landmark embedding")
    lf, lb = model.lmk_faces, model.lmk_bary
    if indices is not None:
        idx = np.asarray(indices)
        lf, lb = lf[idx], lb[idx]
    return flame.embed_landmarks(jnp.asarray(vertices), model.faces, lf, lb)


def vertex_errors_mm(model: flame.FlameModel, pred_shape, gt_shape):
    """Per-vertex distances [B, V] in mm between the neutral meshes of two shape batches."""
    d = neutral_vertices(model, pred_shape) - neutral_vertices(model, gt_shape)
    return _MM * jnp.sqrt(jnp.sum(d * d, axis=-1) + 1e-20)


def loss_fn(pred_shape, gt_shape, model: flame.FlameModel, weights):
    """MICA's shape loss before its constant factor: mean_{b,v,c} w_v |v_pred - v_gt| (the
    training step multiplies it by `loss.scale`, 1000 in the reference implementation).

    Args:
      pred_shape, gt_shape: [B, S] shape coefficients.
      model: FlameModel; weights: [V] per-vertex weights (`region_weights`).
    Returns:
      scalar: mean over batch, vertices and coordinates of w_v |v_pred - v_gt| (metres).
    """
    pred_shape = jnp.asarray(pred_shape, jnp.float32)
    gt_shape = jnp.asarray(gt_shape, jnp.float32)
    if pred_shape.shape != gt_shape.shape:
        raise ValueError(f"pred_shape {pred_shape.shape} and gt_shape {gt_shape.shape} differ")
    S = pred_shape.shape[-1]
    diff = jnp.einsum("bs,svc->bvc", pred_shape - gt_shape, model.shapedirs[:S], precision=_HI)
    return jnp.mean(jnp.abs(diff) * jnp.asarray(weights, jnp.float32)[None, :, None])


# ----------------------------------------------------------------------------------------------
# Crops and prediction.


_CROP_NAMES = {"iresnet": "aligned ArcFace crops (crop_from_landmarks)",
               "landmarks": "landmark crops (encoder kind 'landmarks': crop_from_landmarks(image, "
                            "landmarks, kind='landmarks'))"}


def check_crops(crops, kind: str = "iresnet") -> jax.Array:
    """Validates crops [B, S, S, 3] (floats in [0, 1] or uint8) for an encoder kind (S =
    `crop_size(kind)`: 112 ArcFace crops for iresnet, 96 landmark crops); returns them as an
    array. Raises ValueError naming the problem (shape, dtype, non-finite values)."""
    size = crop_size(kind)
    arr = np.asarray(crops)
    if arr.ndim == 3:
        raise ValueError(f"crops: expected a batch [B, {size}, {size}, 3], got one image "
                         f"{arr.shape} (add a leading axis)")
    if arr.ndim != 4 or arr.shape[1:] != (size, size, 3):
        raise ValueError(f"crops: expected [B, {size}, {size}, 3] {_CROP_NAMES[kind]}, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("crops: empty batch (no crops)")
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"crops: expected floats in [0, 1] or uint8, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise ValueError(f"crops: {int(np.sum(~np.isfinite(arr)))} non-finite values (NaN/inf)")
    return jnp.asarray(arr)


def _image_rgb(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image: expected [H, W, 3] (or grey / RGBA), got shape {img.shape}")
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    elif np.issubdtype(img.dtype, np.floating):
        if not np.all(np.isfinite(img)):
            raise ValueError(f"image: {int(np.sum(~np.isfinite(img)))} non-finite values (NaN/inf)")
        img = img.astype(np.float32)
    else:
        raise ValueError(f"image: expected floats in [0, 1] or uint8, got dtype {img.dtype}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return img[..., :3]


def _five(landmarks) -> np.ndarray:
    """Five ArcFace points [5, 2] from a Landmarks object, 68 iBUG points or five points."""
    if isinstance(landmarks, lmk_lib.Landmarks):
        pts = np.asarray(lmk_lib.five_points(landmarks), np.float32)
    else:
        pts = np.asarray(landmarks, np.float32)
        if pts.shape == (68, 2):
            pts = np.asarray(align.five_points_from_68(pts))
        elif pts.shape != (5, 2):
            raise ValueError(f"landmarks: expected a Landmarks object, [68, 2] iBUG or [5, 2] points "
                             f"(pixels), got shape {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError("landmarks: non-finite five points")
    if np.linalg.norm(pts[1] - pts[0]) < 1e-3:
        raise ValueError(f"landmarks: the two eye points coincide ({pts[0]}); not a face")
    return pts


def _crop_fn(kind: str):
    return align.arcface_crop if _check_kind(kind) == "iresnet" else mlm.landmark_crop


def crop_from_landmarks(image, landmarks, kind: str = "iresnet") -> np.ndarray:
    """The aligned crop of a face that an encoder kind reads: ArcFace's 112 x 112 crop
    (iresnet) or the 96 x 96 landmark crop (`dhjax.capture.mica_landmarks.landmark_crop`), both
    placed by the five ArcFace points.

    Args:
      image: [H, W, 3] RGB floats in [0, 1] or uint8 (grey and RGBA are converted).
      landmarks: `dhjax.capture.landmarks.Landmarks`, [68, 2] iBUG points or [5, 2] ArcFace
        points (x, y pixels of `image`).
      kind: the encoder kind ("iresnet" or "landmarks"; `variables_kind` of a network).
    Returns:
      [S, S, 3] float32 crop in [0, 1] (S = `crop_size(kind)`).
    """
    crop = _crop_fn(kind)
    img = _image_rgb(image)
    return np.asarray(crop(jnp.asarray(img), jnp.asarray(_five(landmarks))), np.float32)


@functools.partial(jax.jit, static_argnames="kind")
def _crop_batch(images, five, kind: str = "iresnet"):
    imgs = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images
    return jax.vmap(_crop_fn(kind))(imgs, five)


def crop_batch(images, five, kind: str = "iresnet") -> np.ndarray:
    """Crops [N, S, S, 3] uint8 of images [N, H, W, 3] uint8 at five points [N, 5, 2] for an
    encoder kind (`crop_from_landmarks`)."""
    out = [_crop_batch(jnp.asarray(images[i:i + 64]), jnp.asarray(five[i:i + 64], jnp.float32), kind=kind)
           for i in range(0, len(images), 64)]
    return np.clip(np.round(np.concatenate([np.asarray(o) for o in out]) * 255.0), 0, 255).astype(np.uint8)


@jax.jit
def _predict(variables, crops):
    return net_from_variables(variables).apply(variables, crops, train=False)


def predict(variables, crops, batch_size: int = 64) -> np.ndarray:
    """Shape coefficients of aligned crops (eval mode).

    Args:
      variables: MICA variables {"params", "batch_stats"} (`best_variables`).
      crops: [B, S, S, 3] floats in [0, 1] or uint8, the crops of the network's encoder kind
        (`crop_from_landmarks(image, landmarks, variables_kind(variables))`: S = 112 for
        iresnet, 96 for landmarks).
    Returns:
      [B, n_shape] float32.
    """
    net_from_variables(variables)   # clear error for a wrong tree before tracing
    crops = np.asarray(check_crops(crops, variables_kind(variables)))
    out = [np.asarray(_predict(variables, jnp.asarray(crops[i:i + batch_size])))
           for i in range(0, len(crops), batch_size)]
    return np.concatenate(out).astype(np.float32)


def predict_image(variables, image, landmarks) -> tuple[np.ndarray, np.ndarray]:
    """Shape coefficients of one face image: the crop of the network's encoder kind at the
    landmarks' five points, then `predict`.

    Args:
      variables: MICA variables (`best_variables`); image: [H, W, 3] RGB floats in [0, 1] or
        uint8; landmarks: as `crop_from_landmarks` takes them.
    Returns:
      (z [n_shape] float32, the crop [S, S, 3] float32 in [0, 1]).
    """
    crop = crop_from_landmarks(image, landmarks, variables_kind(variables))
    return predict(variables, crop[None])[0], crop


# ----------------------------------------------------------------------------------------------
# Training state and step.


def _bn_mode(cfg) -> str:
    if _check_kind(cfg.encoder.get("kind", "iresnet")) == "landmarks":
        return "none"          # GroupNorm only
    mode = cfg.encoder.batch_stats
    if mode == "auto":
        return "frozen" if cfg.encoder.onnx_path else "train"
    if mode not in ("train", "frozen"):
        raise ValueError(f"encoder.batch_stats must be 'auto', 'train' or 'frozen', got {mode!r}")
    return mode


def labels(cfg, params) -> dict:
    """'train' / 'freeze' label per parameter: with pretrained weights only the encoder's last
    `encoder.last_blocks` blocks and head train (`iresnet.trainable_mask`, features.scale fixed as
    in arcface_torch); from scratch (and in the landmark encoder) every parameter trains. The
    mapping network always trains."""
    if "encoder" not in params:     # landmark encoder
        return jax.tree_util.tree_map(lambda _: "train", dict(params))
    if cfg.encoder.onnx_path:
        mask = iresnet.trainable_mask(params["encoder"], last_blocks=int(cfg.encoder.last_blocks))
    else:
        mask = iresnet.trainable_mask(params["encoder"], last_blocks=None, freeze_feature_scale=False)
    enc = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", mask)
    return {"encoder": enc, "mapping": jax.tree_util.tree_map(lambda _: "train", params["mapping"])}


def _schedule(optim, steps: int):
    lr, warm = float(optim.lr), int(optim.warmup_steps)
    if optim.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(int(steps) - warm, 1))
    else:
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {optim.schedule!r}")
    if warm > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])
    return main


def make_optimizer(cfg, params, steps: int | None = None):
    """AdamW (optim.lr, optim.weight_decay, schedule, optional clipping) on the trainable
    parameters (`labels`); frozen ones get exactly zero updates. steps: total steps for the
    cosine schedule (cfg.train.steps when None)."""
    steps = int(cfg.train.steps) if steps is None else int(steps)
    o = cfg.optim
    parts = [optax.clip_by_global_norm(float(o.clip))] if o.clip else []
    tx = optax.chain(*parts, optax.adamw(_schedule(o, steps), weight_decay=float(o.weight_decay)))
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels(cfg, params))


def _init_variables(net, rng, x):
    """net.init; called with a concrete key on CPU it compiles without XLA's expensive
    optimisations (a one-off random initialisation: ~3 s to compile instead of ~10 s)."""
    init = functools.partial(net.init, train=False)
    if isinstance(rng, jax.core.Tracer) or jax.default_backend() != "cpu":
        return init(rng, x)
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return jax.jit(init).lower(rng, x).compile(compiler_options=fast)(rng, x)


def init_state(rng, cfg, arch: Mapping[str, Any], encoder_variables: Mapping[str, Any] | None = None) -> dict:
    """A fresh training state.

    Args:
      rng: PRNG key; cfg: config (`default_config` layout, with `train.steps`);
      arch: encoder architecture (`encoder_arch`);
      encoder_variables: pretrained IResNet variables to start from (`load_encoder_weights`),
        or None for random initialisation (always for the landmark encoder).
    Returns:
      {"step", "params", "batch_stats", "opt_state", "best": {"params", "batch_stats",
      "val_mm", "step"}} (best.step = -1 until the first validation; batch_stats is {} for
      the landmark encoder).
    """
    net = make_net(cfg, arch)
    size = crop_size(arch_kind(arch))
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    if encoder_variables is not None and arch_kind(arch) != "iresnet":
        raise ValueError("encoder_variables: pretrained weights exist only for the iresnet encoder")
    if encoder_variables is not None:
        shapes = jax.eval_shape(functools.partial(net.init, train=False), rng, x)
        want = jax.tree_util.tree_map(lambda a: tuple(a.shape), {"params": shapes["params"]["encoder"],
                                                                  "batch_stats": shapes["batch_stats"]["encoder"]})
        have = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), {
            "params": encoder_variables["params"], "batch_stats": encoder_variables["batch_stats"]})
        if want != have:
            raise ValueError("encoder_variables do not fit the encoder architecture "
                             f"{dict(arch)} (different layers or shapes)")
    variables = _init_variables(net, rng, x)
    params = dict(variables["params"])
    stats = dict(variables.get("batch_stats", {}))
    if encoder_variables is not None:
        params["encoder"] = jax.tree_util.tree_map(jnp.asarray, encoder_variables["params"])
        stats["encoder"] = jax.tree_util.tree_map(jnp.asarray, encoder_variables["batch_stats"])
    opt_state = make_optimizer(cfg, params).init(params)
    return dict(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats, opt_state=opt_state,
                best=dict(params=params, batch_stats=stats, val_mm=jnp.asarray(_NO_BEST, jnp.float32),
                          step=jnp.asarray(-1, jnp.int32)))


def state_template(cfg, arch: Mapping[str, Any]):
    """Abstract training state (ShapeDtypeStructs) of a config, for restoring checkpoints."""
    return jax.eval_shape(lambda k: init_state(k, cfg, arch), jax.random.PRNGKey(0))


def best_variables(state) -> dict:
    """The selected network {"params", "batch_stats"} of a (concrete, not traced) training
    state; the current network when no validation has run yet (best.step = -1)."""
    best = state["best"]
    if int(np.asarray(jax.device_get(best["step"]))) < 0:
        return {"params": state["params"], "batch_stats": state["batch_stats"]}
    return {"params": best["params"], "batch_stats": best["batch_stats"]}


def _apply(net, params, stats, crops, train: bool):
    variables = {"params": params, "batch_stats": stats}
    if train:
        z, upd = net.apply(variables, crops, train=True, mutable=["batch_stats"])
        return z, upd["batch_stats"]
    return net.apply(variables, crops, train=False), stats


def validation_error(net, variables, crops, gt_shape, model, face_mask, chunk: int = 32):
    """Model-selection metric: mean over images of the mean face-region vertex distance (mm)
    between predicted and true neutral meshes (canonical frame, no alignment).

    crops [N, C, C, 3] uint8 or floats (the net's crops); gt_shape [N, S]; face_mask [V] bool. jit-able
    (chunks of `chunk` images through lax.map; N must divide by chunk or be smaller)."""
    n = crops.shape[0]
    chunk = min(int(chunk), n)
    if n % chunk:
        raise ValueError(f"validation set of {n} images does not split into chunks of {chunk}")
    c = crops.reshape((n // chunk, chunk) + crops.shape[1:])
    z = jax.lax.map(lambda x: net.apply(variables, x, train=False), c).reshape(n, -1)
    err = vertex_errors_mm(model, z, gt_shape)
    w = jnp.asarray(face_mask, jnp.float32)
    return jnp.mean(jnp.sum(err * w, axis=1) / jnp.maximum(jnp.sum(w), 1.0))


def train_step(state, batch, rng, *, cfg, net, model, weights, face_mask, val=None):
    """One MICA step: crop the batch at its (noise-augmented) five points, predict, weighted
    vertex L1, AdamW; every `select_every` steps validate and keep the best network.

    With the landmark encoder (`LandmarkMicaNet`) the loss adds loss.landmark_weight x the mean
    absolute error (crop pixels) of the 68 predicted landmarks against the ground-truth ones
    moved into the (jittered) crop; the shape loss reaches only the mapping network.

    batch: image [B, H, W, 3] uint8, five [B, 5, 2] pixels, shape [B, S] (and lmk68 [B, 68, 2]
    pixels for the landmark encoder). val: None or {"crops" [N, S, S, 3] uint8, "shape" [N, S]}
    (constants of the step).
    Returns (state, metrics: loss, face_mm, mean_mm, grad_norm, val_mm (best so far); with the
    landmark encoder also shape_loss and landmark_px).
    """
    images = batch["image"]
    five = batch["five"].astype(jnp.float32)
    noise = float(cfg.data.landmark_noise_px)
    if noise > 0:
        five = five + noise * jax.random.normal(rng, five.shape)
    landmark_net = isinstance(net, LandmarkMicaNet)
    crops = _crop_batch(images, five, kind="landmarks" if landmark_net else "iresnet")
    gt = batch["shape"].astype(jnp.float32)
    train_bn = _bn_mode(cfg) == "train"
    scale = float(cfg.loss.scale)
    extra = {}

    if landmark_net:
        if "lmk68" not in batch:
            raise KeyError("the landmark encoder trains on batches with 'lmk68' (the projected "
                           f"ground-truth 68 landmarks); this batch has {sorted(batch)}")
        target = mlm.to_crop(batch["lmk68"].astype(jnp.float32), mlm.crop_transform(five))
        lw = float(cfg.loss.landmark_weight)

        def objective(params):
            z, pts = net.apply({"params": params}, crops, method=LandmarkMicaNet.shape_and_landmarks)
            shape_loss = scale * loss_fn(z, gt, model, weights)
            lmk = jnp.mean(jnp.abs(pts - target))
            return shape_loss + lw * lmk, (z, state["batch_stats"], shape_loss, lmk)

        (loss, (z, stats, shape_loss, lmk)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        extra = dict(shape_loss=shape_loss, landmark_px=lmk)
    else:
        def objective(params):
            z, stats = _apply(net, params, state["batch_stats"], crops, train_bn)
            return scale * loss_fn(z, gt, model, weights), (z, stats)

        (loss, (z, stats)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
    tx = make_optimizer(cfg, state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step = state["step"] + 1
    best = state["best"]
    if val is not None:
        every = max(int(cfg.select_every), 1)

        def select(best):
            err = validation_error(net, {"params": params, "batch_stats": stats}, val["crops"],
                                   val["shape"], model, face_mask)
            new = dict(params=params, batch_stats=stats, val_mm=err.astype(jnp.float32), step=step)
            return jax.lax.cond(err < best["val_mm"], lambda: new, lambda: best)

        best = jax.lax.cond(step % every == 0, select, lambda b: b, best)
    err = jax.lax.stop_gradient(vertex_errors_mm(model, z, gt))
    fm = jnp.asarray(face_mask, jnp.float32)
    metrics = dict(loss=loss, face_mm=jnp.mean(jnp.sum(err * fm, 1) / jnp.sum(fm)), mean_mm=jnp.mean(err),
                   grad_norm=optax.tree.norm(grads), val_mm=best["val_mm"],
                   best_step=best["step"].astype(jnp.float32), **extra)
    return dict(step=step, params=params, batch_stats=stats, opt_state=opt_state, best=best), metrics


def method_functions(cfg, arch, model: flame.FlameModel, *, encoder_variables=None, val=None):
    """(init, train_step, evaluate) for `dhjax.train.loop.Method`.

    evaluate(state, batch) with batch {"crops", "shape"} gives the current network's face_mm /
    mean_mm and the selected one's best_mm on it."""
    net = make_net(cfg, arch)
    weights = jnp.asarray(region_weights(model, dict(cfg.loss.region_weights), float(cfg.loss.default_weight)))
    if "face" not in model.regions:
        raise ValueError(f"model {model.name!r} has no 'face' region (model selection uses it)")
    face_mask = jnp.asarray(model.regions["face"])
    val = None if val is None else {"crops": jnp.asarray(val["crops"]), "shape": jnp.asarray(val["shape"])}

    def init(rng, batch):
        del batch
        return init_state(rng, cfg, arch, encoder_variables)

    def step(state, batch, rng):
        return train_step(state, batch, rng, cfg=cfg, net=net, model=model, weights=weights,
                          face_mask=face_mask, val=val)

    def evaluate(state, batch):
        z = net.apply({"params": state["params"], "batch_stats": state["batch_stats"]}, batch["crops"])
        zb = net.apply({"params": state["best"]["params"], "batch_stats": state["best"]["batch_stats"]},
                       batch["crops"])
        gt = batch["shape"].astype(jnp.float32)
        err, errb = vertex_errors_mm(model, z, gt), vertex_errors_mm(model, zb, gt)
        fm = face_mask.astype(jnp.float32)
        face = lambda e: jnp.mean(jnp.sum(e * fm, 1) / jnp.sum(fm))  # noqa: E731
        return dict(face_mm=face(err), mean_mm=jnp.mean(err), best_face_mm=face(errb),
                    loss=float(cfg.loss.scale) * loss_fn(z, gt, model, weights))

    return init, step, evaluate


RUN_MODEL_FILE = "mica_model.json"
"""Written into a training run's workdir: the encoder architecture and the head model, so that
a run can be loaded without the encoder's weight file (`read_run`)."""


def write_run_model(workdir, cfg, arch: Mapping[str, Any], model: flame.FlameModel) -> Path:
    """Writes <workdir>/mica_model.json: encoder kind, architecture and source, mapping sizes,
    head model."""
    if arch_kind(arch) == "landmarks":
        enc = {"kind": "landmarks", "width": int(arch["width"]), "crop_size": mlm.CROP_SIZE,
               "source": "landmark heatmap network, from scratch"}
    else:
        enc = {"kind": "iresnet", "layers": [int(n) for n in arch["layers"]], "width": int(arch["width"]),
               "embedding": int(arch["embedding"]), "bn_eps": float(arch.get("bn_eps", 1e-5)),
               "crop_size": CROP_SIZE, "source": cfg.encoder.onnx_path or "from scratch"}
    rec = {"encoder": enc,
           "mapping": {"hidden_dim": int(cfg.mapping.hidden_dim), "n_hidden": int(cfg.mapping.n_hidden)},
           "n_shape": int(cfg.n_shape), "head_model": model.name, "n_vertices": int(model.num_vertices)}
    path = Path(workdir) / RUN_MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2))
    return path


def read_run(workdir) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """(config, encoder arch, model record) of a training run's workdir (config.json and
    mica_model.json). Raises FileNotFoundError naming what is missing."""
    work = Path(workdir)
    missing = [n for n in ("config.json", RUN_MODEL_FILE) if not (work / n).is_file()]
    if missing:
        raise FileNotFoundError(f"'{work}' is not a MICA training run (no {', '.join(missing)}); "
                                f"train one with: python -m experiments.mica_train "
                                f"--config=configs/mica.py:tiny --workdir={work}")
    cfg = ml_collections.ConfigDict(json.loads((work / "config.json").read_text()))
    rec = json.loads((work / RUN_MODEL_FILE).read_text())
    e = rec["encoder"]
    if e.get("kind", "iresnet") == "landmarks":
        arch = {"kind": "landmarks", "width": int(e["width"])}
    else:
        arch = {"kind": "iresnet", "layers": tuple(int(n) for n in e["layers"]), "width": int(e["width"]),
                "embedding": int(e["embedding"]), "bn_eps": float(e["bn_eps"])}
    return cfg, arch, rec


# ----------------------------------------------------------------------------------------------
# Synthetic data.


def sample_cameras(data_cfg, identity_number: int, expression: int, n: int) -> camera_lib.Camera:
    """`n` cameras around the front of the head for one (identity, expression): azimuth
    U(-azimuth_deg, azimuth_deg), elevation U(elevation_deg), distance U(radius), looking at
    `target` + U(-target_jitter, target_jitter)^3; square image_size, fov_y_deg. Pure function
    of (data.synthetic.seed, identity, expression)."""
    k = synthetic.key(int(data_cfg.synthetic.seed), STREAM_CAMERA, int(identity_number), int(expression))
    u = np.asarray(jax.random.uniform(k, (n, 6)), np.float64)
    lo, hi = (float(x) for x in data_cfg.elevation_deg)
    r0, r1 = (float(x) for x in data_cfg.radius)
    az = np.deg2rad((2 * u[:, 0] - 1) * float(data_cfg.azimuth_deg))
    el = np.deg2rad(lo + (hi - lo) * u[:, 1])
    rad = r0 + (r1 - r0) * u[:, 2]
    target = np.asarray(data_cfg.target, np.float64) + (2 * u[:, 3:6] - 1) * float(data_cfg.target_jitter)
    eye = target + rad[:, None] * np.stack([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)], -1)
    R, t = camera_lib.look_at(eye.astype(np.float32), target.astype(np.float32))
    size = int(data_cfg.image_size)
    return camera_lib.camera_from_fov(float(data_cfg.fov_y_deg), size, size, R, t)


def _split_spec(data_cfg, split: str):
    if split == "train":
        first, count = data_cfg.train_identities
        return int(first), int(count), int(data_cfg.train_expressions), int(data_cfg.train_views)
    if split in ("val", "test"):
        first, count = data_cfg[f"{split}_identities"]
        return int(first), int(count), int(data_cfg.eval_expressions), int(data_cfg.eval_views)
    if split == "calib":
        first, count = data_cfg.get("calib_identities", (250_000, 0))
        return (int(first), int(count), int(data_cfg.get("calib_expressions", 1)),
                int(data_cfg.get("calib_views", 1)))
    raise ValueError(f"split must be 'train', 'val', 'test' or 'calib', got {split!r}")


@jax.jit
def _landmarks_2d(model, verts, cams):
    lmk = flame.embed_landmarks(verts[None], model.faces, model.lmk_faces, model.lmk_bary)[0]
    uv, _ = camera_lib.project(cams, lmk[None])
    return uv


def generate_split(data_cfg, split: str, *, assets=None, verbose: bool = True) -> dict:
    """Renders one split of image / neutral-shape pairs.

    Returns numpy arrays with N = identities x expressions x views: image [N, S, S, 3] uint8,
    lmk68 [N, 68, 2] and five [N, 5, 2] float32 pixels (projected ground-truth landmarks),
    shape [N, n_shape] float32, identity / expression / view [N] int32.
    """
    first, count, n_expr, n_views = _split_spec(data_cfg, split)
    if count < 1 or n_expr < 1 or n_views < 1:
        raise ValueError(f"split {split!r}: need at least one identity, expression and view, got "
                         f"{count}, {n_expr}, {n_views}")
    syn = data_cfg.synthetic.copy_and_resolve_references()
    syn.multiview.first_identity, syn.multiview.n_identities = first, count
    syn.multiview.n_expressions = n_expr
    if assets is None:
        if verbose:
            print("building the synthetic head assets ...", flush=True)
        assets = synthetic.build_assets(None, int(syn.uv_size))
    gen = synthetic.MultiviewGenerator(syn, assets)
    base = synthetic.base_model(assets)
    out = {k: [] for k in ("image", "lmk68", "shape", "identity", "expression", "view")}
    t0, last = time.time(), time.time()
    for i in range(count):
        number = gen.identity_number(i)
        ident = gen.identity(number)
        for e in range(n_expr):
            frame = gen.frame(i, e)
            cams = sample_cameras(data_cfg, number, e, n_views)
            views = synthetic.render_views(assets, ident, frame, cams, geometry=frame["geometry"])
            uv = _landmarks_2d(base, frame["geometry"][3], cams)
            out["image"].append(np.clip(np.round(np.asarray(views["image"]) * 255), 0, 255).astype(np.uint8))
            out["lmk68"].append(np.asarray(uv, np.float32))
            out["shape"].append(np.repeat(np.asarray(ident["shape"], np.float32)[None], n_views, 0))
            out["identity"].append(np.full(n_views, number, np.int32))
            out["expression"].append(np.full(n_views, e, np.int32))
            out["view"].append(np.arange(n_views, dtype=np.int32))
        if verbose and (time.time() - last > 15 or i + 1 == count):
            last = time.time()
            el = last - t0
            print(f"  mica data '{split}': {i + 1}/{count} identities ({(i + 1) * n_expr * n_views} images) "
                  f"in {el:.0f}s, ETA {el / (i + 1) * (count - i - 1):.0f}s", flush=True)
    data = {k: np.concatenate(v) for k, v in out.items()}
    data["five"] = np.asarray(align.five_points_from_68(data["lmk68"]), np.float32)
    return data


def _cache_key(data_cfg, split: str) -> dict:
    d = data_cfg.to_dict()
    d.pop("cache_dir", None)
    d.pop("landmark_noise_px", None)   # augmentation, applied at training time
    for s in ("train", "val", "test", "calib"):
        if s != split:
            d.pop(f"{s}_identities", None)
    counts = {"train": ("train_expressions", "train_views"), "eval": ("eval_expressions", "eval_views"),
              "calib": ("calib_expressions", "calib_views")}
    used = "eval" if split in ("val", "test") else split
    for group, keys in counts.items():
        if group != used:
            for k in keys:
                d.pop(k, None)
    return {"mica_data": d, "split": split, "format": DATA_FORMAT}


def _cache_path(data_cfg, split: str) -> Path:
    key = _cache_key(data_cfg, split)
    return cache_lib.cache_root(data_cfg.cache_dir or None) / f"mica-{cache_lib.config_hash(key)}" / f"{split}.npz"


def cached_split(data_cfg, split: str, *, assets=None, verbose: bool = True) -> dict:
    """`generate_split` once per (data config, split), cached as an npz under
    <cache>/mica-<hash>/<split>.npz (`dhjax.data.cache.cache_root`; written atomically)."""
    key = _cache_key(data_cfg, split)
    path = _cache_path(data_cfg, split)
    root = path.parent
    if path.exists():
        with np.load(path) as f:
            data = {k: f[k] for k in f.files}
        if verbose:
            print(f"mica data '{split}': {len(data['image'])} images from {path}", flush=True)
        return data
    first, count, n_expr, n_views = _split_spec(data_cfg, split)
    if verbose:
        print(f"generating mica data '{split}': identities {first}..{first + count - 1} x {n_expr} "
              f"expressions x {n_views} views at {data_cfg.image_size}px -> {path}", flush=True)
    data = generate_split(data_cfg, split, assets=assets, verbose=verbose)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{split}-", suffix=".npz", dir=root)
    os.close(fd)
    try:
        np.savez(tmp, **data)
        os.replace(tmp, path)
        (root / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True, default=str))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return data


def cached_splits(data_cfg, names: Sequence[str] = ("train", "val", "test"), *, verbose: bool = True) -> dict:
    """{name: `cached_split`} for several splits, building the generator's assets (~20 s) at
    most once, and only when some split is not cached yet."""
    missing = [n for n in names if not _cache_path(data_cfg, n).exists()]
    assets = None
    if missing:
        if verbose:
            print(f"building the synthetic head assets for the splits {missing} ...", flush=True)
        assets = synthetic.build_assets(None, int(data_cfg.synthetic.uv_size))
    return {n: cached_split(data_cfg, n, assets=assets, verbose=verbose) for n in names}


class split_dataset:  # noqa: N801 - a small dataset class used like a function
    """Random-access view of a split for `dhjax.data.dataset.Pipeline`: item i is
    {"image" [S, S, 3] uint8, "five" [5, 2], "shape" [n_shape]} plus "lmk68" [68, 2] (the
    landmark encoder's targets) when `landmarks` is set."""

    def __init__(self, data: Mapping[str, np.ndarray], landmarks: bool = False):
        self.keys = ("image", "five", "shape") + (("lmk68",) if landmarks else ())
        for k in self.keys:
            if k not in data:
                raise KeyError(f"mica data lacks '{k}' (has {sorted(data)})")
        self.data = data

    def __len__(self):
        return len(self.data["image"])

    def __getitem__(self, i: int) -> dict:
        return {k: self.data[k][int(i)] for k in self.keys}


def eval_batch(data: Mapping[str, np.ndarray], devices: int = 1, chunk: int = 32, kind: str = "iresnet") -> dict:
    """{"crops" [N, C, C, 3] uint8 (the encoder kind's crops at the exact five points), "shape"
    [N, S]} of a split, N truncated to a multiple of the device count and of `chunk` (when N >=
    chunk)."""
    n = len(data["image"])
    step = int(np.lcm(int(devices), int(chunk))) if n >= chunk else int(devices)
    n = (n // step) * step
    if n == 0:
        raise ValueError(f"{len(data['image'])} evaluation images cannot fill a batch of {step}")
    return {"crops": crop_batch(data["image"][:n], data["five"][:n], kind), "shape": data["shape"][:n]}


# ----------------------------------------------------------------------------------------------
# Mapping calibration (landmark encoder).

CALIBRATION_FILE = "mapping_calibration.npz"
"""The calibrated linear mapping of a landmark-encoder run (`save_calibration`), in its workdir."""


@functools.partial(jax.jit, static_argnames=("width",))
def _descriptors(heatmap_params, crops, *, width: int):
    pts = mlm.HeatmapNet(width=width).apply({"params": heatmap_params}, crops)
    return mlm.descriptor(pts)


def landmark_descriptors(variables, crops, batch_size: int = 64) -> np.ndarray:
    """Descriptors [N, 136] (`mica_landmarks.descriptor`) of the 68 landmarks the landmark
    network of `variables` finds in landmark crops [N, 96, 96, 3] (uint8 or floats in [0, 1]).
    The descriptor is similarity invariant, so crop and image pixels give the same one."""
    if variables_kind(variables) != "landmarks":
        raise ValueError("landmark_descriptors needs the variables of a landmark-encoder network "
                         "(encoder.kind 'landmarks')")
    hp = variables["params"]["heatmap"]
    width = int(hp["stem"]["kernel"].shape[-1])
    crops = np.asarray(check_crops(crops, "landmarks"))
    out = [np.asarray(_descriptors(hp, jnp.asarray(crops[i:i + batch_size]), width=width))
           for i in range(0, len(crops), batch_size)]
    return np.concatenate(out).astype(np.float64)


@jax.jit
def _aligned_errors(model, face, pred_shape, gt_shape):
    a = neutral_vertices(model, pred_shape)[:, face]
    b = neutral_vertices(model, gt_shape)[:, face]
    scale, R, t = alignment.umeyama(a, b, with_scale=False)
    return _MM * jnp.mean(jnp.linalg.norm(alignment.apply_similarity(scale, R, t, a) - b, axis=-1), axis=-1)


def aligned_face_errors_mm(model: flame.FlameModel, pred_shape, gt_shape, region: str = "face") -> np.ndarray:
    """Per item [N]: mean distance (mm) between the `region` vertices of the predicted and the
    true neutral mesh after the best rigid motion (Kabsch, no scale) of the prediction onto the
    truth. A fast, scan-free stand-in for the metric (rigid) benchmark; shapes [N, S]."""
    if region not in (model.regions or {}):
        raise ValueError(f"region {region!r} is not a region of model {model.name!r}")
    face = jnp.asarray(np.flatnonzero(np.asarray(model.regions[region])))
    pred = np.asarray(pred_shape, np.float32)
    gt = np.asarray(gt_shape, np.float32)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred_shape and gt_shape: expected two [N, S] arrays, got {pred.shape} and {gt.shape}")
    chunk = 128
    out = [np.asarray(_aligned_errors(model, face, jnp.asarray(pred[i:i + chunk]), jnp.asarray(gt[i:i + chunk])))
           for i in range(0, len(pred), chunk)]
    return np.concatenate(out).astype(np.float64)


def _ridge(X, Y, lam: float):
    mu, ym = X.mean(0), Y.mean(0)
    Xc = X - mu
    W = np.linalg.solve(Xc.T @ Xc + float(lam) * np.eye(X.shape[1]), Xc.T @ (Y - ym))
    return W, ym - mu @ W


def fit_linear_mapping(X, shapes, model: flame.FlameModel, *, lambdas, folds: int = 5, groups=None,
                       log=None) -> dict:
    """Ridge regression from descriptors to shape coefficients, its strength chosen by
    cross-validation on the metric error.

    For every ridge strength in `lambdas`, `folds`-fold cross-validation over identities
    (`groups`: all images of an identity in the same fold) scores the held-out predictions by
    `aligned_face_errors_mm`; the best strength is refitted on all items.

    Args:
      X: [N, D] descriptors; shapes: [N, S] true shape coefficients; groups: [N] identity
        numbers (default: every item its own identity).
    Returns:
      {"W" [D, S], "b" [S] (z = X W + b), "lam", "lambdas" [L], "cv_mm" [L] (mean held-out
       error per strength), "mean_face_mm" (the mean face's error on the same items)}.
    """
    X = np.asarray(X, np.float64)
    Y = np.asarray(shapes, np.float64)
    lambdas = [float(v) for v in lambdas]
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
        raise ValueError(f"X and shapes: expected [N, D] and [N, S] with the same N, got {X.shape} and {Y.shape}")
    if not lambdas or min(lambdas) <= 0:
        raise ValueError(f"lambdas: expected positive ridge strengths, got {lambdas}")
    if not (np.isfinite(X).all() and np.isfinite(Y).all()):
        raise ValueError("X and shapes must be finite")
    groups = np.arange(len(X)) if groups is None else np.asarray(groups)
    ids = np.unique(groups)
    folds = int(folds)
    if folds < 2 or len(ids) < folds:
        raise ValueError(f"cross-validation needs at least 2 folds and one identity per fold; got {folds} "
                         f"folds for {len(ids)} identities")
    fold_of = {int(n): i % folds for i, n in enumerate(np.random.default_rng(0).permutation(ids))}
    fold = np.asarray([fold_of[int(n)] for n in groups])
    cv = []
    for lam in lambdas:
        pred = np.zeros_like(Y)
        for f in range(folds):
            W, b = _ridge(X[fold != f], Y[fold != f], lam)
            pred[fold == f] = X[fold == f] @ W + b
        cv.append(float(aligned_face_errors_mm(model, pred, Y).mean()))
        if log:
            log(f"  ridge strength {lam:g}: cross-validated face error {cv[-1]:.3f} mm")
    lam = lambdas[int(np.argmin(cv))]
    W, b = _ridge(X, Y, lam)
    mean_face = float(aligned_face_errors_mm(model, np.zeros_like(Y), Y).mean())
    return {"W": W, "b": b, "lam": lam, "lambdas": np.asarray(lambdas), "cv_mm": np.asarray(cv),
            "mean_face_mm": mean_face}


def calibration_enabled(cfg) -> bool:
    """Whether a config calibrates the landmark encoder's mapping (`calibrate_mapping`); raises
    ValueError for settings that cannot work (another encoder kind, no calibration split)."""
    cal = cfg.get("calibration", None)
    if cal is None or not bool(cal.get("enabled", False)):
        return False
    if _check_kind(cfg.encoder.get("kind", "iresnet")) != "landmarks":
        raise ValueError("calibration.enabled needs the landmark encoder (encoder.kind='landmarks'); the "
                         "iresnet's mapping reads an identity embedding, which is what it memorises")
    _, count, _, _ = _split_spec(cfg.data, "calib")
    if count < 2 * int(cal.folds):
        raise ValueError(f"calibration.enabled needs a calibration split (data.calib_identities) of at least "
                         f"2 x calibration.folds = {2 * int(cal.folds)} identities, got {count}")
    return True


def calibrate_mapping(variables, data: Mapping[str, np.ndarray], model: flame.FlameModel, cal_cfg,
                      log=None) -> tuple[dict, dict]:
    """Refits the landmark encoder's mapping on landmarks it finds in images of identities it
    was not trained on.

    Why: trained on its own training images, the mapping network reads landmarks that the
    heatmap network has seen, which are more accurate than on new faces; on new faces the
    network also pulls its points towards a typical face. A mapping fitted on the network's
    landmarks of held-out identities (the calibration split: disjoint from train, validation and
    test) learns the relation as it holds at test time (cross-fitting). The mapping becomes one
    linear layer, z = descriptor W + b (`fit_linear_mapping`, ridge strength by cross-validated
    metric error); the heatmap network is kept as given.

    Args:
      variables: a landmark-encoder network's variables; data: the calibration split
        (`cached_split(cfg.data, "calib")`: image, five, shape, identity); cal_cfg: the config's
        `calibration` block (lambdas, folds).
    Returns:
      (variables with the linear mapping, the fit of `fit_linear_mapping` plus "n_images" and
      "n_identities").
    """
    crops = crop_batch(data["image"], data["five"], "landmarks")
    X = landmark_descriptors(variables, crops)
    fit = fit_linear_mapping(X, data["shape"], model, lambdas=tuple(cal_cfg.lambdas), folds=int(cal_cfg.folds),
                             groups=data["identity"], log=log)
    fit.update(n_images=int(len(X)), n_identities=int(len(np.unique(data["identity"]))))
    return with_linear_mapping(variables, fit["W"], fit["b"]), fit


def with_linear_mapping(variables, W, b) -> dict:
    """Landmark-encoder variables whose mapping is the single linear layer z = d W + b (d the
    [136] descriptor; W [136, S], b [S]), in `MappingNetwork`'s parameters (n_hidden = 0)."""
    W, b = np.asarray(W, np.float32), np.asarray(b, np.float32)
    mapping = {"output": {"kernel": jnp.asarray(W / OUTPUT_SCALE), "bias": jnp.asarray(b / OUTPUT_SCALE)}}
    return {"params": {"heatmap": variables["params"]["heatmap"], "mapping": mapping}, "batch_stats": {}}


def save_calibration(workdir, fit: Mapping[str, Any], step: int) -> Path:
    """Writes a calibration fit for checkpoint `step` to <workdir>/CALIBRATION_FILE (atomic)."""
    path = Path(workdir) / CALIBRATION_FILE
    fd, tmp = tempfile.mkstemp(prefix=".calibration-", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, W=np.asarray(fit["W"], np.float32), b=np.asarray(fit["b"], np.float32),
                 lam=float(fit["lam"]), lambdas=np.asarray(fit["lambdas"]), cv_mm=np.asarray(fit["cv_mm"]),
                 mean_face_mm=float(fit["mean_face_mm"]), step=int(step),
                 n_images=int(fit.get("n_images", -1)), n_identities=int(fit.get("n_identities", -1)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def calibrated_variables(workdir, state, step: int) -> dict:
    """The network a calibrated run predicts with: the heatmap network of the training state's
    last step (its landmarks keep improving while the uncalibrated shape error used for model
    selection does not tell) and the calibrated linear mapping of <workdir>/CALIBRATION_FILE.
    Raises FileNotFoundError when the run has not been calibrated, ValueError when the
    calibration belongs to another checkpoint."""
    path = Path(workdir) / CALIBRATION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"MICA run '{workdir}' calibrates its mapping (calibration.enabled) but has no "
                                f"{CALIBRATION_FILE}; finish it with python -m experiments.mica_train "
                                f"--workdir={workdir} (same config), which calibrates after training")
    with np.load(path) as f:
        cal = {k: f[k] for k in f.files}
    if int(cal["step"]) != int(step):
        raise ValueError(f"{path} was fitted for checkpoint {int(cal['step'])}, the latest checkpoint is {step}; "
                         f"rerun python -m experiments.mica_train --workdir={workdir} to recalibrate")
    return with_linear_mapping({"params": state["params"]}, cal["W"], cal["b"])


# ----------------------------------------------------------------------------------------------
# Metric benchmark on synthetic scans.


def synthetic_scans(model: flame.FlameModel, shapes, *, ids=None, seed: int = 0, noise_mm: float = 0.2,
                    n_points: int = 8000, region: str = "face", rotation_max_deg: float = 20.0,
                    translation_m: float = 0.05) -> list[dict]:
    """NoW-style scans of ground-truth neutral heads.

    Each scan: `n_points` points sampled uniformly on the faces of `region` (all three vertices
    inside; NoW crops its scans to the face) of the neutral mesh of `shapes[i]`, plus isotropic
    Gaussian noise of `noise_mm`, moved by a random rotation (up to `rotation_max_deg` about a
    random axis) and translation (U(-translation_m, translation_m) per axis); landmarks: the 7
    NoW landmarks of the noise-free mesh, moved likewise.

    Args:
      model: FlameModel with regions and a landmark embedding; shapes: [N, S] coefficients;
      ids: [N] identity numbers (default 0..N-1): scan i's randomness is a pure function of
        (seed, ids[i]), so an identity gets the same scan in any subset.
    Returns:
      list of N dicts {"points" [n_points, 3], "landmarks" [7, 3]} float32 metres, plus
      "R" [3, 3], "t" [3] (the applied transform, model -> scan).
    """
    shapes = np.asarray(shapes, np.float32)
    ids = np.arange(len(shapes)) if ids is None else np.asarray(ids)
    if ids.shape != (len(shapes),):
        raise ValueError(f"ids: expected [{len(shapes)}] identity numbers, got shape {ids.shape}")
    if region not in (model.regions or {}):
        raise ValueError(f"scan region {region!r} is not a region of model {model.name!r}")
    keep = np.asarray(model.regions[region])
    faces_all = np.asarray(model.faces)
    faces = jnp.asarray(faces_all[np.all(keep[faces_all], axis=1)])
    verts = neutral_vertices(model, shapes)
    lmk = neutral_landmarks(model, verts, NOW_LANDMARKS)
    scans = []
    for i in range(len(shapes)):
        k = jax.random.split(synthetic.key(seed, STREAM_SCAN, int(ids[i])), 4)
        pts, _, _ = mesh_lib.sample_surface(k[0], verts[i], faces, int(n_points))
        pts = pts + (float(noise_mm) / _MM) * jax.random.normal(k[1], pts.shape)
        axis = jax.random.normal(k[2], (3,))
        axis = axis / jnp.linalg.norm(axis)
        u = jax.random.uniform(k[3], (4,))
        angle = np.deg2rad(float(rotation_max_deg)) * u[0]
        R = rotations.axis_angle_to_matrix(axis * angle)
        t = float(translation_m) * (2 * u[1:] - 1)
        move = lambda x: x @ R.T + t  # noqa: E731
        scans.append(dict(points=np.asarray(move(pts), np.float32), landmarks=np.asarray(move(lmk[i]), np.float32),
                          R=np.asarray(R, np.float32), t=np.asarray(t, np.float32)))
    return scans


def mesh_prediction(model: flame.FlameModel, shape) -> dict:
    """{"vertices" [V, 3], "faces" [F, 3], "landmarks" [7, 3]} (NoW landmarks) of one neutral
    prediction, shape [S] -> the pred dict `dhjax.capture.metric.evaluate` takes."""
    v = neutral_vertices(model, np.asarray(shape, np.float32)[None])
    return dict(vertices=np.asarray(v[0], np.float32), faces=np.asarray(model.faces, np.int32),
                landmarks=np.asarray(neutral_landmarks(model, v, NOW_LANDMARKS)[0], np.float32))


def benchmark(model: flame.FlameModel, pred_shapes, gt_shapes, identities, *, seed: int = 0,
              noise_mm: float = 0.2, n_points: int = 8000, protocols=("metric", "scaled"),
              log=None) -> dict:
    """MICA vs the mean face on synthetic scans (`synthetic_scans`) through
    `dhjax.capture.metric.evaluate`.

    Args:
      pred_shapes: [N, S] MICA predictions of N images; gt_shapes: [N, S] their true shapes;
      identities: [N] identity numbers (one scan per identity; every image of an identity is
        evaluated against it; the mean face once per identity).
      protocols: "metric" (rigid alignment) and/or "scaled" (with scale, NoW's protocol).
    Returns:
      {row name ("MICA metric", "MICA scaled", "mean face metric", "mean face scaled"):
       metric.evaluate's result}.
    """
    from dhjax.capture import metric   # sibling module of the capture floor

    pred_shapes = np.asarray(pred_shapes, np.float32)
    gt_shapes = np.asarray(gt_shapes, np.float32)
    identities = np.asarray(identities)
    if not (len(pred_shapes) == len(gt_shapes) == len(identities)):
        raise ValueError(f"pred_shapes ({len(pred_shapes)}), gt_shapes ({len(gt_shapes)}) and identities "
                         f"({len(identities)}) must have the same length")
    ids, first = np.unique(identities, return_index=True)
    scans = synthetic_scans(model, gt_shapes[first], ids=ids, seed=seed, noise_mm=noise_mm, n_points=n_points)
    scan_of = {int(n): scans[j] for j, n in enumerate(ids)}
    mica_preds = [mesh_prediction(model, z) for z in pred_shapes]
    mica_scans = [scan_of[int(n)] for n in identities]
    mean = mesh_prediction(model, np.zeros(pred_shapes.shape[1], np.float32))
    rows = {}
    for proto in protocols:
        if proto not in ("metric", "scaled"):
            raise ValueError(f"protocol must be 'metric' or 'scaled', got {proto!r}")
        scale = proto == "scaled"
        for name, preds, sc in (("MICA", mica_preds, mica_scans), ("mean face", [mean] * len(scans), scans)):
            t0 = time.time()
            rows[f"{name} {proto}"] = metric.evaluate(preds, [dict(points=s["points"], landmarks=s["landmarks"])
                                                             for s in sc], with_scale=scale)
            if log:
                s = rows[f"{name} {proto}"]["summary"]
                log(f"  {name} {proto}: median {s['median_mm']:.3f} / mean {s['mean_mm']:.3f} / std "
                    f"{s['std_mm']:.3f} mm over {len(preds)} scans ({time.time() - t0:.0f}s)")
    return rows


def compare_per_identity(rows: Mapping[str, Mapping], identities, protocol: str = "metric", **kwargs) -> dict:
    """MICA against the mean face identity by identity (`dhjax.capture.metric.paired_comparison`).

    MICA's error of an identity is the mean over its images of their scans' mean scan-to-mesh
    error (mm); the mean face's is its one scan's. Negative differences mean MICA is better;
    'p_a_better' is the one-sided Wilcoxon p-value of "MICA's error is lower".

    Args:
      rows: `benchmark`'s result (with the "MICA <protocol>" and "mean face <protocol>" rows);
      identities: [N] the identity numbers of its N MICA predictions, as given to `benchmark`;
      protocol: "metric" or "scaled"; kwargs: passed to `paired_comparison`.
    Returns:
      `paired_comparison`'s dict plus "identities" (the identity numbers, ascending) and
      "mica_mm" / "mean_face_mm" (the per-identity errors compared).
    """
    from dhjax.capture import metric   # sibling module of the capture floor

    names = (f"MICA {protocol}", f"mean face {protocol}")
    missing = [n for n in names if n not in rows]
    if missing:
        raise ValueError(f"rows: missing {missing} (has {sorted(rows)}); run benchmark with protocol {protocol!r}")
    identities = np.asarray(identities)
    mica_scans, mean_scans = rows[names[0]]["per_scan"], rows[names[1]]["per_scan"]
    ids = np.unique(identities)
    if len(mica_scans) != len(identities) or len(mean_scans) != len(ids):
        raise ValueError(f"rows hold {len(mica_scans)} MICA and {len(mean_scans)} mean-face scans; "
                         f"expected {len(identities)} and {len(ids)} for these identities")
    per_scan = np.asarray([s["mean_mm"] for s in mica_scans])
    mica_mm = np.asarray([per_scan[identities == n].mean() for n in ids])
    mean_mm = np.asarray([s["mean_mm"] for s in mean_scans])
    out = metric.paired_comparison(mica_mm, mean_mm, **kwargs)
    out.update(identities=[int(n) for n in ids], mica_mm=mica_mm.tolist(), mean_face_mm=mean_mm.tolist())
    return out

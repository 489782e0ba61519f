"""MICA's neutral meshes and shape loss.

Loss (`loss_fn`): L1 between predicted and ground-truth neutral vertices (metres), weighted per
vertex by region (`region_weights`: face 150, back of head 1, eyes and ears 0.01, every other
vertex 1 in the thesis), averaged over batch, vertices and coordinates; the training step
multiplies it by `loss.scale` (1000, reference implementation). The neutral mesh is the head
model's forward pass with zero expression and pose, i.e. the shaped template
(`neutral_vertices`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.models import flame

_HI = jax.lax.Precision.HIGHEST
_MM = 1000.0


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

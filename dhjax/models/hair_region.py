"""The head's hair and beard areas: where on the head surface scalp hair and a beard can lie.

Head angles are measured around the centre of the ears (the model's `ears` region, `head_centre`):
azimuth phi = atan2(x, z) (0 in front, +x the subject's left) and polar angle theta from world
+y, in units of pi (0 at the top). A hairline (front / side / nape / sideburn heights, temple
recession) or a beard style (cheek line, reach under the chin) defines a coverage in [0, 1] over
these angles (`hair_weight`, `beard_weight`): a product of smoothsteps that reaches zero at the
area's edge. The constants are set on the embedded default head, where the brows lie at
theta ~ 0.36, the eyes 0.43, the mouth 0.69, the chin 0.81 and the ears at |phi| ~ 1.3..1.8.

`HAIR_MAX` and `max_beard_style` are the widest hairline and beard; `area_weights` evaluates them
on a model's template vertices and `hair_area` is their union without the eyeballs (the area a
hair layer of Gaussians covers, e.g. SynShot's 'hair' part). The synthetic generator's sampled
styles (`dhjax.data.hair`) stay inside these widest ones.

All coverage functions are pure JAX (jit/vmap friendly); style dicts hold scalar jnp arrays.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# Widest possible hairline (polar angles in units of pi; recede 0, the sideburns at their lowest).
HAIR_MAX = dict(front=0.31, side=0.64, nape=0.90, recede=0.0, sideburn=0.74)


def smoothstep(x):
    """3x^2 - 2x^3 of x clipped to [0, 1] (0 below 0, 1 above 1, zero slope at both ends)."""
    x = jnp.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def head_centre(model) -> np.ndarray:
    """Centre of the head used for head angles: the mean of the `ears` region, [3] metres."""
    if model.regions is None or "ears" not in model.regions:
        raise ValueError(f"model {model.name!r} has no 'ears' region; head angles (hair areas, synthetic "
                         "textures) need a model with region masks (the embedded default head has them)")
    ears = np.asarray(model.regions["ears"])
    return np.asarray(model.v_template)[ears].mean(0)


def head_angles(points, centre):
    """Azimuth and polar angle of points around the head centre.

    Args:
      points: [..., 3] metres; centre: [3] metres (the centre of the ears).
    Returns:
      phi: [...] radians in (-pi, pi], 0 in front (+z), positive towards +x;
      theta: [...] polar angle from +y in units of pi (0 top, 1 bottom).
    """
    d = jnp.asarray(points, jnp.float32) - jnp.asarray(centre, jnp.float32)
    r = jnp.maximum(jnp.linalg.norm(d, axis=-1), 1e-9)
    phi = jnp.arctan2(d[..., 0], d[..., 2])
    theta = jnp.arccos(jnp.clip(d[..., 1] / r, -1.0, 1.0)) / jnp.pi
    return phi, theta


def hair_weight(phi, theta, style: dict):
    """Hair coverage in [0, 1] of surface points (1 inside the hairline, 0 at and beyond it).

    Args:
      phi, theta: [...] head angles (`head_angles`); style: a dict with scalar front, side,
        nape, sideburn, recede (a sampled style of `dhjax.data.hair`, or `max_hair_style()`).
    Returns:
      [...] float32.
    """
    a = jnp.abs(phi) / jnp.pi                                   # 0 front, 1 back
    s1 = smoothstep((a - 0.20) / 0.22)                          # front -> side
    s2 = smoothstep((a - 0.52) / 0.25)                          # side -> back
    line = style["front"] * (1 - s1) + style["side"] * s1
    line = line * (1 - s2) + style["nape"] * s2
    line = line - style["recede"] * jnp.exp(-(((a - 0.17) / 0.06) ** 2))
    # Sideburns in front of the ears.
    burn = jnp.exp(-(((a - 0.40) / 0.035) ** 2))
    line = jnp.maximum(line, style["sideburn"] * burn)
    w = smoothstep((line - theta) / 0.07)
    return jnp.where(style["front"] > 0, w, 0.0).astype(jnp.float32)


def max_hair_style() -> dict:
    """The widest hairline (`HAIR_MAX`) as a style dict, with neutral values for the fields that
    shape the hair's thickness rather than its area."""
    s = {k: jnp.float32(v) for k, v in HAIR_MAX.items()}
    s.update(length=jnp.float32(1.0), part_phi=jnp.float32(0.0), part_depth=jnp.float32(0.0),
             volume=jnp.float32(0.0), wave=jnp.float32(0.0), wave_freq=jnp.float32(0.0),
             wave_phase=jnp.float32(0.0))
    return s


def _jawline(phi):
    """Polar angle (units of pi) of the jaw contour at azimuth phi (default head)."""
    c = jnp.clip(jnp.cos(jnp.abs(phi) / 1.33 * jnp.pi / 2), 0.0, 1.0)
    return 0.56 + 0.25 * c ** 0.7


def _away_from_mouth(phi, theta):
    d = jnp.sqrt((phi / 0.36) ** 2 + ((theta - 0.689) / 0.062) ** 2)
    return smoothstep((d - 1.0) / 0.35)


def beard_weight(phi, theta, beard: dict, style_override=None):
    """Beard coverage in [0, 1] at surface points (0 on the lips and at the beard's edge).

    Args:
      phi, theta: [...] head angles; beard: a dict with scalar style (index into
        `dhjax.data.hair.BEARD_STYLES`: 2 moustache, 3 goatee, other >= 1 full), cheek, lower
        (a sampled beard of `dhjax.data.hair`, or `max_beard_style()`); style_override: use this
        style index instead of beard["style"].
    Returns:
      [...] float32.
    """
    style = beard["style"] if style_override is None else style_override
    a = jnp.abs(phi)
    mouth = _away_from_mouth(phi, theta)
    cheek_line = 0.615 - (0.09 + beard["cheek"]) * smoothstep((a - 0.3) / 0.9)
    upper = smoothstep((theta - cheek_line) / 0.025)
    lower = 1.0 - smoothstep((theta - (_jawline(phi) + beard["lower"])) / 0.04)
    sides = 1.0 - smoothstep((a - 1.2) / 0.12)
    full = upper * lower * sides * mouth
    moustache = smoothstep((theta - 0.612) / 0.012) * (1 - smoothstep((a - 0.30) / 0.08)) * (
        1 - smoothstep((theta - 0.64) / 0.02)) * mouth
    goatee = (1 - smoothstep((a - 0.28) / 0.1)) * smoothstep((theta - 0.72) / 0.02) * lower * mouth
    w = jnp.select([style == 2, style == 3, style >= 1], [moustache, jnp.maximum(moustache, goatee), full],
                   jnp.zeros_like(full))
    return w.astype(jnp.float32)


def max_beard_style() -> dict:
    """Widest beard (the full beard with the largest reach under the chin and up the cheeks)."""
    return dict(style=jnp.int32(4), length=jnp.float32(1.0), stubble=jnp.float32(0.0),
                colour=jnp.zeros(3, jnp.float32), lower=jnp.float32(0.07), cheek=jnp.float32(0.04))


def area_weights(model) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Head angles and the widest hair and beard coverage of the model's template vertices.

    Returns: phi [V] radians, theta [V] (units of pi), hair [V] and beard [V] coverage in [0, 1]
    (float32 numpy).
    """
    tmpl = np.asarray(model.v_template)
    phi, theta = (np.asarray(a) for a in head_angles(tmpl, head_centre(model)))
    hw = np.asarray(hair_weight(phi, theta, max_hair_style()))
    bw = np.asarray(beard_weight(phi, theta, max_beard_style()))
    return phi, theta, hw, bw


def hair_area(model) -> np.ndarray:
    """Per-vertex weight [V] float32 in [0, 1] of the area hair or a beard may cover: the larger
    of the widest hair and beard coverages, 0 on the eyeballs (the model's `eyes` region)."""
    _, _, hw, bw = area_weights(model)
    if model.regions is not None and "eyes" in model.regions:
        eyes = np.asarray(model.regions["eyes"])
        hw, bw = np.where(eyes, 0, hw), np.where(eyes, 0, bw)
    return np.maximum(hw, bw).astype(np.float32)

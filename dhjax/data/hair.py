"""Hair and beard of synthetic heads: sampled styles and their thickness fields over the head.

A style is a handful of scalars (hairline heights, length, parting, volume, colour). It defines
a thickness field over the head surface, in metres, as a function of the head angles of a
surface point (`head_angles`): the hair proxy is a shell obtained by offsetting the scalp along
its normals by that thickness, the beard proxy the same over the jaw. Every field is a product of
smoothsteps that reach zero at the region's edge, so a shell meets the skin without a step and
never "explodes" at its boundary. The same fields colour the albedo texture (short hair and
stubble are texture only), so shell and texture agree.

Head angles are measured around the centre of the ears (the model's `ears` region): azimuth
phi = atan2(x, z) (0 in front, +x the subject's left) and polar angle theta from world +y, in
units of pi (0 at the top). The constants below are calibrated on the embedded default head,
where the brows lie at theta ~ 0.36, the eyes 0.43, the mouth 0.69, the chin 0.81 and the ears
at |phi| ~ 1.3..1.8; they are a proxy, not a model of real hair.

All functions are pure JAX (jit/vmap friendly); style dicts hold scalar jnp arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HAIR_STYLES = ("bald", "buzz", "short", "medium", "long", "parted")
BEARD_STYLES = ("none", "stubble", "moustache", "goatee", "full")
# Sampling probabilities of the styles.
HAIR_STYLE_PROBS = np.array([0.08, 0.12, 0.25, 0.2, 0.2, 0.15])
# Relative probabilities of the beard styles given that there is facial hair.
BEARD_STYLE_PROBS = np.array([0.0, 0.4, 0.15, 0.15, 0.3])

# Hair colours (albedo, display RGB): black, dark brown, brown, auburn, copper, dark blond,
# blond, platinum, grey, white.
HAIR_COLOURS = np.array([
    [0.030, 0.025, 0.022], [0.080, 0.050, 0.032], [0.18, 0.11, 0.06], [0.30, 0.12, 0.05],
    [0.55, 0.25, 0.10], [0.40, 0.29, 0.16], [0.66, 0.52, 0.30], [0.82, 0.74, 0.56],
    [0.45, 0.44, 0.43], [0.80, 0.79, 0.77]], np.float32)
HAIR_COLOUR_PROBS = np.array([0.24, 0.2, 0.15, 0.05, 0.05, 0.09, 0.08, 0.04, 0.06, 0.04])

# Per style: (shell length min, max) metres, front hairline (min, max), side hairline (min,
# max), nape (min, max) in units of pi of theta, and texture coverage of the scalp.
_HAIR_TABLE = np.array([
    # len_lo  len_hi  front_lo front_hi side_lo side_hi nape_lo nape_hi cover
    [0.000, 0.000, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.0],   # bald
    [0.000, 0.000, 0.22, 0.28, 0.38, 0.44, 0.62, 0.68, 0.85],  # buzz (texture only)
    [0.004, 0.012, 0.22, 0.28, 0.38, 0.44, 0.62, 0.70, 1.0],   # short
    [0.012, 0.024, 0.23, 0.30, 0.44, 0.52, 0.68, 0.76, 1.0],   # medium
    [0.016, 0.030, 0.23, 0.31, 0.56, 0.64, 0.82, 0.90, 1.0],   # long
    [0.010, 0.022, 0.23, 0.29, 0.42, 0.50, 0.66, 0.74, 1.0],   # parted
], np.float32)
# Widest possible hair region (for the fixed superset of shell vertices).
_HAIR_MAX = dict(front=0.31, side=0.64, nape=0.90, recede=0.0, sideburn=0.74)

_BEARD_TABLE = np.array([
    # len_lo len_hi stubble_lo stubble_hi
    [0.000, 0.000, 0.0, 0.0],      # none
    [0.000, 0.000, 0.35, 0.8],     # stubble (texture only)
    [0.003, 0.007, 0.0, 0.3],      # moustache
    [0.004, 0.009, 0.0, 0.3],      # goatee
    [0.003, 0.012, 0.2, 0.5],      # full
], np.float32)


def _smoothstep(x):
    x = jnp.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def wrap_angle(x):
    """Angles [...] wrapped to [-pi, pi)."""
    return jnp.mod(x + jnp.pi, 2 * jnp.pi) - jnp.pi


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


def draws(key, n: int):
    """n independent U(0, 1) scalars from one call (one PRNG kernel: cheap to compile)."""
    return jax.random.uniform(key, (n,))


def choice(u, probs):
    """Index drawn from the categorical `probs` [K] by inverse CDF of a uniform scalar u."""
    cdf = jnp.cumsum(jnp.asarray(probs, jnp.float32))
    cdf = cdf / cdf[-1]
    return jnp.sum(u > cdf[:-1]).astype(jnp.int32)


def sample_hair(key) -> dict:
    """A random hair style.

    Returns a dict of scalar jnp arrays: style (int32, index into HAIR_STYLES), length (shell
    thickness at the crown, metres), front / side / nape (hairline polar angles, units of pi),
    sideburn (lowest theta of the sideburns), recede (temple recession), part_phi (azimuth of
    the parting, radians), part_depth (0..1), volume (extra thickness on top, fraction), wave
    (thickness ripple amplitude, fraction), wave_freq, wave_phase, cover (texture coverage of
    the scalp, 0..1), colour [3] (albedo), grey (fraction of grey hairs).
    """
    u = draws(key, 18)
    lerp = lambda i, lo, hi: lo + (hi - lo) * u[i]
    style = choice(u[0], HAIR_STYLE_PROBS)
    row = jnp.asarray(_HAIR_TABLE)[style]
    colour_id = choice(u[1], HAIR_COLOUR_PROBS)
    colour = jnp.asarray(HAIR_COLOURS)[colour_id] * lerp(2, 0.85, 1.15)
    grey = jnp.where(u[3] < 0.15, lerp(4, 0.1, 0.6), 0.0)
    parted = style == HAIR_STYLES.index("parted")
    part_side = jnp.where(u[5] < 0.3, 0.0, 1.0) * jnp.sign(u[6] - 0.5)
    return dict(
        style=style,
        length=lerp(7, row[0], row[1]),
        front=lerp(8, row[2], row[3]), side=lerp(9, row[4], row[5]), nape=lerp(10, row[6], row[7]),
        sideburn=(row[4] + lerp(11, 0.04, 0.10)) * (row[8] > 0),
        recede=jnp.where(u[12] < 0.25, lerp(13, 0.02, 0.06), 0.0),
        part_phi=part_side * 0.30,
        part_depth=jnp.where(parted, 0.85, 0.0),
        volume=lerp(14, 0.0, 0.5),
        wave=lerp(15, 0.0, 0.25),
        wave_freq=lerp(16, 4.0, 9.0),
        wave_phase=lerp(17, 0.0, 2 * np.pi),
        cover=row[8],
        colour=colour.astype(jnp.float32),
        grey=grey,
    )


def sample_beard(key, hair: dict, beard_prob: float = 0.45) -> dict:
    """A random beard style, coloured like the hair (a bit darker).

    Facial hair appears with probability `beard_prob`, its style then drawn from
    BEARD_STYLE_PROBS. Returns a dict of scalar jnp arrays: style (int32, index into
    BEARD_STYLES), length (shell thickness, metres; 0 for none/stubble), stubble (texture
    density 0..1), colour [3], lower (extra reach under the chin, units of pi), cheek (height of
    the cheek line, units of pi).
    """
    u = draws(key, 8)
    lerp = lambda i, lo, hi: lo + (hi - lo) * u[i]
    style = jnp.where(u[1] < beard_prob, choice(u[0], BEARD_STYLE_PROBS), 0)
    row = jnp.asarray(_BEARD_TABLE)[style]
    colour = hair["colour"] * lerp(2, 0.7, 1.0)
    bald_like = hair["cover"] <= 0
    colour = jnp.where(bald_like, jnp.array([0.12, 0.08, 0.05]) * lerp(6, 0.5, 1.5), colour)
    return dict(
        style=style.astype(jnp.int32),
        length=lerp(3, row[0], row[1]),
        stubble=lerp(4, row[2], row[3]),
        colour=colour.astype(jnp.float32),
        lower=lerp(5, 0.02, 0.07),
        cheek=lerp(7, 0.0, 0.04),
    )


def hair_weight(phi, theta, style: dict):
    """Hair coverage in [0, 1] of surface points (1 inside the hairline, 0 at and beyond it).

    Args:
      phi, theta: [...] head angles (`head_angles`); style: `sample_hair` dict (or the
        superset style of `max_hair_style`).
    Returns:
      [...] float32.
    """
    a = jnp.abs(phi) / jnp.pi                                   # 0 front, 1 back
    s1 = _smoothstep((a - 0.20) / 0.22)                         # front -> side
    s2 = _smoothstep((a - 0.52) / 0.25)                         # side -> back
    line = style["front"] * (1 - s1) + style["side"] * s1
    line = line * (1 - s2) + style["nape"] * s2
    line = line - style["recede"] * jnp.exp(-(((a - 0.17) / 0.06) ** 2))
    # Sideburns in front of the ears.
    burn = jnp.exp(-(((a - 0.40) / 0.035) ** 2))
    line = jnp.maximum(line, style["sideburn"] * burn)
    w = _smoothstep((line - theta) / 0.07)
    return jnp.where(style["front"] > 0, w, 0.0).astype(jnp.float32)


def hair_thickness(phi, theta, style: dict):
    """Shell thickness (metres) of the hair at surface points; 0 at the hairline.

    Args:
      phi, theta: [...] head angles; style: `sample_hair` dict.
    Returns:
      [...] float32 metres (0 for bald and buzz styles, which are texture only).
    """
    w = hair_weight(phi, theta, style)
    crown = _smoothstep((0.45 - theta) / 0.3)
    dphi = wrap_angle(phi - style["part_phi"])
    groove = jnp.exp(-((dphi * jnp.sin(jnp.pi * theta) / 0.08) ** 2)) * (
        _smoothstep((theta - 0.06) / 0.06) * _smoothstep((style["front"] + 0.03 - theta) / 0.04))
    # Integer azimuthal frequency (continuous across the back seam), fading out at the crown.
    ripple = 1.0 + style["wave"] * jnp.sin(jnp.round(style["wave_freq"]) * phi + style["wave_phase"]) * (
        jnp.sin(style["wave_freq"] * 2.1 * theta) * jnp.sin(jnp.pi * theta))
    t = style["length"] * jnp.sqrt(w) * w * (1.0 + style["volume"] * crown) * (
        1.0 - style["part_depth"] * groove) * ripple
    return jnp.maximum(t, 0.0).astype(jnp.float32)


def max_hair_style() -> dict:
    """The widest hair region any style can cover (thickness > 0 wherever a style may have hair)."""
    s = {k: jnp.float32(v) for k, v in _HAIR_MAX.items()}
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
    return _smoothstep((d - 1.0) / 0.35)


def beard_weight(phi, theta, beard: dict, style_override=None):
    """Beard coverage in [0, 1] at surface points (0 on the lips and at the beard's edge).

    Args:
      phi, theta: [...] head angles; beard: `sample_beard` dict; style_override: use this
        style index instead of beard["style"] (`max_beard_weight` uses "full").
    Returns:
      [...] float32.
    """
    style = beard["style"] if style_override is None else style_override
    a = jnp.abs(phi)
    mouth = _away_from_mouth(phi, theta)
    cheek_line = 0.615 - (0.09 + beard["cheek"]) * _smoothstep((a - 0.3) / 0.9)
    upper = _smoothstep((theta - cheek_line) / 0.025)
    lower = 1.0 - _smoothstep((theta - (_jawline(phi) + beard["lower"])) / 0.04)
    sides = 1.0 - _smoothstep((a - 1.2) / 0.12)
    full = upper * lower * sides * mouth
    moustache = _smoothstep((theta - 0.612) / 0.012) * (1 - _smoothstep((a - 0.30) / 0.08)) * (
        1 - _smoothstep((theta - 0.64) / 0.02)) * mouth
    goatee = (1 - _smoothstep((a - 0.28) / 0.1)) * _smoothstep((theta - 0.72) / 0.02) * lower * mouth
    w = jnp.select([style == 2, style == 3, style >= 1], [moustache, jnp.maximum(moustache, goatee), full],
                   jnp.zeros_like(full))
    return w.astype(jnp.float32)


def beard_thickness(phi, theta, beard: dict):
    """Shell thickness (metres) of the beard; 0 for no beard and stubble (texture only)."""
    w = beard_weight(phi, theta, beard)
    return (beard["length"] * jnp.sqrt(w) * w).astype(jnp.float32)


def max_beard_style() -> dict:
    """Widest beard region (the full beard with the largest reach), for the shell superset."""
    return dict(style=jnp.int32(4), length=jnp.float32(1.0), stubble=jnp.float32(0.0),
                colour=jnp.zeros(3, jnp.float32), lower=jnp.float32(0.07), cheek=jnp.float32(0.04))

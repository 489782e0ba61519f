"""Hair and beard of synthetic heads: sampled styles and their thickness fields over the head.

A style is a handful of scalars (hairline heights, length, parting, volume, colour). It defines
a thickness field over the head surface, in metres, as a function of the head angles of a
surface point (`head_angles`): the hair proxy is a shell obtained by offsetting the scalp along
its normals by that thickness, the beard proxy the same over the jaw. Every field is a product of
smoothsteps that reach zero at the region's edge, so a shell meets the skin without a step and
never "explodes" at its boundary. The same fields colour the albedo texture (short hair and
stubble are texture only), so shell and texture agree.

Head angles (`head_angles`), the hairline and beard coverage functions and the widest hair and
beard areas are the head model's (`dhjax.models.hair_region`, re-exported here); the sampled
styles stay inside those widest areas. The constants are a proxy, not a model of real hair.

All functions are pure JAX (jit/vmap friendly); style dicts hold scalar jnp arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import special as jsp_special

from dhjax.models.hair_region import (beard_weight, hair_weight, head_angles, max_beard_style,  # noqa: F401
                                      max_hair_style)
from dhjax.models.hair_region import smoothstep as _smoothstep

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

_BEARD_TABLE = np.array([
    # len_lo len_hi stubble_lo stubble_hi
    [0.000, 0.000, 0.0, 0.0],      # none
    [0.000, 0.000, 0.35, 0.8],     # stubble (texture only)
    [0.003, 0.007, 0.0, 0.3],      # moustache
    [0.004, 0.009, 0.0, 0.3],      # goatee
    [0.003, 0.012, 0.2, 0.5],      # full
], np.float32)


def wrap_angle(x):
    """Angles [...] wrapped to [-pi, pi)."""
    return jnp.mod(x + jnp.pi, 2 * jnp.pi) - jnp.pi


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


def sample_beard(key, hair: dict, beard_prob: float = 0.45, factor=None,
                 factor_corr: float = 0.0) -> dict:
    """A random beard style, coloured like the hair (a bit darker).

    Facial hair appears with probability `beard_prob`, its style then drawn from
    BEARD_STYLE_PROBS. With a latent `factor` (scalar, ~N(0, 1); the sex-linked factor of
    `dhjax.data.synthetic.sample_identity`'s correlated sampler) and `factor_corr` = rho != 0,
    presence follows a liability-threshold (probit) model: a latent liability
    rho * factor + sqrt(1 - rho^2) * e, e ~ N(0, 1), exceeds the threshold that a standard
    normal exceeds with probability `beard_prob`. Marginally over the factor the rate is then
    exactly `beard_prob`, while P(beard | factor) rises with the factor for rho > 0. With
    factor=None or rho = 0 the draw is the plain `u < beard_prob` (the same bits as before).

    Returns a dict of scalar jnp arrays: style (int32, index into BEARD_STYLES), length (shell
    thickness, metres; 0 for none/stubble), stubble (texture density 0..1), colour [3], lower
    (extra reach under the chin, units of pi), cheek (height of the cheek line, units of pi).
    """
    u = draws(key, 8)
    lerp = lambda i, lo, hi: lo + (hi - lo) * u[i]
    presence = u[1]
    if factor is not None and float(factor_corr) != 0.0:
        rho = float(factor_corr)
        if not -1.0 < rho < 1.0:
            raise ValueError(f"factor_corr must lie in (-1, 1), got {rho}")
        # u[1] -> a standard normal e; Phi(sqrt(1 - rho^2) e - rho factor) is again U(0, 1)
        # marginally (its argument is N(0, 1)), and small (beard) when the factor is large.
        e = jsp_special.ndtri(jnp.clip(u[1], 1e-7, 1.0 - 1e-7))
        presence = jsp_special.ndtr(np.sqrt(1.0 - rho * rho) * e - rho * factor)
    style = jnp.where(presence < beard_prob, choice(u[0], BEARD_STYLE_PROBS), 0)
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


def beard_thickness(phi, theta, beard: dict):
    """Shell thickness (metres) of the beard; 0 for no beard and stubble (texture only)."""
    w = beard_weight(phi, theta, beard)
    return (beard["length"] * jnp.sqrt(w) * w).astype(jnp.float32)

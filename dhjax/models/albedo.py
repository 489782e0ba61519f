"""A linear albedo model in a head model's UV layout: mean + principal components.

The metrical tracker of the thesis (MICA's tracker) explains a face's appearance with a linear
albedo model, solved on the first frame and then kept fixed:

    texture(c) = mean + sum_k c_k sigma_k basis_k          (k < K', the first K' components)

`AlbedoModel` holds mean [A, A, 3], basis [K, A, A, 3] (each component of unit Frobenius norm
over its A * A * 3 values) and sigma [K], the standard deviation of the data along each
component in the same units. Coefficients are in units of standard deviations, so the natural
prior of a fit is simply sum_k c_k^2 (a standard normal on c).

Texture layout: the same as `dhjax.render.shading.sample_texture` and the tracker's albedo
texture. Texel (row i, column j) of an A x A map has its centre at (u, v) = ((j + 0.5) / A,
1 - (i + 0.5) / A): u to the right, v up, row 0 at the top (v = 1). Channels are RGB; values
are reflectances around [0, 1], used as they are (no gamma curve is applied anywhere here).

A model only fits the UV layout it was built in:

* `dhjax.data.albedo_synthetic.build_synthetic` builds a model in the layout of the embedded
  default head (`flame.load()`): a PCA (`fit_pca`) of the procedural albedos of synthetic
  identities (`dhjax.data.synthetic`), resampled to A x A. The identities are drawn with the
  synthetic seed `SYNTHETIC_SEED_BASE + seed` (23000 for seed=0), indices 0 .. n_identities - 1,
  whereas the tracker's synthetic benchmark (`configs/track.py`, `capture.track_run.synthetic_sequence`) and
  the other generators use seed 0 (video identities 1_000_000 + sequence, multiview identities
  0, 1, ...): no benchmark sequence shows a training identity. Indices >= n_identities of the
  same seed are held out (the tests use them).
* `load` reads the licensed FLAME albedo files, which live in FLAME's own UV layout (the `vt`/
  `ft` of ``FLAME_texture.npz`` / ``head_template.obj``). The embedded default head has a
  different, procedural UV layout, so a FLAME albedo is meaningless on it. Use it with the
  official FLAME model loaded with its UV layout, e.g. ``flame.load("generic_model.pkl",
  uv="FLAME_texture.npz")`` (or ``uv="head_template.obj"``), which reads the layout through
  `dhjax.io.flame_files.load_flame_uv`.

File layouts read by `load` (found in the public loaders cited; none of the files ships here):

* BFM-style, keys ``MU`` and ``PC`` (``FLAME_albedo_from_BFM.npz``, written by
  TimoBolkart/BFM_to_FLAME ``col_to_tex.py``; also AlbedoMM's FLAME release
  ``albedoModel2020_FLAME_albedoPart.npz``, which adds ``specMU``/``specPC``/``vt``/``ft``).
  ``col_to_tex.py`` saves ``MU`` flat [H * W * 3] and ``PC`` [H * W * 3, K] (H = W = 512,
  K = 199); the AlbedoMM release stores ``MU`` [512, 512, 3] and ``PC`` [512, 512, 3, 145].
  Both reshape to [H, W, 3(, K)] in C order, which is how DECA's and MICA's tracker's
  ``FLAMETex`` read them (``reshape(1, -1)`` / ``reshape(-1, n_pc)``).
  Conversions: channels are stored BGR (``col_to_tex.py`` writes each texel with ``[..., ::-1]``
  of the BFM's RGB colour; DECA's and Zielon/metrical-tracker's ``flame/FLAME.py`` ``FLAMETex``
  reorder ``[2, 1, 0]`` after evaluating), so they are reversed to RGB. Values are already in
  0..1 (the BFM 2017 colour model; metrical-tracker multiplies by 255 to get 8-bit values), so
  they are not scaled. Each column of ``PC`` is a basis vector times the square root of its
  variance (``col_to_tex.py`` evaluates the BFM colour model at coefficient e_k with
  ``diag(sqrt(pcaVariance))`` applied, minus the mean), i.e. the standard deviation is folded
  in and a coefficient is in standard deviations: sigma_k = ||PC_k||, basis_k = PC_k / sigma_k.
  The specular part of AlbedoMM (``specMU``/``specPC``) is not read.
* FLAME-texture-style, keys ``mean`` [512, 512, 3] and ``tex_dir`` [512, 512, 3, 200] (plus
  ``vt``, ``ft``) (``FLAME_texture.npz``, TimoBolkart/TF_FLAME ``sample_texture.py``).
  Conversions: values are 0..255 (TF_FLAME clips samples to [0, 255] before ``cv2.imwrite``;
  DECA's ``FLAMETex`` divides ``mean`` and ``tex_dir`` by 255), so both are divided by 255;
  channels are BGR (written with ``cv2.imwrite``; DECA reorders ``[2, 1, 0]``), so they are
  reversed. TF_FLAME samples coefficients with ``np.random.randn``, so the standard deviation
  is folded into ``tex_dir`` as above.
* dhjax's own layout (written by `save`): ``mean`` [A, A, 3], ``basis`` [K, A, A, 3],
  ``sigma`` [K], ``name``; no conversion.

Vertical orientation: no flip for any of them. BFM_to_FLAME maps texel row y to
v = 1 - (y + 0.5) / H (its cached grid uses ``h - h * vt[:, 1]``) and DECA samples the maps
with ``v -> -v`` in ``grid_sample``, both putting row 0 at v = 1, which is dhjax's convention.
Colour space: values are used as stored. AlbedoMM's README says its model is built in linear
sRGB; the BFM-derived and FLAME_texture spaces come from photographs' colours and are not
documented as linear.

Resampling (`resample`): to a smaller size each output texel is the area-weighted mean of the
input texels it covers (an exact box filter for integer factors); to a larger size, bilinear
interpolation at the output texel centres (clamped at the borders). Both are linear, so a
resampled model is the model of the resampled textures (the basis is renormalised and sigma
rescaled accordingly).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dhjax.geometry import pca as pca_lib

__all__ = [
    "AlbedoModel", "LAYOUTS", "texture", "fit_texture", "resample", "fit_pca", "load", "save",
]

_HI = jax.lax.Precision.HIGHEST

#: File layouts `load` recognises and the keys that identify each.
LAYOUTS = {
    "bfm": ("MU", "PC"),
    "flame_texture": ("mean", "tex_dir"),
    "dhjax": ("mean", "basis", "sigma"),
}

_FORMAT_VERSION = 1
_CHUNK = 16  # components converted and resampled at a time (bounds the float64 working copy)


@flax.struct.dataclass
class AlbedoModel:
    """A linear albedo model in a head model's UV layout (a pytree; arrays float32).

    Fields:
      mean: [A, A, 3] mean albedo, RGB reflectance around [0, 1] (texel layout: module docstring).
      basis: [K, A, A, 3] components by decreasing variance, each of unit Frobenius norm.
      sigma: [K] standard deviation of the data along each component (albedo units, over the
        A * A * 3 values), so texture = mean + sum_k c_k sigma_k basis_k with c ~ N(0, 1).
      name: where the model came from (static, not a pytree leaf).
    """

    mean: jax.Array
    basis: jax.Array
    sigma: jax.Array
    name: str = flax.struct.field(pytree_node=False, default="")

    @property
    def size(self) -> int:
        """A, the texture size."""
        return int(self.mean.shape[0])

    @property
    def n_components(self) -> int:
        """K, the number of components."""
        return int(self.basis.shape[0])


def _check_model(model: AlbedoModel, where: str):
    m, b, s = (tuple(np.shape(x)) for x in (model.mean, model.basis, model.sigma))
    if len(m) != 3 or m[2] != 3 or m[0] != m[1]:
        raise ValueError(f"{where}: model.mean must have shape [A, A, 3], got {m}")
    if len(b) != 4 or b[1:] != m:
        raise ValueError(f"{where}: model.basis must have shape [K, A, A, 3] = [K, {m[0]}, {m[1]}, 3], got {b}")
    if s != (b[0],):
        raise ValueError(f"{where}: model.sigma must have shape [K] = [{b[0]}], got {s}")


def texture(model: AlbedoModel, coeffs) -> jax.Array:
    """The albedo texture of coefficients: mean + sum_k coeffs_k sigma_k basis_k.

    Pure jnp: jit, vmap and grad work through it (w.r.t. coeffs and the model's arrays).

    Args:
      model: AlbedoModel with mean [A, A, 3], basis [K, A, A, 3], sigma [K].
      coeffs: [..., K'] float, K' <= K: the first K' components, in standard deviations
        (a prior is sum coeffs^2). K' = 0 gives the mean.
    Returns:
      [..., A, A, 3] float32 albedo (not clipped).
    """
    _check_model(model, "texture")
    c = jnp.asarray(coeffs, jnp.float32)
    if c.ndim < 1:
        raise ValueError(f"texture: coeffs must have shape [..., K'], got a scalar {c.shape}")
    k = c.shape[-1]
    if k > model.n_components:
        raise ValueError(f"texture: {k} coefficients given but the model has only "
                         f"K = {model.n_components} components")
    mean = jnp.asarray(model.mean, jnp.float32)
    if k == 0:
        return jnp.broadcast_to(mean, c.shape[:-1] + mean.shape)
    scaled = c * jnp.asarray(model.sigma, jnp.float32)[:k]
    offset = jnp.einsum("...k,kijc->...ijc", scaled, jnp.asarray(model.basis, jnp.float32)[:k],
                        precision=_HI)
    return mean + offset


def fit_texture(model: AlbedoModel, target, n_components: int, weights=None,
                ridge: float = 1e-4) -> jax.Array:
    """Least-squares coefficients of a texture under the N(0, 1) coefficient prior (ridge).

    Minimises sum_texels w * ||texture(model, c) - target||^2 + ridge * ||c||^2 over the first
    `n_components` coefficients: the MAP estimate when the target's texels carry Gaussian noise
    of variance `ridge` (per value, weight 1) and c ~ N(0, I). Solved in closed form (normal
    equations with Jacobi scaling, float32 at full matmul precision); pure jnp, jittable
    (n_components static).

    Args:
      model: AlbedoModel (mean [A, A, 3], basis [K, A, A, 3], sigma [K]).
      target: [A, A, 3] albedo texture to explain (same layout and units as model.mean).
      n_components: K', 0 <= K' <= K.
      weights: None (all 1), [A, A] or [A, A, 3] non-negative texel weights (e.g. 0 outside the
        observed region).
      ridge: > 0 (float or traced scalar), albedo^2 units: the noise variance against the unit
        prior on c.
    Returns:
      [K'] float32 coefficients in standard deviations.
    """
    _check_model(model, "fit_texture")
    A = model.size
    k = int(n_components)
    if not 0 <= k <= model.n_components:
        raise ValueError(f"fit_texture: n_components={k} must be in [0, K = {model.n_components}]")
    if not isinstance(ridge, jax.core.Tracer) and not float(ridge) > 0.0:
        raise ValueError(f"fit_texture: ridge must be > 0, got {ridge}")
    t = jnp.asarray(target, jnp.float32)
    if t.shape != (A, A, 3):
        raise ValueError(f"fit_texture: target must have shape [A, A, 3] = {(A, A, 3)}, got {t.shape}")
    if weights is None:
        w = jnp.ones((A, A, 3), jnp.float32)
    else:
        w = jnp.asarray(weights, jnp.float32)
        if w.shape == (A, A):
            w = w[..., None]
        if w.shape not in ((A, A, 1), (A, A, 3)):
            raise ValueError(f"fit_texture: weights must have shape [A, A] or [A, A, 3] with A = {A}, "
                             f"got {jnp.shape(weights)}")
        if not isinstance(w, jax.core.Tracer) and bool(jnp.any(w < 0)):
            raise ValueError("fit_texture: weights must be non-negative")
        w = jnp.broadcast_to(w, (A, A, 3))
    if k == 0:
        return jnp.zeros((0,), jnp.float32)
    cols = (jnp.asarray(model.basis, jnp.float32)[:k]
            * jnp.asarray(model.sigma, jnp.float32)[:k, None, None, None]).reshape(k, -1)
    wf = w.reshape(-1)
    resid = (t - jnp.asarray(model.mean, jnp.float32)).reshape(-1)
    gram = jnp.einsum("kd,ld->kl", cols * wf, cols, precision=_HI) + ridge * jnp.eye(k, dtype=jnp.float32)
    rhs = jnp.einsum("kd,d->k", cols * wf, resid, precision=_HI)
    # Jacobi scaling: unit diagonal, so components of very different sigma are solved alike.
    d = 1.0 / jnp.sqrt(jnp.diagonal(gram))
    y = jnp.linalg.solve(gram * d[:, None] * d[None, :], rhs * d)
    return (y * d).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Resampling (host, numpy).


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float64 linear map between texel rows (or columns) of a [0, 1] interval."""
    if n_out == n_in:
        return np.eye(n_in)
    m = np.zeros((n_out, n_in))
    if n_out < n_in:
        # Area weights: overlap of output texel [i, i + 1] / n_out with input [j, j + 1] / n_in.
        for i in range(n_out):
            lo, hi = i / n_out, (i + 1) / n_out
            j0, j1 = int(math.floor(lo * n_in)), min(n_in, int(math.ceil(hi * n_in)))
            for j in range(j0, j1):
                m[i, j] = max(0.0, min(hi, (j + 1) / n_in) - max(lo, j / n_in))
        return m / m.sum(axis=1, keepdims=True)
    # Bilinear at the output texel centres, clamped to the input's texel centres.
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1.0)
    x0 = np.floor(x).astype(int)
    x1 = np.minimum(x0 + 1, n_in - 1)
    f = x - x0
    np.add.at(m, (np.arange(n_out), x0), 1.0 - f)
    np.add.at(m, (np.arange(n_out), x1), f)
    return m


def resample(maps, size: int) -> np.ndarray:
    """Resamples UV maps to size x size (area mean when shrinking, bilinear when enlarging).

    Rows and columns are resampled separably over the unit square, so the texel-centre
    convention (module docstring) is kept: a box filter of f x f texels for an integer factor f.

    Args:
      maps: [H, W, ...] float (any trailing dims, e.g. [H, W, 3] or [H, W, 3, K]).
      size: output size S >= 1.
    Returns:
      [S, S, ...] float64 numpy array.
    """
    x = np.asarray(maps, np.float64)
    if x.ndim < 2:
        raise ValueError(f"resample: maps must have shape [H, W, ...], got {x.shape}")
    size = int(size)
    if size < 1:
        raise ValueError(f"resample: size must be >= 1, got {size}")
    H, W = x.shape[:2]
    if (H, W) == (size, size):
        return x
    rows, cols = _resample_matrix(H, size), _resample_matrix(W, size)
    flat = x.reshape(H, W, -1)
    out = np.einsum("ah,hwc->awc", rows, flat)
    out = np.einsum("bw,awc->abc", cols, out)
    return out.reshape((size, size) + x.shape[2:])


def _from_components(mean, comps, name: str) -> AlbedoModel:
    """AlbedoModel from mean [A, A, 3] and per-std components [K, A, A, 3] (float64 ok)."""
    comps = np.asarray(comps, np.float64)
    sigma = np.sqrt(np.sum(comps.reshape(comps.shape[0], -1) ** 2, axis=1))
    safe = np.where(sigma > 0, sigma, 1.0)
    basis = comps / safe[:, None, None, None]
    return AlbedoModel(mean=jnp.asarray(mean, jnp.float32), basis=jnp.asarray(basis, jnp.float32),
                       sigma=jnp.asarray(sigma, jnp.float32), name=name)


def fit_pca(albedos, n_components: int, *, name: str = "", method: str = "auto",
            log: Callable | None = None) -> AlbedoModel:
    """A PCA albedo model (`dhjax.geometry.pca.fit`) of example textures.

    Args:
      albedos: [N, A, A, 3] textures (N >= 2) in one UV layout.
      n_components: K, 1 <= K <= N - 1.
      name: where the model came from; method: `pca.fit`'s method; log: progress or None.
    Returns:
      AlbedoModel (mean [A, A, 3], basis [K, A, A, 3] = the PCA's orthonormal components,
      sigma [K] = their standard deviations, n - 1 denominator).
    """
    x = np.asarray(albedos, np.float32)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"fit_pca: albedos must have shape [N, A, A, 3], got {x.shape}")
    n, size, k = x.shape[0], x.shape[1], int(n_components)
    if n < 2 or not 1 <= k <= n - 1:
        raise ValueError(f"fit_pca: needs N >= 2 textures and 1 <= n_components <= N - 1, got N={n}, "
                         f"n_components={k}")
    if not np.all(np.isfinite(x)):
        raise ValueError("fit_pca: albedos have non-finite values")
    t0 = time.time()
    p = pca_lib.fit(x.reshape(n, -1), k, method=method)
    ratio = np.asarray(p.explained_variance_ratio, np.float64)
    if log is not None:
        log(f"albedo: PCA of {n} albedos ({size} x {size}), {k} components explain "
            f"{100 * ratio.sum():.1f} % of the variance (first: {100 * ratio[0]:.1f} %), "
            f"{time.time() - t0:.1f} s")
    return AlbedoModel(
        mean=jnp.asarray(p.mean, jnp.float32).reshape(size, size, 3),
        basis=jnp.asarray(p.components, jnp.float32).reshape(k, size, size, 3),
        sigma=jnp.asarray(p.sigma, jnp.float32), name=str(name))


# ----------------------------------------------------------------------------------------------
# Files.


def save(path: str | os.PathLike, model: AlbedoModel) -> Path:
    """Writes the model to an npz at exactly `path` (keys mean, basis, sigma, name, version).

    Args:
      path: output file (any suffix; written atomically via a temporary file).
      model: AlbedoModel (mean [A, A, 3], basis [K, A, A, 3], sigma [K]).
    Returns:
      The path written. `load(path)` gives the model back.
    """
    _check_model(model, "save")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, mean=np.asarray(model.mean, np.float32), basis=np.asarray(model.basis, np.float32),
                 sigma=np.asarray(model.sigma, np.float32), name=np.str_(model.name),
                 dhjax_albedo_version=np.int32(_FORMAT_VERSION))
    os.replace(tmp, path)
    return path


def _detect_layout(keys, source: str) -> str:
    found = [name for name, need in LAYOUTS.items() if all(k in keys for k in need)]
    if "dhjax" in found:
        return "dhjax"
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ValueError(f"{source}: holds the keys of several layouts {found}; pass layout= one of them")
    expected = "; ".join(f"{name}: {list(need)}" for name, need in LAYOUTS.items())
    raise ValueError(f"{source}: missing keys: expected one of the albedo layouts ({expected}), "
                     f"found keys {sorted(keys)}")


def _image_shape(mean: np.ndarray, key: str, source: str) -> tuple[int, int]:
    """(H, W) of a mean stored as [H, W, 3] or flat (1 x) H * W * 3 with H = W."""
    if mean.ndim == 3 and mean.shape[2] == 3:
        return int(mean.shape[0]), int(mean.shape[1])
    if mean.ndim in (1, 2) and (mean.ndim == 1 or mean.shape[0] == 1) and mean.size % 3 == 0:
        side = int(round(math.sqrt(mean.size // 3)))
        if side * side * 3 == mean.size and side > 0:
            return side, side
    raise ValueError(f"{source}: key '{key}' has shape {mean.shape}, expected [H, W, 3] or a flat "
                     f"[H * W * 3] with H = W")


def _components(pcs: np.ndarray, key: str, H: int, W: int, source: str) -> int:
    """K of a component array stored as [H, W, 3, K] or [H * W * 3, K]."""
    if pcs.shape[:3] == (H, W, 3) and pcs.ndim == 4:
        return int(pcs.shape[3])
    if pcs.ndim == 2 and pcs.shape[0] == H * W * 3:
        return int(pcs.shape[1])
    raise ValueError(f"{source}: key '{key}' has shape {pcs.shape}, expected [H, W, 3, K] = "
                     f"[{H}, {W}, 3, K] or [H * W * 3, K] = [{H * W * 3}, K] (H, W from the mean)")


def _finite(x: np.ndarray, key: str, source: str):
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{source}: key '{key}' holds {bad} non-finite values (NaN or inf)")


def load(path: str | os.PathLike, n_components: int | None = None, size: int | None = None, *,
         layout: str | None = None) -> AlbedoModel:
    """Reads an albedo model: a FLAME albedo file or one written by `save`.

    Layouts and conversions (details and sources in the module docstring):
      'bfm' (keys MU, PC: ``FLAME_albedo_from_BFM.npz``, AlbedoMM's FLAME npz): BGR -> RGB,
        values kept (0..1), std folded into PC.
      'flame_texture' (keys mean, tex_dir: ``FLAME_texture.npz``): / 255, BGR -> RGB, std
        folded into tex_dir.
      'dhjax' (keys mean, basis, sigma: `save`): as stored.
    A FLAME file's albedo is in FLAME's UV layout, not the default head's: use it with
    ``flame.load(<FLAME pkl>, uv=<FLAME_texture.npz or head_template.obj>)``.

    Args:
      path: the npz file.
      n_components: keep the first K components (None: all in the file).
      size: resample to size x size (`resample`); None keeps the file's resolution (which must
        then be square).
      layout: force 'bfm' | 'flame_texture' | 'dhjax' (default: from the keys).
    Memory: numpy reads an npz member whole, so the full component array is in memory once
    (``FLAME_texture.npz``'s tex_dir is 512 x 512 x 3 x 200 values); the conversion then works
    on 16 components at a time.
    Returns:
      AlbedoModel with mean [A, A, 3] RGB in ~[0, 1], basis [K, A, A, 3] (unit norm), sigma [K].
    Raises:
      FileNotFoundError: no such file (named).
      ValueError: not an npz; missing keys (the expected and found keys are listed); wrong
        shapes; non-finite values; values outside the layout's range (e.g. 0..255 values in a
        'bfm' file); n_components or size out of range.
    """
    from dhjax.io._common import existing_file

    path = existing_file(path)
    source = str(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{source}: not a readable npz file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{source}: expected an npz archive of arrays, found a single array")
    with npz:
        keys = list(npz.files)
        if layout is None:
            layout = _detect_layout(keys, source)
        elif layout not in LAYOUTS:
            raise ValueError(f"load: layout must be one of {list(LAYOUTS)}, got {layout!r}")
        missing = [k for k in LAYOUTS[layout] if k not in keys]
        if missing:
            raise ValueError(f"{source}: missing keys {missing} of layout {layout!r}; found keys {sorted(keys)}")
        if layout == "dhjax":
            return _load_dhjax(npz, source, n_components, size)
        mean_key, pc_key = LAYOUTS[layout]
        mean = np.asarray(npz[mean_key])
        pcs = np.asarray(npz[pc_key])
    for key, arr in ((mean_key, mean), (pc_key, pcs)):
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{source}: key '{key}' has dtype {arr.dtype}, expected numbers")
    H, W = _image_shape(mean, mean_key, source)
    K_file = _components(pcs, pc_key, H, W, source)
    K = _n_keep(n_components, K_file, source)
    out_size = _out_size(size, H, W, source)
    scale = 1.0 / 255.0 if layout == "flame_texture" else 1.0

    def convert(x):  # [H, W, 3, ...] stored values -> RGB albedo at out_size
        x = np.asarray(x, np.float64)[:, :, ::-1] * scale
        return resample(x, out_size)

    mean_img = mean.reshape(H, W, 3)
    _finite(mean_img, mean_key, source)
    mean_rgb = convert(mean_img)
    _check_range(mean_rgb, layout, mean_key, source)
    pcs4 = pcs.reshape(H, W, 3, K_file)
    comps = np.empty((K, out_size, out_size, 3), np.float64)
    for k0 in range(0, K, _CHUNK):
        chunk = pcs4[..., k0:min(K, k0 + _CHUNK)]
        _finite(chunk, pc_key, source)
        comps[k0:k0 + chunk.shape[-1]] = np.moveaxis(convert(chunk), -1, 0)
    conv = {"bfm": "BGR->RGB, 0..1 kept", "flame_texture": "BGR->RGB, /255"}[layout]
    return _from_components(mean_rgb, comps, f"{source} ({layout} layout: {conv}; {K} of {K_file} "
                                             f"components; {H}x{W} -> {out_size}x{out_size})")


def _n_keep(n_components, K_file: int, source: str) -> int:
    if n_components is None:
        return K_file
    k = int(n_components)
    if not 1 <= k <= K_file:
        raise ValueError(f"{source}: n_components={k} must be in [1, {K_file}] (the file's components)")
    return k


def _out_size(size, H: int, W: int, source: str) -> int:
    if size is None:
        if H != W:
            raise ValueError(f"{source}: the texture is {H} x {W}, not square; pass size= to resample it")
        return H
    if int(size) < 1:
        raise ValueError(f"load: size must be >= 1, got {size}")
    return int(size)


def _check_range(mean_rgb: np.ndarray, layout: str, key: str, source: str):
    """Catches a file in the other value range (0..255 where 0..1 is expected, or the reverse)."""
    lo, hi = float(mean_rgb.min()), float(mean_rgb.max())
    stored = {"bfm": "0..1", "flame_texture": "0..255", "dhjax": "0..1"}[layout]
    if lo < -0.5 or hi > 1.5 or hi < 0.02:
        raise ValueError(
            f"{source}: key '{key}' gives albedo values in [{lo:.4g}, {hi:.4g}] after the {layout!r} "
            f"conversion, expected about [0, 1]: a {layout!r} file stores {stored} values (is the "
            f"file in another range or layout?)")


def _load_dhjax(npz, source: str, n_components, size) -> AlbedoModel:
    mean, basis, sigma = (np.asarray(npz[k]) for k in ("mean", "basis", "sigma"))
    name = str(npz["name"]) if "name" in npz.files else source
    if mean.ndim != 3 or mean.shape[2] != 3:
        raise ValueError(f"{source}: key 'mean' has shape {mean.shape}, expected [A, A, 3]")
    H, W = mean.shape[:2]
    if basis.ndim != 4 or basis.shape[1:] != mean.shape:
        raise ValueError(f"{source}: key 'basis' has shape {basis.shape}, expected [K, {H}, {W}, 3]")
    if sigma.shape != (basis.shape[0],):
        raise ValueError(f"{source}: key 'sigma' has shape {sigma.shape}, expected [K] = [{basis.shape[0]}]")
    K = _n_keep(n_components, int(basis.shape[0]), source)
    out_size = _out_size(size, H, W, source)
    for key, arr in (("mean", mean), ("basis", basis[:K]), ("sigma", sigma[:K])):
        _finite(arr, key, source)
    _check_range(mean.astype(np.float64), "dhjax", "mean", source)
    if out_size == H and H == W:
        return AlbedoModel(mean=jnp.asarray(mean, jnp.float32), basis=jnp.asarray(basis[:K], jnp.float32),
                           sigma=jnp.asarray(sigma[:K], jnp.float32), name=name)
    comps = basis[:K].astype(np.float64) * sigma[:K, None, None, None]
    comps = np.moveaxis(resample(np.moveaxis(comps, 0, -1), out_size), -1, 0)
    return _from_components(resample(mean, out_size), comps, f"{name} (resampled to {out_size})")

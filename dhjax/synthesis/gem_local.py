"""Localised GEM: one PCA per face region instead of one global PCA per attribute, and its
comparison with the global GEM at equal size (the thesis's future-work item, section A.4).

A global GEM (`gem.distil`) stores, per attribute a (position, rotation, scale, opacity, with
A_a = 3, 4, 3, 1 values per Gaussian and D_a = G A_a values per frame), one mean [D_a] and one
basis [M, D_a]; a frame is M coefficients per attribute. A **local** GEM splits the G Gaussians
into R disjoint regions (`region_assignment`: mouth/jaw, nose, eyes, forehead, rest) and fits one
PCA of M components per region and attribute (`dhjax.geometry.pca.fit_local`): region r's PCA
spans only its G_r Gaussians' values, so an expression of the mouth need not move the forehead's
coefficients. A frame is then R x M coefficients per attribute.

Sizes ("equal size", `equal_size_components`). Every Gaussian belongs to exactly one region, so
the R local bases of M components hold sum_r M G_r A_a = M D_a floats, exactly the size of one
global basis of M components; the means are the same size too (D_a). What grows is the
coefficient vector: R M instead of M per attribute (plus R M instead of M sigmas and the region
label of each Gaussian). Two comparisons therefore make sense and `compare` reports both:

  * at equal size: local M per region vs global M (the same bases' megabytes, R times the
    coefficients);
  * at equal coefficient count: local floor(M / R) per region vs global M (no more coefficients
    per frame than the global model, 1 / R of its basis size).

`size_bytes` states the exact byte counts. Units: positions metres, rotations unit quaternions
(w, x, y, z), scales log metres, opacities logits; images [C, H, W, 3] in [0, 1].
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.data import textures
from dhjax.geometry import pca as pca_lib
from dhjax.render import camera as camera_lib
from dhjax.render import splat
from dhjax.synthesis import gem

ATTRIBUTES = gem.ATTRIBUTES
ATTRIBUTE_DIMS = gem.ATTRIBUTE_DIMS

# ----------------------------------------------------------------------------------------------
# Regions.

REST = "rest"
JAW_SKINNING = "jaw_skinning"   # a source that is not a mask: the jaw joint's skinning weight
JAW_JOINT = 2                   # FLAME's joints: global, neck, jaw, left eye, right eye
REGION_GROUPS = (
    ("mouth", ("lips", JAW_SKINNING)),
    ("nose", ("nose",)),
    ("eyes", ("eyes", "eye_region", "left_eyeball", "right_eyeball", "left_eye_region",
              "right_eye_region")),
    ("forehead", ("forehead",)),
)
"""The named regions, in tie-break order, each with its source masks (the names of the head
model's region masks, `FlameModel.regions`; the default head's names and the official FLAME
mask names; a source the model lacks is skipped). Every other Gaussian is `REST`."""


class RegionAssignment(NamedTuple):
    """Regions of a subject's Gaussians.

    labels: [G] int32 in [0, R), the region of each Gaussian (every region non-empty);
    names: R names, names[r] the name of region r (in `REGION_GROUPS` order, then `REST`);
    counts: [R] int64, the number of Gaussians of each region.
    """

    labels: np.ndarray
    names: tuple
    counts: np.ndarray


def region_scores(ctx: gem.Context) -> dict:
    """Per-Gaussian membership of each named region: {name: [G] float32 in [0, 1]}.

    The score of a region is the largest value, at the Gaussian's texel, of its source masks
    (`REGION_GROUPS`): the model's region masks interpolated on the UV layout
    (`ctx.fields.regions`), and for `JAW_SKINNING` the jaw joint's LBS weight baked on the same
    layout (the skin the jaw moves: chin, lower lip, the jaw's underside). A region none of whose
    sources the model has scores 0 everywhere.
    """
    texel = np.asarray(ctx.texel)
    masks = dict(ctx.fields.regions or {})
    out = {}
    for name, sources in REGION_GROUPS:
        score = np.zeros(texel.shape[0], np.float32)
        for src in sources:
            if src == JAW_SKINNING:
                w = np.asarray(ctx.model.lbs_weights)
                if w.ndim != 2 or w.shape[1] <= JAW_JOINT:
                    continue
                m = np.asarray(textures.bake(ctx.fields, ctx.model.faces, jnp.asarray(w[:, JAW_JOINT:JAW_JOINT + 1])))
                m = m[..., 0]
            elif src in masks:
                m = np.asarray(masks[src])
            else:
                continue
            score = np.maximum(score, np.clip(m.reshape(-1)[texel], 0.0, 1.0).astype(np.float32))
        out[name] = score
    return out


def region_assignment(ctx: gem.Context, *, min_items: int = 16, threshold: float = 0.5) -> RegionAssignment:
    """Assigns every Gaussian of a subject to one face region.

    Mapping (`REGION_GROUPS`; default head's mask names first, official FLAME's after):
      mouth    = lips, and the jaw joint's skinning weight (chin, lower lip, jaw underside);
      nose     = nose;
      eyes     = eyes (eyeballs), eye_region (lids, around the eyes);
      forehead = forehead (up to and including the brows);
      rest     = everything else (cheeks, scalp, back of the head, ears, neck).
    Each Gaussian goes to the named region of largest score (`region_scores`, ties to the first
    in the order above) when that score is >= threshold, else to rest. Then every named region
    with fewer than `min_items` Gaussians is merged into rest; if rest itself ends up with
    0 < count < min_items Gaussians, they are merged into the largest named region, which is then
    called "<name>+rest". Empty regions are dropped; labels are 0..R-1 in the order above.

    Args:
      ctx: the subject's `gem.Context` (its model needs region masks; the default head has them).
      min_items: the fewest Gaussians a region may have (>= 1); a local PCA of M components
        needs M <= G_r (opacity has one value per Gaussian).
      threshold: the score in (0, 1] a Gaussian needs to join a named region.
    Returns:
      `RegionAssignment(labels [G] int32, names (R,), counts [R])`.
    Raises:
      ValueError: min_items < 1 or > G, threshold outside (0, 1].
    """
    G = ctx.n_gaussians
    if int(min_items) != min_items or not 1 <= int(min_items) <= G:
        raise ValueError(f"min_items={min_items} must be an integer in [1, G={G}] (the subject's Gaussians)")
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold} must be in (0, 1]")
    min_items = int(min_items)
    scores = region_scores(ctx)
    names = [name for name, _ in REGION_GROUPS]
    s = np.stack([scores[n] for n in names], 1)                     # [G, R_named]
    best = np.argmax(s, axis=1)                                     # first on ties
    rest = len(names)
    raw = np.where(s[np.arange(G), best] >= float(threshold), best, rest)
    counts = np.bincount(raw, minlength=rest + 1)
    for j in range(rest):
        if counts[j] < min_items:
            raw[raw == j] = rest
    counts = np.bincount(raw, minlength=rest + 1)
    all_names = names + [REST]
    if 0 < counts[rest] < min_items and counts[:rest].any():
        j = int(np.argmax(counts[:rest]))
        raw[raw == rest] = j
        all_names[j] = f"{all_names[j]}+{REST}"
        counts = np.bincount(raw, minlength=rest + 1)
    present = np.flatnonzero(counts)
    remap = np.full(rest + 1, -1, np.int64)
    remap[present] = np.arange(present.size)
    labels = remap[raw].astype(np.int32)
    return RegionAssignment(labels=labels, names=tuple(all_names[j] for j in present),
                            counts=counts[present].astype(np.int64))


def region_labels(ctx: gem.Context, *, min_items: int = 16, threshold: float = 0.5) -> np.ndarray:
    """The region of each Gaussian: [G] int32 in [0, R) (`region_assignment(...).labels`; its
    `.names` give the regions' names)."""
    return region_assignment(ctx, min_items=min_items, threshold=threshold).labels


# ----------------------------------------------------------------------------------------------
# The local eigenmodel.


class LocalEigenModel(NamedTuple):
    """A localised GEM.

    pca: {attribute: `pca.LocalPCA`} with the same R regions (items: the Gaussian indices of each
      region) and M components for every attribute; region r's PCA has mean [G_r A],
      components [M, G_r A] (the region's Gaussians' values flattened Gaussian-major) and sigma [M];
    sh: [G, K, 3] colours (not in the PCA, as in GEM); sh_degree; background [3].
    """

    pca: dict
    sh: jax.Array
    sh_degree: int
    background: tuple

    @property
    def n_components(self) -> int:
        """Components per region and attribute."""
        return int(self.pca["position"].pcas[0].components.shape[0])

    @property
    def n_regions(self) -> int:
        """Number of face regions."""
        return len(self.pca["position"].pcas)

    @property
    def n_gaussians(self) -> int:
        """Number of Gaussians G."""
        return int(self.sh.shape[0])


jax.tree_util.register_pytree_node(
    LocalEigenModel,
    lambda m: ((m.pca, m.sh), (m.sh_degree, m.background)),
    lambda aux, ch: LocalEigenModel(*ch, *aux))

# One XLA computation per call instead of R eager gathers/scatters (each compiled on its own).
_project_local = jax.jit(pca_lib.project_local)


def region_index(model: LocalEigenModel) -> np.ndarray:
    """[G] int32: the row r of the coefficients [R, M] that drives each Gaussian."""
    out = np.empty(model.n_gaussians, np.int32)
    for r, idx in enumerate(model.pca["position"].items):
        out[np.asarray(idx)] = r
    return out


def _check_collected(collected: Mapping, name: str) -> tuple[int, int]:
    missing = [a for a in ATTRIBUTES if a not in collected]
    if missing:
        raise ValueError(f"{name} lacks attributes {missing}; expected a dict with {list(ATTRIBUTES)}")
    N = G = None
    for a in ATTRIBUTES:
        shp = tuple(np.shape(collected[a]))
        if len(shp) != 3 or shp[2] != ATTRIBUTE_DIMS[a]:
            raise ValueError(f"{name}['{a}'] must be [N, G, {ATTRIBUTE_DIMS[a]}], got shape {shp}")
        if N is None:
            N, G = shp[0], shp[1]
        elif shp[:2] != (N, G):
            raise ValueError(f"{name}['{a}'] has shape {shp}, but {name}['{ATTRIBUTES[0]}'] has "
                             f"N={N} frames of G={G} Gaussians")
    return int(N), int(G)


def _check_labels(labels, G: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.shape != (G,) or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be [G] int with G={G} (the Gaussians), got shape {lab.shape} "
                         f"dtype {lab.dtype}")
    return lab


def distil_local(collected: Mapping, sh, n_components: int, labels, *, sh_degree: int,
                 background=(1.0, 1.0, 1.0), method: str = "auto") -> tuple[LocalEigenModel, dict]:
    """One PCA per region and attribute (the local counterpart of `gem.distil`).

    Args:
      collected: {attribute: [N, G, A]} head-frame attributes of N training frames.
      sh: [G, K, 3] colours, K = (sh_degree + 1)^2.
      n_components: M per region, 1 <= M <= min(N - 1, G_r) for every region (G_r: its Gaussians).
      labels: [G] int region of each Gaussian (`region_labels`; any integers, R distinct values).
      sh_degree, background: as in `gem.distil`; method: `pca.fit`'s method.
    Returns:
      (LocalEigenModel, k {attribute: [N, R, M]} the frames' coefficients; row r is the region of
      the r-th smallest label).
    Raises:
      ValueError: missing or misshapen attributes, labels or sh; M out of range for a region.
    """
    N, G = _check_collected(collected, "collected")
    lab = _check_labels(labels, G)
    sh = jnp.asarray(sh, jnp.float32)
    if not 0 <= int(sh_degree) <= 3:
        raise ValueError(f"sh_degree={sh_degree} must be in 0..3")
    K = splat.num_sh_bases(sh_degree)
    if sh.ndim != 3 or sh.shape[0] != G or sh.shape[1] < K or sh.shape[2] != 3:
        raise ValueError(f"sh must be [G, K, 3] with G={G}, K >= (sh_degree + 1)^2 = {K}, got shape "
                         f"{tuple(sh.shape)}")
    M = int(n_components)
    if M != n_components or not 1 <= M <= N - 1:
        raise ValueError(f"n_components={n_components} must be an integer in [1, N - 1] = [1, {N - 1}] "
                         f"for N={N} training frames")
    uniq, counts = np.unique(lab, return_counts=True)
    small = [(int(u), int(c)) for u, c in zip(uniq, counts) if c < M]
    if small:
        raise ValueError(f"n_components={M} exceeds the Gaussians of regions (label, Gaussians) {small}: "
                         f"a region's opacity PCA has G_r dimensions; merge regions or lower M")
    lpca, k = {}, {}
    for a in ATTRIBUTES:
        x = np.asarray(collected[a], np.float32)
        lpca[a] = pca_lib.fit_local(x, lab, M, method=method)
        k[a] = jnp.asarray(_project_local(lpca[a], jnp.asarray(x)), jnp.float32)
    model = LocalEigenModel(lpca, sh, int(sh_degree), tuple(float(b) for b in background))
    return model, k


def check_coefficients(model: LocalEigenModel, k: Mapping) -> None:
    """Raises ValueError unless k holds every attribute with [..., R, M] values."""
    missing = [a for a in ATTRIBUTES if a not in k]
    if missing:
        raise ValueError(f"coefficients lack {missing}; expected a dict with {list(ATTRIBUTES)}")
    R, M = model.n_regions, model.n_components
    for a in ATTRIBUTES:
        shp = tuple(jnp.shape(k[a]))
        if shp[-2:] != (R, M):
            raise ValueError(f"coefficients '{a}' must be [..., R, M] = [..., {R}, {M}] for a local GEM of "
                             f"{R} regions and {M} components each, got shape {shp}")


def zero_coefficients(model: LocalEigenModel) -> dict:
    """{attribute: zeros [R, M]}: the mean Gaussians."""
    return {a: jnp.zeros((model.n_regions, model.n_components), jnp.float32) for a in ATTRIBUTES}


def _attributes(pca: Mapping, k: Mapping) -> dict:
    attrs = {a: pca_lib.reconstruct_local(pca[a], jnp.asarray(k[a], jnp.float32)) for a in ATTRIBUTES}
    q = attrs["rotation"]
    attrs["rotation"] = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    return attrs


_attributes_jit = jax.jit(_attributes)


def local_attributes(model: LocalEigenModel, k: Mapping) -> dict:
    """Head-frame attributes {attribute: [..., G, A]} of coefficients k {attribute: [..., R, M]}:
    each Gaussian from its region's mean + k[r] @ basis (rotations renormalised, as in
    `gem.eigen_attributes`). Jit-compatible (jitted inside)."""
    check_coefficients(model, k)
    return _attributes_jit(model.pca, {a: k[a] for a in ATTRIBUTES})


@functools.partial(jax.jit, static_argnames=("backend",))
def _render(model: LocalEigenModel, k: Mapping, cameras, background, backend: str):
    attrs = _attributes(model.pca, k)
    return splat.rasterize(attrs["position"], attrs["rotation"], jnp.exp(attrs["scale"]),
                           jax.nn.sigmoid(attrs["opacity"][:, 0]), model.sh, cameras, sh_degree=model.sh_degree,
                           background=background, backend=backend).image


def render_local(model: LocalEigenModel, k: Mapping, cameras: camera_lib.Camera, *, background=None,
                 backend: str = "auto") -> jax.Array:
    """Renders a local GEM with coefficients k {attribute: [R, M]} into head-frame cameras [C]
    (`gem.head_cameras`): image [C, H, W, 3] in [0, 1], on `background` ([3] or [C, 3]; default
    the model's). No network; the same splatting as `gem.render` (`splat.rasterize`), jitted."""
    check_coefficients(model, k)
    for a in ATTRIBUTES:
        if jnp.ndim(k[a]) != 2:
            raise ValueError(f"render_local renders one frame: coefficients '{a}' must be [R, M] = "
                             f"[{model.n_regions}, {model.n_components}], got shape {tuple(jnp.shape(k[a]))}")
    bg = jnp.asarray(model.background if background is None else background, jnp.float32)
    return _render(model, {a: jnp.asarray(k[a], jnp.float32) for a in ATTRIBUTES}, cameras, bg, backend)


def size_bytes(model: LocalEigenModel) -> int:
    """Bytes of a local GEM stored in float32 (means, bases, sigmas, colours) plus its region
    index ([G] int32, one label per Gaussian, shared by the attributes).

    With D_a = G A_a and R regions of M components: sum_a (D_a + M D_a + R M) floats + G K 3
    floats + G labels, i.e. exactly
        size_bytes(local, M) = gem.size_bytes(global, M) + 4 (|attributes| (R - 1) M + G)
    with |attributes| = 4: the means and bases are the same size as the global ones; only the
    R M sigmas per attribute (instead of M) and the labels are extra.
    """
    n = sum(pca_lib.size_bytes(model.pca[a]) for a in ATTRIBUTES)
    return int(n + 4 * int(np.prod(model.sh.shape)) + 4 * model.n_gaussians)


def coefficient_count(n_components: int, n_regions: int = 1) -> int:
    """Coefficients per frame over all attributes: |attributes| R M (R = 1: a global GEM)."""
    return len(ATTRIBUTES) * int(n_regions) * int(n_components)


class ComponentPairing(NamedTuple):
    """Local components per region that match a global GEM of M components.

    equal_size: M (the local bases hold M D_a floats per attribute, as the global basis does;
      coefficients R M per attribute);
    equal_coefficients: floor(M / R) (R floor(M / R) <= M coefficients per attribute, bases of
      1 / R of the global size), or None when M < R (no region would get a component).
    """

    equal_size: int
    equal_coefficients: int | None


def equal_size_components(global_m: int, n_regions: int) -> ComponentPairing:
    """The two local configurations to compare with a global GEM of `global_m` components.

    "Equal size" means equal storage: every Gaussian is in exactly one region, so R local bases
    of M components store M G A_a floats per attribute, like one global basis of M components
    (the local model adds only (R - 1) M sigmas per attribute and the labels, `size_bytes`); its
    coefficient vector is R times longer. "Equal coefficient count" gives each region
    floor(M / R) components, so a frame has no more coefficients than the global model's M.

    Args: global_m: M >= 1; n_regions: R >= 1.
    Returns: `ComponentPairing(equal_size=M, equal_coefficients=M // R or None)`.
    """
    if int(global_m) != global_m or int(global_m) < 1:
        raise ValueError(f"global_m={global_m} must be an integer >= 1")
    if int(n_regions) != n_regions or int(n_regions) < 1:
        raise ValueError(f"n_regions={n_regions} must be an integer >= 1")
    m, r = int(global_m), int(n_regions)
    return ComponentPairing(equal_size=m, equal_coefficients=(m // r) if m >= r else None)


# ----------------------------------------------------------------------------------------------
# Global vs local comparison.


def _frame_block(d: int) -> int:
    return max(1, (1 << 22) // max(d, 1))


def _residual_sq(mean, basis, x: np.ndarray) -> float:
    """Sum of squared residuals of project + reconstruct of rows x [N, D] by a PCA (mean [D],
    basis [M, D]), host float64, in blocks of frames."""
    mean = np.asarray(mean, np.float64)
    B = np.asarray(basis, np.float64)
    sq, b = 0.0, _frame_block(x.shape[1])
    for i in range(0, x.shape[0], b):
        xc = x[i:i + b].astype(np.float64) - mean
        sq += float(np.sum((xc - (xc @ B.T) @ B) ** 2))
    return sq


def _rmse_global(model: gem.EigenModel, x: np.ndarray, a: str) -> float:
    """RMSE of project + reconstruct of frames x [N, G, A] by the global GEM's attribute a."""
    return math.sqrt(_residual_sq(model.mean[a], model.basis[a], x.reshape(x.shape[0], -1)) / x.size)


def _rmse_local(model: LocalEigenModel, x: np.ndarray, a: str) -> float:
    """RMSE of project + reconstruct of frames x [N, G, A] by the local GEM's attribute a."""
    lp = model.pca[a]
    sq = sum(_residual_sq(p.mean, p.components, x[:, np.asarray(idx), :].reshape(x.shape[0], -1))
             for idx, p in zip(lp.items, lp.pcas))
    return math.sqrt(sq / x.size)


def _sh_degree_of(sh) -> int:
    K = int(np.shape(sh)[1]) if np.ndim(sh) == 3 else -1
    d = math.isqrt(max(K, 0)) - 1
    if K < 1 or (d + 1) ** 2 != K or d > 3:
        raise ValueError(f"sh must be [G, K, 3] with K = (d + 1)^2, d in 0..3, got shape {tuple(np.shape(sh))}")
    return d


def compare(collected_train: Mapping, collected_test: Mapping, sh, labels, M: int, *, names=None,
            method: str = "auto") -> dict:
    """Global GEM vs local GEM at equal size and at equal coefficient count (module docstring).

    Fits `gem.distil` with M components, `distil_local` with M per region (equal size) and
    `distil_local` with floor(M / R) per region (equal coefficient count; skipped when M < R), all
    on the training frames, and measures the reconstruction of the training and of the held-out
    frames: coefficients by projection (for the training frames these are the distilled
    coefficients), then mean + k B, with the stored float32 means and bases, evaluated in host
    float64. RMSE per attribute: the root mean square, over frames, Gaussians and values, of
    reconstruction - data, in the attribute's units (metres, quaternion units, log metres,
    logits), measured on the linear reconstruction (rotations before renormalisation).

    Args:
      collected_train: {attribute: [N, G, A]} training frames (N >= M + 1).
      collected_test: {attribute: [N', G, A]} held-out frames (N' >= 1).
      sh: [G, K, 3] colours (only stored; they count in the sizes).
      labels: [G] int region of each Gaussian (`region_labels`).
      M: components of the global GEM.
      names: optional R region names (e.g. `region_assignment(ctx).names`) for the report.
      method: `pca.fit`'s method.
    Returns:
      A JSON-serialisable dict: n_gaussians, n_train, n_test, n_regions, regions {name: Gaussians},
      and for each of "global", "local_equal_size", "local_equal_coefficients" (the latter
      {"skipped": why} when M < R): n_components (per region for local), n_regions, coefficients
      (per frame, all attributes), size_bytes, rmse_train {attribute: float}, rmse_test
      {attribute: float}.
    """
    N, G = _check_collected(collected_train, "collected_train")
    Nt, Gt = _check_collected(collected_test, "collected_test")
    if Gt != G:
        raise ValueError(f"collected_test has G={Gt} Gaussians, collected_train G={G}")
    if Nt < 1:
        raise ValueError("collected_test needs at least one held-out frame, got 0")
    lab = _check_labels(labels, G)
    sh_degree = _sh_degree_of(sh)
    uniq, counts = np.unique(lab, return_counts=True)
    R = int(uniq.size)
    if names is not None:
        names = tuple(str(n) for n in names)
        if len(names) != R:
            raise ValueError(f"names has {len(names)} entries for R={R} regions (distinct labels)")
    else:
        names = tuple(str(int(u)) for u in uniq)
    pairing = equal_size_components(M, R)
    train = {a: np.asarray(collected_train[a], np.float32) for a in ATTRIBUTES}
    test = {a: np.asarray(collected_test[a], np.float32) for a in ATTRIBUTES}

    gmodel, _, _ = gem.distil(train, sh, int(M), sh_degree=sh_degree, method=method)
    out = {"n_gaussians": G, "n_train": N, "n_test": Nt, "n_regions": R,
           "regions": {n: int(c) for n, c in zip(names, counts)}}
    out["global"] = {
        "n_components": int(M), "n_regions": 1, "coefficients": coefficient_count(M),
        "size_bytes": gem.size_bytes(gmodel),
        "rmse_train": {a: _rmse_global(gmodel, train[a], a) for a in ATTRIBUTES},
        "rmse_test": {a: _rmse_global(gmodel, test[a], a) for a in ATTRIBUTES}}
    del gmodel
    for key, m in (("local_equal_size", pairing.equal_size), ("local_equal_coefficients", pairing.equal_coefficients)):
        if m is None:
            out[key] = {"skipped": f"M={M} < R={R} regions: floor(M / R) = 0 components per region"}
            continue
        lmodel, _ = distil_local(train, sh, m, lab, sh_degree=sh_degree, method=method)
        out[key] = {
            "n_components": int(m), "n_regions": R, "coefficients": coefficient_count(m, R),
            "size_bytes": size_bytes(lmodel),
            "rmse_train": {a: _rmse_local(lmodel, train[a], a) for a in ATTRIBUTES},
            "rmse_test": {a: _rmse_local(lmodel, test[a], a) for a in ATTRIBUTES}}
    return out

"""Synthetic digital-human data with full ground truth, built on the default head model.

Two generators share one sample format (a dict of numpy arrays per image, the keys of
`dhjax.data.dataset.SAMPLE_KEYS`):

* `MultiviewGenerator`: identities x expressions x cameras of the SynShot rig (14 cameras on a
  frontal arc + 14 on the upper hemisphere, all looking at the head); for SynShot and MICA.
* `VideoGenerator`: monocular handheld videos (sequences x frames) with smooth expressions,
  jaw/neck/eye motion, blinks, head motion, a per-sequence focal length and camera shake; for the
  tracker, INSTA and GEM.

Everything is a pure function of (seed, index): `key(seed, stream, *indices)` derives every
random number, so any host can generate any sample or shard, in any order, with the same bytes.

An identity (`sample_identity`) is a shape from the model's shape space (metric variation), a
procedural albedo texture in the model's UV layout (`dhjax.data.textures`), and hair and beard
(`dhjax.data.hair`) rendered as proxy shells: the scalp/jaw surface offset along its normals by
a per-identity thickness field that tapers to zero at the region's edge. The head model is
extended by a mouth interior (an ellipsoid behind the lips, skinned to the head and the jaw,
with teeth and tongue colours) that shows when the jaw opens. Lighting is second-order SH
(ambient + key + fill lights with colour temperatures), different for every frame group;
shading is Lambertian (`dhjax.render.shading`), images are albedo x irradiance, clipped to
[0, 1].

Part labels (`dhjax.data.dataset.PART_LABELS`, the disk format's): 0 background, 1 face (all
head skin not covered by hair: face, ears, bare scalp), 2 hair (hair and beard shells), 3 mouth
(mouth interior), 4 eyes (eyeballs), 5 neck.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dhjax.data import hair as hair_lib
from dhjax.data import textures
from dhjax.data.dataset import LABEL, PART_LABELS, REQUIRED_KEYS, SAMPLE_KEYS  # noqa: F401 (re-exported)
from dhjax.geometry.mesh import vertex_normals
from dhjax.models import flame, hair_region, head_default
from dhjax.render import camera as camera_lib
from dhjax.render import raster, shading

GENERATOR_VERSION = 1
"""The version of what the head generators draw and render. The head datasets' caches
(`dhjax.data.cache.cached_multiview`, `cached_video`), MICA's cached splits and the tracker's
synthetic albedo model key on it beside the config, so that a cached dataset is never one an
older generator rendered for the same config (`cached_bodies` keys on
`body_synthetic.GENERATOR_VERSION`).
Raise it with any change to this module, `hair`, `textures`, the default head or the renderer
that changes a sample for an unchanged config (a new config field whose default keeps the old
output needs no raise); `tests/test_data_synthetic.py` pins each version's output and fails
until the new version's fingerprint is recorded."""

# Random streams (folded into the key before the indices).
STREAM_IDENTITY, STREAM_EXPRESSION, STREAM_LIGHT, STREAM_MOTION, STREAM_HANDHELD = 1, 2, 3, 4, 5

_HI = jax.lax.Precision.HIGHEST


def key(seed: int, stream: int, *indices: int) -> jax.Array:
    """The PRNG key of (seed, stream, indices...): the only source of randomness here."""
    k = jax.random.fold_in(jax.random.PRNGKey(int(seed)), int(stream))
    for i in indices:
        k = jax.random.fold_in(k, int(i))
    return k


def default_config() -> ml_collections.ConfigDict:
    """Generator settings (the `configs/make_synthetic.py` experiment builds on these).

    seed; uv_size (UV maps S x S); shape_std, expression_std (coefficient std); jaw_open_max
    (rad); beard_prob; identity_sampler ("correlated": size, sex-linked shape traits and the
    beard share a latent factor; "independent": the earlier i.i.d. draw, and what a config
    without the field, written before it existed, gets; see `sample_identity`);
    multiview: n_identities, first_identity, n_expressions, width, height,
    radius (m), fov_y_deg, n_frontal, n_upper, global_std (rad), translation_std (m), and
    optionally fixed_light (bool, default False: one light per identity, not per expression) and
    expression_dims (int, default 0 = all: only the first coefficients vary);
    video: n_sequences, first_identity, n_frames, width, height, fov_range_deg, head_fraction
    (head height / image height), yaw_deg, pitch_deg, roll_deg (head motion amplitudes),
    shake_m / shake_deg (camera shake), smooth_frames (time scale of the motion), blink_every.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.uv_size = 256
    c.shape_std = 1.0
    c.expression_std = 0.8
    c.jaw_open_max = 0.3
    c.beard_prob = 0.45
    c.identity_sampler = DEFAULT_IDENTITY_SAMPLER
    c.multiview = ml_collections.ConfigDict(dict(
        n_identities=100, first_identity=0, n_expressions=2, width=512, height=768, radius=1.0,
        fov_y_deg=22.0, n_frontal=14, n_upper=14, global_std=0.06, translation_std=0.004))
    c.video = ml_collections.ConfigDict(dict(
        n_sequences=10, first_identity=1_000_000, n_frames=100, width=512, height=512,
        fov_range_deg=(14.0, 55.0), head_fraction=(0.6, 0.85), yaw_deg=30.0, pitch_deg=12.0,
        roll_deg=6.0, shake_m=0.01, shake_deg=1.5, smooth_frames=8.0, blink_every=60))
    return c


def check_config(c) -> None:
    """Raises ValueError naming the field when a head generator config (`default_config`) cannot
    work: counts and image sizes integers >= 1 (n_frontal / n_upper >= 0, together >= 1),
    beard_prob in [0, 1], the identity sampler known. Cheap: before any asset is built."""
    def integer(name, value, low):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"config field {name} must be an integer >= {low}, got {value!r}")

    integer("uv_size", c.uv_size, 1)
    for block, names in (("multiview", ("n_identities", "n_expressions", "width", "height")),
                         ("video", ("n_sequences", "n_frames", "width", "height"))):
        for name in names:
            integer(f"{block}.{name}", c[block][name], 1)
    for name in ("n_frontal", "n_upper"):
        integer(f"multiview.{name}", c.multiview[name], 0)
    if c.multiview.n_frontal + c.multiview.n_upper < 1:
        raise ValueError("config fields multiview.n_frontal + multiview.n_upper must give at least one camera")
    p = c.beard_prob
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"config field beard_prob must be a probability in [0, 1], got {p!r}")
    check_identity_sampler(config_identity_sampler(c))


def tiny_config() -> ml_collections.ConfigDict:
    """`default_config` at 128 x 128 with a 128 x 128 UV layout and few items (CPU tests)."""
    c = default_config()
    c.uv_size = 128
    c.multiview.update(n_identities=8, n_expressions=1, width=128, height=128)
    c.video.update(n_sequences=2, n_frames=16, width=128, height=128)
    return c


# ----------------------------------------------------------------------------------------------
# Assets: everything derived once from the head model.


@flax.struct.dataclass
class Assets:
    """Model-derived data the generator needs (built once by `build_assets`).

    model: the head model extended by the mouth interior; its first `n_vertices` vertices and
      `n_faces` faces are those of the base model (identical forward pass), then the mouth's.
    uv: textures.UVFields of the base model's UV layout.
    uv_coords [T, 2], uv_faces_all [F_all, 3]: UV indexing of all rendered faces (head faces
      as the model, others index texel 0 and use vertex colours).
    hair_vids [Nh] / hair_faces [Fh, 3] (local ids): the superset of scalp vertices/faces any
      hair style may cover; beard_vids [Nb] / beard_faces [Fb, 3] likewise for beards.
    hair_phi, hair_theta [Nh], beard_phi, beard_theta [Nb]: head angles of those vertices.
    mouth_colours [Vm, 3]: albedo of the mouth interior vertices.
    face_labels [F_all] int32: part label of every rendered face (PART_LABELS).
    """

    model: Any
    uv: textures.UVFields
    uv_coords: jax.Array
    uv_faces_all: jax.Array
    hair_vids: jax.Array
    hair_faces: jax.Array
    hair_phi: jax.Array
    hair_theta: jax.Array
    beard_vids: jax.Array
    beard_faces: jax.Array
    beard_phi: jax.Array
    beard_theta: jax.Array
    mouth_colours: jax.Array
    face_labels: jax.Array
    n_vertices: int = flax.struct.field(pytree_node=False, default=0)
    n_faces: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def n_model_vertices(self) -> int:
        """Vertices of the extended model (base + mouth interior)."""
        return int(self.model.blend_basis.shape[1])

    @property
    def n_render_vertices(self) -> int:
        """Vertices of the rendered mesh: the model's plus the hair and beard vertices."""
        return self.n_model_vertices + int(self.hair_vids.shape[0]) + int(self.beard_vids.shape[0])


def _ellipsoid(centre, radii, rings=10, segments=20):
    """Closed UV ellipsoid, outward faces. Returns verts [N, 3], faces [M, 3], local dirs [N, 3]."""
    al = np.pi * np.arange(1, rings) / rings
    be = 2 * np.pi * np.arange(segments) / segments
    A, B = np.meshgrid(al, be, indexing="ij")
    d = np.stack([np.sin(A) * np.sin(B), np.cos(A), np.sin(A) * np.cos(B)], -1).reshape(-1, 3)
    d = np.concatenate([[[0, 1.0, 0]], d, [[0, -1.0, 0]]])
    ids = 1 + np.arange((rings - 1) * segments).reshape(rings - 1, segments)
    last = len(d) - 1
    f = [np.stack([np.zeros(segments, int), ids[0], np.roll(ids[0], -1)], 1)]
    for i in range(rings - 2):
        a, b = ids[i], ids[i + 1]
        f += [np.stack([a, b, np.roll(b, -1)], 1), np.stack([a, np.roll(b, -1), np.roll(a, -1)], 1)]
    f.append(np.stack([np.full(segments, last), np.roll(ids[-1], -1), ids[-1]], 1))
    f = np.concatenate(f)
    v = np.asarray(centre) + d * np.asarray(radii)
    tri = v[f]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    flip = np.einsum("fc,fc->f", n, tri.mean(1) - np.asarray(centre)) < 0
    f[flip] = f[flip][:, ::-1]
    return v, f, d


def _mouth_interior(model):
    """Mouth interior ellipsoid behind the lips: vertices, faces, skinning, colours, bases."""
    regions = {k: np.asarray(v) for k, v in model.regions.items()}
    tmpl = np.asarray(model.v_template, np.float64)
    lips = tmpl[regions["lips"]]
    seam_y = float(np.median(lips[:, 1]))
    rx = 0.55 * float(lips[:, 0].max() - lips[:, 0].min())
    centre = np.array([0.0, seam_y + 0.001, lips[:, 2].max() - 0.033])
    radii = np.array([rx * 1.05, 0.016, 0.024])
    v, f, d = _ellipsoid(centre, radii)
    # Skinning: above the lip seam with the head (joint 1), below with the jaw (joint 2).
    jaw = np.clip((seam_y - v[:, 1]) / 0.006 + 0.5, 0.0, 1.0)
    jaw = jaw * jaw * (3 - 2 * jaw)
    w = np.zeros((len(v), 5))
    w[:, 1], w[:, 2] = 1 - jaw, jaw
    # Shape/expression bases: inverse-distance average over the 8 nearest skin vertices, so the
    # interior follows the mouth's shape and lip motion.
    skin = np.where(~regions["eyes"])[0]
    dist = np.linalg.norm(v[:, None] - tmpl[skin][None], axis=-1)
    nn = np.argsort(dist, axis=1)[:, :8]
    wd = 1.0 / np.maximum(np.take_along_axis(dist, nn, 1), 1e-4)
    wd /= wd.sum(1, keepdims=True)
    basis = np.asarray(model.blend_basis[1:], np.float64)        # [S + E, V, 3]
    mbasis = np.einsum("vk,bvkc->bvc", wd, basis[:, skin[nn]])
    # Colours: dark cavity, tongue below, a band of teeth on the front of each jaw.
    front = d[:, 2] > 0.45
    dy = v[:, 1] - seam_y
    col = np.tile([0.22, 0.05, 0.05], (len(v), 1))
    col[(d[:, 1] < -0.3)] = [0.55, 0.22, 0.22]
    col[front & (dy > 0.0005) & (dy < 0.008)] = [0.86, 0.84, 0.76]
    col[front & (dy < -0.0015) & (dy > -0.009)] = [0.82, 0.80, 0.72]
    return v, f, w, mbasis, col


def _extend_model(model, v, f, w, mbasis):
    """The base model with extra vertices/faces appended (zero pose correctives and regressor)."""
    V = model.num_vertices
    m = len(v)
    blend = jnp.concatenate([model.blend_basis, jnp.concatenate(
        [jnp.asarray(v, jnp.float32)[None], jnp.asarray(mbasis, jnp.float32)], 0)], axis=1)
    regions = {k: jnp.concatenate([r, jnp.zeros(m, bool)]) for k, r in model.regions.items()}
    regions["mouth_interior"] = jnp.concatenate([jnp.zeros(V, bool), jnp.ones(m, bool)])
    n_uv = int(model.uv_coords.shape[0])
    return model.replace(
        blend_basis=blend,
        faces=jnp.concatenate([model.faces, jnp.asarray(f + V, jnp.int32)]),
        posedirs=jnp.concatenate([model.posedirs, jnp.zeros((model.posedirs.shape[0], m, 3))], 1),
        j_regressor=jnp.concatenate([model.j_regressor, jnp.zeros((5, m))], 1),
        lbs_weights=jnp.concatenate([model.lbs_weights, jnp.asarray(w, jnp.float32)], 0),
        uv_faces=jnp.concatenate([model.uv_faces, jnp.full((len(f), 3), n_uv - 1, jnp.int32)]),
        regions=regions,
        eyelid_dirs=None if model.eyelid_dirs is None else jnp.concatenate(
            [model.eyelid_dirs, jnp.zeros((model.eyelid_dirs.shape[0], m, 3), jnp.float32)], 1),
        name=model.name + " + mouth interior",
    )


def _shell_superset(faces, skin_mask, weight):
    """Faces touching the region weight > 0 (skin only) and their vertices (local indexing)."""
    inside = (weight > 0) & skin_mask
    sel = np.where(inside[faces].any(1) & skin_mask[faces].all(1))[0]
    vids = np.unique(faces[sel])
    local = np.full(len(weight), -1)
    local[vids] = np.arange(len(vids))
    return vids.astype(np.int32), local[faces[sel]].astype(np.int32)


def build_assets(model=None, uv_size: int = 256) -> Assets:
    """Precomputes everything the generator needs from a head model (host side, once).

    Args:
      model: a FlameModel with region masks, a UV layout and a 68-point landmark embedding;
        None = the embedded default head (`flame.load()`).
      uv_size: size S of the UV maps (albedo, position, expression offsets).
    Returns:
      Assets.
    """
    model = flame.load() if model is None else model
    if model.regions is None:
        raise ValueError(f"model {model.name!r} has no region masks; the synthetic generator needs "
                         "the embedded default head (or a model carrying the same regions)")
    for name in ("eyes", "lips", "neck", "ears"):
        if name not in model.regions:
            raise ValueError(f"model {model.name!r} lacks the region {name!r}")
    uv = textures.uv_fields(model, uv_size)
    mv, mf, mw, mbasis, mcol = _mouth_interior(model)
    ext = _extend_model(model, mv, mf, mw, mbasis)
    V, F = model.num_vertices, int(model.faces.shape[0])
    faces = np.asarray(model.faces)
    regions = {k: np.asarray(r) for k, r in model.regions.items()}
    skin = ~regions["eyes"]
    phi, theta, hw, bw = hair_region.area_weights(model)
    hair_vids, hair_faces = _shell_superset(faces, skin, hw)
    beard_vids, beard_faces = _shell_superset(faces, skin, bw)
    # Part labels of the model's faces (majority of vertex labels), then mouth and shells.
    vlab = np.full(V, LABEL["face"])
    vlab[regions["neck"]] = LABEL["neck"]
    vlab[regions["eyes"]] = LABEL["eyes"]
    fl = vlab[faces]
    face_lab = np.where((fl == LABEL["eyes"]).any(1), LABEL["eyes"],
                        np.where((fl == LABEL["neck"]).sum(1) >= 2, LABEL["neck"], LABEL["face"]))
    labels = np.concatenate([face_lab, np.full(len(mf), LABEL["mouth"]),
                             np.full(len(hair_faces) + len(beard_faces), LABEL["hair"])])
    n_shell = len(hair_faces) + len(beard_faces)
    uv_faces_all = np.concatenate([np.asarray(ext.uv_faces), np.zeros((n_shell, 3), np.int32)])
    i32 = lambda a: jnp.asarray(a, jnp.int32)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return Assets(model=ext, uv=uv, uv_coords=f32(ext.uv_coords), uv_faces_all=i32(uv_faces_all),
                  hair_vids=i32(hair_vids), hair_faces=i32(hair_faces),
                  hair_phi=f32(phi[hair_vids]), hair_theta=f32(theta[hair_vids]),
                  beard_vids=i32(beard_vids), beard_faces=i32(beard_faces),
                  beard_phi=f32(phi[beard_vids]), beard_theta=f32(theta[beard_vids]),
                  mouth_colours=f32(mcol), face_labels=i32(labels), n_vertices=V, n_faces=F)


def base_model(assets: Assets):
    """The head model without the mouth interior (what the parameters refer to)."""
    m = assets.model
    V, F = assets.n_vertices, assets.n_faces
    return m.replace(blend_basis=m.blend_basis[:, :V], faces=m.faces[:F], posedirs=m.posedirs[:, :V],
                     j_regressor=m.j_regressor[:, :V], lbs_weights=m.lbs_weights[:V],
                     uv_faces=m.uv_faces[:F],
                     regions={k: r[:V] for k, r in m.regions.items() if k != "mouth_interior"},
                     eyelid_dirs=None if m.eyelid_dirs is None else m.eyelid_dirs[:, :V],
                     name=m.name.replace(" + mouth interior", ""))


# ----------------------------------------------------------------------------------------------
# Identities.


def _shell_faces(faces, thickness, eps=1e-5):
    """Live faces (some vertex thicker than eps) as given; dead faces collapsed to vertex 0
    (zero area: the rasterizer drops them). faces [F, 3] local; thickness [N]."""
    live = jnp.any(thickness[faces] > eps, axis=1)
    return jnp.where(live[:, None], faces, 0)


IDENTITY_SAMPLERS = ("correlated", "independent")
DEFAULT_IDENTITY_SAMPLER = "correlated"
# What a generator config without the field means: it was written before the option existed
# (commit d4fdecc), when every identity was drawn independently. A run's config.json read back
# (an old SynShot prior, INSTA or GEM run) must regenerate the identities it was trained on.
LEGACY_IDENTITY_SAMPLER = "independent"


def config_identity_sampler(config) -> str:
    """The identity sampler a generator config asks for: its `identity_sampler` field, or
    LEGACY_IDENTITY_SAMPLER ("independent") when it has none (a config written before the field
    existed; `default_config()` always sets it)."""
    return config.get("identity_sampler", LEGACY_IDENTITY_SAMPLER)

# The semantic shape components of the default head, in the order of
# `dhjax.models.head_default._semantic_shape_fields` (component k of the shape vector; a positive
# coefficient makes the feature larger, wider, longer or more prominent). The later components
# are random smooth fields without a meaning.
SEMANTIC_SHAPE_COMPONENTS = (
    "size", "width", "length", "cranium_height", "lower_face_height", "nose_protrusion",
    "nose_width", "jaw_width", "chin", "cheekbones", "eye_spacing", "brow_ridge", "forehead",
    "lips", "ears", "neck_thickness", "face_flatness", "occiput")
if len(SEMANTIC_SHAPE_COMPONENTS) != len(head_default.SHAPE_SEMANTIC_PEAKS):
    raise RuntimeError(f"{len(SEMANTIC_SHAPE_COMPONENTS)} semantic shape names for "
                       f"{len(head_default.SHAPE_SEMANTIC_PEAKS)} semantic components of the default head")

# Correlation of each semantic component with the latent sex-linked factor m of the correlated
# sampler (components not named: 0). Sources and choices are in `sample_identity`'s docstring.
SEX_FACTOR_LOADINGS = dict(
    size=0.60, neck_thickness=0.55, brow_ridge=0.50, chin=0.35, nose_width=0.30,
    nose_protrusion=0.25, lower_face_height=0.25, jaw_width=0.20, cheekbones=-0.20,
    forehead=-0.25)
# Correlation of the beard's probit liability with m (`hair.sample_beard`).
BEARD_FACTOR_CORRELATION = 0.85


def identity_correlation(loadings: Mapping[str, float] | None = None) -> np.ndarray:
    """Correlation matrix [1 + K, 1 + K] of (m, z_0 .. z_{K-1}), K = 18 semantic components.

    A one-factor model: corr(m, z_k) = loading_k, corr(z_j, z_k) = loading_j * loading_k
    (j != k), unit diagonal. Raises ValueError naming the problem if a name is unknown, a
    loading is outside (-1, 1), or the matrix is not positive definite.
    """
    loadings = SEX_FACTOR_LOADINGS if loadings is None else loadings
    unknown = sorted(set(loadings) - set(SEMANTIC_SHAPE_COMPONENTS))
    if unknown:
        raise ValueError(f"loadings name unknown components {unknown}; the semantic components are "
                         f"{SEMANTIC_SHAPE_COMPONENTS}")
    lam = np.array([float(loadings.get(n, 0.0)) for n in SEMANTIC_SHAPE_COMPONENTS])
    bad = [n for n, v in zip(SEMANTIC_SHAPE_COMPONENTS, lam) if not -1.0 < v < 1.0]
    if bad:
        raise ValueError(f"loadings of {bad} are outside (-1, 1)")
    v = np.concatenate([[1.0], lam])
    corr = np.outer(v, v)
    np.fill_diagonal(corr, 1.0)
    eig = np.linalg.eigvalsh(corr)
    if eig.min() <= 1e-9:
        raise ValueError(f"the identity correlation matrix is not positive definite (smallest "
                         f"eigenvalue {eig.min():.3g}); reduce the loadings")
    return corr


def _identity_cholesky(loadings=None) -> np.ndarray:
    """Lower Cholesky factor [19, 19] of `identity_correlation` (float32); its first row is
    (1, 0, ...), so the first entry of L @ n is n_0 itself: the factor m."""
    return np.linalg.cholesky(identity_correlation(loadings)).astype(np.float32)


# Built (and checked positive definite) at import.
_IDENTITY_CHOLESKY = _identity_cholesky()
# fold_in constant of the factor's key (split(k, 6) gives the other draws' keys).
_FACTOR_FOLD = 6


def check_identity_sampler(sampler: str, model=None) -> str:
    """`sampler` if it is one of IDENTITY_SAMPLERS (and, for "correlated", `model` is None or
    has the default head's semantic shape components); ValueError otherwise."""
    if sampler not in IDENTITY_SAMPLERS:
        raise ValueError(f"identity_sampler must be one of {IDENTITY_SAMPLERS}, got {sampler!r}")
    if sampler == "correlated" and model is not None:
        k = len(SEMANTIC_SHAPE_COMPONENTS)
        if not str(model.name).startswith("dhjax-default-head") or model.num_shape < k:
            raise ValueError(
                f"identity_sampler='correlated' correlates the first {k} shape components as the "
                f"default head's semantic fields; model {model.name!r} ({model.num_shape} shape "
                "components) is not the default head with all of them: use "
                "identity_sampler='independent'")
    return sampler


@functools.partial(jax.jit, static_argnames=("n_shape", "n_extra", "shape_std", "beard_prob", "sampler"))
def identity_traits(k, n_shape: int, n_extra: int = 0, shape_std: float = 1.0, beard_prob: float = 0.45,
                    sampler: str = DEFAULT_IDENTITY_SAMPLER) -> dict:
    """The cheap part of an identity (no textures): shape, hair and beard style, latent factor.

    `sample_identity` builds on it (with n_extra = Nh + Nb, the number of per-vertex colour
    jitters it needs), so the same key gives the same traits here and there; vmap over keys to
    sample many identities quickly.

    Args:
      k: the identity's PRNG key (`key(seed, STREAM_IDENTITY, index)`).
      n_shape: S, shape components; n_extra: further standard normals drawn in the same call
        (the draw of all S + n_extra values is one `jax.random.normal`, as it always was).
      shape_std, beard_prob, sampler: as in `sample_identity`.
    Returns:
      dict: shape [S] float32; factor () the sex-linked factor m (NaN for "independent");
      normal [S + n_extra] (the raw standard normals); keys [6, ...] (the split keys: 0 normals,
      1 skin, 2 hair, 3 beard, 4 albedo, 5 grey hair); hair, beard (`hair_lib` style dicts).
    """
    check_identity_sampler(sampler)
    ks = jax.random.split(k, 6)
    normal = jax.random.normal(ks[0], (n_shape + n_extra,))
    hair = hair_lib.sample_hair(ks[2])
    if sampler == "independent":
        shape = shape_std * normal[:n_shape]
        factor = jnp.float32(jnp.nan)
        beard = hair_lib.sample_beard(ks[3], hair, beard_prob)
    else:
        K = len(SEMANTIC_SHAPE_COMPONENTS)
        if n_shape < K:
            raise ValueError(f"the correlated sampler needs at least {K} shape components, got {n_shape}")
        factor = jax.random.normal(jax.random.fold_in(k, _FACTOR_FOLD), ())
        z = jnp.dot(jnp.asarray(_IDENTITY_CHOLESKY), jnp.concatenate([factor[None], normal[:K]]),
                    precision=_HI)
        shape = shape_std * jnp.concatenate([z[1:], normal[K:n_shape]])
        beard = hair_lib.sample_beard(ks[3], hair, beard_prob, factor=factor,
                                      factor_corr=BEARD_FACTOR_CORRELATION)
    return dict(shape=shape.astype(jnp.float32), factor=factor.astype(jnp.float32), normal=normal,
                keys=ks, hair=hair, beard=beard)


@functools.partial(jax.jit, static_argnames=("shape_std", "beard_prob", "sampler"))
def _identity_jit(assets: Assets, k, shape_std: float, beard_prob: float, sampler: str):
    n_shape = assets.model.num_shape
    nh, nb = assets.hair_vids.shape[0], assets.beard_vids.shape[0]
    t = identity_traits(k, n_shape, nh + nb, shape_std, beard_prob, sampler)
    ks, normal, shape, hair, beard = t["keys"], t["normal"], t["shape"], t["hair"], t["beard"]
    skin = textures.sample_skin(ks[1])
    albedo = textures.albedo_texture(ks[4], assets.uv, skin, hair, beard)
    position = textures.position_map(assets.model, assets.uv, shape)
    ht = hair_lib.hair_thickness(assets.hair_phi, assets.hair_theta, hair)
    bt = hair_lib.beard_thickness(assets.beard_phi, assets.beard_theta, beard)
    hw = hair_lib.hair_weight(assets.hair_phi, assets.hair_theta, hair)
    grey = hair["grey"] * jax.random.uniform(ks[5], (nh, 1))
    hcol = hair["colour"] * (0.8 + 0.2 * hw[:, None]) * (1 + 0.12 * normal[n_shape:n_shape + nh, None])
    hcol = hcol * (1 - grey) + 0.62 * grey
    bcol = beard["colour"] * (1 + 0.12 * normal[n_shape + nh:, None])
    return dict(
        shape=shape.astype(jnp.float32), uv_albedo=albedo, uv_position=position,
        hair_thickness=ht, hair_faces=_shell_faces(assets.hair_faces, ht),
        hair_colours=jnp.clip(hcol, 0, 1).astype(jnp.float32),
        beard_thickness=bt, beard_faces=_shell_faces(assets.beard_faces, bt),
        beard_colours=jnp.clip(bcol, 0, 1).astype(jnp.float32),
        skin_tone=skin["tone"].astype(jnp.float32), hair_style=hair["style"],
        beard_style=beard["style"], hair_colour=hair["colour"], iris=skin["iris"],
    )


def sample_identity(assets: Assets, seed: int, index: int, *, shape_std: float = 1.0,
                    beard_prob: float = 0.45, sampler: str = DEFAULT_IDENTITY_SAMPLER) -> dict:
    """Identity `index` of `seed` (pure function of both).

    Returns a dict of jnp arrays: shape [S] (coefficients of the model's shape space, each
    ~N(0, shape_std) marginally under either sampler); uv_albedo [T, T, 3];
    uv_position [T, T, 3] (neutral, metres); hair_thickness [Nh] (metres), hair_faces [Fh, 3],
    hair_colours [Nh, 3]; beard_thickness [Nb], beard_faces [Fb, 3], beard_colours [Nb, 3];
    skin_tone (0 light .. 1 dark), hair_style / beard_style (int32 indices into
    hair.HAIR_STYLES / hair.BEARD_STYLES), hair_colour [3], iris [3].

    `sampler` (config field `identity_sampler`) chooses how shape and beard are drawn:

    * "independent" (the sampler before the option existed; the same arrays for the same
      seed and index): shape = shape_std * n with n ~ N(0, I_S); a beard with probability
      `beard_prob`, independent of everything else. Head size (component 0, nearly a uniform
      scale) is then invisible to anything that sees a scale-normalised image.
    * "correlated" (default; needs the default head): a latent sex-linked factor m ~ N(0, 1),
      continuous rather than a binary sex plus within-sex normals because a mixture of two
      normals would make the coefficients' marginals bimodal, and dimorphic traits vary
      continuously within each sex anyway. The 18 semantic components (SEMANTIC_SHAPE_COMPONENTS)
      are z = L[1:] @ (m, n_0 .. n_17), with L the Cholesky factor of the one-factor correlation
      matrix `identity_correlation` (unit diagonal, checked positive definite at import): each
      z_k is exactly N(0, 1), corr(z_k, m) = SEX_FACTOR_LOADINGS[k] and corr(z_j, z_k) is the
      product of the two loadings. shape = shape_std * (z, n_18 .. n_{S-1}): components 18+
      and every other draw (skin, hair, textures) are bit-identical to "independent". The beard
      follows a probit liability 0.85 m + sqrt(1 - 0.85^2) e (`hair.sample_beard`), so its
      overall rate stays exactly `beard_prob` while P(beard | m) rises with m (for
      beard_prob = 0.45: 0.03 at m = -1, 0.41 at m = 0, 0.92 at m = +1).

    Loadings (correlation with m; implied correlation with size = 0.60 x loading):

    * size 0.60: adult sex differences in head breadth and length, Cohen's d 1.20 (maximum
      cranial width), 1.84 (maximum cranial length), 1.34 (maximum facial width) in the 3D
      Facial Norms adults (Kesterke et al. 2016, Biol. Sex Differ. 7:23, Table 3); d = 1.5
      gives the point-biserial correlation d / sqrt(d^2 + 4) = 0.60 for two equal groups.
    * brow ridge 0.50, chin 0.35, cheekbones -0.20, forehead -0.25: the signs follow the
      consensus Kesterke et al. summarise (adult male faces are larger, with more prominent
      nasal, supraorbital and chin regions and less prominent malar and forehead regions); the
      magnitudes are my choice, the strongest for the brow ridge, the classic dimorphic trait.
    * nose width 0.30, nose protrusion 0.25: nasal width d = 1.57, nasal ala length d = 2.00
      (above the head's own d), nasal protrusion d = 0.62 (same table); the components are
      proportions orthogonal to size, so the loadings are my reading of what exceeds the
      size effect.
    * lower face height 0.25 (lower facial height d = 1.17, lower facial depth d = 2.10) and
      jaw width 0.20 (mandibular width d = 1.21, about the cranial width's 1.20, so little
      dimorphism beyond size in soft tissue): my choices from the same table.
    * neck thickness 0.55: my choice (no figure found; men's necks are much thicker than
      their heads are larger).
    * beard 0.85: my choice (facial hair is essentially male; not 1 because m is continuous).

    Under these loadings the visible components explain about 56 % of m's variance and about
    20 % of size's, before the beard; under "independent" none. Everything stays a pure,
    jittable function of (seed, index).
    """
    check_identity_sampler(sampler, assets.model)
    return _identity_jit(assets, key(seed, STREAM_IDENTITY, index), float(shape_std), float(beard_prob),
                         str(sampler))


# ----------------------------------------------------------------------------------------------
# Expressions, poses, lights.


@functools.partial(jax.jit, static_argnames=("n_expression", "expression_std", "jaw_open_max", "global_std",
                                             "neck_std", "eye_std", "translation_std"))
def sample_frame_params(k, n_expression: int, *, expression_std=0.8, jaw_open_max=0.3,
                        global_std=0.06, neck_std=0.08, eye_std=0.12, translation_std=0.004) -> dict:
    """Random expression and pose of one frame.

    Returns: expression [E] ~ N(0, expression_std); pose [5, 3] axis-angle (global and neck
    ~N(0, std) per axis, jaw opened by U(0, jaw_open_max) about +x on 60% of frames with small
    sideways jitter, eyes turned together ~N(0, eye_std) without roll); translation [3] metres.
    """
    z = jax.random.normal(k, (n_expression + 15,))
    u = jax.scipy.special.ndtr(z[-2:])                          # two uniforms
    expr = expression_std * z[:n_expression]
    glob = global_std * z[n_expression:n_expression + 3]
    neck = neck_std * z[n_expression + 3:n_expression + 6]
    jaw_open = jnp.where(u[0] < 0.6, u[1] * jaw_open_max, 0.0)
    jaw = jnp.stack([jaw_open, 0.02 * z[n_expression + 6], 0.0])
    eyes = eye_std * z[n_expression + 7:n_expression + 10] * jnp.array([1.0, 1.0, 0.0])
    pose = jnp.stack([glob, neck, jaw, eyes, eyes])
    trans = translation_std * z[n_expression + 10:n_expression + 13]
    return dict(expression=expr.astype(jnp.float32), pose=pose.astype(jnp.float32),
                translation=trans.astype(jnp.float32))


def _sh_of_direction(d):
    """SH basis [9] of a unit direction (see dhjax.render.shading)."""
    return shading.sh_basis(d)


def _kelvin_tint(t):
    """RGB tint, t in [0, 1]: 0 warm (~3000 K) .. 0.5 neutral .. 1 cool (~8000 K), mean 1."""
    warm, cool = jnp.array([1.15, 0.98, 0.78]), jnp.array([0.88, 0.98, 1.15])
    neutral = jnp.ones(3)
    return jnp.where(t < 0.5, warm + (neutral - warm) * 2 * t, neutral + (cool - neutral) * (2 * t - 1))


@jax.jit
def sample_light(k) -> dict:
    """Random SH environment and background.

    The radiance is an ambient term plus a key light (direction anywhere in front of the head,
    from above to slightly below) and a weaker fill light on the other side, each with its own
    colour temperature, plus an overhead sky/ground gradient; every light is projected to SH
    bands 0..2. Returns sh [9, 3] (radiance coefficients, world space, `dhjax.render.shading`
    convention) and background [2, 3] (top and bottom colours of a vertical gradient).
    """
    r = jax.random.uniform(k, (18,))
    u = lambda i, lo, hi: lo + (hi - lo) * r[i]
    ambient = u(0, 0.35, 0.75)
    az = u(1, -1.9, 1.9)
    el = u(2, -0.3, 1.1)
    d_key = jnp.array([jnp.cos(el) * jnp.sin(az), jnp.sin(el), jnp.cos(el) * jnp.cos(az)])
    az_f = -az * u(3, 0.5, 1.2)
    el_f = u(4, -0.2, 0.5)
    d_fill = jnp.array([jnp.cos(el_f) * jnp.sin(az_f), jnp.sin(el_f), jnp.cos(el_f) * jnp.cos(az_f)])
    key_i = u(5, 0.5, 1.1)
    fill_i = key_i * u(6, 0.1, 0.5)
    t_key, t_fill, t_amb = r[7], r[8], r[9]
    # A directional light of radiance-weighted strength L gives E(n)/pi = L cos / pi (bands 0..2);
    # scaled by pi so that `key_i` is the reflected radiance of a white surface facing the light.
    sh = (np.pi * key_i * _sh_of_direction(d_key)[:, None] * _kelvin_tint(t_key)[None]
          + np.pi * fill_i * _sh_of_direction(d_fill)[:, None] * _kelvin_tint(t_fill)[None])
    sky = u(10, 0.0, 0.25) * ambient
    sh = sh.at[0].add(ambient / 0.282095 * _kelvin_tint(t_amb))
    sh = sh.at[1].add(sky / 0.488603 * 1.5 * jnp.ones(3))        # brighter from above (Y1-1 ~ y)
    bg_base = 0.1 + 0.75 * r[11:14]
    grey = jnp.mean(bg_base)
    bg_top = grey + (bg_base - grey) * 0.4
    bg = jnp.stack([bg_top, bg_top * u(14, 0.55, 0.9)])
    return dict(sh=sh.astype(jnp.float32), background=bg.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------
# Rigs.


def synshot_cameras(width: int = 512, height: int = 768, *, radius: float = 1.0, fov_y_deg: float = 22.0,
                    n_frontal: int = 14, n_upper: int = 14, target=(0.0, -0.035, 0.0)) -> camera_lib.Camera:
    """The SynShot capture rig around the head (`dhjax.render.camera.synshot_rig`): Camera [C]
    with C = n_frontal + n_upper, frontal arc first; image width x height (768 x 512 portrait by
    default, H x W)."""
    return camera_lib.synshot_rig(radius=radius, target=target, width=width, height=height,
                                  n_frontal=n_frontal, n_upper=n_upper, fov_y_deg=fov_y_deg)


def _smooth_noise(k, n: int, dims: int, sigma: float):
    """[n, dims] Gaussian-filtered white noise with unit std per entry (time scale sigma frames)."""
    half = int(np.ceil(3 * sigma))
    w = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    w = w / np.sqrt(np.sum(w ** 2))
    x = jax.random.normal(k, (n + 2 * half, dims))
    return jax.vmap(lambda c: jnp.convolve(c, jnp.asarray(w, jnp.float32), mode="valid"), 1, 1)(x)


@functools.partial(jax.jit, static_argnames=("n_frames", "n_expression", "expression_std", "jaw_open_max",
                                             "yaw_deg", "pitch_deg", "roll_deg", "smooth_frames",
                                             "blink_every"))
def sample_motion(k, n_frames: int, n_expression: int, *, expression_std=0.8, jaw_open_max=0.3,
                  yaw_deg=30.0, pitch_deg=12.0, roll_deg=6.0, smooth_frames=8.0, blink_every=60) -> dict:
    """Smooth per-frame expression and pose curves of a monocular video.

    Returns: expression [T, E] (smooth, std expression_std, with blinks on the eyelid component
    13 of the default head about every `blink_every` frames), pose [T, 5, 3] (head rotation as
    the global joint with amplitudes yaw/pitch/roll, neck sway, talking-like jaw in
    [0, jaw_open_max], smooth gaze with saccade-like steps), translation [T, 3] (smooth, +-2 cm).
    """
    ks = jax.random.split(k, 8)
    T = n_frames
    expr = expression_std * _smooth_noise(ks[0], T, n_expression, smooth_frames)
    t = jnp.arange(T, dtype=jnp.float32)
    n_blinks = max(1, T // max(int(blink_every), 1) + 1)
    centres = jax.random.uniform(ks[1], (n_blinks,), maxval=T)
    blink = jnp.sum(jnp.exp(-0.5 * ((t[:, None] - centres[None]) / 1.5) ** 2), 1)
    if n_expression > 13:
        expr = expr.at[:, 13].add(2.0 * blink)
    head = _smooth_noise(ks[2], T, 3, 2.5 * smooth_frames) * jnp.deg2rad(
        jnp.array([pitch_deg, yaw_deg, roll_deg])) / 1.5
    neck = 0.05 * _smooth_noise(ks[3], T, 3, smooth_frames)
    talk = 0.5 + 0.5 * jnp.tanh(_smooth_noise(ks[4], T, 1, 0.6 * smooth_frames)[:, 0])
    jaw = jnp.stack([jaw_open_max * talk, 0.015 * _smooth_noise(ks[5], T, 1, smooth_frames)[:, 0],
                     jnp.zeros(T)], -1)
    gaze = 0.12 * jnp.tanh(_smooth_noise(ks[6], T, 2, 0.5 * smooth_frames))
    eyes = jnp.concatenate([gaze, jnp.zeros((T, 1))], -1)
    pose = jnp.stack([head, neck, jaw, eyes, eyes], 1)
    trans = 0.012 * _smooth_noise(ks[7], T, 3, 2 * smooth_frames)
    return dict(expression=expr.astype(jnp.float32), pose=pose.astype(jnp.float32),
                translation=trans.astype(jnp.float32))


def handheld_cameras(k, n_frames: int, width: int, height: int, *, fov_range_deg=(14.0, 55.0),
                     head_fraction=(0.6, 0.85), shake_m=0.01, shake_deg=1.5, smooth_frames=8.0,
                     target=(0.0, -0.035, 0.0), head_height=0.28) -> camera_lib.Camera:
    """A monocular handheld video rig: Camera [T] looking roughly at the head.

    The focal length is drawn per sequence (vertical field of view uniform in fov_range_deg) and
    the distance set so that the head (`head_height` metres, with neck and hair) fills a
    fraction uniform in head_fraction of the image height, so short and long lenses give the
    same framing with different perspective. The camera sits in front of the head (azimuth
    +-25 degrees, elevation -10..15 degrees), shakes smoothly by ~shake_m / shake_deg and rolls a
    little. Intrinsics are constant over the sequence (as trackers assume).
    """
    ks = jax.random.split(k, 8)
    u = lambda i, lo, hi: float(lo + (hi - lo) * jax.random.uniform(ks[i]))
    fov = u(0, *fov_range_deg)
    frac = u(1, *head_fraction)
    f = float(camera_lib.focal_from_fov(fov, height))
    dist = f * head_height / (frac * height)
    az, el = np.deg2rad(u(2, -25, 25)), np.deg2rad(u(3, -10, 15))
    base = np.array([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)]) * dist
    eye = jnp.asarray(target) + base + shake_m * _smooth_noise(ks[4], n_frames, 3, smooth_frames)
    aim = jnp.asarray(target) + shake_m * 0.5 * _smooth_noise(ks[5], n_frames, 3, smooth_frames)
    roll = np.deg2rad(u(6, -4, 4)) + np.deg2rad(shake_deg) * _smooth_noise(ks[7], n_frames, 1, smooth_frames)[:, 0]
    up = jnp.stack([jnp.sin(roll), jnp.cos(roll), jnp.zeros_like(roll)], -1)
    R, t = camera_lib.look_at(eye, aim, up)
    K = camera_lib.intrinsics(f, f, (width - 1) / 2.0, (height - 1) / 2.0)
    return camera_lib.make_camera(jnp.broadcast_to(K, (n_frames, 3, 3)), R, t, width, height)


# ----------------------------------------------------------------------------------------------
# Geometry and rendering.


@jax.jit
def _pose_geometry(assets: Assets, identity: dict, frame: dict):
    """Posed render geometry: vertices [N, 3], faces [M, 3], vertex colours [N, 3]."""
    model = assets.model
    out = flame.forward(model, identity["shape"][None], frame["expression"][None], frame["pose"][None],
                        frame["translation"][None])
    v = out.vertices[0]
    V = assets.n_vertices
    nrm = vertex_normals(v[:V], model.faces[:assets.n_faces])
    hv = v[assets.hair_vids] + identity["hair_thickness"][:, None] * nrm[assets.hair_vids]
    bv = v[assets.beard_vids] + identity["beard_thickness"][:, None] * nrm[assets.beard_vids]
    Vm = v.shape[0]
    nh = hv.shape[0]
    faces = jnp.concatenate([model.faces, identity["hair_faces"] + Vm, identity["beard_faces"] + Vm + nh])
    verts = jnp.concatenate([v, hv, bv])
    colours = jnp.concatenate([jnp.zeros((V, 3)), assets.mouth_colours, identity["hair_colours"],
                               identity["beard_colours"]])
    return verts, faces, colours, v[:V]


@functools.partial(jax.jit, static_argnames=("n_faces",))
def _shade(verts, faces, colours, uv_coords, uv_faces, labels, albedo_tex, sh, background,
           face_id, bary, depth, mask, *, n_faces):
    frags = raster.Fragments(face_id=face_id, bary=bary, depth=depth, mask=mask,
                             overflow=jnp.zeros(face_id.shape[:1], bool))
    vn = vertex_normals(verts, faces)
    n = raster.interpolate(vn, faces, frags)
    n = n / jnp.maximum(jnp.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    uv = raster.interpolate(uv_coords, uv_faces, frags)
    tex = shading.sample_texture(albedo_tex, uv)
    vc = raster.interpolate(colours, faces, frags)
    albedo = jnp.where((face_id < n_faces)[..., None], tex, vc)
    rgb = albedo * shading.sh_irradiance(n, sh)
    C, H, W = face_id.shape
    ramp = (jnp.arange(H, dtype=jnp.float32) / max(H - 1, 1))[:, None, None]
    bg = background[0] * (1 - ramp) + background[1] * ramp              # [H, 1, 3]
    image = jnp.clip(jnp.where(mask[..., None], rgb, bg[None]), 0.0, 1.0)
    seg = jnp.where(mask, labels[jnp.maximum(face_id, 0)], 0)
    return image, seg


def render_views(assets: Assets, identity: dict, frame: dict, cameras: camera_lib.Camera,
                 geometry=None) -> dict:
    """Renders one (identity, frame) from C cameras.

    Args:
      assets: Assets; identity: `sample_identity` dict; frame: dict with expression [E], pose
        [5, 3], translation [3], sh [9, 3], background [2, 3]; cameras: Camera with batch [C];
      geometry: the output of `_pose_geometry` if already computed (cache), else None.
    Returns:
      dict of jnp arrays: image [C, H, W, 3] in [0, 1], mask [C, H, W] float32, seg [C, H, W]
      int32 (PART_LABELS), depth [C, H, W] camera z in metres (0 on background), face_id
      [C, H, W] (index into the render faces), vertices [V, 3] (the model's posed vertices).
    """
    verts, faces, colours, model_verts = geometry if geometry is not None else _pose_geometry(
        assets, identity, frame)
    if cameras.batch_shape == ():
        cameras = jax.tree.map(lambda a: a[None], cameras)
    frags = raster.rasterize(verts[None], faces, cameras, capacity=render_capacity(verts, faces, cameras))
    image, seg = _shade(verts, faces, colours, assets.uv_coords, assets.uv_faces_all, assets.face_labels,
                        identity["uv_albedo"], frame["sh"], frame["background"], frags.face_id, frags.bary,
                        frags.depth, frags.mask, n_faces=assets.n_faces)
    return dict(image=image, mask=frags.mask.astype(jnp.float32), seg=seg, depth=frags.depth,
                face_id=frags.face_id, vertices=model_verts)


def render_capacity(verts, faces, cameras) -> int:
    """Rasterizer capacity for rendering `verts` [N, 3] from `cameras`: the exact need rounded up
    to a power of two, so that renders of similar views share one compiled rasterizer."""
    need = int(jnp.max(raster.count_intersections(verts[None], faces, cameras)))
    return int(2 ** np.ceil(np.log2(max(need, 1024) * 1.1)))


@jax.jit
def _expression_map(assets: Assets, expression):
    return textures.expression_offset_map(assets.model, assets.uv, expression)


def _sample_dict(identity, frame, views, cameras, c, item, frame_index, view_index, uv_offset):
    """One image's sample dict (numpy) from a render of C views; c selects the view."""
    np32 = lambda a: np.asarray(a, np.float32)
    return dict(
        image=np32(views["image"][c]), mask=np32(views["mask"][c]), K=np32(cameras.K[c]),
        R=np32(cameras.R[c]), t=np32(cameras.t[c]), shape=np32(identity["shape"]),
        expression=np32(frame["expression"]), pose=np32(frame["pose"]),
        translation=np32(frame["translation"]), seg=np.asarray(views["seg"][c], np.int32),
        depth=np32(views["depth"][c]), sh=np32(frame["sh"]), uv_albedo=np32(identity["uv_albedo"]),
        uv_position=np32(identity["uv_position"]), uv_expression_offset=np32(uv_offset),
        skin_tone=np.float32(identity["skin_tone"]), hair_style=np.int32(identity["hair_style"]),
        beard_style=np.int32(identity["beard_style"]), item=np.int32(item), frame=np.int32(frame_index),
        view=np.int32(view_index))


class _LRU:
    """A small per-instance cache (generation is a pure function, so caching only saves time)."""

    def __init__(self, size):
        self.size, self.data = size, collections.OrderedDict()

    def get(self, k, make):
        if k in self.data:
            self.data.move_to_end(k)
            return self.data[k]
        v = make()
        self.data[k] = v
        if len(self.data) > self.size:
            self.data.popitem(last=False)
        return v


class _Generator:
    """Shared parts of the two generators (random access, caches, sample assembly)."""

    def __init__(self, config: Mapping | None, assets: Assets | None):
        self.config = default_config() if config is None else config
        self.assets = build_assets(None, int(self.config.uv_size)) if assets is None else assets
        if self.assets.uv.size != int(self.config.uv_size):
            raise ValueError(f"assets have UV size {self.assets.uv.size}, config.uv_size is "
                             f"{self.config.uv_size}")
        self.seed = int(self.config.seed)
        self.identity_sampler = check_identity_sampler(config_identity_sampler(self.config), self.assets.model)
        self._identities = _LRU(8)
        self._frames = _LRU(16)

    def identity(self, identity_index: int) -> dict:
        c = self.config
        return self._identities.get(int(identity_index), lambda: sample_identity(
            self.assets, self.seed, int(identity_index), shape_std=float(c.shape_std),
            beard_prob=float(c.beard_prob), sampler=self.identity_sampler))

    def __len__(self):
        raise NotImplementedError

    def _check_index(self, index):
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        return index


class MultiviewGenerator(_Generator):
    """Identities x expressions x cameras of the SynShot rig, one image per index.

    Index layout: index = ((i * n_expressions) + e) * n_cameras + c for identity i (the
    identity number is first_identity + i), expression e, camera c (camera fastest, so
    consecutive indices share an identity). Lighting and background are drawn per (identity,
    expression): all views of a frame see the same scene.

    Args:
      config: `default_config()`-like ConfigDict (uses seed, uv_size, shape_std,
        expression_std, jaw_open_max, beard_prob, identity_sampler and the `multiview` block).
      assets: prebuilt Assets (shared between generators), or None to build them.
    """

    kind = "multiview"

    def __init__(self, config=None, assets=None):
        super().__init__(config, assets)
        mv = self.config.multiview
        self.cameras = synshot_cameras(int(mv.width), int(mv.height), radius=float(mv.radius),
                                       fov_y_deg=float(mv.fov_y_deg), n_frontal=int(mv.n_frontal),
                                       n_upper=int(mv.n_upper))
        self.n_cameras = int(mv.n_frontal) + int(mv.n_upper)
        self.n_items = int(mv.n_identities)
        self.n_frames = int(mv.n_expressions)

    def __len__(self):
        return self.n_items * self.n_frames * self.n_cameras

    def locate(self, index: int) -> tuple[int, int, int]:
        """(identity position i, expression e, camera c) of a global index."""
        index = self._check_index(index)
        ie, c = divmod(index, self.n_cameras)
        i, e = divmod(ie, self.n_frames)
        return i, e, c

    def identity_number(self, i: int) -> int:
        """The global identity number of the generator's i-th identity (`multiview.first_identity` + i)."""
        return int(self.config.multiview.first_identity) + int(i)

    def frame(self, i: int, e: int) -> dict:
        """Expression/pose/light of (identity position i, expression e), with its posed geometry."""
        def make():
            c, mv = self.config, self.config.multiview
            n = self.identity_number(i)
            p = sample_frame_params(key(self.seed, STREAM_EXPRESSION, n, e), self.assets.model.num_expression,
                                    expression_std=float(c.expression_std), jaw_open_max=float(c.jaw_open_max),
                                    global_std=float(mv.global_std), translation_std=float(mv.translation_std))
            # expression_dims (optional key, 0 = all): only the first coefficients vary, the rest
            # are 0 (a performance of low intrinsic dimension, as one subject's capture session).
            dims = int(mv.get("expression_dims", 0))
            if dims:
                p["expression"] = p["expression"].at[dims:].set(0.0)
            # fixed_light (optional key): one light per identity for all its expressions, as in a
            # light stage (GEM's capture); otherwise a light per (identity, expression).
            p.update(sample_light(key(self.seed, STREAM_LIGHT, n, 0 if mv.get("fixed_light", False) else e)))
            ident = self.identity(n)
            p["geometry"] = _pose_geometry(self.assets, ident, p)
            p["uv_expression_offset"] = _expression_map(self.assets, p["expression"])
            return p
        return self._frames.get((int(i), int(e)), make)

    def render_group(self, i: int, e: int, cameras=None) -> list[dict]:
        """All views (or the given camera indices) of (identity i, expression e), one batched
        render; returns one sample dict per camera."""
        cams = list(range(self.n_cameras)) if cameras is None else [int(c) for c in cameras]
        ident = self.identity(self.identity_number(i))
        fr = self.frame(i, e)
        cam = self.cameras[np.asarray(cams)]
        views = render_views(self.assets, ident, fr, cam, geometry=fr["geometry"])
        return [_sample_dict(ident, fr, views, cam, k, self.identity_number(i), e, c, fr["uv_expression_offset"])
                for k, c in enumerate(cams)]

    def __getitem__(self, index: int) -> dict:
        i, e, c = self.locate(index)
        return self.render_group(i, e, [c])[0]


class VideoGenerator(_Generator):
    """Monocular handheld videos: sequences x frames, one image per index.

    Index layout: index = s * n_frames + t. Sequence s shows identity first_identity + s under
    one lighting (drawn per sequence), with smooth motion (`sample_motion`) and a handheld
    camera (`handheld_cameras`).
    """

    kind = "video"

    def __init__(self, config=None, assets=None):
        super().__init__(config, assets)
        vc = self.config.video
        self.n_items = int(vc.n_sequences)
        self.n_frames = int(vc.n_frames)
        self.n_cameras = 1
        self._sequences = _LRU(4)

    def __len__(self):
        return self.n_items * self.n_frames

    def locate(self, index: int) -> tuple[int, int, int]:
        """(sequence s, frame t, view 0) of a global index."""
        s, t = divmod(self._check_index(index), self.n_frames)
        return s, t, 0

    def identity_number(self, s: int) -> int:
        """The global identity number of sequence s (`video.first_identity` + s)."""
        return int(self.config.video.first_identity) + int(s)

    def sequence(self, s: int) -> dict:
        """Motion curves [T, ...], cameras [T], light and background of sequence s."""
        def make():
            c, vc = self.config, self.config.video
            n = self.identity_number(s)
            motion = sample_motion(key(self.seed, STREAM_MOTION, n), self.n_frames,
                                   self.assets.model.num_expression, expression_std=float(c.expression_std),
                                   jaw_open_max=float(c.jaw_open_max), yaw_deg=float(vc.yaw_deg),
                                   pitch_deg=float(vc.pitch_deg), roll_deg=float(vc.roll_deg),
                                   smooth_frames=float(vc.smooth_frames), blink_every=int(vc.blink_every))
            cams = handheld_cameras(key(self.seed, STREAM_HANDHELD, n), self.n_frames, int(vc.width),
                                    int(vc.height), fov_range_deg=tuple(vc.fov_range_deg),
                                    head_fraction=tuple(vc.head_fraction), shake_m=float(vc.shake_m),
                                    shake_deg=float(vc.shake_deg), smooth_frames=float(vc.smooth_frames))
            light = sample_light(key(self.seed, STREAM_LIGHT, n))
            return dict(motion=motion, cameras=cams, **light)
        return self._sequences.get(int(s), make)

    def frame(self, s: int, t: int) -> dict:
        """Frame t of sequence s (cached): its motion parameters, SH light, background, posed geometry
        and expression offset map."""
        def make():
            seq = self.sequence(s)
            p = {k: v[t] for k, v in seq["motion"].items()}
            p.update(sh=seq["sh"], background=seq["background"])
            p["geometry"] = _pose_geometry(self.assets, self.identity(self.identity_number(s)), p)
            p["uv_expression_offset"] = _expression_map(self.assets, p["expression"])
            return p
        return self._frames.get((int(s), int(t)), make)

    def __getitem__(self, index: int) -> dict:
        s, t, _ = self.locate(index)
        ident = self.identity(self.identity_number(s))
        fr = self.frame(s, t)
        cam = self.sequence(s)["cameras"][np.asarray([t])]
        views = render_views(self.assets, ident, fr, cam, geometry=fr["geometry"])
        return _sample_dict(ident, fr, views, cam, 0, self.identity_number(s), t, 0, fr["uv_expression_offset"])

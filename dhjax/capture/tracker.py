"""Metrical face tracker: FLAME parameters, camera intrinsics, albedo and SH light from a
monocular video by analysis by synthesis (thesis A.1, the "metrical tracker" of MICA).

Unknowns. Per sequence: the identity shape z [S] (initialised from MICA or the mean face and
regularised towards that initialisation), the albedo: by default the coefficients c [K] of a
linear albedo model in the model's UV layout (texture = mean + sum_k c_k sigma_k basis_k,
`dhjax.models.albedo`; cfg.albedo_model: a PCA of synthetic identities' albedos for the default
head, or a FLAME albedo file), or with albedo_model='free' a free texture [A, A, 3]; and a full
perspective camera: one focal length f (pixels, fx = fy) and the principal
point (cx, cy). Per frame: expression [E], neck / jaw / left-eye / right-eye rotations
(axis-angle), the rigid head pose (a 6D rotation and a translation, both camera space),
second-order SH light [9, 3] (camera space) and, with cfg.eyelids, the closing of the left and
right eyelid [2] (the model's eyelid blendshapes, `flame.forward(..., eyelids=)`).

Image formation: the posed FLAME vertices are mapped into camera space by the rigid pose,
``x_cam = R_rig x + t_rig`` (FLAME's global rotation and translation stay zero, so the
per-frame extrinsics are exactly R_rig, t_rig), and projected with K. The model colour of a
surface point is albedo(uv) * irradiance(n), Lambertian SH shading as in `dhjax.render.shading`.

Energy (summed per optimisation step):

* landmarks: mean Euclidean distance between the projected model landmarks and the detected
  ones, in units of the image's longer side, mouth landmarks (iBUG 48-67) weighted
  ``mouth_landmark_factor`` higher (the reference implementation uses 7000 vs 15000, a factor
  of 2.14; the default 2.0 is that ratio rounded, a choice, not the thesis's number);
* dense photometric, sampling-based: fixed surface samples (barycentric points on the face
  faces) are projected into the image and the image is sampled bilinearly there, so the term is
  differentiable in every geometric parameter through the image gradient. Only samples that the
  z-buffer says are visible (their depth within ``depth_tol`` of the rasterised depth, facing
  the camera, inside the image and inside the optional foreground mask) count; visibility is
  recomputed every ``visibility_every`` steps with `dhjax.render.raster`, on the device
  (`visibility_traced`; `visibility` is its host reference) from a z-buffer at the resolution of
  the current pyramid level (cfg.zbuffer='full': always full resolution). L1 over RGB, mean
  over visible samples;
* iris (cfg.iris, for frames with mediapipe's iris points 468-477 and a model that embeds
  them): mean distance between the projected model iris points and the detected ones, in units
  of the image's longer side (the metrical tracker's iris term). mediapipe does not document
  the order of the horizontal contour points (469/471, 474/476; on a frontal photo 469 and 474
  lay image-right of their centres, the default head's order), so each eye's horizontal pair
  counts in the better of its two assignments;
* regularisers: shape towards its initialisation, expression and joint rotations towards zero,
  a temporal term towards the previous frame's expression and pose, total variation of the
  albedo texture, the albedo coefficients' N(0, 1) prior (mean of c^2, with a model), and as
  the metrical tracker: the two eyelids' difference squared (eyelid_symmetry) and the two eye
  rotations' difference squared (eye_symmetry; 0 by default).

The INSTA variant (`insta_variant`, `configs/track.py:insta`, thesis A.2's dataset tracking)
switches on the eyelids, the iris term and the eye symmetry; its shape starts from MICA's prediction and is
regularised towards it, which is the tracker's behaviour whenever a MICA shape is given.

Schedule: a coarse-to-fine image pyramid (level l is the image box-filtered by 2^l). Frame 0:
a rigid landmark stage (rotation, translation and focal length only), then a landmark stage
that also frees shape, expression and jaw, then the full energy at every pyramid level with
albedo, light and intrinsics free. The rigid stage matters: freeing shape and expression while
the pose is still far off lets them absorb the misalignment (a smaller face closer to the
camera), and the priors never pull them all the way back (with the true shape and focal
length, 2 synthetic frames were tracked to 29 mm vertex error without it, 3.3 mm with it).
Later frames start from the previous frame's solution and optimise only the per-frame
unknowns (shape, albedo and intrinsics fixed), again coarse to fine. Adam with a learning rate
per parameter group (`adam_update`: its hyper-parameters are arrays, so one compiled step per
kind of stage, landmarks or photometric, serves every stage, level and frame).

Outputs (`track_sequence`): per-frame parameters, cameras (K, R, t in the OpenCV convention),
landmark and photometric errors, rendered depth and model masks; `write_dataset` stores them in
the `dhjax.data.dataset` layout that INSTA, GEM and SynShot inversion read.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dhjax.geometry import rotations
from dhjax.geometry.mesh import vertex_normals
from dhjax.models import flame
from dhjax.render import camera as camera_lib
from dhjax.render import raster, shading

__all__ = [
    "default_config",
    "insta_variant",
    "FrameData",
    "Static",
    "make_static",
    "frame_data",
    "initial_params",
    "camera_space_vertices",
    "intrinsics_matrix",
    "track_sequence",
    "TrackResult",
    "render_frame",
    "render_result",
    "overlay",
    "write_dataset",
    "DatasetStream",
    "tracks_eyelids",
    "evaluate_synthetic",
]

_HI = jax.lax.Precision.HIGHEST
# Rotation from FLAME's frame (y up, face along +z) to a camera that looks at the face (OpenCV:
# y down, looking along +z): 180 degrees about x.
_FACING = np.diag([1.0, -1.0, -1.0]).astype(np.float32)
_MOUTH_IDS = np.arange(48, 68)
# Regions whose surface is tracked photometrically (skin of the face, and the eyeballs so that
# the eye rotations see their pixels).
PHOTO_REGIONS = ("face", "forehead", "nose", "lips", "eye_region", "eyes")
FRAME_KEYS = ("expression", "neck", "jaw", "eyes", "eyelids", "rot6d", "trans", "sh")
SEQUENCE_KEYS = ("shape", "albedo", "albedo_coeffs", "log_focal", "pp")


def default_config() -> ml_collections.ConfigDict:
    """Tracker settings (the `configs/track.py` variants build on these)."""
    c = ml_collections.ConfigDict()
    c.n_shape = 300                 # shape coefficients optimised (<= the model's)
    c.n_expression = 100            # expression coefficients optimised (<= the model's)
    c.albedo_size = 32              # albedo texture A x A in the UV layout
    c.albedo_model = "synthetic"    # 'synthetic': a linear model, the PCA of synthetic identities'
                                    # albedos (default head only; built once, cached); a path: a
                                    # FLAME albedo npz (dhjax.models.albedo.load; with a FLAME model
                                    # in FLAME's UV layout); 'free': a free texture (before 2026-12-05)
    c.albedo_components = 40        # components of the albedo model used (<= the model's)
    c.albedo_identities = 100       # 'synthetic': identities in its PCA
    c.samples_per_face = 4          # photometric surface samples per face of PHOTO_REGIONS (1 or 4)
    c.pyramid = (2, 1, 0)           # pyramid levels, coarse to fine (image / 2^level)
    c.init_focal = 2.0              # initial focal length / longer image side (fov ~28 degrees)
    c.focal = 0.0                   # > 0: a known focal length in pixels, held fixed (calibrated camera)
    c.principal_point = True        # optimise the principal point (False: image centre)
    c.final_lr = 0.05               # learning rates decay (cosine) to this fraction within a stage
    c.visibility_every = 10         # steps between z-buffer visibility updates
    c.visibility = "device"         # 'device': the visibility is computed on the device and feeds
                                    # the steps there (no host round trip); 'host': numpy
                                    # visibility (`visibility`, the reference, slower)
    c.zbuffer = "level"             # 'level': the visibility z-buffer at the pyramid level's resolution;
                                    # 'full': always at full resolution (before 2026-12-05)
    c.zbuffer_tile = 4              # rasteriser tile of the visibility z-buffer (speed only)
    c.depth_tol = 0.01              # metres: a sample is visible when within this of the z-buffer
    c.eyelids = False               # track the eyelids' closing per frame (needs a model with eyelid
                                    # blendshapes: the default head, or flame.load(..., eyelids=))
    c.iris = False                  # fit mediapipe's iris points (frames that have them, a model
                                    # that embeds them: the default head, or flame.load(..., iris=))
    c.first = ml_collections.ConfigDict(dict(rigid_steps=100, landmark_steps=300, steps=(150, 150, 150)))
    c.frame = ml_collections.ConfigDict(dict(rigid_steps=0, landmark_steps=30, steps=(30, 30, 40)))
    c.lr = ml_collections.ConfigDict(dict(
        shape=0.02, albedo=0.02, albedo_coeffs=0.05, log_focal=0.01, pp=0.002, expression=0.03, neck=0.005, jaw=0.005,
        eyes=0.01, eyelids=0.02, rot6d=0.005, trans=0.002, sh=0.02))
    c.weights = ml_collections.ConfigDict(dict(
        landmark=1.0, mouth_landmark_factor=2.0, photometric=0.05, shape=0.3, expression=1e-2,
        pose=1e-3, temporal=1e-3, albedo_tv=1e-2, albedo_prior=1e-3, iris=1.0, eyelid_symmetry=1e-2,
        eye_symmetry=0.0))
    return c


def insta_variant(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The tracker as INSTA's dataset tracking uses it (thesis A.2): cfg with per-frame eyelids,
    the iris term and the eyes' symmetry prior switched on (changed in place and returned). The
    shape is regularised towards its initialisation, MICA's when one is given, as always."""
    cfg.eyelids = True
    cfg.iris = True
    cfg.weights.eye_symmetry = 0.1
    return cfg


# ----------------------------------------------------------------------------------------------
# Static data: the model and the photometric surface samples.


@dataclasses.dataclass(frozen=True)
class Static:
    """What every step needs besides the parameters (host-side numpy, built once).

    model: FlameModel; sample_faces [P] int32 and sample_bary [P, 3]: photometric surface samples;
    region_vertices [Vr] int32: vertices of PHOTO_REGIONS without the eyeballs (evaluation);
    width, height: image size; depth_tol: metres between a sample and the z-buffer for visibility;
    albedo: `dhjax.models.albedo.AlbedoModel` (the texture is mean + basis x coefficients) or
    None (a free texture).
    """

    model: Any
    sample_faces: np.ndarray
    sample_bary: np.ndarray
    region_vertices: np.ndarray
    width: int
    height: int
    depth_tol: float = 0.01
    albedo: Any = None


def make_static(model, width: int, height: int, samples_per_face: int = 4, depth_tol: float = 0.01,
                albedo=None) -> Static:
    """Surface samples on the faces whose three vertices lie in PHOTO_REGIONS; `albedo`: an
    AlbedoModel (`albedo_model`) or None (a free texture)."""
    if model.regions is None or model.lmk_faces is None or model.uv_coords is None:
        raise ValueError("the tracker needs a head model with regions, a 68-landmark embedding and a "
                         "UV layout (the embedded default has all three; for a FLAME file give its "
                         "landmark embedding and the UV layout through dhjax.models.flame.load)")
    regions = {k: np.asarray(v) for k, v in model.regions.items()}
    missing = [r for r in PHOTO_REGIONS if r not in regions]
    if missing:
        raise ValueError(f"the head model lacks the regions {missing}")
    in_region = np.zeros(model.num_vertices, bool)
    for r in PHOTO_REGIONS:
        in_region |= regions[r]
    faces = np.asarray(model.faces)
    sel = np.where(in_region[faces].all(axis=1))[0].astype(np.int32)
    if samples_per_face == 1:
        bary = np.full((1, 3), 1.0 / 3.0)
    elif samples_per_face == 4:
        bary = np.array([[1 / 3, 1 / 3, 1 / 3], [2 / 3, 1 / 6, 1 / 6], [1 / 6, 2 / 3, 1 / 6],
                         [1 / 6, 1 / 6, 2 / 3]])
    else:
        raise ValueError(f"samples_per_face must be 1 or 4, got {samples_per_face}")
    sample_faces = np.repeat(sel, len(bary)).astype(np.int32)
    sample_bary = np.tile(bary, (len(sel), 1)).astype(np.float32)
    return Static(model=model, sample_faces=sample_faces, sample_bary=sample_bary,
                  region_vertices=np.where(in_region & ~regions["eyes"])[0].astype(np.int32),
                  width=int(width), height=int(height), depth_tol=float(depth_tol), albedo=albedo)


def _is_default_head(model) -> bool:
    """True when `model` has the embedded default head's UV layout."""
    ref = flame.load()
    return (model.uv_coords is not None and np.shape(model.uv_coords) == np.shape(ref.uv_coords)
            and np.shape(model.uv_faces) == np.shape(ref.uv_faces)
            and np.allclose(np.asarray(model.uv_coords), np.asarray(ref.uv_coords))
            and np.array_equal(np.asarray(model.uv_faces), np.asarray(ref.uv_faces)))


def synthetic_albedo_path(n_identities: int, n_components: int, size: int) -> Path:
    """Where `albedo_model` keeps the synthetic PCA of n_identities identities with n_components
    components at size^2: <cache>/albedo-<hash>.npz, the hash over these and the head
    generator's version (`dhjax.data.synthetic.GENERATOR_VERSION`)."""
    from dhjax.data import cache as cache_lib
    from dhjax.data import synthetic as synthetic_lib
    key = dict(n=int(n_identities), k=int(n_components), size=int(size), version=1,
               generator=synthetic_lib.GENERATOR_VERSION)
    return cache_lib.cache_root() / f"albedo-{cache_lib.config_hash(key)}.npz"


def albedo_model(cfg, model, cache: dict | None = None, log: Callable[[str], None] | None = print):
    """The AlbedoModel of cfg.albedo_model (None for 'free'), cfg.albedo_size square, truncated to
    cfg.albedo_components.

    'synthetic': `dhjax.data.albedo_synthetic.build_synthetic(cfg.albedo_identities, components, size)`,
    in the embedded default head's UV layout (refused for another head model), built once and
    kept in the dhjax cache folder (`dhjax.data.cache.cache_root`, $DHJAX_CACHE) as
    albedo-<hash>.npz; a path: `dhjax.models.albedo.load` (FLAME's albedo files, in FLAME's UV
    layout: use it with the FLAME model loaded with that layout). cache: a dict that keeps the
    loaded model between calls (`track_sequence`'s step_cache), so that compiled steps that
    close over it are reused."""
    from dhjax.models import albedo as albedo_lib
    spec = str(cfg.get("albedo_model", "free"))
    if spec == "free":
        return None
    size, k = int(cfg.albedo_size), int(cfg.get("albedo_components", 40))
    if k < 1:
        raise ValueError(f"albedo_components must be >= 1, got {k}")
    key = ("albedo", spec, size, k, int(cfg.get("albedo_identities", 100)))
    if cache is not None and key in cache:
        return cache[key]
    if spec == "synthetic":
        if not _is_default_head(model):
            raise ValueError("albedo_model='synthetic' is a PCA in the embedded default head's UV layout and this "
                             "head model has another one: give a FLAME albedo file (albedo_model=<path to "
                             "FLAME_albedo_from_BFM.npz or FLAME_texture.npz>, with the FLAME model loaded with "
                             "its UV layout) or albedo_model='free'")
        n = int(cfg.get("albedo_identities", 100))
        if not 1 <= k <= n - 1:
            raise ValueError(f"albedo_components={k} must be in [1, albedo_identities - 1 = {n - 1}]")
        from dhjax.data import cache as cache_lib
        path = synthetic_albedo_path(n, k, size)
        root = path.parent
        if path.exists():
            cache_lib.touch(path)
            am = albedo_lib.load(path)
        else:
            if log is not None:
                log(f"albedo model: a PCA of {n} synthetic identities' albedos, {k} components, {size}^2 "
                    f"(once; cached in {path})")
            from dhjax.data import albedo_synthetic
            am = albedo_synthetic.build_synthetic(n, k, size, log=log)
            root.mkdir(parents=True, exist_ok=True)
            albedo_lib.save(path, am)           # atomic
    else:
        am = albedo_lib.load(spec, size=size)
        if am.n_components < k:
            raise ValueError(f"albedo_components={k}, but {spec} has only {am.n_components} components")
    am = albedo_lib.AlbedoModel(mean=am.mean, basis=am.basis[:k], sigma=am.sigma[:k], name=am.name)
    if cache is not None:
        cache[key] = am
    return am


def _albedo_texture(params, albedo):
    """[A, A, 3]: the AlbedoModel `albedo`'s texture of params["albedo_coeffs"], or the free
    texture params["albedo"] when albedo is None."""
    if albedo is None:
        return params["albedo"]
    from dhjax.models import albedo as albedo_lib
    return albedo_lib.texture(albedo, params["albedo_coeffs"])


# ----------------------------------------------------------------------------------------------
# Per-frame observations.


@dataclasses.dataclass(frozen=True)
class FrameData:
    """One frame's observations. image [H, W, 3] float in [0, 1]; landmarks [K, 2] pixels with
    landmark_ids [K] (iBUG-68 indices); mask [H, W] float (1 = pixels the photometric term may
    use; all ones when no segmentation is known); iris [10, 2] pixels, mediapipe's iris points
    468-477 (the subject's right iris centre and contour, then the left's), or None."""

    image: np.ndarray
    landmarks: np.ndarray
    landmark_ids: np.ndarray
    mask: np.ndarray
    iris: np.ndarray | None = None


def frame_data(image, landmarks, landmark_ids, mask=None, *, name: str = "frame", iris=None) -> FrameData:
    """Checks and packs one frame (clear errors for wrong shapes and non-finite values)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    image = image.astype(np.float32)
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name}: image must be [H, W, 3], got {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{name}: image has non-finite values")
    lmk = np.asarray(landmarks, np.float32)
    ids = np.asarray(landmark_ids, np.int32)
    if lmk.ndim != 2 or lmk.shape[1] != 2 or ids.shape != (lmk.shape[0],):
        raise ValueError(f"{name}: landmarks must be [K, 2] with landmark_ids [K], got {lmk.shape} "
                         f"and {ids.shape}")
    if lmk.shape[0] < 5:
        raise ValueError(f"{name}: {lmk.shape[0]} landmarks are too few to fit a face (need >= 5)")
    if ids.min() < 0 or ids.max() > 67:
        raise ValueError(f"{name}: landmark_ids must be iBUG-68 indices in 0..67")
    if not np.all(np.isfinite(lmk)):
        raise ValueError(f"{name}: landmarks have non-finite values")
    H, W = image.shape[:2]
    m = np.ones((H, W), np.float32) if mask is None else np.asarray(mask, np.float32)
    if m.ndim == 3:
        m = m[..., 0]
    if m.shape != (H, W):
        raise ValueError(f"{name}: mask must be [H, W] = {(H, W)}, got {m.shape}")
    if iris is not None:
        iris = np.asarray(iris, np.float32)
        if iris.shape != (10, 2):
            raise ValueError(f"{name}: iris must be [10, 2] (mediapipe's points 468-477), got {iris.shape}")
        if not np.all(np.isfinite(iris)):
            raise ValueError(f"{name}: iris points have non-finite values")
    return FrameData(image=image, landmarks=lmk, landmark_ids=ids, mask=m, iris=iris)


def _pyramid(x, levels: Sequence[int]) -> dict:
    """{level: x box-filtered and subsampled by 2^level} for [H, W, C] arrays (sizes floor)."""
    out = {}
    for lv in sorted(set(int(v) for v in levels)):
        f = 2 ** lv
        H, W = x.shape[0] // f, x.shape[1] // f
        out[lv] = x[:H * f, :W * f].reshape(H, f, W, f, -1).mean(axis=(1, 3)).astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------------
# Parameters and the model.


def initial_params(cfg, static: Static, first: FrameData, shape_init=None) -> dict:
    """Initial parameters: mean albedo, ambient light, the given (or zero) shape, and a rigid
    pose that puts the model's landmarks onto the detected ones (frontal rotation; depth from
    the ratio of 3D to 2D landmark spread with the initial focal length)."""
    model = static.model
    S, E = int(cfg.n_shape), int(cfg.n_expression)
    if S > model.num_shape or E > model.num_expression:
        raise ValueError(f"config asks for {S} shape / {E} expression coefficients, the model has "
                         f"{model.num_shape} / {model.num_expression}")
    z0 = np.zeros(S, np.float32)
    if shape_init is not None:
        shape_init = np.asarray(shape_init, np.float32).reshape(-1)
        if not np.all(np.isfinite(shape_init)):
            raise ValueError("shape_init has non-finite values")
        n = min(S, shape_init.shape[0])
        z0[:n] = shape_init[:n]
    W, H = static.width, static.height
    f = float(cfg.focal) if float(cfg.focal) > 0 else float(cfg.init_focal) * max(W, H)
    out = flame.forward(model, jnp.asarray(z0)[None])
    lmk3 = np.asarray(out.landmarks[0])[first.landmark_ids] @ _FACING.T
    lmk2 = first.landmarks
    c3, c2 = lmk3.mean(0), lmk2.mean(0)
    s3 = np.sqrt(((lmk3[:, :2] - c3[:2]) ** 2).sum(1).mean())
    s2 = np.sqrt(((lmk2 - c2) ** 2).sum(1).mean())
    z = f * s3 / max(s2, 1e-6)
    cx, cy = (W - 1) / 2.0, (H - 1) / 2.0
    centre = np.array([(c2[0] - cx) * z / f, (c2[1] - cy) * z / f, z], np.float32)
    trans = centre - c3
    # Initial albedo: the median colour inside the landmarks' bounding box (and the mask).
    x0, y0 = np.floor(lmk2.min(0)).astype(int)
    x1, y1 = np.ceil(lmk2.max(0)).astype(int) + 1
    x0, y0 = max(x0, 0), max(y0, 0)
    patch, pmask = first.image[y0:y1, x0:x1].reshape(-1, 3), first.mask[y0:y1, x0:x1].reshape(-1) > 0.5
    mean_colour = np.clip(np.median(patch[pmask], axis=0) if pmask.any() else np.full(3, 0.5), 0.05, 1.0)
    A = int(cfg.albedo_size)
    sh = np.zeros((9, 3), np.float32)
    sh[0] = 1.0 / 0.282095
    albedo = jnp.asarray(np.broadcast_to(mean_colour, (A, A, 3)).copy(), jnp.float32)
    coeffs = jnp.zeros((0,), jnp.float32)
    if static.albedo is not None:
        from dhjax.models import albedo as albedo_lib
        if static.albedo.size != A:
            raise ValueError(f"the albedo model is {static.albedo.size}^2, albedo_size is {A}")
        # The model's texture closest to the uniform median colour (ridge: a weak N(0, 1) prior).
        coeffs = albedo_lib.fit_texture(static.albedo, albedo, static.albedo.n_components, ridge=1.0)
        albedo = albedo_lib.texture(static.albedo, coeffs)
    return dict(
        shape=jnp.asarray(z0), albedo=albedo, albedo_coeffs=coeffs,
        log_focal=jnp.asarray(np.log(f / max(W, H)), jnp.float32), pp=jnp.zeros(2, jnp.float32),
        expression=jnp.zeros(E, jnp.float32), neck=jnp.zeros(3, jnp.float32),
        jaw=jnp.zeros(3, jnp.float32), eyes=jnp.zeros((2, 3), jnp.float32),
        eyelids=jnp.zeros(2, jnp.float32), rot6d=rotations.matrix_to_rotation_6d(jnp.asarray(_FACING)), trans=jnp.asarray(trans, jnp.float32),
        sh=jnp.asarray(sh))


def intrinsics_matrix(params, width: int, height: int) -> jax.Array:
    """K [3, 3] from log_focal (focal / longer side) and pp (principal point offset / longer side)."""
    s = float(max(width, height))
    f = jnp.exp(params["log_focal"]) * s
    cx = (width - 1) / 2.0 + params["pp"][0] * s
    cy = (height - 1) / 2.0 + params["pp"][1] * s
    return camera_lib.intrinsics(f, f, cx, cy)


def _flame_pose(params) -> jax.Array:
    """[1, 5, 3] axis-angle pose (global rotation zero: the rigid pose is the camera's)."""
    return jnp.concatenate([jnp.zeros((1, 3)), params["neck"][None], params["jaw"][None],
                            params["eyes"]], axis=0)[None]


def _posed(params, model) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
    """(vertices [V, 3], landmarks [68, 3], iris [10, 3] or None, all camera space; R_rig [3, 3]).
    The eyelids count when the model has eyelid blendshapes and params have them."""
    eyelids = params["eyelids"][None] if model.eyelid_dirs is not None and "eyelids" in params else None
    out = flame.forward(model, params["shape"][None], params["expression"][None], _flame_pose(params),
                        eyelids=eyelids)
    R = rotations.rotation_6d_to_matrix(params["rot6d"])
    to_cam = lambda x: jnp.einsum("ij,nj->ni", R, x, precision=_HI) + params["trans"]
    iris = None if out.iris is None else to_cam(out.iris[0])
    return to_cam(out.vertices[0]), to_cam(out.landmarks[0]), iris, R


def camera_space_vertices(params, model) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(vertices [V, 3] camera space, landmarks [68, 3] camera space, R_rig [3, 3])."""
    verts, lmk, _, R = _posed(params, model)
    return verts, lmk, R


def _iris_distance(proj, target):
    """Mean distance [scalar] between projected iris points proj [10, 2] and detected ones target
    [10, 2] (mediapipe 468-477); each eye's horizontal contour pair (points 1 and 3 of its five)
    is matched in the better of its two orders."""
    d = lambda a, b: jnp.sqrt(jnp.sum((a - b) ** 2, -1) + 1e-12)
    total = 0.0
    for e in (0, 5):
        p, t = proj[e:e + 5], target[e:e + 5]
        fixed = d(p[jnp.array([0, 2, 4])], t[jnp.array([0, 2, 4])]).sum()
        straight = d(p[1], t[1]) + d(p[3], t[3])
        swapped = d(p[1], t[3]) + d(p[3], t[1])
        total = total + fixed + jnp.minimum(straight, swapped)
    return total / 10.0


def _camera(params, width, height) -> camera_lib.Camera:
    """The tracked pinhole camera with identity extrinsics (points are already in camera space)."""
    K = intrinsics_matrix(params, width, height)
    return camera_lib.make_camera(K, jnp.eye(3), jnp.zeros(3), width, height)


def _project(params, x, width: int, height: int):
    """Pixels [N, 2] of camera-space points x [N, 3] under the tracked intrinsics."""
    return camera_lib.project(_camera(params, width, height), x)[0]


def _bilinear(image, uv, size=None):
    """Bilinear samples [P, C] of image [H, W, C] at pixel coordinates uv [P, 2] (pixel centres
    at integers, clamp to edge); differentiable in uv. size: (W', H') (may be traced) when only
    the top-left W' x H' of the array is the image (a pyramid level padded to full size)."""
    H, W = image.shape[:2] if size is None else (size[1], size[0])
    x = jnp.clip(uv[:, 0], 0.0, W - 1.0)
    y = jnp.clip(uv[:, 1], 0.0, H - 1.0)
    x0 = jnp.clip(jnp.floor(x), 0, W - 2).astype(jnp.int32)
    y0 = jnp.clip(jnp.floor(y), 0, H - 2).astype(jnp.int32)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    g = lambda yy, xx: image[yy, xx]
    return ((1 - fx) * (1 - fy) * g(y0, x0) + fx * (1 - fy) * g(y0, x0 + 1)
            + (1 - fx) * fy * g(y0 + 1, x0) + fx * fy * g(y0 + 1, x0 + 1))


def _samples(params, model, sample_faces, sample_bary, verts):
    """Sample positions [P, 3], unit normals [P, 3] (camera space) and UVs [P, 2]."""
    faces = model.faces[sample_faces]
    pos = jnp.einsum("pkc,pk->pc", verts[faces], sample_bary, precision=_HI)
    nrm = jnp.einsum("pkc,pk->pc", vertex_normals(verts, model.faces)[faces], sample_bary, precision=_HI)
    nrm = nrm / jnp.maximum(jnp.linalg.norm(nrm, axis=-1, keepdims=True), 1e-12)
    uvf = model.uv_faces[sample_faces]
    uv = jnp.einsum("pkc,pk->pc", model.uv_coords[uvf], sample_bary, precision=_HI)
    return pos, nrm, uv


# ----------------------------------------------------------------------------------------------
# Energy and steps.


def _photometric_error(params, verts, image, vis, model, sample_faces, sample_bary, width, height, albedo,
                       scale=None, size=None):
    """(mean L1 over RGB and the visible samples vis [P], the albedo texture [A, A, 3]): the
    image (pyramid level `scale` = 2^l of size `size`, or full resolution when None) sampled at
    the projected surface samples against albedo x SH irradiance."""
    pos, nrm, uv = _samples(params, model, sample_faces, sample_bary, verts)
    px = _project(params, pos, width, height)
    observed = _bilinear(image, px if scale is None else (px + 0.5) / scale - 0.5, size)
    alb = _albedo_texture(params, albedo)
    colour = shading.sample_texture(alb, uv) * shading.sh_irradiance(nrm, params["sh"])
    return jnp.sum(vis[:, None] * jnp.abs(observed - colour)) / (3.0 * jnp.maximum(jnp.sum(vis), 1.0)), alb


def _loss(params, obs, cfg_w, model, sample_faces, sample_bary, width, height, photometric, albedo=None):
    """Total energy and its terms. obs: dict of arrays for one frame (`_obs`): the pyramid level's
    image sits in the top-left of obs["image"] [H, W, 3], of size obs["level_size"] (W', H'),
    and obs["level_scale"] = 2^level."""
    verts, lmk, iris, _ = _posed(params, model)
    scale = float(max(width, height))
    lm2 = _project(params, lmk[obs["landmark_ids"]], width, height)
    dist = jnp.sqrt(jnp.sum((lm2 - obs["landmarks"]) ** 2, -1) + 1e-12) / scale
    lw = obs["landmark_weights"]
    e_lmk = jnp.sum(lw * dist) / jnp.sum(lw)
    terms = {"landmark": e_lmk}
    total = cfg_w["landmark"] * e_lmk
    if iris is not None:
        # obs["has_iris"] is 0 for frames without iris points or with cfg.iris off.
        e_iris = _iris_distance(_project(params, iris, width, height), obs["iris"]) / scale
        terms.update(iris=e_iris)
        total = total + cfg_w["iris"] * obs["has_iris"] * e_iris
    e_sym = jnp.sum((params["eyelids"][0] - params["eyelids"][1]) ** 2)
    e_eye_sym = jnp.sum((params["eyes"][0] - params["eyes"][1]) ** 2)
    terms.update(eyelid_symmetry=e_sym, eye_symmetry=e_eye_sym)
    total = total + cfg_w["eyelid_symmetry"] * e_sym + cfg_w["eye_symmetry"] * e_eye_sym
    if photometric:
        e_photo, alb = _photometric_error(params, verts, obs["image"], obs["visible"], model, sample_faces,
                                          sample_bary, width, height, albedo, obs["level_scale"],
                                          obs["level_size"])
        tv = (jnp.mean(jnp.abs(alb[1:] - alb[:-1])) + jnp.mean(jnp.abs(alb[:, 1:] - alb[:, :-1])))
        terms.update(photometric=e_photo, albedo_tv=tv)
        total = total + cfg_w["photometric"] * e_photo + cfg_w["albedo_tv"] * tv
    if albedo is not None:
        e_alb = jnp.mean(params["albedo_coeffs"] ** 2)
        terms.update(albedo_prior=e_alb)
        total = total + cfg_w["albedo_prior"] * e_alb
    e_shape = jnp.mean((params["shape"] - obs["shape_init"]) ** 2)
    e_expr = jnp.mean(params["expression"] ** 2)
    e_pose = jnp.sum(params["neck"] ** 2) + jnp.sum(params["jaw"] ** 2) + jnp.sum(params["eyes"] ** 2)
    e_temp = (jnp.mean((params["expression"] - obs["prev"]["expression"]) ** 2)
              + jnp.sum((params["jaw"] - obs["prev"]["jaw"]) ** 2)
              + jnp.sum((params["neck"] - obs["prev"]["neck"]) ** 2)) * obs["has_prev"]
    total = (total + cfg_w["shape"] * e_shape + cfg_w["expression"] * e_expr + cfg_w["pose"] * e_pose
             + cfg_w["temporal"] * e_temp)
    terms.update(shape=e_shape, expression=e_expr, pose=e_pose, temporal=e_temp, total=total)
    return total, terms


_B1, _B2, _EPS = 0.9, 0.999, 1e-8      # Adam's constants (optax.adam's defaults)


def adam_init(params) -> dict:
    """Adam state of `adam_update`: first and second moments (zeros like params) and the count."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    return dict(m=zeros, v=jax.tree.map(jnp.zeros_like, params), count=jnp.zeros((), jnp.int32))


def adam_update(grads, state, params, hyper):
    """One Adam step per parameter group (the top-level keys of params) with a cosine decay of
    each group's learning rate to `final` x lr over `total` steps: constant rates leave Adam
    jittering around the optimum by about one learning rate (2 mm of translation is a pixel at
    typical distances). Frozen groups (free[k] = 0) are not moved. Equals optax.adam with
    optax.cosine_decay_schedule(lr, total, alpha=final) per free group and set_to_zero for the
    frozen ones, but every hyper-parameter is an array: one compiled step serves every stage.

    hyper: dict(lr={group: scalar}, free={group: 0/1 scalar}, total: scalar steps of the stage,
    final: scalar). Returns (new params, new state)."""
    count = state["count"]
    t = (count + 1).astype(jnp.float32)
    total = jnp.maximum(hyper["total"], 1.0)
    frac = jnp.minimum(count.astype(jnp.float32), total) / total
    decay = (1.0 - hyper["final"]) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)) + hyper["final"]
    m = jax.tree.map(lambda m, g: _B1 * m + (1 - _B1) * g, state["m"], grads)
    v = jax.tree.map(lambda v, g: _B2 * v + (1 - _B2) * g * g, state["v"], grads)
    c1, c2 = 1 - _B1 ** t, 1 - _B2 ** t
    new = {}
    for k in params:
        step = jax.tree.map(lambda mk, vk: (mk / c1) / (jnp.sqrt(vk / c2) + _EPS), m[k], v[k])
        scale = hyper["lr"][k] * decay * hyper["free"][k]
        new[k] = jax.tree.map(lambda p, u: p - scale * u, params[k], step)
    return new, dict(m=m, v=v, count=count + 1)


def stage_hyper(cfg, free: Sequence[str], steps: int) -> dict:
    """`adam_update`'s hyper-parameters of a stage (float32 arrays) and the energy's weights."""
    f32 = lambda x: jnp.asarray(float(x), jnp.float32)
    w = {k: f32(v) for k, v in cfg.weights.items() if k != "mouth_landmark_factor"}
    return dict(lr={k: f32(v) for k, v in cfg.lr.items()}, free={k: f32(k in free) for k in cfg.lr},
                total=f32(max(int(steps), 1)), final=f32(cfg.final_lr), weights=w)


def _step_fn(static: Static, photometric: bool):
    """(jitted step, jitted visibility) of the energy, photometric or landmarks only. Stage
    details (pyramid level, free groups, learning rates, step count, weights) are arguments
    (`_obs`, `stage_hyper`), so one compilation serves every stage of that kind. The visibility
    (`visibility_traced`) is compiled per z-buffer level, tile and capacity; its output stays
    on the device and feeds the next steps. (A lax.fori_loop over a stage's steps measured no
    faster on a CPU and took 1.5x longer to compile.)"""
    model = static.model
    sample_faces, sample_bary = jnp.asarray(static.sample_faces), jnp.asarray(static.sample_bary)
    width, height = static.width, static.height

    def update(params, opt_state, obs, hyper):
        (loss, terms), grads = jax.value_and_grad(_loss, has_aux=True)(
            params, obs, hyper["weights"], model, sample_faces, sample_bary, width, height, photometric,
            static.albedo)
        params, opt_state = adam_update(grads, opt_state, params, hyper)
        return params, opt_state, terms

    vis = jax.jit(functools.partial(visibility_traced, static=static),
                  static_argnames=("capacity", "level", "tile"))
    return jax.jit(update), vis


@jax.jit
def _vertices_jit(params, model):
    return camera_space_vertices(params, model)


@jax.jit
def _posed_jit(params, model):
    return _posed(params, model)


def _zbuffer_camera(params, static: Static, level: int) -> camera_lib.Camera:
    """The tracked camera at pyramid level `level` (image / 2^level, sizes floor as in
    `_pyramid`): pixel centre (j, i) of the level is full-resolution (2^l (j + 0.5) - 0.5, ...)."""
    f = 2 ** int(level)
    K = intrinsics_matrix(params, static.width, static.height)
    Kl = jnp.stack([K[0] / f, K[1] / f, K[2]]).at[0, 2].add((0.5 - 0.5 * f) / f).at[1, 2].add((0.5 - 0.5 * f) / f)
    return camera_lib.make_camera(Kl, jnp.eye(3), jnp.zeros(3), static.width // f, static.height // f)


def visibility(params, static: Static, mask=None, level: int = 0, tile: int = 4) -> np.ndarray:
    """[P] float32: 1 for photometric samples that the z-buffer sees (host side, no gradients;
    the reference of `visibility_traced`).

    A sample is visible when its full-resolution pixel (nearest) lies inside the image and the
    mask, its normal faces the camera, and its depth is within `static.depth_tol` of the
    z-buffer's at its nearest pixel of pyramid level `level` (the z-buffer is rasterised at
    image / 2^level: level 0 is full resolution). tile: the rasteriser's tile size (speed
    only, the result does not depend on it)."""
    model = static.model
    verts, _, _ = _vertices_jit(params, model)
    cam = _zbuffer_camera(params, static, level)
    frags = raster.rasterize(verts[None], model.faces, cam, tile_size=int(tile))
    depth = np.asarray(frags.depth[0])
    hit = np.asarray(frags.mask[0])
    pos, nrm, _ = _samples(params, model, jnp.asarray(static.sample_faces), jnp.asarray(static.sample_bary), verts)
    pos, nrm = np.asarray(pos), np.asarray(nrm)
    px = np.asarray(_project(params, jnp.asarray(pos), static.width, static.height))
    W, H = static.width, static.height
    ix, iy = np.rint(px[:, 0]).astype(int), np.rint(px[:, 1]).astype(int)
    inside = (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H) & (pos[:, 2] > 1e-3)
    ixc, iyc = np.clip(ix, 0, W - 1), np.clip(iy, 0, H - 1)
    Hl, Wl = depth.shape
    f = 2.0 ** int(level)
    jl = np.clip(np.rint((px[:, 0] + 0.5) / f - 0.5).astype(int), 0, Wl - 1)
    il = np.clip(np.rint((px[:, 1] + 0.5) / f - 0.5).astype(int), 0, Hl - 1)
    facing = np.einsum("pc,pc->p", nrm, pos) < 0.0
    front = hit[il, jl] & (np.abs(depth[il, jl] - pos[:, 2]) < static.depth_tol)
    vis = inside & facing & front
    if mask is not None:
        vis &= np.asarray(mask)[iyc, ixc] > 0.5
    return vis.astype(np.float32)


def visibility_traced(params, static: Static, mask, capacity: int, level: int = 0,
                      tile: int = 4) -> tuple[jax.Array, jax.Array]:
    """`visibility` as a traceable function (no host round trip; jit it or call it under jit).

    params: tracker parameters; mask [H, W] float (1 = usable; ones when unknown); capacity:
    static (face, tile) intersections of the z-buffer at `level` (`zbuffer_capacity`); level,
    tile: as in `visibility`. Returns (visible [P] float32, overflow: bool scalar, True when
    capacity was too small and the z-buffer incomplete: the caller must retry with more)."""
    model = static.model
    params = jax.lax.stop_gradient(params)
    verts, _, _ = camera_space_vertices(params, model)
    cam = _zbuffer_camera(params, static, level)
    frags = raster.rasterize(verts[None], model.faces, cam, capacity=int(capacity), tile_size=int(tile))
    depth, hit = frags.depth[0], frags.mask[0]
    pos, nrm, _ = _samples(params, model, jnp.asarray(static.sample_faces), jnp.asarray(static.sample_bary), verts)
    px = _project(params, pos, static.width, static.height)
    W, H = static.width, static.height
    ix, iy = jnp.rint(px[:, 0]).astype(jnp.int32), jnp.rint(px[:, 1]).astype(jnp.int32)
    inside = (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H) & (pos[:, 2] > 1e-3)
    ixc, iyc = jnp.clip(ix, 0, W - 1), jnp.clip(iy, 0, H - 1)
    Hl, Wl = depth.shape
    f = 2.0 ** int(level)
    jl = jnp.clip(jnp.rint((px[:, 0] + 0.5) / f - 0.5).astype(jnp.int32), 0, Wl - 1)
    il = jnp.clip(jnp.rint((px[:, 1] + 0.5) / f - 0.5).astype(jnp.int32), 0, Hl - 1)
    facing = jnp.einsum("pc,pc->p", nrm, pos, precision=_HI) < 0.0
    front = hit[il, jl] & (jnp.abs(depth[il, jl] - pos[:, 2]) < static.depth_tol)
    vis = inside & facing & front & (mask[iyc, ixc] > 0.5)
    return vis.astype(jnp.float32), frags.overflow[0]


def zbuffer_capacity(params, static: Static, level: int = 0, tile: int = 4) -> int:
    """A static z-buffer capacity for `visibility_traced` while the pose stays near `params`:
    the exact intersection count now, with 50 % headroom, rounded up to a power of two (few
    distinct values, so that compiled stages are reused from frame to frame)."""
    verts, _, _ = _vertices_jit(params, static.model)
    cam = _zbuffer_camera(params, static, level)
    n = int(jnp.max(raster.count_intersections(verts[None], static.model.faces, cam, tile_size=int(tile))))
    return 1 << max(int(np.ceil(np.log2(max(1.5 * n, 1024.0)))), 10)


# ----------------------------------------------------------------------------------------------
# Tracking.


@dataclasses.dataclass
class TrackResult:
    """Per-frame results (lists over frames) and the sequence-level parameters."""

    params: list            # per frame: dict of numpy parameters (all keys of initial_params)
    K: np.ndarray           # [T, 3, 3]
    R: np.ndarray           # [T, 3, 3] world (FLAME) -> camera
    t: np.ndarray           # [T, 3]
    landmark_error_px: np.ndarray   # [T] mean distance of the fitted to the given landmarks
    photometric_error: np.ndarray   # [T] mean L1 (per channel) over visible samples, full resolution
    seconds: float


def _obs(frame: FrameData, level: int, pyr: dict, shape_init, prev, has_prev, mouth_factor, visible,
         use_iris: bool = False):
    """The step's observations. The level's image is padded to full size (top-left), so that
    every level has one shape and one compiled step serves them all. The iris points are
    zeros with has_iris = 0 when the frame has none or use_iris is off."""
    has_iris = bool(use_iris) and frame.iris is not None
    iris = frame.iris if has_iris else np.zeros((10, 2), np.float32)
    lw = np.where(np.isin(frame.landmark_ids, _MOUTH_IDS), float(mouth_factor), 1.0).astype(np.float32)
    img = pyr[level]
    full = np.zeros(frame.image.shape, np.float32)
    full[:img.shape[0], :img.shape[1]] = img
    return dict(image=jnp.asarray(full), level_scale=jnp.asarray(2.0 ** int(level), jnp.float32),
                level_size=jnp.asarray([img.shape[1], img.shape[0]], jnp.float32),
                landmarks=jnp.asarray(frame.landmarks),
                landmark_ids=jnp.asarray(frame.landmark_ids), landmark_weights=jnp.asarray(lw),
                shape_init=jnp.asarray(shape_init), visible=jnp.asarray(visible),
                prev={k: jnp.asarray(prev[k]) for k in ("expression", "jaw", "neck")},
                has_prev=jnp.asarray(float(has_prev)), iris=jnp.asarray(iris),
                has_iris=jnp.asarray(float(has_iris)))


def _run_stage(params, static, frame, pyr, *, free, level, photometric, steps, cfg, shape_init, prev,
               has_prev, compiled, log=None, label="", timings=None):
    t0 = time.perf_counter()
    mouth = float(cfg.weights.mouth_landmark_factor)
    use_iris = bool(cfg.get("iris", False))
    hyper = stage_hyper(cfg, free, steps)
    step, vis_fn = _compiled_fns(compiled, static, photometric)
    mode = str(cfg.get("visibility", "device"))
    if mode not in ("device", "host"):
        raise ValueError(f"tracker visibility must be 'device' or 'host', got {mode!r}")
    every = int(cfg.visibility_every)
    if every < 1:
        raise ValueError(f"visibility_every must be >= 1, got {every}")
    zmode = str(cfg.get("zbuffer", "level"))
    if zmode not in ("level", "full"):
        raise ValueError(f"tracker zbuffer must be 'level' or 'full', got {zmode!r}")
    zlevel = int(level) if zmode == "level" else 0
    tile = int(cfg.get("zbuffer_tile", 4))
    if tile < 1:
        raise ValueError(f"zbuffer_tile must be >= 1, got {tile}")
    vis = np.zeros(static.sample_faces.shape[0], np.float32)
    terms = None
    if mode == "device":
        obs = _obs(frame, level, pyr, shape_init, prev, has_prev, mouth, vis, use_iris)
        mask = jnp.asarray(frame.mask)
        capacity = zbuffer_capacity(params, static, zlevel, tile) if photometric else 0
        start = params
        while True:
            params, opt_state, overflow = start, adam_init(start), []
            for i in range(int(steps)):
                if photometric and i % every == 0:
                    v, ovf = vis_fn(params, mask=mask, capacity=capacity, level=zlevel, tile=tile)
                    obs = dict(obs, visible=v)
                    overflow.append(ovf)
                params, opt_state, terms = step(params, opt_state, obs, hyper)
            if not photometric or not bool(jnp.any(jnp.stack(overflow))):
                break
            capacity *= 2          # the z-buffer was incomplete somewhere: redo the stage
    else:
        opt_state = adam_init(params)
        for i in range(int(steps)):
            if photometric and i % every == 0:
                vis = visibility(params, static, frame.mask, zlevel, tile)
            obs = _obs(frame, level, pyr, shape_init, prev, has_prev, mouth, vis, use_iris)
            params, opt_state, terms = step(params, opt_state, obs, hyper)
    if static.albedo is not None:
        params = dict(params, albedo=_albedo_texture(params, static.albedo))
    if timings is not None:
        jax.block_until_ready(params)
        _add_time(timings, ("frame/" if has_prev else "first/") + label, time.perf_counter() - t0)
    if log is not None and terms is not None:
        t = {k: float(v) for k, v in terms.items()}
        log(f"  {label}: " + ", ".join(f"{k} {v:.4g}" for k, v in t.items() if k in
                                       ("total", "landmark", "photometric")))
    return params


def _add_time(timings: dict, key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + float(seconds)


def _compiled_fns(compiled: dict, static: Static, photometric: bool):
    """`_step_fn(static, photometric)`, compiled once per kind and head model in `compiled`."""
    # Everything the compiled functions close over.
    key = (bool(photometric), id(static.model), id(static.albedo), static.width, static.height,
           static.sample_faces.shape[0], static.depth_tol)
    if key not in compiled:
        compiled[key] = ((static.model, static.albedo), _step_fn(static, bool(photometric)))
    return compiled[key][1]


def _full_visibility(params, static: Static, frame: FrameData, cfg, compiled: dict) -> jax.Array:
    """[P] visibility with the full-resolution z-buffer: on the device (`visibility_traced`, a
    larger z-buffer when the first was too small) or on the host, as cfg.visibility says."""
    tile = int(cfg.get("zbuffer_tile", 4))
    if str(cfg.get("visibility", "device")) == "host":
        return jnp.asarray(visibility(params, static, frame.mask, 0, tile))
    vis_fn = _compiled_fns(compiled, static, True)[1]
    capacity = zbuffer_capacity(params, static, 0, tile)
    while True:
        vis, overflow = vis_fn(params, mask=jnp.asarray(frame.mask), capacity=capacity, level=0, tile=tile)
        if not bool(overflow):
            return vis
        capacity *= 2


@jax.jit
def _errors_jit(params, model, sample_faces, sample_bary, image, landmarks, landmark_ids, vis):
    H, W = image.shape[:2]
    verts, lmk, _ = camera_space_vertices(params, model)
    lm2 = _project(params, lmk[landmark_ids], W, H)
    lerr = jnp.mean(jnp.linalg.norm(lm2 - landmarks, axis=-1))
    perr, _ = _photometric_error(params, verts, image, vis, model, sample_faces, sample_bary, W, H, None)
    return lerr, perr


def _frame_errors(params, static: Static, frame: FrameData, vis) -> tuple[float, float]:
    """(landmark error px, photometric L1 over the visible samples `vis` [P] at full resolution)."""
    lerr, perr = _errors_jit(params, static.model, jnp.asarray(static.sample_faces), jnp.asarray(static.sample_bary),
                             jnp.asarray(frame.image), jnp.asarray(frame.landmarks),
                             jnp.asarray(frame.landmark_ids), jnp.asarray(vis))
    return float(lerr), float(perr)


def _fingerprint(cfg, shape_init, width: int, height: int) -> dict:
    """What a resumed run must share with the run that wrote the progress folder."""
    z = None if shape_init is None else hashlib.sha1(np.asarray(shape_init, np.float32).tobytes()).hexdigest()
    return dict(config=json.loads(cfg.to_json()), shape_init=z, width=int(width), height=int(height))


def _frame_hash(frame: FrameData) -> str:
    h = hashlib.sha1()
    for a in (frame.image, frame.landmarks, frame.landmark_ids, frame.mask) + (
            () if frame.iris is None else (frame.iris,)):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _load_progress(folder, fingerprint: dict, frames: Sequence[FrameData], log) -> list[dict]:
    """Frames already tracked into `folder` by an earlier (killed) run with the same config,
    shape initialisation and frames: a list of dicts (params, K, R, t, landmark_error_px,
    photometric_error), possibly empty. A folder written for other settings is an error."""
    folder = Path(folder)
    meta = folder / "progress.json"
    if not meta.exists():
        folder.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(fingerprint, indent=1))
        return []
    old = json.loads(meta.read_text())
    for key in ("config", "shape_init", "width", "height"):
        if old.get(key) != fingerprint[key]:
            raise ValueError(f"{folder} holds tracking progress of a run with another {key}; resume with the "
                             "same settings, or use a new workdir (or delete that folder) to start over")
    done = []
    for i, fr in enumerate(frames):
        f = folder / f"frame_{i:04d}.npz"
        if not f.exists():
            break
        with np.load(f) as z:
            if str(z["frame_hash"]) != _frame_hash(fr):
                raise ValueError(f"{f} was tracked from a different frame {i} (other image, landmarks or mask); "
                                 "use a new workdir (or delete that folder) to start over")
            done.append(dict(params={k[2:]: z[k] for k in z.files if k.startswith("p_")},
                             K=z["K"], R=z["R"], t=z["t"], landmark_error_px=float(z["landmark_error_px"]),
                             photometric_error=float(z["photometric_error"])))
    if done and log is not None:
        log(f"resuming: {len(done)} of {len(frames)} frame(s) already tracked in {folder}")
    return done


def _save_progress(folder, i: int, frame: FrameData, rec: Mapping[str, Any]) -> None:
    """Writes one tracked frame atomically (a kill mid-write leaves no half file)."""
    folder = Path(folder)
    tmp = folder / f".frame_{i:04d}.tmp.npz"
    np.savez(tmp, frame_hash=np.asarray(_frame_hash(frame)), K=rec["K"], R=rec["R"], t=rec["t"],
             landmark_error_px=rec["landmark_error_px"], photometric_error=rec["photometric_error"],
             **{f"p_{k}": v for k, v in rec["params"].items()})
    os.replace(tmp, folder / f"frame_{i:04d}.npz")


def tracks_eyelids(cfg, model) -> bool:
    """Whether `track_sequence` tracks the eyelids: cfg.eyelids and a model with eyelid blendshapes."""
    return bool(cfg.get("eyelids", False)) and model.eyelid_dirs is not None


def track_sequence(cfg, model, frames: Sequence[FrameData], *, shape_init=None,
                   log: Callable[[str], None] | None = print, progress_dir=None,
                   step_cache: dict | None = None, timings: dict | None = None,
                   on_frame: Callable[[int, dict], None] | None = None) -> TrackResult:
    """Tracks frames (one image sequence of one person) in order; see the module docstring.

    Args:
      cfg: `default_config()`-like ConfigDict.
      model: FlameModel with regions, landmarks and UVs (the embedded default, or a FLAME file).
      frames: FrameData per frame, all of one size.
      shape_init: [S'] shape coefficients from MICA (or None for the mean face).
      log: progress printer (None: silent).
      progress_dir: a folder where every tracked frame is saved as soon as it is done; a run
        killed part way and started again with the same settings and frames continues after the
        last saved frame (the result equals an uninterrupted run's). None: nothing is saved.
      step_cache: a dict shared between calls to reuse compiled optimisation steps (e.g. when
        tracking several sequences of one size with one config); None: a fresh one per call.
      timings: a dict that receives seconds per stage, summed over frames and keyed
        "first/<stage>" (frame 0) and "frame/<stage>" (later frames), stages "rigid",
        "landmarks", "level <l>", and "first/errors" / "frame/errors" (the per-frame error
        evaluation); compilation counts where it happens. None: nothing is timed (timing adds a
        device synchronisation after each stage).
      on_frame: called as on_frame(i, record) for every frame in order as soon as it is tracked
        (or read back from progress_dir), record = dict(params, K [3, 3], R [3, 3], t [3],
        landmark_error_px, photometric_error): a consumer can use frames while later ones are
        still being tracked (INSTA's live online mode). None: no calls.
    """
    if len(frames) == 0:
        raise ValueError("no frames to track")
    H, W = frames[0].image.shape[:2]
    for i, fr in enumerate(frames):
        if fr.image.shape[:2] != (H, W):
            raise ValueError(f"frame {i} is {fr.image.shape[:2]}, frame 0 is {(H, W)}: all frames must "
                             "have one size")
    compiled = {} if step_cache is None else step_cache
    use_eyelids = tracks_eyelids(cfg, model)
    if bool(cfg.get("eyelids", False)) and not use_eyelids and log is not None:
        log(f"eyelids: the model {model.name!r} has no eyelid blendshapes; the eyelids are not tracked "
            "(flame.load(..., eyelids=(l_eyelid.npy, r_eyelid.npy)) adds them)")
    if bool(cfg.get("iris", False)) and log is not None:
        if model.iris_faces is None:
            log(f"iris: the model {model.name!r} embeds no iris points; the iris term is off "
                "(flame.load(..., iris=flame.METRICAL_TRACKER_IRIS_VERTICES) adds them for FLAME)")
        elif not any(fr.iris is not None for fr in frames):
            log("iris: no frame has iris points (mediapipe's 478-point mesh); the iris term is off")
    static = make_static(model, W, H, int(cfg.samples_per_face), float(cfg.depth_tol),
                         albedo=albedo_model(cfg, model, compiled, log))
    t0 = time.time()
    params = initial_params(cfg, static, frames[0], shape_init)
    z0 = np.asarray(params["shape"])
    levels = tuple(int(v) for v in cfg.pyramid)
    out_params, Ks, Rs, ts, lerr, perr = [], [], [], [], [], []
    prev = {k: np.asarray(params[k]) for k in ("expression", "jaw", "neck")}
    done = [] if progress_dir is None else _load_progress(progress_dir, _fingerprint(cfg, shape_init, W, H),
                                                           frames, log)
    for rec in done:
        out_params.append(rec["params"])
        Ks.append(rec["K"])
        Rs.append(rec["R"])
        ts.append(rec["t"])
        lerr.append(rec["landmark_error_px"])
        perr.append(rec["photometric_error"])
        if on_frame is not None:
            on_frame(len(out_params) - 1, dict(rec))
    if done:
        params = jax.tree.map(jnp.asarray, dict(done[-1]["params"]))
        prev = {k: done[-1]["params"][k] for k in ("expression", "jaw", "neck")}
    for i, fr in enumerate(frames):
        if i < len(done):
            continue
        pyr = _pyramid(fr.image, levels)
        first = i == 0
        sc = cfg.first if first else cfg.frame
        free_lmk = (("rot6d", "trans", "log_focal", "shape", "expression", "jaw") if first
                    else ("rot6d", "trans", "expression", "jaw"))
        # Eyelids and gaze show in the landmarks once they are tracked (lid landmarks, iris).
        free_lmk += (("eyelids",) if use_eyelids else ()) + (("eyes",) if bool(cfg.get("iris", False)) else ())
        free = (FRAME_KEYS + SEQUENCE_KEYS) if first else FRAME_KEYS
        fixed = (("log_focal",) if float(cfg.focal) > 0 else ()) + (() if cfg.principal_point else ("pp",))
        # With an albedo model its coefficients are solved and the texture follows from them.
        fixed += ("albedo",) if static.albedo is not None else ("albedo_coeffs",)
        fixed += () if use_eyelids else ("eyelids",)
        free = tuple(k for k in free if k not in fixed)
        free_lmk = tuple(k for k in free_lmk if k not in fixed)
        common = dict(cfg=cfg, shape_init=z0, prev=prev, has_prev=not first, compiled=compiled,
                      log=log if first else None, timings=timings)
        if int(sc.get("rigid_steps", 0)) > 0:
            rigid = tuple(k for k in ("rot6d", "trans", "log_focal") if k not in fixed)
            params = _run_stage(params, static, fr, pyr, free=rigid, level=levels[-1], photometric=False,
                                steps=int(sc.rigid_steps), label="rigid", **common)
        if int(sc.landmark_steps) > 0:
            params = _run_stage(params, static, fr, pyr, free=free_lmk, level=levels[-1], photometric=False,
                                steps=int(sc.landmark_steps), label="landmarks", **common)
        steps = tuple(int(s) for s in sc.steps)
        if len(steps) != len(levels):
            raise ValueError(f"steps {steps} must give one count per pyramid level {levels}")
        for lv, n in zip(levels, steps):
            if n > 0:
                params = _run_stage(params, static, fr, pyr, free=free, level=lv, photometric=True, steps=n,
                                    label=f"level {lv}", **common)
        te = time.perf_counter()
        le, pe = _frame_errors(params, static, fr, _full_visibility(params, static, fr, cfg, compiled))
        if timings is not None:
            _add_time(timings, ("first" if first else "frame") + "/errors", time.perf_counter() - te)
        p_np = jax.tree.map(np.asarray, params)
        out_params.append(p_np)
        K = np.asarray(intrinsics_matrix(params, W, H))
        Ks.append(K)
        Rs.append(np.asarray(rotations.rotation_6d_to_matrix(params["rot6d"])))
        ts.append(np.asarray(params["trans"]))
        lerr.append(le)
        perr.append(pe)
        prev = {k: p_np[k] for k in ("expression", "jaw", "neck")}
        rec = dict(params=p_np, K=K, R=Rs[-1], t=ts[-1], landmark_error_px=le, photometric_error=pe)
        if progress_dir is not None:
            _save_progress(progress_dir, i, fr, rec)
        if on_frame is not None:
            on_frame(i, rec)
        if log is not None:
            log(f"frame {i + 1}/{len(frames)}: landmarks {le:.2f} px, photometric {pe:.4f}, "
                f"focal {K[0, 0]:.1f} px ({time.time() - t0:.1f} s)")
    return TrackResult(params=out_params, K=np.stack(Ks), R=np.stack(Rs), t=np.stack(ts),
                       landmark_error_px=np.asarray(lerr), photometric_error=np.asarray(perr),
                       seconds=time.time() - t0)


# ----------------------------------------------------------------------------------------------
# Rendering, overlays, export, evaluation.


def flame_parameters(p: Mapping[str, np.ndarray], eyelids: bool | None = None) -> dict:
    """FLAME parameters of one tracked frame in `flame.forward`'s layout (global rotation and
    translation zero; the rigid pose is the camera's extrinsics). eyelids: include the eyelids [2]
    (True; zeros when p has none), leave them out (False), or None: include them when they are
    not all zero (pass True for every frame of a sequence where any frame has them, so that all
    frames have the same keys: `tracked_eyelids`)."""
    pose = np.concatenate([np.zeros((1, 3)), p["neck"][None], p["jaw"][None], p["eyes"]], 0)
    out = dict(shape=np.asarray(p["shape"], np.float32), expression=np.asarray(p["expression"], np.float32),
               pose=pose.astype(np.float32), translation=np.zeros(3, np.float32),
               sh=np.asarray(p["sh"], np.float32))
    lids = np.asarray(p.get("eyelids", np.zeros(2)), np.float32)    # [2] left, right closing
    if eyelids or (eyelids is None and np.any(lids != 0)):
        out["eyelids"] = lids
    return out


def tracked_eyelids(params: Sequence[Mapping[str, np.ndarray]]) -> bool:
    """Whether any frame of a tracked sequence has eyelids that are not zero (were tracked)."""
    return any(np.any(np.asarray(p.get("eyelids", 0.0)) != 0) for p in params)


def render_frame(p: Mapping[str, np.ndarray], model, width: int, height: int) -> dict:
    """Renders a tracked frame: image (albedo x light) [H, W, 3], shading (grey mesh under a
    fixed light) [H, W, 3], mask [H, W], depth [H, W] (metres, 0 outside), landmarks [68, 2]
    and, for a model with iris points, iris [10, 2] (mediapipe 468-477)."""
    params = jax.tree.map(jnp.asarray, dict(p))
    verts, lmk, iris, _ = _posed_jit(params, model)
    cam = _camera(params, width, height)
    fr = shading.render_mesh(verts[None], model.faces, cam, uv_coords=model.uv_coords, uv_faces=model.uv_faces,
                             albedo_texture=params["albedo"], sh_coeffs=params["sh"])
    light = np.zeros((9, 3), np.float32)
    light[0], light[2], light[1] = 2.2, -1.2, -0.6      # ambient + light from the camera and above
    grey = shading.render_mesh(verts[None], model.faces, cam, sh_coeffs=jnp.asarray(light))
    lm2 = _project(params, lmk, width, height)
    out = dict(image=np.asarray(fr["image"][0]), shading=np.clip(np.asarray(grey["image"][0]), 0, 1),
               mask=np.asarray(fr["mask"][0, ..., 0]), depth=np.asarray(fr["depth"][0]),
               landmarks=np.asarray(lm2))
    if iris is not None:
        out["iris"] = np.asarray(_project(params, iris, width, height))
    return out


def _dots(image, points, colour, radius=1):
    H, W = image.shape[:2]
    for x, y in np.rint(points).astype(int):
        image[max(y - radius, 0):min(y + radius + 1, H), max(x - radius, 0):min(x + radius + 1, W)] = colour
    return image


def overlay(frame: FrameData, rendered: Mapping[str, np.ndarray], alpha: float = 0.6) -> np.ndarray:
    """Two panels side by side, [H, 2W, 3] float: the frame with the tracked mesh (grey shading)
    blended over it, the given landmarks (green) and the fitted ones (red); and the frame with
    the model's own colours (albedo x SH light) pasted where the mesh covers it."""
    m = rendered["mask"][..., None]
    left = frame.image * (1 - m * alpha) + rendered["shading"] * m * alpha
    r = max(1, int(round(max(left.shape[:2]) / 256)))
    left = _dots(left.copy(), frame.landmarks, (0.1, 1.0, 0.1), r)
    left = _dots(left, rendered["landmarks"][frame.landmark_ids], (1.0, 0.1, 0.1), r)
    right = frame.image * (1 - m) + np.clip(rendered["image"], 0, 1) * m
    return np.concatenate([left, right], axis=1)


def render_result(result: TrackResult, model, width: int, height: int) -> list[dict]:
    """`render_frame` of every tracked frame (render once, pass to `overlay`, `write_dataset`
    and `evaluate_synthetic`)."""
    return [render_frame(p, model, width, height) for p in result.params]


def _renders(result: TrackResult, model, width: int, height: int, renders) -> list[dict]:
    if renders is None:
        return render_result(result, model, width, height)
    if len(renders) != len(result.params):
        raise ValueError(f"{len(renders)} renders for {len(result.params)} tracked frames")
    return list(renders)


def check_mattes(mattes, frames: Sequence[FrameData]) -> list[np.ndarray] | None:
    """Foreground mattes for a tracked sequence's dataset, one [H, W] float in [0, 1] per frame
    (1 = the subject: head and hair, as a video matting method gives them), checked against the
    frames (count, size, finite, range); None passes through (the dataset then stores the
    tracked mesh's silhouette). The dataset's masks are binary: `dhjax.data.dataset.Writer`
    stores them thresholded at 0.5, so a soft matte's edge is not kept."""
    if mattes is None:
        return None
    mattes = [np.asarray(m, np.float32) for m in mattes]
    if len(mattes) != len(frames):
        raise ValueError(f"{len(mattes)} masks for {len(frames)} frames")
    for i, (m, fr) in enumerate(zip(mattes, frames)):
        if m.shape != fr.image.shape[:2]:
            raise ValueError(f"mask {i} is {m.shape}, its frame {fr.image.shape[:2]} (masks are [H, W])")
        if not np.all(np.isfinite(m)) or m.min() < 0.0 or m.max() > 1.0:
            raise ValueError(f"mask {i} has values outside [0, 1] or non-finite values")
    return mattes


def write_dataset(root, result: TrackResult, frames: Sequence[FrameData], model, *, item: int = 0,
                  split: str = "train", meta: Mapping[str, Any] | None = None, renders=None, mattes=None):
    """Stores a tracked sequence in the `dhjax.data.dataset` layout (kind 'video'): frames, masks
    (`mattes` when given, see `check_mattes`, else the tracked mesh's silhouette), cameras, FLAME
    parameters and rendered depth. renders: `render_result(result, ...)` if already computed.
    Returns the path of meta.json."""
    import shutil

    from dhjax.data.dataset import Writer
    H, W = frames[0].image.shape[:2]
    renders = _renders(result, model, W, H, renders)
    mattes = check_mattes(mattes, frames)
    if Path(root).exists():       # a whole sequence: no frames or meta entries of an earlier one stay
        shutil.rmtree(root)
    writer = Writer(root, split, kind="video", meta=dict(meta or {}, source="dhjax.capture.tracker"))
    lids = tracked_eyelids(result.params)
    for i, (fr, p, r) in enumerate(zip(frames, result.params, renders)):
        fp = flame_parameters(p, eyelids=lids)
        writer.add(dict(image=fr.image, mask=r["mask"] if mattes is None else mattes[i], K=result.K[i],
                        R=result.R[i], t=result.t[i], depth=r["depth"], item=item, frame=i, view=0, **fp))
    return writer.close()


class DatasetStream:
    """Writes a tracked sequence into the `dhjax.data.dataset` layout (kind 'video', as
    `write_dataset`) frame by frame, as the tracker delivers them: pass `stream.add` as
    `track_sequence(on_frame=...)`. A consumer can then train on the first frames while later
    ones are still being tracked (INSTA's live online mode with data.root,
    `dhjax.synthesis.insta_run.FolderFeed`).

    Protocol (what a reader may rely on):
    * The folder is emptied and meta.json written when the first frame arrives, before its
      folder (a tracker that fails before, e.g. on progress of other settings, leaves an earlier
      dataset alone), then rewritten atomically after every frame, with "live": {"run": an id of this stream,
      "frames": N (the sequence's length), "tracked": frames written so far, "done": bool,
      "error": the tracker's error or None}. A changed "run" means another tracker run
      restarted the folder.
    * Frame i is the folder <split>/item_XXXXXXX/frame_{i:04d}; it is complete once its
      cameras.json (written last, atomically) exists. Frames come in order, one view each.
    Frames read back from a resumed tracker's progress are written again (the folder restarts).

    Args:
      root: dataset folder; frames: the sequence's FrameData (their images are written);
      model: the head model (depth, and masks without `mattes`, are the tracked mesh's,
        `render_frame`); mattes: the frames' foreground masks (`check_mattes`) or None;
      eyelids: write the tracked eyelids (`tracks_eyelids(cfg, model)` of the tracking); item,
        split, meta: as `write_dataset`. (`write_dataset` decides from the result instead,
        `tracked_eyelids`; the two differ only when tracked eyelids stayed exactly zero.)
    The renders of the frames (`render_frame`) are kept in `renders` for the overlay.
    """

    def __init__(self, root, frames: Sequence[FrameData], model, *, eyelids: bool, item: int = 0,
                 split: str = "train", meta: Mapping[str, Any] | None = None, mattes=None):
        import uuid

        self.root = Path(root)
        self.frames, self.model, self.eyelids, self.item = list(frames), model, bool(eyelids), int(item)
        self.mattes = check_mattes(mattes, self.frames)
        self.split, self.size = split, self.frames[0].image.shape[:2]
        self.meta = dict(meta or {}, source="dhjax.capture.tracker", pose_joints=5)
        self.run = uuid.uuid4().hex[:12]
        self.renders: list[dict] = []
        self.writer = None

    def _start(self) -> None:
        import shutil

        from dhjax.data.dataset import Writer
        if self.root.exists():
            shutil.rmtree(self.root)
        self.writer = Writer(self.root, self.split, kind="video", meta=self.meta)
        self._live(done=False, error=None)     # meta.json before any frame folder: a reader waits

    def _live(self, *, done: bool, error: str | None) -> None:
        self.writer.meta["live"] = {"run": self.run, "frames": len(self.frames), "tracked": len(self.renders),
                                    "done": bool(done), "error": error}
        self.writer.close()

    def add(self, i: int, rec: Mapping[str, Any]) -> None:
        """Writes tracked frame i (a `track_sequence` record: params, K, R, t); frames come in order."""
        if i != len(self.renders):
            raise ValueError(f"frame {i} arrived after {len(self.renders)} frames; a stream takes them in order")
        if self.writer is None:
            self._start()
        H, W = self.size
        r = render_frame(rec["params"], self.model, W, H)
        fp = flame_parameters(rec["params"], eyelids=self.eyelids)
        mask = r["mask"] if self.mattes is None else self.mattes[i]
        self.writer.add(dict(image=self.frames[i].image, mask=mask, K=rec["K"], R=rec["R"], t=rec["t"],
                             depth=r["depth"], item=self.item, frame=i, view=0, **fp))
        self.renders.append(r)
        self._live(done=False, error=None)

    def finish(self) -> Path:
        """Marks the dataset done (every frame written); returns the path of meta.json."""
        if len(self.renders) != len(self.frames):
            raise ValueError(f"{len(self.renders)} of {len(self.frames)} frames were written")
        self._live(done=True, error=None)
        return self.root / "meta.json"

    def fail(self, error: BaseException | str) -> None:
        """Records the tracker's error in meta.json (a reader waiting for frames stops with it);
        before the first frame, an earlier dataset in the folder is left alone."""
        if self.writer is not None:
            if isinstance(error, (SystemExit, KeyboardInterrupt)):    # SIGTERM or Ctrl-C, not a failure
                error = f"the tracker was stopped ({type(error).__name__}); rerunning it resumes"
            self._live(done=False, error=str(error) or type(error).__name__)


def shape_error_mm(model, shape, shape_true) -> float:
    """Median distance (mm) over all vertices between the neutral meshes of two shape vectors."""
    a = np.asarray(flame.forward(model, jnp.asarray(shape, jnp.float32).reshape(1, -1)).v_shaped[0])
    b = np.asarray(flame.forward(model, jnp.asarray(shape_true, jnp.float32).reshape(1, -1)).v_shaped[0])
    return float(np.median(np.linalg.norm(a - b, axis=-1)) * 1e3)


def evaluate_synthetic(result: TrackResult, gt_samples: Sequence[Mapping[str, np.ndarray]], model,
                       static_region=None, renders=None) -> dict:
    """Errors against synthetic ground truth (samples of `dhjax.data.synthetic.VideoGenerator`).

    shape_error_mm: `shape_error_mm` of the tracked identity shape; vertex_median_mm: median over frames and face-region vertices of the camera-space distance
    between tracked and true vertices (no alignment: metric depth errors count);
    vertex_aligned_median_mm: the same after a per-frame rigid alignment (shape + expression
    quality only); depth_rmse_mm: RMSE of the tracked depth against the true depth over pixels
    that are face skin in the ground truth (seg == face) and covered by the tracked mesh;
    gaze_error_deg: mean angle between the tracked and the true gaze (eyeball centre to iris
    centre, camera space) over frames and eyes, for a model with iris points (NaN otherwise).
    Also per-frame arrays and the focal-length error.
    """
    from dhjax.geometry import alignment
    if len(gt_samples) != len(result.params):
        raise ValueError(f"{len(gt_samples)} ground-truth samples for {len(result.params)} tracked frames")
    region = make_static(model, 2, 2).region_vertices if static_region is None else static_region
    H, W = gt_samples[0]["image"].shape[:2]
    renders = _renders(result, model, W, H, renders)
    vmed, vamed, drmse, ferr, gaze = [], [], [], [], []
    for p, s, r in zip(result.params, gt_samples, renders):
        out = flame.forward(model, jnp.asarray(s["shape"])[None], jnp.asarray(s["expression"])[None],
                            jnp.asarray(s["pose"])[None], jnp.asarray(s["translation"])[None])
        gt = np.asarray(out.vertices[0]) @ np.asarray(s["R"]).T + np.asarray(s["t"])
        if out.iris is not None:
            fp = flame_parameters(p)
            est_out = flame.forward(model, fp["shape"][None], fp["expression"][None], fp["pose"][None],
                                    eyelids=None if "eyelids" not in fp else fp["eyelids"][None])
            R_est = np.asarray(rotations.rotation_6d_to_matrix(jnp.asarray(p["rot6d"])))
            a = _gaze_directions(est_out, R_est)
            b = _gaze_directions(out, np.asarray(s["R"]))
            gaze.append(np.degrees(np.arccos(np.clip(np.sum(a * b, -1), -1.0, 1.0))))
        est, _, _ = _vertices_jit(jax.tree.map(jnp.asarray, dict(p)), model)
        est = np.asarray(est)
        d = np.linalg.norm(est[region] - gt[region], axis=-1)
        vmed.append(d)
        sc, R, t = alignment.umeyama(jnp.asarray(est[region]), jnp.asarray(gt[region]), with_scale=False)
        al = np.asarray(alignment.apply_similarity(sc, R, t, jnp.asarray(est[region])))
        vamed.append(np.linalg.norm(al - gt[region], axis=-1))
        sel = (np.asarray(s["seg"]) == 1) & (r["mask"] > 0.5) & (np.asarray(s["depth"]) > 0)
        if sel.any():
            drmse.append(float(np.sqrt(np.mean((r["depth"][sel] - np.asarray(s["depth"])[sel]) ** 2))))
        else:
            drmse.append(float("nan"))
        ferr.append(abs(float(p["log_focal"]) - float(np.log(np.asarray(s["K"])[0, 0] / max(W, H)))))
    v = np.concatenate(vmed)
    va = np.concatenate(vamed)
    return dict(
        shape_error_mm=shape_error_mm(model, result.params[-1]["shape"], gt_samples[0]["shape"]),
        vertex_median_mm=float(np.median(v) * 1e3), vertex_mean_mm=float(np.mean(v) * 1e3),
        vertex_aligned_median_mm=float(np.median(va) * 1e3),
        depth_rmse_mm=float(np.sqrt(np.nanmean(np.square(drmse))) * 1e3),
        per_frame_vertex_median_mm=[float(np.median(x) * 1e3) for x in vmed],
        per_frame_depth_rmse_mm=[float(x * 1e3) for x in drmse],
        focal_relative_error=float(np.mean(np.expm1(np.abs(ferr)))),
        landmark_error_px=float(np.mean(result.landmark_error_px)),
        photometric_error=float(np.mean(result.photometric_error)),
        gaze_error_deg=float(np.mean(gaze)) if gaze else float("nan"))


def _gaze_directions(out, R) -> np.ndarray:
    """[2, 3] unit gaze directions (right eye, left eye) in camera space: eyeball centre (eye
    joint) to iris centre, rotated by R [3, 3]."""
    iris = np.asarray(out.iris[0])[[0, 5]]
    centres = np.asarray(out.joints[0])[[4, 3]]            # joint 4 is the right eye
    d = (iris - centres) @ np.asarray(R).T
    return d / np.linalg.norm(d, axis=-1, keepdims=True)

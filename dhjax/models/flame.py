"""FLAME as pure functions: a model pytree, loaders, and the forward pass.

    model = flame.load()                      # the embedded procedural default head
    model = flame.load("FLAME2020/generic_model.pkl",
                       landmarks="landmark_embedding.npy")   # the official (licensed) model
    out = flame.forward(model, shape, expression, pose, translation)
    out.vertices [B, V, 3], out.joints [B, 5, 3], out.landmarks [B, 68, 3]   (metres)
    out = flame.forward(model, shape, expression, pose, eyelids=eyelids)   # [B, 2] closing
    out.iris [B, 10, 3]                         # mediapipe's iris points 468-477

The forward pass has the semantics of ``smplx.lbs.lbs`` for FLAME: shape and expression
blendshapes on the template, joints regressed from the shaped template, pose correctives from
the flattened (R_j - I) of joints 1..4 (neck, jaw, left eye, right eye), then linear blend
skinning along the kinematic tree [-1, 0, 1, 1, 1]. jit, vmap and grad work through it.

The embedded default is NOT FLAME and NOT a statistical model of real people: see
`dhjax.models.head_default`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dhjax.geometry import lbs as lbs_lib
from dhjax.geometry import rotations
from dhjax.models import head_default

JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")
FLAME_PARENTS = (-1, 0, 1, 1, 1)
POSE_REPS = ("axis_angle", "6d", "6d_rows", "matrix")
# FLAME vertices at mediapipe's iris points, as the metrical tracker (MICA's tracker, used by
# INSTA) lists them: the centre of the iris first, then four contour points, one row per eye.
# `load(..., iris=METRICAL_TRACKER_IRIS_VERTICES)`; the rows are assigned to the eyes by the side
# of the template they lie on.
METRICAL_TRACKER_IRIS_VERTICES = ((4597, 4542, 4510, 4603, 4570), (4051, 3996, 3964, 3932, 4028))


class BlendBasisViews:
    """The views of a model's stacked blend basis shared by `FlameModel` and
    `dhjax.models.body.BodyModel`: blend_basis [1 + S + E, V, 3] (template, S shape rows, E
    expression rows) and the static num_shape S."""

    @property
    def v_template(self) -> jax.Array:
        """[V, 3] template vertices (metres), row 0 of the blend basis."""
        return self.blend_basis[0]

    @property
    def shapedirs(self) -> jax.Array:
        """[num_shape, V, 3] shape blend shapes."""
        return self.blend_basis[1: 1 + self.num_shape]

    @property
    def exprdirs(self) -> jax.Array:
        """[num_expression, V, 3] expression blend shapes."""
        return self.blend_basis[1 + self.num_shape:]

    @property
    def num_vertices(self) -> int:
        """Number of vertices V."""
        return self.blend_basis.shape[1]

    @property
    def num_expression(self) -> int:
        """Number of expression components."""
        return self.blend_basis.shape[0] - 1 - self.num_shape


@flax.struct.dataclass
class FlameModel(BlendBasisViews):
    """A FLAME-layout head model (all arrays float32 metres unless stated).

    blend_basis [1 + S + E, V, 3]: row 0 is the template, rows 1..S the shape blendshapes,
      the last E rows the expression blendshapes (component-major: the transpose of the
      official [V, 3, K] files). The properties `v_template` [V, 3], `shapedirs` [S, V, 3] and
      `exprdirs` [E, V, 3] slice it. One stacked basis makes the shaped template a single
      matrix product [1, shape, expression] @ basis, which XLA keeps as one buffer; with separate
      bases XLA:CPU fused the sum into every consumer and B=64 ran twice as slow.
    faces [F, 3] int32; posedirs [36, V, 3] (component-major; features: row-major (R_j - I) for
    joints 1..4); j_regressor [5, V]; lbs_weights [V, 5];
    lmk_faces [L] int32 + lmk_bary [L, 3] (68 iBUG landmarks, or None);
    mp_lmk_faces [M] + mp_lmk_bary [M, 3] + mp_indices [M] (mediapipe subset, or None);
    uv_coords [T, 2] + uv_faces [F, 3] (UV layout, or None); regions {name: [V] bool} (or None);
    eyelid_dirs [2, V, 3] (eyelid closing blendshapes of the left and right eye, or None; the
    metrical tracker's extra blendshapes, `forward(..., eyelids=)`);
    iris_faces [10] + iris_bary [10, 3] (mediapipe's iris points 468-477 on the eyeballs: the
    subject's right iris centre and four contour points, then the left eye's; or None).
    Static: num_shape (S), parents (the kinematic tree), name (where the model came from).
    `official_arrays(model)` gives the arrays back in the official file layout.
    """

    blend_basis: jax.Array
    faces: jax.Array
    posedirs: jax.Array
    j_regressor: jax.Array
    lbs_weights: jax.Array
    lmk_faces: Any = None
    lmk_bary: Any = None
    mp_lmk_faces: Any = None
    mp_lmk_bary: Any = None
    mp_indices: Any = None
    uv_coords: Any = None
    uv_faces: Any = None
    regions: Any = None
    eyelid_dirs: Any = None
    iris_faces: Any = None
    iris_bary: Any = None
    num_shape: int = flax.struct.field(pytree_node=False, default=0)
    parents: tuple = flax.struct.field(pytree_node=False, default=FLAME_PARENTS)
    name: str = flax.struct.field(pytree_node=False, default="")


@flax.struct.dataclass
class FlameOutput:
    """vertices [B, V, 3], joints [B, 5, 3], landmarks [B, L, 3] (or None),
    landmarks_mp [B, M, 3] (or None), v_shaped [B, V, 3] (neutral pose, with blendshapes),
    iris [B, 10, 3] (mediapipe's iris points 468-477, or None)."""

    vertices: jax.Array
    joints: jax.Array
    landmarks: Any = None
    landmarks_mp: Any = None
    v_shaped: Any = None
    iris: Any = None


def from_arrays(arrays: Mapping[str, Any], name: str = "", n_shape: int | None = None,
                n_expression: int | None = None) -> FlameModel:
    """Builds a FlameModel from arrays in the official layout.

    Args:
      arrays: v_template [V, 3], faces [F, 3], shapedirs [V, 3, S], exprdirs [V, 3, E],
        posedirs [V, 3, 36], j_regressor [5, V], lbs_weights [V, 5]; optional parents [5],
        lmk_faces/lmk_bary, mp_lmk_faces/mp_lmk_bary/mp_indices, uv_coords/uv_faces, regions,
        eyelids [V, 3, 2] (left, right closing blendshapes), iris_faces [10] + iris_bary [10, 3].
      name: where the model came from (kept as static metadata).
      n_shape, n_expression: keep only the leading components.
    """
    sd, ed = np.asarray(arrays["shapedirs"]), np.asarray(arrays["exprdirs"])
    n_shape = sd.shape[-1] if n_shape is None else n_shape
    n_expression = ed.shape[-1] if n_expression is None else n_expression
    for what, n, avail in (("n_shape", n_shape, sd.shape[-1]),
                           ("n_expression", n_expression, ed.shape[-1])):
        if not 0 <= n <= avail:
            raise ValueError(f"{what}={n} but the model {name!r} has {avail} components")
    template = np.asarray(arrays["v_template"], np.float32)
    V = template.shape[0]
    for key, shape in (("v_template", (V, 3)), ("shapedirs", (V, 3, sd.shape[-1])),
                       ("exprdirs", (V, 3, ed.shape[-1])), ("posedirs", (V, 3, 36)),
                       ("j_regressor", (5, V)), ("lbs_weights", (V, 5))):
        if np.shape(arrays[key]) != shape:
            raise ValueError(f"model {name!r}: {key} must have shape {shape}, got {np.shape(arrays[key])}")
    basis = np.concatenate([template[None], np.moveaxis(sd[..., :n_shape], -1, 0),
                            np.moveaxis(ed[..., :n_expression], -1, 0)], axis=0)
    opt = lambda k, dtype=jnp.float32: None if arrays.get(k) is None else jnp.asarray(arrays[k], dtype)
    regions = arrays.get("regions")
    eyelids = arrays.get("eyelids")
    if eyelids is not None and np.shape(eyelids) != (V, 3, 2):
        raise ValueError(f"model {name!r}: eyelids must have shape {(V, 3, 2)}, got {np.shape(eyelids)}")
    for key, shape in (("iris_faces", (10,)), ("iris_bary", (10, 3))):
        if arrays.get(key) is not None and np.shape(arrays[key]) != shape:
            raise ValueError(f"model {name!r}: {key} must have shape {shape}, got {np.shape(arrays[key])}")
    return FlameModel(
        blend_basis=jnp.asarray(basis, jnp.float32),
        faces=jnp.asarray(arrays["faces"], jnp.int32),
        posedirs=jnp.asarray(np.moveaxis(np.asarray(arrays["posedirs"]), -1, 0), jnp.float32),
        j_regressor=jnp.asarray(arrays["j_regressor"], jnp.float32),
        lbs_weights=jnp.asarray(arrays["lbs_weights"], jnp.float32),
        lmk_faces=opt("lmk_faces", jnp.int32), lmk_bary=opt("lmk_bary"),
        mp_lmk_faces=opt("mp_lmk_faces", jnp.int32), mp_lmk_bary=opt("mp_lmk_bary"),
        mp_indices=opt("mp_indices", jnp.int32),
        uv_coords=opt("uv_coords"), uv_faces=opt("uv_faces", jnp.int32),
        regions=None if regions is None else {k: jnp.asarray(v, bool) for k, v in regions.items()},
        eyelid_dirs=None if eyelids is None else jnp.asarray(np.moveaxis(np.asarray(eyelids), -1, 0),
                                                             jnp.float32),
        iris_faces=opt("iris_faces", jnp.int32), iris_bary=opt("iris_bary"),
        num_shape=int(n_shape),
        parents=tuple(int(p) for p in arrays.get("parents", FLAME_PARENTS)),
        name=name,
    )


def load(path: str | os.PathLike | None = None, *, landmarks: str | os.PathLike | None = None,
         mediapipe: str | os.PathLike | None = None, uv: str | os.PathLike | None = None,
         n_shape: int | None = None, n_expression: int | None = None,
         file_n_shape: int | None = None, eyelids=None, iris=None) -> FlameModel:
    """Loads a head model.

    Args:
      path: None for the embedded procedural default head (`dhjax.models.head_default`), or the
        official FLAME model file (`generic_model.pkl` / `FLAME2020/*.pkl`, chumpy-free loading)
        or an `.npz` with the same keys.
      landmarks: landmark embedding file. DECA/MICA's `landmark_embedding.npy` gives the 68 iBUG
        points (`forward(...).landmarks` is [B, 68, 3]); smplx's `flame_static_embedding.pkl`
        holds only the 51 inner points, iBUG 17..67 (then landmarks is [B, 51, 3], index k
        standing for iBUG point 17 + k). DECA's dynamic jaw-contour table is not used.
      mediapipe: mediapipe landmark embedding (`mediapipe_landmark_embedding.npz`).
      uv: FLAME UV layout (`head_template.obj` or `FLAME_texture.npz`).
      n_shape, n_expression: keep only the leading components (e.g. 100 / 50 to save compute).
      file_n_shape: how many of the file's blendshapes are shape components (the rest are
        expression); needed only for files that are not in the official 300 + 100 layout.
      eyelids: two eyelid blendshape files ([V, 3] .npy each, metres per unit: the metrical
        tracker's `l_eyelid.npy` and `r_eyelid.npy`), in either order: each is assigned to the
        eye on whose side of the template (x > 0: the subject's left) it moves vertices.
      iris: [2, 5] vertex ids of the iris centre and four contour points per eye (in mediapipe's
        468-472 / 473-477 order), e.g. `METRICAL_TRACKER_IRIS_VERTICES` for FLAME 2020's
        topology; the rows are assigned to the eyes by the template's x (right eye first).

    Returns:
      A FlameModel pytree. The default already carries landmarks, a mediapipe subset, UVs and
      region masks; for the official model these are present only when their files are given.
    """
    if path is None:
        if any(x is not None for x in (landmarks, mediapipe, uv, eyelids, iris)):
            raise ValueError("landmarks/mediapipe/uv/eyelids/iris apply to an official FLAME model; "
                             "the embedded default carries its own (pass path= as well)")
        arrays = head_default.build_default_head_arrays()
        return from_arrays(arrays, "dhjax-default-head (procedural, not a statistical model)",
                         n_shape, n_expression)

    from dhjax.io import flame_files  # the I/O floor; imported lazily to keep start-up light

    raw = flame_files.load_flame_arrays(path, n_shape=file_n_shape)
    ns = int(raw["n_shape"])
    arrays = dict(v_template=raw["v_template"], faces=raw["f"],
                  shapedirs=raw["shapedirs"][..., :ns], exprdirs=raw["shapedirs"][..., ns:],
                  posedirs=raw["posedirs"], j_regressor=raw["J_regressor"],
                  lbs_weights=raw["weights"], parents=raw["parents"])
    n_faces = int(raw["f"].shape[0])
    if landmarks is not None:
        emb = flame_files.load_landmark_embedding(landmarks, n_faces=n_faces)
        arrays["lmk_faces"], arrays["lmk_bary"] = emb["faces_idx"], emb["bary"]
    if mediapipe is not None:
        emb = flame_files.load_landmark_embedding(mediapipe, n_faces=n_faces)
        arrays["mp_lmk_faces"], arrays["mp_lmk_bary"] = emb["faces_idx"], emb["bary"]
        arrays["mp_indices"] = emb.get("indices")
    if uv is not None:
        arrays["uv_coords"], arrays["uv_faces"] = flame_files.load_flame_uv(uv)
        if arrays["uv_faces"].shape[0] != n_faces:
            raise ValueError(f"{uv}: {arrays['uv_faces'].shape[0]} UV faces but the model "
                             f"{path} has {n_faces} faces")
    if eyelids is not None:
        arrays["eyelids"] = _eyelid_pair(eyelids, arrays["v_template"])
    if iris is not None:
        arrays["iris_faces"], arrays["iris_bary"] = iris_embedding(iris, arrays["v_template"], arrays["faces"])
    return from_arrays(arrays, os.fspath(path), n_shape, n_expression)


def _eyelid_pair(files, template) -> np.ndarray:
    """[V, 3, 2] (left, right) from two [V, 3] blendshape files in either order."""
    if isinstance(files, (str, os.PathLike)) or len(files) != 2:
        raise ValueError(f"eyelids must be two files (left and right eyelid blendshapes), got {files!r}")
    V = np.shape(template)[0]
    by_side = {}
    for f in files:
        if not os.path.exists(f):
            raise FileNotFoundError(f"eyelid blendshape file {f} does not exist")
        d = np.load(f).astype(np.float64)
        if d.ndim == 3 and d.shape[0] == 1:
            d = d[0]
        if d.shape != (V, 3):
            raise ValueError(f"{f}: an eyelid blendshape must be [V, 3] = {(V, 3)}, got {d.shape}")
        if not np.all(np.isfinite(d)):
            raise ValueError(f"{f}: non-finite values")
        w = np.linalg.norm(d, axis=1)
        if w.sum() == 0:
            raise ValueError(f"{f}: the blendshape moves no vertex")
        side = "left" if float(np.sum(w * np.asarray(template)[:, 0])) > 0 else "right"
        if side in by_side:
            raise ValueError(f"both eyelid files move the {side} eye ({by_side[side][0]} and {f})")
        by_side[side] = (f, d)
    return np.stack([by_side["left"][1], by_side["right"][1]], -1).astype(np.float32)


def iris_embedding(vertex_ids, template, faces) -> tuple[np.ndarray, np.ndarray]:
    """Faces [10] + barycentrics [10, 3] of iris points given as vertex ids [2, 5] (either eye
    first; the row whose first vertex has x < 0 in the template is the subject's right eye,
    mediapipe's 468-472)."""
    ids = np.asarray(vertex_ids)
    template, faces = np.asarray(template), np.asarray(faces)
    if ids.shape != (2, 5) or ids.dtype.kind not in "iu":
        raise ValueError(f"iris must be [2, 5] integer vertex ids (centre + 4 contour points per eye), "
                         f"got {ids.shape} {ids.dtype}")
    if ids.min() < 0 or ids.max() >= template.shape[0]:
        raise ValueError(f"iris vertex ids must lie in 0..{template.shape[0] - 1}, got {ids.min()}..{ids.max()}")
    xs = template[ids[:, 0], 0]
    if (xs[0] < 0) == (xs[1] < 0):
        raise ValueError(f"the two iris rows lie on one side of the head (x = {xs.tolist()})")
    ids = ids if xs[0] < 0 else ids[::-1]
    out_f, out_b = [], []
    for v in ids.reshape(-1):
        hits = np.argwhere(faces == v)
        if len(hits) == 0:
            raise ValueError(f"iris vertex {int(v)} belongs to no face of the model")
        f, k = hits[0]
        out_f.append(f)
        out_b.append(np.eye(3)[k])
    return np.asarray(out_f, np.int32), np.asarray(out_b, np.float32)


def official_arrays(model: FlameModel) -> dict:
    """The model's arrays as numpy in the official FLAME layout (bases [V, 3, K]).

    Keys: v_template, faces, shapedirs, exprdirs, posedirs, j_regressor, lbs_weights, parents.
    """
    return dict(v_template=np.asarray(model.v_template), faces=np.asarray(model.faces),
                shapedirs=np.moveaxis(np.asarray(model.shapedirs), 0, -1),
                exprdirs=np.moveaxis(np.asarray(model.exprdirs), 0, -1),
                posedirs=np.moveaxis(np.asarray(model.posedirs), 0, -1),
                j_regressor=np.asarray(model.j_regressor),
                lbs_weights=np.asarray(model.lbs_weights), parents=np.asarray(model.parents))


def _coeffs(x, n_avail, what, batch):
    if x is None:
        return jnp.zeros((batch, n_avail), jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2 or x.shape[0] != batch:
        raise ValueError(f"{what} must be [B={batch}, K], got {x.shape}")
    if x.shape[1] > n_avail:
        raise ValueError(f"{what} has {x.shape[1]} coefficients but the model has {n_avail}")
    return jnp.pad(x, ((0, 0), (0, n_avail - x.shape[1])))


def pose_to_matrices(pose, pose_rep: str = "axis_angle", n_joints: int = 5):
    """Converts a pose in any supported representation to rotation matrices.

    Args:
      pose: per `pose_rep`: "axis_angle" [B, J, 3] radians; "6d" [B, J, 6] the first two
        COLUMNS of each rotation matrix (Zhou et al.); "6d_rows" [B, J, 6] the first two ROWS
        (the pytorch3d `matrix_to_rotation_6d` convention used by the metrical tracker and
        other PyTorch code: pass their 6D parameters with this); "matrix" [B, J, 3, 3].
        Flattened [B, J*3] / [B, J*6] are accepted too.
    Returns:
      [B, J, 3, 3].
    """
    if pose_rep not in POSE_REPS:
        raise ValueError(f"pose_rep must be one of {POSE_REPS}, got {pose_rep!r}")
    pose = jnp.asarray(pose, jnp.float32)
    per_joint, to_matrix, label = {
        "axis_angle": ((3,), rotations.axis_angle_to_matrix, "axis-angle"),
        "6d": ((6,), rotations.rotation_6d_to_matrix, "6D"),
        # Gram-Schmidt on rows = the transpose of Gram-Schmidt on columns.
        "6d_rows": ((6,), lambda d: jnp.swapaxes(rotations.rotation_6d_to_matrix(d), -1, -2),
                    "6D (rows)"),
        "matrix": ((3, 3), lambda m: m, "matrix"),
    }[pose_rep]
    if pose.ndim == 2 and len(per_joint) == 1 and pose.shape[1] == per_joint[0] * n_joints:
        pose = pose.reshape(pose.shape[0], n_joints, per_joint[0])   # flattened [B, J*3] / [B, J*6]
    expected = (n_joints,) + per_joint
    if pose.ndim != 1 + len(expected) or pose.shape[1:] != expected:
        raise ValueError(f"{label} pose must be [B, {', '.join(map(str, expected))}], got {pose.shape}")
    return to_matrix(pose)


def _batch_size(*xs):
    for x in xs:
        if x is not None:
            shape = np.shape(x)
            if len(shape) == 0:
                raise ValueError("FLAME parameters need a leading batch dimension")
            return shape[0]
    return 1


def forward(model: FlameModel, shape=None, expression=None, pose=None, translation=None, *,
            pose_rep: str = "axis_angle", eyelids=None) -> FlameOutput:
    """FLAME forward pass.

    Args:
      model: a FlameModel (`load`).
      shape: [B, S'] identity coefficients, S' <= model.num_shape (missing ones are zero); None = 0.
      expression: [B, E'] expression coefficients, E' <= model.num_expression; None = 0.
      pose: per joint (global, neck, jaw, left eye, right eye): [B, 5, 3] axis-angle radians
        (default), [B, 5, 6] with pose_rep="6d" (first two matrix columns) or "6d_rows" (first
        two rows, pytorch3d's convention), [B, 5, 3, 3] with pose_rep="matrix"; None = rest.
      translation: [B, 3] metres, added after skinning; None = 0.
      eyelids: [B, 2] closing of the left and right eyelid (0 open as modelled, 1 shut), for a
        model with eyelid blendshapes (`model.eyelid_dirs`); None = 0. They are added with the
        expression blendshapes before skinning, so they follow the head's rotation. (The
        metrical tracker adds them after skinning, unrotated by the neck; the two agree when the
        neck rotation is zero.)

    Returns:
      FlameOutput with vertices [B, V, 3], joints [B, 5, 3] (posed, translated), landmarks
      [B, 68, 3] and landmarks_mp [B, M, 3] when the model has embeddings, v_shaped [B, V, 3],
      iris [B, 10, 3] when the model has an iris embedding.
      B = 0 is allowed and gives empty [0, ...] arrays (under jit and grad too).
    """
    batch = _batch_size(shape, expression, pose, translation)
    betas = _coeffs(shape, model.num_shape, "shape", batch)
    psi = _coeffs(expression, model.num_expression, "expression", batch)
    n_joints = len(model.parents)
    if pose is None:
        rot = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (batch, n_joints, 3, 3))
    else:
        rot = pose_to_matrices(pose, pose_rep, n_joints)
        if rot.shape[0] != batch:
            raise ValueError(f"pose has batch {rot.shape[0]}, other parameters {batch}")
    if translation is not None:
        translation = jnp.asarray(translation, jnp.float32)
        if translation.shape != (batch, 3):
            raise ValueError(f"translation must be [B={batch}, 3], got {translation.shape}")
    if eyelids is not None:
        if model.eyelid_dirs is None:
            raise ValueError(f"eyelids given but the model {model.name!r} has no eyelid blendshapes "
                             "(flame.load(..., eyelids=(l_eyelid.npy, r_eyelid.npy)))")
        eyelids = jnp.asarray(eyelids, jnp.float32)
        if eyelids.shape != (batch, 2):
            raise ValueError(f"eyelids must be [B={batch}, 2] (left, right), got {eyelids.shape}")
    if batch == 0:
        # An empty batch (e.g. an empty chunk of frames): the shapes are static, so answer with
        # empty arrays instead of running the skinning, whose reshapes cannot infer a size from
        # zero elements.
        return _empty_output(model)
    coeffs = jnp.concatenate([jnp.ones((batch, 1), jnp.float32), betas, psi], axis=1)
    v_shaped = lbs_lib.blend_shapes(coeffs, model.blend_basis)   # template + blendshapes
    if eyelids is not None:
        v_shaped = v_shaped + jnp.einsum("bk,kvc->bvc", eyelids, model.eyelid_dirs,
                                         precision=jax.lax.Precision.HIGHEST)
    verts, joints = lbs_lib.lbs(v_shaped, rot, model.posedirs, model.j_regressor,
                                model.lbs_weights, model.parents)
    if translation is not None:
        verts = verts + translation[:, None]
        joints = joints + translation[:, None]
    lmk = None if model.lmk_faces is None else embed_landmarks(verts, model.faces, model.lmk_faces,
                                                                 model.lmk_bary)
    lmk_mp = None if model.mp_lmk_faces is None else embed_landmarks(
        verts, model.faces, model.mp_lmk_faces, model.mp_lmk_bary)
    iris = None if model.iris_faces is None else embed_landmarks(verts, model.faces, model.iris_faces,
                                                                 model.iris_bary)
    return FlameOutput(vertices=verts, joints=joints, landmarks=lmk, landmarks_mp=lmk_mp,
                       v_shaped=v_shaped, iris=iris)


def _empty_output(model: FlameModel) -> FlameOutput:
    """The FlameOutput of a batch of 0 heads: float32 arrays with a leading 0."""
    empty = lambda *shape: jnp.zeros((0,) + shape, jnp.float32)
    V = model.num_vertices
    return FlameOutput(
        vertices=empty(V, 3), joints=empty(len(model.parents), 3),
        landmarks=None if model.lmk_faces is None else empty(model.lmk_faces.shape[0], 3),
        landmarks_mp=None if model.mp_lmk_faces is None else empty(model.mp_lmk_faces.shape[0], 3),
        v_shaped=empty(V, 3), iris=None if model.iris_faces is None else empty(10, 3))


def embed_landmarks(vertices, faces, lmk_faces, lmk_bary):
    """Landmarks from a barycentric embedding.

    Args:
      vertices: [B, V, 3]; faces: [F, 3] int; lmk_faces: [L] int; lmk_bary: [L, 3].
    Returns:
      [B, L, 3].
    """
    tri = vertices[:, faces[lmk_faces]]            # [B, L, 3, 3]
    return jnp.einsum("blkc,lk->blc", tri, lmk_bary, precision=jax.lax.Precision.HIGHEST)


def sample_parameters(key, batch: int, *, n_shape: int = 300, n_expression: int = 100,
                      shape_std: float = 1.0, expression_std: float = 1.0,
                      jaw_open_max: float = 0.35, neck_std: float = 0.15, eye_std: float = 0.15,
                      global_std: float = 0.2):
    """Random FLAME parameters for demos and synthetic data.

    Returns a dict: shape [B, n_shape] ~ N(0, shape_std), expression [B, n_expression]
    ~ N(0, expression_std), pose [B, 5, 3] axis-angle with the global and neck rotations
    ~ N(0, std) per axis, jaw opening uniform in [0, jaw_open_max] rad about +x (mouth opens
    downwards) with small sideways jitter, both eyes turned together (~N(0, eye_std)).
    """
    ks = jax.random.split(key, 6)
    shape = shape_std * jax.random.normal(ks[0], (batch, n_shape))
    expr = expression_std * jax.random.normal(ks[1], (batch, n_expression))
    glob = global_std * jax.random.normal(ks[2], (batch, 3))
    neck = neck_std * jax.random.normal(ks[3], (batch, 3))
    jaw_open = jax.random.uniform(ks[4], (batch,), minval=0.0, maxval=jaw_open_max)
    jaw = jnp.stack([jaw_open, 0.03 * jax.random.normal(ks[5], (batch,)), jnp.zeros(batch)], -1)
    eyes = eye_std * jax.random.normal(jax.random.fold_in(key, 7), (batch, 3)) * jnp.array([1.0, 1.0, 0.0])
    pose = jnp.stack([glob, neck, jaw, eyes, eyes], axis=1)
    return dict(shape=shape, expression=expr, pose=pose)

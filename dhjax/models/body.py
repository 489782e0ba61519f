"""An SMPL-X-layout body model as pure functions: a model pytree, loaders, and the forward pass.

    model = body.load()                               # the embedded procedural default body
    model = body.load("models/smplx/SMPLX_NEUTRAL.npz")   # the official (licensed) SMPL-X model
    pose = body.pose_from_parts(global_orient, body_pose, jaw, left_eye, right_eye,
                                left_hand, right_hand)           # [B, 55, 3]
    out = body.forward(model, betas, expression, pose, translation)
    out.vertices [B, V, 3], out.joints [B, 55, 3], out.keypoints [B, 55 + L, 3]   (metres)

The forward pass has the semantics of ``smplx.lbs.lbs`` for SMPL-X: shape and expression
blendshapes on the template, joints regressed from the shaped template, pose correctives from
the flattened (R_j - I) of joints 1..54, then linear blend skinning along SMPL-X's kinematic
tree. Coordinates as SMPL-X: y up, the body faces +z, its left is +x. The pose is the full
55-joint pose; smplx's hand mean (added unless ``flat_hand_mean=True``) and hand PCA are
explicit here (`hand_pose_from_pca`, `BodyModel.hands_mean`). jit, vmap and grad work through
`forward`.

The embedded default (`dhjax.models.body_default`) is NOT SMPL-X and NOT a statistical model of
real people.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dhjax.geometry import lbs as lbs_lib
from dhjax.io import body_files
from dhjax.models import flame

#: The 55 SMPL-X joints, named and ordered as smplx.joint_names.JOINT_NAMES[:55].
JOINT_NAMES = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar",
    "right_collar", "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "jaw", "left_eye_smplhf", "right_eye_smplhf",
    "left_index1", "left_index2", "left_index3", "left_middle1", "left_middle2", "left_middle3",
    "left_pinky1", "left_pinky2", "left_pinky3", "left_ring1", "left_ring2", "left_ring3",
    "left_thumb1", "left_thumb2", "left_thumb3",
    "right_index1", "right_index2", "right_index3", "right_middle1", "right_middle2",
    "right_middle3", "right_pinky1", "right_pinky2", "right_pinky3", "right_ring1", "right_ring2",
    "right_ring3", "right_thumb1", "right_thumb2", "right_thumb3",
)
#: SMPL-X's kinematic tree (the official kintree_table's first row, root -1).
SMPLX_PARENTS = body_files.SMPLX_PARENTS
N_JOINTS = body_files.N_JOINTS              # 55
N_POSE_FEATURES = body_files.N_POSE_FEATURES  # 486 = 9 * 54
N_BODY_JOINTS = 21                          # between the pelvis and the jaw
N_HAND_JOINTS = 15

#: Body parts (`BodyModel.part_labels` indexes this tuple).
PART_NAMES = ("head", "torso", "left_arm", "right_arm", "left_hand", "right_hand", "left_leg",
              "right_leg", "left_foot", "right_foot")

_JOINT_PART_NAMES = (
    ("torso", ("pelvis", "spine1", "spine2", "spine3", "left_collar", "right_collar", "neck")),
    ("head", ("head", "jaw", "left_eye_smplhf", "right_eye_smplhf")),
    ("left_arm", ("left_shoulder", "left_elbow")),
    ("right_arm", ("right_shoulder", "right_elbow")),
    ("left_leg", ("left_hip", "left_knee")),
    ("right_leg", ("right_hip", "right_knee")),
    ("left_foot", ("left_ankle", "left_foot")),
    ("right_foot", ("right_ankle", "right_foot")),
)


def _joint_parts() -> tuple:
    parts = {}
    for part, joints in _JOINT_PART_NAMES:
        parts.update({j: PART_NAMES.index(part) for j in joints})
    for j in JOINT_NAMES:   # wrists and fingers
        if j not in parts:
            parts[j] = PART_NAMES.index("left_hand" if j.startswith("left_") else "right_hand")
    return tuple(parts[j] for j in JOINT_NAMES)


#: [55] index into PART_NAMES of the part each joint moves (a joint moves the bone below it:
#: hips and knees the leg, ankles and feet the foot, shoulders and elbows the arm, wrists and
#: fingers the hand; the neck joint's bone, the neck, counts as torso so that the head part is the
#: head itself; `body_default` labels its vertices with the same table).
JOINT_PARTS = _joint_parts()


@flax.struct.dataclass
class BodyModel(flame.BlendBasisViews):
    """An SMPL-X-layout body model (all arrays float32, metres / radians, unless stated).

    blend_basis [1 + S + E, V, 3]: row 0 is the template, rows 1..S the shape blendshapes, the
      last E rows the expression blendshapes (component-major, the transpose of the official
      [V, 3, K]); the properties `v_template` [V, 3], `shapedirs` [S, V, 3] and `exprdirs`
      [E, V, 3] slice it (one stacked basis: one matrix product, as `flame.FlameModel`).
    faces [F, 3] int32; posedirs [486, V, 3] (component-major; features: row-major (R_j - I) for
      joints 1..54); j_regressor [55, V]; lbs_weights [V, 55].
    Optional (None when absent): lmk_faces [L] int32 + lmk_bary [L, 3] (face keypoints, SMPL-X's
      51 static landmarks); uv_coords [T, 2] + uv_faces [F, 3] (UV layout); part_labels [V] int32
      (index into PART_NAMES); joint_limits [55, 3, 2] radians (per joint and axis-angle component,
      lower and upper bound; used by `sample_pose`); hands_components [2, 45, 45] (left, right:
      rows are PCA components of the [15, 3] axis-angle hand pose) and hands_mean [2, 45] radians.
    Static: num_shape (S), parents (the kinematic tree, 55 entries), name (where it came from).
    `official_arrays(model)` gives the arrays back in the official layout.

    Derived by `from_arrays` for speed (rebuild the model with `from_arrays` after replacing
    posedirs or lbs_weights): skin_index [V, K] int32, the joints of each vertex's nonzero
    weights when no row has more than 8 (SMPL-style sparse skinning; None: dense skinning);
    pose_correctives (static), False when posedirs are all zero (the forward pass then skips
    their product, which is exact; it also means no gradient reaches such posedirs: to learn
    correctives from zero, set pose_correctives=True with `model.replace`). Gradients w.r.t. lbs_weights flow only into the entries of
    skin_index when it is set.
    """

    blend_basis: jax.Array
    faces: jax.Array
    posedirs: jax.Array
    j_regressor: jax.Array
    lbs_weights: jax.Array
    lmk_faces: Any = None
    lmk_bary: Any = None
    uv_coords: Any = None
    uv_faces: Any = None
    part_labels: Any = None
    joint_limits: Any = None
    hands_components: Any = None
    hands_mean: Any = None
    skin_index: Any = None
    num_shape: int = flax.struct.field(pytree_node=False, default=0)
    pose_correctives: bool = flax.struct.field(pytree_node=False, default=True)
    parents: tuple = flax.struct.field(pytree_node=False, default=SMPLX_PARENTS)
    name: str = flax.struct.field(pytree_node=False, default="")

    @property
    def num_joints(self) -> int:
        """Number of joints (the kinematic tree's length)."""
        return len(self.parents)

    @property
    def num_landmarks(self) -> int:
        """Number of surface landmarks (0 without them)."""
        return 0 if self.lmk_faces is None else self.lmk_faces.shape[0]

    @property
    def num_keypoints(self) -> int:
        """Joints plus landmarks: the rows of `forward`'s keypoints."""
        return self.num_joints + self.num_landmarks


@flax.struct.dataclass
class BodyOutput:
    """vertices [B, V, 3], joints [B, 55, 3] (posed), keypoints [B, 55 + L, 3] (the posed joints
    followed by the L face keypoints of lmk_faces/lmk_bary; = joints without them), v_shaped
    [B, V, 3] (rest pose with shape AND expression blendshapes; smplx's v_shaped has shape only);
    metres, translation included except in v_shaped."""

    vertices: jax.Array
    joints: jax.Array
    keypoints: jax.Array
    v_shaped: jax.Array


def _check_shape(name: str, key: str, array, expected: tuple):
    if np.shape(array) != tuple(expected):
        raise ValueError(f"model {name!r}: {key} must have shape {tuple(expected)}, got {np.shape(array)}")


def from_arrays(arrays: Mapping[str, Any], name: str = "", n_shape: int | None = None,
                n_expression: int | None = None) -> BodyModel:
    """Builds a BodyModel from arrays in the official layout (`body_files.load_smplx_arrays`'s keys).

    Args:
      arrays: v_template [V, 3] metres, faces [F, 3], shapedirs [V, 3, S], exprdirs [V, 3, E],
        posedirs [V, 3, 486], j_regressor [55, V], lbs_weights [V, 55]; optional parents [55]
        (default SMPLX_PARENTS), lmk_faces [L] + lmk_bary [L, 3], uv_coords [T, 2] + uv_faces
        [F, 3], part_labels [V] int (index into PART_NAMES), joint_limits [55, 3, 2] radians,
        hands_components_l/r [45, 45] + hands_mean_l/r [45] radians (mean zero when absent).
      name: where the model came from (kept as static metadata).
      n_shape, n_expression: keep only the leading components.

    Raises:
      ValueError: a missing key, or a key of the wrong shape (key, expected and actual shape), a
        part label outside PART_NAMES, joint limits with lower > upper, invalid parents.
    """
    for key in ("v_template", "faces", "shapedirs", "exprdirs", "posedirs", "j_regressor", "lbs_weights"):
        if arrays.get(key) is None:
            raise ValueError(f"model {name!r}: missing key {key!r} (keys present: {sorted(arrays)})")
    template = np.asarray(arrays["v_template"], np.float32)
    if template.ndim != 2 or template.shape[1] != 3:
        raise ValueError(f"model {name!r}: v_template must have shape (V, 3), got {template.shape}")
    V = template.shape[0]
    faces = np.asarray(arrays["faces"])
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"model {name!r}: faces must have shape (F, 3), got {faces.shape}")
    F = faces.shape[0]
    sd, ed = np.asarray(arrays["shapedirs"]), np.asarray(arrays["exprdirs"])
    for key, d in (("shapedirs", sd), ("exprdirs", ed)):
        if d.ndim != 3 or d.shape[:2] != (V, 3):
            raise ValueError(f"model {name!r}: {key} must have shape ({V}, 3, K), got {d.shape}")
    n_shape = sd.shape[-1] if n_shape is None else int(n_shape)
    n_expression = ed.shape[-1] if n_expression is None else int(n_expression)
    for what, n, avail in (("n_shape", n_shape, sd.shape[-1]), ("n_expression", n_expression, ed.shape[-1])):
        if not 0 <= n <= avail:
            raise ValueError(f"{what}={n} but the model {name!r} has {avail} components")
    for key, shape in (("posedirs", (V, 3, N_POSE_FEATURES)), ("j_regressor", (N_JOINTS, V)),
                       ("lbs_weights", (V, N_JOINTS))):
        _check_shape(name, key, arrays[key], shape)
    parents = SMPLX_PARENTS if arrays.get("parents") is None else arrays["parents"]
    parents = tuple(int(p) for p in np.asarray(parents).reshape(-1))
    if len(parents) != N_JOINTS or parents[0] != -1 or not all(0 <= parents[j] < j for j in range(1, N_JOINTS)):
        raise ValueError(f"model {name!r}: parents must be {N_JOINTS} entries, parents[0] = -1 and "
                         f"0 <= parents[j] < j, got {parents}")
    opt = lambda k, dtype=jnp.float32: None if arrays.get(k) is None else jnp.asarray(arrays[k], dtype)

    lmk_faces, lmk_bary = arrays.get("lmk_faces"), arrays.get("lmk_bary")
    if (lmk_faces is None) != (lmk_bary is None):
        raise ValueError(f"model {name!r}: lmk_faces and lmk_bary come together")
    if lmk_faces is not None:
        if np.ndim(lmk_faces) != 1:
            raise ValueError(f"model {name!r}: lmk_faces must have shape (L,), got {np.shape(lmk_faces)}")
        _check_shape(name, "lmk_bary", lmk_bary, (np.shape(lmk_faces)[0], 3))
    uv_coords, uv_faces = arrays.get("uv_coords"), arrays.get("uv_faces")
    if (uv_coords is None) != (uv_faces is None):
        raise ValueError(f"model {name!r}: uv_coords and uv_faces come together")
    if uv_coords is not None:
        if np.ndim(uv_coords) != 2 or np.shape(uv_coords)[1] != 2:
            raise ValueError(f"model {name!r}: uv_coords must have shape (T, 2), got {np.shape(uv_coords)}")
        _check_shape(name, "uv_faces", uv_faces, (F, 3))
    part_labels = arrays.get("part_labels")
    if part_labels is not None:
        _check_shape(name, "part_labels", part_labels, (V,))
        labels = np.asarray(part_labels)
        if labels.size and (labels.min() < 0 or labels.max() >= len(PART_NAMES)):
            raise ValueError(f"model {name!r}: part_labels must index PART_NAMES (0..{len(PART_NAMES) - 1}), "
                             f"got range [{labels.min()}, {labels.max()}]")
    joint_limits = arrays.get("joint_limits")
    if joint_limits is not None:
        _check_shape(name, "joint_limits", joint_limits, (N_JOINTS, 3, 2))
        lim = np.asarray(joint_limits, np.float64)
        if not np.all(np.isfinite(lim)) or np.any(lim[..., 0] > lim[..., 1]):
            raise ValueError(f"model {name!r}: joint_limits must be finite with lower <= upper")
    hands_components = hands_mean = None
    if arrays.get("hands_components_l") is not None or arrays.get("hands_components_r") is not None:
        comps, means = [], []
        for side in ("l", "r"):
            c = arrays.get(f"hands_components_{side}")
            if c is None:
                raise ValueError(f"model {name!r}: missing key 'hands_components_{side}' (both hands come together)")
            _check_shape(name, f"hands_components_{side}", c, (body_files.N_HAND_POSE,) * 2)
            m = arrays.get(f"hands_mean_{side}")
            m = np.zeros(body_files.N_HAND_POSE, np.float32) if m is None else m
            _check_shape(name, f"hands_mean_{side}", m, (body_files.N_HAND_POSE,))
            comps.append(np.asarray(c, np.float32))
            means.append(np.asarray(m, np.float32))
        hands_components, hands_mean = jnp.asarray(np.stack(comps)), jnp.asarray(np.stack(means))

    basis = np.concatenate([template[None], np.moveaxis(sd[..., :n_shape], -1, 0),
                            np.moveaxis(ed[..., :n_expression], -1, 0)], axis=0)
    sparse = lbs_lib.sparse_weights(np.asarray(arrays["lbs_weights"], np.float32))
    return BodyModel(
        blend_basis=jnp.asarray(basis, jnp.float32),
        faces=jnp.asarray(faces, jnp.int32),
        posedirs=jnp.asarray(np.moveaxis(np.asarray(arrays["posedirs"]), -1, 0), jnp.float32),
        j_regressor=jnp.asarray(arrays["j_regressor"], jnp.float32),
        lbs_weights=jnp.asarray(arrays["lbs_weights"], jnp.float32),
        lmk_faces=opt("lmk_faces", jnp.int32), lmk_bary=opt("lmk_bary"),
        uv_coords=opt("uv_coords"), uv_faces=opt("uv_faces", jnp.int32),
        part_labels=opt("part_labels", jnp.int32), joint_limits=opt("joint_limits"),
        hands_components=hands_components, hands_mean=hands_mean,
        skin_index=None if sparse is None else jnp.asarray(sparse[0], jnp.int32),
        num_shape=int(n_shape), parents=parents, name=name,
        pose_correctives=bool(np.any(np.asarray(arrays["posedirs"]) != 0)),
    )


def part_labels_from_weights(lbs_weights) -> np.ndarray:
    """Per-vertex part labels from the dominant skinning joint.

    Args:
      lbs_weights: [V, 55] skinning weights.
    Returns:
      [V] int32 indices into PART_NAMES (JOINT_PARTS of each vertex's largest weight).
    """
    w = np.asarray(lbs_weights)
    if w.ndim != 2 or w.shape[1] != N_JOINTS:
        raise ValueError(f"lbs_weights must be [V, {N_JOINTS}], got {w.shape}")
    return np.asarray(JOINT_PARTS, np.int32)[np.argmax(w, axis=1)]


def load(path: str | os.PathLike | None = None, *, n_shape: int | None = None,
         n_expression: int | None = None, file_n_shape: int | None = None) -> BodyModel:
    """Loads a body model.

    Args:
      path: None for the embedded procedural default body (`dhjax.models.body_default`), or an
        official SMPL-X model file (`SMPLX_NEUTRAL.npz` / `SMPLX_*.pkl`, v1.0 or v1.1; read by
        `dhjax.io.body_files.load_smplx_arrays`, chumpy-free).
      n_shape, n_expression: keep only the leading components (e.g. 10 / 10 as smplx's defaults).
      file_n_shape: how many of the file's shapedirs components are shape components (the rest
        expression); needed only for files in neither the v1.1 (300 + 100) nor the legacy
        (10 + 10) layout.

    Returns:
      A BodyModel pytree. For an official file, part_labels come from the dominant skinning joint
      (`part_labels_from_weights`), there are no joint_limits (`sample_pose` gives the rest pose),
      and landmarks, UVs and hand PCA are present when the file has them.
    """
    if path is None:
        from dhjax.models import body_default  # imported lazily: the default is built on demand

        arrays = body_default.build_default_body_arrays()
        return from_arrays(arrays, "dhjax-default-body (procedural, not a statistical model)",
                           n_shape, n_expression)
    arrays = body_files.load_smplx_arrays(path, n_shape=file_n_shape)
    arrays["part_labels"] = part_labels_from_weights(arrays["lbs_weights"])
    return from_arrays(arrays, os.fspath(path), n_shape, n_expression)


def official_arrays(model: BodyModel) -> dict:
    """The model's arrays as numpy in the official layout (bases [V, 3, K]; `from_arrays`' keys).

    Keys: v_template, faces, shapedirs, exprdirs, posedirs, j_regressor, lbs_weights, parents,
    and those of lmk_faces, lmk_bary, uv_coords, uv_faces, part_labels, joint_limits,
    hands_components_l/r, hands_mean_l/r the model has.
    """
    out = dict(v_template=np.asarray(model.v_template), faces=np.asarray(model.faces),
               shapedirs=np.moveaxis(np.asarray(model.shapedirs), 0, -1),
               exprdirs=np.moveaxis(np.asarray(model.exprdirs), 0, -1),
               posedirs=np.moveaxis(np.asarray(model.posedirs), 0, -1),
               j_regressor=np.asarray(model.j_regressor),
               lbs_weights=np.asarray(model.lbs_weights), parents=np.asarray(model.parents, np.int32))
    for key in ("lmk_faces", "lmk_bary", "uv_coords", "uv_faces", "part_labels", "joint_limits"):
        if getattr(model, key) is not None:
            out[key] = np.asarray(getattr(model, key))
    if model.hands_components is not None:
        for i, side in enumerate(("l", "r")):
            out[f"hands_components_{side}"] = np.asarray(model.hands_components[i])
            out[f"hands_mean_{side}"] = np.asarray(model.hands_mean[i])
    return out


def _is_concrete(x) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))


def _check_finite(**named):
    """ValueError naming the first argument with NaN/inf values; tracers (jit, grad, vmap) pass."""
    for what, x in named.items():
        if x is None or not _is_concrete(x):
            continue
        if not np.all(np.isfinite(np.asarray(x, np.float64))):
            raise ValueError(f"{what} contains non-finite values (NaN or inf)")


def _batch_size(**named):
    for what, x in named.items():
        if x is not None:
            shape = np.shape(x)
            if len(shape) == 0:
                raise ValueError(f"{what} needs a leading batch dimension, got a scalar")
            return shape[0]
    return 1


def forward(model: BodyModel, betas=None, expression=None, pose=None, translation=None, *,
            pose_rep: str = "axis_angle") -> BodyOutput:
    """SMPL-X forward pass (`smplx.lbs.lbs` semantics).

    Args:
      model: a BodyModel (`load`).
      betas: [B, S'] shape coefficients, S' <= model.num_shape (missing ones are zero); None = 0.
      expression: [B, E'] expression coefficients, E' <= model.num_expression; None = 0.
      pose: the full pose of the 55 joints in JOINT_NAMES order (`pose_from_parts` builds it from
        smplx's parts): [B, 55, 3] or flattened [B, 165] axis-angle radians (default), [B, 55, 6]
        with pose_rep="6d" (first two matrix columns) or "6d_rows" (first two rows, pytorch3d's
        convention), [B, 55, 3, 3] with pose_rep="matrix"; None = rest pose. No hand mean is
        added (smplx with flat_hand_mean=True; add model.hands_mean to the hands for smplx's
        default).
      translation: [B, 3] metres, added after skinning; None = 0.

    Returns:
      BodyOutput with vertices [B, V, 3], joints [B, 55, 3], keypoints [B, 55 + L, 3] (joints,
      then the face keypoints when the model has lmk_faces), v_shaped [B, V, 3]. B = 0 gives
      empty [0, ...] arrays (under jit and grad too).

    Raises:
      ValueError: a parameter of the wrong size (named, with the expected shape), mismatched
        batch sizes, or non-finite values in a concrete (not traced) parameter (named).
    """
    for what, x in (("betas", betas), ("expression", expression), ("translation", translation)):
        if x is not None and np.ndim(x) == 1:      # the first dimension would be read as the batch
            raise ValueError(f"{what} needs a leading batch dimension: [B, {'3' if what == 'translation' else 'K'}], "
                             f"got shape {np.shape(x)}")
    batch = _batch_size(betas=betas, expression=expression, pose=pose, translation=translation)
    _check_finite(betas=betas, expression=expression, pose=pose, translation=translation)
    beta = flame._coeffs(betas, model.num_shape, "betas", batch)
    psi = flame._coeffs(expression, model.num_expression, "expression", batch)
    n_joints = model.num_joints
    if pose is None:
        rot = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (batch, n_joints, 3, 3))
    else:
        rot = flame.pose_to_matrices(pose, pose_rep, n_joints)
        if rot.shape[0] != batch:
            raise ValueError(f"pose has batch {rot.shape[0]}, other parameters {batch}")
    if translation is not None:
        translation = jnp.asarray(translation, jnp.float32)
        if translation.shape != (batch, 3):
            raise ValueError(f"translation must be [B={batch}, 3], got {translation.shape}")
    if batch == 0:
        # Static shapes: answer with empty arrays (the skinning's reshapes cannot infer a size
        # from zero elements).
        empty = lambda *shape: jnp.zeros((0,) + shape, jnp.float32)
        V = model.num_vertices
        return BodyOutput(vertices=empty(V, 3), joints=empty(n_joints, 3),
                          keypoints=empty(model.num_keypoints, 3), v_shaped=empty(V, 3))
    coeffs = jnp.concatenate([jnp.ones((batch, 1), jnp.float32), beta, psi], axis=1)
    v_shaped = lbs_lib.blend_shapes(coeffs, model.blend_basis)
    hi = jax.lax.Precision.HIGHEST
    if batch > model.blend_basis.shape[0]:
        # Regress the joints of the basis once ([K, 55, 3]) instead of every shaped body.
        joint_basis = jnp.einsum("jv,kvc->kjc", model.j_regressor, model.blend_basis, precision=hi)
        rest_joints = jnp.einsum("bk,kjc->bjc", coeffs, joint_basis, precision=hi)
    else:
        rest_joints = jnp.einsum("jv,bvc->bjc", model.j_regressor, v_shaped, precision=hi)
    v_posed = (lbs_lib.pose_correctives(v_shaped, rot, model.posedirs) if model.pose_correctives
               else v_shaped)
    joints, rel = lbs_lib.batch_rigid_transform(rot, rest_joints, model.parents)
    if model.skin_index is None:
        verts = lbs_lib.skin_dense(v_posed, rel, model.lbs_weights)
    else:
        w = jnp.take_along_axis(model.lbs_weights, model.skin_index, axis=1)
        verts = lbs_lib.skin_sparse(v_posed, rel, model.skin_index, w)
    if translation is not None:
        verts = verts + translation[:, None]
        joints = joints + translation[:, None]
    keypoints = joints
    if model.lmk_faces is not None:
        lmk = flame.embed_landmarks(verts, model.faces, model.lmk_faces, model.lmk_bary)
        keypoints = jnp.concatenate([joints, lmk], axis=1)
    return BodyOutput(vertices=verts, joints=joints, keypoints=keypoints, v_shaped=v_shaped)


def _part(x, what, batch, n):
    """[B, n, 3] from [B, n, 3] or flattened [B, 3n] (None = zeros); [B, 3] for n = 1."""
    if x is None:
        return jnp.zeros((batch, n, 3), jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 2 and x.shape == (batch, 3 * n):
        x = x.reshape(batch, n, 3)
    if x.shape != (batch, n, 3):
        expected = f"[B={batch}, 3]" if n == 1 else f"[B={batch}, {n}, 3] (or [B, {3 * n}])"
        raise ValueError(f"{what} must be {expected}, got {x.shape}")
    return x


def pose_from_parts(global_orient=None, body_pose=None, jaw=None, left_eye=None, right_eye=None,
                    left_hand=None, right_hand=None):
    """The full pose from smplx's parts, concatenated in smplx.SMPLX's order.

    Args (axis-angle radians; None = zeros; at least one must be given for the batch size):
      global_orient [B, 3]; body_pose [B, 21, 3] or [B, 63]; jaw, left_eye, right_eye [B, 3];
      left_hand, right_hand [B, 15, 3] or [B, 45] (hand pose in axis-angle, e.g. from
      `hand_pose_from_pca`).
    Returns:
      [B, 55, 3], the `pose` of `forward`.
    """
    named = dict(global_orient=global_orient, body_pose=body_pose, jaw=jaw, left_eye=left_eye,
                 right_eye=right_eye, left_hand=left_hand, right_hand=right_hand)
    if all(v is None for v in named.values()):
        raise ValueError("pose_from_parts needs at least one part to know the batch size")
    batch = _batch_size(**named)
    sizes = dict(global_orient=1, body_pose=N_BODY_JOINTS, jaw=1, left_eye=1, right_eye=1,
                 left_hand=N_HAND_JOINTS, right_hand=N_HAND_JOINTS)
    return jnp.concatenate([_part(named[k], k, batch, n) for k, n in sizes.items()], axis=1)


def hand_pose_from_pca(model: BodyModel, left_coeffs, right_coeffs, flat_mean: bool = False):
    """Hand poses from hand-PCA coefficients (smplx.SMPLX with use_pca=True).

    pose = coeffs @ hands_components[:n] + hands_mean, without the mean when flat_mean
    (smplx's flat_hand_mean=True).

    Args:
      model: a BodyModel with hands_components (official SMPL-X files have them).
      left_coeffs, right_coeffs: [B, n] PCA coefficients, n <= 45 (smplx's num_pca_comps).
      flat_mean: leave the mean hand pose out.
    Returns:
      (left_hand [B, 15, 3], right_hand [B, 15, 3]) axis-angle radians, for `pose_from_parts`.
    """
    if model.hands_components is None:
        raise ValueError(f"model {model.name!r} has no hand PCA (hands_components)")
    out = []
    for i, (what, c) in enumerate((("left_coeffs", left_coeffs), ("right_coeffs", right_coeffs))):
        c = jnp.asarray(c, jnp.float32)
        if c.ndim != 2 or c.shape[1] > body_files.N_HAND_POSE:
            raise ValueError(f"{what} must be [B, n] with n <= {body_files.N_HAND_POSE}, got {c.shape}")
        _check_finite(**{what: c})
        hand = jnp.matmul(c, model.hands_components[i, : c.shape[1]], precision=jax.lax.Precision.HIGHEST)
        if not flat_mean:
            hand = hand + model.hands_mean[i]
        out.append(hand.reshape(c.shape[0], N_HAND_JOINTS, 3))
    if out[0].shape[0] != out[1].shape[0]:
        raise ValueError(f"left_coeffs has batch {out[0].shape[0]}, right_coeffs {out[1].shape[0]}")
    return out[0], out[1]


def sample_pose(key, model: BodyModel, batch: int, scale: float = 1.0):
    """Random poses, uniform within the model's joint limits.

    Args:
      key: PRNG key. model: a BodyModel. batch: B.
      scale: shrinks (< 1) or widens the limits about zero: each axis-angle component is uniform
        in [scale * lower, scale * upper].
    Returns:
      [B, 55, 3] axis-angle radians; all zeros (rest pose) when model.joint_limits is None.
    """
    if model.joint_limits is None:
        return jnp.zeros((batch, model.num_joints, 3), jnp.float32)
    lo, hi = model.joint_limits[..., 0], model.joint_limits[..., 1]
    u = jax.random.uniform(key, (batch, model.num_joints, 3), jnp.float32)
    return scale * (lo + u * (hi - lo))


def sample_betas(key, batch: int, n: int, std: float = 1.0):
    """Random shape (or expression) coefficients: [B, n] ~ N(0, std^2)."""
    return std * jax.random.normal(key, (batch, n), jnp.float32)

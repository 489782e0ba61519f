"""3D Gaussian splats as PLY files in the layout of the original 3DGS code, which common splat
viewers (SuperSplat, the SIBR viewer, antimatter15/splat, gsplat's viewer) open.

One binary little-endian `vertex` element with float32 properties, in this order:
  x y z                         mean, metres
  nx ny nz                      zeros (3DGS writes them; viewers ignore them)
  f_dc_0 f_dc_1 f_dc_2          SH band-0 coefficient per colour channel
  f_rest_0 .. f_rest_{3(M-1)-1} higher SH coefficients, channel-major: f_rest[c * (M - 1) + j]
                                is coefficient j + 1 of channel c (M = (degree + 1)^2)
  opacity                       logit of the opacity
  scale_0 scale_1 scale_2       log of the standard deviations
  rot_0 rot_1 rot_2 rot_3       quaternion (w, x, y, z), not necessarily normalised

`save_gaussians_ply` takes activated values (opacity in (0, 1), scales in metres, SH
coefficients [N, M, 3]) and writes logits/logs; `load_gaussians_ply` returns them activated.
A colour c in [0, 1] corresponds to f_dc = (c - 0.5) / 0.28209479177387814 (the SH DC constant).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dhjax.io._common import existing_file, parse_ply_header

SH_C0 = 0.28209479177387814


def _sh_degree(m: int) -> int:
    d = int(round(np.sqrt(m))) - 1
    if (d + 1) ** 2 != m or d < 0 or d > 3:
        raise ValueError(f"SH coefficient count per channel must be 1, 4, 9 or 16, got {m}")
    return d


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-7, 1.0 - 1e-7)
    return np.log(p / (1.0 - p))


def save_gaussians_ply(path, means, quats, scales, opacities, sh=None, colors=None) -> Path:
    """Write Gaussians to a 3DGS PLY file.

    Args:
      path: output file (parent folders are created).
      means: [N, 3] positions, metres.
      quats: [N, 4] rotations (w, x, y, z).
      scales: [N, 3] standard deviations, metres (> 0).
      opacities: [N] in (0, 1) (clipped to [1e-7, 1 - 1e-7] for the logit).
      sh: [N, M, 3] SH coefficients with M in {1, 4, 9, 16}; or None with `colors`.
      colors: [N, 3] RGB in [0, 1], stored as degree-0 SH (used when `sh` is None).
    Returns:
      The path written.
    """
    means = np.asarray(means, np.float32)
    if means.ndim != 2 or means.shape[1] != 3:
        raise ValueError(f"means must be [N, 3], got {means.shape}")
    n = means.shape[0]
    quats = np.asarray(quats, np.float32)
    scales = np.asarray(scales, np.float32)
    opacities = np.asarray(opacities, np.float32)
    for name, a, shape in (("quats", quats, (n, 4)), ("scales", scales, (n, 3)), ("opacities", opacities, (n,))):
        if a.shape != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(a.shape)}")
    if np.any(scales <= 0):
        raise ValueError("scales must be positive (standard deviations in metres)")
    if sh is None:
        if colors is None:
            raise ValueError("pass sh [N, M, 3] or colors [N, 3]")
        colors = np.asarray(colors, np.float32)
        if colors.shape != (n, 3):
            raise ValueError(f"colors must be [N, 3], got {list(colors.shape)}")
        sh = ((colors - 0.5) / SH_C0)[:, None, :]
    sh = np.asarray(sh, np.float32)
    if sh.ndim != 3 or sh.shape[0] != n or sh.shape[2] != 3:
        raise ValueError(f"sh must be [N, M, 3], got {list(sh.shape)}")
    m = sh.shape[1]
    _sh_degree(m)
    for name, a in (("means", means), ("quats", quats), ("scales", scales), ("opacities", opacities), ("sh", sh)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} has non-finite values")
    rest = np.transpose(sh[:, 1:, :], (0, 2, 1)).reshape(n, 3 * (m - 1))
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(3 * (m - 1))]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    data = np.concatenate([
        means, np.zeros((n, 3), np.float32), sh[:, 0, :], rest,
        _logit(opacities)[:, None].astype(np.float32), np.log(scales), quats,
    ], axis=1).astype("<f4")
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property float {p}" for p in names]
    header += ["end_header"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(np.ascontiguousarray(data).tobytes())
    return path


def load_gaussians_ply(path) -> dict:
    """Read a 3DGS PLY file (any property order, binary little/big endian; extra properties ignored).

    Returns:
      dict with means [N, 3], quats [N, 4] (as stored, w first), scales [N, 3] (metres, exp of the
      stored logs), opacities [N] (sigmoid of the stored logits), sh [N, M, 3] and sh_degree; all
      float32 numpy arrays. N = 0 is allowed.
    Raises:
      FileNotFoundError for a missing file, ValueError naming the file and the problem for
      anything else: not a PLY, a malformed header (a negative or non-integer count, a duplicate
      property, an unknown format or property type, ...; see `io._common.parse_ply_header`),
      ASCII format, missing properties, truncated data.
    """
    path = existing_file(path)
    with open(path, "rb") as f:
        raw = f.read()
    header = parse_ply_header(path, raw)
    if header.format not in ("binary_little_endian", "binary_big_endian"):
        raise ValueError(f"{path}: PLY format {header.format!r} is not supported (binary little/big "
                         "endian only)")
    order = "<" if header.format == "binary_little_endian" else ">"
    vertex = header.element("vertex")
    if vertex is None:
        raise ValueError(f"{path}: no vertex element")
    if header.elements[0].name != "vertex":
        raise ValueError(f"{path}: an element before 'vertex' ({header.elements[0].name}) is not "
                         "supported")
    if any(p.is_list for p in vertex.properties):
        lists = [p.name for p in vertex.properties if p.is_list]
        raise ValueError(f"{path}: list properties in the vertex element are not supported: {lists}")
    n = vertex.count
    dtype = np.dtype([(p.name, order + p.dtype) for p in vertex.properties])
    body = raw[header.data_offset:]
    if len(body) < n * dtype.itemsize:
        raise ValueError(f"{path}: truncated: {n} vertices need {n * dtype.itemsize} bytes, found {len(body)}")
    v = np.frombuffer(body, dtype=dtype, count=n)
    names = set(dtype.names or ())
    need = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
            "rot_0", "rot_1", "rot_2", "rot_3"]
    missing = [p for p in need if p not in names]
    if missing:
        raise ValueError(f"{path}: missing 3DGS properties {missing}")
    n_rest = 0
    while f"f_rest_{n_rest}" in names:
        n_rest += 1
    stray = sorted(p for p in names if p.startswith("f_rest_") and p not in
                   {f"f_rest_{i}" for i in range(n_rest)})
    if stray:
        raise ValueError(f"{path}: the f_rest properties are not numbered 0..{n_rest - 1} without gaps "
                         f"(also found {stray})")
    if n_rest % 3:
        raise ValueError(f"{path}: {n_rest} f_rest properties is not a multiple of 3")
    m = 1 + n_rest // 3
    try:
        degree = _sh_degree(m)
    except ValueError as e:
        raise ValueError(f"{path}: {n_rest} f_rest properties ({m} SH coefficients per channel): {e}") from None
    col = lambda names_: np.stack([v[p].astype(np.float32) for p in names_], axis=1) if names_ else np.zeros((n, 0), np.float32)
    rest = col([f"f_rest_{i}" for i in range(n_rest)]).reshape(n, 3, m - 1).transpose(0, 2, 1)
    sh = np.concatenate([col(["f_dc_0", "f_dc_1", "f_dc_2"])[:, None, :], rest], axis=1)
    logit = v["opacity"].astype(np.float64)
    return dict(
        means=col(["x", "y", "z"]),
        quats=col(["rot_0", "rot_1", "rot_2", "rot_3"]),
        scales=np.exp(col(["scale_0", "scale_1", "scale_2"])),
        opacities=(1.0 / (1.0 + np.exp(-logit))).astype(np.float32),
        sh=sh.astype(np.float32),
        sh_degree=degree,
    )

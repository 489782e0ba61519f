"""Geometry kernel benchmarks (no timed assertions anywhere).

Each `run_<name>(cfg, log) -> dict` measures one op against its reference and peers; `run_all`
runs all of them (or those named) and returns {"<name>": {...}, "meta": {...}}. `cfg` is a
ml_collections.ConfigDict (or any object with attributes); missing fields take the defaults of
`default_config()`. `run` also writes <workdir>/bench_geometry.json.

run_closest_point: closest-point queries (dhjax.ops.bvh.closest_point) for points uniformly within
+-margin (per axis) of random vertices of the default head (5270 vertices, 10416 faces): the CPU
BVH kernel (build included in every call), the pure-JAX brute-force reference (timed on a subset
and extrapolated linearly, since it is O(N F); the output says so), libigl
(igl.point_mesh_squared_distance: AABB tree build + queries) and open3d
(RaycastingScene.compute_closest_points, Embree: scene built once, queries timed), the CUDA
kernel when a GPU is present, and the CPU BVH build time alone.

run_hashgrid: multi-resolution hash-grid encoding (dhjax.ops.hashgrid.hash_encode) of points
uniform in [0, 1]^3: forward, forward+backward with the gradient to the table only, and
forward+backward with the gradients to the table and the points, for the CPU kernel and the
pure-JAX reference (both on the CPU device) in the same run, with the kernel-vs-reference speedups
(`hashgrid_cpu_speedup_vs_reference` is forward+backward to the table) and the largest difference
of the two forward outputs; on a GPU the same for the CUDA kernel (float32 and float16 tables)
against the reference run on the GPU. The table is uniform in [-1, 1] (not tcnn's +-1e-4) so
that the differences read on an O(1) scale; the timings do not depend on its values.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from dhjax.bench.timing import import_peers, time_call
from dhjax.models import flame
from dhjax.ops import _ffi
from dhjax.ops import bvh as cp
from dhjax.ops import hashgrid as hg


def default_config() -> ml_collections.ConfigDict:
    """The full-size settings: 1M points for each benchmark, INSTA's hash grid (16 levels x 2
    features, T = 2^19 rows per level, base resolution 16, finest 2048)."""
    c = ml_collections.ConfigDict()
    c.repeats = 3                  # timed calls per measurement (median reported)
    c.warmup = 1
    c.closest_point = ml_collections.ConfigDict(dict(
        n_points=1_000_000,        # query points
        margin=0.05,               # metres, half-width of the box around each sampled vertex
        reference_points=2_000,    # the brute-force reference is timed (once) on this many points
        build_repeats=50,          # BVH builds timed
        seed=0,
    ))
    c.hashgrid = ml_collections.ConfigDict(dict(
        n_points=1_000_000,        # points uniform in [0, 1]^3
        n_levels=16,               # L
        n_features_per_level=2,    # F
        log2_hashmap_size=19,      # T = 2^19 rows per level
        base_resolution=16,        # coarsest level, vertices per axis
        finest_resolution=2048,    # per_level_scale = per_level_scale_for(finest, base, L)
        seed=0,
    ))
    return c


def _get(cfg, path, default):
    obj = cfg
    for name in path.split("."):
        if obj is None or not hasattr(obj, name):
            return default
        obj = getattr(obj, name)
    return obj


def run_closest_point(cfg, log=print) -> dict:
    """Closest-point throughput (points/s) on the default head; see the module docstring."""
    d = default_config()
    repeats = int(_get(cfg, "repeats", d.repeats))
    warmup = int(_get(cfg, "warmup", d.warmup))
    n = int(_get(cfg, "closest_point.n_points", d.closest_point.n_points))
    margin = float(_get(cfg, "closest_point.margin", d.closest_point.margin))
    n_ref = min(n, int(_get(cfg, "closest_point.reference_points", d.closest_point.reference_points)))
    build_repeats = int(_get(cfg, "closest_point.build_repeats", d.closest_point.build_repeats))
    seed = int(_get(cfg, "closest_point.seed", d.closest_point.seed))

    model = flame.load()
    v = np.asarray(model.v_template, np.float32)
    f = np.asarray(model.faces, np.int32)
    rng = np.random.default_rng(seed)
    pts = (v[rng.integers(len(v), size=n)] + rng.uniform(-margin, margin, (n, 3))).astype(np.float32)
    res = {"V": int(v.shape[0]), "F": int(f.shape[0]), "n_points": n, "margin_m": margin,
           "cpu_threads": os.cpu_count(), "device": str(jax.devices()[0])}
    log(f"closest point: head V={v.shape[0]} F={f.shape[0]}, {n} points within +-{margin * 100:.0f} cm")

    pts_j = jax.device_put(pts)
    d2_cpu = None
    if cp.kernel_available("cpu"):
        b = cp.build_seconds(v, f, build_repeats)
        res.update(bvh_build_min_s=b["min_s"], bvh_build_mean_s=b["mean_s"], bvh_nodes=b["nodes"])
        log(f"  BVH build (CPU, 1 thread): {b['min_s'] * 1e3:.2f} ms best, {b['mean_s'] * 1e3:.2f} ms mean "
            f"of {build_repeats}, {b['nodes']} nodes")
        fn = jax.jit(lambda p: cp.closest_point(v, f, p, backend="cpu"))
        t = time_call(lambda: jax.block_until_ready(fn(pts_j)), repeats, warmup)
        d2_cpu = np.asarray(fn(pts_j).sq_dist)
        res.update(cpu_kernel_s=t, cpu_kernel_pts_per_s=n / t)
        log(f"  dhjax CPU kernel (build + query): {t:.3f} s, {n / t:,.0f} points/s")
    else:
        log("  dhjax CPU kernel not built (bash kernels/build_inplace.sh): skipped")

    if any(dev.platform == "gpu" for dev in jax.devices()) and cp.kernel_available("cuda"):
        gpu = jax.devices("gpu")[0]
        vg, fg, pg = (jax.device_put(x, gpu) for x in (v, f, pts))
        fn = jax.jit(lambda vv, ff, p: cp.closest_point(vv, ff, p, backend="cuda"))
        t = time_call(lambda: jax.block_until_ready(fn(vg, fg, pg)), max(repeats, 5), warmup)
        res.update(cuda_kernel_s=t, cuda_kernel_pts_per_s=n / t)
        log(f"  dhjax CUDA kernel (build + query): {t * 1e3:.2f} ms, {n / t:,.0f} points/s")
        if d2_cpu is not None:
            d2_gpu = np.asarray(fn(vg, fg, pg).sq_dist)
            res["cuda_vs_cpu_max_abs_dist_m"] = float(np.max(np.abs(np.sqrt(d2_gpu) - np.sqrt(d2_cpu))))
    else:
        log("  dhjax CUDA kernel: no GPU or library not built, skipped")

    # The brute force takes tens of seconds on its subset: one compiling call whose result is
    # compared below, then one timed call (not `repeats`).
    sub = jax.device_put(pts[:n_ref])
    fn = jax.jit(lambda p: cp.closest_point(v, f, p, backend="reference"))
    d2_ref = np.asarray(jax.block_until_ready(fn(sub)).sq_dist)
    t = time_call(lambda: jax.block_until_ready(fn(sub)), 1, 0)
    res.update(reference_subset_points=n_ref, reference_subset_s=t, reference_pts_per_s=n_ref / t,
               reference_extrapolated_s=t * n / n_ref)
    log(f"  pure-JAX reference (brute force): {n_ref / t:,.0f} points/s, timed on {n_ref} points and "
        f"extrapolated linearly to {t * n / n_ref:.1f} s for {n}")
    if d2_cpu is not None:
        res["cpu_vs_reference_max_abs_dist_m"] = float(np.max(np.abs(np.sqrt(d2_ref) - np.sqrt(d2_cpu[:n_ref]))))

    peers, why = import_peers("igl")
    if why:
        log(f"  libigl: {why}: skipped")
    else:
        igl, = peers
        v64, f64, p64 = v.astype(np.float64), f.astype(np.int64), pts.astype(np.float64)
        t = time_call(lambda: igl.point_mesh_squared_distance(p64, v64, f64), repeats, 0)
        res.update(igl_s=t, igl_pts_per_s=n / t)
        log(f"  libigl point_mesh_squared_distance (AABB build + query, float64): {t:.3f} s, {n / t:,.0f} points/s")
        if d2_cpu is not None:
            sq = igl.point_mesh_squared_distance(p64[:n_ref], v64, f64)[0]
            res["cpu_vs_igl_max_abs_dist_m"] = float(np.max(np.abs(np.sqrt(sq) - np.sqrt(d2_cpu[:n_ref]))))

    peers, why = import_peers("open3d")
    if why:
        log(f"  open3d: {why}: skipped")
    else:
        o3d, = peers
        mesh = o3d.t.geometry.TriangleMesh()
        mesh.vertex.positions = o3d.core.Tensor(v)
        mesh.triangle.indices = o3d.core.Tensor(f)
        t0 = time.perf_counter()
        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(mesh)
        q = o3d.core.Tensor(pts)
        scene.compute_closest_points(q[:1])  # Embree commits (builds) the scene on first use
        res["open3d_scene_build_s"] = time.perf_counter() - t0
        t = time_call(lambda: scene.compute_closest_points(q), repeats, warmup)
        res.update(open3d_s=t, open3d_pts_per_s=n / t)
        log(f"  open3d RaycastingScene.compute_closest_points (Embree, scene prebuilt in "
            f"{res['open3d_scene_build_s'] * 1e3:.1f} ms): {t:.3f} s, {n / t:,.0f} points/s")
        if d2_cpu is not None:
            c = scene.compute_closest_points(q[:n_ref])["points"].numpy()
            d_o3d = np.linalg.norm(c - pts[:n_ref], axis=1)
            res["cpu_vs_open3d_max_abs_dist_m"] = float(np.max(np.abs(d_o3d - np.sqrt(d2_cpu[:n_ref]))))
    return res


def _hashgrid_kernel_available(backend: str) -> bool:
    """True when the hash-grid library for `backend` ("cpu" | "cuda") is built and registered."""
    return _ffi.register("hashgrid", backend, hg._TARGETS[backend])


def run_hashgrid(cfg, log=print) -> dict:
    """Hash-grid encoding throughput (points/s), kernels vs reference; see the module docstring."""
    d = default_config()
    repeats = int(_get(cfg, "repeats", d.repeats))
    warmup = max(int(_get(cfg, "warmup", d.warmup)), 1)  # at least one call: compile excluded
    n = int(_get(cfg, "hashgrid.n_points", d.hashgrid.n_points))
    n_levels = int(_get(cfg, "hashgrid.n_levels", d.hashgrid.n_levels))
    n_feat = int(_get(cfg, "hashgrid.n_features_per_level", d.hashgrid.n_features_per_level))
    log2_t = int(_get(cfg, "hashgrid.log2_hashmap_size", d.hashgrid.log2_hashmap_size))
    base = int(_get(cfg, "hashgrid.base_resolution", d.hashgrid.base_resolution))
    finest = float(_get(cfg, "hashgrid.finest_resolution", d.hashgrid.finest_resolution))
    seed = int(_get(cfg, "hashgrid.seed", d.hashgrid.seed))

    gcfg = hg.HashGridConfig(n_levels=n_levels, n_features_per_level=n_feat, log2_hashmap_size=log2_t,
                             base_resolution=base, per_level_scale=hg.per_level_scale_for(finest, base, n_levels))
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0.0, 1.0, (n, 3)).astype(np.float32)
    cot = rng.standard_normal((n, gcfg.n_output_dims)).astype(np.float32)  # fixed output cotangent
    table = np.asarray(hg.init_table(jax.random.key(seed), gcfg)) * np.float32(1e4)  # uniform in [-1, 1]
    on_gpu = jax.default_backend() == "gpu"
    cpu = jax.devices("cpu")[0]
    res = {"n_points": n, "n_levels": n_levels, "n_features_per_level": n_feat, "log2_hashmap_size": log2_t,
           "table_rows_per_level": gcfg.table_size, "base_resolution": base, "finest_resolution": finest,
           "per_level_scale": gcfg.per_level_scale, "table_mib": table.nbytes / 2**20,
           "cpu_threads": os.cpu_count(), "device": str(jax.devices()[0])}
    log(f"hash grid: {n} points in [0,1]^3, L={n_levels} x F={n_feat}, T=2^{log2_t}, base {base}, finest "
        f"{finest:g} (per-level scale {gcfg.per_level_scale:.4f}), table {table.nbytes / 2**20:.0f} MiB")

    def measure(name, backend, device, dtype=np.float32):
        """Times forward / forward+backward (table) / forward+backward (table, points) of one
        implementation on one device; returns (forward output, table gradient) as numpy."""
        p, t, g = (jax.device_put(x, device) for x in (pts, table.astype(dtype), cot))
        enc = lambda pp, tt: hg.hash_encode(pp, tt, gcfg, backend=backend)

        def fwd_bwd_table(pp, tt, gg):
            out, vjp = jax.vjp(lambda t_: enc(pp, t_), tt)
            return out, vjp(gg)[0]

        def fwd_bwd_all(pp, tt, gg):
            out, vjp = jax.vjp(enc, pp, tt)
            return out, vjp(gg)

        fns = {"fwd": jax.jit(enc), "fwd_bwd": jax.jit(fwd_bwd_table), "fwd_bwd_points": jax.jit(fwd_bwd_all)}
        args = {"fwd": (p, t), "fwd_bwd": (p, t, g), "fwd_bwd_points": (p, t, g)}
        what = {"fwd": "forward", "fwd_bwd": "forward+backward (d table)",
                "fwd_bwd_points": "forward+backward (d table, d points)"}
        for k, fn in fns.items():
            tk = time_call(lambda: jax.block_until_ready(fn(*args[k])), repeats, warmup)
            res[f"hashgrid_{name}_{k}_s"] = tk
            res[f"hashgrid_{name}_{k}_pts_per_s"] = n / tk
            log(f"  {name:14s} {what[k]:37s}: {tk * 1e3:9.1f} ms, {n / tk:14,.0f} points/s")
        out, d_table = fns["fwd_bwd"](*args["fwd_bwd"])
        return np.asarray(out), np.asarray(d_table, np.float32)

    def compare(name, ref_name, got, ref):
        res[f"hashgrid_{name}_vs_{ref_name}_max_abs"] = float(np.max(np.abs(got[0] - ref[0])))
        res[f"hashgrid_{name}_vs_{ref_name}_max_abs_d_table"] = float(np.max(np.abs(got[1] - ref[1])))
        log(f"  {name} vs {ref_name}: forward max |diff| {res[f'hashgrid_{name}_vs_{ref_name}_max_abs']:.3g} "
            f"(features up to {np.max(np.abs(ref[0])):.3g}), table gradient max |diff| "
            f"{res[f'hashgrid_{name}_vs_{ref_name}_max_abs_d_table']:.3g} (up to {np.max(np.abs(ref[1])):.3g})")

    def speedups(name, ref_name):
        for k, label in (("fwd", "forward"), ("fwd_bwd", "forward+backward (d table)"),
                         ("fwd_bwd_points", "forward+backward (d table, d points)")):
            sp = res[f"hashgrid_{ref_name}_{k}_s"] / res[f"hashgrid_{name}_{k}_s"]
            key = f"hashgrid_{name}_speedup_vs_reference" if k == "fwd_bwd" else \
                f"hashgrid_{name}_{k}_speedup_vs_reference"
            res[key] = sp
            log(f"  {key} ({label}, vs {ref_name}): {sp:.1f}x")

    ref_cpu = measure("reference", "reference", cpu)
    if _hashgrid_kernel_available("cpu"):
        got = measure("cpu", "cpu", cpu)
        compare("cpu", "reference", got, ref_cpu)
        speedups("cpu", "reference")
        del got
    else:
        log("  dhjax CPU kernel not built (bash kernels/build_inplace.sh): skipped")

    if on_gpu and _hashgrid_kernel_available("cuda"):
        gpu = jax.devices("gpu")[0]
        ref_gpu = measure("reference_gpu", "reference", gpu)
        got = measure("cuda", "cuda", gpu)
        compare("cuda", "reference_gpu", got, ref_gpu)
        speedups("cuda", "reference_gpu")
        ref16 = measure("reference_gpu_f16", "reference", gpu, np.float16)
        got16 = measure("cuda_f16", "cuda", gpu, np.float16)
        compare("cuda_f16", "reference_gpu_f16", got16, ref16)
        speedups("cuda_f16", "reference_gpu_f16")
        for k in ("fwd", "fwd_bwd", "fwd_bwd_points"):
            res[f"hashgrid_cuda_f16_vs_f32_{k}_time_ratio"] = res[f"hashgrid_cuda_f16_{k}_s"] / res[f"hashgrid_cuda_{k}_s"]
    else:
        log("  dhjax CUDA kernel: no GPU or library not built, skipped")
    return res


def benchmarks() -> dict:
    """{"<name>": run_<name>} for every benchmark of this module, in name order."""
    return {"closest_point": run_closest_point, "hashgrid": run_hashgrid}


def set_n_points(cfg, n_points: int) -> None:
    """Sets n_points of every benchmark section of cfg (closest_point.n_points, hashgrid.n_points)."""
    for name in benchmarks():
        if name in cfg and "n_points" in cfg[name]:
            cfg[name].n_points = int(n_points)


def run_all(cfg, log=print, only=None) -> dict:
    """Runs the run_<name> functions (all, or those named in `only`); returns
    {"<name>": result, "meta": {...}}. An unknown name raises ValueError before anything runs."""
    available = benchmarks()
    names = list(available) if not only else list(only)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; available: {sorted(available)}")
    results = {"meta": {"jax": jax.__version__, "backend": jax.default_backend(), "machine": platform.machine(),
                        "cpu_count": os.cpu_count()}}
    for name in names:
        results[name] = available[name](cfg, log)
    return results


def run(cfg, workdir, only=None, log=print) -> dict:
    """`run_all(cfg, log, only)`, written to <workdir>/bench_geometry.json; returns the results."""
    results = run_all(cfg, log=log, only=only)
    path = Path(workdir) / "bench_geometry.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(results, fh, indent=2, sort_keys=True)
    log(f"wrote {path}")
    return results

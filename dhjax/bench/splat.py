"""Gaussian splatting benchmark: forward and forward+backward time of `dhjax.render.splat` for
every available implementation in one run (no timed assertions anywhere).

Scenes: N Gaussians sampled on the default head's surface (flat, 1-4 mm, random colours, opacity
0.3-1), seen frontally from 0.6 m so the head fills the frame. Implementations: the CPU kernel and
the pure-JAX reference (`splat_cpu_speedup_vs_reference`), the CUDA kernel on a GPU, and gsplat on
the same GPU when it is installed and can build its CUDA extension there. Where the CPU kernel runs
its 8-lane AVX2 loops (`dhjax.ops.splat.simd_lanes`), it is also timed with its 4-lane SSE2 loops
(`cpu_lanes4`, DHJAX_SPLAT_LANES=4 around each call; the same bits), right after the 8-lane
timings: `..._cpu_lanes8_fwd_speedup_vs_lanes4` and `..._fwd_bwd_...`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.geometry import mesh as mesh_lib
from dhjax.models import flame
from dhjax.ops import splat as splat_op
from dhjax.render import camera as camera_lib
from dhjax.render import splat
from dhjax.bench.timing import time_call as _time


def head_scene(n: int, seed: int = 0, model: flame.FlameModel | None = None) -> dict:
    """N Gaussians on the default head's surface: means [N,3], quats [N,4], scales [N,3] (m),
    opacities [N], colors [N,3]. model: the head to use (its mean face in the rest pose); None
    builds the embedded default head (seconds), pass it when the caller already has it."""
    model = flame.load() if model is None else model
    verts = flame.forward(model, jnp.zeros((1, 300)), jnp.zeros((1, 100)), jnp.zeros((1, 5, 3))).vertices[0]
    pts, face, _ = mesh_lib.sample_surface(jax.random.PRNGKey(seed), verts, model.faces, n)
    normals = mesh_lib.face_normals(verts, model.faces)[face]
    rng = np.random.default_rng(seed)
    # rotation taking z to the surface normal (flat Gaussians lying on the surface)
    z = np.array([0.0, 0.0, 1.0])
    nrm = np.asarray(normals, np.float64)
    axis = np.cross(z, nrm)
    s = np.linalg.norm(axis, axis=1, keepdims=True)
    c = nrm[:, 2:3]
    half = np.arctan2(s, c) / 2
    axis = np.where(s > 1e-9, axis / np.maximum(s, 1e-12), [1.0, 0.0, 0.0])
    quats = np.concatenate([np.cos(half), np.sin(half) * axis], 1).astype(np.float32)
    sc = np.exp(rng.uniform(np.log(1e-3), np.log(4e-3), (n, 2)))
    scales = np.concatenate([sc, sc[:, :1] * 0.1], 1).astype(np.float32)
    return dict(means=np.asarray(pts, np.float32), quats=quats, scales=scales,
                opacities=rng.uniform(0.3, 1.0, n).astype(np.float32),
                colors=rng.uniform(0.0, 1.0, (n, 3)).astype(np.float32))


def frontal_camera(width: int, height: int) -> camera_lib.Camera:
    """A batch of one pinhole camera (28 degree vertical field of view, width x height pixels)
    0.6 m in front of the origin on +z, looking at it: the view of the bench's scenes."""
    R, t = camera_lib.look_at(np.array([[0.0, 0.0, 0.6]]), np.array([[0.0, 0.0, 0.0]]))
    return camera_lib.camera_from_fov(28.0, width, height, R, t)


def _dhjax_fns(scene, cam, backend, capacity=None):
    params = {k: jnp.asarray(v) for k, v in scene.items()}
    w = jnp.asarray(np.random.default_rng(1).normal(size=(1, cam.height, cam.width, 3)), jnp.float32)

    def render(p):
        return splat.rasterize(p["means"], p["quats"], p["scales"], p["opacities"], p["colors"], cam,
                               backend=backend, capacity=capacity).image

    fwd = jax.jit(render)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(render(p) * w)))
    return (lambda: fwd(params).block_until_ready()), (lambda: jax.block_until_ready(grad(params)))


def _in_lanes(fn, lanes: int):
    """fn run with DHJAX_SPLAT_LANES=lanes (read by the CPU kernel at every call), the variable
    restored afterwards."""
    def call():
        old = os.environ.get("DHJAX_SPLAT_LANES")
        os.environ["DHJAX_SPLAT_LANES"] = str(lanes)
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("DHJAX_SPLAT_LANES", None)
            else:
                os.environ["DHJAX_SPLAT_LANES"] = old
    return call


def _gsplat_fns(scene, cam):
    """gsplat's CUDA rasterization on the same scene (GPU only)."""
    import torch
    from gsplat import rasterization

    dev = "cuda"
    t = {k: torch.tensor(v, device=dev, requires_grad=True) for k, v in scene.items()}
    viewmat = torch.eye(4, device=dev)
    viewmat[:3, :3] = torch.tensor(np.asarray(cam.R)[0], device=dev)
    viewmat[:3, 3] = torch.tensor(np.asarray(cam.t)[0], device=dev)
    K = torch.tensor(np.asarray(cam.K), device=dev)

    def render():
        img, _, _ = rasterization(t["means"], t["quats"], t["scales"], t["opacities"], t["colors"], viewmat[None], K,
                                  cam.width, cam.height, packed=False)
        return img

    def fwd():
        with torch.no_grad():
            render()
        torch.cuda.synchronize()

    def fwd_bwd():
        render().sum().backward()
        torch.cuda.synchronize()

    return fwd, fwd_bwd


def run(cfg, log=print) -> dict:
    """Times every implementation on every case; returns {name: value} (seconds, counts, ratios).

    cfg.splat: cases ((n, width, height), ...), repeats (timed calls per kernel, median),
    reference_repeats, reference_max_n (larger scenes skip the reference). log: print-like.
    """
    sc = cfg.splat
    on_gpu = jax.default_backend() == "gpu"
    results: dict = {"device": str(jax.devices()[0]), "tile": splat_op.TILE}
    impls = []
    if splat_op.kernel_available("cpu") and not on_gpu:
        impls.append("cpu")
        results["cpu_simd_lanes"] = splat_op.simd_lanes()
        if results["cpu_simd_lanes"] == 8:
            impls.append("cpu_lanes4")
    if on_gpu and splat_op.kernel_available("cuda"):
        impls.append("cuda")
    impls.append("reference")
    log(f"splat bench on {results['device']}: implementations {impls}")
    for n, width, height in sc.cases:
        key = f"splat_{n // 1000}k_{width}x{height}"
        scene = head_scene(int(n))
        cam = frontal_camera(int(width), int(height))
        def tiling(p):
            proj = splat.project(p["means"], splat.covariance(p["quats"], p["scales"]), cam, cam.width, cam.height)
            rects = splat_op.tile_rects(proj.means2d, proj.radii, cam.width, cam.height)
            return splat_op.tile_counts(rects, cam.width, cam.height), splat_op.num_intersections(rects)

        counts, n_isect = jax.jit(tiling)(scene)
        counts = np.asarray(counts)
        results[f"{key}_intersections"] = int(np.asarray(n_isect).sum())
        results[f"{key}_max_per_tile"] = int(counts.max())
        log(f"{key}: {results[f'{key}_intersections']} tile intersections, up to {counts.max()} per tile")
        for impl in impls:
            if impl == "reference" and n > sc.reference_max_n:
                log(f"  reference: skipped (N > reference_max_n = {sc.reference_max_n}; set it higher to time it)")
                results[f"{key}_reference_fwd_s"] = None
                continue
            reps = sc.reference_repeats if impl == "reference" else sc.repeats
            cap = int(counts.max()) if impl == "reference" else None
            if impl == "cpu_lanes4":
                fwd, fwd_bwd = (_in_lanes(f, 4) for f in _dhjax_fns(scene, cam, "cpu"))
            else:
                fwd, fwd_bwd = _dhjax_fns(scene, cam, impl, capacity=cap)
            tf = _time(fwd, reps, 1)
            tb = _time(fwd_bwd, reps, 1)
            results[f"{key}_{impl}_fwd_s"] = tf
            results[f"{key}_{impl}_fwd_bwd_s"] = tb
            log(f"  {impl:9s}: forward {tf * 1e3:9.1f} ms ({1 / tf:7.1f} frames/s) | forward+backward {tb * 1e3:9.1f} ms "
                f"(backward {max(tb - tf, 0) / tf:4.2f}x forward)")
        if on_gpu:
            try:
                fwd, fwd_bwd = _gsplat_fns(scene, cam)
                tf, tb = _time(fwd, sc.repeats, 2), _time(fwd_bwd, sc.repeats, 2)
                results[f"{key}_gsplat_fwd_s"], results[f"{key}_gsplat_fwd_bwd_s"] = tf, tb
                log(f"  gsplat   : forward {tf * 1e3:9.1f} ms ({1 / tf:7.1f} frames/s) | forward+backward {tb * 1e3:9.1f} ms")
            except Exception as e:  # not installed, or its CUDA extension cannot be built here
                log(f"  gsplat   : unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
        if f"{key}_cpu_lanes4_fwd_s" in results:
            for part in ("fwd", "fwd_bwd"):
                results[f"{key}_cpu_lanes8_{part}_speedup_vs_lanes4"] = (
                    results[f"{key}_cpu_lanes4_{part}_s"] / results[f"{key}_cpu_{part}_s"])
            log(f"  cpu 8 lanes vs 4: forward {results[f'{key}_cpu_lanes8_fwd_speedup_vs_lanes4']:.2f}x, "
                f"forward+backward {results[f'{key}_cpu_lanes8_fwd_bwd_speedup_vs_lanes4']:.2f}x")
        ref = results.get(f"{key}_reference_fwd_s")
        for impl in ("cpu", "cuda"):
            if f"{key}_{impl}_fwd_s" in results and ref:
                results[f"{key}_{impl}_speedup_vs_reference"] = ref / results[f"{key}_{impl}_fwd_s"]
                results[f"{key}_{impl}_fwd_bwd_speedup_vs_reference"] = (
                    results[f"{key}_reference_fwd_bwd_s"] / results[f"{key}_{impl}_fwd_bwd_s"])
            if f"{key}_{impl}_fwd_s" in results and f"{key}_gsplat_fwd_s" in results:
                results[f"{key}_{impl}_vs_gsplat"] = results[f"{key}_{impl}_fwd_s"] / results[f"{key}_gsplat_fwd_s"]
    first = f"splat_{sc.cases[0][0] // 1000}k_{sc.cases[0][1]}x{sc.cases[0][2]}"
    if f"{first}_cpu_speedup_vs_reference" in results:
        results["splat_cpu_speedup_vs_reference"] = results[f"{first}_cpu_speedup_vs_reference"]
        log(f"splat_cpu_speedup_vs_reference ({first}, forward): {results['splat_cpu_speedup_vs_reference']:.1f}x")
    return results

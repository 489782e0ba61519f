"""Tile compositing op: the C++ kernel against the pure-JAX reference (values and gradients),
edge cases (behind the camera, off-image, tiny/huge, one tile, empty), directional finite
differences, vmap/jit, the reference's own capacity handling, determinism of the kernel's
backward, and the dropping of non-finite Gaussians (the same in every backend)."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kernel_common import need_kernel
from dhjax.ops import splat as op
from dhjax.render import camera
from dhjax.render import splat


@pytest.fixture(scope="module")
def cpu_kernel():
    need_kernel(op.kernel_available("cpu"), "the CPU splat kernel")


def scene(seed, n=200, spread=0.15, log_scale=np.log(0.03), scale_std=0.5, centre=(0.0, 0.0, 0.0)):
    rng = np.random.default_rng(seed)
    return dict(
        means=(rng.normal(0, spread, (n, 3)) + np.asarray(centre)).astype(np.float32),
        quats=rng.normal(size=(n, 4)).astype(np.float32),
        scales=np.exp(rng.normal(log_scale, scale_std, (n, 3))).astype(np.float32),
        opacities=rng.uniform(0.2, 1.0, n).astype(np.float32),
        colors=rng.uniform(0.0, 1.0, (n, 3)).astype(np.float32),
    )


def rig(n_cams=2, width=70, height=50, radius=1.2, fov=40.0):
    return camera.orbit_rig(n_cams, radius, width=width, height=height, fov_y_deg=fov)


PARAMS = ("means", "quats", "scales", "opacities", "colors")


def render(s, cams, backend, mode="rgb+depth", **kw):
    return splat.rasterize(s["means"], s["quats"], s["scales"], s["opacities"], s["colors"], cams,
                           render_mode=mode, backend=backend, **kw)


def weighted_loss(s, cams, backend, mode="rgb+depth", seed=1, **kw):
    """A random linear functional of every output (exercises all cotangents); returns (loss, outputs)."""
    out = render(s, cams, backend, mode, **kw)
    rng = np.random.default_rng(seed)
    total = 0.3 * jnp.sum(out.alpha * jnp.asarray(rng.normal(size=out.alpha.shape), jnp.float32))
    if out.image is not None:
        total += jnp.sum(out.image * jnp.asarray(rng.normal(size=out.image.shape), jnp.float32))
    if out.depth is not None:
        total += 0.2 * jnp.sum(out.depth * jnp.asarray(rng.normal(size=out.depth.shape), jnp.float32))
    return total, out


def value_and_grads(s, cams, backend, **kw):
    """Jitted (one compile per scene shape): (loss, outputs), gradients w.r.t. PARAMS."""
    def f(params, cams):
        return weighted_loss(params, cams, backend, **kw)

    fn = jax.jit(jax.value_and_grad(f, has_aux=True))
    (loss, out), g = fn({k: jnp.asarray(s[k]) for k in PARAMS}, cams)
    return loss, out, tuple(g[k] for k in PARAMS)


def jrender(s, cams, backend, mode="rgb+depth", **kw):
    """`render` under jit (eager rendering compiles every small op separately: slow)."""
    return jax.jit(lambda p, c: render(p, c, backend, mode, **kw))({k: jnp.asarray(s[k]) for k in PARAMS}, cams)


def grads(s, cams, backend, **kw):
    return value_and_grads(s, cams, backend, **kw)[2]


def loss_value(s, cams, backend, **kw):
    return float(jax.jit(lambda p, c: weighted_loss(p, c, backend, **kw)[0])({k: jnp.asarray(s[k]) for k in PARAMS}, cams))


def assert_same_render(a, b, atol=1e-4):
    for name in ("image", "alpha", "depth"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None
            continue
        assert np.all(np.isfinite(np.asarray(y))), name
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=atol, rtol=0, err_msg=name)


def assert_same_grads(ga, gb, rel=1e-3):
    for name, x, y in zip(PARAMS, ga, gb):
        x, y = np.asarray(x), np.asarray(y)
        assert np.all(np.isfinite(y)), name
        scale = max(float(np.abs(x).max()), 1e-6)
        err = float(np.abs(x - y).max())
        assert err <= rel * scale, f"{name}: max |kernel - reference| = {err:.3g}, max |reference| = {scale:.3g}"


CASES = {
    "random": lambda: (scene(0), rig()),
    "behind_camera": lambda: (scene(1, n=150, spread=0.7), rig(radius=0.6)),
    "off_image": lambda: (scene(2, n=150, spread=0.1, centre=(0.5, 0.3, 0.0)), rig()),
    "tiny_and_huge": lambda: (
        {k: np.concatenate([a, b]) for (k, a), b in zip(scene(3, n=80, log_scale=np.log(2e-4), scale_std=0.3).items(),
                                                         scene(4, n=20, log_scale=np.log(0.5), scale_std=0.3).values())},
        rig(),
    ),
    "one_tile": lambda: (scene(5, n=150, spread=0.004, log_scale=np.log(0.002)), rig(width=40, height=40)),
    "odd_size_many_cams": lambda: (scene(6, n=120), rig(n_cams=3, width=37, height=21)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference(cpu_kernel, case):
    s, cams = CASES[case]()
    _, ref, g_ref = value_and_grads(s, cams, "reference", background=jnp.array([0.2, 0.1, 0.3]))
    _, ker, g_ker = value_and_grads(s, cams, "cpu", background=jnp.array([0.2, 0.1, 0.3]))
    assert_same_render(ref, ker)
    assert_same_grads(g_ref, g_ker)


def test_cases_exercise_what_they_claim():
    s, cams = CASES["behind_camera"]()
    meta = jrender(s, cams, "reference", return_meta=True).meta
    assert np.any(np.asarray(meta["depths"]) < 0.01), "some Gaussians must be behind the near plane"
    assert np.any(np.asarray(meta["radii"]).max(-1) == 0) and np.any(np.asarray(meta["radii"]).max(-1) > 0)
    s, cams = CASES["one_tile"]()
    meta = jrender(s, cams, "reference", return_meta=True).meta
    counts = np.asarray(meta["tile_counts"])
    assert counts.max() >= 100 and np.sum(counts > 0, axis=(1, 2)).min() <= 4
    out = jrender(s, cams, "reference")
    assert float(out.alpha.max()) > 0.999  # deep stacks hit the transmittance stop
    s, cams = CASES["tiny_and_huge"]()
    meta = jrender(s, cams, "reference", return_meta=True).meta
    r = np.asarray(meta["radii"]).max(-1)
    assert r.max() > 40 and np.any((r > 0) & (r <= 2))


def test_empty_scenes(cpu_kernel):
    cams = rig()
    empty = {k: v[:0] for k, v in scene(0).items()}
    for backend in ("reference", "cpu"):
        out = jrender(empty, cams, backend, background=jnp.array([0.5, 0.5, 0.5]))
        np.testing.assert_allclose(np.asarray(out.image), 0.5)
        np.testing.assert_allclose(np.asarray(out.alpha), 0.0)
        np.testing.assert_allclose(np.asarray(out.depth), 0.0)
    far_away = scene(0, n=50, centre=(0.0, 1e3, 0.0))  # far above the horizontal rig: culled everywhere
    for backend in ("reference", "cpu"):
        _, out, g = value_and_grads(far_away, cams, backend)
        assert float(jnp.abs(out.alpha).max()) == 0.0
        assert all(np.all(np.asarray(x) == 0) for x in g)


def smooth_scene(seed):
    """Five large Gaussians in front of the camera: every pixel sees every Gaussian with alpha well
    above 1/255, inside its 3-sigma box, and T stays above 1e-4, so the image is a smooth function
    of the parameters (3DGS's skip/box/stop rules make the image discontinuous elsewhere, where a
    finite difference measures jumps, not derivatives)."""
    rng = np.random.default_rng(seed)
    n = 5
    return dict(
        means=rng.normal(0, 0.05, (n, 3)).astype(np.float32),
        quats=rng.normal(size=(n, 4)).astype(np.float32),
        scales=rng.uniform(0.2, 0.4, (n, 3)).astype(np.float32),
        opacities=rng.uniform(0.3, 0.7, n).astype(np.float32),
        colors=rng.uniform(0.0, 1.0, (n, 3)).astype(np.float32),
    )


def test_kernel_directional_finite_differences(cpu_kernel):
    s, cams = smooth_scene(7), rig(n_cams=2, width=32, height=32, radius=1.5, fov=30.0)
    meta = jrender(s, cams, "cpu", return_meta=True)
    assert float(meta.alpha.min()) > 0.3, "the smooth scene must cover every pixel"
    g = grads(s, cams, "cpu")
    rng = np.random.default_rng(3)
    for name, gi in zip(PARAMS, g):
        v = rng.normal(size=s[name].shape).astype(np.float32)
        h = {"means": 1e-3, "quats": 1e-3, "scales": 1e-3, "opacities": 1e-3, "colors": 1e-3}[name]
        plus = dict(s, **{name: s[name] + h * v})
        minus = dict(s, **{name: s[name] - h * v})
        fd = (loss_value(plus, cams, "cpu") - loss_value(minus, cams, "cpu")) / (2 * h)
        an = float(np.sum(np.asarray(gi) * v))
        assert abs(fd - an) <= 1e-2 * max(abs(an), 1.0), f"{name}: finite difference {fd:.5g} vs gradient {an:.5g}"


def test_vmap_over_cameras_and_jit(cpu_kernel):
    s, cams = scene(8, n=100), rig(n_cams=3, width=40, height=32)
    for backend in ("reference", "cpu"):
        batched = jrender(s, cams, backend)

        def one(cam):
            out = render(s, cam, backend)
            return out.image[0], out.alpha[0], out.depth[0]

        img, alpha, depth = jax.jit(jax.vmap(one))(cams)
        np.testing.assert_allclose(np.asarray(img), np.asarray(batched.image), atol=1e-5)
        np.testing.assert_allclose(np.asarray(alpha), np.asarray(batched.alpha), atol=1e-5)
        # expected depth divides by alpha: where alpha is tiny, rounding differences grow
        np.testing.assert_allclose(np.asarray(depth), np.asarray(batched.depth), atol=1e-5, rtol=1e-4)
    jitted = jax.jit(lambda m: render(dict(s, means=m), cams, "cpu").image)(s["means"])
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(render(s, cams, "cpu").image), atol=1e-6)  # eager
    # vmap of the gradient (per-camera losses) goes through the batched backward custom call
    def cam_loss(cam, m):
        return jnp.sum(render(dict(s, means=m), cam, "cpu").image ** 2)
    gv = jax.jit(jax.vmap(jax.grad(cam_loss, argnums=1), in_axes=(0, None)))(cams, s["means"])
    g1 = jax.jit(jax.grad(cam_loss, argnums=1))
    gr = jnp.stack([g1(cams[i], s["means"]) for i in range(3)])
    np.testing.assert_allclose(np.asarray(gv), np.asarray(gr), rtol=1e-5, atol=1e-5)


def test_reference_capacity_is_exact_or_loud():
    s, cams = scene(9, n=120), rig(width=32, height=32)
    exact = render(s, cams, "reference")  # eager: the exact capacity is computed from concrete rects
    proj = jrender(s, cams, "reference", return_meta=True).meta
    need = int(np.asarray(proj["tile_counts"]).max())
    roomy = jrender(s, cams, "reference", capacity=need)
    np.testing.assert_allclose(np.asarray(roomy.image), np.asarray(exact.image), atol=1e-6)
    short = jax.jit(lambda m: render(dict(s, means=m), cams, "reference", capacity=need - 1).image)(s["means"])
    assert np.isnan(np.asarray(short)).any(), "an overflowing tile must not come out silently truncated"


def test_op_input_errors():
    m = jnp.zeros((5, 2))
    good = dict(conics=jnp.zeros((5, 3)), colors=jnp.zeros((5, 3)), opacities=jnp.zeros(5), depths=jnp.zeros(5),
                rects=jnp.zeros((5, 4), jnp.int32))
    with pytest.raises(ValueError, match="conics"):
        op.rasterize(m, **dict(good, conics=jnp.zeros((5, 2))), width=8, height=8, backend="reference")
    with pytest.raises(ValueError, match="means2d"):
        op.rasterize(jnp.zeros((5, 3)), **good, width=8, height=8, backend="reference")
    with pytest.raises(ValueError, match="backend"):
        op.rasterize(m, **good, width=8, height=8, backend="metal")


def test_tile_rects_bins_every_covered_pixel():
    # every pixel centre inside a Gaussian's box [m - r, m + r] must lie in one of its tiles
    rng = np.random.default_rng(0)
    m = rng.uniform(-20, 90, (500, 2)).astype(np.float32)
    r = rng.integers(0, 30, (500, 2)).astype(np.int32)
    rects = np.asarray(op.tile_rects(m, r, 70, 50))
    for i in range(500):
        if r[i].min() == 0:
            assert np.all(rects[i] == 0)
            continue
        xs = [j for j in range(70) if m[i, 0] - r[i, 0] <= j <= m[i, 0] + r[i, 0]]
        ys = [j for j in range(50) if m[i, 1] - r[i, 1] <= j <= m[i, 1] + r[i, 1]]
        if not xs or not ys:
            continue  # no pixel centre inside the box: the rect may still name a tile (conservative)
        assert rects[i, 0] * 16 <= xs[0] and xs[-1] < rects[i, 2] * 16
        assert rects[i, 1] * 16 <= ys[0] and ys[-1] < rects[i, 3] * 16


def test_kernel_backward_is_deterministic(cpu_kernel):
    # the gradients are summed per Gaussian in a fixed order: identical calls give identical bits
    from kernel_common import splat_backward_digest

    assert len({splat_backward_digest() for _ in range(3)}) == 1


def test_kernel_backward_is_independent_of_the_thread_count(cpu_kernel):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from kernel_common import splat_backward_digest

    tests = Path(__file__).resolve().parent
    script = (f"import sys; sys.path[:0] = [{str(tests.parent)!r}, {str(tests)!r}]; "
              "from kernel_common import splat_backward_digest; print(splat_backward_digest())")
    digests = {"default": splat_backward_digest()}
    for threads in ("1", "2", "3"):  # DHJAX_NUM_THREADS is read by the library: one process each
        env = dict(os.environ, DHJAX_NUM_THREADS=threads)
        run = subprocess.run([sys.executable, "-c", script], env=env, cwd=tests.parent, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        digests[threads] = run.stdout.strip().splitlines()[-1]
    assert len(set(digests.values())) == 1, digests


# ----------------------------------------------------------------------------------------------
# Non-finite Gaussians are dropped, the same way by every backend: the output is finite and equals
# the render without that Gaussian, and the Gaussian's gradients are zero (not NaN).

BACKENDS = ("reference", "cpu")


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "cpu":
        need_kernel(op.kernel_available("cpu"), "the CPU splat kernel")
    return request.param


def visible_index(s, cams, **kw):
    """A Gaussian that every camera sees (radius > 0), so dropping it changes the image."""
    r = np.asarray(jrender(s, cams, "reference", return_meta=True, **kw).meta["radii"]).min(-1)  # [C, N]
    seen = np.nonzero(r.min(0) >= 3)[0]
    assert seen.size, "the scene must have a Gaussian seen by every camera"
    return int(seen[0])


def without(s, i):
    return {k: np.delete(v, i, axis=0) for k, v in s.items()}


@functools.cache
def cached_value_and_grads(backend, **kw):
    """`value_and_grads` with one jitted function per (backend, kwargs): the scenes below share
    their shapes, so they share compilations (compiling dominates these tests' time)."""
    fn = jax.jit(jax.value_and_grad(lambda p, c: weighted_loss(p, c, backend, **kw), has_aux=True))

    def run(s, cams):
        (loss, out), g = fn({k: jnp.asarray(s[k]) for k in PARAMS}, cams)
        return loss, out, tuple(g[k] for k in PARAMS)

    return run


# name: (parameter, entry of Gaussian i set to the value, value, extra render kwargs)
POISON = {
    "colour_nan": ("colors", (1,), np.nan, {}),
    "sh_nan": ("colors", (2, 1), np.nan, dict(sh_degree=3)),  # one SH coefficient of band 1
    "opacity_nan": ("opacities", (), np.nan, {}),
    "quat_inf": ("quats", (2,), np.inf, {}),
    "mean_nan": ("means", (0,), np.nan, {}),
    "scale_inf": ("scales", (1,), np.inf, {}),
    "colour_neg_inf": ("colors", (0,), -np.inf, {}),
}


def poison_scene(case):
    name, entry, value, kw = POISON[case]
    s = scene(30, n=40, spread=0.1)
    if "sh_degree" in kw:
        s["colors"] = np.random.default_rng(31).normal(0, 0.3, (40, 16, 3)).astype(np.float32)
    cams = rig(n_cams=2, width=40, height=32)
    i = visible_index(s, cams, **kw)
    bad = {k: v.copy() for k, v in s.items()}
    bad[name][(i,) + entry] = value
    return s, bad, i, cams, kw


@pytest.mark.parametrize("case", sorted(POISON))
def test_non_finite_gaussian_is_dropped(backend, case):
    s, bad, i, cams, kw = poison_scene(case)
    vg = cached_value_and_grads(backend, **kw)
    _, out, g = vg(bad, cams)
    _, want, g_want = vg(without(s, i), cams)
    full = vg(s, cams)[1]
    # the dropped Gaussian is visible: without the rule this comparison would be vacuous
    assert float(jnp.abs(full.image - want.image).max()) > 1e-2
    assert_same_render(want, out, atol=1e-6)
    for name, gb, gw in zip(PARAMS, g, g_want):
        gb = np.asarray(gb)
        assert np.all(np.isfinite(gb)), f"{name}: non-finite gradient"
        assert np.all(gb[i] == 0), f"{name}: the dropped Gaussian has gradient {gb[i]}"
    assert_same_grads(g_want, tuple(np.delete(np.asarray(x), i, axis=0) for x in g), rel=1e-5)


@pytest.mark.parametrize("case", ["colour_nan", "opacity_nan", "quat_inf", "sh_nan"])
def test_non_finite_gaussian_kernel_matches_reference(cpu_kernel, case):
    _, bad, _, cams, kw = poison_scene(case)
    _, ref, g_ref = cached_value_and_grads("reference", **kw)(bad, cams)
    _, ker, g_ker = cached_value_and_grads("cpu", **kw)(bad, cams)
    assert_same_render(ref, ker)
    assert_same_grads(g_ref, g_ker)


def test_non_finite_covariance_is_dropped(backend):
    s = scene(32, n=40, spread=0.1)
    cams = rig(n_cams=2, width=40, height=32)
    i = visible_index(s, cams)
    covs = np.asarray(splat.covariance(s["quats"], s["scales"]))
    bad_covs = covs.copy()
    bad_covs[i, 0, 1] = np.nan
    _, out, g = value_and_grads(s, cams, backend, covariances=jnp.asarray(bad_covs))
    _, want, g_want = value_and_grads(without(s, i), cams, backend, covariances=jnp.asarray(np.delete(covs, i, 0)))
    assert_same_render(want, out, atol=1e-6)
    for name, gb in zip(PARAMS, g):
        assert np.all(np.isfinite(np.asarray(gb))) and np.all(np.asarray(gb)[i] == 0), name
    # quats and scales are ignored with covariances: their non-finite values do not drop anything
    odd = dict(s, quats=np.full_like(s["quats"], np.nan))
    assert_same_render(jrender(s, cams, backend, covariances=jnp.asarray(covs)),
                       jrender(odd, cams, backend, covariances=jnp.asarray(covs)), atol=0)


def test_op_drops_non_finite_entries(backend):
    """The op (projected Gaussians) applies the rule per (camera, Gaussian) entry, also to entries
    whose rectangle would bin them (the kernels never see the non-finite values)."""
    rng = np.random.default_rng(40)
    b, n, k, w, h = 2, 30, 3, 40, 32
    sigma = rng.uniform(2.0, 6.0, (b, n, 2))
    means2d = rng.uniform(0, [w, h], (b, n, 2))
    conics = np.stack([1 / sigma[..., 0] ** 2, np.zeros((b, n)), 1 / sigma[..., 1] ** 2], -1)
    colors = rng.uniform(0, 1, (b, n, k))
    opac = rng.uniform(0.3, 0.9, (b, n))
    depths = rng.uniform(1, 3, (b, n))
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    rects = op.tile_rects(f32(means2d), np.ceil(3 * sigma), w, h)
    args = [f32(a) for a in (means2d, conics, colors, opac, depths)]
    w_img = f32(rng.normal(size=(b, h, w, k)))
    w_t = f32(rng.normal(size=(b, h, w)))

    def run(m, q, c, o, d, r):
        def loss(m, q, c, o):
            img, t = op.rasterize(m, q, c, o, d, r, w, h, backend=backend)
            return jnp.sum(img * w_img) + jnp.sum(t * w_t), (img, t)
        (_, (img, t)), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(m, q, c, o)
        return np.asarray(img), np.asarray(t), [np.asarray(x) for x in g]

    j = 7  # entry (camera 1, Gaussian 7)
    want = run(*[a.at[1, j].set(0.0) if a.ndim == 2 else a for a in args[:3]], args[3].at[1, j].set(0.0), args[4], rects)
    for which, index, value in (("means2d", (1, j, 0), np.nan), ("conics", (1, j, 2), np.inf),
                                ("colors", (1, j, 1), np.nan), ("opacities", (1, j), np.nan),
                                ("depths", (1, j), np.nan)):
        bad = list(args)
        pos = ("means2d", "conics", "colors", "opacities", "depths").index(which)
        bad[pos] = bad[pos].at[index].set(value)
        img, t, g = run(*bad, rects)
        assert np.all(np.isfinite(img)) and np.all(np.isfinite(t)), which
        # equal to the same scene with that entry's opacity at zero (= not composited anywhere)
        np.testing.assert_allclose(img, want[0], atol=1e-6, rtol=0, err_msg=which)
        np.testing.assert_allclose(t, want[1], atol=1e-6, rtol=0, err_msg=which)
        for x in g:
            assert np.all(np.isfinite(x)) and np.all(x[1, j] == 0), which
        np.testing.assert_allclose(g[0][0], want[2][0][0], rtol=1e-5, atol=1e-7)  # camera 0 is untouched


def test_deterministic_flag_on_cpu_and_reference(cpu_kernel):
    """`deterministic=True` selects the CUDA backward's fixed-order mode; the CPU backward is
    always deterministic (the flag maps to the same handler: the same bits) and the reference
    ignores it."""
    s, cams = scene(11, n=60), rig(width=40, height=32)
    for backend in ("cpu", "reference"):
        plain = value_and_grads(s, cams, backend)[2]
        det = value_and_grads(s, cams, backend, deterministic=True)[2]
        for name, a, b in zip(PARAMS, plain, det):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{backend} {name}")


def lane_widths():
    """The CPU kernel's lane group widths this machine runs (4 always; 8 with AVX2)."""
    return (4, 8) if op.simd_lanes() == 8 else (4,)


def test_cpu_kernel_exp_is_the_c_librarys(cpu_kernel, monkeypatch):
    """The kernel evaluates exp a lane group at a time with glibc's expf algorithm (in double
    precision, rounded once): on 1.1M floats spread over [-60, 0] it is within 1 ulp of the C
    library's exp, and on x86-64 glibc bit for bit (there the kernel's results are what a scalar
    std::exp loop gives); below -60, where it defers to std::exp, it is equal everywhere. Each
    lane width this CPU runs is checked."""
    import platform

    for lanes in lane_widths():
        monkeypatch.setenv("DHJAX_SPLAT_LANES", str(lanes))
        assert op.simd_lanes() == lanes
        near = op.exp_agreement(-60.0, stride=1009)
        assert near["compared"] > 1_000_000 and near["fast"] == near["compared"]
        assert near["max_ulp"] <= 1, (lanes, near)
        if platform.libc_ver()[0] == "glibc" and platform.machine() in ("x86_64", "AMD64"):
            assert near["mismatches"] == 0, (lanes, near)
        far = op.exp_agreement(-1e30, stride=100_003)
        assert far["compared"] > 10_000 and 0 < far["fast"] < far["compared"]
        assert far["max_ulp"] <= 1, (lanes, far)
    with pytest.raises(ValueError, match="lo < 0"):
        op.exp_agreement(0.0)


def test_cpu_kernel_lane_widths_give_the_same_bits(cpu_kernel, monkeypatch):
    """The 8-lane (AVX2) and 4-lane pixel loops do the same IEEE operations per pixel in the
    same order: renders and gradients are equal bit for bit on every case, and so is the
    op-level backward digest (4 channels, 4000 overlapping Gaussians)."""
    from kernel_common import splat_backward_digest

    monkeypatch.delenv("DHJAX_SPLAT_LANES", raising=False)
    if op.simd_lanes() != 8:
        pytest.skip("this CPU (or build) runs the 4-lane loops only: nothing to compare")
    bg = jnp.array([0.2, 0.1, 0.3])
    for case in sorted(CASES):
        s, cams = CASES[case]()
        runs = {}
        for lanes in (4, 8):
            monkeypatch.setenv("DHJAX_SPLAT_LANES", str(lanes))
            assert op.simd_lanes() == lanes
            _, out, g = value_and_grads(s, cams, "cpu", background=bg)
            runs[lanes] = [np.asarray(out.image), np.asarray(out.alpha), np.asarray(out.depth)] + [np.asarray(x) for x in g]
        for i, (a, b) in enumerate(zip(runs[4], runs[8])):
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32), err_msg=f"{case} output {i}")
    digests = []
    for lanes in (4, 8):
        monkeypatch.setenv("DHJAX_SPLAT_LANES", str(lanes))
        digests.append(splat_backward_digest())
    assert digests[0] == digests[1]

"""SynShot inversion helpers: input checks, prior loading errors, the ArcFace terms, early stopping.

The end-to-end prior + inversion run is `test_synshot_end_to_end` (marked slow: it compiles the
full training step twice): `synshot_run.run_prior` and `run_invert` in-process, as the
experiments call them."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.synthesis import synshot
from dhjax.synthesis import synshot_invert as inv
from dhjax.synthesis import synshot_run
from dhjax.train import checkpoint as ckpt_lib
from dhjax.train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, variant, **overrides):
    return config_lib.apply_overrides(config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py:{variant}")),
                                      overrides)


def _sample(h=16, w=16):
    return dict(image=np.zeros((h, w, 3), np.float32), mask=np.ones((h, w), np.float32),
                K=np.eye(3, dtype=np.float32), R=np.eye(3, dtype=np.float32), t=np.zeros(3, np.float32),
                shape=np.zeros(300, np.float32), expression=np.zeros(100, np.float32),
                pose=np.zeros((5, 3), np.float32), translation=np.zeros(3, np.float32))


def test_check_subject_names_the_missing_camera_mask_or_parameters():
    inv.check_subject([_sample(), _sample()])
    with pytest.raises(ValueError, match="at least one image"):
        inv.check_subject([])
    s = _sample()
    del s["K"]
    with pytest.raises(ValueError, match=r"lacks \['K'\] \(camera\)"):
        inv.check_subject([_sample(), s])
    s = _sample()
    del s["mask"]
    with pytest.raises(ValueError, match=r"\(mask\)"):
        inv.check_subject([s])
    s = _sample()
    del s["expression"]
    with pytest.raises(ValueError, match="tracked parameters"):
        inv.check_subject([s])
    s = _sample()
    s["mask"] = np.ones((8, 8), np.float32)
    with pytest.raises(ValueError, match="does not match image"):
        inv.check_subject([s])
    with pytest.raises(ValueError, match="differ in size"):
        inv.check_subject([_sample(), _sample(16, 24)])


def test_load_latest_refuses_a_checkpoint_of_another_config(tmp_path):
    state = {"params": {"a": jnp.zeros(3), "b": jnp.ones((2, 2))}}
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
    ck.save(7, state, {"next_step": 7})
    ck.close()
    restored, meta, step = ckpt_lib.load_latest(str(tmp_path), state)
    assert step == 7 and meta["next_step"] == 7
    np.testing.assert_array_equal(np.asarray(restored["params"]["b"]), 1.0)
    with pytest.raises(ValueError, match="another config"):
        ckpt_lib.load_latest(str(tmp_path), {"params": {"a": jnp.zeros(4), "b": jnp.ones((2, 2))}})
    with pytest.raises(ValueError, match="another config"):
        ckpt_lib.load_latest(str(tmp_path), {"params": {"a": jnp.zeros(3), "c": jnp.ones((2, 2))}})
    # nothing was moved aside or deleted by the failed loads
    assert ckpt_lib.load_latest(str(tmp_path), state)[2] == 7
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        ckpt_lib.load_latest(str(tmp_path / "elsewhere"), state)


def test_invert_rejects_a_workdir_that_is_not_a_prior(tmp_path):
    prior = tmp_path / "prior"
    prior.mkdir()
    with pytest.raises(ValueError, match="prior_workdir"):
        synshot_run.run_invert(_config("synshot_invert", "tiny"), str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        synshot_run.run_invert(_config("synshot_invert", "tiny", prior_workdir=str(prior)), str(tmp_path / "b"))
    (prior / "config.json").write_text(json.dumps({"experiment": "register_flame"}))
    with pytest.raises(ValueError, match="not 'synshot_prior'"):
        synshot_run.run_invert(_config("synshot_invert", "tiny", prior_workdir=str(prior)), str(tmp_path / "c"))


@pytest.mark.parametrize("name", ["synshot_prior", "synshot_invert"])
def test_missing_lpips_weights_are_refused_before_the_run_starts(tmp_path, name):
    """A wrong loss.lpips_path fails, naming the field, before app.start makes the workdir and
    before any data is opened or generated."""
    cfg = _config(name, "tiny", **{"loss.lpips_path": str(tmp_path / "nope.npz")})
    fn = synshot_run.run_prior if name == "synshot_prior" else synshot_run.run_invert
    with pytest.raises(FileNotFoundError, match="config field loss.lpips_path: .*nope.npz"):
        fn(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_split_inputs_picks_the_input_views_of_one_frame():
    samples = [dict(_sample(), frame=np.int32(f), view=np.int32(v)) for f in (3, 5) for v in range(4)]
    chosen, rest = inv.split_inputs(samples, 1, (0, 2))
    assert [(int(s["frame"]), int(s["view"])) for s in chosen] == [(5, 0), (5, 2)] and len(rest) == 6
    with pytest.raises(ValueError, match="not all present"):
        inv.split_inputs(samples, 0, (0, 9))
    with pytest.raises(ValueError, match="out of range"):
        inv.split_inputs(samples, 2, (0,))
    # several frames (a monocular video): one view of each, in frame order; the rest held out
    chosen, rest = inv.split_inputs(samples, (1, 0), (2,))
    assert [(int(s["frame"]), int(s["view"])) for s in chosen] == [(5, 2), (3, 2)] and len(rest) == 6
    assert (3, 2) not in {(int(s["frame"]), int(s["view"])) for s in rest}
    with pytest.raises(ValueError, match=r"input frame\(s\) \[2\] out of range"):
        inv.split_inputs(samples, (0, 2), (0,))
    with pytest.raises(ValueError, match="names a frame twice"):
        inv.split_inputs(samples, (1, 1), (0,))


def test_early_stopper_waits_for_warmup_and_patience():
    st = inv.EarlyStopper(warmup=5, patience=3, decay=0.0)
    stops = []
    for loss in [5, 4, 3, 3, 3, 3, 3, 3, 3]:
        st, stop = st.update(float(loss))
        stops.append(stop)
    # improvements until step 3, then flat: patience 3 is reached at step 6 (> warmup 5)
    assert stops == [False] * 5 + [True] * 4
    st = inv.EarlyStopper(warmup=2, patience=2, decay=0.0)
    for loss in [5, 4, 3, 2, 1]:
        st, stop = st.update(float(loss))
        assert not stop                        # still improving: never stops


def test_arcface_terms_vanish_for_identical_images_and_have_gradients():
    from dhjax.models import flame
    from dhjax.nn import iresnet

    net = iresnet.IResNet(layers=(1, 2, 1, 1), width=4, embedding=8)
    shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, 112, 112, 3))))
    rng = np.random.default_rng(0)
    var = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape).astype(np.float32)) if s.ndim > 1
        else jnp.asarray(np.abs(rng.normal(1, 0.1, s.shape)).astype(np.float32)), shapes)
    fn = inv.arcface_loss(var, flame.load())
    b = 2
    K = np.tile(np.array([[300, 0, 64], [0, 300, 64], [0, 0, 1.0]], np.float32), (b, 1, 1))
    R = np.tile(np.diag([1, -1, -1.0]).astype(np.float32), (b, 1, 1))
    t = np.tile(np.array([0, 0, 1.0], np.float32), (b, 1))
    batch = dict(shape=np.zeros((b, 300), np.float32), expression=np.zeros((b, 100), np.float32),
                 pose=np.zeros((b, 5, 3), np.float32), translation=np.zeros((b, 3), np.float32), K=K, R=R, t=t,
                 image=rng.random((b, 128, 128, 3)).astype(np.float32), mask=np.ones((b, 128, 128), np.float32))
    f = jax.jit(fn)
    _, same = f(jnp.asarray(batch["image"]), batch)
    assert abs(float(same["arcface_id"])) < 1e-6 and float(same["arcface_feat"]) < 1e-10   # round-off only
    other = jnp.asarray(rng.random((b, 128, 128, 3)).astype(np.float32))
    loss, m = f(other, batch)
    assert float(m["arcface_feat"]) > 0 and float(m["arcface_id"]) > 0
    g = jax.jit(jax.grad(lambda r: fn(r, batch)[0]))(other)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


@pytest.mark.slow
def test_synshot_end_to_end(tmp_path):
    """Prior (a few steps on 2 synthetic identities) then inversion: both write their outputs."""
    data = {"data.train_identities": (0, 2), "data.test_identities": (1_000_000, 1),
            "data.cache_dir": str(tmp_path / "cache")}
    prior = tmp_path / "prior"
    metrics = synshot_run.run_prior(_config("synshot_prior", "tiny", **data, **{"train.steps": 3, "train.eval_every": 0}),
                                    str(prior))
    final = json.loads((prior / "final_metrics.json").read_text())
    assert {"heldout/prior_psnr", "heldout/mean_psnr"} <= set(final)
    assert final["heldout/prior_psnr"] == metrics["prior_psnr"] and "loss" in final
    assert (prior / "heldout_grid.png").exists() and (prior / "avatar_heldout0.ply").exists()
    out = tmp_path / "inv"
    summary = synshot_run.run_invert(_config("synshot_invert", "tiny", **{
        "prior_workdir": str(prior), "stage1.steps_per_frame": 1, "stage2.steps_per_frame": 1,
        "data.max_heldout": 2}), str(out))
    m = json.loads((out / "metrics.json").read_text())
    assert {"prior", "stage1", "inverted", "scratch"} <= set(m["heldout"]) and m["prior_step"] == 3
    assert m["heldout"] == summary["heldout"] and m["stages"]["stage1"]["steps"] == 3
    assert (out / "avatar.ply").exists() and (out / "renders.png").exists()
    assert json.loads((out / "final_metrics.json").read_text())["heldout/inverted/psnr"] == m["heldout"]["inverted"]["psnr"]


def test_configs_load_and_every_ablation_override_applies():
    from dhjax.train import config as config_lib

    for variant in ("", "tiny", "tiny_sweep", "paper"):
        cfg = config_lib.load_config(f"configs/synshot_prior.py:{variant}")
        assert cfg.experiment == "synshot_prior"
        synshot.NetConfig.from_config(cfg.model)
    sweep = config_lib.load_sweep("configs/synshot_prior.py:tiny_sweep")
    assert len(sweep) == 8
    base = config_lib.load_config("configs/synshot_prior.py:tiny_sweep")
    for overrides in sweep:          # an unknown field would raise here
        net = synshot.NetConfig.from_config(config_lib.apply_overrides(base, overrides).model)
        assert net.parts in (("face", "hair"), ("face",), ("all",))
    # Table 1's 256 x 256 row: the variant's resolution halved (64 -> 32 here, 512 -> 256 in paper).
    assert sweep[-1] == {"model.map_size": 32, "model.part_density": (32, 24)}
    assert config_lib.load_sweep("configs/synshot_prior.py:paper")[-1] == {
        "model.map_size": 256, "model.part_density": (256, 192)}
    # Table 2's inversion-loss variants: ArcFace and LPIPS on/off, the photometric stage-1 loss.
    inv = config_lib.load_config("configs/synshot_invert.py:tiny")
    variants = [config_lib.apply_overrides(inv, o) for o in config_lib.load_sweep("configs/synshot_invert.py:tiny")]
    assert sorted((v.loss.lpips > 0, v.arcface.id_weight > 0, v.stage1.loss) for v in variants) == [
        (False, False, "full"), (False, True, "full"), (True, False, "full"), (True, True, "full"),
        (True, True, "photometric")]
    paper = config_lib.load_config("configs/synshot_prior.py:paper")
    assert (paper.model.map_size, paper.model.feat_dim, paper.batch_size, paper.optim.lr,
            paper.optim.gamma, paper.train.steps) == (512, 128, 16, 1.3e-5, 0.66, 500_000)
    for variant in ("", "tiny"):
        assert config_lib.load_config(f"configs/synshot_invert.py:{variant}").experiment == "synshot_invert"
    with pytest.raises(ValueError, match="unknown variant"):
        config_lib.load_config("configs/synshot_prior.py:huge")

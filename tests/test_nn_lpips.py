"""LPIPS: distances against the `lpips` package (peers) with randomly initialised backbones and
the package's own linear heads, exported through the .pth -> .npz converter; the npz layout
round trip, the off switch and its message, batching, gradients, errors for bad weight files."""

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dhjax.nn import lpips as L


def image_pairs(seed, shape):
    rng = np.random.default_rng(seed)
    a = rng.uniform(size=shape).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.15, shape), 0, 1).astype(np.float32)
    return a, b


def torch_layout_arrays(params, net):
    """Inverse of L.params_from_arrays: flax params -> arrays named and shaped as in L.npz_keys."""
    out = {}
    for name, conv in params["features"].items():
        idx = name[len("conv"):]
        out[f"features.{idx}.weight"] = np.asarray(conv["kernel"]).transpose(3, 2, 0, 1)
        out[f"features.{idx}.bias"] = np.asarray(conv["bias"])
    for k in range(5):
        out[f"lin{k}.model.1.weight"] = np.asarray(params[f"lin{k}"]).reshape(1, -1, 1, 1)
    return out


# ---------------------------------------------------------------- the peer


def _stub_torchvision(torch):
    """A stand-in for `torchvision.models` with untrained AlexNet / VGG16 feature towers, used
    only when torchvision cannot be imported (the PyPI torchvision wheels are CUDA builds that
    do not load next to a CPU-only torch). Layer order and indices follow torchvision's models,
    so the lpips package slices them as it slices the real ones."""
    tnn = torch.nn

    def conv(cin, cout, k, s, p):
        return [tnn.Conv2d(cin, cout, k, stride=s, padding=p), tnn.ReLU(inplace=True)]

    def alexnet(pretrained=False, **_):
        assert not pretrained, "the stub has no pretrained weights"
        layers = (conv(3, 64, 11, 4, 2) + [tnn.MaxPool2d(3, 2)] + conv(64, 192, 5, 1, 2) + [tnn.MaxPool2d(3, 2)]
                  + conv(192, 384, 3, 1, 1) + conv(384, 256, 3, 1, 1) + conv(256, 256, 3, 1, 1) + [tnn.MaxPool2d(3, 2)])
        return types.SimpleNamespace(features=tnn.Sequential(*layers))

    def vgg16(pretrained=False, **_):
        assert not pretrained, "the stub has no pretrained weights"
        layers, cin = [], 3
        for block in ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)):
            for cout in block:
                layers += conv(cin, cout, 3, 1, 1)
                cin = cout
            layers.append(tnn.MaxPool2d(2, 2))
        return types.SimpleNamespace(features=tnn.Sequential(*layers))

    models = types.ModuleType("torchvision.models")
    models.alexnet, models.vgg16 = alexnet, vgg16
    tv = types.ModuleType("torchvision")
    tv.models = models
    return {"torchvision": tv, "torchvision.models": models}


def _is_mod(name, *roots):
    return any(name == r or name.startswith(r + ".") for r in roots)


@pytest.fixture(scope="module")
def peer():
    torch = pytest.importorskip("torch")
    if importlib.util.find_spec("lpips") is None:
        pytest.skip("needs the lpips package (pip install lpips)")
    saved = {k: v for k, v in sys.modules.items() if _is_mod(k, "torchvision", "lpips")}
    try:
        try:
            import torchvision.models  # noqa: F401
        except Exception:  # missing, or a build that does not load with this torch
            for k in [k for k in sys.modules if _is_mod(k, "torchvision")]:
                del sys.modules[k]
            sys.modules.update(_stub_torchvision(torch))
        yield torch, importlib.import_module("lpips")
    finally:
        for k in [k for k in sys.modules if _is_mod(k, "torchvision", "lpips")]:
            del sys.modules[k]
        sys.modules.update(saved)


def peer_model_and_params(peer, net, tmp_path, seed=0):
    """The lpips package's LPIPS with a random backbone (pnet_rand) and its shipped v0.1 heads,
    written as torchvision-style + lpips-style .pth files, converted and loaded by dhjax."""
    torch, lpips = peer
    torch.manual_seed(seed)
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
    sd = model.state_dict()
    backbone = {}
    for key, value in sd.items():
        if key.startswith("net.slice"):
            _, _, idx, kind = key.split(".")
            backbone[f"features.{idx}.{kind}"] = value
    heads = {k: v for k, v in sd.items() if k.startswith("lin") and not k.startswith("lins.")}
    assert len(heads) == 5 and all(float(v.min()) >= 0 for v in heads.values())
    torch.save(backbone, tmp_path / f"{net}_backbone.pth")
    torch.save(heads, tmp_path / f"{net}_heads.pth")
    out = L.convert_torch_checkpoints(tmp_path / f"{net}_backbone.pth", tmp_path / f"{net}_heads.pth",
                                      tmp_path / f"{net}.npz", net=net)
    return model, L.load_lpips(out, net=net)


def peer_distance(peer, model, a, b, per_layer=False):
    torch, _ = peer
    ta, tb = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))) for x in (a, b))
    with torch.no_grad():
        if per_layer:
            _, layers = model(ta, tb, retPerLayer=True, normalize=True)
            return np.stack([l.reshape(-1).numpy() for l in layers], axis=-1)
        return model(ta, tb, normalize=True).reshape(-1).numpy()


@pytest.mark.peers
def test_alexnet_matches_lpips_package(peer, tmp_path):
    model, params = peer_model_and_params(peer, "alex", tmp_path)
    fn = jax.jit(lambda p, a, b: L.lpips_distance(p, a, b, net="alex", per_layer=True))
    a, b = image_pairs(1, (4, 64, 80, 3))
    want = peer_distance(peer, model, a, b, per_layer=True)
    got = np.asarray(fn(params, a, b))
    assert got.shape == (4, 5) and np.all(want > 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got.sum(-1), peer_distance(peer, model, a, b), rtol=1e-5)


@pytest.mark.peers
def test_vgg_matches_lpips_package(peer, tmp_path):
    model, params = peer_model_and_params(peer, "vgg", tmp_path, seed=1)
    a, b = image_pairs(2, (2, 64, 64, 3))
    got = np.asarray(jax.jit(lambda p, a, b: L.lpips_distance(p, a, b, net="vgg"))(params, a, b))
    np.testing.assert_allclose(got, peer_distance(peer, model, a, b), rtol=1e-5)


@pytest.mark.peers
def test_converter_accepts_whole_lpips_state_dict(peer, tmp_path):
    torch, lpips = peer
    torch.manual_seed(3)
    model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    torch.save(model.state_dict(), tmp_path / "whole.pth")
    out = L.convert_torch_checkpoints(tmp_path / "whole.pth", tmp_path / "whole.pth", tmp_path / "w.npz")
    with np.load(out) as z:
        assert set(z.files) == set(L.npz_keys("alex"))
    with pytest.raises(ValueError, match=r"lin0\.model\.1\.weight"):
        torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("lin")}, tmp_path / "no_heads.pth")
        L.convert_torch_checkpoints(tmp_path / "whole.pth", tmp_path / "no_heads.pth", tmp_path / "x.npz")


# ---------------------------------------------------------------- without the peer


def test_npz_round_trip_batching_and_gradient(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {k: (rng.normal(size=s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)
              for k, s in L.npz_keys("alex").items()}
    for k in range(5):
        arrays[f"lin{k}.model.1.weight"] = np.abs(arrays[f"lin{k}.model.1.weight"])
    np.savez(tmp_path / "w.npz", **arrays, **{"classifier.1.weight": np.zeros(3)})
    loaded = L.load_lpips(tmp_path / "w.npz", "alex")
    # the same tree as the module's own parameters, and back to the torch layouts unchanged
    want = jax.eval_shape(L.init_params, jax.random.key(0))
    assert jax.tree.structure(loaded) == jax.tree.structure(want)
    assert jax.tree.map(jnp.shape, loaded) == jax.tree.map(jnp.shape, want)
    back = torch_layout_arrays(loaded, "alex")
    assert set(back) == set(L.npz_keys("alex"))
    for k, v in back.items():
        np.testing.assert_array_equal(v, arrays[k])
    # distance per pair over two leading axes, and its gradient, from one compiled function
    dist_and_grad = jax.jit(jax.value_and_grad(
        lambda p, x, y: (jnp.sum(L.lpips_distance(p, x, y)), L.lpips_distance(p, x, y)), argnums=1, has_aux=True))
    a, b = image_pairs(4, (2, 3, 40, 40, 3))
    (total, d), g = dist_and_grad(loaded, a, b)
    d, g = np.asarray(d), np.asarray(g)
    assert d.shape == (2, 3) and np.all(d > 0)
    np.testing.assert_allclose(float(total), d.sum(), rtol=1e-5)
    assert g.shape == a.shape and np.all(np.isfinite(g)) and np.abs(g).max() > 0
    # where every channel of a tap is zero the normalisation still has a finite gradient
    dead = jax.tree.map(jnp.zeros_like, loaded)
    (_, d0), g0 = dist_and_grad(dead, np.zeros_like(a), np.zeros_like(b))
    assert np.all(np.asarray(d0) == 0) and np.all(np.isfinite(np.asarray(g0)))
    # make_lpips: a ready function of the images
    fn = L.make_lpips(loaded)
    np.testing.assert_allclose(np.asarray(fn(a, a)), 0.0, atol=1e-12)
    # load_configured: what a config field names, or None for an empty one
    assert L.load_configured("") is None and L.load_configured(None) is None
    jax.tree.map(np.testing.assert_array_equal, L.load_configured(str(tmp_path / "w.npz")), loaded)


def test_off_switch_and_messages():
    assert L.make_lpips(None) is None
    msg = L.lpips_status_message(None)
    assert msg.startswith("LPIPS off") and "convert_torch_checkpoints" in msg and "AlexNet" in msg
    assert L.lpips_status_message("/data/lpips_alex.npz").startswith("LPIPS on: alex")
    assert L.tap_channels("alex") == (64, 192, 384, 256, 256)
    assert L.tap_channels("vgg") == (64, 128, 256, 512, 512)
    assert L.npz_keys("alex")["features.0.weight"] == (64, 3, 11, 11)
    assert L.npz_keys("vgg")["lin4.model.1.weight"] == (1, 512, 1, 1)


def test_bad_weight_files(tmp_path):
    arrays = {k: np.zeros(s, np.float32) for k, s in L.npz_keys("alex").items()}
    del arrays["features.3.weight"]
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(ValueError, match=r"missing\.npz: missing LPIPS \(alex\) weights: features\.3\.weight"):
        L.load_lpips(tmp_path / "missing.npz")
    arrays["features.3.weight"] = np.zeros((192, 64, 3, 3), np.float32)
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(ValueError, match=r"features\.3\.weight has shape \(192, 64, 3, 3\), expected \(192, 64, 5, 5\)"):
        L.load_lpips(tmp_path / "shape.npz")
    with pytest.raises(ValueError, match="missing LPIPS \\(vgg\\) weights"):
        L.load_lpips(tmp_path / "shape.npz", net="vgg")
    with pytest.raises(FileNotFoundError):
        L.load_lpips(tmp_path / "nothing.npz")
    with pytest.raises(FileNotFoundError, match=r"^config field loss\.lpips_path: .*nothing\.npz"):
        L.load_configured(tmp_path / "nothing.npz", field="loss.lpips_path")
    with pytest.raises(ValueError, match=r"shape\.npz: .*features\.3\.weight has shape"):
        L.load_configured(tmp_path / "shape.npz")
    with pytest.raises(ValueError, match="unknown LPIPS backbone"):
        L.npz_keys("squeeze")


def test_bad_images():
    params = {}  # the images are checked before the weights are used
    a = np.zeros((1, 24, 64, 3), np.float32)
    with pytest.raises(ValueError, match="at least 31 pixels"):
        L.lpips_distance(params, a, a)
    with pytest.raises(ValueError, match=r"\[\.\.\., H, W, 3\]"):
        L.lpips_distance(params, a[..., :1], a[..., :1])
    with pytest.raises(ValueError, match="same shape"):
        L.lpips_distance(params, np.zeros((1, 64, 64, 3)), np.zeros((2, 64, 64, 3)))

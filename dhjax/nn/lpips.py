"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features
as a Perceptual Metric", version 0.1) as a flax linen module, with an importer for user-given
weights.

LPIPS(a, b) for images a, b in [0, 1]:

1. x -> 2x - 1 (LPIPS works on [-1, 1]), then the "scaling layer" (x - shift) / scale per RGB
   channel, shift = (-0.030, -0.088, -0.188), scale = (0.458, 0.448, 0.450) (`SHIFT`, `SCALE`).
2. Five feature maps ("taps") of an ImageNet classifier's convolutional tower, each taken after
   a ReLU: for AlexNet after conv1..conv5 (64, 192, 384, 256, 256 channels); for VGG16 after
   relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (64, 128, 256, 512, 512 channels).
3. Each tap is unit-normalised along channels at every pixel, f / (||f||_2 + 1e-10).
4. Per tap k: squared difference of the normalised features, weighted by a learned non-negative
   1x1 "linear" head w_k [C_k] (no bias), summed over channels and averaged over pixels.
5. The distance is the sum over the five taps.

No weights ship with dhjax and none are downloaded. The backbone (torchvision's ImageNet
AlexNet/VGG16) and the linear heads (the `lpips` package) are loaded from a file the user gives,
an `.npz` with these arrays (PyTorch layouts, float32), see `npz_keys(net)`:

  alex: features.{0,3,6,8,10}.weight [O, I, kh, kw] and features.{...}.bias [O]
        (torchvision's AlexNet `features` indices: conv 11x11/4 pad 2, 5x5 pad 2, then 3x3 pad 1,
        with 3x3/2 max pools after the first two ReLUs)
  vgg:  features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.weight / .bias (all 3x3 pad 1, 2x2/2 max
        pools between the blocks)
  both: lin{k}.model.1.weight [1, C_k, 1, 1] for k = 0..4 (the lpips package's NetLinLayer)

Extra arrays (e.g. torchvision's `classifier.*`) are ignored. `convert_torch_checkpoints` makes
such a file from the official `.pth` files (it needs torch). Without weights LPIPS is off:
`make_lpips(None)` returns None and `lpips_status_message(None)` says how to turn it on.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dhjax.io._common import existing_file

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # added to the channel norm in step 3, as in the lpips package

NETS = ("alex", "vgg")

# Convolutional towers as stages; each stage ends in a tap. A conv entry is
# (torchvision features index, in channels, out channels, kernel, stride, padding) and is followed
# by a ReLU; ("pool", kernel, stride) is an unpadded max pool.
_STAGES = {
    "alex": (
        ((0, 3, 64, 11, 4, 2),),
        (("pool", 3, 2), (3, 64, 192, 5, 1, 2)),
        (("pool", 3, 2), (6, 192, 384, 3, 1, 1)),
        ((8, 384, 256, 3, 1, 1),),
        ((10, 256, 256, 3, 1, 1),),
    ),
    "vgg": (
        ((0, 3, 64, 3, 1, 1), (2, 64, 64, 3, 1, 1)),
        (("pool", 2, 2), (5, 64, 128, 3, 1, 1), (7, 128, 128, 3, 1, 1)),
        (("pool", 2, 2), (10, 128, 256, 3, 1, 1), (12, 256, 256, 3, 1, 1), (14, 256, 256, 3, 1, 1)),
        (("pool", 2, 2), (17, 256, 512, 3, 1, 1), (19, 512, 512, 3, 1, 1), (21, 512, 512, 3, 1, 1)),
        (("pool", 2, 2), (24, 512, 512, 3, 1, 1), (26, 512, 512, 3, 1, 1), (28, 512, 512, 3, 1, 1)),
    ),
}

# Smallest square input whose last tap is at least 1 x 1.
MIN_SIZE = {"alex": 31, "vgg": 16}

_DISPLAY = {"alex": "AlexNet", "vgg": "VGG16"}
WEIGHTS_HINT = ("an .npz of torchvision's ImageNet {name} `features.*` weights and the lpips "
                "package's `lin{{k}}.model.1.weight` heads (make one with "
                "dhjax.nn.lpips.convert_torch_checkpoints)")


def _check_net(net: str) -> str:
    if net not in _STAGES:
        raise ValueError(f"unknown LPIPS backbone '{net}', expected one of {NETS}")
    return net


def _convs(net: str):
    return [layer for stage in _STAGES[_check_net(net)] for layer in stage if layer[0] != "pool"]


def tap_channels(net: str = "alex") -> tuple[int, ...]:
    """Channels of the five LPIPS taps: (64, 192, 384, 256, 256) for alex,
    (64, 128, 256, 512, 512) for vgg."""
    return tuple(stage[-1][2] for stage in _STAGES[_check_net(net)])


def npz_keys(net: str = "alex") -> dict[str, tuple[int, ...]]:
    """Array names and shapes (PyTorch layouts) that `load_lpips` expects for backbone `net`."""
    keys = {}
    for idx, cin, cout, k, _, _ in _convs(net):
        keys[f"features.{idx}.weight"] = (cout, cin, k, k)
        keys[f"features.{idx}.bias"] = (cout,)
    for k, c in enumerate(tap_channels(net)):
        keys[f"lin{k}.model.1.weight"] = (1, c, 1, 1)
    return keys


class FeatureTower(nn.Module):
    """Convolutional tower of torchvision's AlexNet (`net="alex"`) or VGG16 (`net="vgg"`) up to
    the five LPIPS taps.

    __call__(x: [N, H, W, 3] float, already shifted/scaled) -> list of 5 taps [N, h_k, w_k, C_k].
    Convs are named `conv{i}` after torchvision's `features.{i}` index.
    """

    net: str = "alex"
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        taps = []
        for stage in _STAGES[_check_net(self.net)]:
            for layer in stage:
                if layer[0] == "pool":
                    _, k, s = layer
                    x = nn.max_pool(x, (k, k), strides=(s, s), padding="VALID")
                else:
                    idx, _, cout, k, s, p = layer
                    x = nn.Conv(cout, (k, k), strides=(s, s), padding=((p, p), (p, p)),
                                precision=self.precision, name=f"conv{idx}")(x)
                    x = nn.relu(x)
            taps.append(x)
        return taps


def _unit_normalise(f):
    """f / (||f||_2 over channels + EPS); the norm's gradient is kept finite where f = 0."""
    sq = jnp.sum(f * f, axis=-1, keepdims=True)
    pos = sq > 0
    norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
    return f / (norm + EPS)


def _nonneg_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype) / shape[0]


class LPIPSNet(nn.Module):
    """LPIPS distance between image batches (module docstring).

    __call__(a, b: [N, H, W, 3] in [0, 1], per_layer=False) -> [N], or [N, 5] with per_layer.
    Parameters: {"features": {"conv{i}": {"kernel", "bias"}}, "lin0".."lin4": [C_k]}.
    """

    net: str = "alex"
    precision: Any = None

    @nn.compact
    def __call__(self, a, b, per_layer: bool = False):
        n = a.shape[0]
        x = jnp.concatenate([a, b], axis=0) * 2.0 - 1.0
        x = (x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype)
        taps = FeatureTower(self.net, self.precision, name="features")(x)
        layers = []
        for k, f in enumerate(taps):
            w = self.param(f"lin{k}", _nonneg_init, (f.shape[-1],))
            f = _unit_normalise(f)
            d = jnp.square(f[:n] - f[n:])
            layers.append(jnp.mean(jnp.einsum("nhwc,c->nhw", d, w, precision=self.precision), axis=(1, 2)))
        layers = jnp.stack(layers, axis=-1)
        return layers if per_layer else jnp.sum(layers, axis=-1)


def lpips_distance(params, a, b, *, net: str = "alex", per_layer: bool = False, precision=None) -> jax.Array:
    """LPIPS between images a, b [..., H, W, 3] in [0, 1]: [...] (or [..., 5] per tap with per_layer).

    params: from `load_lpips` (or `init_params`). H, W >= 31 for alex, >= 16 for vgg.
    precision: of the convolutions (None: the backend's default, which on recent GPUs may be
    TF32; pass jax.lax.Precision.HIGHEST for float32 metrics there). Differentiable, so usable
    as a loss.
    """
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"lpips: images must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim < 3 or a.shape[-1] != 3:
        raise ValueError(f"lpips: expected RGB images [..., H, W, 3], got shape {a.shape}")
    H, W = a.shape[-3:-1]
    if min(H, W) < MIN_SIZE[_check_net(net)]:
        raise ValueError(f"lpips ({net}): images must be at least {MIN_SIZE[net]} pixels on each side, "
                         f"got {H} x {W}")
    lead = a.shape[:-3]
    dtype = jnp.result_type(a.dtype, jnp.float32)
    a = a.reshape((-1, H, W, 3)).astype(dtype)
    b = b.reshape((-1, H, W, 3)).astype(dtype)
    out = LPIPSNet(net, precision).apply({"params": params}, a, b, per_layer)
    return out.reshape(lead + out.shape[1:])


def init_params(rng, net: str = "alex") -> dict:
    """Randomly initialised LPIPS parameters (for tests and shapes only: not a perceptual metric)."""
    return _init(rng, _check_net(net))


@functools.partial(jax.jit, static_argnames="net")
def _init(rng, net):
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    return LPIPSNet(net).init(rng, x, x)["params"]


def _check_arrays(arrays: Mapping[str, Any], net: str, source: str) -> None:
    want = npz_keys(net)
    missing = [k for k in want if k not in arrays]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"{source}: missing LPIPS ({net}) weights: {shown}. Expected "
                         + WEIGHTS_HINT.format(name=_DISPLAY.get(net, net))
                         + f"; see dhjax.nn.lpips.npz_keys('{net}')")
    bad = [f"{k} has shape {tuple(np.shape(arrays[k]))}, expected {s}"
           for k, s in want.items() if tuple(np.shape(arrays[k])) != s]
    if bad:
        raise ValueError(f"{source}: wrong LPIPS ({net}) weight shapes: " + "; ".join(bad))


def params_from_arrays(arrays: Mapping[str, Any], net: str = "alex", source: str = "LPIPS weights") -> dict:
    """Flax params of `LPIPSNet(net)` from arrays named as in `npz_keys(net)` (PyTorch layouts)."""
    _check_arrays(arrays, net, source)
    features = {}
    for idx, *_ in _convs(net):
        w = np.asarray(arrays[f"features.{idx}.weight"], np.float32)
        features[f"conv{idx}"] = {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
                                  "bias": jnp.asarray(np.asarray(arrays[f"features.{idx}.bias"], np.float32))}
    params = {"features": features}
    for k in range(len(tap_channels(net))):
        params[f"lin{k}"] = jnp.asarray(np.asarray(arrays[f"lin{k}.model.1.weight"], np.float32).reshape(-1))
    return params


def load_lpips(path: str | os.PathLike, net: str = "alex") -> dict:
    """LPIPS params from a user-given `.npz` laid out as `npz_keys(net)` (module docstring).

    Raises FileNotFoundError for a missing file and ValueError naming missing keys or wrong shapes.
    """
    path = existing_file(path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    return params_from_arrays(arrays, _check_net(net), source=str(path))


def load_configured(path: str | os.PathLike | None, field: str = "eval.lpips_path", net: str = "alex") -> dict | None:
    """The LPIPS params that a config field names (`load_lpips`), or None when the field is empty
    (LPIPS off). A missing file raises FileNotFoundError naming the field and the file; bad
    contents raise `load_lpips`'s ValueError (it names the file). The methods' config checks
    call it before a run writes anything, and their evaluations to load the weights."""
    if not path:
        return None
    try:
        return load_lpips(path, net)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"config field {field}: {err}") from None


# lpips' own state dict keeps the backbone as net.slice{s}.{i}.*, with i torchvision's index
_SLICE_KEY = re.compile(r"^net\.slice\d+\.(\d+)\.(weight|bias)$")


def convert_torch_checkpoints(backbone_pth: str | os.PathLike, lpips_pth: str | os.PathLike,
                              out_npz: str | os.PathLike, net: str = "alex") -> str:
    """Writes the `.npz` that `load_lpips` reads from the official PyTorch files (needs torch).

    backbone_pth: torchvision's ImageNet state dict of AlexNet (alexnet-owt-7be5be79.pth) or
      VGG16 (vgg16-397923af.pth), keys `features.{i}.weight/bias`; a state dict of a whole
      `lpips.LPIPS` module (keys `net.slice{s}.{i}.*`) is accepted too.
    lpips_pth: the lpips package's heads, `lpips/weights/v0.1/{alex,vgg}.pth` (keys
      `lin{k}.model.1.weight`; `lin{k}.model.0.weight`, saved without dropout, is accepted too).
    Returns out_npz as a string.
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError("convert_torch_checkpoints needs PyTorch (pip install torch)") from e
    _check_net(net)

    def read(p):
        sd = torch.load(os.fspath(existing_file(p)), map_location="cpu", weights_only=True)
        if not isinstance(sd, Mapping):
            raise ValueError(f"{p}: expected a PyTorch state dict, got {type(sd).__name__}")
        return {k: v.detach().cpu().numpy() for k, v in sd.items() if hasattr(v, "detach")}

    arrays = {}
    for key, value in read(backbone_pth).items():
        m = _SLICE_KEY.match(key)
        if m:
            key = f"features.{m.group(1)}.{m.group(2)}"
        if key.startswith("features."):
            arrays[key] = value
    for key, value in read(lpips_pth).items():
        m = re.match(r"^lin(\d+)\.model\.[01]\.weight$", key)
        if m:
            arrays[f"lin{m.group(1)}.model.1.weight"] = value
    want = npz_keys(net)
    _check_arrays(arrays, net, f"{backbone_pth} + {lpips_pth}")
    np.savez(out_npz, **{k: np.asarray(arrays[k], np.float32) for k in want})
    return os.fspath(out_npz)


def make_lpips(params: dict | None, net: str = "alex") -> Callable | None:
    """A jitted `fn(a, b) -> [...]` (images [..., H, W, 3] in [0, 1]) for loaded params; None
    when params is None (LPIPS off; print `lpips_status_message(None)` to say so)."""
    if params is None:
        return None
    _check_net(net)
    # params travel as an argument, not as constants baked into the compiled program
    fn = jax.jit(lambda p, a, b: lpips_distance(p, a, b, net=net))
    return lambda a, b: fn(params, a, b)


def lpips_status_message(weights: str | os.PathLike | dict | None, net: str = "alex") -> str:
    """One line for logs: whether LPIPS is on, given the user's weights path (or params, or None)."""
    if weights is None:
        return ("LPIPS off: no weights given. To turn it on, set the LPIPS weights path to "
                + WEIGHTS_HINT.format(name=_DISPLAY.get(net, net)) + ".")
    where = "given params" if isinstance(weights, Mapping) else f"weights from '{os.fspath(weights)}'"
    return f"LPIPS on: {net}, {where}"

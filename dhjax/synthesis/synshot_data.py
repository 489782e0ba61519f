"""SynShot glue between datasets, the model's pure functions and the training harness: data
opening, the prior's (init, train_step, evaluate, render) functions, held-out evaluation with
the mean-image baseline, and picture grids. Used by `dhjax.synthesis.synshot_run`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.data import cache as cache_lib
from dhjax.data import dataset as ds
from dhjax.data import grain_pipeline
from dhjax.synthesis import synshot
from dhjax.train import logs

REQUIRED_MAP_KEYS = synshot.MAP_KEYS


class SelectedDataset:
    """A dataset view keeping only `keys` of each sample (optionally cached in memory).

    Raises a KeyError naming the split folder and the missing keys when a sample lacks any. A
    Grain random-access data source like its base (thread-safe reads; with worker processes,
    each worker keeps its own in-memory cache).
    """

    def __init__(self, base, keys, *, in_memory: bool = False, name: str = ""):
        self.base, self.keys, self.in_memory, self.name = base, tuple(keys), in_memory, name
        self._cache: dict = {}

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i in self._cache:
            return self._cache[i]
        s = self.base[i]
        missing = [k for k in self.keys if k not in s]
        if missing:
            raise KeyError(f"{self.name or 'dataset'} sample {i} lacks {missing}: SynShot needs images, masks, "
                           f"cameras, head-model parameters and the UV maps {list(REQUIRED_MAP_KEYS)}")
        out = {k: s[k] for k in self.keys}
        for extra in ("item", "frame", "view"):
            if extra in s:
                out[extra] = np.asarray(s[extra], np.int32)
        if self.in_memory:
            self._cache[i] = out
        return out


def dataset_root(cfg) -> Path:
    """cfg.data.root, or the cached synthetic dataset of cfg.data.synthetic (generated once)."""
    if cfg.data.root:
        root = Path(cfg.data.root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root '{root}' is not a folder")
        return root
    return cache_lib.cached_multiview(
        cfg.data.synthetic, {"train": tuple(cfg.data.train_identities), "test": tuple(cfg.data.test_identities)},
        name="synshot", cache_dir=cfg.data.cache_dir or None)


def open_split(root, split: str, *, in_memory: bool = True) -> SelectedDataset:
    """A split ("train"/"test") of the dataset folder `root`, restricted to the keys the prior
    reads (samples kept in memory once read, unless `in_memory=False`)."""
    return SelectedDataset(ds.FolderDataset(root, split), synshot.BATCH_KEYS, in_memory=in_memory,
                           name=f"{root}/{split}")


def image_size(dataset) -> tuple[int, int]:
    """(width, height) of the dataset's images (all must share it)."""
    h, w = dataset[0]["image"].shape[:2]
    return int(w), int(h)


def stack(samples) -> dict:
    """Stacks a list of samples into a batch {key: [B, ...]}."""
    return ds.stack_samples(samples)


def pipeline(dataset, batch_size: int, seed: int = 0, loader=None):
    """The training pipeline over `dataset` (config block `loader`, None: the Grain pipeline with
    its defaults; `dhjax.data.grain_pipeline.make_pipeline`)."""
    return grain_pipeline.make_pipeline(dataset, batch_size, seed=seed, loader=loader)


def eval_batch(dataset, n: int, devices: int = 1) -> dict:
    """A fixed batch of n held-out images spread over the split (n rounded up to the device count)."""
    n = max(devices, int(np.ceil(n / devices)) * devices)
    idx = np.linspace(0, len(dataset) - 1, n).round().astype(int)
    return stack([dataset[int(i)] for i in idx])


def model_batch(batch) -> dict:
    """The keys of `batch` the model reads (synshot.BATCH_KEYS), without the others."""
    return {k: batch[k] for k in synshot.BATCH_KEYS if k in batch}


def lpips_from_config(loss_cfg, log=print):
    """The LPIPS distance of `loss.lpips_path` (weights given by the user), or None: LPIPS is
    off without weights or with weight 0, and `log` says so. A missing file raises
    FileNotFoundError naming the field (`lpips.load_configured`)."""
    from dhjax.nn import lpips

    if not loss_cfg.lpips_path:
        if log:
            log(lpips.lpips_status_message(None) if loss_cfg.lpips > 0 else
                "LPIPS off (loss.lpips = 0 and no loss.lpips_path)")
        return None
    params = lpips.load_configured(loss_cfg.lpips_path, field="loss.lpips_path")
    if log:
        log(f"LPIPS on: {loss_cfg.lpips_path}" + ("" if loss_cfg.lpips > 0 else
                                                  " (but loss.lpips = 0: set a weight, e.g. 0.1)"))
    return lpips.make_lpips(params)


def prior_functions(ctx: synshot.Context):
    """(init, train_step, evaluate, render) of the prior for `dhjax.train.loop.Method` (ctx: the
    prior's `synshot.make_context`, with loss_cfg and optim_cfg)."""

    def init(rng, batch):
        return synshot.init_state(rng, model_batch(batch), ctx)

    def train_step(state, batch, rng):
        return synshot.train_step(state, model_batch(batch), rng, ctx)

    @jax.jit
    def evaluate(state, batch):
        # jitted here: the harness calls evaluate as it is, and run op by op the network and the
        # splatting compiled hundreds of small programs at every evaluation (~20 s on a CPU)
        image, _, _ = synshot.predict(state, model_batch(batch), ctx)
        return synshot.image_metrics(image, batch["image"] * batch["mask"][..., None])

    @jax.jit
    def _first_renders(state, batch):
        few = jax.tree_util.tree_map(lambda x: x[:RENDER_ROWS], model_batch(batch))
        image, _, _ = synshot.predict(state, few, ctx)
        return few["image"] * batch["mask"][:RENDER_ROWS, ..., None], image

    def render(state, batch):
        """eval/heldout: masked ground truth | render of the eval batch's first RENDER_ROWS
        held-out images (`dhjax.train.logs.comparison_grid`; the prediction is jitted)."""
        target, image = _first_renders(state, batch)
        return {"eval/heldout": logs.comparison_grid(target, image)}

    return init, train_step, evaluate, render


RENDER_ROWS = 4
"""Held-out images the prior's render shows at each evaluation (rows of its grid)."""


def predictor(ctx: synshot.Context):
    """Jitted (state, batch, q_id=None) -> (image [B,H,W,3], alpha, out) of the model; batch
    entries other than BATCH_KEYS are ignored."""
    f = jax.jit(functools.partial(synshot.predict, ctx=ctx))
    return lambda state, batch, q_id=None: f(state, model_batch(batch), q_id=q_id)


def _batches(dataset, indices, batch_size: int, devices: int):
    bs = max(devices, (batch_size // devices) * devices)
    for s in range(0, len(indices), bs):
        idx = list(indices[s:s + bs])
        real = len(idx)
        idx += [idx[-1]] * (bs - real)          # pad the last batch (results of the pads dropped)
        yield stack([dataset[int(i)] for i in idx]), real


def mean_images(dataset) -> dict:
    """Per-view mean of the masked training images {view: [H, W, 3]} (the mean-image baseline)."""
    sums, counts = {}, {}
    for i in range(len(dataset)):
        s = dataset[i]
        v = int(s.get("view", 0))
        img = s["image"] * s["mask"][..., None]
        sums[v] = sums.get(v, 0.0) + img
        counts[v] = counts.get(v, 0) + 1
    return {v: (sums[v] / counts[v]).astype(np.float32) for v in sums}


def _metrics_np(pred, target):
    m = synshot.image_metrics(jnp.asarray(pred), jnp.asarray(target))
    return {k: float(v) for k, v in m.items()}


def heldout_metrics(predict, state, train_ds, test_ds, batch_size: int, *, max_images: int = 0,
                    devices: int = 1) -> dict:
    """Encoder-decoder renders of every held-out image against its masked ground truth, and the
    same metrics for the mean-image baseline (per-view mean of the training images).

    Returns {prior_psnr, prior_ssim, prior_l1, mean_psnr, mean_ssim, mean_l1, n_images}
    (per-image metrics averaged)."""
    means = mean_images(train_ds)
    n = len(test_ds) if not max_images else min(max_images, len(test_ds))
    idx = np.arange(n)
    acc = {"prior": [], "mean": []}
    for batch, real in _batches(test_ds, idx, batch_size, devices):
        image, _, _ = predict(state, batch)
        image = np.asarray(image)[:real]
        target = (batch["image"] * batch["mask"][..., None])[:real]
        views = np.asarray(batch["view"])[:real]
        base = np.stack([means.get(int(v), np.zeros_like(target[0])) for v in views])
        for j in range(real):
            acc["prior"].append(_metrics_np(image[j:j + 1], target[j:j + 1]))
            acc["mean"].append(_metrics_np(base[j:j + 1], target[j:j + 1]))
    out = {"n_images": float(n)}
    for name, rows in acc.items():
        for k in ("psnr", "ssim", "l1"):
            out[f"{name}_{k}"] = float(np.mean([r[k] for r in rows]))
    return out


def format_metrics(m: dict) -> str:
    """One line of `heldout_metrics`' figures: the prior's and the mean-image baseline's PSNR, SSIM
    and L1."""
    return (f"held-out ({int(m['n_images'])} images): prior PSNR {m['prior_psnr']:.2f} dB, SSIM "
            f"{m['prior_ssim']:.4f}, L1 {m['prior_l1']:.4f} | mean-image baseline PSNR {m['mean_psnr']:.2f} dB, "
            f"SSIM {m['mean_ssim']:.4f}, L1 {m['mean_l1']:.4f}")


def heldout_grid(predict, state, test_ds, n_identities: int, views) -> np.ndarray:
    """Picture grid: for each held-out identity two rows (ground truth, render); columns are the
    requested views of every expression. Returns uint8-ready float [H', W', 3] in [0, 1]."""
    base = test_ds.base
    by_key = {}
    for i, (item_dir, frame_dir, view, ordinal) in enumerate(base.entries):
        by_key[(ordinal, frame_dir.name, ds._trailing_number(view, 0))] = i
    items = sorted({k[0] for k in by_key})[:n_identities]
    rows = []
    for it in items:
        frames = sorted({k[1] for k in by_key if k[0] == it})
        idx = [by_key[(it, f, v)] for f in frames for v in views if (it, f, v) in by_key]
        if not idx:
            continue
        batch = stack([test_ds[i] for i in idx])
        image, _, _ = predict(state, batch)
        target = batch["image"] * batch["mask"][..., None]
        rows.append(np.concatenate(list(target), axis=1))
        rows.append(np.concatenate(list(np.asarray(image)), axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.clip(np.concatenate(rows, axis=0), 0.0, 1.0)

"""INSTA runs: training an avatar on a tracked video (`run`) and driving it with another
sequence's tracking (`reenact`), each writing into a run folder (`dhjax.train.app`).

Run folder: checkpoints/ (resumable), TensorBoard events (scalars; the image eval/heldout:
ground truth | render | depth of the first held-out frame, at every evaluation step and at the
end; the config as HParams) and metrics.jsonl, config.json, final_metrics.json (training metrics
and the held-out means), heldout_metrics.json (per frame and mean: L2, PSNR, SSIM, L1, LPIPS
when eval.lpips_path is given, mouth-region PSNR, depth errors of the face and mouth regions and
of a side view; the same for the textured-mesh baseline; the image metrics of eval.train_frames
training frames as train_*), heldout.png (ground truth | INSTA | baseline | depth, a few
held-out frames), heldout.mp4 (GT | render | depth over every held-out frame), orbit.mp4 (the
first held-out frame from -90 to +90 degrees of yaw), canonical_mesh.obj (marching cubes of the
canonical density), online.json / online.png (held-out PSNR against seconds, online modes),
training_curve.json / .png (offline runs: the held-out ray batch's PSNR at every evaluation
against seconds since the first step, compile, evaluations and checkpoints included; `plateau`
reads when it levels off; a run stopped by SIGTERM or Ctrl-C writes it too, for the steps it
ran, and the session resuming from where it stopped continues it: training_curve_stop.json; the
scheduled online mode's online.json the same way, with online_stop.json), tracking/ (live online
mode: every tracked frame, so that a killed run resumes its tracking too).

The baseline is the tracked mesh with a texture baked from the training frames
(`dhjax.render.texture.extract_texture`, which holds the light of the video), rendered unlit:
the "tracked textured mesh" of the issue, built the same way for true and tracked parameters. On
synthetic videos the depth errors compare INSTA's depth with the generator's true depth, in the
video's camera (face pixels; mouth pixels: lips and mouth interior, where the mouth's colour may
come from density far behind the surface) and in a camera turned by eval.side_yaw_deg around the
head; on tracked videos both views are the generator's cameras moved into the tracked world by
the rigid alignment of the tracked head to the true one (`camera_in_video_world`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dhjax import io as dio
from dhjax import losses
from dhjax.capture import track_run, tracker
from dhjax.data import cache as cache_lib
from dhjax.data import synthetic
from dhjax.geometry import alignment
from dhjax.nn import lpips
from dhjax.ops import raymarch
from dhjax.render import camera as camera_lib
from dhjax.render import shading
from dhjax.render import texture as texture_lib
from dhjax.synthesis import insta
from dhjax.synthesis import insta_data
from dhjax.train import app, logs, loop
from dhjax.train import config as config_lib

EXPERIMENT = "insta"


# ----------------------------------------------------------------------------------------------
# Data.


def _synthetic_config(cfg):
    g = cfg.data.synthetic.copy_and_resolve_references()
    return g


def open_video(cfg, log=print, track: bool = True):
    """(samples, names, assets, source) of the configured video; tracks it first when
    cfg.data.tracked (synthetic only) and `track`."""
    g = _synthetic_config(cfg)
    assets = synthetic.build_assets(None, int(g.uv_size))
    if cfg.data.root:
        root = Path(cfg.data.root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root '{root}' is not a folder")
        source = str(root)
    else:
        root = cache_lib.cached_video(g, name="insta_video", cache_dir=cfg.data.cache_dir or None)
        source = f"synthetic video {root}"
    item = None if int(cfg.data.item) < 0 else int(cfg.data.item)
    samples = insta_data.load_video(root, cfg.data.split, item, int(cfg.data.max_frames))
    names = [f"{root}/{cfg.data.split} frame {int(s.get('frame', i))}" for i, s in enumerate(samples)]
    if cfg.data.tracked and track:
        if cfg.data.root:
            raise ValueError("data.tracked tracks the synthetic video; a data.root dataset is already tracked "
                             "(experiments.track writes one)")
        samples = track_samples(cfg, samples, assets, log)
        source += " tracked by dhjax.capture.tracker"
    return samples, names, assets, source


def tracker_frames(cfg, samples, assets) -> tuple:
    """(head model, the tracker's FrameData per sample) of a synthetic video: the true projected
    68 landmarks plus 0.5 px noise (a perfect detector; iris points when the model has them) and
    the face and eye labels as masks (what a face parser gives)."""
    model = synthetic.base_model(assets)
    rng = np.random.default_rng(int(cfg.seed) + 17)
    iris_rng = np.random.default_rng([int(cfg.seed), 468])
    return model, [track_run.synthetic_frame(model, s, rng, 0.5, iris_rng, name=f"frame {t}")
                   for t, s in enumerate(samples)]


def tracked_sample(sample: dict, rec: dict, eyelids: bool | None = None) -> dict:
    """A sample with one tracked frame's parameters and camera (a `tracker.track_sequence` record:
    params, K, R, t) instead of the true ones; images and foreground masks kept."""
    fp = tracker.flame_parameters(rec["params"], eyelids=eyelids)
    return dict(sample, K=np.asarray(rec["K"], np.float32), R=np.asarray(rec["R"], np.float32),
                t=np.asarray(rec["t"], np.float32), shape=fp["shape"], expression=fp["expression"],
                pose=fp["pose"], translation=fp["translation"],
                **({"eyelids": fp["eyelids"]} if "eyelids" in fp else {}))


def track_samples(cfg, samples, assets, log=print):
    """The samples with the metrical tracker's parameters and cameras instead of the true ones
    (`tracker_frames`' landmarks and masks; the tracked eyelids too when cfg.tracker.eyelids
    tracked them)."""
    model, frames = tracker_frames(cfg, samples, assets)
    t0 = time.time()
    result = tracker.track_sequence(cfg.tracker, model, frames, log=log)
    log(f"tracked {len(frames)} frames in {time.time() - t0:.0f}s (landmark error "
        f"{float(np.mean(result.landmark_error_px)):.2f} px)")
    lids = tracker.tracked_eyelids(result.params)
    return [tracked_sample(s, dict(params=p, K=result.K[i], R=result.R[i], t=result.t[i]), eyelids=lids)
            for i, (s, p) in enumerate(zip(samples, result.params))]


class _FeedClosed(Exception):
    pass


class _Feed:
    """What both live feeds share: the training and held-out videos as arrays of all frames,
    allocated when frame 0 arrives (its shape fixes the canonical mesh) and filled frame by frame
    (`insta_data.prepare` of one frame, in frame order) by a background thread; `arrived()` is
    the number of training frames usable so far (a contiguous prefix). Subclasses set n (the
    video's frame count) before their first `_add` and run `_source` in the thread."""

    kind = "live"
    thread_name = "insta-live-feed"

    def __init__(self, cfg, assets, workdir, log=print):
        import threading

        self.cfg, self.assets = cfg, assets
        self.workdir = Path(workdir)
        self.log = log
        self.n = self.n_train = 0            # set by the source before frame 0 arrives
        self.count = 0                      # frames prepared (in order)
        self.train: insta_data.Video | None = None
        self.test: insta_data.Video | None = None
        self.canon = self.shape = None
        self.error: BaseException | None = None
        self.landmark_error_px: list[float] = []
        self.started = time.time()
        self.tracked_at: list[float] = []   # seconds since the start at which each frame arrived
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        try:
            self._source()
        except BaseException as err:        # re-raised in the training thread by wait() / arrived()
            with self._cond:
                self.error = err
                self._cond.notify_all()

    def _source(self):
        raise NotImplementedError

    def _set_count(self, n: int) -> None:
        self.n = int(n)
        self.n_train = self.n - insta_data.holdout_count(self.n, float(self.cfg.data.holdout))

    def close(self) -> None:
        """Stops the feed at its next frame (a run that ends early, e.g. on SIGTERM)."""
        self._closed = True

    def _add(self, i: int, s: dict, name: str, landmark_error_px: float | None = None) -> None:
        """Prepares frame i (sample s) into its slot of the training or held-out video."""
        if self._closed:
            raise _FeedClosed("the live feed was closed")
        s = dict(s)
        s.setdefault("frame", i)              # prepare() of one frame would number it 0
        v, canon = insta_data.prepare([s], self.assets.model, background=tuple(self.cfg.model.background),
                                      min_frames=1, depth_source=self.cfg.data.depth_source, names=[name])
        if i == 0:
            self.canon, self.shape = canon, np.asarray(s["shape"], np.float32)
            self.train = insta_data.Video(*(np.repeat(a, self.n_train, 0) for a in v))
            self.test = insta_data.Video(*(np.repeat(a, self.n - self.n_train, 0) for a in v))
        else:
            if np.abs(canon - self.canon).max() > 1e-6:
                raise ValueError(f"{name}: the tracked shape changed after frame 0; INSTA builds one canonical "
                                 "mesh per video")
            if v.images.shape[1:] != self.train.images.shape[1:]:
                raise ValueError(f"{name}: image is {v.images.shape[1:3]}, frame 0 "
                                 f"{self.train.images.shape[1:3]}")
        dst, j = (self.train, i) if i < self.n_train else (self.test, i - self.n_train)
        for whole, one in zip(dst, v):
            whole[j] = one[0]
        with self._cond:
            self.count = i + 1
            if landmark_error_px is not None:
                self.landmark_error_px.append(float(landmark_error_px))
            self.tracked_at.append(time.time() - self.started)
            self._cond.notify_all()
        if self.log is not None and ((i + 1) % 10 == 0 or i + 1 == self.n):
            lmk = "" if landmark_error_px is None else f", landmark error {landmark_error_px:.2f} px"
            self.log(f"live: {i + 1}/{self.n} frames arrived ({time.time() - self.started:.0f}s{lmk})")

    def wait(self, count: int) -> None:
        """Blocks until `count` frames have arrived; re-raises the feed's error."""
        with self._cond:
            while self.count < count and self.error is None:
                self._cond.wait(1.0)
            if self.error is not None:
                raise RuntimeError(f"{self.kind} failed: {self.error}") from self.error

    def arrived(self) -> int:
        """Training frames arrived so far; raises the feed's error (training must not go on
        quietly with the frames it has when the frames stopped coming)."""
        if self.error is not None and not self._closed:
            raise RuntimeError(f"{self.kind} failed after {self.count} frames: {self.error}") from self.error
        return min(self.count, self.n_train)


class LiveFeed(_Feed):
    """Online mode fed by the tracker (online.live with data.tracked): the synthetic video is
    tracked in a background thread while INSTA trains, and each frame joins the training set as
    soon as it is tracked (`_Feed`). Tracking saves every frame in <workdir>/tracking, so a
    killed run resumes both the tracking and the training. Which frames a step draws depends on
    how far tracking has got, so a live run is not reproducible step for step (the scheduled
    online mode is).
    """

    kind = "live tracking"
    thread_name = "insta-live-tracker"

    def __init__(self, cfg, samples, names, assets, workdir, log=print):
        insta_data.check_frames(samples, names)      # too few frames: an error before any tracking
        super().__init__(cfg, assets, workdir, log)
        self.samples, self.names = samples, names
        self._set_count(len(samples))

    def _source(self):
        model, frames = tracker_frames(self.cfg, self.samples, self.assets)
        eyelids = tracker.tracks_eyelids(self.cfg.tracker, model)

        def arrive(i: int, rec: dict):
            self._add(i, tracked_sample(self.samples[i], rec, eyelids=eyelids), self.names[i],
                      float(rec["landmark_error_px"]))

        tracker.track_sequence(self.cfg.tracker, model, frames, log=None, on_frame=arrive,
                               progress_dir=str(self.workdir / "tracking"))


class FolderFeed(_Feed):
    """Online mode fed by a frame folder that fills up (online.live with data.root): another
    process writes a tracked video into data.root frame by frame (`python -m experiments.track`
    streams its dataset/ folder as it tracks, `tracker.DatasetStream`, whose protocol this
    follows), and each frame joins the training set as soon as its folder is complete.

    While meta.json's "live" entry says the writer is not done, the feed waits up to
    online.timeout_s for meta.json to appear and for each next frame (<item>/frame_{i:04d} with
    its cameras.json); it stops with the writer's error when meta.json reports one, and with an
    error when another tracker run restarts the folder (its "run" id changes). A folder that is
    not being written (no "live" entry, or done) is read at once, with the offline reader's
    checks (the log says when its run finished before INSTA started: a tracker run started just
    before INSTA empties the folder only once its frame 0 is done); with
    online.wait_for_new_run a finished run's folder is not read, the feed waits (up to
    online.timeout_s) for a new tracker run to restart it. data.max_frames caps the count;
    data.item picks the sequence.
    """

    kind = "the frame folder"
    thread_name = "insta-folder-feed"

    def __init__(self, cfg, assets, workdir, log=print, poll_s: float = 0.5):
        super().__init__(cfg, assets, workdir, log)
        self.root = Path(cfg.data.root)
        self.poll_s = float(poll_s)
        self.timeout_s = float(cfg.online.get("timeout_s", 900.0))

    def _meta(self) -> dict | None:
        """meta.json, or None while it does not exist (or is being replaced)."""
        try:
            return json.loads((self.root / "meta.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _poll(self, what: str, ready, run: str | None = None):
        """Calls ready() until it returns something; the writer's error, a restarted folder and
        online.timeout_s without it end the wait with an error."""
        since = time.time()
        while True:
            if self._closed:
                raise _FeedClosed("the live feed was closed")
            try:
                got = ready()
            except FileNotFoundError:             # a folder being restarted by the writer
                got = None
            if got is not None:
                return got
            live = (self._meta() or {}).get("live") or {}
            if live.get("error"):
                raise RuntimeError(f"{self.root}: the writer failed: {live['error']}")
            if run is not None and live and live.get("run") != run:
                raise RuntimeError(f"{self.root}: another tracker run restarted the folder while INSTA read it; "
                                   "start INSTA again (on a folder one tracker run fills)")
            if time.time() - since > self.timeout_s:
                raise TimeoutError(f"{self.root}: no {what} after {self.timeout_s:g}s (online.timeout_s); is the "
                                   "tracker writing this folder still running?")
            time.sleep(self.poll_s)

    def _source(self):
        from dhjax.data import dataset as ds

        split_dir = self.root / self.cfg.data.split
        # The split folder first: a writer creates meta.json before any folder, so a split folder
        # seen without meta.json is a finished dataset. (Checking meta.json first raced with a
        # writer starting between the two checks: neither was seen, then both, read as finished.)
        if not split_dir.is_dir() or (self.root / "meta.json").exists():
            meta = self._poll("meta.json", self._meta)          # the tracker has not started writing yet
        else:
            meta = {}                                           # a finished dataset without meta.json
        live = meta.get("live")
        if live and live.get("done") and bool(self.cfg.online.get("wait_for_new_run", False)):
            old = live.get("run")
            if self.log is not None:
                self.log(f"live: {self.root} holds the finished tracker run {old}; waiting for a new run to "
                         "restart it (online.wait_for_new_run)")

            def new_run():
                m = self._meta()
                return m if m and (m.get("live") or {}).get("run") not in (None, old) else None

            meta = self._poll("new tracker run", new_run)
            live = meta["live"]
        if not live or live.get("done"):                        # nothing is writing it: read it as it is
            if live:
                try:
                    age = self.started - (self.root / "meta.json").stat().st_mtime
                except FileNotFoundError:
                    age = 0.0
                if age > 0 and self.log is not None:
                    self.log(f"live: {self.root} holds a tracker run that finished {age:.0f} s before INSTA "
                             f"started ({live.get('frames')} frames); training on it as it is. A tracker run "
                             "about to restart this folder is not waited for (online.wait_for_new_run=True "
                             "waits for it)")
            return self._read_finished()
        if meta.get("kind") != "video":
            raise ValueError(f"{self.root}/meta.json: kind {meta.get('kind')!r}; INSTA reads a tracked video")

        def find_item():                                        # written with frame 0's folder
            items = sorted((p for p in split_dir.iterdir() if p.is_dir()), key=ds._numbered)
            if int(self.cfg.data.item) >= 0:
                items = [p for p in items if ds._trailing_number(p.name, -1) == int(self.cfg.data.item)]
            return items[0] if items else None

        item_dir = self._poll(f"sequence folder in {split_dir}" + (
            f" numbered {int(self.cfg.data.item)}" if int(self.cfg.data.item) >= 0 else ""), find_item, live.get("run"))
        n = int(live["frames"])
        if int(self.cfg.data.max_frames):
            n = min(n, int(self.cfg.data.max_frames))
        self._check_count(n, item_dir)
        run = live.get("run")
        reader = None
        for i in range(n):
            frame_dir = item_dir / f"frame_{i:04d}"
            self._poll(f"frame {i} ({frame_dir})", lambda: frame_dir if (frame_dir / "cameras.json").exists() else None,
                       run)
            views = ds.frame_views(frame_dir)
            if len(views) != 1:
                raise ValueError(f"{frame_dir}: INSTA takes a monocular video, this frame has views {views}")
            if reader is None:
                reader = ds.FolderDataset(self.root, self.cfg.data.split, partial=True)
            self._add(i, reader.read(item_dir, frame_dir, views[0]), str(frame_dir))

    def _check_count(self, n: int, where) -> None:
        if n < insta_data.MIN_FRAMES:
            raise ValueError(f"{where}: INSTA needs at least {insta_data.MIN_FRAMES} frames (one to train on, "
                             f"one held out), the folder holds {n}")
        self._set_count(n)

    def _read_finished(self) -> None:
        item = None if int(self.cfg.data.item) < 0 else int(self.cfg.data.item)
        samples = insta_data.load_video(self.root, self.cfg.data.split, item, int(self.cfg.data.max_frames))
        self._check_count(len(samples), self.root)
        for i, s in enumerate(samples):
            self._add(i, s, f"{self.root}/{self.cfg.data.split} frame {int(s.get('frame', i))}")


# ----------------------------------------------------------------------------------------------
# Rendering whole frames.


class Renderer:
    """Renders whole images of an avatar (host loop over ray chunks; exact sample capacity)."""

    def __init__(self, ctx: insta.Context, chunk: int):
        self.ctx = ctx
        self.chunk = int(chunk)
        self._grids = jax.jit(lambda bits, v, r, t: insta.deformed_grids(bits, ctx, v, r, t))
        self._shade = jax.jit(lambda params, frames, o, d, s: insta.shade(params, ctx, frames, o, d, s,
                                                                           insta.background_of(ctx)))

    def render(self, params, bits, frame: dict, K, R, t, width: int, height: int) -> dict:
        """color [H, W, 3], depth [H, W] (camera z, m), opacity [H, W] of one frame's inputs
        (`insta_data.frame_inputs` of one frame) seen by camera K, R, t."""
        cam = camera_lib.make_camera(jnp.asarray(K), jnp.asarray(R), jnp.asarray(t), width, height)
        o, d = camera_lib.pixel_rays(cam)
        o, d = np.asarray(o).reshape(-1, 3), np.asarray(d).reshape(-1, 3)
        fr = insta.Frames(**{k: jnp.asarray(v) for k, v in frame.items()})
        grids, lo, hi = self._grids(bits, fr.verts, fr.head_R, fr.head_t)
        n = o.shape[0]
        cols, depths, alphas = [], [], []
        for a in range(0, n, self.chunk):
            oc, dc = o[a:a + self.chunk], d[a:a + self.chunk]
            m = oc.shape[0]
            if m < self.chunk:     # pad to one static ray count
                oc = np.concatenate([oc, np.repeat(oc[-1:], self.chunk - m, 0)])
                dc = np.concatenate([dc, np.repeat(dc[-1:], self.chunk - m, 0)])
            oj, dj = jnp.asarray(oc)[None], jnp.asarray(dc)[None]
            samples = raymarch.march(oj, dj, grids, lo, hi, step=self.ctx.step, capacity=None,
                                     backend=self.ctx.backend)
            out = self._shade(params, fr, oj, dj, samples)
            cols.append(np.asarray(out.color[0, :m]))
            depths.append(np.asarray(out.depth[0, :m]))
            alphas.append(np.asarray(out.opacity[0, :m]))
        color = np.concatenate(cols).reshape(height, width, 3)
        dist = np.concatenate(depths).reshape(height, width)
        opacity = np.concatenate(alphas).reshape(height, width)
        cos = (d @ np.asarray(R)[2]).reshape(height, width)
        # expected z of the surface: the termination distance normalised by the opacity, times cos
        z = np.where(opacity > 1e-3, dist / np.maximum(opacity, 1e-3), 0.0) * cos
        return {"color": color, "depth": z.astype(np.float32), "opacity": opacity}


def _frame(video: insta_data.Video, i: int, latent_index: int = -1) -> dict:
    return insta_data.frame_inputs(video, [i], [latent_index])


def orbit_camera(K, R, t, centre, yaw_deg: float):
    """The camera turned by yaw about the vertical axis through `centre` (world), same K."""
    a = np.deg2rad(yaw_deg)
    Ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]], np.float32)
    R2 = np.asarray(R) @ Ry.T
    t2 = np.asarray(R) @ (centre - Ry.T @ centre) + np.asarray(t)
    return np.asarray(K), R2.astype(np.float32), t2.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Metrics.


def image_metrics(pred, gt, lpips_fn=None) -> dict:
    """L2 (MSE), PSNR, SSIM (11x11 Gaussian), L1 of [H, W, 3] images in [0, 1] (+ LPIPS)."""
    p, g = jnp.asarray(pred, jnp.float32)[None], jnp.asarray(gt, jnp.float32)[None]
    mse = float(jnp.ravel(losses.mse(p, g))[0])
    m = {"l2": mse, "psnr": float(jnp.ravel(losses.psnr_from_mse(mse))[0]),
         "ssim": float(jnp.ravel(losses.ssim(p, g))[0]), "l1": float(jnp.ravel(losses.l1(p, g))[0])}
    if lpips_fn is not None:
        m["lpips"] = float(lpips_fn(p, g)[0])
    return m


def region_psnr(pred, gt, region) -> float:
    """PSNR over the pixels of a region (nan when it is empty)."""
    r = np.asarray(region, bool)
    if not r.any():
        return float("nan")
    mse = float(np.mean((np.asarray(pred)[r] - np.asarray(gt)[r]) ** 2))
    return float(-10.0 * np.log10(max(mse, 1e-10)))


def _mean(rows, key):
    vals = [r[key] for r in rows if key in r and np.isfinite(r[key])]
    return float(np.mean(vals)) if vals else float("nan")


def baseline_texture(video: insta_data.Video, model, size: int = 256):
    """Texture [S, S, 3] baked from the training frames (radiance: the video's light included)."""
    W, H = video.size
    cams = camera_lib.make_camera(jnp.asarray(video.K), jnp.asarray(video.R), jnp.asarray(video.t), W, H)
    tex, _ = texture_lib.extract_texture(video.images, video.mask, cams, video.verts, model.faces,
                                         model.uv_coords, model.uv_faces, size)
    return np.asarray(tex)


def baseline_render(tex, video, i, model, background) -> np.ndarray:
    """The baseline of frame i: the tracked mesh rendered with texture `tex` [T, T, 3] in the frame's
    camera over `background`; image [H, W, 3] in [0, 1]."""
    W, H = video.size
    cam = camera_lib.make_camera(jnp.asarray(video.K[i]), jnp.asarray(video.R[i]), jnp.asarray(video.t[i]), W, H)
    out = shading.render_mesh(jnp.asarray(video.verts[i])[None], model.faces, cam, uv_coords=model.uv_coords,
                              uv_faces=model.uv_faces, albedo_texture=jnp.asarray(tex), background=background)
    return np.asarray(out["image"][0])


def camera_in_video_world(K, R, t, video_verts, true_verts):
    """The camera of the video's (possibly tracked) world that sees the video's head as camera
    K, R, t (x_cam = R x + t) sees the true head.

    The video's head [N, 3] is aligned rigidly to the true head [N, 3] (corresponding vertices,
    metres; Kabsch, no scale, so the tracker's shape and scale errors still count): x_true ~
    Ra x_video + ta, and the camera becomes (K, R Ra, R ta + t). With true tracking the two
    heads are the same and so is the camera. Returns (K [3, 3], R [3, 3], t [3]) float32.
    """
    _, Ra, ta = alignment.umeyama(np.asarray(video_verts, np.float64), np.asarray(true_verts, np.float64),
                                  with_scale=False)
    Ra, ta = np.asarray(Ra), np.asarray(ta)
    R = np.asarray(R, np.float64)
    return (np.asarray(K, np.float32), (R @ Ra).astype(np.float32),
            (R @ ta + np.asarray(t, np.float64)).astype(np.float32))


def true_head(truth, assets) -> np.ndarray:
    """The generator's head-model vertices [N, 3] (world, metres) of a truth entry."""
    return np.asarray(truth[1]["geometry"][0][:assets.n_model_vertices])


def mesh_depth(video, i, model, K, R, t) -> np.ndarray:
    """Camera z [H, W] (m; 0 off the mesh) of frame i's tracked mesh seen by camera K, R, t."""
    W, H = video.size
    cam = camera_lib.make_camera(jnp.asarray(K), jnp.asarray(R), jnp.asarray(t), W, H)
    return np.asarray(shading.render_mesh(jnp.asarray(video.verts[i])[None], model.faces, cam)["depth"][0])


def _depth_errors(out, mesh_z, true_z, region=None) -> tuple[float, float]:
    """(INSTA, tracked mesh) mean |z - z_true| in mm: INSTA's over the pixels the truth covers, INSTA
    renders opaque (> 0.5) and the region holds; the mesh's over those it covers too (nan where
    there are no such pixels)."""
    sel = (true_z > 0) & (out["opacity"] > 0.5)
    if region is not None:
        sel &= region
    err = lambda z, m: float(np.mean(np.abs(z[m] - true_z[m])) * 1e3) if m.any() else float("nan")
    return err(out["depth"], sel), err(mesh_z, sel & (mesh_z > 0))


def side_depth_errors(renderer, params, bits, video, i, assets, truth, yaw_deg: float) -> tuple[float, float]:
    """(INSTA, tracked mesh) mean |z - z_true| (mm) in the generator's camera turned by yaw_deg
    about the vertical axis through the true head's centre, over pixels the generator's head
    covers and INSTA renders opaque (> 0.5; for the mesh: that it covers too); nans when the
    truth is not available.

    truth: (identity, frame, (K, R, t)) of the generator. INSTA and the mesh are seen in the same
    view of their own world (`camera_in_video_world`): a tracker moves the head's rigid pose into
    the camera (and estimates the focal length), so the tracked world differs from the true one by
    the head's rigid pose, which the alignment removes; what remains is the avatar's geometry,
    with the tracker's shape and expression errors in it (the mesh's figure shows how much).
    """
    if truth is None:
        return float("nan"), float("nan")
    identity, frame, (Kt, Rt, tt) = truth
    W, H = video.size
    head = true_head(truth, assets)
    K0, R0, t0 = orbit_camera(Kt, Rt, tt, head.mean(0), yaw_deg)
    cam = camera_lib.make_camera(jnp.asarray(K0)[None], jnp.asarray(R0)[None], jnp.asarray(t0)[None], W, H)
    views = synthetic.render_views(assets, identity, frame, cam, geometry=frame["geometry"])
    true_z = np.asarray(views["depth"][0])
    K, R, t = camera_in_video_world(K0, R0, t0, video.verts[i], head)
    out = renderer.render(params, bits, _frame(video, i), K, R, t, W, H)
    return _depth_errors(out, mesh_depth(video, i, assets.model, K, R, t), true_z)


def front_depth_errors(renderer, params, bits, video, i, assets, truth, out) -> dict[str, tuple[float, float]]:
    """{"face": (INSTA, tracked mesh), "mouth": (INSTA, tracked mesh)}: mean |z - z_true| (mm)
    over the face pixels (and the mouth pixels) of held-out frame i that INSTA renders opaque
    (> 0.5), against the frame's true depth (video.true_depth; for a dataset from disk, its depth
    maps). With a generator's truth the view is the generator's camera moved into the video's
    world (`camera_in_video_world`; the same camera, and `out` reused, with true tracking); `out`
    is INSTA's render in the video's camera."""
    K, R, t = video.K[i], video.R[i], video.t[i]
    if truth is not None:
        _, _, (Kt, Rt, tt) = truth
        Ka, Ra, ta = camera_in_video_world(Kt, Rt, tt, video.verts[i], true_head(truth, assets))
        if not all(np.allclose(a, b, atol=1e-6) for a, b in ((Ka, K), (Ra, R), (ta, t))):
            W, H = video.size
            K, R, t = Ka, Ra, ta
            out = renderer.render(params, bits, _frame(video, i), K, R, t, W, H)
    mesh_z = mesh_depth(video, i, assets.model, K, R, t)
    return {name: _depth_errors(out, mesh_z, video.true_depth[i], region)
            for name, region in (("face", video.face[i]), ("mouth", video.mouth[i]))}


def _depth_image(z, lo=None, hi=None):
    """Camera z [H, W] -> a grey image (near = bright), 0 = black."""
    valid = z > 0
    if not valid.any():
        return np.zeros(z.shape + (3,), np.float32)
    lo = float(z[valid].min()) if lo is None else lo
    hi = float(z[valid].max()) if hi is None else hi
    g = np.where(valid, 1.0 - (z - lo) / max(hi - lo, 1e-6) * 0.8, 0.0)
    return np.repeat(np.clip(g, 0, 1)[..., None], 3, -1).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The canonical mesh.


def canonical_mesh(params, ctx: insta.Context, resolution: int, level: float):
    """Marching cubes (scikit-image) of the canonical density at `level` (1/m) on a
    resolution^3 grid over the canonical box: (vertices [N, 3] m, faces [M, 3])."""
    from skimage import measure

    lo, hi = ctx.box_min, ctx.box_max
    axes = [np.linspace(lo[k], hi[k], resolution, dtype=np.float32) for k in range(3)]
    X, Y, Z = np.meshgrid(*axes, indexing="ij")
    pts = np.stack([X, Y, Z], -1).reshape(-1, 3)
    cond = insta.mean_condition(params, ctx)
    fn = jax.jit(lambda x: insta.canonical_density_at(params, ctx, x, cond))
    sig = np.concatenate([np.asarray(fn(jnp.asarray(pts[a:a + 65536]))) for a in range(0, len(pts), 65536)])
    vol = sig.reshape(resolution, resolution, resolution)
    if not (vol.min() < level < vol.max()):
        raise ValueError(f"the canonical density ({vol.min():.3g} .. {vol.max():.3g}) never crosses "
                         f"eval.mesh_threshold={level}")
    spacing = tuple(float((hi[k] - lo[k]) / (resolution - 1)) for k in range(3))
    v, f, _, _ = measure.marching_cubes(vol, level=level, spacing=spacing)
    return (v + lo).astype(np.float32), f[:, ::-1].astype(np.int32)


# ----------------------------------------------------------------------------------------------
# The run.


def _generator_truth(cfg, assets, frame_numbers):
    """{frame number: (identity, frame, (K, R, t))} of the synthetic sequence for the given frames
    (the truth of the side views), or None for a dataset from disk."""
    if cfg.data.root:
        return None
    gen = synthetic.VideoGenerator(_synthetic_config(cfg), assets)
    s = 0 if int(cfg.data.item) < 0 else int(cfg.data.item)
    ident = gen.identity(gen.identity_number(s))
    cams = gen.sequence(s)["cameras"]
    return {int(t): (ident, gen.frame(s, int(t)), (np.asarray(cams.K[int(t)]), np.asarray(cams.R[int(t)]),
                                                   np.asarray(cams.t[int(t)])))
            for t in frame_numbers}


def _check_expression(cfg, video: insta_data.Video) -> None:
    if video.expression.shape[1] < int(cfg.model.n_expression):
        raise ValueError(f"the frames have {video.expression.shape[1]} expression coefficients, fewer than "
                         f"model.n_expression={cfg.model.n_expression} (the condition's size)")


def build(cfg, log=print):
    """(ctx, train video, test video, assets, samples) of a config: data, tracking, context."""
    samples, names, assets, source = open_video(cfg, log)
    video, canon = insta_data.prepare(samples, assets.model, background=tuple(cfg.model.background),
                                      depth_source=cfg.data.depth_source, names=names)
    _check_expression(cfg, video)
    n = video.images.shape[0]
    if float(cfg.data.holdout) >= 1 and int(cfg.data.holdout) > n - 1 and log is not None:
        log(f"note: data.holdout = {cfg.data.holdout} of the video's {n} frames leaves none to train on: holding "
            f"out the last {n - 1} (a fraction < 1 holds out a share of any video)")
    train, test = insta_data.split(video, cfg.data.holdout)
    mouth_f, _ = insta_data.region_faces(assets.model)
    b = cfg.batch
    capacity = int(b.rays_per_frame) * int(b.samples_per_ray)
    ctx = insta.make_context(canon, np.asarray(assets.model.faces), mouth_f, n_frames=train.images.shape[0],
                             model_cfg=cfg.model, loss_cfg=cfg.loss, optim_cfg=cfg.optim, capacity=capacity,
                             backend=cfg.backend)
    W, H = video.size
    log(f"data: {source}: {train.images.shape[0]} training / {test.images.shape[0]} held-out frames of {W}x{H}; "
        f"canonical box {' x '.join(f'{v:.3f}' for v in np.asarray(ctx.box_max - ctx.box_min))} m, step {ctx.step * 1e3:.2f} mm, "
        f"occupancy {ctx.resolution}^3; devices: {jax.device_count()}")
    return ctx, train, test, assets, samples


def build_live(cfg, workdir, log=print):
    """`build` for the live online mode: (ctx, train, test, assets, feed); the videos fill up as
    the background tracker (`LiveFeed`, data.tracked) gets through the frames, or as another
    process fills the frame folder data.root (`FolderFeed`)."""
    if bool(cfg.data.tracked) == bool(cfg.data.root):
        raise ValueError("online.live trains while frames arrive; set one of data.tracked=True (dhjax's "
                         "tracker tracks the synthetic video here) or data.root=<a folder experiments.track is "
                         "filling>" + (", not both" if cfg.data.tracked else ""))
    if float(cfg.online.frames_per_step) > 0:
        raise ValueError("online.live and online.frames_per_step are two online modes: set one")
    if cfg.data.root:
        assets = synthetic.build_assets(None, int(_synthetic_config(cfg).uv_size))
        feed = FolderFeed(cfg, assets, workdir, log).start()
        log(f"live: reading frames from {cfg.data.root} as they are written; training starts with frame 0")
    else:
        samples, names, assets, source = open_video(cfg, log, track=False)     # the feed tracks it
        feed = LiveFeed(cfg, samples, names, assets, workdir, log).start()
        log(f"live: tracking {len(samples)} frames of {source} in the background; training starts with frame 0")
    try:
        feed.wait(1)
        _check_expression(cfg, feed.train)
        mouth_f, _ = insta_data.region_faces(assets.model)
        b = cfg.batch
        ctx = insta.make_context(feed.canon, np.asarray(assets.model.faces), mouth_f, n_frames=feed.n_train,
                                 model_cfg=cfg.model, loss_cfg=cfg.loss, optim_cfg=cfg.optim,
                                 capacity=int(b.rays_per_frame) * int(b.samples_per_ray), backend=cfg.backend)
    except BaseException:
        feed.close()
        raise
    return ctx, feed.train, feed.test, assets, feed


def ray_batches(cfg, train: insta_data.Video, arrived=None) -> insta_data.RayBatches:
    """The training ray sampler of a config over the training frames (`arrived`: in the live online
    mode, a callable returning how many frames have arrived so far)."""
    b = cfg.batch
    return insta_data.RayBatches(train, frames_per_step=int(b.frames_per_step), rays_per_frame=int(b.rays_per_frame),
                                 buffer_frames=int(b.buffer_frames), resample_every=int(b.resample_every),
                                 online_frames_per_step=float(cfg.online.frames_per_step), seed=int(cfg.seed),
                                 random_background=bool(b.random_background), background=tuple(cfg.model.background),
                                 arrived=arrived)


def eval_rays(cfg, test: insta_data.Video, devices: int) -> dict:
    """A fixed batch of held-out rays (frames_per_step frames, eval.n_rays / frames rays each)."""
    g = max(int(cfg.batch.frames_per_step), devices)
    g -= g % devices
    rb = insta_data.RayBatches(test, frames_per_step=g, rays_per_frame=max(1, int(cfg.eval.n_rays) // g),
                               seed=int(cfg.seed) + 99)
    batch = rb.get_batch(0)
    batch["frame"] = np.full_like(batch["frame"], -1)      # held-out frames: the mean latent code
    return batch


def check_config(cfg) -> None:
    """Raises ValueError naming the first batch, eval, data, model or online field that cannot
    work, and loads eval.lpips_path's weights (FileNotFoundError / ValueError naming the file):
    before any work, so that a bad value does not cost a training run before the evaluation (or
    the first occupancy update) refuses it."""
    for field in ("batch.frames_per_step", "batch.rays_per_frame", "batch.samples_per_ray", "eval.chunk",
                  "eval.n_rays", "model.occupancy.resolution", "model.occupancy.every"):
        config_lib.check_integer(cfg, field, 1)
    config_lib.check_integer(cfg, "eval.max_test_frames", 0, " (0: every held-out frame)")
    config_lib.check_integer(cfg, "eval.orbit_frames", 0, " (0: no orbit)")
    config_lib.check_integer(cfg, "eval.train_frames", 0, " (0: no training-frame metrics)")
    config_lib.check_integer(cfg, "eval.mesh_resolution", 0, " (0: no mesh)")
    for field, value, what in (("eval.video_fps", cfg.eval.video_fps, "> 0"),
                               ("model.step_divisor", cfg.model.step_divisor, "> 0 (thesis: 1024)"),
                               ("data.holdout", cfg.data.holdout, "> 0 (a count of frames, or a fraction < 1)"),
                               ("online.timeout_s", cfg.online.get("timeout_s", 1.0), "> 0 (seconds)")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"config field {field} must be {what}, got {value!r}")
    lpips.load_configured(cfg.eval.lpips_path)


def run(cfg, workdir: str) -> dict:
    """Trains (or resumes) an INSTA avatar, then evaluates it on the held-out frames and writes
    the files of the module docstring. Returns the held-out mean metrics.

    Raises app.Interrupted on SIGTERM (a checkpoint was written; a rerun resumes), ValueError
    for a config field that cannot work (`check_config`, before anything is written).
    """
    app.check_experiment(cfg, "insta")
    check_config(cfg)
    run_ = app.start(workdir, cfg)
    log = run_.log
    live = bool(cfg.online.get("live", False))
    if live:
        ctx, train, test, assets, feed = build_live(cfg, run_.workdir, log)
        shape = feed.shape
    else:
        ctx, train, test, assets, samples = build(cfg, log)
        shape = samples[0]["shape"]
    try:
        return _train_and_evaluate(cfg, run_, ctx, train, test, assets, shape, feed if live else None)
    except BaseException:
        if live:
            feed.close()        # the tracker stops at its next frame (what it tracked is saved)
        raise


def _train_and_evaluate(cfg, run_, ctx, train, test, assets, shape, feed) -> dict:
    log = run_.log
    live = feed is not None
    if run_.lead:
        np.savez(run_.path("avatar.npz"), canon_verts=ctx.canon_verts, n_frames=np.int32(ctx.n_frames),
                 shape=np.asarray(shape, np.float32))
    batches = ray_batches(cfg, train, arrived=feed.arrived if live else None)
    shapes = jax.eval_shape(lambda k: insta.init_state(k, ctx), jax.random.PRNGKey(0))
    log(app.parameter_overview(shapes["params"]))
    init, step, evaluate = insta.method_functions(ctx)
    renderer = Renderer(ctx, int(cfg.eval.chunk))
    W, H = test.size

    def render_hook(state, batch):
        # live: the newest tracked training frame (the held-out ones are tracked last)
        video, i = (train, feed.arrived() - 1) if live else (test, 0)
        out = renderer.render(state["ema"], state["occ"]["bits"], _frame(video, i), video.K[i], video.R[i],
                              video.t[i], W, H)
        return {"eval/heldout": logs.comparison_grid(video.images[i:i + 1], np.asarray(out["color"])[None],
                                                     _depth_image(np.asarray(out["depth"]))[None])}

    if live:
        online = _LiveRecorder(batches, feed, jax.jit(evaluate))
        method = loop.Method(init, step, online.snapshot, render_hook)
        eval_batch = batches.get_batch(0)        # a stand-in: the held-out frames are not tracked yet
    else:
        method = loop.Method(init, step, jax.jit(evaluate), render_hook)
        eval_batch = eval_rays(cfg, test, jax.device_count())
        # Every offline run times its steps: with the scheduled online mode for online.json,
        # otherwise for training_curve.json (held-out ray PSNR against training seconds).
        online = _OnlineRecorder(batches, scheduled=float(cfg.online.frames_per_step) > 0)
    try:
        result = loop.train(cfg, str(run_.workdir), method, online, eval_batch=eval_batch)
    except app.Interrupted as stop:
        # A stopped run (SIGTERM, Ctrl-C, a time limit) keeps the training curve (or, scheduled
        # online, online.json) of its steps so far, and the session resuming from its step
        # continues it: what a time-boxed run (e.g. on a lent GPU) is for.
        if not live and run_.lead:
            online.finished = time.time()
            pts = online.write_curve(run_, stopped_at=stop.step)
            if online.scheduled:
                _log_online(pts, log, "so far (stopped)")
            else:
                _log_curve(pts, log, "so far (stopped)")
        raise
    online.finished = time.time()
    if live:
        log(f"live: training done with {feed.count}/{feed.n} frames arrived; waiting for the rest "
            "(the held-out frames come last)")
        feed.wait(feed.n)
        lmk = (f" (landmark error {np.mean(feed.landmark_error_px):.2f} px)" if feed.landmark_error_px else "")
        log(f"live: all {feed.n} frames arrived {feed.tracked_at[-1]:.0f}s after the start{lmk}")
        online.eval_batch = eval_rays(cfg, test, jax.device_count())
    state = result.state
    metrics = evaluate_heldout(cfg, ctx, state, train, test, assets, renderer, run_, log)
    if math.isfinite(result.train_seconds):     # over all sessions (loop.TrainResult)
        metrics["train_seconds"] = result.train_seconds
    if run_.lead:
        app.merge_final_metrics(run_.workdir, {f"heldout/{k}": v for k, v in metrics.items()
                                               if isinstance(v, float)})
        if result.steps_run and live:
            _log_online(online.write(run_), log)
        elif result.steps_run and online.scheduled:
            _log_online(online.write_curve(run_), log)
        elif result.steps_run:
            _log_curve(online.write_curve(run_), log)
    outputs = ["heldout_metrics.json"]     # heldout.mp4 only with two held-out frames or more
    outputs += [n for n in ("heldout.mp4", "orbit.mp4", "canonical_mesh.obj", "training_curve.png", "online.png")
                if Path(run_.path(n)).is_file()]
    run_.done(f"{run_.workdir}/heldout.png", *outputs)
    return metrics


class _LiveRecorder:
    """Live online mode's record: at every periodic evaluation (and the last step) the loop's
    evaluate keeps a host copy of the EMA weights and the occupancy grid with the wall-clock time
    and the frames tracked by then; after training, once the held-out frames are tracked, each
    copy is scored on the held-out ray batch (eval/psnr of the scheduled mode): held-out PSNR
    against seconds since tracking started (with a frame folder, `FolderFeed`: since the feed
    started; frames_tracked: the frames it has read). A resumed run records the steps it runs
    itself, its seconds counted from its own start: the saved tracking is read back in a moment,
    so the earlier session's arrival times have no continuation (unlike `_OnlineRecorder`'s)."""

    def __init__(self, batches: insta_data.RayBatches, feed: _Feed, evaluate):
        self.batches, self.feed, self.evaluate = batches, feed, evaluate
        self.snaps: dict[int, dict] = {}
        self.step = 0                           # the last step a batch was drawn for
        self.finished: float | None = None
        self.eval_batch = None                  # set once the held-out frames are tracked

    def get_batch(self, step: int) -> dict:
        self.step = int(step)
        return self.batches.get_batch(step)

    def snapshot(self, state, batch) -> dict:
        del batch
        n = self.feed.count
        self.snaps[self.step + 1] = dict(seconds=time.time() - self.feed.started, frames_tracked=n,
                                         frames_arrived=self.feed.arrived(),
                                         state=jax.device_get({"ema": state["ema"], "occ": state["occ"]}))
        return {"frames_tracked": float(n)}

    def points(self) -> list[dict]:
        out = []
        for step in sorted(self.snaps):
            sn = self.snaps[step]
            m = self.evaluate(jax.device_put(sn["state"]), self.eval_batch)
            out.append({"step": step, "seconds": sn["seconds"], "frames_tracked": sn["frames_tracked"],
                        "frames_arrived": sn["frames_arrived"], "heldout_psnr": float(m["psnr"])})
        return out

    def write(self, run_) -> list[dict]:
        """online.json and online.png (held-out PSNR against seconds since tracking started)."""
        pts = self.points()
        if isinstance(self.feed, FolderFeed):
            return _write_online(run_, pts, "INSTA live: frames are read as a folder fills up",
                                 "seconds since the feed started")
        return _write_online(run_, pts, "INSTA live: frames are tracked while it trains",
                             "seconds since tracking started")


class _OnlineRecorder:
    """An offline run's record, for training_curve.json or, in the scheduled online mode
    (`scheduled`: frames arrive on a schedule of steps), online.json: the training loop's batch
    source is wrapped so that the wall-clock time at which each step starts is known; after
    training, each periodic held-out evaluation (eval/psnr of the held-out ray batch, every
    train.eval_every steps, in metrics.jsonl) is paired with the seconds since the first step
    and the number of frames that had arrived. A session resumed from where an earlier one was
    stopped continues its record (`write_curve`); other steps run before a resume have no time
    (they are left out), and a rerun of a finished run leaves the files of the run that trained."""

    def __init__(self, batches: insta_data.RayBatches, scheduled: bool = False):
        self.batches = batches
        self.scheduled = bool(scheduled)
        self.started: dict[int, float] = {}
        self.finished: float | None = None      # set when training returns
        self.calls = 0

    def get_batch(self, step: int) -> dict:
        now = time.time()
        if self.calls:        # the loop's first call builds the initial state, before any step
            self.started[int(step)] = now
        self.calls += 1
        return self.batches.get_batch(step)

    def points(self, metrics_path) -> list[dict]:
        if not self.started:
            return []
        t0 = min(self.started.values())
        rows: dict = {}        # by step: the loop logs the final evaluation again at the last step
        with open(metrics_path) as f:
            for line in f:
                row = json.loads(line)
                step = int(row.get("step", -1))
                end = self.started.get(step, self.finished if step == max(self.started) + 1 else None)
                if "eval/psnr" in row and end is not None:
                    rows[step] = ({"step": step, "seconds": end - t0,
                                 "frames_arrived": self.batches.available(step - 1),
                                 "heldout_psnr": float(row["eval/psnr"])})
        return [rows[k] for k in sorted(rows)]

    @property
    def name(self) -> str:
        """The record's file name without its suffix: online (scheduled) or training_curve."""
        return "online" if self.scheduled else "training_curve"

    @property
    def stop_file(self) -> str:
        """Where a stopped session leaves its step and seconds: ONLINE_STOP_FILE or CURVE_STOP_FILE."""
        return ONLINE_STOP_FILE if self.scheduled else CURVE_STOP_FILE

    def write_curve(self, run_, stopped_at: int | None = None) -> list[dict]:
        """training_curve.json and .png of an offline run, or online.json and .png in the
        scheduled online mode (the same points, with the frames arrived on a second axis).

        A session that resumed from the step where an earlier one was stopped (SIGTERM, Ctrl-C:
        `stopped_at`, which writes CURVE_STOP_FILE, or ONLINE_STOP_FILE, with the seconds at
        that step) continues that session's record: the earlier points are kept and this
        session's seconds count on from the stop's. A session that resumed from elsewhere
        (e.g. a periodic checkpoint after a SIGKILL, whose steps since then have no time)
        starts a record of its own. A session that ran no step leaves the files as they are
        and returns []."""
        if not self.started:
            return []
        pts = self.points(run_.path("metrics.jsonl"))
        earlier, offset = self.earlier_curve(run_)
        pts = earlier + [dict(p, seconds=p["seconds"] + offset) for p in pts]
        stop_path = Path(run_.path(self.stop_file))
        if stopped_at is not None:
            seconds = offset + (self.finished - min(self.started.values()))
            config_lib.write_text_atomic(stop_path, json.dumps({"step": int(stopped_at), "seconds": seconds}))
        else:
            stop_path.unlink(missing_ok=True)
        if self.scheduled:
            return _write_online(run_, pts, "INSTA online: frames arrive while training",
                                 "seconds since the first step")
        return _write_online(run_, pts, "INSTA: held-out rays while training", "seconds since the first step",
                             name="training_curve", frames_axis=False)

    def earlier_curve(self, run_) -> tuple[list[dict], float]:
        """(points of the earlier sessions, seconds at this session's first step) when this
        session resumed where the last one was stopped (CURVE_STOP_FILE or ONLINE_STOP_FILE),
        else ([], 0)."""
        first = min(self.started)
        try:
            stop = json.loads(Path(run_.path(self.stop_file)).read_text())
            earlier = json.loads(Path(run_.path(f"{self.name}.json")).read_text())
        except (OSError, ValueError):
            return [], 0.0
        if int(stop.get("step", -1)) != first:
            return [], 0.0
        return [p for p in earlier if int(p["step"]) <= first], float(stop["seconds"])


PLATEAU_DB = 0.5
"""`plateau`'s tolerance (dB) in the log line of an offline run."""

CURVE_STOP_FILE = "training_curve_stop.json"
"""Written next to training_curve.json by a stopped offline run: {"step": the step it stopped
at, "seconds": its training seconds there}, so that the session resuming from that step
continues the curve (`_OnlineRecorder.write_curve`); removed when a session that ran steps ends
normally."""

ONLINE_STOP_FILE = "online_stop.json"
"""CURVE_STOP_FILE's counterpart for online.json in the scheduled online mode."""


def _log_online(pts: list[dict], log, when: str = "") -> None:
    """Logs the points of a written online.json (seconds, frames arrived, held-out PSNR)."""
    if pts:
        log(f"online{' ' + when if when else ''}: " + ", ".join(
            f"{p['seconds']:.0f}s {p['frames_arrived']} frames {p['heldout_psnr']:.2f} dB" for p in pts))


def _log_curve(pts: list[dict], log, when: str = "") -> None:
    """Logs a written training curve's first and last points and its plateau (`plateau`)."""
    if len(pts) > 1:
        sec, at_step = plateau(pts, PLATEAU_DB)
        log(f"training curve{' ' + when if when else ''}: held-out ray PSNR {pts[0]['heldout_psnr']:.2f} dB at "
            f"{pts[0]['seconds']:.0f}s -> {pts[-1]['heldout_psnr']:.2f} dB at {pts[-1]['seconds']:.0f}s; within "
            f"{PLATEAU_DB} dB of the last value from {sec:.0f}s on (step {at_step}): training_curve.json / .png")


def plateau(points: list[dict], tol_db: float = PLATEAU_DB) -> tuple[float, int]:
    """(seconds, step) of the first point of a training curve (`training_curve.json`'s
    points, in step order) from which the held-out PSNR stays within tol_db of the last
    point's: when the run reached its plateau, as the issue's 'plateau in < 5 minutes' goal
    reads it (the last point stands for the plateau, so train long enough)."""
    if not points:
        raise ValueError("plateau: no points (the run logged no held-out evaluation with a time)")
    last = float(points[-1]["heldout_psnr"])
    first = len(points) - 1
    while first > 0 and float(points[first - 1]["heldout_psnr"]) >= last - tol_db:
        first -= 1
    return float(points[first]["seconds"]), int(points[first]["step"])


def _write_online(run_, pts: list[dict], title: str, xlabel: str, *, name: str = "online",
                  frames_axis: bool = True) -> list[dict]:
    """<name>.json (the points) and <name>.png (held-out PSNR against seconds; with
    frames_axis, the frames tracked or arrived on a second axis)."""
    Path(run_.path(f"{name}.json")).write_text(json.dumps(pts, indent=1))
    if pts:
        from matplotlib.figure import Figure   # no pyplot: the caller's backend is left alone

        fig = Figure(figsize=(5, 3.2), dpi=120)
        ax = fig.subplots()
        secs = [p["seconds"] for p in pts]
        ax.plot(secs, [p["heldout_psnr"] for p in pts], "o-", color="C0")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out PSNR (dB)", color="C0")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if frames_axis:
            key = "frames_tracked" if "frames_tracked" in pts[0] else "frames_arrived"
            ax2 = ax.twinx()
            ax2.plot(secs, [p[key] for p in pts], "s--", color="0.5", markersize=3)
            ax2.set_ylabel(key.replace("_", " "), color="0.4")
            ax2.set_ylim(bottom=0)
        fig.tight_layout()
        fig.savefig(run_.path(f"{name}.png"))
    return pts


def training_frame_metrics(cfg, params, bits, train, renderer, lpips_fn) -> list[dict]:
    """`image_metrics` and the mouth PSNR of eval.train_frames training frames spread evenly over
    the training video (its first and last among them), rendered like the held-out frames: with
    the held-out means, the gap between fitting the training expressions and generalising to new
    ones (the mouth's, foremost)."""
    n = min(int(cfg.eval.train_frames), train.images.shape[0])
    W, H = train.size
    rows = []
    for i in np.unique(np.linspace(0, train.images.shape[0] - 1, n).round().astype(int)):
        out = renderer.render(params, bits, _frame(train, i), train.K[i], train.R[i], train.t[i], W, H)
        m = image_metrics(out["color"], train.images[i], lpips_fn)
        m["psnr_mouth"] = region_psnr(out["color"], train.images[i], train.mouth[i])
        rows.append(m)
    return rows


def evaluate_heldout(cfg, ctx, state, train, test, assets, renderer, run_, log) -> dict:
    """Held-out metrics and pictures (module docstring); returns the means."""
    W, H = test.size
    n = test.images.shape[0]
    if int(cfg.eval.max_test_frames):
        n = min(n, int(cfg.eval.max_test_frames))
    lpips_fn = lpips.make_lpips(lpips.load_configured(cfg.eval.lpips_path))
    params, bits = state["ema"], state["occ"]["bits"]
    t0 = time.time()
    tex = baseline_texture(train, assets.model)
    truth = _generator_truth(cfg, assets, test.frame[:n])
    rows, base_rows, renders = [], [], []
    render_seconds = []
    ticker = logs.Ticker("held-out frames evaluated:", n, log)
    for i in range(n):
        ts = time.time()
        out = renderer.render(params, bits, _frame(test, i), test.K[i], test.R[i], test.t[i], W, H)
        render_seconds.append(time.time() - ts)
        gt = test.images[i]
        m = image_metrics(out["color"], gt, lpips_fn)
        m["psnr_mouth"] = region_psnr(out["color"], gt, test.mouth[i])
        tr = truth[int(test.frame[i])] if truth else None
        front = front_depth_errors(renderer, params, bits, test, i, assets, tr, out)
        m["depth_error_mm"], m["mouth_depth_error_mm"] = front["face"][0], front["mouth"][0]
        m["side_depth_error_mm"], mesh_side = side_depth_errors(renderer, params, bits, test, i, assets, tr,
                                                                float(cfg.eval.side_yaw_deg))
        base = baseline_render(tex, test, i, assets.model, tuple(cfg.model.background))
        bm = image_metrics(base, gt, lpips_fn)
        bm["psnr_mouth"] = region_psnr(base, gt, test.mouth[i])
        bm["depth_error_mm"], bm["mouth_depth_error_mm"] = front["face"][1], front["mouth"][1]
        bm["side_depth_error_mm"] = mesh_side
        rows.append(m)
        base_rows.append(bm)
        renders.append((gt, out["color"], base, _depth_image(out["depth"])))
        ticker.tick()
    keys = sorted(rows[0])
    mean = {k: _mean(rows, k) for k in keys}
    mean.update({f"baseline_{k}": _mean(base_rows, k) for k in sorted(base_rows[0])})
    train_rows = training_frame_metrics(cfg, params, bits, train, renderer, lpips_fn)
    mean.update({f"train_{k}": _mean(train_rows, k) for k in sorted(train_rows[0])} if train_rows else {})
    mean["render_seconds_per_frame"] = float(np.median(render_seconds))
    mean["n_frames"] = float(n)
    log(f"held-out ({n} frames, {time.time() - t0:.0f}s): PSNR {mean['psnr']:.2f} dB, SSIM {mean['ssim']:.3f}, "
        f"L1 {mean['l1']:.4f}, mouth PSNR {mean['psnr_mouth']:.2f}, depth error face / mouth / side view "
        f"{mean['depth_error_mm']:.1f} / {mean['mouth_depth_error_mm']:.1f} / {mean['side_depth_error_mm']:.1f} mm "
        f"(the tracked mesh's {mean['baseline_depth_error_mm']:.1f} / {mean['baseline_mouth_depth_error_mm']:.1f} / "
        f"{mean['baseline_side_depth_error_mm']:.1f}); "
        f"baseline (textured mesh) PSNR {mean['baseline_psnr']:.2f} dB; "
        + (f"{len(train_rows)} training frames: PSNR {mean['train_psnr']:.2f}, mouth PSNR "
           f"{mean['train_psnr_mouth']:.2f} dB; " if train_rows else "") +
        f"{mean['render_seconds_per_frame']:.2f} s per {W}x{H} frame")
    if not run_.lead:
        return mean
    Path(run_.path("heldout_metrics.json")).write_text(json.dumps(
        {"mean": mean, "frames": rows, "baseline_frames": base_rows}, indent=1))
    pick = np.unique(np.linspace(0, n - 1, min(n, 4)).astype(int))
    grid = np.concatenate([np.concatenate(renders[i], axis=1) for i in pick], axis=0)
    dio.save_image(str(run_.path("heldout.png")), np.clip(grid, 0, 1))
    frames = [np.concatenate([r[0], r[1], r[3]], axis=1) for r in renders]
    if len(frames) > 1:
        dio.save_video(str(run_.path("heldout.mp4")), np.clip(np.stack(frames), 0, 1), fps=float(cfg.eval.video_fps))
    n_orbit = int(cfg.eval.orbit_frames)
    if n_orbit:
        centre = test.verts[0].mean(0)
        yaws = np.linspace(-float(cfg.eval.orbit_yaw_deg), float(cfg.eval.orbit_yaw_deg), n_orbit)
        ticker, orbit = logs.Ticker("orbit frames rendered:", n_orbit, log), []
        for y in yaws:
            orbit.append(renderer.render(params, bits, _frame(test, 0), *orbit_camera(test.K[0], test.R[0], test.t[0],
                                                                                      centre, y), W, H)["color"])
            ticker.tick()
        dio.save_video(str(run_.path("orbit.mp4")), np.clip(np.stack(orbit), 0, 1), fps=12.0)
    if int(cfg.eval.mesh_resolution):
        try:
            v, f = canonical_mesh(params, ctx, int(cfg.eval.mesh_resolution), float(cfg.eval.mesh_threshold))
            dio.save_obj(str(run_.path("canonical_mesh.obj")), v, f)
        except ValueError as err:
            log(f"canonical mesh not written: {err}")
    return mean


# ----------------------------------------------------------------------------------------------
# Reenactment.


def context_of_run(cfg, avatar_path, assets) -> insta.Context:
    """The context of a finished run from its avatar.npz (no data is read)."""
    path = Path(avatar_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no avatar file; is this the workdir of a finished experiments.insta run?")
    z = dio.read_npz(path, ("canon_verts", "n_frames"), what="an INSTA avatar")
    canon, n_frames = np.asarray(z["canon_verts"]), int(z["n_frames"])
    mouth_f, _ = insta_data.region_faces(assets.model)
    b = cfg.batch
    return insta.make_context(canon, np.asarray(assets.model.faces), mouth_f, n_frames=n_frames, model_cfg=cfg.model,
                              loss_cfg=cfg.loss, optim_cfg=cfg.optim,
                              capacity=int(b.rays_per_frame) * int(b.samples_per_ray), backend=cfg.backend)


def reenact(workdir: str, source: str, out: str, *, item: int = -1, max_frames: int = 0, fps: float = 25.0,
            log=print) -> Path:
    """Renders the avatar of a finished run driven by another tracked sequence (a 'video'
    dataset folder: its expressions, jaw/neck/eye poses, translations and cameras; the avatar
    keeps its own identity shape). Writes <out>/reenact.mp4 (source | avatar) and returns its
    path."""
    app.quiet_library_logs()
    # A run trained before an option existed used the option's default (the behaviour of before).
    cfg = app.read_config(workdir, experiment=EXPERIMENT, defaults={
        "model": insta.default_model_config(), "loss": insta.default_loss_config(),
        "optim": insta.default_optim_config()})
    dio.check_fps(fps, "--fps")
    if int(max_frames) < 0:
        raise ValueError(f"--max_frames must be >= 0 (0: every frame), got {max_frames}")
    if not Path(source).is_dir():       # before the slow loads below
        raise FileNotFoundError(f"--source '{source}' is not a folder: pass a tracked video (a 'video' dataset "
                                f"folder, e.g. experiments.track's <workdir>/dataset)")
    assets = synthetic.build_assets(None, int(cfg.data.synthetic.uv_size))
    ctx = context_of_run(cfg, Path(workdir) / "avatar.npz", assets)
    _, state, step = app.load_run(workdir, lambda c: insta.init_state(jax.random.PRNGKey(0), ctx),
                                  experiment=EXPERIMENT)
    shape = np.asarray(dio.read_npz(Path(workdir) / "avatar.npz", ("shape",), what="an INSTA avatar")["shape"],
                       np.float32)
    samples = insta_data.load_video(source, "train", None if item < 0 else item, max_frames)
    driven = [dict(s, shape=shape) for s in samples]
    video, _ = insta_data.prepare(driven, assets.model, background=tuple(cfg.model.background),
                                  names=[f"{source} frame {i}" for i in range(len(driven))],
                                  min_frames=1)            # nothing trains: one frame is a reenactment
    renderer = Renderer(ctx, int(cfg.eval.chunk))
    W, H = video.size
    frames = []
    for i in range(video.images.shape[0]):
        r = renderer.render(state["ema"], state["occ"]["bits"], _frame(video, i), video.K[i], video.R[i],
                            video.t[i], W, H)
        frames.append(np.concatenate([video.images[i], r["color"]], axis=1))
        log(f"reenact: frame {i + 1}/{video.images.shape[0]}")
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "reenact.mp4"
    dio.save_video(str(path), np.clip(np.stack(frames), 0, 1), fps=fps)
    log(f"reenacted {len(frames)} frames of {source} with the avatar of {workdir} (step {step}): {path}")
    return path


__all__ = ["run", "check_config", "reenact", "plateau", "build", "Renderer", "image_metrics", "region_psnr", "canonical_mesh", "orbit_camera",
           "open_video", "track_samples", "evaluate_heldout", "eval_rays", "ray_batches", "context_of_run"]

"""A toy method for the harness tests: linear regression trained with Adam.

Run as a script: python tests/train_toy.py WORKDIR [key=value ...] (config overrides).
Writes WORKDIR/final_params.npy. Env TOY_SLEEP=seconds slows every batch (for kill tests);
TOY_ALLOW=1 resumes with the config changes dhjax.train.app.RESUMABLE_CHANGES allows;
TOY_TERM_AFTER=1 sends itself a SIGTERM after training; TOY_TERM_AT_SAVE=STEP sends it as the
checkpoint of STEP starts to be written; TOY_TERM_IN_EVAL=1 sends it during the evaluation.
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from dhjax.train import app  # noqa: E402
from dhjax.train import config as config_lib  # noqa: E402
from dhjax.train import loop  # noqa: E402
from harness_common import parse_overrides, save_result  # noqa: E402

DIM = 8


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 8
    c.lr = 0.05
    c.nan_step = -1       # this step's batch holds a NaN
    c.nan_from = -1       # every batch from this step on holds a NaN (-1: none)
    c.train = ml_collections.ConfigDict(dict(steps=60, log_every=10, checkpoint_every=20,
                                             keep_checkpoints=3, eval_every=0, on_nonfinite="skip",
                                             max_skipped_fraction=0.1))
    return c


class Data:
    def __init__(self, cfg):
        self.cfg = cfg
        self.w_true = np.linspace(-1.0, 1.0, DIM).astype(np.float32)

    def get_batch(self, step):
        time.sleep(float(os.environ.get("TOY_SLEEP", "0")))
        rng = np.random.default_rng(1000 + step)
        x = rng.normal(size=(self.cfg.batch_size, DIM)).astype(np.float32)
        y = x @ self.w_true + 0.01 * rng.normal(size=self.cfg.batch_size).astype(np.float32)
        if step == self.cfg.nan_step or 0 <= self.cfg.nan_from <= step:
            y[0] = np.nan
        return {"x": x, "y": y}


def make_method(cfg):
    opt = optax.adam(cfg.lr)

    def init(rng, batch):
        params = {"w": 0.1 * jax.random.normal(rng, (DIM,))}
        return {"params": params, "opt": opt.init(params)}

    def loss_fn(params, batch, rng):
        noise = 1e-3 * jax.random.normal(rng, batch["y"].shape)  # uses the folded RNG
        return jnp.mean((batch["x"] @ params["w"] - batch["y"] + noise) ** 2)

    def train_step(state, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, rng)
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        return ({"params": optax.apply_updates(state["params"], updates), "opt": opt_state},
                {"loss": loss})

    def evaluate(state, batch):
        if os.environ.get("TOY_TERM_IN_EVAL") == "1":
            os.kill(os.getpid(), signal.SIGTERM)
        return {"mse": jnp.mean((batch["x"] @ state["params"]["w"] - batch["y"]) ** 2)}

    def render(state, batch):
        w = state["params"]["w"]
        img = jnp.broadcast_to(jax.nn.sigmoid(w)[None, :, None], (8, DIM, 3))
        return {"weights": img[None]}

    return loop.Method(init, train_step, evaluate, render)


def term_at_save(step):
    """Checkpointer.save sends this process a SIGTERM as it starts to write `step`'s checkpoint
    (the handler in place then runs before the write)."""
    from dhjax.train import checkpoint

    save = checkpoint.Checkpointer.save

    def saving(self, at, state, meta):
        if int(at) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return save(self, at, state, meta)

    checkpoint.Checkpointer.save = saving


def main():
    workdir = sys.argv[1]
    if os.environ.get("TOY_TERM_AT_SAVE"):
        term_at_save(int(os.environ["TOY_TERM_AT_SAVE"]))
    app.init_distributed()
    cfg = config_lib.apply_overrides(get_config(), parse_overrides(sys.argv[2:]))
    data = Data(cfg)
    res = loop.train(cfg, workdir, make_method(cfg), data, eval_batch=data.get_batch(10 ** 6),
                     allow_config_change=os.environ.get("TOY_ALLOW") == "1")
    save_result(workdir, res)
    if os.environ.get("TOY_TERM_AFTER") == "1":     # a SIGTERM after training (e.g. during an evaluation)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        print("still running after the SIGTERM", flush=True)


if __name__ == "__main__":
    # As the experiments run: inside app.exit_on_user_error (in one process, its SIGTERM handler
    # outside the loop, which the loop's own replaces while it runs; several processes leave
    # SIGTERM to jax's preemption service).
    app.exit_on_user_error(main, errors=())

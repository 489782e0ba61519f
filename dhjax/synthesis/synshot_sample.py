"""Sampling new avatars from SynShot's prior: an autoregressive transformer over its code grids
(the "transformer over codes as in Esser et al. 2021" of the thesis), trained on the codes of the
prior's training split, then sampled and decoded into Gaussian avatars.

Data flow:

    prior's training maps --E_id, E_expr, nearest code (train=False)--> id indices [N,h,w],
      expr indices [N,h,w] (int32 in [0, K))                                       (`collect_codes`)
    -> one sequence per example: id codes in raster order, then expr codes in raster order,
       length L = 2 h w                                                        (`codes_to_sequence`)
    -> CodePrior: causal decoder-only pre-LN transformer; input = [start, s_0 .. s_{L-2}] with
       token embeddings of separate vocabulary ranges (id code k -> k, expr code k -> K + k,
       start -> 2K) + learned position embeddings; output at position i = logits [K] of s_i over
       the codes of its segment; next-token cross-entropy in nats per token          (`loss_fn`)
    -> `sample`: s_0 .. s_{L-1} one after the other (temperature, top-k), each step running the
       full causal forward over the whole (partly filled) sequence and reading position i: O(L)
       forwards of length L, no key/value cache (fine at the prior's grid sizes: L = 512 for
       the tiny prior's 16 x 16 grids)
    -> `decode_codes`: vq.lookup_codes with the prior's codebooks -> q_id, q_expr [B,h,w,n]
       -> (the prior's bidirectional code transformer when it has one) -> decoders -> per-part
       Gaussians, exactly as `synshot.forward` after its quantisation
    -> `render_views`: neutral pose and translation, rendered into C cameras of the dataset.

`run(cfg, workdir)` (experiment `synshot_sample`, config `configs/synshot_sample.py`) writes into
its run folder: checkpoints/ (the transformer, resumable through `dhjax.train.loop.train`),
TensorBoard events and metrics.jsonl (training loss, eval/nll = held-out nats per token at every
evaluation), codes.npz (train_id, train_expr, test_id, test_expr index grids [N,h,w] int32 and
the sampled sample_id, sample_expr), final_metrics.json (training metrics, heldout/nll_per_token,
heldout/nll_id, heldout/nll_expr against the unigram baseline unigram/entropy and
unigram/heldout_nll, all nats per token; counts and sampling time), samples.png (rows: decoded
codes of held-out examples, then sampled avatars; columns: the test split's cameras of
cfg.sample.views) and config.json.
"""

from __future__ import annotations

import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dhjax import io as dio
from dhjax.nn import vq
from dhjax.synthesis import synshot, synshot_data
from dhjax.synthesis import synshot_gaussians as gs
from dhjax.train import app, loop

PRIOR_EXPERIMENT = "synshot_prior"


# ----------------------------------------------------------------------------------------------
# Codes of the prior.


def prior_codebooks(state, net_cfg: synshot.NetConfig):
    """(codebook_id, codebook_expr) [K, n] each of a prior's state {params, stats, ...} (from
    params, or from vq_stats for EMA codebooks). Raises ValueError for a prior without VQ."""
    if not net_cfg.use_vq:
        raise ValueError("the prior was trained with model.use_vq=False: it has no codebooks and no codes to sample")
    src = state["stats"] if net_cfg.vq_ema else state["params"]
    return src["vq_id"]["codebook"], src["vq_expr"]["codebook"]


def map_indices(dataset, unique: bool = True) -> list[int]:
    """Indices of `dataset` whose maps to encode: with unique=True one per (item, frame) of a
    folder dataset (the UV maps do not depend on the camera; its first view), else all."""
    base = getattr(dataset, "base", dataset)
    entries = getattr(base, "entries", None)
    if not unique or entries is None:
        return list(range(len(dataset)))
    seen, out = set(), []
    for i, (_, frame_dir, _, ordinal) in enumerate(entries):
        key = (int(ordinal), frame_dir.name)
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out


def code_indices_fn(ctx: synshot.Context):
    """Jitted (state, maps batch) -> (id indices, expr indices) [B,h,w] int32: the prior's
    encoders (no training behaviour) and the nearest code of each latent vector of its codebooks
    (the indices its quantisers choose); maps batch: uv_albedo, uv_position,
    uv_expression_offset [B,T,T,3] (`synshot.batch_maps` units)."""

    @jax.jit
    def f(state, batch):
        z_id, z_expr = ctx.net.apply({"params": state["params"]}, *synshot.batch_maps(batch, ctx),
                                     method=synshot.SynShotNet.encode)
        cb_id, cb_expr = prior_codebooks(state, ctx.net.cfg)
        return vq.nearest_code(z_id, cb_id), vq.nearest_code(z_expr, cb_expr)

    return f


def collect_codes(state, ctx: synshot.Context, dataset, *, batch_size: int = 8, unique: bool = True,
                  indices=None):
    """Encodes and quantises the maps of a dataset's examples (train=False).

    Args:
      state: the prior's state {params, stats, ...}; ctx: its `synshot.make_context`;
      dataset: indexable samples with the uv maps (`synshot_data.open_split`);
      unique: one row per (item, frame) (`map_indices`), else one per sample;
      indices: explicit sample indices instead (overrides unique).
    Returns: (id indices [N,h,w] int32, expr indices [N,h,w] int32, the sample indices [N]).
    """
    idx = list(indices) if indices is not None else map_indices(dataset, unique)
    if not idx:
        raise ValueError("no examples to encode")
    f = code_indices_fn(ctx)
    ids, exprs = [], []
    for s in range(0, len(idx), batch_size):
        part = idx[s:s + batch_size]
        pad = part + [part[-1]] * (batch_size - len(part))      # one compiled shape
        batch = synshot_data.stack([{k: dataset[int(i)][k] for k in synshot.MAP_KEYS} for i in pad])
        a, b = f(state, batch)
        ids.append(np.asarray(a)[:len(part)])
        exprs.append(np.asarray(b)[:len(part)])
    return np.concatenate(ids).astype(np.int32), np.concatenate(exprs).astype(np.int32), np.asarray(idx)


def codes_to_sequence(id_idx, expr_idx):
    """[N,h,w] x 2 int -> sequences [N, 2 h w] int32 (id codes in raster order, then expr)."""
    id_idx, expr_idx = np.asarray(id_idx), np.asarray(expr_idx)
    n = id_idx.shape[0]
    return np.concatenate([id_idx.reshape(n, -1), expr_idx.reshape(n, -1)], 1).astype(np.int32)


def sequence_to_codes(seq, grid):
    """Sequences [N, 2 h w] -> (id indices [N,h,w], expr indices [N,h,w]); grid = (h, w)."""
    h, w = grid
    n = seq.shape[0]
    return seq[:, :h * w].reshape(n, h, w), seq[:, h * w:].reshape(n, h, w)


# ----------------------------------------------------------------------------------------------
# The transformer.


class CodePrior(nn.Module):
    """Causal decoder-only pre-LN transformer over code sequences [B, L], L = 2 h w.

    Input tokens: a start token (2K), then the sequence shifted by one, id codes k as token k and
    expr codes k as token K + k (separate vocabulary ranges); token embedding + learned position
    embedding [L, width] (normal, std 0.02); num_layers blocks x += MHA(LN(x), causal);
    x += MLP(LN(x)); a final LayerNorm and one linear head per segment. Logits at position i
    depend on s_0 .. s_{i-1} only.

    Attributes: num_codes K; grid (h, w); width (divisible by num_heads); num_layers; num_heads;
    mlp_ratio (MLP hidden width = mlp_ratio x width).
    """

    num_codes: int
    grid: tuple
    width: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4

    @property
    def length(self) -> int:
        """Length L of a code sequence: the identity and expression grids' cells, 2 h w."""
        return 2 * int(self.grid[0]) * int(self.grid[1])

    @nn.compact
    def __call__(self, codes):
        """codes [B, L] int (each in [0, K)) -> logits [B, L, K] float32 of s_i given s_<i."""
        codes = jnp.asarray(codes, jnp.int32)
        L, K = self.length, self.num_codes
        if codes.ndim != 2 or codes.shape[1] != L:
            raise ValueError(f"CodePrior expects codes [B, {L}] (2 x {self.grid[0]} x {self.grid[1]}), "
                             f"got {codes.shape}")
        if self.width % self.num_heads:
            raise ValueError(f"transformer width {self.width} must be divisible by heads {self.num_heads}")
        b = codes.shape[0]
        seg = (jnp.arange(L) >= L // 2).astype(jnp.int32)                  # 0 id, 1 expr
        tokens = codes + seg[None] * K
        inputs = jnp.concatenate([jnp.full((b, 1), 2 * K, jnp.int32), tokens[:, :-1]], 1)
        x = nn.Embed(2 * K + 1, self.width, embedding_init=nn.initializers.normal(0.02), name="embed")(inputs)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (L, self.width))[None]
        mask = nn.make_causal_mask(inputs)                                  # [B, 1, L, L]
        for i in range(self.num_layers):
            y = nn.LayerNorm(name=f"ln_attn_{i}")(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.width,
                                                    name=f"attn_{i}")(y, y, mask=mask)
            y = nn.LayerNorm(name=f"ln_mlp_{i}")(x)
            y = nn.Dense(self.width, name=f"mlp_out_{i}")(nn.gelu(nn.Dense(self.mlp_ratio * self.width,
                                                                          name=f"mlp_in_{i}")(y)))
            x = x + y
        x = nn.LayerNorm(name="ln_out")(x)
        logits = nn.Dense(2 * K, name="head")(x).reshape(b, L, 2, K)
        return jnp.where(seg[None, :, None] == 0, logits[:, :, 0], logits[:, :, 1])


def make_model(cfg, num_codes: int, grid) -> CodePrior:
    """The CodePrior of a config's `transformer` block (layers, width, heads, mlp_ratio)."""
    t = cfg.transformer
    return CodePrior(num_codes=int(num_codes), grid=(int(grid[0]), int(grid[1])), width=int(t.width),
                     num_layers=int(t.layers), num_heads=int(t.heads), mlp_ratio=int(t.get("mlp_ratio", 4)))


def token_nll(logits, codes):
    """Per-token negative log-likelihood [B, L] (nats) of codes [B, L] under logits [B, L, K]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), codes)


def loss_fn(params, codes, model: CodePrior):
    """Mean next-token cross-entropy (nats per token) of codes [B, L]; returns (loss, metrics:
    loss, nll_id, nll_expr (means over each segment), accuracy (argmax = target))."""
    logits = model.apply({"params": params}, codes)
    nll = token_nll(logits, codes)
    half = model.length // 2
    acc = jnp.mean((jnp.argmax(logits, -1) == codes).astype(jnp.float32))
    loss = jnp.mean(nll)
    return loss, dict(loss=loss, nll_id=jnp.mean(nll[:, :half]), nll_expr=jnp.mean(nll[:, half:]), accuracy=acc)


def make_optimizer(optim_cfg):
    """Adam (lr, b1, b2) after global-norm clipping at `clip` (0: none)."""
    parts = [optax.clip_by_global_norm(float(optim_cfg.clip))] if optim_cfg.clip else []
    return optax.chain(*parts, optax.adam(float(optim_cfg.lr), b1=float(optim_cfg.b1), b2=float(optim_cfg.b2)))


def method_functions(model: CodePrior, optim_cfg):
    """(init, train_step, evaluate) for `dhjax.train.loop.Method` over batches {"codes": [B, L]}."""
    tx = make_optimizer(optim_cfg)

    def init(rng, batch):
        params = model.init(rng, batch["codes"])["params"]
        return dict(params=params, opt_state=tx.init(params))

    def train_step(state, batch, rng):
        del rng
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch["codes"], model)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return dict(params=optax.apply_updates(state["params"], updates), opt_state=opt_state), metrics

    @jax.jit
    def evaluate(state, batch):
        _, m = loss_fn(state["params"], batch["codes"], model)
        return dict(nll=m["loss"], nll_id=m["nll_id"], nll_expr=m["nll_expr"], accuracy=m["accuracy"])

    return init, train_step, evaluate


class CodeData:
    """In-memory training batches of code sequences for `loop.train`: get_batch(step) ->
    {"codes": [batch_size, L] int32}, rows drawn uniformly with replacement by a generator
    seeded with (seed, step), so a resumed run reads the same batches."""

    def __init__(self, sequences, batch_size: int, seed: int = 0):
        self.sequences = np.asarray(sequences, np.int32)
        self.batch_size, self.seed = int(batch_size), int(seed)

    def get_batch(self, step: int) -> dict:
        """{"codes": [batch_size, L] int32} of a step (rows drawn with replacement)."""
        rng = np.random.default_rng([self.seed, int(step)])
        return {"codes": self.sequences[rng.integers(0, len(self.sequences), self.batch_size)]}


def heldout_nll(params, model: CodePrior, sequences, batch_size: int = 16) -> dict:
    """Exact mean NLL (nats per token) of sequences [N, L] under the model: nll_per_token,
    nll_id, nll_expr (segment means)."""
    f = jax.jit(lambda p, c: token_nll(model.apply({"params": p}, c), c))
    rows = []
    for s in range(0, len(sequences), batch_size):
        rows.append(np.asarray(f(params, jnp.asarray(sequences[s:s + batch_size]))))
    nll = np.concatenate(rows).astype(np.float64)
    half = model.length // 2
    return dict(nll_per_token=float(nll.mean()), nll_id=float(nll[:, :half].mean()),
                nll_expr=float(nll[:, half:].mean()))


def unigram_baseline(train_seq, test_seq, num_codes: int) -> dict:
    """The unigram baseline, per segment (id, expr) histograms of the training sequences [N, L]:
    entropy (nats per token, mean over both segments' entropies) and heldout_nll (cross-entropy
    of test_seq [M, L] under the add-one smoothed histograms)."""
    half = train_seq.shape[1] // 2
    ent, xent = [], []
    for sl in (slice(0, half), slice(half, None)):
        counts = np.bincount(np.asarray(train_seq)[:, sl].reshape(-1), minlength=num_codes).astype(np.float64)
        p = counts / counts.sum()
        nz = p > 0
        ent.append(-np.sum(p[nz] * np.log(p[nz])))
        q = (counts + 1.0) / (counts.sum() + num_codes)
        xent.append(-np.mean(np.log(q[np.asarray(test_seq)[:, sl].reshape(-1)])))
    return dict(entropy=float(np.mean(ent)), heldout_nll=float(np.mean(xent)))


# ----------------------------------------------------------------------------------------------
# Sampling.


def check_sampling(temperature, top_k) -> None:
    """Raise ValueError unless temperature > 0 and top_k >= 1 (an int)."""
    if not (np.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"sample.temperature must be > 0, got {temperature}")
    if int(top_k) != top_k or int(top_k) < 1:
        raise ValueError(f"sample.top_k must be an integer >= 1, got {top_k}")


def sample_logits(key, logits, temperature, top_k: int):
    """One draw per row of logits [B, K] at a temperature, from the top_k most likely codes
    (top_k >= K: all; ties at the k-th value are all kept) -> [B] int32."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("n", "top_k", "model"))
def _sample_sequences(params, key, temperature, *, n: int, top_k: int, model: CodePrior):
    def body(i, carry):
        seq, key = carry
        logits = jax.lax.dynamic_index_in_dim(model.apply({"params": params}, seq), i, 1, keepdims=False)
        key, sub = jax.random.split(key)
        return seq.at[:, i].set(sample_logits(sub, logits, temperature, top_k)), key

    seq, _ = jax.lax.fori_loop(0, model.length, body, (jnp.zeros((n, model.length), jnp.int32), key))
    return seq


def sample(params, key, n: int, temperature: float, top_k: int, *, model: CodePrior):
    """Draws n code grids from the transformer, position by position (a jitted fori_loop that
    runs the full causal forward over the whole sequence at every position: L forwards of length
    L, no cache).

    Args: params of `model`; key PRNG key; n samples; temperature > 0 (logits / temperature);
    top_k >= 1 (draws among the top_k most likely codes; 1 = greedy, deterministic).
    Returns: (id indices [n,h,w] int32, expr indices [n,h,w] int32), each in [0, K).
    """
    check_sampling(temperature, top_k)
    seq = _sample_sequences(params, key, jnp.float32(temperature), n=int(n), top_k=int(top_k), model=model)
    return sequence_to_codes(seq, model.grid)


# ----------------------------------------------------------------------------------------------
# Decoding and rendering.


def decode_codes(state, ctx: synshot.Context, id_idx, expr_idx) -> dict:
    """Code indices -> the prior's decoded maps and Gaussians, as `synshot.forward` after its
    quantisation (codebook rows, the prior's code transformer when it has one, decoders, part
    sampling, regressors, offsets).

    Args: state: the prior's {params, stats, ...}; id_idx, expr_idx [B,h,w] int.
    Returns: dict tex, verts, expr [B,S,S,3] (network units), phi [B,S,S,3] metres, q_id, q_expr
    [B,h,w,n], gaussians (`synshot_gaussians.Gaussians` [B,N,...], model space).
    """
    assets, model_cfg = ctx.assets, ctx.model_cfg
    cb_id, cb_expr = prior_codebooks(state, ctx.net.cfg)
    q_id, q_expr = vq.lookup_codes(id_idx, cb_id), vq.lookup_codes(expr_idx, cb_expr)

    def body(mdl, qi, qe):
        qi, qe = mdl.refine_codes(qi, qe)
        return dict(synshot.decode_parts(mdl, qi, qe, assets, model_cfg), q_id=qi, q_expr=qe)

    out = nn.apply(body, ctx.net)(synshot.net_variables(state["params"], state["stats"]), q_id, q_expr)
    out["gaussians"] = gs.apply_offsets(out.pop("parts"), model_cfg.offset_scale)
    return out


def neutral_params(assets: synshot.Assets, b: int) -> dict:
    """Zero shape [b, n_shape], expression [b, n_expression], pose [b, J, 3], translation [b, 3]
    (the head model's rest pose: the joint transforms are identities)."""
    return dict(shape=jnp.zeros((b, assets.n_shape)), expression=jnp.zeros((b, assets.n_expression)),
                pose=jnp.zeros((b, len(assets.parents), 3)), translation=jnp.zeros((b, 3)))


def render_views(gaussians, ctx: synshot.Context, K, R, t):
    """Renders Gaussians [B,N,...] (model space) at the neutral pose into C cameras K [C,3,3],
    R [C,3,3], t [C,3] (metres) -> images [B, C, H, W, 3] in [0, 1] (black background)."""
    b = gaussians.means.shape[0]
    K, R, t = (jnp.broadcast_to(jnp.asarray(x, jnp.float32)[None], (b,) + np.shape(x)) for x in (K, R, t))
    image, _ = gs.render_gaussians(gaussians, neutral_params(ctx.assets, b), ctx.assets, K, R, t, ctx.width,
                                   ctx.height, backend=ctx.backend, deterministic=ctx.deterministic)
    return image


def decode_and_render_fn(ctx: synshot.Context):
    """Jitted (prior state, id_idx [B,h,w], expr_idx [B,h,w], K [C,3,3], R [C,3,3], t [C,3]) ->
    images [B,C,H,W,3] (`decode_codes` then `render_views`)."""

    @jax.jit
    def f(state, id_idx, expr_idx, K, R, t):
        return render_views(decode_codes(state, ctx, id_idx, expr_idx)["gaussians"], ctx, K, R, t)

    return f


def view_cameras(dataset, views):
    """(K [C,3,3], R [C,3,3], t [C,3]) of the first sample of each view number in `views` (the
    dataset's `view` field; a folder dataset's camera order). Raises ValueError naming missing
    views."""
    found = {}
    for i in range(len(dataset)):
        s = dataset[i]
        v = int(s.get("view", i))
        if v in views and v not in found:
            found[v] = (s["K"], s["R"], s["t"])
        if len(found) == len(set(views)):
            break
    missing = [v for v in views if v not in found]
    if missing:
        raise ValueError(f"sample.views {tuple(views)}: views {missing} are not in the test split "
                         f"(it has {len(dataset)} images)")
    return tuple(np.stack([np.asarray(found[v][j], np.float32) for v in views]) for j in range(3))


def picture_grid(images) -> np.ndarray:
    """images [B, C, H, W, 3] -> one picture [B H, C W, 3] (rows: avatars, columns: views)."""
    images = np.asarray(images)
    b, c, h, w, _ = images.shape
    return np.clip(images.transpose(0, 2, 1, 3, 4).reshape(b * h, c * w, 3), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# The run.


def check_config(cfg) -> None:
    """Raise ValueError naming the field for settings that cannot run (before any work)."""
    if not cfg.prior_workdir:
        raise ValueError("no prior given: point --config.prior_workdir at the workdir of experiments.synshot_prior")
    check_sampling(cfg.sample.temperature, cfg.sample.top_k)
    if int(cfg.sample.n) < 1 or int(cfg.sample.reconstructions) < 0 or not tuple(cfg.sample.views):
        raise ValueError(f"sample.n must be >= 1, sample.reconstructions >= 0 and sample.views non-empty, got "
                         f"{cfg.sample.n}, {cfg.sample.reconstructions}, {tuple(cfg.sample.views)}")


def load_prior(prior_workdir: str, backend: str = "auto"):
    """(prior config, state, step, context, train split, test split) of a synshot_prior run folder.
    Raises FileNotFoundError / ValueError naming the folder (not a run, another experiment, no
    checkpoint) and ValueError for a prior with model.use_vq=False (checked before loading)."""
    prior_cfg = app.read_config(prior_workdir, experiment=PRIOR_EXPERIMENT)
    if not bool(prior_cfg.model.use_vq):
        raise ValueError(f"the prior in '{prior_workdir}' was trained with model.use_vq=False: it has no codebooks, "
                         f"so there are no codes to sample (train a prior with model.use_vq=True)")
    root = synshot_data.dataset_root(prior_cfg)
    train_ds = synshot_data.open_split(root, "train", in_memory=False)
    test_ds = synshot_data.open_split(root, "test", in_memory=False)
    width, height = synshot_data.image_size(test_ds)
    assets = synshot.build_assets(prior_cfg.model)
    ctx = synshot.make_context(prior_cfg.model, assets, width, height, optim_cfg=prior_cfg.optim, backend=backend)
    first = synshot_data.model_batch(synshot_data.stack([train_ds[0]]))
    _, state, step = app.load_run(
        prior_workdir, lambda pcfg: jax.eval_shape(lambda: synshot.init_state(jax.random.PRNGKey(0), first, ctx)),
        experiment=PRIOR_EXPERIMENT)
    return prior_cfg, state, step, ctx, train_ds, test_ds


def run(cfg, workdir: str) -> dict:
    """Collects the prior's codes, trains (or resumes) the code transformer of
    `configs/synshot_sample.py`, evaluates it on the prior's test split against the unigram
    baseline, samples cfg.sample.n avatars and writes the files of the module docstring.

    Returns the summary: the final metrics (nats per token) plus steps_run (training steps this
    call ran; 0 when resumed at the end), grid (h, w), n_train / n_test sequences.
    """
    app.check_experiment(cfg, "synshot_sample")
    check_config(cfg)
    run_ = app.start(workdir, cfg)
    prior_cfg, prior_state, prior_step, ctx, train_ds, test_ds = load_prior(cfg.prior_workdir, cfg.backend)
    run_.log(f"prior: {cfg.prior_workdir} step {prior_step}")
    t0 = time.time()
    bs = int(cfg.encode_batch_size)
    train_id, train_expr, _ = collect_codes(prior_state, ctx, train_ds, batch_size=bs)
    test_id, test_expr, _ = collect_codes(prior_state, ctx, test_ds, batch_size=bs)
    grid = tuple(int(x) for x in train_id.shape[1:])
    K = int(ctx.net.cfg.num_codes)
    train_seq, test_seq = codes_to_sequence(train_id, train_expr), codes_to_sequence(test_id, test_expr)
    run_.log(f"codes: {len(train_seq)} training / {len(test_seq)} held-out grids of 2 x {grid[0]} x {grid[1]} "
             f"over {K} codes ({time.time() - t0:.1f}s); distinct codes used: id "
             f"{len(np.unique(train_id))}, expr {len(np.unique(train_expr))}")

    model = make_model(cfg, K, grid)
    init, train_step, evaluate = method_functions(model, cfg.optim)
    # the harness's eval batch must divide over the devices: the held-out sequences, repeated up to a
    # multiple of the device count (exact with one device); the final numbers use every sequence once
    n_dev = jax.device_count()
    n_eval = max(n_dev, (len(test_seq) // n_dev) * n_dev)
    eval_batch = {"codes": np.resize(test_seq, (n_eval, test_seq.shape[1]))}
    result = loop.train(cfg, str(run_.workdir), loop.Method(init, train_step, evaluate),
                        CodeData(train_seq, int(cfg.batch_size), int(cfg.seed)), eval_batch=eval_batch)
    params = result.state["params"]
    held = heldout_nll(params, model, test_seq)
    uni = unigram_baseline(train_seq, test_seq, K)
    run_.log(f"held-out NLL {held['nll_per_token']:.4f} nats/token (id {held['nll_id']:.4f}, expr "
             f"{held['nll_expr']:.4f}) | unigram entropy {uni['entropy']:.4f}, unigram held-out NLL "
             f"{uni['heldout_nll']:.4f}")

    sc = cfg.sample
    t1 = time.time()
    s_id, s_expr = sample(params, jax.random.PRNGKey(int(cfg.seed) + 1), int(sc.n), float(sc.temperature),
                          int(sc.top_k), model=model)
    s_id, s_expr = np.asarray(s_id), np.asarray(s_expr)
    sample_s = time.time() - t1
    views = tuple(int(v) for v in sc.views)
    Kc, Rc, tc = view_cameras(test_ds, views)
    n_rec = min(int(sc.reconstructions), len(test_id))
    ids = np.concatenate([test_id[:n_rec], s_id]).astype(np.int32)
    exprs = np.concatenate([test_expr[:n_rec], s_expr]).astype(np.int32)
    images = decode_and_render_fn(ctx)(prior_state, ids, exprs, Kc, Rc, tc)
    summary = {f"heldout/{k}": v for k, v in held.items()}
    summary.update({f"unigram/{k}": v for k, v in uni.items()},
                   n_train_sequences=float(len(train_seq)), n_test_sequences=float(len(test_seq)),
                   sequence_length=float(model.length), sample_seconds=float(sample_s),
                   sample_distinct_id_codes=float(len(np.unique(s_id))))
    if run_.lead:
        dio.save_image(str(run_.path("samples.png")), picture_grid(images))
        np.savez(run_.path("codes.npz"), train_id=train_id, train_expr=train_expr, test_id=test_id,
                 test_expr=test_expr, sample_id=s_id, sample_expr=s_expr)
        app.merge_final_metrics(run_.workdir, summary)
        run_.log(json.dumps(summary, indent=1, sort_keys=True))
    run_.done(f"{run_.workdir}/samples.png", "final_metrics.json", "codes.npz")
    return dict(summary, **{k: v for k, v in result.metrics.items() if k not in summary},
                steps_run=int(result.steps_run), grid=grid, reconstructions=n_rec)

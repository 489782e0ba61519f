"""Vector quantisation for SynShot's VQ-VAE prior.

The quantiser follows van den Oord et al., "Neural Discrete Representation Learning" (2017): every
latent vector ``z`` (the last axis of an encoder output) is replaced by its nearest entry ``e`` of
a learned codebook, gradients pass the non-differentiable lookup with the straight-through
estimator, and two terms pull codes and encoder outputs towards each other:

* codebook loss   ``mean((sg(z) - e)^2)``         (moves codes, no gradient to the encoder)
* commitment loss ``beta * mean((z - sg(e))^2)``  (keeps the encoder near its code)

Both means run over every element (all vectors and all channels), as in Sonnet's VQ-VAE.

Two optional mechanisms fight codebook collapse:

* **EMA codebook** (appendix of the VQ-VAE paper; VQ-VAE-2, Razavi et al. 2019): codes are
  exponential moving averages of the encoder outputs assigned to them, with Laplace smoothing of
  the cluster sizes so that an empty cluster never divides by zero. In this mode the codebook is a
  statistic, not a parameter: it gets no gradient and the codebook loss is left out of the total
  (only the commitment term remains).
* **Dead-code restarts** (as in Jukebox, Dhariwal et al. 2020): a code whose running usage falls
  below a threshold is moved onto a randomly chosen encoder output of the current batch.

:class:`CodeTransformer` is the optional bidirectional transformer over the grid of quantised
codes (after Esser et al., "Taming Transformers", 2021) that lets code positions exchange
information before decoding.

Everything below is a pure function over arrays, apart from the two thin flax modules. Functions
accept arbitrary leading batch dimensions where stated and are jit/vmap/grad compatible.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "VQOutput",
    "EMAState",
    "quantize",
    "nearest_code",
    "lookup_codes",
    "code_usage",
    "perplexity",
    "init_ema_state",
    "ema_update",
    "codebook_from_ema",
    "update_usage_ema",
    "dead_code_mask",
    "restart_dead_codes",
    "VectorQuantizer",
    "CodeTransformer",
]

_HIGHEST = jax.lax.Precision.HIGHEST


class VQOutput(NamedTuple):
    """Result of :func:`quantize` for latents ``z: [..., n]`` and a codebook ``[K, n]``.

    Attributes:
      quantized: ``[..., n]`` float32. Forward value ``codebook[indices]``; gradient w.r.t. ``z``
        is the identity (straight-through), no gradient reaches the codebook through it.
      indices: ``[...]`` int32, index of the nearest code of every latent vector.
      codebook_loss: ``[]`` float32, ``mean((sg(z) - e)^2)``; exactly 0 in EMA mode.
      commitment_loss: ``[]`` float32, ``beta * mean((z - sg(e))^2)``.
      loss: ``[]`` float32, ``codebook_loss + commitment_loss``.
      perplexity: ``[]`` float32, ``exp(entropy)`` of the code usage in this batch, between 1
        (one code used) and ``K`` (all codes used equally often).
      usage: ``[K]`` float32, how many latent vectors of this batch chose each code.
    """

    quantized: jax.Array
    indices: jax.Array
    codebook_loss: jax.Array
    commitment_loss: jax.Array
    loss: jax.Array
    perplexity: jax.Array
    usage: jax.Array


class EMAState(NamedTuple):
    """Running statistics of an EMA codebook with ``K`` codes of dimension ``n``.

    Attributes:
      cluster_size: ``[K]`` float32, EMA of how many vectors were assigned to each code per batch
        (stored unsmoothed; the Laplace smoothing is applied when the codebook is formed).
      embed_sum: ``[K, n]`` float32, EMA of the sum of the vectors assigned to each code.
      codebook: ``[K, n]`` float32, ``embed_sum / smoothed(cluster_size)``.
    """

    cluster_size: jax.Array
    embed_sum: jax.Array
    codebook: jax.Array


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def _check_codebook(codebook) -> jax.Array:
    codebook = jnp.asarray(codebook)
    if codebook.ndim != 2:
        raise ValueError(f"codebook must have shape [K, n], got shape {codebook.shape}")
    return codebook.astype(jnp.float32)


def _check_latents(z, codebook_shape: tuple[int, ...], name: str = "z") -> jax.Array:
    z = jnp.asarray(z)
    if z.ndim < 1 or z.shape[-1] != codebook_shape[-1]:
        raise ValueError(
            f"{name} must have shape [..., n] with n equal to the codebook dimension: "
            f"{name} has shape {z.shape}, codebook has shape {codebook_shape}"
        )
    return z.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Quantisation
# ----------------------------------------------------------------------------------------------


def nearest_code(z, codebook) -> jax.Array:
    """Index of the nearest code under squared Euclidean distance.

    The distance is expanded as ``|z|^2 - 2 z.e + |e|^2`` and evaluated in float32 with
    ``Precision.HIGHEST`` so that TPU/GPU matmuls do not silently drop to bfloat16 passes.
    Memory is ``O(M K)`` for ``M`` latent vectors.

    Args:
      z: ``[..., n]`` latents.
      codebook: ``[K, n]``.

    Returns:
      ``[...]`` int32 indices into the codebook. Ties resolve to the lowest index.
    """
    codebook = _check_codebook(codebook)
    z = _check_latents(z, codebook.shape)
    z_sq = jnp.sum(z * z, axis=-1, keepdims=True)  # [..., 1]
    e_sq = jnp.sum(codebook * codebook, axis=-1)  # [K]
    cross = jnp.einsum("...n,kn->...k", z, codebook, precision=_HIGHEST)  # [..., K]
    dist = z_sq - 2.0 * cross + e_sq
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def lookup_codes(indices, codebook) -> jax.Array:
    """Codebook rows for integer ``indices: [...]`` -> ``[..., n]`` float32 (e.g. for sampling)."""
    codebook = _check_codebook(codebook)
    return jnp.take(codebook, jnp.asarray(indices), axis=0)


def code_usage(indices, num_codes: int) -> jax.Array:
    """How often each code occurs in ``indices: [...]`` (int) -> ``[num_codes]`` float32 counts."""
    flat = jnp.asarray(indices).reshape(-1)
    return jnp.zeros((num_codes,), jnp.float32).at[flat].add(1.0)


def perplexity(usage) -> jax.Array:
    """``exp(entropy)`` of the empirical code distribution ``usage: [K]`` (counts) -> ``[]``.

    Returns 1 for an all-zero ``usage`` (no vectors) rather than NaN.
    """
    usage = jnp.asarray(usage, jnp.float32)
    total = jnp.sum(usage)
    p = usage / jnp.maximum(total, 1e-12)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return jnp.exp(-jnp.sum(plogp))


def quantize(z, codebook, *, beta: float = 0.25, use_ema: bool = False) -> VQOutput:
    """Quantise every latent vector to its nearest code (VQ-VAE bottleneck).

    Args:
      z: ``[..., n]`` latents (cast to float32).
      codebook: ``[K, n]`` codes.
      beta: weight of the commitment loss.
      use_ema: the codebook is maintained by :func:`ema_update`. The codebook is then wrapped in
        ``stop_gradient`` (it receives no gradient at all) and the codebook loss is omitted:
        ``codebook_loss`` is 0 and ``loss == commitment_loss``.

    Returns:
      A :class:`VQOutput`. The straight-through estimator is written as
      ``sg(e) + (z - sg(z))``; this has the same gradient as ``z + sg(e - z)`` but its forward
      value is exactly ``codebook[indices]`` (no ``z + (e - z)`` rounding).

    Raises:
      ValueError: if ``codebook`` is not 2-D or the last dim of ``z`` differs from ``n``.
    """
    codebook = _check_codebook(codebook)
    z = _check_latents(z, codebook.shape)
    if use_ema:
        codebook = jax.lax.stop_gradient(codebook)
    num_codes = codebook.shape[0]

    indices = nearest_code(jax.lax.stop_gradient(z), jax.lax.stop_gradient(codebook))
    e = jnp.take(codebook, indices, axis=0)  # [..., n], differentiable w.r.t. the codebook
    z_sg = jax.lax.stop_gradient(z)
    e_sg = jax.lax.stop_gradient(e)

    commitment_loss = beta * jnp.mean(jnp.square(z - e_sg))
    if use_ema:
        codebook_loss = jnp.zeros((), jnp.float32)
    else:
        codebook_loss = jnp.mean(jnp.square(z_sg - e))
    quantized = e_sg + (z - z_sg)

    usage = code_usage(indices, num_codes)
    return VQOutput(
        quantized=quantized,
        indices=indices,
        codebook_loss=codebook_loss,
        commitment_loss=commitment_loss,
        loss=codebook_loss + commitment_loss,
        perplexity=perplexity(usage),
        usage=usage,
    )


# ----------------------------------------------------------------------------------------------
# EMA codebook
# ----------------------------------------------------------------------------------------------


def codebook_from_ema(cluster_size, embed_sum, *, eps: float = 1e-5) -> jax.Array:
    """Codebook ``[K, n]`` from EMA statistics ``cluster_size: [K]``, ``embed_sum: [K, n]``.

    ``embed_sum / smoothed[:, None]`` with the Laplace-smoothed cluster sizes
    ``smoothed = (cluster_size + eps) / (N + K eps) * N``, ``N = sum(cluster_size)``. Useful after
    averaging EMA statistics over devices (average the sums, then form the codebook).
    """
    return _smoothed_codebook(jnp.asarray(cluster_size), jnp.asarray(embed_sum), eps)


def _smoothed_codebook(cluster_size, embed_sum, eps: float) -> jax.Array:
    """``embed_sum / smoothed(cluster_size)`` with Laplace smoothing (Sonnet / VQ-VAE-2)."""
    num_codes = cluster_size.shape[0]
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + eps) / (total + num_codes * eps) * total
    return embed_sum / smoothed[:, None]


def init_ema_state(codebook, *, initial_count: float = 1.0) -> EMAState:
    """EMA statistics that reproduce ``codebook: [K, n]``.

    Every code starts with a pseudo-count of ``initial_count`` vectors located at the code itself
    (``cluster_size = initial_count``, ``embed_sum = initial_count * codebook``), so codes that
    are not chosen in the first batches keep their value instead of being divided by a near-zero
    cluster size. No bias correction is applied afterwards; the pseudo-counts decay away with the
    EMA.

    Returns:
      :class:`EMAState` with ``cluster_size [K]``, ``embed_sum [K, n]``, ``codebook [K, n]``.
    """
    codebook = _check_codebook(codebook)
    if initial_count <= 0:
        raise ValueError(f"initial_count must be positive, got {initial_count}")
    cluster_size = jnp.full((codebook.shape[0],), initial_count, jnp.float32)
    return EMAState(
        cluster_size=cluster_size, embed_sum=initial_count * codebook, codebook=codebook
    )


def ema_update(state: EMAState, z, indices, *, decay: float = 0.99, eps: float = 1e-5) -> EMAState:
    """One exponential-moving-average step of the codebook.

    With one-hot assignments ``A: [M, K]`` of the ``M`` vectors ``Z: [M, n]`` of this batch::

        cluster_size <- decay * cluster_size + (1 - decay) * sum_m A[m]
        embed_sum    <- decay * embed_sum    + (1 - decay) * A^T Z
        N            =  sum(cluster_size)
        smoothed     =  (cluster_size + eps) / (N + K eps) * N      (Laplace smoothing)
        codebook     =  embed_sum / smoothed[:, None]

    Under ``jit`` with a data-parallel sharded batch the sums run over the global batch.

    Args:
      state: current :class:`EMAState` (``[K]``, ``[K, n]``, ``[K, n]``).
      z: ``[..., n]`` latents (gradient is stopped).
      indices: ``[...]`` int code assignment of every latent (from :func:`quantize`).
      decay: EMA decay in ``[0, 1)``.
      eps: Laplace smoothing constant.

    Returns:
      The updated :class:`EMAState`.
    """
    cluster_size = jnp.asarray(state.cluster_size, jnp.float32)
    embed_sum = jnp.asarray(state.embed_sum, jnp.float32)
    z = _check_latents(z, embed_sum.shape)
    indices = jnp.asarray(indices)
    if indices.shape != z.shape[:-1]:
        raise ValueError(
            f"indices must have shape z.shape[:-1]: indices has shape {indices.shape}, "
            f"z has shape {z.shape}"
        )
    num_codes = cluster_size.shape[0]
    z_flat = jax.lax.stop_gradient(z).reshape(-1, z.shape[-1])
    idx_flat = indices.reshape(-1)
    counts = jnp.zeros((num_codes,), jnp.float32).at[idx_flat].add(1.0)
    sums = jnp.zeros_like(embed_sum).at[idx_flat].add(z_flat)

    cluster_size = decay * cluster_size + (1.0 - decay) * counts
    embed_sum = decay * embed_sum + (1.0 - decay) * sums
    codebook = _smoothed_codebook(cluster_size, embed_sum, eps)
    return EMAState(cluster_size=cluster_size, embed_sum=embed_sum, codebook=codebook)


# ----------------------------------------------------------------------------------------------
# Dead-code restarts
# ----------------------------------------------------------------------------------------------


def update_usage_ema(usage_ema, usage, *, decay: float = 0.99) -> jax.Array:
    """``decay * usage_ema + (1 - decay) * usage`` for per-code counts ``[K]`` -> ``[K]``.

    The result is in "vectors per batch" units, the units of ``threshold`` in
    :func:`restart_dead_codes`.
    """
    usage_ema = jnp.asarray(usage_ema, jnp.float32)
    usage = jnp.asarray(usage, jnp.float32)
    if usage_ema.shape != usage.shape or usage.ndim != 1:
        raise ValueError(
            f"usage_ema and usage must both have shape [K]: got {usage_ema.shape} and {usage.shape}"
        )
    return decay * usage_ema + (1.0 - decay) * usage


def dead_code_mask(usage_ema, threshold: float) -> jax.Array:
    """``[K]`` bool: true where the running usage ``usage_ema: [K]`` is below ``threshold``."""
    return jnp.asarray(usage_ema, jnp.float32) < threshold


def restart_dead_codes(
    codebook, usage_ema, z_flat, rng, *, threshold: float, noise_std: float = 1e-3
) -> tuple[jax.Array, jax.Array]:
    """Move rarely used codes onto random encoder outputs of the current batch.

    Every code ``k`` with ``usage_ema[k] < threshold`` is replaced by ``z_flat[j_k] + noise``
    where the ``j_k`` are drawn uniformly (without replacement when ``M >= K``, so two restarted
    codes do not land on the same vector) and ``noise ~ N(0, noise_std^2)`` separates codes that
    would otherwise coincide. Shapes are fixed (a ``where`` per code), so this runs under ``jit``.

    Args:
      codebook: ``[K, n]``.
      usage_ema: ``[K]`` running usage, e.g. from :func:`update_usage_ema`.
      z_flat: ``[M, n]`` encoder outputs of the batch (gradient is stopped).
      rng: PRNG key.
      threshold: codes with running usage strictly below it are restarted; ``<= 0`` restarts none.
      noise_std: standard deviation of the added Gaussian noise.

    Returns:
      ``(codebook [K, n] float32, n_restarted [] int32)``.
    """
    codebook = _check_codebook(codebook)
    usage_ema = jnp.asarray(usage_ema, jnp.float32)
    z_flat = jnp.asarray(z_flat)
    if z_flat.ndim != 2 or z_flat.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"z_flat must have shape [M, n] with n equal to the codebook dimension: "
            f"z_flat has shape {z_flat.shape}, codebook has shape {codebook.shape}"
        )
    if usage_ema.shape != (codebook.shape[0],):
        raise ValueError(
            f"usage_ema must have shape [K]: got {usage_ema.shape}, codebook has shape "
            f"{codebook.shape}"
        )
    num_codes, dim = codebook.shape
    num_vectors = z_flat.shape[0]
    z_flat = jax.lax.stop_gradient(z_flat).astype(jnp.float32)

    pick_key, noise_key = jax.random.split(rng)
    picks = jax.random.choice(
        pick_key, num_vectors, (num_codes,), replace=num_vectors < num_codes
    )
    candidates = z_flat[picks] + noise_std * jax.random.normal(noise_key, (num_codes, dim))
    dead = dead_code_mask(usage_ema, threshold)
    new_codebook = jnp.where(dead[:, None], candidates, codebook)
    return new_codebook, jnp.sum(dead).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Flax modules
# ----------------------------------------------------------------------------------------------


class VectorQuantizer(nn.Module):
    """VQ bottleneck as a flax module, a thin wrapper around the functions above.

    Variables:
      * ``params/codebook [K, n]`` (only when ``use_ema=False``), uniform in ``[-1/K, 1/K]`` as in
        the original VQ-VAE implementations.
      * collection ``"vq_stats"``: ``usage_ema [K]`` (running codes-per-batch count, initialised to
        the uniform share ``M / K`` of the init batch), and with ``use_ema=True`` also
        ``codebook [K, n]``, ``cluster_size [K]``, ``embed_sum [K, n]`` (see :class:`EMAState`).
        In EMA mode the codebook therefore lives outside ``params``: the optimiser never sees it,
        it gets no gradient, and the loss contains only the commitment term.

    Statistics are updated only when ``train=True`` *and* ``"vq_stats"`` is mutable (e.g.
    ``apply(..., train=True, mutable=["vq_stats"])``), never during ``init``.

    Dead-code restarts (``restart_threshold > 0``, in units of vectors per batch) need a PRNG
    stream named ``"vq"`` in training (``rngs={"vq": key}``). In EMA mode the restart is applied
    to the stored codebook and its EMA statistics directly. Without EMA the codebook is a
    parameter that ``apply`` cannot modify, so the restarted codebook is returned as
    ``aux["restarted_codebook"]`` and the train step must write it into ``params`` itself. A
    restarted code gets the mean running usage, so it is not restarted again at once.

    Attributes:
      num_codes: codebook size ``K``.
      dim: code dimension ``n`` (last axis of the input).
      beta: commitment weight.
      use_ema: maintain the codebook with EMA updates instead of gradients.
      ema_decay: decay of the EMA codebook statistics and of the usage EMA.
      ema_eps: Laplace smoothing constant.
      restart_threshold: restart codes whose usage EMA is below this; 0 disables restarts.
      restart_noise_std: noise added to restarted codes.
    """

    num_codes: int
    dim: int
    beta: float = 0.25
    use_ema: bool = False
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    restart_threshold: float = 0.0
    restart_noise_std: float = 1e-3

    def _init_codebook(self, rng) -> jax.Array:
        limit = 1.0 / self.num_codes
        return jax.random.uniform(
            rng, (self.num_codes, self.dim), jnp.float32, minval=-limit, maxval=limit
        )

    @nn.compact
    def __call__(self, z, *, train: bool = False):
        """Quantise ``z: [..., dim]``.

        Returns:
          ``(quantized [..., dim] float32, aux)`` where ``aux`` holds ``loss``,
          ``codebook_loss``, ``commitment_loss``, ``perplexity`` (scalars), ``indices [...]``
          int32 and ``usage [K]``; in a training update also ``n_restarted`` (when restarts are
          on) and, without EMA, ``restarted_codebook [K, dim]``.

        Raises:
          ValueError: if the last dim of ``z`` is not ``dim``.
        """
        z = jnp.asarray(z)
        if z.ndim < 1 or z.shape[-1] != self.dim:
            raise ValueError(
                f"VectorQuantizer expects z of shape [..., {self.dim}] to match its codebook "
                f"of shape ({self.num_codes}, {self.dim}); got z of shape {z.shape}"
            )
        num_vectors = math.prod(z.shape[:-1])
        usage_var = self.variable(
            "vq_stats",
            "usage_ema",
            lambda: jnp.full((self.num_codes,), num_vectors / self.num_codes, jnp.float32),
        )
        if self.use_ema:
            init_cb = lambda: self._init_codebook(self.make_rng("params"))  # noqa: E731
            cb_var = self.variable("vq_stats", "codebook", init_cb)
            size_var = self.variable(
                "vq_stats", "cluster_size", lambda: jnp.ones((self.num_codes,), jnp.float32)
            )
            sum_var = self.variable("vq_stats", "embed_sum", lambda: cb_var.value)
            codebook = cb_var.value
        else:
            codebook = self.param("codebook", lambda rng: self._init_codebook(rng))

        out = quantize(z, codebook, beta=self.beta, use_ema=self.use_ema)
        aux = {
            "loss": out.loss,
            "codebook_loss": out.codebook_loss,
            "commitment_loss": out.commitment_loss,
            "perplexity": out.perplexity,
            "indices": out.indices,
            "usage": out.usage,
        }

        update = (
            train and self.is_mutable_collection("vq_stats") and not self.is_initializing()
        )
        if not update:
            return out.quantized, aux

        usage_ema = update_usage_ema(usage_var.value, out.usage, decay=self.ema_decay)
        if self.use_ema:
            state = ema_update(
                EMAState(size_var.value, sum_var.value, cb_var.value),
                z,
                out.indices,
                decay=self.ema_decay,
                eps=self.ema_eps,
            )
            new_codebook = state.codebook
        else:
            new_codebook = jax.lax.stop_gradient(codebook)

        if self.restart_threshold > 0:
            z_flat = z.reshape(-1, self.dim)
            dead = dead_code_mask(usage_ema, self.restart_threshold)
            new_codebook, n_restarted = restart_dead_codes(
                new_codebook,
                usage_ema,
                z_flat,
                self.make_rng("vq"),
                threshold=self.restart_threshold,
                noise_std=self.restart_noise_std,
            )
            usage_ema = jnp.where(dead, jnp.mean(usage_ema), usage_ema)
            aux["n_restarted"] = n_restarted
            if self.use_ema:
                # A restarted code restarts its EMA statistics too: an average cluster of
                # vectors located at the new code, so the next update keeps it in place.
                mean_size = jnp.mean(state.cluster_size)
                state = EMAState(
                    cluster_size=jnp.where(dead, mean_size, state.cluster_size),
                    embed_sum=jnp.where(dead[:, None], mean_size * new_codebook, state.embed_sum),
                    codebook=new_codebook,
                )
            else:
                aux["restarted_codebook"] = new_codebook

        usage_var.value = usage_ema
        if self.use_ema:
            size_var.value = state.cluster_size
            sum_var.value = state.embed_sum
            cb_var.value = state.codebook
        return out.quantized, aux


class CodeTransformer(nn.Module):
    """Bidirectional pre-LN transformer over a grid of quantised codes (Esser et al. 2021).

    ``[B, h, w, n] -> [B, h, w, n]``. The ``h * w`` positions are flattened into a sequence,
    linearly projected to width ``dim``, given learned position embeddings (normal, std 0.02, shape
    ``[h * w, dim]`` fixed by the grid seen at ``init``) and passed through ``num_layers`` blocks
    ``x += MHA(LN(x)); x += MLP(LN(x))`` with full (non-causal) attention. A final LayerNorm and a
    zero-initialised projection back to ``n`` give a residual update, ``out = codes + delta``, so
    the module is the identity at initialisation; with ``num_layers=0`` it is the identity
    always (it has no parameters).

    Attributes:
      dim: transformer width; must be divisible by ``num_heads``.
      num_layers: number of transformer blocks.
      num_heads: attention heads.
      mlp_ratio: hidden width of the MLP is ``mlp_ratio * dim``.
    """

    dim: int
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, codes):
        """``codes: [B, h, w, n]`` float -> ``[B, h, w, n]`` float32."""
        codes = jnp.asarray(codes, jnp.float32)
        if codes.ndim != 4:
            raise ValueError(
                f"CodeTransformer expects codes of shape [B, h, w, n], got {codes.shape}"
            )
        if self.dim % self.num_heads != 0:
            raise ValueError(
                f"CodeTransformer dim={self.dim} must be divisible by num_heads={self.num_heads}"
            )
        if self.num_layers == 0:
            return codes
        b, h, w, n = codes.shape
        x = nn.Dense(self.dim, name="embed")(codes.reshape(b, h * w, n))
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (h * w, self.dim))
        x = x + pos[None]
        for i in range(self.num_layers):
            y = nn.LayerNorm(name=f"ln_attn_{i}")(x)
            y = nn.MultiHeadDotProductAttention(
                num_heads=self.num_heads, qkv_features=self.dim, name=f"attn_{i}"
            )(y, y)
            x = x + y
            y = nn.LayerNorm(name=f"ln_mlp_{i}")(x)
            y = nn.Dense(self.mlp_ratio * self.dim, name=f"mlp_in_{i}")(y)
            y = nn.gelu(y)
            y = nn.Dense(self.dim, name=f"mlp_out_{i}")(y)
            x = x + y
        x = nn.LayerNorm(name="ln_out")(x)
        delta = nn.Dense(
            n,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            name="out",
        )(x)
        return codes + delta.reshape(b, h, w, n)

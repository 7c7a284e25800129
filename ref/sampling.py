"""Choosing the next token from a model's logits: greedy, temperature, top-k, top-p.

    sample(key, logits, cfg)   logits [..., V] -> token ids [...] (int32)

Temperature 0 is greedy (argmax, the key is unused). Otherwise the logits are
divided by the temperature, cut to the top-k tokens and then to the top-p
nucleus (the smallest set of most likely tokens whose probability reaches p,
always at least one token), and a token is drawn from the softmax of what is
left. This is the order Hugging Face's `generate` applies them in. Ties at a
cut-off are all kept, so the support can exceed k where logits are equal.

Keys are explicit: decoding draws step i's token with `step_key(key, i)`, so the
same seed gives the same text in `ref/decode.py` and `fast/decode.py`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen; hashable, so it can be a jit static argument."""

    temperature: float = 0.0    # 0: greedy; > 0 divides the logits
    top_k: int = 0              # keep the k most likely tokens; 0: all
    top_p: float = 1.0          # keep the smallest set with probability >= top_p; 1: all

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """-inf everywhere below the k-th largest logit of each row [..., V]."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]                                   # [..., 1]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """-inf outside the nucleus: the most likely tokens whose probabilities, added in
    decreasing order, first reach p (the token that crosses p is kept)."""
    if p >= 1.0:
        return logits
    ordered = -jnp.sort(-logits, axis=-1)                                         # [..., V] descending
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < p                                                        # a prefix; never empty
    n_keep = jnp.sum(keep, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ordered, n_keep - 1, axis=-1)                 # [..., 1]
    return jnp.where(logits < threshold, -jnp.inf, logits)


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """float32 logits / temperature, -inf outside the top-k and top-p support."""
    x = logits.astype(jnp.float32) / jnp.float32(cfg.temperature if cfg.temperature > 0 else 1.0)
    return top_p_filter(top_k_filter(x, cfg.top_k), cfg.top_p)


def sample(key: jax.Array, logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Next token ids [...] (int32) from logits [..., V]."""
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, cfg), axis=-1).astype(jnp.int32)


def step_key(key: jax.Array, step) -> jax.Array:
    """The key that draws the token of decoding step `step` (0 = the first new token)."""
    return jax.random.fold_in(key, step)

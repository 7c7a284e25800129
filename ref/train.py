"""Training semantics: next-token loss and accuracy, and one optimizer step.

A batch is {"tokens": int [B, T + 1], "mask": optional float [B, T]}: position t
predicts tokens[:, t + 1], and the mask (1 = counts) selects which predictions
count (e.g. to leave out padding). Only the trainable part of the params is
differentiated; the frozen part is passed through untouched, so it comes out of
a step bit-identical.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mode_jax.ref.config import LlamaConfig, LoraConfig, OptimConfig
from mode_jax.ref.methods import apply, merge
from mode_jax.ref.optim import adamw_update


def next_token_metrics(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> dict:
    """Masked mean cross-entropy and argmax accuracy.

    logits [B, T, V], targets int [B, T], mask [B, T] (None = all count).
    Returns {"loss", "accuracy", "tokens"} (tokens = number of counted positions).
    """
    logits = logits.astype(jnp.float32)
    if mask is None:
        mask = jnp.ones(targets.shape, jnp.float32)
    mask = mask.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)                                          # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]   # [B, T]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    count = jnp.sum(mask)
    denom = jnp.maximum(count, 1.0)
    return {"loss": jnp.sum((logz - target_logit) * mask) / denom,
            "accuracy": jnp.sum(correct * mask) / denom,
            "tokens": count}


def batch_metrics(params: dict, batch: dict, cfg: LlamaConfig, lora: LoraConfig | None = None) -> dict:
    tokens = batch["tokens"]
    logits = apply(params, tokens[:, :-1], cfg, lora)
    return next_token_metrics(logits, tokens[:, 1:], batch.get("mask"))


@functools.partial(jax.jit, static_argnames=("cfg", "opt", "lora"))
def train_step(trainable: dict, frozen: dict, opt_state: dict, batch: dict, *,
               cfg: LlamaConfig, opt: OptimConfig, lora: LoraConfig | None = None):
    """One AdamW step on the trainable part. Returns (trainable, opt_state, metrics)."""
    def loss_fn(t):
        metrics = batch_metrics(merge(t, frozen), batch, cfg, lora)
        return metrics["loss"], metrics

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    trainable, opt_state, stats = adamw_update(grads, opt_state, trainable, opt)
    return trainable, opt_state, {**metrics, **stats}


@functools.partial(jax.jit, static_argnames=("cfg", "lora"))
def eval_step(params: dict, batch: dict, *, cfg: LlamaConfig, lora: LoraConfig | None = None) -> dict:
    return batch_metrics(params, batch, cfg, lora)

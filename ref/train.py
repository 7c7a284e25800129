"""Training semantics: next-token loss and accuracy, and one optimizer step.

A batch is {"tokens": int [B, T + 1], "mask": optional float [B, T]}: position t
predicts tokens[:, t + 1], and the mask (1 = counts) selects which predictions
count (e.g. to leave out padding). Only the trainable part of the params is
differentiated; the frozen part is passed through untouched, so it comes out of
a step bit-identical. The public functions check shapes and dtypes with chex (static:
nothing of them is left in the traced step).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from mode_jax.ref.btx import btx_hidden, router_stats
from mode_jax.ref.config import LlamaConfig, LoraConfig, OptimConfig
from mode_jax.ref.llama import check_tokens, lm_head
from mode_jax.ref.lora_moe import lora_moe_hidden
from mode_jax.ref.methods import apply, merge
from mode_jax.ref.mode import mode_hidden
from mode_jax.ref.optim import adamw_update


def token_stats(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per position: (argmax == target [B, T] bool, cross-entropy [B, T] float32)."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)                                          # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]   # [B, T]
    return jnp.argmax(logits, axis=-1) == targets, logz - target_logit


def next_token_metrics(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> dict:
    """Masked mean cross-entropy and argmax accuracy.

    logits [B, T, V], targets int [B, T], mask [B, T] (None = all count).
    Returns {"loss", "accuracy", "tokens"} (tokens = number of counted positions).
    """
    chex.assert_rank(logits, 3, custom_message="next_token_metrics: logits must be [B, T, V]",
                     exception_type=ValueError)
    chex.assert_shape(targets, logits.shape[:2], custom_message="next_token_metrics: targets must be [B, T] "
                      "as the logits' first two axes", exception_type=ValueError)
    chex.assert_type(targets, int, custom_message="next_token_metrics: targets must be integer ids",
                     exception_type=ValueError)
    if mask is not None:
        chex.assert_shape(mask, targets.shape, custom_message="next_token_metrics: mask must be [B, T] as targets",
                          exception_type=ValueError)
    if mask is None:
        mask = jnp.ones(targets.shape, jnp.float32)
    mask = mask.astype(jnp.float32)
    correct, nll = token_stats(logits, targets)
    correct = correct.astype(jnp.float32)
    count = jnp.sum(mask)
    denom = jnp.maximum(count, 1.0)
    return {"loss": jnp.sum(nll * mask) / denom,
            "accuracy": jnp.sum(correct * mask) / denom,
            "tokens": count}


def batch_metrics(params: dict, batch: dict, cfg: LlamaConfig, lora: LoraConfig | None = None, *,
                  with_routing: bool = False, with_tokens: bool = False, gate_top_k: int | None = None) -> dict:
    """next_token_metrics of the model on `batch`; with_routing adds "routing" (each MoDE
    block's mean gate probabilities [n_blocks, E]; LoRA-MoE's per layer, [L, N]; None for other models), with_tokens
    "token_correct" and "token_nll" ([B, T] each, `token_stats`). `gate_top_k`: MoDE's
    top-k gate (ref.mode.top_k_logits; None: dense)."""
    tokens = batch["tokens"]                                                          # [B, T + 1]
    check_tokens(tokens, "batch_metrics: batch['tokens']")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    routing = aux = None
    if "btx" in params:
        h, router_logits = btx_hidden(params, inputs, cfg, return_logits=True)   # [B, T, E] per layer
        logits = lm_head(params["backbone"], h, cfg)
        stats = router_stats(router_logits)                                     # None for stage 1
        routing, aux = stats["routing"], stats["aux_loss"]                      # [L, E], scalar
    elif with_routing and "blocks" in params and "lora" not in params:
        h, probs = mode_hidden(params, inputs, cfg, return_probs=True, gate_top_k=gate_top_k)   # [B, T, E] per block
        logits = lm_head(params["backbone"], h, cfg)
        routing = jnp.stack([p.mean(axis=(0, 1)) for p in probs])               # [n_blocks, E]
    elif with_routing and "lora_moe" in params:
        h, probs = lora_moe_hidden(params, inputs, cfg, lora, return_probs=True)   # [B, T, N] per layer
        logits = lm_head(params["backbone"], h, cfg)
        routing = jnp.stack([p.mean(axis=(0, 1)) for p in probs])               # [L, N]
    else:
        logits = apply(params, inputs, cfg, lora, gate_top_k=gate_top_k)
    out = next_token_metrics(logits, targets, batch.get("mask"))
    if aux is not None:
        out["aux_loss"] = aux       # BTX's load balancing: in the objective, never in "loss"
    if with_routing:
        out["routing"] = routing
    if with_tokens:
        out["token_correct"], out["token_nll"] = token_stats(logits, targets)
    return out


def objective(metrics: dict) -> jax.Array:
    """What training minimises: the next-token loss, plus an auxiliary loss where the
    model has one (BTX's load balancing, `batch_metrics`' "aux_loss")."""
    return metrics["loss"] + metrics["aux_loss"] if "aux_loss" in metrics else metrics["loss"]


@functools.partial(jax.jit, static_argnames=("cfg", "opt", "lora"))
def train_step(trainable: dict, frozen: dict, opt_state: dict, batch: dict, *,
               cfg: LlamaConfig, opt: OptimConfig, lora: LoraConfig | None = None):
    """One AdamW step on the trainable part. Returns (trainable, opt_state, metrics)."""
    def loss_fn(t):
        metrics = batch_metrics(merge(t, frozen), batch, cfg, lora)
        return objective(metrics), metrics

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    trainable, opt_state, stats = adamw_update(grads, opt_state, trainable, opt)
    return trainable, opt_state, {**metrics, **stats}


@functools.partial(jax.jit, static_argnames=("cfg", "lora"))
def eval_step(params: dict, batch: dict, *, cfg: LlamaConfig, lora: LoraConfig | None = None) -> dict:
    return batch_metrics(params, batch, cfg, lora)

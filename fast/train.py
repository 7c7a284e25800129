"""One optimizer step and one evaluation, on the stacked layout (as `ref/train.py`).

The optimizer is optax: global-norm clipping, then AdamW with `ref.optim`'s
learning-rate schedule, decoupled weight decay on matrices only (a leaf's
*per-layer* rank >= 2: stacked norms [L, D] are vectors), float32 moments. It is
tested equal to `ref.optim.adamw_update`.

Only the trainable part of the params is differentiated (`jax.value_and_grad` of
the trainable subtree, the frozen one closed over), so JAX builds no cotangent for
a frozen weight: no weight-gradient matmul for the frozen backbone, embedding or
LM head (the custom rules in fast/merge.py and fast/loss.py keep this true where
they stack frozen and trainable weights). The frozen part may be pre-cast to the
compute dtype once (`cast_frozen`): it never changes, and the step then reads half
the bytes. `train_step` donates the trainable params and the optimizer state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from mode_jax.fast import loss as fast_loss
from mode_jax.fast import model
from mode_jax.fast.config import FastConfig
from mode_jax.fast.params import per_layer_ndim
from mode_jax.ref.config import LlamaConfig, LoraConfig, OptimConfig
from mode_jax.ref.methods import merge
from mode_jax.ref.optim import global_norm, learning_rate


def decay_mask(params):
    """True for the leaves AdamW decays: matrices, by their per-layer rank (as ref/optim.py)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: per_layer_ndim(p, x) >= 2, params)


def make_optimizer(opt: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) (unless 0), then AdamW with ref's schedule."""
    adamw = optax.adamw(functools.partial(learning_rate, opt=opt), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                        weight_decay=opt.weight_decay, mask=decay_mask)
    if opt.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt.clip_norm), adamw)
    return adamw


def init_opt_state(trainable, opt: OptimConfig):
    return make_optimizer(opt).init(trainable)


def _step_count(opt_state) -> jax.Array:
    """Steps taken so far, read off the schedule's counter."""
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
              if isinstance(s, optax.ScaleByScheduleState)]
    return states[0].count


def cast_frozen(frozen, fast: FastConfig):
    """Floating frozen leaves in the compute dtype (they never update, so no master copy is needed)."""
    return jax.tree.map(lambda x: x.astype(fast.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)


def batch_metrics(params: dict, batch: dict, cfg: LlamaConfig, fast: FastConfig,
                  lora: LoraConfig | None = None) -> dict:
    """{"loss", "accuracy", "tokens"} of a batch {"tokens": [B, T + 1], "mask": [B, T] optional}."""
    tokens = batch["tokens"]
    backbone = params["backbone"]
    h = model.hidden(params, tokens[:, :-1], cfg, fast, lora)                      # [B, T, D]
    hn = model.final_norm(backbone, h, cfg)
    return fast_loss.next_token_metrics(hn, model.head_weight(backbone, cfg), tokens[:, 1:],
                                        batch.get("mask"), chunk=fast.loss_chunk)


def _train_step(trainable, frozen, opt_state, batch, *, cfg, opt, lora=None, fast=FastConfig()):
    def loss_fn(t):
        metrics = batch_metrics(merge(t, frozen), batch, cfg, fast, lora)
        return metrics["loss"], metrics

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    lr = learning_rate(_step_count(opt_state), opt)
    updates, opt_state = make_optimizer(opt).update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {**metrics, "lr": lr, "grad_norm": global_norm(grads)}


_STATIC = ("cfg", "opt", "lora", "fast")
train_step = jax.jit(_train_step, static_argnames=_STATIC, donate_argnums=(0, 2))
train_step.__doc__ = """One AdamW step on the trainable part; the trainable params and optimizer
state are donated. Returns (trainable, opt_state, metrics) with metrics as ref.train.train_step's
({"loss", "accuracy", "tokens", "lr", "grad_norm"})."""
# The same step without donation, for callers that reuse their inputs (tests, comparisons).
train_step_keep = jax.jit(_train_step, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=("cfg", "lora", "fast"))
def eval_step(params: dict, batch: dict, *, cfg: LlamaConfig, fast: FastConfig = FastConfig(),
              lora: LoraConfig | None = None) -> dict:
    return batch_metrics(params, batch, cfg, fast, lora)

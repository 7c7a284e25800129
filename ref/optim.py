"""AdamW from scratch: linear warmup, cosine decay, global-norm clipping.

Written out so the update is inspectable; `mode_jax.fast` uses optax and is
tested equal to this. Moments are float32 whatever the param dtype, and the
update follows Loshchilov & Hutter (decoupled weight decay, scaled by the
learning rate), applied to matrices only (ndim >= 2), not to norms or biases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mode_jax.ref.config import OptimConfig


def learning_rate(step: jax.Array, opt: OptimConfig) -> jax.Array:
    """lr at `step` (0-based): linear warmup to the peak over `warmup_steps`, then
    cosine decay to `peak * min_lr_ratio` at `total_steps`, flat after."""
    step = jnp.asarray(step, jnp.float32)
    warm = opt.learning_rate * (step + 1) / max(opt.warmup_steps, 1)
    decay_steps = max(opt.total_steps - opt.warmup_steps, 1)
    progress = jnp.clip((step - opt.warmup_steps) / decay_steps, 0.0, 1.0)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    decayed = opt.learning_rate * (opt.min_lr_ratio + (1.0 - opt.min_lr_ratio) * cosine)
    return jnp.where(step < opt.warmup_steps, warm, decayed)


def global_norm(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))


def clip_by_global_norm(grads, max_norm: float, norm: jax.Array | None = None):
    """Scale grads so their global norm is at most max_norm (0 disables). `norm`, when
    given, is used instead of this tree's own (e.g. a norm summed over several meshes)."""
    norm = global_norm(grads) if norm is None else norm
    if max_norm <= 0:
        return grads, norm
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), norm


def adamw_init(params) -> dict:
    zeros = lambda p: jnp.zeros(p.shape, jnp.float32)
    return {"mu": jax.tree.map(zeros, params), "nu": jax.tree.map(zeros, params),
            "count": jnp.zeros((), jnp.int32)}


def adamw_update(grads, state: dict, params, opt: OptimConfig, *, decay=None, grad_norm=None):
    """One AdamW step. Returns (new_params, new_state, {"lr", "grad_norm"}).

    decay: a tree of bools like params saying which leaves get weight decay; by default
    the matrices (ndim >= 2). Stacked layouts pass their own, since a stacked norm
    [L, D] has ndim 2 but is a vector per layer. grad_norm: the global norm to clip by,
    by default this tree's (MPMD passes the norm summed over every mesh's gradients).
    """
    grads, grad_norm = clip_by_global_norm(grads, opt.clip_norm, grad_norm)
    if decay is None:
        decay = jax.tree.map(lambda p: p.ndim >= 2, params)
    count = state["count"] + 1
    lr = learning_rate(state["count"], opt)
    mu = jax.tree.map(lambda m, g: opt.b1 * m + (1 - opt.b1) * g.astype(jnp.float32), state["mu"], grads)
    nu = jax.tree.map(lambda v, g: opt.b2 * v + (1 - opt.b2) * jnp.square(g.astype(jnp.float32)),
                      state["nu"], grads)
    c = count.astype(jnp.float32)
    mu_hat_scale, nu_hat_scale = 1.0 / (1 - opt.b1 ** c), 1.0 / (1 - opt.b2 ** c)

    def step(p, m, v, decayed):
        update = (m * mu_hat_scale) / (jnp.sqrt(v * nu_hat_scale) + opt.eps)
        if decayed and opt.weight_decay > 0:
            update = update + opt.weight_decay * p.astype(jnp.float32)
        return (p.astype(jnp.float32) - lr * update).astype(p.dtype)

    new_params = jax.tree.map(step, params, mu, nu, decay)
    return new_params, {"mu": mu, "nu": nu, "count": count}, {"lr": lr, "grad_norm": grad_norm}

"""The one optimizer of every train step (single device, SPMD, MPMD, and the "ref" backend).

optax, written as the chain `ref/optim.py` spells out from scratch (and tested equal to it):

    clip by the global norm   (0 disables; the norm may be given: MPMD sums it over meshes)
    scale_by_adam             (b1, b2, eps; bias-corrected moments)
    add_decayed_weights       (decoupled weight decay on matrices only: `decay_mask`)
    scale_by_schedule         (ref.optim.learning_rate's warmup + cosine shape, peak 1)
    scale by -peak            (the peak learning rate: a traced value, so one compiled
                               step serves every learning rate of a sweep)

The optimizer state has one structure for a given trainable tree whatever layout runs
it, so a checkpoint written by one layout restores on another (the state's moments are
trees shaped like the params: `map_moments` moves them between layouts).

    tx = make_optimizer(opt)
    state = tx.init(trainable)
    trainable, state, stats = apply(grads, state, trainable, opt)    # stats: lr, grad_norm
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from mode_jax.fast.params import per_layer_ndim
from mode_jax.ref.config import OptimConfig
from mode_jax.ref.optim import clip_by_global_norm, global_norm, learning_rate


def decay_mask(params):
    """True for the leaves AdamW decays: matrices, by their *per-layer* rank (a stacked norm
    [L, D] is a vector per layer), as `ref/optim.py` decays the unstacked arrays. Reads only
    a leaf's path, so it serves every layout's subtrees (MPMD's gates, experts)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: per_layer_ndim(p, x) >= 2, params)


def _clip(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """Global-norm clipping whose norm may be passed in (`grad_norm=`): a step whose
    gradients live on several meshes clips each part by the norm of the whole."""
    def update(updates, state, params=None, *, grad_norm=None, **_):
        return clip_by_global_norm(updates, max_norm, grad_norm)[0], state
    return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


def _scale_by_peak(default: float) -> optax.GradientTransformationExtraArgs:
    """Multiply by -peak learning rate, `peak_lr=` (traced) or the config's."""
    def update(updates, state, params=None, *, peak_lr=None, **_):
        lr = default if peak_lr is None else peak_lr
        return jax.tree.map(lambda u: -jnp.asarray(lr, u.dtype) * u, updates), state
    return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


def unit_schedule(opt: OptimConfig) -> Callable[[jax.Array], jax.Array]:
    """`ref.optim.learning_rate` divided by the peak: warmup and cosine shape only."""
    unit = dataclasses.replace(opt, learning_rate=1.0)
    return lambda count: learning_rate(count, unit)


def make_optimizer(opt: OptimConfig) -> optax.GradientTransformationExtraArgs:
    """The chain of the module docstring. Its state does not depend on clip_norm,
    weight_decay or the learning rate, so a run may resume with other values of them."""
    return optax.chain(
        _clip(opt.clip_norm),
        optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps, mu_dtype=jnp.float32),
        optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
        optax.scale_by_schedule(unit_schedule(opt)),
        _scale_by_peak(opt.learning_rate),
    )


def init(params, opt: OptimConfig):
    return make_optimizer(opt).init(params)


def step_count(opt_state) -> jax.Array:
    """Steps taken so far, read off the schedule's counter."""
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
              if isinstance(s, optax.ScaleByScheduleState)]
    return states[0].count


def apply(grads, opt_state, params, opt: OptimConfig, *, peak_lr=None, grad_norm=None):
    """One AdamW step: (params, opt_state, {"lr", "grad_norm"}). `peak_lr` overrides
    opt.learning_rate (traced); `grad_norm` is the norm to clip by (default: grads')."""
    norm = global_norm(grads) if grad_norm is None else grad_norm
    peak = opt.learning_rate if peak_lr is None else peak_lr
    lr = peak * unit_schedule(opt)(step_count(opt_state))
    updates, opt_state = make_optimizer(opt).update(grads, opt_state, params, grad_norm=norm, peak_lr=peak_lr)
    return optax.apply_updates(params, updates), opt_state, {"lr": lr, "grad_norm": norm}


def adam_state(opt_state) -> optax.ScaleByAdamState:
    """The AdamW part of a state: its step count and moments mu, nu (trees like the params)."""
    return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState))


def replace_adam(opt_state, adam: Callable, others: Callable = lambda x: x):
    """The state with its AdamW part `a` replaced by `adam(a)` and every other leaf (the
    schedule's step count) by `others(leaf)`: moves a state between layouts (split over
    MPMD meshes, gathered back)."""
    def one(s):
        return adam(s) if isinstance(s, optax.ScaleByAdamState) else others(s)
    return jax.tree.map(one, opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))


def map_moments(opt_state, moments: Callable, others: Callable = lambda x: x):
    """The state with each params-shaped tree (AdamW's mu and nu) replaced by
    `moments(tree)` and every other leaf (step counts) by `others(leaf)`."""
    return replace_adam(opt_state, lambda a: a._replace(count=others(a.count), mu=moments(a.mu),
                                                        nu=moments(a.nu)), others)


def shardings(params_like, param_shardings, opt: OptimConfig, scalar_sharding):
    """The shardings of the optimizer state of `params_like`: moments as their params,
    step counts `scalar_sharding` (replicated)."""
    like = jax.eval_shape(lambda p: init(p, opt), params_like)
    return map_moments(like, lambda _: param_shardings, lambda _: scalar_sharding)

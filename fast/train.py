"""The train step and the batch metrics on the stacked layout (the semantics of `ref/train.py`).

`step(metrics_fn, ...)` is the one train step of every single-mesh backend (one device,
the "ref" backend, SPMD): the gradient of `metrics_fn(params, batch)["loss"]` with
respect to the trainable part only, then `fast/optim.py`'s AdamW. The backends differ
only in `metrics_fn` (which forward runs: `batch_metrics` here, or ref/'s) and in where
the arrays live (`fast/steps.py` jits the step with the shardings, and has the one
eval step, over `batch_metrics` with routing and per-token statistics). MPMD
(`fast/mpmd.py`) computes its gradients per sub-mesh and calls the same optimizer.

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
from typing import Callable

import jax
import jax.numpy as jnp

from mode_jax.fast import btx as fast_btx
from mode_jax.fast import loss as fast_loss
from mode_jax.fast import lora_moe as fast_lora_moe
from mode_jax.fast import model
from mode_jax.fast import optim
from mode_jax.fast.config import FastConfig
from mode_jax.ref.config import LlamaConfig, LoraConfig, OptimConfig
from mode_jax.ref.llama import check_tokens
from mode_jax.ref.methods import merge
from mode_jax.ref.train import objective


def init_opt_state(trainable, opt: OptimConfig):
    return optim.init(trainable, opt)


GATE_KEYS = ("gate_w", "gate_b")


def to_compute(tree, dtype):
    """Floating leaves in `dtype`, except the gates (float32 by design, eq. 2)."""
    def cast(path, x):
        keep = getattr(path[-1], "key", None) in GATE_KEYS or not jnp.issubdtype(x.dtype, jnp.floating)
        return x if keep else x.astype(dtype)
    return jax.tree_util.tree_map_with_path(cast, tree)


def cast_frozen(frozen, fast: FastConfig):
    """Frozen leaves in the compute dtype (they never update, so no master copy is needed)."""
    return to_compute(frozen, fast.dtype)


def token_stats(hn: jax.Array, w: jax.Array, targets: jax.Array, *, chunk: int):
    """Per position (argmax == target [B, T], cross-entropy [B, T] float32) of logits
    hn @ w.T, one chunk of logits at a time, with fast/loss.py's chunking and
    compute-dtype argmax, so the counts add up to its accuracy."""
    hc, tc, _, n = fast_loss._chunks(hn, targets, jnp.ones(targets.shape, jnp.float32), chunk)
    wc = w.astype(hn.dtype)

    def body(_, xs):
        h_c, t_c = xs
        logits = fast_loss._chunk_logits(h_c, wc)                                  # [C, V]
        l32 = logits.astype(jnp.float32)
        nll = jax.nn.logsumexp(l32, axis=-1) - jnp.take_along_axis(l32, t_c[:, None], axis=-1)[:, 0]
        return None, (jnp.argmax(logits, axis=-1) == t_c, nll)

    _, (correct, nll) = jax.lax.scan(body, None, (hc, tc))
    return correct.reshape(-1)[:n].reshape(targets.shape), nll.reshape(-1)[:n].reshape(targets.shape)


def routing(probs: list[jax.Array]) -> jax.Array:
    """Each block's gate probabilities [B, T, E] -> their means [n_blocks, E] (what the gate learned)."""
    return jnp.stack([p.mean(axis=(0, 1)) for p in probs])


def batch_metrics(params: dict, batch: dict, cfg: LlamaConfig, fast: FastConfig,
                  lora: LoraConfig | None = None, *, with_routing: bool = False, with_tokens: bool = False,
                  hooks=None, gate_top_k: int | None = None) -> dict:
    """{"loss", "accuracy", "tokens"} of a batch {"tokens": [B, T + 1], "mask": [B, T] optional},
    plus "routing" ([n_blocks, E] for MoDE, [L, N] for LoRA-MoE, else None) if `with_routing` and "token_correct",
    "token_nll" ([B, T], `token_stats`) if `with_tokens`. `hooks`: the sharded steps'
    `model.Hooks` (MoDE only); `gate_top_k`: MoDE's top-k gate (None: dense)."""
    tokens = batch["tokens"]
    check_tokens(tokens, "batch_metrics: batch['tokens']")      # chex, while tracing: a one-line ValueError
    backbone = params["backbone"]
    probs = btx_stats = None
    if "btx" in params:
        h, btx_stats = fast_btx.btx_router_stats(params, tokens[:, :-1], cfg, fast)     # [B, T, D]
    elif "blocks" in params and "lora" not in params:
        out = model.mode_hidden(params, tokens[:, :-1], cfg, fast, return_probs=with_routing, hooks=hooks,
                                gate_top_k=gate_top_k)
        h, probs = out if with_routing else (out, None)                           # [B, T, D]
    elif with_routing and "lora_moe" in params:
        h, probs = fast_lora_moe.hidden_with_probs(params, tokens[:, :-1], cfg, fast, lora)   # [B, T, N] per layer
    else:
        h = model.hidden(params, tokens[:, :-1], cfg, fast, lora)                 # [B, T, D]
    hn = model.final_norm(backbone, h, cfg)
    w = model.head_weight(backbone, cfg)
    out = fast_loss.next_token_metrics(hn, w, tokens[:, 1:], batch.get("mask"), chunk=fast.loss_chunk,
                                       kernel=fast.loss_kernel)
    if with_routing:
        out["routing"] = None if probs is None else routing(probs)
    if btx_stats is not None:
        if btx_stats["aux_loss"] is not None:
            out["aux_loss"] = btx_stats["aux_loss"]     # BTX's load balancing (ref.train.objective)
        if with_routing:
            out["routing"] = btx_stats["routing"]       # [L, E] mean top-k weights (None in stage 1)
    if with_tokens:
        out["token_correct"], out["token_nll"] = token_stats(hn, w, tokens[:, 1:], chunk=fast.loss_chunk)
    return out


def step(metrics_fn: Callable, trainable, frozen, opt_state, batch, peak_lr=None, *, opt: OptimConfig):
    """One AdamW step on the trainable part: (trainable, opt_state, metrics) with metrics
    {"loss", "accuracy", "tokens", "lr", "grad_norm"} (as ref.train.train_step's).
    metrics_fn(params, batch) -> {"loss", ...}; `peak_lr` (traced) overrides opt.learning_rate."""
    def loss_fn(t):
        metrics = metrics_fn(merge(t, frozen), batch)
        return objective(metrics), metrics

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    trainable, opt_state, stats = optim.apply(grads, opt_state, trainable, opt, peak_lr=peak_lr)
    return trainable, opt_state, {**metrics, **stats}


def _train_step(trainable, frozen, opt_state, batch, peak_lr=None, *, cfg, opt, lora=None, fast=FastConfig()):
    metrics_fn = functools.partial(batch_metrics, cfg=cfg, fast=fast, lora=lora)
    return step(metrics_fn, trainable, frozen, opt_state, batch, peak_lr, opt=opt)


_STATIC = ("cfg", "opt", "lora", "fast")
train_step = jax.jit(_train_step, static_argnames=_STATIC, donate_argnums=(0, 2))
train_step.__doc__ = """One AdamW step of fast/model.py's forward on the trainable part; the
trainable params and optimizer state are donated. Returns (trainable, opt_state, metrics)."""
# The same step without donation, for callers that reuse their inputs (tests, comparisons).
train_step_keep = jax.jit(_train_step, static_argnames=_STATIC)

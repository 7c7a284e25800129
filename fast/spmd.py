"""One training step of a MoDE model sharded over one mesh of all devices (paper
section 3.3 and 4.4, "SPMD": every backbone and expert weight sharded over it).

The step is `ref/train.py`'s (masked next-token loss, gradients of the trainable
part only, `ref/optim.py`'s AdamW) over the stacked tree of `fast/params.py`,
computed by `fast/components.py` (ref/'s float32 layers, or fast/model.py's with a
`FastConfig`). Where each array lives is data: the rules
table of `fast/sharding.py` gives `in_shardings`/`out_shardings` for the
trainable and frozen params, the optimizer moments (sharded like their params)
and the batch (split over the mesh's batch axes). Block inputs are pinned to
the batch sharding, and the merge runs per batch shard under `shard_map`
(`fast/sharded_combine.py`), since the Pallas kernel cannot be partitioned by XLA.

    step = SpmdStep.build(params, cfg, opt, mesh=make_mesh((("fsdp", 4), ("tp", 2))),
                          batch_size=B, seq_len=T, fast=FastConfig())
    trainable, frozen, opt_state = step.place(params)
    trainable, opt_state, metrics = step(trainable, frozen, opt_state, step.place_batch(batch))
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from mode_jax.fast.combine import gated_combine as platform_gated_combine
from mode_jax.fast.components import Numerics, mode_metrics
from mode_jax.fast.config import FastConfig
from mode_jax.fast.params import merge, partition
from mode_jax.fast.sharded_combine import sharded_gated_combine
from mode_jax.fast.sharding import (activation_sharding, batch_axes, logical_axes, place,
                                    replicated, rules_for_axes, shardings_for)
from mode_jax.ref.config import LlamaConfig, OptimConfig
from mode_jax.ref.optim import adamw_init, adamw_update

STACK_AXES = ("layers", "blocks", "experts")


def decay_mask(params):
    """True where `ref/optim.py` would decay the unstacked array: matrices only, so the
    stacking axes (layers, blocks, experts) do not count towards ndim >= 2."""
    return jax.tree.map(lambda axes: sum(a not in STACK_AXES for a in axes) >= 2,
                        logical_axes(params), is_leaf=lambda x: isinstance(x, tuple))


def batch_shardings(mesh, rules, *, batch_size: int, seq_len: int, masked: bool = False,
                    where: str = "mesh") -> dict:
    """Shardings of {"tokens": [B, T + 1], "mask"?: [B, T]}: rows split over the batch axes."""
    out = {"tokens": activation_sharding("tokens", (batch_size, seq_len + 1), mesh, rules, where=where)}
    if masked:
        out["mask"] = activation_sharding("tokens", (batch_size, seq_len), mesh, rules, where=where)
    return out


@dataclasses.dataclass
class SpmdStep:
    """A jitted, sharded `ref.train.train_step` for the stacked MoDE tree on one mesh."""

    mesh: jax.sharding.Mesh
    rules: dict
    trainable: str
    shardings: dict                 # {"trainable", "frozen", "opt", "batch"}: trees of NamedSharding
    step_fn: Callable

    @classmethod
    def build(cls, params, cfg: LlamaConfig, opt: OptimConfig, *, mesh, rules: dict | None = None,
              trainable: str = "experts_and_gates", batch_size: int, seq_len: int,
              masked: bool = False, fast: FastConfig | None = None, combine=platform_gated_combine,
              compiler_options: dict | None = None) -> "SpmdStep":
        """params: the stacked tree (arrays or ShapeDtypeStructs), only read for shapes.
        fast: None for ref/'s float32 layer math, a FastConfig for fast/model.py's
        (`components.Numerics`). Raises ValueError (before compiling) if a rule's mesh
        axes do not divide a dim. compiler_options go to `jax.jit` (tests: faster compiles)."""
        rules = rules_for_axes(mesh.axis_names) if rules is None else rules
        where = f"SPMD mesh {dict(mesh.shape)}"
        train_like, frozen_like = partition(params, trainable)
        t_sh = shardings_for(train_like, mesh, rules, where=where)
        shardings = {
            "trainable": t_sh,
            "frozen": shardings_for(frozen_like, mesh, rules, where=where),
            "opt": {"mu": t_sh, "nu": t_sh, "count": replicated(mesh)},
            "batch": batch_shardings(mesh, rules, batch_size=batch_size, seq_len=seq_len,
                                     masked=masked, where=where),
        }
        hidden = activation_sharding("hidden", (batch_size, seq_len, cfg.d_model), mesh, rules,
                                     where=where)
        token_axes = batch_axes(mesh, rules)
        decay = decay_mask(train_like)
        num = Numerics(cfg, fast)

        def merge_fn(logits, outputs):
            return sharded_gated_combine(logits, outputs, mesh=mesh, token_axes=token_axes,
                                         combine=combine)

        def constrain(x):
            return jax.lax.with_sharding_constraint(x, hidden)

        def step(train, frozen, opt_state, batch):
            def loss_fn(t):
                metrics = mode_metrics(merge(t, frozen), batch, num, combine=merge_fn,
                                       constrain=constrain)
                return metrics["loss"], metrics

            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(train)
            train, opt_state, stats = adamw_update(grads, opt_state, train, opt, decay=decay)
            return train, opt_state, {**metrics, **stats}

        out_metrics = replicated(mesh)
        step_fn = jax.jit(step,
                          in_shardings=(t_sh, shardings["frozen"], shardings["opt"], shardings["batch"]),
                          out_shardings=(t_sh, shardings["opt"], out_metrics),
                          donate_argnums=(0, 2), compiler_options=compiler_options)
        return cls(mesh=mesh, rules=rules, trainable=trainable, shardings=shardings, step_fn=step_fn)

    def place(self, params) -> tuple[dict, dict, dict]:
        """(trainable, frozen, opt_state) of `params`, laid out on the mesh."""
        train, frozen = partition(params, self.trainable)
        train = place(train, self.shardings["trainable"])
        opt_state = jax.jit(adamw_init, out_shardings=self.shardings["opt"])(train)
        return train, place(frozen, self.shardings["frozen"]), opt_state

    def place_batch(self, batch: dict) -> dict:
        return place(batch, {k: self.shardings["batch"][k] for k in batch})

    def __call__(self, trainable, frozen, opt_state, batch):
        """One step. Donates `trainable` and `opt_state`. Returns (trainable, opt_state, metrics)."""
        return self.step_fn(trainable, frozen, opt_state, batch)


def gather(tree, device=None):
    """Bring a (sharded) tree to one device, e.g. to compare against the reference
    (single-process only: in a multi-process run use `multihost_utils.process_allgather`)."""
    device = device or jax.devices()[0]
    return jax.device_put(tree, jax.sharding.SingleDeviceSharding(device))

"""One training step of a MoDE model sharded over one mesh of all devices (paper
section 3.3 and 4.4, "SPMD": every backbone and expert weight sharded over it).

The step is `fast/train.py`'s `step` (the one every single-mesh backend runs: masked
next-token loss, gradients of the trainable part only, `fast/optim.py`'s AdamW) over
`fast/model.py`'s MoDE forward, with the fused merge by default. Where each array lives
is data: the rules table of `fast/sharding.py` gives `in_shardings`/`out_shardings` for
the trainable and frozen params, the optimizer state (moments sharded like their
params) and the batch (split over the mesh's batch axes). The forward's `Hooks` pin
each block's input and output to the batch sharding and, with
`FastConfig(merge="stacked")`, run the Pallas combine per batch shard under `shard_map`
(`fast/sharded_combine.py`), since XLA cannot partition a kernel. The optimizer state
has the single-device structure, so a checkpoint moves between meshes and one device.

    step = SpmdStep.build(params, cfg, opt, mesh=make_mesh((("fsdp", 4), ("tp", 2))),
                          batch_size=B, seq_len=T, fast=FastConfig())
    trainable, frozen, opt_state = step.place(params)
    trainable, opt_state, metrics = step(trainable, frozen, opt_state, step.place_batch(batch))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import chex
import jax

from mode_jax.fast import optim
from mode_jax.fast.combine import gated_combine as platform_gated_combine
from mode_jax.fast.config import FastConfig
from mode_jax.fast.model import Hooks
from mode_jax.fast.params import partition
from mode_jax.fast.sharded_combine import sharded_gated_combine
from mode_jax.fast.sharding import (activation_sharding, batch_axes, place, replicated,
                                    rules_for_axes, shardings_for)
from mode_jax.fast.train import batch_metrics, step as train_step
from mode_jax.ref.config import LlamaConfig, OptimConfig
from mode_jax.ref.llama import check_tokens


def batch_shardings(mesh, rules, *, batch_size: int, seq_len: int, masked: bool = False,
                    where: str = "mesh") -> dict:
    """Shardings of {"tokens": [B, T + 1], "mask"?: [B, T]}: rows split over the batch axes."""
    out = {"tokens": activation_sharding("tokens", (batch_size, seq_len + 1), mesh, rules, where=where)}
    if masked:
        out["mask"] = activation_sharding("tokens", (batch_size, seq_len), mesh, rules, where=where)
    return out


def check_batch(batch: dict, *, batch_size: int, seq_len: int, masked: bool, where: str) -> None:
    """The batch a sharded step was built for: tokens int [B, T + 1] and, if `masked`, mask
    [B, T] (chex: a one-line ValueError before anything is placed)."""
    check_tokens(batch["tokens"], f"{where}: batch['tokens']")
    chex.assert_shape(batch["tokens"], (batch_size, seq_len + 1), exception_type=ValueError,
                      custom_message=f"{where}: batch['tokens'] must be [B, T + 1] = {(batch_size, seq_len + 1)}")
    if masked != ("mask" in batch):
        raise ValueError(f"{where}: the step was built {'with' if masked else 'without'} a mask, "
                         f"the batch has {'one' if 'mask' in batch else 'none'}")
    if masked:
        chex.assert_shape(batch["mask"], (batch_size, seq_len), exception_type=ValueError,
                          custom_message=f"{where}: batch['mask'] must be [B, T] = {(batch_size, seq_len)}")


def mesh_hooks(mesh, rules, *, batch_size: int, seq_len: int, d_model: int, combine=platform_gated_combine,
               where: str = "mesh") -> Hooks:
    """The MoDE forward's hooks on `mesh`: block activations pinned to the batch sharding,
    the stacked merge run per batch shard (`combine`: the per-shard merge)."""
    hidden = activation_sharding("hidden", (batch_size, seq_len, d_model), mesh, rules, where=where)
    token_axes = batch_axes(mesh, rules)
    return Hooks(constrain=lambda x: jax.lax.with_sharding_constraint(x, hidden),
                 combine=functools.partial(sharded_gated_combine, mesh=mesh, token_axes=token_axes,
                                           combine=combine))


@dataclasses.dataclass
class SpmdStep:
    """A jitted, sharded train step for the stacked MoDE tree on one mesh."""

    mesh: jax.sharding.Mesh
    rules: dict
    trainable: str
    opt: OptimConfig
    shardings: dict                 # {"trainable", "frozen", "opt", "batch"}: trees of NamedSharding
    step_fn: Callable
    check_batch: Callable = lambda batch: None     # batch -> None or ValueError (`check_batch`)

    @classmethod
    def build(cls, params, cfg: LlamaConfig, opt: OptimConfig, *, mesh, rules: dict | None = None,
              trainable: str = "experts_and_gates", batch_size: int, seq_len: int,
              masked: bool = False, fast: FastConfig = FastConfig(), combine=platform_gated_combine,
              compiler_options: dict | None = None) -> "SpmdStep":
        """params: the stacked tree (arrays or ShapeDtypeStructs), only read for shapes.
        fast: how fast/model.py computes (FastConfig.exact() for float32). Raises ValueError
        (before compiling) if a rule's mesh axes do not divide a dim. compiler_options go
        to `jax.jit` (tests: faster compiles)."""
        rules = rules_for_axes(mesh.axis_names) if rules is None else rules
        where = f"SPMD mesh {dict(mesh.shape)}"
        train_like, frozen_like = partition(params, trainable)
        t_sh = shardings_for(train_like, mesh, rules, where=where)
        shardings = {
            "trainable": t_sh,
            "frozen": shardings_for(frozen_like, mesh, rules, where=where),
            "opt": optim.shardings(train_like, t_sh, opt, replicated(mesh)),
            "batch": batch_shardings(mesh, rules, batch_size=batch_size, seq_len=seq_len,
                                     masked=masked, where=where),
        }
        hooks = mesh_hooks(mesh, rules, batch_size=batch_size, seq_len=seq_len, d_model=cfg.d_model,
                           combine=combine, where=where)
        metrics_fn = functools.partial(batch_metrics, cfg=cfg, fast=fast, hooks=hooks)
        step_fn = jax.jit(functools.partial(train_step, metrics_fn, opt=opt),
                          in_shardings=(t_sh, shardings["frozen"], shardings["opt"], shardings["batch"],
                                        replicated(mesh)),
                          out_shardings=(t_sh, shardings["opt"], replicated(mesh)),
                          donate_argnums=(0, 2), compiler_options=compiler_options)
        return cls(mesh=mesh, rules=rules, trainable=trainable, opt=opt, shardings=shardings, step_fn=step_fn,
                   check_batch=functools.partial(check_batch, batch_size=batch_size, seq_len=seq_len,
                                                 masked=masked, where=where))

    def init_opt(self, trainable):
        """The optimizer state of (placed) `trainable`, laid out like it."""
        return jax.jit(functools.partial(optim.init, opt=self.opt), out_shardings=self.shardings["opt"])(trainable)

    def place(self, params) -> tuple[dict, dict, dict]:
        """(trainable, frozen, opt_state) of `params`, laid out on the mesh."""
        train, frozen = partition(params, self.trainable)
        train = place(train, self.shardings["trainable"])
        return train, place(frozen, self.shardings["frozen"]), self.init_opt(train)

    def place_batch(self, batch: dict) -> dict:
        self.check_batch(batch)
        return place(batch, {k: self.shardings["batch"][k] for k in batch})

    def __call__(self, trainable, frozen, opt_state, batch, peak_lr=None):
        """One step. Donates `trainable` and `opt_state`. Returns (trainable, opt_state, metrics)."""
        peak_lr = self.opt.learning_rate if peak_lr is None else peak_lr
        return self.step_fn(trainable, frozen, opt_state, batch, peak_lr)


def gather(tree, device=None):
    """Bring a (sharded) tree to one device, e.g. to compare against the reference
    (single-process only: in a multi-process run use `multihost_utils.process_allgather`)."""
    device = device or jax.devices()[0]
    return jax.device_put(tree, jax.sharding.SingleDeviceSharding(device))

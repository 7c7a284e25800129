"""Training steps over several devices for the pipeline commands: `--mesh` (SPMD, one
mesh of all devices) and `--placement` (MPMD, the backbone and the experts on their own
sub-meshes), wrapping `mode_jax.fast.spmd.SpmdStep` and `mode_jax.fast.mpmd.MpmdStep` in
the `engine.Steps` interface that `engine.train_loop` drives.

Both shard MoDE models only (the methods that train experts and/or gates: stage1,
stage2, stage2_frozen, uninit); full and LoRA fine-tuning train on one device. Both
compute ref/'s step (AdamW of `ref/optim.py`, masked next-token loss) with fast/'s
layer math in the run's compute dtype, and are tested equal to the single-device step
(tests/test_pipeline_sharded.py). Checkpoints hold each backend's own optimizer state,
so a run resumes with the same --mesh / --placement it started with (another layout is
refused by the checkpoint's structure check).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from mode_jax.errors import UserError
from mode_jax.pipeline.engine import Steps
from mode_jax.ref.config import LlamaConfig, OptimConfig
from mode_jax.ref.methods import METHODS
from mode_jax.ref.optim import adamw_init

SHARDED_TRAINABLE = ("experts_and_gates", "gates")


def shardable(method: str) -> bool:
    return METHODS[method] in SHARDED_TRAINABLE


def check_method(method: str) -> None:
    """Refuse --mesh / --placement for a method they do not shard."""
    if not shardable(method):
        raise UserError(f"--mesh / --placement shard MoDE training (experts and gates); method {method!r} "
                        f"trains {METHODS[method]!r} on one device: drop the flag")


def sharded_steps(parallelism, method: str, cfg: LlamaConfig, *, opt: OptimConfig, compute_dtype: str,
                  expert_layers: int | None, params_like: dict, batch_size: int, seq_len: int, eval_steps,
                  layer_loop: str = "auto"):
    """`engine.Steps` for `parallelism` (a `mode_jax.distributed.Parallelism`).
    params_like: the reference-layout params (read for shapes); eval_steps: the
    single-device Steps whose eval_step evaluates the gathered model."""
    from mode_jax.fast import params as fast_params
    from mode_jax.fast.config import FastConfig

    check_method(method)
    trainable = METHODS[method]
    fast = FastConfig(compute_dtype=compute_dtype, layer_loop=layer_loop)
    to_fast = functools.partial(fast_params.to_fast, expert_layers=expert_layers)
    like = jax.eval_shape(to_fast, params_like)
    common = dict(eval_step=eval_steps.eval_step, to_backend=to_fast)
    try:
        if parallelism.kind == "spmd":
            return _spmd_steps(parallelism, like, cfg, opt, trainable, fast, batch_size, seq_len, common)
        return _mpmd_steps(parallelism, like, cfg, opt, trainable, fast, batch_size, seq_len, common)
    except ValueError as err:          # a layout that does not fit the model: before any compile
        raise UserError(str(err)) from None


def _host(tree):
    """The (sharded) tree as host numpy arrays; across processes, gathered from all of them."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # Only arrays spread over several processes are gathered: process_allgather would
        # stack a process-local array (the frozen backbone each process holds) once per process.
        def one(x):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                return np.asarray(multihost_utils.process_allgather(x, tiled=True))
            return np.asarray(x)
        return jax.tree.map(one, tree)
    return jax.tree.map(np.asarray, tree)


def _spmd_steps(par, like, cfg, opt, trainable, fast, batch_size, seq_len, common):
    from mode_jax.fast.params import partition, to_ref
    from mode_jax.fast.sharding import place
    from mode_jax.fast.spmd import SpmdStep
    from mode_jax.fast.train import cast_frozen

    step = SpmdStep.build(like, cfg, opt, mesh=par.mesh, rules=par.rules, trainable=trainable,
                          batch_size=batch_size, seq_len=seq_len, fast=fast)
    sh = step.shardings
    init = jax.jit(adamw_init, out_shardings=sh["opt"])

    def split(params, _):
        train, frozen = partition(params, trainable)
        return place(train, sh["trainable"]), frozen

    return Steps(init_opt=lambda t: init(place(t, sh["trainable"])),
                 train_step=lambda t, f, o, b: step(t, f, o, step.place_batch(b)),
                 prepare_frozen=lambda f: place(cast_frozen(f, fast), sh["frozen"]),
                 backend="spmd", from_backend=lambda p: to_ref(_host(p)),
                 place=lambda t, o: (place(t, sh["trainable"]), place(o, sh["opt"])),
                 split=split, **common)


def _mpmd_steps(par, like, cfg, opt, trainable, fast, batch_size, seq_len, common):
    """MpmdStep keeps one state {"backbone", "gates", "experts": [per mesh], "opt"}; the
    loop's (trainable, frozen, opt_state) are its pieces: trainable = {"gates", "experts"},
    frozen = {"backbone"}, opt_state = its "opt"."""
    from mode_jax.fast.mpmd import MpmdStep
    from mode_jax.fast.params import to_ref
    from mode_jax.fast.sharding import place, replicated

    step = MpmdStep(like, cfg, opt, par.placement, trainable=trainable, batch_size=batch_size,
                    seq_len=seq_len, fast=fast)
    sh, meshes = step.shardings, step.meshes
    placed_opt = {}

    def split(params, _):
        state = step.place(params)
        placed_opt["opt"] = state["opt"]
        return {"gates": state["gates"], "experts": state["experts"]}, {"backbone": state["backbone"]}

    def train_step(t, f, o, batch):
        state, metrics = step({**t, **f, "opt": o}, step.place_batch(batch))
        return {"gates": state["gates"], "experts": state["experts"]}, state["opt"], metrics

    def opt_shardings(params_sh, mesh):
        return {"mu": params_sh, "nu": params_sh, "count": replicated(mesh)}

    def place_all(t, o):
        t = {"gates": place(t["gates"], sh["gates"]),
             "experts": [place(e, s) for e, s in zip(t["experts"], sh["experts"])]}
        o = {"gates": place(o["gates"], opt_shardings(sh["gates"], meshes[0].mesh)),
             "experts": [None if e is None else place(e, opt_shardings(s, m.mesh))
                         for e, s, m in zip(o["experts"], sh["experts"], meshes[1:])]}
        return t, o

    def join(t, f):
        return step.gather({**t, **f})

    return Steps(init_opt=lambda t: placed_opt["opt"], train_step=train_step, prepare_frozen=lambda f: f,
                 backend="mpmd", from_backend=lambda p: to_ref(_host(p)), split=split, join=join,
                 place=place_all, **common)

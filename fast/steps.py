"""The step factory: train and eval steps for every backend behind one interface.

`make_steps(method, cfg, ...)` is the one place a step backend is chosen (the kernels
inside a step are chosen per platform in fast/combine.py and fast/attention.py):

    "ref"    ref/'s forward (ref/llama.py, ref/mode.py) in the compute dtype: the reference
    "fast"   fast/model.py's forward on one device ("auto" means this one)
    "spmd"   fast/model.py's forward sharded over one mesh (`parallelism.kind == "spmd"`)
    "mpmd"   backbone and experts on their own sub-meshes (`parallelism.kind == "mpmd"`)

Every backend holds params in the stacked layout of `fast/params.py` (the "ref"
backend unstacks them inside its jitted step), trains with `fast/optim.py`'s optax
AdamW and keeps its optimizer state in the same structure ("ref", "fast" and "spmd"
identically; MPMD per sub-mesh, converted to that structure for checkpoints by
`Steps.state_out` / `state_in`), and runs `fast/train.py`'s `step` (MPMD: its own
per-mesh backward, then the same optimizer). The peak learning rate is a traced input
of the compiled step, so steps built for another learning rate reuse the compilation.
The loops of `mode_jax/pipeline/engine.py` drive a `Steps` without knowing which
backend it holds. The sharded backends shard MoDE training (experts and/or gates);
other methods, and every evaluation, run on one device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax

from mode_jax.fast import optim
from mode_jax.fast import train as fast_train
from mode_jax.fast.config import FastConfig
from mode_jax.fast.mpmd import MpmdStep
from mode_jax.fast.params import partition, to_fast, to_ref
from mode_jax.fast.sharding import host, place
from mode_jax.fast.spmd import SpmdStep
from mode_jax.ref import train as ref_train
from mode_jax.ref.config import LlamaConfig, LoraConfig, OptimConfig
from mode_jax.ref.methods import METHODS, merge

BACKENDS = ("auto", "ref", "fast")       # one device; "spmd" / "mpmd" follow from a parallelism
SHARDED_TRAINABLE = ("experts_and_gates", "gates")
EVAL_KEYS = ("loss", "accuracy", "routing", "token_correct", "token_nll")


@dataclasses.dataclass(frozen=True)
class Steps:
    init_opt: Callable          # trainable -> optimizer state
    train_step: Callable        # (trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics)
    eval_step: Callable         # (params, tokens [B, T+1]) -> {"loss", "accuracy", "routing" | None,
    #                             "token_correct", "token_nll" [B, T]}
    prepare_frozen: Callable    # frozen params -> frozen params as the step wants them (dtype)
    backend: str                # "ref", "fast", "spmd" or "mpmd"
    to_backend: Callable        # reference-layout params -> the layout the steps take
    from_backend: Callable      # and back (exact: arrays are only stacked / unstacked)
    # Sharded steps lay their state out on device meshes: split (params in the backend
    # layout, trainable partition name) -> (trainable, frozen); join (trainable, frozen) ->
    # params in the backend layout; place (trainable, opt_state) -> the same laid out (after
    # init or a checkpoint restore). Defaults: one device.
    split: Callable = lambda params, trainable: partition(params, trainable)
    join: Callable = lambda trainable, frozen: merge(trainable, frozen)
    place: Callable = lambda trainable, opt_state: (trainable, opt_state)
    # What a checkpoint holds: state_out (trainable, opt_state) -> the same in the structure
    # one device holds them (every backend's is then one: a checkpoint restores on any
    # layout); state_in is its inverse, before `place`. Identities but for MPMD, whose
    # state lives per sub-mesh.
    state_out: Callable = lambda trainable, opt_state: (trainable, opt_state)
    state_in: Callable = lambda trainable, opt_state: (trainable, opt_state)


@dataclasses.dataclass(frozen=True)
class Forward:
    """Which forward a step differentiates (hashable: a static argument of the jitted steps)."""
    cfg: LlamaConfig
    lora: LoraConfig | None
    fast: FastConfig                # the compute dtype (both forwards) and how fast/ computes
    reference: bool = False         # ref/'s forward on the unstacked params
    gate_top_k: int | None = None   # MoDE's top-k gate (ModeConfig.gate_top_k; None: dense)

    def metrics(self, params: dict, batch: dict, **kw) -> dict:
        """`batch_metrics` (fast/train.py or ref/train.py) of the stacked `params`."""
        if self.gate_top_k is not None:
            kw = {**kw, "gate_top_k": self.gate_top_k}
        if self.reference:
            ref_params = to_ref(fast_train.to_compute(params, self.fast.dtype))
            return ref_train.batch_metrics(ref_params, batch, self.cfg, self.lora, **kw)
        return fast_train.batch_metrics(params, batch, self.cfg, self.fast, self.lora, **kw)


@functools.partial(jax.jit, static_argnames=("forward", "opt"), donate_argnums=(0, 2))
def train_step(trainable, frozen, opt_state, batch, peak_lr, *, forward: Forward, opt: OptimConfig):
    """`fast.train.step` of `forward` on one device (trainable and optimizer state donated)."""
    return fast_train.step(forward.metrics, trainable, frozen, opt_state, batch, peak_lr, opt=opt)


@functools.partial(jax.jit, static_argnames=("forward",))
def eval_step(params, tokens, *, forward: Forward) -> dict:
    """Mean loss and accuracy of tokens [B, T + 1], per-token correctness and loss [B, T],
    and for MoDE the mean gate weights [n_blocks, E] (None otherwise)."""
    m = forward.metrics(params, {"tokens": tokens}, with_routing=True, with_tokens=True)
    return {k: m[k] for k in EVAL_KEYS}


def shardable(method: str) -> bool:
    """Whether the sharded backends train `method` (MoDE: experts and/or gates)."""
    return METHODS[method] in SHARDED_TRAINABLE


def make_steps(method: str, cfg: LlamaConfig, *, opt: OptimConfig, lora: LoraConfig | None = None,
               compute_dtype: str = "float32", backend: str = "auto", expert_layers: int | None = None,
               layer_loop: str = "auto", parallelism=None, params_like: dict | None = None,
               batch_size: int | None = None, seq_len: int | None = None, gate_top_k: int | None = None) -> Steps:
    """Train/eval steps for `method` ("stage1", "stage2", ..., "full", "lora").

    backend: "ref", or "fast" / "auto" (the same). parallelism: None (one device) or a
    `mode_jax.distributed.Parallelism`; for a shardable method it gives "spmd" or "mpmd"
    steps, which need params_like (reference-layout params or their shapes), batch_size
    and seq_len, and raise ValueError before compiling when the layout does not fit.
    Callers hold params in the reference layout; `Steps.to_backend` / `from_backend` convert.
    gate_top_k: MoDE's top-k gate (ref.mode.top_k_logits; None: dense), one device only."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    fast = FastConfig(compute_dtype=compute_dtype, layer_loop=layer_loop)
    forward = Forward(cfg, lora, fast, reference=backend == "ref", gate_top_k=gate_top_k)
    to_backend = functools.partial(to_fast, expert_layers=expert_layers)
    # The peak learning rate is traced: the static config holds a unit one.
    unit = dataclasses.replace(opt, learning_rate=1.0)
    single = Steps(init_opt=functools.partial(optim.init, opt=opt),
                   train_step=functools.partial(train_step, peak_lr=opt.learning_rate, forward=forward, opt=unit),
                   eval_step=functools.partial(eval_step, forward=forward),
                   prepare_frozen=lambda frozen: fast_train.to_compute(frozen, fast.dtype),
                   backend="ref" if forward.reference else "fast", to_backend=to_backend, from_backend=to_ref)
    if parallelism is None or not shardable(method):
        return single
    if gate_top_k is not None:
        raise ValueError("mode.gate_top_k (top-k gating) trains on one device: drop --mesh / --placement")
    like = jax.eval_shape(to_backend, params_like)
    build = _spmd_steps if parallelism.kind == "spmd" else _mpmd_steps
    return build(parallelism, like, cfg, opt, METHODS[method], fast, batch_size, seq_len, single)


# Sharded steps evaluate on one device (`single.eval_step`, on the gathered model).

def _spmd_steps(par, like, cfg, opt, trainable, fast, batch_size, seq_len, single) -> Steps:
    step = SpmdStep.build(like, cfg, opt, mesh=par.mesh, rules=par.rules, trainable=trainable,
                          batch_size=batch_size, seq_len=seq_len, fast=fast)
    sh = step.shardings

    def split(params, _):
        train, frozen = partition(params, trainable)
        return place(train, sh["trainable"]), frozen

    return Steps(init_opt=lambda t: step.init_opt(place(t, sh["trainable"])),
                 train_step=lambda t, f, o, b: step(t, f, o, step.place_batch(b)),
                 prepare_frozen=lambda f: place(single.prepare_frozen(f), sh["frozen"]),
                 backend="spmd", from_backend=lambda p: to_ref(host(p)),
                 place=lambda t, o: (place(t, sh["trainable"]), place(o, sh["opt"])),
                 split=split, eval_step=single.eval_step, to_backend=single.to_backend)


def _mpmd_steps(par, like, cfg, opt, trainable, fast, batch_size, seq_len, single) -> Steps:
    """MpmdStep keeps one state {"backbone", "gates", "experts": [per mesh], "opt"}; the
    loop's (trainable, frozen, opt_state) are its pieces: trainable = {"gates", "experts"},
    frozen = {"backbone"}, opt_state = its "opt"."""
    step = MpmdStep(like, cfg, opt, par.placement, trainable=trainable, batch_size=batch_size,
                    seq_len=seq_len, fast=fast)
    sh = step.shardings
    template = partition(like, trainable)[0]          # the single-device trainable tree (shapes)
    placed = {}

    def split(params, _):
        state = step.place(params)
        placed["experts"] = state["experts"]          # frozen ones (trainable='gates') stay as placed
        return {"gates": state["gates"], "experts": state["experts"]}, {"backbone": state["backbone"]}

    def train_step(t, f, o, batch):
        state, metrics = step({**t, **f, "opt": o}, step.place_batch(batch))
        return {"gates": state["gates"], "experts": state["experts"]}, state["opt"], metrics

    def place_all(t, o):
        t = {"gates": place(t["gates"], sh["gates"]),
             "experts": [place(e, s) for e, s in zip(t["experts"], sh["experts"])]}
        o = {"gates": place(o["gates"], sh["opt"]["gates"]),
             "experts": [None if e is None else place(e, s) for e, s in zip(o["experts"], sh["opt"]["experts"])]}
        return t, o

    return Steps(init_opt=step.init_opt, train_step=train_step, prepare_frozen=lambda f: f,
                 backend="mpmd", from_backend=lambda p: to_ref(host(p)), split=split,
                 join=lambda t, f: step.gather({**t, **f}), place=place_all,
                 state_out=lambda t, o: step.to_canonical(t, o, template),
                 state_in=lambda t, o: step.from_canonical(t, o, placed["experts"]),
                 eval_step=single.eval_step, to_backend=single.to_backend)

"""SPMD (paper section 3.3): a MoDE training step sharded over one mesh of the 8 forced
CPU devices, per preset rules table, against `ref.train.train_step` run unsharded.
Each preset runs fast/model.py's MoDE forward (float32) with the fused merge or the
stacked one (the Pallas combine per batch shard under shard_map).

Two steps of each: the loss and accuracy of both, the global gradient norm, the
optimizer moments (after two steps mu = 0.1 * 0.9 * g1 + 0.1 * g2: the gradients,
tree-wide) and the updated parameters must match the reference.

Tolerance: the float32 row of tests/tolerances.py, unscaled for losses and
parameters (sharding only reorders float32 sums: measured differences ~1e-7
relative). The moments are compared after dividing by their largest entry, since
their absolute size (~1e-4) is below the table's atol, and at 10x the table: a
weight's gradient sums B*T = 128 per-token terms that partly cancel, and summing
them per shard then across shards moved single entries by up to 2e-5 of the
largest (measured, dp on 8 devices). AdamW divides by sqrt(v) + eps, so with a
tiny eps a gradient entry within rounding of zero would move its weight by up to
2 lr either way; eps = 1e-3 bounds a weight's error by lr * |dg| / eps (~1e-9 here)
while the larger gradients (10% are above 2e-3) are still normalised.

Everything, the reference included, compiles with XLA's backend optimisations off
(`FAST_COMPILE`): 2-3x faster on 2 cores; fast-math stays off, so only the order
of float32 sums can change, which the tolerances above already cover.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from mode_jax.fast.config import FastConfig
from mode_jax.fast.params import merge as fast_merge
from mode_jax.fast.params import to_fast, to_ref
from mode_jax.fast.sharding import (PRESET_RULES, PRESETS, logical_axes, make_mesh,
                                    shardings_for)
from mode_jax.fast.optim import adam_state, decay_mask
from mode_jax.fast.spmd import SpmdStep, gather
from mode_jax.ref.config import LlamaConfig, ModeConfig, OptimConfig
from mode_jax.ref.llama import layer_shapes
from mode_jax.ref.methods import merge as ref_merge
from mode_jax.ref.methods import partition
from mode_jax.ref.optim import adamw_init
from mode_jax.ref.train import train_step
from tests.tolerances import assert_close

# Vocab 128 and widths that 8 devices divide; 4 experts so `ep=2` divides too.
CFG = LlamaConfig.tiny(vocab_size=128)
MODE = ModeConfig(n_blocks=2, expert_layers=1, n_experts=4, expert_init="random")
OPT = OptimConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10, weight_decay=0.1, eps=1e-3)
BATCH, SEQ, STEPS = 8, 16, 2
MOMENT_SCALE = 10.0   # see the module docstring
# fast/model.py's layers and fast/loss.py's chunked loss in float32; 128 tokens in
# chunks of 48 (the last one padded). The merge fused with the down-projections (the
# default), or stacked and run per batch shard under shard_map (sharded_combine.py).
EXACT = FastConfig.exact(attention="xla", loss_chunk=48)
STACKED = FastConfig.exact(attention="xla", loss_chunk=48, merge="stacked")
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def make_params(seed: int = 0) -> dict:
    """A ref MoDE tree of fresh random numbers (numpy: no per-op compiles): N(0, 0.05)
    matrices, norms 1 + N(0, 0.1), gate weights N(0, 0.1) and biases N(0, 1)."""
    rng = np.random.default_rng(seed)

    def draw(name, shape):
        if name.endswith("norm"):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)

    def layers(n):
        return [{k: draw(k, s) for k, s in layer_shapes(CFG).items()} for _ in range(n)]

    e = MODE.n_experts + 1
    backbone = {"embed": draw("embed", (CFG.vocab_size, CFG.d_model)),
                "final_norm": draw("final_norm", (CFG.d_model,)), "layers": layers(CFG.n_layers)}
    blocks = [{"experts": [layers(MODE.expert_layers) for _ in range(MODE.n_experts)],
               "gate_w": (0.1 * rng.standard_normal((CFG.d_model, e))).astype(np.float32),
               "gate_b": rng.standard_normal((e,)).astype(np.float32)} for _ in range(MODE.n_blocks)]
    return {"backbone": backbone, "blocks": blocks}


def make_batches(seed: int = 1) -> list[dict]:
    """Random tokens and a random mask with about a quarter of the positions off."""
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(0, CFG.vocab_size, (BATCH, SEQ + 1), dtype=np.int32),
             "mask": (rng.uniform(size=(BATCH, SEQ)) > 0.25).astype(np.float32)} for _ in range(STEPS)]


@functools.lru_cache(maxsize=None)
def reference_run(trainable: str = "experts_and_gates"):
    """(initial ref params, batches, per-step ref metrics, final ref params, final ref opt state)."""
    params, batches = make_params(), make_batches()
    train, frozen = partition(params, trainable)
    opt_state = adamw_init(train)
    step = train_step.lower(train, frozen, opt_state, batches[0], cfg=CFG, opt=OPT).compile(FAST_COMPILE)
    metrics = []
    for batch in batches:
        train, opt_state, m = step(train, frozen, opt_state, batch)
        metrics.append(jax.device_get(m))
    return params, batches, metrics, ref_merge(train, frozen), opt_state


def assert_matches_reference(metrics, final_params, mu, nu, trainable: str = "experts_and_gates"):
    """metrics: per-step dicts; final_params: a stacked tree; mu, nu: stacked trainable trees."""
    _, _, ref_metrics, ref_params, ref_opt = reference_run(trainable)
    for step, (got, want) in enumerate(zip(metrics, ref_metrics)):
        for key in ("loss", "accuracy", "grad_norm", "lr"):
            assert_close(got[key], want[key], err_msg=f"step {step} {key}")
    got_params = to_ref(jax.tree.map(np.asarray, final_params))
    jax.tree.map_with_path(lambda p, a, b: assert_close(a, b, err_msg=jax.tree_util.keystr(p)),
                           got_params, ref_params)
    ref_train, _ = partition(ref_params, trainable)
    for name, got, want in (("mu", mu, ref_opt["mu"]), ("nu", nu, ref_opt["nu"])):
        got = to_ref(fast_merge(jax.tree.map(np.asarray, got), partition(to_fast(ref_params), trainable)[1]))
        got, _ = partition(got, trainable)

        def close(path, a, b, name=name):
            top = float(np.max(np.abs(b))) or 1.0
            assert_close(np.asarray(a) / top, np.asarray(b) / top, scale=MOMENT_SCALE,
                         err_msg=f"{name}{jax.tree_util.keystr(path)}")
        jax.tree.map_with_path(close, got, want)


def test_every_param_has_logical_axes_and_preset_tables_are_data():
    params = to_fast(make_params())
    axes = jax.tree.leaves(logical_axes(params), is_leaf=lambda x: isinstance(x, tuple))
    assert len(axes) == len(jax.tree.leaves(params))
    # The rules tables are plain dicts: spot-check what fsdp + tp does to a few arrays.
    assert PRESET_RULES["fsdp_tp"]["embed"] == ("fsdp",) and PRESET_RULES["fsdp_tp"]["mlp"] == ("tp",)
    assert PRESET_RULES["dp"] == {"batch": ("dp",)}
    mesh = make_mesh(PRESETS["fsdp_tp"])
    sh = shardings_for(params, mesh, PRESET_RULES["fsdp_tp"])
    assert sh["backbone"]["layers"]["wq"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tp")
    assert sh["backbone"]["embed"].spec == jax.sharding.PartitionSpec("tp", "fsdp")
    assert sh["blocks"]["experts"]["w_down"].spec == jax.sharding.PartitionSpec(None, None, None, "tp", "fsdp")
    assert sh["blocks"]["gate_b"].spec == jax.sharding.PartitionSpec(None, None)
    # Weight decay hits what ref/optim.py decays: matrices, not norms or biases, once unstacked.
    decay = decay_mask(params)
    assert decay["blocks"]["gate_w"] and not decay["blocks"]["gate_b"]
    assert decay["blocks"]["experts"]["wq"] and not decay["blocks"]["experts"]["attn_norm"]


@pytest.mark.parametrize("preset, fast", [("dp", STACKED), ("fsdp", EXACT), ("tp", STACKED),
                                          ("fsdp_tp", EXACT), ("dp_ep", EXACT)],
                         ids=["dp-stacked", "fsdp-fused", "tp-stacked", "fsdp_tp-fused", "dp_ep-fused"])
def test_spmd_preset_matches_reference(preset, fast):
    params, batches, *_ = reference_run()
    stacked = to_fast(params)
    mesh = make_mesh(PRESETS[preset])
    step = SpmdStep.build(stacked, CFG, OPT, mesh=mesh, rules=PRESET_RULES[preset], batch_size=BATCH,
                          seq_len=SEQ, masked=True, fast=fast, compiler_options=FAST_COMPILE)
    train, frozen, opt_state = step.place(stacked)
    assert train["blocks"]["experts"]["wq"].sharding == step.shardings["trainable"]["blocks"]["experts"]["wq"]
    metrics = []
    for batch in batches:
        train, opt_state, m = step(train, frozen, opt_state, step.place_batch(batch))
        metrics.append(jax.device_get(m))
    assert train["blocks"]["experts"]["wq"].sharding.mesh == mesh
    final = gather(fast_merge(train, frozen))
    adam = adam_state(opt_state)
    assert_matches_reference(metrics, final, gather(adam.mu), gather(adam.nu))


def test_misconfigured_mesh_fails_before_compiling():
    fast = to_fast(make_params())
    build = functools.partial(SpmdStep.build, fast, CFG, OPT, batch_size=BATCH, seq_len=SEQ)
    # tp over 8 devices: kv heads are K*H = 16 wide (divisible), the vocab of 97 is not.
    embed = np.random.default_rng(2).standard_normal((97, CFG.d_model)).astype(np.float32)
    odd_vocab = {**fast, "backbone": {**fast["backbone"], "embed": embed}}
    with pytest.raises(ValueError, match=r"dimension 0 \('vocab'\) of params/backbone/embed has size 97, "
                                         r"not divisible by mesh axes \('tp',\) of size 8"):
        SpmdStep.build(odd_vocab, CFG, OPT, mesh=make_mesh((("tp", 8),)), batch_size=BATCH, seq_len=SEQ)
    with pytest.raises(ValueError, match=r"'experts'.* has size 4, not divisible by mesh axes \('ep',\) of size 8"):
        build(mesh=make_mesh((("ep", 8),)))
    with pytest.raises(ValueError, match=r"\('batch'\) of tokens activations \(6, 17\) has size 6"):
        SpmdStep.build(fast, CFG, OPT, mesh=make_mesh((("dp", 8),)), batch_size=6, seq_len=SEQ)
    with pytest.raises(ValueError, match=r"unknown mesh axis 'model'"):
        make_mesh((("model", 8),))
    with pytest.raises(ValueError, match=r"hold 16 devices but 8 were given"):
        make_mesh((("dp", 4), ("tp", 4)))
    with pytest.raises(ValueError, match=r"would use mesh axis 'dp' twice"):
        build(mesh=make_mesh((("dp", 8),)), rules={"batch": ("dp",), "embed": ("dp",), "vocab": ("dp",)})

"""pytest-benchmark timings of a MoDE block forward+backward and of train steps: jitted ref/ vs fast/.

Tiny shapes so the suite runs on CPU in under a minute. Each benchmark checks its
result against the reference once (float32 compute, so the match is tight);
timings are recorded, never asserted. GPU numbers at the real shape come from
bench/gpu_train.py.

    python -m pytest bench/test_bench_model.py -q
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.fast import model as fast_model
from mode_jax.fast import params as P
from mode_jax.fast import train as FT
from mode_jax.fast.config import FastConfig
from mode_jax.ref import llama as ref_llama
from mode_jax.ref import mode as ref_mode
from mode_jax.ref import train as RT
from mode_jax.ref.config import LlamaConfig, LoraConfig, ModeConfig, OptimConfig
from mode_jax.ref.methods import METHODS, init_method, partition
from mode_jax.ref.optim import adamw_init
from tests.tolerances import BLOCK_FWD_BWD_RELATIVE_TO_MAX, assert_close_to_max

CFG = LlamaConfig.tiny(n_layers=6, d_model=64, d_ff=128, n_heads=4, n_kv_heads=2, head_dim=16)
MODE = ModeConfig(n_blocks=3, expert_layers=2, n_experts=2, expert_init="random")
LORA = LoraConfig(rank=4, alpha=8.0)
OPT = OptimConfig(learning_rate=1e-3, warmup_steps=2, total_steps=100)
BATCH, SEQ = 4, 64
FAST = FastConfig.exact(loss_chunk=128)


def _close(got, want):
    """Leaf by leaf, relative to each reference leaf's largest magnitude (float32 row of
    tests/tolerances.py's RELATIVE_TO_MAX)."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close_to_max(g, w)


def _close_block(got, want):
    """A block's forward + backward: `BLOCK_FWD_BWD_RELATIVE_TO_MAX` (tests/tolerances.py says why)."""
    rtol = BLOCK_FWD_BWD_RELATIVE_TO_MAX
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(1.0, float(np.max(np.abs(w)))),
                                   equal_nan=False)


@pytest.fixture(scope="module")
def mode_params():
    backbone = ref_llama.init_llama(jax.random.key(0), CFG)
    params = init_method("uninit", jax.random.key(1), backbone, CFG, mode=MODE)
    # Nonzero gates, so the merge is not the backbone alone.
    params["blocks"] = [{**b, "gate_w": 0.1 * jax.random.normal(jax.random.key(10 + i), b["gate_w"].shape)}
                        for i, b in enumerate(params["blocks"])]
    return params


# --- one MoDE block: forward + backward w.r.t. its input, experts and gate ---------------

def _ref_block(layers, block, x):
    h_bb = ref_llama.layers_forward(layers, x, CFG)
    h_ex = [ref_llama.layers_forward(e, x, CFG) for e in block["experts"]]
    return ref_mode.gated_combine(ref_mode.gate_logits(block, x), jnp.stack([h_bb, *h_ex]))


def _fwd_bwd(block_fn):
    def run(layers, block, x, dy):
        y, vjp = jax.vjp(lambda b, x: block_fn(layers, b, x), block, x)
        blk_ct, dx = vjp(dy)
        return y, dx, blk_ct["gate_w"]
    return jax.jit(run)


IMPLS = {
    "ref": None,
    "fast_fused": FastConfig.exact(merge="fused"),
    "fast_stacked": FastConfig.exact(merge="stacked"),
}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bench_block_fwd_bwd(benchmark, mode_params, impl):
    benchmark.group = "mode_block_fwd_bwd"
    per_block = CFG.n_layers // MODE.n_blocks
    ref_layers = mode_params["backbone"]["layers"][:per_block]
    ref_blk = mode_params["blocks"][0]
    kx, kdy = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (BATCH, SEQ, CFG.d_model))
    dy = jax.random.normal(kdy, (BATCH, SEQ, CFG.d_model))
    ref_fn = _fwd_bwd(_ref_block)
    if IMPLS[impl] is None:
        fn, args = ref_fn, (ref_layers, ref_blk, x, dy)
    else:
        fast = IMPLS[impl]
        fast_layers = P.backbone_to_fast({"layers": ref_layers})["layers"]
        fast_blk = jax.tree.map(lambda a: a[0], P.blocks_to_fast([ref_blk], ref_layers[0]))
        fn = _fwd_bwd(lambda layers, b, x: fast_model.block_forward(layers, b, x, CFG, fast))
        args = (fast_layers, fast_blk, x, dy)
    got = jax.block_until_ready(fn(*args))              # compile outside the timed rounds
    with jax.default_matmul_precision("highest"):
        _close_block(got, ref_fn(ref_layers, ref_blk, x, dy))
    benchmark(lambda: jax.block_until_ready(fn(*args)))


# --- a whole train step -------------------------------------------------------------------

@pytest.mark.parametrize("method", ["full", "lora", "uninit"])
@pytest.mark.parametrize("impl", ["ref", "fast"])
def test_bench_train_step(benchmark, mode_params, method, impl):
    benchmark.group = f"train_step_{method}"
    lora = LORA if method == "lora" else None
    params = mode_params if method == "uninit" else \
        init_method(method, jax.random.key(1), mode_params["backbone"], CFG, lora=LORA)
    trainable = METHODS[method]
    batch = {"tokens": jax.random.randint(jax.random.key(3), (BATCH, SEQ + 1), 0, CFG.vocab_size)}
    train, frozen = partition(params, trainable)
    state = adamw_init(train)
    ref_out = RT.train_step(train, frozen, state, batch, cfg=CFG, opt=OPT, lora=lora)
    if impl == "ref":
        def step():
            return RT.train_step(train, frozen, state, batch, cfg=CFG, opt=OPT, lora=lora)
    else:
        ftrain, ffrozen = P.partition(P.to_fast(params), trainable)
        fstate = FT.init_opt_state(ftrain, OPT)

        def step():
            return FT.train_step_keep(ftrain, ffrozen, fstate, batch, cfg=CFG, opt=OPT, lora=lora, fast=FAST)
        new_train, _, metrics = jax.block_until_ready(step())
        _close({k: metrics[k] for k in ("loss", "grad_norm")}, {k: ref_out[2][k] for k in ("loss", "grad_norm")})
        back = P.to_ref(P.merge(new_train, ffrozen))
        _close(partition(back, trainable)[0], ref_out[0])
    jax.block_until_ready(step())
    benchmark(lambda: jax.block_until_ready(step()))

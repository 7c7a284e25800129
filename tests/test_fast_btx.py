"""fast/btx.py against ref/btx.py: the stacked layout's round trip, the forward and the
gradients of the BTX part (hypothesis over seeds, float32 and bfloat16, scan and Python
layer loops), and one train step of make_steps' "ref" and "fast" backends (objective with
the load-balancing loss). Top-k ties: the top-2 set must be the same in both paths, so
inputs whose k-th and (k+1)-th router logits lie closer than the compute dtype can tell
apart are rejected (`assume`); the gradients are compared away from ties likewise."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from mode_jax.fast import btx_layout, model
from mode_jax.fast.config import FastConfig
from mode_jax.fast.params import partition as fast_partition, to_fast, to_ref
from mode_jax.fast.steps import make_steps
from mode_jax.ref import btx
from mode_jax.ref.config import LlamaConfig, OptimConfig
from mode_jax.ref.llama import init_llama
from mode_jax.ref.methods import apply, merge, partition
from tests.tolerances import assert_close, assert_trees_close, assert_trees_equal

CFG = LlamaConfig.tiny(n_layers=2)            # D 32, F 64: two layers keep the compiles short
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
DTYPES = {"float32": FastConfig.exact(), "bfloat16": FastConfig()}
# Smallest gap between the k-th and (k+1)-th router logit each dtype resolves: float32 rounding
# of the hidden states is ~1e-6 of logits of size ~5; bfloat16's (2^-9 relative per rounding,
# a few roundings deep) ~0.02 of them.
MIN_GAP = {"float32": 1e-3, "bfloat16": 0.1}


def jit(fn, static):
    return jax.jit(fn, static_argnames=static, compiler_options=FAST_COMPILE)


def build(seed: int, *, n_branches: int = 2, seed_expert: bool = True) -> dict:
    """A stage-2 model whose branches moved away from the backbone and whose router spreads the
    logits (std 1: gaps of order 1 between experts)."""
    backbone = init_llama(jax.random.key(seed), CFG)
    branches = []
    for j in range(n_branches):
        b = btx.init_branch(backbone)
        leaves, tree = jax.tree.flatten(b["btx"])
        keys = jax.random.split(jax.random.key(seed + 100 + j), len(leaves))
        moved = [x + 0.1 * jnp.std(x) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
        branches.append({"btx": jax.tree.unflatten(tree, moved)})
    return btx.init_mix(jax.random.key(seed + 7), backbone, branches, seed_expert=seed_expert, router_std=1.0)


def tokens(seed, shape=(2, 8)):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, shape).astype(np.int32)


@jax.jit
def _min_gap(params, tok):
    """The smallest gap between the TOP_K-th and next router logit over tokens and layers (ref)."""
    _, logits = btx.btx_hidden(params, tok, CFG, return_logits=True)
    s = jnp.sort(jnp.stack(logits), axis=-1)[..., ::-1]                            # [L, B, T, E]
    if s.shape[-1] <= btx.TOP_K:
        return jnp.inf                      # every expert is chosen: nothing to tie
    return jnp.min(s[..., btx.TOP_K - 1] - s[..., btx.TOP_K])


def _vjp_ref(params, tok, ct):
    train, frozen = partition(params, "btx")
    out, vjp = jax.vjp(lambda t: apply(merge(t, frozen), tok, CFG), train)
    return out, vjp(ct)[0]["btx"]


def _vjp_fast(params, tok, ct, fast):
    train, frozen = fast_partition(params, "btx")
    out, vjp = jax.vjp(lambda t: model.logits(merge(t, frozen), tok, CFG, fast), train)
    return out, btx_layout.to_ref(vjp(ct)[0]["btx"])


vjp_ref = jit(_vjp_ref, ())
vjp_fast = jit(_vjp_fast, ("fast",))


def test_layout_round_trip_is_exact():
    params = build(0, n_branches=1)
    stage1 = btx.init_branch(params["backbone"])
    for tree in (params, stage1):
        fast = to_fast(tree)
        e = len(tree["btx"]["layers"][0]["mlps"])
        assert fast["btx"]["mlps"]["w_gate"].shape == (CFG.n_layers, e, CFG.d_model, CFG.d_ff)
        assert ("gate_w" in fast["btx"]) == ("gate_w" in tree["btx"]["layers"][0])
        assert_trees_equal(to_ref(fast), tree)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@settings(max_examples=3)
@given(layer_loop=st.sampled_from(["scan", "python"]), seed_expert=st.booleans(), seed=st.integers(0, 2**16))
def test_forward_and_gradients_match_ref(dtype, layer_loop, seed_expert, seed):
    # E = 3 either way (seed + 2 branches, or 3 branches); few distinct models, as compiles are reused.
    params = build(seed % 5, n_branches=3 - seed_expert, seed_expert=seed_expert)
    tok = tokens(seed, (1, 8))
    assume(float(_min_gap(params, tok)) > MIN_GAP[dtype])
    ct = np.random.default_rng(seed + 1).standard_normal((*tok.shape, CFG.vocab_size)).astype(np.float32)
    fast = dataclasses.replace(DTYPES[dtype], layer_loop=layer_loop)
    want_out, want = vjp_ref(params, tok, ct)
    got_out, got = vjp_fast(to_fast(params), tok, ct, fast)
    tol_dtype = jnp.float32 if dtype == "float32" else jnp.bfloat16
    assert_close(got_out, want_out, dtype=tol_dtype, scale=2)
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        w = flat_want[path]
        # bf16: relative to the leaf's scale (sums over many bf16 terms), as tests/test_fast_model.py.
        scale = 2 if dtype == "float32" else 2 * max(1.0, float(jnp.abs(w).max()))
        assert_close(g, w, dtype=tol_dtype, scale=scale, err_msg=jax.tree_util.keystr(path))


def test_stage1_branch_matches_ref():
    params = btx.init_branch(build(3)["backbone"])
    tok = tokens(5)
    ct = np.random.default_rng(6).standard_normal((*tok.shape, CFG.vocab_size)).astype(np.float32)
    want_out, want = vjp_ref(params, tok, ct)
    got_out, got = vjp_fast(to_fast(params), tok, ct, DTYPES["float32"])
    assert_close(got_out, want_out, scale=2)
    assert_trees_close(got, want, scale=2)


def test_eval_steps_of_both_backends_agree():
    # make_steps' "ref" and "fast" eval steps on a stage-2 model: the same loss, per-token
    # statistics and routing (each layer's mean top-2 weights [L, E], rows summing to 1). The
    # train steps of both (objective with the balancing loss) are compared for every method by
    # tests/test_fast_train.py::test_step_matches_ref.
    params = build(1)
    rows = jnp.asarray(tokens(9, (2, 9)))
    out = {}
    for backend in ("ref", "fast"):
        steps = make_steps("btx", CFG, opt=OptimConfig(), backend=backend)
        out[backend] = steps.eval_step(steps.to_backend(params), rows)
    for key in ("loss", "token_nll", "routing"):
        assert_close(out["fast"][key], out["ref"][key], scale=2, err_msg=key)
    np.testing.assert_array_equal(out["fast"]["token_correct"], out["ref"]["token_correct"])
    assert out["ref"]["routing"].shape == (CFG.n_layers, 3)
    assert_close(out["ref"]["routing"].sum(-1), np.ones(CFG.n_layers))

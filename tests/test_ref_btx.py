"""Branch-Train-MiX in the reference (ref/btx.py): the top-2 router against float64 NumPy,
hand-worked router and load-balancing cases, the whole forward against an independent
float64 NumPy model, and the methods' partitions (stage 1 and 2 train only the BTX part)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.test_util import check_grads

from mode_jax.ref import btx
from mode_jax.ref.config import LlamaConfig
from mode_jax.ref.llama import init_llama, llama_forward
from mode_jax.ref.methods import METHODS, init_method, partition
from mode_jax.ref.train import batch_metrics, objective
from tests import numpy_llama
from tests.tolerances import assert_close

CFG = LlamaConfig.tiny()                       # 4 layers, D 32, F 64


def numpy_top_k_weights(logits, k):
    """Top-k renormalised softmax, float64, by sorting each row."""
    logits = np.asarray(logits, np.float64)
    out = np.zeros_like(logits)
    for idx in np.ndindex(logits.shape[:-1]):
        row = logits[idx]
        top = np.argsort(-row, kind="stable")[:k]
        e = np.exp(row[top] - row[top].max())
        out[idx + (top,)] = e / e.sum()
    return out


def perturbed_branch(backbone, seed, scale=0.05):
    """A stage-1 branch whose MLPs moved away from the backbone's (as training would)."""
    p = btx.init_branch(backbone)
    leaves, tree = jax.tree.flatten(p["btx"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + scale * jnp.std(x) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return {"backbone": backbone, "btx": jax.tree.unflatten(tree, moved)}


@pytest.fixture(scope="module")
def backbone():
    return init_llama(jax.random.key(0), CFG)


def tokens(seed=1, shape=(2, 7)):
    return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


# ----------------------------------------------------------------------------- the router

@given(lead=st.sampled_from([(5,), (2, 3)]), e=st.sampled_from([2, 3, 8]), k=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**16))
def test_top_k_weights_match_float64_numpy(lead, e, k, seed):
    # Normal draws: ties have probability 0, so the top-k set is unambiguous.
    logits = 2 * np.random.default_rng(seed).standard_normal((*lead, e))
    with jax.enable_x64(True):
        got = jax.jit(btx.top_k_weights, static_argnums=1)(jnp.asarray(logits, jnp.float64), k)
    expected = numpy_top_k_weights(logits, min(k, e))
    assert_close(got, expected, dtype=jnp.float64)
    assert ((np.asarray(got) > 0).sum(-1) == min(k, e)).all()


def test_top_k_weights_by_hand():
    # Top 2 of [0, ln 3, -5] are experts 1 and 0: softmax([ln 3, 0]) = [3/4, 1/4].
    got = btx.top_k_weights(jnp.array([0.0, np.log(3.0), -5.0]), 2)
    assert_close(got, [0.25, 0.75, 0.0])


def test_balance_loss_by_hand():
    # Two tokens, E = 2, k = 1, logits [0, ln 3] each: both slots go to expert 1 (f = [0, 1]),
    # p = [1/4, 3/4]: E * sum f p = 2 * 3/4 = 1.5. Uniform routing gives 1.
    logits = jnp.array([[0.0, np.log(3.0)], [0.0, np.log(3.0)]])
    assert_close(btx.balance_loss(logits, 1), 1.5)
    # k = 2 of E = 2: f = [1/2, 1/2], E * sum f p = 2 * (1/2)(1/4 + 3/4) = 1.
    assert_close(btx.balance_loss(logits, 2), 1.0)
    # Its gradient flows through p only: d/dz of 2 * p_1 (k = 1) = 2 p_1 (1 - p_1) / n_tokens per token.
    grad = jax.grad(lambda z: btx.balance_loss(z, 1))(logits)
    assert_close(grad, np.array([[-1.0, 1.0]] * 2) * 2 * 0.75 * 0.25 / 2)


def test_router_gradient_matches_finite_differences():
    # Away from ties (distinct normal logits), the renormalised top-2 mixture is smooth in the
    # router and the experts: numerical and automatic derivatives agree in float64.
    with jax.enable_x64(True):
        key = jax.random.split(jax.random.key(3), 4)
        layer = {"mlps": [{"w_gate": jax.random.normal(k1, (6, 5), jnp.float64),
                           "w_up": jax.random.normal(k2, (6, 5), jnp.float64),
                           "w_down": jax.random.normal(k3, (5, 6), jnp.float64)}
                          for k1, k2, k3 in [jax.random.split(k, 3) for k in key[:3]]],
                 "gate_w": jax.random.normal(key[3], (6, 3), jnp.float64)}
        x = jax.random.normal(jax.random.key(4), (2, 3, 6), jnp.float64)
        check_grads(jax.jit(lambda lay, x: btx.moe_mlp(lay, x)[0]), (layer, x), order=1, modes=("rev",))


# ----------------------------------------------------------------------------- the model

def test_branch_starts_as_the_backbone(backbone):
    params = init_method("btx_branch", jax.random.key(0), backbone, CFG)
    forward = jax.jit(btx.btx_forward, static_argnums=2)
    assert_close(forward(params, tokens(), CFG), jax.jit(llama_forward, static_argnums=2)(backbone, tokens(), CFG))


def test_mix_of_unchanged_copies_is_the_backbone(backbone):
    # Every expert equal to the backbone's MLP: any top-2 weights (summing to 1) give it back.
    branches = [btx.init_branch(backbone), btx.init_branch(backbone)]
    params = btx.init_mix(jax.random.key(2), backbone, branches, router_std=1.0)
    assert_close(btx.btx_forward(params, tokens(), CFG), llama_forward(backbone, tokens(), CFG))


def numpy_btx_logits(params, toks, cfg, k):
    """BTX for one sequence in float64 NumPy: the backbone's attention, then per token the top-k
    renormalised mixture of every MLP expert (tests/numpy_llama for attention and norms)."""
    bb = params["backbone"]
    x = bb["embed"][np.asarray(toks)]
    for p, moe in zip(bb["layers"], params["btx"]["layers"]):
        h = x + numpy_llama.attention(numpy_llama.rms_norm(x, p["attn_norm"], cfg.norm_eps), p, cfg)
        u = numpy_llama.rms_norm(h, p["mlp_norm"], cfg.norm_eps)
        outs = []
        for m in moe["mlps"]:
            g = u @ m["w_gate"]
            outs.append(((g / (1 + np.exp(-g))) * (u @ m["w_up"])) @ m["w_down"])
        w = numpy_top_k_weights(u @ moe["gate_w"], k) if "gate_w" in moe else np.ones((len(toks), 1))
        x = h + sum(w[:, e:e + 1] * outs[e] for e in range(len(outs)))
    return numpy_llama.head(bb, x, cfg)


@pytest.mark.parametrize("seed_expert", [True, False])
def test_forward_matches_float64_numpy(backbone, seed_expert):
    branches = [perturbed_branch(backbone, 10), perturbed_branch(backbone, 11)]
    params = btx.init_mix(jax.random.key(5), backbone, branches, seed_expert=seed_expert, router_std=0.5)
    assert len(params["btx"]["layers"][0]["mlps"]) == 2 + seed_expert
    toks = tokens(seed=7, shape=(2, 6))
    got = jax.jit(btx.btx_forward, static_argnums=2)(params, toks, CFG)
    npp = numpy_llama.to_numpy(params)
    for b in range(toks.shape[0]):
        assert_close(got[b], numpy_btx_logits(npp, np.asarray(toks[b]), CFG, btx.TOP_K), scale=5)


def test_init_mix_refuses_a_stage2_model_as_a_branch(backbone):
    mixed = btx.init_mix(jax.random.key(0), backbone, [btx.init_branch(backbone)])
    with pytest.raises(ValueError, match="branch 0 must hold 4 layers of one MLP"):
        btx.init_mix(jax.random.key(0), backbone, [mixed])


CFG2 = LlamaConfig.tiny(n_layers=2)             # two layers: the jitted metrics compile faster
metrics = jax.jit(batch_metrics, static_argnums=2, static_argnames="with_routing")


def test_metrics_hold_the_balancing_loss_and_routing():
    # (tests/test_ref_train.py runs a train step of every method, btx_branch and btx included.)
    backbone = init_llama(jax.random.key(0), CFG2)
    params = init_method("btx", jax.random.key(3), backbone, CFG2,
                         stage1=[perturbed_branch(backbone, 1), perturbed_branch(backbone, 2)])
    assert METHODS["btx"] == METHODS["btx_branch"] == "btx"
    train, frozen = partition(params, "btx")
    assert jax.tree.leaves(train["backbone"]) == [] and jax.tree.leaves(frozen["btx"]) == []
    batch = {"tokens": tokens(seed=4, shape=(2, 9))}
    m = metrics(params, batch, CFG2, with_routing=True)
    logits = btx.btx_hidden(params, batch["tokens"][:, :-1], CFG2, return_logits=True)[1]
    expected = btx.BALANCE_COEF * np.mean([float(btx.balance_loss(l)) for l in logits])
    assert_close(m["aux_loss"], expected)
    assert_close(objective(m), m["loss"] + expected)
    assert m["routing"].shape == (CFG2.n_layers, 3)
    assert_close(m["routing"].sum(-1), np.ones(CFG2.n_layers))
    # A stage-1 branch (one MLP, no router) has neither.
    m1 = metrics(btx.init_branch(backbone), batch, CFG2, with_routing=True)
    assert "aux_loss" not in m1 and m1["routing"] is None


def test_dispatch_flops():
    # SmolLM2: 2 * 3 * 576 * 1536 * 30 = 159.3M per expert; E = 3, k = 2 saves a third.
    f = btx.dispatch_flops(LlamaConfig.smollm2_135m(), 3)
    assert f["dense"] == 3 * 2 * 3 * 576 * 1536 * 30 and f["sparse"] == 2 * 2 * 3 * 576 * 1536 * 30
    assert_close(f["saved_fraction"], 1 / 3)

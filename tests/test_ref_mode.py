"""MoDE (paper eq. 1-2) in the reference: the merge, the gate, the blocks."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.test_util import check_grads

from mode_jax.ref.config import LlamaConfig, ModeConfig
from mode_jax.ref.llama import init_llama, llama_forward
from mode_jax.ref.mode import gated_combine, init_mode, mode_forward, mode_hidden, stage2_from_stage1
from tests import numpy_llama
from tests.tolerances import assert_close, assert_trees_close, assert_trees_equal

CFG = LlamaConfig.tiny()                      # 4 layers
MODE = ModeConfig(n_blocks=2, expert_layers=1, n_experts=2, expert_init="random")


def tokens(seed=1, shape=(2, 10)):
    return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


class ReferenceWithAndWithoutJit(chex.TestCase):
    """The pinned cases, run eagerly and under jit (chex.variants): the reference is the same
    function either way."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_gated_combine_by_hand(self):
        # softmax([0, ln 3]) = [1/4, 3/4]; 1/4 * [1, 2] + 3/4 * [5, 6] = [4, 5].
        out = self.variant(gated_combine)(jnp.array([0.0, np.log(3.0)]), jnp.array([[1.0, 2.0], [5.0, 6.0]]))
        assert_close(out, [4.0, 5.0])

    @chex.variants(with_jit=True, without_jit=True)
    def test_mode_forward_matches_independent_numpy(self):
        params = init_mode(jax.random.key(0), init_llama(jax.random.key(1), CFG), CFG, MODE)
        # A non-trivial gate, so every term of eq. 1 matters.
        params["blocks"] = [{**b, "gate_w": 0.3 * jax.random.normal(jax.random.key(i), b["gate_w"].shape),
                             "gate_b": jnp.array([0.5, -0.2, 0.1])} for i, b in enumerate(params["blocks"])]
        tok = tokens()
        logits = self.variant(mode_forward, static_argnums=2)(params, tok, CFG)
        npp = numpy_llama.to_numpy(params)
        for b in range(tok.shape[0]):
            assert_close(logits[b], numpy_llama.mode_logits(npp, np.asarray(tok[b]), CFG), scale=5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gate_init_backbone_margin(self):
        params = init_mode(jax.random.key(0), init_llama(jax.random.key(1), CFG), CFG,
                           dataclasses.replace(MODE, gate_margin=2.0))
        hidden = self.variant(functools.partial(mode_hidden, return_probs=True), static_argnums=2)
        _, probs = hidden(params, tokens(), CFG)
        # Zero weights, bias [2, 0, 0]: a_bb = e^2 / (e^2 + 2) = 0.7870 for every token.
        for p in probs:
            assert_close(p[..., 0], np.full(p.shape[:-1], np.e**2 / (np.e**2 + 2)))


@given(lead=st.sampled_from([(3,), (2, 5), (1, 1, 4)]), e=st.sampled_from([1, 2, 3, 8]),
       d=st.sampled_from([1, 4, 16]), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       seed=st.integers(0, 2**16))
def test_gated_combine_matches_numpy(lead, e, d, dtype, seed):
    kl, ko = jax.random.split(jax.random.key(seed))
    logits = 3 * jax.random.normal(kl, (*lead, e))
    outputs = jax.random.normal(ko, (e, *lead, d)).astype(dtype)
    out = jax.jit(gated_combine)(logits, outputs)      # jit: one compile per shape, reused
    assert out.dtype == dtype and out.shape == (*lead, d)
    l64, o64 = np.asarray(logits, np.float64), np.asarray(outputs.astype(jnp.float32), np.float64)
    p = np.exp(l64 - l64.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = sum(p[..., j:j + 1] * o64[j] for j in range(e))
    assert_close(out, expected, dtype=dtype)


def test_gated_combine_gradients():
    with jax.enable_x64(True):
        logits = jax.random.normal(jax.random.key(0), (5, 3), jnp.float64)
        outputs = jax.random.normal(jax.random.key(1), (3, 5, 4), jnp.float64)
        check_grads(gated_combine, (logits, outputs), order=2, modes=("fwd", "rev"))


def test_gated_combine_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="matching E"):
        gated_combine(jnp.zeros((4, 3)), jnp.ones((2, 4, 8)))


def test_zero_experts_is_the_backbone_exactly():
    backbone = init_llama(jax.random.key(1), CFG)
    params = init_mode(jax.random.key(0), backbone, CFG, dataclasses.replace(MODE, n_experts=0))
    assert all(b["gate_w"].shape == (CFG.d_model, 1) for b in params["blocks"])
    np.testing.assert_array_equal(mode_forward(params, tokens(), CFG), llama_forward(backbone, tokens(), CFG))


def test_saturated_gate_gives_backbone_logits_exactly():
    backbone = init_llama(jax.random.key(1), CFG)
    params = init_mode(jax.random.key(0), backbone, CFG, dataclasses.replace(MODE, gate_margin=1e4))
    # Random experts differ from the backbone, but exp(-1e4) is exactly 0 in float32.
    np.testing.assert_array_equal(mode_forward(params, tokens(), CFG), llama_forward(backbone, tokens(), CFG))
    uniform = init_mode(jax.random.key(0), backbone, CFG, dataclasses.replace(MODE, gate_init="uniform"))
    assert not np.allclose(mode_forward(uniform, tokens(), CFG), llama_forward(backbone, tokens(), CFG))


def test_identical_experts_give_that_experts_output():
    # Experts that copy a whole block compute exactly what the backbone block does, so
    # whatever the gate says, the mix is that output.
    backbone = init_llama(jax.random.key(1), CFG)
    mode = ModeConfig(n_blocks=2, expert_layers=2, n_experts=3, expert_init="copy", gate_init="uniform")
    params = init_mode(jax.random.key(0), backbone, CFG, mode)
    params["blocks"] = [{**b, "gate_w": jax.random.normal(jax.random.key(7), b["gate_w"].shape)}
                        for b in params["blocks"]]
    assert_close(mode_forward(params, tokens(), CFG), llama_forward(backbone, tokens(), CFG), scale=2)


def test_copy_init_takes_the_blocks_last_layers():
    backbone = init_llama(jax.random.key(1), CFG)
    params = init_mode(jax.random.key(0), backbone, CFG,
                       ModeConfig(n_blocks=2, expert_layers=1, n_experts=1, expert_init="copy"))
    for i, block in enumerate(params["blocks"]):
        src = backbone["layers"][2 * i + 1]                      # block i = layers 2i, 2i+1
        assert_trees_equal(block["experts"][0][0], src)


def test_stage2_gate_from_stage1():
    backbone = init_llama(jax.random.key(1), CFG)
    one = dataclasses.replace(MODE, n_experts=1)
    stage1 = []
    for s in range(2):
        m = init_mode(jax.random.key(s), backbone, CFG, one)
        m["blocks"] = [{**b, "gate_w": jax.random.normal(jax.random.key(10 + s), b["gate_w"].shape),
                        "gate_b": jnp.array([1.0 + s, -1.0 - s])} for b in m["blocks"]]
        stage1.append(m)
    composed = stage2_from_stage1(stage1, CFG, MODE)
    for i, block in enumerate(composed["blocks"]):
        a, b = stage1[0]["blocks"][i], stage1[1]["blocks"][i]
        want_w = np.stack([(a["gate_w"][:, 0] + b["gate_w"][:, 0]) / 2, a["gate_w"][:, 1], b["gate_w"][:, 1]], 1)
        # gate_b: mean(1, 2) for the backbone, then each expert's column carried over
        assert_trees_close((block["gate_w"], block["gate_b"]), (want_w, np.array([1.5, -1.0, -2.0])))
        assert block["experts"][1] is b["experts"][0]
    fresh = stage2_from_stage1(stage1, CFG, MODE, gate_from="fresh")
    assert_close(fresh["blocks"][0]["gate_b"], [MODE.gate_margin, 0.0, 0.0])
    with pytest.raises(ValueError, match="gate_from"):
        stage2_from_stage1(stage1, CFG, MODE, gate_from="mean")
    with pytest.raises(ValueError, match=r"stage1\[0\] must have 2 blocks of 1 expert"):
        stage2_from_stage1([composed], CFG, MODE)


def test_mode_check_grads():
    cfg = LlamaConfig.tiny(n_layers=2, vocab_size=11, d_model=8, n_heads=2, n_kv_heads=1,
                           head_dim=4, d_ff=12)
    mode = ModeConfig(n_blocks=2, expert_layers=1, n_experts=2, expert_init="random", gate_init="uniform")
    with jax.enable_x64(True):
        backbone = jax.tree.map(lambda x: x.astype(jnp.float64), init_llama(jax.random.key(0), cfg))
        params = init_mode(jax.random.key(1), backbone, cfg, mode)
        params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), params)
        f = lambda blocks: jnp.sum(jnp.sin(mode_forward({**params, "blocks": blocks}, jnp.array([[2, 5, 1]]), cfg)))
        check_grads(f, (params["blocks"],), order=1, modes=("rev",), eps=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_blocks=3), "n_layers=4 is not divisible by ModeConfig.n_blocks=3"),
    (dict(expert_layers=3, expert_init="copy"), "expert_layers=3 exceeds the 2 backbone layers"),
])
def test_layout_errors(kwargs, message):
    mode = dataclasses.replace(MODE, **kwargs)
    with pytest.raises(ValueError, match=message):
        init_mode(jax.random.key(0), init_llama(jax.random.key(1), CFG), CFG, mode)


@pytest.mark.parametrize("kwargs, message", [
    (dict(expert_layers=0), "expert_layers must be a positive integer, got 0"),
    (dict(n_blocks=-2), "n_blocks must be a positive integer, got -2"),
    (dict(n_experts=-1), "n_experts must be an integer >= 0, got -1"),
    (dict(expert_init="zeros"), "expert_init must be one of"),
    (dict(gate_init="x"), "gate_init must be one of"),
])
def test_mode_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModeConfig(**kwargs)

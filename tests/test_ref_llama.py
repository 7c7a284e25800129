"""The reference Llama against hand-computed cases and an independent NumPy model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.test_util import check_grads

from mode_jax.ref.config import LlamaConfig
from mode_jax.ref.llama import (apply_rope, check_params, init_llama, llama_forward, rms_norm,
                                rope_tables)
from tests import numpy_llama
from tests.tolerances import assert_close


def test_rms_norm_by_hand():
    # x = [3, 4]: mean square 12.5, rms 3.5355339; scaled by [1, 2].
    out = rms_norm(jnp.array([3.0, 4.0]), jnp.array([1.0, 2.0]), eps=0.0)
    assert_close(out, [3 / 3.5355339, 8 / 3.5355339])


def test_rope_by_hand():
    # H = 2, one frequency (theta^0 = 1): position 1 rotates (1, 2) by 1 radian.
    cos, sin = rope_tables(jnp.arange(2), head_dim=2, theta=10000.0)
    x = jnp.array([[1.0, 2.0], [1.0, 2.0]]).reshape(1, 2, 1, 2)
    out = apply_rope(x, cos, sin)[0, :, 0]
    c, s = np.cos(1.0), np.sin(1.0)
    assert_close(out[0], [1.0, 2.0])                       # position 0: identity
    assert_close(out[1], [1 * c - 2 * s, 2 * c + 1 * s])


def test_rope_scores_depend_on_relative_position_only():
    key_q, key_k = jax.random.split(jax.random.key(3))
    q = jax.random.normal(key_q, (16,))
    k = jax.random.normal(key_k, (16,))
    cos, sin = rope_tables(jnp.arange(12), head_dim=16, theta=100.0)
    rq = apply_rope(jnp.broadcast_to(q, (1, 12, 1, 16)), cos, sin)[0, :, 0]
    rk = apply_rope(jnp.broadcast_to(k, (1, 12, 1, 16)), cos, sin)[0, :, 0]
    assert_close(rq[5] @ rk[3], rq[9] @ rk[7], scale=10)   # both at distance 2


@pytest.mark.parametrize("tie", [True, False])
def test_forward_matches_independent_numpy(tie):
    cfg = LlamaConfig.tiny(tie_embeddings=tie, n_layers=2)
    params = init_llama(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    logits = llama_forward(params, tokens, cfg)
    npp = numpy_llama.to_numpy(params)
    for b in range(2):
        expected = numpy_llama.llama_logits(npp, np.asarray(tokens[b]), cfg)
        assert_close(logits[b], expected, scale=5)


def test_forward_is_causal():
    cfg = LlamaConfig.tiny()
    params = init_llama(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, cfg.vocab_size)
    changed = tokens.at[0, 8].set((tokens[0, 8] + 1) % cfg.vocab_size)
    a, b = llama_forward(params, tokens, cfg), llama_forward(params, changed, cfg)
    np.testing.assert_array_equal(np.asarray(a[0, :8]), np.asarray(b[0, :8]))
    assert not np.allclose(a[0, 8:], b[0, 8:])


@given(shape=st.sampled_from([(1, 5), (3, 4), (2, 16)]),
       heads=st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 3)]),
       seed=st.integers(0, 2**16))
def test_forward_shapes_and_gqa(shape, heads, seed):
    cfg = LlamaConfig.tiny(n_heads=heads[0], n_kv_heads=heads[1], n_layers=1)
    params = init_llama(jax.random.key(seed), cfg)
    tokens = jax.random.randint(jax.random.key(seed + 1), shape, 0, cfg.vocab_size)
    logits = llama_forward(params, tokens, cfg)
    assert logits.shape == (*shape, cfg.vocab_size) and logits.dtype == jnp.float32
    expected = numpy_llama.llama_logits(numpy_llama.to_numpy(params), np.asarray(tokens[0]), cfg)
    assert_close(logits[0], expected, scale=5)


def test_bf16_forward_close_to_f32():
    cfg = LlamaConfig.tiny()
    p32 = init_llama(jax.random.key(0), cfg)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    assert_close(llama_forward(p16, tokens, cfg), llama_forward(p32, tokens, cfg), dtype=jnp.bfloat16)


def test_check_grads_tiny_model():
    cfg = LlamaConfig.tiny(n_layers=1, vocab_size=11, d_model=8, n_heads=2, n_kv_heads=1,
                           head_dim=4, d_ff=12)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: x.astype(jnp.float64), init_llama(jax.random.key(0), cfg))
        params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), params)
        tokens = jnp.array([[1, 5, 3, 7]])
        f = lambda p: jnp.sum(jnp.sin(llama_forward(p, tokens, cfg)))
        check_grads(f, (params,), order=1, modes=("rev",), eps=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("n_kv_heads", 4, "n_heads=9 must be a multiple of n_kv_heads=4"),
    ("n_layers", 0, "n_layers must be a positive integer, got 0"),
    ("head_dim", -1, "head_dim must be a positive integer, got -1"),
    ("rope_theta", 0.0, "rope_theta must be > 0"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**{field: value})


def test_check_params_names_the_wrong_entry():
    cfg = LlamaConfig.tiny()
    params = init_llama(jax.random.key(0), cfg)
    check_params(params, cfg)
    bad = {**params, "layers": [dict(l) for l in params["layers"]]}
    bad["layers"][2]["wk"] = jnp.zeros((cfg.d_model, 7))
    with pytest.raises(ValueError, match=r"\['layers'\]\[2\]\['wk'\] has shape \(32, 7\), config expects \(32, 16\)"):
        check_params(bad, cfg)
    with pytest.raises(ValueError, match="3 layers, config n_layers=4"):
        check_params({**params, "layers": params["layers"][:3]}, cfg)
    with pytest.raises(ValueError, match=r"\['final_norm'\] is missing"):
        check_params({k: v for k, v in params.items() if k != "final_norm"}, cfg)

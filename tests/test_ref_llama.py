"""The reference Llama against hand-computed cases and an independent NumPy model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.test_util import check_grads

from mode_jax.ref.config import LlamaConfig, RopeScaling
from mode_jax.ref.llama import (apply_rope, check_params, init_llama, llama_forward, rms_norm,
                                rope_freq_factors, rope_tables)
from tests import numpy_llama
from tests.tolerances import assert_close


class ReferenceWithAndWithoutJit(chex.TestCase):
    """The pinned cases, run eagerly and under jit (chex.variants): the reference is the same
    function either way."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_rms_norm_by_hand(self):
        # x = [3, 4]: mean square 12.5, rms 3.5355339; scaled by [1, 2].
        out = self.variant(rms_norm, static_argnames="eps")(jnp.array([3.0, 4.0]), jnp.array([1.0, 2.0]), eps=0.0)
        assert_close(out, [3 / 3.5355339, 8 / 3.5355339])

    @chex.variants(with_jit=True, without_jit=True)
    def test_rope_by_hand(self):
        # H = 2, one frequency (theta^0 = 1): position 1 rotates (1, 2) by 1 radian.
        cos, sin = rope_tables(jnp.arange(2), head_dim=2, theta=10000.0)
        x = jnp.array([[1.0, 2.0], [1.0, 2.0]]).reshape(1, 2, 1, 2)
        out = self.variant(apply_rope)(x, cos, sin)[0, :, 0]
        c, s = np.cos(1.0), np.sin(1.0)
        assert_close(out[0], [1.0, 2.0])                       # position 0: identity
        assert_close(out[1], [1 * c - 2 * s, 2 * c + 1 * s])

    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_matches_independent_numpy(self):
        for tie in (True, False):
            cfg = LlamaConfig.tiny(tie_embeddings=tie, n_layers=2)
            params = init_llama(jax.random.key(0), cfg)
            tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
            logits = self.variant(llama_forward, static_argnums=2)(params, tokens, cfg)
            npp = numpy_llama.to_numpy(params)
            for b in range(2):
                expected = numpy_llama.llama_logits(npp, np.asarray(tokens[b]), cfg)
                assert_close(logits[b], expected, scale=5)


def test_rope_scores_depend_on_relative_position_only():
    key_q, key_k = jax.random.split(jax.random.key(3))
    q = jax.random.normal(key_q, (16,))
    k = jax.random.normal(key_k, (16,))
    cos, sin = rope_tables(jnp.arange(12), head_dim=16, theta=100.0)
    rq = apply_rope(jnp.broadcast_to(q, (1, 12, 1, 16)), cos, sin)[0, :, 0]
    rk = apply_rope(jnp.broadcast_to(k, (1, 12, 1, 16)), cos, sin)[0, :, 0]
    assert_close(rq[5] @ rk[3], rq[9] @ rk[7], scale=10)   # both at distance 2


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


# --- other backbones: Llama 3's RoPE scaling, Qwen2's q/k/v biases -------------------------

# head_dim 8, theta 10000: wavelengths 2 pi * [1, 10, 100, 1000] = [6.3, 63, 628, 6283];
# with original 64, low 1, high 4 the first is kept (< 16), the second interpolated
# (16..64) and the last two divided by the factor (> 64): every branch of the rule.
LLAMA3 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=64)
VARIANTS = {"llama3": dict(rope_scaling=LLAMA3), "qwen2": dict(qkv_bias=True, rope_theta=1e6),
            "both": dict(qkv_bias=True, rope_scaling=LLAMA3)}


def test_llama3_frequency_divisors_by_hand():
    # head_dim 4, theta 100: frequencies 1 and 0.1, wavelengths 2 pi and 20 pi = 62.83.
    # original 100, low 1, high 4: 2 pi < 25 keeps divisor 1; 62.83 lies in [25, 100]:
    # s = (100 / 62.83 - 1) / 3 = 0.19718, divisor 1 / ((1 - s) / 8 + s) = 1 / 0.29753 = 3.3610.
    cfg = LlamaConfig.tiny(head_dim=4, rope_theta=100.0, rope_scaling=RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=100))
    assert_close(np.array(rope_freq_factors(cfg)), [1.0, 3.3610], scale=10)
    assert rope_freq_factors(LlamaConfig.tiny()) is None
    # A GGUF's own table is used as it is.
    assert rope_freq_factors(LlamaConfig.tiny(head_dim=4, rope_freq_factors=[1.0, 2.5])) == (1.0, 2.5)
    cos, sin = rope_tables(jnp.arange(3), head_dim=4, theta=100.0, freq_factors=(1.0, 2.5))
    assert_close(cos[2], np.cos([2.0, 2 * 0.1 / 2.5, 2.0, 2 * 0.1 / 2.5]))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_other_backbones_match_independent_numpy(variant):
    """The reference against numpy_llama, which applies Llama 3's rule to the frequencies the
    way Hugging Face writes it (not as divisors) and adds the biases itself."""
    cfg = LlamaConfig.tiny(n_layers=2, **VARIANTS[variant])
    # Weights 5x init's, so attention is far from uniform and RoPE and the biases matter.
    params = jax.tree.map(lambda a: 5.0 * a, init_llama(jax.random.key(4), cfg))
    if cfg.qkv_bias:
        assert params["layers"][0]["bq"].shape == (cfg.n_heads * cfg.head_dim,)
        # Biases of the size Qwen2 has (a few units), so they move the attention visibly.
        params["layers"] = [{**l, **{b: 2.0 * jax.random.normal(jax.random.key(i), l[b].shape)
                                     for i, b in enumerate(("bq", "bk", "bv"))}} for l in params["layers"]]
    tokens = jax.random.randint(jax.random.key(5), (2, 24), 0, cfg.vocab_size)
    logits = llama_forward(params, tokens, cfg)
    npp = numpy_llama.to_numpy(params)
    for b in range(2):
        assert_close(logits[b], numpy_llama.llama_logits(npp, np.asarray(tokens[b]), cfg), scale=5)
    # The variant changes the function: without it the logits differ.
    plain = LlamaConfig.tiny(n_layers=2, rope_theta=cfg.rope_theta)
    stripped = {**params, "layers": [{k: v for k, v in l.items() if k in ("attn_norm", "wq", "wk", "wv", "wo",
                                      "mlp_norm", "w_gate", "w_up", "w_down")} for l in params["layers"]]}
    assert np.abs(np.asarray(llama_forward(stripped, tokens, plain) - logits)).max() > 0.1


def test_divisor_table_and_rule_give_the_same_model():
    """A GGUF's rope_freqs table (the divisors) and config.json's Llama 3 rule are one function."""
    rule = LlamaConfig.tiny(n_layers=1, rope_scaling=LLAMA3)
    table = LlamaConfig.tiny(n_layers=1, rope_freq_factors=rope_freq_factors(rule))
    params = jax.tree.map(lambda a: 5.0 * a, init_llama(jax.random.key(0), rule))
    tokens = jax.random.randint(jax.random.key(1), (1, 40), 0, rule.vocab_size)
    want = llama_forward(params, tokens, rule)
    assert_close(llama_forward(params, tokens, table), want)
    assert np.abs(np.asarray(llama_forward(params, tokens, LlamaConfig.tiny(n_layers=1)) - want)).max() > 0.1


def test_check_grads_qwen2_llama3():
    cfg = LlamaConfig.tiny(n_layers=1, vocab_size=11, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=12,
                           qkv_bias=True, rope_scaling=RopeScaling(original_max_position_embeddings=40))
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: x.astype(jnp.float64), init_llama(jax.random.key(0), cfg))
        params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), params)
        f = lambda p: jnp.sum(jnp.sin(llama_forward(p, jnp.array([[1, 5, 3, 7]]), cfg)))
        check_grads(f, (params,), order=1, modes=("rev",), eps=1e-6)


def test_new_config_fields_round_trip_through_json_and_hash():
    import dataclasses
    import json
    cfg = LlamaConfig.tiny(qkv_bias=True, rope_scaling=LLAMA3)
    again = LlamaConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg and hash(again) == hash(cfg)
    table = LlamaConfig.tiny(rope_freq_factors=[1.0, 2.0, 3.0, 4.0])
    assert LlamaConfig(**json.loads(json.dumps(dataclasses.asdict(table)))) == table
    assert hash(table) == hash(LlamaConfig.tiny(rope_freq_factors=(1.0, 2.0, 3.0, 4.0)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(rope_freq_factors=(1.0, 2.0)), "rope_freq_factors has 2 entries, head_dim=8 needs 4"),
    (dict(rope_freq_factors=(1.0, 0.0, 1.0, 1.0)), "rope_freq_factors must all be > 0"),
    (dict(rope_freq_factors=(1.0,) * 4, rope_scaling=LLAMA3), "give one"),
    (dict(rope_scaling={"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
     "low_freq_factor < high_freq_factor"),
    (dict(rope_scaling={"rope_type": "yarn"}), "rope_type must be one of"),
    (dict(rope_scaling={"bogus": 1}), "rope_scaling: .*bogus"),
    (dict(qkv_bias=1), "qkv_bias must be a bool"),
    (dict(head_dim=5), "head_dim must be even"),
])
def test_new_config_fields_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.tiny(**kwargs)


def test_public_functions_check_their_inputs():
    """chex checks at the public functions: a ValueError naming the function and argument."""
    from mode_jax.ref.llama import attend, embed, layer_forward, lm_head
    cfg = LlamaConfig.tiny(n_layers=1)
    params = init_llama(jax.random.key(0), cfg)
    x = 0.5 + jnp.zeros((1, 3, cfg.d_model))
    cases = [
        (lambda: llama_forward(params, jnp.array([1, 2, 3]), cfg), "tokens must be \\[B, T\\]"),
        (lambda: llama_forward(params, jnp.array([[0.5, 1.5]]), cfg), "tokens must be integer ids"),
        (lambda: embed(params, jnp.ones((1, 2, 3), jnp.int32)), "embed: tokens must be \\[B, T\\]"),
        (lambda: layer_forward(params["layers"][0], x[..., :16], cfg), "layer_forward: x .* has width 16, the model 32"),
        (lambda: lm_head(params, x[0], cfg), "lm_head: x must be \\[B, T, D\\]"),
        (lambda: rms_norm(x, jnp.ones(5), eps=1e-5), "rms_norm: scale must be \\[32\\]"),
        (lambda: apply_rope(x.reshape(1, 3, 4, 8), *rope_tables(jnp.arange(4), head_dim=8, theta=1e4)),
         "apply_rope: cos, sin must be \\[T, H\\]"),
        (lambda: attend(x.reshape(1, 3, 4, 8), x.reshape(1, 3, 4, 8), x.reshape(1, 3, 4, 8)[..., :4],
                        jnp.ones((3, 3), bool)), "attend: k and v must have one shape"),
        (lambda: attend(x.reshape(1, 3, 4, 8), x.reshape(1, 3, 4, 8)[:, :, :3], x.reshape(1, 3, 4, 8)[:, :, :3],
                        jnp.ones((3, 3), bool)), "N not a multiple of K"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()

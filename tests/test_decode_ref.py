"""ref/decode.py and ref/sampling.py: KV-cache decoding equals the full-sequence forward at
every step (backbone and MoDE with experts), and sampling draws from exactly the filtered
distribution that a float64 NumPy reference computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.ref import decode
from mode_jax.ref.config import LlamaConfig, ModeConfig, RopeScaling
from mode_jax.ref.llama import init_llama, llama_forward
from mode_jax.ref.mode import init_mode, mode_forward
from mode_jax.ref.sampling import SamplingConfig, filter_logits, sample, step_key
from tests.tolerances import PROBABILITY_SUM, SAMPLED_FREQUENCY, assert_close

CFG = LlamaConfig.tiny()
# Qwen2's q/k/v biases and Llama 3's RoPE scaling (a short original context, so it bites).
CFG_QWEN = LlamaConfig.tiny(qkv_bias=True, rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=8))


def qwen_backbone(seed=3):
    params = init_llama(jax.random.key(seed), CFG_QWEN)
    for i, layer in enumerate(params["layers"]):
        for j, name in enumerate(("bq", "bk", "bv")):
            layer[name] = 0.5 * jax.random.normal(jax.random.key(50 + 3 * i + j), layer[name].shape)
    return params


def tiny_mode(seed=0, n_experts=2, expert_layers=1):
    """A tiny MoDE model whose gates really mix: random experts, random gate weights."""
    backbone = init_llama(jax.random.key(seed), CFG)
    mode = ModeConfig(n_blocks=2, expert_layers=expert_layers, n_experts=n_experts, expert_init="random")
    params = init_mode(jax.random.key(seed + 1), backbone, CFG, mode)
    for i, block in enumerate(params["blocks"]):
        k = jax.random.key(100 + i)
        block["gate_w"] = 2.0 * jax.random.normal(k, block["gate_w"].shape)
        block["gate_b"] = jax.random.normal(jax.random.fold_in(k, 1), block["gate_b"].shape)
    return params


def _tokens(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


@pytest.mark.parametrize("model", ["backbone", "mode", "qwen2_llama3"])
def test_cached_steps_equal_full_forward(model):
    cfg = CFG_QWEN if model == "qwen2_llama3" else CFG
    params = tiny_mode() if model == "mode" else qwen_backbone() if model == "qwen2_llama3" else \
        init_llama(jax.random.key(3), CFG)
    full_fn = mode_forward if model == "mode" else llama_forward
    tokens = _tokens(1, (2, 11))
    full = full_fn(params, tokens, cfg)                                            # [B, 11, V]
    # Prefill 5, then 2 tokens in one step, then one at a time.
    logits, cache, _ = decode.prefill(params, tokens[:, :5], cfg)
    got = [logits]
    logits, cache, _ = decode.step(params, cache, tokens[:, 5:7], cfg)
    got.append(logits)
    for t in range(7, 11):
        logits, cache, _ = decode.step(params, cache, tokens[:, t:t + 1], cfg)
        got.append(logits)
    assert decode.cached_length(cache) == 11
    if model == "mode":
        assert len(cache["experts"]) == 2 and len(cache["experts"][0]) == 2          # blocks x experts
        assert cache["experts"][1][1][0]["k"].shape == (2, 11, CFG.n_kv_heads, CFG.head_dim)
        # The experts' caches are their own: different keys from the backbone's layer.
        assert not np.allclose(cache["experts"][0][0][0]["k"], cache["backbone"][1]["k"])
    assert_close(jnp.concatenate(got, axis=1), full, dtype=jnp.float32)


def test_mode_routing_from_cache_equals_full_forward():
    from mode_jax.ref.mode import mode_hidden
    params = tiny_mode(n_experts=2, expert_layers=2)
    tokens = _tokens(2, (1, 8))
    _, want = mode_hidden(params, tokens, CFG, return_probs=True)
    _, cache, probs = decode.prefill(params, tokens[:, :6], CFG)
    _, cache, probs2 = decode.step(params, cache, tokens[:, 6:], CFG)
    for i in range(2):
        got = jnp.concatenate([probs[i], probs2[i]], axis=1)
        assert_close(got, want[i], dtype=jnp.float32)
        assert float(jnp.std(got[..., 1])) > 1e-3      # the gate really varies by token


def test_greedy_generation_logits_equal_full_forward_at_every_step():
    params = tiny_mode(seed=5)
    prompt = _tokens(4, (1, 6))
    out = decode.generate(params, prompt, CFG, max_new_tokens=7, keep_logits=True)
    new = out.tokens[0]
    assert len(new) == 7 and out.finish == ["length"]
    seq = jnp.concatenate([prompt, jnp.asarray([new], jnp.int32)], axis=1)
    full = mode_forward(params, seq, CFG)[0]                                     # [13, V]
    # New token i is predicted at position 5 + i, and is that position's argmax.
    assert_close(np.stack(out.logits[0]), full[5:12], dtype=jnp.float32)
    assert new == [int(t) for t in jnp.argmax(full[5:12], axis=-1)]
    assert out.routing[0].shape == (7, 2, 3)
    np.testing.assert_allclose(out.routing[0].sum(-1), 1.0, **PROBABILITY_SUM)


def test_generation_stops_at_eos_and_at_a_stop_string():
    params = tiny_mode(seed=6)
    prompt = _tokens(7, (1, 4))
    free = decode.generate(params, prompt, CFG, max_new_tokens=6).tokens[0]
    out = decode.generate(params, prompt, CFG, max_new_tokens=6, eos_id=free[2])
    first = free.index(free[2])
    assert out.tokens[0] == free[:first + 1] and out.finish == ["eos"]
    # A toy detokenizer: token t -> chr(65 + t % 26); stop at the text of tokens 1-2.
    detok = lambda ids: "".join(chr(65 + t % 26) for t in ids)          # noqa: E731
    stop = detok(free[1:3])
    out = decode.generate(params, prompt, CFG, max_new_tokens=6, stop_strings=[stop], detokenize=detok)
    assert out.finish == ["stop"] and detok(out.tokens[0]).find(stop) >= 0
    assert out.tokens[0] == free[:len(out.tokens[0])] and len(out.tokens[0]) <= 3


# ----------------------------------------------------------------------------- sampling

def numpy_filtered(logits, temperature, top_k, top_p):
    """The filtered distribution in float64, written independently: sort, cut, renormalise."""
    x = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(x.shape, bool)
    k = top_k if top_k > 0 else len(x)
    keep[order[:k]] = True
    p = np.exp(x - x.max()) * keep
    p /= p.sum()
    if top_p < 1:
        mass = 0.0
        nucleus = np.zeros(x.shape, bool)
        for i in order:
            if not keep[i] or mass >= top_p:
                break
            nucleus[i] = True
            mass += p[i]
        keep = nucleus
    q = np.exp(x - x.max()) * keep
    return q / q.sum()


def test_top_p_hand_case():
    # probabilities 0.5, 0.3, 0.15, 0.05: the nucleus of 0.6 is {0, 1} (0.5 < 0.6, then 0.8),
    # of 0.45 is {0}, of 0.9 is {0, 1, 2}.
    logits = jnp.log(jnp.array([0.3, 0.05, 0.5, 0.15]))
    for p, support in ((0.6, {0, 2}), (0.45, {2}), (0.9, {0, 2, 3})):
        out = filter_logits(logits, SamplingConfig(temperature=1.0, top_p=p))
        assert set(np.flatnonzero(np.isfinite(out))) == support, p


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                     (0.9, 12, 0.6), (2.0, 3, 0.95)])
def test_filtered_distribution_matches_numpy(temperature, top_k, top_p):
    rng = np.random.default_rng(int(100 * temperature) + top_k)
    logits = rng.normal(0, 2.5, size=(3, 40)).astype(np.float32)
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    got = jax.nn.softmax(filter_logits(jnp.asarray(logits), cfg), axis=-1)
    for row in range(3):
        want = numpy_filtered(logits[row], temperature, top_k, top_p)
        assert_close(got[row], want, dtype=jnp.float32)
        assert (np.asarray(got[row]) > 0).sum() == (want > 0).sum() < 40 or (top_k == 0 and top_p == 1)
    # 4000 draws per row land only in the support, with the support's frequencies.
    draws = jax.vmap(lambda k: sample(k, jnp.asarray(logits), cfg))(jax.random.split(jax.random.key(1), 4000))
    for row in range(3):
        want = numpy_filtered(logits[row], temperature, top_k, top_p)
        counts = np.bincount(np.asarray(draws[:, row]), minlength=40) / 4000
        assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(want))
        np.testing.assert_allclose(counts, want, **SAMPLED_FREQUENCY)


def test_sampling_is_reproducible_from_a_seed():
    params = tiny_mode(seed=8)
    prompt = _tokens(9, (2, 5))
    cfg = SamplingConfig(temperature=1.5, top_k=20, top_p=0.9)
    a = decode.generate(params, prompt, CFG, max_new_tokens=8, sampling=cfg, key=jax.random.key(42))
    b = decode.generate(params, prompt, CFG, max_new_tokens=8, sampling=cfg, key=jax.random.key(42))
    c = decode.generate(params, prompt, CFG, max_new_tokens=8, sampling=cfg, key=jax.random.key(43))
    assert a.tokens == b.tokens and a.tokens != c.tokens
    greedy = decode.generate(params, prompt, CFG, max_new_tokens=8).tokens
    assert a.tokens != greedy
    # Step i's token comes from step_key(key, i), whatever else happened before.
    logits, _, _ = decode.prefill(params, prompt, CFG)
    first = sample(step_key(jax.random.key(42), 0), logits[:, -1], cfg)
    assert [t[0] for t in a.tokens] == [int(x) for x in first]


def test_sampling_config_rejects_bad_values():
    for kw in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match="SamplingConfig"):
            SamplingConfig(**kw)

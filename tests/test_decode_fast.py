"""fast/decode.py and fast/generate.py against ref/: cached logits equal the full-sequence
forward at every step (float32, left-padded batches included), greedy and seeded sampling
give ref/decode.py's tokens, a ragged batch gives what each prompt gives alone, and
streaming gives what the jitted loop gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.fast import decode as fdecode
from mode_jax.fast.config import FastConfig
from mode_jax.fast.generate import generate, left_pad
from mode_jax.fast.params import to_fast
from mode_jax.ref import decode as rdecode
from mode_jax.ref.llama import init_llama, llama_forward
from mode_jax.ref.mode import mode_forward, mode_hidden
from mode_jax.ref.sampling import SamplingConfig
from tests.test_decode_ref import CFG, CFG_QWEN, qwen_backbone, tiny_mode
from tests.tolerances import assert_close

EXACT = FastConfig.exact()
NEW = 8


def gen(prepared, prompts, **kw):
    """fast generation at one bucket width and length, so the tests share compiled shapes."""
    return generate(prepared, prompts, CFG, EXACT, max_new_tokens=NEW, keep_logits=True, bucket=32, **kw)


@pytest.fixture(scope="module")
def mode_params():
    return tiny_mode(seed=11, n_experts=2, expert_layers=2)


def _prepared(params, fast=EXACT):
    return fdecode.prepare(to_fast(params), fast)


@pytest.mark.parametrize("model", ["backbone", "mode", "qwen2_llama3"])
def test_cached_logits_equal_full_forward_with_left_padding(model, mode_params):
    cfg = CFG_QWEN if model == "qwen2_llama3" else CFG
    params = mode_params if model == "mode" else {"backbone": qwen_backbone(12) if model == "qwen2_llama3" else
                                                  init_llama(jax.random.key(12), CFG)}
    full_fn = (lambda p, t: mode_forward(p, t, cfg)) if model == "mode" else \
        (lambda p, t: llama_forward(p["backbone"], t, cfg))
    seqs = [np.asarray(jax.random.randint(jax.random.key(s), (n,), 0, CFG.vocab_size)) for s, n in ((1, 11), (2, 14))]
    plen = [5, 8]                                          # prompt lengths; the rest is fed one at a time
    tokens, pad = left_pad([s[:n] for s, n in zip(seqs, plen)], bucket=4)          # P = 8, pads 3 and 0
    prepared = _prepared(params)
    n_new = 6
    statics = dict(cfg=cfg, fast=EXACT, sampling=SamplingConfig())
    tok, logits, routing, cache, prompt_logits = fdecode.prefill(
        prepared, jnp.asarray(tokens), jnp.asarray(pad), jax.random.key(0), size=8 + n_new, all_logits=True,
        **statics)
    steps = [logits]
    for i in range(n_new):
        feed = jnp.asarray([seqs[0][5 + i], seqs[1][8 + i] if 8 + i < 14 else 0])
        _, logits, routing, cache = fdecode.decode_step(prepared, cache, feed, jnp.int32(8 + i), jnp.asarray(pad),
                                                        jax.random.key(0), jnp.int32(i + 1), **statics)
        steps.append(logits)
    steps = jnp.stack(steps, axis=1)                                               # [B, 1 + n_new, V]
    for row, (seq, n) in enumerate(zip(seqs, plen)):
        full = full_fn(params, jnp.asarray(seq)[None])[0]                          # [len, V]
        assert_close(prompt_logits[row, pad[row]:], full[:n], dtype=jnp.float32, err_msg=f"prefill row {row}")
        upto = min(n_new, len(seq) - n)                   # row 1 runs out of real tokens after 6
        assert_close(steps[row, :upto + 1], full[n - 1:n + upto], dtype=jnp.float32, err_msg=f"steps row {row}")
    if model == "mode":
        # The last step's routing is the gate at that position in the full forward.
        _, want = mode_hidden(params, jnp.asarray(seqs[0])[None], CFG, return_probs=True)
        got = np.asarray(routing[0])                                               # [n_blocks, E]
        assert_close(got, np.stack([p[0, 5 + n_new - 1] for p in want]), dtype=jnp.float32)


def test_fast_greedy_equals_ref_greedy(mode_params):
    prompt = np.asarray(jax.random.randint(jax.random.key(21), (7,), 0, CFG.vocab_size))
    want = rdecode.generate(mode_params, prompt[None], CFG, max_new_tokens=NEW, keep_logits=True)
    got = gen(_prepared(mode_params), [prompt.tolist()])
    assert got.tokens == want.tokens and got.finish == want.finish == ["length"]
    assert_close(got.logits[0], np.stack(want.logits[0]), dtype=jnp.float32)
    assert_close(got.routing[0], want.routing[0], dtype=jnp.float32)
    # bf16 compute: the first new token's logits within bf16 rounding of float32; scale 2 for the
    # chain of bf16 matmuls (4 backbone layers, 2 blocks of 2-layer experts and the head).
    tokens, pad = left_pad([prompt.tolist()], bucket=8)
    bf16 = fdecode.prefill(_prepared(mode_params, FastConfig()), jnp.asarray(tokens), jnp.asarray(pad),
                           jax.random.key(0), cfg=CFG, fast=FastConfig(), sampling=SamplingConfig(), size=9)
    assert_close(bf16[1][0], want.logits[0][0], dtype=jnp.bfloat16, scale=2.0)


def test_ragged_batch_equals_one_by_one(mode_params):
    prompts = [np.asarray(jax.random.randint(jax.random.key(30 + i), (n,), 0, CFG.vocab_size)).tolist()
               for i, n in enumerate((3, 17, 9))]
    prepared = _prepared(mode_params)
    batch = gen(prepared, prompts)
    for i, p in enumerate(prompts):
        alone = gen(prepared, [p])
        assert batch.tokens[i] == alone.tokens[0], i
        assert_close(batch.logits[i], alone.logits[0], dtype=jnp.float32)
        assert_close(batch.routing[i], alone.routing[0], dtype=jnp.float32)


def test_eos_ends_one_row_and_streaming_equals_the_loop(mode_params):
    prompts = [[5, 9, 33, 2], [60, 1, 7, 7, 40, 3]]
    prepared = _prepared(mode_params)
    sampling = SamplingConfig(temperature=1.2, top_k=30, top_p=0.95)
    key = jax.random.key(7)
    free = gen(prepared, prompts, sampling=sampling, key=key)
    assert free.finish == ["length", "length"] and free.tokens[0] != free.tokens[1]
    eos = free.tokens[0][3]
    cut = gen(prepared, prompts, sampling=sampling, key=key, eos_id=eos)
    assert cut.finish[0] == "eos" and cut.tokens[0] == free.tokens[0][:free.tokens[0].index(eos) + 1]
    # Three decode steps per loop iteration: the same tokens (the steps past the end are dropped).
    unrolled = gen(prepared, prompts, sampling=sampling, key=key, eos_id=eos, unroll=3)
    assert unrolled.tokens == cut.tokens and unrolled.finish == cut.finish
    seen = []
    streamed = gen(prepared, prompts, sampling=sampling, key=key, eos_id=eos,
                   on_token=lambda i, toks, routing: seen.append((i, toks.tolist())) and False)
    assert streamed.tokens == cut.tokens and streamed.finish == cut.finish
    assert [i for i, _ in seen] == list(range(len(seen))) and seen[0][1] == [r[0] for r in cut.tokens]
    # Seeded sampling: the same key gives ref/decode.py's tokens; another key other tokens.
    ref = rdecode.generate(mode_params, np.array(prompts[0])[None], CFG, max_new_tokens=NEW, sampling=sampling,
                           key=key)
    alone = gen(prepared, prompts[:1], sampling=sampling, key=key)
    assert ref.tokens[0] == alone.tokens[0]
    other = gen(prepared, prompts, sampling=sampling, key=jax.random.key(8))
    assert other.tokens != free.tokens


def test_context_too_long_is_refused(mode_params):
    with pytest.raises(ValueError, match="context"):
        generate(_prepared(mode_params), [[1] * 250], CFG, EXACT, max_new_tokens=10)

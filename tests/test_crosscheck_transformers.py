"""Our GGUF loader, tokenizer and reference forward against transformers on the real SmolLM2.

transformers (5.x, torch CPU, Python 3.11) loads the same Q4_1 GGUF with its own
reader, dequantizer, q/k reverse-permutation and tokenizer converter; see
tests/crosscheck_setup.py for how it is run and on what text. Needs
`bash .ci/prepare_crosscheck.sh` once; fails (never skips) without it.

One deliberate difference: transformers' GGUF tokenizer ignores the file's
`tokenizer.ggml.pre = smollm` (split digits, then GPT-2's regex) and uses the
GPT-2 regex alone, which cuts "x =  42" into `Ġ Ġ 4 2` instead of `ĠĠ 4 2`.
Ours follows the file (as llama.cpp and SmolLM2's own tokenizer.json do), so we
compare with transformers' tokenizer given that pre-tokenizer, compare our
tokenizer forced to "gpt2" with transformers' as it comes, and check with the
model itself that the digit split is what it was trained on.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.ref.llama import llama_forward
from tests.crosscheck_setup import (MAX_NEW_TOKENS, PROMPT, crosscheck, py311,  # noqa: F401 (fixtures)
                                    smollm2_gguf, smollm2_gpt2_tokenizer, smollm2_model,
                                    smollm2_tokenizer)
from tests.tolerances import DEQUANTIZED_VS_TRANSFORMERS, TINY_VS_TRANSFORMERS_RTOL, TRANSFORMERS_LOGITS_RTOL

pytestmark = pytest.mark.slow


def _forward(params, tokens, cfg):
    return np.asarray(jax.jit(llama_forward, static_argnums=2)(params, jnp.asarray(tokens), cfg))


def _mismatches(ours, theirs, cc, domain=None):
    return [i for i, (a, b) in enumerate(zip(ours, theirs))
            if a != b and (domain is None or cc.domains[i] == domain)]


def test_token_ids_match_transformers(crosscheck, smollm2_tokenizer):
    cc = crosscheck
    ours = smollm2_tokenizer.encode_batch(cc.texts)
    assert [smollm2_tokenizer.encode(t) for t in cc.texts[:50]] == ours[:50]
    bad = _mismatches(ours, cc.results["ids_digits"], cc)
    assert not bad, (f"{len(bad)} of {len(cc.texts)} texts tokenize differently from transformers "
                     f"(+ the file's digit split), first: {cc.texts[bad[0]]!r}")
    counts = {d: cc.domains.count(d) for d in dict.fromkeys(cc.domains)}
    assert min(counts.values()) >= 30 and counts["code"] >= 100, counts
    print(f"\ntoken ids identical on all {len(cc.texts)} texts {counts}, "
          f"{sum(map(len, ours))} tokens")


def test_gpt2_pre_tokenizer_matches_transformers_as_shipped(crosscheck, smollm2_gpt2_tokenizer):
    cc = crosscheck
    gpt2 = smollm2_gpt2_tokenizer.encode_batch(cc.texts)
    bad = _mismatches(gpt2, cc.results["ids_raw"], cc)
    assert not bad, f"first mismatch: {cc.texts[bad[0]]!r}"
    differ = _mismatches(cc.results["ids_digits"], cc.results["ids_raw"], cc)
    by_domain = {d: len([i for i in differ if cc.domains[i] == d]) for d in dict.fromkeys(cc.domains)}
    print(f"\ntransformers' shipped GGUF tokenizer differs from the file's on {by_domain}")
    # The difference is exactly whitespace runs before digits: English prose has none.
    assert by_domain["english"] == 0 and by_domain["code"] > 0


def test_model_prefers_digit_split_tokenization(crosscheck):
    rows = crosscheck.results["log_likelihood"]
    assert len(rows) >= 3
    gain = sum(r["digits"] - r["raw"] for r in rows)
    print(f"\nlog-likelihood of {len(rows)} code snippets: digit split better by {gain:.1f} nats "
          f"({[round(r['digits'] - r['raw'], 1) for r in rows]})")
    assert gain > 0


def test_decode_round_trip_and_matches_transformers(crosscheck, smollm2_tokenizer):
    from mode_jax.model_io.tokenizer import bytes_to_unicode

    tok = smollm2_tokenizer
    vocab_bytes = {b for b, ch in bytes_to_unicode().items() if tok.backend.token_to_id(ch) is not None}
    lossless = 0
    for text, ids, theirs in zip(crosscheck.texts, crosscheck.results["ids_digits"], crosscheck.results["decoded"]):
        assert tok.decode(ids) == theirs
        if set(text.encode("utf-8")) <= vocab_bytes:
            assert tok.decode(tok.encode(text)) == text
            lossless += 1
    assert lossless >= len(crosscheck.texts) - 3
    # Bytes the vocabulary lacks are dropped, as transformers does.
    assert tok.decode(tok.encode("a\x04b")) == "ab"


def test_special_ids_match_transformers(crosscheck, smollm2_tokenizer):
    r = crosscheck.results
    print(f"\ntransformers side: {r['versions']}, seconds {r['timings']}")
    assert (smollm2_tokenizer.bos_id, smollm2_tokenizer.eos_id, smollm2_tokenizer.vocab_size) == \
           (r["bos_token_id"], r["eos_token_id"], r["vocab_size"]) == (1, 2, 49152)


def test_dequantized_weights_match_transformers(crosscheck, smollm2_model):
    params, _ = smollm2_model
    w, layer = crosscheck.weights, params["layers"][0]
    # Independent Q4_1 / Q8_0 dequantizers and q/k un-permutations; float32 rounding only.
    for ours, theirs, name in [(layer["wq"].T, w["q_proj"], "q_proj"), (layer["wk"].T, w["k_proj"], "k_proj"),
                               (layer["wv"].T, w["v_proj"], "v_proj"), (params["embed"][:64], w["embed_rows"], "embed"),
                               (params["final_norm"], w["final_norm"], "final_norm")]:
        np.testing.assert_allclose(np.asarray(ours), theirs, **DEQUANTIZED_VS_TRANSFORMERS, err_msg=name)


def test_logits_match_transformers(crosscheck, smollm2_model):
    params, cfg = smollm2_model
    ours = _forward(params, crosscheck.logit_tokens, cfg)
    theirs = crosscheck.logits
    assert ours.shape == theirs.shape == (4, 128, cfg.vocab_size)
    assert np.isfinite(ours).all() and np.isfinite(theirs).all()
    err = np.abs(ours - theirs)
    rel = float(err.max() / np.abs(theirs).max())
    agree = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    print(f"\nlogits [4, 128, {cfg.vocab_size}]: max abs err {err.max():.3e}, mean abs err {err.mean():.3e}, "
          f"max|ref| {np.abs(theirs).max():.2f}, rel err {rel:.3e}, argmax agreement {agree:.4f}")
    assert rel <= TRANSFORMERS_LOGITS_RTOL, f"relative logits error {rel:.3e} > {TRANSFORMERS_LOGITS_RTOL}"


def test_greedy_decoding_says_paris(crosscheck, smollm2_model, smollm2_tokenizer):
    params, cfg = smollm2_model
    tok = smollm2_tokenizer
    prompt = tok.encode(PROMPT)
    assert prompt == crosscheck.results["prompt_ids"]
    # Causal attention: right-padding to a fixed length leaves earlier positions' logits unchanged,
    # so one compiled shape serves every step.
    width = 32
    fwd = jax.jit(llama_forward, static_argnums=2)
    ids = list(prompt)
    for _ in range(MAX_NEW_TOKENS):
        buf = np.zeros((1, width), np.int32)
        buf[0, :len(ids)] = ids
        logits = fwd(params, jnp.asarray(buf), cfg)
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
        if ids[-1] == tok.eos_id:
            break
    new = ids[len(prompt):]
    theirs = crosscheck.results["greedy_ids"]
    print(f"\ngreedy: ours {tok.decode(new)!r}, transformers {crosscheck.results['greedy_text']!r}")
    assert tok.decode(new).startswith(" Paris")
    assert crosscheck.results["greedy_text"].startswith(" Paris")
    n = min(len(new), len(theirs))
    assert new[:n] == theirs[:n]


def test_saved_hf_dirs_match_transformers(crosscheck):
    """save_hf_dir's layout (names, transposes, rotate-half RoPE, tied head) read by LlamaForCausalLM."""
    for (params, cfg, tokens), theirs in zip(crosscheck.hf_dirs, crosscheck.hf_logits):
        ours = _forward(jax.tree_util.tree_map(jnp.asarray, params), np.array(tokens, np.int32), cfg)
        rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
        assert rel < TINY_VS_TRANSFORMERS_RTOL, f"tie_embeddings={cfg.tie_embeddings}: relative error {rel:.2e}"

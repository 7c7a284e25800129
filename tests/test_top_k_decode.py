"""Generation for MoDE models trained with top-k gating (ModeConfig.gate_top_k): the KV-cache
decoders keep each token's k largest gate logits exactly as training does.

ref/decode.py (prefill, then cached steps) against the full-sequence ref.mode.mode_forward with
the same top-k, float32 and float64; fast/decode.py (prefill, the jitted decode loop, score)
against ref/, float32 and bf16, on draws whose k-th and (k+1)-th gate logits are not near-tied
(tolerances.TOP_K_MARGIN: otherwise rounding could swap the selection and the comparison is
ill-posed); top-k changes the output, so ignoring it fails; and a run trained with
mode.gate_top_k = 1 is served by mode_jax.load / `mode-jax generate`, its greedy tokens the
argmax of ref/'s teacher-forced top-1 logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mode_jax
from mode_jax.cli import main
from mode_jax.fast import decode as fdecode
from mode_jax.fast.config import FastConfig
from mode_jax.fast.generate import generate
from mode_jax.fast.params import to_fast
from mode_jax.ref import decode as rdecode
from mode_jax.ref.llama import lm_head
from mode_jax.ref.methods import apply
from mode_jax.ref.mode import mode_forward, mode_hidden
from mode_jax.ref.sampling import SamplingConfig
from tests.helpers import assert_refused
from tests.test_decode_ref import CFG, tiny_mode
from tests.test_top_k_gate import top_k_gap
from tests.tolerances import ARGMAX_TIE_MARGIN, PROBABILITY_SUM, TOP_K_MARGIN, assert_close

NEW = 6
F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)


@pytest.fixture(scope="module")
def draw():
    """A tiny MoDE model (2 blocks, 2 experts of 2 layers) drawn so that the comparisons are
    well posed and top-k matters (both checked in the tests): gate weights x10
    spread the gate logits, so that on these prompts and what they generate every token's k-th
    and (k+1)-th logits are more than the bf16 margin apart for k = 1 and 2 while the selection
    varies from token to token; the experts' output projections x4 make them differ from the
    backbone (a random residual stack is nearly its input), so the weight top-k drops changes
    the output (beyond float32's tolerance; bf16's absolute one is wider than these logits'
    differences, so there the gate probabilities show it). Prompts of 5 and 8 tokens: a
    ragged batch, which the fast decoder left-pads."""
    params = tiny_mode(seed=4, n_experts=2, expert_layers=2)
    for block in params["blocks"]:
        block["gate_w"] = 10.0 * block["gate_w"]
        for layer in (layer for expert in block["experts"] for layer in expert):
            layer["wo"], layer["w_down"] = 4.0 * layer["wo"], 4.0 * layer["w_down"]
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, CFG.vocab_size, (n,)).astype(np.int32) for n in (5, 8)]
    return params, prompts


def _cached(params, tokens, k):
    """ref/decode.py: prefill 4 tokens, 2 in one step, then one at a time -> (logits, probs)."""
    logits, cache, probs = rdecode.prefill(params, tokens[:, :4], CFG, gate_top_k=k)
    got, got_probs = [logits], [probs]
    for lo, hi in [(4, 6)] + [(t, t + 1) for t in range(6, tokens.shape[1])]:
        logits, cache, probs = rdecode.step(params, cache, tokens[:, lo:hi], CFG, gate_top_k=k)
        got.append(logits)
        got_probs.append(probs)
    assert rdecode.cached_length(cache) == tokens.shape[1]
    return (jnp.concatenate(got, axis=1),
            [jnp.concatenate([p[i] for p in got_probs], axis=1) for i in range(len(params["blocks"]))])


@pytest.mark.parametrize("k", [None, 1, 2])
def test_ref_cached_decoding_equals_full_forward(k, draw):
    params, _ = draw
    tokens = jax.random.randint(jax.random.key(5), (2, 10), 0, CFG.vocab_size)
    if k is not None:
        assert top_k_gap(params, tokens, k) > TOP_K_MARGIN[F32]
    got, probs = _cached(params, tokens, k)
    assert_close(got, mode_forward(params, tokens, CFG, gate_top_k=k), dtype=jnp.float32)
    _, want_probs = mode_hidden(params, tokens, CFG, return_probs=True, gate_top_k=k)
    for p, w in zip(probs, want_probs):
        assert_close(p, w, dtype=jnp.float32)
        np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, **PROBABILITY_SUM)
        # the top-k gate's probabilities: exactly k nonzero per token (all E for the dense gate)
        assert np.all(np.count_nonzero(np.asarray(p), axis=-1) == (k or p.shape[-1]))
    if k is not None:
        # top-k changes the function: the dense model's logits are elsewhere.
        assert outside_tolerance(mode_forward(params, tokens, CFG), got, dtype=jnp.float32)


@pytest.mark.parametrize("k", [1, 2])
def test_ref_cached_decoding_equals_full_forward_float64(k, draw):
    tokens = jax.random.randint(jax.random.key(6), (1, 9), 0, CFG.vocab_size)
    assert top_k_gap(draw[0], tokens, k) > TOP_K_MARGIN[F32]
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), draw[0])
        got, _ = _cached(params, tokens, k)
        assert got.dtype == jnp.float64
        assert_close(got, mode_forward(params, tokens, CFG, gate_top_k=k), dtype=jnp.float64)


def outside_tolerance(actual, expected, *, dtype, scale=1.0) -> bool:
    """Whether `assert_close(actual, expected, dtype=dtype, scale=scale)` would fail."""
    try:
        assert_close(actual, expected, dtype=dtype, scale=scale)
    except AssertionError:
        return True
    return False


@functools.partial(jax.jit, static_argnames="k")
def ref_full(params, seq, k):
    """ref/'s full-sequence top-k forward of one text seq [T]: (logits [T, V], gate
    probabilities [T, n_blocks, E]) at every position."""
    h, probs = mode_hidden(params, seq[None], CFG, return_probs=True, gate_top_k=k)
    return lm_head(params["backbone"], h, CFG)[0], jnp.stack([p[0] for p in probs], axis=1)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_decoding_matches_ref_with_top_k(k, dtype, draw):
    params, prompts = draw
    fast = FastConfig(compute_dtype=dtype)
    tol = dict(dtype=jnp.dtype(dtype), scale=1.0 if dtype == "float32" else 2.0)   # bf16: as test_decode_fast
    prepared = fdecode.prepare(to_fast(params), fast)
    out = generate(prepared, [p.tolist() for p in prompts], CFG, fast, max_new_tokens=NEW, keep_logits=True,
                   bucket=8, gate_top_k=k)
    selected = set()
    for row, prompt in enumerate(prompts):
        new = np.asarray(out.tokens[row])
        assert len(new) == NEW and out.finish[row] == "length"
        seq = np.concatenate([prompt, new])[None]
        assert top_k_gap(params, seq, k) > TOP_K_MARGIN[jnp.dtype(dtype)]
        # teacher-forced: ref/'s top-k forward of the text, at the positions that predicted each new token
        want_logits, want_probs = map(np.asarray, ref_full(params, jnp.asarray(seq[0]), k))
        predicting = slice(len(prompt) - 1, -1)
        # prefill + decode loop: each new token's logits and routing are ref/'s at that position
        assert_close(out.logits[row], want_logits[predicting], err_msg=f"row {row}", **tol)
        assert_close(out.routing[row], want_probs[predicting], err_msg=f"routing row {row}", **tol)
        assert np.all(np.count_nonzero(out.routing[row], axis=-1) == k)
        if dtype == "float32" and row == 0:
            # greedy: ref/decode.py's tokens with the same gate (one row: ref/ decodes eagerly, slowly)
            ref = rdecode.generate(params, prompt[None], CFG, max_new_tokens=NEW, gate_top_k=k, keep_logits=True)
            assert out.tokens[row] == ref.tokens[0]
            assert_close(out.logits[row], np.stack(ref.logits[0]), **tol)
            assert_close(out.routing[row], ref.routing[0], **tol)
        # score: every position of the whole text, its routing included
        tokens, pad = np.zeros((1, 16), np.int32), np.array([16 - seq.shape[1]], np.int32)
        tokens[0, pad[0]:] = seq[0]
        logits, probs = fdecode.score(prepared, jnp.asarray(tokens), jnp.asarray(pad), cfg=CFG, fast=fast, gate_top_k=k)
        assert_close(logits[0, pad[0]:], want_logits, **tol)
        assert_close(probs[0, pad[0]:], want_probs, **tol)
        # top-k is not ignored: the dense decoder's scores fail these very comparisons (its
        # logits only in float32: at bf16 the gap is within the tolerance, see `draw`)
        dense, dense_probs = fdecode.score(prepared, jnp.asarray(tokens), jnp.asarray(pad), cfg=CFG, fast=fast)
        assert outside_tolerance(dense_probs[0, pad[0]:], want_probs, **tol)
        if dtype == "float32":
            assert outside_tolerance(dense[0, pad[0]:], want_logits, **tol)
        selected |= set(np.asarray(probs[0, pad[0]:]).argmax(-1).ravel().tolist())
    assert len(selected) > 1                                # the top stack varies from token to token


def test_fast_streaming_step_with_top_k_equals_the_loop(draw):
    """decode_step (streaming) takes the same gate as the loop."""
    params, prompts = draw
    prepared = fdecode.prepare(to_fast(params), FastConfig.exact())
    kw = dict(max_new_tokens=NEW, keep_logits=True, bucket=8, gate_top_k=1)
    loop = generate(prepared, [prompts[1].tolist()], CFG, FastConfig.exact(), **kw)
    stream = generate(prepared, [prompts[1].tolist()], CFG, FastConfig.exact(), on_token=lambda *a: False, **kw)
    assert stream.tokens == loop.tokens
    assert_close(stream.logits[0], loop.logits[0], dtype=jnp.float32)
    assert_close(stream.routing[0], loop.routing[0], dtype=jnp.float32)


def test_bad_gate_top_k_is_refused(draw):
    prepared = fdecode.prepare(to_fast(draw[0]), FastConfig.exact())
    with pytest.raises(ValueError, match="gate_top_k must be None"):
        generate(prepared, [[1, 2]], CFG, FastConfig.exact(), max_new_tokens=2, gate_top_k=0)


@pytest.mark.slow
def test_top_1_run_is_served_by_load_and_the_cli(tmp_path, capsys, monkeypatch):
    """A compose --uninit run trained with mode.gate_top_k = 1 (smoke preset, 2 steps): loaded,
    its greedy continuation is the argmax of ref/'s teacher-forced top-1 logits at every step,
    its scores are ref/'s top-1 logits (not the dense gate's), and `mode-jax generate --run`
    prints that continuation. A model the decoders cannot run whole is still refused."""
    run = tmp_path / "top1"
    assert main(["compose", "--uninit", "--domains", "math", "code", "--steps", "2", "--preset", "smoke",
                 "--set", "mode.gate_top_k=1", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    model = mode_jax.load(run=str(run))
    assert model.gate_top_k == 1 and model.expert_names == ["backbone", "math", "code"]
    prompt = "12 + 7 = "
    out = model.generate(prompt, max_new_tokens=8)
    ids, new = model.encode(prompt), out.tokens
    assert len(new) >= 1
    seq = jnp.asarray([ids + new[:-1]])
    want = np.asarray(apply(model.params, seq, model.cfg, gate_top_k=1)[0, len(ids) - 1:])   # [n, V]
    top2 = -np.sort(-want, axis=-1)[:, :2]
    assert np.all(top2[:, 0] - top2[:, 1] > ARGMAX_TIE_MARGIN[F32])      # argmax well defined
    assert new == want.argmax(-1).tolist()
    assert np.all(np.count_nonzero(out.routing, axis=-1) == 1)           # one stack per token and block
    # scoring serves the top-1 gate, not the dense one
    text = prompt + "19"
    full = np.asarray(apply(model.params, jnp.asarray([model.encode(text)]), model.cfg, gate_top_k=1)[0])
    assert_close(model.logits(text), full, dtype=jnp.float32)
    dense = np.asarray(apply(model.params, jnp.asarray([model.encode(text)]), model.cfg)[0])
    assert np.max(np.abs(dense - full)) > 1e-3
    # the CLI streams the same greedy text
    assert main(["generate", "--run", str(run), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == out.text + "\n"
    # MoDE blocks beside something the decoders would ignore (here LoRA adapters): refused in one line
    import mode_jax.commands.evaluate as evaluate
    real = evaluate._load_run
    monkeypatch.setattr(evaluate, "_load_run", lambda r, ctx: ({**real(r, ctx)[0], "lora": {}}, "lora", "x"))
    page = tmp_path / "page.html"
    assert_refused(capsys, ["generate", "--run", str(run), "--prompt", prompt, "--routing-html", str(page)], page,
                   "not a MoDE one")

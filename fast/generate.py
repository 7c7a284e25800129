"""The host side of fast generation: batch prompts of any lengths, run `fast/decode.py`'s
jitted prefill and decode loop (or its jitted step, one token at a time, to stream),
and cut each row at its EOS or stop string.

    prepared = decode.prepare(to_fast(params), fast)
    out = generate(prepared, [[1, 2, 3], [4, 5]], cfg, fast, max_new_tokens=32)
    out.tokens, out.finish, out.routing          # as ref.decode.generate returns them

Prompts are left-padded to a multiple of `bucket` columns, so prompts of nearby
lengths share one compiled prefill. Step i's token is drawn with
`ref.sampling.step_key(key, i)`, as in `ref/decode.py`: same seed, same text.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mode_jax.fast import decode
from mode_jax.fast.config import FastConfig
from mode_jax.ref.config import LlamaConfig
from mode_jax.ref.decode import Generation, first_stop
from mode_jax.ref.sampling import SamplingConfig


def left_pad(prompts: Sequence[Sequence[int]], *, bucket: int = 16, pad_id: int = 0):
    """-> (tokens int32 [B, P], pad int32 [B]): each prompt right-aligned in P columns, P the
    longest prompt rounded up to a multiple of `bucket`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = -(-max(len(p) for p in prompts) // bucket) * bucket
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    pad = np.array([width - len(p) for p in prompts], np.int32)
    for row, (p, n) in enumerate(zip(prompts, pad)):
        tokens[row, n:] = p
    return tokens, pad


def _finish_row(tokens: list[int], eos_id: int | None, stop_strings, detokenize) -> tuple[list[int], str]:
    """A row's tokens cut after its first EOS, or at the first token whose text completes a
    stop string; with why it ended ("eos", "stop", "length")."""
    if eos_id is not None and eos_id in tokens:
        cut, why = tokens.index(eos_id) + 1, "eos"
    else:
        cut, why = len(tokens), "length"
    if stop_strings:
        for n in range(1, cut + 1):
            if first_stop(detokenize(tokens[:n]), stop_strings) is not None:
                return tokens[:n], "stop"
    return tokens[:cut], why


def generate(prepared: dict, prompts: Sequence[Sequence[int]], cfg: LlamaConfig, fast: FastConfig, *,
             max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(), key: jax.Array | None = None,
             eos_id: int | None = None, stop_strings: Sequence[str] = (),
             detokenize: Callable[[list[int]], str] | None = None, keep_logits: bool = False,
             bucket: int = 16, unroll: int = 1, gate_top_k: int | None = None,
             on_token: Callable[[int, np.ndarray, np.ndarray], bool] | None = None) -> Generation:
    """Up to `max_new_tokens` new tokens after each prompt (token id lists of any lengths).

    Without `on_token` the whole decode is one jitted loop. With it, tokens are decoded one
    jitted step at a time and `on_token(step, tokens [B], routing [B, n_blocks, E])` is called
    after each (streaming);
    it may return True to stop early. `unroll`: decode steps per loop iteration (decode.decode_loop).
    `gate_top_k`: the top-k gate the MoDE model was trained with (None: dense; static, see
    fast/decode.py).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_strings and detokenize is None:
        raise ValueError("stop_strings need a detokenize function")
    tokens, pad = left_pad(prompts, bucket=bucket)
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(f"generate: token ids must be in [0, {cfg.vocab_size}) (the model's vocabulary), "
                         f"got {tokens.min()}..{tokens.max()}")
    size = tokens.shape[1] + max_new_tokens + unroll - 1
    if max(map(len, prompts)) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({max(map(len, prompts))} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceed the model's context of {cfg.max_seq_len} tokens")
    key = jax.random.key(0) if key is None else key
    statics = dict(cfg=cfg, fast=fast, sampling=sampling, gate_top_k=gate_top_k)
    pad_j = jnp.asarray(pad)
    first, first_logits, first_routing, cache, _ = decode.prefill(prepared, jnp.asarray(tokens), pad_j, key,
                                                                  size=size, **statics)
    eos = -1 if eos_id is None else int(eos_id)
    if on_token is None:
        out, routing, logits, _, _ = decode.decode_loop(
            prepared, cache, first, first_logits, first_routing, jnp.int32(tokens.shape[1]), pad_j, key,
            jnp.int32(eos), max_new=max_new_tokens, keep_logits=keep_logits, unroll=unroll, **statics)
        rows, routing = np.asarray(out).tolist(), np.asarray(routing)
        logits = None if logits is None else np.asarray(logits)
    else:
        rows, routing, logits = _stream(prepared, cache, first, first_logits, first_routing, tokens.shape[1],
                                        pad_j, key, eos, max_new_tokens, keep_logits, on_token, statics)
    result = Generation([], [], [])
    for b, row in enumerate(rows):
        cut, why = _finish_row(row, eos_id, stop_strings, detokenize)
        result.tokens.append(cut)
        result.finish.append(why)
        result.routing.append(routing[b, :len(cut)])
        if keep_logits:
            result.logits.append(logits[b, :len(cut)])
    return result


def _stream(prepared, cache, token, logits, routing, start, pad, key, eos, max_new, keep_logits, on_token,
            statics):
    """One jitted step per token, calling `on_token` after each; -> (rows, routing, logits)."""
    steps = [(np.asarray(token), np.asarray(routing), np.asarray(logits) if keep_logits else None)]
    done = steps[0][0] == eos
    stop = bool(on_token(0, steps[0][0], steps[0][1]))
    for i in range(1, max_new):
        if stop or done.all():
            break
        token, logits, routing, cache = decode.decode_step(prepared, cache, token, jnp.int32(start + i - 1), pad,
                                                           key, jnp.int32(i), **statics)
        tok = np.where(done, max(eos, 0), np.asarray(token))
        token = jnp.asarray(tok)
        steps.append((tok, np.asarray(routing), np.asarray(logits) if keep_logits else None))
        done = done | (tok == eos)
        stop = bool(on_token(i, tok, steps[-1][1]))
    rows = np.stack([s[0] for s in steps], axis=1).tolist()                       # [B, n]
    routing = np.stack([s[1] for s in steps], axis=1)                             # [B, n, n_blocks, E]
    logits = np.stack([s[2] for s in steps], axis=1) if keep_logits else None
    return rows, routing, logits

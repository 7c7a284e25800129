"""Text generation with a KV cache, for a Llama backbone or a MoDE model: written for reading.

Every stack of layers that sees the tokens keeps its own cache: the backbone's L
layers and, in every block, each expert's layers (an expert is a full transformer
layer stack with its own attention, paper section 3, so its keys and values differ
from the backbone's). One layer's cache is {"k": [B, S, K, H], "v": [B, S, K, H]}
over the S tokens seen so far; it grows by concatenation (readable, a new shape per
step; `fast/decode.py` has the static-size version):

    {"backbone": [layer cache] * L,
     "experts":  [[[layer cache] * expert_layers] * N] * n_blocks}     (empty for a backbone)

    step(params, cache, tokens [B, T], cfg) -> (logits [B, T, V], cache, gate probs)
    prefill(params, tokens, cfg)            = step on an empty cache
    generate(params, prompt, cfg, ...)      prefill, then one token at a time

Each takes `gate_top_k` (None: the dense gate of eq. 2): a model trained with top-k
gating (ModeConfig.gate_top_k) keeps each token's k largest gate logits
(`ref.mode.top_k_logits`) here exactly as in training, and its gate probabilities are
0 outside the kept k.

`params` is a ref Llama tree or a MoDE tree ({"backbone", "blocks"}, ref/mode.py).
Rows of a batch have equal length here (no padding); `fast/decode.py` takes ragged
batches. The math is `ref/llama.py`'s and `ref/mode.py`'s: the same building blocks
at positions S..S+T-1 with the cached keys in front.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mode_jax.ref.config import LlamaConfig
from mode_jax.ref.llama import attend, attention_qkv, embed, lm_head, mlp, rms_norm, rope_freq_factors
from mode_jax.ref.mode import gate_logits, gated_combine, top_k_logits
from mode_jax.ref.sampling import SamplingConfig, sample, step_key


def _parts(params: dict) -> tuple[dict, list[dict]]:
    """(backbone, blocks) of a Llama tree (no blocks) or a MoDE tree."""
    if "embed" in params:
        return params, []
    return params["backbone"], params.get("blocks", [])


def empty_cache(params: dict, batch: int, cfg: LlamaConfig) -> dict:
    """A cache that has seen no token yet (S = 0) for every layer of every stack."""
    backbone, blocks = _parts(params)
    dtype = backbone["embed"].dtype

    def layer():
        z = jnp.zeros((batch, 0, cfg.n_kv_heads, cfg.head_dim), dtype)            # [B, 0, K, H]
        return {"k": z, "v": z}
    return {"backbone": [layer() for _ in backbone["layers"]],
            "experts": [[[layer() for _ in expert] for expert in block["experts"]] for block in blocks]}


def cached_length(cache: dict) -> int:
    return int(cache["backbone"][0]["k"].shape[1])


def layer_step(layer: dict, cache: dict, x: jax.Array, cfg: LlamaConfig) -> tuple[jax.Array, dict]:
    """One pre-norm layer (ref.llama.layer_forward) on new tokens x [B, T, D] that follow
    the S cached ones: -> (output [B, T, D], the layer's cache with S + T entries)."""
    s, t = cache["k"].shape[1], x.shape[1]
    positions = jnp.arange(s, s + t)                                              # [T]
    q, k, v = attention_qkv(layer, rms_norm(x, layer["attn_norm"], eps=cfg.norm_eps), positions,
                            n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                            rope_theta=cfg.rope_theta, rope_freq_factors=rope_freq_factors(cfg))
    k = jnp.concatenate([cache["k"], k], axis=1)                                  # [B, S + T, K, H]
    v = jnp.concatenate([cache["v"], v], axis=1)
    # New token i (at position s + i) sees every cached key and the new ones up to itself.
    mask = jnp.arange(s + t)[None, :] <= positions[:, None]                      # [T, S + T]
    h = x + attend(q, k, v, mask) @ layer["wo"]
    return h + mlp(layer, rms_norm(h, layer["mlp_norm"], eps=cfg.norm_eps)), {"k": k, "v": v}


def stack_step(layers: list[dict], caches: list[dict], x: jax.Array, cfg: LlamaConfig):
    """x through a stack of layers, each with its own cache -> (output, new caches)."""
    new = []
    for layer, cache in zip(layers, caches):
        x, c = layer_step(layer, cache, x, cfg)
        new.append(c)
    return x, new


def step(params: dict, cache: dict, tokens: jax.Array, cfg: LlamaConfig, *, gate_top_k: int | None = None):
    """New tokens [B, T] after the cached ones -> (float32 logits [B, T, V], new cache,
    each block's gate probabilities [B, T, E] (a list; empty for a backbone)).
    `gate_top_k`: the top-k gate the model was trained with (None: dense)."""
    backbone, blocks = _parts(params)
    x = embed(backbone, tokens)                                                   # [B, T, D]
    if not blocks:
        x, bb_cache = stack_step(backbone["layers"], cache["backbone"], x, cfg)
        return lm_head(backbone, x, cfg), {"backbone": bb_cache, "experts": []}, []
    per_block = len(backbone["layers"]) // len(blocks)
    bb_cache, ex_cache, probs = [], [], []
    for i, block in enumerate(blocks):
        span = slice(i * per_block, (i + 1) * per_block)
        h_bb, c_bb = stack_step(backbone["layers"][span], cache["backbone"][span], x, cfg)
        outs = [stack_step(expert, c, x, cfg) for expert, c in zip(block["experts"], cache["experts"][i])]
        logits = top_k_logits(gate_logits(block, x), gate_top_k)                  # [B, T, E] (eq. 2)
        probs.append(jax.nn.softmax(logits, axis=-1))
        x = gated_combine(logits, jnp.stack([h_bb, *[h for h, _ in outs]]))      # eq. 1
        bb_cache += c_bb
        ex_cache.append([c for _, c in outs])
    return lm_head(backbone, x, cfg), {"backbone": bb_cache, "experts": ex_cache}, probs


def prefill(params: dict, tokens: jax.Array, cfg: LlamaConfig, *, gate_top_k: int | None = None):
    """The prompt [B, T] on an empty cache: (logits [B, T, V], cache, gate probs)."""
    return step(params, empty_cache(params, tokens.shape[0], cfg), tokens, cfg, gate_top_k=gate_top_k)


@dataclasses.dataclass
class Generation:
    """What `generate` produced, per row of the batch."""
    tokens: list[list[int]]             # new tokens (an EOS that ended a row included)
    finish: list[str]                   # "eos", "stop" (a stop string appeared) or "length"
    routing: list[np.ndarray]           # gate probabilities of each new token [n_new, n_blocks, E]
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)   # [n_new, V] if asked


def first_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text` (None if none does)."""
    found = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return min(found) if found else None


def generate(params: dict, prompt, cfg: LlamaConfig, *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), key: jax.Array | None = None,
             eos_id: int | None = None, stop_strings: Sequence[str] = (),
             detokenize: Callable[[list[int]], str] | None = None,
             keep_logits: bool = False, gate_top_k: int | None = None) -> Generation:
    """Decode up to `max_new_tokens` after `prompt` ([B, T] ids, equal-length rows).

    Step i's token is drawn with `step_key(key, i)`. A row stops at `eos_id` or once
    `detokenize(new tokens)` contains one of `stop_strings`; finished rows are not
    extended, and decoding ends when every row has. `gate_top_k`: as in `step`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_strings and detokenize is None:
        raise ValueError("stop_strings need a detokenize function")
    key = jax.random.key(0) if key is None else key
    tokens = jnp.asarray(prompt, jnp.int32)
    batch = tokens.shape[0]
    logits, cache, probs = prefill(params, tokens, cfg, gate_top_k=gate_top_k)
    last = logits[:, -1]                                                          # [B, V]
    last_probs = [p[:, -1] for p in probs]
    out = Generation([[] for _ in range(batch)], ["length"] * batch, [[] for _ in range(batch)])
    kept = [[] for _ in range(batch)]
    for i in range(max_new_tokens):
        nxt = np.asarray(sample(step_key(key, i), last, sampling))                # [B]
        for b in range(batch):
            if out.finish[b] != "length":
                continue
            out.tokens[b].append(int(nxt[b]))
            out.routing[b].append(np.stack([np.asarray(p[b]) for p in last_probs]) if last_probs
                                  else np.zeros((0, 1), np.float32))
            kept[b].append(np.asarray(last[b]))
            if eos_id is not None and int(nxt[b]) == eos_id:
                out.finish[b] = "eos"
            elif stop_strings and first_stop(detokenize(out.tokens[b]), stop_strings) is not None:
                out.finish[b] = "stop"
        if all(f != "length" for f in out.finish) or i == max_new_tokens - 1:
            break
        logits, cache, probs = step(params, cache, jnp.asarray(nxt)[:, None], cfg, gate_top_k=gate_top_k)
        last, last_probs = logits[:, -1], [p[:, -1] for p in probs]
    out.routing = [np.stack(r) for r in out.routing]
    if keep_logits:
        out.logits = [np.stack(k) for k in kept]
    return out

"""KV-cache text generation of a Llama backbone or a MoDE model, built for speed.

Same function as `ref/decode.py` on the stacked layout of `fast/params.py`:

- the cache has a static size S (prompt bucket + new tokens), one buffer per layer
  (the layout of `ref/decode.py`, with a block's N experts side by side), written in
  place with `dynamic_update_slice` and read whole by the attention, never sliced:
      backbone [{"k", "v": [B, S, K, H]}] * L
      experts  [[{"k", "v": [N, B, S, K, H]}] * expert_layers] * n_blocks
- a batch of prompts of different lengths is left-padded to one length P; row b's
  token at buffer index j has position j - pad[b] (RoPE per row), and its queries see
  the keys pad[b] <= j' <= j. The last prompt column is real in every row, so one
  prefill gives every row's first new token;
- one jitted prefill, then one jitted `lax.while_loop` over new tokens (no Python per
  token; it stops early once every row has produced EOS), or, for streaming, one
  jitted step called per token;
- the N experts of a block are one `vmap` over the expert axis (one batched matmul
  per expert layer, as in training), their caches side by side;
- weights are cast to `FastConfig.compute_dtype` (bf16 by default), q|k|v and gate|up
  joined, and the stacks split into one buffer per layer once, before any of this
  (`prepare`: a slice of a stacked weight inside the step would be a copy per token);
  norms, RoPE, softmax, the gate and the logits are float32;
- a model trained with top-k gating (ModeConfig.gate_top_k) is decoded with the same
  gate: every jitted entry point takes the static `gate_top_k` (None: dense), applied
  to the gate logits by `ref.mode.top_k_logits` as in training (a different k is a
  different program). Every stack still runs; its probabilities are 0 outside the kept k.

Attention over the cache is XLA's masked `jax.nn.dot_product_attention` (a decode
step has one query per row; left padding needs a mask that cuDNN's causal kernel does
not take). Layers run as a Python loop inside the jitted step: a decode step is small
and launch-bound, so one straight-line program beats a loop of loops.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax

from mode_jax.fast.attention import apply_rope, rope_tables
from mode_jax.fast.combine import gated_combine
from mode_jax.fast.config import FastConfig
from mode_jax.fast.model import gate_logits, head_weight, prepare_layers
from mode_jax.fast.norm import rms_norm
from mode_jax.fast.projection import split_projection
from mode_jax.fast.swiglu import swiglu_projection
from mode_jax.ref.config import LlamaConfig
from mode_jax.ref.llama import check_tokens, rope_freq_factors
from mode_jax.ref.mode import top_k_logits
from mode_jax.ref.sampling import SamplingConfig, sample, step_key

F32 = jnp.float32


def _take(tree, *index):
    return jax.tree.map(lambda a: a[index], tree)


def prepare(params: dict, fast: FastConfig) -> dict:
    """A stacked Llama or MoDE tree (`fast.params.to_fast`) as decoding reads it: matrices
    and the embedding in the compute dtype, q|k|v and gate|up joined, backbone layers as a
    list of per-layer dicts and experts as [block][expert layer] dicts of [N, ...] arrays.
    Done once."""
    backbone = params["backbone"] if "backbone" in params else params
    bb = {k: v for k, v in backbone.items() if k != "layers"}
    bb["embed"] = backbone["embed"].astype(fast.dtype)
    if "lm_head" in backbone:
        bb["lm_head"] = backbone["lm_head"].astype(fast.dtype)
    layers = prepare_layers(backbone["layers"], dtype=fast.dtype, fuse=True)
    bb["layers"] = [_take(layers, l) for l in range(layers["attn_norm"].shape[0])]
    out = {"backbone": bb}
    if "blocks" in params and params["blocks"]["gate_w"].shape[0] > 0:
        blocks = params["blocks"]
        experts = prepare_layers(blocks["experts"], dtype=fast.dtype, fuse=True)   # [n_blocks, N, EL, ...]
        n_blocks, _, depth = experts["attn_norm"].shape[:3]
        out["blocks"] = {"experts": [[_take(experts, i, slice(None), e) for e in range(depth)]
                                     for i in range(n_blocks)],
                         "gate_w": blocks["gate_w"].astype(F32), "gate_b": blocks["gate_b"].astype(F32)}
    return out


def init_cache(prepared: dict, batch: int, size: int, cfg: LlamaConfig, fast: FastConfig) -> dict:
    """Zeroed caches of `size` positions for every layer of every stack."""
    kv = (batch, size, cfg.n_kv_heads, cfg.head_dim)

    def zeros(*lead):
        return {n: jnp.zeros((*lead, *kv), fast.dtype) for n in ("k", "v")}
    cache = {"backbone": [zeros() for _ in prepared["backbone"]["layers"]]}
    if "blocks" in prepared:
        cache["experts"] = [[zeros(layer["attn_norm"].shape[0]) for layer in block]
                            for block in prepared["blocks"]["experts"]]
    return cache


def _rotary(positions: jax.Array, cfg: LlamaConfig):
    """cos, sin [B, T, H] for per-row positions [B, T]."""
    b, t = positions.shape
    cos, sin = rope_tables(positions.reshape(-1), head_dim=cfg.head_dim, theta=cfg.rope_theta,
                           freq_factors=rope_freq_factors(cfg))
    return cos.reshape(b, t, -1), sin.reshape(b, t, -1)


def _qkv(layer: dict, x: jax.Array, cos, sin, cfg: LlamaConfig):
    """A layer's rotated q [B, T, N, H] and new k, v [B, T, K, H] of its input x [B, T, D]."""
    b, t, _ = x.shape
    n, kv, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    xn = rms_norm(x, layer["attn_norm"], eps=cfg.norm_eps)
    # "bqkv": Qwen2's q|k|v biases, joined by fast.model.prepare_layers.
    q, k, v = split_projection(xn, layer["wqkv"], (n * h, kv * h, kv * h), bias=layer.get("bqkv"))
    # RoPE per row: fast.attention.apply_rope takes one [T, H] table, so map it over rows.
    rot = jax.vmap(lambda y, c, s: apply_rope(y[None], c, s)[0])
    q = rot(q.reshape(b, t, n, h), cos, sin)                                       # [B, T, N, H]
    k = rot(k.reshape(b, t, kv, h), cos, sin)                                      # [B, T, K, H]
    return q, k, v.reshape(b, t, kv, h)


def _finish(layer: dict, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
            cfg: LlamaConfig) -> jax.Array:
    """The rest of the layer: attention of q over the cache k, v [B, S, K, H] where mask
    [B, T, S], output projection, residual, SwiGLU MLP, residual -> [B, T, D]."""
    b, t, _ = x.shape
    o = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")   # [B, T, N, H]
    r = x + jnp.einsum("BTI,ID->BTD", o.reshape(b, t, -1), layer["wo"])
    u = swiglu_projection(rms_norm(r, layer["mlp_norm"], eps=cfg.norm_eps), layer["w_gate_up"])
    return r + jnp.einsum("BTF,FD->BTD", u, layer["w_down"])


def _backbone_layers(layers, cache, x, lo, hi, write, rot, mask, cfg):
    """Backbone layers lo..hi-1 on x, each writing its new k, v at `write` -> (x, cache)."""
    cache = list(cache)
    for l in range(lo, hi):
        q, k, v = _qkv(layers[l], x, *rot, cfg)
        c = {n: lax.dynamic_update_slice(cache[l][n], new, (0, write, 0, 0)) for n, new in (("k", k), ("v", v))}
        x = _finish(layers[l], x, q, c["k"], c["v"], mask, cfg)
        cache[l] = c
    return x, cache


def _expert_layers(experts, cache, x, block, write, rot, mask, cfg):
    """Block `block`'s N experts (vmapped) on the same x -> ([N, B, T, D], cache);
    experts[block][e] holds expert layer e of every expert ({key: [N, ...]})."""
    n_experts = experts[block][0]["attn_norm"].shape[0]
    xs = jnp.broadcast_to(x, (n_experts, *x.shape))                               # [N, B, T, D]
    cache = [list(c) for c in cache]
    for e, layer in enumerate(experts[block]):
        q, k, v = jax.vmap(lambda lay, y: _qkv(lay, y, *rot, cfg))(layer, xs)     # [N, B, T, ...]
        c = {n: lax.dynamic_update_slice(cache[block][e][n], new, (0, 0, write, 0, 0))
             for n, new in (("k", k), ("v", v))}
        xs = jax.vmap(lambda lay, y, qq, kk, vv: _finish(lay, y, qq, kk, vv, mask, cfg))(layer, xs, q, c["k"], c["v"])
        cache[block][e] = c
    return xs, cache


def forward(prepared: dict, cache: dict, tokens: jax.Array, write: jax.Array, pad: jax.Array,
            cfg: LlamaConfig, fast: FastConfig, *, all_logits: bool = False, gate_top_k: int | None = None):
    """Tokens [B, T] at buffer indices write..write+T-1 (row b's positions minus pad[b]) ->
    (float32 logits [B, V] of the last column, or [B, T, V] with all_logits; new cache;
    gate probabilities [B, T, n_blocks, E], or None for a backbone). `gate_top_k`: the
    model's top-k gate (None: dense)."""
    b, t = tokens.shape
    size = cache["backbone"][0]["k"].shape[1]
    index = write + jnp.arange(t)                                                  # [T] buffer indices
    rot = _rotary(jnp.maximum(index[None, :] - pad[:, None], 0), cfg)
    keys = jnp.arange(size)
    # Row b's query at index i sees keys pad[b] <= j <= i (and itself, so a padding query
    # never has an empty softmax).
    mask = (((keys[None, None, :] >= pad[:, None, None]) & (keys[None, None, :] <= index[None, :, None]))
            | (keys[None, None, :] == index[None, :, None]))                       # [B, T, S]
    backbone = prepared["backbone"]
    x = jnp.take(backbone["embed"], tokens, axis=0)                                # [B, T, D]
    n_layers = len(backbone["layers"])
    probs = None
    if "blocks" not in prepared:
        x, bb = _backbone_layers(backbone["layers"], cache["backbone"], x, 0, n_layers, write, rot, mask, cfg)
        cache = {"backbone": bb}
    else:
        blocks = prepared["blocks"]
        n_blocks = blocks["gate_w"].shape[0]
        per_block = n_layers // n_blocks
        bb, ex, probs = cache["backbone"], cache["experts"], []
        for i in range(n_blocks):
            logits = top_k_logits(gate_logits(blocks["gate_w"][i], blocks["gate_b"][i], x), gate_top_k)   # eq. 2
            h_bb, bb = _backbone_layers(backbone["layers"], bb, x, i * per_block, (i + 1) * per_block,
                                        write, rot, mask, cfg)
            h_ex, ex = _expert_layers(blocks["experts"], ex, x, i, write, rot, mask, cfg)
            probs.append(jax.nn.softmax(logits, axis=-1))
            x = gated_combine(logits, jnp.concatenate([h_bb[None], h_ex]))          # eq. 1
        cache = {"backbone": bb, "experts": ex}
        probs = jnp.stack(probs, axis=2)                                          # [B, T, n_blocks, E]
    h = x if all_logits else x[:, -1:]
    hn = rms_norm(h, backbone["final_norm"], eps=cfg.norm_eps)
    logits = jnp.einsum("BTD,VD->BTV", hn, head_weight(backbone, cfg).astype(hn.dtype), preferred_element_type=F32)
    return (logits if all_logits else logits[:, 0]), cache, probs


def _routing_width(prepared: dict) -> tuple[int, int]:
    if "blocks" not in prepared:
        return 0, 1
    return prepared["blocks"]["gate_w"].shape[0], prepared["blocks"]["gate_w"].shape[2]


def _check_rows(tokens: jax.Array, pad: jax.Array, where: str) -> None:
    """tokens int [B, T] and pad int [B] (chex, while tracing: a one-line ValueError)."""
    check_tokens(tokens, where)
    chex.assert_shape(pad, (tokens.shape[0],), custom_message=f"{where}: pad must be [B] = [{tokens.shape[0]}] "
                      f"(tokens {tokens.shape})", exception_type=ValueError)
    chex.assert_type(pad, int, custom_message=f"{where}: pad must be integer counts", exception_type=ValueError)


@functools.partial(jax.jit, static_argnames=("cfg", "fast", "sampling", "size", "all_logits", "gate_top_k"))
def prefill(prepared: dict, tokens: jax.Array, pad: jax.Array, key: jax.Array, *, cfg: LlamaConfig,
            fast: FastConfig, sampling: SamplingConfig, size: int, all_logits: bool = False,
            gate_top_k: int | None = None):
    """Left-padded prompts [B, P] (pad [B] leading pad columns) into a fresh cache of
    `size` positions -> (first new token [B], its logits [B, V], the last column's gate
    probabilities [B, n_blocks, E], cache, the prompt's logits [B, P, V] if all_logits)."""
    _check_rows(tokens, pad, "prefill")
    cache = init_cache(prepared, tokens.shape[0], size, cfg, fast)
    # Only the last column's logits unless asked: [B, P, V] float32 is 1.6 GB at B=64, P=128.
    logits, cache, probs = forward(prepared, cache, tokens, jnp.int32(0), pad, cfg, fast, all_logits=all_logits,
                                   gate_top_k=gate_top_k)
    last = logits[:, -1] if all_logits else logits
    n_blocks, width = _routing_width(prepared)
    routing = probs[:, -1] if probs is not None else jnp.zeros((tokens.shape[0], n_blocks, width), F32)
    token = sample(step_key(key, 0), last, sampling)
    return token, last, routing, cache, (logits if all_logits else None)


@functools.partial(jax.jit, static_argnames=("cfg", "fast", "sampling", "gate_top_k"), donate_argnames=("cache",))
def decode_step(prepared: dict, cache: dict, token: jax.Array, write: jax.Array, pad: jax.Array,
                key: jax.Array, step: jax.Array, *, cfg: LlamaConfig, fast: FastConfig,
                sampling: SamplingConfig, gate_top_k: int | None = None):
    """Feed token [B] at buffer index `write`, draw decoding step `step`'s token ->
    (token [B], logits [B, V], gate probabilities [B, n_blocks, E], cache). For streaming."""
    chex.assert_rank(token, 1, custom_message="decode_step: token must be [B]", exception_type=ValueError)
    _check_rows(token[:, None], pad, "decode_step")
    logits, cache, probs = forward(prepared, cache, token[:, None], write, pad, cfg, fast, gate_top_k=gate_top_k)
    n_blocks, width = _routing_width(prepared)
    routing = probs[:, 0] if probs is not None else jnp.zeros((token.shape[0], n_blocks, width), F32)
    return sample(step_key(key, step), logits, sampling), logits, routing, cache


@functools.partial(jax.jit, static_argnames=("cfg", "fast", "sampling", "max_new", "keep_logits", "unroll",
                                             "gate_top_k"), donate_argnames=("cache",))
def decode_loop(prepared: dict, cache: dict, first: jax.Array, first_logits: jax.Array, first_routing: jax.Array,
                start: jax.Array, pad: jax.Array, key: jax.Array, eos_id: jax.Array, *, cfg: LlamaConfig,
                fast: FastConfig, sampling: SamplingConfig, max_new: int, keep_logits: bool = False,
                unroll: int = 1, gate_top_k: int | None = None):
    """Steps 1..max_new-1 after the prefill's token `first` [B] (written at index `start`),
    in one `lax.while_loop` that ends early once every row has emitted `eos_id` (-1: none).
    -> (tokens [B, max_new] (after a row's EOS: EOS), routing [B, max_new, n_blocks, E]
    (the gate of the position that predicted each token), logits [B, max_new, V] or None,
    steps taken, the cache). The cache is donated: returned, the loop updates it in place
    instead of first copying it.

    `unroll` decode steps run per loop iteration (fewer loop-condition round trips to the
    host on a GPU); up to unroll - 1 steps past max_new are computed and dropped, so the
    cache needs start + max_new + unroll - 1 positions."""
    b, width = first.shape[0], max_new + unroll - 1
    tokens = jnp.full((b, width), jnp.maximum(eos_id, 0), jnp.int32).at[:, 0].set(first)
    routing = jnp.zeros((b, width, *first_routing.shape[1:]), F32).at[:, 0].set(first_routing)
    logits_out = jnp.zeros((b, width if keep_logits else 1, first_logits.shape[-1]), F32)
    logits_out = logits_out.at[:, 0].set(first_logits)
    done = first == eos_id

    def cond(carry):
        i, _, _, _, _, done = carry
        return (i < max_new) & ~jnp.all(done)

    def one_step(carry):
        i, cache, tokens, routing, logits_out, done = carry
        logits, cache, probs = forward(prepared, cache, tokens[:, i - 1][:, None], start + i - 1, pad, cfg, fast,
                                       gate_top_k=gate_top_k)
        token = sample(step_key(key, i), logits, sampling)
        token = jnp.where(done, tokens[:, i], token)                               # finished rows: EOS
        tokens = tokens.at[:, i].set(token)
        if probs is not None:
            routing = routing.at[:, i].set(jnp.where(done[:, None, None], 0.0, probs[:, 0]))
        if keep_logits:
            logits_out = logits_out.at[:, i].set(logits)
        return i + 1, cache, tokens, routing, logits_out, done | (token == eos_id)

    def body(carry):
        for _ in range(unroll):
            carry = one_step(carry)
        return carry

    steps, cache, tokens, routing, logits_out, _ = lax.while_loop(
        cond, body, (jnp.int32(1), cache, tokens, routing, logits_out, done))
    return (tokens[:, :max_new], routing[:, :max_new], (logits_out[:, :max_new] if keep_logits else None),
            jnp.minimum(steps, max_new), cache)


@functools.partial(jax.jit, static_argnames=("cfg", "fast", "gate_top_k"))
def score(prepared: dict, tokens: jax.Array, pad: jax.Array, *, cfg: LlamaConfig, fast: FastConfig,
          gate_top_k: int | None = None):
    """Left-padded texts [B, T] -> (float32 logits [B, T, V], gate probabilities
    [B, T, n_blocks, E] at every position, or None for a backbone)."""
    _check_rows(tokens, pad, "score")
    cache = init_cache(prepared, tokens.shape[0], tokens.shape[1], cfg, fast)
    logits, _, probs = forward(prepared, cache, tokens, jnp.int32(0), pad, cfg, fast, all_logits=True,
                               gate_top_k=gate_top_k)
    return logits, probs

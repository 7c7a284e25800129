"""The Llama backbone and MoDE (paper section 3, eq. 1-2), built for speed.

Same functions as `ref/llama.py`, `ref/mode.py` and `ref/lora.py`, on the stacked
layout of `fast/params.py`:

- a stack of layers runs as one `lax.scan` over the leading axis of its weights, or
  (`FastConfig.layer_loop`, the default on GPU) as a Python loop over the pieces of
  one split, so each layer's weights and saved activations are their own buffers;
  either way a stack's weights are cast to the compute dtype, and q|k|v, gate|up
  concatenated, once (`prepare_layers`), not once per layer and pass;
- the N experts of a block are one `vmap` over the expert axis, so each expert
  layer is a batched matmul over the experts, not N separate ones;
- a block's merge is fused with the last down-projection of every stack
  (`fast/merge.py`), or, with `FastConfig(merge="stacked")`, every stack runs whole
  and `fast.combine.gated_combine` mixes them;
- activations and matmul inputs are `FastConfig.compute_dtype` (bf16 by default);
  float32 master weights and weights pre-cast to bf16 both work; norm statistics,
  RoPE, softmax and the gate are float32; RMSNorm, SwiGLU and the fused projections
  have VJPs of their own (`fast/norm.py`, `fast/swiglu.py`, `fast/projection.py`)
  that keep only bf16 residuals and write each joined cotangent once;
- blocks run in a Python loop (there are few), so block 0, whose input nothing
  trainable feeds in MoDE, gets no backward pass through its backbone at all.

LoRA runs unmerged: every targeted x @ W is x @ W + (alpha / rank) (x @ A) @ B,
so the frozen W never gets a weight gradient. A LoRA mixture (LoRA-MoE, fast/lora_moe.py) runs
the same way, each layer's router weights added to its adapters by `lora_moe.route` and each
targeted projection's term summed over the LoRAs by `lora_moe.mixed_delta`.

Dimension alphabet as in `ref/__init__.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from mode_jax.fast.attention import apply_rope, causal_attention, pick_implementation, rope_tables
from mode_jax.fast.combine import gated_combine
from mode_jax.fast.config import FastConfig
from mode_jax.fast.merge import fused_merge
from mode_jax.fast.norm import rms_norm
from mode_jax.fast.projection import split_projection
from mode_jax.fast.swiglu import swiglu_projection
from mode_jax.fast import lora_moe
from mode_jax.ref.config import LlamaConfig, LoraConfig
from mode_jax.ref.llama import BIAS_KEYS, check_tokens, rope_freq_factors
from mode_jax.ref.mode import top_k_logits

F32 = jnp.float32
ATTENTION_NAME = "attention_out"


def _attention_saveable(prim, *_, **__) -> bool:
    """True for cuDNN's fused attention forward (its output and softmax statistics): saving
    them spares the backward pass a second attention forward. XLA's attention is plain ops;
    there the output is saved by name and the scores are recomputed."""
    return prim.name.startswith("dot_product_attention_fwd")


_SAVE_ATTENTION = jax.checkpoint_policies.save_from_both_policies(
    _attention_saveable, jax.checkpoint_policies.save_only_these_names(ATTENTION_NAME))
REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
    "attention": _SAVE_ATTENTION,
    "dots_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _SAVE_ATTENTION),
}


def _layer_kwargs(cfg: LlamaConfig, fast: FastConfig, lora: LoraConfig | None) -> dict:
    """The config unpacked once into the keyword scalars the layer functions take."""
    return dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                eps=cfg.norm_eps, dtype=fast.dtype,
                attention=pick_implementation(fast.attention, dtype=fast.dtype, head_dim=cfg.head_dim),
                lora_scale=(lora.alpha / lora.rank) if lora is not None else None,
                fuse=fast.fuse_projections)


def _stack_kwargs(cfg: LlamaConfig, fast: FastConfig, lora: LoraConfig | None = None) -> dict:
    """`_layer_kwargs` plus how a stack of layers is looped over (`scan_layers`)."""
    loop, remat = fast.loop_and_remat()
    return dict(remat=remat, unroll=fast.scan_unroll, loop=loop, **_layer_kwargs(cfg, fast, lora))


MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}


def prepare_layers(layers: dict, *, dtype, fuse: bool) -> dict:
    """A stack's weights as the layer functions read them: matrices (and Qwen2's q/k/v biases)
    in the compute dtype and, with `fuse`, q|k|v and gate|up concatenated along the output
    axis ("wqkv", "w_gate_up"; the biases "bqkv"); norms untouched. Done once per stack (any
    leading axes), outside the loop over layers, so the loop slices weights already cast and
    joined. Same values; a weight's gradient is the compute dtype's until this function's
    own transpose casts it back."""
    biases = tuple(b for b in BIAS_KEYS.values() if b in layers)
    out = {k: v for k, v in layers.items() if k not in MATRICES and k not in biases}
    cast = {k: layers[k].astype(dtype) for k in MATRICES + biases}
    if fuse:
        for name, parts in FUSED.items():
            out[name] = jnp.concatenate([cast.pop(k) for k in parts], axis=-1)
            if all(BIAS_KEYS.get(k) in cast for k in parts):
                out[_fused_bias(name)] = jnp.concatenate([cast.pop(BIAS_KEYS[k]) for k in parts], axis=-1)
    out.update(cast)
    return out


def _fused_bias(fused: str) -> str:
    return "b" + fused[1:]          # "wqkv" -> "bqkv"


def _proj(x, layer, adapters, names, *, lora_scale, split=None):
    """[x @ W[name] (+ its bias) for name in names], x [B, T, in] -> each [B, T, out_name], plus
    the LoRA term (alpha / rank) (x @ A) @ B where `name` has an adapter. `layer` is prepared
    (`prepare_layers`); with `split` = (fused key, output sizes) the projections are one
    matmul against the concatenated weight (D = 576 makes each alone a narrow, inefficient
    matmul), then split; the values are the same."""
    dtype = x.dtype
    if split is not None:
        fused, sizes = split
        ys = split_projection(x, layer[fused], sizes, bias=layer.get(_fused_bias(fused)))
    else:
        ys = [jnp.einsum("BTI,IO->BTO", x, layer[n]) for n in names]
        ys = [y + layer[BIAS_KEYS[n]] if BIAS_KEYS.get(n) in layer else y for y, n in zip(ys, names)]
    if adapters is not None:
        for i, n in enumerate(names):
            if n in adapters and lora_moe.PROBS in adapters:     # a LoRA mixture (fast/lora_moe.py)
                ys[i] = ys[i] + lora_moe.mixed_delta(x, adapters[n], adapters[lora_moe.PROBS], lora_scale)
            elif n in adapters:
                xa = jnp.einsum("BTI,IR->BTR", x, adapters[n]["a"].astype(dtype)) * jnp.asarray(lora_scale, dtype)
                ys[i] = ys[i] + jnp.einsum("BTR,RO->BTO", xa, adapters[n]["b"].astype(dtype))
    return ys


def layer_parts(layer: dict, adapters: dict | None, x: jax.Array, cos, sin, *, n_heads, n_kv_heads,
                head_dim, eps, dtype, attention, lora_scale, fuse=True):
    """One layer up to its down-projection: x [B, T, D] -> (r [B, T, D], u [B, T, F]),
    r the residual stream after attention, u the SwiGLU hidden; the layer's output is
    r + u @ W_down (see `layer_forward`, `fast/merge.py`). `layer` is prepared
    (`prepare_layers` with the same `dtype` and `fuse`)."""
    proj = functools.partial(_proj, layer=layer, adapters=adapters, lora_scale=lora_scale)
    b, t, _ = x.shape
    xn = rms_norm(x, layer["attn_norm"], eps=eps)
    qkv_split = ("wqkv", (n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim)) if fuse else None
    q, k, v = proj(xn, names=("wq", "wk", "wv"), split=qkv_split)
    q = q.reshape(b, t, n_heads, head_dim)                                        # [B, T, N, H]
    k = k.reshape(b, t, n_kv_heads, head_dim)                                     # [B, S, K, H]
    v = v.reshape(b, t, n_kv_heads, head_dim)                                     # [B, S, K, H]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = causal_attention(q, k, v, implementation=attention)                      # [B, T, N, H]
    o = checkpoint_name(o, ATTENTION_NAME)
    r = x + proj(o.reshape(b, t, n_heads * head_dim), names=("wo",))[0]           # [B, T, D]
    rn = rms_norm(r, layer["mlp_norm"], eps=eps)
    if fuse and not (adapters and {"w_gate", "w_up"} & set(adapters)):
        # One matmul forward; backward without joining dg and dup (fast/swiglu.py).
        return r, swiglu_projection(rn, layer["w_gate_up"])                       # [B, T, F]
    gu_split = ("w_gate_up", (layer["w_gate_up"].shape[-1] // 2,) * 2) if fuse else None
    g, up = proj(rn, names=("w_gate", "w_up"), split=gu_split)                   # [B, T, F] each
    u = jax.nn.silu(g.astype(F32)) * up.astype(F32)
    return r, u.astype(dtype)                                                     # [B, T, F]


def layer_forward(layer, adapters, x, cos, sin, **kw):
    """One pre-norm residual layer, x [B, T, D] -> [B, T, D] (`layer` prepared)."""
    adapters = lora_moe.route(adapters, layer, x, eps=kw["eps"])     # a LoRA mixture's router weights
    r, u = layer_parts(layer, adapters, x, cos, sin, **kw)
    return r + _proj(u, layer, adapters, ("w_down",), lora_scale=kw["lora_scale"])[0]


def _take(tree, index):
    return jax.tree.map(lambda a: a[index], tree)


def _depth(layers: dict) -> int:
    return layers["attn_norm"].shape[0]


def _loop_prepared(layers: dict, adapters: dict | None, x: jax.Array, cos, sin, *, remat: str, unroll: int,
                   loop: str, **kw) -> jax.Array:
    """Every (prepared) layer of a stack in turn: `lax.scan` over the leading axis, or a
    Python loop over its pieces (`FastConfig.layer_loop`)."""
    n = _depth(layers)
    if n == 0:
        return x

    def body(h, xs):
        layer, ad = xs
        return layer_forward(layer, ad, h, cos, sin, **kw), None

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
    if loop == "scan":
        return lax.scan(body, x, (layers, adapters), unroll=unroll)[0]
    # One split per array (its transpose is one concatenation), not n slices: a slice's
    # transpose would pad every layer's gradient to the whole stack.
    pieces = jax.tree.map(lambda a: [p[0] for p in jnp.split(a, n, axis=0)], (layers, adapters))
    for i in range(n):
        x, _ = body(x, jax.tree.map(lambda p: p[i], pieces, is_leaf=lambda p: isinstance(p, list)))
    return x


def scan_layers(layers: dict, adapters: dict | None, x: jax.Array, cos, sin, *, remat: str,
                unroll: int, loop: str = "scan", **kw) -> jax.Array:
    """Every layer of a stack ({key: [L, ...]}, as stored) in turn."""
    prepared = prepare_layers(layers, dtype=kw["dtype"], fuse=kw.get("fuse", True))
    return _loop_prepared(prepared, adapters, x, cos, sin, remat=remat, unroll=unroll, loop=loop, **kw)


def stack_parts(layers: dict, x: jax.Array, cos, sin, *, remat: str, unroll: int, loop: str = "scan", **kw):
    """A whole stack but its last down-projection: -> (r, u) of the last layer."""
    n = _depth(layers)
    prepared = prepare_layers(layers, dtype=kw["dtype"], fuse=kw.get("fuse", True))
    x = _loop_prepared(_take(prepared, slice(0, n - 1)), None, x, cos, sin, remat=remat, unroll=unroll,
                       loop=loop, **kw)
    return layer_parts(_take(prepared, n - 1), None, x, cos, sin, **kw)


def _rope(t: int, cfg: LlamaConfig):
    return rope_tables(jnp.arange(t), head_dim=cfg.head_dim, theta=cfg.rope_theta,
                       freq_factors=rope_freq_factors(cfg))                          # [T, H] each


def gate_logits(gate_w: jax.Array, gate_b: jax.Array, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> float32 gate logits [B, T, E] (eq. 2, before the softmax)."""
    return jnp.einsum("BTD,DE->BTE", x.astype(F32), gate_w.astype(F32)) + gate_b.astype(F32)


def _identity(x):
    return x


@dataclasses.dataclass(frozen=True)
class Hooks:
    """What a sharded step changes in the MoDE forward (`fast/steps.py` sets them):
    `constrain` pins each block's input and output (x [B, T, D]) to the batch sharding;
    `combine` is the stacked merge (logits [B, T, E], outputs [E, B, T, D] -> [B, T, D]),
    e.g. the Pallas combine per batch shard under shard_map (`fast/sharded_combine.py`).
    The fused merge (`fast/merge.py`) is plain XLA, which partitions it by itself."""
    constrain: Callable[[jax.Array], jax.Array] = _identity
    combine: Callable[[jax.Array, jax.Array], jax.Array] = gated_combine


def block_forward(backbone_layers: dict, block: dict, x: jax.Array, cfg: LlamaConfig,
                  fast: FastConfig, *, return_probs: bool = False, hooks: Hooks | None = None,
                  gate_top_k: int | None = None):
    """One MoDE block (eq. 1-2): x [B, T, D] -> y [B, T, D] (and the gate probabilities [B, T, E]).

    backbone_layers: {key: [L_block, ...]} the block's backbone layers;
    block: {"experts": {key: [N, expert_layers, ...]}, "gate_w": [D, E], "gate_b": [E]}.
    gate_top_k: keep each token's k largest logits (ref.mode.top_k_logits; None: dense). The
    others become -inf, so both merges' softmax gives them weight 0 and gradient 0: the fused
    merge's algebra is unchanged (every stack still runs; a sparse dispatch would skip them).
    """
    hooks = hooks or Hooks()
    stack_kw = _stack_kwargs(cfg, fast)
    cos, sin = _rope(x.shape[1], cfg)
    logits = top_k_logits(gate_logits(block["gate_w"], block["gate_b"], x), gate_top_k)   # [B, T, E]
    experts = block["experts"]
    n_experts = experts["wq"].shape[0]
    if n_experts == 0:
        # softmax over one column is exactly 1: the block is its backbone layers.
        y = scan_layers(backbone_layers, None, x, cos, sin, **stack_kw)
    elif fast.merge == "fused":
        r_bb, u_bb = stack_parts(backbone_layers, x, cos, sin, **stack_kw)
        r_ex, u_ex = jax.vmap(lambda layers: stack_parts(layers, x, cos, sin, **stack_kw))(experts)
        last = _depth(backbone_layers) - 1
        y = fused_merge(logits, r_bb, u_bb, backbone_layers["w_down"][last],
                        r_ex, u_ex, experts["w_down"][:, -1])                     # [B, T, D]
    else:
        h_bb = scan_layers(backbone_layers, None, x, cos, sin, **stack_kw)        # [B, T, D]
        h_ex = jax.vmap(lambda layers: scan_layers(layers, None, x, cos, sin, **stack_kw))(experts)
        y = hooks.combine(logits, jnp.concatenate([h_bb[None], h_ex]))           # [B, T, D]
    if return_probs:
        return y, jax.nn.softmax(logits, axis=-1)
    return y


def embed(backbone: dict, tokens: jax.Array, dtype) -> jax.Array:
    """tokens [B, T] -> [B, T, D]; gathered from the stored table, so a float32 master
    embedding gets its (scatter-added) gradient in float32."""
    return jnp.take(backbone["embed"], tokens, axis=0).astype(dtype)


def llama_hidden(backbone: dict, tokens: jax.Array, cfg: LlamaConfig, fast: FastConfig,
                 adapters: dict | None = None, lora: LoraConfig | None = None) -> jax.Array:
    """The last layer's output [B, T, D] (before the final norm). `adapters` is the
    stacked LoRA tree {"layers": {name: {"a", "b"}}} (with its `lora` config)."""
    if (adapters is None) != (lora is None):
        raise ValueError("LoRA adapters and their LoraConfig go together")
    check_tokens(tokens, "llama_hidden")        # chex, while tracing: a one-line ValueError
    cos, sin = _rope(tokens.shape[1], cfg)
    x = embed(backbone, tokens, fast.dtype)
    return scan_layers(backbone["layers"], None if adapters is None else adapters["layers"], x, cos, sin,
                       **_stack_kwargs(cfg, fast, lora))


def mode_hidden(params: dict, tokens: jax.Array, cfg: LlamaConfig, fast: FastConfig, *,
                return_probs: bool = False, hooks: Hooks | None = None, gate_top_k: int | None = None):
    """The last block's mixed output [B, T, D] (and each block's gate probabilities).
    `hooks`: what a sharded step changes (see `Hooks`); `gate_top_k`: see `block_forward`."""
    hooks = hooks or Hooks()
    check_tokens(tokens, "mode_hidden")         # chex, while tracing: a one-line ValueError
    backbone, blocks = params["backbone"], params["blocks"]
    n_blocks = blocks["gate_w"].shape[0]
    n_layers = _depth(backbone["layers"])
    if n_layers % n_blocks:
        raise ValueError(f"{n_layers} backbone layers are not divisible into {n_blocks} blocks")
    per_block = n_layers // n_blocks
    x = hooks.constrain(embed(backbone, tokens, fast.dtype))                      # [B, T, D]
    probs = []
    for i in range(n_blocks):
        layers = _take(backbone["layers"], slice(i * per_block, (i + 1) * per_block))
        out = block_forward(layers, _take(blocks, i), x, cfg, fast, return_probs=return_probs, hooks=hooks,
                            gate_top_k=gate_top_k)
        x, p = out if return_probs else (out, None)
        x = hooks.constrain(x)
        probs.append(p)
    return (x, probs) if return_probs else x


def hidden(params: dict, tokens: jax.Array, cfg: LlamaConfig, fast: FastConfig,
           lora: LoraConfig | None = None, *, gate_top_k: int | None = None) -> jax.Array:
    """The final hidden state [B, T, D] of whichever model `params` holds (as ref.methods.apply)."""
    if "btx" in params:
        # BTX (fast/btx.py) is built from this module's layers: imported here.
        from mode_jax.fast.btx import btx_hidden
        return btx_hidden(params, tokens, cfg, fast)[0]
    if "expansion" in params:
        # Block expansion (fast/expansion.py) is built from this module's stacks: imported here.
        from mode_jax.fast.expansion import expansion_hidden
        return expansion_hidden(params, tokens, cfg, fast)
    if "blocks" in params:
        if "lora" in params:
            raise NotImplementedError("fast/: MoDE over a LoRA-adapted backbone is not supported")
        return mode_hidden(params, tokens, cfg, fast, gate_top_k=gate_top_k)
    if "lora_moe" in params:
        if lora is None:
            raise ValueError("params hold a LoRA mixture but no LoraConfig was given")
        return llama_hidden(params["backbone"], tokens, cfg, fast, params["lora_moe"], lora)
    if "lora" in params:
        if lora is None:
            raise ValueError("params hold LoRA adapters but no LoraConfig was given")
        return llama_hidden(params["backbone"], tokens, cfg, fast, params["lora"], lora)
    return llama_hidden(params["backbone"], tokens, cfg, fast)


def head_weight(backbone: dict, cfg: LlamaConfig) -> jax.Array:
    """The output projection as [V, D] (the embedding itself when tied)."""
    return backbone["embed"] if cfg.tie_embeddings else backbone["lm_head"].T


def final_norm(backbone: dict, h: jax.Array, cfg: LlamaConfig) -> jax.Array:
    return rms_norm(h, backbone["final_norm"], eps=cfg.norm_eps)


def logits(params: dict, tokens: jax.Array, cfg: LlamaConfig, fast: FastConfig,
           lora: LoraConfig | None = None, *, gate_top_k: int | None = None) -> jax.Array:
    """tokens [B, T] -> float32 logits [B, T, V], all at once (tests, small evals; the
    training loss never builds these: see `fast/loss.py`)."""
    backbone = params["backbone"]
    hn = final_norm(backbone, hidden(params, tokens, cfg, fast, lora, gate_top_k=gate_top_k), cfg)
    return jnp.einsum("BTD,VD->BTV", hn, head_weight(backbone, cfg).astype(fast.dtype),
                      preferred_element_type=F32)

"""The Llama backbone and MoDE (paper section 3, eq. 1-2), built for speed.

Same functions as `ref/llama.py`, `ref/mode.py` and `ref/lora.py`, on the stacked
layout of `fast/params.py`:

- a stack of layers is one `lax.scan` over the leading axis of its weights;
- the N experts of a block are one `vmap` over the expert axis, so each expert
  layer is a batched matmul over the experts, not N separate ones;
- a block's merge is fused with the last down-projection of every stack
  (`fast/merge.py`), or, with `FastConfig(merge="stacked")`, every stack runs whole
  and `fast.combine.gated_combine` mixes them;
- activations and matmul inputs are `FastConfig.compute_dtype` (bf16 by default);
  weights are cast where used, so float32 master weights and weights pre-cast to
  bf16 both work; norm statistics, RoPE, softmax and the gate are float32;
- blocks run in a Python loop (there are few), so block 0, whose input nothing
  trainable feeds in MoDE, gets no backward pass through its backbone at all.

LoRA runs unmerged: every targeted x @ W is x @ W + (alpha / rank) (x @ A) @ B,
so the frozen W never gets a weight gradient.

Dimension alphabet as in `ref/__init__.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mode_jax.fast.attention import apply_rope, causal_attention, pick_implementation, rope_tables
from mode_jax.fast.combine import gated_combine
from mode_jax.fast.config import FastConfig
from mode_jax.fast.merge import fused_merge
from mode_jax.ref.config import LlamaConfig, LoraConfig
from mode_jax.ref.llama import rms_norm

F32 = jnp.float32
REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _layer_kwargs(cfg: LlamaConfig, fast: FastConfig, lora: LoraConfig | None) -> dict:
    """The config unpacked once into the keyword scalars the layer functions take."""
    return dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                eps=cfg.norm_eps, dtype=fast.dtype,
                attention=pick_implementation(fast.attention, dtype=fast.dtype, head_dim=cfg.head_dim),
                lora_scale=(lora.alpha / lora.rank) if lora is not None else None,
                fuse=fast.fuse_projections)


def _proj(x, layer, adapters, names, *, dtype, lora_scale, fuse):
    """[x @ W[name] for name in names], x [B, T, in] -> each [B, T, out_name], plus the LoRA
    term (alpha / rank) (x @ A) @ B where `name` has an adapter. With `fuse`, projections of
    the same input are one matmul against their weights concatenated along the output axis
    (D = 576 makes each alone a narrow, inefficient matmul); the values are the same."""
    if fuse and len(names) > 1:
        w = jnp.concatenate([layer[n].astype(dtype) for n in names], axis=1)     # [in, sum out]
        y = jnp.einsum("BTI,IO->BTO", x, w)
        splits = np.cumsum([layer[n].shape[1] for n in names])[:-1]
        ys = jnp.split(y, splits, axis=-1)
    else:
        ys = [jnp.einsum("BTI,IO->BTO", x, layer[n].astype(dtype)) for n in names]
    if adapters is not None:
        for i, n in enumerate(names):
            if n in adapters:
                xa = jnp.einsum("BTI,IR->BTR", x, adapters[n]["a"].astype(dtype)) * jnp.asarray(lora_scale, dtype)
                ys[i] = ys[i] + jnp.einsum("BTR,RO->BTO", xa, adapters[n]["b"].astype(dtype))
    return ys


def layer_parts(layer: dict, adapters: dict | None, x: jax.Array, cos, sin, *, n_heads, n_kv_heads,
                head_dim, eps, dtype, attention, lora_scale, fuse=True):
    """One layer up to its down-projection: x [B, T, D] -> (r [B, T, D], u [B, T, F]),
    r the residual stream after attention, u the SwiGLU hidden; the layer's output is
    r + u @ W_down (see `layer_forward`, `fast/merge.py`)."""
    proj = functools.partial(_proj, layer=layer, adapters=adapters, dtype=dtype, lora_scale=lora_scale,
                             fuse=fuse)
    b, t, _ = x.shape
    xn = rms_norm(x, layer["attn_norm"], eps=eps)
    q, k, v = proj(xn, names=("wq", "wk", "wv"))
    q = q.reshape(b, t, n_heads, head_dim)                                        # [B, T, N, H]
    k = k.reshape(b, t, n_kv_heads, head_dim)                                     # [B, S, K, H]
    v = v.reshape(b, t, n_kv_heads, head_dim)                                     # [B, S, K, H]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = causal_attention(q, k, v, implementation=attention)                      # [B, T, N, H]
    r = x + proj(o.reshape(b, t, n_heads * head_dim), names=("wo",))[0]           # [B, T, D]
    rn = rms_norm(r, layer["mlp_norm"], eps=eps)
    g, up = proj(rn, names=("w_gate", "w_up"))                                    # [B, T, F] each
    u = jax.nn.silu(g.astype(F32)) * up.astype(F32)
    return r, u.astype(dtype)                                                     # [B, T, F]


def layer_forward(layer, adapters, x, cos, sin, **kw):
    """One pre-norm residual layer, x [B, T, D] -> [B, T, D]."""
    r, u = layer_parts(layer, adapters, x, cos, sin, **kw)
    return r + _proj(u, layer, adapters, ("w_down",), dtype=kw["dtype"], lora_scale=kw["lora_scale"],
                     fuse=False)[0]


def _take(tree, index):
    return jax.tree.map(lambda a: a[index], tree)


def _depth(layers: dict) -> int:
    return layers["wq"].shape[0]


def scan_layers(layers: dict, adapters: dict | None, x: jax.Array, cos, sin, *, remat: str,
                unroll: int, **kw) -> jax.Array:
    """Every layer of a stack in turn: weights [L, ...] scanned over their leading axis."""
    if _depth(layers) == 0:
        return x

    def body(h, xs):
        layer, ad = xs
        return layer_forward(layer, ad, h, cos, sin, **kw), None

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
    x, _ = lax.scan(body, x, (layers, adapters), unroll=unroll)
    return x


def stack_parts(layers: dict, x: jax.Array, cos, sin, *, remat: str, unroll: int, **kw):
    """A whole stack but its last down-projection: -> (r, u) of the last layer."""
    n = _depth(layers)
    x = scan_layers(_take(layers, slice(0, n - 1)), None, x, cos, sin, remat=remat, unroll=unroll, **kw)
    return layer_parts(_take(layers, n - 1), None, x, cos, sin, **kw)


def _rope(t: int, cfg: LlamaConfig):
    return rope_tables(jnp.arange(t), head_dim=cfg.head_dim, theta=cfg.rope_theta)   # [T, H] each


def gate_logits(gate_w: jax.Array, gate_b: jax.Array, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> float32 gate logits [B, T, E] (eq. 2, before the softmax)."""
    return jnp.einsum("BTD,DE->BTE", x.astype(F32), gate_w.astype(F32)) + gate_b.astype(F32)


def block_forward(backbone_layers: dict, block: dict, x: jax.Array, cfg: LlamaConfig,
                  fast: FastConfig, *, return_probs: bool = False):
    """One MoDE block (eq. 1-2): x [B, T, D] -> y [B, T, D] (and the gate probabilities [B, T, E]).

    backbone_layers: {key: [L_block, ...]} the block's backbone layers;
    block: {"experts": {key: [N, expert_layers, ...]}, "gate_w": [D, E], "gate_b": [E]}.
    """
    kw = _layer_kwargs(cfg, fast, None)
    stack_kw = dict(remat=fast.remat, unroll=fast.scan_unroll, **kw)
    cos, sin = _rope(x.shape[1], cfg)
    logits = gate_logits(block["gate_w"], block["gate_b"], x)                     # [B, T, E]
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
        y = gated_combine(logits, jnp.concatenate([h_bb[None], h_ex]))           # [B, T, D]
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
    kw = _layer_kwargs(cfg, fast, lora)
    cos, sin = _rope(tokens.shape[1], cfg)
    x = embed(backbone, tokens, fast.dtype)
    return scan_layers(backbone["layers"], None if adapters is None else adapters["layers"], x, cos, sin,
                       remat=fast.remat, unroll=fast.scan_unroll, **kw)


def mode_hidden(params: dict, tokens: jax.Array, cfg: LlamaConfig, fast: FastConfig, *,
                return_probs: bool = False):
    """The last block's mixed output [B, T, D] (and each block's gate probabilities)."""
    backbone, blocks = params["backbone"], params["blocks"]
    n_blocks = blocks["gate_w"].shape[0]
    n_layers = _depth(backbone["layers"])
    if n_layers % n_blocks:
        raise ValueError(f"{n_layers} backbone layers are not divisible into {n_blocks} blocks")
    per_block = n_layers // n_blocks
    x = embed(backbone, tokens, fast.dtype)                                       # [B, T, D]
    probs = []
    for i in range(n_blocks):
        layers = _take(backbone["layers"], slice(i * per_block, (i + 1) * per_block))
        out = block_forward(layers, _take(blocks, i), x, cfg, fast, return_probs=return_probs)
        x, p = out if return_probs else (out, None)
        probs.append(p)
    return (x, probs) if return_probs else x


def hidden(params: dict, tokens: jax.Array, cfg: LlamaConfig, fast: FastConfig,
           lora: LoraConfig | None = None) -> jax.Array:
    """The final hidden state [B, T, D] of whichever model `params` holds (as ref.methods.apply)."""
    if "blocks" in params:
        if "lora" in params:
            raise NotImplementedError("fast/: MoDE over a LoRA-adapted backbone is not supported")
        return mode_hidden(params, tokens, cfg, fast)
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
           lora: LoraConfig | None = None) -> jax.Array:
    """tokens [B, T] -> float32 logits [B, T, V], all at once (tests, small evals; the
    training loss never builds these: see `fast/loss.py`)."""
    backbone = params["backbone"]
    hn = final_norm(backbone, hidden(params, tokens, cfg, fast, lora), cfg)
    return jnp.einsum("BTD,VD->BTV", hn, head_weight(backbone, cfg).astype(fast.dtype),
                      preferred_element_type=F32)

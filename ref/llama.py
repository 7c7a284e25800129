"""A Llama-family causal LM, written for reading: the backbone MoDE wraps.

Pre-norm residual layers (RMSNorm -> grouped-query causal attention with rotary
embeddings -> RMSNorm -> SwiGLU MLP), a final RMSNorm and a tied or untied LM
head. Rotary embeddings use the "rotate half" layout of Hugging Face's Llama
(loaders convert llama.cpp's interleaved q/k rows to it).

Params are nested dicts; matrices are stored [in, out] so `x @ w` applies them:

    {"embed": [V, D], "final_norm": [D], "lm_head": [D, V] (untied only),
     "layers": [{"attn_norm": [D], "wq": [D, N*H], "wk": [D, K*H], "wv": [D, K*H],
                 "wo": [N*H, D], "mlp_norm": [D], "w_gate": [D, F], "w_up": [D, F],
                 "w_down": [F, D]}, ... L of them]}
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mode_jax.ref.config import LlamaConfig

LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def layer_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    d, f = cfg.d_model, cfg.d_ff
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"attn_norm": (d,), "wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d),
            "mlp_norm": (d,), "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}


def param_shapes(cfg: LlamaConfig) -> dict:
    """The param tree of `init_llama`, with shape tuples as leaves."""
    shapes = {"embed": (cfg.vocab_size, cfg.d_model), "final_norm": (cfg.d_model,),
              "layers": [layer_shapes(cfg) for _ in range(cfg.n_layers)]}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (cfg.d_model, cfg.vocab_size)
    return shapes


def check_params(params: dict, cfg: LlamaConfig) -> None:
    """Raise `ValueError` naming the first entry whose presence or shape disagrees with `cfg`."""
    expected = param_shapes(cfg)
    if len(params.get("layers", [])) != cfg.n_layers:
        raise ValueError(f"params['layers'] has {len(params.get('layers', []))} layers, "
                         f"config n_layers={cfg.n_layers}")
    flat_expected = jax.tree_util.tree_flatten_with_path(expected, is_leaf=lambda s: isinstance(s, tuple))[0]
    for path, shape in flat_expected:
        node = params
        for key in path:
            k = key.key if hasattr(key, "key") else key.idx
            if (isinstance(node, dict) and k not in node) or (isinstance(node, list) and k >= len(node)):
                raise ValueError(f"params{jax.tree_util.keystr(path)} is missing (config expects shape {shape})")
            node = node[k]
        if tuple(node.shape) != shape:
            raise ValueError(f"params{jax.tree_util.keystr(path)} has shape {tuple(node.shape)}, "
                             f"config expects {shape}")


def init_layer(key: jax.Array, cfg: LlamaConfig, dtype=jnp.float32) -> dict:
    """One transformer layer: N(0, 0.02) matrices, output projections scaled down
    by sqrt(2 L) so the residual stream's variance stays O(1) at init; unit norms."""
    shapes = layer_shapes(cfg)
    keys = dict(zip(LAYER_KEYS, jax.random.split(key, len(LAYER_KEYS))))
    out_scale = 1.0 / np.sqrt(2.0 * cfg.n_layers)
    layer = {}
    for name, shape in shapes.items():
        if name.endswith("norm"):
            layer[name] = jnp.ones(shape, dtype)
        else:
            std = 0.02 * (out_scale if name in ("wo", "w_down") else 1.0)
            layer[name] = (std * jax.random.normal(keys[name], shape)).astype(dtype)
    return layer


def init_llama(key: jax.Array, cfg: LlamaConfig, dtype=jnp.float32) -> dict:
    k_embed, k_head, *k_layers = jax.random.split(key, cfg.n_layers + 2)
    params = {
        "embed": (0.02 * jax.random.normal(k_embed, (cfg.vocab_size, cfg.d_model))).astype(dtype),
        "layers": [init_layer(k, cfg, dtype) for k in k_layers],
        "final_norm": jnp.ones((cfg.d_model,), dtype),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = (0.02 * jax.random.normal(k_head, (cfg.d_model, cfg.vocab_size))).astype(dtype)
    return params


def upcast(x: jax.Array) -> jax.Array:
    """x in at least float32 (float64 stays float64, so gradient checks stay exact)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float) -> jax.Array:
    """x / rms(x) * scale, with the statistics in at least float32 whatever x's dtype."""
    x32 = upcast(x)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * upcast(scale)).astype(x.dtype)


def rope_tables(positions: jax.Array, *, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [T, H] for the rotate-half layout (frequency i on dims i and i + H/2)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2) / head_dim))  # [H/2], float32 (or 64 under x64)
    angles = positions[:, None] * inv_freq[None, :]                      # [T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)                                    # [T, H]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, H] by position: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = upcast(x) * cos[None, :, None, :] + upcast(rotated) * sin[None, :, None, :]
    return out.astype(x.dtype)


def attention_qkv(layer: dict, x: jax.Array, positions: jax.Array, *, n_heads: int, n_kv_heads: int,
                  head_dim: int, rope_theta: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, T, N, H] and k, v [B, T, K, H] of x [B, T, D]; q and k rotated for `positions` [T]."""
    b, t, _ = x.shape
    q = (x @ layer["wq"]).reshape(b, t, n_heads, head_dim)        # [B, T, N, H]
    k = (x @ layer["wk"]).reshape(b, t, n_kv_heads, head_dim)     # [B, S, K, H]
    v = (x @ layer["wv"]).reshape(b, t, n_kv_heads, head_dim)     # [B, S, K, H]
    cos, sin = rope_tables(positions, head_dim=head_dim, theta=rope_theta)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v over the keys where mask [T, S] is True:
    q [B, T, N, H], k, v [B, S, K, H] -> [B, T, N*H] (before the output projection)."""
    b, t, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    # Each group of N/K query heads shares one kv head.
    group = n_heads // n_kv_heads
    q = q.reshape(b, t, n_kv_heads, group, head_dim)              # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    scores = scores / np.sqrt(head_dim)
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)       # [B, K, G, T, S]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)                # [B, T, K, G, H]
    return out.reshape(b, t, n_heads * head_dim)


def attention(layer: dict, x: jax.Array, *, n_heads: int, n_kv_heads: int, head_dim: int,
              rope_theta: float) -> jax.Array:
    """Grouped-query causal self-attention of x [B, T, D] -> [B, T, D] (no norm, no residual)."""
    t = x.shape[1]
    q, k, v = attention_qkv(layer, x, jnp.arange(t), n_heads=n_heads, n_kv_heads=n_kv_heads,
                            head_dim=head_dim, rope_theta=rope_theta)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    return attend(q, k, v, causal) @ layer["wo"]


def mlp(layer: dict, x: jax.Array) -> jax.Array:
    """SwiGLU: (silu(x W_gate) * x W_up) W_down."""
    return (jax.nn.silu(x @ layer["w_gate"]) * (x @ layer["w_up"])) @ layer["w_down"]


def layer_forward(layer: dict, x: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """One pre-norm residual layer, x [B, T, D] -> [B, T, D]."""
    h = x + attention(layer, rms_norm(x, layer["attn_norm"], eps=cfg.norm_eps),
                      n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                      head_dim=cfg.head_dim, rope_theta=cfg.rope_theta)
    return h + mlp(layer, rms_norm(h, layer["mlp_norm"], eps=cfg.norm_eps))


def layers_forward(layers: list[dict], x: jax.Array, cfg: LlamaConfig) -> jax.Array:
    for layer in layers:
        x = layer_forward(layer, x, cfg)
    return x


def embed(params: dict, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] int -> [B, T, D]."""
    return jnp.take(params["embed"], tokens, axis=0)


def lm_head(params: dict, h: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Final norm and output projection: h [B, T, D] -> logits [B, T, V], at least float32."""
    h = rms_norm(h, params["final_norm"], eps=cfg.norm_eps)
    w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]   # [D, V]
    return jnp.einsum("BTD,DV->BTV", h, w, preferred_element_type=jnp.promote_types(h.dtype, jnp.float32))


def llama_hidden(params: dict, tokens: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """The last layer's output (before the final norm), [B, T, D]."""
    return layers_forward(params["layers"], embed(params, tokens), cfg)


def llama_forward(params: dict, tokens: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """tokens [B, T] -> float32 logits [B, T, V]."""
    return lm_head(params, llama_hidden(params, tokens, cfg), cfg)

"""A Llama-family causal LM, written for reading: the backbone MoDE wraps.

Pre-norm residual layers (RMSNorm -> grouped-query causal attention with rotary
embeddings -> RMSNorm -> SwiGLU MLP), a final RMSNorm and a tied or untied LM
head. Rotary embeddings use the "rotate half" layout of Hugging Face's Llama
(loaders convert llama.cpp's interleaved q/k rows to it), with Llama 3's
frequency scaling when the config asks for it. Qwen2 is the same network with
biases on the q, k and v projections (`LlamaConfig.qkv_bias`).

Params are nested dicts; matrices are stored [in, out] so `x @ w` applies them:

    {"embed": [V, D], "final_norm": [D], "lm_head": [D, V] (untied only),
     "layers": [{"attn_norm": [D], "wq": [D, N*H], "wk": [D, K*H], "wv": [D, K*H],
                 "wo": [N*H, D], "mlp_norm": [D], "w_gate": [D, F], "w_up": [D, F],
                 "w_down": [F, D],
                 "bq": [N*H], "bk": [K*H], "bv": [K*H] (qkv_bias only)}, ... L of them]}

The public functions check their inputs' ranks, shapes and dtypes with chex (a
ValueError naming the argument); the checks read static shapes only, so under jit
they run once per trace and cost the compiled program nothing.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from mode_jax.ref.config import LlamaConfig

LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
BIAS_KEYS = {"wq": "bq", "wk": "bk", "wv": "bv"}     # projection -> its bias (qkv_bias models)


def layer_keys(cfg: LlamaConfig) -> tuple[str, ...]:
    """The keys of one layer's dict for `cfg` (LAYER_KEYS, plus the biases with qkv_bias)."""
    return LAYER_KEYS + (tuple(BIAS_KEYS.values()) if cfg.qkv_bias else ())


def layer_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    d, f = cfg.d_model, cfg.d_ff
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"attn_norm": (d,), "wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d),
              "mlp_norm": (d,), "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}
    if cfg.qkv_bias:
        shapes.update(bq=(q,), bk=(kv,), bv=(kv,))
    return shapes


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
    """One transformer layer: N(0, 0.02) matrices (and q/k/v biases), output projections
    scaled down by sqrt(2 L) so the residual stream's variance stays O(1) at init; unit norms."""
    shapes = layer_shapes(cfg)
    names = layer_keys(cfg)
    keys = dict(zip(names, jax.random.split(key, len(names))))
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


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_tokens(tokens: jax.Array, where: str) -> None:
    """tokens must be integer ids [B, T] (a clear ValueError otherwise)."""
    chex.assert_rank(tokens, 2, custom_message=f"{where}: tokens must be [B, T]", exception_type=ValueError)
    chex.assert_type(tokens, int, custom_message=f"{where}: tokens must be integer ids", exception_type=ValueError)


def _check_hidden(x: jax.Array, d_model: int, where: str) -> None:
    chex.assert_rank(x, 3, custom_message=f"{where}: x must be [B, T, D]", exception_type=ValueError)
    chex.assert_type(x, float, custom_message=f"{where}: x must be a float array", exception_type=ValueError)
    _check(x.shape[-1] == d_model, f"{where}: x {x.shape} has width {x.shape[-1]}, the model {d_model}")


def upcast(x: jax.Array) -> jax.Array:
    """x in at least float32 (float64 stays float64, so gradient checks stay exact)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float) -> jax.Array:
    """x / rms(x) * scale, with the statistics in at least float32 whatever x's dtype."""
    chex.assert_shape(scale, (x.shape[-1],), custom_message=f"rms_norm: scale must be [{x.shape[-1]}] for x "
                      f"{x.shape}", exception_type=ValueError)
    x32 = upcast(x)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * upcast(scale)).astype(x.dtype)


def rope_freq_factors(cfg: LlamaConfig) -> tuple[float, ...] | None:
    """What each RoPE frequency is divided by, [H/2] (None: plain RoPE).

    A GGUF file states these divisors itself (`cfg.rope_freq_factors`, llama.cpp's
    `rope_freqs` tensor); config.json states Llama 3's rule (`cfg.rope_scaling`), which is
    worked out here in float64 the way llama.cpp's converter does: a frequency whose
    wavelength 2 pi / f is shorter than original / high_freq_factor is kept (divisor 1),
    one longer than original / low_freq_factor is divided by `factor`, and in between
    f becomes (1 - s) f / factor + s f with s = (original / wavelength - low) / (high - low)."""
    if cfg.rope_freq_factors is not None:
        return cfg.rope_freq_factors
    scaling = cfg.rope_scaling
    if scaling is None:
        return None
    old = scaling.original_max_position_embeddings
    low, high, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
    out = []
    for i in range(0, cfg.head_dim, 2):
        wavelength = 2 * np.pi * cfg.rope_theta ** (i / cfg.head_dim)
        if wavelength < old / high:
            out.append(1.0)
        elif wavelength > old / low:
            out.append(float(factor))
        else:
            smooth = (old / wavelength - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(out)


def rope_tables(positions: jax.Array, *, head_dim: int, theta: float,
                freq_factors: tuple[float, ...] | None = None) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [T, H] for the rotate-half layout (frequency i on dims i and i + H/2),
    frequency i divided by freq_factors[i] when given (`rope_freq_factors`)."""
    chex.assert_rank(positions, 1, custom_message="rope_tables: positions must be [T]", exception_type=ValueError)
    _check(freq_factors is None or len(freq_factors) == head_dim // 2,
           f"rope_tables: freq_factors needs head_dim // 2 = {head_dim // 2} entries")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2) / head_dim))  # [H/2], float32 (or 64 under x64)
    if freq_factors is not None:
        inv_freq = inv_freq / jnp.asarray(freq_factors, inv_freq.dtype)
    angles = positions[:, None] * inv_freq[None, :]                      # [T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)                                    # [T, H]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, H] by position: x * cos + rotate_half(x) * sin."""
    chex.assert_rank(x, 4, custom_message="apply_rope: x must be [B, T, heads, H]", exception_type=ValueError)
    chex.assert_shape([cos, sin], (x.shape[1], x.shape[3]), custom_message=f"apply_rope: cos, sin must be "
                      f"[T, H] = {(x.shape[1], x.shape[3])}", exception_type=ValueError)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = upcast(x) * cos[None, :, None, :] + upcast(rotated) * sin[None, :, None, :]
    return out.astype(x.dtype)


def project(layer: dict, x: jax.Array, name: str) -> jax.Array:
    """x @ layer[name], plus its bias where the layer has one (Qwen2's q, k, v)."""
    y = x @ layer[name]
    bias = BIAS_KEYS.get(name)
    return y + layer[bias] if bias in layer else y


def attention_qkv(layer: dict, x: jax.Array, positions: jax.Array, *, n_heads: int, n_kv_heads: int,
                  head_dim: int, rope_theta: float, rope_freq_factors: tuple[float, ...] | None = None,
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, T, N, H] and k, v [B, T, K, H] of x [B, T, D]; q and k rotated for `positions` [T]."""
    _check_hidden(x, layer["wq"].shape[0], "attention_qkv")
    chex.assert_shape(positions, (x.shape[1],), custom_message=f"attention_qkv: positions must be [T] = "
                      f"[{x.shape[1]}]", exception_type=ValueError)
    q = rearrange(project(layer, x, "wq"), "B T (N H) -> B T N H", N=n_heads, H=head_dim)
    k = rearrange(project(layer, x, "wk"), "B S (K H) -> B S K H", K=n_kv_heads, H=head_dim)
    v = rearrange(project(layer, x, "wv"), "B S (K H) -> B S K H", K=n_kv_heads, H=head_dim)
    cos, sin = rope_tables(positions, head_dim=head_dim, theta=rope_theta, freq_factors=rope_freq_factors)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v over the keys where mask [T, S] is True:
    q [B, T, N, H], k, v [B, S, K, H] -> [B, T, N*H] (before the output projection)."""
    chex.assert_rank([q, k, v], 4, custom_message="attend: q, k, v must be [B, T|S, heads, H]",
                     exception_type=ValueError)
    chex.assert_equal_shape([k, v], custom_message="attend: k and v must have one shape", exception_type=ValueError)
    b, t, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    _check(k.shape[0] == b and k.shape[3] == head_dim and n_heads % n_kv_heads == 0,
           f"attend: q {q.shape} and k {k.shape} disagree (batch, head dim, or N not a multiple of K)")
    chex.assert_shape(mask, (t, k.shape[1]), custom_message="attend: mask must be [T, S]", exception_type=ValueError)
    # Each group of G = N/K query heads shares one kv head.
    q = rearrange(q, "B T (K G) H -> B T K G H", K=n_kv_heads)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    scores = scores / np.sqrt(head_dim)
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)       # [B, K, G, T, S]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)                # [B, T, K, G, H]
    return rearrange(out, "B T K G H -> B T (K G H)")              # heads merged: [B, T, N*H]


def attention(layer: dict, x: jax.Array, *, n_heads: int, n_kv_heads: int, head_dim: int,
              rope_theta: float, rope_freq_factors: tuple[float, ...] | None = None) -> jax.Array:
    """Grouped-query causal self-attention of x [B, T, D] -> [B, T, D] (no norm, no residual)."""
    t = x.shape[1]
    q, k, v = attention_qkv(layer, x, jnp.arange(t), n_heads=n_heads, n_kv_heads=n_kv_heads,
                            head_dim=head_dim, rope_theta=rope_theta, rope_freq_factors=rope_freq_factors)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    return attend(q, k, v, causal) @ layer["wo"]


def mlp(layer: dict, x: jax.Array) -> jax.Array:
    """SwiGLU: (silu(x W_gate) * x W_up) W_down, x [B, T, D] -> [B, T, D]."""
    _check_hidden(x, layer["w_gate"].shape[0], "mlp")
    return (jax.nn.silu(x @ layer["w_gate"]) * (x @ layer["w_up"])) @ layer["w_down"]


def layer_forward(layer: dict, x: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """One pre-norm residual layer, x [B, T, D] -> [B, T, D]."""
    _check_hidden(x, cfg.d_model, "layer_forward")
    h = x + attention(layer, rms_norm(x, layer["attn_norm"], eps=cfg.norm_eps),
                      n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                      head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                      rope_freq_factors=rope_freq_factors(cfg))
    return h + mlp(layer, rms_norm(h, layer["mlp_norm"], eps=cfg.norm_eps))


def layers_forward(layers: list[dict], x: jax.Array, cfg: LlamaConfig) -> jax.Array:
    for layer in layers:
        x = layer_forward(layer, x, cfg)
    return x


def embed(params: dict, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] int -> [B, T, D]."""
    check_tokens(tokens, "embed")
    return jnp.take(params["embed"], tokens, axis=0)


def lm_head(params: dict, h: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """Final norm and output projection: h [B, T, D] -> logits [B, T, V], at least float32."""
    _check_hidden(h, cfg.d_model, "lm_head")
    h = rms_norm(h, params["final_norm"], eps=cfg.norm_eps)
    w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]   # [D, V]
    return jnp.einsum("BTD,DV->BTV", h, w, preferred_element_type=jnp.promote_types(h.dtype, jnp.float32))


def llama_hidden(params: dict, tokens: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """The last layer's output (before the final norm), [B, T, D]."""
    return layers_forward(params["layers"], embed(params, tokens), cfg)


def llama_forward(params: dict, tokens: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """tokens [B, T] -> float32 logits [B, T, V]."""
    return lm_head(params, llama_hidden(params, tokens, cfg), cfg)

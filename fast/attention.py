"""Grouped-query causal attention with rotary embeddings, through
`jax.nn.dot_product_attention`; the one place that picks its backend.

Same function as `ref.llama.attention` (rotate-half RoPE in float32, softmax in
float32), but the scores never exist as a [B, N, T, S] array on a GPU: there
cuDNN's flash attention runs. `implementation=None` means XLA in jax 0.11 (its
source says "defaults to XLA for now"), and the cuDNN wrapper checks for the
cuDNN library while it is traced, so `lax.platform_dependent` (which traces every
branch) cannot hold it on a CPU: the choice is made at trace time from the
default backend, dtype and head size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mode_jax.ref.llama import rope_tables  # noqa: F401  (re-exported: one definition of the tables)

# cuDNN flash attention takes fp16/bf16 and head dims that are multiples of 8 up to 128
# (256 on Hopper; 128 keeps the rule device-independent).
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def pick_implementation(choice: str, *, dtype, head_dim: int) -> str:
    """'xla' or 'cudnn' for `choice` in ('auto', 'xla', 'cudnn')."""
    if choice != "auto":
        return choice
    fits = jnp.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if fits and jax.default_backend() == "gpu" else "xla"


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, H] rotated by position (rotate-half layout), in float32, back to x's dtype."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]).astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str) -> jax.Array:
    """q [B, T, N, H], k, v [B, S, K, H] (N a multiple of K) -> [B, T, N, H], causal,
    scale 1/sqrt(H). `implementation` is 'xla' or 'cudnn' (see `pick_implementation`)."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

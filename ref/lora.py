"""LoRA, the parameter-efficient baseline the paper compares MoDE with.

Each targeted matrix W [in, out] gains W + (alpha / rank) * A @ B with
A [in, R] drawn N(0, 1/in) and B [R, out] zero, so training starts at the
backbone exactly. The reference merges the adapters into the weights and runs
the plain backbone: the simplest statement of the function.

Params: {"layers": [{name: {"a": [in, R], "b": [R, out]} for name in targets}] * L}.
`lora_merge` checks every adapter's shape against its weight and the rank with chex
(static shapes: free under jit).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from mode_jax.ref.config import LlamaConfig, LoraConfig


def init_lora(key: jax.Array, backbone: dict, lora: LoraConfig) -> dict:
    layers = []
    for layer_key, layer in zip(jax.random.split(key, len(backbone["layers"])), backbone["layers"]):
        adapters = {}
        for name, k in zip(lora.matrices, jax.random.split(layer_key, len(lora.matrices))):
            d_in, d_out = layer[name].shape
            adapters[name] = {
                "a": jax.random.normal(k, (d_in, lora.rank), jnp.float32) / jnp.sqrt(d_in),
                "b": jnp.zeros((lora.rank, d_out), jnp.float32),
            }
        layers.append(adapters)
    return {"layers": layers}


def lora_merge(backbone: dict, adapters: dict, lora: LoraConfig) -> dict:
    """The backbone with every adapter folded in: W + (alpha / rank) A @ B."""
    scale = lora.alpha / lora.rank
    merged_layers = []
    for layer, layer_adapters in zip(backbone["layers"], adapters["layers"]):
        merged = dict(layer)
        for name, ab in layer_adapters.items():
            d_in, d_out = layer[name].shape
            chex.assert_shape([ab["a"], ab["b"]], [(d_in, lora.rank), (lora.rank, d_out)],
                              custom_message=f"lora_merge: the adapter of {name} must be a [{d_in}, {lora.rank}] "
                              f"and b [{lora.rank}, {d_out}] (weight [in, out], rank R)", exception_type=ValueError)
            delta = scale * (ab["a"].astype(jnp.float32) @ ab["b"].astype(jnp.float32))
            merged[name] = (layer[name].astype(jnp.float32) + delta).astype(layer[name].dtype)
        merged_layers.append(merged)
    return {**backbone, "layers": merged_layers}


def lora_param_count(cfg: LlamaConfig, lora: LoraConfig) -> int:
    """Number of adapter parameters (for parameter-matched comparisons)."""
    from mode_jax.ref.llama import layer_shapes
    shapes = layer_shapes(cfg)
    per_layer = sum(lora.rank * (shapes[m][0] + shapes[m][1]) for m in lora.matrices)
    return per_layer * cfg.n_layers

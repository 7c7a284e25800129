"""LoRA-MoE (ref/lora_moe.py) on the fast path: its stacked layout and the mixed LoRA term.

Stacked layout of the "lora_moe" subtree (ref's lists of layers and of adapters become
leading axes):

    {"layers": {"gate_w": [L, D, N], name: {"a": [L, N, in, R], "b": [L, N, R, out]}}}

so the layer loop of fast/model.py (scan or Python) hands each layer
{"gate_w": [D, N], name: {"a": [N, in, R], "b": [N, R, out]}}, the same place a plain LoRA
hands {name: {"a", "b"}}. fast/model.py calls two functions of this module:

- `route` at the top of each layer adds the router weights g = softmax(xn W_r) [B, T, N]
  (float32, xn the layer's normalised input) to that dict under `PROBS`;
- `mixed_delta` is each adapted projection's LoRA term, sum_j g_j s (x A_j) B_j, computed
  as one rank-N*R LoRA: x [B, T, in] against every A_j at once ([B, T, N, R]), scaled per
  token by g_j, then against every B_j at once, so N experts cost one pair of matmuls of
  N times the rank, not N pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mode_jax.fast.norm import rms_norm

F32 = jnp.float32
PROBS = "probs"          # the key `route` adds to a layer's adapters: g [B, T, N]


def to_fast(tree: dict) -> dict:
    """ref's {"layers": [{"gate_w", "adapters": [{name: {"a", "b"}}] * N}] * L} -> stacked."""
    layers = tree["layers"]
    names = tuple(layers[0]["adapters"][0])
    out = {"gate_w": jnp.stack([layer["gate_w"] for layer in layers])}                   # [L, D, N]
    for name in names:
        out[name] = {k: jnp.stack([jnp.stack([ad[name][k] for ad in layer["adapters"]]) for layer in layers])
                     for k in ("a", "b")}                                                 # [L, N, ...]
    return {"layers": out}


def to_ref(tree: dict) -> dict:
    """Inverse of `to_fast`."""
    stacked = tree["layers"]
    n_layers, _, n = stacked["gate_w"].shape
    names = [k for k in stacked if k != "gate_w"]
    return {"layers": [{"gate_w": stacked["gate_w"][i],
                        "adapters": [{name: {"a": stacked[name]["a"][i, j], "b": stacked[name]["b"][i, j]}
                                      for name in names} for j in range(n)]}
                       for i in range(n_layers)]}


def route(adapters: dict | None, layer: dict, x: jax.Array, *, eps: float) -> dict | None:
    """A layer's adapters with the router weights added (`PROBS`: float32 [B, T, N]) when
    they are a LoRA mixture (hold "gate_w"); anything else comes back as it is. x [B, T, D]
    is the layer's input; the router reads it normalised by the layer's attention norm."""
    if adapters is None or "gate_w" not in adapters:
        return adapters
    xn = rms_norm(x, layer["attn_norm"], eps=eps)                                 # [B, T, D]
    logits = jnp.einsum("BTD,DN->BTN", xn.astype(F32), adapters["gate_w"].astype(F32))
    return {**adapters, PROBS: jax.nn.softmax(logits, axis=-1)}


def mixed_delta(x: jax.Array, ab: dict, probs: jax.Array, scale: float) -> jax.Array:
    """sum_j probs_j scale (x @ A_j) @ B_j: x [B, T, I], ab {"a": [N, I, R], "b": [N, R, O]},
    probs [B, T, N] -> [B, T, O] in x's dtype."""
    dtype = x.dtype
    xa = jnp.einsum("BTI,NIR->BTNR", x, ab["a"].astype(dtype))                     # [B, T, N, R]
    # The per-token weight and the scale in float32, then back to the compute dtype.
    xa = (xa.astype(F32) * (scale * probs)[..., None]).astype(dtype)
    return jnp.einsum("BTNR,NRO->BTO", xa, ab["b"].astype(dtype))                  # [B, T, O]


def hidden_with_probs(params: dict, tokens: jax.Array, cfg, fast, lora) -> tuple[jax.Array, list[jax.Array]]:
    """The last layer's output [B, T, D] and every layer's router weights [B, T, N] (what the
    routers learned), for evaluation: the layers of fast/model.py one by one in a Python loop
    (training runs them through `model.hidden`, which returns no router weights)."""
    from mode_jax.fast import model       # fast/model.py imports this module: imported when called

    backbone, mixes = params["backbone"], params["lora_moe"]["layers"]
    kw = model._layer_kwargs(cfg, fast, lora)
    layers = model.prepare_layers(backbone["layers"], dtype=fast.dtype, fuse=fast.fuse_projections)
    cos, sin = model._rope(tokens.shape[1], cfg)
    x = model.embed(backbone, tokens, fast.dtype)                                  # [B, T, D]
    probs = []
    for i in range(mixes["gate_w"].shape[0]):
        layer, mix = model._take(layers, i), model._take(mixes, i)
        probs.append(route(mix, layer, x, eps=cfg.norm_eps)[PROBS])
        x = model.layer_forward(layer, mix, x, cos, sin, **kw)
    return x, probs

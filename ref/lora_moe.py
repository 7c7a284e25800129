"""LoRA-MoE: per-domain LoRAs composed by a per-token softmax router (a baseline for MoDE).

Stage 1 trains one LoRA per domain (the `lora` method on that domain alone). Stage 2 places
the N LoRAs side by side on every adapted projection W (`LoraConfig.matrices`) and mixes
them per token:

    g = softmax(xn W_r)                                      one router per layer, [N]
    y = x W + sum_j g_j (alpha / rank) (x A_j) B_j           every adapted projection

where xn = rms_norm(x, attn_norm) is the layer's normalised input (the tensor q, k and v
project), and the same g serves all of the layer's adapted projections. Stage 2 trains
the LoRAs and the routers (`lora_moe`) or the routers only (`lora_moe_frozen`).

Which published method this follows, and where it departs:

- MoLE (Wu et al., ICLR 2024) is the closest in *setting*: separately trained LoRAs are
  the experts and a learned gate per layer mixes them; MoLE trains only the gates (our
  `lora_moe_frozen`). Its gate, though, scores the LoRAs' own outputs (concatenated,
  normalised, with a learned temperature) and adds a gate-balancing loss; ours reads the
  layer input, as the two below do, has no temperature and no balancing loss.
- LoRAMoE (Dou et al., 2024) gives the *routing*: a bias-free linear router and a dense
  softmax over LoRA experts, per token, computed from the hidden state the adapted
  projection reads, and the experts train with the router (our `lora_moe`). LoRAMoE puts
  its experts in the feed-forward layers with one router per adapted linear layer, starts
  them fresh on the mixture and adds a localized balancing constraint; here the adapted
  projections are the ones `LoraConfig.targets` names (attention by default, as the LoRA
  baseline), one router per transformer layer serves all of them, and the experts start
  from the stage-1 LoRAs.
- MixLoRA (Li et al., 2024) routes top-k (k = 2) over LoRA experts inside the FFN with a
  load-balancing loss and keeps a plain LoRA on attention; we route densely (every LoRA
  runs, as MoDE's gate does) on whichever projections `LoraConfig.targets` names.

No load-balancing loss: the experts are per-domain LoRAs, not interchangeable capacity,
so an even load is not a goal. The router starts at zero (`gate_w` [D, N] all zeros):
every token mixes the LoRAs uniformly, g_j = 1/N, i.e. the model starts as the average of
the stage-1 LoRAs; training moves the router from there. The router runs in float32,
like MoDE's gate (its key is `gate_w`, so the fast path keeps it in float32 too).

Params: {"backbone": <llama params>, "lora_moe": {"layers": [{"gate_w": [D, N],
"adapters": [{name: {"a": [in, R], "b": [R, out]}} * N]}] * L}}; adapter j of layer i is
layer i of stage-1 LoRA j, unchanged (ref/lora.py's layout).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from einops import rearrange

from mode_jax.ref.config import LlamaConfig, LoraConfig
from mode_jax.ref.llama import (apply_rope, attend, check_tokens, embed, lm_head, project, rms_norm,
                                rope_freq_factors, rope_tables, upcast)


def init_lora_moe(stage1: list[dict], cfg: LlamaConfig, lora: LoraConfig) -> dict:
    """The "lora_moe" subtree from N stage-1 LoRA adapter trees ({"layers": [...]}, as
    `init_lora` builds them and the `lora` method trains them), router at zero."""
    if not stage1:
        raise ValueError("init_lora_moe needs at least one stage-1 LoRA")
    for j, adapters in enumerate(stage1):
        layers = adapters.get("layers", [])
        if len(layers) != cfg.n_layers:
            raise ValueError(f"stage-1 LoRA {j} has {len(layers)} layers, the model {cfg.n_layers}")
        for i, layer in enumerate(layers):
            if set(layer) != set(lora.matrices):
                raise ValueError(f"stage-1 LoRA {j} adapts {sorted(layer)} in layer {i}; LoraConfig.targets="
                                 f"{lora.targets!r} is {sorted(lora.matrices)}")
            for name, ab in layer.items():
                if ab["a"].shape[-1] != lora.rank:
                    raise ValueError(f"stage-1 LoRA {j} has rank {ab['a'].shape[-1]} on layer {i} {name}, "
                                     f"LoraConfig.rank={lora.rank}")
    n = len(stage1)
    return {"layers": [{"gate_w": jnp.zeros((cfg.d_model, n), jnp.float32),
                        "adapters": [s["layers"][i] for s in stage1]} for i in range(cfg.n_layers)]}


def router_probs(gate_w: jax.Array, xn: jax.Array) -> jax.Array:
    """xn [B, T, D] (the layer's normalised input) -> float32 router weights g [B, T, N]."""
    chex.assert_shape(gate_w, (xn.shape[-1], None), custom_message="router_probs: gate_w must be [D, N] with D "
                      "the width of xn", exception_type=ValueError)
    return jax.nn.softmax(upcast(xn) @ upcast(gate_w), axis=-1)


def mixed_projection(layer: dict, adapters: list[dict], probs: jax.Array, x: jax.Array, name: str, *,
                     scale: float) -> jax.Array:
    """x @ W_name (+ its bias) + sum_j g_j scale (x @ A_j) @ B_j, x [B, T, in] -> [B, T, out]:
    the LoRA terms of the adapters that adapt `name`, weighted by probs [B, T, N]."""
    y = project(layer, x, name)
    for j, adapter in enumerate(adapters):
        if name in adapter:
            delta = (x @ adapter[name]["a"]) @ adapter[name]["b"]                      # [B, T, out]
            # The weight is float32; the sum stays in y's dtype, as a merged weight would.
            y = y + (scale * probs[..., j:j + 1] * upcast(delta)).astype(y.dtype)
    return y


def lora_moe_layer(layer: dict, mix: dict, x: jax.Array, cfg: LlamaConfig, lora: LoraConfig, *,
                   return_probs: bool = False):
    """One pre-norm residual layer with its projections mixed as the module docstring says:
    x [B, T, D] -> [B, T, D] (and the router weights g [B, T, N])."""
    chex.assert_rank(x, 3, custom_message="lora_moe_layer: x must be [B, T, D]", exception_type=ValueError)
    t = x.shape[1]
    xn = rms_norm(x, layer["attn_norm"], eps=cfg.norm_eps)
    probs = router_probs(mix["gate_w"], xn)                                        # [B, T, N]

    def proj(h, name):
        return mixed_projection(layer, mix["adapters"], probs, h, name, scale=lora.alpha / lora.rank)

    q = rearrange(proj(xn, "wq"), "B T (N H) -> B T N H", N=cfg.n_heads, H=cfg.head_dim)
    k = rearrange(proj(xn, "wk"), "B S (K H) -> B S K H", K=cfg.n_kv_heads, H=cfg.head_dim)
    v = rearrange(proj(xn, "wv"), "B S (K H) -> B S K H", K=cfg.n_kv_heads, H=cfg.head_dim)
    cos, sin = rope_tables(jnp.arange(t), head_dim=cfg.head_dim, theta=cfg.rope_theta,
                           freq_factors=rope_freq_factors(cfg))
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    h = x + proj(attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, causal), "wo")
    hn = rms_norm(h, layer["mlp_norm"], eps=cfg.norm_eps)
    out = h + proj(jax.nn.silu(proj(hn, "w_gate")) * proj(hn, "w_up"), "w_down")
    return (out, probs) if return_probs else out


def lora_moe_hidden(params: dict, tokens: jax.Array, cfg: LlamaConfig, lora: LoraConfig, *,
                    return_probs: bool = False):
    """The last layer's output [B, T, D] (and, optionally, every layer's router weights
    [B, T, N] as a list: what the routers learned)."""
    check_tokens(tokens, "lora_moe_hidden")
    backbone, mixes = params["backbone"], params["lora_moe"]["layers"]
    if len(mixes) != len(backbone["layers"]):
        raise ValueError(f"lora_moe has {len(mixes)} layers, the backbone {len(backbone['layers'])}")
    x = embed(backbone, tokens)                                                    # [B, T, D]
    probs = []
    for layer, mix in zip(backbone["layers"], mixes):
        x, p = lora_moe_layer(layer, mix, x, cfg, lora, return_probs=True)
        probs.append(p)
    return (x, probs) if return_probs else x


def lora_moe_forward(params: dict, tokens: jax.Array, cfg: LlamaConfig, lora: LoraConfig) -> jax.Array:
    """tokens [B, T] -> float32 logits [B, T, V]."""
    return lm_head(params["backbone"], lora_moe_hidden(params, tokens, cfg, lora), cfg)

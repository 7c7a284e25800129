"""Branch-Train-MiX (BTX; Sukhbaatar et al. 2024, arXiv 2403.07816), the FFN-expert
baseline the MoDE reviewers asked for, over the same frozen backbone.

BTX branches a seed model into N copies, trains each on one domain, then puts the
copies' feed-forward (MLP) sublayers side by side as the experts of a mixture-of-experts
layer in every layer, with a learned per-token top-k router (k = 2, as BTX and Mixtral):

    logits = x W_r                                   x: the layer's normed MLP input [D]
    w      = softmax over the k largest logits, 0 elsewhere (renormalised top-k)
    y      = sum_e w_e MLP_e(x)                      (the layer's MLP output; residual as usual)

What we take from BTX and where we depart (docs: README "Branch-Train-MiX"):
- Stage 1 ("btx_branch"): one copy of *every* layer's MLP (w_gate, w_up, w_down), trained
  on one domain; attention, norms, embeddings and LM head stay the backbone's, frozen.
  BTX trains its branches fully; we branch only what becomes an expert, so the stage-1
  model is the backbone with its MLPs swapped for trainable copies.
- Stage 2 ("btx"): in every layer, the experts are the seed model's MLP (a trainable copy
  of the backbone's, as BTX keeps the seed model as an expert; `seed_expert=False` drops
  it) followed by the N branch MLPs; the router and every expert train. BTX averages the
  branches' non-MLP weights and fine-tunes them: ours never left the backbone (frozen),
  so the average is the backbone itself and stays frozen.
- Router: a bias-free [D, E] float32 matrix, initialised N(0, router_std^2) (BTX does not
  say; Mixtral-style upcycling starts random too: a zero router would tie every logit).
- Load balancing: BTX adds the Switch-Transformer auxiliary loss with alpha = 0.01; so do
  we: per layer E * sum_e f_e p_e, f_e the share of the T * k routing slots that go to
  expert e (no gradient), p_e the mean full-softmax probability; averaged over layers,
  times BALANCE_COEF, added to the training objective only (eval loss is the plain loss).
- Dense: every expert runs and the top-k weights mask the sum (`dispatch_flops` says
  what a sparse dispatch would save).

The top-k selection is MoDE's top-k gate (`ref.mode.top_k_logits`): ties go to the lower
expert index, as in lax.top_k. TOP_K and BALANCE_COEF are BTX's values; the functions take
`top_k` as a keyword, the pipeline and fast/ use these (they are not config keys).

Params: {"backbone": <llama>, "btx": {"layers": [{"mlps": [{"w_gate": [D, F], "w_up": [D, F],
"w_down": [F, D]}] * E, "gate_w": [D, E] (stage 2 only)}] * L}}. A layer without "gate_w"
holds one MLP (a stage-1 branch) and uses it alone.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from mode_jax.ref.config import LlamaConfig
from mode_jax.ref.llama import attention, check_tokens, embed, lm_head, mlp, rms_norm, rope_freq_factors, upcast
from mode_jax.ref.mode import top_k_logits

TOP_K = 2                   # experts per token (BTX, Mixtral)
BALANCE_COEF = 0.01         # alpha of BTX's load-balancing loss
ROUTER_STD = 0.02           # router init, the Llama init's std of every other matrix
MLP_KEYS = ("w_gate", "w_up", "w_down")


def branch_mlps(backbone: dict) -> list[dict]:
    """Copies of every layer's MLP weights (copies, so training them never aliases the backbone)."""
    return [{k: jnp.array(layer[k]) for k in MLP_KEYS} for layer in backbone["layers"]]


def init_branch(backbone: dict) -> dict:
    """Stage 1: the backbone with every MLP replaced by a trainable copy (starts as the backbone)."""
    return {"backbone": backbone, "btx": {"layers": [{"mlps": [m]} for m in branch_mlps(backbone)]}}


def init_mix(key: jax.Array, backbone: dict, branches: list[dict], *, seed_expert: bool = True,
             router_std: float = ROUTER_STD) -> dict:
    """Stage 2 from N trained stage-1 models (`init_branch` trees, or their "btx" subtrees):
    per layer the experts [seed copy (if seed_expert), branch 1, ..., branch N] and a router."""
    if not branches:
        raise ValueError("btx: stage 2 needs at least one stage-1 branch")
    subtrees = [b["btx"] if "btx" in b else b for b in branches]
    n_layers = len(backbone["layers"])
    for j, sub in enumerate(subtrees):
        got = [len(layer["mlps"]) for layer in sub["layers"]]
        if len(got) != n_layers or any(n != 1 or "gate_w" in layer for n, layer in zip(got, sub["layers"])):
            raise ValueError(f"btx: branch {j} must hold {n_layers} layers of one MLP and no router, has {got}")
    seed = branch_mlps(backbone) if seed_expert else None
    n_experts = len(subtrees) + int(seed_expert)
    d_model = backbone["embed"].shape[1]
    layers = []
    for i, k in enumerate(jax.random.split(key, n_layers)):
        mlps = ([seed[i]] if seed_expert else []) + [jax.tree.map(jnp.array, s["layers"][i]["mlps"][0])
                                                     for s in subtrees]
        layers.append({"mlps": mlps, "gate_w": router_std * jax.random.normal(k, (d_model, n_experts), jnp.float32)})
    return {"backbone": backbone, "btx": {"layers": layers}}


def top_k_weights(logits: jax.Array, top_k: int = TOP_K) -> jax.Array:
    """logits [..., E] -> weights [..., E]: softmax over the top_k largest logits (renormalised
    over them), exactly 0 elsewhere; float32 whatever the input. top_k >= E is the plain softmax."""
    return jax.nn.softmax(top_k_logits(upcast(logits), top_k), axis=-1)


def balance_loss(logits: jax.Array, top_k: int = TOP_K) -> jax.Array:
    """Switch-Transformer load balancing of one layer's router logits [..., E]:
    E * sum_e f_e p_e with f_e the share of routing slots (tokens x k) sent to e (a count,
    no gradient) and p_e the mean softmax probability. 1 when both are uniform."""
    logits = upcast(logits).reshape(-1, logits.shape[-1])                        # [tokens, E]
    n_experts = logits.shape[-1]
    k = min(top_k, n_experts)
    slots = jax.lax.stop_gradient((top_k_weights(logits, k) > 0).astype(logits.dtype))
    f = slots.mean(axis=0) / k                                                    # [E], sums to 1
    p = jax.nn.softmax(logits, axis=-1).mean(axis=0)                              # [E]
    return n_experts * jnp.sum(f * p)


def moe_mlp(layer_btx: dict, x: jax.Array, *, top_k: int = TOP_K) -> tuple[jax.Array, jax.Array | None]:
    """x [B, T, D] (the normed MLP input) -> (sum_e w_e MLP_e(x) [B, T, D], router logits
    [B, T, E] float32, or None for a one-MLP stage-1 layer). Every expert runs (dense)."""
    mlps = layer_btx["mlps"]
    if "gate_w" not in layer_btx:
        if len(mlps) != 1:
            raise ValueError(f"btx: a layer without a router must hold one MLP, holds {len(mlps)}")
        return mlp(mlps[0], x), None
    chex.assert_shape(layer_btx["gate_w"], (x.shape[-1], len(mlps)), custom_message="moe_mlp: gate_w must be "
                      "[D, E] with E the number of MLPs", exception_type=ValueError)
    logits = upcast(x) @ upcast(layer_btx["gate_w"])                              # [B, T, E]
    weights = top_k_weights(logits, top_k)                                        # [B, T, E]
    outputs = jnp.stack([mlp(m, x) for m in mlps])                                # [E, B, T, D]
    y = jnp.einsum("BTE,EBTD->BTD", weights, upcast(outputs))
    return y.astype(x.dtype), logits


def btx_layer(layer: dict, layer_btx: dict, x: jax.Array, cfg: LlamaConfig, *,
              top_k: int = TOP_K) -> tuple[jax.Array, jax.Array | None]:
    """One pre-norm layer with the backbone's attention and the BTX MLP mixture:
    x [B, T, D] -> (x' [B, T, D], router logits [B, T, E] or None)."""
    h = x + attention(layer, rms_norm(x, layer["attn_norm"], eps=cfg.norm_eps), n_heads=cfg.n_heads,
                      n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                      rope_freq_factors=rope_freq_factors(cfg))
    y, logits = moe_mlp(layer_btx, rms_norm(h, layer["mlp_norm"], eps=cfg.norm_eps), top_k=top_k)
    return h + y, logits


def btx_hidden(params: dict, tokens: jax.Array, cfg: LlamaConfig, *, top_k: int = TOP_K,
               return_logits: bool = False):
    """The last layer's output [B, T, D] (and each layer's router logits [B, T, E], None
    for stage-1 layers, as a list)."""
    check_tokens(tokens, "btx_hidden")
    backbone, layers = params["backbone"], params["btx"]["layers"]
    if len(layers) != len(backbone["layers"]):
        raise ValueError(f"btx: {len(layers)} BTX layers for a backbone of {len(backbone['layers'])}")
    x = embed(backbone, tokens)
    all_logits = []
    for layer, layer_btx in zip(backbone["layers"], layers):
        x, logits = btx_layer(layer, layer_btx, x, cfg, top_k=top_k)
        all_logits.append(logits)
    return (x, all_logits) if return_logits else x


def btx_forward(params: dict, tokens: jax.Array, cfg: LlamaConfig, *, top_k: int = TOP_K) -> jax.Array:
    """tokens [B, T] -> float32 logits [B, T, V]."""
    return lm_head(params["backbone"], btx_hidden(params, tokens, cfg, top_k=top_k), cfg)


def router_stats(all_logits: list, top_k: int = TOP_K) -> dict:
    """{"routing": mean top-k weight of each expert per layer [L, E], "aux_loss": BALANCE_COEF
    times the layers' mean balance loss} of `btx_hidden`'s logits; both None for stage 1."""
    if not all_logits or all_logits[0] is None:
        return {"routing": None, "aux_loss": None}
    routing = jnp.stack([top_k_weights(l, top_k).mean(axis=(0, 1)) for l in all_logits])
    aux = BALANCE_COEF * jnp.mean(jnp.stack([balance_loss(l, top_k) for l in all_logits]))
    return {"routing": routing, "aux_loss": aux}


def dispatch_flops(cfg: LlamaConfig, n_experts: int, top_k: int = TOP_K) -> dict:
    """Forward multiply-adds x 2 per token of the MLP experts of all layers: dense (every
    expert, what we run) and sparse (only the top_k), and the share a sparse dispatch saves."""
    per_expert = 2 * 3 * cfg.d_model * cfg.d_ff * cfg.n_layers                  # gate, up, down
    dense, sparse = per_expert * n_experts, per_expert * min(top_k, n_experts)
    return {"dense": dense, "sparse": sparse, "saved_fraction": 1 - sparse / dense}

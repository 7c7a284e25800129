"""Branch-Train-MiX (`ref/btx.py`) on the stacked layout, built from fast/model.py's pieces.

Each layer is the backbone's attention (`fast.model.layer_parts`, whose own MLP hidden is
left unused and removed by XLA) followed by the BTX mixture of MLP experts:

    rn     = rms_norm(r)                                          [B, T, D]
    u_e    = silu(rn W_gate_e) * (rn W_up_e)  for every expert e  [E, B, T, F]  (one batched matmul)
    w      = top-k renormalised softmax of rn W_r (float32)       [B, T, E]     (ref.btx.top_k_weights)
    y      = sum_e (w_e u_e) W_down_e                             [B, T, D]     (one matmul over E*F)

Scaling u_e by w_e before the down projection is the same sum as weighting each expert's
output (eq. of ref/btx.py) and folds the merge into one contraction. The computation is
dense: every expert runs on every token and the top-k weights zero the rest, so each layer
does E MLPs' work where a sparse dispatch would do k (`ref.btx.dispatch_flops`: with the
seed expert and two domains, E = 3 and k = 2, one third of the MLP FLOPs).

Layers run as a `lax.scan` or a Python loop with fast/model.py's remat policies
(`FastConfig.layer_loop`, `remat`); matmul inputs in the compute dtype, router and
softmax in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mode_jax.fast.config import FastConfig
from mode_jax.fast.model import REMAT_POLICIES, _rope, _stack_kwargs, embed, layer_parts, prepare_layers
from mode_jax.fast.norm import rms_norm
from mode_jax.fast.swiglu import swiglu
from mode_jax.ref.btx import TOP_K, router_stats, top_k_weights
from mode_jax.ref.config import LlamaConfig
from mode_jax.ref.llama import check_tokens

F32 = jnp.float32


def prepare_mlps(mlps: dict, dtype) -> dict:
    """{w_gate, w_up, w_down: [L, E, ...]} -> {"w_gate_up": [L, E, D, 2F], "w_down": [L, E, F, D]}
    in the compute dtype, once per step (outside the loop over layers)."""
    return {"w_gate_up": jnp.concatenate([mlps["w_gate"].astype(dtype), mlps["w_up"].astype(dtype)], axis=-1),
            "w_down": mlps["w_down"].astype(dtype)}


def moe_mlp(mlps: dict, gate_w: jax.Array | None, rn: jax.Array, *, top_k: int):
    """rn [B, T, D] -> (y [B, T, D], router logits [B, T, E] float32 or None); `mlps` one
    layer's prepared experts ({"w_gate_up": [E, D, 2F], "w_down": [E, F, D]})."""
    u = swiglu(jnp.einsum("BTD,EDK->EBTK", rn, mlps["w_gate_up"]))               # [E, B, T, F]
    if gate_w is None:                                                            # a stage-1 branch: E = 1
        return jnp.einsum("EBTF,EFD->BTD", u, mlps["w_down"], preferred_element_type=F32).astype(rn.dtype), None
    logits = jnp.einsum("BTD,DE->BTE", rn.astype(F32), gate_w.astype(F32))       # [B, T, E]
    w = top_k_weights(logits, top_k)                                              # [B, T, E], 0 off the top k
    u = u * jnp.moveaxis(w, -1, 0)[..., None].astype(u.dtype)                    # [E, B, T, F]
    y = jnp.einsum("EBTF,EFD->BTD", u, mlps["w_down"], preferred_element_type=F32)
    return y.astype(rn.dtype), logits


def btx_hidden(params: dict, tokens: jax.Array, cfg: LlamaConfig, fast: FastConfig, *, top_k: int = TOP_K):
    """The last layer's output [B, T, D] and the router logits of every layer ([L, B, T, E]
    float32; None for a stage-1 branch)."""
    check_tokens(tokens, "btx_hidden")          # chex, while tracing: a one-line ValueError
    kw = _stack_kwargs(cfg, fast)
    remat, unroll, loop = kw.pop("remat"), kw.pop("unroll"), kw.pop("loop")
    backbone, btx = params["backbone"], params["btx"]
    layers = prepare_layers(backbone["layers"], dtype=kw["dtype"], fuse=kw["fuse"])
    mlps = prepare_mlps(btx["mlps"], kw["dtype"])
    gate_w = btx.get("gate_w")
    n_layers = layers["attn_norm"].shape[0]
    if mlps["w_down"].shape[0] != n_layers:
        raise ValueError(f"btx: {mlps['w_down'].shape[0]} BTX layers for a backbone of {n_layers}")
    cos, sin = _rope(tokens.shape[1], cfg)

    def body(x, xs):
        layer, layer_mlps, layer_gate = xs
        # The backbone layer up to its MLP; its own MLP hidden (layer_parts' second output) is unused.
        r, _ = layer_parts(layer, None, x, cos, sin, **kw)                        # [B, T, D]
        y, logits = moe_mlp(layer_mlps, layer_gate, rms_norm(r, layer["mlp_norm"], eps=kw["eps"]), top_k=top_k)
        return r + y, logits

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
    x = embed(backbone, tokens, fast.dtype)
    xs = (layers, mlps, gate_w)
    if loop == "scan":
        x, logits = lax.scan(body, x, xs, unroll=unroll)
        return x, logits
    # As fast/model.py: one split per array, so each layer's gradient is its own buffer.
    pieces = jax.tree.map(lambda a: [p[0] for p in jnp.split(a, n_layers, axis=0)], xs)
    all_logits = []
    for i in range(n_layers):
        x, logits = body(x, jax.tree.map(lambda p: p[i], pieces, is_leaf=lambda p: isinstance(p, list)))
        all_logits.append(logits)
    return x, None if gate_w is None else jnp.stack(all_logits)


def btx_router_stats(params: dict, tokens: jax.Array, cfg: LlamaConfig, fast: FastConfig, *,
                     top_k: int = TOP_K) -> tuple[jax.Array, dict]:
    """(h [B, T, D], ref.btx.router_stats of the router logits: {"routing": mean top-k weights
    [L, E], "aux_loss": the load-balancing loss}, both None for a stage-1 branch)."""
    h, logits = btx_hidden(params, tokens, cfg, fast, top_k=top_k)
    return h, router_stats([] if logits is None else list(logits), top_k)

"""Modular Domain Experts over a frozen backbone (paper section 3, eq. 1-2).

The backbone's L layers are cut into `n_blocks` blocks of L / n_blocks
consecutive layers. Block i also holds N experts, each a stack of
`expert_layers` ordinary layers. For a block input x (per token):

    [a_bb, a_1..a_N] = softmax(x W_g + b_g)                         (eq. 2)
    y = a_bb f_bb(x) + sum_j a_j f_j(x)                            (eq. 1)

Backbone and experts are pre-norm residual stacks, so y is a convex mix of full
hidden states. The gate runs in float32 on the block input. With top-k gating
(ModeConfig.gate_top_k, an answer to the reviewers) each token keeps only its k
largest logits and the softmax runs over those (`top_k_logits`).

Params: {"backbone": <llama params>, "blocks": [{"experts": [[layer] * expert_layers] * N,
"gate_w": [D, E], "gate_b": [E]}] * n_blocks} with E = N + 1 and column 0 the
backbone. The layout (blocks, experts) is read off the tree, so N = 0 is valid
and gives the backbone back exactly.

The public forward functions check their inputs' shapes and dtypes with chex (a
ValueError naming the argument); the checks read static shapes only, so under jit
they run once per trace and add nothing to the compiled step.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from mode_jax.ref.config import LlamaConfig, ModeConfig
from mode_jax.ref.llama import check_tokens, embed, init_layer, layers_forward, lm_head, upcast


def gated_combine(logits: jax.Array, outputs: jax.Array) -> jax.Array:
    """The MoDE merge: sum_e softmax(logits)_e * outputs_e.

    logits [..., E] (any float dtype; the softmax runs in float32),
    outputs [E, ..., D] -> [..., D] in outputs' dtype. The sum accumulates in
    float32. This is the one definition every fast path is tested against.
    """
    if logits.shape[-1] != outputs.shape[0] or logits.shape[:-1] != outputs.shape[1:-1]:
        raise ValueError(f"gated_combine: logits {logits.shape} must be [..., E] and outputs "
                         f"{outputs.shape} [E, ..., D] with matching E and leading dims")
    probs = jax.nn.softmax(upcast(logits), axis=-1)                              # [..., E]
    mixed = jnp.einsum("...E,E...D->...D", probs, upcast(outputs))
    return mixed.astype(outputs.dtype)


def top_k_logits(logits: jax.Array, k: int | None) -> jax.Array:
    """Top-k gating: logits [..., E] with all but each row's k largest set to -inf, so the
    softmax of the result is the softmax over the kept logits alone (renormalised) and exactly
    0 elsewhere. k None (or >= E) returns the logits unchanged: the dense gate. The gradient
    is the kept logits' softmax gradient (the selection itself is piecewise constant); ties
    keep the lower index, as `lax.top_k` does. k < 1 is refused (no stack would be kept)."""
    n = logits.shape[-1]
    if k is not None and k < 1:
        raise ValueError(f"gate_top_k must be None (the dense gate) or >= 1, got {k}")
    if k is None or k >= n:
        return logits
    _, idx = jax.lax.top_k(logits, k)                                            # [..., k]
    keep = jnp.any(idx[..., :, None] == jnp.arange(n), axis=-2)                   # [..., E]
    return jnp.where(keep, logits, -jnp.inf)


def gate_logits(block: dict, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> float32 gate logits [B, T, E]."""
    chex.assert_rank(x, 3, custom_message="gate_logits: x must be [B, T, D]", exception_type=ValueError)
    chex.assert_shape(block["gate_w"], (x.shape[-1], None), custom_message="gate_logits: gate_w must be [D, E] "
                      "with D the width of x", exception_type=ValueError)
    chex.assert_shape(block["gate_b"], (block["gate_w"].shape[1],), custom_message="gate_logits: gate_b must be "
                      "[E] with E the columns of gate_w", exception_type=ValueError)
    return upcast(x) @ upcast(block["gate_w"]) + upcast(block["gate_b"])


def init_gate(cfg: LlamaConfig, mode: ModeConfig, n_experts: int) -> tuple[jax.Array, jax.Array]:
    """Zero weights; bias `gate_margin` on the backbone column ('backbone') or zero ('uniform')."""
    w = jnp.zeros((cfg.d_model, n_experts + 1), jnp.float32)
    b = jnp.zeros((n_experts + 1,), jnp.float32)
    if mode.gate_init == "backbone":
        b = b.at[0].set(mode.gate_margin)
    return w, b


def block_layer_ranges(cfg: LlamaConfig, mode: ModeConfig) -> list[range]:
    """Backbone layer indices of each block."""
    mode.check_backbone(cfg)
    per_block = cfg.n_layers // mode.n_blocks
    return [range(i * per_block, (i + 1) * per_block) for i in range(mode.n_blocks)]


def init_expert(key: jax.Array, backbone: dict, cfg: LlamaConfig, mode: ModeConfig) -> list[list[dict]]:
    """One expert's layers for every block: [[layer] * expert_layers] * n_blocks."""
    mode.check_backbone(cfg)
    expert = []
    for block_key, layers in zip(jax.random.split(key, mode.n_blocks), block_layer_ranges(cfg, mode)):
        if mode.expert_init == "copy":
            # The block's last `expert_layers` backbone layers; copied so training them
            # never aliases the frozen backbone.
            src = [backbone["layers"][j] for j in layers[-mode.expert_layers:]]
            expert.append([jax.tree.map(jnp.array, layer) for layer in src])
        else:
            dtype = backbone["embed"].dtype
            expert.append([init_layer(k, cfg, dtype) for k in jax.random.split(block_key, mode.expert_layers)])
    return expert


def init_mode(key: jax.Array, backbone: dict, cfg: LlamaConfig, mode: ModeConfig) -> dict:
    """A MoDE model with `mode.n_experts` freshly initialised experts around `backbone`."""
    mode.check_backbone(cfg)
    experts = [init_expert(k, backbone, cfg, mode) for k in jax.random.split(key, max(mode.n_experts, 1))]
    return assemble(backbone, experts[:mode.n_experts], cfg, mode)


def assemble(backbone: dict, experts: list[list[list[dict]]], cfg: LlamaConfig, mode: ModeConfig,
             gates: list[tuple[jax.Array, jax.Array]] | None = None) -> dict:
    """Params from a backbone and per-expert layer lists (expert -> block -> layers)."""
    blocks = []
    for i in range(mode.n_blocks):
        gate_w, gate_b = gates[i] if gates is not None else init_gate(cfg, mode, len(experts))
        blocks.append({"experts": [e[i] for e in experts], "gate_w": gate_w, "gate_b": gate_b})
    return {"backbone": backbone, "blocks": blocks}


def stage2_from_stage1(stage1: list[dict], cfg: LlamaConfig, mode: ModeConfig, *,
                       gate_from: str = "stage1") -> dict:
    """Compose N single-expert (stage-1) models into one with N experts.

    gate_from='stage1': per block, the backbone column (weights and bias) is the mean
    of the stage-1 backbone columns and expert j's column is carried over from its
    stage-1 gate. gate_from='fresh': gates initialised as `mode.gate_init` says.
    The backbone is taken from the first model (all must share it).
    """
    if gate_from not in ("stage1", "fresh"):
        raise ValueError(f"gate_from must be 'stage1' or 'fresh', got {gate_from!r}")
    for j, model in enumerate(stage1):
        got = [len(b["experts"]) for b in model["blocks"]]
        if len(got) != mode.n_blocks or any(n != 1 for n in got):
            raise ValueError(f"stage1[{j}] must have {mode.n_blocks} blocks of 1 expert, has {got}")
    experts = [[b["experts"][0] for b in model["blocks"]] for model in stage1]
    gates = None
    if gate_from == "stage1":
        gates = []
        for i in range(mode.n_blocks):
            cols = [m["blocks"][i] for m in stage1]
            w = jnp.stack([jnp.mean(jnp.stack([c["gate_w"][:, 0] for c in cols]), axis=0)]
                          + [c["gate_w"][:, 1] for c in cols], axis=1)             # [D, E]
            b = jnp.stack([jnp.mean(jnp.stack([c["gate_b"][0] for c in cols]))]
                          + [c["gate_b"][1] for c in cols])                        # [E]
            gates.append((w, b))
    return assemble(stage1[0]["backbone"], experts, cfg, mode, gates)


def mode_hidden(params: dict, tokens: jax.Array, cfg: LlamaConfig, *,
                return_probs: bool = False, gate_top_k: int | None = None):
    """The last block's mixed output [B, T, D] (and, optionally, each block's gate
    probabilities [B, T, E] as a list: what the gate learned). `gate_top_k`: each token
    keeps its k largest gate logits (`top_k_logits`; None: the dense gate)."""
    check_tokens(tokens, "mode_hidden")
    backbone, blocks = params["backbone"], params["blocks"]
    n_layers = len(backbone["layers"])
    if n_layers % len(blocks):
        raise ValueError(f"{n_layers} backbone layers are not divisible into {len(blocks)} blocks")
    per_block = n_layers // len(blocks)
    x = embed(backbone, tokens)                                                   # [B, T, D]
    probs = []
    for i, block in enumerate(blocks):
        h_bb = layers_forward(backbone["layers"][i * per_block:(i + 1) * per_block], x, cfg)
        h_experts = [layers_forward(expert, x, cfg) for expert in block["experts"]]
        logits = top_k_logits(gate_logits(block, x), gate_top_k)                  # [B, T, E]
        if return_probs:
            probs.append(jax.nn.softmax(logits, axis=-1))
        x = gated_combine(logits, jnp.stack([h_bb, *h_experts]))                 # [B, T, D]
    return (x, probs) if return_probs else x


def mode_forward(params: dict, tokens: jax.Array, cfg: LlamaConfig, *,
                 gate_top_k: int | None = None) -> jax.Array:
    """tokens [B, T] -> float32 logits [B, T, V]."""
    return lm_head(params["backbone"], mode_hidden(params, tokens, cfg, gate_top_k=gate_top_k), cfg)

"""Block expansion (LLaMA Pro, Wu et al. 2024, arXiv 2401.02415): a baseline for MoDE.

The frozen backbone gets new layers interleaved into its stack: after every k-th
backbone layer (k = `ExpansionConfig.every`) comes one new layer, a copy of the layer
just below it with its attention output projection `wo` and its MLP down projection
`w_down` set to zero. A pre-norm residual layer with those two zero computes

    h = x + attention(norm(x)) @ 0 = x,     y = h + mlp(norm(h)) @ 0 = h,

the identity, so the expanded model starts as the backbone exactly. Only the new layers
train (on the target mixture, in one stage, like the full / LoRA baselines); embedding,
backbone layers, final norm and head stay frozen.

Gradients at the start follow from the same algebra (tests/test_expansion.py checks them
against a hand derivation): with W_o = 0 and W_down = 0 nothing upstream of those two
matrices reaches the output, so dL/dW_q, dW_k, dW_v, the q/k/v biases, dW_gate, dW_up
and both norm scales are exactly zero at the first step, while

    dL/dW_o    = attn(norm(x))^T @ dL/dy     (nonzero: the attention output is not zero)
    dL/dW_down = u^T @ dL/dy,  u = silu(norm(x) W_gate) * norm(x) W_up   (nonzero)

so the first AdamW step moves W_o and W_down only, and every weight of the new layers
moves from the second step on.

Where we follow LLaMA Pro's published expansion script (TencentARC/LLaMA-Pro,
scripts/block_expansion.py): the copy goes *after* backbone layer i whenever (i + 1) % k
== 0, so the last backbone layer is always followed by a new one; every tensor of the
copy is the source layer's (norms, q/k/v and their biases, gate, up) except o_proj and
down_proj, which are zeros; only the new blocks train. Where we depart: (1) the script
takes the count of new layers and derives k = L // n, leaving the last L - n k backbone
layers unexpanded when n does not divide L; we take k and require it to divide L (the
new layers are then evenly spaced, and the layout is read off the param tree:
k = L / n); (2) LLaMA Pro post-pretrains on a large domain corpus and then instruction-
tunes the whole model; here the new layers are trained on the same target mixture and
token budget as the other baselines, and nothing else ever trains.

Default k = 5: SmolLM2-135M's 30 layers gain 6 new ones (21.2M trained parameters), as
many layers as one MoDE expert (3 blocks x 2 layers), so per domain the same capacity as
MoDE 2x, and half of MoDE 2x's 42.5M in total; k = 3 (10 layers, 35.4M) is the nearest
divisor of 30 to MoDE 2x's total. LLaMA Pro's own setting is 8 new layers over 32 (k = 4).

Params: {"backbone": <llama params>, "expansion": {"layers": [layer] * n}}, n = L / k,
new layer j running after backbone layer (j + 1) k - 1. The forward reuses
`ref.llama.layer_forward` for every layer, old and new.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mode_jax.ref.config import LlamaConfig
from mode_jax.ref.llama import check_tokens, embed, layer_forward, layer_shapes, lm_head

ZEROED = ("wo", "w_down")       # the projections that write into the residual stream


@dataclasses.dataclass(frozen=True)
class ExpansionConfig:
    """Where the new layers go: one after every `every`-th backbone layer."""

    every: int = 5              # k; must divide the backbone's n_layers (see the module docstring)

    def __post_init__(self):
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every <= 0:
            raise ValueError(f"ExpansionConfig.every must be a positive integer, got {self.every!r}")

    def check_backbone(self, cfg: LlamaConfig) -> None:
        """Raise ValueError if the layout cannot be laid over a backbone of `cfg.n_layers` layers."""
        if cfg.n_layers % self.every:
            divisors = [d for d in range(1, cfg.n_layers + 1) if cfg.n_layers % d == 0]
            raise ValueError(f"expansion.every={self.every} must divide the backbone's {cfg.n_layers} layers "
                             f"(one of {', '.join(map(str, divisors))})")

    def n_new(self, cfg: LlamaConfig) -> int:
        self.check_backbone(cfg)
        return cfg.n_layers // self.every


def identity_copy(layer: dict) -> dict:
    """A fresh copy of `layer` with `wo` and `w_down` zeroed: a layer that computes the identity."""
    return {k: jnp.zeros_like(v) if k in ZEROED else jnp.array(v) for k, v in layer.items()}


def init_expansion(backbone: dict, cfg: LlamaConfig, expansion: ExpansionConfig) -> dict:
    """{"layers": [...]}: for every k-th backbone layer (k-1, 2k-1, ..., L-1), its identity copy."""
    k = expansion.every
    return {"layers": [identity_copy(backbone["layers"][(j + 1) * k - 1]) for j in range(expansion.n_new(cfg))]}


def every_of(n_layers: int, n_new: int) -> int:
    """k of a tree with `n_new` new layers over `n_layers` backbone layers (k = L / n)."""
    if n_new <= 0 or n_layers % n_new:
        raise ValueError(f"an expansion of {n_new} new layers does not divide {n_layers} backbone layers evenly")
    return n_layers // n_new


def expansion_hidden(params: dict, tokens: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """The last layer's output [B, T, D] of the expanded stack (before the final norm)."""
    check_tokens(tokens, "expansion_hidden")
    layers, new = params["backbone"]["layers"], params["expansion"]["layers"]
    k = every_of(len(layers), len(new))
    x = embed(params["backbone"], tokens)                                         # [B, T, D]
    for i, layer in enumerate(layers):
        x = layer_forward(layer, x, cfg)
        if (i + 1) % k == 0:
            x = layer_forward(new[(i + 1) // k - 1], x, cfg)
    return x


def expansion_forward(params: dict, tokens: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """tokens [B, T] -> float32 logits [B, T, V]."""
    return lm_head(params["backbone"], expansion_hidden(params, tokens, cfg), cfg)


def as_llama(params: dict, cfg: LlamaConfig) -> tuple[dict, LlamaConfig]:
    """The expanded model as what it is, a plain Llama of L + n layers (the interleaved stack
    written out, new layer j after backbone layer (j + 1) k - 1), with its config: what
    `mode-jax export --to hf` writes, and what transformers then loads as a LlamaForCausalLM."""
    layers, new = params["backbone"]["layers"], params["expansion"]["layers"]
    k = every_of(len(layers), len(new))
    stack = [layer for i, old in enumerate(layers) for layer in [old] + ([new[i // k]] if (i + 1) % k == 0 else [])]
    return {**params["backbone"], "layers": stack}, dataclasses.replace(cfg, n_layers=len(stack))


def expansion_param_count(cfg: LlamaConfig, expansion: ExpansionConfig) -> int:
    """Trained parameters: n_new whole layers (for parameter-matched comparisons)."""
    per_layer = sum(math.prod(s) for s in layer_shapes(cfg).values())
    return per_layer * expansion.n_new(cfg)

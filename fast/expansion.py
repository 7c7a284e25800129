"""Block expansion (LLaMA Pro) on the stacked layout: the function of `ref/expansion.py`.

The backbone's stacked layers [L, ...] run in n = L / k segments of k layers, each
followed by its new layer (the new layers stacked [n, ...] under
params["expansion"]["layers"]). Every stack, old or new, goes through
`fast.model.scan_layers`, so the layer is fast/model.py's (fused projections, bf16
compute, the configured loop and remat) and nothing here is a second transformer layer.

Segments run in a Python loop (n is small: 6 for SmolLM2 at k = 5) rather than as one
stack with the new layers spliced in: a spliced stack would be one array holding frozen
and trainable layers, whose weight gradient would then be computed for all L + n layers;
kept apart, only the n new layers get one (the backbone's are closed over as frozen).
"""

from __future__ import annotations

import jax

from mode_jax.fast.config import FastConfig
from mode_jax.fast.model import _depth, _rope, _stack_kwargs, _take, embed, scan_layers
from mode_jax.ref.config import LlamaConfig
from mode_jax.ref.expansion import every_of


def expansion_hidden(params: dict, tokens: jax.Array, cfg: LlamaConfig, fast: FastConfig) -> jax.Array:
    """The last layer's output [B, T, D] of the expanded stack (before the final norm).
    params: {"backbone": <stacked backbone>, "expansion": {"layers": {key: [n, ...]}}}."""
    backbone, new = params["backbone"], params["expansion"]["layers"]
    n_layers, n_new = _depth(backbone["layers"]), _depth(new)
    k = every_of(n_layers, n_new)
    stack_kw = _stack_kwargs(cfg, fast)
    cos, sin = _rope(tokens.shape[1], cfg)                                        # [T, H] each
    x = embed(backbone, tokens, fast.dtype)                                       # [B, T, D]
    for j in range(n_new):
        x = scan_layers(_take(backbone["layers"], slice(j * k, (j + 1) * k)), None, x, cos, sin, **stack_kw)
        x = scan_layers(_take(new, slice(j, j + 1)), None, x, cos, sin, **stack_kw)
    return x

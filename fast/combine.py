"""The one place that picks how the MoDE merge runs (paper section 3, eq. 1-2).

`gated_combine(logits, outputs)` has the reference's signature and semantics
(logits [..., E], outputs [E, ..., D] -> [..., D] = sum_e softmax(logits)_e
outputs_e, float32 softmax and accumulation) and is differentiable. It chooses,
per platform, at lowering time through `lax.platform_dependent`:

  * cuda: the Pallas Triton kernel (`kernels/gated_combine.py`, default tiles
    [128 tokens, 64 width]) when D is a multiple of 64 and there are at least
    128 tokens; otherwise XLA. Below one full tile (decode, tiny batches) the
    launch is not worth it, and Triton tiles must be powers of two dividing D.
  * tpu: the Pallas Mosaic kernel (full-width rows: any D) when there are at
    least 8 tokens; otherwise XLA.
  * anything else (CPU): the XLA reference, which XLA fuses well on its own.

Shape checks are static, so the choice costs nothing at run time. Only the
branch of the platform being compiled for is lowered, so the kernels are never
lowered on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax

from mode_jax.kernels.gated_combine import BlockSizes
from mode_jax.kernels.gated_combine import gated_combine as kernel_gated_combine
from mode_jax.kernels.gated_combine import gated_combine_reference

# Fewer tokens than this and XLA runs the merge (see the module docstring).
MOSAIC_MIN_TOKENS = 8


def _fits(backend: str, *, tokens: int, width: int, n_experts: int, itemsize: int) -> bool:
    """Whether the kernel with its default tiles takes this shape."""
    bs = BlockSizes.get_default(backend, width=width, n_experts=n_experts, itemsize=itemsize)
    min_tokens = bs.block_t if backend == "triton" else MOSAIC_MIN_TOKENS
    return tokens >= min_tokens and width % bs.block_d == 0


def gated_combine(logits: jax.Array, outputs: jax.Array) -> jax.Array:
    """logits [..., E], outputs [E, ..., D] -> [..., D] in outputs' dtype."""
    if logits.ndim < 1 or outputs.ndim != logits.ndim + 1:
        return gated_combine_reference(logits, outputs)  # raises the reference's shape error
    shape = dict(tokens=math.prod(logits.shape[:-1]), width=outputs.shape[-1],
                 n_experts=outputs.shape[0], itemsize=outputs.dtype.itemsize)
    branches = {
        platform: functools.partial(kernel_gated_combine, backend=backend)
        for platform, backend in (("cuda", "triton"), ("tpu", "mosaic_tpu"))
        if _fits(backend, **shape)
    }
    if not branches:
        return gated_combine_reference(logits, outputs)
    return lax.platform_dependent(logits, outputs, **branches,
                                 default=gated_combine_reference)

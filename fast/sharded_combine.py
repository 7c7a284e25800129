"""The MoDE merge (paper eq. 1-2) on sharded activations: a per-shard Pallas (or XLA)
combine under `jax.shard_map`, differentiable (section 3.3, where each merge runs).

A `pallas_call` is opaque to XLA's sharding propagation, so on a mesh the kernel
has to see one shard: tokens split over `token_axes` (the batch's mesh axes) and,
optionally, the width split over `width_axes`. Per shard

    y = sum_e softmax(logits)_e * outputs_e

needs no communication. The backward of the width-split case does: each shard's
logits cotangent sums <dy, h_e> over its own slice of D only, and the logits are
replicated over `width_axes`, so the shard cotangents are psum'd over those axes.

`shard_map` runs with `check_vma=False`: the kernel's `pallas_call` declares its
out_shape without a manual axis type (`kernels/gated_combine.py`), which
`check_vma=True` rejects. With the vma check off, shard_map's own transpose of
a replicated input is not something to lean on, so the vjp is written here
(`custom_vjp`): the forward and backward are two shard_maps, and the backward
calls the local combine's own vjp (the kernel's Pallas backward) per shard and
adds the psum.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from mode_jax.fast.combine import gated_combine as platform_gated_combine

LocalCombine = Callable[[jax.Array, jax.Array], jax.Array]


def _axes(axes: tuple[str, ...]):
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def _specs(n_lead: int, token_axes, width_axes):
    """Specs of logits [*lead, E], outputs [E, *lead, D], y [*lead, D]: the first
    leading dim (batch) split over token_axes, D over width_axes."""
    lead = (_axes(token_axes),) + (None,) * (n_lead - 1)
    return (P(*lead, None), P(None, *lead, _axes(width_axes)), P(*lead, _axes(width_axes)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _sharded(logits, outputs, mesh, token_axes, width_axes, combine):
    logits_spec, outputs_spec, y_spec = _specs(logits.ndim - 1, token_axes, width_axes)
    return jax.shard_map(combine, mesh=mesh, in_specs=(logits_spec, outputs_spec),
                         out_specs=y_spec, check_vma=False)(logits, outputs)


def _sharded_fwd(logits, outputs, mesh, token_axes, width_axes, combine):
    return _sharded(logits, outputs, mesh, token_axes, width_axes, combine), (logits, outputs)


def _sharded_bwd(mesh, token_axes, width_axes, combine, residuals, dy):
    logits, outputs = residuals
    logits_spec, outputs_spec, y_spec = _specs(logits.ndim - 1, token_axes, width_axes)

    def local_bwd(logits, outputs, dy):
        _, vjp = jax.vjp(combine, logits, outputs)
        d_logits, d_outputs = vjp(dy)
        if width_axes:   # logits are replicated over the width axes; outputs are not
            d_logits = jax.lax.psum(d_logits, width_axes)
        return d_logits, d_outputs

    return jax.shard_map(local_bwd, mesh=mesh, in_specs=(logits_spec, outputs_spec, y_spec),
                         out_specs=(logits_spec, outputs_spec), check_vma=False)(logits, outputs, dy)


_sharded.defvjp(_sharded_fwd, _sharded_bwd)


def sharded_gated_combine(logits: jax.Array, outputs: jax.Array, *, mesh,
                          token_axes: tuple[str, ...] = (), width_axes: tuple[str, ...] = (),
                          combine: LocalCombine = platform_gated_combine) -> jax.Array:
    """sum_e softmax(logits)_e outputs_e with the combine run per shard.

    logits [B, ..., E], outputs [E, B, ..., D] -> [B, ..., D]. B is split over the
    mesh axes `token_axes`, D over `width_axes`; both must divide (checked here).
    `combine` is the per-shard merge: by default `fast.combine.gated_combine` (the
    Pallas kernel on GPU/TPU, XLA on CPU); tests pass the kernel in interpret mode.
    """
    token_axes, width_axes = tuple(token_axes), tuple(width_axes)
    for a in token_axes + width_axes:
        if a not in mesh.shape:
            raise ValueError(f"sharded_gated_combine: mesh axis {a!r} is not in mesh {dict(mesh.shape)}")
    if set(token_axes) & set(width_axes):
        raise ValueError(f"{token_axes=} and {width_axes=} must not share a mesh axis")
    if outputs.ndim != logits.ndim + 1 or outputs.shape[0] != logits.shape[-1]:
        raise ValueError(f"logits {logits.shape} must be [B, ..., E] and outputs {outputs.shape} [E, B, ..., D]")
    for name, axes, size in (("batch", token_axes, logits.shape[0]), ("width", width_axes, outputs.shape[-1])):
        n = 1
        for a in axes:
            n *= mesh.shape[a]
        if size % n:
            raise ValueError(f"sharded_gated_combine: {name} dimension {size} is not divisible by "
                             f"mesh axes {axes} of size {n}")
    if not token_axes and not width_axes:
        return combine(logits, outputs)
    return _sharded(logits, outputs, mesh, token_axes, width_axes, combine)

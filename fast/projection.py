"""Several projections of one input as one matmul, x @ [W_1 | ... | W_k] split into k
outputs, with a backward pass that joins their cotangents once.

Differentiated the plain way, the split's transpose is a concatenation of the k
cotangents that both backward matmuls (dx and dW) read; on the H100, XLA computed
that concatenation twice, once per matmul (attention's q|k|v: 0.6 ms of a 53 ms full
fine-tuning step). Here the joined cotangent sits behind an optimization barrier,
so it is written once (fused with whatever produced its pieces, e.g. RoPE's
backward), and dW is only computed when the weight is differentiated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero


def split_projection(x: jax.Array, w: jax.Array, sizes: tuple[int, ...],
                     bias: jax.Array | None = None) -> list[jax.Array]:
    """x [B, T, D] @ w [D, sum(sizes)] (+ bias [sum(sizes)]) -> [x @ w[:, piece] (+ bias[piece])
    for each piece of `sizes`]. The bias (Qwen2's q|k|v) is added to each piece after the
    split, by plain JAX: its gradient is a sum over B, T that XLA fuses with the add."""
    sizes = tuple(int(s) for s in sizes)
    if x.ndim != 3 or w.ndim != 2 or x.shape[-1] != w.shape[0] or sum(sizes) != w.shape[1]:
        raise ValueError(f"split_projection: x {x.shape} must be [B, T, D] for w {w.shape} "
                         f"[D, sum{sizes}]")
    ys = list(_split_projection(x, w, sizes))
    if bias is None:
        return ys
    if bias.shape != (w.shape[1],):
        raise ValueError(f"split_projection: bias {bias.shape} must be [{w.shape[1]}] for w {w.shape}")
    return [y + b.astype(y.dtype) for y, b in zip(ys, _split(bias, sizes))]


def _split(y, sizes):
    return tuple(jnp.split(y, np.cumsum(sizes)[:-1], axis=-1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _split_projection(x, w, sizes):
    return _split(jnp.einsum("BTD,DK->BTK", x, w), sizes)


def _fwd(x, w, sizes):
    y = jnp.einsum("BTD,DK->BTK", x.value, w.value)
    return _split(y, sizes), (x.value, w.value, x.perturbed, w.perturbed)


def _bwd(sizes, res, dys):
    x, w, want_x, want_w = res
    if all(isinstance(d, SymbolicZero) for d in dys):
        return None, None
    b, t, _ = x.shape
    parts = [jnp.zeros((b, t, s), x.dtype) if isinstance(d, SymbolicZero) else d.astype(x.dtype)
             for d, s in zip(dys, sizes)]
    dy = lax.optimization_barrier(jnp.concatenate(parts, axis=-1))
    c = jnp.promote_types(x.dtype, jnp.float32)
    dx = jnp.einsum("BTK,DK->BTD", dy, w, preferred_element_type=c).astype(x.dtype) if want_x else None
    dw = jnp.einsum("BTD,BTK->DK", x, dy, preferred_element_type=c).astype(w.dtype) if want_w else None
    return dx, dw


_split_projection.defvjp(_fwd, _bwd, symbolic_zeros=True)

"""The SwiGLU input of a layer's MLP, x @ [W_gate | W_up] -> silu(g) * up, with a backward
pass that writes d[gate | up] once and keeps no float32 residuals.

With `FastConfig.fuse_projections` the gate and up projections are one matmul whose
output gu [.., 2F] holds g = gu[.., :F] and up = gu[.., F:]. Differentiated the plain
way, the slices' transpose is a concatenation of dg and dup that both backward matmuls
read, and on the H100 XLA made that copy twice, once per matmul, after writing dg and
dup separately (4 ms of a 54 ms full fine-tuning step, bench/RESULTS.md); it also
keeps float32 copies of g, up and sigmoid(g) as residuals. Here the residuals are x,
the weight and gu, and the backward pass is

    s = sigmoid(g)      dg = du * up * s * (1 + g (1 - s))      dup = du * g * s
    d gu = [dg | dup]   (one fused kernel, written once, behind an optimization barrier)
    dx = d gu W^T       dW = x^T d gu

with float32 accumulation, and dW (dx) only computed when the weight (x) is
differentiated (`symbolic_zeros`): a frozen backbone's MLP gets no weight-gradient
matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero


def _half(w) -> int:
    if w.shape[-1] % 2:
        raise ValueError(f"swiglu: the output axis of W_gate|W_up {w.shape} must be even (gate | up)")
    return w.shape[-1] // 2


def _compute_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


def swiglu(gu: jax.Array) -> jax.Array:
    """silu(g) * up of gu = [g | up] [.., 2F] -> [.., F], float32 inside, gu's dtype out."""
    f, c = _half(gu), _compute_dtype(gu)
    return (jax.nn.silu(gu[..., :f].astype(c)) * gu[..., f:].astype(c)).astype(gu.dtype)


def swiglu_projection_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """swiglu(x @ w), x [B, T, D], w [D, 2F] in x's dtype -> [B, T, F], differentiated by JAX."""
    return swiglu(jnp.einsum("BTD,DK->BTK", x, w))


def swiglu_projection(x: jax.Array, w: jax.Array) -> jax.Array:
    """Same function as `swiglu_projection_reference`, with the backward pass of the module doc."""
    if w.ndim != 2 or x.shape[-1] != w.shape[0] or x.ndim != 3:
        raise ValueError(f"swiglu_projection: x {x.shape} must be [B, T, D] for w {w.shape} [D, 2F]")
    _half(w)
    return _swiglu_projection(x, w)


@jax.custom_vjp
def _swiglu_projection(x, w):
    return swiglu_projection_reference(x, w)


def _fwd(x, w):
    gu = jnp.einsum("BTD,DK->BTK", x.value, w.value)
    return swiglu(gu), (x.value, w.value, gu, x.perturbed, w.perturbed)


def _bwd(res, du):
    x, w, gu, want_x, want_w = res
    if isinstance(du, SymbolicZero):
        return None, None
    f, c = _half(w), _compute_dtype(gu)
    g, up = gu[..., :f].astype(c), gu[..., f:].astype(c)
    du = du.astype(c)
    s = jax.nn.sigmoid(g)
    dg = du * up * s * (1 + g * (1 - s))
    dup = du * g * s
    # d gu = [dg | dup], written once by one fused kernel. The barrier keeps XLA from
    # duplicating that concatenation into each of the two matmuls that read it.
    dgu = lax.optimization_barrier(jnp.concatenate([dg, dup], axis=-1).astype(x.dtype))
    dx = jnp.einsum("BTK,DK->BTD", dgu, w, preferred_element_type=c).astype(x.dtype) if want_x else None
    dw = jnp.einsum("BTD,BTK->DK", x, dgu, preferred_element_type=c).astype(w.dtype) if want_w else None
    return dx, dw


_swiglu_projection.defvjp(_fwd, _bwd, symbolic_zeros=True)

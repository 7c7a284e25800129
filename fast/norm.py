"""RMSNorm with a hand-written backward pass that keeps only what it needs.

Same function as `ref.llama.rms_norm` (statistics in at least float32, output in x's
dtype). Differentiated the plain way, the float32 copies of x and of the normalised
x are residuals: with `FastConfig.remat="none"` they are stored for every layer,
[tokens, D] float32 each. Here the residuals are x itself (compute dtype), the
scale and the reciprocal RMS r [.., 1]:

    x^ = x r          dx = r (g - x^ mean(g x^))  with g = dy * scale
    d scale = sum over tokens of dy * x^

and the scale's cotangent is only computed when it is differentiated
(`symbolic_zeros`): frozen norms cost nothing in the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def _stats_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


def _rstd(x, eps):
    x = x.astype(_stats_dtype(x))
    return jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _forward(x, scale, eps):
    c = _stats_dtype(x)
    r = _rstd(x, eps)
    return (x.astype(c) * r * scale.astype(c)).astype(x.dtype), r


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float) -> jax.Array:
    """x [.., D] / rms(x) * scale [D], as `ref.llama.rms_norm`."""
    if scale.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: scale {scale.shape} must be [D] for x {x.shape}")
    return _norm(x, scale, float(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _norm(x, scale, eps):
    return _forward(x, scale, eps)[0]


def _fwd(x, scale, eps):
    y, r = _forward(x.value, scale.value, eps)
    return y, (x.value, scale.value, r, scale.perturbed)


def _bwd(eps, res, dy):
    x, scale, r, want_scale = res
    if isinstance(dy, SymbolicZero):
        return None, None
    c = r.dtype
    xhat = x.astype(c) * r
    g = dy.astype(c) * scale.astype(c)
    dx = r * (g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    dscale = None
    if want_scale:
        dscale = jnp.sum((dy.astype(c) * xhat).reshape(-1, x.shape[-1]), axis=0).astype(scale.dtype)
    return dx.astype(x.dtype), dscale


_norm.defvjp(_fwd, _bwd, symbolic_zeros=True)

"""The MoDE merge fused with the last down-projection of every stack (paper eq. 1-2).

Each stack e of a block (e = 0 the backbone, 1..N the experts) ends in a layer
whose output is h_e = r_e + u_e W_e: r_e is that layer's residual stream after
attention, u_e = silu(norm(r_e) W_gate) * norm(r_e) W_up its SwiGLU hidden [.., F]
and W_e its down-projection [F, D]. With a = softmax(gate logits),

    y = sum_e a_e h_e = sum_e a_e r_e + [a_0 u_0 | ... | a_N u_N] @ [W_0; ...; W_N]

so the N + 1 down-projections and the gated sum are one matmul with a contraction
of (N + 1) F, and no h_e is ever written to memory. The backward pass is the same
algebra: with ds = dy [W_0; ...; W_N]^T (one matmul, split into ds_e),

    du_e = a_e ds_e        dr_e = a_e dy        dW_e = (a_e u_e)^T dy
    d a_e = <dy, h_e> = <dy, r_e> + <ds_e, u_e>     (no h_e needed)

then the softmax backward gives the gate logits' cotangent. The rule uses
`custom_vjp(symbolic_zeros=True)` to see which inputs are differentiated: a frozen
stack's dW_e (the backbone's, or every expert's when only gates train) is never
computed, and neither is the cotangent of an input nothing upstream trains (block 0's
backbone activations).

Accumulation is float32 (softmax, the gated sum, every matmul); y and the
activation cotangents come out in the activations' dtype, weight cotangents in the
weights' dtype. `fused_merge_reference` states the same function the plain way.
Shapes and dtypes are checked with chex while tracing (a one-line ValueError; nothing
is left in the traced program), in the forward and in the forward of the VJP.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

F32 = jnp.float32


def fused_merge_reference(logits, r_bb, u_bb, w_bb, r_ex, u_ex, w_ex):
    """sum_e softmax(logits)_e (r_e + u_e W_e), each h_e materialised. Shapes as `fused_merge`."""
    dtype = r_bb.dtype
    h = [r_bb + jnp.einsum("BTF,FD->BTD", u_bb, w_bb.astype(dtype))]
    h += [r_ex[j] + jnp.einsum("BTF,FD->BTD", u_ex[j], w_ex[j].astype(dtype)) for j in range(r_ex.shape[0])]
    probs = jax.nn.softmax(logits.astype(F32), axis=-1)                          # [B, T, E]
    return sum(probs[..., e:e + 1] * h[e].astype(F32) for e in range(len(h))).astype(dtype)


def _gated_inputs(probs, u_bb, u_ex, dtype):
    """[a_0 u_0 | ... | a_N u_N]: [B, T, (N + 1) F] in `dtype`."""
    parts = [probs[..., 0:1] * u_bb.astype(F32)]
    parts += [probs[..., j + 1:j + 2] * u_ex[j].astype(F32) for j in range(u_ex.shape[0])]
    return jnp.concatenate([p.astype(dtype) for p in parts], axis=-1)


def _stacked_weights(w_bb, w_ex, dtype):
    """[W_0; ...; W_N]: [(N + 1) F, D] in `dtype`."""
    n, f, d = w_ex.shape
    return jnp.concatenate([w_bb.astype(dtype), w_ex.reshape(n * f, d).astype(dtype)], axis=0)


def _check(logits, r_bb, u_bb, w_bb, r_ex, u_ex, w_ex) -> None:
    """Shapes as `fused_merge` documents them, float dtypes: a ValueError naming the input."""
    names = ("logits", "r_bb", "u_bb", "w_bb", "r_ex", "u_ex", "w_ex")
    dims = ("[B, T, E]", "[B, T, D]", "[B, T, F]", "[F, D]", "[N, B, T, D]", "[N, B, T, F]", "[N, F, D]")
    args = (logits, r_bb, u_bb, w_bb, r_ex, u_ex, w_ex)
    for name, dim, x in zip(names, dims, args):
        chex.assert_rank(x, dim.count(",") + 1, custom_message=f"fused_merge: {name} must be {dim}",
                         exception_type=ValueError)
        chex.assert_type(x, float, custom_message=f"fused_merge: {name} must be a float array",
                         exception_type=ValueError)
    (b, t, d), f, n = r_bb.shape, u_bb.shape[-1], r_ex.shape[0]
    want = ((b, t, n + 1), (b, t, d), (b, t, f), (f, d), (n, b, t, d), (n, b, t, f), (n, f, d))
    for name, dim, x, shape in zip(names, dims, args, want):
        extra = " (E = N + 1 columns, N from r_ex)" if name == "logits" else ""
        chex.assert_shape(x, shape, custom_message=f"fused_merge: {name} must be {dim}{extra} = {shape}",
                          exception_type=ValueError)


def _forward(logits, r_bb, u_bb, w_bb, r_ex, u_ex, w_ex):
    _check(logits, r_bb, u_bb, w_bb, r_ex, u_ex, w_ex)
    dtype = r_bb.dtype
    probs = jax.nn.softmax(logits.astype(F32), axis=-1)                           # [B, T, E]
    s = _gated_inputs(probs, u_bb, u_ex, dtype)                                    # [B, T, (N+1)F]
    w = _stacked_weights(w_bb, w_ex, dtype)                                        # [(N+1)F, D]
    mixed = probs[..., 0:1] * r_bb.astype(F32)                                     # [B, T, D]
    for j in range(r_ex.shape[0]):
        mixed = mixed + probs[..., j + 1:j + 2] * r_ex[j].astype(F32)
    y = mixed + jnp.einsum("BTK,KD->BTD", s, w, preferred_element_type=F32)
    return y.astype(dtype), probs


@jax.custom_vjp
def fused_merge(logits, r_bb, u_bb, w_bb, r_ex, u_ex, w_ex):
    """The gated sum of N + 1 stacks whose last down-projection is fused into it.

    logits [B, T, E] gate logits (softmax in float32), E = N + 1, column 0 the backbone;
    r_bb [B, T, D], u_bb [B, T, F], w_bb [F, D]: the backbone's last layer (see module doc);
    r_ex [N, B, T, D], u_ex [N, B, T, F], w_ex [N, F, D]: the experts' last layers.
    Returns y [B, T, D] in r_bb's dtype.
    """
    return _forward(logits, r_bb, u_bb, w_bb, r_ex, u_ex, w_ex)[0]


def _fwd(*primals):
    values = [p.value for p in primals]
    # Which inputs are differentiated, kept in the residuals' tree structure (static):
    # () where perturbed, None where not.
    flags = tuple(() if p.perturbed else None for p in primals)
    y, probs = _forward(*values)
    logits, r_bb, u_bb, w_bb, r_ex, u_ex, w_ex = values
    logits_dtype = jnp.zeros((0,), logits.dtype)           # carries the dtype only
    return y, (probs, logits_dtype, r_bb, u_bb, w_bb, r_ex, u_ex, w_ex, flags)


def _bwd(res, dy):
    probs, logits_dtype, r_bb, u_bb, w_bb, r_ex, u_ex, w_ex, flags = res
    p_logits, p_r_bb, p_u_bb, p_w_bb, p_r_ex, p_u_ex, p_w_ex = (x is not None for x in flags)
    n, f = u_ex.shape[0], u_bb.shape[-1]
    dtype = r_bb.dtype
    if isinstance(dy, SymbolicZero):
        return (None,) * 7
    a = [probs[..., e:e + 1] for e in range(n + 1)]                               # each [B, T, 1]
    need_ds = p_logits or p_u_bb or p_u_ex
    if need_ds:
        w = _stacked_weights(w_bb, w_ex, dtype)
        # In the activations' dtype (float32 accumulation): the widest array of the merge.
        ds = jnp.einsum("BTD,KD->BTK", dy, w, preferred_element_type=dtype)      # [B, T, (N+1)F]
        ds_e = [ds[..., e * f:(e + 1) * f] for e in range(n + 1)]                 # each [B, T, F]
    dy32 = dy.astype(F32)

    d_logits = None
    if p_logits:
        r = [r_bb] + [r_ex[j] for j in range(n)]
        u = [u_bb] + [u_ex[j] for j in range(n)]
        # d a_e = <dy, h_e> = <dy, r_e> + <ds_e, u_e>, float32 sums.
        dot = lambda p, q: jnp.sum(p.astype(F32) * q.astype(F32), axis=-1)        # [B, T]
        da = jnp.stack([dot(dy, r[e]) + dot(ds_e[e], u[e]) for e in range(n + 1)], axis=-1)   # [B, T, E]
        d_logits = (probs * (da - jnp.sum(probs * da, -1, keepdims=True))).astype(logits_dtype.dtype)

    d_r_bb = (a[0] * dy32).astype(r_bb.dtype) if p_r_bb else None
    d_u_bb = (a[0] * ds_e[0].astype(F32)).astype(u_bb.dtype) if p_u_bb else None
    d_r_ex = jnp.stack([(a[j + 1] * dy32).astype(r_ex.dtype) for j in range(n)]) if p_r_ex and n else None
    d_u_ex = jnp.stack([(a[j + 1] * ds_e[j + 1].astype(F32)).astype(u_ex.dtype) for j in range(n)]) \
        if p_u_ex and n else None
    d_w_bb = d_w_ex = None
    if p_w_bb:
        s_bb = (a[0] * u_bb.astype(F32)).astype(dtype)
        d_w_bb = jnp.einsum("BTF,BTD->FD", s_bb, dy, preferred_element_type=F32).astype(w_bb.dtype)
    if p_w_ex and n:
        # One matmul for every expert: [a_1 u_1 | ... | a_N u_N]^T dy, [N F, D].
        s_ex = jnp.concatenate([(a[j + 1] * u_ex[j].astype(F32)).astype(dtype) for j in range(n)], -1)
        d_w_ex = jnp.einsum("BTK,BTD->KD", s_ex, dy, preferred_element_type=F32)
        d_w_ex = d_w_ex.reshape(w_ex.shape).astype(w_ex.dtype)
    return d_logits, d_r_bb, d_u_bb, d_w_bb, d_r_ex, d_u_ex, d_w_ex


fused_merge.defvjp(_fwd, _bwd, symbolic_zeros=True)

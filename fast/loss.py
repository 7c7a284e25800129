"""Next-token loss and accuracy without the [tokens, V] logits (as `ref.train.next_token_metrics`).

Tokens are flattened and cut into chunks of `chunk` (the last one padded with
masked-out rows); a `lax.scan` over chunks computes, per chunk, the logits
[chunk, V] in the compute dtype (float32 accumulation), their logsumexp in float32,
the target's logit and the argmax. At most one chunk of logits exists at a time.

The loss is a masked sum, so its gradient direction does not depend on the
cotangent that arrives later: the forward rule of the custom VJP computes it
while the chunk's logits are at hand (as fused linear cross-entropy kernels do):

    d logits = (softmax(logits) - onehot(target)) * mask      [chunk, V], compute dtype
    dh       = d logits @ W                                   [chunk, D], float32
    dW      += d logits^T @ h                                 [V, D], float32, only if W trains

and the backward rule only scales them by the incoming cotangent. Nothing is
recomputed and no [tokens, V] array is kept for the backward pass. Without
differentiation (eval) only the statistics are computed. The accuracy has zero
gradient.

`kernel="pallas"` (FastConfig.loss_kernel) swaps the chunks for the fused Triton kernels of
`kernels/fused_ce.py` on a CUDA GPU (chosen at lowering time; the chunked path elsewhere):
same sums, same gradients, no logits in memory at all, the backward recomputing them.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from mode_jax.kernels.fused_ce import MIN_DOT, fused_ce

F32 = jnp.float32


def _chunks(h, targets, mask, chunk):
    """Flatten [B, T, ...] to [n_chunks, chunk, ...], padding with masked-out rows."""
    d = h.shape[-1]
    n = targets.size
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = jnp.pad(h.reshape(n, d), ((0, pad), (0, 0))).reshape(n_chunks, chunk, d)
    targets = jnp.pad(targets.reshape(n), (0, pad)).reshape(n_chunks, chunk)
    mask = jnp.pad(mask.reshape(n).astype(F32), (0, pad)).reshape(n_chunks, chunk)
    return h, targets, mask, n


def _chunk_logits(h_c, w):
    """h_c [C, D], w [V, D] (already in h's dtype) -> logits [C, V] in h's dtype (float32 accumulation)."""
    # Output straight in h's dtype: a float32 [C, V] would double the chunk's memory traffic.
    return jnp.einsum("CD,VD->CV", h_c, w, preferred_element_type=h_c.dtype)


def _chunk_stats(logits, t_c, m_c):
    """Masked sums of the negative log-likelihood and of argmax == target; and the logsumexp."""
    l32 = logits.astype(F32)
    lse = jax.nn.logsumexp(l32, axis=-1)                                            # [C]
    target = jnp.take_along_axis(l32, t_c[:, None], axis=-1)[:, 0]                  # [C]
    correct = (jnp.argmax(logits, axis=-1) == t_c).astype(F32)
    return jnp.sum((lse - target) * m_c), jnp.sum(correct * m_c), lse


@functools.lru_cache(maxsize=None)
def _make_chunked_sums(chunk: int):
    @jax.custom_vjp
    def chunked_sums(h, w, targets, mask):
        hc, tc, mc, _ = _chunks(h, targets, mask, chunk)
        wc = w.astype(h.dtype)                       # cast once, not per chunk

        def body(carry, xs):
            h_c, t_c, m_c = xs
            nll, correct, _ = _chunk_stats(_chunk_logits(h_c, wc), t_c, m_c)
            return (carry[0] + nll, carry[1] + correct), None

        (nll, correct), _ = lax.scan(body, (jnp.zeros((), F32), jnp.zeros((), F32)), (hc, tc, mc))
        return nll, correct

    def fwd(h, w, targets, mask):
        want_dh, want_dw = h.perturbed, w.perturbed
        h, w, targets, mask = h.value, w.value, targets.value, mask.value
        hc, tc, mc, n = _chunks(h, targets, mask, chunk)
        vocab = w.shape[0]
        wc = w.astype(h.dtype)

        def body(carry, xs):
            nll_acc, correct_acc, dw_acc = carry
            h_c, t_c, m_c = xs
            logits = _chunk_logits(h_c, wc)                                         # [C, V]
            nll, correct, lse = _chunk_stats(logits, t_c, m_c)
            onehot = jnp.arange(vocab)[None, :] == t_c[:, None]
            dlogits = ((jnp.exp(logits.astype(F32) - lse[:, None]) - onehot) * m_c[:, None]).astype(h.dtype)
            dh_c = jnp.einsum("CV,VD->CD", dlogits, wc, preferred_element_type=F32) \
                if want_dh else None
            if want_dw:
                dw_acc = dw_acc + jnp.einsum("CV,CD->VD", dlogits, h_c, preferred_element_type=F32)
            return (nll_acc + nll, correct_acc + correct, dw_acc), dh_c

        dw0 = jnp.zeros(w.shape, F32) if want_dw else None
        (nll, correct, dw), dh = lax.scan(body, (jnp.zeros((), F32), jnp.zeros((), F32), dw0), (hc, tc, mc))
        if want_dh:
            dh = dh.reshape(-1, h.shape[-1])[:n].reshape(h.shape)                  # [B, T, D] float32
        h_dtype, w_dtype = jnp.zeros((0,), h.dtype), jnp.zeros((0,), w.dtype)    # dtypes only
        return (nll, correct), (dh, dw, h_dtype, w_dtype)

    def bwd(res, cts):
        dh, dw, h_dtype, w_dtype = res
        g = cts[0]
        if isinstance(g, SymbolicZero):
            return None, None, None, None
        dh = None if dh is None else (g * dh).astype(h_dtype.dtype)
        dw = None if dw is None else (g * dw).astype(w_dtype.dtype)
        return dh, dw, None, None

    chunked_sums.defvjp(fwd, bwd, symbolic_zeros=True)
    return chunked_sums


def _fused_sums(h, w, targets, mask, *, interpret):
    """The chunked sums' (nll, correct) from the fused kernels' per-token values."""
    loss, correct = fused_ce(h, w, targets, mask, interpret=interpret)          # [B, T] each
    return jnp.sum(loss), jnp.sum(correct)


def _sums(kernel: str, chunk: int, width: int):
    """(h, w, targets, mask) -> (nll, correct) for FastConfig.loss_kernel (config.LOSS_KERNELS)."""
    chunked = _make_chunked_sums(chunk)
    if kernel == "xla" or width % MIN_DOT:     # the kernels' dots need D in multiples of 16
        return chunked
    if kernel == "pallas_interpret":
        return functools.partial(_fused_sums, interpret=True)
    if kernel != "pallas":
        raise ValueError(f"next_token_metrics: kernel must be 'xla', 'pallas' or 'pallas_interpret', got {kernel!r}")
    # Triton on CUDA only (kernels/fused_ce.py has no TPU version); only the branch of the
    # platform compiled for is lowered.
    return lambda *args: lax.platform_dependent(*args, cuda=functools.partial(_fused_sums, interpret=False),
                                                default=chunked)


def next_token_metrics(h: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array | None = None,
                       *, chunk: int = 4096, kernel: str = "xla") -> dict:
    """Masked mean cross-entropy and argmax accuracy of logits = h @ w.T, chunked.

    h [B, T, D] final-normed hidden states (its dtype is the logits' dtype), w [V, D]
    the output projection (any dtype; its gradient comes back in it, accumulated in
    float32), targets int [B, T], mask [B, T] (None = all count).
    Returns {"loss", "accuracy", "tokens"} as `ref.train.next_token_metrics`.
    kernel: FastConfig.loss_kernel ('xla' = the chunks, 'pallas', 'pallas_interpret').
    """
    # chex reads shapes and dtypes while tracing: nothing of it is in the traced program.
    where, err = "next_token_metrics", ValueError
    chex.assert_rank([h, w, targets], [3, 2, 2], exception_type=err,
                     custom_message=f"{where}: h, w, targets must be [B, T, D], [V, D], [B, T]")
    chex.assert_type([h, w], float, custom_message=f"{where}: h and w must be float arrays", exception_type=err)
    chex.assert_type(targets, int, custom_message=f"{where}: targets must be integer ids", exception_type=err)
    chex.assert_shape(targets, h.shape[:-1], exception_type=err,
                      custom_message=f"{where}: h {h.shape} must be [B, T, D] for targets {targets.shape} [B, T]")
    chex.assert_shape(w, (None, h.shape[-1]), exception_type=err,
                      custom_message=f"{where}: w must be [V, D] with D = {h.shape[-1]} (h {h.shape})")
    if mask is not None:
        chex.assert_shape(mask, targets.shape, exception_type=err,
                          custom_message=f"{where}: mask must be [B, T] = {targets.shape}")
    if mask is None:
        mask = jnp.ones(targets.shape, F32)
    mask = lax.stop_gradient(mask.astype(F32))
    nll, correct = _sums(kernel, int(chunk), h.shape[-1])(h, w, targets, mask)
    count = jnp.sum(mask)
    denom = jnp.maximum(count, 1.0)
    return {"loss": nll / denom, "accuracy": lax.stop_gradient(correct) / denom, "tokens": count}

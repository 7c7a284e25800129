"""The tied LM head and next-token cross-entropy as Pallas Triton kernels, forward and backward,
without the [N, V] logits ever in memory.

For hidden states h [N, D] (compute dtype), the head W [V, D], targets t [N] and a mask
(token weights) m [N]:

    l_{n,v}    = round_to_compute_dtype(sum_d h_{n,d} W_{v,d})      (float32 accumulation)
    lse_n      = log sum_v exp(l_{n,v})                             (float32)
    loss_n     = m_n (lse_n - l_{n,t_n})                            (float32)
    correct_n  = m_n [argmax_v l_{n,v} == t_n]                      (first index on ties)

and, for a cotangent g [N] of the loss,

    dl_{n,v} = g_n m_n (softmax(l_n)_v - [v == t_n])
    dh = dl W          dW = dl^T h                      (float32 accumulation)

(matmul operands in the compute dtype: dl for dW, exp(l - max) for dh, see below).

The logits are rounded to the compute dtype as in `fast/loss.py`'s chunked path (and
`ref.train.next_token_metrics` on `lm_head`'s logits), so this is a drop-in for it.
The mask gets no gradient, the correct flag none at all. `fused_ce_reference` is the
definition in plain XLA, with the full logits.

Two kernels (three variants); none writes a [N, V] array:
  * forward, one program per tile of `block_t` tokens: a loop over vocab tiles of
    `block_v` keeps a running max, sum of exps (online logsumexp), target logit and
    argmax per token; writes loss, correct and lse [N] (the dW kernel's residual).
  * forward with dh (when h is differentiated), one program per `grad_rows` tokens: the
    same loop also accumulates exp(l - running max) @ W_tile into a [grad_rows, D] float32
    tile held in registers, rescaled as the max grows -- flash attention with W as keys
    and values. As in fast/loss.py the gradient's direction needs no cotangent, so it is
    computed while W streams by anyway: dh = g m (softmax(l) @ W - W_target), the
    W_target rows gathered by XLA.
  * dW (when W is differentiated, in the backward), one program per `grad_rows` vocab
    rows: a loop over token tiles of `block_t` recomputes the transposed logits tile from
    lse and accumulates dl^T @ h_tile in registers.
Four [N, V, D] matmuls in all when the head trains (logits, softmax @ W, the recomputed
logits, dW), two when it is frozen, against three and two for the chunked path, which
writes and reads the [chunk, V] logits instead. Whether that trade wins is measured on
the GPU (bench/gpu_fused_ce.py, bench/gpu_train.py --loss-kernel). Gradients are held in
registers, never read-modify-written in global memory, which Triton would not order
between the threads of a program.

Every dot runs over `block_d` columns of D at a time: Triton blocks must be powers of two
and D = 576 (SmolLM2-135M) = 9 * 64. The logits are a loop over those columns (one pair of
operand buffers, pipelined by num_stages); the gradient tile is D / block_d [rows, block_d]
accumulators, so its dots are unrolled. Tiles that hang over the end of N or V are loaded
and stored under masks (Triton does not mask them itself); vocab columns past V get logit
-inf. All dims of a dot are at least 16 (Triton's minimum).

TPU: not provided. Mosaic has no masked loads of dynamically offset tiles (the vocab
loop's tail), wants blocks of (8, 128) multiples and its own K-loop pipelining; a TPU
version would be its own kernel. `fast/loss.py` runs the XLA chunked path there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
MIN_DOT = 16   # Triton's smallest dot dimension


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the (tokens, vocab, width) space; num_warps/num_stages go to Triton.

    forward: programs of block_t tokens, streaming block_v vocab rows per step.
    with dh: programs of grad_rows tokens, streaming block_v vocab rows per step.
    dW:      programs of grad_rows vocab rows, streaming block_t tokens per step.
    Each dot contracts block_d columns of D.
    """
    block_t: int = 64
    block_v: int = 64
    grad_rows: int = 32
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 2

    @classmethod
    def get_default(cls, *, width: int) -> BlockSizes:
        """Up to D = 640 (SmolLM2-135M's 576): the best of bench/gpu_fused_ce.py --sweep on the
        H200 (2026-12-02; one field at a time from the earlier defaults, keeping the best:
        53.2 -> 17.7 ms for fused forward + backward at N = 16384, V = 49152; bench/RESULTS.md).

        Wider D is not yet timed: there the tiles are chosen for few register spills. block_d:
        the widest power of two in [16, 64] dividing D (a 64-wide bf16 row is one 128-byte
        line). grad_rows 16: the [grad_rows, D] float32 gradient tile lives in registers.
        Compiled offline for sm_90 by Triton 3.9 at N = 16384, V = 49152 (XLA bundles its own
        Triton: a guide, not a guarantee), 8 warps, 2 stages, registers (+ spills): D = 960
        forward with dh 176, dW 144; D = 2048 forward with dh 255 + 96 B (block_v 128: + 536
        B), dW 255 + 48 B. 4 warps spilled hundreds of bytes, 16 warps (128 registers) more.
        """
        block_d = 64
        while block_d > MIN_DOT and width % block_d:
            block_d //= 2
        if width <= 640:
            return cls(block_t=128, block_v=256, grad_rows=64, block_d=block_d, num_stages=3)
        return cls(grad_rows=16, block_d=block_d)


# ---------------------------------------------------------------- kernel bodies


def _span(start, size: int, limit: int):
    """Indices start..start+size [size] and which of them are < limit."""
    idx = start + lax.broadcasted_iota(jnp.int32, (size,), 0)
    return idx, idx < limit


def _load(ref, rows, cols, ok):
    """ref[rows, cols] with rows where ok is False read as 0. One indexer for both axes:
    the interpreter clamps (shifts) an out-of-bounds slice taken by a separate `.at`."""
    return plgpu.load(ref.at[rows, cols], mask=jnp.broadcast_to(ok[:, None], (ok.shape[0], cols.size)),
                      other=0)


def _load_vec(ref, ok, rows=None):
    """ref[rows] of a 1-D ref (default: all of it), 0 where ok is False."""
    return plgpu.load(ref if rows is None else ref.at[rows], mask=ok, other=0)


def _dot(a, b, *, trans_b=False, precision=None):
    """a [M, K] @ b [K, N] (or b [N, K] transposed) with float32 accumulation."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def _tile_logits(a_ref, a_rows, a_ok, b_ref, b_rows, b_ok, *, width, bd, dtype, precision):
    """sum_k a[a_rows, k] b[b_rows, k]^T over block_d chunks k of D -> [|a_rows|, |b_rows|]
    float32, rounded through the compute dtype as the chunked path's logits are. A loop,
    not unrolled: Triton then reuses one pair of operand buffers (and can pipeline it)."""
    def step(k, acc):
        cols = pl.ds(pl.multiple_of(k * bd, bd), bd)
        return acc + _dot(_load(a_ref, a_rows, cols, a_ok), _load(b_ref, b_rows, cols, b_ok),
                          trans_b=True, precision=precision)
    acc = lax.fori_loop(0, width // bd, step, jnp.zeros((a_ok.shape[0], b_ok.shape[0]), F32))
    return acc.astype(dtype).astype(F32)


def _store_tiles(ref, tiles, ok, bd):
    """tiles [rows, bd] float32, one per block_d columns, into ref [rows, D] where ok."""
    for k, tile in enumerate(tiles):
        out = ref.at[:, pl.ds(k * bd, bd)]
        plgpu.store(out, tile.astype(ref.dtype), mask=jnp.broadcast_to(ok[:, None], out.shape))


def fused_ce_fwd_kernel(h_ref, w_ref, t_ref, m_ref, loss_ref, correct_ref, lse_ref, *dh_ref,
                        tokens, vocab, bs, dtype, precision):
    """One tile of tokens: online logsumexp, target logit and argmax over V. With dh_ref also
    m * softmax(l) @ W, accumulated as flash attention accumulates its output (W the keys
    and the values): a running sum of exp(l - running max) @ W_tile, rescaled when the max grows."""
    (bt, width), bv, bd = h_ref.shape, bs.block_v, bs.block_d
    _, row_ok = _span(pl.program_id(0) * bt, bt, tokens)
    mine = pl.ds(0, bt)                                                         # the program's h tile
    target = _load_vec(t_ref, row_ok)                                           # [bt]

    def step(j, carry):
        top, total, target_logit, best, arg, acc = carry                        # [bt] each; acc [bt, bd] each
        cols, col_ok = _span(j * bv, bv, vocab)
        vocab_rows = pl.ds(j * bv, bv)
        lt = _tile_logits(h_ref, mine, row_ok, w_ref, vocab_rows, col_ok, width=width,
                          bd=bd, dtype=dtype, precision=precision)              # [bt, bv]
        lt = jnp.where(col_ok[None, :], lt, -jnp.inf)
        tile_max = jnp.max(lt, axis=1)
        new_top = jnp.maximum(top, tile_max)        # finite from the first tile on
        rescale = jnp.exp(top - new_top)                                        # [bt], 0 on the first tile
        exps = jnp.exp(lt - new_top[:, None])                                   # [bt, bv], 0 past V
        total = total * rescale + jnp.sum(exps, axis=1)
        if dh_ref:
            exps = exps.astype(dtype)               # in [0, 1]: as the chunked path's rounded dlogits
            acc = tuple(a * rescale[:, None] + _dot(exps, _load(w_ref, vocab_rows, pl.ds(k * bd, bd), col_ok),
                                                    precision=precision) for k, a in enumerate(acc))
        target_logit += jnp.sum(jnp.where(cols[None, :] == target[:, None], lt, 0.0), axis=1)
        tile_arg = jnp.min(jnp.where(lt == tile_max[:, None], cols[None, :], vocab), axis=1)
        better = tile_max > best                     # strict: an earlier tile wins a tie
        return (new_top, total, target_logit, jnp.where(better, tile_max, best),
                jnp.where(better, tile_arg, arg), acc)

    neg = jnp.full((bt,), -jnp.inf, F32)
    zero = jnp.zeros((bt,), F32)
    acc = tuple(jnp.zeros((bt, bd), F32) for _ in range(width // bd)) if dh_ref else ()
    top, total, target_logit, _, arg, acc = lax.fori_loop(
        0, pl.cdiv(vocab, bv), step, (neg, zero, zero, neg, jnp.zeros((bt,), jnp.int32), acc))
    lse = top + jnp.log(total)
    weight = _load_vec(m_ref, row_ok)
    plgpu.store(loss_ref, (lse - target_logit) * weight, mask=row_ok)
    plgpu.store(correct_ref, jnp.where(arg == target, weight, 0.0), mask=row_ok)
    plgpu.store(lse_ref, lse, mask=row_ok)
    if dh_ref:
        _store_tiles(dh_ref[0], [a * (weight / total)[:, None] for a in acc], row_ok, bd)


def fused_ce_dw_kernel(w_ref, h_ref, t_ref, s_ref, lse_ref, dw_ref, *, tokens, vocab, bs, dtype, precision):
    """dW for grad_rows vocab rows: sum over token tiles of dl_tile^T @ h_tile."""
    (br, width), bt, bd = w_ref.shape, bs.block_t, bs.block_d
    rows, row_ok = _span(pl.program_id(0) * br, br, vocab)
    mine = pl.ds(0, br)

    def step(i, acc):
        _, tok_ok = _span(i * bt, bt, tokens)
        toks = pl.ds(i * bt, bt)
        target, scale, lse = (_load_vec(r, tok_ok, toks) for r in (t_ref, s_ref, lse_ref))   # [bt] each
        lt = _tile_logits(w_ref, mine, row_ok, h_ref, toks, tok_ok, width=width, bd=bd,
                          dtype=dtype, precision=precision)                     # [br, bt] (transposed)
        onehot = (rows[:, None] == target[None, :]).astype(F32)
        # Rows past V are never stored: their (finite) values need no mask.
        dl = ((jnp.exp(lt - lse[None, :]) - onehot) * scale[None, :]).astype(dtype)   # [br, bt]
        return tuple(a + _dot(dl, _load(h_ref, toks, pl.ds(k * bd, bd), tok_ok), precision=precision)
                     for k, a in enumerate(acc))                                # [br, bd] each

    acc = lax.fori_loop(0, pl.cdiv(tokens, bt), step,
                        tuple(jnp.zeros((br, bd), F32) for _ in range(width // bd)))
    _store_tiles(dw_ref, acc, row_ok, bd)


# ---------------------------------------------------------------- pallas_calls


def _rows(block: int, shape) -> pl.BlockSpec:
    """The program's tile of `block` rows (axis 0) of an array of `shape`."""
    return pl.BlockSpec((block, *shape[1:]), lambda i: (i,) + (0,) * (len(shape) - 1))


def _whole(shape) -> pl.BlockSpec:
    """The whole array, for the kernel to loop over."""
    return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def _call(kernel, name, h, wc, bs, interpret, *, rows, block, **specs):
    """pallas_call of `kernel` over cdiv(rows, block) programs, for h [N, D] and W [V, D]."""
    # float32 compute means float32 dots (no TF32), as XLA's default for the chunked path.
    precision = lax.Precision.HIGHEST if h.dtype == jnp.float32 else None
    return pl.pallas_call(
        functools.partial(kernel, tokens=h.shape[0], vocab=wc.shape[0], bs=bs, dtype=h.dtype,
                          precision=precision),
        grid=(pl.cdiv(rows, block),), name=name, interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        **specs)


def _forward_call(h, wc, targets, mask, bs, interpret, *, with_dh=False):
    """-> loss, correct, lse, each [N] float32 (+ mask * softmax @ W [N, D] float32 with_dh).
    Tiles of block_t tokens, or of grad_rows with the [rows, D] accumulator of dh."""
    bt, vec = (bs.grad_rows if with_dh else bs.block_t), jax.ShapeDtypeStruct(targets.shape, F32)
    out_shape, out_specs = (vec,) * 3, (_rows(bt, vec.shape),) * 3
    if with_dh:
        out_shape += (jax.ShapeDtypeStruct(h.shape, F32),)
        out_specs += (_rows(bt, h.shape),)
    return _call(fused_ce_fwd_kernel, "fused_ce_fwd_dh" if with_dh else "fused_ce_fwd", h, wc, bs, interpret,
                 rows=h.shape[0], block=bt, out_shape=out_shape, out_specs=out_specs,
                 in_specs=[_rows(bt, h.shape), _whole(wc.shape), _rows(bt, vec.shape), _rows(bt, vec.shape)],
                 )(h, wc, targets, mask)


def _dw_call(h, wc, targets, scale, lse, bs, interpret):
    """-> dW [V, D] float32: programs own vocab rows, h and the tokens are streamed."""
    br = bs.grad_rows
    return _call(fused_ce_dw_kernel, "fused_ce_dw", h, wc, bs, interpret, rows=wc.shape[0], block=br,
                 in_specs=[_rows(br, wc.shape), _whole(h.shape)] + [_whole(targets.shape)] * 3,
                 out_shape=jax.ShapeDtypeStruct(wc.shape, F32),
                 out_specs=_rows(br, wc.shape))(wc, h, targets, scale, lse)


# ---------------------------------------------------------------- custom_vjp


@functools.lru_cache(maxsize=None)
def _make_fused_ce(bs: BlockSizes, interpret):
    """(h [N, D], w [V, D], targets [N], mask [N]) -> (loss [N], correct [N]), differentiable
    in h and w. As fast/loss.py's chunked sums: symbolic zeros tell which gradients are
    wanted (a frozen head gets no dW kernel), W is cast to h's dtype once and its gradient
    comes back float32-accumulated in W's own dtype."""
    @jax.custom_vjp
    def fused(h, w, targets, mask):
        loss, correct, _ = _forward_call(h, w.astype(h.dtype), targets, mask, bs, interpret)
        return loss, correct

    def fwd(h, w, targets, mask):
        want_dh, want_dw = h.perturbed, w.perturbed
        h, w, targets, mask = h.value, w.value, targets.value, mask.value
        wc = w.astype(h.dtype)
        loss, correct, lse, *soft = _forward_call(h, wc, targets, mask, bs, interpret, with_dh=want_dh)
        # As fast/loss.py: dh's direction needs no cotangent, so the forward computes it while
        # it streams W anyway: m (softmax @ W - W_target) [N, D] float32, scaled by g below.
        dh = None
        if want_dh:   # (clip: an out-of-range id of a masked token must not bring NaN)
            dh = soft[0] - mask[:, None] * jnp.take(wc, targets, axis=0, mode="clip").astype(F32)   # [N, D]
        dh_as = jnp.zeros((0,), h.dtype)             # dtype marker (residuals must be arrays)
        # The dW kernel's inputs are kept only if it will run (a frozen head: not the bf16 W).
        for_dw = (h, wc, targets, mask, lse, jnp.zeros((0,), w.dtype)) if want_dw else None
        return (loss, correct), (dh, dh_as, for_dw)

    def bwd(res, cts):
        dh, dh_as, for_dw = res
        g = cts[0]
        if isinstance(g, SymbolicZero):
            return None, None, None, None
        g = g.astype(F32)                                                      # [N]
        dh = None if dh is None else (g[:, None] * dh).astype(dh_as.dtype)
        dw = None
        if for_dw is not None:
            h, wc, targets, mask, lse, dw_as = for_dw
            dw = _dw_call(h, wc, targets, g * mask, lse, bs, interpret).astype(dw_as.dtype)
        return dh, dw, None, None

    fused.defvjp(fwd, bwd, symbolic_zeros=True)
    return fused


def _check_block_sizes(bs: BlockSizes, *, tokens: int, vocab: int, width: int) -> BlockSizes:
    """Validated block sizes, token and vocab tiles shrunk (to powers of two >= 16) when N
    or V is smaller than a tile."""
    for name in ("block_t", "block_v", "grad_rows", "block_d"):
        value = getattr(bs, name)
        if value < MIN_DOT or value & (value - 1):
            raise ValueError(f"triton needs power-of-two tiles >= {MIN_DOT}: {name}={value}")
    if width % bs.block_d:
        raise ValueError(f"{width=} must be divisible by block_d={bs.block_d} (D must be a multiple of "
                         f"{MIN_DOT})")

    def fit(block, n):
        return max(MIN_DOT, min(block, pl.next_power_of_2(n)))
    return dataclasses.replace(bs, block_t=fit(bs.block_t, tokens), block_v=fit(bs.block_v, vocab),
                               grad_rows=fit(bs.grad_rows, min(tokens, vocab)))


def fused_ce(h: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array | None = None, *,
             block_sizes: BlockSizes | None = None, interpret=False) -> tuple[jax.Array, jax.Array]:
    """Per-token masked cross-entropy and argmax hits of logits = h @ w.T, differentiable in h and w.

    h [..., D] float (the compute dtype: logits are rounded to it), w [V, D] any float
    dtype (cast to h's; its gradient comes back in w's dtype), targets int [...], mask
    [...] token weights (None = all 1; no gradient). Returns (loss, correct), each [...]
    float32: mask * (logsumexp - target logit) and mask * [argmax == target].
    D must be a multiple of 16. interpret=True runs the Pallas interpreter (any platform).
    """
    if h.ndim < 1 or w.ndim != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(f"h {h.shape} must be [..., D] and w {w.shape} [V, D] with the same D")
    if targets.shape != h.shape[:-1] or (mask is not None and mask.shape != targets.shape):
        raise ValueError(f"targets {targets.shape} and mask {None if mask is None else mask.shape} "
                         f"must be h's leading dims {h.shape[:-1]}")
    for name, x in (("h", h), ("w", w)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer ids, got {targets.dtype}")
    lead, width, vocab = targets.shape, h.shape[-1], w.shape[0]
    tokens = targets.size
    if tokens == 0 or vocab == 0:
        raise ValueError(f"empty fused_ce: {tokens=}, {vocab=}")
    bs = block_sizes or BlockSizes.get_default(width=width)
    bs = _check_block_sizes(bs, tokens=tokens, vocab=vocab, width=width)
    mask = jnp.ones(lead, F32) if mask is None else lax.stop_gradient(mask.astype(F32))
    loss, correct = _make_fused_ce(bs, interpret)(
        h.reshape(tokens, width), w, targets.reshape(tokens).astype(jnp.int32), mask.reshape(tokens))
    return loss.reshape(lead), correct.reshape(lead)                            # [...] each


def fused_ce_reference(h: jax.Array, w: jax.Array, targets: jax.Array,
                       mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Plain XLA with the full logits [..., V]: (loss, correct) as `fused_ce`."""
    logits = jnp.einsum("...D,VD->...V", h, w.astype(h.dtype), preferred_element_type=F32)
    logits = logits.astype(h.dtype).astype(F32)                                 # [..., V]
    mask = jnp.ones(targets.shape, F32) if mask is None else lax.stop_gradient(mask.astype(F32))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = (jax.nn.logsumexp(logits, axis=-1) - target_logit) * mask
    correct = jnp.where(jnp.argmax(logits, axis=-1) == targets, mask, 0.0)
    return loss, lax.stop_gradient(correct)

"""The MoDE merge as Pallas kernels, forward and backward (paper section 3, eq. 1-2).

For every token t with gate logits z_t [E] and expert hidden states h_{e,t} [D]:

    p_t = softmax(z_t)                                   (eq. 2, in float32)
    y_t = sum_e p_{t,e} h_{e,t}                          (eq. 1, float32 accumulation)

and, for a cotangent dy_t, the backward

    d h_{e,t} = p_{t,e} dy_t
    d z_{t,e} = p_{t,e} (<dy_t, h_{e,t}> - sum_k p_{t,k} <dy_t, h_{k,t}>).

`mode_jax.ref.mode.gated_combine` is the definition; `gated_combine_reference` is it.

The merge is pure bandwidth: E*T*D values in, T*D out (forward); dy and the
E*T*D values in, E*T*D gradients out (backward). Both kernels run a 2-D grid of
(token tile, width tile) programs that each touch every byte they own exactly
once; the softmax of a token's E logits is recomputed by each of its width tiles
(E exps, nothing next to the E*block_d values loaded). The per-token dot products
<dy, h_e> are partial sums per width tile, [D / block_d, T, E] float32, added up
and turned into d_logits by XLA outside the kernel (T*E numbers: negligible).

One kernel body serves both backends; the bodies keep to both rule sets:
  * Triton ("triton", GPU): every array loaded or computed has a power-of-two
    size, so gate columns are read one at a time (`logits_ref[:, e:e+1]`,
    [block_t, 1]) and the E expert tiles by a static loop; E itself is free.
    Triton does not mask a block that hangs over the end of the array, so the
    last token tile loads and stores under a row mask.
  * Mosaic ("mosaic_tpu", TPU): the last two block dims are multiples of (8, 128)
    or the full array dims; Mosaic pads and masks edge blocks itself.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from mode_jax.ref.mode import gated_combine as _ref_gated_combine

BACKENDS = ("triton", "mosaic_tpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the (tokens, width) plane; num_warps/num_stages are Triton-only.

    Each program reads E tiles of [block_t, block_d] (plus dy in the backward).
    """
    block_t: int   # tokens per program; the last tile may hang over T (masked)
    block_d: int   # width per program; must divide D
    num_warps: int = 4   # Triton: 128 threads hold a [128, 64] f32 tile in 64 registers each
    num_stages: int = 1  # Triton: the kernels have no loop to software-pipeline

    @classmethod
    def get_default(cls, backend: str, *, width: int, n_experts: int, itemsize: int) -> BlockSizes:
        """Defaults chosen (not measured) for E = 2..8 experts and SmolLM2's D = 576.

        triton: [128, 64] tiles. Triton wants powers of two and 576 = 9 * 64, so
          64 is the widest power-of-two tile that divides the width; a 64-wide
          bf16 row is one 128-byte line, so loads stay fully coalesced. At
          T = 16k that is 128 * 9 = 1152 programs, ~9 per SM on an H100: enough
          to hide latency. Full-width tiles compiled for a minute and ran slowly.
        mosaic_tpu: full-width rows (always a legal block, one contiguous DMA per
          expert row) and the largest block_t <= 256 whose E input tiles fit in
          2 MiB, so the double-buffered backward (outputs in, d_outputs out)
          stays under half of v5e's 16 MiB default scoped VMEM.
        """
        if backend == "triton":
            return cls(block_t=128, block_d=64)
        block_t = 256
        while block_t > 8 and n_experts * block_t * width * itemsize > 2 * 2**20:
            block_t //= 2
        return cls(block_t=block_t, block_d=width)


# ---------------------------------------------------------------- kernel bodies


def _tile_io(*, tokens: int, block_t: int, token_axis: int, mask_tail: bool):
    """load(ref) / store(ref, x) for [block_t, ...] tiles; rows >= tokens are masked
    off when the last tile hangs over the end (Triton), else plain ref access."""
    if not mask_tail:
        def load(ref):
            return ref[...]

        def store(ref, x):
            ref[...] = x
        return load, store
    rows = pl.program_id(token_axis) * block_t + lax.broadcasted_iota(jnp.int32, (block_t, 1), 0)
    valid = rows < tokens                                                        # [bt, 1]

    def load(ref):
        return plgpu.load(ref, mask=jnp.broadcast_to(valid, ref.shape), other=0)

    def store(ref, x):
        plgpu.store(ref, x, mask=jnp.broadcast_to(valid, ref.shape))
    return load, store


def _expert(e: int) -> jax.Array:
    # An int32 scalar, not a Python int: the generic interpreter's masked
    # load/store cannot index with a static int (jax 0.11.2, 'TypedInt').
    return jnp.int32(e)


def _softmax_columns(logits_ref, n_experts: int, load) -> list[jax.Array]:
    """The gate probabilities as E float32 columns [bt, 1] (one per expert)."""
    cols = [load(logits_ref.at[:, e:e + 1]).astype(jnp.float32) for e in range(n_experts)]
    top = functools.reduce(jnp.maximum, cols)                # subtract the max: exp never overflows
    exps = [jnp.exp(c - top) for c in cols]
    inv_total = 1.0 / functools.reduce(jnp.add, exps)
    return [x * inv_total for x in exps]


def gated_combine_kernel(logits_ref, outputs_ref, y_ref, *, n_experts: int, io):
    """logits [bt, E], outputs [E, bt, bd] -> y [bt, bd] = sum_e p_e outputs_e."""
    load, store = io()
    probs = _softmax_columns(logits_ref, n_experts, load)
    acc = jnp.zeros(y_ref.shape, jnp.float32)                                    # [bt, bd]
    for e in range(n_experts):
        acc += probs[e] * load(outputs_ref.at[_expert(e)]).astype(jnp.float32)
    store(y_ref, acc.astype(y_ref.dtype))


def gated_combine_bwd_kernel(logits_ref, outputs_ref, dy_ref, d_outputs_ref, dots_ref, *,
                             n_experts: int, io):
    """-> d_outputs [E, bt, bd] = p_e dy and this width tile's <dy, h_e>, dots [bt, E]."""
    load, store = io()
    probs = _softmax_columns(logits_ref, n_experts, load)
    dy = load(dy_ref).astype(jnp.float32)                                        # [bt, bd]
    for e in range(n_experts):
        h = load(outputs_ref.at[_expert(e)]).astype(jnp.float32)                 # [bt, bd]
        store(d_outputs_ref.at[_expert(e)], (probs[e] * dy).astype(d_outputs_ref.dtype))
        store(dots_ref.at[:, e:e + 1], jnp.sum(dy * h, axis=1, keepdims=True))


# ---------------------------------------------------------------- pallas_calls


def _launch(backend: str, block_sizes: BlockSizes, tokens: int, width: int, interpret):
    """Grid, a BlockSpec factory, compiler params and the tile io for one call.

    The grid walks width tiles fastest either way: Mosaic iterates the last grid
    axis innermost (the logits tile stays resident across it), CUDA launches
    axis 0 fastest (blocks running side by side then read neighbouring column
    tiles of the same rows).
    """
    bt, bd = block_sizes.block_t, block_sizes.block_d
    n_t, n_d = pl.cdiv(tokens, bt), width // bd
    if backend == "triton":
        grid, token_axis = (n_d, n_t), 1
        params = plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                      num_stages=block_sizes.num_stages)
    else:
        grid, token_axis = (n_t, n_d), 0
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))

    def spec(block_shape, index_map):
        """index_map(t, d) -> block indices, whatever the grid order."""
        if token_axis == 1:
            return pl.BlockSpec(block_shape, lambda d, t: index_map(t, d))
        return pl.BlockSpec(block_shape, index_map)

    io = functools.partial(_tile_io, tokens=tokens, block_t=bt, token_axis=token_axis,
                           mask_tail=backend == "triton" and tokens % bt != 0)
    return dict(grid=grid, compiler_params=params, interpret=interpret), spec, io


def _forward_call(logits, outputs, backend, block_sizes, interpret):
    n_experts, tokens, width = outputs.shape
    bt, bd = block_sizes.block_t, block_sizes.block_d
    launch, spec, io = _launch(backend, block_sizes, tokens, width, interpret)
    return pl.pallas_call(
        functools.partial(gated_combine_kernel, n_experts=n_experts, io=io),
        out_shape=jax.ShapeDtypeStruct((tokens, width), outputs.dtype),
        in_specs=[spec((bt, n_experts), lambda t, d: (t, 0)),
                  spec((n_experts, bt, bd), lambda t, d: (0, t, d))],
        out_specs=spec((bt, bd), lambda t, d: (t, d)),
        name="gated_combine_fwd",
        **launch,
    )(logits, outputs)


def _backward_call(logits, outputs, dy, backend, block_sizes, interpret):
    n_experts, tokens, width = outputs.shape
    bt, bd = block_sizes.block_t, block_sizes.block_d
    launch, spec, io = _launch(backend, block_sizes, tokens, width, interpret)
    return pl.pallas_call(
        functools.partial(gated_combine_bwd_kernel, n_experts=n_experts, io=io),
        out_shape=(jax.ShapeDtypeStruct(outputs.shape, outputs.dtype),
                   jax.ShapeDtypeStruct((width // bd, tokens, n_experts), jnp.float32)),
        in_specs=[spec((bt, n_experts), lambda t, d: (t, 0)),
                  spec((n_experts, bt, bd), lambda t, d: (0, t, d)),
                  spec((bt, bd), lambda t, d: (t, d))],
        out_specs=(spec((n_experts, bt, bd), lambda t, d: (0, t, d)),
                   spec((None, bt, n_experts), lambda t, d: (d, t, 0))),
        name="gated_combine_bwd",
        **launch,
    )(logits, outputs, dy)


# ---------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _gated_combine(logits, outputs, backend, block_sizes, interpret):
    return _forward_call(logits, outputs, backend, block_sizes, interpret)


def _gated_combine_fwd(logits, outputs, backend, block_sizes, interpret):
    return _forward_call(logits, outputs, backend, block_sizes, interpret), (logits, outputs)


def _gated_combine_bwd(backend, block_sizes, interpret, residuals, dy):
    logits, outputs = residuals
    d_outputs, partial_dots = _backward_call(logits, outputs, dy, backend, block_sizes, interpret)
    dots = jnp.sum(partial_dots, axis=0)                                         # [T, E]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)                  # [T, E]
    d_logits = probs * (dots - jnp.sum(probs * dots, axis=-1, keepdims=True))    # [T, E]
    return d_logits.astype(logits.dtype), d_outputs


_gated_combine.defvjp(_gated_combine_fwd, _gated_combine_bwd)


def _check_block_sizes(backend: str, bs: BlockSizes, *, tokens: int, width: int) -> BlockSizes:
    """Validated block sizes, block_t shrunk to the token count when T is small."""
    block_t, block_d = bs.block_t, bs.block_d
    if width % block_d:
        raise ValueError(f"{width=} must be divisible by {block_d=} (pass BlockSizes with a "
                         f"block_d dividing the width)")
    if backend == "triton":
        for name, value in (("block_t", block_t), ("block_d", block_d)):
            if value < 1 or value & (value - 1):
                raise ValueError(f"triton needs power-of-two tiles: {name}={value}")
        # A smaller power of two still covers T in one (masked) tile.
        block_t = min(block_t, pl.next_power_of_2(tokens))
    else:
        if block_t % 8:
            raise ValueError(f"mosaic_tpu needs {block_t=} to be a multiple of 8")
        if block_d % 128 and block_d != width:
            raise ValueError(f"mosaic_tpu needs {block_d=} to be a multiple of 128 or the {width=}")
        if tokens < block_t:
            block_t = tokens  # the full array dim is always a legal block dim
    return dataclasses.replace(bs, block_t=block_t, block_d=block_d)


def gated_combine(logits: jax.Array, outputs: jax.Array, *, backend: str = "triton",
                  block_sizes: BlockSizes | None = None, interpret=False) -> jax.Array:
    """The MoDE merge: sum_e softmax(logits)_e * outputs_e, differentiable.

    logits [..., E] (float32 or bfloat16), outputs [E, ..., D] (any float dtype)
    -> [..., D] in outputs' dtype. Leading dims are flattened to T tokens (free:
    row-major reshape). Any T works; D must be divisible by `block_sizes.block_d`.
    backend: "triton" (GPU) or "mosaic_tpu" (TPU). interpret: False on hardware,
    True for the generic interpreter, or `pltpu.InterpretParams()` (TPU semantics).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{backend=} must be one of {BACKENDS}")
    if logits.ndim < 1 or outputs.ndim != logits.ndim + 1:
        raise ValueError(f"logits {logits.shape} must be [..., E] and outputs {outputs.shape} "
                         f"[E, ..., D] (one more dim than logits)")
    n_experts, width = logits.shape[-1], outputs.shape[-1]
    if outputs.shape[0] != n_experts or outputs.shape[1:-1] != logits.shape[:-1]:
        raise ValueError(f"logits {logits.shape} = [..., E] and outputs {outputs.shape} = "
                         f"[E, ..., D] disagree on E or on the leading dims")
    for name, x in (("logits", logits), ("outputs", outputs)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    lead = logits.shape[:-1]
    tokens = 1
    for n in lead:
        tokens *= n
    if tokens == 0 or n_experts == 0 or width == 0:
        raise ValueError(f"empty gated_combine: {tokens=}, {n_experts=}, {width=}")
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(backend, width=width, n_experts=n_experts,
                                             itemsize=outputs.dtype.itemsize)
    block_sizes = _check_block_sizes(backend, block_sizes, tokens=tokens, width=width)
    y = _gated_combine(logits.reshape(tokens, n_experts),                        # [T, E]
                       outputs.reshape(n_experts, tokens, width),                # [E, T, D]
                       backend, block_sizes, interpret)                          # [T, D]
    return y.reshape(*lead, width)                                               # [..., D]


def gated_combine_reference(logits: jax.Array, outputs: jax.Array) -> jax.Array:
    """Plain XLA: logits [..., E], outputs [E, ..., D] -> [..., D] (the ref definition)."""
    return _ref_gated_combine(logits, outputs)

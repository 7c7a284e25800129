"""Tests of the MoDE merge kernels (eq. 1-2) against `mode_jax.ref.mode.gated_combine`.

The Triton-style kernel runs in the generic Pallas interpreter (`interpret=True`,
the same body and row masks as on the GPU), the Mosaic kernel under TPU
semantics (`pltpu.InterpretParams()`). Lowering for CUDA and TPU is checked on
CPU without the hardware. Shapes come from small sets so jit caches are reused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractDevice, AbstractMesh

from mode_jax.fast.combine import gated_combine as fast_gated_combine
from mode_jax.kernels.gated_combine import BlockSizes, gated_combine, gated_combine_reference
from mode_jax.ref.mode import gated_combine as ref_gated_combine
from tests.tolerances import assert_close, assert_close_to_max

# Tiles small enough that the tiny test shapes still span several programs and
# hang over the end of the token axis (T = 21, 40 with block_t = 16).
TRITON_BLOCKS = BlockSizes(block_t=16, block_d=64)
KERNELS = {
    "triton": dict(backend="triton", interpret=True),
    "mosaic_tpu": dict(backend="mosaic_tpu", interpret=pltpu.InterpretParams()),
}
# Lowering for CUDA goes through the Triton backend, which warns that it is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)


def _blocks(backend: str, width: int) -> BlockSizes:
    if backend == "triton":
        return TRITON_BLOCKS
    return BlockSizes(block_t=16, block_d=128 if width % 128 == 0 else width)


def _inputs(seed: int, n_experts: int, lead: tuple[int, ...], width: int, logits_dtype, dtype):
    """Fresh normal draws (never constant): logits scaled so gates are far from uniform."""
    k_logits, k_outputs, k_dy = jax.random.split(jax.random.key(seed), 3)
    logits = (2.0 * jax.random.normal(k_logits, (*lead, n_experts))).astype(logits_dtype)
    outputs = jax.random.normal(k_outputs, (n_experts, *lead, width)).astype(dtype)
    dy = jax.random.normal(k_dy, (*lead, width)).astype(dtype)
    return logits, outputs, dy


def _value_and_grads(f, logits, outputs, dy):
    y, vjp = jax.vjp(f, logits, outputs)
    return (y, *vjp(dy))


def _assert_matches_reference(f, logits, outputs, dy):
    got = _value_and_grads(f, logits, outputs, dy)
    want = _value_and_grads(ref_gated_combine, logits, outputs, dy)
    for name, g, w in zip(("y", "d_logits", "d_outputs"), got, want):
        assert g.dtype == w.dtype, name
        # the absolute floor scales with the reference's largest magnitude: the logit
        # gradient is a difference of D-long dot products
        assert_close_to_max(g, w, err_msg=name)


shapes = dict(
    n_experts=st.sampled_from([1, 2, 3, 5, 8]),
    tokens=st.sampled_from([8, 21, 40]),
    width=st.sampled_from([64, 128, 192]),        # 192 = 3 * 64, like 576 = 9 * 64
    logits_dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)


@pytest.mark.parametrize("backend", sorted(KERNELS))
@settings(deadline=None, derandomize=True, max_examples=8)
@given(**shapes)
def test_kernel_matches_reference(backend, n_experts, tokens, width, logits_dtype, dtype, seed):
    logits, outputs, dy = _inputs(seed, n_experts, (tokens,), width, logits_dtype, dtype)
    f = lambda z, h: gated_combine(z, h, block_sizes=_blocks(backend, width), **KERNELS[backend])
    _assert_matches_reference(f, logits, outputs, dy)


@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_kernel_leading_dims_and_defaults(backend):
    # [B, S, E] / [E, B, S, D] with the default tiles (one masked Triton tile).
    logits, outputs, dy = _inputs(7, 3, (2, 5), 64, jnp.float32, jnp.float32)
    f = lambda z, h: gated_combine(z, h, **KERNELS[backend])
    _assert_matches_reference(f, logits, outputs, dy)


@pytest.mark.parametrize("impl", ["reference", "triton", "mosaic_tpu"])
def test_pinned_by_hand(impl):
    # logits [0, ln 3] -> p = [1/4, 3/4]; h_0 = [4, 8], h_1 = [0, 4] -> y = [1, 5].
    # (each pair repeated 32 times: D = 64). dy = [1, 0] * 32 / 32: <dy, h> = [4, 0],
    # sum_k p_k <dy, h_k> = 1, d_logits = [1/4 (4 - 1), 3/4 (0 - 1)] = [0.75, -0.75],
    # d_h_e = p_e dy, so d_h[:, 0] = [1/4, 3/4] / 32.
    logits = jnp.array([[0.0, np.log(3.0)]], jnp.float32)                 # [T=1, E=2]
    outputs = jnp.array([[[4.0, 8.0] * 32], [[0.0, 4.0] * 32]], jnp.float32)  # [E, T, D=64]
    dy = jnp.array([[1.0, 0.0] * 32], jnp.float32) / 32                    # [T, D]
    if impl == "reference":
        f = gated_combine_reference
    else:
        f = lambda z, h: gated_combine(z, h, **KERNELS[impl])
    y, d_logits, d_outputs = _value_and_grads(f, logits, outputs, dy)
    assert_close(y[0, :2], [1.0, 5.0])
    assert_close(d_logits[0], [0.75, -0.75])
    assert_close(d_outputs[:, 0, 0], [0.25 / 32, 0.75 / 32])


# ---------------------------------------------------------------- lowering on CPU


def _fwd_bwd(f):
    def run(logits, outputs, dy):
        y, vjp = jax.vjp(f, logits, outputs)
        return y, vjp(dy)
    return jax.jit(run)


def _smollm_args(n_experts=3, tokens=1000, width=576):
    """SmolLM2-width bf16 hidden states; T = 1000 is not a multiple of any tile."""
    return (jax.ShapeDtypeStruct((tokens, n_experts), jnp.float32),
            jax.ShapeDtypeStruct((n_experts, tokens, width), jnp.bfloat16),
            jax.ShapeDtypeStruct((tokens, width), jnp.bfloat16))


def _lower_cuda(fn, *args) -> str:
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=H100)):
        return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_triton_kernel_lowers_for_cuda():
    # Runs the Triton lowering (power-of-two checks included) for an H100.
    text = _lower_cuda(_fwd_bwd(lambda z, h: gated_combine(z, h, backend="triton")), *_smollm_args())
    assert text.count("xla.gpu.triton") == 2  # forward and backward kernels


def test_mosaic_kernel_lowers_for_tpu():
    f = _fwd_bwd(lambda z, h: gated_combine(z, h, backend="mosaic_tpu"))
    text = f.trace(*_smollm_args()).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 2


def test_triton_lowering_rejects_non_power_of_two_loads():
    # The CUDA lowering check is not vacuous: a [16, 3] load fails it.
    from jax.experimental import pallas as pl

    def copy_kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...]
    f = pl.pallas_call(copy_kernel, out_shape=jax.ShapeDtypeStruct((16, 3), jnp.float32))
    with pytest.raises(ValueError, match="power of 2"):
        _lower_cuda(jax.jit(f), jax.ShapeDtypeStruct((16, 3), jnp.float32))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("logits_shape, outputs_shape, kwargs, match", [
    ((8, 3), (2, 8, 64), {}, "disagree on E"),
    ((8, 3), (3, 9, 64), {}, "disagree on E or on the leading dims"),
    ((8, 3), (3, 8), {}, "one more dim"),
    ((8, 3), (3, 8, 100), {}, "width=100 must be divisible by block_d=64"),
    ((8, 3), (3, 8, 64), dict(block_sizes=BlockSizes(block_t=24, block_d=64)), "power-of-two"),
    ((8, 3), (3, 8, 64), dict(backend="mosaic_tpu", block_sizes=BlockSizes(12, 64)), "multiple of 8"),
    ((8, 3), (3, 8, 256), dict(backend="mosaic_tpu", block_sizes=BlockSizes(8, 64)),
     "multiple of 128 or the width=256"),
    ((8, 3), (3, 8, 64), dict(backend="cuda"), "backend='cuda' must be one of"),
    ((0, 3), (3, 0, 64), {}, "empty"),
])
def test_shape_validation(logits_shape, outputs_shape, kwargs, match):
    logits, outputs = jnp.ones(logits_shape, jnp.float32), jnp.ones(outputs_shape, jnp.float32)
    with pytest.raises(ValueError, match=match):
        gated_combine(logits, outputs, interpret=True, **kwargs)


def test_rejects_integer_outputs():
    with pytest.raises(ValueError, match="outputs must be floating point"):
        gated_combine(jnp.ones((8, 2)), jnp.ones((2, 8, 64), jnp.int32), interpret=True)


# ---------------------------------------------------------------- fast/combine.py


@pytest.mark.parametrize("lead, width, dtype", [
    ((2, 100), 128, jnp.float32),   # kernels on cuda and tpu, XLA here
    ((3,), 576, jnp.bfloat16),      # too few tokens for any kernel
    ((130,), 100, jnp.float32),     # no 64-wide tile divides D: only the tpu kernel
])
def test_fast_combine_matches_reference_on_cpu(lead, width, dtype):
    logits, outputs, dy = _inputs(3, 4, lead, width, jnp.float32, dtype)
    _assert_matches_reference(jax.jit(fast_gated_combine), logits, outputs, dy)


def test_fast_combine_dispatches_per_platform():
    f = _fwd_bwd(fast_gated_combine)
    args = _smollm_args(tokens=256)
    assert _lower_cuda(f, *args).count("xla.gpu.triton") == 2
    assert f.trace(*args).lower(lowering_platforms=("tpu",)).as_text().count("tpu_custom_call") == 2
    assert "custom_call" not in f.trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    # Too few tokens for a Triton tile, or a width no 64-wide tile divides: XLA on CUDA.
    for small in (_smollm_args(tokens=16), _smollm_args(tokens=256, width=100)):
        assert "xla.gpu.triton" not in _lower_cuda(f, *small)

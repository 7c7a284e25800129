"""fast/norm.py: RMSNorm with its hand-written backward, against ref/'s (differentiated by
JAX) and a float64 NumPy statement of the same function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from mode_jax.fast.norm import rms_norm
from mode_jax.ref.llama import rms_norm as ref_rms_norm
from tests.tolerances import assert_close

EPS = 1e-5


def _numpy_rms_norm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


@settings(max_examples=10)
@given(shape=st.sampled_from([(3, 8), (2, 5, 16), (1, 1, 4)]), dtype=st.sampled_from(["float32", "bfloat16"]),
       seed=st.integers(0, 2**16))
def test_forward_and_gradients_match_ref(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(3 * rng.standard_normal(shape), dtype)
    w = jnp.asarray(1 + 0.5 * rng.standard_normal(shape[-1:]), jnp.float32)
    dy = jnp.asarray(rng.standard_normal(shape), dtype)
    y, vjp = jax.vjp(lambda x, w: rms_norm(x, w, eps=EPS), x, w)
    dx, dw = vjp(dy)
    assert y.dtype == dx.dtype == jnp.dtype(dtype) and dw.dtype == jnp.float32
    assert_close(y, _numpy_rms_norm(np.asarray(x, np.float64), np.asarray(w, np.float64)))
    # ref/'s norm differentiated by JAX, on float32 copies of the same inputs.
    x32, dy32 = x.astype(jnp.float32), dy.astype(jnp.float32)
    want_dx, want_dw = jax.vjp(lambda x, w: ref_rms_norm(x, w, eps=EPS), x32, w)[1](dy32)
    assert_close(dx, want_dx, scale=2)
    assert_close(dw, want_dw, dtype=dtype, scale=2 * max(1.0, float(jnp.max(jnp.abs(want_dw)))))


def test_gradients_by_finite_differences_in_float64():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((4, 6)), jnp.float64)
        w = jnp.asarray(1 + rng.standard_normal(6), jnp.float64)
        check_grads(lambda x, w: rms_norm(x, w, eps=EPS), (x, w), order=1, modes=["rev"])


def test_frozen_scale_gets_no_gradient_work():
    """A closed-over (frozen) scale: its token-sum is never computed."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    w = jnp.asarray(1 + rng.standard_normal(8), jnp.float32)

    def sums(f):
        jaxpr = jax.make_jaxpr(f)(x, w).jaxpr
        return sum(e.primitive.name == "reduce_sum" for e in jaxpr.eqns)

    both = sums(lambda x, w: jax.grad(lambda x, w: jnp.sum(rms_norm(x, w, eps=EPS) ** 2), argnums=(0, 1))(x, w))
    only_x = sums(lambda x, w: jax.grad(lambda x: jnp.sum(rms_norm(x, w, eps=EPS) ** 2))(x))
    assert only_x == both - 1, (only_x, both)


def test_scale_shape_is_checked():
    with pytest.raises(ValueError, match=r"scale \(4,\) must be \[D\]"):
        rms_norm(jnp.ones((2, 8)) * 0.5, jnp.ones(4), eps=EPS)


def test_residuals_are_the_input_the_scale_and_one_statistic_per_row():
    """No float32 [.., D] copy is kept for the backward pass (ref's autodiff keeps some)."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 8)), jnp.bfloat16)
    w = jnp.ones(8, jnp.float32) * 1.5
    kept = jax.tree.leaves(jax.vjp(lambda x, w: rms_norm(x, w, eps=EPS), x, w)[1])
    big_f32 = [k.shape for k in kept if k.dtype == jnp.float32 and k.shape == x.shape]
    assert not big_f32 and any(k.shape == (2, 3, 1) for k in kept), [(k.shape, k.dtype) for k in kept]
    plain = jax.tree.leaves(jax.vjp(lambda x, w: ref_rms_norm(x, w, eps=EPS), x, w)[1])
    assert any(k.dtype == jnp.float32 and k.shape == x.shape for k in plain)

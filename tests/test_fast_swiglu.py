"""fast/swiglu.py: the MLP's gate|up projection and SwiGLU with a hand-written backward,
against a float64 NumPy statement of the function and its gradient, and against JAX's
own differentiation of the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from mode_jax.fast.swiglu import swiglu_projection, swiglu_projection_reference
from tests.test_fast_model import _dot_output_shapes
from tests.tolerances import assert_close


def _numpy_value_and_grads(x, w, du):
    """float64 NumPy: u = silu(x Wg) * (x Wu) and the cotangents of x and w, by the chain rule."""
    f = w.shape[-1] // 2
    gu = x @ w
    g, up = gu[..., :f], gu[..., f:]
    sig = 1 / (1 + np.exp(-g))
    u = g * sig * up
    dgu = np.concatenate([du * up * (sig + g * sig * (1 - sig)), du * g * sig], axis=-1)
    return u, dgu @ w.T, np.einsum("btd,btk->dk", x, dgu)


def _inputs(seed, shape, f, dtype):
    rng = np.random.default_rng(seed)
    b, t, d = shape
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    w = jnp.asarray(rng.standard_normal((d, 2 * f)) / np.sqrt(d), dtype)
    du = jnp.asarray(rng.standard_normal((b, t, f)), dtype)
    return x, w, du


@settings(max_examples=10)
@given(shape=st.sampled_from([(2, 3, 8), (1, 5, 4), (3, 1, 16)]), f=st.sampled_from([2, 6]),
       dtype=st.sampled_from(["float32", "bfloat16"]), seed=st.integers(0, 2**16))
def test_value_and_gradients_match_numpy(shape, f, dtype, seed):
    x, w, du = _inputs(seed, shape, f, dtype)
    u, vjp = jax.vjp(swiglu_projection, x, w)
    dx, dw = vjp(du)
    assert u.dtype == dx.dtype == dw.dtype == jnp.dtype(dtype)
    want = _numpy_value_and_grads(*(np.asarray(a, np.float64) for a in (x, w, du)))
    # bf16: the activations are rounded between the matmuls; compare relative to the scale.
    for got, ref, name in zip((u, dx, dw), want, ("u", "dx", "dw")):
        scale = 2 if dtype == "float32" else 2 * max(1.0, float(np.max(np.abs(ref))))
        assert_close(got, ref, scale=scale, err_msg=name)


def test_gradients_equal_autodiff_of_the_plain_formula_and_finite_differences():
    x, w, du = _inputs(0, (2, 7, 12), 5, jnp.float32)
    got = jax.vjp(swiglu_projection, x, w)[1](du)
    want = jax.vjp(swiglu_projection_reference, x, w)[1](du)
    for g, r in zip(got, want):
        assert_close(g, r)
    with jax.enable_x64(True):
        x64, w64, _ = _inputs(1, (2, 3, 4), 3, jnp.float64)
        check_grads(swiglu_projection, (x64, w64), order=1, modes=["rev"])


def test_residuals_are_x_w_and_gu():
    """Nothing float32 is kept for the backward pass (the plain formula keeps some)."""
    x, w, _ = _inputs(2, (2, 3, 8), 4, jnp.bfloat16)
    kept = jax.tree.leaves(jax.vjp(swiglu_projection, x, w)[1])
    assert sorted((k.shape, str(k.dtype)) for k in kept) == sorted(
        [(x.shape, "bfloat16"), (w.shape, "bfloat16"), ((2, 3, 8), "bfloat16")])
    plain = jax.tree.leaves(jax.vjp(swiglu_projection_reference, x, w)[1])
    assert any(k.dtype == jnp.float32 for k in plain)


def test_frozen_weight_gets_no_weight_gradient_matmul():
    x, w, _ = _inputs(3, (2, 3, 8), 4, jnp.float32)
    loss = lambda x, w: jnp.sum(swiglu_projection(x, w) ** 2)
    only_x = list(_dot_output_shapes(jax.make_jaxpr(jax.grad(loss))(x, w).jaxpr))
    both = list(_dot_output_shapes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w).jaxpr))
    assert (8, 8) not in only_x and both.count((8, 8)) == 1, (only_x, both)   # dW: [D, 2F]


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="must be even"):
        swiglu_projection(jnp.ones((1, 2, 4)) * 0.5, jnp.ones((4, 5)) * 0.5)
    with pytest.raises(ValueError, match=r"must be \[B, T, D\] for w"):
        swiglu_projection(jnp.ones((1, 2, 3)) * 0.5, jnp.ones((4, 6)) * 0.5)

"""fast/projection.py: one matmul split into several projections, with a hand-written
backward, against the projections done one by one (JAX's differentiation) and NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from mode_jax.fast.projection import split_projection
from tests.test_fast_model import _dot_output_shapes
from tests.tolerances import assert_close


def _separately(x, w, sizes):
    edges = np.cumsum((0,) + tuple(sizes))
    return [jnp.einsum("BTD,DK->BTK", x, w[:, a:b]) for a, b in zip(edges[:-1], edges[1:])]


@settings(max_examples=10)
@given(sizes=st.sampled_from([(4, 2, 2), (3,), (1, 5)]), dtype=st.sampled_from(["float32", "bfloat16"]),
       seed=st.integers(0, 2**16))
def test_values_and_gradients_match_separate_projections(sizes, dtype, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, 3, 6)), dtype)
    w = jnp.asarray(rng.standard_normal((6, sum(sizes))) / 3, dtype)
    cts = [jnp.asarray(rng.standard_normal((2, 3, s)), dtype) for s in sizes]
    got, vjp = jax.vjp(lambda x, w: split_projection(x, w, sizes), x, w)
    dx, dw = vjp(cts)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    ct64 = np.concatenate([np.asarray(c, np.float64) for c in cts], axis=-1)
    for g, want in zip(got, _separately(x64, w64, sizes)):
        assert_close(g, want, scale=2)
    assert_close(dx, ct64 @ w64.T, scale=2)
    assert_close(dw, np.einsum("btd,btk->dk", x64, ct64), scale=4)


def test_unused_outputs_and_finite_differences():
    """A piece nothing uses (symbolic-zero cotangent) counts as zero; float64 finite differences."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 4, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((5, 7)), jnp.float32)
    loss = lambda x, w: jnp.sum(jnp.sin(split_projection(x, w, (3, 4))[1]))
    want = lambda x, w: jnp.sum(jnp.sin(_separately(x, w, (3, 4))[1]))
    for g, r in zip(jax.grad(loss, argnums=(0, 1))(x, w), jax.grad(want, argnums=(0, 1))(x, w)):
        assert_close(g, r)
    with jax.enable_x64(True):
        check_grads(lambda x, w: split_projection(x, w, (2, 3))[0] * 2 + split_projection(x, w, (2, 3))[1][..., :2],
                    (x.astype(jnp.float64), w[:, :5].astype(jnp.float64)), order=1, modes=["rev"])


def test_frozen_weight_gets_no_weight_gradient_matmul():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 8)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(2).standard_normal((8, 6)), jnp.float32)
    loss = lambda x, w: sum(jnp.sum(y ** 2) for y in split_projection(x, w, (4, 2)))
    only_x = list(_dot_output_shapes(jax.make_jaxpr(jax.grad(loss))(x, w).jaxpr))
    both = list(_dot_output_shapes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w).jaxpr))
    assert (8, 6) not in only_x and both.count((8, 6)) == 1, (only_x, both)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"sum\(4, 3\)"):
        split_projection(jnp.ones((1, 2, 4)) * 0.5, jnp.ones((4, 6)) * 0.5, (4, 3))


def test_bias_is_added_per_piece_with_its_gradient():
    """Qwen2's q|k|v bias: each piece gets its slice; the bias's gradient is the summed cotangent."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 3, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((6, 7)) / 3, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(7), jnp.float32)
    cts = [jnp.asarray(rng.standard_normal((2, 3, s)), jnp.float32) for s in (4, 3)]
    got, vjp = jax.vjp(lambda x, w, b: split_projection(x, w, (4, 3), bias=b), x, w, bias)
    x64, w64, b64 = (np.asarray(a, np.float64) for a in (x, w, bias))
    for g, want in zip(got, [x64 @ w64[:, :4] + b64[:4], x64 @ w64[:, 4:] + b64[4:]]):
        assert_close(g, want, scale=2)
    ct64 = np.concatenate([np.asarray(c, np.float64) for c in cts], axis=-1)
    dx, dw, db = vjp(cts)
    assert_close(db, ct64.sum((0, 1)), scale=2)
    assert_close(dx, ct64 @ w64.T, scale=2)
    with pytest.raises(ValueError, match=r"bias \(6,\) must be \[7\]"):
        split_projection(x, w, (4, 3), bias=bias[:6])

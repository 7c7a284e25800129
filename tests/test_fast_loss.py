"""fast/loss.py: chunked loss and accuracy against ref.train.next_token_metrics on full logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mode_jax.fast.loss import next_token_metrics
from mode_jax.ref.train import next_token_metrics as ref_metrics
from tests.test_fast_model import _dot_output_shapes
from tests.tolerances import assert_close

V, D = 37, 16
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _fast(h, w, targets, mask, chunk):
    def loss(h, w):
        m = next_token_metrics(h, w, targets, mask, chunk=chunk)
        return m["loss"], m
    (_, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w)
    return metrics, grads


def _ref(h, w, targets, mask):
    # The logits the chunks compute: h @ w.T accumulated in float32, rounded to h's dtype.
    def loss(h, w):
        logits = jnp.einsum("BTD,VD->BTV", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        m = ref_metrics(logits.astype(h.dtype), targets, mask)
        return m["loss"], m
    (_, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w)
    return metrics, grads


fast = jax.jit(_fast, static_argnames="chunk", compiler_options=FAST_COMPILE)
ref = jax.jit(_ref, compiler_options=FAST_COMPILE)


def inputs(seed, shape, dtype, masked):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((*shape, D)), dtype)
    w = (0.5 * rng.standard_normal((V, D))).astype(np.float32)
    targets = rng.integers(0, V, shape).astype(np.int32)
    mask = (rng.random(shape) < 0.7).astype(np.float32) if masked else None
    return h, w, targets, mask


@settings(max_examples=10)
@given(shape=st.sampled_from([(2, 8), (3, 5)]),          # 16 and 15 tokens
       chunk=st.sampled_from([4, 5, 64]),               # divides one, not the other; more than all
       masked=st.booleans(), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       seed=st.integers(0, 2**16))
def test_chunked_metrics_and_gradients_match_ref(shape, chunk, masked, dtype, seed):
    h, w, targets, mask = inputs(seed, shape, dtype, masked)
    got, (dh, dw) = fast(h, w, targets, mask, chunk)
    want, (dh_ref, dw_ref) = ref(h, w, targets, mask)
    assert float(got["tokens"]) == float(want["tokens"])
    tol = jnp.float32 if dtype == jnp.float32 else jnp.bfloat16
    assert_close(got["loss"], want["loss"], dtype=tol)
    # Same logits up to accumulation order: an argmax flips only on a rounding tie.
    assert abs(float(got["accuracy"]) - float(want["accuracy"])) <= 1.0 / float(want["tokens"]) + 1e-6
    assert dh.dtype == h.dtype and dw.dtype == w.dtype
    assert_close(dh, dh_ref.astype(jnp.float32), dtype=tol)
    assert_close(dw, dw_ref, dtype=tol)


def test_float32_accuracy_is_exact():
    h, w, targets, mask = inputs(0, (3, 5), jnp.float32, True)
    got, _ = fast(h, w, targets, mask, 4)
    want, _ = ref(h, w, targets, mask)
    assert float(got["accuracy"]) == float(want["accuracy"])     # same argmax in float32: the same count


def test_by_hand():
    # Two tokens, logits [0, ln 3] (h = [1], w = [[0], [ln 3]]): p = [1/4, 3/4].
    # Target 1: loss -ln(3/4) = 0.28768, correct; target 0: -ln(1/4) = 1.38629, wrong.
    h = jnp.ones((1, 2, 1))
    w = jnp.array([[0.0], [np.log(3.0)]])
    m = next_token_metrics(h, w, jnp.array([[1, 0]]), chunk=1)
    assert_close(m["loss"], (0.2876821 + 1.3862944) / 2)
    assert_close(m["accuracy"], 0.5)
    # d loss / d h_t = (p - onehot_t) @ w / 2 tokens: token 0 (3/4 - 1) ln 3 / 2 = -ln 3 / 8,
    # token 1 (3/4) ln 3 / 2 = 3 ln 3 / 8.
    assert_close(jax.grad(lambda h: next_token_metrics(h, w, jnp.array([[1, 0]]), chunk=1)["loss"])(h),
                 [[[-np.log(3.0) / 8], [3 * np.log(3.0) / 8]]])


def test_frozen_head_gets_no_weight_gradient():
    """Differentiating h only: the forward rule builds no [V, D] weight cotangent."""
    h, w, targets, mask = inputs(1, (2, 8), jnp.float32, True)
    loss = lambda h, w: next_token_metrics(h, w, targets, mask, chunk=4)["loss"]
    h_only = list(_dot_output_shapes(jax.make_jaxpr(jax.grad(loss))(h, w).jaxpr))
    both = list(_dot_output_shapes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h, w).jaxpr))
    assert (V, D) not in h_only and (V, D) in both


def test_all_masked_is_zero_not_nan():
    h, w, targets, _ = inputs(2, (2, 8), jnp.float32, False)
    m = next_token_metrics(h, w, targets, jnp.zeros((2, 8)), chunk=5)
    assert float(m["loss"]) == 0.0 and float(m["tokens"]) == 0.0


def test_shape_errors():
    with pytest.raises(ValueError, match="must be \\[B, T, D\\]"):
        next_token_metrics(jnp.ones((2, 3, 4)), jnp.ones((5, 4)), jnp.zeros((2, 4), jnp.int32))

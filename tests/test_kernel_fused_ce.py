"""Tests of the fused LM-head + cross-entropy kernels (kernels/fused_ce.py).

The Triton kernel bodies run in the generic Pallas interpreter (`interpret=True`: the
same bodies, masks and loops as on the GPU) against a float64 NumPy reference written
here and against fast/loss.py's chunked path; the CUDA lowering (Triton's power-of-two
and dot-size rules included) is checked on CPU without a GPU, at SmolLM2's widths. The
interpreted shapes come from small sets so jit caches are reused, and their V and N are
never multiples of the tiles.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AbstractDevice, AbstractMesh

from mode_jax.fast.config import FastConfig
from mode_jax.fast.loss import next_token_metrics
from mode_jax.kernels.fused_ce import BlockSizes, fused_ce, fused_ce_reference
from tests.tolerances import (ARGMAX_TIE_MARGIN, FUSED_CE_VS_FLOAT64, assert_close, assert_close_to_max)

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
# Small tiles: the tiny shapes span several programs and loop steps, and hang over N and V.
SMALL = BlockSizes(block_t=32, block_v=128, grad_rows=16, block_d=16)


def _inputs(seed, tokens, vocab, width, dtype):
    """Fresh draws; half the targets are the float64 argmax, so accuracy is far from 0."""
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((tokens, width)), dtype)
    w = jnp.asarray(3.0 * rng.standard_normal((vocab, width)) / np.sqrt(width), jnp.float32)
    logits = _f64(h) @ _f64(w.astype(dtype)).T
    targets = np.where(rng.random(tokens) < 0.5, logits.argmax(1), rng.integers(0, vocab, tokens))
    mask = (rng.random(tokens) < 0.7).astype(np.float32)
    g = rng.standard_normal(tokens).astype(np.float32)                          # loss cotangent
    return h, w, jnp.asarray(targets, jnp.int32), jnp.asarray(mask), jnp.asarray(g)


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _numpy_reference(h, w, targets, mask, g):
    """float64: loss, correct, dh, dW of mask * CE(h W^T) with W rounded to h's dtype; and
    the gap between each token's two largest logits (for argmax ties)."""
    h64, w64 = _f64(h), _f64(jnp.asarray(w).astype(h.dtype))
    t, m, g = np.asarray(targets), np.asarray(mask, np.float64), np.asarray(g, np.float64)
    logits = h64 @ w64.T                                                        # [N, V]
    top = logits.max(1, keepdims=True)
    exps = np.exp(logits - top)
    lse = (top + np.log(exps.sum(1, keepdims=True)))[:, 0]
    rows = np.arange(len(t))
    loss = m * (lse - logits[rows, t])
    correct = m * (logits.argmax(1) == t)
    dl = exps / exps.sum(1, keepdims=True)
    dl[rows, t] -= 1.0
    dl *= (g * m)[:, None]
    two = np.sort(logits, axis=1)[:, -2:]
    return loss, correct, dl @ w64, dl.T @ h64, (two[:, 1] - two[:, 0]) / np.abs(two[:, 1])


def _run(f, h, w, targets, mask, g):
    (loss, correct), vjp = jax.vjp(lambda h, w: f(h, w, targets, mask), h, w)
    return (loss, correct, *vjp((g, jnp.zeros_like(correct))))


@jax.jit
def _kernel_small(h, w, targets, mask, g):
    return _run(lambda *a: fused_ce(*a, block_sizes=SMALL, interpret=True), h, w, targets, mask, g)


@jax.jit
def _kernel_default(h, w, targets, mask, g):
    return _run(lambda *a: fused_ce(*a, interpret=True), h, w, targets, mask, g)


def _assert_matches_numpy(got, want, dtype):
    loss, correct, dh, dw = got
    want_loss, want_correct, want_dh, want_dw, gap = want
    assert dh.dtype == dtype and dw.dtype == jnp.float32
    for name, a, b in (("loss", loss, want_loss), ("dh", dh, want_dh), ("dw", dw, want_dw)):
        assert_close_to_max(a, b, dtype=dtype, table=FUSED_CE_VS_FLOAT64, err_msg=name)
    correct = np.asarray(correct)
    assert not np.isnan(correct).any()
    differ = correct != want_correct
    # A hit may flip only on a float64 near-tie that the compute dtype's logits cannot resolve.
    assert (gap[differ] < ARGMAX_TIE_MARGIN[jnp.dtype(dtype)]).all(), np.flatnonzero(differ)
    assert want_correct.sum() >= 10          # the draw has hits to get right


@settings(deadline=None, derandomize=True, max_examples=6)
@given(shape=st.sampled_from([(64, 300, 32), (77, 517, 48), (200, 1000, 64)]),   # N, V, D
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), seed=st.integers(0, 2**16))
def test_kernel_matches_float64_numpy(shape, dtype, seed):
    h, w, targets, mask, g = _inputs(seed, *shape, dtype)
    _assert_matches_numpy(_kernel_small(h, w, targets, mask, g), _numpy_reference(h, w, targets, mask, g), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_default_tiles_and_the_xla_reference(dtype):
    # The default tiles (shrunk to the shape: one 64-token forward tile hanging over N = 50)
    # and fused_ce_reference, the plain-XLA definition, against the same float64 values.
    h, w, targets, mask, g = _inputs(5, 50, 700, 64, dtype)
    want = _numpy_reference(h, w, targets, mask, g)
    _assert_matches_numpy(_kernel_default(h, w, targets, mask, g), want, dtype)
    _assert_matches_numpy(jax.jit(_run, static_argnums=0)(fused_ce_reference, h, w, targets, mask, g),
                          want, dtype)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_by_hand(impl):
    # Logits [0, ln 3] (h = e_0, W rows 0 and ln 3 e_0; D = 16, V = 2): p = [1/4, 3/4].
    # Target 1: loss -ln(3/4) = 0.28768, correct; target 0: -ln(1/4) = 1.38629, wrong.
    # dh_n = (p - onehot_n) @ W: token 0 (3/4 - 1) ln 3 = -ln 3 / 4 on e_0, token 1 3 ln 3 / 4.
    # dW = (p - onehot)^T h: row 1 gets (3/4 - 1) + 3/4 = 1/2 on e_0, row 0 (1/4) + (1/4 - 1) = -1/2.
    h = jnp.zeros((2, 16)).at[:, 0].set(1.0)
    w = jnp.zeros((2, 16)).at[1, 0].set(np.log(3.0))
    targets, mask, g = jnp.array([1, 0]), jnp.ones(2), jnp.ones(2)
    f = fused_ce_reference if impl == "reference" else lambda *a: fused_ce(*a, interpret=True)
    loss, correct, dh, dw = _run(f, h, w, targets, mask, g)
    assert_close(loss, [0.2876821, 1.3862944])
    assert_close(correct, [1.0, 0.0])
    assert_close(dh[:, 0], [-np.log(3.0) / 4, 3 * np.log(3.0) / 4])
    assert_close(dw[:, 0], [-0.5, 0.5])
    assert_close(dh[:, 1:], np.zeros((2, 15)))


def test_argmax_tie_goes_to_the_first_index():
    # Vocab rows 5 and 200 equal (different 128-row tiles) and far the largest logits of tokens
    # 0 and 1 (the same hidden state): target 200 is not a hit, target 5 is (jnp.argmax's rule).
    h, w, _, _, g = _inputs(3, 40, 300, 32, jnp.float32)
    h = h.at[1].set(h[0])
    row = 4.0 * h[0] / jnp.linalg.norm(h[0])
    w = w.at[5].set(row).at[200].set(row)
    targets = jnp.zeros(40, jnp.int32).at[0].set(200).at[1].set(5)
    loss, correct, _, _ = _kernel_small(h, w, targets, jnp.ones(40), g)
    want_loss, want_correct = fused_ce_reference(h, w, targets, jnp.ones(40))
    assert np.asarray(correct[:2]).tolist() == [0.0, 1.0] == np.asarray(want_correct[:2]).tolist()
    assert_close(loss[:2], want_loss[:2])


def test_one_gradient_at_a_time():
    # A frozen head (h only: the forward computes dh, no dW kernel) and frozen inputs (W only:
    # the plain forward, then dW) give what both at once give, against float64.
    h, w, targets, mask, g = _inputs(9, 64, 300, 32, jnp.bfloat16)
    _, _, want_dh, want_dw, _ = _numpy_reference(h, w, targets, mask, g)

    @functools.partial(jax.jit, static_argnums=0)
    def one(argnum, h, w):
        f = lambda *hw: fused_ce(*hw, targets, mask, block_sizes=SMALL, interpret=True)[0]
        return jax.vjp(lambda x: f(*((x, w) if argnum == 0 else (h, x))), (h, w)[argnum])[1](g)[0]
    assert_close_to_max(one(0, h, w), want_dh, table=FUSED_CE_VS_FLOAT64, err_msg="dh")
    assert_close_to_max(one(1, h, w), want_dw, dtype=jnp.bfloat16, table=FUSED_CE_VS_FLOAT64, err_msg="dw")


def test_masked_tokens_contribute_nothing():
    # Masked tokens with other hidden states and targets: no loss, no hit, no dh, the same dW.
    h, w, targets, mask, g = _inputs(7, 77, 517, 48, jnp.float32)
    masked = np.asarray(mask) == 0
    rng = np.random.default_rng(8)
    h2 = jnp.where(masked[:, None], 30.0 * rng.standard_normal(h.shape), h).astype(h.dtype)
    t2 = jnp.where(masked, rng.integers(0, 517, 77), targets).astype(jnp.int32)
    first, second = _kernel_small(h, w, targets, mask, g), _kernel_small(h2, w, t2, mask, g)
    for out in (first, second):
        loss, correct, dh, _ = (np.asarray(x) for x in out)
        assert not np.isnan(loss).any() and (loss[masked] == 0).all() and (correct[masked] == 0).all()
        assert (dh[masked] == 0).all()
    assert_close(second[0], first[0])
    assert_close_to_max(second[3], first[3])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_drop_in_for_the_chunked_path(dtype):
    """fast/loss.py's next_token_metrics: kernel 'pallas_interpret' against the chunks ('xla')."""
    h, w, targets, mask, _ = _inputs(11, 2 * 45, 333, 64, dtype)
    h, targets, mask = h.reshape(2, 45, 64), targets.reshape(2, 45), mask.reshape(2, 45)

    @functools.partial(jax.jit, static_argnums=2)
    def metrics_and_grads(h, w, kernel):
        def loss(h, w):
            m = next_token_metrics(h, w, targets, mask, chunk=32, kernel=kernel)
            return m["loss"], m
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w)

    (_, got), (dh, dw) = metrics_and_grads(h, w, "pallas_interpret")
    (_, want), (dh_ref, dw_ref) = metrics_and_grads(h, w, "xla")
    assert dh.dtype == dtype and dw.dtype == jnp.float32
    assert float(got["tokens"]) == float(want["tokens"])
    assert_close(got["loss"], want["loss"], dtype=dtype)
    # The same rounded logits in another summation order: an argmax flips only on a tie.
    assert abs(float(got["accuracy"]) - float(want["accuracy"])) <= 1.0 / float(want["tokens"]) + 1e-6
    assert float(want["accuracy"]) > 0.2
    assert_close_to_max(dh, dh_ref, dtype=dtype)
    assert_close_to_max(dw, dw_ref, dtype=dtype)


def test_all_masked_is_zero_not_nan():
    h, w, targets, _, _ = _inputs(2, 16, 300, 32, jnp.float32)
    m = next_token_metrics(h.reshape(2, 8, 32), w, targets.reshape(2, 8), jnp.zeros((2, 8)),
                           kernel="pallas_interpret")
    assert float(m["loss"]) == 0.0 and float(m["accuracy"]) == 0.0 and float(m["tokens"]) == 0.0


def test_nan_is_not_hidden():
    # A NaN hidden state of a counted token makes its loss NaN (as on the chunked path).
    h, w, targets, mask, g = _inputs(4, 64, 300, 32, jnp.float32)
    loss = _kernel_small(h.at[3].set(jnp.nan), w, targets, mask.at[3].set(1.0), g)[0]
    assert np.isnan(np.asarray(loss)[3]) and not np.isnan(np.delete(np.asarray(loss), 3)).any()


# ---------------------------------------------------------------- lowering on CPU


def _lower_cuda(f, *shapes) -> str:
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=H100)):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("tokens, vocab, width", [
    (1000, 49152, 576),     # SmolLM2-135M: V a multiple of the tile, N not
    (4096, 49153, 960),     # SmolLM2-360M's width, a vocab tail of one row
    (1000, 50000, 2048),    # SmolLM2-1.7B's width
])
def test_triton_kernels_lower_for_cuda(tokens, vocab, width):
    def fwd_bwd(h, w, targets, mask):
        (loss, _), vjp = jax.vjp(lambda h, w: fused_ce(h, w, targets, mask), h, w)
        return loss, vjp((loss, jnp.zeros_like(loss)))
    text = _lower_cuda(fwd_bwd, ((tokens, width), jnp.bfloat16), ((vocab, width), jnp.float32),
                       ((tokens,), jnp.int32), ((tokens,), jnp.float32))
    assert text.count("xla.gpu.triton") == 2          # forward with dh, dW
    assert "fused_ce_fwd_dh" in text and "fused_ce_dw" in text


def test_fast_loss_dispatches_on_cuda_only_and_skips_a_frozen_head():
    shapes = (((4, 256, 576), jnp.bfloat16), ((49152, 576), jnp.float32), ((4, 256), jnp.int32),
              ((4, 256), jnp.float32))

    def grad(argnums, kernel="pallas"):
        return lambda h, w, t, m: jax.grad(
            lambda h, w: next_token_metrics(h, w, t, m, kernel=kernel)["loss"], argnums=argnums)(h, w)
    both = _lower_cuda(grad((0, 1)), *shapes)
    assert both.count("xla.gpu.triton") == 2 and "fused_ce_dw" in both
    h_only = _lower_cuda(grad(0), *shapes)
    assert h_only.count("xla.gpu.triton") == 1 and "fused_ce_dw" not in h_only    # no dW kernel
    loss_only = _lower_cuda(lambda h, w, t, m: next_token_metrics(h, w, t, m, kernel="pallas")["loss"], *shapes)
    assert loss_only.count("xla.gpu.triton") == 1 and "fused_ce_fwd_dh" not in loss_only   # eval: no dh
    assert "xla.gpu.triton" not in _lower_cuda(grad((0, 1), "xla"), *shapes)
    cpu = jax.jit(grad((0, 1))).trace(*[jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    assert "custom_call" not in cpu.lower(lowering_platforms=("cpu",)).as_text()


# ---------------------------------------------------------------- the train step (bench script)


def test_bench_full_step_with_the_kernel_matches_ref():
    """bench/gpu_train.py --small --loss-kernel pallas_interpret: one full-FT step of fast/ with
    the kernels in the loss (tiny model, D = 32) passes the script's check against ref/ in
    float32; --loss-kernel pallas is refused off a GPU (it would quietly run the chunks)."""
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_train.py"
    env = {**os.environ, "XLA_FLAGS": ""}

    def run(kernel):
        return subprocess.run([sys.executable, str(script), "--small", "--parts", "full", "--loss-kernel", kernel],
                              capture_output=True, text=True, env=env, timeout=600)
    proc = run("pallas_interpret")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "check full: loss" in proc.stdout and "ours full FT [loss pallas_interpret]" in proc.stdout
    refused = run("pallas")
    assert refused.returncode == 2 and "--loss-kernel pallas runs Triton kernels and needs a CUDA GPU" in refused.stderr


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("h_shape, w_shape, t_shape, kwargs, match", [
    ((8, 32), (50, 16), (8,), {}, "same D"),
    ((8, 32), (50, 32), (9,), {}, "leading dims"),
    ((8, 40), (50, 40), (8,), {}, "width=40 must be divisible by block_d=16"),
    ((8, 32), (50, 32), (8,), dict(block_sizes=BlockSizes(block_t=48)), "power-of-two tiles >= 16: block_t=48"),
    ((8, 32), (50, 32), (8,), dict(block_sizes=BlockSizes(block_d=8)), "block_d=8"),
    ((0, 32), (50, 32), (0,), {}, "empty"),
])
def test_shape_validation(h_shape, w_shape, t_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fused_ce(jnp.ones(h_shape), jnp.ones(w_shape), jnp.zeros(t_shape, jnp.int32), interpret=True, **kwargs)


def test_rejects_float_targets_and_unknown_kernels():
    with pytest.raises(ValueError, match="targets must be integer ids"):
        fused_ce(jnp.ones((8, 32)), jnp.ones((50, 32)), jnp.zeros(8), interpret=True)
    with pytest.raises(ValueError, match="loss_kernel must be one of"):
        FastConfig(loss_kernel="triton")

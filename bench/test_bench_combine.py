"""pytest-benchmark timings of the MoDE merge (eq. 1-2): XLA reference vs fast/combine.py.

Forward and forward+backward (jax.vjp with a fixed cotangent), jitted, at a
small SmolLM2-width shape so the suite runs in seconds on CPU (where
fast/combine.py dispatches to the reference: the pair should time alike).
Each benchmark checks its values against the reference once; timings are
recorded, never asserted. GPU numbers come from bench/gpu_combine.py.

    python -m pytest bench/test_bench_combine.py -q
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from mode_jax.fast.combine import gated_combine as fast_gated_combine
from mode_jax.ref.mode import gated_combine as ref_gated_combine
from tests.tolerances import assert_trees_close

N_EXPERTS, TOKENS, WIDTH = 4, 512, 576   # [E, T, D] bf16 hidden states
IMPLS = {"reference": ref_gated_combine, "fast": fast_gated_combine}


@pytest.fixture(scope="module")
def inputs():
    k_logits, k_outputs, k_dy = jax.random.split(jax.random.key(0), 3)
    logits = jax.random.normal(k_logits, (TOKENS, N_EXPERTS), jnp.float32)               # [T, E]
    outputs = jax.random.normal(k_outputs, (N_EXPERTS, TOKENS, WIDTH), jnp.bfloat16)     # [E, T, D]
    dy = jax.random.normal(k_dy, (TOKENS, WIDTH), jnp.bfloat16)                          # [T, D]
    return logits, outputs, dy


def _forward(combine):
    return jax.jit(lambda logits, outputs, dy: combine(logits, outputs))


def _forward_backward(combine):
    def run(logits, outputs, dy):
        y, vjp = jax.vjp(combine, logits, outputs)
        return (y, *vjp(dy))
    return jax.jit(run)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("make", [_forward, _forward_backward], ids=["fwd", "fwd_bwd"])
def test_bench_combine(benchmark, inputs, impl, make):
    benchmark.group = make.__name__.strip("_")
    fn = make(IMPLS[impl])
    got = jax.block_until_ready(fn(*inputs))   # compile outside the timed rounds
    want = make(ref_gated_combine)(*inputs)
    assert_trees_close(got, want, dtype=jnp.bfloat16)      # bf16 hidden states: the table's bf16 row
    benchmark(lambda: jax.block_until_ready(fn(*inputs)))

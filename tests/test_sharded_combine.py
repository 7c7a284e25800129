"""The MoDE merge (eq. 1-2) run per shard under `jax.shard_map` on the 8 forced CPU
devices (`fast/sharded_combine.py`), against `ref.mode.gated_combine` run unsharded.

Inside shard_map run: the kernel body in the generic Pallas interpreter
(`interpret=True`: the Triton-style body and row masks, as on the GPU) and the
platform choice of `fast/combine.py` (XLA on CPU). Not the Mosaic body under TPU
interpret mode (`pltpu.InterpretParams()`): it runs inside shard_map, but it
simulates the devices with host callbacks that wait for one another, and with 8
CPU devices on 2 cores a suite run hung in them (once in a few runs), so that body
is tested unsharded only (test_kernel_gated_combine.py).

Tokens are split over `dp`, and optionally the width over `tp`, whose backward
needs the logits' cotangent summed over `tp`. Values and vjps (random cotangent)
are compared at the kernel tests' tolerance (tests/tolerances.py RELATIVE_TO_MAX: float32
1e-5 relative, with the absolute floor scaled by the reference's largest magnitude).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from mode_jax.fast.sharded_combine import sharded_gated_combine
from mode_jax.fast.sharding import make_mesh
from mode_jax.kernels.gated_combine import BlockSizes, gated_combine
from mode_jax.ref.mode import gated_combine as ref_gated_combine
from tests.tolerances import assert_close_to_max

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
MESH_AXES = (("dp", 4), ("tp", 2))
B, T, D = 8, 5, 128        # 40 tokens: 10 per dp shard, so block_t = 8 hangs over the end

# Local combines: each sees one shard, [B/4, T, E] and [E, B/4, T, D or D/2].
COMBINES = {
    "triton_interpret": functools.partial(gated_combine, backend="triton", interpret=True,
                                          block_sizes=BlockSizes(block_t=8, block_d=32)),
    "platform": None,      # fast.combine.gated_combine: XLA on CPU
}


def _inputs(seed: int, n_experts: int):
    k_l, k_o, k_dy = jax.random.split(jax.random.key(seed), 3)
    logits = 2.0 * jax.random.normal(k_l, (B, T, n_experts))        # gates far from uniform
    outputs = jax.random.normal(k_o, (n_experts, B, T, D))
    dy = jax.random.normal(k_dy, (B, T, D))
    return logits, outputs, dy


@pytest.mark.parametrize("width_axes", [(), ("tp",)], ids=["tokens", "tokens+width"])
@pytest.mark.parametrize("name", list(COMBINES))
def test_sharded_combine_matches_reference(name, width_axes):
    mesh = make_mesh(MESH_AXES)
    kw = {} if COMBINES[name] is None else {"combine": COMBINES[name]}
    n_experts = 3 if width_axes else 5
    logits, outputs, dy = _inputs(2 * list(COMBINES).index(name) + len(width_axes), n_experts)

    @jax.jit
    def f(logits, outputs):
        return sharded_gated_combine(logits, outputs, mesh=mesh, token_axes=("dp",),
                                     width_axes=width_axes, **kw)

    y, vjp = jax.vjp(f, logits, outputs)
    d_logits, d_outputs = vjp(dy)
    y_ref, vjp_ref = jax.vjp(ref_gated_combine, logits, outputs)
    d_logits_ref, d_outputs_ref = vjp_ref(dy)
    assert_close_to_max(y, y_ref, err_msg="y")
    assert_close_to_max(d_logits, d_logits_ref, err_msg="d_logits")
    assert_close_to_max(d_outputs, d_outputs_ref, err_msg="d_outputs")
    # The output stays split as the inputs were: nothing was gathered onto one device.
    assert y.sharding.spec[0] == "dp" and (not width_axes or y.sharding.spec[-1] == "tp")


def test_sharded_combine_under_grad_of_a_loss():
    """Inside a larger jitted loss (gate logits from x, as in a MoDE block)."""
    mesh = make_mesh(MESH_AXES)
    logits, outputs, _ = _inputs(7, 3)
    w = jax.random.normal(jax.random.key(8), (D, 3)) * 0.1

    def loss(w, outputs, merge):
        return jnp.sum(jnp.sin(merge(outputs[0] @ w, outputs)))

    sharded = functools.partial(sharded_gated_combine, mesh=mesh, token_axes=("dp",), width_axes=("tp",),
                                combine=COMBINES["triton_interpret"])
    got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(w, outputs, sharded)
    want = jax.grad(loss, argnums=(0, 1))(w, outputs, ref_gated_combine)
    for g, r, what in zip(got, want, ("d_w", "d_outputs")):
        assert_close_to_max(g, r, err_msg=what)


def test_sharded_combine_checks_shapes_and_axes():
    mesh = make_mesh(MESH_AXES)
    logits, outputs, _ = _inputs(3, 3)
    with pytest.raises(ValueError, match=r"batch dimension 6 is not divisible by mesh axes \('dp',\) of size 4"):
        sharded_gated_combine(logits[:6], outputs[:, :6], mesh=mesh, token_axes=("dp",))
    with pytest.raises(ValueError, match=r"mesh axis 'model' is not in mesh"):
        sharded_gated_combine(logits, outputs, mesh=mesh, token_axes=("model",))
    with pytest.raises(ValueError, match=r"must not share a mesh axis"):
        sharded_gated_combine(logits, outputs, mesh=mesh, token_axes=("dp",), width_axes=("dp",))
    with pytest.raises(ValueError, match=r"width dimension 127 is not divisible"):
        sharded_gated_combine(logits, outputs[..., :127], mesh=mesh, token_axes=("dp",), width_axes=("tp",))

"""fast/train.py against ref/train.py and ref/optim.py: optax AdamW, every method's step,
the eval step, and that frozen weights get no gradient computation.

How "no gradient for frozen weights" is checked: the step differentiates only the
trainable subtree, so JAX itself builds no cotangent for a closed-over frozen
weight, unless a rule of ours combines frozen and trainable weights (the fused
merge stacks the backbone's and the experts' down-projections; the chunked loss
computes dW in its forward rule). The test looks at the jaxpr of the gradient,
sub-jaxprs included, and asserts that no dot_general has the shape of a frozen
weight (the tiny config's token count keeps activation shapes distinct from weight
shapes). The same check on full fine-tuning finds them, so it can see them.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.fast import params as P
from mode_jax.fast import steps as S
from mode_jax.fast import train as FT
from mode_jax.fast.config import FastConfig
from mode_jax.fast.optim import make_optimizer
from mode_jax.ref import train as RT
from mode_jax.ref.config import LlamaConfig, LoraConfig, ModeConfig, OptimConfig
from mode_jax.ref.methods import METHODS, merge, partition
from mode_jax.ref.optim import adamw_init, adamw_update
from tests.test_fast_model import _dot_output_shapes
from tests.test_fast_params import random_params, to_fast_jit
from tests.tolerances import assert_close

CFG = LlamaConfig.tiny()                                   # D 32, F 64, q 32, kv 16, V 97
MODE = ModeConfig(n_blocks=2, expert_layers=1, n_experts=2)
LORA = LoraConfig(rank=4, alpha=8.0)
OPT = OptimConfig(learning_rate=1e-2, warmup_steps=2, total_steps=6, weight_decay=0.1)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
STATIC = ("cfg", "opt", "lora", "fast")
ref_step = jax.jit(lambda *a, **k: RT.train_step(*a, **k), static_argnames=STATIC[:3], compiler_options=FAST_COMPILE)
fast_step = jax.jit(FT._train_step, static_argnames=STATIC, compiler_options=FAST_COMPILE)


def method_params(method, seed=0):
    mode = dataclasses.replace(MODE, n_experts=1) if method == "stage1" else MODE
    return random_params(method, seed, CFG, mode, LORA)


def batch(seed, shape=(2, 11), masked=True):
    rng = np.random.default_rng(seed)
    out = {"tokens": rng.integers(0, CFG.vocab_size, (shape[0], shape[1] + 1)).astype(np.int32)}
    if masked:
        out["mask"] = (rng.random(shape) < 0.8).astype(np.float32)
    return out


def test_optax_adamw_equals_ref_on_the_stacked_layout():
    """Same updates as ref/optim.py, leaf for leaf, after conversion (weight decay by per-layer rank)."""
    params = method_params("stage2")
    train, _ = partition(params, "experts_and_gates")
    fast_train, _ = P.partition(to_fast_jit(params), "experts_and_gates")
    state, fast_state = adamw_init(train), FT.init_opt_state(fast_train, OPT)
    tx = make_optimizer(OPT)

    @jax.jit
    def steps(train, state, fast_train, fast_state, all_grads):
        for grads in all_grads:
            train, state, _ = adamw_update(grads, state, train, OPT)
            fast_grads = P.partition(P.to_fast(merge(grads, jax.tree.map(jnp.zeros_like, params))),
                                     "experts_and_gates")[0]
            updates, fast_state = tx.update(fast_grads, fast_state, fast_train)
            fast_train = jax.tree.map(jnp.add, fast_train, updates)
        return train, fast_train

    rng = np.random.default_rng(3)
    all_grads = [jax.tree.map(lambda x: (3 * rng.standard_normal(x.shape)).astype(np.float32), train)
                 for _ in range(4)]
    train, fast_train = steps(train, state, fast_train, fast_state, all_grads)
    full = P.merge(fast_train, P.partition(to_fast_jit(params), "experts_and_gates")[1])
    for got, want in zip(jax.tree.leaves(partition(P.to_ref(full), "experts_and_gates")[0]), jax.tree.leaves(train)):
        assert_close(got, want)


@pytest.mark.parametrize("method", list(METHODS))
def test_step_matches_ref(method):
    """Three steps of each method: same metrics and trainable params (float32 compute, loss
    chunks that do not divide the tokens); frozen leaves come back bit-identical."""
    lora = LORA if method.startswith("lora") else None
    params = method_params(method)
    train, frozen = partition(params, METHODS[method])
    fast_train, fast_frozen = P.partition(to_fast_jit(params), METHODS[method])
    frozen_before = jax.tree.map(np.array, fast_frozen)
    state, fast_state = adamw_init(train), FT.init_opt_state(fast_train, OPT)
    fast = FastConfig.exact(loss_chunk=7)
    for step in range(3):
        b = batch(step)
        train, state, metrics = ref_step(train, frozen, state, b, cfg=CFG, opt=OPT, lora=lora)
        fast_train, fast_state, fast_metrics = fast_step(fast_train, fast_frozen, fast_state, b,
                                                         cfg=CFG, opt=OPT, lora=lora, fast=fast)
        assert set(fast_metrics) == set(metrics)
        for k in metrics:
            assert_close(fast_metrics[k], metrics[k], scale=5, err_msg=k)
    # AdamW's step is lr * m / sqrt(v): for a near-zero gradient, float32 rounding (fast/ and
    # ref/ differentiate the norms and SwiGLU by different but equal formulas) moves the step
    # by a fraction of lr. Hence a tolerance of 5% of lr (scale 50 = 5e-4 with lr 1e-2).
    assert OPT.learning_rate == 1e-2
    got = P.to_ref(P.merge(fast_train, fast_frozen))
    for a, b_ in zip(jax.tree.leaves(partition(got, METHODS[method])[0]), jax.tree.leaves(train)):
        assert_close(a, b_, scale=50)
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(fast_frozen)):
        np.testing.assert_array_equal(before, np.asarray(after))


def test_donating_step_and_bf16_train():
    """The donating jitted step with bf16 compute and pre-cast frozen weights lowers the loss."""
    fast = FastConfig(loss_chunk=8)
    train, frozen = P.partition(to_fast_jit(method_params("uninit")), "experts_and_gates")
    frozen = FT.cast_frozen(frozen, fast)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(frozen))
    state = FT.init_opt_state(train, OPT)
    b = batch(0, masked=False)
    losses = []
    for _ in range(4):
        train, state, metrics = FT.train_step(train, frozen, state, b, cfg=CFG, opt=OPT, fast=fast)
        losses.append(float(metrics["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(train))      # master weights stay f32
    assert losses[-1] < losses[0], losses


def test_eval_step_matches_ref():
    """fast/steps.py's eval step (loss chunks of 5 that do not divide the 22 tokens) against
    ref/train.py's metrics, routing and per-token statistics."""
    params = method_params("uninit")
    tokens = batch(5)["tokens"]
    forward = S.Forward(CFG, None, FastConfig.exact(loss_chunk=5))
    got = S.eval_step(to_fast_jit(params), tokens, forward=forward)
    want = jax.jit(lambda p, t: RT.batch_metrics(p, {"tokens": t}, CFG, with_routing=True, with_tokens=True),
                   compiler_options=FAST_COMPILE)(params, tokens)
    for k in ("loss", "accuracy", "routing", "token_nll"):
        assert_close(got[k], want[k], err_msg=k)
    np.testing.assert_array_equal(got["token_correct"], want["token_correct"])


def _frozen_weight_shapes(frozen):
    """Per-layer 2-D shapes (and transposes) of every frozen matrix."""
    shapes = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(frozen)[0]:
        if P.per_layer_ndim(path, leaf) >= 2:
            shape = leaf.shape[P.stacked_axes(path):]
            shapes |= {shape, shape[::-1]}
    return shapes


@pytest.mark.parametrize("method, merge_kind", [("stage2_frozen", "fused"), ("stage2_frozen", "stacked"),
                                                ("stage2", "fused"), ("lora", "fused"), ("full", "fused")])
def test_no_gradient_computation_for_frozen_weights(method, merge_kind):
    lora = LORA if method == "lora" else None
    train, frozen = P.partition(to_fast_jit(method_params(method)), METHODS[method])
    b = batch(0)
    fast = FastConfig.exact(merge=merge_kind)
    grad = jax.grad(lambda t: FT.batch_metrics(P.merge(t, frozen), b, CFG, fast, lora)["loss"])
    dots = set(_dot_output_shapes(jax.make_jaxpr(grad)(train).jaxpr))
    if method == "full":
        # Everything trains: the weight gradients are there, and the check sees them.
        everything = _frozen_weight_shapes(P.partition(to_fast_jit(method_params("full")), "lora")[1])
        assert dots & everything
        return
    forbidden = _frozen_weight_shapes(frozen)
    if method == "stage2":
        # Expert weights train and share the backbone's per-layer shapes; their gradients are
        # batched over the experts ([N, ...], or [N F, D] in the fused merge), never 2-D per layer.
        assert (CFG.d_ff * MODE.n_experts, CFG.d_model) in dots
    assert not dots & forbidden, sorted(dots & forbidden)

"""Training semantics: loss and accuracy, AdamW, partitions, every method's step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mode_jax.ref.config import LlamaConfig, LoraConfig, ModeConfig, OptimConfig
from mode_jax.ref.llama import init_llama, llama_forward
from mode_jax.ref.lora import init_lora, lora_merge, lora_param_count
from mode_jax.ref.methods import METHODS, apply, init_method, merge, partition
from mode_jax.ref.optim import adamw_init, adamw_update, clip_by_global_norm, learning_rate
from mode_jax.ref.train import next_token_metrics, train_step
from tests.tolerances import assert_close

CFG = LlamaConfig.tiny()
MODE = ModeConfig(n_blocks=2, expert_layers=1, n_experts=2)
LORA = LoraConfig(rank=4, alpha=8.0)
OPT = OptimConfig(learning_rate=1e-2, warmup_steps=2, total_steps=6, weight_decay=0.1)


def test_next_token_metrics_by_hand():
    # Row 0: logits [ln 1, ln 3] -> p = [1/4, 3/4]; target 1: loss -ln(3/4) = 0.28768, correct.
    # Row 1: same logits, target 0: loss -ln(1/4) = 1.38629, wrong; masked out below.
    logits = jnp.log(jnp.array([[[1.0, 3.0], [1.0, 3.0]]]))
    targets = jnp.array([[1, 0]])
    both = next_token_metrics(logits, targets)
    assert_close(both["loss"], (0.2876821 + 1.3862944) / 2)
    assert_close(both["accuracy"], 0.5)
    first = next_token_metrics(logits, targets, jnp.array([[1.0, 0.0]]))
    assert_close(first["loss"], 0.2876821)
    assert_close(first["accuracy"], 1.0)
    assert float(first["tokens"]) == 1.0


def test_learning_rate_schedule_by_hand():
    opt = OptimConfig(learning_rate=1.0, warmup_steps=4, total_steps=8, min_lr_ratio=0.0)
    lrs = [float(learning_rate(s, opt)) for s in range(9)]
    # warmup (s + 1) / 4; then cosine over 4 steps: 0.5 (1 + cos(pi k / 4)).
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, 0.8535534, 0.5, 0.1464466, 0.0]
    assert_close(lrs, expected)


def test_clip_by_global_norm_by_hand():
    grads = {"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}      # norm 5
    clipped, norm = clip_by_global_norm(grads, 1.0)
    assert_close(norm, 5.0)
    assert_close(clipped["a"], [0.6])
    assert_close(clipped["b"], [[0.8]])


def test_adamw_first_step_by_hand():
    # Step 1: m_hat = g, v_hat = g^2, so the update is lr * (sign(g) + wd * p) (eps negligible).
    opt = OptimConfig(learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5,
                      clip_norm=0.0, min_lr_ratio=1.0)
    params = {"w": jnp.array([[2.0, -1.0]]), "bias": jnp.array([1.0])}
    grads = {"w": jnp.array([[0.3, 0.2]]), "bias": jnp.array([-4.0])}
    new, _, _ = adamw_update(grads, adamw_init(params), params, opt)
    assert_close(new["w"], [[2.0 - 0.1 * (1 + 0.5 * 2.0), -1.0 - 0.1 * (1 + 0.5 * -1.0)]])
    assert_close(new["bias"], [1.0 + 0.1])                       # no decay on vectors


def test_adamw_matches_optax_over_steps():
    params = {"w": jax.random.normal(jax.random.key(0), (4, 3)), "n": jax.random.normal(jax.random.key(1), (3,))}
    schedule = lambda step: learning_rate(step, OPT)
    tx = optax.chain(optax.clip_by_global_norm(OPT.clip_norm),
                     optax.adamw(schedule, b1=OPT.b1, b2=OPT.b2, eps=OPT.eps,
                                 weight_decay=OPT.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    ours, state, theirs, tstate = params, adamw_init(params), params, tx.init(params)
    for step in range(6):
        grads = jax.tree.map(lambda x: 3 * jax.random.normal(jax.random.key(10 + step), x.shape), params)
        ours, state, _ = adamw_update(grads, state, ours, OPT)
        updates, tstate = tx.update(grads, tstate, theirs)
        theirs = optax.apply_updates(theirs, updates)
    for k in params:
        assert_close(ours[k], theirs[k])


def test_partition_merge_round_trip():
    params = init_method("stage1", jax.random.key(0), init_llama(jax.random.key(1), CFG), CFG, mode=MODE)
    for name in ("experts_and_gates", "gates", "full"):
        train, frozen = partition(params, name)
        assert jax.tree.structure(merge(train, frozen)) == jax.tree.structure(params)
        assert len(jax.tree.leaves(train)) + len(jax.tree.leaves(frozen)) == len(jax.tree.leaves(params))
    train, _ = partition(params, "gates")
    assert len(jax.tree.leaves(train)) == 2 * MODE.n_blocks
    with pytest.raises(ValueError, match="trainable must be one of"):
        partition(params, "everything")


def lora_forward_explicit(backbone, adapters, tokens):
    """LoRA written without merging: every targeted x @ W becomes x @ W + s (x @ A) @ B.
    Checked by running the backbone on weights rebuilt from that identity on a basis."""
    s = LORA.alpha / LORA.rank
    layers = []
    for layer, ad in zip(backbone["layers"], adapters["layers"]):
        new = dict(layer)
        for name, ab in ad.items():
            eye = jnp.eye(layer[name].shape[0])
            new[name] = eye @ layer[name] + s * (eye @ ab["a"]) @ ab["b"]
        layers.append(new)
    return llama_forward({**backbone, "layers": layers}, tokens, CFG)


def test_lora_starts_at_backbone_and_matches_explicit_form():
    backbone = init_llama(jax.random.key(1), CFG)
    tok = jax.random.randint(jax.random.key(2), (2, 8), 0, CFG.vocab_size)
    adapters = init_lora(jax.random.key(0), backbone, LORA)
    np.testing.assert_array_equal(apply({"backbone": backbone, "lora": adapters}, tok, CFG, LORA),
                                  llama_forward(backbone, tok, CFG))
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), adapters)
    out = apply({"backbone": backbone, "lora": adapters}, tok, CFG, LORA)
    assert_close(out, lora_forward_explicit(backbone, adapters, tok), scale=3)
    assert not np.allclose(out, llama_forward(backbone, tok, CFG))
    assert set(adapters["layers"][0]) == {"wq", "wk", "wv", "wo"}
    # Per layer: r (in + out) for q (32+32), k (32+16), v (32+16), o (32+32) at r=4.
    assert lora_param_count(CFG, LORA) == CFG.n_layers * 4 * (64 + 48 + 48 + 64)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be a positive integer, got 0"),
    (dict(rank=-3), "rank must be a positive integer, got -3"),
    (dict(alpha=0.0), "alpha must be > 0"),
    (dict(targets="mlp"), "targets must be one of"),
])
def test_lora_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def build(method):
    backbone = init_llama(jax.random.key(1), CFG)
    stage1 = None
    if method.startswith("stage2"):
        stage1 = [init_method("stage1", jax.random.key(s), backbone, CFG, mode=MODE) for s in (5, 6)]
    if method.startswith("lora_moe"):
        from tests.test_fast_params import trained_loras
        stage1 = trained_loras(backbone, CFG, LORA)
    if method == "btx":
        from tests.test_fast_params import random_params     # BTX branches whose MLPs moved apart
        stage1 = [random_params("btx_branch", s, CFG, MODE) for s in (5, 6)]
    from tests.test_fast_params import EXPANSION     # block expansion's k for the 4-layer CFG
    return init_method(method, jax.random.key(0), backbone, CFG, mode=MODE, lora=LORA, stage1=stage1,
                       expansion=EXPANSION)


@pytest.mark.parametrize("method", list(METHODS))
def test_step_updates_trainable_and_leaves_frozen_bit_identical(method):
    params = build(method)
    train, frozen = partition(params, METHODS[method])
    frozen_before = jax.tree.map(np.array, frozen)
    train_before = jax.tree.map(np.array, train)
    batch = {"tokens": jax.random.randint(jax.random.key(4), (2, 13), 0, CFG.vocab_size)}
    state = adamw_init(train)
    losses = []
    for _ in range(4):
        train, state, metrics = train_step(train, frozen, state, batch, cfg=CFG, opt=OPT,
                                           lora=LORA if method.startswith("lora") else None)
        losses.append(float(metrics["loss"]))
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(before, after)
    changed = [not np.array_equal(b, a) for b, a in zip(jax.tree.leaves(train_before), jax.tree.leaves(train))]
    assert any(changed), f"{method}: no trainable parameter moved"
    assert losses[-1] < losses[0], f"{method}: loss did not decrease on a repeated batch: {losses}"
    if method == "stage2_frozen":
        names = {jax.tree_util.keystr(p[-1:]) for p, _ in jax.tree_util.tree_flatten_with_path(train)[0]}
        assert names == {"['gate_w']", "['gate_b']"}


def test_step_gradient_equals_full_tree_gradient_restricted():
    params = build("stage1")
    batch = {"tokens": jax.random.randint(jax.random.key(4), (2, 9), 0, CFG.vocab_size)}
    train, frozen = partition(params, "experts_and_gates")

    def loss(p):
        logits = apply(p, batch["tokens"][:, :-1], CFG)
        return next_token_metrics(logits, batch["tokens"][:, 1:])["loss"]

    g_part = jax.grad(lambda t: loss(merge(t, frozen)))(train)
    g_full = jax.grad(loss)(params)
    for a, b in zip(jax.tree.leaves(g_part), jax.tree.leaves(partition(g_full, "experts_and_gates")[0])):
        assert_close(a, b)


def test_uninit_experts_are_random_not_copies():
    params = build("uninit")
    backbone = params["backbone"]
    wq = params["blocks"][0]["experts"][0][0]["wq"]
    assert not any(np.allclose(wq, l["wq"]) for l in backbone["layers"])


def test_method_errors():
    backbone = init_llama(jax.random.key(1), CFG)
    with pytest.raises(ValueError, match="method must be one of"):
        init_method("moe", jax.random.key(0), backbone, CFG)
    with pytest.raises(ValueError, match="needs the trained stage-1 models"):
        init_method("stage2", jax.random.key(0), backbone, CFG, mode=MODE)
    with pytest.raises(ValueError, match="needs a LoraConfig"):
        init_method("lora", jax.random.key(0), backbone, CFG)
    with pytest.raises(ValueError, match="no LoraConfig was given"):
        apply(build("lora"), jnp.zeros((1, 3), jnp.int32) + 1, CFG)


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=0.0), "learning_rate must be > 0"),
    (dict(total_steps=0), "total_steps must be a positive integer"),
    (dict(b1=1.0), "b1, b2 must be in"),
    (dict(clip_norm=-1.0), "clip_norm must be >= 0"),
])
def test_optim_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**kwargs)

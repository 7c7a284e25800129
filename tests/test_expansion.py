"""Block expansion (ref/expansion.py, fast/expansion.py): LLaMA Pro's layout, its identity
start and the gradients that start implies, worked out by hand; fast/ against ref/
(forward and gradients, float32 and bf16, drawn by hypothesis); and the step factory's
steps, which move only W_o and W_down at the first step.

The independent references: LLaMA Pro's placement rule written from its script's
condition ((i + 1) % k == 0 puts a copy after backbone layer i); tests/numpy_llama.py's
float64 Llama run over the expanded stack written out as one plain list of layers; and
the first-step gradients dW_o = a^T g, dW_down = u^T g assembled from NumPy's attention
and SwiGLU, with g the cotangent of the rest of the network.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mode_jax.fast import model
from mode_jax.fast import params as P
from mode_jax.fast import steps as S
from mode_jax.fast.config import FastConfig
from mode_jax.ref.config import LlamaConfig, OptimConfig
from mode_jax.ref.expansion import ExpansionConfig, as_llama, expansion_param_count, init_expansion
from mode_jax.ref.llama import layer_shapes, layers_forward, lm_head, llama_forward
from mode_jax.ref.methods import METHODS, apply, init_method, merge, partition
from tests import numpy_llama
from tests.test_fast_model import FAST_COMPILE, _absmax, _at, jit, tokens
from tests.test_fast_params import random_params
from tests.tolerances import assert_close

CFG = LlamaConfig.tiny(n_layers=6)         # D 32 = N*H (4 heads of 8): W_o is square
CFG4 = LlamaConfig.tiny()                  # 4 layers: smaller programs where 6 add nothing
DTYPES = {"float32": FastConfig.exact(), "bfloat16": FastConfig()}
ZEROED = ("wo", "w_down")
ref_logits = jit(apply, ("cfg", "lora"))
fast_logits = jit(model.logits, ("cfg", "fast", "lora"))


def expanded(seed: int, cfg: LlamaConfig, every: int, *, identity: bool) -> dict:
    """Random backbone (no zero weights); new layers as init_expansion makes them (identity)
    or random (every weight nonzero: every term of the forward matters)."""
    params = random_params("full", seed, cfg)
    if identity:
        return init_method("block_expansion", jax.random.key(0), params["backbone"], cfg,
                           expansion=ExpansionConfig(every))
    rng = np.random.default_rng(seed + 1)
    new = [{k: ((1 + 0.1 * rng.standard_normal(s)) if k.endswith("norm") else 0.05 * rng.standard_normal(s))
            .astype(np.float32) for k, s in layer_shapes(cfg).items()} for _ in range(cfg.n_layers // every)]
    return {**params, "expansion": {"layers": new}}


# --- the layout: LLaMA Pro's rule ------------------------------------------------------------

@pytest.mark.parametrize("every", [1, 2, 3, 6])
def test_copies_follow_llama_pro_placement_with_wo_and_w_down_zeroed(every):
    backbone = random_params("full", 1, CFG)["backbone"]
    new = init_expansion(backbone, CFG, ExpansionConfig(every))["layers"]
    # LLaMA Pro's script: after backbone layer i, a copy of it whenever (i + 1) % split == 0.
    sources = [i for i in range(CFG.n_layers) if (i + 1) % every == 0]
    assert len(new) == len(sources) == CFG.n_layers // every
    for layer, i in zip(new, sources):
        assert set(layer) == set(backbone["layers"][i])
        for key, value in layer.items():
            want = np.zeros_like(backbone["layers"][i][key]) if key in ZEROED else backbone["layers"][i][key]
            np.testing.assert_array_equal(value, want, err_msg=f"copy of layer {i}: {key}")
    per_layer = sum(int(np.prod(s)) for s in layer_shapes(CFG).values())
    assert expansion_param_count(CFG, ExpansionConfig(every)) == per_layer * len(sources)


@pytest.mark.parametrize("every, needle", [(4, "must divide the backbone's 6 layers (one of 1, 2, 3, 6)"),
                                           (0, "must be a positive integer"), (True, "must be a positive integer")])
def test_bad_every_is_refused_naming_the_key(every, needle):
    with pytest.raises(ValueError, match=r"expansion|ExpansionConfig") as err:
        ExpansionConfig(every).check_backbone(CFG)
    assert needle in str(err.value)


def test_ref_forward_is_the_interleaved_stack_in_numpy_float64():
    """The expanded model with random (non-identity) new layers against numpy_llama run over
    the stack written out as one list: backbone 0, 1, new 0, backbone 2, 3, new 1, ..."""
    params = expanded(2, CFG, 2, identity=False)
    bb, new = params["backbone"], params["expansion"]["layers"]
    stack = [layer for i in range(CFG.n_layers) for layer in
             ([bb["layers"][i]] + ([new[i // 2]] if i % 2 == 1 else []))]
    assert len(stack) == CFG.n_layers + 3
    as_plain, plain_cfg = as_llama(params, CFG)          # what `export --to hf` writes
    assert plain_cfg.n_layers == len(stack)
    jax.tree.map(np.testing.assert_array_equal, as_plain["layers"], stack)
    tok = tokens(3, (2, 7), CFG)
    got = apply(params, jnp.asarray(tok), CFG)
    npp = numpy_llama.to_numpy({**bb, "layers": stack})
    for b in range(2):
        assert_close(got[b], numpy_llama.llama_logits(npp, tok[b], CFG), scale=5)


# --- the identity start and its gradients ----------------------------------------------------

def test_at_init_the_expanded_model_is_the_backbone():
    params = expanded(4, CFG, 3, identity=True)
    tok = jnp.asarray(tokens(5, (2, 9), CFG))
    backbone_logits = llama_forward(params["backbone"], tok, CFG)
    # x + 0 + 0 is x exactly: the reference gives the backbone's logits bit for bit.
    np.testing.assert_array_equal(apply(params, tok, CFG), backbone_logits)
    fast_params = P.to_fast(params)
    for name, fast in DTYPES.items():
        got = fast_logits(fast_params, tok, CFG, fast)
        plain = fast_logits(P.to_fast({"backbone": params["backbone"]}), tok, CFG, fast)
        dtype = jnp.float32 if name == "float32" else jnp.bfloat16
        assert_close(got, plain, dtype=dtype, err_msg=name)
        assert_close(got, backbone_logits, dtype=dtype, scale=2, err_msg=name)


def test_first_step_gradients_are_those_of_the_algebra():
    """At init only W_o and W_down of each new layer get a gradient, and it is
    dW_o = a^T g, dW_down = u^T g (summed over batch and positions), with a the attention
    output before W_o and u the SwiGLU hidden of the layer's input x (h = x: the attention
    adds 0), and g the cotangent of the rest of the network at x. Float64 throughout."""
    every, cfg = 2, CFG4
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), expanded(6, cfg, every, identity=True))
        tok = jnp.asarray(tokens(7, (2, 8), cfg))
        ct = jnp.asarray(np.random.default_rng(8).standard_normal((2, 8, cfg.vocab_size)))
        train, frozen = partition(params, METHODS["block_expansion"])
        loss = lambda t, f: jnp.sum(ct * apply(merge(t, f), tok, cfg))
        grads = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(train, frozen)["expansion"]["layers"]
        bb = params["backbone"]
        x0 = jnp.take(bb["embed"], tok, axis=0)
        for j, (new, grad) in enumerate(zip(params["expansion"]["layers"], grads)):
            depth = (j + 1) * every                      # backbone layers before new layer j
            x = layers_forward(bb["layers"][:depth], x0, cfg)     # earlier new layers are identities
            rest = lambda h, depth=depth: lm_head(bb, layers_forward(bb["layers"][depth:], h, cfg), cfg)
            g = np.asarray(jax.jit(lambda h: jax.vjp(rest, h)[1](ct)[0])(x))                  # [B, T, D]
            xn = numpy_llama.to_numpy(x)
            identity_wo = {**numpy_llama.to_numpy(new), "wo": np.eye(cfg.n_heads * cfg.head_dim)}
            a = np.stack([numpy_llama.attention(numpy_llama.rms_norm(xn[b], identity_wo["attn_norm"], cfg.norm_eps),
                                                identity_wo, cfg) for b in range(2)])    # [B, T, N*H]
            m = numpy_llama.rms_norm(xn, np.asarray(new["mlp_norm"]), cfg.norm_eps)
            gate = m @ np.asarray(new["w_gate"])
            u = gate / (1 + np.exp(-gate)) * (m @ np.asarray(new["w_up"]))                 # [B, T, F]
            want = {"wo": np.einsum("BTI,BTD->ID", a, g), "w_down": np.einsum("BTF,BTD->FD", u, g)}
            for key, value in grad.items():
                if key in ZEROED:
                    assert np.abs(want[key]).max() > 1e-3, f"layer {j} {key}: the hand gradient is ~0"
                    assert_close(value, want[key], dtype=jnp.float64, scale=100, err_msg=f"layer {j} {key}")
                else:
                    assert np.all(np.asarray(value) == 0.0), f"new layer {j}: d{key} must be exactly 0 at init"


# --- fast/ against ref/ -----------------------------------------------------------------------

def _grads(fn, params, tok, ct):
    train, frozen = P.partition(params, "expansion")
    _, vjp = jax.vjp(lambda t: fn(P.merge(t, frozen), tok), train)
    return vjp(ct)[0]


@settings(max_examples=3, deadline=None)
@given(every=st.sampled_from([2, 4]), qkv_bias=st.booleans(), dtype=st.sampled_from(sorted(DTYPES)),
       seed=st.integers(0, 2**16))
def test_fast_forward_and_gradients_match_ref(every, qkv_bias, dtype, seed):
    # 4 layers (fewer, smaller programs to compile): new layers after 1 and 3, or after 3 only.
    cfg = dataclasses.replace(CFG4, qkv_bias=qkv_bias)
    params = expanded(seed, cfg, every, identity=False)
    fast_params = P.to_fast(params)
    fast = DTYPES[dtype]
    tol = jnp.float32 if dtype == "float32" else jnp.bfloat16
    tok = tokens(seed + 3, (2, 8), cfg)
    assert_close(fast_logits(fast_params, tok, cfg, fast), ref_logits(params, tok, cfg), dtype=tol, scale=2)
    ct = np.random.default_rng(seed + 4).standard_normal((2, 8, cfg.vocab_size)).astype(np.float32)
    want = jit(_grads, ("fn",))(lambda p, t: apply(P.to_ref(p), t, cfg), fast_params, tok, ct)
    got = jit(_grads, ("fn",))(lambda p, t: model.logits(p, t, cfg, fast), fast_params, tok, ct)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        assert g.shape[0] == cfg.n_layers // every
        w = _at(want, path)
        scale = 2 if dtype == "float32" else 2 * max(1.0, _absmax(w))     # bf16: relative to the leaf
        assert_close(g, w, dtype=tol, scale=scale, err_msg=jax.tree_util.keystr(path))


def test_layouts_round_trip_exactly():
    params = expanded(9, dataclasses.replace(CFG, qkv_bias=True), 2, identity=False)
    fast = P.to_fast(params)
    assert fast["expansion"]["layers"]["wq"].shape == (3, CFG.d_model, CFG.n_heads * CFG.head_dim)
    assert "bq" in fast["expansion"]["layers"]
    jax.tree.map(np.testing.assert_array_equal, P.to_ref(fast), params)


# --- the steps of fast/steps.py -----------------------------------------------------------------

def test_steps_move_only_wo_and_w_down_first_then_every_new_weight(backend="fast"):
    params = expanded(10, CFG, 3, identity=True)
    opt = OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=4)
    steps = S.make_steps("block_expansion", CFG, opt=opt, backend=backend)
    train, frozen = steps.split(steps.to_backend(params), METHODS["block_expansion"])
    start = jax.tree.map(np.asarray, train)
    train = jax.tree.map(jnp.copy, train)
    state, frozen_c = steps.init_opt(train), steps.prepare_frozen(frozen)
    batch = {"tokens": tokens(11, (2, 9), CFG)}
    train, state, m1 = steps.train_step(train, frozen_c, state, batch)
    after = steps.from_backend(steps.join(train, frozen))
    backbone_logits = llama_forward(params["backbone"], jnp.asarray(batch["tokens"][:, :-1]), CFG)
    assert np.isfinite(float(m1["loss"]))
    assert_close(m1["loss"], _nll(backbone_logits, batch["tokens"][:, 1:]), scale=2)    # step 1 sees the backbone
    for key, value in train["expansion"]["layers"].items():
        moved = np.asarray(value) != start["expansion"]["layers"][key]
        if key in ZEROED:
            assert moved.all(axis=tuple(range(1, moved.ndim))).all(), f"{key} did not move at step 1"
        else:
            assert not moved.any(), f"{key} moved at step 1 although its gradient is 0"
    jax.tree.map(np.testing.assert_array_equal, after["backbone"], params["backbone"])       # frozen
    train, state, _ = steps.train_step(train, frozen_c, state, batch)
    for key in ("wq", "w_gate", "attn_norm"):
        assert (np.asarray(train["expansion"]["layers"][key]) != start["expansion"]["layers"][key]).any(), key


def _nll(logits, targets) -> float:
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float(np.mean(logz - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]))

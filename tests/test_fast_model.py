"""fast/model.py and fast/merge.py against ref/: forward and gradients, float32 and bf16.

float32 compute must match ref/ to float32 rounding; bf16 compute (master weights
float32) must match the float32 reference within the bf16 tolerance. Gradients are
compared through `jax.vjp` with a random cotangent, with respect to each method's
trainable subset only. Parameters are random (tests/test_fast_params.random_params),
with no zero LoRA B or zero gate, so every term matters.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mode_jax.fast import model, params as P
from mode_jax.fast.attention import pick_implementation
from mode_jax.fast.config import LAYER_LOOPS, REMATS, FastConfig
from mode_jax.fast.merge import fused_merge, fused_merge_reference
from mode_jax.ref.config import LlamaConfig, LoraConfig, ModeConfig, RopeScaling
from mode_jax.ref.methods import apply, merge, partition
from tests.test_fast_params import random_params, to_fast_jit
from tests.tolerances import assert_close

CFG = LlamaConfig.tiny()                  # 4 layers, D 32, F 64, 4 query heads of 8, 2 kv heads
LORA = LoraConfig(rank=4, alpha=8.0)
# Tests compile many small programs; optimising them costs more than running them.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
DTYPES = {"float32": FastConfig.exact(), "bfloat16": FastConfig()}


def jit(fn, static):
    return jax.jit(fn, static_argnames=static, compiler_options=FAST_COMPILE)


ref_logits = jit(apply, ("cfg", "lora"))
fast_logits = jit(model.logits, ("cfg", "fast", "lora"))


MODE = ModeConfig(n_blocks=2, expert_layers=1, n_experts=2)


def build(method, seed, cfg=CFG, mode=MODE):
    return random_params(method, seed, cfg, mode, LORA)


def tokens(seed, shape, cfg=CFG):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)


def tolerance_dtype(fast):
    return jnp.bfloat16 if fast.dtype == jnp.bfloat16 else jnp.float32


@settings(max_examples=8)
@given(shape=st.sampled_from([(2, 8), (1, 13)]), tie=st.sampled_from([True, False]),
       method=st.sampled_from(["full", "lora"]), dtype=st.sampled_from(sorted(DTYPES)),
       seed=st.integers(0, 2**16))
def test_llama_and_lora_forward_match_ref(shape, tie, method, dtype, seed):
    """Llama, and LoRA unmerged (x W + s (x A) B) against ref's merged W + s A B."""
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    params = build(method, seed, cfg)
    lora = LORA if method == "lora" else None
    tok = tokens(seed + 3, shape, cfg)
    fast = DTYPES[dtype]
    got = fast_logits(to_fast_jit(params), tok, cfg, fast, lora)
    assert got.shape == (*shape, cfg.vocab_size) and got.dtype == jnp.float32
    assert_close(got, ref_logits(params, tok, cfg, lora), dtype=tolerance_dtype(fast), scale=2)


@settings(max_examples=8)
@given(n_experts=st.sampled_from([0, 1, 3]), merge_kind=st.sampled_from(["fused", "stacked"]),
       dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16))
def test_mode_forward_matches_ref(n_experts, merge_kind, dtype, seed):
    mode = ModeConfig(n_blocks=2, expert_layers=2, n_experts=n_experts)
    params = build("uninit", seed, mode=mode)
    tok = tokens(seed + 3, (2, 8))
    fast = dataclasses.replace(DTYPES[dtype], merge=merge_kind)
    got = fast_logits(to_fast_jit(params, expert_layers=2), tok, CFG, fast)
    assert_close(got, ref_logits(params, tok, CFG), dtype=tolerance_dtype(fast), scale=2)


def test_unfused_projections_match_fused():
    """FastConfig(fuse_projections=False): q, k, v (and gate, up) as separate matmuls, same values."""
    params = to_fast_jit(build("lora", 5))
    tok = tokens(6, (2, 8))
    fused = fast_logits(params, tok, CFG, FastConfig.exact(), LORA)
    separate = fast_logits(params, tok, CFG, FastConfig.exact(fuse_projections=False), LORA)
    assert_close(separate, fused)


# --- other backbones: Qwen2's q/k/v biases, Llama 3's RoPE scaling ---------------------------

ARCHS = {"qwen2": dataclasses.replace(CFG, qkv_bias=True, rope_theta=1e6),
         # original 64: CFG's head_dim 8 and theta 1e4 put one frequency in each branch of the rule.
         "llama3": dataclasses.replace(CFG, rope_scaling=RopeScaling(original_max_position_embeddings=64))}


@settings(max_examples=8)
@given(arch=st.sampled_from(sorted(ARCHS)), method=st.sampled_from(["full", "lora", "uninit"]),
       dtype=st.sampled_from(sorted(DTYPES)), fuse=st.booleans(), seed=st.integers(0, 2**16))
def test_other_backbones_forward_match_ref(arch, method, dtype, fuse, seed):
    cfg = ARCHS[arch]
    params = build(method, seed, cfg)
    if cfg.qkv_bias:
        # Biases of Qwen2's size (units, not hundredths), so a missing or misplaced one shows.
        for layer in params["backbone"]["layers"]:
            layer.update({b: 20 * layer[b] for b in ("bq", "bk", "bv")})
    lora = LORA if method == "lora" else None
    tok = tokens(seed + 3, (2, 12), cfg)
    fast = dataclasses.replace(DTYPES[dtype], fuse_projections=fuse)
    got = fast_logits(to_fast_jit(params, expert_layers=1), tok, cfg, fast, lora)
    assert_close(got, ref_logits(params, tok, cfg, lora), dtype=tolerance_dtype(fast), scale=2)


def _vjp_arch(fn, params, trainable, tok, ct):
    train, frozen = P.partition(params, trainable)
    _, vjp = jax.vjp(lambda t: fn(P.merge(t, frozen), tok), train)
    return vjp(ct)[0]


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method, trainable", [("full", "full"), ("uninit", "experts_and_gates")])
def test_other_backbones_gradients_match_ref(arch, method, trainable):
    """float32 gradients, the biases' included (full FT trains them, MoDE's experts carry them)."""
    cfg = ARCHS[arch]
    params = build(method, 21, cfg)
    tok = tokens(22, (2, 8), cfg)
    ct = np.random.default_rng(23).standard_normal((2, 8, cfg.vocab_size)).astype(np.float32)
    fast_params = to_fast_jit(params)
    ref_fn = lambda p, t: apply(P.to_ref(p), t, cfg)
    fast_fn = lambda p, t: model.logits(p, t, cfg, FastConfig.exact())
    want = jit(_vjp_arch, ("fn", "trainable"))(ref_fn, fast_params, trainable, tok, ct)
    got = jit(_vjp_arch, ("fn", "trainable"))(fast_fn, fast_params, trainable, tok, ct)
    leaves = jax.tree_util.tree_flatten_with_path(got)[0]
    if cfg.qkv_bias:
        assert any(jax.tree_util.keystr(p).endswith("['bq']") for p, _ in leaves)
    for path, g in leaves:
        assert_close(g, _at(want, path), scale=2, err_msg=jax.tree_util.keystr(path))


def test_mode_gate_probabilities_match_ref():
    from mode_jax.ref.mode import mode_hidden as ref_mode_hidden
    params = build("uninit", 0)
    tok = tokens(3, (2, 8))
    fast_probs = jit(lambda p, t: model.mode_hidden(p, t, CFG, FastConfig.exact(), return_probs=True)[1], ())
    ref_probs = jit(lambda p, t: ref_mode_hidden(p, t, CFG, return_probs=True)[1], ())
    got, want = fast_probs(to_fast_jit(params), tok), ref_probs(params, tok)
    for g, w in zip(got, want):
        assert_close(g, w)


def _vjp_ref(params, trainable, tok, ct, lora):
    train, frozen = partition(params, trainable)
    _, vjp = jax.vjp(lambda t: apply(merge(t, frozen), tok, CFG, lora), train)
    grads = vjp(ct)[0]
    # Fill the frozen side with zeros so the tree converts to the fast layout.
    full = merge(grads, jax.tree.map(jnp.zeros_like, frozen))
    return P.partition(P.to_fast(full), trainable)[0]


def _vjp_fast(params, trainable, tok, ct, lora, fast):
    train, frozen = P.partition(params, trainable)
    _, vjp = jax.vjp(lambda t: model.logits(P.merge(t, frozen), tok, CFG, fast, lora), train)
    return vjp(ct)[0]


vjp_ref = jit(_vjp_ref, ("trainable", "lora"))
vjp_fast = jit(_vjp_fast, ("trainable", "lora", "fast"))


@pytest.mark.parametrize("method, trainable", [("full", "full"), ("lora", "lora"),
                                               ("uninit", "experts_and_gates"), ("uninit", "gates")])
@settings(max_examples=3)
@given(merge_kind=st.sampled_from(["fused", "stacked"]), dtype=st.sampled_from(sorted(DTYPES)),
       seed=st.integers(0, 2**16))
def test_gradients_match_ref(method, trainable, merge_kind, dtype, seed):
    if method in ("full", "lora"):
        merge_kind = "fused"          # no blocks: the merge does not exist, compile once per dtype
    params = build(method, seed)
    lora = LORA if method == "lora" else None
    tok = tokens(seed + 3, (2, 8))
    ct = np.random.default_rng(seed + 4).standard_normal((2, 8, CFG.vocab_size)).astype(np.float32)
    fast = dataclasses.replace(DTYPES[dtype], merge=merge_kind)
    want = vjp_ref(params, trainable, tok, ct, lora)
    got = vjp_fast(to_fast_jit(params), trainable, tok, ct, lora, fast)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        w = _at(want, path)
        # bf16 gradients: compare relative to the leaf's scale (sums over many bf16 terms).
        scale = 2 if dtype == "float32" else 2 * max(1.0, _absmax(w))
        assert_close(g, w, dtype=tolerance_dtype(fast), scale=scale, err_msg=jax.tree_util.keystr(path))


# Every concrete policy x loop, and "auto" once (it resolves to one of them: test_auto_loop_and_remat)
@pytest.mark.parametrize("remat, layer_loop", [(r, loop) for r in REMATS if r != "auto"
                                               for loop in LAYER_LOOPS if loop != "auto"] + [("auto", "auto")])
def test_every_remat_policy_and_layer_loop_gives_ref_gradients(remat, layer_loop):
    """Rematerialisation and the loop over layers change what is stored, never the values:
    float32 gradients of full FT, LoRA and MoDE's experts and gates match ref/ under each."""
    fast = FastConfig.exact(remat=remat, layer_loop=layer_loop)
    for method, trainable in (("full", "full"), ("lora", "lora"), ("uninit", "experts_and_gates")):
        params = build(method, 11)
        lora = LORA if method == "lora" else None
        tok = tokens(12, (2, 8))
        ct = np.random.default_rng(13).standard_normal((2, 8, CFG.vocab_size)).astype(np.float32)
        want = vjp_ref(params, trainable, tok, ct, lora)
        got = vjp_fast(to_fast_jit(params), trainable, tok, ct, lora, fast)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
            assert_close(g, _at(want, path), scale=2, err_msg=f"{remat} {method} {jax.tree_util.keystr(path)}")


def test_full_remat_keeps_activations_out_of_memory():
    """remat='full' must really recompute the layers: the compiled gradient's scratch memory
    is a fraction of remat='none''s, and the forward scan stacks nothing but the layer inputs."""
    cfg = LlamaConfig.tiny(n_layers=6)
    params = to_fast_jit(random_params("full", 0, cfg, None, None))
    tok = tokens(0, (4, 128), cfg)

    def temp_bytes(remat):
        fast = FastConfig(remat=remat, layer_loop="scan")
        grad = jax.jit(jax.grad(lambda p: jnp.sum(model.hidden(p, tok, cfg, fast).astype(jnp.float32) ** 2)))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    none, full = temp_bytes("none"), temp_bytes("full")
    assert full < 0.4 * none, (full, none)
    fast = FastConfig(remat="full", layer_loop="scan")
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.hidden(p, tok, cfg, fast).astype(jnp.float32))))(params)
    forward_scan = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan")
    stacked = [v.aval.shape for v in forward_scan.outvars[1:]]
    assert stacked == [(cfg.n_layers, *tok.shape, cfg.d_model)], stacked


def _absmax(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float32))))


def _at(tree, path):
    for k in path:
        tree = tree[k.key if hasattr(k, "key") else k.idx]
    return tree


# --- the fused merge on its own -----------------------------------------------------------

def merge_inputs(seed, b, t, d, f, n, dtype):
    rng = np.random.default_rng(seed)
    shapes = [(b, t, n + 1), (b, t, d), (b, t, f), (f, d), (n, b, t, d), (n, b, t, f), (n, f, d)]
    out = [(2 * rng.standard_normal(shapes[0])).astype(np.float32)]
    out += [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes[1:]]
    return out


def _merge_and_cotangents(merge_fn, args, dy):
    y, vjp = jax.vjp(merge_fn, *args)
    return y, vjp(dy)


merge_and_cotangents = jit(_merge_and_cotangents, ("merge_fn",))


@settings(max_examples=8)
@given(dims=st.sampled_from([(2, 3, 4, 8), (1, 5, 8, 16)]), n=st.sampled_from([1, 3]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), seed=st.integers(0, 2**16))
def test_fused_merge_matches_reference(dims, n, dtype, seed):
    """Forward and every input's cotangent against h_e materialised (fused_merge_reference)."""
    args = merge_inputs(seed, *dims, n, dtype)
    dy = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(dims[:2] + (dims[2],)), dtype)
    y, cts = merge_and_cotangents(fused_merge, args, dy)
    y_ref, cts_ref = merge_and_cotangents(fused_merge_reference, args, dy)
    assert y.dtype == dtype and y.shape == dims[:2] + (dims[2],)
    assert_close(y, y_ref.astype(jnp.float32), dtype=dtype, scale=2)
    for name, g, w in zip(["logits", "r_bb", "u_bb", "w_bb", "r_ex", "u_ex", "w_ex"], cts, cts_ref):
        assert g.dtype == w.dtype, name
        assert_close(g, w.astype(jnp.float32), dtype=dtype, scale=4 * max(1.0, _absmax(w)),
                     err_msg=name)


def test_fused_merge_by_hand():
    # One token, D = 1, F = 1, N = 1; logits [0, ln 3] -> a = [1/4, 3/4].
    # h_0 = 1 + 2 * 3 = 7, h_1 = -1 + 1 * 5 = 4; y = 7/4 + 12/4 = 4.75.
    args = [jnp.array([[[0.0, np.log(3.0)]]]), jnp.array([[[1.0]]]), jnp.array([[[2.0]]]), jnp.array([[3.0]]),
            jnp.array([[[[-1.0]]]]), jnp.array([[[[1.0]]]]), jnp.array([[[5.0]]])]
    assert_close(fused_merge(*args), [[[4.75]]])
    # dy = 1: d a = h = [7, 4]; d logits = a (h - a.h) = [1/4 (7 - 4.75), 3/4 (4 - 4.75)].
    d_logits = jax.grad(lambda lg: fused_merge(lg, *args[1:]).sum())(args[0])
    assert_close(d_logits, [[[0.5625, -0.5625]]])


def _dot_output_shapes(jaxpr):
    """Output shapes of every dot_general, in sub-jaxprs too (scan bodies, custom rules)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield tuple(eqn.outvars[0].aval.shape)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _dot_output_shapes(sub)


def test_fused_merge_skips_frozen_weight_gradients():
    """Differentiating only logits and the experts' weights: exactly three matmuls (y, ds, the
    experts' dW) and none shaped like the backbone's [F, D] weight or its cotangent."""
    args = merge_inputs(0, 2, 3, 4, 8, 2, jnp.float32)
    f = lambda lg, w_ex: jnp.sum(fused_merge(lg, *args[1:6], w_ex) ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(args[0], args[6]).jaxpr
    shapes = list(_dot_output_shapes(jaxpr))
    assert sorted(shapes) == sorted([(2, 3, 4), (2, 3, 24), (16, 4)]), shapes


def test_pick_attention_implementation():
    # On this CPU suite 'auto' is always XLA; explicit choices pass through.
    assert pick_implementation("auto", dtype=jnp.bfloat16, head_dim=64) == \
        ("cudnn" if jax.default_backend() == "gpu" else "xla")
    assert pick_implementation("auto", dtype=jnp.float32, head_dim=64) == "xla"
    assert pick_implementation("xla", dtype=jnp.bfloat16, head_dim=64) == "xla"


def test_auto_loop_and_remat():
    """'auto' is the Python loop without remat on a GPU, scan with full remat elsewhere;
    explicit choices pass through."""
    assert FastConfig().loop_and_remat("gpu") == ("python", "none")
    assert FastConfig().loop_and_remat("cpu") == ("scan", "full")
    assert FastConfig().loop_and_remat("tpu") == ("scan", "full")
    assert FastConfig(layer_loop="python").loop_and_remat("cpu") == ("python", "none")
    assert FastConfig(remat="dots").loop_and_remat("gpu") == ("python", "dots")


@pytest.mark.parametrize("kwargs, message", [
    (dict(compute_dtype="int8"), "compute_dtype must be a float dtype"),
    (dict(merge="sum"), "merge must be one of"),
    (dict(attention="flash"), "attention must be one of"),
    (dict(loss_chunk=0), "loss_chunk must be a positive integer"),
    (dict(remat="some"), "remat must be one of"),
    (dict(layer_loop="while"), "layer_loop must be one of"),
    (dict(fuse_projections=1), "fuse_projections must be a bool"),
])
def test_fast_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FastConfig(**kwargs)


def test_model_errors():
    params = to_fast_jit(build("lora", 0))
    tok = tokens(1, (1, 4))
    with pytest.raises(ValueError, match="no LoraConfig was given"):
        model.hidden(params, tok, CFG, FastConfig.exact())
    with pytest.raises(NotImplementedError, match="MoDE over a LoRA-adapted backbone"):
        model.hidden({**params, "blocks": {}}, tok, CFG, FastConfig.exact(), LORA)


def test_fused_merge_rejects_mismatched_experts():
    args = merge_inputs(0, 2, 3, 4, 8, 2, jnp.float32)
    with pytest.raises(ValueError, match="E = N \\+ 1"):
        fused_merge(args[0][..., :2], *args[1:])

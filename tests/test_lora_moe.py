"""LoRA-MoE (ref/lora_moe.py, fast/lora_moe.py): the reference pinned by hand and by an
independent float64 NumPy model, and the fast path against the reference, forward and
gradients (float32 and bf16), over shapes, expert counts and LoRA targets drawn by hypothesis.

Parameters are random with no zero LoRA B and no zero router (tests/test_fast_params.py's
`random_params`), so every term of y = x W + sum_j g_j s (x A_j) B_j matters.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mode_jax.fast import params as P
from mode_jax.ref.config import LlamaConfig, LoraConfig, ModeConfig
from mode_jax.ref.lora import lora_merge
from mode_jax.ref.lora_moe import init_lora_moe, mixed_projection, router_probs
from mode_jax.ref.llama import llama_forward
from mode_jax.ref.methods import METHODS, apply, init_method, partition
from tests import numpy_llama
from tests.test_fast_model import CFG as FAST_MODEL_CFG
from tests.test_fast_model import DTYPES, fast_logits, jit, ref_logits, tolerance_dtype, vjp_fast, vjp_ref
from tests.test_fast_params import random_params, to_fast_jit, trained_loras
from tests.tolerances import PROBABILITY_SUM, assert_close

CFG = LlamaConfig.tiny()                  # 4 layers, D 32, F 64, 4 query heads of 8, 2 kv heads
LORA = LoraConfig(rank=4, alpha=8.0)
assert CFG == FAST_MODEL_CFG              # the shared jitted helpers below are built for it


def build(seed, n_experts=2, lora=LORA, cfg=CFG):
    return random_params("lora_moe", seed, cfg, ModeConfig(n_blocks=2, expert_layers=1, n_experts=n_experts), lora)


def tokens(seed, shape):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, shape).astype(np.int32)


# --- the reference, by hand --------------------------------------------------------------

def test_router_and_mixed_projection_by_hand():
    # xn = x = [1, 2]; router columns [0, 0] and [ln 3, 0]: logits [0, ln 3] -> g = [1/4, 3/4].
    x = jnp.array([[[1.0, 2.0]]])                                                   # [B=1, T=1, D=2]
    g = router_probs(jnp.array([[0.0, np.log(3.0)], [0.0, 0.0]]), x)
    assert_close(g, [[[0.25, 0.75]]])
    # W = I: x W = [1, 2]. Adapter 1: A = [1, 0]^T, B = [1, 1]: x A B = 1 * [1, 1] = [1, 1].
    # Adapter 2: A = [0, 1]^T, B = [2, -1]: x A B = 2 * [2, -1] = [4, -2].
    # scale 2: y = [1, 2] + 2 (1/4 [1, 1] + 3/4 [4, -2]) = [1, 2] + [6.5, -2.5] = [7.5, -0.5].
    layer = {"wq": jnp.eye(2)}
    adapters = [{"wq": {"a": jnp.array([[1.0], [0.0]]), "b": jnp.array([[1.0, 1.0]])}},
                {"wq": {"a": jnp.array([[0.0], [1.0]]), "b": jnp.array([[2.0, -1.0]])}}]
    assert_close(mixed_projection(layer, adapters, g, x, "wq", scale=2.0), [[[7.5, -0.5]]])
    # A projection no adapter names is the plain one.
    assert_close(mixed_projection({"wk": jnp.eye(2)}, adapters, g, x, "wk", scale=2.0), [[[1.0, 2.0]]])


def _np_forward(params, tok, cfg, lora):
    """One sequence, float64 NumPy, from the definition: per token t the merged weights
    W_t = W + s sum_j g_tj A_j B_j (not ref's (x A) B order), attention by explicit loops."""
    bb, s = params["backbone"], lora.alpha / lora.rank
    x = bb["embed"][tok]
    t = len(tok)
    freqs = numpy_llama.frequencies(cfg)
    for p, mix in zip(bb["layers"], params["lora_moe"]["layers"]):
        xn = numpy_llama.rms_norm(x, p["attn_norm"], cfg.norm_eps)
        z = xn @ mix["gate_w"]
        g = np.exp(z - z.max(-1, keepdims=True))
        g /= g.sum(-1, keepdims=True)                                               # [T, N]

        def proj(h, name):
            w = np.stack([p[name] + s * sum(g[i, j] * ad[name]["a"] @ ad[name]["b"]
                                            for j, ad in enumerate(mix["adapters"]) if name in ad)
                          for i in range(t)])                                       # [T, in, out]
            return np.einsum("ti,tio->to", h, w)

        nh, kh, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, k, v = (proj(xn, n).reshape(t, -1, hd) for n in ("wq", "wk", "wv"))
        out = np.zeros((t, nh, hd))
        for n in range(nh):
            kv = n // (nh // kh)
            qs = np.stack([numpy_llama.rotate(q[i, n], i, cfg.rope_theta, freqs) for i in range(t)])
            ks = np.stack([numpy_llama.rotate(k[i, kv], i, cfg.rope_theta, freqs) for i in range(t)])
            for i in range(t):
                sc = qs[i] @ ks[:i + 1].T / np.sqrt(hd)
                a = np.exp(sc - sc.max())
                out[i, n] = (a / a.sum()) @ v[:i + 1, kv]
        h = x + proj(out.reshape(t, nh * hd), "wo")
        u = numpy_llama.rms_norm(h, p["mlp_norm"], cfg.norm_eps)
        gate = proj(u, "w_gate")
        x = h + proj(gate / (1 + np.exp(-gate)) * proj(u, "w_up"), "w_down")
    return numpy_llama.head(bb, x, cfg)


@pytest.mark.parametrize("targets", ["attn", "attn_mlp"])
def test_ref_forward_matches_float64_numpy(targets):
    lora = LoraConfig(rank=4, alpha=8.0, targets=targets)
    params = build(0, n_experts=3, lora=lora)
    tok = tokens(1, (2, 7))
    logits = ref_logits(params, tok, CFG, lora)
    npp = numpy_llama.to_numpy(params)
    for b in range(tok.shape[0]):
        assert_close(logits[b], _np_forward(npp, tok[b], CFG, lora), scale=5)


def test_init_starts_as_the_average_of_the_stage1_loras():
    """A zero router mixes uniformly: the model is the backbone with each LoRA's delta at 1/N
    of its scale (ref/lora.py's merge, alpha / N); identical LoRAs give that LoRA whatever
    the router says."""
    backbone = random_params("full", 3)["backbone"]
    stage1 = trained_loras(backbone, seeds=(7, 8, 9))
    params = init_method("lora_moe", jax.random.key(0), backbone, CFG, lora=LORA, stage1=stage1)
    assert all(np.all(np.asarray(layer["gate_w"]) == 0) for layer in params["lora_moe"]["layers"])
    third = dataclasses.replace(LORA, alpha=LORA.alpha / 3)
    merged = backbone
    for s in stage1:
        merged = lora_merge(merged, s["lora"], third)
    tok = tokens(2, (2, 6))
    assert_close(ref_logits(params, tok, CFG, LORA), llama_forward(merged, tok, CFG), scale=5)

    same = init_lora_moe([stage1[0]["lora"]] * 2, CFG, LORA)
    for layer in same["layers"]:
        layer["gate_w"] = jnp.asarray(np.random.default_rng(3).standard_normal(layer["gate_w"].shape), jnp.float32)
    assert_close(ref_logits({"backbone": backbone, "lora_moe": same}, tok, CFG, LORA),
                 apply(stage1[0], tok, CFG, LORA), scale=5)


def test_methods_and_partitions():
    assert METHODS["lora_moe"] == "lora_moe" and METHODS["lora_moe_frozen"] == "lora_moe_routers"
    params = build(4)
    routers, _ = partition(params, "lora_moe_routers")
    names = {jax.tree_util.keystr(p[-1:]) for p, _ in jax.tree_util.tree_flatten_with_path(routers)[0]}
    assert names == {"['gate_w']"} and len(jax.tree.leaves(routers)) == CFG.n_layers
    everything, frozen = partition(params, "lora_moe")
    assert len(jax.tree.leaves(everything)) == CFG.n_layers * (1 + 2 * 2 * len(LORA.matrices))
    assert jax.tree.leaves(frozen["lora_moe"]) == []
    with pytest.raises(ValueError, match="needs a LoraConfig and the trained per-domain lora models"):
        init_method("lora_moe", jax.random.key(0), params["backbone"], CFG, lora=LORA)
    only_wq = {"layers": [{"wq": layer["adapters"][0]["wq"]} for layer in params["lora_moe"]["layers"]]}
    with pytest.raises(ValueError, match="adapts"):
        init_lora_moe([only_wq], CFG, LORA)          # LoRA targets 'attn' adapt q, k, v and o
    with pytest.raises(ValueError, match="no LoraConfig"):
        apply(params, tokens(0, (1, 4)), CFG)


# --- the fast path against the reference -------------------------------------------------

def test_stacked_layout_round_trip_is_exact():
    params = build(5, n_experts=3)
    fast = P.to_fast(params)
    layers = fast["lora_moe"]["layers"]
    assert layers["gate_w"].shape == (CFG.n_layers, CFG.d_model, 3)
    assert layers["wk"]["a"].shape == (CFG.n_layers, 3, CFG.d_model, LORA.rank)
    assert layers["wk"]["b"].shape == (CFG.n_layers, 3, LORA.rank, CFG.n_kv_heads * CFG.head_dim)
    back = P.to_ref(fast)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), y)


@settings(max_examples=2)
@given(shape=st.sampled_from([(2, 8), (1, 11)]), n_experts=st.sampled_from([1, 3]),
       targets=st.sampled_from(["attn", "attn_mlp"]), dtype=st.sampled_from(sorted(DTYPES)),
       seed=st.integers(0, 2**16))
def test_fast_forward_matches_ref(shape, n_experts, targets, dtype, seed):
    lora = LoraConfig(rank=4, alpha=8.0, targets=targets)
    params = build(seed, n_experts, lora)
    tok = tokens(seed + 1, shape)
    fast = DTYPES[dtype]
    got = fast_logits(to_fast_jit(params), tok, CFG, fast, lora)
    tol_dtype = tolerance_dtype(fast)
    assert_close(got, ref_logits(params, tok, CFG, lora), dtype=tol_dtype, scale=2)


# Each pairing once (every compile costs seconds on CPU); hypothesis draws the rest.
@pytest.mark.parametrize("trainable, dtype", [("lora_moe", "float32"), ("lora_moe_routers", "bfloat16")])
@settings(max_examples=1)
@given(targets=st.sampled_from(["attn", "attn_mlp"]), layer_loop=st.sampled_from(["scan", "python"]),
       seed=st.integers(0, 2**16))
def test_fast_gradients_match_ref(trainable, dtype, targets, layer_loop, seed):
    lora = LoraConfig(rank=4, alpha=8.0, targets=targets)
    params = build(seed, 2, lora)
    tok = tokens(seed + 3, (2, 8))
    ct = np.random.default_rng(seed + 4).standard_normal((2, 8, CFG.vocab_size)).astype(np.float32)
    fast = dataclasses.replace(DTYPES[dtype], layer_loop=layer_loop)
    want = vjp_ref(params, trainable, tok, ct, lora)
    got = vjp_fast(to_fast_jit(params), trainable, tok, ct, lora, fast)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    tol_dtype = tolerance_dtype(fast)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        # bf16 gradients: relative to the leaf's scale (sums over many bf16 terms), as test_fast_model.
        w = np.asarray(w, np.float64)
        scale = 2 if dtype == "float32" else 2 * max(1.0, float(np.abs(w).max()))
        assert_close(g, w, dtype=tol_dtype, scale=scale, err_msg=jax.tree_util.keystr(path))


def test_eval_step_reports_router_weights_per_layer():
    """The fast eval step (fast/steps.py) gives the mean router weights [L, N] (what the
    routers learned), equal to ref/train.py's, each row a distribution."""
    from mode_jax.fast import steps as S
    from mode_jax.ref import train as RT
    from mode_jax.ref.config import OptimConfig
    params = build(8, n_experts=3)
    tok = tokens(9, (2, 9))
    want = jit(RT.batch_metrics, ("cfg", "lora", "with_routing"))(params, {"tokens": tok}, CFG, LORA, with_routing=True)
    assert want["routing"].shape == (CFG.n_layers, 3)
    np.testing.assert_allclose(np.asarray(want["routing"]).sum(-1), 1.0, **PROBABILITY_SUM)
    steps = S.make_steps("lora_moe", CFG, opt=OptimConfig(), lora=LORA, backend="fast", compute_dtype="float32")
    got = steps.eval_step(steps.to_backend(params), tok)
    for key in ("loss", "routing"):
        assert_close(got[key], want[key], err_msg=key)

"""fast/params.py: the stacked layout, its exact round trip to ref/, and the partitions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mode_jax.fast import params as P
from mode_jax.fast.optim import decay_mask
from mode_jax.ref.config import LlamaConfig, LoraConfig, ModeConfig
from mode_jax.ref.expansion import ExpansionConfig
from mode_jax.ref.llama import init_llama, layer_shapes, param_shapes
from mode_jax.ref.methods import METHODS, TRAINABLE, init_method, partition

CFG = LlamaConfig.tiny()                                   # 4 layers, D 32, F 64, 4 x 8 query heads, 2 kv
MODE = ModeConfig(n_blocks=2, expert_layers=1, n_experts=2)
LORA = LoraConfig(rank=4, alpha=8.0)
EXPANSION = ExpansionConfig(every=2)                       # block expansion: new layers after 1 and 3


# --- random params for the fast-vs-ref tests -------------------------------------------------
# Built with NumPy: eager JAX init compiles every op per shape, which costs the suite more
# than the comparisons themselves. No leaf is zero or one (LoRA's B and the gate start
# nonzero here), so every term of every function matters.

def random_params(method: str, seed: int, cfg: LlamaConfig = CFG, mode: ModeConfig = MODE,
                  lora: LoraConfig = LORA) -> dict:
    """A ref-layout param tree for `method`'s family: 'full' (backbone), 'lora', or MoDE
    (any other name: backbone + mode.n_experts experts of mode.expert_layers layers)."""
    rng = np.random.default_rng(seed)

    def leaf(name, shape):
        if name.endswith("norm"):
            return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)

    def layer():
        return {k: leaf(k, s) for k, s in layer_shapes(cfg).items()}

    shapes = param_shapes(cfg)
    backbone = {k: leaf(k, s) for k, s in shapes.items() if k != "layers"}
    backbone["layers"] = [layer() for _ in range(cfg.n_layers)]
    params = {"backbone": backbone}
    def adapters():
        ls = layer_shapes(cfg)
        return {"layers": [
            {m: {"a": (rng.standard_normal((ls[m][0], lora.rank)) / np.sqrt(ls[m][0])).astype(np.float32),
                 "b": (0.05 * rng.standard_normal((lora.rank, ls[m][1]))).astype(np.float32)}
             for m in lora.matrices} for _ in range(cfg.n_layers)]}

    if method == "lora":
        params["lora"] = adapters()
    elif method.startswith("lora_moe"):
        # mode.n_experts per-domain LoRAs (ref/lora_moe.py) and a random router per layer.
        loras = [adapters() for _ in range(mode.n_experts)]
        params["lora_moe"] = {"layers": [
            {"gate_w": (0.5 * rng.standard_normal((cfg.d_model, mode.n_experts))).astype(np.float32),
             "adapters": [a["layers"][i] for a in loras]} for i in range(cfg.n_layers)]}
    elif method.startswith("btx"):
        # BTX (ref/btx.py): a copy of every MLP (btx_branch), or seed + mode.n_experts MLPs and a router.
        e = 1 if method == "btx_branch" else mode.n_experts + 1
        mlp = {k: layer_shapes(cfg)[k] for k in ("w_gate", "w_up", "w_down")}
        router = {} if e == 1 else {"gate_w": (0.5 * rng.standard_normal((cfg.d_model, e))).astype(np.float32)}
        params["btx"] = {"layers": [{"mlps": [{k: leaf(k, s) for k, s in mlp.items()} for _ in range(e)], **router}
                                    for _ in range(cfg.n_layers)]}
    elif method == "block_expansion":
        # New layers (ref/expansion.py), random as if trained: no zero wo / w_down.
        params["expansion"] = {"layers": [layer() for _ in range(cfg.n_layers // EXPANSION.every)]}
    elif method != "full":
        e = mode.n_experts + 1
        params["blocks"] = [{"experts": [[layer() for _ in range(mode.expert_layers)] for _ in range(mode.n_experts)],
                             "gate_w": (0.5 * rng.standard_normal((cfg.d_model, e))).astype(np.float32),
                             "gate_b": rng.standard_normal((e,)).astype(np.float32)}
                            for _ in range(mode.n_blocks)]
    return params


to_fast_jit = jax.jit(P.to_fast, static_argnames="expert_layers")


def build(method, cfg=CFG, mode=MODE):
    backbone = init_llama(jax.random.key(1), cfg)
    stage1 = None
    if method.startswith("stage2"):
        stage1 = [init_method("stage1", jax.random.key(s), backbone, cfg, mode=mode) for s in (5, 6)]
    if method.startswith("lora_moe"):
        stage1 = trained_loras(backbone, cfg)
    if method == "btx":
        stage1 = [random_params("btx_branch", s, cfg, mode) for s in (5, 6)]   # branches moved apart
    return init_method(method, jax.random.key(0), backbone, cfg, mode=mode, lora=LORA, stage1=stage1,
                       expansion=EXPANSION)


def trained_loras(backbone, cfg=CFG, lora=LORA, seeds=(5, 6)):
    """Per-domain `lora` models around `backbone`, B nonzero as if trained (init_lora's B is
    zero, which would leave a LoRA mixture's routers without a gradient)."""
    return [{"backbone": backbone, "lora": random_params("lora", s, cfg, MODE, lora)["lora"]} for s in seeds]


def assert_trees_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("method", list(METHODS))
def test_round_trip_is_exact(method):
    params = build(method)
    fast = P.to_fast(params)
    assert_trees_identical(P.to_ref(fast), params)
    assert_trees_identical(P.to_fast(P.to_ref(fast)), fast)


def test_layout_shapes():
    params = P.to_fast(build("stage2"))
    L, D, F, Q, KV = CFG.n_layers, CFG.d_model, CFG.d_ff, CFG.n_heads * CFG.head_dim, CFG.n_kv_heads * CFG.head_dim
    layers = params["backbone"]["layers"]
    assert layers["wq"].shape == (L, D, Q) and layers["wk"].shape == (L, D, KV)
    assert layers["wo"].shape == (L, Q, D) and layers["w_down"].shape == (L, F, D)
    assert layers["attn_norm"].shape == (L, D)
    experts = params["blocks"]["experts"]
    assert experts["w_gate"].shape == (MODE.n_blocks, 2, MODE.expert_layers, D, F)
    assert params["blocks"]["gate_w"].shape == (MODE.n_blocks, D, 3)
    assert params["blocks"]["gate_b"].shape == (MODE.n_blocks, 3)
    lora = P.to_fast(build("lora"))["lora"]["layers"]
    assert set(lora) == set(LORA.matrices)
    assert lora["wk"]["a"].shape == (L, D, LORA.rank) and lora["wk"]["b"].shape == (L, LORA.rank, KV)


def test_untied_head_round_trip():
    cfg = LlamaConfig.tiny(tie_embeddings=False)
    params = {"backbone": init_llama(jax.random.key(0), cfg)}
    fast = P.to_fast(params)
    assert fast["backbone"]["lm_head"].shape == (cfg.d_model, cfg.vocab_size)
    assert_trees_identical(P.to_ref(fast), params)
    assert_trees_identical(P.to_ref(P.to_fast(params["backbone"])), params["backbone"])   # bare backbone


def test_zero_experts_round_trip():
    params = build("uninit", mode=dataclasses.replace(MODE, n_experts=0, expert_layers=2))
    fast = P.to_fast(params, expert_layers=2)
    assert fast["blocks"]["experts"]["wq"].shape == (MODE.n_blocks, 0, 2, CFG.d_model, CFG.d_model)
    assert fast["blocks"]["gate_w"].shape == (MODE.n_blocks, CFG.d_model, 1)
    assert_trees_identical(P.to_ref(fast), params)


@pytest.mark.parametrize("method", list(METHODS))
def test_partition_matches_ref(method):
    """The fast partition selects exactly the leaves ref/methods.py trains, and merges back."""
    params = build(method)
    fast = P.to_fast(params)
    train, frozen = P.partition(fast, METHODS[method])
    ref_train, _ = partition(params, METHODS[method])
    assert P.count_params(train) == P.count_params(ref_train) > 0
    assert_trees_identical(P.merge(train, frozen), fast)
    mask = P.trainable_mask(fast, METHODS[method])
    assert sum(jax.tree.leaves(mask)) == len(jax.tree.leaves(train))


def test_trainable_names_and_errors():
    assert set(P.TRAINABLE_NAMES) == set(TRAINABLE)
    fast = P.to_fast(build("stage1"))
    gates, _ = P.partition(fast, "gates")
    assert {jax.tree_util.keystr(p[-1:]) for p, _ in jax.tree_util.tree_flatten_with_path(gates)[0]} \
        == {"['gate_w']", "['gate_b']"}
    with pytest.raises(ValueError, match="trainable must be one of"):
        P.trainable_mask(fast, "everything")
    with pytest.raises(ValueError, match="same number of experts"):
        P.blocks_to_fast([{"experts": [[]], "gate_w": jnp.zeros((2, 2)), "gate_b": jnp.zeros(2)},
                          {"experts": [], "gate_w": jnp.zeros((2, 1)), "gate_b": jnp.zeros(1)}],
                         init_llama(jax.random.key(0), CFG)["layers"][0])


@pytest.mark.parametrize("method", ["stage2", "lora", "full"])
def test_decay_mask_follows_ref_rank(method):
    """Weight decay applies to a leaf iff its ref/ counterpart has rank >= 2 (stacked norms
    [L, D] and gate biases [n_blocks, E] are vectors per layer)."""
    params = build(method)
    expected = [x.ndim >= 2 for x in jax.tree.leaves(params)]
    got = jax.tree.leaves(P.to_ref(_broadcast_mask(P.to_fast(params))))
    flat = [bool(np.all(np.asarray(g))) for g in got]
    assert flat == expected


def _broadcast_mask(fast):
    """decay_mask as arrays of the leaves' shapes, so to_ref can unstack it."""
    mask = decay_mask(fast)
    return jax.tree.map(lambda m, x: jnp.full(x.shape, m), mask, fast)

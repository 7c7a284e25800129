"""The stacked parameter layout of `mode_jax.fast`, and exact conversions to and from `ref/`.

`ref/` keeps layers in Python lists (one dict per layer); `fast/` stacks every
per-layer array on leading axes so a model runs as `lax.scan` over layers and
`vmap` over experts. Arrays are only stacked or unstacked, never cast, so
`to_ref(to_fast(p))` returns `p` bit for bit.

    backbone  {"embed": [V, D], "final_norm": [D], "lm_head": [D, V] (untied only),
               "layers": {"attn_norm": [L, D], "wq": [L, D, N*H], "wk": [L, D, K*H],
                          "wv": [L, D, K*H], "wo": [L, N*H, D], "mlp_norm": [L, D],
                          "w_gate": [L, D, F], "w_up": [L, D, F], "w_down": [L, F, D]}}
    MoDE      {"backbone": <backbone>,
               "blocks": {"experts": {key: [n_blocks, N, expert_layers, ...]},
                          "gate_w": [n_blocks, D, E], "gate_b": [n_blocks, E]}}
              (E = N + 1, column 0 the backbone)
    LoRA      {"backbone": <backbone>,
               "lora": {"layers": {name: {"a": [L, in, R], "b": [L, R, out]}}}}
    expansion {"backbone": <backbone>, "expansion": {"layers": {key: [n_new, ...]}}}
               (block expansion, ref/expansion.py: new layer j after backbone layer (j + 1) L / n_new - 1)
    LoRA-MoE  {"backbone": <backbone>, "lora_moe": {"layers": {"gate_w": [L, D, N],
               name: {"a": [L, N, in, R], "b": [L, N, R, out]}}}}  (ref/lora_moe.py; fast/lora_moe.py)
    BTX       {"backbone": <backbone>, "btx": {"mlps": {key: [L, E, ...]}, "gate_w": [L, D, E]}}
               (ref/btx.py; layout in fast/btx_layout.py; stage 1 has E = 1 and no gate_w)

Which leaves train is the same partition as `ref/methods.py` (`TRAINABLE`): its
predicates read only the first and last key of a leaf's path, which mean the same
thing in both layouts ("backbone", "blocks", "lora"; "gate_w", "gate_b").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mode_jax.fast import btx_layout
from mode_jax.fast import lora_moe
from mode_jax.ref import methods as ref_methods
from mode_jax.ref.llama import LAYER_KEYS

TRAINABLE_NAMES = tuple(ref_methods.TRAINABLE)


def _stack(dicts: list[dict], keys, empty_shapes: dict | None = None) -> dict:
    """[{k: [...]}, ...] -> {k: [len, ...]}; `empty_shapes` gives shapes when the list is empty.
    Keys the dicts hold beyond `keys` (Qwen2's biases "bq", "bk", "bv") are stacked too."""
    if not dicts:
        return {k: jnp.zeros((0, *empty_shapes[k][0]), empty_shapes[k][1]) for k in keys}
    keys = tuple(keys) + tuple(k for k in dicts[0] if k not in keys)
    return {k: jnp.stack([d[k] for d in dicts]) for k in keys}


def _unstack(stacked: dict, n: int) -> list[dict]:
    return [{k: v[i] for k, v in stacked.items()} for i in range(n)]


def backbone_to_fast(backbone: dict) -> dict:
    """A ref Llama param tree (layers as a list) -> the stacked layout."""
    out = {k: v for k, v in backbone.items() if k != "layers"}
    out["layers"] = _stack(backbone["layers"], LAYER_KEYS)
    return out


def backbone_to_ref(backbone: dict) -> dict:
    out = {k: v for k, v in backbone.items() if k != "layers"}
    n_layers = backbone["layers"]["wq"].shape[0]
    out["layers"] = _unstack(backbone["layers"], n_layers)
    return out


def blocks_to_fast(blocks: list[dict], backbone_layer: dict, *, expert_layers: int | None = None) -> dict:
    """ref MoDE blocks -> {"experts": {k: [n_blocks, N, expert_layers, ...]}, "gate_w", "gate_b"}.

    With N = 0 the expert arrays have size 0 and nothing says how deep an expert
    would be: `expert_layers` (default 0) fills that axis. `backbone_layer` (one
    ref layer dict) gives the per-layer shapes and dtypes then.
    """
    n_experts = {len(b["experts"]) for b in blocks}
    if len(n_experts) != 1:
        raise ValueError(f"every block must hold the same number of experts, got {sorted(n_experts)}")
    depth = {len(e) for b in blocks for e in b["experts"]}
    if len(depth) > 1:
        raise ValueError(f"every expert must have the same number of layers, got {sorted(depth)}")
    if depth:
        expert_layers = depth.pop()
    elif expert_layers is None:
        expert_layers = 0
    layer_spec = {k: (v.shape, v.dtype) for k, v in backbone_layer.items()}
    per_block = []
    for b in blocks:
        # [N, expert_layers, ...] for this block.
        experts = [_stack(e, LAYER_KEYS) for e in b["experts"]]
        if experts:
            per_block.append(_stack(experts, LAYER_KEYS))
        else:
            per_block.append({k: jnp.zeros((0, expert_layers, *s), dt) for k, (s, dt) in layer_spec.items()})
    return {"experts": _stack(per_block, LAYER_KEYS),
            "gate_w": jnp.stack([b["gate_w"] for b in blocks]),
            "gate_b": jnp.stack([b["gate_b"] for b in blocks])}


def blocks_to_ref(blocks: dict) -> list[dict]:
    n_blocks, n_experts, expert_layers = blocks["experts"]["wq"].shape[:3]
    out = []
    for i in range(n_blocks):
        experts = [_unstack({k: v[i, j] for k, v in blocks["experts"].items()}, expert_layers)
                   for j in range(n_experts)]
        out.append({"experts": experts, "gate_w": blocks["gate_w"][i], "gate_b": blocks["gate_b"][i]})
    return out


def lora_to_fast(adapters: dict) -> dict:
    names = tuple(adapters["layers"][0]) if adapters["layers"] else ()
    return {"layers": {name: {"a": jnp.stack([l[name]["a"] for l in adapters["layers"]]),
                              "b": jnp.stack([l[name]["b"] for l in adapters["layers"]])}
                       for name in names}}


def lora_to_ref(adapters: dict) -> dict:
    layers = adapters["layers"]
    if not layers:
        return {"layers": []}
    n_layers = next(iter(layers.values()))["a"].shape[0]
    return {"layers": [{name: {"a": ab["a"][i], "b": ab["b"][i]} for name, ab in layers.items()}
                       for i in range(n_layers)]}


def _is_backbone(tree: dict) -> bool:
    return "embed" in tree and "layers" in tree


def to_fast(ref_params: dict, *, expert_layers: int | None = None) -> dict:
    """A ref param tree (a bare backbone, or a method tree {"backbone", ["blocks"], ["lora"]})
    -> the same tree in the stacked layout. `expert_layers` only matters for N = 0 experts."""
    if _is_backbone(ref_params):
        return backbone_to_fast(ref_params)
    out = {"backbone": backbone_to_fast(ref_params["backbone"])}
    if "blocks" in ref_params:
        out["blocks"] = blocks_to_fast(ref_params["blocks"], ref_params["backbone"]["layers"][0],
                                       expert_layers=expert_layers)
    if "lora" in ref_params:
        out["lora"] = lora_to_fast(ref_params["lora"])
    if "lora_moe" in ref_params:
        out["lora_moe"] = lora_moe.to_fast(ref_params["lora_moe"])
    if "expansion" in ref_params:
        out["expansion"] = {"layers": _stack(ref_params["expansion"]["layers"], LAYER_KEYS)}
    if "btx" in ref_params:
        out["btx"] = btx_layout.to_fast(ref_params["btx"])
    unknown = set(ref_params) - {"backbone", "blocks", "lora", "lora_moe", "expansion", "btx"}
    if unknown:
        raise ValueError(f"to_fast: unknown top-level keys {sorted(unknown)}")
    return out


def to_ref(fast_params: dict) -> dict:
    """Inverse of `to_fast`."""
    if _is_backbone(fast_params):
        return backbone_to_ref(fast_params)
    out = {"backbone": backbone_to_ref(fast_params["backbone"])}
    if "blocks" in fast_params:
        out["blocks"] = blocks_to_ref(fast_params["blocks"])
    if "lora" in fast_params:
        out["lora"] = lora_to_ref(fast_params["lora"])
    if "lora_moe" in fast_params:
        out["lora_moe"] = lora_moe.to_ref(fast_params["lora_moe"])
    if "expansion" in fast_params:
        new = fast_params["expansion"]["layers"]
        out["expansion"] = {"layers": _unstack(new, new["wq"].shape[0])}
    if "btx" in fast_params:
        out["btx"] = btx_layout.to_ref(fast_params["btx"])
    return out


# --- which leaves train (the partition of ref/methods.py, on the stacked tree) ----------

def trainable_mask(params: dict, trainable: str) -> dict:
    """A tree of bools, True where the leaf trains under `trainable` (a ref TRAINABLE name)."""
    if trainable not in ref_methods.TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE_NAMES}, got {trainable!r}")
    pred = ref_methods.TRAINABLE[trainable]
    return jax.tree_util.tree_map_with_path(lambda p, _: bool(pred(ref_methods._keys(p))), params)


def partition(params: dict, trainable: str) -> tuple[dict, dict]:
    """(trainable, frozen) trees of params' structure, None where a leaf is on the other side."""
    return ref_methods.partition(params, trainable)


def merge(trainable: dict, frozen: dict) -> dict:
    """Inverse of `partition`."""
    return ref_methods.merge(trainable, frozen)


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def stacked_axes(path) -> int:
    """How many leading axes of the leaf at `path` stack per-layer arrays
    (layers: 1; experts: blocks, experts, layers = 3; gates: blocks = 1)."""
    keys = ref_methods._keys(path)
    if "experts" in keys:
        return 3
    if "mlps" in keys:          # BTX's MLP experts: layers, experts
        return 2
    if "layers" in keys or keys[-1] in ("gate_w", "gate_b"):
        return 1
    return 0


def per_layer_ndim(path, leaf) -> int:
    """The rank the leaf has in `ref/`'s layout (what decides weight decay there)."""
    return leaf.ndim - stacked_axes(path)

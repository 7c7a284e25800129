"""The training methods the paper compares, as data: how params are built and
which of them train.

Every model is a dict {"backbone": ..., ["blocks": ...], ["lora": ...]}; `apply`
runs whichever it holds. Which parameters train is a *partition* of that tree
(a predicate on each leaf's path), never a flag inside the forward pass:

    method         params                                 trains
    stage1         backbone + 1 expert (init per config)  experts and gates
    stage2         backbone + N stage-1 experts           experts and gates
    stage2_frozen  backbone + N stage-1 experts           gates only
    uninit         backbone + N fresh random experts      experts and gates
    full           backbone                               every backbone weight
    lora           backbone + adapters                    adapters
    block_expansion  backbone + a new layer after every    the new layers (ref/expansion.py,
                   k-th, a copy with wo, w_down zeroed     LLaMA Pro; expansion=ExpansionConfig)
    btx_branch     backbone + a copy of every layer's MLP the MLP copies (ref/btx.py, stage 1)
    btx            backbone + per layer [seed, N branch]  MLP experts and routers (BTX stage 2,
                   MLP experts and a top-2 router          stage1=[N btx_branch models])
    lora_moe       backbone + N per-domain LoRAs + a       LoRAs and routers (ref/lora_moe.py,
                   softmax router per layer                stage1=[N lora models])
    lora_moe_frozen  the same                             routers only
"""

from __future__ import annotations

import dataclasses

import jax

from mode_jax.ref.btx import btx_forward, init_branch, init_mix
from mode_jax.ref.config import LlamaConfig, LoraConfig, ModeConfig
from mode_jax.ref.expansion import ExpansionConfig, expansion_forward, init_expansion
from mode_jax.ref.llama import check_tokens, llama_forward
from mode_jax.ref.lora import init_lora, lora_merge
from mode_jax.ref.lora_moe import init_lora_moe, lora_moe_forward
from mode_jax.ref.mode import init_mode, mode_forward, stage2_from_stage1


def _in(part: str):
    return lambda keys: keys[0] == part


TRAINABLE = {
    "full": _in("backbone"),
    "lora": _in("lora"),
    "lora_moe": _in("lora_moe"),
    "lora_moe_routers": lambda keys: keys[0] == "lora_moe" and keys[-1] == "gate_w",
    "expansion": _in("expansion"),
    "btx": _in("btx"),
    "experts_and_gates": _in("blocks"),
    "gates": lambda keys: keys[0] == "blocks" and keys[-1] in ("gate_w", "gate_b"),
}

METHODS = {
    "stage1": "experts_and_gates",
    "stage2": "experts_and_gates",
    "stage2_frozen": "gates",
    "uninit": "experts_and_gates",
    "full": "full",
    "lora": "lora",
    "lora_moe": "lora_moe",
    "lora_moe_frozen": "lora_moe_routers",
    "block_expansion": "expansion",
    "btx_branch": "btx",
    "btx": "btx",
}


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)


def partition(params: dict, trainable: str) -> tuple[dict, dict]:
    """Split params into (trainable, frozen) trees of the same structure, with None
    where a leaf belongs to the other side."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {tuple(TRAINABLE)}, got {trainable!r}")
    pred = TRAINABLE[trainable]
    train = jax.tree_util.tree_map_with_path(lambda p, x: x if pred(_keys(p)) else None, params)
    frozen = jax.tree_util.tree_map_with_path(lambda p, x: None if pred(_keys(p)) else x, params)
    return train, frozen


def merge(trainable: dict, frozen: dict) -> dict:
    """Inverse of `partition`."""
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen,
                        is_leaf=lambda x: x is None)


def apply(params: dict, tokens: jax.Array, cfg: LlamaConfig, lora: LoraConfig | None = None, *,
          gate_top_k: int | None = None) -> jax.Array:
    """tokens int [B, T] -> logits [B, T, V] (float32) of whichever model `params` holds
    (`gate_top_k`: MoDE's top-k gate, ref.mode.top_k_logits; None: dense)."""
    check_tokens(tokens, "apply")
    backbone = params["backbone"]
    if "lora_moe" in params:
        if lora is None:
            raise ValueError("params hold a LoRA mixture but no LoraConfig was given")
        return lora_moe_forward(params, tokens, cfg, lora)
    if "lora" in params:
        if lora is None:
            raise ValueError("params hold LoRA adapters but no LoraConfig was given")
        backbone = lora_merge(backbone, params["lora"], lora)
    if "btx" in params:
        return btx_forward({**params, "backbone": backbone}, tokens, cfg)
    if "expansion" in params:
        return expansion_forward({**params, "backbone": backbone}, tokens, cfg)
    if "blocks" in params:
        return mode_forward({**params, "backbone": backbone}, tokens, cfg, gate_top_k=gate_top_k)
    return llama_forward(backbone, tokens, cfg)


def init_method(method: str, key: jax.Array, backbone: dict, cfg: LlamaConfig, *,
                mode: ModeConfig | None = None, lora: LoraConfig | None = None,
                stage1: list[dict] | None = None, gate_from: str = "stage1",
                expansion: ExpansionConfig | None = None) -> dict:
    """Params for `method` around a (frozen) backbone; see the module table."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    if method == "block_expansion":
        return {"backbone": backbone, "expansion": init_expansion(backbone, cfg, expansion or ExpansionConfig())}
    if method == "btx_branch":
        return init_branch(backbone)
    if method == "btx":
        if not stage1:
            raise ValueError("method 'btx' needs the trained btx_branch models (stage1=[...])")
        return init_mix(key, backbone, stage1)
    if method in ("lora_moe", "lora_moe_frozen"):
        if lora is None or not stage1 or any("lora" not in m for m in stage1):
            raise ValueError(f"method {method!r} needs a LoraConfig and the trained per-domain lora models "
                             "(stage1=[...])")
        return {"backbone": backbone, "lora_moe": init_lora_moe([m["lora"] for m in stage1], cfg, lora)}
    if method == "full":
        return {"backbone": backbone}
    if method == "lora":
        if lora is None:
            raise ValueError("method 'lora' needs a LoraConfig")
        return {"backbone": backbone, "lora": init_lora(key, backbone, lora)}
    if mode is None:
        raise ValueError(f"method {method!r} needs a ModeConfig")
    if method == "stage1":
        return init_mode(key, backbone, cfg, dataclasses.replace(mode, n_experts=1))
    if method == "uninit":
        return init_mode(key, backbone, cfg, dataclasses.replace(mode, expert_init="random"))
    if not stage1:
        raise ValueError(f"method {method!r} needs the trained stage-1 models (stage1=[...])")
    return stage2_from_stage1(stage1, cfg, dataclasses.replace(mode, n_experts=len(stage1)),
                              gate_from=gate_from)

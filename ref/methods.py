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
"""

from __future__ import annotations

import dataclasses

import jax

from mode_jax.ref.config import LlamaConfig, LoraConfig, ModeConfig
from mode_jax.ref.llama import check_tokens, llama_forward
from mode_jax.ref.lora import init_lora, lora_merge
from mode_jax.ref.mode import init_mode, mode_forward, stage2_from_stage1


def _in(part: str):
    return lambda keys: keys[0] == part


TRAINABLE = {
    "full": _in("backbone"),
    "lora": _in("lora"),
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


def apply(params: dict, tokens: jax.Array, cfg: LlamaConfig, lora: LoraConfig | None = None) -> jax.Array:
    """tokens int [B, T] -> logits [B, T, V] (float32) of whichever model `params` holds."""
    check_tokens(tokens, "apply")
    backbone = params["backbone"]
    if "lora" in params:
        if lora is None:
            raise ValueError("params hold LoRA adapters but no LoraConfig was given")
        backbone = lora_merge(backbone, params["lora"], lora)
    if "blocks" in params:
        return mode_forward({**params, "backbone": backbone}, tokens, cfg)
    return llama_forward(backbone, tokens, cfg)


def init_method(method: str, key: jax.Array, backbone: dict, cfg: LlamaConfig, *,
                mode: ModeConfig | None = None, lora: LoraConfig | None = None,
                stage1: list[dict] | None = None, gate_from: str = "stage1") -> dict:
    """Params for `method` around a (frozen) backbone; see the module table."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
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

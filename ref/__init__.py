"""The pure-functional reference of MoDE: what every fast path must compute.

Everything here is plain JAX over nested dicts of arrays; layers are looped
over in Python so each step reads like the paper. Nothing here imports
`mode_jax.fast` or `mode_jax.kernels`.

Dimension alphabet (used in einsum strings and shape comments throughout):

    B batch            T, S sequence (query, key)   D model width
    F MLP width        N query heads                K kv heads
    H head dim         V vocabulary                 E experts + 1 (backbone first)
    L layers           R LoRA rank
"""

from mode_jax.ref.config import LlamaConfig, LoraConfig, ModeConfig, OptimConfig
from mode_jax.ref.llama import init_llama, init_layer, llama_forward, llama_hidden, layer_forward
from mode_jax.ref.mode import (
    gated_combine,
    init_mode,
    mode_forward,
    mode_hidden,
    stage2_from_stage1,
)

__all__ = [
    "LlamaConfig", "LoraConfig", "ModeConfig", "OptimConfig",
    "init_llama", "init_layer", "llama_forward", "llama_hidden", "layer_forward",
    "gated_combine", "init_mode", "mode_forward", "mode_hidden", "stage2_from_stage1",
]

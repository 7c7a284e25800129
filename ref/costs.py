"""What each method costs, from its configs alone (no arrays): trained parameters, forward FLOPs
per token, and what a sparse dispatch of MoDE's top-k gate would save.

These answer two of the reviewers' questions (issue #13): parameter-matched comparisons (MoDE 2x
trains ~42.5M parameters on SmolLM2-135M, LoRA r16 on attention 1.7M: `match_lora_rank` finds
the LoRA rank with MoDE's count, `match_mode_layout` the MoDE layout closest to LoRA's) and
top-k gating's compute (`dispatch_flops`). The counts are checked against the param trees
`ref.methods.init_method` builds (tests/test_costs.py).

FLOPs count multiply-adds as 2 and only matmuls (norms, RoPE, softmax and the merge's
elementwise work are a few per element: below 1% here). A causal layer at sequence length T
attends on average over (T + 1) / 2 keys per token.
"""

from __future__ import annotations

import math

import numpy as np

from mode_jax.ref.config import LlamaConfig, LoraConfig, ModeConfig
from mode_jax.ref.llama import layer_shapes, param_shapes
from mode_jax.ref.lora import lora_param_count

# ---------------------------------------------------------------------------- parameters


def _size(shape) -> int:
    return math.prod(shape)


def layer_params(cfg: LlamaConfig) -> int:
    """Parameters of one transformer layer (norms and Qwen2's biases included)."""
    return sum(_size(s) for s in layer_shapes(cfg).values())


def backbone_params(cfg: LlamaConfig) -> int:
    """Every backbone parameter (embedding, layers, final norm, an untied head)."""
    shapes = param_shapes(cfg)
    return sum(_size(s) for k, s in shapes.items() if k != "layers") + cfg.n_layers * layer_params(cfg)


def gate_params(cfg: LlamaConfig, mode: ModeConfig) -> int:
    """MoDE's gates: per block, W_g [D, N + 1] and b_g [N + 1]."""
    return mode.n_blocks * (cfg.d_model + 1) * (mode.n_experts + 1)


def expert_params(cfg: LlamaConfig, mode: ModeConfig) -> int:
    """MoDE's N experts: expert_layers layers in each of n_blocks blocks, each."""
    return mode.n_experts * mode.n_blocks * mode.expert_layers * layer_params(cfg)


def trained_params(method: str, cfg: LlamaConfig, *, mode: ModeConfig | None = None,
                   lora: LoraConfig | None = None) -> int:
    """How many parameters `method` (a key of ref.methods.METHODS) trains. stage1 has one expert
    whatever mode.n_experts says (as init_method builds it); stage2, stage2_frozen and uninit
    have mode.n_experts."""
    if method == "full":
        return backbone_params(cfg)
    if method == "lora":
        if lora is None:
            raise ValueError("method 'lora' needs a LoraConfig")
        return lora_param_count(cfg, lora)
    if mode is None:
        raise ValueError(f"method {method!r} needs a ModeConfig")
    if method == "stage1":
        mode = ModeConfig(n_blocks=mode.n_blocks, expert_layers=mode.expert_layers, n_experts=1)
    if method in ("stage1", "stage2", "uninit"):
        return expert_params(cfg, mode) + gate_params(cfg, mode)
    if method == "stage2_frozen":
        return gate_params(cfg, mode)
    raise ValueError(f"trained_params: unknown method {method!r}")


def match_lora_rank(cfg: LlamaConfig, target: int, *, targets: str = "attn_mlp",
                    alpha: float = 32.0) -> tuple[int, int]:
    """(rank, trained params) of the LoRA on `targets` whose count is closest to `target`
    (the lower rank on a tie). A LoRA's count is linear in its rank."""
    per_rank = lora_param_count(cfg, LoraConfig(rank=1, alpha=alpha, targets=targets))
    rank = max(1, round(target / per_rank))
    return rank, rank * per_rank


def mode_layouts(cfg: LlamaConfig, n_experts: int):
    """Every MoDE layout over `cfg` with `n_experts` experts: a ModeConfig per (n_blocks dividing
    n_layers, expert_layers from 1 to the block's length)."""
    for n_blocks in range(1, cfg.n_layers + 1):
        if cfg.n_layers % n_blocks:
            continue
        for expert_layers in range(1, cfg.n_layers // n_blocks + 1):
            yield ModeConfig(n_blocks=n_blocks, expert_layers=expert_layers, n_experts=n_experts)


def match_mode_layout(cfg: LlamaConfig, target: int, *, n_experts: int = 2,
                      method: str = "stage2") -> tuple[ModeConfig, int]:
    """(layout, trained params) of the MoDE layout whose `method` trains the count closest to
    `target` (fewer trained parameters on a tie). Experts are whole layers of the backbone's
    width, so the smallest layout (1 block, 1 expert layer) may still be far above a small target."""
    best = min(mode_layouts(cfg, n_experts),
               key=lambda m: (abs(trained_params(method, cfg, mode=m) - target), trained_params(method, cfg, mode=m)))
    return best, trained_params(method, cfg, mode=best)


# ---------------------------------------------------------------------------- FLOPs

def layer_flops(cfg: LlamaConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one causal layer at sequence length `seq_len`: its matmuls
    (2 per weight) plus attention's scores and weighted sum (2 x 2 x query width per key)."""
    shapes = layer_shapes(cfg)
    matmuls = sum(2 * _size(shapes[k]) for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
    keys = (seq_len + 1) / 2
    return matmuls + 4 * cfg.n_heads * cfg.head_dim * keys


def stack_flops(cfg: LlamaConfig, mode: ModeConfig, seq_len: int) -> np.ndarray:
    """Forward FLOPs per token of each stack of a block: [E] = [backbone, expert 1..N]."""
    per_block = cfg.n_layers // mode.n_blocks
    return layer_flops(cfg, seq_len) * np.array([per_block] + [mode.expert_layers] * mode.n_experts, float)


def dispatch_flops(cfg: LlamaConfig, mode: ModeConfig, seq_len: int, selected=None) -> dict:
    """Forward FLOPs per token of a MoDE model, every stack run (dense: what the library runs,
    top-k or not) against a sparse dispatch that runs a stack only for the tokens whose top-k
    keeps it. `selected` [n_blocks, E]: the share of tokens whose top-k holds each stack (rows
    sum to min(k, E); `gate_analysis.selection_share` measures it). Without it, the backbone is
    taken as always kept and the other k - 1 places spread evenly over the experts.

    Returns {"dense", "sparse", "saved", "saved_fraction", "skipped_layers"} per token;
    skipped_layers counts layer evaluations per token a sparse dispatch would not run."""
    e = mode.n_experts + 1
    k = min(mode.gate_top_k or e, e)
    if selected is None:
        row = [1.0] + [(k - 1) / max(mode.n_experts, 1)] * mode.n_experts
        selected = np.tile(row, (mode.n_blocks, 1))
    selected = np.asarray(selected, float)
    if selected.shape != (mode.n_blocks, e):
        raise ValueError(f"dispatch_flops: selected must be [n_blocks, E] = {(mode.n_blocks, e)}, got {selected.shape}")
    stacks = stack_flops(cfg, mode, seq_len)                                          # [E]
    head = 2 * cfg.d_model * cfg.vocab_size
    gates = mode.n_blocks * 2 * cfg.d_model * e
    dense = float(head + gates + mode.n_blocks * stacks.sum())
    sparse = float(head + gates + (selected * stacks).sum())
    layers = np.array([cfg.n_layers // mode.n_blocks] + [mode.expert_layers] * mode.n_experts, float)
    return {"dense": dense, "sparse": sparse, "saved": dense - sparse, "saved_fraction": (dense - sparse) / dense,
            "skipped_layers": float(((1 - selected) * layers).sum())}

"""Frozen, hashable configuration dataclasses, one per concern.

Each validates itself on construction, so bad values fail with a `ValueError`
that names the field before any array is allocated. Being frozen, they can be
`jax.jit` static arguments.
"""

from __future__ import annotations

import dataclasses


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _positive_int(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


ROPE_TYPES = ("llama3",)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3's RoPE frequency scaling (config.json's `rope_scaling` with rope_type 'llama3').

    Frequencies whose wavelength is shorter than original_max_position_embeddings /
    high_freq_factor are kept, longer than original / low_freq_factor are divided by
    `factor`, and those in between are interpolated smoothly (`ref.llama.rope_frequencies`)."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        _require(self.rope_type in ROPE_TYPES,
                 f"RopeScaling.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        _positive_int(self, "original_max_position_embeddings")
        _require(self.factor > 0, f"RopeScaling.factor must be > 0, got {self.factor!r}")
        _require(0 < self.low_freq_factor < self.high_freq_factor,
                 f"RopeScaling needs 0 < low_freq_factor < high_freq_factor, got "
                 f"{self.low_freq_factor!r}, {self.high_freq_factor!r}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-family decoder (pre-norm, RoPE, GQA, SwiGLU).

    Covers Llama 1-3 and Qwen2: `qkv_bias` adds Qwen2's q/k/v projection biases;
    `rope_scaling` is Llama 3's frequency scaling as config.json states it;
    `rope_freq_factors` is the same thing as a GGUF file stores it (llama.cpp's
    `rope_freqs` tensor: one divisor per frequency, exactly what the file holds).
    The defaults are plain Llama (SmolLM2)."""

    vocab_size: int = 49152
    d_model: int = 576          # D
    n_layers: int = 30          # L
    n_heads: int = 9            # N query heads
    n_kv_heads: int = 3         # K kv heads; N must be a multiple of K (grouped-query attention)
    head_dim: int = 64          # H; usually d_model // n_heads but not required
    d_ff: int = 1536            # F, SwiGLU hidden width
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # LM head = embedding matrix transposed
    max_seq_len: int = 8192
    qkv_bias: bool = False       # Qwen2: q, k, v projections have biases (o and the MLP do not)
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None   # [H/2] divisors of the frequencies

    def __post_init__(self):
        # Accept the JSON forms (dataclasses.asdict of a saved config) and keep the fields
        # hashable: a dict becomes a RopeScaling, a list a tuple of floats.
        if isinstance(self.rope_scaling, dict):
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
            except TypeError as err:
                raise ValueError(f"LlamaConfig.rope_scaling: {err}") from None
        if self.rope_freq_factors is not None:
            object.__setattr__(self, "rope_freq_factors", tuple(float(f) for f in self.rope_freq_factors))
        _positive_int(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                      "head_dim", "d_ff", "max_seq_len")
        _require(isinstance(self.qkv_bias, bool), f"LlamaConfig.qkv_bias must be a bool, got {self.qkv_bias!r}")
        _require(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
                 f"LlamaConfig.rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
        _require(self.head_dim % 2 == 0, f"LlamaConfig.head_dim must be even (RoPE rotates pairs), "
                                         f"got {self.head_dim}")
        if self.rope_freq_factors is not None:
            _require(self.rope_scaling is None,
                     "LlamaConfig.rope_scaling and rope_freq_factors are two forms of one thing: give one")
            _require(len(self.rope_freq_factors) == self.head_dim // 2,
                     f"LlamaConfig.rope_freq_factors has {len(self.rope_freq_factors)} entries, "
                     f"head_dim={self.head_dim} needs {self.head_dim // 2}")
            _require(all(f > 0 for f in self.rope_freq_factors),
                     "LlamaConfig.rope_freq_factors must all be > 0")
        _require(self.n_heads % self.n_kv_heads == 0,
                 f"LlamaConfig.n_heads={self.n_heads} must be a multiple of "
                 f"n_kv_heads={self.n_kv_heads}")
        _require(self.rope_theta > 0, f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        _require(self.norm_eps > 0, f"LlamaConfig.norm_eps must be > 0, got {self.norm_eps!r}")

    @classmethod
    def smollm2_135m(cls) -> "LlamaConfig":
        """SmolLM2-135M's shape (read off its GGUF metadata)."""
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """A few-thousand-parameter model for tests and smoke runs."""
        base = dict(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2,
                    head_dim=8, d_ff=64, rope_theta=10000.0, max_seq_len=256)
        base.update(overrides)
        return cls(**base)


EXPERT_INITS = ("random", "copy")
GATE_INITS = ("backbone", "uniform")


@dataclasses.dataclass(frozen=True)
class ModeConfig:
    """How MoDE wraps a backbone (paper section 3, eq. 1-2)."""

    n_blocks: int = 3           # backbone layers are cut into this many consecutive blocks
    expert_layers: int = 2      # transformer layers per expert per block
    n_experts: int = 1          # N; the gate has N + 1 outputs (backbone first)
    # 'random': fresh layers; 'copy': the block's last `expert_layers` backbone layers.
    expert_init: str = "copy"
    # 'backbone': zero gate weights, bias `gate_margin` on the backbone column, so the
    # model starts close to the backbone; 'uniform': all zeros (equal weights).
    # 4.0 (a_bb = 0.98 with one expert) beat 2.0 (0.88) on both the targets and English
    # retention in the cpu preset (docs/results/cpu/README.md).
    gate_init: str = "backbone"
    gate_margin: float = 4.0
    # None: the dense gate of eq. 2 (every stack weighted). k: each token keeps its k largest
    # of the N + 1 gate logits and takes the softmax over those alone (`ref.mode.top_k_logits`);
    # k >= N + 1 is the dense gate.
    gate_top_k: int | None = None

    def __post_init__(self):
        _positive_int(self, "n_blocks", "expert_layers")
        if self.gate_top_k is not None:
            _positive_int(self, "gate_top_k")
        _require(isinstance(self.n_experts, int) and self.n_experts >= 0,
                 f"ModeConfig.n_experts must be an integer >= 0, got {self.n_experts!r}")
        _require(self.expert_init in EXPERT_INITS,
                 f"ModeConfig.expert_init must be one of {EXPERT_INITS}, got {self.expert_init!r}")
        _require(self.gate_init in GATE_INITS,
                 f"ModeConfig.gate_init must be one of {GATE_INITS}, got {self.gate_init!r}")
        _require(self.gate_margin >= 0,
                 f"ModeConfig.gate_margin must be >= 0, got {self.gate_margin!r}")

    def check_backbone(self, model: LlamaConfig) -> None:
        """Raise if this layout cannot be laid over `model`."""
        _require(model.n_layers % self.n_blocks == 0,
                 f"LlamaConfig.n_layers={model.n_layers} is not divisible by "
                 f"ModeConfig.n_blocks={self.n_blocks}")
        if self.expert_init == "copy":
            per_block = model.n_layers // self.n_blocks
            _require(self.expert_layers <= per_block,
                     f"ModeConfig.expert_layers={self.expert_layers} exceeds the "
                     f"{per_block} backbone layers per block that expert_init='copy' copies from")


LORA_TARGETS = {
    "attn": ("wq", "wk", "wv", "wo"),
    "attn_mlp": ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters W + (alpha / rank) * A @ B on chosen projections (baseline)."""

    rank: int = 16
    alpha: float = 32.0
    targets: str = "attn"       # a key of LORA_TARGETS

    def __post_init__(self):
        _positive_int(self, "rank")
        _require(self.alpha > 0, f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        _require(self.targets in LORA_TARGETS,
                 f"LoraConfig.targets must be one of {tuple(LORA_TARGETS)}, got {self.targets!r}")

    @property
    def matrices(self) -> tuple[str, ...]:
        return LORA_TARGETS[self.targets]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, cosine decay and global-norm clipping."""

    learning_rate: float = 1e-3     # the paper's
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1       # cosine decays to learning_rate * min_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0       # decoupled; applied to matrices only (ndim >= 2)
    clip_norm: float = 1.0          # global-norm clip; 0 disables

    def __post_init__(self):
        _require(self.learning_rate > 0, f"OptimConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        _require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
                 f"OptimConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        _positive_int(self, "total_steps")
        _require(0 <= self.min_lr_ratio <= 1, f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        _require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"OptimConfig.b1, b2 must be in [0, 1), got {self.b1!r}, {self.b2!r}")
        _require(self.eps > 0, f"OptimConfig.eps must be > 0, got {self.eps!r}")
        _require(self.weight_decay >= 0, f"OptimConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        _require(self.clip_norm >= 0, f"OptimConfig.clip_norm must be >= 0, got {self.clip_norm!r}")

"""Pipeline configuration: one frozen dataclass per section, read from TOML and flags.

A config is a TOML file with the sections below (every key optional; missing keys
take the defaults written here), overridden by `--set section.key=value` flags
(the value is a TOML literal: `--set train.steps=20`, `--set model.source="tiny"`).
Presets are the files `configs/<name>.toml` of the repository. Every value is
range-checked on construction; a bad one raises `UserError` naming the key, so the
CLI exits with one line before anything is written.

The resolved config (every key, defaults included) is written into each run
directory as `config.toml` and can be given back with `--config`.

Defaults that belong to the method (the MoDE layout and gate, LoRA's shape, the
optimizer's schedule and clipping) are not repeated here: a key left at `None`
below takes the value of the `mode_jax.ref.config` dataclass field it names
(`ModeConfig`, `LoraConfig`, `OptimConfig`), filled in when the section is built,
so ref/config.py is their one source of truth.

Domains are not code either: `domains.targets` and `domains.retention` name
domains of the data (its manifest lists them; `mode-jax data build --domain`
makes your own). An empty `targets` means every domain of the data that is not
a retention domain (`sources.resolve_domains`).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import Any

from mode_jax.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _fill_from_ref(section, ref_class: str, names: dict[str, str]) -> None:
    """Set each field of `section` that is None to ref.config.<ref_class>'s default for it.
    Imported here, not at module level, so that the CLI starts without importing jax."""
    from mode_jax.ref import config as ref_config
    ref = getattr(ref_config, ref_class)
    for field, ref_field in names.items():
        if getattr(section, field) is None:
            object.__setattr__(section, field, getattr(ref, ref_field))


@dataclasses.dataclass(frozen=True)
class ModelSection:
    source: str = "smollm2-135m"   # a name from `mode-jax fetch --list`, a .gguf path, or "tiny" (random)
    compute_dtype: str = "float32"  # "bfloat16": backbone and expert matmuls in bf16; gates, master weights f32
    backend: str = "auto"          # "auto" = "fast" (mode_jax.fast); "ref": ref/'s forward (fast/steps.py)
    # fast backend: how a stack of layers is looped over (mode_jax.fast.FastConfig.layer_loop).
    # "auto": a Python loop on GPU (faster steps, longer compiles), scan elsewhere; "scan"; "python".
    layer_loop: str = "auto"
    seed: int = 0                  # init of the "tiny" random backbone (its fingerprint changes with it)
    tiny_d_model: int = 32         # shape of the "tiny" backbone (ignored for real models)
    tiny_n_layers: int = 4


@dataclasses.dataclass(frozen=True)
class DataSection:
    source: str = "built"          # "built": `mode-jax data build` output; "synthetic": made in-process
    dir: str = ""                  # built data directory ("" = $XDG_CACHE_HOME/mode-jax/data)
    seq_len: int = 256             # tokens per training / eval row (targets are the next tokens)
    eval_sequences: int = 32       # test rows per domain, spread evenly over the test split
    eval_batch_size: int = 8
    synthetic_documents: int = 400  # per domain and split kind, for source = "synthetic"
    # Which held-out split evaluation reads: "test" (what a report states) or "validation"
    # (choosing a learning rate or a margin without looking at the test split).
    eval_split: str = "test"
    # Training rows per domain (0 = all): a fixed subset of N rows of seq_len + 1 tokens that
    # the sampler cycles for the same step count (data/subset.py). train_examples: the
    # mixture phases (stage 2, uninit, full, lora); stage1_examples: each stage-1 expert.
    train_examples: int = 0
    stage1_examples: int = 0


@dataclasses.dataclass(frozen=True)
class ModeSection:
    # None: ModeConfig's default (ref/config.py says what each is and why).
    n_blocks: int | None = None
    expert_layers: int | None = None
    expert_init: str | None = None
    gate_init: str | None = None
    gate_margin: float | None = None
    stage2_gate_from: str = "stage1"  # "stage1": backbone column averaged, expert columns carried; "fresh"
    # The uninit method's experts (no stage 1): "random" (the paper's uninit) or "copy" (copies
    # of the backbone's layers, as expert_init = "copy" gives stage 1: no stage 1, copied experts).
    uninit_experts: str = "random"
    # Top-k gating (ModeConfig.gate_top_k) where N experts are mixed (compose, uninit; stage 1
    # stays dense): each token keeps its k largest of the N + 1 gate weights. 0 = dense (TOML has no None).
    gate_top_k: int = 0
    # Experts of the uninit method (no stage 1): 0 = one per target domain. 1 with expert_layers
    # doubled is the capacity control: one expert as large as two, trained on the mixture.
    n_experts: int = 0

    def __post_init__(self):
        _fill_from_ref(self, "ModeConfig", {k: k for k in ("n_blocks", "expert_layers", "expert_init",
                                                            "gate_init", "gate_margin")})


@dataclasses.dataclass(frozen=True)
class LoraSection:
    # None: LoraConfig's default (the paper's best: rank 16, alpha 32, on the attention projections).
    rank: int | None = None
    alpha: float | None = None
    targets: str | None = None

    def __post_init__(self):
        _fill_from_ref(self, "LoraConfig", {k: k for k in ("rank", "alpha", "targets")})


@dataclasses.dataclass(frozen=True)
class TrainSection:
    stage1_steps: int = 100        # per expert, on its own domain
    steps: int = 100               # stage 2 and baselines, on the mixture (stage 1 comes on top for composed MoDE)
    batch_size: int = 8            # rows per step (a multiple of the number of mixture domains)
    warmup_steps: int = 10
    min_lr_ratio: float | None = None   # None: OptimConfig's default, as for the next two
    weight_decay: float | None = None
    clip_norm: float | None = None
    checkpoint_every: int = 50     # steps between training-state checkpoints (0 = only when stopped early)
    log_every: int = 1             # steps between metrics lines
    seed: int = 0                  # expert / adapter init and the data order

    def __post_init__(self):
        _fill_from_ref(self, "OptimConfig", {k: k for k in ("min_lr_ratio", "weight_decay", "clip_norm")})


@dataclasses.dataclass(frozen=True)
class LrSection:
    mode: float | None = None      # MoDE experts and gates; None: OptimConfig.learning_rate (the paper's)
    full: float = 1e-4             # full fine-tuning: every backbone weight moves, so a smaller step
    lora: float | None = None      # None: OptimConfig.learning_rate
    # block_expansion's new layers: copied whole layers trained beside a frozen backbone, as
    # MoDE's copied experts are, so the same default (None: OptimConfig.learning_rate).
    expansion: float | None = None

    def __post_init__(self):
        _fill_from_ref(self, "OptimConfig", {"mode": "learning_rate", "lora": "learning_rate",
                                             "expansion": "learning_rate"})


@dataclasses.dataclass(frozen=True)
class ExpansionSection:
    # block_expansion (LLaMA Pro, ref/expansion.py): one new layer after every `every`-th
    # backbone layer; it must divide the backbone's depth. None: ExpansionConfig's default
    # (5: 6 new layers over SmolLM2's 30, as many as one MoDE expert; ref/expansion.py says why).
    every: int | None = None

    def __post_init__(self):
        if self.every is None:
            from mode_jax.ref.expansion import ExpansionConfig
            object.__setattr__(self, "every", ExpansionConfig.every)


@dataclasses.dataclass(frozen=True)
class DomainsSection:
    targets: tuple = ()            # the mixture stage 2 and the baselines train on; () = the data's other domains
    retention: tuple = ()          # evaluated, never trained on


SECTIONS = {"model": ModelSection, "data": DataSection, "mode": ModeSection, "lora": LoraSection,
            "train": TrainSection, "lr": LrSection, "domains": DomainsSection, "expansion": ExpansionSection}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    # Factories, not instances: the sections that read ref.config defaults import it when
    # built, which must not happen at import time (the CLI starts without jax).
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    mode: ModeSection = dataclasses.field(default_factory=ModeSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    lr: LrSection = dataclasses.field(default_factory=LrSection)
    domains: DomainsSection = dataclasses.field(default_factory=DomainsSection)
    expansion: ExpansionSection = dataclasses.field(default_factory=ExpansionSection)

    def __post_init__(self):
        validate(self)

    @property
    def eval_domains(self) -> tuple[str, ...]:
        return tuple(self.domains.targets) + tuple(d for d in self.domains.retention if d not in self.domains.targets)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in dataclasses.asdict(getattr(self, name)).items()} for name in SECTIONS}


# (key, low, high, kind): numbers must lie in [low, high]; None = unbounded.
RANGES = [
    ("model.seed", 0, None, int), ("model.tiny_d_model", 8, 4096, int), ("model.tiny_n_layers", 1, 256, int),
    ("data.seq_len", 2, 65536, int), ("data.eval_sequences", 1, None, int),
    ("data.eval_batch_size", 1, None, int), ("data.synthetic_documents", 10, None, int),
    ("data.train_examples", 0, None, int), ("data.stage1_examples", 0, None, int),
    ("mode.n_blocks", 1, 256, int), ("mode.expert_layers", 1, 256, int),
    ("mode.gate_top_k", 0, 256, int), ("mode.n_experts", 0, 256, int), ("mode.gate_margin", 0.0, 100.0, float),
    ("lora.rank", 1, 65536, int), ("lora.alpha", 1e-6, None, float),
    ("train.stage1_steps", 1, None, int), ("train.steps", 1, None, int), ("train.batch_size", 1, None, int),
    ("train.warmup_steps", 0, None, int), ("train.min_lr_ratio", 0.0, 1.0, float),
    ("train.weight_decay", 0.0, 1.0, float), ("train.clip_norm", 0.0, None, float),
    ("train.checkpoint_every", 0, None, int), ("train.log_every", 1, None, int), ("train.seed", 0, None, int),
    ("lr.mode", 1e-8, 1.0, float), ("lr.full", 1e-8, 1.0, float), ("lr.lora", 1e-8, 1.0, float),
    ("lr.expansion", 1e-8, 1.0, float), ("expansion.every", 1, 256, int),
]
CHOICES = {
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.backend": ("auto", "ref", "fast"),
    "model.layer_loop": ("auto", "scan", "python"),
    "data.source": ("built", "synthetic"),
    "data.eval_split": ("test", "validation"),
    "mode.expert_init": ("copy", "random"),
    "mode.gate_init": ("backbone", "uniform"),
    "mode.stage2_gate_from": ("stage1", "fresh"),
    "mode.uninit_experts": ("random", "copy"),
    "lora.targets": ("attn", "attn_mlp"),
}


def _get(cfg: PipelineConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: PipelineConfig) -> None:
    """Raise UserError naming the first key whose value is out of range."""
    for key, low, high, kind in RANGES:
        value = _get(cfg, key)
        ok_type = (isinstance(value, int) and not isinstance(value, bool)) if kind is int else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        if not ok_type:
            raise UserError(f"config {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise UserError(f"config {key} must be {bounds}, got {value!r}")
    for key, options in CHOICES.items():
        if _get(cfg, key) not in options:
            raise UserError(f"config {key} must be one of {', '.join(options)}, got {_get(cfg, key)!r}")
    from mode_jax.data.own_sources import NAME_RULE
    for key in ("domains.targets", "domains.retention"):
        for d in _get(cfg, key):
            if not isinstance(d, str) or not NAME_RULE.match(d):
                raise UserError(f"config {key} holds {d!r}, not a domain name (letters, digits, '_', '-')")
    if cfg.domains.targets and cfg.train.batch_size % len(cfg.domains.targets):
        raise UserError(f"config train.batch_size={cfg.train.batch_size} must be a multiple of the "
                        f"{len(cfg.domains.targets)} target domains (equal rows per domain)")
    if cfg.data.eval_sequences % cfg.data.eval_batch_size:
        raise UserError(f"config data.eval_sequences={cfg.data.eval_sequences} must be a multiple of "
                        f"data.eval_batch_size={cfg.data.eval_batch_size}")


def _section(cls, values: dict, name: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"unknown config key {name}.{unknown[0]} (known: {', '.join(sorted(fields))})")
    out = {}
    float_keys = {k for k, _, _, kind in RANGES if kind is float}
    for key, value in values.items():
        default = fields[key].default
        # A None default (filled from ref.config) has no type to read: RANGES / CHOICES say it.
        is_float = isinstance(default, float) or f"{name}.{key}" in float_keys
        is_str = isinstance(default, str) or f"{name}.{key}" in CHOICES
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise UserError(f"config {name}.{key} must be a list, got {value!r}")
            value = tuple(value)
        elif is_float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif is_str and not isinstance(value, str):
            raise UserError(f"config {name}.{key} must be a string, got {value!r}")
        out[key] = value
    return cls(**out)


def from_dict(data: dict[str, Any]) -> PipelineConfig:
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise UserError(f"unknown config section [{unknown[0]}] (known: {', '.join(SECTIONS)})")
    for name, values in data.items():
        if not isinstance(values, dict):
            raise UserError(f"config [{name}] must be a table of keys")
    return PipelineConfig(**{name: _section(cls, data.get(name, {}), name) for name, cls in SECTIONS.items()})


def preset_path(name: str) -> Path:
    """configs/<name>.toml of the repository (an editable install), else of the working directory."""
    dirs = [CONFIG_DIR, Path.cwd() / "configs"]
    for d in dirs:
        if (d / f"{name}.toml").is_file() and "/" not in name:
            return d / f"{name}.toml"
    known = sorted({p.stem for d in dirs for p in d.glob("*.toml")})
    raise UserError(f"unknown preset {name!r} (known: {', '.join(known) or 'none'}; or pass --config FILE)")


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` strings (value: a TOML literal, or a bare word taken as a string)."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise UserError(f"--set {item!r} must look like section.key=value (e.g. train.steps=20)")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        data.setdefault(parts[0], {})
        if not isinstance(data[parts[0]], dict):
            raise UserError(f"config [{parts[0]}] must be a table of keys")
        data[parts[0]][parts[1]] = value
    return data


def load_config(*, preset: str | None = None, config: str | None = None,
                overrides: list[str] = ()) -> PipelineConfig:
    """Preset or config file (or the defaults), then overrides, validated."""
    if preset and config:
        raise UserError("give either --preset or --config, not both")
    data = read_toml(preset_path(preset)) if preset else read_toml(config) if config else {}
    return from_dict(apply_overrides(data, list(overrides)))


def to_toml(cfg: PipelineConfig) -> str:
    """The resolved config as TOML (readable back with `load_config(config=...)`)."""
    lines = []
    for name, values in cfg.to_dict().items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def first_difference(a: PipelineConfig, b: PipelineConfig) -> str | None:
    """'section.key: A vs B' for the first differing key, or None."""
    da, db = a.to_dict(), b.to_dict()
    for name in da:
        for key in da[name]:
            if da[name][key] != db[name][key]:
                return f"{name}.{key}: {da[name][key]!r} vs {db[name][key]!r}"
    return None

"""Where the backbone and the domain data come from, behind one small interface each.

Backbone: `load_backbone(cfg.model)` -> `Backbone(params, config, fingerprint, name, ...)`, from
  * a model name known to `mode-jax fetch` (must already be in the cache: this never
    downloads, it says which command does), or a `.gguf` path: dequantized to float32;
  * a Hugging Face directory (config.json, single or sharded *.safetensors, tokenizer.json):
    mode_jax.model_io.hf_loader;
  * "tiny": a random `LlamaConfig.tiny` model (smoke runs and tests; no downloads).
The fingerprint is a sha256 over every backbone tensor (names, shapes, float32 bytes):
what an expert file records so that it is never composed onto another backbone.

Data: `load_data(cfg)` -> `DomainData` with per-domain train and test token streams and a
vocabulary size, from
  * "built": the output of `mode-jax data build` (mode_jax.data.store, hash-checked);
    its domains are whatever the manifest holds;
  * "synthetic": short texts made here from templates (arithmetic for math, small
    Python functions for code, plain sentences for English), one token per byte:
    learnable, clearly different domains, no downloads.
The data's tokenizer (its vocab_hash) must be the model's, whatever the model source
("tiny" takes the data's vocabulary, so it has none of its own).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path

import jax
import numpy as np

from mode_jax.data.own_sources import check_name
from mode_jax.errors import UserError
from mode_jax.pipeline.presets import PipelineConfig
from mode_jax.ref.config import LlamaConfig, ModeConfig

SYNTHETIC_DOMAINS = ("math", "code", "english")   # what data.source = "synthetic" can make
HF_DIR_HINT = "a Hugging Face model directory holds config.json, *.safetensors and tokenizer.json"


@dataclasses.dataclass
class Backbone:
    params: dict            # reference param tree (float32)
    config: LlamaConfig
    fingerprint: str        # sha256 hex of the tensors
    name: str               # what to show ("smollm2-135m", "tiny(seed=0)", a path)
    kind: str = "tiny"      # where it came from: "fetched" (a model name), "gguf", "hf" or "tiny"
    tokenizer_hash: str | None = None   # vocab_hash of its tokenizer (None for "tiny")

    @property
    def base(self) -> dict:
        """What expert and model files record about their base model."""
        return {"name": self.name, "source": self.kind, "fingerprint": self.fingerprint,
                "tokenizer_hash": self.tokenizer_hash}


@dataclasses.dataclass
class DomainData:
    train: dict[str, np.ndarray]   # domain -> 1-D token stream
    test: dict[str, np.ndarray]
    vocab_size: int
    description: str
    tokenizer_hash: str = ""
    validation: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)   # when data.eval_split asks


def eval_streams(cfg: PipelineConfig, data: DomainData, domains) -> dict[str, np.ndarray]:
    """The held-out stream each domain is evaluated on: its data.eval_split ("test", or
    "validation" for tuning) split."""
    held_out = data.validation if cfg.data.eval_split == "validation" else data.test
    return {d: held_out[d] for d in domains}


def fingerprint(params: dict) -> str:
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.ascontiguousarray(np.asarray(leaf, dtype=np.float32))
        digest.update(f"{jax.tree_util.keystr(path)}:{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def tiny_config(*, d_model: int, n_layers: int, vocab_size: int) -> LlamaConfig:
    """LlamaConfig.tiny at a chosen width and depth (4 query heads, 2 kv heads)."""
    return LlamaConfig.tiny(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=4,
                            n_kv_heads=2, head_dim=max(d_model // 4, 2), d_ff=2 * d_model,
                            max_seq_len=65536)


def model_kind(source: str) -> str:
    """"tiny", "fetched" (a name from `mode-jax fetch --list`), "hf" (a directory) or "gguf" (a file)."""
    from mode_jax.model_io import fetch
    if source == "tiny":
        return "tiny"
    if source in fetch.MODELS:
        return "fetched"
    return "hf" if Path(source).is_dir() else "gguf"


def check_model_available(cfg: PipelineConfig) -> None:
    """Raise UserError (naming the command that fixes it) if the backbone cannot be loaded."""
    source = cfg.model.source
    kind = model_kind(source)
    from mode_jax.model_io import fetch
    if kind == "fetched" and fetch.cached_model(source) is None:
        raise UserError(f"model {source!r} is not in the cache ({fetch.model_path(source)}): "
                        f"run `mode-jax fetch {source}` first")
    if kind == "hf":
        missing = [f for f in ("config.json", "tokenizer.json") if not (Path(source) / f).is_file()]
        if missing:
            raise UserError(f"model directory {source} has no {' and no '.join(missing)} ({HF_DIR_HINT})")
    if kind == "gguf" and not Path(source).is_file():
        raise UserError(f"model {source!r} is neither a known model ({', '.join(sorted(fetch.MODELS))}), "
                        f"'tiny', an existing .gguf file nor a Hugging Face model directory; "
                        f"`mode-jax fetch --list` shows the models")


def model_path(cfg: PipelineConfig) -> Path | None:
    """The model's file (.gguf) or directory (Hugging Face); None for "tiny"."""
    if cfg.model.source == "tiny":
        return None
    return model_path_for(cfg.model.source)


def model_tokenizer_hash(source: str) -> str | None:
    """vocab_hash of the model's own tokenizer (None for "tiny", which has none)."""
    if model_kind(source) == "tiny":
        return None
    from mode_jax.model_io.tokenizer import model_tokenizer, vocab_hash
    return vocab_hash(model_tokenizer(model_path_for(source)))


@functools.lru_cache(maxsize=2)
def _load_backbone_cached(source: str, seed: int, d_model: int, n_layers: int, vocab: int, progress: bool):
    if source == "tiny":
        cfg = tiny_config(d_model=d_model, n_layers=n_layers, vocab_size=vocab)
        from mode_jax.ref.llama import init_llama
        params = init_llama(jax.random.key(seed), cfg)
        name = f"tiny(seed={seed}, d_model={d_model}, n_layers={n_layers}, vocab={vocab})"
    elif model_kind(source) == "hf":
        from mode_jax.model_io.hf_loader import load_hf_dir
        params, cfg = load_hf_dir(source)
        name = Path(source).resolve().name
    else:
        from mode_jax.model_io.gguf_loader import load_gguf
        path = model_path_for(source)
        params, cfg = load_gguf(path, progress=progress)
        name = source if model_kind(source) == "fetched" else Path(source).name
    return Backbone(params=params, config=cfg, fingerprint=fingerprint(params), name=name,
                    kind=model_kind(source), tokenizer_hash=model_tokenizer_hash(source))


def model_path_for(source: str) -> Path:
    from mode_jax.model_io import fetch
    if source in fetch.MODELS:
        found = fetch.cached_model(source)
        if found is None:
            raise UserError(f"model {source!r} is not in the cache: run `mode-jax fetch {source}` first")
        return found
    return Path(source)


def load_backbone(cfg: PipelineConfig, vocab_size: int, *, progress: bool = True) -> Backbone:
    """The frozen backbone; for "tiny" the vocabulary is the data's. Checks the MoDE layout fits."""
    check_model_available(cfg)
    bb = _load_backbone_cached(cfg.model.source, cfg.model.seed, cfg.model.tiny_d_model,
                               cfg.model.tiny_n_layers, vocab_size, progress)
    if vocab_size > bb.config.vocab_size:
        raise UserError(f"the data's tokenizer has {vocab_size} tokens, more than the model's "
                        f"{bb.config.vocab_size}: rebuild the data with this model's tokenizer "
                        f"(`mode-jax data build --model {cfg.model.source}`)")
    try:
        mode_config(cfg, 1).check_backbone(bb.config)
    except ValueError as err:
        raise UserError(f"config mode.n_blocks / mode.expert_layers do not fit the backbone: {err}") from None
    return bb


def mode_config(cfg: PipelineConfig, n_experts: int) -> ModeConfig:
    m = cfg.mode
    return ModeConfig(n_blocks=m.n_blocks, expert_layers=m.expert_layers, n_experts=n_experts,
                      expert_init=m.expert_init, gate_init=m.gate_init, gate_margin=m.gate_margin,
                      gate_top_k=m.gate_top_k or None)


# ----------------------------------------------------------------------------- data

def check_domains(domains) -> None:
    """Cheap name checks (whether the data holds them is `data_domains`' business)."""
    for d in domains:
        check_name(d)


def data_domains(cfg: PipelineConfig) -> tuple[str, ...]:
    """The domains the configured data holds: the manifest's, or the synthetic ones."""
    if cfg.data.source == "synthetic":
        return SYNTHETIC_DOMAINS
    from mode_jax.data.store import domain_names, read_manifest
    return domain_names(read_manifest(data_dir(cfg)))


def check_in_data(cfg: PipelineConfig, domains) -> None:
    """Every domain must be one the data holds (UserError listing those it has)."""
    have = data_domains(cfg)
    for d in domains:
        check_name(d)
        if d not in have:
            where = "synthetic data" if cfg.data.source == "synthetic" else f"the data at {data_dir(cfg)}"
            raise UserError(f"unknown domain {d!r}: it is not in {where} (it has: {', '.join(have) or 'none'}); "
                            f"build it with `mode-jax data build --domain {d}=SOURCE` or set "
                            f"domains.targets / domains.retention")


def resolve_domains(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with domains.targets filled in when it is empty: every domain of the data that is
    not a retention domain (so the data's manifest, not code, says what there is)."""
    if cfg.domains.targets:
        return cfg
    targets = tuple(d for d in data_domains(cfg) if d not in cfg.domains.retention)
    if not targets:
        raise UserError("config domains.targets is empty and the data holds no domain outside "
                        "domains.retention: nothing to train on")
    return dataclasses.replace(cfg, domains=dataclasses.replace(cfg.domains, targets=targets))


def data_dir(cfg: PipelineConfig) -> Path:
    from mode_jax.data.store import default_data_dir
    return Path(cfg.data.dir) if cfg.data.dir else default_data_dir()


def load_data(cfg: PipelineConfig, domains, *, verify: bool = True) -> DomainData:
    """Train and test streams of `domains` (raises UserError naming `mode-jax data build` if missing)."""
    check_in_data(cfg, domains)
    if cfg.data.source == "synthetic":
        return synthetic_data(domains, cfg.data.synthetic_documents, cfg.train.seed)
    from mode_jax.data.store import load_split, read_manifest, tokenizer_hash
    root = data_dir(cfg)
    manifest = read_manifest(root)
    train = {d: load_split(root, d, "train", verify=verify) for d in domains}
    test = {d: load_split(root, d, "test", verify=verify) for d in domains}
    validation = ({d: load_split(root, d, "validation", verify=verify) for d in domains}
                  if cfg.data.eval_split == "validation" else {})
    tok = manifest.get("tokenizer", {})
    need = cfg.data.seq_len + 1
    for d in domains:
        for split, arr in (("train", train[d]), ("test", test[d])) + (
                (("validation", validation[d]),) if validation else ()):
            if arr.shape[0] < need:
                raise UserError(f"the {split} split of {d!r} at {root} has {arr.shape[0]} tokens, fewer than "
                                f"one row of data.seq_len + 1 = {need}: build more data (`mode-jax data build`)")
    return DomainData(train, test, int(tok.get("vocab_size", 0)), f"{root} ({tok.get('name', '?')})",
                      tokenizer_hash(manifest), validation)


def check_tokenizer_matches(cfg: PipelineConfig) -> None:
    """The data must be tokenized by the backbone's own tokenizer: equal vocab_hash, for every
    model source but "tiny" (which takes the data's vocabulary)."""
    if cfg.model.source == "tiny":
        return
    from mode_jax.data.pack import ByteTokenizer
    from mode_jax.data.store import read_manifest, tokenizer_hash
    from mode_jax.model_io.tokenizer import vocab_hash
    if cfg.data.source == "synthetic":
        have, what, name = vocab_hash(ByteTokenizer()), "synthetic data", "the byte test tokenizer"
    else:
        manifest = read_manifest(data_dir(cfg))
        have, what = tokenizer_hash(manifest), f"the data at {data_dir(cfg)}"
        name = manifest.get("tokenizer", {}).get("name", "?")
    want = model_tokenizer_hash(cfg.model.source)
    if have != want:
        raise UserError(f"{what} was tokenized by another tokenizer ({name}, hash {have[:12]}) than the "
                        f"model's ({cfg.model.source}, hash {want[:12]}): rebuild it with "
                        f"`mode-jax data build --model {cfg.model.source}`")


_WORDS = ("the old man walked to the river and saw a small boat near the shore . she said that the "
          "garden was full of light in the morning , and they went home before the rain came . a king "
          "had three sons who lived in a great house by the sea .").split()


def _synthetic_doc(domain: str, rng: np.random.Generator) -> str:
    if domain == "math":
        a, b = int(rng.integers(0, 100)), int(rng.integers(0, 100))
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return f"What is {a} {op} {b}?\n{value}"
    if domain == "code":
        name, k = rng.choice(["f", "g", "step", "scale"]), int(rng.integers(1, 10))
        return f"def {name}{k}(x):\n    y = x * {k}\n    return y + {int(rng.integers(0, 10))}\n"
    start = int(rng.integers(0, len(_WORDS) - 12))
    return " ".join(_WORDS[start:start + int(rng.integers(6, 12))]).capitalize()


@functools.lru_cache(maxsize=4)
def _synthetic(domains: tuple, n_docs: int, seed: int) -> DomainData:
    from mode_jax.data.pack import ByteTokenizer, pack
    tok = ByteTokenizer()
    train, test, validation = {}, {}, {}
    for d in domains:
        # Test and validation texts come from other generator streams than train texts.
        for split, out, salt in (("train", train, 0), ("test", test, 1), ("validation", validation, 2)):
            rng = np.random.default_rng([seed, SYNTHETIC_DOMAINS.index(d), salt])
            out[d] = pack([tok.encode(_synthetic_doc(d, rng)) for _ in range(n_docs)], eos_id=tok.eos_id)
    return DomainData(train, test, tok.vocab_size, "synthetic (byte tokens)", validation=validation)


def synthetic_data(domains, n_docs: int, seed: int) -> DomainData:
    return _synthetic(tuple(domains), n_docs, seed)


def eval_rows(tokens: np.ndarray, seq_len: int, n: int, *, domain: str = "?") -> np.ndarray:
    """int32 [n, seq_len + 1]: n distinct rows spread evenly over a test stream (deterministic)."""
    from mode_jax.data.pack import rows
    view = rows(tokens, seq_len)
    if view.shape[0] < n:
        raise UserError(f"the test split of {domain!r} has {view.shape[0]} rows of data.seq_len + 1 = "
                        f"{seq_len + 1} tokens, fewer than data.eval_sequences = {n}: lower it or build more "
                        f"data (`mode-jax data build`)")
    idx = np.linspace(0, view.shape[0] - 1, num=n).round().astype(np.int64)
    return np.asarray(view[idx], dtype=np.int32)

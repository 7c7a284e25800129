"""An expert as a standalone artifact: one safetensors file that loads on its own.

A file holds, for one domain, the expert's layers in every block and its stage-1
gate (paper section 3.1: stage 1 trains one expert per domain), as float32
tensors named

    block{i}.layer{j}.{attn_norm,wq,wk,wv,wo,mlp_norm,w_gate,w_up,w_down}
    block{i}.gate_w  [D, 2]      block{i}.gate_b  [2]      (column 0: the backbone)

and string metadata: the format tag, the domain, the backbone's shape
(`LlamaConfig` as JSON), the block layout (`ModeConfig` as JSON), the backbone
fingerprint (sha256 of its tensors, see sources.fingerprint), the base model
(`base_model`: its name, where it came from, fingerprint and tokenizer hash) and how
it was trained. `compose` accepts experts trained in separate runs, by other people,
only if every one of them agrees with the backbone in use: a different backbone
shape or width, block layout, or fingerprint is refused with the field named.

Integrity: every file written here (expert, composed model, LoRA, full fine-tune) stores
`sha256`, a checksum over its tensors and its other metadata (integrity.content_sha256),
and is refused when written with a NaN or infinity in it. A load recomputes the sum: a
mismatch is a one-line error naming the file as corrupted; every tensor is then checked
finite, and one that is not is named. A file written before checksums existed (no
`sha256` field) still loads, with a warning on stderr that its integrity cannot be
checked: refusing it would strand every earlier run's experts, and its tensors are still
checked finite.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mode_jax.atomic import atomic_path
from mode_jax.errors import UserError
from mode_jax.integrity import check_finite, content_sha256, strict_json
from mode_jax.ref.config import LlamaConfig, ModeConfig
from mode_jax.ref.llama import layer_keys, layer_shapes

FORMAT = "mode-jax-expert/1"


class ExpertFileError(UserError, ValueError):
    """An expert file that is missing, truncated, of another format, or incompatible."""


@dataclasses.dataclass
class Expert:
    domain: str
    layers: list[list[dict]]                 # [block][layer] -> {key: array}
    gates: list[tuple[np.ndarray, np.ndarray]]  # [block] -> (gate_w [D, 2], gate_b [2])
    llama: LlamaConfig
    mode: ModeConfig                         # n_experts=1
    backbone_fingerprint: str
    training: dict[str, Any]
    path: Path | None = None
    base: dict[str, Any] | None = None       # sources.Backbone.base (None in files that predate it)

    def stage1_model(self, backbone_params: dict) -> dict:
        """The single-expert MoDE param tree around `backbone_params` (ref.mode layout)."""
        return {"backbone": backbone_params,
                "blocks": [{"experts": [layers], "gate_w": w, "gate_b": b}
                           for layers, (w, b) in zip(self.layers, self.gates)]}


def from_stage1(params: dict, *, domain: str, llama: LlamaConfig, mode: ModeConfig, fingerprint: str,
                training: dict[str, Any], base: dict[str, Any] | None = None) -> Expert:
    """The expert held by a trained stage-1 model (one expert per block)."""
    blocks = params["blocks"]
    layers = [[{k: np.asarray(v, np.float32) for k, v in layer.items()} for layer in b["experts"][0]]
              for b in blocks]
    gates = [(np.asarray(b["gate_w"], np.float32), np.asarray(b["gate_b"], np.float32)) for b in blocks]
    return Expert(domain, layers, gates, llama, dataclasses.replace(mode, n_experts=1), fingerprint, training,
                  base=base)


def save_expert(path: str | os.PathLike, expert: Expert) -> Path:
    """Write the expert atomically, with its checksum; returns the path."""
    tensors = {}
    for i, (block, (w, b)) in enumerate(zip(expert.layers, expert.gates)):
        for j, layer in enumerate(block):
            for key in layer_keys(expert.llama):     # Qwen2's q/k/v biases included
                tensors[f"block{i}.layer{j}.{key}"] = np.ascontiguousarray(layer[key], np.float32)
        tensors[f"block{i}.gate_w"] = np.ascontiguousarray(w, np.float32)
        tensors[f"block{i}.gate_b"] = np.ascontiguousarray(b, np.float32)
    metadata = {
        "format": FORMAT, "domain": expert.domain,
        "llama_config": json.dumps(dataclasses.asdict(expert.llama), sort_keys=True),
        "mode_config": json.dumps(dataclasses.asdict(expert.mode), sort_keys=True),
        "backbone_fingerprint": expert.backbone_fingerprint,
        "training": json.dumps(expert.training, sort_keys=True),
    }
    if expert.base is not None:
        metadata["base_model"] = json.dumps(expert.base, sort_keys=True)
    return _write_checked(path, tensors, metadata)


def load_expert(path: str | os.PathLike) -> Expert:
    """Read and check one expert file; raises ExpertFileError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise ExpertFileError(f"expert file {path} does not exist")
    metadata, tensors = _read_checked(path, FORMAT, "a mode-jax expert file")
    try:
        llama = LlamaConfig(**json.loads(metadata["llama_config"]))
        mode = ModeConfig(**json.loads(metadata["mode_config"]))
        training = json.loads(metadata.get("training", "{}"))
        domain, fp = metadata["domain"], metadata["backbone_fingerprint"]
        base = json.loads(metadata["base_model"]) if "base_model" in metadata else None
    except (KeyError, ValueError, TypeError) as err:
        raise ExpertFileError(f"{path}: damaged expert metadata ({type(err).__name__}: {err})") from None
    shapes = layer_shapes(llama)
    layers, gates = [], []
    for i in range(mode.n_blocks):
        block = []
        for j in range(mode.expert_layers):
            layer = {}
            for key in shapes:
                layer[key] = _tensor(tensors, f"block{i}.layer{j}.{key}", shapes[key], path)
            block.append(layer)
        layers.append(block)
        gates.append((_tensor(tensors, f"block{i}.gate_w", (llama.d_model, 2), path),
                      _tensor(tensors, f"block{i}.gate_b", (2,), path)))
    expected = mode.n_blocks * (mode.expert_layers * len(shapes) + 2)
    if len(tensors) != expected:
        raise ExpertFileError(f"{path} holds {len(tensors)} tensors, its metadata implies {expected}")
    return Expert(domain, layers, gates, llama, mode, fp, training, path, base)


def _tensor(tensors: dict, name: str, shape: tuple, path: Path) -> np.ndarray:
    if name not in tensors:
        raise ExpertFileError(f"{path}: tensor {name!r} is missing")
    t = tensors[name]
    if tuple(t.shape) != tuple(shape) or t.dtype != np.float32:
        raise ExpertFileError(f"{path}: tensor {name!r} is {t.dtype}{list(t.shape)}, expected float32{list(shape)}")
    return t


SHA256 = "sha256"   # the metadata field that holds integrity.content_sha256 of the rest
_WARNED: set[str] = set()


def _write_checked(path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> Path:
    """Write `tensors` and `metadata` (plus their checksum) to `path` atomically; a
    non-finite tensor is refused before anything is written."""
    from safetensors.numpy import save_file
    path = Path(path)
    for name in sorted(tensors):
        check_finite(tensors[name], f"refusing to write {path}: tensor {name!r}", error=ExpertFileError)
    metadata = {**metadata, SHA256: content_sha256(tensors, metadata)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _read_checked(path: Path, fmt: str, what: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata without the checksum, tensors) of an artifact of format `fmt`, checked:
    readable, of that format, checksum matching (when present), every tensor finite."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for bad files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ExpertFileError(f"{path} is not a readable safetensors file: corrupted, truncated or of "
                              f"another format ({reason})") from None
    if metadata.get("format") != fmt:
        raise ExpertFileError(f"{path} is not {what} (metadata format is {metadata.get('format')!r}, "
                              f"expected {fmt!r})")
    stored = metadata.pop(SHA256, None)
    if stored is None:
        if str(path) not in _WARNED:     # once per file: a command may read it twice
            _WARNED.add(str(path))
            print(f"warning: {path} has no checksum (written before mode-jax stored one): its integrity "
                  "cannot be checked; its tensors are still checked finite", file=sys.stderr)
    elif content_sha256(tensors, metadata) != stored:
        bad = _first_nonfinite(tensors)
        raise ExpertFileError(f"{path} is corrupted: its content does not match the sha256 in its metadata "
                              f"({stored[:16]}...){f'; tensor {bad!r} holds NaN or infinite values' if bad else ''}"
                              "; restore it from a good copy or retrain it")
    for name in sorted(tensors):
        check_finite(tensors[name], f"{path}: tensor {name!r}", error=ExpertFileError)
    return metadata, tensors


def _first_nonfinite(tensors: dict[str, np.ndarray]) -> str | None:
    return next((n for n in sorted(tensors) if not np.isfinite(tensors[n]).all()), None)


# Fields whose disagreement makes experts incompatible, with the name users see.
_LLAMA_FIELDS = {"d_model": "width (llama_config.d_model)", "n_layers": "backbone depth (llama_config.n_layers)",
                 "n_heads": "llama_config.n_heads", "n_kv_heads": "llama_config.n_kv_heads",
                 "head_dim": "llama_config.head_dim", "d_ff": "llama_config.d_ff",
                 "vocab_size": "llama_config.vocab_size", "rope_theta": "llama_config.rope_theta",
                 "norm_eps": "llama_config.norm_eps", "tie_embeddings": "llama_config.tie_embeddings"}
_MODE_FIELDS = {"n_blocks": "block layout (mode_config.n_blocks)",
                "expert_layers": "block layout (mode_config.expert_layers)"}


def describe_base(base: dict[str, Any] | None, fingerprint: str | None = None) -> str:
    """'NAME (SOURCE, fingerprint ABC..., tokenizer DEF...)' for error messages."""
    if not base:
        return f"an unnamed base model (fingerprint {str(fingerprint)[:12]}...)"
    tok = base.get("tokenizer_hash")
    return (f"{base.get('name')} ({base.get('source')}, fingerprint {str(base.get('fingerprint'))[:12]}..."
            f"{f', tokenizer {tok[:12]}...' if tok else ''})")


def _same_base(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Equal tensors and tokenizer; a file without a base record is judged by fingerprint alone."""
    if not a or not b:
        return True
    return a.get("fingerprint") == b.get("fingerprint") and a.get("tokenizer_hash") == b.get("tokenizer_hash")


def check_compatible(expert: Expert, *, llama: LlamaConfig, mode: ModeConfig, fingerprint: str,
                     against: str = "this run's backbone", base: dict[str, Any] | None = None) -> None:
    """Refuse an expert that does not fit (naming the first differing field; for another base
    model, naming both)."""
    where = expert.path or f"expert {expert.domain!r}"
    if not _same_base(expert.base, base):
        raise ExpertFileError(f"{where}: base model differs: the expert was trained on "
                              f"{describe_base(expert.base)}, {against} is {describe_base(base)}")
    for field, label in _LLAMA_FIELDS.items():
        mine, theirs = getattr(expert.llama, field), getattr(llama, field)
        if mine != theirs:
            raise ExpertFileError(f"{where}: {label} differs: {mine} in the expert, {theirs} in {against}")
    for field, label in _MODE_FIELDS.items():
        mine, theirs = getattr(expert.mode, field), getattr(mode, field)
        if mine != theirs:
            raise ExpertFileError(f"{where}: {label} differs: {mine} in the expert, {theirs} in {against}")
    if expert.backbone_fingerprint != fingerprint:
        raise ExpertFileError(f"{where}: backbone fingerprint differs: the expert was trained on backbone "
                              f"{expert.backbone_fingerprint[:16]}..., {against} is {fingerprint[:16]}...")


def load_compatible(paths, *, llama: LlamaConfig, mode: ModeConfig, fingerprint: str,
                    base: dict[str, Any] | None = None) -> list[Expert]:
    """Load several expert files, each checked against the others and the backbone in use
    (`base`: sources.Backbone.base)."""
    experts = [load_expert(p) for p in paths]
    domains = [e.domain for e in experts]
    dup = sorted({d for d in domains if domains.count(d) > 1})
    if dup:
        raise ExpertFileError(f"two experts for the same domain {dup[0]!r}: compose one expert per domain")
    for a in experts[1:]:
        first = experts[0]
        if not _same_base(first.base, a.base):
            raise ExpertFileError(f"the experts have different base models: {first.path} was trained on "
                                  f"{describe_base(first.base, first.backbone_fingerprint)}, {a.path} on "
                                  f"{describe_base(a.base, a.backbone_fingerprint)}")
    for e in experts:
        check_compatible(e, llama=llama, mode=mode, fingerprint=fingerprint, base=base)
    return experts


# ----------------------------------------------------------------------------- whole adapted models

MODEL_FORMAT = "mode-jax-model/1"


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts/lists of arrays -> {"blocks/0/experts/1/0/wq": array}."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: np.ascontiguousarray(np.asarray(tree, np.float32))}
    out = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def unflatten(flat: dict[str, np.ndarray]):
    """Inverse of `flatten` (all-digit keys become list indices)."""
    root: dict = {}
    for key, value in flat.items():
        node, parts = root, key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def fix(node):
        if not isinstance(node, dict):
            return node
        if node and all(k.isdigit() for k in node):
            return [fix(node[str(i)]) for i in range(len(node))]
        return {k: fix(v) for k, v in node.items()}
    return fix(root)


def save_model(path, params: dict, *, method: str, metadata: dict[str, Any]) -> Path:
    """The adapted part of a model (everything but a frozen backbone; all of it for full FT)."""
    part = params if method == "full" else {k: v for k, v in params.items() if k != "backbone"}
    meta = {**{k: strict_json(v) for k, v in metadata.items()}, "format": MODEL_FORMAT, "method": method}
    return _write_checked(path, flatten(part), meta)


def model_info(path) -> tuple[str, dict[str, Any]]:
    """(method, metadata) of a saved adapted model, checked (format, checksum, finite tensors)
    without a backbone: what a command reads before it loads one (e.g. the domains of stage-1
    files). ExpertFileError for a file that is missing or not a model file."""
    path = Path(path)
    if not path.is_file():
        raise ExpertFileError(f"model file {path} does not exist")
    meta, _ = _read_checked(path, MODEL_FORMAT, "a mode-jax model file")
    return meta["method"], {k: json.loads(v) for k, v in meta.items() if k not in ("format", "method")}


def load_model(path, backbone_params: dict, *, fingerprint: str) -> tuple[dict, str, dict[str, Any]]:
    """(params, method, metadata) of a saved adapted model around `backbone_params`."""
    path = Path(path)
    if not path.is_file():
        raise ExpertFileError(f"model file {path} does not exist")
    meta, flat = _read_checked(path, MODEL_FORMAT, "a mode-jax model file")
    info = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "method")}
    if info.get("backbone_fingerprint") != fingerprint:
        raise ExpertFileError(f"{path}: backbone fingerprint differs: the model was trained on "
                              f"{describe_base(info.get('base_model'), info.get('backbone_fingerprint'))}, "
                              f"the backbone in use is {fingerprint[:16]}...")
    part = unflatten(flat)
    params = part if meta["method"] == "full" else {"backbone": backbone_params, **part}
    return params, meta["method"], info

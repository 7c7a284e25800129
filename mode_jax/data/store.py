"""The data directory: one .npy token file per domain and split, and a manifest that vouches for them.

    <data_dir>/manifest.json
    <data_dir>/<domain>/<split>.npy      1-D uint16 or uint32 token stream (see pack.py)

The manifest's "dtype" says which (uint32 when the vocabulary exceeds 65,536 ids) and
its "tokenizer" section names the tokenizer and its `vocab_hash`, which every command
checks against the model's. Manifests written before those fields existed load as
uint16 data tokenized by SmolLM2-135M (`LEGACY_TOKENIZER_HASH`).

Every file is written under a temporary name and renamed into place
(`mode_jax.atomic`), and the manifest, which holds each file's size, sha256 and
token count, is written last. `load_split` trusts a file only if it matches the
manifest, so an interrupted or partial build (new .npy files, old or no
manifest) is detected and reported instead of being read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mode_jax.atomic import atomic_path, write_text_atomic
from mode_jax.data.pack import STORE_DTYPES, TOKEN_DTYPE
from mode_jax.errors import UserError
from mode_jax.model_io.fetch import default_cache_dir, sha256_file

MANIFEST = "manifest.json"
FORMAT = "mode-jax-data/1"
BUILD_HINT = "mode-jax data build"
# vocab_hash of SmolLM2-135M-Instruct's tokenizer (its GGUF, pinned in mode_jax.model_io.fetch): the
# tokenizer of every manifest that predates the "hash" field (tests/test_own_domains.py
# recomputes it from the fetched GGUF).
LEGACY_TOKENIZER_HASH = "cacfb388aaf43ea87273192c89695af361ae0821bb832a6ef7a164045837df3e"
# ... and of the byte test tokenizer (data.pack.ByteTokenizer), for old "kind": "bytes" manifests.
LEGACY_BYTES_HASH = "7b4df67a7e1911a3ed760c4970a959fd20725e8977766ac4189a0b9a7f029136"


class DataError(UserError, ValueError):
    """Missing, incomplete or corrupted built data (says which command makes it)."""


def default_data_dir() -> Path:
    """$XDG_CACHE_HOME/mode-jax/data (or ~/.cache/mode-jax/data)."""
    return default_cache_dir() / "data"


def split_path(data_dir: str | os.PathLike, domain: str, split: str) -> Path:
    return Path(data_dir) / domain / f"{split}.npy"


def write_tokens(data_dir: str | os.PathLike, domain: str, split: str, tokens: np.ndarray,
                 dtype=TOKEN_DTYPE) -> dict[str, Any]:
    """Write one split's tokens (as `dtype`) atomically; returns its manifest entry."""
    tokens = np.ascontiguousarray(tokens, dtype=dtype)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    path = split_path(data_dir, domain, split)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:   # a file object: np.save(path) would append ".npy" to the temp name
            np.save(f, tokens, allow_pickle=False)
    return {"file": f"{domain}/{split}.npy", "tokens": int(tokens.shape[0]),
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(data_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write manifest.json atomically (sorted keys, so equal builds give equal bytes)."""
    path = Path(data_dir) / MANIFEST
    write_text_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"no data at {data_dir} ({MANIFEST} is missing): run `{BUILD_HINT} --out {data_dir}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}): rerun `{BUILD_HINT} --out {data_dir}`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} manifest: rerun `{BUILD_HINT} --out {data_dir}`")
    if manifest.get("dtype", "uint16") not in STORE_DTYPES:
        raise DataError(f"{path} names token dtype {manifest.get('dtype')!r}, not one of {', '.join(STORE_DTYPES)}")
    return manifest


def manifest_dtype(manifest: Mapping[str, Any]) -> np.dtype:
    """The token files' dtype (uint16 for manifests that predate the field)."""
    return np.dtype(manifest.get("dtype", "uint16"))


def tokenizer_hash(manifest: Mapping[str, Any]) -> str:
    """The vocab_hash of the tokenizer the data was built with (see LEGACY_TOKENIZER_HASH)."""
    tok = manifest.get("tokenizer", {})
    if tok.get("hash"):
        return tok["hash"]
    return LEGACY_BYTES_HASH if tok.get("kind") == "bytes" else LEGACY_TOKENIZER_HASH


def domain_names(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """The domains the data holds, in the manifest's (sorted) order."""
    return tuple(manifest.get("domains", {}))


def split_entry(manifest: Mapping[str, Any], data_dir, domain: str, split: str) -> dict[str, Any]:
    domains = manifest.get("domains", {})
    if domain not in domains:
        raise DataError(f"domain {domain!r} is not in the data at {data_dir} (it has: "
                        f"{', '.join(sorted(domains)) or 'none'}): run `{BUILD_HINT} --out {data_dir}`")
    splits = domains[domain].get("splits", {})
    if split not in splits:
        raise DataError(f"split {split!r} of {domain!r} is not in the data at {data_dir} "
                        f"(it has: {', '.join(sorted(splits)) or 'none'})")
    return splits[split]


def verify_file(data_dir, entry: Mapping[str, Any], *, check_hash: bool = True) -> Path:
    """Check one file against its manifest entry: exists, same size, same sha256."""
    path = Path(data_dir) / entry["file"]
    rebuild = f"rerun `{BUILD_HINT} --out {data_dir}`"
    if not path.exists():
        raise DataError(f"{path} is missing: {rebuild}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise DataError(f"{path} has {size} bytes, the manifest says {entry['bytes']} (truncated, or "
                        f"left by an interrupted build): {rebuild}")
    if check_hash:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise DataError(f"{path} does not match the manifest (sha256 {digest[:16]}..., expected "
                            f"{entry['sha256'][:16]}...): it is corrupted or from another build; {rebuild}")
    return path


def load_split(data_dir: str | os.PathLike, domain: str, split: str, *, verify: bool = True) -> np.ndarray:
    """The token stream of one domain's split: read-only memory-mapped 1-D uint16/uint32 array.

    With `verify` (the default) the file's sha256 is checked against the manifest
    (about 0.1 s per 10M tokens); size and shape are always checked."""
    manifest = read_manifest(data_dir)
    entry = split_entry(manifest, data_dir, domain, split)
    path = verify_file(data_dir, entry, check_hash=verify)
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise DataError(f"{path} is not a readable .npy file ({err}): rerun `{BUILD_HINT} --out {data_dir}`") from None
    dtype = manifest_dtype(manifest)
    if tokens.dtype != dtype or tokens.ndim != 1 or tokens.shape[0] != entry["tokens"]:
        raise DataError(f"{path} holds {tokens.dtype}{list(tokens.shape)}, the manifest says "
                        f"{dtype.name}[{entry['tokens']}]: rerun `{BUILD_HINT} --out {data_dir}`")
    return tokens


def verify_all(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Check every file the manifest lists; returns the manifest."""
    manifest = read_manifest(data_dir)
    for domain in manifest["domains"]:
        for split in manifest["domains"][domain]["splits"]:
            load_split(data_dir, domain, split, verify=True)
    return manifest

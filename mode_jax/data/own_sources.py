"""Your own domains: `--domain NAME=SOURCE`, where SOURCE is a file or folder of yours.

| SOURCE                               | one document is                                  |
| ------------------------------------ | ------------------------------------------------ |
| `notes.jsonl` (or `notes.jsonl:body`) | the text field ("text", or `--text-field`, or the name after the colon) of one line's JSON object |
| a folder (`corpus/`)                 | one file; every non-hidden file under it, recursively, in sorted path order |
| a glob (`"corpus/**/*.md"`)          | one matching file, in sorted path order           |
| any other file (`book.txt`)          | one paragraph: text between blank lines           |

A bare NAME (`--domain math`) is one of the built-in recipes (math, code, english,
english-modern: sources.py and mathgen.py). Every file must be UTF-8 text (a leading BOM is dropped);
a file that is not, a JSON line without the field, or a source with no non-empty
document is a one-line error, found by `check` before the build writes anything.
Documents then go through the same dedup, hash split and packing as the built-in ones.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mode_jax.errors import UserError

BUILTIN = ("math", "code", "english", "english-modern")       # named recipes (data/build.py)
NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")   # a folder and a file-name part
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class DomainSpec:
    name: str
    recipe: str                 # a built-in recipe (BUILTIN) or "own"
    source: str | None = None   # what the user gave (path, folder or glob), for "own"
    field: str = "text"         # JSON-lines text field


def check_name(name: str) -> str:
    """`name` if it can name a domain (letters, digits, '_', '-'; it becomes a folder name)."""
    if not isinstance(name, str) or not NAME_RULE.match(name):
        raise UserError(f"domain name {name!r} is not valid: use letters, digits, '_' and '-' "
                        "(at most 64, starting with a letter or digit)")
    return name


def parse_domain(arg: str, *, text_field: str = "text") -> DomainSpec:
    """`NAME` (a built-in recipe) or `NAME=SOURCE` (`NAME=FILE.jsonl:FIELD` picks the field)."""
    name, sep, source = arg.partition("=")
    name = name.strip()
    if not sep:
        if name not in BUILTIN:
            raise UserError(f"unknown domain(s) {name}: a built-in recipe is one of {', '.join(BUILTIN)}; "
                            "your own data is --domain NAME=SOURCE")
        return DomainSpec(name, name)
    check_name(name)
    if not source:
        raise UserError(f"--domain {arg!r} gives no SOURCE after '='")
    head, colon, field = source.rpartition(":")
    if colon and head.endswith(".jsonl") and field and "/" not in field:
        source, text_field = head, field
    return DomainSpec(name, "own", source, text_field)


def parse_domains(args, *, text_field: str = "text") -> tuple[DomainSpec, ...]:
    specs = tuple(parse_domain(a, text_field=text_field) for a in args)
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"domain {dup[0]!r} is given twice: each --domain needs its own name")
    if not specs:
        raise UserError("no domain given: --domain NAME=SOURCE (or a built-in: math, code, english)")
    return specs


def kind(spec: DomainSpec) -> str:
    """"jsonl", "files" (a folder or glob) or "text" (one file, paragraphs)."""
    if any(c in spec.source for c in GLOB_CHARS) or Path(spec.source).is_dir():
        return "files"
    return "jsonl" if spec.source.endswith(".jsonl") else "text"


def files(spec: DomainSpec) -> list[Path]:
    """The files a source reads, in order (existence checked)."""
    src = spec.source
    if any(c in src for c in GLOB_CHARS):
        found = sorted(Path(p) for p in globlib.glob(src, recursive=True) if Path(p).is_file())
        if not found:
            raise UserError(f"domain {spec.name!r}: no file matches {src!r}")
        return found
    path = Path(src)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise UserError(f"domain {spec.name!r}: folder {src} holds no files")
        return found
    if not path.is_file():
        raise UserError(f"domain {spec.name!r}: source {src} does not exist")
    return [path]


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); "
                        "convert it or leave it out of the source") from None


def documents(spec: DomainSpec) -> Iterator[str]:
    """The source's documents in order (empty ones included: the build counts and skips them)."""
    how = kind(spec)
    for path in files(spec):
        text = _text(path)
        if how == "files":
            yield text
        elif how == "text":
            yield from (p.strip("\n") for p in re.split(r"\n(?:[ \t\r]*\n)+", text))
        else:
            yield from _jsonl(path, text, spec.field)


def _jsonl(path: Path, text: str, field: str) -> Iterator[str]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise UserError(f"{path}: line {number} is not JSON ({err})") from None
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            has = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{path}: line {number} has no text field {field!r} (it has: {has}); "
                            "name the field with --text-field or NAME=FILE.jsonl:FIELD")
        yield value


def check(spec: DomainSpec) -> int:
    """Read the whole source once; the number of non-empty documents (an error if none)."""
    n = sum(1 for doc in documents(spec) if doc.strip())
    if n == 0:
        raise UserError(f"domain {spec.name!r}: {spec.source} holds no non-empty document")
    return n


def describe(spec: DomainSpec) -> dict[str, Any]:
    """The manifest's "source" entry: names relative to the source (no absolute paths, so
    the same files give the same manifest anywhere) and one sha256 over every file read."""
    paths = files(spec)
    how = kind(spec)
    base = Path(spec.source) if how == "files" and Path(spec.source).is_dir() else None
    digest = hashlib.sha256()
    for p in paths:
        rel = p.relative_to(base).as_posix() if base else p.name
        digest.update(f"{rel}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    info: dict[str, Any] = {"kind": how, "given": Path(spec.source).name or spec.source, "files": len(paths),
                            "sha256": digest.hexdigest(),
                            "document": {"jsonl": f"the {spec.field!r} field of one JSON line",
                                         "files": "one file, in sorted path order",
                                         "text": "one paragraph (text between blank lines)"}[how]}
    if how == "jsonl":
        info["field"] = spec.field
    return info

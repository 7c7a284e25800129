"""`mode-jax data build` / `data info` end to end, on tiny local sources with the byte tokenizer
(one token per UTF-8 byte, EOS = 2), so the expected files can be recounted by hand."""

from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import pytest

from mode_jax import cli
from mode_jax.data import build as build_module
from mode_jax.data import store
from mode_jax.data.pack import ByteTokenizer
from mode_jax.data.split import DEFAULT_FRACTIONS
from mode_jax.errors import UserError

EOS, OFFSET = 2, 3

CODE_FILES = {
    "pkg/__init__.py": "",                                   # empty: skipped
    "pkg/a.py": "def f(x):\n    return x + 1\n",
    "pkg/b.py": "import math\n\nprint(math.pi)\n",
    "pkg/copy_of_a.py": "def f(x):\n    return x + 1\n",     # duplicate of a.py: dropped
    "pkg/sub/c.py": "class C:\n    '''Unicode: ∂x/∂t'''\n",
} | {f"pkg/gen/m{i:02d}.py": f"VALUE_{i} = {i * i}\n# {'pad ' * i}\n" for i in range(40)}


def _chapters():
    verses = []
    for book in ("Genesis", "Exodus", "Ruth"):
        for chapter in range(1, 9):
            for verse in range(1, 4):
                verses.append({"book": book, "chapter": chapter, "verse": verse,
                               "text": f"{book} says {chapter * verse} things, verse {verse}."})
    return verses


@pytest.fixture(scope="module")
def local_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    code = root / "code.whl"
    with zipfile.ZipFile(code, "w") as zf:
        for name, text in sorted(CODE_FILES.items()):
            zf.writestr(name, text)
    english = root / "kjv.jsonl"
    english.write_text("".join(json.dumps(v) + "\n" for v in _chapters()))
    return code, english


def _build(out, sources, *extra):
    code, english = sources
    return cli.main(["data", "build", "--out", str(out), "--tokenizer", "bytes", "--math-examples", "112",
                     "--code-source", str(code), "--english-source", str(english), "-q", *extra])


def _expected_split(text: str, domain: str) -> str:
    f = DEFAULT_FRACTIONS[domain]
    u = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16) / 2**64
    return "test" if u < f.test else "validation" if u < f.test + f.validation else "train"


def _expected_streams(docs: list[str], domain: str) -> dict[str, list[int]]:
    streams = {"train": [], "validation": [], "test": []}
    for doc in docs:
        streams[_expected_split(doc, domain)] += [b + OFFSET for b in doc.encode("utf-8")] + [EOS]
    return streams


@pytest.fixture(scope="module")
def built(tmp_path_factory, local_sources):
    out = tmp_path_factory.mktemp("data") / "out"
    assert _build(out, local_sources, "--workers", "2") == 0
    return out


def test_build_writes_exactly_the_expected_code_and_english_tokens(built):
    code_docs = [CODE_FILES[n] for n in sorted(CODE_FILES) if CODE_FILES[n].strip() and n != "pkg/copy_of_a.py"]
    chapters: dict = {}
    for v in _chapters():
        chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    english_docs = [f"{b} {c}\n\n" + "\n".join(t) for (b, c), t in chapters.items()]
    manifest = json.loads((built / "manifest.json").read_text())
    for domain, docs in (("code", code_docs), ("english", english_docs)):
        expected = _expected_streams(docs, domain)
        for split, stream in expected.items():
            tokens = store.load_split(built, domain, split)
            assert tokens.tolist() == stream, (domain, split)
            entry = manifest["domains"][domain]["splits"][split]
            assert entry["tokens"] == len(stream)
            assert entry["documents"] == stream.count(EOS)
    assert manifest["domains"]["code"]["documents"] == {"read": 45, "empty_skipped": 1, "duplicates_dropped": 1,
                                                        "kept": 43}
    assert manifest["domains"]["english"]["documents"]["kept"] == 24


def test_build_math_documents_are_unique_pairs_in_their_hash_split(built):
    manifest = json.loads((built / "manifest.json").read_text())
    entry = manifest["domains"]["math"]
    assert entry["source"]["package"] == "mathematics-dataset" and entry["source"]["version"] == "1.0.1"
    assert len(entry["source"]["modules"]) == 56
    seen = set()
    for split in ("train", "validation", "test"):
        tokens = store.load_split(built, "math", split)
        text = bytes(int(t) - OFFSET if t != EOS else 0 for t in tokens).decode("utf-8")
        docs = text.split("\0")
        assert docs[-1] == ""                               # the stream ends with an EOS
        docs = docs[:-1]
        assert len(docs) == entry["splits"][split]["documents"]
        for doc in docs:
            question, answer = doc.split("\n")
            assert question and answer
            assert _expected_split(doc, "math") == split
        seen.update(docs)
    assert len(seen) == entry["documents"]["kept"] == 112 - entry["documents"]["duplicates_dropped"]


def test_build_is_deterministic(built, local_sources, tmp_path):
    again = tmp_path / "again"
    assert _build(again, local_sources, "--workers", "1") == 0     # another worker count, same bytes
    assert (again / "manifest.json").read_bytes() == (built / "manifest.json").read_bytes()
    for path in built.rglob("*.npy"):
        assert (again / path.relative_to(built)).read_bytes() == path.read_bytes()


def test_info_prints_the_manifest_table(built, capsys):
    assert cli.main(["data", "info", "--dir", str(built), "--verify"]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((built / "manifest.json").read_text())
    n = manifest["domains"]["english"]["splits"]["test"]["tokens"]
    assert f"{n:,}" in out and "mathematics-dataset==1.0.1" in out and "all files match" in out


def test_bad_input_is_one_line_exit_2_and_writes_nothing(local_sources, tmp_path, capsys):
    out = tmp_path / "out"
    for extra, message in ((["--domains", "math,poetry"], "unknown domain(s) poetry"),
                           (["--math-examples", "0"], "--math-examples must be >= 1"),
                           (["--code-source", str(tmp_path / "missing.whl")], "does not exist")):
        assert _build(out, local_sources, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and err.startswith("mode-jax data: error:")
        assert not out.exists()
    assert cli.main(["data", "info", "--dir", str(out)]) == 2
    assert "run `mode-jax data build" in capsys.readouterr().err


def test_interrupted_build_leaves_nothing_trusted(local_sources, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _build(out, local_sources, "--domains", "code,english") == 0
    old = store.load_split(out, "code", "train").copy()
    calls = []
    real_write = store.write_tokens

    def write_then_die(*args, **kwargs):
        calls.append(args[1:3])
        if len(calls) == 4:                    # english/train: code is rewritten, english is not
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(store, "write_tokens", write_then_die)
    (out / "english" / ".train.npy.tmp-leftover").write_bytes(b"from a killed build")
    assert _build(out, local_sources, "--domains", "code,english", "--max-documents", "5") == 130
    assert not (out / "manifest.json").exists()
    with pytest.raises(store.DataError, match="run `mode-jax data build"):
        store.load_split(out, "code", "train")
    monkeypatch.setattr(store, "write_tokens", real_write)
    assert _build(out, local_sources, "--domains", "code,english") == 0
    assert np.array_equal(store.load_split(out, "code", "train"), old)
    assert not list(out.rglob(".*tmp-*"))     # the stale temporary file was removed


def test_build_refuses_an_out_path_that_is_a_file(local_sources, tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        build_module.build(build_module.BuildConfig(out=out, download_dir=tmp_path, domains=("code",),
                                                    code_source=local_sources[0]),
                           tokenizer=ByteTokenizer(), tokenizer_info={})


# ----------------------------------------------------------------------------- own domains

def test_own_sources_read_paragraphs_files_and_globs(tmp_path):
    from mode_jax.data import own_sources
    from mode_jax.data.own_sources import DomainSpec, parse_domain

    book = tmp_path / "book.txt"
    book.write_bytes("\ufeffFirst para,\nsecond line.\n\n \t\nSecond para.\n\n\n".encode("utf-8"))   # BOM dropped
    docs = list(own_sources.documents(parse_domain(f"b={book}")))
    assert docs == ["First para,\nsecond line.", "Second para.", ""]
    assert own_sources.check(parse_domain(f"b={book}")) == 2
    folder = tmp_path / "notes"
    for rel, text in (("b.txt", "bee"), ("a/c.md", "sea"), (".hidden", "no"), ("a/.git/x", "no")):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    assert list(own_sources.documents(parse_domain(f"n={folder}"))) == ["sea", "bee"]   # sorted paths, no dot-files
    assert list(own_sources.documents(parse_domain(f"g={folder}/**/*.md"))) == ["sea"]
    assert parse_domain("x=data.jsonl:body") == DomainSpec("x", "own", "data.jsonl", "body")
    assert parse_domain("x=odd:name.jsonl", text_field="t") == DomainSpec("x", "own", "odd:name.jsonl", "t")
    assert parse_domain("code") == DomainSpec("code", "code")


def test_own_and_builtin_domains_build_together(local_sources, tmp_path):
    code, _english = local_sources
    notes = tmp_path / "notes.jsonl"
    texts = [f"note {i}: {'la ' * (i % 5)}end" for i in range(30)] + ["note 3: la la la end", ""]
    notes.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out"
    assert cli.main(["data", "build", "--out", str(out), "--tokenizer", "bytes", "-q", "--code-source", str(code),
                     "--domain", "code", "--domain", f"notes={notes}", "--split", "0.1,0.2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["domains"]) == ["code", "notes"]
    entry = manifest["domains"]["notes"]
    assert entry["documents"] == {"read": 32, "empty_skipped": 1, "duplicates_dropped": 1, "kept": 30}
    assert entry["split_fractions"] == {"train": 0.7, "validation": 0.1, "test": 0.2}
    assert entry["source"]["sha256"] == hashlib.sha256(
        f"notes.jsonl\0{hashlib.sha256(notes.read_bytes()).hexdigest()}\n".encode()).hexdigest()
    streams = {"train": [], "validation": [], "test": []}
    for t in texts[:30]:
        u = int(hashlib.sha256(t.encode()).hexdigest()[:16], 16) / 2**64
        streams["test" if u < 0.2 else "validation" if u < 0.3 else "train"] += [b + OFFSET for b in t.encode()] + [EOS]
    for split, ids in streams.items():
        assert store.load_split(out, "notes", split).tolist() == ids
    # the same files give the same bytes, wherever they are built
    again = tmp_path / "again"
    assert cli.main(["data", "build", "--out", str(again), "--tokenizer", "bytes", "-q", "--code-source", str(code),
                     "--domain", "code", "--domain", f"notes={notes}", "--split", "0.1,0.2"]) == 0
    for f in sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()):
        assert (again / f).read_bytes() == (out / f).read_bytes(), f

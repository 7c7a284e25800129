"""The english-modern retention domain (issue #13): Django's documentation reduced to prose,
split by page (release-note series as one unit), built with the byte tokenizer from a local
docs folder so that the expected files can be recounted by hand."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from mode_jax import cli
from mode_jax.data import store
from mode_jax.data.build import ENGLISH_MODERN_FRACTIONS
from mode_jax.data.sources import docs_unit, english_modern_documents, rest_to_prose
from mode_jax.pipeline import presets, stages

EOS, OFFSET = 2, 3

PAGE = """\
.. _sessions:

===================
How to use sessions
===================

.. module:: django.contrib.sessions
   :synopsis: Provides session management.

Django supports :ref:`anonymous sessions <anon>` and the :setting:`MIDDLEWARE`
setting. See the :doc:`cache documentation
</topics/cache>` or `the site <https://example.org>`_. Use ``manage.py``.

For example::

    def view(request):
        return 1

Done.

.. code-block:: python

    x = 1

.. note::

    A note stays.

+-----+-----+
"""
PROSE = """\
How to use sessions

Django supports anonymous sessions and the MIDDLEWARE
setting. See the cache documentation or the site. Use manage.py.

For example:

Done.

    A note stays.
"""


def test_rest_to_prose_by_hand():
    assert rest_to_prose(PAGE) == PROSE


def test_release_notes_of_one_series_share_a_unit():
    assert [docs_unit(p) for p in ("releases/5.0.txt", "releases/5.0.3.txt", "releases/5.1.txt",
                                   "releases/index.txt", "topics/http/sessions.txt")] == \
        ["releases/5.0", "releases/5.0", "releases/5.1", "releases/index.txt", "topics/http/sessions.txt"]


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    pages = {"topics/sessions.txt": PAGE, "releases/5.0.txt": "Django 5.0 notes\n\nNew things.\n",
             "releases/5.0.1.txt": "Django 5.0.1 notes\n\nFixes.\n"} | {
        f"ref/page{i:02d}.txt": f"Page {i}\n=======\n\nModern prose number {i}, said plainly.\n" for i in range(30)}
    for name, text in pages.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root, pages


def _split(unit: str) -> str:
    f = ENGLISH_MODERN_FRACTIONS
    u = int(hashlib.sha256(unit.encode("utf-8")).hexdigest()[:16], 16) / 2**64
    return "test" if u < f.test else "validation" if u < f.test + f.validation else "train"


def test_build_writes_the_expected_streams(docs, tmp_path):
    root, pages = docs
    assert [u for u, _ in english_modern_documents(root)] == [docs_unit(p) for p in sorted(pages)]
    out = tmp_path / "data"
    assert cli.main(["data", "build", "--out", str(out), "--tokenizer", "bytes", "--domain", "english-modern",
                     "--english-modern-source", str(root), "-q"]) == 0
    expected = {"train": [], "validation": [], "test": []}
    for name in sorted(pages):                      # sorted path order, split by unit
        expected[_split(docs_unit(name))] += [b + OFFSET for b in rest_to_prose(pages[name]).encode()] + [EOS]
    assert sum(len(v) > 0 for v in expected.values()) >= 2
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["domains"]["english-modern"]
    assert entry["split_fractions"] == {"train": 0.75, "validation": 0.05, "test": 0.2}
    assert entry["source"]["replaces"] == "django==6.1.3" and entry["documents"]["kept"] == len(pages)
    for split, ids in expected.items():
        np.testing.assert_array_equal(store.load_split(out, "english-modern", split), np.array(ids, np.uint16))


def test_retention_takes_both_english_sets(docs, tmp_path):
    root, _ = docs
    kjv = tmp_path / "kjv.jsonl"
    kjv.write_text("".join(json.dumps({"book": "Ruth", "chapter": c, "verse": v, "text": f"Verse {c}.{v} of many."})
                           + "\n" for c in range(1, 30) for v in range(1, 4)))
    own = tmp_path / "notes.jsonl"
    own.write_text("".join(json.dumps({"text": f"note {i}: " + "word " * (i % 7 + 3)}) + "\n" for i in range(300)))
    out = tmp_path / "data"
    assert cli.main(["data", "build", "--out", str(out), "--tokenizer", "bytes", "--domain", "english",
                     "--domain", "english-modern", "--domain", f"notes={own}", "--english-source", str(kjv),
                     "--english-modern-source", str(root), "-q"]) == 0
    cfg = presets.load_config(preset="smoke", overrides=[
        'data.source="built"', f'data.dir="{out}"', "data.seq_len=8", "data.eval_sequences=4",
        'domains.targets=["notes"]', 'domains.retention=["english", "english-modern"]'])
    assert cfg.eval_domains == ("notes", "english", "english-modern")
    stages.check_inputs(cfg, cfg.eval_domains)       # both English sets are domains of the data
    gpu = presets.load_config(preset="gpu")
    assert gpu.domains.retention == ("english", "english-modern")

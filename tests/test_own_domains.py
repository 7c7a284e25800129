"""Bring your own domains, end to end: two corpora of the user's own files (a JSON-lines file
and a folder of text files, written here), a tokenizer trained on them, a tiny random
backbone saved as a Hugging Face directory; `data build --domain` -> `train-expert` on each
-> `compose` -> `eval`, all through the CLI as a user would run it.

The expected token files are recomputed independently: the split from the documented
hash rule, the ids from the `tokenizers` library reading the same tokenizer.json.
To extend this to another backbone, give `_model` another writer (tests/tiny_hf.py).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from mode_jax.cli import main
from mode_jax.data import store
from mode_jax.pipeline import expert_io
from tests import tiny_hf

SPLIT = ("0.1", "0.3")   # validation, test: enough test rows for 8 eval rows of 33 tokens


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = tiny_hf.make_world(tmp_path_factory.mktemp("own"))
    data = world["data"] = world["root"] / "data"
    assert main(["data", "build", "--out", str(data), "--model", str(world["model"]), "-q", "--split",
                 ",".join(SPLIT), "--domain", f"recipes={world['jsonl']}:body", "--domain",
                 f"weather={world['folder']}"]) == 0
    return world


def _expected(docs, tok, eos: int) -> dict[str, list[int]]:
    """The split streams by the rule in docs/DATA.md, tokenized by `tokenizers` itself."""
    validation, test = map(float, SPLIT)
    out = {"train": [], "validation": [], "test": []}
    for doc in docs:
        u = int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") / 2**64
        split = "test" if u < test else "validation" if u < test + validation else "train"
        out[split] += tok.encode(doc, add_special_tokens=False).ids + [eos]
    return out


def test_build_from_own_files_matches_an_independent_recount(world):
    tok, data = world["tok"], world["data"]
    manifest = json.loads((data / "manifest.json").read_text())
    eos = tok.token_to_id(tiny_hf.EOS)
    assert sorted(manifest["domains"]) == ["recipes", "weather"]
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["eos_id"] == eos
    assert manifest["tokenizer"]["kind"] == "hf" and manifest["tokenizer"]["vocab_size"] == tok.get_vocab_size()
    # the hash is over the vocabulary as tokenizer.json spells it
    pairs = sorted((i, t) for t, i in tok.get_vocab(with_added_tokens=True).items())
    want_hash = hashlib.sha256(json.dumps(pairs, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()
    assert manifest["tokenizer"]["hash"] == want_hash
    src = manifest["domains"]["recipes"]["source"]
    assert src["kind"] == "jsonl" and src["field"] == "body" and src["files"] == 1
    assert manifest["domains"]["weather"]["source"]["files"] == 120
    for name, docs in (("recipes", tiny_hf.recipes()), ("weather", tiny_hf.forecasts())):
        expected = _expected(docs, tok, eos)
        for split, ids in expected.items():
            got = store.load_split(data, name, split)
            assert got.dtype == np.uint16 and got.tolist() == ids, (name, split)
        assert len(expected["test"]) > 300 and len(expected["train"]) > 2000


@pytest.mark.slow
def test_train_compose_and_evaluate_two_own_domains(world, capsys):
    root, model, data = world["root"], world["model"], world["data"]
    # domains.targets = [] : the data's domains (recipes, weather), none held out for retention
    common = ["--preset", "smoke", "--model", str(model), "--data-dir", str(data), "--set", 'data.source="built"',
              "--set", "domains.targets=[]", "--set", "domains.retention=[]", "--quiet"]
    runs = root / "runs"
    for d in ("recipes", "weather"):
        assert main(["train-expert", "--domain", d, "--steps", "8", "--out", str(runs / d), *common]) == 0
    files = [runs / d / f"expert-{d}.safetensors" for d in ("recipes", "weather")]
    experts = [expert_io.load_expert(f) for f in files]
    for e in experts:     # the base model is recorded: the directory's name, its kind, its tokenizer
        assert e.base["name"] == "model" and e.base["source"] == "hf"
        assert e.base["tokenizer_hash"] == json.loads((data / "manifest.json").read_text())["tokenizer"]["hash"]
    assert main(["compose", "--experts", *map(str, files), "--steps", "8", "--out", str(runs / "mode"), *common]) == 0
    composed = json.loads((runs / "mode" / "result.json").read_text())
    assert composed["domains_trained"] == ["recipes", "weather"]
    assert composed["base_model"]["name"] == "model"
    assert main(["eval", "--out", str(runs / "backbone"), *common]) == 0
    assert main(["eval", "--run", str(runs / "mode"), "--out", str(runs / "eval"), "--quiet"]) == 0
    base = json.loads((runs / "backbone" / "result.json").read_text())["domains"]
    again = json.loads((runs / "eval" / "result.json").read_text())["domains"]
    assert again == composed["domains"]
    own = {d: json.loads((runs / d / "result.json").read_text())["domains"] for d in ("recipes", "weather")}
    for d, other in (("recipes", "weather"), ("weather", "recipes")):
        for result in (own[d], composed["domains"]):
            assert np.isfinite(result[d]["loss"])
            assert result[d]["loss"] < base[d]["loss"]          # training on the domain helped it
        assert own[d][d]["loss"] < own[other][d]["loss"]       # and its own expert beats the other one
    capsys.readouterr()

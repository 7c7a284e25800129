"""Model sources and the data that must go with them: a Hugging Face directory's tokenizer,
the tokenizer hash checked for every model source, uint32 storage for large vocabularies,
manifests written before these fields, the base model recorded in experts, and every
bad input refused with one line, exit 2, nothing written."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mode_jax.cli import main
from mode_jax.data import store
from mode_jax.pipeline import expert_io, presets, sources
from mode_jax.model_io.tokenizer import vocab_hash
from tests import tiny_hf
from tests.helpers import assert_refused
from tests.crosscheck_setup import smollm2_gguf, smollm2_tokenizer  # noqa: F401 (fixtures)
from tests.helpers import stage1_expert

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_hf.make_world(tmp_path_factory.mktemp("sources"))


def _build(out, model, *domains, extra=()):
    return ["data", "build", "--out", str(out), "--model", str(model), "-q", *extra,
            *[a for d in domains for a in ("--domain", d)]]


# ----------------------------------------------------------------------------- bad input

def test_bad_sources_are_one_line_errors_and_write_nothing(world, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n", encoding="utf-8")
    binary = tmp_path / "mixed"
    binary.mkdir()
    (binary / "a.txt").write_text("fine text", encoding="utf-8")
    (binary / "b.txt").write_bytes(b"caf\xe9 latin-1, not UTF-8")
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"body": "x"}\n{"title": "y"}\n', encoding="utf-8")
    model, out = world["model"], tmp_path / "out"
    for domains, needles in (
        ([f"e={empty}"], ("'e'", "no non-empty document")),
        ([f"m={binary}"], ("b.txt", "not UTF-8 text", "byte 3")),
        ([f"j={no_field}:body"], ("nofield.jsonl", "line 2", "no text field 'body'", "title")),
        ([f"x={tmp_path / 'missing.jsonl'}"], ("missing.jsonl", "does not exist")),
        ([f"g={tmp_path}/*.nothing"], ("no file matches",)),
        (["poetry"], ("unknown domain(s) poetry",)),
        ([f"a={world['jsonl']}:body", f"a={world['folder']}"], ("domain 'a' is given twice",)),
        ([f"a/b={world['folder']}"], ("domain name 'a/b' is not valid",)),
    ):
        assert_refused(capsys, _build(out, model, *domains), out, *needles)


def test_a_failed_build_leaves_the_previous_data_intact(world, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(_build(out, world["model"], f"r={world['jsonl']}:body")) == 0
    capsys.readouterr()
    before = store.load_split(out, "r", "train").copy()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "ok"}\nnot json\n', encoding="utf-8")
    assert main(_build(out, world["model"], f"r={world['jsonl']}:body", f"s={bad}:body")) == 2
    assert "bad.jsonl: line 2 is not JSON" in capsys.readouterr().err
    assert np.array_equal(store.load_split(out, "r", "train"), before)


def test_model_directory_without_config_json(world, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(world["model"] / "tokenizer.json", bare)
    out = tmp_path / "run"
    assert_refused(capsys, ["eval", "--preset", "smoke", "--model", str(bare), "--out", str(out), "-q"], out,
                   str(bare), "has no config.json", "tokenizer.json")


def test_tokenizer_larger_than_the_embedding(world, tmp_path, capsys):
    small = tiny_hf.write_model_dir(tmp_path / "small", world["tok"], vocab_size=300)   # tokenizer has 320
    out = tmp_path / "data"
    assert_refused(capsys, _build(out, small, f"r={world['jsonl']}:body"), out,
                   "token ids up to 319", "vocab_size is 300", "does not fit the model's embedding")


def test_data_from_another_tokenizer_is_refused(world, tmp_path, capsys):
    # same size, other merges: only the hash tells them apart
    other_tok = tiny_hf.train_tokenizer(tiny_hf.forecasts())
    assert other_tok.get_vocab_size() == world["tok"].get_vocab_size()
    other = tiny_hf.write_model_dir(tmp_path / "other", other_tok)
    data = tmp_path / "data"
    assert main(_build(data, other, f"r={world['jsonl']}:body", f"w={world['folder']}")) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    line = assert_refused(capsys, ["train-expert", "--domain", "r", "--preset", "smoke", "--model", str(world["model"]),
                                   "--data-dir", str(data), "--set", 'data.source="built"', "--set",
                                   "domains.targets=[]", "--set", "domains.retention=[]", "--out", str(out), "-q"],
                          out, "tokenized by another tokenizer", "rebuild it with `mode-jax data build --model")
    assert vocab_hash(_tok(other))[:12] in line and vocab_hash(_tok(world["model"]))[:12] in line


def _tok(model_dir):
    from mode_jax.model_io.tokenizer import load_hf_tokenizer
    return load_hf_tokenizer(model_dir)


def test_unknown_domain_in_own_data_names_what_it_has(world, tmp_path, capsys):
    data = tmp_path / "data"
    assert main(_build(data, world["model"], f"recipes={world['jsonl']}:body")) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    assert_refused(capsys, ["train-expert", "--domain", "cooking", "--preset", "smoke", "--model", str(world["model"]),
                            "--data-dir", str(data), "--set", 'data.source="built"', "--out", str(out), "-q"],
                   out, "unknown domain 'cooking'", "it has: recipes")


# ----------------------------------------------------------------------------- storage and manifests

def test_vocabulary_above_65536_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    n = 70_000
    vocab = {"[EOS]": 0} | {f"w{i}": i + 1 for i in range(n)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[EOS]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[EOS]"}))
    docs = tmp_path / "docs"
    docs.mkdir()
    words = [[69_999, 5, 65_536], [1, 2, 3, 4], [65_535, 40_000], [12, 69_000, 7]]
    for i, ws in enumerate(words):
        (docs / f"{i}.txt").write_text(" ".join(f"w{w}" for w in ws))
    out = tmp_path / "data"
    assert main(["data", "build", "--out", str(out), "--model", str(tok_dir), "-q", "--split", "0,0",
                 "--domain", f"big={docs}"]) == 0
    manifest = store.read_manifest(out)
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] == n + 1
    got = store.load_split(out, "big", "train")
    assert got.dtype == np.uint32
    assert got.tolist() == [i for ws in words for i in [w + 1 for w in ws] + [0]]   # id = word + 1, EOS 0


def test_old_manifest_loads_as_uint16_smollm2(tmp_path, smollm2_tokenizer):  # noqa: F811
    # docs/data_manifest.json predates "hash": it means SmolLM2's tokenizer and uint16 files
    assert store.LEGACY_TOKENIZER_HASH == vocab_hash(smollm2_tokenizer)
    data = tmp_path / "data"
    data.mkdir()
    manifest = json.loads((REPO / "docs" / "data_manifest.json").read_text())
    assert "hash" not in manifest["tokenizer"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    read = store.read_manifest(data)
    assert store.manifest_dtype(read) == np.uint16 and store.tokenizer_hash(read) == store.LEGACY_TOKENIZER_HASH
    assert store.domain_names(read) == ("code", "english", "math")
    cfg = presets.load_config(preset="cpu", overrides=[f'data.dir="{data}"'])
    sources.check_tokenizer_matches(cfg)           # SmolLM2's own data: accepted
    del manifest["dtype"]                          # the oldest form: no dtype either
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert store.manifest_dtype(store.read_manifest(data)) == np.uint16


# ----------------------------------------------------------------------------- base model in experts

def test_compose_refuses_experts_of_another_base_naming_both(tmp_path, capsys):
    files = []
    for domain, name in (("math", "llama-a"), ("code", "qwen-b")):
        e = stage1_expert(domain=domain)
        e = dataclasses.replace(e, base={"name": name, "source": "hf", "fingerprint": e.backbone_fingerprint,
                                         "tokenizer_hash": name * 8})
        files.append(expert_io.save_expert(tmp_path / f"{domain}.safetensors", e))
    assert expert_io.load_expert(files[0]).base["name"] == "llama-a"
    out = tmp_path / "run"
    assert_refused(capsys, ["compose", "--experts", *map(str, files), "--preset", "smoke", "--out", str(out), "-q"],
                   out, "different base models", "llama-a (hf", "qwen-b (hf", "math.safetensors", "code.safetensors")
    # one expert against the backbone in use (the smoke preset's tiny model): both named
    assert_refused(capsys, ["compose", "--experts", str(files[0]), "--preset", "smoke", "--out", str(out), "-q"],
                   out, "base model differs", "llama-a (hf", "tiny(seed=0")

"""Bring your own domains, end to end: two corpora of the user's own files (a JSON-lines file
and a folder of text files, written here), a tokenizer trained on them, a tiny random
backbone saved as a Hugging Face directory; `data build --domain` -> `train-expert` on each
-> `compose` -> `eval`, all through the CLI as a user would run it.

The expected token files are recomputed independently: the split from the documented
hash rule, the ids from the `tokenizers` library reading the same tokenizer.json.

The same workflow runs twice: on a tiny random Llama written by mode_jax.model_io.hf_loader (fast,
no other environment), and on a tiny random Qwen2 that transformers itself creates and
saves (Python 3.11 env, tests/crosscheck/arch_reference.py), where a LoRA run is also
exported to PEFT and `PeftModel.from_pretrained` must give our logits.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from mode_jax.cli import main
from mode_jax.data import store
from mode_jax.pipeline import expert_io
from tests import tiny_hf
from tests.crosscheck_setup import py311  # noqa: F401 (fixture)
from tests.tolerances import assert_close

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


def _common(model, data):
    # domains.targets = [] : the data's domains (recipes, weather), none held out for retention
    return ["--preset", "smoke", "--model", str(model), "--data-dir", str(data), "--set", 'data.source="built"',
            "--set", "domains.targets=[]", "--set", "domains.retention=[]", "--quiet"]


def _train_compose_evaluate(model, data, runs, base_source: str, *, specialists: bool = True) -> dict:
    """The user's workflow: an expert per domain, compose them, evaluate; checks what must hold
    (`specialists`: also that each expert beats the other on its own domain)."""
    common = _common(model, data)
    for d in ("recipes", "weather"):
        assert main(["train-expert", "--domain", d, "--steps", "8", "--out", str(runs / d), *common]) == 0
    files = [runs / d / f"expert-{d}.safetensors" for d in ("recipes", "weather")]
    for e in map(expert_io.load_expert, files):   # the base model is recorded: name, kind, tokenizer
        assert e.base["name"] == model.name and e.base["source"] == base_source
        assert e.base["tokenizer_hash"] == json.loads((data / "manifest.json").read_text())["tokenizer"]["hash"]
    assert main(["compose", "--experts", *map(str, files), "--steps", "8", "--out", str(runs / "mode"), *common]) == 0
    composed = json.loads((runs / "mode" / "result.json").read_text())
    assert composed["domains_trained"] == ["recipes", "weather"]
    assert composed["base_model"]["name"] == model.name
    _, _, info = expert_io.load_model(runs / "mode" / "model.safetensors", {}, fingerprint=composed["backbone_fingerprint"])
    assert info["base_model"] == composed["base_model"]                 # the model file records it too
    assert main(["eval", "--out", str(runs / "backbone"), *common]) == 0
    assert main(["eval", "--run", str(runs / "mode"), "--out", str(runs / "eval"), "--quiet"]) == 0
    base = json.loads((runs / "backbone" / "result.json").read_text())["domains"]
    assert json.loads((runs / "eval" / "result.json").read_text())["domains"] == composed["domains"]
    own = {d: json.loads((runs / d / "result.json").read_text())["domains"] for d in ("recipes", "weather")}
    for d, other in (("recipes", "weather"), ("weather", "recipes")):
        for result in (own[d], composed["domains"]):
            assert np.isfinite(result[d]["loss"])
            assert result[d]["loss"] < base[d]["loss"]          # training on the domain helped it
        if specialists:                                         # its own expert beats the other one
            assert own[d][d]["loss"] < own[other][d]["loss"]
    return composed


@pytest.mark.slow
def test_train_compose_and_evaluate_two_own_domains(world, capsys):
    _train_compose_evaluate(world["model"], world["data"], world["root"] / "runs", "hf")
    capsys.readouterr()


# A Qwen2 shape transformers builds: q/k/v biases, tied head, the vocabulary of the trained tokenizer.
QWEN2 = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 64, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
         "tie_word_embeddings": True, "rope_theta": 1e6}


@pytest.mark.slow
def test_own_domains_on_a_qwen2_saved_by_transformers_and_lora_to_peft(world, py311, capsys):  # noqa: F811
    from mode_jax.export import load_run
    from tests.test_crosscheck_arch import run_reference

    root, tok = world["root"] / "qwen2", world["tok"]
    model = root / "qwen2-tiny"
    for sub in ("gguf", "made", "loaded"):
        (root / sub).mkdir(parents=True)
    tokens = np.random.default_rng(5).integers(0, tok.get_vocab_size(), (2, 16)).tolist()
    run_reference(py311, {"make": [{"name": "qwen2", "model_type": "qwen2", "seed": 3, "dir": str(model),
                                    "config": {**QWEN2, "vocab_size": tok.get_vocab_size()},
                                    "gguf": str(root / "gguf" / "qwen2.gguf"), "tokens": tokens,
                                    "prompt": tokens[0][:4], "new_tokens": 2}]}, root / "made")
    for name in ("tokenizer.json", "tokenizer_config.json"):      # the user's tokenizer beside the weights
        shutil.copy(world["model"] / name, model / name)
    data = root / "data"
    assert main(["data", "build", "--out", str(data), "--model", str(model), "-q", "--split", ",".join(SPLIT),
                 "--domain", f"recipes={world['jsonl']}:body", "--domain", f"weather={world['folder']}"]) == 0
    # transformers' random init (weights of a few tenths) starts far above ln(vocab): 8 steps
    # lower every loss, but which expert is ahead on a domain is not settled yet
    _train_compose_evaluate(model, data, root / "runs", "hf", specialists=False)
    lora = root / "runs" / "lora"
    assert main(["finetune", "--method", "lora", "--steps", "6", "--out", str(lora), *_common(model, data)]) == 0
    assert main(["export", "--run", str(lora), "--to", "peft", str(root / "peft"), "--quiet"]) == 0
    theirs = run_reference(py311, {"load": [{"name": "peft", "kind": "peft", "dir": str(root / "peft"),
                                             "base": str(model), "tokens": tokens}]}, root / "loaded")
    assert theirs["peft"]["class"] == "PeftModelForCausalLM"
    ours = load_run(lora)
    assert ours.config.qkv_bias and ours.method == "lora"
    assert_close(np.load(root / "loaded" / "out" / "peft.npy"), ours.logits(np.array(tokens, np.int32)))
    capsys.readouterr()
